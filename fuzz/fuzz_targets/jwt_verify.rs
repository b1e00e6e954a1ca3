//! Arbitrary bytes as a client token: `jwt::verify` against two fixed keys at a fixed time.
//!
//! Input: one control byte, then the token's bytes (lossily UTF-8, as the server hands it a
//! `&str`). With the control byte's low bit set the bytes are made into the claims of a token
//! signed with the first key instead, so that the claims checks are reached, not only the
//! signature check.
//!
//! Checked, besides "no panic": a token made here from claims that verify is verified with
//! the same subject again; anything accepted has a `sub` of 1 to 128 bytes and an `exp` within
//! the leeway; every refusal's reason is non-empty.
#![no_main]

use gearsock::jwt::{Keys, MAX_SUB_BYTES, sign, verify};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000;
const LEEWAY: u64 = 30;
const KEY: &str = "fuzzing-key-0123456789abcdef-0123456789";

fuzz_target!(|data: &[u8]| {
    let [control, bytes @ ..] = data else { return };
    let keys = Keys::parse(&format!("{KEY}\nsecond-fuzzing-key-0123456789abcdef-0123")).expect("keys");
    let text = String::from_utf8_lossy(bytes);
    let token = if control & 1 == 1 { sign(&text, KEY.as_bytes()) } else { text.into_owned() };
    match verify(&token, &keys, NOW, LEEWAY) {
        Ok(claims) => {
            assert!(!claims.sub.is_empty() && claims.sub.len() <= MAX_SUB_BYTES);
            assert!(claims.exp + LEEWAY >= NOW);
            let again = verify(&token, &keys, NOW, LEEWAY).expect("the same token verifies again");
            assert_eq!(again, claims);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
