//! `gearsock serve --echo` against real sockets: every text and binary message comes back as it
//! was sent, whatever its size or fragmentation, with the server's limits and close handling,
//! and no job protocol or gearmand behind it. `gearsock bench roundtrip --expect echo` drives it.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Bytes, Message};

const MIB: usize = 1024 * 1024;

/// The next message that is not a ping or pong.
fn next_message(ws: &mut Ws) -> Message {
    loop {
        match ws.read().expect("read") {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// The code of the server's close frame, skipping anything before it.
fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

/// Writes bytes straight to the client's socket, past tungstenite's checks.
fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    let MaybeTlsStream::Plain(sock) = ws.get_mut() else { panic!("plain TCP") };
    sock.write_all(bytes).expect("write");
}

/// A client frame (masked with a zero key, so the payload reads as it is) with first byte
/// `first` (FIN and opcode).
fn raw_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first, payload, [0; 4])
}

/// A 16 MiB connection on the client side too (tungstenite's client allows 16 MiB frames and
/// 64 MiB messages by default; the read timeout is raised for the large transfers).
fn connect_large(url: &str) -> Ws {
    let ws = connect(url);
    set_read_timeout(&ws, Duration::from_secs(60));
    ws
}

#[test]
fn text_and_binary_messages_come_back_as_they_were_sent() {
    let s = Server::start_echo(&[]);
    let mut ws = connect(&s.url());
    let messages = [
        Message::text("héllo, wörld"),
        Message::text(""),
        Message::binary(vec![0u8, 1, 0xfe, 0xff, b'\n']),
        Message::binary(Vec::new()),
        Message::text(r#"{"type":"ping"}"#), // job protocol words mean nothing here
        Message::text("x".repeat(65536)),    // the default limit itself
    ];
    for m in &messages {
        ws.send(m.clone()).expect("send");
        assert_eq!(&next_message(&mut ws), m);
    }
    // Pipelined: replies in order.
    for m in &messages {
        ws.send(m.clone()).expect("send");
    }
    for m in &messages {
        assert_eq!(&next_message(&mut ws), m);
    }
    assert_eq!(s.metric("gearsock_echoed_messages_total"), 12.0);
    // The App never saw them: no job protocol message was counted.
    assert_eq!(s.metric(r#"gearsock_messages_in_total{type="binary"}"#), 0.0);
    assert_eq!(s.metric(r#"gearsock_messages_in_total{type="ping"}"#), 0.0);
}

#[test]
fn health_and_page_say_echo_and_no_gearmand_is_needed() {
    let s = Server::start_echo(&[]);
    let (status, body) = s.http("GET", "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!((health["status"].as_str(), health["mode"].as_str()), (Some("ok"), Some("echo")), "{body}");
    assert_eq!(health["gearmand"], serde_json::json!([]), "{body}");
    let (status, page) = s.http("GET", "/");
    assert_eq!(status, 200);
    assert!(page.contains("echo"), "{page}");
    // With --echo, a --gearmand is a mistake, said at once.
    let out = Command::new(BIN).args(["serve", "--echo", "--gearmand", "127.0.0.1:4730"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gearmand"));
}

#[test]
fn a_fragmented_message_comes_back_whole_and_pings_between_fragments_get_pongs() {
    let s = Server::start_echo(&[]);
    let mut ws = connect(&s.url());
    // tungstenite's raw frame API: a text message in three fragments, a ping in between.
    let fragments =
        [(OpCode::Data(Data::Text), "frag", false), (OpCode::Data(Data::Continue), "mént", false)];
    for (opcode, text, fin) in fragments {
        ws.send(Message::Frame(Frame::message(Bytes::from(text), opcode, fin))).expect("send");
    }
    ws.send(Message::Ping(Bytes::from_static(b"between"))).expect("ping");
    let last = Frame::message(Bytes::from_static(b"ed"), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(last)).expect("send");
    assert_eq!(ws.read().expect("read"), Message::Pong(Bytes::from_static(b"between")));
    assert_eq!(ws.read().expect("read"), Message::text("fragménted"));

    // A binary message in 1-byte fragments, written byte by byte in one burst.
    let data: Vec<u8> = (0..=255u8).collect();
    let mut wire = Vec::new();
    for (i, byte) in data.iter().enumerate() {
        let opcode = if i == 0 { 0x2 } else { 0x0 };
        let fin = if i == data.len() - 1 { 0x80 } else { 0 };
        wire.extend(raw_frame(fin | opcode, &[*byte]));
    }
    write_raw(&mut ws, &wire);
    assert_eq!(next_message(&mut ws), Message::binary(data));
}

#[test]
fn a_16_mib_message_comes_back_when_the_limits_allow_it() {
    let limit = (16 * MIB).to_string();
    let s = Server::start_echo(&["--max-message-bytes", &limit, "--max-frame-bytes", &limit]);
    let mut ws = connect_large(&s.url());
    // One frame of 16 MiB of text with two- and three-byte characters in it.
    let mut text = "é€".repeat(16 * MIB / 5);
    text.push_str(&"a".repeat(16 * MIB - text.len()));
    assert_eq!(text.len(), 16 * MIB);
    let message = Message::text(text);
    ws.send(message.clone()).expect("send");
    assert!(next_message(&mut ws) == message, "the 16 MiB text came back changed");
    // The same size in binary, fragmented into 1 MiB frames.
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 253) as u8).collect();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        let opcode = if i == 0 { OpCode::Data(Data::Binary) } else { OpCode::Data(Data::Continue) };
        let fin = (i + 1) * MIB == data.len();
        ws.send(Message::Frame(Frame::message(Bytes::copy_from_slice(chunk), opcode, fin))).expect("send");
    }
    assert!(next_message(&mut ws) == Message::binary(data), "the 16 MiB binary came back changed");
    ws.send(Message::text("still open")).expect("send");
    assert_eq!(next_message(&mut ws), Message::text("still open"));
}

/// Output limits set below one message would drop every client that sends a large one, however
/// fast it reads: echo mode raises them to hold one echoed message (and what one pass can add).
#[test]
fn output_limits_grow_to_hold_the_largest_message() {
    let (limit, small) = ((16 * MIB).to_string(), (64 * 1024).to_string());
    let s = Server::start_echo(&[
        "--max-message-bytes",
        &limit,
        "--max-frame-bytes",
        &limit,
        "--client-out-soft-bytes",
        &small,
        "--client-out-hard-bytes",
        &small,
    ]);
    let mut ws = connect_large(&s.url());
    let data = vec![b'z'; 16 * MIB];
    for _ in 0..2 {
        ws.send(Message::binary(data.clone())).expect("send");
        assert!(next_message(&mut ws) == Message::binary(data.clone()), "the 16 MiB echo did not come back");
    }
    assert_eq!(s.metric("gearsock_slow_readers_dropped_total"), 0.0);
}

#[test]
fn over_the_limits_is_closed_with_1009() {
    let s = Server::start_echo(&["--max-message-bytes", "100000"]);
    // A single frame over the frame limit (65536 by default).
    let mut ws = connect(&s.url());
    let _ = ws.send(Message::binary(vec![7u8; 65537])); // the server may close while it is sent
    assert_eq!(close_code(&mut ws), Some(1009));
    // Frames under it that add up to a message over the message limit.
    let mut ws = connect(&s.url());
    let chunk = Bytes::from(vec![b'a'; 60000]);
    ws.send(Message::Frame(Frame::message(chunk.clone(), OpCode::Data(Data::Text), false))).unwrap();
    let _ = ws.send(Message::Frame(Frame::message(chunk, OpCode::Data(Data::Continue), true)));
    assert_eq!(close_code(&mut ws), Some(1009));
}

#[test]
fn close_codes() {
    let s = Server::start_echo(&[]);
    // A client's 1000 is answered with 1000, then the server hangs up.
    let mut ws = connect(&s.url());
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).expect("close");
    match ws.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    assert!(matches!(ws.read(), Err(tungstenite::Error::ConnectionClosed)));

    // Codes no endpoint may send (RFC 6455 7.4), and a 1-byte close body: 1002.
    for payload in [&[0x03, 0xe7][..], &[0x03, 0xed], &[0x03, 0xee], &[0x03, 0xf7], &[0x13, 0x88], &[0x03]] {
        let mut ws = connect(&s.url());
        write_raw(&mut ws, &raw_frame(0x88, payload));
        assert_eq!(close_code(&mut ws), Some(1002), "close body {payload:?}");
    }
    // Application codes (3000-4999) are answered with themselves.
    let mut ws = connect(&s.url());
    write_raw(&mut ws, &raw_frame(0x88, &4000u16.to_be_bytes()));
    assert_eq!(close_code(&mut ws), Some(4000));

    // Text that is not UTF-8, in one frame or split across fragments, and a close reason that
    // is not UTF-8: 1007.
    let bad_text =
        [raw_frame(0x81, &[b'a', 0xff, 0xfe]), [raw_frame(0x01, &[0xce]), raw_frame(0x80, &[0x28])].concat()];
    let bad_reason = raw_frame(0x88, &[0x03, 0xe8, 0xff]);
    for wire in bad_text.iter().chain([&bad_reason]) {
        let mut ws = connect(&s.url());
        write_raw(&mut ws, wire);
        assert_eq!(close_code(&mut ws), Some(1007), "{wire:?}");
    }

    // Protocol errors: reserved bits, a reserved opcode, an unmasked frame, a continuation
    // with nothing to continue: 1002.
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    for wire in [raw_frame(0xc1, b"x"), raw_frame(0x83, b"x"), unmasked, raw_frame(0x80, b"x")] {
        let mut ws = connect(&s.url());
        write_raw(&mut ws, &wire);
        assert_eq!(close_code(&mut ws), Some(1002), "{wire:?}");
    }
}

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let s = Server::start_echo(&[]);
    let mut ws = connect(&s.url());
    for payload in [&b""[..], b"ping?", &[0xab; 125]] {
        ws.send(Message::Ping(Bytes::copy_from_slice(payload))).expect("ping");
        assert_eq!(ws.read().expect("read"), Message::Pong(Bytes::copy_from_slice(payload)));
    }
    // A ping over 125 bytes breaks the protocol.
    write_raw(&mut ws, &raw_frame(0x89, &[0; 126]));
    assert_eq!(close_code(&mut ws), Some(1002));
}

/// A client that writes far ahead of what it reads (here: 64 MiB of echoes, twice the hard
/// output limit, before it reads any) is held back by TCP while its backlog is over the soft
/// limit, and gets every echo once it reads: it is not dropped as a slow reader.
#[test]
fn a_client_that_sends_ahead_of_its_reading_is_held_back_not_dropped() {
    let limit = MIB.to_string();
    let s = Server::start_echo(&["--max-message-bytes", &limit, "--max-frame-bytes", &limit]);
    let mut ws = connect_large(&s.url());
    let MaybeTlsStream::Plain(sock) = ws.get_ref() else { panic!("plain TCP") };
    let mut writer = sock.try_clone().expect("clone the socket");
    let count = 64;
    let (done_tx, done_rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let frame = raw_frame(0x82, &vec![b'e'; MIB]);
        for _ in 0..count {
            if writer.write_all(&frame).is_err() {
                break; // dropped; the reader below says so
            }
        }
        let _ = done_tx.send(());
    });
    // Give the writer every chance to get ahead: it finishes only if the server reads all of it
    // while nothing is read here (the server is not holding the client back).
    let _ = done_rx.recv_timeout(Duration::from_secs(3));
    for i in 0..count {
        match ws.read() {
            Ok(Message::Binary(data)) => assert!(data.len() == MIB && data.iter().all(|b| *b == b'e')),
            other => panic!("echo {i} of {count}: {other:?}"),
        }
    }
    thread.join().expect("writer");
    assert_eq!(s.metric("gearsock_slow_readers_dropped_total"), 0.0);
}

#[test]
fn shutdown_closes_echo_clients_with_1001() {
    let mut s = Server::start_echo(&[]);
    let mut ws = connect(&s.url());
    ws.send(Message::text("before")).unwrap();
    assert_eq!(next_message(&mut ws), Message::text("before"));
    s.proc.signal("TERM");
    assert_eq!(close_code(&mut ws), Some(1001));
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Runs `gearsock bench roundtrip FLAGS... --json` briefly against `url`; returns the exit
/// status and the JSON it printed.
#[cfg(feature = "bench")]
fn bench(url: &str, flags: &[&str]) -> (i32, Value) {
    let mut args = vec!["roundtrip", "--url", url, "--connections", "4", "--in-flight", "4"];
    args.extend(["--duration-s", "0.5", "--warmup-s", "0.1"]);
    args.extend_from_slice(flags);
    bench_json(&args)
}

#[test]
#[cfg(feature = "bench")]
fn bench_roundtrip_expects_each_message_back() {
    let s = Server::start_echo(&[]);
    let mut replies = 0.0;
    for flags in [&["--expect", "echo"][..], &["--expect", "echo", "--message-bytes", "4000", "--binary"]] {
        let (code, v) = bench(&s.url(), flags);
        assert_eq!(code, 0, "{flags:?}: {v}");
        let run = &v["websocket"];
        assert!(run["replies"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!((run["errors"].as_u64(), run["mismatches"].as_u64()), (Some(0), Some(0)), "{v}");
        assert_eq!(v["expect"], "echo");
        replies += run["replies"].as_f64().unwrap();
    }
    assert!(s.metric("gearsock_echoed_messages_total") >= replies);
    // The job protocol's default check fails against an echo server: the bench notices.
    let (code, v) = bench(&s.url(), &[]);
    assert_eq!(code, 1, "{v}");
    assert!(v["websocket"]["mismatches"].as_u64().unwrap() > 0, "{v}");
}
