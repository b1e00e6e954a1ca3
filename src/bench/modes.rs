//! The three modes of `gearsock bench`: what each runs, in which order, and how its figures
//! are printed (a table, or one JSON object with `--json`).
//!
//! Baselines run in the same process right after the measured run, with the same connections,
//! in-flight count, warm-up and duration, so a noisy machine shows up as a ratio, not as a
//! different absolute figure every time.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::driver::{Fleet, Schedule, Spec, run_timed};
use super::echo::EchoServer;
use super::meter::{Latency, Report, per_second};
use super::session::{
    Endpoint, Expect, GearmanDirect, GearmanPlan, Idle, Jobs, JobsPlan, LineSession, Roundtrip,
    RoundtripPlan, WsSession,
};
use super::sys::{self, CpuProbe};
use super::wire::{OP_TEXT, encode_client_frame};
use super::{BenchOptions, DEFAULT_MESSAGE, DEFAULT_REPLY, parse_url, resolve};

/// How long connect mode lets the server settle before reading its VmRSS.
const SETTLE: Duration = Duration::from_secs(1);
/// Pause between a run and its baseline, so jobs still in flight drain.
const DRAIN: Duration = Duration::from_millis(500);

/// `gearsock bench connect`.
pub fn run_connect(opts: &BenchOptions) -> Result<i32, Box<dyn Error>> {
    let (endpoint, target) = ws_target(opts)?;
    let spec = spec(opts, target, Schedule::Hold)?;
    let before = match opts.pid {
        Some(pid) => Some(sys::resident_bytes(pid).map_err(|e| format!("--pid {pid}: {e}"))?),
        None => None,
    };
    let fleet =
        Fleet::start(&spec, move |rng| WsSession::new(endpoint.clone(), rng.bytes16(), rng.mask(), Idle))?;
    let mut after = None;
    if fleet.wait_connected() {
        let up_at = Instant::now();
        if let Some(pid) = opts.pid {
            thread::sleep(SETTLE);
            match sys::resident_bytes(pid) {
                Ok(bytes) => after = Some(bytes),
                Err(e) => eprintln!("gearsock bench: --pid {pid} after connecting: {e}"),
            }
        }
        thread::sleep(opts.hold.saturating_sub(up_at.elapsed()));
    }
    fleet.stop();
    let report = fleet.join()?;
    let rss = opts.pid.zip(before).zip(after).map(|((pid, before), after)| Rss { pid, before, after });
    if opts.json {
        println!("{}", connect_json(opts, &report, rss));
    } else {
        print_connect(opts, &report, rss, &spec);
    }
    Ok(i32::from(report.failed() > 0 || report.lost_count() > 0 || report.established == 0))
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
    let expect = match (&opts.expect, opts.message == DEFAULT_MESSAGE) {
        (Some(text), _) => Expect::Exact(text.clone().into_bytes()),
        (None, true) => Expect::Exact(DEFAULT_REPLY.as_bytes().to_vec()),
        (None, false) => Expect::AnyText,
    };
    let mask = super::driver::Rng::seeded(u64::MAX).mask();
    let mut request = Vec::new();
    encode_client_frame(&mut request, OP_TEXT, opts.message.as_bytes(), mask);
    let plan = Arc::new(RoundtripPlan { request, expect, in_flight: opts.in_flight });
    let probes: Vec<_> = opts.pid.map(|pid| ("server", CpuProbe::Process(pid))).into_iter().collect();
    let ws = run_timed(&spec(opts, target, timed(opts))?, &probes, move |rng| {
        WsSession::new(endpoint.clone(), rng.bytes16(), mask, Roundtrip::new(plan.clone()))
    })?;
    let baseline_cpus = match (opts.baseline_cpu, opts.pid) {
        (Some(cpu), _) => Some(vec![cpu]),
        // Where the server may run, so both servers get the same cores.
        (None, Some(pid)) => sys::cpus_of(pid).ok(),
        (None, None) => None,
    };
    let baseline = if opts.baseline {
        let echo = EchoServer::start(baseline_cpus.clone())?;
        let line = format!("{}\n", opts.message).into_bytes();
        let expect = Expect::Exact(opts.message.clone().into_bytes());
        let plan = Arc::new(RoundtripPlan { request: line, expect, in_flight: opts.in_flight });
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
            match &baseline_cpus {
                Some(cpus) => println!("  the echo server ran on CPUs {cpus:?}"),
                None => println!(
                    "  the echo server was not pinned (it shared this process's CPUs): \
                     give --pid or --baseline-cpu to run it where the server runs"
                ),
            }
        }
    }
    Ok(i32::from(troubled(&ws) || baseline.as_ref().is_some_and(troubled)))
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
fn ws_target(opts: &BenchOptions) -> Result<(Arc<Endpoint>, SocketAddr), String> {
    let url = parse_url(&opts.url)?;
    let target = resolve(&url.authority)?;
    Ok((Arc::new(Endpoint { host: url.authority, path: url.path }), target))
}

fn timed(opts: &BenchOptions) -> Schedule {
    Schedule::Timed { warmup: opts.warmup, duration: opts.duration }
}

/// A run's [`Spec`], with the source addresses for `target`.
fn spec(opts: &BenchOptions, target: SocketAddr, schedule: Schedule) -> Result<Spec, String> {
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
    let loopback = matches!(target, SocketAddr::V4(v4) if v4.ip().is_loopback());
    let count = match opts.source_ips {
        Some(n) if n > 1 && !loopback => {
            return Err(format!("--source-ips needs an IPv4 loopback target, not {target}"));
        }
        Some(n) => n,
        None if loopback => opts.connections.div_ceil((sys::ephemeral_ports() * 3 / 4).max(1)),
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
struct DemoWorkers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<std::io::Result<()>>>,
    /// The worker threads' ids, for their CPU time.
    thread_ids: Vec<u32>,
}

impl DemoWorkers {
    fn start(count: usize, gearmand: &str) -> Result<DemoWorkers, String> {
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
    fn stop(mut self) -> Vec<String> {
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
    v["message"] = json!(opts.message);
    v["expect"] = match (&opts.expect, opts.message == DEFAULT_MESSAGE) {
        (Some(text), _) => json!(text),
        (None, true) => json!(DEFAULT_REPLY),
        (None, false) => Value::Null,
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

fn connect_json(opts: &BenchOptions, r: &Report, rss: Option<Rss>) -> Value {
    let elapsed = r.connect_elapsed();
    json!({
        "mode": "connect",
        "url": opts.url,
        "connections": opts.connections,
        "concurrency": opts.concurrency,
        "threads": opts.threads,
        "hold_s": opts.hold.as_secs_f64(),
        "attempted": r.attempted,
        "established": r.established,
        "failed": r.failed(),
        "failures": r.connect_failures,
        "lost": r.lost,
        "elapsed_s": round(elapsed.as_secs_f64(), 4),
        "handshakes_per_s": round(per_second(r.established, elapsed), 1),
        "handshake_latency_us": Latency::of(&r.handshake).to_json(),
        "rss": rss.map_or(Value::Null, |rss| json!({
            "pid": rss.pid,
            "before_bytes": rss.before,
            "after_bytes": rss.after,
            "growth_bytes": rss.growth(),
            "per_connection_bytes": round(rss.per_connection(r.established), 1),
            "per_connection_kib": round(rss.per_connection(r.established) / 1024.0, 2),
        })),
    })
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

/// The roundtrip or jobs table: the run, its baseline and their ratio side by side.
fn print_runs(opts: &BenchOptions, runs: &Runs<'_>, head: [&str; 3], noun: &str) {
    let subject = match opts.mode {
        super::Mode::Jobs => {
            format!("function {} with {} payload bytes, ", opts.function, opts.payload_bytes)
        }
        _ => String::new(),
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
    let with_base = runs.baseline.is_some();
    let mut rows = vec![{
        let mut r = vec![String::new(), head[0].to_string()];
        if with_base {
            r.extend([head[1].to_string(), head[2].to_string()]);
        }
        r
    }];
    let mut row = |label: &str, value: &dyn Fn(&Report) -> f64, show: &dyn Fn(f64) -> String, ratio: bool| {
        let main = value(runs.main);
        let mut r = vec![label.to_string(), show(main)];
        if let Some(base) = runs.baseline {
            let b = value(base);
            r.push(show(b));
            r.push(if ratio && b > 0.0 { format!("{:.2}x", main / b) } else { String::new() });
        }
        rows.push(r);
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

fn print_connect(opts: &BenchOptions, r: &Report, rss: Option<Rss>, spec: &Spec) {
    let elapsed = r.connect_elapsed();
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
    let l = Latency::of(&r.handshake);
    let lines = [
        ("established", format!("{} of {}", grouped(r.established as f64), grouped(r.attempted as f64))),
        ("failed", grouped(r.failed() as f64)),
        (
            "handshakes/s",
            format!("{} ({:.3} s)", grouped(per_second(r.established, elapsed)), elapsed.as_secs_f64()),
        ),
        (
            "handshake latency",
            format!(
                "p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
                micros(l.p50),
                micros(l.p90),
                micros(l.p99),
                micros(l.max)
            ),
        ),
        ("lost while held", grouped(r.lost_count() as f64)),
    ];
    for (label, text) in lines {
        println!("  {label:<20} {text}");
    }
    if let Some(rss) = rss {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let per = rss.per_connection(r.established);
        println!(
            "  {:<20} {:.1} MiB before, {:.1} MiB with {} idle connections: {} bytes ({:.2} KiB) each",
            format!("server RSS ({})", rss.pid),
            mib(rss.before),
            mib(rss.after),
            grouped(r.established as f64),
            grouped(per),
            per / 1024.0
        );
    }
    print_counts("connect failures", &r.connect_failures);
    print_counts("connections lost", &r.lost);
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
