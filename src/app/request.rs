//! Client messages: one text frame parsed into a validated [`Request`], or the [`Refusal`]
//! that says precisely what is wrong with it.
//!
//! Every field of the wire message is optional here, so a missing one gets its own error
//! rather than serde's. The hot message, a `worker.complete` of the common shape, is read the
//! short way first (`scan`); whatever that path is not sure of it declines, and [`parse`]
//! decides, so the two give one outcome. Must not: look at the App's state (the one limit it
//! needs, the longest unique a client may send, is given), or reply (the App sends the
//! refusal, with the message's `ref`).

use std::borrow::Cow;

use base64::Engine;
use serde::Deserialize;

use super::attach::Attach;
use super::fields::{MAX_REF_BYTES, Ref, Reported, Scalar};
use super::jobs::{Kind, Submission};
use crate::gearman::client::Priority;
use crate::metrics::{ErrorCode, Message};

/// libgearman's limit on function names.
const MAX_FUNCTION_BYTES: usize = 512;
/// gearmand's job handles are at most 64 bytes (`GEARMAND_JOB_HANDLE_SIZE`): a longer `id`
/// names no job, and would only be stored.
const MAX_HANDLE_BYTES: usize = 64;
/// gearmand refuses a unique over 64 bytes (`ARGUMENT_TOO_LARGE`): a longer one names no job.
const MAX_REPORTED_UNIQUE_BYTES: usize = 64;

/// A client message; every field optional so that a missing one gets a precise error.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Scalar<'a>>,
    #[serde(borrow)]
    value: Option<Reported<'a>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    function: Option<String>,
    payload: Option<String>,
    payload_b64: Option<String>,
    #[serde(borrow)]
    mode: Option<Cow<'a, str>>,
    #[serde(borrow)]
    priority: Option<Cow<'a, str>>,
    #[serde(borrow)]
    unique: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<Scalar<'a>>,
    job: Option<String>,
    resume: Option<String>,
    #[serde(borrow)]
    after: Option<Scalar<'a>>,
}

/// A message, parsed as far as it goes.
pub(super) struct Parsed<'a> {
    /// What to count it as.
    pub message: Message,
    /// Its `ref`, echoed in every reply about it.
    pub reference: Option<Ref>,
    pub request: Result<Request<'a>, Refusal>,
}

/// What a client asked for.
pub(super) enum Request<'a> {
    /// The article's `ping`.
    Ping,
    /// A client token (`{"type":"auth","token":"<jwt>"}`).
    Auth { token: Cow<'a, str> },
    /// A job to run.
    Submit { kind: Kind, submission: Submission, unique: Option<String> },
    /// The status of a job of this connection, by handle.
    Status { handle: String },
    /// A job to follow on this connection, from a seq on.
    Attach(Attach),
    /// A worker's `worker.complete`. Whether the reporter may report is decided before what it
    /// reported is looked at, so the report stays unchecked until then.
    Report { token: Option<Cow<'a, str>>, report: Result<Report<'a>, Refusal> },
}

/// A value a worker reports, and the job it names. Borrowed from the message where it can be:
/// a report is the hot message, and most are answered without keeping anything.
pub(super) struct Report<'a> {
    pub value: Cow<'a, str>,
    pub job: JobName<'a>,
}

/// How a report names its job.
pub(super) enum JobName<'a> {
    /// The unique gearmand gave the worker (GRAB_JOB_UNIQ): one gearmand job exactly.
    Unique(Cow<'a, str>),
    /// A job handle, which several gearmands may have given out.
    Handle(Cow<'a, str>),
    /// A job handle sent as a JSON integer: spelled out by [`JobName::spell`] on the stack,
    /// not in a `String` per message.
    Number(u64),
}

impl JobName<'_> {
    /// The handle of a [`JobName::Number`], spelled as serde_json spells an integer (so a
    /// report by number names the same handle as before), in `digits`.
    pub fn spell(n: u64, digits: &mut [u8; 20]) -> &str {
        // Written from the right without the formatting machinery, which cost more than the
        // digits on the hot path; a u64 has at most 20 digits, so `at` stays in bounds.
        let (mut n, mut at) = (n, digits.len());
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        std::str::from_utf8(&digits[at..]).expect("digits are ASCII")
    }
}

/// Why a message is refused: the error code, and the text that tells the client what to fix.
#[derive(Debug)]
pub(super) struct Refusal {
    pub code: ErrorCode,
    pub text: Cow<'static, str>,
}

fn bad_request(text: impl Into<Cow<'static, str>>) -> Refusal {
    Refusal { code: ErrorCode::BadRequest, text: text.into() }
}

/// Parses one text message. `max_unique_bytes` is the longest unique a client may send.
pub(super) fn parse(text: &str, max_unique_bytes: usize) -> Parsed<'_> {
    let msg: Incoming = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            let refusal = match e.classify() {
                serde_json::error::Category::Data => bad_request(format!("message has the wrong shape: {e}")),
                _ => Refusal {
                    code: ErrorCode::BadJson,
                    text: format!("message is not valid JSON: {e}").into(),
                },
            };
            return Parsed { message: Message::Invalid, reference: None, request: Err(refusal) };
        }
    };
    let kind = msg.kind.as_deref().unwrap_or("");
    let message = Message::from_type(kind);
    let reference = match reference(msg.reference) {
        Ok(r) => r,
        Err(refusal) => return Parsed { message, reference: None, request: Err(refusal) },
    };
    let request = match kind {
        "worker.complete" => {
            Ok(Request::Report { token: msg.token, report: report(msg.value, msg.unique, msg.id) })
        }
        "ping" => Ok(Request::Ping),
        "auth" => match msg.token {
            Some(token) => Ok(Request::Auth { token }),
            None => Err(bad_request("auth needs \"token\" (a JWT your backend signed)")),
        },
        "submit" => submit(
            msg.function,
            msg.payload,
            msg.payload_b64,
            msg.mode.as_deref(),
            msg.priority.as_deref(),
            msg.unique.map(Cow::into_owned),
            max_unique_bytes,
        ),
        "status" => match msg.job {
            Some(handle) => Ok(Request::Status { handle }),
            None => Err(bad_request("status needs \"job\" (a handle this connection got)")),
        },
        "attach" => attach(msg.job, msg.resume, msg.after),
        "" if msg.kind.is_none() => Err(bad_request("missing \"type\"")),
        other => {
            let text =
                format!("unknown type {other:?}; known: ping, worker.complete, submit, status, auth, attach");
            Err(Refusal { code: ErrorCode::UnknownType, text: text.into() })
        }
    };
    Parsed { message, reference, request }
}

/// A message's `ref`: a `ref` that is not a short string or a number is refused before
/// anything else, as it would be kept as long as the job.
pub(super) fn reference(field: Option<Scalar<'_>>) -> Result<Option<Ref>, Refusal> {
    match field.map(Ref::from_field) {
        Some(None) => {
            let text = format!("\"ref\" must be a string of at most {MAX_REF_BYTES} bytes, or a number");
            Err(bad_request(text))
        }
        Some(Some(r)) => Ok(Some(r)),
        None => Ok(None),
    }
}

/// A `worker.complete`: the value (any JSON; a string is taken as it is), and the job named by
/// unique or, failing that, by handle; a unique or handle longer than gearmand gives out is
/// refused (it names no job, and would only be stored).
pub(super) fn report<'a>(
    value: Option<Reported<'a>>,
    unique: Option<Cow<'a, str>>,
    id: Option<Scalar<'a>>,
) -> Result<Report<'a>, Refusal> {
    let value = match value {
        Some(Reported(v)) => v,
        None => return Err(bad_request("worker.complete needs \"value\"")),
    };
    if let Some(unique) = unique {
        if unique.len() > MAX_REPORTED_UNIQUE_BYTES {
            let text = format!("a unique is at most {MAX_REPORTED_UNIQUE_BYTES} bytes (gearmand's limit)");
            return Err(bad_request(text));
        }
        return Ok(Report { value, job: JobName::Unique(unique) });
    }
    let handle = match id {
        Some(Scalar::Text(s)) => s,
        // At most 20 digits, well under the limit below.
        Some(Scalar::Number(n)) if let Some(n) = n.as_u64() => {
            return Ok(Report { value, job: JobName::Number(n) });
        }
        Some(Scalar::Number(n)) => Cow::Owned(n.to_string()),
        _ => {
            return Err(bad_request(
                "worker.complete needs \"unique\" (from GRAB_JOB_UNIQ) or \"id\" (a job handle)",
            ));
        }
    };
    if handle.len() > MAX_HANDLE_BYTES {
        let text = format!("a job handle (\"id\") is at most {MAX_HANDLE_BYTES} bytes (gearmand's limit)");
        return Err(bad_request(text));
    }
    Ok(Report { value, job: JobName::Handle(handle) })
}

/// An `attach`: the job's handle and resume token (from its `job.created`), and the last seq
/// the client has (none: 0, everything kept).
fn attach<'a>(
    job: Option<String>,
    resume: Option<String>,
    after: Option<Scalar>,
) -> Result<Request<'a>, Refusal> {
    let (Some(handle), Some(resume)) = (job, resume) else {
        return Err(bad_request("attach needs \"job\" and \"resume\" (both from the job's job.created)"));
    };
    let after = match after {
        None => 0,
        Some(Scalar::Number(n)) if let Some(n) = n.as_u64() => n,
        Some(_) => {
            return Err(bad_request("\"after\" must be a whole number, 0 or more (the last seq you have)"));
        }
    };
    Ok(Request::Attach(Attach { handle, resume, after }))
}

/// A `submit`, checked field by field in the order the errors have always come.
fn submit<'a>(
    function: Option<String>,
    payload: Option<String>,
    payload_b64: Option<String>,
    mode: Option<&str>,
    priority: Option<&str>,
    unique: Option<String>,
    max_unique_bytes: usize,
) -> Result<Request<'a>, Refusal> {
    let Some(function) = function.filter(|f| !f.is_empty()) else {
        return Err(bad_request("submit needs \"function\""));
    };
    if function.len() > MAX_FUNCTION_BYTES || function.contains('\0') {
        return Err(bad_request("function names are at most 512 bytes, without NUL"));
    }
    let payload = match (payload, payload_b64) {
        (Some(p), None) => p.into_bytes(),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(bytes) => bytes,
            Err(e) => return Err(bad_request(format!("payload_b64 is not base64: {e}"))),
        },
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => return Err(bad_request("send \"payload\" or \"payload_b64\", not both")),
    };
    let kind = match mode {
        None | Some("stream") => Kind::Stream,
        Some("background") => Kind::Background,
        Some(other) => {
            return Err(bad_request(format!("mode must be \"stream\" or \"background\", not {other:?}")));
        }
    };
    let priority = match priority {
        None | Some("normal") => Priority::Normal,
        Some("low") => Priority::Low,
        Some("high") => Priority::High,
        Some(other) => {
            let text = format!("priority must be \"low\", \"normal\" or \"high\", not {other:?}");
            return Err(bad_request(text));
        }
    };
    let unique = unique.filter(|u| !u.is_empty());
    if let Some(u) = &unique
        && (u.len() > max_unique_bytes || u.contains('\0'))
    {
        return Err(bad_request(format!("unique ids are at most {max_unique_bytes} bytes, without NUL")));
    }
    let submission = Submission { function: function.into_bytes(), payload, priority };
    Ok(Request::Submit { kind, submission, unique })
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;

    #[test]
    fn untrusted_peers_and_bad_messages_get_errors() {
        let t0 = Instant::now();
        let mut app = up_app();
        app.handle_client_text(B, r#"{"type":"worker.complete","id":1,"value":"x"}"#, t0);
        app.handle_client_text(A, "{nope", t0);
        app.handle_client_text(A, r#"{"type":"dance"}"#, t0);
        app.handle_client_text(A, r#"{"id":1}"#, t0);
        app.handle_client_text(A, r#"{"type":"worker.complete","value":"x"}"#, t0);
        app.handle_client_text(A, r#"{"type":"submit","ref":7}"#, t0);
        app.handle_client_text(A, "[1,2]", t0);
        let e = effects(&mut app);
        let codes: Vec<String> = sent(&e)
            .iter()
            .map(|(_, t)| serde_json::from_str::<Value>(t).unwrap()["code"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            codes,
            [
                "forbidden",
                "bad_json",
                "unknown_type",
                "bad_request",
                "bad_request",
                "bad_request",
                "bad_request"
            ]
        );
        assert!(sent(&e)[5].1.contains("\"ref\":7"));
    }

    #[test]
    fn a_ref_is_bounded_and_long_names_are_refused() {
        let t0 = Instant::now();
        let mut app = up_app();
        let zeros = format!("[{}0]", "0,".repeat(30_000));
        let long_ref = format!("\"{}\"", "r".repeat(257));
        for r in [zeros.as_str(), long_ref.as_str(), "{}", "true"] {
            app.handle_client_text(A, &format!(r#"{{"type":"submit","function":"f","ref":{r}}}"#), t0);
        }
        let long_id = format!(r#"{{"type":"worker.complete","id":"{}","value":"v"}}"#, "H".repeat(65));
        let long_unique =
            format!(r#"{{"type":"worker.complete","unique":"{}","value":"v"}}"#, "u".repeat(65));
        app.handle_client_text(A, &long_id, t0);
        app.handle_client_text(A, &long_unique, t0);
        let e = effects(&mut app);
        assert_eq!(codes(&e), ["bad_request"; 6]);
        assert!(sent(&e)[0].1.contains("\\\"ref\\\" must be"), "{}", sent(&e)[0].1);
        assert_eq!((app.jobs_in_flight(), app.stored_values()), (0, 0));
        // A number or a short string is kept and echoed as it came.
        app.handle_client_text(A, r#"{"type":"submit","function":"f","ref":1e2}"#, t0);
        app.handle_client_text(
            A,
            &format!(r#"{{"type":"submit","function":"f","ref":"{}"}}"#, "r".repeat(256)),
            t0,
        );
        let e = effects(&mut app);
        assert_eq!(submitted(&e).len(), 2);
        assert!(sent(&e).is_empty());
    }

    #[test]
    fn a_numbered_handle_is_spelled_as_serde_json_spells_the_number() {
        let mut digits = [0; 20];
        for n in [0, 1, 9, 10, 4_294_967_296, u64::MAX] {
            assert_eq!(super::JobName::spell(n, &mut digits), n.to_string());
        }
    }
}
