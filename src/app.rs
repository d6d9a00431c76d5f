//! Wiring: sources -> outbox -> sink, with one shutdown signal.
//!
//! [`Daemon::start`] opens the outbox, builds TLS, binds every listener (so a bad address fails
//! start-up, before READY=1) and spawns the tasks. [`Daemon::stop`] stops the listeners first
//! (in-flight messages finish or are refused `AR`), then the sink, then waits for the outbox
//! writer to commit its last batch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::health::{FeedInfo, HealthContext};
use crate::hl7::charset::Charset;
use crate::hl7::intake::Responder;
use crate::intake::FeedIntake;
use crate::inventory::{FeedInventory, FeedInventoryData};
use crate::outbox::{Outbox, OutboxOptions, SourceKind, WriterThread};
use crate::record::{FeedRecordSettings, RecordBuilder};
use crate::sink::mqtt::{FleetSettings, INVENTORY_KEY, MqttSink, SinkSettings};
use crate::sources::mllp::server::{FeedContext, MllpListener};
use crate::telemetry::Telemetry;

/// The acceptance policy a feed's configuration describes.
fn feed_policy(f: &crate::config::MllpFeedConfig) -> crate::hl7::intake::Policy {
    crate::hl7::intake::Policy {
        accept: f.accept.clone(),
        ignore_unaccepted: f.unaccepted == crate::config::Unaccepted::Ignore,
        processing_ids: f.processing_ids.clone(),
        strict: f.strict,
    }
}

/// How often delivered rows past retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// How long listeners get to finish in-flight messages at shutdown.
const LISTENER_GRACE: Duration = Duration::from_secs(5);

/// A running siterelay.
pub struct Daemon {
    feeds: Vec<(String, SocketAddr)>,
    shutdown: crate::shutdown::Trigger,
    listeners: JoinSet<()>,
    others: JoinSet<()>,
    outbox: Outbox,
    writer: WriterThread,
    telemetry: Arc<Telemetry>,
}

impl Daemon {
    /// Start everything described by `cfg` (already checked by [`crate::config::load`]).
    pub async fn start(cfg: &Config) -> anyhow::Result<Daemon> {
        let tls = if cfg.mqtt.insecure_plaintext {
            None
        } else {
            let (Some(ca), Some(cert), Some(key)) =
                (&cfg.mqtt.ca_file, &cfg.mqtt.cert_file, &cfg.mqtt.key_file)
            else {
                bail!("mqtt.ca_file, cert_file and key_file are required for mutual TLS");
            };
            Some(crate::tls::mqtt_client_config(ca, cert, key).context("MQTT TLS set-up")?)
        };

        let (outbox, writer) = Outbox::open(
            &cfg.outbox_path(),
            OutboxOptions {
                max_bytes: cfg.store.max_bytes,
                retain_delivered: cfg.store.retain_delivered,
                retain_rejected: cfg.store.retain_rejected,
                dedup_keep: cfg
                    .mllp
                    .iter()
                    .map(|f| f.dedup_window)
                    .max()
                    .unwrap_or_default(),
            },
        )
        .context("opening the outbox")?;

        let names: Vec<&str> = cfg
            .mllp
            .iter()
            .map(|f| f.name.as_str())
            .chain(cfg.serial.iter().map(|s| s.name.as_str()))
            .collect();
        let telemetry = Arc::new(Telemetry::new(names.iter().copied()));
        // What each feed has carried, as saved by the previous run.
        let mut saved: std::collections::BTreeMap<String, FeedInventoryData> = outbox
            .reader()
            .ok()
            .and_then(|r| r.meta(INVENTORY_KEY).ok().flatten())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let inventories: Vec<(String, Arc<FeedInventory>)> = names
            .iter()
            .map(|n| {
                let data = saved.remove(*n).unwrap_or_default();
                (n.to_string(), Arc::new(FeedInventory::from_saved(data)))
            })
            .collect();
        let inventory_of = |name: &str| {
            inventories
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| i.clone())
                .expect("an inventory per feed")
        };
        let (shutdown, shutdown_rx) = crate::shutdown::channel();

        // Metadata-only notices of rejected messages, for the sink to publish (if configured).
        let (rejects_tx, rejects_rx) = if cfg.records.publish_rejects {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Identity in acknowledgements built without a usable MSH.
        let responder = || Responder {
            application: "SITERELAY".into(),
            facility: cfg.appliance_id.clone(),
        };
        // Every feed's receive stage, also used by the quarantine retry.
        let mut intakes: HashMap<String, Arc<FeedIntake>> = HashMap::new();
        let mut bound = Vec::new();
        let mut feeds = Vec::new();
        let mut record_feeds = HashMap::new();
        for f in &cfg.mllp {
            let default_charset =
                Charset::from_msh18(&f.default_charset).context("default_charset")?;
            let timezone = jiff::tz::TimeZone::get(&f.timezone).context("timezone")?;
            record_feeds.insert(
                f.name.clone(),
                FeedRecordSettings {
                    timezone: timezone.clone(),
                    default_charset,
                    device: None,
                    normalise: f.normalise_options(timezone),
                },
            );
            let tls = match &f.tls {
                None => None,
                Some(t) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::mllp_server_config(
                        &t.cert_file,
                        &t.key_file,
                        t.client_ca_file.as_deref(),
                    )
                    .with_context(|| format!("TLS for feed {}", f.name))?,
                )),
            };
            let intake = Arc::new(FeedIntake {
                name: Arc::from(f.name.as_str()),
                source_kind: SourceKind::Mllp,
                default_charset,
                responder: responder(),
                counters: telemetry.feed(&f.name),
                inventory: inventory_of(&f.name),
                outbox: outbox.clone(),
                rejects: rejects_tx.clone(),
                policy: feed_policy(f),
                dedup_window: (!f.dedup_window.is_zero()).then_some(f.dedup_window),
            });
            intakes.insert(f.name.clone(), intake.clone());
            let ctx = FeedContext {
                intake,
                max_message_bytes: f.max_message_bytes,
                idle_timeout: f.idle_timeout,
                tls,
            };
            let l = MllpListener::bind(f.listen_addr(), f.max_connections, ctx)
                .await
                .with_context(|| format!("feed {}: cannot listen on {}", f.name, f.listen))?;
            feeds.push((f.name.clone(), l.local_addr()?));
            bound.push(l);
        }

        // Serial ports: settings checked by Config::check; tasks spawned below.
        let mut serial_ctxs = Vec::new();
        for sc in &cfg.serial {
            let charset = Charset::from_msh18(&sc.charset).context("serial charset")?;
            let timezone = jiff::tz::TimeZone::get(&sc.timezone).context("timezone")?;
            record_feeds.insert(
                sc.name.clone(),
                FeedRecordSettings {
                    timezone: timezone.clone(),
                    default_charset: charset,
                    normalise: sc.normalise_options(timezone),
                    device: Some(crate::record::DeviceInfo {
                        model: sc.model.clone(),
                        location: sc.location.clone(),
                        asset_tag: sc.asset_tag.clone(),
                        protocol: match sc.protocol {
                            crate::config::SerialProtocol::Astm => "astm",
                            crate::config::SerialProtocol::Hl7Mllp => "hl7-mllp",
                            crate::config::SerialProtocol::Lines => "lines",
                        },
                    }),
                },
            );
            let counters = telemetry.feed(&sc.name);
            counters.set_port_state(crate::telemetry::PortState::Waiting, None);
            // HL7 over serial takes every type (no `accept` list) and has no duplicate window.
            let intake = Arc::new(FeedIntake {
                name: Arc::from(sc.name.as_str()),
                source_kind: SourceKind::Serial,
                default_charset: charset,
                responder: responder(),
                counters,
                inventory: inventory_of(&sc.name),
                outbox: outbox.clone(),
                rejects: rejects_tx.clone(),
                policy: crate::hl7::intake::Policy::default(),
                dedup_window: None,
            });
            intakes.insert(sc.name.clone(), intake.clone());
            serial_ctxs.push(crate::sources::serial::SerialContext {
                name: Arc::from(sc.name.as_str()),
                cfg: sc.clone(),
                intake,
                store_max_bytes: cfg.store.max_bytes,
            });
        }
        let health = HealthContext {
            appliance: cfg.appliance_id.clone(),
            started_at_us: crate::outbox::now_us(),
            started: std::time::Instant::now(),
            telemetry: telemetry.clone(),
            gauges: outbox.gauges(),
            store_max_bytes: cfg.store.max_bytes,
            data_dir: cfg.data_dir.clone(),
            client_cert: cfg.mqtt.cert_file.clone(),
            ca_file: cfg.mqtt.ca_file.clone(),
            broker: format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
            feeds: cfg
                .mllp
                .iter()
                .zip(&feeds)
                .map(|(f, (_, addr))| FeedInfo {
                    name: f.name.clone(),
                    kind: "mllp",
                    endpoint: addr.to_string(),
                    tls: f.tls.is_some(),
                })
                .chain(cfg.serial.iter().map(|s| FeedInfo {
                    name: s.name.clone(),
                    kind: "serial",
                    endpoint: s.device.display().to_string(),
                    tls: false,
                }))
                .collect(),
        };
        let max_packet_bytes = crate::sink::mqtt::packet_limit(cfg.max_message_bytes());
        let sink = MqttSink::new(
            SinkSettings {
                mqtt: cfg.mqtt.clone(),
                appliance_id: cfg.appliance_id.clone(),
                tls,
                max_packet_bytes,
                records: RecordBuilder {
                    appliance: cfg.appliance_id.clone(),
                    organisation: Some(cfg.organisation.clone()),
                    include_raw: cfg.records.include_raw,
                    feeds: record_feeds,
                    fallback: FeedRecordSettings {
                        timezone: jiff::tz::TimeZone::get("Europe/London")
                            .unwrap_or(jiff::tz::TimeZone::UTC),
                        default_charset: Charset::Utf8,
                        device: None,
                        normalise: None,
                    },
                },
                rejects: rejects_rx,
                fleet: FleetSettings {
                    health: health.clone(),
                    health_interval: cfg.mqtt.health_interval,
                    host: crate::health::host_facts(),
                    inventories,
                },
            },
            outbox.clone(),
            telemetry.clone(),
        );

        let mut listeners = JoinSet::new();
        for l in bound {
            listeners.spawn(l.serve(shutdown_rx.clone()));
        }
        for sc in serial_ctxs {
            listeners.spawn(crate::sources::serial::run(sc, shutdown_rx.clone()));
        }
        let mut others = JoinSet::new();
        others.spawn(crate::status::serve(
            crate::status::socket_path(&cfg.data_dir),
            Arc::new(crate::status::StatusContext {
                health: health.clone(),
                outbox: outbox.clone(),
                intakes,
                responder: responder(),
            }),
            shutdown_rx.clone(),
        ));
        others.spawn(sink.run(shutdown_rx.clone()));
        {
            let outbox = outbox.clone();
            let rx = shutdown_rx.clone();
            others.spawn(async move {
                loop {
                    outbox.prune().await;
                    tokio::select! {
                        _ = tokio::time::sleep(PRUNE_EVERY) => {}
                        _ = rx.requested() => break,
                    }
                }
            });
        }
        info!(
            appliance = %cfg.appliance_id,
            feeds = feeds.len(),
            version = env!("CARGO_PKG_VERSION"),
            "siterelay started"
        );
        Ok(Daemon {
            feeds,
            shutdown,
            listeners,
            others,
            outbox,
            writer,
            telemetry,
        })
    }

    /// Bound address of each feed, in config order.
    pub fn feeds(&self) -> &[(String, SocketAddr)] {
        &self.feeds
    }

    /// Bound address of one feed.
    pub fn addr(&self, feed: &str) -> Option<SocketAddr> {
        self.feeds.iter().find(|(n, _)| n == feed).map(|(_, a)| *a)
    }

    /// Live counters.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// The outbox handle (for stats in tests and tools).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Graceful stop: listeners, then sink, then the outbox writer.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        let listeners = async { while self.listeners.join_next().await.is_some() {} };
        if tokio::time::timeout(LISTENER_GRACE, listeners)
            .await
            .is_err()
        {
            warn!(
                "listeners did not finish in time; aborting them (nothing unacknowledged is lost)"
            );
            self.listeners.abort_all();
        }
        while self.others.join_next().await.is_some() {}
        self.outbox.flush().await;
        drop(self.outbox);
        // Let the writer finish its last transaction off the async threads.
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        info!("siterelay stopped");
    }
}
