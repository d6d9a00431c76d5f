//! Rejected messages: kept in the outbox's quarantine (committed before their `AE` goes out; a
//! quarantine that fails is answered `AR` instead, so the sender keeps the message) and, when
//! configured, announced to the central side without content.

use tracing::warn;

use super::FeedIntake;
use crate::hl7::ack::{AckCode, AckError};
use crate::hl7::header::Header;
use crate::hl7::intake;
use crate::outbox::RejectedMessage;
use crate::telemetry::mllp as event;

/// A rejected message, as the central side may be told about it (no content).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RejectNotice {
    /// Feed name.
    pub feed: String,
    /// When it was received (RFC 3339).
    pub at: String,
    /// Quarantine id on the appliance.
    pub quarantine_id: i64,
    /// MSH-3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_application: Option<String>,
    /// MSH-4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_facility: Option<String>,
    /// `TYPE^TRIGGER`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// HL7 table 0357 code.
    pub error_code: u16,
    /// Segment-field, e.g. `MSH-10`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_location: Option<String>,
}

/// A rejected message on its way to quarantine, with what answering it needs.
pub(super) struct ToQuarantine {
    peer: String,
    reason: String,
    notice: RejectNotice,
    size: usize,
    /// The `AE` to send once the entry is committed.
    ack: Option<Vec<u8>>,
    /// The header, when readable (for an `AR` if quarantine fails).
    header: Option<Box<Header>>,
}

impl FeedIntake {
    /// Keep a rejected message in quarantine and answer: `ack` (the `AE`) once the entry is
    /// committed, counted and, if configured, announced to the central side without content;
    /// or, when quarantine could not keep it (full, failing), an `AR` so the sender keeps it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn quarantine(
        &self,
        raw: Vec<u8>,
        peer: &str,
        received_at_us: i64,
        reason: &str,
        error: &AckError,
        header: Option<Box<Header>>,
        ack: Option<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        let (entry, q) = self.to_quarantine(raw, peer, received_at_us, reason, error, header, ack);
        let result = self.outbox.quarantine(entry).await;
        self.quarantined(q, result)
    }

    /// The quarantine entry for a rejected message (nothing written yet).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn to_quarantine(
        &self,
        raw: Vec<u8>,
        peer: &str,
        received_at_us: i64,
        reason: &str,
        error: &AckError,
        header: Option<Box<Header>>,
        ack: Option<Vec<u8>>,
    ) -> (RejectedMessage, ToQuarantine) {
        let size = raw.len();
        let h = header.as_deref();
        let message_type = h.map(|h| match &h.trigger_event {
            Some(t) => format!("{}^{}", h.message_type, t),
            None => h.message_type.clone(),
        });
        let entry = RejectedMessage {
            feed: self.name.clone(),
            source_kind: self.source_kind,
            peer: Some(peer.to_string()),
            received_at_us,
            error_code: error.code,
            error_location: error.location_text(),
            reason: reason.to_string(),
            control_id: h.map(|h| h.control_id.clone()),
            sending_application: h.and_then(|h| h.sending_application.clone()),
            sending_facility: h.and_then(|h| h.sending_facility.clone()),
            message_type,
            raw,
        };
        let notice = RejectNotice {
            feed: self.name.to_string(),
            at: crate::record::rfc3339_us(received_at_us),
            quarantine_id: 0,
            sending_application: entry.sending_application.clone(),
            sending_facility: entry.sending_facility.clone(),
            message_type: entry.message_type.clone(),
            error_code: entry.error_code,
            error_location: entry.error_location.clone(),
        };
        let q = ToQuarantine {
            peer: peer.to_string(),
            reason: reason.to_string(),
            notice,
            size,
            ack,
            header,
        };
        (entry, q)
    }

    /// The answer once quarantine has (or has not) kept the entry: counted, announced, `AE`;
    /// or `AR` when it could not be kept.
    pub(super) fn quarantined(
        &self,
        q: ToQuarantine,
        result: Result<i64, crate::outbox::AppendError>,
    ) -> Option<Vec<u8>> {
        let (peer, reason) = (q.peer.as_str(), q.reason.as_str());
        match result {
            Ok(id) => {
                event::rejected(&self.counters, &self.name, peer, q.size, reason);
                self.counters
                    .quarantined
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(tx) = &self.rejects {
                    // Best effort: the quarantine itself is the record of truth.
                    let _ = tx.try_send(RejectNotice {
                        quarantine_id: id,
                        ..q.notice
                    });
                }
                q.ack
            }
            Err(e) => {
                warn!(feed = %self.name, peer, size = q.size, reason, error = %e, "could not quarantine a rejected message: refused (AR) instead of AE, so the sender keeps it");
                let control_id = q.header.as_ref().map_or("-", |h| h.control_id.as_str());
                event::refused(
                    &self.counters,
                    &self.name,
                    control_id,
                    q.size,
                    &e.to_string(),
                );
                let text = super::hl7::refusal_text(&e);
                match q.header.as_deref() {
                    Some(h) => intake::answer_refused(h, text),
                    None => Some(refused_without_header(self, text)),
                }
            }
        }
    }
}

/// An `AR` for a message without a usable MSH (the `AE` it would have had is built the same
/// way).
fn refused_without_header(me: &FeedIntake, text: &str) -> Vec<u8> {
    let err = AckError {
        sequence: 1,
        code: 207,
        location: None,
        text: text.to_string(),
    };
    crate::hl7::ack::minimal_nak(
        AckCode::AR,
        text,
        Some(&err),
        &intake::next_ack_control_id(),
        jiff::ZonedDateTime::now(),
        &me.responder.application,
        &me.responder.facility,
    )
}
