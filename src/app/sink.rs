//! The MQTT sink and what it is built from: the client TLS, the channel of reject notices, and
//! how each feed's records are built (its time zone, default character set, normalisation and,
//! for a serial device, the device facts every record carries).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::sink::identity::{ClientIdentity, IdentityFiles};
use tokio::sync::mpsc;

use crate::config::{Config, MllpFeedConfig, SerialConfig, SerialProtocol};
use crate::health::HealthContext;
use crate::hl7::charset::Charset;
use crate::intake::RejectNotice;
use crate::record::{DeviceInfo, FeedRecordSettings, RecordBuilder};
use crate::sink::mqtt::{FleetSettings, MqttSink, SinkSettings};

use super::Shared;

/// The MQTT client's mutual-TLS identity, reloadable (None only with `insecure_plaintext`).
pub(super) fn client_identity(cfg: &Config) -> anyhow::Result<Option<Arc<ClientIdentity>>> {
    if cfg.mqtt.insecure_plaintext {
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) =
        (&cfg.mqtt.ca_file, &cfg.mqtt.cert_file, &cfg.mqtt.key_file)
    else {
        bail!("mqtt.ca_file, cert_file and key_file are required for mutual TLS");
    };
    let id = ClientIdentity::load(IdentityFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })
    .map_err(anyhow::Error::msg)
    .context("MQTT TLS set-up")?;
    Ok(Some(Arc::new(id)))
}

/// Metadata-only notices of rejected messages, from the feeds' receive stages to the sink to
/// publish; both ends are None unless `records.publish_rejects` is on.
pub(super) fn reject_channel(
    cfg: &Config,
) -> (
    Option<mpsc::Sender<RejectNotice>>,
    Option<mpsc::Receiver<RejectNotice>>,
) {
    if cfg.records.publish_rejects {
        let (tx, rx) = mpsc::channel(1024);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    }
}

/// How an MLLP feed's records are built.
pub(super) fn mllp_records(
    f: &MllpFeedConfig,
    timezone: jiff::tz::TimeZone,
    default_charset: Charset,
) -> FeedRecordSettings {
    FeedRecordSettings {
        timezone: timezone.clone(),
        default_charset,
        device: None,
        normalise: f.normalise_options(timezone),
    }
}

/// How a serial port's records are built: its charset is the default, and every record
/// carries the device facts from the config.
pub(super) fn serial_records(
    sc: &SerialConfig,
    timezone: jiff::tz::TimeZone,
    charset: Charset,
) -> FeedRecordSettings {
    FeedRecordSettings {
        timezone: timezone.clone(),
        default_charset: charset,
        normalise: sc.normalise_options(timezone),
        device: Some(DeviceInfo {
            model: sc.model.clone(),
            location: sc.location.clone(),
            asset_tag: sc.asset_tag.clone(),
            protocol: match sc.protocol {
                SerialProtocol::Astm => "astm",
                SerialProtocol::Hl7Mllp => "hl7-mllp",
                SerialProtocol::Lines => "lines",
            },
        }),
    }
}

/// The sink, not yet running: `records` holds each configured feed's record settings.
pub(super) fn build(
    cfg: &Config,
    identity: Option<Arc<ClientIdentity>>,
    records: HashMap<String, FeedRecordSettings>,
    rejects: Option<mpsc::Receiver<RejectNotice>>,
    health: &HealthContext,
    shared: &Shared,
) -> MqttSink {
    let max_packet_bytes = crate::sink::mqtt::packet_limit(cfg.max_message_bytes());
    MqttSink::new(
        SinkSettings {
            mqtt: cfg.mqtt.clone(),
            appliance_id: cfg.appliance_id.clone(),
            identity,
            max_packet_bytes,
            records: RecordBuilder {
                appliance: cfg.appliance_id.clone(),
                organisation: Some(cfg.organisation.clone()),
                include_raw: cfg.records.include_raw,
                feeds: records,
                fallback: FeedRecordSettings {
                    timezone: jiff::tz::TimeZone::get("Europe/London")
                        .unwrap_or(jiff::tz::TimeZone::UTC),
                    default_charset: Charset::Utf8,
                    device: None,
                    normalise: None,
                },
            },
            rejects,
            fleet: FleetSettings {
                health: health.clone(),
                health_interval: cfg.mqtt.health_interval,
                host: crate::health::host_facts(),
                inventories: shared.inventories.clone(),
            },
        },
        shared.outbox.clone(),
        shared.telemetry.clone(),
    )
}
