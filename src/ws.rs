//! One client connection's protocol, sans-IO: an HTTP request head, then either a plain HTTP
//! answer or a WebSocket spoken through tungstenite over an in-memory stream.
//!
//! It owns no socket and never reads the clock. The shell appends received bytes to `input()`,
//! calls `poll_event()` until it returns `None`, and writes out `output()`. Everything that waits
//! to be sent waits in that one `Vec`, so it is the one number backpressure checks.

use std::io::{self, Read, Write};

use tungstenite::error::{CapacityError, Error as TError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use crate::buf::InBuf;

/// Largest HTTP request head we read (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// The limits a connection is built with; borrowed from `Config`.
#[derive(Clone, Debug)]
pub struct WsLimits {
    /// Largest message (close 1009 beyond).
    pub max_message_bytes: usize,
    /// Largest frame (close 1009 beyond).
    pub max_frame_bytes: usize,
    /// tungstenite's read buffer.
    pub read_buffer_bytes: usize,
    /// Unparsed input held before the shell stops reading.
    pub in_limit_bytes: usize,
    /// Allowed `Origin` values; empty allows any.
    pub allowed_origins: Vec<String>,
}

impl From<&crate::config::Config> for WsLimits {
    fn from(c: &crate::config::Config) -> Self {
        WsLimits {
            max_message_bytes: c.max_message_bytes,
            max_frame_bytes: c.max_frame_bytes,
            read_buffer_bytes: c.ws_read_buffer_bytes,
            in_limit_bytes: c.client_in_limit_bytes,
            allowed_origins: c.allowed_origins.clone(),
        }
    }
}

/// The byte pipe tungstenite reads from and writes to: `read` pops `input` or says WouldBlock,
/// `write` appends to `output` and never fails.
#[derive(Debug)]
pub struct MemStream {
    input: InBuf,
    output: Vec<u8>,
    /// The peer sent FIN: once `input` is drained, reads return 0 (end of stream).
    eof: bool,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let data = self.input.data();
        if data.is_empty() {
            return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.input.consume(n);
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a connection has to tell the application.
#[derive(Debug, PartialEq)]
pub enum WsEvent {
    /// The upgrade succeeded; the 101 answer is queued.
    Opened,
    /// A plain HTTP request (no upgrade); answer it with [`Ws::respond`].
    Http { method: String, path: String },
    /// A complete text message.
    Text(Utf8Bytes),
    /// A complete binary message (the protocol has none; the app answers with an error).
    Binary,
    /// The peer started or answered the close handshake; our reply (if any) is queued.
    Closed,
    /// The peer broke the protocol; a close frame or HTTP error is queued. `code` is the
    /// WebSocket close code (or the HTTP status before the upgrade).
    Failed { code: u16, why: String },
}

/// Where a connection is in its life.
///
/// ```text
/// Handshaking --upgrade--> Open --close sent/received--> Done
///      |                                                   ^
///      +--plain HTTP request / bad request----------------+
/// ```
/// `Done` only drains `output`; the shell then hangs up.
#[derive(Debug)]
enum WsState {
    Handshaking { input: InBuf, output: Vec<u8> },
    Open(Box<WebSocket<MemStream>>),
    Done { output: Vec<u8> },
}

/// One client's protocol state.
#[derive(Debug)]
pub struct Ws {
    state: WsState,
}

impl Ws {
    /// A connection that has not sent its request yet.
    pub fn new() -> Self {
        Ws { state: WsState::Handshaking { input: InBuf::new(MAX_HEAD_BYTES), output: Vec::new() } }
    }

    /// Where the shell appends bytes read from the socket (`None` once nothing more is read).
    pub fn input(&mut self) -> Option<&mut InBuf> {
        match &mut self.state {
            WsState::Handshaking { input, .. } => Some(input),
            WsState::Open(ws) => Some(&mut ws.get_mut().input),
            WsState::Done { .. } => None,
        }
    }

    /// Bytes waiting to be written to the socket.
    pub fn output(&mut self) -> &mut Vec<u8> {
        match &mut self.state {
            WsState::Handshaking { output, .. } | WsState::Done { output } => output,
            WsState::Open(ws) => &mut ws.get_mut().output,
        }
    }

    /// Bytes waiting to be written, without a mutable borrow.
    pub fn output_len(&self) -> usize {
        match &self.state {
            WsState::Handshaking { output, .. } | WsState::Done { output } => output.len(),
            WsState::Open(ws) => ws.get_ref().output.len(),
        }
    }

    /// True while the WebSocket is open for messages both ways.
    pub fn is_open(&self) -> bool {
        matches!(&self.state, WsState::Open(ws) if ws.can_write())
    }

    /// True while the request head has not arrived.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, WsState::Handshaking { .. })
    }

    /// True once nothing more will be read: after the close handshake, an HTTP answer or an
    /// error. The shell hangs up when `output` is empty.
    pub fn is_done(&self) -> bool {
        match &self.state {
            WsState::Done { .. } => true,
            WsState::Open(ws) => !ws.can_read(),
            WsState::Handshaking { .. } => false,
        }
    }

    /// The peer sent FIN.
    pub fn handle_eof(&mut self) {
        if let WsState::Open(ws) = &mut self.state {
            ws.get_mut().eof = true;
        }
    }

    /// Frees buffers that hold nothing, so an idle connection stays small.
    pub fn release_idle_buffers(&mut self) {
        if let WsState::Open(ws) = &mut self.state {
            let stream = ws.get_mut();
            stream.input.release();
            if stream.output.is_empty() && stream.output.capacity() > 0 {
                stream.output = Vec::new();
            }
        }
    }

    /// Runs the protocol over the input received so far and returns the next event, or `None`
    /// when it needs more bytes (or is done).
    pub fn poll_event(&mut self, limits: &WsLimits) -> Option<WsEvent> {
        match &mut self.state {
            WsState::Handshaking { input, .. } => {
                let len = input.len();
                self.poll_head(limits, len)
            }
            WsState::Open(ws) => {
                let event = loop {
                    match ws.read() {
                        Ok(Message::Text(text)) => break Some(WsEvent::Text(text)),
                        Ok(Message::Binary(_)) => break Some(WsEvent::Binary),
                        // tungstenite queued the pong; it leaves with the flush below.
                        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                        Ok(Message::Close(_)) => break Some(WsEvent::Closed),
                        Err(TError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break None,
                        Err(TError::ConnectionClosed | TError::AlreadyClosed) => break None,
                        Err(e) => return Some(self.fail_open(e)),
                    }
                };
                // Pongs and close replies go out with this pass's writes.
                let _ = ws.flush();
                event
            }
            WsState::Done { .. } => None,
        }
    }

    fn poll_head(&mut self, limits: &WsLimits, len: usize) -> Option<WsEvent> {
        let WsState::Handshaking { input, .. } = &mut self.state else { return None };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(input.data()) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if len >= MAX_HEAD_BYTES => {
                return Some(self.refuse(431, "Request Header Fields Too Large", "request head too large"));
            }
            Ok(httparse::Status::Partial) => return None,
            Err(e) => return Some(self.refuse(400, "Bad Request", &format!("malformed request: {e}"))),
        };
        let method = request.method.unwrap_or("").to_string();
        let path = request.path.unwrap_or("").to_string();
        let header =
            |name: &str| request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        let has_token = |name: &str, token: &str| {
            header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
        };
        if !has_token("upgrade", "websocket") {
            let output = self.take_output();
            self.state = WsState::Done { output };
            return Some(WsEvent::Http { method, path });
        }
        if method != "GET" {
            return Some(self.refuse(405, "Method Not Allowed", "upgrade needs GET"));
        }
        if !has_token("connection", "upgrade") {
            return Some(self.refuse(400, "Bad Request", "upgrade without Connection: upgrade"));
        }
        if header("sec-websocket-version") != Some(b"13") {
            return Some(self.refuse(426, "Upgrade Required", "only WebSocket version 13"));
        }
        let Some(key) = header("sec-websocket-key").filter(|k| !k.is_empty()) else {
            return Some(self.refuse(400, "Bad Request", "no Sec-WebSocket-Key"));
        };
        if !limits.allowed_origins.is_empty() {
            let origin = header("origin").and_then(|o| std::str::from_utf8(o).ok()).unwrap_or("");
            if !limits.allowed_origins.iter().any(|allowed| allowed == origin) {
                return Some(self.refuse(403, "Forbidden", "origin not allowed"));
            }
        }
        let accept = tungstenite::handshake::derive_accept_key(key);
        let WsState::Handshaking { mut input, mut output } =
            std::mem::replace(&mut self.state, WsState::Done { output: Vec::new() })
        else {
            unreachable!("checked above")
        };
        output.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n");
        output.extend_from_slice(b"Connection: Upgrade\r\nSec-WebSocket-Accept: ");
        output.extend_from_slice(accept.as_bytes());
        output.extend_from_slice(b"\r\n\r\n");
        // Frames the client sent right behind its request stay in the input.
        input.consume(head_len);
        let mut frames = InBuf::new(limits.in_limit_bytes);
        frames.extend(input.data());
        let config = WebSocketConfig::default()
            .read_buffer_size(limits.read_buffer_bytes)
            .write_buffer_size(0)
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_frame_bytes));
        let stream = MemStream { input: frames, output, eof: false };
        self.state = WsState::Open(Box::new(WebSocket::from_raw_socket(stream, Role::Server, Some(config))));
        Some(WsEvent::Opened)
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.output())
    }

    /// Answers before the upgrade with an HTTP error and ends the connection.
    fn refuse(&mut self, status: u16, reason: &str, why: &str) -> WsEvent {
        let mut output = self.take_output();
        write_http(&mut output, status, reason, "text/plain; charset=utf-8", format!("{why}\n").as_bytes());
        self.state = WsState::Done { output };
        WsEvent::Failed { code: status, why: why.to_string() }
    }

    /// Maps a tungstenite error on an open socket to the close code RFC 6455 asks for, queues
    /// the close frame, and stops reading (what follows a broken frame is not trustworthy).
    fn fail_open(&mut self, error: TError) -> WsEvent {
        let (code, why) = match &error {
            TError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
                (CloseCode::Size, format!("message of {size} bytes over the {max_size}-byte limit"))
            }
            TError::Capacity(e) => (CloseCode::Size, e.to_string()),
            TError::Utf8(_) => (CloseCode::Invalid, "text frame is not valid UTF-8".to_string()),
            TError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                (CloseCode::Abnormal, "peer left without a close frame".to_string())
            }
            TError::Protocol(e) => (CloseCode::Protocol, e.to_string()),
            other => (CloseCode::Error, other.to_string()),
        };
        let number = u16::from(code);
        if code != CloseCode::Abnormal {
            self.close(number, &why);
        }
        let output = self.take_output();
        self.state = WsState::Done { output };
        WsEvent::Failed { code: number, why }
    }

    /// Queues a text message. Returns false if the socket is no longer open for writing.
    pub fn send_text(&mut self, text: impl Into<Utf8Bytes>) -> bool {
        match &mut self.state {
            WsState::Open(ws) if ws.can_write() => ws.send(Message::Text(text.into())).is_ok(),
            _ => false,
        }
    }

    /// Queues a ping (keepalive).
    pub fn send_ping(&mut self) {
        if let WsState::Open(ws) = &mut self.state
            && ws.can_write()
        {
            let _ = ws.send(Message::Ping(Default::default()));
        }
    }

    /// Starts the close handshake with `code` (1000, 1001, 1009, ...). Reading goes on until the
    /// peer answers; the shell bounds that with a timer.
    pub fn close(&mut self, code: u16, reason: &str) {
        if let WsState::Open(ws) = &mut self.state {
            // Close reasons are limited to 123 bytes by the frame format.
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let frame = CloseFrame { code: CloseCode::from(code), reason: reason[..end].to_string().into() };
            let _ = ws.close(Some(frame));
            let _ = ws.flush();
        }
    }

    /// Answers a plain HTTP request; the connection ends once it is written.
    pub fn respond(&mut self, status: u16, reason: &str, content_type: &str, body: &[u8]) {
        let mut output = self.take_output();
        write_http(&mut output, status, reason, content_type, body);
        self.state = WsState::Done { output };
    }
}

impl Default for Ws {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes a complete HTTP/1.1 response that closes the connection.
pub fn write_http(out: &mut Vec<u8>, status: u16, reason: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> WsLimits {
        WsLimits {
            max_message_bytes: 1024,
            max_frame_bytes: 1024,
            read_buffer_bytes: 256,
            in_limit_bytes: 2048,
            allowed_origins: vec![],
        }
    }

    const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// A masked client frame (mask 0 keeps the payload readable in tests).
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn feed(ws: &mut Ws, bytes: &[u8], limits: &WsLimits) -> Vec<WsEvent> {
        ws.input().expect("reading").extend(bytes);
        std::iter::from_fn(|| ws.poll_event(limits)).collect()
    }

    #[test]
    fn upgrade_byte_at_a_time_then_text() {
        let (l, mut ws) = (limits(), Ws::new());
        let mut events = Vec::new();
        for byte in UPGRADE {
            events.extend(feed(&mut ws, &[*byte], &l));
        }
        assert_eq!(events, vec![WsEvent::Opened]);
        let out = String::from_utf8(std::mem::take(ws.output())).unwrap();
        // RFC 6455's own example key and answer.
        assert!(out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{out}");
        assert_eq!(feed(&mut ws, &client_frame(1, b"hi"), &l), vec![WsEvent::Text("hi".into())]);
        assert!(ws.send_text("got it!"));
        assert_eq!(ws.output().as_slice(), b"\x81\x07got it!");
    }

    #[test]
    fn frame_glued_to_the_request_is_not_lost() {
        let (l, mut ws) = (limits(), Ws::new());
        let bytes = [UPGRADE, &client_frame(1, b"early")].concat();
        assert_eq!(feed(&mut ws, &bytes, &l), vec![WsEvent::Opened, WsEvent::Text("early".into())]);
    }

    #[test]
    fn oversized_message_closes_1009_and_bad_utf8_1007() {
        let l = limits();
        let mut ws = Ws::new();
        feed(&mut ws, UPGRADE, &l);
        ws.output().clear();
        let events = feed(&mut ws, &client_frame(1, &[b'x'; 2000]), &l);
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 1009, .. }]), "{events:?}");
        let out = ws.output();
        assert_eq!((out[0], out[2], out[3]), (0x88, 0x03, 0xf1)); // close frame, code 1009
        let mut ws = Ws::new();
        feed(&mut ws, UPGRADE, &l);
        let events = feed(&mut ws, &client_frame(1, &[0xff, 0xfe]), &l);
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 1007, .. }]), "{events:?}");
    }

    #[test]
    fn plain_http_and_garbage() {
        let l = limits();
        let mut ws = Ws::new();
        let events = feed(&mut ws, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", &l);
        assert_eq!(events, vec![WsEvent::Http { method: "GET".into(), path: "/healthz".into() }]);
        let mut ws = Ws::new();
        let events = feed(&mut ws, b"\x16\x03\x01garbage\r\n\r\n", &l);
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 400, .. }]), "{events:?}");
        assert!(ws.output().starts_with(b"HTTP/1.1 400"));
        assert!(ws.is_done());
    }

    #[test]
    fn origin_not_allowed_is_403() {
        let mut l = limits();
        l.allowed_origins = vec!["http://good".into()];
        let mut ws = Ws::new();
        let req = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nOrigin: http://evil\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(matches!(feed(&mut ws, req, &l).as_slice(), [WsEvent::Failed { code: 403, .. }]));
    }

    #[test]
    fn close_handshake_from_the_client() {
        let l = limits();
        let mut ws = Ws::new();
        feed(&mut ws, UPGRADE, &l);
        ws.output().clear();
        let events = feed(&mut ws, &client_frame(8, &[0x03, 0xe8]), &l);
        assert_eq!(events, vec![WsEvent::Closed]);
        assert_eq!(ws.output().as_slice(), &[0x88, 0x02, 0x03, 0xe8]);
        assert!(ws.is_done());
    }
}
