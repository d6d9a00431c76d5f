//! The broker kit (docs/broker/mosquitto.conf and docs/broker/siterelay.acl) on the real
//! Mosquitto: started with exactly these files, only the paths (generated certificates, the
//! ACL, the persistence directory), the port and the user changed for a test machine. The real
//! siterelay binary runs against it with `publish_rejects = true`: its records and its reject
//! notices reach the central consumer, and an appliance cannot publish under another
//! appliance's id (nor send itself commands).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use siterelay_testkit::mosquitto::{Mosquitto, mosquitto_or_skip};
use siterelay_testkit::subscriber::Subscriber;

const CONF: &str = include_str!("../docs/broker/mosquitto.conf");
const ACL: &str = include_str!("../docs/broker/siterelay.acl");

/// The kit's mosquitto.conf for this machine: each (from, to) must be in the file, so a kit
/// that changes its paths fails here rather than being tested half-way.
fn kit_config(env: &Env, dir: &Path, port: u16, acl_text: &str) -> String {
    let acl = dir.join("siterelay.acl");
    std::fs::write(&acl, acl_text).unwrap();
    let persistence = dir.join("persist");
    std::fs::create_dir_all(&persistence).unwrap();
    let mut conf = CONF.to_string();
    for (from, to) in [
        ("listener 8883", format!("listener {port} 127.0.0.1")),
        // As root the test keeps its 0600 keys readable (the kit drops to user mosquitto).
        ("user mosquitto", "user root".to_string()),
        (
            "persistence_location /var/lib/mosquitto/",
            format!("persistence_location {}/", persistence.display()),
        ),
        (
            "acl_file /etc/mosquitto/siterelay.acl",
            format!("acl_file {}", acl.display()),
        ),
        (
            "cafile /etc/mosquitto/ca/siterelay-ca.pem",
            format!("cafile {}", env.pki.ca_file().display()),
        ),
        (
            "certfile /etc/mosquitto/certs/broker.pem",
            format!("certfile {}", env.pki.server_cert_file().display()),
        ),
        (
            "keyfile /etc/mosquitto/certs/broker.key",
            format!("keyfile {}", env.pki.server_key_file().display()),
        ),
    ] {
        assert!(conf.contains(from), "the kit's mosquitto.conf has `{from}`");
        conf = conf.replacen(from, &to, 1);
    }
    conf
}

/// The appliance box-1 (certificate CN = appliance_id), reject notices on: (config, cert, key,
/// its MLLP port).
fn appliance(
    env: &Env,
    port: u16,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    u16,
) {
    let (cert, key) = env.pki.issue_client("box-1").unwrap();
    let listen_port = siterelay_testkit::free_port();
    let text = env
        .config_text(port, &[("adt", &format!("127.0.0.1:{listen_port}"))], "")
        .replace("appliance_id = \"test-box\"", "appliance_id = \"box-1\"")
        .replace(
            &env.pki.client_cert_file().display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        )
        + "\n[records]\npublish_rejects = true\n";
    let cfg = env.write_config("box-1.toml", &text);
    (cfg, cert, key, listen_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_kit_carries_records_and_reject_notices_and_confines_each_appliance() {
    if !mosquitto_or_skip() {
        return;
    }
    let env = Env::new();
    let dir = env.dir.path().join("broker");
    std::fs::create_dir_all(&dir).unwrap();
    let port = siterelay_testkit::free_port();
    let conf = kit_config(&env, &dir, port, ACL);
    let mut mosq = Mosquitto::start_with_config_text(&env.pki, &dir, port, &conf)
        .await
        .unwrap();

    let central = env.pki.issue_client("central").unwrap();
    let mut sub = Subscriber::connect(port, &env.pki, Some(central), "siterelay/#")
        .await
        .expect("the central consumer may read everything");

    let (cfg, cert, key, listen_port) = appliance(&env, port);
    let mut p = Proc::start(&cfg, env.dir.path().join("box-1.log"));
    wait_listening(listen_port).await;
    let mut c = connect(format!("127.0.0.1:{listen_port}").parse().unwrap()).await;
    assert_eq!(c.send(&adt("K1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(
        c.send(b"this is not HL7 at all", ACK_WAIT)
            .await
            .unwrap()
            .code,
        "AE"
    );

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(seen
        .iter()
        .any(|t: &String| t == "siterelay/box-1/records/adt")
        && seen.iter().any(|t| t == "siterelay/box-1/rejects/adt"))
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((topic, payload, _)) = sub.recv(left).await else {
            panic!(
                "the record and the reject notice did not both arrive; seen {seen:?}\nappliance log:\n{}\nbroker log:\n{}",
                p.log(),
                mosq.log()
            );
        };
        if topic == "siterelay/box-1/rejects/adt" {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(v["schema"], "siterelay.reject.v1", "{v}");
        }
        seen.push(topic);
    }
    assert!(
        seen.contains(&"siterelay/box-1/status".to_string()),
        "the retained birth is readable: {seen:?}"
    );
    assert!(
        !p.log().contains("broker refused"),
        "nothing the appliance sends is refused by the kit:\n{}",
        p.log()
    );

    // box-1 publishing under box-2's id, or sending itself a command, is refused (0x87).
    let tls = siterelay::tls::mqtt_client_config(&env.pki.ca_file(), &cert, &key).unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("box-1-intruder", "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for topic in [
        "siterelay/box-2/records/adt",
        "siterelay/box-2/rejects/adt",
        "siterelay/box-2/status",
        "siterelay/box-1/cmd/replay",
    ] {
        client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                b"{}".to_vec(),
            )
            .await
            .unwrap();
    }
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reasons.len() < 4 {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("four PUBACKs")
            .unwrap();
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) = ev {
            reasons.push(format!("{:?}", a.reason));
        }
    }
    assert_eq!(reasons, ["NotAuthorized"; 4]);
    while let Some((topic, _, _)) = sub.recv(Duration::from_millis(500)).await {
        assert!(
            topic.starts_with("siterelay/box-1/") && !topic.contains("/cmd/"),
            "a refused publish reached the consumer: {topic}"
        );
    }
    assert!(p.sigterm().unwrap().success());
    mosq.stop().await;
}

/// The ACL operations.md used to show (no `rejects/#`): the refused notice's warning names its
/// topic and points at the ACL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reject_notice_is_logged_with_its_topic() {
    if !mosquitto_or_skip() {
        return;
    }
    let env = Env::new();
    let dir = env.dir.path().join("broker");
    std::fs::create_dir_all(&dir).unwrap();
    let port = siterelay_testkit::free_port();
    let old_acl: String = ACL
        .lines()
        .filter(|l| !l.contains("rejects/#"))
        .map(|l| format!("{l}\n"))
        .collect();
    let conf = kit_config(&env, &dir, port, &old_acl);
    let mut mosq = Mosquitto::start_with_config_text(&env.pki, &dir, port, &conf)
        .await
        .unwrap();
    let (cfg, _, _, listen_port) = appliance(&env, port);
    let mut p = Proc::start(&cfg, env.dir.path().join("box-1.log"));
    wait_listening(listen_port).await;
    let mut c = connect(format!("127.0.0.1:{listen_port}").parse().unwrap()).await;
    assert_eq!(
        c.send(b"this is not HL7 at all", ACK_WAIT)
            .await
            .unwrap()
            .code,
        "AE"
    );
    let warned = wait_until(Duration::from_secs(20), || {
        p.log().contains(
            "broker refused a message on siterelay/box-1/rejects/adt: check the broker's ACL for this topic",
        )
    })
    .await;
    assert!(warned, "{}", p.log());
    assert!(p.sigterm().unwrap().success());
    mosq.stop().await;
}
