//! Micro-benchmarks of the sans-IO parts: the Gearman codec, the WebSocket message path
//! (frame in -> App -> reply frame out, no sockets) and the timer wheel against a BinaryHeap.
//! `cargo bench` runs them; CI runs them once each in test mode.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

mod common;

use common::{client_frame, open_client};
use gearsock::app::Effect;
use gearsock::buf::InBuf;
use gearsock::gearman::client::{ClientSession, JobEvent, JobMode, JobTag, Priority};
use gearsock::gearman::packet::{PacketType, encode_response};
use gearsock::wheel::TimerWheel;
use gearsock::ws::WsEvent;

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("gearman");
    g.throughput(Throughput::Elements(1));
    let payload = vec![b'x'; 64];
    g.bench_function("submit_encode", |b| {
        let mut session = ClientSession::new(1 << 20);
        let mut out = Vec::with_capacity(1 << 16);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            session.submit(
                JobTag(i),
                b"echo",
                b"",
                &payload,
                JobMode::Foreground,
                Priority::Normal,
                &mut out,
            );
            if out.len() > 60_000 {
                out.clear();
                session = ClientSession::new(1 << 20);
            }
        })
    });
    // A whole stream job on the client side: SUBMIT out, JOB_CREATED + WORK_DATA + WORK_COMPLETE in.
    g.bench_function("stream_job_round_trip", |b| {
        let mut session = ClientSession::new(1 << 20);
        let (mut out, mut input) = (Vec::new(), InBuf::new(1 << 20));
        let mut wire = Vec::new();
        encode_response(&mut wire, PacketType::JobCreated, &[b"H:bench:1"]);
        encode_response(&mut wire, PacketType::WorkData, &[b"H:bench:1", b"chunk"]);
        encode_response(&mut wire, PacketType::WorkComplete, &[b"H:bench:1", &payload]);
        b.iter(|| {
            out.clear();
            session.submit(
                JobTag(1),
                b"echo",
                b"",
                &payload,
                JobMode::Foreground,
                Priority::Normal,
                &mut out,
            );
            input.extend(&wire);
            session.handle_input(&mut input).expect("valid packets");
            let mut n = 0;
            while let Some(event) = session.poll_event() {
                n += 1;
                black_box(event);
            }
            assert_eq!(n, 3);
        })
    });
    g.bench_function("status_res_decode", |b| {
        let mut session = ClientSession::new(1 << 20);
        let (mut out, mut input) = (Vec::new(), InBuf::new(1 << 20));
        let mut wire = Vec::new();
        encode_response(&mut wire, PacketType::StatusRes, &[b"H:bench:1", b"1", b"1", b"3", b"5"]);
        b.iter(|| {
            out.clear();
            session.get_status(b"H:bench:1", 0, &mut out);
            input.extend(&wire);
            session.handle_input(&mut input).expect("valid packet");
            assert!(matches!(session.poll_event(), Some(JobEvent::StatusRes { .. })));
        })
    });
    g.finish();
}

fn message_path(c: &mut Criterion) {
    let (mut ws, limits, mut app, id) = open_client();
    let frame = client_frame(br#"{"type":"worker.complete","id":1,"value":"done"}"#);
    let now = Instant::now();
    let mut effects = Vec::new();
    let mut g = c.benchmark_group("ws");
    g.throughput(Throughput::Elements(1));
    // What one round trip costs the server apart from syscalls.
    g.bench_function("worker_complete_frame_in_reply_out", |b| {
        b.iter(|| {
            ws.input().expect("open").extend(&frame);
            while let Some(event) = ws.poll_event(&limits) {
                if let WsEvent::Text(text) = event {
                    app.handle_client_text(id, &text, now);
                }
            }
            app.drain_effects(&mut effects);
            for effect in effects.drain(..) {
                if let Effect::Send(_, text) = effect {
                    ws.send_text(text);
                }
            }
            assert_eq!(ws.output(), b"\x81\x07got it!");
            ws.consume_output(ws.output_len());
        })
    });
    // The App's share alone: the text in, its effects out.
    let text = r#"{"type":"worker.complete","id":1,"value":"done"}"#;
    g.bench_function("worker_complete_app_only", |b| {
        b.iter(|| {
            app.handle_client_text(id, black_box(text), now);
            app.drain_effects(&mut effects);
            assert!(matches!(effects.first(), Some(Effect::Send(..))));
            effects.clear();
        })
    });
    g.finish();
}

fn wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timers");
    let t0 = Instant::now();
    let n = 1_000_000u64;
    // Deadlines spread over 60 s, as idle timeouts and polls are.
    let at = |i: u64| t0 + Duration::from_micros((i.wrapping_mul(2_654_435_761) % 60_000_000) + 1);
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("wheel_insert_expire_1m", |b| {
        b.iter_batched(
            || TimerWheel::new(t0, Duration::from_millis(1), 4096),
            |mut wheel| {
                for i in 0..n {
                    wheel.insert(at(i), i);
                }
                let mut fired = Vec::with_capacity(n as usize);
                wheel.expire(t0 + Duration::from_secs(61), &mut fired);
                assert_eq!(fired.len(), n as usize);
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("heap_insert_expire_1m", |b| {
        b.iter_batched(
            || BinaryHeap::with_capacity(n as usize),
            |mut heap| {
                for i in 0..n {
                    heap.push(Reverse((at(i), i)));
                }
                let end = t0 + Duration::from_secs(61);
                let mut fired = 0;
                while heap.peek().is_some_and(|Reverse((d, _))| *d <= end) {
                    heap.pop();
                    fired += 1;
                }
                assert_eq!(fired, n);
            },
            BatchSize::PerIteration,
        )
    });
    // Insert then cancel (a timeout that did not fire: the common case), with 1M timers armed.
    g.throughput(Throughput::Elements(1));
    g.sample_size(50);
    g.bench_function("wheel_insert_cancel_with_1m_armed", |b| {
        let mut wheel = TimerWheel::new(t0, Duration::from_millis(1), 4096);
        for i in 0..n {
            wheel.insert(at(i), i);
        }
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let key = wheel.insert(at(i), i);
            black_box(wheel.cancel(key));
        })
    });
    g.bench_function("heap_insert_cancel_with_1m_armed", |b| {
        // A heap cannot remove from the middle: the usual trick is a tombstone set, paid at pop.
        let mut heap = BinaryHeap::with_capacity(2 * n as usize);
        for i in 0..n {
            heap.push(Reverse((at(i), i)));
        }
        let mut cancelled = std::collections::HashSet::new();
        let mut i = n;
        b.iter(|| {
            i += 1;
            heap.push(Reverse((at(i), i)));
            cancelled.insert(i);
        })
    });
    g.finish();
}

criterion_group!(benches, codec, message_path, wheel);
criterion_main!(benches);
