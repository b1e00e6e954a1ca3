//! What waits for the client's socket: the output queue that knows where frames start, and the
//! frames and HTTP answers the server writes into it.

/// Bytes waiting for the socket, and where the first frame not yet started begins in them.
///
/// Whole frames are only ever appended (tungstenite runs with `write_buffer_size(0)` over a
/// stream whose writes never fail short), so the bytes after `kept` are a sequence of whole
/// frames that no byte of has reached the socket.
#[derive(Debug, Default)]
pub(super) struct OutQueue {
    pub(super) bytes: Vec<u8>,
    /// Leading bytes that must go out whole before any frame can be dropped: the rest of the 101
    /// answer, or the rest of a frame already partly on the wire.
    pub(super) kept: usize,
    /// The bytes after `kept` are WebSocket frames. False before the upgrade: then everything is
    /// raw HTTP and is never cut.
    pub(super) framed: bool,
}

impl OutQueue {
    /// The shell wrote the first `n` bytes. Costs nothing when they were all written; otherwise
    /// steps over the headers of the frames it finished, plus the one it started.
    pub(super) fn consume(&mut self, n: usize) {
        let n = n.min(self.bytes.len());
        if n == self.bytes.len() {
            self.bytes.clear();
            self.kept = 0;
            return;
        }
        if self.framed && n > self.kept {
            let mut at = self.kept;
            while at < n {
                // Our own frames are whole, so a header is never cut short; if one were, keep
                // everything rather than guess where frames start.
                at = frame_len(&self.bytes[at..]).map_or(usize::MAX, |len| at.saturating_add(len));
            }
            self.kept = at.min(self.bytes.len()) - n;
        } else {
            self.kept = self.kept.saturating_sub(n);
        }
        self.bytes.drain(..n);
    }
}

/// Length (header plus payload) of the frame at the start of `bytes`, from its header alone;
/// `None` if the header is cut short or the length does not fit in a `usize`.
pub(super) fn frame_len(bytes: &[u8]) -> Option<usize> {
    let second = *bytes.get(1)?;
    let (header, payload) = match second & 0x7f {
        126 => (4, u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?))),
        127 => (10, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
        short => (2, u64::from(short)),
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 }; // ours are unmasked; counted for safety
    usize::try_from(payload).ok()?.checked_add(header + mask)
}

/// First byte of an unfragmented text frame: FIN plus opcode 1.
pub(super) const FIN_TEXT: u8 = 0x81;
/// First byte of an unfragmented binary frame: FIN plus opcode 2.
pub(super) const FIN_BINARY: u8 = 0x82;
/// First byte of a ping: FIN plus opcode 9.
pub(super) const PING: u8 = 0x89;

/// Appends one unmasked server frame carrying all of `payload`; `first` is FIN plus the
/// opcode. The length takes 1, 3 or 9 bytes (RFC 6455 5.2), whatever the payload's size.
pub(super) fn encode_frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    let len = payload.len();
    out.reserve(len + 10);
    out.push(first);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a server close frame: code, then the reason cut to 123 bytes at a char boundary.
pub(super) fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let reason = truncate_reason(reason);
    out.extend_from_slice(&[0x88, (2 + reason.len()) as u8]);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Close reasons are limited to 123 bytes by the frame format (125 minus the code).
pub(super) fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Writes a complete HTTP/1.1 response that closes the connection.
pub(crate) fn write_http(out: &mut Vec<u8>, status: u16, reason: &str, content_type: &str, body: &[u8]) {
    write_http_with(out, status, reason, content_type, &[], body);
}

/// [`write_http`] with extra `(name, value)` headers, such as the `Sec-WebSocket-Version` a 426
/// answer must carry.
pub(crate) fn write_http_with(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}
