//! Client text messages into the App (`App::handle_client_text`): the JSON parser and every
//! command behind it, with a scripted gearmand answering at once so jobs get created, stream,
//! finish, get polled and report values.
//!
//! Input: one control byte (client trusted or not; `--worker-token` set or not;
//! `--shared-uniques`; a job rate limit; whether invalid UTF-8 is converted lossily or the input skipped), then
//! messages separated by newlines. A few lines are not messages but moves of the harness:
//! `#close` (the client leaves and a new one connects), `#down` (the gearmand connection drops
//! and comes back), `#tick` (ten seconds pass), `#binary` (a binary frame).
//!
//! The scripted gearmand names jobs `H:fz:N`, counting per connection from 1 (so two
//! connections hand out the same handles, as two gearmands do). A stream job's function picks
//! its fate by its first letter: `r` rejected, `s` keeps running, `f` fails, `x` throws, `b`
//! sends a result over the size limit; any other streams data and status, then completes.
//! Background jobs and pings are known to the first status poll and gone at the second.
//!
//! Checked, besides "no panic": every message gets at least one reply; every reply is a JSON
//! object with a `type` or one of the article's plain-text lines; jobs, held submissions and
//! stored values stay within their limits; message counters add up; and once every client has
//! left and the value TTL has passed, nothing is left: no job, no held submission, no value.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gearsock::app::{AccessConfig, App, AppConfig, AppTimer, ConnId, Effect, PING_ACK, UnixClock};
use gearsock::gearman::{JobEvent, JobMode, PacketType};
use gearsock::metrics::Message;
use gearsock::random::Entropy;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const LINKS: usize = 2;

fn config(control: u8) -> AppConfig {
    AppConfig {
        poll_interval: Duration::from_millis(100),
        value_grace: Duration::from_millis(500),
        value_ttl: Duration::from_secs(60),
        max_stored_values: 3,
        max_stored_bytes: 200,
        max_jobs_per_connection: 4,
        queue_limit: 2,
        queue_timeout: Duration::from_secs(10),
        worker_token: if control & 2 != 0 { Some("secret".into()) } else { None },
        shared_uniques: control & 4 != 0,
        max_orphans: 1,
        max_background_per_peer: 4,
        max_job_bytes: 1 << 10,
        instance_id: "f1".into(),
        link_out_high_bytes: 4096,
        link_out_low_bytes: 1024,
        // Jobs end with their client, as the checks below expect.
        detach_grace: Duration::ZERO,
        job_log_bytes: 1 << 10,
        job_log_total_bytes: 1 << 12,
        // Every function may run; a rate limit when the control byte says so.
        access: AccessConfig {
            allow_functions: vec!["*".into()],
            ping: true,
            keys: None,
            leeway_s: 30,
            auth_timeout: Duration::from_secs(10),
            clock: UnixClock { at: Instant::now(), unix_s: 1_700_000_000 },
            jobs_per_second: if control & 16 != 0 { 5 } else { 0 },
            jobs_burst: if control & 16 != 0 { 2 } else { 0 },
            max_per_subject: 0,
        },
        // Relayed attaches to this peer come back to this instance's own desk (see `apply`).
        peer_instances: vec!["f2".into()],
        relay_answer: Duration::from_secs(5),
    }
}

fuzz_target!(|data: &[u8]| {
    let [control, bytes @ ..] = data else { return };
    let text = if control & 8 != 0 {
        String::from_utf8_lossy(bytes)
    } else {
        match std::str::from_utf8(bytes) {
            Ok(text) => text.into(),
            Err(_) => return,
        }
    };
    let cfg = config(*control);
    let mut sim = Sim::new(cfg.clone(), control & 1 != 0);
    let mut texts = 0u64;
    let mut binaries = 0u64;
    for line in text.split('\n') {
        match line {
            "#close" => sim.reconnect_client(),
            "#down" => sim.drop_link(),
            "#tick" => sim.advance(Duration::from_secs(10)),
            "#binary" => {
                binaries += 1;
                sim.app.handle_client_binary(sim.client);
                sim.settle();
                assert!(sim.replies > 0, "a binary frame got no reply");
            }
            message => {
                texts += 1;
                sim.replies = 0;
                sim.app.handle_client_text(sim.client, message, sim.now);
                sim.settle();
                assert!(sim.replies > 0, "no reply to {message:?}");
            }
        }
        sim.advance(Duration::from_millis(50));
        sim.check_bounds(&cfg);
    }
    let metrics = &sim.app.metrics;
    let text_kinds = Message::ALL.iter().filter(|&&m| m != Message::Binary);
    assert_eq!(text_kinds.map(|&m| metrics.messages(m)).sum::<u64>(), texts, "{metrics:?}");
    assert_eq!(metrics.messages(Message::Binary), binaries, "{metrics:?}");

    // Everyone leaves; after the TTL nothing may be left behind.
    sim.app.handle_client_closed(sim.client, sim.now);
    sim.settle();
    assert_eq!((sim.app.jobs_in_flight(), sim.app.jobs_queued()), (0, 0), "jobs outlive their client");
    for _ in 0..4 {
        sim.advance(cfg.value_ttl + Duration::from_secs(1));
    }
    assert_eq!((sim.app.stored_values(), sim.app.stored_bytes()), (0, 0), "stored values outlive their TTL");
});

/// A job the scripted gearmand still knows.
struct FakeJob {
    /// Background jobs and pings: status polls answered so far.
    polls: u32,
    /// Stays known to every poll.
    forever: bool,
}

/// The App, its timers, a client and a scripted gearmand per link.
struct Sim {
    app: App,
    now: Instant,
    timers: Vec<(Instant, AppTimer)>,
    client: ConnId,
    trusted: bool,
    /// Per link: up as the shell sees it, jobs by handle, last handle number.
    up: [bool; LINKS],
    jobs: [HashMap<Vec<u8>, FakeJob>; LINKS],
    handles: [u64; LINKS],
    replies: usize,
    effects: Vec<Effect>,
}

impl Sim {
    fn new(cfg: AppConfig, trusted: bool) -> Self {
        let mut sim = Sim {
            app: App::new(cfg, LINKS, Entropy::counter()),
            now: Instant::now(),
            timers: Vec::new(),
            client: ConnId { key: 0, generation: 1 },
            trusted,
            up: [false; LINKS],
            jobs: Default::default(),
            handles: [0; LINKS],
            replies: 0,
            effects: Vec::new(),
        };
        sim.link_up(0);
        sim.app.handle_client_open(sim.client, trusted);
        sim
    }

    fn link_up(&mut self, link: usize) {
        self.up[link] = true;
        self.jobs[link].clear();
        self.handles[link] = 0;
        self.app.handle_link_up(link);
        self.settle();
    }

    fn reconnect_client(&mut self) {
        self.app.handle_client_closed(self.client, self.now);
        self.settle();
        // The slot is reused with a new generation, as the server's slab does.
        self.client.generation += 1;
        self.app.handle_client_open(self.client, self.trusted);
    }

    fn drop_link(&mut self) {
        let Some(link) = (0..LINKS).find(|&l| self.up[l]) else { return };
        self.up[link] = false;
        self.app.handle_link_down(link, self.now);
        self.settle();
        self.link_up(link);
    }

    /// Time passes; due timers fire, oldest first.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        for _ in 0..1000 {
            let Some(i) = (0..self.timers.len())
                .filter(|&i| self.timers[i].0 <= self.now)
                .min_by_key(|&i| self.timers[i].0)
            else {
                return;
            };
            let (_, timer) = self.timers.swap_remove(i);
            self.app.handle_timer(timer, self.now);
            self.settle();
        }
        panic!("timers keep firing at one instant");
    }

    /// Carries out effects (which may cause more) until none is left, then reports an empty
    /// link output as the shell does after a flush.
    fn settle(&mut self) {
        loop {
            self.app.drain_effects(&mut self.effects);
            if self.effects.is_empty() {
                for link in 0..LINKS {
                    if self.up[link] {
                        self.app.handle_link_output(link, 0);
                    }
                }
                if !self.app.has_effects() {
                    return;
                }
                continue;
            }
            let effects = std::mem::take(&mut self.effects);
            for effect in effects {
                self.apply(effect);
            }
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            // Only a client without a token is closed, and this harness has no tokens.
            Effect::Close(..) => panic!("a client closed without client tokens"),
            Effect::Note(_) => {}
            Effect::Send(to, text) => {
                check_reply(&text);
                if to == self.client {
                    self.replies += 1;
                }
            }
            Effect::Submit { link, tag, function, unique, payload, mode, .. } => {
                assert!(self.up[link], "submit to a link that is down");
                if function.starts_with(b"gearsock.report.") {
                    // A report forwarded to another instance's desk: hand it back as if this
                    // were that instance, so both ends of routing meet the same inputs.
                    let created = JobEvent::Created { tag, handle: b"H:fz:desk".to_vec() };
                    self.app.handle_job_event(link, created, self.now);
                    // A relay message (`@<sender>.…`) comes back as if the peer f2 had sent it,
                    // so that this one App is both the requester and the owner of each relay.
                    let unique = match unique.strip_prefix(b"@f1.") {
                        Some(rest) => [&b"@f2."[..], rest].concat(),
                        None => unique,
                    };
                    let forwarded = JobEvent::Forwarded { unique, value: payload };
                    return self.app.handle_job_event(link, forwarded, self.now);
                }
                let fate = function.first().copied().unwrap_or(b'-');
                if mode == JobMode::Foreground && fate == b'r' {
                    let event =
                        JobEvent::Rejected { tag, code: "QUEUE_ERROR".into(), message: "full".into() };
                    return self.app.handle_job_event(link, event, self.now);
                }
                self.handles[link] += 1;
                let handle = format!("H:fz:{}", self.handles[link]).into_bytes();
                self.app.handle_job_event(link, JobEvent::Created { tag, handle: handle.clone() }, self.now);
                if mode == JobMode::Background {
                    self.jobs[link].insert(handle, FakeJob { polls: 0, forever: fate == b's' });
                    return;
                }
                let events = match fate {
                    b's' => {
                        self.jobs[link].insert(handle, FakeJob { polls: 0, forever: true });
                        vec![JobEvent::Status { tag, numerator: 1, denominator: 2 }]
                    }
                    b'f' => vec![JobEvent::Failed { tag }],
                    b'x' => vec![JobEvent::Exception { tag, data: payload }],
                    b'b' => {
                        vec![JobEvent::TooLarge { tag, kind: PacketType::WorkComplete, size_bytes: 1 << 20 }]
                    }
                    _ => {
                        let result: Vec<u8> = payload.iter().rev().copied().collect();
                        vec![
                            JobEvent::Data { tag, data: payload },
                            JobEvent::Warning { tag, data: vec![0xff, b'w'] },
                            JobEvent::Status { tag, numerator: 1, denominator: 1 },
                            JobEvent::Complete { tag, data: result },
                        ]
                    }
                };
                for event in events {
                    self.app.handle_job_event(link, event, self.now);
                }
            }
            Effect::GetStatus { link, handle, ask } => {
                assert!(self.up[link], "status asked of a link that is down");
                let known = match self.jobs[link].get_mut(&handle) {
                    Some(job) => {
                        job.polls += 1;
                        job.forever || job.polls < 2
                    }
                    None => false,
                };
                let event = if !known && ask % 3 == 2 {
                    JobEvent::StatusFailed { ask, handle, code: "ERR".into(), message: "no".into() }
                } else {
                    JobEvent::StatusRes { ask, handle, known, running: known, numerator: 1, denominator: 3 }
                };
                self.app.handle_job_event(link, event, self.now);
            }
            Effect::Arm(at, timer) => {
                assert!(at >= self.now, "timer armed in the past");
                self.timers.push((at, timer));
            }
            Effect::Retire(link) => {
                // The shell opens a fresh connection to the same gearmand, if it has a slot.
                let Some(fresh) = (0..LINKS).find(|&l| !self.up[l]) else { return };
                self.link_up(fresh);
                self.app.handle_link_retiring(link);
            }
            Effect::CloseLink(link) => {
                self.up[link] = false;
                self.jobs[link].clear();
            }
        }
    }

    fn check_bounds(&self, cfg: &AppConfig) {
        assert!(
            self.app.jobs_in_flight() <= cfg.max_jobs_per_connection,
            "{} jobs",
            self.app.jobs_in_flight()
        );
        assert!(self.app.jobs_queued() <= cfg.queue_limit);
        assert!(self.app.stored_values() <= cfg.max_stored_values.max(1));
        assert!(self.app.stored_bytes() <= cfg.max_stored_bytes);
    }
}

/// A reply is a JSON object with a string `type`, or one of the article's plain-text lines.
fn check_reply(text: &str) {
    if text == PING_ACK || text == "got it!" || text.starts_with("job: ") || text.starts_with("value: ") {
        return;
    }
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("reply {text:?} is not JSON: {e}"));
    assert!(value.get("type").is_some_and(Value::is_string), "reply without a type: {text}");
}
