//! Floods of connections against the real server: a burst larger than the old accept backlog
//! while the loop is not accepting, and `gearsock bench flood` (a half-open flood at the
//! connection limit while real clients are served), short versions of `scripts/flood.sh`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Gearmand, Server};
use serde_json::Value;

/// Connections in the burst: well over the 128 that std's and mio's `listen` ask for, and
/// under a default soft open-file limit of 1024.
const BURST: usize = 600;

#[test]
fn a_burst_of_connections_while_the_loop_is_busy_is_queued_not_dropped() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn < BURST {
        eprintln!("skipped: net.core.somaxconn is {somaxconn}, below the burst of {BURST}");
        return;
    }
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    // A stopped loop accepts nothing, as a loop busy with one long pass: whatever arrives
    // meanwhile waits in the kernel's accept queue, up to the listen backlog. Beyond it the
    // kernel drops the handshake and the client waits for a SYN retransmit (1 s, 2 s, ...).
    server.proc.signal("STOP");
    let mut queued = Vec::new();
    for i in 0..BURST {
        match TcpStream::connect_timeout(&server.addr, Duration::from_millis(500)) {
            Ok(sock) => queued.push(sock),
            Err(e) => {
                server.proc.signal("CONT");
                panic!("connection {i} of {BURST} was not queued while the loop was stopped: {e}");
            }
        }
    }
    server.proc.signal("CONT");
    // Each queued connection is served once the loop runs again.
    for sock in &mut queued {
        sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        sock.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("send the upgrade");
    }
    for (i, sock) in queued.iter_mut().enumerate() {
        let mut head = [0u8; 12];
        sock.read_exact(&mut head).unwrap_or_else(|e| panic!("connection {i}: no answer: {e}"));
        assert_eq!(&head, b"HTTP/1.1 101", "connection {i}");
    }
}

/// Runs `gearsock bench flood ... --json` against `server`; returns the exit status and JSON.
fn flood(server: &Server, flags: &str) -> (i32, Value) {
    let out = Command::new(BIN)
        .args(["bench", "flood", "--url", &server.url(), "--pid", &server.proc.pid().to_string()])
        .args(flags.split_whitespace())
        .arg("--json")
        .output()
        .expect("run gearsock bench flood");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), value)
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The flood of `scripts/flood.sh`, small: 300 slots, 100 real clients, 200 tricklers to fill
/// the rest and 50 beyond the limit, over two processes, a handshake timeout of 1 s. The
/// server's CPU and the clients' latency are reported but not asserted here (the machine may
/// be busy with other work): `scripts/flood.sh` judges them.
#[test]
fn a_half_open_flood_at_the_limit_times_out_408_refuses_503_and_gives_the_slots_back() {
    let gearmand = Gearmand::start();
    let server =
        Server::start(&gearmand.addr(), &["--max-connections", "300", "--handshake-timeout-ms", "1000"]);
    server.wait_healthy();
    let (_, v) = flood(
        &server,
        "--slots 300 --handshake-timeout-ms 1000 --connections 100 --beyond 50 --per-process 125 \
         --source-ips 2",
    );
    assert_eq!((num(&v["tricklers"]), num(&v["trickle_processes"])), (250, 2), "{v}");
    // Every slot the real clients left was taken, and each taker got 408 at the timeout; the
    // ones beyond the limit got 503; nobody was left hanging or cut off without an answer.
    let answers = &v["trickle_answers"];
    assert_eq!((num(&answers["408"]), num(&answers["503"])), (200, 50), "{v}");
    assert_eq!(answers["failures"].as_object().map(|f| f.len()), Some(0), "{v}");
    assert!(num(&v["flood"]["server_fds_peak"]) >= num(&v["flood"]["server_fds_baseline"]) + 300, "{v}");
    // The real clients were served all along.
    let clients = &v["real_clients"];
    assert_eq!(num(&clients["connected"]), 100, "{v}");
    assert_eq!(clients["failures"].as_object().map(|f| f.len()), Some(0), "{v}");
    assert_eq!(num(&clients["mismatches"]), 0, "{v}");
    assert!(num(&clients["min_round_trips_per_client"]) > 0, "{v}");
    assert!(v["flood"]["server_cpu_pct"].is_number(), "{v}");
    // The slots came back, and the descriptors.
    assert_eq!(num(&v["slots_back"]["established"]), 200, "{v}");
    assert_eq!(num(&v["fds_end"]), num(&v["flood"]["server_fds_baseline"]), "{v}");
    assert!(v["trouble"].as_array().is_some_and(|t| t.is_empty()), "{v}");
    // The server counted the same refusals.
    assert_eq!(server.metric("gearsock_connections_refused_total"), 50.0);
}
