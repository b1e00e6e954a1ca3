//! The article's whole flow and the stream/background protocol, against a real gearmand that
//! each test starts on a free loopback port, the real `gearsock` binary and real workers.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;

/// `gearsock worker` (the article's ping worker) with short pings.
fn ping_worker(g: &Gearmand, report: Option<&Server>, count: u32, interval_ms: u64) -> Proc {
    let (count, interval) = (count.to_string(), interval_ms.to_string());
    let url = report.map(Server::url);
    let mut args = vec!["worker", "--gearmand", &*Box::leak(g.addr().into_boxed_str()), "--count", &count];
    args.extend(["--interval-ms", &interval]);
    match &url {
        Some(url) => args.extend(["--report", url]),
        None => args.push("--no-report"),
    }
    let mut w = Proc::spawn(&args);
    assert_eq!(w.line(), "waiting");
    w
}

/// The library's demo worker (echo, reverse, fail, boom) on a thread.
fn demo_worker(g: &Gearmand) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, flag) = (g.addr(), stop.clone());
    std::thread::spawn(move || gearsock::worker::run_demo_worker(&addr, &flag));
    stop
}

fn submit(ws: &mut Ws, fields: Value) {
    let mut msg = json!({"type": "submit"});
    for (k, v) in fields.as_object().unwrap() {
        msg[k] = v.clone();
    }
    send(ws, &msg.to_string());
}

/// Reads replies until a job's terminal one (or an error about a submission, which carries its
/// `ref`); returns them all.
fn until_terminal(ws: &mut Ws) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = recv_json(ws);
        let t = v["type"].as_str().unwrap_or("").to_string();
        let submit_error = t == "error" && !v["ref"].is_null();
        got.push(v);
        if submit_error || ["job.complete", "job.failed", "job.exception", "job.lost"].contains(&t.as_str()) {
            return got;
        }
    }
}

/// Nothing more arrives within `quiet`.
fn assert_silent(ws: &mut Ws, quiet: Duration) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(quiet)).unwrap();
    }
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
}

#[test]
fn article_worker_with_foreground_client() {
    let g = Gearmand::start();
    let mut w = ping_worker(&g, None, 5, 10);
    let out = Command::new(BIN).args(["submit", "ping", "--gearmand", &g.addr()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    let expected =
        ["sending", "data: ping 1", "data: ping 2", "data: ping 3", "data: ping 4", "data: ping 5"];
    assert_eq!(&lines[..6], expected, "{lines:?}");
    assert_eq!(lines.last().unwrap(), "before the 'received' message");
    let received = w.line();
    assert!(received.starts_with("received: H:"), "{received}");
    for i in 1..=5 {
        assert_eq!(w.line(), format!("ping {i}"));
    }
    assert_eq!(w.line(), "waiting");
}

#[test]
fn article_background_client_polls_until_the_job_is_gone() {
    let g = Gearmand::start();
    let _w = ping_worker(&g, None, 5, 50);
    let out = Command::new(BIN)
        .args(["submit", "ping", "--background", "--poll-interval-ms", "50", "--gearmand", &g.addr()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..2], ["sending", "before the 'received' message"]);
    // The first check comes one interval in, while the 250 ms job still runs; then it polls on.
    assert!(!lines[2..].is_empty() && lines[2..].iter().all(|l| *l == "checking"), "{lines:?}");
}

#[test]
fn article_server_ping_word_for_word() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let mut w = ping_worker(&g, Some(&s), 3, 20);
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    let job = recv(&mut ws);
    let handle = job.strip_prefix("job: ").unwrap_or_else(|| panic!("{job}"));
    assert!(handle.starts_with("H:"), "{job}");
    assert_eq!(recv(&mut ws), "value: done");
    assert_eq!(w.line(), format!("received: {handle}"));
    for i in 1..=3 {
        assert_eq!(w.line(), format!("ping {i}"));
    }
    assert_eq!(w.line(), "response: got it!");
    assert_eq!(w.line(), "waiting");
    assert_eq!(s.metric("gearsock_stored_values"), 0.0, "the delivered value was freed");
    assert_eq!(s.metric("gearsock_jobs_in_flight"), 0.0);
}

#[test]
fn stream_job_sees_data_status_and_completion_as_they_happen() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let _w = ping_worker(&g, None, 3, 20);
    let mut ws = connect(&s.url());
    submit(&mut ws, json!({"function": "ping", "payload": "noop", "ref": "r1", "priority": "high"}));
    let got = until_terminal(&mut ws);
    assert_eq!(got[0]["type"], "job.created");
    let handle = got[0]["job"].clone();
    assert!(got.iter().all(|v| v["job"] == handle && v["ref"] == "r1"), "{got:?}");
    let data: Vec<&str> =
        got.iter().filter(|v| v["type"] == "job.data").filter_map(|v| v["data"].as_str()).collect();
    assert_eq!(data, ["ping 1", "ping 2", "ping 3"]);
    let status: Vec<(u64, u64)> = got
        .iter()
        .filter(|v| v["type"] == "job.status")
        .map(|v| (v["numerator"].as_u64().unwrap(), v["denominator"].as_u64().unwrap()))
        .collect();
    assert_eq!(status, [(1, 3), (2, 3), (3, 3)]);
    assert_eq!(got.last().unwrap()["type"], "job.complete");
    assert_eq!(got.last().unwrap()["result"], "done");
}

#[test]
fn failures_exceptions_binary_payloads_and_background_jobs() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let _stop = demo_worker(&g);
    let mut ws = connect(&s.url());
    submit(&mut ws, json!({"function": "fail"}));
    let got = until_terminal(&mut ws);
    assert_eq!(got.last().unwrap()["type"], "job.failed", "{got:?}");
    submit(&mut ws, json!({"function": "boom"}));
    let got = until_terminal(&mut ws);
    assert_eq!(got.last().unwrap()["type"], "job.exception", "{got:?}");
    assert_eq!(got.last().unwrap()["data"], "boom: something broke");
    submit(&mut ws, json!({"function": "reverse", "payload_b64": "gAFi"})); // 0x80 0x01 'b'
    let got = until_terminal(&mut ws);
    assert_eq!(got.last().unwrap()["result_b64"], "YgGA", "{got:?}");
    submit(&mut ws, json!({"function": "reverse", "payload": "abc", "mode": "background", "ref": 5}));
    let got = until_terminal(&mut ws);
    assert_eq!(got[0]["type"], "job.created");
    let last = got.last().unwrap();
    assert_eq!((last["type"].as_str(), last["ref"].as_i64()), (Some("job.complete"), Some(5)), "{got:?}");
    submit(&mut ws, json!({"function": "reverse", "payload": "abc", "mode": "sideways"}));
    assert_eq!(recv_json(&mut ws)["code"], "bad_request");
}

#[test]
fn two_clients_each_hear_only_about_their_own_jobs() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let _w = ping_worker(&g, None, 4, 30);
    let (mut a, mut b) = (connect(&s.url()), connect(&s.url()));
    submit(&mut a, json!({"function": "ping", "ref": "a"}));
    submit(&mut b, json!({"function": "ping", "ref": "b"}));
    let created_a = recv_json(&mut a);
    let created_b = recv_json(&mut b);
    assert_ne!(created_a["job"], created_b["job"]);
    // b may ask about its own job, not about a's.
    send(&mut b, &json!({"type": "status", "job": created_a["job"]}).to_string());
    send(&mut b, &json!({"type": "status", "job": created_b["job"]}).to_string());
    let got_a = until_terminal(&mut a);
    let got_b = until_terminal(&mut b);
    assert!(got_a.iter().all(|v| v["ref"] == "a" && v["job"] == created_a["job"]), "{got_a:?}");
    assert!(got_b.iter().any(|v| v["code"] == "unknown_job"), "{got_b:?}");
    let asked = got_b.iter().filter(|v| v["type"] == "job.status" && v["known"] == true).count();
    assert!(asked >= 1, "{got_b:?}");
    assert!(got_b.iter().filter(|v| v["type"] != "error").all(|v| v["ref"] == "b"), "{got_b:?}");
}

#[test]
fn a_client_that_leaves_mid_job_leaks_nothing() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let _w = ping_worker(&g, None, 3, 50);
    for mode in ["stream", "background"] {
        let mut ws = connect(&s.url());
        submit(&mut ws, json!({"function": "ping", "mode": mode}));
        assert_eq!(recv_json(&mut ws)["type"], "job.created");
        drop(ws);
    }
    wait_for("jobs to be forgotten", Duration::from_secs(10), || s.metric("gearsock_jobs_in_flight") == 0.0);
    let mut ws = connect(&s.url());
    submit(&mut ws, json!({"function": "ping"}));
    assert_eq!(until_terminal(&mut ws).last().unwrap()["type"], "job.complete");
}

#[test]
fn gearmand_killed_mid_job_then_restarted() {
    let mut g = Gearmand::start();
    let port = g.port;
    let s = Server::start(
        &g.addr(),
        &["--reconnect-min-ms", "50", "--reconnect-max-ms", "200", "--poll-interval-ms", "20"],
    );
    s.wait_healthy();
    let _w = ping_worker(&g, None, 100, 50); // a job that outlives gearmand
    let mut ws = connect(&s.url());
    submit(&mut ws, json!({"function": "ping", "ref": "stream"}));
    assert_eq!(recv_json(&mut ws)["type"], "job.created");
    submit(&mut ws, json!({"function": "ping", "mode": "background", "ref": "bg"}));
    // The stream job's data interleaves; collect until the background job is created.
    let mut seen = Vec::new();
    while !seen.iter().any(|v: &Value| v["type"] == "job.created" && v["ref"] == "bg") {
        seen.push(recv_json(&mut ws));
    }
    g.kill();
    let mut terminal = Vec::new();
    while terminal.len() < 2 {
        let v = recv_json(&mut ws);
        if matches!(v["type"].as_str(), Some("job.failed" | "job.lost" | "job.complete")) {
            terminal.push(v);
        }
    }
    terminal.sort_by_key(|v| v["ref"].as_str().map(String::from));
    assert_eq!((terminal[0]["ref"].as_str(), terminal[0]["type"].as_str()), (Some("bg"), Some("job.lost")));
    assert_eq!(
        (terminal[1]["ref"].as_str(), terminal[1]["type"].as_str()),
        (Some("stream"), Some("job.failed"))
    );
    assert_silent(&mut ws, Duration::from_millis(300));
    assert_eq!(s.http("GET", "/healthz").0, 503);
    // gearmand comes back on the same port: the server reconnects, and new jobs work.
    let g2 = Gearmand::start_on(port);
    s.wait_healthy();
    let _w2 = ping_worker(&g2, None, 2, 10);
    submit(&mut ws, json!({"function": "ping", "ref": "after"}));
    let got = until_terminal(&mut ws);
    assert_eq!(got.last().unwrap()["type"], "job.complete", "{got:?}");
    assert!(s.metric("gearsock_gearmand_connects_total") >= 2.0);
}

#[test]
fn without_gearmand_health_says_so_and_the_queue_is_bounded() {
    let port = free_port();
    let s = Server::start(
        &format!("127.0.0.1:{port}"),
        &[
            "--queue-limit",
            "2",
            "--queue-timeout-ms",
            "3000",
            "--reconnect-min-ms",
            "50",
            "--reconnect-max-ms",
            "100",
        ],
    );
    let (status, body) = s.http("GET", "/healthz");
    assert_eq!(status, 503);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unavailable");
    let mut ws = connect(&s.url());
    for i in 0..3 {
        submit(&mut ws, json!({"function": "reverse", "payload": "abc", "ref": i}));
    }
    let refused = recv_json(&mut ws);
    assert_eq!((refused["code"].as_str(), refused["ref"].as_i64()), (Some("unavailable"), Some(2)));
    // gearmand arrives within the queue timeout: the held jobs go through.
    let g = Gearmand::start_on(port);
    let _stop = demo_worker(&g);
    for _ in 0..2 {
        let got = until_terminal(&mut ws);
        assert_eq!(got.last().unwrap()["result"], "cba", "{got:?}");
    }
    s.wait_healthy();
}

#[test]
fn held_submissions_time_out_as_unavailable() {
    let s = Server::start(&format!("127.0.0.1:{}", free_port()), &["--queue-timeout-ms", "200"]);
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    assert_eq!(recv_json(&mut ws)["code"], "unavailable");
    assert_eq!(s.metric("gearsock_jobs_queued"), 0.0);
}

#[test]
fn interop_with_the_gearman_command_line_tools() {
    let g = Gearmand::start();
    let port = g.port.to_string();
    // The gearman CLI as a client, served by gearsock's worker.
    let _w = ping_worker(&g, None, 3, 10);
    let out = Command::new("gearman")
        .args(["-h", "127.0.0.1", "-p", &port, "-f", "ping", "noop"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ping 1") && text.contains("ping 3"), "{text}");
    // A `gearman -w` worker serving a job submitted through the server.
    let mut rev = std::process::Command::new("gearman")
        .args(["-w", "-h", "127.0.0.1", "-p", &port, "-f", "rev", "--", "rev"])
        .spawn()
        .unwrap();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let mut ws = connect(&s.url());
    submit(&mut ws, json!({"function": "rev", "payload": "gearman\n"}));
    let got = until_terminal(&mut ws);
    let _ = rev.kill();
    let _ = rev.wait();
    assert_eq!(got.last().unwrap()["result"], "namraeg\n", "{got:?}");
}

#[test]
fn several_gearmand_servers_share_the_jobs() {
    let (g1, g2) = (Gearmand::start(), Gearmand::start());
    let s = Server::start(&g1.addr(), &["--gearmand", &g2.addr(), "--poll-interval-ms", "20"]);
    wait_for("both links up", Duration::from_secs(10), || {
        let (_, body) = s.http("GET", "/healthz");
        body.matches("\"connected\"").count() == 2
    });
    let mut w1 = ping_worker(&g1, Some(&s), 1, 10);
    let mut w2 = ping_worker(&g2, Some(&s), 1, 10);
    let mut ws = connect(&s.url());
    for _ in 0..4 {
        send(&mut ws, r#"{"type":"ping"}"#);
    }
    let mut values = 0;
    while values < 4 {
        let line = recv(&mut ws);
        if line.starts_with("value: ") {
            assert_eq!(line, "value: done", "each value is polled and claimed on its own gearmand");
            values += 1;
        }
    }
    let took = |w: &mut Proc| (0..2).filter(|_| w.line().starts_with("received: ")).count() > 0;
    assert!(took(&mut w1) && took(&mut w2), "jobs went to both gearmands");
}
