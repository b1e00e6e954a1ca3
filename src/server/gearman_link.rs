//! `GearmanLink`: one connection to a gearmand in the loop: a mio socket, the sans-IO
//! `ClientSession`, its buffers, the connect/back-off state, and the health check that finds a
//! gearmand that stopped answering.
//!
//! Each gearmand gets `SLOTS_PER_SERVER` links. One is `Active` (it takes new work and
//! reconnects when lost); a connection retired for holding too many abandoned jobs stays open
//! as `Retiring` in another slot until its live jobs end; the rest are `Spare`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::io::Readiness;
use crate::buf::InBuf;
use crate::gearman::client::ClientSession;
use crate::gearman::packet::HEADER_BYTES;

/// Links per gearmand: the active one plus room for retiring ones.
pub const SLOTS_PER_SERVER: usize = 4;

/// While a gearmand stays unreachable, the operator is reminded this often.
pub const REMINDER_PERIOD: Duration = Duration::from_secs(60);

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
pub enum LinkState {
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
pub enum Role {
    /// The gearmand's connection for new work; reconnects when lost.
    Active,
    /// Retired: finishes its live jobs, then closes. Never reconnects.
    Retiring,
    /// Unused.
    Spare,
}

/// What the health check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Nothing to do.
    Fine,
    /// Silent for a while with nothing owed: send a probe (ECHO_REQ).
    Probe,
    /// Declared dead, with the reason.
    Dead(&'static str),
}

/// What the operator should hear about a failed attempt to reach a gearmand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageNote {
    /// The first failure of an outage: say it is unreachable, and why.
    First,
    /// The reason changed (refused, then timed out): say the new one.
    Changed,
    /// Still unreachable after `REMINDER_PERIOD`: remind, with the count of attempts.
    Reminder,
    /// Nothing new.
    Quiet,
}

/// A gearmand that cannot be reached: since when, how often tried, and why.
#[derive(Clone, Debug)]
pub struct Outage {
    /// When it was lost or first failed.
    pub since: Instant,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure's reason.
    pub reason: String,
    reminded: Instant,
}

/// One gearmand connection.
#[derive(Debug)]
pub struct GearmanLink {
    /// `HOST:PORT` as given on the command line.
    pub addr: String,
    /// The address when `addr` is numeric (no lookup needed).
    pub numeric: Option<SocketAddr>,
    /// A lookup was sent to the resolver and has not been answered yet.
    pub lookup_pending: bool,
    /// Set while the gearmand cannot be reached (operator logs).
    pub outage: Option<Outage>,
    /// Index of the gearmand (`--gearmand` order).
    pub server: usize,
    /// What this slot is for.
    pub role: Role,
    /// Connection state.
    pub state: LinkState,
    /// The protocol session (replaced on every reconnect).
    pub session: ClientSession,
    /// Bytes from gearmand not yet decoded.
    pub input: InBuf,
    /// Bytes for gearmand not yet written.
    pub output: Vec<u8>,
    /// Readiness and registered interest (the same model as a client's).
    pub io: Readiness,
    /// Failed attempts since the last success (drives the back-off).
    pub failures: u32,
    /// Successful connections so far.
    pub connects: u64,
    /// When the current state began (connect timeout) ...
    pub since: Instant,
    /// ... and when gearmand last sent us a byte (silence timeout).
    pub last_heard: Instant,
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

    /// The state's name, for `/healthz` and `/metrics`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            LinkState::Down => "disconnected",
            LinkState::Resolving => "resolving",
            LinkState::Connecting(_) | LinkState::Greeting(_) => "connecting",
            LinkState::Up(_) => "connected",
        }
    }

    /// True when jobs may be written.
    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up(_))
    }

    /// The socket, if any.
    pub fn sock(&mut self) -> Option<&mut TcpStream> {
        match &mut self.state {
            LinkState::Down | LinkState::Resolving => None,
            LinkState::Connecting(s) | LinkState::Greeting(s) | LinkState::Up(s) => Some(s),
        }
    }

    /// The host name is being looked up (by the resolver thread).
    pub fn resolving(&mut self, now: Instant) {
        self.state = LinkState::Resolving;
        self.since = now;
    }

    /// Starts a nonblocking connect to `addr` (never blocks: no name lookup here).
    pub fn start_connect(&mut self, addr: SocketAddr, now: Instant) -> std::io::Result<&mut TcpStream> {
        self.reset_buffers();
        self.since = now;
        self.state = LinkState::Connecting(TcpStream::connect(addr)?);
        match &mut self.state {
            LinkState::Connecting(s) => Ok(s),
            _ => unreachable!("set just above"),
        }
    }

    /// The TCP connect finished: greet gearmand (OPTION_REQ), open the report desk for `desk`
    /// (see `ClientSession::serve_reports`) and wait for the answer.
    pub fn connected(&mut self, now: Instant, desk: &[u8]) {
        let LinkState::Connecting(sock) = std::mem::replace(&mut self.state, LinkState::Down) else { return };
        let _ = sock.set_nodelay(true);
        self.state = LinkState::Greeting(sock);
        self.since = now;
        self.last_heard = now;
        self.io.can_read = true;
        self.session.start(&mut self.output);
        self.session.serve_reports(desk, &mut self.output);
    }

    /// gearmand answered: the link is up.
    pub fn greeted(&mut self, now: Instant) {
        let LinkState::Greeting(sock) = std::mem::replace(&mut self.state, LinkState::Down) else { return };
        self.state = LinkState::Up(sock);
        self.since = now;
        self.failures = 0;
        self.connects += 1;
    }

    /// Fresh session and buffers for a new connection (the old one's bytes mean nothing now).
    pub fn reset_buffers(&mut self) {
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
        match self.state {
            LinkState::Down => Health::Fine,
            LinkState::Resolving if elapsed(self.since) >= timeout => Health::Dead("name lookup timed out"),
            LinkState::Resolving => Health::Fine,
            LinkState::Connecting(_) if elapsed(self.since) >= timeout => Health::Dead("connect timed out"),
            LinkState::Greeting(_) if elapsed(self.since) >= timeout => {
                Health::Dead("connected, but gearmand did not answer in time")
            }
            LinkState::Connecting(_) | LinkState::Greeting(_) => Health::Fine,
            LinkState::Up(_) => {
                let silent = elapsed(self.last_heard);
                if self.session.awaiting_replies() > 0 {
                    if silent >= timeout {
                        return Health::Dead("gearmand owes replies and has said nothing in time");
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
    /// operator should hear about it. One line per outage, one per change of reason, and a
    /// reminder every `REMINDER_PERIOD`, however fast the attempts come.
    pub fn attempt_failed(&mut self, now: Instant, why: &str) -> OutageNote {
        let Some(outage) = &mut self.outage else {
            self.outage = Some(Outage { since: now, attempts: 1, reason: why.to_string(), reminded: now });
            return OutageNote::First;
        };
        outage.attempts = outage.attempts.saturating_add(1);
        if outage.reason != why {
            outage.reason = why.to_string();
            outage.reminded = now;
            OutageNote::Changed
        } else if now.saturating_duration_since(outage.reminded) >= REMINDER_PERIOD {
            outage.reminded = now;
            OutageNote::Reminder
        } else {
            OutageNote::Quiet
        }
    }

    /// The connection was lost: an outage begins (the loss itself is logged by the caller).
    pub fn lost(&mut self, now: Instant, why: &str) {
        self.outage = Some(Outage { since: now, attempts: 0, reason: why.to_string(), reminded: now });
    }

    /// gearmand answered again: the outage (if any) is over.
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
        let refused = "connection refused";
        assert_eq!(l.attempt_failed(t0, refused), OutageNote::First);
        for n in 1..100 {
            let at = t0 + Duration::from_millis(500 * n);
            assert_eq!(l.attempt_failed(at, refused), OutageNote::Quiet, "attempt {n}");
        }
        assert_eq!(l.attempt_failed(t0 + REMINDER_PERIOD, refused), OutageNote::Reminder);
        assert_eq!(l.attempt_failed(t0 + REMINDER_PERIOD, refused), OutageNote::Quiet);
        assert_eq!(l.attempt_failed(t0 + REMINDER_PERIOD, "connect timed out"), OutageNote::Changed);
        let outage = l.back().expect("an outage was going on");
        assert_eq!((outage.attempts, outage.since), (103, t0));
        assert!(l.back().is_none(), "back once");
        l.lost(t0, "gearmand closed the connection");
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
        assert_eq!(l.state_name(), "resolving");
        let timeout = Duration::from_secs(5);
        assert_eq!(l.check_health(t0 + Duration::from_millis(4999), timeout), Health::Fine);
        assert_eq!(l.check_health(t0 + timeout, timeout), Health::Dead("name lookup timed out"));
    }
}
