//! The roundtrip baseline: a plain TCP line-echo server on one mio thread inside the bench
//! process, on `127.0.0.1:0`. It is what this machine's loopback transport does with no
//! WebSocket, JSON or application in the way, so the WebSocket figures read as a ratio of it.
//!
//! It is built like the real server (one thread, edge-triggered, read until drained, one write
//! per readiness) but does nothing with the bytes: every complete line goes straight back.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::sys;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);

/// A running echo server; stopped by [`EchoServer::stop`] or on drop.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    /// The serving thread's id, whose CPU time the baseline reports.
    thread_id: Option<u32>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl EchoServer {
    /// Listens on `127.0.0.1:0` and serves on a new thread, pinned to `cpus` when given.
    pub fn start(cpus: Option<Vec<usize>>) -> Result<EchoServer, String> {
        let fail = |e: io::Error| format!("baseline echo server: {e}");
        let mut listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        let poll = Poll::new().map_err(fail)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE).map_err(fail)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(fail)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (pinned_tx, pinned_rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let handle = thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let pinned = cpus.map_or(Ok(()), |cpus| {
                    sys::pin_current_thread(&cpus)
                        .map_err(|e| format!("pinning the echo server to {cpus:?}: {e}"))
                });
                let ok = pinned.is_ok();
                let _ = pinned_tx.send(pinned.map(|()| sys::current_thread_id()));
                if ok { serve(poll, &listener, &thread_stop) } else { Ok(()) }
            })
            .map_err(fail)?;
        let mut server = EchoServer { addr, thread_id: None, stop, waker, handle: Some(handle) };
        server.thread_id =
            pinned_rx.recv().map_err(|_| "baseline echo server ended at once".to_string())??;
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

    /// Stops the thread and waits for it.
    pub fn stop(mut self) -> Result<(), String> {
        self.signal();
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("baseline echo server panicked".into()),
            None => Ok(()),
        }
    }

    fn signal(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.signal();
    }
}

/// One echo connection.
struct EchoConn {
    sock: TcpStream,
    /// Lines read, not yet written back.
    out: Vec<u8>,
    /// The start of a line whose newline has not arrived.
    pending: Vec<u8>,
}

fn serve(mut poll: Poll, listener: &TcpListener, stop: &AtomicBool) -> Result<(), String> {
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<EchoConn> = Slab::new();
    let mut scratch = vec![0u8; 256 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("baseline echo server poll: {e}")),
        }
        for event in events.iter() {
            match event.token() {
                WAKER if stop.load(Ordering::Acquire) => return Ok(()),
                WAKER => {}
                LISTENER => accept_all(listener, &mut conns, &poll),
                Token(key) => {
                    let keep = conns.get_mut(key).is_some_and(|c| echo(c, &mut scratch).unwrap_or(false));
                    if !keep && let Some(mut conn) = conns.try_remove(key) {
                        let _ = poll.registry().deregister(&mut conn.sock);
                    }
                }
            }
        }
    }
}

fn accept_all(listener: &TcpListener, conns: &mut Slab<EchoConn>, poll: &Poll) {
    loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let entry = conns.vacant_entry();
                let interest = Interest::READABLE | Interest::WRITABLE;
                if poll.registry().register(&mut sock, Token(entry.key()), interest).is_ok() {
                    entry.insert(EchoConn { sock, out: Vec::new(), pending: Vec::new() });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: all taken. Anything else (EMFILE): try again at the next event.
            Err(_) => return,
        }
    }
}

/// Reads until drained, queues every complete line, writes what it can. False: close it.
fn echo(conn: &mut EchoConn, scratch: &mut [u8]) -> io::Result<bool> {
    let mut filled = conn.pending.len();
    scratch[..filled].copy_from_slice(&conn.pending);
    conn.pending.clear();
    let mut open = true;
    loop {
        if filled == scratch.len() {
            return Ok(false); // a line longer than the buffer: not our workload
        }
        let room = scratch.len() - filled;
        match conn.sock.read(&mut scratch[filled..]) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => {
                filled += n;
                if let Some(last) = scratch[..filled].iter().rposition(|b| *b == b'\n') {
                    conn.out.extend_from_slice(&scratch[..=last]);
                    scratch.copy_within(last + 1..filled, 0);
                    filled -= last + 1;
                }
                if n < room {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.pending.extend_from_slice(&scratch[..filled]);
    let mut written = 0;
    while written < conn.out.len() {
        match conn.sock.write(&conn.out[written..]) {
            Ok(0) => return Ok(false),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.out.drain(..written);
    Ok(open)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    #[test]
    fn lines_come_back_whole() {
        let server = EchoServer::start(None).expect("start");
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
}
