//! Borrowed, lazy reading of HL7 v2 segments (for [`super::normalise`]).
//!
//! A segment is its id and its fields as slices of the message text (one split per segment);
//! repetitions, components and subcomponents are found by scanning a field's text when they are
//! asked for, so reading a value allocates nothing.
//!
//! The delimiters are the message's own (MSH-1, MSH-2). An escaped delimiter never appears
//! literally in the text (it is `\F\`, `\S\`, ...), so splitting on the delimiter bytes is exact,
//! and delimiters are ASCII, so every split falls on a character boundary.
//!
//! Deliberately NOT done here: escape decoding (`crate::hl7::header::unescape`), validation,
//! anything about MSH (its fields are read by `crate::hl7::header`; here they are shifted by one,
//! MSH-2 being field 1, and never read).

use std::ops::Range;

use memchr::{memchr_iter, memchr2_iter};

use crate::hl7::header::Delimiters;

/// The separators inside a field.
#[derive(Debug, Clone, Copy)]
struct Seps {
    repetition: u8,
    component: u8,
    subcomponent: u8,
}

/// The segments of one message; the fields of all of them are kept in one buffer.
#[derive(Debug)]
pub(crate) struct Segments<'m> {
    /// Every segment's fields, in message order.
    fields: Vec<&'m str>,
    /// Per segment: its id and where its fields are in `fields`.
    heads: Vec<(&'m str, Range<usize>)>,
    seps: Seps,
}

impl<'m> Segments<'m> {
    /// Reads `body` line by line. Lines end at CR, LF or CRLF; blank lines are skipped. A line
    /// is a segment when it starts with three ASCII letters or digits (the id) followed by the
    /// field separator, or is the id alone (a segment with no fields). For any other line
    /// `unreadable` is called with the number of segments read before it.
    pub(crate) fn read(body: &'m str, d: &Delimiters, mut unreadable: impl FnMut(usize)) -> Self {
        let b = body.as_bytes();
        let mut segs = Segments {
            // A field follows every field separator of a segment: enough for all of them.
            fields: Vec::with_capacity(memchr_iter(d.field, b).count()),
            heads: Vec::with_capacity(memchr2_iter(b'\r', b'\n', b).count() + 1),
            seps: Seps {
                repetition: d.repetition,
                component: d.component,
                subcomponent: d.subcomponent,
            },
        };
        let mut start = 0;
        for end in memchr2_iter(b'\r', b'\n', b).chain([b.len()]) {
            // CR and LF are ASCII, so both ends are character boundaries.
            let line = &body[start..end];
            start = end + 1;
            if line.trim().is_empty() {
                continue;
            }
            if !segs.push_line(line, d.field) {
                unreadable(segs.heads.len());
            }
        }
        segs
    }

    /// Adds `line` if it is a segment; false if it is not.
    fn push_line(&mut self, line: &'m str, field_sep: u8) -> bool {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_alphanumeric) {
            return false;
        }
        let start = self.fields.len();
        match b.get(3) {
            None => {}
            Some(&f) if f == field_sep => {
                // The separator is ASCII, so every split is a character boundary.
                let rest = &line[4..];
                let mut from = 0;
                for end in memchr_iter(f, rest.as_bytes()) {
                    self.fields.push(&rest[from..end]);
                    from = end + 1;
                }
                self.fields.push(&rest[from..]);
            }
            Some(_) => return false,
        }
        self.heads.push((&line[..3], start..self.fields.len()));
        true
    }

    /// The segments in message order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Seg<'_, 'm>> {
        self.heads.iter().map(|(id, r)| Seg {
            id,
            fields: &self.fields[r.clone()],
            seps: self.seps,
        })
    }
}

/// One segment: its id and its fields (field 1 first).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg<'a, 'm> {
    pub(crate) id: &'m str,
    fields: &'a [&'m str],
    seps: Seps,
}

impl<'m> Seg<'_, 'm> {
    /// Field `n` (1-based), `None` past the last one.
    pub(crate) fn field(&self, n: usize) -> Option<Field<'m>> {
        let raw = *self.fields.get(n.checked_sub(1)?)?;
        Some(Field {
            raw,
            seps: self.seps,
        })
    }

    /// First repetition of field `n`.
    pub(crate) fn rep(&self, n: usize) -> Option<Rep<'m>> {
        self.field(n).map(Field::first)
    }
}

/// A field as sent: one or more repetitions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'m> {
    raw: &'m str,
    seps: Seps,
}

impl<'m> Field<'m> {
    /// The whole field, separators and escapes as sent.
    pub(crate) fn raw(self) -> &'m str {
        self.raw
    }

    /// Its repetitions in order (at least one, possibly empty).
    pub(crate) fn reps(self) -> impl Iterator<Item = Rep<'m>> {
        let seps = self.seps;
        Pieces {
            rest: Some(self.raw),
            sep: seps.repetition,
        }
        .map(move |raw| Rep { raw, seps })
    }

    /// The first repetition.
    pub(crate) fn first(self) -> Rep<'m> {
        let end = find(self.raw, self.seps.repetition).unwrap_or(self.raw.len());
        Rep {
            raw: &self.raw[..end],
            seps: self.seps,
        }
    }

    /// True when the field has exactly one repetition.
    pub(crate) fn is_single(self) -> bool {
        find(self.raw, self.seps.repetition).is_none()
    }
}

/// One repetition of a field: components, each of subcomponents.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rep<'m> {
    raw: &'m str,
    seps: Seps,
}

impl<'m> Rep<'m> {
    /// The whole repetition, separators and escapes as sent.
    pub(crate) fn raw(self) -> &'m str {
        self.raw
    }

    /// True when it holds nothing but component and subcomponent separators.
    pub(crate) fn is_empty(self) -> bool {
        let Seps {
            component,
            subcomponent,
            ..
        } = self.seps;
        self.raw
            .bytes()
            .all(|b| b == component || b == subcomponent)
    }

    /// Component `c` (1-based), whole as sent (subcomponent separators included), or "" when
    /// missing.
    pub(crate) fn comp(self, c: usize) -> &'m str {
        c.checked_sub(1)
            .and_then(|i| piece(self.raw, self.seps.component, i))
            .unwrap_or("")
    }

    /// Subcomponent `s` of component `c` (both 1-based), or "" when missing.
    pub(crate) fn sub(self, c: usize, s: usize) -> &'m str {
        let (Some(ci), Some(si)) = (c.checked_sub(1), s.checked_sub(1)) else {
            return "";
        };
        piece(self.raw, self.seps.component, ci)
            .and_then(|comp| piece(comp, self.seps.subcomponent, si))
            .unwrap_or("")
    }
}

/// The pieces of a text split at an ASCII separator (at least one).
struct Pieces<'m> {
    rest: Option<&'m str>,
    sep: u8,
}

impl<'m> Iterator for Pieces<'m> {
    type Item = &'m str;

    fn next(&mut self) -> Option<&'m str> {
        let rest = self.rest?;
        match find(rest, self.sep) {
            Some(i) => {
                self.rest = Some(&rest[i + 1..]);
                Some(&rest[..i])
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// Piece `i` (0-based) of `s` split at `sep`, `None` past the last one.
fn piece(s: &str, sep: u8, i: usize) -> Option<&str> {
    let mut rest = s;
    for _ in 0..i {
        rest = &rest[find(rest, sep)? + 1..];
    }
    // `sep` is ASCII, so both ends are character boundaries.
    Some(&rest[..find(rest, sep).unwrap_or(rest.len())])
}

/// Position of the first `b` in `s`. A plain loop: the texts searched here are
/// a few bytes long, where `memchr`'s set-up costs more than it saves.
fn find(s: &str, b: u8) -> Option<usize> {
    s.bytes().position(|x| x == b)
}

/// Segment ids of an HL7 message (first three bytes of each CR/LF-separated segment).
pub fn segment_ids(message: &[u8]) -> Vec<[u8; 3]> {
    let mut out: Vec<[u8; 3]> = Vec::new();
    for seg in message.split(|&b| b == b'\r' || b == b'\n') {
        if seg.len() >= 3 {
            let id = [seg[0], seg[1], seg[2]];
            if id.iter().all(|b| b.is_ascii_alphanumeric()) && !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segments of `body` (default delimiters) and the `unreadable` calls.
    fn read(body: &str) -> (Segments<'_>, Vec<usize>) {
        let mut bad = Vec::new();
        let segs = Segments::read(body, &Delimiters::default(), |n| bad.push(n));
        (segs, bad)
    }

    #[test]
    fn a_line_is_a_segment_only_with_a_three_character_ascii_id_and_the_field_separator() {
        let body = "MSH|^~\\&|A\r\nPID|1||X\n\n \rNTE\rZZ9|\r??|junk\rPIDX|1\rPID^1\r PID|1\rPÏD|1\rNTE \rPI\rOBX|1";
        let (segs, bad) = read(body);
        let got: Vec<(&str, &[&str])> = segs.iter().map(|s| (s.id, s.fields)).collect();
        let want: Vec<(&str, &[&str])> = vec![
            ("MSH", &["^~\\&", "A"]),
            ("PID", &["1", "", "X"]),
            ("NTE", &[]),
            ("ZZ9", &[""]),
            ("OBX", &["1"]),
        ];
        assert_eq!(got, want);
        assert_eq!(bad, [4; 7]);
        let nte = segs.iter().nth(2).unwrap();
        assert!(nte.field(1).is_none() && nte.rep(1).is_none());
    }

    #[test]
    fn fields_repetitions_components_and_subcomponents_are_found_by_position() {
        let (segs, _) = read("OBX|a~b^c&d&~|^&|x^^y");
        let s = segs.iter().next().unwrap();
        assert!(s.field(0).is_none() && s.field(4).is_none());
        let f = s.field(1).unwrap();
        assert_eq!(f.raw(), "a~b^c&d&~");
        assert!(!f.is_single());
        let reps: Vec<&str> = f.reps().map(Rep::raw).collect();
        assert_eq!(reps, ["a", "b^c&d&", ""]);
        assert_eq!(f.first().raw(), "a");
        let r = f.reps().nth(1).unwrap();
        assert_eq!(
            (r.comp(1), r.comp(2), r.comp(3), r.comp(0)),
            ("b", "c&d&", "", "")
        );
        assert_eq!((r.sub(2, 1), r.sub(2, 2), r.sub(2, 3)), ("c", "d", ""));
        assert_eq!(
            (r.sub(2, 4), r.sub(1, 1), r.sub(1, 2), r.sub(0, 1)),
            ("", "b", "", "")
        );
        assert!(!r.is_empty());
        assert!(f.reps().nth(2).unwrap().is_empty());
        let f2 = s.field(2).unwrap();
        assert!(f2.is_single() && f2.first().is_empty());
        let r3 = s.rep(3).unwrap();
        assert_eq!(
            (r3.comp(1), r3.comp(2), r3.comp(3), r3.comp(4)),
            ("x", "", "y", "")
        );
    }

    #[test]
    fn the_message_delimiters_are_used() {
        let d = Delimiters {
            field: b'#',
            component: b'*',
            repetition: b'@',
            escape: b'!',
            subcomponent: b'%',
            truncation: None,
        };
        let segs = Segments::read("PID#1#|^~&#A*B%C%D@E\rPV1|1", &d, |_| {});
        let s = segs.iter().next().unwrap();
        assert_eq!(s.field(2).unwrap().raw(), "|^~&");
        assert_eq!(s.rep(2).unwrap().comp(1), "|^~&");
        let f = s.field(3).unwrap();
        assert_eq!(f.reps().count(), 2);
        let r = f.first();
        assert_eq!((r.comp(1), r.sub(2, 1), r.sub(2, 3)), ("A", "B", "D"));
        assert_eq!(segs.iter().count(), 1, "PV1 has the wrong field separator");
    }
}
