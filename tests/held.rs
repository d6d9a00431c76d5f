//! No record blocks another: records that cannot be published (too large for the broker, refused
//! for good) are held while everything else flows, are listed in health and by
//! `siterelay queue held`, and go out once released; a transient refusal keeps its feed's order;
//! a broker that closes the connection after each refusal causes no reconnect storm. Real
//! sockets, SQLite files, brokers (Mosquitto, and the in-process one with fault injection) and,
//! where the command line matters, the real binary.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterelay::app::Daemon;
use siterelay_testkit::broker::Refusal;

/// An ORU^R01 carrying a PDF of `pdf_bytes` bytes (Base64) in an ED observation.
fn oru_with_pdf(control_id: &str, pdf_bytes: usize) -> Vec<u8> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: String = (0..pdf_bytes.div_ceil(3) * 4)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            B64[(state % 64) as usize] as char
        })
        .collect();
    format!(
        "MSH|^~\\&|WINPATH|RXX01|SITERELAY|HUB|20261130093000||ORU^R01^ORU_R01|{control_id}|P|2.4\r\
PID|1||9990000018^^^NHS^NH||TEST^PATIENT^ONE||19800615|F\r\
OBR|1|PL1|FL1|PDF^Histology report^L|||20261130090000\r\
OBX|1|ED|PDF^Report^L||^application^pdf^Base64^{data}||||||F\r"
    )
    .into_bytes()
}

/// An ordinary ADT that the in-process broker's refusal recognises by `marker`.
fn marked_adt(control_id: &str, marker: &str) -> Vec<u8> {
    let mut m = adt(control_id);
    m.extend_from_slice(format!("NTE|1||{marker}\r").as_bytes());
    m
}

/// `siterelay <args> --config cfg`: success and stdout.
fn siterelay(cfg: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn stdout_json(out: &str) -> Value {
    // The JSON document is what stdout holds; a trailing stderr line may follow.
    let end = out.rfind(['}', ']']).map_or(out.len(), |i| i + 1);
    serde_json::from_str(&out[..end]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Records received, first copy of each id only: feed -> seqs in arrival order.
fn seqs_by_feed(got: &[(String, Vec<u8>, bool)]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, payload, _) in got {
        let r = json(payload);
        if seen.insert(r["id"].as_str().unwrap().to_string()) {
            out.entry(r["feed"].as_str().unwrap().to_string())
                .or_default()
                .push(r["seq"].as_u64().unwrap());
        }
    }
    out
}

/// Receive until `n` distinct records (by `id`) arrived or `timeout` passed; every copy kept.
async fn collect_unique(
    sub: &mut siterelay_testkit::Subscriber,
    n: usize,
    timeout: Duration,
) -> Vec<(String, Vec<u8>, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    while ids.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sub.recv(left).await else { break };
        let r: Value = serde_json::from_slice(&m.1).unwrap();
        ids.insert(r["id"].as_str().unwrap_or_default().to_string());
        out.push(m);
    }
    out
}

/// Publish a command as the central side would (QoS 1), waiting for the PUBACK.
async fn command(env: &Env, port: u16, name: &str, payload: &str) {
    let tls = siterelay::tls::mqtt_client_config(
        &env.pki.ca_file(),
        &env.pki.client_cert_file(),
        &env.pki.client_key_file(),
    )
    .unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("central-cmd", "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    c.publish(
        format!("siterelay/{APPLIANCE}/cmd/{name}"),
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        payload.as_bytes().to_vec(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("PUBACK in time")
            .unwrap();
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) = ev {
            break;
        }
    }
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
}

/// Mosquitto with `max_packet_size 200000`: a 400 KB ORU gets `AA` and is held; the 20 ordinary
/// messages after it are delivered; the held record is in health (over MQTT and on the box) and
/// in `siterelay queue held`; after the broker's limit is raised, `queue held retry` delivers it
/// with its original seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_an_oversized_record_is_held_the_rest_flow_and_retry_delivers_it_once_the_limit_is_raised()
 {
    if !mosquitto_or_skip() {
        return;
    }
    let env = Env::new();
    let mut broker = Broker::down(Kind::Mosquitto, &env);
    broker.mosquitto_extra = "max_packet_size 200000".into();
    broker.up(&env).await;
    let mut records = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut health = broker.subscribe(&env, "siterelay/test-box/health").await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = env.write_config(
        "held.toml",
        &env.config_text(broker.port, &[("lab", &listen)], ""),
    );
    let mut p = Proc::start(&cfg, env.dir.path().join("held.log"));
    wait_listening(port).await;

    let big = oru_with_pdf("BIG1", 400_000);
    let mut c = connect(listen.parse().unwrap()).await;
    let ack = c.send(&big, ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "BIG1"));
    for i in 0..20 {
        let ack = c.send(&adt(&format!("N{i}")), ACK_WAIT).await.unwrap();
        assert_eq!(ack.code, "AA");
    }

    // The 20 ordinary records arrive; the big one does not (it is seq 1, a gap).
    let got = collect_unique(&mut records, 20, Duration::from_secs(45)).await;
    assert_eq!(
        seqs_by_feed(&got)["lab"],
        (2..=21).collect::<Vec<u64>>(),
        "{}",
        p.log()
    );

    // Health, as the central side sees it: the gap is held on the box.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let report = loop {
        let (_, payload, _) = health
            .recv(deadline - tokio::time::Instant::now())
            .await
            .expect("a health report listing the held record");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        if v["outbox"]["held_count"] == 1 {
            break v;
        }
    };
    check_schema("health", &report);
    let h = &report["held"][0];
    assert_eq!(
        (h["feed"].as_str(), h["seq"].as_u64()),
        (Some("lab"), Some(1))
    );
    assert_eq!(h["reason"], "too_large");
    assert!(
        h["detail"]
            .as_str()
            .unwrap()
            .contains("the broker's Maximum Packet Size"),
        "{h}"
    );
    assert_eq!(report["feeds"][0]["held"], 1);
    assert_eq!(report["mqtt"]["broker_max_packet_bytes"], 200_000);
    let row = h["row"].as_i64().unwrap();

    // On the box: `queue held` and `status`.
    let (ok, out) = siterelay(&cfg, &["queue", "held", "--json"]);
    assert!(ok, "{out}");
    let list = stdout_json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(
        (list[0]["row_id"].as_i64(), list[0]["seq"].as_u64()),
        (Some(row), Some(1))
    );
    assert_eq!(list[0]["control_id"], "BIG1");
    let (ok, out) = siterelay(&cfg, &["queue", "held"]);
    assert!(ok && out.contains("too_large"), "{out}");
    // Held records make the appliance degraded: status exits 1 (docs/operations.md).
    let (ok, out) = siterelay(&cfg, &["status", "--json"]);
    assert!(!ok, "held records are degraded: {out}");
    assert_eq!(stdout_json(&out)["outbox"]["held_count"], 1);
    let code = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(code.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&code.stdout).contains("health    DEGRADED: 1 held record(s)"),
        "{}",
        String::from_utf8_lossy(&code.stdout)
    );
    let exported = env.dir.path().join("big.hl7");
    let (ok, out) = siterelay(
        &cfg,
        &[
            "queue",
            "held",
            "export",
            &row.to_string(),
            "--out",
            exported.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        big,
        "exported exactly as received"
    );

    // The broker's limit is raised (a restart); the appliance and the subscriber reconnect.
    let subscribed = records.subscribe_count();
    match &mut broker.inner {
        Inner::Mosq(m) => {
            m.set_extra_config("max_packet_size 200000", "max_packet_size 2000000")
                .unwrap();
            m.restart().await.unwrap();
        }
        _ => unreachable!(),
    }
    assert!(
        records
            .wait_subscribe_count(subscribed + 1, Duration::from_secs(20))
            .await
    );
    let reconnected = wait_until(Duration::from_secs(20), || {
        let (_, out) = siterelay(&cfg, &["status", "--json"]);
        {
            let v = stdout_json(&out);
            v["mqtt"]["connected"] == true && v["mqtt"]["broker_max_packet_bytes"] == 2_000_000
        }
    })
    .await;
    assert!(reconnected, "{}", p.log());

    // Released: delivered with its original id and seq.
    let (ok, out) = siterelay(
        &cfg,
        &["queue", "held", "retry", &row.to_string(), "--json"],
    );
    assert!(ok, "{out}\n{}", p.log());
    assert_eq!(stdout_json(&out)["released"][0]["state"], "delivered");
    let (_, payload, _) = records
        .recv(Duration::from_secs(20))
        .await
        .expect("the held record arrives");
    let r = json(&payload);
    assert_eq!(
        (r["seq"].as_u64(), r["id"].as_str()),
        (Some(1), h["id"].as_str())
    );
    assert_eq!(r["hl7"]["control_id"], "BIG1");
    assert_eq!(r["raw"].as_str().unwrap().as_bytes(), &big[..]);
    FaultRow {
        fault: "a 400 KB record over the broker's max_packet_size (Mosquitto 200000), 20 after it; \
                the held one released after the limit is raised",
        sent: 21,
        acked: 21,
        delivered: got.len() + 1,
        duplicated: 0,
        lost: 21 - (got.len() + 1),
        // The 20 flowed on their own; the held one needs the broker fixed, then one command.
        recovered: got.len() == 20,
    }
    .print();
    let (ok, out) = siterelay(&cfg, &["queue", "held", "--json"]);
    assert!(ok);
    assert_eq!(stdout_json(&out), serde_json::json!([]));
    assert!(p.sigterm().is_some_and(|s| s.success()));
    broker.stop().await;
}

/// The in-process broker announces a Maximum Packet Size of 100,000 bytes: a record over it is
/// held before it is sent (the connection stays up: the broker never sees it), and the records
/// after it, on its feed and on another, are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_brokers_announced_maximum_is_held_before_sending_and_the_rest_flow() {
    let env = Env::new();
    let mut broker = Broker::down(Kind::InProcess, &env);
    broker.max_packet_size = Some(100_000);
    broker.up(&env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
        "",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    let mut lab = connect(d.addr("lab").unwrap()).await;
    let mut adt_feed = connect(d.addr("adt").unwrap()).await;
    assert_eq!(
        lab.send(&oru_with_pdf("BIG", 150_000), ACK_WAIT)
            .await
            .unwrap()
            .code,
        "AA"
    );
    for i in 0..5 {
        for c in [&mut lab, &mut adt_feed] {
            let ack = c.send(&adt(&format!("N{i}")), ACK_WAIT).await.unwrap();
            assert_eq!(ack.code, "AA");
        }
    }
    let got = collect_unique(&mut sub, 10, Duration::from_secs(20)).await;
    let seqs = seqs_by_feed(&got);
    assert_eq!(
        (seqs["lab"].as_slice(), seqs["adt"].as_slice()),
        (&[2, 3, 4, 5, 6][..], &[1, 2, 3, 4, 5][..])
    );
    let held = d.outbox().reader().unwrap().held(None, false).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].seq, held[0].reason.as_str()), (1, "too_large"));
    assert!(
        held[0]
            .detail
            .contains("the limit is 100000 bytes (the broker's Maximum Packet Size)"),
        "{}",
        held[0].detail
    );
    let tb = broker.test_broker();
    assert_eq!(tb.too_large(), 0, "never sent");
    let sink = &d.telemetry().sink;
    assert_eq!(sink.connects.load(Ordering::Relaxed), 1);
    assert_eq!(sink.packet_limit.load(Ordering::Relaxed), 100_000);
    d.stop().await;
}

/// The in-process broker refuses three of ten lab records with 0x87 (not authorized) and, as
/// Mosquitto 2.0 does, closes the connection after each refusal: the three are held, the other
/// seventeen records (both feeds) are delivered, the appliance reconnects a few times only and
/// then stays connected (no reconnect storm: connects and `bdseq` stand still), the refused
/// records are never published again on their own; and once the broker accepts them, a `replay`
/// resends one and the delivery ends its hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanently_refused_records_are_held_others_flow_no_reconnect_storm_and_a_replay_resends_them()
 {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let tb = broker.test_broker();
    tb.set_refusal(Some(Refusal {
        marker: b"REFUSE-ME".to_vec(),
        reason: 0x87,
        then_close: true,
        times: None,
    }));
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    // The default reconnect ceiling (the common test config lowers it to 1 s).
    let text = env
        .config_text(
            broker.port,
            &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
            "",
        )
        .replace("reconnect_max_secs = 1", "reconnect_max_secs = 30");
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let mut lab = connect(d.addr("lab").unwrap()).await;
    let mut adt_feed = connect(d.addr("adt").unwrap()).await;
    for i in 0..10 {
        let m = if i % 4 == 0 {
            marked_adt(&format!("L{i}"), "REFUSE-ME")
        } else {
            adt(&format!("L{i}"))
        };
        assert_eq!(lab.send(&m, ACK_WAIT).await.unwrap().code, "AA");
        assert_eq!(
            adt_feed
                .send(&adt(&format!("A{i}")), ACK_WAIT)
                .await
                .unwrap()
                .code,
            "AA"
        );
    }
    let got = collect_unique(&mut sub, 17, Duration::from_secs(30)).await;
    let seqs = seqs_by_feed(&got);
    let mut lab_seqs = seqs["lab"].clone();
    lab_seqs.sort_unstable();
    assert_eq!(lab_seqs, [2, 3, 4, 6, 7, 8, 10]);
    let mut adt_seqs = seqs["adt"].clone();
    adt_seqs.sort_unstable();
    assert_eq!(adt_seqs, (1..=10).collect::<Vec<u64>>());

    let reader = d.outbox().reader().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || reader
            .held(None, false)
            .unwrap()
            .len()
            == 3)
        .await,
        "held {:?}, connects {}, refused {}, pending {}",
        reader.held(None, false).unwrap(),
        d.telemetry().sink.connects.load(Ordering::Relaxed),
        tb.refused(),
        d.outbox().gauges().pending_count.load(Ordering::Relaxed)
    );
    let held = reader.held(None, false).unwrap();
    assert_eq!(
        held.iter()
            .map(|h| (h.feed.as_str(), h.seq))
            .collect::<Vec<_>>(),
        [("lab", 1), ("lab", 5), ("lab", 9)]
    );
    for h in &held {
        assert_eq!(h.reason, "refused");
        assert!(h.detail.contains("0x87 (Not authorized)"), "{}", h.detail);
    }

    // No storm: once the last refusal's connection has been replaced and only the held records
    // are pending, nothing reconnects over a 10 s window and nothing refused is tried again.
    let sink = &d.telemetry().sink;
    let gauges = d.outbox().gauges();
    assert!(
        wait_until(Duration::from_secs(15), || sink
            .connected
            .load(Ordering::Relaxed)
            == 1
            && gauges.pending_count.load(Ordering::Relaxed) == 3)
        .await
    );
    let (connects, refused) = (sink.connects.load(Ordering::Relaxed), tb.refused());
    // One connection, plus one per refusal that closed it; a refusal whose PUBACK is lost with
    // the close (the connection died before it was read) leaves that record unconfirmed, so it
    // is published once more on the next connection, like any unconfirmed record, and refused
    // again: at most two closes per held record. The storm test is the flat window below.
    assert!(
        (2..=7).contains(&connects),
        "one connection, plus at most two per held record: {connects}"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sink.connects.load(Ordering::Relaxed), connects);
    assert_eq!(sink.connected.load(Ordering::Relaxed), 1);
    assert_eq!(tb.refused(), refused, "held records are not retried alone");
    let status: Value =
        serde_json::from_slice(&tb.retained("siterelay/test-box/status").unwrap()).unwrap();
    assert_eq!(
        (status["state"].as_str(), status["bdseq"].as_u64()),
        (Some("online"), Some(connects - 1)),
        "one birth per connection"
    );
    // Only resends of delivered records (at least once) may have come since; no held one.
    for (_, payload, _) in sub.drain() {
        let r = json(&payload);
        assert!(
            !(r["feed"] == "lab" && [1, 5, 9].contains(&r["seq"].as_u64().unwrap())),
            "{r}"
        );
    }

    // The broker is fixed; the central side replays lab from seq 5, one record.
    tb.set_refusal(None);
    command(
        &env,
        broker.port,
        "replay",
        r#"{"feed": "lab", "from_seq": 5, "limit": 1}"#,
    )
    .await;
    let (_, payload, _) = sub
        .recv(Duration::from_secs(10))
        .await
        .expect("the replayed record");
    let r = json(&payload);
    assert_eq!(
        (r["seq"].as_u64(), r["replay"].as_bool()),
        (Some(5), Some(true))
    );
    assert_eq!(r["id"].as_str(), Some(held[1].record_id.as_str()));
    assert!(
        wait_until(Duration::from_secs(10), || reader
            .held(None, false)
            .unwrap()
            .iter()
            .map(|h| h.seq)
            .eq([1, 9]))
        .await,
        "delivered: no longer held"
    );
    d.stop().await;
}

/// The in-process broker refuses lab's first record twice with 0x97 (quota exceeded, a
/// transient reason). It is published again after 5 s and then 10 s, and accepted on the third
/// attempt; adt's records flow meanwhile; every lab record stored after the refusal arrived
/// reaches the central side after it (the records already in flight when it came may arrive
/// before it, as the contract says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transiently_refused_record_is_retried_with_backoff_before_later_records_of_its_feed() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let tb = broker.test_broker();
    tb.set_refusal(Some(Refusal {
        marker: b"QUOTA-ME".to_vec(),
        reason: 0x97,
        then_close: false,
        times: Some(2),
    }));
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
        "",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    let mut lab = connect(d.addr("lab").unwrap()).await;
    let mut adt_feed = connect(d.addr("adt").unwrap()).await;
    let first = marked_adt("L1", "QUOTA-ME");
    assert_eq!(lab.send(&first, ACK_WAIT).await.unwrap().code, "AA");
    let refused_at = tokio::time::Instant::now();
    // Wait until the appliance has the refusal (not only the broker), so what follows is
    // stored after it arrived.
    let sink = &d.telemetry().sink;
    assert!(
        wait_until(Duration::from_secs(10), || sink
            .refused
            .load(Ordering::Relaxed)
            >= 1)
        .await
    );
    for i in 2..=6 {
        let ack = lab.send(&adt(&format!("L{i}")), ACK_WAIT).await.unwrap();
        assert_eq!(ack.code, "AA");
    }
    for i in 1..=3 {
        let ack = adt_feed
            .send(&adt(&format!("A{i}")), ACK_WAIT)
            .await
            .unwrap();
        assert_eq!(ack.code, "AA");
    }
    // adt does not wait for lab.
    let early = collect_unique(&mut sub, 3, Duration::from_secs(4)).await;
    assert_eq!(seqs_by_feed(&early).get("adt"), Some(&vec![1, 2, 3]));
    assert!(
        !seqs_by_feed(&early).contains_key("lab"),
        "lab waits for its seq 1"
    );
    assert!(wait_until(Duration::from_secs(10), || tb.refused() >= 2).await);
    assert!(
        refused_at.elapsed() >= Duration::from_millis(4500),
        "retried after the backoff"
    );
    let got = collect_unique(&mut sub, 6, Duration::from_secs(30)).await;
    assert!(
        refused_at.elapsed() >= Duration::from_millis(14_000),
        "the second wait was longer (5 s, then 10 s)"
    );
    assert_eq!(
        seqs_by_feed(&got)["lab"],
        [1, 2, 3, 4, 5, 6],
        "the refused record first, then the later ones in order"
    );
    assert_eq!(tb.refused(), 2);
    assert!(
        d.outbox()
            .reader()
            .unwrap()
            .held(None, false)
            .unwrap()
            .is_empty()
    );
    d.stop().await;
}

/// Mosquitto with an ACL that lets the appliance publish records of `adt` but not of `lab`: each
/// lab record is refused (PUBACK 0x87) and held; adt's records are all delivered; the appliance
/// ends up connected and stays so (no reconnect storm, whatever Mosquitto does with the
/// connection after a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_refusals_hold_the_refused_feeds_records_and_the_other_feed_flows() {
    if !mosquitto_or_skip() {
        return;
    }
    let env = Env::new();
    let mut broker = Broker::down(Kind::Mosquitto, &env);
    broker.acl = Some(
        "pattern write siterelay/%u/records/adt\n\
         pattern write siterelay/%u/status\n\
         pattern write siterelay/%u/health\n\
         pattern write siterelay/%u/inventory\n\
         pattern write siterelay/%u/cmd-reply\n\
         pattern read siterelay/%u/cmd/#\n\n\
         user central\ntopic read siterelay/#\n"
            .into(),
    );
    broker.up(&env).await;
    let central = env.pki.issue_client("central").unwrap();
    let mut sub = siterelay_testkit::Subscriber::connect(
        broker.port,
        &env.pki,
        Some(central),
        "siterelay/test-box/records/#",
    )
    .await
    .unwrap();
    // The appliance's certificate names it (CN = appliance id), as the ACL expects.
    let (cert, key) = env.pki.issue_client(APPLIANCE).unwrap();
    let text = env
        .config_text(
            broker.port,
            &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
            "",
        )
        .replace(
            &env.pki.client_cert_file().display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        )
        .replace("reconnect_max_secs = 1", "reconnect_max_secs = 30");
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let mut lab = connect(d.addr("lab").unwrap()).await;
    let mut adt_feed = connect(d.addr("adt").unwrap()).await;
    for i in 0..10 {
        if i < 3 {
            let ack = lab.send(&adt(&format!("L{i}")), ACK_WAIT).await.unwrap();
            assert_eq!(ack.code, "AA");
        }
        let ack = adt_feed
            .send(&adt(&format!("A{i}")), ACK_WAIT)
            .await
            .unwrap();
        assert_eq!(ack.code, "AA");
    }
    let got = collect_unique(&mut sub, 10, Duration::from_secs(30)).await;
    let seqs = seqs_by_feed(&got);
    let mut adt_seqs = seqs["adt"].clone();
    adt_seqs.sort_unstable();
    assert_eq!(adt_seqs, (1..=10).collect::<Vec<u64>>());
    assert!(!seqs.contains_key("lab"));
    let reader = d.outbox().reader().unwrap();
    let sink = &d.telemetry().sink;
    let gauges = d.outbox().gauges();
    assert!(
        wait_until(Duration::from_secs(20), || reader
            .held(None, false)
            .unwrap()
            .len()
            == 3
            && sink.connected.load(Ordering::Relaxed) == 1
            && gauges.pending_count.load(Ordering::Relaxed) == 3)
        .await,
        "held {:?}",
        reader.held(None, false).unwrap()
    );
    for h in reader.held(None, false).unwrap() {
        assert_eq!((h.feed.as_str(), h.reason.as_str()), ("lab", "refused"));
        assert!(h.detail.contains("0x87"), "{}", h.detail);
    }
    let connects = sink.connects.load(Ordering::Relaxed);
    assert!(connects <= 4, "{connects} connections");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        sink.connects.load(Ordering::Relaxed),
        connects,
        "no reconnects"
    );
    eprintln!("mosquitto ACL refusals: {connects} connection(s) in all");
    d.stop().await;
    broker.stop().await;
}
