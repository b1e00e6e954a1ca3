//! Status questions: the GET_STATUS the App puts to gearmand, for a client's `status` message
//! or a polled job's timer, and what each answer means. Every question is kept in [`Asks`]
//! until it is answered, so the asker hears back even when the job has ended since, or the
//! connection it was asked on is lost.
//!
//! Must not: end a job other than by its answer (a polled job gearmand has forgotten goes to
//! its grace; one whose poll failed is lost), or read the clock (`now` is given).

use std::collections::HashMap;
use std::time::Instant;

use log::debug;
use slab::Slab;

use super::fields::Ref;
use super::jobs::{Kind, Phase};
use super::links::LinkRef;
use super::reply::{JobNews, Reply};
use super::{App, AppTimer, ConnId, Effect};
use crate::gearman::client::JobTag;
use crate::metrics::{ErrorCode, Outcome};

/// A job's status as GET_STATUS answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Status {
    /// gearmand knows the job (it is queued or running).
    pub known: bool,
    /// A worker has it.
    pub running: bool,
    /// Progress, as the worker's WORK_STATUS said.
    pub numerator: u64,
    pub denominator: u64,
}

impl Status {
    /// What a failed poll leaves us with: gearmand cannot say.
    pub(super) const UNKNOWN: Status = Status { known: false, running: false, numerator: 0, denominator: 0 };
}

/// Open `status` questions one connection may have: each keeps its `ref` until gearmand
/// answers, so a client that asks faster than gearmand answers is told to wait.
pub(super) const MAX_QUESTIONS_PER_CONNECTION: usize = 8;
/// GET_STATUS questions clients may have open on one gearmand connection; past it they are
/// told `unavailable`. Polls are not counted: there is at most one per job.
pub(super) const MAX_QUESTIONS_PER_LINK: usize = 256;

/// A question gearmand has not answered yet: one per job at a time, however many asked.
#[derive(Debug)]
pub(super) struct Ask {
    pub link: LinkRef,
    pub handle: Box<[u8]>,
    /// The job whose status it is.
    tag: JobTag,
    /// The job's poll waits for this answer (its timer found the question open, or asked it).
    pub poll: bool,
    /// Clients' `status` messages that wait for it, each with its own `ref`; at most
    /// [`MAX_QUESTIONS_PER_CONNECTION`] per connection, and only the job's own connection asks.
    pub clients: Vec<(ConnId, Option<Ref>)>,
    /// A client's question put it to gearmand (it counts against the link's cap).
    by_client: bool,
}

/// GET_STATUS questions gearmand has not answered yet, keyed by the `ask` number it answers,
/// with the counts their caps are checked against.
#[derive(Debug, Default)]
pub(super) struct Asks {
    open: Slab<Ask>,
    /// The open question about each job.
    by_job: HashMap<JobTag, usize>,
    /// Open client questions by connection (entries at 0 are removed).
    per_conn: HashMap<ConnId, usize>,
    /// Client-made questions open on each link index.
    per_link: Vec<usize>,
}

impl Asks {
    fn insert(&mut self, ask: Ask) -> u64 {
        let (tag, index, by_client) = (ask.tag, ask.link.index, ask.by_client);
        let key = self.open.insert(ask);
        self.by_job.insert(tag, key);
        if by_client {
            if self.per_link.len() <= index {
                self.per_link.resize(index + 1, 0);
            }
            self.per_link[index] += 1;
        }
        key as u64
    }

    /// The question open about job `tag`.
    fn about(&mut self, tag: JobTag) -> Option<&mut Ask> {
        let key = *self.by_job.get(&tag)?;
        self.open.get_mut(key)
    }

    fn questions_of(&self, conn: ConnId) -> usize {
        self.per_conn.get(&conn).copied().unwrap_or(0)
    }

    fn questions_on(&self, index: usize) -> usize {
        self.per_link.get(index).copied().unwrap_or(0)
    }

    /// Client `conn` waits for `ask`'s answer.
    fn join(&mut self, key: usize, conn: ConnId, reference: Option<Ref>) {
        if let Some(ask) = self.open.get_mut(key) {
            ask.clients.push((conn, reference));
            *self.per_conn.entry(conn).or_default() += 1;
        }
    }

    fn remove(&mut self, key: usize) -> Ask {
        let ask = self.open.remove(key);
        self.by_job.remove(&ask.tag);
        for (conn, _) in &ask.clients {
            if let Some(n) = self.per_conn.get_mut(conn) {
                *n -= 1;
                if *n == 0 {
                    self.per_conn.remove(conn);
                }
            }
        }
        if ask.by_client {
            self.per_link[ask.link.index] -= 1;
        }
        ask
    }

    /// The question `ask` answers (None: answered already, or never asked).
    fn answered(&mut self, ask: u64) -> Option<Ask> {
        let key = usize::try_from(ask).ok().filter(|&k| self.open.contains(k))?;
        Some(self.remove(key))
    }

    /// Takes out the questions asked on connection `at`, which will never be answered.
    pub(super) fn asked_on(&mut self, at: LinkRef) -> Vec<Ask> {
        let keys: Vec<usize> = self.open.iter().filter(|(_, a)| a.link == at).map(|(k, _)| k).collect();
        keys.into_iter().map(|k| self.remove(k)).collect()
    }

    /// Takes out every open question.
    pub(super) fn take_all(&mut self) -> Vec<Ask> {
        let keys: Vec<usize> = self.open.iter().map(|(k, _)| k).collect();
        keys.into_iter().map(|k| self.remove(k)).collect()
    }

    /// Open questions (for the tests' accounting).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.open.len()
    }
}

impl App {
    /// Asks gearmand for a running job's status on the connection that holds it, or waits for
    /// the answer to the question already open about it.
    fn ask_status(&mut self, tag: JobTag, poll: bool, client: Option<(ConnId, Option<Ref>)>) {
        if let Some(key) = self.asks.by_job.get(&tag).copied() {
            let ask = &mut self.asks.open[key];
            ask.poll |= poll;
            if let Some((conn, reference)) = client {
                self.asks.join(key, conn, reference);
            }
            return;
        }
        let Some(Phase::Running(named)) = self.jobs.get(tag).map(|j| j.phase()) else { return };
        let (link, handle) = (named.link, named.handle.clone());
        let by_client = client.is_some();
        let ask = Ask { link, handle: handle.clone(), tag, poll, clients: Vec::new(), by_client };
        let ask = self.asks.insert(ask);
        if let Some((conn, reference)) = client {
            self.asks.join(ask as usize, conn, reference);
        }
        self.links.count_status(link.index, &handle);
        self.effects.push(Effect::GetStatus { link: link.index, handle: handle.into_vec(), ask });
    }

    /// A client's `status` message: asked on the job's connection when the handle names one
    /// of its unfinished jobs; a job already asked about waits for the same answer. Refused
    /// past the connection's cap (`too_many_jobs`: wait for an answer), and, when it would add
    /// a question, while the link is stalled or past its cap (`unavailable`).
    pub(super) fn on_status(&mut self, id: ConnId, handle: &str, reference: Option<Ref>) {
        let Some(jobs) = self.clients.jobs(id) else { return };
        let mine = jobs.iter().rev().copied().find(|t| {
            self.jobs
                .get(*t)
                .is_some_and(|j| j.holds_link().is_some() && j.handle() == Some(handle.as_bytes()))
        });
        let Some(tag) = mine else {
            return self.error(
                id,
                ErrorCode::UnknownJob,
                "no unfinished job of this connection has that handle",
                reference.as_ref(),
            );
        };
        if self.asks.questions_of(id) >= MAX_QUESTIONS_PER_CONNECTION {
            let text = format!(
                "at most {MAX_QUESTIONS_PER_CONNECTION} status questions per connection may wait for \
                 gearmand; ask again after an answer"
            );
            return self.error(id, ErrorCode::TooManyJobs, &text, reference.as_ref());
        }
        if self.asks.about(tag).is_none() {
            let index = self.jobs.get(tag).and_then(|j| j.holds_link()).map_or(0, |l| l.index);
            let refusal = if self.links.is_stalled(index) {
                Some("gearmand is not taking our bytes (stalled); ask again later")
            } else if self.asks.questions_on(index) >= MAX_QUESTIONS_PER_LINK {
                Some("too many status questions wait for this gearmand; ask again later")
            } else {
                None
            };
            if let Some(text) = refusal {
                return self.error(id, ErrorCode::Unavailable, text, reference.as_ref());
            }
        }
        // The answer is about the job: it carries the job's `ref`, unless the question had its own.
        let reference = reference.or_else(|| self.jobs.get(tag).and_then(|j| j.reference().cloned()));
        self.ask_status(tag, false, Some((id, reference)));
    }

    /// The questions asked on connection `at` will not be answered (it was lost, or closed
    /// after its retirement): each asker hears `unavailable`, and each question is freed.
    pub(super) fn drop_questions_on(&mut self, at: LinkRef, text: &str) {
        for ask in self.asks.asked_on(at) {
            for (conn, reference) in ask.clients {
                self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
            }
        }
    }

    /// A polled job's timer: ask gearmand, unless the link is not taking our bytes.
    pub(super) fn on_poll_timer(&mut self, tag: JobTag, now: Instant) {
        let interval = self.cfg.poll_interval;
        let Some(Phase::Running(named)) = self.jobs.get(tag).map(|j| j.phase()) else { return };
        if let Some(ask) = self.asks.about(tag) {
            // A client's question is open: its answer serves the poll too, with no more bytes.
            ask.poll = true;
            return;
        }
        if self.links.is_stalled(named.link.index) {
            let job = self.jobs.get_mut(tag).expect("found above");
            // gearmand is not taking our bytes: ask on the next beat instead of adding to a
            // backlog.
            let at = job.defer_poll(interval, now);
            return self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
        }
        self.ask_status(tag, true, None);
    }

    /// The answer to a GET_STATUS: to the client who asked, or to a job's poll.
    pub(super) fn on_status_res(&mut self, ask: u64, answer: Result<Status, String>, now: Instant) {
        let Some(ask) = self.asks.answered(ask) else { return };
        for (conn, reference) in &ask.clients {
            match &answer {
                Ok(status) => {
                    let (reference, news) = (reference.as_ref(), JobNews::Status(*status));
                    let handle = Some(&ask.handle[..]);
                    self.send(*conn, Reply::Job { handle, news, reference, seq: None }.text());
                }
                Err(why) => {
                    let text = format!("gearmand answered the status request with ERROR {why}");
                    self.error(*conn, ErrorCode::GearmandError, &text, reference.as_ref());
                }
            }
        }
        if !ask.poll {
            return;
        }
        let tag = ask.tag;
        let interval = self.cfg.poll_interval;
        let Some(job) = self.jobs.get_mut(tag).filter(|j| matches!(j.phase(), Phase::Running(_))) else {
            return;
        };
        let status = match answer {
            Ok(status) => status,
            Err(why) => {
                // gearmand cannot say what became of the job; it ends now rather than never.
                debug!("status poll of {:?} failed: {why}", ask.handle.escape_ascii());
                if job.kind() == Kind::Background {
                    let reason = format!("gearmand answered the status poll with ERROR {why}");
                    self.job_reply(tag, JobNews::Lost(&reason), now);
                    return self.end_job(tag, Outcome::Lost, now);
                }
                Status::UNKNOWN
            }
        };
        let changed = job.note_status(status);
        let kind = job.kind();
        if status.known {
            // Still known: poll again on the original grid, skipping missed beats.
            let at = job.next_poll_after(interval, now);
            self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
            if changed && kind == Kind::Background {
                self.job_reply(tag, JobNews::Status(status), now);
            }
            return;
        }
        // gearmand no longer knows the job: it finished (or was lost in a restart). The job no
        // longer needs its connection.
        if job.is_detached() {
            // An abandoned job gearmand has forgotten: no more to count, nobody to tell.
            return self.end_job(tag, Outcome::Abandoned, now);
        }
        let conn = job.conn();
        let has_value = job.has_value();
        let Some(link) = job.enter_grace() else { return };
        self.release_link(link.index);
        if kind == Kind::Ping {
            self.send(conn, Reply::PingJob(&ask.handle).text());
        } else if changed {
            self.job_reply(tag, JobNews::Status(status), now);
        }
        if has_value {
            self.finish_polled(tag, now);
        } else {
            self.effects.push(Effect::Arm(now + self.cfg.value_grace, AppTimer::Grace(tag)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;

    #[test]
    fn every_status_question_gets_an_answer() {
        let t0 = Instant::now();
        let mut app = App::new(AppConfig { max_jobs_per_connection: 4, ..cfg() }, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        let subs = submits(&effects(&mut app));
        app.handle_job_event(0, JobEvent::Created { tag: subs[0].1, handle: b"H:1".to_vec() }, t0);
        app.handle_job_event(0, JobEvent::Created { tag: subs[1].1, handle: b"H:2".to_vec() }, t0);
        effects(&mut app);
        // Asked, then the job ends before STATUS_RES arrives: the answer still comes.
        app.handle_client_text(A, r#"{"type":"status","job":"H:1","ref":"q1"}"#, t0);
        let e = effects(&mut app);
        let [Effect::GetStatus { ask, .. }] = &e[..] else { panic!("{e:?}") };
        app.handle_job_event(0, JobEvent::Complete { tag: subs[0].1, data: vec![] }, t0);
        let status = JobEvent::StatusRes {
            ask: *ask,
            handle: b"H:1".to_vec(),
            known: false,
            running: false,
            numerator: 0,
            denominator: 0,
        };
        app.handle_job_event(0, status, t0);
        let replies: Vec<Value> =
            sent(&effects(&mut app)).iter().map(|(_, t)| serde_json::from_str(t).unwrap()).collect();
        assert_eq!(replies[1]["type"], "job.status");
        assert_eq!(replies[1]["ref"], "q1");
        // An ERROR in place of STATUS_RES: the asker hears it, and a poll ends its job.
        app.handle_client_text(A, r#"{"type":"status","job":"H:2"}"#, t0);
        let e = effects(&mut app);
        let [Effect::GetStatus { ask, .. }] = &e[..] else { panic!("{e:?}") };
        let failed = JobEvent::StatusFailed {
            ask: *ask,
            handle: b"H:2".to_vec(),
            code: "X".into(),
            message: "y".into(),
        };
        app.handle_job_event(0, failed, t0);
        assert_eq!(codes(&effects(&mut app)), ["gearmand_error"]);
        let ask = poll(&mut app, subs[1].1, t0);
        let failed =
            JobEvent::StatusFailed { ask, handle: b"H:2".to_vec(), code: "X".into(), message: "y".into() };
        app.handle_job_event(0, failed, t0);
        let e = effects(&mut app);
        assert!(sent(&e)[0].1.contains("job.lost"), "{e:?}");
        assert_eq!(app.jobs_in_flight(), 0);
    }

    /// A running stream job of A named `H:1` on link 0.
    fn running_job(app: &mut App, t0: Instant) -> JobTag {
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        let tag = submitted(&effects(app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:1".to_vec() }, t0);
        effects(app);
        tag
    }

    fn get_status(e: &[Effect]) -> Vec<u64> {
        e.iter()
            .filter_map(|e| if let Effect::GetStatus { ask, .. } = e { Some(*ask) } else { None })
            .collect()
    }

    #[test]
    fn one_question_per_job_answers_every_asker_and_the_poll() {
        let t0 = Instant::now();
        let mut app = up_app();
        let tag = running_job(&mut app, t0);
        for i in 0..super::MAX_QUESTIONS_PER_CONNECTION {
            app.handle_client_text(A, &format!(r#"{{"type":"status","job":"H:1","ref":{i}}}"#), t0);
        }
        app.handle_timer(AppTimer::Poll(tag), t0 + Duration::from_millis(100));
        let e = effects(&mut app);
        let asks = get_status(&e);
        assert_eq!((asks.len(), sent(&e).len()), (1, 0), "one GET_STATUS for 8 questions and a poll: {e:?}");
        // Past the connection's cap: told to wait.
        app.handle_client_text(A, r#"{"type":"status","job":"H:1","ref":"ninth"}"#, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["too_many_jobs"]);
        assert!(sent(&e)[0].1.contains("\"ref\":\"ninth\""));
        let answer = JobEvent::StatusRes {
            ask: asks[0],
            handle: b"H:1".to_vec(),
            known: true,
            running: false,
            numerator: 0,
            denominator: 0,
        };
        app.handle_job_event(0, answer, t0 + Duration::from_millis(101));
        let e = effects(&mut app);
        let refs: Vec<i64> = sent(&e)
            .iter()
            .map(|(_, t)| serde_json::from_str::<Value>(t).unwrap())
            .filter(|v| v["type"] == "job.status" && v["ref"].is_i64())
            .map(|v| v["ref"].as_i64().unwrap())
            .collect();
        assert_eq!(refs, (0..8).collect::<Vec<i64>>(), "each asker hears with its own ref: {e:?}");
        assert!(
            e.iter().any(|e| matches!(e, Effect::Arm(_, AppTimer::Poll(t)) if *t == tag)),
            "the poll goes on"
        );
        assert_eq!(app.asks.len(), 0);
        // The connection may ask again.
        app.handle_client_text(A, r#"{"type":"status","job":"H:1"}"#, t0);
        assert_eq!(get_status(&effects(&mut app)).len(), 1);
    }

    #[test]
    fn a_stalled_or_busy_link_takes_no_new_question() {
        let t0 = Instant::now();
        let cfg = AppConfig { link_out_high_bytes: 1 << 30, link_out_low_bytes: 1 << 20, ..cfg() };
        let mut app = App::new(cfg, 1, Entropy::counter());
        app.handle_link_up(0);
        let max = super::MAX_QUESTIONS_PER_LINK;
        for k in 0..=max as u32 / 2 {
            let c = ConnId { key: k, generation: 1 };
            app.handle_client_open(c, true);
            for _ in 0..2 {
                app.handle_client_text(c, r#"{"type":"submit","function":"f"}"#, t0);
            }
        }
        let tags = submitted(&effects(&mut app));
        for (i, tag) in tags.iter().enumerate() {
            app.handle_job_event(0, JobEvent::Created { tag: *tag, handle: format!("H:{i}").into() }, t0);
        }
        effects(&mut app);
        for i in 0..=max {
            let c = ConnId { key: (i / 2) as u32, generation: 1 };
            app.handle_client_text(c, &format!(r#"{{"type":"status","job":"H:{i}"}}"#), t0);
        }
        let e = effects(&mut app);
        assert_eq!((get_status(&e).len(), codes(&e)), (max, vec!["unavailable".to_string()]));
        // Stalled: a new question is refused, and adds no byte.
        let mut app = up_app();
        running_job(&mut app, t0);
        app.handle_link_output(0, 1 << 20);
        app.handle_client_text(A, r#"{"type":"status","job":"H:1"}"#, t0);
        let e = effects(&mut app);
        assert_eq!((get_status(&e).len(), codes(&e)), (0, vec!["unavailable".to_string()]));
    }

    #[test]
    fn a_question_on_a_retired_connection_that_closes_is_answered() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        let tag = submitted(&effects(&mut app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:1".to_vec() }, t0);
        app.handle_client_text(A, r#"{"type":"status","job":"H:1","ref":"q"}"#, t0);
        app.handle_link_retiring(0);
        effects(&mut app);
        // The job ends before gearmand answers: the retired connection closes with it.
        app.handle_job_event(0, JobEvent::Complete { tag, data: b"r".to_vec() }, t0);
        let e = effects(&mut app);
        assert!(e.contains(&Effect::CloseLink(0)), "{e:?}");
        assert_eq!(codes(&e), ["unavailable"]);
        assert!(sent(&e).iter().any(|(_, t)| t.contains("\"ref\":\"q\"") && t.contains("retired")), "{e:?}");
        assert_eq!(app.asks.len(), 0);
    }
}
