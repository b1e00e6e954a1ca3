//! The per-submitter quota on background jobs and pings: gearmand keeps a background job after
//! the connection that submitted it has gone, so a client that loops "connect, submit, leave"
//! could fill gearmand's queue. Each submitter (today its peer address) may have at most
//! `--max-background-per-peer` that gearmand has not finished, counted from acceptance until
//! the job leaves the App's table: its client's jobs as usual, and an abandoned one (its
//! client left) kept and polled, without a client, until gearmand says it no longer knows it.
//!
//! The count is bounded: an entry exists only while its submitter has a counted job, and the
//! abandoned jobs kept for counting are at most [`MAX_DETACHED`] in all (past it an abandoned
//! job is forgotten at once, as before). Must not: end or poll a job (the App does, and tells
//! this room), or send anything.

use std::collections::HashMap;
use std::net::IpAddr;

/// Abandoned background jobs and pings kept (and polled) only to keep their submitter's count
/// honest, in all. Each costs a job entry (a few hundred bytes): 64 Ki of them about 16 MiB.
pub(super) const MAX_DETACHED: usize = 64 * 1024;

/// Whose quota a job counts against. One variant today; a token's subject can join it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Submitter {
    /// The peer's address; an IPv6 peer by its /64, which one host usually holds whole.
    Peer(IpAddr),
}

impl Submitter {
    pub(super) fn peer(ip: IpAddr) -> Submitter {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        };
        Submitter::Peer(ip)
    }
}

/// Unfinished background jobs and pings per submitter, and how many of them are abandoned.
#[derive(Debug)]
pub(super) struct Quota {
    unfinished: HashMap<Submitter, usize>,
    detached: usize,
    max_per_submitter: usize,
}

impl Quota {
    pub(super) fn new(max_per_submitter: usize) -> Self {
        Quota { unfinished: HashMap::new(), detached: 0, max_per_submitter }
    }

    /// Counts a new job against `who`; false (and nothing counted) when it is at its cap.
    pub(super) fn take(&mut self, who: Submitter) -> bool {
        let n = self.unfinished.entry(who).or_default();
        if *n >= self.max_per_submitter {
            if *n == 0 {
                self.unfinished.remove(&who);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// One of `who`'s jobs left the table.
    pub(super) fn give_back(&mut self, who: Submitter) {
        if let Some(n) = self.unfinished.get_mut(&who) {
            *n -= 1;
            if *n == 0 {
                self.unfinished.remove(&who);
            }
        }
    }

    /// An abandoned job may be kept for counting (false: the total is full).
    pub(super) fn detach(&mut self) -> bool {
        if self.detached >= MAX_DETACHED {
            return false;
        }
        self.detached += 1;
        true
    }

    /// An abandoned job left the table.
    pub(super) fn forget_detached(&mut self) {
        self.detached -= 1;
    }

    /// Abandoned jobs kept.
    pub(super) fn detached(&self) -> usize {
        self.detached
    }

    /// `who`'s counted jobs.
    #[cfg(test)]
    pub(super) fn of(&self, who: Submitter) -> usize {
        self.unfinished.get(&who).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::Submitter;

    #[test]
    fn abandoned_background_jobs_count_until_gearmand_forgets_them() {
        let t0 = Instant::now();
        let cfg = AppConfig { max_background_per_peer: 2, max_jobs_per_connection: 4, ..cfg() };
        let mut app = App::new(cfg, 1, Entropy::counter());
        app.handle_link_up(0);
        let peer: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        let (a, b) = (ConnId { key: 5, generation: 1 }, ConnId { key: 6, generation: 1 });
        app.handle_client_open_from(a, true, peer, None, t0);
        app.handle_client_text(a, r#"{"type":"ping"}"#, t0);
        app.handle_client_text(a, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        app.handle_client_text(a, r#"{"type":"submit","function":"f","mode":"background","ref":3}"#, t0);
        app.handle_client_text(a, r#"{"type":"submit","function":"f"}"#, t0); // stream: not counted
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["too_many_jobs"]);
        let tags = submitted(&e);
        assert_eq!(tags.len(), 3);
        // Named, then the client leaves: the ping is named, the background job not yet.
        app.handle_job_event(0, JobEvent::Created { tag: tags[0], handle: b"H:1".to_vec() }, t0);
        app.handle_client_closed(a, t0);
        assert_eq!(app.jobs_in_flight(), 0);
        // Another connection from the same /64: still at the cap.
        app.handle_client_open_from(b, true, "2001:db8::9".parse().unwrap(), None, t0);
        app.handle_client_text(b, r#"{"type":"ping"}"#, t0);
        assert_eq!(codes(&effects(&mut app)), ["too_many_jobs"]);
        // gearmand names the abandoned job late: it is polled too; nobody hears of either.
        app.handle_job_event(0, JobEvent::Created { tag: tags[1], handle: b"H:2".to_vec() }, t0);
        let e = effects(&mut app);
        assert!(sent(&e).is_empty(), "{e:?}");
        let who = Submitter::peer(peer);
        for (tag, handle) in [(tags[0], b"H:1"), (tags[1], b"H:2")] {
            assert_eq!(app.quota.of(who), if tag == tags[0] { 2 } else { 1 });
            let ask = poll(&mut app, tag, t0 + Duration::from_millis(100));
            app.handle_job_event(0, gone(ask, handle), t0);
            assert!(sent(&effects(&mut app)).is_empty());
        }
        assert_eq!((app.quota.of(who), app.quota.detached(), app.jobs.len()), (0, 0, 0));
        app.handle_client_text(b, r#"{"type":"ping"}"#, t0);
        assert_eq!(submitted(&effects(&mut app)).len(), 1);
    }
}
