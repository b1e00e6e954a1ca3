//! How the server starts: the listener (its backlog, TCP_NODELAY, SO_REUSEPORT in a group), the
//! signal pipe, the App and the links, the first timers, and the startup line an operator checks
//! against intent. It runs once, before the loop; it must not be called from a pass.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::info;
use mio::net::TcpListener;
use mio::{Interest, Poll};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::links::Links;
use super::member::{Membership, PUBLISH_PERIOD};
use super::settings::{app_config, conn_limits, own_origins};
use super::token::{ADMIN, LISTENER, SIGNALS, Tokens};
use super::{SCRATCH_BYTES, Server, ServerError, TimerEvent, WHEEL_SLOTS, WHEEL_TICK};
use crate::app::App;
use crate::config::Config;
use crate::http::Pages;
use crate::logging::Tally;
use crate::random::Entropy;
use crate::wheel::TimerWheel;

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

/// Characters of an instance id drawn at startup (31 bits: distinct among any fleet of
/// gearsock instances one gearmand serves).
const INSTANCE_ID_CHARS: usize = 6;
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
        // Not shared in a group: one process answers for the group's pages (the supervisor's
        // children each bind `--admin-listen` with SO_REUSEPORT like the client port).
        let admin = match cfg.admin_listen {
            Some(addr) => {
                let mut admin = listen(addr, group.is_some()).map_err(|e| ServerError::Bind(addr, e))?;
                poll.registry()
                    .register(&mut admin, ADMIN, Interest::READABLE)
                    .map_err(ServerError::Register)?;
                Some(admin)
            }
            None => None,
        };
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(ServerError::Register)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(ServerError::Register)?;
        let now = Instant::now();
        let mut entropy = Entropy::os();
        let instance_id = cfg.instance_id.clone().unwrap_or_else(|| entropy.name(INSTANCE_ID_CHARS));
        let app = App::new(app_config(cfg, instance_id), Links::slots(cfg), entropy);
        let links = Links::new(cfg, app.desk_function(), &poll, now).map_err(ServerError::Register)?;
        let mut wheel = TimerWheel::new(now, WHEEL_TICK, WHEEL_SLOTS);
        if !links.is_empty() {
            let period = link_check_period(cfg);
            wheel.insert_periodic(now + period, period, TimerEvent::LinkCheck);
        }
        if group.is_some() {
            wheel.insert_periodic(now + PUBLISH_PERIOD, PUBLISH_PERIOD, TimerEvent::Publish);
        }
        let mut server = Server {
            limits: conn_limits(cfg),
            tokens: Tokens::new(Links::slots(cfg)),
            app,
            cfg: cfg.clone(),
            poll,
            listener: Some(listener),
            local_addr,
            admin_ready: admin.is_some(),
            pages: Pages::of(cfg.demo_page, admin.is_some()),
            admin,
            signals,
            conns: Slab::with_capacity(1024),
            next_gen: 0,
            links,
            tally: Tally::default(),
            tally_since: now,
            per_ip: super::peers::PerIp::new(cfg.max_connections_per_ip),
            wheel,
            ready: Vec::new(),
            dirty: Vec::new(),
            backlog: Vec::new(),
            held: Vec::new(),
            own_origins: own_origins(local_addr, &cfg.public_origins),
            dead: Vec::new(),
            accept_ready: true,
            accept_paused: false,
            signalled: false,
            reload: None,
            reload_asked: false,
            shutting_down: false,
            stop: false,
            scratch: vec![0; SCRATCH_BYTES],
            effects: Vec::new(),
            fired: Vec::new(),
            group,
        };
        server.take_link_changes(now); // each gearmand's first connect, due now
        server.publish(now); // a member is on the board before it says it listens
        Ok(server)
    }

    /// The startup line: what is in force, so an operator can check it against intent.
    pub(super) fn log_startup(&self) {
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
