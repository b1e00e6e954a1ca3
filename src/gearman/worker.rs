//! `WorkerSession`: the worker half of one gearmand connection, sans-IO.
//!
//! It owns the grab/sleep cycle (GRAB_JOB_UNIQ, NO_JOB → PRE_SLEEP, NOOP → GRAB again) and turns
//! JOB_ASSIGN* into `Assignment` events; it also encodes the registration and WORK_* packets a
//! worker sends. It must not touch a socket, the clock or run job code: the shell (`crate::worker`)
//! does the blocking I/O and calls the job functions.

use std::collections::VecDeque;

use log::{debug, trace};

use super::packet::{PacketType, ProtocolError, decode_response, encode_request};
use crate::buf::InBuf;

/// A job gearmand handed to this worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The job handle, e.g. `H:host:42`; every WORK_* packet names it.
    pub handle: Vec<u8>,
    /// The function the client asked for.
    pub function: Vec<u8>,
    /// The client's unique id (empty for JOB_ASSIGN, which does not carry it).
    pub unique: Vec<u8>,
    /// The client's payload.
    pub payload: Vec<u8>,
}

/// What the server said to the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// JOB_ASSIGN, JOB_ASSIGN_UNIQ or JOB_ASSIGN_ALL. The session is `Idle` again: call `grab`
    /// for the next job whenever the worker is ready for one.
    Assignment(Assignment),
    /// ERROR, e.g. `JOB_NOT_FOUND` after a WORK_* for a job this worker no longer holds. The
    /// connection stays usable.
    Error {
        /// gearmand's error code.
        code: String,
        /// gearmand's text.
        message: String,
    },
    /// ECHO_RES: the answer to `echo`, proof that the connection is alive.
    EchoRes(Vec<u8>),
}

/// Where the worker is in the grab cycle.
///
/// ```text
///   Idle --grab()--> Grabbing --JOB_ASSIGN*--> Idle (Assignment event)
///                    Grabbing --NO_JOB, sends PRE_SLEEP--> Sleeping
///                    Sleeping --NOOP, sends GRAB_JOB_UNIQ--> Grabbing
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Not asking for work.
    Idle,
    /// GRAB_JOB_UNIQ sent; JOB_ASSIGN* or NO_JOB will answer.
    Grabbing,
    /// PRE_SLEEP sent; gearmand sends NOOP when a job may be waiting.
    Sleeping,
}

/// The worker side of one gearmand connection. See the module docs.
#[derive(Debug)]
pub struct WorkerSession {
    max_body_bytes: usize,
    state: WorkerState,
    events: VecDeque<WorkerEvent>,
}

impl WorkerSession {
    /// A fresh, idle session; packets with a body over `max_body_bytes` are a `ProtocolError`.
    pub fn new(max_body_bytes: usize) -> Self {
        WorkerSession { max_body_bytes, state: WorkerState::Idle, events: VecDeque::new() }
    }

    /// Where the session is in the grab cycle.
    pub fn state(&self) -> WorkerState {
        self.state
    }

    /// True while waiting for NOOP: nothing will arrive until a job does.
    pub fn is_sleeping(&self) -> bool {
        self.state == WorkerState::Sleeping
    }

    /// Appends SET_CLIENT_ID (shown by gearmand's `workers` admin command).
    pub fn set_client_id(&mut self, id: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::SetClientId, &[id]);
    }

    /// Appends CAN_DO: this worker serves `function`.
    pub fn can_do(&mut self, function: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::CanDo, &[function]);
    }

    /// Appends CANT_DO: this worker no longer serves `function`.
    pub fn cant_do(&mut self, function: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::CantDo, &[function]);
    }

    /// Appends ECHO_REQ; the answer is `WorkerEvent::EchoRes`.
    pub fn echo(&mut self, data: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::EchoReq, &[data]);
    }

    /// Asks for a job (GRAB_JOB_UNIQ) if `Idle`; returns whether it did. While grabbing or
    /// sleeping a request is already out, and the session follows up by itself.
    pub fn grab(&mut self, out: &mut Vec<u8>) -> bool {
        if self.state != WorkerState::Idle {
            return false;
        }
        encode_request(out, PacketType::GrabJobUniq, &[]);
        self.set_state(WorkerState::Grabbing);
        true
    }

    /// Decodes every complete packet in `input`, consuming it. NO_JOB and NOOP are answered at
    /// once by appending PRE_SLEEP or GRAB_JOB_UNIQ to `out`; the caller must flush `out`.
    pub fn handle_input(&mut self, input: &mut InBuf, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        while let Some((packet, used)) = decode_response(input.data(), self.max_body_bytes)? {
            input.consume(used);
            trace!("gearman worker recv {} args={}", packet.kind, packet.args.len());
            let kind = packet.kind;
            let mut args = packet.args.into_iter();
            let mut next = || args.next().unwrap_or_default();
            match kind {
                PacketType::NoJob => {
                    self.expect_grabbing(kind)?;
                    encode_request(out, PacketType::PreSleep, &[]);
                    self.set_state(WorkerState::Sleeping);
                }
                PacketType::Noop => {
                    if self.state == WorkerState::Sleeping {
                        encode_request(out, PacketType::GrabJobUniq, &[]);
                        self.set_state(WorkerState::Grabbing);
                    } else {
                        // A wake-up for a sleep we already left (we grabbed meanwhile): harmless.
                        debug!("gearman worker NOOP while {:?}", self.state);
                    }
                }
                PacketType::JobAssign | PacketType::JobAssignUniq | PacketType::JobAssignAll => {
                    self.expect_grabbing(kind)?;
                    let handle = next();
                    let function = next();
                    let unique = if kind == PacketType::JobAssign { Vec::new() } else { next() };
                    if kind == PacketType::JobAssignAll {
                        let _reducer = next();
                    }
                    let payload = next();
                    self.set_state(WorkerState::Idle);
                    self.events.push_back(WorkerEvent::Assignment(Assignment {
                        handle,
                        function,
                        unique,
                        payload,
                    }));
                }
                PacketType::Error => {
                    let code = String::from_utf8_lossy(&next()).into_owned();
                    let message = String::from_utf8_lossy(&next()).into_owned();
                    self.events.push_back(WorkerEvent::Error { code, message });
                }
                PacketType::EchoRes => self.events.push_back(WorkerEvent::EchoRes(next())),
                PacketType::OptionRes => {}
                _ => return Err(ProtocolError::Unexpected { kind, expected: "a worker reply" }),
            }
        }
        Ok(())
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<WorkerEvent> {
        self.events.pop_front()
    }

    /// Appends WORK_DATA: a chunk of output for the waiting clients.
    pub fn work_data(&self, handle: &[u8], data: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::WorkData, &[handle, data]);
    }

    /// Appends WORK_WARNING.
    pub fn work_warning(&self, handle: &[u8], data: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::WorkWarning, &[handle, data]);
    }

    /// Appends WORK_STATUS `numerator`/`denominator` (gearmand keeps them as u32).
    pub fn work_status(&self, handle: &[u8], numerator: u64, denominator: u64, out: &mut Vec<u8>) {
        let (n, d) = (numerator.to_string(), denominator.to_string());
        encode_request(out, PacketType::WorkStatus, &[handle, n.as_bytes(), d.as_bytes()]);
    }

    /// Appends WORK_COMPLETE with the result; the job is over.
    pub fn work_complete(&self, handle: &[u8], result: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::WorkComplete, &[handle, result]);
    }

    /// Appends WORK_FAIL; the job is over.
    pub fn work_fail(&self, handle: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::WorkFail, &[handle]);
    }

    /// Appends WORK_EXCEPTION; the job is over. Clients without the `exceptions` option get
    /// WORK_FAIL instead.
    pub fn work_exception(&self, handle: &[u8], data: &[u8], out: &mut Vec<u8>) {
        encode_request(out, PacketType::WorkException, &[handle, data]);
    }

    fn expect_grabbing(&self, kind: PacketType) -> Result<(), ProtocolError> {
        if self.state == WorkerState::Grabbing {
            Ok(())
        } else {
            Err(ProtocolError::Unexpected { kind, expected: "nothing (no GRAB outstanding)" })
        }
    }

    fn set_state(&mut self, to: WorkerState) {
        trace!("gearman worker {:?} -> {:?}", self.state, to);
        self.state = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gearman::packet::{PacketType::*, decode_request, response};

    const MAX: usize = 1 << 20;

    /// Every request in `out`, as (type, args).
    fn requests(out: &[u8]) -> Vec<(PacketType, Vec<Vec<u8>>)> {
        let mut rest = out;
        let mut found = Vec::new();
        while let Some((packet, used)) = decode_request(rest, MAX).unwrap() {
            found.push((packet.kind, packet.args));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        found
    }

    fn feed_byte_at_a_time(session: &mut WorkerSession, wire: &[u8], out: &mut Vec<u8>) {
        let mut input = InBuf::new(MAX);
        for &byte in wire {
            input.extend(&[byte]);
            session.handle_input(&mut input, out).unwrap();
        }
    }

    #[test]
    fn registers_and_grabs() {
        let (mut session, mut out) = (WorkerSession::new(MAX), Vec::new());
        session.set_client_id(b"worker-A", &mut out);
        session.can_do(b"ping", &mut out);
        assert!(session.grab(&mut out));
        assert!(!session.grab(&mut out), "one grab at a time");
        assert_eq!(
            requests(&out),
            vec![
                (SetClientId, vec![b"worker-A".to_vec()]),
                (CanDo, vec![b"ping".to_vec()]),
                (GrabJobUniq, vec![])
            ]
        );
        assert_eq!(session.state(), WorkerState::Grabbing);
    }

    #[test]
    fn no_job_sleeps_and_noop_grabs_again_until_assigned() {
        let (mut session, mut out) = (WorkerSession::new(MAX), Vec::new());
        session.grab(&mut out);
        out.clear();
        feed_byte_at_a_time(&mut session, &response(NoJob, &[]), &mut out);
        assert_eq!(requests(&out), vec![(PreSleep, vec![])]);
        assert!(session.is_sleeping());
        out.clear();
        let wire =
            [response(Noop, &[]), response(JobAssignUniq, &[b"H:gm:1", b"ping", b"u-1", b"no\0op"])].concat();
        feed_byte_at_a_time(&mut session, &wire, &mut out);
        assert_eq!(requests(&out), vec![(GrabJobUniq, vec![])]);
        assert_eq!(
            session.poll_event(),
            Some(WorkerEvent::Assignment(Assignment {
                handle: b"H:gm:1".to_vec(),
                function: b"ping".to_vec(),
                unique: b"u-1".to_vec(),
                payload: b"no\0op".to_vec(),
            }))
        );
        assert_eq!(session.state(), WorkerState::Idle);
    }

    #[test]
    fn plain_job_assign_has_an_empty_unique() {
        let (mut session, mut out) = (WorkerSession::new(MAX), Vec::new());
        session.grab(&mut out);
        feed_byte_at_a_time(&mut session, &response(JobAssign, &[b"H:gm:2", b"echo", b"x"]), &mut out);
        let Some(WorkerEvent::Assignment(job)) = session.poll_event() else { panic!("no assignment") };
        assert_eq!((job.handle, job.unique, job.payload), (b"H:gm:2".to_vec(), Vec::new(), b"x".to_vec()));
    }

    #[test]
    fn stray_noop_is_ignored_but_unasked_assignment_is_an_error() {
        let (mut session, mut out) = (WorkerSession::new(MAX), Vec::new());
        let mut input = InBuf::new(MAX);
        input.extend(&response(Noop, &[]));
        session.handle_input(&mut input, &mut out).unwrap();
        assert!(out.is_empty());
        input.extend(&response(JobAssignUniq, &[b"H:gm:1", b"f", b"", b""]));
        assert!(matches!(session.handle_input(&mut input, &mut out), Err(ProtocolError::Unexpected { .. })));
    }

    #[test]
    fn errors_and_echoes_become_events() {
        let (mut session, mut out) = (WorkerSession::new(MAX), Vec::new());
        let wire = [
            response(Error, &[b"JOB_NOT_FOUND", b"Job given in work result not found"]),
            response(EchoRes, &[b"hi"]),
        ]
        .concat();
        feed_byte_at_a_time(&mut session, &wire, &mut out);
        assert_eq!(
            session.poll_event(),
            Some(WorkerEvent::Error {
                code: "JOB_NOT_FOUND".into(),
                message: "Job given in work result not found".into()
            })
        );
        assert_eq!(session.poll_event(), Some(WorkerEvent::EchoRes(b"hi".to_vec())));
    }

    #[test]
    fn work_packets_encode_their_arguments() {
        let (session, mut out) = (WorkerSession::new(MAX), Vec::new());
        let h: &[u8] = b"H:gm:1";
        session.work_data(h, b"ping 1", &mut out);
        session.work_status(h, 1, 5, &mut out);
        session.work_warning(h, b"hmm", &mut out);
        session.work_complete(h, b"done", &mut out);
        session.work_fail(h, &mut out);
        session.work_exception(h, b"boom", &mut out);
        assert_eq!(
            requests(&out),
            vec![
                (WorkData, vec![h.to_vec(), b"ping 1".to_vec()]),
                (WorkStatus, vec![h.to_vec(), b"1".to_vec(), b"5".to_vec()]),
                (WorkWarning, vec![h.to_vec(), b"hmm".to_vec()]),
                (WorkComplete, vec![h.to_vec(), b"done".to_vec()]),
                (WorkFail, vec![h.to_vec()]),
                (WorkException, vec![h.to_vec(), b"boom".to_vec()]),
            ]
        );
    }
}
