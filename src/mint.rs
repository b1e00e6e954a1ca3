//! `gearsock token`: makes a signed client token, for development, tests and `curl`. In
//! production the application's backend signs tokens (see docs/OPERATIONS.md, "Who may run
//! what"); this command is the same thing from a shell.
//!
//! It reads the key file and the clock, builds the claims and prints the token. It is a small
//! program of its own: the server never uses it.

use std::error::Error;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::jwt::{Keys, sign};

/// Options of `gearsock token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenOptions {
    /// The key file (`--key-file`): the first secret signs.
    pub key_file: String,
    /// The subject (`--sub`), 1 to 128 bytes.
    pub sub: String,
    /// How long the token is valid (`--ttl`, default 1 h).
    pub ttl: Duration,
    /// `--function` patterns; none: the server's allow-list alone.
    pub functions: Vec<String>,
    /// `--max-jobs`; none: the server's limit.
    pub max_jobs: Option<u64>,
}

/// Prints the token (one line).
pub fn run_token(opts: &TokenOptions) -> Result<i32, Box<dyn Error>> {
    let text = std::fs::read_to_string(&opts.key_file)
        .map_err(|e| format!("--key-file {}: cannot read it: {e}", opts.key_file))?;
    let keys = Keys::parse(&text).map_err(|e| format!("--key-file {}: {e}", opts.key_file))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    println!("{}", sign(&claims(opts, now).to_string(), keys.first()));
    Ok(0)
}

/// The claims of a token made at `now` (Unix seconds).
fn claims(opts: &TokenOptions, now: u64) -> serde_json::Value {
    let mut claims = json!({ "sub": opts.sub, "iat": now, "exp": now + opts.ttl.as_secs() });
    if !opts.functions.is_empty() {
        claims["functions"] = json!(opts.functions);
    }
    if let Some(n) = opts.max_jobs {
        claims["max_jobs"] = json!(n);
    }
    claims
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::verify;

    #[test]
    fn the_token_carries_what_was_asked_and_verifies() {
        let opts = TokenOptions {
            key_file: String::new(),
            sub: "alice".into(),
            ttl: Duration::from_secs(3600),
            functions: vec!["resize*".into()],
            max_jobs: Some(2),
        };
        let key = "k".repeat(32);
        let token = sign(&claims(&opts, 1_000).to_string(), key.as_bytes());
        let got = verify(&token, &Keys::parse(&key).expect("key"), 1_000, 0).expect("valid");
        assert_eq!((got.sub.as_str(), got.exp, got.max_jobs), ("alice", 4_600, Some(2)));
        assert_eq!(got.functions, Some(vec!["resize*".to_string()]));
        assert_eq!(
            verify(&token, &Keys::parse(&key).unwrap(), 4_631, 30).unwrap_err().to_string(),
            "token expired"
        );
    }
}
