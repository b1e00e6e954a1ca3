//! `GearmanLink`: one connection to a gearmand in the loop: a mio socket, the sans-IO
//! `ClientSession`, its buffers, the connect/back-off state, the health check that finds a
//! gearmand that stopped answering, and why it went down ([`LinkDown`]).
//!
//! Each gearmand gets `SLOTS_PER_SERVER` links. One is `Active` (it takes new work and
//! reconnects when lost); a connection retired for holding too many abandoned jobs stays open
//! as `Retiring` in another slot until its live jobs end; the rest are `Spare`. When no slot
//! is spare, the retiring connection that owes the fewest jobs is closed to make one (see
//! `Links::retire`), so a gearmand never holds more than `SLOTS_PER_SERVER` connections' worth
//! of orphans.
//!
//! Every transition of a link is a method here; its fields are private. It must not talk to
//! clients or the App, nor decide roles or retries: that is `links`, which owns all the links.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Registry, Token};

use super::io::{Io, Readiness, connect_failure, connect_outcome, fill, flush};
use super::link_down::{LinkDown, Op, Outage, OutageNote, Stage};
use crate::buf::InBuf;
use crate::gearman::client::{ClientSession, JobEvent};
use crate::gearman::packet::HEADER_BYTES;
use crate::metrics::LinkStatus;

/// Links per gearmand: the active one plus room for retiring ones.
pub(crate) const SLOTS_PER_SERVER: usize = 4;

/// Where a link is.
///
/// ```text
/// Down --timer--> (Resolving --address-->) Connecting --writable, no error--> Greeting
///   ^                  |                          |                              |
///   |                  +-- name not found --------+-- failed / timeout ----------+
///   +------------------------------- error / EOF / silent --- Up <--first answer--+
/// ```
/// `Resolving` is skipped for a numeric `HOST:PORT`; a host name is looked up off the loop
/// (see `resolver`) before every connect.
/// A link counts as up only once gearmand has answered on it (`Greeting` sends OPTION_REQ):
/// a listening socket whose process is stopped accepts TCP connections but answers nothing.
#[derive(Debug)]
enum LinkState {
    /// Not connected.
    Down,
    /// The resolver thread is looking up the host name.
    Resolving,
    /// Nonblocking connect in progress.
    Connecting(TcpStream),
    /// Connected; waiting for gearmand's first answer.
    Greeting(TcpStream),
    /// gearmand answered; jobs go here.
    Up(TcpStream),
}

/// What a link slot is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The gearmand's connection for new work; reconnects when lost.
    Active,
    /// Retired: finishes its live jobs, then closes. Never reconnects.
    Retiring,
    /// Unused.
    Spare,
}

/// What the health check concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// Nothing to do.
    Fine,
    /// Silent for a while with nothing owed: send a probe (ECHO_REQ).
    Probe,
    /// Declared dead, with the reason.
    Dead(LinkDown),
}

/// What one read of a link gave (job events wait in [`GearmanLink::poll_event`]).
#[derive(Debug)]
pub(crate) struct Read {
    /// gearmand answered for the first time on this connection: it is up now, after the
    /// outage this ends (if any).
    pub greeted: Option<Option<Outage>>,
    /// The session queued bytes of its own (the report desk's replies).
    pub queued: bool,
    /// The connection ended.
    pub down: Option<LinkDown>,
}

/// One gearmand connection.
#[derive(Debug)]
pub(crate) struct GearmanLink {
    /// `HOST:PORT` as given on the command line.
    addr: String,
    /// The address when `addr` is numeric (no lookup needed).
    numeric: Option<SocketAddr>,
    /// A lookup was sent to the resolver and has not been answered yet.
    lookup_pending: bool,
    /// Set while the gearmand cannot be reached (operator logs).
    outage: Option<Outage>,
    /// Index of the gearmand (`--gearmand` order).
    server: usize,
    /// What this slot is for.
    role: Role,
    /// Connection state.
    state: LinkState,
    /// The protocol session (replaced on every reconnect).
    session: ClientSession,
    /// Bytes from gearmand not yet decoded.
    input: InBuf,
    /// Bytes for gearmand not yet written.
    output: Vec<u8>,
    /// Readiness and registered interest (the same model as a client's).
    io: Readiness,
    /// Failed attempts since the last success (drives the back-off).
    failures: u32,
    /// Successful connections so far.
    connects: u64,
    /// When the current state began (connect timeout) ...
    since: Instant,
    /// ... and when gearmand last sent us a byte (silence timeout).
    last_heard: Instant,
    max_job_bytes: usize,
}

impl GearmanLink {
    /// A link that is down.
    pub fn new(addr: String, server: usize, role: Role, max_job_bytes: usize, now: Instant) -> Self {
        GearmanLink {
            numeric: addr.parse().ok(),
            lookup_pending: false,
            outage: None,
            addr,
            server,
            role,
            state: LinkState::Down,
            session: ClientSession::new(max_job_bytes),
            input: InBuf::new(max_job_bytes + HEADER_BYTES),
            output: Vec::new(),
            io: Readiness::default(),
            failures: 0,
            connects: 0,
            since: now,
            last_heard: now,
            max_job_bytes,
        }
    }

    /// `HOST:PORT` as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The address, when `addr` is numeric (no lookup needed).
    pub fn numeric(&self) -> Option<SocketAddr> {
        self.numeric
    }

    /// Index of its gearmand.
    pub fn server(&self) -> usize {
        self.server
    }

    /// What this slot is for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Successful connections so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// The outage going on, if any.
    pub fn outage(&self) -> Option<&Outage> {
        self.outage.as_ref()
    }

    /// How `/healthz` and `/metrics` show the state (the caller knows about `Stalled`).
    pub fn status(&self) -> LinkStatus {
        match self.state {
            LinkState::Down => LinkStatus::Disconnected,
            LinkState::Resolving => LinkStatus::Resolving,
            LinkState::Connecting(_) | LinkState::Greeting(_) => LinkStatus::Connecting,
            LinkState::Up(_) => LinkStatus::Connected,
        }
    }

    /// True when jobs may be written.
    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up(_))
    }

    /// Down, with no connection in any stage.
    pub fn is_down(&self) -> bool {
        matches!(self.state, LinkState::Down)
    }

    /// A down spare becomes its gearmand's active link (fresh back-off).
    pub fn activate(&mut self) {
        self.role = Role::Active;
        self.failures = 0;
    }

    /// It takes no new work; it closes once its live jobs are done.
    /// Submissions this connection still owes news of (awaiting JOB_CREATED, or a foreground
    /// job's end): what closing it would fail.
    pub fn jobs_owed(&self) -> usize {
        self.session.in_flight()
    }

    pub fn retire(&mut self) {
        self.role = Role::Retiring;
    }

    /// Notes one epoll event; true when it says the socket is writable (a connect finished, or
    /// blocked output may go on).
    pub fn note(&mut self, event: &mio::event::Event) -> bool {
        self.io.note(event).1
    }

    /// It stopped reading at its budget with bytes still waiting (the next wait must not sleep).
    pub fn has_unread(&self) -> bool {
        self.io.can_read() && matches!(self.state, LinkState::Greeting(_) | LinkState::Up(_))
    }

    /// The host name is being looked up (by the resolver thread). True when a lookup should
    /// be sent: one that outlived the timeout is still on its way, and is waited for.
    pub fn resolving(&mut self, now: Instant) -> bool {
        self.state = LinkState::Resolving;
        self.since = now;
        !std::mem::replace(&mut self.lookup_pending, true)
    }

    /// The resolver answered; true when this link still waits for that answer.
    pub fn looked_up(&mut self) -> bool {
        self.lookup_pending = false;
        self.role == Role::Active && matches!(self.state, LinkState::Resolving)
    }

    /// Starts a nonblocking connect to `addr` (never blocks: no name lookup here), registered
    /// for WRITABLE: the connect's completion is a writable edge.
    pub fn start_connect(
        &mut self,
        addr: SocketAddr,
        now: Instant,
        reg: &Registry,
        token: Token,
    ) -> Result<(), LinkDown> {
        self.reset_buffers();
        self.since = now;
        let mut sock = TcpStream::connect(addr).map_err(connect_failure)?;
        self.io.register(reg, &mut sock, token, true).map_err(connect_failure)?;
        self.state = LinkState::Connecting(sock);
        Ok(())
    }

    /// After an event on a connecting link: once the TCP connect finished, greet gearmand
    /// (OPTION_REQ), open the report desk for `desk` (see `ClientSession::serve_reports`) and
    /// wait for the answer. True when it did (bytes were queued).
    pub fn finish_connect(&mut self, now: Instant, desk: &[u8]) -> Result<bool, LinkDown> {
        let event_seen = self.io.can_read() || !self.io.write_blocked();
        let LinkState::Connecting(sock) = &self.state else { return Ok(false) };
        if !event_seen || !connect_outcome(sock)? {
            return Ok(false);
        }
        self.connected(now, desk);
        Ok(true)
    }

    /// The TCP connect finished (see `finish_connect`).
    fn connected(&mut self, now: Instant, desk: &[u8]) {
        let LinkState::Connecting(sock) = std::mem::replace(&mut self.state, LinkState::Down) else { return };
        let _ = sock.set_nodelay(true); // latency only; the link works without it
        self.state = LinkState::Greeting(sock);
        self.since = now;
        self.last_heard = now;
        self.io.connected();
        self.session.start(&mut self.output);
        self.session.serve_reports(desk, &mut self.output);
    }

    /// gearmand answered: the link is up.
    fn greeted(&mut self, now: Instant) {
        let LinkState::Greeting(sock) = std::mem::replace(&mut self.state, LinkState::Down) else { return };
        self.state = LinkState::Up(sock);
        self.since = now;
        self.failures = 0;
        self.connects += 1;
    }

    /// Reads what gearmand sent (up to `budget`) into the session. Edge-triggered: a read that
    /// stops at the budget keeps the edge (`has_unread`), since no new one will come for bytes
    /// already waiting.
    pub fn read(&mut self, now: Instant, scratch: &mut [u8], budget: usize) -> Read {
        let mut read = Read { greeted: None, queued: false, down: None };
        let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut self.state else { return read };
        if !self.io.can_read() {
            return read;
        }
        let outcome = fill(sock, &mut self.input, scratch, budget, self.io.short_read_drains());
        if matches!(outcome, Ok((_, n)) if n > 0) {
            self.last_heard = now;
        }
        let decoded = self.session.handle_input(&mut self.input);
        // The report desk answers gearmand on its own (PRE_SLEEP, GRAB, WORK_COMPLETE); those
        // bytes are written with the link's other output in this pass's flush.
        let queued = self.output.len();
        self.session.take_replies(&mut self.output);
        read.queued = self.output.len() > queued;
        if matches!(self.state, LinkState::Greeting(_)) && self.session.has_answered() {
            self.greeted(now);
            read.greeted = Some(self.outage.take());
        }
        read.down = match (outcome, decoded) {
            (_, Err(e)) => Some(LinkDown::Protocol(e)),
            (Err(e), _) => Some(LinkDown::Io(Op::Read, e)),
            (Ok((Io::Eof, _)), _) => Some(LinkDown::ClosedByPeer),
            (Ok((io, _)), _) => {
                self.io.read(io); // Paused: budget spent or input full, the next pass reads on
                None
            }
        };
        read
    }

    /// Reads once more in the same pass when gearmand owes this link something, whether or not
    /// a new edge was reported: what it wrote while the pass read the clients is decoded now,
    /// and its replies leave with this pass's writes instead of waking the next pass. A read
    /// that finds nothing costs one `recvfrom` (WouldBlock), and the edge epoll may have queued
    /// for bytes read here is not reported once they are gone.
    pub fn read_again(&mut self, now: Instant, scratch: &mut [u8], budget: usize) -> Read {
        if self.is_up() && self.session.expects_more() {
            self.io.assume_readable();
        }
        self.read(now, scratch, budget)
    }

    /// The next job event of what was read.
    pub fn poll_event(&mut self) -> Option<JobEvent> {
        self.session.poll_event()
    }

    /// Hands the session and the output buffer to `write` when the link is up; false when it
    /// is not (nothing is written to a link that may not take jobs).
    pub fn write(&mut self, write: impl FnOnce(&mut ClientSession, &mut Vec<u8>)) -> bool {
        if !self.is_up() {
            return false;
        }
        write(&mut self.session, &mut self.output);
        true
    }

    /// Queues a probe (ECHO_REQ) for a quiet link.
    pub fn probe(&mut self) {
        self.session.probe(&mut self.output);
    }

    /// Writes what the socket takes; past the connect, WRITABLE is in the interest exactly
    /// while bytes are left. Returns the bytes left when the link is up (the App's figure).
    pub fn flush(&mut self, reg: &Registry, token: Token) -> Result<Option<usize>, LinkDown> {
        let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut self.state else { return Ok(None) };
        if !self.output.is_empty() && !self.io.write_blocked() {
            // A partial write keeps the tail; WouldBlock waits for the writable edge.
            let io = flush(sock, &mut self.output).map_err(|e| LinkDown::Io(Op::Write, e))?;
            self.io.wrote(io);
        }
        let wants_write = !self.output.is_empty();
        self.io.sync_interest(reg, sock, token, wants_write).map_err(|e| LinkDown::Io(Op::Interest, e))?;
        Ok(self.is_up().then_some(self.output.len()))
    }

    /// Ends the connection, if any: deregistered and dropped, with a fresh session and buffers.
    /// True when it was up.
    pub fn disconnect(&mut self, reg: &Registry) -> bool {
        let was_up = self.is_up();
        if let LinkState::Connecting(sock) | LinkState::Greeting(sock) | LinkState::Up(sock) = &mut self.state
        {
            // The socket is dropped right after: closing it leaves epoll anyway.
            let _ = reg.deregister(sock);
        }
        self.state = LinkState::Down;
        self.reset_buffers();
        was_up
    }

    /// A down link whose slot is free again.
    pub fn release(&mut self) {
        self.role = Role::Spare;
    }

    /// A failed attempt or a loss: the back-off grows.
    pub fn count_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Fresh session and buffers for a new connection (the old one's bytes mean nothing now).
    fn reset_buffers(&mut self) {
        self.session = ClientSession::new(self.max_job_bytes);
        self.input = InBuf::new(self.max_job_bytes + HEADER_BYTES);
        self.output = Vec::new();
        self.io = Readiness::default();
    }

    /// Is gearmand still there? A connect or greeting that takes longer than `timeout`, or
    /// replies owed with not one byte from gearmand for `timeout`, mean it is not. A link
    /// silent for half the timeout with nothing owed is probed, so a stopped gearmand is found
    /// even when no job is waiting on it.
    pub fn check_health(&self, now: Instant, timeout: Duration) -> Health {
        let elapsed = |t: Instant| now.saturating_duration_since(t);
        let late = |stage| Health::Dead(LinkDown::TimedOut(stage));
        match self.state {
            LinkState::Down => Health::Fine,
            LinkState::Resolving if elapsed(self.since) >= timeout => late(Stage::Lookup),
            LinkState::Resolving => Health::Fine,
            LinkState::Connecting(_) if elapsed(self.since) >= timeout => late(Stage::Connect),
            LinkState::Greeting(_) if elapsed(self.since) >= timeout => late(Stage::Greeting),
            LinkState::Connecting(_) | LinkState::Greeting(_) => Health::Fine,
            LinkState::Up(_) => {
                let silent = elapsed(self.last_heard);
                if self.session.awaiting_replies() > 0 {
                    if silent >= timeout {
                        return Health::Dead(LinkDown::Silent);
                    }
                    Health::Fine
                } else if silent >= timeout / 2 {
                    Health::Probe
                } else {
                    Health::Fine
                }
            }
        }
    }

    /// Up, with replies owed and nothing heard for a quarter of the timeout: worth showing in
    /// `/healthz` before the link is declared dead.
    pub fn is_lagging(&self, now: Instant, timeout: Duration) -> bool {
        self.is_up()
            && self.session.awaiting_replies() > 0
            && now.saturating_duration_since(self.last_heard) >= timeout / 4
    }

    /// An attempt to reach gearmand failed (it was not up): counts it, and says whether the
    /// operator should hear about it. One line per outage, one per change of reason (by kind:
    /// see [`LinkDown::same_kind`]), and a reminder every `REMINDER_PERIOD`, however fast the
    /// attempts come.
    pub fn attempt_failed(&mut self, now: Instant, why: &LinkDown) -> OutageNote {
        match &mut self.outage {
            Some(outage) => outage.attempt_failed(now, why),
            None => {
                self.outage = Some(Outage::new(now, 1, why));
                OutageNote::First
            }
        }
    }

    /// The connection was lost: an outage begins (the loss itself is logged by the caller).
    pub fn lost(&mut self, now: Instant, why: &LinkDown) {
        self.outage = Some(Outage::new(now, 0, why));
    }

    /// gearmand answered again: the outage (if any) is over.
    #[cfg(test)]
    pub fn back(&mut self) -> Option<Outage> {
        self.outage.take()
    }

    /// The delay before the next attempt: doubling from `min` to `max`, then "equal jitter"
    /// (half fixed, half random) so that many gearsocks do not reconnect in step.
    pub fn backoff(&self, min: Duration, max: Duration, random: u64) -> Duration {
        let exp = min.saturating_mul(1u32 << self.failures.min(20)).min(max);
        let half = exp / 2;
        let jitter_ns = random % (half.as_nanos().max(1) as u64);
        half + Duration::from_nanos(jitter_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gearman::packet::PacketType;
    use crate::server::link_down::REMINDER_PERIOD;

    fn link(now: Instant) -> GearmanLink {
        GearmanLink::new("127.0.0.1:1".into(), 0, Role::Active, 1024, now)
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut link = link(Instant::now());
        let mut last_cap = Duration::ZERO;
        for failures in 0..12 {
            link.failures = failures;
            let cap = min.saturating_mul(1 << failures).min(max);
            for r in [0, 1, u64::MAX / 3, u64::MAX] {
                let d = link.backoff(min, max, r);
                assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} outside {cap:?}");
            }
            assert!(cap >= last_cap);
            last_cap = cap;
        }
        assert_eq!(last_cap, max);
    }

    /// A real socket in a given state, so the health check sees what the loop would.
    fn with_state(now: Instant, up: bool) -> GearmanLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut l = link(now);
        l.state = LinkState::Connecting(sock);
        l.since = now;
        if up {
            l.connected(now, b"gearsock.report.t");
            l.greeted(now);
        }
        l
    }

    #[test]
    fn the_second_read_takes_what_came_after_the_edge_was_used_up() {
        use std::io::Write;
        let now = Instant::now();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut l = link(now);
        l.state = LinkState::Connecting(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (mut gearmand, _) = listener.accept().unwrap();
        l.connected(now, b"gearsock.report.t"); // OPTION_REQ sent: its answer is owed
        l.greeted(now);
        let mut scratch = [0u8; 256];
        assert!(l.read(now, &mut scratch, 1024).down.is_none(), "nothing yet: the edge is used up");
        let mut answer = Vec::new();
        crate::gearman::packet::encode_response(&mut answer, PacketType::OptionRes, &[b"exceptions"]);
        gearmand.write_all(&answer).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        l.read(now, &mut scratch, 1024);
        assert!(!l.session.has_answered(), "without a new edge, a plain read does not look");
        assert!(l.session.expects_more());
        l.read_again(now, &mut scratch, 1024);
        assert!(l.session.has_answered(), "the second read took the answer");
    }

    #[test]
    fn a_connect_or_greeting_that_takes_too_long_is_dead() {
        let (t0, timeout) = (Instant::now(), Duration::from_secs(5));
        let mut l = with_state(t0, false);
        assert_eq!(l.check_health(t0 + Duration::from_millis(4999), timeout), Health::Fine);
        assert!(matches!(l.check_health(t0 + timeout, timeout), Health::Dead(_)));
        l.connected(t0 + Duration::from_secs(1), b"gearsock.report.t");
        assert_eq!(l.check_health(t0 + Duration::from_secs(5), timeout), Health::Fine);
        assert!(matches!(l.check_health(t0 + Duration::from_secs(6), timeout), Health::Dead(_)));
    }

    #[test]
    fn silence_is_probed_and_an_unanswered_probe_is_dead() {
        let (t0, timeout) = (Instant::now(), Duration::from_secs(5));
        let mut l = with_state(t0, true);
        // The greeting's OPTION_REQ is owed until answered; pretend it was.
        l.session = ClientSession::new(1024);
        assert_eq!(l.check_health(t0 + Duration::from_millis(2499), timeout), Health::Fine);
        assert_eq!(l.check_health(t0 + Duration::from_millis(2500), timeout), Health::Probe);
        l.session.probe(&mut l.output);
        assert_eq!(l.check_health(t0 + Duration::from_millis(4999), timeout), Health::Fine);
        assert!(l.is_lagging(t0 + Duration::from_millis(4999), timeout));
        assert!(matches!(l.check_health(t0 + timeout, timeout), Health::Dead(_)));
        // Any byte from gearmand counts as life.
        l.last_heard = t0 + Duration::from_secs(4);
        assert_eq!(l.check_health(t0 + Duration::from_secs(8), timeout), Health::Fine);
    }

    #[test]
    fn an_outage_is_told_once_then_on_change_then_once_a_minute() {
        let t0 = Instant::now();
        let mut l = link(t0);
        let refused = &LinkDown::Refused;
        assert_eq!(l.attempt_failed(t0, refused), OutageNote::First);
        for n in 1..100 {
            let at = t0 + Duration::from_millis(500 * n);
            assert_eq!(l.attempt_failed(at, refused), OutageNote::Quiet, "attempt {n}");
        }
        assert_eq!(l.attempt_failed(t0 + REMINDER_PERIOD, refused), OutageNote::Reminder);
        assert_eq!(l.attempt_failed(t0 + REMINDER_PERIOD, refused), OutageNote::Quiet);
        assert_eq!(
            l.attempt_failed(t0 + REMINDER_PERIOD, &LinkDown::TimedOut(Stage::Connect)),
            OutageNote::Changed
        );
        let outage = l.back().expect("an outage was going on");
        assert_eq!((outage.attempts, outage.since), (103, t0));
        assert!(l.back().is_none(), "back once");
        l.lost(t0, &LinkDown::ClosedByPeer);
        assert_eq!(
            l.attempt_failed(t0, refused),
            OutageNote::Changed,
            "after a loss, the first refusal is news"
        );
    }

    #[test]
    fn only_host_names_need_the_resolver_and_a_slow_lookup_times_out() {
        let t0 = Instant::now();
        assert!(link(t0).numeric.is_some());
        let mut l = GearmanLink::new("gearmand.internal:4730".into(), 0, Role::Active, 1024, t0);
        assert_eq!(l.numeric, None);
        l.resolving(t0);
        assert_eq!(l.status(), LinkStatus::Resolving);
        let timeout = Duration::from_secs(5);
        assert_eq!(l.check_health(t0 + Duration::from_millis(4999), timeout), Health::Fine);
        assert_eq!(l.check_health(t0 + timeout, timeout), Health::Dead(LinkDown::TimedOut(Stage::Lookup)));
    }
}
