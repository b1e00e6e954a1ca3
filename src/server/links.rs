//! `Links`: every gearmand link's life as the loop sees it: which slot is each gearmand's active
//! one, connects and name lookups, reads and writes, the health check, retiring, going down and
//! the back-off before the next attempt, and what the operator is told about it.
//!
//! It owns the links and their fields; nothing outside writes them. It never calls the App or
//! the wheel: each change the App (or the wheel) must hear of is queued as a [`LinkChange`],
//! and the loop takes them with [`Links::poll_change`] right after each call, in order. It is
//! handed the registry for each call; it never waits.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, trace, warn};
use mio::{Poll, Registry};

use super::gearman_link::{GearmanLink, Health, Role, SLOTS_PER_SERVER};
use super::link_down::{LinkDown, OutageNote, REMINDER_PERIOD};
use super::resolver::Resolver;
use super::token::{RESOLVER, Tokens};
use crate::config::Config;
use crate::gearman::client::{ClientSession, JobEvent};
use crate::http::LinkView;
use crate::metrics::LinkStatus;
use crate::random::XorShift64;

/// Bytes read from one gearmand link per pass, so a burst leaves (as client frames, written
/// each pass) while it arrives, instead of piling up in one pass's output.
const LINK_READ_BUDGET: usize = 256 * 1024;

/// What the loop must hand on after a call to [`Links`], in the order it happened.
#[derive(Debug)]
pub(crate) enum LinkChange {
    /// gearmand answered on link `i`: it takes jobs (`App::handle_link_up`).
    Up(usize),
    /// An event of a job on link `i` (`App::handle_job_event`).
    Job(usize, JobEvent),
    /// Bytes left in the output of up link `i` after its write (`App::handle_link_output`).
    Output(usize, usize),
    /// Link `i` takes no new work (`App::handle_link_retiring`).
    Retiring(usize),
    /// Link `link` went down: its jobs end (`App::handle_link_down`). `was_up`: it was lost
    /// after it was up; `attempt_failed`: an active link's attempt to reach gearmand failed.
    Down { link: usize, was_up: bool, attempt_failed: bool },
    /// Try link `i` again at this instant (a `Reconnect` timer).
    RetryAt(usize, Instant),
}

/// Every gearmand link: `SLOTS_PER_SERVER` per gearmand (see `gearman_link`).
pub(crate) struct Links {
    links: Vec<GearmanLink>,
    /// The active slot of each gearmand.
    active: Vec<usize>,
    tokens: Tokens,
    /// Looks up `--gearmand` host names off the loop (only when some are not numeric).
    resolver: Option<Resolver>,
    /// The resolver's waker fired: answers are waiting.
    resolver_ready: bool,
    /// Some link has output to write this pass.
    dirty: bool,
    /// This instance's report desk function (`App::desk_function`), served on every link.
    desk: Vec<u8>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    timeout: Duration,
    /// Reconnect jitter only needs gearsocks on one gearmand not to move in step.
    rng: XorShift64,
    changes: VecDeque<LinkChange>,
}

impl Links {
    /// How many link slots `cfg` makes (none in echo mode: no job protocol, no gearmand).
    pub fn slots(cfg: &Config) -> usize {
        if cfg.echo { 0 } else { cfg.gearmand.len() * SLOTS_PER_SERVER }
    }

    /// `SLOTS_PER_SERVER` slots per gearmand, the first of each active, with its first connect
    /// due `now` (a `RetryAt` change); the resolver thread only when some address is a name.
    pub fn new(cfg: &Config, desk: String, poll: &Poll, now: Instant) -> std::io::Result<Links> {
        let gearmand = if cfg.echo { &[][..] } else { &cfg.gearmand[..] };
        let slots = gearmand.iter().enumerate().flat_map(|(server, addr)| {
            (0..SLOTS_PER_SERVER).map(move |slot| {
                let role = if slot == 0 { Role::Active } else { Role::Spare };
                GearmanLink::new(addr.clone(), server, role, cfg.max_job_bytes, now)
            })
        });
        let links: Vec<GearmanLink> = slots.collect();
        let active: Vec<usize> = (0..links.len()).step_by(SLOTS_PER_SERVER).collect();
        let resolver = if links.iter().all(|l| l.numeric().is_some()) {
            None
        } else {
            let waker = mio::Waker::new(poll.registry(), RESOLVER)?;
            Some(Resolver::spawn(std::sync::Arc::new(waker))?)
        };
        let changes = active.iter().map(|&i| LinkChange::RetryAt(i, now)).collect();
        Ok(Links {
            tokens: Tokens::new(links.len()),
            links,
            active,
            resolver,
            resolver_ready: false,
            dirty: false,
            desk: desk.into_bytes(),
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            timeout: cfg.gearmand_timeout,
            rng: XorShift64::seeded(0),
            changes,
        })
    }

    /// True without any gearmand (echo mode).
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The next change to hand on, oldest first.
    pub fn poll_change(&mut self) -> Option<LinkChange> {
        self.changes.pop_front()
    }

    /// An epoll event for link `i`. A connecting socket reports completion (or failure) as
    /// writable or error: either way the link is looked at in this pass's flush.
    pub fn note(&mut self, i: usize, event: &mio::event::Event) {
        self.dirty |= self.links[i].note(event);
    }

    /// The resolver's waker fired.
    pub fn note_lookups(&mut self) {
        self.resolver_ready = true;
    }

    /// True when some link stopped reading at its budget with bytes still waiting.
    pub fn has_unread(&self) -> bool {
        self.links.iter().any(GearmanLink::has_unread)
    }

    /// Reads every link that has something: lookups answered, connects finished, gearmand's
    /// bytes (into `Up`, `Job` and `Down` changes).
    pub fn drive(&mut self, reg: &Registry, now: Instant, scratch: &mut [u8]) {
        if std::mem::take(&mut self.resolver_ready) {
            self.take_lookups(reg, now);
        }
        for i in 0..self.links.len() {
            match self.links[i].finish_connect(now, &self.desk) {
                // OPTION_REQ queued: up once gearmand answers it. The connection is also this
                // instance's report desk (CAN_DO gearsock.report.<id>).
                Ok(connected) => self.dirty |= connected,
                Err(why) => {
                    self.down(i, reg, now, why);
                    continue;
                }
            }
            self.read(i, reg, now, scratch, false);
        }
    }

    /// Late in a pass, after the clients were read: every up link that is owed something is
    /// read again (see `GearmanLink::read_again`), so replies that came meanwhile are handled
    /// in this pass.
    pub fn drive_again(&mut self, reg: &Registry, now: Instant, scratch: &mut [u8]) {
        for i in 0..self.links.len() {
            self.read(i, reg, now, scratch, true);
        }
    }

    fn read(&mut self, i: usize, reg: &Registry, now: Instant, scratch: &mut [u8], again: bool) {
        let link = &mut self.links[i];
        let read = if again {
            link.read_again(now, scratch, LINK_READ_BUDGET)
        } else {
            link.read(now, scratch, LINK_READ_BUDGET)
        };
        self.dirty |= read.queued;
        if let Some(outage) = read.greeted {
            match outage {
                Some(outage) => info!(
                    "gearmand {} back after {} failed attempts ({:.1} s down)",
                    link.addr(),
                    outage.attempts,
                    now.saturating_duration_since(outage.since).as_secs_f64()
                ),
                None => info!("gearmand {} connected", link.addr()),
            }
            self.changes.push_back(LinkChange::Up(i));
        }
        while let Some(event) = link.poll_event() {
            trace!("gearmand {i}: {event:?}");
            self.changes.push_back(LinkChange::Job(i, event));
        }
        if let Some(why) = read.down {
            self.down(i, reg, now, why);
        }
    }

    /// Hands link `i`'s session and output to `write` when it is up (a submit, a GET_STATUS);
    /// the bytes leave in this pass's flush.
    pub fn write(&mut self, i: usize, write: impl FnOnce(&mut ClientSession, &mut Vec<u8>)) {
        self.dirty |= self.links[i].write(write);
    }

    /// Writes each link's bytes, once per pass when any was queued; each up link's figure goes
    /// to the App (`Output`): link output only shrinks here, and whatever grows it marks the
    /// links dirty, so the figure is corrected only when it may have changed.
    pub fn flush(&mut self, reg: &Registry, now: Instant) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        for i in 0..self.links.len() {
            match self.links[i].flush(reg, self.tokens.link(i)) {
                Ok(Some(bytes)) => self.changes.push_back(LinkChange::Output(i, bytes)),
                Ok(None) => {}
                Err(why) => self.down(i, reg, now, why),
            }
        }
    }

    /// A link failed: its jobs end (the App sends their terminal replies). The active link of
    /// a gearmand reconnects with exponential back-off and jitter; a retiring one is simply
    /// gone.
    fn down(&mut self, i: usize, reg: &Registry, now: Instant, why: LinkDown) {
        let link = &mut self.links[i];
        let was_up = link.disconnect(reg);
        let active = link.role() == Role::Active;
        self.changes.push_back(LinkChange::Down { link: i, was_up, attempt_failed: active && !was_up });
        if !active {
            link.release();
            return warn!("gearmand {}: a retired connection was lost ({why})", link.addr());
        }
        link.count_failure();
        let delay = link.backoff(self.reconnect_min, self.reconnect_max, self.rng.next_u64());
        self.changes.push_back(LinkChange::RetryAt(i, now + delay));
        if was_up {
            link.lost(now, &why);
            return warn!("gearmand {} lost ({why}); reconnecting", link.addr());
        }
        debug!("gearmand {}: {why}; retrying in {delay:?}", link.addr());
        // One line per outage and per change of reason, then a reminder at a low rate.
        let note = link.attempt_failed(now, &why);
        let addr = link.addr();
        match note {
            OutageNote::First | OutageNote::Changed => warn!(
                "gearmand {addr} unreachable: {why}; retrying with back-off (reminder every {} s)",
                REMINDER_PERIOD.as_secs()
            ),
            OutageNote::Reminder => {
                if let Some(o) = link.outage() {
                    let down = now.saturating_duration_since(o.since).as_secs();
                    warn!("gearmand {addr} still unreachable ({why}): {} attempts in {down} s", o.attempts);
                }
            }
            OutageNote::Quiet => {}
        }
    }

    /// A down active link tries again: a numeric address connects now; a host name is
    /// looked up first, off the loop, every time (a gearmand that moved is found).
    pub fn connect(&mut self, i: usize, reg: &Registry, now: Instant) {
        let link = &mut self.links[i];
        if link.role() != Role::Active || !link.is_down() {
            return;
        }
        if let Some(addr) = link.numeric() {
            return self.open(i, addr, reg, now);
        }
        let Some(resolver) = &self.resolver else { return self.down(i, reg, now, LinkDown::NoResolver) };
        if link.resolving(now) {
            resolver.ask(i, link.addr());
        }
        debug!("gearmand {}: looking up the name", link.addr());
    }

    /// The resolver answered: links still waiting for their lookup connect (or fail).
    fn take_lookups(&mut self, reg: &Registry, now: Instant) {
        let Some(resolver) = &self.resolver else { return };
        let answers: Vec<_> = resolver.answers().collect();
        for answer in answers {
            let link = &mut self.links[answer.link];
            if !link.looked_up() {
                continue; // timed out meanwhile; the next attempt asks again
            }
            match answer.result {
                // Several addresses: each failed attempt moves on to the next one.
                Ok(addrs) if !addrs.is_empty() => {
                    let addr = addrs[link.failures() as usize % addrs.len()];
                    self.open(answer.link, addr, reg, now);
                }
                Ok(_) => self.down(answer.link, reg, now, LinkDown::NameNotFound(None)),
                Err(why) => self.down(answer.link, reg, now, LinkDown::NameNotFound(Some(why))),
            }
        }
    }

    fn open(&mut self, i: usize, addr: SocketAddr, reg: &Registry, now: Instant) {
        match self.links[i].start_connect(addr, now, reg, self.tokens.link(i)) {
            // The connect's completion is a writable edge: wait for it.
            Ok(()) => debug!("gearmand {}: connecting to {addr}", self.links[i].addr()),
            Err(why) => self.down(i, reg, now, why),
        }
    }

    /// The periodic health check: a link that stopped answering is declared dead (its jobs
    /// end, it reconnects); a quiet one is probed.
    pub fn check(&mut self, reg: &Registry, now: Instant) {
        for i in 0..self.links.len() {
            match self.links[i].check_health(now, self.timeout) {
                Health::Fine => {}
                Health::Probe => {
                    self.links[i].probe();
                    self.dirty = true;
                }
                Health::Dead(why) => self.down(i, reg, now, why),
            }
        }
    }

    /// The App found a connection with too many abandoned jobs: a spare slot of the same
    /// gearmand becomes its active link, and the old connection finishes its live jobs.
    ///
    /// With no spare slot, the retiring connection that owes the fewest jobs is closed first
    /// (a `Down`: the App fails its jobs as for a lost link, and answers its questions) and its
    /// slot is used. Leaving it open instead would let orphans grow without bound once every
    /// slot is retiring: a retiring connection stays open while one live job holds it.
    pub fn retire(&mut self, i: usize, reg: &Registry, now: Instant) {
        let server = self.links[i].server();
        if self.active[server] != i || !self.links[i].is_up() {
            return;
        }
        let group = server * SLOTS_PER_SERVER..(server + 1) * SLOTS_PER_SERVER;
        let spare = group.clone().find(|&s| self.links[s].role() == Role::Spare && self.links[s].is_down());
        let spare = match spare {
            Some(spare) => spare,
            None => {
                let retiring = group.filter(|&s| self.links[s].role() == Role::Retiring);
                let Some(victim) = retiring.min_by_key(|&s| (self.links[s].jobs_owed(), s)) else {
                    return debug!(
                        "gearmand {}: too many abandoned jobs, but no slot to retire into",
                        self.links[i].addr()
                    );
                };
                let link = &mut self.links[victim];
                let owed = link.jobs_owed();
                link.disconnect(reg);
                link.release();
                warn!(
                    "gearmand {}: no slot left to retire into; closed the retired connection that owed \
                     the fewest jobs ({owed}, failed or dropped now)",
                    link.addr()
                );
                // Not a loss of gearmand (`was_up: false` keeps it out of that count): the App
                // ends its jobs and questions as for one.
                self.changes.push_back(LinkChange::Down {
                    link: victim,
                    was_up: false,
                    attempt_failed: false,
                });
                victim
            }
        };
        info!(
            "gearmand {}: connection retired (abandoned jobs over --max-orphans); new work goes to a fresh one",
            self.links[i].addr()
        );
        self.links[i].retire();
        self.links[spare].activate();
        self.active[server] = spare;
        self.changes.push_back(LinkChange::Retiring(i));
        self.connect(spare, reg, now);
    }

    /// A retired connection has no live job left: close it. gearmand forgets the abandoned
    /// jobs that were queued for it.
    pub fn close(&mut self, i: usize, reg: &Registry) {
        let link = &mut self.links[i];
        link.disconnect(reg);
        debug!("gearmand {}: retired connection closed", link.addr());
        link.release();
    }

    /// Each gearmand as `/healthz` and `/metrics` show it: the active connection's state
    /// (`Stalled` when it is up but `stalled(i)` says it is not taking bytes, or it is not
    /// answering), connections made, retiring connections.
    pub fn views(&self, now: Instant, stalled: impl Fn(usize) -> bool) -> Vec<LinkView> {
        let views = self.active.iter().enumerate().map(|(server, &i)| {
            let link = &self.links[i];
            let group = &self.links[server * SLOTS_PER_SERVER..(server + 1) * SLOTS_PER_SERVER];
            let stalled = stalled(i) || link.is_lagging(now, self.timeout);
            LinkView {
                addr: link.addr().to_string(),
                state: if link.is_up() && stalled { LinkStatus::Stalled } else { link.status() },
                connects: group.iter().map(GearmanLink::connects).sum(),
                retiring: group.iter().filter(|l| l.role() == Role::Retiring).count(),
            }
        });
        views.collect()
    }
}
