//! Counters for `GET /metrics`, and their Prometheus text rendering.
//!
//! Plain integers bumped where things happen; no atomics (one thread), no clock, no I/O.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// Declares a label enum: its variants, `ALL` in `/metrics` order, and each one's label.
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order `/metrics` lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label as clients and `/metrics` see it.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

labels! {
    /// Kinds of client message, for `gearsock_messages_in_total{type=…}`.
    Message {
        /// The article's ping.
        Ping = "ping",
        /// A worker's report.
        WorkerComplete = "worker.complete",
        /// A job submission.
        Submit = "submit",
        /// A status question.
        Status = "status",
        /// A client token (`auth`).
        Auth = "auth",
        /// Following a job again (`attach`).
        Attach = "attach",
        /// Not JSON, or no known type.
        Invalid = "invalid",
        /// A binary frame.
        Binary = "binary",
    }
}

labels! {
    /// How a gearmand is shown on `/healthz` and in `gearsock_gearmand_up{state=…}`: the
    /// server decides with the variant; only these pages turn it into text.
    LinkStatus {
        /// Up and answering.
        Connected = "connected",
        /// Up, but not taking bytes or owing replies for a while.
        Stalled = "stalled",
        /// A connect or its greeting is in progress.
        Connecting = "connecting",
        /// The host name is being looked up.
        Resolving = "resolving",
        /// Not connected.
        Disconnected = "disconnected",
    }
}

impl LinkStatus {
    /// The status a page's `name` stands for (a group member's figures read back).
    pub fn from_name(name: &str) -> Option<LinkStatus> {
        LinkStatus::ALL.iter().copied().find(|s| s.name() == name)
    }
}

impl Serialize for LinkStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Message {
    /// The kind a `type` field names; anything else is `Invalid`. `Binary` and `Invalid` are
    /// labels of the metric, not types a text message can name: `{"type":"binary"}` is an
    /// unknown type, counted as `Invalid` (the fuzzer found it counted as a binary frame).
    pub fn from_type(name: &str) -> Message {
        Message::ALL
            .iter()
            .copied()
            .find(|m| m.name() == name && !matches!(m, Message::Invalid | Message::Binary))
            .unwrap_or(Message::Invalid)
    }
}

labels! {
    /// What an `attach` came to, for `gearsock_attaches_total{outcome=…}`: each is counted
    /// once (a takeover with a gap is `taken_over`).
    AttachOutcome {
        /// Replayed from where the client asked, nothing missing.
        Ok = "ok",
        /// Refused: a wrong resume token, an unknown or expired job (`unknown_job`).
        Unknown = "unknown",
        /// Some events the client asked for had been trimmed (`job.gap`).
        Gap = "gap",
        /// Taken from another connection (which got `job.detached`).
        TakenOver = "taken_over",
    }
}

labels! {
    /// Error codes sent to clients, for `gearsock_errors_total{code=…}`.
    ErrorCode {
        /// Not valid JSON.
        BadJson = "bad_json",
        /// Valid JSON of the wrong shape, or a field out of range.
        BadRequest = "bad_request",
        /// A `type` nobody knows.
        UnknownType = "unknown_type",
        /// Over `--max-jobs-per-connection`.
        TooManyJobs = "too_many_jobs",
        /// No gearmand takes work and the wait queue is full or timed out.
        Unavailable = "unavailable",
        /// A report from a peer that may not report.
        Forbidden = "forbidden",
        /// No such job (of this connection).
        UnknownJob = "unknown_job",
        /// A binary frame in the job protocol.
        Binary = "binary",
        /// An id-only report that names more than one job.
        AmbiguousJob = "ambiguous_job",
        /// gearmand answered a question with ERROR.
        GearmandError = "gearmand_error",
        /// No valid token yet, or it expired, or an `auth` was refused.
        Unauthorized = "unauthorized",
        /// Over `--max-jobs-per-second` (the reply says `retry_after_ms`).
        RateLimited = "rate_limited",
    }
}

labels! {
    /// Who may run what (issue 19): what an `auth` (or a Bearer header) came to, for
    /// `gearsock_auth_total{outcome=…,reason=…}`; the refused ones by `TokenError::label` and
    /// the server's own reasons. Never the `sub`: one series per client would not be bounded.
    AuthReason {
        /// Accepted (a refresh too).
        Valid = "valid",
        /// Over 8 KiB.
        TooLong = "too_long",
        /// Not three base64url parts of JSON.
        Malformed = "malformed",
        /// `alg` is not HS256.
        Alg = "alg",
        /// No key makes the signature.
        BadSignature = "bad_signature",
        /// Past `exp`.
        Expired = "expired",
        /// Before `nbf` or `iat`.
        NotYetValid = "not_yet_valid",
        /// A claim is missing or of the wrong shape.
        BadClaim = "bad_claim",
        /// A refresh named another `sub`.
        OtherSubject = "other_subject",
        /// `--max-connections-per-subject`.
        PerSubject = "per_subject",
        /// Not authenticated within `--handshake-timeout-ms`.
        Timeout = "timeout",
    }
}

impl AuthReason {
    /// The reason a token label (`TokenError::label`) names; `BadClaim` for any other.
    pub fn from_label(label: &str) -> AuthReason {
        AuthReason::ALL.iter().copied().find(|r| r.name() == label).unwrap_or(AuthReason::BadClaim)
    }
}

labels! {
    /// Requests and connections refused by who-may-run-what, for
    /// `gearsock_access_refused_total{what=…}`.
    Denial {
        /// A message before a valid token, or after it expired.
        Unauthorized = "unauthorized",
        /// A function no `--allow-function` (or token claim) allows; a ping with `--no-ping`.
        Function = "function",
        /// Over `--max-jobs-per-second`.
        RateLimited = "rate_limited",
        /// An upgrade over `--max-connections-per-ip` (429).
        PerIp = "per_ip",
        /// An `auth` over `--max-connections-per-subject` (1008).
        PerSubject = "per_subject",
    }
}

labels! {
    /// Job modes, for `mode=…`.
    Mode {
        /// Foreground: results stream back.
        Stream = "stream",
        /// Background: polled for status.
        Background = "background",
        /// The article's ping.
        Ping = "ping",
    }
}

labels! {
    /// How jobs ended, for `outcome=…`.
    Outcome {
        /// WORK_COMPLETE (stream) or a finished poll (background).
        Complete = "complete",
        /// WORK_FAIL, or a failure of ours (oversized result, lost link).
        Failed = "failed",
        /// WORK_EXCEPTION.
        Exception = "exception",
        /// Its gearmand connection was lost, or gearmand forgot it.
        Lost = "lost",
        /// gearmand refused the submission.
        Rejected = "rejected",
        /// It never reached a gearmand.
        Unavailable = "unavailable",
        /// Its client left first.
        Abandoned = "abandoned",
        /// A ping whose value arrived.
        Done = "done",
    }
}

/// The outcomes a job of each mode can end with, the only `jobs_finished_total` series exported.
/// Stream jobs hear WORK_* (complete, failed, exception) and a lost link fails them; background
/// jobs and pings are polled, so they end complete (a ping: done) or lost. Any job can be
/// rejected by gearmand, never submitted, abandoned by its client, or lost at shutdown.
pub const FINISHED: &[(Mode, &[Outcome])] = {
    use Outcome::*;
    &[
        (Mode::Stream, &[Complete, Failed, Exception, Lost, Rejected, Unavailable, Abandoned]),
        (Mode::Background, &[Complete, Lost, Rejected, Unavailable, Abandoned]),
        (Mode::Ping, &[Done, Lost, Rejected, Unavailable, Abandoned]),
    ]
};

/// What the IO shell saw, handed on to be counted: the shell reports, `Metrics` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopEvent {
    /// A pass of the event loop.
    Pass,
    /// A refusal of who-may-run-what the shell made itself (429 over the per-address cap).
    Denied(Denial),
    /// A client connection was accepted.
    Accepted,
    /// One was refused at `--max-connections`.
    Refused,
    /// One was closed and reaped.
    Closed,
    /// A WebSocket upgrade completed.
    Handshake,
    /// A plain HTTP request was answered.
    HttpRequest,
    /// A client was dropped for not reading its replies.
    SlowReaderDropped,
    /// A gearmand answered on a new connection.
    GearmandConnected,
    /// A gearmand connection that was up was lost.
    GearmandLost,
    /// An attempt to reach a gearmand failed.
    GearmandConnectFailed,
    /// Echo mode sent a message of this many bytes back.
    Echoed(usize),
    /// A client was closed for not finishing a message within the message timeout.
    MessageTimedOut,
    /// A client was closed as the largest holder of unfinished input over the total.
    InputTotalDropped,
}

/// Everything `/metrics` reports that is counted rather than read off live state. It travels
/// between the processes of a group as it is (serde), so a counter added here reaches the
/// group's page without more code.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// Client messages, by `Message` (read with [`Metrics::messages`]).
    messages_in: [u64; Message::ALL.len()],
    /// Text frames queued to clients.
    pub messages_out: u64,
    /// Error replies, by `ErrorCode`.
    errors: [u64; ErrorCode::ALL.len()],
    /// Jobs accepted, by `Mode`.
    jobs_submitted: [u64; Mode::ALL.len()],
    /// Jobs ended, by `Mode` then `Outcome`.
    jobs_finished: [[u64; Outcome::ALL.len()]; Mode::ALL.len()],
    /// WebSocket upgrades completed.
    handshakes: u64,
    /// Plain HTTP requests answered.
    http_requests: u64,
    /// Connections accepted.
    accepted: u64,
    /// Connections refused because the server was full.
    refused: u64,
    /// Connections closed (reaped), whoever ended them.
    closed: u64,
    /// Successful gearmand (re)connections.
    gearmand_connects: u64,
    /// gearmand connections lost after they were up.
    gearmand_disconnects: u64,
    /// Attempts to reach a gearmand that failed (lookup, connect or greeting).
    gearmand_connect_failures: u64,
    /// gearmand connections retired for holding too many abandoned jobs.
    pub gearmand_retired: u64,
    /// Clients dropped for not reading their replies (soft, hard or total output limit).
    slow_readers_dropped: u64,
    /// Reports for another instance's jobs forwarded through gearmand.
    pub reports_forwarded: u64,
    /// ... of which gearmand refused the forward.
    pub reports_forward_failed: u64,
    /// Reports other instances forwarded here: for a live job, and for none.
    reports_received: [u64; 2],
    /// Relay messages (desk jobs) left at another instance's desk, and taken from ours.
    pub relay_messages: [u64; 2],
    /// Job reply texts relayed: sent to another instance for its client, and handed to ours.
    pub relay_events: [u64; 2],
    /// Passes of the event loop.
    loop_iterations: u64,
    /// Messages sent back in echo mode (`serve --echo`), and their payload bytes.
    echoed: u64,
    /// Payload bytes of those messages.
    echoed_bytes: u64,
    /// Clients closed for not finishing a message in time.
    message_timeouts: u64,
    /// Clients closed as the largest holder of unfinished input over the total.
    input_total_dropped: u64,
    /// Who may run what: authentications by `AuthReason`, refusals by `Denial`.
    auth: [u64; AuthReason::ALL.len()],
    denied: [u64; Denial::ALL.len()],
    /// Attaches by `AttachOutcome`.
    attaches: [u64; AttachOutcome::ALL.len()],
    /// Job events sent again by an attach.
    events_replayed: u64,
    /// Detached jobs abandoned: at the end of their grace, and to keep the job logs within
    /// their total.
    detached_abandoned: [u64; 2],
}

/// Live values read when `/metrics` is asked for (and published to the group, without
/// `links`, which travel as the pages' `LinkView`s).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
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
    /// Relays this instance carries for its clients' attaches to jobs of other instances.
    pub relays_requested: usize,
    /// This instance's jobs attached from other instances (their texts relayed there).
    pub relays_served: usize,
    /// Jobs whose client left, kept for an `attach`.
    pub jobs_detached: usize,
    /// Bytes the job logs hold.
    pub job_log_bytes: usize,
    /// gearmand links and how each is shown.
    #[serde(skip)]
    pub links: Vec<(String, LinkStatus)>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP gearsock_{name} {help}\n# TYPE gearsock_{name} {kind}");
}

impl Metrics {
    /// Counts a client message.
    pub fn count_message(&mut self, m: Message) {
        self.messages_in[m as usize] += 1;
    }

    /// Client messages of kind `m` so far.
    pub fn messages(&self, m: Message) -> u64 {
        self.messages_in[m as usize]
    }

    /// Counts an error reply.
    pub fn count_error(&mut self, code: ErrorCode) {
        self.errors[code as usize] += 1;
    }

    /// Counts a job accepted.
    pub fn count_submitted(&mut self, mode: Mode) {
        self.jobs_submitted[mode as usize] += 1;
    }

    /// Counts a job ended.
    pub fn count_finished(&mut self, mode: Mode, outcome: Outcome) {
        self.jobs_finished[mode as usize][outcome as usize] += 1;
    }

    /// Counts a report another instance forwarded here, `claimed` when a live job took it.
    pub fn count_report_received(&mut self, claimed: bool) {
        self.reports_received[usize::from(!claimed)] += 1;
    }

    /// Counts an authentication's outcome.
    pub fn count_auth(&mut self, reason: AuthReason) {
        self.auth[reason as usize] += 1;
    }

    /// Counts a refusal of who-may-run-what.
    pub fn count_denial(&mut self, denial: Denial) {
        self.denied[denial as usize] += 1;
    }

    /// Counts an attach's outcome.
    pub fn count_attach(&mut self, outcome: AttachOutcome) {
        self.attaches[outcome as usize] += 1;
    }

    /// Counts job events an attach sent again.
    pub fn count_replayed(&mut self, events: u64) {
        self.events_replayed += events;
    }

    /// Counts a detached job abandoned: `over_total` to keep the job logs within their total,
    /// otherwise at the end of its grace.
    pub fn count_detached_abandoned(&mut self, over_total: bool) {
        self.detached_abandoned[usize::from(over_total)] += 1;
    }

    /// Counts what the shell saw.
    pub fn observe(&mut self, event: LoopEvent) {
        let counter = match event {
            LoopEvent::Pass => &mut self.loop_iterations,
            LoopEvent::Denied(denial) => &mut self.denied[denial as usize],
            LoopEvent::Accepted => &mut self.accepted,
            LoopEvent::Refused => &mut self.refused,
            LoopEvent::Closed => &mut self.closed,
            LoopEvent::Handshake => &mut self.handshakes,
            LoopEvent::HttpRequest => &mut self.http_requests,
            LoopEvent::SlowReaderDropped => &mut self.slow_readers_dropped,
            LoopEvent::GearmandConnected => &mut self.gearmand_connects,
            LoopEvent::GearmandLost => &mut self.gearmand_disconnects,
            LoopEvent::GearmandConnectFailed => &mut self.gearmand_connect_failures,
            LoopEvent::MessageTimedOut => &mut self.message_timeouts,
            LoopEvent::InputTotalDropped => &mut self.input_total_dropped,
            LoopEvent::Echoed(bytes) => {
                self.echoed_bytes += bytes as u64;
                &mut self.echoed
            }
        };
        *counter += 1;
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
        for &m in Message::ALL {
            let _ = writeln!(o, "gearsock_messages_in_total{{type=\"{}\"}} {}", m.name(), self.messages(m));
        }
        family(&mut o, "messages_out_total", "counter", "Text frames queued to clients.");
        let _ = writeln!(o, "gearsock_messages_out_total {}", self.messages_out);
        family(&mut o, "errors_total", "counter", "Error replies sent to clients, by code.");
        for &code in ErrorCode::ALL {
            let n = self.errors[code as usize];
            let _ = writeln!(o, "gearsock_errors_total{{code=\"{}\"}} {n}", code.name());
        }
        family(&mut o, "jobs_submitted_total", "counter", "Jobs accepted from clients, by mode.");
        for &mode in Mode::ALL {
            let n = self.jobs_submitted[mode as usize];
            let _ = writeln!(o, "gearsock_jobs_submitted_total{{mode=\"{}\"}} {n}", mode.name());
        }
        family(&mut o, "jobs_finished_total", "counter", "Jobs ended, by mode and outcome.");
        for &(mode, outcomes) in FINISHED {
            for &outcome in outcomes {
                let n = self.jobs_finished[mode as usize][outcome as usize];
                let (mode, outcome) = (mode.name(), outcome.name());
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
        family(&mut o, "jobs_detached", "gauge", "Jobs whose client left, kept for an attach.");
        let _ = writeln!(o, "gearsock_jobs_detached {}", g.jobs_detached);
        family(&mut o, "job_log_bytes", "gauge", "Bytes of job events kept for attaches.");
        let _ = writeln!(o, "gearsock_job_log_bytes {}", g.job_log_bytes);
        family(&mut o, "attaches_total", "counter", "Attaches, by outcome.");
        for &a in AttachOutcome::ALL {
            let _ = writeln!(
                o,
                "gearsock_attaches_total{{outcome=\"{}\"}} {}",
                a.name(),
                self.attaches[a as usize]
            );
        }
        family(&mut o, "events_replayed_total", "counter", "Job events sent again by attaches.");
        let _ = writeln!(o, "gearsock_events_replayed_total {}", self.events_replayed);
        family(&mut o, "detached_abandoned_total", "counter", "Detached jobs abandoned, by reason.");
        let [grace, total] = self.detached_abandoned;
        let _ = writeln!(o, "gearsock_detached_abandoned_total{{reason=\"grace\"}} {grace}");
        let _ = writeln!(o, "gearsock_detached_abandoned_total{{reason=\"log_total\"}} {total}");
        family(&mut o, "client_output_bytes", "gauge", "Bytes queued for all clients.");
        let _ = writeln!(o, "gearsock_client_output_bytes {}", g.client_output_bytes);
        family(&mut o, "slow_readers_dropped_total", "counter", "Clients dropped for not reading.");
        let _ = writeln!(o, "gearsock_slow_readers_dropped_total {}", self.slow_readers_dropped);
        family(
            &mut o,
            "message_timeouts_total",
            "counter",
            "Clients closed for not finishing a message in time.",
        );
        let _ = writeln!(o, "gearsock_message_timeouts_total {}", self.message_timeouts);
        family(
            &mut o,
            "input_total_dropped_total",
            "counter",
            "Clients closed as the largest holder of unfinished input.",
        );
        let _ = writeln!(o, "gearsock_input_total_dropped_total {}", self.input_total_dropped);
        family(&mut o, "echoed_messages_total", "counter", "Messages sent back in echo mode.");
        let _ = writeln!(o, "gearsock_echoed_messages_total {}", self.echoed);
        family(&mut o, "echoed_bytes_total", "counter", "Payload bytes sent back in echo mode.");
        let _ = writeln!(o, "gearsock_echoed_bytes_total {}", self.echoed_bytes);
        family(&mut o, "gearmand_up", "gauge", "1 when the gearmand link is connected, by server and state.");
        for (addr, state) in &g.links {
            for &s in LinkStatus::ALL {
                let v = u8::from(*state == s);
                let _ = writeln!(o, "gearsock_gearmand_up{{server=\"{addr}\",state=\"{}\"}} {v}", s.name());
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
        family(
            &mut o,
            "reports_forwarded_total",
            "counter",
            "Reports forwarded to other instances, by outcome.",
        );
        let sent = self.reports_forwarded - self.reports_forward_failed;
        let _ = writeln!(o, "gearsock_reports_forwarded_total{{outcome=\"sent\"}} {sent}");
        let _ = writeln!(
            o,
            "gearsock_reports_forwarded_total{{outcome=\"refused\"}} {}",
            self.reports_forward_failed
        );
        family(
            &mut o,
            "reports_received_total",
            "counter",
            "Reports other instances forwarded here, by outcome.",
        );
        let [claimed, unclaimed] = self.reports_received;
        let _ = writeln!(o, "gearsock_reports_received_total{{outcome=\"delivered\"}} {claimed}");
        let _ = writeln!(o, "gearsock_reports_received_total{{outcome=\"no_job\"}} {unclaimed}");
        family(&mut o, "relay_messages_total", "counter", "Relay messages through gearmand, by direction.");
        for (direction, n) in ["sent", "received"].iter().zip(self.relay_messages) {
            let _ = writeln!(o, "gearsock_relay_messages_total{{direction=\"{direction}\"}} {n}");
        }
        family(&mut o, "relay_events_total", "counter", "Job reply texts relayed, by direction.");
        for (direction, n) in ["sent", "received"].iter().zip(self.relay_events) {
            let _ = writeln!(o, "gearsock_relay_events_total{{direction=\"{direction}\"}} {n}");
        }
        family(&mut o, "relays_open", "gauge", "Open relays, by side (requester or owner).");
        let _ = writeln!(o, "gearsock_relays_open{{side=\"requester\"}} {}", g.relays_requested);
        let _ = writeln!(o, "gearsock_relays_open{{side=\"owner\"}} {}", g.relays_served);
        family(&mut o, "timers_armed", "gauge", "Timers in the wheel.");
        let _ = writeln!(o, "gearsock_timers_armed {}", g.timers);
        family(&mut o, "loop_iterations_total", "counter", "Passes of the event loop.");
        let _ = writeln!(o, "gearsock_loop_iterations_total {}", self.loop_iterations);
        family(&mut o, "auth_total", "counter", "Client tokens presented, by outcome and reason.");
        for &r in AuthReason::ALL {
            let outcome = if r == AuthReason::Valid { "ok" } else { "refused" };
            let n = self.auth[r as usize];
            let _ = writeln!(o, "gearsock_auth_total{{outcome=\"{outcome}\",reason=\"{}\"}} {n}", r.name());
        }
        family(
            &mut o,
            "access_refused_total",
            "counter",
            "Requests and connections refused by access rules.",
        );
        for &d in Denial::ALL {
            let _ = writeln!(
                o,
                "gearsock_access_refused_total{{what=\"{}\"}} {}",
                d.name(),
                self.denied[d as usize]
            );
        }
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
        let text = m.render(&Gauges {
            links: vec![("127.0.0.1:4730".into(), LinkStatus::Connected)],
            ..Default::default()
        });
        assert!(text.contains("gearsock_messages_in_total{type=\"ping\"} 3"));
        assert!(text.contains("gearsock_gearmand_up{server=\"127.0.0.1:4730\",state=\"connected\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
        }
    }

    #[test]
    fn a_text_message_is_counted_by_the_type_it_names_and_never_as_binary() {
        assert_eq!(Message::from_type("ping"), Message::Ping);
        assert_eq!(Message::from_type("worker.complete"), Message::WorkerComplete);
        for unknown in ["binary", "invalid", "dance", ""] {
            assert_eq!(Message::from_type(unknown), Message::Invalid, "{unknown}");
        }
    }
}
