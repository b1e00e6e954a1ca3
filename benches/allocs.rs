//! Allocations per message on the WebSocket message path (frame in -> App -> reply frame out,
//! no sockets), counted by a wrapping global allocator. Its own bench target, so the counter
//! does not tax the timings in `micro.rs`. `cargo bench --bench allocs` prints the counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

mod common;

use common::{client_frame, open_client};
use gearsock::app::{App, Effect};
use gearsock::ws::{Ws, WsEvent};

/// Counts calls that hand out memory (alloc, and realloc, which may move).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// The share of them made inside `App::handle_client_text`.
static IN_APP: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to `System` unchanged; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let (mut ws, limits, mut app, id) = open_client();
    let (now, mut effects) = (Instant::now(), Vec::new());
    for (name, msg, reply) in [
        (
            "worker.complete, id 1",
            &br#"{"type":"worker.complete","id":1,"value":"done"}"#[..],
            &b"got it!"[..],
        ),
        (
            "worker.complete, id \"H:1\"",
            br#"{"type":"worker.complete","id":"H:1","value":"done"}"#,
            b"got it!",
        ),
    ] {
        let frame = client_frame(msg);
        let mut one = |ws: &mut Ws, app: &mut App| {
            ws.input().expect("open").extend(&frame);
            while let Some(event) = ws.poll_event(&limits) {
                if let WsEvent::Text(text) = event {
                    let before = ALLOCS.load(Ordering::Relaxed);
                    app.handle_client_text(id, &text, now);
                    IN_APP.fetch_add(ALLOCS.load(Ordering::Relaxed) - before, Ordering::Relaxed);
                }
            }
            app.drain_effects(&mut effects);
            for effect in effects.drain(..) {
                if let Effect::Send(_, text) = effect {
                    ws.send_text(text);
                }
            }
            assert_eq!(&ws.output()[2..], reply);
            ws.consume_output(ws.output_len());
        };
        // Warm: buffers grow and the stored value is made on the first messages.
        for _ in 0..100 {
            one(&mut ws, &mut app);
        }
        let (rounds, start, start_app) =
            (10_000u64, ALLOCS.load(Ordering::Relaxed), IN_APP.load(Ordering::Relaxed));
        for _ in 0..rounds {
            one(&mut ws, &mut app);
        }
        let per = (ALLOCS.load(Ordering::Relaxed) - start) as f64 / rounds as f64;
        let in_app = (IN_APP.load(Ordering::Relaxed) - start_app) as f64 / rounds as f64;
        println!("{name}: {per:.2} allocations per message, {in_app:.2} of them in the App");
    }
}
