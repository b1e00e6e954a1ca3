//! The admin listener (`--admin-listen`): its connections are accepted here and marked, so
//! that they get the admin pages and never a WebSocket (`clients`). It shares the loop, the
//! slab and the limits of the client port, and must not hold any state of its own beyond
//! whether its listener has connections waiting.

use std::time::Instant;

use log::debug;

use super::io::{Accept, accept};
use super::{ACCEPT_BUDGET, ACCEPT_RETRY, Server, TimerEvent};
use crate::logging::Event;
use crate::metrics::LoopEvent;

impl Server {
    /// Accepts from the admin listener until it is drained or the pass's budget is spent (then
    /// `admin_ready` stays set, so the next wait does not sleep: no new edge would come).
    pub(super) fn accept_admin(&mut self, now: Instant) {
        if !self.admin_ready || self.accept_paused {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = &self.admin else {
                self.admin_ready = false;
                return;
            };
            match accept(listener) {
                Accept::Got((sock, peer)) => {
                    if self.conns.len() >= self.cfg.max_connections {
                        self.app.metrics.observe(LoopEvent::Refused);
                        continue; // dropped: a probe retries
                    }
                    let key = self.conns.vacant_key();
                    self.admit(sock, peer, now);
                    if let Some(c) = self.conns.get_mut(key) {
                        c.admin = true; // before its first read, later in this pass
                    }
                }
                Accept::Drained => {
                    self.admin_ready = false;
                    return;
                }
                Accept::Again => {}
                Accept::Failed(e) => {
                    // Out of descriptors, as on the client port: both wait for the same timer.
                    debug!("admin accept failed ({e}); pausing accepts for {ACCEPT_RETRY:?}");
                    self.note(Event::AcceptFailed, now);
                    self.accept_paused = true;
                    self.wheel.insert(now + ACCEPT_RETRY, TimerEvent::AcceptResume);
                    return;
                }
            }
        }
    }
}
