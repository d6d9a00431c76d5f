//! What the listener does with an arbitrary frame: read the MSH, decide AA/AE, build the ACK,
//! and build the published record from the stored bytes. Must never panic.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use siterelay::hl7::charset::Charset;
use siterelay::hl7::intake::{self, Intake, Responder};
use siterelay::outbox::{Format, PendingRow, SourceKind};
use siterelay::record::{FeedRecordSettings, RecordBuilder};

fn builder() -> &'static RecordBuilder {
    static B: OnceLock<RecordBuilder> = OnceLock::new();
    B.get_or_init(|| RecordBuilder {
        appliance: "fuzz".into(),
        organisation: Some("RXX".into()),
        include_raw: true,
        feeds: HashMap::new(),
        fallback: FeedRecordSettings {
            timezone: jiff::tz::TimeZone::get("Europe/London").unwrap(),
            default_charset: Charset::Utf8,
            device: None,
            normalise: Some(siterelay::hl7::normalise::NormaliseOptions {
                demographics: true,
                ..Default::default()
            }),
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let me = Responder { application: "SITERELAY".into(), facility: "FUZZ".into() };
    let strict = data.last().is_some_and(|b| b & 1 == 1);
    if let Intake::Store(h) = intake::assess(data, Charset::Utf8, strict, &me) {
        if let Some(e) = intake::missing_segment(&h, data) {
            let _ = intake::answer(&h, intake::Outcome::Rejected(&e));
        }
        let _ = intake::answer_stored(&h);
        let _ = intake::answer_refused(&h, "full");
    }
    if siterelay::hl7::batch::is_batch(data)
        && let Ok(batch) = siterelay::hl7::batch::split(data)
    {
        let mut acks = Vec::new();
        for group in &batch.groups {
            let mut group_acks = Vec::new();
            for range in &group.messages {
                assert!(range.start <= range.end && range.end <= data.len());
                if let Intake::Store(h) = intake::assess(&data[range.clone()], Charset::Utf8, strict, &me) {
                    group_acks.extend(intake::answer_refused(&h, "full"));
                }
            }
            acks.push(group_acks);
        }
        let _ = siterelay::hl7::ack::build_batch_ack(&batch, &acks, jiff::ZonedDateTime::now(), || "X".into());
    }
    let _ = intake::answer_oversized(data, 1024, &me);
    let row = PendingRow {
        row_id: 1,
        record_id: "00000000-0000-7000-8000-000000000000".into(),
        feed: "f".into(),
        seq: 1,
        received_at_us: 0,
        source_kind: SourceKind::Mllp,
        peer: None,
        format: Format::Hl7v2,
        raw: data.to_vec(),
        reprocessed: false,
        control_id_reused: false,
    };
    let json = builder().build(&row);
    assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
});
