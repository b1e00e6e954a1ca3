//! Issue 9, items 6 and 8: kills under load, as a user counts them. Every job a client sent
//! ends with exactly one terminal reply, through a gearmand SIGKILLed and restarted under load
//! and through the server's own SIGTERM, which closes clients with 1001 only after every reply
//! it owes them.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

/// Everything a client receives until the server's close frame: the text replies (as JSON)
/// and the close code.
fn replies_until_close(ws: &mut Ws) -> (Vec<Value>, Option<CloseCode>) {
    let mut replies = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                replies.push(serde_json::from_str(&t).unwrap_or_else(|_| json!({ "text": t.as_str() })))
            }
            Ok(Message::Close(frame)) => return (replies, frame.map(|f| f.code)),
            Ok(_) => {}
            Err(e) => panic!("the connection ended without a close frame: {e} (after {replies:?})"),
        }
    }
}

/// SIGTERM while a client has a stream job a worker holds, a background job nobody has taken
/// yet and an article ping: each gets its one terminal reply, with its `ref`, before the close
/// frame (1001); nothing is left unaccounted for.
#[test]
fn sigterm_ends_every_unfinished_job_before_closing_with_1001() {
    let g = Gearmand::start();
    let mut s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let mut worker = RawWorker::connect(&g.addr(), "held");
    let mut ws = connect(&s.url());
    send(&mut ws, &json!({"type": "submit", "function": "held", "ref": "stream"}).to_string());
    assert_eq!(recv_json(&mut ws)["type"], "job.created");
    let grabbed = worker.must_grab(Duration::from_secs(5));
    worker.data(&grabbed.handle, b"half");
    assert_eq!(recv_json(&mut ws)["type"], "job.data");
    let bg = json!({"type": "submit", "function": "nobody-serves-this", "mode": "background", "ref": "bg"});
    send(&mut ws, &bg.to_string());
    assert_eq!(recv_json(&mut ws)["type"], "job.created");
    send(&mut ws, r#"{"type":"ping","ref":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    wait_for("three jobs in flight", Duration::from_secs(5), || s.metric("gearsock_jobs_in_flight") == 3.0);

    s.proc.signal("TERM");
    let (replies, code) = replies_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Away), "{replies:?}");
    let mut ends: Vec<(String, String)> = replies
        .iter()
        .map(|v| {
            (v["ref"].as_str().unwrap_or("?").to_string(), v["type"].as_str().unwrap_or("?").to_string())
        })
        .collect();
    ends.sort();
    let lost = |r: &str| (r.to_string(), "job.lost".to_string());
    assert_eq!(ends, [lost("bg"), lost("ping"), lost("stream")], "{replies:?}");
    assert!(replies.iter().all(|v| v["reason"].as_str().is_some_and(|r| r.contains("shutting down"))));
    drop(ws);
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
