//! The MQTT client certificate is reloaded without a restart and without losing a record; a
//! broken one is refused and the one in use kept; health reports the certificate in use; a
//! private key readable by others stops start-up with the chmod that fixes it. Real generated
//! certificates, the real binary, the in-process mutual-TLS broker.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

async fn next_health(h: &mut siterelay_testkit::subscriber::Subscriber) -> serde_json::Value {
    let (_, p, _) = h.recv(Duration::from_secs(20)).await.expect("health");
    serde_json::from_slice(&p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_taken_without_losing_a_record_and_a_broken_one_is_refused() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut records = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut health = broker.subscribe(&env, "siterelay/test-box/health").await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    // The files the config names: copies the test can replace, as a renewal would.
    let cert = env.dir.path().join("client.pem");
    let key = env.dir.path().join("client.key");
    let install = |(c, k): (std::path::PathBuf, std::path::PathBuf)| {
        std::fs::copy(&c, &cert).unwrap();
        std::fs::copy(&k, &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    install((env.pki.client_cert_file(), env.pki.client_key_file()));
    let text = env
        .config_text(broker.port, &[("adt", &listen)], "health_interval = \"5s\"")
        .replace(
            &env.pki.client_cert_file().display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        );
    let cfg = env.write_config("s.toml", &text);
    let p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;

    let days = |h: &serde_json::Value| h["certificates"]["client_days_left"].as_i64();
    assert_eq!(days(&next_health(&mut health).await), Some(365));
    let connects_before = broker.test_broker().connections_accepted();

    // Records flow while the certificate is renewed (30 days this time) behind its back.
    let mut c = connect(listen.parse().unwrap()).await;
    for i in 0..20 {
        assert_eq!(
            c.send(&adt(&format!("A{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    install(env.pki.issue_client_for_days(APPLIANCE, 30).unwrap());
    for i in 20..40 {
        assert_eq!(
            c.send(&adt(&format!("A{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    // Health reports the new certificate once it is in use, and the sink connected again.
    let mut seen = None;
    for _ in 0..6 {
        let h = next_health(&mut health).await;
        if days(&h) == Some(29) || days(&h) == Some(30) {
            seen = days(&h);
            break;
        }
    }
    assert!(
        seen.is_some(),
        "health shows the renewed certificate in use"
    );
    assert!(
        broker.test_broker().connections_accepted() > connects_before,
        "reconnected"
    );
    for i in 40..50 {
        assert_eq!(
            c.send(&adt(&format!("A{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < 50 {
        let (_, payload, _) = records
            .recv(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("only {} of 50 records arrived", got.len()));
        got.insert(
            json(&payload)["hl7"]["control_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }

    // A broken renewal (a key that does not belong to the certificate) is refused loudly; the
    // certificate in use stays, and records keep flowing.
    let (_, other_key) = env.pki.issue_client_for_days(APPLIANCE, 100).unwrap();
    std::fs::copy(&other_key, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || p.log().contains("REFUSED")).await,
        "the refusal is logged"
    );
    assert!(
        p.log().contains("does not belong to the certificate"),
        "{}",
        p.log()
    );
    let h = next_health(&mut health).await;
    assert!(
        matches!(days(&h), Some(29) | Some(30)),
        "still the one in use: {h}"
    );
    assert_eq!(c.send(&adt("AFTER"), ACK_WAIT).await.unwrap().code, "AA");
    let mut after = false;
    while let Some((_, payload, _)) = records.recv(Duration::from_secs(20)).await {
        if json(&payload)["hl7"]["control_id"] == "AFTER" {
            after = true;
            break;
        }
    }
    assert!(after, "records still flow with the certificate in use");
}

#[test]
fn a_private_key_readable_by_others_stops_start_up_with_the_chmod_that_fixes_it() {
    let env = Env::new();
    let key = env.dir.path().join("open.key");
    std::fs::copy(env.pki.client_key_file(), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = env
        .config_text(
            siterelay_testkit::free_port(),
            &[("adt", "127.0.0.1:0")],
            "",
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        );
    let cfg = env.write_config("s.toml", &text);
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
}

/// Certificates in use that expire within 30 days: at start, a WARN for the MQTT client
/// certificate and one for the TLS MLLP feed's server certificate, each with its days left,
/// and health reports both (the certificates in use). The daily repeat is shown with paused
/// time by `app::expiry::tests::certificates_expiring_within_30_days_warn_at_start_and_then_every_day`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_expiring_within_30_days_are_warned_about_at_start_and_shown_in_health() {
    use siterelay_testkit::pki::{Pki, PkiOptions};
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut health = broker.subscribe(&env, "siterelay/test-box/health").await;
    let (cert, key) = env
        .pki
        .issue_client_for_days(env.pki.client_cn(), 10)
        .unwrap();
    let listener_dir = env.dir.path().join("listener");
    std::fs::create_dir(&listener_dir).unwrap();
    let listener = Pki::generate_with(
        &listener_dir,
        "listener",
        PkiOptions {
            server_valid_days: 20,
            ..PkiOptions::default()
        },
    )
    .unwrap();
    let port = siterelay_testkit::free_port();
    let text = env
        .config_text(broker.port, &[], "health_interval = \"5s\"")
        .replace(
            &env.pki.client_cert_file().display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &env.pki.client_key_file().display().to_string(),
            &key.display().to_string(),
        )
        + &format!(
            "\n[[mllp]]\nname = \"lab\"\nlisten = \"127.0.0.1:{port}\"\n[mllp.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            listener.server_cert_file().display(),
            listener.server_key_file().display()
        );
    let cfg = env.write_config("s.toml", &text);
    let p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let warned = |what: &str| {
        p.log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(what))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || !warned(
            "MLLP server certificate in use expires soon"
        )
        .is_empty())
        .await,
        "{}",
        p.log()
    );
    let mqtt = warned("MQTT client certificate in use expires soon");
    let mllp = warned("MLLP server certificate in use expires soon");
    assert_eq!(mqtt.len(), 1, "{}", p.log());
    assert_eq!(mllp.len(), 1, "{}", p.log());
    // The certificates run from yesterday to 10 (20) days from now.
    assert!(mqtt[0].contains("days_left=9") || mqtt[0].contains("days_left=10"));
    assert!(mllp[0].contains("days_left=19") || mllp[0].contains("days_left=20"));
    assert!(mllp[0].contains("feed=lab"), "{}", mllp[0]);
    let h = next_health(&mut health).await;
    let client = h["certificates"]["client_days_left"].as_i64().unwrap();
    assert!((9..=10).contains(&client), "{h}");
    let lab = h["feeds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "lab")
        .unwrap();
    let listener_days = lab["tls_certificate"]["days_left"].as_i64().unwrap();
    assert!((19..=20).contains(&listener_days), "{h}");
}
