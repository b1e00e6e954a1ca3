//! Each core's own settings, built from the server's `Config` here, by the caller: the cores
//! (`app`, `connection`, `ws`) never see `Config` itself.

use crate::app::AppConfig;
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
        close_timeout: c.close_timeout,
        out_soft_bytes: c.client_out_soft_bytes,
        out_soft_time: c.client_out_soft_time,
        out_hard_bytes: c.client_out_hard_bytes,
    }
}
