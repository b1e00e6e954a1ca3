//! One client connection's whole life, sans-IO: the HTTP head, the WebSocket, keepalive, the
//! output limits, the close handshake and the lingering close. It owns no socket and reads no
//! clock; the shell hands it bytes, end-of-file, write progress and `now`, and asks it what to
//! do next.
//!
//! ```text
//!              upgrade                    close frame, protocol error, idle, 1008, shutdown
//! Handshaking ---------> Open ----------------------------------------------+
//!      |                                                                     v
//!      +-- HTTP answer, 408, bad request -----------------------------> Closing
//!                                                                           | output written
//!                                      peer's EOF, or the close deadline    v
//!            Closed <-------------------------------------------------- Lingering
//! ```
//! Any phase goes straight to `Closed` on a socket error, and `Closing` does when the peer's
//! EOF came first. `Lingering` means our write side is shut: what the peer still sends is read
//! and dropped until it hangs up, because closing a socket with unread input sends a reset,
//! which could destroy our last frame before the peer reads it.
//!
//! Inputs: [`Connection::handle_read`], [`Connection::handle_written`],
//! [`Connection::handle_error`], [`Connection::handle_timeout`], and what the application wants
//! ([`Connection::send_text`], [`Connection::respond`], [`Connection::close`],
//! [`Connection::shutdown`], [`Connection::drop_slow_reader`]). Outputs: events from
//! [`Connection::poll_event`], bytes from [`Connection::output`], the next deadline and the
//! interest. [`ConnEvent::Closed`] comes out exactly once, when the connection stops being
//! usable (not when the socket is finally closed), so the application hears of a close from
//! one place.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use tungstenite::{Bytes, Utf8Bytes};

use crate::buf::InBuf;
use crate::logging::Event;
use crate::ws::{Upgrade, Ws, WsEvent, WsLimits};

/// The limits and timeouts of a connection's life; built by the caller from its configuration.
#[derive(Clone, Debug)]
pub(crate) struct ConnLimits {
    /// The WebSocket's own limits.
    pub ws: WsLimits,
    /// Stop reading an open connection while its output is over this (echo mode: every
    /// message adds output, so TCP holds back a client that sends ahead of its reading).
    pub hold_reading_over: Option<usize>,
    /// A request head must arrive within this (then 408).
    pub handshake_timeout: Duration,
    /// Silence this long brings a ping; silence through the ping closes with 1001.
    pub idle_timeout: Duration,
    /// A message must be whole this long after its first byte came (then 1008); nothing
    /// outside the message (pings, pongs) extends it.
    pub message_timeout: Duration,
    /// How long the end of a connection may take once it started (close handshake, linger).
    pub close_timeout: Duration,
    /// A backlog over this is allowed for `out_soft_time`, then the client is dropped.
    pub out_soft_bytes: usize,
    /// See `out_soft_bytes`.
    pub out_soft_time: Duration,
    /// A backlog over this drops the client at once.
    pub out_hard_bytes: usize,
}

/// Why a connection ended; logged at `debug`, and counted for the operator's summary unless it
/// is an ordinary goodbye.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The peer closed (close frame, FIN after an HTTP answer).
    PeerClosed,
    /// The peer hung up without a close frame (FIN before a request or mid-session).
    Abrupt,
    /// A socket error.
    Io(ErrorKind),
    /// The peer broke HTTP or WebSocket rules (the code it was sent).
    Protocol(u16),
    /// A reader that does not read: over the hard output limit, over the soft one for too
    /// long, or the largest backlog when all clients together are over the total.
    OutputLimit,
    /// No request head within the handshake timeout.
    HandshakeTimeout,
    /// Silent through a keepalive ping.
    IdleTimeout,
    /// A message was not finished within the message timeout.
    MessageTimeout,
    /// The largest holder of unfinished input while all clients together held too much.
    InputTotal,
    /// SIGINT/SIGTERM.
    Shutdown,
    /// A plain HTTP request was answered.
    HttpDone,
}

impl CloseReason {
    /// The summary this end counts towards (`None`: an ordinary goodbye). `handshaking`: the
    /// connection never became a WebSocket.
    pub fn event(&self, handshaking: bool) -> Option<Event> {
        use ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        let gone = if handshaking { Event::LeftBeforeHandshake } else { Event::LeftWithoutClose };
        match self {
            CloseReason::PeerClosed | CloseReason::HttpDone | CloseReason::Shutdown => None,
            CloseReason::Abrupt => Some(gone),
            CloseReason::Io(BrokenPipe | ConnectionReset | ConnectionAborted) => Some(gone),
            CloseReason::Io(_) => Some(Event::SocketError),
            // Both are a client holding what it may not; counted with the broken rules (the
            // close frame, 1008, says which).
            CloseReason::Protocol(_) | CloseReason::MessageTimeout | CloseReason::InputTotal => {
                Some(Event::Protocol)
            }
            CloseReason::OutputLimit => Some(Event::SlowReader),
            CloseReason::HandshakeTimeout => Some(Event::HandshakeTimeout),
            CloseReason::IdleTimeout => Some(Event::IdleTimeout),
        }
    }
}

/// What a connection tells the application.
#[derive(Debug, PartialEq)]
pub(crate) enum ConnEvent {
    /// The upgrade succeeded (the 101 answer is queued).
    Opened(Upgrade),
    /// A plain HTTP request: answer it with [`Connection::respond`].
    Http { method: String, path: String },
    /// A complete text message.
    Text(Utf8Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A complete message read where it lies: [`Connection::here`] until the next poll (only
    /// from [`Connection::poll_event_here`]). `text`: a text message, its UTF-8 checked.
    Here { text: bool },
    /// The connection is over for the application: nothing more comes from it and nothing
    /// more can be sent. Exactly once per connection. `handshaking`: it never opened.
    Closed { reason: CloseReason, handshaking: bool },
}

/// Where the shell puts what it reads.
#[derive(Debug)]
pub(crate) enum ReadInto<'a> {
    /// Append to this buffer, then call `handle_read`.
    Buffer(&'a mut InBuf),
    /// Read and drop (a closing connection still drains its socket), then `handle_read`.
    Discard,
    /// Do not read: nothing more is wanted (a dropped slow reader is held back by TCP, not
    /// fed by us; a closed connection is about to be reaped).
    Nothing,
}

/// What the shell must do after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterWrite {
    /// Nothing special.
    Continue,
    /// Everything is out and the connection is ending: shut the socket's write side.
    ShutdownWrite,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the request head.
    Handshaking { deadline: Instant },
    /// A WebSocket: keepalive (`last_seen` is the last traffic, or the ping once `pinged`),
    /// and what else it is timed for, if anything (see [`Strain`]).
    Open { last_seen: Instant, pinged: bool, strain: Option<Box<Strain>> },
    /// Ending since `since`: writing what is queued, then the write side is shut. `reading`:
    /// the socket is still drained meanwhile (not for a dropped slow reader).
    Closing { since: Instant, reading: bool },
    /// Write side shut; reading and dropping until the peer's EOF.
    Lingering { since: Instant },
    /// Over; the shell reaps it.
    Closed,
}

/// What an open connection is timed for besides its silence: output over the soft limit since
/// when, and the unfinished message (`Ws::open_message`'s number) with when it was first seen.
/// Both are rare for a connection at rest, so they are boxed, and the box is there only while
/// one of them is (an idle connection keeps a few bytes less in its slab slot).
#[derive(Clone, Copy, Debug, Default)]
struct Strain {
    over_soft_since: Option<Instant>,
    message: Option<(u32, Instant)>,
}

impl Strain {
    /// Changes an open connection's strain, keeping a box only while something is timed.
    fn update(strain: &mut Option<Box<Strain>>, change: impl FnOnce(&mut Strain)) {
        let mut now = strain.as_deref().copied().unwrap_or_default();
        change(&mut now);
        match (strain.as_deref_mut(), now.over_soft_since.is_some() || now.message.is_some()) {
            (Some(kept), true) => *kept = now,
            (None, true) => *strain = Some(Box::new(now)),
            (_, false) => *strain = None,
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Connection {
    ws: Ws,
    phase: Phase,
    /// Set once, when the connection stops being usable.
    reason: Option<CloseReason>,
    /// The reason was handed out as `ConnEvent::Closed`.
    told: bool,
    /// It never finished its handshake.
    never_opened: bool,
    /// The peer sent FIN: once our output is out, there is nothing to wait for.
    peer_eof: bool,
}

impl Connection {
    /// A connection just accepted: its request head is due by `now + handshake_timeout`.
    pub fn new(now: Instant, limits: &ConnLimits) -> Self {
        Connection {
            ws: Ws::new(),
            phase: Phase::Handshaking { deadline: now + limits.handshake_timeout },
            reason: None,
            told: false,
            never_opened: true,
            peer_eof: false,
        }
    }

    /// Where to put the bytes the socket has.
    pub fn read_into(&mut self, limits: &ConnLimits) -> ReadInto<'_> {
        if self.holds_reading(limits) {
            return ReadInto::Nothing;
        }
        match self.phase {
            Phase::Handshaking { .. } | Phase::Open { .. } => match self.ws.input() {
                Some(input) => ReadInto::Buffer(input),
                None => ReadInto::Discard,
            },
            Phase::Closing { reading: true, .. } | Phase::Lingering { .. } => ReadInto::Discard,
            Phase::Closing { reading: false, .. } | Phase::Closed => ReadInto::Nothing,
        }
    }

    /// The shell read `bytes` (into the buffer or dropped) and, with `eof`, the peer's FIN.
    /// Events that follow come out of `poll_event`.
    pub fn handle_read(&mut self, bytes: usize, eof: bool, now: Instant) {
        self.peer_eof |= eof;
        match &mut self.phase {
            Phase::Open { last_seen, pinged, .. } => {
                if bytes > 0 {
                    // Any traffic (the pong included) counts as life.
                    *last_seen = now;
                    *pinged = false;
                }
                if eof {
                    // The Ws reads to the end of its input, then reports the missing close.
                    self.ws.handle_eof();
                }
            }
            Phase::Closing { .. } if eof && self.ws.output_len() == 0 => self.phase = Phase::Closed,
            Phase::Lingering { .. } if eof => self.phase = Phase::Closed,
            _ => {}
        }
    }

    /// The socket failed: the connection is over, nothing more is written.
    pub fn handle_error(&mut self, kind: ErrorKind) {
        self.reason.get_or_insert(CloseReason::Io(kind));
        self.phase = Phase::Closed;
    }

    /// The next event, or `None` when the input so far has none (the tests' way: every message
    /// owns its payload; the shell uses [`Connection::poll_event_here`]).
    #[cfg(test)]
    pub fn poll_event(&mut self, limits: &WsLimits, now: Instant) -> Option<ConnEvent> {
        self.poll(limits, now, false)
    }

    /// [`Connection::poll_event`], but a whole message the WebSocket can hand on where it lies
    /// comes as [`ConnEvent::Here`] (no copy; see [`Ws::poll_event_here`]).
    pub fn poll_event_here(&mut self, limits: &WsLimits, now: Instant) -> Option<ConnEvent> {
        self.poll(limits, now, true)
    }

    /// The payload of the last [`ConnEvent::Here`].
    pub fn here(&self) -> &[u8] {
        self.ws.here()
    }

    /// Sends the last [`ConnEvent::Here`] back as it came (echo mode); false if it cannot.
    pub fn echo_here(&mut self) -> bool {
        matches!(self.phase, Phase::Open { .. }) && self.ws.echo_here()
    }

    fn poll(&mut self, limits: &WsLimits, now: Instant, in_place: bool) -> Option<ConnEvent> {
        loop {
            if let Some(reason) = &self.reason
                && !self.told
            {
                self.told = true;
                return Some(ConnEvent::Closed { reason: reason.clone(), handshaking: self.never_opened });
            }
            if !matches!(self.phase, Phase::Handshaking { .. } | Phase::Open { .. }) {
                return None;
            }
            let polled = if in_place { self.ws.poll_event_here(limits) } else { self.ws.poll_event(limits) };
            self.note_message(now);
            let Some(event) = polled else {
                if matches!(self.phase, Phase::Open { .. }) && self.ws.is_done() {
                    // The close handshake finished inside the Ws (our close was answered).
                    self.finish(CloseReason::PeerClosed, now, true);
                    continue;
                }
                if matches!(self.phase, Phase::Handshaking { .. }) && self.peer_eof && !self.ws.is_done() {
                    // FIN before a whole request: nothing more can come. (After a whole plain
                    // HTTP request the Ws is done, and the answer is on its way.)
                    self.finish(CloseReason::Abrupt, now, true);
                    continue;
                }
                return None;
            };
            return Some(match event {
                WsEvent::Opened(upgrade) => {
                    self.never_opened = false;
                    self.phase = Phase::Open { last_seen: now, pinged: false, strain: None };
                    self.note_message(now); // frames glued to the request
                    ConnEvent::Opened(upgrade)
                }
                WsEvent::Http { method, path } => ConnEvent::Http { method, path },
                WsEvent::Text(text) => ConnEvent::Text(text),
                WsEvent::Binary(data) => ConnEvent::Binary(data),
                WsEvent::Here { text } => ConnEvent::Here { text },
                WsEvent::Closed => {
                    self.finish(CloseReason::PeerClosed, now, true);
                    continue;
                }
                WsEvent::Failed { code, .. } => {
                    // 1006 is never sent: it is how the Ws says the peer left without a close.
                    let reason = if code == 1006 { CloseReason::Abrupt } else { CloseReason::Protocol(code) };
                    self.finish(reason, now, true);
                    continue;
                }
            });
        }
    }

    /// Times the client's unfinished message from when it was first seen (this pass): a new
    /// message number restarts the clock, none stops it. Only bytes of the message itself move
    /// it on, so pongs or pings sent meanwhile cannot keep a half message alive. A match and
    /// a compare: it runs after every poll of the WebSocket.
    fn note_message(&mut self, now: Instant) {
        if let Phase::Open { strain, .. } = &mut self.phase {
            let timed = strain.as_ref().and_then(|s| s.message);
            let message = match (self.ws.open_message(), timed) {
                (None, None) => return,
                (None, Some(_)) => None,
                (Some(n), Some((m, _))) if n == m => return,
                (Some(n), _) => Some((n, now)),
            };
            Strain::update(strain, |s| s.message = message);
        }
    }

    /// Bytes of client input held that have not become messages (see `Ws::held_input_bytes`);
    /// 0 once it no longer reads.
    pub fn held_input_bytes(&self) -> usize {
        match self.phase {
            Phase::Handshaking { .. } | Phase::Open { .. } => self.ws.held_input_bytes(),
            _ => 0,
        }
    }

    /// All clients together hold too much unfinished input, and this one the most: close 1008,
    /// and its input is dropped at once (what it had queued for it still goes out first).
    pub fn drop_for_input_total(&mut self, now: Instant) {
        self.end(1008, "too much unfinished input on the server", CloseReason::InputTotal, now);
    }

    /// Ends the connection on our side with a close frame (when open) and stops taking its
    /// input, freeing what the WebSocket held; what is queued still leaves first.
    fn end(&mut self, code: u16, text: &str, reason: CloseReason, now: Instant) {
        if self.reason.is_some() {
            return;
        }
        self.ws.fail(code, text);
        self.finish(reason, now, true);
    }

    /// Queues a text message; false when the connection no longer sends.
    pub fn send_text(&mut self, text: impl AsRef<str>) -> bool {
        matches!(self.phase, Phase::Open { .. }) && self.ws.send_text(text)
    }

    /// Queues a binary message; false when the connection no longer sends.
    pub fn send_binary(&mut self, data: &[u8]) -> bool {
        matches!(self.phase, Phase::Open { .. }) && self.ws.send_binary(data)
    }

    /// Open, with more output waiting than `hold_reading_over`: not read until it drains.
    pub fn holds_reading(&self, limits: &ConnLimits) -> bool {
        matches!(self.phase, Phase::Open { .. })
            && limits.hold_reading_over.is_some_and(|n| self.ws.output_len() > n)
    }

    /// Answers a plain HTTP request with a response `http` wrote whole (`Response::encode`);
    /// the connection ends once the answer is written.
    pub fn respond_raw(&mut self, response: &[u8], now: Instant) {
        self.ws.respond(response);
        self.finish(CloseReason::HttpDone, now, true);
    }

    /// The shell refuses an upgrade that just opened (429 over `--max-connections-per-ip`): the
    /// 101 is taken back, `status` answers instead, and the connection ends as an HTTP answer.
    pub fn turn_away(&mut self, status: u16, reason: &str, why: &str, now: Instant) {
        self.ws.turn_away(status, reason, why);
        self.never_opened = true;
        self.finish(CloseReason::HttpDone, now, true);
    }

    /// Starts the close handshake with `code` for `reason` (idle timeout, shutdown).
    pub fn close(&mut self, code: u16, text: &str, reason: CloseReason, now: Instant) {
        if matches!(self.phase, Phase::Open { .. }) {
            self.ws.close(code, text);
            self.finish(reason, now, true);
        }
    }

    /// SIGINT/SIGTERM: an open WebSocket gets close 1001; anything else just ends.
    pub fn shutdown(&mut self, now: Instant) {
        match self.phase {
            Phase::Open { .. } => self.close(1001, "server shutting down", CloseReason::Shutdown, now),
            Phase::Handshaking { .. } => {
                self.reason.get_or_insert(CloseReason::Shutdown);
                self.phase = Phase::Closed;
            }
            _ => {}
        }
    }

    /// Gives up on a client that does not read: frames not yet started are dropped and close
    /// 1008 follows the one on the wire. Nothing more is read from it.
    pub fn drop_slow_reader(&mut self, now: Instant) {
        if self.reason.is_some() {
            return;
        }
        if self.ws.abort(1008, "not reading fast enough") {
            self.finish(CloseReason::OutputLimit, now, false);
        } else {
            self.reason = Some(CloseReason::OutputLimit);
            self.phase = Phase::Closed;
        }
    }

    /// Time passed: deadlines that are due act (408, ping, 1001 for idleness, 1008 for a
    /// reader over the soft limit too long, the end of a close that took too long).
    pub fn handle_timeout(&mut self, limits: &ConnLimits, now: Instant) {
        match self.phase {
            Phase::Handshaking { deadline } if now >= deadline => {
                let mut answer = Vec::new();
                let body = b"request not received in time\n";
                crate::ws::write_http(&mut answer, 408, "Request Timeout", "text/plain", body);
                self.ws.respond(&answer);
                self.finish(CloseReason::HandshakeTimeout, now, true);
            }
            Phase::Open { last_seen, pinged, ref strain } => {
                let Strain { over_soft_since, message } = strain.as_deref().copied().unwrap_or_default();
                if over_soft_since.is_some_and(|t| now >= t + limits.out_soft_time) {
                    return self.drop_slow_reader(now);
                }
                if message.is_some_and(|(_, since)| now >= since + limits.message_timeout) {
                    let text = "message not completed in time";
                    return self.end(1008, text, CloseReason::MessageTimeout, now);
                }
                if now < last_seen + limits.idle_timeout {
                    return;
                }
                if pinged {
                    return self.close(1001, "idle timeout", CloseReason::IdleTimeout, now);
                }
                // Keepalive: any answer (the pong) counts as traffic. The silence through the
                // ping is timed from the ping.
                self.ws.send_ping();
                if let Phase::Open { last_seen, pinged, .. } = &mut self.phase {
                    (*last_seen, *pinged) = (now, true);
                }
            }
            Phase::Closing { since, .. } | Phase::Lingering { since }
                if now >= since + limits.close_timeout =>
            {
                self.phase = Phase::Closed;
            }
            _ => {}
        }
    }

    /// When `handle_timeout` next has something to do.
    pub fn next_deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        match self.phase {
            Phase::Handshaking { deadline } => Some(deadline),
            Phase::Closing { since, .. } | Phase::Lingering { since } => Some(since + limits.close_timeout),
            Phase::Open { last_seen, ref strain, .. } => {
                let Strain { over_soft_since, message } = strain.as_deref().copied().unwrap_or_default();
                let mut at = last_seen + limits.idle_timeout;
                if let Some(t) = over_soft_since {
                    at = at.min(t + limits.out_soft_time);
                }
                if let Some((_, since)) = message {
                    at = at.min(since + limits.message_timeout);
                }
                Some(at)
            }
            Phase::Closed => None,
        }
    }

    /// Bytes waiting for the socket.
    pub fn output(&self) -> &[u8] {
        self.ws.output()
    }

    /// How many bytes wait for the socket.
    pub fn output_len(&self) -> usize {
        self.ws.output_len()
    }

    /// The shell wrote `written` bytes of `output()` (0 when the socket took none, or after
    /// the application queued more): the output limits are checked, and an ending connection
    /// whose output is all out asks for its write side to be shut.
    pub fn handle_written(&mut self, written: usize, limits: &ConnLimits, now: Instant) -> AfterWrite {
        self.ws.consume_output(written);
        let pending = self.ws.output_len();
        if let Phase::Open { strain, .. } = &mut self.phase {
            let over_soft = strain.as_ref().is_some_and(|s| s.over_soft_since.is_some());
            if pending > limits.out_hard_bytes {
                self.drop_slow_reader(now);
            } else if pending > limits.out_soft_bytes {
                // Allowed for a while: a reader catching up with a burst.
                if !over_soft {
                    Strain::update(strain, |s| s.over_soft_since = Some(now));
                }
            } else if over_soft {
                Strain::update(strain, |s| s.over_soft_since = None);
            }
        }
        if self.ws.output_len() > 0 {
            return AfterWrite::Continue;
        }
        self.ws.release_idle_buffers();
        match self.phase {
            Phase::Closing { .. } if self.peer_eof => {
                self.phase = Phase::Closed;
                AfterWrite::Continue
            }
            Phase::Closing { since, .. } => {
                self.phase = Phase::Lingering { since };
                AfterWrite::ShutdownWrite
            }
            _ => AfterWrite::Continue,
        }
    }

    /// The socket should be watched for writability (a write left bytes behind).
    pub fn wants_write(&self) -> bool {
        !matches!(self.phase, Phase::Closed) && self.ws.output_len() > 0
    }

    /// A `Closed` event waits to be handed out (after a drop or a socket error outside
    /// `poll_event`): the shell polls events only then, not after every write.
    pub fn closed_pending(&self) -> bool {
        self.reason.is_some() && !self.told
    }

    /// Over: the shell deregisters and drops the socket.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Still open for messages both ways.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    /// Why it ended, once it has.
    #[cfg(test)]
    pub fn reason(&self) -> Option<&CloseReason> {
        self.reason.as_ref()
    }

    /// Stops being usable: the reason is kept (the first one wins) for the `Closed` event, and
    /// whatever is queued is written before the write side is shut, within the close timeout.
    /// `reading`: whether the socket is still drained meanwhile.
    fn finish(&mut self, reason: CloseReason, now: Instant, reading: bool) {
        if self.reason.is_some() {
            return;
        }
        self.reason = Some(reason);
        self.phase = if self.peer_eof && self.ws.output_len() == 0 {
            Phase::Closed // the peer is gone and we owe it nothing
        } else {
            Phase::Closing { since: now, reading }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn limits() -> ConnLimits {
        ConnLimits {
            ws: WsLimits {
                max_message_bytes: 1 << 16,
                max_frame_bytes: 1 << 16,
                read_buffer_bytes: 512,
                in_limit_bytes: (1 << 16) + 14,
                allowed_origins: Vec::new(),
            },
            hold_reading_over: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            message_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(2),
            out_soft_bytes: 1000,
            out_soft_time: Duration::from_secs(10),
            out_hard_bytes: 5000,
        }
    }

    /// A masked client frame (`opcode` 1 text, 8 close) with a short payload.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Feeds `bytes` (and maybe EOF) as the shell would: into the buffer or dropped.
    fn feed(c: &mut Connection, bytes: &[u8], eof: bool, now: Instant) {
        match c.read_into(&limits()) {
            ReadInto::Buffer(input) => input.extend(bytes),
            ReadInto::Discard => {}
            ReadInto::Nothing => panic!("fed a connection that reads nothing"),
        }
        c.handle_read(bytes.len(), eof, now);
    }

    fn events(c: &mut Connection, now: Instant) -> Vec<ConnEvent> {
        let l = limits();
        std::iter::from_fn(|| c.poll_event(&l.ws, now)).collect()
    }

    /// Writes everything out, as a socket that takes it all would.
    fn write_all(c: &mut Connection, now: Instant) -> AfterWrite {
        let n = c.output_len();
        c.handle_written(n, &limits(), now)
    }

    fn closed(reason: CloseReason, handshaking: bool) -> ConnEvent {
        ConnEvent::Closed { reason, handshaking }
    }

    fn open(t0: Instant) -> Connection {
        let mut c = Connection::new(t0, &limits());
        feed(&mut c, UPGRADE, false, t0);
        assert!(matches!(events(&mut c, t0).as_slice(), [ConnEvent::Opened(_)]));
        assert!(c.output().starts_with(b"HTTP/1.1 101"));
        write_all(&mut c, t0);
        c
    }

    #[test]
    fn a_session_ends_with_the_close_handshake_and_one_closed_event() {
        let t0 = Instant::now();
        let mut c = open(t0);
        feed(&mut c, &frame(1, b"hello"), false, t0);
        assert_eq!(events(&mut c, t0), vec![ConnEvent::Text("hello".into())]);
        assert!(c.send_text("hi"));
        assert_eq!(write_all(&mut c, t0), AfterWrite::Continue);
        feed(&mut c, &frame(8, &[0x03, 0xe8]), false, t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::PeerClosed, false)]);
        assert_eq!(events(&mut c, t0), vec![], "Closed comes out once");
        assert!(!c.send_text("too late"));
        assert_eq!(c.output(), [0x88, 0x02, 0x03, 0xe8], "our close answers theirs");
        assert_eq!(write_all(&mut c, t0), AfterWrite::ShutdownWrite);
        assert!(matches!(c.read_into(&limits()), ReadInto::Discard), "lingering drains the socket");
        feed(&mut c, b"", true, t0);
        assert!(c.is_closed());
        assert_eq!(c.next_deadline(&limits()), None);
    }

    #[test]
    fn no_request_in_time_gets_408() {
        let t0 = Instant::now();
        let mut c = Connection::new(t0, &limits());
        feed(&mut c, b"GET / HT", false, t0);
        assert_eq!(c.next_deadline(&limits()), Some(t0 + Duration::from_secs(10)));
        c.handle_timeout(&limits(), t0 + Duration::from_millis(9999));
        assert_eq!(events(&mut c, t0), vec![]);
        c.handle_timeout(&limits(), t0 + Duration::from_secs(10));
        assert!(c.output().starts_with(b"HTTP/1.1 408"));
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::HandshakeTimeout, true)]);
    }

    #[test]
    fn silence_brings_a_ping_and_silence_through_it_closes_with_1001() {
        let t0 = Instant::now();
        let l = limits();
        let mut c = open(t0);
        let t1 = t0 + Duration::from_secs(30);
        feed(&mut c, &frame(1, b"x"), false, t1);
        events(&mut c, t1);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.idle_timeout), "traffic moves the deadline");
        c.handle_timeout(&l, t1 + l.idle_timeout);
        assert_eq!(c.output()[0], 0x89, "a ping");
        write_all(&mut c, t1 + l.idle_timeout);
        c.handle_timeout(&l, t1 + 2 * l.idle_timeout - Duration::from_millis(1));
        assert!(c.is_open());
        c.handle_timeout(&l, t1 + 2 * l.idle_timeout);
        assert_eq!(&c.output()[..4], [0x88, 0x0e, 0x03, 0xe9], "close 1001");
        assert_eq!(events(&mut c, t1), vec![closed(CloseReason::IdleTimeout, false)]);
    }

    #[test]
    fn a_pong_counts_as_life() {
        let t0 = Instant::now();
        let l = limits();
        let mut c = open(t0);
        c.handle_timeout(&l, t0 + l.idle_timeout);
        write_all(&mut c, t0 + l.idle_timeout);
        feed(&mut c, &frame(10, b""), false, t0 + l.idle_timeout + Duration::from_secs(1));
        events(&mut c, t0);
        c.handle_timeout(&l, t0 + 2 * l.idle_timeout);
        assert!(c.is_open());
    }

    #[test]
    fn a_reader_over_the_hard_limit_is_dropped_at_once_and_not_read_again() {
        let t0 = Instant::now();
        let mut c = open(t0);
        for _ in 0..60 {
            c.send_text("x".repeat(100));
        }
        assert_eq!(c.handle_written(0, &limits(), t0), AfterWrite::Continue);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::OutputLimit, false)]);
        assert!(matches!(c.read_into(&limits()), ReadInto::Nothing));
        assert!(c.output().ends_with(b"not reading fast enough"), "close 1008 after what had started");
    }

    #[test]
    fn a_reader_over_the_soft_limit_has_a_grace_period() {
        let t0 = Instant::now();
        let l = limits();
        let mut c = open(t0);
        for _ in 0..20 {
            c.send_text("x".repeat(100));
        }
        c.handle_written(0, &l, t0);
        assert_eq!(c.next_deadline(&l), Some(t0 + l.out_soft_time), "the grace ends before the idle check");
        // It catches up in time: the spell is over.
        c.handle_written(1500, &l, t0 + Duration::from_secs(5));
        c.handle_timeout(&l, t0 + l.out_soft_time);
        assert!(c.is_open());
        // Over again, and for too long this time.
        for _ in 0..20 {
            c.send_text("x".repeat(100));
        }
        let t1 = t0 + Duration::from_secs(20);
        c.handle_written(0, &l, t1);
        c.handle_timeout(&l, t1 + l.out_soft_time);
        assert_eq!(events(&mut c, t1), vec![closed(CloseReason::OutputLimit, false)]);
    }

    #[test]
    fn a_peer_that_vanishes_is_closed_at_once() {
        let t0 = Instant::now();
        let mut c = open(t0);
        feed(&mut c, b"", true, t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::Abrupt, false)]);
        assert!(c.is_closed());

        let mut c = Connection::new(t0, &limits());
        feed(&mut c, b"GET", true, t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::Abrupt, true)]);
        assert!(c.is_closed());
    }

    #[test]
    fn a_request_with_its_fin_is_still_answered() {
        let t0 = Instant::now();
        let mut c = Connection::new(t0, &limits());
        feed(&mut c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", true, t0);
        let got = events(&mut c, t0);
        assert_eq!(got, vec![ConnEvent::Http { method: "GET".into(), path: "/healthz".into() }]);
        c.respond_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::HttpDone, true)]);
        assert!(c.output().starts_with(b"HTTP/1.1 200 OK"));
        assert_eq!(write_all(&mut c, t0), AfterWrite::Continue, "the peer is gone: no need to shut");
        assert!(c.is_closed());
    }

    #[test]
    fn an_end_that_takes_too_long_is_cut_at_the_close_timeout() {
        let t0 = Instant::now();
        let l = limits();
        let mut c = open(t0);
        c.shutdown(t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::Shutdown, false)]);
        assert_eq!(write_all(&mut c, t0), AfterWrite::ShutdownWrite);
        c.drop_slow_reader(t0);
        c.close(1000, "again", CloseReason::IdleTimeout, t0);
        assert_eq!(events(&mut c, t0), vec![], "still one Closed, with the first reason");
        assert_eq!(c.reason(), Some(&CloseReason::Shutdown));
        c.handle_timeout(&l, t0 + l.close_timeout - Duration::from_millis(1));
        assert!(!c.is_closed());
        c.handle_timeout(&l, t0 + l.close_timeout);
        assert!(c.is_closed());
    }

    #[test]
    fn a_socket_error_ends_everything() {
        let t0 = Instant::now();
        let mut c = open(t0);
        c.send_text("x");
        c.handle_error(ErrorKind::ConnectionReset);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::Io(ErrorKind::ConnectionReset), false)]);
        assert!(c.is_closed() && !c.wants_write());
    }

    #[test]
    fn the_next_deadline_moves_later_with_traffic_and_earlier_only_with_the_phase() {
        let (t0, l) = (Instant::now(), limits());
        let mut c = open(t0);
        assert_eq!(c.next_deadline(&l), Some(t0 + l.idle_timeout), "the upgrade: the idle deadline");
        let t1 = t0 + Duration::from_secs(1);
        feed(&mut c, &frame(1, b"x"), false, t1);
        events(&mut c, t1);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.idle_timeout), "traffic only moves it later");
        assert!(c.send_text("y".repeat(l.out_soft_bytes + 1)));
        c.handle_written(0, &l, t1);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.out_soft_time), "a soft-limit spell may come sooner");
        c.close(1001, "bye", CloseReason::Shutdown, t1);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.close_timeout), "the close timeout may come sooner");
        c.handle_timeout(&l, t1 + l.close_timeout);
        assert_eq!(c.next_deadline(&l), None, "closed: nothing is due");
    }

    #[test]
    fn an_unfinished_message_is_closed_1008_at_the_message_timeout_whatever_pongs_come() {
        let (t0, l) = (Instant::now(), limits());
        let mut c = open(t0);
        feed(&mut c, &frame(1, b"x")[..], false, t0);
        events(&mut c, t0);
        assert_eq!(c.next_deadline(&l), Some(t0 + l.idle_timeout), "a whole message starts no clock");
        let t1 = t0 + Duration::from_secs(1);
        let mut first = frame(1, b"part");
        first[0] = 0x01; // text without FIN: a message that goes on in continuation frames
        feed(&mut c, &first, false, t1);
        assert_eq!(events(&mut c, t1), vec![]);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.message_timeout), "the message's clock comes first");
        assert!(c.held_input_bytes() >= first.len());
        // Pongs and more pieces of the same message do not move it.
        for s in 2..30 {
            let t = t0 + Duration::from_secs(s);
            feed(&mut c, &frame(10, b""), false, t);
            let mut more = frame(0, b"more");
            more[0] = 0x00;
            feed(&mut c, &more, false, t);
            assert_eq!(events(&mut c, t), vec![]);
            c.handle_timeout(&l, t);
            assert!(c.is_open());
        }
        assert_eq!(c.next_deadline(&l), Some(t1 + l.message_timeout));
        c.handle_timeout(&l, t1 + l.message_timeout);
        assert_eq!(events(&mut c, t1), vec![closed(CloseReason::MessageTimeout, false)]);
        assert_eq!(c.held_input_bytes(), 0, "what it held is dropped at once");
        let out = c.output();
        assert_eq!(&out[2..4], &1008u16.to_be_bytes());
        assert!(out.ends_with(b"message not completed in time"));
    }

    #[test]
    fn a_message_finished_in_time_stops_its_clock_and_the_next_one_starts_its_own() {
        let (t0, l) = (Instant::now(), limits());
        let mut c = open(t0);
        let mut first = frame(1, b"a");
        first[0] = 0x01;
        feed(&mut c, &first, false, t0);
        events(&mut c, t0);
        let t1 = t0 + Duration::from_secs(20);
        feed(&mut c, &frame(0, b"b"), false, t1); // continuation with FIN
        assert_eq!(events(&mut c, t1), vec![ConnEvent::Text("ab".into())]);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.idle_timeout));
        feed(&mut c, &first, false, t1);
        events(&mut c, t1);
        assert_eq!(c.next_deadline(&l), Some(t1 + l.message_timeout));
        c.handle_timeout(&l, t0 + l.message_timeout);
        assert!(c.is_open(), "timed from its own start, not the first message's");
    }

    #[test]
    fn the_largest_holder_is_dropped_with_1008_and_holds_nothing_after() {
        let t0 = Instant::now();
        let mut c = open(t0);
        let mut first = frame(1, &[b'a'; 100]);
        first[0] = 0x02; // binary without FIN
        feed(&mut c, &first, false, t0);
        events(&mut c, t0);
        assert!(c.held_input_bytes() >= 100);
        c.drop_for_input_total(t0);
        assert_eq!(events(&mut c, t0), vec![closed(CloseReason::InputTotal, false)]);
        assert_eq!(c.held_input_bytes(), 0);
        assert!(matches!(c.read_into(&limits()), ReadInto::Discard), "its socket is drained, not read");
    }
}
