//! `gearsock bench churn`: connections that come and go, to show the server gives back what
//! each one took. Every cycle is one whole connection: TCP connect, WebSocket upgrade, one
//! round trip (the article's `worker.complete`, answered `got it!`), then the close handshake
//! (our close frame, the server's answer, the server's FIN), and only then our close.
//! `--connections` cycles run at once until `--cycles` have run.
//!
//! With `--pid`, the server's VmRSS and open descriptors (`/proc/PID/fd`) are read before the
//! first cycle and after every tenth of the cycles, each time once the server has reaped what
//! the cycles opened (its descriptor count is back at the baseline, or has stopped moving). The
//! verdict: no cycle failed, RSS grew at most `--max-growth-pct` from the first tenth to the
//! end (the first tenth is where allocator pools, buffers and tables reach their working size),
//! and the descriptors are back at the baseline.

use std::collections::BTreeMap;
use std::error::Error;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::cycle::{self, Hangup, Plan, Script};
use super::driver::Rng;
use super::meter::{Latency, bump, latency_histogram, per_second, record};
use super::session::{Endpoint, Expect};
use super::sys;
use super::wire::{self, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_client_frame, parse_server_frame};
use super::{BenchOptions, DEFAULT_MESSAGE, DEFAULT_REPLY, parse_url, resolve};

/// Checkpoints: the server is read after each tenth of the cycles.
const TENTHS: usize = 10;
/// Largest server frame a cycle accepts (the replies are a few bytes).
const MAX_FRAME_BYTES: usize = 1 << 20;
/// A descriptor count unchanged this long has settled, even above the baseline.
/// How long churn and flood wait at most for the server's descriptors (`--settle-s`).
pub(super) const FD_SETTLE: Duration = Duration::from_secs(10);
const SETTLED_AFTER: Duration = Duration::from_secs(1);
/// The baseline is read once the count has not moved for this long (a connection the server
/// was just closing, a health check's, must not count in it).
const STEADY_BEFORE: Duration = Duration::from_millis(300);

/// What every cycle of a run sends and expects, framed and masked once.
#[derive(Debug)]
pub struct ChurnPlan {
    /// `Host` and path of the upgrade request.
    pub endpoint: Arc<Endpoint>,
    /// The one request, as it goes on the wire.
    pub request: Vec<u8>,
    /// The reply it must get.
    pub expect: Expect,
    /// Our close frame (1000).
    pub close: Vec<u8>,
    /// A cycle not over after this fails.
    pub timeout: Duration,
}

/// Where a cycle is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Connecting,
    Upgrading,
    /// The request is out; waiting for its reply.
    Replying,
    /// Our close frame is out; waiting for the server's.
    Closing,
    /// The server answered our close; waiting for its FIN.
    Closed,
    Done,
}

/// One cycle, sans-IO:
///
/// ```text
/// Connecting --TCP up: upgrade request--> Upgrading --101: request--> Replying
///   --expected reply: close frame--> Closing --server's close frame--> Closed --FIN--> Done
/// ```
#[derive(Debug)]
pub struct Cycle {
    plan: Arc<ChurnPlan>,
    key: String,
    accept: String,
    mask: [u8; 4],
    step: Step,
    started: Instant,
    sent: Option<Instant>,
    /// The reply's round trip, once it came.
    pub reply_latency: Option<Duration>,
    /// When the whole cycle ended well.
    pub ended: Option<Instant>,
}

impl Cycle {
    /// A cycle launched at `now`; its handshake key and frame mask come from `rng`.
    pub fn new(plan: Arc<ChurnPlan>, now: Instant, rng: &mut Rng) -> Cycle {
        let (key, accept) = wire::handshake_key(rng.bytes16());
        Cycle {
            plan,
            key,
            accept,
            mask: rng.mask(),
            step: Step::Connecting,
            started: now,
            sent: None,
            reply_latency: None,
            ended: None,
        }
    }

    /// From launch to the server's FIN.
    pub fn duration(&self) -> Option<Duration> {
        self.ended.map(|end| end.saturating_duration_since(self.started))
    }

    fn step_name(&self) -> &'static str {
        match self.step {
            Step::Connecting => "connecting",
            Step::Upgrading => "upgrading",
            Step::Replying => "waiting for the reply",
            Step::Closing => "waiting for the server's close frame",
            Step::Closed => "waiting for the server to hang up",
            Step::Done => "done",
        }
    }
}

impl Script for Cycle {
    fn on_connect(&mut self, _now: Instant, out: &mut Vec<u8>) {
        let endpoint = &self.plan.endpoint;
        wire::encode_upgrade_request(out, &endpoint.host, &endpoint.path, &self.key);
        self.step = Step::Upgrading;
    }

    fn on_input(&mut self, input: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<usize, String> {
        let mut used = 0;
        if self.step == Step::Upgrading {
            match wire::parse_upgrade_response(input, &self.accept)? {
                None => return Ok(0),
                Some(head) => used = head,
            }
            out.extend_from_slice(&self.plan.request);
            self.sent = Some(now);
            self.step = Step::Replying;
        }
        while let Some(frame) =
            parse_server_frame(&input[used..], MAX_FRAME_BYTES).map_err(|e| e.to_string())?
        {
            let payload = &input[used + frame.payload_start..used + frame.len];
            used += frame.len;
            match (self.step, frame.opcode) {
                (Step::Replying | Step::Closing, OP_PING) => {
                    encode_client_frame(out, OP_PONG, payload, self.mask);
                }
                (Step::Replying, OP_TEXT) if frame.fin => {
                    if !self.plan.expect.accepts(payload) {
                        return Err(format!("unexpected reply {:?}", String::from_utf8_lossy(payload)));
                    }
                    self.reply_latency = self.sent.map(|sent| now.saturating_duration_since(sent));
                    out.extend_from_slice(&self.plan.close);
                    self.step = Step::Closing;
                }
                (Step::Closing, OP_CLOSE) => self.step = Step::Closed,
                (_, OP_CLOSE) => {
                    return Err(format!("close frame from the server while {}", self.step_name()));
                }
                (_, opcode) => {
                    return Err(format!("unexpected frame (opcode {opcode}) while {}", self.step_name()));
                }
            }
        }
        Ok(used)
    }

    fn on_hangup(&mut self, how: Hangup, now: Instant) -> Result<(), String> {
        match (how, self.step) {
            (Hangup::Eof, Step::Closed) => {
                self.step = Step::Done;
                self.ended = Some(now);
                Ok(())
            }
            (Hangup::Eof, _) => Err(format!("server hung up while {}", self.step_name())),
            (Hangup::Error(e), _) => Err(format!("{e} while {}", self.step_name())),
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        (self.step != Step::Done).then_some(self.started + self.plan.timeout)
    }

    fn on_tick(&mut self, now: Instant, _out: &mut Vec<u8>) -> Result<(), String> {
        if now >= self.started + self.plan.timeout {
            return Err(format!("timeout while {}", self.step_name()));
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.step == Step::Done
    }
}

/// What a stretch of cycles counted.
#[derive(Debug)]
struct Tally {
    completed: u64,
    failures: BTreeMap<String, u64>,
    /// Whole cycles, launch to the server's FIN.
    cycle: Histogram<u64>,
    /// The round trip inside each cycle.
    reply: Histogram<u64>,
    /// Wall time spent cycling (settling not included).
    elapsed: Duration,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            completed: 0,
            failures: BTreeMap::new(),
            cycle: latency_histogram(),
            reply: latency_histogram(),
            elapsed: Duration::ZERO,
        }
    }
}

impl Tally {
    fn count(&mut self, cycle: &Cycle, outcome: Result<(), String>) {
        match (outcome, cycle.duration()) {
            (Ok(()), Some(took)) => {
                self.completed += 1;
                record(&mut self.cycle, took);
                if let Some(rt) = cycle.reply_latency {
                    record(&mut self.reply, rt);
                }
            }
            (Ok(()), None) => bump(&mut self.failures, "ended without finishing"),
            (Err(reason), _) => bump(&mut self.failures, &reason),
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.completed += other.completed;
        for (reason, n) in &other.failures {
            *self.failures.entry(reason.clone()).or_insert(0) += n;
        }
        let _ = self.cycle.add(&other.cycle);
        let _ = self.reply.add(&other.reply);
    }

    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// The server as read at one checkpoint.
#[derive(Clone, Copy, Debug)]
struct Checkpoint {
    /// Cycles run before this reading.
    cycles: u64,
    rss: sys::Resident,
    /// The `[heap]` mapping's size and resident part.
    heap: Option<(u64, u64)>,
    fds: u64,
    /// How long the descriptor count took to settle.
    settle: Duration,
}

/// `gearsock bench churn`.
pub fn run_churn(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let url = parse_url(&opts.url)?;
    let target = resolve(&url.authority)?;
    let endpoint = Arc::new(Endpoint { host: url.authority, path: url.path });
    let expect = match (&opts.expect, opts.message == DEFAULT_MESSAGE) {
        (Some(text), _) => Expect::Exact(text.clone().into_bytes()),
        (None, true) => Expect::Exact(DEFAULT_REPLY.as_bytes().to_vec()),
        (None, false) => Expect::AnyText,
    };
    let mask = Rng::seeded(u64::MAX).mask();
    let mut request = Vec::new();
    encode_client_frame(&mut request, OP_TEXT, opts.message.as_bytes(), mask);
    let mut close = Vec::new();
    encode_client_frame(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), mask);
    let plan = Arc::new(ChurnPlan { endpoint, request, expect, close, timeout: opts.timeout });
    let sources = churn_sources(opts, target)?;

    let mut checkpoints = Vec::new();
    let baseline = match opts.pid {
        Some(pid) => {
            let (fds, settle) = sys::settle_fds(pid, None, STEADY_BEFORE, opts.settle.unwrap_or(FD_SETTLE))
                .map_err(|e| format!("--pid {pid}: {e}"))?;
            checkpoints.push(read_server(pid, 0, fds, settle)?);
            Some(fds)
        }
        None => None,
    };
    let mut total = Tally::default();
    let mut done = 0usize;
    for tenth in 1..=TENTHS {
        let count = opts.cycles * tenth / TENTHS - done;
        if count == 0 {
            continue;
        }
        let stretch = run_stretch(opts, &plan, target, &sources, done, count)?;
        done += count;
        total.merge(&stretch);
        total.elapsed += stretch.elapsed;
        if let (Some(pid), Some(baseline)) = (opts.pid, baseline) {
            let (fds, settle) =
                sys::settle_fds(pid, Some(baseline), SETTLED_AFTER, opts.settle.unwrap_or(FD_SETTLE))
                    .map_err(|e| format!("--pid {pid}: {e}"))?;
            checkpoints.push(read_server(pid, done as u64, fds, settle)?);
        }
    }
    let verdict = Verdict::of(opts, &total, &checkpoints);
    if opts.json {
        println!("{}", churn_json(opts, &total, &checkpoints, &verdict, sources.len()));
    } else {
        print_churn(opts, &total, &checkpoints, &verdict);
    }
    Ok(i32::from(!verdict.ok()))
}

/// Reads the server's memory for a checkpoint.
fn read_server(pid: u32, cycles: u64, fds: u64, settle: Duration) -> Result<Checkpoint, String> {
    let rss = sys::resident(pid).map_err(|e| format!("--pid {pid}: {e}"))?;
    // The heap's figures explain RSS growth; without them (no smaps) the verdict stands.
    let heap = sys::heap_mapping(pid).ok().flatten();
    Ok(Checkpoint { cycles, rss, heap, fds, settle })
}

/// Source addresses for a churn run: `--source-ips` from `--source-base`, by default enough
/// that the cycles need no address's port range more than 3/4 (closed ports are free again at
/// once on our side, but the server's side keeps each pair in TIME_WAIT for a minute).
fn churn_sources(opts: &BenchOptions, target: std::net::SocketAddr) -> Result<Vec<Ipv4Addr>, String> {
    super::modes::sources_for(opts, target, opts.cycles)
}

/// Runs cycles `first..first + count` on `--threads` loops, `--connections` at once in all.
fn run_stretch(
    opts: &BenchOptions,
    plan: &Arc<ChurnPlan>,
    target: std::net::SocketAddr,
    sources: &[Ipv4Addr],
    first: usize,
    count: usize,
) -> Result<Tally, String> {
    let threads = opts.threads.clamp(1, count);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let share = count * (t + 1) / threads - count * t / threads;
            let alive = (opts.connections / threads + usize::from(t < opts.connections % threads)).max(1);
            let loop_plan = Plan {
                target,
                sources: sources.to_vec(),
                first: first + count * t / threads,
                total: share,
                alive,
                connecting: alive,
                stop: None,
            };
            let plan = plan.clone();
            thread::Builder::new().name(format!("churn-{t}")).spawn(move || {
                let mut tally = Tally::default();
                cycle::run(
                    &loop_plan,
                    |_, now, rng| Cycle::new(plan.clone(), now, rng),
                    |cycle, outcome| tally.count(&cycle, outcome),
                )
                .map(|()| tally)
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot start a churn thread: {e}"))?;
    let mut tally = Tally::default();
    for handle in handles {
        tally.merge(&handle.join().map_err(|_| "a churn thread panicked".to_string())??);
    }
    tally.elapsed = started.elapsed();
    Ok(tally)
}

/// The criteria and how the run met them.
#[derive(Debug)]
struct Verdict {
    failed_cycles: u64,
    /// RSS growth from the first tenth to the end, in percent, and the limit.
    growth_pct: Option<f64>,
    max_growth_pct: f64,
    /// Descriptors at the baseline and at the end.
    fds: Option<(u64, u64)>,
}

impl Verdict {
    fn of(opts: &BenchOptions, total: &Tally, checkpoints: &[Checkpoint]) -> Verdict {
        let first_tenth = checkpoints.get(1);
        let (first, last) = (checkpoints.first(), checkpoints.last());
        let growth_pct = first_tenth
            .zip(last)
            .filter(|(a, b)| b.cycles > a.cycles)
            .map(|(a, b)| 100.0 * (b.rss.total as f64 - a.rss.total as f64) / (a.rss.total.max(1) as f64));
        Verdict {
            failed_cycles: total.failed()
                + (opts.cycles as u64).saturating_sub(total.completed + total.failed()),
            growth_pct,
            max_growth_pct: opts.max_growth_pct,
            fds: first.zip(last).map(|(a, b)| (a.fds, b.fds)),
        }
    }

    fn cycles_ok(&self) -> bool {
        self.failed_cycles == 0
    }

    fn rss_ok(&self) -> Option<bool> {
        self.growth_pct.map(|g| g <= self.max_growth_pct)
    }

    fn fds_ok(&self) -> Option<bool> {
        self.fds.map(|(before, after)| after <= before)
    }

    fn ok(&self) -> bool {
        self.cycles_ok() && self.rss_ok() != Some(false) && self.fds_ok() != Some(false)
    }
}

fn round(v: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (v * scale).round() / scale
}

fn churn_json(
    opts: &BenchOptions,
    total: &Tally,
    checkpoints: &[Checkpoint],
    verdict: &Verdict,
    sources: usize,
) -> Value {
    let server = opts.pid.map_or(Value::Null, |pid| {
        let at = |i: usize| checkpoints.get(i).map(|c| c.rss.total);
        json!({
            "pid": pid,
            "checkpoints": checkpoints.iter().map(|c| json!({
                "cycles": c.cycles,
                "rss_bytes": c.rss.total,
                "rss_anon_bytes": c.rss.anon,
                "rss_file_bytes": c.rss.file,
                "heap_bytes": c.heap.map(|h| h.0),
                "heap_resident_bytes": c.heap.map(|h| h.1),
                "fds": c.fds,
                "settle_ms": round(c.settle.as_secs_f64() * 1000.0, 1),
            })).collect::<Vec<_>>(),
            "rss_baseline_bytes": at(0),
            "rss_first_tenth_bytes": at(1),
            "rss_end_bytes": checkpoints.last().map(|c| c.rss.total),
            "rss_growth_pct": verdict.growth_pct.map(|g| round(g, 3)),
            "fds_baseline": verdict.fds.map(|f| f.0),
            "fds_end": verdict.fds.map(|f| f.1),
        })
    });
    json!({
        "mode": "churn",
        "url": opts.url,
        "cycles": opts.cycles,
        "connections": opts.connections,
        "threads": opts.threads,
        "source_addresses": sources,
        "message": opts.message,
        "completed": total.completed,
        "failed": total.failed(),
        "failures": total.failures,
        "elapsed_s": round(total.elapsed.as_secs_f64(), 3),
        "cycles_per_s": round(per_second(total.completed, total.elapsed), 1),
        "cycle_latency_us": Latency::of(&total.cycle).to_json(),
        "reply_latency_us": Latency::of(&total.reply).to_json(),
        "server": server,
        "criteria": {
            "every_cycle_completed": {"ok": verdict.cycles_ok(), "failed": verdict.failed_cycles},
            "rss_growth": {
                "ok": verdict.rss_ok(),
                "from_cycles": checkpoints.get(1).map(|c| c.cycles),
                "growth_pct": verdict.growth_pct.map(|g| round(g, 3)),
                "max_pct": verdict.max_growth_pct,
            },
            "fds_back_to_baseline": {
                "ok": verdict.fds_ok(),
                "baseline": verdict.fds.map(|f| f.0),
                "end": verdict.fds.map(|f| f.1),
            },
        },
        "ok": verdict.ok(),
    })
}

fn print_churn(opts: &BenchOptions, total: &Tally, checkpoints: &[Checkpoint], verdict: &Verdict) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let lat = Latency::of(&total.cycle);
    println!(
        "gearsock bench churn: {}, {} cycles, {} at once, {} thread(s)",
        opts.url, opts.cycles, opts.connections, opts.threads
    );
    println!(
        "  {} completed, {} failed in {:.2} s: {:.0} cycles/s; cycle p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        total.completed,
        total.failed(),
        total.elapsed.as_secs_f64(),
        per_second(total.completed, total.elapsed),
        lat.p50,
        lat.p99,
        lat.max
    );
    for (reason, n) in &total.failures {
        println!("  failed: {reason}: {n}");
    }
    let kib = |b: u64| b / 1024;
    for c in checkpoints {
        let heap = c.heap.map_or(String::new(), |(size, rss)| {
            format!(", heap {} of {} KiB resident", kib(rss), kib(size))
        });
        println!(
            "  after {:>7} cycles: RSS {:.3} MiB ({} KiB anon, {} KiB file{heap}), {} descriptors \
             (settled in {} ms)",
            c.cycles,
            mib(c.rss.total),
            kib(c.rss.anon),
            kib(c.rss.file),
            c.fds,
            c.settle.as_millis()
        );
    }
    let yes = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!("  every cycle completed: {}", yes(verdict.cycles_ok()));
    if let (Some(g), Some(ok)) = (verdict.growth_pct, verdict.rss_ok()) {
        println!(
            "  RSS growth from the first tenth to the end: {g:+.3} % (at most {} %): {}",
            verdict.max_growth_pct,
            yes(ok)
        );
    }
    if let (Some((before, after)), Some(ok)) = (verdict.fds, verdict.fds_ok()) {
        println!("  descriptors back to the baseline: {before} -> {after}: {}", yes(ok));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn plan() -> Arc<ChurnPlan> {
        let mut request = Vec::new();
        encode_client_frame(&mut request, OP_TEXT, b"hi", MASK);
        let mut close = Vec::new();
        encode_client_frame(&mut close, OP_CLOSE, &1000u16.to_be_bytes(), MASK);
        Arc::new(ChurnPlan {
            endpoint: Arc::new(Endpoint { host: "h:1".into(), path: "/".into() }),
            request,
            expect: Expect::Exact(b"got it!".to_vec()),
            close,
            timeout: Duration::from_secs(5),
        })
    }

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `wire` a byte at a time, as the loop would with tiny reads; returns the output.
    fn feed(cycle: &mut Cycle, wire: &[u8], now: Instant) -> Result<Vec<u8>, String> {
        let (mut out, mut pending) = (Vec::new(), Vec::new());
        for byte in wire {
            pending.push(*byte);
            let used = cycle.on_input(&pending, now, &mut out)?;
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "all input used");
        Ok(out)
    }

    fn upgraded(t0: Instant) -> (Cycle, Vec<u8>) {
        let plan = plan();
        let mut cycle = Cycle::new(plan, t0, &mut Rng::seeded(7));
        let mut hello = Vec::new();
        cycle.on_connect(t0, &mut hello);
        assert!(String::from_utf8_lossy(&hello).contains(&format!("Sec-WebSocket-Key: {}", cycle.key)));
        let answer =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {}\r\n\r\n", cycle.accept);
        (cycle, answer.into_bytes())
    }

    #[test]
    fn a_cycle_is_upgrade_round_trip_close_handshake_and_fin() {
        let t0 = Instant::now();
        let (mut cycle, answer) = upgraded(t0);
        let p = cycle.plan.clone();
        assert_eq!(feed(&mut cycle, &answer, t0), Ok(p.request.clone()));
        let t1 = t0 + Duration::from_millis(3);
        assert_eq!(feed(&mut cycle, &server_frame(OP_TEXT, b"got it!"), t1), Ok(p.close.clone()));
        assert_eq!(cycle.reply_latency, Some(Duration::from_millis(3)));
        // The server's close answer; the cycle is not over until the server hangs up.
        assert_eq!(feed(&mut cycle, &server_frame(OP_CLOSE, &[0x03, 0xE8]), t1), Ok(Vec::new()));
        assert!(!cycle.is_done());
        let t2 = t0 + Duration::from_millis(4);
        assert_eq!(cycle.on_hangup(Hangup::Eof, t2), Ok(()));
        assert!(cycle.is_done());
        assert_eq!(cycle.duration(), Some(Duration::from_millis(4)));
        assert_eq!(cycle.next_tick(), None);
    }

    #[test]
    fn wrong_replies_early_hangups_and_deadlines_fail_the_cycle() {
        let t0 = Instant::now();
        let (mut cycle, answer) = upgraded(t0);
        let wire = [answer, server_frame(OP_TEXT, b"nope")].concat();
        assert!(feed(&mut cycle, &wire, t0).unwrap_err().contains("unexpected reply"));

        // A FIN before the server answered our close is not a close handshake.
        let (mut cycle, answer) = upgraded(t0);
        let wire = [answer, server_frame(OP_TEXT, b"got it!")].concat();
        feed(&mut cycle, &wire, t0).expect("reply");
        assert!(cycle.on_hangup(Hangup::Eof, t0).unwrap_err().contains("close frame"));

        let (mut cycle, _) = upgraded(t0);
        let deadline = cycle.next_tick().expect("deadline");
        assert_eq!(deadline, t0 + Duration::from_secs(5));
        assert!(cycle.on_tick(deadline, &mut Vec::new()).unwrap_err().contains("upgrading"));

        let (mut cycle, _) = upgraded(t0);
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(feed(&mut cycle, refused, t0), Err("handshake: HTTP 503".into()));
    }

    #[test]
    fn pings_are_answered_mid_cycle() {
        let t0 = Instant::now();
        let (mut cycle, answer) = upgraded(t0);
        feed(&mut cycle, &answer, t0).expect("upgrade");
        let out = feed(&mut cycle, &server_frame(OP_PING, b"p"), t0).expect("ping");
        let mut pong = Vec::new();
        encode_client_frame(&mut pong, OP_PONG, b"p", cycle.mask);
        assert_eq!(out, pong);
    }

    #[test]
    fn growth_is_measured_from_the_first_tenth() {
        let opts = BenchOptions { cycles: 100, max_growth_pct: 1.0, ..BenchOptions::default() };
        let mut total = Tally { completed: 100, ..Tally::default() };
        let at = |cycles, total, fds| Checkpoint {
            cycles,
            rss: sys::Resident { total, anon: 0, file: 0 },
            heap: None,
            fds,
            settle: Duration::ZERO,
        };
        let points = [at(0, 1000, 9), at(10, 2000, 9), at(100, 2010, 9)];
        let v = Verdict::of(&opts, &total, &points);
        assert_eq!((v.growth_pct, v.rss_ok(), v.fds_ok(), v.ok()), (Some(0.5), Some(true), Some(true), true));
        let points = [at(0, 1000, 9), at(10, 2000, 9), at(100, 2030, 10)];
        let v = Verdict::of(&opts, &total, &points);
        assert_eq!((v.rss_ok(), v.fds_ok(), v.ok()), (Some(false), Some(false), false));
        // Cycles that never ended count as failed.
        total.completed = 99;
        assert!(!Verdict::of(&opts, &total, &[]).ok());
    }
}
