//! The bench's event loops: one [`Driver`] per thread (its own `mio::Poll`, nonblocking,
//! edge-triggered sockets), and the [`Fleet`] of threads the main thread starts, releases and
//! joins.
//!
//! This is the only part of the bench that touches client sockets or reads the clock for them.
//! What bytes mean is the [`Session`]'s business. Per readiness event a connection is read
//! until the kernel has nothing more (every complete unit handled as it arrives), and then
//! everything the session made due is written in one `write`.
//!
//! A thread's life:
//!
//! ```text
//! connect_all (at most `concurrency` handshakes in flight, each with a deadline)
//!   -> tell the main thread -> idle until `go` (Timed) or `stop` (Hold)
//!   -> Timed: begin every session, run until the window ends -> close all -> Report
//! ```

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::meter::{Meter, Report, bump, record};
use super::session::{Io, MAX_FRAME_BYTES, Session};
use super::sys;
use crate::random::XorShift64;

/// Bytes a read asks for at least; the thread's read buffer starts at this and grows only for
/// a frame that does not fit.
const READ_BYTES: usize = 256 * 1024;

/// What one run asks of the fleet.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Where to connect.
    pub target: SocketAddr,
    /// Source addresses, used in turn; empty lets the kernel choose.
    pub sources: Vec<Ipv4Addr>,
    /// Connections in all.
    pub connections: usize,
    /// Handshakes in flight in all.
    pub concurrency: usize,
    /// Threads, each with its share of connections and concurrency.
    pub threads: usize,
    /// A connection not usable after this fails.
    pub timeout: Duration,
    /// What happens once everyone is connected.
    pub schedule: Schedule,
}

/// What the threads do once connected.
#[derive(Clone, Copy, Debug)]
pub enum Schedule {
    /// Keep the connections open and idle until `Fleet::stop`.
    Hold,
    /// After `Fleet::go`: load for `warmup`, then a measured `duration`, then stop.
    Timed {
        /// Unmeasured load first.
        warmup: Duration,
        /// The measured window.
        duration: Duration,
    },
}

/// What the main thread and the bench threads share.
#[derive(Debug, Default)]
struct Control {
    /// Threads through their connect phase.
    connected: AtomicUsize,
    /// Connections established, all threads.
    established: AtomicU64,
    /// Set once by the main thread: when the timed load starts.
    go: OnceLock<Instant>,
    /// Set by the main thread: close everything and return.
    stop: AtomicBool,
}

/// The bench threads of one run.
#[derive(Debug)]
pub struct Fleet {
    control: Arc<Control>,
    handles: Vec<JoinHandle<Result<Report, String>>>,
}

impl Fleet {
    /// Starts `spec.threads` threads; each builds its sessions with `make`.
    pub fn start<S, F>(spec: &Spec, make: F) -> Result<Fleet, String>
    where
        S: Session + 'static,
        F: Fn(&mut Rng) -> S + Send + Sync + 'static,
    {
        let control = Arc::new(Control::default());
        let make = Arc::new(make);
        let threads = spec.threads.clamp(1, spec.connections.max(1));
        let mut fleet = Fleet { control: control.clone(), handles: Vec::new() };
        for t in 0..threads {
            let share = Share {
                first: spec.connections * t / threads,
                end: spec.connections * (t + 1) / threads,
                concurrency: (spec.concurrency / threads + usize::from(t < spec.concurrency % threads))
                    .max(1),
                target: spec.target,
                sources: spec.sources.clone(),
                timeout: spec.timeout,
                schedule: spec.schedule,
            };
            let (control, make) = (control.clone(), make.clone());
            let handle = thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || run_thread(share, &control, make, t as u64))
                .map_err(|e| format!("cannot start a bench thread: {e}"))?;
            fleet.handles.push(handle);
        }
        Ok(fleet)
    }

    /// Waits until every thread is through connecting; false if one ended early (an error,
    /// which `join` returns).
    pub fn wait_connected(&self) -> bool {
        loop {
            if self.control.connected.load(Ordering::Acquire) == self.handles.len() {
                return true;
            }
            if self.handles.iter().any(JoinHandle::is_finished) {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Connections established so far, all threads.
    pub fn established(&self) -> u64 {
        self.control.established.load(Ordering::Acquire)
    }

    /// Starts the timed load, now.
    pub fn go(&self) {
        let _ = self.control.go.set(Instant::now());
    }

    /// Tells every thread to close its connections and return.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::Release);
    }

    /// Waits for every thread; their reports merged, or the first error.
    pub fn join(mut self) -> Result<Report, String> {
        let mut report = Report::default();
        let mut error = None;
        for handle in std::mem::take(&mut self.handles) {
            match handle.join() {
                Ok(Ok(r)) => report.merge(&r),
                Ok(Err(e)) => error = error.or(Some(e)),
                Err(_) => error = error.or(Some("a bench thread panicked".to_string())),
            }
        }
        error.map_or(Ok(report), Err)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A fleet dropped without `join` (an early return) must not leave threads holding.
        self.stop();
    }
}

/// Runs a `Schedule::Timed` spec from start to end: connect, go, join. The CPU time `probes`
/// used over the measured window goes into the report, summed by label.
pub fn run_timed<S, F>(
    spec: &Spec,
    probes: &[(&'static str, sys::CpuProbe)],
    make: F,
) -> Result<Report, String>
where
    S: Session + 'static,
    F: Fn(&mut Rng) -> S + Send + Sync + 'static,
{
    let fleet = Fleet::start(spec, make)?;
    if !(fleet.wait_connected() && fleet.established() > 0) {
        fleet.stop();
        return fleet.join();
    }
    fleet.go();
    let mut probed = std::collections::BTreeMap::new();
    if let (false, Schedule::Timed { warmup, duration }) = (probes.is_empty(), spec.schedule) {
        thread::sleep(warmup);
        let before: Vec<_> = probes.iter().map(|(_, probe)| sys::cpu_time(*probe)).collect();
        thread::sleep(duration);
        for ((label, probe), before) in probes.iter().zip(before) {
            if let (Ok(before), Ok(after)) = (before, sys::cpu_time(*probe)) {
                // Several probes may share a label (the demo workers): their times add up.
                *probed.entry(*label).or_insert(Duration::ZERO) += after.saturating_sub(before);
            }
        }
    }
    let mut report = fleet.join()?;
    report.probed_cpu = probed;
    Ok(report)
}

/// One thread's part of a [`Spec`]: connections `first..end` (global indices, which pick the
/// source address) and its share of the concurrency.
#[derive(Debug)]
struct Share {
    first: usize,
    end: usize,
    concurrency: usize,
    target: SocketAddr,
    sources: Vec<Ipv4Addr>,
    timeout: Duration,
    schedule: Schedule,
}

fn run_thread<S, F>(share: Share, control: &Control, make: Arc<F>, salt: u64) -> Result<Report, String>
where
    S: Session,
    F: Fn(&mut Rng) -> S,
{
    let schedule = share.schedule;
    let mut driver = Driver::new(share, make, salt)?;
    driver.connect_all()?;
    control.established.fetch_add(driver.report.established, Ordering::AcqRel);
    control.connected.fetch_add(1, Ordering::AcqRel);
    // Idle until released: pings are still answered, losses still counted.
    let idle_wait = match schedule {
        Schedule::Hold => Duration::from_millis(50),
        Schedule::Timed { .. } => Duration::from_millis(1),
    };
    while !control.stop.load(Ordering::Acquire) {
        if let (Schedule::Timed { warmup, duration }, Some(&t0)) = (schedule, control.go.get()) {
            driver.run_window(t0 + warmup, t0 + warmup + duration, &control.stop)?;
            break;
        }
        driver.turn(idle_wait)?;
    }
    driver.close_all();
    Ok(driver.report)
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// connect() started; waiting for the first event.
    Connecting,
    /// TCP up, the session's hello sent; waiting for `is_ready`.
    Upgrading,
    /// Usable.
    Ready,
}

/// One client socket and its session.
struct Conn<S> {
    sock: TcpStream,
    session: S,
    /// Bytes due, written at the end of each event.
    out: Vec<u8>,
    /// An incomplete unit left over from the last read.
    pending: Vec<u8>,
    phase: Phase,
    /// The last write did not block (or an event said writable since).
    writable: bool,
    started: Instant,
    /// Tells this connection from a later one in the same slab slot.
    serial: u64,
}

/// One thread's event loop. See the module docs.
struct Driver<S, F> {
    poll: Poll,
    events: Events,
    ready: Vec<(usize, bool, bool)>,
    conns: Slab<Conn<S>>,
    /// The thread's one read buffer; only leftovers are copied into a connection's `pending`.
    scratch: Vec<u8>,
    report: Report,
    share: Share,
    make: Arc<F>,
    rng: Rng,
    /// Next connection index to launch.
    next: usize,
    /// Connections launched and not yet ready or failed.
    connecting: usize,
    serial: u64,
    /// Handshake deadlines in launch order (so in deadline order): (deadline, key, serial).
    deadlines: VecDeque<(Instant, usize, u64)>,
    /// Sessions have begun their workload: a connection that becomes ready begins at once.
    running: bool,
}

impl<S: Session, F: Fn(&mut Rng) -> S> Driver<S, F> {
    fn new(share: Share, make: Arc<F>, salt: u64) -> Result<Self, String> {
        Ok(Driver {
            poll: Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?,
            events: Events::with_capacity(1024),
            ready: Vec::with_capacity(1024),
            conns: Slab::with_capacity(share.end - share.first),
            scratch: vec![0; READ_BYTES],
            report: Report::default(),
            next: share.first,
            share,
            make,
            rng: Rng::seeded(salt),
            connecting: 0,
            serial: 0,
            deadlines: VecDeque::new(),
            running: false,
        })
    }

    /// Opens this thread's connections, `concurrency` at a time, until each is up or failed.
    fn connect_all(&mut self) -> Result<(), String> {
        self.launch_more();
        while self.connecting > 0 || self.next < self.share.end {
            self.turn(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// Starts connections while fewer than `concurrency` are in progress.
    fn launch_more(&mut self) {
        while self.connecting < self.share.concurrency && self.next < self.share.end {
            let index = self.next;
            self.next += 1;
            let now = Instant::now();
            self.report.attempted += 1;
            self.report.first_attempt.get_or_insert(now);
            let source = self.share.sources.get(index % self.share.sources.len().max(1)).copied();
            let mut sock = match sys::connect_from(source, self.share.target) {
                Ok(sock) => sock,
                Err(e) => {
                    bump(&mut self.report.connect_failures, &format!("connect: {e}"));
                    continue;
                }
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut sock, Token(key), interest) {
                bump(&mut self.report.connect_failures, &format!("register: {e}"));
                continue;
            }
            self.serial += 1;
            let session = (self.make)(&mut self.rng);
            entry.insert(Conn {
                sock,
                session,
                out: Vec::new(),
                pending: Vec::new(),
                phase: Phase::Connecting,
                writable: false,
                started: now,
                serial: self.serial,
            });
            self.connecting += 1;
            self.deadlines.push_back((now + self.share.timeout, key, self.serial));
        }
    }

    /// One pass: wait for events (at most `max_wait`, less if a handshake deadline is nearer),
    /// drive each ready connection, expire handshakes, launch more.
    fn turn(&mut self, max_wait: Duration) -> Result<(), String> {
        let mut wait = max_wait;
        if let Some(&(deadline, ..)) = self.deadlines.front() {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("poll: {e}")),
        }
        self.ready.clear();
        for event in self.events.iter() {
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            self.ready.push((event.token().0, readable, writable));
        }
        let ready = std::mem::take(&mut self.ready);
        for &(key, readable, writable) in &ready {
            if let Err(reason) = self.drive(key, readable, writable) {
                self.fail(key, &reason);
            }
        }
        self.ready = ready;
        if !self.deadlines.is_empty() {
            self.expire(Instant::now());
        }
        self.launch_more();
        Ok(())
    }

    /// Handles one readiness event of connection `key`: finish connecting, read and handle
    /// everything there is, write everything due.
    fn drive(&mut self, key: usize, readable: bool, writable: bool) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
        let now = Instant::now();
        conn.writable |= writable;
        if conn.phase == Phase::Connecting {
            if let Some(e) = conn.sock.take_error().map_err(|e| format!("connect: {e}"))? {
                return Err(format!("connect: {e}"));
            }
            match conn.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
            // Small frames must leave at once, not wait for an ACK (Nagle).
            let _ = conn.sock.set_nodelay(true);
            conn.phase = Phase::Upgrading;
            conn.session.hello(&mut conn.out);
        }
        let mut eof = false;
        if readable {
            eof = read_all(conn, &mut self.scratch, &mut self.report.meter, now)?;
        }
        if conn.phase == Phase::Upgrading && conn.session.is_ready() {
            conn.phase = Phase::Ready;
            self.connecting -= 1;
            self.report.established += 1;
            self.report.last_established = Some(now);
            record(&mut self.report.handshake, now.saturating_duration_since(conn.started));
            if self.running {
                conn.session.begin(&mut Io { out: &mut conn.out, now, meter: &mut self.report.meter });
            }
        }
        if conn.writable && !conn.out.is_empty() {
            write_all(conn)?;
        }
        if eof {
            return Err("closed by peer".into());
        }
        Ok(())
    }

    /// Drops connection `key`, counting `reason` as a failed connect or a lost connection.
    fn fail(&mut self, key: usize, reason: &str) {
        let Some(mut conn) = self.conns.try_remove(key) else { return };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        if conn.phase == Phase::Ready {
            bump(&mut self.report.lost, reason);
        } else {
            self.connecting -= 1;
            let reason = if conn.phase == Phase::Upgrading && !reason.starts_with("handshake") {
                format!("handshake: {reason}")
            } else {
                reason.to_string()
            };
            bump(&mut self.report.connect_failures, &reason);
        }
    }

    /// Fails connections still not ready at their deadline.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, key, serial)) = self.deadlines.front() {
            let waiting = self.conns.get(key).is_some_and(|c| c.serial == serial && c.phase != Phase::Ready);
            if waiting && deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if waiting {
                self.fail(key, "timeout");
            }
        }
    }

    /// Begins every session, then runs until `end` (or until the main thread says `stop`);
    /// replies in `[start, end)` are measured.
    fn run_window(&mut self, start: Instant, end: Instant, stop: &AtomicBool) -> Result<(), String> {
        self.report.meter.set_window(start, end);
        self.report.window = end.saturating_duration_since(start);
        self.running = true;
        let now = Instant::now();
        let mut failed = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if conn.phase != Phase::Ready {
                continue;
            }
            conn.session.begin(&mut Io { out: &mut conn.out, now, meter: &mut self.report.meter });
            if conn.writable
                && let Err(reason) = write_all(conn)
            {
                failed.push((key, reason));
            }
        }
        for (key, reason) in failed {
            self.fail(key, &reason);
        }
        let mut cpu_at_start = None;
        loop {
            let now = Instant::now();
            if now >= start && cpu_at_start.is_none() {
                cpu_at_start = Some(sys::thread_cpu_time());
            }
            if now >= end || stop.load(Ordering::Acquire) {
                break;
            }
            let next = if now < start { start } else { end };
            self.turn((next - now).min(Duration::from_millis(100)))?;
        }
        if let (Some(Some(before)), Some(after)) = (cpu_at_start, sys::thread_cpu_time()) {
            self.report.client_cpu = after.saturating_sub(before);
        }
        Ok(())
    }

    /// Says goodbye where nothing else is queued (best effort) and drops every connection.
    fn close_all(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            if conn.phase == Phase::Ready && conn.out.is_empty() {
                conn.session.goodbye(&mut conn.out);
                let _ = conn.sock.write(&conn.out);
            }
        }
        self.conns.clear();
    }
}

/// Reads until the socket has nothing more, handing the session every complete unit as it
/// arrives; keeps an incomplete tail in `conn.pending`. Returns true at end of stream.
fn read_all<S: Session>(
    conn: &mut Conn<S>,
    scratch: &mut Vec<u8>,
    meter: &mut Meter,
    now: Instant,
) -> Result<bool, String> {
    let mut filled = conn.pending.len();
    if scratch.len() < filled + READ_BYTES {
        scratch.resize(filled + READ_BYTES, 0);
    }
    scratch[..filled].copy_from_slice(&conn.pending);
    conn.pending.clear();
    let mut eof = false;
    loop {
        if filled == scratch.len() {
            if filled > MAX_FRAME_BYTES + 16 {
                return Err("server message too large".into());
            }
            scratch.resize(filled * 2, 0);
        }
        let room = scratch.len() - filled;
        match conn.sock.read(&mut scratch[filled..]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                filled += n;
                let mut io = Io { out: &mut conn.out, now, meter: &mut *meter };
                let used = conn.session.handle_input(&scratch[..filled], &mut io)?;
                scratch.copy_within(used..filled, 0);
                filled -= used;
                if n < room {
                    // A short read drained the socket: the next bytes bring a new edge, so
                    // the read that would only say WouldBlock is saved.
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    conn.pending.extend_from_slice(&scratch[..filled]);
    if conn.pending.is_empty() && conn.pending.capacity() > 4096 {
        conn.pending = Vec::new();
    }
    Ok(eof)
}

/// Writes `conn.out` until it is empty or the socket blocks (then waits for a writable event).
fn write_all<S>(conn: &mut Conn<S>) -> Result<(), String> {
    let mut written = 0;
    while written < conn.out.len() {
        match conn.sock.write(&conn.out[written..]) {
            Ok(0) => return Err("write: zero bytes written".into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    conn.out.drain(..written);
    Ok(())
}

/// Handshake keys and masks need variety, not secrecy: the crate's xorshift.
#[derive(Debug)]
pub struct Rng(XorShift64);

impl Rng {
    /// Seeded from the clock, the pid, `salt` and std's per-process random keys.
    pub fn seeded(salt: u64) -> Rng {
        Rng(XorShift64::seeded(salt))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// 16 random bytes (a handshake key).
    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        out[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        out
    }

    /// 4 random bytes (a frame mask).
    pub fn mask(&mut self) -> [u8; 4] {
        let [a, b, c, d, ..] = self.next_u64().to_le_bytes();
        [a, b, c, d]
    }
}
