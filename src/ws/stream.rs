//! The in-memory stream under tungstenite (`MemStream`): the client's unparsed bytes and the
//! output queue, the frame boundaries tungstenite is handed, the message in progress, and the
//! short way for a whole data frame that needs no tungstenite at all.

use std::io::{self, Read, Write};

use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Bytes, Utf8Bytes};

use super::message::MessageTrack;
use super::output::{FIN_BINARY, FIN_TEXT, OutQueue, frame_len};
use super::{Idle, Ws, WsEvent, WsLimits, WsState};
use crate::buf::InBuf;

/// XORs a client frame's payload with its masking key (RFC 6455 5.3), four bytes at a time;
/// applied twice it gives the bytes back.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let key = u32::from_ne_bytes(mask);
    let mut words = payload.chunks_exact_mut(4);
    for word in &mut words {
        let masked = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]) ^ key;
        word.copy_from_slice(&masked.to_ne_bytes());
    }
    for (byte, k) in words.into_remainder().iter_mut().zip(mask) {
        *byte ^= k;
    }
}

/// Longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub(super) const MAX_FRAME_HEADER: usize = 14;
/// tungstenite grows its read buffer to the largest frame it reads and keeps that capacity; a
/// frame longer than this makes the connection shed it once the message is handled (see
/// `Ws::shed_read_buffer`).
pub(super) const SHED_FRAME_BYTES: usize = 4096;

/// The byte pipe tungstenite reads from and writes to: `read` pops `input` or says WouldBlock,
/// `write` appends to `output` and never fails.
///
/// A read never crosses the end of a large frame, so when tungstenite hands over a message
/// that had one it holds no byte of the next frame, and its state can be dropped and made
/// afresh. Small frames are handed over together.
#[derive(Debug)]
pub(crate) struct MemStream {
    pub(super) input: InBuf,
    pub(super) output: OutQueue,
    /// The peer sent FIN: once `input` is drained, reads return 0 (end of stream).
    pub(super) eof: bool,
    /// Bytes of the current frame not yet handed to tungstenite; 0 at a frame boundary.
    pub(super) frame_left: usize,
    /// A frame over [`SHED_FRAME_BYTES`] was read since tungstenite's state was last made.
    pub(super) large_frame: bool,
    /// Where the client's current message stands, read off the frame headers as they pass.
    pub(super) message: MessageTrack,
    /// The sizes tungstenite's state is made with, each time it is made.
    pub(super) sizes: Sizes,
    /// The last read found nothing to hand over (see `between_messages`).
    pub(super) starved: bool,
    /// The count of messages begun when the stream was last made or its output last written
    /// out (`Ws::release_idle_buffers`): a stream that began none since may go idle, while a
    /// busy one is kept rather than dropped and made again every pass.
    pub(super) settled: u32,
    /// A frame handed on in place (`take_here`): its payload is read where it lies, and the
    /// frame is consumed before anything else touches `input` (`settle_here`).
    here: Option<Here>,
}

/// Where the payload of a frame handed on in place lies: at `start` of `input` (its header's
/// length), up to `end` (the whole frame's). A frame on the short way is at most 65,543 bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Here {
    pub(super) start: u8,
    pub(super) end: u32,
    pub(super) text: bool,
}

/// What tungstenite's state is made with: kept beside the stream, so that the state can be
/// dropped while the connection is quiet and made again when bytes arrive. Kept as `u32` (every
/// idle connection holds one): a limit past 4 GiB counts as 4 GiB.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    read_buffer: u32,
    max_message: u32,
    max_frame: u32,
    /// The input buffer's limit (`WsLimits::in_limit_bytes`), for a stream made again.
    input: u32,
}

impl Sizes {
    /// All zero: a placeholder, never used to make a stream.
    pub(super) const NONE: Sizes = Sizes { read_buffer: 0, max_message: 0, max_frame: 0, input: 0 };

    pub(super) fn of(limits: &WsLimits) -> Self {
        let small = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Sizes {
            read_buffer: small(limits.read_buffer_bytes),
            max_message: small(limits.max_message_bytes),
            max_frame: small(limits.max_frame_bytes),
            input: small(limits.in_limit_bytes),
        }
    }

    pub(super) fn max_message(self) -> usize {
        self.max_message as usize
    }

    pub(super) fn max_frame(self) -> usize {
        self.max_frame as usize
    }

    pub(super) fn config(self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer as usize)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_message()))
            .max_frame_size(Some(self.max_frame()))
    }
}

impl MemStream {
    pub(super) fn new(input: InBuf, output: OutQueue, sizes: Sizes) -> Self {
        MemStream {
            input,
            output,
            eof: false,
            frame_left: 0,
            large_frame: false,
            message: MessageTrack::default(),
            sizes,
            starved: false,
            settled: 0,
            here: None,
        }
    }

    /// An empty stream of an open WebSocket, made again for a connection that was idle:
    /// `started` messages begun so far (see [`MessageTrack`]).
    pub(super) fn again(sizes: Sizes, started: u32) -> Self {
        // Every stream is made after the upgrade, so what it queues is frames.
        let output = OutQueue { framed: true, ..OutQueue::default() };
        let mut stream = MemStream::new(InBuf::new(sizes.input as usize), output, sizes);
        (stream.message.started, stream.settled) = (started, started);
        stream
    }

    /// `Some(messages begun)` when the stream holds nothing at all: no input, no output, no
    /// frame or message under way, no end of stream. Such a stream can be dropped (its empty
    /// buffers with it) and made again by [`MemStream::again`] with nothing lost.
    pub(super) fn holds_nothing(&self) -> Option<u32> {
        let empty = self.input.is_empty() && self.output.bytes.is_empty() && self.output.kept == 0;
        let between = self.here.is_none() && self.frame_left == 0 && !self.message.open && !self.eof;
        (empty && between).then_some(self.message.started)
    }

    /// Consumes the frame handed on in place, if any: done before `input` is read, added to,
    /// measured or given back.
    pub(super) fn settle_here(&mut self) {
        if let Some(here) = self.here.take() {
            self.input.consume(here.end as usize);
        }
    }

    /// The payload of the frame handed on in place (empty if none).
    pub(super) fn here(&self) -> &[u8] {
        self.here.map_or(&[][..], |h| &self.input.data()[usize::from(h.start)..h.end as usize])
    }

    /// Bytes in `input` not handed on yet.
    pub(super) fn unread(&self) -> usize {
        self.input.len() - self.here.map_or(0, |h| h.end as usize)
    }

    /// The frame handed on in place, if any.
    pub(super) fn here_kind(&self) -> Option<Here> {
        self.here
    }

    /// The common case without tungstenite: a whole, unfragmented, masked text or binary frame
    /// at the start of `input`, within the size limits (and with a length of at most 16 bits),
    /// with valid UTF-8 if it is text. It is unmasked in place and counted as a whole message;
    /// returns where its payload lies. Anything else (a control frame, a fragment, a frame not
    /// all here yet, a broken one) is left as it was, for tungstenite to read and judge.
    fn whole_frame(&mut self) -> Option<Here> {
        self.settle_here();
        let data = self.input.data_mut();
        let (&first, &second) = (data.first()?, data.get(1)?);
        if (first != FIN_TEXT && first != FIN_BINARY) || second & 0x80 == 0 {
            return None;
        }
        let (at, len) = match second & 0x7f {
            127 => return None,
            126 => (4, usize::from(u16::from_be_bytes([*data.get(2)?, *data.get(3)?]))),
            short => (2, usize::from(short)),
        };
        if len > self.sizes.max_frame() || len > self.sizes.max_message() {
            return None;
        }
        let mask: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        let payload = data.get_mut(at + 4..at + 4 + len)?;
        unmask(payload, mask);
        let text = first == FIN_TEXT;
        if text && std::str::from_utf8(payload).is_err() {
            unmask(payload, mask); // as it came: tungstenite reads it and answers 1007
            return None;
        }
        self.message.frame_starts(first);
        self.message.handed(at + 4 + len, true);
        // Both fit: the header is at most 8 bytes, the payload at most 65,535.
        Some(Here { start: (at + 4) as u8, end: (at + 4 + len) as u32, text })
    }

    /// [`MemStream::whole_frame`], its payload copied out into the event and its bytes consumed.
    pub(super) fn take_whole_message(&mut self) -> Option<WsEvent> {
        let here = self.whole_frame()?;
        let payload = &self.input.data()[usize::from(here.start)..here.end as usize];
        let event = if here.text {
            // Checked by `whole_frame`: the lossy conversion finds nothing to replace.
            WsEvent::Text(Utf8Bytes::from(String::from_utf8_lossy(payload).into_owned()))
        } else {
            WsEvent::Binary(Bytes::copy_from_slice(payload))
        };
        self.input.consume(here.end as usize);
        Some(event)
    }

    /// [`MemStream::whole_frame`], handed on where it lies: its payload is [`MemStream::here`]
    /// until the next call that settles it.
    pub(super) fn take_here(&mut self) -> Option<WsEvent> {
        let here = self.whole_frame()?;
        self.here = Some(here);
        Some(WsEvent::Here { text: here.text })
    }

    /// tungstenite holds nothing of the client's: it asked for more and found nothing (so it
    /// had parsed every byte it was given), every frame handed over was whole, and no message
    /// is unfinished. Its state can go; what waits in `input` it has not seen yet.
    pub(super) fn between_messages(&self) -> bool {
        self.starved && self.frame_left == 0 && !self.message.open
    }
}

/// A connection's stream dropped while it is idle and made again when it is needed (see
/// `WsState::Idle`).
impl Ws {
    /// The stream of an idle connection, made again (empty) so that bytes can go in or out.
    pub(super) fn rouse(&mut self) {
        if let WsState::Idle(Idle { sizes, started }) = self.state {
            self.state = WsState::Quiet(Box::new(MemStream::again(sizes, started)));
        }
    }

    /// An empty stream, no longer needed: the connection keeps only what makes it again.
    /// Only a stream that began no message since it was made or its output last went out
    /// (`released`: that is now) goes idle: a connection busy with messages keeps its stream
    /// from pass to pass (allocating it every pass cost about 7 % at 1,000 × 1), and one that
    /// fell silent goes idle at its next write or read (the keepalive's ping, the pong).
    pub(super) fn sleep(&mut self, released: bool) {
        let WsState::Quiet(stream) = &mut self.state else { return };
        let started = stream.message.started;
        if started != stream.settled {
            if released {
                stream.settled = started;
            }
            return;
        }
        if let Some(started) = stream.holds_nothing() {
            self.state = WsState::Idle(Idle { sizes: stream.sizes, started });
        }
    }
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let data = self.input.data();
        self.starved = data.is_empty();
        if data.is_empty() {
            return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        // Whole small frames go together (one read for a batch of messages); a large frame is
        // handed alone, and nothing past its end, so tungstenite can be made afresh after it.
        let limit = data.len().min(buf.len());
        let mut n = 0;
        while n < limit {
            if self.frame_left == 0 {
                let len = match frame_len(&data[n..]) {
                    Some(len) if n > 0 && len > SHED_FRAME_BYTES => break,
                    Some(len) => len,
                    // A header cut short after whole frames: those go now, the rest later.
                    None if n > 0 => break,
                    // The header is cut short: wait for the rest (it always fits in `input`).
                    // Its first byte already says whether a message begins, and the message's
                    // clock starts with it.
                    None if data.len() < MAX_FRAME_HEADER && !self.eof => {
                        self.message.frame_starts(data[0]);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    // A length past usize (tungstenite refuses the frame), or the peer's last bytes.
                    None => usize::MAX,
                };
                self.message.frame_starts(data[n]);
                self.frame_left = len;
                self.large_frame |= len > SHED_FRAME_BYTES;
            }
            let take = (limit - n).min(self.frame_left);
            n += take;
            self.frame_left -= take;
            self.message.handed(take, self.frame_left == 0);
            if self.large_frame {
                break;
            }
        }
        buf[..n].copy_from_slice(&data[..n]);
        self.input.consume(n);
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
