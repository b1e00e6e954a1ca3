//! A small blocking worker API that mirrors PHP's `GearmanWorker`, and the `gearsock worker`
//! command built on it.
//!
//! This module owns the worker's socket: one blocking `std::net::TcpStream` per `Worker`, with
//! reconnect and back-off when gearmand goes away. The protocol itself lives in
//! `gearman::WorkerSession`; this module only moves its bytes and runs job functions. It must not
//! be used from the event-loop server: everything here blocks (a worker is meant to do blocking
//! work), and it never imports `mio`.

use std::error::Error;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::buf::InBuf;
use crate::gearman::worker::{Assignment, WorkerEvent, WorkerSession};
use crate::random::XorShift64;

/// Largest packet body a worker accepts from gearmand (a job's payload), unless changed with
/// `Worker::set_max_body_bytes`. Larger packets drop the connection.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

/// How long one TCP connect to gearmand may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay after a failed attempt; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long a report over WebSocket may wait for its reply before it counts as failed.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from gearmand per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// How a job function says it did not produce a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JobError {
    /// Sent as WORK_FAIL.
    Fail,
    /// Sent as WORK_EXCEPTION with this data (clients without the `exceptions` option see
    /// WORK_FAIL).
    Exception(Vec<u8>),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Fail => f.write_str("job failed"),
            JobError::Exception(data) => write!(f, "job exception: {}", String::from_utf8_lossy(data)),
        }
    }
}

impl Error for JobError {}

/// A job function: its `Ok` becomes WORK_COMPLETE, its `Err` WORK_FAIL or WORK_EXCEPTION.
type JobFn = Box<dyn FnMut(&mut Job<'_>) -> Result<Vec<u8>, JobError>>;

/// One job being worked on, handed to the job function (PHP's `GearmanJob`).
pub(crate) struct Job<'a> {
    handle: String,
    function: String,
    assignment: Assignment,
    link: &'a mut Link,
    /// Set when a send failed: the connection is gone, and gearmand will requeue the job.
    lost: bool,
}

impl Job<'_> {
    /// The job handle, e.g. `H:host:42`.
    pub fn handle(&self) -> &str {
        &self.handle
    }

    /// The client's payload.
    pub fn payload(&self) -> &[u8] {
        &self.assignment.payload
    }

    /// The job's unique id as gearmand has it (empty if the submitter gave none). gearsock
    /// gives every background job one; send it back as `"unique"` in `worker.complete` so the
    /// value reaches exactly this job.
    pub fn unique(&self) -> &[u8] {
        &self.assignment.unique
    }

    /// Sends WORK_DATA now (PHP's `sendData`).
    pub fn send_data(&mut self, data: &[u8]) -> io::Result<()> {
        let Job { link, assignment, .. } = self;
        link.session.work_data(&assignment.handle, data, &mut link.out);
        self.flush()
    }

    /// Sends WORK_STATUS `numerator`/`denominator` now (PHP's `sendStatus`).
    pub fn send_status(&mut self, numerator: u64, denominator: u64) -> io::Result<()> {
        let Job { link, assignment, .. } = self;
        link.session.work_status(&assignment.handle, numerator, denominator, &mut link.out);
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.lost {
            self.link.out.clear();
            return Err(io::Error::new(io::ErrorKind::NotConnected, "connection to gearmand lost"));
        }
        let result = self.link.flush();
        self.lost = result.is_err();
        result
    }
}

/// A blocking Gearman worker with one connection to one gearmand (PHP's `GearmanWorker`).
///
/// ```ignore
/// // crate-internal (the library exports only `run_worker` and `run_demo_worker`)
/// let mut worker = Worker::new("127.0.0.1:4730");
/// worker.add_function("reverse", |job| Ok(job.payload().iter().rev().copied().collect()));
/// loop {
///     worker.work()?;
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub(crate) struct Worker {
    addr: String,
    functions: Vec<(String, JobFn)>,
    link: Option<Link>,
    backoff: Backoff,
    /// When the next connect attempt is due. It outlives a `work` call that gives up at its
    /// timeout first, so the back-off grows with attempts made, not with calls.
    next_attempt: Option<Instant>,
    /// The first failed attempt since the last connection was logged at warn.
    warned: bool,
    timeout: Option<Duration>,
    max_body_bytes: usize,
}

impl Worker {
    /// A worker for gearmand at `addr` (`host:port`). Nothing connects until `work`.
    pub fn new(addr: impl Into<String>) -> Self {
        Worker {
            addr: addr.into(),
            functions: Vec::new(),
            link: None,
            backoff: Backoff::new(),
            next_attempt: None,
            warned: false,
            timeout: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Registers `function`; a job for it runs `job_fn`. Registering a name twice replaces it.
    pub fn add_function(
        &mut self,
        name: impl Into<String>,
        job_fn: impl FnMut(&mut Job<'_>) -> Result<Vec<u8>, JobError> + 'static,
    ) {
        let name = name.into();
        match self.functions.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = Box::new(job_fn),
            None => self.functions.push((name, Box::new(job_fn))),
        }
    }

    /// Makes `work` give up with `io::ErrorKind::TimedOut` when no job arrived in `timeout`
    /// (PHP's `setTimeout`). `None`, the default, waits forever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Waits for one job, runs it and sends its result (PHP's `work`).
    ///
    /// Connects on first use; when gearmand goes away it reconnects with exponential back-off
    /// (jittered, at most 5 s) and registers the functions again, without returning. A job
    /// whose connection broke while it ran is dropped (gearmand gives it to another worker) and
    /// `work` returns `Ok`. Errors: `InvalidInput` with no function registered, `TimedOut` when
    /// `set_timeout` is set and no job came.
    pub fn work(&mut self) -> io::Result<()> {
        if self.functions.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no function registered"));
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let assignment = self.next_assignment(deadline)?;
        let link = self.link.as_mut().expect("an assignment comes from a live link");
        let function = String::from_utf8_lossy(&assignment.function).into_owned();
        let mut job = Job {
            handle: String::from_utf8_lossy(&assignment.handle).into_owned(),
            function,
            assignment,
            link,
            lost: false,
        };
        debug!("worker job {} function={}", job.handle, job.function);
        let outcome = match self.functions.iter_mut().find(|(name, _)| *name == job.function) {
            Some((_, job_fn)) => job_fn(&mut job),
            None => {
                warn!("worker got a job for unregistered function {:?}", job.function);
                Err(JobError::Fail)
            }
        };
        if job.lost {
            warn!("worker lost gearmand {} during job {}", self.addr, job.handle);
            self.link = None;
            return Ok(());
        }
        let Job { link, assignment, .. } = job;
        let handle = &assignment.handle;
        match &outcome {
            Ok(result) => link.session.work_complete(handle, result, &mut link.out),
            Err(JobError::Fail) => link.session.work_fail(handle, &mut link.out),
            Err(JobError::Exception(data)) => link.session.work_exception(handle, data, &mut link.out),
        }
        if let Err(e) = link.flush() {
            warn!("worker lost gearmand {} sending a result: {e}", self.addr);
            self.link = None;
        }
        Ok(())
    }

    /// Reads until gearmand assigns a job, reconnecting as often as it takes.
    fn next_assignment(&mut self, deadline: Option<Instant>) -> io::Result<Assignment> {
        loop {
            if self.link.is_none() {
                self.link = Some(self.connect(deadline)?);
            }
            let link = self.link.as_mut().expect("connected above");
            link.register(&self.functions);
            match link.wait_for_assignment(deadline) {
                Ok(assignment) => {
                    self.backoff.reset();
                    return Ok(assignment);
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(e),
                Err(e) => {
                    info!("worker lost gearmand {}: {e}", self.addr);
                    if link.heard_from_server {
                        self.backoff.reset();
                    }
                    self.link = None;
                }
            }
        }
    }

    /// Connects, sleeping until each attempt is due (the back-off delay after the last one);
    /// gives up only at `deadline`, leaving the attempt due for the next call.
    fn connect(&mut self, deadline: Option<Instant>) -> io::Result<Link> {
        loop {
            let due = match self.next_attempt {
                Some(due) => due,
                None => *self.next_attempt.insert(Instant::now() + self.backoff.next_delay()),
            };
            if let Some(deadline) = deadline
                && due >= deadline
            {
                thread::sleep(deadline.saturating_duration_since(Instant::now()));
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection to gearmand"));
            }
            thread::sleep(due.saturating_duration_since(Instant::now()));
            self.next_attempt = None;
            match Link::connect(&self.addr, self.max_body_bytes) {
                Ok(link) => {
                    self.warned = false;
                    info!("worker connected to gearmand {}", self.addr);
                    return Ok(link);
                }
                Err(e) if !self.warned => {
                    warn!("worker cannot reach gearmand {}: {e} (retrying with back-off)", self.addr);
                    self.warned = true;
                }
                Err(e) => debug!("worker cannot reach gearmand {}: {e}", self.addr),
            }
        }
    }
}

/// One live connection to gearmand: socket, protocol state and buffers.
struct Link {
    stream: TcpStream,
    session: WorkerSession,
    input: InBuf,
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// How many of the worker's functions were announced with CAN_DO on this connection.
    registered: usize,
    /// True once any packet arrived: the connection really works, so back-off can start over.
    heard_from_server: bool,
}

impl Link {
    fn connect(addr: &str, max_body_bytes: usize) -> io::Result<Link> {
        let mut last_error =
            io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to no address"));
        for sock_addr in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sock_addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Link {
                        stream,
                        session: WorkerSession::new(max_body_bytes),
                        input: InBuf::new(
                            max_body_bytes.saturating_add(crate::gearman::packet::HEADER_BYTES),
                        ),
                        out: Vec::new(),
                        scratch: vec![0; READ_CHUNK_BYTES],
                        registered: 0,
                        heard_from_server: false,
                    });
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Queues CAN_DO for functions added since the last call (sent with the next flush).
    fn register(&mut self, functions: &[(String, JobFn)]) {
        for (name, _) in &functions[self.registered..] {
            self.session.can_do(name.as_bytes(), &mut self.out);
        }
        self.registered = functions.len();
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = self.stream.write_all(&self.out);
        self.out.clear();
        result
    }

    /// Grabs, sleeps and grabs again until a job comes. Errors: `TimedOut` at `deadline` (the
    /// link stays usable), anything else means the link is dead.
    fn wait_for_assignment(&mut self, deadline: Option<Instant>) -> io::Result<Assignment> {
        self.session.grab(&mut self.out);
        loop {
            self.flush()?;
            while let Some(event) = self.session.poll_event() {
                match event {
                    WorkerEvent::Assignment(assignment) => return Ok(assignment),
                    WorkerEvent::Error { code, message } => warn!("worker got ERROR {code}: {message}"),
                    WorkerEvent::EchoRes(_) => {}
                }
            }
            let timeout = match deadline {
                None => None,
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(io::Error::new(io::ErrorKind::TimedOut, "no job arrived")),
                },
            };
            self.stream.set_read_timeout(timeout)?;
            match self.stream.read(&mut self.scratch) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "gearmand closed the connection",
                    ));
                }
                Ok(n) => {
                    self.heard_from_server = true;
                    self.input.extend(&self.scratch[..n]);
                    self.session
                        .handle_input(&mut self.input, &mut self.out)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reconnect delays: 0 for the first attempt, then 100 ms doubling to 5 s, each drawn from
/// [delay/2, delay] so that many workers cut off together do not reconnect in lockstep.
struct Backoff {
    failures: u32,
    rng: XorShift64,
}

impl Backoff {
    fn new() -> Self {
        Backoff { failures: 0, rng: XorShift64::seeded(0) }
    }

    fn next_delay(&mut self) -> Duration {
        let failures = self.failures;
        self.failures = self.failures.saturating_add(1);
        if failures == 0 {
            return Duration::ZERO;
        }
        let full = BACKOFF_BASE.saturating_mul(1 << (failures - 1).min(16)).min(BACKOFF_CAP);
        let full_ms = u64::try_from(full.as_millis()).unwrap_or(u64::MAX);
        let half_ms = full_ms / 2;
        Duration::from_millis(half_ms + self.rng.next_u64() % (full_ms - half_ms + 1))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Registers the demo functions used by tests, benches and the docs:
/// `echo` (returns the payload), `reverse` (the payload's bytes reversed), `fail` (WORK_FAIL) and
/// `boom` (WORK_EXCEPTION `boom: something broke`).
pub(crate) fn demo_functions(worker: &mut Worker) {
    worker.add_function("echo", |job| Ok(job.payload().to_vec()));
    worker.add_function("reverse", |job| Ok(job.payload().iter().rev().copied().collect()));
    worker.add_function("fail", |_| Err(JobError::Fail));
    worker.add_function("boom", |_| Err(JobError::Exception(b"boom: something broke".to_vec())));
}

/// Runs a worker with `demo_functions` against `gearmand` until `stop` is set (checked at least
/// every 200 ms). For loopback tests and benches: start it on a thread, set `stop`, join.
pub fn run_demo_worker(gearmand: &str, stop: &AtomicBool) -> io::Result<()> {
    let mut worker = Worker::new(gearmand);
    demo_functions(&mut worker);
    worker.set_timeout(Some(Duration::from_millis(200)));
    while !stop.load(Ordering::Relaxed) {
        match worker.work() {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            result => result?,
        }
    }
    Ok(())
}

/// Options of `gearsock worker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerOptions {
    /// gearmand address, `host:port`. Default `127.0.0.1:4730`.
    pub gearmand: String,
    /// WebSocket URL where `worker.complete` is reported; `None` (`--no-report`) skips it.
    /// Default `ws://127.0.0.1:8080`, the article's server.
    pub report: Option<String>,
    /// Pings per job. Default 5, as in the article.
    pub count: u32,
    /// Pause after each ping, in milliseconds. Default 1000, as in the article.
    pub interval_ms: u64,
    /// Worker threads, each with its own gearmand connection. Default 1.
    pub concurrency: u32,
    /// The function to serve. Default `ping`.
    pub function: String,
    /// Sent as `"token"` with each report, for a server started with `--worker-token`.
    pub worker_token: Option<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            gearmand: "127.0.0.1:4730".into(),
            report: Some("ws://127.0.0.1:8080".into()),
            count: 5,
            interval_ms: 1000,
            concurrency: 1,
            function: "ping".into(),
            worker_token: None,
        }
    }
}

/// `gearsock worker`: the article's ping worker. Prints `waiting`, then per job
/// `received: H:…`, `ping 1` … `ping N` (each also sent as WORK_DATA and WORK_STATUS n/N),
/// reports `worker.complete` and prints `response: …`, completes the job with `done` and prints
/// `waiting` again.
///
/// SIGINT or SIGTERM stops it: it handles them itself (a background child of a shell script
/// would otherwise ignore SIGINT), fails the job it is running (WORK_FAIL, so the client hears
/// at once instead of after a timeout), prints `stopped` and returns within a few hundred ms. A
/// second signal ends it at once.
pub fn run_worker(opts: &WorkerOptions) -> Result<(), Box<dyn Error>> {
    if opts.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if opts.function.is_empty() {
        return Err("--function must not be empty".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // The second signal exits at once (the flag is already set), the first sets the flag.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let threads = (0..opts.concurrency)
        .map(|i| {
            let opts = opts.clone();
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || run_ping_worker(&opts, &stop).map_err(|e| e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err("a worker thread panicked".into()),
        }
    }
    say("stopped");
    Ok(())
}

/// How often a waiting or pinging worker looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// One worker thread of `run_worker`, until `stop` is set.
fn run_ping_worker(opts: &WorkerOptions, stop: &Arc<AtomicBool>) -> io::Result<()> {
    let mut worker = Worker::new(opts.gearmand.clone());
    let (count, interval) = (opts.count, Duration::from_millis(opts.interval_ms));
    let mut reporter = opts.report.clone().map(|url| Reporter::new(url, opts.worker_token.clone()));
    let flag = Arc::clone(stop);
    worker.add_function(opts.function.clone(), move |job| {
        ping_job(job, count, interval, reporter.as_mut(), &flag)
    });
    worker.set_timeout(Some(STOP_CHECK));
    say("waiting");
    while !stop.load(Ordering::Relaxed) {
        match worker.work() {
            Ok(()) => say("waiting"),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The article's `ping` job function.
fn ping_job(
    job: &mut Job<'_>,
    count: u32,
    interval: Duration,
    reporter: Option<&mut Reporter>,
    stop: &AtomicBool,
) -> Result<Vec<u8>, JobError> {
    say(&format!("received: {}", job.handle()));
    for x in 1..=count {
        let line = format!("ping {x}");
        say(&line);
        if job.send_data(line.as_bytes()).is_err() || job.send_status(x.into(), count.into()).is_err() {
            // gearmand is gone and will give the job to another worker: stop here.
            return Err(JobError::Fail);
        }
        if !sleep_unless(interval, stop) {
            say(&format!("stopping: job {} failed", job.handle()));
            return Err(JobError::Fail);
        }
    }
    if let Some(reporter) = reporter {
        match reporter.report(job.handle(), job.unique()) {
            Ok(reply) => say(&format!("response: {reply}")),
            Err(e) => say(&format!("response: error: {e}")),
        }
    }
    Ok(b"done".to_vec())
}

/// The worker's WebSocket connection to the gearsock server, kept open between jobs.
struct Reporter {
    url: String,
    token: Option<String>,
    ws: Option<WebSocket<MaybeTlsStream<TcpStream>>>,
}

impl Reporter {
    fn new(url: String, token: Option<String>) -> Self {
        Reporter { url, token, ws: None }
    }

    /// Sends `worker.complete` for the job (`unique` names it exactly, `handle` is what the
    /// article sends) and returns the server's text reply. A kept connection that turns out
    /// broken is replaced once.
    fn report(&mut self, handle: &str, unique: &[u8]) -> Result<String, String> {
        let mut message = serde_json::json!({"type": "worker.complete", "id": handle, "value": "done"});
        if let Ok(unique) = std::str::from_utf8(unique)
            && !unique.is_empty()
        {
            message["unique"] = unique.into();
        }
        if let Some(token) = &self.token {
            message["token"] = token.as_str().into();
        }
        let message = message.to_string();
        let reused = self.ws.is_some();
        match self.exchange(&message) {
            Err(e) if reused => {
                debug!("worker report connection broke ({e}); reconnecting");
                self.exchange(&message)
            }
            result => result,
        }
    }

    /// One request/reply on the kept connection (opened if needed); dropped on any error.
    fn exchange(&mut self, message: &str) -> Result<String, String> {
        let ws = match &mut self.ws {
            Some(ws) => ws,
            None => self.ws.insert(Self::connect(&self.url)?),
        };
        let result = send_and_read_text(ws, message);
        if result.is_err() {
            self.ws = None;
        }
        result.map_err(|e| e.to_string())
    }

    fn connect(url: &str) -> Result<WebSocket<MaybeTlsStream<TcpStream>>, String> {
        let (ws, _response) = tungstenite::connect(url).map_err(|e| format!("{url}: {e}"))?;
        if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
            stream.set_read_timeout(Some(REPORT_TIMEOUT)).map_err(|e| e.to_string())?;
            stream.set_write_timeout(Some(REPORT_TIMEOUT)).map_err(|e| e.to_string())?;
        }
        Ok(ws)
    }
}

/// Sends one text frame and returns the next text frame (pings are answered on the way).
fn send_and_read_text(
    ws: &mut WebSocket<MaybeTlsStream<TcpStream>>,
    message: &str,
) -> tungstenite::Result<String> {
    ws.send(Message::text(message))?;
    loop {
        match ws.read()? {
            Message::Text(text) => return Ok(text.as_str().to_owned()),
            Message::Close(_) => return Err(tungstenite::Error::ConnectionClosed),
            _ => {}
        }
    }
}

/// Prints one line to stdout and flushes it, so lines show up as they happen even through a
/// pipe. Write errors (a closed pipe) are ignored rather than panicking as `println!` would.
/// Sleeps `duration` in short steps; false as soon as `stop` is set.
fn sleep_unless(duration: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + duration;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(STOP_CHECK));
    }
}

pub(crate) fn say(line: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_zero_grows_and_caps() {
        let mut backoff = Backoff::new();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= BACKOFF_BASE, "{first:?}");
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= BACKOFF_CAP, "{delay:?}");
        }
        assert!(backoff.next_delay() >= BACKOFF_CAP / 2);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
    }

    #[test]
    fn work_without_functions_is_invalid_input() {
        let mut worker = Worker::new("127.0.0.1:1");
        assert_eq!(worker.work().unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// A worker whose `work` gives up at a short timeout, called again and again while
    /// gearmand is away (as `run_demo_worker` does), still connects once gearmand is back.
    #[test]
    fn a_worker_with_a_timeout_reconnects_when_gearmand_comes_back() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
        let mut worker = Worker::new(format!("127.0.0.1:{port}"));
        worker.add_function("f", |_| Ok(Vec::new()));
        worker.set_timeout(Some(Duration::from_millis(100)));
        // gearmand is away for a second: every call times out.
        let away = Instant::now();
        while away.elapsed() < Duration::from_secs(1) {
            assert_eq!(worker.work().unwrap_err().kind(), io::ErrorKind::TimedOut);
        }
        // It is back (a listener that accepts and stays silent): the worker must connect within
        // its longest back-off, however many calls that takes.
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
        listener.set_nonblocking(true).unwrap();
        let back = Instant::now();
        let connected = loop {
            if listener.accept().is_ok() {
                break true;
            }
            if back.elapsed() > BACKOFF_CAP * 2 {
                break false;
            }
            assert_eq!(worker.work().unwrap_err().kind(), io::ErrorKind::TimedOut);
        };
        assert!(connected, "the worker never tried again");
    }

    #[test]
    fn run_worker_rejects_zero_concurrency() {
        let opts = WorkerOptions { concurrency: 0, ..WorkerOptions::default() };
        assert!(run_worker(&opts).is_err());
    }
}
