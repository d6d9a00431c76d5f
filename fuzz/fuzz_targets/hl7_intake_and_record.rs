//! What the intake does with an arbitrary frame: read the MSH, decide AA/AE, build the ACK,
//! split batches, and normalise the stored bytes as the record builder does. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use siterelay_proto::hl7::charset::{self, Charset};
use siterelay_proto::hl7::intake::{self, Intake, Responder};
use siterelay_proto::hl7::normalise::{NormaliseOptions, normalise_with_delimiters};

fuzz_target!(|data: &[u8]| {
    let me = Responder {
        application: "SITERELAY".into(),
        facility: "FUZZ".into(),
    };
    let strict = data.last().is_some_and(|b| b & 1 == 1);
    if let Intake::Store(h) = intake::assess(data, Charset::Utf8, strict, &me) {
        if let Some(e) = intake::missing_segment(&h, data) {
            let _ = intake::answer(&h, intake::Outcome::Rejected(&e));
        }
        let _ = intake::answer_stored(&h);
        let _ = intake::answer_refused(&h, "full");
    }
    if siterelay_proto::hl7::batch::is_batch(data)
        && let Ok(batch) = siterelay_proto::hl7::batch::split(data)
    {
        let mut acks = Vec::new();
        for group in &batch.groups {
            let mut group_acks = Vec::new();
            for range in &group.messages {
                assert!(range.start <= range.end && range.end <= data.len());
                if let Intake::Store(h) =
                    intake::assess(&data[range.clone()], Charset::Utf8, strict, &me)
                {
                    group_acks.extend(intake::answer_refused(&h, "full"));
                }
            }
            acks.push(group_acks);
        }
        let _ = siterelay_proto::hl7::ack::build_batch_ack(
            &batch,
            &acks,
            jiff::ZonedDateTime::now(),
            || "X".into(),
        );
    }
    let _ = intake::answer_oversized(data, 1024, &me);
    // What the record builder does with the stored bytes: decode them as MSH-18 says (or
    // leniently), then normalise with the message's own delimiters.
    if let Ok(h) = siterelay_proto::hl7::header::parse_header(data) {
        let cs = h
            .charset
            .as_deref()
            .and_then(Charset::from_msh18)
            .unwrap_or(Charset::Utf8);
        let text = charset::decode(data, None, cs)
            .unwrap_or_else(|_| String::from_utf8_lossy(data).into_owned());
        let opts = NormaliseOptions::default();
        let n = normalise_with_delimiters(&text, &h.delimiters, &opts);
        let json = serde_json::to_vec(&n).expect("normalised content serialises");
        assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
    }
});
