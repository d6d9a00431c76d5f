//! Messages and options shared by the outbox's unit tests.

use std::sync::Arc;
use std::time::Duration;

use super::{DedupKey, Format, NewMessage, OutboxOptions, SourceKind, content_hash, now_us};

/// An HL7 message on `feed` with no duplicate key.
pub(super) fn msg(feed: &str, body: &str) -> NewMessage {
    NewMessage {
        feed: Arc::from(feed),
        source_kind: SourceKind::Mllp,
        peer: Some("127.0.0.1:1".into()),
        peer_certificate: None,
        format: Format::Hl7v2,
        control_id: Some("C1".into()),
        raw: body.as_bytes().to_vec(),
        received_at_us: now_us(),
        reprocessed: false,
        dedup: None,
        truncated_bytes: 0,
    }
}

/// A message with a duplicate key (sender `PAS|RXX`, a seven-day window).
pub(super) fn keyed(feed: &str, control_id: &str, body: &str, at_us: i64) -> NewMessage {
    NewMessage {
        control_id: Some(control_id.into()),
        received_at_us: at_us,
        dedup: Some(DedupKey {
            sender: "PAS|RXX".into(),
            control_id: control_id.into(),
            hash: content_hash(body.as_bytes()),
            window_us: 7 * 86_400 * 1_000_000,
        }),
        ..msg(feed, body)
    }
}

/// An hour's retention, a week of duplicate keys, and this cap on pending bytes.
pub(super) fn opts(max_bytes: u64) -> OutboxOptions {
    OutboxOptions {
        max_bytes,
        quarantine_max_bytes: max_bytes / 10,
        retain_delivered: Duration::from_secs(3600),
        retain_rejected: Duration::from_secs(3600),
        dedup_keep: Duration::from_secs(7 * 86_400),
        secure_delete: true,
    }
}
