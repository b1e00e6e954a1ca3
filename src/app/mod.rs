//! The application: what client messages mean and what each Gearman event tells which client.
//!
//! Sans-IO. Inputs arrive through `handle_*(…, now)`: client text, client open/close, Gearman job
//! events, gearmand links going up or down, and the App's own timers firing. Outputs are
//! [`Effect`]s the shell drains with [`App::drain_effects`]: text to send, jobs to submit, status
//! to ask, timers to arm. The App never touches a socket, the wheel or the clock.
//!
//! Jobs are keyed by a [`JobTag`] (slab key + generation) and, once gearmand names them, by the
//! link, that link's connection generation and the handle: a restarted gearmand hands out
//! `H:host:1` again, and an old job must never answer for a new one.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use slab::Slab;

use crate::gearman::client::{JobEvent, JobMode, JobTag, Priority};
use crate::gearman::packet;
use crate::metrics::{ErrorCode, Message, Metrics, Mode, Outcome};
use crate::random::Entropy;
use log::debug;

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
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Queue a text frame to a client.
    Send(ConnId, String),
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
}

/// The article's ping and the two modes of `submit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ping,
    Stream,
    Background,
}

impl Kind {
    fn mode(self) -> Mode {
        match self {
            Kind::Stream => Mode::Stream,
            Kind::Background => Mode::Background,
            Kind::Ping => Mode::Ping,
        }
    }
}

/// A job's phase.
///
/// ```text
/// Queued --link up--> Submitted --JOB_CREATED--> Running --status gone (bg)--> Grace --> end
///   |                     |                         |                              |
///   +-timeout-> end       +-ERROR/link lost-> end   +-WORK_COMPLETE/FAIL/EXCEPTION/link lost-> end
/// ```
/// A job holds its gearmand connection while `Submitted` or `Running` (`holds_link`).
#[derive(Debug)]
enum Phase {
    /// Waiting for a gearmand; holds what to submit.
    Queued(Box<Submission>),
    /// SUBMIT_JOB written on (link, link_gen); JOB_CREATED not yet back.
    Submitted,
    /// gearmand named it.
    Running,
    /// Gone from gearmand; waiting briefly for its `worker.complete` value.
    Grace,
}

#[derive(Debug)]
struct Submission {
    function: Vec<u8>,
    payload: Vec<u8>,
    priority: Priority,
}

/// A job's status as GET_STATUS answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Status {
    /// gearmand knows the job (it is queued or running).
    known: bool,
    /// A worker has it.
    running: bool,
    /// Progress, as the worker's WORK_STATUS said.
    numerator: u64,
    denominator: u64,
}

impl Status {
    /// What a failed poll leaves us with: gearmand cannot say.
    const UNKNOWN: Status = Status { known: false, running: false, numerator: 0, denominator: 0 };

    /// The body of a `job.status` reply.
    fn fields(self) -> Value {
        let Status { known, running, numerator, denominator } = self;
        json!({"numerator": numerator, "denominator": denominator, "known": known, "running": running})
    }
}

#[derive(Debug)]
struct Job {
    generation: u32,
    conn: ConnId,
    kind: Kind,
    reference: Option<Value>,
    phase: Phase,
    link: usize,
    link_gen: u32,
    handle: Option<Box<[u8]>>,
    /// The unique gearmand and the worker see (empty for a stream job without one).
    unique: Box<[u8]>,
    last_status: Option<Status>,
    value: Option<String>,
    next_poll: Instant,
    accepted_at: Instant,
}

impl Job {
    fn holds_link(&self) -> bool {
        matches!(self.phase, Phase::Submitted | Phase::Running)
    }
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

/// Who asked a GET_STATUS, so the answer reaches them even if the job has ended since.
#[derive(Debug)]
struct Ask {
    link: usize,
    link_gen: u32,
    handle: Box<[u8]>,
    by: Asker,
}

#[derive(Debug)]
enum Asker {
    /// The poll timer of a background job or ping.
    Poll(JobTag),
    /// A client's `status` message.
    Client { conn: ConnId, reference: Option<Value> },
}

#[derive(Debug, Default)]
struct Client {
    generation: u32,
    open: bool,
    trusted: bool,
    /// Prefix of this client's uniques on the gearmand side, so they never meet another
    /// client's (`--shared-uniques` leaves it empty).
    namespace: [u8; NAMESPACE_CHARS + 1],
    jobs: Vec<JobTag>,
}

/// A `worker.complete` value no live job claimed (the article stores them all).
#[derive(Debug)]
struct Stored {
    value: String,
    at: Instant,
    /// Which entry of `stored_order` is this value's (earlier ones for the key are stale).
    seq: u64,
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
    /// Largest packet from gearmand (for the reason given when one is over it).
    pub max_job_bytes: usize,
    /// This instance's id: its uniques start with `<id>.`, and reports forwarded to it arrive
    /// as jobs of `gearsock.report.<id>` (see [`App::desk_function`]).
    pub instance_id: String,
    /// Bytes queued for one gearmand above which it takes no new jobs ...
    pub link_out_high_bytes: usize,
    /// ... and below which it takes them again.
    pub link_out_low_bytes: usize,
}

/// A client message; every field optional so that a missing one gets a precise error.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    id: Option<Value>,
    value: Option<Value>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    function: Option<String>,
    payload: Option<String>,
    payload_b64: Option<String>,
    #[serde(borrow)]
    mode: Option<Cow<'a, str>>,
    #[serde(borrow)]
    priority: Option<Cow<'a, str>>,
    unique: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
    job: Option<String>,
}

/// The article's first answer to `ping`, word for word.
pub const PING_ACK: &str = "before the 'received' message";
/// gearmand keeps 63 bytes of a unique id.
const MAX_UNIQUE_BYTES: usize = 63;
/// Characters of a client's namespace (72 random bits), followed by `NAMESPACE_END`.
const NAMESPACE_CHARS: usize = 12;
const NAMESPACE_END: u8 = b'~';
/// Characters of a unique gearsock makes up for a job (96 random bits).
const RANDOM_UNIQUE_CHARS: usize = 16;
/// libgearman's limit on function names.
const MAX_FUNCTION_BYTES: usize = 512;
/// Ends the instance id at the start of every unique gearsock makes (ids cannot contain it).
const INSTANCE_END: u8 = b'.';
/// The desk function of instance `<id>` is this followed by the id.
pub const DESK_PREFIX: &str = "gearsock.report.";
/// The tag of a report forwarded to another instance: no job of ours answers to it.
const FORWARD_TAG: JobTag = JobTag(u64::MAX);

/// Application state: jobs, clients, links, stored values, metrics.
#[derive(Debug)]
pub struct App {
    cfg: AppConfig,
    jobs: Slab<Job>,
    next_gen: u32,
    clients: Vec<Client>,
    links: Vec<Link>,
    next_link: usize,
    queue: VecDeque<JobTag>,
    queued: usize,
    /// Background jobs and pings by the unique gearmand and their worker see.
    by_unique: HashMap<Box<[u8]>, Vec<JobTag>>,
    /// GET_STATUS questions gearmand has not answered yet.
    asks: Slab<Ask>,
    stored: HashMap<Box<str>, Stored>,
    /// Keys oldest first, each with the `seq` of the value it was pushed for. A value claimed
    /// or overwritten leaves a stale entry behind; stale entries are skipped, and dropped in
    /// bulk once they outnumber the live ones (so the deque stays within twice the store).
    stored_order: VecDeque<(Box<str>, u64)>,
    stored_seq: u64,
    stored_bytes: usize,
    sweep_armed: bool,
    entropy: Entropy,
    effects: Vec<Effect>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
}

fn tag_of(key: usize, generation: u32) -> JobTag {
    JobTag((u64::from(generation) << 32) | key as u64)
}

fn split_tag(tag: JobTag) -> (usize, u32) {
    ((tag.0 & 0xffff_ffff) as usize, (tag.0 >> 32) as u32)
}

/// Bytes as a JSON field: `name` when UTF-8, `name_b64` otherwise.
fn put_bytes(obj: &mut Value, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => obj[name] = Value::from(text),
        Err(_) => obj[format!("{name}_b64")] = base64::engine::general_purpose::STANDARD.encode(bytes).into(),
    }
}

fn handle_text(handle: &[u8]) -> String {
    String::from_utf8_lossy(handle).into_owned()
}

impl App {
    /// An App for `links` gearmand connections, all down. `entropy` makes the uniques.
    pub fn new(cfg: AppConfig, links: usize, entropy: Entropy) -> Self {
        App {
            cfg,
            jobs: Slab::new(),
            next_gen: 0,
            clients: Vec::new(),
            links: (0..links).map(|_| Link::default()).collect(),
            next_link: 0,
            queue: VecDeque::new(),
            queued: 0,
            by_unique: HashMap::new(),
            asks: Slab::new(),
            stored: HashMap::new(),
            stored_order: VecDeque::new(),
            stored_seq: 0,
            stored_bytes: 0,
            sweep_armed: false,
            entropy,
            effects: Vec::new(),
            metrics: Metrics::default(),
        }
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
        !self.effects.is_empty()
    }

    /// Moves the pending effects into `out` (which should be empty), keeping both allocations.
    pub fn drain_effects(&mut self, out: &mut Vec<Effect>) {
        std::mem::swap(&mut self.effects, out);
    }

    /// Unfinished jobs.
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Submissions held for a gearmand.
    pub fn jobs_queued(&self) -> usize {
        self.queued
    }

    /// Unclaimed `worker.complete` values.
    pub fn stored_values(&self) -> usize {
        self.stored.len()
    }

    /// Their bytes.
    pub fn stored_bytes(&self) -> usize {
        self.stored_bytes
    }

    /// True when gearmand link `link` is up but takes no new jobs because its output is over
    /// the high water mark.
    pub fn is_link_stalled(&self, link: usize) -> bool {
        self.links.get(link).is_some_and(|l| l.up && l.stalled)
    }

    fn client(&mut self, id: ConnId) -> Option<&mut Client> {
        self.clients.get_mut(id.key as usize).filter(|c| c.open && c.generation == id.generation)
    }

    fn job(&mut self, tag: JobTag) -> Option<&mut Job> {
        let (key, generation) = split_tag(tag);
        self.jobs.get_mut(key).filter(|j| j.generation == generation)
    }

    fn send(&mut self, to: ConnId, text: String) {
        self.metrics.messages_out += 1;
        self.effects.push(Effect::Send(to, text));
    }

    fn error(&mut self, to: ConnId, code: ErrorCode, message: &str, reference: Option<&Value>) {
        self.metrics.count_error(code);
        let mut reply = json!({"type": "error", "code": code.name(), "message": message});
        if let Some(r) = reference {
            reply["ref"] = r.clone();
        }
        self.send(to, reply.to_string());
    }

    /// A JSON reply about a job: `type`, `job` (its handle, or null before gearmand named it),
    /// the job's `ref` if it had one, and `fields`.
    fn job_reply(&mut self, tag: JobTag, kind: &str, fields: Value) {
        let Some(job) = self.job(tag) else { return };
        let mut reply = json!({"type": kind});
        reply["job"] = job.handle.as_deref().map_or(Value::Null, |h| handle_text(h).into());
        if let Value::Object(map) = fields {
            for (k, v) in map {
                reply[k] = v;
            }
        }
        if let Some(r) = &job.reference {
            reply["ref"] = r.clone();
        }
        let conn = job.conn;
        self.send(conn, reply.to_string());
    }

    /// A client finished its handshake. `trusted` says whether it may report values without
    /// a token (see [`is_trusted_peer`]).
    pub fn handle_client_open(&mut self, id: ConnId, trusted: bool) {
        let key = id.key as usize;
        if self.clients.len() <= key {
            self.clients.resize_with(key + 1, Client::default);
        }
        // Inline rather than a Vec: every open connection carries one.
        let mut namespace = [NAMESPACE_END; NAMESPACE_CHARS + 1];
        if !self.cfg.shared_uniques {
            self.entropy.fill_id(&mut namespace[..NAMESPACE_CHARS]);
        }
        self.clients[key] =
            Client { generation: id.generation, open: true, trusted, namespace, jobs: Vec::new() };
    }

    /// A client has gone: its jobs stop being watched. gearmand cannot cancel a foreground job;
    /// it forgets a queued one only when the connection that submitted it closes. So each
    /// unfinished stream job becomes an orphan of its gearmand connection, and a connection
    /// with too many is retired.
    pub fn handle_client_closed(&mut self, id: ConnId) {
        let Some(client) = self.client(id) else { return };
        client.open = false;
        for tag in std::mem::take(&mut client.jobs) {
            if let Some(job) = self.job(tag)
                && job.kind == Kind::Stream
                && job.holds_link()
            {
                let (link, link_gen) = (job.link, job.link_gen);
                let l = &mut self.links[link];
                if l.up && l.generation == link_gen {
                    l.orphans.insert(tag);
                }
            }
            self.end_job(tag, Outcome::Abandoned);
        }
        for (i, link) in self.links.iter().enumerate() {
            if link.up && !link.retiring && link.orphans.len() > self.cfg.max_orphans {
                self.effects.push(Effect::Retire(i));
            }
        }
    }

    /// A binary message: the protocol is text only.
    pub fn handle_client_binary(&mut self, id: ConnId) {
        self.metrics.count_message(Message::Binary);
        self.error(id, ErrorCode::Binary, "binary frames are not part of the protocol; send JSON text", None);
    }

    /// One text message from a client.
    pub fn handle_client_text(&mut self, id: ConnId, text: &str, now: Instant) {
        let msg: Incoming = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.count_message(Message::Invalid);
                return match e.classify() {
                    serde_json::error::Category::Data => self.error(
                        id,
                        ErrorCode::BadRequest,
                        &format!("message has the wrong shape: {e}"),
                        None,
                    ),
                    _ => self.error(id, ErrorCode::BadJson, &format!("message is not valid JSON: {e}"), None),
                };
            }
        };
        let kind = msg.kind.as_deref().unwrap_or("");
        self.metrics.count_message(Message::from_type(kind));
        match kind {
            "worker.complete" => self.on_worker_complete(id, msg, now),
            "ping" => self.on_ping(id, msg.reference, now),
            "submit" => self.on_submit(id, msg, now),
            "status" => self.on_status(id, msg),
            "" if msg.kind.is_none() => {
                self.error(id, ErrorCode::BadRequest, "missing \"type\"", msg.reference.as_ref())
            }
            other => {
                let text = format!("unknown type {other:?}; known: ping, worker.complete, submit, status");
                self.error(id, ErrorCode::UnknownType, &text, msg.reference.as_ref())
            }
        }
    }

    fn on_worker_complete(&mut self, id: ConnId, msg: Incoming, now: Instant) {
        let r = msg.reference.as_ref();
        if let Err(why) = self.may_report(id, msg.token.as_deref()) {
            return self.error(id, ErrorCode::Forbidden, why, r);
        }
        let value = match msg.value {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => return self.error(id, ErrorCode::BadRequest, "worker.complete needs \"value\"", r),
        };
        if let Some(unique) = msg.unique {
            return self.report_by_unique(id, &unique, &value, r);
        }
        let handle = match msg.id {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                let text = "worker.complete needs \"unique\" (from GRAB_JOB_UNIQ) or \"id\" (a job handle)";
                return self.error(id, ErrorCode::BadRequest, text, r);
            }
        };
        match self.jobs_with_handle(handle.as_bytes()) {
            HandleOwners::None => {
                // The article's server stores every value; a worker may report before our
                // JOB_CREATED was read. Kept until claimed or its TTL.
                self.send(id, "got it!".to_string());
                self.store_value(handle, value, now);
            }
            HandleOwners::One(tags) => {
                self.send(id, "got it!".to_string());
                self.deliver_value(&tags, &value);
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
        let trusted = self.client(id).is_some_and(|c| c.trusted);
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
    fn report_by_unique(&mut self, id: ConnId, unique: &str, value: &str, r: Option<&Value>) {
        let takers = self.by_unique.get(unique.as_bytes()).cloned().unwrap_or_default();
        if !takers.is_empty() {
            self.send(id, "got it!".to_string());
            return self.deliver_value(&takers, value);
        }
        match self.owner_elsewhere(unique) {
            Some(owner) => self.forward_report(id, owner, unique, value, r),
            None => {
                let text = "no unfinished background job has that unique";
                self.error(id, ErrorCode::UnknownJob, text, r)
            }
        }
    }

    /// The instance a unique names, when it is not this one: the part before its first `.`,
    /// if that can be an instance id.
    fn owner_elsewhere<'u>(&self, unique: &'u str) -> Option<&'u str> {
        let (owner, _) = unique.split_once(char::from(INSTANCE_END))?;
        (owner != self.cfg.instance_id && crate::random::is_instance_id(owner)).then_some(owner)
    }

    /// The job of this report lives on instance `owner`: leave it at that instance's desk as a
    /// background job whose unique is the job's own (so repeated reports for one job coalesce
    /// in gearmand while the first waits). The owner delivers it as if reported there.
    fn forward_report(&mut self, id: ConnId, owner: &str, unique: &str, value: &str, r: Option<&Value>) {
        let Some(link) = self.pick_link() else {
            let text = "the job belongs to another gearsock instance, and no gearmand is taking jobs \
                        to forward the report through";
            return self.error(id, ErrorCode::Unavailable, text, r);
        };
        let function = format!("{DESK_PREFIX}{owner}").into_bytes();
        let (unique, payload) = (unique.as_bytes().to_vec(), value.as_bytes().to_vec());
        self.count_submit(link, &[&function, &unique, &payload]);
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
        self.send(id, "got it!".to_string());
    }

    /// A report another instance forwarded to this one's desk: delivered exactly as a local
    /// report with that unique would be (a unique no live job has is dropped: its job ended).
    fn on_forwarded(&mut self, unique: &[u8], value: &[u8]) {
        let takers = self.by_unique.get(unique).cloned().unwrap_or_default();
        self.metrics.count_report_received(!takers.is_empty());
        if takers.is_empty() {
            return debug!("forwarded report for unique {:?}: no live job", unique.escape_ascii());
        }
        self.deliver_value(&takers, &String::from_utf8_lossy(value));
    }

    /// Which live jobs gearmand named `handle`: one gearmand job (on one connection, possibly
    /// several coalesced submissions of one client), or jobs on several connections.
    fn jobs_with_handle(&self, handle: &[u8]) -> HandleOwners {
        let mut owners = self.links.iter().filter(|l| l.up).filter_map(|l| l.handles.get(handle));
        match (owners.next(), owners.next()) {
            (None, _) => HandleOwners::None,
            (Some(tags), None) => HandleOwners::One(tags.clone()),
            (Some(_), Some(_)) => HandleOwners::Several,
        }
    }

    /// Gives a reported value to `takers` (stream jobs have their own result and ignore it).
    fn deliver_value(&mut self, takers: &[JobTag], value: &str) {
        for &tag in takers {
            let Some(job) = self.job(tag) else { continue };
            if job.kind == Kind::Stream {
                continue;
            }
            job.value = Some(value.to_string());
            if matches!(job.phase, Phase::Grace) {
                self.finish_polled(tag);
            }
        }
    }

    fn store_value(&mut self, handle: String, value: String, now: Instant) {
        self.stored_seq += 1;
        let seq = self.stored_seq;
        if let Some(s) = self.stored.get_mut(handle.as_str()) {
            // Replaced in place and moved to the back with its new time; if that pushes the
            // store over its bytes, the oldest go below.
            self.stored_bytes = self.stored_bytes - s.value.len() + value.len();
            *s = Stored { value, at: now, seq };
            match self.stored_order.back_mut() {
                // Already the newest: it stays at the back with its new seq (no stale entry).
                Some((key, last)) if **key == *handle => *last = seq,
                _ => self.stored_order.push_back((handle.into(), seq)),
            }
            self.evict_stored(0, 0);
            return self.compact_stored_order();
        }
        if value.len() > self.cfg.max_stored_bytes {
            return; // larger than the whole store: nothing to keep
        }
        self.evict_stored(1, value.len());
        let key: Box<str> = handle.into();
        self.stored_order.push_back((key.clone(), seq));
        self.stored_bytes += value.len();
        self.stored.insert(key, Stored { value, at: now, seq });
        self.compact_stored_order();
        if !self.sweep_armed {
            self.sweep_armed = true;
            self.effects.push(Effect::Arm(now + self.cfg.value_ttl, AppTimer::Sweep));
        }
    }

    /// Drops the oldest stored values until `values` more of `bytes` in all fit.
    fn evict_stored(&mut self, values: usize, bytes: usize) {
        while self.stored.len() + values > self.cfg.max_stored_values.max(1)
            || self.stored_bytes + bytes > self.cfg.max_stored_bytes
        {
            let Some((oldest, seq)) = self.stored_order.pop_front() else { break };
            if self.stored.get(&oldest).is_some_and(|s| s.seq == seq) {
                self.take_stored(&oldest);
            }
        }
    }

    /// Drops stale entries of `stored_order` once they outnumber the live ones: amortised
    /// O(1) per store, and the deque never holds more than about twice the store.
    fn compact_stored_order(&mut self) {
        if self.stored_order.len() > 2 * self.stored.len() + 64 {
            let stored = &self.stored;
            self.stored_order.retain(|(key, seq)| stored.get(key).is_some_and(|s| s.seq == *seq));
        }
    }

    /// Takes a stored value out of the store.
    fn take_stored(&mut self, handle: &str) -> Option<Stored> {
        let stored = self.stored.remove(handle)?;
        self.stored_bytes -= stored.value.len();
        Some(stored)
    }

    fn sweep(&mut self, now: Instant) {
        self.sweep_armed = false;
        // Oldest first; a value overwritten since goes to the back with its new time.
        for _ in 0..self.stored_order.len() {
            let Some((key, seq)) = self.stored_order.pop_front() else { break };
            match self.stored.get(&key) {
                Some(s) if s.seq != seq => {} // stale: the value moved to the back
                Some(s) if s.at + self.cfg.value_ttl <= now => {
                    self.take_stored(&key);
                }
                Some(_) => {
                    self.stored_order.push_front((key, seq));
                    break;
                }
                None => {} // claimed
            }
        }
        if let Some(first) = self.stored_order.front().and_then(|(k, _)| self.stored.get(k)) {
            self.sweep_armed = true;
            let at = (first.at + self.cfg.value_ttl).max(now + self.cfg.value_ttl / 16);
            self.effects.push(Effect::Arm(at, AppTimer::Sweep));
        }
    }

    fn on_ping(&mut self, id: ConnId, reference: Option<Value>, now: Instant) {
        let submission =
            Submission { function: b"ping".to_vec(), payload: b"noop".to_vec(), priority: Priority::Normal };
        if self.accept_job(id, Kind::Ping, reference, submission, None, now).is_some() {
            // The article answers at once, before anything is known about the job.
            self.send(id, PING_ACK.to_string());
        }
    }

    fn on_submit(&mut self, id: ConnId, msg: Incoming, now: Instant) {
        let r = msg.reference.as_ref();
        let Some(function) = msg.function.filter(|f| !f.is_empty()) else {
            return self.error(id, ErrorCode::BadRequest, "submit needs \"function\"", r);
        };
        if function.len() > MAX_FUNCTION_BYTES || function.contains('\0') {
            return self.error(
                id,
                ErrorCode::BadRequest,
                "function names are at most 512 bytes, without NUL",
                r,
            );
        }
        let payload = match (msg.payload, msg.payload_b64) {
            (Some(p), None) => p.into_bytes(),
            (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return self.error(
                        id,
                        ErrorCode::BadRequest,
                        &format!("payload_b64 is not base64: {e}"),
                        r,
                    );
                }
            },
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return self.error(
                    id,
                    ErrorCode::BadRequest,
                    "send \"payload\" or \"payload_b64\", not both",
                    r,
                );
            }
        };
        let kind = match msg.mode.as_deref() {
            None | Some("stream") => Kind::Stream,
            Some("background") => Kind::Background,
            Some(other) => {
                let text = format!("mode must be \"stream\" or \"background\", not {other:?}");
                return self.error(id, ErrorCode::BadRequest, &text, r);
            }
        };
        let priority = match msg.priority.as_deref() {
            None | Some("normal") => Priority::Normal,
            Some("low") => Priority::Low,
            Some("high") => Priority::High,
            Some(other) => {
                let text = format!("priority must be \"low\", \"normal\" or \"high\", not {other:?}");
                return self.error(id, ErrorCode::BadRequest, &text, r);
            }
        };
        let unique = msg.unique.filter(|u| !u.is_empty());
        if let Some(u) = &unique {
            let max = self.max_client_unique_bytes();
            if u.len() > max || u.contains('\0') {
                let text = format!("unique ids are at most {max} bytes, without NUL");
                return self.error(id, ErrorCode::BadRequest, &text, r);
            }
        }
        let submission = Submission { function: function.into_bytes(), payload, priority };
        self.accept_job(id, kind, msg.reference, submission, unique, now);
    }

    /// gearmand keeps 63 bytes of a unique; a client's namespace takes its share of them.
    fn max_client_unique_bytes(&self) -> usize {
        if self.cfg.shared_uniques {
            return MAX_UNIQUE_BYTES;
        }
        MAX_UNIQUE_BYTES.saturating_sub(self.cfg.instance_id.len() + 1 + NAMESPACE_CHARS + 1)
    }

    /// `<instance id>.`, with room for `extra` more bytes.
    fn instance_prefix(&self, extra: usize) -> Vec<u8> {
        let mut unique = Vec::with_capacity(self.cfg.instance_id.len() + 1 + extra);
        unique.extend_from_slice(self.cfg.instance_id.as_bytes());
        unique.push(INSTANCE_END);
        unique
    }

    /// The unique gearmand and the worker see: `<instance id>.` and then the client's own in
    /// its namespace, or for a background job or ping without one a fresh random id (so a
    /// report can name it, and reach this instance from any other); a stream job without one
    /// gets none (nothing is reported for it). `--shared-uniques` passes a client's unchanged.
    fn gearman_unique(&mut self, id: ConnId, kind: Kind, unique: Option<String>) -> Vec<u8> {
        match unique {
            Some(u) if self.cfg.shared_uniques => u.into_bytes(),
            Some(u) => {
                let mut full = self.instance_prefix(NAMESPACE_CHARS + 1 + u.len());
                if let Some(c) = self.client(id) {
                    full.extend_from_slice(&c.namespace);
                }
                full.extend_from_slice(u.as_bytes());
                full
            }
            None if kind == Kind::Stream => Vec::new(),
            None => {
                let mut full = self.instance_prefix(RANDOM_UNIQUE_CHARS);
                full.extend_from_slice(&self.entropy.id(RANDOM_UNIQUE_CHARS));
                full
            }
        }
    }

    /// Admits a job for a client: checks its limits, then submits it to a gearmand or holds it
    /// until one takes work. Replies with an error and returns None when it cannot.
    fn accept_job(
        &mut self,
        id: ConnId,
        kind: Kind,
        reference: Option<Value>,
        submission: Submission,
        unique: Option<String>,
        now: Instant,
    ) -> Option<JobTag> {
        let max_jobs = self.cfg.max_jobs_per_connection;
        let client = self.client(id)?;
        if client.jobs.len() >= max_jobs {
            let text = format!("at most {max_jobs} unfinished jobs per connection");
            self.error(id, ErrorCode::TooManyJobs, &text, reference.as_ref());
            return None;
        }
        let link = self.pick_link();
        if link.is_none() && self.queued >= self.cfg.queue_limit {
            let text = "no gearmand is taking jobs (disconnected or stalled) and the wait queue is full";
            self.error(id, ErrorCode::Unavailable, text, reference.as_ref());
            return None;
        }
        let unique = self.gearman_unique(id, kind, unique).into_boxed_slice();
        self.next_gen = self.next_gen.wrapping_add(1);
        let entry = self.jobs.vacant_entry();
        let tag = tag_of(entry.key(), self.next_gen);
        if kind != Kind::Stream {
            // Indexed from the start: a report may come before our JOB_CREATED is read.
            self.by_unique.entry(unique.clone()).or_default().push(tag);
        }
        entry.insert(Job {
            generation: self.next_gen,
            conn: id,
            kind,
            reference,
            phase: Phase::Queued(Box::new(submission)),
            link: 0,
            link_gen: 0,
            handle: None,
            unique,
            last_status: None,
            value: None,
            next_poll: now,
            accepted_at: now,
        });
        self.metrics.count_submitted(kind.mode());
        if let Some(client) = self.client(id) {
            client.jobs.push(tag);
        }
        match link {
            Some(link) => self.submit_to(tag, link),
            None => {
                self.queued += 1;
                self.queue.push_back(tag);
                if self.queue.len() > 2 * self.cfg.queue_limit.max(1) {
                    let jobs = &self.jobs;
                    self.queue.retain(|t| {
                        let (k, g) = split_tag(*t);
                        jobs.get(k).is_some_and(|j| j.generation == g && matches!(j.phase, Phase::Queued(_)))
                    });
                }
                self.effects.push(Effect::Arm(now + self.cfg.queue_timeout, AppTimer::QueueTimeout(tag)));
            }
        }
        Some(tag)
    }

    /// Round robin over the links that take work (up, not retiring, not stalled).
    fn pick_link(&mut self) -> Option<usize> {
        let n = self.links.len();
        (0..n).map(|i| (self.next_link + i) % n).find(|&i| self.links[i].takes_work()).inspect(|&i| {
            self.next_link = (i + 1) % n;
        })
    }

    fn submit_to(&mut self, tag: JobTag, link: usize) {
        let link_gen = self.links[link].generation;
        let Some(job) = self.job(tag) else { return };
        let Phase::Queued(sub) = std::mem::replace(&mut job.phase, Phase::Submitted) else { return };
        job.link = link;
        job.link_gen = link_gen;
        let mode = if job.kind == Kind::Stream { JobMode::Foreground } else { JobMode::Background };
        let unique = job.unique.to_vec();
        let Submission { function, payload, priority } = *sub;
        self.links[link].holding += 1;
        self.count_submit(link, &[&function, &unique, &payload]);
        self.effects.push(Effect::Submit { link, tag, function, unique, payload, mode, priority });
    }

    /// Adds what a SUBMIT_JOB* with these fields will add to the link's output, so a burst
    /// within one pass cannot route more than the high water mark to a link before the shell
    /// reports its figure.
    fn count_submit(&mut self, link: usize, fields: &[&[u8]; 3]) {
        let l = &mut self.links[link];
        l.out_bytes += packet::HEADER_BYTES + fields.iter().map(|f| f.len()).sum::<usize>() + 2;
        if l.out_bytes > self.cfg.link_out_high_bytes {
            l.stalled = true;
        }
    }

    /// Asks gearmand for a job's status on the connection that holds it.
    fn ask_status(&mut self, tag: JobTag, by: Asker) {
        let Some(job) = self.job(tag) else { return };
        let Some(handle) = job.handle.clone() else { return };
        let (link, link_gen) = (job.link, job.link_gen);
        let ask = self.asks.insert(Ask { link, link_gen, handle: handle.clone(), by }) as u64;
        let l = &mut self.links[link];
        l.out_bytes += packet::HEADER_BYTES + handle.len();
        self.effects.push(Effect::GetStatus { link, handle: handle.into_vec(), ask });
    }

    fn on_status(&mut self, id: ConnId, msg: Incoming) {
        let r = msg.reference.as_ref();
        let Some(handle) = msg.job else {
            return self.error(
                id,
                ErrorCode::BadRequest,
                "status needs \"job\" (a handle this connection got)",
                r,
            );
        };
        let Some(client) =
            self.clients.get(id.key as usize).filter(|c| c.open && c.generation == id.generation)
        else {
            return;
        };
        let mine = client.jobs.iter().rev().copied().find(|t| {
            let (k, g) = split_tag(*t);
            self.jobs.get(k).is_some_and(|j| {
                j.generation == g && j.holds_link() && j.handle.as_deref() == Some(handle.as_bytes())
            })
        });
        let Some(tag) = mine else {
            return self.error(
                id,
                ErrorCode::UnknownJob,
                "no unfinished job of this connection has that handle",
                r,
            );
        };
        // The answer is about the job: it carries the job's `ref`, unless the question had its own.
        let reference = msg.reference.or_else(|| self.job(tag).and_then(|j| j.reference.clone()));
        self.ask_status(tag, Asker::Client { conn: id, reference });
    }

    /// A gearmand connection answered (again): a new generation starts, held submissions go
    /// out.
    pub fn handle_link_up(&mut self, link: usize) {
        let l = &mut self.links[link];
        let generation = l.generation.wrapping_add(1);
        *l = Link { up: true, generation, ..Link::default() };
        self.submit_queued();
    }

    /// Held submissions go to the links that take work, while any does.
    fn submit_queued(&mut self) {
        while let Some(&tag) = self.queue.front() {
            if !self.job(tag).is_some_and(|j| matches!(j.phase, Phase::Queued(_))) {
                self.queue.pop_front();
                continue;
            }
            let Some(target) = self.pick_link() else { return };
            self.queue.pop_front();
            self.queued -= 1;
            self.submit_to(tag, target);
        }
    }

    /// The shell's count of bytes waiting for gearmand on `link`, after its flush. Above the
    /// high water mark the link takes no new jobs (they go to another link or wait in the
    /// queue); below the low one it takes them again.
    pub fn handle_link_output(&mut self, link: usize, bytes: usize) {
        let (high, low) = (self.cfg.link_out_high_bytes, self.cfg.link_out_low_bytes);
        let l = &mut self.links[link];
        l.out_bytes = bytes;
        if bytes > high {
            l.stalled = true;
        } else if l.stalled && bytes < low {
            l.stalled = false;
            self.submit_queued();
        }
    }

    /// The shell opened a fresh connection in place of `link` (after `Effect::Retire`): `link`
    /// takes no new work and is closed once the jobs it holds are done.
    pub fn handle_link_retiring(&mut self, link: usize) {
        let l = &mut self.links[link];
        if !l.up || l.retiring {
            return;
        }
        l.retiring = true;
        self.metrics.gearmand_retired += 1;
        self.close_if_retired(link);
    }

    fn close_if_retired(&mut self, link: usize) {
        let l = &mut self.links[link];
        if l.up && l.retiring && l.holding == 0 {
            l.up = false;
            l.handles.clear();
            l.orphans.clear();
            self.effects.push(Effect::CloseLink(link));
        }
    }

    /// A gearmand connection was lost: every job it held ends now, with exactly one terminal
    /// reply (`job.failed` for stream jobs, `job.lost` for background ones), and every
    /// question asked on it gets an answer.
    pub fn handle_link_down(&mut self, link: usize) {
        let l = &mut self.links[link];
        if !l.up {
            return;
        }
        l.up = false; // the jobs ended below no longer touch its indexes, reset at the end
        let generation = l.generation;
        let lost: Vec<JobTag> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.link == link && j.link_gen == generation && j.holds_link())
            .map(|(k, j)| tag_of(k, j.generation))
            .collect();
        for tag in lost {
            let Some(job) = self.job(tag) else { continue };
            let reason = "the gearmand connection that held this job was lost";
            if job.kind == Kind::Stream {
                self.job_reply(tag, "job.failed", json!({ "reason": reason }));
                self.end_job(tag, Outcome::Failed);
            } else {
                self.job_reply(tag, "job.lost", json!({ "reason": reason }));
                self.end_job(tag, Outcome::Lost);
            }
        }
        let unanswered: Vec<usize> = self
            .asks
            .iter()
            .filter(|(_, a)| a.link == link && a.link_gen == generation)
            .map(|(k, _)| k)
            .collect();
        for key in unanswered {
            let ask = self.asks.remove(key);
            if let Asker::Client { conn, reference } = ask.by {
                let text = "the gearmand connection was lost before it answered";
                self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
            }
        }
        self.links[link] = Link { generation, ..Link::default() };
    }

    /// The server is stopping: every unfinished job gets its one terminal reply now, so that a
    /// client can account for each job before its connection closes. A job still held for a
    /// gearmand was never submitted (`error` `unavailable`, as when the queue times out); one
    /// that gearmand has is `job.lost` to us (it may still run, but nobody will hear how it
    /// ends); a polled job gearmand has already forgotten ends as it would after its grace,
    /// with whatever value its worker reported. Open `status` questions get `unavailable`.
    pub fn handle_shutdown(&mut self) {
        let mut tags: Vec<(Instant, JobTag)> =
            self.jobs.iter().map(|(k, j)| (j.accepted_at, tag_of(k, j.generation))).collect();
        tags.sort_unstable_by_key(|(at, tag)| (*at, tag.0)); // oldest first
        for (_, tag) in tags {
            let Some(job) = self.job(tag) else { continue };
            match job.phase {
                Phase::Queued(_) => {
                    let (conn, reference) = (job.conn, job.reference.clone());
                    let text = "the server is shutting down; the job was not submitted";
                    self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
                    self.end_job(tag, Outcome::Unavailable);
                }
                Phase::Submitted | Phase::Running => {
                    let reason = "the server is shutting down; it will not hear how this job ends";
                    self.job_reply(tag, "job.lost", json!({ "reason": reason }));
                    self.end_job(tag, Outcome::Lost);
                }
                Phase::Grace => self.finish_polled(tag),
            }
        }
        for (_, ask) in std::mem::take(&mut self.asks) {
            if let Asker::Client { conn, reference } = ask.by {
                let text = "the server is shutting down before gearmand answered";
                self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
            }
        }
    }

    /// One event from a gearmand link's ClientSession.
    pub fn handle_job_event(&mut self, link: usize, event: JobEvent, now: Instant) {
        match event {
            JobEvent::Forwarded { unique, value } => self.on_forwarded(&unique, &value),
            JobEvent::Created { tag: FORWARD_TAG, .. } => {}
            JobEvent::Rejected { tag: FORWARD_TAG, code, message } => {
                self.metrics.reports_forward_failed += 1;
                debug!("gearmand refused a forwarded report: {code} {message}");
            }
            JobEvent::Created { tag, handle } => self.on_created(link, tag, handle, now),
            JobEvent::Data { tag, data } => self.stream_bytes(tag, "job.data", "data", &data),
            JobEvent::Warning { tag, data } => self.stream_bytes(tag, "job.warning", "data", &data),
            JobEvent::Status { tag, numerator, denominator } => {
                if self.job(tag).is_some() {
                    self.job_reply(
                        tag,
                        "job.status",
                        Status { known: true, running: true, numerator, denominator }.fields(),
                    );
                }
            }
            JobEvent::Complete { tag, data } => {
                if self.job(tag).is_some() {
                    self.stream_bytes(tag, "job.complete", "result", &data);
                }
                self.end_submission(link, tag, Outcome::Complete);
            }
            JobEvent::Failed { tag } => {
                self.job_reply(tag, "job.failed", json!({"reason": "the worker reported failure"}));
                self.end_submission(link, tag, Outcome::Failed);
            }
            JobEvent::Exception { tag, data } => {
                self.stream_bytes(tag, "job.exception", "data", &data);
                self.end_submission(link, tag, Outcome::Exception);
            }
            JobEvent::TooLarge { tag, kind, size_bytes } => {
                let reason = format!(
                    "the worker's {kind} of {size_bytes} bytes is over the server's limit of {} \
                     (--max-job-bytes); the job was dropped",
                    self.cfg.max_job_bytes
                );
                self.job_reply(tag, "job.failed", json!({ "reason": reason }));
                self.end_submission(link, tag, Outcome::Failed);
            }
            JobEvent::Rejected { tag, code, message } => {
                let reason = format!("gearmand refused the job: {code} {message}");
                self.job_reply(tag, "job.failed", json!({ "reason": reason }));
                self.end_submission(link, tag, Outcome::Rejected);
            }
            JobEvent::StatusRes { ask, handle: _, known, running, numerator, denominator } => {
                self.on_status_res(ask, Ok(Status { known, running, numerator, denominator }), now)
            }
            JobEvent::StatusFailed { ask, handle: _, code, message } => {
                self.on_status_res(ask, Err(format!("{code} {message}")), now)
            }
        }
    }

    /// The last event of a submission: its job ends, or, if its client has left, the orphan
    /// it left on `link` is gone from gearmand.
    fn end_submission(&mut self, link: usize, tag: JobTag, outcome: Outcome) {
        if self.job(tag).is_some() {
            return self.end_job(tag, outcome);
        }
        if let Some(l) = self.links.get_mut(link) {
            l.orphans.remove(&tag);
        }
    }

    fn stream_bytes(&mut self, tag: JobTag, kind: &str, field: &str, bytes: &[u8]) {
        if self.job(tag).is_some() {
            let mut fields = json!({});
            put_bytes(&mut fields, field, bytes);
            self.job_reply(tag, kind, fields);
        }
    }

    fn on_created(&mut self, link: usize, tag: JobTag, handle: Vec<u8>, now: Instant) {
        let interval = self.cfg.poll_interval;
        let link_gen = self.links[link].generation;
        let Some(job) = self.job(tag).filter(|j| j.link == link && j.link_gen == link_gen) else { return };
        job.phase = Phase::Running;
        job.handle = Some(handle.clone().into_boxed_slice());
        let (kind, accepted_at) = (job.kind, job.accepted_at);
        let handle: Box<[u8]> = handle.into_boxed_slice();
        if kind != Kind::Stream {
            // An id-only value reported for this handle after we submitted, while no other
            // connection has a job so named, can only be this job's (its worker reported
            // before our JOB_CREATED was read).
            let alone = matches!(self.jobs_with_handle(&handle), HandleOwners::None);
            let stored =
                std::str::from_utf8(&handle).ok().filter(|_| alone).and_then(|h| self.take_stored(h));
            if let Some(stored) = stored.filter(|s| s.at >= accepted_at)
                && let Some(job) = self.job(tag)
                && job.value.is_none()
            {
                job.value = Some(stored.value);
            }
            let Some(job) = self.job(tag) else { return };
            job.next_poll = now + interval;
            self.effects.push(Effect::Arm(now + interval, AppTimer::Poll(tag)));
        }
        self.links[link].handles.entry(handle).or_default().push(tag);
        if kind != Kind::Ping {
            self.job_reply(tag, "job.created", json!({}));
        }
    }

    /// The answer to a GET_STATUS: to the client who asked, or to a job's poll.
    fn on_status_res(&mut self, ask: u64, answer: Result<Status, String>, now: Instant) {
        let Some(ask) = usize::try_from(ask).ok().and_then(|k| self.asks.try_remove(k)) else { return };
        let tag = match ask.by {
            Asker::Client { conn, reference } => {
                return match answer {
                    Ok(status) => {
                        let mut reply = status.fields();
                        reply["type"] = "job.status".into();
                        reply["job"] = handle_text(&ask.handle).into();
                        if let Some(r) = reference {
                            reply["ref"] = r;
                        }
                        self.send(conn, reply.to_string());
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
        let Some(job) = self.job(tag).filter(|j| matches!(j.phase, Phase::Running)) else { return };
        let status = match answer {
            Ok(status) => status,
            Err(why) => {
                // gearmand cannot say what became of the job; it ends now rather than never.
                debug!("status poll of {:?} failed: {why}", ask.handle.escape_ascii());
                if job.kind == Kind::Background {
                    let reason = format!("gearmand answered the status poll with ERROR {why}");
                    self.job_reply(tag, "job.lost", json!({ "reason": reason }));
                    return self.end_job(tag, Outcome::Lost);
                }
                Status::UNKNOWN
            }
        };
        let changed = job.last_status != Some(status);
        job.last_status = Some(status);
        let kind = job.kind;
        if status.known {
            // Still known: poll again on the original grid, skipping missed beats.
            let mut at = job.next_poll + interval;
            while at <= now {
                at += interval;
            }
            job.next_poll = at;
            self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
            if changed && kind == Kind::Background {
                self.job_reply(tag, "job.status", status.fields());
            }
            return;
        }
        // gearmand no longer knows the job: it finished (or was lost in a restart). The job no
        // longer needs its connection.
        let (link, conn) = (job.link, job.conn);
        job.phase = Phase::Grace;
        let has_value = job.value.is_some();
        self.release_link(link);
        if kind == Kind::Ping {
            self.send(conn, format!("job: {}", handle_text(&ask.handle)));
        } else if changed {
            self.job_reply(tag, "job.status", status.fields());
        }
        if has_value {
            self.finish_polled(tag);
        } else {
            self.effects.push(Effect::Arm(now + self.cfg.value_grace, AppTimer::Grace(tag)));
        }
    }

    /// A job stopped holding `link`; a retiring link with nothing left closes.
    fn release_link(&mut self, link: usize) {
        let l = &mut self.links[link];
        l.holding = l.holding.saturating_sub(1);
        self.close_if_retired(link);
    }

    /// The last words about a polled job: `value: V` for a ping (the article's line, empty when
    /// no worker reported), `job.complete` for a background job.
    fn finish_polled(&mut self, tag: JobTag) {
        let Some(job) = self.job(tag) else { return };
        let value = job.value.take();
        let (kind, conn) = (job.kind, job.conn);
        if kind == Kind::Ping {
            self.send(conn, format!("value: {}", value.as_deref().unwrap_or("")));
        } else {
            self.job_reply(tag, "job.complete", json!({ "result": value }));
        }
        self.end_job(tag, if kind == Kind::Ping { Outcome::Done } else { Outcome::Complete });
    }

    /// One of the App's timers fired.
    pub fn handle_timer(&mut self, timer: AppTimer, now: Instant) {
        match timer {
            AppTimer::Poll(tag) => {
                let interval = self.cfg.poll_interval;
                let Some(link) = self.job(tag).filter(|j| matches!(j.phase, Phase::Running)).map(|j| j.link)
                else {
                    return;
                };
                if self.links[link].stalled {
                    let job = self.job(tag).expect("found above");
                    // gearmand is not taking our bytes: ask on the next beat instead of adding
                    // to a backlog.
                    job.next_poll += interval;
                    let at = job.next_poll.max(now + interval);
                    return self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
                }
                self.ask_status(tag, Asker::Poll(tag));
            }
            AppTimer::Grace(tag) => {
                if self.job(tag).is_some_and(|j| matches!(j.phase, Phase::Grace)) {
                    self.finish_polled(tag);
                }
            }
            AppTimer::QueueTimeout(tag) => {
                if self.job(tag).is_some_and(|j| matches!(j.phase, Phase::Queued(_))) {
                    let (conn, reference) = {
                        let job = self.job(tag).expect("checked above");
                        (job.conn, job.reference.clone())
                    };
                    let text = "no gearmand took the job in time; it was not submitted";
                    self.error(conn, ErrorCode::Unavailable, text, reference.as_ref());
                    self.end_job(tag, Outcome::Unavailable);
                }
            }
            AppTimer::Sweep => self.sweep(now),
        }
    }

    /// Removes a job everywhere it is indexed.
    fn end_job(&mut self, tag: JobTag, outcome: Outcome) {
        let (key, generation) = split_tag(tag);
        if self.jobs.get(key).is_none_or(|j| j.generation != generation) {
            return;
        }
        let job = self.jobs.remove(key);
        if matches!(job.phase, Phase::Queued(_)) {
            self.queued -= 1;
        }
        self.metrics.count_finished(job.kind.mode(), outcome);
        if let Some(client) = self.client(job.conn) {
            client.jobs.retain(|t| *t != tag);
        }
        if job.kind != Kind::Stream
            && let Some(tags) = self.by_unique.get_mut(&job.unique)
        {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                self.by_unique.remove(&job.unique);
            }
        }
        let link = &mut self.links[job.link];
        if link.generation != job.link_gen || !link.up {
            return;
        }
        if let Some(handle) = &job.handle
            && let Some(tags) = link.handles.get_mut(handle)
        {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                link.handles.remove(handle);
            }
        }
        if job.holds_link() {
            self.release_link(job.link);
        }
    }
}

/// Who holds a handle among the live jobs.
enum HandleOwners {
    None,
    /// Jobs on one connection: one gearmand job.
    One(Vec<JobTag>),
    /// Jobs on several connections: the handle alone cannot say which is meant.
    Several,
}

/// Compares a secret without an early exit, so the time taken does not reveal how many
/// leading bytes of a guess were right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
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
pub fn is_trusted_peer(peer: std::net::IpAddr, own_origin_or_none: bool, forwarded: bool) -> bool {
    let loopback = match peer {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    };
    loopback && own_origin_or_none && !forwarded
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> AppConfig {
        AppConfig {
            poll_interval: Duration::from_millis(100),
            value_grace: Duration::from_millis(500),
            value_ttl: Duration::from_secs(60),
            max_stored_values: 3,
            max_stored_bytes: 1000,
            max_jobs_per_connection: 2,
            queue_limit: 1,
            queue_timeout: Duration::from_secs(10),
            worker_token: None,
            shared_uniques: false,
            instance_id: "a1".into(),
            max_orphans: 3,
            max_job_bytes: 1 << 20,
            link_out_high_bytes: 4096,
            link_out_low_bytes: 1024,
        }
    }

    const A: ConnId = ConnId { key: 0, generation: 1 };
    const B: ConnId = ConnId { key: 1, generation: 1 };

    fn effects(app: &mut App) -> Vec<Effect> {
        let mut out = Vec::new();
        app.drain_effects(&mut out);
        out
    }

    fn sent(effects: &[Effect]) -> Vec<(ConnId, &str)> {
        effects
            .iter()
            .filter_map(|e| if let Effect::Send(c, t) = e { Some((*c, t.as_str())) } else { None })
            .collect()
    }

    fn submitted(effects: &[Effect]) -> Vec<JobTag> {
        effects
            .iter()
            .filter_map(|e| if let Effect::Submit { tag, .. } = e { Some(*tag) } else { None })
            .collect()
    }

    /// Fires a job's poll timer and returns the question it put to gearmand.
    fn poll(app: &mut App, tag: JobTag, now: Instant) -> u64 {
        app.handle_timer(AppTimer::Poll(tag), now);
        let e = effects(app);
        e.iter()
            .find_map(|e| if let Effect::GetStatus { ask, .. } = e { Some(*ask) } else { None })
            .expect("GET_STATUS")
    }

    /// gearmand's answer: it no longer knows the job.
    fn gone(ask: u64, handle: &[u8]) -> JobEvent {
        JobEvent::StatusRes {
            ask,
            handle: handle.to_vec(),
            known: false,
            running: false,
            numerator: 0,
            denominator: 0,
        }
    }

    fn up_app() -> App {
        let mut app = App::new(cfg(), 1, Entropy::counter());
        app.handle_link_up(0);
        app.handle_client_open(A, true);
        app.handle_client_open(B, false);
        app
    }

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
    fn values_are_bounded_expire_and_never_answer_a_new_job() {
        let t0 = Instant::now();
        let mut app = up_app();
        for i in 0..5 {
            let msg = format!(r#"{{"type":"worker.complete","id":{i},"value":"v{i}"}}"#);
            app.handle_client_text(A, &msg, t0);
        }
        assert_eq!(app.stored_values(), 3);
        // A job accepted after the value arrived, with the same handle, does not take it.
        let t1 = t0 + Duration::from_millis(1);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t1);
        let tag = submitted(&effects(&mut app))[0];
        app.handle_job_event(0, JobEvent::Created { tag, handle: b"4".to_vec() }, t0);
        let ask = poll(&mut app, tag, t0);
        app.handle_job_event(0, gone(ask, b"4"), t0);
        app.handle_timer(AppTimer::Grace(tag), t0 + Duration::from_secs(1));
        assert!(sent(&effects(&mut app)).contains(&(A, "value: ")));
        app.handle_timer(AppTimer::Sweep, t0 + Duration::from_secs(61));
        assert_eq!(app.stored_values(), 0);
    }

    #[test]
    fn untrusted_peers_and_bad_messages_get_errors() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(B, r#"{"type":"worker.complete","id":1,"value":"x"}"#, t0);
        app.handle_client_text(A, "{nope", t0);
        app.handle_client_text(A, r#"{"type":"dance"}"#, t0);
        app.handle_client_text(A, r#"{"id":1}"#, t0);
        app.handle_client_text(A, r#"{"type":"worker.complete","value":"x"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","ref":7}"#, t0);
        app.handle_client_text(A, "[1,2]", t0);
        let e = effects(&mut app);
        let codes: Vec<String> = sent(&e)
            .iter()
            .map(|(_, t)| serde_json::from_str::<Value>(t).unwrap()["code"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            codes,
            [
                "forbidden",
                "bad_json",
                "unknown_type",
                "bad_request",
                "bad_request",
                "bad_request",
                "bad_request"
            ]
        );
        assert!(sent(&e)[5].1.contains("\"ref\":7"));
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
        assert_eq!(replies[0], json!({"type":"job.created","job":"H:vm:9","ref":"r1"}));
        assert_eq!(replies[1]["numerator"], 1);
        assert_eq!(replies[2]["data_b64"], "/wA=");
        assert_eq!(replies[3], json!({"type":"job.complete","job":"H:vm:9","result":"cba","ref":"r1"}));
        assert_eq!(app.jobs_in_flight(), 0);
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
        app.handle_link_down(0);
        let kinds: Vec<String> = sent(&effects(&mut app))
            .iter()
            .map(|(_, t)| serde_json::from_str::<Value>(t).unwrap()["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["job.failed", "job.lost"]);
        app.handle_link_down(0);
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

    fn submits(effects: &[Effect]) -> Vec<(usize, JobTag, Vec<u8>)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Submit { link, tag, unique, .. } => Some((*link, *tag, unique.clone())),
                _ => None,
            })
            .collect()
    }

    fn codes(effects: &[Effect]) -> Vec<String> {
        sent(effects)
            .iter()
            .filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok())
            .filter_map(|v| v["code"].as_str().map(str::to_string))
            .collect()
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
        app.handle_link_down(0);
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

    #[test]
    fn uniques_live_in_each_clients_namespace_unless_shared() {
        let t0 = Instant::now();
        for shared in [false, true] {
            let mut app = App::new(AppConfig { shared_uniques: shared, ..cfg() }, 1, Entropy::counter());
            app.handle_link_up(0);
            app.handle_client_open(A, true);
            app.handle_client_open(B, true);
            for c in [A, B] {
                app.handle_client_text(c, r#"{"type":"submit","function":"f","unique":"invoice-42"}"#, t0);
            }
            let subs = submits(&effects(&mut app));
            let (ua, ub) = (&subs[0].2, &subs[1].2);
            assert!(ua.ends_with(b"invoice-42") && ub.ends_with(b"invoice-42"));
            assert_eq!(ua == ub, shared, "{:?} {:?}", ua.escape_ascii(), ub.escape_ascii());
            assert_eq!(ua.starts_with(b"a1."), !shared, "namespaced uniques name the instance");
            assert!(ua.len() <= MAX_UNIQUE_BYTES);
        }
        // The namespace takes its share of gearmand's 63 bytes.
        let mut app = up_app();
        let long = "u".repeat(MAX_UNIQUE_BYTES);
        app.handle_client_text(A, &json!({"type":"submit","function":"f","unique":long}).to_string(), t0);
        assert_eq!(codes(&effects(&mut app)), ["bad_request"]);
    }

    #[test]
    fn claimed_and_overwritten_values_leave_no_trail() {
        let t0 = Instant::now();
        let mut app = up_app();
        // A trusted reporter whose values are all claimed: the order list must not grow.
        for i in 0..100_000 {
            let handle = format!("H:{}", i % 7);
            app.store_value(handle.clone(), "v".into(), t0);
            assert!(app.take_stored(&handle).is_some());
        }
        assert!(app.stored_order.len() <= 64, "{} stale keys kept", app.stored_order.len());
        // Stored, claimed, stored again: the old entry must not evict the new value.
        app.store_value("H:a".into(), "old".into(), t0);
        app.take_stored("H:a");
        app.store_value("H:b".into(), "b".into(), t0);
        app.store_value("H:a".into(), "new".into(), t0);
        app.store_value("H:c".into(), "c".into(), t0); // the store holds three (cfg)
        app.store_value("H:d".into(), "d".into(), t0);
        assert!(app.stored.contains_key("H:a"), "the newest H:a outlives the older H:b");
        assert!(!app.stored.contains_key("H:b"));
        // Overwriting moves a value to the back, for the TTL as for eviction.
        let ttl = app.cfg.value_ttl;
        app.store_value("H:c".into(), "c2".into(), t0 + ttl / 2);
        app.sweep(t0 + ttl);
        assert_eq!(app.stored.keys().map(|k| &**k).collect::<Vec<_>>(), ["H:c"]);
    }

    #[test]
    fn stored_values_are_bounded_in_bytes_too() {
        let t0 = Instant::now();
        let mut app = up_app();
        let big = "x".repeat(400);
        for i in 0..3 {
            let msg = json!({"type":"worker.complete","id":format!("H:{i}"),"value":big});
            app.handle_client_text(A, &msg.to_string(), t0);
        }
        assert_eq!((app.stored_values(), app.stored_bytes()), (2, 800), "1000 bytes hold two of 400");
        let huge = json!({"type":"worker.complete","id":"H:9","value":"y".repeat(2000)});
        app.handle_client_text(A, &huge.to_string(), t0);
        assert_eq!(app.stored_bytes(), 800, "a value larger than the store is not kept");
    }

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
        app.handle_client_closed(leavers[0]);
        assert_eq!(effects(&mut app), vec![], "2 orphans are within the bound");
        app.handle_client_closed(leavers[1]);
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

        app.handle_shutdown();
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
        app.handle_shutdown();
        app.handle_job_event(0, JobEvent::Complete { tag: running, data: b"late".to_vec() }, t0);
        app.handle_timer(AppTimer::Grace(ping), t0 + Duration::from_secs(1));
        assert_eq!(sent(&effects(&mut app)), vec![]);
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
        app.handle_link_down(0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["unavailable"]);
        assert!(sent(&e)[0].1.contains("job.lost"));
    }
}
