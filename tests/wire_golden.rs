//! What goes on the wire, pinned: for every HL7 fixture (and a set of broken frames) the exact
//! acknowledgement bytes a sender gets back and the exact record JSON the central side gets,
//! compared with `tests/golden/wire.json`. Only what changes from run to run is masked: an
//! ACK's MSH-7 and MSH-10 (and BHS/FHS-7 and -11), a record's `id`, `received_at` and
//! `source.peer`.
//!
//! A refactor must leave this file unchanged. A change that means to alter what senders or the
//! central side see regenerates it on purpose and shows the difference in review:
//! `UPDATE_GOLDEN=1 cargo test --test wire_golden`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use siterelay::app::Daemon;

const GOLDEN: &str = "tests/golden/wire.json";

/// Broken or unusual frames whose answers are part of the contract.
fn probes() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let msh = "MSH|^~\\&|PAS|RXX01|SITERELAY|HUB|20260601120000||";
    vec![
        ("not HL7", "corpus", b"this is not HL7 at all".to_vec()),
        (
            "two messages in one frame",
            "corpus",
            format!("{msh}ADT^A08|P1|P|2.4\rPID|1||A1\r{msh}ADT^A08|P2|P|2.4\rPID|1||B2\r")
                .into_bytes(),
        ),
        (
            "required segment missing",
            "corpus",
            format!("{msh}ORU^R01|P3|P|2.4\rPID|1||A1\rOBX|1|NM|K||4\r").into_bytes(),
        ),
        (
            "missing control id",
            "corpus",
            format!("{msh}ADT^A01||P|2.4\rPID|1||A1\r").into_bytes(),
        ),
        (
            "LF on a strict feed",
            "strict",
            format!("{msh}ADT^A08|P4|P|2.4\nPID|1||A1\n").into_bytes(),
        ),
        (
            "version 3",
            "corpus",
            format!("{msh}ADT^A08|P5|P|3.0\rPID|1||A1\r").into_bytes(),
        ),
        (
            "enhanced mode, error only, accepted",
            "corpus",
            format!("{msh}ADT^A08|P6|P|2.4|||ER\rPID|1||A1\r").into_bytes(),
        ),
        (
            "enhanced mode, always, rejected",
            "corpus",
            format!("{msh}ORU^R01|P7|P|2.4|||AL\rPID|1||A1\r").into_bytes(),
        ),
    ]
}

/// Masks the fields of an acknowledgement that change every time.
fn mask_ack(frame: &[u8]) -> String {
    let text = String::from_utf8_lossy(frame);
    text.split('\r')
        .map(|seg| {
            let Some(sep) = seg.chars().nth(3) else {
                return seg.to_owned();
            };
            let mut f: Vec<String> = seg.split(sep).map(str::to_owned).collect();
            let masked: &[usize] = match &seg[..3] {
                // Split positions: MSH-7 is index 6 (MSH-1 is the separator itself).
                "MSH" => &[6, 9],
                "BHS" | "FHS" => &[6, 10],
                _ => &[],
            };
            for &i in masked {
                if let Some(x) = f.get_mut(i) {
                    *x = "<varies>".into();
                }
            }
            f.join(&sep.to_string())
        })
        .collect::<Vec<_>>()
        .join("\r")
}

fn mask_record(mut r: Value) -> Value {
    r["id"] = json!("<varies>");
    r["received_at"] = json!("<varies>");
    r["source"]["peer"] = json!("<varies>");
    r
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = format!("{}/tests/fixtures/hl7", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let mut bytes = std::fs::read(&p).unwrap();
            // The corpus test makes the radiology report's PDF; a small one does here.
            if bytes.windows(12).any(|w| w == b"{PDF_BASE64}") {
                bytes = String::from_utf8(bytes)
                    .unwrap()
                    .replace("{PDF_BASE64}", "JVBERi0xLjQKJSVFT0YK")
                    .into_bytes();
            }
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_records_for_every_fixture_match_the_golden_file() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let text = env.config_text(broker.port, &[], "")
        + "\n[[mllp]]\nname = \"corpus\"\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = \"8 MiB\"\ndedup_window = \"0s\"\n\
           \n[[mllp]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\nstrict = true\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();

    let mut acks: BTreeMap<String, Value> = BTreeMap::new();
    let mut sent = Vec::new();
    for (name, bytes) in fixtures() {
        sent.push((name, "corpus", bytes));
    }
    for (name, feed, bytes) in probes() {
        sent.push((format!("probe: {name}"), feed, bytes));
    }
    for (name, feed, bytes) in &sent {
        // A connection per message, so a closed connection cannot hide the next answer.
        let mut c = connect(d.addr(feed).unwrap()).await;
        c.write_raw(&siterelay::sources::mllp::framing::encode(bytes))
            .await
            .unwrap();
        // MSH-15 NE (or ER on success) asks for no acknowledgement: then nothing comes back.
        let ack = match c.read_frame(Duration::from_millis(1500)).await {
            Ok(frame) => json!(mask_ack(&frame)),
            Err(_) => json!(null),
        };
        acks.insert(name.clone(), ack);
    }
    // Every stored message arrives; the count is what the golden file says.
    let mut records: Vec<Value> = Vec::new();
    while let Some((_, payload, _)) = sub.recv(Duration::from_secs(3)).await {
        records.push(mask_record(json(&payload)));
    }
    records.sort_by_key(|r| (r["feed"].as_str().unwrap().to_owned(), r["seq"].as_u64()));
    d.stop().await;

    let got = json!({"acks": acks, "records": records});
    let path = format!("{}/{GOLDEN}", env!("CARGO_MANIFEST_DIR"));
    let pretty = serde_json::to_string_pretty(&got).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
        std::fs::write(&path, &pretty).unwrap();
        println!("wrote {GOLDEN}");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{GOLDEN}: {e} (UPDATE_GOLDEN=1 writes it)"));
    if want != pretty {
        let first = want
            .lines()
            .zip(pretty.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(pretty.lines().count()));
        let show = |s: &str| {
            s.lines()
                .skip(first.saturating_sub(3))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "the wire changed at line {} of {GOLDEN}:\n--- golden\n{}\n--- now\n{}",
            first + 1,
            show(&want),
            show(&pretty)
        );
    }
    assert!(records.len() > 20, "records: {}", records.len());
}

/// The record JSON for every ASTM fixture, as the builder makes it from a stored row (the link
/// layer's own bytes are pinned by the byte-level tests in `src/astm/link.rs`).
#[test]
fn astm_records_for_every_fixture_match_the_golden_file() {
    use siterelay::hl7::charset::Charset;
    use siterelay::outbox::{Format, PendingRow, SourceKind};
    use siterelay::record::{DeviceInfo, FeedRecordSettings, RecordBuilder};
    let settings = FeedRecordSettings {
        timezone: jiff::tz::TimeZone::get("Europe/London").unwrap(),
        default_charset: Charset::from_msh18("windows-1252").unwrap(),
        device: Some(DeviceInfo {
            model: Some("Analyser".into()),
            location: None,
            asset_tag: None,
            protocol: "astm",
        }),
        normalise: None,
    };
    let builder = RecordBuilder {
        appliance: "test-box".into(),
        organisation: Some("RXX".into()),
        include_raw: true,
        feeds: std::collections::HashMap::new(),
        fallback: settings,
    };
    let dir = format!("{}/tests/fixtures/astm", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for p in files {
        let row = PendingRow {
            row_id: 1,
            record_id: "019ad3f2-6c1e-7a31-9b4e-2f6d1c0a9e55".into(),
            feed: "analyser".into(),
            seq: 1,
            received_at_us: 1_780_000_000_000_000,
            source_kind: SourceKind::Serial,
            peer: Some("/dev/ttyUSB0".into()),
            peer_certificate: None,
            format: Format::Astm,
            raw: std::fs::read(&p).unwrap(),
            reprocessed: false,
            control_id_reused: false,
            truncated_bytes: 0,
        };
        let v: Value = serde_json::from_slice(&builder.build(&row)).unwrap();
        out.insert(p.file_name().unwrap().to_string_lossy().into_owned(), v);
    }
    assert!(out.len() >= 10, "ASTM fixtures: {}", out.len());
    let pretty = serde_json::to_string_pretty(&out).unwrap() + "\n";
    let path = format!(
        "{}/tests/golden/astm_records.json",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &pretty).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).expect("UPDATE_GOLDEN=1 writes it");
    assert!(
        want == pretty,
        "ASTM records changed; compare with `UPDATE_GOLDEN=1 cargo test --test wire_golden` and git diff"
    );
}
