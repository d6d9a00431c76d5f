//! ASTM E1394 / CLSI LIS2-A2 messages: parse the text of one message into records and normalise
//! them into serde-serialisable structs (the `astm` object of siterelay's JSON record).
//!
//! What it does:
//! - splits the text into records (CR, LF or CRLF separated; blank lines skipped) and reads the
//!   delimiters from the header (`H|\^&`: field `|`, repeat `\`, component `^`, escape `&`);
//!   nothing is hard-coded, any four distinct printable non-alphanumeric ASCII characters work;
//! - decodes the escapes `&F&` `&S&` `&R&` `&E&` (with the message's own escape character) in
//!   normalised values; any other escape sequence is kept as sent;
//! - builds the hierarchy: patients (P) hold orders (O) hold observations (R); a comment (C)
//!   belongs to the nearest record before it that is not a comment; queries (Q), manufacturer
//!   records (M) and unknown record types are kept generically with their raw fields;
//! - normalises timestamps (`YYYY[MM[DD[HH[MM[SS]]]]]`, optionally followed by `+HHMM`/`-HHMM`)
//!   in the caller's time zone, keeping the precision and the text as sent;
//! - reports `complete` (an `L` record was present) and a count of records per type.
//!
//! What it deliberately does not do: decode bytes into text (the caller picks the character
//! set), validate codes or units, build replies or queries, touch the link layer (frame numbers
//! are already gone), or output the header's password field (H-4). Errors carry line numbers
//! and record types only, never content.
//!
//! Rules worth knowing:
//! - a test code (O-5, R-3 universal test ID `id^name^type^local code^...`): `code` is the first
//!   component, or the fourth (the manufacturer's code) when the first is empty; `text` is the
//!   second, `system` the third; all components are kept in `components` (vendors put dilution,
//!   test name or status in the fifth and later ones);
//! - an R-4 value that is a plain decimal (`-1`, `5.40`, `.5`; no exponent, no `<`/`>`) becomes a
//!   JSON number with `value_type` `NM`; anything else a string with `ST`; a value with components
//!   or repeats is kept as one decoded string. `value_text` always keeps the value as sent (so
//!   `5.40` keeps its trailing zero);
//! - an O without a P before it, or an R without an O, gets a placeholder parent flagged
//!   `implied: true` rather than being refused.

use std::collections::BTreeMap;

use jiff::civil::{Date, DateTime};
use jiff::tz::{Offset, TimeZone};
use serde::Serialize;

/// Why a message could not be parsed. Positions are 1-based line numbers of the input text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AstmError {
    /// No record at all.
    #[error("empty message")]
    Empty,
    /// The first record is not a header.
    #[error("line {line}: the first record is not a header (H)")]
    NoHeader {
        /// Line of the first record.
        line: usize,
    },
    /// The header's delimiter definition is missing or unusable.
    #[error("line {line}: invalid delimiter definition in the header")]
    BadDelimiters {
        /// Line of the header.
        line: usize,
    },
    /// A line is not a record: it must be an uppercase letter, then the field delimiter or its end.
    #[error("line {line}: not a record")]
    MalformedRecord {
        /// Line of the offending text.
        line: usize,
    },
    /// A second header inside the message.
    #[error("line {line}: a second header record")]
    UnexpectedHeader {
        /// Line of the second header.
        line: usize,
    },
    /// A record after the terminator record.
    #[error("line {line}: {record_type} record after the terminator (L)")]
    RecordAfterTerminator {
        /// Line of the record.
        line: usize,
        /// Its record type.
        record_type: char,
    },
}

/// The four delimiters declared by the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Delimiters {
    /// Separates fields (`|`).
    pub field: char,
    /// Separates repeats of a field (`\`).
    pub repeat: char,
    /// Separates components (`^`).
    pub component: char,
    /// Opens and closes escape sequences (`&`).
    pub escape: char,
}

/// Precision of a timestamp, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `YYYY`
    Year,
    /// `YYYYMM`
    Month,
    /// `YYYYMMDD`
    Day,
    /// `YYYYMMDDHH`
    Hour,
    /// `YYYYMMDDHHMM`
    Minute,
    /// `YYYYMMDDHHMMSS`
    Second,
}

/// Where the offset of a normalised instant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneSource {
    /// The value carried `+HHMM`/`-HHMM` (not in LIS2-A2, but some instruments send it).
    Given,
    /// The caller's time zone was applied.
    Assumed,
}

/// A normalised timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimeValue {
    /// RFC 3339 instant with offset (hour precision or finer: `2024-06-01T12:30:00+01:00`), or a
    /// date (`2024-06-01`, `2024-06`, `2024`) for day precision or coarser, never moved across
    /// midnight; `null` when the text is not a valid timestamp.
    pub value: Option<String>,
    /// The timestamp as sent (first component, trimmed).
    pub astm: String,
    /// Precision as sent; `null` when invalid.
    pub precision: Option<Precision>,
    /// For instants: whether the offset was sent or assumed; `null` for dates.
    pub zone: Option<ZoneSource>,
}

/// A coded test identifier (O-5, R-3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Code {
    /// First component, or the fourth (manufacturer's code) when the first is empty.
    pub code: Option<String>,
    /// Second component (test name).
    pub text: Option<String>,
    /// Third component (coding system, e.g. `LN`).
    pub system: Option<String>,
    /// Every component, decoded, in order (empty ones as `""`).
    pub components: Vec<String>,
}

/// A comment (C record) attached to the record before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Comment {
    /// C-2 sequence number.
    pub sequence: Option<u32>,
    /// C-3 comment source (`I` instrument, `L` computer system).
    pub source: Option<String>,
    /// C-4 comment text: non-empty components joined by a space, repeats by a newline.
    pub text: Option<String>,
    /// C-5 comment type (`G` generic, `T` test name, `P` positive, `N` negative, `I` flag).
    pub comment_type: Option<String>,
}

/// A record kept as sent: Q, M, and record types this module does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawRecord {
    /// Line of the record in the message text.
    pub line: usize,
    /// The record type letter.
    pub record_type: String,
    /// All fields as sent, escapes not decoded; `fields[0]` is the record type.
    pub fields: Vec<String>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
}

/// What the header (H) says about the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instrument {
    /// H-5 component 1: sender name or ID.
    pub name: Option<String>,
    /// H-5 component 2: software version.
    pub software_version: Option<String>,
    /// H-5 component 3: serial number.
    pub serial_number: Option<String>,
    /// H-5, every component decoded (vendors add more, e.g. the record types they support).
    pub sender: Vec<String>,
    /// H-3 message control ID.
    pub message_control_id: Option<String>,
    /// H-10 receiver ID.
    pub receiver_id: Option<String>,
    /// H-12 processing ID (`P` production, `T` training, `D` debugging, `Q` QC).
    pub processing_id: Option<String>,
    /// H-13 version of the record specification.
    pub version: Option<String>,
    /// H-14 date and time of the message.
    pub message_datetime: Option<TimeValue>,
}

/// A person's name (P-6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersonName {
    /// Component 1.
    pub family: Option<String>,
    /// Component 2.
    pub given: Option<String>,
    /// Component 3.
    pub middle: Option<String>,
    /// Component 4.
    pub suffix: Option<String>,
    /// Component 5.
    pub title: Option<String>,
}

/// A result (R record).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// R-2 sequence number.
    pub set_id: Option<u32>,
    /// R-3 universal test ID.
    pub code: Option<Code>,
    /// R-4 data value: a JSON number when it is a plain decimal, else a string; `null` if empty.
    pub value: serde_json::Value,
    /// `NM` when `value` is a number, `ST` when a string, `null` when empty.
    pub value_type: Option<String>,
    /// R-4 as sent (escapes decoded, trimmed).
    pub value_text: Option<String>,
    /// R-5 units.
    pub units: Option<String>,
    /// R-6 reference range, as sent.
    pub reference_range: Option<String>,
    /// R-7 abnormal flags, one per repeat.
    pub abnormal_flags: Vec<String>,
    /// R-9 result status (`F` final, `C` correction, `P` preliminary, `X` cannot be done ...).
    pub result_status: Option<String>,
    /// R-11 operator identification.
    pub operator: Option<String>,
    /// R-12 date and time the test started.
    pub started_at: Option<TimeValue>,
    /// R-13 date and time the test completed.
    pub completed_at: Option<TimeValue>,
    /// R-14 instrument identification.
    pub instrument_id: Option<String>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
}

/// An order (O record) and its results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Order {
    /// O-2 sequence number.
    pub sequence: Option<u32>,
    /// O-3 specimen ID (the computer system's).
    pub specimen_id: Option<String>,
    /// O-4 instrument specimen ID.
    pub instrument_specimen_id: Option<String>,
    /// O-5 universal test ID, one entry per repeat.
    pub universal_test_id: Vec<Code>,
    /// O-6 priority (`S` stat, `A` ASAP, `R` routine ...).
    pub priority: Option<String>,
    /// O-7 requested date and time.
    pub requested_at: Option<TimeValue>,
    /// O-8 specimen collection date and time.
    pub collected_at: Option<TimeValue>,
    /// O-12 action code.
    pub action_code: Option<String>,
    /// O-26 report type (`F` final, `Q` response to query ...).
    pub report_type: Option<String>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
    /// Its results.
    pub observations: Vec<Observation>,
    /// True when there was no O record: a placeholder for results sent without one.
    #[serde(skip_serializing_if = "is_false")]
    pub implied: bool,
}

/// A patient (P record) and their orders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Patient {
    /// P-2 sequence number.
    pub sequence: Option<u32>,
    /// P-3 practice-assigned patient ID.
    pub practice_patient_id: Option<String>,
    /// P-4 laboratory-assigned patient ID.
    pub laboratory_patient_id: Option<String>,
    /// P-5 patient ID No. 3.
    pub patient_id_3: Option<String>,
    /// P-6 patient name.
    pub name: Option<PersonName>,
    /// P-8 birth date.
    pub birth_date: Option<TimeValue>,
    /// P-9 sex.
    pub sex: Option<String>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
    /// Its orders.
    pub orders: Vec<Order>,
    /// True when there was no P record: a placeholder for orders sent without one.
    #[serde(skip_serializing_if = "is_false")]
    pub implied: bool,
}

/// One parsed and normalised message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AstmMessage {
    /// Delimiters declared by the header.
    pub delimiters: Delimiters,
    /// From the header.
    pub instrument: Instrument,
    /// Comments attached to the header.
    pub comments: Vec<Comment>,
    /// Patients, in order.
    pub patients: Vec<Patient>,
    /// Q records, raw.
    pub queries: Vec<RawRecord>,
    /// M records, raw.
    pub manufacturer_records: Vec<RawRecord>,
    /// Records of unknown types, raw.
    pub other_records: Vec<RawRecord>,
    /// L-3 termination code (`N` normal, `T` sender aborted, `E` unknown error ...).
    pub termination_code: Option<String>,
    /// True iff an L record was present.
    pub complete: bool,
    /// Number of records of each type.
    pub record_counts: BTreeMap<String, usize>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Split text into (1-based line number, line), CR, LF and CRLF each ending one line.
fn lines(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' || bytes[i] == b'\n' {
            out.push((line, &text[start..i]));
            line += 1;
            if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            start = i + 1;
        }
        i += 1;
    }
    if start < bytes.len() {
        out.push((line, &text[start..]));
    }
    out
}

/// Read the delimiters from a header line (`H|\^&...`).
fn read_delimiters(header: &str) -> Option<Delimiters> {
    let mut chars = header.chars();
    if chars.next() != Some('H') {
        return None;
    }
    let field = chars.next()?;
    let repeat = chars.next()?;
    let component = chars.next()?;
    let escape = chars.next()?;
    match chars.next() {
        None => {}
        Some(c) if c == field => {}
        Some(_) => return None,
    }
    let all = [field, repeat, component, escape];
    let usable = |c: char| c.is_ascii_graphic() && !c.is_ascii_alphanumeric();
    if !all.iter().all(|c| usable(*c)) {
        return None;
    }
    for i in 0..4 {
        for j in i + 1..4 {
            if all[i] == all[j] {
                return None;
            }
        }
    }
    Some(Delimiters {
        field,
        repeat,
        component,
        escape,
    })
}

/// Parse an ASTM timestamp. `None` for an empty value; an unparseable one gives `value: null`.
pub fn parse_timestamp(raw: &str, tz: &TimeZone, component: char) -> Option<TimeValue> {
    let first = raw.split(component).next().unwrap_or("").trim();
    if first.is_empty() {
        return None;
    }
    let (value, precision, zone) = match normalise_timestamp(first, tz) {
        Some((v, p, z)) => (Some(v), Some(p), z),
        None => (None, None, None),
    };
    Some(TimeValue {
        value,
        astm: first.to_string(),
        precision,
        zone,
    })
}

fn digits(s: &str, from: usize, n: usize) -> Option<i32> {
    let part = s.get(from..from + n)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn normalise_timestamp(s: &str, tz: &TimeZone) -> Option<(String, Precision, Option<ZoneSource>)> {
    let (body, offset) = match s.find(['+', '-']) {
        Some(i) => {
            let (body, off) = s.split_at(i);
            if off.len() != 5 {
                return None;
            }
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let (hh, mm) = (digits(off, 1, 2)?, digits(off, 3, 2)?);
            if hh > 14 || mm > 59 {
                return None;
            }
            (
                body,
                Some(Offset::from_seconds(sign * (hh * 3600 + mm * 60)).ok()?),
            )
        }
        None => (s, None),
    };
    let precision = match body.len() {
        4 => Precision::Year,
        6 => Precision::Month,
        8 => Precision::Day,
        10 => Precision::Hour,
        12 => Precision::Minute,
        14 => Precision::Second,
        _ => return None,
    };
    let num = |from: usize, default: i32| {
        if body.len() > from {
            digits(body, from, 2)
        } else {
            Some(default)
        }
    };
    let year = digits(body, 0, 4)? as i16;
    let month = num(4, 1)? as i8;
    let day = num(6, 1)? as i8;
    let date = Date::new(year, month, day).ok()?;
    if precision <= Precision::Day {
        let value = match precision {
            Precision::Year => format!("{year:04}"),
            Precision::Month => format!("{year:04}-{month:02}"),
            _ => date.to_string(),
        };
        return Some((value, precision, None));
    }
    let (hour, minute, second) = (num(8, 0)? as i8, num(10, 0)? as i8, num(12, 0)? as i8);
    let dt = DateTime::new(year, month, day, hour, minute, second, 0).ok()?;
    let (zoned, source) = match offset {
        Some(off) => (
            dt.to_zoned_datetime(TimeZone::fixed(off)).ok()?,
            ZoneSource::Given,
        ),
        None => (dt.to_zoned_datetime(tz.clone()).ok()?, ZoneSource::Assumed),
    };
    let value = zoned
        .timestamp()
        .display_with_offset(zoned.offset())
        .to_string();
    Some((value, precision, Some(source)))
}

/// Field access and decoding with one message's delimiters.
struct Ctx<'a> {
    d: Delimiters,
    tz: &'a TimeZone,
}

impl Ctx<'_> {
    /// Decode escape sequences.
    fn decode(&self, s: &str) -> String {
        let esc = self.d.escape;
        if !s.contains(esc) {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find(esc) {
            out.push_str(&rest[..i]);
            let after = &rest[i + esc.len_utf8()..];
            let Some(j) = after.find(esc) else {
                out.push_str(&rest[i..]);
                return out;
            };
            let replacement = match &after[..j] {
                "F" => Some(self.d.field),
                "S" => Some(self.d.component),
                "R" => Some(self.d.repeat),
                "E" => Some(esc),
                _ => None,
            };
            match replacement {
                Some(c) => {
                    out.push(c);
                    rest = &after[j + esc.len_utf8()..];
                }
                None => {
                    // Not an escape we know: keep the opening character and carry on from the
                    // next one, which may open a real sequence.
                    out.push(esc);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// A decoded, trimmed text value; `None` when empty.
    fn text(&self, raw: &str) -> Option<String> {
        let t = self.decode(raw);
        let t = t.trim();
        (!t.is_empty()).then(|| t.to_string())
    }

    /// Decoded, trimmed components of one repeat.
    fn components(&self, repeat: &str) -> Vec<String> {
        repeat
            .split(self.d.component)
            .map(|c| self.decode(c).trim().to_string())
            .collect()
    }

    fn first_repeat<'s>(&self, raw: &'s str) -> &'s str {
        raw.split(self.d.repeat).next().unwrap_or("")
    }

    fn time(&self, raw: &str) -> Option<TimeValue> {
        parse_timestamp(self.first_repeat(raw), self.tz, self.d.component)
    }

    fn code(&self, repeat: &str) -> Option<Code> {
        let components = self.components(repeat);
        if components.iter().all(|c| c.is_empty()) {
            return None;
        }
        let get = |i: usize| components.get(i).filter(|c| !c.is_empty()).cloned();
        Some(Code {
            code: get(0).or_else(|| get(3)),
            text: get(1),
            system: get(2),
            components,
        })
    }

    fn codes(&self, raw: &str) -> Vec<Code> {
        raw.split(self.d.repeat)
            .filter_map(|r| self.code(r))
            .collect()
    }

    fn comment(&self, f: &Fields) -> Comment {
        let text = f
            .get(4)
            .split(self.d.repeat)
            .map(|r| {
                self.components(r)
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|r| !r.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        Comment {
            sequence: seq(f.get(2)),
            source: self.text(f.get(3)),
            text: (!text.is_empty()).then_some(text),
            comment_type: self.text(f.get(5)),
        }
    }

    fn instrument(&self, f: &Fields) -> Instrument {
        let sender: Vec<String> = self.components(self.first_repeat(f.get(5)));
        let get = |i: usize| sender.get(i).filter(|c| !c.is_empty()).cloned();
        Instrument {
            name: get(0),
            software_version: get(1),
            serial_number: get(2),
            sender: if sender.iter().all(|c| c.is_empty()) {
                Vec::new()
            } else {
                sender.clone()
            },
            message_control_id: self.text(f.get(3)),
            receiver_id: self.text(f.get(10)),
            processing_id: self.text(f.get(12)),
            version: self.text(f.get(13)),
            message_datetime: self.time(f.get(14)),
        }
    }

    fn patient(&self, f: &Fields) -> Patient {
        let name = self.components(self.first_repeat(f.get(6)));
        let get = |i: usize| name.get(i).filter(|c| !c.is_empty()).cloned();
        let name = PersonName {
            family: get(0),
            given: get(1),
            middle: get(2),
            suffix: get(3),
            title: get(4),
        };
        let has_name = name.family.is_some()
            || name.given.is_some()
            || name.middle.is_some()
            || name.suffix.is_some()
            || name.title.is_some();
        Patient {
            sequence: seq(f.get(2)),
            practice_patient_id: self.text(f.get(3)),
            laboratory_patient_id: self.text(f.get(4)),
            patient_id_3: self.text(f.get(5)),
            name: has_name.then_some(name),
            birth_date: self.time(f.get(8)),
            sex: self.text(f.get(9)),
            comments: Vec::new(),
            orders: Vec::new(),
            implied: false,
        }
    }

    fn order(&self, f: &Fields) -> Order {
        Order {
            sequence: seq(f.get(2)),
            specimen_id: self.text(f.get(3)),
            instrument_specimen_id: self.text(f.get(4)),
            universal_test_id: self.codes(f.get(5)),
            priority: self.text(f.get(6)),
            requested_at: self.time(f.get(7)),
            collected_at: self.time(f.get(8)),
            action_code: self.text(f.get(12)),
            report_type: self.text(f.get(26)),
            comments: Vec::new(),
            observations: Vec::new(),
            implied: false,
        }
    }

    fn observation(&self, f: &Fields) -> Observation {
        let raw = f.get(4);
        let structured = raw.contains(self.d.component) || raw.contains(self.d.repeat);
        let value_text = self.text(raw);
        let (value, value_type) = match &value_text {
            None => (serde_json::Value::Null, None),
            Some(t) => match (!structured)
                .then(|| crate::hl7::normalise::parse_nm(t))
                .flatten()
            {
                Some(n) => (serde_json::Value::Number(n), Some("NM".to_string())),
                None => (serde_json::Value::String(t.clone()), Some("ST".to_string())),
            },
        };
        Observation {
            set_id: seq(f.get(2)),
            code: self.code(self.first_repeat(f.get(3))),
            value,
            value_type,
            value_text,
            units: self.text(f.get(5)),
            reference_range: self.text(f.get(6)),
            abnormal_flags: f
                .get(7)
                .split(self.d.repeat)
                .filter_map(|r| self.text(r))
                .collect(),
            result_status: self.text(f.get(9)),
            operator: self.text(f.get(11)),
            started_at: self.time(f.get(12)),
            completed_at: self.time(f.get(13)),
            instrument_id: self.text(f.get(14)),
            comments: Vec::new(),
        }
    }
}

/// The fields of one record, numbered from 1 as in the standard (field 1 is the record type).
struct Fields<'a>(Vec<&'a str>);

impl<'a> Fields<'a> {
    fn get(&self, n: usize) -> &'a str {
        n.checked_sub(1)
            .and_then(|i| self.0.get(i))
            .copied()
            .unwrap_or("")
    }
}

fn seq(raw: &str) -> Option<u32> {
    raw.trim().parse().ok()
}

/// Where the next comment goes.
#[derive(Clone, Copy)]
enum Attach {
    Header,
    Patient,
    Order,
    Result,
    Query,
    Manufacturer,
    Other,
}

/// Parse the text of one message (H .. L) and normalise it. Timestamps without an offset are
/// read in `tz` (the analyser's local time zone).
pub fn parse_message(text: &str, tz: &TimeZone) -> Result<AstmMessage, AstmError> {
    let mut records = lines(text)
        .into_iter()
        .filter(|(_, l)| !l.trim().is_empty());
    let (line, header) = records.next().ok_or(AstmError::Empty)?;
    if !header.starts_with('H') {
        return Err(AstmError::NoHeader { line });
    }
    let d = read_delimiters(header).ok_or(AstmError::BadDelimiters { line })?;
    let ctx = Ctx { d, tz };
    let header_fields = Fields(header.split(d.field).collect());
    let mut msg = AstmMessage {
        delimiters: d,
        instrument: ctx.instrument(&header_fields),
        comments: Vec::new(),
        patients: Vec::new(),
        queries: Vec::new(),
        manufacturer_records: Vec::new(),
        other_records: Vec::new(),
        termination_code: None,
        complete: false,
        record_counts: BTreeMap::from([("H".to_string(), 1)]),
    };
    let mut attach = Attach::Header;
    for (line, record) in records {
        let mut chars = record.chars();
        let kind = chars.next().unwrap_or(' ');
        let valid = kind.is_ascii_uppercase() && chars.next().is_none_or(|c| c == d.field);
        if !valid {
            return Err(AstmError::MalformedRecord { line });
        }
        if msg.complete {
            return Err(AstmError::RecordAfterTerminator {
                line,
                record_type: kind,
            });
        }
        *msg.record_counts.entry(kind.to_string()).or_insert(0) += 1;
        let f = Fields(record.split(d.field).collect());
        let raw = |f: &Fields| RawRecord {
            line,
            record_type: kind.to_string(),
            fields: f.0.iter().map(|s| s.to_string()).collect(),
            comments: Vec::new(),
        };
        match kind {
            'H' => return Err(AstmError::UnexpectedHeader { line }),
            'P' => {
                msg.patients.push(ctx.patient(&f));
                attach = Attach::Patient;
            }
            'O' => {
                let order = ctx.order(&f);
                current_patient(&mut msg.patients).orders.push(order);
                attach = Attach::Order;
            }
            'R' => {
                let obs = ctx.observation(&f);
                current_order(&mut msg.patients).observations.push(obs);
                attach = Attach::Result;
            }
            'C' => {
                let c = ctx.comment(&f);
                let target = match attach {
                    Attach::Header => Some(&mut msg.comments),
                    Attach::Patient => msg.patients.last_mut().map(|p| &mut p.comments),
                    Attach::Order => msg
                        .patients
                        .last_mut()
                        .and_then(|p| p.orders.last_mut())
                        .map(|o| &mut o.comments),
                    Attach::Result => msg
                        .patients
                        .last_mut()
                        .and_then(|p| p.orders.last_mut())
                        .and_then(|o| o.observations.last_mut())
                        .map(|r| &mut r.comments),
                    Attach::Query => msg.queries.last_mut().map(|r| &mut r.comments),
                    Attach::Manufacturer => {
                        msg.manufacturer_records.last_mut().map(|r| &mut r.comments)
                    }
                    Attach::Other => msg.other_records.last_mut().map(|r| &mut r.comments),
                };
                if let Some(list) = target {
                    list.push(c);
                }
            }
            'Q' => {
                msg.queries.push(raw(&f));
                attach = Attach::Query;
            }
            'M' => {
                msg.manufacturer_records.push(raw(&f));
                attach = Attach::Manufacturer;
            }
            'L' => {
                msg.termination_code = ctx.text(f.get(3));
                msg.complete = true;
            }
            _ => {
                msg.other_records.push(raw(&f));
                attach = Attach::Other;
            }
        }
    }
    Ok(msg)
}

fn implied_patient() -> Patient {
    Patient {
        sequence: None,
        practice_patient_id: None,
        laboratory_patient_id: None,
        patient_id_3: None,
        name: None,
        birth_date: None,
        sex: None,
        comments: Vec::new(),
        orders: Vec::new(),
        implied: true,
    }
}

fn current_patient(patients: &mut Vec<Patient>) -> &mut Patient {
    if patients.is_empty() {
        patients.push(implied_patient());
    }
    let last = patients.len() - 1;
    &mut patients[last]
}

fn current_order(patients: &mut Vec<Patient>) -> &mut Order {
    let p = current_patient(patients);
    if p.orders.is_empty() {
        p.orders.push(Order {
            sequence: None,
            specimen_id: None,
            instrument_specimen_id: None,
            universal_test_id: Vec::new(),
            priority: None,
            requested_at: None,
            collected_at: None,
            action_code: None,
            report_type: None,
            comments: Vec::new(),
            observations: Vec::new(),
            implied: true,
        });
    }
    let last = p.orders.len() - 1;
    &mut p.orders[last]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn london() -> TimeZone {
        TimeZone::get("Europe/London").unwrap()
    }

    fn parse(text: &str) -> AstmMessage {
        parse_message(text, &london()).unwrap()
    }

    /// A made-up chemistry analyser, synthetic patient (NHS number from the 999 range).
    const CHEMISTRY: &str = "H|\\^&|MSG0001||CHEMSIM-400^2.3.1^SN-0042|||||LIS||P|LIS2-A2|20240615103000\r\
P|1|PRAC-77|LAB-5521|9990000018|TEST^PATIENT^Q||19700101|F\r\
O|1|SPEC-0001|INST-0001^03^12|^^^GLU\\^^^NA\\^^^K|R|20240615090000|20240615084500||||N||||SERUM||||||||||F\r\
R|1|^^^GLU^Glucose|5.40|mmol/L|3.9 to 5.8|N||F||OP1^SUP2|20240615101000|20240615102500|CHEMSIM-400\r\
R|2|^^^NA|141|mmol/L|133-146|N||F||OP1|20240615101000|20240615102510|CHEMSIM-400\r\
R|3|^^^K|&lt;1.5|mmol/L|3.5-5.3|L\\LL||F||OP1|20240615101000|20240615102520|CHEMSIM-400\r\
C|1|I|Sample^haemolysed|G\r\
L|1|N\r";

    #[test]
    fn realistic_chemistry_message() {
        let m = parse(CHEMISTRY);
        assert!(m.complete);
        assert_eq!(m.termination_code.as_deref(), Some("N"));
        let counts: Vec<(&str, usize)> = m
            .record_counts
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            counts,
            vec![("C", 1), ("H", 1), ("L", 1), ("O", 1), ("P", 1), ("R", 3)]
        );

        let i = &m.instrument;
        assert_eq!(i.name.as_deref(), Some("CHEMSIM-400"));
        assert_eq!(i.software_version.as_deref(), Some("2.3.1"));
        assert_eq!(i.serial_number.as_deref(), Some("SN-0042"));
        assert_eq!(i.message_control_id.as_deref(), Some("MSG0001"));
        assert_eq!(i.receiver_id.as_deref(), Some("LIS"));
        assert_eq!(i.processing_id.as_deref(), Some("P"));
        assert_eq!(i.version.as_deref(), Some("LIS2-A2"));
        let dt = i.message_datetime.as_ref().unwrap();
        // June: British Summer Time.
        assert_eq!(dt.value.as_deref(), Some("2024-06-15T10:30:00+01:00"));

        assert_eq!(m.patients.len(), 1);
        let p = &m.patients[0];
        assert_eq!(p.practice_patient_id.as_deref(), Some("PRAC-77"));
        assert_eq!(p.laboratory_patient_id.as_deref(), Some("LAB-5521"));
        assert_eq!(p.patient_id_3.as_deref(), Some("9990000018"));
        let name = p.name.as_ref().unwrap();
        assert_eq!(name.family.as_deref(), Some("TEST"));
        assert_eq!(name.given.as_deref(), Some("PATIENT"));
        assert_eq!(name.middle.as_deref(), Some("Q"));
        assert_eq!(
            p.birth_date.as_ref().unwrap().value.as_deref(),
            Some("1970-01-01")
        );
        assert_eq!(p.birth_date.as_ref().unwrap().zone, None);
        assert_eq!(p.sex.as_deref(), Some("F"));

        let o = &p.orders[0];
        assert_eq!(o.specimen_id.as_deref(), Some("SPEC-0001"));
        assert_eq!(o.instrument_specimen_id.as_deref(), Some("INST-0001^03^12"));
        let tests: Vec<_> = o
            .universal_test_id
            .iter()
            .map(|c| c.code.clone().unwrap())
            .collect();
        assert_eq!(tests, vec!["GLU", "NA", "K"]);
        assert_eq!(o.priority.as_deref(), Some("R"));
        assert_eq!(o.action_code.as_deref(), Some("N"));
        assert_eq!(o.report_type.as_deref(), Some("F"));
        assert_eq!(
            o.collected_at.as_ref().unwrap().value.as_deref(),
            Some("2024-06-15T08:45:00+01:00")
        );
        assert_eq!(o.observations.len(), 3);

        let json = serde_json::to_value(&o.observations[0]).unwrap();
        assert_eq!(
            json,
            json!({
                "set_id": 1,
                "code": {"code": "GLU", "text": null, "system": null,
                         "components": ["", "", "", "GLU", "Glucose"]},
                "value": 5.4,
                "value_type": "NM",
                "value_text": "5.40",
                "units": "mmol/L",
                "reference_range": "3.9 to 5.8",
                "abnormal_flags": ["N"],
                "result_status": "F",
                "operator": "OP1^SUP2",
                "started_at": {"value": "2024-06-15T10:10:00+01:00", "astm": "20240615101000",
                               "precision": "second", "zone": "assumed"},
                "completed_at": {"value": "2024-06-15T10:25:00+01:00", "astm": "20240615102500",
                                 "precision": "second", "zone": "assumed"},
                "instrument_id": "CHEMSIM-400",
                "comments": []
            })
        );
        let na = &o.observations[1];
        assert_eq!(na.value, json!(141));
        // Not an ASTM escape: kept as sent; a string value with flags from repeats.
        let k = &o.observations[2];
        assert_eq!(k.value, json!("&lt;1.5"));
        assert_eq!(k.value_type.as_deref(), Some("ST"));
        assert_eq!(k.abnormal_flags, vec!["L", "LL"]);
        // The comment after R3 belongs to R3.
        assert_eq!(k.comments.len(), 1);
        assert_eq!(k.comments[0].text.as_deref(), Some("Sample haemolysed"));
        assert_eq!(k.comments[0].source.as_deref(), Some("I"));
        assert_eq!(k.comments[0].comment_type.as_deref(), Some("G"));

        // Snake-case keys at the top, no password anywhere.
        let top = serde_json::to_value(&m).unwrap();
        let keys: Vec<&String> = top.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            vec![
                "comments",
                "complete",
                "delimiters",
                "instrument",
                "manufacturer_records",
                "other_records",
                "patients",
                "queries",
                "record_counts",
                "termination_code"
            ]
        );
        assert_eq!(
            top["delimiters"],
            json!({"field": "|", "repeat": "\\", "component": "^", "escape": "&"})
        );
        assert_eq!(top["patients"][0]["orders"][0].get("implied"), None);
    }

    #[test]
    fn non_default_delimiters_and_escapes() {
        let text = "H!@#$!!!ANALYSER#1\nP!1!!!!DOE#JANE\nO!1!S1!!#LOINC#LN@###LOCAL\n\
                    R!1!#Na$S$K#LN!12.5!g$F$L\nL!1";
        let m = parse(text);
        let d = m.delimiters;
        assert_eq!(
            (d.field, d.repeat, d.component, d.escape),
            ('!', '@', '#', '$')
        );
        assert_eq!(m.instrument.name.as_deref(), Some("ANALYSER"));
        assert_eq!(m.instrument.software_version.as_deref(), Some("1"));
        let name = m.patients[0].name.as_ref().unwrap();
        assert_eq!(
            (name.family.as_deref(), name.given.as_deref()),
            (Some("DOE"), Some("JANE"))
        );
        let codes = &m.patients[0].orders[0].universal_test_id;
        assert_eq!(codes.len(), 2);
        assert_eq!(codes[0].code.as_deref(), None);
        assert_eq!(codes[0].text.as_deref(), Some("LOINC"));
        assert_eq!(codes[0].system.as_deref(), Some("LN"));
        assert_eq!(codes[1].code.as_deref(), Some("LOCAL"));
        let r = &m.patients[0].orders[0].observations[0];
        // $S$ is an escaped component delimiter: the name is one component "Na#K".
        let code = r.code.as_ref().unwrap();
        assert_eq!(code.text.as_deref(), Some("Na#K"));
        assert_eq!(code.system.as_deref(), Some("LN"));
        assert_eq!(r.value, json!(12.5));
        assert_eq!(r.units.as_deref(), Some("g!L"));
        assert!(m.complete);
    }

    #[test]
    fn escape_sequences_decode_and_unknown_ones_stay() {
        let m = parse("H|\\^&\rP|1|A&F&B&S&C&R&D&E&E\rC|1|L|x &X0D& y & z &&R&|G\rL|1\r");
        assert_eq!(
            m.patients[0].practice_patient_id.as_deref(),
            Some("A|B^C\\D&E")
        );
        assert_eq!(
            m.patients[0].comments[0].text.as_deref(),
            Some("x &X0D& y & z &\\")
        );
    }

    #[test]
    fn missing_terminator_means_incomplete() {
        let m = parse("H|\\^&\r\nP|1\r\nO|1|S1\r\nR|1|^^^GLU|5.1\r\n");
        assert!(!m.complete);
        assert_eq!(m.termination_code, None);
        assert_eq!(m.patients[0].orders[0].observations.len(), 1);
        assert!(!m.record_counts.contains_key("L"));
    }

    #[test]
    fn comments_attach_to_the_record_before_them() {
        let m = parse(
            "H|\\^&\rC|1|L|about the message\rP|1\rC|1|L|about the patient\r\
             O|1|S1\rC|1|I|about the order\rC|2|I|and more\rR|1|^^^GLU|5\rC|1|I|about the result\r\
             M|1|VENDOR^X|raw&F&data\rC|1|I|about M\rQ|1|^S1||ALL\rC|1|L|about Q\rL|1|N\r",
        );
        assert_eq!(m.comments[0].text.as_deref(), Some("about the message"));
        let p = &m.patients[0];
        assert_eq!(p.comments[0].text.as_deref(), Some("about the patient"));
        let o = &p.orders[0];
        let texts: Vec<_> = o.comments.iter().map(|c| c.text.clone().unwrap()).collect();
        assert_eq!(texts, vec!["about the order", "and more"]);
        assert_eq!(o.comments[1].sequence, Some(2));
        assert_eq!(
            o.observations[0].comments[0].text.as_deref(),
            Some("about the result")
        );
        // M kept raw (escapes not decoded), with its comment.
        let mr = &m.manufacturer_records[0];
        assert_eq!(mr.record_type, "M");
        assert_eq!(mr.fields, vec!["M", "1", "VENDOR^X", "raw&F&data"]);
        assert_eq!(mr.line, 10);
        assert_eq!(mr.comments[0].text.as_deref(), Some("about M"));
        assert_eq!(m.queries[0].fields[2], "^S1");
        assert_eq!(m.queries[0].comments[0].text.as_deref(), Some("about Q"));
    }

    #[test]
    fn unknown_records_kept_and_implied_parents() {
        let m = parse("H|\\^&\rO|1|QC-LOT-7\rR|1|^^^GLU|5.0\rS|1|x\rL|1\r");
        assert!(m.patients[0].implied);
        assert_eq!(
            m.patients[0].orders[0].specimen_id.as_deref(),
            Some("QC-LOT-7")
        );
        assert_eq!(m.other_records[0].record_type, "S");
        let m = parse("H|\\^&\rR|1|^^^GLU|5.0\rL|1\r");
        assert!(m.patients[0].orders[0].implied);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["patients"][0]["implied"], json!(true));
    }

    #[test]
    fn garbage_lines_are_errors_with_positions() {
        let tz = london();
        assert_eq!(parse_message("", &tz), Err(AstmError::Empty));
        assert_eq!(parse_message("\r\n \r", &tz), Err(AstmError::Empty));
        assert_eq!(
            parse_message("\rP|1\rL|1\r", &tz),
            Err(AstmError::NoHeader { line: 2 })
        );
        assert_eq!(
            parse_message("H|\\^\r", &tz),
            Err(AstmError::BadDelimiters { line: 1 })
        );
        assert_eq!(
            parse_message("H|\\^^|\r", &tz),
            Err(AstmError::BadDelimiters { line: 1 })
        );
        assert_eq!(
            parse_message("HA\\^&\r", &tz),
            Err(AstmError::BadDelimiters { line: 1 })
        );
        assert_eq!(
            parse_message("H|\\^&\rP|1\r\x021R|1\rL|1\r", &tz),
            Err(AstmError::MalformedRecord { line: 3 })
        );
        assert_eq!(
            parse_message("H|\\^&\r\nP|1\r\n\r\nhello world\r\n", &tz),
            Err(AstmError::MalformedRecord { line: 4 })
        );
        assert_eq!(
            parse_message("H|\\^&\rL|1\rH|\\^&\rL|1\r", &tz),
            Err(AstmError::RecordAfterTerminator {
                line: 3,
                record_type: 'H'
            })
        );
        assert_eq!(
            parse_message("H|\\^&\rP|1\rH|\\^&\r", &tz),
            Err(AstmError::UnexpectedHeader { line: 3 })
        );
        // Errors never carry content.
        let e = parse_message("H|\\^&\rTEST^PATIENT 9990000018\r", &tz).unwrap_err();
        assert_eq!(e.to_string(), "line 2: not a record");
    }

    #[test]
    fn timestamps_keep_precision_and_zone() {
        let tz = london();
        let v = |s: &str| parse_timestamp(s, &tz, '^').unwrap();
        // Winter: GMT.
        let t = v("20240115083000");
        assert_eq!(t.value.as_deref(), Some("2024-01-15T08:30:00+00:00"));
        assert_eq!(
            (t.precision, t.zone),
            (Some(Precision::Second), Some(ZoneSource::Assumed))
        );
        assert_eq!(
            v("202407011230").value.as_deref(),
            Some("2024-07-01T12:30:00+01:00")
        );
        assert_eq!(v("202407011230").precision, Some(Precision::Minute));
        assert_eq!(v("2024070112").precision, Some(Precision::Hour));
        let d = v("20240701");
        assert_eq!((d.value.as_deref(), d.zone), (Some("2024-07-01"), None));
        assert_eq!(v("202407").value.as_deref(), Some("2024-07"));
        assert_eq!(v("2024").value.as_deref(), Some("2024"));
        let g = v("20240701123000-0500");
        assert_eq!(g.value.as_deref(), Some("2024-07-01T12:30:00-05:00"));
        assert_eq!(g.zone, Some(ZoneSource::Given));
        assert_eq!(v("20240701123000^xyz").astm, "20240701123000");
        // Local times in the spring-forward gap move forward; in the autumn fold the earlier
        // (summer) offset is taken (jiff's "compatible" disambiguation).
        assert_eq!(
            v("20240331013000").value.as_deref(),
            Some("2024-03-31T02:30:00+01:00")
        );
        assert_eq!(
            v("20241027013000").value.as_deref(),
            Some("2024-10-27T01:30:00+01:00")
        );
        for bad in [
            "20241301",
            "2024010",
            "20240230",
            "2024-01-01",
            "20240101250000",
            "x",
        ] {
            let t = v(bad);
            assert_eq!((t.value, t.precision), (None, None), "{bad}");
            assert_eq!(t.astm, bad);
        }
        assert_eq!(parse_timestamp("  ", &tz, '^'), None);
        // In JSON an invalid timestamp keeps its text.
        let m = parse("H|\\^&||||||||||||yesterday\rL|1\r");
        let j = serde_json::to_value(&m.instrument.message_datetime).unwrap();
        assert_eq!(
            j,
            json!({"value": null, "astm": "yesterday", "precision": null, "zone": null})
        );
    }

    #[test]
    fn values_numbers_strings_and_structured() {
        let m = parse(
            "H|\\^&\rR|1|GLU|  -0.50 \rR|2|2345-7^Glucose^LN|POS^12\rR|3|^^^X|>100\rR|4|^^^X|1e5\r\
             R|5|^^^X|\rR|6|^^^X|007\rR|7|^^^X|1.2.3\rR|8|^^^X|.\rL|1\r",
        );
        let obs = &m.patients[0].orders[0].observations;
        assert_eq!(obs[0].value, json!(-0.5));
        assert_eq!(obs[0].value_text.as_deref(), Some("-0.50"));
        assert_eq!(obs[0].code.as_ref().unwrap().code.as_deref(), Some("GLU"));
        let c = obs[1].code.as_ref().unwrap();
        assert_eq!(
            (c.code.as_deref(), c.text.as_deref(), c.system.as_deref()),
            (Some("2345-7"), Some("Glucose"), Some("LN"))
        );
        assert_eq!(obs[1].value, json!("POS^12"));
        assert_eq!(obs[1].value_type.as_deref(), Some("ST"));
        assert_eq!(obs[2].value, json!(">100"));
        assert_eq!(obs[3].value, json!("1e5"));
        assert_eq!(obs[4].value, serde_json::Value::Null);
        assert_eq!(obs[4].value_type, None);
        assert_eq!(obs[5].value, json!(7));
        assert_eq!(obs[6].value, json!("1.2.3"));
        assert_eq!(obs[7].value, json!("."));
    }

    /// xorshift64* pseudo-random generator for the never-panics loop.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn never_panics_on_random_input() {
        let tz = london();
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let alphabet = b"HPORCQMLS|\\^&!@#$FSRE0123456789.-+\r\n \x02\xc3\xa9";
        let base = CHEMISTRY.as_bytes();
        let mut parsed = 0;
        for round in 0..4000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                let len = (rng.next() % 300) as usize;
                (0..len)
                    .map(|_| {
                        let r = rng.next();
                        if r.is_multiple_of(4) {
                            (r >> 8) as u8
                        } else {
                            alphabet[(r >> 8) as usize % alphabet.len()]
                        }
                    })
                    .collect()
            } else {
                // Mutations of a valid message.
                let mut b = base.to_vec();
                for _ in 0..(rng.next() % 8) {
                    let r = rng.next();
                    let i = (r as usize >> 4) % b.len();
                    match r % 3 {
                        0 => b[i] = alphabet[(r >> 20) as usize % alphabet.len()],
                        1 => {
                            b.remove(i);
                        }
                        _ => b.insert(i, (r >> 28) as u8),
                    }
                }
                b
            };
            if round % 7 == 0 {
                bytes.insert(0, b'H');
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(m) = parse_message(&text, &tz) {
                parsed += 1;
                serde_json::to_string(&m).unwrap();
            }
        }
        assert!(
            parsed > 100,
            "the mutations should often still parse ({parsed})"
        );
    }
}
