//! `Conn`: what the shell keeps for one client: the socket, its readiness, the one timer entry,
//! and the sans-IO [`Connection`] that decides everything else. It only holds them: `clients`
//! acts on them, and nothing here does I/O or decides.

use std::net::{IpAddr, SocketAddr};
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
    /// The peer's address, kept as its parts: an `IpAddr` packs into 17 bytes where a
    /// `SocketAddr` takes 32 (see [`Conn::peer`]).
    ip: IpAddr,
    port: u16,
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
        let (ip, port) = (peer.ip(), peer.port());
        Conn { sock, generation, ip, port, conn, io, timer: None, listed: Listed::default(), admin: false }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// The peer's IP address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// This connection's id.
    pub fn id(&self, key: usize) -> ConnId {
        ConnId { key: key as u32, generation: self.generation }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// Every open connection holds one slab slot, one timer entry and one client record of
    /// the App: issue 22 brought an idle one from 1,320 bytes to about 250. These bounds keep
    /// the slot's parts from growing back unnoticed (the wheel's entry is checked in `wheel`).
    #[test]
    fn an_idle_connection_stays_small() {
        assert!(size_of::<crate::ws::Ws>() <= 24, "Ws: {}", size_of::<crate::ws::Ws>());
        let connection = size_of::<crate::connection::Connection>();
        assert!(connection <= 64, "Connection: {connection}");
        let conn = size_of::<super::Conn>();
        assert!(conn <= 128, "Conn: {conn}");
        let slot = size_of::<Option<super::Conn>>();
        assert!(slot <= 128, "slab slot: {slot}");
    }
}
