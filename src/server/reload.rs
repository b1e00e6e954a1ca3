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
use crate::jwt::Keys;

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
        // Each setting SIGHUP may change: compare and name it (secrets by name only), then
        // apply it to whoever holds it.
        if differs(&mut changed, "allowed origins", &old.allowed_origins, &new.allowed_origins) {
            self.limits.ws.allowed_origins = new.allowed_origins.clone(); // checked at each upgrade
        }
        let log_level = differs(&mut changed, "log level", &old.log_level, &new.log_level);
        let functions =
            differs(&mut changed, "allowed functions", &old.allow_functions, &new.allow_functions);
        let worker_token = secret_differs(&mut changed, "worker token", &old.worker_token, &new.worker_token);
        // New client token keys are a rotation while tokens are on; turning them on or off
        // changes what every open connection must do, and waits for a restart.
        let rotated = old.client_token_keys.is_some()
            && new.client_token_keys.is_some()
            && secret_differs(
                &mut changed,
                "client token keys",
                &old.client_token_keys,
                &new.client_token_keys,
            );
        let keys = match new.client_token_keys.as_deref().filter(|_| rotated).map(Keys::parse) {
            Some(Ok(keys)) => Some(keys),
            Some(Err(e)) => return error!("SIGHUP: client token keys: {e}; every setting in force is kept"),
            None => None,
        };
        if differs(&mut changed, "peer instances", &old.peer_instances, &new.peer_instances) {
            self.app.set_peer_instances(&new.known_peers());
        }
        if functions || worker_token || rotated {
            self.app.reload(new.worker_token.clone(), new.allow_functions.clone(), keys);
        }
        // Every setting not above needs a restart (limits sized at start, listeners, links).
        let mut kept = new.clone();
        (kept.allowed_origins, kept.log_level) = (old.allowed_origins.clone(), old.log_level);
        kept.peer_instances = old.peer_instances.clone();
        (kept.allow_functions, kept.worker_token) = (old.allow_functions.clone(), old.worker_token.clone());
        if rotated {
            kept.client_token_keys = old.client_token_keys.clone();
        }
        let restart = format!("{kept:?}") != format!("{old:?}");
        self.cfg.allow_functions = new.allow_functions;
        self.cfg.worker_token = new.worker_token;
        if rotated {
            self.cfg.client_token_keys = new.client_token_keys;
        }
        self.cfg.allowed_origins = new.allowed_origins;
        self.cfg.peer_instances = new.peer_instances;
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

/// Whether a secret changed; if so, only its name goes on `changed` (never its value).
fn secret_differs<T: PartialEq>(changed: &mut Vec<String>, name: &str, old: &T, new: &T) -> bool {
    if old == new {
        return false;
    }
    changed.push(format!("{name} (replaced)"));
    true
}

/// Whether `old` and `new` differ; if so, `name: old -> new` goes on `changed`.
fn differs<T: PartialEq + Debug>(changed: &mut Vec<String>, name: &str, old: &T, new: &T) -> bool {
    if old == new {
        return false;
    }
    changed.push(format!("{name} {old:?} -> {new:?}"));
    true
}
