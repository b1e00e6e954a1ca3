//! `gearsock bench` end to end: the real binary, briefly, in each mode, against a real
//! `gearsock serve` (and a real gearmand, with the bench's own demo workers for jobs), its
//! `--json` output checked for sane figures.

mod common;

use std::process::Command;

use common::{BIN, Gearmand, Server, bench_json, free_port};
use serde_json::Value;

/// Runs `gearsock bench FLAGS... EXTRA... --json` (`flags` split on whitespace); returns the
/// exit status and the JSON it printed.
fn bench(flags: &str, extra: &[&str]) -> (i32, Value) {
    let args: Vec<&str> = flags.split_whitespace().chain(extra.iter().copied()).collect();
    bench_json(&args)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A timed run that worked: something measured, nothing wrong, sane percentiles.
fn assert_clean_run(run: &Value, noun: &str, connections: u64) {
    assert!(num(&run[noun]) > 0.0, "no {noun}: {run}");
    assert!(num(&run[format!("{noun}_per_s")]) > 0.0, "{run}");
    assert_eq!(run["errors"], 0, "{run}");
    assert_eq!(run["mismatches"], 0, "{run}");
    assert!(num(&run["replies"]) >= num(&run[noun]), "every measured reply was checked: {run}");
    assert_eq!(run["connections"]["established"], connections, "{run}");
    assert_eq!(run["connections"]["failed"], 0, "{run}");
    let latency = &run["latency_us"];
    let (p50, p99, max) = (num(&latency["p50"]), num(&latency["p99"]), num(&latency["max"]));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    assert!(num(&run["cpu_pct"]["bench"]) > 0.0, "{run}");
}

#[test]
fn roundtrip_checks_every_reply_from_the_server_and_the_baseline() {
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    let pid = server.proc.pid().to_string();
    let (code, v) = bench(
        "roundtrip --connections 4 --in-flight 8 --threads 2 --duration-s 1 --warmup-s 0.2 --baseline",
        &["--url", &server.url(), "--pid", &pid],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["expect"], "got it!");
    assert_clean_run(&v["websocket"], "messages", 4);
    assert_clean_run(&v["baseline"], "messages", 4);
    assert_eq!(v["baseline"]["kind"], "tcp_line_echo");
    assert!(num(&v["ratio"]) > 0.0, "{v}");
    assert!(num(&v["websocket"]["cpu_pct"]["server"]) > 0.0, "{v}");
    // The server saw every message the bench counted a reply for.
    let seen = server.metric(r#"gearsock_messages_in_total{type="worker.complete"}"#);
    assert!(seen >= num(&v["websocket"]["replies"]), "server saw {seen}: {v}");
}

#[test]
fn connect_opens_every_connection_to_the_server_and_the_baseline_acceptor() {
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    let pid = server.proc.pid().to_string();
    let (code, v) = bench(
        "connect --connections 300 --concurrency 20 --source-ips 3 --hold 0.5 --baseline",
        &["--url", &server.url(), "--pid", &pid],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!((v["established"].as_u64(), v["failed"].as_u64()), (Some(300), Some(0)), "{v}");
    assert!(num(&v["handshakes_per_s"]) > 0.0, "{v}");
    assert!(num(&v["handshake_latency_us"]["p50"]) > 0.0, "{v}");
    assert!(num(&v["rss"]["after_bytes"]) > 0.0, "{v}");
    assert!(v["rss"]["per_connection_bytes"].is_number(), "{v}");
    // The acceptor's run: the same connections, every one upgraded, none lost.
    let base = &v["baseline"];
    assert_eq!(base["kind"], "upgrade_acceptor", "{v}");
    assert_eq!((base["established"].as_u64(), base["failed"].as_u64()), (Some(300), Some(0)), "{v}");
    assert_eq!(base["lost"].as_object().map(|lost| lost.len()), Some(0), "{v}");
    assert!(num(&base["handshakes_per_s"]) > 0.0, "{v}");
    assert!(num(&base["handshake_latency_us"]["p50"]) > 0.0, "{v}");
    assert!(base["cpus"].as_array().is_some_and(|cpus| !cpus.is_empty()), "pinned like the server: {v}");
    assert!(num(&v["ratio"]) > 0.0, "{v}");
}

#[test]
fn connect_counts_refused_connections_and_fails() {
    let url = format!("ws://127.0.0.1:{}", free_port());
    let (code, v) = bench("connect --connections 5 --timeout-s 5", &["--url", &url]);
    assert_eq!(code, 1, "{v}");
    assert_eq!((v["established"].as_u64(), v["failed"].as_u64()), (Some(0), Some(5)), "{v}");
    let reasons: Vec<&String> = v["failures"].as_object().expect("failures").keys().collect();
    assert!(reasons.iter().all(|r| r.contains("refused")), "{reasons:?}");
}

#[test]
fn jobs_complete_through_the_bridge_and_directly() {
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    server.wait_healthy();
    let (code, v) = bench(
        "jobs --spawn-workers 2 --function reverse --payload-bytes 8 --connections 3 --in-flight 2 \
         --duration-s 1 --warmup-s 0.3 --baseline",
        &["--url", &server.url(), "--gearmand", &gearmand.addr()],
    );
    assert_eq!(code, 0, "{v}");
    assert_clean_run(&v["bridge"], "jobs", 3);
    assert_clean_run(&v["baseline"], "jobs", 3);
    assert_eq!(v["baseline"]["kind"], "gearman_direct");
    assert!(num(&v["ratio"]) > 0.0, "{v}");
    assert!(v["added_p50_us"].is_number(), "{v}");
}

#[test]
fn failing_jobs_are_counted_as_errors() {
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    server.wait_healthy();
    let (code, v) = bench(
        "jobs --spawn-workers 1 --function fail --connections 2 --duration-s 0.5 --warmup-s 0",
        &["--url", &server.url(), "--gearmand", &gearmand.addr()],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["bridge"]["jobs"], 0, "{v}");
    assert!(num(&v["bridge"]["error_kinds"]["job.failed"]) > 0.0, "{v}");
    assert_eq!(v["bridge"]["mismatches"], 0, "{v}");
}

#[test]
fn one_process_refuses_more_connections_than_its_file_limit() {
    let out =
        Command::new(BIN).args(["bench", "connect", "--connections", "100000000"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("several `gearsock bench` processes"), "{err}");
}
