//! What goes into the outbox and what it answers: a message to store ([`NewMessage`]), a message
//! to quarantine ([`RejectedMessage`]), and what the store assigned to a stored one ([`Stored`]).

use std::sync::Arc;

use super::dedup::DedupKey;

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// HL7 over MLLP on TCP.
    Mllp,
    /// A serial port.
    Serial,
}

impl SourceKind {
    /// Stored and published name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mllp => "mllp",
            SourceKind::Serial => "serial",
        }
    }
    pub(super) fn parse(s: &str) -> SourceKind {
        match s {
            "serial" => SourceKind::Serial,
            _ => SourceKind::Mllp,
        }
    }
}

/// Payload format of a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// HL7 version 2 (ER7, pipe-delimited).
    Hl7v2,
    /// ASTM E1394 records.
    Astm,
    /// Line-oriented device output.
    Lines,
}

impl Format {
    /// Stored and published name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Hl7v2 => "hl7v2",
            Format::Astm => "astm",
            Format::Lines => "lines",
        }
    }
    pub(super) fn parse(s: &str) -> Format {
        match s {
            "astm" => Format::Astm,
            "lines" => Format::Lines,
            _ => Format::Hl7v2,
        }
    }
}

/// A message to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Feed name (from the config).
    pub feed: Arc<str>,
    /// Where it came from.
    pub source_kind: SourceKind,
    /// Peer address or device path.
    pub peer: Option<String>,
    /// MLLP over TLS: the subject of the sender's client certificate.
    pub peer_certificate: Option<String>,
    /// Payload format.
    pub format: Format,
    /// MSH-10 or equivalent, for logs and stats.
    pub control_id: Option<String>,
    /// The bytes exactly as received.
    pub raw: Vec<u8>,
    /// Receive time, microseconds since the Unix epoch (UTC).
    pub received_at_us: i64,
    /// Released from quarantine by `siterelay queue rejected retry`.
    pub reprocessed: bool,
    /// Duplicate detection (HL7): a resend of a message already stored within the window is
    /// answered again but not stored twice.
    pub dedup: Option<DedupKey>,
    /// Device lines: bytes the source dropped because the line ran past `max_message_bytes`
    /// (0: the message is whole). The record says `complete: false`.
    pub truncated_bytes: u64,
}

/// A message answered `AE`, kept in quarantine instead of being forwarded.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    /// Feed name.
    pub feed: Arc<str>,
    /// Where it came from.
    pub source_kind: SourceKind,
    /// Peer address or device path.
    pub peer: Option<String>,
    /// Receive time (µs since epoch).
    pub received_at_us: i64,
    /// HL7 table 0357 error code sent in the ERR segment.
    pub error_code: u16,
    /// Segment and field of the problem, e.g. `MSH-10`.
    pub error_location: Option<String>,
    /// Why (no message content).
    pub reason: String,
    /// MSH-10, when readable.
    pub control_id: Option<String>,
    /// MSH-3, when readable.
    pub sending_application: Option<String>,
    /// MSH-4, when readable.
    pub sending_facility: Option<String>,
    /// `TYPE^TRIGGER`, when readable.
    pub message_type: Option<String>,
    /// The bytes exactly as received.
    pub raw: Vec<u8>,
}

/// What the store assigned to a committed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Global row id (arrival order).
    pub row_id: i64,
    /// Per-feed sequence number, gap-free and increasing.
    pub seq: u64,
    /// Record id published with every send of this message.
    pub record_id: String,
    /// Set when this was a resend of a message already stored within the duplicate window:
    /// nothing new was stored, and `seq`/`record_id` are those of the original.
    pub duplicate: bool,
}

/// How much of a frame that is not HL7 at all is kept in quarantine.
pub const QUARANTINE_JUNK_KEEP: usize = 4 * 1024;

/// How many bytes of a rejected message quarantine keeps: all of it when it looks like HL7
/// (an `MSH`, `FHS` or `BHS` segment first, after an optional byte-order mark and blank
/// space), so that it can be retried; otherwise only the first [`QUARANTINE_JUNK_KEEP`]
/// bytes, enough to see what was sent (a port scanner, a wrong protocol, a stray file), so a
/// peer sending junk cannot fill the disk through quarantine.
pub(super) fn quarantine_keep(raw: &[u8]) -> usize {
    let body = raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw);
    let body = body.trim_ascii_start();
    let hl7 = [b"MSH", b"FHS", b"BHS"]
        .iter()
        .any(|seg| body.len() > 3 && body.starts_with(*seg) && !body[3].is_ascii_alphanumeric());
    if hl7 {
        raw.len()
    } else {
        raw.len().min(QUARANTINE_JUNK_KEEP)
    }
}
