//! Fleet monitoring end to end: birth and death, health, inventory, commands, the broker ACL,
//! `siterelay status` and `siterelay watch`. Lifecycle tests run against the in-process broker
//! and, when installed (required in CI), against Mosquitto with an ACL file.

mod common;

use std::collections::HashSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterelay_testkit::subscriber::Subscriber;

/// The broker kit's ACL (docs/broker/siterelay.acl), exactly: each appliance confined to its
/// own subtree (its certificate's CN is its appliance_id), the central team reads everything
/// and sends commands.
pub const ACL: &str = include_str!("../docs/broker/siterelay.acl");

/// An environment whose appliance certificate's CN is the appliance id, plus a `central` client.
struct FleetEnv {
    env: Env,
    central: (std::path::PathBuf, std::path::PathBuf),
}

impl FleetEnv {
    fn new() -> FleetEnv {
        let env = Env::new();
        let central = env.pki.issue_client("central").unwrap();
        FleetEnv { env, central }
    }

    /// Config text with the appliance's own certificate (CN = APPLIANCE).
    fn config_text(&self, port: u16, listen: &str, extra: &str) -> String {
        let (cert, key) = self.env.pki.issue_client(APPLIANCE).unwrap();
        self.env
            .config_text(port, &[("adt", listen)], extra)
            .replace(
                &self.env.pki.client_cert_file().display().to_string(),
                &cert.display().to_string(),
            )
            .replace(
                &self.env.pki.client_key_file().display().to_string(),
                &key.display().to_string(),
            )
    }

    async fn central(&self, port: u16, filter: &str) -> Subscriber {
        Subscriber::connect(port, &self.env.pki, Some(self.central.clone()), filter)
            .await
            .expect("central subscriber connects")
    }

    /// Publish as the central team (QoS 1) and wait for the PUBACK.
    async fn publish(&self, port: u16, topic: &str, payload: &str) {
        self.publish_with(port, topic, payload, false).await
    }

    /// Publish (QoS 1, optionally retained) and wait for the PUBACK.
    async fn publish_with(&self, port: u16, topic: &str, payload: &str, retain: bool) {
        let tls = siterelay::tls::mqtt_client_config(
            &self.env.pki.ca_file(),
            &self.central.0,
            &self.central.1,
        )
        .unwrap();
        let mut o = rumqttc::v5::MqttOptions::new(
            format!("central-pub-{}", std::process::id()),
            "localhost",
            port,
        );
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
        c.publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            retain,
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
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) = ev
            {
                break;
            }
        }
        let _ = c.disconnect().await;
        // Let the DISCONNECT go out before the next publisher reuses the client id.
        let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
    }
}

/// The reply to the command with this id (other replies are skipped).
async fn reply_for(sub: &mut Subscriber, id: &str) -> Value {
    loop {
        let r = next_json(sub, "/cmd-reply", Duration::from_secs(10)).await;
        if r["id"] == id {
            return r;
        }
    }
}

async fn next_json(sub: &mut Subscriber, topic_suffix: &str, timeout: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (topic, payload, _) = sub
            .recv(left)
            .await
            .unwrap_or_else(|| panic!("no message on */{topic_suffix} in {timeout:?}"));
        if topic.ends_with(topic_suffix) {
            let v: Value = serde_json::from_slice(&payload).unwrap();
            check_schema(topic_suffix.trim_start_matches('/'), &v);
            return v;
        }
    }
}

async fn lifecycle(kind: Kind) {
    let f = FleetEnv::new();
    let mut broker = Broker::down(kind, &f.env);
    broker.acl = Some(ACL.into());
    broker.up(&f.env).await;
    let mut watch = f.central(broker.port, "siterelay/test-box/status").await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = f
        .env
        .write_config("s.toml", &f.config_text(broker.port, &listen, ""));

    let mut p = Proc::start(&cfg, f.env.dir.path().join("run1.log"));
    let birth = next_json(&mut watch, "/status", Duration::from_secs(15)).await;
    assert_eq!(birth["state"], "online", "{birth}");
    assert_eq!(birth["schema"], "siterelay.status.v1");
    assert_eq!(birth["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(birth["feeds"][0]["name"], "adt");
    assert!(birth["host"]["arch"].is_string());
    let bdseq = birth["bdseq"].as_i64().unwrap();

    p.kill9();
    let death = next_json(&mut watch, "/status", Duration::from_secs(15)).await;
    assert_eq!(
        (
            death["state"].as_str(),
            death["reason"].as_str(),
            death["bdseq"].as_i64()
        ),
        (Some("offline"), Some("lost"), Some(bdseq)),
        "the broker publishes the Last Will with the connection's bdseq"
    );

    let mut p = Proc::start(&cfg, f.env.dir.path().join("run2.log"));
    let birth2 = next_json(&mut watch, "/status", Duration::from_secs(15)).await;
    assert_eq!(
        (birth2["state"].as_str(), birth2["bdseq"].as_i64()),
        (Some("online"), Some(bdseq + 1))
    );

    assert!(p.sigterm().expect("exits on SIGTERM").success());
    let bye = next_json(&mut watch, "/status", Duration::from_secs(15)).await;
    assert_eq!(
        (
            bye["state"].as_str(),
            bye["reason"].as_str(),
            bye["bdseq"].as_i64()
        ),
        (Some("offline"), Some("shutdown"), Some(bdseq + 1))
    );
    assert!(
        watch.recv(Duration::from_secs(2)).await.is_none(),
        "a clean shutdown is not followed by the Last Will"
    );
    // Retained: a late subscriber sees the last status.
    let mut late = f.central(broker.port, "siterelay/test-box/status").await;
    let (_, payload, retained) = late
        .recv(Duration::from_secs(5))
        .await
        .expect("retained status");
    assert!(retained);
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["reason"],
        "shutdown"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_death_and_bdseq_follow_the_process_lifecycle() {
    lifecycle(Kind::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_birth_death_and_bdseq_follow_the_process_lifecycle() {
    if !mosquitto_or_skip() {
        return;
    }
    lifecycle(Kind::Mosquitto).await;
}

async fn health_inventory_and_commands(kind: Kind) {
    let f = FleetEnv::new();
    let mut broker = Broker::down(kind, &f.env);
    broker.acl = Some(ACL.into());
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = f
        .env
        .write_config("s.toml", &f.config_text(broker.port, &listen, ""));
    let mut p = Proc::start(&cfg, f.env.dir.path().join("run.log"));
    wait_listening(port).await;

    // Outage: three kinds of message arrive while the broker is down.
    let mut c = connect(listen.parse().unwrap()).await;
    let a08 = String::from_utf8(adt("INV2"))
        .unwrap()
        .replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01");
    let oru = "MSH|^~\\&|WINLAB|RXX|SR|HUB|20261130093000||ORU^R01^ORU_R01|INV3|P|2.5\rPID|1||9990000018^^^NHS^NH\rOBR|1\rOBX|1|NM|NA^Sodium||139|mmol/L\rZLB|x\r";
    for m in [adt("INV1"), a08.into_bytes(), oru.as_bytes().to_vec()] {
        assert_eq!(c.send(&m, ACK_WAIT).await.unwrap().code, "AA");
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The central side subscribes before the appliance can connect (its first health report
    // after the outage is what this test reads).
    broker
        .up_with_fault(&f.env, siterelay_testkit::broker::Fault::RefuseConnect)
        .await;
    let mut central = f
        .central(broker.central_port(), "siterelay/test-box/#")
        .await;
    broker.let_appliance_in().await;

    // The first health report after the outage shows the backlog and its age.
    let h = next_json(&mut central, "/health", Duration::from_secs(20)).await;
    assert_eq!(h["schema"], "siterelay.health.v1");
    assert_eq!(h["outbox"]["pending_count"], 3, "{h}");
    assert!(
        h["outbox"]["oldest_pending_age_secs"].as_f64().unwrap() >= 1.0,
        "{h}"
    );
    assert_eq!(h["feeds"][0]["received"], 3);
    assert_eq!(h["feeds"][0]["acks"]["AA"], 3);
    assert_eq!(h["feeds"][0]["state"], "listening");
    // The test PKI's certificates: client valid 365 days, CA 3650 days, from now.
    let client_days = h["certificates"]["client_days_left"].as_i64().unwrap();
    assert!((364..=365).contains(&client_days), "{h}");
    let ca_days = h["certificates"]["ca_days_left"].as_i64().unwrap();
    assert!((3649..=3650).contains(&ca_days), "{h}");
    assert!(h["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(h["rss_bytes"].as_u64().unwrap() > 0);

    // Inventory: exactly what was sent.
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/rebirth",
        r#"{"id":"rb1"}"#,
    )
    .await;
    let inv = loop {
        let v = next_json(&mut central, "/inventory", Duration::from_secs(10)).await;
        if v["feeds"]["adt"]["messages"] == 3 {
            break v;
        }
    };
    let feed = &inv["feeds"]["adt"];
    assert_eq!(
        feed["message_types"],
        serde_json::json!({"ADT^A01": 1, "ADT^A08": 1, "ORU^R01": 1})
    );
    assert_eq!(feed["versions"], serde_json::json!({"2.4": 2, "2.5": 1}));
    let senders: HashSet<String> = feed["senders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}|{}|{}", s["application"], s["facility"], s["count"]))
        .collect();
    assert_eq!(
        senders,
        HashSet::from([
            "\"PAS\"|\"RXX\"|2".to_string(),
            "\"WINLAB\"|\"RXX\"|1".to_string()
        ])
    );
    assert_eq!(feed["segments"]["ZLB"], 1);
    assert_eq!(feed["segments"]["MSH"], 3);
    let text = inv.to_string();
    assert!(
        !text.contains("9990000018") && !text.contains("TEST^PATIENT"),
        "no patient data in the inventory"
    );

    // ping
    f.publish(broker.port, "siterelay/test-box/cmd/ping", r#"{"id":"p1"}"#)
        .await;
    let r = reply_for(&mut central, "p1").await;
    assert_eq!(
        (r["id"].as_str(), r["command"].as_str(), r["ok"].as_bool()),
        (Some("p1"), Some("ping"), Some(true))
    );
    assert_eq!(r["result"]["pong"], true);

    // Replay: records re-sent with their original ids and seq, flagged.
    let mut records = f.central(broker.port, "siterelay/test-box/records/#").await;
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/replay",
        r#"{"id":"r1","feed":"adt","from_seq":2}"#,
    )
    .await;
    let r = reply_for(&mut central, "r1").await;
    assert_eq!(
        (r["id"].as_str(), r["ok"].as_bool()),
        (Some("r1"), Some(true)),
        "{r}"
    );
    assert_eq!(r["result"]["records"], 2);
    let stored = siterelay::outbox::Reader::open(&f.env.data_dir().join("outbox.sqlite"))
        .unwrap()
        .feed_rows_from("adt", 1, 10)
        .unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let (_, p, _) = records
            .recv(Duration::from_secs(10))
            .await
            .expect("replayed record");
        let r = json(&p);
        if r["replay"] == true {
            replayed.push(r);
        }
    }
    for (r, seq) in replayed.iter().zip([2u64, 3]) {
        assert_eq!(r["seq"], seq);
        assert_eq!(
            r["id"].as_str().unwrap(),
            stored[seq as usize - 1].record_id,
            "same id as first sent"
        );
    }

    // health on demand
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/health",
        r#"{"id":"h1"}"#,
    )
    .await;
    let r = reply_for(&mut central, "h1").await;
    assert_eq!(r["ok"], true);

    // malformed and unknown commands: an error reply, nothing changes
    for (cmd, payload, expect) in [
        (
            "replay",
            r#"{"id":"bad1","feed":"adt"}"#,
            "malformed replay payload",
        ),
        (
            "replay",
            r#"{"id":"bad2","feed":"nope","from_seq":1}"#,
            "unknown feed",
        ),
        ("reboot", r#"{"id":"bad3"}"#, "unknown command"),
        ("ping", "not json", "malformed payload"),
    ] {
        f.publish(
            broker.port,
            &format!("siterelay/test-box/cmd/{cmd}"),
            payload,
        )
        .await;
        let r = loop {
            let r = next_json(&mut central, "/cmd-reply", Duration::from_secs(10)).await;
            if r["ok"] == false {
                break r;
            }
        };
        assert!(r["error"].as_str().unwrap().contains(expect), "{r}");
    }
    if let Some((_, p, _)) = records.recv(Duration::from_millis(500)).await {
        panic!("a bad command resent a record: seq {}", json(&p)["seq"]);
    }

    // `siterelay status` talks to the running daemon...
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("siterelay test-box: running for"), "{text}");
    assert!(text.contains("broker    connected"), "{text}");
    assert!(text.contains("adt "), "{text}");
    // ...and falls back to the outbox when it is down.
    assert!(p.sigterm().unwrap().success());
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("daemon NOT answering"), "{text}");
    assert!(text.contains("adt"), "{text}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_inventory_and_commands_tell_the_truth() {
    health_inventory_and_commands(Kind::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_health_inventory_and_commands_tell_the_truth() {
    if !mosquitto_or_skip() {
        return;
    }
    health_inventory_and_commands(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_confines_an_appliance_to_its_own_subtree() {
    if !mosquitto_or_skip() {
        return;
    }
    let f = FleetEnv::new();
    let mut broker = Broker::down(Kind::Mosquitto, &f.env);
    broker.acl = Some(ACL.into());
    broker.up(&f.env).await;
    let mut other = f.central(broker.port, "siterelay/other-box/#").await;
    // An appliance (CN test-box) publishing into another appliance's subtree is refused.
    let (cert, key) = f.env.pki.issue_client(APPLIANCE).unwrap();
    let tls = siterelay::tls::mqtt_client_config(&f.env.pki.ca_file(), &cert, &key).unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("intruder", "localhost", broker.port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for topic in [
        "siterelay/other-box/records/adt",
        "siterelay/other-box/status",
        "siterelay/test-box/cmd/ping",
    ] {
        c.publish(
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
    while reasons.len() < 3 {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("PUBACKs")
            .unwrap();
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) = ev {
            reasons.push(format!("{:?}", a.reason));
        }
    }
    assert_eq!(reasons, ["NotAuthorized", "NotAuthorized", "NotAuthorized"]);
    assert!(
        other.recv(Duration::from_millis(500)).await.is_none(),
        "nothing reached the other subtree"
    );
    broker.stop().await;
}

/// `siterelay watch --json` against 50 simulated appliances speaking the contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_fifty_appliances_with_their_states() {
    let f = FleetEnv::new();
    let broker = Broker::start(Kind::InProcess, &f.env).await;
    for i in 0..50 {
        let id = format!("sim-{i:02}");
        let online = i % 10 != 0; // 5 offline
        let status = serde_json::json!({
            "schema": "siterelay.status.v1", "appliance": id, "bdseq": 3,
            "state": if online { "online" } else { "offline" },
            "reason": if online { None } else { Some("lost") },
        });
        f.publish_with(
            broker.port,
            &format!("siterelay/{id}/status"),
            &status.to_string(),
            true,
        )
        .await;
        if online {
            let cert_days = if i % 7 == 0 { 12 } else { 300 }; // sim-07, 14, 21, 28, 35, 42, 49
            let health = serde_json::json!({
                "schema": "siterelay.health.v1", "appliance": id, "at": "2026-11-30T00:00:00Z", "uptime_secs": 60,
                "outbox": {"pending_count": i, "pending_bytes": 0, "delivered_last_interval": 0,
                           "store_bytes": 0, "store_max_bytes": 1, "refused_full": 0},
                "feeds": [{"name": "adt", "kind": "mllp", "state": "listening", "connected_peers": 1,
                           "received": 1, "acks": {"AA": 1, "AE": 0, "AR": 0}, "duplicates": 0,
                           "discarded_bytes": 0, "oversized": 0, "incomplete": 0}],
                "mqtt": {"broker": "x:1", "connected": true, "connects": 1, "connection_failures": 0,
                         "published": 1, "acked": 1, "refused": 0},
                "certificates": {"client_days_left": cert_days},
                "clock": {"synchronized": true, "suspect": false}
            });
            f.publish_with(
                broker.port,
                &format!("siterelay/{id}/health"),
                &health.to_string(),
                true,
            )
            .await;
        }
    }
    let mut child = Command::new(BIN)
        .args([
            "watch",
            "--json",
            "--broker",
            &format!("mqtts://localhost:{}", broker.port),
            "--ca",
        ])
        .arg(f.env.pki.ca_file())
        .arg("--cert")
        .arg(&f.central.0)
        .arg("--key")
        .arg(&f.central.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let rows = tokio::task::spawn_blocking(move || {
        let mut latest = std::collections::BTreeMap::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
            latest.insert(v["appliance"].as_str().unwrap().to_string(), v.clone());
            let complete = latest.len() == 50
                && latest
                    .values()
                    .all(|r| r["state"] == "offline" || r["pending"].is_u64());
            if complete {
                break;
            }
        }
        latest
    });
    let rows = tokio::time::timeout(Duration::from_secs(20), rows)
        .await
        .expect("watch output in time")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(rows.len(), 50);
    let offline: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| r["state"] == "offline")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(offline, ["sim-00", "sim-10", "sim-20", "sim-30", "sim-40"]);
    let expiring: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| {
            r["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "cert-expiring")
        })
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        expiring,
        [
            "sim-07", "sim-14", "sim-21", "sim-28", "sim-35", "sim-42", "sim-49"
        ]
    );
    assert_eq!(rows["sim-13"]["pending"], 13);
    assert_eq!(rows["sim-13"]["feeds_up"], 1);
    assert_eq!(rows["sim-13"]["problems"], serde_json::json!([]));
}

/// Issue 13: five stored messages with a 1 MB MSH-3 made a 30 MB inventory, larger than the
/// MQTT packet limit, and every reconnect failed, across restarts. Every string that reaches
/// the inventory or health is now cut to 256 characters (with a marker): both stay small and
/// the connection keeps working, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_msh3_keeps_inventory_and_health_small_and_the_broker_connection_working() {
    let f = FleetEnv::new();
    let broker = Broker::start(Kind::InProcess, &f.env).await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = f
        .env
        .write_config("s.toml", &f.config_text(broker.port, &listen, ""));
    let mut p = Proc::start(&cfg, f.env.dir.path().join("run1.log"));
    wait_listening(port).await;
    let mut central = f.central(broker.port, "siterelay/test-box/#").await;
    let mut c = connect(listen.parse().unwrap()).await;
    for i in 0..5 {
        let app = format!("{i}{}", "A".repeat(1024 * 1024));
        let m = format!(
            "MSH|^~\\&|{app}|RXX|SR|HUB|20261130093000||ADT^A01^ADT_A01|BIG{i}|P|2.4\rPID|1||9990000018^^^NHS^NH||TEST^PATIENT\r"
        );
        assert_eq!(c.send(m.as_bytes(), ACK_WAIT).await.unwrap().code, "AA");
    }
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/rebirth",
        r#"{"id":"rb"}"#,
    )
    .await;
    let inv = loop {
        let v = next_json(&mut central, "/inventory", Duration::from_secs(15)).await;
        if v["feeds"]["adt"]["messages"] == 5 {
            break v;
        }
    };
    let text = inv.to_string();
    assert!(text.len() < 16 * 1024, "inventory is {} bytes", text.len());
    let senders = inv["feeds"]["adt"]["senders"].as_array().unwrap();
    assert_eq!(senders.len(), 5, "{text}");
    let app = senders[0]["application"].as_str().unwrap();
    assert!(app.ends_with("…[truncated]"), "{app}");
    assert!(app.chars().count() <= 256 + 12, "{app}");
    let h = next_json(&mut central, "/health", Duration::from_secs(40)).await;
    assert!(h.to_string().len() < 16 * 1024);

    // The connection still works (a record and a command reply), and after a restart too.
    assert_eq!(c.send(&adt("AFTER1"), ACK_WAIT).await.unwrap().code, "AA");
    drop(c);
    let mut seen = false;
    while let Some((topic, payload, _)) = central.recv(Duration::from_secs(15)).await {
        if topic.contains("/records/") && json(&payload)["hl7"]["control_id"] == "AFTER1" {
            seen = true;
            break;
        }
    }
    assert!(seen, "a record after the big ones is delivered");
    assert!(p.sigterm().unwrap().success());
    let _p = Proc::start(&cfg, f.env.dir.path().join("run2.log"));
    while next_json(&mut central, "/status", Duration::from_secs(15)).await["state"] != "online" {}
    f.publish(broker.port, "siterelay/test-box/cmd/ping", r#"{"id":"p2"}"#)
        .await;
    assert_eq!(reply_for(&mut central, "p2").await["ok"], true);
}

/// A replay resends patient data: at most `mqtt.replays_per_hour` start in an hour (one at a
/// time); beyond that the reply says why, and nothing is resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_beyond_the_hourly_cap_are_refused_with_the_reason() {
    let f = FleetEnv::new();
    let broker = Broker::start(Kind::InProcess, &f.env).await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = f.env.write_config(
        "s.toml",
        &f.config_text(broker.port, &listen, "replays_per_hour = 1"),
    );
    let _p = Proc::start(&cfg, f.env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut central = f.central(broker.port, "siterelay/test-box/cmd-reply").await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("R1"), ACK_WAIT).await.unwrap().code, "AA");
    drop(c);
    let replay = r#"{"id":"ID","feed":"adt","from_seq":1}"#;
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/replay",
        &replay.replace("ID", "first"),
    )
    .await;
    let r = reply_for(&mut central, "first").await;
    assert_eq!(
        (r["ok"].as_bool(), &r["result"]["records"]),
        (Some(true), &Value::from(1)),
        "{r}"
    );
    f.publish(
        broker.port,
        "siterelay/test-box/cmd/replay",
        &replay.replace("ID", "second"),
    )
    .await;
    let r = reply_for(&mut central, "second").await;
    assert_eq!(r["ok"], false, "{r}");
    let why = r["error"].as_str().unwrap();
    assert!(why.contains("mqtt.replays_per_hour = 1"), "{why}");
}

/// The appliance only receives small commands: a packet larger than 64 KiB is not taken (MQTT 5
/// announces the limit at CONNECT, so the broker drops it), and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_larger_than_the_incoming_packet_limit_is_not_taken() {
    let f = FleetEnv::new();
    let broker = Broker::start(Kind::InProcess, &f.env).await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = f
        .env
        .write_config("s.toml", &f.config_text(broker.port, &listen, ""));
    let _p = Proc::start(&cfg, f.env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut central = f.central(broker.port, "siterelay/test-box/cmd-reply").await;
    // Wait until the appliance has subscribed: a small ping is answered.
    f.publish(broker.port, "siterelay/test-box/cmd/ping", r#"{"id":"p0"}"#)
        .await;
    reply_for(&mut central, "p0").await;
    let big = format!(r#"{{"id":"big"{}}}"#, " ".repeat(1024 * 1024));
    f.publish(broker.port, "siterelay/test-box/cmd/ping", &big)
        .await;
    f.publish(broker.port, "siterelay/test-box/cmd/ping", r#"{"id":"p1"}"#)
        .await;
    loop {
        let r = next_json(&mut central, "/cmd-reply", Duration::from_secs(10)).await;
        assert_ne!(r["id"], "big", "a 1 MB command was taken");
        if r["id"] == "p1" {
            break;
        }
    }
}

/// A broker-side packet far over the appliance's 64 KiB incoming limit (a 1 MiB *retained*
/// message on a command topic it subscribes to, so the broker offers it again at every
/// (re)subscription) neither crashes nor wedges the sink: records sent before and after it are
/// delivered, a small command is still answered, and the process is still running. Against a
/// real Mosquitto (with the broker kit's ACL), for the protocol version in `protocol`.
async fn an_oversized_retained_command_does_not_wedge_the_sink(protocol: &str) {
    let f = FleetEnv::new();
    let mut broker = Broker::down(Kind::Mosquitto, &f.env);
    broker.acl = Some(ACL.into());
    broker.up(&f.env).await;
    // The 1 MiB command is on the broker, retained, before the appliance first connects.
    let big = format!(r#"{{"id":"big"{}}}"#, " ".repeat(1024 * 1024));
    f.publish_with(
        broker.central_port(),
        "siterelay/test-box/cmd/ping",
        &big,
        true,
    )
    .await;
    // Not `#`: the test's own clients would be sent the 1 MiB message too.
    let mut central = f
        .central(broker.central_port(), "siterelay/test-box/records/#")
        .await;
    let mut replies = f
        .central(broker.central_port(), "siterelay/test-box/cmd-reply")
        .await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let extra = format!("protocol = \"{protocol}\"");
    let cfg = f
        .env
        .write_config("s.toml", &f.config_text(broker.port, &listen, &extra));
    let mut p = Proc::start(&cfg, f.env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    for i in 0..5 {
        let id = format!("BEFORE{i}");
        assert_eq!(c.send(&adt(&id), ACK_WAIT).await.unwrap().code, "AA");
    }
    // A small command after the big one: the subscription works.
    f.publish(
        broker.central_port(),
        "siterelay/test-box/cmd/ping",
        r#"{"id":"small"}"#,
    )
    .await;
    for i in 0..5 {
        let id = format!("AFTER{i}");
        assert_eq!(c.send(&adt(&id), ACK_WAIT).await.unwrap().code, "AA");
    }
    let mut records = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while records.len() < 10 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((_, payload, _)) = central.recv(left).await else {
            panic!(
                "MQTT {protocol}: {} of 10 records delivered; log:\n{}",
                records.len(),
                p.log()
            );
        };
        records.insert(
            json(&payload)["hl7"]["control_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let log = p.log();
    if protocol == "5" {
        // The broker was told the limit at CONNECT and drops the big one: commands go on.
        loop {
            let Some((_, payload, _)) = replies.recv(Duration::from_secs(30)).await else {
                panic!("MQTT 5: the small command was not answered; log:\n{log}");
            };
            let r: Value = serde_json::from_slice(&payload).unwrap();
            assert_ne!(r["id"], "big", "a 1 MiB command was taken");
            if r["id"] == "small" {
                break;
            }
        }
        assert!(!log.contains("over the incoming limit"), "{log}");
    } else {
        // MQTT 3.1.1 cannot tell the broker: the big packet ends the connection once, then the
        // appliance connects without the command subscription (saying why and what to do),
        // instead of reconnecting into the same retained message for ever.
        assert!(
            log.contains("the broker sent a packet over the incoming limit"),
            "{log}"
        );
        assert!(log.contains("mosquitto_pub -r -n -t"), "{log}");
        let connections = log.matches("connected to MQTT broker").count();
        assert!(connections <= 3, "{connections} connections:\n{log}");
        assert!(
            replies.recv(Duration::from_secs(2)).await.is_none(),
            "no command is taken while the subscription is paused"
        );
    }
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the daemon is still running"
    );
    let log = p.log();
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "MQTT {protocol}: 10 records delivered after a 1 MiB retained command; \
         sink connections in the log: {}",
        log.matches("connected to MQTT broker").count()
    );
    assert!(p.sigterm().unwrap().success());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_an_oversized_retained_command_does_not_wedge_the_sink() {
    if !mosquitto_or_skip() {
        return;
    }
    an_oversized_retained_command_does_not_wedge_the_sink("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_an_oversized_retained_command_does_not_wedge_the_sink() {
    if !mosquitto_or_skip() {
        return;
    }
    an_oversized_retained_command_does_not_wedge_the_sink("3.1.1").await;
}
