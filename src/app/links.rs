//! The App's view of its gearmand connections: which take work (up, not retiring, not
//! stalled) and the round robin that picks one; the bytes routed to each; the jobs each holds,
//! its orphans (stream jobs whose client left) and the handles gearmand gave out on it; and the
//! retiring of a connection with too many orphans. Also the App's entry points for link news.
//!
//! A connection is named by a [`LinkRef`], its index and the generation of that connection: a
//! restarted gearmand hands out `H:host:1` again, and an old job must never answer for a new
//! one. Must not: decide what a job's end means to its client, or touch a socket (the shell
//! reports up, down and bytes queued).

use std::collections::{HashMap, HashSet};

use super::jobs::Kind;
use super::reply::JobNews;
use super::{App, Effect};
use crate::gearman::client::JobTag;
use crate::gearman::packet;
use crate::metrics::Outcome;

/// One connection to a gearmand: the link's index and that connection's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LinkRef {
    pub index: usize,
    pub generation: u32,
}

/// A gearmand connection as the App sees it.
#[derive(Debug, Default)]
struct Link {
    up: bool,
    generation: u32,
    /// Takes no new work; closes once `holding` reaches 0.
    retiring: bool,
    /// Bytes queued for gearmand (the shell's figure after each flush, plus what the App has
    /// routed there since); above the high water mark the link is `stalled`.
    out_bytes: usize,
    stalled: bool,
    /// Jobs submitted here on this generation and not yet done with it.
    holding: usize,
    /// Stream jobs whose client left: gearmand still holds them for this connection.
    orphans: HashSet<JobTag>,
    /// Handle → jobs that gearmand named so, on this connection generation only.
    handles: HashMap<Box<[u8]>, Vec<JobTag>>,
}

impl Link {
    fn takes_work(&self) -> bool {
        self.up && !self.retiring && !self.stalled
    }
}

/// Who holds a handle among the live jobs.
pub(super) enum HandleOwners {
    None,
    /// Jobs on one connection: one gearmand job.
    One(Vec<JobTag>),
    /// Jobs on several connections: the handle alone cannot say which is meant.
    Several,
}

/// Every gearmand link, and whose turn it is.
#[derive(Debug)]
pub(super) struct Links {
    links: Vec<Link>,
    next: usize,
    high_bytes: usize,
    low_bytes: usize,
}

impl Links {
    /// `n` links, all down; a link stalls above `high_bytes` queued and resumes below `low_bytes`.
    pub(super) fn new(n: usize, high_bytes: usize, low_bytes: usize) -> Self {
        Links { links: (0..n).map(|_| Link::default()).collect(), next: 0, high_bytes, low_bytes }
    }

    /// The connection link `index` has now.
    pub(super) fn current(&self, index: usize) -> LinkRef {
        LinkRef { index, generation: self.links[index].generation }
    }

    /// Whether `at` is still the link's live connection.
    pub(super) fn is_live(&self, at: LinkRef) -> bool {
        let l = &self.links[at.index];
        l.up && l.generation == at.generation
    }

    /// Over the high water mark (up or not).
    pub(super) fn is_stalled(&self, index: usize) -> bool {
        self.links[index].stalled
    }

    /// Up, but taking no new jobs because its output is over the high water mark.
    pub(super) fn is_up_and_stalled(&self, index: usize) -> bool {
        self.links.get(index).is_some_and(|l| l.up && l.stalled)
    }

    /// Round robin over the links that take work (up, not retiring, not stalled).
    pub(super) fn pick(&mut self) -> Option<usize> {
        let n = self.links.len();
        (0..n).map(|i| (self.next + i) % n).find(|&i| self.links[i].takes_work()).inspect(|&i| {
            self.next = (i + 1) % n;
        })
    }

    /// A job was submitted on `index`: it holds that connection until it is done with it.
    pub(super) fn hold(&mut self, index: usize) {
        self.links[index].holding += 1;
    }

    /// Adds what a SUBMIT_JOB* with these fields will add to the link's output, so a burst
    /// within one pass cannot route more than the high water mark to a link before the shell
    /// reports its figure.
    pub(super) fn count_submit(&mut self, index: usize, fields: &[&[u8]; 3]) {
        let l = &mut self.links[index];
        l.out_bytes += packet::HEADER_BYTES + fields.iter().map(|f| f.len()).sum::<usize>() + 2;
        if l.out_bytes > self.high_bytes {
            l.stalled = true;
        }
    }

    /// Adds a GET_STATUS for `handle` to the link's output.
    pub(super) fn count_status(&mut self, index: usize, handle: &[u8]) {
        self.links[index].out_bytes += packet::HEADER_BYTES + handle.len();
    }

    /// The shell's figure after a flush. True when the link takes jobs again.
    fn note_output(&mut self, index: usize, bytes: usize) -> bool {
        let l = &mut self.links[index];
        l.out_bytes = bytes;
        if bytes > self.high_bytes {
            l.stalled = true;
        } else if l.stalled && bytes < self.low_bytes {
            l.stalled = false;
            return true;
        }
        false
    }

    /// A job stopped holding `index`. True when that closed a retiring link.
    pub(super) fn release(&mut self, index: usize) -> bool {
        let l = &mut self.links[index];
        l.holding = l.holding.saturating_sub(1);
        self.close_if_retired(index)
    }

    /// A retiring link with no job left goes down. True when it did.
    fn close_if_retired(&mut self, index: usize) -> bool {
        let l = &mut self.links[index];
        if l.up && l.retiring && l.holding == 0 {
            l.up = false;
            l.handles.clear();
            l.orphans.clear();
            return true;
        }
        false
    }

    /// A stream job on `at` lost its client; gearmand still holds it there.
    pub(super) fn orphan(&mut self, at: LinkRef, tag: JobTag) {
        if self.is_live(at) {
            self.links[at.index].orphans.insert(tag);
        }
    }

    /// gearmand is done with a submission whose job has ended: if it was an orphan on
    /// `index`, it is one no more.
    pub(super) fn forget_orphan(&mut self, index: usize, tag: JobTag) {
        if let Some(l) = self.links.get_mut(index) {
            l.orphans.remove(&tag);
        }
    }

    /// The links that take work yet hold more than `max` orphans.
    pub(super) fn over_orphaned(&self, max: usize) -> impl Iterator<Item = usize> + '_ {
        let over = move |l: &Link| l.up && !l.retiring && l.orphans.len() > max;
        self.links.iter().enumerate().filter(move |(_, l)| over(l)).map(|(i, _)| i)
    }

    /// gearmand named job `tag` `handle` on `index`.
    pub(super) fn name(&mut self, index: usize, handle: Box<[u8]>, tag: JobTag) {
        self.links[index].handles.entry(handle).or_default().push(tag);
    }

    /// Job `tag` has ended: `handle` on `at` no longer names it.
    pub(super) fn unname(&mut self, at: LinkRef, handle: &[u8], tag: JobTag) {
        let handles = &mut self.links[at.index].handles;
        if let Some(tags) = handles.get_mut(handle) {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                handles.remove(handle);
            }
        }
    }

    /// Which live jobs gearmand named `handle`: one gearmand job (on one connection, possibly
    /// several coalesced submissions of one client), or jobs on several connections.
    pub(super) fn owners(&self, handle: &[u8]) -> HandleOwners {
        let mut owners = self.links.iter().filter(|l| l.up).filter_map(|l| l.handles.get(handle));
        match (owners.next(), owners.next()) {
            (None, _) => HandleOwners::None,
            (Some(tags), None) => HandleOwners::One(tags.clone()),
            (Some(_), Some(_)) => HandleOwners::Several,
        }
    }
}

impl App {
    /// A gearmand connection answered (again): a new generation starts, held submissions go
    /// out.
    pub fn handle_link_up(&mut self, link: usize) {
        let l = &mut self.links.links[link];
        let generation = l.generation.wrapping_add(1);
        *l = Link { up: true, generation, ..Link::default() };
        self.submit_queued();
    }

    /// The shell's count of bytes waiting for gearmand on `link`, after its flush. Above the
    /// high water mark the link takes no new jobs (they go to another link or wait in the
    /// queue); below the low one it takes them again.
    pub fn handle_link_output(&mut self, link: usize, bytes: usize) {
        if self.links.note_output(link, bytes) {
            self.submit_queued();
        }
    }

    /// The shell opened a fresh connection in place of `link` (after `Effect::Retire`): `link`
    /// takes no new work and is closed once the jobs it holds are done.
    pub fn handle_link_retiring(&mut self, link: usize) {
        let l = &mut self.links.links[link];
        if !l.up || l.retiring {
            return;
        }
        l.retiring = true;
        self.metrics.gearmand_retired += 1;
        if self.links.close_if_retired(link) {
            self.close_retired(link);
        }
    }

    /// A job stopped holding `link`; a retiring link with nothing left closes.
    pub(super) fn release_link(&mut self, link: usize) {
        if self.links.release(link) {
            self.close_retired(link);
        }
    }

    /// A retiring link has no job left and closes: a question still open on it (a client's,
    /// about a job that has ended since) will never be answered there, so its askers hear so now.
    fn close_retired(&mut self, link: usize) {
        let at = self.links.current(link);
        self.drop_questions_on(at, "the gearmand connection closed (retired) before it answered");
        self.effects.push(Effect::CloseLink(link));
    }

    /// A gearmand connection was lost: every job it held ends now, with exactly one terminal
    /// reply (`job.failed` for stream jobs, `job.lost` for background ones), and every
    /// question asked on it gets an answer.
    pub fn handle_link_down(&mut self, link: usize, now: std::time::Instant) {
        let at = self.links.current(link);
        let l = &mut self.links.links[link];
        if !l.up {
            return;
        }
        l.up = false; // the jobs ended below no longer touch its indexes, reset at the end
        for tag in self.jobs.holding(at) {
            let Some(job) = self.jobs.get(tag) else { continue };
            let reason = "the gearmand connection that held this job was lost";
            if job.kind() == Kind::Stream {
                self.job_reply(tag, JobNews::Failed(reason), now);
                self.end_job(tag, Outcome::Failed, now);
            } else {
                self.job_reply(tag, JobNews::Lost(reason), now);
                self.end_job(tag, Outcome::Lost, now);
            }
        }
        self.drop_questions_on(at, "the gearmand connection was lost before it answered");
        self.links.links[link] = Link { generation: at.generation, ..Link::default() };
        self.relays_link_down(link, now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;
    use serde_json::json;

    #[test]
    fn a_connection_with_too_many_orphans_retires_and_closes_when_its_live_jobs_end() {
        let t0 = Instant::now();
        let mut app = App::new(cfg(), 2, Entropy::counter()); // max_orphans 3, 2 jobs each
        app.handle_link_up(0);
        app.handle_client_open(B, true);
        let leavers = [ConnId { key: 2, generation: 1 }, ConnId { key: 3, generation: 1 }];
        for c in [A].iter().chain(&leavers) {
            app.handle_client_open(*c, true);
            for _ in 0..2 {
                app.handle_client_text(*c, r#"{"type":"submit","function":"nobody"}"#, t0);
            }
        }
        let subs = submits(&effects(&mut app));
        assert_eq!(subs.len(), 6);
        app.handle_client_closed(leavers[0], t0);
        assert_eq!(effects(&mut app), vec![], "2 orphans are within the bound");
        app.handle_client_closed(leavers[1], t0);
        assert_eq!(effects(&mut app), vec![Effect::Retire(0)]);
        // The shell opened link 1 for new work; link 0 still holds A's two live jobs.
        app.handle_link_retiring(0);
        app.handle_link_up(1);
        assert_eq!(effects(&mut app), vec![]);
        app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        assert_eq!(submits(&effects(&mut app))[0].0, 1, "new work avoids the retiring connection");
        // An orphan's end on the old connection is just forgotten.
        app.handle_job_event(0, JobEvent::Failed { tag: subs[2].1 }, t0);
        assert_eq!(effects(&mut app), vec![]);
        app.handle_job_event(0, JobEvent::Complete { tag: subs[0].1, data: b"ok".to_vec() }, t0);
        assert!(!effects(&mut app).contains(&Effect::CloseLink(0)));
        app.handle_job_event(0, JobEvent::Complete { tag: subs[1].1, data: b"ok".to_vec() }, t0);
        assert!(effects(&mut app).contains(&Effect::CloseLink(0)));
    }

    #[test]
    fn a_stalled_link_takes_no_new_jobs_until_it_drains() {
        let t0 = Instant::now();
        let mut app = App::new(AppConfig { queue_limit: 4, ..cfg() }, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        let big = json!({"type":"submit","function":"f","payload":"p".repeat(5000)}).to_string();
        app.handle_client_text(A, &big, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        assert_eq!(submits(&effects(&mut app)).len(), 1, "the second job waits: 5000 bytes are queued");
        assert!(app.is_link_stalled(0));
        app.handle_link_output(0, 2000);
        assert_eq!(submits(&effects(&mut app)).len(), 0, "still above the low water mark");
        app.handle_link_output(0, 0);
        assert_eq!(submits(&effects(&mut app)).len(), 1);
        assert!(!app.is_link_stalled(0));
    }

    #[test]
    fn lost_link_ends_every_job_once_and_queue_is_bounded() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        let e = effects(&mut app);
        assert!(sent(&e)[0].1.contains("too_many_jobs"));
        app.handle_link_down(0, t0);
        let kinds: Vec<String> = sent(&effects(&mut app))
            .iter()
            .map(|(_, t)| serde_json::from_str::<Value>(t).unwrap()["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["job.failed", "job.lost"]);
        app.handle_link_down(0, t0);
        assert_eq!(effects(&mut app), vec![]);
        // Down: one submission is held, the next is refused.
        app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        let e = effects(&mut app);
        assert!(sent(&e)[0].1.contains("unavailable"));
        app.handle_link_up(0);
        assert_eq!(submitted(&effects(&mut app)).len(), 1);
    }

    #[test]
    fn a_lost_link_answers_its_open_questions() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        let tag = submitted(&effects(&mut app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:1".to_vec() }, t0);
        app.handle_client_text(A, r#"{"type":"status","job":"H:1"}"#, t0);
        effects(&mut app);
        app.handle_link_down(0, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["unavailable"]);
        assert!(sent(&e)[0].1.contains("job.lost"));
    }
}
