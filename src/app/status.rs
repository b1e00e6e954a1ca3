//! Status questions: the GET_STATUS the App puts to gearmand, for a client's `status` message
//! or a polled job's timer, and what each answer means. Every question is kept in [`Asks`]
//! until it is answered, so the asker hears back even when the job has ended since, or the
//! connection it was asked on is lost.
//!
//! Must not: end a job other than by its answer (a polled job gearmand has forgotten goes to
//! its grace; one whose poll failed is lost), or read the clock (`now` is given).

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

/// A question gearmand has not answered yet.
#[derive(Debug)]
pub(super) struct Ask {
    pub link: LinkRef,
    pub handle: Box<[u8]>,
    pub by: Asker,
}

/// Who asked, so the answer reaches them even if the job has ended since.
#[derive(Debug)]
pub(super) enum Asker {
    /// The poll timer of a background job or ping.
    Poll(JobTag),
    /// A client's `status` message.
    Client { conn: ConnId, reference: Option<Ref> },
}

/// GET_STATUS questions gearmand has not answered yet, keyed by the `ask` number it answers.
#[derive(Debug, Default)]
pub(super) struct Asks {
    open: Slab<Ask>,
}

impl Asks {
    fn insert(&mut self, ask: Ask) -> u64 {
        self.open.insert(ask) as u64
    }

    /// The question `ask` answers (None: answered already, or never asked).
    fn answered(&mut self, ask: u64) -> Option<Ask> {
        usize::try_from(ask).ok().and_then(|k| self.open.try_remove(k))
    }

    /// Takes out the questions asked on connection `at`, which will never be answered.
    pub(super) fn asked_on(&mut self, at: LinkRef) -> Vec<Ask> {
        let keys: Vec<usize> = self.open.iter().filter(|(_, a)| a.link == at).map(|(k, _)| k).collect();
        keys.into_iter().map(|k| self.open.remove(k)).collect()
    }

    /// Takes out every open question.
    pub(super) fn take_all(&mut self) -> Vec<Ask> {
        std::mem::take(&mut self.open).into_iter().map(|(_, a)| a).collect()
    }
}

impl App {
    /// Asks gearmand for a running job's status on the connection that holds it.
    fn ask_status(&mut self, tag: JobTag, by: Asker) {
        let Some(Phase::Running(named)) = self.jobs.get(tag).map(|j| j.phase()) else { return };
        let (link, handle) = (named.link, named.handle.clone());
        let ask = self.asks.insert(Ask { link, handle: handle.clone(), by });
        self.links.count_status(link.index, &handle);
        self.effects.push(Effect::GetStatus { link: link.index, handle: handle.into_vec(), ask });
    }

    /// A client's `status` message: asked on the job's connection when the handle names one
    /// of its unfinished jobs.
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
        // The answer is about the job: it carries the job's `ref`, unless the question had its own.
        let reference = reference.or_else(|| self.jobs.get(tag).and_then(|j| j.reference().cloned()));
        self.ask_status(tag, Asker::Client { conn: id, reference });
    }

    /// A polled job's timer: ask gearmand, unless the link is not taking our bytes.
    pub(super) fn on_poll_timer(&mut self, tag: JobTag, now: Instant) {
        let interval = self.cfg.poll_interval;
        let Some(Phase::Running(named)) = self.jobs.get(tag).map(|j| j.phase()) else { return };
        if self.links.is_stalled(named.link.index) {
            let job = self.jobs.get_mut(tag).expect("found above");
            // gearmand is not taking our bytes: ask on the next beat instead of adding to a
            // backlog.
            let at = job.defer_poll(interval, now);
            return self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
        }
        self.ask_status(tag, Asker::Poll(tag));
    }

    /// The answer to a GET_STATUS: to the client who asked, or to a job's poll.
    pub(super) fn on_status_res(&mut self, ask: u64, answer: Result<Status, String>, now: Instant) {
        let Some(ask) = self.asks.answered(ask) else { return };
        let tag = match ask.by {
            Asker::Client { conn, reference } => {
                return match answer {
                    Ok(status) => {
                        let reference = reference.as_ref();
                        let news = JobNews::Status(status);
                        self.send(conn, Reply::Job { handle: Some(&ask.handle), news, reference }.text());
                    }
                    Err(why) => {
                        let text = format!("gearmand answered the status request with ERROR {why}");
                        self.error(conn, ErrorCode::GearmandError, &text, reference.as_ref());
                    }
                };
            }
            Asker::Poll(tag) => tag,
        };
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
                    self.job_reply(tag, JobNews::Lost(&reason));
                    return self.end_job(tag, Outcome::Lost);
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
                self.job_reply(tag, JobNews::Status(status));
            }
            return;
        }
        // gearmand no longer knows the job: it finished (or was lost in a restart). The job no
        // longer needs its connection.
        let conn = job.conn();
        let has_value = job.has_value();
        let Some(link) = job.enter_grace() else { return };
        self.release_link(link.index);
        if kind == Kind::Ping {
            self.send(conn, Reply::PingJob(&ask.handle).text());
        } else if changed {
            self.job_reply(tag, JobNews::Status(status));
        }
        if has_value {
            self.finish_polled(tag);
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
}
