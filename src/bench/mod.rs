//! `gearsock bench MODE`: the load generator users run against any server speaking our
//! WebSocket protocol. It owns the command line of `bench` and picks the mode; it starts no
//! gearmand and no server (only, on request, demo workers and its own baseline servers).
//!
//! Layout, from the wire up:
//!
//! ```text
//! wire.rs     client frames (pre-masked), server frame headers, the upgrade request/answer: sans-IO
//! session.rs  one connection's protocol and workload: bytes in -> measurements + bytes out, sans-IO
//! meter.rs    counters and hdrhistograms of one thread, merged into a Report
//! driver.rs   the per-thread mio loop (nonblocking, edge-triggered) and the Fleet of threads
//! sys.rs      the few Linux calls std lacks: bind before connect, CPU affinity, file limit, VmRSS
//! echo.rs     the baselines: one-thread mio servers, the line echo (roundtrip) inside the bench
//!             process, the upgrade acceptor (connect) in a child `gearsock bench acceptor`
//! modes.rs    connect / roundtrip / jobs: what to run, in which order, and the output
//! mixed.rs    mixed: every kind of job at once, each reply recorded per job, and the reconcile
//! cycle.rs    a per-thread mio loop for connections that end: each runs a sans-IO Script
//! churn.rs    churn: connect, upgrade, one round trip, close handshake, again; server RSS/fds
//! flood.rs    flood: paced real clients while trickling upgrades (child processes) fill the
//!             server's slots; 408/503 counts, server CPU, slots back
//! ```

mod churn;
mod cycle;
mod driver;
mod echo;
mod flood;
mod meter;
mod mixed;
mod modes;
mod session;
mod sys;
mod wire;

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// The default message of `roundtrip`: the article's console snippet reporting a value.
pub const DEFAULT_MESSAGE: &str = r#"{"type":"worker.complete","id":1,"value":"done"}"#;
/// What the server answers to [`DEFAULT_MESSAGE`], word for word.
pub const DEFAULT_REPLY: &str = "got it!";
/// `--expect echo`: each reply must be the message itself (an echo server, `serve --echo`).
pub const EXPECT_ECHO: &str = "echo";
/// Descriptors kept back from the per-process connection cap (poll, stdio, workers, gearmand).
const FD_RESERVE: usize = 1000;

/// What `gearsock bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Opening connections: handshakes per second, handshake latency, idle memory per connection.
    Connect,
    /// Messages answered in order (`worker.complete` → `got it!` by default).
    Roundtrip,
    /// End-to-end stream jobs through the server to Gearman workers and back.
    Jobs,
    /// Stream and background jobs and the article's pings at once, every reply recorded per
    /// job: the reconcile of fault and soak runs.
    Mixed,
    /// Whole connections again and again (connect, upgrade, one round trip, close handshake):
    /// cycles/s, and with `--pid` the server's RSS and descriptors at checkpoints.
    Churn,
    /// A half-open flood at the server's connection limit, with real clients being served
    /// meanwhile: 408s and 503s, the server's CPU, the slots coming back.
    Flood,
    /// Internal, not in the help: one process of flood's trickling connections (see
    /// `flood::run_trickle`).
    Trickle,
    /// Internal, not in the help: the connect baseline's upgrade acceptor, run by `connect
    /// --baseline` as a child process. Prints `{"addr":...,"cpus":...}` once listening and
    /// serves until its stdin closes.
    Acceptor,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        match text {
            "connect" => Ok(Mode::Connect),
            "roundtrip" => Ok(Mode::Roundtrip),
            "jobs" => Ok(Mode::Jobs),
            "mixed" => Ok(Mode::Mixed),
            "churn" => Ok(Mode::Churn),
            "flood" => Ok(Mode::Flood),
            "trickle" => Ok(Mode::Trickle),
            "acceptor" => Ok(Mode::Acceptor),
            other => {
                Err(format!("MODE must be connect, roundtrip, jobs, mixed, churn or flood, not {other:?}"))
            }
        }
    }
}

impl Mode {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Connect => "connect",
            Mode::Roundtrip => "roundtrip",
            Mode::Jobs => "jobs",
            Mode::Mixed => "mixed",
            Mode::Churn => "churn",
            Mode::Flood => "flood",
            Mode::Trickle => "trickle",
            Mode::Acceptor => "acceptor",
        }
    }
}

/// Options of `gearsock bench`. Each field says its flag and default.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The mode (positional `MODE`).
    pub mode: Mode,
    /// `--url`: the server, `ws://HOST:PORT[/PATH]`. Default `ws://127.0.0.1:8080`.
    pub url: String,
    /// `--connections`: connections opened. Default 100.
    pub connections: usize,
    /// `--in-flight`: messages (roundtrip) or jobs (jobs) outstanding per connection. Default 1.
    pub in_flight: usize,
    /// `--duration-s`: the measured window (roundtrip, jobs). Default 10 s.
    pub duration: Duration,
    /// `--warmup-s`: load before the window that is not measured. Default 1 s.
    pub warmup: Duration,
    /// `--concurrency`: handshakes in flight while connecting. Default 100.
    pub concurrency: usize,
    /// `--hold`: seconds the connect mode keeps every connection open, idle, once all are up.
    /// Default 0.
    pub hold: Duration,
    /// `--pid`: the server's pid: connect reads its VmRSS, roundtrip and jobs its CPU time.
    /// Default none.
    pub pid: Option<u32>,
    /// `--gearmand-pid`: gearmand's pid, whose CPU time jobs mode reports. Default none.
    pub gearmand_pid: Option<u32>,
    /// `--message`: the roundtrip text. Default [`DEFAULT_MESSAGE`]. `--message-bytes N` sets
    /// it to N bytes of printable ASCII instead.
    pub message: String,
    /// `--binary`: roundtrip messages go as binary frames, and replies must be binary. Default
    /// off (text).
    pub binary: bool,
    /// `--expect`: the reply every roundtrip message must get; [`EXPECT_ECHO`] means the message
    /// itself. Default `got it!` for the default message, any text reply for a custom one.
    pub expect: Option<String>,
    /// `--function`: the Gearman function of jobs. Default `echo`.
    pub function: String,
    /// `--payload-bytes`: the job payload's size. Default 16.
    pub payload_bytes: usize,
    /// `--gearmand`: where `--baseline` and `--spawn-workers` go in jobs mode. Default
    /// `127.0.0.1:4730`.
    pub gearmand: String,
    /// `--baseline`: also run the upgrade acceptor (connect), the transport baseline
    /// (roundtrip) or direct Gearman (jobs).
    pub baseline: bool,
    /// `--baseline-cpu`: pin the baseline server (upgrade acceptor, echo server) to this CPU.
    /// Default: the CPUs the `--pid` server may use, else unpinned.
    pub baseline_cpu: Option<usize>,
    /// `--json`: one JSON object on stdout instead of the table.
    pub json: bool,
    /// `--threads`: client event loops. Default 1.
    pub threads: usize,
    /// `--source-ips`: spread connections over this many source addresses from
    /// `--source-base` on (loopback targets). Default: enough for the ephemeral port range.
    pub source_ips: Option<usize>,
    /// `--source-base`: the first source address. Default `127.0.0.1`.
    pub source_base: Ipv4Addr,
    /// `--spawn-workers`: demo workers (echo, reverse, fail, boom) started on threads against
    /// `--gearmand` for the jobs mode. Default 0.
    pub spawn_workers: usize,
    /// `--timeout-s`: a connection not through its handshake after this fails (churn: a
    /// cycle not over). Default 10 s.
    pub timeout: Duration,
    /// `--interval-s`: mixed prints job latency and the `--pid` server's RSS and descriptors
    /// this often. Default 0 (never).
    pub interval: Duration,
    /// `--sigterm-after-s`: mixed sends the `--pid` server SIGTERM this long into the load.
    /// Default none.
    pub sigterm_after: Option<Duration>,
    /// `--settle-s`: how long mixed waits for the last replies after sending stops (or after
    /// its SIGTERM; default 15 s), and churn and flood at most for the server's descriptors to
    /// come back (default 10 s).
    pub settle: Option<Duration>,
    /// `--cycles`: churn's connections in all, each a whole cycle. Default 100,000.
    pub cycles: usize,
    /// `--max-growth-pct`: churn's limit on the server's RSS growth from the first tenth of
    /// the cycles to the end. Default 1.
    pub max_growth_pct: f64,
    /// `--slots`: flood: the server's `--max-connections`. Required by flood.
    pub slots: Option<usize>,
    /// `--handshake-timeout-ms`: flood: the server's handshake timeout. Default 10,000 (the
    /// server's default).
    pub handshake_timeout: Duration,
    /// `--beyond`: flood: tricklers beyond the free slots (they should get 503). Default 50.
    pub beyond: usize,
    /// `--interval-ms`: flood: each real client's pace, one request per interval. Default 10.
    pub pace: Duration,
    /// `--trickle-interval-ms`: flood: one byte of the upgrade request per interval. Default
    /// 500.
    pub trickle_interval: Duration,
    /// `--per-process`: flood: tricklers per child process, at most. Default 4,000.
    pub per_process: usize,
    /// `--max-cpu-pct`: flood: the server's CPU over the flood, at most, in % of one core.
    /// Default 50.
    pub max_cpu_pct: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            mode: Mode::Roundtrip,
            url: "ws://127.0.0.1:8080".into(),
            connections: 100,
            in_flight: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            concurrency: 100,
            hold: Duration::ZERO,
            pid: None,
            gearmand_pid: None,
            message: DEFAULT_MESSAGE.into(),
            binary: false,
            expect: None,
            function: "echo".into(),
            payload_bytes: 16,
            gearmand: "127.0.0.1:4730".into(),
            baseline: false,
            baseline_cpu: None,
            json: false,
            threads: 1,
            source_ips: None,
            source_base: Ipv4Addr::LOCALHOST,
            spawn_workers: 0,
            timeout: Duration::from_secs(10),
            interval: Duration::ZERO,
            sigterm_after: None,
            settle: None,
            cycles: 100_000,
            max_growth_pct: 1.0,
            slots: None,
            handshake_timeout: Duration::from_secs(10),
            beyond: 50,
            pace: Duration::from_millis(10),
            trickle_interval: Duration::from_millis(500),
            per_process: 4000,
            max_cpu_pct: 50.0,
        }
    }
}

/// `len` bytes of printable ASCII (no newline, so the line-echo baseline can carry it too).
pub fn sized_message(len: usize) -> String {
    const PATTERN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    PATTERN.iter().cycle().take(len).map(|&b| char::from(b)).collect()
}

impl BenchOptions {
    /// Checks the flags against each other and against this process's open-file limit.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 || self.in_flight == 0 || self.concurrency == 0 || self.threads == 0 {
            return Err("--connections, --in-flight, --concurrency and --threads must be at least 1".into());
        }
        if self.mode == Mode::Churn && self.cycles == 0 {
            return Err("--cycles must be at least 1".into());
        }
        if self.mode == Mode::Flood && (self.trickle_interval.is_zero() || self.handshake_timeout.is_zero()) {
            return Err("--trickle-interval-ms and --handshake-timeout-ms must be above zero".into());
        }
        let timed = matches!(self.mode, Mode::Roundtrip | Mode::Jobs);
        if self.duration.is_zero() && timed {
            return Err("--duration-s must be above zero".into());
        }
        if self.timeout.is_zero() {
            return Err("--timeout-s must be above zero".into());
        }
        parse_url(&self.url)?;
        if self.source_ips == Some(0) {
            return Err("--source-ips must be at least 1".into());
        }
        if self.mode == Mode::Roundtrip && self.baseline && self.message.contains('\n') {
            return Err("--baseline sends the message as one line: it must not contain a newline".into());
        }
        if self.message.len() > session::MAX_FRAME_BYTES {
            return Err(format!(
                "the message is at most {} bytes (the bench's frame limit)",
                session::MAX_FRAME_BYTES
            ));
        }
        if self.mode == Mode::Mixed
            && self.sigterm_after.is_some_and(|s| self.pid.is_none() || s > self.duration)
        {
            return Err("--sigterm-after-s needs --pid (the server) and at most --duration-s".into());
        }
        if matches!(self.mode, Mode::Jobs | Mode::Mixed) && self.function.is_empty() {
            return Err("--function must not be empty".into());
        }
        // The in-process echo server holds a descriptor per baseline connection too. (The
        // connect baseline's acceptor is a child process with descriptors of its own.)
        let per_connection = if self.mode == Mode::Roundtrip && self.baseline { 2 } else { 1 };
        let files = sys::open_file_hard_limit();
        let cap = files.saturating_sub(FD_RESERVE) / per_connection;
        if self.mode == Mode::Flood && !(1..=cap).contains(&self.per_process) {
            return Err(format!("--per-process must be between 1 and {cap} (the open-file limit {files})"));
        }
        if self.connections > cap {
            let why =
                if per_connection == 2 { " (halved: the baseline echo server is in-process)" } else { "" };
            return Err(format!(
                "--connections {} is more than one process can hold: at most {cap} with the open-file \
                 limit {files}{why}; run several `gearsock bench` processes side by side, each with its \
                 own --source-base (127.0.0.1, 127.0.1.1, ...) so they do not share ephemeral ports",
                self.connections
            ));
        }
        Ok(())
    }
}

/// The pieces of a `ws://` URL the bench needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// `HOST:PORT` as written (the `Host` header), port 80 when the URL has none.
    pub authority: String,
    /// The request path, `/` when the URL has none.
    pub path: String,
}

/// Splits `ws://HOST[:PORT][/PATH]`. `wss://` is refused: the bench speaks plain TCP.
pub fn parse_url(url: &str) -> Result<WsUrl, String> {
    let rest =
        url.strip_prefix("ws://").ok_or_else(|| format!("--url must start with ws://, not {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("--url {url:?} has no host"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port { authority.to_string() } else { format!("{authority}:80") };
    Ok(WsUrl { authority, path: path.to_string() })
}

/// Resolves `HOST:PORT`, preferring IPv4 (source addresses are IPv4).
pub fn resolve(authority: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        authority.to_socket_addrs().map_err(|e| format!("cannot resolve {authority}: {e}"))?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{authority} resolves to no address"))
}

/// Runs the benchmark; returns the exit status (1 when errors or failures were counted).
pub fn run_bench(opts: &BenchOptions) -> Result<i32, Box<dyn std::error::Error>> {
    opts.validate()?;
    sys::raise_open_file_limit();
    match opts.mode {
        Mode::Connect => modes::run_connect(opts),
        Mode::Roundtrip => modes::run_roundtrip(opts),
        Mode::Jobs => modes::run_jobs(opts),
        Mode::Mixed => mixed::run_mixed(opts),
        Mode::Churn => churn::run_churn(opts),
        Mode::Flood => flood::run_flood(opts),
        Mode::Trickle => flood::run_trickle(opts),
        Mode::Acceptor => modes::run_acceptor(opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        let u = parse_url("ws://127.0.0.1:8080").expect("url");
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("127.0.0.1:8080", "/"));
        let u = parse_url("ws://example.org/chat").expect("url");
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("example.org:80", "/chat"));
        assert_eq!(parse_url("ws://[::1]").expect("url").authority, "[::1]:80");
        assert!(parse_url("wss://x").is_err());
    }
}
