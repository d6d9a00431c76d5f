//! Messages from devices on serial ports that carry no HL7: ASTM E1394 messages (the link
//! layer has already reassembled them) and lines of text. Nothing to decide: each is stored as
//! it arrived, counted, and added to the feed's inventory; the port's protocol answers (an ASTM
//! final-frame ACK only after this returns `Ok`).

use super::FeedIntake;
use crate::outbox::{AppendError, Format, NewMessage};
use crate::telemetry::mllp as event;

impl FeedIntake {
    /// Store one device message (`Format::Astm` or `Format::Lines`) from `peer` (the device
    /// path); returns its `seq`. `truncated_bytes`: what the source dropped from a line that ran
    /// past `max_message_bytes` (0: whole); such a message is stored, flagged and counted.
    pub async fn receive_device(
        &self,
        raw: Vec<u8>,
        format: Format,
        peer: &str,
        truncated_bytes: u64,
    ) -> Result<u64, AppendError> {
        let size = raw.len();
        // What the inventory learns from an ASTM message: the instrument and its test codes.
        let facts = (format == Format::Astm).then(|| {
            let text = crate::hl7::charset::decode(&raw, None, self.default_charset)
                .unwrap_or_else(|_| String::from_utf8_lossy(&raw).into_owned());
            crate::astm::records::parse_message(&text, &jiff::tz::TimeZone::UTC).ok()
        });
        let msg = NewMessage {
            feed: self.name.clone(),
            source_kind: self.source_kind,
            peer: Some(peer.to_owned()),
            peer_certificate: None,
            format,
            control_id: None,
            raw,
            received_at_us: self.outbox.clock().now_us(),
            reprocessed: false,
            dedup: None,
            truncated_bytes,
        };
        let c = &*self.counters;
        match self.outbox.append(msg).await {
            Ok(s) => {
                event::stored(c, &self.name, "-", s.seq, size);
                if truncated_bytes > 0 {
                    event::truncated(c, &self.name, s.seq, size, truncated_bytes);
                }
                let (instrument, codes) = match facts.flatten() {
                    Some(m) => (
                        m.instrument.name.clone(),
                        m.patients
                            .iter()
                            .flat_map(|p| p.orders.iter())
                            .flat_map(|o| o.observations.iter())
                            .filter_map(|o| o.code.as_ref().and_then(|c| c.code.clone()))
                            .collect::<Vec<_>>(),
                    ),
                    None => (None, Vec::new()),
                };
                self.inventory.observe_device(
                    instrument.as_deref(),
                    &codes,
                    size,
                    self.outbox.clock().now_us(),
                );
                Ok(s.seq)
            }
            Err(e) => {
                event::refused(c, &self.name, "-", size, &e.to_string());
                Err(e)
            }
        }
    }
}
