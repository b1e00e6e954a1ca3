//! The three modes of `gearsock bench`: what each runs, in which order, and how its figures
//! are printed (a table, or one JSON object with `--json`).
//!
//! Baselines run in the same bench run right after the measured run, with the same
//! connections, in-flight count (or concurrency), warm-up and duration, so a noisy machine shows
//! up as a ratio, not as a different absolute figure every time. The connect baseline's
//! acceptor is a child process (`acceptor`, the fourth, internal mode), the others are in this
//! process.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::driver::{Fleet, Schedule, Spec, run_timed};
use super::echo::{AcceptorProcess, BaselineServer};
use super::meter::{Latency, Report, per_second};
use super::session::{
    Endpoint, Expect, GearmanDirect, GearmanPlan, Idle, Jobs, JobsPlan, LineSession, Roundtrip,
    RoundtripPlan, WsSession,
};
use super::sys::{self, CpuProbe};
use super::wire::{OP_BINARY, OP_TEXT, encode_client_frame};
use super::{BenchOptions, DEFAULT_MESSAGE, DEFAULT_REPLY, EXPECT_ECHO, parse_url, resolve};

/// How long connect mode lets the server settle before reading its VmRSS.
const SETTLE: Duration = Duration::from_secs(1);
/// Pause between a run and its baseline, so jobs still in flight drain.
const DRAIN: Duration = Duration::from_millis(500);
/// Messages up to this size are shown in `--json` output; larger ones only by their size.
const SHOWN_MESSAGE_BYTES: usize = 1024;

/// `gearsock bench connect`.
pub fn run_connect(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let (endpoint, target) = ws_target(opts)?;
    let run_spec = spec(opts, target, Schedule::Hold)?;
    let before = match opts.pid {
        Some(pid) => Some(sys::resident_bytes(pid).map_err(|e| format!("--pid {pid}: {e}"))?),
        None => None,
    };
    let (report, after) = open_and_hold(&run_spec, &endpoint, opts.hold, opts.pid)?;
    let rss = opts.pid.zip(before).zip(after).map(|((pid, before), after)| Rss { pid, before, after });
    let mut baseline_cpus = None;
    let baseline = if opts.baseline {
        // The server closes what the run opened before the acceptor, on its CPUs, starts.
        thread::sleep(DRAIN);
        let acceptor = AcceptorProcess::start(opts.pid, opts.baseline_cpu)?;
        baseline_cpus = acceptor.cpus().map(<[usize]>::to_vec);
        // The same connections, concurrency, threads and (for a loopback server, the very same)
        // source addresses; no RSS to read and nothing to learn from holding them, so they
        // close as soon as all are up.
        let base_spec = spec(opts, acceptor.addr(), Schedule::Hold)?;
        let report = open_and_hold(&base_spec, &endpoint, Duration::ZERO, None);
        acceptor.stop()?;
        Some(report?.0)
    } else {
        None
    };
    let runs = Runs { main: &report, baseline: baseline.as_ref() };
    if opts.json {
        println!("{}", connect_json(opts, &runs, rss, baseline_cpus.as_deref()));
    } else {
        print_connect(opts, &runs, rss, &run_spec);
        if opts.baseline {
            print_baseline_cpus("upgrade acceptor", baseline_cpus.as_deref());
        }
    }
    let troubled = |r: &Report| r.failed() > 0 || r.lost_count() > 0 || r.established == 0;
    Ok(i32::from(troubled(&report) || baseline.as_ref().is_some_and(troubled)))
}

/// `gearsock bench acceptor` (internal): the connect baseline's upgrade acceptor, in the child
/// process [`AcceptorProcess`] starts. Says where it listens, then serves until stdin closes.
pub fn run_acceptor(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let cpus = baseline_cpus(opts);
    let acceptor = BaselineServer::upgrade_acceptor(cpus.clone())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", json!({"addr": acceptor.addr().to_string(), "cpus": cpus}))?;
    stdout.flush()?;
    drop(stdout);
    // Nothing comes on stdin: it only ends, when the bench is done with the acceptor (or gone).
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    acceptor.stop()?;
    Ok(0)
}

/// Opens `spec`'s connections, reads `pid`'s VmRSS once every one is up (after [`SETTLE`]),
/// keeps them open and idle until `hold` has passed since then, and closes them.
fn open_and_hold(
    spec: &Spec,
    endpoint: &Arc<Endpoint>,
    hold: Duration,
    pid: Option<u32>,
) -> Result<(Report, Option<u64>), String> {
    let endpoint = endpoint.clone();
    let fleet =
        Fleet::start(spec, move |rng| WsSession::new(endpoint.clone(), rng.bytes16(), rng.mask(), Idle))?;
    let mut after = None;
    if fleet.wait_connected() {
        let up_at = Instant::now();
        if let Some(pid) = pid {
            thread::sleep(SETTLE);
            match sys::resident_bytes(pid) {
                Ok(bytes) => after = Some(bytes),
                Err(e) => eprintln!("gearsock bench: --pid {pid} after connecting: {e}"),
            }
        }
        thread::sleep(hold.saturating_sub(up_at.elapsed()));
    }
    fleet.stop();
    Ok((fleet.join()?, after))
}

/// Where the baseline server (echo server, upgrade acceptor) runs: `--baseline-cpu`, else where the `--pid` server
/// may run (so both servers get the same cores), else anywhere.
fn baseline_cpus(opts: &BenchOptions) -> Option<Vec<usize>> {
    match (opts.baseline_cpu, opts.pid) {
        (Some(cpu), _) => Some(vec![cpu]),
        (None, Some(pid)) => sys::cpus_of(pid).ok(),
        (None, None) => None,
    }
}

fn print_baseline_cpus(what: &str, cpus: Option<&[usize]>) {
    match cpus {
        Some(cpus) => println!("  the {what} ran on CPUs {cpus:?}"),
        None => println!(
            "  the {what} was not pinned (it shared this process's CPUs): \
             give --pid or --baseline-cpu to run it where the server runs"
        ),
    }
}

/// The server's resident memory before connecting and with every connection up.
#[derive(Clone, Copy, Debug)]
struct Rss {
    pid: u32,
    before: u64,
    after: u64,
}

impl Rss {
    fn growth(self) -> i64 {
        self.after as i64 - self.before as i64
    }

    fn per_connection(self, connections: u64) -> f64 {
        if connections == 0 { 0.0 } else { self.growth() as f64 / connections as f64 }
    }
}

/// `gearsock bench roundtrip`.
pub fn run_roundtrip(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let (endpoint, target) = ws_target(opts)?;
    let expect = match expected_reply(opts) {
        Some(reply) => Expect::Exact(reply.as_bytes().to_vec()),
        None => Expect::AnyText,
    };
    let mask = super::driver::Rng::seeded(u64::MAX).mask();
    let mut request = Vec::new();
    let opcode = if opts.binary { OP_BINARY } else { OP_TEXT };
    encode_client_frame(&mut request, opcode, opts.message.as_bytes(), mask);
    let plan = Arc::new(RoundtripPlan { request, expect, in_flight: opts.in_flight, binary: opts.binary });
    let probes: Vec<_> = opts.pid.map(|pid| ("server", CpuProbe::Process(pid))).into_iter().collect();
    let ws = run_timed(&spec(opts, target, timed(opts))?, &probes, move |rng| {
        WsSession::new(endpoint.clone(), rng.bytes16(), mask, Roundtrip::new(plan.clone()))
    })?;
    let baseline_cpus = baseline_cpus(opts);
    let baseline = if opts.baseline {
        let echo = BaselineServer::echo(baseline_cpus.clone())?;
        let line = format!("{}\n", opts.message).into_bytes();
        let expect = Expect::Exact(opts.message.clone().into_bytes());
        let plan =
            Arc::new(RoundtripPlan { request: line, expect, in_flight: opts.in_flight, binary: false });
        let probes: Vec<_> = echo.cpu_probe().map(|probe| ("server", probe)).into_iter().collect();
        let report = run_timed(&spec(opts, echo.addr(), timed(opts))?, &probes, move |_| {
            LineSession::new(Roundtrip::new(plan.clone()))
        });
        echo.stop()?;
        Some(report?)
    } else {
        None
    };
    let runs = Runs { main: &ws, baseline: baseline.as_ref() };
    if opts.json {
        let mut v = roundtrip_json(opts, &runs);
        if opts.baseline {
            v["baseline"]["cpus"] = json!(baseline_cpus);
        }
        println!("{v}");
    } else {
        print_runs(opts, &runs, ["websocket", "tcp line echo", "ws / tcp"], "messages");
        if opts.baseline {
            print_baseline_cpus("echo server", baseline_cpus.as_deref());
        }
    }
    Ok(i32::from(troubled(&ws) || baseline.as_ref().is_some_and(troubled)))
}

/// The reply each roundtrip message must get, word for word; `None`: any text but an error.
fn expected_reply(opts: &BenchOptions) -> Option<&str> {
    match (opts.expect.as_deref(), opts.message == DEFAULT_MESSAGE) {
        (Some(EXPECT_ECHO), _) => Some(&opts.message),
        (Some(text), _) => Some(text),
        (None, true) => Some(DEFAULT_REPLY),
        (None, false) => None,
    }
}

/// `gearsock bench jobs`.
pub fn run_jobs(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let (endpoint, target) = ws_target(opts)?;
    let payload: String = (0..opts.payload_bytes).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let expect = match opts.function.as_str() {
        "echo" => Some(payload.clone().into_bytes()),
        "reverse" => Some(payload.bytes().rev().collect()),
        _ => None,
    };
    let workers = DemoWorkers::start(opts.spawn_workers, &opts.gearmand)?;
    let mask = super::driver::Rng::seeded(u64::MAX).mask();
    let requests = (0..opts.in_flight)
        .map(|k| {
            let text = json!({"type": "submit", "function": opts.function, "payload": payload, "ref": k});
            let mut frame = Vec::new();
            encode_client_frame(&mut frame, OP_TEXT, text.to_string().as_bytes(), mask);
            frame
        })
        .collect();
    let plan = Arc::new(JobsPlan { requests, expect: expect.clone() });
    let gearmand_probe = opts.gearmand_pid.map(|pid| ("gearmand", CpuProbe::Process(pid)));
    let worker_probes: Vec<_> =
        workers.thread_ids.iter().map(|tid| ("workers", CpuProbe::Thread(*tid))).collect();
    let probes: Vec<_> = opts
        .pid
        .map(|pid| ("server", CpuProbe::Process(pid)))
        .into_iter()
        .chain(gearmand_probe)
        .chain(worker_probes.iter().copied())
        .collect();
    let bridge = run_timed(&spec(opts, target, timed(opts))?, &probes, move |rng| {
        WsSession::new(endpoint.clone(), rng.bytes16(), mask, Jobs::new(plan.clone()))
    })?;
    let baseline = if opts.baseline {
        thread::sleep(DRAIN);
        let gearmand = resolve(&opts.gearmand)?;
        let plan = Arc::new(GearmanPlan {
            function: opts.function.clone().into_bytes(),
            payload: payload.into_bytes(),
            expect,
            in_flight: opts.in_flight,
        });
        let probes: Vec<_> = gearmand_probe.into_iter().chain(worker_probes).collect();
        Some(run_timed(&spec(opts, gearmand, timed(opts))?, &probes, move |_| {
            GearmanDirect::new(plan.clone())
        })?)
    } else {
        None
    };
    for error in workers.stop() {
        eprintln!("gearsock bench: demo worker: {error}");
    }
    let runs = Runs { main: &bridge, baseline: baseline.as_ref() };
    if opts.json {
        println!("{}", jobs_json(opts, &runs));
    } else {
        print_runs(opts, &runs, ["bridge", "direct gearman", "bridge / direct"], "jobs");
    }
    Ok(i32::from(troubled(&bridge) || baseline.as_ref().is_some_and(troubled)))
}

/// Anything that makes the exit status 1.
fn troubled(r: &Report) -> bool {
    r.meter.errors > 0 || r.failed() > 0 || r.lost_count() > 0 || r.meter.measured == 0
}

/// The server's endpoint and resolved address.
pub(super) fn ws_target(opts: &BenchOptions) -> Result<(Arc<Endpoint>, SocketAddr), String> {
    let url = parse_url(&opts.url)?;
    let target = resolve(&url.authority)?;
    Ok((Arc::new(Endpoint { host: url.authority, path: url.path }), target))
}

fn timed(opts: &BenchOptions) -> Schedule {
    Schedule::Timed { warmup: opts.warmup, duration: opts.duration }
}

/// A run's [`Spec`], with the source addresses for `target`.
pub(super) fn spec(opts: &BenchOptions, target: SocketAddr, schedule: Schedule) -> Result<Spec, String> {
    Ok(Spec {
        target,
        sources: source_addresses(opts, target)?,
        connections: opts.connections,
        concurrency: opts.concurrency,
        threads: opts.threads,
        timeout: opts.timeout,
        schedule,
    })
}

/// Source addresses to spread connections over: `--source-ips` of them from `--source-base`,
/// by default enough that no address needs more than 3/4 of the ephemeral port range. Empty
/// (the kernel chooses, no bind) for a single default address or a non-loopback target.
fn source_addresses(opts: &BenchOptions, target: SocketAddr) -> Result<Vec<Ipv4Addr>, String> {
    sources_for(opts, target, opts.connections)
}

/// [`source_addresses`] for `ports` local ports in all (connections held at once, or churn's
/// cycles, whose ports stay in TIME_WAIT on the server's side).
pub(super) fn sources_for(
    opts: &BenchOptions,
    target: SocketAddr,
    ports: usize,
) -> Result<Vec<Ipv4Addr>, String> {
    let loopback = matches!(target, SocketAddr::V4(v4) if v4.ip().is_loopback());
    let count = match opts.source_ips {
        Some(n) if n > 1 && !loopback => {
            return Err(format!("--source-ips needs an IPv4 loopback target, not {target}"));
        }
        Some(n) => n,
        None if loopback => ports.div_ceil((sys::ephemeral_ports() * 3 / 4).max(1)),
        None => 1,
    };
    if count <= 1 && (opts.source_base == Ipv4Addr::LOCALHOST || !loopback) {
        return Ok(Vec::new());
    }
    let base = u32::from(opts.source_base);
    (0..count as u32)
        .map(|i| base.checked_add(i).map(Ipv4Addr::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "--source-base plus --source-ips runs past 255.255.255.255".to_string())
}

/// Demo workers on threads of this process (`--spawn-workers`).
pub(super) struct DemoWorkers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<std::io::Result<()>>>,
    /// The worker threads' ids, for their CPU time.
    thread_ids: Vec<u32>,
}

impl DemoWorkers {
    pub(super) fn start(count: usize, gearmand: &str) -> Result<DemoWorkers, String> {
        let mut workers = DemoWorkers {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
            thread_ids: Vec::new(),
        };
        let (id_tx, id_rx) = std::sync::mpsc::channel();
        for i in 0..count {
            let (stop, gearmand, id_tx) = (workers.stop.clone(), gearmand.to_string(), id_tx.clone());
            let handle = thread::Builder::new()
                .name(format!("bench-worker-{i}"))
                .spawn(move || {
                    let _ = id_tx.send(sys::current_thread_id());
                    drop(id_tx);
                    crate::worker::run_demo_worker(&gearmand, &stop)
                })
                .map_err(|e| format!("cannot start a demo worker: {e}"))?;
            workers.handles.push(handle);
        }
        drop(id_tx);
        workers.thread_ids = id_rx.iter().take(count).flatten().collect();
        Ok(workers)
    }

    /// Stops and joins every worker; returns their errors.
    pub(super) fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Release);
        std::mem::take(&mut self.handles)
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("panicked".into()),
            })
            .collect()
    }
}

impl Drop for DemoWorkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

// ---- output -------------------------------------------------------------------------------

/// A measured run and, with `--baseline`, its baseline.
struct Runs<'a> {
    main: &'a Report,
    baseline: Option<&'a Report>,
}

impl Runs<'_> {
    /// main rate / baseline rate.
    fn ratio(&self) -> Option<f64> {
        let base = self.baseline?.rate();
        (base > 0.0).then(|| self.main.rate() / base)
    }
}

fn round(v: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (v * scale).round() / scale
}

/// Connections, workload counts and latency of one run, as JSON; `noun` names the unit.
fn run_json(r: &Report, noun: &str) -> Value {
    let mut v = json!({
        "connections": {
            "attempted": r.attempted,
            "established": r.established,
            "failed": r.failed(),
            "failures": r.connect_failures,
            "lost": r.lost,
        },
        "replies": r.meter.replies,
        "errors": r.meter.errors,
        "error_kinds": r.meter.error_kinds,
        "mismatches": r.meter.mismatches,
        "latency_us": Latency::of(&r.meter.latency).to_json(),
        "window_s": round(r.window.as_secs_f64(), 3),
        "cpu_pct": r.cpu_percent().into_iter().map(|(k, p)| (k, round(p, 1))).collect::<BTreeMap<_, _>>(),
    });
    v[noun] = json!(r.meter.measured);
    v[format!("{noun}_per_s")] = json!(round(r.rate(), 1));
    v
}

fn common_json(opts: &BenchOptions) -> Value {
    json!({
        "mode": opts.mode.name(),
        "url": opts.url,
        "connections": opts.connections,
        "in_flight": opts.in_flight,
        "threads": opts.threads,
        "duration_s": opts.duration.as_secs_f64(),
        "warmup_s": opts.warmup.as_secs_f64(),
    })
}

fn roundtrip_json(opts: &BenchOptions, runs: &Runs<'_>) -> Value {
    let mut v = common_json(opts);
    // A large message (--message-bytes) is summed up by its size, not repeated.
    let shown = |text: &str| if text.len() <= SHOWN_MESSAGE_BYTES { json!(text) } else { Value::Null };
    v["message"] = shown(&opts.message);
    v["message_bytes"] = json!(opts.message.len());
    v["binary"] = json!(opts.binary);
    v["expect"] = match (opts.expect.as_deref(), expected_reply(opts)) {
        (Some(EXPECT_ECHO), _) => json!(EXPECT_ECHO),
        (_, Some(reply)) => shown(reply),
        (_, None) => Value::Null,
    };
    v["websocket"] = run_json(runs.main, "messages");
    v["baseline"] = runs.baseline.map_or(Value::Null, |b| {
        let mut base = run_json(b, "messages");
        base["kind"] = json!("tcp_line_echo");
        base
    });
    v["ratio"] = runs.ratio().map_or(Value::Null, |r| json!(round(r, 4)));
    v
}

fn jobs_json(opts: &BenchOptions, runs: &Runs<'_>) -> Value {
    let mut v = common_json(opts);
    v["function"] = json!(opts.function);
    v["payload_bytes"] = json!(opts.payload_bytes);
    v["spawned_workers"] = json!(opts.spawn_workers);
    v["bridge"] = run_json(runs.main, "jobs");
    v["baseline"] = runs.baseline.map_or(Value::Null, |b| {
        let mut base = run_json(b, "jobs");
        base["kind"] = json!("gearman_direct");
        base["gearmand"] = json!(opts.gearmand);
        base
    });
    v["ratio"] = runs.ratio().map_or(Value::Null, |r| json!(round(r, 4)));
    v["added_p50_us"] = runs.baseline.map_or(Value::Null, |b| {
        json!(round(Latency::of(&runs.main.meter.latency).p50 - Latency::of(&b.meter.latency).p50, 1))
    });
    v
}

/// Handshakes per second: connections up over the time from the first connect() to the last
/// connection up.
fn handshake_rate(r: &Report) -> f64 {
    per_second(r.established, r.connect_elapsed())
}

/// One connect run's connections and handshakes, as JSON.
fn handshakes_json(r: &Report) -> Value {
    json!({
        "attempted": r.attempted,
        "established": r.established,
        "failed": r.failed(),
        "failures": r.connect_failures,
        "lost": r.lost,
        "elapsed_s": round(r.connect_elapsed().as_secs_f64(), 4),
        "handshakes_per_s": round(handshake_rate(r), 1),
        "handshake_latency_us": Latency::of(&r.handshake).to_json(),
    })
}

/// The server's run at the top level (as before baselines existed), the acceptor's under
/// `baseline`, and `ratio` = server handshakes/s / baseline handshakes/s.
fn connect_json(opts: &BenchOptions, runs: &Runs<'_>, rss: Option<Rss>, cpus: Option<&[usize]>) -> Value {
    let r = runs.main;
    let mut v = json!({
        "mode": "connect",
        "url": opts.url,
        "connections": opts.connections,
        "concurrency": opts.concurrency,
        "threads": opts.threads,
        "hold_s": opts.hold.as_secs_f64(),
    });
    if let (Some(v), Value::Object(run)) = (v.as_object_mut(), handshakes_json(r)) {
        v.extend(run);
    }
    v["rss"] = rss.map_or(Value::Null, |rss| {
        json!({
            "pid": rss.pid,
            "before_bytes": rss.before,
            "after_bytes": rss.after,
            "growth_bytes": rss.growth(),
            "per_connection_bytes": round(rss.per_connection(r.established), 1),
            "per_connection_kib": round(rss.per_connection(r.established) / 1024.0, 2),
        })
    });
    v["baseline"] = runs.baseline.map_or(Value::Null, |b| {
        let mut base = handshakes_json(b);
        base["kind"] = json!("upgrade_acceptor");
        base["cpus"] = json!(cpus);
        base
    });
    v["ratio"] = runs
        .baseline
        .map(handshake_rate)
        .filter(|base| *base > 0.0)
        .map_or(Value::Null, |base| json!(round(handshake_rate(r) / base, 4)));
    v
}

/// `1234567.8` -> `1,234,568`.
fn grouped(v: f64) -> String {
    let n = v.round().abs() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 { format!("-{out}") } else { out }
}

/// Latency in µs: one decimal below 1,000, grouped integers above.
fn micros(v: f64) -> String {
    if v < 1000.0 { format!("{v:.1}") } else { grouped(v) }
}

/// Prints rows with the first column left-aligned and the others right-aligned.
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{cell:<width$}", width = widths[0]));
            } else {
                line.push_str(&format!("   {cell:>width$}", width = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn print_counts(label: &str, counts: &BTreeMap<String, u64>) {
    if !counts.is_empty() {
        let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("  {label}: {}", list.join(", "));
    }
}

fn threads(n: usize) -> String {
    plural(n, "thread")
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{} {noun}s", grouped(n as f64)) }
}

/// A table row: `label`, the run's value and, with a baseline, the baseline's and (when
/// `ratio`) run / baseline.
fn compare_row(
    runs: &Runs<'_>,
    label: &str,
    value: &dyn Fn(&Report) -> f64,
    show: &dyn Fn(f64) -> String,
    ratio: bool,
) -> Vec<String> {
    let main = value(runs.main);
    let mut r = vec![label.to_string(), show(main)];
    if let Some(base) = runs.baseline {
        let b = value(base);
        r.push(show(b));
        r.push(if ratio && b > 0.0 { format!("{:.2}x", main / b) } else { String::new() });
    }
    r
}

/// The header row of a table with `head`'s three columns, the last two only with a baseline.
fn head_row(runs: &Runs<'_>, head: [&str; 3]) -> Vec<String> {
    let mut r = vec![String::new(), head[0].to_string()];
    if runs.baseline.is_some() {
        r.extend([head[1].to_string(), head[2].to_string()]);
    }
    r
}

/// The roundtrip or jobs table: the run, its baseline and their ratio side by side.
fn print_runs(opts: &BenchOptions, runs: &Runs<'_>, head: [&str; 3], noun: &str) {
    let subject = match opts.mode {
        super::Mode::Jobs => {
            format!("function {} with {} payload bytes, ", opts.function, opts.payload_bytes)
        }
        _ => {
            let kind = if opts.binary { "binary" } else { "text" };
            let check = if opts.expect.as_deref() == Some(EXPECT_ECHO) { ", echoed" } else { "" };
            format!("{}-byte {kind} messages{check}, ", grouped(opts.message.len() as f64))
        }
    };
    println!(
        "gearsock bench {}: {}, {subject}{} x {} in flight, {}, {} s measured after {} s warm-up",
        opts.mode.name(),
        opts.url,
        plural(opts.connections, "connection"),
        opts.in_flight,
        threads(opts.threads),
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64(),
    );
    let mut rows = vec![head_row(runs, head)];
    let mut row = |label: &str, value: &dyn Fn(&Report) -> f64, show: &dyn Fn(f64) -> String, ratio: bool| {
        rows.push(compare_row(runs, label, value, show, ratio));
    };
    let lat = |q: fn(&Latency) -> f64| move |r: &Report| q(&Latency::of(&r.meter.latency));
    row(&format!("{noun}/s"), &Report::rate, &grouped, true);
    row("latency p50 (µs)", &lat(|l| l.p50), &micros, true);
    row("latency p90 (µs)", &lat(|l| l.p90), &micros, true);
    row("latency p99 (µs)", &lat(|l| l.p99), &micros, true);
    row("latency p99.9 (µs)", &lat(|l| l.p999), &micros, true);
    row("latency max (µs)", &lat(|l| l.max), &micros, true);
    row(&format!("{noun} measured"), &|r| r.meter.measured as f64, &grouped, false);
    row("replies checked", &|r| r.meter.replies as f64, &grouped, false);
    row("mismatches", &|r| r.meter.mismatches as f64, &grouped, false);
    row("errors", &|r| r.meter.errors as f64, &grouped, false);
    row("connections up", &|r| r.established as f64, &grouped, false);
    row("connections failed", &|r| r.failed() as f64, &grouped, false);
    row("connections lost", &|r| r.lost_count() as f64, &grouped, false);
    let mut labels: BTreeSet<&str> = runs.main.cpu_percent().into_keys().collect();
    labels.extend(runs.baseline.map(Report::cpu_percent).unwrap_or_default().into_keys());
    for label in labels {
        let cpu = move |r: &Report| r.cpu_percent().get(label).copied().unwrap_or(f64::NAN);
        let show = |p: f64| if p.is_nan() { "-".to_string() } else { format!("{p:.0}%") };
        row(&format!("{label} CPU (% of a core)"), &cpu, &show, false);
    }
    print_table(&rows);
    if let Some(base) = runs.baseline
        && opts.mode == super::Mode::Jobs
    {
        let added = Latency::of(&runs.main.meter.latency).p50 - Latency::of(&base.meter.latency).p50;
        if added < 0.0 {
            println!(
                "  the bridge adds nothing measurable at p50 ({} µs less, within the noise)",
                micros(-added)
            );
        } else {
            println!("  the bridge adds {} µs at p50", micros(added));
        }
    }
    for (name, r) in [(head[0], Some(runs.main)), (head[1], runs.baseline)] {
        let Some(r) = r else { continue };
        print_counts(&format!("{name} errors"), &r.meter.error_kinds);
        print_counts(&format!("{name} connect failures"), &r.connect_failures);
        print_counts(&format!("{name} connections lost"), &r.lost);
    }
}

/// The connect table: the server's handshakes and, with `--baseline`, the acceptor's and their
/// ratio side by side; the server's RSS below it.
fn print_connect(opts: &BenchOptions, runs: &Runs<'_>, rss: Option<Rss>, spec: &Spec) {
    let sources = match spec.sources.len() {
        0 => String::new(),
        n => format!(", {n} source addresses"),
    };
    println!(
        "gearsock bench connect: {}, {}, {} in flight, {}{sources}",
        opts.url,
        plural(opts.connections, "connection"),
        plural(opts.concurrency, "handshake"),
        threads(opts.threads)
    );
    let mut rows = vec![head_row(runs, ["server", "baseline acceptor", "server / baseline"])];
    let mut row = |label: &str, value: &dyn Fn(&Report) -> f64, show: &dyn Fn(f64) -> String, ratio: bool| {
        rows.push(compare_row(runs, label, value, show, ratio));
    };
    let lat = |q: fn(&Latency) -> f64| move |r: &Report| q(&Latency::of(&r.handshake));
    row("handshakes/s", &handshake_rate, &grouped, true);
    row("connecting (s)", &|r| r.connect_elapsed().as_secs_f64(), &|s| format!("{s:.3}"), false);
    row("handshake p50 (µs)", &lat(|l| l.p50), &micros, true);
    row("handshake p90 (µs)", &lat(|l| l.p90), &micros, true);
    row("handshake p99 (µs)", &lat(|l| l.p99), &micros, true);
    row("handshake max (µs)", &lat(|l| l.max), &micros, true);
    row("connections attempted", &|r| r.attempted as f64, &grouped, false);
    row("connections up", &|r| r.established as f64, &grouped, false);
    row("connections failed", &|r| r.failed() as f64, &grouped, false);
    row("lost while held", &|r| r.lost_count() as f64, &grouped, false);
    print_table(&rows);
    if let Some(rss) = rss {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let per = rss.per_connection(runs.main.established);
        println!(
            "  server RSS (pid {}): {:.1} MiB before, {:.1} MiB with {} idle connections: {} bytes \
             ({:.2} KiB) each",
            rss.pid,
            mib(rss.before),
            mib(rss.after),
            grouped(runs.main.established as f64),
            grouped(per),
            per / 1024.0
        );
    }
    let named = [("server", Some(runs.main)), ("baseline acceptor", runs.baseline)];
    for (name, r) in named {
        let Some(r) = r else { continue };
        print_counts(&format!("{name} connect failures"), &r.connect_failures);
        print_counts(&format!("{name} connections lost"), &r.lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(1234567.4), "1,234,567");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(-4096.0), "-4,096");
        assert_eq!(micros(12.34), "12.3");
        assert_eq!(micros(12345.0), "12,345");
    }

    #[test]
    fn loopback_targets_get_source_addresses_when_asked() {
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut opts = BenchOptions { source_ips: Some(3), ..BenchOptions::default() };
        let got = source_addresses(&opts, target).unwrap();
        assert_eq!(got, ["127.0.0.1", "127.0.0.2", "127.0.0.3"].map(|a| a.parse::<Ipv4Addr>().unwrap()));
        opts.source_ips = None;
        assert!(source_addresses(&opts, target).unwrap().is_empty(), "100 connections need no bind");
        opts.source_ips = Some(2);
        assert!(source_addresses(&opts, "10.0.0.1:9".parse().unwrap()).is_err());
    }
}
