//! Who may run what: the function allow-list, client tokens, and the job rate.
//!
//! Deny by default. A `submit` passes when its function matches one of `--allow-function`'s
//! patterns (an exact name, or a prefix ending in `*`) and, when the client's token carries
//! `functions`, one of those as well (a token narrows, never widens). `gearsock.` functions
//! (the report desks) never pass. The article's ping passes unless `--no-ping`.
//!
//! With a key file, each connection is `Pending` until a token verifies (a Bearer header at the
//! upgrade, or an `auth` message), then `Authed`; a later `auth` of the same `sub` refreshes its
//! claims. The token is verified once per `auth`, never per message: a message only compares
//! `exp` with the time, which comes from the (Instant, Unix seconds) pair the shell took at
//! start ([`UnixClock`]), so no message reads the clock.
//!
//! ```text
//!  open --(tokens on)--> Pending --valid token--> Authed --auth, same sub--> Authed (refreshed)
//!                          |  3 failures, the deadline, or the subject's cap: close 1008
//!  open --(tokens off)--> nothing kept (a per-connection bucket when the rate is on)
//! ```
//!
//! Jobs per second: a token bucket per connection, or per `sub` over all its connections when
//! tokens are on; a subject's entry (its bucket and connection count) lives exactly as long as
//! its last authenticated connection. Must not: send, close or arm anything (the App does what
//! the answers say), or verify a token on the message path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::fields::Ref;
use super::reply::Reply;
use super::{App, AppTimer, ConnId, Effect};
use crate::jwt::{self, Keys};
use crate::metrics::{AuthReason, Denial, ErrorCode};

/// Gearman functions no client may submit: every instance's report desk.
const RESERVED_PREFIX: &[u8] = b"gearsock.";
/// Refused tokens after which a connection is closed.
const MAX_FAILURES: u8 = 3;
/// What a client without a token is told.
const AUTH_FIRST: &str = "authenticate first: send {\"type\":\"auth\",\"token\":\"<jwt>\"}";

/// Wall-clock time without a clock read per message: Unix seconds at a known `Instant`.
#[derive(Clone, Copy, Debug)]
pub struct UnixClock {
    /// When `unix_s` was read.
    pub at: Instant,
    /// Seconds since 1970 at `at`.
    pub unix_s: u64,
}

impl UnixClock {
    /// Unix seconds at `now`.
    pub fn seconds(&self, now: Instant) -> u64 {
        self.unix_s + now.saturating_duration_since(self.at).as_secs()
    }
}

/// Settings of who may run what, copied out of `Config`.
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// `--allow-function` patterns.
    pub allow_functions: Vec<String>,
    /// The article's ping is allowed (no `--no-ping`).
    pub ping: bool,
    /// `--client-token-key-file`'s secrets: when set, clients must authenticate.
    pub keys: Option<Keys>,
    /// `--token-leeway-s`.
    pub leeway_s: u64,
    /// A connection must authenticate this soon after its upgrade (`--handshake-timeout-ms`).
    pub auth_timeout: Duration,
    /// Wall-clock time for `exp`.
    pub clock: UnixClock,
    /// `--max-jobs-per-second` (0: off) and `--jobs-burst` (0: the rate).
    pub jobs_per_second: u32,
    /// See `jobs_per_second`.
    pub jobs_burst: u32,
    /// `--max-connections-per-subject` (0: off).
    pub max_per_subject: usize,
}

/// A function pattern: an exact name, or a prefix (`resize*`; `*` alone is every function).
#[derive(Clone, Debug)]
enum Pattern {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
}

impl Pattern {
    fn new(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.as_bytes().into()),
            None => Pattern::Exact(text.as_bytes().into()),
        }
    }

    fn matches(&self, function: &[u8]) -> bool {
        match self {
            Pattern::Exact(name) => **name == *function,
            Pattern::Prefix(prefix) => function.starts_with(prefix),
        }
    }
}

/// Why a job or message is refused.
#[derive(Debug, PartialEq)]
pub(super) enum Denied {
    /// `unauthorized`, with the reason.
    Unauthorized(&'static str),
    /// `forbidden`, with the words.
    Forbidden(String),
    /// `rate_limited`: try again in this many milliseconds.
    RateLimited(u64),
}

/// What an `auth` came to.
#[derive(Debug, PartialEq)]
pub(super) enum AuthOutcome {
    /// Accepted: answer `auth.ok`.
    Ok { sub: String, exp: u64 },
    /// Refused with this reason; `close`: and the connection is closed with 1008.
    Refused { reason: String, label: AuthReason, close: bool },
}

/// A token's limits on one connection.
#[derive(Debug)]
struct Grant {
    sub: String,
    exp: u64,
    functions: Option<Vec<Pattern>>,
    max_jobs: Option<usize>,
}

/// What a job message asks for, as far as who may run what is concerned.
#[derive(Clone, Copy, Debug)]
pub(super) enum JobAsk<'a> {
    /// The article's ping.
    Ping,
    /// A `submit` of this function.
    Submit(&'a [u8]),
    /// An `attach` (its function was allowed when it was submitted).
    Attach,
}

/// One connection's standing: its token (None: not yet), refusals so far, and its own bucket
/// when the rate is per connection.
#[derive(Debug, Default)]
struct Session {
    grant: Option<Grant>,
    failures: u8,
    bucket: Option<Bucket>,
}

/// A subject's connections and shared bucket.
#[derive(Debug)]
struct Subject {
    conns: usize,
    bucket: Option<Bucket>,
}

/// A token bucket of jobs: `tokens` refill at the rate up to the burst.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes one job, or says in how many milliseconds one will be there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err((((1.0 - self.tokens) / rate) * 1000.0).ceil().max(1.0) as u64)
    }
}

/// The client's token (tokens on); none yet is refused, and so is a client with no session at
/// all: fail closed.
fn grant(sessions: &HashMap<ConnId, Session>, id: ConnId) -> Result<&Grant, Denied> {
    sessions.get(&id).and_then(|s| s.grant.as_ref()).ok_or(Denied::Unauthorized(AUTH_FIRST))
}

/// Who may run what: the patterns, and each connection's and subject's standing.
#[derive(Debug)]
pub(super) struct Access {
    cfg: AccessConfig,
    patterns: Vec<Pattern>,
    /// Connections with something to remember (tokens on, or a per-connection rate).
    sessions: HashMap<ConnId, Session>,
    /// Authenticated subjects, while they have a connection.
    subjects: HashMap<String, Subject>,
}

impl Access {
    pub(super) fn new(cfg: AccessConfig) -> Access {
        let patterns = cfg.allow_functions.iter().map(|p| Pattern::new(p)).collect();
        Access { cfg, patterns, sessions: HashMap::new(), subjects: HashMap::new() }
    }

    /// SIGHUP: the patterns, and the token keys (rotation), change for every later message;
    /// sessions and grants already made stand. Turning tokens on or off is not a reload (the
    /// open connections would have no session, or a deadline for nothing): the caller keeps it
    /// for a restart, so `keys` is applied only while tokens are on.
    pub(super) fn reload(&mut self, allow_functions: Vec<String>, keys: Option<Keys>) {
        self.patterns = allow_functions.iter().map(|p| Pattern::new(p)).collect();
        self.cfg.allow_functions = allow_functions;
        if let (Some(_), Some(keys)) = (&self.cfg.keys, keys) {
            self.cfg.keys = Some(keys);
        }
    }

    /// Clients must present a token.
    pub(super) fn tokens_on(&self) -> bool {
        self.cfg.keys.is_some()
    }

    fn rate(&self) -> Option<(f64, f64)> {
        let rate = f64::from(self.cfg.jobs_per_second);
        let burst = if self.cfg.jobs_burst == 0 { rate } else { f64::from(self.cfg.jobs_burst) };
        (rate > 0.0).then_some((rate, burst.max(1.0)))
    }

    /// A client opened: the instant by which it must have authenticated, when tokens are on.
    /// `now`: None for the App's test entry point, which arms no deadline.
    pub(super) fn open(&mut self, id: ConnId, now: Option<Instant>) -> Option<Instant> {
        if self.tokens_on() || self.rate().is_some() {
            self.sessions.insert(id, Session::default());
        }
        now.filter(|_| self.tokens_on()).map(|now| now + self.cfg.auth_timeout)
    }

    /// A client has gone: its subject's count drops, and the subject is forgotten with its last
    /// connection.
    pub(super) fn close(&mut self, id: ConnId) {
        let Some(Session { grant: Some(grant), .. }) = self.sessions.remove(&id) else { return };
        if let Some(subject) = self.subjects.get_mut(&grant.sub) {
            subject.conns -= 1;
            if subject.conns == 0 {
                self.subjects.remove(&grant.sub);
            }
        }
    }

    /// The deadline to authenticate passed: true when the client still has no token.
    pub(super) fn is_pending(&self, id: ConnId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.grant.is_none())
    }

    /// A message other than `auth`, `worker.complete` or a job arrived: refused while no token
    /// has been accepted.
    pub(super) fn check_message(&self, id: ConnId) -> Result<(), Denied> {
        match self.tokens_on() {
            true => grant(&self.sessions, id).map(|_| ()),
            false => Ok(()),
        }
    }

    /// A token, from a Bearer header or an `auth` message.
    pub(super) fn authenticate(&mut self, id: ConnId, token: &str, now: Instant) -> AuthOutcome {
        let Some(keys) = &self.cfg.keys else {
            let reason = "this server takes no client tokens (no --client-token-key-file)".to_string();
            return AuthOutcome::Refused { reason, label: AuthReason::BadClaim, close: false };
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            let reason = "not an open client".to_string();
            return AuthOutcome::Refused { reason, label: AuthReason::BadClaim, close: false };
        };
        let verified = jwt::verify(token, keys, self.cfg.clock.seconds(now), self.cfg.leeway_s);
        let refused = |session: &mut Session, reason: String, label: AuthReason| {
            session.failures = session.failures.saturating_add(1);
            AuthOutcome::Refused { reason, label, close: session.failures >= MAX_FAILURES }
        };
        let claims = match verified {
            Ok(claims) => claims,
            Err(e) => return refused(session, e.to_string(), AuthReason::from_label(e.label())),
        };
        let grant = Grant {
            functions: claims.functions.map(|f| f.iter().map(|p| Pattern::new(p)).collect()),
            max_jobs: claims.max_jobs.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            exp: claims.exp,
            sub: claims.sub,
        };
        match &session.grant {
            Some(old) if old.sub != grant.sub => {
                let reason = format!("a refresh must keep the sub {:?}", old.sub);
                return refused(session, reason, AuthReason::OtherSubject);
            }
            Some(_) => {}
            None => {
                let cap = self.cfg.max_per_subject;
                let subject = self.subjects.get(&grant.sub);
                if cap > 0 && subject.is_some_and(|s| s.conns >= cap) {
                    let reason = "too many connections for this subject".to_string();
                    return AuthOutcome::Refused { reason, label: AuthReason::PerSubject, close: true };
                }
                self.subjects.entry(grant.sub.clone()).or_insert(Subject { conns: 0, bucket: None }).conns +=
                    1;
            }
        }
        let (sub, exp) = (grant.sub.clone(), grant.exp);
        session.grant = Some(grant);
        AuthOutcome::Ok { sub, exp }
    }

    /// The token subject of client `id`, once it authenticated.
    pub(super) fn sub(&self, id: ConnId) -> Option<&str> {
        self.sessions.get(&id).and_then(|s| s.grant.as_ref()).map(|g| g.sub.as_str())
    }

    /// May this client start (or attach) a job now? Counts it against the rate when it may.
    pub(super) fn check_job(&mut self, id: ConnId, ask: JobAsk<'_>, now: Instant) -> Result<(), Denied> {
        let grant = match self.tokens_on() {
            false => None,
            true => match grant(&self.sessions, id)? {
                g if self.cfg.clock.seconds(now) > g.exp.saturating_add(self.cfg.leeway_s) => {
                    return Err(Denied::Unauthorized("token expired"));
                }
                g => Some(g),
            },
        };
        match ask {
            JobAsk::Ping if !self.cfg.ping => {
                return Err(Denied::Forbidden("the ping is turned off on this server (--no-ping)".into()));
            }
            JobAsk::Ping | JobAsk::Attach => {}
            JobAsk::Submit(f) => self.check_function(f, grant)?,
        }
        let Some((rate, burst)) = self.rate() else { return Ok(()) };
        // A bucket starts full at its first job.
        let bucket = match grant {
            Some(g) => self.subjects.get_mut(&g.sub).map(|s| &mut s.bucket),
            None => self.sessions.get_mut(&id).map(|s| &mut s.bucket),
        };
        match bucket {
            Some(bucket) => bucket
                .get_or_insert(Bucket { tokens: burst, at: now })
                .take(rate, burst, now)
                .map_err(Denied::RateLimited),
            None => Ok(()),
        }
    }

    fn check_function(&self, function: &[u8], grant: Option<&Grant>) -> Result<(), Denied> {
        let why = if function.starts_with(RESERVED_PREFIX) {
            "is reserved: gearsock.* functions are never submittable"
        } else if !self.patterns.iter().any(|p| p.matches(function)) {
            "is not allowed on this server (--allow-function)"
        } else if grant
            .and_then(|g| g.functions.as_ref())
            .is_some_and(|c| !c.iter().any(|p| p.matches(function)))
        {
            "is not in your token's \"functions\" claim"
        } else {
            return Ok(());
        };
        Err(Denied::Forbidden(format!("function {:?} {why}", String::from_utf8_lossy(function))))
    }

    /// The client's limit on unfinished jobs: the server's, lowered by its token's `max_jobs`.
    pub(super) fn max_jobs(&self, id: ConnId, server: usize) -> usize {
        if !self.tokens_on() {
            return server;
        }
        let claimed = self.sessions.get(&id).and_then(|s| s.grant.as_ref()).and_then(|g| g.max_jobs);
        claimed.map_or(server, |n| n.min(server))
    }
}

impl App {
    /// A client's token, from an `auth` message or its upgrade's Bearer header: `auth.ok`, or
    /// `unauthorized` with the reason (and close 1008 after the third refusal, or over the
    /// subject's cap).
    pub(super) fn on_auth(&mut self, id: ConnId, token: &str, reference: Option<&Ref>, now: Instant) {
        match self.access.authenticate(id, token, now) {
            AuthOutcome::Ok { sub, exp } => {
                self.metrics.count_auth(AuthReason::Valid);
                self.send(id, Reply::AuthOk { sub: &sub, exp }.text());
            }
            AuthOutcome::Refused { reason, label, close } => {
                self.metrics.count_auth(label);
                let over_cap = label == AuthReason::PerSubject;
                self.note_denial(if over_cap { Denial::PerSubject } else { Denial::Unauthorized });
                self.error(id, ErrorCode::Unauthorized, &reason, reference);
                if close {
                    let why = if over_cap {
                        "too many connections for this subject"
                    } else {
                        "too many failed authentications"
                    };
                    self.effects.push(Effect::Close(id, why));
                }
            }
        }
    }

    /// A message or job refused by who-may-run-what: counted, noted for the log's summary, and
    /// answered.
    pub(super) fn deny(&mut self, id: ConnId, denied: Denied, reference: Option<&Ref>) {
        match denied {
            Denied::Unauthorized(reason) => {
                self.note_denial(Denial::Unauthorized);
                self.error(id, ErrorCode::Unauthorized, reason, reference);
            }
            Denied::Forbidden(text) => {
                self.note_denial(Denial::Function);
                self.error(id, ErrorCode::Forbidden, &text, reference);
            }
            Denied::RateLimited(retry_after_ms) => {
                self.note_denial(Denial::RateLimited);
                self.metrics.count_error(ErrorCode::RateLimited);
                self.send(id, Reply::RateLimited { retry_after_ms, reference }.text());
            }
        }
    }

    fn note_denial(&mut self, denial: Denial) {
        self.metrics.count_denial(denial);
        self.effects.push(Effect::Note(denial));
    }

    /// A client opened: with tokens on, its deadline to authenticate is armed, and a Bearer
    /// header is taken as its first `auth`.
    pub(super) fn open_access(&mut self, id: ConnId, bearer: Option<&str>, now: Instant) {
        if let Some(at) = self.access.open(id, Some(now)) {
            self.effects.push(Effect::Arm(at, AppTimer::AuthDeadline(id)));
            if let Some(token) = bearer {
                self.on_auth(id, token, None, now);
            }
        }
    }

    /// The deadline to authenticate passed: a client still without a token is closed (1008).
    pub(super) fn on_auth_deadline(&mut self, id: ConnId) {
        if self.access.is_pending(id) {
            self.metrics.count_auth(AuthReason::Timeout);
            self.note_denial(Denial::Unauthorized);
            self.effects.push(Effect::Close(id, "not authenticated in time"));
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::testkit::*;
    use super::*;

    /// Every function allowed, no tokens, no rate: the App tests' default (see testkit).
    pub(in super::super) fn open_access() -> AccessConfig {
        AccessConfig {
            allow_functions: vec!["*".into()],
            ping: true,
            keys: None,
            leeway_s: 30,
            auth_timeout: Duration::from_secs(10),
            clock: UnixClock { at: Instant::now(), unix_s: 1_700_000_000 },
            jobs_per_second: 0,
            jobs_burst: 0,
            max_per_subject: 0,
        }
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    pub(in super::super) fn app_with(access: AccessConfig) -> App {
        let mut c = cfg();
        c.max_jobs_per_connection = 8;
        c.access = access;
        let mut app = App::new(c, 1, Entropy::counter());
        app.handle_link_up(0);
        app
    }

    fn open(app: &mut App, id: ConnId, t0: Instant) {
        app.handle_client_open_from(id, false, "127.0.0.1".parse().unwrap(), None, t0);
    }

    pub(in super::super) fn token(clock: &UnixClock, claims: &str) -> String {
        let claims = claims.replace("EXP", &(clock.unix_s + 60).to_string());
        jwt::sign(&claims, KEY.as_bytes())
    }

    pub(in super::super) fn tokens_on() -> AccessConfig {
        let mut a = open_access();
        a.keys = Some(Keys::parse(KEY).unwrap());
        a.allow_functions = vec!["resize*".into(), "echo".into()];
        a
    }

    #[test]
    fn deny_by_default_exact_and_prefix_patterns_and_the_reserved_desks() {
        let t0 = Instant::now();
        let mut access = open_access();
        access.allow_functions = vec!["echo".into(), "resize*".into(), "*".into()];
        let mut app = app_with(AccessConfig { allow_functions: vec![], ..access.clone() });
        open(&mut app, A, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"echo"}"#, t0);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["forbidden"]);
        assert!(sent(&e)[0].1.contains("--allow-function") && sent(&e)[0].1.contains("echo"));
        assert_eq!(submitted(&e).len(), 1, "the ping still runs");
        let mut app = app_with(access);
        open(&mut app, A, t0);
        for f in ["echo", "resize_png", "anything", "gearsock.report.a1", "gearsock.x"] {
            app.handle_client_text(A, &format!(r#"{{"type":"submit","function":"{f}"}}"#), t0);
        }
        let e = effects(&mut app);
        assert_eq!((submitted(&e).len(), codes(&e)), (3, vec!["forbidden".to_string(); 2]));
        let p = |t: &str| Pattern::new(t);
        assert!(p("resize*").matches(b"resize") && !p("resize*").matches(b"resiz"));
        assert!(p("echo").matches(b"echo") && !p("echo").matches(b"echo2"));
    }

    #[test]
    fn nothing_but_auth_before_a_token_then_refresh_same_sub_only_and_expiry() {
        let t0 = Instant::now();
        let access = tokens_on();
        let clock = access.clock;
        let mut app = app_with(access);
        app.handle_client_open_from(A, false, "127.0.0.1".parse().unwrap(), None, t0);
        let e = effects(&mut app);
        assert_eq!(e, [Effect::Arm(t0 + Duration::from_secs(10), AppTimer::AuthDeadline(A))]);
        app.handle_client_text(A, r#"{"type":"ping"}"#, t0);
        app.handle_client_text(A, r#"{"type":"status","job":"H:x:1"}"#, t0);
        app.handle_client_text(A, r#"{"type":"auth","token":"nope"}"#, t0);
        assert_eq!(codes(&effects(&mut app)), ["unauthorized"; 3]);
        let good = token(&clock, r#"{"sub":"alice","exp":EXP,"functions":["resize_*"],"max_jobs":1}"#);
        app.handle_client_text(A, &format!(r#"{{"type":"auth","token":"{good}"}}"#), t0);
        let e = effects(&mut app);
        assert_eq!(
            sent(&e)[0].1,
            format!(r#"{{"exp":{},"sub":"alice","type":"auth.ok"}}"#, clock.unix_s + 60)
        );
        // The claim narrows the server's patterns; max_jobs lowers the server's limit.
        app.handle_client_text(A, r#"{"type":"submit","function":"echo"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"resize_a"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"resize_b"}"#, t0);
        let e = effects(&mut app);
        assert_eq!((codes(&e), submitted(&e).len()), (vec!["forbidden".into(), "too_many_jobs".into()], 1));
        let other = token(&clock, r#"{"sub":"mallory","exp":EXP}"#);
        app.handle_client_text(A, &format!(r#"{{"type":"auth","token":"{other}"}}"#), t0);
        assert_eq!(codes(&effects(&mut app)), ["unauthorized"]);
        app.handle_timer(AppTimer::AuthDeadline(A), t0 + Duration::from_secs(10));
        assert_eq!(effects(&mut app), [], "an authenticated client is not closed at the deadline");
        // Past exp (plus the leeway), new work is refused; a refresh lets it in again.
        let late = t0 + Duration::from_secs(92);
        app.handle_client_text(A, r#"{"type":"ping"}"#, late);
        assert!(sent(&effects(&mut app))[0].1.contains("token expired"));
        app.handle_client_text(A, &format!(r#"{{"type":"auth","token":"{good}"}}"#), late);
        assert!(sent(&effects(&mut app))[0].1.contains("token expired"), "the old token is no refresh");
        assert_eq!(app.access.subjects.len(), 1);
        app.handle_client_closed(A, t0);
        assert_eq!(app.access.subjects.len(), 0, "a subject dies with its last connection");
    }

    #[test]
    fn three_failures_the_deadline_and_the_subject_cap_close_with_1008() {
        let t0 = Instant::now();
        let mut access = tokens_on();
        access.max_per_subject = 1;
        let clock = access.clock;
        let mut app = app_with(access);
        let good = token(&clock, r#"{"sub":"bob","exp":EXP}"#);
        app.handle_client_open_from(A, false, "127.0.0.1".parse().unwrap(), Some(&good), t0);
        assert!(sent(&effects(&mut app))[0].1.contains("auth.ok"), "a Bearer header authenticates");
        open(&mut app, B, t0);
        app.handle_client_text(B, &format!(r#"{{"type":"auth","token":"{good}"}}"#), t0);
        let e = effects(&mut app);
        assert!(sent(&e)[0].1.contains("too many connections for this subject"));
        assert!(e.contains(&Effect::Close(B, "too many connections for this subject")));
        let c = ConnId { key: 2, generation: 1 };
        open(&mut app, c, t0);
        for _ in 0..3 {
            app.handle_client_text(c, r#"{"type":"auth","token":"a.b.c"}"#, t0);
        }
        assert!(effects(&mut app).contains(&Effect::Close(c, "too many failed authentications")));
        let d = ConnId { key: 3, generation: 1 };
        open(&mut app, d, t0);
        app.handle_timer(AppTimer::AuthDeadline(d), t0 + Duration::from_secs(10));
        assert!(effects(&mut app).contains(&Effect::Close(d, "not authenticated in time")));
    }

    #[test]
    fn the_rate_is_a_bucket_per_connection_that_refills() {
        let t0 = Instant::now();
        let mut access = open_access();
        (access.jobs_per_second, access.jobs_burst) = (2, 3);
        let mut app = app_with(access);
        open(&mut app, A, t0);
        for _ in 0..4 {
            app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        }
        let e = effects(&mut app);
        assert_eq!(submitted(&e).len(), 3);
        let v: Value = serde_json::from_str(sent(&e)[0].1).unwrap();
        assert_eq!((v["code"].as_str(), v["retry_after_ms"].as_u64()), (Some("rate_limited"), Some(500)));
        open(&mut app, B, t0);
        app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0 + Duration::from_millis(500));
        assert_eq!(submitted(&effects(&mut app)).len(), 2, "B has its own bucket; A's refilled");
    }

    #[test]
    fn with_tokens_a_subject_shares_one_bucket_over_its_connections() {
        let t0 = Instant::now();
        let mut access = tokens_on();
        (access.jobs_per_second, access.allow_functions) = (1, vec!["*".into()]);
        let clock = access.clock;
        let mut app = app_with(access);
        let alice = token(&clock, r#"{"sub":"alice","exp":EXP}"#);
        for id in [A, B] {
            app.handle_client_open_from(id, false, "127.0.0.1".parse().unwrap(), Some(&alice), t0);
        }
        app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
        app.handle_client_text(B, r#"{"type":"submit","function":"f"}"#, t0);
        let e = effects(&mut app);
        assert_eq!((submitted(&e).len(), codes(&e)), (1, vec!["rate_limited".to_string()]));
    }
}
