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
//! are already gone), or output the header's password field (H-4; [`mask_password`] removes it
//! from text that leaves the appliance). Errors carry line numbers and record types only, never
//! content.
//!
//! Rules worth knowing (docs/contract.md, "Records from serial devices", is the reference):
//! - a test code (O-5, R-3 universal test ID `id^name^type^local code^...`): `code` is
//!   component 1 (the universal test ID, with `system` = component 3) when sent, else the
//!   manufacturer's local code made of ALL components from the fourth on ([`local_code`]:
//!   `^^^ISE^NA` gives `ISE^NA`, never `ISE`), so two analytes never share a `code`; `local`,
//!   `panel`, `universal_id`, `universal_system` and all `components` are kept too;
//! - a scalar member is the first component of the field's first repeat (decoded, trimmed);
//!   when the field holds more than one component or repeat, `<member>_repeats` keeps all of it
//!   (`specimen_id` `5762` with `specimen_id_repeats` `[["5762","01"]]`). Nothing is re-joined
//!   with the message's delimiters;
//! - an R-4 value that is one part and a plain decimal (`-1`, `5.40`, `.5`; no exponent, no
//!   `<`/`>`) becomes a JSON number with `value_type` `NM`; other single parts a string with
//!   `ST`; a value whose only non-empty part is its first component is read as that part
//!   (`40^^` is 40); any other value with parts is `CM`, with `value: null` and the parts in
//!   `value_repeats` (`0^0^3.0`). `value_text` is R-4 exactly as sent (untrimmed, escapes and
//!   delimiters as in the message);
//! - comment text (C-4) is, everywhere, each repeat's non-empty components joined by a space and
//!   the repeats by a newline, with `text_repeats` when it has parts;
//! - an O without a P before it, or an R without an O, gets a placeholder parent flagged
//!   `implied: true` rather than being refused.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
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

// Precision and zone source are those of every siterelay timestamp (`crate::time`); an ASTM
// timestamp has no fraction, so it never has `Precision::Fraction`.
pub use crate::time::{Precision, ZoneSource};

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

/// A field as sent, when it holds more than one component or repeat: one entry per repeat, each
/// the list of its components (decoded, trimmed, empty ones as `""`).
pub type Repeats = Vec<Vec<String>>;

/// Which component(s) a [`Code`]'s `code` was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeFrom {
    /// Component 1, the universal test ID.
    Universal,
    /// Components 4 and later, the manufacturer's local code ([`Code::local_code`]).
    Local,
}

/// A coded test identifier (O-5, R-3): `universal id^name^type^local code^...`.
///
/// `code` identifies the analyte: component 1 when sent, else the local code made from every
/// local part (components 4 and later), so `^^^ISE^NA` and `^^^ISE^K` never share a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Code {
    /// `universal_id` when sent, else `local_code`.
    pub code: Option<String>,
    /// Where `code` came from; `null` when neither was sent.
    pub code_from: Option<CodeFrom>,
    /// Component 2 (test name).
    pub text: Option<String>,
    /// The coding system of `code`: component 3 when `code` is the universal ID, else `null`
    /// (the type describes component 1, never the local code).
    pub system: Option<String>,
    /// Component 1, the universal test ID.
    pub universal_id: Option<String>,
    /// Component 3, the type (coding system) of the universal test ID, as sent even when
    /// component 1 is empty.
    pub universal_system: Option<String>,
    /// The local parts in canonical form (see [`local_code`]); `null` when none was sent.
    pub local_code: Option<String>,
    /// Components 4 and later, decoded, trailing empty ones dropped.
    pub local: Vec<String>,
    /// Component 4 when more local parts follow it (`ISE` in `^^^ISE^NA`, `CHEM12` in
    /// `^^^CHEM12^GLU`): the panel or test group of analysers that send one.
    pub panel: Option<String>,
    /// Every component, decoded, in order (empty ones as `""`).
    pub components: Vec<String>,
}

/// The canonical form of local code parts: each part written as an ASTM component with the
/// default delimiters (`&` as `&E&`, `|` as `&F&`, `\` as `&R&`, `^` as `&S&`), the parts
/// joined by `^`, whatever delimiters the message used. Trailing empty parts are dropped by the
/// caller. Two different part lists never give the same string, and for an analyser using the
/// default delimiters the result is the text it sent after `^^^` (for example `ISE^NA`).
pub fn local_code(parts: &[String]) -> String {
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('^');
        }
        for c in part.chars() {
            match c {
                '&' => out.push_str("&E&"),
                '|' => out.push_str("&F&"),
                '\\' => out.push_str("&R&"),
                '^' => out.push_str("&S&"),
                c => out.push(c),
            }
        }
    }
    out
}

/// A comment (C record) attached to the record before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Comment {
    /// C-2 sequence number.
    pub sequence: Option<u32>,
    /// C-3 comment source (`I` instrument, `L` computer system).
    pub source: Option<String>,
    /// C-3 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_repeats: Option<Repeats>,
    /// C-4 comment text, for reading: each repeat's non-empty components joined by one space,
    /// the non-empty repeats joined by a newline.
    pub text: Option<String>,
    /// C-4 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_repeats: Option<Repeats>,
    /// C-5 comment type (`G` generic, `T` test name, `P` positive, `N` negative, `I` flag).
    pub comment_type: Option<String>,
    /// C-5 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment_type_repeats: Option<Repeats>,
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
    /// H-3 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_control_id_repeats: Option<Repeats>,
    /// H-10 receiver ID.
    pub receiver_id: Option<String>,
    /// H-10 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver_id_repeats: Option<Repeats>,
    /// H-12 processing ID (`P` production, `T` training, `D` debugging, `Q` QC).
    pub processing_id: Option<String>,
    /// H-12 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_id_repeats: Option<Repeats>,
    /// H-13 version of the record specification.
    pub version: Option<String>,
    /// H-13 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_repeats: Option<Repeats>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Observation {
    /// R-2 sequence number.
    pub set_id: Option<u32>,
    /// R-3 universal test ID.
    pub code: Option<Code>,
    /// R-4 data value: a JSON number when it is a plain decimal, else a string; `null` when
    /// empty, and when it has a non-empty part other than its first component (`value_type`
    /// `CM`: read `value_repeats`).
    pub value: serde_json::Value,
    /// `NM` when `value` is a number, `ST` when a string, `CM` when R-4 has a non-empty part
    /// other than its first component (`value` is then `null`), `null` when empty.
    pub value_type: Option<String>,
    /// R-4 exactly as sent: not trimmed, escapes not decoded, delimiters as in the message.
    pub value_text: Option<String>,
    /// R-4 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_repeats: Option<Repeats>,
    /// R-5 units.
    pub units: Option<String>,
    /// R-5 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units_repeats: Option<Repeats>,
    /// R-6 reference range.
    pub reference_range: Option<String>,
    /// R-6 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_range_repeats: Option<Repeats>,
    /// R-7 abnormal flags: the first component of each non-empty repeat.
    pub abnormal_flags: Vec<String>,
    /// R-7 as repeats of components, when a repeat has more than one component.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abnormal_flags_repeats: Option<Repeats>,
    /// R-9 result status (`F` final, `C` correction, `P` preliminary, `X` cannot be done ...).
    pub result_status: Option<String>,
    /// R-9 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_status_repeats: Option<Repeats>,
    /// R-11 operator identification (component 1: the operator who performed the test).
    pub operator: Option<String>,
    /// R-11 as repeats of components, when it has more than one (component 2: the verifier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_repeats: Option<Repeats>,
    /// R-12 date and time the test started.
    pub started_at: Option<TimeValue>,
    /// R-13 date and time the test completed.
    pub completed_at: Option<TimeValue>,
    /// R-14 instrument identification.
    pub instrument_id: Option<String>,
    /// R-14 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instrument_id_repeats: Option<Repeats>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
}

/// An order (O record) and its results.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Order {
    /// O-2 sequence number.
    pub sequence: Option<u32>,
    /// O-3 specimen ID (the computer system's): its first component (the tube's barcode).
    pub specimen_id: Option<String>,
    /// O-3 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specimen_id_repeats: Option<Repeats>,
    /// O-4 instrument specimen ID: its first component.
    pub instrument_specimen_id: Option<String>,
    /// O-4 as repeats of components, when it has more than one (vendors add rack and position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instrument_specimen_id_repeats: Option<Repeats>,
    /// O-5 universal test ID, one entry per non-empty repeat.
    pub universal_test_id: Vec<Code>,
    /// O-6 priority (`S` stat, `A` ASAP, `R` routine ...).
    pub priority: Option<String>,
    /// O-6 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_repeats: Option<Repeats>,
    /// O-7 requested date and time.
    pub requested_at: Option<TimeValue>,
    /// O-8 specimen collection date and time.
    pub collected_at: Option<TimeValue>,
    /// O-12 action code.
    pub action_code: Option<String>,
    /// O-12 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_code_repeats: Option<Repeats>,
    /// O-26 report type (`F` final, `Q` response to query ...).
    pub report_type: Option<String>,
    /// O-26 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_type_repeats: Option<Repeats>,
    /// Comments attached to it.
    pub comments: Vec<Comment>,
    /// Its results.
    pub observations: Vec<Observation>,
    /// True when there was no O record: a placeholder for results sent without one.
    #[serde(skip_serializing_if = "is_false")]
    pub implied: bool,
}

/// A patient (P record) and their orders.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Patient {
    /// P-2 sequence number.
    pub sequence: Option<u32>,
    /// P-3 practice-assigned patient ID: its first component.
    pub practice_patient_id: Option<String>,
    /// P-3 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub practice_patient_id_repeats: Option<Repeats>,
    /// P-4 laboratory-assigned patient ID: its first component.
    pub laboratory_patient_id: Option<String>,
    /// P-4 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub laboratory_patient_id_repeats: Option<Repeats>,
    /// P-5 patient ID No. 3: its first component.
    pub patient_id_3: Option<String>,
    /// P-5 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_id_3_repeats: Option<Repeats>,
    /// P-6 patient name (first repeat).
    pub name: Option<PersonName>,
    /// P-8 birth date: the calendar date as sent (`YYYY-MM-DD` or coarser), never an instant
    /// and never moved by a zone; `astm` keeps the whole P-8.
    pub birth_date: Option<TimeValue>,
    /// P-8's time of day when the analyser sent one, a local time with its precision (and
    /// the offset sent, informative only); `null` otherwise.
    pub birth_time: Option<crate::hl7::time::LocalTime>,
    /// P-9 sex.
    pub sex: Option<String>,
    /// P-9 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sex_repeats: Option<Repeats>,
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
    /// L-3 as repeats of components, when it has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_code_repeats: Option<Repeats>,
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

/// What replaces a header's password (H-4) in text leaving the appliance.
pub const PASSWORD_MASK: &str = "***";

/// The message text with the content of every header record's password field (H-4) replaced by
/// [`PASSWORD_MASK`]; an empty H-4 stays empty, everything else stays byte for byte. Used for
/// the record's `raw`, so the password never reaches the central side. Works on text that does
/// not parse (a second header, bad delimiters): any line that starts with `H` and a
/// non-alphanumeric character (after blanks, control characters or a stray frame number) is
/// taken as a header, with that character as its field delimiter.
pub fn mask_password(text: &str) -> std::borrow::Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    for (_, line) in lines(text) {
        let Some(range) = password_range(line) else {
            continue;
        };
        let start = line.as_ptr() as usize - text.as_ptr() as usize;
        out.push_str(&text[copied..start + range.start]);
        out.push_str(PASSWORD_MASK);
        copied = start + range.end;
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Byte range of a non-empty H-4 in `line`, if `line` is a header record.
fn password_range(line: &str) -> Option<std::ops::Range<usize>> {
    let body = line.trim_start_matches(|c: char| c.is_whitespace() || c.is_control());
    let body = match body.as_bytes() {
        [d, b'H', ..] if d.is_ascii_digit() => &body[1..],
        _ => body,
    };
    let offset = line.len() - body.len();
    let mut chars = body.chars();
    if chars.next() != Some('H') {
        return None;
    }
    let field = chars.next()?;
    if !field.is_ascii_graphic() || field.is_ascii_alphanumeric() {
        return None;
    }
    // Field boundaries: after H-1 (`H`), H-2 (the delimiters) and H-3 comes H-4.
    let mut bounds = body.match_indices(field).map(|(i, _)| i);
    let start = bounds.nth(2)? + 1;
    let end = bounds.next().unwrap_or(body.len());
    (end > start).then(|| offset + start..offset + end)
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

/// `YYYY[MM[DD[HH[MM[SS]]]]]` with an optional `+HHMM`/`-HHMM`, read by the one timestamp
/// reader siterelay has (`crate::time::parse_dtm`); ASTM has no fractional seconds, so a value
/// with one is not a timestamp here.
fn normalise_timestamp(s: &str, tz: &TimeZone) -> Option<(String, Precision, Option<ZoneSource>)> {
    if s.contains('.') {
        return None;
    }
    let tv = crate::time::parse_dtm(s, tz, b'^')?;
    Some((tv.value, tv.precision, tv.zone))
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

    /// Whether a field was sent with more than one component or repeat (escaped delimiters
    /// are text, not delimiters).
    fn structured(&self, raw: &str) -> bool {
        raw.contains(self.d.component) || raw.contains(self.d.repeat)
    }

    /// A whole field: its repeats, each its decoded, trimmed components.
    fn repeats(&self, raw: &str) -> Repeats {
        raw.split(self.d.repeat)
            .map(|r| self.components(r))
            .collect()
    }

    fn first_repeat<'s>(&self, raw: &'s str) -> &'s str {
        raw.split(self.d.repeat).next().unwrap_or("")
    }

    /// A scalar member: the first component of the first repeat (decoded, trimmed; `None` when
    /// empty), and the whole field as repeats when it was sent with more than one part, so
    /// nothing is flattened into a string carrying the message's delimiters.
    fn scalar(&self, raw: &str) -> (Option<String>, Option<Repeats>) {
        let first = self
            .first_repeat(raw)
            .split(self.d.component)
            .next()
            .unwrap_or("");
        (
            self.text(first),
            self.structured(raw).then(|| self.repeats(raw)),
        )
    }

    fn time(&self, raw: &str) -> Option<TimeValue> {
        parse_timestamp(self.first_repeat(raw), self.tz, self.d.component)
    }

    /// P-8: the date as sent and, apart, the time of day (`crate::hl7::time::parse_birth`, the
    /// rule HL7's PID-7 follows). A value that is not a timestamp is kept as sent, `value` null.
    fn birth(&self, raw: &str) -> (Option<TimeValue>, Option<crate::hl7::time::LocalTime>) {
        let tv = self.time(raw);
        let Some(tv) = tv else {
            return (None, None);
        };
        if tv.value.is_none() {
            return (Some(tv), None);
        }
        match crate::hl7::time::parse_birth(&tv.astm, b'^') {
            Some((date, time)) => (
                Some(TimeValue {
                    value: Some(date.value),
                    astm: tv.astm,
                    precision: Some(date.precision),
                    zone: None,
                }),
                time,
            ),
            None => (Some(tv), None),
        }
    }

    fn code(&self, repeat: &str) -> Option<Code> {
        let components = self.components(repeat);
        if components.iter().all(|c| c.is_empty()) {
            return None;
        }
        let get = |i: usize| components.get(i).filter(|c| !c.is_empty()).cloned();
        let mut local: Vec<String> = components.iter().skip(3).cloned().collect();
        while local.last().is_some_and(|p| p.is_empty()) {
            local.pop();
        }
        let local_code = (!local.is_empty()).then(|| local_code(&local));
        let panel = (local.len() > 1 && !local[0].is_empty()).then(|| local[0].clone());
        let universal_id = get(0);
        let universal_system = get(2);
        let (code, code_from, system) = match &universal_id {
            Some(id) => (
                Some(id.clone()),
                Some(CodeFrom::Universal),
                universal_system.clone(),
            ),
            None => (
                local_code.clone(),
                local_code.as_ref().map(|_| CodeFrom::Local),
                None,
            ),
        };
        Some(Code {
            code,
            code_from,
            text: get(1),
            system,
            universal_id,
            universal_system,
            local_code,
            local,
            panel,
            components,
        })
    }

    fn codes(&self, raw: &str) -> Vec<Code> {
        raw.split(self.d.repeat)
            .filter_map(|r| self.code(r))
            .collect()
    }

    fn comment(&self, f: &Fields) -> Comment {
        let raw = f.get(4);
        let text = self
            .repeats(raw)
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|r| !r.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let (source, source_repeats) = self.scalar(f.get(3));
        let (comment_type, comment_type_repeats) = self.scalar(f.get(5));
        Comment {
            sequence: seq(f.get(2)),
            source,
            source_repeats,
            text: (!text.is_empty()).then_some(text),
            text_repeats: self.structured(raw).then(|| self.repeats(raw)),
            comment_type,
            comment_type_repeats,
        }
    }

    fn instrument(&self, f: &Fields) -> Instrument {
        let sender: Vec<String> = self.components(self.first_repeat(f.get(5)));
        let get = |i: usize| sender.get(i).filter(|c| !c.is_empty()).cloned();
        let (message_control_id, message_control_id_repeats) = self.scalar(f.get(3));
        let (receiver_id, receiver_id_repeats) = self.scalar(f.get(10));
        let (processing_id, processing_id_repeats) = self.scalar(f.get(12));
        let (version, version_repeats) = self.scalar(f.get(13));
        Instrument {
            name: get(0),
            software_version: get(1),
            serial_number: get(2),
            sender: if sender.iter().all(|c| c.is_empty()) {
                Vec::new()
            } else {
                sender.clone()
            },
            message_control_id,
            message_control_id_repeats,
            receiver_id,
            receiver_id_repeats,
            processing_id,
            processing_id_repeats,
            version,
            version_repeats,
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
        let (practice_patient_id, practice_patient_id_repeats) = self.scalar(f.get(3));
        let (laboratory_patient_id, laboratory_patient_id_repeats) = self.scalar(f.get(4));
        let (patient_id_3, patient_id_3_repeats) = self.scalar(f.get(5));
        let (sex, sex_repeats) = self.scalar(f.get(9));
        let (birth_date, birth_time) = self.birth(f.get(8));
        Patient {
            sequence: seq(f.get(2)),
            practice_patient_id,
            practice_patient_id_repeats,
            laboratory_patient_id,
            laboratory_patient_id_repeats,
            patient_id_3,
            patient_id_3_repeats,
            name: has_name.then_some(name),
            birth_date,
            birth_time,
            sex,
            sex_repeats,
            ..Patient::default()
        }
    }

    fn order(&self, f: &Fields) -> Order {
        let (specimen_id, specimen_id_repeats) = self.scalar(f.get(3));
        let (instrument_specimen_id, instrument_specimen_id_repeats) = self.scalar(f.get(4));
        let (priority, priority_repeats) = self.scalar(f.get(6));
        let (action_code, action_code_repeats) = self.scalar(f.get(12));
        let (report_type, report_type_repeats) = self.scalar(f.get(26));
        Order {
            sequence: seq(f.get(2)),
            specimen_id,
            specimen_id_repeats,
            instrument_specimen_id,
            instrument_specimen_id_repeats,
            universal_test_id: self.codes(f.get(5)),
            priority,
            priority_repeats,
            requested_at: self.time(f.get(7)),
            collected_at: self.time(f.get(8)),
            action_code,
            action_code_repeats,
            report_type,
            report_type_repeats,
            ..Order::default()
        }
    }

    /// R-4: a number or a string when its only non-empty part is its first component (empty
    /// parts carry nothing, so `40^^` is the number 40, its parts still in `value_repeats`);
    /// anything else with parts is `CM` with `value: null`, read from `value_repeats`.
    fn value(&self, raw: &str) -> (serde_json::Value, Option<String>, Option<Repeats>) {
        let repeats = self.structured(raw).then(|| self.repeats(raw));
        let single = match &repeats {
            None => self.text(raw),
            Some(reps) => {
                let mut non_empty = reps.iter().enumerate().flat_map(|(r, comps)| {
                    comps
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| !c.is_empty())
                        .map(move |(i, c)| (r, i, c))
                });
                match (non_empty.next(), non_empty.next()) {
                    (None, _) => None,
                    (Some((0, 0, c)), None) => Some(c.clone()),
                    _ => return (serde_json::Value::Null, Some("CM".into()), repeats),
                }
            }
        };
        let (value, value_type) = match single {
            None => (serde_json::Value::Null, None),
            Some(t) => match crate::hl7::normalise::parse_nm(&t) {
                Some(n) => (serde_json::Value::Number(n), Some("NM".to_string())),
                None => (serde_json::Value::String(t), Some("ST".to_string())),
            },
        };
        (value, value_type, repeats)
    }

    fn observation(&self, f: &Fields) -> Observation {
        let raw = f.get(4);
        let (value, value_type, value_repeats) = self.value(raw);
        let (units, units_repeats) = self.scalar(f.get(5));
        let (reference_range, reference_range_repeats) = self.scalar(f.get(6));
        let flags = f.get(7);
        let (result_status, result_status_repeats) = self.scalar(f.get(9));
        let (operator, operator_repeats) = self.scalar(f.get(11));
        let (instrument_id, instrument_id_repeats) = self.scalar(f.get(14));
        Observation {
            set_id: seq(f.get(2)),
            code: self.code(self.first_repeat(f.get(3))),
            value,
            value_type,
            value_text: (!raw.is_empty()).then(|| raw.to_string()),
            value_repeats,
            units,
            units_repeats,
            reference_range,
            reference_range_repeats,
            abnormal_flags: flags
                .split(self.d.repeat)
                .filter_map(|r| self.scalar(r).0)
                .collect(),
            abnormal_flags_repeats: flags
                .contains(self.d.component)
                .then(|| self.repeats(flags)),
            result_status,
            result_status_repeats,
            operator,
            operator_repeats,
            started_at: self.time(f.get(12)),
            completed_at: self.time(f.get(13)),
            instrument_id,
            instrument_id_repeats,
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
        termination_code_repeats: None,
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
                (msg.termination_code, msg.termination_code_repeats) = ctx.scalar(f.get(3));
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
        implied: true,
        ..Patient::default()
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
            implied: true,
            ..Order::default()
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
        // O-4 `INST-0001^03^12`: the ID, then rack and position, never re-joined.
        assert_eq!(o.instrument_specimen_id.as_deref(), Some("INST-0001"));
        assert_eq!(
            o.instrument_specimen_id_repeats,
            Some(vec![vec![
                "INST-0001".to_string(),
                "03".into(),
                "12".into()
            ]])
        );
        assert_eq!(o.specimen_id_repeats, None);
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
                "code": {"code": "GLU^Glucose", "code_from": "local", "text": null,
                         "system": null, "universal_id": null, "universal_system": null,
                         "local_code": "GLU^Glucose", "local": ["GLU", "Glucose"],
                         "panel": "GLU", "components": ["", "", "", "GLU", "Glucose"]},
                "value": 5.4,
                "value_type": "NM",
                "value_text": "5.40",
                "units": "mmol/L",
                "reference_range": "3.9 to 5.8",
                "abnormal_flags": ["N"],
                "result_status": "F",
                "operator": "OP1",
                "operator_repeats": [["OP1", "SUP2"]],
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
        // LN types an empty universal ID: kept, but not as the system of any code.
        assert_eq!(codes[0].system.as_deref(), None);
        assert_eq!(codes[0].universal_system.as_deref(), Some("LN"));
        assert_eq!(codes[1].code.as_deref(), Some("LOCAL"));
        let r = &m.patients[0].orders[0].observations[0];
        // $S$ is an escaped component delimiter: the name is one component "Na#K".
        let code = r.code.as_ref().unwrap();
        assert_eq!(code.text.as_deref(), Some("Na#K"));
        assert_eq!(code.universal_system.as_deref(), Some("LN"));
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
        // value_text is R-4 exactly as sent, spaces included.
        assert_eq!(obs[0].value_text.as_deref(), Some("  -0.50 "));
        assert_eq!(obs[0].code.as_ref().unwrap().code.as_deref(), Some("GLU"));
        let c = obs[1].code.as_ref().unwrap();
        assert_eq!(
            (c.code.as_deref(), c.text.as_deref(), c.system.as_deref()),
            (Some("2345-7"), Some("Glucose"), Some("LN"))
        );
        // Two non-empty parts: no single value; the parts, never `"POS^12"`.
        assert_eq!(obs[1].value, serde_json::Value::Null);
        assert_eq!(obs[1].value_type.as_deref(), Some("CM"));
        assert_eq!(
            obs[1].value_repeats,
            Some(vec![vec!["POS".to_string(), "12".into()]])
        );
        assert_eq!(obs[1].value_text.as_deref(), Some("POS^12"));
        assert_eq!(obs[2].value, json!(">100"));
        assert_eq!(obs[3].value, json!("1e5"));
        assert_eq!(obs[4].value, serde_json::Value::Null);
        assert_eq!(obs[4].value_type, None);
        assert_eq!(obs[5].value, json!(7));
        assert_eq!(obs[6].value, json!("1.2.3"));
        assert_eq!(obs[7].value, json!("."));
    }

    // Issue 10, finding 8: a result's code identifies the analyte.

    fn result_codes(text: &str) -> Vec<Code> {
        parse(text).patients[0].orders[0]
            .observations
            .iter()
            .map(|o| o.code.clone().unwrap())
            .collect()
    }

    #[test]
    fn sodium_potassium_and_chloride_from_one_ise_module_never_share_a_code() {
        let codes = result_codes(
            "H|\\^&\rP|1\rO|1|S1||^^^ISE\rR|1|^^^ISE^NA|139|mmol/L\rR|2|^^^ISE^K|4.2|mmol/L\r\
             R|3|^^^ISE^CL|111|mmol/L\rL|1|N\r",
        );
        let got: Vec<_> = codes.iter().map(|c| c.code.as_deref().unwrap()).collect();
        assert_eq!(got, ["ISE^NA", "ISE^K", "ISE^CL"]);
        for (c, analyte) in codes.iter().zip(["NA", "K", "CL"]) {
            assert_eq!(c.code_from, Some(CodeFrom::Local));
            assert_eq!(c.panel.as_deref(), Some("ISE"));
            assert_eq!(c.local, ["ISE", analyte]);
            assert_eq!(c.local_code, c.code);
            assert_eq!(
                (c.system.as_deref(), c.universal_id.as_deref()),
                (None, None)
            );
        }
        // The order's single ISE test is a code of its own, without a panel.
        let order = &parse("H|\\^&\rO|1|S1||^^^ISE\rL|1\r").patients[0].orders[0];
        let ise = &order.universal_test_id[0];
        assert_eq!(
            (ise.code.as_deref(), ise.panel.as_deref()),
            (Some("ISE"), None)
        );
    }

    #[test]
    fn every_result_of_a_chem12_panel_has_its_own_code() {
        let analytes = [
            "GLU", "BUN", "CREA", "NA", "K", "CL", "CO2", "CA", "TP", "ALB", "TBIL", "ALP",
        ];
        let mut text = String::from("H|\\^&\rP|1\rO|1|S1||^^^CHEM12\r");
        for (i, a) in analytes.iter().enumerate() {
            text += &format!("R|{}|^^^CHEM12^{a}|{}|\r", i + 1, i + 1);
        }
        text += "L|1|N\r";
        let codes = result_codes(&text);
        let mut distinct: Vec<_> = codes.iter().map(|c| c.code.clone().unwrap()).collect();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 12, "{distinct:?}");
        assert_eq!(codes[0].code.as_deref(), Some("CHEM12^GLU"));
        assert!(codes.iter().all(|c| c.panel.as_deref() == Some("CHEM12")));
    }

    #[test]
    fn microbiology_mic_and_dosage_results_differ_and_keep_every_local_part() {
        let codes = result_codes(
            "H|\\^&\rP|1\rO|1|S1\rR|1|^^^AM^MIC|<=0.25|ug/mL||S\rR|2|^^^AM^DOSAGE1^COSTCODE|500 mg\r\
             L|1\r",
        );
        assert_eq!(codes[0].code.as_deref(), Some("AM^MIC"));
        assert_eq!(codes[1].code.as_deref(), Some("AM^DOSAGE1^COSTCODE"));
        assert_eq!(codes[1].local, ["AM", "DOSAGE1", "COSTCODE"]);
        assert_eq!(codes[1].panel.as_deref(), Some("AM"));
    }

    #[test]
    fn a_system_sent_for_an_empty_universal_id_is_never_attached_to_the_local_code() {
        let c = &result_codes("H|\\^&\rR|1|^Sodium^LN^NA|139\rL|1\r")[0];
        assert_eq!(
            serde_json::to_value(c).unwrap(),
            json!({"code": "NA", "code_from": "local", "text": "Sodium", "system": null,
                   "universal_id": null, "universal_system": "LN", "local_code": "NA",
                   "local": ["NA"], "panel": null, "components": ["", "Sodium", "LN", "NA"]})
        );
        // A universal ID is the code, with its system; the local code is still there.
        let c = &result_codes("H|\\^&\rR|1|2951-2^Sodium^LN^NA|139\rL|1\r")[0];
        assert_eq!(
            (c.code.as_deref(), c.code_from, c.system.as_deref()),
            (Some("2951-2"), Some(CodeFrom::Universal), Some("LN"))
        );
        assert_eq!(c.local_code.as_deref(), Some("NA"));
    }

    #[test]
    fn local_codes_have_one_canonical_form_whatever_the_message_delimiters() {
        let code = |text: &str| result_codes(text)[0].clone();
        // Other delimiters, same analyser: the same code.
        assert_eq!(
            code("H!@#$\rR!1!###ISE#NA!139\rL!1\r").code.as_deref(),
            Some("ISE^NA")
        );
        // An escaped component delimiter is text inside a part, a real one separates parts.
        let escaped = code("H|\\^&\rR|1|^^^A&S&B|1\rL|1\r");
        assert_eq!(escaped.local, ["A^B"]);
        assert_eq!(escaped.code.as_deref(), Some("A&S&B"));
        assert_eq!(
            code("H|\\^&\rR|1|^^^A^B|1\rL|1\r").code.as_deref(),
            Some("A^B")
        );
        // With `#` as component delimiter, `#` inside a part is ordinary text in the canonical form.
        assert_eq!(
            code("H|\\#&\rR|1|###A&S&B#C|1\rL|1\r").code.as_deref(),
            Some("A#B^C")
        );
        // Trailing empty parts dropped, inner and leading ones kept.
        let c = code("H|\\^&\rR|1|^^^ISE^NA^^|1\rL|1\r");
        assert_eq!((c.code.as_deref(), c.local.len()), (Some("ISE^NA"), 2));
        let c = code("H|\\^&\rR|1|^^^X^^Y|1\rL|1\r");
        assert_eq!(
            (c.code.as_deref(), c.local.clone()),
            (Some("X^^Y"), vec!["X".into(), "".into(), "Y".into()])
        );
        let c = code("H|\\^&\rR|1|^^^^NA|1\rL|1\r");
        assert_eq!((c.code.as_deref(), c.panel.as_deref()), (Some("^NA"), None));
        assert_eq!(
            local_code(&["a&b".into(), "c|d\\e^f".into()]),
            "a&E&b^c&F&d&R&e&S&f"
        );
        // A name alone is not a code.
        let c = code("H|\\^&\rR|1|^Glucose|1\rL|1\r");
        assert_eq!(
            (c.code, c.code_from, c.text.as_deref()),
            (None, None, Some("Glucose"))
        );
    }

    // Issue 10, finding 9: parts stay parts; value_text is R-4 as sent.

    #[test]
    fn multi_part_values_are_kept_as_parts_never_as_strings_with_delimiters() {
        let m = parse("H|\\^&\rR|1|^^^TITRE|40^^\rR|2|^^^HBV|0^0^3.0\rR|3|^^^X|^^\rL|1\r");
        let obs = &m.patients[0].orders[0].observations;
        // `40^^`: the empty parts carry nothing; the value is 40.
        assert_eq!(
            (obs[0].value.clone(), obs[0].value_type.as_deref()),
            (json!(40), Some("NM"))
        );
        assert_eq!(
            obs[0].value_repeats,
            Some(vec![vec!["40".to_string(), "".into(), "".into()]])
        );
        assert_eq!(obs[0].value_text.as_deref(), Some("40^^"));
        // `0^0^3.0`: three parts, no single value.
        assert_eq!(
            (obs[1].value.clone(), obs[1].value_type.as_deref()),
            (json!(null), Some("CM"))
        );
        assert_eq!(
            obs[1].value_repeats,
            Some(vec![vec!["0".to_string(), "0".into(), "3.0".into()]])
        );
        // Delimiters only: empty.
        assert_eq!(
            (obs[2].value.clone(), obs[2].value_type.as_deref()),
            (json!(null), None)
        );
        assert_eq!(obs[2].value_text.as_deref(), Some("^^"));
    }

    #[test]
    fn a_real_delimiter_and_an_escaped_one_are_told_apart() {
        let m = parse("H|\\#&\rR|1|###X|40##\rR|2|###X|40&S&&S&\rL|1\r");
        let obs = &m.patients[0].orders[0].observations;
        assert_eq!(obs[0].value, json!(40));
        assert_eq!(
            obs[0].value_repeats,
            Some(vec![vec!["40".to_string(), "".into(), "".into()]])
        );
        assert_eq!(obs[0].value_text.as_deref(), Some("40##"));
        assert_eq!(
            (obs[1].value.clone(), obs[1].value_type.as_deref()),
            (json!("40##"), Some("ST"))
        );
        assert_eq!(obs[1].value_repeats, None);
        assert_eq!(obs[1].value_text.as_deref(), Some("40&S&&S&"));
    }

    #[test]
    fn specimen_ids_keep_their_parts_and_the_tube_barcode_matches() {
        let m = parse(
            "H|\\^&\rP|1|9990000018^^^NHS\rO|1|5762^01|1122206642^^^\\1122206642^^^|^^^A1c|R\rL|1\r",
        );
        let p = &m.patients[0];
        assert_eq!(p.practice_patient_id.as_deref(), Some("9990000018"));
        let o = &p.orders[0];
        assert_eq!(o.specimen_id.as_deref(), Some("5762"));
        assert_eq!(
            o.specimen_id_repeats,
            Some(vec![vec!["5762".to_string(), "01".into()]])
        );
        assert_eq!(o.instrument_specimen_id.as_deref(), Some("1122206642"));
        let one = vec!["1122206642".to_string(), "".into(), "".into(), "".into()];
        assert_eq!(
            o.instrument_specimen_id_repeats,
            Some(vec![one.clone(), one])
        );
        // Nothing in the normalised patient carries the message's delimiters.
        let json = serde_json::to_string(&m.patients).unwrap();
        assert!(!json.contains('^') && !json.contains("\\\\"), "{json}");
        // A single-part id has no repeats member at all.
        let o =
            serde_json::to_value(&parse("H|\\^&\rO|1|S1\rL|1\r").patients[0].orders[0]).unwrap();
        assert_eq!(
            (o.get("specimen_id"), o.get("specimen_id_repeats")),
            (Some(&json!("S1")), None)
        );
    }

    #[test]
    fn value_text_is_r4_exactly_as_sent() {
        let m =
            parse("H|\\^&\rR|1|^^^X| 5.40 \rR|2|^^^X|1&S&2\rR|3|^^^X|&lt;1.5\rR|4|^^^X|\rL|1\r");
        let obs = &m.patients[0].orders[0].observations;
        let texts: Vec<_> = obs.iter().map(|o| o.value_text.as_deref()).collect();
        assert_eq!(
            texts,
            [Some(" 5.40 "), Some("1&S&2"), Some("&lt;1.5"), None]
        );
        assert_eq!(obs[0].value, json!(5.4));
        assert_eq!(obs[1].value, json!("1^2"));
    }

    #[test]
    fn every_scalar_field_keeps_its_parts_when_it_has_several() {
        // O-6 priority, O-12 action code and O-26 report type.
        let order = format!("O|1|S1||^^^X|R^S{}N^Y{}F^Q", "|".repeat(6), "|".repeat(14));
        let m = parse(&format!(
            "H|\\^&\rP|1|A^B|C\\D|E||||M^X\r{order}\r\
             R|1|^^^X|1|mmol^L|3.5^5.0|H^x\\L||F^C||OP1^SUP2|||INST^2\rC|1|I^L|t|G^T\rL|1|N^E\r",
        ));
        let v = serde_json::to_value(&m).unwrap();
        let p = &v["patients"][0];
        assert_eq!(p["practice_patient_id_repeats"], json!([["A", "B"]]));
        assert_eq!(p["laboratory_patient_id"], json!("C"));
        assert_eq!(p["laboratory_patient_id_repeats"], json!([["C"], ["D"]]));
        assert_eq!(p.get("patient_id_3_repeats"), None);
        assert_eq!(
            (&p["sex"], &p["sex_repeats"]),
            (&json!("M"), &json!([["M", "X"]]))
        );
        let o = &p["orders"][0];
        assert_eq!(o["priority_repeats"], json!([["R", "S"]]));
        assert_eq!(o["action_code_repeats"], json!([["N", "Y"]]));
        assert_eq!(o["report_type_repeats"], json!([["F", "Q"]]));
        let r = &o["observations"][0];
        assert_eq!(
            (&r["units"], &r["units_repeats"]),
            (&json!("mmol"), &json!([["mmol", "L"]]))
        );
        assert_eq!(r["reference_range_repeats"], json!([["3.5", "5.0"]]));
        assert_eq!(r["abnormal_flags"], json!(["H", "L"]));
        assert_eq!(r["abnormal_flags_repeats"], json!([["H", "x"], ["L"]]));
        assert_eq!(r["result_status_repeats"], json!([["F", "C"]]));
        assert_eq!(r["operator_repeats"], json!([["OP1", "SUP2"]]));
        assert_eq!(r["instrument_id_repeats"], json!([["INST", "2"]]));
        let c = &r["comments"][0];
        assert_eq!(
            (&c["source"], &c["source_repeats"]),
            (&json!("I"), &json!([["I", "L"]]))
        );
        assert_eq!(c["comment_type_repeats"], json!([["G", "T"]]));
        assert_eq!(c.get("text_repeats"), None);
        assert_eq!(
            (&v["termination_code"], &v["termination_code_repeats"]),
            (&json!("N"), &json!([["N", "E"]]))
        );
    }

    // Issue 10, finding 10: the H-4 password never leaves the appliance.

    #[test]
    fn the_header_password_is_masked_in_raw_text() {
        let text = "H|\\^&|MSG1|PSWD|ANALYSER^1.0|||||LIS||P|1\r\nP|1\r\nL|1\r\n";
        assert_eq!(
            mask_password(text),
            "H|\\^&|MSG1|***|ANALYSER^1.0|||||LIS||P|1\r\nP|1\r\nL|1\r\n"
        );
        // Components and repeats of the password go too; other delimiters work.
        assert_eq!(
            mask_password("H!@#$!!Pass#word1@x!SENDER\rL!1\r"),
            "H!@#$!!***!SENDER\rL!1\r"
        );
        // Even when the message does not parse: a second header, a password at the end,
        // leading blanks or a stray frame number.
        assert_eq!(
            mask_password("H|\\^&||PSWD\rP|1\r 1H|\\^&||Password1|\rL|1\r"),
            "H|\\^&||***\rP|1\r 1H|\\^&||***|\rL|1\r"
        );
        assert!(parse_message("H|\\^&||PSWD\rP|1\rH|\\^&||Password1|\rL|1\r", &london()).is_err());
        // Nothing to mask: the text is not copied.
        for text in [
            "H|\\^&|||X\rL|1\r",
            "H|\\^&\r",
            "P|1|PSWD|Password1\r",
            "Hello|a|b|c\r",
        ] {
            assert!(matches!(mask_password(text), std::borrow::Cow::Borrowed(t) if t == text));
        }
        // The normalised message never had it.
        let m = parse("H|\\^&||Password1|ANALYSER\rP|1\rL|1\r");
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("Password1"), "{json}");
    }

    // Issue 10, finding 11: Windows-1252 text, and comment text one way everywhere.

    #[test]
    fn a_windows_1252_comment_and_reference_range_read_as_the_analyser_wrote_them() {
        use crate::hl7::charset::{Charset, decode};
        let bytes = b"H|\\^&|||WINLAB\rP|1\rO|1|S1\rR|1|^^^K|4.1|mmol/L|3.5\x965.0|N\r\
                      C|1|I|\x84Probe h\xe4molytisch\x93 \x80|G\rL|1\r";
        let m = parse(&decode(bytes, None, Charset::Windows1252).unwrap());
        let r = &m.patients[0].orders[0].observations[0];
        assert_eq!(r.reference_range.as_deref(), Some("3.5–5.0"));
        assert_eq!(r.comments[0].text.as_deref(), Some("„Probe hämolytisch“ €"));
        // Read as Latin-1 the same bytes hide control characters (what users saw before).
        let m = parse(&decode(bytes, None, Charset::Latin1).unwrap());
        let r = &m.patients[0].orders[0].observations[0];
        assert_eq!(r.reference_range.as_deref(), Some("3.5\u{96}5.0"));
    }

    #[test]
    fn comment_text_joins_components_with_spaces_and_repeats_with_newlines_wherever_it_is() {
        let body = "Sample^ haemolysed ^^\\\\second^line&S&kept";
        let m = parse(&format!(
            "H|\\^&\rC|1|I|{body}|G\rP|1\rC|1|I|{body}|G\rO|1|S1\rC|1|I|{body}|G\r\
             R|1|^^^X|1\rC|1|I|{body}|G\rM|1|X\rC|1|I|{body}|G\rQ|1|^S1\rC|1|I|{body}|G\rL|1\r"
        ));
        let o = &m.patients[0].orders[0];
        let all = [
            &m.comments[0],
            &m.patients[0].comments[0],
            &o.comments[0],
            &o.observations[0].comments[0],
            &m.manufacturer_records[0].comments[0],
            &m.queries[0].comments[0],
        ];
        for c in all {
            assert_eq!(
                c.text.as_deref(),
                Some("Sample haemolysed\nsecond line^kept")
            );
            assert_eq!(
                c.text_repeats,
                Some(vec![
                    vec![
                        "Sample".to_string(),
                        "haemolysed".into(),
                        "".into(),
                        "".into()
                    ],
                    vec!["".into()],
                    vec!["second".into(), "line^kept".into()],
                ])
            );
        }
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

    #[test]
    fn a_birth_date_sent_with_a_time_stays_the_date_sent_and_the_time_is_kept_apart() {
        // 00:30 at +01:00 is 23:30 UTC the day before: converting would move the birthday.
        let text = "H|\\^&\rP|1||||SYNTHETIC^ECHO||199909090030+0100|F\rL|1|N\r";
        let tz = TimeZone::get("Europe/London").unwrap();
        let m = parse_message(text, &tz).unwrap();
        let p = &m.patients[0];
        let d = p.birth_date.as_ref().unwrap();
        assert_eq!(d.value.as_deref(), Some("1999-09-09"));
        assert_eq!(d.astm, "199909090030+0100");
        assert_eq!((d.precision, d.zone), (Some(Precision::Day), None));
        let t = p.birth_time.as_ref().unwrap();
        assert_eq!(
            (t.value.as_str(), t.offset.as_deref()),
            ("00:30", Some("+01:00"))
        );
        // A date alone has no time; a value that is not a timestamp is kept as sent.
        let m = parse_message("H|\\^&\rP|1||||X||19751231\rL|1\r", &tz).unwrap();
        assert_eq!(
            m.patients[0].birth_date.as_ref().unwrap().value.as_deref(),
            Some("1975-12-31")
        );
        assert!(m.patients[0].birth_time.is_none());
        let m = parse_message("H|\\^&\rP|1||||X||19751331\rL|1\r", &tz).unwrap();
        let d = m.patients[0].birth_date.as_ref().unwrap();
        assert_eq!((d.value.as_deref(), d.astm.as_str()), (None, "19751331"));
    }
}
