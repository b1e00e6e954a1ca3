//! Issue 18, the loop's part: hostile clients against the real binary. A message left
//! unfinished is closed at `--message-timeout-ms` whatever else the client sends; the largest
//! holder of unfinished input goes first when all together pass `--client-in-total-bytes`; a
//! flood of tiny frames from many clients does not starve another client's round trips; and
//! trust comes from the server's own address, never the request's `Host`.
//!
//! Raw sockets make the frames and headers a well-behaved client library will not.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A raw client socket, upgraded: its 101 answer has been read.
fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("the 101 answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A masked client frame: `first` is the FIN bit and the opcode.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first, payload, [0x11, 0x22, 0x33, 0x44])
}

/// The next server frame: (first byte, payload).
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head)?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Reads until a close frame; returns its code and reason.
fn read_close(s: &mut TcpStream) -> (u16, String) {
    loop {
        let (first, payload) = read_frame(s).expect("a close frame before the read timeout");
        if first & 0x0f == 8 && payload.len() >= 2 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

/// A text message begun and never finished, while the client keeps sending pongs (and a ping)
/// that would count as life for the idle timeout: closed 1008 at the message timeout. On the
/// old server any byte kept it open.
#[test]
fn an_unfinished_message_is_closed_1008_at_the_timeout_while_pongs_keep_coming() {
    let s = Server::start_echo(&["--message-timeout-ms", "400", "--idle-timeout-ms", "200"]);
    let mut c = raw_ws(s.addr);
    c.write_all(&frame(0x01, b"the first half of a message")).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let closed = loop {
        assert!(start.elapsed() < Duration::from_secs(10), "still open after 10 s: {got:?}");
        // Pongs (and a ping now and then) are no part of the message and must not extend it.
        let _ = c.write_all(&frame(0x8a, b""));
        let _ = c.write_all(&frame(0x89, b"p"));
        match read_frame(&mut c) {
            Ok((first, payload)) if first & 0x0f == 8 => break payload,
            Ok((first, _)) => got.push(first),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(u16::from_be_bytes([closed[0], closed[1]]), 1008);
    assert_eq!(String::from_utf8_lossy(&closed[2..]), "message not completed in time");
    assert_eq!(s.metric("gearsock_message_timeouts_total"), 1.0);

    // A message that finishes in time is echoed, however many frames it took.
    let mut c = raw_ws(s.addr);
    c.write_all(
        &[frame(0x01, b"one "), frame(0x8a, b""), frame(0x00, b"two "), frame(0x80, b"three")].concat(),
    )
    .unwrap();
    let (first, payload) = read_frame(&mut c).expect("the echo");
    assert_eq!((first, payload.as_slice()), (0x81, b"one two three".as_slice()));
}

/// Three clients hold parts of fragmented messages; a fourth takes all of them over the total.
/// The largest holder is closed 1008 and the others finish their messages.
#[test]
fn the_largest_holder_of_unfinished_input_is_dropped_first() {
    let s = Server::start_echo(&[
        "--max-message-bytes",
        "262144",
        "--max-frame-bytes",
        "65536",
        "--client-in-total-bytes",
        "400000",
    ]);
    let piece = vec![b'a'; 50_000];
    // (client, bytes it holds): 200 kB, 100 kB, 50 kB = 350 kB, under 400 kB.
    let mut clients: Vec<TcpStream> = (0..4).map(|_| raw_ws(s.addr)).collect();
    for (c, pieces) in clients.iter_mut().zip([4, 2, 1]) {
        c.write_all(&frame(0x01, &piece)).unwrap();
        for _ in 1..pieces {
            c.write_all(&frame(0x00, &piece)).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300)); // the loop reads them (pacing, not a check)
    assert_eq!(s.metric("gearsock_input_total_dropped_total"), 0.0, "350 kB is under the total");
    // The fourth brings the total to 450 kB: the 200 kB holder goes, and only it.
    clients[3].write_all(&frame(0x01, &piece)).unwrap();
    clients[3].write_all(&frame(0x00, &piece)).unwrap();
    let (code, reason) = read_close(&mut clients[0]);
    assert_eq!((code, reason.as_str()), (1008, "too much unfinished input on the server"));
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        c.write_all(&frame(0x80, b"!")).unwrap();
        let (first, payload) = read_frame(c).expect("the echo of a finished message");
        assert_eq!(first, 0x81, "client {i}");
        assert!(payload.ends_with(b"a!"), "client {i}");
    }
    assert_eq!(s.metric("gearsock_input_total_dropped_total"), 1.0);
}

/// 16 clients flood empty text frames (each an invalid message with an error reply, which
/// they read) while a 17th does `worker.complete` round trips. With a budget in bytes alone,
/// each flooder's 64 KiB per pass was about 10,900 messages and the probe waited about 250 ms
/// per round trip; with a budget in messages it gets its turn every short pass. The count is a
/// generous floor (the fix gives well over ten times it), not a latency.
#[test]
fn a_flood_of_tiny_frames_from_16_clients_leaves_another_clients_round_trips_flowing() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &[]);
    s.wait_healthy();
    let stop = Arc::new(AtomicBool::new(false));
    let batch: Vec<u8> = (0..4096).flat_map(|_| frame(0x81, b"")).collect();
    let mut threads = Vec::new();
    for _ in 0..16 {
        let mut c = raw_ws(s.addr);
        let mut reader = c.try_clone().unwrap();
        let stop_w = stop.clone();
        let batch = batch.clone();
        threads.push(std::thread::spawn(move || {
            while !stop_w.load(Ordering::Relaxed) && c.write_all(&batch).is_ok() {}
        }));
        let stop_r = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            reader.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            while !stop_r.load(Ordering::Relaxed) {
                if let Ok(0) = reader.read(&mut sink) {
                    break;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300)); // the flood is on
    let mut probe = connect(&s.url());
    let (start, mut round_trips) = (Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(3) {
        send(&mut probe, &json!({"type": "worker.complete", "id": round_trips, "value": "x"}).to_string());
        assert_eq!(recv(&mut probe), "got it!");
        round_trips += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    assert!(round_trips >= 100, "only {round_trips} round trips in 3 s beside the flood");
    // The server is still itself.
    assert_eq!(s.http("GET", "/healthz").0, 200);
}

/// Sends `worker.complete` with `fields` and returns the reply's text.
fn report(ws: &mut Ws, fields: Value) -> String {
    let mut msg = json!({"type": "worker.complete"});
    for (k, v) in fields.as_object().expect("an object") {
        msg[k] = v.clone();
    }
    send(ws, &msg.to_string());
    recv(ws)
}

/// A background job of `client`'s, held by `worker` (grabbed, not finished).
fn held_job(client: &mut Ws, worker: &mut RawWorker, function: &str) -> Grabbed {
    send(
        client,
        &json!({"type": "submit", "function": function, "payload": "p", "mode": "background"}).to_string(),
    );
    assert_eq!(recv_json(client)["type"], "job.created");
    worker.must_grab(Duration::from_secs(5))
}

/// The last message of a job: its `job.complete` or `job.failed`.
fn job_end(ws: &mut Ws) -> Value {
    loop {
        let v = recv_json(ws);
        if matches!(v["type"].as_str(), Some("job.complete" | "job.failed")) {
            return v;
        }
    }
}

/// A page on a domain that rebinds to 127.0.0.1 sends `Host` and `Origin` that agree and name
/// its own domain: the old check (`Origin` = `http://` + `Host`) trusted it, and its forged
/// `worker.complete` set a victim's value. Now it is `forbidden`; the page served from the
/// listening address, and a `--public-origin`, are still our own.
#[test]
fn a_rebinding_page_is_not_trusted_and_the_servers_own_origins_are() {
    let g = Gearmand::start();
    let f = "rebinding";
    let mut w = RawWorker::connect(&g.addr(), f);
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "20"]);
    s.wait_healthy();
    let mut victim = connect(&s.url());
    let job = held_job(&mut victim, &mut w, f);
    let evil = format!("evil.example:{}", s.addr.port());
    let mut page = connect_with(&s.url(), &[("Host", &evil), ("Origin", &format!("http://{evil}"))]);
    let reply = report(&mut page, json!({"id": job.handle, "unique": job.unique, "value": "pwned"}));
    assert!(reply.contains("\"forbidden\""), "the rebinding page was trusted: {reply}");
    // The page served from the listening address is ours, whatever Host says.
    let own = format!("http://{}", s.addr);
    let mut page = connect_with(&s.url(), &[("Host", "anything.example"), ("Origin", &own)]);
    assert_eq!(report(&mut page, json!({"id": job.handle, "unique": job.unique, "value": "own"})), "got it!");
    w.complete(&job.handle, b"");
    assert_eq!(job_end(&mut victim)["result"], "own");

    // A name a proxy serves us under is ours once the operator says so.
    let s =
        Server::start(&g.addr(), &["--poll-interval-ms", "20", "--public-origin", "https://gear.example"]);
    s.wait_healthy();
    let mut victim = connect(&s.url());
    let job = held_job(&mut victim, &mut w, f);
    let mut page = connect_with(&s.url(), &[("Origin", "https://gear.example")]);
    assert_eq!(
        report(&mut page, json!({"id": job.handle, "unique": job.unique, "value": "public"})),
        "got it!"
    );
    w.complete(&job.handle, b"");
    assert_eq!(job_end(&mut victim)["result"], "public");
}

/// Two `Host` headers: 400, for an upgrade and for a plain request.
#[test]
fn a_request_with_two_host_headers_gets_400() {
    let s = Server::start_echo(&[]);
    for extra in ["Upgrade: websocket\r\nConnection: Upgrade\r\n", ""] {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Host: evil.example\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let answer = http_raw(s.addr, &req, Duration::from_secs(5)).expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{extra:?}: {answer}");
        assert!(answer.contains("more than one Host header"), "{answer}");
    }
}

/// `--allowed-origin` stops other sites' pages; the article's worker sends no `Origin` (it is
/// no browser) and still reports: the ping's client hears the value.
#[test]
fn a_worker_without_origin_reports_through_a_server_with_allowed_origin() {
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--allowed-origin", "http://app.example"]);
    s.wait_healthy();
    let refused = try_connect_with(&s.url(), &[("Origin", "http://evil.example")], Duration::from_secs(5));
    assert!(refused.is_err_and(|e| e.contains("403")), "another site's page is refused");
    let (gearmand, url) = (g.addr(), s.url());
    let args = ["worker", "--gearmand", &gearmand, "--count", "1", "--interval-ms", "10", "--report", &url];
    let mut w = Proc::spawn(&args);
    assert_eq!(w.line(), "waiting");
    let mut page = connect_with(&s.url(), &[("Origin", "http://app.example")]);
    send(&mut page, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut page), "before the 'received' message");
    assert!(recv(&mut page).starts_with("job: "));
    assert_eq!(recv(&mut page), "value: done");
    assert!(w.line().starts_with("received: "));
    assert_eq!(w.line(), "ping 1");
    assert_eq!(w.line(), "response: got it!");
}
