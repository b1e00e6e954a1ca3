//! `Conn`: one client socket, its protocol state (`Ws`) and the bookkeeping the loop needs:
//! readiness bits, interest, the one timer it owns, and why it is closing.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::app::ConnId;
use crate::logging::Event;
use crate::wheel::TimerKey;
use crate::ws::Ws;

/// Why a connection ends; logged once at `debug`, and counted for the operator's summary
/// unless it is an ordinary goodbye.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed (close frame, FIN after an HTTP answer).
    PeerClosed,
    /// The peer hung up without a close frame (FIN before a request or mid-session).
    Abrupt,
    /// A socket error.
    Io(std::io::ErrorKind),
    /// The peer broke HTTP or WebSocket rules (the code it was sent).
    Protocol(u16),
    /// A reader that does not read: over the hard output limit, over the soft one for too
    /// long, or the largest backlog when all clients together are over the total.
    OutputLimit,
    /// No request head within the handshake timeout.
    HandshakeTimeout,
    /// Silent through a keepalive ping.
    IdleTimeout,
    /// Our close frame or HTTP answer went out and the peer did not hang up in time.
    CloseTimeout,
    /// SIGINT/SIGTERM.
    Shutdown,
    /// A plain HTTP request was answered.
    HttpDone,
}

impl CloseReason {
    /// The summary this end counts towards (`None`: an ordinary goodbye). `handshaking`: the
    /// connection never became a WebSocket.
    pub fn event(&self, handshaking: bool) -> Option<Event> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        let gone = if handshaking { Event::LeftBeforeHandshake } else { Event::LeftWithoutClose };
        match self {
            CloseReason::PeerClosed | CloseReason::HttpDone | CloseReason::Shutdown => None,
            CloseReason::Abrupt => Some(gone),
            CloseReason::Io(ConnectionReset | BrokenPipe | ConnectionAborted) => Some(gone),
            CloseReason::Io(_) => Some(Event::SocketError),
            CloseReason::Protocol(_) => Some(Event::Protocol),
            CloseReason::OutputLimit => Some(Event::SlowReader),
            CloseReason::HandshakeTimeout => Some(Event::HandshakeTimeout),
            CloseReason::IdleTimeout => Some(Event::IdleTimeout),
            CloseReason::CloseTimeout => Some(Event::CloseTimeout),
        }
    }
}

/// Where the socket is, apart from the protocol.
///
/// ```text
/// Live --(close frame / HTTP answer queued)--> Draining --(output written, write side shut)-->
///      Lingering --(peer's EOF or close timeout)--> Dead
/// Live/Draining --(socket error, slow reader, abrupt EOF)--> Dead
/// ```
/// Lingering reads and discards until the peer hangs up, so that our last bytes are not
/// destroyed by a reset (closing a socket with unread input sends RST).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// Reading and writing.
    Live,
    /// Writing what is queued, then shutting the write side.
    Draining,
    /// Write side shut; discarding input until EOF.
    Lingering,
    /// To be deregistered and removed at the end of this pass.
    Dead,
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket, registered for READABLE (plus WRITABLE while a write is blocked).
    pub sock: TcpStream,
    /// Generation of this slab slot.
    pub generation: u32,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Protocol state and buffers.
    pub ws: Ws,
    /// A readable edge arrived and reading has not hit WouldBlock since.
    pub can_read: bool,
    /// The last write hit WouldBlock; wait for a writable event.
    pub write_blocked: bool,
    /// WRITABLE is in the registered interest.
    pub writable_interest: bool,
    /// In the loop's `ready` list this pass (dedup).
    pub in_ready: bool,
    /// In the loop's `dirty` list this pass (dedup).
    pub in_dirty: bool,
    /// Where the socket is.
    pub life: Life,
    /// Why it is closing, once it is.
    pub reason: Option<CloseReason>,
    /// The one timer this connection owns (handshake, idle, close).
    pub timer: Option<TimerKey>,
    /// Last time bytes arrived.
    pub last_seen: Instant,
    /// A keepalive ping is out and unanswered.
    pub pinged: bool,
    /// The peer sent FIN (read returned 0).
    pub peer_eof: bool,
    /// epoll signalled the peer's FIN (read-closed); reads must go on until they return 0.
    pub hup_seen: bool,
    /// The timer now holds the close deadline (set once the connection leaves `Live`).
    pub close_armed: bool,
    /// Output has been above the soft limit since then.
    pub over_soft_since: Option<Instant>,
    /// In the loop's `backlog` list (output left after the last write).
    pub in_backlog: bool,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(sock: TcpStream, generation: u32, peer: SocketAddr, now: Instant) -> Self {
        Conn {
            sock,
            generation,
            peer,
            ws: Ws::new(),
            can_read: true, // a connection may arrive with its request already queued
            write_blocked: false,
            writable_interest: false,
            in_ready: false,
            in_dirty: false,
            life: Life::Live,
            reason: None,
            timer: None,
            last_seen: now,
            pinged: false,
            peer_eof: false,
            hup_seen: false,
            close_armed: false,
            over_soft_since: None,
            in_backlog: false,
        }
    }

    /// This connection's id.
    pub fn id(&self, key: usize) -> ConnId {
        ConnId { key: key as u32, generation: self.generation }
    }

    /// Starts an orderly end: what is queued is written, then the write side is shut.
    pub fn drain(&mut self, reason: CloseReason) {
        if self.life == Life::Live {
            self.life = Life::Draining;
            self.reason.get_or_insert(reason);
        }
    }

    /// Ends it now (nothing more is written).
    pub fn kill(&mut self, reason: CloseReason) {
        self.life = Life::Dead;
        self.reason.get_or_insert(reason);
    }
}
