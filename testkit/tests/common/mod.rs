#![allow(dead_code)]

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet as P5;
use siterelay_testkit::{Pki, client, tls};

pub const T: Duration = Duration::from_secs(5);

/// Polls a v5 event loop until `pred` matches an event (Ok), the loop errors (Err) or the
/// timeout elapses (Err("timeout")).
pub async fn poll5<F>(
    el: &mut rumqttc::v5::EventLoop,
    timeout: Duration,
    mut pred: F,
) -> Result<rumqttc::v5::Event, String>
where
    F: FnMut(&rumqttc::v5::Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(ev)) if pred(&ev) => return Ok(ev),
            Ok(Ok(_)) => {}
        }
    }
}

/// Same for a v3.1.1 event loop.
pub async fn poll4<F>(
    el: &mut rumqttc::EventLoop,
    timeout: Duration,
    mut pred: F,
) -> Result<rumqttc::Event, String>
where
    F: FnMut(&rumqttc::Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(ev)) if pred(&ev) => return Ok(ev),
            Ok(Ok(_)) => {}
        }
    }
}

pub fn is_connack5(ev: &rumqttc::v5::Event) -> bool {
    matches!(ev, rumqttc::v5::Event::Incoming(P5::ConnAck(_)))
}

pub fn is_puback5(ev: &rumqttc::v5::Event) -> bool {
    matches!(ev, rumqttc::v5::Event::Incoming(P5::PubAck(_)))
}

pub fn is_connack4(ev: &rumqttc::Event) -> bool {
    matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))
}

pub fn is_puback4(ev: &rumqttc::Event) -> bool {
    matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
}

/// A connected v5 client with the PKI's default client certificate.
pub async fn v5_client(
    port: u16,
    pki: &Pki,
    id: &str,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let opts = client::v5_options(id, port, pki.client_tls_config().unwrap());
    let (c, mut el) = rumqttc::v5::AsyncClient::new(opts, 100);
    poll5(&mut el, T, is_connack5).await.expect("v5 connect");
    (c, el)
}

/// A connected v3.1.1 client with the PKI's default client certificate.
pub async fn v4_client(
    port: u16,
    pki: &Pki,
    id: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let opts = client::v4_options(id, port, pki.client_tls_config().unwrap());
    let (c, mut el) = rumqttc::AsyncClient::new(opts, 100);
    poll4(&mut el, T, is_connack4).await.expect("v4 connect");
    (c, el)
}

/// A TLS client config trusting `trust`'s CA but presenting `identity`'s client certificate.
pub fn mixed_tls(trust: &Pki, identity: &Pki) -> std::sync::Arc<rustls::ClientConfig> {
    tls::client_config(
        &trust.ca_file(),
        Some((&identity.client_cert_file(), &identity.client_key_file())),
    )
    .unwrap()
}
