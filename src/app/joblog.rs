//! Job logs: the replies each submitted job's client was sent, numbered by `seq` and kept so
//! that a client whose connection ended can attach again and hear what it missed.
//!
//! A [`Journal`] is one job's record: its resume secret, handle and token subject, who its
//! events go to ([`Owner`]), the live job it follows (None once the job ended), and its
//! [`Log`]. [`Journals`] holds them all, keyed by a number that is never reused and that grows
//! with age, so the first in the map is the oldest. It bounds what they hold: each log to
//! `--job-log-bytes`, all of them to `--job-log-total-bytes` (detached journals go first,
//! oldest first; then the oldest attached logs are trimmed).
//!
//! ```text
//! created --owner's connection ends--> detached --attach--> owned (again, or elsewhere)
//!    |                                   |   \--grace / over the total--> gone (job abandoned)
//!    +--job ends while owned--> gone     +--job ends--> ended, kept for the grace --> gone
//! ```
//!
//! A log never drops its terminal event or its latest `job.status`; what it trimmed shows as
//! the seqs between those it kept, which is how gaps are found ([`Log::replay`]).
//!
//! Must not: send, end a job, or read the clock (the App does, and hands deadlines in).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use super::ConnId;
use crate::gearman::client::JobTag;

/// Characters of a resume secret (22 × 6 = 132 random bits).
pub(super) const SECRET_CHARS: usize = 22;

/// What a kept event costs besides its text: its place in the deque. Counted, so that many
/// tiny events cannot hold more than the bound says.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>();

/// What a detached job holds besides its log: its journal, its entry in the job table and the
/// indexes that find it (about 1.2 KB measured per detached job, `tests/resume.rs`). Counted
/// against the total while the job is detached, so that a client that submits and leaves, over
/// and over, cannot keep more detached jobs than the total allows, however small their logs.
/// (A job whose client is connected is bounded by `--max-jobs-per-connection` instead.)
pub(super) const DETACHED_OVERHEAD: usize = 1200;

/// Where a job's events go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// A local client connection.
    Conn(ConnId),
    /// Nobody, for now: the events are only logged.
    Detached,
    /// A client of another instance, through a relay ([`super::relay`]; the relay's served id).
    Remote(u64),
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    text: Box<str>,
}

/// One job's events, oldest first, within a byte bound.
#[derive(Debug, Default)]
pub(super) struct Log {
    entries: VecDeque<Entry>,
    /// Bytes held: texts plus [`ENTRY_OVERHEAD`] each.
    bytes: usize,
    /// The seq of the last event sent (0: none yet).
    last: u64,
    /// The seq of the latest `job.status` kept (0: none); never trimmed.
    status: u64,
    /// The last entry is the terminal event; never trimmed.
    ended: bool,
}

/// What replaying a log after seq `n` gives, in seq order.
#[derive(Debug, PartialEq)]
pub(super) enum Replayed<'a> {
    /// Seqs `from..=to` were trimmed.
    Gap(u64, u64),
    /// An event, as first sent.
    Event(&'a str),
}

impl Log {
    /// The seq the next event gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.last + 1
    }

    /// The seq of the last event (0: none).
    pub(super) fn last(&self) -> u64 {
        self.last
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps event `text`, which was given [`Log::next_seq`]; `status`: it is a `job.status`,
    /// `terminal`: the job's last. Returns the bytes it added.
    pub(super) fn push(&mut self, text: &str, status: bool, terminal: bool) -> usize {
        self.last += 1;
        if status {
            self.status = self.last;
        }
        self.ended |= terminal;
        let added = text.len() + ENTRY_OVERHEAD;
        self.entries.push_back(Entry { seq: self.last, text: text.into() });
        self.bytes += added;
        added
    }

    /// Drops the oldest event that may go (not the latest status, not the terminal event):
    /// the bytes freed, or None when only those are left.
    pub(super) fn trim_one(&mut self) -> Option<usize> {
        let pinned = |log: &Log, i: usize| {
            let seq = log.entries[i].seq;
            seq == log.status || (log.ended && i + 1 == log.entries.len())
        };
        let i = (0..self.entries.len().min(2)).find(|&i| !pinned(self, i))?;
        let entry = self.entries.remove(i)?;
        let freed = entry.text.len() + ENTRY_OVERHEAD;
        self.bytes -= freed;
        Some(freed)
    }

    /// Trims until within `max` bytes, or only pinned events are left: the bytes freed.
    pub(super) fn trim_to(&mut self, max: usize) -> usize {
        let mut freed = 0;
        while self.bytes > max {
            match self.trim_one() {
                Some(n) => freed += n,
                None => break,
            }
        }
        freed
    }

    /// Everything after seq `after`: the kept events, and a gap for each run of trimmed seqs
    /// before them, in seq order.
    pub(super) fn replay(&self, after: u64) -> Vec<Replayed<'_>> {
        let mut out = Vec::new();
        let mut next = after + 1;
        for entry in self.entries.iter().filter(|e| e.seq > after) {
            if entry.seq > next {
                out.push(Replayed::Gap(next, entry.seq - 1));
            }
            out.push(Replayed::Event(&entry.text));
            next = entry.seq + 1;
        }
        if next <= self.last {
            out.push(Replayed::Gap(next, self.last));
        }
        out
    }
}

/// One submitted job's record.
#[derive(Debug)]
pub(super) struct Journal {
    /// The secret part of its resume token.
    pub secret: [u8; SECRET_CHARS],
    /// The handle gearmand gave the job (what `attach` names as `job`).
    pub handle: Box<[u8]>,
    /// The token subject that submitted it (client tokens on).
    pub sub: Option<Box<str>>,
    /// Where its events go.
    pub owner: Owner,
    /// The live job, None once it ended.
    pub job: Option<JobTag>,
    /// While detached: when it is given up.
    pub deadline: Option<Instant>,
    pub log: Log,
}

/// Every journal, and the bytes their logs hold.
#[derive(Debug)]
pub(super) struct Journals {
    map: BTreeMap<u64, Journal>,
    /// Journals whose owner is `Detached`, oldest first.
    detached: BTreeSet<u64>,
    next_id: u64,
    /// Trimming attached logs goes on from this journal (the one it last trimmed), so that the
    /// logs with nothing left to trim are not walked past again for every event.
    trim_from: u64,
    bytes: usize,
    max_job: usize,
    max_total: usize,
}

impl Journals {
    pub(super) fn new(max_job: usize, max_total: usize) -> Journals {
        let (map, detached) = (BTreeMap::new(), BTreeSet::new());
        Journals { map, detached, next_id: 0, trim_from: 0, bytes: 0, max_job, max_total }
    }

    /// Bytes held: all logs, and [`DETACHED_OVERHEAD`] for each detached journal.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Journals now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Detached journals (of live and of ended jobs).
    #[cfg(test)]
    pub(super) fn detached(&self) -> usize {
        self.detached.len()
    }

    /// Detached journals of live jobs.
    pub(super) fn detached_live(&self) -> usize {
        self.detached.iter().filter(|id| self.map.get(id).is_some_and(|j| j.job.is_some())).count()
    }

    /// A new journal; its number.
    pub(super) fn open(&mut self, journal: Journal) -> u64 {
        self.next_id += 1;
        if journal.owner == Owner::Detached {
            self.detached.insert(self.next_id);
            self.bytes += DETACHED_OVERHEAD;
        }
        self.map.insert(self.next_id, journal);
        self.next_id
    }

    pub(super) fn get(&self, id: u64) -> Option<&Journal> {
        self.map.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Journal> {
        self.map.get_mut(&id)
    }

    /// Changes where a journal's events go. A journal that becomes detached is charged its
    /// [`DETACHED_OVERHEAD`], which may take the total over: the journals given up for it
    /// (detached ones, oldest first, possibly this one), for the App to abandon their jobs.
    pub(super) fn set_owner(&mut self, id: u64, owner: Owner) -> Vec<Journal> {
        let Some(j) = self.map.get_mut(&id) else { return Vec::new() };
        j.owner = owner;
        if owner != Owner::Detached {
            j.deadline = None;
            if self.detached.remove(&id) {
                self.bytes -= DETACHED_OVERHEAD;
            }
            return Vec::new();
        }
        if self.detached.insert(id) {
            self.bytes += DETACHED_OVERHEAD;
        }
        self.within_total()
    }

    /// Takes a journal out.
    pub(super) fn remove(&mut self, id: u64) -> Option<Journal> {
        let j = self.map.remove(&id)?;
        if self.detached.remove(&id) {
            self.bytes -= DETACHED_OVERHEAD;
        }
        self.bytes -= j.log.bytes();
        Some(j)
    }

    /// Logs an event of journal `id` (it was given the log's next seq), trims that log to its
    /// bound, and brings all logs within the total: the journals given up for it (detached
    /// ones, oldest first), for the App to abandon their jobs.
    pub(super) fn push(&mut self, id: u64, text: &str, status: bool, terminal: bool) -> Vec<Journal> {
        let Some(j) = self.map.get_mut(&id) else { return Vec::new() };
        self.bytes += j.log.push(text, status, terminal);
        self.bytes -= j.log.trim_to(self.max_job);
        self.within_total()
    }

    /// Gives up detached journals, oldest first, then trims the oldest attached logs, until
    /// the logs hold at most the total.
    fn within_total(&mut self) -> Vec<Journal> {
        let mut gone = Vec::new();
        while self.bytes > self.max_total
            && let Some(&id) = self.detached.first()
        {
            gone.extend(self.remove(id));
        }
        // Then from where the last trimming stopped to the newest, and round from the oldest.
        let from = self.trim_from;
        self.trim_attached(from..);
        self.trim_attached(..from);
        gone
    }

    fn trim_attached(&mut self, range: impl std::ops::RangeBounds<u64>) {
        if self.bytes <= self.max_total {
            return;
        }
        for (&id, j) in self.map.range_mut(range) {
            while self.bytes > self.max_total
                && let Some(freed) = j.log.trim_one()
            {
                self.bytes -= freed;
                self.trim_from = id;
            }
            if self.bytes <= self.max_total {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(owner: Owner) -> Journal {
        Journal {
            secret: [b'x'; SECRET_CHARS],
            handle: b"H:1".to_vec().into(),
            sub: None,
            owner,
            job: None,
            deadline: None,
            log: Log::default(),
        }
    }

    fn texts(replayed: &[Replayed]) -> Vec<String> {
        replayed
            .iter()
            .map(|r| match r {
                Replayed::Gap(a, b) => format!("gap {a}-{b}"),
                Replayed::Event(t) => t.to_string(),
            })
            .collect()
    }

    #[test]
    fn a_log_trims_oldest_first_and_replays_gaps_in_order() {
        let mut log = Log::default();
        for i in 1..=6 {
            // seq 2 is a status; it stays while it is the latest.
            log.push(&format!("e{i}"), i == 2, false);
        }
        let one = 2 + ENTRY_OVERHEAD;
        assert_eq!(log.bytes(), 6 * one);
        assert_eq!(log.trim_to(3 * one), 3 * one);
        // 1, 3 and 4 went; the status (2) stayed.
        assert_eq!(texts(&log.replay(0)), ["gap 1-1", "e2", "gap 3-4", "e5", "e6"]);
        assert_eq!(texts(&log.replay(2)), ["gap 3-4", "e5", "e6"]);
        assert_eq!(texts(&log.replay(4)), ["e5", "e6"]);
        assert_eq!(texts(&log.replay(6)), Vec::<String>::new());
        // A newer status unpins the old one; the terminal event is never trimmed.
        log.push("s7", true, false);
        log.push("end", false, true);
        assert_eq!(log.trim_to(0), 3 * one);
        assert_eq!(texts(&log.replay(0)), ["gap 1-6", "s7", "end"]);
        assert_eq!(log.trim_one(), None);
        assert_eq!(log.last(), 8);
    }

    #[test]
    fn an_event_over_the_bound_leaves_a_gap_at_the_end() {
        let mut log = Log::default();
        log.push("small", false, false);
        log.push(&"x".repeat(100), false, false);
        log.trim_to(50);
        assert_eq!(texts(&log.replay(0)), ["gap 1-2"]);
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn over_the_total_detached_journals_go_oldest_first_then_attached_logs_are_trimmed() {
        let a = Owner::Conn(ConnId { key: 0, generation: 1 });
        let one = 10 + ENTRY_OVERHEAD;
        let total = 4 * one + 2 * DETACHED_OVERHEAD;
        let mut all = Journals::new(1 << 20, total);
        let old_attached = all.open(journal(a));
        let old_detached = all.open(journal(Owner::Detached));
        let new_detached = all.open(journal(Owner::Detached));
        let new_attached = all.open(journal(a));
        let ten = "0123456789";
        for id in [old_attached, old_detached, new_detached, new_attached] {
            assert!(all.push(id, ten, false, false).is_empty());
        }
        assert_eq!(all.bytes(), total);
        // Over by one event: the oldest detached journal goes, whole.
        let gone = all.push(new_attached, ten, false, false);
        assert_eq!(gone.len(), 1);
        assert!(all.get(old_detached).is_none() && all.get(new_detached).is_some());
        assert_eq!(all.bytes(), 4 * one + DETACHED_OVERHEAD);
        // As the attached log grows, the next; then the oldest attached log is trimmed.
        let mut pushes = 0;
        while all.get(old_attached).is_some_and(|j| j.log.bytes() > 0) {
            all.push(new_attached, ten, false, false);
            assert!(all.bytes() <= total);
            pushes += 1;
            assert!(pushes < 1000, "never trimmed");
        }
        assert_eq!(all.detached(), 0, "detached journals go before any attached log is trimmed");
        assert_eq!(texts(&all.get(old_attached).unwrap().log.replay(0)), ["gap 1-1"]);
        // A removed journal takes its bytes along.
        all.remove(new_attached);
        assert_eq!((all.bytes(), all.len()), (0, 1));
    }

    #[test]
    fn a_detached_journal_is_charged_its_overhead_against_the_total() {
        let a = Owner::Conn(ConnId { key: 0, generation: 1 });
        let one = 10 + ENTRY_OVERHEAD;
        let mut all = Journals::new(1 << 20, 3 * one + DETACHED_OVERHEAD);
        let [x, y, z] = [(); 3].map(|()| all.open(journal(a)));
        for id in [x, y, z] {
            all.push(id, "0123456789", false, false);
        }
        assert!(all.set_owner(x, Owner::Detached).is_empty());
        assert_eq!(all.bytes(), 3 * one + DETACHED_OVERHEAD);
        // A second detached job does not fit beside the first: the older is given up.
        let gone = all.set_owner(y, Owner::Detached);
        assert_eq!(gone.len(), 1);
        assert!(all.get(x).is_none());
        assert_eq!(all.bytes(), 2 * one + DETACHED_OVERHEAD);
        // Attached again, it costs only its log.
        assert!(all.set_owner(y, a).is_empty());
        assert_eq!((all.bytes(), all.detached()), (2 * one, 0));
    }

    #[test]
    fn each_log_keeps_to_its_own_bound() {
        let mut all = Journals::new(3 * (1 + ENTRY_OVERHEAD), 1 << 20);
        let id = all.open(journal(Owner::Detached));
        for i in 0..10 {
            all.push(id, &i.to_string(), false, false);
        }
        let log = &all.get(id).unwrap().log;
        assert_eq!(texts(&log.replay(0)), ["gap 1-7", "7", "8", "9"]);
        assert_eq!(all.bytes(), log.bytes() + DETACHED_OVERHEAD);
    }
}
