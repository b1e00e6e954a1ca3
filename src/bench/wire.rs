//! The bench client's wire formats, sans-IO: masked client frames, server frame headers, the
//! HTTP upgrade request and its answer, newline-delimited lines for the baseline.
//!
//! Nothing here owns a socket or reads the clock. Server frames are parsed by hand (the 2, 4
//! or 10 byte header RFC 6455 §5.2 defines) because this is the bench's inner loop: no copy, no
//! allocation, the payload is a range of the caller's buffer.

use base64::Engine;

/// Continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OP_PING: u8 = 0x9;
/// Pong frame.
pub const OP_PONG: u8 = 0xA;

/// Largest response head to the upgrade request we wait for.
pub use crate::ws::MAX_HEAD_BYTES;

/// Appends one complete client frame (FIN set) carrying `payload`, masked with `mask`.
///
/// RFC 6455 §5.3 wants a fresh, unpredictable key per frame. That protects proxies from
/// frames whose bytes a hostile script chose; it does nothing for the server, which unmasks
/// whatever key it is given. A load generator is not a hostile script, so the bench masks
/// each distinct message once and sends the same bytes again and again: the mask bit is set
/// as the RFC requires, and no message is masked twice.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
}

/// One complete server frame at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The FIN bit: the last frame of its message.
    pub fin: bool,
    /// The opcode (`OP_*`).
    pub opcode: u8,
    /// Where the payload starts.
    pub payload_start: usize,
    /// Header plus payload: how many bytes to consume.
    pub len: usize,
}

/// Why a server frame cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Servers must not mask (RFC 6455 §5.1).
    Masked,
    /// A reserved bit is set but no extension was negotiated.
    Reserved,
    /// The payload is larger than the bench accepts.
    TooLarge(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Masked => f.write_str("masked server frame"),
            FrameError::Reserved => f.write_str("reserved bits set in a server frame"),
            FrameError::TooLarge(n) => write!(f, "server frame of {n} bytes is too large"),
        }
    }
}

/// Reads the frame at the start of `buf`: `Ok(None)` until all of it is there.
pub fn parse_server_frame(buf: &[u8], max_payload: usize) -> Result<Option<Frame>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (header, payload_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(&[hi, lo]) => (4, u64::from(u16::from_be_bytes([hi, lo]))),
            _ => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(bytes) => (10, u64::from_be_bytes(bytes)),
            None => return Ok(None),
        },
        short => (2, u64::from(short)),
    };
    let payload_len = usize::try_from(payload_len)
        .ok()
        .filter(|n| *n <= max_payload)
        .ok_or(FrameError::TooLarge(payload_len))?;
    let len = header + payload_len;
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0F, payload_start: header, len }))
}

/// A `Sec-WebSocket-Key` from 16 random bytes, and the `Sec-WebSocket-Accept` it must get.
pub fn handshake_key(random: [u8; 16]) -> (String, String) {
    let key = base64::engine::general_purpose::STANDARD.encode(random);
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    (key, accept)
}

/// Appends the upgrade request for `path` on `host` (`HOST:PORT`).
pub fn encode_upgrade_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str) {
    out.extend_from_slice(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    );
}

/// Reads the answer to the upgrade request: `Ok(None)` until its head is complete, then the
/// head's length if it is a `101` with the right `Sec-WebSocket-Accept`, else why not.
pub fn parse_upgrade_response(buf: &[u8], accept: &str) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err("handshake: response head too large".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("handshake: bad response ({e})")),
    };
    match response.code {
        Some(101) => {}
        Some(code) => return Err(format!("handshake: HTTP {code}")),
        None => return Err("handshake: no status".into()),
    }
    let got = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"));
    match got {
        Some(h) if h.value == accept.as_bytes() => Ok(Some(len)),
        Some(_) => Err("handshake: wrong Sec-WebSocket-Accept".into()),
        None => Err("handshake: no Sec-WebSocket-Accept".into()),
    }
}

/// The length of the first line in `buf`, newline included, or `None` if it is incomplete.
pub fn line_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == b'\n').map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let (len, header) = match frame[1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
            n => (usize::from(n), 2),
        };
        assert_eq!(frame[1] & 0x80, 0x80, "client frames are masked");
        let mask = &frame[header..header + 4];
        let body = &frame[header + 4..];
        assert_eq!(body.len(), len);
        (frame[0], body.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect())
    }

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn client_frames_of_every_header_size_unmask_to_the_payload() {
        for size in [0, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_client_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            assert_eq!(unmask(&out), (0x81, payload), "size {size}");
        }
    }

    #[test]
    fn server_frames_parse_only_when_complete() {
        for size in [0, 7, 125, 126, 300, 65535, 65536] {
            let payload = vec![b'x'; size];
            let wire = server_frame(OP_TEXT, &payload);
            for cut in 0..wire.len() {
                assert_eq!(parse_server_frame(&wire[..cut], 1 << 20), Ok(None), "size {size} cut {cut}");
            }
            let frame = parse_server_frame(&wire, 1 << 20).unwrap().unwrap();
            assert_eq!((frame.fin, frame.opcode, frame.len), (true, OP_TEXT, wire.len()));
            assert_eq!(&wire[frame.payload_start..frame.len], &payload[..]);
        }
    }

    #[test]
    fn bad_server_frames_are_refused() {
        assert_eq!(parse_server_frame(&[0x81, 0x85, 0, 0, 0, 0], 100), Err(FrameError::Masked));
        assert_eq!(parse_server_frame(&[0xC1, 0x00], 100), Err(FrameError::Reserved));
        assert_eq!(
            parse_server_frame(&server_frame(OP_TEXT, &[0; 200]), 100),
            Err(FrameError::TooLarge(200))
        );
    }

    #[test]
    fn upgrade_answer_is_checked() {
        let (key, accept) = handshake_key([7; 16]);
        let mut request = Vec::new();
        encode_upgrade_request(&mut request, "h:1", "/", &key);
        assert!(String::from_utf8(request).unwrap().contains(&format!("Sec-WebSocket-Key: {key}\r\n")));
        let good = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let mut wire = good.clone().into_bytes();
        wire.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(parse_upgrade_response(&wire[..good.len() - 1], &accept), Ok(None));
        assert_eq!(parse_upgrade_response(&wire, &accept), Ok(Some(good.len())));
        assert!(parse_upgrade_response(good.as_bytes(), "nope").unwrap_err().contains("Accept"));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_upgrade_response(busy, &accept), Err("handshake: HTTP 503".into()));
    }

    #[test]
    fn lines_end_at_the_newline() {
        assert_eq!(line_len(b"abc\ndef"), Some(4));
        assert_eq!(line_len(b"abc"), None);
    }
}
