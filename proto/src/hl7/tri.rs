//! [`Tri`]: the three states an HL7 v2 field can be in, and how they reach JSON.
//!
//! HL7 distinguishes a field the sender left empty (it said nothing, the
//! receiver keeps what it had) from the explicit HL7 null `""` (the sender
//! says the value is now cleared). Records keep that distinction: an absent
//! value is omitted from the JSON object, a null is written as JSON `null`,
//! anything else is the value.
//!
//! Deliberately NOT done here: reading HL7 (see `crate::hl7::normalise`), and
//! deserialising (records are only produced at the edge). Omission only works
//! when the field carries `#[serde(skip_serializing_if = "Tri::is_absent")]`;
//! without it an absent value is written as `null`, like a cleared one.

use serde::{Serialize, Serializer};

/// The HL7 explicit null: two double quotes.
pub const HL7_NULL: &str = "\"\"";

/// A value that is absent (omitted), explicitly cleared (`null`) or present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Tri<T> {
    /// Empty or missing in the message: the sender said nothing. Omitted from JSON.
    /// The default.
    #[default]
    Absent,
    /// The HL7 null `""`: explicitly cleared. Serialised as JSON `null`.
    Null,
    /// A value.
    Value(T),
}

impl<T> Tri<T> {
    /// True for [`Tri::Absent`]; use as `skip_serializing_if`.
    pub fn is_absent(&self) -> bool {
        matches!(self, Tri::Absent)
    }

    /// True for [`Tri::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Tri::Null)
    }

    /// The value, if there is one.
    pub fn value(&self) -> Option<&T> {
        match self {
            Tri::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Applies `f` to the value, keeping absent and null as they are.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Tri<U> {
        match self {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(v) => Tri::Value(f(v)),
        }
    }

    /// `self` unless it is absent, in which case `other()`; a null is kept
    /// (the sender cleared it in the preferred place).
    pub fn or_if_absent(self, other: impl FnOnce() -> Tri<T>) -> Tri<T> {
        match self {
            Tri::Absent => other(),
            kept => kept,
        }
    }
}

impl<'a> Tri<&'a str> {
    /// Classifies raw HL7 text: empty is absent, `""` is null, anything else a value.
    pub fn from_hl7(raw: &'a str) -> Tri<&'a str> {
        match raw {
            "" => Tri::Absent,
            HL7_NULL => Tri::Null,
            v => Tri::Value(v),
        }
    }
}

impl<T: Serialize> Serialize for Tri<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Tri::Value(v) => v.serialize(s),
            Tri::Absent | Tri::Null => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Probe {
        #[serde(skip_serializing_if = "Tri::is_absent")]
        a: Tri<String>,
    }

    #[test]
    fn absent_is_omitted_null_is_null_and_values_are_values() {
        let table: &[(&str, Tri<String>, &str)] = &[
            ("absent", Tri::Absent, "{}"),
            ("null", Tri::Null, r#"{"a":null}"#),
            ("value", Tri::Value("x".into()), r#"{"a":"x"}"#),
        ];
        for (name, t, json) in table {
            let got = serde_json::to_string(&Probe { a: t.clone() }).unwrap();
            assert_eq!(got, *json, "{name}");
        }
    }

    #[test]
    fn raw_hl7_text_is_classified_by_the_null_rule() {
        assert_eq!(Tri::from_hl7(""), Tri::Absent);
        assert_eq!(Tri::from_hl7("\"\""), Tri::Null);
        assert_eq!(Tri::from_hl7("\""), Tri::Value("\""));
        assert_eq!(Tri::from_hl7("\"\"\""), Tri::Value("\"\"\""));
        assert_eq!(Tri::from_hl7(" "), Tri::Value(" "));
    }

    #[test]
    fn a_preferred_null_is_kept_and_only_absence_falls_back() {
        let fallback = || Tri::Value(2);
        assert_eq!(Tri::Absent.or_if_absent(fallback), Tri::Value(2));
        assert_eq!(Tri::Null.or_if_absent(fallback), Tri::Null);
        assert_eq!(Tri::Value(1).or_if_absent(fallback), Tri::Value(1));
        assert_eq!(Tri::Value(3).map(|v| v * 2), Tri::Value(6));
        assert_eq!(Tri::<i32>::Null.map(|v| v * 2), Tri::Null);
    }
}
