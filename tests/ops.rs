//! Running gearsock for real, part two (issue 20): a command line that refuses what it cannot
//! do, live and ready, the admin listener, reload on SIGHUP, configuration from the
//! environment. Real server process, real gearmand where one is needed.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// A raw request's whole answer.
fn ask(addr: SocketAddr, method: &str, path: &str) -> String {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    http_raw(addr, &request, Duration::from_secs(10)).expect("an answer")
}

#[test]
fn live_while_gearmand_is_down_ready_only_with_it_and_head_everywhere() {
    let nobody = format!("127.0.0.1:{}", free_port()); // no gearmand listens there
    let s = Server::start(&nobody, &[]);
    assert!(ask(s.addr, "GET", "/livez").starts_with("HTTP/1.1 200"), "live while gearmand is down");
    let ready = ask(s.addr, "GET", "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains(&format!("not ready: no gearmand connected ({nobody} ")), "{ready}");
    assert!(ask(s.addr, "GET", "/healthz").starts_with("HTTP/1.1 503"), "/healthz means ready");
    for path in ["/", "/livez", "/readyz", "/healthz", "/metrics"] {
        let head = ask(s.addr, "HEAD", path);
        let (headers, body) = head.split_once("\r\n\r\n").expect("a head");
        assert!(headers.contains("Content-Length: ") && body.is_empty(), "HEAD {path}: {head}");
    }
    let refused = ask(s.addr, "POST", "/metrics");
    assert!(refused.starts_with("HTTP/1.1 405") && refused.contains("\r\nAllow: GET, HEAD\r\n"), "{refused}");
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    wait_for("ready", Duration::from_secs(10), || ask(s.addr, "GET", "/readyz").starts_with("HTTP/1.1 200"));
}

#[test]
fn the_admin_listener_has_the_admin_pages_and_the_client_port_the_websocket() {
    let g = Gearmand::start();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("an address");
    let s = Server::start(&g.addr(), &["--admin-listen", &admin.to_string(), "--no-demo-page"]);
    for path in ["/metrics", "/livez", "/readyz", "/healthz", "/"] {
        assert!(ask(s.addr, "GET", path).starts_with("HTTP/1.1 404"), "{path} on the client port");
    }
    wait_for("ready", Duration::from_secs(10), || ask(admin, "GET", "/readyz").starts_with("HTTP/1.1 200"));
    for path in ["/metrics", "/livez", "/healthz"] {
        assert!(ask(admin, "GET", path).starts_with("HTTP/1.1 200"), "{path} on the admin port");
    }
    assert!(ask(admin, "GET", "/").starts_with("HTTP/1.1 404"), "no demo page on the admin port");
    // The client port still speaks WebSocket; the admin port ends an upgrade at once.
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"worker.complete","id":"H:x:1","value":"done"}"#);
    assert_eq!(recv(&mut ws), "got it!");
    if let Ok((mut on_admin, _)) = tungstenite::connect(format!("ws://{admin}")) {
        set_read_timeout(&on_admin, Duration::from_secs(5));
        let closed = on_admin.read();
        assert!(
            matches!(closed, Ok(tungstenite::Message::Close(Some(ref f))) if f.code == 1008.into()),
            "{closed:?}"
        );
    }
    assert!(ask(admin, "GET", "/metrics").contains("gearsock_connections_open "));
}

/// `gearsock serve --print-config` with `env` set; (exit code, standard output).
fn print_config(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["serve", "--print-config"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run gearsock");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line of `--print-config` for `flag`, its spaces squeezed.
fn setting(text: &str, flag: &str) -> String {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(flag)).unwrap_or("");
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn settings_come_from_flags_then_the_env_file_then_the_environment() {
    let dir = std::env::temp_dir().join(format!("gearsock-ops-env-{}", std::process::id()));
    std::fs::write(&dir, "GEARSOCK_QUEUE_LIMIT=7\nGEARSOCK_MAX_ORPHANS=9\n").expect("write the env file");
    let env = [
        ("GEARSOCK_MAX_ORPHANS", "3"),
        ("GEARSOCK_QUEUE_LIMIT", "5"),
        ("GEARSOCK_MAX_JOBS_PER_CONNECTION", "11"),
        ("GEARSOCK_ALLOWED_ORIGIN", "https://a.example,https://b.example"),
        ("GEARSOCK_SHARED_UNIQUES", "1"),
        ("GEARSOCK_WORKER_TOKEN", "s3cret"),
    ];
    let file = dir.to_str().expect("UTF-8");
    let (code, text) = print_config(&["--env-file", file, "--queue-limit", "6"], &env);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(setting(&text, "--queue-limit"), "--queue-limit 6 (flag)");
    assert_eq!(setting(&text, "--max-orphans"), "--max-orphans 9 (env file GEARSOCK_MAX_ORPHANS)");
    assert_eq!(
        setting(&text, "--max-jobs-per-connection"),
        "--max-jobs-per-connection 11 (environment GEARSOCK_MAX_JOBS_PER_CONNECTION)"
    );
    assert_eq!(
        setting(&text, "--allowed-origin"),
        "--allowed-origin https://a.example,https://b.example (environment GEARSOCK_ALLOWED_ORIGIN)"
    );
    assert_eq!(
        setting(&text, "--shared-uniques"),
        "--shared-uniques true (environment GEARSOCK_SHARED_UNIQUES)"
    );
    assert_eq!(setting(&text, "--worker-token"), "--worker-token <set> (environment GEARSOCK_WORKER_TOKEN)");
    assert!(!text.contains("s3cret"), "a secret is never printed");
    assert_eq!(setting(&text, "--poll-interval-ms"), "--poll-interval-ms 100 (default)");
    // A value from the environment is checked as a flag's would be, and named.
    let (code, _) = print_config(&[], &[("GEARSOCK_MAX_CONECTIONS", "1")]);
    assert_eq!(code, Some(2), "a misspelt variable is refused");
    let (code, _) = print_config(&[], &[("GEARSOCK_IDLE_TIMEOUT_MS", "0")]);
    assert_eq!(code, Some(2));
    std::fs::remove_file(&dir).expect("remove the env file");
}

#[test]
fn sighup_reloads_the_env_file_without_dropping_anyone_and_a_bad_file_keeps_the_old() {
    let path = std::env::temp_dir().join(format!("gearsock-ops-hup-{}", std::process::id()));
    let file = path.to_str().expect("UTF-8").to_string();
    std::fs::write(&path, "GEARSOCK_ALLOWED_ORIGIN=https://old.example\n").expect("write");
    let nobody = format!("127.0.0.1:{}", free_port());
    let (mut s, log) = Server::start_logged(&nobody, &["--env-file", &file], &[]);
    let mut stays = connect(&s.url());
    report_round_trip(&mut stays);
    let from = |origin: &str| try_connect_with(&s.url(), &[("Origin", origin)], Duration::from_secs(5));
    assert!(from("https://old.example").is_ok());
    assert!(from("https://new.example").is_err());

    std::fs::write(&path, "GEARSOCK_ALLOWED_ORIGIN=https://new.example\nGEARSOCK_LOG_LEVEL=debug\n")
        .expect("write");
    s.proc.signal("HUP");
    wait_for("the reload", Duration::from_secs(5), || {
        log.count("SIGHUP: settings read again; changed:") == 1
    });
    let said = log.lines().join("\n");
    assert!(
        said.contains("allowed origins [\"https://old.example\"] -> [\"https://new.example\"]"),
        "{said}"
    );
    assert!(said.contains("log level Info -> Debug"), "{said}");
    assert!(from("https://new.example").is_ok() && from("https://old.example").is_err());
    report_round_trip(&mut stays); // not dropped
    wait_for("debug lines", Duration::from_secs(5), || log.count("DEBUG") > 0);

    std::fs::write(&path, "this is not KEY=VALUE\nnonsense\n").expect("write");
    s.proc.signal("HUP");
    wait_for("the refusal", Duration::from_secs(5), || log.count("every setting in force is kept") == 1);
    assert!(from("https://new.example").is_ok(), "the old settings stay");
    report_round_trip(&mut stays);
    std::fs::remove_file(&path).expect("remove");
    s.proc.signal("HUP");
    wait_for("the second refusal", Duration::from_secs(5), || {
        log.count("every setting in force is kept") == 2
    });
    report_round_trip(&mut stays);
    assert_eq!(s.proc.wait_exit(Duration::from_millis(200)), None, "SIGHUP is no stop");
    s.proc.signal("TERM");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(5)), Some(0), "SIGTERM still is");
}

#[test]
fn sighup_takes_a_new_worker_token_from_its_file_without_dropping_anyone() {
    let path = std::env::temp_dir().join(format!("gearsock-ops-token-{}", std::process::id()));
    let file = path.to_str().expect("UTF-8").to_string();
    std::fs::write(&path, "first-secret-token\n").expect("write");
    let nobody = format!("127.0.0.1:{}", free_port());
    let (mut s, log) = Server::start_logged(&nobody, &["--worker-token-file", &file], &[]);
    let mut stays = connect(&s.url());
    let report = |ws: &mut Ws, token: &str| {
        send(ws, &format!(r#"{{"type":"worker.complete","id":"H:x:1","value":"v","token":"{token}"}}"#));
        recv(ws)
    };
    assert_eq!(report(&mut stays, "first-secret-token"), "got it!");

    std::fs::write(&path, "second-secret-token\n").expect("write");
    s.proc.signal("HUP");
    wait_for("the reload", Duration::from_secs(5), || log.count("worker token (replaced)") == 1);
    assert_eq!(log.count("secret-token"), 0, "a token is never logged: {:?}", log.lines());
    assert!(report(&mut stays, "first-secret-token").contains("forbidden"), "the old token is refused");
    assert_eq!(report(&mut stays, "second-secret-token"), "got it!", "the same connection, the new token");
    std::fs::remove_file(&path).ok();
    s.proc.signal("TERM");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn a_group_passes_sighup_to_its_processes() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let (mut s, log) = Server::start_logged(&nobody, &["--processes", "2"], &[]);
    s.proc.signal("HUP");
    wait_for("both processes to read again", Duration::from_secs(10), || {
        log.count("SIGHUP: settings read again") == 2
    });
    let mut ws = connect(&s.url());
    report_round_trip(&mut ws);
    assert_eq!(s.proc.wait_exit(Duration::from_millis(200)), None, "the group still runs");
}

/// Every series a lone process exports, and how it comes to move: a scenario that produces it
/// (and the test that shows it, where one does), or `gauge` for a value read when asked. A
/// series exported but missing here, or listed but no longer exported, fails the test.
const SERIES: &[(&str, &str)] = &[
    ("gearsock_connections_open", "gauge"),
    ("gearsock_connections_accepted_total", "any client connects"),
    ("gearsock_connections_refused_total", "a client over --max-connections (tests/server_core.rs)"),
    ("gearsock_connections_closed_total", "any client leaves (tests/deploy.rs)"),
    ("gearsock_handshakes_total", "any WebSocket upgrade"),
    ("gearsock_http_requests_total", "any plain HTTP request, such as this one"),
    ("gearsock_messages_in_total{type=\"ping\"}", "the article's ping"),
    ("gearsock_messages_in_total{type=\"worker.complete\"}", "a worker's report"),
    ("gearsock_messages_in_total{type=\"submit\"}", "a submit"),
    ("gearsock_messages_in_total{type=\"status\"}", "a status question"),
    ("gearsock_messages_in_total{type=\"invalid\"}", "text that is not a known message"),
    ("gearsock_messages_in_total{type=\"binary\"}", "a binary frame"),
    ("gearsock_messages_out_total", "any reply"),
    ("gearsock_errors_total{code=\"bad_json\"}", "text that is not JSON"),
    ("gearsock_errors_total{code=\"bad_request\"}", "a submit without a function"),
    ("gearsock_errors_total{code=\"unknown_type\"}", "{\"type\":\"nonsense\"}"),
    ("gearsock_errors_total{code=\"too_many_jobs\"}", "over --max-jobs-per-connection"),
    ("gearsock_errors_total{code=\"unavailable\"}", "a submit with gearmand down past --queue-timeout-ms"),
    ("gearsock_errors_total{code=\"forbidden\"}", "a report without the --worker-token"),
    ("gearsock_errors_total{code=\"unknown_job\"}", "a status question about no job"),
    ("gearsock_errors_total{code=\"binary\"}", "a binary frame in the job protocol"),
    ("gearsock_errors_total{code=\"ambiguous_job\"}", "an id-only report two gearmands gave out"),
    ("gearsock_errors_total{code=\"gearmand_error\"}", "gearmand answers a status question with ERROR"),
    ("gearsock_messages_in_total{type=\"auth\"}", "an auth message (tests/access.rs)"),
    ("gearsock_messages_in_total{type=\"attach\"}", "an attach (tests/resume.rs)"),
    (
        "gearsock_errors_total{code=\"unauthorized\"}",
        "a message before a token, with tokens on (tests/access.rs)",
    ),
    ("gearsock_errors_total{code=\"rate_limited\"}", "over --max-jobs-per-second (tests/access.rs)"),
    ("gearsock_auth_total{outcome=\"ok\",reason=\"valid\"}", "a valid token (tests/access.rs)"),
    ("gearsock_auth_total{outcome=\"refused\",reason=\"too_long\"}", "a token over 8 KiB (jwt.rs)"),
    (
        "gearsock_auth_total{outcome=\"refused\",reason=\"malformed\"}",
        "a token that is not three base64url parts (tests/access.rs)",
    ),
    ("gearsock_auth_total{outcome=\"refused\",reason=\"alg\"}", "alg none (tests/access.rs)"),
    (
        "gearsock_auth_total{outcome=\"refused\",reason=\"bad_signature\"}",
        "a tampered token or a wrong key (tests/access.rs)",
    ),
    ("gearsock_auth_total{outcome=\"refused\",reason=\"expired\"}", "a token past exp (tests/access.rs)"),
    ("gearsock_auth_total{outcome=\"refused\",reason=\"not_yet_valid\"}", "a token before nbf (jwt.rs)"),
    (
        "gearsock_auth_total{outcome=\"refused\",reason=\"bad_claim\"}",
        "a token without sub (jwt.rs); an auth to a server without tokens",
    ),
    (
        "gearsock_auth_total{outcome=\"refused\",reason=\"other_subject\"}",
        "a refresh with another sub (tests/access.rs)",
    ),
    (
        "gearsock_auth_total{outcome=\"refused\",reason=\"per_subject\"}",
        "over --max-connections-per-subject (tests/access.rs)",
    ),
    ("gearsock_auth_total{outcome=\"refused\",reason=\"timeout\"}", "no token by --handshake-timeout-ms"),
    ("gearsock_access_refused_total{what=\"unauthorized\"}", "a message before a token (tests/access.rs)"),
    (
        "gearsock_access_refused_total{what=\"function\"}",
        "a submit no --allow-function allows (tests/access.rs)",
    ),
    ("gearsock_access_refused_total{what=\"rate_limited\"}", "over --max-jobs-per-second (tests/access.rs)"),
    (
        "gearsock_access_refused_total{what=\"per_ip\"}",
        "over --max-connections-per-ip: 429 (tests/access.rs)",
    ),
    (
        "gearsock_access_refused_total{what=\"per_subject\"}",
        "over --max-connections-per-subject (tests/access.rs)",
    ),
    ("gearsock_jobs_submitted_total{mode=\"stream\"}", "a stream submit"),
    ("gearsock_jobs_submitted_total{mode=\"background\"}", "a background submit"),
    ("gearsock_jobs_submitted_total{mode=\"ping\"}", "the article's ping"),
    ("gearsock_jobs_finished_total{mode=\"stream\",outcome=\"complete\"}", "WORK_COMPLETE"),
    (
        "gearsock_jobs_finished_total{mode=\"stream\",outcome=\"failed\"}",
        "WORK_FAIL, an oversized result, a lost link",
    ),
    ("gearsock_jobs_finished_total{mode=\"stream\",outcome=\"exception\"}", "WORK_EXCEPTION"),
    ("gearsock_jobs_finished_total{mode=\"stream\",outcome=\"lost\"}", "SIGTERM while it runs"),
    (
        "gearsock_jobs_finished_total{mode=\"stream\",outcome=\"rejected\"}",
        "gearmand answers the submit with ERROR",
    ),
    (
        "gearsock_jobs_finished_total{mode=\"stream\",outcome=\"unavailable\"}",
        "no gearmand within --queue-timeout-ms",
    ),
    ("gearsock_jobs_finished_total{mode=\"stream\",outcome=\"abandoned\"}", "its client leaves first"),
    ("gearsock_jobs_finished_total{mode=\"background\",outcome=\"complete\"}", "a poll finds it done"),
    ("gearsock_jobs_finished_total{mode=\"background\",outcome=\"lost\"}", "its link is lost, or SIGTERM"),
    (
        "gearsock_jobs_finished_total{mode=\"background\",outcome=\"rejected\"}",
        "gearmand answers the submit with ERROR",
    ),
    (
        "gearsock_jobs_finished_total{mode=\"background\",outcome=\"unavailable\"}",
        "no gearmand within --queue-timeout-ms",
    ),
    ("gearsock_jobs_finished_total{mode=\"background\",outcome=\"abandoned\"}", "its client leaves first"),
    ("gearsock_jobs_finished_total{mode=\"ping\",outcome=\"done\"}", "the article's ping with a worker"),
    ("gearsock_jobs_finished_total{mode=\"ping\",outcome=\"lost\"}", "its link is lost, or SIGTERM"),
    (
        "gearsock_jobs_finished_total{mode=\"ping\",outcome=\"rejected\"}",
        "gearmand answers the submit with ERROR",
    ),
    (
        "gearsock_jobs_finished_total{mode=\"ping\",outcome=\"unavailable\"}",
        "no gearmand within --queue-timeout-ms",
    ),
    ("gearsock_jobs_finished_total{mode=\"ping\",outcome=\"abandoned\"}", "its client leaves first"),
    ("gearsock_jobs_in_flight", "gauge"),
    ("gearsock_jobs_queued", "gauge"),
    ("gearsock_stored_values", "gauge"),
    ("gearsock_stored_value_bytes", "gauge"),
    ("gearsock_jobs_detached", "gauge"),
    ("gearsock_job_log_bytes", "gauge"),
    ("gearsock_attaches_total{outcome=\"ok\"}", "an attach that misses nothing (tests/resume.rs)"),
    ("gearsock_attaches_total{outcome=\"unknown\"}", "an attach with a wrong or expired token"),
    ("gearsock_attaches_total{outcome=\"gap\"}", "an attach to a trimmed log (tests/resume.rs)"),
    ("gearsock_attaches_total{outcome=\"taken_over\"}", "an attach from another connection"),
    ("gearsock_events_replayed_total", "an attach to a job with events kept"),
    ("gearsock_detached_abandoned_total{reason=\"grace\"}", "--detach-grace-ms passes (tests/resume.rs)"),
    (
        "gearsock_detached_abandoned_total{reason=\"log_total\"}",
        "--job-log-total-bytes reached (app::attach tests)",
    ),
    ("gearsock_client_output_bytes", "gauge"),
    (
        "gearsock_relay_messages_total{direction=\"sent\"}",
        "an attach on another instance (tests/resume_scale.rs)",
    ),
    (
        "gearsock_relay_messages_total{direction=\"received\"}",
        "the owner's answer to it (tests/resume_scale.rs)",
    ),
    (
        "gearsock_relay_events_total{direction=\"sent\"}",
        "a job attached from another instance (tests/resume_scale.rs)",
    ),
    (
        "gearsock_relay_events_total{direction=\"received\"}",
        "its texts handed to the client (tests/resume_scale.rs)",
    ),
    ("gearsock_relays_open{side=\"requester\"}", "gauge"),
    ("gearsock_relays_open{side=\"owner\"}", "gauge"),
    ("gearsock_slow_readers_dropped_total", "a client that stops reading (tests/bounds_loop.rs)"),
    ("gearsock_message_timeouts_total", "half a message past --message-timeout-ms (tests/bounds_loop.rs)"),
    (
        "gearsock_input_total_dropped_total",
        "unfinished input past --client-in-total-bytes (tests/bounds_loop.rs)",
    ),
    ("gearsock_echoed_messages_total", "--echo: any message"),
    ("gearsock_echoed_bytes_total", "--echo: any message"),
    ("gearsock_gearmand_up{server=\"*\",state=\"connected\"}", "gauge"),
    ("gearsock_gearmand_up{server=\"*\",state=\"stalled\"}", "gauge"),
    ("gearsock_gearmand_up{server=\"*\",state=\"connecting\"}", "gauge"),
    ("gearsock_gearmand_up{server=\"*\",state=\"resolving\"}", "gauge"),
    ("gearsock_gearmand_up{server=\"*\",state=\"disconnected\"}", "gauge"),
    ("gearsock_gearmand_connects_total", "gearmand answers"),
    ("gearsock_gearmand_disconnects_total", "gearmand is lost after it was up (tests/kills.rs)"),
    ("gearsock_gearmand_connect_failures_total", "gearmand cannot be reached (tests/operations.rs)"),
    ("gearsock_gearmand_retired_total", "--max-orphans reached (tests/bounds_app.rs)"),
    ("gearsock_reports_forwarded_total{outcome=\"sent\"}", "a report for another instance's job"),
    ("gearsock_reports_forwarded_total{outcome=\"refused\"}", "gearmand refuses the forwarding job"),
    (
        "gearsock_reports_received_total{outcome=\"delivered\"}",
        "another instance forwards a report for our job",
    ),
    ("gearsock_reports_received_total{outcome=\"no_job\"}", "... for a job we no longer have"),
    ("gearsock_timers_armed", "gauge"),
    ("gearsock_loop_iterations_total", "every pass of the loop"),
];

#[test]
fn every_exported_series_can_move_or_is_a_gauge() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let s = Server::start(&nobody, &[]);
    let text = ask(s.addr, "GET", "/metrics");
    let (_, body) = text.split_once("\r\n\r\n").expect("a body");
    let server = format!("server=\"{nobody}\"");
    let exported: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(series, _)| series).replace(&server, "server=\"*\""))
        .collect();
    let listed: Vec<String> = SERIES.iter().map(|(series, _)| series.to_string()).collect();
    let unexplained: Vec<&String> = exported.iter().filter(|s| !listed.contains(s)).collect();
    let gone: Vec<&String> = listed.iter().filter(|s| !exported.contains(s)).collect();
    assert!(unexplained.is_empty(), "exported with no scenario or reason: {unexplained:?}");
    assert!(gone.is_empty(), "listed here but no longer exported: {gone:?}");
    // A gauge is only a gauge if /metrics says so.
    for (series, why) in SERIES.iter().filter(|(_, why)| *why == "gauge") {
        let name = series.split('{').next().unwrap_or(series);
        assert!(body.contains(&format!("# TYPE {name} gauge")), "{series}: {why}");
    }
}
