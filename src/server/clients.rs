//! A client's life in the loop: admitted, read, its events handed on, its timer kept in step,
//! written, dropped when the output of all clients is over its total, and reaped.
//!
//! Everything here acts on one `Conn` of the server's slab (see `conn`), and every input to a
//! connection goes through [`Server::with_conn`]: the input, then `take_events` (to the App and
//! the logs; `Closed` exactly once), then `settle` (listed for flush or reap; the timer follows
//! `next_deadline`). It decides nothing about the protocol (that is `Connection`'s) and never
//! reads an `io::ErrorKind` (that is `io`'s).

use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, warn};
use mio::net::TcpStream;

use super::conn::{Armed, Conn, Listed};
use super::io::{Io, Readiness, discard, fill, shutdown_write, write_some};
use super::{Server, TimerEvent, list};
use crate::app::{ConnId, is_trusted_peer};
use crate::connection::{AfterWrite, CloseReason, ConnEvent, Connection, ReadInto};
use crate::http::{self, Snapshot};
use crate::logging::Event;
use crate::metrics::{Denial, Gauges, LoopEvent};

/// Messages one client may hand on per pass, beside the byte budget (`read_budget_bytes`):
/// 64 KiB of empty frames is about 10,900 messages, each a parse and a reply, so bytes alone let
/// one client's tiny frames hold everyone else's replies for a long pass. 32 is more than a
/// client with 16 jobs in flight sends between two passes, so busy honest clients never meet it.
const MESSAGES_PER_PASS: usize = 32;

impl Server {
    /// A new client: registered for reading, its handshake deadline set, and read at once (it
    /// may arrive with its request already queued).
    pub(super) fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr, now: Instant) {
        debug_assert!(sock.nodelay().unwrap_or(false), "TCP_NODELAY is inherited from the listener");
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.next_gen = self.next_gen.wrapping_add(1);
        let mut io = Readiness::default();
        if let Err(e) = io.register(self.poll.registry(), &mut sock, self.tokens.client(key), false) {
            return warn!("cannot register a client: {e}");
        }
        let mut c = Conn::new(sock, self.next_gen, peer, Connection::new(now, &self.limits), io);
        if let Some(at) = c.conn.next_deadline(&self.limits) {
            c.timer = Some(Armed { key: self.wheel.insert(at, TimerEvent::Conn(c.id(key))), at });
        }
        c.listed.ready = true;
        entry.insert(c);
        self.ready.push(key);
        self.app.metrics.observe(LoopEvent::Accepted);
        debug!("conn={key} accepted from {peer}");
    }

    /// Every input to a client is followed by the same two steps, written once here: its events
    /// are handed on, then it is listed and its timer set for what it wants next.
    pub(super) fn with_conn(&mut self, key: usize, now: Instant, input: impl FnOnce(&mut Self)) {
        input(self);
        self.take_events(key, now);
        self.settle(key, now);
    }

    /// One client: read what its socket has (up to the budget), hand the connection's events
    /// on. Writing happens later, in `flush_outputs`, once per pass.
    pub(super) fn drive_client(&mut self, key: usize, now: Instant) {
        self.with_conn(key, now, |s| s.read_client(key, now));
    }

    /// A client's timer: its connection acts on whatever deadline is due (408, ping, 1001,
    /// 1008, the end of a close), and the timer is set again for the next one.
    pub(super) fn on_conn_timer(&mut self, id: ConnId, now: Instant) {
        let key = id.key as usize;
        let Some(c) = self.conns.get_mut(key).filter(|c| c.generation == id.generation) else { return };
        c.timer = None;
        self.with_conn(key, now, |s| s.conns[key].conn.handle_timeout(&s.limits, now));
    }

    /// Moves the socket's bytes into the connection: into its buffer, or dropped while it is
    /// ending. Edge-triggered: a read that stops short of WouldBlock (budget spent) puts the
    /// client back on the ready list, since no new edge will come for bytes already waiting.
    fn read_client(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if !c.io.can_read() {
            return;
        }
        let outcome = match c.conn.read_into(&self.limits) {
            ReadInto::Buffer(input) => fill(
                &mut c.sock,
                input,
                &mut self.scratch,
                self.cfg.read_budget_bytes,
                c.io.short_read_drains(),
            ),
            ReadInto::Discard => discard(&mut c.sock, &mut self.scratch),
            ReadInto::Nothing => return,
        };
        match outcome {
            Ok((io, n)) => {
                c.conn.handle_read(n, io == Io::Eof, now);
                c.io.read(io);
                if io == Io::Paused {
                    list(&mut self.ready, &mut c.listed.ready, key);
                }
            }
            Err(e) => c.conn.handle_error(e.kind()),
        }
    }

    /// Hands the connection's events on: to the App, to the HTTP router, to the logs. The
    /// one place a client's end is reported: `Closed` comes out of a connection once.
    ///
    /// At most [`MESSAGES_PER_PASS`] messages are handed on. A client stopped by that budget
    /// has messages waiting in its buffers that no readable edge will announce (the bytes were
    /// read already), so it goes back on the ready list and the next wait does not sleep; its
    /// full buffer meanwhile stops reading it, which holds the sender back through TCP.
    pub(super) fn take_events(&mut self, key: usize, now: Instant) {
        let id = self.conns[key].id(key);
        let mut budget = MESSAGES_PER_PASS;
        loop {
            if budget == 0 {
                let c = &mut self.conns[key];
                list(&mut self.ready, &mut c.listed.ready, key);
                break;
            }
            let Some(event) = self.conns[key].conn.poll_event_here(&self.limits.ws, now) else { break };
            if matches!(event, ConnEvent::Text(_) | ConnEvent::Binary(_) | ConnEvent::Here { .. }) {
                budget -= 1;
            }
            match event {
                ConnEvent::Opened(_) if self.conns[key].admin => {
                    // The admin port serves pages only; its upgrade is ended at once.
                    let c = &mut self.conns[key].conn;
                    c.close(1008, "no WebSocket on the admin port", CloseReason::Protocol(1008), now);
                }
                ConnEvent::Opened(upgrade) => {
                    if !self.per_ip.admit(self.conns[key].ip()) {
                        self.app.metrics.observe(LoopEvent::Denied(Denial::PerIp));
                        self.note(Event::OverIpLimit, now);
                        let why = "too many connections from this address (--max-connections-per-ip)";
                        self.conns[key].conn.turn_away(429, "Too Many Requests", why, now);
                        continue;
                    }
                    self.app.metrics.observe(LoopEvent::Handshake);
                    debug!("conn={key} open");
                    if !self.cfg.echo {
                        // Echo clients never reach the App: it keeps no record of them.
                        let peer = self.conns[key].ip();
                        let own = upgrade.origin_is_own_or_absent(&self.own_origins);
                        let trusted = is_trusted_peer(peer, own, upgrade.forwarded);
                        self.app.handle_client_open_from(id, trusted, peer, upgrade.bearer.as_deref(), now);
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
                ConnEvent::Here { .. } if self.cfg.echo => {
                    let c = &mut self.conns[key].conn;
                    let len = c.here().len();
                    if c.echo_here() {
                        self.app.metrics.observe(LoopEvent::Echoed(len));
                    }
                }
                ConnEvent::Text(text) => self.app.handle_client_text(id, &text, now),
                // The Ws checked the UTF-8 of a text message; the App is handed it in place.
                ConnEvent::Here { text: true } => {
                    if let Ok(text) = std::str::from_utf8(self.conns[key].conn.here()) {
                        self.app.handle_client_text(id, text, now);
                    }
                }
                ConnEvent::Here { text: false } => self.app.handle_client_binary(id),
                ConnEvent::Binary(_) => self.app.handle_client_binary(id),
                ConnEvent::Closed { reason, handshaking } => {
                    debug!("conn={key} peer={} ended: {reason:?}", self.conns[key].peer());
                    match reason {
                        CloseReason::OutputLimit => self.app.metrics.observe(LoopEvent::SlowReaderDropped),
                        CloseReason::MessageTimeout => self.app.metrics.observe(LoopEvent::MessageTimedOut),
                        CloseReason::InputTotal => self.app.metrics.observe(LoopEvent::InputTotalDropped),
                        _ => {}
                    }
                    if !handshaking {
                        self.per_ip.release(self.conns[key].ip());
                    }
                    if let Some(event) = reason.event(handshaking) {
                        self.note(event, now);
                    }
                    self.app.handle_client_closed(id, now);
                }
            }
        }
    }

    /// After anything happened to a client: it is listed for `flush_outputs` when it has
    /// bytes the socket may take, or has ended (to be reaped), listed as a holder when it keeps
    /// unfinished input, and its timer follows its next deadline.
    fn settle(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if c.conn.is_closed() || (c.conn.output_len() > 0 && !c.io.write_blocked()) {
            list(&mut self.dirty, &mut c.listed.dirty, key);
        }
        if c.conn.held_input_bytes() > 0 {
            list(&mut self.held, &mut c.listed.held, key);
        }
        self.rearm(key, now);
    }

    /// Keeps the client's one timer in step with its next deadline, after every input. Only
    /// a deadline earlier than the armed one moves the timer; a later one (traffic pushing the
    /// idle deadline on, which is most inputs) keeps it: it fires early, finds nothing due, and
    /// is set again. `next_deadline` is a match on the phase: no allocation, no wheel lookup.
    fn rearm(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        let want = c.conn.next_deadline(&self.limits);
        match (c.timer, want) {
            (Some(armed), Some(want)) if armed.at <= want => {}
            (None, None) => {}
            (armed, want) => {
                if let Some(armed) = armed {
                    self.wheel.cancel(armed.key);
                }
                c.timer = want
                    .map(|at| Armed { key: self.wheel.insert(at.max(now), TimerEvent::Conn(c.id(key))), at });
            }
        }
    }

    /// Writes what the client has queued (once per pass), tells the connection how much went,
    /// and keeps the registered interest and the backlog list in step with what is left.
    pub(super) fn flush_client(&mut self, key: usize, now: Instant) {
        let c = &mut self.conns[key];
        if c.conn.is_closed() {
            return;
        }
        let written = write_out(c);
        if c.conn.handle_written(written, &self.limits, now) == AfterWrite::ShutdownWrite {
            // All our bytes are out: shut our side and keep reading until the peer hangs up
            // (closing with unread input would reset the connection and could destroy our
            // last frame before the peer reads it).
            shutdown_write(&c.sock);
        }
        if c.conn.output_len() > 0 {
            list(&mut self.backlog, &mut c.listed.backlog, key);
        }
        // A client held back for its backlog (echo mode, see `Connection::read_into`) whose
        // backlog drained is read again: the readable edge it had is still unused.
        if c.io.can_read() && c.conn.is_open() && !c.conn.holds_reading(&self.limits) {
            list(&mut self.ready, &mut c.listed.ready, key);
        }
        // Interest follows what the connection wants: WRITABLE only while bytes wait. A socket
        // whose interest could not be changed might never wake again: it is closed instead.
        if !c.conn.is_closed() {
            let token = self.tokens.client(key);
            let wants_write = c.conn.wants_write();
            if let Err(e) = c.io.sync_interest(self.poll.registry(), &mut c.sock, token, wants_write) {
                debug!("conn={key} cannot change its poll interest: {e}");
                c.conn.handle_error(e.kind());
            }
        }
        if c.conn.closed_pending() {
            self.take_events(key, now); // a write error, the hard limit or the interest ended it
        }
        self.rearm(key, now);
    }

    /// Bytes queued for all clients (those with a backlog after their last write).
    pub(super) fn backlog_bytes(&self) -> usize {
        self.backlog.iter().filter_map(|&k| self.conns.get(k)).map(|c| c.conn.output_len()).sum()
    }

    /// Keeps the output of all clients together under `client_out_total_bytes`, dropping the
    /// largest backlogs first (1008, as slow readers). Only connections whose last write left
    /// bytes are looked at.
    pub(super) fn limit_backlog(&mut self, now: Instant) {
        self.limit_total(Held::Output, self.cfg.client_out_total_bytes, now);
    }

    /// Keeps the unfinished input of all clients together under `client_in_total_bytes`,
    /// dropping the largest holders first (1008). Only clients that held input after their last
    /// input are looked at. It runs every pass right before `reap_closed`, so a client that is
    /// about to be reaped (holding nothing) has left the list before its slab key can be reused.
    pub(super) fn limit_input(&mut self, now: Instant) {
        self.limit_total(Held::Input, self.cfg.client_in_total_bytes, now);
    }

    /// One mechanism for both totals: the listed clients that no longer hold any of `held`
    /// leave the list; past `limit`, the largest holders are dropped first, each drop taking
    /// off what it freed, until the total is at most `limit`.
    fn limit_total(&mut self, held: Held, limit: usize, now: Instant) {
        let (conns, mut total) = (&mut self.conns, 0usize);
        let list = match held {
            Held::Output => &mut self.backlog,
            Held::Input => &mut self.held,
        };
        list.retain(|&k| match conns.get_mut(k) {
            Some(c) if held.counts(&c.conn) => {
                total = total.saturating_add(held.bytes(&c.conn));
                true
            }
            Some(c) => {
                *held.listed(&mut c.listed) = false;
                false
            }
            None => false,
        });
        if total <= limit {
            return;
        }
        let mut largest: Vec<(usize, usize)> =
            list.iter().map(|&k| (held.bytes(&conns[k].conn), k)).collect();
        largest.sort_unstable_by(|a, b| b.cmp(a));
        for (bytes, key) in largest {
            if total <= limit {
                break;
            }
            match held {
                Held::Output if !self.conns[key].conn.is_open() => continue, // already ending
                Held::Output => {
                    debug!("conn={key} dropped: largest backlog while all clients' output is over its total");
                    self.with_conn(key, now, |s| s.conns[key].conn.drop_slow_reader(now));
                }
                Held::Input => {
                    debug!(
                        "conn={key} dropped: most unfinished input ({bytes} bytes) while all clients hold over the total"
                    );
                    self.with_conn(key, now, |s| s.conns[key].conn.drop_for_input_total(now));
                }
            }
            total -= bytes.saturating_sub(held.bytes(&self.conns[key].conn));
        }
    }

    /// A plain HTTP request: `http::route` decides; this gathers what it reports on.
    fn answer_http(&mut self, key: usize, method: &str, path: &str, now: Instant) {
        self.app.metrics.observe(LoopEvent::HttpRequest);
        let pages = if self.conns[key].admin { self.pages.1.unwrap_or(self.pages.0) } else { self.pages.0 };
        let response = if self.group.is_some() {
            self.answer_group(method, path, pages, now) // the pages describe the whole group
        } else {
            http::route(method, path, pages, self.cfg.echo, || self.snapshot(now))
        };
        self.conns[key].conn.respond_raw(&response.encode(method == "HEAD"), now);
    }

    /// What `/healthz` and `/metrics` report on (and a member of a group publishes).
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot<'_> {
        let links = self.links.views(now, |i| self.app.is_link_stalled(i));
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
                relays_requested: self.app.relays_requested(),
                relays_served: self.app.relays_served(),
                jobs_detached: self.app.jobs_detached(),
                job_log_bytes: self.app.job_log_bytes(),
                links: links.iter().map(|l| (l.addr.clone(), l.state)).collect(),
            },
            links,
            metrics: &self.app.metrics,
        }
    }
}

/// What all clients together may hold, each under a total of its own.
#[derive(Clone, Copy)]
enum Held {
    /// Replies queued and not yet taken by the socket (`--client-out-total-bytes`).
    Output,
    /// Input read but not yet a whole message (`--client-in-total-bytes`).
    Input,
}

impl Held {
    /// How many bytes of it the connection holds.
    fn bytes(self, c: &Connection) -> usize {
        match self {
            Held::Output => c.output_len(),
            Held::Input => c.held_input_bytes(),
        }
    }

    /// Whether the connection stays listed for this total (a closed one's output is no
    /// backlog: it is about to be reaped).
    fn counts(self, c: &Connection) -> bool {
        self.bytes(c) > 0 && !(matches!(self, Held::Output) && c.is_closed())
    }

    /// The connection's flag for this kind's list.
    fn listed(self, l: &mut Listed) -> &mut bool {
        match self {
            Held::Output => &mut l.backlog,
            Held::Input => &mut l.held,
        }
    }
}

/// Writes what the socket takes of a client's output (nothing while it is blocked); returns
/// how much. Partial writes are normal: the connection keeps the tail and knows where its frames
/// begin, so a slow reader can still be sent a clean close.
fn write_out(c: &mut Conn) -> usize {
    if c.io.write_blocked() || c.conn.output_len() == 0 {
        return 0;
    }
    match write_some(&mut c.sock, c.conn.output()) {
        Ok((io, n)) => {
            c.io.wrote(io);
            n
        }
        Err(e) => {
            c.conn.handle_error(e.kind());
            0
        }
    }
}
