//! What one bench thread counts, and the [`Report`] the threads' counts merge into.
//!
//! Sans-IO: the clock is read by the driver and handed in. Latencies are kept in nanoseconds in
//! hdrhistograms (3 significant digits, up to a minute) and shown in microseconds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Slowest latency a histogram keeps exactly; slower ones count as this.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// An empty latency histogram (nanoseconds, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant bounds are valid")
}

/// Records `elapsed` in nanoseconds (at least 1, at most a minute).
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_NS);
    histogram.saturating_record(ns);
}

/// Adds one to `map[key]`.
pub fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_string(), 1);
        }
    }
}

/// Replies, errors and latencies of one thread's workload.
///
/// Replies are measured when they arrive inside the window `[start, end)`; before it (the
/// warm-up) they are only checked. Errors count over the whole run: a wrong reply during the
/// warm-up is still wrong.
#[derive(Debug)]
pub struct Meter {
    window: Option<(Instant, Instant)>,
    /// Latency of each measured reply, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Good replies that arrived inside the window.
    pub measured: u64,
    /// Good replies over the whole run.
    pub replies: u64,
    /// Errors over the whole run, mismatches included.
    pub errors: u64,
    /// Errors by kind (`mismatch`, `job.failed`, `error:too_many_jobs`, ...).
    pub error_kinds: BTreeMap<String, u64>,
    /// Replies that were not the expected one.
    pub mismatches: u64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            window: None,
            latency: latency_histogram(),
            measured: 0,
            replies: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            mismatches: 0,
        }
    }
}

impl Meter {
    /// Sets the measured window; requests stop being sent at its end.
    pub fn set_window(&mut self, start: Instant, end: Instant) {
        self.window = Some((start, end));
    }

    /// Whether a workload may send another request at `now`.
    pub fn may_send(&self, now: Instant) -> bool {
        self.window.is_none_or(|(_, end)| now < end)
    }

    /// A good reply to a request sent at `sent`.
    pub fn reply(&mut self, sent: Instant, now: Instant) {
        self.replies += 1;
        if let Some((start, end)) = self.window
            && now >= start
            && now < end
        {
            self.measured += 1;
            record(&mut self.latency, now.saturating_duration_since(sent));
        }
    }

    /// An error of some kind.
    pub fn error(&mut self, kind: &str) {
        self.errors += 1;
        bump(&mut self.error_kinds, kind);
    }

    /// A reply that was not the expected one: an error too.
    pub fn mismatch(&mut self) {
        self.mismatches += 1;
        self.error("mismatch");
    }

    /// Adds another thread's counts.
    pub fn merge(&mut self, other: &Meter) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.measured += other.measured;
        self.replies += other.replies;
        self.errors += other.errors;
        self.mismatches += other.mismatches;
        for (kind, n) in &other.error_kinds {
            *self.error_kinds.entry(kind.clone()).or_insert(0) += n;
        }
    }
}

/// Everything one run measured: connections and the workload, all threads merged.
#[derive(Debug)]
pub struct Report {
    /// Connections tried.
    pub attempted: u64,
    /// Connections that got through their handshake.
    pub established: u64,
    /// Connections that never got up, by reason.
    pub connect_failures: BTreeMap<String, u64>,
    /// Connections lost after they were up, by reason.
    pub lost: BTreeMap<String, u64>,
    /// From the start of connect() to a usable connection, nanoseconds.
    pub handshake: Histogram<u64>,
    /// When the first connection was tried.
    pub first_attempt: Option<Instant>,
    /// When the last connection got up.
    pub last_established: Option<Instant>,
    /// The measured window's length (zero without one).
    pub window: Duration,
    /// CPU the bench threads used during the window, all threads.
    pub client_cpu: Duration,
    /// CPU other processes or threads (the server, gearmand, the echo thread) used during the
    /// window, by label, as the run was asked to probe.
    pub probed_cpu: BTreeMap<&'static str, Duration>,
    /// The workload's counts.
    pub meter: Meter,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            attempted: 0,
            established: 0,
            connect_failures: BTreeMap::new(),
            lost: BTreeMap::new(),
            handshake: latency_histogram(),
            first_attempt: None,
            last_established: None,
            window: Duration::ZERO,
            client_cpu: Duration::ZERO,
            probed_cpu: BTreeMap::new(),
            meter: Meter::default(),
        }
    }
}

impl Report {
    /// Adds another thread's report.
    pub fn merge(&mut self, other: &Report) {
        self.attempted += other.attempted;
        self.established += other.established;
        for (map, from) in
            [(&mut self.connect_failures, &other.connect_failures), (&mut self.lost, &other.lost)]
        {
            for (reason, n) in from {
                *map.entry(reason.clone()).or_insert(0) += n;
            }
        }
        let _ = self.handshake.add(&other.handshake);
        self.first_attempt = match (self.first_attempt, other.first_attempt) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_established = self.last_established.max(other.last_established);
        self.window = self.window.max(other.window);
        self.client_cpu += other.client_cpu;
        self.probed_cpu.extend(other.probed_cpu.iter().map(|(k, v)| (*k, *v)));
        self.meter.merge(&other.meter);
    }

    /// Connections that failed to come up.
    pub fn failed(&self) -> u64 {
        self.connect_failures.values().sum()
    }

    /// Connections lost once up.
    pub fn lost_count(&self) -> u64 {
        self.lost.values().sum()
    }

    /// From the first connect() to the last connection up.
    pub fn connect_elapsed(&self) -> Duration {
        match (self.first_attempt, self.last_established) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// Bench threads' CPU as a percentage of one core over the window.
    pub fn client_cpu_percent(&self) -> f64 {
        percent(self.client_cpu, self.window)
    }

    /// CPU percentages of one core over the window: `bench` (this run's threads) and each probe.
    pub fn cpu_percent(&self) -> BTreeMap<&'static str, f64> {
        let mut all: BTreeMap<&'static str, f64> =
            self.probed_cpu.iter().map(|(label, cpu)| (*label, percent(*cpu, self.window))).collect();
        all.insert("bench", self.client_cpu_percent());
        all
    }

    /// Measured replies per second of window.
    pub fn rate(&self) -> f64 {
        per_second(self.meter.measured, self.window)
    }
}

/// `count` per second of `over` (0 for an empty span).
pub fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() { 0.0 } else { count as f64 / over.as_secs_f64() }
}

/// `part` as a percentage of `whole` (0 for an empty whole).
pub fn percent(part: Duration, whole: Duration) -> f64 {
    if whole.is_zero() { 0.0 } else { 100.0 * part.as_secs_f64() / whole.as_secs_f64() }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// Summarises a nanosecond histogram in microseconds (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        if histogram.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            p50: us(histogram.value_at_quantile(0.50)),
            p90: us(histogram.value_at_quantile(0.90)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }

    /// As a JSON object (microseconds, one decimal).
    pub fn to_json(self) -> serde_json::Value {
        let r = |v: f64| (v * 10.0).round() / 10.0;
        serde_json::json!({
            "count": self.count, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99),
            "p99_9": r(self.p999), "max": r(self.max), "mean": r(self.mean),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replies_inside_the_window_are_measured() {
        let t0 = Instant::now();
        let mut m = Meter::default();
        m.set_window(t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        m.reply(t0, t0 + Duration::from_millis(500));
        m.reply(t0 + Duration::from_millis(1100), t0 + Duration::from_millis(1200));
        m.reply(t0, t0 + Duration::from_secs(3));
        assert_eq!((m.replies, m.measured), (3, 1));
        assert!(m.may_send(t0 + Duration::from_millis(1999)));
        assert!(!m.may_send(t0 + Duration::from_secs(2)));
        let latency = Latency::of(&m.latency);
        assert!((latency.p50 - 100_000.0).abs() < 100.0, "{latency:?}");
    }

    #[test]
    fn reports_merge() {
        let t0 = Instant::now();
        let mut a = Report::default();
        let mut b = Report::default();
        a.first_attempt = Some(t0 + Duration::from_millis(5));
        b.first_attempt = Some(t0);
        b.last_established = Some(t0 + Duration::from_secs(1));
        bump(&mut a.connect_failures, "refused");
        bump(&mut b.connect_failures, "refused");
        b.meter.mismatch();
        a.merge(&b);
        assert_eq!(a.connect_elapsed(), Duration::from_secs(1));
        assert_eq!(a.failed(), 2);
        assert_eq!((a.meter.errors, a.meter.mismatches), (1, 1));
    }
}
