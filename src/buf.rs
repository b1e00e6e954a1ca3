//! `InBuf`: bytes received but not yet parsed, shared by every sans-IO decoder.
//!
//! It owns no socket. The shell appends what a read returned; a decoder looks at `data()` and
//! `consume()`s whole packets or frames. A limit bounds it, so a peer that sends faster than we
//! parse stalls at the limit instead of growing our memory.

/// A FIFO byte buffer with a read offset, so consuming a packet is O(1) and the tail moves to
/// the front only when more bytes arrive.
#[derive(Debug, Default)]
pub struct InBuf {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl InBuf {
    /// An empty buffer that refuses to hold more than `limit_bytes` unparsed bytes.
    pub fn new(limit_bytes: usize) -> Self {
        InBuf { buf: Vec::new(), start: 0, limit: limit_bytes }
    }

    /// The unparsed bytes, oldest first.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The unparsed bytes, to change in place (a client frame is unmasked where it lies).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    /// Drops the first `n` unparsed bytes (a whole packet or frame).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Appends bytes a read returned. The caller keeps within `room()`; going past it is allowed
    /// (a decoder may need the whole of one packet) but `is_full()` then tells the shell to stop.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Move the tail to the front only when it is cheap compared with what was consumed.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Number of unparsed bytes.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when nothing is waiting to be parsed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many more bytes fit under the limit.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.len())
    }

    /// True when the shell must stop reading into this buffer.
    pub fn is_full(&self) -> bool {
        self.room() == 0
    }

    /// Bytes allocated (0 once released).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The limit given to `new`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Gives the allocation back when the buffer is empty, so idle connections stay small.
    pub fn release(&mut self) {
        if self.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_and_extend_keep_order() {
        let mut b = InBuf::new(16);
        b.extend(b"hello ");
        b.consume(2);
        b.extend(b"world");
        assert_eq!(b.data(), b"llo world");
        b.consume(9);
        assert!(b.is_empty());
        assert_eq!(b.room(), 16);
    }

    #[test]
    fn full_at_limit_and_release_frees() {
        let mut b = InBuf::new(4);
        b.extend(b"abcdef");
        assert!(b.is_full());
        b.consume(6);
        b.release();
        assert_eq!(b.data(), b"");
    }
}
