//! Which instances a requester relays attaches to, and what it does when one does not answer:
//! every relay message is a background job gearmand keeps until the owner's desk takes it, so
//! a relay to an instance nobody runs would be held in gearmand forever, and its client never
//! answered.
//!
//! - **Peers only.** An attach is relayed only to a peer: another process of this one's group,
//!   or a `--peer-instance`. A token naming any other instance gets the `unknown_job` a local
//!   refusal gives, at once, and nothing is queued.
//! - **An answer deadline.** The owner has `--relay-answer-ms` to say anything for a relay.
//!   If it did not, the relay ends with that same `unknown_job` (a job cannot be told from an
//!   owner that is gone), its slot is freed, and a late answer is one for an unknown relay
//!   (answered with one `detach`).
//! - **A silent peer is probed, not asked.** After a missed deadline the peer is silent: its
//!   attaches are answered `unavailable` (a client library asks again later) and at most one
//!   probe per [`PROBE_INTERVAL`] goes to its desk, under one fixed unique, so that gearmand
//!   coalesces a probe still queued with the next. Any message from the peer ends its silence.
//!
//! The bound, per requester and peer: gearmand holds the attaches relayed within one answer
//! window before the peer fell silent (each also held a job slot of its client here, so at most
//! `--max-connections` × `--max-jobs-per-connection`), plus one probe, however long the peer
//! stays down; for an instance that is not a peer, nothing.
//!
//! Must not: decide what an owner answers (the core does), or touch a socket.

use std::time::{Duration, Instant};

use log::debug;

use super::super::attach::UNKNOWN_JOB;
use super::super::relay_wire::{Kind, PROBE_RELAY, Payload, RelayId, RemoteAttach};
use super::super::{App, ConnId};
use super::Broken;
use crate::metrics::{AttachOutcome, ErrorCode};

/// At most one probe goes to a silent peer this often.
pub(in crate::app) const PROBE_INTERVAL: Duration = Duration::from_secs(5);

impl App {
    /// Whether client `id`'s attach may be relayed to `owner` now; if not, the client has its
    /// answer: `unknown_job` for an instance that is no peer, `unavailable` for a silent peer
    /// (which is probed, at most once per [`PROBE_INTERVAL`]).
    pub(super) fn may_relay_to(
        &mut self,
        id: ConnId,
        owner: &str,
        attach: &RemoteAttach,
        now: Instant,
    ) -> bool {
        let r = attach.reference.as_ref();
        if !self.relays.peers.contains(owner) {
            self.metrics.count_attach(AttachOutcome::Unknown);
            self.error(id, ErrorCode::UnknownJob, UNKNOWN_JOB, r);
            return false;
        }
        let Some(next_probe) = self.relays.silent.get_mut(owner) else { return true };
        if now >= *next_probe {
            *next_probe = now + PROBE_INTERVAL;
            if let Some(link) = self.links.pick() {
                self.submit_relay(link, owner, &PROBE_RELAY, 0, Payload::new(Kind::Probe).into_bytes());
            }
        }
        self.metrics.count_error(ErrorCode::Unavailable);
        let why = "the job's instance has not been answering; ask again later";
        self.send(id, Broken::text(attach.job.as_str(), why, r).into());
        false
    }

    /// A relayed attach's answer deadline: a relay its owner has said nothing for ends with
    /// `unknown_job`, and the owner is silent from now on (its first probe may go at once).
    pub(in crate::app) fn on_relay_deadline(&mut self, relay: RelayId, now: Instant) {
        if self.relays.asked.get(&relay).is_none_or(|a| a.heard) {
            return;
        }
        let Some(asked) = self.relays.asked.remove(&relay) else { return };
        debug!("relayed attach to {} unanswered: unknown_job", asked.owner);
        self.metrics.count_attach(AttachOutcome::Unknown);
        self.error(asked.conn, ErrorCode::UnknownJob, UNKNOWN_JOB, asked.reference.as_ref());
        if self.relays.peers.contains(&asked.owner) {
            self.relays.silent.entry(asked.owner).or_insert(now);
        }
    }

    /// A probe, or a probe's answer, from `sender` (it serves its desk: no longer silent).
    pub(super) fn on_probe(&mut self, link: usize, sender: &str, kind: Kind) {
        if kind == Kind::Probe {
            let answer = Payload::new(Kind::Last).into_bytes();
            self.submit_relay(link, sender, &PROBE_RELAY, 0, answer);
        }
    }

    /// The instances attaches may be relayed to from now on (SIGHUP). A relay open to one
    /// left out runs to its end.
    pub fn set_peer_instances(&mut self, peers: &[String]) {
        self.relays.peers = peers.iter().map(|p| p.as_str().into()).collect();
        let relays = &mut self.relays;
        relays.silent.retain(|p, _| relays.peers.contains(p));
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testkit::*;
    use super::super::tests::*;
    use super::*;

    #[test]
    fn an_attach_naming_an_instance_that_is_no_peer_is_unknown_at_once_and_queues_nothing() {
        let mut app = up_app();
        app.relay_attach(A, "zz9", attach("H:gm:7"), Instant::now());
        let e = effects(&mut app);
        assert!(submitted(&e).is_empty(), "{e:?}");
        assert!(!e.iter().any(|e| matches!(e, Effect::Arm(..))), "{e:?}");
        assert_eq!(codes(&e), ["unknown_job"]);
        assert!(sent(&e)[0].1.contains(r#""ref":"x""#));
        assert_eq!((app.relays_requested(), app.relays.held_by(A)), (0, 0));
    }

    /// The requester's relay `relay` to `b2`, and its answer deadline.
    fn deadline(app: &mut App) -> (RelayId, Instant) {
        let t0 = Instant::now();
        app.relay_attach(A, "b2", attach("H:gm:7"), t0);
        let e = effects(app);
        let [Effect::Arm(at, AppTimer::RelayAnswer(relay))] =
            e.iter().filter(|e| matches!(e, Effect::Arm(..))).collect::<Vec<_>>()[..]
        else {
            panic!("{e:?}")
        };
        assert_eq!(*at, t0 + Duration::from_secs(5));
        (*relay, *at)
    }

    #[test]
    fn an_unanswered_relay_ends_unknown_at_its_deadline_and_frees_its_slot() {
        let mut app = up_app();
        let (relay, at) = deadline(&mut app);
        assert_eq!(app.relays.held_by(A), 1);
        app.handle_timer(AppTimer::RelayAnswer(relay), at);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["unknown_job"]);
        let v: Value = serde_json::from_str(sent(&e)[0].1).unwrap();
        assert_eq!(v["message"], UNKNOWN_JOB, "the text a local refusal gives");
        assert!(submitted(&e).is_empty(), "nothing more for the silent owner: {e:?}");
        assert_eq!((app.relays_requested(), app.relays.held_by(A)), (0, 0));
        // A late answer is one for an unknown relay: one detach back.
        let mut owner = owner_app(1 << 20);
        let key = super::super::RemoteKey { instance: "a1".into(), relay };
        let id = owner.relays.open_served(key, owner.links.current(0)).unwrap();
        owner.relay_last(id, "late");
        let late = relayed(&effects(&mut owner));
        deliver(&mut app, &late[0]);
        let e = effects(&mut app);
        assert!(sent(&e).is_empty());
        let [(function, _, payload)] = &relayed(&e)[..] else { panic!("{e:?}") };
        assert_eq!((function.as_str(), payload.as_slice()), ("gearsock.report.b2", &b"d"[..]));
    }

    #[test]
    fn a_relay_the_owner_answered_has_no_deadline() {
        let mut app = up_app();
        let (relay, at) = deadline(&mut app);
        let mut owner = owner_app(1 << 20);
        let key = super::super::RemoteKey { instance: "a1".into(), relay };
        let id = owner.relays.open_served(key, owner.links.current(0)).unwrap();
        owner.relay_text(id, r#"{"type":"job.attached"}"#);
        deliver(&mut app, &relayed(&effects(&mut owner))[0]);
        effects(&mut app);
        app.handle_timer(AppTimer::RelayAnswer(relay), at);
        assert!(effects(&mut app).is_empty());
        assert_eq!(app.relays_requested(), 1);
    }

    /// The probes among `e`, as the desk each went to.
    fn probes(e: &[Effect]) -> Vec<String> {
        relayed(e)
            .into_iter()
            .filter(|(_, unique, payload)| unique.as_slice() == b"@a1.~probe~~~~~~.0" && payload == b"p")
            .map(|(function, ..)| function)
            .collect()
    }

    #[test]
    fn a_silent_owner_is_probed_at_most_once_per_interval_and_asked_again_once_it_answers() {
        let mut app = up_app();
        let (relay, t0) = deadline(&mut app);
        app.handle_timer(AppTimer::RelayAnswer(relay), t0);
        effects(&mut app);
        let mut all = Vec::new();
        // Attaches every 100 ms for 12 s: each is answered unavailable at once, and only
        // three probes go (at 0, 5 and 10 s), all under the same unique.
        for i in 0..120 {
            let now = t0 + Duration::from_millis(100 * i);
            app.relay_attach(A, "b2", attach("H:gm:7"), now);
            let e = effects(&mut app);
            assert_eq!(codes(&e), ["unavailable"]);
            assert!(sent(&e)[0].1.contains(r#""job":"H:gm:7""#), "it names the job, to be asked again");
            assert!(!e.iter().any(|e| matches!(e, Effect::Arm(..))));
            assert_eq!(relayed(&e).len(), probes(&e).len(), "nothing but probes: {e:?}");
            all.extend(probes(&e).into_iter().map(|f| (i, f)));
        }
        assert_eq!(
            all,
            [
                (0, "gearsock.report.b2".into()),
                (50, "gearsock.report.b2".into()),
                (100, "gearsock.report.b2".into())
            ]
        );
        assert_eq!(app.relays_requested(), 0);
        // The owner answers the probe, and the next attach is relayed again.
        let mut owner = owner_app(1 << 20);
        app.relay_attach(A, "b2", attach("H:gm:7"), t0 + Duration::from_secs(15));
        let probe = relayed(&effects(&mut app));
        deliver(&mut owner, &probe[0]);
        let answer = relayed(&effects(&mut owner));
        let [(function, unique, payload)] = &answer[..] else { panic!("{answer:?}") };
        assert_eq!(
            (function.as_str(), unique.as_slice(), payload.as_slice()),
            ("gearsock.report.a1", &b"@b2.~probe~~~~~~.0"[..], &b"f"[..])
        );
        deliver(&mut app, &answer[0]);
        let e = effects(&mut app);
        assert!(relayed(&e).is_empty(), "a probe's answer needs no detach: {e:?}");
        app.relay_attach(A, "b2", attach("H:gm:7"), t0 + Duration::from_secs(16));
        let e = effects(&mut app);
        assert_eq!(relayed(&e).len(), 1);
        assert!(sent(&e).is_empty());
        assert_eq!(app.relays_requested(), 1);
    }

    #[test]
    fn peers_can_change() {
        let mut app = up_app();
        let (relay, at) = deadline(&mut app);
        app.handle_timer(AppTimer::RelayAnswer(relay), at);
        effects(&mut app);
        app.set_peer_instances(&["c3".into()]);
        assert!(app.relays.silent.is_empty());
        app.relay_attach(A, "b2", attach("H:gm:7"), at);
        app.relay_attach(B, "c3", attach("H:gm:7"), at);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["unknown_job"]);
        assert_eq!(relayed(&e).len(), 1);
    }
}
