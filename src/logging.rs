//! The process's log, and the tally that turns per-connection events into summaries.
//!
//! `init` installs a `log::Log` that never blocks its caller. The caller's record becomes an
//! owned line (level, target, text) handed to a bounded queue with a non-blocking send; a
//! writer thread owns a `simple_logger::SimpleLogger` and passes it each line as a
//! `log::Record` rebuilt from those parts, so simple_logger formats, filters and writes to
//! stderr, off the loop thread. When stderr is slow (a full pipe, a paused terminal) the queue
//! fills and further lines are counted and dropped, never waited for; the writer says how many
//! were lost once it catches up. So the event loop pays for a `format!` and a channel send per
//! line, whatever happens to stderr. Lines are stamped by simple_logger when written, which is
//! within a millisecond of the event unless stderr stalls (and then lines are dropped anyway).
//!
//! `Tally` is sans-IO: the server notes each per-connection event (a client that left without
//! a close frame, a bad frame, a refusal), logs it at `debug`, and prints the counts as one
//! line per kind at most once per `SUMMARY_PERIOD`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};
use simple_logger::SimpleLogger;

/// Lines the queue holds before it starts dropping (a few hundred KiB at most).
const QUEUE_LINES: usize = 4096;

/// How often per-connection events are summarised.
pub(crate) const SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// One record, owned, so that it can cross to the writer thread.
struct Line {
    level: Level,
    target: String,
    text: String,
}

enum Msg {
    Line(Line),
    /// Everything queued before this has been written: tell the sender.
    Flush(mpsc::Sender<()>),
}

struct Sink {
    queue: SyncSender<Msg>,
    /// Written before the message: `p1 ` in the second process of a group, `group ` in its
    /// supervisor, empty when the process serves alone.
    prefix: String,
}

/// Lines dropped since the writer last said so.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The queue, for `flush` (the logger itself is behind `log`'s `&dyn Log`).
static QUEUE: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// Installs the non-blocking logger at `level` (once per process; later calls do nothing).
pub fn init(level: LevelFilter) {
    init_as(level, "");
}

/// `init`, with every line's message preceded by `who` (a process of a group: `p0`, `p1`, …),
/// so that processes sharing one standard error can be told apart.
pub fn init_as(level: LevelFilter, who: &str) {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let prefix = if who.is_empty() { String::new() } else { format!("{who} ") };
    let writer_prefix = prefix.clone();
    let spawned = std::thread::Builder::new()
        .name("gearsock-log".into())
        .spawn(move || write_lines(rx, writer(LevelFilter::Trace), &writer_prefix));
    if spawned.is_err() {
        return; // no thread, no log: the server still runs
    }
    let sink = Sink { queue: tx.clone(), prefix };
    if log::set_logger(Box::leak(Box::new(sink))).is_ok() {
        log::set_max_level(level);
        let _ = QUEUE.set(tx);
    }
}

/// Changes the level of a running process (SIGHUP): lines above it are no longer queued.
pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

/// The writer's formatter. Features (Cargo.toml): `timestamps` in UTC with milliseconds, since
/// a server's log is read beside other machines' and gearmand's; `stderr`, since stdout carries
/// the `listening on` line that scripts read; no `colors`, since the log mostly goes to
/// journald, files and pipes, where escape codes are noise.
fn writer(level: LevelFilter) -> SimpleLogger {
    SimpleLogger::new().with_level(level).with_utc_timestamps()
}

/// Waits (up to `limit`) until every line logged so far is written: called before exit.
pub fn flush(limit: Duration) {
    let Some(queue) = QUEUE.get() else { return };
    let (tx, rx) = mpsc::channel();
    if queue.try_send(Msg::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(limit);
    }
}

fn write_lines(rx: Receiver<Msg>, logger: SimpleLogger, prefix: &str) {
    for msg in rx {
        match msg {
            Msg::Line(line) => write_line(&logger, line.level, &line.target, format_args!("{}", line.text)),
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
        let lost = DROPPED.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let note = format_args!("{prefix}{lost} log lines dropped: stderr was not keeping up");
            write_line(&logger, Level::Warn, module_path!(), note);
        }
    }
}

/// Hands one line to simple_logger as the `Record` it was.
fn write_line(logger: &SimpleLogger, level: Level, target: &str, text: std::fmt::Arguments) {
    logger.log(&Record::builder().level(level).target(target).args(text).build());
}

impl Log for Sink {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // `log::max_level()`, not the level at start: SIGHUP may change it (`set_level`).
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = Line {
            level: record.level(),
            target: record.target().to_string(),
            text: format!("{}{}", self.prefix, record.args()),
        };
        match self.queue.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {}
}

/// A per-connection event worth a count, not a line each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// An open WebSocket ended without a close frame (FIN or reset): a closed tab, a killed
    /// script, a network that went away.
    LeftWithoutClose,
    /// A connection ended before finishing its handshake, without sending a request.
    LeftBeforeHandshake,
    /// A client broke HTTP or WebSocket rules and was closed with an error code.
    Protocol,
    /// No request head within the handshake timeout (slow or half-open clients).
    HandshakeTimeout,
    /// Silent through a keepalive ping.
    IdleTimeout,
    /// Did not answer our close in time.
    CloseTimeout,
    /// Dropped for not reading its replies.
    SlowReader,
    /// Refused with 503 at `--max-connections`.
    Refused,
    /// A socket error other than the peer leaving.
    SocketError,
    /// `accept` failed (out of descriptors or memory); accepting paused.
    AcceptFailed,
    /// Who may run what (issue 19): a message refused `unauthorized`, ...
    Unauthorized,
    /// ... a function (or ping) refused `forbidden`, ...
    Forbidden,
    /// ... a job over `--max-jobs-per-second`, ...
    RateLimited,
    /// ... an upgrade over `--max-connections-per-ip` (429), ...
    OverIpLimit,
    /// ... an `auth` over `--max-connections-per-subject`.
    OverSubjectLimit,
}

impl Event {
    const ALL: [Event; 15] = [
        Event::LeftWithoutClose,
        Event::LeftBeforeHandshake,
        Event::Protocol,
        Event::HandshakeTimeout,
        Event::IdleTimeout,
        Event::CloseTimeout,
        Event::SlowReader,
        Event::Refused,
        Event::SocketError,
        Event::AcceptFailed,
        Event::Unauthorized,
        Event::Forbidden,
        Event::RateLimited,
        Event::OverIpLimit,
        Event::OverSubjectLimit,
    ];

    /// What follows the count in the summary line.
    fn words(self) -> &'static str {
        match self {
            Event::LeftWithoutClose => "clients left without a close frame",
            Event::LeftBeforeHandshake => "connections closed before a handshake",
            Event::Protocol => "clients closed for breaking the protocol (bad frame, bad UTF-8, bad request)",
            Event::HandshakeTimeout => "connections sent no request in time (408)",
            Event::IdleTimeout => "clients closed as idle (no answer to a keepalive ping)",
            Event::CloseTimeout => "clients did not finish the close handshake in time",
            Event::SlowReader => "clients dropped for not reading their replies (1008)",
            Event::Refused => "connections refused at --max-connections (503)",
            Event::SocketError => "connections ended on a socket error",
            Event::AcceptFailed => "accept failures (out of descriptors?); accepting paused each time",
            Event::Unauthorized => "messages refused as unauthorized (no valid client token)",
            Event::Forbidden => "submits refused as forbidden (function not allowed)",
            Event::RateLimited => "jobs refused as rate_limited (--max-jobs-per-second)",
            Event::OverIpLimit => "upgrades refused at --max-connections-per-ip (429)",
            Event::OverSubjectLimit => "authentications refused at --max-connections-per-subject",
        }
    }

    /// The summary's level: what an operator may have to act on is a warning.
    fn level(self) -> Level {
        match self {
            Event::Refused | Event::AcceptFailed | Event::SlowReader => Level::Warn,
            _ => Level::Info,
        }
    }
}

/// Counts of per-connection events since the last summary.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    counts: [u64; Event::ALL.len()],
}

impl Tally {
    /// Counts `event`. True when it is the first since the last summary (arm the timer).
    pub fn note(&mut self, event: Event) -> bool {
        let first = self.is_empty();
        self.counts[event as usize] += 1;
        first
    }

    /// Nothing counted since the last summary.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&n| n == 0)
    }

    /// The summary lines (level and text) for the counts so far, which are reset.
    pub fn take_summary(&mut self, period: Duration) -> Vec<(Level, String)> {
        let secs = period.as_secs_f64();
        let lines = Event::ALL
            .iter()
            .filter(|&&e| self.counts[e as usize] > 0)
            .map(|&e| {
                (e.level(), format!("{} {} in the last {secs:.0} s", self.counts[e as usize], e.words()))
            })
            .collect();
        self.counts = Default::default();
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_events_make_one_line_and_the_tally_starts_again() {
        let mut tally = Tally::default();
        assert!(tally.note(Event::LeftWithoutClose), "the first event arms the summary");
        for _ in 1..1000 {
            assert!(!tally.note(Event::LeftWithoutClose));
        }
        tally.note(Event::Refused);
        let lines = tally.take_summary(SUMMARY_PERIOD);
        assert_eq!(
            lines,
            vec![
                (Level::Info, "1000 clients left without a close frame in the last 10 s".to_string()),
                (
                    Level::Warn,
                    "1 connections refused at --max-connections (503) in the last 10 s".to_string()
                ),
            ]
        );
        assert!(tally.is_empty());
        assert!(tally.take_summary(SUMMARY_PERIOD).is_empty());
        assert!(tally.note(Event::Protocol));
    }
}
