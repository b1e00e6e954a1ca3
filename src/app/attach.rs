//! A job outlives its connection: every job event is numbered and logged ([`super::joblog`]),
//! a job whose client left is detached for `--detach-grace-ms`, and `attach` gives it to a
//! connection again, replaying what it missed.
//!
//! Who hears a job's events is decided in one place, [`App::job_reply`] → [`App::deliver`], by
//! the journal's [`Owner`]. [`App::find_journal`] checks an attach's credentials, and
//! [`App::attach_job`] moves the job to its new owner and makes the replies to replay; neither
//! assumes the asker is a local connection (only [`App::on_attach`] does: the limits, the error
//! replies).
//!
//! Must not: decide how a job ends (abandoning one is today's treatment of a job whose client
//! left, [`App::abandon`]), or read the clock.

use std::borrow::Cow;
use std::time::Instant;

use super::fields::Ref;
use super::joblog::{Journal, Log, Owner, Replayed, SECRET_CHARS};
use super::jobs::Kind;
use super::relay_wire::RemoteAttach;
use super::reply::{JobNews, Reply};
use super::{App, AppTimer, ConnId, Effect};
use crate::gearman::client::JobTag;
use crate::metrics::{AttachOutcome, ErrorCode, Outcome};

/// The longest `resume` worth reading: `<instance id>.<number>.<secret>`.
const MAX_RESUME_BYTES: usize = 128;

/// Why an attach found no job: the same words for every failure (and on every instance).
pub(super) const UNKNOWN_JOB: &str =
    "no job with that handle and resume token is kept here (wrong, expired, or ended)";

/// An `attach` as parsed: the job's handle, its resume token, and the last seq the client has.
pub(super) struct Attach {
    pub handle: String,
    pub resume: String,
    pub after: u64,
}

impl JobNews<'_> {
    /// The job's last event.
    fn is_terminal(&self) -> bool {
        !matches!(self, JobNews::Created(_) | JobNews::Status(_) | JobNews::Data(_) | JobNews::Warning(_))
    }
}

impl App {
    /// A job's news to whoever owns it: `job` (its handle, or null before gearmand named it),
    /// the job's `ref` if it had one, its `seq` (not a ping's), and what happened. A job with
    /// a journal logs it too.
    pub(super) fn job_reply(&mut self, tag: JobTag, news: JobNews, now: Instant) {
        let Some(job) = self.jobs.get(tag).filter(|j| !j.is_detached()) else { return };
        let (handle, reference) = (job.handle(), job.reference());
        let Some(id) = job.journal() else {
            // A ping (the article's wire text), or a job that ends before job.created: its one
            // event is its first.
            let (seq, conn) = ((job.kind() != Kind::Ping).then_some(1), job.conn());
            let text = Reply::Job { handle, news, reference, seq }.text();
            return self.send(conn, text);
        };
        let Some(journal) = self.journals.get(id) else { return };
        let (owner, seq) = (journal.owner, journal.log.next_seq());
        let (status, terminal) = (matches!(news, JobNews::Status(_)), news.is_terminal());
        let text = Reply::Job { handle, news, reference, seq: Some(seq) }.text();
        if terminal && owner != Owner::Detached {
            // Its owner hears the end, and the journal goes with the job: nothing to keep.
            return self.deliver_last(owner, text);
        }
        let gone = self.journals.push(id, &text, status, terminal);
        self.deliver(owner, text);
        self.give_up(gone, now);
        self.retire_over_orphaned();
    }

    /// Journals given up to keep within `--job-log-total-bytes`: their jobs are abandoned.
    fn give_up(&mut self, gone: Vec<Journal>, now: Instant) {
        for journal in gone {
            self.metrics.count_detached_abandoned(true);
            if let Some(tag) = journal.job {
                self.abandon(tag, now);
            }
        }
    }

    /// The one place a job's text goes to its owner.
    pub(super) fn deliver(&mut self, owner: Owner, text: Cow<'static, str>) {
        match owner {
            Owner::Conn(conn) => self.send(conn, text),
            Owner::Remote(relay) => self.relay_text(relay, &text),
            Owner::Detached => {}
        }
    }

    /// An owner's last text about a job (its end, or that another took it): a relay is over
    /// after it.
    pub(super) fn deliver_last(&mut self, owner: Owner, text: Cow<'static, str>) {
        match owner {
            Owner::Remote(relay) => self.relay_last(relay, &text),
            owner => self.deliver(owner, text),
        }
    }

    /// gearmand named a submitted job: its journal opens, owned by its connection, and it
    /// tells the client how to attach again (`job.created` with `resume`, seq 1).
    pub(super) fn open_journal(&mut self, tag: JobTag, now: Instant) {
        let Some(job) = self.jobs.get(tag) else { return };
        let (Some(handle), false) = (job.handle(), job.is_detached()) else { return };
        let mut secret = [0; SECRET_CHARS];
        self.uniques.fill_secret(&mut secret);
        let journal = Journal {
            secret,
            handle: handle.into(),
            sub: self.access.sub(job.conn()).map(Into::into),
            owner: Owner::Conn(job.conn()),
            job: Some(tag),
            deadline: None,
            log: Log::default(),
        };
        let id = self.journals.open(journal);
        if let Some(job) = self.jobs.get_mut(tag) {
            job.set_journal(Some(id));
        }
        let resume = format!("{}.{id}.{}", self.cfg.instance_id, String::from_utf8_lossy(&secret));
        self.job_reply(tag, JobNews::Created(Some(&resume)), now);
    }

    /// A job ended: an owned journal goes with it; a detached one keeps its log for the grace,
    /// counted from now.
    pub(super) fn end_journal(&mut self, id: u64, now: Instant) {
        let grace = self.cfg.detach_grace;
        let Some(journal) = self.journals.get_mut(id) else { return };
        journal.job = None;
        if journal.owner != Owner::Detached || grace.is_zero() {
            self.journals.remove(id);
            return;
        }
        journal.deadline = Some(now + grace);
        self.effects.push(Effect::Arm(now + grace, AppTimer::Journal(id)));
    }

    /// A client left: each of its jobs that has a journal is detached for the grace (it runs
    /// on, its events logged); the others are abandoned now, as before there were journals.
    pub(super) fn detach_jobs(&mut self, tags: Vec<JobTag>, now: Instant) {
        let grace = self.cfg.detach_grace;
        // Journals given up to keep within the total go after the loop, so that no job of
        // `tags` is abandoned twice.
        let mut gone = Vec::new();
        for tag in tags {
            let journal = self.jobs.get(tag).and_then(|j| j.journal());
            match journal {
                Some(id) if !grace.is_zero() => {
                    gone.extend(self.journals.set_owner(id, Owner::Detached));
                    if let Some(j) = self.journals.get_mut(id) {
                        j.deadline = Some(now + grace);
                        self.effects.push(Effect::Arm(now + grace, AppTimer::Journal(id)));
                    }
                }
                _ => {
                    if let Some(id) = journal {
                        self.journals.remove(id);
                    }
                    self.abandon(tag, now);
                }
            }
        }
        self.give_up(gone, now);
        self.retire_over_orphaned();
    }

    /// A job nobody will hear of again: gearmand cannot cancel a foreground job, so an
    /// unfinished stream job becomes an orphan of its gearmand connection; a background job or
    /// ping gearmand has is kept, detached, and polled until gearmand forgets it, so that it
    /// still counts against its submitter's quota; any other ends now.
    pub(super) fn abandon(&mut self, tag: JobTag, now: Instant) {
        let Some(job) = self.jobs.get_mut(tag) else { return };
        job.set_journal(None);
        let (kind, at) = (job.kind(), job.holds_link());
        match at {
            Some(at) if kind == Kind::Stream => self.links.orphan(at, tag),
            Some(_) if self.quota.detach() => {
                job.detach();
                self.metrics.count_finished(kind.mode(), Outcome::Abandoned);
                return;
            }
            _ => {}
        }
        self.end_job(tag, Outcome::Abandoned, now);
    }

    /// Links over `--max-orphans` are retired.
    pub(super) fn retire_over_orphaned(&mut self) {
        let retire: Vec<usize> = self.links.over_orphaned(self.cfg.max_orphans).collect();
        self.effects.extend(retire.into_iter().map(Effect::Retire));
    }

    /// A detached journal's grace may be over: its job is abandoned, or its kept log dropped.
    pub(super) fn on_journal_timer(&mut self, id: u64, now: Instant) {
        let Some(journal) = self.journals.get(id) else { return };
        if journal.owner != Owner::Detached || journal.deadline.is_none_or(|at| at > now) {
            return; // attached since, or detached again later
        }
        let Some(journal) = self.journals.remove(id) else { return };
        if let Some(tag) = journal.job {
            self.metrics.count_detached_abandoned(false);
            self.abandon(tag, now);
            self.retire_over_orphaned();
        }
    }

    /// `attach` on connection `id`: the job's replies from `after` on, then its live events.
    pub(super) fn on_attach(&mut self, id: ConnId, ask: Attach, reference: Option<&Ref>, now: Instant) {
        if let Err(denied) = self.access.check_job(id, super::access::JobAsk::Attach, now) {
            return self.deny(id, denied, reference);
        }
        let sub = self.access.sub(id).map(str::to_string);
        if let Some(owner) = self.uniques.owner_elsewhere(&ask.resume).map(str::to_string) {
            // The job lives on another instance: the attach goes there ([`super::relay`]).
            let Attach { handle: job, resume, after } = ask;
            let attach = RemoteAttach { job, resume, after, reference: reference.cloned(), sub };
            return self.relay_attach(id, &owner, attach, now);
        }
        let Some(journal) = self.find_journal(&ask, sub.as_deref()) else {
            self.metrics.count_attach(AttachOutcome::Unknown);
            return self.error(id, ErrorCode::UnknownJob, UNKNOWN_JOB, reference);
        };
        let owner = Owner::Conn(id);
        let Some(mine) = self.clients.jobs(id).map(<[JobTag]>::len) else { return };
        let mine = mine + self.relays.held_by(id);
        let max_jobs = self.access.max_jobs(id, self.cfg.max_jobs_per_connection);
        if self.journals.get(journal).is_some_and(|j| j.owner != owner) && mine >= max_jobs {
            let text = format!("at most {max_jobs} unfinished jobs per connection");
            return self.error(id, ErrorCode::TooManyJobs, &text, reference);
        }
        for text in self.attach_job(journal, owner, ask.after, reference) {
            self.deliver(owner, text);
        }
    }

    /// The journal an attach names, if its credentials hold: the token names this instance and
    /// a journal kept here, for the same handle, with the same secret (compared in constant
    /// time) and, with client tokens, submitted by the same `sub`. Every failure is the same
    /// None.
    pub(super) fn find_journal(&self, ask: &Attach, sub: Option<&str>) -> Option<u64> {
        if ask.resume.len() > MAX_RESUME_BYTES {
            return None;
        }
        let mut parts = ask.resume.splitn(3, '.');
        let (instance, number, secret) = (parts.next()?, parts.next()?, parts.next()?);
        let id: u64 = number.parse().ok()?;
        let journal = self.journals.get(id);
        // The secret is compared whatever else failed, so every refusal takes the same path.
        let expected = journal.map_or(&[0u8; SECRET_CHARS][..], |j| &j.secret[..]);
        let same = super::reports::same_secret(secret.as_bytes(), expected);
        let journal = journal.filter(|_| same && instance == self.cfg.instance_id)?;
        (journal.handle[..] == *ask.handle.as_bytes() && journal.sub.as_deref() == sub).then_some(id)
    }

    /// Gives journal `id` to `to` and returns what to send it: `job.attached` (with the attach's
    /// `ref`), then, after seq `after`, each kept event as first sent and a `job.gap` for each
    /// run of trimmed ones. A previous owner hears `job.detached`. A job that has ended is
    /// forgotten once replayed.
    pub(super) fn attach_job(
        &mut self,
        id: u64,
        to: Owner,
        after: u64,
        reference: Option<&Ref>,
    ) -> Vec<Cow<'static, str>> {
        let Some(journal) = self.journals.get(id) else { return Vec::new() };
        let (from, live, handle) = (journal.owner, journal.job, journal.handle.clone());
        let taken = from != Owner::Detached && from != to;
        if taken {
            self.deliver_last(from, Reply::Detached { handle: &handle }.text());
        }
        if let (Some(tag), Owner::Conn(old)) = (live, from) {
            self.clients.forget_job(old, tag);
        }
        if let (Some(tag), Owner::Conn(new)) = (live, to)
            && let Some(job) = self.jobs.get_mut(tag)
        {
            job.set_conn(new);
            if from != to {
                self.clients.add_job(new, tag);
            }
        }
        self.journals.set_owner(id, to);
        let Some(journal) = self.journals.get(id) else { return Vec::new() };
        let log = &journal.log;
        let mut out = vec![Reply::Attached { handle: &handle, seq: log.last(), reference }.text()];
        let (mut gaps, mut events) = (0, 0);
        for item in log.replay(after) {
            out.push(match item {
                Replayed::Gap(from, to) => {
                    gaps += 1;
                    Reply::Gap { handle: &handle, from, to }.text()
                }
                Replayed::Event(text) => {
                    events += 1;
                    Cow::Owned(text.to_string())
                }
            });
        }
        self.metrics.count_replayed(events);
        self.metrics.count_attach(match (taken, gaps) {
            (true, _) => AttachOutcome::TakenOver,
            (false, 0) => AttachOutcome::Ok,
            (false, _) => AttachOutcome::Gap,
        });
        if live.is_none() {
            self.journals.remove(id);
        }
        out
    }

    /// Jobs whose client left and that are kept for the grace, now.
    pub fn jobs_detached(&self) -> usize {
        self.journals.detached_live()
    }

    /// Bytes the job logs hold.
    pub fn job_log_bytes(&self) -> usize {
        self.journals.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::joblog::DETACHED_OVERHEAD;
    use super::super::testkit::*;
    use serde_json::json;

    /// Submits a stream job on `conn` and has gearmand name it `handle`: its tag and resume.
    fn stream_job(app: &mut App, conn: ConnId, handle: &str, t0: Instant) -> (JobTag, String) {
        app.handle_client_text(conn, r#"{"type":"submit","function":"f","ref":"r"}"#, t0);
        let tag = submitted(&effects(app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: handle.into() }, t0);
        let e = effects(app);
        let created: Value = serde_json::from_str(sent(&e)[0].1).unwrap();
        (tag, created["resume"].as_str().unwrap().to_string())
    }

    fn data(app: &mut App, tag: JobTag, text: &str, t0: Instant) {
        app.handle_job_event(0, JobEvent::Data { tag, data: text.into() }, t0);
    }

    fn attach(
        app: &mut App,
        conn: ConnId,
        handle: &str,
        resume: &str,
        after: u64,
        t0: Instant,
    ) -> Vec<Value> {
        let msg = json!({"type":"attach","job":handle,"resume":resume,"after":after,"ref":"x"});
        app.handle_client_text(conn, &msg.to_string(), t0);
        replies(app)
    }

    fn replies(app: &mut App) -> Vec<Value> {
        sent(&effects(app)).iter().map(|(_, t)| serde_json::from_str(t).unwrap()).collect()
    }

    /// `type` and `seq` (or `from-to` of a gap) of each reply.
    fn brief(replies: &[Value]) -> Vec<String> {
        let brief = |v: &Value| match v["type"].as_str().unwrap() {
            "job.gap" => format!("gap {}-{}", v["from"], v["to"]),
            "error" => format!("error {}", v["code"].as_str().unwrap()),
            t => format!("{t} {}", v["seq"]),
        };
        replies.iter().map(brief).collect()
    }

    #[test]
    fn a_detached_job_runs_on_and_a_new_connection_hears_what_it_missed() {
        let t0 = Instant::now();
        let mut app = up_app();
        let (tag, resume) = stream_job(&mut app, A, "H:1", t0);
        for d in ["d1", "d2", "d3"] {
            data(&mut app, tag, d, t0);
        }
        assert_eq!(brief(&replies(&mut app)), ["job.data 2", "job.data 3", "job.data 4"]);
        app.handle_client_closed(A, t0);
        data(&mut app, tag, "d4", t0);
        assert_eq!(effects(&mut app).len(), 1, "logged only (the timer of its grace)");
        assert_eq!((app.jobs_detached(), app.jobs_in_flight()), (1, 1));
        // The client had seq 3 (d2): it hears d3 and d4 again, with their seqs, then the live ones.
        let got = attach(&mut app, B, "H:1", &resume, 3, t0);
        assert_eq!(brief(&got), ["job.attached 5", "job.data 4", "job.data 5"]);
        assert_eq!(got[0], json!({"type":"job.attached","job":"H:1","ref":"x","seq":5}));
        assert_eq!(got[2], json!({"type":"job.data","job":"H:1","ref":"r","data":"d4","seq":5}));
        app.handle_job_event(0, JobEvent::Complete { tag, data: b"end".to_vec() }, t0);
        let e = effects(&mut app);
        assert_eq!(sent(&e).len(), 1);
        assert_eq!(sent(&e)[0].0, B);
        assert!(sent(&e)[0].1.contains(r#""seq":6"#));
        assert_eq!((app.jobs_detached(), app.jobs_in_flight(), app.job_log_bytes()), (0, 0, 0));
        // An owned job's journal ended with it.
        assert_eq!(brief(&attach(&mut app, B, "H:1", &resume, 0, t0)), ["error unknown_job"]);
    }

    #[test]
    fn a_job_that_ends_while_detached_is_replayed_to_its_end_once() {
        let t0 = Instant::now();
        let mut app = up_app();
        let (tag, resume) = stream_job(&mut app, A, "H:1", t0);
        data(&mut app, tag, "d1", t0);
        effects(&mut app);
        app.handle_client_closed(A, t0);
        effects(&mut app);
        let t5 = t0 + Duration::from_secs(5);
        app.handle_job_event(0, JobEvent::Complete { tag, data: b"end".to_vec() }, t5);
        let e = effects(&mut app);
        assert!(sent(&e).is_empty());
        let later = t0 + Duration::from_secs(32);
        // Its log is kept for the grace from its end.
        let armed: Vec<_> =
            e.iter().filter_map(|e| if let Effect::Arm(at, _) = e { Some(*at) } else { None }).collect();
        assert_eq!(armed, [t5 + Duration::from_secs(30)]);
        app.handle_timer(AppTimer::Journal(1), t0 + Duration::from_secs(30));
        let got = attach(&mut app, B, "H:1", &resume, 0, later);
        assert_eq!(brief(&got), ["job.attached 3", "job.created 1", "job.data 2", "job.complete 3"]);
        assert_eq!(app.job_log_bytes(), 0);
        assert_eq!(brief(&attach(&mut app, B, "H:1", &resume, 0, later)), ["error unknown_job"]);
    }

    #[test]
    fn wrong_tokens_and_expired_jobs_get_the_same_answer() {
        let t0 = Instant::now();
        let mut app = up_app();
        let (tag, resume) = stream_job(&mut app, A, "H:1", t0);
        data(&mut app, tag, "d1", t0);
        effects(&mut app);
        let mut wrong = resume.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
        let wrong = String::from_utf8(wrong).unwrap();
        let mut answers = Vec::new();
        for (handle, token) in [("H:1", wrong.as_str()), ("H:2", &resume), ("H:1", "x")] {
            answers.push(attach(&mut app, B, handle, token, 0, t0));
        }
        // A token of an instance that is no peer of this one: nobody may answer it, so it
        // gets the same unknown_job here, at once, with nothing queued for it
        // (app/relay/watch.rs); a peer's is relayed to its desk (app/relay.rs).
        let stranger = resume.replacen("a1.", "c3.", 1);
        let msg = json!({"type":"attach","job":"H:1","resume":stranger,"after":0,"ref":"x"});
        app.handle_client_text(B, &msg.to_string(), t0);
        let e = effects(&mut app);
        assert!(submitted(&e).is_empty(), "{e:?}");
        answers.push(sent(&e).iter().map(|(_, t)| serde_json::from_str(t).unwrap()).collect());
        let peer = resume.replacen("a1.", "b2.", 1);
        let msg = json!({"type":"attach","job":"H:1","resume":peer,"after":0,"ref":"x"});
        app.handle_client_text(B, &msg.to_string(), t0);
        let e = effects(&mut app);
        assert!(sent(&e).is_empty(), "{e:?}");
        assert!(matches!(&e[0], Effect::Submit { function, .. } if function == b"gearsock.report.b2"));
        app.handle_client_closed(B, t0);
        effects(&mut app);
        app.handle_client_open(B, false);
        app.handle_client_closed(A, t0);
        let e = effects(&mut app);
        let Some(Effect::Arm(at, timer)) = e.iter().find(|e| matches!(e, Effect::Arm(..))) else {
            panic!("{e:?}")
        };
        app.handle_timer(*timer, *at - Duration::from_millis(1));
        assert_eq!(app.jobs_detached(), 1, "not before its grace");
        app.handle_timer(*timer, *at);
        assert_eq!((app.jobs_detached(), app.jobs_in_flight(), app.job_log_bytes()), (0, 0, 0));
        answers.push(attach(&mut app, B, "H:1", &resume, 0, *at));
        for a in &answers {
            assert_eq!(a, &answers[0]);
        }
        assert_eq!(answers[0][0]["code"], "unknown_job");
        assert_eq!(answers[0][0]["ref"], "x");
        // Abandoned as before: counted as such, and an orphan of its gearmand connection.
        let text = app.metrics.render(&Default::default());
        assert!(text.contains("gearsock_detached_abandoned_total{reason=\"grace\"} 1"), "{text}");
        assert!(text.contains("gearsock_attaches_total{outcome=\"unknown\"} 5"), "{text}");
        assert!(text.contains("gearsock_jobs_finished_total{mode=\"stream\",outcome=\"abandoned\"} 1"));
    }

    #[test]
    fn attaching_elsewhere_takes_the_job_over() {
        let t0 = Instant::now();
        let mut app = up_app();
        let (tag, resume) = stream_job(&mut app, A, "H:1", t0);
        data(&mut app, tag, "d1", t0);
        effects(&mut app);
        // On its own connection: a replay, nothing taken.
        assert_eq!(brief(&attach(&mut app, A, "H:1", &resume, 1, t0)), ["job.attached 2", "job.data 2"]);
        app.handle_client_text(B, &json!({"type":"attach","job":"H:1","resume":resume}).to_string(), t0);
        let e = effects(&mut app);
        let to = |c: ConnId| {
            sent(&e).iter().filter(|(d, _)| *d == c).map(|(_, t)| t.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(to(A), [r#"{"job":"H:1","type":"job.detached"}"#]);
        assert_eq!(to(B).len(), 3, "attached, created and d1: after defaults to 0");
        data(&mut app, tag, "d2", t0);
        assert_eq!(sent(&effects(&mut app))[0].0, B);
        // B counts it among its jobs; A does not: A leaving does not detach it.
        app.handle_client_closed(A, t0);
        assert_eq!(app.jobs_detached(), 0);
        app.handle_client_text(B, r#"{"type":"status","job":"H:1"}"#, t0);
        assert!(effects(&mut app).iter().any(|e| matches!(e, Effect::GetStatus { .. })));
        let text = app.metrics.render(&Default::default());
        assert!(text.contains("gearsock_attaches_total{outcome=\"taken_over\"} 1"), "{text}");
        assert!(text.contains("gearsock_events_replayed_total 3"), "{text}");
    }

    #[test]
    fn attach_is_checked_like_a_submit() {
        let t0 = Instant::now();
        let mut app = up_app();
        let (_, resume) = stream_job(&mut app, A, "H:1", t0);
        for bad in [
            json!({"type":"attach","job":"H:1"}),
            json!({"type":"attach","resume":resume}),
            json!({"type":"attach","job":"H:1","resume":resume,"after":-1}),
            json!({"type":"attach","job":"H:1","resume":resume,"after":1.5}),
            json!({"type":"attach","job":"H:1","resume":resume,"after":"2"}),
        ] {
            app.handle_client_text(B, &bad.to_string(), t0);
        }
        assert_eq!(codes(&effects(&mut app)), ["bad_request"; 5]);
        // B is at --max-jobs-per-connection (2).
        for _ in 0..2 {
            app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        }
        effects(&mut app);
        assert_eq!(brief(&attach(&mut app, B, "H:1", &resume, 0, t0)), ["error too_many_jobs"]);
    }

    #[test]
    fn a_trimmed_log_answers_with_gaps() {
        let t0 = Instant::now();
        let mut app = App::new(AppConfig { job_log_bytes: 300, ..cfg() }, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app.handle_client_open(B, true);
        let (tag, resume) = stream_job(&mut app, A, "H:1", t0);
        for i in 0..10 {
            data(&mut app, tag, &format!("d{i}"), t0);
        }
        effects(&mut app);
        app.handle_client_closed(A, t0);
        let got = brief(&attach(&mut app, B, "H:1", &resume, 0, t0));
        assert_eq!(got, ["job.attached 11", "gap 1-8", "job.data 9", "job.data 10", "job.data 11"]);
        assert_eq!(
            brief(&attach(&mut app, B, "H:1", &resume, 9, t0)),
            ["job.attached 11", "job.data 10", "job.data 11"]
        );
        assert!(app.metrics.render(&Default::default()).contains("attaches_total{outcome=\"gap\"} 1"));
    }

    #[test]
    fn with_client_tokens_only_the_sub_that_submitted_may_attach() {
        use super::super::AccessConfig;
        use super::super::access::tests::{app_with, token, tokens_on};
        let t0 = Instant::now();
        let access = AccessConfig { allow_functions: vec!["*".into()], ..tokens_on() };
        let clock = access.clock;
        let mut app = app_with(access);
        let (alice, bob) =
            (token(&clock, r#"{"sub":"alice","exp":EXP}"#), token(&clock, r#"{"sub":"bob","exp":EXP}"#));
        let c = ConnId { key: 2, generation: 1 };
        for (id, who) in [(A, &alice), (B, &bob), (c, &alice)] {
            app.handle_client_open_from(id, false, "127.0.0.1".parse().unwrap(), Some(who), t0);
        }
        effects(&mut app);
        let (_, resume) = stream_job(&mut app, A, "H:1", t0);
        app.handle_client_closed(A, t0);
        assert_eq!(brief(&attach(&mut app, B, "H:1", &resume, 1, t0)), ["error unknown_job"]);
        assert_eq!(brief(&attach(&mut app, c, "H:1", &resume, 1, t0)), ["job.attached 1"]);
    }

    #[test]
    fn a_client_that_leaves_more_jobs_than_the_total_holds_has_its_oldest_given_up_once() {
        let t0 = Instant::now();
        // Room for two detached jobs' overhead and their small logs, not for three.
        let total = 2 * DETACHED_OVERHEAD + 1000;
        let cfg = AppConfig { job_log_total_bytes: total, max_jobs_per_connection: 8, ..cfg() };
        let mut app = App::new(cfg, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        let jobs: Vec<_> = ["H:1", "H:2", "H:3"].iter().map(|h| stream_job(&mut app, A, h, t0)).collect();
        effects(&mut app);
        app.handle_client_closed(A, t0);
        effects(&mut app);
        assert_eq!((app.jobs_detached(), app.jobs_in_flight()), (2, 2));
        assert!(app.job_log_bytes() <= total);
        let text = app.metrics.render(&Default::default());
        assert!(text.contains("gearsock_detached_abandoned_total{reason=\"log_total\"} 1"), "{text}");
        // The oldest is gone; the two newer ones can be attached.
        app.handle_client_open(B, true);
        assert_eq!(brief(&attach(&mut app, B, "H:1", &jobs[0].1, 0, t0)), ["error unknown_job"]);
        assert_eq!(brief(&attach(&mut app, B, "H:3", &jobs[2].1, 0, t0))[0], "job.attached 1");
    }

    #[test]
    fn over_the_total_the_oldest_detached_job_is_abandoned_first() {
        let t0 = Instant::now();
        // Room for the logs below and for two detached jobs' own overhead.
        let total = 1100 + 2 * DETACHED_OVERHEAD;
        let cfg = AppConfig { job_log_total_bytes: total, max_jobs_per_connection: 8, ..cfg() };
        let mut app = App::new(cfg, 1, Entropy::counter());
        app.handle_link_up(0);
        for c in [A, B] {
            app.handle_client_open(c, true);
        }
        let (old, _) = stream_job(&mut app, A, "H:1", t0);
        let (new, new_resume) = stream_job(&mut app, A, "H:2", t0);
        let (mine, _) = stream_job(&mut app, B, "H:3", t0);
        app.handle_client_closed(A, t0);
        for tag in [old, new, mine] {
            data(&mut app, tag, &"x".repeat(150), t0);
        }
        effects(&mut app);
        assert_eq!(app.jobs_detached(), 2);
        // B's job goes on logging: the oldest detached job (H:1) is given up for it, then H:2.
        data(&mut app, mine, &"y".repeat(150), t0);
        assert_eq!(app.jobs_detached(), 1);
        assert!(app.job_log_bytes() <= total);
        effects(&mut app);
        assert_eq!(brief(&attach(&mut app, B, "H:2", &new_resume, 0, t0))[0], "job.attached 2");
        for _ in 0..4 {
            data(&mut app, mine, &"y".repeat(150), t0);
        }
        assert!(app.job_log_bytes() <= total, "{}", app.job_log_bytes());
        let text = app.metrics.render(&Default::default());
        assert!(text.contains("gearsock_detached_abandoned_total{reason=\"log_total\"} 1"), "{text}");
        let _ = new;
    }
}
