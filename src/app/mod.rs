//! The application: what client messages mean and what each Gearman event tells which client.
//!
//! Sans-IO. Inputs arrive through `handle_*(…, now)`: client text, client open/close, Gearman job
//! events, gearmand links going up or down, and the App's own timers firing. Outputs are
//! [`Effect`]s the shell drains with [`App::drain_effects`]: text to send, jobs to submit, status
//! to ask, timers to arm. The App never touches a socket, the wheel or the clock.
//!
//! [`App`] is the one facade: it keeps the entry points and hands the work to rooms that each
//! own one concern and their state, privately:
//!
//! ```text
//! request    text -> validated Request, or the Refusal that says what is wrong
//! reply      typed Reply -> wire text, in one place
//! jobs       the job table: phases (the link inside the phase that has one), held queue, by unique
//! lifecycle  a job's steps: accept, submit, named, finished; end_job; shutdown
//! status     GET_STATUS questions and their answers; the poll timer
//! reports    worker.complete: trust, which job, stored or forwarded; the desk's reports
//! uniques    the uniques gearmand sees; which instance a unique names
//! stored     values no job claimed yet (bounded, with a TTL)
//! fields     the bounded forms of free-form client fields: `ref`, a report's id and value
//! links      the App's view of gearmand links: choice, stall, orphans, retiring; link news
//! quota      background jobs and pings per submitter (peer) that gearmand has not finished
//! clients    open clients, their trust, namespace and jobs
//! access     who may run what: the function allow-list, client tokens, the job rate
//! joblog     each job's events with their seq, bounded per job and in all; gaps
//! attach     who hears a job (its owner), detaching at a close, attach and takeover
//! ```
//!
//! Jobs are keyed by a [`JobTag`] (slab key + generation) and, once gearmand names them, by the
//! link, that link's connection generation and the handle: a restarted gearmand hands out
//! `H:host:1` again, and an old job must never answer for a new one.

mod access;
mod attach;
mod clients;
mod fields;
mod joblog;
mod jobs;
mod lifecycle;
mod links;
mod quota;
mod relay;
mod relay_wire;
mod reply;
mod reports;
mod request;
mod scan;
mod status;
mod stored;
#[cfg(test)]
mod testkit;
mod uniques;

use std::borrow::Cow;
use std::time::Instant;

use log::debug;

use crate::gearman::client::{JobEvent, JobMode, JobTag, Priority};
use crate::jwt::Keys;
use crate::metrics::{ErrorCode, Message, Metrics, Outcome};
use crate::random::Entropy;

use access::Access;
use clients::Clients;
use fields::Ref;
use joblog::Journals;
use jobs::{Jobs, Kind, Submission};
use links::Links;
use quota::{Quota, Submitter};
use relay::{RELAY_TAG, Relays};
use reply::{JobNews, Reply};
use reports::FORWARD_TAG;
use request::{Parsed, Request};
use status::{Asks, Status};
use stored::StoredValues;
use uniques::Uniques;

pub use access::{AccessConfig, UnixClock};
pub use reply::PING_ACK;
pub(crate) use reports::{DESK_PREFIX, is_trusted_peer};

/// A client connection: its slab key and the generation of that slot, so that a stale id (a
/// timer or job of a connection that has gone) never reaches the slot's next occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Slab key.
    pub key: u32,
    /// Generation of the slot.
    pub generation: u32,
}

/// Timers the App asks for. They are never cancelled: a timer whose job has ended finds a
/// different generation and does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppTimer {
    /// Ask gearmand for a background job's status (the article's periodic timer).
    Poll(JobTag),
    /// Stop waiting for a finished job's `worker.complete` value.
    Grace(JobTag),
    /// A held submission has waited long enough for a gearmand.
    QueueTimeout(JobTag),
    /// Drop stored values past their TTL.
    Sweep,
    /// A client that must authenticate has had `--handshake-timeout-ms` to do it.
    AuthDeadline(ConnId),
    /// A detached job's (or its kept log's) `--detach-grace-ms` may be over.
    Journal(u64),
    /// A relayed attach's owner has had `--relay-answer-ms` to answer it (the requester's
    /// relay id).
    RelayAnswer([u8; 12]),
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Queue a text frame to a client. Borrowed for the fixed replies (`got it!`), which
    /// then cost no allocation.
    Send(ConnId, Cow<'static, str>),
    /// Write a SUBMIT_JOB* to a gearmand link.
    Submit {
        /// Index of the gearmand link.
        link: usize,
        /// Names the job in the events that come back.
        tag: JobTag,
        /// Gearman function.
        function: Vec<u8>,
        /// Unique id as gearmand and the worker see it (empty: none).
        unique: Vec<u8>,
        /// Workload.
        payload: Vec<u8>,
        /// Foreground (stream) or background.
        mode: JobMode,
        /// Priority.
        priority: Priority,
    },
    /// Write a GET_STATUS to a gearmand link; its answer comes back with `ask`.
    GetStatus {
        /// Index of the gearmand link.
        link: usize,
        /// The job handle.
        handle: Vec<u8>,
        /// Names the question in the `StatusRes` / `StatusFailed` that answers it.
        ask: u64,
    },
    /// Arm a one-shot timer.
    Arm(Instant, AppTimer),
    /// This gearmand connection holds too many abandoned jobs: open a fresh connection to the
    /// same gearmand for new work, and call [`App::handle_link_retiring`] for this one.
    Retire(usize),
    /// A retiring connection has no live job left: close it (gearmand then drops its orphans).
    /// The App already counts it as down.
    CloseLink(usize),
    /// Close a client with 1008 and this reason (it did not authenticate).
    Close(ConnId, &'static str),
    /// A refusal of who-may-run-what, for the log's periodic summary.
    Note(crate::metrics::Denial),
}

/// Settings the App needs, copied out of `Config`.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Background status poll period.
    pub poll_interval: std::time::Duration,
    /// Wait this long for a value after the status turned false.
    pub value_grace: std::time::Duration,
    /// Keep unclaimed values this long.
    pub value_ttl: std::time::Duration,
    /// At most this many unclaimed values.
    pub max_stored_values: usize,
    /// At most this many bytes of unclaimed values.
    pub max_stored_bytes: usize,
    /// Unfinished jobs per connection.
    pub max_jobs_per_connection: usize,
    /// Submissions held while no gearmand is up.
    pub queue_limit: usize,
    /// How long a held submission waits.
    pub queue_timeout: std::time::Duration,
    /// Shared secret for `worker.complete`, if any.
    pub worker_token: Option<String>,
    /// Clients' uniques go to gearmand unchanged.
    pub shared_uniques: bool,
    /// Abandoned stream jobs per gearmand connection before it is retired.
    pub max_orphans: usize,
    /// Background jobs and pings one submitter (peer address) may have that gearmand has not
    /// finished, whether or not the connection that submitted them is still open.
    pub max_background_per_peer: usize,
    /// Largest packet from gearmand (for the reason given when one is over it).
    pub max_job_bytes: usize,
    /// This instance's id: its uniques start with `<id>.`, and reports forwarded to it arrive
    /// as jobs of `gearsock.report.<id>` (see [`App::desk_function`]).
    pub instance_id: String,
    /// Bytes queued for one gearmand above which it takes no new jobs ...
    pub link_out_high_bytes: usize,
    /// ... and below which it takes them again.
    pub link_out_low_bytes: usize,
    /// Who may run what: allowed functions, client tokens, the job rate.
    pub access: AccessConfig,
    /// How long a job whose client left, or its log once it ended, is kept for an `attach`
    /// (zero: abandoned at once).
    pub detach_grace: std::time::Duration,
    /// Bytes of events one job's log keeps.
    pub job_log_bytes: usize,
    /// Bytes of events all logs keep together.
    pub job_log_total_bytes: usize,
    /// The other instances an attach may be relayed to: the rest of this process's group and
    /// `--peer-instance`s. A resume token naming any other instance is answered `unknown_job`.
    pub peer_instances: Vec<String>,
    /// How long the owner of a relayed attach has to answer it (`--relay-answer-ms`).
    pub relay_answer: std::time::Duration,
}

/// Application state: the rooms, the effects not yet drained, and the metrics.
#[derive(Debug)]
pub struct App {
    cfg: AppConfig,
    jobs: Jobs,
    clients: Clients,
    links: Links,
    /// GET_STATUS questions gearmand has not answered yet.
    asks: Asks,
    stored: StoredValues,
    /// Each submitted job's owner and event log, also for a while after it ended.
    journals: Journals,
    uniques: Uniques,
    quota: Quota,
    access: Access,
    relays: Relays,
    effects: Vec<Effect>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
}

impl App {
    /// An App for `links` gearmand connections, all down. `entropy` makes the uniques.
    pub fn new(cfg: AppConfig, links: usize, entropy: Entropy) -> Self {
        App {
            jobs: Jobs::default(),
            clients: Clients::default(),
            links: Links::new(links, cfg.link_out_high_bytes, cfg.link_out_low_bytes),
            asks: Asks::default(),
            stored: StoredValues::new(cfg.max_stored_values, cfg.max_stored_bytes, cfg.value_ttl),
            journals: Journals::new(cfg.job_log_bytes, cfg.job_log_total_bytes),
            uniques: Uniques::new(entropy, cfg.instance_id.clone(), cfg.shared_uniques),
            quota: Quota::new(cfg.max_background_per_peer),
            access: Access::new(cfg.access.clone()),
            relays: Relays::new(cfg.max_job_bytes, &cfg.peer_instances, cfg.relay_answer),
            effects: Vec::new(),
            metrics: Metrics::default(),
            cfg,
        }
    }

    /// SIGHUP: what a running App takes anew (the server's reload decides what changed). The
    /// worker token and the allowed functions apply to every later message; new token keys
    /// apply while tokens are on (a rotation), to every later `auth`.
    pub fn reload(&mut self, worker_token: Option<String>, allow_functions: Vec<String>, keys: Option<Keys>) {
        self.cfg.worker_token = worker_token;
        self.access.reload(allow_functions, keys);
    }

    /// This instance's id (`--instance-id`, or drawn at startup).
    pub fn instance_id(&self) -> &str {
        &self.cfg.instance_id
    }

    /// The Gearman function this instance serves on every gearmand connection: other instances
    /// forward reports for its jobs there.
    pub fn desk_function(&self) -> String {
        format!("{DESK_PREFIX}{}", self.cfg.instance_id)
    }

    /// True when effects wait to be drained (the loop then polls without sleeping).
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty() || self.relays.has_outbox()
    }

    /// Moves the pending effects into `out` (which should be empty), keeping both allocations.
    /// Relay texts queued in this pass go out first, one message per relay where they fit.
    pub fn drain_effects(&mut self, out: &mut Vec<Effect>) {
        self.flush_relays();
        std::mem::swap(&mut self.effects, out);
    }

    /// Unfinished jobs of open clients, and of clients that left within their
    /// `--detach-grace-ms` (not the abandoned ones kept for their submitter's count).
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len() - self.quota.detached()
    }

    /// Relays this instance carries for its clients (attaches to jobs of other instances).
    pub fn relays_requested(&self) -> usize {
        self.relays.asked_len()
    }

    /// This instance's jobs attached from other instances.
    pub fn relays_served(&self) -> usize {
        self.relays.served_len()
    }

    /// Submissions held for a gearmand.
    pub fn jobs_queued(&self) -> usize {
        self.jobs.queued()
    }

    /// Unclaimed `worker.complete` values.
    pub fn stored_values(&self) -> usize {
        self.stored.len()
    }

    /// Their bytes.
    pub fn stored_bytes(&self) -> usize {
        self.stored.bytes()
    }

    /// True when gearmand link `link` is up but takes no new jobs because its output is over
    /// the high water mark.
    pub fn is_link_stalled(&self, link: usize) -> bool {
        self.links.is_up_and_stalled(link)
    }

    /// Queues a reply's text (made by [`Reply::text`]) to a client.
    fn send(&mut self, to: ConnId, text: Cow<'static, str>) {
        self.metrics.messages_out += 1;
        self.effects.push(Effect::Send(to, text));
    }

    fn error(&mut self, to: ConnId, code: ErrorCode, message: &str, reference: Option<&Ref>) {
        self.metrics.count_error(code);
        self.send(to, Reply::Error { code, message, reference }.text());
    }

    /// A client finished its handshake. `trusted` says whether it may report values without
    /// a token (see [`is_trusted_peer`]).
    /// Its background jobs and pings count against the unspecified address's quota: for the
    /// tests and benches; the server says where a client is ([`App::handle_client_open_from`]).
    /// No deadline to authenticate is armed: this entry point is given no time.
    pub fn handle_client_open(&mut self, id: ConnId, trusted: bool) {
        let namespace = self.uniques.namespace();
        self.clients.open(id, trusted, namespace, Submitter::peer(std::net::Ipv6Addr::UNSPECIFIED.into()));
        self.access.open(id, None);
    }

    /// A client from `peer` finished its handshake: its background jobs and pings count against
    /// that address's `--max-background-per-peer`. With client tokens on, `bearer` (the upgrade's
    /// `Authorization: Bearer`) is its first `auth`, and its deadline to authenticate starts.
    pub fn handle_client_open_from(
        &mut self,
        id: ConnId,
        trusted: bool,
        peer: std::net::IpAddr,
        bearer: Option<&str>,
        now: Instant,
    ) {
        let namespace = self.uniques.namespace();
        self.clients.open(id, trusted, namespace, Submitter::peer(peer));
        self.open_access(id, bearer, now);
    }

    /// A client has gone at `now`. Its jobs that gearmand named (not pings) are detached: they
    /// run on, their events logged, for `--detach-grace-ms`, so that a client can `attach`
    /// again. The others, and those whose grace ends, are abandoned ([`App::abandon`]):
    /// gearmand cannot cancel a foreground job, and forgets a queued one only when the
    /// connection that submitted it closes, so each unfinished stream job becomes an orphan of
    /// its gearmand connection, and a connection with too many is retired; a background job or
    /// ping gearmand was given is kept, without a client, and polled until gearmand forgets it,
    /// so that it still counts against its submitter's quota.
    pub fn handle_client_closed(&mut self, id: ConnId, now: Instant) {
        self.access.close(id);
        self.relays_client_closed(id);
        let Some(tags) = self.clients.close(id) else { return };
        self.detach_jobs(tags, now);
    }

    /// A binary message: the protocol is text only.
    pub fn handle_client_binary(&mut self, id: ConnId) {
        self.metrics.count_message(Message::Binary);
        self.error(id, ErrorCode::Binary, "binary frames are not part of the protocol; send JSON text", None);
    }

    /// One text message from a client.
    pub fn handle_client_text(&mut self, id: ConnId, text: &str, now: Instant) {
        // The hot message, read the short way when it has a report's common shape.
        if let Some(message) = scan::scan_report(text) {
            self.metrics.count_message(Message::WorkerComplete);
            return match message.reference {
                Err(refusal) => self.error(id, refusal.code, &refusal.text, None),
                Ok(r) => self.on_report(id, message.token, message.report, r.as_ref(), now),
            };
        }
        let Parsed { message, reference, request } = request::parse(text, self.uniques.max_client_bytes());
        self.metrics.count_message(message);
        let request = match request {
            Ok(request) => request,
            Err(refusal) => return self.error(id, refusal.code, &refusal.text, reference.as_ref()),
        };
        if let Request::Status { .. } = request
            && let Err(denied) = self.access.check_message(id)
        {
            return self.deny(id, denied, reference.as_ref());
        }
        match request {
            Request::Auth { token } => self.on_auth(id, &token, reference.as_ref(), now),
            Request::Report { token, report } => {
                self.on_report(id, token.as_deref(), report, reference.as_ref(), now)
            }
            Request::Ping => {
                if let Err(denied) = self.access.check_job(id, access::JobAsk::Ping, now) {
                    return self.deny(id, denied, reference.as_ref());
                }
                let submission = Submission {
                    function: b"ping".to_vec(),
                    payload: b"noop".to_vec(),
                    priority: Priority::Normal,
                };
                if self.accept_job(id, Kind::Ping, reference, submission, None, now).is_some() {
                    // The article answers at once, before anything is known about the job.
                    self.send(id, Reply::PingAck.text());
                }
            }
            Request::Submit { kind, submission, unique } => {
                let ask = access::JobAsk::Submit(&submission.function);
                if let Err(denied) = self.access.check_job(id, ask, now) {
                    return self.deny(id, denied, reference.as_ref());
                }
                self.accept_job(id, kind, reference, submission, unique, now);
            }
            Request::Status { handle } => self.on_status(id, &handle, reference),
            Request::Attach(ask) => self.on_attach(id, ask, reference.as_ref(), now),
        }
    }

    /// One event from a gearmand link's ClientSession.
    pub fn handle_job_event(&mut self, link: usize, event: JobEvent, now: Instant) {
        match event {
            JobEvent::Forwarded { unique, value } if relay_wire::is_relay(&unique) => {
                self.on_relay_message(link, &unique, &value, now)
            }
            JobEvent::Forwarded { unique, value } => self.on_forwarded(&unique, &value, now),
            JobEvent::Created { tag: FORWARD_TAG | RELAY_TAG, .. } => {}
            JobEvent::Rejected { tag: RELAY_TAG, code, message } => {
                debug!("gearmand refused a relay message: {code} {message}");
            }
            JobEvent::Rejected { tag: FORWARD_TAG, code, message } => {
                self.metrics.reports_forward_failed += 1;
                debug!("gearmand refused a forwarded report: {code} {message}");
            }
            JobEvent::Created { tag, handle } => self.on_created(link, tag, handle, now),
            JobEvent::Data { tag, data } => self.job_reply(tag, JobNews::Data(&data), now),
            JobEvent::Warning { tag, data } => self.job_reply(tag, JobNews::Warning(&data), now),
            JobEvent::Status { tag, numerator, denominator } => {
                let status = Status { known: true, running: true, numerator, denominator };
                self.job_reply(tag, JobNews::Status(status), now);
            }
            JobEvent::Complete { tag, data } => {
                self.job_reply(tag, JobNews::Result(&data), now);
                self.end_submission(link, tag, Outcome::Complete, now);
            }
            JobEvent::Failed { tag } => {
                self.job_reply(tag, JobNews::Failed("the worker reported failure"), now);
                self.end_submission(link, tag, Outcome::Failed, now);
            }
            JobEvent::Exception { tag, data } => {
                self.job_reply(tag, JobNews::Exception(&data), now);
                self.end_submission(link, tag, Outcome::Exception, now);
            }
            JobEvent::TooLarge { tag, kind, size_bytes } => {
                let reason = format!(
                    "the worker's {kind} of {size_bytes} bytes is over the server's limit of {} \
                     (--max-job-bytes); the job was dropped",
                    self.cfg.max_job_bytes
                );
                self.job_reply(tag, JobNews::Failed(&reason), now);
                self.end_submission(link, tag, Outcome::Failed, now);
            }
            JobEvent::Rejected { tag, code, message } => {
                let reason = format!("gearmand refused the job: {code} {message}");
                self.job_reply(tag, JobNews::Failed(&reason), now);
                self.end_submission(link, tag, Outcome::Rejected, now);
            }
            JobEvent::StatusRes { ask, handle: _, known, running, numerator, denominator } => {
                self.on_status_res(ask, Ok(Status { known, running, numerator, denominator }), now)
            }
            JobEvent::StatusFailed { ask, handle: _, code, message } => {
                self.on_status_res(ask, Err(format!("{code} {message}")), now)
            }
        }
    }

    /// One of the App's timers fired.
    pub fn handle_timer(&mut self, timer: AppTimer, now: Instant) {
        match timer {
            AppTimer::Poll(tag) => self.on_poll_timer(tag, now),
            AppTimer::Grace(tag) => {
                if self.jobs.get(tag).is_some_and(|j| matches!(j.phase(), jobs::Phase::Grace(_))) {
                    self.finish_polled(tag, now);
                }
            }
            AppTimer::QueueTimeout(tag) => self.on_queue_timeout(tag, now),
            AppTimer::Journal(id) => self.on_journal_timer(id, now),
            AppTimer::AuthDeadline(id) => self.on_auth_deadline(id),
            AppTimer::RelayAnswer(relay) => self.on_relay_deadline(relay, now),
            AppTimer::Sweep => {
                if let Some(at) = self.stored.sweep(now) {
                    self.effects.push(Effect::Arm(at, AppTimer::Sweep));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use serde_json::json;

    #[test]
    fn the_article_ping_word_for_word() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        let e = effects(&mut app);
        assert_eq!(sent(&e), vec![(A, PING_ACK)]);
        let tag = submitted(&e)[0];
        assert!(matches!(&e[0], Effect::Submit { function, payload, mode: JobMode::Background, .. }
            if function == b"ping" && payload == b"noop"));
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:vm:1".to_vec() }, t0);
        assert_eq!(
            effects(&mut app),
            vec![Effect::Arm(t0 + Duration::from_millis(100), AppTimer::Poll(tag))]
        );
        app.handle_timer(AppTimer::Poll(tag), t0 + Duration::from_millis(100));
        let e = effects(&mut app);
        let [Effect::GetStatus { link: 0, handle, ask }] = &e[..] else { panic!("{e:?}") };
        assert_eq!(handle, b"H:vm:1");
        // The worker reports while the job still runs.
        app.handle_client_text(A, r#"{"type":"worker.complete","id":"H:vm:1","value":"done"}"#, t0);
        assert_eq!(sent(&effects(&mut app)), vec![(A, "got it!")]);
        app.handle_job_event(0, gone(*ask, b"H:vm:1"), t0 + Duration::from_millis(101));
        assert_eq!(sent(&effects(&mut app)), vec![(A, "job: H:vm:1"), (A, "value: done")]);
        assert_eq!(app.jobs_in_flight(), 0);
        assert_eq!(app.stored_values(), 0, "a delivered value is not kept");
    }

    #[test]
    fn a_late_value_still_arrives_and_none_gives_an_empty_value() {
        let t0 = Instant::now();
        let mut app = up_app();
        for _ in 0..2 {
            app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        }
        let tags = submitted(&effects(&mut app));
        for (i, tag) in tags.iter().enumerate() {
            app.handle_job_event(0, JobEvent::Created { tag: *tag, handle: format!("H:vm:{i}").into() }, t0);
            let ask = poll(&mut app, *tag, t0);
            app.handle_job_event(0, gone(ask, format!("H:vm:{i}").as_bytes()), t0);
        }
        effects(&mut app);
        app.handle_client_text(A, r#"{"type":"worker.complete","id":"H:vm:0","value":"late"}"#, t0);
        assert_eq!(sent(&effects(&mut app)), vec![(A, "got it!"), (A, "value: late")]);
        app.handle_timer(AppTimer::Grace(tags[1]), t0 + Duration::from_millis(500));
        assert_eq!(sent(&effects(&mut app)), vec![(A, "value: ")]);
        app.handle_timer(AppTimer::Grace(tags[0]), t0 + Duration::from_millis(500));
        assert_eq!(effects(&mut app), vec![], "a finished job's timer does nothing");
    }

    #[test]
    fn stream_job_events_reach_only_their_client() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(B, r#"{"type":"submit","function":"reverse","payload":"abc","ref":"r1"}"#, t0);
        let tag = submitted(&effects(&mut app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"H:vm:9".to_vec() }, t0);
        app.handle_job_event(0, JobEvent::Status { tag, numerator: 1, denominator: 2 }, t0);
        app.handle_job_event(0, JobEvent::Data { tag, data: vec![0xff, 0] }, t0);
        app.handle_job_event(0, JobEvent::Complete { tag, data: b"cba".to_vec() }, t0);
        let e = effects(&mut app);
        let replies: Vec<Value> = sent(&e)
            .iter()
            .map(|(c, t)| {
                assert_eq!(*c, B);
                serde_json::from_str(t).unwrap()
            })
            .collect();
        let resume = replies[0]["resume"].as_str().unwrap();
        assert!(resume.starts_with("a1.1.") && resume.len() == 5 + 22, "{resume}");
        assert_eq!(
            replies[0],
            json!({"type":"job.created","job":"H:vm:9","ref":"r1","resume":resume,"seq":1})
        );
        assert_eq!((&replies[1]["numerator"], &replies[1]["seq"]), (&json!(1), &json!(2)));
        assert_eq!((&replies[2]["data_b64"], &replies[2]["seq"]), (&json!("/wA="), &json!(3)));
        assert_eq!(
            replies[3],
            json!({"type":"job.complete","job":"H:vm:9","result":"cba","ref":"r1","seq":4})
        );
        assert_eq!(app.jobs_in_flight(), 0);
    }
}
