//! Arbitrary bytes from "gearmand" into a `ClientSession` (the server's side of a gearmand
//! link) and into a `WorkerSession` (what `gearsock worker` reads from its gearmand).
//!
//! Input: one control byte (the job size limit, and the size of the reads: whole or 1..=63
//! bytes), then the wire bytes. Reads are pushed into an `InBuf` sized as the shells size it
//! (limit + header) and never past its room, as `server::io::fill` reads.
//!
//! The client session is also a report desk, as every server link is (`serve_reports`), so
//! NO_JOB, NOOP and JOB_ASSIGN_UNIQ are answers it may get. It starts with replies owed:
//! OPTION_REQ, the desk's GRAB_JOB_UNIQ, two foreground submits, one
//! background submit, a GET_STATUS and a probe; whenever fewer than two replies are owed after a
//! read it asks for more, so the fuzzer can keep answering. A protocol error drops the
//! connection the way the shell does (`take_all_tags`, fresh buffer, `start`) and the rest of
//! the bytes go to the new connection (three connections at most).
//!
//! Checked, besides "no panic": after a successful `handle_input` the buffer is never full (a
//! session that waits on a full buffer stalls its link); no event carries more than the limit;
//! every tag follows created → work* → one terminal event and then nothing; every status
//! question gets at most one answer; `in_flight()` equals the tags still owed something, and
//! `take_all_tags` returns exactly those. The desk's replies and the worker's writes are only
//! ever whole, valid requests of the kinds a worker sends.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use gearsock::buf::InBuf;
use gearsock::gearman::packet::{HEADER_BYTES, PacketType, decode_request};
use gearsock::gearman::{
    Assignment, ClientSession, JobEvent, JobMode, JobTag, Priority, WorkerEvent, WorkerSession,
};
use libfuzzer_sys::fuzz_target;

/// Job size limits: under, at and over the 256-byte handle window of oversized WORK_* packets.
const LIMITS: [usize; 4] = [16, 64, 300, 4096];

/// Connections per input: enough to cover a reset session, few enough that garbage does not
/// spend the run reconnecting.
const MAX_CONNECTIONS: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let [control, wire @ ..] = data else { return };
    let max_job = LIMITS[usize::from(control & 3)];
    let read_size = match usize::from(control >> 2) {
        0 => usize::MAX,
        n => n,
    };
    run_client(wire, max_job, read_size);
    run_worker(wire, max_job, read_size);
});

/// Where a submission that is still owed something is, as the events tell it. A tag leaves
/// the map with its last event (or when its connection is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagState {
    /// Submitted; JOB_CREATED or ERROR owed.
    Pending(JobMode),
    /// A foreground job gearmand named; WORK_* packets may come.
    Running,
}

struct ClientRun {
    session: ClientSession,
    input: InBuf,
    out: Vec<u8>,
    max_job: usize,
    /// Tags still owed something.
    tags: BTreeMap<u64, TagState>,
    next_tag: u64,
    asks: BTreeSet<u64>,
    next_ask: u64,
    last_handle: Vec<u8>,
    /// Which request `ask_more` makes next.
    turn: u32,
}

impl ClientRun {
    fn connect(&mut self) {
        self.input = InBuf::new(self.max_job + HEADER_BYTES);
        self.out.clear();
        self.session.start(&mut self.out);
        self.session.serve_reports(b"gearsock.report.fz", &mut self.out);
        self.submit(JobMode::Foreground, b"");
        self.submit(JobMode::Foreground, b"u");
        self.submit(JobMode::Background, b"");
        self.get_status();
        self.session.probe(&mut self.out);
    }

    fn submit(&mut self, mode: JobMode, unique: &[u8]) {
        self.next_tag += 1;
        let tag = JobTag(self.next_tag);
        self.session.submit(tag, b"reverse", unique, b"abc", mode, Priority::Normal, &mut self.out);
        self.tags.insert(tag.0, TagState::Pending(mode));
    }

    fn get_status(&mut self) {
        self.next_ask += 1;
        let handle = if self.last_handle.is_empty() { b"H:gm:1".to_vec() } else { self.last_handle.clone() };
        self.session.get_status(&handle, self.next_ask, &mut self.out);
        self.asks.insert(self.next_ask);
    }

    fn ask_more(&mut self) {
        while self.session.awaiting_replies() < 2 {
            self.turn += 1;
            match self.turn % 4 {
                0 => self.submit(JobMode::Foreground, b""),
                1 => self.submit(JobMode::Background, b"u"),
                2 => self.get_status(),
                _ => self.session.probe(&mut self.out),
            }
        }
    }

    fn state(&self, tag: JobTag) -> TagState {
        *self.tags.get(&tag.0).unwrap_or_else(|| panic!("event for tag {}, which is owed nothing", tag.0))
    }

    fn on_event(&mut self, event: JobEvent) {
        let max = self.max_job;
        let (tag, next) = match event {
            JobEvent::Created { tag, handle } => {
                assert!(handle.len() <= max);
                self.last_handle = handle;
                match self.state(tag) {
                    TagState::Pending(JobMode::Foreground) => (tag, Some(TagState::Running)),
                    TagState::Pending(JobMode::Background) => (tag, None),
                    other => panic!("JOB_CREATED for tag {} in {other:?}", tag.0),
                }
            }
            JobEvent::Data { tag, data } | JobEvent::Warning { tag, data } => {
                assert!(data.len() <= max);
                (tag, self.expect_running(tag, Some(TagState::Running)))
            }
            JobEvent::Status { tag, .. } => (tag, self.expect_running(tag, Some(TagState::Running))),
            JobEvent::Complete { tag, data } | JobEvent::Exception { tag, data } => {
                assert!(data.len() <= max);
                (tag, self.expect_running(tag, None))
            }
            JobEvent::Failed { tag } => (tag, self.expect_running(tag, None)),
            JobEvent::TooLarge { tag, size_bytes, .. } => {
                assert!(size_bytes > max as u64);
                (tag, self.expect_running(tag, None))
            }
            JobEvent::Rejected { tag, .. } => {
                assert!(matches!(self.state(tag), TagState::Pending(_)), "ERROR for a created tag");
                (tag, None)
            }
            JobEvent::Forwarded { unique, value } => {
                assert!(unique.len() <= max && value.len() <= max);
                return;
            }
            JobEvent::StatusRes { ask, handle, .. } => {
                assert!(handle.len() <= max);
                assert!(self.asks.remove(&ask), "second answer to status question {ask}");
                return;
            }
            JobEvent::StatusFailed { ask, .. } => {
                assert!(self.asks.remove(&ask), "second answer to status question {ask}");
                return;
            }
        };
        match next {
            Some(state) => self.tags.insert(tag.0, state),
            None => self.tags.remove(&tag.0),
        };
    }

    fn expect_running(&self, tag: JobTag, next: Option<TagState>) -> Option<TagState> {
        let state = self.state(tag);
        assert_eq!(state, TagState::Running, "work packet for tag {} in {state:?}", tag.0);
        next
    }

    /// The link failed: the session must hand back exactly the tags still owed something.
    fn drop_connection(&mut self) {
        let mut lost: Vec<u64> = self.session.take_all_tags().iter().map(|t| t.0).collect();
        while let Some(event) = self.session.poll_event() {
            self.on_event(event);
        }
        lost.sort_unstable();
        let owed: Vec<u64> = self.tags.keys().copied().collect();
        assert_eq!(lost, owed, "take_all_tags disagrees with the events");
        assert_eq!((self.session.in_flight(), self.session.awaiting_replies()), (0, 0));
        self.tags.clear();
        self.asks.clear();
    }
}

fn run_client(wire: &[u8], max_job: usize, read_size: usize) {
    let mut run = ClientRun {
        session: ClientSession::new(max_job),
        input: InBuf::new(0),
        out: Vec::new(),
        max_job,
        tags: BTreeMap::new(),
        next_tag: 0,
        asks: BTreeSet::new(),
        next_ask: 0,
        last_handle: Vec::new(),
        turn: 0,
    };
    run.connect();
    let mut connections = 1;
    let mut rest = wire;
    while !rest.is_empty() {
        let n = rest.len().min(read_size).min(run.input.room());
        run.input.extend(&rest[..n]);
        rest = &rest[n..];
        let result = run.session.handle_input(&mut run.input);
        let mut replies = Vec::new();
        run.session.take_replies(&mut replies);
        check_requests(&replies);
        while let Some(event) = run.session.poll_event() {
            run.on_event(event);
        }
        match result {
            Ok(()) => {
                assert!(!run.input.is_full(), "session waits on a full buffer of {} bytes", run.input.len());
                assert_eq!(run.session.in_flight(), run.tags.len(), "in_flight disagrees with the events");
                run.out.clear(); // flushed
                run.ask_more();
            }
            Err(_) => {
                run.drop_connection();
                if connections == MAX_CONNECTIONS {
                    return;
                }
                connections += 1;
                run.connect();
            }
        }
    }
    run.drop_connection();
}

fn run_worker(wire: &[u8], max_job: usize, read_size: usize) {
    let mut session = WorkerSession::new(max_job);
    let mut input = InBuf::new(max_job + HEADER_BYTES);
    let mut out = Vec::new();
    session.can_do(b"ping", &mut out);
    session.grab(&mut out);
    let mut rest = wire;
    while !rest.is_empty() {
        let n = rest.len().min(read_size).min(input.room());
        input.extend(&rest[..n]);
        rest = &rest[n..];
        let result = session.handle_input(&mut input, &mut out);
        while let Some(event) = session.poll_event() {
            match event {
                WorkerEvent::Assignment(Assignment { handle, function, unique, payload }) => {
                    assert!(handle.len() + function.len() + unique.len() + payload.len() <= max_job);
                    session.work_complete(&handle, &payload, &mut out);
                }
                WorkerEvent::Error { code, message } => assert!(code.len() + message.len() <= 3 * max_job),
                WorkerEvent::EchoRes(data) => assert!(data.len() <= max_job),
            }
        }
        check_requests(&out);
        out.clear(); // flushed
        if result.is_err() {
            return; // the worker drops the connection and starts over
        }
        assert!(!input.is_full(), "worker waits on a full buffer of {} bytes", input.len());
        session.grab(&mut out);
    }
}

/// What a worker (or a client session's desk) writes must be whole request packets of the kinds
/// a worker sends.
fn check_requests(out: &[u8]) {
    let mut rest = out;
    while !rest.is_empty() {
        let (packet, used) = decode_request(rest, usize::MAX).expect("valid request").expect("whole packet");
        assert!(
            matches!(
                packet.kind,
                PacketType::CanDo
                    | PacketType::GrabJobUniq
                    | PacketType::PreSleep
                    | PacketType::WorkComplete
                    | PacketType::WorkFail
            ),
            "{:?}",
            packet.kind
        );
        rest = &rest[used..];
    }
}
