//! Every text the App sends a client, as a typed [`Reply`], and the one place that turns a
//! reply into wire text ([`Reply::text`]).
//!
//! A reply borrows what it says (a job's handle, its `ref`, the worker's bytes) and is written
//! straight into its `String`, with no JSON tree in between. The wire text is fixed: object keys
//! come in alphabetical order, as the first server's `serde_json::Value` (a `BTreeMap`) wrote
//! them, and the article's four plain lines are word for word. Must not: decide what to say or
//! to whom (the App does), or count anything.

use std::borrow::Cow;

use base64::Engine;
use serde::ser::{Serialize, SerializeMap, Serializer};

use super::fields::Ref;
use super::status::Status;
use crate::metrics::ErrorCode;

/// The article's first answer to `ping`, word for word.
pub const PING_ACK: &str = "before the 'received' message";
/// The article's answer to a report that was taken.
const GOT_IT: &str = "got it!";

/// One message to a client.
#[derive(Debug)]
pub(super) enum Reply<'a> {
    /// [`PING_ACK`]: the ping was accepted, before anything is known about its job.
    PingAck,
    /// `got it!`: a worker's report was taken.
    GotIt,
    /// `job: <handle>`: gearmand no longer knows the ping's job.
    PingJob(&'a [u8]),
    /// `value: <value>`: the ping's last word, empty when no worker reported.
    PingValue(Option<&'a str>),
    /// `{"type":"error"}`: a message was refused, or a question cannot be answered.
    Error { code: ErrorCode, message: &'a str, reference: Option<&'a Ref> },
    /// `{"type":"auth.ok"}`: a client token was accepted (a refresh too).
    AuthOk { sub: &'a str, exp: u64 },
    /// `{"type":"error","code":"rate_limited"}`, with when to try again.
    RateLimited { retry_after_ms: u64, reference: Option<&'a Ref> },
    /// `{"type":"job.…"}`: news about a job. `handle` is null until gearmand named the job;
    /// `seq` is its place among the job's events (none for a ping's, or a status answer).
    Job { handle: Option<&'a [u8]>, news: JobNews<'a>, reference: Option<&'a Ref>, seq: Option<u64> },
    /// `{"type":"job.attached"}`: an `attach` was taken; `seq` is the job's last so far.
    Attached { handle: &'a [u8], seq: u64, reference: Option<&'a Ref> },
    /// `{"type":"job.gap"}`: the job's events `from..=to` were trimmed and will not come.
    Gap { handle: &'a [u8], from: u64, to: u64 },
    /// `{"type":"job.detached"}`: another connection attached the job; no more of it here.
    Detached { handle: &'a [u8] },
}

/// What a `job.*` reply says.
#[derive(Debug)]
pub(super) enum JobNews<'a> {
    /// `job.created`: gearmand named the job; `resume` attaches to it again (none for a ping).
    Created(Option<&'a str>),
    /// `job.status`.
    Status(Status),
    /// `job.data`: a stream job's WORK_DATA.
    Data(&'a [u8]),
    /// `job.warning`: a stream job's WORK_WARNING.
    Warning(&'a [u8]),
    /// `job.exception`: a stream job's WORK_EXCEPTION.
    Exception(&'a [u8]),
    /// `job.complete` of a stream job: the worker's result bytes.
    Result(&'a [u8]),
    /// `job.complete` of a background job: the reported value, null when none came.
    Value(Option<&'a str>),
    /// `job.failed`, and why.
    Failed(&'a str),
    /// `job.lost`: nobody will hear how the job ends, and why.
    Lost(&'a str),
}

impl Reply<'_> {
    /// The wire text. The fixed answers are borrowed: `got it!` is the reply to every report,
    /// and a `String` per message for it was a malloc and a free on the hot path.
    pub(super) fn text(&self) -> Cow<'static, str> {
        match self {
            Reply::PingAck => Cow::Borrowed(PING_ACK),
            Reply::GotIt => Cow::Borrowed(GOT_IT),
            Reply::PingJob(handle) => format!("job: {}", String::from_utf8_lossy(handle)).into(),
            Reply::PingValue(value) => format!("value: {}", value.unwrap_or("")).into(),
            Reply::Error { .. }
            | Reply::Job { .. }
            | Reply::AuthOk { .. }
            | Reply::RateLimited { .. }
            | Reply::Attached { .. }
            | Reply::Gap { .. }
            | Reply::Detached { .. } => serde_json::to_string(&Json(self))
                .expect("string keys and plain values always serialize")
                .into(),
        }
    }
}

/// A JSON reply, keys in alphabetical order (see the module comment).
struct Json<'r, 'a>(&'r Reply<'a>);

impl Serialize for Json<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self.0 {
            Reply::Error { code, message, reference } => {
                map.serialize_entry("code", code.name())?;
                map.serialize_entry("message", message)?;
                put_ref(&mut map, *reference)?;
                map.serialize_entry("type", "error")?;
            }
            Reply::AuthOk { sub, exp } => {
                map.serialize_entry("exp", exp)?;
                map.serialize_entry("sub", sub)?;
                map.serialize_entry("type", "auth.ok")?;
            }
            Reply::RateLimited { retry_after_ms, reference } => {
                map.serialize_entry("code", ErrorCode::RateLimited.name())?;
                let text = "over --max-jobs-per-second; try again after retry_after_ms";
                map.serialize_entry("message", text)?;
                put_ref(&mut map, *reference)?;
                map.serialize_entry("retry_after_ms", retry_after_ms)?;
                map.serialize_entry("type", "error")?;
            }
            Reply::Attached { handle, seq, reference } => {
                map.serialize_entry("job", &String::from_utf8_lossy(handle))?;
                put_ref(&mut map, *reference)?;
                map.serialize_entry("seq", seq)?;
                map.serialize_entry("type", "job.attached")?;
            }
            Reply::Gap { handle, from, to } => {
                map.serialize_entry("from", from)?;
                map.serialize_entry("job", &String::from_utf8_lossy(handle))?;
                map.serialize_entry("to", to)?;
                map.serialize_entry("type", "job.gap")?;
            }
            Reply::Detached { handle } => {
                map.serialize_entry("job", &String::from_utf8_lossy(handle))?;
                map.serialize_entry("type", "job.detached")?;
            }
            Reply::Job { handle, news, reference, seq } => {
                let job = handle.map(String::from_utf8_lossy);
                let kind = match news {
                    JobNews::Created(resume) => {
                        map.serialize_entry("job", &job)?;
                        put_ref(&mut map, *reference)?;
                        if let Some(resume) = resume {
                            map.serialize_entry("resume", resume)?;
                        }
                        "job.created"
                    }
                    JobNews::Status(Status { known, running, numerator, denominator }) => {
                        map.serialize_entry("denominator", denominator)?;
                        map.serialize_entry("job", &job)?;
                        map.serialize_entry("known", known)?;
                        map.serialize_entry("numerator", numerator)?;
                        put_ref(&mut map, *reference)?;
                        map.serialize_entry("running", running)?;
                        "job.status"
                    }
                    JobNews::Data(bytes) | JobNews::Warning(bytes) | JobNews::Exception(bytes) => {
                        put_bytes(&mut map, ["data", "data_b64"], bytes)?;
                        map.serialize_entry("job", &job)?;
                        put_ref(&mut map, *reference)?;
                        match news {
                            JobNews::Data(_) => "job.data",
                            JobNews::Warning(_) => "job.warning",
                            _ => "job.exception",
                        }
                    }
                    JobNews::Result(bytes) => {
                        map.serialize_entry("job", &job)?;
                        put_ref(&mut map, *reference)?;
                        put_bytes(&mut map, ["result", "result_b64"], bytes)?;
                        "job.complete"
                    }
                    JobNews::Value(value) => {
                        map.serialize_entry("job", &job)?;
                        put_ref(&mut map, *reference)?;
                        map.serialize_entry("result", value)?;
                        "job.complete"
                    }
                    JobNews::Failed(reason) | JobNews::Lost(reason) => {
                        map.serialize_entry("job", &job)?;
                        map.serialize_entry("reason", reason)?;
                        put_ref(&mut map, *reference)?;
                        if matches!(news, JobNews::Failed(_)) { "job.failed" } else { "job.lost" }
                    }
                };
                // Every key above sorts before "seq", and "seq" before "type".
                if let Some(seq) = seq {
                    map.serialize_entry("seq", seq)?;
                }
                map.serialize_entry("type", kind)?;
            }
            Reply::PingAck | Reply::GotIt | Reply::PingJob(_) | Reply::PingValue(_) => {
                unreachable!("plain lines are written by Reply::text")
            }
        }
        map.end()
    }
}

/// A message's `ref`, when it had one, echoed as it came.
fn put_ref<M: SerializeMap>(map: &mut M, reference: Option<&Ref>) -> Result<(), M::Error> {
    match reference {
        Some(r) => map.serialize_entry("ref", r),
        None => Ok(()),
    }
}

/// Bytes as a JSON field: `names[0]` when UTF-8, `names[1]` (base64) otherwise.
fn put_bytes<M: SerializeMap>(map: &mut M, names: [&'static str; 2], bytes: &[u8]) -> Result<(), M::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => map.serialize_entry(names[0], text),
        Err(_) => {
            let b64: Cow<str> = base64::engine::general_purpose::STANDARD.encode(bytes).into();
            map.serialize_entry(names[1], &b64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(news: JobNews<'a>, reference: Option<&'a Ref>) -> Cow<'static, str> {
        Reply::Job { handle: Some(b"H:vm:1"), news, reference, seq: None }.text()
    }

    /// The wire text of every reply, byte for byte, as the first server wrote it.
    #[test]
    fn every_reply_keeps_its_wire_text() {
        let r = Ref::Text("a \"q\"".into());
        let text = |t: &str| Ref::Text(t.into());
        let number = |n: serde_json::Number| Ref::Number(n);
        let status = Status { known: true, running: false, numerator: 1, denominator: 3 };
        let cases = [
            (Reply::PingAck.text(), "before the 'received' message"),
            (Reply::GotIt.text(), "got it!"),
            (Reply::PingJob(b"H:vm:1").text(), "job: H:vm:1"),
            (Reply::PingValue(None).text(), "value: "),
            (Reply::PingValue(Some("done")).text(), "value: done"),
            (
                Reply::Error { code: ErrorCode::BadRequest, message: "say \"x\"", reference: None }.text(),
                r#"{"code":"bad_request","message":"say \"x\"","type":"error"}"#,
            ),
            (
                Reply::Error { code: ErrorCode::Unavailable, message: "m", reference: Some(&r) }.text(),
                r#"{"code":"unavailable","message":"m","ref":"a \"q\"","type":"error"}"#,
            ),
            (
                Reply::Job { handle: None, news: JobNews::Failed("no"), reference: None, seq: None }.text(),
                r#"{"job":null,"reason":"no","type":"job.failed"}"#,
            ),
            (
                job(JobNews::Created(None), Some(&text("r1"))),
                r#"{"job":"H:vm:1","ref":"r1","type":"job.created"}"#,
            ),
            (
                job(JobNews::Status(status), Some(&number(7.into()))),
                r#"{"denominator":3,"job":"H:vm:1","known":true,"numerator":1,"ref":7,"running":false,"type":"job.status"}"#,
            ),
            (job(JobNews::Data(b"\xff\0"), None), r#"{"data_b64":"/wA=","job":"H:vm:1","type":"job.data"}"#),
            (job(JobNews::Warning(b"w\n"), None), r#"{"data":"w\n","job":"H:vm:1","type":"job.warning"}"#),
            (
                job(JobNews::Exception("é".as_bytes()), None),
                r#"{"data":"é","job":"H:vm:1","type":"job.exception"}"#,
            ),
            (
                job(JobNews::Result(b"cba"), Some(&number(serde_json::Number::from_f64(1.5).unwrap()))),
                r#"{"job":"H:vm:1","ref":1.5,"result":"cba","type":"job.complete"}"#,
            ),
            (
                job(JobNews::Result(b"\xff"), None),
                r#"{"job":"H:vm:1","result_b64":"/w==","type":"job.complete"}"#,
            ),
            (job(JobNews::Value(None), None), r#"{"job":"H:vm:1","result":null,"type":"job.complete"}"#),
            (job(JobNews::Value(Some("v")), None), r#"{"job":"H:vm:1","result":"v","type":"job.complete"}"#),
            (
                job(JobNews::Lost("gone"), Some(&text("bg"))),
                r#"{"job":"H:vm:1","reason":"gone","ref":"bg","type":"job.lost"}"#,
            ),
            (
                Reply::Job {
                    handle: Some(b"H:vm:1"),
                    news: JobNews::Created(Some("a1.1.Xq")),
                    reference: Some(&text("r")),
                    seq: Some(1),
                }
                .text(),
                r#"{"job":"H:vm:1","ref":"r","resume":"a1.1.Xq","seq":1,"type":"job.created"}"#,
            ),
            (
                Reply::Job {
                    handle: Some(b"H:vm:1"),
                    news: JobNews::Data(b"d"),
                    reference: None,
                    seq: Some(2),
                }
                .text(),
                r#"{"data":"d","job":"H:vm:1","seq":2,"type":"job.data"}"#,
            ),
            (
                Reply::Attached { handle: b"H:vm:1", seq: 9, reference: Some(&text("x")) }.text(),
                r#"{"job":"H:vm:1","ref":"x","seq":9,"type":"job.attached"}"#,
            ),
            (
                Reply::Gap { handle: b"H:vm:1", from: 2, to: 5 }.text(),
                r#"{"from":2,"job":"H:vm:1","to":5,"type":"job.gap"}"#,
            ),
            (Reply::Detached { handle: b"H:vm:1" }.text(), r#"{"job":"H:vm:1","type":"job.detached"}"#),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
