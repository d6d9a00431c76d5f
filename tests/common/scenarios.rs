//! End-to-end scenarios run against each real broker (in-process and Mosquitto).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use siterelay::app::Daemon;

use super::*;

/// 1,000 messages over 8 concurrent connections (two feeds): every one ACKed `AA`, every one
/// arrives exactly as sent in `raw`, `seq` per feed gap-free.
pub async fn thousand_messages_over_eight_connections(kind: Kind) {
    let env = Env::new();
    let broker = Broker::start(kind, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
        "",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let feed = if c % 2 == 0 { "adt" } else { "lab" };
        let addr = d.addr(feed).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr).await;
            let mut sent = Vec::new();
            for i in 0..125 {
                let id = format!("C{c}-{i}");
                let msg = adt(&id);
                let ack = client.send(&msg, ACK_WAIT).await.unwrap();
                assert_eq!(ack.code, "AA", "{id}: {}", ack.text);
                assert_eq!(ack.control_id, id);
                sent.push((feed, msg));
            }
            sent
        }));
    }
    let mut expected: BTreeMap<String, (&str, Vec<u8>)> = BTreeMap::new();
    for t in tasks {
        for (feed, msg) in t.await.unwrap() {
            let text = String::from_utf8(msg.clone()).unwrap();
            let cid = text.split('|').nth(9).unwrap().to_string();
            expected.insert(cid, (feed, msg));
        }
    }
    let got = sub.collect(1000, Duration::from_secs(60)).await;
    let mut seen_ids = HashSet::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (topic, payload, _) in &got {
        let r = json(payload);
        assert_eq!(r["schema"], "siterelay.record.v1");
        let feed = r["feed"].as_str().unwrap();
        assert_eq!(topic, &format!("siterelay/test-box/records/{feed}"));
        if !seen_ids.insert(r["id"].as_str().unwrap().to_string()) {
            continue; // an at-least-once duplicate: same id
        }
        let cid = r["hl7"]["control_id"].as_str().unwrap();
        let (exp_feed, exp_raw) = &expected[cid];
        assert_eq!(feed, *exp_feed);
        assert_eq!(r["raw"].as_str().unwrap().as_bytes(), &exp_raw[..]);
        assert_eq!(r["source"]["kind"], "mllp");
        seqs.entry(feed.to_string())
            .or_default()
            .push(r["seq"].as_u64().unwrap());
    }
    assert_eq!(seen_ids.len(), 1000, "every message arrives");
    for (feed, mut s) in seqs {
        s.sort_unstable();
        assert_eq!(
            s,
            (1..=500).collect::<Vec<u64>>(),
            "feed {feed}: seq gap-free"
        );
    }
    let gauges = d.outbox().gauges();
    assert!(
        wait_until(Duration::from_secs(10), || gauges
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await,
        "every record marked delivered"
    );
    d.stop().await;
}

/// Broker down while messages arrive: all are ACKed and buffered; once the broker is up they all
/// arrive, in `seq` order per feed, none missing.
pub async fn broker_down_then_up_delivers_everything_in_order(kind: Kind) {
    let env = Env::new();
    let mut broker = Broker::down(kind, &env);
    let cfg = env.config(
        broker.port,
        &[("adt", "127.0.0.1:0"), ("lab", "127.0.0.1:0")],
        "",
    );
    let d = Daemon::start(&cfg).await.unwrap();
    for feed in ["adt", "lab"] {
        let mut client = connect(d.addr(feed).unwrap()).await;
        for i in 0..150 {
            let ack = client
                .send(&adt(&format!("{feed}{i}")), ACK_WAIT)
                .await
                .unwrap();
            assert_eq!(ack.code, "AA");
        }
    }
    let gauges = d.outbox().gauges();
    assert_eq!(gauges.pending_count.load(Ordering::Relaxed), 300);

    // Hold the appliance off (in-process: CONNACK refused; Mosquitto: its proxy closed) until
    // our subscriber is in place: MQTT keeps nothing for a topic nobody subscribes to.
    broker
        .up_with_fault(&env, siterelay_testkit::broker::Fault::RefuseConnect)
        .await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    broker.let_appliance_in().await;
    let got = sub.collect(300, Duration::from_secs(60)).await;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut ids = HashSet::new();
    for (_, payload, _) in &got {
        let r = json(payload);
        if !ids.insert(r["id"].as_str().unwrap().to_string()) {
            continue;
        }
        let feed = r["feed"].as_str().unwrap().to_string();
        let seq = r["seq"].as_u64().unwrap();
        let prev = last.insert(feed.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "feed {feed}: records arrive in seq order");
    }
    assert_eq!(ids.len(), 300);
    assert!(
        wait_until(Duration::from_secs(10), || gauges
            .pending_count
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    d.stop().await;
    broker.stop().await;
}
