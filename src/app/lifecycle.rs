//! The App's steps in a job's life: accepted (or refused), submitted or held, named by
//! gearmand, finished; the one place a job ends ([`App::end_job`]), which removes it from every
//! index; and the last word of every job at shutdown.
//!
//! Must not: keep state of its own (the job table is [`super::jobs`], the links
//! [`super::links`]), or read the clock (`now` is given).

use std::time::Instant;

use super::fields::Ref;
use super::jobs::{Kind, Phase, Submission};
use super::links::HandleOwners;
use super::reply::{JobNews, Reply};
use super::{App, AppTimer, ConnId, Effect};
use crate::gearman::client::JobTag;
use crate::metrics::{ErrorCode, Outcome};

impl App {
    /// Admits a job for a client: checks its limits, then submits it to a gearmand or holds it
    /// until one takes work. Replies with an error and returns None when it cannot.
    pub(super) fn accept_job(
        &mut self,
        id: ConnId,
        kind: Kind,
        reference: Option<Ref>,
        submission: Submission,
        unique: Option<String>,
        now: Instant,
    ) -> Option<JobTag> {
        let max_jobs = self.access.max_jobs(id, self.cfg.max_jobs_per_connection);
        if self.clients.jobs(id)?.len() + self.relays.held_by(id) >= max_jobs {
            let text = format!("at most {max_jobs} unfinished jobs per connection");
            self.error(id, ErrorCode::TooManyJobs, &text, reference.as_ref());
            return None;
        }
        let submitter = (kind != Kind::Stream).then(|| self.clients.submitter(id)).flatten();
        if let Some(who) = submitter
            && !self.quota.take(who)
        {
            let text = format!(
                "at most {} background jobs and pings from one address may be unfinished in gearmand \
                 (--max-background-per-peer), including those of connections that have closed",
                self.cfg.max_background_per_peer
            );
            self.error(id, ErrorCode::TooManyJobs, &text, reference.as_ref());
            return None;
        }
        let link = self.links.pick();
        if link.is_none() && self.jobs.queued() >= self.cfg.queue_limit {
            if let Some(who) = submitter {
                self.quota.give_back(who);
            }
            let text = "no gearmand is taking jobs (disconnected or stalled) and the wait queue is full";
            self.error(id, ErrorCode::Unavailable, text, reference.as_ref());
            return None;
        }
        let unique = self.gearman_unique(id, kind, unique).into_boxed_slice();
        let tag = self.jobs.insert((id, submitter), kind, reference, submission, unique, now);
        self.metrics.count_submitted(kind.mode());
        self.clients.add_job(id, tag);
        match link {
            Some(link) => self.submit_to(tag, link),
            None => {
                self.jobs.hold(tag, self.cfg.queue_limit);
                self.effects.push(Effect::Arm(now + self.cfg.queue_timeout, AppTimer::QueueTimeout(tag)));
            }
        }
        Some(tag)
    }

    fn submit_to(&mut self, tag: JobTag, link: usize) {
        let at = self.links.current(link);
        let Some(job) = self.jobs.get_mut(tag) else { return };
        let Some(sub) = job.start(at) else { return };
        let (mode, unique) = (job.kind().job_mode(), job.unique().to_vec());
        let Submission { function, payload, priority } = *sub;
        self.links.hold(link);
        self.links.count_submit(link, &[&function, &unique, &payload]);
        self.effects.push(Effect::Submit { link, tag, function, unique, payload, mode, priority });
    }

    /// Held submissions go to the links that take work, while any does.
    pub(super) fn submit_queued(&mut self) {
        while let Some(tag) = self.jobs.next_held() {
            let Some(target) = self.links.pick() else { return };
            self.jobs.pop_held();
            self.submit_to(tag, target);
        }
    }

    /// A held submission has waited long enough: it ends unsubmitted.
    pub(super) fn on_queue_timeout(&mut self, tag: JobTag, now: Instant) {
        let Some(job) = self.jobs.get(tag).filter(|j| matches!(j.phase(), Phase::Queued(_))) else { return };
        let (conn, reference) = (job.conn(), job.reference().cloned());
        let text = "no gearmand took the job in time; it was not submitted";
        self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
        self.end_job(tag, Outcome::Unavailable, now);
    }

    /// gearmand named a job submitted on `link`. A polled job starts its polls, and may find
    /// its value already reported by handle.
    pub(super) fn on_created(&mut self, link: usize, tag: JobTag, handle: Vec<u8>, now: Instant) {
        let interval = self.cfg.poll_interval;
        let at = self.links.current(link);
        let handle: Box<[u8]> = handle.into_boxed_slice();
        let Some(job) = self.jobs.get_mut(tag) else { return };
        if !job.name(at, handle.clone()) {
            return;
        }
        let (kind, accepted_at) = (job.kind(), job.accepted_at());
        if kind != Kind::Stream {
            // An id-only value reported for this handle after we submitted, while no other
            // connection has a job so named, can only be this job's (its worker reported
            // before our JOB_CREATED was read).
            let alone = matches!(self.links.owners(&handle), HandleOwners::None);
            let stored =
                std::str::from_utf8(&handle).ok().filter(|_| alone).and_then(|h| self.stored.take(h));
            if let Some(stored) = stored.filter(|s| s.at() >= accepted_at)
                && let Some(job) = self.jobs.get_mut(tag)
            {
                job.set_value_if_none(stored.into_value());
            }
            let Some(job) = self.jobs.get_mut(tag) else { return };
            job.first_poll(now + interval);
            self.effects.push(Effect::Arm(now + interval, AppTimer::Poll(tag)));
        }
        self.links.name(link, handle, tag);
        if kind != Kind::Ping {
            self.open_journal(tag, now);
        }
    }

    /// The last event of a submission: its job ends, or, if its client has left, the orphan
    /// it left on `link` is gone from gearmand.
    pub(super) fn end_submission(&mut self, link: usize, tag: JobTag, outcome: Outcome, now: Instant) {
        if self.jobs.get(tag).is_some() {
            return self.end_job(tag, outcome, now);
        }
        self.links.forget_orphan(link, tag);
    }

    /// The last words about a polled job: `value: V` for a ping (the article's line, empty when
    /// no worker reported), `job.complete` for a background job.
    pub(super) fn finish_polled(&mut self, tag: JobTag, now: Instant) {
        let Some(job) = self.jobs.get_mut(tag) else { return };
        let value = job.take_value();
        let (kind, conn) = (job.kind(), job.conn());
        if job.is_detached() {
            // Nobody to tell; its outcome was counted when its client left.
        } else if kind == Kind::Ping {
            self.send(conn, Reply::PingValue(value.as_deref()).text());
        } else {
            self.job_reply(tag, JobNews::Value(value.as_deref()), now);
        }
        self.end_job(tag, if kind == Kind::Ping { Outcome::Done } else { Outcome::Complete }, now);
    }

    /// Removes a job everywhere it is indexed; its journal goes too, or, when the job was
    /// detached, is kept for the grace from `now`.
    pub(super) fn end_job(&mut self, tag: JobTag, outcome: Outcome, now: Instant) {
        let Some(job) = self.jobs.remove(tag) else { return };
        if let Some(id) = job.journal() {
            self.end_journal(id, now);
        }
        if let Some(who) = job.submitter() {
            self.quota.give_back(who);
        }
        if job.is_detached() {
            self.quota.forget_detached(); // counted as abandoned when its client left
        } else {
            self.metrics.count_finished(job.kind().mode(), outcome);
        }
        self.clients.forget_job(job.conn(), tag);
        let Some(link) = job.link().filter(|&at| self.links.is_live(at)) else { return };
        if let Some(handle) = job.handle() {
            self.links.unname(link, handle, tag);
        }
        if job.holds_link().is_some() {
            self.release_link(link.index);
        }
    }

    /// The server is stopping: every unfinished job gets its one terminal reply now, so that a
    /// client can account for each job before its connection closes. A job still held for a
    /// gearmand was never submitted (`error` `unavailable`, as when the queue times out); one
    /// that gearmand has is `job.lost` to us (it may still run, but nobody will hear how it
    /// ends); a polled job gearmand has already forgotten ends as it would after its grace,
    /// with whatever value its worker reported. Open `status` questions get `unavailable`.
    pub fn handle_shutdown(&mut self, now: Instant) {
        for tag in self.jobs.oldest_first() {
            let Some(job) = self.jobs.get(tag) else { continue };
            match job.phase() {
                Phase::Queued(_) => {
                    let (conn, reference) = (job.conn(), job.reference().cloned());
                    let text = "the server is shutting down; the job was not submitted";
                    self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
                    self.end_job(tag, Outcome::Unavailable, now);
                }
                Phase::Submitted(_) | Phase::Running(_) => {
                    let reason = "the server is shutting down; it will not hear how this job ends";
                    self.job_reply(tag, JobNews::Lost(reason), now);
                    self.end_job(tag, Outcome::Lost, now);
                }
                Phase::Grace(_) => self.finish_polled(tag, now),
            }
        }
        for ask in self.asks.take_all() {
            for (conn, reference) in ask.clients {
                let text = "the server is shutting down before gearmand answered";
                self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;

    #[test]
    fn held_submission_times_out_as_unavailable() {
        let t0 = Instant::now();
        let mut app = App::new(cfg(), 1, Entropy::counter());
        app.handle_client_open(A, true);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        let e = effects(&mut app);
        let Some(Effect::Arm(at, timer)) = e.iter().find(|e| matches!(e, Effect::Arm(..))) else { panic!() };
        app.handle_timer(*timer, *at);
        assert!(sent(&effects(&mut app))[0].1.contains("unavailable"));
        assert_eq!((app.jobs_in_flight(), app.jobs_queued()), (0, 0));
    }

    #[test]
    fn shutdown_gives_every_unfinished_job_and_question_its_last_word() {
        let t0 = Instant::now();
        let cfg = AppConfig { max_jobs_per_connection: 8, queue_limit: 4, ..cfg() };
        let mut app = App::new(cfg, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app.handle_client_open(B, true);
        app.handle_client_text(A, r#"{"type":"submit","function":"f","ref":"running"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background","ref":"sent"}"#, t0);
        app.handle_client_text(A, r#"{"type":"ping","ref":"ping"}"#, t0);
        let subs = submitted(&effects(&mut app));
        let [running, _sent, ping] = subs[..] else { panic!("{subs:?}") };
        app.handle_job_event(0, JobEvent::Created { tag: running, handle: b"H:1".to_vec() }, t0);
        app.handle_job_event(0, JobEvent::Created { tag: ping, handle: b"H:3".to_vec() }, t0);
        let ask = poll(&mut app, ping, t0);
        app.handle_job_event(0, gone(ask, b"H:3"), t0); // the ping waits for its value
        app.handle_client_text(A, r#"{"type":"status","job":"H:1","ref":"question"}"#, t0);
        // gearmand stops taking bytes: B's job is held.
        app.handle_link_output(0, 1 << 20);
        app.handle_client_text(B, r#"{"type":"submit","function":"f","ref":"held"}"#, t0);
        effects(&mut app);
        assert_eq!((app.jobs_in_flight(), app.jobs_queued()), (4, 1));

        app.handle_shutdown(t0);
        let e = effects(&mut app);
        let mut replies: Vec<(u32, String)> = sent(&e)
            .iter()
            .map(|(c, t)| match serde_json::from_str::<Value>(t) {
                Ok(v) => (c.key, format!("{} {}", v["type"].as_str().unwrap(), v["ref"].as_str().unwrap())),
                Err(_) => (c.key, t.to_string()),
            })
            .collect();
        replies.sort();
        let mut want: Vec<(u32, String)> = [
            (A, "job.lost running"),
            (A, "job.lost sent"),
            (A, "value: "), // the ping gearmand had forgotten ends as after its grace
            (A, "error question"),
            (B, "error held"),
        ]
        .iter()
        .map(|(c, t)| (c.key, t.to_string()))
        .collect();
        want.sort();
        assert_eq!(replies, want);
        assert!(codes(&e).iter().all(|c| c == "unavailable"), "{e:?}");
        assert_eq!((app.jobs_in_flight(), app.jobs_queued()), (0, 0));
        // Nothing is said twice: not by a second call, not by gearmand's late news.
        app.handle_shutdown(t0);
        app.handle_job_event(0, JobEvent::Complete { tag: running, data: b"late".to_vec() }, t0);
        app.handle_timer(AppTimer::Grace(ping), t0 + Duration::from_secs(1));
        assert_eq!(sent(&effects(&mut app)), vec![]);
    }
}
