//! Ready-made rumqttc options for connecting to a [`TestBroker`](crate::broker::TestBroker) or
//! [`Mosquitto`](crate::mosquitto::Mosquitto) over TLS on `localhost`.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};

/// Packet size limit set on clients made here (both directions): 64 MiB.
pub const CLIENT_MAX_PACKET_SIZE: usize = 64 * 1024 * 1024;

/// MQTT v5 options: host "localhost" (also the TLS server name), given port, clean start,
/// keep alive 5 s, 64 MiB max packet size, TLS with `tls`.
pub fn v5_options(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(client_id, "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_start(true)
        .set_max_packet_size(Some(CLIENT_MAX_PACKET_SIZE as u32));
    o
}

/// MQTT v3.1.1 options: host "localhost" (also the TLS server name), given port, clean
/// session, keep alive 5 s, 64 MiB max packet size, TLS with `tls`.
pub fn v4_options(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_max_packet_size(CLIENT_MAX_PACKET_SIZE, CLIENT_MAX_PACKET_SIZE);
    o
}
