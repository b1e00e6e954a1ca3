//! Uniques: the unique id gearmand and the worker see for each job, which names this
//! instance (`<instance id>.` first) and keeps one client's uniques apart from another's; and
//! reading a unique back, to tell which instance a report belongs to.
//!
//! The rule of what an instance id may be lives in [`crate::random`], beside the code that draws
//! one, so that `config` and the App share it without a core importing `config`. Must not: index
//! jobs by unique (the job table does), or decide where a report goes ([`super::reports`]).

use super::jobs::Kind;
use super::{App, ConnId};
use crate::random::{Entropy, is_instance_id};

/// gearmand keeps 63 bytes of a unique id.
const MAX_UNIQUE_BYTES: usize = 63;
/// Characters of a client's namespace (72 random bits), followed by `NAMESPACE_END`.
const NAMESPACE_CHARS: usize = 12;
const NAMESPACE_END: u8 = b'~';
/// Characters of a unique gearsock makes up for a job (96 random bits).
const RANDOM_UNIQUE_CHARS: usize = 16;
/// Ends the instance id at the start of every unique gearsock makes (ids cannot contain it).
const INSTANCE_END: u8 = b'.';

/// A client's namespace, inline rather than a Vec: every open connection carries one.
pub(super) type Namespace = [u8; NAMESPACE_CHARS + 1];

/// Makes uniques for this instance.
#[derive(Debug)]
pub(super) struct Uniques {
    entropy: Entropy,
    instance_id: String,
    /// `--shared-uniques`: clients' uniques go to gearmand unchanged.
    shared: bool,
}

impl Uniques {
    pub(super) fn new(entropy: Entropy, instance_id: String, shared: bool) -> Self {
        Uniques { entropy, instance_id, shared }
    }

    /// A new client's namespace (all `NAMESPACE_END` when uniques are shared).
    pub(super) fn namespace(&mut self) -> Namespace {
        let mut namespace = [NAMESPACE_END; NAMESPACE_CHARS + 1];
        if !self.shared {
            self.entropy.fill_id(&mut namespace[..NAMESPACE_CHARS]);
        }
        namespace
    }

    /// Fills `out` with a secret (6 random bits a character, URL-safe): a resume token's.
    pub(super) fn fill_secret(&mut self, out: &mut [u8]) {
        self.entropy.fill_id(out);
    }

    /// gearmand keeps 63 bytes of a unique; a client's namespace takes its share of them.
    pub(super) fn max_client_bytes(&self) -> usize {
        if self.shared {
            return MAX_UNIQUE_BYTES;
        }
        MAX_UNIQUE_BYTES.saturating_sub(self.instance_id.len() + 1 + NAMESPACE_CHARS + 1)
    }

    /// `<instance id>.`, with room for `extra` more bytes.
    fn instance_prefix(&self, extra: usize) -> Vec<u8> {
        let mut unique = Vec::with_capacity(self.instance_id.len() + 1 + extra);
        unique.extend_from_slice(self.instance_id.as_bytes());
        unique.push(INSTANCE_END);
        unique
    }

    /// Fills `out` with random id characters (a relay's id).
    pub(super) fn fill_id(&mut self, out: &mut [u8]) {
        self.entropy.fill_id(out);
    }

    /// The instance a unique names, when it is not this one: the part before its first `.`,
    /// if that can be an instance id.
    pub(super) fn owner_elsewhere<'u>(&self, unique: &'u str) -> Option<&'u str> {
        let (owner, _) = unique.split_once(char::from(INSTANCE_END))?;
        (owner != self.instance_id && is_instance_id(owner)).then_some(owner)
    }
}

impl App {
    /// The unique gearmand and the worker see: `<instance id>.` and then the client's own in
    /// its namespace, or for a background job or ping without one a fresh random id (so a
    /// report can name it, and reach this instance from any other); a stream job without one
    /// gets none (nothing is reported for it). `--shared-uniques` passes a client's unchanged.
    pub(super) fn gearman_unique(&mut self, id: ConnId, kind: Kind, unique: Option<String>) -> Vec<u8> {
        let u = &mut self.uniques;
        match unique {
            Some(own) if u.shared => own.into_bytes(),
            Some(own) => {
                let mut full = u.instance_prefix(NAMESPACE_CHARS + 1 + own.len());
                if let Some(namespace) = self.clients.namespace(id) {
                    full.extend_from_slice(namespace);
                }
                full.extend_from_slice(own.as_bytes());
                full
            }
            None if kind == Kind::Stream => Vec::new(),
            None => {
                let mut full = u.instance_prefix(RANDOM_UNIQUE_CHARS);
                full.extend_from_slice(&u.entropy.id(RANDOM_UNIQUE_CHARS));
                full
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;
    use super::MAX_UNIQUE_BYTES;
    use serde_json::json;

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
}
