//! Who may run what (issue 19), against a real server and a real gearmand: the allow-list and
//! its reserved prefix, each token refusal with its reason while another client is served, the
//! Bearer header and the `auth` message, refresh, expiry with a job still running, the job
//! rate, and the caps per address (429) and per subject (1008). Servers here start with
//! `Server::start_bare`: only the functions a test names are allowed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use gearsock::jwt::sign;
use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;

const KEY: &str = "a-shared-secret-of-at-least-32-bytes!";
const LIMIT: Duration = Duration::from_secs(10);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// A token for `sub` that expires in `ttl_s` (negative: already expired), signed with `key`.
fn token_with(key: &str, sub: &str, ttl_s: i64, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": unix_now().saturating_add_signed(ttl_s)});
    if let (Some(c), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        c.extend(extra);
    }
    sign(&claims.to_string(), key.as_bytes())
}

fn token(sub: &str, ttl_s: i64) -> String {
    token_with(KEY, sub, ttl_s, json!({}))
}

/// A key file in a fresh temp directory (removed with it).
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn new(text: &str) -> KeyFile {
        let dir =
            std::env::temp_dir().join(format!("gearsock-access-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keys");
        std::fs::write(&path, text).expect("key file");
        KeyFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn auth(ws: &mut Ws, token: &str) -> Value {
    send(ws, &json!({"type": "auth", "token": token}).to_string());
    recv_json(ws)
}

fn submit(ws: &mut Ws, function: &str) -> Value {
    send(ws, &json!({"type": "submit", "function": function, "payload": "p"}).to_string());
    recv_json(ws)
}

fn error_of(reply: &Value) -> (&str, &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    (reply["code"].as_str().unwrap_or(""), reply["message"].as_str().unwrap_or(""))
}

/// The close frame that ends `ws`, skipping anything before it.
fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(frame)) => return frame.map(|f| f.code),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

#[test]
fn default_flags_forbid_every_submit_but_the_ping_and_gearsock_functions_are_never_allowed() {
    let g = Gearmand::start();
    let s = Server::start_bare(&g.addr(), &[]);
    let mut ws = connect(&s.url());
    let reply = submit(&mut ws, "reverse");
    let (code, message) = error_of(&reply);
    assert_eq!(code, "forbidden");
    assert!(message.contains("\"reverse\"") && message.contains("--allow-function"), "{message}");
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message", "the article's ping needs no flag");
    assert_eq!(s.metric("gearsock_access_refused_total{what=\"function\"}"), 1.0);

    let s = Server::start_bare(&g.addr(), &["--allow-function", "*", "--no-ping"]);
    let mut ws = connect(&s.url());
    for f in ["gearsock.report.other", "gearsock."] {
        let reply = submit(&mut ws, f);
        assert!(error_of(&reply).1.contains("reserved"), "{reply}");
    }
    send(&mut ws, r#"{"type":"ping"}"#);
    assert!(error_of(&recv_json(&mut ws)).1.contains("--no-ping"));
    assert_eq!(submit(&mut ws, "reverse")["type"], "job.created", "* allows the rest");
}

#[test]
fn each_bad_token_is_refused_with_its_reason_while_another_client_is_served() {
    let g = Gearmand::start();
    let keys = KeyFile::new(&format!("# rotated in\n{}\n{KEY}\n", "n".repeat(40)));
    let args = ["--client-token-key-file", keys.path(), "--token-leeway-s", "0", "--allow-function", "echo"];
    let s = Server::start_bare(&g.addr(), &args);
    let mut good = connect(&s.url());
    send(&mut good, r#"{"type":"ping"}"#);
    assert_eq!(error_of(&recv_json(&mut good)).0, "unauthorized", "nothing before a token");
    assert_eq!(auth(&mut good, &token("alice", 60))["type"], "auth.ok");

    let valid = token("mallory", 60);
    let parts: Vec<&str> = valid.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": unix_now() + 60}).to_string());
    let alg_none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let cases = [
        ("not-a-token".to_string(), "malformed token"),
        (format!("{}.{forged_claims}.{}", parts[0], parts[2]), "bad signature"),
        (token("mallory", -5), "token expired"),
        (alg_none, "alg must be HS256"),
        (token_with("another-secret-that-is-also-32-bytes-long", "mallory", 60, json!({})), "bad signature"),
    ];
    for (bad, reason) in cases {
        let mut ws = connect(&s.url());
        let reply = auth(&mut ws, &bad);
        assert_eq!(error_of(&reply), ("unauthorized", error_of(&reply).1));
        assert!(error_of(&reply).1.starts_with(reason), "{reason}: {reply}");
        send(&mut good, r#"{"type":"ping"}"#);
        assert_eq!(recv(&mut good), "before the 'received' message", "the good client is served throughout");
    }
    // Three refusals on one connection close it with 1008.
    let mut ws = connect(&s.url());
    for _ in 0..3 {
        assert_eq!(error_of(&auth(&mut ws, "x.y.z")).0, "unauthorized");
    }
    assert_eq!(close_code(&mut ws), Some(CloseCode::Policy));
    assert_eq!(s.metric("gearsock_auth_total{outcome=\"refused\",reason=\"bad_signature\"}"), 2.0);
    assert_eq!(s.metric("gearsock_auth_total{outcome=\"ok\",reason=\"valid\"}"), 1.0);
}

#[test]
fn a_bearer_header_or_an_auth_message_authenticates_and_a_refresh_keeps_the_sub() {
    let g = Gearmand::start();
    let keys = KeyFile::new(KEY);
    let s =
        Server::start_bare(&g.addr(), &["--client-token-key-file", keys.path(), "--allow-function", "echo"]);
    let bearer = format!("Bearer {}", token("script", 60));
    let mut ws = connect_with(&s.url(), &[("Authorization", &bearer)]);
    let ok = recv_json(&mut ws);
    assert_eq!((ok["type"].as_str(), ok["sub"].as_str()), (Some("auth.ok"), Some("script")), "{ok}");
    assert_eq!(submit(&mut ws, "echo")["type"], "job.created");

    let mut ws = connect(&s.url());
    let first = auth(&mut ws, &token("browser", 60));
    assert_eq!(first["sub"], "browser");
    let refreshed = auth(&mut ws, &token("browser", 600));
    assert_eq!(refreshed["type"], "auth.ok");
    assert!(refreshed["exp"].as_u64() > first["exp"].as_u64(), "{first} {refreshed}");
    let other = auth(&mut ws, &token("someone-else", 600));
    assert!(error_of(&other).1.contains("browser"), "a refresh keeps the sub: {other}");
    let narrowed = token_with(KEY, "browser", 600, json!({"functions": ["resize*"]}));
    assert_eq!(auth(&mut ws, &narrowed)["type"], "auth.ok");
    assert!(error_of(&submit(&mut ws, "echo")).1.contains("functions"), "a claim narrows, never widens");
}

#[test]
fn past_exp_new_work_is_unauthorized_but_a_running_job_still_completes() {
    let g = Gearmand::start();
    let keys = KeyFile::new(KEY);
    let args = ["--client-token-key-file", keys.path(), "--token-leeway-s", "0", "--allow-function", "slow"];
    let s = Server::start_bare(&g.addr(), &args);
    let mut worker = RawWorker::connect(&g.addr(), "slow");
    let mut ws = connect(&s.url());
    assert_eq!(auth(&mut ws, &token("brief", 2))["type"], "auth.ok");
    send(&mut ws, &json!({"type": "submit", "function": "slow", "payload": "p"}).to_string());
    let job = worker.must_grab(LIMIT);
    assert_eq!(recv_json(&mut ws)["type"], "job.created");
    let deadline = Instant::now() + LIMIT;
    loop {
        send(&mut ws, r#"{"type":"ping"}"#);
        let reply = recv(&mut ws);
        if reply.contains("token expired") {
            break;
        }
        assert!(Instant::now() < deadline, "the token never expired: {reply}");
        std::thread::sleep(Duration::from_millis(300));
    }
    worker.complete(&job.handle, b"done");
    loop {
        let reply = recv_json(&mut ws);
        if reply["type"] == "job.complete" {
            assert_eq!(reply["result"], "done");
            break;
        }
    }
}

#[test]
fn over_the_job_rate_is_rate_limited_with_retry_after_and_the_connection_stays() {
    let g = Gearmand::start();
    let s = Server::start_bare(&g.addr(), &["--max-jobs-per-second", "1", "--jobs-burst", "2"]);
    let mut ws = connect(&s.url());
    for _ in 0..2 {
        send(&mut ws, r#"{"type":"ping"}"#);
        assert_eq!(recv(&mut ws), "before the 'received' message");
    }
    send(&mut ws, r#"{"type":"ping","ref":"third"}"#);
    let reply = recv_json(&mut ws);
    assert_eq!(error_of(&reply).0, "rate_limited");
    let retry = reply["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 0 && retry <= 1000, "{reply}");
    assert_eq!(reply["ref"], "third");
    std::thread::sleep(Duration::from_millis(retry + 50));
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message", "the same connection, later");
    assert_eq!(s.metric("gearsock_access_refused_total{what=\"rate_limited\"}"), 1.0);
}

/// An upgrade from source address `from`; returns the status code and the open socket.
fn upgrade_from(from: &str, to: SocketAddr) -> (u16, TcpStream) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().expect("address");
    socket.bind(&local.into()).expect("bind the source address");
    socket.connect_timeout(&to.into(), LIMIT).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(LIMIT)).expect("timeout");
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(request.as_bytes()).expect("send the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, stream)
}

#[test]
fn one_upgrade_over_the_per_address_cap_gets_429() {
    let g = Gearmand::start();
    let s = Server::start_bare(&g.addr(), &["--max-connections-per-ip", "2"]);
    let (first, second) = (upgrade_from("127.0.0.2", s.addr), upgrade_from("127.0.0.2", s.addr));
    assert_eq!((first.0, second.0), (101, 101));
    let (third, _) = upgrade_from("127.0.0.2", s.addr);
    assert_eq!(third, 429);
    assert_eq!(upgrade_from("127.0.0.3", s.addr).0, 101, "another address has its own count");
    drop(first);
    wait_for("the closed connection's slot", LIMIT, || upgrade_from("127.0.0.2", s.addr).0 == 101);
    assert!(s.metric("gearsock_access_refused_total{what=\"per_ip\"}") >= 1.0);
}

#[test]
fn the_next_connection_of_a_subject_over_its_cap_is_refused_and_closed() {
    let g = Gearmand::start();
    let keys = KeyFile::new(KEY);
    let s = Server::start_bare(
        &g.addr(),
        &["--client-token-key-file", keys.path(), "--max-connections-per-subject", "1"],
    );
    let mut first = connect(&s.url());
    assert_eq!(auth(&mut first, &token("carol", 60))["type"], "auth.ok");
    let mut second = connect(&s.url());
    let reply = auth(&mut second, &token("carol", 60));
    assert_eq!(error_of(&reply), ("unauthorized", "too many connections for this subject"));
    assert_eq!(close_code(&mut second), Some(CloseCode::Policy));
    let mut dave = connect(&s.url());
    assert_eq!(auth(&mut dave, &token("dave", 60))["type"], "auth.ok", "another subject is not counted");
    let _ = first.close(None);
    let _ = close_code(&mut first);
    wait_for("carol's slot", LIMIT, || {
        let mut again = connect(&s.url());
        auth(&mut again, &token("carol", 60))["type"] == "auth.ok"
    });
}

#[test]
fn a_missing_or_short_key_file_refuses_to_start_naming_the_flag() {
    let short = KeyFile::new("too-short\n");
    for path in [short.path(), "/nonexistent/keys"] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--client-token-key-file", path])
            .output()
            .expect("run gearsock");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--client-token-key-file"), "{stderr}");
    }
}
