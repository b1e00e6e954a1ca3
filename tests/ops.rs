//! Running gearsock for real, part two (issue 20): a command line that refuses what it cannot
//! do, live and ready, the admin listener, reload on SIGHUP, configuration from the
//! environment. Real server process, real gearmand where one is needed.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs the binary to its end; (exit code, standard error).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run gearsock");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_refused_invocation_names_the_flag_the_value_and_what_is_valid() {
    let table: &[(&[&str], &[&str])] = &[
        (&["nonsense"], &["unknown command \"nonsense\""]),
        (
            &["serve", "--client-out-soft-bytes", "100000000", "--client-out-hard-bytes", "10"],
            &["--client-out-soft-bytes 100000000", "soft <= hard <= total"],
        ),
        (
            &["serve", "--worker-token", "t", "--worker-token-file", "Cargo.toml"],
            &["--worker-token and --worker-token-file", "one of them"],
        ),
        (&["serve", "--gearmand", "nohost"], &["--gearmand \"nohost\"", "HOST:PORT"]),
        (&["serve", "--gearmand", "127.0.0.1:abc"], &["--gearmand \"127.0.0.1:abc\"", "HOST:PORT"]),
        (&["serve", "--listen", "8080"], &["--listen \"8080\"", "IP:PORT, HOST:PORT or :PORT"]),
        (
            &["serve", "--log-level", "loud"],
            &["--log-level \"loud\"", "off, error, warn, info, debug or trace"],
        ),
        (&["serve", "--max-connections", "abc"], &["--max-connections \"abc\"", "whole number"]),
        (&["serve", "--idle-timeout-ms", "0"], &["--idle-timeout-ms 0", "at least 1"]),
        (&["serve", "--max-jobs-per-connection", "0"], &["--max-jobs-per-connection 0", "at least 1"]),
        (&["worker", "--report", "wss://gear.example"], &["--report \"wss://gear.example\"", "ws://"]),
        (&["worker", "--report", "http://127.0.0.1:8080"], &["--report \"http://127.0.0.1:8080\"", "ws://"]),
        (&["worker", "--concurrency", "0"], &["--concurrency 0", "at least 1"]),
        (&["worker", "--gearmand", "nohost"], &["--gearmand \"nohost\""]),
        (&["submit", "ping", "--gearmand", "h:0"], &["--gearmand \"h:0\""]),
    ];
    for (args, want) in table {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?} was not refused: {err}");
        for w in *want {
            assert!(err.contains(w), "{args:?}: {w:?} not in {err:?}");
        }
    }
}

#[test]
fn listen_takes_a_bare_port_and_a_host_name_and_help_lists_everything() {
    let port = free_port().to_string();
    for listen in [":0".to_string(), format!("localhost:{port}")] {
        let mut p = Proc::spawn(&["serve", "--echo", "--listen", &listen, "--log-level", "off"]);
        let line = p.line();
        assert!(line.starts_with("listening on ws://"), "{listen}: {line}");
    }
    let out = Command::new(BIN).arg("--help").output().expect("run gearsock");
    let help = String::from_utf8_lossy(&out.stdout);
    for word in
        ["serve", "worker", "submit", "token", "bench", "connect, roundtrip, jobs, mixed, churn, flood"]
    {
        assert!(help.contains(word), "top-level help lacks {word}");
    }
}
