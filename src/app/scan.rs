//! The hot message read the short way: a `worker.complete` of the common shape, scanned byte by
//! byte into a small [`ReportMessage`] with its strings borrowed from the frame, without
//! serde's key matching over every field a message may have, and without the large
//! [`Parsed`](super::request::Parsed) the general path builds.
//!
//! What it takes: one object whose keys are only a report's (`type`, `id`, `value`, `unique`,
//! `token`, `ref`), each once and without escapes; `type` exactly `worker.complete`; strings,
//! non-negative integers of at most 19 digits and `null` where the general path takes them.
//!
//! Must not: refuse or word an error. Whatever it is not sure of (a float, a negative number,
//! an array, a key twice, a malformed message) it declines with None, and `request::parse`
//! decides and words the refusal. For what it takes, the outcome is the one `request::parse`
//! gives: the same `request::reference` and `request::report` decide it, and a unit test holds
//! the two paths together.

use std::borrow::Cow;

use super::fields::{Ref, Reported, Scalar};
use super::request::{self, Refusal, Report};

/// A `worker.complete` read by [`scan_report`]: its `ref` (or why it is refused), its token,
/// and the report.
pub(super) struct ReportMessage<'a> {
    pub reference: Result<Option<Ref>, Refusal>,
    pub token: Option<&'a str>,
    pub report: Result<Report<'a>, Refusal>,
}

/// Reads `text` if it is a report of the common shape; None sends it to `request::parse`.
pub(super) fn scan_report(text: &str) -> Option<ReportMessage<'_>> {
    let mut s = Scan { text, at: 0 };
    let mut f = Fields::default();
    // Most reports start the way the article writes them: that much is taken at once.
    const COMMON_START: &str = r#"{"type":"worker.complete","#;
    if text.starts_with(COMMON_START) {
        (s.at, f.kind) = (COMMON_START.len(), true);
    } else {
        s.skip_space();
        s.eat(b'{')?;
    }
    loop {
        s.skip_space();
        let key = s.string()?;
        let Cow::Borrowed(key) = key else { return None };
        s.skip_space();
        s.eat(b':')?;
        s.skip_space();
        let slot = match key {
            "type" => {
                if f.kind || s.string()? != "worker.complete" {
                    return None;
                }
                f.kind = true;
                None
            }
            "id" => Some(&mut f.id),
            "value" => Some(&mut f.value),
            "unique" => Some(&mut f.unique),
            "token" => Some(&mut f.token),
            "ref" => Some(&mut f.reference),
            _ => return None,
        };
        if let Some(slot) = slot {
            if slot.is_some() {
                return None; // A key twice: the general path's error.
            }
            *slot = Some(s.scalar()?);
        }
        s.skip_space();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.skip_space();
    if !f.kind || s.at != text.len() {
        return None;
    }
    f.into_message()
}

/// A scalar as the scanner reads it; anything else is declined.
enum Field<'a> {
    Null,
    Text(Cow<'a, str>),
    Whole(u64),
}

/// The keys of a report, each None until seen.
#[derive(Default)]
struct Fields<'a> {
    kind: bool,
    id: Option<Field<'a>>,
    value: Option<Field<'a>>,
    unique: Option<Field<'a>>,
    token: Option<Field<'a>>,
    reference: Option<Field<'a>>,
}

impl<'a> Fields<'a> {
    /// The fields as the general path's parts see them (`null` is a missing field there too),
    /// decided by the same functions.
    fn into_message(self) -> Option<ReportMessage<'a>> {
        let scalar = |f: Option<Field<'a>>| match f {
            None | Some(Field::Null) => None,
            Some(Field::Text(t)) => Some(Scalar::Text(t)),
            Some(Field::Whole(n)) => Some(Scalar::Number(n.into())),
        };
        // A string or nothing; a number there is the general path's error.
        let text = |f: Option<Field<'a>>| match f {
            None | Some(Field::Null) => Some(None),
            Some(Field::Text(t)) => Some(Some(t)),
            Some(Field::Whole(_)) => None,
        };
        let value = match self.value {
            None | Some(Field::Null) => None,
            Some(Field::Text(t)) => Some(Reported(t)),
            Some(Field::Whole(n)) => Some(Reported(Cow::Owned(n.to_string()))),
        };
        let unique = text(self.unique)?;
        let token = match text(self.token)? {
            None => None,
            Some(Cow::Borrowed(t)) => Some(t),
            Some(Cow::Owned(_)) => return None, // A token with escapes: rare, left to serde.
        };
        let reference = request::reference(scalar(self.reference));
        let report = request::report(value, unique, scalar(self.id));
        Some(ReportMessage { reference, token, report })
    }
}

/// A cursor over the message's bytes. It only ever stops on ASCII bytes (quotes, digits,
/// punctuation), so every slice it takes of `text` falls on a character boundary.
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// A string: borrowed when it has no escapes; with escapes, serde_json decodes just this
    /// string (rare on the hot path, and its rules stay serde's). A raw control character is
    /// the general path's error.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        // The usual string: no escape and no control character before its closing quote.
        let rest = &self.text.as_bytes()[start..];
        let stop = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[stop] == b'"' {
            self.at = start + stop + 1;
            return Some(Cow::Borrowed(&self.text[start..start + stop]));
        }
        let mut escaped = false;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.next()?; // The escaped byte can be a quote; \u's hex digits cannot.
                }
                0..0x20 => return None,
                _ => {}
            }
        }
        let end = self.at - 1;
        if !escaped {
            return Some(Cow::Borrowed(&self.text[start..end]));
        }
        serde_json::from_str::<String>(&self.text[start - 1..=end]).ok().map(Cow::Owned)
    }

    /// A string, `null`, or a whole number without sign, fraction or exponent. A number the
    /// scanner does not take ends at a byte the caller does not expect (`.`, `e`, a digit
    /// after a leading 0), so it is declined there.
    fn scalar(&mut self) -> Option<Field<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Field::Text),
            b'n' => {
                let rest = self.text.get(self.at..)?;
                rest.starts_with("null").then(|| {
                    self.at += 4;
                    Field::Null
                })
            }
            b'0' => {
                self.at += 1;
                Some(Field::Whole(0))
            }
            b'1'..=b'9' => {
                let start = self.at;
                let mut n: u64 = 0;
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    // 19 digits always fit a u64; a longer number is left to serde.
                    if self.at - start == 19 {
                        return None;
                    }
                    n = n * 10 + u64::from(d - b'0');
                    self.at += 1;
                }
                Some(Field::Whole(n))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::{self, JobName, Request};
    use super::*;

    /// What a report message comes to, as text, for comparing the two paths.
    fn outcome(
        reference: &Result<Option<Ref>, Refusal>,
        token: Option<&str>,
        report: &Result<Report, Refusal>,
    ) -> String {
        if let Err(refusal) = reference {
            return format!("{refusal:?}");
        }
        let report = report.as_ref().map(|r| {
            let job = match &r.job {
                JobName::Unique(u) => format!("unique {u}"),
                JobName::Handle(h) => format!("handle {h}"),
                JobName::Number(n) => format!("number {n}"),
            };
            format!("{} {job}", r.value)
        });
        format!("{reference:?} {token:?} {report:?}")
    }

    /// The general path's outcome for `text`, or None when it is not a report.
    fn general(text: &str) -> Option<String> {
        let parsed = request::parse(text, 200);
        match &parsed.request {
            Ok(Request::Report { token, report }) => {
                Some(outcome(&Ok(parsed.reference.clone()), token.as_deref(), report))
            }
            Ok(_) => None,
            Err(refusal) => Some(format!("{refusal:?}")),
        }
    }

    /// Whether the scanner takes `text`, after checking that what it takes comes to the general
    /// path's outcome.
    fn taken(text: &str) -> bool {
        let Some(fast) = scan_report(text) else { return false };
        let got = outcome(&fast.reference, fast.token, &fast.report);
        assert_eq!(Some(got), general(text), "{text}");
        true
    }

    #[test]
    fn the_common_shapes_are_read_as_the_general_path_reads_them() {
        let long = "u".repeat(65);
        let common = [
            r#"{"type":"worker.complete","id":1,"value":"done"}"#.to_string(),
            r#" { "type" : "worker.complete" ,"id":"H:lap:1", "value":"a b","token":"t","ref":2 } "#.into(),
            "{\"value\":\"\",\r\n\t\"type\":\"worker.complete\",\"unique\":\"u1\",\"ref\":\"r\"}".into(),
            r#"{"type":"worker.complete","unique":"u1","value":7,"token":null}"#.into(),
            r#"{"type":"worker.complete","id":"H:1","value":"{\"a\":\"b\\n\"} \u00e9"}"#.into(),
            r#"{"type":"worker.complete","id":0,"value":"día ☃"}"#.into(),
            r#"{"type":"worker.complete","id":1234567890123456789,"value":null}"#.into(),
            r#"{"type":"worker.complete","id":null,"value":"v"}"#.into(),
            r#"{"type":"worker.complete","id":1}"#.into(),
            r#"{"type":"worker.complete","value":"v","ref":null}"#.into(),
            format!(r#"{{"type":"worker.complete","unique":"{long}","value":"v"}}"#),
            format!(r#"{{"type":"worker.complete","id":"{long}","value":"v"}}"#),
            format!(r#"{{"type":"worker.complete","id":1,"value":"v","ref":"{}"}}"#, "r".repeat(257)),
        ];
        for text in &common {
            assert!(taken(text), "declined {text}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_the_general_path() {
        let declined = [
            r#"{"type":"ping"}"#,
            r#"{}"#,
            r#"{"type":"worker.complete","id":1,"value":"v","function":"f"}"#,
            r#"{"type":"worker.complete","id":1,"id":2,"value":"v"}"#,
            r#"{"type":"worker.complete","type":"worker.complete","value":"v"}"#,
            r#"{"t\u0079pe":"worker.complete","value":"v"}"#,
            r#"{"type":"worker.complete","value":"v"} x"#,
            r#"{"type":"worker.complete","value":"v""#,
            r#"{"type":"worker.complete","value":"v",}"#,
            r#"{"type":"worker.complete","value":"a"#,
            "{\"type\":\"worker.complete\",\"value\":\"a\u{1}b\"}",
            r#"{"type":"worker.complete","value":"\x"}"#,
            r#"{"type":"worker.complete","value":"\ud800"}"#,
            r#"{"id":1,"value":"v"}"#,
            r#"["worker.complete"]"#,
            r#"{"type":"worker.complete","token":1,"value":"v"}"#,
            r#"{"type":"worker.complete","token":"a\"b","value":"v"}"#,
            r#"{"type":"worker.complete","id":-3,"value":"v"}"#,
            r#"{"type":"worker.complete","id":1.5,"value":"v"}"#,
            r#"{"type":"worker.complete","id":1e2,"value":"v"}"#,
            r#"{"type":"worker.complete","id":01,"value":"v"}"#,
            r#"{"type":"worker.complete","id":12345678901234567890,"value":"v"}"#,
            r#"{"type":"worker.complete","id":1,"value":true}"#,
            r#"{"type":"worker.complete","id":1,"value":{"a":[1]}}"#,
            r#"{"type":"worker.complete","id":1,"value":"v","ref":[1]}"#,
            r#"{"type":"worker.complete","id":1,"value":nul}"#,
        ];
        for text in declined {
            assert!(!taken(text), "took {text}");
        }
    }

    /// Every prefix, and every single-byte change, of a few reports: whatever the scanner takes,
    /// the general path reads the same way (and the scanner never panics).
    #[test]
    fn mangled_reports_are_declined_or_read_alike() {
        let seeds = [
            r#"{"type":"worker.complete","id":12,"value":"d\"o\u00e9ne","unique":"u","token":"t","ref":"r"}"#,
            r#"{ "ref" : 7 , "type" : "worker.complete" , "id" : "H:1" , "value" : null }"#,
        ];
        let bytes = [b'"', b'\\', b',', b':', b'{', b'}', b' ', b'0', b'1', b'-', b'.', b'n', b'u', b'\n', 1];
        let mut tried = 0;
        for seed in seeds {
            for end in 0..=seed.len() {
                taken(&seed[..end]);
            }
            for at in 0..seed.len() {
                for b in bytes {
                    let mut mangled = seed.as_bytes().to_vec();
                    mangled[at] = b;
                    if let Ok(text) = std::str::from_utf8(&mangled) {
                        taken(text);
                        tried += 1;
                    }
                }
            }
        }
        assert!(tried > 1000);
    }
}
