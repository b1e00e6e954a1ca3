//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! `Server::run` is the table of contents: poll, note readiness, accept, drive gearmand, drive
//! clients, fire timers, apply the App's effects, flush, reap. Reads come before writes, so a
//! reply made during a pass leaves in that pass, in one write per connection. Closing is last,
//! so no slab key is reused while this batch of events may still name it.
//!
//! Only this module imports `mio`. Protocol decisions live in `ws`, `gearman` and `app`; this
//! module moves bytes and readiness between them and the kernel.

pub mod conn;
pub mod gearman_link;
pub mod io;
pub mod resolver;
pub mod token;

use std::fmt;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, log, trace, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Registry};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::app::{App, AppConfig, AppTimer, ConnId, Effect, is_trusted_peer};
use crate::config::Config;
use crate::logging::{Event, SUMMARY_PERIOD, Tally};
use crate::metrics::Gauges;
use crate::random::Entropy;
use crate::wheel::TimerWheel;
use crate::ws::{WsEvent, WsLimits};
use conn::{CloseReason, Conn, Life};
use gearman_link::{GearmanLink, Health, LinkState, OutageNote, REMINDER_PERIOD, Role, SLOTS_PER_SERVER};
use io::{Io, discard, fill, flush, write_some};
use resolver::Resolver;
use token::{LISTENER, RESOLVER, SIGNALS, Tok, Tokens};

/// Errors that stop the server. Everything else is a connection's problem, not the server's.
#[derive(Debug)]
pub enum ServerError {
    /// Binding the listener failed.
    Bind(SocketAddr, std::io::Error),
    /// `epoll` itself failed.
    Poll(std::io::Error),
    /// Registering the listener or the signal pipe failed.
    Register(std::io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
            ServerError::Register(e) => write!(f, "cannot register with poll: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Connections the kernel may hold completed for us between two accepts. Linux caps it at
/// `net.core.somaxconn` (4096 by default since 5.4). std's and mio's `bind` ask for 128: a
/// burst larger than that while one pass of the loop runs (a reconnect storm, a flood) had its
/// handshakes dropped, and each dropped client waited for a SYN retransmit (1 s, then 2 s...).
const LISTEN_BACKLOG: i32 = 65_535;

/// A nonblocking listener on `addr` with [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as mio sets).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// What the wheel holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerEvent {
    /// A client's handshake, idle or close deadline (its phase says which).
    Conn(ConnId),
    /// Try gearmand link `i` again.
    Reconnect(usize),
    /// Log the summary of per-connection events counted since the first one.
    LogSummary,
    /// Check every gearmand link's health (periodic).
    LinkCheck,
    /// A client has been over the soft output limit since then; drop it if it still is.
    SoftLimit(ConnId),
    /// Accepting paused after the process ran out of descriptors; try again.
    AcceptResume,
    /// Shutdown grace is over: exit even if some clients did not hang up.
    ShutdownDeadline,
    /// A timer the App asked for.
    App(AppTimer),
}

const EVENTS_CAPACITY: usize = 1024;
const SCRATCH_BYTES: usize = 64 * 1024;
const WHEEL_TICK: Duration = Duration::from_millis(1);
const WHEEL_SLOTS: usize = 4096;
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Bytes read from one gearmand link per pass, so a burst leaves (as client frames, written
/// each pass) while it arrives, instead of piling up in one pass's output.
const LINK_READ_BUDGET: usize = 256 * 1024;
/// The demo page, built into the binary.
const DEMO_PAGE: &str = include_str!("../demo.html");
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 29\r\n\
Connection: close\r\nRetry-After: 1\r\n\r\nserver at its connection limit";

/// The server: sockets, protocol state and the loop that drives them.
pub struct Server {
    cfg: Config,
    limits: WsLimits,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Signals,
    tokens: Tokens,
    conns: Slab<Conn>,
    next_gen: u32,
    /// `SLOTS_PER_SERVER` links per gearmand (see `gearman_link`).
    links: Vec<GearmanLink>,
    /// The active slot of each gearmand.
    active: Vec<usize>,
    /// Looks up `--gearmand` host names off the loop (only when some are not numeric).
    resolver: Option<Resolver>,
    /// The resolver's waker fired: answers are waiting.
    resolver_ready: bool,
    /// Per-connection events since the last summary, and when the first of them came.
    tally: Tally,
    tally_since: Instant,
    wheel: TimerWheel<TimerEvent>,
    app: App,
    /// Clients with unread input (an event, or a pass that stopped early).
    ready: Vec<usize>,
    /// Clients with output to write this pass.
    dirty: Vec<usize>,
    /// Links with output to write this pass.
    links_dirty: bool,
    /// Clients with output left after their last write (checked against the total limit).
    backlog: Vec<usize>,
    /// Clients found dead this pass, removed by `reap_closed`.
    dead: Vec<usize>,
    accept_ready: bool,
    accept_paused: bool,
    /// SIGINT or SIGTERM arrived.
    signalled: bool,
    shutting_down: bool,
    stop: bool,
    scratch: Vec<u8>,
    effects: Vec<Effect>,
    fired: Vec<TimerEvent>,
    rng: u64,
}

impl Server {
    /// Binds the listener and sets up the loop; gearmand links connect once `run` starts.
    pub fn bind(cfg: &Config) -> Result<Server, ServerError> {
        let poll = Poll::new().map_err(ServerError::Poll)?;
        let mut listener = listen(cfg.listen).map_err(|e| ServerError::Bind(cfg.listen, e))?;
        let local_addr = listener.local_addr().map_err(|e| ServerError::Bind(cfg.listen, e))?;
        // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt here
        // instead of one per connection (a fifth of the syscalls a handshake costs).
        socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .map_err(|e| ServerError::Bind(cfg.listen, e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Register)?;
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServerError::Register)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(ServerError::Register)?;
        let now = Instant::now();
        let mut links = Vec::new();
        for (server, addr) in cfg.gearmand.iter().enumerate() {
            for slot in 0..SLOTS_PER_SERVER {
                let role = if slot == 0 { Role::Active } else { Role::Spare };
                links.push(GearmanLink::new(addr.clone(), server, role, cfg.max_job_bytes, now));
            }
        }
        let active: Vec<usize> = (0..cfg.gearmand.len()).map(|s| s * SLOTS_PER_SERVER).collect();
        let resolver = if links.iter().all(|l| l.numeric.is_some()) {
            None
        } else {
            let waker = mio::Waker::new(poll.registry(), RESOLVER).map_err(ServerError::Register)?;
            Some(Resolver::spawn(Arc::new(waker)).map_err(ServerError::Register)?)
        };
        let mut wheel = TimerWheel::new(now, WHEEL_TICK, WHEEL_SLOTS);
        for &i in &active {
            wheel.insert(now, TimerEvent::Reconnect(i));
        }
        wheel.insert(now + link_check_period(cfg), TimerEvent::LinkCheck);
        // Reconnect jitter only needs gearsocks on one gearmand not to move in step.
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = clock.as_nanos() as u64 ^ u64::from(std::process::id()) << 32 ^ 0x9e37_79b9_7f4a_7c15;
        Ok(Server {
            limits: WsLimits::from(cfg),
            tokens: Tokens::new(links.len()),
            app: App::new(AppConfig::from(cfg), links.len(), Entropy::os()),
            cfg: cfg.clone(),
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            conns: Slab::with_capacity(1024),
            next_gen: 0,
            links,
            active,
            resolver,
            resolver_ready: false,
            tally: Tally::default(),
            tally_since: now,
            wheel,
            ready: Vec::new(),
            dirty: Vec::new(),
            links_dirty: false,
            backlog: Vec::new(),
            dead: Vec::new(),
            accept_ready: true,
            accept_paused: false,
            signalled: false,
            shutting_down: false,
            stop: false,
            scratch: vec![0; SCRATCH_BYTES],
            effects: Vec::new(),
            fired: Vec::new(),
            rng: seed | 1,
        })
    }

    /// The address the listener got (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs until SIGINT/SIGTERM, then closes every client with 1001 and returns.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        self.log_startup();
        while !self.stop {
            // Work left over from the last pass (a read budget spent, effects made after the
            // last apply) means: do not sleep.
            let leftover = !self.ready.is_empty()
                || !self.dirty.is_empty()
                || self.app.has_effects()
                || self.links_ready();
            let timeout = if leftover {
                Some(Duration::ZERO)
            } else {
                self.wheel.next_deadline().map(|d| d.saturating_duration_since(Instant::now()))
            };
            match self.poll.poll(&mut events, timeout) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                result => result.map_err(ServerError::Poll)?,
            }
            let now = Instant::now(); // every decision of this pass uses this one reading
            self.app.metrics.loop_iterations += 1;
            for event in events.iter() {
                self.note_readiness(event); // bits only, no I/O
            }
            if self.signalled && !self.shutting_down {
                self.begin_shutdown(now); // close frames now; the loop ends when all are gone
            }
            self.accept_clients(now); // until WouldBlock (or out of descriptors)
            self.drive_gearman(now); // gearmand bytes -> ClientSession -> App
            self.drive_clients(now); // client bytes -> Ws -> App
            self.fire_timers(now); // wheel.expire(now) -> App / connections / links
            self.apply_effects(now); // App effects -> ws frames, SUBMIT_JOB bytes, timers
            self.flush_outputs(now); // write each dirty buffer once
            self.limit_backlog(); // the total of all clients' output stays bounded
            self.reap_closed(now); // deregister + slab.remove, always last
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
            Tok::Signals => {
                let caught: Vec<i32> = self.signals.pending().collect();
                if !caught.is_empty() && !self.shutting_down {
                    info!("signal {caught:?}: closing every client with 1001");
                    self.signalled = true;
                }
            }
            Tok::Resolver => self.resolver_ready = true,
            Tok::Link(i) => {
                let link = &mut self.links[i];
                // A connecting socket reports completion (or failure) as writable or error.
                if event.is_readable() || event.is_error() || event.is_read_closed() {
                    link.can_read = true;
                    link.hup_seen |= event.is_read_closed() || event.is_error();
                }
                if event.is_writable() || event.is_error() {
                    link.write_blocked = false;
                    self.links_dirty = true;
                }
            }
            Tok::Client(key) => {
                let Some(conn) = self.conns.get_mut(key) else { return }; // reaped this pass
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    conn.can_read = true;
                    conn.hup_seen |= event.is_read_closed() || event.is_error();
                    if !conn.in_ready {
                        conn.in_ready = true;
                        self.ready.push(key);
                    }
                }
                if event.is_writable() || event.is_error() {
                    conn.write_blocked = false;
                    if !conn.in_dirty {
                        conn.in_dirty = true;
                        self.dirty.push(key);
                    }
                }
            }
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        if !self.accept_ready || self.accept_paused {
            return;
        }
        let Some(listener) = &self.listener else { return };
        loop {
            let (mut sock, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.accept_ready = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::ConnectionAborted => {
                    continue;
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOMEM: the backlog stays readable, so retrying now would spin.
                    // Pause, and come back on a timer.
                    debug!("accept failed ({e}); pausing accepts for {ACCEPT_RETRY:?}");
                    note(&mut self.tally, &mut self.tally_since, &mut self.wheel, Event::AcceptFailed, now);
                    self.accept_paused = true;
                    self.wheel.insert(now + ACCEPT_RETRY, TimerEvent::AcceptResume);
                    return;
                }
            };
            if self.conns.len() >= self.cfg.max_connections {
                // Refused cleanly: an HTTP 503 the client can read, instead of a silent backlog.
                use std::io::Write;
                let _ = sock.write(REFUSAL);
                self.app.metrics.refused += 1;
                debug!("refused {peer}: at the limit of {} connections", self.cfg.max_connections);
                note(&mut self.tally, &mut self.tally_since, &mut self.wheel, Event::Refused, now);
                continue;
            }
            debug_assert!(sock.nodelay().unwrap_or(false), "TCP_NODELAY is inherited from the listener");
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            self.next_gen = self.next_gen.wrapping_add(1);
            if let Err(e) =
                self.poll.registry().register(&mut sock, self.tokens.client(key), Interest::READABLE)
            {
                warn!("cannot register a client: {e}");
                continue;
            }
            let mut conn = Conn::new(sock, self.next_gen, peer, now);
            conn.timer =
                Some(self.wheel.insert(now + self.cfg.handshake_timeout, TimerEvent::Conn(conn.id(key))));
            conn.in_ready = true;
            entry.insert(conn);
            self.ready.push(key);
            self.app.metrics.accepted += 1;
            debug!("conn={key} accepted from {peer}");
        }
    }

    fn drive_gearman(&mut self, now: Instant) {
        if std::mem::take(&mut self.resolver_ready) {
            self.take_lookups(now);
        }
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            let event_seen = link.can_read || !link.write_blocked;
            if let LinkState::Connecting(sock) = &mut link.state {
                // A nonblocking connect is done when the socket is writable: take_error() says
                // whether it failed, peer_addr() whether it is really connected yet.
                if !event_seen {
                    continue;
                }
                match (sock.take_error(), sock.peer_addr()) {
                    (Ok(None), Ok(_)) => {
                        link.connected(now); // OPTION_REQ queued: up once gearmand answers it
                        self.links_dirty = true;
                    }
                    (Ok(None), Err(e)) if e.kind() == ErrorKind::NotConnected => continue,
                    (Ok(Some(e)) | Err(e), _) | (_, Err(e)) => {
                        self.link_down(i, now, &connect_error(&e));
                        continue;
                    }
                }
            }
            self.read_link(i, now);
        }
    }

    /// True when some gearmand link stopped reading at its budget with bytes still waiting.
    fn links_ready(&self) -> bool {
        self.links.iter().any(|l| l.can_read && matches!(l.state, LinkState::Greeting(_) | LinkState::Up(_)))
    }

    fn read_link(&mut self, i: usize, now: Instant) {
        let link = &mut self.links[i];
        let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut link.state else { return };
        if !link.can_read {
            return;
        }
        let outcome = fill(sock, &mut link.input, &mut self.scratch, LINK_READ_BUDGET, !link.hup_seen);
        if matches!(outcome, Ok((_, n)) if n > 0) {
            link.last_heard = now;
        }
        let decoded = link.session.handle_input(&mut link.input);
        if matches!(link.state, LinkState::Greeting(_)) && link.session.has_answered() {
            link.greeted(now);
            self.app.metrics.gearmand_connects += 1;
            match link.back() {
                Some(outage) => info!(
                    "gearmand {} back after {} failed attempts ({:.1} s down)",
                    link.addr,
                    outage.attempts,
                    now.saturating_duration_since(outage.since).as_secs_f64()
                ),
                None => info!("gearmand {} connected", link.addr),
            }
            self.app.handle_link_up(i);
        }
        let link = &mut self.links[i];
        while let Some(event) = link.session.poll_event() {
            trace!("gearmand {i}: {event:?}");
            self.app.handle_job_event(i, event, now);
        }
        let link = &mut self.links[i];
        match (outcome, decoded) {
            (_, Err(e)) => self.link_down(i, now, &format!("protocol error: {e}")),
            (Err(e), _) => self.link_down(i, now, &format!("read failed: {e}")),
            (Ok((Io::Eof, _)), _) => self.link_down(i, now, "gearmand closed the connection"),
            (Ok((Io::Blocked, _)), _) => link.can_read = false,
            (Ok((Io::Paused, _)), _) => {} // budget spent or input full: the next pass reads on
        }
    }

    /// A link failed: its jobs end (the App sends their terminal replies). The active link of
    /// a gearmand reconnects with exponential back-off and jitter; a retiring one is simply
    /// gone.
    fn link_down(&mut self, i: usize, now: Instant, why: &str) {
        let link = &mut self.links[i];
        let was_up = link.is_up();
        if let Some(sock) = link.sock() {
            let _ = self.poll.registry().deregister(sock);
        }
        link.state = LinkState::Down;
        link.reset_buffers();
        self.app.handle_link_down(i);
        if was_up {
            self.app.metrics.gearmand_disconnects += 1;
        }
        let link = &mut self.links[i];
        if link.role != Role::Active {
            link.role = Role::Spare;
            return warn!("gearmand {}: a retired connection was lost ({why})", link.addr);
        }
        link.failures = link.failures.saturating_add(1);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let delay = link.backoff(self.cfg.reconnect_min, self.cfg.reconnect_max, self.rng);
        self.wheel.insert(now + delay, TimerEvent::Reconnect(i));
        if was_up {
            link.lost(now, why);
            return warn!("gearmand {} lost ({why}); reconnecting", link.addr);
        }
        self.app.metrics.gearmand_connect_failures += 1;
        debug!("gearmand {}: {why}; retrying in {delay:?}", link.addr);
        // One line per outage and per change of reason, then a reminder at a low rate.
        let note = link.attempt_failed(now, why);
        let addr = &link.addr;
        match note {
            OutageNote::First | OutageNote::Changed => warn!(
                "gearmand {addr} unreachable: {why}; retrying with back-off (reminder every {} s)",
                REMINDER_PERIOD.as_secs()
            ),
            OutageNote::Reminder => {
                if let Some(o) = &link.outage {
                    let down = now.saturating_duration_since(o.since).as_secs();
                    warn!("gearmand {addr} still unreachable ({why}): {} attempts in {down} s", o.attempts);
                }
            }
            OutageNote::Quiet => {}
        }
    }

    /// A down active link tries again: a numeric address connects now; a host name is
    /// looked up first, off the loop, every time (a gearmand that moved is found).
    fn connect_link(&mut self, i: usize, now: Instant) {
        let link = &mut self.links[i];
        if link.role != Role::Active || !matches!(link.state, LinkState::Down) {
            return;
        }
        if let Some(addr) = link.numeric {
            return self.open_link(i, addr, now);
        }
        let Some(resolver) = &self.resolver else { return self.link_down(i, now, "no resolver thread") };
        if !link.lookup_pending {
            // A lookup that outlived the timeout is still on its way: wait for it.
            resolver.ask(i, &link.addr);
            link.lookup_pending = true;
        }
        link.resolving(now);
        debug!("gearmand {}: looking up the name", link.addr);
    }

    /// The resolver answered: links still waiting for their lookup connect (or fail).
    fn take_lookups(&mut self, now: Instant) {
        let Some(resolver) = &self.resolver else { return };
        let answers: Vec<_> = resolver.answers().collect();
        for answer in answers {
            let link = &mut self.links[answer.link];
            link.lookup_pending = false;
            if link.role != Role::Active || !matches!(link.state, LinkState::Resolving) {
                continue; // timed out meanwhile; the next attempt asks again
            }
            match answer.result {
                // Several addresses: each failed attempt moves on to the next one.
                Ok(addrs) if !addrs.is_empty() => {
                    let addr = addrs[link.failures as usize % addrs.len()];
                    self.open_link(answer.link, addr, now);
                }
                Ok(_) => self.link_down(answer.link, now, "name not found"),
                Err(why) => self.link_down(answer.link, now, &why),
            }
        }
    }

    fn open_link(&mut self, i: usize, addr: SocketAddr, now: Instant) {
        let token = self.tokens.link(i);
        let registry: &Registry = self.poll.registry();
        let result = self.links[i]
            .start_connect(addr, now)
            .and_then(|sock| registry.register(sock, token, Interest::READABLE | Interest::WRITABLE));
        match result {
            Ok(()) => {
                // Gearman links are few and long-lived: registered for both directions once, so
                // that the connect's completion (a writable edge) is seen.
                self.links[i].write_blocked = true;
                debug!("gearmand {}: connecting to {addr}", self.links[i].addr);
            }
            Err(e) => self.link_down(i, now, &connect_error(&e)),
        }
    }

    /// The periodic health check: a link that stopped answering is declared dead (its jobs
    /// end, it reconnects); a quiet one is probed.
    fn check_links(&mut self, now: Instant) {
        let timeout = self.cfg.gearmand_timeout;
        for i in 0..self.links.len() {
            match self.links[i].check_health(now, timeout) {
                Health::Fine => {}
                Health::Probe => {
                    let link = &mut self.links[i];
                    link.session.probe(&mut link.output);
                    self.links_dirty = true;
                }
                Health::Dead(why) => self.link_down(i, now, why),
            }
        }
        self.wheel.insert(now + link_check_period(&self.cfg), TimerEvent::LinkCheck);
    }

    /// The App found a connection with too many abandoned jobs: a spare slot of the same
    /// gearmand becomes its active link, and the old connection finishes its live jobs.
    fn retire_link(&mut self, i: usize, now: Instant) {
        let server = self.links[i].server;
        if self.active[server] != i || !self.links[i].is_up() {
            return;
        }
        let group = server * SLOTS_PER_SERVER..(server + 1) * SLOTS_PER_SERVER;
        let spare = group
            .into_iter()
            .find(|&s| self.links[s].role == Role::Spare && matches!(self.links[s].state, LinkState::Down));
        let Some(spare) = spare else {
            return debug!(
                "gearmand {}: too many abandoned jobs, but no slot to retire into",
                self.links[i].addr
            );
        };
        info!(
            "gearmand {}: connection retired (abandoned jobs over --max-orphans); new work goes to a fresh one",
            self.links[i].addr
        );
        self.links[i].role = Role::Retiring;
        self.links[spare].role = Role::Active;
        self.links[spare].failures = 0;
        self.active[server] = spare;
        self.app.handle_link_retiring(i);
        self.connect_link(spare, now);
    }

    /// A retired connection has no live job left: close it. gearmand forgets the abandoned
    /// jobs that were queued for it.
    fn close_link(&mut self, i: usize) {
        let link = &mut self.links[i];
        if let Some(sock) = link.sock() {
            let _ = self.poll.registry().deregister(sock);
        }
        debug!("gearmand {}: retired connection closed", link.addr);
        link.state = LinkState::Down;
        link.reset_buffers();
        link.role = Role::Spare;
    }

    fn drive_clients(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.ready);
        for &key in &ready {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.in_ready = false;
                self.drive_client(key, now);
            }
        }
        // Keep the allocation; entries pushed during this pass (paused reads) are kept too.
        let mut ready = ready;
        ready.clear();
        ready.append(&mut self.ready);
        self.ready = ready;
    }

    /// One client: read what its socket has (up to the budget), run the protocol, hand each
    /// event to the App. Writing happens later, in `flush_outputs`, once per pass; a connection
    /// that has replies or is ending is put on the dirty list for it.
    fn drive_client(&mut self, key: usize, now: Instant) {
        self.read_client(key, now);
        let conn = &mut self.conns[key];
        if conn.ws.output_len() > 0 || conn.life != Life::Live {
            mark_dirty(&mut self.dirty, conn, key);
        }
    }

    fn read_client(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        if !conn.can_read || conn.life == Life::Dead {
            return;
        }
        if conn.reason == Some(CloseReason::OutputLimit) {
            // A dropped slow reader is not read again: a client that only writes is held back
            // by TCP until the close timeout, not fed by us.
            return;
        }
        let id = conn.id(key);
        let outcome = match conn.ws.input() {
            Some(input) if conn.life == Life::Live => {
                fill(&mut conn.sock, input, &mut self.scratch, self.cfg.read_budget_bytes, !conn.hup_seen)
            }
            // Draining or lingering: what the peer still sends is read and dropped.
            _ => discard(&mut conn.sock, &mut self.scratch),
        };
        match outcome {
            Ok((_, n)) if n > 0 => {
                conn.last_seen = now;
                conn.pinged = false;
            }
            _ => {}
        }
        match outcome {
            Ok((Io::Blocked, _)) => conn.can_read = false,
            Ok((Io::Paused, _)) => {
                // Budget spent or buffer full: come back next pass without waiting for an edge.
                conn.in_ready = true;
                self.ready.push(key);
            }
            Ok((Io::Eof, _)) => {
                conn.can_read = false;
                conn.peer_eof = true;
                conn.ws.handle_eof();
            }
            Err(e) => {
                conn.kill(CloseReason::Io(e.kind()));
                return self.app.handle_client_closed(id);
            }
        }
        if conn.life != Life::Live {
            if matches!(outcome, Ok((Io::Eof, _))) {
                // The peer hung up after our last bytes: done.
                let reason = conn.reason.clone().unwrap_or(CloseReason::PeerClosed);
                conn.kill(reason);
            }
            return;
        }
        while let Some(event) = self.conns[key].ws.poll_event(&self.limits) {
            self.on_ws_event(key, id, event, now);
        }
        let conn = &mut self.conns[key];
        if conn.life == Life::Live && conn.ws.is_done() {
            conn.drain(CloseReason::PeerClosed);
        }
        if matches!(outcome, Ok((Io::Eof, _))) && conn.life == Life::Live {
            // FIN in the middle of a frame or before any request: nothing more can come.
            conn.kill(CloseReason::Abrupt);
            self.app.handle_client_closed(id);
        }
    }

    fn on_ws_event(&mut self, key: usize, id: ConnId, event: WsEvent, now: Instant) {
        match event {
            WsEvent::Opened(upgrade) => {
                let conn = &mut self.conns[key];
                self.app.metrics.handshakes += 1;
                debug!("conn={key} open");
                if let Some(t) = conn.timer.take() {
                    self.wheel.cancel(t);
                }
                conn.timer = Some(self.wheel.insert(now + self.cfg.idle_timeout, TimerEvent::Conn(id)));
                let trusted =
                    is_trusted_peer(conn.peer.ip(), upgrade.origin_is_own_or_absent(), upgrade.forwarded);
                self.app.handle_client_open(id, trusted);
            }
            WsEvent::Http { method, path } => self.answer_http(key, &method, &path, now),
            WsEvent::Text(text) => self.app.handle_client_text(id, &text, now),
            WsEvent::Binary => self.app.handle_client_binary(id),
            WsEvent::Closed => {
                debug!("conn={key} close frame from peer");
                self.conns[key].drain(CloseReason::PeerClosed);
                self.app.handle_client_closed(id);
            }
            WsEvent::Failed { code, why } => {
                debug!("conn={key} reason=protocol code={code}: {why}");
                // 1006 is never sent: it is how the Ws says the peer left without a close frame.
                let reason = if code == 1006 { CloseReason::Abrupt } else { CloseReason::Protocol(code) };
                self.conns[key].drain(reason);
                self.app.handle_client_closed(id);
            }
        }
    }

    /// Each gearmand as `/healthz` and `/metrics` show it: address, the active connection's
    /// state (`stalled` when it is up but not taking bytes or not answering), connections made,
    /// retiring connections; and whether any takes work.
    fn link_report(&self, now: Instant) -> (Vec<(String, &'static str, u64, usize)>, bool) {
        let timeout = self.cfg.gearmand_timeout;
        let mut any_up = false;
        let report = self
            .active
            .iter()
            .enumerate()
            .map(|(server, &i)| {
                let link = &self.links[i];
                let group = &self.links[server * SLOTS_PER_SERVER..(server + 1) * SLOTS_PER_SERVER];
                let connects = group.iter().map(|l| l.connects).sum();
                let retiring = group.iter().filter(|l| l.role == Role::Retiring).count();
                let stalled = self.app.is_link_stalled(i) || link.is_lagging(now, timeout);
                let state = if link.is_up() && stalled { "stalled" } else { link.state_name() };
                any_up |= state == "connected";
                (link.addr.clone(), state, connects, retiring)
            })
            .collect();
        (report, any_up)
    }

    fn answer_http(&mut self, key: usize, method: &str, path: &str, now: Instant) {
        self.app.metrics.http_requests += 1;
        let path = path.split('?').next().unwrap_or("");
        let known = matches!(path, "/" | "/healthz" | "/metrics");
        let (status, reason, ctype, body): (u16, &str, &str, Vec<u8>) = if !known {
            (404, "Not Found", "text/plain; charset=utf-8", b"not found\n".to_vec())
        } else if method != "GET" {
            (405, "Method Not Allowed", "text/plain; charset=utf-8", b"only GET\n".to_vec())
        } else if path == "/" {
            (200, "OK", "text/html; charset=utf-8", DEMO_PAGE.as_bytes().to_vec())
        } else if path == "/healthz" {
            let (links, any_up) = self.link_report(now);
            let servers: Vec<_> = links
                .iter()
                .map(|(addr, state, connects, retiring)| {
                    json!({"server": addr, "state": state, "connects": connects, "retiring": retiring})
                })
                .collect();
            let body = json!({
                "status": if any_up { "ok" } else { "unavailable" },
                "gearmand": servers,
                "connections": self.conns.len(),
                "jobs_in_flight": self.app.jobs_in_flight(),
                "jobs_queued": self.app.jobs_queued(),
            });
            let (status, reason) = if any_up { (200, "OK") } else { (503, "Service Unavailable") };
            (status, reason, "application/json", format!("{body}\n").into_bytes())
        } else {
            let gauges = Gauges {
                connections: self.conns.len(),
                jobs_in_flight: self.app.jobs_in_flight(),
                jobs_queued: self.app.jobs_queued(),
                timers: self.wheel.len(),
                stored_values: self.app.stored_values(),
                stored_bytes: self.app.stored_bytes(),
                client_output_bytes: self.backlog_bytes(),
                links: self.link_report(now).0.into_iter().map(|(addr, state, ..)| (addr, state)).collect(),
            };
            let text = self.app.metrics.render(&gauges);
            (200, "OK", "text/plain; version=0.0.4; charset=utf-8", text.into_bytes())
        };
        let conn = &mut self.conns[key];
        conn.ws.respond(status, reason, ctype, &body);
        conn.drain(CloseReason::HttpDone);
    }

    fn fire_timers(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now, &mut fired);
        for event in fired.drain(..) {
            match event {
                TimerEvent::Conn(id) => self.on_conn_timer(id, now),
                TimerEvent::Reconnect(i) => self.connect_link(i, now),
                TimerEvent::LogSummary => self.log_summary(now),
                TimerEvent::AcceptResume => {
                    self.accept_paused = false;
                    self.accept_ready = true;
                    self.accept_clients(now);
                }
                TimerEvent::ShutdownDeadline => {
                    info!("shutdown grace over; {} connections cut", self.conns.len());
                    self.stop = true;
                }
                TimerEvent::App(timer) => self.app.handle_timer(timer, now),
                TimerEvent::LinkCheck => self.check_links(now),
                TimerEvent::SoftLimit(id) => self.check_soft_limit(id, now),
            }
        }
        self.fired = fired;
    }

    /// A connection's one timer: the handshake deadline, the idle check, or the close deadline.
    fn on_conn_timer(&mut self, id: ConnId, now: Instant) {
        let key = id.key as usize;
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else { return };
        conn.timer = None;
        let rearm = match conn.life {
            Life::Draining | Life::Lingering => {
                conn.kill(CloseReason::CloseTimeout);
                None
            }
            Life::Dead => None,
            Life::Live if conn.ws.is_handshaking() => {
                debug!("conn={key} reason=handshake_timeout");
                conn.ws.respond(408, "Request Timeout", "text/plain", b"request not received in time\n");
                conn.drain(CloseReason::HandshakeTimeout);
                self.app.handle_client_closed(id);
                None
            }
            Life::Live => {
                let idle = now.saturating_duration_since(conn.last_seen);
                if idle < self.cfg.idle_timeout {
                    Some(conn.last_seen + self.cfg.idle_timeout)
                } else if !conn.pinged {
                    // Keepalive: any answer (the pong) counts as traffic and resets `last_seen`.
                    conn.pinged = true;
                    conn.ws.send_ping();
                    Some(now + self.cfg.idle_timeout)
                } else {
                    debug!("conn={key} reason=idle_timeout");
                    conn.ws.close(1001, "idle timeout");
                    conn.drain(CloseReason::IdleTimeout);
                    self.app.handle_client_closed(id);
                    None
                }
            }
        };
        let conn = &mut self.conns[key];
        if let Some(at) = rearm {
            conn.timer = Some(self.wheel.insert(at, TimerEvent::Conn(id)));
        }
        if conn.ws.output_len() > 0 || conn.life != Life::Live {
            mark_dirty(&mut self.dirty, conn, key);
        }
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
                let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else {
                    return;
                };
                if conn.ws.send_text(text) {
                    mark_dirty(&mut self.dirty, conn, key);
                }
            }
            Effect::Submit { link, tag, function, unique, payload, mode, priority } => {
                let l = &mut self.links[link];
                if l.is_up() {
                    l.session.submit(tag, &function, &unique, &payload, mode, priority, &mut l.output);
                    self.links_dirty = true;
                }
            }
            Effect::GetStatus { link, handle, ask } => {
                let l = &mut self.links[link];
                if l.is_up() {
                    l.session.get_status(&handle, ask, &mut l.output);
                    self.links_dirty = true;
                }
            }
            Effect::Arm(at, timer) => {
                self.wheel.insert(at, TimerEvent::App(timer));
            }
            Effect::Retire(link) => self.retire_link(link, now),
            Effect::CloseLink(link) => self.close_link(link),
        }
    }

    /// Writes each buffer that has bytes, once. A client write that blocks adds WRITABLE
    /// interest; a buffer that empties removes it again, so idle sockets cause no writable
    /// wakeups. gearmand links stay registered for both (they are few and long-lived).
    fn flush_outputs(&mut self, now: Instant) {
        if self.links_dirty {
            self.links_dirty = false;
            for i in 0..self.links.len() {
                let link = &mut self.links[i];
                if link.output.is_empty() || link.write_blocked {
                    continue;
                }
                let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut link.state else { continue };
                match flush(sock, &mut link.output) {
                    Ok(Io::Blocked) => link.write_blocked = true,
                    Ok(_) => {}
                    Err(e) => self.link_down(i, now, &format!("write failed: {e}")),
                }
            }
            // Link output only shrinks here, and whatever grows it marks the links dirty: the
            // App's figure is corrected only when it may have changed.
            for i in 0..self.links.len() {
                if self.links[i].is_up() {
                    self.app.handle_link_output(i, self.links[i].output.len());
                }
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.in_dirty = false;
            self.flush_client(key, now);
            // Every connection that dies in a pass passes through here: its end was marked dirty.
            if self.conns[key].life == Life::Dead {
                self.dead.push(key);
            }
        }
        // Keep the allocation, and what was marked dirty during the flush (a dropped reader
        // whose close frame waits for the next pass).
        let mut dirty = dirty;
        dirty.clear();
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    fn flush_client(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        if conn.life == Life::Dead {
            return;
        }
        if conn.life != Life::Live && !conn.close_armed {
            // Leaving `Live` bounds what is left of the connection's life by the close timeout.
            conn.close_armed = true;
            if let Some(t) = conn.timer.take() {
                self.wheel.cancel(t);
            }
            let at = now + self.cfg.close_timeout;
            conn.timer = Some(self.wheel.insert(at, TimerEvent::Conn(conn.id(key))));
        }
        if !conn.write_blocked && conn.ws.output_len() > 0 {
            match write_some(&mut conn.sock, conn.ws.output()) {
                Ok((io, written)) => {
                    // Partial writes are normal: the Ws keeps the tail and knows where its
                    // frames begin, so a slow reader can still be sent a clean close.
                    conn.ws.consume_output(written);
                    conn.write_blocked = io == Io::Blocked;
                }
                Err(e) => {
                    let id = conn.id(key);
                    conn.kill(CloseReason::Io(e.kind()));
                    return self.app.handle_client_closed(id);
                }
            }
        }
        let pending = conn.ws.output_len();
        if conn.life == Life::Live {
            if pending > self.cfg.client_out_hard_bytes {
                self.drop_slow_reader(key, "over the hard output limit");
            } else if pending > self.cfg.client_out_soft_bytes {
                // Over the soft limit: allowed for a while (a reader catching up with a burst);
                // a timer comes back to see whether it still is.
                if conn.over_soft_since.is_none() {
                    conn.over_soft_since = Some(now);
                    let at = now + self.cfg.client_out_soft_time;
                    self.wheel.insert(at, TimerEvent::SoftLimit(conn.id(key)));
                }
            } else {
                conn.over_soft_since = None;
            }
        }
        let conn = &mut self.conns[key];
        if conn.life == Life::Dead {
            return;
        }
        let pending = conn.ws.output_len();
        if pending > 0 && !conn.in_backlog {
            conn.in_backlog = true;
            self.backlog.push(key);
        }
        let want_writable = pending > 0;
        if want_writable != conn.writable_interest {
            let interest =
                if want_writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            let _ = self.poll.registry().reregister(&mut conn.sock, self.tokens.client(key), interest);
            conn.writable_interest = want_writable;
        }
        if pending == 0 {
            conn.ws.release_idle_buffers();
            if conn.life == Life::Draining && conn.peer_eof {
                let reason = conn.reason.clone().unwrap_or(CloseReason::PeerClosed);
                conn.kill(reason);
            } else if conn.life == Life::Draining {
                // All our bytes are out: shut our side and wait for the peer to hang up, reading
                // what it still sends (closing with unread input would reset the connection and
                // could destroy our last frame before the peer reads it).
                let _ = conn.sock.shutdown(std::net::Shutdown::Write);
                conn.life = Life::Lingering;
            }
        }
    }

    /// The soft limit's grace is over: a client still above it is dropped.
    fn check_soft_limit(&mut self, id: ConnId, now: Instant) {
        let key = id.key as usize;
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else { return };
        let Some(since) = conn.over_soft_since else { return };
        if conn.life != Life::Live || conn.ws.output_len() <= self.cfg.client_out_soft_bytes {
            conn.over_soft_since = None;
        } else if now.saturating_duration_since(since) >= self.cfg.client_out_soft_time {
            self.drop_slow_reader(key, "over the soft output limit for too long");
        } else {
            // It dipped under and went over again since: this timer belongs to the new spell.
            self.wheel.insert(since + self.cfg.client_out_soft_time, TimerEvent::SoftLimit(id));
        }
    }

    /// Bytes queued for all clients (those with a backlog after their last write).
    fn backlog_bytes(&self) -> usize {
        self.backlog.iter().filter_map(|&k| self.conns.get(k)).map(|c| c.ws.output_len()).sum()
    }

    /// Keeps the output of all clients together under `client_out_total_bytes`, dropping the
    /// largest backlogs first. Only connections whose last write left bytes are looked at.
    fn limit_backlog(&mut self) {
        let conns = &mut self.conns;
        self.backlog.retain(|&k| match conns.get_mut(k) {
            Some(c) if c.life != Life::Dead && c.ws.output_len() > 0 => true,
            Some(c) => {
                c.in_backlog = false;
                false
            }
            None => false,
        });
        let mut total = self.backlog_bytes();
        if total <= self.cfg.client_out_total_bytes {
            return;
        }
        let mut largest: Vec<(usize, usize)> =
            self.backlog.iter().map(|&k| (self.conns[k].ws.output_len(), k)).collect();
        largest.sort_unstable_by(|a, b| b.cmp(a));
        for (bytes, key) in largest {
            if total <= self.cfg.client_out_total_bytes {
                break;
            }
            if self.conns[key].life == Life::Live {
                self.drop_slow_reader(key, "largest backlog while all clients' output is over its total");
                total -= bytes.saturating_sub(self.conns[key].ws.output_len());
            }
        }
    }

    /// A client that does not read its replies is dropped: what was not yet started is
    /// discarded, and a close 1008 follows the frame already on the wire, if the socket still
    /// takes it before the close timeout.
    fn drop_slow_reader(&mut self, key: usize, why: &str) {
        let conn = &mut self.conns[key];
        let id = conn.id(key);
        debug!("conn={key} slow reader dropped: {why} ({} bytes queued)", conn.ws.output_len());
        self.app.metrics.slow_readers_dropped += 1;
        if conn.ws.abort(1008, "not reading fast enough") {
            conn.drain(CloseReason::OutputLimit);
        } else {
            conn.kill(CloseReason::OutputLimit);
        }
        mark_dirty(&mut self.dirty, conn, key);
        self.app.handle_client_closed(id);
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        for (key, conn) in self.conns.iter_mut() {
            if conn.ws.is_open() {
                conn.ws.close(1001, "server shutting down");
                conn.drain(CloseReason::Shutdown);
            } else if conn.life == Life::Live {
                conn.kill(CloseReason::Shutdown);
            }
            mark_dirty(&mut self.dirty, conn, key);
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(k, c)| c.id(k)).collect();
        for id in ids {
            self.app.handle_client_closed(id);
        }
        self.wheel.insert(now + self.cfg.close_timeout, TimerEvent::ShutdownDeadline);
        if self.conns.is_empty() {
            self.stop = true;
        }
    }

    fn reap_closed(&mut self, now: Instant) {
        let mut dead = std::mem::take(&mut self.dead);
        for key in dead.drain(..) {
            if !self.conns.get(key).is_some_and(|c| c.life == Life::Dead) {
                continue; // listed twice
            }
            let mut conn = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut conn.sock);
            if let Some(t) = conn.timer {
                self.wheel.cancel(t);
            }
            self.app.metrics.closed += 1;
            // One line per connection at debug; the operator's level gets counts (`log_summary`).
            debug!("conn={key} peer={} closed reason={:?}", conn.peer, conn.reason);
            if let Some(event) = conn.reason.as_ref().and_then(|r| r.event(conn.ws.is_handshaking())) {
                self.note(event, now);
            }
        }
        self.dead = dead;
        if self.shutting_down && self.conns.is_empty() {
            self.stop = true;
        }
    }
}

impl Server {
    /// The startup line: what is in force, so an operator can check it against intent.
    fn log_startup(&self) {
        let c = &self.cfg;
        info!(
            "gearsock {} on ws://{}: gearmand {}; max {} connections, {} per message, {} per job; \
             client output {} soft, {} hard, {} total; worker token {}",
            env!("CARGO_PKG_VERSION"),
            self.local_addr,
            c.gearmand.join(", "),
            c.max_connections,
            human_bytes(c.max_message_bytes),
            human_bytes(c.max_job_bytes),
            human_bytes(c.client_out_soft_bytes),
            human_bytes(c.client_out_hard_bytes),
            human_bytes(c.client_out_total_bytes),
            if c.worker_token.is_some() { "required" } else { "not set (loopback peers are trusted)" },
        );
    }

    fn note(&mut self, event: Event, now: Instant) {
        note(&mut self.tally, &mut self.tally_since, &mut self.wheel, event, now);
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

/// Counts a per-connection event; the first one since the last summary arms its timer. (Takes
/// the fields it needs, so the accept loop can call it while it holds the listener.)
fn note(
    tally: &mut Tally,
    since: &mut Instant,
    wheel: &mut TimerWheel<TimerEvent>,
    event: Event,
    now: Instant,
) {
    if tally.note(event) {
        *since = now;
        wheel.insert(now + SUMMARY_PERIOD, TimerEvent::LogSummary);
    }
}

/// `65536` as `64 KiB`: limits are usually powers of two; others stay exact.
fn human_bytes(n: usize) -> String {
    match n {
        0 => "0 B".into(),
        n if n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// A failed connect, in an operator's words.
fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => {
            "connection refused (is gearmand running and listening there?)".into()
        }
        ErrorKind::TimedOut => "connect timed out".into(),
        _ => format!("connect failed: {e}"),
    }
}

/// How often gearmand links are checked: a fifth of the timeout (so a dead link is found at
/// most a fifth late), between 10 ms and 1 s.
fn link_check_period(cfg: &Config) -> Duration {
    (cfg.gearmand_timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn mark_dirty(dirty: &mut Vec<usize>, conn: &mut Conn, key: usize) {
    if !conn.in_dirty {
        conn.in_dirty = true;
        dirty.push(key);
    }
}
