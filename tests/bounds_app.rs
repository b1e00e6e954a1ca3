//! Issue 18, the App's side, as a hostile client tries it: the real `gearsock` binary over a
//! real gearmand. A status flood, a `ref` flood, long report names, background churn from one
//! address, and orphans piling up on retired connections each stay within their bound.
//!
//! The heavy tests (RSS measured, or many jobs) take `HEAVY` so that they do not share the two
//! cores with each other.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;

static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// A WebSocket client whose TCP connection comes from `source` (spreads clients over
/// 127.0.0.x, which the server sees as different peers).
fn connect_from(source: &str, server: SocketAddr) -> Ws {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&from.into()).expect("bind the source address");
    sock.connect(&server.into()).expect("connect");
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let (ws, _) =
        tungstenite::client(format!("ws://{server}/"), MaybeTlsStream::Plain(stream)).expect("upgrade");
    ws
}

/// A masked client text frame (mask key 0, so the payload goes as it is).
fn frame(text: &str) -> Vec<u8> {
    client_frame(0x81, text.as_bytes(), [0; 4])
}

/// A stream job submitted by a new client, served by `worker`: how long until `job.complete`.
fn probe(s: &Server, worker: &mut RawWorker) -> Duration {
    let start = Instant::now();
    let mut ws = connect(&s.url());
    send(&mut ws, &json!({"type":"submit","function":"probe","payload":"p"}).to_string());
    let grabbed = worker.must_grab(Duration::from_secs(10));
    worker.complete(&grabbed.handle, b"ok");
    loop {
        let v = recv_json(&mut ws);
        if v["type"] == "job.complete" {
            return start.elapsed();
        }
        assert_eq!(v["type"], "job.created", "{v}");
    }
}

/// One client asks the status of a job nobody serves as fast as it can write, with a
/// 200-byte `ref` on each question, reading (and dropping) what comes back. The server's
/// memory and its gearmand link must not care.
#[test]
fn a_status_flood_is_bounded_and_harms_nobody() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let mut worker = RawWorker::connect(&g.addr(), "probe");
    probe(&s, &mut worker);
    let mut ws = connect(&s.url());
    send(&mut ws, &json!({"type":"submit","function":"nobody-serves","mode":"background"}).to_string());
    let created = recv_json(&mut ws);
    let handle = created["job"].as_str().expect("job.created").to_string();
    let before = rss_kib(s.proc.pid());

    let MaybeTlsStream::Plain(stream) = ws.get_mut() else { panic!("plain TCP") };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream.try_clone().unwrap();
    reader.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                // Timeouts and replies alike: keep draining until told to stop or closed.
                if let Ok(0) = reader.read(&mut buf) {
                    break;
                }
            }
        })
    };
    let question = json!({"type":"status","job":handle,"ref":"r".repeat(200)}).to_string();
    let batch: Vec<u8> = (0..256).flat_map(|_| frame(&question)).collect();
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && writer.write_all(&batch).is_ok() {
                sent += 256;
            }
            sent
        })
    };
    let (start, mut peak, mut probe_time) = (Instant::now(), before, Duration::ZERO);
    while start.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(s.proc.pid()));
        if probe_time.is_zero() && start.elapsed() > Duration::from_secs(2) {
            probe_time = probe(&s, &mut worker);
        }
    }
    let healthy = s.http("GET", "/healthz");
    stop.store(true, Ordering::Relaxed);
    let questions = flooder.join().unwrap();
    drain.join().unwrap();
    let growth_mib = (peak - before) as f64 / 1024.0;
    println!("status flood: {questions} questions written, RSS +{growth_mib:.1} MiB, probe {probe_time:?}");
    assert!(questions > 10_000, "the flood was a flood: {questions}");
    assert!(growth_mib < 64.0, "RSS grew {growth_mib:.1} MiB");
    assert!(probe_time < Duration::from_secs(2), "probe took {probe_time:?}");
    assert_eq!(healthy.0, 200, "the link stayed up: {}", healthy.1);
    assert!(s.metric("gearsock_errors_total{code=\"too_many_jobs\"}") > 0.0);
}

/// 4 clients each send 64 submits whose 64 KB message is mostly `"ref":[0,0,0,…]`: each is
/// refused `bad_request`, and none is kept.
#[test]
fn a_ref_flood_is_refused_and_kept_nowhere() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let before = rss_kib(s.proc.pid());
    let zeros = format!("[{}0]", "0,".repeat(31_000));
    let msg = format!(r#"{{"type":"submit","function":"nobody-serves","ref":{zeros}}}"#);
    let mut clients: Vec<Ws> = (0..4).map(|i| connect_from(&format!("127.0.0.{}", i + 1), s.addr)).collect();
    for ws in &mut clients {
        for _ in 0..64 {
            send(ws, &msg);
        }
    }
    let mut peak = before;
    for ws in &mut clients {
        for _ in 0..64 {
            let v = recv_json(ws);
            assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("bad_request")), "{v}");
            assert!(v["message"].as_str().unwrap().contains("\"ref\""), "{v}");
        }
        peak = peak.max(rss_kib(s.proc.pid()));
    }
    let growth_mib = (peak - before) as f64 / 1024.0;
    println!("ref flood: RSS +{growth_mib:.1} MiB");
    assert!(growth_mib < 32.0, "RSS grew {growth_mib:.1} MiB");
    assert_eq!(s.metric("gearsock_jobs_in_flight"), 0.0);
    // A short string and a number still come back as they went.
    let ws = &mut clients[0];
    send(ws, r#"{"type":"submit","function":"nobody-serves","ref":1.50}"#);
    send(ws, r#"{"type":"submit","function":"nobody-serves","ref":"é\"x"}"#);
    let (a, b) = (recv(ws), recv(ws));
    assert!(a.contains(r#""ref":1.5"#), "{a}");
    assert!(b.contains(r#""ref":"é\"x""#), "{b}");
}

/// A trusted reporter sends ids and uniques longer than gearmand gives out: refused, and
/// nothing is stored.
#[test]
fn long_report_handles_and_uniques_are_refused() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let mut ws = connect(&s.url());
    for report in [
        json!({"type":"worker.complete","id":"H".repeat(60_000),"value":"v"}),
        json!({"type":"worker.complete","id":"H".repeat(65),"value":"v"}),
        json!({"type":"worker.complete","unique":"u".repeat(65),"value":"v"}),
    ] {
        send(&mut ws, &report.to_string());
        let v = recv_json(&mut ws);
        assert_eq!(v["code"], "bad_request", "{v}");
    }
    send(&mut ws, &json!({"type":"worker.complete","id":"H".repeat(64),"value":"v"}).to_string());
    assert_eq!(recv(&mut ws), "got it!", "a 64-byte handle is still taken");
    assert_eq!(s.metric("gearsock_stored_values"), 1.0);
    assert_eq!(s.metric("gearsock_stored_value_bytes"), 1.0 + 2.0 * 64.0, "the keys are counted");
}

/// Replies to `n` background submits: (created, refused too_many_jobs).
fn submit_background(ws: &mut Ws, n: usize) -> (usize, usize) {
    for _ in 0..n {
        send(ws, &json!({"type":"submit","function":"churn","payload":"x","mode":"background"}).to_string());
    }
    let (mut created, mut refused) = (0, 0);
    for _ in 0..n {
        let v = recv_json(ws);
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("job.created"), _) => created += 1,
            (Some("error"), Some("too_many_jobs")) => {
                assert!(v["message"].as_str().unwrap().contains("--max-background-per-peer"), "{v}");
                refused += 1;
            }
            _ => panic!("{v}"),
        }
    }
    (created, refused)
}

/// One address loops "connect, 16 background jobs, leave": it stops at the cap, and each job
/// gearmand finishes (a worker comes) frees a place, though their clients are gone. Another
/// address is not affected.
#[test]
fn background_churn_stops_at_the_per_peer_cap() {
    let _heavy = heavy();
    let g = Gearmand::start();
    // Abandoned when their client leaves, with no grace for an attach (tests/resume.rs).
    let flags = ["--max-background-per-peer", "40", "--poll-interval-ms", "50", "--detach-grace-ms", "0"];
    let s = Server::start(&g.addr(), &flags);
    s.wait_healthy();
    let (mut created, mut refused) = (0, 0);
    for _ in 0..5 {
        let mut ws = connect_from("127.0.0.3", s.addr);
        let (c, r) = submit_background(&mut ws, 16);
        (created, refused) = (created + c, refused + r);
    }
    assert_eq!((created, refused), (40, 40));
    assert_eq!(s.metric("gearsock_jobs_in_flight"), 0.0, "the abandoned jobs belong to no client");
    let mut other = connect_from("127.0.0.4", s.addr);
    assert_eq!(submit_background(&mut other, 1), (1, 0));
    // gearmand finishes 10 of the abandoned jobs: 10 places come back once their polls see it.
    let mut worker = RawWorker::connect(&g.addr(), "churn");
    for _ in 0..10 {
        let job = worker.must_grab(Duration::from_secs(5));
        worker.complete(&job.handle, b"");
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut ws = connect_from("127.0.0.3", s.addr);
    assert_eq!(submit_background(&mut ws, 16), (10, 6));
}

/// Keepers hold one live stream job each on the active connection while leavers abandon 8
/// stream jobs nobody serves (`--max-orphans 4`): each round retires a connection that the
/// keeper's live job keeps open. Once every slot is taken, the retired connection owing the
/// fewest jobs is closed (its keeper hears `job.failed`), so gearmand holds at most
/// 4 × (max-orphans + max-jobs-per-connection) orphans, plus the keepers' live jobs.
#[test]
fn orphans_stop_at_the_documented_bound() {
    let _heavy = heavy();
    let g = Gearmand::start();
    let flags = ["--max-orphans", "4", "--max-jobs-per-connection", "4", "--detach-grace-ms", "0"];
    let s = Server::start(&g.addr(), &flags);
    s.wait_healthy();
    let f = "orphans-nobody-serves";
    let submit_created = |ws: &mut Ws, n: usize| {
        for _ in 0..n {
            send(ws, &json!({"type":"submit","function":f,"payload":"p"}).to_string());
        }
        for _ in 0..n {
            let v = recv_json(ws);
            assert_eq!(v["type"], "job.created", "{v}");
        }
    };
    let rounds = 10;
    let mut keepers = Vec::new();
    for _ in 0..rounds {
        let mut keeper = connect(&s.url());
        submit_created(&mut keeper, 1);
        keepers.push(keeper);
        for _ in 0..2 {
            let mut leaver = connect(&s.url());
            submit_created(&mut leaver, 4);
        }
        // The retired connection's slot is taken by a fresh one: wait until it is up.
        wait_for("a fresh gearmand connection", Duration::from_secs(5), || {
            s.http("GET", "/healthz").0 == 200
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut failed = 0;
    for keeper in &mut keepers {
        set_read_timeout(keeper, Duration::from_millis(200));
        if let Ok(tungstenite::Message::Text(t)) = keeper.read() {
            let v: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "job.failed", "{v}");
            failed += 1;
        }
    }
    let mut w = RawWorker::connect(&g.addr(), f);
    let mut queued = 0;
    while w.grab(Duration::from_millis(1500)).is_some() {
        queued += 1;
    }
    let bound = 4 * (4 + 4) + rounds;
    println!("orphans: {queued} jobs left in gearmand (bound {bound}), {failed} keepers failed");
    assert!(queued <= bound, "{queued} jobs left in gearmand, bound {bound}");
    assert!(failed >= rounds - 4, "retired connections were closed: {failed}");
    assert!(s.metric("gearsock_gearmand_retired_total") >= rounds as f64);
}
