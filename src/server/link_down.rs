//! Why a gearmand link is down ([`LinkDown`]) and what the operator hears of an outage
//! ([`OutageNote`]). Reasons are data: decisions compare kinds, and the text is made only for a
//! log line or a page. It must not log, nor hold a socket.

use std::fmt;
use std::time::{Duration, Instant};

use super::io::Fault;
use crate::gearman::packet::ProtocolError;

/// While a gearmand stays unreachable, the operator is reminded this often.
pub(crate) const REMINDER_PERIOD: Duration = Duration::from_secs(60);

/// The step of reaching a gearmand that took too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The host name lookup.
    Lookup,
    /// The TCP connect.
    Connect,
    /// gearmand's first answer (to OPTION_REQ).
    Greeting,
}

/// The socket call that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// connect(2) or its completion.
    Connect,
    /// A read.
    Read,
    /// A write.
    Write,
    /// Changing the registered interest (epoll_ctl).
    Interest,
}

/// Why a link went down or an attempt failed. Decisions compare kinds ([`LinkDown::same_kind`]);
/// the text (`Display`) is only for log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LinkDown {
    /// The connect was refused: nothing listens there.
    Refused,
    /// A step took longer than `--gearmand-timeout-ms` (or the kernel's connect timeout).
    TimedOut(Stage),
    /// The name has no address (the resolver's words, when it had some).
    NameNotFound(Option<String>),
    /// A host name, but no resolver thread to look it up.
    NoResolver,
    /// gearmand closed the connection.
    ClosedByPeer,
    /// Up, replies owed, and not one byte from gearmand within the timeout.
    Silent,
    /// gearmand sent what the protocol does not allow.
    Protocol(ProtocolError),
    /// A socket call failed.
    Io(Op, Fault),
}

impl LinkDown {
    /// An outage's reason "changed" only when its kind did, not its words: the stage of a
    /// timeout and the call and `ErrorKind` of a socket error count; a resolver's message, a
    /// protocol error's details and an errno's text do not.
    pub fn same_kind(&self, other: &Self) -> bool {
        match (self, other) {
            (LinkDown::TimedOut(a), LinkDown::TimedOut(b)) => a == b,
            (LinkDown::Io(a, x), LinkDown::Io(b, y)) => a == b && x.same_kind(*y),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl fmt::Display for LinkDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkDown::Refused => f.write_str("connection refused (is gearmand running and listening there?)"),
            LinkDown::TimedOut(Stage::Lookup) => f.write_str("name lookup timed out"),
            LinkDown::TimedOut(Stage::Connect) => f.write_str("connect timed out"),
            LinkDown::TimedOut(Stage::Greeting) => {
                f.write_str("connected, but gearmand did not answer in time")
            }
            LinkDown::NameNotFound(Some(words)) => f.write_str(words),
            LinkDown::NameNotFound(None) => f.write_str("name not found"),
            LinkDown::NoResolver => f.write_str("no resolver thread"),
            LinkDown::ClosedByPeer => f.write_str("gearmand closed the connection"),
            LinkDown::Silent => f.write_str("gearmand owes replies and has said nothing in time"),
            LinkDown::Protocol(e) => write!(f, "protocol error: {e}"),
            LinkDown::Io(Op::Connect, e) => write!(f, "connect failed: {e}"),
            LinkDown::Io(Op::Read, e) => write!(f, "read failed: {e}"),
            LinkDown::Io(Op::Write, e) => write!(f, "write failed: {e}"),
            LinkDown::Io(Op::Interest, e) => write!(f, "cannot change its poll interest: {e}"),
        }
    }
}

/// What the operator should hear about a failed attempt to reach a gearmand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutageNote {
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
pub(crate) struct Outage {
    /// When it was lost or first failed.
    pub since: Instant,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure's reason.
    pub reason: LinkDown,
    reminded: Instant,
}

impl Outage {
    /// An outage that began `now`, after `attempts` failed attempts.
    pub fn new(now: Instant, attempts: u32, why: &LinkDown) -> Outage {
        Outage { since: now, attempts, reason: why.clone(), reminded: now }
    }

    /// One more failed attempt: news when its reason is of another kind than the last (see
    /// [`LinkDown::same_kind`]), a reminder every `REMINDER_PERIOD`, quiet otherwise.
    pub fn attempt_failed(&mut self, now: Instant, why: &LinkDown) -> OutageNote {
        self.attempts = self.attempts.saturating_add(1);
        if !self.reason.same_kind(why) {
            self.reason = why.clone();
            self.reminded = now;
            OutageNote::Changed
        } else if now.saturating_duration_since(self.reminded) >= REMINDER_PERIOD {
            self.reason = why.clone();
            self.reminded = now;
            OutageNote::Reminder
        } else {
            OutageNote::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_news_only_when_its_kind_changes() {
        let lookup = |words: &str| LinkDown::NameNotFound(Some(format!("name not found: {words}")));
        assert!(lookup("try again").same_kind(&lookup("no such host")), "the resolver's words vary");
        let reset = |errno| LinkDown::Io(Op::Read, Fault::from(std::io::Error::from_raw_os_error(errno)));
        assert!(reset(104).same_kind(&reset(104)) && !reset(104).same_kind(&reset(32)), "ECONNRESET, EPIPE");
        assert!(!reset(104).same_kind(&LinkDown::ClosedByPeer));
        assert!(!LinkDown::TimedOut(Stage::Connect).same_kind(&LinkDown::TimedOut(Stage::Greeting)));
        assert_eq!(
            LinkDown::TimedOut(Stage::Greeting).to_string(),
            "connected, but gearmand did not answer in time"
        );
        assert_eq!(lookup("x").to_string(), "name not found: x");
    }
}
