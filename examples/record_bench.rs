//! Cost of turning a stored row into the published JSON record, with and without normalisation,
//! for the load generator's small ORU and for the fixture corpus's lab result (22 OBX).
//!
//! ```text
//! cargo run --release --example record_bench
//! ```
//!
//! Prints microseconds per record (single thread). This is the publish-side CPU the sink spends
//! per record; on a 2-core box it competes with the ACK path while records flow.

use std::collections::HashMap;
use std::time::Instant;

use siterelay::hl7::charset::Charset;
use siterelay::hl7::normalise::NormaliseOptions;
use siterelay::outbox::{Format, PendingRow, SourceKind};
use siterelay::record::{FeedRecordSettings, RecordBuilder};

const SMALL_ORU: &str = "MSH|^~\\&|LOADGEN|RXX|SITERELAY|HUB|20261130093000||ORU^R01^ORU_R01|L0-1|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT||19800615|F\r\
OBR|1|ORD1|LAB1|UE^UREA AND ELECTROLYTES^L|||202611300800\r\
OBX|1|NM|NA^Sodium^L||139|mmol/L|133-146||||F\r\
OBX|2|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3||||F\r";

fn builder(normalise: bool) -> RecordBuilder {
    let settings = FeedRecordSettings {
        timezone: jiff::tz::TimeZone::get("Europe/London").unwrap(),
        default_charset: Charset::Utf8,
        device: None,
        normalise: normalise.then(|| NormaliseOptions {
            demographics: true,
            ..NormaliseOptions::default()
        }),
    };
    RecordBuilder {
        appliance: "bench".into(),
        organisation: Some("RXX".into()),
        include_raw: true,
        feeds: HashMap::from([("f".to_string(), settings.clone())]),
        fallback: settings,
    }
}

fn row(raw: &[u8]) -> PendingRow {
    PendingRow {
        row_id: 1,
        record_id: "0190f0a0-0000-7000-8000-000000000000".into(),
        feed: "f".into(),
        seq: 1,
        received_at_us: 1_780_000_000_000_000,
        source_kind: SourceKind::Mllp,
        peer: Some("127.0.0.1:5000".into()),
        peer_certificate: None,
        format: Format::Hl7v2,
        raw: raw.to_vec(),
        reprocessed: false,
        control_id_reused: false,
        truncated_bytes: 0,
    }
}

fn main() {
    let lab = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hl7/lab_oru_r01_many_obx.hl7"
    ))
    .expect("fixture");
    for (name, raw) in [
        ("loadgen ORU (2 OBX)", SMALL_ORU.as_bytes()),
        ("lab ORU (22 OBX)", &lab[..]),
    ] {
        for normalise in [false, true] {
            let b = builder(normalise);
            let r = row(raw);
            let n = 20_000;
            let mut bytes = 0;
            for _ in 0..1000 {
                bytes = b.build(&r).len();
            }
            let t = Instant::now();
            for _ in 0..n {
                bytes = std::hint::black_box(b.build(&r)).len();
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!(
                "{name}: normalise {normalise:5}: {per:6.1} us/record ({:.0} records/s on one core), {} raw bytes -> {bytes} JSON bytes",
                1e6 / per,
                raw.len()
            );
        }
    }
}
