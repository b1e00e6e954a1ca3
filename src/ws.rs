//! One client connection's protocol, sans-IO: an HTTP request head, then either a plain HTTP
//! answer or a WebSocket spoken through tungstenite over an in-memory stream.
//!
//! It owns no socket and never reads the clock. The shell appends received bytes to `input()`,
//! calls `poll_event()` until it returns `None`, and writes out `output()`. Everything that waits
//! to be sent waits in that one `Vec`, so it is the one number backpressure checks.
//!
//! Data frames we send are encoded straight into that `Vec` (one copy of the payload), not
//! through tungstenite's own write buffer, which would copy it twice and keep its capacity.
//!
//! tungstenite's state (its context and read buffer, about 900 bytes) exists only while a frame
//! needs it: a connection that is quiet holds the stream alone, and a whole, unfragmented data
//! frame is unmasked where it lies and handed on without tungstenite (`stream.rs`). Control
//! frames, fragments, frames cut short and anything broken go through tungstenite, so every
//! close code is still its decision.
//!
//! The shell reports what it wrote with `consume_output(n)`. That keeps track of where the
//! first frame not yet started begins, so [`Ws::abort`] can drop a slow reader's queue and still
//! end the stream with a well-formed close frame.

use std::io;

use tungstenite::error::{CapacityError, Error as TError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role};
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use crate::buf::InBuf;
use head::Head;
use output::{FIN_BINARY, FIN_TEXT, OutQueue, PING, encode_close, encode_frame, truncate_reason};
pub(crate) use output::{write_http, write_http_with};
use stream::{MemStream, Sizes};

mod head;
mod message;
mod output;
mod stream;

/// Largest HTTP request head we read (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// The limits a connection is built with (the server builds them from its `Config`).
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

/// What the upgrade request said about who the client is (docs/PROTOCOL.md, "Who may report a
/// result"), header names matched case-insensitively. `Host` is not kept: a page on a rebinding
/// domain sends one that matches its `Origin` (see [`Upgrade::origin_is_own_or_absent`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// The `Origin` header. A value that is not UTF-8 is kept (lossily converted) rather than
    /// dropped, so that it can never pass for an absent header.
    pub origin: Option<String>,
    /// `Forwarded`, `X-Forwarded-For` or `X-Real-IP` is present: a proxy stands in between.
    pub forwarded: bool,
    /// The token of `Authorization: Bearer <token>` (scripts, servers); the App judges it.
    pub bearer: Option<String>,
}

impl Upgrade {
    /// True when there is no `Origin` (not a browser page) or it is one of `own`, the origins
    /// the server itself is reached at (its listening address, `--public-origin`), compared
    /// ASCII case-insensitively. Never the request's `Host`: a page whose domain rebinds to our
    /// address sends `Host` and `Origin` that agree with each other and name the attacker's
    /// domain. `Origin: null` (sandboxed frames, `file:` pages) is never our own.
    pub fn origin_is_own_or_absent(&self, own: &[String]) -> bool {
        let Some(origin) = &self.origin else { return true };
        own.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// What a connection has to tell the application.
#[derive(Debug, PartialEq)]
pub enum WsEvent {
    /// The upgrade succeeded; the 101 answer is queued.
    Opened(Upgrade),
    /// A plain HTTP request (no upgrade); answer it with [`Ws::respond`].
    Http { method: String, path: String },
    /// A complete text message.
    Text(Utf8Bytes),
    /// A complete binary message, its payload as tungstenite read it (no copy). The job
    /// protocol has none and answers with an error; echo mode sends it back.
    Binary(Bytes),
    /// A complete message whose payload is read where it lies, with [`Ws::here`], until the
    /// next call that polls, reads input or gives buffers back (only from
    /// [`Ws::poll_event_here`]). `text`: a text message (its UTF-8 is checked).
    Here { text: bool },
    /// The peer started or answered the close handshake; our reply (if any) is queued.
    Closed,
    /// The peer broke the protocol; a close frame or HTTP error is queued. `code` is the
    /// WebSocket close code (or the HTTP status before the upgrade).
    Failed { code: u16, why: String },
}

/// Where a connection is in its life.
///
/// ```text
/// Handshaking --upgrade--> Open --close sent/received, protocol error, abort--> Done
///      |                                                                          ^
///      +--plain HTTP request / bad request / abort--------------------------------+
/// ```
/// `Done` only drains `output`; the shell then hangs up. `close_queued` says whether a close
/// frame is in `output` or already went out (in `Open`, tungstenite's `can_write()` says it).
///
/// `Quiet` is `Open` without tungstenite's state (its context and its read buffer, about
/// 900 bytes): right after the upgrade, after a large frame, and once the keepalive found the
/// connection silent. The first byte that arrives makes the state again (`wake`).
///
/// `Idle` is `Quiet` with nothing in the stream: no input, no output, no frame or message
/// under way. It keeps only what a stream is made again with (`rouse`), inline, so a
/// connection that sits idle holds no allocation and only a few bytes in its slab slot; the
/// other states are boxed, which keeps `Ws` itself small. A connection goes idle when its
/// output is all written and it holds nothing (`release_idle_buffers`).
#[derive(Debug)]
enum WsState {
    Handshaking(Box<Head>),
    Idle(Idle),
    Quiet(Box<MemStream>),
    Open(Box<WebSocket<MemStream>>),
    Done(Box<Ending>),
}

/// Over: what still waits to be written, and whether a close frame is among it (or already
/// went out).
#[derive(Debug, Default)]
struct Ending {
    output: OutQueue,
    close_queued: bool,
}

/// What an idle connection keeps to make its stream again.
#[derive(Clone, Copy, Debug)]
struct Idle {
    sizes: Sizes,
    /// The stream's count of messages begun (see `MessageTrack::started`).
    started: u32,
}

/// Stands in for a state being moved out (never seen outside one call).
const MOVING: WsState = WsState::Idle(Idle { sizes: Sizes::NONE, started: 0 });

/// One client's protocol state.
#[derive(Debug)]
pub struct Ws {
    state: WsState,
}

impl Ws {
    /// A connection that has not sent its request yet.
    pub fn new() -> Self {
        let head = Head { input: InBuf::new(MAX_HEAD_BYTES), output: OutQueue::default() };
        Ws { state: WsState::Handshaking(Box::new(head)) }
    }

    /// Where the shell appends bytes read from the socket (`None` once nothing more is read).
    pub fn input(&mut self) -> Option<&mut InBuf> {
        self.rouse();
        match &mut self.state {
            WsState::Handshaking(head) => Some(&mut head.input),
            WsState::Quiet(stream) => {
                stream.settle_here();
                Some(&mut stream.input)
            }
            WsState::Open(ws) => Some(&mut ws.get_mut().input),
            WsState::Idle(_) | WsState::Done(_) => None,
        }
    }

    /// The output queue; `None` while idle (nothing waits).
    fn out_queue(&self) -> Option<&OutQueue> {
        match &self.state {
            WsState::Handshaking(head) => Some(&head.output),
            WsState::Done(ending) => Some(&ending.output),
            WsState::Quiet(stream) => Some(&stream.output),
            WsState::Open(ws) => Some(&ws.get_ref().output),
            WsState::Idle(_) => None,
        }
    }

    /// The output queue, to add to (an idle connection makes its stream again first).
    fn out_queue_mut(&mut self) -> &mut OutQueue {
        self.rouse();
        match &mut self.state {
            WsState::Handshaking(head) => &mut head.output,
            WsState::Done(ending) => &mut ending.output,
            WsState::Quiet(stream) => &mut stream.output,
            WsState::Open(ws) => &mut ws.get_mut().output,
            WsState::Idle(_) => unreachable!("roused above"),
        }
    }

    /// Bytes waiting to be written to the socket. Report what was written with
    /// [`Ws::consume_output`].
    pub fn output(&self) -> &[u8] {
        self.out_queue().map_or(&[], |q| &q.bytes[..])
    }

    /// Bytes waiting to be written.
    pub fn output_len(&self) -> usize {
        self.out_queue().map_or(0, |q| q.bytes.len())
    }

    /// The shell wrote the first `n` bytes of [`Ws::output`]: drop them. Free when the socket
    /// took everything; after a partial write it steps over the frames it finished, so that
    /// [`Ws::abort`] knows which bytes belong to a frame already partly on the wire.
    pub fn consume_output(&mut self, n: usize) {
        if !matches!(self.state, WsState::Idle(_)) {
            self.out_queue_mut().consume(n);
        }
    }

    /// Gives up on a reader that does not keep up: keeps only the unsent rest of what is
    /// partly on the wire (a frame, or the 101 answer), drops every frame not yet started,
    /// appends a close frame with `code` and `reason` (cut to 123 bytes) if the WebSocket was
    /// open, and moves to `Done`: nothing more is read or sent. Returns whether a close frame
    /// was queued; false before the upgrade (an HTTP answer is never cut) and when our close
    /// frame has already started to leave.
    pub fn abort(&mut self, code: u16, reason: &str) -> bool {
        self.finish();
        let WsState::Done(ending) = &mut self.state else { unreachable!("finish() moves to Done") };
        let Ending { output, close_queued } = &mut **ending;
        if !output.framed {
            return false;
        }
        // tungstenite sends nothing after its close frame, so a queued close is the last frame:
        // if no whole frame waits behind `kept`, it has started to leave.
        let close_started = *close_queued && output.bytes.len() == output.kept;
        output.bytes.truncate(output.kept);
        if close_started {
            return false;
        }
        encode_close(&mut output.bytes, code, reason);
        *close_queued = true;
        true
    }

    /// True while the WebSocket is open for messages both ways.
    pub fn is_open(&self) -> bool {
        match &self.state {
            WsState::Quiet(_) | WsState::Idle(_) => true,
            WsState::Open(ws) => ws.can_write(),
            _ => false,
        }
    }

    /// True while the request head has not arrived.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, WsState::Handshaking(_))
    }

    /// The number of the message the client has begun and not finished (fragments, or a frame
    /// still arriving), `None` between messages; the connection times each number from its start.
    pub fn open_message(&self) -> Option<u32> {
        let track = &self.stream()?.message;
        track.open.then_some(track.started)
    }

    /// The stream of an open WebSocket, with or without tungstenite's state.
    fn stream(&self) -> Option<&MemStream> {
        match &self.state {
            WsState::Quiet(stream) => Some(stream),
            WsState::Open(ws) => Some(ws.get_ref()),
            _ => None,
        }
    }

    /// tungstenite's state, made afresh around the stream of a quiet (or idle) connection.
    fn wake(&mut self) {
        self.rouse();
        if !matches!(self.state, WsState::Quiet(_)) {
            return;
        }
        let WsState::Quiet(stream) = std::mem::replace(&mut self.state, MOVING) else {
            unreachable!("checked above")
        };
        let mut stream = *stream;
        stream.settle_here();
        let config = stream.sizes.config();
        self.state = WsState::Open(Box::new(WebSocket::from_raw_socket(stream, Role::Server, Some(config))));
    }

    /// Drops tungstenite's state when it holds nothing of the client's and the socket is still
    /// open both ways (see `WsState::Quiet`); otherwise nothing happens.
    fn quiet(&mut self) {
        let WsState::Open(ws) = &self.state else { return };
        if ws.can_write() && ws.can_read() && ws.get_ref().between_messages() {
            self.park();
        }
    }

    /// `Open` to `Quiet`: tungstenite's state dropped, the stream kept.
    fn park(&mut self) {
        if !matches!(self.state, WsState::Open(_)) {
            return;
        }
        let WsState::Open(ws) = std::mem::replace(&mut self.state, MOVING) else {
            unreachable!("checked above")
        };
        let mut stream = ws.into_inner();
        stream.large_frame = false;
        self.state = WsState::Quiet(Box::new(stream));
    }

    /// Bytes of client input this connection holds that have not become messages yet: the
    /// unparsed input (a request head, or frames not yet handed to tungstenite), plus the bytes
    /// of an unfinished message that tungstenite keeps inside its state.
    pub fn held_input_bytes(&self) -> usize {
        match &self.state {
            WsState::Handshaking(head) => head.input.len(),
            _ => self.stream().map_or(0, |stream| stream.unread().saturating_add(stream.message.bytes)),
        }
    }

    /// Ends an open WebSocket on our side: a close frame with `code` and `reason` behind what is
    /// queued, and the input and tungstenite's state (an unfinished message too) dropped at once,
    /// since nothing more will be read. Before the upgrade, or once over, it only stops reading.
    pub fn fail(&mut self, code: u16, reason: &str) {
        self.close(code, reason);
        self.finish();
    }

    /// True once nothing more will be read: after the close handshake, an HTTP answer or an
    /// error. The shell hangs up when `output` is empty.
    pub fn is_done(&self) -> bool {
        match &self.state {
            WsState::Done(_) => true,
            WsState::Open(ws) => !ws.can_read(),
            WsState::Handshaking(_) | WsState::Quiet(_) | WsState::Idle(_) => false,
        }
    }

    /// The peer sent FIN.
    pub fn handle_eof(&mut self) {
        self.rouse(); // the end of the stream is read like input
        match &mut self.state {
            WsState::Quiet(stream) => stream.eof = true,
            WsState::Open(ws) => ws.get_mut().eof = true,
            _ => {}
        }
    }

    /// Frees buffers that hold nothing, so an idle connection stays small; a quiet one that
    /// holds nothing at all keeps no stream either (`WsState::Idle`).
    pub fn release_idle_buffers(&mut self) {
        let stream = match &mut self.state {
            WsState::Quiet(stream) => Some(&mut **stream),
            WsState::Open(ws) => Some(ws.get_mut()),
            _ => None,
        };
        if let Some(stream) = stream {
            stream.settle_here();
            stream.input.release();
            if stream.output.bytes.is_empty() && stream.output.bytes.capacity() > 0 {
                stream.output.bytes = Vec::new();
            }
        }
        self.sleep(true);
    }

    /// Runs the protocol over the input received so far and returns the next event, or `None`
    /// when it needs more bytes (or is done).
    pub fn poll_event(&mut self, limits: &WsLimits) -> Option<WsEvent> {
        self.poll(limits, false)
    }

    /// [`Ws::poll_event`], but a whole message that needs no tungstenite comes as
    /// [`WsEvent::Here`], its payload read with [`Ws::here`] (no copy, no allocation).
    pub fn poll_event_here(&mut self, limits: &WsLimits) -> Option<WsEvent> {
        self.poll(limits, true)
    }

    /// The payload of the last [`WsEvent::Here`] (empty once it is settled, or if none).
    pub fn here(&self) -> &[u8] {
        match &self.state {
            WsState::Quiet(stream) => stream.here(),
            _ => &[],
        }
    }

    /// Sends the last [`WsEvent::Here`] back as it came (echo mode). Returns false if there is
    /// none, or the socket is no longer open for writing.
    pub fn echo_here(&mut self) -> bool {
        let WsState::Quiet(stream) = &mut self.state else { return false };
        let Some(here) = stream.here_kind() else { return false };
        let first = if here.text { FIN_TEXT } else { FIN_BINARY };
        let payload = &stream.input.data()[usize::from(here.start)..here.end as usize];
        encode_frame(&mut stream.output.bytes, first, payload);
        true
    }

    fn poll(&mut self, limits: &WsLimits, in_place: bool) -> Option<WsEvent> {
        if let WsState::Quiet(stream) = &mut self.state {
            stream.settle_here();
        }
        match &mut self.state {
            WsState::Handshaking(head) => {
                let len = head.input.len();
                self.poll_head(limits, len)
            }
            WsState::Idle(_) => None,
            WsState::Quiet(stream) if stream.input.is_empty() && !stream.eof => {
                self.sleep(false);
                None
            }
            WsState::Quiet(stream) => {
                let event = if in_place { stream.take_here() } else { stream.take_whole_message() };
                if event.is_some() {
                    return event;
                }
                self.wake();
                self.poll(limits, in_place)
            }
            WsState::Open(ws) => {
                let event = loop {
                    match ws.read() {
                        Ok(Message::Text(text)) => break Some(WsEvent::Text(text)),
                        Ok(Message::Binary(data)) => break Some(WsEvent::Binary(data)),
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
                // All read and nothing held: whole frames go the short way again.
                if event.is_none() && ws.can_write() && ws.can_read() && ws.get_ref().between_messages() {
                    self.park();
                    self.sleep(false);
                    return None;
                }
                if matches!(event, Some(WsEvent::Text(_) | WsEvent::Binary(_))) && ws.get_ref().large_frame {
                    self.shed_read_buffer();
                }
                event
            }
            WsState::Done(_) => None,
        }
    }

    /// tungstenite keeps its read buffer at the size of the largest frame it has read (and,
    /// with `Bytes` split off it, sometimes more), for as long as its state lives: a client
    /// that once sent a 16 MiB message would hold 16 MiB or more while idle. Right after a
    /// message, tungstenite holds nothing else: no byte of the next frame (reads stop at frame
    /// ends), no fragment (the message is whole), no pong or close reply (flushed). So while
    /// the socket is still open both ways its state is dropped (`Quiet`) and made again, with
    /// a small buffer, when the next byte arrives. The message's payload keeps the old buffer
    /// alive only until the caller drops it.
    fn shed_read_buffer(&mut self) {
        let WsState::Open(ws) = &self.state else { return };
        // Bytes of the next frames may wait in `input` already: they are still whole frames
        // that tungstenite has not seen, so dropping its state loses nothing.
        if ws.can_write() && ws.can_read() && ws.get_ref().frame_left == 0 && !ws.get_ref().message.open {
            self.park();
        }
    }

    /// Moves to `Done`, keeping what waits in `output`.
    fn finish(&mut self) {
        let close_queued = match &self.state {
            WsState::Handshaking(_) | WsState::Quiet(_) | WsState::Idle(_) => false,
            WsState::Open(ws) => !ws.can_write(),
            WsState::Done(ending) => ending.close_queued,
        };
        if let WsState::Done(_) = self.state {
            return; // already there, its output kept as it is
        }
        let output = std::mem::take(self.out_queue_mut());
        self.state = WsState::Done(Box::new(Ending { output, close_queued }));
    }

    /// Takes back the 101 just queued (nothing follows it yet) and answers `status` instead (429).
    pub fn turn_away(&mut self, status: u16, reason: &str, why: &str) {
        *self.out_queue_mut() = OutQueue::default();
        self.refuse(status, reason, why, &[]);
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
        self.finish();
        WsEvent::Failed { code: number, why }
    }

    /// Queues a text message. Returns false if the socket is no longer open for writing.
    pub fn send_text(&mut self, text: impl AsRef<str>) -> bool {
        self.send_frame(FIN_TEXT, text.as_ref().as_bytes())
    }

    /// Queues a binary message. Returns false if the socket is no longer open for writing.
    pub fn send_binary(&mut self, data: &[u8]) -> bool {
        self.send_frame(FIN_BINARY, data)
    }

    /// Appends one data frame to `output` while tungstenite may still write (no close sent or
    /// received). Nothing of tungstenite's can be waiting to go out in between: it writes
    /// through to `output` at once (write buffer 0, writes never fail) and `poll_event` flushes
    /// its pongs and close replies before it returns, so frames stay in order.
    fn send_frame(&mut self, first: u8, payload: &[u8]) -> bool {
        self.rouse();
        match &mut self.state {
            WsState::Quiet(stream) => encode_frame(&mut stream.output.bytes, first, payload),
            WsState::Open(ws) if ws.can_write() => {
                encode_frame(&mut ws.get_mut().output.bytes, first, payload)
            }
            _ => return false,
        }
        true
    }

    /// Queues a ping (keepalive). A connection silent since its last message gives up
    /// tungstenite's state first (see `WsState::Quiet`): the pong, or any byte, makes it again.
    pub fn send_ping(&mut self) {
        self.quiet();
        self.rouse();
        match &mut self.state {
            WsState::Quiet(stream) => encode_frame(&mut stream.output.bytes, PING, &[]),
            WsState::Open(ws) if ws.can_write() => {
                let _ = ws.send(Message::Ping(Default::default()));
            }
            _ => {}
        }
    }

    /// Starts the close handshake with `code` (1000, 1001, 1009, ...). Reading goes on until the
    /// peer answers; the shell bounds that with a timer.
    pub fn close(&mut self, code: u16, reason: &str) {
        self.wake(); // tungstenite leads the close handshake
        if let WsState::Open(ws) = &mut self.state {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: truncate_reason(reason).to_string().into(),
            };
            let _ = ws.close(Some(frame));
            let _ = ws.flush();
        }
    }

    /// Answers a plain HTTP request with a whole response ([`write_http`]), then ends.
    pub fn respond(&mut self, response: &[u8]) {
        self.out_queue_mut().bytes.extend_from_slice(response);
        self.finish();
    }
}

impl Default for Ws {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use stream::SHED_FRAME_BYTES;
    use tungstenite::protocol::WebSocketConfig;

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
        masked_frame(0x80 | opcode, payload)
    }

    /// A client frame whose first byte (FIN, opcode) is `first`, masked with a real key.
    fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else if let Ok(short) = u16::try_from(payload.len()) {
            f.push(0x80 | 126);
            f.extend_from_slice(&short.to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        f
    }

    /// What the shell does when the socket takes everything.
    fn drain(ws: &mut Ws) -> Vec<u8> {
        let out = ws.output().to_vec();
        ws.consume_output(out.len());
        out
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
        let upgrade = Upgrade { origin: None, forwarded: false, bearer: None };
        assert_eq!(events, vec![WsEvent::Opened(upgrade)]);
        let out = String::from_utf8(drain(&mut ws)).unwrap();
        // RFC 6455's own example key and answer.
        assert!(out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{out}");
        assert_eq!(feed(&mut ws, &client_frame(1, b"hi"), &l), vec![WsEvent::Text("hi".into())]);
        assert!(ws.send_text("got it!"));
        assert_eq!(ws.output(), b"\x81\x07got it!");
    }

    #[test]
    fn binary_messages_carry_their_payload_and_go_back_as_binary() {
        let (l, mut ws) = (limits(), open_ws());
        let payload = [0u8, 0xff, 0x80, b'x'];
        assert_eq!(
            feed(&mut ws, &client_frame(2, &payload), &l),
            vec![WsEvent::Binary(Bytes::copy_from_slice(&payload))]
        );
        assert!(ws.send_binary(&payload));
        assert_eq!(ws.output(), [&[0x82, 4][..], &payload].concat().as_slice());
    }

    #[test]
    fn a_fragmented_message_with_a_ping_inside_comes_out_whole_after_the_pong() {
        let (l, mut ws) = (limits(), open_ws());
        let wire = [
            masked_frame(0x01, "Hé".as_bytes()), // text, not final
            masked_frame(0x89, b"p"),            // ping between the fragments
            masked_frame(0x00, b"l"),            // continuation, not final
            masked_frame(0x80, b"lo"),           // final continuation
        ]
        .concat();
        // Byte by byte: every fragment and the ping arrive in pieces.
        let mut events = Vec::new();
        for byte in &wire {
            events.extend(feed(&mut ws, &[*byte], &l));
        }
        assert_eq!(events, vec![WsEvent::Text("Héllo".into())]);
        assert_eq!(ws.output(), b"\x8a\x01p", "the pong left as soon as the ping was read");
        let WsEvent::Text(text) = &events[0] else { unreachable!() };
        assert!(ws.send_text(text));
        let got = client_reads(&[ws.output(), &close_frame(1000, "")].concat());
        assert_eq!(got[..2], [Message::Pong(Bytes::from_static(b"p")), Message::text("Héllo")]);
    }

    #[test]
    fn data_frames_of_every_length_encoding_read_back_whole() {
        for len in [0, 125, 126, 0xffff, 0x1_0000] {
            let mut ws = open_ws();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert!(ws.send_binary(&data));
            assert!(ws.send_text("a".repeat(len)));
            let wire = [ws.output(), &close_frame(1000, "")].concat();
            let got = client_reads(&wire);
            assert_eq!(got[0], Message::Binary(data.into()), "len {len}");
            assert_eq!(got[1], Message::text("a".repeat(len)), "len {len}");
            // The shortest length encoding: the binary frame is as long as the text one.
            assert_eq!(&ws.output()[text_frame(len).len()..], text_frame(len));
        }
    }

    #[test]
    fn whole_data_frames_need_no_tungstenite_state_and_the_rest_wakes_it() {
        let (l, mut ws) = (limits(), Ws::new());
        let quiet = |ws: &Ws| matches!(ws.state, WsState::Quiet(_));
        assert!(matches!(feed(&mut ws, UPGRADE, &l).as_slice(), [WsEvent::Opened(_)]));
        drain(&mut ws);
        assert!(quiet(&ws), "no state right after the upgrade");
        // Whole frames, one with a 2-byte extended length, glued together: the short way.
        let wire = [masked_frame(0x81, b"hi"), masked_frame(0x82, &[7; 200])].concat();
        let events = feed(&mut ws, &wire, &l);
        assert_eq!(events, vec![WsEvent::Text("hi".into()), WsEvent::Binary(Bytes::from(vec![7; 200]))]);
        assert!(quiet(&ws) && ws.held_input_bytes() == 0);
        // A ping wakes tungstenite, which answers it; with nothing held it is dropped again.
        assert_eq!(feed(&mut ws, &masked_frame(0x89, b"p"), &l), vec![]);
        assert_eq!(drain(&mut ws), b"\x8a\x01p");
        assert!(quiet(&ws));
        // A fragmented message is tungstenite's until it is whole, and timed meanwhile.
        assert_eq!(feed(&mut ws, &masked_frame(0x01, b"ab"), &l), vec![]);
        assert!(!quiet(&ws) && ws.open_message().is_some());
        assert_eq!(feed(&mut ws, &masked_frame(0x80, b"c"), &l), vec![WsEvent::Text("abc".into())]);
        assert!(quiet(&ws) && ws.open_message().is_none());
        // So is a frame cut short, until its end arrives.
        let frame = masked_frame(0x81, b"split");
        assert_eq!(feed(&mut ws, &frame[..4], &l), vec![]);
        assert!(!quiet(&ws));
        assert_eq!(feed(&mut ws, &frame[4..], &l), vec![WsEvent::Text("split".into())]);
        assert!(quiet(&ws));
        // Invalid UTF-8 is left as it came for tungstenite, which fails it with 1007.
        let events = feed(&mut ws, &masked_frame(0x81, &[0xff, 0xfe]), &l);
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 1007, .. }]), "{events:?}");
    }

    #[test]
    fn a_message_handed_on_in_place_is_read_echoed_and_then_consumed() {
        let (l, mut ws) = (limits(), Ws::new());
        feed(&mut ws, UPGRADE, &l);
        drain(&mut ws);
        let wire = [masked_frame(0x81, b"one"), masked_frame(0x82, b"two"), masked_frame(0x89, b"")].concat();
        ws.input().expect("open").extend(&wire);
        assert_eq!(ws.poll_event_here(&l), Some(WsEvent::Here { text: true }));
        assert_eq!(ws.here(), b"one");
        assert_eq!(ws.held_input_bytes(), wire.len() - masked_frame(0x81, b"one").len());
        assert!(ws.echo_here());
        assert_eq!(ws.poll_event_here(&l), Some(WsEvent::Here { text: false }));
        assert_eq!(ws.here(), b"two");
        // Reading more input settles the message first: its bytes are gone, the rest stays.
        ws.input().expect("open").extend(&masked_frame(0x81, b"three"));
        assert_eq!(ws.here(), b"");
        assert!(!ws.echo_here(), "nothing to echo once settled");
        // The ping wakes tungstenite, which reads on: what follows comes from it, owned.
        assert_eq!(ws.poll_event_here(&l), Some(WsEvent::Text("three".into())));
        assert_eq!(ws.poll_event_here(&l), None);
        assert!(matches!(ws.state, WsState::Quiet(_)));
        assert_eq!((ws.here(), ws.held_input_bytes()), (&b""[..], 0));
        assert_eq!(drain(&mut ws), b"\x81\x03one\x8a\x00");
    }

    #[test]
    fn an_idle_connection_keeps_no_stream_and_makes_it_again_for_whatever_comes() {
        let idle = |ws: &Ws| matches!(ws.state, WsState::Idle(_));
        let (l, mut ws) = (limits(), Ws::new());
        feed(&mut ws, UPGRADE, &l);
        ws.release_idle_buffers();
        assert!(!idle(&ws), "the 101 answer still waits");
        drain(&mut ws);
        ws.release_idle_buffers();
        assert!(idle(&ws) && ws.is_open() && ws.output_len() == 0 && ws.open_message().is_none());
        // A message: the stream is made again, and kept while messages come (not made again
        // every pass); a pass with no new message gives it up.
        assert_eq!(feed(&mut ws, &masked_frame(0x81, b"hi"), &l), vec![WsEvent::Text("hi".into())]);
        assert!(ws.send_text("ok"));
        assert_eq!(drain(&mut ws), b"\x81\x02ok");
        ws.release_idle_buffers();
        assert!(!idle(&ws) && ws.held_input_bytes() == 0, "busy: kept for the next pass");
        assert_eq!(ws.poll_event(&l), None);
        assert!(idle(&ws), "no message since its last write");
        // A message left unfinished keeps the stream (and its number counts on from before).
        assert_eq!(feed(&mut ws, &masked_frame(0x01, b"a"), &l), vec![]);
        let begun = ws.open_message();
        ws.release_idle_buffers();
        assert!(!idle(&ws) && begun == Some(2), "{begun:?}");
        assert_eq!(feed(&mut ws, &masked_frame(0x80, b"b"), &l), vec![WsEvent::Text("ab".into())]);
        drain(&mut ws);
        ws.release_idle_buffers();
        assert_eq!(ws.poll_event(&l), None);
        assert!(idle(&ws));
        // The keepalive ping, and a slow reader's close frame, leave from an idle connection.
        ws.send_ping();
        assert_eq!(drain(&mut ws), b"\x89\x00");
        ws.release_idle_buffers();
        assert!(idle(&ws));
        assert!(ws.abort(1008, "slow"));
        assert_eq!(drain(&mut ws), close_frame(1008, "slow"));
        // The peer's end of stream is read from an idle connection too.
        let (l, mut ws) = (limits(), Ws::new());
        feed(&mut ws, UPGRADE, &l);
        drain(&mut ws);
        ws.release_idle_buffers();
        ws.handle_eof();
        let events: Vec<_> = std::iter::from_fn(|| ws.poll_event(&l)).collect();
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 1006, .. }]), "{events:?}");
    }

    #[test]
    fn the_keepalive_ping_drops_the_state_of_a_silent_connection() {
        let (l, mut ws) = (limits(), Ws::new());
        feed(&mut ws, UPGRADE, &l);
        drain(&mut ws);
        let events = feed(&mut ws, &masked_frame(0x09, b""), &l); // a ping without FIN: tungstenite's
        assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 1002, .. }]), "{events:?}");
        let (l, mut ws) = (limits(), Ws::new());
        feed(&mut ws, UPGRADE, &l);
        drain(&mut ws);
        feed(&mut ws, &masked_frame(0x8a, b""), &l); // an unasked pong wakes tungstenite
        let parked = matches!(ws.state, WsState::Quiet(_) | WsState::Idle(_));
        assert!(parked, "parked (and, holding nothing, idle) once it has read everything");
        feed(&mut ws, &masked_frame(0x01, b"x"), &l); // a message begun: state kept
        ws.send_ping();
        assert!(matches!(ws.state, WsState::Open(_)));
        assert_eq!(drain(&mut ws), b"\x89\x00");
        assert_eq!(feed(&mut ws, &masked_frame(0x80, b"y"), &l), vec![WsEvent::Text("xy".into())]);
        ws.send_ping();
        assert!(matches!(ws.state, WsState::Quiet(_)));
        assert_eq!(drain(&mut ws), b"\x89\x00");
    }

    #[test]
    fn small_frames_go_together_and_a_large_frame_alone() {
        let (first, second) = (masked_frame(0x81, &[b'a'; 300]), masked_frame(0x82, b"bc"));
        let large = masked_frame(0x82, &[b'L'; SHED_FRAME_BYTES + 1]);
        let after = masked_frame(0x81, b"z");
        let third = masked_frame(0x82, &[b'd'; 200]); // its length takes two more header bytes
        let wire = [&first[..], &second, &large, &after, &third[..3]].concat();
        let mut input = InBuf::new(wire.len());
        input.extend(&wire);
        let mut stream = MemStream::new(input, OutQueue::default(), Sizes::of(&limits()));
        let mut buf = vec![0u8; 2 * SHED_FRAME_BYTES];
        assert_eq!(
            stream.read(&mut buf).unwrap(),
            first.len() + second.len(),
            "whole small frames, together"
        );
        assert!(!stream.large_frame);
        assert_eq!(stream.read(&mut buf[..4]).unwrap(), 4, "a short buffer takes part of a frame");
        assert!(stream.large_frame);
        assert_eq!(stream.read(&mut buf).unwrap(), large.len() - 4, "then the rest of it, no more");
        // The next frames are small again; three bytes of an 8-byte header are too few for
        // its length: what is whole goes, the rest waits, unless the peer has gone.
        stream.large_frame = false;
        assert_eq!(stream.read(&mut buf).unwrap(), after.len());
        assert_eq!(stream.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        stream.eof = true;
        assert_eq!(stream.read(&mut buf).unwrap(), 3);
        assert_eq!(stream.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_large_message_then_small_ones_byte_at_a_time_or_glued() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut l = limits();
        (l.max_message_bytes, l.max_frame_bytes, l.in_limit_bytes) = (1 << 20, 1 << 20, 1 << 21);
        let wire =
            [masked_frame(0x82, &big), masked_frame(0x89, b"p"), masked_frame(0x81, b"small")].concat();
        let expected = vec![WsEvent::Binary(Bytes::from(big)), WsEvent::Text("small".into())];
        for step in [1, 7, 4096, wire.len()] {
            let mut ws = Ws::new();
            assert!(matches!(feed(&mut ws, UPGRADE, &l).as_slice(), [WsEvent::Opened(_)]));
            drain(&mut ws);
            let mut events = Vec::new();
            for chunk in wire.chunks(step) {
                events.extend(feed(&mut ws, chunk, &l));
            }
            assert!(events == expected, "in steps of {step}");
            assert_eq!(ws.output(), b"\x8a\x01p", "in steps of {step}");
            assert!(ws.is_open());
        }
    }

    #[test]
    fn nothing_is_sent_after_a_close() {
        let l = limits();
        let mut ws = open_ws();
        feed(&mut ws, &client_frame(8, &[0x03, 0xe8]), &l);
        let out = ws.output().to_vec();
        assert!(!ws.send_text("late") && !ws.send_binary(b"late"));
        assert_eq!(ws.output(), out.as_slice());
        let mut ws = open_ws();
        ws.close(1001, "bye");
        assert!(!ws.send_text("late") && !ws.send_binary(b"late"));
    }

    #[test]
    fn frame_glued_to_the_request_is_not_lost() {
        let (l, mut ws) = (limits(), Ws::new());
        let bytes = [UPGRADE, &client_frame(1, b"early")].concat();
        let events = feed(&mut ws, &bytes, &l);
        assert!(
            matches!(events.as_slice(), [WsEvent::Opened(_), WsEvent::Text(t)] if t.as_str() == "early"),
            "{events:?}"
        );
    }

    #[test]
    fn oversized_message_closes_1009_and_bad_utf8_1007() {
        let l = limits();
        let mut ws = Ws::new();
        feed(&mut ws, UPGRADE, &l);
        drain(&mut ws);
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
        drain(&mut ws);
        let events = feed(&mut ws, &client_frame(8, &[0x03, 0xe8]), &l);
        assert_eq!(events, vec![WsEvent::Closed]);
        assert_eq!(ws.output(), &[0x88, 0x02, 0x03, 0xe8]);
        assert!(ws.is_done());
    }

    fn upgrade_with(headers: &str) -> Upgrade {
        let req = format!(
            "GET / HTTP/1.1\r\n{headers}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        match feed(&mut Ws::new(), req.as_bytes(), &limits()).as_slice() {
            [WsEvent::Opened(upgrade)] => upgrade.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upgrade_reports_origin_and_proxies() {
        let own = ["http://127.0.0.1:8080".to_string()];
        let up = upgrade_with("host: 127.0.0.1:8080\r\norigin: HTTP://127.0.0.1:8080\r\n");
        assert_eq!(up.origin.as_deref(), Some("HTTP://127.0.0.1:8080"));
        assert!(!up.forwarded);
        assert!(up.origin_is_own_or_absent(&own), "compared ASCII case-insensitively");
        assert!(upgrade_with("Host: x\r\n").origin_is_own_or_absent(&own));
        assert!(upgrade_with("").origin_is_own_or_absent(&[]));
        for name in ["Forwarded: for=1.2.3.4", "x-forwarded-for: 1.2.3.4", "X-REAL-IP: 1.2.3.4"] {
            assert!(upgrade_with(&format!("Host: x\r\n{name}\r\n")).forwarded, "{name}");
        }
    }

    #[test]
    fn the_hosts_own_word_makes_no_origin_our_own() {
        let own = ["http://127.0.0.1:8080".to_string(), "https://gear.example".to_string()];
        let is_own = |headers: &str| upgrade_with(headers).origin_is_own_or_absent(&own);
        // A rebinding page: its Host and Origin agree, and name the attacker's domain.
        assert!(!is_own("Host: evil.example:8080\r\nOrigin: http://evil.example:8080\r\n"));
        // Our own origins, whatever Host says.
        assert!(is_own("Host: evil.example\r\nOrigin: http://127.0.0.1:8080\r\n"));
        assert!(is_own("Origin: https://GEAR.example\r\n"));
        for origin in
            ["null", "http://127.0.0.1:8081", "http://127.0.0.1", "https://127.0.0.1:8080", "http://"]
        {
            assert!(!is_own(&format!("Host: 127.0.0.1:8080\r\nOrigin: {origin}\r\n")), "{origin}");
        }
        // An Origin that is not UTF-8 is still an Origin, and never our own.
        let up = upgrade_with("Origin: http://\u{ff}\r\n");
        assert!(up.origin.is_some() && !up.origin_is_own_or_absent(&own));
        assert!(!Upgrade { origin: Some("é".into()), ..Default::default() }.origin_is_own_or_absent(&own));
    }

    #[test]
    fn two_host_headers_are_400_upgrade_or_not() {
        for upgrade in ["", "Upgrade: websocket\r\nConnection: Upgrade\r\n"] {
            let mut ws = Ws::new();
            let req = format!(
                "GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n{upgrade}host: evil.example\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            let events = feed(&mut ws, req.as_bytes(), &limits());
            assert!(matches!(events.as_slice(), [WsEvent::Failed { code: 400, .. }]), "{events:?}");
            assert!(ws.output().starts_with(b"HTTP/1.1 400") && ws.is_done());
        }
    }

    #[test]
    fn allowed_origins_refuse_other_pages_but_not_clients_without_origin() {
        let mut l = limits();
        l.allowed_origins = vec!["http://good".into()];
        let events = feed(&mut Ws::new(), UPGRADE, &l);
        assert!(matches!(events.as_slice(), [WsEvent::Opened(Upgrade { origin: None, .. })]), "{events:?}");
    }

    #[test]
    fn an_unfinished_message_is_seen_and_counted_and_pings_are_no_part_of_it() {
        let (l, mut ws) = (limits(), open_ws());
        let (first, middle, last) =
            (masked_frame(0x01, b"abc"), masked_frame(0x00, b"def"), masked_frame(0x80, b"g"));
        assert!(feed(&mut ws, &first, &l).is_empty());
        let n = ws.open_message().expect("a message has begun");
        feed(&mut ws, &masked_frame(0x89, b"p"), &l); // answered, and no part of the message
        feed(&mut ws, &middle, &l);
        feed(&mut ws, &last[..1], &l); // a cut header waits in the input, and counts too
        assert_eq!((ws.open_message(), ws.held_input_bytes()), (Some(n), first.len() + middle.len() + 1));
        let events = feed(&mut ws, &last[1..], &l);
        assert!(matches!(events.as_slice(), [WsEvent::Text(t)] if t.as_str() == "abcdefg"), "{events:?}");
        assert_eq!((ws.open_message(), ws.held_input_bytes()), (None, 0));
        // One frame whose bytes trickle in is a new message until its last byte.
        let whole = client_frame(1, b"hello");
        feed(&mut ws, &whole[..1], &l);
        assert!(ws.open_message().is_some_and(|m| m > n));
        feed(&mut ws, &whole[1..], &l);
        assert_eq!((ws.open_message(), ws.held_input_bytes()), (None, 0));
    }

    #[test]
    fn fail_closes_with_the_code_and_drops_what_was_held() {
        let l = limits();
        let mut ws = open_ws();
        feed(&mut ws, &masked_frame(0x01, &[b'a'; 100]), &l);
        assert!(ws.held_input_bytes() > 100);
        ws.fail(1008, "message not completed in time");
        assert!(ws.is_done() && ws.input().is_none());
        assert_eq!((ws.held_input_bytes(), ws.open_message()), (0, None));
        assert_eq!(close_code(&client_reads(ws.output())[0]), Some(1008));
    }

    #[test]
    fn wrong_version_is_426_naming_13() {
        let mut ws = Ws::new();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
        assert!(matches!(feed(&mut ws, req, &limits()).as_slice(), [WsEvent::Failed { code: 426, .. }]));
        let out = String::from_utf8(ws.output().to_vec()).unwrap();
        assert!(out.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{out}");
        assert!(out.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{out}");
    }

    /// An open connection whose 101 answer is already on the wire.
    fn open_ws() -> Ws {
        let mut ws = Ws::new();
        assert!(matches!(feed(&mut ws, UPGRADE, &limits()).as_slice(), [WsEvent::Opened(_)]));
        drain(&mut ws);
        ws
    }

    /// The server frame a text message of `len` bytes becomes.
    fn text_frame(len: usize) -> Vec<u8> {
        let mut f = vec![0x81];
        if len < 126 {
            f.push(len as u8);
        } else if len <= 0xffff {
            f.push(126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend(std::iter::repeat_n(b'a', len));
        f
    }

    fn close_frame(code: u16, reason: &str) -> Vec<u8> {
        [&[0x88, 2 + reason.len() as u8][..], &code.to_be_bytes(), reason.as_bytes()].concat()
    }

    /// Everything the client receives, parsed by a tungstenite client: the messages up to and
    /// including the close frame, which must be the very last byte.
    fn client_reads(wire: &[u8]) -> Vec<Message> {
        let mut input = InBuf::new(wire.len().max(1));
        input.extend(wire);
        let mut stream = MemStream::new(input, OutQueue::default(), Sizes::of(&limits()));
        stream.eof = true;
        let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
        let mut client = WebSocket::from_raw_socket(stream, Role::Client, Some(config));
        let mut got = Vec::new();
        loop {
            let message = client.read().expect("a well-formed frame sequence");
            let last = message.is_close();
            got.push(message);
            if last {
                break got;
            }
        }
    }

    fn close_code(message: &Message) -> Option<u16> {
        match message {
            Message::Close(Some(frame)) => Some(frame.code.into()),
            _ => None,
        }
    }

    #[test]
    fn abort_keeps_the_rest_of_a_started_frame_then_closes_1008() {
        let mut ws = open_ws();
        for len in [5, 300] {
            assert!(ws.send_text("a".repeat(len)));
        }
        let mut wire = ws.output()[..3].to_vec(); // the socket took 3 bytes of "\x81\x05aaaaa"
        ws.consume_output(3);
        assert!(ws.abort(1008, "slow reader"));
        assert!(ws.is_done() && ws.input().is_none() && !ws.send_text("late"));
        let expected = [&text_frame(5)[3..], &close_frame(1008, "slow reader")].concat();
        assert_eq!(ws.output(), expected.as_slice());
        wire.extend_from_slice(ws.output());
        let got = client_reads(&wire);
        assert_eq!(got[0], Message::Text("aaaaa".into()));
        assert_eq!((got.len(), close_code(&got[1])), (2, Some(1008)));
    }

    #[test]
    fn abort_drops_frames_not_started_and_survives_byte_at_a_time_writes() {
        // Nothing started: only the close frame is left.
        let mut ws = open_ws();
        for _ in 0..3 {
            ws.send_text("queued");
        }
        assert!(ws.abort(1008, "slow"));
        assert_eq!(ws.output(), close_frame(1008, "slow").as_slice());

        // Everything written: only the close frame.
        let mut ws = open_ws();
        ws.send_text("gone");
        drain(&mut ws);
        assert!(ws.abort(1008, ""));
        assert_eq!(ws.output(), close_frame(1008, "").as_slice());

        // A write that ends exactly on a frame boundary leaves nothing to keep.
        let mut ws = open_ws();
        ws.send_text("one");
        ws.send_text("two");
        ws.consume_output(text_frame(3).len());
        assert!(ws.abort(1008, "x"));
        assert_eq!(ws.output(), close_frame(1008, "x").as_slice());

        // The socket takes one byte at a time: wherever it stops, the client gets whole frames.
        let queue = [text_frame(1), text_frame(200), text_frame(3)].concat();
        for written in 0..=queue.len() {
            let mut ws = open_ws();
            for len in [1, 200, 3] {
                ws.send_text("a".repeat(len));
            }
            for _ in 0..written {
                ws.consume_output(1);
            }
            assert!(ws.abort(1008, "slow"));
            let wire = [&queue[..written], ws.output()].concat();
            let got = client_reads(&wire);
            assert_eq!(close_code(got.last().unwrap()), Some(1008), "after {written} bytes");
        }
    }

    #[test]
    fn abort_steps_over_16_and_64_bit_lengths() {
        for len in [126, 0xffff, 0x1_0000 + 7] {
            let mut ws = open_ws();
            for _ in 0..3 {
                assert!(ws.send_text("a".repeat(len)));
            }
            let frame = text_frame(len);
            let header = frame.len() - len;
            assert_eq!(ws.output_len(), 3 * frame.len());
            // Writes that stop in the second frame's header, then in its payload, then cross
            // into the third frame's header.
            let mut written = 0;
            for step in [frame.len() + header - 1, 6, frame.len() - header - 4] {
                ws.consume_output(step);
                written += step;
                assert_eq!(ws.output_len(), 3 * frame.len() - written);
            }
            assert_eq!(written, 2 * frame.len() + 1);
            assert!(ws.abort(1008, "slow"));
            let expected = [&frame[1..], &close_frame(1008, "slow")].concat();
            assert_eq!(ws.output(), expected.as_slice(), "len {len}");
            let wire = [&frame[..], &frame, &frame[..1], ws.output()].concat();
            let got = client_reads(&wire);
            assert_eq!(got.len(), 4, "len {len}");
            assert_eq!(got[2], Message::Text("a".repeat(len).into()));
            assert_eq!(close_code(&got[3]), Some(1008));
        }
    }

    #[test]
    fn abort_keeps_an_unsent_101_answer() {
        let mut ws = Ws::new();
        feed(&mut ws, UPGRADE, &limits());
        ws.send_text("dropped");
        let head_len = ws.output_len() - text_frame(7).len();
        ws.consume_output(10);
        assert!(ws.abort(1008, "slow"));
        let out = ws.output();
        assert_eq!(out.len(), head_len - 10 + close_frame(1008, "slow").len());
        assert!(out.ends_with(b"\r\n\r\n\x88\x06\x03\xf0slow"), "{out:?}");
    }

    #[test]
    fn abort_before_the_upgrade_or_after_our_close_sends_no_close() {
        let mut ws = Ws::new();
        assert!(!ws.abort(1008, "slow"));
        assert!(ws.is_done() && ws.output().is_empty() && ws.input().is_none());

        // An HTTP answer is raw bytes: never cut, nothing appended.
        let mut ws = Ws::new();
        feed(&mut ws, b"GET /healthz HTTP/1.1\r\n\r\n", &limits());
        ws.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        ws.consume_output(5);
        let pending = ws.output().to_vec();
        assert!(!ws.abort(1008, "slow"));
        assert_eq!(ws.output(), pending.as_slice());

        // Our 1001 close has started to leave: finish it, do not send a second one.
        let mut ws = open_ws();
        ws.send_text("aaaaa");
        ws.close(1001, "going away");
        ws.consume_output(text_frame(5).len() + 1);
        let rest = ws.output().to_vec();
        assert!(!ws.abort(1008, "slow"));
        assert_eq!(ws.output(), rest.as_slice());

        // Our close has not started: it is dropped with the rest and 1008 takes its place.
        let mut ws = open_ws();
        ws.send_text("aaaaa");
        ws.close(1001, "going away");
        ws.consume_output(2);
        assert!(ws.abort(1008, "slow"));
        assert_eq!(ws.output(), [&text_frame(5)[2..], &close_frame(1008, "slow")].concat().as_slice());
        // Aborting twice changes nothing that matters: still one close at the end.
        assert!(ws.abort(1008, "slow"));
        assert_eq!(
            close_code(client_reads(&[&text_frame(5)[..2], ws.output()].concat()).last().unwrap()),
            Some(1008)
        );
    }

    #[test]
    fn abort_cuts_a_long_reason_at_a_char_boundary() {
        let mut ws = open_ws();
        let reason = "é".repeat(100); // 200 bytes
        assert!(ws.abort(1008, &reason));
        let out = ws.output();
        assert_eq!((out[1], out.len()), (124, 126)); // 2-byte code + 61 two-byte chars
        let got = client_reads(out);
        assert_eq!(close_code(&got[0]), Some(1008));
    }
}
