//! Counters for `GET /metrics`, and their Prometheus text rendering.
//!
//! Plain integers bumped where things happen; no atomics (one thread), no clock, no I/O.

use std::fmt::Write;

/// Kinds of client message, for `gearsock_messages_in_total{type=…}`.
pub const MESSAGE_TYPES: [&str; 6] = ["ping", "worker.complete", "submit", "status", "invalid", "binary"];
/// Error codes sent to clients, for `gearsock_errors_total{code=…}`.
pub const ERROR_CODES: [&str; 11] = [
    "bad_json",
    "bad_request",
    "unknown_type",
    "too_large",
    "too_many_jobs",
    "unavailable",
    "forbidden",
    "unknown_job",
    "binary",
    "ambiguous_job",
    "gearmand_error",
];
/// Job modes, for `mode=…`.
pub const MODES: [&str; 3] = ["stream", "background", "ping"];
/// How jobs ended, for `outcome=…`.
pub const OUTCOMES: [&str; 8] =
    ["complete", "failed", "exception", "lost", "rejected", "unavailable", "abandoned", "done"];

/// Everything `/metrics` reports that is counted rather than read off live state.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Client messages by `MESSAGE_TYPES` index.
    pub messages_in: [u64; MESSAGE_TYPES.len()],
    /// Text frames queued to clients.
    pub messages_out: u64,
    /// Error replies by `ERROR_CODES` index.
    pub errors: [u64; ERROR_CODES.len()],
    /// Jobs accepted, by `MODES` index.
    pub jobs_submitted: [u64; MODES.len()],
    /// Jobs ended, by `MODES` then `OUTCOMES` index.
    pub jobs_finished: [[u64; OUTCOMES.len()]; MODES.len()],
    /// WebSocket upgrades completed.
    pub handshakes: u64,
    /// Plain HTTP requests answered.
    pub http_requests: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused because the server was full.
    pub refused: u64,
    /// Connections closed (reaped), whoever ended them.
    pub closed: u64,
    /// Successful gearmand (re)connections.
    pub gearmand_connects: u64,
    /// gearmand connections lost after they were up.
    pub gearmand_disconnects: u64,
    /// Attempts to reach a gearmand that failed (lookup, connect or greeting).
    pub gearmand_connect_failures: u64,
    /// gearmand connections retired for holding too many abandoned jobs.
    pub gearmand_retired: u64,
    /// Clients dropped for not reading their replies (soft, hard or total output limit).
    pub slow_readers_dropped: u64,
    /// Passes of the event loop.
    pub loop_iterations: u64,
    /// Messages sent back in echo mode (`serve --echo`), and their payload bytes.
    pub echoed: u64,
    /// Payload bytes of those messages.
    pub echoed_bytes: u64,
}

/// Live values read when `/metrics` is asked for.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Open client connections.
    pub connections: usize,
    /// Unfinished jobs.
    pub jobs_in_flight: usize,
    /// Submissions waiting for a gearmand.
    pub jobs_queued: usize,
    /// Armed timers.
    pub timers: usize,
    /// Stored `worker.complete` values nobody has claimed yet.
    pub stored_values: usize,
    /// Their bytes.
    pub stored_bytes: usize,
    /// Bytes queued for all clients.
    pub client_output_bytes: usize,
    /// gearmand links by state name (`connected`, `stalled`, `connecting`, `resolving`,
    /// `disconnected`).
    pub links: Vec<(String, &'static str)>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP gearsock_{name} {help}\n# TYPE gearsock_{name} {kind}");
}

impl Metrics {
    /// Counts one message of `bytes` sent back in echo mode.
    pub fn note_echo(&mut self, bytes: usize) {
        self.echoed += 1;
        self.echoed_bytes += bytes as u64;
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::with_capacity(4096);
        family(&mut o, "connections_open", "gauge", "Open client connections.");
        let _ = writeln!(o, "gearsock_connections_open {}", g.connections);
        family(&mut o, "connections_accepted_total", "counter", "Client connections accepted.");
        let _ = writeln!(o, "gearsock_connections_accepted_total {}", self.accepted);
        family(&mut o, "connections_refused_total", "counter", "Connections refused at the limit.");
        let _ = writeln!(o, "gearsock_connections_refused_total {}", self.refused);
        family(&mut o, "connections_closed_total", "counter", "Client connections closed.");
        let _ = writeln!(o, "gearsock_connections_closed_total {}", self.closed);
        family(&mut o, "handshakes_total", "counter", "WebSocket upgrades completed.");
        let _ = writeln!(o, "gearsock_handshakes_total {}", self.handshakes);
        family(&mut o, "http_requests_total", "counter", "Plain HTTP requests answered.");
        let _ = writeln!(o, "gearsock_http_requests_total {}", self.http_requests);
        family(&mut o, "messages_in_total", "counter", "Client messages received, by type.");
        for (name, n) in MESSAGE_TYPES.iter().zip(self.messages_in) {
            let _ = writeln!(o, "gearsock_messages_in_total{{type=\"{name}\"}} {n}");
        }
        family(&mut o, "messages_out_total", "counter", "Text frames queued to clients.");
        let _ = writeln!(o, "gearsock_messages_out_total {}", self.messages_out);
        family(&mut o, "errors_total", "counter", "Error replies sent to clients, by code.");
        for (code, n) in ERROR_CODES.iter().zip(self.errors) {
            let _ = writeln!(o, "gearsock_errors_total{{code=\"{code}\"}} {n}");
        }
        family(&mut o, "jobs_submitted_total", "counter", "Jobs accepted from clients, by mode.");
        for (mode, n) in MODES.iter().zip(self.jobs_submitted) {
            let _ = writeln!(o, "gearsock_jobs_submitted_total{{mode=\"{mode}\"}} {n}");
        }
        family(&mut o, "jobs_finished_total", "counter", "Jobs ended, by mode and outcome.");
        for (mode, row) in MODES.iter().zip(&self.jobs_finished) {
            for (outcome, n) in OUTCOMES.iter().zip(row) {
                let _ =
                    writeln!(o, "gearsock_jobs_finished_total{{mode=\"{mode}\",outcome=\"{outcome}\"}} {n}");
            }
        }
        family(&mut o, "jobs_in_flight", "gauge", "Jobs not yet finished.");
        let _ = writeln!(o, "gearsock_jobs_in_flight {}", g.jobs_in_flight);
        family(&mut o, "jobs_queued", "gauge", "Submissions waiting for a gearmand connection.");
        let _ = writeln!(o, "gearsock_jobs_queued {}", g.jobs_queued);
        family(&mut o, "stored_values", "gauge", "worker.complete values not yet claimed.");
        let _ = writeln!(o, "gearsock_stored_values {}", g.stored_values);
        family(&mut o, "stored_value_bytes", "gauge", "Bytes of worker.complete values not yet claimed.");
        let _ = writeln!(o, "gearsock_stored_value_bytes {}", g.stored_bytes);
        family(&mut o, "client_output_bytes", "gauge", "Bytes queued for all clients.");
        let _ = writeln!(o, "gearsock_client_output_bytes {}", g.client_output_bytes);
        family(&mut o, "slow_readers_dropped_total", "counter", "Clients dropped for not reading.");
        let _ = writeln!(o, "gearsock_slow_readers_dropped_total {}", self.slow_readers_dropped);
        family(&mut o, "echoed_messages_total", "counter", "Messages sent back in echo mode.");
        let _ = writeln!(o, "gearsock_echoed_messages_total {}", self.echoed);
        family(&mut o, "echoed_bytes_total", "counter", "Payload bytes sent back in echo mode.");
        let _ = writeln!(o, "gearsock_echoed_bytes_total {}", self.echoed_bytes);
        family(&mut o, "gearmand_up", "gauge", "1 when the gearmand link is connected, by server and state.");
        for (addr, state) in &g.links {
            for s in ["connected", "stalled", "connecting", "resolving", "disconnected"] {
                let v = u8::from(*state == s);
                let _ = writeln!(o, "gearsock_gearmand_up{{server=\"{addr}\",state=\"{s}\"}} {v}");
            }
        }
        family(&mut o, "gearmand_connects_total", "counter", "gearmand connections established.");
        let _ = writeln!(o, "gearsock_gearmand_connects_total {}", self.gearmand_connects);
        family(
            &mut o,
            "gearmand_disconnects_total",
            "counter",
            "gearmand connections lost after they were up.",
        );
        let _ = writeln!(o, "gearsock_gearmand_disconnects_total {}", self.gearmand_disconnects);
        family(&mut o, "gearmand_connect_failures_total", "counter", "Failed attempts to reach a gearmand.");
        let _ = writeln!(o, "gearsock_gearmand_connect_failures_total {}", self.gearmand_connect_failures);
        family(&mut o, "gearmand_retired_total", "counter", "gearmand connections retired (orphans).");
        let _ = writeln!(o, "gearsock_gearmand_retired_total {}", self.gearmand_retired);
        family(&mut o, "timers_armed", "gauge", "Timers in the wheel.");
        let _ = writeln!(o, "gearsock_timers_armed {}", g.timers);
        family(&mut o, "loop_iterations_total", "counter", "Passes of the event loop.");
        let _ = writeln!(o, "gearsock_loop_iterations_total {}", self.loop_iterations);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type() {
        let mut m = Metrics::default();
        m.messages_in[0] = 3;
        let text =
            m.render(&Gauges { links: vec![("127.0.0.1:4730".into(), "connected")], ..Default::default() });
        assert!(text.contains("gearsock_messages_in_total{type=\"ping\"} 3"));
        assert!(text.contains("gearsock_gearmand_up{server=\"127.0.0.1:4730\",state=\"connected\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
        }
    }
}
