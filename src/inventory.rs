//! The feed inventory: what each feed actually carries, learned from traffic.
//!
//! For every stored message the source calls [`FeedInventory::observe_hl7`] with facts from its
//! header (type, trigger, version, sender, charset) and the segment ids present; nothing that
//! identifies a patient is kept. The inventory is published retained to
//! `{prefix}/{appliance}/inventory` (hourly and soon after it learns something new) and saved in
//! the outbox's `meta` table so it survives restarts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Most distinct keys kept per map (types, senders, segments...), so a misbehaving sender that
/// invents a new value per message cannot grow memory without bound. Each key is at most
/// [`crate::text::REPORT_MAX_CHARS`] characters (longer ones are cut, with a marker).
const MAX_KEYS: usize = 500;

/// What one feed has carried.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FeedInventoryData {
    /// Messages stored.
    pub messages: u64,
    /// `TYPE^TRIGGER` (e.g. `ADT^A01`) -> count.
    pub message_types: BTreeMap<String, u64>,
    /// MSH-12 -> count.
    pub versions: BTreeMap<String, u64>,
    /// `application|facility` (MSH-3|MSH-4) -> count.
    pub senders: BTreeMap<String, u64>,
    /// `application|facility` (MSH-5|MSH-6) -> count.
    pub receivers: BTreeMap<String, u64>,
    /// Character set used to decode -> count.
    pub charsets: BTreeMap<String, u64>,
    /// Segment id -> number of messages containing it (Z-segments included).
    pub segments: BTreeMap<String, u64>,
    /// Serial devices: instrument identities (ASTM H-5 name) -> messages.
    #[serde(default)]
    pub instruments: BTreeMap<String, u64>,
    /// Serial devices: test codes seen in results -> count.
    #[serde(default)]
    pub test_codes: BTreeMap<String, u64>,
    /// Sum of message sizes (for the average).
    pub total_bytes: u64,
    /// Largest message.
    pub largest_bytes: u64,
    /// First message (µs since epoch).
    pub first_seen_us: i64,
    /// Latest message (µs since epoch).
    pub last_seen_us: i64,
}

impl FeedInventoryData {
    /// Count one message of `size` bytes seen at `at_us`.
    fn account(&mut self, size: usize, at_us: i64) {
        self.total_bytes += size as u64;
        self.largest_bytes = self.largest_bytes.max(size as u64);
        if self.first_seen_us == 0 {
            self.first_seen_us = at_us;
        }
        self.last_seen_us = at_us;
    }
}

/// Facts about one HL7 message, as the inventory needs them.
pub struct Hl7Facts<'a> {
    /// `TYPE^TRIGGER` or `TYPE`.
    pub message_type: &'a str,
    /// Trigger event, if any.
    pub trigger: Option<&'a str>,
    /// MSH-12.
    pub version: &'a str,
    /// MSH-3.1.
    pub sending_application: Option<&'a str>,
    /// MSH-4.1.
    pub sending_facility: Option<&'a str>,
    /// MSH-5.1.
    pub receiving_application: Option<&'a str>,
    /// MSH-6.1.
    pub receiving_facility: Option<&'a str>,
    /// Charset name.
    pub charset: &'a str,
}

/// Live inventory of one feed.
#[derive(Debug, Default)]
pub struct FeedInventory {
    data: Mutex<FeedInventoryData>,
    /// Set when a key appeared that was not there before.
    changed: AtomicBool,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, changed: &mut bool) {
    // A sender chooses these strings: each one is cut to a bounded length, so a 1 MB MSH-3
    // cannot make a 1 MB inventory (issue 13: five made one of 30 MB, larger than the MQTT
    // packet limit, and every reconnect failed).
    let key = crate::text::bounded(key);
    let key = key.as_ref();
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_KEYS {
        map.insert(key.to_string(), 1);
        *changed = true;
    }
}

pub use siterelay_proto::hl7::segment_ids;

impl FeedInventory {
    /// Start from what was saved.
    pub fn from_saved(data: FeedInventoryData) -> FeedInventory {
        FeedInventory {
            data: Mutex::new(data),
            changed: AtomicBool::new(false),
        }
    }

    /// Record one stored HL7 message.
    pub fn observe_hl7(&self, f: &Hl7Facts<'_>, segments: &[[u8; 3]], size: usize, at_us: i64) {
        let mut changed = false;
        let mut d = self.data.lock().expect("inventory lock");
        d.messages += 1;
        let ty = match f.trigger {
            Some(t) => format!("{}^{}", f.message_type, t),
            None => f.message_type.to_string(),
        };
        bump(&mut d.message_types, &ty, &mut changed);
        bump(&mut d.versions, f.version, &mut changed);
        let sender = format!(
            "{}|{}",
            f.sending_application.unwrap_or(""),
            f.sending_facility.unwrap_or("")
        );
        bump(&mut d.senders, &sender, &mut changed);
        let receiver = format!(
            "{}|{}",
            f.receiving_application.unwrap_or(""),
            f.receiving_facility.unwrap_or("")
        );
        bump(&mut d.receivers, &receiver, &mut changed);
        bump(&mut d.charsets, f.charset, &mut changed);
        for id in segments {
            bump(
                &mut d.segments,
                std::str::from_utf8(id).unwrap_or("???"),
                &mut changed,
            );
        }
        d.account(size, at_us);
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Record one stored device message (ASTM or line output).
    pub fn observe_device(
        &self,
        instrument: Option<&str>,
        test_codes: &[String],
        size: usize,
        at_us: i64,
    ) {
        let mut changed = false;
        let mut d = self.data.lock().expect("inventory lock");
        d.messages += 1;
        if let Some(i) = instrument {
            bump(&mut d.instruments, i, &mut changed);
        }
        for c in test_codes {
            bump(&mut d.test_codes, c, &mut changed);
        }
        d.account(size, at_us);
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// A copy of the data.
    pub fn snapshot(&self) -> FeedInventoryData {
        self.data.lock().expect("inventory lock").clone()
    }

    /// True (once) if something new was learned since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_ids_are_listed_once_each_in_order() {
        let m = b"MSH|^~\\&|A\rPID|1\rOBX|1\rOBX|2\nZPV|x\r\r";
        let ids: Vec<String> = segment_ids(m)
            .iter()
            .map(|i| String::from_utf8(i.to_vec()).unwrap())
            .collect();
        assert_eq!(ids, ["MSH", "PID", "OBX", "ZPV"]);
    }

    #[test]
    fn new_keys_mark_the_inventory_changed_repeats_do_not() {
        let inv = FeedInventory::default();
        let f = Hl7Facts {
            message_type: "ADT",
            trigger: Some("A01"),
            version: "2.4",
            sending_application: Some("PAS"),
            sending_facility: Some("RXX"),
            receiving_application: None,
            receiving_facility: None,
            charset: "UNICODE UTF-8",
        };
        inv.observe_hl7(&f, &segment_ids(b"MSH|\rPID|\r"), 100, 1);
        assert!(inv.take_changed());
        inv.observe_hl7(&f, &segment_ids(b"MSH|\rPID|\r"), 300, 2);
        assert!(!inv.take_changed());
        let d = inv.snapshot();
        assert_eq!(d.messages, 2);
        assert_eq!(d.message_types["ADT^A01"], 2);
        assert_eq!(d.senders["PAS|RXX"], 2);
        assert_eq!((d.total_bytes, d.largest_bytes), (400, 300));
        assert_eq!((d.first_seen_us, d.last_seen_us), (1, 2));
    }
}
