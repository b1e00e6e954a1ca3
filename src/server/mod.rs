//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! `Server::run` is the table of contents: poll, note readiness, accept, drive gearmand, drive
//! clients, fire timers, read gearmand again, apply the App's effects, flush, reap. Reads come
//! before writes, so a reply made during a pass leaves in that pass, in one write per
//! connection. Closing is last, so no slab key is reused while this batch of events may still
//! name it.
//!
//! Only `server/` imports `mio` for the server (the load generator in `bench/` runs loops of
//! its own). Protocol decisions live in `connection`, `ws`, `gearman` and `app`; this module
//! moves bytes and readiness between them and the kernel. It holds `run` and the steps of a
//! pass; a client's life is in `clients`, the gearmand links' in `links` (which owns them), and
//! every socket call in `io`. It must not hold protocol state, nor read an `io::ErrorKind`.

mod admin;
mod clients;
mod conn;
mod gearman_link;
mod io;
mod link_down;
mod links;
mod member;
mod peers;
mod reload;
mod resolver;
pub mod settings;
mod start;
mod token;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, log, trace, warn};
use mio::net::TcpListener;
use mio::{Events, Poll};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::app::{App, AppTimer, ConnId, Effect};
use crate::config::Config;
use crate::connection::ConnLimits;
use crate::http::Pages;
use crate::logging::{Event, SUMMARY_PERIOD, Tally};
use crate::metrics::LoopEvent;
use crate::wheel::TimerWheel;
use conn::Conn;
use io::{Accept, accept, wait, write_some};
use links::{LinkChange, Links};
use member::Membership;
use token::{Tok, Tokens};

/// Errors that stop the server. Everything else is a connection's problem, not the server's.
#[derive(Debug)]
pub enum ServerError {
    /// Binding the listener failed.
    Bind(SocketAddr, std::io::Error),
    /// `epoll` itself failed.
    Poll(std::io::Error),
    /// Registering the listener or the signal pipe failed.
    Register(std::io::Error),
    /// A process of a group could not map the group's shared memory.
    Group(std::io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
            ServerError::Register(e) => write!(f, "cannot register with poll: {e}"),
            ServerError::Group(e) => write!(f, "cannot join the group's shared memory: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// What the wheel holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerEvent {
    /// A client's next deadline (its connection knows which).
    Conn(ConnId),
    /// Try gearmand link `i` again.
    Reconnect(usize),
    /// Log the summary of per-connection events counted since the first one.
    LogSummary,
    /// Check every gearmand link's health (periodic).
    LinkCheck,
    /// Accepting paused after the process ran out of descriptors; try again.
    AcceptResume,
    /// Shutdown grace is over: exit even if some clients did not hang up.
    ShutdownDeadline,
    /// Publish this process's figures to its group (periodic; only in a group).
    Publish,
    /// A timer the App asked for.
    App(AppTimer),
}

const EVENTS_CAPACITY: usize = 1024;
const SCRATCH_BYTES: usize = 64 * 1024;
const WHEEL_TICK: Duration = Duration::from_millis(1);
const WHEEL_SLOTS: usize = 4096;
/// Connections accepted in one pass at most: a burst of thousands is spread over passes, so
/// the clients already open are read and answered between its parts.
const ACCEPT_BUDGET: usize = 64;
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// What a client over `max_connections` is told before it is dropped.
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 29\r\n\
Connection: close\r\nRetry-After: 1\r\n\r\nserver at its connection limit";

/// The server: sockets, protocol state and the loop that drives them.
pub struct Server {
    cfg: Config,
    limits: ConnLimits,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    /// `--admin-listen`'s listener, and whether it has connections to accept.
    admin: Option<TcpListener>,
    admin_ready: bool,
    /// The pages of the client port and of the admin port (none without one).
    pages: (Pages, Option<Pages>),
    signals: Signals,
    tokens: Tokens,
    conns: Slab<Conn>,
    next_gen: u32,
    /// Every gearmand link (see `links`).
    links: Links,
    /// Per-connection events since the last summary, and when the first of them came.
    tally: Tally,
    tally_since: Instant,
    /// Open WebSockets per peer address (`--max-connections-per-ip`).
    per_ip: peers::PerIp,
    wheel: TimerWheel<TimerEvent>,
    app: App,
    /// Clients with unread input (an event, or a pass that stopped early).
    ready: Vec<usize>,
    /// Clients with output to write this pass.
    dirty: Vec<usize>,
    /// Clients with output left after their last write (checked against the total limit).
    backlog: Vec<usize>,
    /// Clients holding unfinished input after their last read (checked against its total).
    held: Vec<usize>,
    /// The origins our own page is served under (the listening address, `--public-origin`):
    /// an upgrade from one of them, or with no `Origin`, may be trusted.
    own_origins: Vec<String>,
    /// Clients found dead this pass, removed by `reap_closed`.
    dead: Vec<usize>,
    accept_ready: bool,
    accept_paused: bool,
    /// SIGINT or SIGTERM arrived.
    signalled: bool,
    /// Reads the settings again, for SIGHUP (see `reload`); none: SIGHUP is only logged.
    reload: Option<reload::Reader>,
    /// SIGHUP arrived.
    reload_asked: bool,
    shutting_down: bool,
    stop: bool,
    scratch: Vec<u8>,
    effects: Vec<Effect>,
    fired: Vec<TimerEvent>,
    /// This process's seat in a group of `--processes` (none when it serves alone).
    group: Option<Membership>,
}

impl Server {
    /// The address the listener got (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs until SIGINT/SIGTERM, then closes every client with 1001 and returns.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        self.log_startup();
        // This thread only: the logger and resolver threads keep the default policy.
        if self.cfg.sched_batch
            && let Err(e) = crate::os::batch_scheduling()
        {
            warn!("--sched-batch: the loop stays under the default policy ({e})");
        }
        while !self.stop {
            // Work left over from the last pass (a read budget spent, effects made after the
            // last apply) means: do not sleep.
            let leftover = !self.ready.is_empty()
                || !self.dirty.is_empty()
                || (self.accept_ready || self.admin_ready) && !self.accept_paused
                || self.app.has_effects()
                || self.links.has_unread();
            let timeout = if leftover {
                Some(Duration::ZERO)
            } else {
                self.wheel.next_deadline().map(|d| d.saturating_duration_since(Instant::now()))
            };
            wait(&mut self.poll, &mut events, timeout).map_err(ServerError::Poll)?;
            let now = Instant::now(); // every decision of this pass uses this one reading
            self.app.metrics.observe(LoopEvent::Pass);
            for event in events.iter() {
                self.note_readiness(event); // bits only, no I/O
            }
            if self.reload_asked {
                self.reload(); // what may change without dropping anyone
            }
            if self.signalled && !self.shutting_down {
                self.begin_shutdown(now); // close frames now; the loop ends when all are gone
            }
            self.accept_clients(now); // until WouldBlock, the pass's budget, or out of descriptors
            self.drive_gearman(now); // gearmand bytes -> ClientSession -> App
            self.drive_clients(now); // client bytes -> Ws -> App
            self.fire_timers(now); // wheel.expire(now) -> App / connections / links
            self.drive_gearman_again(now); // what gearmand sent meanwhile: in this pass's writes
            self.apply_effects(now); // App effects -> ws frames, SUBMIT_JOB bytes, timers
            self.flush_outputs(now); // write each dirty buffer once
            self.limit_backlog(now); // the total of all clients' output stays bounded
            self.limit_input(now); // ... and of their unfinished input
            self.reap_closed(); // deregister + slab.remove, always last
        }
        self.log_summary(Instant::now());
        info!("stopped");
        Ok(())
    }

    fn note_readiness(&mut self, event: &mio::event::Event) {
        trace!(
            "event {:?} r={} w={} closed={}",
            event.token(),
            event.is_readable(),
            event.is_writable(),
            event.is_read_closed()
        );
        match self.tokens.parse(event.token()) {
            Tok::Listener => self.accept_ready = true,
            Tok::Admin => self.admin_ready = true,
            Tok::Signals => {
                let mut caught: Vec<i32> = self.signals.pending().collect();
                self.reload_asked |= caught.contains(&signal_hook::consts::SIGHUP);
                caught.retain(|&s| s != signal_hook::consts::SIGHUP);
                if !caught.is_empty() && !self.shutting_down {
                    info!("signal {caught:?}: closing every client with 1001");
                    self.signalled = true;
                }
            }
            Tok::Resolver => self.links.note_lookups(),
            Tok::Link(i) => self.links.note(i, event),
            Tok::Client(key) => {
                let Some(c) = self.conns.get_mut(key) else { return }; // reaped this pass
                let (readable, writable) = c.io.note(event);
                if readable {
                    list(&mut self.ready, &mut c.listed.ready, key);
                }
                if writable {
                    list(&mut self.dirty, &mut c.listed.dirty, key);
                }
            }
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        self.accept_admin(now); // the admin port's few connections first: probes must not wait
        if !self.accept_ready || self.accept_paused {
            return;
        }
        // Edge-triggered: the listener is not reported again until a new connection arrives,
        // so a budget spent with some still queued leaves `accept_ready` set, and the next
        // `wait` does not sleep.
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = &self.listener else {
                self.accept_ready = false;
                return;
            };
            let (mut sock, peer) = match accept(listener) {
                Accept::Got(pair) => pair,
                Accept::Drained => {
                    self.accept_ready = false;
                    return;
                }
                Accept::Again => continue,
                Accept::Failed(e) => {
                    // EMFILE/ENFILE/ENOMEM: the backlog stays readable, so retrying now would spin.
                    // Pause, and come back on a timer.
                    debug!("accept failed ({e}); pausing accepts for {ACCEPT_RETRY:?}");
                    self.note(Event::AcceptFailed, now);
                    self.accept_paused = true;
                    self.wheel.insert(now + ACCEPT_RETRY, TimerEvent::AcceptResume);
                    return;
                }
            };
            if self.conns.len() >= self.cfg.max_connections {
                // Refused cleanly: an HTTP 503 the client can read, instead of a silent backlog.
                // A fresh socket takes these few bytes; if not, the client gets the close alone.
                let _ = write_some(&mut sock, REFUSAL);
                self.app.metrics.observe(LoopEvent::Refused);
                debug!("refused {peer}: at the limit of {} connections", self.cfg.max_connections);
                self.note(Event::Refused, now);
                continue;
            }
            self.admit(sock, peer, now);
        }
    }

    fn drive_gearman(&mut self, now: Instant) {
        self.links.drive(self.poll.registry(), now, &mut self.scratch); // gearmand bytes -> ClientSession
        self.take_link_changes(now); // -> App
    }

    /// A second read of every link gearmand owes something, right before the effects are
    /// applied: replies that arrived while the clients were read are answered in this pass's
    /// writes (one per connection) instead of waking the loop for a pass of their own.
    fn drive_gearman_again(&mut self, now: Instant) {
        self.links.drive_again(self.poll.registry(), now, &mut self.scratch);
        self.take_link_changes(now);
    }

    /// Hands what the links reported to the App (and reconnects to the wheel), in order. Called
    /// right after every call to `Links` that may have changed something.
    fn take_link_changes(&mut self, now: Instant) {
        while let Some(change) = self.links.poll_change() {
            match change {
                LinkChange::Up(i) => {
                    self.app.metrics.observe(LoopEvent::GearmandConnected);
                    self.app.handle_link_up(i);
                }
                LinkChange::Job(i, event) => self.app.handle_job_event(i, event, now),
                LinkChange::Output(i, bytes) => self.app.handle_link_output(i, bytes),
                LinkChange::Retiring(i) => self.app.handle_link_retiring(i),
                LinkChange::Down { link, was_up, attempt_failed } => {
                    self.app.handle_link_down(link, now);
                    if was_up {
                        self.app.metrics.observe(LoopEvent::GearmandLost);
                    }
                    if attempt_failed {
                        self.app.metrics.observe(LoopEvent::GearmandConnectFailed);
                    }
                }
                LinkChange::RetryAt(i, at) => {
                    self.wheel.insert(at, TimerEvent::Reconnect(i));
                }
            }
        }
    }

    fn drive_clients(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.ready);
        for &key in &ready {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.listed.ready = false;
                self.drive_client(key, now);
            }
        }
        // Keep the allocation; entries pushed during this pass (paused reads) are kept too.
        let mut ready = ready;
        ready.clear();
        ready.append(&mut self.ready);
        self.ready = ready;
    }

    fn fire_timers(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now, &mut fired);
        for event in fired.drain(..) {
            match event {
                TimerEvent::Conn(id) => self.on_conn_timer(id, now),
                TimerEvent::Reconnect(i) => {
                    self.links.connect(i, self.poll.registry(), now);
                    self.take_link_changes(now);
                }
                TimerEvent::LogSummary => self.log_summary(now),
                TimerEvent::AcceptResume => {
                    self.accept_paused = false;
                    self.accept_ready = true;
                    self.admin_ready = self.admin.is_some();
                    self.accept_clients(now);
                }
                TimerEvent::ShutdownDeadline => {
                    info!("shutdown grace over; {} connections cut", self.conns.len());
                    self.stop = true;
                }
                TimerEvent::App(timer) => self.app.handle_timer(timer, now),
                TimerEvent::LinkCheck => {
                    self.links.check(self.poll.registry(), now);
                    self.take_link_changes(now);
                }
                TimerEvent::Publish => self.publish(now),
            }
        }
        self.fired = fired;
    }

    fn apply_effects(&mut self, now: Instant) {
        // Swapped out and back so both vectors keep their allocations across passes.
        let mut effects = std::mem::take(&mut self.effects);
        self.app.drain_effects(&mut effects);
        for effect in effects.drain(..) {
            self.apply_effect(effect, now);
        }
        self.effects = effects;
    }

    fn apply_effect(&mut self, effect: Effect, now: Instant) {
        match effect {
            Effect::Send(id, text) => {
                let key = id.key as usize;
                let Some(c) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else {
                    return;
                };
                if c.conn.send_text(text) {
                    // Listed even when the socket is blocked: the output limits are checked.
                    list(&mut self.dirty, &mut c.listed.dirty, key);
                }
            }
            Effect::Submit { link, tag, function, unique, payload, mode, priority } => {
                self.links.write(link, |session, out| {
                    session.submit(tag, &function, &unique, &payload, mode, priority, out);
                });
            }
            Effect::GetStatus { link, handle, ask } => {
                self.links.write(link, |session, out| session.get_status(&handle, ask, out));
            }
            Effect::Arm(at, timer) => {
                self.wheel.insert(at, TimerEvent::App(timer));
            }
            Effect::Retire(link) => {
                self.links.retire(link, self.poll.registry(), now);
                self.take_link_changes(now);
            }
            Effect::CloseLink(link) => self.links.close(link, self.poll.registry()),
            Effect::Close(id, why) => {
                let key = id.key as usize;
                if self.conns.get(key).is_some_and(|c| c.generation == id.generation) {
                    let close = crate::connection::CloseReason::Protocol(1008);
                    self.with_conn(key, now, |s| s.conns[key].conn.close(1008, why, close, now));
                }
            }
            Effect::Note(denial) => self.note(denial.into(), now),
        }
    }

    /// Writes each buffer that has bytes, once: the clients', then the gearmand links' (the
    /// SUBMIT_JOB write wakes gearmand; last, it comes right before the loop sleeps). A write
    /// that blocks adds WRITABLE interest; a buffer that empties removes it again, so idle
    /// sockets cause no writable wakeups.
    fn flush_outputs(&mut self, now: Instant) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.listed.dirty = false;
            self.flush_client(key, now);
            // Every connection that dies in a pass passes through here: its end was marked dirty.
            if self.conns[key].conn.is_closed() {
                self.dead.push(key);
            }
        }
        // Keep the allocation, and what was marked dirty during the flush (a dropped reader
        // whose close frame waits for the next pass).
        let mut dirty = dirty;
        dirty.clear();
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
        self.links.flush(self.poll.registry(), now);
        self.take_link_changes(now);
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        for mut listener in [self.listener.take(), self.admin.take()].into_iter().flatten() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        // Before any close frame: the replies already made (effects not yet applied) and the
        // last word of every unfinished job, so a client can account for each job it sent.
        self.app.handle_shutdown(now);
        self.apply_effects(now);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.with_conn(key, now, |s| s.conns[key].conn.shutdown(now)); // close 1001 for open WebSockets
        }
        self.wheel.insert(now + self.cfg.close_timeout, TimerEvent::ShutdownDeadline);
        if self.conns.is_empty() {
            self.stop = true;
        }
    }

    fn reap_closed(&mut self) {
        let mut dead = std::mem::take(&mut self.dead);
        for key in dead.drain(..) {
            if !self.conns.get(key).is_some_and(|c| c.conn.is_closed()) {
                continue; // listed twice
            }
            let mut c = self.conns.remove(key);
            // The socket is dropped right after: closing it leaves epoll anyway.
            let _ = self.poll.registry().deregister(&mut c.sock);
            if let Some(armed) = c.timer {
                self.wheel.cancel(armed.key);
            }
            self.app.metrics.observe(LoopEvent::Closed);
        }
        self.dead = dead;
        if self.shutting_down && self.conns.is_empty() {
            self.stop = true;
        }
    }
}
impl Server {
    /// Counts a per-connection event; the first one since the last summary arms its timer.
    fn note(&mut self, event: Event, now: Instant) {
        if self.tally.note(event) {
            self.tally_since = now;
            self.wheel.insert(now + SUMMARY_PERIOD, TimerEvent::LogSummary);
        }
    }

    /// One line per kind of event counted since the first of them (at shutdown: whatever is
    /// left, so no count is lost).
    fn log_summary(&mut self, now: Instant) {
        let period = now.saturating_duration_since(self.tally_since).max(Duration::from_secs(1));
        for (level, line) in self.tally.take_summary(period) {
            log!(level, "{line}");
        }
    }
}

/// Puts `key` on a per-pass list once (`listed` remembers).
fn list(list: &mut Vec<usize>, listed: &mut bool, key: usize) {
    if !*listed {
        *listed = true;
        list.push(key);
    }
}
