//! `siterelay send --tls`: trust IT tests an `[mllp.tls]` feed from the command line. The real
//! binary against a real TLS feed of the daemon (mutual TLS, testkit PKI); every failure is
//! said in plain words and exits 1.

mod common;

use std::path::Path;

use common::*;
use siterelay::app::Daemon;
use siterelay_testkit::pki::Pki;

async fn tls_feed(env: &Env) -> Daemon {
    let broker = Broker::down(Kind::InProcess, env);
    let text = env.config_text(broker.port, &[], "")
        + &format!(
            "\n[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\n[mllp.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            env.pki.server_cert_file().display(),
            env.pki.server_key_file().display(),
            env.pki.ca_file().display()
        );
    let cfg = siterelay::config::parse(Path::new("t.toml"), &text).unwrap();
    Daemon::start(&cfg).await.unwrap()
}

/// Run `siterelay send` with these arguments and one ADT message; (exit code, stdout + stderr).
async fn send(env: &Env, args: &[&str]) -> (i32, String) {
    let msg = env.dir.path().join("adt.hl7");
    std::fs::write(&msg, adt("TLS1")).unwrap();
    let out = tokio::process::Command::new(BIN)
        .arg("send")
        .args(args)
        .arg(&msg)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_a_client_certificate_is_answered_by_a_mutual_tls_feed() {
    let env = Env::new();
    let d = tls_feed(&env).await;
    let to = d.addr("adt").unwrap().to_string();
    let (ca, cert, key) = (
        env.pki.ca_file(),
        env.pki.client_cert_file(),
        env.pki.client_key_file(),
    );
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    // By address (the feed's certificate carries 127.0.0.1), then by the name in it.
    let (code, out) = send(
        &env,
        &["--to", &to, "--ca", ca, "--cert", cert, "--key", key],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": AA TLS1"), "{out}");
    let (code, out) = send(
        &env,
        &[
            "--to",
            &to,
            "--tls",
            "--ca",
            ca,
            "--cert",
            cert,
            "--key",
            key,
            "--server-name",
            "localhost",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tls_failure_is_named_in_plain_words_and_exits_1() {
    let env = Env::new();
    let d = tls_feed(&env).await;
    let to = d.addr("adt").unwrap().to_string();
    let ca = env.pki.ca_file().display().to_string();
    let cert = env.pki.client_cert_file().display().to_string();
    let key = env.pki.client_key_file().display().to_string();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = Pki::generate(stranger_dir.path(), "stranger").unwrap();
    let stranger_ca = stranger.ca_file().display().to_string();
    let stranger_cert = stranger.client_cert_file().display().to_string();
    let stranger_key = stranger.client_key_file().display().to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--tls"], "--tls needs --ca FILE"),
        (
            vec!["--ca", &stranger_ca, "--cert", &cert, "--key", &key],
            "the feed's certificate does not chain to the CA given with --ca",
        ),
        (
            vec![
                "--ca",
                &ca,
                "--cert",
                &cert,
                "--key",
                &key,
                "--server-name",
                "pas.example.nhs.uk",
            ],
            "the feed's certificate does not name 'pas.example.nhs.uk'",
        ),
        (
            vec!["--ca", &ca],
            "the feed requires a client certificate: give --cert and --key",
        ),
        (
            vec![
                "--ca",
                &ca,
                "--cert",
                &stranger_cert,
                "--key",
                &stranger_key,
            ],
            "the feed refused this client's certificate",
        ),
        (
            vec!["--ca", &ca, "--cert", &cert, "--key", &stranger_key],
            "are not a pair",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["--to", to.as_str()];
        all.extend(args.iter().copied());
        let (code, out) = send(&env, &all).await;
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(
            out.contains(expected),
            "{args:?}: expected '{expected}' in: {out}"
        );
    }
    // Nothing got in.
    assert_eq!(
        d.outbox()
            .gauges()
            .appended
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    d.stop().await;
}
