//! What the message-path benches share: a WebSocket past its upgrade and an App with one open
//! client, as the loop has them, and the client frames a load generator sends.

use gearsock::app::{App, ConnId};
use gearsock::config::Config;
use gearsock::ws::{Ws, WsEvent, WsLimits};

/// A masked client text frame (a fixed mask, as a load generator would send).
pub fn client_frame(payload: &[u8]) -> Vec<u8> {
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

/// An open WebSocket (its 101 already taken out), its limits, and an App with that client
/// open and trusted, under the default configuration.
pub fn open_client() -> (Ws, WsLimits, App, ConnId) {
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
    (ws, limits, app, id)
}
