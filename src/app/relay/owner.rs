//! The owner's side of a relay: a job of this instance attached from another instance. Its
//! reply texts are queued for the requester ([`App::relay_text`], [`App::relay_last`]), batched
//! per pass and sent through the desk of the requester, on the gearmand connection the attach
//! came on. The core decides what they are ([`App::find_journal`], [`App::attach_job`]); a job
//! whose requester left is detached as if a local client had.
//!
//! Must not: decide who may attach (the core's credentials do), or touch a socket.

use std::time::Instant;

use log::debug;

use super::super::App;
use super::super::attach::{Attach, UNKNOWN_JOB};
use super::super::joblog::Owner;
use super::super::links::LinkRef;
use super::super::relay_wire::{Kind, Payload, RemoteAttach};
use super::super::reply::Reply;
use super::{Broken, Outgoing, Relays, RemoteKey, Served};
use crate::gearman::client::JobTag;
use crate::metrics::{AttachOutcome, ErrorCode};

impl Relays {
    /// Opens the owner's side of relay `key`, pinned to connection `link`: its served id
    /// (None: it is open already, a duplicate attach).
    pub(super) fn open_served(&mut self, key: RemoteKey, link: LinkRef) -> Option<u64> {
        if self.serving.contains_key(&key) {
            return None;
        }
        let id = self.next_served;
        self.next_served += 1;
        self.serving.insert(key.clone(), id);
        self.served.insert(id, Served { key, tag: None, link, next_out: 0 });
        Some(id)
    }

    pub(super) fn close_served(&mut self, id: u64) -> Option<Served> {
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

impl App {
    /// gearmand connection `link` was lost: jobs we serve through it are detached, as if their
    /// client had left, and each requester hears so on another connection, if one is up.
    pub(in crate::app) fn served_link_down(&mut self, link: usize, now: Instant) {
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
    pub(super) fn on_remote_attach(&mut self, at: LinkRef, key: RemoteKey, attach: RemoteAttach) {
        let Some(id) = self.relays.open_served(key, at) else {
            return debug!("duplicate relayed attach dropped");
        };
        self.attach_for_remote(id, attach);
    }

    /// Owner side: the requester of relay `key` has nobody to send to any more.
    pub(super) fn on_remote_detach(&mut self, key: &RemoteKey, now: Instant) {
        let Some(&id) = self.relays.serving.get(key) else { return };
        let Some(served) = self.relays.close_served(id) else { return };
        self.relays.outbox.retain(|o| o.served != id);
        if let Some(tag) = served.tag {
            self.remote_owner_left(id, tag, now);
        }
    }

    /// Owner side: queues one reply text for served relay `id`.
    pub(in crate::app) fn relay_text(&mut self, id: u64, text: &str) {
        if self.relays.queue(id, text.as_bytes(), Kind::Texts) {
            self.metrics.relay_events[0] += 1;
        }
    }

    /// Owner side: the last text served relay `id` carries (the job's terminal event,
    /// `job.detached` after a takeover, or a refusal); the relay is over.
    pub(in crate::app) fn relay_last(&mut self, id: u64, text: &str) {
        if self.relays.queue(id, text.as_bytes(), Kind::Last) {
            self.metrics.relay_events[0] += 1;
        }
    }

    /// Owner side: served relay `id` is over, with nothing more to say.
    pub(in crate::app) fn relay_end(&mut self, id: u64) {
        self.relays.end(id);
    }
}

impl Relays {
    /// Owner side: the core found the job served relay `id` attaches; its texts now go there.
    pub(in crate::app) fn serve(&mut self, id: u64, tag: JobTag) {
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
            super::super::jobs::Phase::Running(named) | super::super::jobs::Phase::Grace(named) => {
                String::from_utf8_lossy(&named.handle).into_owned()
            }
            _ => String::new(),
        };
        Broken::text(&handle, why, job.reference())
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testkit::*;
    use super::super::super::*;
    use super::super::relay_wire::RemoteAttach;
    use super::super::tests::*;
    use super::super::{Kind, relay_wire};

    #[test]
    fn texts_of_one_pass_go_as_one_message_and_are_handed_on_in_order_once() {
        let (mut requester, relay) = requested();
        let mut owner = owner_app(1 << 20);
        let id = serve(&mut owner, relay);
        owner.relay_text(id, "one");
        owner.relay_text(id, "two");
        let first = relayed(&effects(&mut owner));
        assert_eq!(first.len(), 1, "one message for the pass");
        owner.relay_text(id, "three");
        let second = relayed(&effects(&mut owner));
        owner.relay_last(id, "four");
        let third = relayed(&effects(&mut owner));
        assert_eq!(owner.relays_served(), 0);
        owner.relay_text(id, "late");
        assert!(effects(&mut owner).is_empty(), "nothing goes to a relay that is over");
        // They arrive backwards, and one twice: the client hears each once, in order.
        for m in [&third[0], &second[0], &second[0], &first[0], &first[0]] {
            deliver(&mut requester, m);
        }
        let e = effects(&mut requester);
        assert_eq!(sent(&e), vec![(A, "one"), (A, "two"), (A, "three"), (A, "four")]);
        assert_eq!(requester.relays.held_by(A), 0, "the last message frees the client's slot");
        assert_eq!(requester.metrics.relay_events, [0, 4]);
        assert_eq!(owner.metrics.relay_events, [4, 0]);
    }

    #[test]
    fn a_long_text_goes_in_pieces_within_the_desks_limit() {
        let (mut requester, relay) = requested();
        let mut owner = owner_app(2048);
        let id = serve(&mut owner, relay);
        let long = format!("{{\"data\":\"{}\"}}", "z".repeat(5000));
        owner.relay_text(id, "short");
        owner.relay_last(id, &long);
        let messages = relayed(&effects(&mut owner));
        assert!(messages.len() >= 3, "{}", messages.len());
        assert!(messages.iter().all(|m| m.2.len() <= relay_wire::max_payload(2048)));
        for m in messages.iter().rev() {
            deliver(&mut requester, m);
        }
        assert_eq!(sent(&effects(&mut requester)), vec![(A, "short"), (A, long.as_str())]);
    }

    #[test]
    fn a_relay_nobody_asked_for_is_told_to_stop_once() {
        let mut owner = owner_app(1 << 20);
        let id = serve(&mut owner, *b"NotAnyones12");
        owner.relay_text(id, "one");
        let first = relayed(&effects(&mut owner));
        owner.relay_text(id, "two");
        let second = relayed(&effects(&mut owner));
        let mut requester = up_app();
        deliver(&mut requester, &first[0]);
        deliver(&mut requester, &second[0]);
        let e = effects(&mut requester);
        assert!(sent(&e).is_empty());
        let detach = relayed(&e);
        assert_eq!(detach.len(), 1, "answered once");
        assert_eq!(relay_wire::parse(&detach[0].2).map(|(k, _)| k), Ok(Kind::Detach));
        deliver(&mut owner, &detach[0]);
        assert_eq!(owner.relays_served(), 0);
        owner.relay_text(id, "three");
        assert!(effects(&mut owner).is_empty());
    }

    /// Carries every relay message among `e` to `to`; returns how many.
    /// Client A of `owner` submits `submit`, gearmand names it `H:gm:7`: the job, its
    /// `job.created` and its resume token.
    fn named_job(owner: &mut App, submit: &str, t0: Instant) -> (JobTag, Value, String) {
        owner.handle_client_text(A, submit, t0);
        let tag = submitted(&effects(owner))[0];
        owner.handle_job_event(0, JobEvent::Created { tag, handle: b"H:gm:7".to_vec() }, t0);
        let created: Value = serde_json::from_str(sent(&effects(owner))[0].1).unwrap();
        let resume = created["resume"].as_str().unwrap().to_string();
        (tag, created, resume)
    }

    fn carry(e: &[Effect], to: &mut App) -> usize {
        let messages = relayed(e);
        for m in &messages {
            deliver(to, m);
        }
        messages.len()
    }

    #[test]
    fn a_job_attached_from_another_instance_hears_every_event_once_through_the_relay() {
        let t0 = Instant::now();
        let mut owner = owner_app(1 << 20);
        let submit = r#"{"type":"submit","function":"f","payload":"p","ref":"mine"}"#;
        let (tag, created, resume) = named_job(&mut owner, submit, t0);
        assert!(resume.starts_with("b2."), "{created}");
        owner.handle_job_event(0, JobEvent::Data { tag, data: b"d1".to_vec() }, t0);
        owner.handle_client_closed(A, t0);
        owner.handle_job_event(0, JobEvent::Data { tag, data: b"d2".to_vec() }, t0);
        effects(&mut owner);

        // A client of a1 attaches after seq 2: the attach travels to b2's desk.
        let mut requester = up_app();
        let attach =
            serde_json::json!({"type":"attach","job":"H:gm:7","resume":resume,"after":2,"ref":"again"});
        requester.handle_client_text(A, &attach.to_string(), t0);
        assert_eq!(carry(&effects(&mut requester), &mut owner), 1);
        assert_eq!(owner.relays_served(), 1);
        // job.attached and the missed d2 come back as one message; then each live event.
        assert_eq!(carry(&effects(&mut owner), &mut requester), 1);
        owner.handle_job_event(0, JobEvent::Data { tag, data: b"d3".to_vec() }, t0);
        owner.handle_job_event(0, JobEvent::Complete { tag, data: b"done".to_vec() }, t0);
        assert_eq!(carry(&effects(&mut owner), &mut requester), 1, "one pass, one message");
        let e = effects(&mut requester);
        let got: Vec<Value> =
            sent(&e).iter().map(|(c, t)| (assert_eq!(*c, A), serde_json::from_str(t).unwrap()).1).collect();
        let kinds: Vec<&str> = got.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(kinds, ["job.attached", "job.data", "job.data", "job.complete"], "{got:?}");
        let seqs: Vec<u64> = got[1..].iter().filter_map(|v| v["seq"].as_u64()).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(got[0]["ref"], "again");
        assert_eq!((owner.relays_served(), requester.relays_requested()), (0, 0), "the end ends the relay");

        // The same token again, now that the job is gone: unknown_job, as a local attach hears.
        requester.handle_client_text(A, &attach.to_string(), t0);
        carry(&effects(&mut requester), &mut owner);
        carry(&effects(&mut owner), &mut requester);
        assert_eq!(codes(&effects(&mut requester)), ["unknown_job"]);
    }

    #[test]
    fn a_remote_owner_that_leaves_detaches_the_job_and_a_local_attach_takes_it_over() {
        let t0 = Instant::now();
        let mut owner = owner_app(1 << 20);
        let (_, _, resume) = named_job(&mut owner, r#"{"type":"submit","function":"f"}"#, t0);
        owner.handle_client_closed(A, t0);
        let attach = serde_json::json!({"type":"attach","job":"H:gm:7","resume":resume,"after":1});
        let mut requester = up_app();
        requester.handle_client_text(A, &attach.to_string(), t0);
        carry(&effects(&mut requester), &mut owner);
        carry(&effects(&mut owner), &mut requester);
        effects(&mut requester);
        assert_eq!(owner.jobs_detached(), 0, "attached from a1");
        // The requester's client leaves: the job waits detached on its owner again.
        requester.handle_client_closed(A, t0);
        carry(&effects(&mut requester), &mut owner);
        assert_eq!((owner.jobs_detached(), owner.relays_served()), (1, 0));

        // Attached from a1 again, then taken over by a local client of b2: a1's client hears
        // job.detached and its relay ends.
        requester.handle_client_open(B, true);
        requester.handle_client_text(B, &attach.to_string(), t0);
        carry(&effects(&mut requester), &mut owner);
        carry(&effects(&mut owner), &mut requester);
        effects(&mut requester);
        owner.handle_client_open(B, true);
        owner.handle_client_text(B, &attach.to_string(), t0);
        let e = effects(&mut owner);
        assert!(sent(&e).iter().any(|(c, t)| *c == B && t.contains("job.attached")));
        carry(&e, &mut requester);
        let e = effects(&mut requester);
        let [(c, text)] = &sent(&e)[..] else { panic!("{e:?}") };
        assert!(*c == B && text.contains("job.detached"), "{text}");
        assert_eq!(requester.relays.held_by(B), 0);
    }

    #[test]
    fn the_owner_checks_the_sub_the_requester_verified() {
        let t0 = Instant::now();
        let mut owner = owner_app(1 << 20);
        let (_, _, resume) = named_job(&mut owner, r#"{"type":"submit","function":"f"}"#, t0);
        let mut requester = up_app();
        for (sub, answer) in [(Some("mallory"), "error"), (None, "job.attached")] {
            let attach = RemoteAttach {
                job: "H:gm:7".into(),
                resume: resume.clone(),
                after: 1,
                reference: None,
                sub: sub.map(Into::into),
            };
            requester.relay_attach(A, "b2", attach, Instant::now());
            carry(&effects(&mut requester), &mut owner);
            carry(&effects(&mut owner), &mut requester);
            let e = effects(&mut requester);
            let v: Value = serde_json::from_str(sent(&e)[0].1).unwrap();
            assert_eq!(v["type"], answer, "{v}");
        }
    }
}
