//! What the operating system says about this process that std does not expose.

/// The (soft, hard) limits on open files of this process, from /proc/self/limits ((1024, 1024)
/// if it cannot be read; "unlimited" reads as 2^20).
pub(crate) fn open_file_limits() -> (usize, usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        let mut words = line.split_whitespace().skip(3);
        let mut number = || match words.next()? {
            "unlimited" => Some(1 << 20),
            n => n.parse().ok(),
        };
        Some((number()?, number()?))
    });
    limits.unwrap_or((1024, 1024))
}

/// Moves the calling thread to the `SCHED_BATCH` policy (`serve --sched-batch`). Its wake-ups
/// then no longer preempt whatever runs on its CPU: a gearmand sharing the core finishes what it
/// is writing before the loop runs, so each pass takes a batch of replies instead of one. On an
/// idle CPU it runs at once, as before; on a busy one it may wait up to a scheduler slice.
#[cfg(target_os = "linux")]
pub(crate) fn batch_scheduling() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a live sched_param (priority 0, the only
    // one SCHED_BATCH takes). Unprivileged processes may always move to SCHED_BATCH.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `SCHED_BATCH` is Linux's: elsewhere `--sched-batch` is refused at startup.
#[cfg(not(target_os = "linux"))]
pub(crate) fn batch_scheduling() -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "SCHED_BATCH is Linux only"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_at_most_the_hard_one() {
        let (soft, hard) = super::open_file_limits();
        assert!(soft >= 64 && soft <= hard, "{soft} {hard}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_can_move_to_batch_scheduling() {
        // On a thread of its own, so the test harness's threads keep their policy.
        let policy = std::thread::spawn(|| {
            super::batch_scheduling().expect("SCHED_BATCH needs no privilege");
            // SAFETY: pid 0 is the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        });
        assert_eq!(policy.join().unwrap(), libc::SCHED_BATCH);
    }
}
