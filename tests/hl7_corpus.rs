//! The fixture corpus (`tests/fixtures/hl7/`, synthetic messages shaped like real trust feeds)
//! sent over a real MLLP socket to a daemon with a real SQLite outbox and the in-process
//! mutual-TLS broker: every record that comes out validates against `docs/schema/record.v1`,
//! and carries what a central consumer needs without re-parsing HL7.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use siterelay::app::Daemon;
use siterelay::client::parse_batch_ack;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/hl7/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A real (minimal, valid) PDF of at least `min_bytes`: one page whose content stream is padded
/// with a long PDF comment, so the file is large without being random junk.
fn synthetic_pdf(min_bytes: usize) -> Vec<u8> {
    let mut content =
        b"BT /F1 12 Tf 72 720 Td (Synthetic radiology report - test data only) Tj ET\n".to_vec();
    let mut i = 0u64;
    while content.len() < min_bytes {
        content.extend_from_slice(
            format!("% padding line {i:08} for a large test document\n").as_bytes(),
        );
        i += 1;
    }
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
    ];
    for (n, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", n + 1).as_bytes());
    }
    offsets.push(pdf.len());
    pdf.extend_from_slice(format!("4 0 obj\n<< /Length {} >>\nstream\n", content.len()).as_bytes());
    pdf.extend_from_slice(&content);
    pdf.extend_from_slice(b"\nendstream\nendobj\n");
    offsets.push(pdf.len());
    pdf.extend_from_slice(
        b"5 0 obj\n<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>\nendobj\n",
    );
    let xref = pdf.len();
    pdf.extend_from_slice(b"xref\n0 6\n0000000000 65535 f \n");
    for o in offsets {
        pdf.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!("trailer\n<< /Size 6 /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
    );
    pdf
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn daemon(env: &Env, broker_port: u16) -> Daemon {
    let text = env.config_text(broker_port, &[], "")
        + "\n[[mllp]]\nname = \"corpus\"\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = \"8 MiB\"\n\
           \n[[mllp]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\nstrict = true\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    Daemon::start(&cfg).await.unwrap()
}

/// Records by control id; every one checked against the published schema.
async fn collect(
    sub: &mut siterelay_testkit::subscriber::Subscriber,
    n: usize,
) -> HashMap<String, Value> {
    let got = sub.collect(n, Duration::from_secs(30)).await;
    assert_eq!(got.len(), n, "records received");
    let mut by_id = HashMap::new();
    for (topic, payload, _) in got {
        assert_eq!(topic, "siterelay/test-box/records/corpus");
        let r = json(&payload);
        check_schema("record", &r);
        assert!(
            r.get("warnings").is_none(),
            "{}: {:?}",
            r["hl7"]["control_id"],
            r["warnings"]
        );
        by_id.insert(r["hl7"]["control_id"].as_str().unwrap().to_string(), r);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_becomes_a_schema_valid_normalised_record() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let d = daemon(&env, broker.port).await;
    let mut c = connect(d.addr("corpus").unwrap()).await;

    let pdf = synthetic_pdf(1_200_000);
    let radiology = String::from_utf8(fixture("radiology_oru_r01_pdf.hl7"))
        .unwrap()
        .replace("{PDF_BASE64}", &base64(&pdf))
        .into_bytes();
    assert!(radiology.len() > 1_500_000, "a message well over 1 MiB");

    // (fixture, bytes, expected MSA-1)
    let singles: Vec<(&str, Vec<u8>, &str)> = vec![
        // MSH-15 AL: enhanced mode, commit accept.
        (
            "pas_adt_a01_zsegments.hl7",
            fixture("pas_adt_a01_zsegments.hl7"),
            "CA",
        ),
        (
            "pas_adt_a08_nulls_crlf.hl7",
            fixture("pas_adt_a08_nulls_crlf.hl7"),
            "AA",
        ),
        (
            "pas_adt_a40_merge.hl7",
            fixture("pas_adt_a40_merge.hl7"),
            "AA",
        ),
        // MSH-15 NE: no acknowledgement at all; checked below by the next ACK's control id.
        ("orm_o01.hl7", fixture("orm_o01.hl7"), "AA"),
        ("oml_o21.hl7", fixture("oml_o21.hl7"), "AA"),
        ("siu_s12.hl7", fixture("siu_s12.hl7"), "AA"),
        ("mdm_t02.hl7", fixture("mdm_t02.hl7"), "AA"),
        ("radiology_oru_r01_pdf.hl7", radiology.clone(), "AA"),
    ];
    for (name, bytes, want) in &singles {
        let ack = c.send(bytes, ACK_WAIT).await.unwrap();
        assert_eq!(&ack.code, want, "{name}: {}", ack.text);
    }
    // The lab result asks for no accept acknowledgement (MSH-15 NE): nothing comes back, and the
    // next message's ACK is the next thing on the wire.
    c.write_raw(&siterelay::sources::mllp::framing::encode(&fixture(
        "lab_oru_r01_many_obx.hl7",
    )))
    .await
    .unwrap();
    let ack = c
        .send(
            &fixture("pas_adt_a40_merge.hl7").replace_control_id("PAS000103", "PAS000104"),
            ACK_WAIT,
        )
        .await
        .unwrap();
    assert_eq!(
        (ack.code.as_str(), ack.control_id.as_str()),
        ("AA", "PAS000104")
    );

    // The batch: one acknowledgement batch listing only the message without its OBR.
    let batch = fixture("lab_batch.hl7");
    let naks = c.send_batch(&batch, ACK_WAIT).await.unwrap();
    assert_eq!(naks.len(), 1, "{naks:?}");
    assert_eq!(
        (naks[0].code.as_str(), naks[0].control_id.as_str()),
        ("AE", "B0002")
    );
    let nak_text = String::from_utf8_lossy(&naks[0].raw);
    assert!(
        nak_text.contains("ERR||OBR^1|100^Segment sequence error^HL70357|E"),
        "{nak_text}"
    );

    let r = collect(&mut sub, 8 + 2 + 2).await;

    // PAS ADT^A01: Latin-1 decoded, Z-segments kept in order, NHS number checked.
    let a01 = &r["PAS000101"];
    assert_eq!(a01["charset"], "8859/1");
    assert_eq!(a01["patient"]["names"][0]["given"], "ZOË");
    assert_eq!(
        a01["patient"]["nhs_number"],
        json!({"value": "9990000018", "valid": true, "verification_status": "01"})
    );
    assert_eq!(a01["patient"]["postcode"], "ZZ99 9ZZ");
    assert_eq!(a01["visit"]["location"]["bed"], "BED 4");
    assert_eq!(a01["visit"]["visit_number"]["value"], "V0000123");
    // 29 March 2026 is the first day of BST.
    assert_eq!(
        a01["hl7"]["message_datetime"]["value"],
        "2026-03-29T10:30:00+01:00"
    );
    assert_eq!(
        a01["segments"],
        json!([
            "MSH", "EVN", "PID", "PD1", "NK1", "PV1", "PV2", "ZU1", "ZU3", "ZU6"
        ])
    );
    assert!(
        a01["raw"]
            .as_str()
            .unwrap()
            .contains("ZU6|N|\\F\\ESCAPED\\S\\TEXT"),
        "raw keeps escapes verbatim"
    );

    // ADT^A08 with HL7 nulls, CRLF line ends: "" is null (clear), empty is absent (unknown).
    let a08 = &r["PAS000102"];
    assert_eq!(a08["patient"]["sex"], Value::Null);
    assert_eq!(a08["patient"]["address"], Value::Null);
    assert_eq!(a08["patient"]["death"], json!({"date_time": null}));
    assert!(a08["patient"].get("names").is_some());
    assert_eq!(a08["patient"]["birth_date"]["precision"], "year");
    assert_eq!(a08["visit"]["location"], Value::Null);
    assert_eq!(a08["visit"]["class"], "O");

    // ADT^A40: new identifiers in patient, prior ones in merge.
    let a40 = &r["PAS000103"];
    assert_eq!(a40["patient"]["identifiers"][1]["value"], "RXX2222222");
    assert_eq!(a40["merge"]["prior_identifiers"][0]["value"], "RXX1111111");
    assert_eq!(a40["merge"]["prior_identifiers"][1]["value"], "9990000052");
    assert_eq!(r["PAS000104"]["hl7"]["trigger_event"], "A40");

    // Lab ORU: two orders, 22 observations typed by OBX-2, notes where they belong.
    let lab = &r["LAB20260601-0042"];
    assert_eq!(lab["charset"], "UNICODE UTF-8");
    let orders = lab["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0]["universal_service"]["code"], "FBC");
    assert_eq!(orders[0]["placer_number"]["value"], "ICE123456");
    let obs = lab["observations"].as_array().unwrap();
    assert_eq!(obs.len(), 22);
    assert_eq!(obs[0]["value"], json!(7.2));
    assert_eq!(obs[2]["code"]["code"], "HB");
    assert_eq!(obs[2]["abnormal_flags"], json!(["L"]));
    assert_eq!(
        obs[12]["notes"],
        json!(["Film comment: hypochromic microcytic picture.\nSuggest ferritin."])
    );
    assert_eq!(obs[13]["order"], 1);
    assert_eq!(obs[14]["abnormal_flags"], json!(["HH"]));
    assert_eq!(obs[18]["value"], json!({"comparator": ">", "num1": 90}));
    assert_eq!(obs[19]["value"]["code"], "SL");
    assert_eq!(obs[20]["value_type"], "TX");
    assert_eq!(obs[21]["value"], Value::Null, "ST \"\" is an explicit null");
    // +0100 given in the message: kept, not assumed.
    assert_eq!(lab["hl7"]["message_datetime"]["zone"], "given");

    // Radiology with a 1.2 MB PDF: the record carries the message intact, and the ED value as a
    // reference with its decoded size, never the data.
    let rad = &r["RAD000777"];
    assert_eq!(rad["raw"].as_str().unwrap().as_bytes(), &radiology[..]);
    let ed = &rad["observations"][3];
    assert_eq!(ed["value_type"], "ED");
    assert_eq!(ed["value"]["media_type"], "application/pdf");
    assert_eq!(ed["value"]["encoding"], "Base64");
    assert_eq!(
        ed["value"]["size_bytes"],
        base64(&pdf).len(),
        "ED.5 length as sent"
    );
    assert_eq!(
        rad["observations"][2]["value"],
        "Conclusion:\nNormal study."
    );

    // Orders.
    assert_eq!(r["ICE000555"]["orders"][0]["control"], "NW");
    assert_eq!(
        r["ICE000555"]["orders"][0]["notes"],
        json!(["Patient on levothyroxine."])
    );
    assert_eq!(
        r["ICE000556"]["orders"][0]["universal_service"]["code"],
        "LFT"
    );
    // Scheduling and documents produce records with their segments (and patient) too.
    assert_eq!(r["PAS000201"]["hl7"]["message_type"], "SIU");
    assert_eq!(
        r["PAS000201"]["patient"]["identifiers"][0]["value"],
        "9990000018"
    );
    assert_eq!(r["EPR000301"]["observations"].as_array().unwrap().len(), 2);

    // Batch members: each stored with its own consecutive seq; the refused one is quarantined.
    let (s1, s3) = (
        r["B0001"]["seq"].as_u64().unwrap(),
        r["B0003"]["seq"].as_u64().unwrap(),
    );
    assert_eq!(s3, s1 + 1);
    assert_eq!(
        r["B0003"]["observations"][0]["abnormal_flags"],
        json!(["H"])
    );
    let reader = d.outbox().reader().unwrap();
    let q = reader.quarantined(None).unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].control_id.as_deref(), Some("B0002"));
    assert_eq!(q[0].error_location.as_deref(), Some("OBR"));
    d.stop().await;
}

/// A strict feed refuses LF/CRLF separators with `AE`; the tolerant feed takes the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_feed_refuses_lf_separators_that_a_tolerant_feed_accepts() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let d = daemon(&env, broker.port).await;
    let crlf = fixture("pas_adt_a08_nulls_crlf.hl7");
    let ack = connect(d.addr("strict").unwrap())
        .await
        .send(&crlf, ACK_WAIT)
        .await
        .unwrap();
    assert_eq!(ack.code, "AE");
    let text = String::from_utf8_lossy(&ack.raw);
    assert!(
        text.contains(
            "|100^Segment sequence error^HL70357|E|||segments must be separated by CR alone"
        ),
        "{text}"
    );
    let cr = String::from_utf8(crlf.clone())
        .unwrap()
        .replace("\r\n", "\r");
    let ack = connect(d.addr("strict").unwrap())
        .await
        .send(cr.as_bytes(), ACK_WAIT)
        .await
        .unwrap();
    assert_eq!(ack.code, "AA");
    let ack = connect(d.addr("corpus").unwrap())
        .await
        .send(&crlf, ACK_WAIT)
        .await
        .unwrap();
    assert_eq!(ack.code, "AA");
    d.stop().await;
}

/// Batches whose envelope is unusable are refused whole with one `AE`; empty batches (sent on a
/// schedule) get an empty acknowledgement batch; an LF-separated batch file works like a CR one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_edge_cases_get_their_defined_answers() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let d = daemon(&env, broker.port).await;
    let mut c = connect(d.addr("corpus").unwrap()).await;

    let naks = c
        .send_batch(b"BHS|^~\\&|PAS|RXX||||||||EMPTY1\rBTS|0\r", ACK_WAIT)
        .await
        .unwrap();
    assert!(naks.is_empty());

    c.write_raw(&siterelay::sources::mllp::framing::encode(
        b"BHS|^~\\&\rPID|||1\rBTS|0\r",
    ))
    .await
    .unwrap();
    let frame = c.read_frame(ACK_WAIT).await.unwrap();
    let answer = parse_batch_ack(&frame).unwrap();
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].code, "AE");
    assert!(
        answer[0].text.contains("outside any message"),
        "{}",
        answer[0].text
    );

    let lf = String::from_utf8(fixture("lab_batch.hl7"))
        .unwrap()
        .replace('\r', "\n");
    let naks = c.send_batch(lf.as_bytes(), ACK_WAIT).await.unwrap();
    assert_eq!(naks.len(), 1);
    assert_eq!(naks[0].control_id, "B0002");
    let g = d.outbox().gauges();
    assert_eq!(g.appended.load(std::sync::atomic::Ordering::Relaxed), 2);
    d.stop().await;
}

trait ReplaceControlId {
    fn replace_control_id(&self, from: &str, to: &str) -> Vec<u8>;
}

impl ReplaceControlId for Vec<u8> {
    fn replace_control_id(&self, from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(self.clone())
            .unwrap()
            .replace(from, to)
            .into_bytes()
    }
}

/// The clinical-safety fixtures (issue: records a clinician can trust) over a real MLLP socket:
/// each is acknowledged, and its record says what a clinician must not be misled about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinical_safety_fixtures_keep_every_patient_number_code_and_date_end_to_end() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let d = daemon(&env, broker.port).await;
    let mut c = connect(d.addr("corpus").unwrap()).await;
    let names = [
        "adt_a17_bed_swap.hl7",
        "adt_a40_two_pairs_lf.hl7",
        "oru_r01_poc_glucose.hl7",
        "oru_r01_blood_bank_crlf.hl7",
        "orm_o01_alternate_codes.hl7",
        "oru_r01_two_patients.hl7",
        "adt_a08_nulls_invalid_times.hl7",
    ];
    for name in names {
        let ack = c.send(&fixture(name), ACK_WAIT).await.unwrap();
        assert_eq!(ack.code, "AA", "{name}: {}", ack.text);
    }
    let got = sub.collect(names.len(), Duration::from_secs(30)).await;
    assert_eq!(got.len(), names.len());
    let mut r: HashMap<String, Value> = HashMap::new();
    for (_, payload, _) in got {
        let v = json(&payload);
        check_schema("record", &v);
        let raw = v["raw"].as_str().unwrap();
        assert!(!raw.contains('\n'), "raw is CR-separated: {raw:?}");
        r.insert(v["hl7"]["control_id"].as_str().unwrap().to_owned(), v);
    }

    // A17: both patients, both locations.
    let a17 = &r["PAS000401"];
    assert_eq!(
        a17["patients"][0]["patient"]["nhs_number"]["value"],
        "9990000026"
    );
    assert_eq!(
        a17["patients"][1]["patient"]["nhs_number"]["value"],
        "9990000034"
    );
    assert_eq!(a17["patients"][0]["visit"]["location"]["bed"], "BED1");
    assert_eq!(a17["patients"][1]["visit"]["location"]["bed"], "BED4");
    assert_eq!(a17["patient"]["birth_date"]["value"], "1980-05-15");
    assert_eq!(a17["patient"]["birth_time"]["value"], "08:30");
    assert_eq!(a17["event"]["planned_at"]["hl7"], "20260601213000");

    // A40 with two pairs, sent with LF: both pairs, dates as sent, the separator reported.
    let a40 = &r["PAS000402"];
    assert_eq!(a40["segment_separator"], "lf");
    assert_eq!(a40["patients"].as_array().unwrap().len(), 2);
    assert_eq!(
        a40["patients"][1]["merge"]["prior_identifiers"][1]["value"],
        "9990000069"
    );
    assert_eq!(
        a40["patients"][0]["merge"]["prior_names"][0]["given"],
        "CLARA"
    );
    assert_eq!(a40["patient"]["birth_date"]["value"], "1999-09-09");
    assert_eq!(
        a40["patients"][1]["patient"]["birth_date"]["value"], "1990-01-01",
        "23:30 at -05:00 is still the 1st of January"
    );
    assert_eq!(
        a40["patients"][1]["patient"]["birth_time"],
        json!({"value": "23:30", "precision": "minute", "offset": "-05:00"})
    );

    // Point of care: the number from OBR-2, the namespace from ORC-2, both kept.
    let poc = &r["POC000501"];
    let o = &poc["orders"][0];
    assert_eq!(o["placer_number"], json!({"value": "9876543"}));
    assert_eq!(o["orc_placer_number"], json!({"namespace": "HIS"}));
    assert_eq!(o["parent"]["placer_number"]["value"], "PARENT1");
    assert_eq!(poc["observations"][0]["code"]["alt_code"], "GLU");
    assert_eq!(
        poc["observations"][0]["code"]["original_text"],
        "Glucose (meter)"
    );
    assert_eq!(poc["observations"][0]["units"]["system"], "UCUM");
    assert_eq!(
        poc["observations"][0]["notes"],
        json!(["Meter calibrated today\nsecond line"])
    );
    assert_eq!(o.get("notes"), None, "the empty NTE is omitted");
    assert_eq!(
        poc["observations"][1]["code"],
        json!({"alt_code": "ABC", "alt_text": "Assign Benefits", "alt_system": "PLW-HL7"})
    );
    assert_eq!(poc["patient"]["nhs_number"]["verification_status"], "02");

    // Blood bank (CRLF): both filler numbers.
    let bb = &r["BB000601"];
    assert_eq!(bb["segment_separator"], "crlf");
    assert_eq!(bb["orders"][0]["orc_filler_number"]["value"], "541234");
    assert_eq!(bb["orders"][0]["obr_filler_number"]["value"], "19B44444");

    // DNACPR and a consult are told apart.
    let orm = &r["EPR000701"];
    assert_eq!(orm["orders"][0]["universal_service"]["alt_text"], "DNACPR");
    assert_eq!(
        orm["orders"][1]["universal_service"]["alt_text"],
        "IP CON FRAILTY"
    );

    // Two patients' results: Bravo's critical potassium is Bravo's.
    let two = &r["LAB000801"];
    let k = &two["observations"][1];
    assert_eq!(
        (k["value"].as_f64(), k["abnormal_flags"][0].as_str()),
        (Some(6.9), Some("HH"))
    );
    let who = k["patient_index"].as_u64().unwrap() as usize;
    assert_eq!(
        two["patients"][who]["patient"]["nhs_number"]["value"],
        "9990000085"
    );

    // Nulls and unreadable times: kept as sent, flagged, warned by position only.
    let n = &r["PAS000901"];
    assert_eq!(
        n["event"]["recorded_at"],
        json!({"hl7": "20261345", "invalid": true})
    );
    assert_eq!(n["visit"]["discharged_at"]["invalid"], true);
    assert_eq!(n["patient"]["death"]["date_time"]["invalid"], true);
    assert_eq!(n["patient"]["names"], Value::Null);
    let warnings = n["warnings"].as_array().unwrap();
    assert!(warnings.len() >= 4, "{warnings:?}");
    assert!(!serde_json::to_string(warnings).unwrap().contains("2026"));
    d.stop().await;
}
