//! Signed client tokens: JSON Web Tokens signed with HMAC-SHA256 (HS256), checked and made.
//!
//! Sans-IO. [`Keys::parse`] reads a key file's text (one secret per line, each at least
//! [`MIN_KEY_BYTES`]), [`verify`] checks a token against every key and the time it is given
//! (Unix seconds) and returns its [`Claims`], and [`sign`] makes one (for `gearsock token`).
//! The three parts are split and decoded with the base64 and serde_json already in the tree;
//! the MAC is RustCrypto's, and its `verify_slice` compares in constant time. No JWT framework:
//! what is accepted is exactly what this file says.
//!
//! Refused, each with a reason a developer can act on ([`TokenError`]): a token over
//! [`MAX_TOKEN_BYTES`]; anything but three base64url parts; a header whose `alg` is not
//! exactly `HS256` (`none` and `RS256` included); a signature no key makes; a `sub` that is
//! not a string of 1 to 128 bytes; no `exp`, or one in the past beyond the leeway; an `nbf` or
//! `iat` in the future beyond the leeway; a `functions` that is not a list of patterns; a
//! `max_jobs` that is not a whole number. It never panics on input.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest token accepted, whole (header, claims and signature with their dots).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The shortest secret a key file may hold: 256 bits, as RFC 7518 asks of HS256 keys.
pub const MIN_KEY_BYTES: usize = 32;
/// The longest `sub` (it names the client in logs).
pub const MAX_SUB_BYTES: usize = 128;
/// The most `functions` patterns a token may carry, and the longest of them.
pub const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_BYTES: usize = 512;

/// The secrets any of which may sign a token: several, so that a key can be rotated without
/// downtime (add the new one, hand out tokens signed with it, remove the old one).
#[derive(Clone, PartialEq, Eq)]
pub struct Keys(Vec<Vec<u8>>);

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(<{} secret(s)>)", self.0.len()) // never the secrets themselves
    }
}

impl Keys {
    /// A key file's text: one secret per line; blank lines and lines starting with `#` are
    /// skipped, surrounding spaces are not part of a secret.
    pub fn parse(text: &str) -> Result<Keys, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let secret = line.trim();
            if secret.is_empty() || secret.starts_with('#') {
                continue;
            }
            if secret.len() < MIN_KEY_BYTES {
                return Err(format!(
                    "line {}: a secret must be at least {MIN_KEY_BYTES} bytes (this one has {})",
                    n + 1,
                    secret.len()
                ));
            }
            keys.push(secret.as_bytes().to_vec());
        }
        if keys.is_empty() {
            return Err("it holds no secret (one per line)".into());
        }
        Ok(Keys(keys))
    }

    /// No secret: verifies nothing (a server whose key file could not be read fails closed).
    pub fn none() -> Keys {
        Keys(Vec::new())
    }

    /// How many secrets there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for parsed keys; here for the usual pair with `len`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first secret: the one `gearsock token` signs with.
    pub fn first(&self) -> &[u8] {
        self.0.first().map(Vec::as_slice).unwrap_or_default()
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The client's name (1 to 128 bytes): logs and per-subject limits.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Function patterns this client may submit, intersected with the server's; `None`: the
    /// server's alone.
    pub functions: Option<Vec<String>>,
    /// A lower limit on the client's unfinished jobs; `None`: the server's.
    pub max_jobs: Option<u64>,
}

/// Why a token was refused. `Display` is the reason sent to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Over `MAX_TOKEN_BYTES`.
    TooLong,
    /// Not three base64url parts of JSON objects; the words say which part.
    Malformed(&'static str),
    /// The header's `alg` is not `HS256`.
    Alg,
    /// No key makes this signature.
    BadSignature,
    /// `exp` is past (beyond the leeway).
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    NotYetValid,
    /// A claim is missing or has the wrong shape; the words say which.
    BadClaim(&'static str),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::TooLong => write!(f, "token over {MAX_TOKEN_BYTES} bytes"),
            TokenError::Malformed(what) => write!(f, "malformed token: {what}"),
            TokenError::Alg => f.write_str("alg must be HS256"),
            TokenError::BadSignature => f.write_str("bad signature"),
            TokenError::Expired => f.write_str("token expired"),
            TokenError::NotYetValid => f.write_str("token not yet valid"),
            TokenError::BadClaim(what) => write!(f, "bad claim: {what}"),
        }
    }
}

impl std::error::Error for TokenError {}

impl TokenError {
    /// A short stable name, for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::TooLong => "too_long",
            TokenError::Malformed(_) => "malformed",
            TokenError::Alg => "alg",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadClaim(_) => "bad_claim",
        }
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Option<std::borrow::Cow<'a, str>>,
}

/// The claims as they may come: every field optional and loosely typed, so that each problem
/// gets its own reason rather than serde's.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    functions: Option<serde_json::Value>,
    max_jobs: Option<serde_json::Value>,
}

/// Checks `token` against `keys` at `now` (Unix seconds), with `leeway` seconds of clock skew
/// allowed either way, and returns its claims.
pub fn verify(token: &str, keys: &Keys, now: u64, leeway: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three parts separated by dots"));
    };
    let header_json = decode(header).ok_or(TokenError::Malformed("header is not base64url"))?;
    let head: Header = serde_json::from_slice(&header_json)
        .map_err(|_| TokenError::Malformed("header is not a JSON object"))?;
    if head.alg.as_deref() != Some("HS256") {
        return Err(TokenError::Alg);
    }
    let signature = decode(signature).ok_or(TokenError::Malformed("signature is not base64url"))?;
    let signed = &token[..header.len() + 1 + payload.len()];
    let good = keys.0.iter().any(|key| {
        HmacSha256::new_from_slice(key).is_ok_and(|mut mac| {
            mac.update(signed.as_bytes());
            mac.verify_slice(&signature).is_ok()
        })
    });
    if !good {
        return Err(TokenError::BadSignature);
    }
    // Only a signed payload is read: nothing an outsider wrote is parsed beyond the header.
    let payload = decode(payload).ok_or(TokenError::Malformed("claims are not base64url"))?;
    let raw: RawClaims = serde_json::from_slice(&payload)
        .map_err(|_| TokenError::Malformed("claims are not a JSON object"))?;
    claims(raw, now, leeway)
}

fn claims(raw: RawClaims, now: u64, leeway: u64) -> Result<Claims, TokenError> {
    let sub = match raw.sub {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUB_BYTES => s,
        Some(_) => return Err(TokenError::BadClaim("sub must be a string of 1 to 128 bytes")),
        None => return Err(TokenError::BadClaim("sub is missing")),
    };
    let exp = match raw.exp {
        Some(v) => seconds(&v).ok_or(TokenError::BadClaim("exp must be a number of seconds"))?,
        None => return Err(TokenError::BadClaim("exp is missing")),
    };
    if now > exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    for (value, what) in
        [(raw.nbf, "nbf must be a number of seconds"), (raw.iat, "iat must be a number of seconds")]
    {
        if let Some(v) = value {
            let at = seconds(&v).ok_or(TokenError::BadClaim(what))?;
            if at > now.saturating_add(leeway) {
                return Err(TokenError::NotYetValid);
            }
        }
    }
    let functions = match raw.functions {
        None => None,
        Some(serde_json::Value::Array(list)) if list.len() <= MAX_PATTERNS => {
            let patterns: Option<Vec<String>> = list
                .into_iter()
                .map(|p| match p {
                    serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_PATTERN_BYTES => Some(s),
                    _ => None,
                })
                .collect();
            Some(patterns.ok_or(TokenError::BadClaim("functions must be a list of non-empty strings"))?)
        }
        Some(_) => return Err(TokenError::BadClaim("functions must be a list of at most 64 patterns")),
    };
    let max_jobs = match raw.max_jobs {
        None => None,
        Some(v) => Some(v.as_u64().ok_or(TokenError::BadClaim("max_jobs must be a whole number"))?),
    };
    Ok(Claims { sub, exp, functions, max_jobs })
}

/// Seconds as a JSON number: a whole number, or a fraction (rounded down), never negative.
fn seconds(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e15).map(|f| f as u64))
}

fn decode(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part).ok()
}

/// A token for `claims` (a JSON object's text), signed with `key`.
pub fn sign(claims: &str, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.as_bytes());
    let signed = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn keys() -> Keys {
        Keys::parse(&format!("# rotated keys\n{KEY}\n\n  ffffffffffffffffffffffffffffffff-new  \n"))
            .expect("keys")
    }

    fn token(claims: &str) -> String {
        sign(claims, KEY.as_bytes())
    }

    #[test]
    fn key_files_hold_long_secrets_one_per_line() {
        assert_eq!(keys().len(), 2);
        assert!(Keys::parse("short\n").unwrap_err().contains("at least 32 bytes"));
        assert!(Keys::parse("\n# nothing\n").unwrap_err().contains("no secret"));
        assert!(!format!("{:?}", keys()).contains(KEY), "Debug must not show a secret");
    }

    #[test]
    fn a_good_token_gives_its_claims_with_any_key() {
        let t =
            token(&format!(r#"{{"sub":"alice","exp":{},"functions":["resize*"],"max_jobs":3}}"#, NOW + 60));
        let c = verify(&t, &keys(), NOW, 30).expect("valid");
        assert_eq!(c.sub, "alice");
        assert_eq!(c.functions, Some(vec!["resize*".to_string()]));
        assert_eq!(c.max_jobs, Some(3));
        let other =
            sign(&format!(r#"{{"sub":"bob","exp":{}}}"#, NOW + 60), b"ffffffffffffffffffffffffffffffff-new");
        assert_eq!(verify(&other, &keys(), NOW, 30).expect("second key").sub, "bob");
    }

    #[test]
    fn each_bad_token_gets_its_own_reason() {
        let claims = format!(r#"{{"sub":"alice","exp":{}}}"#, NOW + 60);
        let good = token(&claims);
        let k = keys();
        let reason = |t: &str| verify(t, &k, NOW, 30).unwrap_err().to_string();
        assert_eq!(reason(&"a".repeat(MAX_TOKEN_BYTES + 1)), "token over 8192 bytes");
        assert_eq!(reason("abc"), "malformed token: not three parts separated by dots");
        assert_eq!(reason("a.b.c.d"), "malformed token: not three parts separated by dots");
        assert_eq!(reason("!!.b.c"), "malformed token: header is not base64url");
        // alg none, with or without a signature, and RS256
        let none =
            format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(&claims));
        assert_eq!(reason(&none), "alg must be HS256");
        let rs = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(&claims)
        );
        assert_eq!(reason(&rs), "alg must be HS256");
        // tampered claims, wrong key
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"root","exp":{}}}"#, NOW + 60));
        parts[1] = &forged;
        assert_eq!(reason(&parts.join(".")), "bad signature");
        let wrong = sign(&claims, b"a different secret, long enough....");
        assert_eq!(reason(&wrong), "bad signature");
        // time
        assert_eq!(reason(&token(&format!(r#"{{"sub":"a","exp":{}}}"#, NOW - 31))), "token expired");
        assert!(
            verify(&token(&format!(r#"{{"sub":"a","exp":{}}}"#, NOW - 29)), &k, NOW, 30).is_ok(),
            "leeway"
        );
        let early = format!(r#"{{"sub":"a","exp":{},"nbf":{}}}"#, NOW + 99, NOW + 31);
        assert_eq!(reason(&token(&early)), "token not yet valid");
        // claims
        assert_eq!(reason(&token(&format!(r#"{{"exp":{}}}"#, NOW + 9))), "bad claim: sub is missing");
        let long_sub = format!(r#"{{"sub":"{}","exp":{}}}"#, "s".repeat(129), NOW + 9);
        assert!(reason(&token(&long_sub)).contains("1 to 128 bytes"));
        assert_eq!(reason(&token(r#"{"sub":"a"}"#)), "bad claim: exp is missing");
        assert!(
            reason(&token(&format!(r#"{{"sub":"a","exp":{},"functions":"x"}}"#, NOW + 9)))
                .contains("functions")
        );
        assert!(
            reason(&token(&format!(r#"{{"sub":"a","exp":{},"max_jobs":-1}}"#, NOW + 9))).contains("max_jobs")
        );
        assert_eq!(reason(&sign("[1]", KEY.as_bytes())), "malformed token: claims are not a JSON object");
    }
}
