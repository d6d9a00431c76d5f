//! MLLP over TLS against senders on the trust's LAN (issue 13): which certificates may send on a
//! feed (allow_names, a CRL, an unknown CA), and the server certificate reloaded on SIGHUP and on
//! file change without dropping an open connection. Real sockets, real certificates (testkit
//! PKI), senders on 127.0.0.2 and 127.0.0.3.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use siterelay::app::Daemon;
use siterelay::client::MllpClient;
use siterelay_testkit::pki::{Pki, PkiOptions};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

const HOSTILE: &str = "127.0.0.2";
const GENUINE: &str = "127.0.0.3";

async fn daemon(env: &Env, tls: &str) -> Daemon {
    let broker = Broker::down(Kind::InProcess, env);
    let text = env.config_text(broker.port, &[], "")
        + &format!("\n[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\n[mllp.tls]\n{tls}\n");
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).unwrap();
    Daemon::start(&cfg).await.unwrap()
}

/// A TLS connection from loopback address `from`, trusting `ca`, presenting `client` if given.
/// With TLS 1.3 a refused client certificate shows only on the first read.
async fn tls_from(
    from: &str,
    to: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<MllpClient<TlsStream<TcpStream>>> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = s.connect(to).await?;
    let cfg = siterelay_testkit::tls::client_config(ca, client).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    Ok(MllpClient::new(tls))
}

/// Whether a sender is answered `AA` (false: refused at the handshake or closed unanswered).
async fn answered(
    from: &str,
    to: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    id: &str,
) -> bool {
    match tls_from(from, to, ca, client).await {
        Err(_) => false,
        Ok(mut c) => matches!(c.send(&adt(id), ACK_WAIT).await, Ok(a) if a.code == "AA"),
    }
}

fn refused(d: &Daemon) -> u64 {
    d.telemetry()
        .feed("adt")
        .refused_connections
        .load(Ordering::Relaxed)
}

fn mutual(env: &Env, extra: &str) -> String {
    format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{extra}",
        env.pki.server_cert_file().display(),
        env.pki.server_key_file().display(),
        env.pki.ca_file().display()
    )
}

fn serial_of(cert_file: &Path) -> Vec<u8> {
    let pem = std::fs::read(cert_file).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = p.parse_x509().unwrap();
    cert.tbs_certificate.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_trusted_ca_but_not_in_allow_names_is_refused_and_the_named_sender_is_answered()
 {
    let env = Env::new();
    let (pas_cert, pas_key) = env.pki.issue_client("pas.trust.nhs.uk").unwrap();
    let (other_cert, other_key) = env.pki.issue_client("lab.trust.nhs.uk").unwrap();
    let d = daemon(&env, &mutual(&env, "allow_names = [\"pas.trust.nhs.uk\"]")).await;
    let addr = d.addr("adt").unwrap();
    let ca = env.pki.ca_file();
    assert!(
        !answered(
            HOSTILE,
            addr,
            &ca,
            Some((&other_cert, &other_key)),
            "FORGED"
        )
        .await,
        "same CA, other name: not answered"
    );
    assert!(wait_until(ACK_WAIT, || refused(&d) == 1).await);
    assert!(answered(GENUINE, addr, &ca, Some((&pas_cert, &pas_key)), "REAL").await);
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_unknown_ca_or_none_at_all_fails_the_handshake() {
    let env = Env::new();
    let d = daemon(&env, &mutual(&env, "")).await;
    let addr = d.addr("adt").unwrap();
    let ca = env.pki.ca_file();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = Pki::generate(stranger_dir.path(), "stranger").unwrap();
    let (sc, sk) = (stranger.client_cert_file(), stranger.client_key_file());
    assert!(!answered(HOSTILE, addr, &ca, Some((&sc, &sk)), "U1").await);
    assert!(!answered(HOSTILE, addr, &ca, None, "U2").await);
    assert!(wait_until(ACK_WAIT, || refused(&d) == 2).await);
    let (c, k) = (env.pki.client_cert_file(), env.pki.client_key_file());
    assert!(answered(GENUINE, addr, &ca, Some((&c, &k)), "REAL").await);
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_fails_the_handshake_and_an_unrevoked_one_is_answered() {
    let env = Env::new();
    let (stolen_cert, stolen_key) = env.pki.issue_client("pas.trust.nhs.uk").unwrap();
    let (new_cert, new_key) = env.pki.issue_client("pas2.trust.nhs.uk").unwrap();
    let crl = env.pki.write_crl(&[serial_of(&stolen_cert)]).unwrap();
    let d = daemon(
        &env,
        &mutual(&env, &format!("crl_file = \"{}\"", crl.display())),
    )
    .await;
    let addr = d.addr("adt").unwrap();
    let ca = env.pki.ca_file();
    assert!(
        !answered(
            HOSTILE,
            addr,
            &ca,
            Some((&stolen_cert, &stolen_key)),
            "REVOKED"
        )
        .await,
        "revoked certificate refused"
    );
    assert!(wait_until(ACK_WAIT, || refused(&d) == 1).await);
    assert!(answered(GENUINE, addr, &ca, Some((&new_cert, &new_key)), "REAL").await);
    assert_eq!(d.outbox().gauges().appended.load(Ordering::Relaxed), 1);
    d.stop().await;
}

fn days_left(d: &Daemon) -> i64 {
    let c = d
        .telemetry()
        .feed("adt")
        .tls_certificate()
        .expect("TLS feed");
    (c.not_after - jiff::Timestamp::now().as_second()).div_euclid(86_400)
}

fn reload_error(d: &Daemon) -> Option<String> {
    d.telemetry()
        .feed("adt")
        .tls_certificate()
        .and_then(|c| c.reload_error)
}

fn install(from: &Pki, cert: &Path, key: &Path) {
    std::fs::copy(from.server_cert_file(), cert).unwrap();
    std::fs::copy(from.server_key_file(), key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_server_certificate_is_used_for_new_connections_without_dropping_an_open_one() {
    let env = Env::new();
    let dir = env.dir.path();
    // The renewal comes from another CA and is valid for 30 days, so it is told apart from the
    // original (825 days) by its chain and its expiry.
    let renewed = Pki::generate_with(
        &dir.join("renewed"),
        "renewed",
        PkiOptions {
            server_valid_days: 30,
            ..PkiOptions::default()
        },
    )
    .unwrap();
    let (cert, key): (PathBuf, PathBuf) = (dir.join("mllp.pem"), dir.join("mllp.key"));
    install(&env.pki, &cert, &key);
    let d = daemon(
        &env,
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            key.display()
        ),
    )
    .await;
    let addr = d.addr("adt").unwrap();
    let (old_ca, new_ca) = (env.pki.ca_file(), renewed.ca_file());
    assert!(days_left(&d) > 800);
    let mut open = tls_from(GENUINE, addr, &old_ca, None).await.unwrap();
    assert_eq!(open.send(&adt("O1"), ACK_WAIT).await.unwrap().code, "AA");

    // SIGHUP (what main calls on the signal): the renewal is used for new handshakes.
    install(&renewed, &cert, &key);
    assert_eq!(d.mllp_certificates().reload(), 0, "nothing refused");
    assert!(days_left(&d) < 31, "health shows the certificate in use");
    assert_eq!(open.send(&adt("O2"), ACK_WAIT).await.unwrap().code, "AA");
    assert!(answered(GENUINE, addr, &new_ca, None, "N1").await);
    assert!(!answered(GENUINE, addr, &old_ca, None, "N2").await);

    // A broken certificate: refused loudly, the renewal stays in use.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    assert_eq!(d.mllp_certificates().reload(), 1, "refused");
    assert!(reload_error(&d).is_some());
    assert!(days_left(&d) < 31);
    assert!(answered(GENUINE, addr, &new_ca, None, "N3").await);
    // A key that does not match the certificate is refused too.
    std::fs::copy(renewed.server_cert_file(), &cert).unwrap();
    std::fs::copy(env.pki.server_key_file(), &key).unwrap();
    assert_eq!(d.mllp_certificates().reload(), 1, "mismatched key refused");
    assert!(answered(GENUINE, addr, &new_ca, None, "N4").await);

    // On file change, no signal: the original certificate is back within a few seconds.
    install(&env.pki, &cert, &key);
    assert!(
        wait_until(Duration::from_secs(20), || days_left(&d) > 800
            && reload_error(&d).is_none())
        .await,
        "reloaded on file change"
    );
    assert!(answered(GENUINE, addr, &old_ca, None, "N5").await);
    // The first connection was never dropped.
    assert_eq!(open.send(&adt("O3"), ACK_WAIT).await.unwrap().code, "AA");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_names_the_certificate_its_sender_presented() {
    let env = Env::new();
    let (pas_cert, pas_key) = env.pki.issue_client("pas.trust.nhs.uk").unwrap();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut health = broker.subscribe(&env, "siterelay/test-box/health").await;
    let text = env.config_text(broker.port, &[], "health_interval = \"5s\"")
        + &format!(
            "\n[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\n[mllp.tls]\n{}\n",
            mutual(&env, "allow_names = [\"pas.trust.nhs.uk\"]")
        );
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let addr = d.addr("adt").unwrap();
    assert!(
        answered(
            GENUINE,
            addr,
            &env.pki.ca_file(),
            Some((&pas_cert, &pas_key)),
            "C1"
        )
        .await
    );
    let (_, payload, _) = sub.recv(Duration::from_secs(10)).await.expect("record");
    let v = json(&payload);
    check_schema("record", &v);
    let source = &v["source"];
    assert_eq!(source["kind"], "mllp");
    assert!(
        source["peer"].as_str().unwrap().starts_with("127.0.0.3:"),
        "{source}"
    );
    let subject = source["certificate"].as_str().expect("certificate subject");
    assert!(subject.contains("CN=pas.trust.nhs.uk"), "{subject}");

    // Health, as the central side sees it: the certificate the feed presents, and a refused
    // sender counted.
    let (other_cert, other_key) = env.pki.issue_client("lab.trust.nhs.uk").unwrap();
    assert!(
        !answered(
            HOSTILE,
            addr,
            &env.pki.ca_file(),
            Some((&other_cert, &other_key)),
            "X"
        )
        .await
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (_, payload, _) = health
            .recv(deadline - tokio::time::Instant::now())
            .await
            .expect("a health report counting the refused sender");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        if v["feeds"][0]["refused_connections"] == 1 {
            break v;
        }
    };
    check_schema("health", &report);
    let feed = &report["feeds"][0];
    let tls = &feed["tls_certificate"];
    assert!(tls["days_left"].as_i64().unwrap() > 800, "{tls}");
    assert!(tls["subject"].as_str().is_some(), "{tls}");
    assert!(tls.get("reload_error").is_none(), "{tls}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_the_real_daemon_reloads_the_mllp_certificate_and_keeps_an_open_connection() {
    let env = Env::new();
    let dir = env.dir.path();
    let renewed = Pki::generate_with(
        &dir.join("renewed"),
        "renewed",
        PkiOptions {
            server_valid_days: 30,
            ..PkiOptions::default()
        },
    )
    .unwrap();
    let (cert, key) = (dir.join("mllp.pem"), dir.join("mllp.key"));
    install(&env.pki, &cert, &key);
    let broker = Broker::down(Kind::InProcess, &env);
    let port = siterelay_testkit::free_port();
    let text = env.config_text(broker.port, &[], "")
        + &format!(
            "\n[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:{port}\"\n[mllp.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
    let config = env.write_config("s.toml", &text);
    let p = Proc::start(&config, dir.join("log"));
    wait_listening(port).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut open = tls_from(GENUINE, addr, &env.pki.ca_file(), None)
        .await
        .unwrap();
    assert_eq!(open.send(&adt("S1"), ACK_WAIT).await.unwrap().code, "AA");
    // The file check (every 2 s) may see the new files first; the signal's own log line shows
    // that SIGHUP was handled, and the renewal's CA shows which certificate is in use.
    install(&renewed, &cert, &key);
    let st = std::process::Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        wait_until(ACK_WAIT, || p
            .log()
            .contains("SIGHUP: MLLP certificates reloaded"))
        .await,
        "{}",
        p.log()
    );
    assert!(answered(GENUINE, addr, &renewed.ca_file(), None, "S2").await);
    assert_eq!(open.send(&adt("S3"), ACK_WAIT).await.unwrap().code, "AA");
    assert!(p.log().contains("MLLP server certificate loaded"));
}
