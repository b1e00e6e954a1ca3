//! Arbitrary bytes into a fresh `Ws`: the HTTP request head parser and the WebSocket upgrade
//! checks (101, or a plain request for the shell to answer, or 400/403/405/426/431).
//!
//! Input: one control byte (an `Origin` allow-list or none; a long filler header after the
//! first line, which brings the head within a few bytes of the 8 KiB limit without a long
//! input), one byte that picks the split point, then the bytes a client sends. They are fed as
//! the shell feeds them, never past the buffer's room, once all at once and once in two reads
//! cut at the split point.
//!
//! Checked, besides "no panic": what the connection answers is one well-formed HTTP response
//! (status line, a `Content-Length` that matches the body) whose status agrees with the event;
//! a connection still handshaking has room to read more (one that does not would hang until
//! its timeout); and both feedings give the same events and the same answer.
#![no_main]

use gearsock::ws::{MAX_HEAD_BYTES, Ws, WsEvent, WsLimits};
use libfuzzer_sys::fuzz_target;

/// Filler that leaves 8 KiB minus this many bytes for the rest of the head.
const PAD_SHORT_OF_LIMIT: usize = 160;

fuzz_target!(|data: &[u8]| {
    let [control, cut, bytes @ ..] = data else { return };
    let padded;
    let bytes = if control & 2 == 0 {
        bytes
    } else {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n").map_or(0, |i| i + 2);
        let filler = MAX_HEAD_BYTES - PAD_SHORT_OF_LIMIT;
        let header = [b"X-Pad: ".as_slice(), &vec![b'a'; filler], b"\r\n"].concat();
        padded = [&bytes[..line_end], &header, &bytes[line_end..]].concat();
        &padded[..]
    };
    let limits = WsLimits {
        max_message_bytes: 256,
        max_frame_bytes: 128,
        read_buffer_bytes: 64,
        in_limit_bytes: 1024,
        allowed_origins: if control & 1 == 0 { Vec::new() } else { vec!["http://good.example".into()] },
    };
    let split = bytes.len() * usize::from(*cut) / 255;
    let (whole_events, whole_out) = run(&[bytes], &limits);
    let (split_events, split_out) = run(&[&bytes[..split], &bytes[split..]], &limits);
    assert_eq!(whole_events, split_events, "two reads changed the events");
    assert_eq!(whole_out, split_out, "two reads changed the answer");
});

/// Feeds `reads` the way the shell does and answers a plain request as it would; returns the
/// events and everything the connection wrote.
fn run(reads: &[&[u8]], limits: &WsLimits) -> (Vec<WsEvent>, Vec<u8>) {
    let mut ws = Ws::new();
    let mut events = Vec::new();
    for read in reads {
        let mut rest = *read;
        while let Some(input) = ws.input() {
            let n = rest.len().min(input.room());
            input.extend(&rest[..n]);
            rest = &rest[n..];
            let before = events.len();
            while let Some(event) = ws.poll_event(limits) {
                if let WsEvent::Http { .. } = event {
                    assert!(ws.output().is_empty(), "answered before the shell did");
                    ws.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                }
                events.push(event);
            }
            if ws.is_handshaking() {
                let input = ws.input().expect("a handshaking connection reads");
                assert!(input.len() < MAX_HEAD_BYTES, "handshake stuck with {} bytes", input.len());
            }
            if rest.is_empty() || (n == 0 && events.len() == before) {
                break;
            }
        }
    }
    let out = ws.output().to_vec();
    check_answer(events.first(), &out);
    (events, out)
}

/// The bytes before any frame must be one HTTP response matching the first event.
fn check_answer(first: Option<&WsEvent>, out: &[u8]) {
    let Some(first) = first else {
        assert!(out.is_empty(), "answered without an event");
        return;
    };
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head") + 4;
    let head = std::str::from_utf8(&out[..head_end]).expect("our response head is ASCII");
    let status: u16 =
        head.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)).and_then(|s| s.parse().ok()).unwrap();
    match first {
        WsEvent::Opened(_) => {
            assert_eq!(status, 101);
            assert!(head.contains("\r\nSec-WebSocket-Accept: "));
            return; // frames may follow; ws_input checks them
        }
        WsEvent::Http { .. } => assert_eq!(status, 200),
        WsEvent::Failed { code, .. } => {
            assert_eq!(status, *code);
            assert!([400, 403, 405, 426, 431].contains(code), "{code}");
        }
        other => panic!("{other:?} before the handshake"),
    }
    let length: usize = head
        .split("\r\n")
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    assert_eq!(out.len() - head_end, length, "body length differs from Content-Length");
}
