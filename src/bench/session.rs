//! One bench connection's protocol and workload, sans-IO: bytes from the socket go in through
//! [`Session::handle_input`], measurements go into the [`Meter`], requests due go out appended
//! to the caller's buffer (so everything due on a connection leaves in one write).
//!
//! A session never touches a socket or reads the clock (`Io::now` is the driver's reading).
//! Framing and workload are separate: [`WsSession`] and [`LineSession`] carry any
//! [`Workload`] ([`Idle`], [`Roundtrip`], [`Jobs`]); [`GearmanDirect`] is the jobs baseline,
//! our `ClientSession` speaking straight to gearmand.
//!
//! Requests are encoded (and, for WebSocket, masked) once per run in a plan shared by every
//! connection; sending one is a `memcpy`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use serde::Deserialize;

use super::meter::Meter;
use super::wire::{
    self, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, encode_client_frame,
};
use crate::buf::InBuf;
use crate::gearman::client::{ClientSession, JobEvent, JobMode, JobTag, Priority};

/// Largest server frame the bench reads.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// What a session may touch while it handles input: the connection's output buffer, the
/// driver's clock reading and the thread's meter.
pub struct Io<'a> {
    /// Bytes to write to this connection; the driver writes them all at once afterwards.
    pub out: &'a mut Vec<u8>,
    /// When the driver started handling this connection's readiness.
    pub now: Instant,
    /// The thread's counters.
    pub meter: &'a mut Meter,
}

/// One connection's protocol, driven by `driver::Driver`.
///
/// ```text
/// TCP up --hello()--> [upgrading] --handle_input() sees the answer--> is_ready()
///        --begin()--> [running: handle_input() replies and sends more] --goodbye()--> closed
/// ```
pub trait Session {
    /// Appends what to send as soon as TCP is connected (the upgrade request, if any).
    fn hello(&mut self, out: &mut Vec<u8>);
    /// The connection is usable (handshake done).
    fn is_ready(&self) -> bool;
    /// Starts the workload: sends the first requests.
    fn begin(&mut self, io: &mut Io<'_>);
    /// Handles every complete unit at the start of `input`; returns how many bytes it used.
    /// An `Err` is the reason the connection is beyond use.
    fn handle_input(&mut self, input: &[u8], io: &mut Io<'_>) -> Result<usize, String>;
    /// Appends a polite goodbye (a close frame) before the driver drops the socket.
    fn goodbye(&mut self, out: &mut Vec<u8>);
}

/// What a WebSocket or line connection does with its messages.
pub trait Workload {
    /// Sends the first requests.
    fn begin(&mut self, io: &mut Io<'_>);
    /// One complete message (a line without its newline) arrived: text, or binary when
    /// [`Workload::wants_binary`] says so.
    fn on_message(&mut self, message: &[u8], io: &mut Io<'_>);
    /// Replies are binary messages (an echo of binary requests), not text.
    fn wants_binary(&self) -> bool {
        false
    }
    /// The server sent a close frame (`code` if it had one); the connection ends after this.
    fn on_close(&mut self, _code: Option<u16>, _io: &mut Io<'_>) {}
}

/// Where WebSocket sessions connect: the `Host` header and the path.
#[derive(Debug)]
pub struct Endpoint {
    /// `HOST:PORT`.
    pub host: String,
    /// Request path.
    pub path: String,
}

/// The handshake still to do: the key sent and the accept expected.
#[derive(Debug)]
struct Upgrade {
    key: String,
    accept: String,
}

/// A WebSocket client connection carrying workload `W`.
#[derive(Debug)]
pub struct WsSession<W> {
    endpoint: Arc<Endpoint>,
    /// `Some` until the server's 101 has been read.
    upgrade: Option<Box<Upgrade>>,
    /// For the frames this session encodes itself (pongs, close); see `wire::encode_client_frame`.
    mask: [u8; 4],
    work: W,
}

impl<W: Workload> WsSession<W> {
    /// A session whose handshake key comes from `random` and whose control frames use `mask`.
    pub fn new(endpoint: Arc<Endpoint>, random: [u8; 16], mask: [u8; 4], work: W) -> Self {
        let (key, accept) = wire::handshake_key(random);
        WsSession { endpoint, upgrade: Some(Box::new(Upgrade { key, accept })), mask, work }
    }
}

impl<W: Workload> Session for WsSession<W> {
    fn hello(&mut self, out: &mut Vec<u8>) {
        if let Some(up) = &self.upgrade {
            wire::encode_upgrade_request(out, &self.endpoint.host, &self.endpoint.path, &up.key);
        }
    }

    fn is_ready(&self) -> bool {
        self.upgrade.is_none()
    }

    fn begin(&mut self, io: &mut Io<'_>) {
        self.work.begin(io);
    }

    fn handle_input(&mut self, input: &[u8], io: &mut Io<'_>) -> Result<usize, String> {
        let mut used = 0;
        if let Some(up) = &self.upgrade {
            match wire::parse_upgrade_response(input, &up.accept)? {
                None => return Ok(0),
                Some(head) => {
                    used = head;
                    self.upgrade = None;
                }
            }
        }
        while let Some(frame) =
            wire::parse_server_frame(&input[used..], MAX_FRAME_BYTES).map_err(|e| e.to_string())?
        {
            let payload = &input[used + frame.payload_start..used + frame.len];
            match frame.opcode {
                OP_TEXT | OP_BINARY if frame.fin => {
                    if (frame.opcode == OP_BINARY) == self.work.wants_binary() {
                        self.work.on_message(payload, io);
                    } else if frame.opcode == OP_BINARY {
                        io.meter.error("binary reply");
                    } else {
                        io.meter.error("text reply");
                    }
                }
                OP_TEXT | OP_BINARY | OP_CONTINUATION => return Err("fragmented server message".into()),
                OP_PING => encode_client_frame(io.out, OP_PONG, payload, self.mask),
                OP_PONG => {}
                OP_CLOSE => {
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    self.work.on_close(code, io);
                    return Err(close_reason(payload));
                }
                other => return Err(format!("unknown opcode {other}")),
            }
            used += frame.len;
        }
        Ok(used)
    }

    fn goodbye(&mut self, out: &mut Vec<u8>) {
        if self.upgrade.is_none() {
            encode_client_frame(out, OP_CLOSE, &1000u16.to_be_bytes(), self.mask);
        }
    }
}

/// "closed by server (CODE)" from a close frame's payload.
fn close_reason(payload: &[u8]) -> String {
    match payload {
        [hi, lo, ..] => format!("closed by server ({})", u16::from_be_bytes([*hi, *lo])),
        _ => "closed by server".into(),
    }
}

/// A newline-delimited connection (the baseline echo server) carrying workload `W`.
#[derive(Debug)]
pub struct LineSession<W> {
    work: W,
}

impl<W: Workload> LineSession<W> {
    /// A session over lines.
    pub fn new(work: W) -> Self {
        LineSession { work }
    }
}

impl<W: Workload> Session for LineSession<W> {
    fn hello(&mut self, _out: &mut Vec<u8>) {}

    fn is_ready(&self) -> bool {
        true
    }

    fn begin(&mut self, io: &mut Io<'_>) {
        self.work.begin(io);
    }

    fn handle_input(&mut self, input: &[u8], io: &mut Io<'_>) -> Result<usize, String> {
        let mut used = 0;
        while let Some(len) = wire::line_len(&input[used..]) {
            self.work.on_message(&input[used..used + len - 1], io);
            used += len;
        }
        Ok(used)
    }

    fn goodbye(&mut self, _out: &mut Vec<u8>) {}
}

/// The connect mode's workload: none. Whatever arrives is ignored.
#[derive(Debug)]
pub struct Idle;

impl Workload for Idle {
    fn begin(&mut self, _io: &mut Io<'_>) {}

    fn on_message(&mut self, _message: &[u8], _io: &mut Io<'_>) {}
}

/// What a roundtrip reply must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// Any text but an `{"type":"error",...}` reply.
    AnyText,
}

impl Expect {
    /// Whether `reply` is acceptable.
    pub fn accepts(&self, reply: &[u8]) -> bool {
        match self {
            Expect::Exact(bytes) => reply == bytes.as_slice(),
            Expect::AnyText => !reply.starts_with(br#"{"type":"error""#),
        }
    }
}

/// The roundtrip workload of a whole run: one request, framed and masked once.
#[derive(Debug)]
pub struct RoundtripPlan {
    /// One complete request as it goes on the wire.
    pub request: Vec<u8>,
    /// The reply each request must get.
    pub expect: Expect,
    /// Requests outstanding per connection.
    pub in_flight: usize,
    /// Requests and replies are binary messages.
    pub binary: bool,
}

/// Keeps `in_flight` requests outstanding; replies come back in order (one server connection
/// answers its messages in order), so a FIFO of send times pairs them.
#[derive(Debug)]
pub struct Roundtrip {
    plan: Arc<RoundtripPlan>,
    sent: VecDeque<Instant>,
}

impl Roundtrip {
    /// A connection's share of `plan`.
    pub fn new(plan: Arc<RoundtripPlan>) -> Self {
        let sent = VecDeque::with_capacity(plan.in_flight);
        Roundtrip { plan, sent }
    }
}

impl Workload for Roundtrip {
    fn begin(&mut self, io: &mut Io<'_>) {
        for _ in 0..self.plan.in_flight {
            io.out.extend_from_slice(&self.plan.request);
            self.sent.push_back(io.now);
        }
    }

    fn on_message(&mut self, message: &[u8], io: &mut Io<'_>) {
        let Some(sent) = self.sent.pop_front() else {
            return io.meter.error("unsolicited reply");
        };
        if self.plan.expect.accepts(message) {
            io.meter.reply(sent, io.now);
        } else {
            io.meter.mismatch();
        }
        if io.meter.may_send(io.now) {
            io.out.extend_from_slice(&self.plan.request);
            self.sent.push_back(io.now);
        }
    }

    fn wants_binary(&self) -> bool {
        self.plan.binary
    }
}

/// The jobs workload of a whole run: one submit per slot, each with its own `ref`.
#[derive(Debug)]
pub struct JobsPlan {
    /// `requests[k]` is the framed submit whose `ref` is `k`.
    pub requests: Vec<Vec<u8>>,
    /// The result a `job.complete` must carry (`None`: any).
    pub expect: Option<Vec<u8>>,
}

/// The fields of a server reply the jobs workload looks at.
#[derive(Deserialize)]
struct JobReply<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref")]
    reference: Option<u64>,
    #[serde(borrow)]
    result: Option<Cow<'a, str>>,
    result_b64: Option<String>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// Keeps one stream job outstanding per slot; `ref` names the slot, since jobs finish in any
/// order. A failed job counts as an error and its slot submits again; an `error` reply (the
/// server refused the submit, e.g. `too_many_jobs`) frees the slot for good.
#[derive(Debug)]
pub struct Jobs {
    plan: Arc<JobsPlan>,
    sent: Vec<Option<Instant>>,
}

impl Jobs {
    /// A connection's share of `plan`.
    pub fn new(plan: Arc<JobsPlan>) -> Self {
        let sent = vec![None; plan.requests.len()];
        Jobs { plan, sent }
    }

    fn submit(&mut self, slot: usize, io: &mut Io<'_>) {
        if io.meter.may_send(io.now) {
            io.out.extend_from_slice(&self.plan.requests[slot]);
            self.sent[slot] = Some(io.now);
        }
    }

    /// The slot a reply names, if it is one of ours that is outstanding; takes its send time.
    fn take_slot(&mut self, reference: Option<u64>) -> Option<(usize, Instant)> {
        let slot = usize::try_from(reference?).ok()?;
        Some((slot, self.sent.get_mut(slot)?.take()?))
    }
}

impl Workload for Jobs {
    fn begin(&mut self, io: &mut Io<'_>) {
        for slot in 0..self.sent.len() {
            self.submit(slot, io);
        }
    }

    fn on_message(&mut self, message: &[u8], io: &mut Io<'_>) {
        let Ok(reply) = serde_json::from_slice::<JobReply<'_>>(message) else {
            return io.meter.error("unexpected reply");
        };
        match reply.kind.as_ref() {
            "job.created" | "job.data" | "job.status" | "job.warning" => {}
            "job.complete" => {
                let Some((slot, sent)) = self.take_slot(reply.reference) else {
                    return io.meter.error("reply for no outstanding job");
                };
                let good = match &self.plan.expect {
                    None => true,
                    Some(want) => match (&reply.result, &reply.result_b64) {
                        (Some(text), _) => text.as_bytes() == want.as_slice(),
                        (None, Some(b64)) => {
                            base64::engine::general_purpose::STANDARD.decode(b64).ok().as_ref() == Some(want)
                        }
                        (None, None) => false,
                    },
                };
                if good {
                    io.meter.reply(sent, io.now);
                } else {
                    io.meter.mismatch();
                }
                self.submit(slot, io);
            }
            kind @ ("job.failed" | "job.exception" | "job.lost") => {
                io.meter.error(kind);
                if let Some((slot, _)) = self.take_slot(reply.reference) {
                    self.submit(slot, io);
                }
            }
            "error" => {
                io.meter.error(&format!("error:{}", reply.code.as_deref().unwrap_or("?")));
                self.take_slot(reply.reference);
            }
            _ => io.meter.error("unexpected reply"),
        }
    }
}

/// The jobs baseline's plan: the same function and payload, straight to gearmand.
#[derive(Debug)]
pub struct GearmanPlan {
    /// Gearman function.
    pub function: Vec<u8>,
    /// Workload.
    pub payload: Vec<u8>,
    /// The WORK_COMPLETE data expected (`None`: any).
    pub expect: Option<Vec<u8>>,
    /// Jobs outstanding per connection.
    pub in_flight: usize,
}

/// A direct Gearman client: our [`ClientSession`] keeping `in_flight` foreground SUBMIT_JOBs
/// outstanding, tagged by slot, counting WORK_COMPLETE.
#[derive(Debug)]
pub struct GearmanDirect {
    plan: Arc<GearmanPlan>,
    session: ClientSession,
    input: InBuf,
    sent: Vec<Option<Instant>>,
}

impl GearmanDirect {
    /// A connection's share of `plan`.
    pub fn new(plan: Arc<GearmanPlan>) -> Self {
        let sent = vec![None; plan.in_flight];
        GearmanDirect {
            plan,
            session: ClientSession::new(MAX_FRAME_BYTES),
            input: InBuf::new(MAX_FRAME_BYTES),
            sent,
        }
    }

    fn submit(&mut self, slot: usize, io: &mut Io<'_>) {
        if io.meter.may_send(io.now) {
            let (function, payload) = (&self.plan.function, &self.plan.payload);
            let tag = JobTag(slot as u64);
            self.session.submit(tag, function, b"", payload, JobMode::Foreground, Priority::Normal, io.out);
            self.sent[slot] = Some(io.now);
        }
    }

    fn take_slot(&mut self, tag: JobTag) -> Option<(usize, Instant)> {
        let slot = usize::try_from(tag.0).ok()?;
        Some((slot, self.sent.get_mut(slot)?.take()?))
    }
}

impl Session for GearmanDirect {
    fn hello(&mut self, out: &mut Vec<u8>) {
        // The server's gearmand links start the same way (OPTION_REQ exceptions).
        self.session.start(out);
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn begin(&mut self, io: &mut Io<'_>) {
        for slot in 0..self.sent.len() {
            self.submit(slot, io);
        }
    }

    fn handle_input(&mut self, input: &[u8], io: &mut Io<'_>) -> Result<usize, String> {
        self.input.extend(input);
        self.session.handle_input(&mut self.input).map_err(|e| format!("gearman: {e}"))?;
        while let Some(event) = self.session.poll_event() {
            match event {
                JobEvent::Complete { tag, data } => {
                    let Some((slot, sent)) = self.take_slot(tag) else { continue };
                    if self.plan.expect.as_ref().is_none_or(|want| *want == data) {
                        io.meter.reply(sent, io.now);
                    } else {
                        io.meter.mismatch();
                    }
                    self.submit(slot, io);
                }
                JobEvent::Failed { tag }
                | JobEvent::Exception { tag, .. }
                | JobEvent::TooLarge { tag, .. } => {
                    io.meter.error("job.failed");
                    if let Some((slot, _)) = self.take_slot(tag) {
                        self.submit(slot, io);
                    }
                }
                JobEvent::Rejected { tag, code, .. } => {
                    io.meter.error(&format!("error:{code}"));
                    self.take_slot(tag);
                }
                JobEvent::Created { .. }
                | JobEvent::Forwarded { .. }
                | JobEvent::Data { .. }
                | JobEvent::Warning { .. }
                | JobEvent::Status { .. }
                | JobEvent::StatusRes { .. }
                | JobEvent::StatusFailed { .. } => {}
            }
        }
        self.input.release();
        Ok(input.len())
    }

    fn goodbye(&mut self, _out: &mut Vec<u8>) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gearman::packet::{PacketType, encode_response};

    const MASK: [u8; 4] = [9, 8, 7, 6];

    fn text_frame(text: &str) -> Vec<u8> {
        let mut f = vec![0x81, text.len() as u8];
        f.extend_from_slice(text.as_bytes());
        f
    }

    fn upgraded<W: Workload>(work: W) -> (WsSession<W>, Vec<u8>) {
        let endpoint = Arc::new(Endpoint { host: "h:1".into(), path: "/".into() });
        let mut s = WsSession::new(endpoint, [3; 16], MASK, work);
        let mut out = Vec::new();
        s.hello(&mut out);
        let accept = s.upgrade.as_ref().map(|u| u.accept.clone()).unwrap();
        let answer = format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        (s, answer.into_bytes())
    }

    /// Feeds `wire` one byte more at a time, as a driver with tiny reads would; returns output.
    fn feed(s: &mut impl Session, wire: &[u8], meter: &mut Meter, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for byte in wire {
            pending.push(*byte);
            let mut io = Io { out: &mut out, now, meter: &mut *meter };
            let used = s.handle_input(&pending, &mut io).expect("no failure");
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "all input used");
        out
    }

    fn roundtrip_plan(in_flight: usize) -> Arc<RoundtripPlan> {
        let mut request = Vec::new();
        encode_client_frame(&mut request, OP_TEXT, b"hi", MASK);
        Arc::new(RoundtripPlan {
            request,
            expect: Expect::Exact(b"got it!".to_vec()),
            in_flight,
            binary: false,
        })
    }

    #[test]
    fn roundtrip_checks_replies_and_sends_one_more_per_reply() {
        let t0 = Instant::now();
        let plan = roundtrip_plan(2);
        let (mut s, mut wire) = upgraded(Roundtrip::new(plan.clone()));
        let mut meter = Meter::default();
        meter.set_window(t0, t0 + Duration::from_secs(10));
        assert!(feed(&mut s, &wire, &mut meter, t0).is_empty());
        assert!(s.is_ready());
        let mut out = Vec::new();
        s.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        assert_eq!(out, plan.request.repeat(2));
        wire = [text_frame("got it!"), text_frame("nope")].concat();
        let out = feed(&mut s, &wire, &mut meter, t0 + Duration::from_millis(1));
        assert_eq!(out, plan.request.repeat(2));
        assert_eq!((meter.replies, meter.measured, meter.mismatches, meter.errors), (1, 1, 1, 1));
    }

    #[test]
    fn binary_roundtrips_take_binary_replies_and_count_text_ones_as_errors() {
        let t0 = Instant::now();
        let mut request = Vec::new();
        encode_client_frame(&mut request, OP_BINARY, &[0, 1, 255], MASK);
        let expect = Expect::Exact(vec![0, 1, 255]);
        let plan = Arc::new(RoundtripPlan { request, expect, in_flight: 1, binary: true });
        let (mut s, answer) = upgraded(Roundtrip::new(plan.clone()));
        let mut meter = Meter::default();
        meter.set_window(t0, t0 + Duration::from_secs(10));
        feed(&mut s, &answer, &mut meter, t0);
        let mut out = Vec::new();
        s.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        assert_eq!(out, plan.request);
        let wire = [vec![0x82, 3, 0, 1, 255], text_frame("\u{0}\u{1}")].concat();
        let out = feed(&mut s, &wire, &mut meter, t0 + Duration::from_millis(1));
        assert_eq!(out, plan.request, "one more request per reply");
        assert_eq!((meter.replies, meter.mismatches), (1, 0));
        assert_eq!(meter.error_kinds.keys().collect::<Vec<_>>(), ["text reply"]);
    }

    #[test]
    fn pings_get_masked_pongs_and_close_ends_the_session() {
        let t0 = Instant::now();
        let (mut s, answer) = upgraded(Idle);
        let mut meter = Meter::default();
        let wire = [answer, vec![0x89, 0x02, b'h', b'i']].concat();
        let out = feed(&mut s, &wire, &mut meter, t0);
        let mut pong = Vec::new();
        encode_client_frame(&mut pong, OP_PONG, b"hi", MASK);
        assert_eq!(out, pong);
        let mut io = Io { out: &mut Vec::new(), now: t0, meter: &mut meter };
        let err = s.handle_input(&[0x88, 0x02, 0x03, 0xE9], &mut io).unwrap_err();
        assert_eq!(err, "closed by server (1001)");
    }

    #[test]
    fn a_refused_upgrade_is_a_failure() {
        let (mut s, _) = upgraded(Idle);
        let mut meter = Meter::default();
        let mut io = Io { out: &mut Vec::new(), now: Instant::now(), meter: &mut meter };
        let err = s.handle_input(b"HTTP/1.1 503 Busy\r\n\r\n", &mut io).unwrap_err();
        assert_eq!(err, "handshake: HTTP 503");
    }

    #[test]
    fn jobs_match_replies_by_ref() {
        let t0 = Instant::now();
        let requests = (0..2).map(|k| format!("submit {k}").into_bytes()).collect();
        let plan = Arc::new(JobsPlan { requests, expect: Some(b"abc".to_vec()) });
        let mut jobs = Jobs::new(plan);
        let mut meter = Meter::default();
        let mut out = Vec::new();
        jobs.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        assert_eq!(out, b"submit 0submit 1");
        out.clear();
        let mut io = Io { out: &mut out, now: t0 + Duration::from_millis(2), meter: &mut meter };
        for reply in [
            r#"{"type":"job.created","job":"H:x:1","ref":1}"#,
            r#"{"type":"job.complete","job":"H:x:1","result":"abc","ref":1}"#,
            r#"{"type":"job.failed","job":"H:x:2","reason":"x","ref":0}"#,
            r#"{"type":"job.complete","job":"H:x:3","result":"abc","ref":0}"#,
            r#"{"type":"job.complete","job":"H:x:3","result":"abc","ref":7}"#,
            r#"{"type":"error","code":"too_many_jobs","message":"m","ref":1}"#,
        ] {
            jobs.on_message(reply.as_bytes(), &mut io);
        }
        assert_eq!(out, b"submit 1submit 0submit 0");
        assert_eq!(meter.replies, 2);
        assert_eq!(
            meter.error_kinds.keys().collect::<Vec<_>>(),
            ["error:too_many_jobs", "job.failed", "reply for no outstanding job"]
        );
    }

    #[test]
    fn direct_gearman_counts_work_complete() {
        let t0 = Instant::now();
        let plan = Arc::new(GearmanPlan {
            function: b"echo".to_vec(),
            payload: b"p".to_vec(),
            expect: None,
            in_flight: 1,
        });
        let mut g = GearmanDirect::new(plan);
        let mut meter = Meter::default();
        let mut out = Vec::new();
        g.hello(&mut out);
        g.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        let mut wire = Vec::new();
        encode_response(&mut wire, PacketType::OptionRes, &[b"exceptions"]);
        encode_response(&mut wire, PacketType::JobCreated, &[b"H:g:1"]);
        encode_response(&mut wire, PacketType::WorkComplete, &[b"H:g:1", b"p"]);
        let out = feed(&mut g, &wire, &mut meter, t0 + Duration::from_millis(1));
        assert!(!out.is_empty(), "submitted again");
        assert_eq!((meter.replies, meter.errors), (1, 0));
    }

    #[test]
    fn lines_carry_the_same_workload() {
        let t0 = Instant::now();
        let plan = Arc::new(RoundtripPlan {
            request: b"hi\n".to_vec(),
            expect: Expect::Exact(b"hi".to_vec()),
            in_flight: 1,
            binary: false,
        });
        let mut s = LineSession::new(Roundtrip::new(plan));
        let mut meter = Meter::default();
        let mut out = Vec::new();
        s.begin(&mut Io { out: &mut out, now: t0, meter: &mut meter });
        let out = feed(&mut s, b"hi\n", &mut meter, t0);
        assert_eq!((out.as_slice(), meter.replies), (&b"hi\n"[..], 1));
    }

    #[test]
    fn any_text_refuses_error_replies() {
        assert!(Expect::AnyText.accepts(b"whatever"));
        assert!(!Expect::AnyText.accepts(br#"{"type":"error","code":"bad_json"}"#));
    }
}
