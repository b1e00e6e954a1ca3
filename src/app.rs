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
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use slab::Slab;

use crate::config::Config;
use crate::gearman::client::{JobEvent, JobMode, JobTag, Priority};
use crate::metrics::{ERROR_CODES, MESSAGE_TYPES, Metrics};

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
        /// Unique id (empty: none).
        unique: Vec<u8>,
        /// Workload.
        payload: Vec<u8>,
        /// Foreground (stream) or background.
        mode: JobMode,
        /// Priority.
        priority: Priority,
    },
    /// Write a GET_STATUS to a gearmand link.
    GetStatus {
        /// Index of the gearmand link.
        link: usize,
        /// The job handle.
        handle: Vec<u8>,
    },
    /// Arm a one-shot timer.
    Arm(Instant, AppTimer),
}

/// The article's ping and the two modes of `submit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ping,
    Stream,
    Background,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Stream => 0,
            Kind::Background => 1,
            Kind::Ping => 2,
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
    unique: Vec<u8>,
    payload: Vec<u8>,
    priority: Priority,
}

/// Last status seen: known, running, numerator, denominator.
type StatusTuple = (bool, bool, u64, u64);

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
    last_status: Option<StatusTuple>,
    value: Option<String>,
    /// GET_STATUS sent for the poll timer / for the client's `status`, answers outstanding.
    polls_out: u32,
    asks_out: u32,
    next_poll: Instant,
    accepted_at: Instant,
}

/// A gearmand link as the App sees it.
#[derive(Debug, Default)]
struct Link {
    up: bool,
    generation: u32,
    /// Handle → jobs that gearmand named so, on this connection generation only.
    handles: HashMap<Box<[u8]>, Vec<JobTag>>,
}

#[derive(Debug, Default)]
struct Client {
    generation: u32,
    open: bool,
    trusted: bool,
    jobs: Vec<JobTag>,
}

/// A `worker.complete` value no live job claimed (the article stores them all).
#[derive(Debug)]
struct Stored {
    value: String,
    at: Instant,
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
    /// Unfinished jobs per connection.
    pub max_jobs_per_connection: usize,
    /// Submissions held while no gearmand is up.
    pub queue_limit: usize,
    /// How long a held submission waits.
    pub queue_timeout: std::time::Duration,
    /// Shared secret for `worker.complete`, if any.
    pub worker_token: Option<String>,
}

impl From<&Config> for AppConfig {
    fn from(c: &Config) -> Self {
        AppConfig {
            poll_interval: c.poll_interval,
            value_grace: c.value_grace,
            value_ttl: c.value_ttl,
            max_stored_values: c.max_stored_values,
            max_jobs_per_connection: c.max_jobs_per_connection,
            queue_limit: c.queue_limit,
            queue_timeout: c.queue_timeout,
            worker_token: c.worker_token.clone(),
        }
    }
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
/// libgearman's limit on function names.
const MAX_FUNCTION_BYTES: usize = 512;

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
    stored: HashMap<Box<str>, Stored>,
    stored_order: VecDeque<Box<str>>,
    sweep_armed: bool,
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

/// The body of a `job.status` reply.
fn status_fields((known, running, numerator, denominator): StatusTuple) -> Value {
    json!({"numerator": numerator, "denominator": denominator, "known": known, "running": running})
}

fn handle_text(handle: &[u8]) -> String {
    String::from_utf8_lossy(handle).into_owned()
}

impl App {
    /// An App for `links` gearmand servers, all down.
    pub fn new(cfg: AppConfig, links: usize) -> Self {
        App {
            cfg,
            jobs: Slab::new(),
            next_gen: 0,
            clients: Vec::new(),
            links: (0..links).map(|_| Link::default()).collect(),
            next_link: 0,
            queue: VecDeque::new(),
            queued: 0,
            stored: HashMap::new(),
            stored_order: VecDeque::new(),
            sweep_armed: false,
            effects: Vec::new(),
            metrics: Metrics::default(),
        }
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

    fn error(&mut self, to: ConnId, code: &'static str, message: &str, reference: Option<&Value>) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.metrics.errors[i] += 1;
        }
        let mut reply = json!({"type": "error", "code": code, "message": message});
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

    /// A client finished its handshake. `trusted` says whether its peer may report values
    /// without a token (a loopback address).
    pub fn handle_client_open(&mut self, id: ConnId, trusted: bool) {
        let key = id.key as usize;
        if self.clients.len() <= key {
            self.clients.resize_with(key + 1, Client::default);
        }
        self.clients[key] = Client { generation: id.generation, open: true, trusted, jobs: Vec::new() };
    }

    /// A client has gone: its jobs stop being watched. gearmand cannot cancel a running
    /// foreground job, so its events still come and are dropped by generation.
    pub fn handle_client_closed(&mut self, id: ConnId) {
        let Some(client) = self.client(id) else { return };
        client.open = false;
        for tag in std::mem::take(&mut client.jobs) {
            self.end_job(tag, "abandoned");
        }
    }

    /// A binary message: the protocol is text only.
    pub fn handle_client_binary(&mut self, id: ConnId) {
        self.metrics.messages_in[5] += 1;
        self.error(id, "binary", "binary frames are not part of the protocol; send JSON text", None);
    }

    /// One text message from a client.
    pub fn handle_client_text(&mut self, id: ConnId, text: &str, now: Instant) {
        let msg: Incoming = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.messages_in[4] += 1;
                return match e.classify() {
                    serde_json::error::Category::Data => {
                        self.error(id, "bad_request", &format!("message has the wrong shape: {e}"), None)
                    }
                    _ => self.error(id, "bad_json", &format!("message is not valid JSON: {e}"), None),
                };
            }
        };
        let kind = msg.kind.as_deref().unwrap_or("");
        if let Some(i) = MESSAGE_TYPES.iter().position(|t| *t == kind) {
            self.metrics.messages_in[i] += 1;
        } else {
            self.metrics.messages_in[4] += 1;
        }
        match kind {
            "worker.complete" => self.on_worker_complete(id, msg, now),
            "ping" => self.on_ping(id, msg.reference, now),
            "submit" => self.on_submit(id, msg, now),
            "status" => self.on_status(id, msg),
            "" if msg.kind.is_none() => {
                self.error(id, "bad_request", "missing \"type\"", msg.reference.as_ref())
            }
            other => {
                let text = format!("unknown type {other:?}; known: ping, worker.complete, submit, status");
                self.error(id, "unknown_type", &text, msg.reference.as_ref())
            }
        }
    }

    fn on_worker_complete(&mut self, id: ConnId, msg: Incoming, now: Instant) {
        let trusted = self.client(id).is_some_and(|c| c.trusted);
        let allowed = match &self.cfg.worker_token {
            Some(token) => msg.token.as_deref() == Some(token.as_str()),
            None => trusted,
        };
        if !allowed {
            let why = match self.cfg.worker_token {
                Some(_) => "worker.complete needs the right \"token\"",
                None => "worker.complete is only taken from loopback peers",
            };
            return self.error(id, "forbidden", why, msg.reference.as_ref());
        }
        let handle = match msg.id {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return self.error(id, "bad_request", "worker.complete needs \"id\" (a job handle)", None),
        };
        let value = match msg.value {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => return self.error(id, "bad_request", "worker.complete needs \"value\"", None),
        };
        self.send(id, "got it!".to_string());
        if !self.deliver_value(&handle, &value) {
            self.store_value(handle, value, now);
        }
    }

    /// Gives a reported value to the live jobs gearmand named `handle` on its current
    /// connections. Returns false if none took it.
    fn deliver_value(&mut self, handle: &str, value: &str) -> bool {
        let mut takers = Vec::new();
        for link in &self.links {
            if let Some(tags) = link.handles.get(handle.as_bytes()) {
                takers.extend(tags.iter().copied());
            }
        }
        let mut taken = false;
        for tag in takers {
            let Some(job) = self.job(tag) else { continue };
            if job.kind == Kind::Stream {
                continue;
            }
            job.value = Some(value.to_string());
            taken = true;
            if matches!(job.phase, Phase::Grace) {
                self.finish_polled(tag);
            }
        }
        taken
    }

    fn store_value(&mut self, handle: String, value: String, now: Instant) {
        if let Some(s) = self.stored.get_mut(handle.as_str()) {
            *s = Stored { value, at: now };
            return;
        }
        while self.stored.len() >= self.cfg.max_stored_values.max(1) {
            let Some(oldest) = self.stored_order.pop_front() else { break };
            self.stored.remove(&oldest);
        }
        let key: Box<str> = handle.into();
        self.stored_order.push_back(key.clone());
        self.stored.insert(key, Stored { value, at: now });
        if !self.sweep_armed {
            self.sweep_armed = true;
            self.effects.push(Effect::Arm(now + self.cfg.value_ttl, AppTimer::Sweep));
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.sweep_armed = false;
        // Oldest first; a value overwritten since goes to the back with its new time.
        for _ in 0..self.stored_order.len() {
            let Some(key) = self.stored_order.pop_front() else { break };
            match self.stored.get(&key) {
                Some(s) if s.at + self.cfg.value_ttl <= now => {
                    self.stored.remove(&key);
                }
                Some(_) => {
                    self.stored_order.push_front(key);
                    break;
                }
                None => {}
            }
        }
        if let Some(first) = self.stored_order.front().and_then(|k| self.stored.get(k)) {
            self.sweep_armed = true;
            let at = (first.at + self.cfg.value_ttl).max(now + self.cfg.value_ttl / 16);
            self.effects.push(Effect::Arm(at, AppTimer::Sweep));
        }
    }

    fn on_ping(&mut self, id: ConnId, reference: Option<Value>, now: Instant) {
        let submission = Submission {
            function: b"ping".to_vec(),
            unique: Vec::new(),
            payload: b"noop".to_vec(),
            priority: Priority::Normal,
        };
        if self.accept_job(id, Kind::Ping, reference, submission, now).is_some() {
            // The article answers at once, before anything is known about the job.
            self.send(id, PING_ACK.to_string());
        }
    }

    fn on_submit(&mut self, id: ConnId, msg: Incoming, now: Instant) {
        let r = msg.reference.as_ref();
        let Some(function) = msg.function.filter(|f| !f.is_empty()) else {
            return self.error(id, "bad_request", "submit needs \"function\"", r);
        };
        if function.len() > MAX_FUNCTION_BYTES || function.contains('\0') {
            return self.error(id, "bad_request", "function names are at most 512 bytes, without NUL", r);
        }
        let payload = match (msg.payload, msg.payload_b64) {
            (Some(p), None) => p.into_bytes(),
            (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return self.error(id, "bad_request", &format!("payload_b64 is not base64: {e}"), r);
                }
            },
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return self.error(id, "bad_request", "send \"payload\" or \"payload_b64\", not both", r);
            }
        };
        let kind = match msg.mode.as_deref() {
            None | Some("stream") => Kind::Stream,
            Some("background") => Kind::Background,
            Some(other) => {
                let text = format!("mode must be \"stream\" or \"background\", not {other:?}");
                return self.error(id, "bad_request", &text, r);
            }
        };
        let priority = match msg.priority.as_deref() {
            None | Some("normal") => Priority::Normal,
            Some("low") => Priority::Low,
            Some("high") => Priority::High,
            Some(other) => {
                let text = format!("priority must be \"low\", \"normal\" or \"high\", not {other:?}");
                return self.error(id, "bad_request", &text, r);
            }
        };
        let unique = msg.unique.unwrap_or_default();
        if unique.len() > MAX_UNIQUE_BYTES || unique.contains('\0') {
            return self.error(id, "bad_request", "unique ids are at most 63 bytes, without NUL", r);
        }
        let submission =
            Submission { function: function.into_bytes(), unique: unique.into_bytes(), payload, priority };
        self.accept_job(id, kind, msg.reference, submission, now);
    }

    /// Admits a job for a client: checks its limits, then submits it to a gearmand or holds it
    /// until one is up. Replies with an error and returns None when it cannot.
    fn accept_job(
        &mut self,
        id: ConnId,
        kind: Kind,
        reference: Option<Value>,
        submission: Submission,
        now: Instant,
    ) -> Option<JobTag> {
        let max_jobs = self.cfg.max_jobs_per_connection;
        let client = self.client(id)?;
        if client.jobs.len() >= max_jobs {
            let text = format!("at most {max_jobs} unfinished jobs per connection");
            self.error(id, "too_many_jobs", &text, reference.as_ref());
            return None;
        }
        let link = self.pick_link();
        if link.is_none() && self.queued >= self.cfg.queue_limit {
            self.error(
                id,
                "unavailable",
                "no gearmand is connected and the wait queue is full",
                reference.as_ref(),
            );
            return None;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let entry = self.jobs.vacant_entry();
        let tag = tag_of(entry.key(), self.next_gen);
        entry.insert(Job {
            generation: self.next_gen,
            conn: id,
            kind,
            reference,
            phase: Phase::Queued(Box::new(submission)),
            link: 0,
            link_gen: 0,
            handle: None,
            last_status: None,
            value: None,
            polls_out: 0,
            asks_out: 0,
            next_poll: now,
            accepted_at: now,
        });
        self.metrics.jobs_submitted[kind.index()] += 1;
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

    /// Round robin over the connected links.
    fn pick_link(&mut self) -> Option<usize> {
        let n = self.links.len();
        (0..n).map(|i| (self.next_link + i) % n).find(|&i| self.links[i].up).inspect(|&i| {
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
        let Submission { function, unique, payload, priority } = *sub;
        self.effects.push(Effect::Submit { link, tag, function, unique, payload, mode, priority });
    }

    fn on_status(&mut self, id: ConnId, msg: Incoming) {
        let r = msg.reference.as_ref();
        let Some(handle) = msg.job else {
            return self.error(id, "bad_request", "status needs \"job\" (a handle this connection got)", r);
        };
        let Some(client) =
            self.clients.get(id.key as usize).filter(|c| c.open && c.generation == id.generation)
        else {
            return;
        };
        let mine = client.jobs.iter().rev().copied().find(|t| {
            let (k, g) = split_tag(*t);
            self.jobs
                .get(k)
                .is_some_and(|j| j.generation == g && j.handle.as_deref() == Some(handle.as_bytes()))
        });
        let Some(tag) = mine else {
            return self.error(id, "unknown_job", "no unfinished job of this connection has that handle", r);
        };
        let job = self.job(tag).expect("found above");
        job.asks_out += 1;
        let link = job.link;
        self.effects.push(Effect::GetStatus { link, handle: handle.into_bytes() });
    }

    /// A gearmand link connected (again): a new generation starts, held submissions go out.
    pub fn handle_link_up(&mut self, link: usize) {
        let l = &mut self.links[link];
        l.up = true;
        l.generation = l.generation.wrapping_add(1);
        l.handles.clear();
        while let Some(tag) = self.queue.pop_front() {
            if self.job(tag).is_some_and(|j| matches!(j.phase, Phase::Queued(_))) {
                self.queued -= 1;
                let target = self.pick_link().unwrap_or(link);
                self.submit_to(tag, target);
            }
        }
    }

    /// A gearmand link was lost: every job it held ends now, with exactly one terminal reply
    /// (`job.failed` for stream jobs, `job.lost` for background ones).
    pub fn handle_link_down(&mut self, link: usize) {
        let l = &mut self.links[link];
        if !l.up {
            return;
        }
        l.up = false;
        l.handles.clear();
        let generation = l.generation;
        let lost: Vec<JobTag> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.link == link
                    && j.link_gen == generation
                    && matches!(j.phase, Phase::Submitted | Phase::Running)
            })
            .map(|(k, j)| tag_of(k, j.generation))
            .collect();
        for tag in lost {
            let Some(job) = self.job(tag) else { continue };
            let reason = "the gearmand connection that held this job was lost";
            if job.kind == Kind::Stream {
                self.job_reply(tag, "job.failed", json!({ "reason": reason }));
                self.end_job(tag, "failed");
            } else {
                self.job_reply(tag, "job.lost", json!({ "reason": reason }));
                self.end_job(tag, "lost");
            }
        }
    }

    /// One event from a gearmand link's ClientSession.
    pub fn handle_job_event(&mut self, link: usize, event: JobEvent, now: Instant) {
        match event {
            JobEvent::Created { tag, handle } => self.on_created(link, tag, handle, now),
            JobEvent::Data { tag, data } => self.stream_bytes(tag, "job.data", "data", &data),
            JobEvent::Warning { tag, data } => self.stream_bytes(tag, "job.warning", "data", &data),
            JobEvent::Status { tag, numerator, denominator } => {
                if self.job(tag).is_some() {
                    self.job_reply(tag, "job.status", status_fields((true, true, numerator, denominator)));
                }
            }
            JobEvent::Complete { tag, data } => {
                if self.job(tag).is_some() {
                    self.stream_bytes(tag, "job.complete", "result", &data);
                    self.end_job(tag, "complete");
                }
            }
            JobEvent::Failed { tag } | JobEvent::TooLarge { tag, .. } => {
                if self.job(tag).is_some() {
                    self.job_reply(tag, "job.failed", json!({"reason": "the worker reported failure"}));
                    self.end_job(tag, "failed");
                }
            }
            JobEvent::Exception { tag, data } => {
                if self.job(tag).is_some() {
                    self.stream_bytes(tag, "job.exception", "data", &data);
                    self.end_job(tag, "exception");
                }
            }
            JobEvent::Rejected { tag, code, message } => {
                if self.job(tag).is_some() {
                    let reason = format!("gearmand refused the job: {code} {message}");
                    self.job_reply(tag, "job.failed", json!({ "reason": reason }));
                    self.end_job(tag, "rejected");
                }
            }
            JobEvent::StatusRes { ask: _, handle, known, running, numerator, denominator } => {
                self.on_status_res(link, &handle, (known, running, numerator, denominator), now)
            }
            JobEvent::StatusFailed { .. } => {}
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
        if kind != Kind::Stream {
            // A value reported for this handle after we submitted cannot belong to an older
            // job: take it (a worker that reports before our JOB_CREATED was read).
            let stored = std::str::from_utf8(&handle).ok().and_then(|h| self.stored.remove(h));
            if let Some(stored) = stored.filter(|s| s.at >= accepted_at)
                && let Some(job) = self.job(tag)
            {
                job.value = Some(stored.value);
            }
            let Some(job) = self.job(tag) else { return };
            job.next_poll = now + interval;
            self.effects.push(Effect::Arm(now + interval, AppTimer::Poll(tag)));
        }
        self.links[link].handles.entry(handle.into_boxed_slice()).or_default().push(tag);
        if kind != Kind::Ping {
            self.job_reply(tag, "job.created", json!({}));
        }
    }

    fn on_status_res(&mut self, link: usize, handle: &[u8], status: StatusTuple, now: Instant) {
        let Some(tags) = self.links[link].handles.get(handle).cloned() else { return };
        // One answer per GET_STATUS: a client's question first, then a poll.
        let asked = tags.iter().copied().find(|t| self.job(*t).is_some_and(|j| j.asks_out > 0));
        if let Some(tag) = asked {
            let job = self.job(tag).expect("found above");
            job.asks_out -= 1;
            return self.job_reply(tag, "job.status", status_fields(status));
        }
        let Some(tag) = tags.iter().copied().find(|t| self.job(*t).is_some_and(|j| j.polls_out > 0)) else {
            return;
        };
        let interval = self.cfg.poll_interval;
        let job = self.job(tag).expect("found above");
        job.polls_out -= 1;
        let changed = job.last_status != Some(status);
        job.last_status = Some(status);
        let kind = job.kind;
        if status.0 {
            // Still known: poll again on the original grid, skipping missed beats.
            let mut at = job.next_poll + interval;
            while at <= now {
                at += interval;
            }
            job.next_poll = at;
            self.effects.push(Effect::Arm(at, AppTimer::Poll(tag)));
            if changed && kind == Kind::Background {
                self.job_reply(tag, "job.status", status_fields(status));
            }
            return;
        }
        // gearmand no longer knows the job: it finished (or was lost in a restart).
        job.phase = Phase::Grace;
        let has_value = job.value.is_some();
        if kind == Kind::Ping {
            let handle = handle_text(handle);
            let conn = job.conn;
            self.send(conn, format!("job: {handle}"));
        } else if changed {
            self.job_reply(tag, "job.status", status_fields(status));
        }
        if has_value {
            self.finish_polled(tag);
        } else {
            self.effects.push(Effect::Arm(now + self.cfg.value_grace, AppTimer::Grace(tag)));
        }
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
        self.end_job(tag, if kind == Kind::Ping { "done" } else { "complete" });
    }

    /// One of the App's timers fired.
    pub fn handle_timer(&mut self, timer: AppTimer, now: Instant) {
        match timer {
            AppTimer::Poll(tag) => {
                let Some(job) = self.job(tag) else { return };
                if !matches!(job.phase, Phase::Running) {
                    return;
                }
                let Some(handle) = job.handle.as_deref().map(<[u8]>::to_vec) else { return };
                job.polls_out += 1;
                let link = job.link;
                self.effects.push(Effect::GetStatus { link, handle });
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
                    let text = "no gearmand connected in time; the job was not submitted";
                    self.error(conn, "unavailable", text, reference.as_ref());
                    self.end_job(tag, "unavailable");
                }
            }
            AppTimer::Sweep => self.sweep(now),
        }
    }

    /// Removes a job everywhere it is indexed.
    fn end_job(&mut self, tag: JobTag, outcome: &str) {
        let (key, generation) = split_tag(tag);
        if self.jobs.get(key).is_none_or(|j| j.generation != generation) {
            return;
        }
        let job = self.jobs.remove(key);
        if matches!(job.phase, Phase::Queued(_)) {
            self.queued -= 1;
        }
        if let Some(o) = crate::metrics::OUTCOMES.iter().position(|x| *x == outcome) {
            self.metrics.jobs_finished[job.kind.index()][o] += 1;
        }
        if let Some(client) = self.client(job.conn) {
            client.jobs.retain(|t| *t != tag);
        }
        let link = &mut self.links[job.link];
        if let Some(handle) = job.handle
            && link.generation == job.link_gen
            && let Some(tags) = link.handles.get_mut(&handle)
        {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                link.handles.remove(&handle);
            }
        }
    }
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
            max_jobs_per_connection: 2,
            queue_limit: 1,
            queue_timeout: Duration::from_secs(10),
            worker_token: None,
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

    fn up_app() -> App {
        let mut app = App::new(cfg(), 1);
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
        assert_eq!(effects(&mut app), vec![Effect::GetStatus { link: 0, handle: b"H:vm:1".to_vec() }]);
        // The worker reports while the job still runs.
        app.handle_client_text(A, r#"{"type":"worker.complete","id":"H:vm:1","value":"done"}"#, t0);
        assert_eq!(sent(&effects(&mut app)), vec![(A, "got it!")]);
        let gone = JobEvent::StatusRes {
            ask: 0,
            handle: b"H:vm:1".to_vec(),
            known: false,
            running: false,
            numerator: 0,
            denominator: 0,
        };
        app.handle_job_event(0, gone, t0 + Duration::from_millis(101));
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
            app.handle_timer(AppTimer::Poll(*tag), t0);
            let gone = JobEvent::StatusRes {
                ask: 0,
                handle: format!("H:vm:{i}").into(),
                known: false,
                running: false,
                numerator: 0,
                denominator: 0,
            };
            app.handle_job_event(0, gone, t0);
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
        app.handle_timer(AppTimer::Poll(tag), t0);
        let gone = JobEvent::StatusRes {
            ask: 0,
            handle: b"4".to_vec(),
            known: false,
            running: false,
            numerator: 0,
            denominator: 0,
        };
        app.handle_job_event(0, gone, t0);
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
        let mut app = App::new(cfg(), 1);
        app.handle_client_open(A, true);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        let e = effects(&mut app);
        let Some(Effect::Arm(at, timer)) = e.iter().find(|e| matches!(e, Effect::Arm(..))) else { panic!() };
        app.handle_timer(*timer, *at);
        assert!(sent(&effects(&mut app))[0].1.contains("unavailable"));
        assert_eq!((app.jobs_in_flight(), app.jobs_queued()), (0, 0));
    }
}
