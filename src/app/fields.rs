//! The bounded forms a client's free-form fields take once parsed: a message's `ref`
//! ([`Ref`]: a short string or a number), a report's `id` ([`Scalar`]) and its `value`
//! ([`Reported`]). None of them is a `serde_json::Value` tree: a `ref` outlives its message
//! (it is echoed in every reply about the job or question), so what it may hold is decided here,
//! while the message is parsed. An array or object where a scalar is wanted is skipped unread
//! (`IgnoredAny`), so `"ref":[0,0,0,…]` costs nothing but the refusal.
//!
//! Must not: decide what a missing or refused field means to the client (`request` does).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};
use serde_json::{Number, Value};

/// The longest string `ref`: a ref is kept as long as its job or question, and echoed in each
/// reply about it, so it must stay small.
pub(super) const MAX_REF_BYTES: usize = 256;

/// A message's `ref`, kept as the client sent it and echoed unchanged: a string comes back as
/// the same JSON string, a number as the same number text (serde_json writes a `Number` as it
/// wrote the `Value` that held it before).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Ref {
    Text(Box<str>),
    Number(Number),
}

impl Ref {
    /// A parsed `ref` field as a `Ref`; None when it is neither a short string nor a number.
    pub(super) fn from_field(field: Scalar<'_>) -> Option<Ref> {
        match field {
            Scalar::Text(t) if t.len() <= MAX_REF_BYTES => Some(Ref::Text(t.into())),
            Scalar::Number(n) => Some(Ref::Number(n)),
            Scalar::Text(_) | Scalar::Other => None,
        }
    }
}

impl Serialize for Ref {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ref::Text(t) => s.serialize_str(t),
            Ref::Number(n) => n.serialize(s),
        }
    }
}

/// A field that should be a string or a number; anything else is `Other`, skipped unread.
/// A string without escapes is borrowed from the message.
#[derive(Debug)]
pub(super) enum Scalar<'a> {
    Text(Cow<'a, str>),
    Number(Number),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or a number")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(v.into()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(v).map_or(Scalar::Other, Scalar::Number))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// A report's `value` as text: a string as it is (borrowed when it has no escapes), anything
/// else as its JSON text, as the first server wrote it. An array or object goes through a
/// `Value` only while this message is parsed (its text is what is kept, and counted, in the
/// stored values); its size is bounded by `--max-message-bytes`.
#[derive(Debug)]
pub(super) struct Reported<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Reported<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ReportedVisitor)
    }
}

struct ReportedVisitor;

impl<'de> Visitor<'de> for ReportedVisitor {
    type Value = Reported<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(v.to_string())))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(v.to_string())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(Value::from(v).to_string())))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Reported(Cow::Owned(v.to_string())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let v = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Reported(Cow::Owned(v.to_string())))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let v = Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Reported(Cow::Owned(v.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(json: &str) -> Option<Ref> {
        Ref::from_field(serde_json::from_str::<Scalar>(json).unwrap())
    }

    #[test]
    fn a_ref_is_a_short_string_or_a_number_and_comes_back_as_it_came() {
        for json in [r#""r1""#, r#""é\n""#, "7", "-3", "1.5", "-0.0", "18446744073709551615", "1e300"] {
            let r = reference(json).unwrap_or_else(|| panic!("{json}"));
            let want = serde_json::to_string(&serde_json::from_str::<Value>(json).unwrap()).unwrap();
            assert_eq!(serde_json::to_string(&r).unwrap(), want, "{json}");
        }
        let long = format!("\"{}\"", "x".repeat(MAX_REF_BYTES + 1));
        for json in ["[0,0,0]", r#"{"a":[1]}"#, "true", &long] {
            assert_eq!(reference(json), None, "{json}");
        }
        assert!(reference(&format!("\"{}\"", "x".repeat(MAX_REF_BYTES))).is_some());
    }

    #[test]
    fn a_reported_value_reads_as_the_first_server_wrote_it() {
        for json in [r#""a\"b""#, "12", "-1", "2.5", "true", r#"{"b":1,"a":[1,"x"]}"#, "[1, 2]"] {
            let v: Value = serde_json::from_str(json).unwrap();
            let want = match &v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(serde_json::from_str::<Reported>(json).unwrap().0, want, "{json}");
        }
    }
}
