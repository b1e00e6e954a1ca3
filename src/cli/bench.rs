//! `gearsock bench`'s flags, parsed into `BenchOptions`. Only in a build with the `bench`
//! feature (the default): without it the server has no load generator, and the compiler, not a
//! rule in a table, keeps the server from using one.

use std::time::Duration;

use super::{Command, VERSION, value};
use crate::bench::{BenchOptions, Mode, sized_message};

const BENCH_HELP: &str = "\
gearsock bench: load generator for any server speaking gearsock's WebSocket protocol

usage: gearsock bench MODE [flags]

modes:
  connect     open --connections with --concurrency handshakes in flight: handshakes/s,
              handshake latency, failures; --hold S keeps them idle; --pid P reports the
              server's RSS growth per idle connection; --baseline compares the handshakes
              with a minimal acceptor's
  roundtrip   --connections x --in-flight messages outstanding for --duration-s after
              --warmup-s: messages/s, latency, and every reply checked
  jobs        stream jobs {\"type\":\"submit\",...} kept --in-flight per connection, each
              waiting for job.complete: jobs/s, latency (the server allows 64 per connection
              by default)
  mixed       --in-flight stream and background jobs of --function (default ping, for
              `gearsock worker`) per connection, one article ping at a time, and with
              --spawn-workers jobs that fail and throw; every reply recorded per job, then
              the reconcile: each job sent got exactly one terminal reply, or was never read
              by a server that closed first (exit 1 otherwise); --sigterm-after-s S stops the
              --pid server under load; --interval-s N samples latency, RSS and descriptors
  churn       --cycles whole connections, --connections at once, each: connect, upgrade,
              one round trip (--message), close handshake, close: cycles/s; --pid P reads
              the server's RSS and open descriptors before, after each tenth and at the end
              (once it has reaped the connections); fails if a cycle failed, if RSS grew more
              than --max-growth-pct from the first tenth to the end, or if descriptors did not
              come back
  flood       a half-open flood at the limit of a server started with --max-connections N
              (--slots N) and --handshake-timeout-ms T (same flag here): --connections real
              clients do a round trip every --interval-ms, then child processes open the
              other N - connections slots and --beyond more, each sending a valid upgrade
              one byte every --trickle-interval-ms; needs --pid. Fails unless the real
              clients are served throughout, every trickler gets 408 (or 503 beyond the
              limit), the server's CPU stays under --max-cpu-pct, N - connections new
              connections open afterwards and the server's descriptors come back

flags:
  --url URL              the server (ws://127.0.0.1:8080)
  --connections N        connections (100); one process opens at most ~19,000
  --in-flight W          outstanding messages or jobs per connection (1)
  --duration-s D         measured seconds, fractions allowed (10)
  --warmup-s S           unmeasured seconds of load first (1)
  --concurrency C        handshakes in flight while connecting (100)
  --hold S               connect: keep all connections open, idle, S seconds (0)
  --pid P                the server's pid: connect reports its VmRSS before and after (start
                         a fresh server: memory freed by earlier clients is reused); roundtrip
                         and jobs its CPU use; the connect and roundtrip baselines run on
                         its CPUs
  --message TEXT         roundtrip text, which must get exactly one reply (default: the
                         article's worker.complete, answered `got it!`)
  --message-bytes N      roundtrip: a message of N bytes of printable ASCII instead
  --binary               roundtrip: send the message as binary frames; replies must be binary
  --expect TEXT          roundtrip: the reply each message must get (custom message: any
                         text but an {\"type\":\"error\",...} reply); `--expect echo`: the
                         message itself, as an echo server (gearsock serve --echo) answers
  --function F           jobs: Gearman function (echo); mixed: of its stream and background jobs (ping)
                         (the server denies submit by default: start it with --allow-function F,
                         and for mixed also fail and boom)
  --payload-bytes N      jobs: payload size (16)
  --gearmand HOST:PORT   jobs, mixed: gearmand for --baseline and --spawn-workers (127.0.0.1:4730)
  --gearmand-pid P       jobs: gearmand's pid, for its CPU use over the window
  --spawn-workers K      jobs, mixed: run K demo workers (echo, reverse, fail, boom) in this process
  --baseline             connect: also a minimal upgrade acceptor (a canned 101, then idle)
                         in a child process, same connections and concurrency;
                         roundtrip: also a plain TCP line-echo server inside this process;
                         jobs: also a direct Gearman client; results shown side by side
  --baseline-cpu N       run that acceptor or echo server on CPU N (default: the CPUs of --pid)
  --threads N            client event loops (1)
  --source-ips N         spread connections over N source addresses (loopback targets; auto)
  --source-base ADDR     first source address (127.0.0.1); give each process its own range
  --timeout-s S          a connection not up after S seconds fails (10); churn: a cycle not over
  --interval-s N         mixed: a sample every N seconds: job latency, --pid's RSS and fds
  --sigterm-after-s S    mixed: SIGTERM to --pid S seconds into the load (at most --duration-s)
  --settle-s S           mixed: wait up to S seconds for the last replies (15); churn, flood:
                         at most S s for the server's descriptors to settle (10)
  --cycles N             churn: cycles in all (100000)
  --max-growth-pct G     churn: allowed RSS growth from the first tenth to the end (1)
  --slots N              flood: the server's --max-connections
  --handshake-timeout-ms T  flood: the server's handshake timeout (10000)
  --beyond B             flood: tricklers beyond the free slots (50)
  --interval-ms I        flood: a real client's pace, one round trip per I ms (10)
  --trickle-interval-ms I  flood: one byte of the upgrade request per I ms (500)
  --per-process K        flood: tricklers per child process, at most (4000); each process
                         uses --source-ips addresses (4), from --source-base (127.0.0.2) on
  --max-cpu-pct P        flood: the server's CPU over the flood, at most (50)
  --json                 print one JSON object instead of the table
  -h, --help             this text
  -V, --version          the version

The exit status is 1 when any error, mismatched reply or failed connection was counted.
";

/// Parses `gearsock bench` flags.
pub(super) fn parse_bench(parser: &mut lexopt::Parser) -> Result<Command, String> {
    use lexopt::Arg::{Long, Short, Value};
    let mut o = BenchOptions::default();
    let mut mode = None;
    let (mut message_given, mut message_bytes) = (false, None);
    let mut function = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("url") => o.url = value(parser)?,
            Long("connections") => o.connections = value(parser)?,
            Long("in-flight") => o.in_flight = value(parser)?,
            Long("duration-s") => o.duration = seconds(parser)?,
            Long("warmup-s") => o.warmup = seconds(parser)?,
            Long("concurrency") => o.concurrency = value(parser)?,
            Long("hold" | "hold-s") => o.hold = seconds(parser)?,
            Long("pid") => o.pid = Some(value(parser)?),
            Long("gearmand-pid") => o.gearmand_pid = Some(value(parser)?),
            Long("message") => {
                o.message = value(parser)?;
                message_given = true;
            }
            Long("message-bytes") => message_bytes = Some(value::<usize>(parser)?),
            Long("binary") => o.binary = true,
            Long("expect") => o.expect = Some(value(parser)?),
            Long("function") => function = Some(value(parser)?),
            Long("payload-bytes") => o.payload_bytes = value(parser)?,
            Long("gearmand") => o.gearmand = value(parser)?,
            Long("spawn-workers") => o.spawn_workers = value(parser)?,
            Long("baseline") => o.baseline = true,
            Long("baseline-cpu") => o.baseline_cpu = Some(value(parser)?),
            Long("json") => o.json = true,
            Long("threads") => o.threads = value(parser)?,
            Long("source-ips") => o.source_ips = Some(value(parser)?),
            Long("source-base") => o.source_base = value(parser)?,
            Long("timeout-s") => o.timeout = seconds(parser)?,
            Long("interval-s") => o.interval = seconds(parser)?,
            Long("sigterm-after-s") => o.sigterm_after = Some(seconds(parser)?),
            Long("settle-s") => o.settle = Some(seconds(parser)?),
            Long("cycles") => o.cycles = value(parser)?,
            Long("max-growth-pct") => o.max_growth_pct = value(parser)?,
            Long("slots") => o.slots = Some(value(parser)?),
            Long("handshake-timeout-ms") => o.handshake_timeout = Duration::from_millis(value(parser)?),
            Long("beyond") => o.beyond = value(parser)?,
            Long("interval-ms") => {
                let ms: f64 = value(parser)?;
                o.pace = Duration::try_from_secs_f64(ms / 1000.0)
                    .map_err(|e| format!("bad interval {ms}: {e}"))?;
            }
            Long("trickle-interval-ms") => o.trickle_interval = Duration::from_millis(value(parser)?),
            Long("per-process") => o.per_process = value(parser)?,
            Long("max-cpu-pct") => o.max_cpu_pct = value(parser)?,
            Long("help") | Short('h') => return Ok(Command::Help(BENCH_HELP.into())),
            Long("version") | Short('V') => return Ok(Command::Help(VERSION.into())),
            Value(v) if mode.is_none() => {
                mode = Some(v.into_string().map_err(|_| "MODE is not UTF-8")?.parse::<Mode>()?);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    o.mode = mode.ok_or("MODE is missing: connect, roundtrip, jobs, mixed, churn or flood (try --help)")?;
    if let Some(len) = message_bytes {
        if message_given {
            return Err("give --message or --message-bytes, not both".into());
        }
        o.message = sized_message(len);
    }
    // mixed's jobs go to `gearsock worker`'s function by default; jobs' to the demo echo.
    o.function = function.unwrap_or_else(|| if o.mode == Mode::Mixed { "ping".into() } else { o.function });
    o.validate()?;
    Ok(Command::Bench(Box::new(o)))
}

/// Parses seconds, fractions allowed.
fn seconds(parser: &mut lexopt::Parser) -> Result<Duration, String> {
    let secs: f64 = value(parser)?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {secs}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::EXPECT_ECHO;

    fn bench(list: &[&str]) -> Result<BenchOptions, String> {
        let mut parser = lexopt::Parser::from_args(list.iter().map(std::ffi::OsString::from));
        match parse_bench(&mut parser)? {
            Command::Bench(o) => Ok(*o),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn flags_parse_with_fractional_seconds() {
        let o =
            bench(&["roundtrip", "--connections", "5", "--in-flight", "3", "--duration-s", "1.5", "--json"])
                .expect("parses");
        assert_eq!((o.mode, o.connections, o.in_flight), (Mode::Roundtrip, 5, 3));
        assert_eq!(o.duration, Duration::from_millis(1500));
        assert!(o.json);
    }

    #[test]
    fn too_many_connections_suggest_several_processes() {
        let err = bench(&["connect", "--connections", "100000000"]).unwrap_err();
        assert!(err.contains("several"), "{err}");
    }

    #[test]
    fn echo_roundtrips_parse_with_a_sized_binary_message() {
        let o =
            bench(&["roundtrip", "--message-bytes", "40", "--binary", "--expect", "echo"]).expect("parses");
        assert_eq!(o.message.len(), 40);
        assert!(o.message.bytes().all(|b| b.is_ascii_alphanumeric()), "{}", o.message);
        assert!(o.binary && o.expect.as_deref() == Some(EXPECT_ECHO));
        let err = bench(&["roundtrip", "--message", "x", "--message-bytes", "3"]).unwrap_err();
        assert!(err.contains("not both"), "{err}");
        let too_big = (64 * 1024 * 1024).to_string();
        assert!(bench(&["roundtrip", "--message-bytes", &too_big]).unwrap_err().contains("at most"));
    }

    #[test]
    fn mode_is_required_and_checked() {
        assert!(bench(&[]).unwrap_err().contains("MODE"));
        assert!(bench(&["nap"]).unwrap_err().contains("connect, roundtrip, jobs, mixed, churn or flood"));
    }
}
