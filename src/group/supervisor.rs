//! The supervisor of a group: the parent process of `gearsock serve --processes N` (N > 1).
//!
//! It is no event loop and serves no client. It reserves the address, creates the board,
//! starts N children (this same binary, re-executed), prints the one `listening on ws://ADDR`
//! line once every child said it listens, then watches them in a plain loop: a short wait for
//! what the children print, a `try_wait` of each, a restart when one is due. On SIGINT or
//! SIGTERM it sends every child SIGTERM (each closes its clients with 1001, as a lone server
//! does), waits for them within a bound, then kills what is left, and exits 0.
//!
//! ```text
//!   seat:  running --exits (not stopping)--> waiting (back-off) --due--> running
//!            |                                    ^   spawn failed: back-off again
//!            +-- SIGINT/SIGTERM to the supervisor: SIGTERM, wait, SIGKILL at the bound
//! ```
//!
//! - **The address.** A concrete port is reserved first (port 0 picks one): a plain bind proves
//!   nobody listens there, then a socket bound with `SO_REUSEPORT` that never listens holds the
//!   port for the group's lifetime. Not listening, it is in no accept group: the kernel spreads
//!   connections over the children's listeners only.
//! - **Children.** Each gets the supervisor's own arguments, then `--listen ADDR` (the reserved
//!   address), `--instance-id BASE-i` (BASE is the supervisor's `--instance-id`, or one random
//!   id), and the internal `--group-slot i --group-board FD`; later flags win, so nothing has
//!   to be taken out. Slot i always gets the same id: a restarted child takes over its
//!   predecessor's name. Each child dies with the supervisor (`PR_SET_PDEATHSIG`: SIGTERM,
//!   so its clients still get 1001).
//! - **Back-off.** A child that exits is restarted after 100 ms, doubling for each quick death up
//!   to 5 s; a child that stayed up 10 s starts the series again.

use std::error::Error;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use socket2::{Domain, Socket, Type};

use super::board::Board;
use crate::config::Config;
use crate::random::Entropy;

/// First restart delay.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest restart delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A child up this long before it died starts the back-off series again.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long the children have to say they listen, at startup.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The supervisor's pace: children's lines, exits and due restarts are looked at this often.
const TICK: Duration = Duration::from_millis(50);
/// What SIGTERM'd children get beyond their own close grace before they are killed.
const STOP_MARGIN: Duration = Duration::from_secs(3);
/// Characters of a random base id, as for a lone server's id: each process's id and `.` come
/// before every unique it makes, so a short one leaves clients more of gearmand's 63 bytes.
const RANDOM_BASE_CHARS: usize = 6;
/// Bytes a process's figures may take on the board: the counters and gauges, plus a gearmand's
/// view per `--gearmand`.
fn payload_bytes(cfg: &Config) -> usize {
    8 * 1024 + 1024 * cfg.gearmand.len()
}

/// Runs the group until SIGINT or SIGTERM; `args` are the supervisor's own (without the program
/// name), given again to every child. The exit status: 0 after a stop by signal.
pub fn run(cfg: &Config, args: &[OsString]) -> Result<i32, Box<dyn Error>> {
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
    }
    // SIGHUP is each child's to act on (it re-reads its settings): passed on, never a stop.
    let hup = Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(SIGHUP, Arc::clone(&hup))?;
    let (_reservation, addr) =
        reserve(cfg.listen).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let base = match &cfg.instance_id {
        Some(id) => id.clone(),
        None => Entropy::os().name(RANDOM_BASE_CHARS),
    };
    let board = Board::create(cfg.processes, payload_bytes(cfg))
        .map_err(|e| format!("cannot create the group's shared memory: {e}"))?;
    let (said, lines) = mpsc::channel();
    let mut group = Group {
        exe: std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start it again: {e}"))?,
        args: args.to_vec(),
        addr,
        base,
        board,
        seats: (0..cfg.processes).map(Seat::new).collect(),
        said,
        grace: cfg.close_timeout + STOP_MARGIN,
    };
    if let Err(e) = group.start(&lines, &signal) {
        group.stop();
        return Err(e.into());
    }
    if signal.load(Ordering::SeqCst) == 0 {
        println!("listening on ws://{addr}");
        let _ = std::io::stdout().flush();
        let pids: Vec<String> = group.seats.iter().map(|s| s.pid().to_string()).collect();
        info!(
            "{} processes listening on ws://{addr} (pids {}; instance ids {}-0 to {}-{})",
            cfg.processes,
            pids.join(", "),
            group.base,
            group.base,
            cfg.processes - 1
        );
        group.supervise(&lines, &signal, &hup);
    }
    info!("signal [{}]: stopping {} processes", signal.load(Ordering::SeqCst), cfg.processes);
    group.stop();
    info!("stopped");
    Ok(0)
}

/// A port of our own on `addr`'s address (port 0: one the kernel picks), held by a socket bound
/// with `SO_REUSEPORT` that never listens, so the children can bind it too.
fn reserve(addr: SocketAddr) -> std::io::Result<(Socket, SocketAddr)> {
    let socket = || {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        Ok::<_, std::io::Error>(s)
    };
    // The bind a lone server makes: it fails while anyone listens there (another group too),
    // and picks the port when asked for 0.
    let probe = socket()?;
    probe.bind(&addr.into())?;
    let addr = probe.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP address"))?;
    drop(probe);
    let held = socket()?;
    held.set_reuse_port(true)?;
    held.bind(&addr.into())?;
    Ok((held, addr))
}

/// The next restart delay, given the one due now and how long the child was up: `delay` is
/// what to wait now, and is left doubled (at most `BACKOFF_MAX`) for the next death.
pub(crate) fn next_delay(delay: &mut Duration, up_for: Duration) -> Duration {
    if up_for >= STABLE_AFTER {
        *delay = BACKOFF_MIN;
    }
    let wait = *delay;
    *delay = (*delay * 2).min(BACKOFF_MAX);
    wait
}

/// How a child ended, for the log.
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        (None, None) => format!("ended ({status})"),
    }
}

/// The arguments of the child in `slot`: the supervisor's, then what makes it a member.
pub(crate) fn child_args(
    args: &[OsString],
    addr: SocketAddr,
    base: &str,
    slot: usize,
    board_fd: i32,
) -> Vec<OsString> {
    let mut out = args.to_vec();
    let extra = [
        "--listen".to_string(),
        addr.to_string(),
        "--instance-id".into(),
        format!("{base}-{slot}"),
        "--group-slot".into(),
        slot.to_string(),
        "--group-board".into(),
        board_fd.to_string(),
    ];
    out.extend(extra.into_iter().map(OsString::from));
    out
}

/// One slot of the group.
struct Seat {
    slot: usize,
    child: Option<Child>,
    started: Instant,
    /// The delay before the next restart.
    delay: Duration,
    restart_at: Option<Instant>,
    listening: bool,
}

impl Seat {
    fn new(slot: usize) -> Seat {
        Seat {
            slot,
            child: None,
            started: Instant::now(),
            delay: BACKOFF_MIN,
            restart_at: None,
            listening: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

/// What a child printed: its slot, its pid, the line.
type Said = (usize, u32, String);

struct Group {
    exe: PathBuf,
    args: Vec<OsString>,
    addr: SocketAddr,
    base: String,
    board: Board,
    seats: Vec<Seat>,
    said: Sender<Said>,
    grace: Duration,
}

impl Group {
    /// Starts every child and waits until each says it listens.
    fn start(&mut self, lines: &Receiver<Said>, signal: &AtomicUsize) -> Result<(), String> {
        for slot in 0..self.seats.len() {
            self.spawn(slot).map_err(|e| format!("cannot start process p{slot}: {e}"))?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.seats.iter().all(|s| s.listening) && signal.load(Ordering::SeqCst) == 0 {
            match lines.recv_timeout(TICK) {
                Ok(said) => self.heard(said),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("lost the children's output".into()),
            }
            for seat in &mut self.seats {
                let Some(child) = &mut seat.child else { continue };
                if let Ok(Some(status)) = child.try_wait() {
                    seat.child = None;
                    self.board.set_pid(seat.slot, 0);
                    return Err(format!("process p{} {} before it listened", seat.slot, describe(status)));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the processes did not all listen within {} s", READY_TIMEOUT.as_secs()));
            }
        }
        Ok(())
    }

    /// Until SIGINT or SIGTERM: children that exit are restarted with back-off.
    fn supervise(
        &mut self,
        lines: &Receiver<Said>,
        signal: &AtomicUsize,
        hup: &std::sync::atomic::AtomicBool,
    ) {
        while signal.load(Ordering::SeqCst) == 0 {
            if hup.swap(false, Ordering::SeqCst) {
                info!("SIGHUP: passed to every process");
                for child in self.seats.iter().filter_map(|s| s.child.as_ref()) {
                    // SAFETY: kill(2) with a pid of our own child, which is not reaped yet.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
                }
            }
            match lines.recv_timeout(TICK) {
                Ok(said) => self.heard(said),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            if signal.load(Ordering::SeqCst) != 0 {
                break; // a child that ends now ends because of the same signal: no restart
            }
            let now = Instant::now();
            for seat in &mut self.seats {
                let Some(child) = &mut seat.child else { continue };
                let Ok(Some(status)) = child.try_wait() else { continue };
                let pid = child.id();
                seat.child = None;
                seat.listening = false;
                self.board.set_pid(seat.slot, 0);
                let up_for = now.saturating_duration_since(seat.started);
                let wait = next_delay(&mut seat.delay, up_for);
                seat.restart_at = Some(now + wait);
                warn!(
                    "process p{} (pid {pid}) {} after {:.1} s; restarting it in {} ms",
                    seat.slot,
                    describe(status),
                    up_for.as_secs_f64(),
                    wait.as_millis()
                );
            }
            for slot in 0..self.seats.len() {
                if self.seats[slot].restart_at.is_none_or(|at| at > now) {
                    continue;
                }
                self.seats[slot].restart_at = None;
                match self.spawn(slot) {
                    Ok(pid) => {
                        self.board.count_restart(slot);
                        let restarts = self.board.seat(slot).restarts;
                        info!("process p{slot} restarted as pid {pid} (restart {restarts} of this slot)");
                    }
                    Err(e) => {
                        let seat = &mut self.seats[slot];
                        let wait = next_delay(&mut seat.delay, Duration::ZERO);
                        seat.restart_at = Some(now + wait);
                        error!(
                            "process p{slot} cannot be started ({e}); trying again in {} ms",
                            wait.as_millis()
                        );
                    }
                }
            }
        }
    }

    /// A child's line: the first one says it listens.
    fn heard(&mut self, (slot, pid, line): Said) {
        let Some(seat) = self.seats.get_mut(slot).filter(|s| s.pid() == pid) else { return };
        if line.starts_with("listening on ws://") && !seat.listening {
            seat.listening = true;
            if self.board.seat(slot).restarts > 0 {
                info!("process p{slot} (pid {pid}) listening again");
            }
        }
    }

    /// Starts the child of `slot`, and a thread that passes on what it prints.
    fn spawn(&mut self, slot: usize) -> std::io::Result<u32> {
        let board_fd = self.board.fd().ok_or_else(|| std::io::Error::other("no board descriptor"))?;
        let supervisor = std::process::id() as libc::pid_t;
        let mut command = Command::new(&self.exe);
        command
            .args(child_args(&self.args, self.addr, &self.base, slot, board_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the forked child before exec and calls only async-signal-safe
        // functions (prctl, getppid, fcntl), touching no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // SIGTERM when the supervisor dies: the child closes its clients with 1001.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != supervisor {
                    return Err(std::io::Error::other("the supervisor is gone"));
                }
                // The board's descriptor (close-on-exec in the supervisor) is inherited.
                if libc::fcntl(board_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            let said = self.said.clone();
            let spawned =
                std::thread::Builder::new().name(format!("gearsock-p{slot}-out")).spawn(move || {
                    let mut first = true;
                    // Read to the end (nothing else is printed), so the child never blocks on a pipe.
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if std::mem::take(&mut first) {
                            let _ = said.send((slot, pid, line));
                        }
                    }
                });
            if let Err(e) = spawned {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        self.board.set_pid(slot, pid);
        let seat = &mut self.seats[slot];
        seat.child = Some(child);
        seat.started = Instant::now();
        seat.listening = false;
        Ok(pid)
    }

    /// SIGTERM to every child, a wait bounded by their close grace plus a margin, SIGKILL for
    /// what is left.
    fn stop(&mut self) {
        for seat in &self.seats {
            if let Some(child) = &seat.child {
                // SAFETY: kill(2) with a pid of our own child, which is not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + self.grace;
        loop {
            for seat in &mut self.seats {
                let Some(child) = &mut seat.child else { continue };
                match child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) if !status.success() => {
                        warn!(
                            "process p{} (pid {}) {} while stopping",
                            seat.slot,
                            child.id(),
                            describe(status)
                        )
                    }
                    _ => {}
                }
                seat.child = None;
                self.board.set_pid(seat.slot, 0);
            }
            if self.seats.iter().all(|s| s.child.is_none()) {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for seat in &mut self.seats {
            let Some(child) = &mut seat.child else { continue };
            warn!("process p{} (pid {}) still running after {:?}: killed", seat.slot, child.id(), self.grace);
            let _ = child.kill();
            let _ = child.wait();
            seat.child = None;
            self.board.set_pid(seat.slot, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_its_cap_and_starts_again_after_a_stable_run() {
        let mut delay = BACKOFF_MIN;
        let quick = Duration::from_millis(50);
        let waits: Vec<u128> = (0..8).map(|_| next_delay(&mut delay, quick).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(next_delay(&mut delay, STABLE_AFTER), BACKOFF_MIN, "a stable run resets it");
        assert_eq!(next_delay(&mut delay, quick), Duration::from_millis(200));
    }

    #[test]
    fn a_child_gets_the_supervisors_flags_then_its_own() {
        let args: Vec<OsString> =
            ["serve", "--listen", "127.0.0.1:0", "--processes", "3", "--instance-id", "eu"]
                .iter()
                .map(Into::into)
                .collect();
        let addr: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        let child = child_args(&args, addr, "eu", 2, 7);
        let Ok(crate::cli::Command::Serve(cfg)) = crate::cli::parse_args(child) else { panic!("not serve") };
        assert_eq!(cfg.listen, addr, "the later --listen wins");
        assert_eq!(cfg.instance_id.as_deref(), Some("eu-2"));
        assert_eq!(cfg.processes, 3);
        assert_eq!(cfg.group_child, Some(crate::config::GroupChild { slot: 2, board_fd: 7 }));
        // A random base may start with '-' (its alphabet has it): still the flag's value.
        let child = child_args(&args, addr, "-x_", 0, 7);
        let Ok(crate::cli::Command::Serve(cfg)) = crate::cli::parse_args(child) else { panic!("not serve") };
        assert_eq!(cfg.instance_id.as_deref(), Some("-x_-0"));
    }

    #[test]
    fn exits_are_described_by_status_or_signal() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exited with status 1");
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGKILL)), "was killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn the_reserved_port_is_shared_only_with_reuseport_listeners() {
        let (_held, addr) = reserve("127.0.0.1:0".parse().unwrap()).expect("reserve");
        assert_ne!(addr.port(), 0);
        // A socket without SO_REUSEPORT (or SO_REUSEADDR) cannot take the group's port...
        let lone = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert!(lone.bind(&addr.into()).is_err());
        // ... a member can, and only its listener takes connections.
        let member = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        member.set_reuse_address(true).unwrap();
        member.set_reuse_port(true).unwrap();
        member.bind(&addr.into()).expect("a member binds the reserved port");
        member.listen(8).unwrap();
        let listener: std::net::TcpListener = member.into();
        std::net::TcpStream::connect(addr).expect("connect");
        listener.accept().expect("the member accepts");
    }
}
