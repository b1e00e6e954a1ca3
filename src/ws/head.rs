//! The request head of a connection not yet upgraded: read, judged, and answered with the
//! 101 (the stream of the WebSocket then begins) or an HTTP error. A room of [`Ws`].

use super::output::{OutQueue, write_http_with};
use super::stream::{MemStream, Sizes};
use super::{MAX_HEAD_BYTES, MAX_HEADERS, MOVING, Upgrade, Ws, WsEvent, WsLimits, WsState};
use crate::buf::InBuf;

/// Before the upgrade: the request head as it arrives, and the answer.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) input: InBuf,
    pub(super) output: OutQueue,
}

impl Ws {
    pub(super) fn poll_head(&mut self, limits: &WsLimits, len: usize) -> Option<WsEvent> {
        let WsState::Handshaking(head) = &mut self.state else { return None };
        let input = &mut head.input;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(input.data()) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if len >= MAX_HEAD_BYTES => {
                let (status, reason) = (431, "Request Header Fields Too Large");
                return Some(self.refuse(status, reason, "request head too large", &[]));
            }
            Ok(httparse::Status::Partial) => return None,
            Err(e) => return Some(self.refuse(400, "Bad Request", &format!("malformed request: {e}"), &[])),
        };
        // Two `Host` headers make the request ambiguous (RFC 9112 3.2: answer 400), whichever
        // one a proxy in front of us looked at.
        if request.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).nth(1).is_some() {
            return Some(self.refuse(400, "Bad Request", "more than one Host header", &[]));
        }
        let method = request.method.unwrap_or("").to_string();
        let path = request.path.unwrap_or("").to_string();
        let header =
            |name: &str| request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        let has_token = |name: &str, token: &str| {
            header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
        };
        if !has_token("upgrade", "websocket") {
            self.finish();
            return Some(WsEvent::Http { method, path });
        }
        if method != "GET" {
            return Some(self.refuse(405, "Method Not Allowed", "upgrade needs GET", &[]));
        }
        if !has_token("connection", "upgrade") {
            return Some(self.refuse(400, "Bad Request", "upgrade without Connection: upgrade", &[]));
        }
        if header("sec-websocket-version") != Some(b"13") {
            // RFC 6455 4.4: say which version we speak.
            let version = [("Sec-WebSocket-Version", "13")];
            return Some(self.refuse(426, "Upgrade Required", "only WebSocket version 13", &version));
        }
        let Some(key) = header("sec-websocket-key").filter(|k| !k.is_empty()) else {
            return Some(self.refuse(400, "Bad Request", "no Sec-WebSocket-Key", &[]));
        };
        // `--allowed-origin` stops other sites' pages. A request without `Origin` is not a
        // browser's (browsers always send it on a WebSocket upgrade), so it is not refused here:
        // a worker or script is let in, and trusted or not by its address and token.
        if !limits.allowed_origins.is_empty()
            && let Some(origin) = header("origin")
        {
            let origin = std::str::from_utf8(origin).unwrap_or("");
            if !limits.allowed_origins.iter().any(|allowed| allowed == origin) {
                return Some(self.refuse(403, "Forbidden", "origin not allowed", &[]));
            }
        }
        let upgrade = Upgrade {
            origin: header("origin").map(|o| String::from_utf8_lossy(o).into_owned()),
            forwarded: ["forwarded", "x-forwarded-for", "x-real-ip"]
                .iter()
                .any(|name| header(name).is_some()),
            bearer: header("authorization")
                .and_then(|v| std::str::from_utf8(v).ok()?.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string()),
        };
        let accept = tungstenite::handshake::derive_accept_key(key);
        let WsState::Handshaking(head) = std::mem::replace(&mut self.state, MOVING) else {
            unreachable!("checked above")
        };
        let Head { mut input, mut output } = *head;
        let bytes = &mut output.bytes;
        bytes.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n");
        bytes.extend_from_slice(b"Connection: Upgrade\r\nSec-WebSocket-Accept: ");
        bytes.extend_from_slice(accept.as_bytes());
        bytes.extend_from_slice(b"\r\n\r\n");
        // Frames follow the 101 answer, which must go out whole first.
        output.kept = bytes.len();
        output.framed = true;
        // Frames the client sent right behind its request stay in the input.
        input.consume(head_len);
        let mut frames = InBuf::new(limits.in_limit_bytes);
        frames.extend(input.data());
        // No tungstenite state until the client sends its first frame.
        self.state = WsState::Quiet(Box::new(MemStream::new(frames, output, Sizes::of(limits))));
        Some(WsEvent::Opened(upgrade))
    }

    /// Answers before the upgrade with an HTTP error (plus `headers`) and ends the connection.
    pub(super) fn refuse(
        &mut self,
        status: u16,
        reason: &str,
        why: &str,
        headers: &[(&str, &str)],
    ) -> WsEvent {
        let (out, text) = (&mut self.out_queue_mut().bytes, "text/plain; charset=utf-8");
        write_http_with(out, status, reason, text, headers, format!("{why}\n").as_bytes());
        self.finish();
        WsEvent::Failed { code: status, why: why.to_string() }
    }
}
