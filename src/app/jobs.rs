//! The job table: every unfinished job, keyed by a [`JobTag`] (slab key + generation), with
//! its phase; the queue of submissions held for a gearmand; and the index of background jobs
//! and pings by unique, kept with the table so that no job is ever in one and not the other.
//!
//! A job's gearmand connection lives inside the phases that have one (`Submitted`, `Running`,
//! `Grace`), so a job that holds no connection cannot name one, and a job has a handle exactly
//! when gearmand gave one. Must not: send anything, or decide when a job moves on (the App's
//! steps in [`super::lifecycle`] do, through these methods).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use slab::Slab;

use super::ConnId;
use super::fields::Ref;
use super::links::LinkRef;
use super::quota::Submitter;
use super::status::Status;
use crate::gearman::client::{JobMode, JobTag, Priority};
use crate::metrics::Mode;

/// The article's ping and the two modes of `submit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Ping,
    Stream,
    Background,
}

impl Kind {
    pub(super) fn mode(self) -> Mode {
        match self {
            Kind::Stream => Mode::Stream,
            Kind::Background => Mode::Background,
            Kind::Ping => Mode::Ping,
        }
    }

    /// How gearmand runs it: a stream job in the foreground, the others in the background.
    pub(super) fn job_mode(self) -> JobMode {
        if self == Kind::Stream { JobMode::Foreground } else { JobMode::Background }
    }
}

/// What to submit, held while the job waits for a gearmand.
#[derive(Debug)]
pub(super) struct Submission {
    pub function: Vec<u8>,
    pub payload: Vec<u8>,
    pub priority: Priority,
}

/// A job gearmand has named: on which connection, and the handle it gave.
#[derive(Debug)]
pub(super) struct Named {
    pub link: LinkRef,
    pub handle: Box<[u8]>,
}

/// A job's phase.
///
/// ```text
/// Queued --link up--> Submitted --JOB_CREATED--> Running --status gone (bg)--> Grace --> end
///   |                     |                         |                              |
///   +-timeout-> end       +-ERROR/link lost-> end   +-WORK_COMPLETE/FAIL/EXCEPTION/link lost-> end
/// ```
/// A job holds its gearmand connection while `Submitted` or `Running` (`holds_link`); in
/// `Grace` its handle is still indexed on that connection, for a report by handle.
#[derive(Debug)]
pub(super) enum Phase {
    /// Waiting for a gearmand; holds what to submit.
    Queued(Box<Submission>),
    /// SUBMIT_JOB written on this connection; JOB_CREATED not yet back.
    Submitted(LinkRef),
    /// gearmand named it.
    Running(Named),
    /// Gone from gearmand; waiting briefly for its `worker.complete` value.
    Grace(Named),
}

/// One unfinished job: whose it is, what it is, where it is (its phase), and what its polls
/// and reports have brought so far.
#[derive(Debug)]
pub(super) struct Job {
    /// Of its slab slot, so a stale tag finds nothing.
    generation: u32,
    conn: ConnId,
    kind: Kind,
    reference: Option<Ref>,
    phase: Phase,
    /// The unique gearmand and the worker see (empty for a stream job without one).
    unique: Box<[u8]>,
    last_status: Option<Status>,
    value: Option<String>,
    next_poll: Instant,
    accepted_at: Instant,
    /// Whose quota it counts against (background jobs and pings).
    submitter: Option<Submitter>,
    /// Its client has left; it is kept, and polled, until gearmand forgets it, for its
    /// submitter's count. Nobody hears about it any more.
    detached: bool,
    /// Its journal ([`super::joblog`]), from `job.created` on (not a ping's): where its events
    /// go, and the log a client attaches to.
    journal: Option<u64>,
}

impl Job {
    pub(super) fn conn(&self) -> ConnId {
        self.conn
    }

    pub(super) fn kind(&self) -> Kind {
        self.kind
    }

    pub(super) fn submitter(&self) -> Option<Submitter> {
        self.submitter
    }

    pub(super) fn is_detached(&self) -> bool {
        self.detached
    }

    /// Its client has left (see `detached`).
    pub(super) fn detach(&mut self) {
        self.detached = true;
    }

    /// Its journal, once it has one.
    pub(super) fn journal(&self) -> Option<u64> {
        self.journal
    }

    pub(super) fn set_journal(&mut self, journal: Option<u64>) {
        self.journal = journal;
    }

    /// Another connection attached the job: its unfinished jobs count it now.
    pub(super) fn set_conn(&mut self, conn: ConnId) {
        self.conn = conn;
    }

    pub(super) fn reference(&self) -> Option<&Ref> {
        self.reference.as_ref()
    }

    pub(super) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The unique gearmand and the worker see (empty for a stream job without one).
    pub(super) fn unique(&self) -> &[u8] {
        &self.unique
    }

    pub(super) fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// A value found for the job (stored before gearmand named it), unless it has one.
    pub(super) fn set_value_if_none(&mut self, value: String) {
        if self.value.is_none() {
            self.value = Some(value);
        }
    }

    /// The value a worker reported, taken for the job's last words.
    pub(super) fn take_value(&mut self) -> Option<String> {
        self.value.take()
    }

    /// The first poll, `at`: polls keep to the grid it starts.
    pub(super) fn first_poll(&mut self, at: Instant) {
        self.next_poll = at;
    }

    /// The handle gearmand gave, once it has.
    pub(super) fn handle(&self) -> Option<&[u8]> {
        match &self.phase {
            Phase::Running(named) | Phase::Grace(named) => Some(&named.handle),
            Phase::Queued(_) | Phase::Submitted(_) => None,
        }
    }

    /// The connection the job holds, while `Submitted` or `Running`.
    pub(super) fn holds_link(&self) -> Option<LinkRef> {
        match &self.phase {
            Phase::Submitted(link) | Phase::Running(Named { link, .. }) => Some(*link),
            Phase::Queued(_) | Phase::Grace(_) => None,
        }
    }

    /// Takes a reported value (stream jobs have their own result and ignore it). True when
    /// the job was only waiting for it.
    pub(super) fn offer_value(&mut self, value: &str) -> bool {
        if self.kind == Kind::Stream {
            return false;
        }
        self.value = Some(value.to_string());
        matches!(self.phase, Phase::Grace(_))
    }

    pub(super) fn has_value(&self) -> bool {
        self.value.is_some()
    }

    /// Notes a poll's answer; true when it differs from the last one.
    pub(super) fn note_status(&mut self, status: Status) -> bool {
        let changed = self.last_status != Some(status);
        self.last_status = Some(status);
        changed
    }

    /// The next poll on the original grid, skipping beats missed by `now`.
    pub(super) fn next_poll_after(&mut self, interval: std::time::Duration, now: Instant) -> Instant {
        let mut at = self.next_poll + interval;
        while at <= now {
            at += interval;
        }
        self.next_poll = at;
        at
    }

    /// Skips one beat (the link is stalled), but asks no sooner than `interval` from `now`.
    pub(super) fn defer_poll(&mut self, interval: std::time::Duration, now: Instant) -> Instant {
        self.next_poll += interval;
        self.next_poll.max(now + interval)
    }

    /// `Running` → `Grace`: gearmand has forgotten the job, which stops holding its
    /// connection. Returns that connection.
    pub(super) fn enter_grace(&mut self) -> Option<LinkRef> {
        let Phase::Running(named) = &mut self.phase else { return None };
        let named = Named { link: named.link, handle: std::mem::take(&mut named.handle) };
        let link = named.link;
        self.phase = Phase::Grace(named);
        Some(link)
    }

    /// `Queued` → `Submitted` on `link`: what to write to gearmand.
    pub(super) fn start(&mut self, link: LinkRef) -> Option<Box<Submission>> {
        match std::mem::replace(&mut self.phase, Phase::Submitted(link)) {
            Phase::Queued(sub) => Some(sub),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// `Submitted` on `link` → `Running`: gearmand named the job `handle`.
    pub(super) fn name(&mut self, link: LinkRef, handle: Box<[u8]>) -> bool {
        if !matches!(self.phase, Phase::Submitted(at) if at == link) {
            return false;
        }
        self.phase = Phase::Running(Named { link, handle });
        true
    }

    /// The connection the job was submitted on, in any phase after `Queued`.
    pub(super) fn link(&self) -> Option<LinkRef> {
        match &self.phase {
            Phase::Queued(_) => None,
            Phase::Submitted(link)
            | Phase::Running(Named { link, .. })
            | Phase::Grace(Named { link, .. }) => Some(*link),
        }
    }
}

/// Every unfinished job, and the submissions held for a gearmand.
#[derive(Debug, Default)]
pub(super) struct Jobs {
    slab: Slab<Job>,
    next_gen: u32,
    /// Held submissions, oldest first; entries of jobs that ended or left `Queued` are stale
    /// and skipped.
    queue: VecDeque<JobTag>,
    /// Jobs in `Queued`.
    queued: usize,
    /// Background jobs and pings by the unique gearmand and their worker see.
    by_unique: HashMap<Box<[u8]>, Vec<JobTag>>,
}

fn tag_of(key: usize, generation: u32) -> JobTag {
    JobTag((u64::from(generation) << 32) | key as u64)
}

fn split_tag(tag: JobTag) -> (usize, u32) {
    ((tag.0 & 0xffff_ffff) as usize, (tag.0 >> 32) as u32)
}

impl Jobs {
    /// Unfinished jobs.
    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Submissions held for a gearmand.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    pub(super) fn get(&self, tag: JobTag) -> Option<&Job> {
        let (key, generation) = split_tag(tag);
        self.slab.get(key).filter(|j| j.generation == generation)
    }

    pub(super) fn get_mut(&mut self, tag: JobTag) -> Option<&mut Job> {
        let (key, generation) = split_tag(tag);
        self.slab.get_mut(key).filter(|j| j.generation == generation)
    }

    /// A new job of `conn`, counted against `submitter`'s quota, `Queued` with what to submit.
    pub(super) fn insert(
        &mut self,
        (conn, submitter): (ConnId, Option<Submitter>),
        kind: Kind,
        reference: Option<Ref>,
        submission: Submission,
        unique: Box<[u8]>,
        now: Instant,
    ) -> JobTag {
        self.next_gen = self.next_gen.wrapping_add(1);
        let entry = self.slab.vacant_entry();
        let tag = tag_of(entry.key(), self.next_gen);
        if kind != Kind::Stream {
            // Indexed from the start: a report may come before our JOB_CREATED is read.
            self.by_unique.entry(unique.clone()).or_default().push(tag);
        }
        entry.insert(Job {
            generation: self.next_gen,
            conn,
            kind,
            reference,
            phase: Phase::Queued(Box::new(submission)),
            unique,
            last_status: None,
            value: None,
            next_poll: now,
            accepted_at: now,
            submitter,
            detached: false,
            journal: None,
        });
        tag
    }

    /// Takes a job out of the table and its indexes.
    pub(super) fn remove(&mut self, tag: JobTag) -> Option<Job> {
        self.get(tag)?;
        let job = self.slab.remove(split_tag(tag).0);
        if matches!(job.phase, Phase::Queued(_)) {
            self.queued -= 1;
        }
        if job.kind != Kind::Stream
            && let Some(tags) = self.by_unique.get_mut(&job.unique)
        {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                self.by_unique.remove(&job.unique);
            }
        }
        Some(job)
    }

    /// Holds a `Queued` job until a gearmand takes work. Stale entries are dropped once they
    /// make the queue twice as long as its limit.
    pub(super) fn hold(&mut self, tag: JobTag, queue_limit: usize) {
        self.queued += 1;
        self.queue.push_back(tag);
        if self.queue.len() > 2 * queue_limit.max(1) {
            let slab = &self.slab;
            self.queue.retain(|t| {
                let (k, g) = split_tag(*t);
                slab.get(k).is_some_and(|j| j.generation == g && matches!(j.phase, Phase::Queued(_)))
            });
        }
    }

    /// The oldest held submission, dropping stale entries before it.
    pub(super) fn next_held(&mut self) -> Option<JobTag> {
        while let Some(&tag) = self.queue.front() {
            if self.get(tag).is_some_and(|j| matches!(j.phase, Phase::Queued(_))) {
                return Some(tag);
            }
            self.queue.pop_front();
        }
        None
    }

    /// The oldest held submission leaves the queue for a gearmand.
    pub(super) fn pop_held(&mut self) {
        self.queue.pop_front();
        self.queued -= 1;
    }

    /// The jobs that hold connection `at`.
    pub(super) fn holding(&self, at: LinkRef) -> Vec<JobTag> {
        let held = |j: &Job| j.holds_link() == Some(at);
        self.slab.iter().filter(|(_, j)| held(j)).map(|(k, j)| tag_of(k, j.generation)).collect()
    }

    /// Every job, oldest first.
    pub(super) fn oldest_first(&self) -> Vec<JobTag> {
        let mut tags: Vec<(Instant, JobTag)> =
            self.slab.iter().map(|(k, j)| (j.accepted_at, tag_of(k, j.generation))).collect();
        tags.sort_unstable_by_key(|(at, tag)| (*at, tag.0));
        tags.into_iter().map(|(_, tag)| tag).collect()
    }

    /// The live background jobs and pings with this unique.
    pub(super) fn with_unique(&self, unique: &[u8]) -> Vec<JobTag> {
        self.by_unique.get(unique).cloned().unwrap_or_default()
    }
}
