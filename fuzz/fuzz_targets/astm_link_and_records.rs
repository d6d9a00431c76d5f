//! The ASTM E1381 link layer (receiver role) on arbitrary bytes and clock ticks, and the E1394
//! parser on whatever it delivers (and on the raw input). Must never panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use siterelay_proto::astm::link::{Action, Link, LinkConfig};

fuzz_target!(|data: &[u8]| {
    let tz = jiff::tz::TimeZone::UTC;
    let mut link = Link::new(LinkConfig::default());
    let mut now = Instant::now();
    for piece in data.chunks(13) {
        // The first byte of each piece advances the clock, so timers fire too.
        now += Duration::from_millis(piece[0] as u64 * 200);
        let mut actions = link.on_tick(now);
        actions.extend(link.on_bytes(now, &piece[1..]));
        for a in actions {
            if let Action::Deliver { message, complete } = a {
                let text = String::from_utf8_lossy(&message);
                let _ = siterelay_proto::astm::records::parse_message(&text, &tz);
                if complete {
                    let _ = link.on_store_result(now, piece[0] % 2 == 0);
                }
            }
        }
    }
    let _ = siterelay_proto::astm::records::parse_message(&String::from_utf8_lossy(data), &tz);
});
