//! Relays: an `attach` that lands on an instance other than the job's owner (another process of
//! a `--processes` group, or another instance on the same gearmand) is carried to the owner
//! through gearmand, on the report desks every instance already serves, and the owner's reply
//! texts come back the same way ([`super::relay_wire`] has the messages).
//!
//! ```text
//!   client C --attach--> B (requester)                              A (owner of the job)
//!                        Asked r: C, job, ref, link  --'a' r.0-->   core attach for Remote(B, r)
//!                        texts to C, in order of n  <--'t' r.0..--  every reply text of the job
//!                        relay over, C's slot freed <--'f' r.k---   terminal event, takeover, refusal
//!   C closes ----------> detach --------------------'d' r.1-->      the job detached (grace starts)
//! ```
//!
//! Both sides live here: `asked` holds the requester's relays (one per attach it carried, each
//! counting as one of its client's jobs), `served` the owner's (a job whose events go to another
//! instance). A relay is pinned to one gearmand connection, where its messages keep their order;
//! the requester also puts them back in order by `n` (bounded), since its desk may grab on more
//! than one connection to that gearmand. Texts produced in one pass for one relay go out as one
//! message, when the effects are drained. Must not: decide whether an attach is allowed or what
//! the job's texts are (the core's attach does), or touch a socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use log::debug;
use serde::Serialize;

use super::attach::{Attach, UNKNOWN_JOB};
use super::fields::Ref;
use super::joblog::Owner;
use super::links::LinkRef;
use super::relay_wire::{self, Assembler, Kind, Payload, RELAY_ID_CHARS, RelayId, RemoteAttach};
use super::reply::Reply;
use super::reports::DESK_PREFIX;
use super::{App, ConnId, Effect};
use crate::gearman::client::{JobMode, JobTag, Priority};
use crate::metrics::{AttachOutcome, ErrorCode};

/// The tag of a relay message's desk job: no job of ours answers to it.
pub(super) const RELAY_TAG: JobTag = JobTag(u64::MAX - 1);
/// Messages a requester keeps that arrived ahead of their turn, per relay.
const MAX_EARLY: usize = 64;
/// Unknown relays answered with a detach, remembered so each is answered once.
const MAX_ANSWERED: usize = 256;

/// A relay as its owner names it: the requesting instance and the requester's relay id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct RemoteKey {
    pub instance: Box<str>,
    pub relay: RelayId,
}

/// The requester's side of one relay.
#[derive(Debug)]
struct Asked {
    conn: ConnId,
    owner: Box<str>,
    job: Box<str>,
    reference: Option<Ref>,
    link: LinkRef,
    /// The number of the owner's next message to hand on.
    next_in: u64,
    /// Messages that arrived ahead of `next_in`.
    early: BTreeMap<u64, (Kind, Vec<u8>)>,
    assembler: Assembler,
}

/// The owner's side of one relay: where it goes, the job whose texts go there (none until the
/// attach found it), and the next message number. Named by a number of ours (a [`Served`] id),
/// so that a job's owner can say "relay 7" and stay `Copy`.
#[derive(Debug)]
struct Served {
    key: RemoteKey,
    tag: Option<JobTag>,
    link: LinkRef,
    next_out: u64,
}

/// A message being filled this pass.
#[derive(Debug)]
struct Outgoing {
    /// The [`Served`] id it belongs to.
    served: u64,
    to: Box<str>,
    relay: RelayId,
    n: u64,
    link: LinkRef,
    payload: Payload,
    /// Takes no more texts (full, or the relay's last).
    sealed: bool,
}

/// Both sides' relays, and the messages of this pass.
#[derive(Debug)]
pub(super) struct Relays {
    asked: HashMap<RelayId, Asked>,
    served: HashMap<u64, Served>,
    /// Served ids by the requester's name for the relay.
    serving: HashMap<RemoteKey, u64>,
    next_served: u64,
    outbox: Vec<Outgoing>,
    answered: VecDeque<RemoteKey>,
    max_payload: usize,
    /// Longest text a requester puts back together (a reply of a job is at most about 4/3 of
    /// `--max-job-bytes`, its base64, and some fields).
    max_text: usize,
}

impl Relays {
    pub(super) fn new(max_job_bytes: usize) -> Relays {
        Relays {
            asked: HashMap::new(),
            served: HashMap::new(),
            serving: HashMap::new(),
            next_served: 1,
            outbox: Vec::new(),
            answered: VecDeque::new(),
            max_payload: relay_wire::max_payload(max_job_bytes),
            max_text: max_job_bytes.saturating_mul(2).saturating_add(64 * 1024),
        }
    }

    /// Relays client `id` has open (each counts as one of its jobs).
    pub(super) fn held_by(&self, id: ConnId) -> usize {
        self.asked.values().filter(|a| a.conn == id).count()
    }

    /// Relays this instance carries for its clients.
    pub(super) fn asked_len(&self) -> usize {
        self.asked.len()
    }

    /// This instance's jobs whose events go to another instance.
    pub(super) fn served_len(&self) -> usize {
        self.served.len()
    }

    pub(super) fn has_outbox(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Opens the owner's side of relay `key`, pinned to connection `link`: its served id
    /// (None: it is open already, a duplicate attach).
    fn open_served(&mut self, key: RemoteKey, link: LinkRef) -> Option<u64> {
        if self.serving.contains_key(&key) {
            return None;
        }
        let id = self.next_served;
        self.next_served += 1;
        self.serving.insert(key.clone(), id);
        self.served.insert(id, Served { key, tag: None, link, next_out: 0 });
        Some(id)
    }

    fn close_served(&mut self, id: u64) -> Option<Served> {
        let served = self.served.remove(&id)?;
        self.serving.remove(&served.key);
        Some(served)
    }

    /// Queues `text` for served relay `id`; `end` (`Last`) ends the relay after it. False when
    /// the relay is not open (any more).
    fn queue(&mut self, id: u64, text: &[u8], end: Kind) -> bool {
        let max = self.max_payload;
        let Some(served) = self.served.get_mut(&id) else { return false };
        let mut at = 0;
        loop {
            let open = self.outbox.iter().rposition(|o| !o.sealed && o.served == id);
            let i = open.unwrap_or_else(|| {
                self.outbox.push(Outgoing {
                    served: id,
                    to: served.key.instance.clone(),
                    relay: served.key.relay,
                    n: served.next_out,
                    link: served.link,
                    payload: Payload::new(Kind::Texts),
                    sealed: false,
                });
                served.next_out += 1;
                self.outbox.len() - 1
            });
            let o = &mut self.outbox[i];
            if o.payload.push(text, &mut at, max) {
                if end != Kind::Texts {
                    o.payload.set_kind(end);
                    o.sealed = true;
                    self.close_served(id);
                }
                return true;
            }
            // Full: the rest of the text goes in the next message.
            o.sealed = true;
        }
    }

    /// Ends served relay `id` with no more text (after whatever was queued this pass).
    fn end(&mut self, id: u64) -> bool {
        let Some(served) = self.close_served(id) else { return false };
        match self.outbox.iter_mut().rev().find(|o| !o.sealed && o.served == id) {
            Some(o) => {
                o.payload.set_kind(Kind::Last);
                o.sealed = true;
            }
            None => self.outbox.push(Outgoing {
                served: id,
                to: served.key.instance,
                relay: served.key.relay,
                n: served.next_out,
                link: served.link,
                payload: Payload::new(Kind::Last),
                sealed: true,
            }),
        }
        true
    }
}

/// What a client hears when its relay broke before the job's last word: an `unavailable` error
/// that names the job, so a client library attaches again (on a fresh connection, `after` the
/// last `seq` it saw). Keys in alphabetical order, like every reply.
#[derive(Serialize)]
struct Broken<'a> {
    code: &'static str,
    job: &'a str,
    message: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Ref>,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl Broken<'_> {
    fn text(job: &str, message: &str, reference: Option<&Ref>) -> String {
        let b = Broken { code: ErrorCode::Unavailable.name(), job, message, reference, kind: "error" };
        serde_json::to_string(&b).unwrap_or_default()
    }
}

impl App {
    /// Client `id` attaches job `attach.job`, whose resume token names instance `owner` (not
    /// this one): the relay counts as one of the client's jobs, and the attach goes to the
    /// owner's desk. What the owner answers reaches the client through [`App::on_relay_message`].
    pub(super) fn relay_attach(&mut self, id: ConnId, owner: &str, attach: RemoteAttach) {
        let r = attach.reference.as_ref();
        let max_jobs = self.access.max_jobs(id, self.cfg.max_jobs_per_connection);
        let Some(jobs) = self.clients.jobs(id) else { return };
        if jobs.len() + self.relays.held_by(id) >= max_jobs {
            let text = format!("at most {max_jobs} unfinished jobs per connection");
            return self.error(id, ErrorCode::TooManyJobs, &text, r);
        }
        let Some(link) = self.links.pick() else {
            let text = "the job belongs to another gearsock instance, and no gearmand is taking jobs \
                        to relay the attach through";
            return self.error(id, ErrorCode::Unavailable, text, r);
        };
        let mut relay = [0; RELAY_ID_CHARS];
        self.uniques.fill_id(&mut relay);
        let asked = Asked {
            conn: id,
            owner: owner.into(),
            job: attach.job.as_str().into(),
            reference: attach.reference.clone(),
            link: self.links.current(link),
            next_in: 0,
            early: BTreeMap::new(),
            assembler: Assembler::default(),
        };
        self.relays.asked.insert(relay, asked);
        self.submit_relay(link, owner, &relay, 0, attach.payload());
    }

    /// Leaves one relay message at instance `to`'s desk.
    fn submit_relay(&mut self, link: usize, to: &str, relay: &RelayId, n: u64, payload: Vec<u8>) {
        let function = format!("{DESK_PREFIX}{to}").into_bytes();
        let unique = relay_wire::unique(&self.cfg.instance_id, relay, n);
        self.links.count_submit(link, &[&function, &unique, &payload]);
        self.metrics.relay_messages[0] += 1;
        self.effects.push(Effect::Submit {
            link,
            tag: RELAY_TAG,
            function,
            unique,
            payload,
            mode: JobMode::Background,
            priority: Priority::High,
        });
    }

    /// Sends the messages this pass filled (called as the effects are drained). A message
    /// whose connection has gone is dropped (its relay ended when the link went down), except
    /// a relay's last, which goes out of order on another connection if one is up: a job that
    /// ended with its gearmand connection still tells its requester how.
    pub(super) fn flush_relays(&mut self) {
        for mut o in std::mem::take(&mut self.relays.outbox) {
            if self.links.is_live(o.link) {
                self.submit_relay(o.link.index, &o.to, &o.relay, o.n, o.payload.into_bytes());
            } else if let (true, Some(other)) = (o.payload.is_last(), self.links.pick()) {
                o.payload.set_kind(Kind::Abort);
                self.submit_relay(other, &o.to, &o.relay, u64::MAX, o.payload.into_bytes());
            } else {
                debug!("relay message for {} dropped: its gearmand connection is gone", o.to);
            }
        }
    }

    /// A relay message reached this instance's desk on `link` (a desk job whose unique starts
    /// with `@`).
    pub(super) fn on_relay_message(&mut self, link: usize, unique: &[u8], payload: &[u8], now: Instant) {
        let (Some(addr), Ok((kind, records))) =
            (relay_wire::parse_unique(unique), relay_wire::parse(payload))
        else {
            return debug!("malformed relay message {:?} dropped", unique.escape_ascii());
        };
        self.metrics.relay_messages[1] += 1;
        let key = RemoteKey { instance: addr.sender.into(), relay: addr.relay };
        match kind {
            Kind::Attach => match RemoteAttach::from_records(&records) {
                Some(attach) => {
                    let at = self.links.current(link);
                    self.on_remote_attach(at, key, attach)
                }
                None => debug!("malformed relayed attach from {} dropped", addr.sender),
            },
            Kind::Detach => self.on_remote_detach(&key, now),
            Kind::Texts | Kind::Last | Kind::Abort => self.on_relayed(key, addr.n, kind, payload),
        }
    }

    /// The owner's texts for one of our relays: handed on in order of `n`.
    fn on_relayed(&mut self, key: RemoteKey, n: u64, kind: Kind, payload: &[u8]) {
        let Some(asked) = self.relays.asked.get_mut(&key.relay).filter(|a| a.owner == key.instance) else {
            return self.answer_unknown(key);
        };
        if kind == Kind::Abort {
            // Earlier messages may never come: this one is the last word.
            self.hand_on(key.relay, payload);
            return;
        }
        if n != asked.next_in {
            if n > asked.next_in && asked.early.len() < MAX_EARLY {
                asked.early.insert(n, (kind, payload.to_vec()));
            } else if n > asked.next_in {
                self.break_relay(key.relay, "the relay from the job's instance fell too far out of order");
            }
            return;
        }
        let mut next = payload.to_vec();
        loop {
            let Some(asked) = self.relays.asked.get_mut(&key.relay) else { return };
            asked.next_in += 1;
            if !self.hand_on(key.relay, &next) {
                return;
            }
            let Some(asked) = self.relays.asked.get_mut(&key.relay) else { return };
            match asked.early.remove(&asked.next_in) {
                Some((_, payload)) => next = payload,
                None => return,
            }
        }
    }

    /// Hands one message's texts to the relay's client. False when the relay is over.
    fn hand_on(&mut self, relay: RelayId, payload: &[u8]) -> bool {
        let Ok((kind, records)) = relay_wire::parse(payload) else { return true };
        let max_text = self.relays.max_text;
        for record in &records {
            let Some(asked) = self.relays.asked.get_mut(&relay) else { return false };
            let conn = asked.conn;
            match asked.assembler.add(record, max_text) {
                Ok(Some(text)) => {
                    self.metrics.relay_events[1] += 1;
                    self.send(conn, text.into());
                }
                Ok(None) => {}
                Err(_) => {
                    self.break_relay(relay, "a relayed reply was over the size this server takes");
                    return false;
                }
            }
        }
        if matches!(kind, Kind::Last | Kind::Abort) {
            self.relays.asked.remove(&relay);
            return false;
        }
        true
    }

    /// Ends one of our relays before its last word: its client hears `unavailable` for the job
    /// (and attaches again), and the owner hears `detach`.
    fn break_relay(&mut self, relay: RelayId, why: &str) {
        let Some(asked) = self.relays.asked.remove(&relay) else { return };
        self.metrics.count_error(ErrorCode::Unavailable);
        self.send(asked.conn, Broken::text(&asked.job, why, asked.reference.as_ref()).into());
        self.send_detach(asked.link, &asked.owner, &relay);
    }

    /// Tells an owner that relay `relay` has nobody to send to any more: on the relay's own
    /// connection if it is still up, otherwise on any (a detach needs no order). Every detach
    /// of a relay has the same unique, so repeated ones coalesce in gearmand.
    fn send_detach(&mut self, at: LinkRef, owner: &str, relay: &RelayId) {
        let link = if self.links.is_live(at) { Some(at.index) } else { self.links.pick() };
        if let Some(link) = link {
            self.submit_relay(link, owner, relay, 1, Payload::new(Kind::Detach).into_bytes());
        }
    }

    /// Texts for a relay we do not have (this instance restarted, or its client left): the
    /// owner is told once to stop sending.
    fn answer_unknown(&mut self, key: RemoteKey) {
        if self.relays.answered.contains(&key) {
            return;
        }
        if self.relays.answered.len() == MAX_ANSWERED {
            self.relays.answered.pop_front();
        }
        let relay = key.relay;
        let to = key.instance.clone();
        self.relays.answered.push_back(key);
        if let Some(link) = self.links.pick() {
            self.submit_relay(link, &to, &relay, 1, Payload::new(Kind::Detach).into_bytes());
        }
    }

    /// Client `id` has gone: each relay it had is over, and its owner hears `detach`.
    pub(super) fn relays_client_closed(&mut self, id: ConnId) {
        let mine: Vec<RelayId> =
            self.relays.asked.iter().filter(|(_, a)| a.conn == id).map(|(r, _)| *r).collect();
        for relay in mine {
            if let Some(asked) = self.relays.asked.remove(&relay) {
                self.send_detach(asked.link, &asked.owner, &relay);
            }
        }
    }

    /// gearmand connection `link` was lost. Our relays pinned to it break (their clients
    /// attach again). Jobs we serve through it are detached, as if their client had left, and
    /// the requester hears so on another connection, if one is up.
    pub(super) fn relays_link_down(&mut self, link: usize, now: Instant) {
        let broken: Vec<RelayId> =
            self.relays.asked.iter().filter(|(_, a)| a.link.index == link).map(|(r, _)| *r).collect();
        for relay in broken {
            self.break_relay(relay, "the gearmand connection the relay went through was lost");
        }
        let lost: Vec<u64> =
            self.relays.served.iter().filter(|(_, s)| s.link.index == link).map(|(id, _)| *id).collect();
        for id in lost {
            let Some(served) = self.relays.close_served(id) else { continue };
            self.relays.outbox.retain(|o| o.served != id);
            let why = "the gearmand connection the relay went through was lost";
            let text = served.tag.map(|tag| self.broken_text_for(tag, why));
            if let Some(tag) = served.tag {
                self.remote_owner_left(id, tag, now);
            }
            // Earlier messages went through the lost connection: this one says so out of order.
            let (Some(other), Some(text)) = (self.links.pick(), text) else { continue };
            let mut payload = Payload::new(Kind::Abort);
            payload.push(text.as_bytes(), &mut 0, usize::MAX);
            self.submit_relay(other, &served.key.instance, &served.key.relay, u64::MAX, payload.into_bytes());
        }
    }

    /// Owner side: another instance asks to attach one of our jobs for its relay `key`; its
    /// messages came on connection `at`, where the relay's texts go back.
    fn on_remote_attach(&mut self, at: LinkRef, key: RemoteKey, attach: RemoteAttach) {
        let Some(id) = self.relays.open_served(key, at) else {
            return debug!("duplicate relayed attach dropped");
        };
        self.attach_for_remote(id, attach);
    }

    /// Owner side: the requester of relay `key` has nobody to send to any more.
    fn on_remote_detach(&mut self, key: &RemoteKey, now: Instant) {
        let Some(&id) = self.relays.serving.get(key) else { return };
        let Some(served) = self.relays.close_served(id) else { return };
        self.relays.outbox.retain(|o| o.served != id);
        if let Some(tag) = served.tag {
            self.remote_owner_left(id, tag, now);
        }
    }

    /// Owner side: queues one reply text for served relay `id`.
    pub(super) fn relay_text(&mut self, id: u64, text: &str) {
        if self.relays.queue(id, text.as_bytes(), Kind::Texts) {
            self.metrics.relay_events[0] += 1;
        }
    }

    /// Owner side: the last text served relay `id` carries (the job's terminal event,
    /// `job.detached` after a takeover, or a refusal); the relay is over.
    pub(super) fn relay_last(&mut self, id: u64, text: &str) {
        if self.relays.queue(id, text.as_bytes(), Kind::Last) {
            self.metrics.relay_events[0] += 1;
        }
    }

    /// Owner side: served relay `id` is over, with nothing more to say.
    pub(super) fn relay_end(&mut self, id: u64) {
        self.relays.end(id);
    }
}

impl Relays {
    /// Owner side: the core found the job served relay `id` attaches; its texts now go there.
    pub(super) fn serve(&mut self, id: u64, tag: JobTag) {
        if let Some(served) = self.served.get_mut(&id) {
            served.tag = Some(tag);
        }
    }
}

impl App {
    /// Owner side: the core's attach for a requester on another instance ([`App::find_journal`],
    /// [`App::attach_job`]), its texts relayed; a job that has ended is replayed and the relay
    /// ends with it. A refusal is the same `unknown_job` a local client would hear.
    fn attach_for_remote(&mut self, id: u64, attach: RemoteAttach) {
        let RemoteAttach { job, resume, after, reference, sub } = attach;
        let ask = Attach { handle: job, resume, after };
        let Some(journal) = self.find_journal(&ask, sub.as_deref()) else {
            self.metrics.count_attach(AttachOutcome::Unknown);
            self.metrics.count_error(ErrorCode::UnknownJob);
            let text = Reply::Error {
                code: ErrorCode::UnknownJob,
                message: UNKNOWN_JOB,
                reference: reference.as_ref(),
            };
            return self.relay_last(id, &text.text());
        };
        if let Some(tag) = self.journals.get(journal).and_then(|j| j.job) {
            self.relays.serve(id, tag);
        }
        for text in self.attach_job(journal, Owner::Remote(id), ask.after, reference.as_ref()) {
            self.relay_text(id, &text);
        }
        if self.journals.get(journal).is_none() {
            // The job had ended: its replay was all there was to say.
            self.relay_end(id);
        }
    }

    /// Owner side: the requester of served relay `id`, owner of job `tag`, has gone: the job is
    /// detached, as if a local client had left (its grace starts at `now`).
    fn remote_owner_left(&mut self, id: u64, tag: JobTag, now: Instant) {
        let owner =
            self.jobs.get(tag).and_then(|j| j.journal()).and_then(|j| self.journals.get(j)).map(|j| j.owner);
        if owner == Some(Owner::Remote(id)) {
            self.detach_jobs(vec![tag], now);
        }
    }

    /// The `unavailable` text for job `tag`'s requester when its relay broke.
    fn broken_text_for(&self, tag: JobTag, why: &str) -> String {
        let Some(job) = self.jobs.get(tag) else { return Broken::text("", why, None) };
        let handle = match job.phase() {
            super::jobs::Phase::Running(named) | super::jobs::Phase::Grace(named) => {
                String::from_utf8_lossy(&named.handle).into_owned()
            }
            _ => String::new(),
        };
        Broken::text(&handle, why, job.reference())
    }
}

#[cfg(test)]
mod tests;
