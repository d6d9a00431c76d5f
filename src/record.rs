//! Records: the JSON documents published to the central integration layer.
//!
//! A record is built from an outbox row at publish time (not at receive time), so the stored
//! bytes stay the single source of truth. Schema `siterelay.record.v1` is documented in
//! `docs/contract.md` and `docs/schema/record.v1.schema.json`. v1 only ever grows by new optional
//! members; consumers must ignore members they do not know.

use std::collections::HashMap;

use jiff::tz::TimeZone;
use serde::Serialize;

use crate::hl7::charset::{self, Charset};
use crate::hl7::header::{Header, parse_header};
use crate::hl7::time::{TimeValue, parse_dtm};
use crate::outbox::{Format, PendingRow};

/// Schema name carried by every record.
pub const SCHEMA: &str = "siterelay.record.v1";

/// Per-feed settings that shape a record.
#[derive(Debug, Clone)]
pub struct FeedRecordSettings {
    /// Zone assumed for timestamps without an offset.
    pub timezone: TimeZone,
    /// Charset assumed when MSH-18 is empty (serial: the port's charset).
    pub default_charset: Charset,
    /// Serial devices: metadata from the config, copied into every record.
    pub device: Option<DeviceInfo>,
    /// HL7 normalisation (patient, visit, orders, observations...); None: header only.
    pub normalise: Option<crate::hl7::normalise::NormaliseOptions>,
}

/// What the config says about a serial device.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DeviceInfo {
    /// Device model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Where it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Asset tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset_tag: Option<String>,
    /// Protocol on the port: `astm`, `hl7-mllp`, `lines`.
    pub protocol: &'static str,
}

/// Everything needed to turn rows into records.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    /// This appliance's id.
    pub appliance: String,
    /// The organisation the appliance serves (e.g. an ODS code), if configured.
    pub organisation: Option<String>,
    /// Whether `raw` is included.
    pub include_raw: bool,
    /// Settings per feed name.
    pub feeds: HashMap<String, FeedRecordSettings>,
    /// Used for feeds no longer in the config (rows stored before a config change).
    pub fallback: FeedRecordSettings,
}

#[derive(Serialize)]
struct Record<'a> {
    schema: &'static str,
    id: &'a str,
    appliance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    organisation: Option<&'a str>,
    feed: &'a str,
    seq: u64,
    received_at: String,
    source: Source<'a>,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    charset: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a DeviceInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hl7: Option<Hl7Header<'a>>,
    /// ASTM: whether the message ended with its L (terminator) record. Lines: whether every
    /// line arrived whole (false: one ran past `max_message_bytes` and was cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
    /// Lines: how many bytes were dropped from a line cut at `max_message_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    astm: Option<crate::astm::records::AstmMessage>,
    /// Lines: how many lines the message holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    lines: Option<usize>,
    /// HL7: the normalised clinical sections, merged into the record's top level.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    clinical: Option<crate::hl7::normalise::Normalised>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<String>,
    /// HL7: the segment separator the sender used (`cr`, `lf`, `crlf` or `mixed`); `raw` always
    /// has CR.
    #[serde(skip_serializing_if = "Option::is_none")]
    segment_separator: Option<&'static str>,
    /// Present (true) only on records resent by a `replay` command.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replay: bool,
    /// Present (true) only on messages released from quarantine by a retry.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reprocessed: bool,
    /// Present (true) when an earlier message from the same sender had the same control id but
    /// different content.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    control_id_reused: bool,
}

#[derive(Serialize)]
struct Source<'a> {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<&'a str>,
    /// MLLP over TLS: the subject of the client certificate the sender presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<&'a str>,
}

#[derive(Serialize)]
struct Hl7Header<'a> {
    version: &'a str,
    message_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger_event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_structure: Option<&'a str>,
    control_id: &'a str,
    processing_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sending_application: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sending_facility: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receiving_application: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receiving_facility: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_datetime: Option<TimeValue>,
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-30T04:50:00.123456Z`.
pub fn rfc3339_us(us: i64) -> String {
    match jiff::Timestamp::from_microsecond(us) {
        Ok(t) => format!("{t:.6}"),
        Err(_) => "1970-01-01T00:00:00.000000Z".into(),
    }
}

impl RecordBuilder {
    /// Topic for a feed's records.
    pub fn topic(prefix: &str, appliance: &str, feed: &str) -> String {
        format!("{prefix}/{appliance}/records/{feed}")
    }

    /// Build the JSON record for one stored message.
    pub fn build(&self, row: &PendingRow) -> Vec<u8> {
        self.build_with(row, false)
    }

    /// Build a record, or say why it cannot be built, without ever unwinding into the caller: a
    /// panic anywhere in the builder (a bug meeting an unusual message) is caught and reported
    /// as an error, so one message cannot stop the sink. The error never carries message
    /// content (a panic's own text might, so it is not kept).
    pub fn try_build(&self, row: &PendingRow, replay: bool) -> Result<Vec<u8>, String> {
        quiet_builder_panics();
        BUILDING.with(|b| b.set(true));
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.build_with(row, replay)
        }));
        BUILDING.with(|b| b.set(false));
        built.map_err(|_| "the record builder panicked on this message".to_string())
    }

    /// Build a record, flagged `"replay": true` when it is resent by a replay command.
    pub fn build_with(&self, row: &PendingRow, replay: bool) -> Vec<u8> {
        #[cfg(test)]
        if memchr::memmem::find(&row.raw, test_hook::PANIC_MARKER).is_some() {
            panic!("test hook: the record builder panics on this message");
        }
        let settings = self.feeds.get(&row.feed).unwrap_or(&self.fallback);
        let header = match row.format {
            Format::Hl7v2 => parse_header(&row.raw).ok(),
            _ => None,
        };
        let cs = header
            .as_ref()
            .and_then(|h| h.charset.as_deref())
            .and_then(Charset::from_msh18)
            .unwrap_or(settings.default_charset);
        let text = charset::decode(&row.raw, None, cs)
            .unwrap_or_else(|_| String::from_utf8_lossy(&row.raw).into_owned());
        let astm = match row.format {
            Format::Astm => crate::astm::records::parse_message(&text, &settings.timezone).ok(),
            _ => None,
        };
        let lines = match row.format {
            Format::Lines => Some(text.lines().filter(|l| !l.is_empty()).count()),
            _ => None,
        };
        let record = Record {
            schema: SCHEMA,
            id: &row.record_id,
            appliance: &self.appliance,
            organisation: self.organisation.as_deref(),
            feed: &row.feed,
            seq: row.seq,
            received_at: rfc3339_us(row.received_at_us),
            source: Source {
                kind: row.source_kind.as_str(),
                peer: row.peer.as_deref(),
                certificate: row.peer_certificate.as_deref(),
            },
            format: row.format.as_str(),
            charset: Some(cs.charset_name()),
            device: settings.device.as_ref(),
            hl7: header.as_ref().map(|h| hl7_section(h, &settings.timezone)),
            complete: match row.format {
                Format::Astm => Some(astm.as_ref().is_some_and(|a| a.complete)),
                Format::Lines => Some(row.truncated_bytes == 0),
                _ => None,
            },
            truncated_bytes: (row.truncated_bytes > 0).then_some(row.truncated_bytes),
            astm,
            lines,
            clinical: match (&header, &settings.normalise) {
                (Some(h), Some(opts)) => Some(crate::hl7::normalise::normalise_with_delimiters(
                    &text,
                    &h.delimiters,
                    opts,
                )),
                _ => None,
            },
            segment_separator: match row.format {
                Format::Hl7v2 => segment_separator(&text),
                _ => None,
            },
            // HL7: CR between segments whatever arrived. ASTM: the header's password (H-4) is
            // masked. The stored bytes keep both as received.
            raw: self.include_raw.then(|| match row.format {
                Format::Hl7v2 => cr_separated(text),
                Format::Astm => crate::astm::records::mask_password(&text).into_owned(),
                _ => text,
            }),
            replay,
            reprocessed: row.reprocessed,
            control_id_reused: row.control_id_reused,
        };
        serde_json::to_vec(&record).expect("records serialise")
    }
}

thread_local! {
    /// Set while [`RecordBuilder::try_build`] runs on this thread.
    static BUILDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Once per process: a panic inside [`RecordBuilder::try_build`] is logged with its location
/// only, never its message (which may quote the message being built: patient data); any other
/// panic goes to the hook that was there before.
fn quiet_builder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if BUILDING.with(|b| b.get()) {
                let location = info.location().map(|l| l.to_string()).unwrap_or_default();
                tracing::error!(
                    location,
                    "the record builder panicked (its message is not logged: it may quote patient data)"
                );
            } else {
                previous(info);
            }
        }));
    });
}

/// Which line end separates the segments of an HL7 message: `cr`, `lf`, `crlf`, `mixed`, or
/// None when there is only one segment and no line end.
fn segment_separator(text: &str) -> Option<&'static str> {
    let b = text.as_bytes();
    let (mut cr, mut lf, mut crlf) = (false, false, false);
    let mut i = 0;
    while let Some(off) = memchr::memchr2(b'\r', b'\n', &b[i..]) {
        let at = i + off;
        if b[at] == b'\r' && b.get(at + 1) == Some(&b'\n') {
            crlf = true;
            i = at + 2;
        } else {
            if b[at] == b'\r' {
                cr = true;
            } else {
                lf = true;
            }
            i = at + 1;
        }
    }
    match (cr, lf, crlf) {
        (false, false, false) => None,
        (true, false, false) => Some("cr"),
        (false, true, false) => Some("lf"),
        (false, false, true) => Some("crlf"),
        _ => Some("mixed"),
    }
}

/// The message with every CRLF and LF turned into CR, the HL7 segment separator, so `raw` is
/// HL7 whatever the sender used (the stored bytes stay exactly as received).
fn cr_separated(text: String) -> String {
    if !text.contains('\n') {
        return text;
    }
    text.replace("\r\n", "\r").replace('\n', "\r")
}

fn hl7_section<'a>(h: &'a Header, tz: &TimeZone) -> Hl7Header<'a> {
    Hl7Header {
        version: &h.version,
        message_type: &h.message_type,
        trigger_event: h.trigger_event.as_deref(),
        message_structure: h.message_structure.as_deref(),
        control_id: &h.control_id,
        processing_id: &h.processing_id,
        sending_application: h.sending_application.as_deref(),
        sending_facility: h.sending_facility.as_deref(),
        receiving_application: h.receiving_application.as_deref(),
        receiving_facility: h.receiving_facility.as_deref(),
        message_datetime: h
            .datetime
            .as_deref()
            .and_then(|d| parse_dtm(d, tz, h.delimiters.component)),
    }
}

/// Test-only fault injection: a message containing [`test_hook::PANIC_MARKER`] makes the
/// builder panic (the fault cannot be made for real: it stands for a bug in the builder).
#[cfg(test)]
pub(crate) mod test_hook {
    /// Bytes that make `build_with` panic in test builds.
    pub const PANIC_MARKER: &[u8] = b"SITERELAY-TEST-BUILDER-PANIC";
}
