//! `Conn`: what the shell keeps for one client: the socket, its readiness, the one timer entry,
//! and the sans-IO [`Connection`] that decides everything else. It only holds them: `clients`
//! acts on them, and nothing here does I/O or decides.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::io::Readiness;
use crate::app::ConnId;
use crate::connection::Connection;
use crate::wheel::TimerKey;

/// Which of the loop's per-pass lists a client is on (so it is listed once).
#[derive(Debug, Default)]
pub(crate) struct Listed {
    /// Unread input: `ready`.
    pub ready: bool,
    /// Output to write or an end to act on: `dirty`.
    pub dirty: bool,
    /// Output left after its last write: `backlog`.
    pub backlog: bool,
    /// Unfinished input held after its last read: `held`.
    pub held: bool,
}

/// A client's armed timer, and the deadline it was armed for (a later deadline keeps it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Armed {
    /// The wheel's entry.
    pub key: TimerKey,
    /// The deadline the connection asked for.
    pub at: Instant,
}

/// One client connection, as the loop holds it.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The socket, registered for READABLE (plus WRITABLE while a write is blocked).
    pub sock: TcpStream,
    /// Generation of this slab slot.
    pub generation: u32,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Its protocol and life.
    pub conn: Connection,
    /// Readiness and registered interest.
    pub io: Readiness,
    /// The one timer entry. It may fire early (the deadline moved later): the connection then
    /// does nothing and the timer is set again.
    pub timer: Option<Armed>,
    /// Lists it is on this pass.
    pub listed: Listed,
    /// Accepted on the admin listener: its pages only, never a WebSocket.
    pub admin: bool,
}

impl Conn {
    /// A freshly accepted connection, registered as `io` says.
    pub fn new(sock: TcpStream, generation: u32, peer: SocketAddr, conn: Connection, io: Readiness) -> Self {
        Conn { sock, generation, peer, conn, io, timer: None, listed: Listed::default(), admin: false }
    }

    /// This connection's id.
    pub fn id(&self, key: usize) -> ConnId {
        ConnId { key: key as u32, generation: self.generation }
    }
}
