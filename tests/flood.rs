//! Floods of connections against the real server: a burst larger than the old accept backlog
//! while the loop is not accepting.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Gearmand, Server};

/// Connections in the burst: well over the 128 that std's and mio's `listen` ask for, and
/// under a default soft open-file limit of 1024.
const BURST: usize = 600;

#[test]
fn a_burst_of_connections_while_the_loop_is_busy_is_queued_not_dropped() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn < BURST {
        eprintln!("skipped: net.core.somaxconn is {somaxconn}, below the burst of {BURST}");
        return;
    }
    let gearmand = Gearmand::start();
    let server = Server::start(&gearmand.addr(), &[]);
    // A stopped loop accepts nothing, as a loop busy with one long pass: whatever arrives
    // meanwhile waits in the kernel's accept queue, up to the listen backlog. Beyond it the
    // kernel drops the handshake and the client waits for a SYN retransmit (1 s, 2 s, ...).
    server.proc.signal("STOP");
    let mut queued = Vec::new();
    for i in 0..BURST {
        match TcpStream::connect_timeout(&server.addr, Duration::from_millis(500)) {
            Ok(sock) => queued.push(sock),
            Err(e) => {
                server.proc.signal("CONT");
                panic!("connection {i} of {BURST} was not queued while the loop was stopped: {e}");
            }
        }
    }
    server.proc.signal("CONT");
    // Each queued connection is served once the loop runs again.
    for sock in &mut queued {
        sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        sock.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("send the upgrade");
    }
    for (i, sock) in queued.iter_mut().enumerate() {
        let mut head = [0u8; 12];
        sock.read_exact(&mut head).unwrap_or_else(|e| panic!("connection {i}: no answer: {e}"));
        assert_eq!(&head, b"HTTP/1.1 101", "connection {i}");
    }
}
