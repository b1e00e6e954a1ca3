//! The in-process baselines: servers on one mio thread inside the bench process, on
//! `127.0.0.1:0`, each doing the least a server of its kind can do, so the real server's
//! figures read as a ratio of what this machine and the bench allow.
//!
//! - the line echo (`roundtrip --baseline`): every complete line goes straight back, no
//!   WebSocket, JSON or application in the way;
//! - the upgrade acceptor (`connect --baseline`): accepts, reads the HTTP upgrade request to its
//!   blank line, answers a canned `101 Switching Protocols` with the right
//!   `Sec-WebSocket-Accept`, and keeps the connection open, idle, ignoring whatever else comes.
//!
//! Both are built like the real server (one thread, edge-triggered, read until drained, one
//! write per readiness) and share the thread, the listener and the event loop; a [`Peer`] is
//! what each does with one connection.
//!
//! The acceptor runs in a child process, `gearsock bench acceptor` ([`AcceptorProcess`]): it
//! holds the other end of every connection the bench holds, and one process's open-file limit
//! (often 20,000) could not hold both ends of 10,000 or 19,000 connections. The line echo's
//! runs have far fewer connections and stay in this process.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::sys;
use super::wire::MAX_HEAD_BYTES;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);

/// A running baseline server; stopped by [`BaselineServer::stop`] or on drop.
#[derive(Debug)]
pub struct BaselineServer {
    /// What it is, for error messages: "echo server", "upgrade acceptor".
    what: &'static str,
    addr: SocketAddr,
    /// The serving thread's id, whose CPU time the baseline reports.
    thread_id: Option<u32>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl BaselineServer {
    /// The line echo, pinned to `cpus` when given.
    pub fn echo(cpus: Option<Vec<usize>>) -> Result<BaselineServer, String> {
        Self::start::<EchoConn>("echo server", "bench-echo", cpus)
    }

    /// The upgrade acceptor, pinned to `cpus` when given.
    pub fn upgrade_acceptor(cpus: Option<Vec<usize>>) -> Result<BaselineServer, String> {
        Self::start::<UpgradeConn>("upgrade acceptor", "bench-acceptor", cpus)
    }

    /// Listens on `127.0.0.1:0` and serves `P` on a new thread, pinned to `cpus` when given.
    fn start<P: Peer>(
        what: &'static str,
        name: &str,
        cpus: Option<Vec<usize>>,
    ) -> Result<BaselineServer, String> {
        let fail = |e: io::Error| format!("baseline {what}: {e}");
        let mut listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        let poll = Poll::new().map_err(fail)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE).map_err(fail)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(fail)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (pinned_tx, pinned_rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let handle = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let pinned = cpus.map_or(Ok(()), |cpus| {
                    sys::pin_current_thread(&cpus).map_err(|e| format!("pinning the {what} to {cpus:?}: {e}"))
                });
                let ok = pinned.is_ok();
                let _ = pinned_tx.send(pinned.map(|()| sys::current_thread_id()));
                if ok { serve::<P>(what, poll, &listener, &thread_stop) } else { Ok(()) }
            })
            .map_err(fail)?;
        let mut server = BaselineServer { what, addr, thread_id: None, stop, waker, handle: Some(handle) };
        server.thread_id = pinned_rx.recv().map_err(|_| format!("baseline {what} ended at once"))??;
        Ok(server)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where to read the serving thread's CPU time.
    pub fn cpu_probe(&self) -> Option<sys::CpuProbe> {
        self.thread_id.map(sys::CpuProbe::Thread)
    }

    /// Stops the thread (closing every connection it holds) and waits for it.
    pub fn stop(mut self) -> Result<(), String> {
        self.signal();
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(format!("baseline {} panicked", self.what)),
            None => Ok(()),
        }
    }

    fn signal(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.signal();
    }
}

/// The upgrade acceptor in a child process (`gearsock bench acceptor`, this same executable);
/// it serves until [`AcceptorProcess::stop`] closes its stdin (or this process ends), and is
/// killed if dropped unstopped.
#[derive(Debug)]
pub struct AcceptorProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    cpus: Option<Vec<usize>>,
}

impl AcceptorProcess {
    /// Starts it and waits until it listens. It picks its CPUs as the in-process baselines
    /// do: `baseline_cpu`, else the CPUs of `pid`, else unpinned.
    pub fn start(pid: Option<u32>, baseline_cpu: Option<usize>) -> Result<AcceptorProcess, String> {
        let fail = |e: io::Error| format!("baseline upgrade acceptor process: {e}");
        let exe = std::env::current_exe().map_err(fail)?;
        let mut command = Command::new(exe);
        command.args(["bench", "acceptor"]);
        if let Some(pid) = pid {
            command.args(["--pid", &pid.to_string()]);
        }
        if let Some(cpu) = baseline_cpu {
            command.args(["--baseline-cpu", &cpu.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(fail)?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        let read = match child.stdout.take() {
            Some(out) => BufReader::new(out).read_line(&mut line),
            None => Ok(0),
        };
        let ready = read.map_err(fail).and_then(|_| {
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|_| format!("baseline upgrade acceptor process did not start: {:?}", line.trim()))?;
            let addr = v["addr"].as_str().and_then(|a| a.parse().ok());
            let cpus = serde_json::from_value(v["cpus"].clone()).ok();
            addr.map(|addr| (addr, cpus)).ok_or_else(|| format!("baseline upgrade acceptor process said {v}"))
        });
        let mut process =
            AcceptorProcess { child, stdin, addr: SocketAddr::from(([127, 0, 0, 1], 0)), cpus: None };
        // On an error, the drop kills and reaps the child.
        (process.addr, process.cpus) = ready?;
        Ok(process)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CPUs it was pinned to, if any.
    pub fn cpus(&self) -> Option<&[usize]> {
        self.cpus.as_deref()
    }

    /// Closes its stdin (it closes every connection and exits) and waits for it.
    pub fn stop(mut self) -> Result<(), String> {
        drop(self.stdin.take());
        match self.child.wait() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("baseline upgrade acceptor process: {status}")),
            Err(e) => Err(format!("baseline upgrade acceptor process: {e}")),
        }
    }
}

impl Drop for AcceptorProcess {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a baseline server does with one accepted connection.
trait Peer: Sized {
    /// The interest it is registered with.
    const INTEREST: Interest;
    /// A connection just accepted.
    fn new(sock: TcpStream) -> Self;
    /// Its socket.
    fn sock(&mut self) -> &mut TcpStream;
    /// Handles one readiness event; `scratch` is the thread's read buffer. False: close it.
    /// `registry` is for a peer that must change its interest.
    fn ready(&mut self, token: Token, registry: &mio::Registry, scratch: &mut [u8]) -> io::Result<bool>;
}

fn serve<P: Peer>(
    what: &str,
    mut poll: Poll,
    listener: &TcpListener,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<P> = Slab::new();
    let mut scratch = vec![0u8; 256 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("baseline {what} poll: {e}")),
        }
        for event in events.iter() {
            match event.token() {
                WAKER if stop.load(Ordering::Acquire) => return Ok(()),
                WAKER => {}
                LISTENER => accept_all(listener, &mut conns, &poll),
                token => {
                    let keep = conns
                        .get_mut(token.0)
                        .is_some_and(|c| c.ready(token, poll.registry(), &mut scratch).unwrap_or(false));
                    if !keep && let Some(mut conn) = conns.try_remove(token.0) {
                        let _ = poll.registry().deregister(conn.sock());
                    }
                }
            }
        }
    }
}

fn accept_all<P: Peer>(listener: &TcpListener, conns: &mut Slab<P>, poll: &Poll) {
    loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let entry = conns.vacant_entry();
                if poll.registry().register(&mut sock, Token(entry.key()), P::INTEREST).is_ok() {
                    entry.insert(P::new(sock));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: all taken. Anything else (EMFILE): try again at the next event.
            Err(_) => return,
        }
    }
}

/// Reads `sock` until drained, appending after `filled` bytes of `scratch` and calling `got`
/// with everything read so far after each read; `got` returns how many bytes it used (they
/// are dropped from the front). Returns the bytes left and whether the peer closed.
fn read_drained(
    sock: &mut TcpStream,
    scratch: &mut [u8],
    mut filled: usize,
    mut got: impl FnMut(&[u8]) -> io::Result<usize>,
) -> io::Result<(usize, bool)> {
    loop {
        if filled == scratch.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a unit longer than the buffer"));
        }
        let room = scratch.len() - filled;
        match sock.read(&mut scratch[filled..]) {
            Ok(0) => return Ok((filled, true)),
            Ok(n) => {
                filled += n;
                let used = got(&scratch[..filled])?;
                scratch.copy_within(used..filled, 0);
                filled -= used;
                if n < room {
                    // A short read drained the socket: the next bytes bring a new edge.
                    return Ok((filled, false));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((filled, false)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `out` until it is empty or the socket blocks; drops what was written.
fn write_some(sock: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut written = 0;
    while written < out.len() {
        match sock.write(&out[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.drain(..written);
    Ok(())
}

/// One echo connection.
struct EchoConn {
    sock: TcpStream,
    /// Lines read, not yet written back.
    out: Vec<u8>,
    /// The start of a line whose newline has not arrived.
    pending: Vec<u8>,
}

impl Peer for EchoConn {
    const INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE);

    fn new(sock: TcpStream) -> Self {
        let _ = sock.set_nodelay(true);
        EchoConn { sock, out: Vec::new(), pending: Vec::new() }
    }

    fn sock(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Reads until drained, queues every complete line, writes what it can.
    fn ready(&mut self, _: Token, _: &mio::Registry, scratch: &mut [u8]) -> io::Result<bool> {
        let filled = self.pending.len();
        scratch[..filled].copy_from_slice(&self.pending);
        self.pending.clear();
        let out = &mut self.out;
        let (left, eof) = read_drained(&mut self.sock, scratch, filled, |buf| {
            Ok(buf.iter().rposition(|b| *b == b'\n').map_or(0, |last| {
                out.extend_from_slice(&buf[..=last]);
                last + 1
            }))
        })?;
        self.pending.extend_from_slice(&scratch[..left]);
        write_some(&mut self.sock, &mut self.out)?;
        Ok(!eof)
    }
}

/// One upgrade-acceptor connection.
struct UpgradeConn {
    sock: TcpStream,
    /// The start of a request head whose blank line has not arrived.
    pending: Vec<u8>,
    /// The answer, until written.
    out: Vec<u8>,
    state: UpgradeState,
    /// Registered for writable events too (an answer did not fit at once).
    wants_write: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpgradeState {
    /// Reading the request head.
    Reading,
    /// Answered 101: idle, whatever else arrives is dropped.
    Upgraded,
    /// Answered 400: closed once the answer is out.
    Refused,
}

impl Peer for UpgradeConn {
    // Only readable: the answer nearly always fits the socket buffer at once, and a writable
    // registration would cost every connection an event of its own.
    const INTEREST: Interest = Interest::READABLE;

    fn new(sock: TcpStream) -> Self {
        UpgradeConn {
            sock,
            pending: Vec::new(),
            out: Vec::new(),
            state: UpgradeState::Reading,
            wants_write: false,
        }
    }

    fn sock(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    fn ready(&mut self, token: Token, registry: &mio::Registry, scratch: &mut [u8]) -> io::Result<bool> {
        let filled = self.pending.len();
        scratch[..filled].copy_from_slice(&self.pending);
        self.pending.clear();
        let (state, out) = (&mut self.state, &mut self.out);
        let (left, eof) = read_drained(&mut self.sock, scratch, filled, |buf| {
            if *state != UpgradeState::Reading {
                return Ok(buf.len());
            }
            match answer_upgrade(buf, out) {
                Some(upgraded) => {
                    *state = if upgraded { UpgradeState::Upgraded } else { UpgradeState::Refused };
                    Ok(buf.len())
                }
                None if buf.len() > MAX_HEAD_BYTES => {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"))
                }
                None => Ok(0),
            }
        })?;
        self.pending.extend_from_slice(&scratch[..left]);
        if !self.out.is_empty() {
            write_some(&mut self.sock, &mut self.out)?;
            if !self.out.is_empty() && !self.wants_write {
                self.wants_write = true;
                registry.reregister(&mut self.sock, token, Interest::READABLE | Interest::WRITABLE)?;
            }
        }
        let refused_and_told = self.state == UpgradeState::Refused && self.out.is_empty();
        Ok(!eof && !refused_and_told)
    }
}

/// Answers the upgrade request at the start of `head` into `out` once its head is complete:
/// `Some(true)` for a 101, `Some(false)` for a 400 (not a GET with a `Sec-WebSocket-Key`),
/// `None` while incomplete. Nothing else is checked: this is the least an acceptor can do.
fn answer_upgrade(head: &[u8], out: &mut Vec<u8>) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let key = match request.parse(head) {
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(_)) if request.method == Some("GET") => request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
            .map(|h| h.value.trim_ascii()),
        _ => None,
    };
    match key {
        Some(key) => {
            out.extend_from_slice(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: ",
            );
            out.extend_from_slice(tungstenite::handshake::derive_accept_key(key).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            Some(true)
        }
        None => {
            out.extend_from_slice(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            );
            Some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;

    use super::super::wire;
    use super::*;

    #[test]
    fn lines_come_back_whole() {
        let server = BaselineServer::echo(None).expect("start");
        let mut sock = std::net::TcpStream::connect(server.addr()).expect("connect");
        sock.write_all(b"one\ntw").expect("write");
        sock.write_all(b"o\n").expect("write");
        let mut reader = BufReader::new(sock.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        assert_eq!(line, "one\n");
        line.clear();
        reader.read_line(&mut line).expect("read");
        assert_eq!(line, "two\n");
        server.stop().expect("stops");
    }

    /// Reads until the response head is complete; returns what was read.
    fn read_head(sock: &mut std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).expect("read");
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn the_acceptor_upgrades_and_keeps_the_connection_open() {
        let server = BaselineServer::upgrade_acceptor(None).expect("start");
        let mut sock = std::net::TcpStream::connect(server.addr()).expect("connect");
        let (key, accept) = wire::handshake_key([9; 16]);
        let mut request = Vec::new();
        wire::encode_upgrade_request(&mut request, "h:1", "/", &key);
        // In two pieces, the blank line cut in half.
        let cut = request.len() - 3;
        sock.write_all(&request[..cut]).expect("write");
        std::thread::sleep(Duration::from_millis(20));
        sock.write_all(&request[cut..]).expect("write");
        let head = read_head(&mut sock);
        assert_eq!(wire::parse_upgrade_response(&head, &accept), Ok(Some(head.len())));
        // Frames after the upgrade are ignored; the connection stays open.
        sock.write_all(&[0x81, 0x80, 1, 2, 3, 4]).expect("write");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let mut buf = [0u8; 16];
        let err = sock.read(&mut buf).expect_err("nothing more arrives");
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        server.stop().expect("stops");
    }

    #[test]
    fn the_acceptor_refuses_a_request_without_a_key() {
        let server = BaselineServer::upgrade_acceptor(None).expect("start");
        let mut sock = std::net::TcpStream::connect(server.addr()).expect("connect");
        sock.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").expect("write");
        let head = read_head(&mut sock);
        assert!(head.starts_with(b"HTTP/1.1 400 "), "{:?}", String::from_utf8_lossy(&head));
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest).expect("closed after the answer");
        server.stop().expect("stops");
    }
}
