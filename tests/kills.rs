//! Issue 9, items 6 and 8: kills under load, as a user counts them. Every job a client sent
//! ends with exactly one terminal reply, through a gearmand SIGKILLed and restarted under load
//! and through the server's own SIGTERM, which closes clients with 1001 only after every reply
//! it owes them.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The short version of `scripts/kills.sh`: steady mixed load (stream and background jobs of
/// `gearsock worker`'s ping, article pings, the bench's failing and throwing demo jobs) while
/// gearmand is SIGKILLed and restarted on its port; then, still under load, the bench sends the
/// server SIGTERM. Every job sent got exactly one terminal reply or was never read by the
/// server before its close; no client was dropped by the restart; every client was closed
/// with 1001 after the SIGTERM; and every kind of job worked again after the restart.
#[test]
fn a_gearmand_restart_and_sigterm_under_load_leave_every_job_accounted_for() {
    let mut g = Gearmand::start();
    let port = g.port;
    let mut s = Server::start(&g.addr(), &["--reconnect-min-ms", "50", "--reconnect-max-ms", "300"]);
    s.wait_healthy();
    let gearmand = g.addr();
    let url = s.url();
    let worker_args =
        ["worker", "--gearmand", &gearmand, "--report", &url, "--count", "2", "--interval-ms", "10"];
    let mut worker = Proc::spawn(&[&worker_args[..], &["--concurrency", "3"]].concat());
    assert_eq!(worker.line(), "waiting");
    let pid = s.proc.pid().to_string();
    let mut bench = Command::new(BIN)
        .args(["bench", "mixed", "--url", &url, "--connections", "8", "--in-flight", "2"])
        .args(["--duration-s", "9", "--sigterm-after-s", "7", "--settle-s", "10", "--pid", &pid])
        .args(["--spawn-workers", "1", "--gearmand", &gearmand, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gearsock bench mixed");
    let mut stderr = BufReader::new(bench.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("load started") {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("bench stderr") > 0, "the bench ended before its load");
    }
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    g.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _g2 = Gearmand::start_on(port);
    let restarted_s = load_started.elapsed().as_secs_f64();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut out = String::new();
    bench.stdout.take().expect("stdout").read_to_string(&mut out).expect("bench output");
    let status = bench.wait().expect("bench exit");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let report = serde_json::to_string_pretty(&v).unwrap();

    // The reconcile: one terminal reply per job, or unread at the close.
    assert_eq!(v["verdict"]["ok"], true, "{report}");
    assert_eq!(status.code(), Some(0), "{report}");
    let sent = v["reconcile"]["sent"].as_u64().unwrap();
    let terminal: u64 = v["terminal"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    let unread = v["unread_at_close"].as_u64().unwrap();
    assert!(sent > 0 && terminal + unread == sent, "{report}");
    assert_eq!(v["missing"], json!({}), "{report}");
    assert_eq!(v["anomalies"], json!({}), "{report}");
    // The restart hit jobs in flight, and they ended as lost or failed, not never.
    let details = v["terminal_details"].as_object().unwrap();
    assert!(details.keys().any(|k| k.contains("connection that held this job was lost")), "{report}");
    // No client was dropped by the restart; SIGTERM closed every one with 1001, after it.
    assert_eq!(v["clients"]["established"], 8, "{report}");
    assert_eq!(v["clients"]["closed_by_server"], json!({"1001": 8}), "{report}");
    assert_eq!(v["clients"]["closed_before_sigterm"], 0, "{report}");
    assert_eq!(v["clients"]["dropped"], 0, "{report}");
    // Each kind of job worked again after gearmand came back.
    for kind in ["stream", "background", "ping", "fail", "boom"] {
        let last = v["last_normal_end_s"][kind].as_f64().unwrap_or(-1.0);
        assert!(
            last > restarted_s,
            "no {kind} job ended normally after the restart at {restarted_s:.1} s: {report}"
        );
    }
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0), "gearsock exits cleanly after SIGTERM");
    drop(worker);
}
