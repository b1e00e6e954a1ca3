//! Micro-benchmarks of the sans-IO parts: the Gearman codec, the WebSocket message path
//! (frame in -> App -> reply frame out, no sockets) and the timer wheel against a BinaryHeap.
//! `cargo bench` runs them; CI runs them once each in test mode.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use gearsock::app::{App, ConnId, Effect};
use gearsock::buf::InBuf;
use gearsock::config::Config;
use gearsock::gearman::client::{ClientSession, JobEvent, JobMode, JobTag, Priority};
use gearsock::gearman::packet::{PacketType, encode_response};
use gearsock::wheel::TimerWheel;
use gearsock::ws::{Ws, WsEvent};

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

/// A masked client text frame (a fixed mask, as a load generator would send).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn message_path(c: &mut Criterion) {
    let cfg = Config::default();
    let limits = gearsock::server::settings::ws_limits(&cfg);
    let mut ws = Ws::new();
    ws.input().expect("handshaking").extend(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(matches!(ws.poll_event(&limits), Some(WsEvent::Opened(_))));
    ws.consume_output(ws.output_len());
    let mut app = App::new(
        gearsock::server::settings::app_config(&cfg, "bench".into()),
        1,
        gearsock::random::Entropy::counter(),
    );
    let id = ConnId { key: 0, generation: 1 };
    app.handle_client_open(id, true);
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
