//! What an idle connection keeps after a large message, counted exactly: this test binary's
//! allocator tracks live bytes, and the WebSocket layer (sans-IO, no socket) is driven the way
//! the server drives it, echoing each message back as `serve --echo` does. A client that once
//! sent a 16 MiB message must not cost 16 MiB for as long as it stays connected.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gearsock::ws::{Ws, WsEvent, WsLimits};

/// Bytes allocated and not yet freed, by anyone in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1024 * 1024;
const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A client frame masked with a zero key; `first` is FIN plus the opcode.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first, 0x80 | 127];
    f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    f
}

/// Feeds `wire` 64 KiB at a time (the server's read budget per pass), echoing every message
/// and writing everything out, as the loop does; returns how many messages came back.
fn echo_through(ws: &mut Ws, limits: &WsLimits, wire: &[u8]) -> usize {
    let mut echoed = 0;
    for chunk in wire.chunks(64 * 1024) {
        ws.input().expect("open").extend(chunk);
        while let Some(event) = ws.poll_event(limits) {
            let sent = match event {
                WsEvent::Text(text) => ws.send_text(&text),
                WsEvent::Binary(data) => ws.send_binary(&data),
                other => panic!("unexpected {other:?}"),
            };
            assert!(sent);
            echoed += 1;
        }
        ws.consume_output(ws.output_len());
    }
    ws.release_idle_buffers();
    echoed
}

#[test]
fn an_idle_connection_keeps_little_after_a_16_mib_message() {
    let limits = WsLimits {
        max_message_bytes: 16 * MIB,
        max_frame_bytes: 16 * MIB,
        read_buffer_bytes: 512,
        in_limit_bytes: 16 * MIB + 14,
        allowed_origins: Vec::new(),
    };
    // What the client sends is made first: it is not the server's memory.
    let big = vec![b'b'; 16 * MIB];
    let single = frame(0x82, &big);
    let fragmented: Vec<u8> = big
        .chunks(MIB)
        .enumerate()
        .flat_map(|(i, part)| {
            frame(
                if i == 15 {
                    0x80
                } else if i == 0 {
                    0x01
                } else {
                    0x00
                },
                part,
            )
        })
        .collect();
    // A large frame followed at once by a small one: they share the reads.
    let glued = [frame(0x82, &big[..4 * MIB]), frame(0x81, b"after")].concat();
    let small = frame(0x81, b"small");

    let mut ws = Ws::new();
    ws.input().expect("handshaking").extend(UPGRADE);
    assert!(matches!(ws.poll_event(&limits), Some(WsEvent::Opened(_))));
    ws.consume_output(ws.output_len());
    echo_through(&mut ws, &limits, &small);
    let idle = LIVE.load(Ordering::Relaxed);
    for (what, wire, messages) in
        [("one 16 MiB frame", &single, 1), ("16 fragments of 1 MiB", &fragmented, 1), ("glued", &glued, 2)]
    {
        assert_eq!(echo_through(&mut ws, &limits, wire), messages, "{what}");
        let held = LIVE.load(Ordering::Relaxed).saturating_sub(idle);
        assert!(held < 64 * 1024, "after {what}, the idle connection holds {held} more bytes than before");
    }
    assert!(ws.is_open());
}
