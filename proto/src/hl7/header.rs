//! MSH parsing: reads the delimiters and the routing/ACK fields of an HL7 v2
//! message header straight from bytes, plus HL7 escape encoding/decoding.
//!
//! It works on `&[u8]` because the message charset is only known after MSH-18
//! has been read; MSH is ASCII in practice and other bytes in it are decoded
//! without failing (see [`Header::msh_encoding`]). One pass over the MSH
//! segment, no allocation beyond the `Header`'s own strings.
//!
//! Deliberately NOT done here: no parsing of segments after MSH, no batch
//! (FHS/BHS) handling (reported as [`HeaderError::Batch`]), no decoding of the
//! message body (see `crate::hl7::charset`), no semantic checks beyond what an
//! ACK needs (processing id and dates are not validated). Errors never carry
//! field values, only field positions, so they are safe to log.

use memchr::{memchr, memchr2};

use crate::hl7::charset::Charset;

/// The five (or six, v2.7+) HL7 delimiters from MSH-1 and MSH-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiters {
    /// Field separator (MSH-1), usually `|`.
    pub field: u8,
    /// Component separator, usually `^`.
    pub component: u8,
    /// Repetition separator, usually `~`.
    pub repetition: u8,
    /// Escape character, usually `\`.
    pub escape: u8,
    /// Subcomponent separator, usually `&`.
    pub subcomponent: u8,
    /// Truncation character (v2.7+, usually `#`), when MSH-2 has five characters.
    pub truncation: Option<u8>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Delimiters {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// MSH-2 exactly as it was received (4 or 5 characters).
    pub fn encoding_characters(&self) -> String {
        let mut s = String::with_capacity(5);
        for b in [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ] {
            s.push(char::from(b));
        }
        if let Some(t) = self.truncation {
            s.push(char::from(t));
        }
        s
    }

    /// Reads fields 1 and 2 of a header segment (`MSH`, `BHS`, `FHS`: same layout); returns the
    /// delimiters and the offset just past MSH-2.
    pub(crate) fn from_header_segment(seg: &[u8]) -> Result<(Delimiters, usize), HeaderError> {
        let bad = |field, reason| Err(HeaderError::BadDelimiters { field, reason });
        let Some(&field) = seg.get(3) else {
            return bad(1, "field separator missing");
        };
        if !is_valid_delimiter(field) {
            return bad(1, "field separator must be printable ASCII punctuation");
        }
        let msh2_end = memchr(field, &seg[4..]).map_or(seg.len(), |i| 4 + i);
        let enc = &seg[4..msh2_end];
        if enc.len() != 4 && enc.len() != 5 {
            return bad(2, "encoding characters must be 4 or 5 characters");
        }
        if !enc.iter().all(|&b| is_valid_delimiter(b)) {
            return bad(2, "encoding characters must be printable ASCII punctuation");
        }
        for (i, &a) in enc.iter().enumerate() {
            if enc[i + 1..].contains(&a) {
                return bad(2, "delimiters must be distinct");
            }
        }
        let d = Delimiters {
            field,
            component: enc[0],
            repetition: enc[1],
            escape: enc[2],
            subcomponent: enc[3],
            truncation: enc.get(4).copied(),
        };
        Ok((d, msh2_end))
    }
}

fn is_valid_delimiter(b: u8) -> bool {
    // Graphic excludes space, CR, LF and other controls; also excludes >= 0x80.
    b.is_ascii_graphic() && !b.is_ascii_alphanumeric()
}

/// The MSH fields siterelay needs to route, store and acknowledge a message.
///
/// Plain fields hold text with HL7 escapes decoded; `*_raw` fields hold the
/// whole field exactly as received (escapes and components intact) so an ACK
/// can mirror it. Optional fields that are empty or the HL7 null `""` are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Delimiters from MSH-1/MSH-2.
    pub delimiters: Delimiters,
    /// MSH-3.1, decoded.
    pub sending_application: Option<String>,
    /// MSH-3 as received.
    pub sending_application_raw: String,
    /// MSH-4.1, decoded.
    pub sending_facility: Option<String>,
    /// MSH-4 as received.
    pub sending_facility_raw: String,
    /// MSH-5.1, decoded.
    pub receiving_application: Option<String>,
    /// MSH-5 as received.
    pub receiving_application_raw: String,
    /// MSH-6.1, decoded.
    pub receiving_facility: Option<String>,
    /// MSH-6 as received.
    pub receiving_facility_raw: String,
    /// MSH-7 (date/time of message) as received, not validated or decoded.
    pub datetime: Option<String>,
    /// MSH-9.1 message type, e.g. `ADT` (ASCII alphanumeric).
    pub message_type: String,
    /// MSH-9.2 trigger event, e.g. `A01`.
    pub trigger_event: Option<String>,
    /// MSH-9.3 message structure, e.g. `ADT_A01`.
    pub message_structure: Option<String>,
    /// MSH-10 message control id, decoded.
    pub control_id: String,
    /// MSH-10 as received (what MSA-2 of the ACK must echo).
    pub control_id_raw: String,
    /// MSH-11.1 processing id, e.g. `P`.
    pub processing_id: String,
    /// MSH-11 as received (with processing mode, if any).
    pub processing_id_raw: String,
    /// MSH-12.1 version id, e.g. `2.5.1` (digits and dots).
    pub version: String,
    /// MSH-12 as received.
    pub version_raw: String,
    /// MSH-15 accept acknowledgment type.
    pub accept_ack_type: Option<String>,
    /// MSH-16 application acknowledgment type.
    pub application_ack_type: Option<String>,
    /// MSH-18 character set, first repetition, as declared (may be unsupported).
    pub charset: Option<String>,
    /// How the MSH bytes were turned into the strings above, and how an ACK
    /// must be encoded to mirror them byte for byte: the declared MSH-18
    /// charset when supported and consistent with the MSH bytes, otherwise
    /// ASCII, else UTF-8 if valid, else Latin-1 (lossless).
    pub msh_encoding: Charset,
}

/// Why an MSH could not be parsed; carries what an HL7 ERR segment needs and
/// never any field value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Nothing but whitespace.
    #[error("message is empty")]
    Empty,
    /// Does not start with an `MSH` segment.
    #[error("message does not start with an MSH segment")]
    NotHl7,
    /// Starts with a batch header (`FHS` or `BHS`); batches are handled elsewhere.
    #[error("message starts with a batch header (FHS/BHS)")]
    Batch,
    /// MSH-1 or MSH-2 unusable.
    #[error("MSH-{field} delimiters are invalid: {reason}")]
    BadDelimiters {
        /// 1 (field separator) or 2 (encoding characters).
        field: u8,
        /// Fixed description of the problem.
        reason: &'static str,
    },
    /// A required MSH field is absent or empty.
    #[error("MSH-{field} ({name}) is required but missing")]
    MissingField {
        /// MSH field position.
        field: u8,
        /// HL7 field name.
        name: &'static str,
    },
    /// An MSH field has an unusable value.
    #[error("MSH-{field} ({name}) is invalid: {reason}")]
    BadField {
        /// MSH field position.
        field: u8,
        /// HL7 field name.
        name: &'static str,
        /// Fixed description of the problem.
        reason: &'static str,
    },
}

impl HeaderError {
    /// HL7 table 0357 error code for an ERR segment.
    pub fn hl7_error_code(&self) -> u16 {
        match self {
            HeaderError::Empty | HeaderError::NotHl7 | HeaderError::Batch => 100,
            HeaderError::MissingField { .. } => 101,
            HeaderError::BadDelimiters { .. } | HeaderError::BadField { .. } => 102,
        }
    }

    /// Segment id and field position of the error, e.g. `("MSH", 10)`.
    pub fn location(&self) -> Option<(&'static str, u8)> {
        match self {
            HeaderError::Empty | HeaderError::NotHl7 | HeaderError::Batch => None,
            HeaderError::BadDelimiters { field, .. }
            | HeaderError::MissingField { field, .. }
            | HeaderError::BadField { field, .. } => Some(("MSH", *field)),
        }
    }
}

/// Highest MSH field we read.
const LAST_FIELD: usize = 18;

/// Parses the MSH segment of `message` (bytes between the MLLP block
/// characters). Leading whitespace, CR/LF and a UTF-8 BOM are skipped; MSH
/// ends at the first CR or LF.
///
/// # Errors
/// A [`HeaderError`] naming the first problem found (by MSH field order);
/// nothing is allocated on the error path.
pub fn parse_header(message: &[u8]) -> Result<Header, HeaderError> {
    let msg = skip_leading_noise(message);
    if msg.is_empty() {
        return Err(HeaderError::Empty);
    }
    if msg.starts_with(b"FHS") || msg.starts_with(b"BHS") {
        return Err(HeaderError::Batch);
    }
    if !msg.starts_with(b"MSH") {
        return Err(HeaderError::NotHl7);
    }
    let seg = &msg[..memchr2(b'\r', b'\n', msg).unwrap_or(msg.len())];
    let (d, mut pos) = Delimiters::from_header_segment(seg)?;

    // fields[n] = MSH-n for 3..=18; empty when absent.
    let mut fields: [&[u8]; LAST_FIELD + 1] = [&[]; LAST_FIELD + 1];
    let mut n = 3;
    while pos < seg.len() && n <= LAST_FIELD {
        let start = pos + 1; // skip the field separator
        let end = memchr(d.field, &seg[start..]).map_or(seg.len(), |i| start + i);
        fields[n] = &seg[start..end];
        n += 1;
        pos = end;
    }

    // Validate on bytes first, so a rejected message allocates nothing.
    let c = d.component;
    let mut type_parts = fields[9].splitn(3, |&b| b == c);
    let message_type = type_parts.next().unwrap_or(&[]);
    let trigger_event = type_parts.next().unwrap_or(&[]);
    let message_structure = first_part(type_parts.next().unwrap_or(&[]), c);
    require(message_type, 9, "message type")?;
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    if !message_type.iter().all(alnum) {
        return Err(bad_field(9, "message type", "must be ASCII alphanumeric"));
    }
    if !is_null(trigger_event) && !trigger_event.iter().all(alnum) {
        return Err(bad_field(9, "trigger event", "must be ASCII alphanumeric"));
    }
    if !is_null(message_structure) && !message_structure.iter().all(|b| alnum(b) || *b == b'_') {
        let reason = "must be ASCII alphanumeric or _";
        return Err(bad_field(9, "message structure", reason));
    }
    require(fields[10], 10, "message control id")?;
    let processing_id = first_part(fields[11], c);
    require(processing_id, 11, "processing id")?;
    let version = first_part(fields[12], c);
    require(version, 12, "version id")?;
    if !version[0].is_ascii_digit() || !version.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
        return Err(bad_field(12, "version id", "must be digits and dots"));
    }

    let charset_field = first_part(fields[18], d.repetition);
    let enc = choose_encoding(seg, charset_field);
    let r = Reader { d, enc };
    Ok(Header {
        delimiters: d,
        sending_application: r.optional(first_part(fields[3], d.component)),
        sending_application_raw: r.raw(fields[3]),
        sending_facility: r.optional(first_part(fields[4], d.component)),
        sending_facility_raw: r.raw(fields[4]),
        receiving_application: r.optional(first_part(fields[5], d.component)),
        receiving_application_raw: r.raw(fields[5]),
        receiving_facility: r.optional(first_part(fields[6], d.component)),
        receiving_facility_raw: r.raw(fields[6]),
        datetime: (!is_null(fields[7])).then(|| r.raw(fields[7])),
        message_type: r.decoded(message_type),
        trigger_event: r.optional(trigger_event),
        message_structure: r.optional(message_structure),
        control_id: r.decoded(fields[10]),
        control_id_raw: r.raw(fields[10]),
        processing_id: r.decoded(processing_id),
        processing_id_raw: r.raw(fields[11]),
        version: r.decoded(version),
        version_raw: r.raw(fields[12]),
        accept_ack_type: r.optional(fields[15]),
        application_ack_type: r.optional(fields[16]),
        charset: r.optional(charset_field),
        msh_encoding: enc,
    })
}

fn bad_field(field: u8, name: &'static str, reason: &'static str) -> HeaderError {
    HeaderError::BadField {
        field,
        name,
        reason,
    }
}

fn skip_leading_noise(mut msg: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = msg.strip_prefix(b"\xEF\xBB\xBF") {
            msg = rest;
        } else if let Some((first, rest)) = msg.split_first()
            && matches!(first, b' ' | b'\t' | b'\r' | b'\n')
        {
            msg = rest;
        } else {
            return msg;
        }
    }
}

/// The part of `bytes` before the first `sep`.
fn first_part(bytes: &[u8], sep: u8) -> &[u8] {
    memchr(sep, bytes).map_or(bytes, |i| &bytes[..i])
}

fn choose_encoding(seg: &[u8], charset_field: &[u8]) -> Charset {
    let declared = std::str::from_utf8(charset_field)
        .ok()
        .and_then(Charset::from_msh18);
    if seg.is_ascii() {
        return declared.unwrap_or(Charset::Ascii);
    }
    match declared {
        Some(cs) if cs.single_byte() => cs,
        _ if std::str::from_utf8(seg).is_ok() => Charset::Utf8,
        _ => Charset::Latin1,
    }
}

/// Turns field bytes into strings with the chosen encoding.
struct Reader {
    d: Delimiters,
    enc: Charset,
}

impl Reader {
    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = String::with_capacity(self.enc.decoded_len(bytes));
        self.enc.push_lossy(&mut s, bytes);
        s
    }

    fn decoded(&self, bytes: &[u8]) -> String {
        // Decoding escapes rarely lengthens text (formatting commands can), so this is enough.
        let mut s = String::with_capacity(self.enc.decoded_len(bytes));
        unescape_into(
            &mut s,
            bytes,
            &self.d,
            self.enc,
            &mut EscapeNotes::default(),
        );
        s
    }

    fn optional(&self, bytes: &[u8]) -> Option<String> {
        (!is_null(bytes)).then(|| self.decoded(bytes))
    }
}

fn require(bytes: &[u8], field: u8, name: &'static str) -> Result<(), HeaderError> {
    if is_null(bytes) {
        Err(HeaderError::MissingField { field, name })
    } else {
        Ok(())
    }
}

/// Empty, or the HL7 explicit null `""`.
fn is_null(bytes: &[u8]) -> bool {
    bytes.is_empty() || bytes == b"\"\""
}

/// Decodes HL7 escape sequences in `text` into plain text:
///
/// * `\F\ \S\ \T\ \R\ \E\` become the delimiters, `\P\` the truncation character (when
///   there is one), `\Xhh..\` the bytes it encodes when they are valid UTF-8;
/// * highlighting (`\H\` start, `\N\` normal) is removed: plain text has no emphasis;
/// * the FT formatting commands are applied as plain text can hold them: `\.br\` a line break,
///   `\.sp<n>\` n line breaks (1 when n is absent), `\.sk<n>\` n spaces, `\.ti<n>\` n spaces
///   of indent here, `\.in<n>\` n spaces of indent from here and after every later line break
///   (a negative n takes indent away), `\.ce\` a line break (centring is not kept), `\.fi\`
///   and `\.nf\` nothing. Counts are capped at [`MAX_FORMAT_COUNT`], so a hostile
///   `\.sp999999999\` cannot blow up a record;
/// * character set escapes (`\Cxxyy\`, `\Mxxyyzz\`, ISO 2022 switches) are removed and
///   reported in [`EscapeNotes`]: the characters they select are not decoded;
/// * anything else (`\Zxx\` local escapes, malformed hex, an unterminated sequence) is kept
///   verbatim.
pub fn unescape(text: &str, d: &Delimiters) -> String {
    unescape_noting(text, d).0
}

/// Largest count an FT formatting command (`\.sp<n>\`, `\.sk<n>\`, `\.in<n>\`, `\.ti<n>\`)
/// is applied with.
pub const MAX_FORMAT_COUNT: u32 = 40;

/// What [`unescape_noting`] did that a reader of the result should be told about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EscapeNotes {
    /// A `\C..\` or `\M..\` character set escape was removed.
    pub charset_escape_removed: bool,
}

/// [`unescape`], also saying what was removed.
pub fn unescape_noting(text: &str, d: &Delimiters) -> (String, EscapeNotes) {
    let mut notes = EscapeNotes::default();
    if memchr(d.escape, text.as_bytes()).is_none() {
        return (text.to_owned(), notes);
    }
    let mut out = String::with_capacity(text.len());
    unescape_into(&mut out, text.as_bytes(), d, Charset::Utf8, &mut notes);
    (out, notes)
}

/// Escapes `text` so it can be placed in a field: delimiters become
/// `\F\ \S\ \T\ \R\ \E\ \P\`, CR and LF become `\X0D\` and `\X0A\`.
pub fn escape(text: &str, d: &Delimiters) -> String {
    let needs = |b: u8| {
        b == d.field
            || b == d.component
            || b == d.repetition
            || b == d.escape
            || b == d.subcomponent
            || Some(b) == d.truncation
            || b == b'\r'
            || b == b'\n'
    };
    if !text.bytes().any(needs) {
        return text.to_owned();
    }
    let esc = char::from(d.escape);
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        let code = match u8::try_from(c) {
            Ok(b) if b.is_ascii() && needs(b) => match b {
                b'\r' => "X0D",
                b'\n' => "X0A",
                _ if b == d.field => "F",
                _ if b == d.component => "S",
                _ if b == d.repetition => "R",
                _ if b == d.escape => "E",
                _ if b == d.subcomponent => "T",
                _ => "P",
            },
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push(esc);
        out.push_str(code);
        out.push(esc);
    }
    out
}

/// Appends `bytes` (text in charset `enc`) to `out` with escapes decoded.
fn unescape_into(
    out: &mut String,
    bytes: &[u8],
    d: &Delimiters,
    enc: Charset,
    notes: &mut EscapeNotes,
) {
    let mut i = 0;
    let mut indent: u32 = 0;
    while let Some(off) = memchr(d.escape, &bytes[i..]) {
        let open = i + off;
        enc.push_lossy(out, &bytes[i..open]);
        let Some(len) = memchr(d.escape, &bytes[open + 1..]) else {
            enc.push_lossy(out, &bytes[open..]);
            return;
        };
        let close = open + 1 + len;
        if !push_escape(out, &bytes[open + 1..close], d, &mut indent, notes) {
            enc.push_lossy(out, &bytes[open..=close]);
        }
        i = close + 1;
    }
    enc.push_lossy(out, &bytes[i..]);
}

/// The count of an FT formatting command (`.sp2`, `.in -4`, `.sk`): `default` when absent,
/// None when it is not a (signed) integer; capped at [`MAX_FORMAT_COUNT`] either way.
fn format_count(arg: &[u8], default: i64) -> Option<i64> {
    let t = arg.trim_ascii();
    if t.is_empty() {
        return Some(default);
    }
    let (neg, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, t),
    };
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |v, b| v * 10 + i64::from(b - b'0'))
        .min(i64::from(MAX_FORMAT_COUNT));
    Some(if neg { -n } else { n })
}

/// Appends the meaning of one escape sequence (without its escape characters);
/// false if it is not one we decode (the caller keeps it verbatim).
fn push_escape(
    out: &mut String,
    seq: &[u8],
    d: &Delimiters,
    indent: &mut u32,
    notes: &mut EscapeNotes,
) -> bool {
    let spaces = |out: &mut String, n: i64| {
        for _ in 0..n.max(0) {
            out.push(' ');
        }
    };
    let c = match seq {
        b"F" => d.field,
        b"S" => d.component,
        b"T" => d.subcomponent,
        b"R" => d.repetition,
        b"E" => d.escape,
        b"P" => match d.truncation {
            Some(t) => t,
            None => return false,
        },
        // Highlighting on and off: plain text has no emphasis.
        b"H" | b"N" => return true,
        [b'X', hex @ ..] => return push_hex(out, hex),
        [b'C', code @ ..] if code.len() == 4 && code.iter().all(u8::is_ascii_hexdigit) => {
            notes.charset_escape_removed = true;
            return true;
        }
        [b'M', code @ ..]
            if (code.len() == 4 || code.len() == 6) && code.iter().all(u8::is_ascii_hexdigit) =>
        {
            notes.charset_escape_removed = true;
            return true;
        }
        [b'.', cmd @ ..] if cmd.len() >= 2 => {
            let (name, arg) = cmd.split_at(2);
            let Some(n) = format_count(arg, 1) else {
                return false;
            };
            let newlines = |out: &mut String, n: i64, indent: u32| {
                for _ in 0..n.max(0) {
                    out.push('\n');
                    spaces(out, i64::from(indent));
                }
            };
            match name {
                b"br" if arg.trim_ascii().is_empty() => newlines(out, 1, *indent),
                b"sp" => newlines(out, n, *indent),
                b"sk" => spaces(out, n),
                b"ti" => spaces(out, n),
                b"in" => {
                    let new = (i64::from(*indent) + n).clamp(0, i64::from(MAX_FORMAT_COUNT));
                    // Indent applies from here: the rest of this line and every later line.
                    spaces(out, new - i64::from(*indent));
                    *indent = new as u32;
                }
                b"ce" if arg.trim_ascii().is_empty() => newlines(out, 1, *indent),
                b"fi" | b"nf" if arg.trim_ascii().is_empty() => {}
                _ => return false,
            }
            return true;
        }
        _ => return false,
    };
    out.push(char::from(c));
    true
}

/// Decodes `\Xhh..\` content; false (keep verbatim) if it is not an even,
/// non-empty run of hex digits forming valid UTF-8.
fn push_hex(out: &mut String, hex: &[u8]) -> bool {
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.iter().all(u8::is_ascii_hexdigit) {
        return false;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    };
    let bytes = hex
        .chunks_exact(2)
        .map(|p| (nibble(p[0]) << 4) | nibble(p[1]));
    // Short sequences (all realistic ones) decode on the stack.
    let mut stack = [0u8; 64];
    let heap: Vec<u8>;
    let decoded: &[u8] = if hex.len() / 2 <= stack.len() {
        let n = hex.len() / 2;
        for (slot, b) in stack.iter_mut().zip(bytes) {
            *slot = b;
        }
        &stack[..n]
    } else {
        heap = bytes.collect();
        &heap
    };
    match std::str::from_utf8(decoded) {
        Ok(s) => {
            out.push_str(s);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT_A01: &[u8] = b"MSH|^~\\&|EPICADT|NHS-TRUST^1.2.3^ISO|SITERELAY|HUB|20240315103000||ADT^A01^ADT_A01|MSG00001|P|2.4|||AL|NE||8859/1\r\
EVN|A01|20240315103000\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19700101|U\r";

    fn expected_adt() -> Header {
        Header {
            delimiters: Delimiters::default(),
            sending_application: Some("EPICADT".into()),
            sending_application_raw: "EPICADT".into(),
            sending_facility: Some("NHS-TRUST".into()),
            sending_facility_raw: "NHS-TRUST^1.2.3^ISO".into(),
            receiving_application: Some("SITERELAY".into()),
            receiving_application_raw: "SITERELAY".into(),
            receiving_facility: Some("HUB".into()),
            receiving_facility_raw: "HUB".into(),
            datetime: Some("20240315103000".into()),
            message_type: "ADT".into(),
            trigger_event: Some("A01".into()),
            message_structure: Some("ADT_A01".into()),
            control_id: "MSG00001".into(),
            control_id_raw: "MSG00001".into(),
            processing_id: "P".into(),
            processing_id_raw: "P".into(),
            version: "2.4".into(),
            version_raw: "2.4".into(),
            accept_ack_type: Some("AL".into()),
            application_ack_type: Some("NE".into()),
            charset: Some("8859/1".into()),
            msh_encoding: Charset::Latin1,
        }
    }

    #[test]
    fn typical_adt_a01_header_is_parsed_completely() {
        assert_eq!(parse_header(ADT_A01), Ok(expected_adt()));
    }

    #[test]
    fn header_variants_parse_as_expected() {
        type Check = fn(&Header);
        let table: &[(&str, &[u8], Check)] = &[
            (
                "leading whitespace and newlines are skipped",
                b" \r\n\t\nMSH|^~\\&|A|B|C|D|t||ADT^A01|1|P|2.5",
                |h| assert_eq!(h.control_id, "1"),
            ),
            (
                "utf8 bom is skipped",
                b"\xEF\xBB\xBFMSH|^~\\&|A||||||ORU^R01|9|T|2.3",
                |h| assert_eq!(h.message_type, "ORU"),
            ),
            (
                "lf terminates msh",
                b"MSH|^~\\&|A||||||ADT^A08|42|P|2.5\nPID|1",
                |h| assert_eq!(h.version_raw, "2.5"),
            ),
            (
                "crlf terminates msh",
                b"MSH|^~\\&|A||||||ADT^A08|42|P|2.5\r\nPID|1",
                |h| assert_eq!(h.version, "2.5"),
            ),
            (
                "msh only, no terminator",
                b"MSH|^~\\&|||||||ACK|7|P|2.5.1",
                |h| {
                    assert_eq!(
                        (h.trigger_event.as_deref(), h.version.as_str()),
                        (None, "2.5.1")
                    )
                },
            ),
            (
                "empty optionals are none",
                b"MSH|^~\\&|||||||ADT^A01|1|P|2.4|||||",
                |h| {
                    assert_eq!(h.sending_application, None);
                    assert_eq!(h.sending_application_raw, "");
                    assert_eq!(h.datetime, None);
                    assert_eq!(h.accept_ack_type, None);
                    assert_eq!(h.charset, None);
                    assert_eq!(h.msh_encoding, Charset::Ascii);
                },
            ),
            (
                "hl7 null is none",
                b"MSH|^~\\&|\"\"||||||ADT^A01|1|P|2.4|||\"\"",
                |h| {
                    assert_eq!(h.sending_application, None);
                    assert_eq!(h.sending_application_raw, "\"\"");
                    assert_eq!(h.accept_ack_type, None);
                },
            ),
            (
                "v2.7 truncation character",
                b"MSH|^~\\&#|A||||||ADT^A01^ADT_A01|1|P|2.7",
                |h| {
                    assert_eq!(h.delimiters.truncation, Some(b'#'));
                    assert_eq!(h.delimiters.encoding_characters(), "^~\\&#");
                },
            ),
            (
                "odd delimiters",
                b"MSH#*@!%#APP*X#FAC#####ORM*O01#C1#P*T#2.3.1*GBR",
                |h| {
                    assert_eq!(
                        h.delimiters,
                        Delimiters {
                            field: b'#',
                            component: b'*',
                            repetition: b'@',
                            escape: b'!',
                            subcomponent: b'%',
                            truncation: None
                        }
                    );
                    assert_eq!(h.sending_application.as_deref(), Some("APP"));
                    assert_eq!(h.sending_application_raw, "APP*X");
                    assert_eq!(
                        (h.message_type.as_str(), h.trigger_event.as_deref()),
                        ("ORM", Some("O01"))
                    );
                    assert_eq!(
                        (h.processing_id.as_str(), h.processing_id_raw.as_str()),
                        ("P", "P*T")
                    );
                    assert_eq!(
                        (h.version.as_str(), h.version_raw.as_str()),
                        ("2.3.1", "2.3.1*GBR")
                    );
                },
            ),
            (
                "escapes are decoded in text, kept in raw",
                b"MSH|^~\\&|LAB\\T\\1||||||ADT^A01|ID\\F\\1|P|2.5",
                |h| {
                    assert_eq!(h.sending_application.as_deref(), Some("LAB&1"));
                    assert_eq!(h.sending_application_raw, "LAB\\T\\1");
                    assert_eq!(h.control_id, "ID|1");
                    assert_eq!(h.control_id_raw, "ID\\F\\1");
                },
            ),
            (
                "charset takes first repetition",
                b"MSH|^~\\&|||||||ADT^A01|1|P|2.5||||||UNICODE UTF-8~ISO IR87",
                |h| {
                    assert_eq!(h.charset.as_deref(), Some("UNICODE UTF-8"));
                    assert_eq!(h.msh_encoding, Charset::Utf8);
                },
            ),
            (
                "unsupported charset still parses",
                b"MSH|^~\\&|||||||ADT^A01|1|P|2.5||||||UNICODE UTF-16",
                |h| {
                    assert_eq!(h.charset.as_deref(), Some("UNICODE UTF-16"));
                    assert_eq!(h.msh_encoding, Charset::Ascii);
                },
            ),
            (
                "latin1 bytes in msh are decoded losslessly",
                b"MSH|^~\\&|APP|KLINIK M\xdcNCHEN|||||ADT^A01|1|P|2.5||||||8859/1",
                |h| {
                    assert_eq!(h.sending_facility.as_deref(), Some("KLINIK M\u{dc}NCHEN"));
                    assert_eq!(h.msh_encoding, Charset::Latin1);
                },
            ),
            (
                "windows-1252 declared in msh-18 decodes its dashes",
                b"MSH|^~\\&|APP|LABOR NORD\x96S\xdcD|||||ADT^A01|1|P|2.5||||||CP1252",
                |h| {
                    assert_eq!(
                        h.sending_facility.as_deref(),
                        Some("LABOR NORD\u{2013}S\u{dc}D")
                    );
                    assert_eq!(h.msh_encoding, Charset::Windows1252);
                },
            ),
            (
                "undeclared non utf8 bytes fall back to latin1",
                b"MSH|^~\\&|APP|M\xdcNCHEN|||||ADT^A01|1|P|2.5",
                |h| {
                    assert_eq!(h.sending_facility_raw, "M\u{dc}NCHEN");
                    assert_eq!(h.msh_encoding, Charset::Latin1);
                },
            ),
            (
                "utf8 bytes declared ascii are read as utf8",
                "MSH|^~\\&|APP|M\u{dc}NCHEN|||||ADT^A01|1|P|2.5||||||ASCII".as_bytes(),
                |h| {
                    assert_eq!(h.sending_facility_raw, "M\u{dc}NCHEN");
                    assert_eq!(h.msh_encoding, Charset::Utf8);
                },
            ),
            (
                "fields past msh-18 are ignored",
                b"MSH|^~\\&|||||||ADT^A01|1|P|2.5||||||ASCII|||||x|y|z",
                |h| assert_eq!(h.charset.as_deref(), Some("ASCII")),
            ),
        ];
        for (name, input, check) in table {
            match parse_header(input) {
                Ok(h) => check(&h),
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }

    fn delim(field: u8, reason: &'static str) -> HeaderError {
        HeaderError::BadDelimiters { field, reason }
    }

    fn missing(field: u8, name: &'static str) -> HeaderError {
        HeaderError::MissingField { field, name }
    }

    #[test]
    fn bad_headers_are_rejected_with_the_right_error() {
        use HeaderError::{Batch, Empty, NotHl7};
        const FS_MISSING: &str = "field separator missing";
        const FS_BAD: &str = "field separator must be printable ASCII punctuation";
        const ENC_LEN: &str = "encoding characters must be 4 or 5 characters";
        const ENC_BAD: &str = "encoding characters must be printable ASCII punctuation";
        const ENC_DUP: &str = "delimiters must be distinct";
        const ALNUM: &str = "must be ASCII alphanumeric";
        #[rustfmt::skip]
        let table: &[(&str, &[u8], HeaderError)] = &[
            ("empty", b"", Empty),
            ("whitespace only", b" \r\n\r\n", Empty),
            ("not msh", b"PID|1||9990000018", NotHl7),
            ("lowercase msh", b"msh|^~\\&|", NotHl7),
            ("file batch", b"FHS|^~\\&|\rBHS|^~\\&\rMSH|^~\\&", Batch),
            ("batch", b"BHS|^~\\&|\rMSH|^~\\&", Batch),
            ("msh alone", b"MSH", delim(1, FS_MISSING)),
            ("msh then cr", b"MSH\rPID", delim(1, FS_MISSING)),
            ("alphanumeric field separator", b"MSHA^~\\&A", delim(1, FS_BAD)),
            ("space field separator", b"MSH ^~\\& ", delim(1, FS_BAD)),
            ("three encoding characters", b"MSH|^~\\|A", delim(2, ENC_LEN)),
            ("six encoding characters", b"MSH|^~\\&#$|A", delim(2, ENC_LEN)),
            ("msh-2 cut by cr", b"MSH|^~\r\\&|", delim(2, ENC_LEN)),
            ("field separator inside msh-2", b"MSH|^~|&|", delim(2, ENC_LEN)),
            ("letter in encoding characters", b"MSH|^~\\A|", delim(2, ENC_BAD)),
            ("lf in encoding characters", b"MSH|^~\\\n|", delim(2, ENC_LEN)),
            ("duplicate delimiters", b"MSH|^^\\&|", delim(2, ENC_DUP)),
            ("duplicate truncation", b"MSH|^~\\&^|", delim(2, ENC_DUP)),
            ("missing message type", b"MSH|^~\\&|A|B|C|D|t|||1|P|2.5", missing(9, "message type")),
            ("message type only trigger", b"MSH|^~\\&|A|B|C|D|t||^A01|1|P|2.5", missing(9, "message type")),
            ("truncated after msh-8", b"MSH|^~\\&|A|B|C|D|t|", missing(9, "message type")),
            ("missing control id", b"MSH|^~\\&|A|B|C|D|t||ADT^A01||P|2.5", missing(10, "message control id")),
            ("null control id", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|\"\"|P|2.5", missing(10, "message control id")),
            ("missing processing id", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1||2.5", missing(11, "processing id")),
            ("missing version", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1|P", missing(12, "version id")),
            ("version only international code", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1|P|^GBR", missing(12, "version id")),
            ("first missing field wins", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|||", missing(10, "message control id")),
            ("message type with slash", b"MSH|^~\\&|A|B|C|D|t||AD/T^A01|1|P|2.5", bad_field(9, "message type", ALNUM)),
            ("trigger with hash", b"MSH|^~\\&|A|B|C|D|t||ADT^A#1|1|P|2.5", bad_field(9, "trigger event", ALNUM)),
            ("structure with space", b"MSH|^~\\&|A|B|C|D|t||ADT^A01^ADT A01|1|P|2.5", bad_field(9, "message structure", "must be ASCII alphanumeric or _")),
            ("version not numeric", b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1|P|V2.5", bad_field(12, "version id", "must be digits and dots")),
        ];
        for (name, input, err) in table {
            assert_eq!(parse_header(input).as_ref(), Err(err), "{name}");
        }
    }

    #[test]
    fn header_errors_map_to_table_0357_codes_and_locations() {
        type Location = Option<(&'static str, u8)>;
        let table: &[(HeaderError, u16, Location)] = &[
            (HeaderError::Empty, 100, None),
            (HeaderError::NotHl7, 100, None),
            (HeaderError::Batch, 100, None),
            (delim(1, "x"), 102, Some(("MSH", 1))),
            (delim(2, "x"), 102, Some(("MSH", 2))),
            (missing(10, "message control id"), 101, Some(("MSH", 10))),
            (bad_field(12, "version id", "x"), 102, Some(("MSH", 12))),
        ];
        for (err, code, location) in table {
            assert_eq!(err.hl7_error_code(), *code, "{err:?}");
            assert_eq!(err.location(), *location, "{err:?}");
        }
    }

    #[test]
    fn header_error_text_never_contains_field_values() {
        let inputs: &[&[u8]] = &[
            b"PID|1||9990000018||TEST^PATIENT",
            b"MSH|^~\\&|TESTAPP|TESTFAC|C|D|t||ADT^A01||P|2.5",
            b"MSH|^~\\&|TESTAPP|TESTFAC|C|D|t||ADT^A01|SECRET9990000018|P|V2.5",
            b"MSH|^~\\&|TESTAPP|TESTFAC|C|D|t||A/DT^A01|1|P|2.5",
        ];
        for input in inputs {
            let text = parse_header(input).unwrap_err().to_string();
            for needle in ["TEST", "999", "SECRET", "V2.5", "A/DT"] {
                assert!(!text.contains(needle), "{text:?} contains {needle:?}");
            }
        }
        assert_eq!(
            HeaderError::MissingField {
                field: 10,
                name: "message control id"
            }
            .to_string(),
            "MSH-10 (message control id) is required but missing"
        );
    }

    #[test]
    fn raw_fields_agree_with_hl7_parser_crate() {
        let messages: &[&str] = &[
            std::str::from_utf8(ADT_A01).unwrap(),
            "MSH|^~\\&|LAB^1.2.3^ISO|FAC\\T\\X|R|RF|20240101||ORU^R01^ORU_R01|ABC-1|P^T|2.5.1^GBR|||AL|AL|GBR|ASCII\rOBX|1|ST|x||y\r",
        ];
        for text in messages {
            let ours = parse_header(text.as_bytes()).unwrap();
            let theirs = hl7_parser::Message::parse_with_lenient_newlines(text, true).unwrap();
            let msh = theirs.segment("MSH").unwrap();
            let raw = |n: usize| msh.field(n).map(|f| f.raw_value()).unwrap_or("");
            assert_eq!(ours.sending_application_raw, raw(3));
            assert_eq!(ours.sending_facility_raw, raw(4));
            assert_eq!(ours.receiving_application_raw, raw(5));
            assert_eq!(ours.receiving_facility_raw, raw(6));
            assert_eq!(ours.datetime.as_deref().unwrap_or(""), raw(7));
            assert_eq!(ours.control_id_raw, raw(10));
            assert_eq!(ours.processing_id_raw, raw(11));
            assert_eq!(ours.version_raw, raw(12));
        }
    }

    #[test]
    fn header_parses_when_later_segments_are_malformed() {
        // Body garbage after a good MSH must not matter.
        let msg = b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1|P|2.5\r\x00\x01\xff|||\r\r";
        assert_eq!(parse_header(msg).map(|h| h.control_id), Ok("1".to_string()));
    }

    #[test]
    fn unescape_decodes_known_sequences_and_keeps_others() {
        let d = Delimiters::default();
        let t = Delimiters {
            truncation: Some(b'#'),
            ..d
        };
        let odd = Delimiters {
            field: b'#',
            component: b'*',
            repetition: b'@',
            escape: b'!',
            subcomponent: b'%',
            truncation: None,
        };
        let table: &[(&str, &Delimiters, &str, &str)] = &[
            ("plain text unchanged", &d, "TEST^PATIENT", "TEST^PATIENT"),
            ("field", &d, "a\\F\\b", "a|b"),
            ("component", &d, "a\\S\\b", "a^b"),
            ("subcomponent", &d, "a\\T\\b", "a&b"),
            ("repetition", &d, "a\\R\\b", "a~b"),
            ("escape", &d, "a\\E\\b", "a\\b"),
            ("line break", &d, "line1\\.br\\line2", "line1\nline2"),
            ("hex ascii", &d, "\\X41420D\\", "AB\r"),
            ("hex lowercase", &d, "\\X6f6b\\", "ok"),
            ("hex utf8", &d, "M\\XC3BC\\ller", "M\u{fc}ller"),
            ("hex invalid utf8 kept", &d, "M\\XFC\\ller", "M\\XFC\\ller"),
            ("hex odd length kept", &d, "\\X414\\", "\\X414\\"),
            ("hex empty kept", &d, "\\X\\", "\\X\\"),
            ("hex non-digit kept", &d, "\\XZZ\\", "\\XZZ\\"),
            (
                "long hex decoded",
                &d,
                &format!("\\X{}\\", "41".repeat(100)),
                &"A".repeat(100),
            ),
            (
                "highlight removed",
                &d,
                "caf\u{e9} \\H\\bold\\N\\ end",
                "caf\u{e9} bold end",
            ),
            ("charset escape removed", &d, "a\\C2842\\b\\M2442\\c", "abc"),
            (
                "charset escape of the wrong shape kept",
                &d,
                "\\Cxxyy\\z",
                "\\Cxxyy\\z",
            ),
            ("local escape kept", &d, "\\Zfoo\\", "\\Zfoo\\"),
            ("line break", &d, "a\\.br\\b", "a\nb"),
            ("skip one line", &d, "a\\.sp\\b", "a\nb"),
            ("skip three lines", &d, "a\\.sp3\\b", "a\n\n\nb"),
            (
                "skip with a space before the count",
                &d,
                "a\\.sp 2\\b",
                "a\n\nb",
            ),
            ("huge skip capped", &d, "\\.sp999999999\\", &"\n".repeat(40)),
            ("skip spaces", &d, "a\\.sk2\\b", "a  b"),
            ("temporary indent", &d, "\\.ti3\\a", "   a"),
            (
                "indent applies to later lines until taken away",
                &d,
                "\\.in2\\a\\.br\\b\\.in-2\\\\.br\\c",
                "  a\n  b\nc",
            ),
            ("centre ends the line", &d, "a\\.ce\\b", "a\nb"),
            ("fill modes removed", &d, "\\.nf\\a\\.fi\\", "a"),
            ("bad count kept", &d, "\\.spx\\", "\\.spx\\"),
            ("unknown command kept", &d, "\\.zz\\", "\\.zz\\"),
            ("unterminated kept", &d, "abc\\F", "abc\\F"),
            ("empty sequence kept", &d, "a\\\\b", "a\\\\b"),
            (
                "truncation without truncation delimiter kept",
                &d,
                "\\P\\",
                "\\P\\",
            ),
            ("truncation with truncation delimiter", &t, "\\P\\", "#"),
            (
                "several in a row",
                &d,
                "\\F\\\\S\\\\T\\\\R\\\\E\\",
                "|^&~\\",
            ),
            (
                "odd delimiters",
                &odd,
                "a!F!b!S!c!T!d!R!e!E!f",
                "a#b*c%d@e!f",
            ),
            (
                "non-ascii text around escapes",
                &d,
                "\u{e9}\\F\\\u{20ac}",
                "\u{e9}|\u{20ac}",
            ),
        ];
        for (name, delims, input, expected) in table {
            assert_eq!(unescape(input, delims), *expected, "{name}");
        }
    }

    #[test]
    fn escape_then_unescape_round_trips() {
        let d = Delimiters {
            truncation: Some(b'#'),
            ..Delimiters::default()
        };
        let table: &[(&str, &str)] = &[
            ("plain", "plain"),
            ("every delimiter", "|^~\\&#"),
            ("cr and lf", "a\rb\nc"),
            ("non-ascii", "M\u{fc}ller \u{20ac} 9990000018"),
        ];
        for (name, text) in table {
            let escaped = escape(text, &d);
            assert!(
                !escaped
                    .bytes()
                    .any(|b| b == b'|' || b == b'\r' || b == b'\n'),
                "{name}"
            );
            assert_eq!(unescape(&escaped, &d), *text, "{name}");
        }
        assert_eq!(
            escape("a|b^c&d~e\\f#g\r", &d),
            "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\P\\g\\X0D\\"
        );
    }
}
