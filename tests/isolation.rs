//! Issue 8 as a user checks it: one client, one worker or one stuck gearmand reaches no one
//! else. Real gearmand processes (a stuck one is SIGSTOPped), the real `gearsock` binary, and
//! raw Gearman workers that misbehave on purpose (`common::RawWorker`).
//!
//! The heavy tests (tens of MB, or latency measured under load) take `HEAVY` so that they do
//! not share the two cores with each other.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

const TERMINAL: [&str; 4] = ["job.complete", "job.failed", "job.exception", "job.lost"];

fn submit(ws: &mut Ws, fields: Value) {
    let mut msg = json!({"type": "submit"});
    for (k, v) in fields.as_object().unwrap() {
        msg[k] = v.clone();
    }
    send(ws, &msg.to_string());
}

/// A job's terminal reply, or an error about a submission (which carries its `ref`).
fn is_terminal(v: &Value) -> bool {
    let t = v["type"].as_str().unwrap_or("");
    TERMINAL.contains(&t) || (t == "error" && !v["ref"].is_null())
}

/// Reads replies until a terminal one; returns them all.
fn until_terminal(ws: &mut Ws) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = recv_json(ws);
        let done = is_terminal(&v);
        got.push(v);
        if done {
            return got;
        }
    }
}

/// Submits and returns the `job.created` reply.
fn submit_created(ws: &mut Ws, fields: Value) -> Value {
    submit(ws, fields);
    let created = recv_json(ws);
    assert_eq!(created["type"], "job.created", "{created}");
    created
}

/// Sends `worker.complete` with `fields` and returns the reply's text.
fn report(ws: &mut Ws, fields: Value) -> String {
    let mut msg = json!({"type": "worker.complete"});
    for (k, v) in fields.as_object().unwrap() {
        msg[k] = v.clone();
    }
    send(ws, &msg.to_string());
    recv(ws)
}

/// The reply parsed as an `error`, panicking with the reply otherwise.
fn error_reply(reply: &str) -> Value {
    let v: Value = serde_json::from_str(reply).unwrap_or_else(|_| panic!("expected an error, got {reply:?}"));
    assert_eq!(v["type"], "error", "{reply}");
    v
}

/// A server over several gearmands, once every link is up.
fn server_over(gearmands: &[&Gearmand], extra: &[&str]) -> Server {
    let addrs: Vec<String> = gearmands.iter().map(|g| g.addr()).collect();
    let mut args: Vec<&str> = Vec::new();
    for a in &addrs[1..] {
        args.extend(["--gearmand", a]);
    }
    args.extend_from_slice(extra);
    let s = Server::start(&addrs[0], &args);
    wait_for("every gearmand link up", Duration::from_secs(10), || {
        let (_, body) = s.http("GET", "/healthz");
        body.matches("\"connected\"").count() == gearmands.len()
    });
    s
}

/// A background job of `client`'s, held by `worker` (grabbed, not finished).
fn held_background_job(client: &mut Ws, worker: &mut RawWorker, function: &str, payload: &str) -> Grabbed {
    submit_created(client, json!({"function": function, "payload": payload, "mode": "background"}));
    worker.must_grab(Duration::from_secs(5))
}

// ---------------------------------------------------------------------------------------------
// 1. Who may report a result
// ---------------------------------------------------------------------------------------------

/// A page from another site, `Origin: null` and clients behind a reverse proxy all arrive from
/// loopback; none of them may report a result. Each is told `forbidden`, with its `ref`.
#[test]
fn foreign_pages_and_proxied_clients_cannot_report_results() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let mut w = RawWorker::connect(&g.addr(), "trust-refused");
    let mut victim = connect(&s.url());
    let job = held_background_job(&mut victim, &mut w, "trust-refused", "victim");
    let untrusted: [&[(&str, &str)]; 6] = [
        &[("Origin", "http://evil.example")],
        &[("Origin", "null")],
        &[("Origin", "http://localhost.evil.example")],
        &[("X-Forwarded-For", "203.0.113.7")],
        &[("Forwarded", "for=203.0.113.7;proto=http")],
        &[("X-Real-IP", "203.0.113.7")],
    ];
    for headers in untrusted {
        let mut ws = connect_with(&s.url(), headers);
        let reply =
            report(&mut ws, json!({"id": job.handle, "unique": job.unique, "value": "pwned", "ref": "r1"}));
        let e = error_reply(&reply);
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_str()),
            (Some("forbidden"), Some("r1")),
            "{headers:?}: {e}"
        );
        assert!(e["message"].as_str().unwrap_or("").contains("token"), "says how to allow it: {e}");
    }
    // The victim's job ends without any of those values.
    w.complete(&job.handle, b"");
    let last = until_terminal(&mut victim).pop().unwrap();
    assert_eq!(last["type"], "job.complete");
    assert_ne!(last["result"], "pwned", "{last}");
}

/// A no-Origin loopback worker and the demo page's own console (Origin = `http://` + Host) are
/// taken without a token; with `--worker-token`, exactly the reports carrying it are taken,
/// from behind a proxy or another origin too.
#[test]
fn loopback_workers_the_demo_page_and_token_holders_are_trusted() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let f = "trust-taken";
    let mut w = RawWorker::connect(&g.addr(), f);
    let mut client = connect(&s.url());
    let own_page = format!("http://{}", s.addr);
    let trusted: [&[(&str, &str)]; 2] = [&[], &[("Origin", &own_page)]];
    for (i, headers) in trusted.into_iter().enumerate() {
        let job = held_background_job(&mut client, &mut w, f, "p");
        let mut ws = connect_with(&s.url(), headers);
        let value = format!("value {i}");
        assert_eq!(
            report(&mut ws, json!({"id": job.handle, "unique": job.unique, "value": value})),
            "got it!"
        );
        w.complete(&job.handle, b"");
        assert_eq!(until_terminal(&mut client).pop().unwrap()["result"], value.as_str(), "{headers:?}");
    }

    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20", "--worker-token", "s3cret"]);
    s.wait_healthy();
    let mut client = connect(&s.url());
    let job = held_background_job(&mut client, &mut w, f, "p");
    let (id, unique) = (job.handle.as_str(), job.unique.as_str());
    let mut plain = connect(&s.url());
    for token in [None, Some("wrong"), Some("s3cret-and-more")] {
        let reply = report(&mut plain, json!({"id": id, "unique": unique, "value": "no", "token": token}));
        assert_eq!(error_reply(&reply)["code"], "forbidden", "token {token:?}");
    }
    let mut proxied =
        connect_with(&s.url(), &[("Origin", "http://app.example"), ("X-Forwarded-For", "198.51.100.2")]);
    let reply = report(&mut proxied, json!({"id": id, "unique": unique, "value": "tok", "token": "s3cret"}));
    assert_eq!(reply, "got it!");
    w.complete(id, b"");
    assert_eq!(until_terminal(&mut client).pop().unwrap()["result"], "tok");
}

// ---------------------------------------------------------------------------------------------
// 2. Which job a report reaches
// ---------------------------------------------------------------------------------------------

/// Two gearmands both hand out `H:host:1`. An id-only report for it cannot tell the jobs apart:
/// it reaches neither and the reporter hears `ambiguous_job`. Reports naming the `unique` the
/// worker saw reach exactly their own job.
#[test]
fn an_id_only_report_for_a_handle_two_gearmands_share_reaches_neither() {
    let (g1, g2) = (Gearmand::start(), Gearmand::start());
    let s = server_over(&[&g1, &g2], &["--poll-interval-ms", "20"]);
    let f = "shared-handle";
    let (mut w1, mut w2) = (RawWorker::connect(&g1.addr(), f), RawWorker::connect(&g2.addr(), f));
    let (mut a, mut b) = (connect(&s.url()), connect(&s.url()));
    let created_a = submit_created(&mut a, json!({"function": f, "payload": "A", "mode": "background"}));
    let created_b = submit_created(&mut b, json!({"function": f, "payload": "B", "mode": "background"}));
    assert_eq!(created_a["job"], created_b["job"], "precondition: both gearmands gave out the same handle");
    let jobs = [w1.must_grab(Duration::from_secs(5)), w2.must_grab(Duration::from_secs(5))];

    let mut reporter = connect(&s.url());
    let handle = jobs[0].handle.as_str();
    let reply = report(&mut reporter, json!({"id": handle, "value": "for whom?", "ref": "amb"}));
    let e = error_reply(&reply);
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("ambiguous_job"), Some("amb")), "{e}");

    assert!(!jobs[0].unique.is_empty() && jobs[0].unique != jobs[1].unique, "{jobs:?}");
    for j in &jobs {
        let value = format!("for {}", String::from_utf8_lossy(&j.payload));
        assert_eq!(
            report(&mut reporter, json!({"id": j.handle, "unique": j.unique, "value": value})),
            "got it!"
        );
    }
    w1.complete(&jobs[0].handle, b"");
    w2.complete(&jobs[1].handle, b"");
    assert_eq!(until_terminal(&mut a).pop().unwrap()["result"], "for A");
    assert_eq!(until_terminal(&mut b).pop().unwrap()["result"], "for B");
}

/// gearmand restarts and hands out the old handle again. A late report from the old job's
/// worker, naming its own unique, does not answer for the new job with that handle.
#[test]
fn a_late_report_for_a_restarted_gearmands_handle_reaches_no_new_job() {
    let mut g = Gearmand::start();
    let port = g.port;
    let s = Server::start(
        &g.addr(),
        &["--reconnect-min-ms", "50", "--reconnect-max-ms", "200", "--poll-interval-ms", "20"],
    );
    s.wait_healthy();
    let f = "restarted";
    let mut ws = connect(&s.url());
    let mut w = RawWorker::connect(&g.addr(), f);
    let old = held_background_job(&mut ws, &mut w, f, "old");
    drop(w);
    g.kill();
    assert_eq!(until_terminal(&mut ws).pop().unwrap()["type"], "job.lost");

    let g2 = Gearmand::start_on(port);
    s.wait_healthy();
    let mut w2 = RawWorker::connect(&g2.addr(), f);
    let new = held_background_job(&mut ws, &mut w2, f, "new");
    assert_eq!(new.handle, old.handle, "precondition: the restarted gearmand reuses the handle");
    let mut reporter = connect(&s.url());
    let _ = report(&mut reporter, json!({"id": old.handle, "unique": old.unique, "value": "stale"}));
    w2.complete(&new.handle, b"");
    let last = until_terminal(&mut ws).pop().unwrap();
    assert_eq!(last["type"], "job.complete");
    assert_ne!(last["result"], "stale", "the old job's value reached the new job: {last}");
}

/// The article's flow with its id-only PHP worker and one gearmand keeps working: the ping's
/// job carries a random unique that the worker sees, and the id-only report is delivered.
#[test]
fn the_article_ping_flow_works_with_an_id_only_report() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let mut w = RawWorker::connect(&g.addr(), "ping");
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    let job = w.must_grab(Duration::from_secs(5));
    assert_eq!(job.payload, b"noop");
    assert!(job.unique.len() >= 12, "a ping carries a random unique (96 bits or more): {:?}", job.unique);
    let mut worker_ws = connect(&s.url());
    assert_eq!(report(&mut worker_ws, json!({"id": job.handle, "value": "done"})), "got it!");
    w.complete(&job.handle, b"");
    assert_eq!(recv(&mut ws), format!("job: {}", job.handle));
    assert_eq!(recv(&mut ws), "value: done");
}

/// Client B submits with client A's `unique`: each still gets its own job and its own result
/// (gearmand would otherwise coalesce them and hand B A's result).
#[test]
fn two_clients_with_the_same_unique_each_get_their_own_result() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let f = "invoice";
    let mut w = RawWorker::connect(&g.addr(), f);
    let (mut a, mut b) = (connect(&s.url()), connect(&s.url()));
    submit_created(&mut a, json!({"function": f, "payload": "from:A-secret", "unique": "invoice-42"}));
    submit_created(&mut b, json!({"function": f, "payload": "from:B", "unique": "invoice-42"}));
    let first = w.must_grab(Duration::from_secs(5));
    let second = w.grab(Duration::from_secs(2)).expect("two jobs: B's submission was coalesced into A's");
    assert_ne!(first.unique, second.unique);
    for j in [&first, &second] {
        w.complete(&j.handle, &j.payload);
    }
    assert_eq!(until_terminal(&mut a).pop().unwrap()["result"], "from:A-secret");
    assert_eq!(until_terminal(&mut b).pop().unwrap()["result"], "from:B", "B must not see A's result");
}

/// `--shared-uniques`: the deployment opts into Gearman's coalescing across clients.
#[test]
fn shared_uniques_restores_gearmands_coalescing() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--shared-uniques"]);
    s.wait_healthy();
    let f = "invoice-shared";
    let mut w = RawWorker::connect(&g.addr(), f);
    let (mut a, mut b) = (connect(&s.url()), connect(&s.url()));
    submit_created(&mut a, json!({"function": f, "payload": "from:A", "unique": "invoice-42"}));
    submit_created(&mut b, json!({"function": f, "payload": "from:B", "unique": "invoice-42"}));
    let job = w.must_grab(Duration::from_secs(5));
    assert_eq!(job.unique, "invoice-42", "passed through unchanged");
    assert!(w.grab(Duration::from_millis(500)).is_none(), "one job for both clients");
    w.complete(&job.handle, b"shared result");
    assert_eq!(until_terminal(&mut a).pop().unwrap()["result"], "shared result");
    assert_eq!(until_terminal(&mut b).pop().unwrap()["result"], "shared result");
}

// ---------------------------------------------------------------------------------------------
// 3. A stuck gearmand stalls nothing but itself
// ---------------------------------------------------------------------------------------------

/// A gearmand that accepts TCP connections but never answers (stopped) is not reported up.
#[test]
fn a_gearmand_that_accepts_but_never_answers_is_not_up() {
    let mut g = Gearmand::start();
    g.stop();
    let s = Server::start(&g.addr(), &["--reconnect-min-ms", "50", "--reconnect-max-ms", "200"]);
    std::thread::sleep(Duration::from_millis(1000));
    let (status, body) = s.http("GET", "/healthz");
    assert_eq!(status, 503, "a link is up only once gearmand answered: {body}");
    g.cont();
    s.wait_healthy();
}

/// A gearmand stopped while it holds a stream and a background job is declared dead within
/// about `--gearmand-timeout-ms`; each job ends exactly once, then the link comes back.
#[test]
fn a_silent_gearmand_is_declared_dead_and_its_jobs_end_once() {
    let mut g = Gearmand::start();
    let s = Server::start(
        &g.addr(),
        &[
            "--gearmand-timeout-ms",
            "1500",
            "--poll-interval-ms",
            "50",
            "--reconnect-min-ms",
            "50",
            "--reconnect-max-ms",
            "200",
        ],
    );
    s.wait_healthy();
    let mut ws = connect(&s.url());
    let f = "nobody-serves-silent";
    submit_created(&mut ws, json!({"function": f, "ref": "stream"}));
    submit_created(&mut ws, json!({"function": f, "mode": "background", "ref": "bg"}));
    g.stop();
    let stopped = Instant::now();
    set_read_timeout(&ws, Duration::from_secs(8));
    let mut ends = [until_terminal(&mut ws).pop().unwrap(), until_terminal(&mut ws).pop().unwrap()];
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(6), "declared dead after {took:?}");
    ends.sort_by_key(|v| v["ref"].as_str().map(String::from));
    let got: Vec<_> = ends.iter().map(|v| (v["ref"].as_str(), v["type"].as_str())).collect();
    assert_eq!(got, [(Some("bg"), Some("job.lost")), (Some("stream"), Some("job.failed"))]);
    set_read_timeout(&ws, Duration::from_millis(500));
    assert!(ws.read().is_err(), "nothing more about those jobs");
    g.cont();
    s.wait_healthy();
}

/// What one client thread saw in the stall scenario.
#[derive(Default)]
struct Outcome {
    created: usize,
    completed: usize,
    terminal: usize,
    problems: Vec<String>,
}

/// Sends `jobs` stream submissions of `payload_bytes` each, then reads until each has its
/// terminal reply, up to `deadline`, then listens a little longer for duplicates.
fn stall_client(url: &str, function: &str, jobs: usize, payload_bytes: usize, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut ws = match try_connect_with(url, &[], Duration::from_secs(5)) {
        Ok(ws) => ws,
        Err(e) => {
            out.problems.push(format!("connect: {e}"));
            return out;
        }
    };
    let payload = "x".repeat(payload_bytes);
    for i in 0..jobs {
        let msg = json!({"type": "submit", "function": function, "payload": payload, "ref": i});
        if let Err(e) = ws.send(Message::text(msg.to_string())) {
            out.problems.push(format!("send {i}: {e}"));
            return out;
        }
    }
    let mut ended = vec![0u32; jobs];
    let mut created = vec![false; jobs];
    let mut quiet_until = None;
    loop {
        let now = Instant::now();
        let until = quiet_until.unwrap_or(deadline);
        if now >= until {
            break;
        }
        set_read_timeout(&ws, until - now);
        let v: Value = match ws.read() {
            Ok(Message::Text(t)) => serde_json::from_str(&t).unwrap_or(Value::Null),
            Ok(_) => continue,
            Err(e) => {
                if quiet_until.is_none() {
                    out.problems.push(format!("read after {} terminal replies: {e}", out.terminal));
                }
                break;
            }
        };
        let Some(r) = v["ref"].as_u64().map(|r| r as usize).filter(|&r| r < jobs) else { continue };
        if v["type"] == "job.created" {
            created[r] = true;
        }
        if is_terminal(&v) {
            ended[r] += 1;
            out.terminal += 1;
            if v["type"] == "job.complete" {
                out.completed += 1;
            } else if created[r] {
                out.problems.push(format!("job {r} was created on the healthy gearmand but ended {v}"));
            }
            if ended[r] > 1 {
                out.problems.push(format!("job {r} got a second terminal reply: {v}"));
            }
            if out.terminal == jobs && quiet_until.is_none() {
                quiet_until = Some(Instant::now() + Duration::from_millis(300));
            }
        }
    }
    out.created = created.iter().filter(|&&c| c).count();
    if out.terminal < jobs {
        out.problems.push(format!("only {} of {jobs} jobs had a terminal reply in time", out.terminal));
    }
    out
}

/// The issue's acceptance scenario: two gearmands, one SIGSTOPped while 8 clients each have 64
/// stream jobs of 60 KB in flight (about half routed to the stopped one). Meanwhile reports on
/// another connection are answered within 1 s, new handshakes succeed, /healthz answers 200 and
/// shows the stuck gearmand; every job has a terminal reply within 20 s, and the jobs gearmand
/// accepted on the healthy server complete.
#[test]
fn one_stopped_gearmand_of_two_stalls_nothing_but_itself() {
    let _heavy = heavy();
    let (g1, mut g2) = (Gearmand::start(), Gearmand::start());
    let s = server_over(&[&g1, &g2], &[]);
    let f = "sixty-k";
    let stop = Arc::new(AtomicBool::new(false));
    let served = {
        let (addr, stop) = (g1.addr(), stop.clone());
        std::thread::spawn(move || {
            let mut w = RawWorker::connect(&addr, f);
            while !stop.load(Ordering::Relaxed) {
                if let Some(j) = w.grab(Duration::from_millis(200)) {
                    w.complete(&j.handle, b"ok");
                }
            }
        })
    };
    let mut reporter = connect(&s.url());
    let g2_addr = g2.addr();
    g2.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = s.url();
            std::thread::spawn(move || stall_client(&url, f, 64, 60_000, deadline))
        })
        .collect();

    let (mut worst_round_trip, mut problems, mut g2_states) = (Duration::ZERO, Vec::new(), Vec::new());
    let mut last_side_checks = Instant::now() - Duration::from_secs(1);
    set_read_timeout(&reporter, Duration::from_secs(3));
    while !clients.iter().all(|c| c.is_finished()) {
        let sent = Instant::now();
        let msg = json!({"type": "worker.complete", "id": "H:nowhere:1", "unique": "nowhere", "value": "x"});
        reporter.send(Message::text(msg.to_string())).expect("reporter send");
        match reporter.read() {
            Ok(_) => worst_round_trip = worst_round_trip.max(sent.elapsed()),
            Err(e) => panic!("a report on another connection got no answer within 3 s: {e}"),
        }
        if last_side_checks.elapsed() >= Duration::from_millis(500) {
            last_side_checks = Instant::now();
            if let Err(e) = try_connect_with(&s.url(), &[], Duration::from_secs(2)) {
                problems.push(format!("new handshake failed: {e}"));
            }
            match http_raw(s.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(2)) {
                Ok(text) if text.starts_with("HTTP/1.1 200") => {
                    let body: Value = text
                        .split_once("\r\n\r\n")
                        .and_then(|(_, b)| serde_json::from_str(b).ok())
                        .unwrap_or_default();
                    let links = body["gearmand"].as_array().cloned().unwrap_or_default();
                    let stuck = links.iter().find(|l| l["server"] == g2_addr.as_str());
                    g2_states.push(
                        stuck.map_or("?".to_string(), |l| l["state"].as_str().unwrap_or("?").to_string()),
                    );
                }
                Ok(text) => problems.push(format!("/healthz: {}", text.lines().next().unwrap_or(""))),
                Err(e) => problems.push(format!("/healthz: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes: Vec<Outcome> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    served.join().unwrap();
    g2.cont();

    assert!(worst_round_trip < Duration::from_secs(1), "worst report round trip {worst_round_trip:?}");
    assert!(problems.is_empty(), "{problems:#?}");
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.problems.is_empty(), "client {i}: {:#?}", o.problems);
    }
    let completed: usize = outcomes.iter().map(|o| o.completed).sum();
    let created: usize = outcomes.iter().map(|o| o.created).sum();
    assert!(completed > 0 && completed >= created, "completed {completed}, created {created}");
    let shown = ["stalled", "disconnected", "connecting"];
    assert!(
        g2_states.iter().any(|st| shown.contains(&st.as_str())),
        "/healthz never showed the stuck gearmand: {g2_states:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. One job's problem stays that job's
// ---------------------------------------------------------------------------------------------

/// A 17 MB result (over the default 16 MiB `--max-job-bytes`) fails its own job, saying why;
/// another client's job on the same gearmand completes, and the link never drops.
#[test]
fn a_17_mb_result_fails_its_own_job_only() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let f = "big-result";
    let mut w = RawWorker::connect(&g.addr(), f);
    let (mut big, mut small) = (connect(&s.url()), connect(&s.url()));
    submit_created(&mut big, json!({"function": f, "payload": "big"}));
    submit_created(&mut small, json!({"function": f, "payload": "small"}));
    let mut jobs = [w.must_grab(Duration::from_secs(5)), w.must_grab(Duration::from_secs(5))];
    jobs.sort_by_key(|j| j.payload.clone());
    let [big_job, small_job] = jobs;
    w.complete(&big_job.handle, &vec![b'r'; 17_000_000]);
    w.complete(&small_job.handle, b"small result");

    let last = until_terminal(&mut small).pop().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["result"].as_str()),
        (Some("job.complete"), Some("small result")),
        "{last}"
    );
    let last = until_terminal(&mut big).pop().unwrap();
    assert_eq!(last["type"], "job.failed", "{last}");
    let reason = last["reason"].as_str().unwrap_or("").to_lowercase();
    assert!(["size", "bytes", "large", "limit"].iter().any(|w| reason.contains(w)), "reason: {reason}");
    assert_eq!(s.metric("gearsock_gearmand_connects_total"), 1.0, "the gearmand link stayed up");
}

// ---------------------------------------------------------------------------------------------
// 5. Bursts and slow readers
// ---------------------------------------------------------------------------------------------

/// Reads a stream job's replies until its terminal one; returns the data bytes and that reply.
/// Panics if the connection ends first.
fn read_stream(ws: &mut Ws) -> (usize, Value) {
    let mut bytes = 0;
    loop {
        let v = match ws.read() {
            Ok(Message::Text(t)) => serde_json::from_str::<Value>(&t).unwrap(),
            Ok(Message::Close(frame)) => panic!("closed after {bytes} bytes: {frame:?}"),
            Ok(_) => continue,
            Err(e) => panic!("dropped after {bytes} bytes: {e}"),
        };
        if v["type"] == "job.data" {
            bytes += v["data"].as_str().map_or(0, str::len);
        } else if is_terminal(&v) {
            return (bytes, v);
        }
    }
}

/// A job whose worker (on another thread) sends its data with `send`, then completes.
fn streamed_job(
    s: &Server,
    g: &Gearmand,
    f: &str,
    send: fn(&mut RawWorker, &str),
) -> (Ws, std::thread::JoinHandle<()>) {
    let mut w = RawWorker::connect(&g.addr(), f);
    let mut ws = connect(&s.url());
    submit_created(&mut ws, json!({"function": f}));
    let job = w.must_grab(Duration::from_secs(5));
    let worker = std::thread::spawn(move || {
        send(&mut w, &job.handle);
        w.complete(&job.handle, b"end");
    });
    (ws, worker)
}

/// 16 MiB of WORK_DATA in 60 KiB packets, as fast as gearmand forwards it, reaches a client
/// that keeps reading, whole.
#[test]
fn a_reading_client_receives_a_16_mb_burst_whole() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let (mut ws, worker) = streamed_job(&s, &g, "burst", |w, h| w.burst(h, 16 << 20, 60 << 10));
    let (bytes, last) = read_stream(&mut ws);
    worker.join().unwrap();
    assert_eq!((bytes, last["type"].as_str()), (16 << 20, Some("job.complete")));
}

/// 40 MB of WORK_DATA paced at 20 MB/s reaches a client that keeps reading, whole.
#[test]
fn a_reading_client_receives_a_40_mb_stream_at_20_mb_per_s_whole() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let (mut ws, worker) = streamed_job(&s, &g, "paced", |w, h| w.paced(h, 40_000_000, 60_000, 20e6));
    let (bytes, last) = read_stream(&mut ws);
    worker.join().unwrap();
    assert_eq!((bytes, last["type"].as_str()), (40_000_000, Some("job.complete")));
}

/// A client that never reads while 64 MiB stream at it is dropped (close 1008 when it can still
/// be sent) and counted in /metrics; the server's memory stays bounded.
#[test]
fn a_client_that_never_reads_is_dropped_and_counted() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let (mut ws, worker) = streamed_job(&s, &g, "flood", |w, h| w.burst(h, 64 << 20, 60 << 10));
    worker.join().unwrap();
    wait_for("a slow reader dropped", Duration::from_secs(20), || {
        s.metric("gearsock_slow_readers_dropped_total") >= 1.0
    });
    // What is left in the socket ends with a 1008 close, or with nothing if it could not be sent.
    set_read_timeout(&ws, Duration::from_secs(5));
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
                break;
            }
            Ok(Message::Text(t)) => assert!(!t.contains("job.complete"), "it was not dropped"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Abandoned stream jobs are bounded
// ---------------------------------------------------------------------------------------------

/// 170 clients each submit 64 stream jobs to a function nobody serves, then leave. A worker
/// that registers afterwards is handed at most 2 × `--max-orphans` (default 1024) of them.
#[test]
fn abandoned_stream_jobs_are_bounded_by_max_orphans() {
    let _heavy = heavy();
    let g = Gearmand::start();
    // Abandoned when their client leaves, with no grace for an attach (tests/resume.rs).
    let s = Server::start(&g.addr(), &["--detach-grace-ms", "0"]);
    s.wait_healthy();
    let f = "orphans-nobody-serves";
    for _ in 0..170 {
        let mut ws = connect(&s.url());
        for i in 0..64 {
            submit(&mut ws, json!({"function": f, "payload": "p", "ref": i}));
        }
        for _ in 0..64 {
            let v = recv_json(&mut ws);
            assert_eq!(v["type"], "job.created", "{v}");
        }
    }
    wait_for("abandoned jobs forgotten", Duration::from_secs(10), || {
        s.metric("gearsock_jobs_in_flight") == 0.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut w = RawWorker::connect(&g.addr(), f);
    let (start, mut handed) = (Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(10) && w.grab(Duration::from_millis(2500)).is_some() {
        handed += 1;
    }
    assert!(handed <= 2048, "a late worker was handed {handed} abandoned jobs");
}

// ---------------------------------------------------------------------------------------------
// 7. The smaller ones
// ---------------------------------------------------------------------------------------------

/// On `--listen [::]:0` a worker on 127.0.0.1 (seen as `::ffff:127.0.0.1`) is a loopback peer,
/// and on `[::1]:0` so is a worker on ::1.
#[test]
fn a_v4_mapped_loopback_worker_is_trusted_on_an_ipv6_listener() {
    let g = Gearmand::start();
    let f = "dual-stack";
    let mut w = RawWorker::connect(&g.addr(), f);
    for (listen, host) in [("[::]:0", "127.0.0.1"), ("[::1]:0", "[::1]")] {
        let s = Server::start(&g.addr(), &["--listen", listen, "--poll-interval-ms", "20"]);
        s.wait_healthy();
        let url = format!("ws://{host}:{}", s.addr.port());
        let mut client = connect_with(&url, &[]);
        let job = held_background_job(&mut client, &mut w, f, "p");
        let mut worker_ws = connect_with(&url, &[]);
        let reply = report(&mut worker_ws, json!({"id": job.handle, "unique": job.unique, "value": "v"}));
        assert_eq!(reply, "got it!", "listening on {listen}, reporting from {host}");
        w.complete(&job.handle, b"");
        assert_eq!(until_terminal(&mut client).pop().unwrap()["result"], "v");
    }
}

/// A connection limit that would wrap around when the reserve is added is refused at startup.
#[test]
fn a_max_connections_that_would_wrap_is_refused_at_startup() {
    let gearmand = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--gearmand", &gearmand])
        .args(["--max-connections", "18446744073709551615"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let status = status.unwrap_or_else(|| panic!("the server started: {stdout}"));
    assert!(!status.success(), "{status}: {stdout}");
    assert!(stderr.contains("max-connections"), "the error names the flag: {stderr}");
}

/// Errors answering a `worker.complete` carry its `ref`, like every other error.
#[test]
fn worker_complete_errors_carry_the_ref() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    let mut ws = connect(&s.url());
    let e = error_reply(&report(&mut ws, json!({"value": "x", "ref": "no-id"})));
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("bad_request"), Some("no-id")), "{e}");
    let e = error_reply(&report(&mut ws, json!({"id": "H:x:1", "ref": 7})));
    assert_eq!((e["code"].as_str(), e["ref"].as_i64()), (Some("bad_request"), Some(7)), "{e}");
}

/// An upgrade asking for WebSocket version 8 gets 426 and is told which version to use.
#[test]
fn an_upgrade_for_version_8_gets_426_naming_version_13() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let text = http_raw(s.addr, request, Duration::from_secs(5)).expect("an answer");
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    let lines: Vec<String> = head.lines().map(|l| l.to_ascii_lowercase().replace(' ', "")).collect();
    assert!(lines.iter().any(|l| l == "sec-websocket-version:13"), "{head}");
}
