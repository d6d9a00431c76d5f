//! Publish/subscribe through a real Mosquitto with the testkit PKI.
//!
//! Skips (with a printed line) when mosquitto is not installed, unless
//! SITERELAY_REQUIRE_MOSQUITTO=1, in which case a missing mosquitto fails the test.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
use siterelay_testkit::{Mosquitto, Pki, Subscriber, mosquitto_or_skip};

#[tokio::test]
async fn mosquitto_pubsub_with_testkit_pki() {
    if !mosquitto_or_skip() {
        return;
    }
    let (dir, pki) = Pki::generate_in_tempdir("mosq").unwrap();
    let mut m = Mosquitto::start(&pki, dir.path(), None).await.unwrap();
    let mut sub = Subscriber::connect(m.port(), &pki, None, "siterelay/#")
        .await
        .unwrap();

    let (c, mut el) = v5_client(m.port(), &pki, "mosq-pub-v5").await;
    c.publish("siterelay/v5", QoS5::AtLeastOnce, false, b"five".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(
        sub.recv(T).await.unwrap(),
        ("siterelay/v5".to_string(), b"five".to_vec(), false)
    );

    let (c4, mut el4) = v4_client(m.port(), &pki, "mosq-pub-v4").await;
    c4.publish(
        "siterelay/v4",
        rumqttc::QoS::AtLeastOnce,
        true,
        b"four".to_vec(),
    )
    .await
    .unwrap();
    poll4(&mut el4, T, is_puback4).await.unwrap();
    assert_eq!(sub.recv(T).await.unwrap().1, b"four".to_vec());

    // The certificate CN became the username.
    let log = m.log();
    assert!(log.contains("u'test-appliance'"), "log: {log}");

    // Restart on the same port; the subscriber comes back by itself.
    let acks = sub.subscribe_count();
    m.restart().await.unwrap();
    assert!(
        sub.wait_subscribe_count(acks + 1, Duration::from_secs(10))
            .await
    );
    let (c, mut el) = v5_client(m.port(), &pki, "mosq-pub-after").await;
    c.publish("siterelay/again", QoS5::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    poll5(&mut el, T, is_puback5).await.unwrap();
    assert_eq!(sub.recv(T).await.unwrap().0, "siterelay/again");
    m.stop().await;

    // A fresh instance on the same port (as after a "broker down" phase).
    let port = m.port();
    drop(m);
    let acks = sub.subscribe_count();
    let m2 = Mosquitto::start_on(&pki, dir.path(), None, port)
        .await
        .unwrap();
    assert_eq!(m2.port(), port);
    assert!(
        sub.wait_subscribe_count(acks + 1, Duration::from_secs(10))
            .await
    );
}

#[tokio::test]
async fn mosquitto_acl_and_foreign_ca() {
    if !mosquitto_or_skip() {
        return;
    }
    let (dir, pki) = Pki::generate_in_tempdir("mosqacl").unwrap();
    let acl = "user test-appliance\ntopic readwrite allowed/#\n";
    let m = Mosquitto::start(&pki, dir.path(), Some(acl)).await.unwrap();

    let (c, mut el) = v5_client(m.port(), &pki, "acl-v5").await;
    c.publish("allowed/x", QoS5::AtLeastOnce, false, b"ok".to_vec())
        .await
        .unwrap();
    let ack = poll5(&mut el, T, is_puback5).await.unwrap();
    assert!(matches!(
        ack,
        rumqttc::v5::Event::Incoming(P5::PubAck(ref a))
            if matches!(a.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
    ));
    c.publish("denied/x", QoS5::AtLeastOnce, false, b"no".to_vec())
        .await
        .unwrap();
    match poll5(&mut el, T, is_puback5).await.unwrap() {
        rumqttc::v5::Event::Incoming(P5::PubAck(a)) => {
            assert_eq!(a.reason, PubAckReason::NotAuthorized)
        }
        other => panic!("unexpected {other:?}"),
    }

    // A client certificate from another CA is refused by Mosquitto too.
    let other = Pki::generate(dir.path(), "intruder").unwrap();
    let opts = siterelay_testkit::client::v5_options("intruder", m.port(), mixed_tls(&pki, &other));
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let err = poll5(&mut el, T, is_connack5).await.unwrap_err();
    assert_ne!(err, "timeout");
}
