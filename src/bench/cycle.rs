//! Connections with a beginning and an end: one thread's mio loop for the modes whose
//! connections are not simply opened and held (`churn`, `flood`). Each connection runs a
//! [`Script`] from TCP connect to a finish the script decides; when it ends, its place goes to
//! the next one, until [`Plan::total`] have run.
//!
//! The loop owns the sockets and reads the clock; what bytes mean and when to act is the
//! script's business (sans-IO, tested without a network). Scripts may ask for a timer
//! ([`Script::next_tick`]): a trickle of bytes, a paced request, a deadline.
//!
//! ```text
//! launch (at most `alive` at once, at most `connecting` TCP connects in progress)
//!   -> connected: on_connect -> bytes in: on_input / ticks: on_tick / FIN or reset: on_hangup
//!   -> is_done (Ok) or an Err -> socket dropped, the outcome handed back -> launch the next
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::driver::Rng;
use super::sys;

/// Bytes one read asks for.
const READ_BYTES: usize = 64 * 1024;
/// Input a script may leave unconsumed before its connection is failed.
const MAX_PENDING_BYTES: usize = 1 << 20;
/// Longest wait in one poll, so a stop request is seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// How a peer hung up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hangup {
    /// An orderly FIN (read returned 0).
    Eof,
    /// A reset or another socket error, in words.
    Error(String),
}

/// One connection's life, from TCP connect to its end, sans-IO. Every `Err` is the reason the
/// connection failed; the loop drops it and hands the script back with the reason.
pub trait Script {
    /// TCP is up: append what to send first.
    fn on_connect(&mut self, now: Instant, out: &mut Vec<u8>);
    /// Handles the complete units at the start of `input`; returns how many bytes it used.
    fn on_input(&mut self, input: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<usize, String>;
    /// The peer hung up (nothing more will be read). `Ok` if the script expected it.
    fn on_hangup(&mut self, how: Hangup, now: Instant) -> Result<(), String>;
    /// When [`Script::on_tick`] is due next (counted from launch: ticks also run while TCP
    /// connects, so a deadline covers the connect).
    fn next_tick(&self) -> Option<Instant>;
    /// A tick that was due.
    fn on_tick(&mut self, now: Instant, out: &mut Vec<u8>) -> Result<(), String>;
    /// Finished: the loop closes the socket and counts an `Ok`.
    fn is_done(&self) -> bool;
    /// The loop is told to stop while this connection is alive: append a goodbye if there is
    /// one; `Ok` if stopping now is part of the plan.
    fn on_stop(&mut self, _out: &mut Vec<u8>) -> Result<(), String> {
        Err("stopped before the end".into())
    }
}

/// What one loop runs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where to connect.
    pub target: SocketAddr,
    /// Source addresses, by connection index in turn; empty lets the kernel choose.
    pub sources: Vec<Ipv4Addr>,
    /// The index of this loop's first connection (picks the first source address).
    pub first: usize,
    /// Connections to run in all.
    pub total: usize,
    /// Connections alive at once, at most.
    pub alive: usize,
    /// TCP connects in progress at once, at most.
    pub connecting: usize,
    /// Set by another thread: end every live connection ([`Script::on_stop`]) and return.
    pub stop: Option<Arc<AtomicBool>>,
}

/// One live connection.
struct Live<S> {
    sock: TcpStream,
    script: S,
    connected: bool,
    writable: bool,
    out: Vec<u8>,
    input: Vec<u8>,
    /// The tick the heap holds for this connection (others in the heap are stale).
    armed: Option<Instant>,
    serial: u64,
}

/// Runs `plan`: `make(index, now, rng)` builds each connection's script when it is launched;
/// `end(script, outcome)` receives it back when the connection ends (`Err`: why it failed).
pub fn run<S, M, E>(plan: &Plan, mut make: M, mut end: E) -> Result<(), String>
where
    S: Script,
    M: FnMut(usize, Instant, &mut Rng) -> S,
    E: FnMut(S, Result<(), String>),
{
    let mut poll = Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Live<S>> = Slab::with_capacity(plan.alive.min(65_536));
    let mut ticks: BinaryHeap<Reverse<(Instant, usize, u64)>> = BinaryHeap::new();
    let mut scratch = vec![0u8; READ_BYTES];
    let mut rng = Rng::seeded(plan.first as u64);
    let (mut launched, mut serial, mut connecting) = (0usize, 0u64, 0usize);
    let stopped = || plan.stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire));
    loop {
        // Launch while there is room.
        while launched < plan.total && conns.len() < plan.alive && connecting < plan.connecting {
            let index = plan.first + launched;
            launched += 1;
            let now = Instant::now();
            let script = make(index, now, &mut rng);
            let source = plan.sources.get(index % plan.sources.len().max(1)).copied();
            let mut sock = match sys::connect_from(source, plan.target) {
                Ok(sock) => sock,
                Err(e) => {
                    end(script, Err(format!("connect: {e}")));
                    continue;
                }
            };
            let entry = conns.vacant_entry();
            let key = entry.key();
            if let Err(e) =
                poll.registry().register(&mut sock, Token(key), Interest::READABLE | Interest::WRITABLE)
            {
                end(script, Err(format!("register: {e}")));
                continue;
            }
            serial += 1;
            let live = entry.insert(Live {
                sock,
                script,
                connected: false,
                writable: false,
                out: Vec::new(),
                input: Vec::new(),
                armed: None,
                serial,
            });
            connecting += 1;
            arm(&mut ticks, key, live);
        }
        if (launched == plan.total && conns.is_empty()) || stopped() {
            break;
        }
        let now = Instant::now();
        let mut wait = MAX_WAIT;
        if let Some(Reverse((at, ..))) = ticks.peek() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let now = Instant::now();
        for event in events.iter() {
            let key = event.token().0;
            let Some(live) = conns.get_mut(key) else { continue };
            let was_connecting = !live.connected;
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            live.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
            let outcome = drive(live, readable, &mut scratch, now);
            if was_connecting && (live.connected || outcome.is_err()) {
                connecting -= 1;
            }
            settle(&mut conns, &mut ticks, &poll, key, outcome, &mut end);
        }
        // Ticks that are due, in deadline order; stale entries (re-armed or ended) are skipped.
        while let Some(&Reverse((at, key, serial))) = ticks.peek() {
            if at > now {
                break;
            }
            ticks.pop();
            let Some(live) = conns.get_mut(key).filter(|l| l.serial == serial && l.armed == Some(at)) else {
                continue;
            };
            live.armed = None;
            let was_connecting = !live.connected;
            let outcome = live.script.on_tick(now, &mut live.out).and_then(|()| write_out(live));
            if was_connecting && outcome.is_err() {
                connecting -= 1;
            }
            settle(&mut conns, &mut ticks, &poll, key, outcome, &mut end);
        }
    }
    // Stopped (or done): whatever is still alive says goodbye if it can and ends.
    for mut live in conns.drain() {
        let outcome = live.script.on_stop(&mut live.out);
        if !live.out.is_empty() {
            let _ = live.sock.write(&live.out);
        }
        let _ = poll.registry().deregister(&mut live.sock);
        end(live.script, outcome);
    }
    Ok(())
}

/// After a connection was driven: end it (failed or done), or re-arm its tick.
fn settle<S: Script, E: FnMut(S, Result<(), String>)>(
    conns: &mut Slab<Live<S>>,
    ticks: &mut BinaryHeap<Reverse<(Instant, usize, u64)>>,
    poll: &Poll,
    key: usize,
    outcome: Result<(), String>,
    end: &mut E,
) {
    let Some(live) = conns.get_mut(key) else { return };
    match outcome {
        Ok(()) if !live.script.is_done() => arm(ticks, key, live),
        outcome => {
            let mut live = conns.remove(key);
            let _ = poll.registry().deregister(&mut live.sock);
            end(live.script, outcome);
        }
    }
}

/// Puts the script's next tick in the heap unless it is there already.
fn arm<S: Script>(ticks: &mut BinaryHeap<Reverse<(Instant, usize, u64)>>, key: usize, live: &mut Live<S>) {
    let next = live.script.next_tick();
    if next.is_some() && next != live.armed {
        live.armed = next;
        if let Some(at) = next {
            ticks.push(Reverse((at, key, live.serial)));
        }
    }
}

/// Handles one readiness event: finish connecting, read everything there is, write what the
/// script made due.
fn drive<S: Script>(
    live: &mut Live<S>,
    readable: bool,
    scratch: &mut [u8],
    now: Instant,
) -> Result<(), String> {
    if !live.connected {
        if let Some(e) = live.sock.take_error().map_err(|e| format!("connect: {e}"))? {
            return Err(format!("connect: {e}"));
        }
        match live.sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(format!("connect: {e}")),
        }
        let _ = live.sock.set_nodelay(true);
        live.connected = true;
        live.script.on_connect(now, &mut live.out);
    }
    if readable {
        loop {
            match live.sock.read(scratch) {
                Ok(0) => {
                    live.script.on_hangup(Hangup::Eof, now)?;
                    return write_out(live);
                }
                Ok(n) => {
                    live.input.extend_from_slice(&scratch[..n]);
                    let used = live.script.on_input(&live.input, now, &mut live.out)?;
                    live.input.drain(..used);
                    if live.input.len() > MAX_PENDING_BYTES {
                        return Err("server sent too much without a complete unit".into());
                    }
                    if live.script.is_done() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    live.script.on_hangup(Hangup::Error(e.to_string()), now)?;
                    return write_out(live);
                }
            }
        }
    }
    write_out(live)
}

/// Writes what is due until the socket blocks (then waits for a writable event).
fn write_out<S>(live: &mut Live<S>) -> Result<(), String> {
    if !live.connected || !live.writable {
        return Ok(());
    }
    let mut written = 0;
    while written < live.out.len() {
        match live.sock.write(&live.out[written..]) {
            Ok(0) => return Err("write: zero bytes written".into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                live.writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    live.out.drain(..written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    use super::*;

    /// Sends a line, expects it back, then hangs up.
    struct LineOnce {
        got: Option<Vec<u8>>,
        deadline: Instant,
    }

    impl Script for LineOnce {
        fn on_connect(&mut self, _now: Instant, out: &mut Vec<u8>) {
            out.extend_from_slice(b"hello\n");
        }
        fn on_input(&mut self, input: &[u8], _now: Instant, _out: &mut Vec<u8>) -> Result<usize, String> {
            match input.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.got = Some(input[..i].to_vec());
                    Ok(i + 1)
                }
                None => Ok(0),
            }
        }
        fn on_hangup(&mut self, how: Hangup, _now: Instant) -> Result<(), String> {
            Err(format!("hangup {how:?}"))
        }
        fn next_tick(&self) -> Option<Instant> {
            Some(self.deadline)
        }
        fn on_tick(&mut self, _now: Instant, _out: &mut Vec<u8>) -> Result<(), String> {
            Err("timeout".into())
        }
        fn is_done(&self) -> bool {
            self.got.is_some()
        }
    }

    #[test]
    fn every_connection_runs_to_its_end_with_at_most_alive_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let target = listener.local_addr().expect("addr");
        // An echo that serves connections one after another: with `alive` 3, the loop must
        // still get through all 7, never holding more than 3 (the backlog holds the rest).
        let server = std::thread::spawn(move || {
            for _ in 0..7 {
                let (sock, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(sock.try_clone().expect("clone"));
                let mut line = String::new();
                reader.read_line(&mut line).expect("line");
                (&sock).write_all(line.as_bytes()).expect("echo");
            }
        });
        let plan =
            Plan { target, sources: Vec::new(), first: 0, total: 7, alive: 3, connecting: 2, stop: None };
        let mut outcomes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        run(&plan, |_, _, _| LineOnce { got: None, deadline }, |s, r| outcomes.push((s.got, r)))
            .expect("runs");
        server.join().expect("server");
        assert_eq!(outcomes.len(), 7);
        assert!(outcomes.iter().all(|(got, r)| r.is_ok() && got.as_deref() == Some(&b"hello"[..])));
    }

    #[test]
    fn refused_connections_and_deadlines_are_failures() {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let plan = Plan {
            target: SocketAddr::from(([127, 0, 0, 1], port)),
            sources: Vec::new(),
            first: 0,
            total: 2,
            alive: 2,
            connecting: 2,
            stop: None,
        };
        let mut reasons = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        run(&plan, |_, _, _| LineOnce { got: None, deadline }, |_, r| reasons.push(r)).expect("runs");
        assert_eq!(reasons.len(), 2);
        assert!(reasons.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("refused"))), "{reasons:?}");

        // A listener that never answers: the script's deadline ends it.
        let silent = TcpListener::bind("127.0.0.1:0").expect("listen");
        let plan = Plan { target: silent.local_addr().expect("addr"), total: 1, ..plan };
        let mut reasons = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(200);
        run(&plan, |_, _, _| LineOnce { got: None, deadline }, |_, r| reasons.push(r)).expect("runs");
        assert_eq!(reasons, [Err("timeout".to_string())]);
    }
}
