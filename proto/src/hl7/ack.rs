//! Building HL7 v2 original/enhanced-mode acknowledgements (ACK messages).
//!
//! [`build_ack`] answers a message whose MSH parsed: it mirrors the sender's
//! delimiters and MSH-3..6 byte for byte (swapped), echoes MSH-10 in MSA-2 and
//! can add an ERR segment in the HL7 2.5+ layout. [`minimal_nak`] answers when
//! there is no usable MSH at all.
//!
//! Deliberately NOT done here: no decision about which code to send (the
//! caller decides AA/AE/AR/CA/CE/CR), no MLLP framing (see the framer's
//! `encode`), no I/O, no clock reads (`now` is passed in), no MSH-13..21 in
//! the ACK, and no message content in ACK text unless the caller puts it there.

use std::fmt::Write as _;

use crate::hl7::charset::Charset;
use crate::hl7::header::{Delimiters, Header, HeaderError, escape};

/// Acknowledgment code for MSA-1 (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error.
    AE,
    /// Original mode: application reject.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The two-letter code as written in MSA-1.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }
}

/// What goes into the ERR segment of an ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// HL7 table 0357 error code (e.g. 101 required field missing).
    pub code: u16,
    /// Segment id and field position of the problem, e.g. `("MSH", 10)`.
    pub location: Option<(&'static str, u8)>,
    /// Which occurrence of the location's segment (1 = the first; ERR-2.2).
    pub sequence: u16,
    /// Diagnostic text for ERR-7; must not contain patient data. Empty: omitted.
    pub text: String,
}

impl AckError {
    /// An error with the given table 0357 code, location and diagnostic text.
    pub fn new(code: u16, location: Option<(&'static str, u8)>, text: impl Into<String>) -> Self {
        AckError {
            code,
            location,
            sequence: 1,
            text: text.into(),
        }
    }

    /// Code 207 (application internal error) without location, e.g. when
    /// storing the message failed.
    pub fn internal(text: impl Into<String>) -> Self {
        AckError::new(207, None, text)
    }

    /// The same error at the `n`th occurrence of its segment (ERR-2.2).
    pub fn at_sequence(mut self, n: u16) -> Self {
        self.sequence = n.max(1);
        self
    }

    /// The location as people write it: `MSH-10`, or `PID` for a whole segment (field 0); a
    /// later occurrence of the segment adds its number in brackets (`MSH[2]`).
    pub fn location_text(&self) -> Option<String> {
        self.location.map(|(seg, field)| {
            let seg = match self.sequence {
                0 | 1 => seg.to_string(),
                n => format!("{seg}[{n}]"),
            };
            match field {
                0 => seg,
                f => format!("{seg}-{f}"),
            }
        })
    }
}

impl From<&HeaderError> for AckError {
    /// Code, location and (content-free) text from a header parse error.
    fn from(e: &HeaderError) -> Self {
        AckError::new(e.hl7_error_code(), e.location(), e.to_string())
    }
}

/// Description of an HL7 table 0357 code, `None` for codes not in the table.
pub fn error_code_description(code: u16) -> Option<&'static str> {
    Some(match code {
        0 => "Message accepted",
        100 => "Segment sequence error",
        101 => "Required field missing",
        102 => "Data type error",
        103 => "Table value not found",
        104 => "Value too long",
        200 => "Unsupported message type",
        201 => "Unsupported event code",
        202 => "Unsupported processing id",
        203 => "Unsupported version id",
        204 => "Unknown key identifier",
        205 => "Duplicate key identifier",
        206 => "Application record locked",
        207 => "Application internal error",
        _ => return None,
    })
}

/// Formats `now` as an HL7 timestamp `YYYYMMDDHHMMSS.ffff+ZZZZ` (4 fraction
/// digits, truncated; the UTC offset of `now`).
pub fn format_hl7_timestamp(now: &jiff::ZonedDateTime) -> String {
    let offset = now.offset().seconds();
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}.{:04}{}{:02}{:02}",
        now.year(),
        now.month(),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.subsec_nanosecond() / 100_000,
        sign,
        abs / 3600,
        (abs % 3600) / 60,
    )
}

/// Builds an ACK for a message with header `h` (unframed, segments ending
/// in CR, encoded like the received MSH so mirrored fields are byte-identical).
///
/// `MSH` uses the received delimiters; MSH-3/4 = received MSH-5/6, MSH-5/6 =
/// received MSH-3/4 (raw), MSH-7 = `now`, MSH-9 = `ACK^<trigger>^ACK`,
/// MSH-10 = `ack_control_id`, MSH-11/12 = received MSH-11/12 (raw). Then
/// `MSA|code|<received MSH-10>|<text>` and, with `err`, an ERR segment.
pub fn build_ack(
    h: &Header,
    code: AckCode,
    text: Option<&str>,
    err: Option<&AckError>,
    ack_control_id: &str,
    now: jiff::ZonedDateTime,
) -> Vec<u8> {
    let d = &h.delimiters;
    let mut msg_type = String::from("ACK");
    if let Some(trigger) = &h.trigger_event {
        for part in [trigger.as_str(), "ACK"] {
            msg_type.push(char::from(d.component));
            msg_type.push_str(&escape(part, d));
        }
    }
    let mut out = String::with_capacity(256);
    write_msh(
        &mut out,
        d,
        [
            &h.receiving_application_raw,
            &h.receiving_facility_raw,
            &h.sending_application_raw,
            &h.sending_facility_raw,
            &format_hl7_timestamp(&now),
            "",
            &msg_type,
            &escape(ack_control_id, d),
            &h.processing_id_raw,
            &h.version_raw,
        ],
    );
    write_msa_err(&mut out, d, code, &h.control_id_raw, text, err);
    h.msh_encoding.encode_lossy(&out)
}

/// Builds a NAK when the message has no usable MSH: default delimiters
/// `|^~\&`, version `2.5`, processing id `P`, MSH-3/4 = `sending_app` /
/// `sending_facility` (our own identity), MSH-5/6 empty, MSH-9 `ACK`, MSA-2
/// empty. ASCII output (other characters become `?`).
pub fn minimal_nak(
    code: AckCode,
    text: &str,
    err: Option<&AckError>,
    ack_control_id: &str,
    now: jiff::ZonedDateTime,
    sending_app: &str,
    sending_facility: &str,
) -> Vec<u8> {
    let d = Delimiters::default();
    let mut out = String::with_capacity(256);
    write_msh(
        &mut out,
        &d,
        [
            &escape(sending_app, &d),
            &escape(sending_facility, &d),
            "",
            "",
            &format_hl7_timestamp(&now),
            "",
            "ACK",
            &escape(ack_control_id, &d),
            "P",
            "2.5",
        ],
    );
    write_msa_err(&mut out, &d, code, "", Some(text), err);
    Charset::Ascii.encode_lossy(&out)
}

/// `MSH`, MSH-1, MSH-2, then MSH-3..=MSH-12 (already escaped), CR.
fn write_msh(out: &mut String, d: &Delimiters, fields: [&str; 10]) {
    out.push_str("MSH");
    out.push(char::from(d.field));
    out.push_str(&d.encoding_characters());
    for f in fields {
        out.push(char::from(d.field));
        out.push_str(f);
    }
    out.push('\r');
}

/// `MSA|code|control_id_raw[|text]` CR, then the optional ERR segment:
/// `ERR||<seg>^1^<field>|<code>^<description>^HL70357|E[|||<text>]` CR.
fn write_msa_err(
    out: &mut String,
    d: &Delimiters,
    code: AckCode,
    control_id_raw: &str,
    text: Option<&str>,
    err: Option<&AckError>,
) {
    let f = char::from(d.field);
    let c = char::from(d.component);
    out.push_str("MSA");
    out.push(f);
    out.push_str(code.as_str());
    out.push(f);
    out.push_str(control_id_raw);
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        out.push(f);
        out.push_str(&escape(text, d));
    }
    out.push('\r');

    let Some(err) = err else { return };
    out.push_str("ERR");
    out.push(f);
    out.push(f); // ERR-1 (pre-2.5 layout) left empty
    if let Some((segment, field)) = err.location {
        out.push_str(&escape(segment, d));
        let _ = write!(out, "{c}{}", err.sequence.max(1));
        if field != 0 {
            // Field 0: the whole segment (e.g. a required segment is missing).
            let _ = write!(out, "{c}{field}");
        }
    }
    out.push(f);
    let _ = write!(out, "{}", err.code);
    out.push(c);
    out.push_str(&escape(error_code_description(err.code).unwrap_or(""), d));
    out.push(c);
    out.push_str("HL70357");
    out.push(f);
    out.push('E');
    if !err.text.is_empty() {
        // ERR-5 and ERR-6 empty, ERR-7 diagnostic information.
        out.push(f);
        out.push(f);
        out.push(f);
        out.push_str(&escape(&err.text, d));
    }
    out.push('\r');
}

/// Builds the acknowledgement of a batch frame (HL7 v2.5 section 2.10.3): an acknowledgement batch
/// per received batch, holding only the acknowledgements of messages that were not accepted (an
/// empty batch means all were), wrapped in `FHS`/`FTS` when the received frame had an `FHS`.
///
/// `acks[i]` are the (unframed) ACK messages for batch `i` of `batch`, in message order. Header
/// segments use the received envelope's delimiters and mirror its fields 3-6 swapped; field 7 is
/// `now`, field 11 a fresh control id from `next_id`, field 12 the received field 11 (reference
/// control id). `BTS-1` counts the ACK messages in that batch, `FTS-1` the batches.
pub fn build_batch_ack(
    batch: &crate::hl7::batch::Batch,
    acks: &[Vec<Vec<u8>>],
    now: jiff::ZonedDateTime,
    mut next_id: impl FnMut() -> String,
) -> Vec<u8> {
    use crate::hl7::batch::Envelope;
    let stamp = format_hl7_timestamp(&now);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let mut header = |out: &mut Vec<u8>, id: &str, env: Option<&Envelope>, reference: bool| {
        let d = env.map_or_else(Delimiters::default, |e| e.delimiters);
        let f = d.field;
        out.extend_from_slice(id.as_bytes());
        out.push(f);
        out.extend_from_slice(d.encoding_characters().as_bytes());
        let empty: &[u8] = b"";
        let mirrored: [&[u8]; 4] = match env {
            Some(e) => [
                &e.receiving_application,
                &e.receiving_facility,
                &e.sending_application,
                &e.sending_facility,
            ],
            None => [empty; 4],
        };
        for field in mirrored {
            out.push(f);
            out.extend_from_slice(field);
        }
        out.push(f);
        out.extend_from_slice(stamp.as_bytes());
        out.extend_from_slice(&[f, f, f, f]); // fields 8-10 empty, then 11
        out.extend_from_slice(escape(&next_id(), &d).as_bytes());
        if let Some(e) = env.filter(|e| reference && !e.control_id.is_empty()) {
            out.push(f);
            out.extend_from_slice(&e.control_id);
        }
        out.push(b'\r');
        f
    };
    if batch.file.is_some() {
        header(&mut out, "FHS", batch.file.as_ref(), true);
    }
    for (i, group) in batch.groups.iter().enumerate() {
        // A batch without its own BHS (messages straight inside FHS) mirrors the file header.
        let (env, reference) = match &group.header {
            Some(h) => (Some(h), true),
            None => (batch.file.as_ref(), false),
        };
        let f = header(&mut out, "BHS", env, reference);
        let group_acks = acks.get(i).map_or(&[][..], Vec::as_slice);
        for ack in group_acks {
            out.extend_from_slice(ack);
        }
        out.extend_from_slice(b"BTS");
        out.push(f);
        out.extend_from_slice(group_acks.len().to_string().as_bytes());
        out.push(b'\r');
    }
    if let Some(file) = &batch.file {
        out.extend_from_slice(b"FTS");
        out.push(file.delimiters.field);
        out.extend_from_slice(batch.groups.len().to_string().as_bytes());
        out.push(b'\r');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hl7::header::parse_header;

    fn at(s: &str) -> jiff::ZonedDateTime {
        s.parse().unwrap()
    }

    fn winter() -> jiff::ZonedDateTime {
        at("2024-03-15T10:30:05.123456789+00:00[Europe/London]")
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    const ADT_A01_V24: &[u8] = b"MSH|^~\\&|EPICADT|NHS-TRUST^1.2.3^ISO|SITERELAY|HUB|20240315103000||ADT^A01|MSG00001|P|2.4\r\
EVN|A01|20240315103000\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19700101|U\r";

    #[test]
    fn timestamps_use_four_fraction_digits_and_the_zone_offset() {
        let table: &[(&str, &str)] = &[
            (
                "2024-03-15T10:30:05.123456789+00:00[Europe/London]",
                "20240315103005.1234+0000",
            ),
            (
                "2024-07-01T09:05:00.000099+01:00[Europe/London]",
                "20240701090500.0000+0100",
            ),
            (
                "2024-01-02T03:04:05.9999+00:00[UTC]",
                "20240102030405.9999+0000",
            ),
            (
                "2024-12-31T23:59:59.5-05:00[America/New_York]",
                "20241231235959.5000-0500",
            ),
            (
                "2024-06-01T12:00:00+05:30[Asia/Kolkata]",
                "20240601120000.0000+0530",
            ),
        ];
        for (input, expected) in table {
            assert_eq!(format_hl7_timestamp(&at(input)), *expected, "{input}");
        }
    }

    #[test]
    fn aa_for_typical_adt_a01_v24_is_exact() {
        let h = parse_header(ADT_A01_V24).unwrap();
        let ack = build_ack(&h, AckCode::AA, None, None, "ACK00001", winter());
        assert_eq!(
            text(&ack),
            "MSH|^~\\&|SITERELAY|HUB|EPICADT|NHS-TRUST^1.2.3^ISO|20240315103005.1234+0000||ACK^A01^ACK|ACK00001|P|2.4\r\
             MSA|AA|MSG00001\r"
        );
    }

    #[test]
    fn ae_with_text_and_err_for_typical_adt_a01_v24_is_exact() {
        let h = parse_header(ADT_A01_V24).unwrap();
        let err = AckError::internal("store unavailable");
        let ack = build_ack(
            &h,
            AckCode::AE,
            Some("Try again later"),
            Some(&err),
            "ACK00002",
            winter(),
        );
        assert_eq!(
            text(&ack),
            "MSH|^~\\&|SITERELAY|HUB|EPICADT|NHS-TRUST^1.2.3^ISO|20240315103005.1234+0000||ACK^A01^ACK|ACK00002|P|2.4\r\
             MSA|AE|MSG00001|Try again later\r\
             ERR|||207^Application internal error^HL70357|E|||store unavailable\r"
        );
    }

    #[test]
    fn ack_mirrors_non_default_delimiters_and_raw_fields() {
        let msg = b"MSH#*@!%#LAB*1.2.3*ISO#FAC!T!1#RCV#RFAC#20240101##ORU*R01*ORU_R01#C!F!9#P*T#2.3.1*GBR\rOBX#1\r";
        let h = parse_header(msg).unwrap();
        let err = AckError::new(101, Some(("PID", 3)), "PID-3 missing");
        let ack = build_ack(
            &h,
            AckCode::AR,
            Some("bad#one*two"),
            Some(&err),
            "A#1",
            winter(),
        );
        assert_eq!(
            text(&ack),
            "MSH#*@!%#RCV#RFAC#LAB*1.2.3*ISO#FAC!T!1#20240315103005.1234+0000##ACK*R01*ACK#A!F!1#P*T#2.3.1*GBR\r\
             MSA#AR#C!F!9#bad!F!one!S!two\r\
             ERR##PID*1*3#101*Required field missing*HL70357#E###PID-3 missing\r"
        );
    }

    #[test]
    fn ack_text_is_escaped_with_the_message_delimiters() {
        let h = parse_header(b"MSH|^~\\&|A|B|C|D|t||ADT|1|P|2.5").unwrap();
        let table: &[(&str, &str)] = &[
            ("plain text", "MSA|CA|1|plain text\r"),
            ("a|b^c~d\\e&f", "MSA|CA|1|a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\r"),
            (
                "line1\rline2\nline3",
                "MSA|CA|1|line1\\X0D\\line2\\X0A\\line3\r",
            ),
            ("", "MSA|CA|1\r"),
        ];
        for (input, expected_msa) in table {
            let ack = text(&build_ack(
                &h,
                AckCode::CA,
                Some(input),
                None,
                "x",
                winter(),
            ));
            let msa = ack.split_inclusive('\r').nth(1).unwrap();
            assert_eq!(msa, *expected_msa, "{input:?}");
            assert!(ack.contains("|ACK|x|"), "no trigger: plain ACK in MSH-9");
        }
    }

    #[test]
    fn ack_is_encoded_like_the_received_msh() {
        let msg = b"MSH|^~\\&|APP|KLINIK M\xdcNCHEN|R|RF|t||ADT^A01|7|P|2.5||||||8859/1\rPID|1\r";
        let h = parse_header(msg).unwrap();
        let ack = build_ack(
            &h,
            AckCode::CA,
            Some("\u{dc}bernommen"),
            None,
            "9",
            winter(),
        );
        let expected: &[u8] = b"MSH|^~\\&|R|RF|APP|KLINIK M\xdcNCHEN|20240315103005.1234+0000||ACK^A01^ACK|9|P|2.5\rMSA|CA|7|\xdcbernommen\r";
        assert_eq!(ack, expected);
    }

    #[test]
    fn err_segment_layout_follows_hl7_2_5() {
        let h = parse_header(b"MSH|^~\\&|A|B|C|D|t||ADT^A01|1|P|2.3").unwrap();
        let missing = HeaderError::MissingField {
            field: 10,
            name: "message control id",
        };
        let table: &[(AckError, &str)] = &[
            (
                AckError::from(&missing),
                "ERR||MSH^1^10|101^Required field missing^HL70357|E|||MSH-10 (message control id) is required but missing\r",
            ),
            (
                AckError::new(102, Some(("MSH", 12)), ""),
                "ERR||MSH^1^12|102^Data type error^HL70357|E\r",
            ),
            (
                AckError::new(100, None, ""),
                "ERR|||100^Segment sequence error^HL70357|E\r",
            ),
            (AckError::new(999, None, ""), "ERR|||999^^HL70357|E\r"),
        ];
        for (err, expected) in table {
            let ack = text(&build_ack(&h, AckCode::AE, None, Some(err), "x", winter()));
            let err_seg = ack.split_inclusive('\r').nth(2).unwrap();
            assert_eq!(err_seg, *expected);
        }
    }

    #[test]
    fn minimal_nak_uses_defaults_and_empty_msa_2() {
        let err = AckError::from(&HeaderError::NotHl7);
        let nak = minimal_nak(
            AckCode::AR,
            "not an HL7 message",
            Some(&err),
            "NAK1",
            winter(),
            "SITERELAY",
            "SITE^1",
        );
        assert_eq!(
            text(&nak),
            "MSH|^~\\&|SITERELAY|SITE\\S\\1|||20240315103005.1234+0000||ACK|NAK1|P|2.5\r\
             MSA|AR||not an HL7 message\r\
             ERR|||100^Segment sequence error^HL70357|E|||message does not start with an MSH segment\r"
        );
        let bare = minimal_nak(AckCode::CR, "", None, "NAK2", winter(), "", "");
        assert_eq!(
            text(&bare),
            "MSH|^~\\&|||||20240315103005.1234+0000||ACK|NAK2|P|2.5\rMSA|CR|\r"
        );
    }

    #[test]
    fn ack_codes_render_as_two_letters() {
        let table = [
            (AckCode::AA, "AA"),
            (AckCode::AE, "AE"),
            (AckCode::AR, "AR"),
            (AckCode::CA, "CA"),
            (AckCode::CE, "CE"),
            (AckCode::CR, "CR"),
        ];
        for (code, s) in table {
            assert_eq!(code.as_str(), s);
        }
    }

    #[test]
    fn built_ack_parses_back_as_a_header() {
        let h = parse_header(ADT_A01_V24).unwrap();
        let ack = build_ack(&h, AckCode::AA, Some("ok"), None, "ACK9", winter());
        let back = parse_header(&ack).unwrap();
        assert_eq!(back.message_type, "ACK");
        assert_eq!(back.trigger_event.as_deref(), Some("A01"));
        assert_eq!(back.control_id, "ACK9");
        assert_eq!(back.sending_facility_raw, "HUB");
        assert_eq!(back.receiving_facility_raw, "NHS-TRUST^1.2.3^ISO");
    }

    #[test]
    fn batch_ack_lists_only_the_rejected_messages_and_mirrors_the_envelope() {
        use crate::hl7::batch::split;
        let frame = b"FHS|^~\\&|PAS|RXX|SR|HUB|20260601120000||||F77\rBHS|^~\\&|PAS|RXX|SR|HUB|20260601120000||||B12\rMSH|^~\\&|PAS|RXX|SR|HUB|20260601120000||ADT^A01|M1|P|2.4\rPID|||1\rBTS|1\rFTS|1\r";
        let batch = split(frame).unwrap();
        let mut n = 0;
        let mut ids = || {
            n += 1;
            format!("R{n}")
        };
        let h = parse_header(ADT_A01_V24).unwrap();
        let nak = build_ack(
            &h,
            AckCode::AE,
            None,
            Some(&AckError::new(100, Some(("PID", 0)), "")),
            "A1",
            winter(),
        );
        let out = build_batch_ack(&batch, &[vec![nak.clone()]], winter(), &mut ids);
        let expected = format!(
            "FHS|^~\\&|SR|HUB|PAS|RXX|20240315103005.1234+0000||||R1|F77\r\
             BHS|^~\\&|SR|HUB|PAS|RXX|20240315103005.1234+0000||||R2|B12\r\
             {}BTS|1\rFTS|1\r",
            text(&nak)
        );
        assert_eq!(text(&out), expected);
        assert!(text(&nak).contains("ERR||PID^1|100^Segment sequence error^HL70357|E\r"));

        // All accepted: an empty acknowledgement batch.
        let out = build_batch_ack(&batch, &[vec![]], winter(), || "X".into());
        assert_eq!(
            text(&out),
            "FHS|^~\\&|SR|HUB|PAS|RXX|20240315103005.1234+0000||||X|F77\r\
             BHS|^~\\&|SR|HUB|PAS|RXX|20240315103005.1234+0000||||X|B12\rBTS|0\rFTS|1\r"
        );

        // A BHS-only batch with other delimiters keeps them.
        let batch = split(b"BHS#^~\\&#PAS#RXX#######B9\rBTS#0\r").unwrap();
        let out = build_batch_ack(&batch, &[vec![]], winter(), || "X".into());
        assert_eq!(
            text(&out),
            "BHS#^~\\&###PAS#RXX#20240315103005.1234+0000####X#B9\rBTS#0\r"
        );
    }
}
