//! What the App's tests share: a small configuration, two clients, and helpers that drain
//! and read the effects. Test-only; must not hold anything a test asserts on.

pub(super) use std::time::{Duration, Instant};

pub(super) use serde_json::Value;

pub(super) use super::{App, AppConfig, AppTimer, ConnId, Effect};
pub(super) use crate::gearman::client::{JobEvent, JobMode, JobTag};
pub(super) use crate::random::Entropy;

pub(super) fn cfg() -> AppConfig {
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
        max_background_per_peer: 1024,
        max_job_bytes: 1 << 20,
        link_out_high_bytes: 4096,
        link_out_low_bytes: 1024,
        access: super::access::tests::open_access(),
        detach_grace: Duration::from_secs(30),
        job_log_bytes: 256 * 1024,
        job_log_total_bytes: 1 << 20,
        peer_instances: vec!["b2".into()],
        relay_answer: Duration::from_secs(5),
    }
}

pub(super) const A: ConnId = ConnId { key: 0, generation: 1 };
pub(super) const B: ConnId = ConnId { key: 1, generation: 1 };

pub(super) fn effects(app: &mut App) -> Vec<Effect> {
    let mut out = Vec::new();
    app.drain_effects(&mut out);
    out
}

pub(super) fn sent(effects: &[Effect]) -> Vec<(ConnId, &str)> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Send(c, t) = e { Some((*c, t.as_ref())) } else { None })
        .collect()
}

pub(super) fn submitted(effects: &[Effect]) -> Vec<JobTag> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Submit { tag, .. } = e { Some(*tag) } else { None })
        .collect()
}

/// Fires a job's poll timer and returns the question it put to gearmand.
pub(super) fn poll(app: &mut App, tag: JobTag, now: Instant) -> u64 {
    app.handle_timer(AppTimer::Poll(tag), now);
    let e = effects(app);
    e.iter()
        .find_map(|e| if let Effect::GetStatus { ask, .. } = e { Some(*ask) } else { None })
        .expect("GET_STATUS")
}

/// gearmand's answer: it no longer knows the job.
pub(super) fn gone(ask: u64, handle: &[u8]) -> JobEvent {
    JobEvent::StatusRes {
        ask,
        handle: handle.to_vec(),
        known: false,
        running: false,
        numerator: 0,
        denominator: 0,
    }
}

pub(super) fn up_app() -> App {
    let mut app = App::new(cfg(), 1, Entropy::counter());
    app.handle_link_up(0);
    app.handle_client_open(A, true);
    app.handle_client_open(B, false);
    app
}

pub(super) fn submits(effects: &[Effect]) -> Vec<(usize, JobTag, Vec<u8>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Submit { link, tag, unique, .. } => Some((*link, *tag, unique.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn codes(effects: &[Effect]) -> Vec<String> {
    sent(effects)
        .iter()
        .filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok())
        .filter_map(|v| v["code"].as_str().map(str::to_string))
        .collect()
}
