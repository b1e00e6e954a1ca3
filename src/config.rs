//! `Config`: every limit, timeout and address of `gearsock serve`, with its default and the reason
//! it exists, checked once by `validate()` at startup and then passed by reference. A leaf (it
//! uses only `os`, and `random` for what an instance id may be): the command line that fills it
//! is `cli`, and each core gets its own small settings struct built from it by the server.

use std::net::SocketAddr;
use std::time::Duration;

use crate::random::{MAX_INSTANCE_ID, is_instance_id};

/// The server's configuration. Each field says its default and why it exists.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the WebSocket/HTTP listener binds. Default `127.0.0.1:8080`, the article's address.
    pub listen: SocketAddr,
    /// The gearmand servers, `HOST:PORT` each. Default `127.0.0.1:4730` (IANA's Gearman port).
    pub gearmand: Vec<String>,
    /// How often a background job's status is polled. Default 100 ms, the article's timer.
    pub poll_interval: Duration,
    /// When set, `worker.complete` must carry `"token": T` (from any peer); when unset only
    /// loopback peers may report values. Default unset.
    pub worker_token: Option<String>,
    /// Open client connections at most. Default: the process's open-file limit minus
    /// `FD_RESERVE`, so that running out of descriptors cannot happen before the limit.
    pub max_connections: usize,
    /// Largest WebSocket message (close 1009 beyond it). Default 64 KiB.
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// A connection must finish its HTTP request or upgrade within this. Default 10 s: stops
    /// clients that connect and say nothing from holding a descriptor forever.
    pub handshake_timeout: Duration,
    /// With no traffic for this long the server pings; with none for twice this it closes
    /// (1001). Default 60 s: dead peers behind NAT are found.
    pub idle_timeout: Duration,
    /// Bytes queued for one client above which it is dropped at once (the hard limit of a
    /// Redis-style soft/hard pair). Default 32 MiB: bounds memory per client whatever it does.
    pub client_out_hard_bytes: usize,
    /// Bytes queued for one client that it may stay above for `client_out_soft_time` before it
    /// is dropped. Default 4 MiB: a reader that keeps up with a burst is never dropped for it.
    pub client_out_soft_bytes: usize,
    /// How long a client may stay above the soft limit. Default 10 s.
    pub client_out_soft_time: Duration,
    /// Bytes queued for all clients together; beyond it the largest backlog is dropped first.
    /// Default 1 GiB: the server's memory stays bounded however many readers stall.
    pub client_out_total_bytes: usize,
    /// Unparsed bytes held per client. Default 64 KiB plus one frame header: a peer that
    /// sends faster than we parse simply stops being read.
    pub client_in_limit_bytes: usize,
    /// Bytes read from one client per loop pass, so one busy client cannot starve the others.
    /// Default 64 KiB.
    pub read_budget_bytes: usize,
    /// tungstenite's read buffer per open connection. Default 512 B: an idle connection costs
    /// little; large messages just take more copies.
    pub ws_read_buffer_bytes: usize,
    /// `Origin` values allowed to open a WebSocket (exact match); empty allows any. Default empty.
    pub allowed_origins: Vec<String>,
    /// Jobs one connection may have unfinished. Default 64 (`too_many_jobs` beyond).
    pub max_jobs_per_connection: usize,
    /// How long a finished job waits for its `worker.complete` value. Default 500 ms.
    pub value_grace: Duration,
    /// How long a value nobody asked for is kept. Default 60 s.
    pub value_ttl: Duration,
    /// Stored values at most (oldest dropped beyond). Default 10,000.
    pub max_stored_values: usize,
    /// Submissions held while no gearmand is connected. Default 1,024 (`unavailable` beyond).
    pub queue_limit: usize,
    /// How long a held submission waits for a gearmand. Default 10 s (`unavailable` after).
    pub queue_timeout: Duration,
    /// First reconnect delay to a lost gearmand; doubles per failure. Default 100 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect delay. Default 5 s.
    pub reconnect_max: Duration,
    /// Largest Gearman packet body accepted from gearmand. A bigger WORK_* packet fails its own
    /// job only (its body is skipped as it streams). Default 16 MiB.
    pub max_job_bytes: usize,
    /// Bytes waiting for one gearmand above which no new job is routed to it (it counts as
    /// stalled). Default 4 MiB.
    pub gearman_out_high_bytes: usize,
    /// ... and below which it takes new jobs again. Default 1 MiB.
    pub gearman_out_low_bytes: usize,
    /// Connecting, an unanswered probe, or owed replies with no byte from gearmand for this
    /// long: the link is dead. Default 5 s.
    pub gearmand_timeout: Duration,
    /// Abandoned stream jobs one gearmand connection may hold before it is retired (a fresh
    /// connection takes new work; the old one closes once its live jobs end, and gearmand drops
    /// the orphans). Default 1024.
    pub max_orphans: usize,
    /// Background jobs and pings one peer address (an IPv6 peer: its /64) may have that
    /// gearmand has not finished, counted until gearmand no longer knows them, also after the
    /// submitting connection closed: gearmand keeps a background job, so a client looping
    /// "connect, submit, leave" would fill its queue. Default 1024.
    pub max_background_per_peer: usize,
    /// Pass clients' `unique` to gearmand unchanged, so that jobs coalesce across clients
    /// (Gearman's own behaviour). Default off: each client's uniques live in its own namespace.
    pub shared_uniques: bool,
    /// Total bytes of stored `worker.complete` values nobody has claimed yet. Default 8 MiB.
    pub max_stored_bytes: usize,
    /// How long a submitted job whose client left keeps running with its events logged, and
    /// how long a job that ended meanwhile keeps its log, for an `attach`; then it is
    /// abandoned as before (zero: at once). Default 30 s.
    pub detach_grace: Duration,
    /// Bytes of events one job's log keeps for an `attach` (the oldest are trimmed; the latest
    /// status and the terminal event never are). Default 256 KiB.
    pub job_log_bytes: usize,
    /// Bytes of events all job logs keep together: past it the oldest detached jobs are
    /// abandoned, then the oldest logs trimmed. Default 256 MiB.
    pub job_log_total_bytes: usize,
    /// After a server-initiated close, how long to wait for the peer to hang up. Default 2 s.
    pub close_timeout: Duration,
    /// Log level (`--log-level`). Default `info`.
    pub log_level: log::LevelFilter,
    /// Echo mode (`--echo`): every text and binary message is sent back as it came, with the
    /// same loop, limits and close handling, and no job protocol: no gearmand is connected to
    /// and the App never sees a message. For conformance suites and echo benchmarks that hold
    /// the loop against other servers. Default off.
    pub echo: bool,
    /// This instance's name among the gearsock instances sharing a gearmand (`--instance-id`):
    /// the uniques of its background jobs and pings start with it, and it takes reports for
    /// them forwarded by other instances as Gearman function `gearsock.report.<id>`. Default
    /// unset: a random id is drawn at startup.
    pub instance_id: Option<String>,
    /// Event-loop processes sharing the listening port (`--processes`). Default 1: this
    /// process serves alone.
    pub processes: usize,
    /// Other instances on the same gearmand that an attach may be relayed to
    /// (`--peer-instance`, repeatable): a resume token naming an instance that is neither one
    /// of these nor another process of this one's group is answered `unknown_job`, since
    /// nobody may serve its desk. Default none.
    pub peer_instances: Vec<String>,
    /// How long the owner of a relayed attach has to answer before the attach is refused
    /// (`--relay-answer-ms`). Default 5 s.
    pub relay_answer: Duration,
    /// Set in a process the group's supervisor started (the internal flags `--group-slot` and
    /// `--group-board`): its seat in the group. Default unset.
    pub group_child: Option<GroupChild>,
    /// A WebSocket message must be whole this long after its first frame began, or the client is
    /// closed with 1008 (`--message-timeout-ms`). Default 30 s: an unfinished message holds up
    /// to a message's worth of memory, and without this any byte (a pong) would keep it forever.
    pub message_timeout: Duration,
    /// Unfinished client input held by all clients together: unparsed bytes plus the parts of
    /// fragmented messages not yet whole (`--client-in-total-bytes`). Past it the largest
    /// holder is closed first (1008). Default 256 MiB: a few thousand half-sent messages, not
    /// the machine.
    pub client_in_total_bytes: usize,
    /// Origins besides the listening address under which our own page is served, such as the
    /// name a reverse proxy serves it under (`--public-origin`, repeatable). A page from one of
    /// these counts as our own for trust; the request's `Host` never does. Default none.
    pub public_origins: Vec<String>,
    /// Run the event loop under `SCHED_BATCH` (`--sched-batch`): its wake-ups do not preempt
    /// the task on its CPU, so a gearmand on the same core is not cut off after every packet it
    /// writes and the loop takes larger batches. Default off: on a busy CPU a wake-up may wait
    /// up to a scheduler slice.
    pub sched_batch: bool,
    // Issue 19 (who may run what): the function allow-list, client tokens, quotas.
    /// Function patterns a client may `submit` (`--allow-function`, repeatable): an exact
    /// name, or a prefix ending in `*`. Default none: deny by default, since any client that
    /// reaches the port could otherwise run any Gearman function. `gearsock.*` never passes.
    pub allow_functions: Vec<String>,
    /// The article's `{"type":"ping"}` is refused (`--no-ping`). Default off: the article's flow
    /// works with no flag.
    pub no_ping: bool,
    /// The text of `--client-token-key-file` (one HS256 secret per line), read and checked by
    /// the command line. When set, a client must present a token signed with one of them
    /// before anything else. Default unset: no tokens.
    pub client_token_keys: Option<String>,
    /// Clock skew allowed on a token's `exp`, `nbf` and `iat` (`--token-leeway-s`). Default 30.
    pub token_leeway_s: u64,
    /// Jobs (submits and pings) per second per connection, or per token subject when tokens
    /// are on (`--max-jobs-per-second`); beyond: `rate_limited`. Default 0: off.
    pub max_jobs_per_second: u32,
    /// The bucket's size (`--jobs-burst`). Default 0: the per-second rate.
    pub jobs_burst: u32,
    /// Open WebSockets per peer address (`--max-connections-per-ip`); one more upgrade gets
    /// 429. Default 0: off (behind a proxy every client shares its address).
    pub max_connections_per_ip: usize,
    /// Open, authenticated connections per token subject (`--max-connections-per-subject`).
    /// Default 0: off.
    pub max_connections_per_subject: usize,
    /// A second listener on the same loop for `/metrics`, `/livez`, `/readyz` and `/healthz`
    /// only, no WebSocket (`--admin-listen`); the client port then answers those 404. Default
    /// unset: they are on the client port, as before, for a setup that has only one.
    pub admin_listen: Option<SocketAddr>,
    /// Serve the demo page at `/` on the client port (`--no-demo-page` turns it off). Default
    /// on: the article's page is the first thing a new user opens.
    pub demo_page: bool,
}

/// A child's seat in a group of `--processes`: which slot it serves in, and the descriptor of
/// the shared memory where every member publishes its figures (inherited from the supervisor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupChild {
    /// 0 to `processes - 1`; its log lines name it `p<slot>`.
    pub slot: usize,
    /// The shared memory's file descriptor.
    pub board_fd: i32,
}

/// Descriptors kept back from `max_connections`: listener, poll, gearmand links, logs.
pub(crate) const FD_RESERVE: usize = 64;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            gearmand: vec!["127.0.0.1:4730".to_string()],
            poll_interval: Duration::from_millis(100),
            worker_token: None,
            max_connections: open_file_limit().saturating_sub(FD_RESERVE).max(1),
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            client_out_hard_bytes: 32 * 1024 * 1024,
            client_out_soft_bytes: 4 * 1024 * 1024,
            client_out_soft_time: Duration::from_secs(10),
            client_out_total_bytes: 1024 * 1024 * 1024,
            client_in_limit_bytes: 64 * 1024 + 14,
            read_budget_bytes: 64 * 1024,
            ws_read_buffer_bytes: 512,
            allowed_origins: Vec::new(),
            max_jobs_per_connection: 64,
            value_grace: Duration::from_millis(500),
            value_ttl: Duration::from_secs(60),
            max_stored_values: 10_000,
            queue_limit: 1024,
            queue_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_job_bytes: 16 * 1024 * 1024,
            gearman_out_high_bytes: 4 * 1024 * 1024,
            gearman_out_low_bytes: 1024 * 1024,
            gearmand_timeout: Duration::from_secs(5),
            max_orphans: 1024,
            max_background_per_peer: 1024,
            shared_uniques: false,
            max_stored_bytes: 8 * 1024 * 1024,
            detach_grace: Duration::from_secs(30),
            job_log_bytes: 256 * 1024,
            job_log_total_bytes: 256 * 1024 * 1024,
            close_timeout: Duration::from_secs(2),
            log_level: log::LevelFilter::Info,
            echo: false,
            instance_id: None,
            processes: 1,
            peer_instances: Vec::new(),
            relay_answer: Duration::from_secs(5),
            group_child: None,
            sched_batch: false,
            message_timeout: Duration::from_secs(30),
            client_in_total_bytes: 256 * 1024 * 1024,
            public_origins: Vec::new(),
            allow_functions: Vec::new(),
            no_ping: false,
            client_token_keys: None,
            token_leeway_s: 30,
            max_jobs_per_second: 0,
            jobs_burst: 0,
            max_connections_per_ip: 0,
            max_connections_per_subject: 0,
            admin_listen: None,
            demo_page: true,
        }
    }
}

impl Config {
    /// The instances an attach may be relayed to: the other processes of this one's group
    /// (named `BASE-0` … `BASE-(N-1)` by its supervisor, this one `BASE-slot`), then each
    /// `--peer-instance`.
    pub fn known_peers(&self) -> Vec<String> {
        let mut peers = Vec::new();
        if let (Some(child), Some(id)) = (&self.group_child, &self.instance_id)
            && let Some(base) = id.strip_suffix(&format!("-{}", child.slot))
        {
            peers.extend((0..self.processes).filter(|&i| i != child.slot).map(|i| format!("{base}-{i}")));
        }
        peers.extend(self.peer_instances.iter().cloned());
        peers
    }

    /// Checks the limits against each other and against the machine.
    pub fn validate(&self) -> Result<(), String> {
        let files = open_file_limit();
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_background_per_peer == 0 {
            return Err("--max-background-per-peer must be at least 1".into());
        }
        if self.max_connections.saturating_add(FD_RESERVE) > files {
            return Err(format!(
                "--max-connections {} does not fit the open-file limit {files} (keep {FD_RESERVE} spare)",
                self.max_connections
            ));
        }
        if self.gearmand.is_empty() && !self.echo {
            return Err("at least one --gearmand is needed".into());
        }
        for addr in &self.gearmand {
            host_port("--gearmand", addr)?;
        }
        self.refuse_zeros()?;
        if self.worker_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            // An empty token would let anyone who sends "token": "" report results.
            return Err("--worker-token is empty".into());
        }
        if let Some(id) = &self.instance_id
            && !is_instance_id(id)
        {
            return Err(format!(
                "--instance-id {id:?}: 1 to {MAX_INSTANCE_ID} characters of A-Z a-z 0-9 _ -"
            ));
        }
        if let Some(bad) = self.peer_instances.iter().find(|id| !is_instance_id(id)) {
            return Err(format!(
                "--peer-instance {bad:?}: 1 to {MAX_INSTANCE_ID} characters of A-Z a-z 0-9 _ -"
            ));
        }
        if self.processes == 0 || self.processes > MAX_PROCESSES {
            return Err(format!("--processes is 1 to {MAX_PROCESSES}"));
        }
        match (&self.group_child, &self.instance_id) {
            (Some(child), _) if child.slot >= self.processes => {
                return Err("--group-slot is beyond --processes".into());
            }
            // Each child is named `{id}-{slot}`: the id must leave room for the longest suffix.
            (None, Some(id)) if self.processes > 1 && id.len() > max_group_base(self.processes) => {
                return Err(format!(
                    "--instance-id {id:?} is too long for --processes {}: each process is named \
                     ID-N, so ID may have at most {} characters",
                    self.processes,
                    max_group_base(self.processes)
                ));
            }
            _ => {}
        }
        if self.max_frame_bytes > self.max_message_bytes {
            return Err("--max-frame-bytes cannot exceed --max-message-bytes".into());
        }
        if self.max_message_bytes < 64 {
            return Err("--max-message-bytes must be at least 64".into());
        }
        // One client may hold a full input buffer plus a whole message inside tungstenite.
        let one_client = self.client_in_limit_bytes.saturating_add(self.max_message_bytes);
        if self.client_in_total_bytes < one_client {
            return Err(format!(
                "--client-in-total-bytes must hold one client's input: at least {one_client}"
            ));
        }
        if let Some(bad) = self.public_origins.iter().find(|o| !is_origin(o)) {
            return Err(format!(
                "--public-origin {bad:?}: an origin is http:// or https:// and a host, with no path \
                 (http://gear.example:8080)"
            ));
        }
        if self.client_out_soft_bytes > self.client_out_hard_bytes
            || self.client_out_hard_bytes > self.client_out_total_bytes
        {
            return Err(format!(
                "--client-out-soft-bytes {} / --client-out-hard-bytes {} / --client-out-total-bytes {}: \
                 expected soft <= hard <= total (a reader above the hard limit is dropped at once)",
                self.client_out_soft_bytes, self.client_out_hard_bytes, self.client_out_total_bytes
            ));
        }
        if self.max_job_bytes > u32::MAX as usize {
            return Err("--max-job-bytes is at most 4294967295 (Gearman's size field)".into());
        }
        if self.gearman_out_low_bytes > self.gearman_out_high_bytes {
            return Err("gearman output low water mark above the high one".into());
        }
        if self.reconnect_min > self.reconnect_max || self.reconnect_min.is_zero() {
            return Err("--reconnect-min-ms must be above zero and at most --reconnect-max-ms".into());
        }
        if self.echo && self.client_out_soft_bytes < echo_frame_bytes(self.max_message_bytes) {
            return Err("with --echo, --client-out-soft-bytes must hold one echoed message".into());
        }
        if self.max_connections_per_subject > 0 && self.client_token_keys.is_none() {
            return Err(
                "--max-connections-per-subject needs --client-token-key-file (subjects come from tokens)"
                    .into(),
            );
        }
        if self.jobs_burst > 0 && self.max_jobs_per_second == 0 {
            return Err("--jobs-burst needs --max-jobs-per-second".into());
        }
        Ok(())
    }

    /// Zero where zero means nothing (no time to finish, no byte allowed): refused by name
    /// rather than left to drop every client or spin.
    fn refuse_zeros(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis() as usize;
        let must_be_positive = [
            ("--max-jobs-per-connection", self.max_jobs_per_connection),
            ("--max-frame-bytes", self.max_frame_bytes),
            ("--max-job-bytes", self.max_job_bytes),
            ("--max-stored-bytes", self.max_stored_bytes),
            ("--client-out-soft-bytes", self.client_out_soft_bytes),
            ("--client-out-hard-bytes", self.client_out_hard_bytes),
            ("--client-out-total-bytes", self.client_out_total_bytes),
            ("--poll-interval-ms", ms(self.poll_interval)),
            ("--handshake-timeout-ms", ms(self.handshake_timeout)),
            ("--idle-timeout-ms", ms(self.idle_timeout)),
            ("--gearmand-timeout-ms", ms(self.gearmand_timeout)),
            ("--message-timeout-ms", ms(self.message_timeout)),
            ("--client-out-soft-ms", ms(self.client_out_soft_time)),
            ("--value-ttl-ms", ms(self.value_ttl)),
            ("--queue-timeout-ms", ms(self.queue_timeout)),
            ("--relay-answer-ms", ms(self.relay_answer)),
        ];
        match must_be_positive.iter().find(|(_, n)| *n == 0) {
            Some((flag, _)) => Err(format!("{flag} 0: expected at least 1 (zero would allow nothing)")),
            None => Ok(()),
        }
    }

    /// In echo mode every message comes back whole, so the output limits must hold what a
    /// client that reads its echoes can have queued: the soft limit at least one echoed
    /// message, and the hard limit at least the soft one plus what one pass can add (the rest
    /// of a message that began earlier, plus a read budget of small ones: an echo frame is
    /// never longer than the client frame it answers). Reading a client pauses while its
    /// backlog is above the soft limit, so with these a reader is never dropped by the hard
    /// limit, and one that stops reading is still dropped by the soft one. Limits already
    /// larger are kept.
    pub fn fit_output_limits_to_echo(&mut self) {
        let message = echo_frame_bytes(self.max_message_bytes);
        self.client_out_soft_bytes = self.client_out_soft_bytes.max(message);
        let pass = message.saturating_add(self.read_budget_bytes);
        self.client_out_hard_bytes =
            self.client_out_hard_bytes.max(self.client_out_soft_bytes.saturating_add(pass));
        self.client_out_total_bytes = self.client_out_total_bytes.max(self.client_out_hard_bytes);
    }
}

/// `HOST:PORT` with a port 1 to 65535 and a host (`[::1]` for IPv6): what `--gearmand` takes.
/// Only the syntax: the name is looked up later, off the loop, and retried as gearmand may be.
pub(crate) fn host_port(flag: &str, text: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{flag} {text:?}: expected HOST:PORT with a port 1 to 65535 (127.0.0.1:4730, gear.example:4730, [::1]:4730)"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => is_host(host),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// A host name or IPv4 address: letters, digits, `-` and `.`, not empty.
pub(crate) fn is_host(host: &str) -> bool {
    !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `scheme://host[:port]` as a browser sends it in `Origin`: http or https, a host, nothing after.
fn is_origin(text: &str) -> bool {
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
    rest.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' ', '@']))
}

/// Most `--processes`.
pub(crate) const MAX_PROCESSES: usize = 64;

/// The longest `--instance-id` a group of `processes` can extend with `-{slot}` for each child.
pub(crate) fn max_group_base(processes: usize) -> usize {
    let digits = processes.saturating_sub(1).max(1).ilog10() as usize + 1;
    MAX_INSTANCE_ID.saturating_sub(1 + digits)
}

/// Bytes one echoed message of `max_message_bytes` takes in a client's output: the payload
/// plus the largest server frame header (10 bytes).
fn echo_frame_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add(10)
}

/// The soft limit on open files of this process (what `accept` runs into).
pub(crate) fn open_file_limit() -> usize {
    crate::os::open_file_limits().0
}
