//! `gearsock bench flood`: a half-open flood at the connection limit. A server started with
//! `--max-connections N --handshake-timeout-ms T` gets `--connections` real clients doing paced
//! round trips, then enough trickling connections to take every other slot and `--beyond` more:
//! each sends a valid upgrade request one byte every `--trickle-interval-ms`, so it never
//! finishes before T. What should happen, and is checked:
//!
//! - the real clients keep being served (their round trips during the flood are counted and
//!   timed; none is lost, none waits a whole handshake timeout for a reply);
//! - every trickler the server took gets `408` at T and every one beyond the limit `503`
//!   (nothing hangs, nothing is cut without an answer);
//! - the server stays far from a busy loop (its CPU time over the flood's wall time, from
//!   `/proc/PID/stat`, under `--max-cpu-pct`);
//! - the slots come back: once the tricklers are gone, N minus the real clients new WebSocket
//!   connections open and are all held at once;
//! - the server's descriptors are back at the baseline at the end.
//!
//! The tricklers run in child processes (`gearsock bench trickle`, internal), at most
//! `--per-process` each, every one from its own `--source-ips` loopback addresses: one
//! process's open-file limit (often 20,000) and one address's ephemeral ports are not enough
//! for every N. The same children then open the new connections that show the slots are back,
//! and hold them until the parent has heard from all of them.

use std::collections::BTreeMap;
use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::cycle::{self, Hangup, Plan, Script};
use super::driver::{Fleet, Rng, Schedule, Spec};
use super::meter::{Latency, bump, latency_histogram, per_second, record};
use super::session::{Endpoint, Expect, Idle, WsSession};
use super::sys::{self, CpuProbe};
use super::wire::{
    self, MAX_HEAD_BYTES, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_client_frame, parse_server_frame,
};
use super::{BenchOptions, DEFAULT_MESSAGE, DEFAULT_REPLY, parse_url, resolve};

/// Largest server frame a real client accepts (the replies are a few bytes).
const MAX_FRAME_BYTES: usize = 1 << 20;
/// How long a trickler waits for an answer beyond the handshake timeout before it gives up.
const ANSWER_GRACE: Duration = Duration::from_secs(10);
/// How long the real clients get to connect before the flood.
const CLIENTS_UP: Duration = Duration::from_secs(10);
/// How often the server's descriptors are counted during the flood (for the peak).
const FD_SAMPLE: Duration = Duration::from_millis(50);
/// A descriptor count unchanged this long has settled, even above its target.
const SETTLED_AFTER: Duration = Duration::from_secs(1);
/// The baseline is read once the count has not moved for this long.
const STEADY_BEFORE: Duration = Duration::from_millis(300);
/// The first source address of the tricklers when `--source-base` is left at 127.0.0.1 (so
/// they do not share ports with the real clients).
const TRICKLE_BASE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

// ---- the trickling connection -------------------------------------------------------------

/// A slow upgrade request: one byte every `interval` until the server answers.
#[derive(Debug)]
pub struct Trickle {
    request: Arc<Vec<u8>>,
    interval: Duration,
    /// No answer by then: a failure.
    give_up: Instant,
    /// Bytes of the request sent so far.
    sent: usize,
    next_byte: Option<Instant>,
    /// When connect() was called: before the server could accept, so a timeout the server
    /// counts from its accept is never shorter measured from here.
    launched: Instant,
    /// The HTTP status the server answered with.
    pub status: Option<u16>,
    /// From connect() to the answer.
    pub answered_after: Option<Duration>,
    done: bool,
}

impl Trickle {
    /// A trickler launched at `now` that gives up `limit` later.
    pub fn new(request: Arc<Vec<u8>>, interval: Duration, now: Instant, limit: Duration) -> Trickle {
        Trickle {
            request,
            interval,
            give_up: now + limit,
            sent: 0,
            next_byte: None,
            launched: now,
            status: None,
            answered_after: None,
            done: false,
        }
    }

    fn send_byte(&mut self, now: Instant, out: &mut Vec<u8>) {
        if let Some(&byte) = self.request.get(self.sent) {
            out.push(byte);
            self.sent += 1;
        }
        self.next_byte = (self.sent < self.request.len()).then(|| now + self.interval);
    }
}

impl Script for Trickle {
    fn on_connect(&mut self, now: Instant, out: &mut Vec<u8>) {
        self.send_byte(now, out);
    }

    fn on_input(&mut self, input: &[u8], now: Instant, _out: &mut Vec<u8>) -> Result<usize, String> {
        if self.status.is_some() {
            return Ok(input.len()); // the body, or whatever follows: not needed
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(input) {
            Ok(httparse::Status::Complete(_)) => {
                self.status = response.code;
                self.answered_after = Some(now.saturating_duration_since(self.launched));
                self.next_byte = None;
                Ok(input.len())
            }
            Ok(httparse::Status::Partial) if input.len() > MAX_HEAD_BYTES => {
                Err("answer head too large".into())
            }
            Ok(httparse::Status::Partial) => Ok(0),
            Err(e) => Err(format!("bad answer ({e})")),
        }
    }

    fn on_hangup(&mut self, how: Hangup, _now: Instant) -> Result<(), String> {
        // A reset after the answer is how a refusal ends when our first byte was unread.
        match (how, self.status) {
            (_, Some(_)) => {
                self.done = true;
                Ok(())
            }
            (Hangup::Eof, None) => Err("closed without an answer".into()),
            (Hangup::Error(e), None) => Err(format!("{e} without an answer")),
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        Some(self.next_byte.map_or(self.give_up, |at| at.min(self.give_up)))
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<u8>) -> Result<(), String> {
        if now >= self.give_up {
            return Err(match self.status {
                Some(_) => "answered but never closed".into(),
                None => "no answer".into(),
            });
        }
        if self.next_byte.is_some_and(|at| now >= at) {
            self.send_byte(now, out);
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.done
    }
}

// ---- the real client ----------------------------------------------------------------------

/// What every real client sends and expects, framed and masked once.
#[derive(Debug)]
pub struct PacedPlan {
    /// `Host` and path of the upgrade request.
    pub endpoint: Arc<Endpoint>,
    /// The request, as it goes on the wire.
    pub request: Vec<u8>,
    /// The reply it must get.
    pub expect: Expect,
    /// Our close frame (1000), sent when the run ends.
    pub close: Vec<u8>,
    /// From one request to the next (or at once, if the reply took longer).
    pub interval: Duration,
    /// Real clients through their upgrade, all of them.
    pub opened: Arc<AtomicUsize>,
}

/// A real client: one request outstanding at a time, one every `interval`. Every reply is
/// kept with its arrival time, so the flood's window can be cut out afterwards.
#[derive(Debug)]
pub struct Paced {
    plan: Arc<PacedPlan>,
    key: String,
    accept: String,
    mask: [u8; 4],
    open: bool,
    outstanding: Option<Instant>,
    next_send: Option<Instant>,
    /// (arrival, round trip) of every good reply.
    pub replies: Vec<(Instant, Duration)>,
    /// Replies that were not the expected one.
    pub mismatches: u64,
}

impl Paced {
    /// A client whose handshake key and mask come from `rng`.
    pub fn new(plan: Arc<PacedPlan>, rng: &mut Rng) -> Paced {
        let (key, accept) = wire::handshake_key(rng.bytes16());
        Paced {
            plan,
            key,
            accept,
            mask: rng.mask(),
            open: false,
            outstanding: None,
            next_send: None,
            replies: Vec::new(),
            mismatches: 0,
        }
    }

    fn send(&mut self, now: Instant, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.plan.request);
        self.outstanding = Some(now);
        self.next_send = None;
    }
}

impl Script for Paced {
    fn on_connect(&mut self, _now: Instant, out: &mut Vec<u8>) {
        wire::encode_upgrade_request(out, &self.plan.endpoint.host, &self.plan.endpoint.path, &self.key);
    }

    fn on_input(&mut self, input: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<usize, String> {
        let mut used = 0;
        if !self.open {
            match wire::parse_upgrade_response(input, &self.accept)? {
                None => return Ok(0),
                Some(head) => used = head,
            }
            self.open = true;
            self.plan.opened.fetch_add(1, Ordering::AcqRel);
            self.send(now, out);
        }
        while let Some(frame) =
            parse_server_frame(&input[used..], MAX_FRAME_BYTES).map_err(|e| e.to_string())?
        {
            let payload = &input[used + frame.payload_start..used + frame.len];
            used += frame.len;
            match frame.opcode {
                OP_TEXT if frame.fin => {
                    let Some(sent) = self.outstanding.take() else {
                        return Err("a reply nothing asked for".into());
                    };
                    if self.plan.expect.accepts(payload) {
                        self.replies.push((now, now.saturating_duration_since(sent)));
                    } else {
                        self.mismatches += 1;
                    }
                    let due = sent + self.plan.interval;
                    if due <= now {
                        self.send(now, out);
                    } else {
                        self.next_send = Some(due);
                    }
                }
                OP_PING => encode_client_frame(out, OP_PONG, payload, self.mask),
                OP_CLOSE => return Err("closed by the server".into()),
                opcode => return Err(format!("unexpected frame (opcode {opcode})")),
            }
        }
        Ok(used)
    }

    fn on_hangup(&mut self, how: Hangup, _now: Instant) -> Result<(), String> {
        Err(match how {
            Hangup::Eof => "server hung up".into(),
            Hangup::Error(e) => e,
        })
    }

    fn next_tick(&self) -> Option<Instant> {
        self.next_send
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<u8>) -> Result<(), String> {
        if self.next_send.is_some_and(|at| now >= at) {
            self.send(now, out);
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        false
    }

    fn on_stop(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if !self.open {
            return Err("not connected when the run ended".into());
        }
        out.extend_from_slice(&self.plan.close);
        Ok(())
    }
}

/// The real clients' round trips inside the flood's window.
#[derive(Debug)]
struct Served {
    connected: usize,
    failures: BTreeMap<String, u64>,
    mismatches: u64,
    round_trips: u64,
    latency: Histogram<u64>,
    /// The longest any client went without a reply in the window (its edges included).
    max_gap: Duration,
    /// When that longest wait began, from the window's start.
    max_gap_from: Duration,
    /// The fewest replies one client got in the window.
    min_per_client: u64,
}

impl Served {
    fn of(clients: &[(Paced, Result<(), String>)], start: Instant, end: Instant) -> Served {
        let mut served = Served {
            connected: 0,
            failures: BTreeMap::new(),
            mismatches: 0,
            round_trips: 0,
            latency: latency_histogram(),
            max_gap: Duration::ZERO,
            max_gap_from: Duration::ZERO,
            min_per_client: u64::MAX,
        };
        for (client, outcome) in clients {
            served.connected += usize::from(client.open);
            if let Err(reason) = outcome {
                bump(&mut served.failures, reason);
            }
            served.mismatches += client.mismatches;
            let mut last = start;
            let mut count = 0;
            for &(at, rtt) in client.replies.iter().filter(|(at, _)| *at >= start && *at <= end) {
                record(&mut served.latency, rtt);
                served.note_gap(last, at, start);
                last = at;
                count += 1;
            }
            served.note_gap(last, end, start);
            served.round_trips += count;
            served.min_per_client = served.min_per_client.min(count);
        }
        if clients.is_empty() {
            served.min_per_client = 0;
        }
        served
    }

    /// A client heard nothing from `from` to `to`.
    fn note_gap(&mut self, from: Instant, to: Instant, start: Instant) {
        let gap = to.saturating_duration_since(from);
        if gap > self.max_gap {
            self.max_gap = gap;
            self.max_gap_from = from.saturating_duration_since(start);
        }
    }
}

// ---- the trickle processes ----------------------------------------------------------------

/// `gearsock bench trickle` (internal): `--connections` tricklers from `--source-ips`
/// addresses; prints one JSON line with what they got. Then, on a `reopen M` line on stdin,
/// opens M WebSocket connections, prints how many came up, and holds them until stdin closes.
pub fn run_trickle(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let url = parse_url(&opts.url)?;
    let target = resolve(&url.authority)?;
    let sources = addresses(opts.source_base, opts.source_ips.unwrap_or(1))?;
    let mut request = Vec::new();
    let (key, _) = wire::handshake_key(Rng::seeded(0).bytes16());
    wire::encode_upgrade_request(&mut request, &url.authority, &url.path, &key);
    let request = Arc::new(request);
    let plan = Plan {
        target,
        sources: sources.clone(),
        first: 0,
        total: opts.connections,
        alive: opts.connections,
        connecting: opts.concurrency,
        stop: None,
    };
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut to_408 = latency_histogram();
    let (interval, limit) = (opts.trickle_interval, opts.timeout);
    cycle::run(
        &plan,
        |_, now, _| Trickle::new(request.clone(), interval, now, limit),
        |trickle, outcome| match (outcome, trickle.status) {
            (Ok(()), Some(status)) => {
                bump(&mut statuses, &status.to_string());
                if let (408, Some(after)) = (status, trickle.answered_after) {
                    record(&mut to_408, after);
                }
            }
            (Ok(()), None) => bump(&mut failures, "ended without an answer"),
            (Err(reason), _) => bump(&mut failures, &reason),
        },
    )?;
    let ms = |us: f64| (us / 100.0).round() / 10.0;
    let lat = Latency::of(&to_408);
    let report = json!({
        "connections": opts.connections,
        "statuses": statuses,
        "failures": failures,
        "to_408_ms": {"count": lat.count, "p50": ms(lat.p50), "max": ms(lat.max),
                      "min": ms(to_408.min() as f64 / 1000.0)},
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{report}")?;
    stdout.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let Some(count) = line.trim().strip_prefix("reopen ").and_then(|n| n.parse::<usize>().ok()) else {
        return Ok(0);
    };
    let endpoint = Arc::new(Endpoint { host: url.authority, path: url.path });
    let spec = Spec {
        target,
        sources,
        connections: count,
        concurrency: opts.concurrency,
        threads: 1,
        timeout: opts.timeout,
        schedule: Schedule::Hold,
    };
    let fleet =
        Fleet::start(&spec, move |rng| WsSession::new(endpoint.clone(), rng.bytes16(), rng.mask(), Idle))?;
    fleet.wait_connected();
    let established = fleet.established();
    writeln!(stdout, "{}", json!({"established": established}))?;
    stdout.flush()?;
    // Held until the parent has heard from every child: stdin closes.
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    fleet.stop();
    let report = fleet.join()?;
    writeln!(stdout, "{}", json!({"failures": report.connect_failures, "lost": report.lost}))?;
    Ok(0)
}

/// One `gearsock bench trickle` child, killed if dropped before [`TrickleProcess::finish`].
struct TrickleProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl TrickleProcess {
    fn start(args: &[String]) -> Result<TrickleProcess, String> {
        let fail = |e: std::io::Error| format!("trickle process: {e}");
        let exe = std::env::current_exe().map_err(fail)?;
        let mut child = Command::new(exe)
            .args(["bench", "trickle"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(fail)?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(TrickleProcess { child, stdin, lines })
    }

    /// The next JSON line it prints, waiting at most `limit`.
    fn next(&self, limit: Duration) -> Result<Value, String> {
        let line = self.lines.recv_timeout(limit).map_err(|_| "a trickle process said nothing in time")?;
        serde_json::from_str(&line).map_err(|e| format!("trickle process said {line:?}: {e}"))
    }

    fn say(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("trickle process: stdin closed")?;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).map_err(|e| format!("trickle process: {e}"))
    }

    /// Closes its stdin and waits (at most `limit`) for its last line and its exit.
    fn finish(mut self, limit: Duration) -> Result<Value, String> {
        drop(self.stdin.take());
        let last = self.next(limit);
        let _ = self.child.wait();
        last
    }
}

impl Drop for TrickleProcess {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `count` loopback addresses from `base` on.
fn addresses(base: Ipv4Addr, count: usize) -> Result<Vec<Ipv4Addr>, String> {
    let first = u32::from(base);
    (0..count as u32)
        .map(|i| first.checked_add(i).map(Ipv4Addr::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "--source-base plus --source-ips runs past 255.255.255.255".to_string())
}

// ---- the flood ----------------------------------------------------------------------------

/// The server's descriptor count, sampled on a thread; the largest seen is kept.
struct FdPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: JoinHandle<()>,
}

impl FdPeak {
    fn start(pid: u32) -> FdPeak {
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Ok(n) = sys::open_fds(pid) {
                    p.fetch_max(n, Ordering::AcqRel);
                }
                thread::sleep(FD_SAMPLE);
            }
        });
        FdPeak { stop, peak, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
        self.peak.load(Ordering::Acquire)
    }
}

/// What the tricklers got, all processes together.
#[derive(Debug, Default)]
struct Trickled {
    statuses: BTreeMap<String, u64>,
    failures: BTreeMap<String, u64>,
    to_408_p50_ms: f64,
    to_408_min_ms: f64,
    to_408_max_ms: f64,
}

impl Trickled {
    fn add(&mut self, child: &Value) {
        for (map, field) in [(&mut self.statuses, "statuses"), (&mut self.failures, "failures")] {
            if let Some(counts) = child[field].as_object() {
                for (k, n) in counts {
                    *map.entry(k.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                }
            }
        }
        let t = &child["to_408_ms"];
        if t["count"].as_u64().unwrap_or(0) > 0 {
            let (p50, min, max) = (t["p50"].as_f64(), t["min"].as_f64(), t["max"].as_f64());
            // The largest of the processes' medians: close enough for processes of equal size.
            self.to_408_p50_ms = self.to_408_p50_ms.max(p50.unwrap_or(0.0));
            let min = min.unwrap_or(f64::MAX);
            self.to_408_min_ms = if self.to_408_min_ms == 0.0 { min } else { self.to_408_min_ms.min(min) };
            self.to_408_max_ms = self.to_408_max_ms.max(max.unwrap_or(0.0));
        }
    }

    fn status(&self, code: &str) -> u64 {
        self.statuses.get(code).copied().unwrap_or(0)
    }

    fn others(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "408" | "503"))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.failures.values().sum::<u64>()
    }
}

/// `gearsock bench flood`.
pub fn run_flood(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let pid = opts.pid.ok_or("flood needs --pid (the server's pid: its CPU time and descriptors)")?;
    let slots = opts.slots.ok_or("flood needs --slots N: the server's --max-connections")?;
    let clients = opts.connections;
    if clients >= slots {
        return Err(format!("--connections {clients} leaves no slot of --slots {slots} to flood").into());
    }
    let url = parse_url(&opts.url)?;
    let target = resolve(&url.authority)?;
    let endpoint = Arc::new(Endpoint { host: url.authority.clone(), path: url.path.clone() });
    let mut request = Vec::new();
    wire::encode_upgrade_request(&mut request, &url.authority, &url.path, "dGhlIHNhbXBsZSBub25jZQ==");
    let trickle_time = opts.trickle_interval.saturating_mul(request.len() as u32);
    if trickle_time <= opts.handshake_timeout {
        return Err(format!(
            "a request of {} bytes at one byte every {:?} is complete before --handshake-timeout-ms: \
             make --trickle-interval-ms longer",
            request.len(),
            opts.trickle_interval
        )
        .into());
    }
    let fill = slots - clients;
    let tricklers = fill + opts.beyond;
    let per_process = opts.per_process.max(1);
    let processes = tricklers.div_ceil(per_process);
    let per_source = opts.source_ips.unwrap_or(4).max(1);
    let base = if opts.source_base == Ipv4Addr::LOCALHOST { TRICKLE_BASE } else { opts.source_base };

    let fds = |target, steady| {
        sys::settle_fds(pid, target, steady, opts.settle.unwrap_or(super::churn::FD_SETTLE))
            .map(|(n, _)| n)
            .map_err(|e| format!("--pid {pid}: {e}"))
    };
    let fds_baseline = fds(None, STEADY_BEFORE)?;

    // The real clients, on their own loop, until `stop`.
    let mask = Rng::seeded(u64::MAX).mask();
    let mut frame = Vec::new();
    encode_client_frame(&mut frame, OP_TEXT, opts.message.as_bytes(), mask);
    let mut close = Vec::new();
    encode_client_frame(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), mask);
    let expect = match (&opts.expect, opts.message == DEFAULT_MESSAGE) {
        (Some(text), _) => Expect::Exact(text.clone().into_bytes()),
        (None, true) => Expect::Exact(DEFAULT_REPLY.as_bytes().to_vec()),
        (None, false) => Expect::AnyText,
    };
    let opened = Arc::new(AtomicUsize::new(0));
    let paced = Arc::new(PacedPlan {
        endpoint,
        request: frame,
        expect,
        close,
        interval: opts.pace,
        opened: opened.clone(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let client_plan = Plan {
        target,
        sources: Vec::new(),
        first: 0,
        total: clients,
        alive: clients,
        connecting: opts.concurrency,
        stop: Some(stop.clone()),
    };
    let real = thread::Builder::new().name("flood-clients".into()).spawn(move || {
        let mut ended = Vec::new();
        cycle::run(&client_plan, |_, _, rng| Paced::new(paced.clone(), rng), |c, r| ended.push((c, r)))
            .map(|()| ended)
    })?;
    let up_by = Instant::now() + CLIENTS_UP;
    while opened.load(Ordering::Acquire) < clients && Instant::now() < up_by && !real.is_finished() {
        thread::sleep(Duration::from_millis(5));
    }
    let all_up = opened.load(Ordering::Acquire) == clients;

    // The flood.
    let mut children = Vec::new();
    let mut trickled = Trickled::default();
    let (mut window, mut cpu_pct, mut fds_peak) = (Duration::ZERO, None, 0);
    let window_start = Instant::now();
    let mut window_end = window_start;
    let mut trouble = Vec::new();
    if all_up {
        let cpu_before = sys::cpu_time(CpuProbe::Process(pid));
        let peak = FdPeak::start(pid);
        let limit = opts.handshake_timeout + ANSWER_GRACE;
        for i in 0..processes {
            let count = tricklers * (i + 1) / processes - tricklers * i / processes;
            let first = u32::from(base).checked_add((i * per_source) as u32).map(Ipv4Addr::from);
            let Some(first) = first else { return Err("source addresses run past 255.255.255.255".into()) };
            let args: Vec<String> = [
                ("--url", opts.url.clone()),
                ("--connections", count.to_string()),
                ("--concurrency", opts.concurrency.to_string()),
                ("--source-base", first.to_string()),
                ("--source-ips", per_source.to_string()),
                ("--trickle-interval-ms", opts.trickle_interval.as_millis().to_string()),
                ("--timeout-s", limit.as_secs_f64().to_string()),
            ]
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_string(), value])
            .collect();
            children.push(TrickleProcess::start(&args)?);
        }
        for child in &children {
            match child.next(limit + ANSWER_GRACE) {
                Ok(v) => trickled.add(&v),
                Err(e) => trouble.push(e),
            }
        }
        window_end = Instant::now();
        window = window_end.saturating_duration_since(window_start);
        fds_peak = peak.stop();
        if let (Ok(before), Ok(after)) = (cpu_before, sys::cpu_time(CpuProbe::Process(pid))) {
            cpu_pct =
                Some(100.0 * after.saturating_sub(before).as_secs_f64() / window.as_secs_f64().max(1e-9));
        }
    } else {
        trouble.push(format!("only {} of {clients} real clients connected", opened.load(Ordering::Acquire)));
    }

    // The slots come back: once the tricklers are reaped, every free slot opens again.
    let fds_after_flood = fds(Some(fds_baseline + clients as u64), SETTLED_AFTER)?;
    let mut reopened = 0u64;
    let mut reopen_failures: BTreeMap<String, u64> = BTreeMap::new();
    if trouble.is_empty() {
        let n = children.len();
        for (i, child) in children.iter_mut().enumerate() {
            child.say(&format!("reopen {}", fill * (i + 1) / n - fill * i / n))?;
        }
        for child in &children {
            match child.next(opts.timeout + ANSWER_GRACE) {
                Ok(v) => reopened += v["established"].as_u64().unwrap_or(0),
                Err(e) => trouble.push(e),
            }
        }
    }
    for child in children {
        match child.finish(opts.timeout + ANSWER_GRACE) {
            Ok(v) => {
                for (reason, count) in v["failures"].as_object().into_iter().flatten() {
                    *reopen_failures.entry(reason.clone()).or_insert(0) += count.as_u64().unwrap_or(0);
                }
            }
            Err(e) => trouble.push(e),
        }
    }
    stop.store(true, Ordering::Release);
    let ended = real.join().map_err(|_| "the real clients' thread panicked")??;
    let served = Served::of(&ended, window_start, window_end);
    let fds_end = fds(Some(fds_baseline), SETTLED_AFTER)?;

    let facts = Facts {
        slots,
        clients,
        fill,
        tricklers,
        processes,
        sources: processes * per_source,
        window,
        cpu_pct,
        fds_baseline,
        fds_peak,
        fds_after_flood,
        fds_end,
        trickled,
        served,
        reopened,
        reopen_failures,
        trouble,
    };
    let criteria = facts.criteria(opts);
    let ok = criteria.iter().all(|c| c.ok);
    if opts.json {
        println!("{}", facts.json(opts, &criteria));
    } else {
        facts.print(opts, &criteria);
    }
    Ok(i32::from(!ok))
}

/// Everything a flood run found.
#[derive(Debug)]
struct Facts {
    slots: usize,
    clients: usize,
    fill: usize,
    tricklers: usize,
    processes: usize,
    sources: usize,
    window: Duration,
    cpu_pct: Option<f64>,
    fds_baseline: u64,
    fds_peak: u64,
    fds_after_flood: u64,
    fds_end: u64,
    trickled: Trickled,
    served: Served,
    reopened: u64,
    reopen_failures: BTreeMap<String, u64>,
    trouble: Vec<String>,
}

/// One criterion of the verdict.
#[derive(Debug)]
struct Criterion {
    name: &'static str,
    ok: bool,
    detail: String,
}

impl Facts {
    fn criteria(&self, opts: &BenchOptions) -> Vec<Criterion> {
        let s = &self.served;
        let t = &self.trickled;
        let (got_408, got_503) = (t.status("408"), t.status("503"));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        vec![
            Criterion {
                name: "clients_served",
                ok: self.trouble.is_empty()
                    && s.connected == self.clients
                    && s.failures.is_empty()
                    && s.mismatches == 0
                    && s.min_per_client > 0
                    && s.max_gap < opts.handshake_timeout,
                detail: format!(
                    "{} of {} connected, {} lost or failed, {} wrong replies, at least {} round trips \
                     each, longest wait {:.0} ms (under the handshake timeout {:.0} ms)",
                    s.connected,
                    self.clients,
                    s.failures.values().sum::<u64>(),
                    s.mismatches,
                    s.min_per_client,
                    ms(s.max_gap),
                    ms(opts.handshake_timeout)
                ),
            },
            Criterion {
                name: "tricklers_answered",
                ok: got_408 >= self.fill as u64
                    && got_408 + got_503 == self.tricklers as u64
                    && t.others() == 0,
                detail: format!(
                    "{got_408} got 408 (the {} free slots: at least that many), {got_503} got 503 \
                     (beyond the limit: {} expected), {} anything else",
                    self.fill,
                    self.tricklers - self.fill,
                    t.others()
                ),
            },
            Criterion {
                name: "server_cpu",
                ok: self.cpu_pct.is_some_and(|p| p <= opts.max_cpu_pct),
                detail: format!(
                    "{} of one core over the flood (at most {} %)",
                    self.cpu_pct.map_or("unknown".into(), |p| format!("{p:.1} %")),
                    opts.max_cpu_pct
                ),
            },
            Criterion {
                name: "slots_back",
                ok: self.reopened == self.fill as u64,
                detail: format!("{} of {} new connections opened and held at once", self.reopened, self.fill),
            },
            Criterion {
                name: "fds_back_to_baseline",
                ok: self.fds_end <= self.fds_baseline,
                detail: format!("{} -> {}", self.fds_baseline, self.fds_end),
            },
        ]
    }

    fn json(&self, opts: &BenchOptions, criteria: &[Criterion]) -> Value {
        let s = &self.served;
        let t = &self.trickled;
        let round = |v: f64| (v * 10.0).round() / 10.0;
        json!({
            "mode": "flood",
            "url": opts.url,
            "slots": self.slots,
            "handshake_timeout_ms": opts.handshake_timeout.as_millis() as u64,
            "trickle_interval_ms": opts.trickle_interval.as_millis() as u64,
            "clients": self.clients,
            "client_interval_ms": round(opts.pace.as_secs_f64() * 1000.0),
            "tricklers": self.tricklers,
            "trickle_processes": self.processes,
            "trickle_source_addresses": self.sources,
            "flood": {
                "duration_s": (self.window.as_secs_f64() * 100.0).round() / 100.0,
                "server_cpu_pct": self.cpu_pct.map(round),
                "server_fds_baseline": self.fds_baseline,
                "server_fds_peak": self.fds_peak,
                "server_fds_after": self.fds_after_flood,
            },
            "real_clients": {
                "connected": s.connected,
                "failures": s.failures,
                "mismatches": s.mismatches,
                "round_trips": s.round_trips,
                "round_trips_per_s": round(per_second(s.round_trips, self.window)),
                "min_round_trips_per_client": s.min_per_client,
                "max_gap_ms": round(s.max_gap.as_secs_f64() * 1000.0),
                "max_gap_from_ms": round(s.max_gap_from.as_secs_f64() * 1000.0),
                "latency_us": Latency::of(&s.latency).to_json(),
            },
            "trickle_answers": {
                "statuses": t.statuses,
                "failures": t.failures,
                "408": t.status("408"),
                "503": t.status("503"),
                "to_408_ms": {"min": t.to_408_min_ms, "p50": t.to_408_p50_ms, "max": t.to_408_max_ms},
            },
            "slots_back": {"wanted": self.fill, "established": self.reopened, "failures": self.reopen_failures},
            "fds_end": self.fds_end,
            "trouble": self.trouble,
            "criteria": criteria.iter().map(|c| (c.name.to_string(), json!({"ok": c.ok, "detail": c.detail})))
                .collect::<serde_json::Map<_, _>>(),
            "ok": criteria.iter().all(|c| c.ok),
        })
    }

    fn print(&self, opts: &BenchOptions, criteria: &[Criterion]) {
        let lat = Latency::of(&self.served.latency);
        println!(
            "gearsock bench flood: {}, {} slots, handshake timeout {} ms: {} real clients, {} tricklers \
             ({} beyond the limit) in {} processes from {} source addresses",
            opts.url,
            self.slots,
            opts.handshake_timeout.as_millis(),
            self.clients,
            self.tricklers,
            self.tricklers - self.fill,
            self.processes,
            self.sources
        );
        println!(
            "  flood {:.1} s: real clients {} round trips ({:.0}/s), p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            self.window.as_secs_f64(),
            self.served.round_trips,
            per_second(self.served.round_trips, self.window),
            lat.p50,
            lat.p99,
            lat.max
        );
        println!(
            "  tricklers: {:?}, failures {:?}; 408 after {:.0} to {:.0} ms",
            self.trickled.statuses,
            self.trickled.failures,
            self.trickled.to_408_min_ms,
            self.trickled.to_408_max_ms
        );
        println!(
            "  server descriptors: {} before, {} at the peak, {} after the flood, {} at the end",
            self.fds_baseline, self.fds_peak, self.fds_after_flood, self.fds_end
        );
        for t in &self.trouble {
            println!("  trouble: {t}");
        }
        for c in criteria {
            println!("  {}: {} ({})", c.name, if c.ok { "met" } else { "NOT MET" }, c.detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trickle(t0: Instant) -> Trickle {
        Trickle::new(
            Arc::new(b"GET / HTTP/1.1\r\n".to_vec()),
            Duration::from_millis(500),
            t0,
            Duration::from_secs(3),
        )
    }

    #[test]
    fn a_trickler_sends_one_byte_per_interval_until_answered() {
        let t0 = Instant::now();
        let mut t = trickle(t0);
        let mut out = Vec::new();
        t.on_connect(t0, &mut out);
        assert_eq!(out, b"G");
        assert_eq!(t.next_tick(), Some(t0 + Duration::from_millis(500)));
        // Early ticks (the deadline's heap entry, a stale one) send nothing.
        t.on_tick(t0 + Duration::from_millis(100), &mut out).expect("tick");
        assert_eq!(out, b"G");
        t.on_tick(t0 + Duration::from_millis(500), &mut out).expect("tick");
        assert_eq!(out, b"GE");
        let t1 = t0 + Duration::from_millis(900);
        let answer = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 4\r\n\r\nlate";
        assert_eq!(t.on_input(&answer[..10], t1, &mut out), Ok(0));
        assert_eq!(t.on_input(answer, t1, &mut out), Ok(answer.len()));
        assert_eq!((t.status, t.answered_after), (Some(408), Some(Duration::from_millis(900))));
        assert_eq!(t.next_tick(), Some(t0 + Duration::from_secs(3)), "no more bytes, only the deadline");
        assert!(!t.is_done(), "done once the server hangs up");
        assert_eq!(t.on_hangup(Hangup::Eof, t1), Ok(()));
        assert!(t.is_done());
    }

    #[test]
    fn a_refusal_cut_by_a_reset_still_counts_but_silence_does_not() {
        let t0 = Instant::now();
        let mut t = trickle(t0);
        t.on_connect(t0, &mut Vec::new());
        let refusal = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        t.on_input(refusal, t0, &mut Vec::new()).expect("answer");
        assert_eq!(t.on_hangup(Hangup::Error("connection reset".into()), t0), Ok(()));
        assert_eq!(t.status, Some(503));

        let mut t = trickle(t0);
        t.on_connect(t0, &mut Vec::new());
        assert!(t.on_hangup(Hangup::Eof, t0).unwrap_err().contains("without an answer"));
        let mut t = trickle(t0);
        assert_eq!(t.on_tick(t0 + Duration::from_secs(3), &mut Vec::new()), Err("no answer".into()));
    }

    fn paced_plan() -> Arc<PacedPlan> {
        Arc::new(PacedPlan {
            endpoint: Arc::new(Endpoint { host: "h:1".into(), path: "/".into() }),
            request: b"REQ".to_vec(),
            expect: Expect::Exact(b"got it!".to_vec()),
            close: b"BYE".to_vec(),
            interval: Duration::from_millis(10),
            opened: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn text(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x81, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_real_client_keeps_one_request_out_at_its_pace() {
        let t0 = Instant::now();
        let plan = paced_plan();
        let mut c = Paced::new(plan.clone(), &mut Rng::seeded(3));
        let mut out = Vec::new();
        c.on_connect(t0, &mut out);
        let answer =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {}\r\n\r\n", c.accept);
        out.clear();
        c.on_input(answer.as_bytes(), t0, &mut out).expect("upgrade");
        assert_eq!((out.as_slice(), plan.opened.load(Ordering::Acquire)), (&b"REQ"[..], 1));
        // A quick reply: the next request waits for the interval.
        out.clear();
        let t1 = t0 + Duration::from_millis(2);
        c.on_input(&text(b"got it!"), t1, &mut out).expect("reply");
        assert!(out.is_empty());
        assert_eq!(c.next_tick(), Some(t0 + Duration::from_millis(10)));
        c.on_tick(t0 + Duration::from_millis(10), &mut out).expect("tick");
        assert_eq!(out, b"REQ");
        // A slow reply: the next request goes at once.
        out.clear();
        c.on_input(&text(b"nope"), t0 + Duration::from_millis(30), &mut out).expect("reply");
        assert_eq!((out.as_slice(), c.mismatches), (&b"REQ"[..], 1));
        assert_eq!(c.replies, [(t1, Duration::from_millis(2))]);
        out.clear();
        assert_eq!(c.on_stop(&mut out), Ok(()));
        assert_eq!(out, b"BYE");
    }

    #[test]
    fn the_window_cuts_replies_and_finds_the_longest_wait() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Paced::new(paced_plan(), &mut Rng::seeded(1));
        a.open = true;
        a.replies = vec![
            (ms(5), Duration::from_millis(1)),
            (ms(20), Duration::from_millis(1)),
            (ms(90), Duration::from_millis(3)),
        ];
        let mut b = Paced::new(paced_plan(), &mut Rng::seeded(2));
        b.open = true;
        b.replies = vec![(ms(50), Duration::from_millis(2))];
        let served = Served::of(&[(a, Ok(())), (b, Ok(()))], ms(10), ms(100));
        assert_eq!((served.connected, served.round_trips, served.min_per_client), (2, 3, 1));
        // a: 10..20, 20..90, 90..100; b: 10..50, 50..100.
        assert_eq!(
            (served.max_gap, served.max_gap_from),
            (Duration::from_millis(70), Duration::from_millis(10))
        );
    }

    #[test]
    fn trickle_counts_add_up_across_processes() {
        let mut t = Trickled::default();
        t.add(&json!({"statuses": {"408": 3, "503": 1}, "failures": {}, "to_408_ms": {"count": 3, "p50": 1001.0, "min": 1000.5, "max": 1003.0}}));
        t.add(&json!({"statuses": {"408": 2, "400": 1}, "failures": {"no answer": 1}, "to_408_ms": {"count": 2, "p50": 1002.0, "min": 1000.1, "max": 1002.0}}));
        assert_eq!((t.status("408"), t.status("503"), t.others()), (5, 1, 2));
        assert_eq!((t.to_408_min_ms, t.to_408_max_ms), (1000.1, 1003.0));
    }
}
