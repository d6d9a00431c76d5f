//! TestBroker over real sockets with real rumqttc clients.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{LastWill as LastWill5, Packet as P5, PubAckReason};
use siterelay_testkit::{BrokerOptions, Fault, Pki, Subscriber, TestBroker, client};

async fn setup(name: &str) -> (tempfile::TempDir, Pki, TestBroker) {
    let (dir, pki) = Pki::generate_in_tempdir(name).unwrap();
    let broker = TestBroker::start(BrokerOptions::from_pki(&pki))
        .await
        .unwrap();
    (dir, pki, broker)
}

#[tokio::test]
async fn v5_publish_qos1_is_acked_and_delivered() {
    let (_dir, pki, broker) = setup("v5").await;
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "siterelay/#")
        .await
        .unwrap();
    let (c, mut el) = v5_client(broker.port(), &pki, "pub-v5").await;
    c.publish("siterelay/a/b", QoS5::AtLeastOnce, false, b"hello".to_vec())
        .await
        .unwrap();
    let ev = poll5(&mut el, T, is_puback5).await.unwrap();
    match ev {
        rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => {
            assert_eq!(ack.reason, PubAckReason::Success)
        }
        other => panic!("unexpected {other:?}"),
    }
    let got = sub.recv(T).await.expect("delivered");
    assert_eq!(got, ("siterelay/a/b".to_string(), b"hello".to_vec(), false));
    assert_eq!(broker.publishes_received(), 1);
    assert!(broker.connections_accepted() >= 2);

    // Nobody subscribed: v5 PUBACK says so (as Mosquitto does).
    c.publish("other/topic", QoS5::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    match poll5(&mut el, T, is_puback5).await.unwrap() {
        rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => {
            assert_eq!(ack.reason, PubAckReason::NoMatchingSubscribers)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn v4_publish_qos1_is_acked_and_delivered_in_order() {
    let (_dir, pki, broker) = setup("v4").await;
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "site/+/obs")
        .await
        .unwrap();
    let (c, mut el) = v4_client(broker.port(), &pki, "pub-v4").await;
    let n = 50;
    for i in 0..n {
        c.publish(
            "site/x/obs",
            rumqttc::QoS::AtLeastOnce,
            false,
            format!("{i}").into_bytes(),
        )
        .await
        .unwrap();
        // QoS 0 on a non-matching topic mixed in.
        c.publish(
            "site/x/other",
            rumqttc::QoS::AtMostOnce,
            false,
            b"-".to_vec(),
        )
        .await
        .unwrap();
    }
    let mut acks = 0;
    while acks < n {
        poll4(&mut el, T, is_puback4).await.unwrap();
        acks += 1;
    }
    let got = sub.collect(n, T).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|(_, p, _)| String::from_utf8(p.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected);
    assert!(got.iter().all(|(t, _, r)| t == "site/x/obs" && !r));
    assert!(sub.drain().is_empty());
}

#[tokio::test]
async fn client_cert_from_other_ca_is_refused() {
    let (dir, pki, broker) = setup("good").await;
    let other = Pki::generate(dir.path(), "other").unwrap();
    let opts = client::v5_options("intruder", broker.port(), mixed_tls(&pki, &other));
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let res = poll5(&mut el, T, is_connack5).await;
    assert!(
        res.is_err(),
        "connection with a foreign client cert must fail"
    );
    assert_ne!(res.unwrap_err(), "timeout");
    let deadline = tokio::time::Instant::now() + T;
    while broker.handshake_failures() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.handshake_failures(), 1);
    assert!(broker.connected_clients().is_empty());

    // A second client cert from the right CA works.
    let (cert, key) = pki.issue_client("second-appliance").unwrap();
    Subscriber::connect(broker.port(), &pki, Some((cert, key)), "#")
        .await
        .unwrap();
}

#[tokio::test]
async fn fault_never_puback_only_for_prefixed_clients() {
    let (_dir, pki, broker) = setup("never").await;
    broker.set_fault_client_prefix(Some("faulty-".into()));
    broker.set_fault(Fault::NeverPuback);
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "t/#")
        .await
        .unwrap();
    let (c, mut el) = v5_client(broker.port(), &pki, "faulty-1").await;
    c.publish("t/1", QoS5::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    // No PUBACK within 2 s, and the connection stays up.
    let res = poll5(&mut el, Duration::from_secs(2), is_puback5).await;
    assert_eq!(res.unwrap_err(), "timeout");
    assert_eq!(broker.publishes_received(), 1);
    assert!(sub.recv(Duration::from_millis(100)).await.is_none());
    assert!(broker.connected_clients().contains(&"faulty-1".to_string()));

    // Other clients are unaffected.
    let (c2, mut el2) = v5_client(broker.port(), &pki, "good-1").await;
    c2.publish("t/2", QoS5::AtLeastOnce, false, b"b".to_vec())
        .await
        .unwrap();
    poll5(&mut el2, T, is_puback5).await.unwrap();
    assert_eq!(sub.recv(T).await.unwrap().1, b"b".to_vec());

    // Clearing the fault: the faulty client gets acks again.
    broker.set_fault(Fault::None);
    c.publish("t/3", QoS5::AtLeastOnce, false, b"c".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
}

#[tokio::test]
async fn fault_drop_after_publish_closes_connection() {
    let (_dir, pki, broker) = setup("drop").await;
    broker.set_fault(Fault::DropAfterPublish);
    let (c, mut el) = v5_client(broker.port(), &pki, "dropper").await;
    c.publish("t/1", QoS5::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    let res = poll5(&mut el, T, is_puback5).await;
    let err = res.unwrap_err();
    assert_ne!(err, "timeout", "client must see a connection error");

    let (c4, mut el4) = v4_client(broker.port(), &pki, "dropper-v4").await;
    c4.publish("t/1", rumqttc::QoS::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    assert_ne!(poll4(&mut el4, T, is_puback4).await.unwrap_err(), "timeout");
}

#[tokio::test]
async fn fault_puback_reason_for_v5() {
    let (_dir, pki, broker) = setup("reason").await;
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "#")
        .await
        .unwrap();
    broker.set_fault(Fault::PubackReason(0x97));
    let (c, mut el) = v5_client(broker.port(), &pki, "quota").await;
    c.publish("t/1", QoS5::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    match poll5(&mut el, T, is_puback5).await.unwrap() {
        rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => {
            assert_eq!(ack.reason, PubAckReason::QuotaExceeded)
        }
        other => panic!("unexpected {other:?}"),
    }
    // Not routed.
    assert!(sub.recv(Duration::from_millis(200)).await.is_none());

    // The reason code can be changed at runtime.
    broker.set_fault(Fault::PubackReason(0x87));
    c.publish("t/1", QoS5::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    match poll5(&mut el, T, is_puback5).await.unwrap() {
        rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => {
            assert_eq!(ack.reason, PubAckReason::NotAuthorized)
        }
        other => panic!("unexpected {other:?}"),
    }

    // v3.1.1 clients: behaves like NeverPuback.
    let (c4, mut el4) = v4_client(broker.port(), &pki, "quota-v4").await;
    c4.publish("t/1", rumqttc::QoS::AtLeastOnce, false, b"a".to_vec())
        .await
        .unwrap();
    assert_eq!(
        poll4(&mut el4, Duration::from_millis(500), is_puback4)
            .await
            .unwrap_err(),
        "timeout"
    );
}

#[tokio::test]
async fn retained_message_reaches_late_subscriber_and_can_be_cleared() {
    let (_dir, pki, broker) = setup("retain").await;
    let (c, mut el) = v5_client(broker.port(), &pki, "retainer").await;
    c.publish("status/dev1", QoS5::AtLeastOnce, true, b"online".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(broker.retained("status/dev1"), Some(b"online".to_vec()));

    let mut sub = Subscriber::connect(broker.port(), &pki, None, "status/+")
        .await
        .unwrap();
    let got = sub.recv(T).await.unwrap();
    assert_eq!(got, ("status/dev1".to_string(), b"online".to_vec(), true));

    // Live delivery to an existing subscriber has retain = false.
    c.publish("status/dev1", QoS5::AtLeastOnce, true, b"busy".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    let got = sub.recv(T).await.unwrap();
    assert_eq!(got, ("status/dev1".to_string(), b"busy".to_vec(), false));

    // Empty retained payload clears.
    c.publish("status/dev1", QoS5::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(broker.retained("status/dev1"), None);
    let mut late = Subscriber::connect(broker.port(), &pki, None, "status/#")
        .await
        .unwrap();
    assert!(late.recv(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn last_will_published_on_abrupt_drop_only() {
    let (_dir, pki, broker) = setup("will").await;
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "status/#")
        .await
        .unwrap();

    // v5 client with a retained will, dropped without DISCONNECT.
    let mut opts = client::v5_options("willer", broker.port(), pki.client_tls_config().unwrap());
    opts.set_last_will(LastWill5::new(
        "status/willer",
        b"offline".to_vec(),
        QoS5::AtLeastOnce,
        true,
        None,
    ));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    poll5(&mut el, T, is_connack5).await.unwrap();
    drop(el);
    drop(c);
    let got = sub.recv(T).await.expect("will delivered");
    assert_eq!(
        got,
        ("status/willer".to_string(), b"offline".to_vec(), false)
    );
    assert_eq!(broker.retained("status/willer"), Some(b"offline".to_vec()));

    // v3.1.1 client with a will that disconnects cleanly: no will.
    let mut opts4 = client::v4_options("polite", broker.port(), pki.client_tls_config().unwrap());
    opts4.set_last_will(rumqttc::LastWill::new(
        "status/polite",
        b"gone".to_vec(),
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (c4, mut el4) = rumqttc::AsyncClient::new(opts4, 10);
    poll4(&mut el4, T, is_connack4).await.unwrap();
    c4.disconnect().await.unwrap();
    let _ = poll4(&mut el4, T, |ev| {
        matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect))
    })
    .await;
    assert!(sub.recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn shutdown_then_restart_on_same_port() {
    let (_dir, pki, broker) = setup("restart").await;
    let port = broker.port();
    let mut sub = Subscriber::connect(port, &pki, None, "x/#").await.unwrap();
    let (_c, mut el) = v5_client(port, &pki, "victim").await;
    let acks = sub.subscribe_count();
    assert_eq!(acks, 1);

    broker.shutdown().await;
    // The connected client notices promptly.
    let err = poll5(&mut el, T, |_| false).await.unwrap_err();
    assert_ne!(err, "timeout");

    let broker = TestBroker::start(BrokerOptions::from_pki(&pki).with_port(port))
        .await
        .unwrap();
    assert_eq!(broker.port(), port);
    assert!(
        sub.wait_subscribe_count(acks + 1, T).await,
        "subscriber resubscribes"
    );
    assert!(broker.wait_for_subscription("x/#", T).await);
    let (c, mut el) = v5_client(port, &pki, "after").await;
    c.publish("x/y", QoS5::AtLeastOnce, false, b"again".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(sub.recv(T).await.unwrap().1, b"again".to_vec());
}

#[tokio::test]
async fn unsubscribe_and_session_takeover() {
    let (_dir, pki, broker) = setup("unsub").await;
    let opts = client::v5_options("lister", broker.port(), pki.client_tls_config().unwrap());
    let (c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    poll5(&mut el, T, is_connack5).await.unwrap();
    c.subscribe("a/#", QoS5::AtLeastOnce).await.unwrap();
    poll5(&mut el, T, |ev| {
        matches!(ev, rumqttc::v5::Event::Incoming(P5::SubAck(_)))
    })
    .await
    .unwrap();
    c.unsubscribe("a/#").await.unwrap();
    poll5(&mut el, T, |ev| {
        matches!(ev, rumqttc::v5::Event::Incoming(P5::UnsubAck(_)))
    })
    .await
    .unwrap();
    c.publish("a/b", QoS5::AtLeastOnce, false, b"z".to_vec())
        .await
        .unwrap();
    let mut got_publish = false;
    let res = poll5(&mut el, Duration::from_millis(300), |ev| {
        if matches!(ev, rumqttc::v5::Event::Incoming(P5::Publish(_))) {
            got_publish = true;
        }
        false
    })
    .await;
    assert_eq!(res.unwrap_err(), "timeout");
    assert!(!got_publish);

    // Same client id connects again: the old connection is closed.
    let (_c2, _el2) = v5_client(broker.port(), &pki, "lister").await;
    let err = poll5(&mut el, T, |_| false).await.unwrap_err();
    assert_ne!(err, "timeout");
}

#[tokio::test]
async fn large_payload_and_burst() {
    let (_dir, pki, broker) = setup("burst").await;
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "bulk/#")
        .await
        .unwrap();
    let (c, mut el) = v5_client(broker.port(), &pki, "bulk-pub").await;
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.publish("bulk/big", QoS5::AtLeastOnce, false, big.clone())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    let got = sub.recv(T).await.unwrap();
    assert_eq!(got.1.len(), big.len());
    assert!(got.1 == big);

    let n = 1000;
    let started = std::time::Instant::now();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            c.publish(
                "bulk/n",
                QoS5::AtLeastOnce,
                false,
                format!("{i}").into_bytes(),
            )
            .await
            .unwrap();
        }
        c
    });
    let mut acks = 0;
    while acks < n {
        poll5(&mut el, T, is_puback5).await.unwrap();
        acks += 1;
    }
    let _c = publisher.await.unwrap();
    let got = sub.collect(n, T).await;
    assert_eq!(got.len(), n);
    for (i, (_, p, _)) in got.iter().enumerate() {
        assert_eq!(p, &format!("{i}").into_bytes());
    }
    assert!(started.elapsed() < T, "burst took {:?}", started.elapsed());
}

#[tokio::test]
async fn fault_refuse_connect_spares_testkit_subscribers() {
    let (_dir, pki, broker) = setup("refuse").await;
    broker.set_fault(Fault::RefuseConnect);
    // The testkit's own subscribers are never subject to faults.
    let mut sub = Subscriber::connect(broker.port(), &pki, None, "r/#")
        .await
        .unwrap();

    let opts = client::v5_options(
        "appliance-v5",
        broker.port(),
        pki.client_tls_config().unwrap(),
    );
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let err = poll5(&mut el, T, is_connack5).await.unwrap_err();
    assert!(err.contains("ServerUnavailable"), "{err}");

    let opts = client::v4_options(
        "appliance-v4",
        broker.port(),
        pki.client_tls_config().unwrap(),
    );
    let (_c4, mut el4) = rumqttc::AsyncClient::new(opts, 10);
    let err = poll4(&mut el4, T, is_connack4).await.unwrap_err();
    assert!(err.contains("ServiceUnavailable"), "{err}");
    assert_eq!(broker.connects_refused(), 2);

    broker.set_fault(Fault::None);
    let (c, mut el) = v5_client(broker.port(), &pki, "appliance-v5").await;
    c.publish("r/1", QoS5::AtLeastOnce, false, b"in".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(sub.recv(T).await.unwrap().1, b"in".to_vec());
}

/// Content-based refusals (a reason code, a number of times, optionally closing the connection
/// afterwards), and a Maximum Packet Size announced in the v5 CONNACK and enforced on what a
/// client that does not know it (v3.1.1) sends.
#[tokio::test]
async fn refusals_by_content_and_an_announced_enforced_maximum_packet_size() {
    let (_dir, pki) = Pki::generate_in_tempdir("limits").unwrap();
    let mut o = BrokerOptions::from_pki(&pki);
    o.max_packet_size = Some(1000);
    let broker = TestBroker::start(o).await.unwrap();
    let opts = client::v5_options("lim5", broker.port(), pki.client_tls_config().unwrap());
    let (c, mut el) = rumqttc::v5::AsyncClient::new(opts, 100);
    match poll5(&mut el, T, is_connack5).await.unwrap() {
        rumqttc::v5::Event::Incoming(P5::ConnAck(ack)) => {
            assert_eq!(ack.properties.and_then(|p| p.max_packet_size), Some(1000))
        }
        other => panic!("unexpected {other:?}"),
    }
    let reason = |ev| match ev {
        rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => ack.reason,
        other => panic!("unexpected {other:?}"),
    };
    broker.set_refusal(Some(siterelay_testkit::Refusal {
        marker: b"bad".to_vec(),
        reason: 0x87,
        then_close: false,
        times: Some(1),
    }));
    for expected in [
        PubAckReason::NotAuthorized,
        PubAckReason::NoMatchingSubscribers,
    ] {
        c.publish("t/a", QoS5::AtLeastOnce, false, b"a bad one".to_vec())
            .await
            .unwrap();
        assert_eq!(
            reason(poll5(&mut el, T, is_puback5).await.unwrap()),
            expected
        );
    }
    c.publish("t/a", QoS5::AtLeastOnce, false, b"fine".to_vec())
        .await
        .unwrap();
    assert_eq!(
        reason(poll5(&mut el, T, is_puback5).await.unwrap()),
        PubAckReason::NoMatchingSubscribers
    );
    assert_eq!(broker.refused(), 1);
    // Refuse and close, as Mosquitto 2.0 does after 0x87: the PUBACK still arrives first.
    broker.set_refusal(Some(siterelay_testkit::Refusal {
        marker: Vec::new(),
        reason: 0x97,
        then_close: true,
        times: None,
    }));
    c.publish("t/a", QoS5::AtLeastOnce, false, b"any".to_vec())
        .await
        .unwrap();
    // rumqttc may read the PUBACK and the close together: it then reports the close and
    // leaves the PUBACK event in its queue.
    let ack = match poll5(&mut el, T, is_puback5).await {
        Ok(ev) => {
            assert!(poll5(&mut el, T, |_| false).await.is_err(), "closed");
            ev
        }
        Err(_) => el
            .state
            .events
            .drain(..)
            .find(is_puback5)
            .expect("the PUBACK came before the close"),
    };
    assert_eq!(reason(ack), PubAckReason::QuotaExceeded);
    broker.set_refusal(None);

    // A v3.1.1 client cannot learn the limit: a larger PUBLISH ends its connection.
    let (c4, mut el4) = v4_client(broker.port(), &pki, "lim4").await;
    c4.publish("t/a", rumqttc::QoS::AtLeastOnce, false, vec![b'x'; 2000])
        .await
        .unwrap();
    assert!(poll4(&mut el4, T, is_puback4).await.is_err());
    assert_eq!(broker.too_large(), 1);
}
