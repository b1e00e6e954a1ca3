//! `ClientSession`: the client half of one gearmand connection, sans-IO.
//!
//! It owns the bookkeeping between requests and replies: submits and status queries go out as
//! bytes appended to the caller's buffer, bytes from gearmand come in through `handle_input`,
//! and what they mean comes out of `poll_event` as `JobEvent`s keyed by the caller's `JobTag`.
//! It must not touch a socket or the clock, and it knows nothing about WebSocket clients: the
//! caller maps tags to whoever asked.
//!
//! gearmand answers the requests of one connection strictly in order, so one FIFO of expected
//! replies pairs each JOB_CREATED, STATUS_RES, OPTION_RES or ERROR with the request it answers.
//! WORK_* packets of foreground jobs name a handle; the session maps handles to tags.

use std::collections::{HashMap, VecDeque};

use log::{debug, trace};

use super::packet::{PacketType, ProtocolError, decode_response, encode_request, parse_number};
use crate::buf::InBuf;

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
        /// The handle asked about.
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
}

/// A reply gearmand still owes us, in request order.
#[derive(Debug)]
enum Expected {
    /// A SUBMIT_JOB*: JOB_CREATED or ERROR.
    Created { tag: JobTag, mode: JobMode },
    /// A GET_STATUS: STATUS_RES or ERROR.
    Status { handle: Vec<u8> },
    /// An OPTION_REQ: OPTION_RES or ERROR.
    Option,
}

impl Expected {
    fn describe(&self) -> &'static str {
        match self {
            Expected::Created { .. } => "JOB_CREATED",
            Expected::Status { .. } => "STATUS_RES",
            Expected::Option => "OPTION_RES",
        }
    }
}

/// The foreground submissions attached to one handle.
///
/// gearmand sends every WORK_* packet once per attached submission, consecutively. Each copy
/// goes to the tag under `cursor`, which then advances, so every submission sees each packet
/// exactly once; a terminal copy detaches its tag.
#[derive(Debug, Default)]
struct Subscribers {
    tags: Vec<JobTag>,
    cursor: usize,
}

impl Subscribers {
    /// The tag that receives the next copy; advances the cursor.
    fn next(&mut self) -> JobTag {
        let tag = self.tags[self.cursor];
        self.cursor = (self.cursor + 1) % self.tags.len();
        tag
    }

    /// The tag that receives the next copy, detached because the copy is terminal.
    fn take_next(&mut self) -> JobTag {
        let tag = self.tags.remove(self.cursor);
        // The tag after the removed one slid into its slot.
        if self.cursor >= self.tags.len() {
            self.cursor = 0;
        }
        tag
    }
}

/// The client side of one gearmand connection. See the module docs.
#[derive(Debug)]
pub struct ClientSession {
    max_body_bytes: usize,
    expected: VecDeque<Expected>,
    running: HashMap<Vec<u8>, Subscribers>,
    events: VecDeque<JobEvent>,
}

impl ClientSession {
    /// A fresh session; packets with a body over `max_body_bytes` are a `ProtocolError`.
    pub fn new(max_body_bytes: usize) -> Self {
        ClientSession {
            max_body_bytes,
            expected: VecDeque::new(),
            running: HashMap::new(),
            events: VecDeque::new(),
        }
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

    /// Appends a GET_STATUS; the answer comes out as `JobEvent::StatusRes`.
    pub fn get_status(&mut self, handle: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::GetStatus, &[handle]);
        self.expected.push_back(Expected::Status { handle: handle.to_vec() });
    }

    /// Decodes every complete packet in `input`, consuming it and queueing events. On error the
    /// connection is beyond repair: drop it and call `take_all_tags`.
    pub fn handle_input(&mut self, input: &mut InBuf) -> Result<(), ProtocolError> {
        while let Some((packet, used)) = decode_response(input.data(), self.max_body_bytes)? {
            input.consume(used);
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
                kind => return Err(ProtocolError::Unexpected { kind, expected: "a client reply" }),
            }
        }
        Ok(())
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<JobEvent> {
        self.events.pop_front()
    }

    /// Submissions still owed something: awaiting JOB_CREATED (either mode) or, for foreground
    /// jobs, a terminal packet.
    pub fn in_flight(&self) -> usize {
        let awaiting_created = self.expected.iter().filter(|e| matches!(e, Expected::Created { .. })).count();
        awaiting_created + self.running.values().map(|s| s.tags.len()).sum::<usize>()
    }

    /// Replies gearmand still owes (submits, status queries, options). Zero means an idle
    /// connection, as far as requests go.
    pub fn awaiting_replies(&self) -> usize {
        self.expected.len()
    }

    /// The connection is gone: returns every tag still awaiting JOB_CREATED or a terminal
    /// packet (in submit order for the former), and resets the session for a new connection
    /// (call `start` again). Events already queued stay queued for `poll_event`.
    pub fn take_all_tags(&mut self) -> Vec<JobTag> {
        let mut tags: Vec<JobTag> = self
            .expected
            .drain(..)
            .filter_map(|e| match e {
                Expected::Created { tag, .. } => Some(tag),
                _ => None,
            })
            .collect();
        tags.extend(self.running.drain().flat_map(|(_, s)| s.tags));
        tags
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
            self.running.entry(handle.clone()).or_default().tags.push(tag);
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
        match self.pop_expected(PacketType::StatusRes)? {
            Expected::Status { handle: asked } => {
                if asked != handle {
                    debug!(
                        "gearman STATUS_RES for {:?}, asked {:?}",
                        handle.escape_ascii(),
                        asked.escape_ascii()
                    );
                }
            }
            other => return Err(self.mismatch(PacketType::StatusRes, other)),
        }
        self.events.push_back(JobEvent::StatusRes {
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

    fn on_error(&mut self, code: &[u8], message: &[u8]) -> Result<(), ProtocolError> {
        let code = String::from_utf8_lossy(code).into_owned();
        let message = String::from_utf8_lossy(message).into_owned();
        match self.pop_expected(PacketType::Error)? {
            Expected::Created { tag, .. } => {
                debug!("gearman rejected tag={}: {code} {message}", tag.0);
                self.events.push_back(JobEvent::Rejected { tag, code, message });
            }
            Expected::Status { handle } => {
                debug!("gearman GET_STATUS {:?} got ERROR {code} {message}", handle.escape_ascii());
            }
            Expected::Option => debug!("gearman OPTION_REQ got ERROR {code} {message}"),
        }
        Ok(())
    }

    /// Routes one copy of a WORK_* packet to the next subscriber of `handle`.
    fn on_work(&mut self, handle: &[u8], terminal: bool, event: impl FnOnce(JobTag) -> JobEvent) {
        let Some(subscribers) = self.running.get_mut(handle) else {
            debug!("gearman work packet for unknown handle {:?}", handle.escape_ascii());
            return;
        };
        let tag = if terminal { subscribers.take_next() } else { subscribers.next() };
        if subscribers.tags.is_empty() {
            self.running.remove(handle);
        }
        self.events.push_back(event(tag));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gearman::packet::{Magic, PacketType::*, encode_raw, response};

    const MAX: usize = 1 << 20;

    fn setup() -> (ClientSession, Vec<u8>, InBuf) {
        (ClientSession::new(MAX), Vec::new(), InBuf::new(MAX))
    }

    fn feed(session: &mut ClientSession, input: &mut InBuf, wire: &[u8]) -> Result<(), ProtocolError> {
        input.extend(wire);
        session.handle_input(input)
    }

    fn feed_byte_at_a_time(session: &mut ClientSession, input: &mut InBuf, wire: &[u8]) {
        for &byte in wire {
            input.extend(&[byte]);
            session.handle_input(input).unwrap();
        }
        assert!(input.is_empty());
    }

    fn events(session: &mut ClientSession) -> Vec<JobEvent> {
        std::iter::from_fn(|| session.poll_event()).collect()
    }

    fn fg(session: &mut ClientSession, tag: u64, unique: &[u8], out: &mut Vec<u8>) {
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
        session.get_status(b"H:gm:0", &mut out);
        session.submit(JobTag(2), b"ping", b"", b"noop", JobMode::Background, Priority::Normal, &mut out);
        session.get_status(b"H:gm:1", &mut out);
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
                    handle: b"H:gm:0".to_vec(),
                    known: false,
                    running: false,
                    numerator: 0,
                    denominator: 0
                },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:2".to_vec() },
                JobEvent::StatusRes {
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
        assert!(feed(&mut session, &mut input, &response(Noop, &[])).is_err());
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
        session.get_status(b"H:gm:9", &mut out);
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
    fn start_asks_for_exceptions() {
        let (mut session, mut out, _) = setup();
        session.start(&mut out);
        let (packet, used) = crate::gearman::packet::decode_request(&out, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, packet.args, used), (OptionReq, vec![b"exceptions".to_vec()], out.len()));
        assert_eq!(session.awaiting_replies(), 1);
    }
}
