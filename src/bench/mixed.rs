//! `gearsock bench mixed`: every kind of job at once, with each reply recorded per job, so the
//! run ends in a reconcile rather than a rate.
//!
//! Each connection keeps `--in-flight` submits outstanding, taking turns over stream and
//! background jobs of `--function` (and, with `--spawn-workers`, stream jobs of the demo
//! `fail` and `boom`), plus one article ping at a time (its plain-text lines carry no `ref`, so
//! a connection never has two). Every submit carries a `ref` that numbers it on its connection,
//! in the order sent. A job ends with exactly one terminal reply: `job.complete`, `job.failed`,
//! `job.exception`, `job.lost`, an `error` with its `ref`, or for a ping its `value:` line.
//!
//! When the server closes a connection (SIGTERM: 1001), the jobs without a terminal reply are
//! judged by what the server had read. It reads a connection's messages in order, so the jobs
//! it read are a prefix of those sent: a job that heard anything, or was sent before a job
//! that did, must have ended before the close frame (or it is `missing`); the rest were never
//! read (`unread_at_close`), which the client learns from the close itself.
//!
//! The reconcile: sent = the terminal replies by kind + unread at close + missing, with no
//! duplicate terminal, no reply for a job already ended or never sent, and no connection closed
//! except by the SIGTERM this run sends (`--sigterm-after-s`), with 1001.
//!
//! The sessions share one [`Shared`] tally (a mutex taken once per reply: a fault or soak run is
//! a few thousand replies a second, not a throughput test); the main thread reads it to sample
//! intervals, to decide when the run is over, and for the report.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::BenchOptions;
use super::driver::{Fleet, Schedule};
use super::meter::{Latency, latency_histogram, record};
use super::modes::{DemoWorkers, spec, ws_target};
use super::session::{Io, Workload, WsSession};
use super::sys;
use super::wire::{OP_TEXT, encode_client_frame};
use crate::app::PING_ACK;

/// What a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A stream submit of `--function`.
    Stream,
    /// A background submit of `--function`.
    Background,
    /// The article's `{"type":"ping"}`.
    Ping,
    /// A stream submit of the demo `fail` (WORK_FAIL).
    Fail,
    /// A stream submit of the demo `boom` (WORK_EXCEPTION).
    Boom,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Background => "background",
            Kind::Ping => "ping",
            Kind::Fail => "fail",
            Kind::Boom => "boom",
        }
    }
}

/// The terminal replies, in the order the report lists them.
const TERMINALS: [&str; 6] = ["job.complete", "job.failed", "job.exception", "job.lost", "value", "error"];

/// Counts shared by every session of a run.
#[derive(Debug)]
pub struct Shared {
    /// New jobs may be sent (cleared when the load window ends).
    sending: AtomicBool,
    /// The bench is closing its connections: a session dropped now without a close frame was
    /// not dropped by the server.
    ending: AtomicBool,
    /// When this run sent the server SIGTERM.
    term_at: OnceLock<Instant>,
    tally: Mutex<Tally>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            sending: AtomicBool::new(true),
            ending: AtomicBool::new(false),
            term_at: OnceLock::new(),
            tally: Mutex::new(Tally::default()),
        }
    }
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // A panicked session thread leaves counts that are still worth reporting.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the run counted.
#[derive(Debug)]
pub struct Tally {
    /// Jobs sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Terminal replies by kind of job, then by terminal (`TERMINALS`).
    pub ended: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Terminal replies by what they said: `job.lost: <reason>`, `error:<code>: <message>`,
    /// `value: done`, ...
    pub details: BTreeMap<String, u64>,
    /// Jobs sent but not answered yet.
    pub outstanding: u64,
    /// Jobs the server never read before it closed the connection.
    pub unread_at_close: u64,
    /// Jobs that should have had a terminal reply and did not, by why.
    pub missing: BTreeMap<String, u64>,
    /// Replies that break the protocol's promises (duplicates, replies for no job, ...).
    pub anomalies: BTreeMap<String, u64>,
    /// Close frames from the server, by code.
    pub closes: BTreeMap<String, u64>,
    /// Close frames that came before this run's SIGTERM (or without one).
    pub closed_before_term: u64,
    /// Connections that ended without a close frame while the bench was not ending them.
    pub dropped: u64,
    /// The first and last close frame.
    pub first_close: Option<Instant>,
    /// See `first_close`.
    pub last_close: Option<Instant>,
    /// Replies of any kind, and those that arrived after this run's SIGTERM.
    pub replies: u64,
    /// See `replies`.
    pub replies_after_term: u64,
    /// Terminal replies after this run's SIGTERM.
    pub terminals_after_term: u64,
    /// Job latency (sent to terminal reply) of the whole run, and of the current interval.
    pub latency: Histogram<u64>,
    /// See `latency`.
    pub interval: Histogram<u64>,
    /// Job latency by kind of job, whole run.
    pub by_kind: BTreeMap<&'static str, Histogram<u64>>,
    /// When a job of each kind last ended as it should (completed, its value, its worker's
    /// failure or exception): a kind that stops there after a fault never recovered.
    pub last_normal: BTreeMap<&'static str, Instant>,
    /// The slowest job: kind, what ended it, latency, when it was sent.
    pub slowest: Option<(&'static str, String, Duration, Instant)>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sent: BTreeMap::new(),
            ended: BTreeMap::new(),
            details: BTreeMap::new(),
            outstanding: 0,
            unread_at_close: 0,
            missing: BTreeMap::new(),
            anomalies: BTreeMap::new(),
            closes: BTreeMap::new(),
            closed_before_term: 0,
            dropped: 0,
            first_close: None,
            last_close: None,
            replies: 0,
            replies_after_term: 0,
            terminals_after_term: 0,
            latency: latency_histogram(),
            interval: latency_histogram(),
            by_kind: BTreeMap::new(),
            last_normal: BTreeMap::new(),
            slowest: None,
        }
    }
}

fn add(map: &mut BTreeMap<String, u64>, key: impl Into<String>, n: u64) {
    *map.entry(key.into()).or_insert(0) += n;
}

impl Tally {
    fn sent_total(&self) -> u64 {
        self.sent.values().sum()
    }

    fn terminal_totals(&self) -> BTreeMap<&'static str, u64> {
        let mut totals: BTreeMap<&'static str, u64> = TERMINALS.iter().map(|t| (*t, 0)).collect();
        for by_terminal in self.ended.values() {
            for (t, n) in by_terminal {
                *totals.entry(t).or_insert(0) += n;
            }
        }
        totals
    }

    fn closes_total(&self) -> u64 {
        self.closes.values().sum()
    }
}

/// What every connection of a run does.
#[derive(Debug)]
pub struct MixedPlan {
    /// Gearman function of stream and background jobs.
    pub function: String,
    /// Their payload.
    pub payload: String,
    /// The result a stream job's `job.complete` must carry (`None`: any).
    pub expect: Option<String>,
    /// Submits outstanding per connection (pings come on top, one at a time).
    pub in_flight: usize,
    /// The kinds the submit slots take turns over.
    pub rotation: Vec<Kind>,
    /// The run's shared counts.
    pub shared: Arc<Shared>,
}

/// A job sent and not yet ended.
#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// The submit slot it holds (`None`: the ping).
    slot: Option<usize>,
    sent: Instant,
    /// Some reply about it arrived (so the server read it).
    heard: bool,
    created: u32,
}

/// One connection's mixed workload.
#[derive(Debug)]
pub struct Mixed {
    plan: Arc<MixedPlan>,
    mask: [u8; 4],
    /// Outstanding jobs by `ref` (their number on this connection, in sending order).
    jobs: BTreeMap<u64, Pending>,
    ping: Option<u64>,
    next_ref: u64,
    /// Where this connection is in the rotation.
    turn: usize,
    /// The highest `ref` any reply named: everything sent before it was read by the server.
    highest_heard: Option<u64>,
    begun: bool,
    closed: bool,
    text: String,
}

/// A reply about one job, as `Mixed` tells them apart.
enum Said<'a> {
    /// Not the end of the job.
    Progress(&'a str),
    /// Its end: the terminal (`TERMINALS`), and what it said.
    End { terminal: &'static str, detail: String, value: Option<&'a Value> },
}

impl Mixed {
    /// A connection's share of `plan`, starting at `turn` in the rotation, framing with `mask`.
    pub fn new(plan: Arc<MixedPlan>, mask: [u8; 4], turn: usize) -> Self {
        Mixed {
            plan,
            mask,
            jobs: BTreeMap::new(),
            ping: None,
            next_ref: 0,
            turn,
            highest_heard: None,
            begun: false,
            closed: false,
            text: String::new(),
        }
    }

    fn send(&mut self, kind: Kind, slot: Option<usize>, io: &mut Io<'_>) {
        if self.closed || !self.plan.shared.sending.load(Ordering::Acquire) {
            return;
        }
        let reference = self.next_ref;
        self.next_ref += 1;
        let message = match kind {
            Kind::Ping => json!({"type": "ping", "ref": reference}),
            Kind::Stream | Kind::Background => json!({
                "type": "submit",
                "function": self.plan.function,
                "payload": self.plan.payload,
                "mode": if kind == Kind::Background { "background" } else { "stream" },
                "ref": reference,
            }),
            Kind::Fail => json!({"type": "submit", "function": "fail", "ref": reference}),
            Kind::Boom => json!({"type": "submit", "function": "boom", "ref": reference}),
        };
        self.text.clear();
        self.text.push_str(&message.to_string());
        encode_client_frame(io.out, OP_TEXT, self.text.as_bytes(), self.mask);
        self.jobs.insert(reference, Pending { kind, slot, sent: io.now, heard: false, created: 0 });
        if kind == Kind::Ping {
            self.ping = Some(reference);
        }
        let mut tally = self.plan.shared.tally();
        *tally.sent.entry(kind.name()).or_insert(0) += 1;
        tally.outstanding += 1;
    }

    fn submit(&mut self, slot: usize, io: &mut Io<'_>) {
        let kind = self.plan.rotation[self.turn % self.plan.rotation.len()];
        self.turn += 1;
        self.send(kind, Some(slot), io);
    }

    /// A reply about job `reference`.
    fn reply(&mut self, reference: u64, said: Said<'_>, io: &mut Io<'_>) {
        let term_at = self.plan.shared.term_at.get().copied();
        let after_term = term_at.is_some_and(|t| io.now >= t);
        self.highest_heard = self.highest_heard.max(Some(reference));
        let Some(job) = self.jobs.get_mut(&reference) else {
            let anomaly = match (&said, reference < self.next_ref) {
                (Said::End { .. }, true) => "a second terminal reply for a job".to_string(),
                (Said::Progress(kind), true) => format!("{kind} after the job's terminal reply"),
                (_, false) => "a reply for a job never sent".to_string(),
            };
            let mut tally = self.plan.shared.tally();
            tally.replies += 1;
            tally.replies_after_term += u64::from(after_term);
            return add(&mut tally.anomalies, anomaly, 1);
        };
        job.heard = true;
        let (terminal, detail, value) = match said {
            Said::Progress(kind) => {
                let created_twice = kind == "job.created" && {
                    job.created += 1;
                    job.created > 1
                };
                let mut tally = self.plan.shared.tally();
                tally.replies += 1;
                tally.replies_after_term += u64::from(after_term);
                if created_twice {
                    add(&mut tally.anomalies, "job.created twice for one job", 1);
                }
                return;
            }
            Said::End { terminal, detail, value } => (terminal, detail, value),
        };
        let Some(job) = self.jobs.remove(&reference) else { return };
        let wrong = match (job.kind, terminal) {
            (Kind::Stream, "job.complete") => {
                self.plan.expect.as_deref().is_some_and(|want| value.and_then(Value::as_str) != Some(want))
            }
            (Kind::Fail | Kind::Boom, "job.complete") => true,
            (kind, "job.exception") => kind != Kind::Boom,
            _ => false,
        };
        {
            let mut tally = self.plan.shared.tally();
            tally.replies += 1;
            tally.replies_after_term += u64::from(after_term);
            tally.terminals_after_term += u64::from(after_term);
            tally.outstanding -= 1;
            *tally.ended.entry(job.kind.name()).or_default().entry(terminal).or_insert(0) += 1;
            let normal = match job.kind {
                Kind::Stream | Kind::Background => terminal == "job.complete",
                Kind::Ping => terminal == "value",
                Kind::Fail => detail.ends_with("the worker reported failure"),
                Kind::Boom => terminal == "job.exception",
            };
            if normal {
                tally.last_normal.insert(job.kind.name(), io.now);
            }
            add(&mut tally.details, format!("{}: {detail}", job.kind.name()), 1);
            if wrong {
                add(
                    &mut tally.anomalies,
                    format!("a {} job ended with a wrong {terminal}", job.kind.name()),
                    1,
                );
            }
            let latency = io.now.saturating_duration_since(job.sent);
            record(&mut tally.latency, latency);
            record(&mut tally.interval, latency);
            record(tally.by_kind.entry(job.kind.name()).or_insert_with(latency_histogram), latency);
            if tally.slowest.as_ref().is_none_or(|s| s.2 < latency) {
                tally.slowest = Some((job.kind.name(), terminal.to_string(), latency, job.sent));
            }
        }
        match job.slot {
            Some(slot) => self.submit(slot, io),
            None => {
                self.ping = None;
                self.send(Kind::Ping, None, io);
            }
        }
    }

    /// Jobs still outstanding when the connection ends: unread (a suffix the server never
    /// read, told by its close frame) or missing.
    fn settle_outstanding(&mut self, closing: bool) {
        if self.jobs.is_empty() {
            return;
        }
        let mut tally = self.plan.shared.tally();
        for (reference, job) in std::mem::take(&mut self.jobs) {
            tally.outstanding -= 1;
            let read = job.heard || self.highest_heard.is_some_and(|h| reference < h);
            if closing && !read {
                tally.unread_at_close += 1;
            } else if closing {
                add(&mut tally.missing, "no terminal reply before the server's close frame", 1);
            } else if self.plan.shared.ending.load(Ordering::Acquire) {
                add(&mut tally.missing, "still unanswered when the bench ended", 1);
            } else {
                add(&mut tally.missing, "its connection was dropped without a close frame", 1);
            }
        }
        self.ping = None;
    }
}

/// What a JSON reply is, for `Mixed`.
fn classify(reply: &Value) -> Option<Said<'_>> {
    let kind = reply["type"].as_str()?;
    let text = |field: &str| reply[field].as_str().unwrap_or("").to_string();
    Some(match kind {
        "job.created" | "job.data" | "job.status" | "job.warning" => Said::Progress(kind),
        "job.complete" => {
            let detail = if reply["result"].is_null() && reply["result_b64"].is_null() {
                "job.complete: no result".to_string()
            } else {
                "job.complete".to_string()
            };
            Said::End { terminal: "job.complete", detail, value: reply.get("result") }
        }
        "job.failed" => Said::End {
            terminal: "job.failed",
            detail: format!("job.failed: {}", text("reason")),
            value: None,
        },
        "job.exception" => {
            Said::End { terminal: "job.exception", detail: "job.exception".into(), value: None }
        }
        "job.lost" => {
            Said::End { terminal: "job.lost", detail: format!("job.lost: {}", text("reason")), value: None }
        }
        "error" => Said::End {
            terminal: "error",
            detail: format!("error {}: {}", text("code"), text("message")),
            value: None,
        },
        _ => return None,
    })
}

impl Workload for Mixed {
    fn begin(&mut self, io: &mut Io<'_>) {
        self.begun = true;
        for slot in 0..self.plan.in_flight {
            self.submit(slot, io);
        }
        self.send(Kind::Ping, None, io);
    }

    fn on_message(&mut self, message: &[u8], io: &mut Io<'_>) {
        if message.first() == Some(&b'{') {
            let Ok(reply) = serde_json::from_slice::<Value>(message) else {
                return add(&mut self.plan.shared.tally().anomalies, "a reply that is not JSON", 1);
            };
            let (Some(said), Some(reference)) = (classify(&reply), reply["ref"].as_u64()) else {
                let what = format!("a {} reply without a job's ref", reply["type"].as_str().unwrap_or("?"));
                return add(&mut self.plan.shared.tally().anomalies, what, 1);
            };
            return self.reply(reference, said, io);
        }
        // The article's plain lines are about this connection's one ping.
        let Some(reference) = self.ping else {
            return add(&mut self.plan.shared.tally().anomalies, "a plain-text line with no ping out", 1);
        };
        let text = String::from_utf8_lossy(message);
        let said = if text == PING_ACK {
            Said::Progress("ping ack")
        } else if text.starts_with("job: ") {
            Said::Progress("job: line")
        } else if let Some(value) = text.strip_prefix("value: ") {
            let detail =
                if value.is_empty() { "value: (empty)".to_string() } else { format!("value: {value}") };
            Said::End { terminal: "value", detail, value: None }
        } else {
            return add(&mut self.plan.shared.tally().anomalies, format!("an unexpected line {text:?}"), 1);
        };
        self.reply(reference, said, io);
    }

    fn on_close(&mut self, code: Option<u16>, io: &mut Io<'_>) {
        self.closed = true;
        self.settle_outstanding(true);
        let term_at = self.plan.shared.term_at.get().copied();
        let mut tally = self.plan.shared.tally();
        add(&mut tally.closes, code.map_or("none".to_string(), |c| c.to_string()), 1);
        if term_at.is_none_or(|t| io.now < t) {
            tally.closed_before_term += 1;
        }
        tally.first_close = tally.first_close.or(Some(io.now));
        tally.last_close = Some(io.now);
    }
}

impl Drop for Mixed {
    fn drop(&mut self) {
        if !self.begun || self.closed {
            return;
        }
        self.settle_outstanding(false);
        if !self.plan.shared.ending.load(Ordering::Acquire) {
            self.plan.shared.tally().dropped += 1;
        }
    }
}

/// One interval's sample.
#[derive(Clone, Debug)]
struct Sample {
    at_s: f64,
    ended: u64,
    latency: Latency,
    rss_kib: Option<u64>,
    fds: Option<usize>,
    outstanding: u64,
    open: u64,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "t_s": round(self.at_s, 1),
            "jobs_ended": self.ended,
            "latency_ms": {"p50": round(self.latency.p50 / 1000.0, 2), "p99": round(self.latency.p99 / 1000.0, 2)},
            "rss_kib": self.rss_kib,
            "fds": self.fds,
            "outstanding": self.outstanding,
            "connections_open": self.open,
        })
    }

    fn line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "{:>7.1} s  {:>7} ended  p50 {:>8.2} ms  p99 {:>8.2} ms  rss {:>8} KiB  fds {:>5}  outstanding {:>5}  open {:>5}",
            self.at_s,
            self.ended,
            self.latency.p50 / 1000.0,
            self.latency.p99 / 1000.0,
            opt(self.rss_kib.map(|k| k.to_string())),
            opt(self.fds.map(|f| f.to_string())),
            self.outstanding,
            self.open
        )
    }
}

fn round(v: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (v * scale).round() / scale
}

/// How often the main thread looks at the tally.
const TICK: Duration = Duration::from_millis(10);

/// `gearsock bench mixed`.
pub fn run_mixed(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let (endpoint, target) = ws_target(opts)?;
    let workers = DemoWorkers::start(opts.spawn_workers, &opts.gearmand)?;
    let shared = Arc::new(Shared::default());
    let mut rotation = vec![Kind::Stream, Kind::Background];
    if opts.spawn_workers > 0 {
        rotation.extend([Kind::Stream, Kind::Background, Kind::Fail, Kind::Boom]);
    }
    let payload: String = (0..opts.payload_bytes).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let expect = match opts.function.as_str() {
        "ping" => Some("done".to_string()), // `gearsock worker`'s result
        "echo" => Some(payload.clone()),
        _ => None,
    };
    let plan = Arc::new(MixedPlan {
        function: opts.function.clone(),
        payload,
        expect,
        in_flight: opts.in_flight,
        rotation,
        shared: shared.clone(),
    });
    // The driver's window only bounds the run; the main thread ends it (below).
    // How long to wait for the last replies after sending stops (or after the SIGTERM).
    let settle = opts.settle.unwrap_or(Duration::from_secs(15));
    let bound = opts.duration + settle * 2 + Duration::from_secs(5);
    let run_spec = spec(opts, target, Schedule::Timed { warmup: Duration::ZERO, duration: bound })?;
    let fleet = Fleet::start(&run_spec, move |rng| {
        let turn = rng.next_u64() as usize;
        WsSession::new(
            endpoint.clone(),
            rng.bytes16(),
            rng.mask(),
            Mixed::new(plan.clone(), rng.mask(), turn),
        )
    })?;
    if !(fleet.wait_connected() && fleet.established() > 0) {
        fleet.stop();
        let report = fleet.join()?;
        return Err(format!("no connection came up: {:?}", report.connect_failures).into());
    }
    let established = fleet.established();
    eprintln!("gearsock bench mixed: {established} connections up; load started");
    fleet.go();
    let t0 = Instant::now();
    let stop_sending_at = t0 + opts.duration;
    let term_plan = opts.sigterm_after.map(|s| t0 + s);
    let mut term_error = None;
    let mut samples = Vec::new();
    let mut next_sample = t0 + opts.interval;
    let mut settle_until = None;
    loop {
        thread::sleep(TICK);
        let now = Instant::now();
        if let (Some(at), Some(pid)) = (term_plan, opts.pid)
            && now >= at
            && shared.term_at.get().is_none()
        {
            let _ = shared.term_at.set(now);
            if let Err(e) = sys::terminate(pid) {
                term_error = Some(format!("SIGTERM to {pid}: {e}"));
            }
            eprintln!(
                "gearsock bench mixed: SIGTERM sent to {pid} at {:.1} s",
                now.duration_since(t0).as_secs_f64()
            );
            settle_until.get_or_insert(now + settle);
        }
        if now >= stop_sending_at && shared.sending.swap(false, Ordering::AcqRel) {
            settle_until.get_or_insert(now + settle);
        }
        if !opts.interval.is_zero() && now >= next_sample {
            let sample = take_sample(&shared, opts.pid, now.duration_since(t0), established);
            eprintln!("{}", sample.line());
            samples.push(sample);
            next_sample += opts.interval;
        }
        let tally = shared.tally();
        let open = established.saturating_sub(tally.closes_total() + tally.dropped);
        let waiting_for_term = term_plan.is_some() && shared.term_at.get().is_none();
        if open == 0
            || (!waiting_for_term && !shared.sending.load(Ordering::Acquire) && tally.outstanding == 0)
        {
            break;
        }
        if settle_until.is_some_and(|at| now >= at) {
            break;
        }
    }
    let elapsed = t0.elapsed();
    shared.ending.store(true, Ordering::Release);
    fleet.stop();
    let report = fleet.join()?;
    let worker_errors = workers.stop();
    let tally = shared.tally();
    let (verdict, problems) = judge(opts, &tally, established, report.failed(), term_error, &worker_errors);
    let v = mixed_json(opts, &tally, &shared, t0, elapsed, established, &report, &samples, &problems);
    if opts.json {
        println!("{v}");
    } else {
        print_mixed(&v);
    }
    Ok(i32::from(!verdict))
}

fn take_sample(shared: &Shared, pid: Option<u32>, at: Duration, established: u64) -> Sample {
    let mut tally = shared.tally();
    let interval = std::mem::replace(&mut tally.interval, latency_histogram());
    Sample {
        at_s: at.as_secs_f64(),
        ended: interval.len(),
        latency: Latency::of(&interval),
        rss_kib: pid.and_then(|p| sys::resident_bytes(p).ok()).map(|b| b / 1024),
        fds: pid.and_then(|p| sys::open_fds(p).ok()).map(|n| n as usize),
        outstanding: tally.outstanding,
        open: established.saturating_sub(tally.closes_total() + tally.dropped),
    }
}

/// The verdict and, when it fails, why.
fn judge(
    opts: &BenchOptions,
    t: &Tally,
    established: u64,
    connect_failures: u64,
    term_error: Option<String>,
    worker_errors: &[String],
) -> (bool, Vec<String>) {
    let mut problems = Vec::new();
    let sent = t.sent_total();
    let terminals: u64 = t.terminal_totals().values().sum();
    let missing: u64 = t.missing.values().sum();
    if sent == 0 {
        problems.push("no job was sent".to_string());
    }
    if terminals + t.unread_at_close + missing + t.outstanding != sent {
        problems.push(format!(
            "the counts do not add up: {sent} sent, {terminals} terminal + {} unread + {missing} missing + {} outstanding",
            t.unread_at_close, t.outstanding
        ));
    }
    if missing > 0 {
        problems.push(format!("{missing} jobs without their terminal reply: {:?}", t.missing));
    }
    if !t.anomalies.is_empty() {
        problems.push(format!("replies that should not be: {:?}", t.anomalies));
    }
    if connect_failures > 0 {
        problems.push(format!("{connect_failures} connections failed to come up"));
    }
    if t.dropped > 0 {
        problems.push(format!("{} connections dropped without a close frame", t.dropped));
    }
    if t.closed_before_term > 0 {
        problems
            .push(format!("{} connections closed by the server before any SIGTERM", t.closed_before_term));
    }
    if opts.sigterm_after.is_some() {
        let away = t.closes.get("1001").copied().unwrap_or(0);
        if away != established {
            problems.push(format!(
                "after SIGTERM {away} of {established} connections were closed with 1001 (closes: {:?})",
                t.closes
            ));
        }
    } else if t.unread_at_close > 0 {
        problems.push(format!("{} jobs unread at a close nobody asked for", t.unread_at_close));
    }
    problems.extend(term_error);
    problems.extend(worker_errors.iter().map(|e| format!("demo worker: {e}")));
    (problems.is_empty(), problems)
}

#[allow(clippy::too_many_arguments)]
fn mixed_json(
    opts: &BenchOptions,
    t: &Tally,
    shared: &Shared,
    t0: Instant,
    elapsed: Duration,
    established: u64,
    report: &super::meter::Report,
    samples: &[Sample],
    problems: &[String],
) -> Value {
    let sent = t.sent_total();
    let terminals = t.terminal_totals();
    let terminal_sum: u64 = terminals.values().sum();
    let missing: u64 = t.missing.values().sum();
    let since_t0 = |at: Option<Instant>| at.map(|a| round(a.saturating_duration_since(t0).as_secs_f64(), 3));
    let term_at = shared.term_at.get().copied();
    let ms_after_term = |at: Option<Instant>| {
        at.zip(term_at).map(|(a, t)| round(a.saturating_duration_since(t).as_secs_f64() * 1000.0, 1))
    };
    let mut sent_by_kind = json!(t.sent);
    sent_by_kind["total"] = json!(sent);
    let mut formula: Vec<String> = terminals.iter().map(|(k, n)| format!("{n} {k}")).collect();
    formula.push(format!("{} unread at close", t.unread_at_close));
    formula.push(format!("{missing} missing"));
    json!({
        "mode": "mixed",
        "url": opts.url,
        "connections": opts.connections,
        "in_flight": opts.in_flight,
        "function": opts.function,
        "spawned_workers": opts.spawn_workers,
        "duration_s": opts.duration.as_secs_f64(),
        "elapsed_s": round(elapsed.as_secs_f64(), 3),
        "sent": sent_by_kind,
        "terminal": terminals,
        "ended_by_kind": t.ended,
        "last_normal_end_s": t.last_normal.iter().map(|(k, at)| (*k, since_t0(Some(*at)))).collect::<BTreeMap<_, _>>(),
        "terminal_details": t.details,
        "unread_at_close": t.unread_at_close,
        "missing": t.missing,
        "anomalies": t.anomalies,
        "reconcile": {
            "sent": sent,
            "accounted": terminal_sum + t.unread_at_close + missing,
            "formula": format!("{sent} sent = {}", formula.join(" + ")),
        },
        "clients": {
            "established": established,
            "failed": report.failed(),
            "connect_failures": report.connect_failures,
            "closed_by_server": t.closes,
            "closed_before_sigterm": t.closed_before_term,
            "dropped": t.dropped,
            "first_close_s": since_t0(t.first_close),
            "last_close_s": since_t0(t.last_close),
        },
        "sigterm": term_at.map(|at| json!({
            "pid": opts.pid,
            "at_s": round(at.saturating_duration_since(t0).as_secs_f64(), 3),
            "replies_after": t.replies_after_term,
            "terminal_replies_after": t.terminals_after_term,
            "first_close_after_ms": ms_after_term(t.first_close),
            "last_close_after_ms": ms_after_term(t.last_close),
        })),
        "replies": t.replies,
        "latency_ms": {
            "kind": "job: from sending it to its terminal reply, every kind",
            "all": latency_ms(&t.latency),
            "by_kind": t.by_kind.iter().map(|(k, h)| (*k, latency_ms(h))).collect::<BTreeMap<_, _>>(),
            "slowest": t.slowest.as_ref().map(|(kind, terminal, latency, sent)| json!({
                "kind": kind,
                "ended_by": terminal,
                "ms": round(latency.as_secs_f64() * 1000.0, 1),
                "sent_at_s": since_t0(Some(*sent)),
            })),
        },
        "intervals": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        "verdict": {"ok": problems.is_empty(), "problems": problems},
    })
}

fn latency_ms(h: &Histogram<u64>) -> Value {
    let l = Latency::of(h);
    json!({"count": l.count, "p50": round(l.p50 / 1000.0, 2), "p99": round(l.p99 / 1000.0, 2), "max": round(l.max / 1000.0, 2)})
}

/// The report as text: the reconcile, then the figures behind it.
fn print_mixed(v: &Value) {
    println!(
        "gearsock bench mixed: {}, {} connections x {} in flight + 1 ping, function {}, {} s",
        v["url"].as_str().unwrap_or(""),
        v["connections"],
        v["in_flight"],
        v["function"].as_str().unwrap_or(""),
        v["elapsed_s"]
    );
    println!("  reconcile: {}", v["reconcile"]["formula"].as_str().unwrap_or(""));
    for key in [
        "sent",
        "terminal",
        "ended_by_kind",
        "terminal_details",
        "missing",
        "anomalies",
        "clients",
        "sigterm",
        "latency_ms",
    ] {
        println!("  {key}: {}", v[key]);
    }
    match v["verdict"]["ok"].as_bool() {
        Some(true) => println!("  verdict: ok"),
        _ => {
            println!("  verdict: FAILED");
            for p in v["verdict"]["problems"].as_array().into_iter().flatten() {
                println!("    - {}", p.as_str().unwrap_or(""));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::meter::Meter;

    fn plan(in_flight: usize) -> Arc<MixedPlan> {
        Arc::new(MixedPlan {
            function: "ping".into(),
            payload: "p".into(),
            expect: Some("done".into()),
            in_flight,
            rotation: vec![Kind::Stream, Kind::Background],
            shared: Arc::new(Shared::default()),
        })
    }

    /// The JSON texts of the client frames in `out` (unmasked).
    fn frames(out: &[u8], mask: [u8; 4]) -> Vec<Value> {
        let mut texts = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = (out[at + 1] & 0x7f) as usize;
            assert!(len < 126, "short frames only in these tests");
            let body: Vec<u8> =
                out[at + 6..at + 6 + len].iter().zip(mask.iter().cycle()).map(|(b, k)| b ^ k).collect();
            texts.push(serde_json::from_slice(&body).expect("JSON"));
            at += 6 + len;
        }
        texts
    }

    fn feed(m: &mut Mixed, text: &str, t: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        let mut meter = Meter::default();
        m.on_message(text.as_bytes(), &mut Io { out: &mut out, now: t, meter: &mut meter });
        frames(&out, m.mask)
    }

    #[test]
    fn every_job_is_accounted_for_once_and_duplicates_are_caught() {
        let t0 = Instant::now();
        let plan = plan(2);
        let mut m = Mixed::new(plan.clone(), [1, 2, 3, 4], 0);
        let mut out = Vec::new();
        let mut meter = Meter::default();
        m.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        let sent = frames(&out, m.mask);
        assert_eq!(
            sent.iter()
                .map(|v| (v["type"].as_str().unwrap(), v["ref"].as_u64().unwrap()))
                .collect::<Vec<_>>(),
            [("submit", 0), ("submit", 1), ("ping", 2)]
        );
        assert_eq!(
            (sent[0]["mode"].as_str(), sent[1]["mode"].as_str()),
            (Some("stream"), Some("background"))
        );
        let t1 = t0 + Duration::from_millis(5);
        assert!(feed(&mut m, r#"{"type":"job.created","job":"H:1","ref":0}"#, t1).is_empty());
        let next = feed(&mut m, r#"{"type":"job.complete","job":"H:1","result":"done","ref":0}"#, t1);
        assert_eq!(
            (next[0]["ref"].as_u64(), next[0]["mode"].as_str()),
            (Some(3), Some("stream")),
            "slot 0 goes on"
        );
        feed(&mut m, PING_ACK, t1);
        feed(&mut m, "job: H:2", t1);
        let next = feed(&mut m, "value: done", t1);
        assert_eq!(next[0]["type"], "ping", "one ping at a time, the next after the last one's value");
        // Duplicates, strays and wrong results are anomalies.
        feed(&mut m, r#"{"type":"job.complete","job":"H:1","result":"done","ref":0}"#, t1);
        feed(&mut m, r#"{"type":"job.data","job":"H:1","data":"x","ref":0}"#, t1);
        feed(&mut m, r#"{"type":"job.lost","job":"H:1","reason":"x","ref":99}"#, t1);
        feed(&mut m, r#"{"type":"job.complete","job":"H:3","result":"nope","ref":3}"#, t1);
        let t = plan.shared.tally();
        assert_eq!(t.sent_total(), 6);
        assert_eq!(t.outstanding, 3, "ref 1 (background), 4 (ping) and 5 (stream) are out");
        assert_eq!(t.ended["stream"]["job.complete"], 2);
        assert_eq!(t.ended["ping"]["value"], 1);
        assert_eq!(
            t.anomalies.keys().cloned().collect::<Vec<_>>(),
            [
                "a reply for a job never sent",
                "a second terminal reply for a job",
                "a stream job ended with a wrong job.complete",
                "job.data after the job's terminal reply",
            ]
        );
    }

    #[test]
    fn at_close_jobs_the_server_read_must_have_ended_and_the_rest_are_unread() {
        let t0 = Instant::now();
        let plan = plan(3);
        let mut m = Mixed::new(plan.clone(), [0; 4], 0);
        let mut out = Vec::new();
        let mut meter = Meter::default();
        m.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter }); // refs 0, 1, 2 and ping 3
        // The server read ref 1 (it answered), so ref 0 was read too; 2 and the ping were not.
        plan.shared.sending.store(false, Ordering::Release);
        let _ = plan.shared.term_at.set(t0);
        feed(&mut m, r#"{"type":"job.lost","job":null,"reason":"shutting down","ref":1}"#, t0);
        let mut io = Io { out: &mut out, now: t0, meter: &mut meter };
        m.on_close(Some(1001), &mut io);
        drop(m);
        let t = plan.shared.tally();
        assert_eq!((t.unread_at_close, t.outstanding, t.closed_before_term, t.dropped), (2, 0, 0, 0));
        assert_eq!(t.missing.values().sum::<u64>(), 1, "{:?}", t.missing);
        assert_eq!(t.closes["1001"], 1);
        assert_eq!(t.terminals_after_term, 1);
    }

    #[test]
    fn a_connection_dropped_without_a_close_frame_is_counted() {
        let t0 = Instant::now();
        let plan = plan(1);
        let mut m = Mixed::new(plan.clone(), [0; 4], 0);
        let mut out = Vec::new();
        let mut meter = Meter::default();
        m.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        drop(m);
        let t = plan.shared.tally();
        assert_eq!(t.dropped, 1);
        assert_eq!(t.missing["its connection was dropped without a close frame"], 2);
    }

    #[test]
    fn the_verdict_names_what_went_wrong() {
        let opts = BenchOptions { sigterm_after: Some(Duration::from_secs(1)), ..BenchOptions::default() };
        let mut t = Tally::default();
        t.sent.insert("stream", 3);
        t.ended.entry("stream").or_default().insert("job.lost", 2);
        t.unread_at_close = 1;
        t.closes.insert("1001".into(), 2);
        assert_eq!(judge(&opts, &t, 2, 0, None, &[]), (true, vec![]));
        t.closes.insert("1001".into(), 1);
        let (ok, problems) = judge(&opts, &t, 2, 0, None, &[]);
        assert!(!ok && problems[0].contains("1 of 2 connections"), "{problems:?}");
        t.closes.insert("1001".into(), 2);
        t.unread_at_close = 0;
        let (ok, problems) = judge(&opts, &t, 2, 0, None, &[]);
        assert!(!ok && problems[0].contains("do not add up"), "{problems:?}");
    }
}
