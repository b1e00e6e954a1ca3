//! Running gearsock for real: name lookups off the loop, logs an operator can act on, the
//! version. Real gearmand, real server process, its real standard error.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// The article's round trip, which needs no gearmand: the loop is serving.
fn round_trip(s: &Server) {
    report_round_trip(&mut connect(&s.url()));
}

/// The first gearmand's state as `/healthz` shows it.
fn link_state(s: &Server) -> String {
    let (_, body) = s.http("GET", "/healthz");
    let health: serde_json::Value = serde_json::from_str(&body).expect("healthz is JSON");
    health["gearmand"][0]["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn host_names_are_resolved_off_the_loop() {
    let g = Gearmand::start();
    let name = format!("localhost:{}", g.port);
    // Every lookup takes 3 s longer than it should. A loop that resolved by itself could
    // answer nothing while the lookup runs, so it could never be seen `resolving`.
    let env = [("GEARSOCK_TEST_RESOLVE_DELAY_MS", "3000")];
    let (s, _log) = Server::start_logged(&name, &["--log-level", "warn"], &env);
    wait_for("the lookup to start", Duration::from_secs(2), || link_state(&s) == "resolving");
    round_trip(&s);
    assert_eq!(link_state(&s), "resolving", "the round trip was served during the lookup");
    // The lookup ends and the link comes up: the name was resolved and used.
    wait_for("the link to come up through the name", Duration::from_secs(20), || {
        link_state(&s) == "connected"
    });
}

#[test]
fn a_name_that_does_not_resolve_is_reported_once() {
    let (s, log) = Server::start_logged(
        "gearmand.invalid:4730",
        &["--reconnect-min-ms", "10", "--reconnect-max-ms", "40"],
        &[],
    );
    wait_for("several failed lookups", Duration::from_secs(20), || {
        s.metric("gearsock_gearmand_connect_failures_total") >= 5.0
    });
    round_trip(&s);
    assert_eq!(
        log.count("gearmand gearmand.invalid:4730 unreachable: name not found"),
        1,
        "{:?}",
        log.lines()
    );
}

#[test]
fn an_unreachable_gearmand_is_reported_once_then_back() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (s, log) =
        Server::start_logged(&addr, &["--reconnect-min-ms", "10", "--reconnect-max-ms", "40"], &[]);
    // The first attempt is made as the loop starts: the operator hears of it at once.
    wait_for("the unreachable line", Duration::from_secs(1), || log.count("unreachable") == 1);
    assert!(log.count("connection refused") == 1, "{:?}", log.lines());
    wait_for("many failed attempts", Duration::from_secs(20), || {
        s.metric("gearsock_gearmand_connect_failures_total") >= 20.0
    });
    assert_eq!(log.count("unreachable"), 1, "once, not once per attempt: {:?}", log.lines());
    let _g = Gearmand::start_on(port);
    wait_for("the back line", Duration::from_secs(20), || {
        log.count(&format!("gearmand {addr} back after")) == 1
    });
    s.wait_healthy();
    assert_eq!(log.count("unreachable"), 1, "{:?}", log.lines());
}

/// Opens a WebSocket by hand and hangs up without a close frame, as a closed tab does.
fn open_and_vanish(s: &Server) {
    let mut sock = TcpStream::connect(s.addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    sock.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(sock.read(&mut byte).expect("read the 101"), 1, "the server hung up");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
}

#[test]
fn a_thousand_abrupt_disconnects_make_a_handful_of_lines() {
    let g = Gearmand::start();
    let (mut s, log) = Server::start_logged(&g.addr(), &[], &[]);
    s.wait_healthy();
    for _ in 0..1000 {
        open_and_vanish(&s);
    }
    wait_for("every disconnect seen", Duration::from_secs(30), || {
        s.metric("gearsock_connections_closed_total") >= 1000.0
    });
    s.proc.signal("TERM");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
    wait_for("the last line", Duration::from_secs(5), || log.count("stopped") == 1);
    let lines = log.lines();
    assert!(lines.len() <= 8, "{} lines at the default level: {lines:#?}", lines.len());
    assert_eq!(log.count("1000 clients left without a close frame"), 1, "{lines:#?}");
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_the_loop() {
    let g = Gearmand::start();
    // Debug logs three lines per connection into a pipe nobody reads: the pipe (64 KiB) and
    // then the log queue fill up, and the loop must go on as if nothing happened.
    let args = ["serve", "--listen", "127.0.0.1:0", "--gearmand", &g.addr(), "--log-level", "debug"];
    let mut proc = Proc::spawn_env(&args, &[], Stdio::piped());
    let line = proc.line();
    let addr = line.strip_prefix("listening on ws://").expect("listening line").parse().expect("address");
    let s = Server { proc, addr };
    for _ in 0..3000 {
        open_and_vanish(&s);
    }
    round_trip(&s);
    assert_eq!(s.http("GET", "/healthz").0, 200);
    // Reading now lets the log writer go on; it says how much it had to drop.
    let mut s = s;
    let log = s.proc.collect_stderr();
    wait_for("the dropped-lines note", Duration::from_secs(20), || log.count("log lines dropped") >= 1);
}

#[test]
fn version_on_the_binary_and_each_command() {
    let mut commands = vec![&["--version"][..], &["-V"], &["serve", "--version"], &["worker", "-V"]];
    if cfg!(feature = "bench") {
        commands.push(&["bench", "-V"]);
    }
    for args in commands {
        let out = std::process::Command::new(BIN).args(args).output().expect("run gearsock");
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), format!("gearsock {}", env!("CARGO_PKG_VERSION")), "{args:?}");
    }
}

#[test]
fn the_startup_line_says_what_is_in_force() {
    let (mut s, log) = Server::start_logged("127.0.0.1:1", &["--max-connections", "500"], &[]);
    wait_for("the startup line", Duration::from_secs(5), || log.count("gearsock ") >= 1);
    let line =
        log.lines().into_iter().find(|l| l.contains(&format!("on ws://{}", s.addr))).expect("startup line");
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("gearmand 127.0.0.1:1") && line.contains("max 500 connections"), "{line}");
    s.proc.signal("TERM");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
    wait_for("the shutdown lines", Duration::from_secs(5), || log.count("stopped") == 1);
    assert_eq!(log.count("signal"), 1, "{:?}", log.lines());
}

/// simple_logger writes each line (behind the queue): a UTC timestamp with milliseconds, the
/// level, the module that logged it, then the message.
#[test]
fn log_lines_carry_a_utc_time_the_level_and_the_module() {
    let (mut s, log) = Server::start_logged("127.0.0.1:1", &[], &[]);
    wait_for("the startup line", Duration::from_secs(5), || log.count("gearsock ") >= 1);
    let line = log.lines().into_iter().find(|l| l.contains(" on ws://")).expect("startup line");
    let (stamp, rest) = line.split_once(' ').expect("a timestamp, then the rest");
    let b = stamp.as_bytes();
    assert_eq!(b.len(), "2026-12-07T16:45:06.540Z".len(), "{line}");
    let shape = b.iter().enumerate().all(|(i, &c)| match i {
        4 | 7 => c == b'-',
        10 => c == b'T',
        13 | 16 => c == b':',
        19 => c == b'.',
        23 => c == b'Z',
        _ => c.is_ascii_digit(),
    });
    assert!(shape, "RFC 3339 UTC with milliseconds: {line}");
    let (level_and_module, message) = rest.split_once("] ").expect("the module in brackets");
    assert!(level_and_module.starts_with("INFO  [gearsock::server"), "{line}");
    assert!(message.starts_with("gearsock "), "{line}");
    s.proc.signal("TERM");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
