//! SIGHUP: the settings are read again, as at start (command line, `--env-file`, environment,
//! token files), by the `Reader` that `main.rs` hands over, and those a running server can
//! change are applied without dropping anyone. Each is one comparison and one assignment in
//! `reload`; anything else that differs is reported as needing a restart. A reading that fails
//! (a missing or bad file) keeps every setting in force and says why.
//!
//! The reading happens on the loop thread: it is a few small local files read once per SIGHUP,
//! which an operator sends by hand (`systemctl reload`), like the reading at start; a pass is
//! delayed by that much, never a client for longer. A `--listen` host name is looked up again
//! too; with a name that resolves slowly, give the address instead.

use std::fmt::Debug;

use log::{error, info};

use super::Server;
use crate::config::Config;

/// Reads the settings again (`main.rs`: the same parse as at start).
pub type Reader = Box<dyn FnMut() -> Result<Config, String>>;

impl Server {
    /// What SIGHUP calls to read the settings again; without it SIGHUP changes nothing.
    pub fn set_reload(&mut self, read: impl FnMut() -> Result<Config, String> + 'static) {
        self.reload = Some(Box::new(read));
    }

    /// Reads the settings and applies what may change; logs what changed.
    pub(super) fn reload(&mut self) {
        self.reload_asked = false;
        let Some(read) = self.reload.as_mut() else {
            return info!("SIGHUP: nothing to read again");
        };
        let new = match read() {
            Ok(new) => new,
            Err(e) => return error!("SIGHUP: {e}; every setting in force is kept"),
        };
        let old = self.cfg.clone();
        let mut changed = Vec::new();
        // Each setting SIGHUP may change: compare and name it, then apply it to whoever holds
        // it. Issue 19's client token key and allowed functions take one line each here, as
        // `if differs(…) { self.app.set_…(new.….clone()) }`.
        if differs(&mut changed, "allowed origins", &old.allowed_origins, &new.allowed_origins) {
            self.limits.ws.allowed_origins = new.allowed_origins.clone(); // checked at each upgrade
        }
        let log_level = differs(&mut changed, "log level", &old.log_level, &new.log_level);
        // The worker token lives in the App, which takes no new one yet: it needs a restart,
        // like every setting not above (limits sized at start, listeners, gearmand links).
        let mut kept = new.clone();
        (kept.allowed_origins, kept.log_level) = (old.allowed_origins.clone(), old.log_level);
        let restart = format!("{kept:?}") != format!("{old:?}");
        self.cfg.allowed_origins = new.allowed_origins;
        self.cfg.log_level = new.log_level;
        if log_level {
            crate::logging::set_level(old.log_level.max(new.log_level)); // the line below is seen
        }
        match (changed.is_empty(), restart) {
            (true, false) => info!("SIGHUP: settings read again; nothing changed"),
            (_, restart) => {
                let more = if restart {
                    "; other settings changed too, and take effect at the next start"
                } else {
                    ""
                };
                let list = if changed.is_empty() {
                    "nothing that can change now".to_string()
                } else {
                    changed.join(", ")
                };
                info!("SIGHUP: settings read again; changed: {list}{more}");
            }
        }
        if log_level {
            crate::logging::set_level(new.log_level);
        }
    }
}

/// Whether `old` and `new` differ; if so, `name: old -> new` goes on `changed`.
fn differs<T: PartialEq + Debug>(changed: &mut Vec<String>, name: &str, old: &T, new: &T) -> bool {
    if old == new {
        return false;
    }
    changed.push(format!("{name} {old:?} -> {new:?}"));
    true
}
