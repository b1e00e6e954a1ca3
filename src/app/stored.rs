//! Stored values: `worker.complete` values that no live job claimed when they came (the
//! article's server stores them all), kept until a job gearmand names so claims one, or their
//! TTL passes, within a bound on their count and bytes. The bytes are all the store holds for
//! them: each value, and each copy of its key (in the map and in the age order, stale entries
//! included), so a flood of long keys with tiny values fills the store like long values do.
//!
//! Must not: decide whose a value is (the App does, when gearmand names a job), arm a timer
//! itself (it returns when its sweep is due), or read the clock (`now` is given).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A value no live job claimed.
#[derive(Debug)]
pub(super) struct Stored {
    value: String,
    at: Instant,
    /// Which entry of `order` is this value's (earlier ones for the key are stale).
    seq: u64,
}

impl Stored {
    /// When it was reported.
    pub(super) fn at(&self) -> Instant {
        self.at
    }

    pub(super) fn into_value(self) -> String {
        self.value
    }
}

/// Unclaimed values by job handle, oldest first.
#[derive(Debug)]
pub(super) struct StoredValues {
    values: HashMap<Box<str>, Stored>,
    /// Keys oldest first, each with the `seq` of the value it was pushed for. A value claimed
    /// or overwritten leaves a stale entry behind; stale entries are skipped, and dropped in
    /// bulk once they outnumber the live ones (so the deque stays within twice the store).
    order: VecDeque<(Box<str>, u64)>,
    seq: u64,
    bytes: usize,
    sweep_armed: bool,
    ttl: Duration,
    max_values: usize,
    max_bytes: usize,
}

impl StoredValues {
    /// An empty store of at most `max_values` values and `max_bytes` bytes, each kept `ttl`.
    pub(super) fn new(max_values: usize, max_bytes: usize, ttl: Duration) -> Self {
        StoredValues {
            values: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            bytes: 0,
            sweep_armed: false,
            ttl,
            max_values,
            max_bytes,
        }
    }

    /// Unclaimed values.
    pub(super) fn len(&self) -> usize {
        self.values.len()
    }

    /// Their bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps `value` for `handle`, dropping the oldest if the store is full. Returns when the
    /// sweep is due, if this value armed it.
    pub(super) fn store(&mut self, handle: &str, value: &str, now: Instant) -> Option<Instant> {
        self.seq += 1;
        let seq = self.seq;
        if let Some(s) = self.values.get_mut(handle) {
            // Replaced in place and moved to the back with its new time; if that pushes the
            // store over its bytes, the oldest go below.
            self.bytes = self.bytes - s.value.len() + value.len();
            // A worker that reports one handle again reuses the old value's allocation, unless
            // that would keep more than twice the bytes the store counts for it.
            if s.value.capacity() <= 2 * value.len().max(16) {
                s.value.clear();
                s.value.push_str(value);
            } else {
                s.value = value.to_owned();
            }
            let old_seq = std::mem::replace(&mut s.seq, seq);
            s.at = now;
            match self.order.back_mut() {
                // Already the newest: it stays at the back with its new seq (no stale entry).
                // A value's latest entry carries its seq, so the seq says whose entry it is,
                // without comparing keys.
                Some((_, last)) if *last == old_seq => *last = seq,
                _ => {
                    self.bytes += handle.len();
                    self.order.push_back((handle.into(), seq));
                }
            }
            self.evict(0, 0);
            self.compact_order();
            return None;
        }
        // The value and two copies of its key (map and order).
        let cost = value.len() + 2 * handle.len();
        if cost > self.max_bytes {
            return None; // larger than the whole store: nothing to keep
        }
        self.evict(1, cost);
        let key: Box<str> = handle.into();
        self.order.push_back((key.clone(), seq));
        self.bytes += cost;
        self.values.insert(key, Stored { value: value.to_owned(), at: now, seq });
        self.compact_order();
        if self.sweep_armed {
            return None;
        }
        self.sweep_armed = true;
        Some(now + self.ttl)
    }

    /// Drops the oldest stored values until `values` more of `bytes` in all fit.
    fn evict(&mut self, values: usize, bytes: usize) {
        while self.values.len() + values > self.max_values.max(1) || self.bytes + bytes > self.max_bytes {
            let Some((oldest, seq)) = self.order.pop_front() else { break };
            self.bytes -= oldest.len();
            if self.values.get(&oldest).is_some_and(|s| s.seq == seq) {
                self.take(&oldest);
            }
        }
    }

    /// Drops stale entries of `order` once they outnumber the live ones: amortised O(1) per
    /// store, and the deque never holds more than about twice the store.
    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.values.len() + 64 {
            let (values, bytes) = (&self.values, &mut self.bytes);
            self.order.retain(|(key, seq)| {
                let live = values.get(key).is_some_and(|s| s.seq == *seq);
                if !live {
                    *bytes -= key.len();
                }
                live
            });
        }
    }

    /// Takes a stored value out of the store.
    pub(super) fn take(&mut self, handle: &str) -> Option<Stored> {
        let stored = self.values.remove(handle)?;
        // Its entry in `order` (now stale) keeps its key's bytes until it is dropped.
        self.bytes -= stored.value.len() + handle.len();
        Some(stored)
    }

    /// Drops the values past their TTL. Returns when the next sweep is due, if any value is
    /// left.
    pub(super) fn sweep(&mut self, now: Instant) -> Option<Instant> {
        self.sweep_armed = false;
        // Oldest first; a value overwritten since goes to the back with its new time.
        for _ in 0..self.order.len() {
            let Some((key, seq)) = self.order.pop_front() else { break };
            self.bytes -= key.len();
            match self.values.get(&key) {
                Some(s) if s.seq != seq => {} // stale: the value moved to the back
                Some(s) if s.at + self.ttl <= now => {
                    self.take(&key);
                }
                Some(_) => {
                    self.bytes += key.len();
                    self.order.push_front((key, seq));
                    break;
                }
                None => {} // claimed
            }
        }
        let first = self.order.front().and_then(|(k, _)| self.values.get(k))?;
        self.sweep_armed = true;
        Some((first.at + self.ttl).max(now + self.ttl / 16))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;
    use serde_json::json;

    #[test]
    fn claimed_and_overwritten_values_leave_no_trail() {
        let t0 = Instant::now();
        let mut app = up_app();
        // A trusted reporter whose values are all claimed: the order list must not grow.
        for i in 0..100_000 {
            let handle = format!("H:{}", i % 7);
            app.stored.store(&handle, "v", t0);
            assert!(app.stored.take(&handle).is_some());
        }
        assert!(app.stored.order.len() <= 64, "{} stale keys kept", app.stored.order.len());
        // Stored, claimed, stored again: the old entry must not evict the new value.
        app.stored.store("H:a", "old", t0);
        app.stored.take("H:a");
        app.stored.store("H:b", "b", t0);
        app.stored.store("H:a", "new", t0);
        app.stored.store("H:c", "c", t0); // the store holds three (cfg)
        app.stored.store("H:d", "d", t0);
        assert!(app.stored.values.contains_key("H:a"), "the newest H:a outlives the older H:b");
        assert!(!app.stored.values.contains_key("H:b"));
        // Overwriting moves a value to the back, for the TTL as for eviction.
        let ttl = app.cfg.value_ttl;
        app.stored.store("H:c", "c2", t0 + ttl / 2);
        app.stored.sweep(t0 + ttl);
        assert_eq!(app.stored.values.keys().map(|k| &**k).collect::<Vec<_>>(), ["H:c"]);
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
        // Each costs its value and two copies of its 3-byte key.
        assert_eq!((app.stored_values(), app.stored_bytes()), (2, 812), "1000 bytes hold two of 400");
        let huge = json!({"type":"worker.complete","id":"H:9","value":"y".repeat(2000)});
        app.handle_client_text(A, &huge.to_string(), t0);
        assert_eq!(app.stored_bytes(), 812, "a value larger than the store is not kept");
        // Long keys with tiny values: the keys are what fills the store.
        let mut app = App::new(AppConfig { max_stored_values: 1000, ..cfg() }, 1, Entropy::counter());
        app.handle_client_open(A, true);
        for i in 0..100 {
            let msg = json!({"type":"worker.complete","id":format!("H:{i:062}"),"value":"v"});
            app.handle_client_text(A, &msg.to_string(), t0);
        }
        assert_eq!(
            (app.stored_values(), app.stored_bytes()),
            (7, 7 * 129),
            "1000 bytes hold 7 of 1 + 2 × 64"
        );
        // Claimed values leave stale keys behind: they are counted until dropped.
        for i in 93..100 {
            assert!(app.stored.take(&format!("H:{i:062}")).is_some());
        }
        assert_eq!((app.stored_values(), app.stored_bytes()), (0, 7 * 64));
        app.stored.sweep(t0 + Duration::from_secs(61));
        assert_eq!(app.stored_bytes(), 0);
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
}
