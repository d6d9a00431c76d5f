//! The MLLP framer on arbitrary bytes, pushed in arbitrary chunk sizes: it must never panic,
//! never report a message larger than its limit, and account for every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use siterelay_proto::mllp::{FrameEvent, Framer};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let limit = 1 + (data[0] as usize) * 16;
    let chunk = 1 + (data.len() % 7);
    let mut f = Framer::new(limit);
    for piece in data[1..].chunks(chunk) {
        f.push(piece);
        while let Some(ev) = f.next_event() {
            if let FrameEvent::Message(m) = ev {
                assert!(m.len() <= limit);
                assert!(!m.contains(&0x0b) && !m.contains(&0x1c));
            }
        }
    }
    while f.finish().is_some() {}
});
