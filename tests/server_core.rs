//! The event-loop core against real sockets and real clients: handshakes, the article's
//! `worker.complete` round trip, bad input of every kind, limits, and shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

/// A server whose gearmand is a port nobody listens on: the core works without one.
fn server(extra: &[&str]) -> Server {
    Server::start(&format!("127.0.0.1:{}", free_port()), extra)
}

#[test]
fn worker_complete_round_trip_as_in_the_article() {
    let s = server(&[]);
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"foo"}"#);
    assert_eq!(recv(&mut ws), "got it!");
    send(&mut ws, r#"{"type":"worker.complete","id":"H:vm:1","value":"done"}"#);
    assert_eq!(recv(&mut ws), "got it!");
}

#[test]
fn handshake_sent_one_byte_at_a_time() {
    let s = server(&[]);
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    for b in request.bytes() {
        sock.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut ws = tungstenite::WebSocket::from_raw_socket(sock, tungstenite::protocol::Role::Client, None);
    let mut head = [0u8; 129];
    ws.get_mut().read_exact(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    ws.send(Message::text(r#"{"type":"worker.complete","id":1,"value":"x"}"#)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("got it!"));
}

#[test]
fn bad_messages_get_errors_and_the_connection_stays_usable() {
    let s = server(&[]);
    let mut ws = connect(&s.url());
    let cases = [
        ("{not json", "bad_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"id":1,"value":"x"}"#, "bad_request"),
        (r#"{"type":"worker.complete","value":"x"}"#, "bad_request"),
        (r#"{"type":"worker.complete","id":1}"#, "bad_request"),
        (r#"{"type":"submit"}"#, "bad_request"),
        (r#"{"type":"status"}"#, "bad_request"),
        (r#"{"type":"status","job":"H:nope:1"}"#, "unknown_job"),
    ];
    for (text, code) in cases {
        send(&mut ws, text);
        let reply = recv_json(&mut ws);
        assert_eq!(reply["type"], "error", "{text}");
        assert_eq!(reply["code"], code, "{text}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(recv_json(&mut ws)["code"], "binary");
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"still here"}"#);
    assert_eq!(recv(&mut ws), "got it!");
}

fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

#[test]
fn oversized_message_is_closed_with_1009() {
    let s = server(&["--max-message-bytes", "65536"]);
    let mut ws = connect(&s.url());
    let big = format!(r#"{{"type":"worker.complete","id":1,"value":"{}"}}"#, "x".repeat(100 * 1024));
    // The server may close before the whole message is written; either way the code is 1009.
    let _ = ws.send(Message::text(big));
    assert_eq!(close_code(&mut ws), Some(CloseCode::Size));
}

#[test]
fn invalid_utf8_text_is_closed_with_1007() {
    let s = server(&[]);
    let mut ws = connect(&s.url());
    // tungstenite's client refuses to send bad UTF-8 as text, so write the frame by hand.
    let frame = [0x81u8, 0x82, 0, 0, 0, 0, 0xff, 0xfe];
    if let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_mut() {
        sock.write_all(&frame).unwrap();
    }
    assert_eq!(close_code(&mut ws), Some(CloseCode::Invalid));
}

#[test]
fn garbage_gets_400_and_silence_gets_closed_after_the_handshake_timeout() {
    let s = server(&["--handshake-timeout-ms", "300"]);
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").unwrap();
    let mut text = String::new();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    let mut quiet = TcpStream::connect(s.addr).unwrap();
    quiet.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = std::time::Instant::now();
    let mut text = String::new();
    let _ = quiet.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(250));
}

#[test]
fn http_routes() {
    let s = server(&[]);
    let (status, body) = s.http("GET", "/healthz");
    assert_eq!(status, 503, "no gearmand is connected");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unavailable");
    assert_ne!(health["gearmand"][0]["state"], "connected");
    assert_eq!(s.http("GET", "/nope").0, 404);
    assert_eq!(s.http("POST", "/healthz").0, 405);
    let (status, body) = s.http("GET", "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE gearsock_connections_open gauge"));
}

#[test]
fn thousand_concurrent_connections_each_round_trip_and_the_count_returns_to_zero() {
    let s = server(&[]);
    let mut clients: Vec<Ws> = (0..1000).map(|_| connect(&s.url())).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        send(ws, &format!(r#"{{"type":"worker.complete","id":{i},"value":"v"}}"#));
    }
    for ws in clients.iter_mut() {
        assert_eq!(recv(ws), "got it!");
    }
    assert_eq!(s.metric("gearsock_connections_open"), 1000.0 + 1.0, "the /metrics request counts itself");
    for ws in clients.iter_mut() {
        let _ = ws.close(None);
    }
    // Half leave politely, the rest just drop their sockets.
    drop(clients);
    wait_for("connections to drop to the metrics request alone", Duration::from_secs(10), || {
        s.metric("gearsock_connections_open") == 1.0
    });
}

#[test]
fn abrupt_disconnect_mid_frame_leaves_the_server_unharmed() {
    let s = server(&[]);
    for _ in 0..20 {
        let mut ws = connect(&s.url());
        if let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_mut() {
            // A frame header announcing 100 bytes, then only 3 of them.
            sock.write_all(&[0x81, 0x80 | 100, 0, 0, 0, 0, b'a', b'b', b'c']).unwrap();
        }
    }
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"x"}"#);
    assert_eq!(recv(&mut ws), "got it!");
    wait_for("aborted connections reaped", Duration::from_secs(10), || {
        s.metric("gearsock_connections_open") == 2.0
    });
}

#[test]
fn a_client_that_never_reads_is_dropped_and_memory_stays_bounded() {
    let s = server(&["--client-out-limit-bytes", "262144"]);
    let mut ws = connect(&s.url());
    let sock = match ws.get_mut() {
        tungstenite::stream::MaybeTlsStream::Plain(sock) => sock.try_clone().unwrap(),
        _ => unreachable!(),
    };
    let rss_before = rss_kib(s.proc.pid());
    // Keep sending requests, never read a reply: the replies pile up in the server.
    let msg = r#"{"type":"worker.complete","id":1,"value":"v"}"#;
    let mut w = tungstenite::WebSocket::from_raw_socket(sock, tungstenite::protocol::Role::Client, None);
    let mut sent = 0;
    let mut broke = false;
    for _ in 0..2_000_000 {
        if w.send(Message::text(msg)).is_err() {
            broke = true;
            break;
        }
        sent += 1;
    }
    assert!(broke, "the server kept accepting {sent} requests from a client that never reads");
    let rss_after = rss_kib(s.proc.pid());
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    // And the server still serves others.
    let mut other = connect(&s.url());
    send(&mut other, msg);
    assert_eq!(recv(&mut other), "got it!");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let mut s = server(&[]);
    let mut clients: Vec<Ws> = (0..5).map(|_| connect(&s.url())).collect();
    for ws in clients.iter_mut() {
        send(ws, r#"{"type":"worker.complete","id":1,"value":"v"}"#);
        assert_eq!(recv(ws), "got it!");
    }
    s.proc.signal("TERM");
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws), Some(CloseCode::Away));
    }
    drop(clients);
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn connections_over_the_limit_are_refused_cleanly() {
    let s = server(&["--max-connections", "3"]);
    let mut held: Vec<Ws> = (0..3).map(|_| connect(&s.url())).collect();
    match tungstenite::connect(s.url()) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected a 503 refusal, got {:?}", other.map(|_| ())),
    }
    // Room again once one leaves.
    let _ = held[0].close(None);
    let _ = held[0].read();
    held.remove(0);
    wait_for("a slot to free up", Duration::from_secs(5), || tungstenite::connect(s.url()).is_ok());
}

#[test]
fn worker_complete_needs_the_token_when_one_is_set() {
    let s = server(&["--worker-token", "s3cret"]);
    let mut ws = connect(&s.url());
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"v"}"#);
    assert_eq!(recv_json(&mut ws)["code"], "forbidden");
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"v","token":"s3cret"}"#);
    assert_eq!(recv(&mut ws), "got it!");
}

#[test]
fn a_silent_client_gets_a_keepalive_ping_then_close_1001() {
    let s = server(&["--idle-timeout-ms", "200"]);
    let ws = connect(&s.url());
    let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_ref() else { unreachable!() };
    let mut sock = sock.try_clone().unwrap();
    // Read nothing (so no pong is sent) until the server has given up on us.
    std::thread::sleep(Duration::from_millis(700));
    let mut got = Vec::new();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock.read_to_end(&mut got);
    assert_eq!(got.first(), Some(&0x89), "a ping comes first: {got:?}");
    let close = got.iter().position(|b| *b == 0x88).expect("then a close frame");
    assert_eq!(&got[close + 2..close + 4], &[0x03, 0xe9], "with code 1001: {got:?}");
}

#[test]
fn a_client_that_answers_pings_stays_connected_past_the_idle_timeout() {
    let s = server(&["--idle-timeout-ms", "200"]);
    let mut ws = connect(&s.url());
    let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_ref() else { unreachable!() };
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = std::time::Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1000) {
        // tungstenite answers each ping with a pong on its next read.
        match ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection ended: {e}"),
        }
    }
    assert!(pings >= 2, "keepalive pings: {pings}");
    if let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_ref() {
        sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    send(&mut ws, r#"{"type":"worker.complete","id":1,"value":"v"}"#);
    assert_eq!(recv(&mut ws), "got it!");
}
