//! What the operating system says about this process that std does not expose.

/// The (soft, hard) limits on open files of this process, from /proc/self/limits ((1024, 1024)
/// if it cannot be read; "unlimited" reads as 2^20).
pub fn open_file_limits() -> (usize, usize) {
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_at_most_the_hard_one() {
        let (soft, hard) = super::open_file_limits();
        assert!(soft >= 64 && soft <= hard, "{soft} {hard}");
    }
}
