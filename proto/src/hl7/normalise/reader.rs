//! How every section reads a field: the three states ([`Tri`]), text with the message's
//! escapes decoded, timestamps (remembering the last one read), dates of birth, set ids and
//! NM numbers, and warnings that name positions only. The [`Reader`] methods that read a
//! section live with the section; those that read a value several sections share are in
//! `datatypes.rs`.

use jiff::tz::TimeZone;
use serde_json::Number;

use crate::hl7::fields::{Field, Rep, Seg};
use crate::hl7::header::{Delimiters, unescape_noting};
use crate::hl7::time::{LocalTime, TimeValue, parse_birth, parse_dtm};
use crate::hl7::tri::{HL7_NULL, Tri};

use super::datatypes::{InvalidTime, TimeField};

/// Position of a segment in the message (1-based), for warnings.
#[derive(Clone, Copy)]
pub(super) struct At {
    pub(super) pos: usize,
}

pub(super) fn is_null_raw(raw: &str) -> bool {
    raw == HL7_NULL
}

/// A repetition or component used as a composite: `""` is null, all-empty is
/// absent, otherwise `f` reads its parts.
pub(super) fn composite<'m, T>(r: Option<Rep<'m>>, f: impl FnOnce(Rep<'m>) -> T) -> Tri<T> {
    match r {
        None => Tri::Absent,
        Some(r) if is_null_raw(r.raw()) => Tri::Null,
        Some(r) if r.is_empty() => Tri::Absent,
        Some(r) => Tri::Value(f(r)),
    }
}

/// A repeating field as a list: `""` is null, no non-empty repetition is
/// absent; empty and `""` repetitions are skipped.
pub(super) fn list<'m, T>(f: Option<Field<'m>>, item: impl FnMut(Rep<'m>) -> T) -> Tri<Vec<T>> {
    let Some(f) = f else {
        return Tri::Absent;
    };
    if is_null_raw(f.raw()) {
        return Tri::Null;
    }
    let v: Vec<T> = f
        .reps()
        .filter(|r| !r.is_empty() && !is_null_raw(r.raw()))
        .map(item)
        .collect();
    if v.is_empty() {
        Tri::Absent
    } else {
        Tri::Value(v)
    }
}

/// Reads fields into the normalised types; collects warnings.
pub(super) struct Reader<'o> {
    pub(super) d: Delimiters,
    pub(super) tz: &'o TimeZone,
    pub(super) warnings: Vec<String>,
    /// The last timestamp read (text, separator, result), see [`Reader::dtm`].
    pub(super) last_time: Option<(String, u8, Option<TimeValue>)>,
    /// Set when text of the segment being read held a `\C..\`/`\M..\` escape (removed).
    pub(super) charset_escape_in: std::cell::Cell<bool>,
}

impl Reader<'_> {
    /// `parse_dtm` in the feed's zone, remembering the last value: a timestamp
    /// repeated down a message (OBX-14 on every result) is read once.
    pub(super) fn dtm(&mut self, raw: &str, sep: u8) -> Option<TimeValue> {
        if let Some((last, last_sep, tv)) = &self.last_time
            && last == raw
            && *last_sep == sep
        {
            return tv.clone();
        }
        let tv = parse_dtm(raw, self.tz, sep);
        match &mut self.last_time {
            Some((last, last_sep, last_tv)) => {
                last.clear();
                last.push_str(raw);
                *last_sep = sep;
                last_tv.clone_from(&tv);
            }
            None => self.last_time = Some((raw.to_owned(), sep, tv.clone())),
        }
        tv
    }

    /// `seg` and `what` are fixed texts from this module, never message content.
    pub(super) fn warn(&mut self, seg: &'static str, field: Option<usize>, at: At, what: &str) {
        let w = match field {
            Some(f) => format!("{seg}-{f} (segment {}): {what}", at.pos),
            None => format!("{seg} (segment {}): {what}", at.pos),
        };
        self.warnings.push(w);
    }

    /// Raw text by the three-state rule, escapes decoded.
    pub(super) fn text(&self, raw: &str) -> Tri<String> {
        Tri::from_hl7(raw).map(|v| self.unescape(v))
    }

    /// `unescape` with the message's delimiters; text without the escape
    /// character (almost all of it) is copied without calling it. A character set
    /// escape removed from the text is remembered for one warning per segment.
    pub(super) fn unescape(&self, raw: &str) -> String {
        if raw.as_bytes().contains(&self.d.escape) {
            let (text, notes) = unescape_noting(raw, &self.d);
            if notes.charset_escape_removed {
                self.charset_escape_in.set(true);
            }
            text
        } else {
            raw.to_owned()
        }
    }

    pub(super) fn comp(&self, r: Rep<'_>, c: usize) -> Tri<String> {
        self.text(r.comp(c))
    }

    pub(super) fn sub(&self, r: Rep<'_>, c: usize, s: usize) -> Tri<String> {
        self.text(r.sub(c, s))
    }

    /// Component 1 of the first repetition of field `n`.
    pub(super) fn scalar(&self, seg: Seg<'_, '_>, n: usize) -> Tri<String> {
        self.text(seg.rep(n).map_or("", |r| r.comp(1)))
    }

    /// The whole first repetition of field `n` (for ST/TX-like fields).
    pub(super) fn whole(&self, seg: Seg<'_, '_>, n: usize) -> Tri<String> {
        self.text(seg.rep(n).map_or("", Rep::raw))
    }

    /// A DTM/TS from the first repetition of field `n`.
    pub(super) fn time(
        &mut self,
        seg: Seg<'_, '_>,
        n: usize,
        id: &'static str,
        at: At,
    ) -> Tri<TimeField> {
        let Some(r) = seg.rep(n) else {
            return Tri::Absent;
        };
        self.time_raw(r.raw(), r.comp(1), self.d.component, id, n, at)
    }

    /// A date of birth from the first repetition of field `n`: the date as sent, and the time
    /// of day (when sent) on its own. See `crate::hl7::time::parse_birth`.
    pub(super) fn birth(
        &mut self,
        seg: Seg<'_, '_>,
        n: usize,
        id: &'static str,
        at: At,
    ) -> (Tri<TimeField>, Tri<LocalTime>) {
        let Some(r) = seg.rep(n) else {
            return (Tri::Absent, Tri::Absent);
        };
        match Tri::from_hl7(r.comp(1)) {
            Tri::Absent => (Tri::Absent, Tri::Absent),
            Tri::Null => (Tri::Null, Tri::Null),
            Tri::Value(_) => match parse_birth(r.raw(), self.d.component) {
                Some((date, time)) => (
                    Tri::Value(TimeField::Parsed(date)),
                    time.map_or(Tri::Absent, Tri::Value),
                ),
                None => {
                    self.warn(id, Some(n), at, "invalid timestamp kept as sent");
                    let invalid = InvalidTime {
                        hl7: r.raw().to_owned(),
                        invalid: true,
                    };
                    (Tri::Value(TimeField::Invalid(invalid)), Tri::Absent)
                }
            },
        }
    }

    /// A TS carried in component `c` of `r` (its parts are subcomponents), e.g. TQ.4.
    pub(super) fn time_in(
        &mut self,
        r: Rep<'_>,
        c: usize,
        id: &'static str,
        n: usize,
        at: At,
    ) -> Tri<TimeField> {
        let sep = self.d.subcomponent;
        self.time_raw(r.comp(c), r.sub(c, 1), sep, id, n, at)
    }

    /// `raw` is the whole TS (TS.2 may follow after `sep`), `first` its first part.
    fn time_raw(
        &mut self,
        raw: &str,
        first: &str,
        sep: u8,
        id: &'static str,
        n: usize,
        at: At,
    ) -> Tri<TimeField> {
        match Tri::from_hl7(first) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(_) => match self.dtm(raw, sep) {
                Some(tv) => Tri::Value(TimeField::Parsed(tv)),
                None => {
                    self.warn(id, Some(n), at, "invalid timestamp kept as sent");
                    Tri::Value(TimeField::Invalid(InvalidTime {
                        hl7: raw.to_owned(),
                        invalid: true,
                    }))
                }
            },
        }
    }

    /// Field 1 (SI) as a number; anything else is omitted with a warning.
    pub(super) fn set_id(&mut self, seg: Seg<'_, '_>, id: &'static str, at: At) -> Tri<u32> {
        match Tri::from_hl7(seg.rep(1).map_or("", |r| r.comp(1))) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(s) => match s.trim().parse::<u32>() {
                Ok(n) => Tri::Value(n),
                Err(_) => {
                    self.warn(id, Some(1), at, "set id is not a number; omitted");
                    Tri::Absent
                }
            },
        }
    }

    /// Field `n` (NM) as a number; anything else is omitted with a warning.
    pub(super) fn nm(
        &mut self,
        seg: Seg<'_, '_>,
        n: usize,
        id: &'static str,
        at: At,
    ) -> Tri<Number> {
        match Tri::from_hl7(seg.rep(n).map_or("", |r| r.comp(1))) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(s) => match parse_nm(s) {
                Some(v) => Tri::Value(v),
                None => {
                    self.warn(id, Some(n), at, "not a number; omitted");
                    Tri::Absent
                }
            },
        }
    }
}

pub(super) trait FilterEmpty<T> {
    fn filter_empty(self, empty: impl FnOnce(&T) -> bool) -> Tri<T>;
}

impl<T> FilterEmpty<T> for Tri<T> {
    /// A value whose parts are all absent becomes absent.
    fn filter_empty(self, empty: impl FnOnce(&T) -> bool) -> Tri<T> {
        match self {
            Tri::Value(v) if empty(&v) => Tri::Absent,
            other => other,
        }
    }
}

/// HL7 NM: optional sign, digits with at most one decimal point, at least one
/// digit, optional surrounding spaces. No exponent, no `inf`/`NaN`.
pub(crate) fn parse_nm(raw: &str) -> Option<Number> {
    let t = raw.trim_matches(' ');
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let mut digits = 0usize;
    let mut points = 0usize;
    for b in unsigned.bytes() {
        match b {
            b'0'..=b'9' => digits += 1,
            b'.' => points += 1,
            _ => return None,
        }
    }
    if digits == 0 || points > 1 {
        return None;
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if points == 0
        && let Ok(i) = t.parse::<i64>()
    {
        return Some(Number::from(i));
    }
    t.parse::<f64>().ok().and_then(Number::from_f64)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{adt, json_of, lines, opts};
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn an_unreadable_timestamp_is_kept_as_sent_marked_invalid_and_warned_without_content() {
        let v = json_of(&adt().set("PV1", 44, "2026136X").text(), &opts(false));
        assert_eq!(
            v["visit"]["admitted_at"],
            json!({"hl7": "2026136X", "invalid": true})
        );
        let warnings = v["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1);
        let w = warnings[0].as_str().unwrap();
        assert_eq!(w, "PV1-44 (segment 4): invalid timestamp kept as sent");
    }

    #[test]
    fn escapes_are_decoded_with_the_message_delimiters() {
        let m = adt()
            .set("PID", 5, "SMITH\\T\\JONES^ANN\\S\\MARIE^\\X41\\")
            .set("PV1", 10, "GEN\\E\\MED");
        let v = json_of(&m.text(), &opts(true));
        assert_eq!(
            v["patient"]["names"][0],
            json!({"family": "SMITH&JONES", "given": "ANN^MARIE", "middle": "A"})
        );
        assert_eq!(v["visit"]["hospital_service"], "GEN\\MED");
    }

    #[test]
    fn formatting_escapes_are_applied_highlighting_removed_and_charset_escapes_warned() {
        let text = lines(&[
            "MSH|^~\\&|LAB|RXX|SR|HUB|20260601120000||ORU^R01|E1|P|2.5",
            "PID|1||RXX1^^^RXX^MR",
            "OBR|1||F1|X^Test^L",
            "OBX|1|FT|X^Test^L||caf\u{e9} \\H\\bold\\N\\ end\\.sp\\next\\.sp2\\last",
            "NTE|1||",
            "NTE|2||a \\C2842\\b",
        ]);
        let v = json_of(&text, &opts(false));
        assert_eq!(
            v["observations"][0]["value"],
            "caf\u{e9} bold end\nnext\n\nlast"
        );
        assert_eq!(
            v["observations"][0]["notes"],
            json!(["a b"]),
            "empty NTE omitted"
        );
        assert_eq!(
            v["warnings"],
            json!([
                "NTE (segment 6): character set escape (\\C or \\M) removed from text; the characters it selects are not decoded"
            ])
        );
    }

    #[test]
    fn decimals_follow_hl7_nm() {
        let table: &[(&str, Option<Value>)] = &[
            ("0", Some(json!(0))),
            ("007", Some(json!(7))),
            ("-12", Some(json!(-12))),
            ("1.10", Some(json!(1.1))),
            (
                "9223372036854775808",
                Some(json!(9_223_372_036_854_775_808.0_f64)),
            ),
            ("", None),
            ("-", None),
            (".", None),
            ("1.2.3", None),
            ("1,5", None),
            ("inf", None),
            ("0x10", None),
        ];
        for (raw, expected) in table {
            let got = parse_nm(raw).map(Value::Number);
            assert_eq!(got, *expected, "{raw:?}");
        }
    }
}
