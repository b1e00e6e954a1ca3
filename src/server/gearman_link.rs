//! `GearmanLink`: one gearmand connection in the loop: a mio socket, the sans-IO
//! `ClientSession`, its buffers, and the connect/back-off state.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use mio::net::TcpStream;

use crate::buf::InBuf;
use crate::gearman::client::ClientSession;

/// Where a link is.
///
/// ```text
/// Down --timer--> Connecting --writable, no error--> Up --error/EOF/garbage--> Down
///                     |                                                        ^
///                     +----------------connect failed-----------------------+
/// ```
#[derive(Debug)]
pub enum LinkState {
    /// Not connected; a reconnect timer is armed.
    Down,
    /// Nonblocking connect in progress.
    Connecting(TcpStream),
    /// Connected; jobs go here.
    Up(TcpStream),
}

/// One gearmand server.
#[derive(Debug)]
pub struct GearmanLink {
    /// `HOST:PORT` as given on the command line.
    pub addr: String,
    /// Connection state.
    pub state: LinkState,
    /// The protocol session (replaced on every reconnect).
    pub session: ClientSession,
    /// Bytes from gearmand not yet decoded.
    pub input: InBuf,
    /// Bytes for gearmand not yet written.
    pub output: Vec<u8>,
    /// A readable edge arrived and reading has not hit WouldBlock since.
    pub can_read: bool,
    /// epoll reported gearmand's FIN: read until EOF instead of stopping at a short read.
    pub hup_seen: bool,
    /// The last write hit WouldBlock.
    pub write_blocked: bool,
    /// Failed attempts since the last success (drives the back-off).
    pub failures: u32,
    /// Successful connections so far.
    pub connects: u64,
    max_body: usize,
}

impl GearmanLink {
    /// A link that is down and will be connected by the loop.
    pub fn new(addr: String, max_body: usize) -> Self {
        GearmanLink {
            addr,
            state: LinkState::Down,
            session: ClientSession::new(max_body),
            input: InBuf::new(max_body + 12),
            output: Vec::new(),
            can_read: false,
            hup_seen: false,
            write_blocked: false,
            failures: 0,
            connects: 0,
            max_body,
        }
    }

    /// The state's name, for `/healthz` and `/metrics`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            LinkState::Down => "disconnected",
            LinkState::Connecting(_) => "connecting",
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
            LinkState::Down => None,
            LinkState::Connecting(s) | LinkState::Up(s) => Some(s),
        }
    }

    /// Starts a nonblocking connect. Name resolution is the one blocking step; with the usual
    /// numeric `HOST:PORT` it does not touch the network.
    pub fn start_connect(&mut self) -> std::io::Result<&mut TcpStream> {
        let addr: SocketAddr = self.addr.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")
        })?;
        self.reset_buffers();
        self.state = LinkState::Connecting(TcpStream::connect(addr)?);
        match &mut self.state {
            LinkState::Connecting(s) => Ok(s),
            _ => unreachable!("set just above"),
        }
    }

    /// Fresh session and buffers for a new connection (the old one's bytes mean nothing now).
    pub fn reset_buffers(&mut self) {
        self.session = ClientSession::new(self.max_body);
        self.input = InBuf::new(self.max_body + 12);
        self.output = Vec::new();
        self.can_read = false;
        self.hup_seen = false;
        self.write_blocked = false;
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

    #[test]
    fn backoff_doubles_caps_and_jitters_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut link = GearmanLink::new("127.0.0.1:1".into(), 1024);
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
}
