//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! `Server::run` is the table of contents: poll, note readiness, accept, drive gearmand, drive
//! clients, fire timers, apply the App's effects, flush, reap. Reads come before writes, so a
//! reply made during a pass leaves in that pass, in one write per connection. Closing is last,
//! so no slab key is reused while this batch of events may still name it.
//!
//! Only `server/` imports `mio` for the server (the load generator in `bench/` runs loops of
//! its own). Protocol decisions live in `connection`, `ws`, `gearman` and `app`; this module
//! moves bytes and readiness between them and the kernel.

pub mod conn;
pub mod gearman_link;
pub mod io;
pub mod member;
pub mod resolver;
pub mod settings;
pub mod token;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, log, trace, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::app::{App, AppTimer, ConnId, Effect, is_trusted_peer};
use crate::config::Config;
use crate::connection::{AfterWrite, CloseReason, ConnEvent, ConnLimits, Connection, ReadInto};
use crate::http::{self, LinkView, Response, Snapshot};
use crate::logging::{Event, SUMMARY_PERIOD, Tally};
use crate::metrics::{Gauges, LoopEvent};
use crate::random::{Entropy, XorShift64};
use crate::wheel::TimerWheel;
use conn::Conn;
use gearman_link::{GearmanLink, Health, LinkState, OutageNote, REMINDER_PERIOD, Role, SLOTS_PER_SERVER};
use io::{
    Accept, Io, accept, connect_error, connect_outcome, discard, fill, flush, interest, wait, write_some,
};
use member::{Membership, PUBLISH_PERIOD};
use resolver::Resolver;
use settings::{app_config, conn_limits};
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

/// Connections the kernel may hold completed for us between two accepts. Linux caps it at
/// `net.core.somaxconn` (4096 by default since 5.4). std's and mio's `bind` ask for 128: a
/// burst larger than that while one pass of the loop runs (a reconnect storm, a flood) had its
/// handshakes dropped, and each dropped client waited for a SYN retransmit (1 s, then 2 s...).
const LISTEN_BACKLOG: i32 = 65_535;

/// A nonblocking listener on `addr` with [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as mio sets).
/// Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt here instead
/// of one per connection (a fifth of the syscalls a handshake costs). `shared`: a process of a
/// group, whose listeners share the port with SO_REUSEPORT (the kernel spreads connections).
fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The resolver thread, waking `poll` with the `RESOLVER` token when a lookup is done.
fn spawn_resolver(poll: &Poll) -> std::io::Result<Resolver> {
    Resolver::spawn(Arc::new(mio::Waker::new(poll.registry(), RESOLVER)?))
}

/// The wheel with its first timers: each gearmand's first connect (now) and the periodic
/// health check of the links.
fn first_timers(cfg: &Config, active: &[usize], now: Instant) -> TimerWheel<TimerEvent> {
    let mut wheel = TimerWheel::new(now, WHEEL_TICK, WHEEL_SLOTS);
    for &i in active {
        wheel.insert(now, TimerEvent::Reconnect(i));
    }
    if !active.is_empty() {
        let period = link_check_period(cfg);
        wheel.insert_periodic(now + period, period, TimerEvent::LinkCheck);
    }
    wheel
}

/// `SLOTS_PER_SERVER` link slots per gearmand, the first of each active (none in echo mode:
/// no job protocol, no gearmand).
fn gearmand_links(cfg: &Config, now: Instant) -> Vec<GearmanLink> {
    let gearmand = if cfg.echo { &[][..] } else { &cfg.gearmand[..] };
    let slots = gearmand.iter().enumerate().flat_map(|(server, addr)| {
        (0..SLOTS_PER_SERVER).map(move |slot| {
            let role = if slot == 0 { Role::Active } else { Role::Spare };
            GearmanLink::new(addr.clone(), server, role, cfg.max_job_bytes, now)
        })
    });
    slots.collect()
}

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
/// Characters of an instance id drawn at startup (31 bits: distinct among any fleet of
/// gearsock instances one gearmand serves).
const INSTANCE_ID_CHARS: usize = 6;
/// Connections accepted in one pass at most: a burst of thousands is spread over passes, so
/// the clients already open are read and answered between its parts.
const ACCEPT_BUDGET: usize = 64;
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Bytes read from one gearmand link per pass, so a burst leaves (as client frames, written
/// each pass) while it arrives, instead of piling up in one pass's output.
const LINK_READ_BUDGET: usize = 256 * 1024;
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
    rng: XorShift64,
    /// This process's seat in a group of `--processes` (none when it serves alone).
    group: Option<Membership>,
}

impl Server {
    /// Binds the listener and sets up the loop; gearmand links connect once `run` starts.
    pub fn bind(cfg: &Config) -> Result<Server, ServerError> {
        let poll = Poll::new().map_err(ServerError::Poll)?;
        let group = cfg.group_child.map(Membership::join).transpose().map_err(ServerError::Group)?;
        let mut listener =
            listen(cfg.listen, group.is_some()).map_err(|e| ServerError::Bind(cfg.listen, e))?;
        let local_addr = listener.local_addr().map_err(|e| ServerError::Bind(cfg.listen, e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Register)?;
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServerError::Register)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(ServerError::Register)?;
        let now = Instant::now();
        let links = gearmand_links(cfg, now);
        let active: Vec<usize> = (0..links.len()).step_by(SLOTS_PER_SERVER).collect();
        // Only host names need the resolver thread.
        let numeric = links.iter().all(|l| l.numeric.is_some());
        let resolver =
            if numeric { None } else { Some(spawn_resolver(&poll).map_err(ServerError::Register)?) };
        let mut wheel = first_timers(cfg, &active, now);
        if group.is_some() {
            wheel.insert_periodic(now + PUBLISH_PERIOD, PUBLISH_PERIOD, TimerEvent::Publish);
        }
        let mut entropy = Entropy::os();
        let instance_id = cfg.instance_id.clone().unwrap_or_else(|| entropy.name(INSTANCE_ID_CHARS));
        let mut server = Server {
            limits: conn_limits(cfg),
            tokens: Tokens::new(links.len()),
            app: App::new(app_config(cfg, instance_id), links.len(), entropy),
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
            // Reconnect jitter only needs gearsocks on one gearmand not to move in step.
            rng: XorShift64::seeded(0),
            group,
        };
        server.publish(now); // a member is on the board before it says it listens
        Ok(server)
    }

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
                || self.accept_ready && !self.accept_paused
                || self.app.has_effects()
                || self.links_ready();
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
            if self.signalled && !self.shutting_down {
                self.begin_shutdown(now); // close frames now; the loop ends when all are gone
            }
            self.accept_clients(now); // until WouldBlock, the pass's budget, or out of descriptors
            self.drive_gearman(now); // gearmand bytes -> ClientSession -> App
            self.drive_clients(now); // client bytes -> Ws -> App
            self.fire_timers(now); // wheel.expire(now) -> App / connections / links
            self.apply_effects(now); // App effects -> ws frames, SUBMIT_JOB bytes, timers
            self.flush_outputs(now); // write each dirty buffer once
            self.limit_backlog(now); // the total of all clients' output stays bounded
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
            Tok::Signals => {
                let caught: Vec<i32> = self.signals.pending().collect();
                if !caught.is_empty() && !self.shutting_down {
                    info!("signal {caught:?}: closing every client with 1001");
                    self.signalled = true;
                }
            }
            Tok::Resolver => self.resolver_ready = true,
            Tok::Link(i) => {
                // A connecting socket reports completion (or failure) as writable or error.
                let (_, writable) = self.links[i].io.note(event);
                self.links_dirty |= writable;
            }
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
                use std::io::Write;
                let _ = sock.write(REFUSAL);
                self.app.metrics.observe(LoopEvent::Refused);
                debug!("refused {peer}: at the limit of {} connections", self.cfg.max_connections);
                self.note(Event::Refused, now);
                continue;
            }
            self.admit(sock, peer, now);
        }
    }

    /// A new client: registered for reading, its handshake deadline set, and read at once (it
    /// may arrive with its request already queued).
    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr, now: Instant) {
        debug_assert!(sock.nodelay().unwrap_or(false), "TCP_NODELAY is inherited from the listener");
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.next_gen = self.next_gen.wrapping_add(1);
        if let Err(e) = self.poll.registry().register(&mut sock, self.tokens.client(key), interest(false)) {
            return warn!("cannot register a client: {e}");
        }
        let mut c = Conn::new(sock, self.next_gen, peer, Connection::new(now, &self.limits));
        if let Some(at) = c.conn.next_deadline(&self.limits) {
            c.timer = Some(self.wheel.insert(at, TimerEvent::Conn(c.id(key))));
        }
        c.listed.ready = true;
        entry.insert(c);
        self.ready.push(key);
        self.app.metrics.observe(LoopEvent::Accepted);
        debug!("conn={key} accepted from {peer}");
    }

    fn drive_gearman(&mut self, now: Instant) {
        if std::mem::take(&mut self.resolver_ready) {
            self.take_lookups(now);
        }
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            let event_seen = link.io.can_read || !link.io.write_blocked;
            if let LinkState::Connecting(sock) = &mut link.state {
                // A nonblocking connect is done when the socket is writable: take_error() says
                // whether it failed, peer_addr() whether it is really connected yet.
                if !event_seen {
                    continue;
                }
                match connect_outcome(sock) {
                    Ok(true) => {
                        // OPTION_REQ queued: up once gearmand answers it. The connection is
                        // also this instance's report desk (CAN_DO gearsock.report.<id>).
                        link.connected(now, self.app.desk_function().as_bytes());
                        self.links_dirty = true;
                    }
                    Ok(false) => continue,
                    Err(e) => {
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
        self.links
            .iter()
            .any(|l| l.io.can_read && matches!(l.state, LinkState::Greeting(_) | LinkState::Up(_)))
    }

    fn read_link(&mut self, i: usize, now: Instant) {
        let link = &mut self.links[i];
        let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut link.state else { return };
        if !link.io.can_read {
            return;
        }
        let outcome = fill(sock, &mut link.input, &mut self.scratch, LINK_READ_BUDGET, !link.io.hup_seen);
        if matches!(outcome, Ok((_, n)) if n > 0) {
            link.last_heard = now;
        }
        let decoded = link.session.handle_input(&mut link.input);
        // The report desk answers gearmand on its own (PRE_SLEEP, GRAB, WORK_COMPLETE); those
        // bytes are written with the link's other output in this pass's flush.
        let queued = link.output.len();
        link.session.take_replies(&mut link.output);
        self.links_dirty |= link.output.len() > queued;
        if matches!(link.state, LinkState::Greeting(_)) && link.session.has_answered() {
            link.greeted(now);
            self.app.metrics.observe(LoopEvent::GearmandConnected);
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
            (Ok((Io::Blocked, _)), _) => link.io.can_read = false,
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
            self.app.metrics.observe(LoopEvent::GearmandLost);
        }
        let link = &mut self.links[i];
        if link.role != Role::Active {
            link.role = Role::Spare;
            return warn!("gearmand {}: a retired connection was lost ({why})", link.addr);
        }
        link.failures = link.failures.saturating_add(1);
        let delay = link.backoff(self.cfg.reconnect_min, self.cfg.reconnect_max, self.rng.next_u64());
        self.wheel.insert(now + delay, TimerEvent::Reconnect(i));
        if was_up {
            link.lost(now, why);
            return warn!("gearmand {} lost ({why}); reconnecting", link.addr);
        }
        self.app.metrics.observe(LoopEvent::GearmandConnectFailed);
        debug!("gearmand {}: {why}; retrying in {delay:?}", link.addr);
        self.report_failed_attempt(i, now, why);
    }

    /// One line per outage and per change of reason, then a reminder at a low rate.
    fn report_failed_attempt(&mut self, i: usize, now: Instant, why: &str) {
        let link = &mut self.links[i];
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
            .and_then(|sock| registry.register(sock, token, interest(true)));
        match result {
            Ok(()) => {
                // The connect's completion is a writable edge: wait for it.
                self.links[i].io.writable_registered = true;
                self.links[i].io.write_blocked = true;
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

    /// One client: read what its socket has (up to the budget), hand the connection's events
    /// on. Writing happens later, in `flush_outputs`, once per pass.
    fn drive_client(&mut self, key: usize, now: Instant) {
        self.read_client(key, now);
        self.take_events(key, now);
        self.settle(key, now);
    }

    /// Moves the socket's bytes into the connection: into its buffer, or dropped while it is
    /// ending. Edge-triggered: a read that stops short of WouldBlock (budget spent) puts the
    /// client back on the ready list, since no new edge will come for bytes already waiting.
    fn read_client(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if !c.io.can_read {
            return;
        }
        let outcome = match c.conn.read_into(&self.limits) {
            ReadInto::Buffer(input) => {
                fill(&mut c.sock, input, &mut self.scratch, self.cfg.read_budget_bytes, !c.io.hup_seen)
            }
            ReadInto::Discard => discard(&mut c.sock, &mut self.scratch),
            ReadInto::Nothing => return,
        };
        match outcome {
            Ok((io, n)) => {
                c.conn.handle_read(n, io == Io::Eof, now);
                match io {
                    Io::Blocked | Io::Eof => c.io.can_read = false,
                    Io::Paused => list(&mut self.ready, &mut c.listed.ready, key),
                }
            }
            Err(e) => c.conn.handle_error(e.kind()),
        }
    }

    /// Hands the connection's events on: to the App, to the HTTP router, to the logs. The
    /// one place a client's end is reported: `Closed` comes out of a connection once.
    fn take_events(&mut self, key: usize, now: Instant) {
        let id = self.conns[key].id(key);
        while let Some(event) = self.conns[key].conn.poll_event(&self.limits.ws, now) {
            match event {
                ConnEvent::Opened(upgrade) => {
                    self.app.metrics.observe(LoopEvent::Handshake);
                    debug!("conn={key} open");
                    if !self.cfg.echo {
                        // Echo clients never reach the App: it keeps no record of them.
                        let peer = self.conns[key].peer.ip();
                        let trusted =
                            is_trusted_peer(peer, upgrade.origin_is_own_or_absent(), upgrade.forwarded);
                        self.app.handle_client_open(id, trusted);
                    }
                }
                ConnEvent::Http { method, path } => self.answer_http(key, &method, &path, now),
                ConnEvent::Text(text) if self.cfg.echo => {
                    if self.conns[key].conn.send_text(text.as_str()) {
                        self.app.metrics.observe(LoopEvent::Echoed(text.len()));
                    }
                }
                ConnEvent::Binary(data) if self.cfg.echo => {
                    if self.conns[key].conn.send_binary(&data) {
                        self.app.metrics.observe(LoopEvent::Echoed(data.len()));
                    }
                }
                ConnEvent::Text(text) => self.app.handle_client_text(id, &text, now),
                ConnEvent::Binary(_) => self.app.handle_client_binary(id),
                ConnEvent::Closed { reason, handshaking } => {
                    debug!("conn={key} peer={} ended: {reason:?}", self.conns[key].peer);
                    if reason == CloseReason::OutputLimit {
                        self.app.metrics.observe(LoopEvent::SlowReaderDropped);
                    }
                    if let Some(event) = reason.event(handshaking) {
                        self.note(event, now);
                    }
                    self.app.handle_client_closed(id);
                }
            }
        }
    }

    /// After anything happened to a client: it is listed for `flush_outputs` when it has
    /// bytes the socket may take, or has ended (to be reaped), and its timer follows its next
    /// deadline.
    fn settle(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if c.conn.is_closed() || (c.conn.output_len() > 0 && !c.io.write_blocked) {
            list(&mut self.dirty, &mut c.listed.dirty, key);
        }
        self.rearm(key, now);
    }

    /// Sets the client's one timer for its next deadline. A deadline that moved later keeps
    /// the timer it has: it fires early, finds nothing due, and is set again (cheaper than
    /// moving it on every message).
    fn rearm(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if !c.conn.take_earlier() && c.timer.is_some() {
            return; // the deadline can only have moved later: the timer fires early, and is set again
        }
        let want = c.conn.next_deadline(&self.limits);
        let armed = c.timer.and_then(|t| self.wheel.deadline(t));
        match (armed, want) {
            (Some(at), Some(want)) if at <= want => {}
            (_, want) => {
                if let Some(t) = c.timer.take() {
                    self.wheel.cancel(t);
                }
                c.timer = want.map(|at| self.wheel.insert(at.max(now), TimerEvent::Conn(c.id(key))));
            }
        }
    }

    /// Each gearmand as `/healthz` and `/metrics` show it: the active connection's state
    /// (`stalled` when it is up but not taking bytes or not answering), connections made,
    /// retiring connections.
    fn link_views(&self, now: Instant) -> Vec<LinkView> {
        let timeout = self.cfg.gearmand_timeout;
        let views = self.active.iter().enumerate().map(|(server, &i)| {
            let link = &self.links[i];
            let group = &self.links[server * SLOTS_PER_SERVER..(server + 1) * SLOTS_PER_SERVER];
            let stalled = self.app.is_link_stalled(i) || link.is_lagging(now, timeout);
            LinkView {
                addr: link.addr.clone(),
                state: if link.is_up() && stalled { "stalled" } else { link.state_name() },
                connects: group.iter().map(|l| l.connects).sum(),
                retiring: group.iter().filter(|l| l.role == Role::Retiring).count(),
            }
        });
        views.collect()
    }

    /// A plain HTTP request: `http::route` decides; this gathers what it reports on.
    fn answer_http(&mut self, key: usize, method: &str, path: &str, now: Instant) {
        self.app.metrics.observe(LoopEvent::HttpRequest);
        let response = if self.group.is_some() {
            self.answer_group(method, path, now) // the pages describe the whole group
        } else {
            http::route(method, path, self.cfg.echo, || self.snapshot(now))
        };
        let Response { status, reason, content_type, body } = response;
        self.conns[key].conn.respond(status, reason, content_type, &body, now);
    }

    /// What `/healthz` and `/metrics` report on (and a member of a group publishes).
    fn snapshot(&self, now: Instant) -> Snapshot<'_> {
        let links = self.link_views(now);
        Snapshot {
            instance: self.app.instance_id(),
            gauges: Gauges {
                connections: self.conns.len(),
                jobs_in_flight: self.app.jobs_in_flight(),
                jobs_queued: self.app.jobs_queued(),
                timers: self.wheel.len(),
                stored_values: self.app.stored_values(),
                stored_bytes: self.app.stored_bytes(),
                client_output_bytes: self.backlog_bytes(),
                links: links.iter().map(|l| (l.addr.clone(), l.state)).collect(),
            },
            links,
            metrics: &self.app.metrics,
        }
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
                TimerEvent::Publish => self.publish(now),
            }
        }
        self.fired = fired;
    }

    /// A client's timer: its connection acts on whatever deadline is due (408, ping, 1001,
    /// 1008, the end of a close), and the timer is set again for the next one.
    fn on_conn_timer(&mut self, id: ConnId, now: Instant) {
        let key = id.key as usize;
        let Some(c) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else { return };
        c.timer = None;
        c.conn.handle_timeout(&self.limits, now);
        self.take_events(key, now);
        self.settle(key, now);
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

    /// Writes each buffer that has bytes, once. A write that blocks adds WRITABLE interest; a
    /// buffer that empties removes it again, so idle sockets cause no writable wakeups.
    fn flush_outputs(&mut self, now: Instant) {
        if std::mem::take(&mut self.links_dirty) {
            self.flush_links(now);
        }
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
    }

    /// Writes each gearmand link's bytes; interest follows what is left, as for clients.
    fn flush_links(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            let (LinkState::Greeting(sock) | LinkState::Up(sock)) = &mut link.state else { continue };
            if !link.output.is_empty() && !link.io.write_blocked {
                match flush(sock, &mut link.output) {
                    Ok(io) => link.io.write_blocked = io == Io::Blocked,
                    Err(e) => {
                        self.link_down(i, now, &format!("write failed: {e}"));
                        continue;
                    }
                }
            }
            // Past the connect, a link wants to write exactly when bytes are left.
            let want = !link.output.is_empty();
            if want != link.io.writable_registered {
                let _ = self.poll.registry().reregister(sock, self.tokens.link(i), interest(want));
                link.io.writable_registered = want;
            }
            // Link output only shrinks here, and whatever grows it marks the links dirty: the
            // App's figure is corrected only when it may have changed.
            if link.is_up() {
                let bytes = link.output.len();
                self.app.handle_link_output(i, bytes);
            }
        }
    }

    /// Writes what the client has queued (once per pass), tells the connection how much went,
    /// and keeps the registered interest and the backlog list in step with what is left.
    fn flush_client(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if c.conn.is_closed() {
            return;
        }
        let written = write_out(c);
        if c.conn.handle_written(written, &self.limits, now) == AfterWrite::ShutdownWrite {
            // All our bytes are out: shut our side and keep reading until the peer hangs up
            // (closing with unread input would reset the connection and could destroy our
            // last frame before the peer reads it).
            let _ = c.sock.shutdown(std::net::Shutdown::Write);
        }
        if c.conn.output_len() > 0 {
            list(&mut self.backlog, &mut c.listed.backlog, key);
        }
        // A client held back for its backlog (echo mode, see `Connection::read_into`) whose
        // backlog drained is read again: the readable edge it had is still unused.
        if c.io.can_read && c.conn.is_open() && !c.conn.holds_reading(&self.limits) {
            list(&mut self.ready, &mut c.listed.ready, key);
        }
        // Interest follows what the connection wants: WRITABLE only while bytes wait.
        let want_writable = c.conn.wants_write();
        if want_writable != c.io.writable_registered && !c.conn.is_closed() {
            let _ = self.poll.registry().reregister(
                &mut c.sock,
                self.tokens.client(key),
                interest(want_writable),
            );
            c.io.writable_registered = want_writable;
        }
        if c.conn.closed_pending() {
            self.take_events(key, now); // a write error or the hard limit ended it
        }
        self.rearm(key, now);
    }

    /// Bytes queued for all clients (those with a backlog after their last write).
    fn backlog_bytes(&self) -> usize {
        self.backlog.iter().filter_map(|&k| self.conns.get(k)).map(|c| c.conn.output_len()).sum()
    }

    /// Keeps the output of all clients together under `client_out_total_bytes`, dropping the
    /// largest backlogs first. Only connections whose last write left bytes are looked at.
    fn limit_backlog(&mut self, now: Instant) {
        let conns = &mut self.conns;
        self.backlog.retain(|&k| match conns.get_mut(k) {
            Some(c) if !c.conn.is_closed() && c.conn.output_len() > 0 => true,
            Some(c) => {
                c.listed.backlog = false;
                false
            }
            None => false,
        });
        let mut total = self.backlog_bytes();
        if total <= self.cfg.client_out_total_bytes {
            return;
        }
        let mut largest: Vec<(usize, usize)> =
            self.backlog.iter().map(|&k| (self.conns[k].conn.output_len(), k)).collect();
        largest.sort_unstable_by(|a, b| b.cmp(a));
        for (bytes, key) in largest {
            if total <= self.cfg.client_out_total_bytes {
                break;
            }
            if self.conns[key].conn.is_open() {
                debug!("conn={key} dropped: largest backlog while all clients' output is over its total");
                self.conns[key].conn.drop_slow_reader(now);
                self.take_events(key, now);
                self.settle(key, now);
                total -= bytes.saturating_sub(self.conns[key].conn.output_len());
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        // Before any close frame: the replies already made (effects not yet applied) and the
        // last word of every unfinished job, so a client can account for each job it sent.
        self.app.handle_shutdown();
        self.apply_effects(now);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.conns[key].conn.shutdown(now); // close 1001 for open WebSockets
            self.take_events(key, now);
            self.settle(key, now);
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
            let _ = self.poll.registry().deregister(&mut c.sock);
            if let Some(t) = c.timer {
                self.wheel.cancel(t);
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
    /// The startup line: what is in force, so an operator can check it against intent.
    fn log_startup(&self) {
        let c = &self.cfg;
        info!(
            "gearsock {} on ws://{} (instance {}): gearmand {}; max {} connections, {} per message, {} per job; \
             client output {} soft, {} hard, {} total; worker token {}",
            env!("CARGO_PKG_VERSION"),
            self.local_addr,
            self.app.instance_id(),
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

/// How often gearmand links are checked: a fifth of the timeout (so a dead link is found at
/// most a fifth late), between 10 ms and 1 s.
fn link_check_period(cfg: &Config) -> Duration {
    (cfg.gearmand_timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Writes what the socket takes of a client's output (nothing while it is blocked); returns
/// how much. Partial writes are normal: the connection keeps the tail and knows where its frames
/// begin, so a slow reader can still be sent a clean close.
fn write_out(c: &mut Conn) -> usize {
    if c.io.write_blocked || c.conn.output_len() == 0 {
        return 0;
    }
    match write_some(&mut c.sock, c.conn.output()) {
        Ok((io, n)) => {
            c.io.write_blocked = io == Io::Blocked;
            n
        }
        Err(e) => {
            c.conn.handle_error(e.kind());
            0
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
