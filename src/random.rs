//! `Entropy`: unguessable ids (job uniques, client namespaces) from the OS's random source;
//! `XorShift64`: cheap variety where nothing has to be unguessable (back-off jitter, the load
//! generator's keys and masks); and what an instance id may be ([`is_instance_id`]).
//!
//! It owns no socket and no clock. Bytes come from `getrandom(2)` a page at a time, so a busy
//! server pays one system call per few hundred jobs rather than one per job; the call never
//! blocks once the kernel's pool is initialised (long before a server starts). Tests can use a
//! deterministic source instead, so that sans-IO code that needs ids stays reproducible.

/// Longest instance id (`--instance-id`, or drawn at startup): it starts every unique the
/// instance makes, and gearmand keeps 63 bytes of those.
pub(crate) const MAX_INSTANCE_ID: usize = 16;

/// Whether `id` can name an instance: what goes before the first `.` of its uniques. It lives
/// here, beside the ids the server draws, so that `config` (which checks `--instance-id`) and
/// the App (which reads the owner out of a unique) share one rule without a core importing
/// `config`.
pub(crate) fn is_instance_id(id: &str) -> bool {
    (1..=MAX_INSTANCE_ID).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Characters of an id: the URL-safe base64 alphabet (6 bits each, no NUL, no separators).
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const POOL_BYTES: usize = 4096;

/// Where the bytes come from.
#[derive(Debug)]
enum Source {
    /// `getrandom(2)`.
    Os,
    /// A counter, for tests: every id differs, and a test can predict none of them by accident.
    Counter(u64),
}

/// A buffered source of random ids.
#[derive(Debug)]
pub struct Entropy {
    source: Source,
    pool: Vec<u8>,
    used: usize,
}

impl Entropy {
    /// Bytes from the operating system.
    pub fn os() -> Self {
        Entropy { source: Source::Os, pool: Vec::new(), used: 0 }
    }

    /// Distinct but predictable bytes, for tests.
    pub fn counter() -> Self {
        Entropy { source: Source::Counter(0), pool: Vec::new(), used: 0 }
    }

    /// `chars` characters of `ALPHABET`, 6 random bits each (16 characters carry 96 bits).
    pub fn id(&mut self, chars: usize) -> Vec<u8> {
        let mut id = vec![0; chars];
        self.fill_id(&mut id);
        id
    }

    /// A short name of `chars` lower-case letters and digits (about 5.2 bits each): safe on a
    /// command line and in a Gearman function name.
    pub fn name(&mut self, chars: usize) -> String {
        const NAME: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..chars).map(|_| char::from(NAME[usize::from(self.byte()) % NAME.len()])).collect()
    }

    /// Fills `out` with characters of `ALPHABET`, 6 random bits each.
    pub fn fill_id(&mut self, out: &mut [u8]) {
        for c in out {
            *c = ALPHABET[usize::from(self.byte() & 63)];
        }
    }

    fn byte(&mut self) -> u8 {
        if self.used == self.pool.len() {
            self.refill();
        }
        self.used += 1;
        self.pool[self.used - 1]
    }

    fn refill(&mut self) {
        self.pool.resize(POOL_BYTES, 0);
        self.used = 0;
        match &mut self.source {
            Source::Os => fill_from_os(&mut self.pool),
            Source::Counter(n) => {
                for chunk in self.pool.chunks_mut(8) {
                    *n += 1;
                    let bytes = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
                    chunk.copy_from_slice(&bytes[..chunk.len()]);
                }
            }
        }
    }
}

/// Fills `buf` from `getrandom(2)`. Without it (a kernel older than 3.17) ids could not be made
/// unguessable, and a server that hands out guessable uniques must not run: that is a panic at
/// the first job rather than a silent weakness.
fn fill_from_os(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Marsaglia's xorshift64: fast, no dependency, and predictable by anyone who sees a few
/// outputs, so only for jitter and test traffic, never for ids.
#[derive(Debug)]
pub(crate) struct XorShift64(u64);

impl XorShift64 {
    /// Seeded from the clock, the pid, `salt` and std's per-process random hasher keys, so
    /// threads and processes started together still differ.
    pub fn seeded(salt: u64) -> Self {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id(), salt));
        XorShift64(seed | 1) // zero is the one state it never leaves
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_short_and_plain() {
        for id in ["a1", "p-0", "A_z", &"x".repeat(MAX_INSTANCE_ID)] {
            assert!(is_instance_id(id), "{id}");
        }
        for id in ["", "a.b", "a b", "é", &"x".repeat(MAX_INSTANCE_ID + 1)] {
            assert!(!is_instance_id(id), "{id}");
        }
    }

    #[test]
    fn ids_use_the_alphabet_and_do_not_repeat() {
        for mut e in [Entropy::os(), Entropy::counter()] {
            let ids: std::collections::HashSet<Vec<u8>> = (0..2000).map(|_| e.id(16)).collect();
            assert_eq!(ids.len(), 2000);
            assert!(ids.iter().all(|id| id.len() == 16 && id.iter().all(|b| ALPHABET.contains(b))));
        }
    }

    #[test]
    fn xorshift_never_sticks_and_seeds_differ() {
        let (mut a, mut b) = (XorShift64::seeded(1), XorShift64::seeded(2));
        let first: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert!(first.iter().all(|&x| x != 0));
        assert_ne!(first[0], b.next_u64());
    }
}
