//! Connection churn against the real server: `gearsock bench churn`, the short version of
//! `scripts/churn.sh`. Every cycle is a whole connection (connect, upgrade, the article's
//! `worker.complete` answered `got it!`, the close handshake); the server must give back what
//! each one took: memory and descriptors.

mod common;

use std::process::Command;

use common::{BIN, Gearmand, Server};
use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// 10,000 cycles, 50 at a time; the server's RSS is read before, after each 1,000 and at the
/// end, each time once its descriptors are back at the baseline.
///
/// The tolerance on RSS growth from the 1,000-cycle checkpoint to the end is 3 %, not the 1 %
/// that `scripts/churn.sh` asks from 10,000 to 100,000 cycles, and this is why. At 10,000
/// cycles, 1 % of the server's ~4.2 MiB is ~42 KiB; in 19 runs on a fresh server the growth
/// was 0.46 to 1.29 % (20 to 56 KiB). `/proc/PID/smaps` says where it is: glibc's `[heap]`
/// reaches its working size (400 to 408 KiB) in the first few thousand cycles and no run grew
/// it after that, up to 110,000 cycles, while its resident part creeps from ~285 KiB at 1,000
/// cycles to ~325 at 10,000 and ~350 at 100,000. The anonymous RSS grows by exactly that: the
/// allocator touching for the first time pages of a heap it already has (it asks the kernel
/// for 128 KiB more than it needs each time) as the mix of 50 connections' buffers shifts. The
/// bytes in use do not grow: under valgrind's massif, with the server idle between runs, they
/// were 523,017 after 10,000 cycles and 523,017 after 110,000, allocation tree for allocation
/// tree. The creep is bounded
/// by the untouched part of the heap at the checkpoint (~115 KiB, under 3 %). A leak of any
/// per-connection object (a Conn, a Ws buffer, a client record, a timer entry: a few hundred
/// bytes x 9,000 cycles) is far beyond it: a 200-byte Vec leaked per accepted connection took
/// this test from 4.2 to 6.3 MiB. A leak of a few dozen bytes a cycle may hide in the heap's
/// free space here, which is what the 100,000-cycle script is for. The run's checkpoints, with
/// the heap's figures, are printed on failure.
#[test]
fn ten_thousand_cycles_give_back_their_memory_and_descriptors() {
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    server.wait_healthy();
    let out = Command::new(BIN)
        .args(["bench", "churn", "--url", &server.url(), "--pid", &server.proc.pid().to_string()])
        .args(["--cycles", "10000", "--connections", "50", "--max-growth-pct", "3", "--json"])
        .output()
        .expect("run gearsock bench churn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    // Every cycle went through the whole close handshake.
    assert_eq!((num(&v["completed"]), num(&v["failed"])), (10_000.0, 0.0), "{v}");
    assert!(num(&v["cycles_per_s"]) > 0.0, "{v}");
    let server_side = &v["server"];
    let checkpoints = server_side["checkpoints"].as_array().expect("checkpoints");
    let cycles: Vec<f64> = checkpoints.iter().map(|c| num(&c["cycles"])).collect();
    assert_eq!(cycles, (0..=10).map(|k| f64::from(k) * 1000.0).collect::<Vec<_>>(), "{v}");
    // Memory: at most 3 % more after 10,000 cycles than after 1,000 (see above).
    let (first, end) = (num(&server_side["rss_first_tenth_bytes"]), num(&server_side["rss_end_bytes"]));
    assert!(end <= first * 1.03, "RSS {first} -> {end} bytes: {}", server_side["checkpoints"]);
    // Descriptors: back at the baseline after every thousand.
    let baseline = num(&server_side["fds_baseline"]);
    assert!(checkpoints.iter().all(|c| num(&c["fds"]) <= baseline), "{}", server_side["checkpoints"]);
    assert_eq!(v["criteria"]["rss_growth"]["ok"], true, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(out.status.code(), Some(0), "{v}");
    // The server saw every cycle through: each upgraded, answered and closed.
    assert!(server.metric("gearsock_handshakes_total") >= 10_000.0);
    assert!(server.metric("gearsock_connections_closed_total") >= 10_000.0);
    assert_eq!(server.metric(r#"gearsock_messages_in_total{type="worker.complete"}"#), 10_000.0);
}
