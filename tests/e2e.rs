//! End-to-end over real sockets, a real SQLite file and the in-process mutual-TLS broker.
//! The same scenarios run against Mosquitto in `tests/e2e_mosquitto.rs`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::scenarios;
use common::*;
use siterelay::app::Daemon;
use siterelay_testkit::broker::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_over_eight_connections_arrive_exactly_as_sent() {
    scenarios::thousand_messages_over_eight_connections(Kind::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acked_while_the_broker_is_down_all_arrive_in_seq_order_once_it_is_up() {
    scenarios::broker_down_then_up_delivers_everything_in_order(Kind::InProcess).await;
}

/// The broker takes the PUBLISH but never answers: the record stays pending; after the PUBACK
/// timeout the connection is dropped and the record is sent again; once the broker behaves it is
/// delivered and only then marked delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_stays_pending_until_its_puback_arrives() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    broker.set_fault(Fault::NeverPuback);
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0")],
        "ack_timeout_secs = 1",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    for i in 0..5 {
        assert_eq!(
            c.send(&adt(&format!("N{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    let tb = broker.test_broker();
    assert!(wait_until(Duration::from_secs(10), || tb.publishes_received() >= 5).await);
    // Well past one PUBACK timeout: published (maybe more than once), never confirmed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let g = d.outbox().gauges();
    assert_eq!(g.pending_count.load(Ordering::Relaxed), 5);
    assert_eq!(g.delivered.load(Ordering::Relaxed), 0);
    assert!(sub.recv(Duration::from_millis(100)).await.is_none());
    assert!(
        d.telemetry().sink.connects.load(Ordering::Relaxed) >= 2,
        "the silent connection was dropped and a new one made"
    );

    broker.set_fault(Fault::None);
    let got = sub.collect(5, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 5);
    assert!(
        wait_until(Duration::from_secs(10), || g
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    d.stop().await;
}

/// The broker drops the connection right after each PUBLISH: nothing is marked delivered, and
/// everything is resent once the broker behaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_after_publish_leaves_records_pending_and_they_are_resent() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    broker.set_fault(Fault::DropAfterPublish);
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(broker.port, &[("adt", "127.0.0.1:0")], "");
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    for i in 0..3 {
        assert_eq!(
            c.send(&adt(&format!("D{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    let tb = broker.test_broker();
    assert!(wait_until(Duration::from_secs(10), || tb.publishes_received() >= 2).await);
    let g = d.outbox().gauges();
    assert_eq!(g.delivered.load(Ordering::Relaxed), 0);
    assert_eq!(g.pending_count.load(Ordering::Relaxed), 3);
    broker.set_fault(Fault::None);
    let got = sub.collect(3, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 3);
    assert!(
        wait_until(Duration::from_secs(10), || g
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    d.stop().await;
}

/// MQTT 5: a PUBACK whose reason code is a failure is not a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_with_a_failure_reason_code_is_not_a_delivery() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    broker.set_fault(Fault::PubackReason(0x97)); // quota exceeded
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(broker.port, &[("adt", "127.0.0.1:0")], "");
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    assert_eq!(c.send(&adt("Q1"), ACK_WAIT).await.unwrap().code, "AA");
    let t = d.telemetry();
    assert!(
        wait_until(Duration::from_secs(10), || t
            .sink
            .refused
            .load(Ordering::Relaxed)
            >= 1)
        .await
    );
    let g = d.outbox().gauges();
    assert_eq!(g.pending_count.load(Ordering::Relaxed), 1);
    broker.set_fault(Fault::None);
    // Retried after the refusal delay (5 s).
    let got = sub.collect(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert!(
        wait_until(Duration::from_secs(10), || g
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    d.stop().await;
}

/// MQTT 3.1.1 works too (for brokers without 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_delivers_records() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0")],
        "protocol = \"3.1.1\"",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    for i in 0..10 {
        assert_eq!(
            c.send(&adt(&format!("V{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    assert_eq!(sub.collect(10, Duration::from_secs(20)).await.len(), 10);
    let g = d.outbox().gauges();
    assert!(
        wait_until(Duration::from_secs(10), || g
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    d.stop().await;
}

/// The record carries the contract's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_carries_header_fields_and_times() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(broker.port, &[("adt", "127.0.0.1:0")], "");
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    c.send(&adt("REC1"), ACK_WAIT).await.unwrap();
    let (topic, payload, retain) = sub.recv(Duration::from_secs(10)).await.expect("record");
    assert_eq!(topic, "siterelay/test-box/records/adt");
    assert!(!retain);
    let r = json(&payload);
    assert_eq!(r["appliance"], "test-box");
    assert_eq!(r["seq"], 1);
    assert_eq!(r["format"], "hl7v2");
    assert_eq!(r["charset"], "UNICODE UTF-8");
    assert!(
        r["source"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(r["received_at"].as_str().unwrap().ends_with('Z'));
    let h = &r["hl7"];
    assert_eq!(h["version"], "2.4");
    assert_eq!(h["message_type"], "ADT");
    assert_eq!(h["trigger_event"], "A01");
    assert_eq!(h["message_structure"], "ADT_A01");
    assert_eq!(h["control_id"], "REC1");
    assert_eq!(h["sending_application"], "PAS");
    assert_eq!(h["sending_facility"], "RXX");
    assert_eq!(h["receiving_application"], "SITERELAY");
    assert_eq!(h["receiving_facility"], "HUB");
    assert_eq!(h["processing_id"], "P");
    // November: GMT, offset assumed from the feed's zone.
    assert_eq!(h["message_datetime"]["value"], "2026-11-30T09:30:00+00:00");
    assert_eq!(h["message_datetime"]["hl7"], "20261130093000");
    assert_eq!(h["message_datetime"]["precision"], "second");
    assert_eq!(h["message_datetime"]["zone"], "assumed");
    // Normalised content: identifiers scoped by authority, NHS number checked, dates kept as dates.
    assert_eq!(r["organisation"], "RXX");
    let p = &r["patient"];
    assert_eq!(
        p["identifiers"][0],
        serde_json::json!({"value": "9990000018", "type": "NH", "authority": "NHS"})
    );
    assert_eq!(
        p["identifiers"][1],
        serde_json::json!({"value": "MRNREC1", "type": "MR", "authority": "RXX"})
    );
    assert_eq!(p["nhs_number"]["valid"], true);
    assert_eq!(p["birth_date"]["value"], "1980-06-15");
    assert_eq!(p["sex"], "F");
    assert_eq!(r["visit"]["class"], "I");
    assert_eq!(r["visit"]["location"]["point_of_care"], "WARD1");
    assert_eq!(r["event"]["type_code"], "A01");
    assert_eq!(
        r["segments"],
        serde_json::json!(["MSH", "EVN", "PID", "PV1"])
    );
    d.stop().await;
}

/// `include_raw = false` leaves `raw` out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_raw_false_leaves_the_message_text_out() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let text = env.config_text(broker.port, &[("adt", "127.0.0.1:0")], "")
        + "\n[records]\ninclude_raw = false\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    connect(d.addr("adt").unwrap())
        .await
        .send(&adt("NR1"), ACK_WAIT)
        .await
        .unwrap();
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert!(r.get("raw").is_none());
    assert_eq!(r["hl7"]["control_id"], "NR1");
    d.stop().await;
}

/// A full store answers `AR` and keeps what it has. The cap counts everything on disk (the
/// WAL too), so fewer than five 200 KiB messages fit under 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_store_answers_ar_and_keeps_everything_already_acknowledged() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let text = env.config_text(broker.port, &[("adt", "127.0.0.1:0")], "")
        + "\n[store]\nmax_bytes = \"1 MiB\"\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    let mut codes = Vec::new();
    for i in 0..8 {
        // Distinct control ids: identical resends would be recognised as duplicates.
        let mut big = adt(&format!("BIG{i}"));
        big.extend(std::iter::repeat_n(b'X', 200 * 1024));
        big.push(b'\r');
        codes.push(c.send(&big, ACK_WAIT).await.unwrap());
    }
    let aa = codes.iter().take_while(|a| a.code == "AA").count();
    assert!((2..5).contains(&aa), "{aa} x ~200 KiB under 1 MiB");
    assert!(
        codes[aa..].iter().all(|a| a.code == "AR"),
        "AA until full, then AR"
    );
    assert!(codes[aa].text.contains("store full"), "{}", codes[aa].text);
    let g = d.outbox().gauges();
    assert_eq!(g.pending_count.load(Ordering::Relaxed), aa as u64);
    assert!(g.store_bytes.load(Ordering::Relaxed) <= 1 << 20);
    d.stop().await;
}

/// A sender that lost an ACK resends: the resend is acknowledged again but forwarded once; the
/// same control id with different content is forwarded and flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_acked_but_forwarded_once_and_reused_control_ids_are_flagged() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let text =
        env.config_text(broker.port, &[("adt", "127.0.0.1:0")], "") + "dedup_window = \"7d\"\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    assert_eq!(c.send(&adt("DUP1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(c.send(&adt("DUP1"), ACK_WAIT).await.unwrap().code, "AA");
    let changed = String::from_utf8(adt("DUP1"))
        .unwrap()
        .replace("WARD1", "WARD2");
    assert_eq!(
        c.send(changed.as_bytes(), ACK_WAIT).await.unwrap().code,
        "AA"
    );
    let got = sub.collect(2, Duration::from_secs(10)).await;
    assert!(
        sub.recv(Duration::from_millis(800)).await.is_none(),
        "the resend is not forwarded"
    );
    let first = json(&got[0].1);
    let second = json(&got[1].1);
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(first.get("control_id_reused").is_none());
    assert_eq!(second["control_id_reused"], true);
    assert_eq!(
        d.telemetry().feed("adt").duplicates.load(Ordering::Relaxed),
        1
    );
    d.stop().await;
}

/// A frame holding two messages (as python-hl7's `mllp_send --loose` sends a file) must never
/// become one record: Bravo's critical potassium would be filed under Alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_holding_two_patients_messages_is_refused_ae_and_never_becomes_one_record() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(broker.port, &[("lab", "127.0.0.1:0")], "");
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("lab").unwrap()).await;
    let two = concat!(
        "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20261130093000||ORU^R01|TWO-A|P|2.5\r",
        "PID|1||AAA111^^^RXX^MR||ALPHA^ANN\r",
        "OBR|1||F1|K^Potassium^L\r",
        "OBX|1|NM|K^Potassium^L||4.1|mmol/L\r",
        "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20261130093001||ORU^R01|TWO-B|P|2.5\r",
        "PID|1||BBB222^^^RXX^MR||BRAVO^BOB\r",
        "OBR|1||F2|K^Potassium^L\r",
        "OBX|1|NM|K^Potassium^L||6.9|mmol/L||HH\r",
    );
    let ack = c.send(two.as_bytes(), ACK_WAIT).await.unwrap();
    assert_eq!(
        (ack.code.as_str(), ack.control_id.as_str()),
        ("AE", "TWO-A")
    );
    let ack_text = String::from_utf8_lossy(&ack.raw).into_owned();
    assert!(
        ack_text.contains("ERR||MSH^2|100^"),
        "ERR-2 names the second MSH: {ack_text:?}"
    );
    assert!(ack.text.contains("second MSH"), "{}", ack.text);
    // The frame is quarantined (kept, not forwarded); the next message is forwarded alone.
    let ack = c.send(&adt("NEXT1"), ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AA");
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert_eq!(r["hl7"]["control_id"], "NEXT1");
    assert_eq!(r["seq"], 1, "the two-message frame took no seq");
    assert!(sub.recv(Duration::from_millis(500)).await.is_none());
    assert_eq!(
        d.telemetry()
            .feed("lab")
            .quarantined
            .load(Ordering::Relaxed),
        1
    );
    d.stop().await;
}

/// `raw` is HL7 (CR between segments) whatever the sender used; the record says which
/// separator arrived, and a resend that differs only in separators is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_is_cr_separated_for_lf_senders_and_an_lf_resend_of_a_cr_message_is_a_duplicate() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(broker.port, &[("adt", "127.0.0.1:0")], "");
    let d = Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    let cr = adt("SEP1");
    let lf: Vec<u8> = cr
        .iter()
        .map(|&b| if b == b'\r' { b'\n' } else { b })
        .collect();
    assert_eq!(c.send(&lf, ACK_WAIT).await.unwrap().code, "AA");
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let r = json(&payload);
    assert_eq!(r["segment_separator"], "lf");
    let raw = r["raw"].as_str().unwrap();
    assert!(!raw.contains('\n'), "{raw:?}");
    assert_eq!(
        raw.as_bytes(),
        cr.as_slice(),
        "raw is the CR form of the message"
    );
    check_schema("record", &r);
    // The same message again with CR: acknowledged, not forwarded twice.
    assert_eq!(c.send(&cr, ACK_WAIT).await.unwrap().code, "AA");
    assert!(
        sub.recv(Duration::from_millis(800)).await.is_none(),
        "a resend differing only in separators is not forwarded"
    );
    assert_eq!(
        d.telemetry().feed("adt").duplicates.load(Ordering::Relaxed),
        1
    );
    d.stop().await;
}
