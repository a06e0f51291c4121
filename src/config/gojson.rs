//! JSON objects decoded the way Go's `encoding/json` fills a struct, so files written for
//! upstream flannel mean the same thing here:
//!
//! * keys match field names case-insensitively (Go's `EqualFold`; for ASCII field names that is
//!   ASCII case folding plus `ſ`→`s` and the Kelvin sign `K`→`k`);
//! * unknown keys are ignored; a repeated key overwrites the earlier one (members are kept in
//!   document order so callers can apply them in turn);
//! * `null` leaves a plain field untouched (callers see `None`);
//! * a top-level `null` document decodes to nothing at all.
//!
//! Values stay raw ([`RawValue`]) until the caller decodes them with the typed helpers below,
//! which produce [`FieldError`]s naming the field and the offending JSON text.

use core::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Members of one JSON object, in document order, duplicates kept.
pub(crate) type Members = Vec<(String, Box<RawValue>)>;

/// Why a document is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ObjectError {
    /// Not valid JSON at all (serde_json's message, with line and column).
    Syntax(String),
    /// Valid JSON of another kind (`array`, `string`, `number`, `bool`).
    NotObject(&'static str),
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectError::Syntax(e) => write!(f, "invalid JSON: {e}"),
            ObjectError::NotObject(kind) => write!(f, "expected a JSON object, found {kind}"),
        }
    }
}

/// The kind of a JSON text, from its first significant byte.
pub(crate) fn kind_of(json: &str) -> &'static str {
    match json
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .bytes()
        .next()
    {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        Some(_) => "number",
        None => "nothing",
    }
}

/// Parses a JSON document that should be an object. `Ok(None)` for `null`.
pub(crate) fn parse_object(json: &str) -> Result<Option<Members>, ObjectError> {
    match kind_of(json) {
        "object" => serde_json::from_str::<ObjectMembers>(json)
            .map(|m| Some(m.0))
            .map_err(|e| ObjectError::Syntax(e.to_string())),
        "null" => serde_json::from_str::<()>(json)
            .map(|()| None)
            .map_err(|e| ObjectError::Syntax(e.to_string())),
        kind => match serde_json::from_str::<&RawValue>(json) {
            Ok(_) => Err(ObjectError::NotObject(kind)),
            Err(e) => Err(ObjectError::Syntax(e.to_string())),
        },
    }
}

/// Folds one character the way Go's `EqualFold` relates it to an ASCII letter.
fn fold(c: char) -> char {
    match c {
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        c => c.to_ascii_lowercase(),
    }
}

/// True when a JSON key selects the (ASCII) Go field `field`.
pub(crate) fn key_matches(key: &str, field: &str) -> bool {
    key.chars().map(fold).eq(field.chars().map(fold))
}

/// A JSON value that does not fit its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// Field path as a user would write it (`Backend.VNI`).
    pub field: String,
    /// The offending JSON text, shortened.
    pub value: String,
    /// What the field accepts.
    pub expected: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, raw: &str, expected: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            value: shorten(raw),
            expected: expected.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} is not {}", self.field, self.value, self.expected)
    }
}

/// Limits untrusted text quoted in error messages to 80 characters.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

/// `true`/`false`; `null` → `None`.
pub(crate) fn bool_value(field: &str, raw: &RawValue) -> Result<Option<bool>, FieldError> {
    match raw.get() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        "null" => Ok(None),
        other => Err(FieldError::new(field, other, "true or false")),
    }
}

/// A JSON integer literal (Go decodes integers from the literal text: no fraction, exponent
/// or, for unsigned fields, sign). `null` → `None`.
pub(crate) fn int_value(field: &str, raw: &RawValue) -> Result<Option<i64>, FieldError> {
    integer_value(field, raw, true)
}

/// A non-negative JSON integer literal. `null` → `None`.
pub(crate) fn uint_value(field: &str, raw: &RawValue) -> Result<Option<u64>, FieldError> {
    integer_value(field, raw, false)
}

/// [`int_value`] (`signed`: a leading `-` is allowed) or [`uint_value`] as `T`.
fn integer_value<T: std::str::FromStr>(
    field: &str,
    raw: &RawValue,
    signed: bool,
) -> Result<Option<T>, FieldError> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    let digits = match text.strip_prefix('-') {
        Some(rest) if signed => rest,
        _ => text,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        let want = if signed {
            "an integer"
        } else {
            "a non-negative integer"
        };
        return Err(FieldError::new(field, text, want));
    }
    text.parse::<T>()
        .map(Some)
        .map_err(|_| FieldError::new(field, text, "an integer in the 64-bit range"))
}

/// A JSON string; `null` → `None`.
pub(crate) fn string_value(field: &str, raw: &RawValue) -> Result<Option<String>, FieldError> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if !text.starts_with('"') {
        return Err(FieldError::new(field, text, "a string"));
    }
    serde_json::from_str::<String>(text)
        .map(Some)
        .map_err(|_| FieldError::new(field, text, "a string"))
}

/// Collects object members without reordering or de-duplicating them.
struct ObjectMembers(Members);

impl<'de> Deserialize<'de> for ObjectMembers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ObjectMembers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectMembers, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Box<RawValue>>()?;
                    out.push((key, value));
                }
                Ok(ObjectMembers(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_duplicates() {
        let m = parse_object(r#"{"b": 1, "a": [1, 2], "b": "x"}"#)
            .expect("object")
            .expect("not null");
        let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "b"]);
        assert_eq!(m[1].1.get(), "[1, 2]");
    }

    #[test]
    fn null_and_non_objects() {
        assert!(matches!(parse_object(" null "), Ok(None)));
        assert!(matches!(
            parse_object("[1]"),
            Err(ObjectError::NotObject("array"))
        ));
        assert!(matches!(
            parse_object("12"),
            Err(ObjectError::NotObject("number"))
        ));
        assert!(matches!(parse_object("{"), Err(ObjectError::Syntax(_))));
        assert!(matches!(parse_object(""), Err(ObjectError::Syntax(_))));
        assert!(matches!(parse_object("{} x"), Err(ObjectError::Syntax(_))));
    }

    #[test]
    fn go_case_folding() {
        assert!(key_matches("network", "Network"));
        assert!(key_matches("NETWORK", "Network"));
        assert!(key_matches("\u{212A}ey", "key"));
        assert!(key_matches("\u{017F}ubnetLen", "SubnetLen"));
        assert!(!key_matches("Networks", "Network"));
        assert!(!key_matches("Netw0rk", "Network"));
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).expect("valid raw json")
    }

    #[test]
    fn typed_values() {
        assert_eq!(bool_value("B", &raw("true")), Ok(Some(true)));
        assert_eq!(bool_value("B", &raw("null")), Ok(None));
        assert!(bool_value("B", &raw("\"true\"")).is_err());
        assert_eq!(uint_value("N", &raw("24")), Ok(Some(24)));
        assert!(uint_value("N", &raw("-1")).is_err());
        assert!(uint_value("N", &raw("24.0")).is_err());
        assert!(uint_value("N", &raw("1e2")).is_err());
        assert!(uint_value("N", &raw("99999999999999999999999")).is_err());
        assert_eq!(int_value("I", &raw("-3")), Ok(Some(-3)));
        assert_eq!(
            string_value("S", &raw("\"a\\u0062\"")),
            Ok(Some("ab".into()))
        );
        let e = string_value("Backend.Type", &raw("5")).expect_err("number");
        assert_eq!(e.to_string(), "Backend.Type 5 is not a string");
    }

    #[test]
    fn shorten_is_char_safe() {
        let long = "é".repeat(200);
        let s = shorten(&long);
        assert_eq!(s.chars().count(), 81);
        assert_eq!(shorten("abc"), "abc");
    }
}
