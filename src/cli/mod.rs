//! The command line: every subcommand's flags, parsed into a [`Command`] for `main.rs` to run.
//! It reads no socket and starts nothing. The settings it fills (`Config`, `WorkerOptions`,
//! `SubmitOptions`, `BenchOptions`) live with what they configure; nothing imports this module
//! but `main.rs`.

use std::time::Duration;

#[cfg(feature = "bench")]
use crate::bench::BenchOptions;
use crate::config::{Config, GroupChild};
use crate::gearman::client::Priority;
use crate::submit::SubmitOptions;
use crate::worker::WorkerOptions;

#[cfg(feature = "bench")]
mod bench;
mod check;
mod env;
mod token;

/// What `gearsock` was asked to do.
#[derive(Debug)]
pub enum Command {
    /// `gearsock serve` (also plain `gearsock`).
    Serve(Box<Config>),
    /// `gearsock worker`: the article's ping worker.
    Worker(WorkerOptions),
    /// `gearsock submit FUNCTION [PAYLOAD]`: the article's gearman-client.
    Submit(SubmitOptions),
    /// `gearsock token`: print a signed client token.
    Token(crate::mint::TokenOptions),
    /// `gearsock bench MODE`: the load generator (a build with the `bench` feature).
    #[cfg(feature = "bench")]
    Bench(Box<BenchOptions>),
    /// `--help` for some command: print this and exit 0.
    Help(String),
}

const SERVE_HELP: &str = "\
gearsock serve: WebSocket clients run jobs on Gearman workers and watch them live

usage: gearsock [serve] [flags]

  --listen ADDR              listen here (127.0.0.1:8080; :PORT is every address, port 0 picks one)
  --gearmand HOST:PORT       a gearmand server, repeatable (127.0.0.1:4730)
  --admin-listen ADDR        serve /metrics, /livez, /readyz, /healthz here only (none: on --listen)
  --no-demo-page             no demo page at / on --listen
  --poll-interval-ms N       background job status poll (100)
  --worker-token T           worker.complete must carry \"token\": T (default: loopback peers only)
  --worker-token-file PATH   the same, read from a file (keeps it off the command line)
  --max-connections N        open client connections (open-file limit - 64)
  --max-message-bytes N      largest WebSocket message, close 1009 beyond (65536)
  --max-frame-bytes N        largest WebSocket frame (65536)
  --handshake-timeout-ms N   to finish the HTTP request/upgrade (10000)
  --idle-timeout-ms N        ping after this much silence, close after twice (60000)
  --client-out-soft-bytes N  a reader may stay above this backlog for --client-out-soft-ms (4194304)
  --client-out-soft-ms N     ... this long, then it is dropped with close 1008 (10000)
  --client-out-hard-bytes N  backlog that drops a reader at once (33554432; alias --client-out-limit-bytes)
  --client-out-total-bytes N backlog of all clients; past it the largest is dropped (1073741824)
  --allowed-origin ORIGIN    allow this Origin (repeatable; default any); requests without
                             Origin (not a browser) are not refused
  --public-origin ORIGIN     an origin our page is also served under, e.g. behind a proxy
                             (repeatable; the listening address always counts, Host never)
  --message-timeout-ms N     a message must be whole this long after its first frame (30000)
  --client-in-total-bytes N  unfinished input of all clients; past it the largest is dropped (268435456)
  --max-jobs-per-connection N  unfinished jobs per connection (64)
  --value-grace-ms N         wait this long for a worker.complete value (500)
  --detach-grace-ms N        keep a job whose client left, or its ended log, for an attach (30000; 0: abandon at once)
  --job-log-bytes N          bytes of events kept per job for an attach (262144)
  --job-log-total-bytes N    bytes of events kept for all jobs, 1200 more per detached job;
                             detached ones go first (268435456)
  --value-ttl-ms N           keep unclaimed values this long (60000)
  --queue-limit N            submissions held while no gearmand is up (1024)
  --queue-timeout-ms N       how long a held submission waits (10000)
  --reconnect-min-ms N       first gearmand reconnect delay (100)
  --reconnect-max-ms N       largest gearmand reconnect delay (5000)
  --gearmand-timeout-ms N    connect, probe and stalled-write timeout per gearmand (5000)
  --max-job-bytes N          largest gearmand packet; a bigger one fails its job only (16777216)
  --max-orphans N            abandoned stream jobs per gearmand connection before it is retired (1024)
  --max-background-per-peer N  unfinished background jobs and pings per peer address (1024)
  --shared-uniques           pass clients' unique ids through unchanged (coalesce across clients)
  --max-stored-bytes N       total bytes of unclaimed worker.complete values (8388608)
  --log-level LEVEL          off, error, warn, info, debug, trace (info)
  --env-file PATH            GEARSOCK_* settings, one KEY=VALUE a line, read at start and on SIGHUP
                             (below flags, above the environment; every flag is also GEARSOCK_FLAG)
  --print-config             print every setting in effect and where it came from, then exit
  --echo                     echo mode: send every text and binary message back as it came; no
                             job protocol, no gearmand (cannot be combined with --gearmand); the
                             output limits grow to hold at least one echoed message
  --instance-id ID           this instance's name among those sharing a gearmand (random); its
                             uniques start with it and it takes reports for them forwarded by
                             others as function gearsock.report.ID
  --processes N              event-loop processes sharing the port with SO_REUSEPORT (1)
  --peer-instance ID         another instance on this gearmand that attaches may be relayed to
                             (repeatable; the other processes of a group always are)
  --relay-answer-ms N        how long a job's instance has to answer a relayed attach (5000)
  --allow-function PATTERN   a function clients may submit: exact, or a prefix ending in *
                             (repeatable; default none: submit is forbidden; gearsock.* never)
  --no-ping                  refuse the article's {\"type\":\"ping\"} (allowed by default)
  --client-token-key-file P  clients must authenticate with an HS256 token signed by a secret
                             of this file (one per line, >= 32 bytes; default: no tokens)
  --token-leeway-s N         clock skew allowed on exp, nbf, iat (30)
  --max-jobs-per-second N    submits and pings per connection, or per token subject (0: off)
  --jobs-burst N             ... with a bucket of N (default: the rate)
  --max-connections-per-ip N open WebSockets per peer address; one more gets 429 (0: off)
  --max-connections-per-subject N  authenticated connections per token subject (0: off)
  --sched-batch              run the loop under SCHED_BATCH: its wake-ups do not preempt a
                             gearmand on the same CPU, so it reads replies in batches (Linux)
  -h, --help                 this text
  -V, --version              the version
";

const WORKER_HELP: &str = "\
gearsock worker: the article's ping worker

usage: gearsock worker [flags]

  --gearmand HOST:PORT   gearmand to take jobs from (127.0.0.1:4730)
  --report URL           where worker.complete goes (ws://127.0.0.1:8080)
  --no-report            do not report over WebSocket
  --worker-token T       send \"token\": T with worker.complete
  --worker-token-file P  the same, read from a file
  --count N              pings per job (5)
  --interval-ms N        pause after each ping (1000)
  --concurrency N        jobs run at once, one connection each (1)
  --function NAME        function to register (ping)
  -h, --help             this text
  -V, --version          the version
";

const SUBMIT_HELP: &str = "\
gearsock submit: the article's gearman-client

usage: gearsock submit FUNCTION [PAYLOAD] [flags]   (PAYLOAD defaults to \"noop\")

  --gearmand HOST:PORT   (127.0.0.1:4730)
  --background           submit in the background and poll its status, printing `checking`
  --priority P           low, normal or high (normal)
  --unique U             unique id (none)
  --poll-interval-ms N   background status poll (1000, as the article's sleep(1))
  -h, --help             this text
  -V, --version          the version
";

const TOP_HELP: &str = "\
gearsock: WebSocket clients run jobs on Gearman workers and watch them live

usage: gearsock [COMMAND] [flags]

commands:
  serve     the WebSocket server (the default)
  worker    the article's ping worker
  submit    submit a job to gearmand directly (the article's client)
  token     print a signed client token (development, tests, curl)
  bench     load generator: connect, roundtrip, jobs, mixed, churn, flood

`gearsock COMMAND --help` lists each command's flags; `gearsock --version` the version.
";

/// `--version`: the program and its version.
pub(crate) const VERSION: &str = concat!("gearsock ", env!("CARGO_PKG_VERSION"), "\n");

/// Turns `std::env::args_os()` (without the program name) into a [`Command`], with `serve`'s
/// settings also from the environment (`GEARSOCK_*`) and `--env-file`.
pub fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Command, String> {
    parse_args_env(args, std::env::vars().collect())
}

/// [`parse_args`] with this environment.
pub fn parse_args_env(args: Vec<std::ffi::OsString>, vars: Vec<(String, String)>) -> Result<Command, String> {
    let first = args.first().and_then(|a| a.to_str()).unwrap_or("");
    let (name, rest) = match first {
        "serve" | "worker" | "submit" | "token" | "bench" => (first.to_string(), args[1..].to_vec()),
        "-h" | "--help" | "help" => return Ok(Command::Help(TOP_HELP.into())),
        "-V" | "--version" => return Ok(Command::Help(VERSION.into())),
        // Flags alone (or nothing) mean `serve`; a word that names no command is a typo, not
        // an argument of `serve`.
        _ if first.is_empty() || first.starts_with('-') => ("serve".to_string(), args),
        other => {
            return Err(format!(
                "gearsock: unknown command {other:?}: expected serve, worker, submit, token or bench \
                 (gearsock --help)"
            ));
        }
    };
    if name == "serve" {
        return serve_with_env(rest, vars).map_err(|e| format!("gearsock serve: {e}"));
    }
    let mut parser = lexopt::Parser::from_args(rest);
    match name.as_str() {
        "worker" => parse_worker(&mut parser),
        "submit" => parse_submit(&mut parser),
        "token" => token::parse_token(&mut parser),
        #[cfg(feature = "bench")]
        _ => bench::parse_bench(&mut parser),
        #[cfg(not(feature = "bench"))]
        _ => Err("this build has no load generator: it was built without the `bench` feature \
                  (a default build has it)"
            .to_string()),
    }
    .map_err(|e| format!("gearsock {name}: {e}"))
}

/// `serve`: the environment and `--env-file` turned into flags before the command line's, then
/// one parse; `--print-config` lists the result instead of serving.
fn serve_with_env(mut args: Vec<std::ffi::OsString>, vars: Vec<(String, String)>) -> Result<Command, String> {
    let print = args.iter().any(|a| a == "--print-config");
    args.retain(|a| a != "--print-config");
    let env_file = env::flag_value(&args, "env-file")
        .or_else(|| vars.iter().find(|(k, _)| k == "GEARSOCK_ENV_FILE").map(|(_, v)| v.clone()));
    if let Some(at) = args.iter().position(|a| a == "--env-file") {
        args.drain(at..(at + 2).min(args.len()));
    }
    args.retain(|a| !a.to_str().is_some_and(|a| a.starts_with("--env-file=")));
    let file = match &env_file {
        Some(path) => Some((path.as_str(), env::read_env_file(path)?)),
        None => None,
    };
    let (args, sources) = env::with_env(SERVE_HELP, args, vars, file)?;
    let command = parse_serve(&mut lexopt::Parser::from_args(args.clone()))?;
    match command {
        Command::Serve(_) if print => Ok(Command::Help(env::print_config(SERVE_HELP, &args, &sources))),
        other => Ok(other),
    }
}

/// Parses the value of the current flag.
pub(crate) fn value<T: std::str::FromStr>(parser: &mut lexopt::Parser) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let raw = parser.value().map_err(|e| e.to_string())?;
    let text = raw.to_str().ok_or("flag value is not UTF-8")?;
    text.parse::<T>().map_err(|e| format!("{text:?}: {e}; expected {}", expected::<T>()))
}

/// What a flag of type `T` takes, for its error.
fn expected<T>() -> &'static str {
    match std::any::type_name::<T>() {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number",
        "f64" | "f32" => "a number",
        "bool" => "true or false",
        _ => "a valid value",
    }
}

/// The flag an error during its parsing is about (`--name`, `-x`), empty for a positional.
fn flag_name(arg: &lexopt::Arg) -> String {
    match arg {
        lexopt::Arg::Long(name) => format!("--{name}"),
        lexopt::Arg::Short(c) => format!("-{c}"),
        lexopt::Arg::Value(_) => String::new(),
    }
}

/// Runs `parse` and names in its error the flag being parsed when it failed, unless the error
/// names its flags itself (checks after the last flag, which start with `--`).
fn naming_flag(
    parser: &mut lexopt::Parser,
    parse: impl FnOnce(&mut lexopt::Parser, &mut String) -> Result<Command, String>,
) -> Result<Command, String> {
    let mut flag = String::new();
    parse(parser, &mut flag)
        .map_err(|e| if flag.is_empty() || e.starts_with("--") { e } else { format!("{flag} {e}") })
}

/// A token read from the file named by the flag's value, without its trailing newline (as
/// `echo T > file` or a systemd credential leaves it). An empty file is an error.
fn token_file(parser: &mut lexopt::Parser) -> Result<String, String> {
    let path: String = value(parser)?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let token = text.trim_end_matches(['\n', '\r']);
    if token.trim().is_empty() {
        return Err(format!("{path} holds no token"));
    }
    Ok(token.to_string())
}

/// `--client-token-key-file`: the file's text, refused at start when it cannot be read or
/// holds a secret under 32 bytes (a short HS256 key can be brute-forced).
fn key_file(parser: &mut lexopt::Parser) -> Result<String, String> {
    let path: String = value(parser)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("--client-token-key-file {path}: cannot read it: {e}"))?;
    crate::jwt::Keys::parse(&text).map_err(|e| format!("--client-token-key-file {path}: {e}"))?;
    Ok(text)
}

fn millis(parser: &mut lexopt::Parser) -> Result<Duration, String> {
    value::<u64>(parser).map(Duration::from_millis)
}

fn parse_serve(parser: &mut lexopt::Parser) -> Result<Command, String> {
    naming_flag(parser, serve_flags)
}

fn serve_flags(parser: &mut lexopt::Parser, flag: &mut String) -> Result<Command, String> {
    use lexopt::Arg::Long;
    let mut c = Config::default();
    let mut gearmand = Vec::new();
    let (mut group_slot, mut group_board) = (None, None);
    let (mut token_flags, mut soft_bytes) = (Vec::new(), None);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        *flag = flag_name(&arg);
        match arg {
            Long("listen") => c.listen = check::listen_addr(&value::<String>(parser)?)?,
            Long("admin-listen") => c.admin_listen = Some(check::listen_addr(&value::<String>(parser)?)?),
            Long("no-demo-page") => c.demo_page = false,
            Long("gearmand") => gearmand.push(value::<String>(parser)?),
            Long("poll-interval-ms") => c.poll_interval = millis(parser)?,
            Long(name @ ("worker-token" | "worker-token-file")) => {
                token_flags.push(name.to_string());
                c.worker_token =
                    Some(if name == "worker-token" { value(parser)? } else { token_file(parser)? });
            }
            Long("max-connections") => c.max_connections = value(parser)?,
            Long("max-message-bytes") => c.max_message_bytes = value(parser)?,
            Long("max-frame-bytes") => c.max_frame_bytes = value(parser)?,
            Long("handshake-timeout-ms") => c.handshake_timeout = millis(parser)?,
            Long("idle-timeout-ms") => c.idle_timeout = millis(parser)?,
            Long("client-out-limit-bytes" | "client-out-hard-bytes") => {
                c.client_out_hard_bytes = value(parser)?
            }
            Long("client-out-soft-bytes") => soft_bytes = Some(value(parser)?),
            Long("client-out-soft-ms") => c.client_out_soft_time = millis(parser)?,
            Long("client-out-total-bytes") => c.client_out_total_bytes = value(parser)?,
            Long("gearmand-timeout-ms") => c.gearmand_timeout = millis(parser)?,
            Long("max-job-bytes") => c.max_job_bytes = value(parser)?,
            Long("max-orphans") => c.max_orphans = value(parser)?,
            Long("max-background-per-peer") => c.max_background_per_peer = value(parser)?,
            Long("shared-uniques") => c.shared_uniques = true,
            Long("max-stored-bytes") => c.max_stored_bytes = value(parser)?,
            Long("allowed-origin") => c.allowed_origins.push(value(parser)?),
            Long("max-jobs-per-connection") => c.max_jobs_per_connection = value(parser)?,
            Long("value-grace-ms") => c.value_grace = millis(parser)?,
            Long("detach-grace-ms") => c.detach_grace = millis(parser)?,
            Long("job-log-bytes") => c.job_log_bytes = value(parser)?,
            Long("job-log-total-bytes") => c.job_log_total_bytes = value(parser)?,
            Long("value-ttl-ms") => c.value_ttl = millis(parser)?,
            Long("queue-limit") => c.queue_limit = value(parser)?,
            Long("queue-timeout-ms") => c.queue_timeout = millis(parser)?,
            Long("reconnect-min-ms") => c.reconnect_min = millis(parser)?,
            Long("reconnect-max-ms") => c.reconnect_max = millis(parser)?,
            Long("log-level") => c.log_level = check::log_level(&value::<String>(parser)?)?,
            Long("echo") => c.echo = true,
            Long("instance-id") => c.instance_id = Some(value(parser)?),
            Long("processes") => c.processes = value(parser)?,
            Long("peer-instance") => c.peer_instances.push(value(parser)?),
            Long("relay-answer-ms") => c.relay_answer = millis(parser)?,
            // Internal, not in --help: what the supervisor of a group passes to each child.
            Long("group-slot") => group_slot = Some(value(parser)?),
            Long("group-board") => group_board = Some(value(parser)?),
            Long("sched-batch") => c.sched_batch = true,
            // Issue 18 (bounds in the loop): unfinished messages and the server's own origins.
            Long("message-timeout-ms") => c.message_timeout = millis(parser)?,
            Long("client-in-total-bytes") => c.client_in_total_bytes = value(parser)?,
            Long("public-origin") => c.public_origins.push(value(parser)?),
            // Issue 19 (who may run what): the allow-list, client tokens, quotas.
            Long("allow-function") => c.allow_functions.push(value(parser)?),
            Long("no-ping") => c.no_ping = true,
            Long("client-token-key-file") => c.client_token_keys = Some(key_file(parser)?),
            Long("token-leeway-s") => c.token_leeway_s = value(parser)?,
            Long("max-jobs-per-second") => c.max_jobs_per_second = value(parser)?,
            Long("jobs-burst") => c.jobs_burst = value(parser)?,
            Long("max-connections-per-ip") => c.max_connections_per_ip = value(parser)?,
            Long("max-connections-per-subject") => c.max_connections_per_subject = value(parser)?,
            Long("help") | lexopt::Arg::Short('h') => return Ok(Command::Help(SERVE_HELP.into())),
            Long("version") | lexopt::Arg::Short('V') => return Ok(Command::Help(VERSION.into())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    flag.clear(); // from here on, each error names its flags
    if token_flags.len() > 1 {
        return Err(format!(
            "--worker-token and --worker-token-file: give one of them, once (got {})",
            token_flags.join(", ")
        ));
    }
    if c.echo && !gearmand.is_empty() {
        return Err("--echo connects to no gearmand: drop --gearmand".into());
    }
    if !gearmand.is_empty() {
        c.gearmand = gearmand;
    }
    c.group_child = match (group_slot, group_board) {
        (Some(slot), Some(board_fd)) => Some(GroupChild { slot, board_fd }),
        (None, None) => None,
        _ => return Err("--group-slot and --group-board are internal and go together".into()),
    };
    // A smaller message limit must not be undercut by the frame default.
    c.max_frame_bytes = c.max_frame_bytes.min(c.max_message_bytes);
    c.client_in_limit_bytes = c.max_frame_bytes + 14;
    // A hard limit given alone (the old --client-out-limit-bytes) pulls the default soft one
    // down with it; a soft one given above it is refused by `validate`.
    c.client_out_soft_bytes = soft_bytes.unwrap_or(c.client_out_soft_bytes.min(c.client_out_hard_bytes));
    if c.echo {
        c.fit_output_limits_to_echo();
    }
    c.validate()?;
    Ok(Command::Serve(Box::new(c)))
}

fn parse_worker(parser: &mut lexopt::Parser) -> Result<Command, String> {
    naming_flag(parser, worker_flags)
}

fn worker_flags(parser: &mut lexopt::Parser, flag: &mut String) -> Result<Command, String> {
    use lexopt::Arg::Long;
    let mut o = WorkerOptions::default();
    let mut token_flags = 0;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        *flag = flag_name(&arg);
        match arg {
            Long("gearmand") => o.gearmand = value(parser)?,
            Long("report") => o.report = Some(check::report_url(&value::<String>(parser)?)?),
            Long("no-report") => o.report = None,
            Long("worker-token") => (o.worker_token, token_flags) = (Some(value(parser)?), token_flags + 1),
            Long("worker-token-file") => {
                (o.worker_token, token_flags) = (Some(token_file(parser)?), token_flags + 1)
            }
            Long("count") => o.count = value(parser)?,
            Long("interval-ms") => o.interval_ms = value(parser)?,
            Long("concurrency") => o.concurrency = value(parser)?,
            Long("function") => o.function = value(parser)?,
            Long("help") | lexopt::Arg::Short('h') => return Ok(Command::Help(WORKER_HELP.into())),
            Long("version") | lexopt::Arg::Short('V') => return Ok(Command::Help(VERSION.into())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    flag.clear();
    check::host_port("--gearmand", &o.gearmand)?;
    if token_flags > 1 {
        return Err("--worker-token and --worker-token-file: give one of them, once".into());
    }
    for (name, n) in [("--concurrency", u64::from(o.concurrency)), ("--count", u64::from(o.count))] {
        if n == 0 {
            return Err(format!("{name} 0: runs nothing; expected at least 1"));
        }
    }
    Ok(Command::Worker(o))
}

/// Parses `low`, `normal` or `high`.
pub(crate) fn parse_priority(text: &str) -> Result<Priority, String> {
    match text {
        "low" => Ok(Priority::Low),
        "normal" => Ok(Priority::Normal),
        "high" => Ok(Priority::High),
        other => Err(format!("priority must be low, normal or high, not {other:?}")),
    }
}

fn parse_submit(parser: &mut lexopt::Parser) -> Result<Command, String> {
    use lexopt::Arg::{Long, Value};
    let mut o = SubmitOptions::default();
    let mut positional = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("gearmand") => o.gearmand = value(parser)?,
            Long("background") => o.background = true,
            Long("priority") => o.priority = parse_priority(&value::<String>(parser)?)?,
            Long("unique") => o.unique = value(parser)?,
            Long("poll-interval-ms") => o.poll_interval_ms = value(parser)?,
            Long("help") | lexopt::Arg::Short('h') => return Ok(Command::Help(SUBMIT_HELP.into())),
            Long("version") | lexopt::Arg::Short('V') => return Ok(Command::Help(VERSION.into())),
            Value(v) => positional.push(v.into_string().map_err(|_| "argument is not UTF-8")?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    let mut positional = positional.into_iter();
    o.function = positional.next().ok_or("FUNCTION is missing (try --help)")?;
    if let Some(payload) = positional.next() {
        o.payload = payload.into_bytes();
    }
    if positional.next().is_some() {
        return Err("too many arguments".into());
    }
    check::host_port("--gearmand", &o.gearmand)?;
    Ok(Command::Submit(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
        list.iter().map(Into::into).collect()
    }

    #[test]
    fn plain_gearsock_serves_with_the_article_defaults() {
        let Ok(Command::Serve(c)) = parse_args(args(&[])) else { panic!("not serve") };
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.gearmand, vec!["127.0.0.1:4730"]);
        assert_eq!(c.poll_interval, Duration::from_millis(100));
        assert!(!c.sched_batch, "the default scheduling policy unless asked");
        let Ok(Command::Serve(c)) = parse_args(args(&["serve", "--sched-batch"])) else {
            panic!("not serve")
        };
        assert!(c.sched_batch);
    }

    #[test]
    fn repeated_gearmand_and_limits_parse() {
        let parsed = parse_args(args(&[
            "serve",
            "--gearmand",
            "127.0.0.1:1",
            "--gearmand",
            "127.0.0.1:2",
            "--max-message-bytes",
            "1000",
        ]));
        let Ok(Command::Serve(c)) = parsed else { panic!("not serve") };
        assert_eq!(c.gearmand.len(), 2);
        assert_eq!(c.max_frame_bytes, 1000);
    }

    #[test]
    fn instance_ids_and_process_counts_are_checked() {
        let Ok(Command::Serve(c)) = parse_args(args(&["serve", "--instance-id", "eu-1", "--processes", "2"]))
        else {
            panic!("not serve")
        };
        assert_eq!((c.instance_id.as_deref(), c.processes), (Some("eu-1"), 2));
        for bad in ["a.b", "", "seventeen-chars-x", "é"] {
            assert!(parse_args(args(&["serve", "--instance-id", bad])).is_err(), "{bad:?} accepted");
        }
        assert!(parse_args(args(&["serve", "--processes", "0"])).is_err());
    }

    #[test]
    fn a_group_base_id_leaves_room_for_the_slot() {
        let serve = |list: &[&str]| parse_args(args(list)).map(|c| matches!(c, Command::Serve(_)));
        assert_eq!(serve(&["--instance-id", "abcdefghijklmn", "--processes", "2"]), Ok(true));
        let err = serve(&["--instance-id", "abcdefghijklmno", "--processes", "2"]).unwrap_err();
        assert!(err.contains("at most 14"), "{err}");
        assert!(serve(&["--instance-id", "abcdefghijklmn", "--processes", "11"]).is_err());
        // A child gets the full name and its seat.
        let Ok(Command::Serve(c)) = parse_args(args(&[
            "--instance-id",
            "abcdefghijklm-10",
            "--processes",
            "11",
            "--group-slot",
            "10",
            "--group-board",
            "5",
        ])) else {
            panic!("not serve")
        };
        assert_eq!(c.group_child, Some(GroupChild { slot: 10, board_fd: 5 }));
        assert!(serve(&["--processes", "2", "--group-slot", "2", "--group-board", "5"]).is_err());
        assert!(serve(&["--group-slot", "0"]).is_err(), "the slot without the board");
        assert!(!SERVE_HELP.contains("--group-"), "internal flags stay out of --help");
    }

    #[test]
    fn peers_are_the_groups_other_processes_and_each_peer_instance() {
        let vars = vec![("GEARSOCK_PEER_INSTANCE".to_string(), "eu,us-2".to_string())];
        let Ok(Command::Serve(c)) = parse_args_env(args(&["serve", "--relay-answer-ms", "700"]), vars) else {
            panic!("not serve")
        };
        assert_eq!(
            (c.known_peers(), c.relay_answer),
            (vec!["eu".into(), "us-2".into()], Duration::from_millis(700))
        );
        let Ok(Command::Serve(c)) = parse_args(args(&[
            "--instance-id",
            "g-1",
            "--processes",
            "3",
            "--group-slot",
            "1",
            "--group-board",
            "5",
            "--peer-instance",
            "far",
        ])) else {
            panic!("not serve")
        };
        assert_eq!(c.known_peers(), ["g-0", "g-2", "far"]);
        assert!(parse_args(args(&["serve", "--peer-instance", "a.b"])).is_err());
        assert!(parse_args(args(&["serve", "--relay-answer-ms", "0"])).is_err());
    }

    #[test]
    fn echo_mode_needs_no_gearmand_and_refuses_one() {
        let Ok(Command::Serve(c)) = parse_args(args(&["serve", "--echo"])) else { panic!("not serve") };
        assert!(c.echo);
        let err = parse_args(args(&["serve", "--echo", "--gearmand", "127.0.0.1:1"])).unwrap_err();
        assert!(err.contains("--gearmand"), "{err}");
    }

    #[test]
    fn echo_mode_output_limits_hold_the_largest_message() {
        let sixteen = (16 << 20).to_string();
        let flags = ["serve", "--echo", "--max-message-bytes", &sixteen, "--max-frame-bytes", &sixteen];
        let Ok(Command::Serve(c)) = parse_args(args(&flags)) else { panic!("not serve") };
        let echoed = (16 << 20) + 10;
        assert_eq!(c.client_out_soft_bytes, echoed);
        assert_eq!(c.client_out_hard_bytes, 2 * echoed + c.read_budget_bytes);
        assert_eq!(c.client_out_total_bytes, 1 << 30);
        // Limits that already hold it, and the job protocol's, are left alone.
        let Ok(Command::Serve(c)) = parse_args(args(&["serve", "--echo"])) else { panic!("not serve") };
        let d = Config::default();
        assert_eq!(
            (c.client_out_soft_bytes, c.client_out_hard_bytes),
            (d.client_out_soft_bytes, d.client_out_hard_bytes)
        );
        let Ok(Command::Serve(c)) = parse_args(args(&["serve", "--max-message-bytes", &sixteen])) else {
            panic!("not serve")
        };
        assert_eq!(c.client_out_soft_bytes, d.client_out_soft_bytes);
    }

    #[test]
    fn refusals_name_the_flag_the_value_and_what_is_valid() {
        let refused = |list: &[&str], want: &[&str]| {
            let err = parse_args(args(list)).map(|_| ()).unwrap_err();
            assert!(want.iter().all(|w| err.contains(w)), "{list:?}: {err}");
        };
        refused(&["--max-connections", "abc"], &["--max-connections \"abc\"", "whole number"]);
        refused(
            &["--client-out-soft-bytes", "100000000", "--client-out-hard-bytes", "10"],
            &["soft <= hard"],
        );
        refused(&["--worker-token", "a", "--worker-token-file", "Cargo.toml"], &["give one of them"]);
        refused(
            &["--log-level", "loud"],
            &["--log-level \"loud\"", "off, error, warn, info, debug or trace"],
        );
        refused(&["--gearmand", "127.0.0.1:abc"], &["--gearmand \"127.0.0.1:abc\"", "HOST:PORT"]);
        refused(&["--idle-timeout-ms", "0"], &["--idle-timeout-ms 0", "at least 1"]);
        refused(&["nonsense"], &["unknown command \"nonsense\""]);
        refused(&["worker", "--report", "wss://x"], &["--report \"wss://x\"", "ws://"]);
        refused(&["worker", "--concurrency", "0"], &["--concurrency 0"]);
        // A hard limit alone still pulls the default soft one down with it.
        let Ok(Command::Serve(c)) = parse_args(args(&["--client-out-hard-bytes", "1000"])) else { panic!() };
        assert_eq!(c.client_out_soft_bytes, 1000);
        let Ok(Command::Serve(c)) = parse_args(args(&["--listen", ":0"])) else { panic!("not serve") };
        assert_eq!(c.listen.port(), 0);
        let Ok(Command::Help(top)) = parse_args(args(&["--help"])) else { panic!("not help") };
        for word in ["serve", "worker", "submit", "token", "connect, roundtrip, jobs, mixed, churn, flood"] {
            assert!(top.contains(word), "{word}");
        }
    }

    #[test]
    fn over_the_file_limit_is_refused() {
        let parsed = parse_args(args(&["--max-connections", "100000000"]));
        assert!(parsed.unwrap_err().contains("open-file limit"));
    }

    #[test]
    fn submit_takes_function_and_payload() {
        let Ok(Command::Submit(o)) = parse_args(args(&["submit", "ping", "--background"])) else {
            panic!("not submit")
        };
        assert_eq!((o.function.as_str(), o.payload.as_slice(), o.background), ("ping", &b"noop"[..], true));
    }

    #[test]
    fn a_token_comes_from_a_file_and_is_never_empty() {
        let path = std::env::temp_dir().join(format!("gearsock-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let file = path.to_str().unwrap();
        let Ok(Command::Serve(c)) = parse_args(args(&["--worker-token-file", file])) else {
            panic!("not serve")
        };
        assert_eq!(c.worker_token.as_deref(), Some("s3cret"));
        let Ok(Command::Worker(o)) = parse_args(args(&["worker", "--worker-token-file", file])) else {
            panic!("not worker")
        };
        assert_eq!(o.worker_token.as_deref(), Some("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(parse_args(args(&["--worker-token-file", file])).unwrap_err().contains("holds no token"));
        std::fs::remove_file(&path).unwrap();
        assert!(parse_args(args(&["--worker-token-file", file])).unwrap_err().contains("cannot read"));
        assert!(parse_args(args(&["--worker-token", ""])).unwrap_err().contains("empty"));
    }
}
