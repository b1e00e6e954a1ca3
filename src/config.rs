//! `Config`: every limit, timeout and address of `gearsock serve`, with its default and the reason
//! it exists, checked once by `validate()` at startup and then passed by reference.
//!
//! This module also turns the command line into a [`Command`]. It reads no socket and starts
//! nothing: `main.rs` runs what it returns.

use std::net::SocketAddr;
use std::time::Duration;

use crate::bench::BenchOptions;
use crate::gearman::client::Priority;
use crate::submit::SubmitOptions;
use crate::worker::WorkerOptions;

/// What `gearsock` was asked to do.
#[derive(Debug)]
pub enum Command {
    /// `gearsock serve` (also plain `gearsock`).
    Serve(Box<Config>),
    /// `gearsock worker`: the article's ping worker.
    Worker(WorkerOptions),
    /// `gearsock submit FUNCTION [PAYLOAD]`: the article's gearman-client.
    Submit(SubmitOptions),
    /// `gearsock bench MODE`: the load generator.
    Bench(Box<BenchOptions>),
    /// `--help` for some command: print this and exit 0.
    Help(String),
}

/// The server's configuration. Each field says its default and why it exists.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the WebSocket/HTTP listener binds. Default `127.0.0.1:8080`, the article's address.
    pub listen: SocketAddr,
    /// The gearmand servers, `HOST:PORT` each. Default `127.0.0.1:4730` (IANA's Gearman port).
    pub gearmand: Vec<String>,
    /// How often a background job's status is polled. Default 100 ms, the article's timer.
    pub poll_interval: Duration,
    /// When set, `worker.complete` must carry `"token": T` (from any peer); when unset only
    /// loopback peers may report values. Default unset.
    pub worker_token: Option<String>,
    /// Open client connections at most. Default: the process's open-file limit minus
    /// `FD_RESERVE`, so that running out of descriptors cannot happen before the limit.
    pub max_connections: usize,
    /// Largest WebSocket message (close 1009 beyond it). Default 64 KiB.
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// A connection must finish its HTTP request or upgrade within this. Default 10 s: stops
    /// clients that connect and say nothing from holding a descriptor forever.
    pub handshake_timeout: Duration,
    /// With no traffic for this long the server pings; with none for twice this it closes
    /// (1001). Default 60 s: dead peers behind NAT are found.
    pub idle_timeout: Duration,
    /// Bytes queued for one client above which it is dropped at once (the hard limit of a
    /// Redis-style soft/hard pair). Default 32 MiB: bounds memory per client whatever it does.
    pub client_out_hard_bytes: usize,
    /// Bytes queued for one client that it may stay above for `client_out_soft_time` before it
    /// is dropped. Default 4 MiB: a reader that keeps up with a burst is never dropped for it.
    pub client_out_soft_bytes: usize,
    /// How long a client may stay above the soft limit. Default 10 s.
    pub client_out_soft_time: Duration,
    /// Bytes queued for all clients together; beyond it the largest backlog is dropped first.
    /// Default 1 GiB: the server's memory stays bounded however many readers stall.
    pub client_out_total_bytes: usize,
    /// Unparsed bytes held per client. Default 64 KiB plus one frame header: a peer that
    /// sends faster than we parse simply stops being read.
    pub client_in_limit_bytes: usize,
    /// Bytes read from one client per loop pass, so one busy client cannot starve the others.
    /// Default 64 KiB.
    pub read_budget_bytes: usize,
    /// tungstenite's read buffer per open connection. Default 512 B: an idle connection costs
    /// little; large messages just take more copies.
    pub ws_read_buffer_bytes: usize,
    /// `Origin` values allowed to open a WebSocket (exact match); empty allows any. Default empty.
    pub allowed_origins: Vec<String>,
    /// Jobs one connection may have unfinished. Default 64 (`too_many_jobs` beyond).
    pub max_jobs_per_connection: usize,
    /// How long a finished job waits for its `worker.complete` value. Default 500 ms.
    pub value_grace: Duration,
    /// How long a value nobody asked for is kept. Default 60 s.
    pub value_ttl: Duration,
    /// Stored values at most (oldest dropped beyond). Default 10,000.
    pub max_stored_values: usize,
    /// Submissions held while no gearmand is connected. Default 1,024 (`unavailable` beyond).
    pub queue_limit: usize,
    /// How long a held submission waits for a gearmand. Default 10 s (`unavailable` after).
    pub queue_timeout: Duration,
    /// First reconnect delay to a lost gearmand; doubles per failure. Default 100 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect delay. Default 5 s.
    pub reconnect_max: Duration,
    /// Largest Gearman packet body accepted from gearmand. A bigger WORK_* packet fails its own
    /// job only (its body is skipped as it streams). Default 16 MiB.
    pub max_job_bytes: usize,
    /// Bytes waiting for one gearmand above which no new job is routed to it (it counts as
    /// stalled). Default 4 MiB.
    pub gearman_out_high_bytes: usize,
    /// ... and below which it takes new jobs again. Default 1 MiB.
    pub gearman_out_low_bytes: usize,
    /// Connecting, an unanswered probe, or owed replies with no byte from gearmand for this
    /// long: the link is dead. Default 5 s.
    pub gearmand_timeout: Duration,
    /// Abandoned stream jobs one gearmand connection may hold before it is retired (a fresh
    /// connection takes new work; the old one closes once its live jobs end, and gearmand drops
    /// the orphans). Default 1024.
    pub max_orphans: usize,
    /// Pass clients' `unique` to gearmand unchanged, so that jobs coalesce across clients
    /// (Gearman's own behaviour). Default off: each client's uniques live in its own namespace.
    pub shared_uniques: bool,
    /// Total bytes of stored `worker.complete` values nobody has claimed yet. Default 8 MiB.
    pub max_stored_bytes: usize,
    /// After a server-initiated close, how long to wait for the peer to hang up. Default 2 s.
    pub close_timeout: Duration,
    /// Log level (`--log-level`). Default `info`.
    pub log_level: log::LevelFilter,
}

/// Descriptors kept back from `max_connections`: listener, poll, gearmand links, logs.
pub const FD_RESERVE: usize = 64;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            gearmand: vec!["127.0.0.1:4730".to_string()],
            poll_interval: Duration::from_millis(100),
            worker_token: None,
            max_connections: open_file_limit().saturating_sub(FD_RESERVE).max(1),
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            client_out_hard_bytes: 32 * 1024 * 1024,
            client_out_soft_bytes: 4 * 1024 * 1024,
            client_out_soft_time: Duration::from_secs(10),
            client_out_total_bytes: 1024 * 1024 * 1024,
            client_in_limit_bytes: 64 * 1024 + 14,
            read_budget_bytes: 64 * 1024,
            ws_read_buffer_bytes: 512,
            allowed_origins: Vec::new(),
            max_jobs_per_connection: 64,
            value_grace: Duration::from_millis(500),
            value_ttl: Duration::from_secs(60),
            max_stored_values: 10_000,
            queue_limit: 1024,
            queue_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_job_bytes: 16 * 1024 * 1024,
            gearman_out_high_bytes: 4 * 1024 * 1024,
            gearman_out_low_bytes: 1024 * 1024,
            gearmand_timeout: Duration::from_secs(5),
            max_orphans: 1024,
            shared_uniques: false,
            max_stored_bytes: 8 * 1024 * 1024,
            close_timeout: Duration::from_secs(2),
            log_level: log::LevelFilter::Info,
        }
    }
}

impl Config {
    /// Checks the limits against each other and against the machine.
    pub fn validate(&self) -> Result<(), String> {
        let files = open_file_limit();
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_connections.saturating_add(FD_RESERVE) > files {
            return Err(format!(
                "--max-connections {} does not fit the open-file limit {files} (keep {FD_RESERVE} spare)",
                self.max_connections
            ));
        }
        if self.gearmand.is_empty() {
            return Err("at least one --gearmand is needed".into());
        }
        if self.max_frame_bytes > self.max_message_bytes {
            return Err("--max-frame-bytes cannot exceed --max-message-bytes".into());
        }
        if self.max_message_bytes < 64 {
            return Err("--max-message-bytes must be at least 64".into());
        }
        if self.poll_interval.is_zero()
            || self.handshake_timeout.is_zero()
            || self.idle_timeout.is_zero()
            || self.gearmand_timeout.is_zero()
        {
            return Err("intervals and timeouts must be above zero".into());
        }
        if self.client_out_soft_bytes > self.client_out_hard_bytes
            || self.client_out_hard_bytes > self.client_out_total_bytes
        {
            return Err("client output limits must be soft <= hard <= total".into());
        }
        if self.max_job_bytes > u32::MAX as usize {
            return Err("--max-job-bytes is at most 4294967295 (Gearman's size field)".into());
        }
        if self.gearman_out_low_bytes > self.gearman_out_high_bytes {
            return Err("gearman output low water mark above the high one".into());
        }
        if self.reconnect_min > self.reconnect_max || self.reconnect_min.is_zero() {
            return Err("--reconnect-min-ms must be above zero and at most --reconnect-max-ms".into());
        }
        Ok(())
    }
}

/// The soft limit on open files of this process, from /proc (1024 if it cannot be read).
pub fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        })
        .unwrap_or(1024)
}

const SERVE_HELP: &str = "\
gearsock serve: WebSocket clients run jobs on Gearman workers and watch them live

usage: gearsock [serve] [flags]

  --listen ADDR              listen here (127.0.0.1:8080; port 0 picks one)
  --gearmand HOST:PORT       a gearmand server, repeatable (127.0.0.1:4730)
  --poll-interval-ms N       background job status poll (100)
  --worker-token T           worker.complete must carry \"token\": T (default: loopback peers only)
  --max-connections N        open client connections (open-file limit - 64)
  --max-message-bytes N      largest WebSocket message, close 1009 beyond (65536)
  --max-frame-bytes N        largest WebSocket frame (65536)
  --handshake-timeout-ms N   to finish the HTTP request/upgrade (10000)
  --idle-timeout-ms N        ping after this much silence, close after twice (60000)
  --client-out-soft-bytes N  a reader may stay above this backlog for --client-out-soft-ms (4194304)
  --client-out-soft-ms N     ... this long, then it is dropped with close 1008 (10000)
  --client-out-hard-bytes N  backlog that drops a reader at once (33554432; alias --client-out-limit-bytes)
  --client-out-total-bytes N backlog of all clients; past it the largest is dropped (1073741824)
  --allowed-origin ORIGIN    allow this Origin (repeatable; default any)
  --max-jobs-per-connection N  unfinished jobs per connection (64)
  --value-grace-ms N         wait this long for a worker.complete value (500)
  --value-ttl-ms N           keep unclaimed values this long (60000)
  --queue-limit N            submissions held while no gearmand is up (1024)
  --queue-timeout-ms N       how long a held submission waits (10000)
  --reconnect-min-ms N       first gearmand reconnect delay (100)
  --reconnect-max-ms N       largest gearmand reconnect delay (5000)
  --gearmand-timeout-ms N    connect, probe and stalled-write timeout per gearmand (5000)
  --max-job-bytes N          largest gearmand packet; a bigger one fails its job only (16777216)
  --max-orphans N            abandoned stream jobs per gearmand connection before it is retired (1024)
  --shared-uniques           pass clients' unique ids through unchanged (coalesce across clients)
  --max-stored-bytes N       total bytes of unclaimed worker.complete values (8388608)
  --log-level LEVEL          off, error, warn, info, debug, trace (info)
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
  bench     load generator: connect, roundtrip, jobs

`gearsock COMMAND --help` lists each command's flags; `gearsock --version` the version.
";

/// `--version`: the program and its version.
pub const VERSION: &str = concat!("gearsock ", env!("CARGO_PKG_VERSION"), "\n");

/// Turns `std::env::args_os()` (without the program name) into a [`Command`].
pub fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Command, String> {
    let first = args.first().and_then(|a| a.to_str()).unwrap_or("");
    let (name, rest) = match first {
        "serve" | "worker" | "submit" | "bench" => (first.to_string(), args[1..].to_vec()),
        "-h" | "--help" | "help" => return Ok(Command::Help(TOP_HELP.into())),
        "-V" | "--version" => return Ok(Command::Help(VERSION.into())),
        _ => ("serve".to_string(), args),
    };
    let mut parser = lexopt::Parser::from_args(rest);
    match name.as_str() {
        "serve" => parse_serve(&mut parser),
        "worker" => parse_worker(&mut parser),
        "submit" => parse_submit(&mut parser),
        _ => crate::bench::parse_bench(&mut parser),
    }
    .map_err(|e| format!("gearsock {name}: {e}"))
}

/// Parses the value of the current flag.
pub fn value<T: std::str::FromStr>(parser: &mut lexopt::Parser) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let raw = parser.value().map_err(|e| e.to_string())?;
    let text = raw.to_str().ok_or("flag value is not UTF-8")?;
    text.parse::<T>().map_err(|e| format!("bad value {text:?}: {e}"))
}

fn millis(parser: &mut lexopt::Parser) -> Result<Duration, String> {
    value::<u64>(parser).map(Duration::from_millis)
}

fn parse_serve(parser: &mut lexopt::Parser) -> Result<Command, String> {
    use lexopt::Arg::Long;
    let mut c = Config::default();
    let mut gearmand = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("listen") => c.listen = value(parser)?,
            Long("gearmand") => gearmand.push(value::<String>(parser)?),
            Long("poll-interval-ms") => c.poll_interval = millis(parser)?,
            Long("worker-token") => c.worker_token = Some(value(parser)?),
            Long("max-connections") => c.max_connections = value(parser)?,
            Long("max-message-bytes") => c.max_message_bytes = value(parser)?,
            Long("max-frame-bytes") => c.max_frame_bytes = value(parser)?,
            Long("handshake-timeout-ms") => c.handshake_timeout = millis(parser)?,
            Long("idle-timeout-ms") => c.idle_timeout = millis(parser)?,
            Long("client-out-limit-bytes" | "client-out-hard-bytes") => {
                c.client_out_hard_bytes = value(parser)?
            }
            Long("client-out-soft-bytes") => c.client_out_soft_bytes = value(parser)?,
            Long("client-out-soft-ms") => c.client_out_soft_time = millis(parser)?,
            Long("client-out-total-bytes") => c.client_out_total_bytes = value(parser)?,
            Long("gearmand-timeout-ms") => c.gearmand_timeout = millis(parser)?,
            Long("max-job-bytes") => c.max_job_bytes = value(parser)?,
            Long("max-orphans") => c.max_orphans = value(parser)?,
            Long("shared-uniques") => c.shared_uniques = true,
            Long("max-stored-bytes") => c.max_stored_bytes = value(parser)?,
            Long("allowed-origin") => c.allowed_origins.push(value(parser)?),
            Long("max-jobs-per-connection") => c.max_jobs_per_connection = value(parser)?,
            Long("value-grace-ms") => c.value_grace = millis(parser)?,
            Long("value-ttl-ms") => c.value_ttl = millis(parser)?,
            Long("queue-limit") => c.queue_limit = value(parser)?,
            Long("queue-timeout-ms") => c.queue_timeout = millis(parser)?,
            Long("reconnect-min-ms") => c.reconnect_min = millis(parser)?,
            Long("reconnect-max-ms") => c.reconnect_max = millis(parser)?,
            Long("log-level") => c.log_level = value(parser)?,
            Long("help") | lexopt::Arg::Short('h') => return Ok(Command::Help(SERVE_HELP.into())),
            Long("version") | lexopt::Arg::Short('V') => return Ok(Command::Help(VERSION.into())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if !gearmand.is_empty() {
        c.gearmand = gearmand;
    }
    // A smaller message limit must not be undercut by the frame default.
    c.max_frame_bytes = c.max_frame_bytes.min(c.max_message_bytes);
    c.client_in_limit_bytes = c.max_frame_bytes + 14;
    // A hard limit given alone (the old --client-out-limit-bytes) pulls the soft one down with it.
    c.client_out_soft_bytes = c.client_out_soft_bytes.min(c.client_out_hard_bytes);
    c.validate()?;
    Ok(Command::Serve(Box::new(c)))
}

fn parse_worker(parser: &mut lexopt::Parser) -> Result<Command, String> {
    use lexopt::Arg::Long;
    let mut o = WorkerOptions::default();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("gearmand") => o.gearmand = value(parser)?,
            Long("report") => o.report = Some(value(parser)?),
            Long("no-report") => o.report = None,
            Long("worker-token") => o.worker_token = Some(value(parser)?),
            Long("count") => o.count = value(parser)?,
            Long("interval-ms") => o.interval_ms = value(parser)?,
            Long("concurrency") => o.concurrency = value::<u32>(parser)?.max(1),
            Long("function") => o.function = value(parser)?,
            Long("help") | lexopt::Arg::Short('h') => return Ok(Command::Help(WORKER_HELP.into())),
            Long("version") | lexopt::Arg::Short('V') => return Ok(Command::Help(VERSION.into())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Command::Worker(o))
}

/// Parses `low`, `normal` or `high`.
pub fn parse_priority(text: &str) -> Result<Priority, String> {
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
}
