//! Reports: a worker's `worker.complete`, who may send one (trust: `--worker-token`, or a
//! trusted peer), which job it names (by unique, or by handle while that is unambiguous), and
//! where its value goes: to the jobs waiting for it, into the stored values, or, for a job of
//! another instance, forwarded to that instance's desk through gearmand.
//!
//! Must not: end a job other than through its last words ([`App::finish_polled`]), or keep
//! state of its own (values wait in [`super::stored`], jobs in [`super::jobs`]).

use std::time::Instant;

use log::debug;

use super::fields::Ref;
use super::links::HandleOwners;
use super::reply::Reply;
use super::request::{JobName, Refusal, Report};
use super::{App, AppTimer, ConnId, Effect};
use crate::gearman::client::{JobMode, JobTag, Priority};
use crate::metrics::ErrorCode;

/// The desk function of instance `<id>` is this followed by the id.
pub(crate) const DESK_PREFIX: &str = "gearsock.report.";
/// The tag of a report forwarded to another instance: no job of ours answers to it.
pub(super) const FORWARD_TAG: JobTag = JobTag(u64::MAX);

impl App {
    /// A `worker.complete`: first whether the client may report at all, then what it reported.
    pub(super) fn on_report(
        &mut self,
        id: ConnId,
        token: Option<&str>,
        report: Result<Report, Refusal>,
        r: Option<&Ref>,
        now: Instant,
    ) {
        if let Err(why) = self.may_report(id, token) {
            return self.error(id, ErrorCode::Forbidden, why, r);
        }
        let Report { value, job } = match report {
            Ok(report) => report,
            Err(refusal) => return self.error(id, refusal.code, &refusal.text, r),
        };
        let mut digits = [0; 20];
        let handle = match &job {
            JobName::Unique(unique) => return self.report_by_unique(id, unique, &value, r, now),
            JobName::Handle(handle) => handle,
            JobName::Number(n) => JobName::spell(*n, &mut digits),
        };
        match self.links.owners(handle.as_bytes()) {
            HandleOwners::None => {
                // The article's server stores every value; a worker may report before our
                // JOB_CREATED was read. Kept until claimed or its TTL.
                self.send(id, Reply::GotIt.text());
                if let Some(at) = self.stored.store(handle, &value, now) {
                    self.effects.push(Effect::Arm(at, AppTimer::Sweep));
                }
            }
            HandleOwners::One(tags) => {
                self.send(id, Reply::GotIt.text());
                self.deliver_value(&tags, &value, now);
            }
            HandleOwners::Several => {
                let text = "several gearmand servers gave out this handle; report with \"unique\" \
                            to name the job";
                self.error(id, ErrorCode::AmbiguousJob, text, r);
            }
        }
    }

    /// Whether client `id` may report values: with `--worker-token`, exactly when it sent the
    /// token; without, when it is a trusted peer. The error text says how to be allowed.
    fn may_report(&mut self, id: ConnId, token: Option<&str>) -> Result<(), &'static str> {
        let trusted = self.clients.is_trusted(id);
        match &self.cfg.worker_token {
            Some(expected) if token.is_some_and(|t| same_secret(t.as_bytes(), expected.as_bytes())) => Ok(()),
            Some(_) => Err("worker.complete needs the server's --worker-token as \"token\""),
            None if trusted => Ok(()),
            None => Err("worker.complete is taken only from this machine (loopback), without a foreign \
                         Origin and not through a proxy; elsewhere start the server with --worker-token \
                         and send it as \"token\""),
        }
    }

    /// A report that names its job by unique: the unique names one gearmand job exactly (or
    /// the submissions of one client that coalesced into it), so no other job can take the
    /// value. A job of another instance gets it through that instance's desk.
    fn report_by_unique(&mut self, id: ConnId, unique: &str, value: &str, r: Option<&Ref>, now: Instant) {
        let takers = self.jobs.with_unique(unique.as_bytes());
        if !takers.is_empty() {
            self.send(id, Reply::GotIt.text());
            return self.deliver_value(&takers, value, now);
        }
        match self.uniques.owner_elsewhere(unique) {
            Some(owner) => self.forward_report(id, owner, unique, value, r),
            None => {
                let text = "no unfinished background job has that unique";
                self.error(id, ErrorCode::UnknownJob, text, r)
            }
        }
    }

    /// The job of this report lives on instance `owner`: leave it at that instance's desk as a
    /// background job whose unique is the job's own (so repeated reports for one job coalesce
    /// in gearmand while the first waits). The owner delivers it as if reported there.
    fn forward_report(&mut self, id: ConnId, owner: &str, unique: &str, value: &str, r: Option<&Ref>) {
        let Some(link) = self.links.pick() else {
            let text = "the job belongs to another gearsock instance, and no gearmand is taking jobs \
                        to forward the report through";
            return self.error(id, ErrorCode::Unavailable, text, r);
        };
        let function = format!("{DESK_PREFIX}{owner}").into_bytes();
        let (unique, payload) = (unique.as_bytes().to_vec(), value.as_bytes().to_vec());
        self.links.count_submit(link, &[&function, &unique, &payload]);
        self.metrics.reports_forwarded += 1;
        self.effects.push(Effect::Submit {
            link,
            tag: FORWARD_TAG,
            function,
            unique,
            payload,
            mode: JobMode::Background,
            priority: Priority::High,
        });
        self.send(id, Reply::GotIt.text());
    }

    /// A report another instance forwarded to this one's desk: delivered exactly as a local
    /// report with that unique would be (a unique no live job has is dropped: its job ended).
    pub(super) fn on_forwarded(&mut self, unique: &[u8], value: &[u8], now: Instant) {
        let takers = self.jobs.with_unique(unique);
        self.metrics.count_report_received(!takers.is_empty());
        if takers.is_empty() {
            return debug!("forwarded report for unique {:?}: no live job", unique.escape_ascii());
        }
        self.deliver_value(&takers, &String::from_utf8_lossy(value), now);
    }

    /// Gives a reported value to `takers` (stream jobs have their own result and ignore it).
    fn deliver_value(&mut self, takers: &[JobTag], value: &str, now: Instant) {
        for &tag in takers {
            if self.jobs.get_mut(tag).is_some_and(|job| job.offer_value(value)) {
                self.finish_polled(tag, now);
            }
        }
    }
}

/// Compares a secret without an early exit, so the time taken does not reveal how many
/// leading bytes of a guess were right.
pub(super) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, &b) in expected.iter().enumerate() {
        diff |= usize::from(b ^ given.get(i).copied().unwrap_or(!b));
    }
    std::hint::black_box(diff) == 0
}

/// Whether a client may report values without a token: a loopback peer (IPv4, IPv6 or
/// IPv4-mapped on a dual-stack listener) whose upgrade had no foreign `Origin` and did not come
/// through a proxy. Anything else, a page from another site in a local browser or every client
/// behind a reverse proxy on this host, needs `--worker-token`.
pub(crate) fn is_trusted_peer(peer: std::net::IpAddr, own_origin_or_none: bool, forwarded: bool) -> bool {
    let loopback = match peer {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    };
    loopback && own_origin_or_none && !forwarded
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;
    use super::{FORWARD_TAG, same_secret};
    use serde_json::json;

    #[test]
    fn the_token_is_required_when_set() {
        let t0 = Instant::now();
        let mut app =
            App::new(AppConfig { worker_token: Some("s3cret".into()), ..cfg() }, 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app.handle_client_open(B, false);
        app.handle_client_text(A, r#"{"type":"worker.complete","id":1,"value":"x"}"#, t0);
        app.handle_client_text(A, r#"{"type":"worker.complete","id":1,"value":"x","token":"s3cre"}"#, t0);
        app.handle_client_text(B, r#"{"type":"worker.complete","id":1,"value":"x","token":"s3cret"}"#, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["forbidden", "forbidden"]);
        assert_eq!(sent(&e)[2], (B, "got it!"), "a token holder is taken from anywhere");
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc") && !same_secret(b"ab", b"abc") && !same_secret(b"abcd", b"abc"));
    }

    #[test]
    fn trusted_peers_are_local_own_origin_and_not_proxied() {
        let v4: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let mapped_remote: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        for ip in [v4, v6, mapped] {
            assert!(is_trusted_peer(ip, true, false), "{ip}");
            assert!(!is_trusted_peer(ip, false, false), "{ip} with a foreign Origin");
            assert!(!is_trusted_peer(ip, true, true), "{ip} through a proxy");
        }
        assert!(!is_trusted_peer(remote, true, false));
        assert!(!is_trusted_peer(mapped_remote, true, false));
    }

    #[test]
    fn a_report_names_its_job_by_unique_and_an_ambiguous_handle_reaches_none() {
        let t0 = Instant::now();
        let mut app = App::new(cfg(), 2, Entropy::counter());
        app.handle_link_up(0);
        app.handle_link_up(1);
        app.handle_client_open(A, true);
        app.handle_client_open(B, true);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        app.handle_client_text(B, r#"{"type":"ping"}"#, t0);
        let subs = submits(&effects(&mut app));
        let [(la, ta, ua), (lb, tb, ub)] = &subs[..] else { panic!("{subs:?}") };
        assert_ne!(la, lb, "round robin over both gearmands");
        assert!(ua.len() >= 16 && ua != ub, "every ping carries its own random unique");
        // Both gearmands hand out the same handle.
        app.handle_job_event(*la, JobEvent::Created { tag: *ta, handle: b"H:vm:1".to_vec() }, t0);
        app.handle_job_event(*lb, JobEvent::Created { tag: *tb, handle: b"H:vm:1".to_vec() }, t0);
        effects(&mut app);
        app.handle_client_text(A, r#"{"type":"worker.complete","id":"H:vm:1","value":"pwned","ref":3}"#, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["ambiguous_job"]);
        assert!(sent(&e)[0].1.contains("\"ref\":3"));
        let report = json!({"type":"worker.complete","id":"H:vm:1","unique":String::from_utf8_lossy(ua),"value":"mine"});
        app.handle_client_text(B, &report.to_string(), t0);
        assert_eq!(sent(&effects(&mut app)), vec![(B, "got it!")]);
        let mut e = Vec::new();
        for (link, tag) in [(*la, *ta), (*lb, *tb)] {
            let ask = poll(&mut app, tag, t0);
            app.handle_job_event(link, gone(ask, b"H:vm:1"), t0);
            e.extend(effects(&mut app));
        }
        app.handle_timer(AppTimer::Grace(*tb), t0 + Duration::from_secs(1));
        e.extend(effects(&mut app));
        assert!(sent(&e).contains(&(A, "value: mine")), "{e:?}");
        assert!(sent(&e).contains(&(B, "value: ")), "B's job never got A's value: {e:?}");
        // A unique that names no live job is refused, not stored.
        app.handle_client_text(A, r#"{"type":"worker.complete","unique":"nope","value":"x"}"#, t0);
        assert_eq!(codes(&effects(&mut app)), ["unknown_job"]);
        assert_eq!(app.stored_values(), 0);
    }

    #[test]
    fn a_report_with_unique_reaches_a_job_gearmand_has_not_named_yet() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"submit","function":"f","mode":"background"}"#, t0);
        let (_, tag, unique) = submits(&effects(&mut app)).remove(0);
        let report =
            json!({"type":"worker.complete","unique":String::from_utf8_lossy(&unique),"value":"early"});
        app.handle_client_text(A, &report.to_string(), t0);
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:vm:7".to_vec() }, t0);
        effects(&mut app);
        let ask = poll(&mut app, tag, t0);
        app.handle_job_event(0, gone(ask, b"H:vm:7"), t0);
        let e = effects(&mut app);
        let done: Value = serde_json::from_str(sent(&e).last().unwrap().1).unwrap();
        assert_eq!((done["type"].as_str(), done["result"].as_str()), (Some("job.complete"), Some("early")));
    }

    #[test]
    fn a_report_for_another_instances_job_is_forwarded_to_its_desk() {
        let t0 = Instant::now();
        let mut app = up_app();
        let report =
            |unique: &str| json!({"type":"worker.complete","unique":unique,"value":"done"}).to_string();
        app.handle_client_text(A, &report("b2.XYZ~invoice"), t0);
        let e = effects(&mut app);
        assert_eq!(sent(&e), vec![(A, "got it!")]);
        assert!(
            matches!(&e[0], Effect::Submit { tag: FORWARD_TAG, function, unique, payload, mode: JobMode::Background, .. }
            if function == b"gearsock.report.b2" && unique == b"b2.XYZ~invoice" && payload == b"done")
        );
        // gearmand's answers to the forward concern no job.
        app.handle_job_event(0, JobEvent::Created { tag: FORWARD_TAG, handle: b"H:vm:9".to_vec() }, t0);
        assert!(effects(&mut app).is_empty());

        // Our own id, or no instance at all: nobody to forward to.
        for unique in ["a1.nope", "nope", "not an id.x"] {
            app.handle_client_text(A, &report(unique), t0);
            assert_eq!(codes(&effects(&mut app)), ["unknown_job"], "{unique}");
        }
        // No gearmand up: the reporter hears that it was not forwarded.
        app.handle_link_down(0, t0);
        effects(&mut app);
        app.handle_client_text(A, &report("b2.XYZ"), t0);
        assert_eq!(codes(&effects(&mut app)), ["unavailable"]);
    }

    #[test]
    fn a_forwarded_report_is_delivered_as_if_reported_here() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        let (_, tag, unique) = submits(&effects(&mut app)).remove(0);
        assert!(unique.starts_with(b"a1."), "our uniques name this instance: {:?}", unique.escape_ascii());
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:vm:7".to_vec() }, t0);
        app.handle_job_event(0, JobEvent::Forwarded { unique: unique.clone(), value: b"done".to_vec() }, t0);
        effects(&mut app);
        let ask = poll(&mut app, tag, t0);
        app.handle_job_event(0, gone(ask, b"H:vm:7"), t0);
        assert_eq!(sent(&effects(&mut app)), vec![(A, "job: H:vm:7"), (A, "value: done")]);
        // A forward for a job that has ended is dropped quietly.
        app.handle_job_event(0, JobEvent::Forwarded { unique, value: b"late".to_vec() }, t0);
        assert!(effects(&mut app).is_empty());
    }
}
