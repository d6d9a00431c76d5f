//! Deciding what to do with one received HL7 message, and what to answer.
//!
//! Pure code shared by every HL7 source (MLLP over TCP now, MLLP over serial later): it reads the
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

/// Examine one message.
pub fn assess(message: &[u8], default_charset: Charset, me: &Responder) -> Intake {
    let header = match parse_header(message) {
        Ok(h) => h,
        Err(e) => return reject_header(&e, me),
    };
    let declared = header.charset.as_deref();
    if let Err(e) = charset::decode(message, declared, default_charset) {
        let err = AckError {
            code: 102,
            location: Some(("MSH", 18)),
            text: e.to_string(),
        };
        let ack = answer(&header, Outcome::Rejected(&err));
        return Intake::Reject {
            ack,
            reason: format!("charset: {e}"),
            error: err,
            header: Some(Box::new(header)),
        };
    }
    Intake::Store(Box::new(header))
}

fn reject_header(e: &HeaderError, me: &Responder) -> Intake {
    let err = AckError {
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
            code: 201,
            location: Some(("MSH", 9)),
            text: "trigger event not accepted on this feed".into(),
        }
    } else {
        AckError {
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

    trait ReplaceStr {
        fn replace_str(&self, from: &str, to: &str) -> Vec<u8>;
    }

    impl ReplaceStr for Vec<u8> {
        fn replace_str(&self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8_lossy(self).replace(from, to).into_bytes()
        }
    }
}
