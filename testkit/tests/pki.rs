//! PKI files and their acceptance by the TestBroker (rustls/webpki).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use siterelay_testkit::{BrokerOptions, Pki, PkiOptions, Subscriber, TestBroker, client, tls};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn two_pkis_share_a_directory_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let a = Pki::generate(dir.path(), "alpha").unwrap();
    let b = Pki::generate_with(
        dir.path(),
        "beta",
        PkiOptions {
            client_valid_days: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let files = |p: &Pki| {
        vec![
            p.ca_file(),
            p.server_cert_file(),
            p.server_key_file(),
            p.client_cert_file(),
            p.client_key_file(),
        ]
    };
    for f in files(&a).into_iter().chain(files(&b)) {
        assert!(f.exists(), "{}", f.display());
    }
    assert_ne!(a.ca_file(), b.ca_file());
    assert_ne!(a.client_cert_file(), b.client_cert_file());
    for k in [
        a.server_key_file(),
        a.client_key_file(),
        a.ca_key_file(),
        b.client_key_file(),
    ] {
        assert_eq!(mode(&k), 0o600, "{}", k.display());
    }
    assert_eq!(mode(&a.ca_file()), 0o644);
    assert_eq!(a.client_cn(), "test-appliance");
    let (c, k) = a.issue_client("site 42").unwrap();
    assert!(c.file_name().unwrap().to_str().unwrap().contains("site_42"));
    assert_eq!(mode(&k), 0o600);
    // Parsable by rustls.
    tls::client_config(&a.ca_file(), Some((&c, &k))).unwrap();
    tls::server_config(
        &a.ca_file(),
        &a.server_cert_file(),
        &a.server_key_file(),
        true,
    )
    .unwrap();
}

#[tokio::test]
async fn expired_client_cert_is_refused_and_tls_without_client_cert_is_optional() {
    let (_dir, pki) = Pki::generate_in_tempdir("expiry").unwrap();
    let broker = TestBroker::start(BrokerOptions::from_pki(&pki))
        .await
        .unwrap();
    let (cert, key) = pki.issue_client_for_days("old-appliance", -1).unwrap();
    assert!(cert.to_str().unwrap().ends_with("-expired1d.pem"));
    let err = Subscriber::connect_within(
        broker.port(),
        &pki,
        Some((cert, key)),
        "#",
        std::time::Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("subscriber could not subscribe"));
    assert!(broker.handshake_failures() >= 1);

    // Without a client certificate: refused when required...
    let no_cert = tls::client_config(&pki.ca_file(), None).unwrap();
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(
        client::v5_options("anon", broker.port(), no_cert.clone()),
        10,
    );
    assert_ne!(poll5(&mut el, T, is_connack5).await.unwrap_err(), "timeout");

    // ...accepted when the broker does not ask for one.
    let mut opts = BrokerOptions::from_pki(&pki);
    opts.require_client_cert = false;
    let open = TestBroker::start(opts).await.unwrap();
    let (_c, mut el) =
        rumqttc::v5::AsyncClient::new(client::v5_options("anon", open.port(), no_cert), 10);
    poll5(&mut el, T, is_connack5).await.unwrap();
    assert_eq!(open.connected_clients(), vec!["anon".to_string()]);
}
