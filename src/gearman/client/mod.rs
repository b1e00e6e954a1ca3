//! `ClientSession`: the client half of one gearmand connection, sans-IO.
//!
//! It owns the bookkeeping between requests and replies: submits and status queries go out as
//! bytes appended to the caller's buffer, bytes from gearmand come in through `handle_input`,
//! and what they mean comes out of `poll_event` as `JobEvent`s keyed by the caller's `JobTag`.
//! It must not touch a socket or the clock, and it knows nothing about WebSocket clients: the
//! caller maps tags to whoever asked.
//!
//! gearmand answers the requests of one connection strictly in order, so one FIFO of expected
//! replies pairs each JOB_CREATED, STATUS_RES, OPTION_RES, ECHO_RES or ERROR with the request it
//! answers. WORK_* packets of foreground jobs name a handle; the session maps handles to tags.
//!
//! A WORK_* packet whose body is over the limit does not cost the link: once its handle is in,
//! the submission it was meant for gets `JobEvent::TooLarge`, and the rest of the body is counted
//! off the input as it streams past, never buffered. Any other oversized packet is an error.
//!
//! The same connection can also be a Gearman worker for one function (`serve_reports`): the
//! desk where other gearsock instances leave reports for this instance's jobs. Its grab cycle
//! (GRAB_JOB_UNIQ, NO_JOB → PRE_SLEEP, NOOP → GRAB again) runs inside the session; each job
//! handed out comes out as `JobEvent::Forwarded` and is completed at once. Its answers have
//! distinct packet types, so they never meet the FIFO of client replies.

use std::collections::{HashMap, VecDeque};

use log::{debug, trace};

use super::packet::{
    Magic, Packet, PacketType, ProtocolError, decode_response, encode_request, parse_number, peek_header,
};
use crate::buf::InBuf;

mod oversized;

/// Names one submission. Opaque to the session; the caller chooses it and gets it back in events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JobTag(pub u64);

/// Gearman's three queue levels (per function in gearmand 1.1.20, not global).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// `SUBMIT_JOB_LOW` / `SUBMIT_JOB_LOW_BG`.
    Low,
    /// `SUBMIT_JOB` / `SUBMIT_JOB_BG`.
    Normal,
    /// `SUBMIT_JOB_HIGH` / `SUBMIT_JOB_HIGH_BG`.
    High,
}

/// Whether gearmand streams the job's packets back to this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobMode {
    /// WORK_DATA/STATUS/WARNING and a terminal packet come back on this connection.
    Foreground,
    /// Nothing comes back after JOB_CREATED; progress only through GET_STATUS.
    Background,
}

/// What a reply from gearmand meant for a submission or a status query.
#[derive(Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// JOB_CREATED. For a background job this is the last event for its tag.
    Created {
        /// The submission.
        tag: JobTag,
        /// The handle gearmand gave it (shared with coalesced submissions of the same unique).
        handle: Vec<u8>,
    },
    /// WORK_DATA of a foreground job.
    Data {
        /// The submission.
        tag: JobTag,
        /// The worker's bytes.
        data: Vec<u8>,
    },
    /// WORK_WARNING of a foreground job.
    Warning {
        /// The submission.
        tag: JobTag,
        /// The worker's bytes.
        data: Vec<u8>,
    },
    /// WORK_STATUS of a foreground job.
    Status {
        /// The submission.
        tag: JobTag,
        /// Progress so far (decimal ASCII on the wire; garbage reads as 0).
        numerator: u64,
        /// Progress total.
        denominator: u64,
    },
    /// WORK_COMPLETE: terminal.
    Complete {
        /// The submission.
        tag: JobTag,
        /// The result.
        data: Vec<u8>,
    },
    /// WORK_FAIL: terminal.
    Failed {
        /// The submission.
        tag: JobTag,
    },
    /// WORK_EXCEPTION: terminal.
    Exception {
        /// The submission.
        tag: JobTag,
        /// The exception data.
        data: Vec<u8>,
    },
    /// ERROR in place of JOB_CREATED (queue full, unique too long, ...): terminal.
    Rejected {
        /// The submission.
        tag: JobTag,
        /// gearmand's error code, e.g. `QUEUE_ERROR`.
        code: String,
        /// gearmand's text.
        message: String,
    },
    /// STATUS_RES: the answer to `get_status`.
    StatusRes {
        /// The caller's token from `get_status`.
        ask: u64,
        /// The handle gearmand answered about (the one asked, from a sane server).
        handle: Vec<u8>,
        /// The job exists (queued or running). False also for finished and never-existed jobs.
        known: bool,
        /// A worker holds it.
        running: bool,
        /// Last WORK_STATUS numerator (0 before any).
        numerator: u64,
        /// Last WORK_STATUS denominator (0 before any).
        denominator: u64,
    },
    /// ERROR in place of STATUS_RES: the status query failed; nothing else will answer it.
    StatusFailed {
        /// The caller's token from `get_status`.
        ask: u64,
        /// The handle asked about.
        handle: Vec<u8>,
        /// gearmand's error code.
        code: String,
        /// gearmand's text.
        message: String,
    },
    /// A report another instance forwarded to this one's desk (a job of the function given to
    /// `serve_reports`, already completed at gearmand).
    Forwarded {
        /// The unique of the job the report is for (the desk job's own unique).
        unique: Vec<u8>,
        /// The reported value (the desk job's payload).
        value: Vec<u8>,
    },
    /// A WORK_* packet for this submission had a body over the session's limit; it was skipped
    /// unread. Terminal: the tag gets nothing more, even if the job goes on.
    TooLarge {
        /// The submission.
        tag: JobTag,
        /// Which WORK_* packet it was.
        kind: PacketType,
        /// Its declared body size.
        size_bytes: u64,
    },
}

/// The body of the liveness probe's ECHO_REQ.
const PROBE_BODY: &[u8] = b"gearsock-probe";

/// A reply gearmand still owes us, in request order.
#[derive(Debug)]
enum Expected {
    /// A SUBMIT_JOB*: JOB_CREATED or ERROR.
    Created { tag: JobTag, mode: JobMode },
    /// A GET_STATUS: STATUS_RES or ERROR.
    Status { ask: u64, handle: Vec<u8> },
    /// An OPTION_REQ: OPTION_RES or ERROR.
    Option,
    /// An ECHO_REQ (the liveness probe): ECHO_RES or ERROR.
    Echo,
}

impl Expected {
    fn describe(&self) -> &'static str {
        match self {
            Expected::Created { .. } => "JOB_CREATED",
            Expected::Status { .. } => "STATUS_RES",
            Expected::Option => "OPTION_RES",
            Expected::Echo => "ECHO_RES",
        }
    }
}

/// The foreground submissions attached to one handle, one slot per submission.
///
/// gearmand sends every WORK_* packet once per attached submission, consecutively. Each copy
/// goes to the slot under `cursor`, which then advances, so every submission sees each packet
/// exactly once; a terminal copy removes its slot. A slot whose tag was detached early (its copy
/// of a non-terminal packet was too large) stays, empty, until gearmand's terminal copy for it:
/// gearmand still sends that submission its copies, and they must not shift onto the others.
#[derive(Debug, Default)]
struct Subscribers {
    slots: Vec<Option<JobTag>>,
    cursor: usize,
}

impl Subscribers {
    /// The slot that receives the next copy; advances the cursor.
    fn next(&mut self) -> Option<JobTag> {
        let slot = self.slots[self.cursor];
        self.cursor = (self.cursor + 1) % self.slots.len();
        slot
    }

    /// The slot that receives the next copy, removed because the copy is terminal.
    fn take_next(&mut self) -> Option<JobTag> {
        let slot = self.slots.remove(self.cursor);
        // The slot after the removed one slid into its place.
        if self.cursor >= self.slots.len() {
            self.cursor = 0;
        }
        slot
    }

    /// The slot that receives the next copy, emptied but kept: its tag is detached while the job
    /// goes on. Advances the cursor.
    fn detach_next(&mut self) -> Option<JobTag> {
        let slot = self.slots[self.cursor].take();
        self.cursor = (self.cursor + 1) % self.slots.len();
        slot
    }

    /// The tags still attached.
    fn tags(&self) -> impl Iterator<Item = JobTag> + '_ {
        self.slots.iter().flatten().copied()
    }
}

/// For the WORK_* packets a foreground job streams back: whether the packet is terminal. `None`
/// for every other type.
fn work_terminal(kind: PacketType) -> Option<bool> {
    match kind {
        PacketType::WorkData | PacketType::WorkWarning | PacketType::WorkStatus => Some(false),
        PacketType::WorkComplete | PacketType::WorkFail | PacketType::WorkException => Some(true),
        _ => None,
    }
}

/// Where the report desk is in Gearman's grab cycle.
///
/// ```text
///   Off --serve_reports()--> Grabbing --JOB_ASSIGN_UNIQ, sends WORK_COMPLETE + GRAB--> Grabbing
///                            Grabbing --NO_JOB, sends PRE_SLEEP--> Sleeping
///                            Sleeping --NOOP, sends GRAB_JOB_UNIQ--> Grabbing
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Desk {
    Off,
    Grabbing,
    Sleeping,
}

/// What gearmand says to the desk.
enum DeskPacket {
    /// NO_JOB: nothing to grab; the desk sleeps.
    NoJob,
    /// NOOP: wake up, a job may be waiting.
    Noop,
    /// JOB_ASSIGN_UNIQ: a forwarded report.
    Assigned { handle: Vec<u8>, unique: Vec<u8>, value: Vec<u8> },
}

/// The client side of one gearmand connection. See the module docs.
#[derive(Debug)]
pub struct ClientSession {
    max_body_bytes: usize,
    expected: VecDeque<Expected>,
    running: HashMap<Vec<u8>, Subscribers>,
    events: VecDeque<JobEvent>,
    /// Body bytes of an oversized WORK_* packet still to be dropped from the input.
    skip_bytes: u64,
    /// A complete packet has been decoded since the session (or connection) started.
    answered: bool,
    /// The worker side: the report desk's grab cycle.
    desk: Desk,
    /// What the desk must send in answer to gearmand, collected by `take_replies`.
    replies: Vec<u8>,
}

impl ClientSession {
    /// A fresh session. A WORK_* packet with a body over `max_job_bytes` becomes
    /// `JobEvent::TooLarge` and is skipped; any other packet that large is a `ProtocolError`.
    pub fn new(max_job_bytes: usize) -> Self {
        ClientSession {
            max_body_bytes: max_job_bytes,
            expected: VecDeque::new(),
            running: HashMap::new(),
            events: VecDeque::new(),
            skip_bytes: 0,
            answered: false,
            desk: Desk::Off,
            replies: Vec::new(),
        }
    }

    /// Makes this connection a Gearman worker for `function` too (CAN_DO, then GRAB_JOB_UNIQ):
    /// each job of it comes out as `JobEvent::Forwarded` and is completed at once. The requests
    /// the grab cycle sends on its own collect in `take_replies`.
    pub fn serve_reports(&mut self, function: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::CanDo, &[function]);
        encode_request(out, PacketType::GrabJobUniq, &[]);
        self.desk = Desk::Grabbing;
    }

    /// Moves what the desk must send (PRE_SLEEP, GRAB_JOB_UNIQ, WORK_COMPLETE) to `out`. Call
    /// after every `handle_input`.
    pub fn take_replies(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.replies);
    }

    /// Appends the connection's opening requests: OPTION_REQ `exceptions`, so a worker's
    /// WORK_EXCEPTION reaches us as such rather than as WORK_FAIL. The answer (OPTION_RES, or
    /// ERROR from a server without the option) is consumed silently.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        encode_request(out, PacketType::OptionReq, &[b"exceptions"]);
        self.expected.push_back(Expected::Option);
    }

    /// Appends a submit; the packet type follows `mode` and `priority`. An empty `unique` makes
    /// a job of its own; a non-empty one may coalesce with a job that already exists.
    #[allow(clippy::too_many_arguments)] // one per SUBMIT_JOB field; a struct would only rename them
    pub fn submit(
        &mut self,
        tag: JobTag,
        function: &[u8],
        unique: &[u8],
        payload: &[u8],
        mode: JobMode,
        priority: Priority,
        out: &mut Vec<u8>,
    ) {
        let kind = match (mode, priority) {
            (JobMode::Foreground, Priority::Low) => PacketType::SubmitJobLow,
            (JobMode::Foreground, Priority::Normal) => PacketType::SubmitJob,
            (JobMode::Foreground, Priority::High) => PacketType::SubmitJobHigh,
            (JobMode::Background, Priority::Low) => PacketType::SubmitJobLowBg,
            (JobMode::Background, Priority::Normal) => PacketType::SubmitJobBg,
            (JobMode::Background, Priority::High) => PacketType::SubmitJobHighBg,
        };
        trace!("gearman submit tag={} kind={kind} payload_bytes={}", tag.0, payload.len());
        encode_request(out, kind, &[function, unique, payload]);
        self.expected.push_back(Expected::Created { tag, mode });
    }

    /// Appends a GET_STATUS. The answer comes out as `JobEvent::StatusRes`, or as
    /// `JobEvent::StatusFailed` if gearmand answers ERROR; either carries `ask`, the caller's token
    /// for whoever asked.
    pub fn get_status(&mut self, handle: &[u8], ask: u64, out: &mut Vec<u8>) {
        encode_request(out, PacketType::GetStatus, &[handle]);
        self.expected.push_back(Expected::Status { ask, handle: handle.to_vec() });
    }

    /// Appends an ECHO_REQ as a liveness probe: it counts in `awaiting_replies` until gearmand
    /// answers. The answer (ECHO_RES, or ERROR in its place) is consumed silently.
    pub fn probe(&mut self, out: &mut Vec<u8>) {
        encode_request(out, PacketType::EchoReq, &[PROBE_BODY]);
        self.expected.push_back(Expected::Echo);
    }

    /// Decodes every complete packet in `input`, consuming it and queueing events, and drops the
    /// part of an oversized WORK_* body that has arrived. On error the connection is beyond
    /// repair: the shell drops it and starts a fresh session, and the App ends the jobs it held
    /// (`App::handle_link_down`).
    pub fn handle_input(&mut self, input: &mut InBuf) -> Result<(), ProtocolError> {
        loop {
            if self.skip_bytes > 0 {
                let n = usize::try_from(self.skip_bytes).unwrap_or(usize::MAX).min(input.len());
                input.consume(n);
                self.skip_bytes -= n as u64;
                if self.skip_bytes > 0 {
                    return Ok(());
                }
            }
            let Some((kind, size_bytes)) = peek_header(input.data(), Magic::Res)? else {
                return Ok(());
            };
            if usize::try_from(size_bytes).map_or(true, |size| size > self.max_body_bytes) {
                if !self.start_skip(input, kind, size_bytes)? {
                    return Ok(());
                }
                continue;
            }
            let Some((packet, used)) = decode_response(input.data(), self.max_body_bytes)? else {
                return Ok(());
            };
            input.consume(used);
            self.answered = true;
            self.on_packet(packet)?;
        }
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<JobEvent> {
        self.events.pop_front()
    }

    /// Submissions still owed something: awaiting JOB_CREATED (either mode) or, for foreground
    /// jobs, a terminal packet. The server keeps its own account of jobs in the App; this is
    /// the session's side of it, which the tests and the fuzz harness check the events against.
    pub fn in_flight(&self) -> usize {
        let awaiting_created = self.expected.iter().filter(|e| matches!(e, Expected::Created { .. })).count();
        awaiting_created + self.running.values().map(|s| s.tags().count()).sum::<usize>()
    }

    /// Replies gearmand still owes (submits, status queries, options, probes). Zero means an idle
    /// connection, as far as requests go.
    pub fn awaiting_replies(&self) -> usize {
        self.expected.len() + usize::from(self.desk == Desk::Grabbing)
    }

    /// Gearmand owes this connection something: a reply to a request, or news of a foreground
    /// job it runs. Cheap (unlike [`Self::in_flight`]): the loop asks it every pass.
    pub fn expects_more(&self) -> bool {
        !self.expected.is_empty() || !self.running.is_empty()
    }

    /// True once gearmand has sent at least one complete packet on this connection: the link is
    /// only known to be up once it answered.
    pub fn has_answered(&self) -> bool {
        self.answered
    }

    /// The connection is gone: returns every tag still awaiting JOB_CREATED or a terminal
    /// packet (in submit order for the former), and resets the session for a new connection
    /// (call `start` again): a half-skipped packet and `has_answered` are forgotten too. Events
    /// already queued stay queued for `poll_event`. The server does not need it (a lost link's
    /// jobs are ended by the App, and the session is replaced); the tests and the fuzz harness
    /// use it to check that every submission is accounted for.
    pub fn take_all_tags(&mut self) -> Vec<JobTag> {
        let mut tags: Vec<JobTag> = self
            .expected
            .drain(..)
            .filter_map(|e| match e {
                Expected::Created { tag, .. } => Some(tag),
                _ => None,
            })
            .collect();
        tags.extend(self.running.drain().flat_map(|(_, s)| s.slots.into_iter().flatten()));
        self.skip_bytes = 0;
        self.answered = false;
        self.desk = Desk::Off;
        self.replies.clear();
        tags
    }

    /// Gives one decoded packet its meaning.
    fn on_packet(&mut self, packet: Packet) -> Result<(), ProtocolError> {
        trace!("gearman recv {} args={}", packet.kind, packet.args.len());
        let mut args = packet.args.into_iter();
        let mut next = || args.next().unwrap_or_default();
        match packet.kind {
            PacketType::JobCreated => self.on_job_created(next())?,
            PacketType::StatusRes => {
                let (handle, known, running, numerator, denominator) =
                    (next(), next(), next(), next(), next());
                self.on_status_res(handle, &known, &running, &numerator, &denominator)?;
            }
            PacketType::OptionRes => self.on_option_res()?,
            PacketType::EchoRes => self.on_echo_res()?,
            PacketType::Error => self.on_error(&next(), &next())?,
            PacketType::WorkData => {
                let (handle, data) = (next(), next());
                self.on_work(&handle, false, |tag| JobEvent::Data { tag, data });
            }
            PacketType::WorkWarning => {
                let (handle, data) = (next(), next());
                self.on_work(&handle, false, |tag| JobEvent::Warning { tag, data });
            }
            PacketType::WorkStatus => {
                let (handle, numerator, denominator) = (next(), next(), next());
                let (numerator, denominator) = (parse_number(&numerator), parse_number(&denominator));
                self.on_work(&handle, false, |tag| JobEvent::Status { tag, numerator, denominator });
            }
            PacketType::WorkComplete => {
                let (handle, data) = (next(), next());
                self.on_work(&handle, true, |tag| JobEvent::Complete { tag, data });
            }
            PacketType::WorkFail => {
                let handle = next();
                self.on_work(&handle, true, |tag| JobEvent::Failed { tag });
            }
            PacketType::WorkException => {
                let (handle, data) = (next(), next());
                self.on_work(&handle, true, |tag| JobEvent::Exception { tag, data });
            }
            PacketType::NoJob => self.on_desk_packet(DeskPacket::NoJob)?,
            PacketType::Noop => self.on_desk_packet(DeskPacket::Noop)?,
            PacketType::JobAssignUniq => {
                let (handle, _function, unique, value) = (next(), next(), next(), next());
                self.on_desk_packet(DeskPacket::Assigned { handle, unique, value })?;
            }
            kind => return Err(ProtocolError::Unexpected { kind, expected: "a client reply" }),
        }
        Ok(())
    }

    /// A packet of the desk's grab cycle.
    fn on_desk_packet(&mut self, packet: DeskPacket) -> Result<(), ProtocolError> {
        match packet {
            DeskPacket::NoJob => {
                self.desk_answer(PacketType::NoJob)?;
                encode_request(&mut self.replies, PacketType::PreSleep, &[]);
                self.desk = Desk::Sleeping;
            }
            DeskPacket::Noop => {
                // gearmand may wake a worker that is not asleep; only a sleeping desk grabs.
                if self.desk == Desk::Sleeping {
                    encode_request(&mut self.replies, PacketType::GrabJobUniq, &[]);
                    self.desk = Desk::Grabbing;
                }
            }
            DeskPacket::Assigned { handle, unique, value } => {
                self.desk_answer(PacketType::JobAssignUniq)?;
                // Delivery happens in this process and cannot be retried elsewhere, so the job
                // is done as soon as it is read.
                encode_request(&mut self.replies, PacketType::WorkComplete, &[&handle, b""]);
                encode_request(&mut self.replies, PacketType::GrabJobUniq, &[]);
                self.events.push_back(JobEvent::Forwarded { unique, value });
            }
        }
        Ok(())
    }

    /// NO_JOB and JOB_ASSIGN_UNIQ answer the desk's GRAB_JOB_UNIQ, and nothing else.
    fn desk_answer(&self, kind: PacketType) -> Result<(), ProtocolError> {
        match self.desk {
            Desk::Grabbing => Ok(()),
            _ => Err(ProtocolError::Unexpected { kind, expected: "no worker reply (not grabbing)" }),
        }
    }

    fn pop_expected(&mut self, kind: PacketType) -> Result<Expected, ProtocolError> {
        self.expected.pop_front().ok_or(ProtocolError::Unexpected { kind, expected: "nothing" })
    }

    /// Puts `front` back and reports the mismatch, so the error names what we waited for.
    fn mismatch(&mut self, kind: PacketType, front: Expected) -> ProtocolError {
        let expected = front.describe();
        self.expected.push_front(front);
        ProtocolError::Unexpected { kind, expected }
    }

    fn on_job_created(&mut self, handle: Vec<u8>) -> Result<(), ProtocolError> {
        let (tag, mode) = match self.pop_expected(PacketType::JobCreated)? {
            Expected::Created { tag, mode } => (tag, mode),
            other => return Err(self.mismatch(PacketType::JobCreated, other)),
        };
        if mode == JobMode::Foreground {
            self.running.entry(handle.clone()).or_default().slots.push(Some(tag));
        }
        self.events.push_back(JobEvent::Created { tag, handle });
        Ok(())
    }

    fn on_status_res(
        &mut self,
        handle: Vec<u8>,
        known: &[u8],
        running: &[u8],
        numerator: &[u8],
        denominator: &[u8],
    ) -> Result<(), ProtocolError> {
        let ask = match self.pop_expected(PacketType::StatusRes)? {
            Expected::Status { ask, handle: asked } => {
                if asked != handle {
                    debug!(
                        "gearman STATUS_RES for {:?}, asked {:?}",
                        handle.escape_ascii(),
                        asked.escape_ascii()
                    );
                }
                ask
            }
            other => return Err(self.mismatch(PacketType::StatusRes, other)),
        };
        self.events.push_back(JobEvent::StatusRes {
            ask,
            handle,
            known: parse_number(known) != 0,
            running: parse_number(running) != 0,
            numerator: parse_number(numerator),
            denominator: parse_number(denominator),
        });
        Ok(())
    }

    fn on_option_res(&mut self) -> Result<(), ProtocolError> {
        match self.pop_expected(PacketType::OptionRes)? {
            Expected::Option => Ok(()),
            other => Err(self.mismatch(PacketType::OptionRes, other)),
        }
    }

    fn on_echo_res(&mut self) -> Result<(), ProtocolError> {
        match self.pop_expected(PacketType::EchoRes)? {
            Expected::Echo => Ok(()),
            other => Err(self.mismatch(PacketType::EchoRes, other)),
        }
    }

    fn on_error(&mut self, code: &[u8], message: &[u8]) -> Result<(), ProtocolError> {
        let code = String::from_utf8_lossy(code).into_owned();
        let message = String::from_utf8_lossy(message).into_owned();
        match self.pop_expected(PacketType::Error)? {
            Expected::Created { tag, .. } => {
                debug!("gearman rejected tag={}: {code} {message}", tag.0);
                self.events.push_back(JobEvent::Rejected { tag, code, message });
            }
            Expected::Status { ask, handle } => {
                debug!("gearman GET_STATUS {:?} got ERROR {code} {message}", handle.escape_ascii());
                self.events.push_back(JobEvent::StatusFailed { ask, handle, code, message });
            }
            Expected::Option => debug!("gearman OPTION_REQ got ERROR {code} {message}"),
            Expected::Echo => debug!("gearman ECHO_REQ got ERROR {code} {message}"),
        }
        Ok(())
    }

    /// Routes one copy of a WORK_* packet to the next subscriber of `handle`.
    fn on_work(&mut self, handle: &[u8], terminal: bool, event: impl FnOnce(JobTag) -> JobEvent) {
        let Some(subscribers) = self.running.get_mut(handle) else {
            debug!("gearman work packet for unknown handle {:?}", handle.escape_ascii());
            return;
        };
        let slot = if terminal { subscribers.take_next() } else { subscribers.next() };
        if subscribers.slots.is_empty() {
            self.running.remove(handle);
        }
        // An empty slot's submission was detached by an oversized packet; its copy goes nowhere.
        if let Some(tag) = slot {
            self.events.push_back(event(tag));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gearman::packet::{Magic, PacketType::*, encode_raw, response};

    const MAX: usize = 1 << 20;

    pub(super) fn setup() -> (ClientSession, Vec<u8>, InBuf) {
        (ClientSession::new(MAX), Vec::new(), InBuf::new(MAX))
    }

    pub(super) fn feed(
        session: &mut ClientSession,
        input: &mut InBuf,
        wire: &[u8],
    ) -> Result<(), ProtocolError> {
        input.extend(wire);
        session.handle_input(input)
    }

    pub(super) fn feed_byte_at_a_time(session: &mut ClientSession, input: &mut InBuf, wire: &[u8]) {
        for &byte in wire {
            input.extend(&[byte]);
            session.handle_input(input).unwrap();
        }
        assert!(input.is_empty());
    }

    pub(super) fn events(session: &mut ClientSession) -> Vec<JobEvent> {
        std::iter::from_fn(|| session.poll_event()).collect()
    }

    pub(super) fn fg(session: &mut ClientSession, tag: u64, unique: &[u8], out: &mut Vec<u8>) {
        session.submit(JobTag(tag), b"reverse", unique, b"abc", JobMode::Foreground, Priority::Normal, out);
    }

    #[test]
    fn completed_job_survives_byte_at_a_time_input() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 7, b"", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(WorkStatus, &[b"H:gm:1", b"1", b"2"]),
            response(WorkData, &[b"H:gm:1", b"c\0b"]),
            response(WorkWarning, &[b"H:gm:1", b"careful"]),
            response(WorkComplete, &[b"H:gm:1", b"cba"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        let tag = JobTag(7);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag, handle: b"H:gm:1".to_vec() },
                JobEvent::Status { tag, numerator: 1, denominator: 2 },
                JobEvent::Data { tag, data: b"c\0b".to_vec() },
                JobEvent::Warning { tag, data: b"careful".to_vec() },
                JobEvent::Complete { tag, data: b"cba".to_vec() },
            ]
        );
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn submit_picks_the_packet_type() {
        let cases = [
            (JobMode::Foreground, Priority::Low, SubmitJobLow),
            (JobMode::Foreground, Priority::Normal, SubmitJob),
            (JobMode::Foreground, Priority::High, SubmitJobHigh),
            (JobMode::Background, Priority::Low, SubmitJobLowBg),
            (JobMode::Background, Priority::Normal, SubmitJobBg),
            (JobMode::Background, Priority::High, SubmitJobHighBg),
        ];
        for (mode, priority, kind) in cases {
            let (mut session, mut out, _) = setup();
            session.submit(JobTag(1), b"f", b"u", b"p", mode, priority, &mut out);
            let (packet, _) = crate::gearman::packet::decode_request(&out, MAX).unwrap().unwrap();
            assert_eq!(packet.kind, kind);
            assert_eq!(packet.args, vec![b"f".to_vec(), b"u".to_vec(), b"p".to_vec()]);
        }
    }

    #[test]
    fn pipelined_submits_are_matched_in_order() {
        let (mut session, mut out, mut input) = setup();
        for tag in 1..=3 {
            fg(&mut session, tag, b"", &mut out);
        }
        session.submit(JobTag(4), b"f", b"", b"", JobMode::Background, Priority::High, &mut out);
        assert_eq!(session.in_flight(), 4);
        let wire: Vec<u8> =
            (1..=4).flat_map(|n| response(JobCreated, &[format!("H:gm:{n}").as_bytes()])).collect();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        let created: Vec<(u64, Vec<u8>)> = events(&mut session)
            .into_iter()
            .map(|e| match e {
                JobEvent::Created { tag, handle } => (tag.0, handle),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = (1..=4).map(|n| (n, format!("H:gm:{n}").into_bytes())).collect();
        assert_eq!(created, expected);
        // The background job is done once created; the three foreground ones still run.
        assert_eq!(session.in_flight(), 3);
    }

    #[test]
    fn error_in_place_of_job_created_rejects_that_submit_only() {
        let (mut session, mut out, mut input) = setup();
        session.start(&mut out);
        fg(&mut session, 1, b"", &mut out);
        fg(&mut session, 2, &[b'u'; 65], &mut out);
        fg(&mut session, 3, b"", &mut out);
        let wire = [
            response(OptionRes, &[b"exceptions"]),
            response(JobCreated, &[b"H:gm:1"]),
            response(Error, &[b"ARGUMENT_TOO_LARGE", b"Unique value too large"]),
            response(JobCreated, &[b"H:gm:2"]),
        ]
        .concat();
        feed(&mut session, &mut input, &wire).unwrap();
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::Rejected {
                    tag: JobTag(2),
                    code: "ARGUMENT_TOO_LARGE".into(),
                    message: "Unique value too large".into()
                },
                JobEvent::Created { tag: JobTag(3), handle: b"H:gm:2".to_vec() },
            ]
        );
        assert_eq!(session.in_flight(), 2);
    }

    #[test]
    fn error_answering_the_option_is_swallowed() {
        let (mut session, mut out, mut input) = setup();
        session.start(&mut out);
        fg(&mut session, 1, b"", &mut out);
        let wire = [
            response(Error, &[b"UNKNOWN_OPTION", b"Server does not recognize given option"]),
            response(JobCreated, &[b"H:gm:1"]),
        ]
        .concat();
        feed(&mut session, &mut input, &wire).unwrap();
        assert_eq!(
            events(&mut session),
            vec![JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() }]
        );
    }

    #[test]
    fn early_completions_interleave_with_later_job_created() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"", &mut out);
        fg(&mut session, 2, b"", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(WorkComplete, &[b"H:gm:1", b"one"]),
            response(JobCreated, &[b"H:gm:2"]),
            response(WorkFail, &[b"H:gm:2"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::Complete { tag: JobTag(1), data: b"one".to_vec() },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:2".to_vec() },
                JobEvent::Failed { tag: JobTag(2) },
            ]
        );
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn get_status_interleaves_with_submits() {
        let (mut session, mut out, mut input) = setup();
        session.submit(JobTag(1), b"ping", b"", b"noop", JobMode::Background, Priority::Normal, &mut out);
        session.get_status(b"H:gm:0", 10, &mut out);
        session.submit(JobTag(2), b"ping", b"", b"noop", JobMode::Background, Priority::Normal, &mut out);
        session.get_status(b"H:gm:1", 11, &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(StatusRes, &[b"H:gm:0", b"0", b"0", b"0", b"0"]),
            response(JobCreated, &[b"H:gm:2"]),
            response(StatusRes, &[b"H:gm:1", b"1", b"1", b"3", b"10"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::StatusRes {
                    ask: 10,
                    handle: b"H:gm:0".to_vec(),
                    known: false,
                    running: false,
                    numerator: 0,
                    denominator: 0
                },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:2".to_vec() },
                JobEvent::StatusRes {
                    ask: 11,
                    handle: b"H:gm:1".to_vec(),
                    known: true,
                    running: true,
                    numerator: 3,
                    denominator: 10
                },
            ]
        );
        assert_eq!(session.awaiting_replies(), 0);
    }

    #[test]
    fn status_reply_out_of_order_is_a_protocol_error() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"", &mut out);
        let wire = response(StatusRes, &[b"H:gm:1", b"1", b"1", b"0", b"0"]);
        assert_eq!(
            feed(&mut session, &mut input, &wire),
            Err(ProtocolError::Unexpected { kind: StatusRes, expected: "JOB_CREATED" })
        );
        let (mut session, _, mut input) = setup();
        assert!(feed(&mut session, &mut input, &response(JobCreated, &[b"H:gm:1"])).is_err());
        let (mut session, _, mut input) = setup();
        assert!(feed(&mut session, &mut input, &response(NoJob, &[])).is_err());
    }

    #[test]
    fn coalesced_submissions_each_see_every_packet_once() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"same", &mut out);
        fg(&mut session, 2, b"same", &mut out);
        let twice = |kind, args: &[&[u8]]| [response(kind, args), response(kind, args)].concat();
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(JobCreated, &[b"H:gm:1"]),
            twice(WorkStatus, &[b"H:gm:1", b"1", b"5"]),
            twice(WorkData, &[b"H:gm:1", b"ping 1"]),
            twice(WorkComplete, &[b"H:gm:1", b"done"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        let all = events(&mut session);
        for tag in [JobTag(1), JobTag(2)] {
            let mine: Vec<&JobEvent> = all
                .iter()
                .filter(|e| match e {
                    JobEvent::Created { tag: t, .. }
                    | JobEvent::Status { tag: t, .. }
                    | JobEvent::Data { tag: t, .. }
                    | JobEvent::Complete { tag: t, .. } => *t == tag,
                    _ => panic!("unexpected {e:?}"),
                })
                .collect();
            assert_eq!(
                mine,
                vec![
                    &JobEvent::Created { tag, handle: b"H:gm:1".to_vec() },
                    &JobEvent::Status { tag, numerator: 1, denominator: 5 },
                    &JobEvent::Data { tag, data: b"ping 1".to_vec() },
                    &JobEvent::Complete { tag, data: b"done".to_vec() },
                ]
            );
        }
        assert_eq!(session.in_flight(), 0);
        // Both subscribers gone: a straggler for the handle is ignored.
        feed(&mut session, &mut input, &response(WorkData, &[b"H:gm:1", b"late"])).unwrap();
        assert_eq!(session.poll_event(), None);
    }

    #[test]
    fn submission_joining_a_running_job_gets_later_packets() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"same", &mut out);
        feed(&mut session, &mut input, &response(JobCreated, &[b"H:gm:1"])).unwrap();
        feed(&mut session, &mut input, &response(WorkData, &[b"H:gm:1", b"early"])).unwrap();
        fg(&mut session, 2, b"same", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(WorkComplete, &[b"H:gm:1", b"r"]),
            response(WorkComplete, &[b"H:gm:1", b"r"]),
        ]
        .concat();
        feed(&mut session, &mut input, &wire).unwrap();
        let all = events(&mut session);
        assert_eq!(all[1], JobEvent::Data { tag: JobTag(1), data: b"early".to_vec() });
        assert!(all.contains(&JobEvent::Complete { tag: JobTag(1), data: b"r".to_vec() }));
        assert!(all.contains(&JobEvent::Complete { tag: JobTag(2), data: b"r".to_vec() }));
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn synthesised_work_fail_with_trailing_nul_is_failed() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 9, b"", &mut out);
        let mut wire = response(JobCreated, &[b"H:vm:1"]);
        encode_raw(&mut wire, Magic::Res, WorkFail.as_u32(), b"H:vm:1\0");
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        assert_eq!(events(&mut session)[1], JobEvent::Failed { tag: JobTag(9) });
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn exception_and_garbage_status_numbers() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(WorkStatus, &[b"H:gm:1", b"abc", b"xyz"]),
            response(WorkException, &[b"H:gm:1", b"boom: something broke"]),
        ]
        .concat();
        feed(&mut session, &mut input, &wire).unwrap();
        let tag = JobTag(1);
        assert_eq!(
            events(&mut session)[1..],
            [
                JobEvent::Status { tag, numerator: 0, denominator: 0 },
                JobEvent::Exception { tag, data: b"boom: something broke".to_vec() }
            ]
        );
    }

    #[test]
    fn take_all_tags_returns_everything_unfinished_and_resets() {
        let (mut session, mut out, mut input) = setup();
        session.start(&mut out);
        fg(&mut session, 1, b"", &mut out);
        session.submit(JobTag(2), b"f", b"", b"", JobMode::Background, Priority::Low, &mut out);
        fg(&mut session, 3, b"", &mut out);
        session.get_status(b"H:gm:9", 0, &mut out);
        session.submit(JobTag(4), b"f", b"", b"", JobMode::Background, Priority::Low, &mut out);
        let wire = [
            response(OptionRes, &[b"exceptions"]),
            response(JobCreated, &[b"H:gm:1"]),
            response(JobCreated, &[b"H:gm:2"]),
        ]
        .concat();
        feed(&mut session, &mut input, &wire).unwrap();
        let mut tags = session.take_all_tags();
        tags.sort_by_key(|t| t.0);
        assert_eq!(tags, vec![JobTag(1), JobTag(3), JobTag(4)]);
        assert_eq!((session.in_flight(), session.awaiting_replies()), (0, 0));
        // Queued events survive the reset; the next connection starts from scratch.
        assert_eq!(events(&mut session).len(), 2);
        assert!(feed(&mut session, &mut input, &response(JobCreated, &[b"H:gm:3"])).is_err());
    }

    #[test]
    fn error_answering_get_status_reaches_the_asker() {
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"", &mut out);
        session.get_status(b"H:gm:1", 42, &mut out);
        session.get_status(b"H:gm:1", 43, &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(Error, &[b"INVALID_COMMAND", b"Command not expected"]),
            response(StatusRes, &[b"H:gm:1", b"1", b"0", b"0", b"0"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &mut input, &wire);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::StatusFailed {
                    ask: 42,
                    handle: b"H:gm:1".to_vec(),
                    code: "INVALID_COMMAND".into(),
                    message: "Command not expected".into()
                },
                JobEvent::StatusRes {
                    ask: 43,
                    handle: b"H:gm:1".to_vec(),
                    known: true,
                    running: false,
                    numerator: 0,
                    denominator: 0
                },
            ]
        );
        assert_eq!(session.awaiting_replies(), 0);
    }

    #[test]
    fn probe_is_an_echo_answered_silently() {
        let (mut session, mut out, mut input) = setup();
        session.probe(&mut out);
        let (packet, used) = crate::gearman::packet::decode_request(&out, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, packet.args, used), (EchoReq, vec![PROBE_BODY.to_vec()], out.len()));
        assert_eq!((session.awaiting_replies(), session.has_answered()), (1, false));
        let wire = response(EchoRes, &[PROBE_BODY]);
        let (head, last) = wire.split_at(wire.len() - 1);
        feed(&mut session, &mut input, head).unwrap();
        assert!(!session.has_answered(), "half a packet is no answer");
        feed(&mut session, &mut input, last).unwrap();
        assert_eq!((session.awaiting_replies(), session.has_answered()), (0, true));
        assert_eq!(session.poll_event(), None);

        // An ERROR in place of ECHO_RES is swallowed too, and the next reply still pairs.
        session.probe(&mut out);
        fg(&mut session, 1, b"", &mut out);
        let wire =
            [response(Error, &[b"ERR", b"no echo today"]), response(JobCreated, &[b"H:gm:1"])].concat();
        feed(&mut session, &mut input, &wire).unwrap();
        assert_eq!(
            events(&mut session),
            vec![JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() }]
        );

        // A new connection has not answered yet.
        session.take_all_tags();
        assert!(!session.has_answered());
        assert_eq!(
            feed(&mut session, &mut input, &response(EchoRes, &[PROBE_BODY])),
            Err(ProtocolError::Unexpected { kind: EchoRes, expected: "nothing" })
        );
        let (mut session, mut out, mut input) = setup();
        fg(&mut session, 1, b"", &mut out);
        assert_eq!(
            feed(&mut session, &mut input, &response(EchoRes, &[PROBE_BODY])),
            Err(ProtocolError::Unexpected { kind: EchoRes, expected: "JOB_CREATED" })
        );
    }

    #[test]
    fn start_asks_for_exceptions() {
        let (mut session, mut out, _) = setup();
        session.start(&mut out);
        let (packet, used) = crate::gearman::packet::decode_request(&out, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, packet.args, used), (OptionReq, vec![b"exceptions".to_vec()], out.len()));
        assert_eq!(session.awaiting_replies(), 1);
    }

    fn requests(mut wire: &[u8]) -> Vec<(PacketType, Vec<Vec<u8>>)> {
        let mut packets = Vec::new();
        while let Some((packet, used)) = crate::gearman::packet::decode_request(wire, MAX).unwrap() {
            packets.push((packet.kind, packet.args));
            wire = &wire[used..];
        }
        packets
    }

    #[test]
    fn the_report_desk_grabs_sleeps_wakes_and_completes_beside_client_jobs() {
        let (mut session, mut out, mut input) = setup();
        session.serve_reports(b"gearsock.report.a1", &mut out);
        fg(&mut session, 1, b"", &mut out);
        let sent = requests(&out);
        assert_eq!(sent[0], (CanDo, vec![b"gearsock.report.a1".to_vec()]));
        assert_eq!(sent[1].0, GrabJobUniq);
        assert_eq!(session.awaiting_replies(), 2, "the grab and the submit are owed answers");

        // Worker and client answers interleave; each goes to its own side.
        let wire = [response(NoJob, &[]), response(JobCreated, &[b"H:gm:1"])].concat();
        feed(&mut session, &mut input, &wire).unwrap();
        let mut replies = Vec::new();
        session.take_replies(&mut replies);
        assert_eq!(requests(&replies), vec![(PreSleep, vec![])]);
        assert_eq!(session.awaiting_replies(), 0, "asleep, and the submit is answered");
        assert_eq!(
            events(&mut session),
            vec![JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() }]
        );

        feed(&mut session, &mut input, &response(Noop, &[])).unwrap();
        replies.clear();
        session.take_replies(&mut replies);
        assert_eq!(requests(&replies), vec![(GrabJobUniq, vec![])]);

        let assign = response(JobAssignUniq, &[b"H:gm:2", b"gearsock.report.a1", b"a1.XYZ", b"done"]);
        feed(&mut session, &mut input, &assign).unwrap();
        assert_eq!(
            events(&mut session),
            vec![JobEvent::Forwarded { unique: b"a1.XYZ".to_vec(), value: b"done".to_vec() }]
        );
        replies.clear();
        session.take_replies(&mut replies);
        assert_eq!(
            requests(&replies),
            vec![(WorkComplete, vec![b"H:gm:2".to_vec(), Vec::new()]), (GrabJobUniq, vec![])]
        );
    }

    #[test]
    fn worker_replies_nobody_asked_for_break_the_session_and_a_huge_report_is_failed() {
        let (mut session, _, mut input) = setup();
        assert!(
            feed(&mut session, &mut input, &response(NoJob, &[])).is_err(),
            "no desk: NO_JOB is unexpected"
        );

        let mut session = ClientSession::new(16);
        let (mut out, mut input) = (Vec::new(), InBuf::new(1024));
        session.serve_reports(b"f", &mut out);
        let big = response(JobAssignUniq, &[b"H:gm:9", b"f", b"u", &[b'x'; 100]]);
        feed(&mut session, &mut input, &big).unwrap();
        assert!(input.is_empty() && events(&mut session).is_empty());
        let mut replies = Vec::new();
        session.take_replies(&mut replies);
        assert_eq!(requests(&replies), vec![(WorkFail, vec![b"H:gm:9".to_vec()]), (GrabJobUniq, vec![])]);
    }
}
