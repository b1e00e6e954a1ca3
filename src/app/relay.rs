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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use log::debug;
use serde::Serialize;

use super::fields::Ref;
use super::links::LinkRef;
use super::relay_wire::{self, Assembler, Kind, PROBE_RELAY, Payload, RELAY_ID_CHARS, RelayId, RemoteAttach};
use super::reports::DESK_PREFIX;
use super::{App, AppTimer, ConnId, Effect};
use crate::gearman::client::{JobMode, JobTag, Priority};
use crate::metrics::ErrorCode;

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
    /// Some message of the owner's came for it (until then its answer deadline holds).
    heard: bool,
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
    /// The instances attaches may be relayed to (see [`watch`]).
    peers: HashSet<Box<str>>,
    /// Peers that let a relayed attach go unanswered, and when the next probe may go to each.
    silent: HashMap<Box<str>, Instant>,
    /// How long an owner has to answer a relayed attach.
    answer_within: Duration,
    max_payload: usize,
    /// Longest text a requester puts back together (a reply of a job is at most about 4/3 of
    /// `--max-job-bytes`, its base64, and some fields).
    max_text: usize,
}

impl Relays {
    pub(super) fn new(max_job_bytes: usize, peers: &[String], answer_within: Duration) -> Relays {
        Relays {
            peers: peers.iter().map(|p| p.as_str().into()).collect(),
            silent: HashMap::new(),
            answer_within,
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
    /// Only a peer is asked, and only while it answers ([`watch`]).
    pub(super) fn relay_attach(&mut self, id: ConnId, owner: &str, attach: RemoteAttach, now: Instant) {
        let r = attach.reference.as_ref();
        if !self.may_relay_to(id, owner, &attach, now) {
            return;
        }
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
            heard: false,
            next_in: 0,
            early: BTreeMap::new(),
            assembler: Assembler::default(),
        };
        self.relays.asked.insert(relay, asked);
        self.submit_relay(link, owner, &relay, 0, attach.payload());
        self.effects.push(Effect::Arm(now + self.relays.answer_within, AppTimer::RelayAnswer(relay)));
    }

    /// Leaves one relay message at instance `to`'s desk.
    pub(super) fn submit_relay(&mut self, link: usize, to: &str, relay: &RelayId, n: u64, payload: Vec<u8>) {
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
        // Any message from an instance shows it serves its desk again.
        self.relays.silent.remove(addr.sender);
        if addr.relay == PROBE_RELAY {
            return self.on_probe(link, addr.sender, kind);
        }
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
            Kind::Probe => debug!("probe from {} with a relay id of a client's dropped", addr.sender),
            Kind::Texts | Kind::Last | Kind::Abort => self.on_relayed(key, addr.n, kind, payload),
        }
    }

    /// The owner's texts for one of our relays: handed on in order of `n`.
    fn on_relayed(&mut self, key: RemoteKey, n: u64, kind: Kind, payload: &[u8]) {
        let Some(asked) = self.relays.asked.get_mut(&key.relay).filter(|a| a.owner == key.instance) else {
            return self.answer_unknown(key);
        };
        asked.heard = true;
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
        self.served_link_down(link, now);
    }
}

mod owner;
mod watch;
#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;
    use super::Kind;
    use super::*;

    /// An owner instance `b2` beside the testkit's `a1`, with its gearmand link up.
    pub(super) fn owner_app(max_job_bytes: usize) -> App {
        let mut app =
            App::new(AppConfig { instance_id: "b2".into(), max_job_bytes, ..cfg() }, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app
    }

    pub(super) fn attach(job: &str) -> RemoteAttach {
        let reference = Some(Ref::Text("x".into()));
        RemoteAttach { job: job.into(), resume: "b2.1.s".into(), after: 0, reference, sub: None }
    }

    /// The relay messages among `e`, as (desk function, unique, payload).
    pub(super) fn relayed(e: &[Effect]) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Submit {
                    tag: RELAY_TAG,
                    function,
                    unique,
                    payload,
                    mode: JobMode::Background,
                    ..
                } => Some((String::from_utf8_lossy(function).into_owned(), unique.clone(), payload.clone())),
                _ => None,
            })
            .collect()
    }

    pub(super) fn deliver(app: &mut App, message: &(String, Vec<u8>, Vec<u8>)) {
        let event = JobEvent::Forwarded { unique: message.1.clone(), value: message.2.clone() };
        app.handle_job_event(0, event, Instant::now());
    }

    /// A requester `a1` whose client A attached a job of `b2`, and the relay's id.
    pub(super) fn requested() -> (App, RelayId) {
        let mut app = up_app();
        app.relay_attach(A, "b2", attach("H:gm:7"), Instant::now());
        let e = effects(&mut app);
        let [(function, unique, payload)] = &relayed(&e)[..] else { panic!("{e:?}") };
        assert_eq!(function, "gearsock.report.b2");
        let address = relay_wire::parse_unique(unique).unwrap();
        assert_eq!((address.sender, address.n), ("a1", 0));
        let (kind, records) = relay_wire::parse(payload).unwrap();
        assert_eq!((kind, RemoteAttach::from_records(&records)), (Kind::Attach, Some(attach("H:gm:7"))));
        assert_eq!(app.relays_requested(), 1);
        (app, address.relay)
    }

    #[test]
    fn an_attach_for_another_instances_job_goes_to_its_desk_and_its_answer_comes_back() {
        let (mut requester, _) = requested();
        let mut owner = owner_app(1 << 20);
        let e = effects(&mut requester);
        assert!(e.is_empty());
        requester.relay_attach(A, "b2", attach("H:gm:8"), Instant::now());
        let e = effects(&mut requester);
        deliver(&mut owner, &relayed(&e)[0]);
        let answer = relayed(&effects(&mut owner));
        let [(function, unique, _)] = &answer[..] else { panic!("{answer:?}") };
        assert_eq!(function, "gearsock.report.a1");
        assert!(unique.starts_with(b"@b2."));
        assert_eq!(owner.relays_served(), 0, "a refusal ends the relay");
        deliver(&mut requester, &answer[0]);
        let e = effects(&mut requester);
        assert_eq!(codes(&e), ["unknown_job"]);
        assert!(sent(&e)[0].1.contains(r#""ref":"x""#));
        assert_eq!(
            (requester.relays_requested(), requester.relays.held_by(A)),
            (1, 1),
            "the first relay is open"
        );
    }

    #[test]
    fn a_relay_counts_as_a_job_of_its_client() {
        let (mut app, _) = requested();
        app.relay_attach(A, "b2", attach("H:gm:8"), Instant::now());
        app.relay_attach(A, "b2", attach("H:gm:9"), Instant::now());
        let e = effects(&mut app);
        assert_eq!(relayed(&e).len(), 1);
        assert_eq!(codes(&e), ["too_many_jobs"]);
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, Instant::now());
        assert_eq!(codes(&effects(&mut app)), ["too_many_jobs"]);
        app.handle_link_down(0, Instant::now());
        effects(&mut app);
        app.handle_client_open(B, true);
        app.relay_attach(B, "b2", attach("H:gm:9"), Instant::now());
        assert_eq!(codes(&effects(&mut app)), ["unavailable"], "no gearmand to relay through");
    }

    /// The owner's side of the relay `relay` of `a1`, opened directly (the core's attach would).
    pub(super) fn serve(owner: &mut App, relay: RelayId) -> u64 {
        let key = RemoteKey { instance: "a1".into(), relay };
        let at = owner.links.current(0);
        owner.relays.open_served(key, at).unwrap()
    }

    #[test]
    fn a_client_that_leaves_detaches_its_relay_at_the_owner() {
        let (mut requester, relay) = requested();
        let mut owner = owner_app(1 << 20);
        let id = serve(&mut owner, relay);
        owner.relay_text(id, "queued but not sent");
        requester.handle_client_closed(A, Instant::now());
        let e = effects(&mut requester);
        let [detach] = &relayed(&e)[..] else { panic!("{e:?}") };
        assert_eq!(requester.relays_requested(), 0);
        deliver(&mut owner, detach);
        assert_eq!(owner.relays_served(), 0);
        assert!(relayed(&effects(&mut owner)).is_empty(), "what was queued for it is dropped");
    }

    #[test]
    fn a_lost_link_breaks_the_relay_with_unavailable_for_the_job() {
        let (mut requester, _) = requested();
        requester.handle_link_down(0, Instant::now());
        let e = effects(&mut requester);
        let [(c, text)] = &sent(&e)[..] else { panic!("{e:?}") };
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(*c, A);
        assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("unavailable")));
        assert_eq!((v["job"].as_str(), v["ref"].as_str()), (Some("H:gm:7"), Some("x")));
        assert_eq!(requester.relays_requested(), 0);
        // The owner's side ends too: whatever it queued for the lost link is not sent.
        let mut owner = owner_app(1 << 20);
        let id = serve(&mut owner, *b"AAAAAAAAAAAA");
        owner.relay_text(id, "lost");
        owner.handle_link_down(0, Instant::now());
        assert!(relayed(&effects(&mut owner)).is_empty());
        assert_eq!(owner.relays_served(), 0);
    }
}
