//! Issue 21 item 4: a reconnect may land on another process of a `--processes` group, or on
//! another instance on the same gearmand, and its `attach` still works there: it is relayed to
//! the job's owner through gearmand (the report desks), and the owner's texts come back the same
//! way. Real gearmand, the real binary, real WebSocket clients, and real Gearman workers that
//! stream their events with small sleeps.

mod common;

use std::process::Stdio;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Jobs in each test.
const JOBS: usize = 20;
/// Data events each job streams (`d1` … `dN`), then `done`.
const N: usize = 12;
/// Data events each client reads before its connection is dropped.
const BEFORE_DROP: usize = 3;

/// `JOBS` workers for `function`, each streaming one job's `N` data events `pause` apart.
fn streamers(g: &Gearmand, function: &str, pause: Duration) -> Vec<JoinHandle<()>> {
    (0..JOBS)
        .map(|_| {
            let mut worker = RawWorker::connect(&g.addr(), function);
            std::thread::spawn(move || {
                let job = worker.must_grab(Duration::from_secs(30));
                worker.numbered(&job.handle, N, pause);
            })
        })
        .collect()
}

/// Submits a stream job on a new connection to `url`: the connection and the `job.created`.
fn submit(url: &str, function: &str) -> (Ws, Value) {
    let mut ws = connect(url);
    send(&mut ws, &json!({"type":"submit","function":function,"ref":"r"}).to_string());
    let created = recv_json(&mut ws);
    assert_eq!(
        (created["type"].as_str(), created["seq"].as_u64()),
        (Some("job.created"), Some(1)),
        "{created}"
    );
    (ws, created)
}

/// Reads a job's first `BEFORE_DROP` data events: the seq of the last.
fn read_some(ws: &mut Ws) -> u64 {
    let mut last = 1;
    for i in 1..=BEFORE_DROP {
        let v = recv_json(ws);
        assert_eq!(v["data"].as_str(), Some(&*format!("d{i}")), "{v}");
        last = v["seq"].as_u64().expect("seq");
        assert_eq!(last, i as u64 + 1);
    }
    last
}

/// `JOBS` stream jobs submitted (on the server `url_of(i)` names for job `i`), all running
/// before any is read; then each has its first events read and its connection dropped without
/// a close handshake, mid-stream. Each job's `job.created` and the seq its client saw last.
fn start_and_drop(url_of: impl Fn(usize) -> String) -> Vec<(Value, u64)> {
    let started: Vec<(Ws, Value)> = (0..JOBS).map(|i| submit(&url_of(i), "stream")).collect();
    started
        .into_iter()
        .map(|(mut ws, created)| {
            let last = read_some(&mut ws);
            drop(ws);
            (created, last)
        })
        .collect()
}

/// Attaches `created`'s job on a fresh connection to `url` after seq `after`, and reads it to
/// its end: every data event after the drop exactly once, in order, with consecutive seqs, and
/// the result.
/// Waits for every attaching client (each panics unless its job completed with every event
/// once, in order), then for the workers.
fn finish(attaches: Vec<JoinHandle<()>>, workers: Vec<JoinHandle<()>>) {
    for a in attaches {
        a.join().expect("every job completes with every event once");
    }
    for w in workers {
        w.join().expect("worker");
    }
}

fn attach_and_finish(url: &str, created: &Value, after: u64) {
    let mut ws = connect(url);
    let msg =
        json!({"type":"attach","job":created["job"],"resume":created["resume"],"after":after,"ref":"a"});
    send(&mut ws, &msg.to_string());
    let attached = recv_json(&mut ws);
    assert_eq!(attached["type"], "job.attached", "{attached}");
    assert_eq!((&attached["job"], &attached["ref"]), (&created["job"], &json!("a")));
    let (mut data, mut seqs) = (Vec::new(), Vec::new());
    loop {
        let v = recv_json(&mut ws);
        seqs.push(v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {v}")));
        match v["type"].as_str() {
            Some("job.data") => data.push(v["data"].as_str().unwrap_or_default().to_string()),
            Some("job.complete") => {
                assert_eq!((v["result"].as_str(), v["ref"].as_str()), (Some("done"), Some("r")), "{v}");
                break;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    let want: Vec<String> = (BEFORE_DROP + 1..=N).map(|i| format!("d{i}")).collect();
    assert_eq!(data, want, "each event after the drop exactly once, in order");
    let want: Vec<u64> = (after + 1..=N as u64 + 2).collect();
    assert_eq!(seqs, want);
}

#[test]
fn a_group_of_two_reattaches_twenty_jobs_on_fresh_connections_wherever_they_land() {
    let g = Gearmand::start();
    let gearmand = g.addr();
    let args = [
        "serve",
        "--processes",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--gearmand",
        &gearmand,
        "--allow-function",
        "*",
        "--log-level",
        "warn",
    ];
    let mut proc = Proc::spawn_env(&args, &[], Stdio::null());
    let line = proc.line();
    let addr = line.strip_prefix("listening on ws://").unwrap_or_else(|| panic!("unexpected: {line}"));
    let s = Server { proc, addr: addr.parse().expect("address") };
    wait_for("both processes up with their gearmand", Duration::from_secs(20), || {
        let (_, body) = s.http("GET", "/healthz");
        serde_json::from_str::<Value>(&body).is_ok_and(|h| h["status"] == "ok")
    });
    let workers = streamers(&g, "stream", Duration::from_millis(60));
    let url = s.url();
    let jobs = start_and_drop(|_| url.clone());
    let owners: std::collections::BTreeSet<&str> =
        jobs.iter().filter_map(|(c, _)| c["resume"].as_str()?.split('.').next()).collect();
    assert_eq!(owners.len(), 2, "the jobs were submitted on both processes: {owners:?}");
    // Fresh connections: the kernel spreads them over both processes by their ports, so about
    // half of the attaches land on the process that does not own the job.
    let attaches: Vec<JoinHandle<()>> = jobs
        .into_iter()
        .map(|(created, last)| {
            let url = url.clone();
            std::thread::spawn(move || attach_and_finish(&url, &created, last))
        })
        .collect();
    finish(attaches, workers);
    // Some attaches were relayed to the other process, and every relay ended with its job.
    wait_for("the relays on the board", Duration::from_secs(5), || {
        s.metric_sum("gearsock_relay_events_total", r#"direction="received""#) > 0.0
            && s.metric_sum("gearsock_relays_open", "side=") == 0.0
            && s.metric_sum("gearsock_relay_events_total", r#"direction="received""#)
                == s.metric_sum("gearsock_relay_events_total", r#"direction="sent""#)
    });
}

#[test]
fn two_instances_on_one_gearmand_reattach_each_others_jobs() {
    let g = Gearmand::start();
    // Each knows the other: an attach is relayed only to an instance that is known to run.
    let alpha = Server::start(&g.addr(), &["--instance-id", "alpha", "--peer-instance", "beta"]);
    let beta = Server::start(&g.addr(), &["--instance-id", "beta", "--peer-instance", "alpha"]);
    alpha.wait_healthy();
    beta.wait_healthy();
    let workers = streamers(&g, "stream", Duration::from_millis(60));
    // Half the jobs are submitted on alpha and attached on beta, half the other way round.
    let servers = [&alpha, &beta];
    let jobs = start_and_drop(|i| servers[i % 2].url());
    let attaches: Vec<JoinHandle<()>> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (created, last))| {
            let owner = created["resume"].as_str().and_then(|r| r.split('.').next());
            assert_eq!(owner, Some(["alpha", "beta"][i % 2]), "the token names its instance");
            let url = servers[1 - i % 2].url();
            std::thread::spawn(move || attach_and_finish(&url, &created, last))
        })
        .collect();
    finish(attaches, workers);
    for (server, peer) in [(&alpha, &beta), (&beta, &alpha)] {
        let received = server.metric("gearsock_relay_events_total{direction=\"received\"}");
        let sent = peer.metric("gearsock_relay_events_total{direction=\"sent\"}");
        // Each relay carried at least job.attached, the events after the drop and the result.
        assert!(received >= (JOBS / 2 * (N - BEFORE_DROP + 2)) as f64, "{received}");
        assert_eq!(received, sent);
        assert_eq!(server.metric("gearsock_relays_open{side=\"requester\"}"), 0.0);
        assert_eq!(server.metric("gearsock_relays_open{side=\"owner\"}"), 0.0);
    }
}

/// gearmand's `status` (its text admin protocol): one `(function, queued total)` per function.
fn gearmand_status(g: &Gearmand) -> Vec<(String, u64)> {
    use std::io::{BufRead, BufReader, Write};
    let mut admin = std::net::TcpStream::connect(g.addr()).expect("gearmand admin");
    admin.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    admin.write_all(b"status\n").expect("status");
    let mut lines = BufReader::new(admin).lines();
    let mut out = Vec::new();
    loop {
        let line = lines.next().expect("a line").expect("read");
        if line == "." {
            return out;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        out.push((fields[0].to_string(), fields.get(1).and_then(|t| t.parse().ok()).unwrap_or(0)));
    }
}

/// Attaches `job` with `resume` on a fresh connection: the first reply.
fn attach_once(url: &str, job: &Value, resume: &str) -> Value {
    let mut ws = connect(url);
    let msg = json!({"type":"attach","job":job,"resume":resume,"after":0,"ref":"g"});
    send(&mut ws, &msg.to_string());
    recv_json(&mut ws)
}

#[test]
fn an_attach_naming_an_instance_nobody_serves_is_unknown_and_leaves_nothing_in_gearmand() {
    let g = Gearmand::start();
    let alpha = Server::start(
        &g.addr(),
        &["--instance-id", "alpha", "--peer-instance", "ghost", "--relay-answer-ms", "1500"],
    );
    alpha.wait_healthy();
    let mut worker = RawWorker::connect(&g.addr(), "stream");
    let (_ws, created) = submit(&alpha.url(), "stream");
    let job = worker.must_grab(Duration::from_secs(10));
    let resume = created["resume"].as_str().expect("resume");
    let secret = resume.splitn(3, '.').nth(2).expect("a token of three parts");
    // A made-up instance, in no list: unknown_job at once, and nothing queued for it.
    for i in 0..50 {
        let made_up = format!("madeup{i}.1.{secret}");
        let v = attach_once(&alpha.url(), &created["job"], &made_up);
        assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("unknown_job")), "{v}");
        assert_eq!(v["ref"], "g");
    }
    let status = gearmand_status(&g);
    assert!(!status.iter().any(|(f, _)| f.starts_with("gearsock.report.madeup")), "{status:?}");
    // A peer that is not running: its desk has nobody, so the deadline answers, with the same
    // text as a refusal.
    let local = attach_once(&alpha.url(), &created["job"], &format!("alpha.999.{secret}"));
    let started = std::time::Instant::now();
    let ghost = attach_once(&alpha.url(), &created["job"], &format!("ghost.1.{secret}"));
    assert_eq!((ghost["code"].as_str(), ghost["ref"].as_str()), (Some("unknown_job"), Some("g")), "{ghost}");
    assert_eq!(ghost["message"], local["message"], "no oracle: {local}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "answered by the deadline, not before");
    let queued = |status: &[(String, u64)]| {
        status.iter().find(|(f, _)| f == "gearsock.report.ghost").map_or(0, |(_, total)| *total)
    };
    assert_eq!(queued(&gearmand_status(&g)), 1, "the one relayed attach waits at ghost's desk");
    // Now ghost is silent: attaches to it are unavailable (asked again later) and only probes
    // go to its desk, which gearmand coalesces into one.
    for _ in 0..20 {
        let v = attach_once(&alpha.url(), &created["job"], &format!("ghost.1.{secret}"));
        assert_eq!(
            (v["code"].as_str(), v["job"].as_str()),
            (Some("unavailable"), created["job"].as_str()),
            "{v}"
        );
    }
    assert_eq!(queued(&gearmand_status(&g)), 2, "the attach and one probe");
    assert_eq!(alpha.metric("gearsock_relays_open{side=\"requester\"}"), 0.0, "every slot freed");
    worker.complete(&job.handle, b"done");
}
