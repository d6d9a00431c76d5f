//! A batch frame (`FHS`/`BHS` ... `BTS`/`FTS`) as the MLLP intake handles it: split it, refuse
//! it whole beyond a message cap, decide each message (assess, policy, required segments), give
//! each an outcome (stored, refused by the store, rejected) and build the one batch
//! acknowledgement. Must never panic, and the acknowledgement must be a batch that lists exactly
//! the messages not accepted, split again the same way, and stay within its documented size
//! bound (docs/contract.md "Batches").
#![no_main]

use libfuzzer_sys::fuzz_target;
use siterelay_proto::hl7::ack::{self, AckCode};
use siterelay_proto::hl7::batch;
use siterelay_proto::hl7::charset::Charset;
use siterelay_proto::hl7::intake::{self, Intake, Outcome, Policy, Responder, Verdict};

/// The size bound docs/contract.md ("Batches") states for one acknowledgement of a batch
/// member: three times the received MSH segment (its fields 3-6 and 10-12 are mirrored; text
/// that is not valid in its character set can come back as 3-byte replacement characters)
/// plus this much.
const PER_ACK: usize = 512;
/// And for each FHS/BHS of the acknowledgement with its trailer: three times the received
/// header segment plus this much.
const PER_ENVELOPE: usize = 512;

fuzz_target!(|data: &[u8]| {
    // The last byte picks the feed's settings, as a config would.
    let knobs = data.last().copied().unwrap_or(0);
    let strict = knobs & 1 == 1;
    let max_batch_messages = 1 + (knobs as usize >> 1) % 64;
    let policy = Policy {
        accept: if knobs & 0x80 != 0 {
            vec!["ADT^*".into(), "ORU^R01".into()]
        } else {
            Vec::new()
        },
        ignore_unaccepted: knobs & 0x40 != 0,
        processing_ids: if knobs & 0x20 != 0 {
            vec!["P".into()]
        } else {
            Vec::new()
        },
        strict,
    };
    let me = Responder {
        application: "SITERELAY".into(),
        facility: "FUZZ".into(),
    };
    if !batch::is_batch(data) {
        return;
    }
    let b = match batch::split(data) {
        Ok(b) => b,
        Err(e) => {
            let err = e.ack_error();
            let nak = ack::minimal_nak(
                AckCode::AE,
                &err.text,
                Some(&err),
                "X1",
                now(),
                "SITERELAY",
                "FUZZ",
            );
            assert!(nak.len() < 1024);
            return;
        }
    };
    let mut in_order = 0usize;
    for g in &b.groups {
        for r in &g.messages {
            assert!(r.start <= r.end && r.end <= data.len());
            assert!(r.start >= in_order, "messages overlap or go backwards");
            in_order = r.end;
        }
    }
    let count = b.message_count();
    if count > max_batch_messages {
        let text =
            format!("batch of {count} messages exceeds this feed's limit of {max_batch_messages}");
        let nak = ack::minimal_nak(AckCode::AE, &text, None, "X1", now(), "SITERELAY", "FUZZ");
        assert!(nak.len() < 1024);
        return;
    }
    let mut acks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); b.groups.len()];
    let mut not_accepted = 0usize;
    let mut mirrored = 0usize;
    let mut i = 0usize;
    for (g, group) in b.groups.iter().enumerate() {
        for range in &group.messages {
            let msg = &data[range.clone()];
            i += 1;
            // The store's outcome for a message it would take: cycles through the three.
            let store_says = (knobs as usize + i) % 3;
            let answer = match intake::assess(msg, Charset::Utf8, strict, &me) {
                Intake::Reject { ack, .. } => ack,
                Intake::Store(h) => match intake::check_policy(&h, &policy) {
                    Verdict::Ignore => intake::answer_stored(&h),
                    Verdict::Refuse(e) => intake::answer(&h, Outcome::Refused(&e)),
                    Verdict::Accept => match intake::missing_segment(&h, msg) {
                        Some(e) => intake::answer(&h, Outcome::Rejected(&e)),
                        None if store_says == 0 => intake::answer_stored(&h),
                        None if store_says == 1 => {
                            intake::answer_refused(&h, "the outbox is full; resend later")
                        }
                        None => intake::answer(
                            &h,
                            Outcome::Rejected(&ack::AckError::new(207, None, "the store failed")),
                        ),
                    },
                },
            };
            // What the intake lists: every answer that is not a positive one.
            if let Some(a) = answer {
                let positive = a.windows(7).any(|w| w == b"MSA|AA|" || w == b"MSA|CA|");
                assert!(
                    a.len() <= 3 * msg_header_len(msg) + PER_ACK,
                    "an acknowledgement of {} bytes for a message whose MSH is {} bytes",
                    a.len(),
                    msg_header_len(msg)
                );
                if !positive {
                    mirrored += 3 * msg_header_len(msg);
                    not_accepted += 1;
                    acks[g].push(a);
                }
            }
        }
    }
    let mut n = 0;
    let out = ack::build_batch_ack(&b, &acks, now(), || {
        n += 1;
        format!("SR{n:X}")
    });
    // Every FHS/BHS segment in the frame (a BHS-less batch mirrors the FHS again).
    let headers: usize = segments(data)
        .filter(|s| s.starts_with(b"FHS") || s.starts_with(b"BHS"))
        .map(|s| 3 * s.len())
        .sum();
    let file_header = segments(data)
        .find(|s| s.starts_with(b"FHS"))
        .map_or(0, |s| 3 * s.len());
    let envelopes = headers + b.groups.len() * file_header + (b.groups.len() + 1) * PER_ENVELOPE;
    assert!(
        out.len() <= mirrored + not_accepted * PER_ACK + envelopes,
        "batch ACK of {} bytes for {not_accepted} listed messages",
        out.len()
    );
    // The acknowledgement is itself a batch that splits into the listed acknowledgements.
    assert!(batch::is_batch(&out));
    let back = batch::split(&out).expect("the batch acknowledgement splits");
    assert_eq!(back.groups.len(), b.groups.len());
    assert_eq!(back.message_count(), not_accepted);
});

fn now() -> jiff::ZonedDateTime {
    jiff::Timestamp::from_second(1_774_000_000)
        .unwrap()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
}

/// The frame's segments (CR or LF separated).
fn segments(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|&b| b == b'\r' || b == b'\n')
}

/// Bytes of the message's first segment (its MSH), which an acknowledgement mirrors from.
fn msg_header_len(msg: &[u8]) -> usize {
    msg.iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(msg.len())
}
