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
    /// Unusable content: quarantine it, send this `AE`, do not forward.
    Reject {
        /// The framed-content ACK bytes (without MLLP framing).
        ack: Vec<u8>,
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
        let ack = build_ack(
            &header,
            AckCode::AE,
            Some(&err.text),
            Some(&err),
            &next_ack_control_id(),
            now(),
        );
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
        ack,
        reason: e.to_string(),
        error: err,
        header: None,
    }
}

/// The positive ACK once the message is committed.
pub fn answer_stored(h: &Header) -> Vec<u8> {
    build_ack(h, AckCode::AA, None, None, &next_ack_control_id(), now())
}

/// The `AR` when the store could not take the message (full, failing, shutting down).
pub fn answer_refused(h: &Header, reason: &str) -> Vec<u8> {
    let err = AckError {
        code: 207,
        location: None,
        text: reason.to_string(),
    };
    build_ack(
        h,
        AckCode::AR,
        Some(reason),
        Some(&err),
        &next_ack_control_id(),
        now(),
    )
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
