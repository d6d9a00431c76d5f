//! Deciding what to do with one received HL7 message, and what to answer.
//!
//! Pure code shared by every HL7 source (MLLP over TCP, and HL7 framed on a serial port): it reads the
//! MSH, checks the character set, and either asks the caller to store the message or hands back
//! the negative acknowledgement to send. After the caller's store attempt, [`answer_stored`] and
//! [`answer_refused`] build the final ACK. The caller writes an `AA` only after the commit.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::hl7::ack::{AckCode, AckError, build_ack, minimal_nak};
use crate::hl7::charset::{self, Charset};
use crate::hl7::header::{Header, HeaderError, parse_header};

/// What to do with a received message.
#[derive(Debug)]
pub enum Intake {
    /// Usable: store it, then answer with [`answer_stored`] or [`answer_refused`].
    Store(Box<Header>),
    /// Unusable content: quarantine it, send this `AE`/`CE` (None: enhanced mode asked for no
    /// acknowledgement in this case), do not forward.
    Reject {
        /// The framed-content ACK bytes (without MLLP framing).
        ack: Option<Vec<u8>>,
        /// Why, for logs and counters (no message content).
        reason: String,
        /// The HL7 error (table 0357 code and location) sent in the ERR segment.
        error: AckError,
        /// Header facts when the MSH could be read (no patient data).
        header: Option<Box<Header>>,
    },
}

/// Identity this appliance uses in ACKs it builds without a usable MSH.
#[derive(Debug, Clone)]
pub struct Responder {
    /// MSH-3 of minimal NAKs.
    pub application: String,
    /// MSH-4 of minimal NAKs.
    pub facility: String,
}

static ACK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh MSH-10 for an ACK: unique within this process and across restarts in practice
/// (start-time based prefix), at most 20 characters as HL7 2.3 allows.
pub fn next_ack_control_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| format!("SR{:X}", jiff::Timestamp::now().as_second()));
    let n = ACK_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{n:X}")
}

fn now() -> jiff::ZonedDateTime {
    jiff::ZonedDateTime::now()
}

/// Examine one message: its MSH, its segment separators (LF or CRLF refused when `strict`) and
/// its bytes against its character set. The feed's [`Policy`] comes next (a type the feed does
/// not take is refused whatever its content), then [`missing_segment`].
pub fn assess(message: &[u8], default_charset: Charset, strict: bool, me: &Responder) -> Intake {
    let header = match parse_header(message) {
        Ok(h) => h,
        Err(e) => return reject_header(&e, me),
    };
    let reject = |header: Header, err: AckError, reason: String| {
        let ack = answer(&header, Outcome::Rejected(&err));
        Intake::Reject {
            ack,
            reason,
            error: err,
            header: Some(Box::new(header)),
        }
    };
    if strict && message.trim_ascii_end().contains(&b'\n') {
        let err = AckError::new(
            100,
            None,
            "segments must be separated by CR alone on this feed (strict): found LF",
        );
        return reject(header, err, "LF segment separator on a strict feed".into());
    }
    if let Some(seg) = second_header(message) {
        let err = AckError::new(
            100,
            Some(("MSH", 0)),
            format!(
                "a frame must hold one message: a second MSH starts at segment {seg}; \
                 send each message in its own frame, or several in a batch (FHS/BHS)"
            ),
        )
        .at_sequence(2);
        return reject(header, err, "a second MSH in the frame".into());
    }
    let declared = header.charset.as_deref();
    if let Err(e) = charset::decode(message, declared, default_charset) {
        let err = AckError::new(102, Some(("MSH", 18)), e.to_string());
        return reject(header, err, format!("charset: {e}"));
    }
    Intake::Store(Box::new(header))
}

/// The position (1-based, counting non-blank lines) of a second message header in `message`:
/// a line that starts with `MSH` and a delimiter. Two messages in one frame (outside an
/// FHS/BHS batch) must never become one record: the second patient's results would be filed
/// under the first. Batches are split before they reach this check.
pub fn second_header(message: &[u8]) -> Option<usize> {
    let mut headers = 0;
    message
        .split(|&b| b == b'\r' || b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .enumerate()
        .find_map(|(i, line)| {
            let line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
            let is_header = line.len() > 3
                && line.starts_with(b"MSH")
                && !line[3].is_ascii_alphanumeric()
                && !line[3].is_ascii_whitespace();
            headers += usize::from(is_header);
            (headers == 2).then_some(i + 1)
        })
}

/// The `AE` error (code 100, the segment as location) when a segment that [`required_segments`]
/// names for this message's type is absent.
pub fn missing_segment(h: &Header, message: &[u8]) -> Option<AckError> {
    if required_segments(h).is_empty() {
        return None;
    }
    missing_from(h, &crate::hl7::segment_ids(message))
}

/// [`missing_segment`] for a caller that already holds the message's segment ids.
pub fn missing_from(h: &Header, present: &[[u8; 3]]) -> Option<AckError> {
    let required = required_segments(h);
    let missing = required
        .iter()
        .find(|id| !present.iter().any(|p| p == id.as_bytes()))?;
    let text = format!(
        "required segment {missing} is missing for {}^{}",
        h.message_type,
        h.trigger_event.as_deref().unwrap_or("")
    );
    Some(AckError::new(100, Some((missing, 0)), text))
}

/// The segments a message of this type cannot be read without (HL7 v2.5 message structures,
/// kept to what a record needs: an ADT event is about a patient, a result hangs off its
/// request, a merge names what is merged). Other segments the standard marks required are not
/// enforced: real feeds omit them (EVN, PV1) and the message is still usable. Unknown types and
/// triggers require nothing.
pub fn required_segments(h: &Header) -> &'static [&'static str] {
    let trigger = h
        .trigger_event
        .as_deref()
        .unwrap_or("")
        .to_ascii_uppercase();
    let t = trigger.as_str();
    match h.message_type.to_ascii_uppercase().as_str() {
        "ADT" => match t {
            // Merge family: prior identifiers are the point of the message.
            "A34" | "A35" | "A36" | "A39" | "A40" | "A41" | "A42" | "A44" | "A45" | "A46"
            | "A47" | "A48" | "A49" | "A50" | "A51" => &["PID", "MRG"],
            "A01" | "A02" | "A03" | "A04" | "A05" | "A06" | "A07" | "A08" | "A09" | "A10"
            | "A11" | "A12" | "A13" | "A14" | "A15" | "A16" | "A17" | "A21" | "A22" | "A23"
            | "A25" | "A26" | "A27" | "A28" | "A29" | "A31" | "A32" | "A33" | "A38" => &["PID"],
            _ => &[],
        },
        "ORU" if t == "R01" => &["OBR"],
        "ORM" if t == "O01" => &["ORC"],
        "OML" if matches!(t, "O21" | "O33" | "O35") => &["ORC"],
        "ORR" | "ORL" | "ACK" => &["MSA"],
        "SIU" if t.starts_with('S') => &["SCH"],
        "MDM" if t.starts_with('T') => &["TXA"],
        _ => &[],
    }
}

fn reject_header(e: &HeaderError, me: &Responder) -> Intake {
    let err = AckError {
        sequence: 1,
        code: e.hl7_error_code(),
        location: e.location(),
        text: e.to_string(),
    };
    let ack = minimal_nak(
        AckCode::AE,
        &err.text,
        Some(&err),
        &next_ack_control_id(),
        now(),
        &me.application,
        &me.facility,
    );
    Intake::Reject {
        ack: Some(ack),
        reason: e.to_string(),
        error: err,
        header: None,
    }
}

/// What happened to a message, for its acknowledgement.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Committed to the outbox (or accepted and deliberately not forwarded by policy).
    Stored,
    /// Not taken for reasons unrelated to content; the sender should retry later.
    Refused(&'a AckError),
    /// Unusable content.
    Rejected(&'a AckError),
}

/// When an enhanced-mode sender wants a commit acknowledgement (MSH-15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// No MSH-15: original mode, `AA`/`AE`/`AR` always.
    Original,
    /// MSH-15 `AL` (or an unknown value): `CA`/`CE`/`CR` always.
    Always,
    /// `NE`: never.
    Never,
    /// `ER`: only on error or rejection.
    OnError,
    /// `SU`: only on success.
    OnSuccess,
}

/// The acknowledgement mode a message asks for. siterelay is a relay: it gives the commit
/// acknowledgement MSH-15 asks for and never an application acknowledgement (MSH-16 is the
/// receiving application's business, downstream of the central side).
pub fn ack_mode(h: &Header) -> AckMode {
    match h.accept_ack_type.as_deref().map(str::trim) {
        None | Some("") => AckMode::Original,
        Some(v) if v.eq_ignore_ascii_case("NE") => AckMode::Never,
        Some(v) if v.eq_ignore_ascii_case("ER") => AckMode::OnError,
        Some(v) if v.eq_ignore_ascii_case("SU") => AckMode::OnSuccess,
        Some(_) => AckMode::Always,
    }
}

/// The acknowledgement for `outcome`, or None when the message's MSH-15 asks for none.
pub fn answer(h: &Header, outcome: Outcome<'_>) -> Option<Vec<u8>> {
    let mode = ack_mode(h);
    let success = matches!(outcome, Outcome::Stored);
    let send = match mode {
        AckMode::Original | AckMode::Always => true,
        AckMode::Never => false,
        AckMode::OnError => !success,
        AckMode::OnSuccess => success,
    };
    if !send {
        return None;
    }
    let enhanced = mode != AckMode::Original;
    let (code, err) = match outcome {
        Outcome::Stored => (if enhanced { AckCode::CA } else { AckCode::AA }, None),
        Outcome::Refused(e) => (if enhanced { AckCode::CR } else { AckCode::AR }, Some(e)),
        Outcome::Rejected(e) => (if enhanced { AckCode::CE } else { AckCode::AE }, Some(e)),
    };
    Some(build_ack(
        h,
        code,
        err.map(|e| e.text.as_str()).filter(|t| !t.is_empty()),
        err,
        &next_ack_control_id(),
        now(),
    ))
}

/// The positive acknowledgement once the message is committed (None: MSH-15 asked for none).
pub fn answer_stored(h: &Header) -> Option<Vec<u8>> {
    answer(h, Outcome::Stored)
}

/// The `AR`/`CR` when the store could not take the message (full, failing, shutting down).
pub fn answer_refused(h: &Header, reason: &str) -> Option<Vec<u8>> {
    let err = AckError {
        sequence: 1,
        code: 207,
        location: None,
        text: reason.to_string(),
    };
    answer(h, Outcome::Refused(&err))
}

/// Per-feed acceptance policy: which message types, trigger events and processing ids a feed
/// takes.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Accepted `TYPE^TRIGGER` patterns (`ADT^*`, `ORU^R01`, `MDM`); empty accepts everything.
    pub accept: Vec<String>,
    /// What happens to a message outside `accept`: false answers `AR` with ERR 200/201; true
    /// answers `AA` and drops it (counted), for feeds that send more than is wanted.
    pub ignore_unaccepted: bool,
    /// Accepted MSH-11 processing ids (`P`, `T`, `D`); empty accepts every id.
    pub processing_ids: Vec<String>,
    /// Segment separators must be CR alone, as the standard says; otherwise LF and CRLF are
    /// tolerated (real feeds send them). A content rule, passed to [`assess`].
    pub strict: bool,
}

/// What the policy says about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store and forward.
    Accept,
    /// Acknowledge positively but do not store or forward.
    Ignore,
    /// Refuse with this error (`AR`/`CR`).
    Refuse(AckError),
}

/// Apply the feed's policy to a message that passed the content checks.
pub fn check_policy(h: &Header, p: &Policy) -> Verdict {
    if !p.processing_ids.is_empty()
        && !p
            .processing_ids
            .iter()
            .any(|id| id.eq_ignore_ascii_case(&h.processing_id))
    {
        return Verdict::Refuse(AckError {
            sequence: 1,
            code: 202,
            location: Some(("MSH", 11)),
            text: format!(
                "processing id not accepted on this feed (accepted: {})",
                p.processing_ids.join(", ")
            ),
        });
    }
    if !h.version.starts_with('2') {
        return Verdict::Refuse(AckError {
            sequence: 1,
            code: 203,
            location: Some(("MSH", 12)),
            text: "only HL7 version 2.x is accepted".into(),
        });
    }
    if p.accept.is_empty() {
        return Verdict::Accept;
    }
    let trigger = h.trigger_event.as_deref().unwrap_or("");
    let mut type_known = false;
    for pat in &p.accept {
        let (ty, tr) = pat.split_once('^').unwrap_or((pat.as_str(), "*"));
        if ty.eq_ignore_ascii_case(&h.message_type) {
            type_known = true;
            if tr == "*" || tr.eq_ignore_ascii_case(trigger) {
                return Verdict::Accept;
            }
        }
    }
    if p.ignore_unaccepted {
        return Verdict::Ignore;
    }
    Verdict::Refuse(if type_known {
        AckError {
            sequence: 1,
            code: 201,
            location: Some(("MSH", 9)),
            text: "trigger event not accepted on this feed".into(),
        }
    } else {
        AckError {
            sequence: 1,
            code: 200,
            location: Some(("MSH", 9)),
            text: "message type not accepted on this feed".into(),
        }
    })
}

/// An `AE` for a frame over the size limit, built from its first bytes when they hold an MSH.
pub fn answer_oversized(head: &[u8], limit: u64, me: &Responder) -> Vec<u8> {
    let text = format!("message exceeds the {limit}-byte limit of this feed");
    let err = AckError {
        sequence: 1,
        code: 207,
        location: None,
        text: text.clone(),
    };
    match parse_header(head) {
        Ok(h) => build_ack(
            &h,
            AckCode::AE,
            Some(&text),
            Some(&err),
            &next_ack_control_id(),
            now(),
        ),
        Err(_) => minimal_nak(
            AckCode::AE,
            &text,
            Some(&err),
            &next_ack_control_id(),
            now(),
            &me.application,
            &me.facility,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msh(extra: &str) -> Vec<u8> {
        format!("MSH|^~\\&|PAS|RXX|SR|HUB|20261130093000||ADT^A01^ADT_A01|C1|P|2.4{extra}\rPID|1\r")
            .into_bytes()
    }

    fn header(extra: &str) -> Header {
        parse_header(&msh(extra)).unwrap()
    }

    fn msa(ack: &Option<Vec<u8>>) -> Option<String> {
        ack.as_ref().map(|a| {
            let t = String::from_utf8_lossy(a).into_owned();
            t.split('\r')
                .find(|s| s.starts_with("MSA"))
                .unwrap()
                .split('|')
                .nth(1)
                .unwrap()
                .to_string()
        })
    }

    #[test]
    fn ack_codes_follow_msh_15_in_every_mode() {
        let e = AckError {
            sequence: 1,
            code: 207,
            location: None,
            text: "x".into(),
        };
        // (MSH-15, stored, refused, rejected); None = no acknowledgement.
        type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let table: [Row; 6] = [
            ("", Some("AA"), Some("AR"), Some("AE")),
            ("|||AL", Some("CA"), Some("CR"), Some("CE")),
            ("|||NE", None, None, None),
            ("|||ER", None, Some("CR"), Some("CE")),
            ("|||SU", Some("CA"), None, None),
            ("|||XX", Some("CA"), Some("CR"), Some("CE")),
        ];
        for (extra, stored, refused, rejected) in table {
            let h = header(extra);
            assert_eq!(
                msa(&answer(&h, Outcome::Stored)).as_deref(),
                stored,
                "{extra}"
            );
            assert_eq!(
                msa(&answer(&h, Outcome::Refused(&e))).as_deref(),
                refused,
                "{extra}"
            );
            assert_eq!(
                msa(&answer(&h, Outcome::Rejected(&e))).as_deref(),
                rejected,
                "{extra}"
            );
        }
    }

    #[test]
    fn policy_refuses_unaccepted_types_events_ids_and_versions_with_their_err_codes() {
        let p = Policy {
            accept: vec!["ORU^R01".into(), "ADT^A01".into()],
            ignore_unaccepted: false,
            processing_ids: vec!["P".into()],
            strict: false,
        };
        assert_eq!(check_policy(&header(""), &p), Verdict::Accept);
        let code = |v: Verdict| match v {
            Verdict::Refuse(e) => (e.code, e.location),
            other => panic!("{other:?}"),
        };
        let h = parse_header(&msh("").replace_str("ADT^A01^ADT_A01", "ADT^A08")).unwrap();
        assert_eq!(code(check_policy(&h, &p)), (201, Some(("MSH", 9))));
        let h = parse_header(&msh("").replace_str("ADT^A01^ADT_A01", "SIU^S12")).unwrap();
        assert_eq!(code(check_policy(&h, &p)), (200, Some(("MSH", 9))));
        let h = parse_header(&msh("").replace_str("|C1|P|", "|C1|T|")).unwrap();
        assert_eq!(code(check_policy(&h, &p)), (202, Some(("MSH", 11))));
        let h = parse_header(&msh("").replace_str("|2.4", "|3.0")).unwrap();
        assert_eq!(
            code(check_policy(&h, &Policy::default())),
            (203, Some(("MSH", 12)))
        );
        let ignoring = Policy {
            ignore_unaccepted: true,
            ..p
        };
        let h = parse_header(&msh("").replace_str("ADT^A01^ADT_A01", "SIU^S12")).unwrap();
        assert_eq!(check_policy(&h, &ignoring), Verdict::Ignore);
        assert_eq!(
            check_policy(&header(""), &Policy::default()),
            Verdict::Accept
        );
    }

    fn me() -> Responder {
        Responder {
            application: "SITERELAY".into(),
            facility: "TEST".into(),
        }
    }

    /// (ERR-3 code, ERR-2 location) of an `AE`, or "stored".
    fn verdict(message: &str, strict: bool) -> String {
        match assess(message.as_bytes(), Charset::Utf8, strict, &me()) {
            Intake::Store(h) => match missing_segment(&h, message.as_bytes()) {
                None => "stored".into(),
                Some(e) => {
                    let ack = answer(&h, Outcome::Rejected(&e)).unwrap();
                    let ack = String::from_utf8(ack).unwrap();
                    assert_eq!(msa(&Some(ack.clone().into_bytes())).as_deref(), Some("AE"));
                    let err = ack.split('\r').find(|s| s.starts_with("ERR")).unwrap();
                    let f: Vec<&str> = err.split('|').collect();
                    format!(
                        "{} {} {}",
                        f[3].split('^').next().unwrap(),
                        f[2],
                        e.location_text().unwrap_or_default()
                    )
                }
            },
            Intake::Reject { ack, error, .. } => {
                let ack = String::from_utf8(ack.unwrap()).unwrap();
                let err = ack.split('\r').find(|s| s.starts_with("ERR")).unwrap();
                let f: Vec<&str> = err.split('|').collect();
                assert_eq!(msa(&Some(ack.clone().into_bytes())).as_deref(), Some("AE"));
                format!(
                    "{} {} {}",
                    f[3].split('^').next().unwrap(),
                    f[2],
                    error.location_text().unwrap_or_default()
                )
            }
        }
    }

    #[test]
    fn required_segments_by_message_type_give_ae_100_naming_the_segment() {
        let m = |ty: &str, body: &str| format!("MSH|^~\\&|A|B|C|D|20261130||{ty}|C1|P|2.5\r{body}");
        let table: &[(&str, &str, &str)] = &[
            ("ADT^A01", "EVN|A01\rPID|1||1\r", "stored"),
            ("ADT^A01", "EVN|A01\rPV1|1|I\r", "100 PID^1 PID"),
            ("ADT^A08", "PID|1||1\r", "stored"),
            ("ADT^A20", "NPU|W1\r", "stored"),
            ("ADT^A40", "EVN|A40\rPID|1||1\r", "100 MRG^1 MRG"),
            ("ADT^A40", "EVN|A40\rPID|1||1\rMRG|2\r", "stored"),
            ("ORU^R01", "PID|1\rOBX|1|NM\r", "100 OBR^1 OBR"),
            ("ORU^R01", "OBR|1\rOBX|1|NM\r", "stored"),
            ("ORM^O01", "PID|1\rOBR|1\r", "100 ORC^1 ORC"),
            ("OML^O21", "PID|1\rORC|NW\r", "stored"),
            ("ORR^O02", "ORC|OK\r", "100 MSA^1 MSA"),
            ("SIU^S12", "PID|1\r", "100 SCH^1 SCH"),
            ("SIU^S14", "SCH|1\r", "stored"),
            ("MDM^T02", "EVN|T02\rPID|1\rOBX|1|TX\r", "100 TXA^1 TXA"),
            ("ZZZ^Z99", "ZZ1|1\r", "stored"),
            ("ADT", "ZZ1|1\r", "stored"),
        ];
        for (ty, body, want) in table {
            assert_eq!(verdict(&m(ty, body), false), *want, "{ty} {body:?}");
        }
    }

    #[test]
    fn lf_separators_are_tolerated_unless_the_feed_is_strict() {
        let cr = "MSH|^~\\&|A|B|C|D|20261130||ADT^A01|C1|P|2.5\rPID|1||1\r";
        let lf = cr.replace('\r', "\n");
        let crlf = cr.replace('\r', "\r\n");
        assert_eq!(verdict(cr, false), "stored");
        assert_eq!(verdict(&lf, false), "stored");
        assert_eq!(verdict(&crlf, false), "stored");
        assert_eq!(verdict(cr, true), "stored");
        // A trailing line end after the last segment is not a separator.
        assert_eq!(verdict(&format!("{cr}\n"), true), "stored");
        assert_eq!(verdict(&lf, true), "100  ");
        assert_eq!(verdict(&crlf, true), "100  ");
    }

    #[test]
    fn a_frame_holding_two_messages_is_answered_ae_100_at_the_second_msh() {
        // python-hl7's `mllp_send --loose` sends a file like this as one frame.
        let a = "MSH|^~\\&|LAB|RXX|SR|HUB|20261130||ORU^R01|TWO-A|P|2.5\rPID|1||AAA111\rOBR|1\rOBX|1|NM|K||4.1\r";
        let b = "MSH|^~\\&|LAB|RXX|SR|HUB|20261130||ORU^R01|TWO-B|P|2.5\rPID|1||BBB222\rOBR|1\rOBX|1|NM|K||6.9||HH\r";
        assert_eq!(verdict(&format!("{a}{b}"), false), "100 MSH^2 MSH[2]");
        // With other delimiters, LF line ends, or a blank line between them: still refused.
        let b_hash = b.replace('|', "#").replace("#^~\\&#", "#^~\\&#");
        assert_eq!(verdict(&format!("{a}{b_hash}"), false), "100 MSH^2 MSH[2]");
        assert_eq!(
            verdict(&format!("{a}\n\n{b}").replace('\r', "\n"), false),
            "100 MSH^2 MSH[2]"
        );
        let Intake::Reject { error, .. } =
            assess(format!("{a}{b}").as_bytes(), Charset::Utf8, false, &me())
        else {
            panic!("two messages in one frame were accepted");
        };
        assert!(
            error.text.contains("second MSH starts at segment 5"),
            "{}",
            error.text
        );
        // One message is still one message; an MSH-like text inside a field is not a header.
        assert_eq!(verdict(a, false), "stored");
        assert_eq!(verdict(&format!("{a}NTE|1||MSH|x\r"), false), "stored");
        assert_eq!(second_header(b"MSH|a\rMSHX|b\r"), None);
    }

    trait ReplaceStr {
        fn replace_str(&self, from: &str, to: &str) -> Vec<u8>;
    }

    impl ReplaceStr for Vec<u8> {
        fn replace_str(&self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8_lossy(self).replace(from, to).into_bytes()
        }
    }
}
