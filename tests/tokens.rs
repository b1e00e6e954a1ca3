//! Client tokens interoperate with the JWT library a backend is likely to use: a token made by
//! PyJWT (Debian's python3-jwt) verifies here, and one made by `gearsock token` verifies in
//! PyJWT, claims and all. Real processes on both sides.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::BIN;
use gearsock::jwt::{Keys, verify};

const KEY: &str = "a-shared-secret-of-at-least-32-bytes!";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn python(script: &str, args: &[&str]) -> String {
    // Debian's python3, the one python3-jwt installs into (a pyenv on PATH would not have it).
    let out =
        Command::new("/usr/bin/python3").arg("-c").arg(script).args(args).output().expect("run python3");
    assert!(out.status.success(), "python3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8").trim().to_string()
}

#[test]
fn a_pyjwt_token_verifies_here() {
    let script = "import sys, time, jwt; k = sys.argv[1]; \
                  print(jwt.encode({'sub': 'backend-user', 'exp': int(time.time()) + 60, \
                  'functions': ['resize*'], 'max_jobs': 2}, k, algorithm='HS256'))";
    let token = python(script, &[KEY]);
    let claims = verify(&token, &Keys::parse(KEY).expect("key"), now(), 30).expect("PyJWT's token verifies");
    assert_eq!(claims.sub, "backend-user");
    assert_eq!(claims.functions, Some(vec!["resize*".to_string()]));
    assert_eq!(claims.max_jobs, Some(2));
    let wrong = python(script, &["another-secret-that-is-also-32-bytes-long"]);
    assert_eq!(
        verify(&wrong, &Keys::parse(KEY).expect("key"), now(), 30).unwrap_err().to_string(),
        "bad signature"
    );
}

#[test]
fn a_gearsock_token_verifies_in_pyjwt() {
    let dir = std::env::temp_dir().join(format!("gearsock-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key_file = dir.join("keys");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
    let out = Command::new(BIN)
        .args(["token", "--key-file", key_file.to_str().expect("path"), "--sub", "alice", "--ttl", "10m"])
        .args(["--function", "resize*", "--max-jobs", "3"])
        .output()
        .expect("run gearsock token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).expect("UTF-8");
    let script = "import sys, json, jwt; \
                  print(json.dumps(jwt.decode(sys.argv[2], sys.argv[1], algorithms=['HS256']), sort_keys=True))";
    let claims: serde_json::Value =
        serde_json::from_str(&python(script, &[KEY, token.trim()])).expect("JSON");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["functions"], serde_json::json!(["resize*"]));
    assert_eq!(claims["max_jobs"], 3);
    let ttl = claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat");
    assert_eq!(ttl, 600);
    let short = std::fs::write(&key_file, "short\n").map(|()| {
        Command::new(BIN)
            .args(["token", "--key-file", key_file.to_str().unwrap(), "--sub", "a"])
            .output()
            .unwrap()
    });
    let short = short.expect("run");
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 bytes"));
    std::fs::remove_dir_all(&dir).ok();
}
