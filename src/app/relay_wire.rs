//! The relay's wire: how an attach that landed on one instance reaches the job's owner, and how
//! the owner's reply texts come back, as background jobs of the instances' report desks
//! (`gearsock.report.<id>`, see [`super::reports`]).
//!
//! A relay message is a desk job whose unique is `@<sender id>.<relay id>.<n>`: `@` is never a
//! character of an instance id, so no forwarded report has such a unique (a report's unique
//! starts with its owner's id, even under `--shared-uniques` no report with an `@` unique is
//! forwarded); the relay id is the requester's, drawn when the attach arrived; `n` counts the
//! messages of one direction of one relay from 0, so every unique differs (gearmand would
//! coalesce two queued background jobs with the same unique) and the receiver can put them back
//! in order. The payload is one kind byte, then records:
//!
//! ```text
//!   payload = kind record*          kind: 'a' attach, 'd' detach, 'p' probe (requester -> owner)
//!                                         't' texts, 'f' texts then end,
//!                                         'x' texts then end, out of order (owner -> requester)
//!   record  = ('=' | '+') len ':' bytes     '=' ends a text, '+' is a piece of a longer one
//! ```
//!
//! A text longer than one message is cut into pieces, so no desk job is over the desk's body
//! limit (`--max-job-bytes`). Must not: keep state (the relay tables do, in [`super::relay`]).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::fields::{Ref, Scalar};

/// First byte of every relay message's unique.
pub(super) const MARK: u8 = b'@';
/// Characters of a relay id (72 random bits).
pub(super) const RELAY_ID_CHARS: usize = 12;
/// A relay id: characters of the id alphabet.
pub(super) type RelayId = [u8; RELAY_ID_CHARS];
/// The relay id of every probe and its answer: fixed, so that a probe still queued for an
/// instance that is down coalesces with the next one in gearmand (same function, same unique),
/// and `~` is no character of a drawn id, so no relay of a client has it.
pub(super) const PROBE_RELAY: RelayId = *b"~probe~~~~~~";
/// Room a message's payload leaves for the desk job's handle, function and unique within the
/// desk's body limit.
const ENVELOPE_BYTES: usize = 512;
/// The smallest and largest payload of one relay message.
const MIN_PAYLOAD: usize = 256;
const MAX_PAYLOAD: usize = 1 << 20;

/// What a relay message asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Requester → owner: attach this job for relay `r` (one record, [`RemoteAttach`] as JSON).
    Attach,
    /// Requester → owner: relay `r`'s client has gone (or never was); stop sending.
    Detach,
    /// Requester → owner: are you serving your desk? (relay [`PROBE_RELAY`], no records); the
    /// owner answers with an empty `Last` for the same relay.
    Probe,
    /// Owner → requester: texts for the client.
    Texts,
    /// Owner → requester: the last texts; the relay is over.
    Last,
    /// Owner → requester: the relay is over now, whatever came before it (its link was lost,
    /// so earlier messages may never arrive).
    Abort,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Attach => b'a',
            Kind::Detach => b'd',
            Kind::Probe => b'p',
            Kind::Texts => b't',
            Kind::Last => b'f',
            Kind::Abort => b'x',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            b'a' => Kind::Attach,
            b'd' => Kind::Detach,
            b'p' => Kind::Probe,
            b't' => Kind::Texts,
            b'f' => Kind::Last,
            b'x' => Kind::Abort,
            _ => return None,
        })
    }
}

/// Where a relay message came from: the sender's instance id, the relay, its number.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Address<'a> {
    pub sender: &'a str,
    pub relay: RelayId,
    pub n: u64,
}

/// The unique of message `n` of `relay` sent by instance `sender`.
pub(super) fn unique(sender: &str, relay: &RelayId, n: u64) -> Vec<u8> {
    let mut u = Vec::with_capacity(1 + sender.len() + 1 + RELAY_ID_CHARS + 1 + 20);
    u.push(MARK);
    u.extend_from_slice(sender.as_bytes());
    u.push(b'.');
    u.extend_from_slice(relay);
    u.push(b'.');
    u.extend_from_slice(n.to_string().as_bytes());
    u
}

/// Whether a desk job's unique is a relay message's (rather than a forwarded report's).
pub(super) fn is_relay(unique: &[u8]) -> bool {
    unique.first() == Some(&MARK)
}

/// Reads a relay message's unique back; None when it is not one of ours.
pub(super) fn parse_unique(unique: &[u8]) -> Option<Address<'_>> {
    let rest = std::str::from_utf8(unique.strip_prefix(&[MARK])?).ok()?;
    let (sender, rest) = rest.split_once('.')?;
    let (relay, n) = rest.split_once('.')?;
    let relay: RelayId = relay.as_bytes().try_into().ok()?;
    if !crate::random::is_instance_id(sender) || n.len() > 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Address { sender, relay, n: n.parse().ok()? })
}

/// The largest payload of one message for a desk whose body limit is `max_job_bytes`.
pub(super) fn max_payload(max_job_bytes: usize) -> usize {
    max_job_bytes.saturating_sub(ENVELOPE_BYTES).clamp(MIN_PAYLOAD, MAX_PAYLOAD)
}

/// One message's payload being filled with texts.
#[derive(Debug)]
pub(super) struct Payload {
    bytes: Vec<u8>,
}

impl Payload {
    pub(super) fn new(kind: Kind) -> Payload {
        Payload { bytes: vec![kind.byte()] }
    }

    /// Makes this the last message of its relay (`Last`, or `Abort`).
    pub(super) fn set_kind(&mut self, kind: Kind) {
        self.bytes[0] = kind.byte();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Adds as much of `text[*from..]` as fits within `max` bytes (at least one byte of it,
    /// when the payload is still empty, so a small `max` still makes progress); `*from` moves
    /// past what was added. Returns true when the text is complete in this payload.
    pub(super) fn push(&mut self, text: &[u8], from: &mut usize, max: usize) -> bool {
        let rest = &text[*from..];
        // The record's head: a mark, at most 20 digits and a colon.
        let room = max.saturating_sub(self.bytes.len() + 22);
        let take = if rest.len() <= room { rest.len() } else { room.max(usize::from(self.bytes.len() == 1)) };
        let whole = take == rest.len();
        if take == 0 && !whole {
            return false;
        }
        self.bytes.push(if whole { b'=' } else { b'+' });
        let _ = write!(Digits(&mut self.bytes), "{take}:");
        self.bytes.extend_from_slice(&rest[..take]);
        *from += take;
        whole
    }

    /// Whether it is its relay's last message.
    pub(super) fn is_last(&self) -> bool {
        self.bytes[0] == Kind::Last.byte()
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Writes formatted digits into a byte vector.
struct Digits<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Digits<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// One record of a payload: bytes of a text, and whether they end it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record<'a> {
    pub bytes: &'a [u8],
    pub ends_text: bool,
}

/// A payload that does not read as the wire says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed;

/// Reads a payload: its kind and records.
pub(super) fn parse(payload: &[u8]) -> Result<(Kind, Vec<Record<'_>>), Malformed> {
    let (&kind, mut rest) = payload.split_first().ok_or(Malformed)?;
    let kind = Kind::from_byte(kind).ok_or(Malformed)?;
    let mut records = Vec::new();
    while let Some((&mark, after)) = rest.split_first() {
        let ends_text = match mark {
            b'=' => true,
            b'+' => false,
            _ => return Err(Malformed),
        };
        let colon = after.iter().take(21).position(|&b| b == b':').ok_or(Malformed)?;
        let digits = std::str::from_utf8(&after[..colon]).map_err(|_| Malformed)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Malformed);
        }
        let len: usize = digits.parse().map_err(|_| Malformed)?;
        let body = &after[colon + 1..];
        if body.len() < len {
            return Err(Malformed);
        }
        records.push(Record { bytes: &body[..len], ends_text });
        rest = &body[len..];
    }
    Ok((kind, records))
}

/// Puts a text's pieces back together, within a bound.
#[derive(Debug, Default)]
pub(super) struct Assembler {
    partial: Vec<u8>,
}

/// A text over the assembler's bound.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TooLong;

impl Assembler {
    /// Adds a record; returns the text it completes, if it does. A text over `max` bytes (or
    /// not UTF-8) is refused.
    pub(super) fn add(&mut self, record: &Record<'_>, max: usize) -> Result<Option<String>, TooLong> {
        if self.partial.len() + record.bytes.len() > max {
            self.partial = Vec::new();
            return Err(TooLong);
        }
        self.partial.extend_from_slice(record.bytes);
        if !record.ends_text {
            return Ok(None);
        }
        let text = std::mem::take(&mut self.partial);
        String::from_utf8(text).map(Some).map_err(|_| TooLong)
    }
}

/// What an attach relayed to the job's owner carries: the client's fields and, with client
/// tokens, the `sub` the requester authenticated.
#[derive(Debug, PartialEq)]
pub(super) struct RemoteAttach {
    pub job: String,
    pub resume: String,
    pub after: u64,
    pub reference: Option<Ref>,
    pub sub: Option<String>,
}

/// The JSON of a [`RemoteAttach`] (keys in alphabetical order).
#[derive(Serialize)]
struct AttachOut<'a> {
    after: u64,
    job: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Ref>,
    resume: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
}

#[derive(Deserialize)]
struct AttachIn<'a> {
    after: u64,
    job: String,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<Scalar<'a>>,
    resume: String,
    #[serde(default)]
    sub: Option<String>,
}

impl RemoteAttach {
    /// The payload of an `Attach` message.
    pub(super) fn payload(&self) -> Vec<u8> {
        let out = AttachOut {
            after: self.after,
            job: &self.job,
            reference: self.reference.as_ref(),
            resume: &self.resume,
            sub: self.sub.as_deref(),
        };
        let json = serde_json::to_vec(&out).unwrap_or_default();
        let mut payload = Payload::new(Kind::Attach);
        payload.push(&json, &mut 0, usize::MAX);
        payload.into_bytes()
    }

    /// Reads an `Attach` message's records back.
    pub(super) fn from_records(records: &[Record<'_>]) -> Option<RemoteAttach> {
        let [record] = records else { return None };
        let a: AttachIn<'_> = serde_json::from_slice(record.bytes).ok()?;
        let reference = match a.reference {
            Some(field) => Some(Ref::from_field(field)?),
            None => None,
        };
        Some(RemoteAttach { job: a.job, resume: a.resume, after: a.after, reference, sub: a.sub })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unique_names_sender_relay_and_number_and_never_an_instance() {
        let relay: RelayId = *b"AbCdEf-_0123";
        let u = unique("gs-1", &relay, 42);
        assert_eq!(u, b"@gs-1.AbCdEf-_0123.42");
        assert!(is_relay(&u) && u.len() <= 63);
        assert_eq!(parse_unique(&u), Some(Address { sender: "gs-1", relay, n: 42 }));
        let longest = unique(&"x".repeat(16), &relay, u64::MAX);
        assert!(longest.len() <= 63, "{}", longest.len());
        assert_eq!(parse_unique(&longest).map(|a| a.n), Some(u64::MAX));
        for bad in [
            &b"gs-1.AbCdEf-_0123.1"[..],
            b"@gs-1.short.1",
            b"@g s.AbCdEf-_0123.1",
            b"@gs.AbCdEf-_0123.x",
            b"@",
        ] {
            assert_eq!(parse_unique(bad), None, "{:?}", bad.escape_ascii());
        }
        assert!(!crate::random::is_instance_id("@gs"), "a report's owner is never a relay's");
    }

    #[test]
    fn texts_are_batched_and_a_long_one_is_cut_into_pieces() {
        let mut p = Payload::new(Kind::Texts);
        assert!(p.push(b"{\"a\":1}", &mut 0, 100));
        assert!(p.push(b"two", &mut 0, 100));
        p.set_kind(Kind::Last);
        let bytes = p.into_bytes();
        assert_eq!(bytes, b"f=7:{\"a\":1}=3:two");
        let (kind, records) = parse(&bytes).unwrap();
        assert_eq!(kind, Kind::Last);
        assert_eq!(
            records,
            [Record { bytes: b"{\"a\":1}", ends_text: true }, Record { bytes: b"two", ends_text: true }]
        );

        // A text over one message's room goes out in pieces, each payload within `max`.
        let long: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
        let (mut from, mut payloads) = (0, Vec::new());
        loop {
            let mut p = Payload::new(Kind::Texts);
            let done = p.push(&long, &mut from, 300);
            assert!(p.len() <= 300);
            payloads.push(p.into_bytes());
            if done {
                break;
            }
        }
        assert!(payloads.len() >= 4);
        let mut asm = Assembler::default();
        let mut out = Vec::new();
        for p in &payloads {
            for r in parse(p).unwrap().1 {
                out.extend(asm.add(&r, 2000).unwrap());
            }
        }
        assert_eq!(out, [String::from_utf8(long.clone()).unwrap()]);
        // The assembler's bound holds over pieces.
        let mut asm = Assembler::default();
        let piece = parse(&payloads[0]).unwrap().1;
        assert_eq!(asm.add(&piece[0], 100), Err(TooLong));
        // A full payload takes no record it cannot fit, and a tiny max still moves on.
        let mut p = Payload::new(Kind::Texts);
        let mut from = 0;
        assert!(!p.push(&long, &mut from, 1) && from == 1);
        assert!(!p.push(&long, &mut from, 1) && from == 1);
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for bad in [
            &b""[..],
            b"q",
            b"t=",
            b"t=5:abc",
            b"t=x:abc",
            b"t-3:abc",
            b"t=:",
            b"t=99999999999999999999999:a",
        ] {
            assert_eq!(parse(bad).map(|_| ()), Err(Malformed), "{:?}", bad.escape_ascii());
        }
        assert_eq!(parse(b"d").map(|(k, r)| (k, r.len())), Ok((Kind::Detach, 0)));
        let mut asm = Assembler::default();
        assert_eq!(asm.add(&Record { bytes: b"\xff", ends_text: true }, 10), Err(TooLong));
    }

    #[test]
    fn an_attach_carries_the_clients_fields_and_its_sub() {
        let a = RemoteAttach {
            job: "H:gm:7".into(),
            resume: "b-1.secret".into(),
            after: 3,
            reference: Some(Ref::Text("r\"1".into())),
            sub: Some("alice".into()),
        };
        let p = a.payload();
        assert!(p.starts_with(b"a="));
        let (kind, records) = parse(&p).unwrap();
        assert_eq!(kind, Kind::Attach);
        assert_eq!(RemoteAttach::from_records(&records), Some(a));
        let plain =
            RemoteAttach { job: "H:1".into(), resume: "x.y".into(), after: 0, reference: None, sub: None };
        let p = plain.payload();
        assert_eq!(RemoteAttach::from_records(&parse(&p).unwrap().1), Some(plain));
        let mut numbered = Payload::new(Kind::Attach);
        numbered.push(br#"{"after":1,"job":"j","ref":7,"resume":"r"}"#, &mut 0, 100);
        let numbered = numbered.into_bytes();
        let got = RemoteAttach::from_records(&parse(&numbered).unwrap().1).unwrap();
        assert_eq!(serde_json::to_string(&got.reference).unwrap(), "7", "a number ref stays a number");
    }
}
