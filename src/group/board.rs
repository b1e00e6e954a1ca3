//! The board: shared memory where each process of a group publishes its figures, one slot per
//! process, so that whichever process answers `/metrics` or `/healthz` can describe them all.
//!
//! The supervisor creates it (`memfd_create`, so it lives in memory and has no name anyone else
//! could open) before it starts the children; each child inherits the descriptor and maps it.
//! Nothing on it is shared on the hot path: a child writes its own slot about once a second
//! and reads the others only when it answers one of those two pages. Every access is a load or
//! a store to mapped memory: no system call, no disk.
//!
//! ```text
//! header   magic | version | slots | slot_words | 4 words reserved
//! slot i   pid | restarts | seq | len | payload (len bytes, 8 per word) ...
//!          \_ supervisor _/ \____________ the child in slot i _____________/
//! ```
//!
//! `pid` and `restarts` are single words written by the supervisor only: the pid of the child
//! it runs in the slot (0 while none runs) and how often it restarted one there. The rest is a
//! seqlock written by that child only: `seq` is odd while a write is under way, and a reader
//! keeps a copy only when it read the same even `seq` before and after it, so a torn copy
//! (a write in progress, or a writer killed half-way, whose `seq` stays odd) is never used.
//! Every word is an `AtomicU64`: the processes share them as threads would.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

/// "gearsock" in ASCII: a descriptor that does not start with it is no board.
const MAGIC: u64 = u64::from_le_bytes(*b"gearsock");
/// The layout's version (the supervisor and its children are the same binary; this catches a
/// wrong descriptor number rather than skew).
const VERSION: u64 = 1;
const HEADER_WORDS: usize = 8;
/// Words of a slot before its payload: pid, restarts, seq, len.
const SLOT_HEAD_WORDS: usize = 4;
const PID: usize = 0;
const RESTARTS: usize = 1;
const SEQ: usize = 2;
const LEN: usize = 3;
/// Tries at a consistent copy before a reader gives up on a slot for this time.
const READ_TRIES: usize = 4;

/// A mapped board.
#[derive(Debug)]
pub(crate) struct Board {
    words: NonNull<AtomicU64>,
    len: usize,
    slots: usize,
    slot_words: usize,
    /// Kept by the supervisor, to hand to the children it starts; `None` in a child.
    fd: Option<OwnedFd>,
}

/// What the supervisor says about a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seat {
    /// The running child's pid; 0 while none runs.
    pub pid: u32,
    /// Children restarted in this slot.
    pub restarts: u64,
}

/// The payload did not fit in a slot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooLarge(pub usize);

impl Board {
    /// A new board of `slots` slots of `payload_bytes` each (rounded up to whole words), zeroed.
    pub fn create(slots: usize, payload_bytes: usize) -> io::Result<Board> {
        let slot_words = SLOT_HEAD_WORDS + payload_bytes.div_ceil(8);
        let len = HEADER_WORDS + slots * slot_words;
        // SAFETY: the name is a NUL-terminated literal; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"gearsock-board".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let bytes = libc::off_t::try_from(len * 8).map_err(|_| io::Error::other("board too large"))?;
        // SAFETY: a valid descriptor and size.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let words = map(fd.as_raw_fd(), len)?;
        let board = Board { words, len, slots, slot_words, fd: Some(fd) };
        let w = board.all();
        w[1].store(VERSION, Ordering::Relaxed);
        w[2].store(slots as u64, Ordering::Relaxed);
        w[3].store(slot_words as u64, Ordering::Relaxed);
        w[0].store(MAGIC, Ordering::Release);
        Ok(board)
    }

    /// Maps the board behind `fd` (inherited from the supervisor) and closes the descriptor:
    /// the mapping stays.
    pub fn open(fd: RawFd) -> io::Result<Board> {
        let invalid =
            |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor {fd}: {why}"));
        // SAFETY: fstat only writes into `st`; a bad descriptor is an error, not UB.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let size = usize::try_from(st.st_size).unwrap_or(0);
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || size < HEADER_WORDS * 8 || size % 8 != 0 {
            return Err(invalid("not a group board"));
        }
        // SAFETY: the descriptor is valid (fstat worked) and was handed to this process for
        // this use only; from here it is owned, and closed on drop.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = size / 8;
        let words = map(owned.as_raw_fd(), len)?;
        // The descriptor is dropped here: the mapping keeps the memory.
        let mut board = Board { words, len, slots: 0, slot_words: 0, fd: None };
        let w = board.all();
        let (magic, version) = (w[0].load(Ordering::Acquire), w[1].load(Ordering::Relaxed));
        let (slots, slot_words) =
            (w[2].load(Ordering::Relaxed) as usize, w[3].load(Ordering::Relaxed) as usize);
        let fits =
            slots.checked_mul(slot_words).and_then(|n| n.checked_add(HEADER_WORDS)).is_some_and(|n| n <= len);
        if magic != MAGIC || version != VERSION || slot_words < SLOT_HEAD_WORDS || !fits {
            return Err(invalid("not a group board of this version"));
        }
        board.slots = slots;
        board.slot_words = slot_words;
        Ok(board)
    }

    /// The descriptor children inherit (the supervisor's board only).
    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Slots on the board: the group's `--processes`.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Largest payload a slot holds.
    pub fn capacity(&self) -> usize {
        (self.slot_words - SLOT_HEAD_WORDS) * 8
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: `words` points at `len` words mapped read-write and shared for as long as
        // `self` lives (unmapped in Drop only); AtomicU64 has the size and alignment of u64,
        // and every process accesses these words atomically.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }

    fn slot(&self, i: usize) -> &[AtomicU64] {
        assert!(i < self.slots, "slot {i} of {}", self.slots);
        let start = HEADER_WORDS + i * self.slot_words;
        &self.all()[start..start + self.slot_words]
    }

    /// The supervisor's words of slot `i`.
    pub fn seat(&self, i: usize) -> Seat {
        let s = self.slot(i);
        Seat { pid: s[PID].load(Ordering::Acquire) as u32, restarts: s[RESTARTS].load(Ordering::Relaxed) }
    }

    /// Supervisor: the child now running in slot `i` (0: none).
    pub fn set_pid(&self, i: usize, pid: u32) {
        self.slot(i)[PID].store(u64::from(pid), Ordering::Release);
    }

    /// Supervisor: one more restart in slot `i`.
    pub fn count_restart(&self, i: usize) {
        self.slot(i)[RESTARTS].fetch_add(1, Ordering::Relaxed);
    }

    /// The child in slot `i`: replaces its payload with `bytes`.
    pub fn publish(&self, i: usize, bytes: &[u8]) -> Result<(), TooLarge> {
        if bytes.len() > self.capacity() {
            return Err(TooLarge(bytes.len()));
        }
        let s = self.slot(i);
        // Odd while writing. A predecessor killed mid-write left it odd: step to the next odd.
        let seq = s[SEQ].load(Ordering::Relaxed);
        let writing = if seq.is_multiple_of(2) { seq + 1 } else { seq + 2 };
        s[SEQ].store(writing, Ordering::Relaxed);
        fence(Ordering::Release);
        s[LEN].store(bytes.len() as u64, Ordering::Relaxed);
        for (word, chunk) in s[SLOT_HEAD_WORDS..].iter().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        s[SEQ].store(writing + 1, Ordering::Release);
        Ok(())
    }

    /// A consistent copy of slot `i`'s payload into `out` (cleared first), or false when none
    /// could be had: nothing published yet, a write under way through every try, or a writer
    /// that died half-way.
    pub fn read(&self, i: usize, out: &mut Vec<u8>) -> bool {
        let s = self.slot(i);
        for _ in 0..READ_TRIES {
            out.clear();
            let before = s[SEQ].load(Ordering::Acquire);
            if before == 0 || !before.is_multiple_of(2) {
                std::hint::spin_loop();
                continue;
            }
            let len = (s[LEN].load(Ordering::Relaxed) as usize).min(self.capacity());
            for word in &s[SLOT_HEAD_WORDS..SLOT_HEAD_WORDS + len.div_ceil(8)] {
                out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            out.truncate(len);
            fence(Ordering::Acquire);
            if s[SEQ].load(Ordering::Relaxed) == before {
                return true;
            }
        }
        out.clear();
        false
    }

    #[cfg(test)]
    fn begin_write_and_die(&self, i: usize) {
        let s = self.slot(i);
        s[SEQ].fetch_add(1, Ordering::Relaxed);
    }
}

/// Maps `len` words of `fd`, shared and read-write.
fn map(fd: RawFd, len: usize) -> io::Result<NonNull<AtomicU64>> {
    // SAFETY: a fresh mapping chosen by the kernel; nothing else is touched.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), len * 8, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length, unmapped once; no reference into it
        // outlives `self` (they all borrow it).
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_goes_round_a_slot_and_a_second_mapping_sees_it() {
        let board = Board::create(3, 100).expect("board");
        assert_eq!((board.slots(), board.capacity()), (3, 104));
        let mut out = Vec::new();
        assert!(!board.read(1, &mut out), "nothing published yet");
        board.publish(1, b"hello, group").unwrap();
        assert!(board.read(1, &mut out));
        assert_eq!(out, b"hello, group");
        board.publish(1, b"hi").unwrap();
        assert!(board.read(1, &mut out));
        assert_eq!(out, b"hi", "a shorter payload replaces a longer one");
        assert_eq!(board.publish(0, &[7; 105]), Err(TooLarge(105)));
        // What a child does: map the same memory through a descriptor of its own.
        // SAFETY: dup of a valid descriptor.
        let dup = unsafe { libc::dup(board.fd().unwrap()) };
        let child = Board::open(dup).expect("open");
        assert_eq!((child.slots(), child.capacity()), (3, 104));
        assert!(child.read(1, &mut out));
        assert_eq!(out, b"hi");
        child.publish(2, b"from the child").unwrap();
        assert!(board.read(2, &mut out));
        assert_eq!(out, b"from the child");
    }

    #[test]
    fn the_supervisor_words_are_its_own() {
        let board = Board::create(2, 64).expect("board");
        assert_eq!(board.seat(0), Seat { pid: 0, restarts: 0 });
        board.set_pid(0, 4242);
        board.count_restart(0);
        board.publish(0, b"x").unwrap();
        assert_eq!(board.seat(0), Seat { pid: 4242, restarts: 1 });
        board.set_pid(0, 0);
        assert_eq!(board.seat(0), Seat { pid: 0, restarts: 1 }, "down, restarts kept");
        assert_eq!(board.seat(1), Seat { pid: 0, restarts: 0 });
    }

    #[test]
    fn a_writer_that_died_half_way_is_never_read_and_its_successor_recovers() {
        let board = Board::create(1, 64).expect("board");
        board.publish(0, b"complete").unwrap();
        board.begin_write_and_die(0);
        let mut out = Vec::new();
        assert!(!board.read(0, &mut out), "a torn slot is not read");
        assert!(out.is_empty());
        board.publish(0, b"successor").unwrap();
        assert!(board.read(0, &mut out));
        assert_eq!(out, b"successor");
    }

    #[test]
    fn a_descriptor_that_is_no_board_is_refused() {
        let file = std::fs::File::open("/proc/self/limits").expect("a file");
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        assert!(Board::open(fd).is_err());
        assert!(Board::open(-1).is_err());
    }
}
