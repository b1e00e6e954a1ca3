//! The few operating-system calls the bench needs and std lacks: connect from a chosen source
//! address (bind before connect), pin a thread to a CPU, raise the open-file limit, read a
//! process's resident memory.
//!
//! Linux only, through `socket2` (bind before connect) and `libc` (affinity, limits, thread
//! CPU time). Everything unsafe in the bench is here, each call with its reason; on other
//! systems these calls degrade to an error or do nothing.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use mio::net::TcpStream;

/// Starts a nonblocking connect to `target`, from `source` when given (port chosen by the
/// kernel at connect time, so each source address has its own ephemeral port range).
pub fn connect_from(source: Option<Ipv4Addr>, target: SocketAddr) -> io::Result<TcpStream> {
    match (source, target) {
        (None, _) => TcpStream::connect(target),
        (Some(source), SocketAddr::V4(v4)) => linux::connect_from(source, *v4.ip(), v4.port()),
        (Some(_), SocketAddr::V6(_)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, "source addresses are IPv4, the target is IPv6"))
        }
    }
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    linux::pin_current_thread(cpus)
}

/// The CPUs process `pid` may run on (`Cpus_allowed_list` of `/proc/PID/status`).
pub fn cpus_of(pid: u32) -> io::Result<Vec<usize>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let bad =
        || io::Error::new(io::ErrorKind::InvalidData, format!("no Cpus_allowed_list in /proc/{pid}/status"));
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).ok_or_else(bad)?;
    parse_cpu_list(list.trim()).ok_or_else(bad)
}

/// Parses a kernel CPU list such as `0-2,5`.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(low.trim().parse::<usize>().ok()?..=high.trim().parse::<usize>().ok()?);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Raises the soft open-file limit to the hard one (shells often start with 1024 of 20,000+).
pub fn raise_open_file_limit() {
    linux::raise_open_file_limit();
}

/// The hard open-file limit of this process (what the soft one can be raised to).
pub fn open_file_hard_limit() -> usize {
    crate::os::open_file_limits().1
}

/// The size of the ephemeral port range (`ip_local_port_range`; 28,232 when unreadable).
pub fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|n| n.parse::<usize>().ok());
            let (low, high) = (it.next()??, it.next()??);
            Some(high.saturating_sub(low) + 1)
        })
        .unwrap_or(28_232)
}

/// CPU time the calling thread has used (`None` where it cannot be read).
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    linux::thread_cpu_time()
}

/// Whose CPU time to read from /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProbe {
    /// A process (all its threads), e.g. the server's `--pid`.
    Process(u32),
    /// One thread of this process, by thread id.
    Thread(u32),
}

/// CPU time (user + system) used so far, to the kernel's 10 ms tick.
pub fn cpu_time(probe: CpuProbe) -> io::Result<std::time::Duration> {
    let path = match probe {
        CpuProbe::Process(pid) => format!("/proc/{pid}/stat"),
        CpuProbe::Thread(tid) => format!("/proc/self/task/{tid}/stat"),
    };
    let stat = std::fs::read_to_string(&path)?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        // utime and stime are fields 14 and 15; USER_HZ is 100 on every Linux ABI.
        (Some(user), Some(system)) => Ok(std::time::Duration::from_millis((user + system) * 10)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unreadable {path}"))),
    }
}

/// The calling thread's id (from /proc/thread-self), for [`CpuProbe::Thread`].
pub fn current_thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// VmRSS of process `pid` in bytes, from `/proc/PID/status`.
pub fn resident_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no VmRSS in /proc/{pid}/status")))
}

/// Sends SIGTERM to process `pid` (the server's shutdown that `mixed --sigterm-after-s` times).
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes two integers and touches none of our memory.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Resident memory of process `pid` by kind, in bytes, from `/proc/PID/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// VmRSS: all of it.
    pub total: u64,
    /// RssAnon: heap, stacks, anonymous mappings.
    pub anon: u64,
    /// RssFile: pages of the program and its libraries that have been touched.
    pub file: u64,
}

/// VmRSS, RssAnon and RssFile of process `pid`.
pub fn resident(pid: u32) -> io::Result<Resident> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("no {name} in /proc/{pid}/status"))
            })
    };
    Ok(Resident { total: field("VmRSS:")?, anon: field("RssAnon:")?, file: field("RssFile:")? })
}

/// The size and the resident part of process `pid`'s `[heap]` mapping (the allocator's main
/// arena), in bytes, from `/proc/PID/smaps`; `None` when it has none. A heap whose size stays
/// put while its resident part grows is touching pages it already had, not asking for more.
pub fn heap_mapping(pid: u32) -> io::Result<Option<(u64, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut lines = smaps.lines().skip_while(|line| !line.ends_with("[heap]"));
    let Some(head) = lines.next() else { return Ok(None) };
    let bad =
        || io::Error::new(io::ErrorKind::InvalidData, format!("unreadable [heap] in /proc/{pid}/smaps"));
    let (start, end) =
        head.split_whitespace().next().and_then(|range| range.split_once('-')).ok_or_else(bad)?;
    let address = |hex: &str| u64::from_str_radix(hex, 16).map_err(|_| bad());
    let size = address(end)?.saturating_sub(address(start)?);
    let rss = lines
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok(Some((size, rss * 1024)))
}

/// Open descriptors of process `pid`: the entries of `/proc/PID/fd`.
pub fn open_fds(pid: u32) -> io::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Counts `pid`'s descriptors every 20 ms until the count is at most `target`, or has not
/// moved for `steady`, or `bound` has passed; returns the last count and the time it took.
/// (A server reaps closed connections on its own time: read it once it has.)
pub fn settle_fds(
    pid: u32,
    target: Option<u64>,
    steady: std::time::Duration,
    bound: std::time::Duration,
) -> io::Result<(u64, std::time::Duration)> {
    let start = std::time::Instant::now();
    let mut last = open_fds(pid)?;
    let mut since = start;
    while target.is_none_or(|t| last > t) && since.elapsed() < steady && start.elapsed() < bound {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = open_fds(pid)?;
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
    }
    Ok((last, start.elapsed()))
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;

    use mio::net::TcpStream;
    use socket2::{Domain, Socket, Type};

    pub fn connect_from(source: Ipv4Addr, ip: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        // Let connect() pick the port per (source, target) pair instead of bind() reserving one
        // per source address; failure (old kernels) only means bind() picks it, which works too.
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call and its size is passed; the fd is the live socket's.
        let _ = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        socket.bind(&SocketAddrV4::new(source, 0).into())?;
        match socket.connect(&SocketAddrV4::new(ip, port).into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
            _ => {}
        }
        Ok(TcpStream::from_std(socket.into()))
    }

    pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::other(format!("no CPU {cpu}")));
            }
            // SAFETY: `cpu` is below CPU_SETSIZE, checked just above.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
        if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn thread_cpu_time() -> Option<Duration> {
        let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `time` is a valid, writable timespec.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) } != 0 {
            return None;
        }
        Some(Duration::new(u64::try_from(time.tv_sec).ok()?, u32::try_from(time.tv_nsec).ok()?))
    }

    pub fn raise_open_file_limit() {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `limit` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
            || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit; failure leaves the old limit, which is still usable.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

#[cfg(not(target_os = "linux"))]
mod linux {
    use std::io;
    use std::net::Ipv4Addr;

    use mio::net::TcpStream;

    pub fn connect_from(_source: Ipv4Addr, _ip: Ipv4Addr, _port: u16) -> io::Result<TcpStream> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "source addresses need Linux"))
    }

    pub fn pin_current_thread(_cpus: &[usize]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "CPU pinning needs Linux"))
    }

    pub fn raise_open_file_limit() {}

    pub fn thread_cpu_time() -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_memory_is_readable() {
        assert!(resident_bytes(std::process::id()).expect("VmRSS") > 0);
        assert!(open_fds(std::process::id()).expect("fds") >= 3, "stdin, stdout, stderr at least");
        let mine = resident(std::process::id()).expect("resident");
        assert!(mine.total > 0 && mine.anon > 0 && mine.file > 0, "{mine:?}");
        // A Rust test binary allocates from the main arena, so it has a heap.
        let (size, rss) = heap_mapping(std::process::id()).expect("smaps").expect("a [heap]");
        assert!(0 < rss && rss <= size, "{rss} of {size}");
        assert!(open_file_hard_limit() >= 64);
        assert!(ephemeral_ports() > 0);
        assert!(cpu_time(CpuProbe::Process(std::process::id())).is_ok());
        let tid = current_thread_id().expect("thread id");
        assert!(cpu_time(CpuProbe::Thread(tid)).is_ok());
        let spent = thread_cpu_time().expect("thread CPU time");
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = std::hint::black_box(x ^ i);
        }
        assert!(thread_cpu_time().expect("thread CPU time") > spent, "{x}");
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("1"), Some(vec![1]));
        assert_eq!(parse_cpu_list("x"), None);
        assert!(!cpus_of(std::process::id()).expect("own CPUs").is_empty());
    }

    #[test]
    fn connecting_from_another_loopback_address_works() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let stream = connect_from(Some(Ipv4Addr::new(127, 0, 0, 3)), addr).expect("connect");
        let (_, peer) = listener.accept().expect("accept");
        assert_eq!(peer.ip().to_string(), "127.0.0.3");
        drop(stream);
    }
}
