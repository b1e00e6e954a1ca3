//! Every socket call of the server: `fill()`, `discard()`, `write_some()`/`flush()`, `accept`,
//! `wait`, the end of a nonblocking connect, and the registered interest ([`Readiness`]).
//!
//! It owns the meaning of `io::ErrorKind`: no other file under `server/` reads one. A call
//! comes back as an [`Io`] (or [`Accept`]), or as a [`Fault`] that ends the connection, whose
//! kind the caller may compare and whose words go to the log. It must not decide what a failure
//! means for a client or a link: that is the caller's.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::event::Source;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

use super::link_down::{LinkDown, Op, Stage};
use crate::buf::InBuf;

/// A socket error that ends a connection or link: its kind decides, its words (the OS's, as
/// `io::Error` shows them) are for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    kind: ErrorKind,
    errno: Option<i32>,
}

impl Fault {
    /// What kind of error it was (for `CloseReason::Io`).
    pub fn kind(self) -> ErrorKind {
        self.kind
    }

    /// The same kind of error, whatever its words.
    pub fn same_kind(self, other: Fault) -> bool {
        self.kind == other.kind
    }
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault { kind: e.kind(), errno: e.raw_os_error() }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(n) => io::Error::from_raw_os_error(n).fmt(f),
            None => io::Error::from(self.kind).fmt(f),
        }
    }
}

/// How a read or write loop stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Io {
    /// We stopped (buffer full, nothing left to write, budget spent): the socket may still be
    /// ready, and mio will not say so again, so the caller must come back by itself.
    Paused,
    /// The socket said WouldBlock: readiness is used up until the next event.
    Blocked,
    /// Read returned 0: the peer will send nothing more.
    Eof,
}

/// Reads into `input` until WouldBlock, EOF, the buffer's limit or `budget` bytes.
/// `scratch` is a reusable buffer shared by all connections (no per-read zeroing).
///
/// With `short_read_drains`, a read that returns less than it asked for counts as `Blocked`:
/// the kernel had no more bytes at that moment, and any that arrive later raise a new edge
/// (epoll(7) says as much). That saves the extra read that would only return WouldBlock: one
/// syscall per batch on a busy connection. The caller passes false once the peer's FIN has been
/// signalled (that edge is already consumed, so EOF must be read now).
pub(crate) fn fill(
    sock: &mut impl Read,
    input: &mut InBuf,
    scratch: &mut [u8],
    budget: usize,
    short_read_drains: bool,
) -> Result<(Io, usize), Fault> {
    let mut total = 0;
    loop {
        let room = input.room().min(budget - total).min(scratch.len());
        if room == 0 {
            return Ok((Io::Paused, total));
        }
        match sock.read(&mut scratch[..room]) {
            Ok(0) => return Ok((Io::Eof, total)),
            Ok(n) => {
                input.extend(&scratch[..n]);
                total += n;
                if short_read_drains && n < room {
                    return Ok((Io::Blocked, total));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Io::Blocked, total)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads and drops what a closing peer still sends, at most `scratch.len()` times 16 bytes per
/// call (a pass's budget), until WouldBlock or EOF.
pub(crate) fn discard(sock: &mut impl Read, scratch: &mut [u8]) -> Result<(Io, usize), Fault> {
    let mut total = 0;
    for _ in 0..16 {
        match sock.read(scratch) {
            Ok(0) => return Ok((Io::Eof, total)),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Io::Blocked, total)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((Io::Paused, total))
}

/// Writes `out` until all of it is written or the socket would block, and says how many bytes
/// went out; the caller drops them (`Ws::consume_output` tracks frame boundaries as it does).
/// On an error the count is lost: the connection is beyond saving anyway.
pub(crate) fn write_some(sock: &mut impl Write, out: &[u8]) -> Result<(Io, usize), Fault> {
    let mut written = 0;
    while written < out.len() {
        match sock.write(&out[written..]) {
            Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero).into()),
            Ok(n) => written += n, // partial writes are normal: the caller keeps the tail
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Io::Blocked, written)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((Io::Paused, written))
}

/// Writes `out` until it is empty or the socket would block; keeps the unwritten tail.
pub(crate) fn flush(sock: &mut impl Write, out: &mut Vec<u8>) -> Result<Io, Fault> {
    let (io, written) = write_some(sock, out)?;
    out.drain(..written);
    Ok(io)
}

/// What epoll told us about a socket, and what we asked it for: one model for clients and
/// gearmand links. Edge-triggered: a readable edge stays noted until a read hits WouldBlock (or
/// the end); a write that hits WouldBlock waits for the next writable edge. The fields are
/// private: an event sets a bit, only a call's [`Io`] clears it, and the interest is derived
/// here, from what the owner wants, and nowhere else.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    /// A readable edge arrived and reading has not hit WouldBlock since.
    can_read: bool,
    /// epoll reported the peer's FIN: read until end-of-file instead of stopping at a short read.
    hup_seen: bool,
    /// The last write hit WouldBlock (or a connect is in progress).
    write_blocked: bool,
    /// WRITABLE is in the registered interest (it is added only while output waits).
    writable_registered: bool,
}

impl Readiness {
    /// Registers `src`: READABLE, plus WRITABLE when `wants_write` (a connect in progress).
    /// A freshly accepted or connected socket may already hold bytes: it counts as readable,
    /// since the edge that announced them may have come before the registration.
    pub fn register(
        &mut self,
        reg: &Registry,
        src: &mut impl Source,
        token: Token,
        wants_write: bool,
    ) -> io::Result<()> {
        reg.register(src, token, interest(wants_write))?;
        *self = Readiness { can_read: !wants_write, write_blocked: wants_write, ..Readiness::default() };
        self.writable_registered = wants_write;
        Ok(())
    }

    /// A connect finished: the socket is read at once (gearmand may have answered already).
    pub fn connected(&mut self) {
        self.can_read = true;
    }

    /// Notes one epoll event; returns (readable news, writable news).
    pub fn note(&mut self, event: &mio::event::Event) -> (bool, bool) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        if readable {
            self.can_read = true;
            self.hup_seen |= event.is_read_closed() || event.is_error();
        }
        let writable = event.is_writable() || event.is_error();
        if writable {
            self.write_blocked = false;
        }
        (readable, writable)
    }

    /// A read is to be tried without a new edge (bytes may have come since the last read ran
    /// dry); the read's [`Io`] clears it again, as for an edge.
    pub fn assume_readable(&mut self) {
        self.can_read = true;
    }

    /// A readable edge is still unused.
    pub fn can_read(&self) -> bool {
        self.can_read
    }

    /// Whether a read may stop at a short read (see [`fill`]): not once the FIN was signalled.
    pub fn short_read_drains(&self) -> bool {
        !self.hup_seen
    }

    /// A read stopped this way: `Blocked` and `Eof` use the edge up; `Paused` keeps it.
    pub fn read(&mut self, io: Io) {
        if io != Io::Paused {
            self.can_read = false;
        }
    }

    /// Writing now would only hit WouldBlock again.
    pub fn write_blocked(&self) -> bool {
        self.write_blocked
    }

    /// A write stopped this way: `Blocked` waits for the next writable edge.
    pub fn wrote(&mut self, io: Io) {
        self.write_blocked = io == Io::Blocked;
    }

    /// WRITABLE exactly while the owner has bytes waiting; no system call when nothing changed.
    /// An error is returned, not dropped: a socket whose interest is wrong may never wake again,
    /// so the caller ends that connection.
    pub fn sync_interest(
        &mut self,
        reg: &Registry,
        src: &mut impl Source,
        token: Token,
        wants_write: bool,
    ) -> Result<(), Fault> {
        if wants_write != self.writable_registered {
            reg.reregister(src, token, interest(wants_write))?;
            self.writable_registered = wants_write;
        }
        Ok(())
    }
}

/// The interest to register: always READABLE, and WRITABLE while the socket's owner has bytes
/// it could not write (or a connect to finish).
fn interest(wants_write: bool) -> Interest {
    if wants_write { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE }
}

/// Shuts our write side once every byte is out (the lingering close: the peer sees EOF after
/// our last frame, and we read on until it hangs up). A failure needs no answer: the socket is
/// dropped at reaping either way.
pub(crate) fn shutdown_write(sock: &TcpStream) {
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Waits for events (up to `timeout`); a signal's interruption just returns with none.
pub(crate) fn wait(poll: &mut Poll, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
    match poll.poll(events, timeout) {
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        result => result,
    }
}

/// What one `accept` gave.
#[derive(Debug)]
pub(crate) enum Accept {
    /// A new connection.
    Got((TcpStream, SocketAddr)),
    /// WouldBlock: the backlog is empty until the next readable event.
    Drained,
    /// Interrupted, or the peer gave up while queued: try the next one.
    Again,
    /// Out of descriptors or memory (EMFILE, ENFILE, ENOMEM): the backlog stays readable, so
    /// retrying at once would spin.
    Failed(io::Error),
}

/// Accepts one connection.
pub(crate) fn accept(listener: &TcpListener) -> Accept {
    match listener.accept() {
        Ok(pair) => Accept::Got(pair),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Accept::Drained,
        Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => Accept::Again,
        Err(e) => Accept::Failed(e),
    }
}

/// Where a nonblocking connect stands once the socket reported writable (or an error):
/// `take_error` says whether it failed, `peer_addr` whether it is really connected yet.
/// Ok(true): connected; Ok(false): still in progress.
pub(crate) fn connect_outcome(sock: &TcpStream) -> Result<bool, LinkDown> {
    match (sock.take_error(), sock.peer_addr()) {
        (Ok(None), Ok(_)) => Ok(true),
        (Ok(None), Err(e)) if e.kind() == ErrorKind::NotConnected => Ok(false),
        (Ok(Some(e)) | Err(e), _) | (_, Err(e)) => Err(connect_failure(e)),
    }
}

/// Why a connect failed: refused and timed out are told apart (an operator acts on each).
pub(crate) fn connect_failure(e: io::Error) -> LinkDown {
    match e.kind() {
        ErrorKind::ConnectionRefused => LinkDown::Refused,
        ErrorKind::TimedOut => LinkDown::TimedOut(Stage::Connect),
        _ => LinkDown::Io(Op::Connect, e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most 3 bytes per write, then blocks after `cap` bytes.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
    }
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.got.len() >= self.cap {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(3).min(self.cap - self.got.len());
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_the_tail() {
        let mut sock = Trickle { got: vec![], cap: 7 };
        let mut out = b"0123456789".to_vec();
        assert_eq!(flush(&mut sock, &mut out).unwrap(), Io::Blocked);
        assert_eq!(out, b"789");
        sock.cap = 100;
        assert_eq!(flush(&mut sock, &mut out).unwrap(), Io::Paused);
        assert_eq!(sock.got, b"0123456789");
    }

    #[test]
    fn write_some_counts_and_leaves_the_buffer_alone() {
        let mut sock = Trickle { got: vec![], cap: 7 };
        let out = b"0123456789";
        assert_eq!(write_some(&mut sock, out).unwrap(), (Io::Blocked, 7));
        sock.cap = 100;
        assert_eq!(write_some(&mut sock, &out[7..]).unwrap(), (Io::Paused, 3));
        assert_eq!(write_some(&mut sock, b"").unwrap(), (Io::Paused, 0));
        assert_eq!(sock.got, out);
    }

    #[test]
    fn fill_stops_at_budget_and_eof() {
        let mut input = InBuf::new(100);
        let mut scratch = [0u8; 4];
        let mut src: &[u8] = b"abcdefgh";
        assert_eq!(fill(&mut src, &mut input, &mut scratch, 6, false).unwrap(), (Io::Paused, 6));
        assert_eq!(fill(&mut src, &mut input, &mut scratch, 6, false).unwrap(), (Io::Eof, 2));
        assert_eq!(input.data(), b"abcdefgh");
    }

    #[test]
    fn a_short_read_counts_as_drained() {
        let mut input = InBuf::new(100);
        let mut scratch = [0u8; 4];
        let mut src: &[u8] = b"abcdef";
        assert_eq!(fill(&mut src, &mut input, &mut scratch, 64, true).unwrap(), (Io::Blocked, 6));
    }
}
