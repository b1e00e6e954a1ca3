//! Each core's own settings, built from the server's `Config` here, by the caller: the cores
//! (`app`, `connection`, `ws`) never see `Config` itself.

use std::net::SocketAddr;

use crate::app::{AccessConfig, AppConfig, UnixClock};
use crate::config::Config;
use crate::connection::ConnLimits;
use crate::ws::WsLimits;

/// What the App needs; `instance_id` is `--instance-id` or the one drawn at startup.
pub fn app_config(c: &Config, instance_id: String) -> AppConfig {
    AppConfig {
        poll_interval: c.poll_interval,
        value_grace: c.value_grace,
        value_ttl: c.value_ttl,
        max_stored_values: c.max_stored_values,
        max_stored_bytes: c.max_stored_bytes,
        max_jobs_per_connection: c.max_jobs_per_connection,
        queue_limit: c.queue_limit,
        queue_timeout: c.queue_timeout,
        worker_token: c.worker_token.clone(),
        shared_uniques: c.shared_uniques,
        max_orphans: c.max_orphans,
        // bounds-app: the per-peer background quota.
        max_background_per_peer: c.max_background_per_peer,
        max_job_bytes: c.max_job_bytes,
        instance_id,
        link_out_high_bytes: c.gearman_out_high_bytes,
        link_out_low_bytes: c.gearman_out_low_bytes,
        access: access_config(c),
        detach_grace: c.detach_grace,
        job_log_bytes: c.job_log_bytes,
        job_log_total_bytes: c.job_log_total_bytes,
        peer_instances: c.known_peers(),
        relay_answer: c.relay_answer,
    }
}

/// Who may run what (issue 19). The wall clock is read here, once at start: the App derives
/// Unix seconds from this pair and the loop's `now`, with no clock read per message.
fn access_config(c: &Config) -> AccessConfig {
    let since_1970 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    AccessConfig {
        allow_functions: c.allow_functions.clone(),
        ping: !c.no_ping,
        // The command line checked the file; should it not parse here, nothing verifies.
        keys: c
            .client_token_keys
            .as_deref()
            .map(|t| crate::jwt::Keys::parse(t).unwrap_or_else(|_| crate::jwt::Keys::none())),
        leeway_s: c.token_leeway_s,
        auth_timeout: c.handshake_timeout,
        clock: UnixClock { at: std::time::Instant::now(), unix_s: since_1970.map_or(0, |d| d.as_secs()) },
        jobs_per_second: c.max_jobs_per_second,
        jobs_burst: c.jobs_burst,
        max_per_subject: c.max_connections_per_subject,
    }
}

/// What a WebSocket needs.
pub fn ws_limits(c: &Config) -> WsLimits {
    WsLimits {
        max_message_bytes: c.max_message_bytes,
        max_frame_bytes: c.max_frame_bytes,
        read_buffer_bytes: c.ws_read_buffer_bytes,
        in_limit_bytes: c.client_in_limit_bytes,
        allowed_origins: c.allowed_origins.clone(),
    }
}

/// A client connection's limits and timeouts.
pub(crate) fn conn_limits(c: &Config) -> ConnLimits {
    ConnLimits {
        ws: ws_limits(c),
        // Echo mode: every message adds output, so a client that sends ahead of its reading is
        // held back by TCP once its backlog passes the soft limit.
        hold_reading_over: c.echo.then_some(c.client_out_soft_bytes),
        handshake_timeout: c.handshake_timeout,
        idle_timeout: c.idle_timeout,
        message_timeout: c.message_timeout,
        close_timeout: c.close_timeout,
        out_soft_bytes: c.client_out_soft_bytes,
        out_soft_time: c.client_out_soft_time,
        out_hard_bytes: c.client_out_hard_bytes,
    }
}

/// The origins our own page is served under, for trust (`Upgrade::origin_is_own_or_absent`):
/// the address the listener got, as a browser writes it in `Origin` (no `:80`), plus
/// `--public-origin`s. Never the request's `Host`, which a page on a rebinding domain chooses.
///
/// An unspecified address (`0.0.0.0`, `::`) names no host a page could come from, so it
/// stands for the loopback forms only (`127.0.0.1`, `localhost`, `[::1]` with our port): a
/// browser on this machine reaches us under those, and no other site's page can send them. The
/// names under which other machines reach us are the operator's to list with `--public-origin`.
/// A loopback address also gets `localhost` (the demo page opened as `http://localhost:PORT`).
pub(crate) fn own_origins(listen: SocketAddr, public: &[String]) -> Vec<String> {
    let port = match listen.port() {
        80 => String::new(),
        port => format!(":{port}"),
    };
    let ip = listen.ip();
    let mut own = Vec::new();
    if ip.is_unspecified() {
        own.extend(["127.0.0.1", "localhost", "[::1]"].map(|host| format!("http://{host}{port}")));
    } else {
        own.push(format!("http://{}{port}", SocketAddr::new(ip, 0).to_string().trim_end_matches(":0")));
        if ip.is_loopback() {
            own.push(format!("http://localhost{port}"));
        }
    }
    own.extend(public.iter().map(|o| o.trim_end_matches('/').to_string()));
    own
}

#[cfg(test)]
mod tests {
    use super::own_origins;

    #[test]
    fn own_origins_are_the_listening_address_and_the_public_ones_never_a_wildcard() {
        let own = |listen: &str, public: &[&str]| {
            let public: Vec<String> = public.iter().map(|s| s.to_string()).collect();
            own_origins(listen.parse().unwrap(), &public)
        };
        assert_eq!(own("127.0.0.1:8080", &[]), ["http://127.0.0.1:8080", "http://localhost:8080"]);
        assert_eq!(
            own("192.0.2.7:8080", &["https://gear.example"]),
            ["http://192.0.2.7:8080", "https://gear.example"]
        );
        assert_eq!(own("[::1]:80", &[]), ["http://[::1]", "http://localhost"]);
        assert_eq!(
            own("0.0.0.0:8080", &[]),
            ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"]
        );
        assert_eq!(own("[::]:9000", &["http://gear.example:9000/"])[3], "http://gear.example:9000");
    }
}
