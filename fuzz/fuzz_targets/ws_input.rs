//! Arbitrary bytes after a valid upgrade into a `Ws`: the WebSocket input path (frames,
//! fragments, masks, control frames, close, size limits, UTF-8) through tungstenite over the
//! in-memory stream, and the output queue the server writes from.
//!
//! Input: three control bytes, then what the client sends after its upgrade request.
//! - byte 0: the limits (tiny, small, default-sized, one-byte reads); echo each message back;
//!   ping on every read; end with the peer's FIN; end with `abort(1008)` as the slow-consumer
//!   path does; start our own close (1001, as the idle timeout does) as soon as it opens.
//! - byte 1: how many bytes each socket write takes (0: all of them).
//! - byte 2: where the client's bytes are cut into two reads.
//!
//! The bytes are fed as the shell feeds them (never past the buffer's room), once glued to the
//! request in one read and once in two reads, events polled until none is left.
//!
//! Checked, besides "no panic": an open connection polled dry has room to read (one without
//! would never be read again); both feedings give the same events; and everything
//! written, from the 101 answer to the last byte, is a valid server frame sequence: whole
//! unmasked frames, FIN set, no reserved bits, known opcodes, control payloads of at most 125
//! bytes, UTF-8 text, at most one close frame and nothing after it, and the text frames a
//! prefix of what was sent, in order.
#![no_main]

use gearsock::ws::{Ws, WsEvent, WsLimits};
use libfuzzer_sys::fuzz_target;

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// (max message, max frame, tungstenite read buffer, input limit).
const LIMITS: [(usize, usize, usize, usize); 4] =
    [(64, 32, 16, 128), (1024, 512, 256, 2048), (65536, 65536, 4096, 65536), (300, 300, 1, 300)];

struct Options {
    echo: bool,
    ping: bool,
    eof: bool,
    abort: bool,
    close_on_open: bool,
    write_size: usize,
}

fuzz_target!(|data: &[u8]| {
    let [c0, c1, c2, frames @ ..] = data else { return };
    let (max_message_bytes, max_frame_bytes, read_buffer_bytes, in_limit_bytes) = LIMITS[usize::from(c0 & 3)];
    let limits = WsLimits {
        max_message_bytes,
        max_frame_bytes,
        read_buffer_bytes,
        in_limit_bytes,
        allowed_origins: vec![],
    };
    let options = Options {
        echo: c0 & 4 != 0,
        ping: c0 & 8 != 0,
        eof: c0 & 16 != 0,
        abort: c0 & 32 != 0,
        close_on_open: c0 & 64 != 0,
        write_size: if *c1 == 0 { usize::MAX } else { usize::from(*c1) },
    };
    let split = frames.len() * usize::from(*c2) / 255;
    let glued = [UPGRADE, frames].concat();
    let one = run(&[&glued], &limits, &options);
    let two = run(&[&[UPGRADE, &frames[..split]].concat(), &frames[split..]], &limits, &options);
    assert_eq!(one, two, "two reads changed the events");
});

/// Feeds `reads` as the shell does; returns the events after checking everything written.
fn run(reads: &[&[u8]], limits: &WsLimits, options: &Options) -> Vec<String> {
    let mut ws = Ws::new();
    let mut events = Vec::new();
    let mut sent = Vec::new();
    let mut written = Vec::new();
    for read in reads {
        let mut rest = *read;
        while let Some(input) = ws.input() {
            let n = rest.len().min(input.room());
            input.extend(&rest[..n]);
            rest = &rest[n..];
            poll(&mut ws, limits, options, &mut events, &mut sent);
            // Polled dry, an open connection has taken every byte it was given: with no room
            // left, the shell would stop reading it for good.
            let room = ws.input().map_or(0, |i| i.room());
            assert!(ws.is_done() || room > 0, "open connection holds a full buffer after polling");
            if options.ping {
                ws.send_ping();
            }
            let n_out = ws.output_len().min(options.write_size);
            written.extend_from_slice(&ws.output()[..n_out]);
            ws.consume_output(n_out);
            if rest.is_empty() || ws.is_done() {
                break;
            }
        }
    }
    if options.eof {
        ws.handle_eof();
        poll(&mut ws, limits, options, &mut events, &mut sent);
    }
    let aborted = options.abort && ws.abort(1008, "slow consumer");
    written.extend_from_slice(ws.output());
    check_wire(&written, &sent, aborted);
    events
}

/// Polls every event, answering each message as the App would (one text reply each).
fn poll(ws: &mut Ws, limits: &WsLimits, options: &Options, events: &mut Vec<String>, sent: &mut Vec<String>) {
    while let Some(event) = ws.poll_event(limits) {
        let reply = match &event {
            WsEvent::Text(text) => Some(format!("echo {}", text.as_str())),
            WsEvent::Binary(data) => Some(format!("binary {}", data.len())),
            WsEvent::Opened(_) if options.close_on_open => {
                ws.close(1001, "idle");
                None
            }
            _ => None,
        };
        if let Some(reply) = reply.filter(|_| options.echo)
            && ws.send_text(reply.clone())
        {
            sent.push(reply);
        }
        events.push(format!("{event:?}"));
    }
}

/// `wire` is everything the client receives: the 101 answer, then server frames.
fn check_wire(wire: &[u8], sent: &[String], aborted: bool) {
    assert!(wire.starts_with(b"HTTP/1.1 101 "), "no 101 answer");
    let head_end = wire.windows(4).position(|w| w == b"\r\n\r\n").expect("whole 101 answer") + 4;
    let mut rest = &wire[head_end..];
    let mut texts = Vec::new();
    let mut closed = false;
    while !rest.is_empty() {
        assert!(!closed, "bytes after the close frame");
        let (opcode, payload, len) = frame(rest);
        match opcode {
            1 => texts.push(std::str::from_utf8(payload).expect("text frame is UTF-8").to_string()),
            8 => {
                assert!(payload.len() != 1, "a close payload holds a code or nothing");
                if payload.len() > 2 {
                    std::str::from_utf8(&payload[2..]).expect("close reason is UTF-8");
                }
                closed = true;
            }
            9 | 10 => {}
            other => panic!("server sent opcode {other}"),
        }
        rest = &rest[len..];
    }
    assert!(sent.starts_with(&texts), "text frames on the wire are not a prefix of what was sent");
    if aborted {
        assert!(closed, "abort() said it queued a close frame");
    }
}

/// One whole server frame at the start of `bytes`: (opcode, payload, frame length).
fn frame(bytes: &[u8]) -> (u8, &[u8], usize) {
    assert!(bytes.len() >= 2, "frame header cut short");
    let (b0, b1) = (bytes[0], bytes[1]);
    assert_eq!(b0 & 0xf0, 0x80, "FIN must be set and RSV clear: {b0:#04x}");
    assert_eq!(b1 & 0x80, 0, "server frames are unmasked");
    let (header, len) = match b1 & 0x7f {
        126 => {
            (4, usize::from(u16::from_be_bytes(bytes.get(2..4).expect("16-bit length").try_into().unwrap())))
        }
        127 => {
            let len = u64::from_be_bytes(bytes.get(2..10).expect("64-bit length").try_into().unwrap());
            (10, usize::try_from(len).unwrap())
        }
        short => (2, usize::from(short)),
    };
    let opcode = b0 & 0x0f;
    if opcode >= 8 {
        assert!(len <= 125, "control frame of {len} bytes");
    }
    let payload = bytes.get(header..header + len).expect("frame cut short");
    (opcode, payload, header + len)
}
