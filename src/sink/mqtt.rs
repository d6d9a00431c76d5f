//! MQTT sink: publishes pending outbox rows as records and marks each one delivered only when
//! *its* PUBACK arrives; and, on the same connection, the appliance's control plane (birth and
//! death, health, inventory, commands: see [`super::control`]).
//!
//! rumqttc's `publish()` returning `Ok` only means the request was queued. To know which record a
//! PUBACK confirms, this module follows the order rumqttc reports: every publish we queue is
//! pushed onto a FIFO; rumqttc emits `Outgoing::Publish(pkid)` for queued publishes in the same
//! order, which binds the front of the FIFO to that packet id; `Incoming::PubAck(pkid)` then names
//! the record. A fresh rumqttc client and event loop are made for every connection (clean
//! session), so rumqttc never replays anything on its own: after a reconnect this module resends
//! every row still pending, oldest first, and nothing is marked delivered without a PUBACK from
//! the connection that carried it.
//!
//! One task owns the event loop (it only polls and forwards events); the session task owns the
//! window of records in flight. With MQTT 5, a PUBACK whose reason code is a failure is not a
//! delivery. **No record blocks another**: a record that cannot be published is *held* (set
//! aside in the outbox, listed in health and by `siterelay queue held`) and the rest flow: one
//! larger than the packet limit of the connection (the smaller of [`packet_limit`] and the
//! broker's CONNACK Maximum Packet Size; checked before publishing, since rumqttc would end the
//! connection over it), one refused with a permanent reason code ([`Refusal::permanent`]), one
//! whose record cannot be built (a panic in the builder included: caught per record). A
//! transient refusal is retried with backoff before any later record of its feed, while other
//! feeds flow ([`super::flow`]).
//!
//! Control messages (status, health, inventory, replies) go through the same FIFO but outside the
//! record window and never through the outbox: they are current state, not data.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{MqttConfig, MqttProtocol};
use crate::health::{HealthContext, HostFacts, StoreView};
use crate::inventory::{FeedInventory, FeedInventoryData};
use crate::outbox::{Hold, HoldOutcome, HoldReason, Outbox, OutboxError, PendingRow, Reader};
use crate::record::{RecordBuilder, rfc3339_us};
use crate::sink::control::{self, Command, Topics};
use crate::sink::flow::{Flow, Origin, Outgoing, Refusal};
use crate::telemetry::Telemetry;

/// Rows read from the outbox per query (also the most records held prefetched).
const FETCH_BATCH: usize = 512;
/// Bytes of raw messages read per query at most (large messages are fetched a few at a time).
const FETCH_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Delivered marks handed to the outbox writer at once.
const MARK_BATCH: usize = 256;
/// Longest wait for outstanding PUBACKs during a clean shutdown.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// Backoff starts here and doubles up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Repeated connection failures are logged at WARN at most this often (DEBUG otherwise).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);
/// A session that stayed up this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How often the session looks for significant changes (peers, backlog, new inventory keys).
const CHANGE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// An early health report (on a significant change) is sent at most this often.
const HEALTH_MIN_GAP: Duration = Duration::from_secs(5);
/// The inventory is republished at least this often, and at most every `INVENTORY_MIN_GAP`.
const INVENTORY_EVERY: Duration = Duration::from_secs(3600);
/// After the broker sent a packet over [`control::MAX_INCOMING_PACKET_BYTES`] (which ends the
/// connection: the stream cannot be read past it), connections go without the command
/// subscription this long, so records keep flowing. An MQTT 5 broker never sends one (the
/// limit is announced at CONNECT); an MQTT 3.1.1 broker cannot be told, and would send a
/// retained one again at every subscription.
pub const COMMANDS_PAUSE_AFTER_OVERSIZED: Duration = Duration::from_secs(600);
const INVENTORY_MIN_GAP: Duration = Duration::from_secs(10);
/// Key of the birth sequence number in the outbox's `meta` table.
const BDSEQ_KEY: &str = "bdseq";
/// Key of the saved inventory in the outbox's `meta` table.
pub const INVENTORY_KEY: &str = "inventory";

/// The fleet-monitoring side of the sink.
pub struct FleetSettings {
    /// Sources of the health report.
    pub health: HealthContext,
    /// Regular health interval.
    pub health_interval: Duration,
    /// Host facts for the birth message.
    pub host: HostFacts,
    /// Live inventory per feed.
    pub inventories: Vec<(String, Arc<FeedInventory>)>,
}

/// What the sink needs at start.
pub struct SinkSettings {
    /// Broker settings.
    pub mqtt: MqttConfig,
    /// This appliance's id (topic level).
    pub appliance_id: String,
    /// The TLS client identity in use (reloaded on SIGHUP and file change; the sink reconnects
    /// when it changes); None only with `insecure_plaintext`.
    pub identity: Option<Arc<super::identity::ClientIdentity>>,
    /// Largest MQTT packet we send or accept.
    pub max_packet_bytes: usize,
    /// Turns rows into records.
    pub records: RecordBuilder,
    /// Birth/death, health, inventory, commands.
    pub fleet: FleetSettings,
    /// Reject notices to publish on `<prefix>/<appliance>/rejects/<feed>` (when configured).
    pub rejects: Option<mpsc::Receiver<crate::intake::RejectNotice>>,
}

/// Events from either protocol version, reduced to what the sink needs.
#[derive(Debug)]
enum SinkEvent {
    /// CONNACK, with the broker's Maximum Packet Size when it gave one (MQTT 5).
    Connected {
        max_packet: Option<u32>,
    },
    Sent {
        pkid: u16,
    },
    Acked {
        pkid: u16,
        failure: Option<Refusal>,
    },
    /// The broker sent DISCONNECT (MQTT 5), with its reason; the connection ends next.
    BrokerDisconnect(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// Our DISCONNECT has been written: the broker will not publish the Last Will.
    Disconnected,
    /// The broker sent a packet larger than we accept (its size); the connection ends next.
    OversizedIncoming(usize),
    Failed(String),
}

enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    fn try_publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        match self {
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .is_ok(),
            Client::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .is_ok(),
        }
    }

    fn try_subscribe(&self, filter: &str) -> bool {
        match self {
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .is_ok(),
            Client::V311(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce).is_ok(),
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|_| ()),
            Client::V311(c) => c.disconnect().await.map_err(|_| ()),
        };
    }
}

/// A publish queued with rumqttc, as the FIFO knows it.
enum Queued {
    Record(Outgoing),
    /// Status, health, inventory, a reject notice or a reply, by topic: nothing to mark when
    /// its PUBACK arrives (the topic names it in a refusal's warning).
    Control(String),
}

/// A replay command being carried out, a chunk at a time (records flagged `"replay": true`).
struct ReplayJob {
    feed: String,
    next_seq: u64,
    remaining: usize,
}

/// Why a session ended.
enum SessionEnd {
    Shutdown,
    /// A new client identity (certificate reload): connect again at once with it.
    Reconnect,
    Failed {
        error: String,
        connected_for: Option<Duration>,
    },
}

/// The MQTT sink task.
pub struct MqttSink {
    settings: SinkSettings,
    outbox: Outbox,
    telemetry: Arc<Telemetry>,
    topics: Topics,
    /// Replays started recently (one at a time, `mqtt.replays_per_hour`), across reconnects.
    replays: std::sync::Mutex<control::ReplayLimit>,
    /// Until when connections skip the command subscription, after the broker sent a packet
    /// over the incoming limit ([`COMMANDS_PAUSE_AFTER_OVERSIZED`]); across reconnects.
    commands_paused_until: std::sync::Mutex<Option<Instant>>,
}

impl MqttSink {
    /// A sink over `outbox`.
    pub fn new(settings: SinkSettings, outbox: Outbox, telemetry: Arc<Telemetry>) -> MqttSink {
        let topics = Topics::new(&settings.mqtt.topic_prefix, &settings.appliance_id);
        let replays =
            std::sync::Mutex::new(control::ReplayLimit::new(settings.mqtt.replays_per_hour));
        MqttSink {
            replays,
            commands_paused_until: std::sync::Mutex::new(None),
            settings,
            outbox,
            telemetry,
            topics,
        }
    }

    /// Run until `shutdown` turns true: connect, publish, reconnect with backoff.
    pub async fn run(mut self, shutdown: crate::shutdown::Shutdown) {
        let mut rejects = self.settings.rejects.take();
        let m = &self.settings.mqtt;
        let mut reader = match self.outbox.reader() {
            Ok(r) => Some(r),
            Err(e) => {
                error!(error = %e, "sink cannot read the outbox");
                return;
            }
        };
        let cap = m.reconnect_max;
        let mut backoff = Backoff::new(BACKOFF_START, cap);
        // Failures in a row, and when one was last logged at WARN (then at most once a minute).
        let mut streak = 0u64;
        let mut last_warned: Option<Instant> = None;
        loop {
            if shutdown.is_requested() {
                break;
            }
            match self.session(&mut reader, &mut rejects, &shutdown).await {
                SessionEnd::Shutdown => break,
                SessionEnd::Reconnect => {
                    self.telemetry.sink.connected.store(0, Ordering::Relaxed);
                    backoff.reset();
                    continue;
                }
                SessionEnd::Failed {
                    error,
                    connected_for,
                } => {
                    let c = &self.telemetry.sink;
                    c.connection_failures.fetch_add(1, Ordering::Relaxed);
                    c.connected.store(0, Ordering::Relaxed);
                    c.set_last_error(&error);
                    if connected_for.is_some_and(|d| d >= STABLE_SESSION) {
                        backoff.reset();
                    }
                    let wait = backoff.next();
                    if connected_for.is_some() {
                        streak = 0;
                        last_warned = None;
                    }
                    streak += 1;
                    let broker = format!("{}:{}", m.host, m.port);
                    let retry_in_ms = wait.as_millis() as u64;
                    if last_warned.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                        last_warned = Some(Instant::now());
                        warn!(
                            broker,
                            error = %error,
                            failures_in_a_row = streak,
                            retry_in_ms,
                            "MQTT connection failed or lost; records stay pending"
                        );
                    } else {
                        debug!(broker, error = %error, failures_in_a_row = streak, retry_in_ms, "MQTT connection failed again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.requested() => break,
                    }
                }
            }
        }
        self.telemetry.sink.connected.store(0, Ordering::Relaxed);
        info!("MQTT sink stopped");
    }

    fn connect(&self, bdseq: i64) -> (Client, mpsc::Receiver<SinkEvent>) {
        let s = &self.settings;
        let m = &s.mqtt;
        let client_id = m.client_id(&s.appliance_id);
        let transport = match &s.identity {
            Some(id) => {
                Transport::tls_with_config(TlsConfiguration::Rustls(id.current().config.clone()))
            }
            None => Transport::Tcp,
        };
        let will = control::death(&s.appliance_id, bdseq, "lost", None);
        let window = m.max_inflight as usize;
        let (tx, rx) = mpsc::channel(window * 2 + 64);
        let client = match m.protocol {
            MqttProtocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, m.host.clone(), m.port);
                o.set_keep_alive(m.keep_alive)
                    .set_clean_start(true)
                    .set_connection_timeout(m.connect_timeout.as_secs())
                    // What we accept (the broker's limit for what we send comes in its CONNACK).
                    .set_max_packet_size(Some(control::MAX_INCOMING_PACKET_BYTES as u32))
                    .set_outgoing_inflight_upper_limit(m.max_inflight)
                    .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        &self.topics.status,
                        will,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ))
                    .set_transport(transport);
                let (client, el) = rumqttc::v5::AsyncClient::new(o, window + 64);
                tokio::spawn(pump_v5(el, tx));
                Client::V5(client)
            }
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, m.host.clone(), m.port);
                o.set_keep_alive(m.keep_alive)
                    .set_clean_session(true)
                    .set_max_packet_size(control::MAX_INCOMING_PACKET_BYTES, s.max_packet_bytes)
                    .set_inflight(m.max_inflight)
                    .set_last_will(rumqttc::LastWill::new(
                        &self.topics.status,
                        will,
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ))
                    .set_transport(transport);
                let (client, mut el) = rumqttc::AsyncClient::new(o, window + 64);
                let mut net = el.network_options();
                net.set_connection_timeout(m.connect_timeout.as_secs());
                el.set_network_options(net);
                tokio::spawn(pump_v311(el, tx));
                Client::V311(client)
            }
        };
        (client, rx)
    }

    /// One connection: control plane plus records through a window of `max_inflight`.
    async fn session(
        &self,
        reader: &mut Option<Reader>,
        rejects: &mut Option<mpsc::Receiver<crate::intake::RejectNotice>>,
        shutdown: &crate::shutdown::Shutdown,
    ) -> SessionEnd {
        // Delivered marks and holds from the previous session must be committed before we read
        // pending rows again, or we would resend records the broker already confirmed.
        self.outbox.flush().await;
        // Rows released from hold until now are pending rows like any other: read below.
        self.outbox.take_released();
        let bdseq = match self.outbox.increment(BDSEQ_KEY).await {
            Ok(v) => v,
            Err(e) => {
                return SessionEnd::Failed {
                    error: format!("cannot record the birth sequence number: {e}"),
                    connected_for: None,
                };
            }
        };
        let (client, mut events) = self.connect(bdseq);
        let counters = &self.telemetry.sink;
        let appliance = &self.settings.appliance_id;
        let fleet = &self.settings.fleet;
        let window = self.settings.mqtt.max_inflight as usize;
        let v5 = self.settings.mqtt.protocol == MqttProtocol::V5;
        let appended = self.outbox.appended();
        let mut connected_at: Option<Instant> = None;
        // The packet limit of this connection (the broker's CONNACK may lower ours).
        let mut limit = PacketLimit::new(self.settings.max_packet_bytes, None);
        // What the broker said when it sent DISCONNECT (MQTT 5), for the error that follows.
        let mut broker_disconnect: Option<String> = None;
        // Queued with rumqttc, waiting for their packet id.
        let mut queued: VecDeque<Queued> = VecDeque::new();
        // Records sent, waiting for PUBACK, by packet id.
        let mut inflight: HashMap<u16, Outgoing> = HashMap::new();
        // Control messages sent and not yet acknowledged.
        // Control messages sent and not yet acknowledged, by packet id: their topics.
        let mut control_inflight: HashMap<u16, String> = HashMap::new();
        // Records read and built, waiting for room in the window, and the feeds set apart by
        // a transient refusal (see `flow.rs`).
        let mut flow = Flow::default();
        let mut caught_up = false;
        let mut replay: Option<ReplayJob> = None;
        // A certificate reload ends this session cleanly and starts one with the new identity.
        let mut identity_changed = self.settings.identity.as_ref().map(|i| {
            let mut rx = i.subscribe();
            rx.mark_unchanged();
            rx
        });
        let mut reconnecting = false;
        let mut delivered: Vec<i64> = Vec::new();
        let mut draining_since: Option<Instant> = None;
        // Send order of in-flight records, for the PUBACK timeout (stale entries skipped lazily).
        let mut sent_order: VecDeque<(u16, i64, Instant)> = VecDeque::new();
        let ack_timeout = self.settings.mqtt.ack_timeout;
        // Fleet bookkeeping.
        let mut health_timer = tokio::time::interval(fleet.health_interval);
        health_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut change_timer = tokio::time::interval(CHANGE_CHECK_EVERY);
        let mut last_health: Option<Instant> = None;
        let mut last_signature = Vec::new();
        let mut delivered_at_last_health = self.outbox.gauges().delivered.load(Ordering::Relaxed);
        let mut last_inventory: Option<Instant> = None;
        let mut inventory_dirty = false;

        // Queue a control publish (outside the record window). One the broker would not take
        // (larger than the packet limit) is dropped, never sent: it would end the connection.
        macro_rules! control {
            ($topic:expr, $payload:expr, $retain:expr) => {{
                let topic: &str = $topic;
                let payload: Vec<u8> = $payload;
                let size = publish_packet_size(topic, payload.len(), v5);
                if size > limit.bytes {
                    warn!(
                        topic,
                        size,
                        limit = limit.bytes,
                        "control message dropped: larger than the MQTT packet limit"
                    );
                } else if client.try_publish(topic, payload, $retain) {
                    queued.push_back(Queued::Control(topic.to_string()));
                } else {
                    warn!(topic, "control message dropped: MQTT request queue full");
                }
            }};
        }

        let end = loop {
            let records_in_window = queued
                .iter()
                .filter(|q| matches!(q, Queued::Record(_)))
                .count()
                + inflight.len();
            // Fill the window while connected.
            if connected_at.is_some() && draining_since.is_none() {
                if let Err(error) = self
                    .refill(reader, &mut flow, &mut caught_up, &mut replay, limit)
                    .await
                {
                    break SessionEnd::Failed {
                        error,
                        connected_for: connected_at.map(|t| t.elapsed()),
                    };
                }
                let now = Instant::now();
                let mut in_window = records_in_window;
                while in_window < window {
                    let Some(o) = flow.next(now) else { break };
                    if !client.try_publish(&o.topic, o.payload.clone(), false) {
                        // The request channel is sized to the window, so this does not happen;
                        // if it did, the record simply waits for the next turn.
                        flow.put_back(o);
                        break;
                    }
                    counters.published.fetch_add(1, Ordering::Relaxed);
                    queued.push_back(Queued::Record(o));
                    in_window += 1;
                }
            }
            // Hand delivered marks to the writer in batches: when many have gathered, or when
            // no further event is waiting (so a quiet link still records deliveries at once).
            if delivered.len() >= MARK_BATCH || (!delivered.is_empty() && events.is_empty()) {
                self.outbox
                    .mark_delivered(std::mem::take(&mut delivered))
                    .await;
            }
            if let Some(since) = draining_since {
                let outstanding = records_in_window + control_inflight.len() + queued.len();
                if outstanding == 0 || since.elapsed() >= SHUTDOWN_DRAIN {
                    // A clean DISCONNECT, so the broker discards the Last Will ("lost"); keep the
                    // event loop running until rumqttc has actually written it.
                    client.disconnect().await;
                    let written = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(ev) = events.recv().await {
                            if matches!(ev, SinkEvent::Disconnected | SinkEvent::Failed(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    if written.is_err() {
                        warn!(
                            "DISCONNECT not confirmed in time; the broker may announce this appliance as lost"
                        );
                    }
                    break if reconnecting {
                        SessionEnd::Reconnect
                    } else {
                        SessionEnd::Shutdown
                    };
                }
            }
            while sent_order
                .front()
                .is_some_and(|(pkid, row, _)| inflight.get(pkid).is_none_or(|o| o.row_id != *row))
            {
                sent_order.pop_front();
            }
            let ack_deadline = sent_order.front().map(|(_, _, t)| *t + ack_timeout);
            let next_retry = flow.next_retry();
            let room = records_in_window < window;
            let connected = connected_at.is_some();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(SinkEvent::Connected { max_packet }) => {
                        counters.connects.fetch_add(1, Ordering::Relaxed);
                        counters.connected.store(1, Ordering::Relaxed);
                        connected_at = Some(Instant::now());
                        limit = PacketLimit::new(self.settings.max_packet_bytes, max_packet);
                        counters.packet_limit.store(limit.bytes as u64, Ordering::Relaxed);
                        counters.broker_max_packet.store(u64::from(max_packet.unwrap_or(0)), Ordering::Relaxed);
                        info!(
                            broker = %format!("{}:{}", self.settings.mqtt.host, self.settings.mqtt.port),
                            bdseq,
                            packet_limit = limit.bytes,
                            broker_max_packet = ?max_packet,
                            "connected to MQTT broker"
                        );
                        control!(&self.topics.status, self.birth_payload(bdseq), true);
                        let paused = *self.commands_paused_until.lock().unwrap_or_else(|e| e.into_inner());
                        if paused.is_some_and(|t| Instant::now() < t) {
                            warn!(
                                topic = %self.topics.commands,
                                "not subscribed to commands on this connection (the broker sent a packet over the incoming limit); records flow, commands resume later"
                            );
                        } else if !client.try_subscribe(&self.topics.commands) {
                            warn!("could not subscribe to commands");
                        }
                        control!(&self.topics.inventory, self.inventory_payload().await, true);
                        last_inventory = Some(Instant::now());
                        let h = self.health_payload(reader, &mut delivered_at_last_health).await;
                        control!(&self.topics.health, h, false);
                        last_health = Some(Instant::now());
                    }
                    Some(SinkEvent::Sent { pkid }) => match queued.pop_front() {
                        Some(Queued::Record(o)) => {
                            sent_order.push_back((pkid, o.row_id, Instant::now()));
                            inflight.insert(pkid, o);
                        }
                        Some(Queued::Control(topic)) => {
                            control_inflight.insert(pkid, topic);
                        }
                        None => {}
                    },
                    Some(SinkEvent::Acked { pkid, failure }) => {
                        if let Some(o) = inflight.remove(&pkid) {
                            match failure {
                                None => {
                                    counters.acked.fetch_add(1, Ordering::Relaxed);
                                    delivered.push(o.row_id);
                                    flow.settled(&o.feed, o.row_id, Instant::now());
                                }
                                Some(r) if r.permanent() => {
                                    counters.refused.fetch_add(1, Ordering::Relaxed);
                                    self.hold_row(&o, HoldReason::Refused, format!("the broker refused it: {}", r.describe())).await;
                                    flow.settled(&o.feed, o.row_id, Instant::now());
                                }
                                Some(r) => {
                                    counters.refused.fetch_add(1, Ordering::Relaxed);
                                    if o.origin == Origin::Replay {
                                        warn!(feed = %o.feed, seq = o.seq, reason = %r.describe(), "broker refused a replayed record; it is not replayed again");
                                    } else {
                                        warn!(feed = %o.feed, seq = o.seq, row = o.row_id, reason = %r.describe(), "broker refused a record for now; it is published again after a backoff, before any later record of its feed");
                                    }
                                    flow.refused(o, Instant::now());
                                }
                            }
                        } else {
                            let topic = control_inflight.remove(&pkid).unwrap_or_default();
                            if let Some(r) = failure {
                                warn!(
                                    topic = %topic,
                                    reason = %r.describe(),
                                    "broker refused a message on {topic}: check the broker's ACL for this topic (docs/broker/siterelay.acl)"
                                );
                            }
                        }
                    }
                    Some(SinkEvent::Message { topic, payload }) => {
                        if let Some(name) = self.topics.command_name(&topic) {
                            let feeds: Vec<String> =
                                fleet.health.feeds.iter().map(|f| f.name.clone()).collect();
                            let req = control::parse_command(name, &payload, &feeds);
                            info!(command = %req.name, ok = req.command.is_ok(), "command received");
                            let result = match &req.command {
                                Err(e) => Err(e.clone()),
                                Ok(Command::Ping) => Ok(serde_json::json!({
                                    "pong": true,
                                    "uptime_secs": fleet.health.started.elapsed().as_secs(),
                                    "bdseq": bdseq,
                                })),
                                Ok(Command::Rebirth) => {
                                    control!(&self.topics.status, self.birth_payload(bdseq), true);
                                    control!(&self.topics.inventory, self.inventory_payload().await, true);
                                    last_inventory = Some(Instant::now());
                                    Ok(serde_json::json!({ "bdseq": bdseq }))
                                }
                                Ok(Command::Health) => {
                                    let h = self.health_payload(reader, &mut delivered_at_last_health).await;
                                    control!(&self.topics.health, h, false);
                                    last_health = Some(Instant::now());
                                    Ok(serde_json::json!({}))
                                }
                                Ok(Command::Replay { feed, from_seq, limit }) => {
                                    let running = replay.as_ref().map(|j| (j.feed.as_str(), j.remaining));
                                    let admitted = self
                                        .replays
                                        .lock()
                                        .map_err(|_| "replay limiter poisoned".to_string())
                                        .and_then(|mut l| l.admit(std::time::Instant::now(), running));
                                    if let Err(why) = admitted {
                                        warn!(feed = %feed, reason = %why, "replay command refused");
                                        Err(why)
                                    } else {
                                    match self.replay_range(reader, feed, *from_seq).await {
                                        Ok((count, first, last)) => {
                                            let n = count.min(*limit as u64);
                                            if n > 0 {
                                                replay = Some(ReplayJob {
                                                    feed: feed.clone(),
                                                    next_seq: first.unwrap_or(*from_seq),
                                                    remaining: n as usize,
                                                });
                                            }
                                            Ok(serde_json::json!({
                                                "feed": feed,
                                                "from_seq": from_seq,
                                                "records": n,
                                                "first_seq": first,
                                                "last_seq": last,
                                            }))
                                        }
                                        Err(e) => Err(format!("cannot read the outbox: {e}")),
                                    }
                                    }
                                }
                            };
                            let now = rfc3339_us(self.outbox.clock().now_us());
                            control!(&self.topics.replies, control::reply(appliance, &req, result, &now), false);
                        }
                    }
                    Some(SinkEvent::BrokerDisconnect(reason)) => broker_disconnect = Some(reason),
                    Some(SinkEvent::Disconnected) => {}
                    Some(SinkEvent::OversizedIncoming(bytes)) => {
                        *self.commands_paused_until.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Instant::now() + COMMANDS_PAUSE_AFTER_OVERSIZED);
                        error!(
                            bytes,
                            limit = control::MAX_INCOMING_PACKET_BYTES,
                            topic = %self.topics.commands,
                            pause_secs = COMMANDS_PAUSE_AFTER_OVERSIZED.as_secs(),
                            "the broker sent a packet over the incoming limit, which ends the connection: \
                             reconnecting without the command subscription for a while so records keep flowing. \
                             A retained message on a command topic is the usual cause: clear it \
                             (mosquitto_pub -r -n -t TOPIC), or use MQTT 5, whose brokers are told the limit"
                        );
                    }
                    Some(SinkEvent::Failed(error)) => break SessionEnd::Failed {
                        error: match broker_disconnect.take() {
                            Some(reason) => format!("{error} (the broker sent DISCONNECT: {reason})"),
                            None => error,
                        },
                        connected_for: connected_at.map(|t| t.elapsed()),
                    },
                    None => break SessionEnd::Failed {
                        error: "event loop ended".into(),
                        connected_for: connected_at.map(|t| t.elapsed()),
                    },
                },
                _ = appended.notified(), if room && connected => caught_up = false,
                notice = recv_opt(rejects), if connected && rejects.is_some() => {
                    if let Some(n) = notice {
                        let topic = format!("{}/{}/rejects/{}", self.settings.mqtt.topic_prefix, appliance, n.feed);
                        let mut v = serde_json::to_value(&n).unwrap_or_default();
                        v["schema"] = "siterelay.reject.v1".into();
                        v["appliance"] = appliance.as_str().into();
                        control!(&topic, serde_json::to_vec(&v).unwrap_or_default(), false);
                    }
                }
                _ = sleep_until_opt(next_retry), if next_retry.is_some() && connected => {}
                _ = sleep_until_opt(ack_deadline), if ack_deadline.is_some() => {
                    break SessionEnd::Failed {
                        error: format!("no PUBACK within {}s: dropping the connection to resend", ack_timeout.as_secs()),
                        connected_for: connected_at.map(|t| t.elapsed()),
                    };
                }
                _ = health_timer.tick(), if connected && draining_since.is_none() => {
                    if last_health.is_none_or(|t| t.elapsed() >= fleet.health_interval / 2) {
                        let h = self.health_payload(reader, &mut delivered_at_last_health).await;
                        control!(&self.topics.health, h, false);
                        last_health = Some(Instant::now());
                    }
                }
                _ = change_timer.tick(), if connected && draining_since.is_none() => {
                    // Safety net for missed notifications, and significant-change detection.
                    caught_up = false;
                    let sig = self.signature();
                    if sig != last_signature && last_health.is_none_or(|t| t.elapsed() >= HEALTH_MIN_GAP) {
                        last_signature = sig;
                        let h = self.health_payload(reader, &mut delivered_at_last_health).await;
                        control!(&self.topics.health, h, false);
                        last_health = Some(Instant::now());
                    }
                    for (_, inv) in &fleet.inventories {
                        inventory_dirty |= inv.take_changed();
                    }
                    let due = last_inventory.is_none_or(|t| t.elapsed() >= INVENTORY_EVERY);
                    let soon = inventory_dirty && last_inventory.is_none_or(|t| t.elapsed() >= INVENTORY_MIN_GAP);
                    if due || soon {
                        inventory_dirty = false;
                        control!(&self.topics.inventory, self.inventory_payload().await, true);
                        last_inventory = Some(Instant::now());
                    }
                }
                Ok(()) = async { match identity_changed.as_mut() { Some(rx) => rx.changed().await, None => std::future::pending().await } }, if draining_since.is_none() => {
                    if connected_at.is_none() {
                        break SessionEnd::Reconnect;
                    }
                    // Let the PUBACKs outstanding now arrive (at most SHUTDOWN_DRAIN), then a
                    // clean DISCONNECT; whatever is unconfirmed stays pending and goes again on
                    // the new connection.
                    info!("reconnecting with the reloaded client certificate");
                    reconnecting = true;
                    draining_since = Some(Instant::now());
                    flow.clear();
                    replay = None;
                }
                _ = shutdown.requested(), if draining_since.is_none() => {
                    if connected_at.is_none() {
                        break SessionEnd::Shutdown;
                    }
                    debug!(outstanding = records_in_window, "publishing shutdown status, waiting briefly for outstanding PUBACKs");
                    let now = rfc3339_us(self.outbox.clock().now_us());
                    control!(&self.topics.status, control::death(appliance, bdseq, "shutdown", Some(&now)), true);
                    // Save what the inventory learned.
                    self.inventory_payload().await;
                    draining_since = Some(Instant::now());
                    flow.clear();
                    replay = None;
                }
            }
        };
        if !delivered.is_empty() {
            self.outbox.mark_delivered(delivered).await;
        }
        end
    }

    /// Read what the window will need next: rows released from hold, the main stream (a
    /// prefetched buffer, so publishing never waits on a database read), the rows of feeds set
    /// apart, and a replay's next chunk. Rows that cannot be published are held here.
    async fn refill(
        &self,
        reader: &mut Option<Reader>,
        flow: &mut Flow,
        caught_up: &mut bool,
        replay: &mut Option<ReplayJob>,
        limit: PacketLimit,
    ) -> Result<(), String> {
        let released = self.outbox.take_released();
        if !released.is_empty() {
            let p = self
                .prepare(reader, limit, Origin::Released, Vec::new(), move |r| {
                    r.pending_rows(&released)
                })
                .await
                .map_err(|e| format!("reading the outbox: {e}"))?;
            self.hold_all(p.holds).await;
            flow.add_released(p.rows);
        }
        if flow.ready_len() < FETCH_BATCH / 2 && !*caught_up {
            let (after, want) = (flow.cursor(), FETCH_BATCH - flow.ready_len());
            let p = self
                .prepare(reader, limit, Origin::Stream, flow.gated(), move |r| {
                    r.pending_after(after, want, FETCH_MAX_BYTES)
                })
                .await
                .map_err(|e| format!("reading the outbox: {e}"))?;
            // Nothing read means caught up (a short read may only mean the byte budget).
            *caught_up = p.last_row.is_none();
            self.hold_all(p.holds).await;
            flow.add_stream(p.rows, p.last_row);
        }
        while let Some((feed, after, upto)) = flow.gate_read() {
            let f = feed.clone();
            let p = self
                .prepare(reader, limit, Origin::Stream, Vec::new(), move |r| {
                    r.pending_of_feed(&f, after, upto, FETCH_BATCH, FETCH_MAX_BYTES)
                })
                .await
                .map_err(|e| format!("reading the outbox: {e}"))?;
            self.hold_all(p.holds).await;
            flow.add_gate_rows(&feed, p.rows, p.last_row, upto);
        }
        if flow.wants_replay()
            && let Some(job) = replay
        {
            let (feed, from, n) = (
                job.feed.clone(),
                job.next_seq,
                job.remaining.min(FETCH_BATCH),
            );
            match self
                .prepare(reader, limit, Origin::Replay, Vec::new(), move |r| {
                    r.feed_rows_from(&feed, from, n)
                })
                .await
            {
                Ok(p) => {
                    let read = p.rows.len() + p.holds.len();
                    if let Some(seq) = p.last_seq {
                        job.next_seq = seq + 1;
                    }
                    job.remaining = job.remaining.saturating_sub(read);
                    if read == 0 || job.remaining == 0 {
                        info!(feed = %job.feed, "replay finished");
                        *replay = None;
                    }
                    self.hold_all(p.holds).await;
                    flow.add_replay(p.rows);
                }
                Err(e) => {
                    warn!(error = %e, "replay stopped: cannot read the outbox");
                    *replay = None;
                }
            }
        }
        Ok(())
    }

    /// Hold rows that cannot be published.
    async fn hold_all(&self, holds: Vec<(Outgoing, HoldReason, String)>) {
        for (o, reason, detail) in holds {
            self.hold_row(&o, reason, detail).await;
        }
    }

    /// Set one row aside (committed before this returns, so no later read returns it) and say
    /// so. Its feed goes on.
    async fn hold_row(&self, o: &Outgoing, reason: HoldReason, detail: String) {
        let (feed, seq, row) = (o.feed.as_str(), o.seq, o.row_id);
        let what = reason.as_str();
        match self
            .outbox
            .hold(Hold {
                row_id: o.row_id,
                reason,
                detail: detail.clone(),
            })
            .await
        {
            Ok(HoldOutcome::Held) => warn!(
                feed,
                seq,
                row,
                reason = what,
                detail,
                "record held: it cannot be published as it is; later records go on (see siterelay queue held)"
            ),
            Ok(HoldOutcome::AlreadyHeld) => {
                warn!(
                    feed,
                    seq,
                    row,
                    reason = what,
                    detail,
                    "held record still cannot be published; it stays held"
                )
            }
            Ok(HoldOutcome::NotPending) => {
                warn!(
                    feed,
                    seq,
                    row,
                    reason = what,
                    detail,
                    "record cannot be published (already delivered: not held)"
                )
            }
            Err(e) => error!(
                feed,
                seq,
                row,
                reason = what,
                error = %e,
                "could not record the hold; the record stays pending and is tried again on the next connection"
            ),
        }
    }

    /// The birth certificate of the connection numbered `bdseq`.
    fn birth_payload(&self, bdseq: i64) -> Vec<u8> {
        let fleet = &self.settings.fleet;
        control::birth(
            &self.settings.appliance_id,
            bdseq,
            &rfc3339_us(fleet.health.started_at_us),
            &fleet.host,
            &fleet.health.feeds,
            &rfc3339_us(self.outbox.clock().now_us()),
        )
    }

    /// What counts as a significant change: peers per feed, backlog empty or not, broker errors,
    /// store-full refusals, the disk running short, delivered records pruned early, records held
    /// or released.
    fn signature(&self) -> Vec<u64> {
        let t = &self.telemetry;
        let mut sig: Vec<u64> = self
            .settings
            .fleet
            .health
            .feeds
            .iter()
            .map(|f| t.feed(&f.name).connections_open.load(Ordering::Relaxed))
            .collect();
        let g = self.outbox.gauges();
        sig.push(u64::from(g.pending_count.load(Ordering::Relaxed) > 0));
        sig.push(g.refused_full.load(Ordering::Relaxed));
        sig.push(u64::from(g.space_short.load(Ordering::Relaxed)));
        sig.push(g.pruned_early.load(Ordering::Relaxed));
        sig.push(g.held_count.load(Ordering::Relaxed));
        sig.push(t.sink.refused.load(Ordering::Relaxed));
        sig
    }

    /// Build a health report (reads the oldest pending time and the held records off the async
    /// threads).
    async fn health_payload(
        &self,
        reader: &mut Option<Reader>,
        delivered_base: &mut u64,
    ) -> Vec<u8> {
        let store = self
            .with_reader(reader, StoreView::read)
            .await
            .unwrap_or_default();
        let delivered = self.outbox.gauges().delivered.load(Ordering::Relaxed);
        let interval = delivered.saturating_sub(*delivered_base);
        *delivered_base = delivered;
        let report = self.settings.fleet.health.report(&store, interval);
        serde_json::to_vec(&report).expect("health serialises")
    }

    /// The inventory payload; also saves the inventory in the outbox.
    async fn inventory_payload(&self) -> Vec<u8> {
        let mut saved = std::collections::BTreeMap::new();
        let mut feeds = serde_json::Map::new();
        for (name, inv) in &self.settings.fleet.inventories {
            let d = inv.snapshot();
            let kind = self
                .settings
                .fleet
                .health
                .feeds
                .iter()
                .find(|f| &f.name == name)
                .map(|f| f.kind)
                .unwrap_or("mllp");
            let format = match self
                .settings
                .records
                .feeds
                .get(name)
                .and_then(|s| s.device.as_ref())
            {
                Some(d) if d.protocol == "astm" => "astm",
                Some(d) if d.protocol == "lines" => "lines",
                _ => "hl7v2",
            };
            feeds.insert(name.clone(), inventory_view(&d, kind, format));
            saved.insert(name.clone(), d);
        }
        if let Ok(text) = serde_json::to_string(&saved) {
            self.outbox.put_meta(INVENTORY_KEY, text).await;
        }
        serde_json::to_vec(&serde_json::json!({
            "schema": control::INVENTORY_SCHEMA,
            "appliance": self.settings.appliance_id,
            "at": rfc3339_us(self.outbox.clock().now_us()),
            "feeds": feeds,
        }))
        .expect("inventory serialises")
    }

    /// Run `f` on the reader off the async threads. A reader lost to a failed task is opened
    /// again on the next use, so one failure never leaves the sink without one.
    async fn with_reader<T: Send + 'static>(
        &self,
        reader: &mut Option<Reader>,
        f: impl FnOnce(&Reader) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, String> {
        let r = match reader.take() {
            Some(r) => r,
            None => self.outbox.reader().map_err(|e| e.to_string())?,
        };
        let (r, result) = tokio::task::spawn_blocking(move || {
            let out = f(&r);
            (r, out)
        })
        .await
        .map_err(|e| format!("reader task failed: {e}"))?;
        *reader = Some(r);
        result.map_err(|e| e.to_string())
    }

    async fn replay_range(
        &self,
        reader: &mut Option<Reader>,
        feed: &str,
        from_seq: u64,
    ) -> Result<(u64, Option<u64>, Option<u64>), String> {
        let feed = feed.to_string();
        self.with_reader(reader, move |r| r.feed_range(&feed, from_seq))
            .await
    }

    /// Read rows with `read` and turn each into a record, or into a hold: a record that cannot
    /// be built (the builder failed or panicked) or that is larger than `limit` as a PUBLISH.
    /// Rows of the feeds in `skip` (set apart: their gate reads them) only count as read.
    async fn prepare(
        &self,
        reader: &mut Option<Reader>,
        limit: PacketLimit,
        origin: Origin,
        skip: Vec<String>,
        read: impl FnOnce(&Reader) -> Result<Vec<PendingRow>, OutboxError> + Send + 'static,
    ) -> Result<Prepared, String> {
        let builder = self.settings.records.clone();
        let prefix = self.settings.mqtt.topic_prefix.clone();
        let appliance = self.settings.appliance_id.clone();
        let v5 = self.settings.mqtt.protocol == MqttProtocol::V5;
        self.with_reader(reader, move |r| {
            read(r).map(|rows| {
                let mut p = Prepared::default();
                for row in &rows {
                    p.last_row = Some(row.row_id);
                    p.last_seq = Some(row.seq);
                    if skip.contains(&row.feed) {
                        continue;
                    }
                    let topic = RecordBuilder::topic(&prefix, &appliance, &row.feed);
                    let out = |topic: String, payload: Vec<u8>| Outgoing {
                        row_id: row.row_id,
                        feed: row.feed.clone(),
                        seq: row.seq,
                        topic,
                        payload,
                        origin,
                    };
                    match builder.try_build(row, origin == Origin::Replay) {
                        Err(e) => {
                            p.holds
                                .push((out(topic, Vec::new()), HoldReason::Unbuildable, e));
                        }
                        Ok(payload) => {
                            let size = publish_packet_size(&topic, payload.len(), v5);
                            if size > limit.bytes {
                                let detail = format!(
                                    "the record is {size} bytes as an MQTT packet; the limit is {} bytes ({})",
                                    limit.bytes,
                                    limit.source()
                                );
                                p.holds
                                    .push((out(topic, Vec::new()), HoldReason::TooLarge, detail));
                            } else {
                                p.rows.push(out(topic, payload));
                            }
                        }
                    }
                }
                p
            })
        })
        .await
    }
}

/// Rows read and turned into records (or into holds), and how far the read went.
#[derive(Default)]
struct Prepared {
    rows: Vec<Outgoing>,
    /// Rows to hold instead (the record's payload left empty), why, and what exactly.
    holds: Vec<(Outgoing, HoldReason, String)>,
    /// Row id and seq of the last row read (published or held).
    last_row: Option<i64>,
    last_seq: Option<u64>,
}

/// The MQTT packet limit of one connection: the smaller of our own and the broker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PacketLimit {
    bytes: usize,
    /// The broker's CONNACK Maximum Packet Size is the smaller.
    broker: bool,
}

impl PacketLimit {
    fn new(own: usize, broker: Option<u32>) -> PacketLimit {
        match broker {
            Some(b) if (b as usize) < own => PacketLimit {
                bytes: b as usize,
                broker: true,
            },
            _ => PacketLimit {
                bytes: own,
                broker: false,
            },
        }
    }

    fn source(self) -> &'static str {
        if self.broker {
            "the broker's Maximum Packet Size"
        } else {
            "siterelay's own limit, from the largest max_message_bytes"
        }
    }
}

/// Our own MQTT packet limit, for messages of up to `max_message_bytes` (the largest any feed or
/// port accepts): JSON escaping can grow control characters six-fold, plus room for the
/// envelope; at most 256 MiB (MQTT's own maximum). Applied to what we send and what we accept.
pub fn packet_limit(max_message_bytes: u64) -> usize {
    max_message_bytes
        .saturating_mul(6)
        .saturating_add(64 * 1024)
        .min(256 * 1024 * 1024) as usize
}

/// Size on the wire of a QoS 1 PUBLISH of `payload` bytes on `topic`, counted as rumqttc counts
/// it against a maximum packet size: fixed header, topic, packet id, and for MQTT 5 an empty
/// property length.
fn publish_packet_size(topic: &str, payload: usize, v5: bool) -> usize {
    let remaining = 2 + topic.len() + 2 + usize::from(v5) + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

/// The published form of one feed's inventory.
fn inventory_view(d: &FeedInventoryData, kind: &str, format: &str) -> serde_json::Value {
    let pairs = |m: &std::collections::BTreeMap<String, u64>| -> Vec<serde_json::Value> {
        m.iter()
            .map(|(k, n)| {
                let (app, fac) = k.split_once('|').unwrap_or((k.as_str(), ""));
                serde_json::json!({ "application": app, "facility": fac, "count": n })
            })
            .collect()
    };
    serde_json::json!({
        "kind": kind,
        "format": format,
        "instruments": d.instruments,
        "test_codes": d.test_codes,
        "messages": d.messages,
        "message_types": d.message_types,
        "versions": d.versions,
        "senders": pairs(&d.senders),
        "receivers": pairs(&d.receivers),
        "charsets": d.charsets,
        "segments": d.segments,
        "average_bytes": d.total_bytes.checked_div(d.messages).unwrap_or(0),
        "largest_bytes": d.largest_bytes,
        "first_seen": (d.first_seen_us > 0).then(|| rfc3339_us(d.first_seen_us)),
        "last_seen": (d.last_seen_us > 0).then(|| rfc3339_us(d.last_seen_us)),
    })
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown is requested (holds no borrow of the watch value across awaits).
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// An MQTT 5 PUBACK reason as a refusal (`None`: delivered).
fn refusal(reason: rumqttc::v5::mqttbytes::v5::PubAckReason) -> Option<Refusal> {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    let code = match reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    };
    Some(Refusal { code })
}

/// Forward rumqttc's events to the session until the connection ends or the session is gone.
/// When the connection ends, rumqttc may already have read packets that arrived with the end
/// (a broker that answers a PUBLISH and closes at once, as Mosquitto 2.0 does after refusing
/// one): those events are still in its queue and are forwarded before the failure, so no
/// PUBACK is lost.
async fn pump_v5(mut el: rumqttc::v5::EventLoop, tx: mpsc::Sender<SinkEvent>) {
    loop {
        // Stop polling (and drop the connection) as soon as the session has ended.
        let polled = tokio::select! {
            p = el.poll() => p,
            _ = tx.closed() => return,
        };
        match polled {
            Ok(ev) => {
                if let Some(ev) = v5_event(ev)
                    && tx.send(ev).await.is_err()
                {
                    return;
                }
            }
            Err(e) => {
                for ev in el.state.events.drain(..).filter_map(v5_event) {
                    let _ = tx.send(ev).await;
                }
                use rumqttc::v5::mqttbytes::Error as E;
                use rumqttc::v5::{ConnectionError as C, StateError as S};
                let oversized = match &e {
                    C::MqttState(S::Deserialization(E::PayloadSizeLimitExceeded {
                        pkt_size,
                        ..
                    })) => Some(*pkt_size),
                    C::MqttState(S::IncomingPacketTooLarge { pkt_size, .. }) => Some(*pkt_size),
                    _ => None,
                };
                if let Some(n) = oversized {
                    let _ = tx.send(SinkEvent::OversizedIncoming(n)).await;
                }
                let _ = tx
                    .send(SinkEvent::Failed(describe(
                        crate::tls::describe_connection_error(&e),
                    )))
                    .await;
                return;
            }
        }
    }
}

fn v5_event(ev: rumqttc::v5::Event) -> Option<SinkEvent> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{Event, Incoming};
    Some(match ev {
        Event::Incoming(Incoming::ConnAck(ack)) => SinkEvent::Connected {
            max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        Event::Incoming(Packet::Disconnect(d)) => {
            SinkEvent::BrokerDisconnect(format!("{:?}", d.reason_code))
        }
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => SinkEvent::Sent { pkid },
        Event::Outgoing(rumqttc::Outgoing::Disconnect) => SinkEvent::Disconnected,
        Event::Incoming(Packet::Publish(p)) => SinkEvent::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
        },
        Event::Incoming(Packet::PubAck(ack)) => SinkEvent::Acked {
            pkid: ack.pkid,
            failure: refusal(ack.reason),
        },
        _ => return None,
    })
}

/// As [`pump_v5`], for MQTT 3.1.1.
async fn pump_v311(mut el: rumqttc::EventLoop, tx: mpsc::Sender<SinkEvent>) {
    loop {
        // Stop polling (and drop the connection) as soon as the session has ended.
        let polled = tokio::select! {
            p = el.poll() => p,
            _ = tx.closed() => return,
        };
        match polled {
            Ok(ev) => {
                if let Some(ev) = v311_event(ev)
                    && tx.send(ev).await.is_err()
                {
                    return;
                }
            }
            Err(e) => {
                for ev in el.state.events.drain(..).filter_map(v311_event) {
                    let _ = tx.send(ev).await;
                }
                if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                    rumqttc::Error::PayloadSizeLimitExceeded(n),
                )) = &e
                {
                    let _ = tx.send(SinkEvent::OversizedIncoming(*n)).await;
                }
                let _ = tx
                    .send(SinkEvent::Failed(describe(
                        crate::tls::describe_connection_error(&e),
                    )))
                    .await;
                return;
            }
        }
    }
}

fn v311_event(ev: rumqttc::Event) -> Option<SinkEvent> {
    use rumqttc::{Event, Incoming, Outgoing};
    Some(match ev {
        Event::Incoming(Incoming::ConnAck(_)) => SinkEvent::Connected { max_packet: None },
        Event::Outgoing(Outgoing::Publish(pkid)) => SinkEvent::Sent { pkid },
        Event::Outgoing(Outgoing::Disconnect) => SinkEvent::Disconnected,
        Event::Incoming(Incoming::Publish(p)) => SinkEvent::Message {
            topic: p.topic.clone(),
            payload: p.payload.to_vec(),
        },
        Event::Incoming(Incoming::PubAck(ack)) => SinkEvent::Acked {
            pkid: ack.pkid,
            failure: None,
        },
        _ => return None,
    })
}

/// The error text plus, for the TLS failures an installer meets, what to check.
fn describe(error: String) -> String {
    let hint = if error.contains("UnknownIssuer") {
        Some("the broker's certificate does not chain to mqtt.ca_file")
    } else if error.contains("NotValidForName") {
        Some("the broker's certificate does not name mqtt.host")
    } else if error.contains("Expired") {
        Some("a certificate has expired (check the appliance's and the broker's, and the clock)")
    } else if error.contains("UnknownCA")
        || error.contains("BadCertificate")
        || error.contains("CertificateRequired")
    {
        Some(
            "the broker does not accept this appliance's client certificate (mqtt.cert_file): is it issued by the CA the broker trusts for clients?",
        )
    } else if error.contains("Connection refused") {
        Some("nothing listens at mqtt.host:mqtt.port")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{error} ({h})"),
        None => error,
    }
}

/// Exponential backoff with jitter: each wait is uniformly drawn from [d/2, d], d doubling up to
/// the cap.
struct Backoff {
    start: Duration,
    cap: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(start: Duration, cap: Duration) -> Backoff {
        let seed = (crate::outbox::now_us() as u64) ^ ((std::process::id() as u64) << 32) | 1;
        Backoff {
            start,
            cap,
            current: start.min(cap),
            rng: seed,
        }
    }

    fn reset(&mut self) {
        self.current = self.start.min(self.cap);
    }

    fn next(&mut self) -> Duration {
        // xorshift64: jitter needs no cryptographic randomness.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let d = self.current;
        let half = d / 2;
        let jitter = half.mul_f64((self.rng % 10_000) as f64 / 10_000.0);
        self.current = (d * 2).min(self.cap);
        half + jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_limit_covers_every_source_a_serial_only_box_included() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "appliance_id = \"box\"\norganisation = \"RXX\"\ndata_dir = \"{}\"\n\
             [mqtt]\nhost = \"localhost\"\ninsecure_plaintext = true\n\
             [[serial]]\nname = \"monitor\"\ndevice = \"/dev/ttyUSB0\"\nprotocol = \"lines\"\n\
             max_message_bytes = \"1 MiB\"\n",
            dir.path().display()
        );
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        assert!(cfg.mllp.is_empty());
        assert_eq!(cfg.max_message_bytes(), 1 << 20);
        let limit = packet_limit(cfg.max_message_bytes());
        // A 1 MiB line whose every byte JSON escapes six-fold, with the record around it.
        assert!(limit >= 6 << 20, "{limit}");
        // The largest of every feed and port counts.
        let with_mllp = text
            + "[[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = \"64 KiB\"\n";
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), &with_mllp).unwrap();
        assert_eq!(cfg.max_message_bytes(), 1 << 20);
        assert_eq!(packet_limit(64 << 20), 256 << 20, "MQTT's own maximum");
    }

    #[test]
    fn a_publish_is_measured_as_rumqttc_measures_it() {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
        for payload in [0usize, 100, 200, 20_000, 3_000_000] {
            let mut p = Publish::new(
                "siterelay/box/records/lab",
                QoS::AtLeastOnce,
                vec![b'x'; payload],
                None,
            );
            p.pkid = 7;
            let mut buf = bytes::BytesMut::new();
            let written = Packet::Publish(p).write(&mut buf, None).unwrap();
            assert_eq!(written, buf.len());
            assert_eq!(
                publish_packet_size("siterelay/box/records/lab", payload, true),
                buf.len()
            );
        }
        let mut p = rumqttc::Publish::new("t/a", rumqttc::QoS::AtLeastOnce, vec![b'x'; 300]);
        p.pkid = 7;
        assert_eq!(publish_packet_size("t/a", 300, false), p.size());
    }

    /// A bug in the record builder (a panic, injected by a test-build hook on a marker) holds that
    /// one record as `unbuildable`; the sink keeps forwarding everything after it, on the same
    /// feed and later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_building_a_record_holds_it_and_the_sink_keeps_forwarding() {
        use crate::record::test_hook::PANIC_MARKER;
        use siterelay_testkit::{BrokerOptions, Pki, Subscriber, TestBroker};
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), "p").unwrap();
        let broker = TestBroker::start(BrokerOptions::from_pki(&pki))
            .await
            .unwrap();
        let mut sub = Subscriber::connect(broker.port(), &pki, None, "siterelay/box/records/#")
            .await
            .unwrap();
        let text = format!(
            "appliance_id = \"box\"\norganisation = \"RXX\"\ndata_dir = \"{data}\"\n\
             [mqtt]\nhost = \"localhost\"\nport = {port}\nca_file = \"{ca}\"\n\
             cert_file = \"{cert}\"\nkey_file = \"{key}\"\nreconnect_max = \"1s\"\n\
             [[mllp]]\nname = \"adt\"\nlisten = \"127.0.0.1:0\"\n",
            data = dir.path().join("data").display(),
            port = broker.port(),
            ca = pki.ca_file().display(),
            cert = pki.client_cert_file().display(),
            key = pki.client_key_file().display(),
        );
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let d = crate::app::Daemon::start(&cfg).await.unwrap();
        let stream = tokio::net::TcpStream::connect(d.addr("adt").unwrap())
            .await
            .unwrap();
        let mut c = crate::client::MllpClient::new(stream);
        let msg = |id: &str, extra: &[u8]| {
            let mut m = format!(
                "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20261130093000||ADT^A01|{id}|P|2.4\rPID|1||123^^^RXX^MR\r"
            )
            .into_bytes();
            m.extend_from_slice(extra);
            m
        };
        let wait = Duration::from_secs(10);
        let mut bad = b"NTE|1||".to_vec();
        bad.extend_from_slice(PANIC_MARKER);
        bad.push(b'\r');
        assert_eq!(c.send(&msg("BAD", &bad), wait).await.unwrap().code, "AA");
        for i in 0..5 {
            assert_eq!(
                c.send(&msg(&format!("OK{i}"), b""), wait)
                    .await
                    .unwrap()
                    .code,
                "AA"
            );
        }
        let got = sub.collect(5, Duration::from_secs(20)).await;
        let seqs: Vec<u64> = got
            .iter()
            .map(|(_, p, _)| {
                serde_json::from_slice::<serde_json::Value>(p).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [2, 3, 4, 5, 6]);
        let held = d.outbox().reader().unwrap().held(None, false).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].seq, held[0].reason.as_str()), (1, "unbuildable"));
        assert!(
            !held[0].detail.contains("PATIENT"),
            "no content in the detail"
        );
        // Still forwarding, on the same connection.
        assert_eq!(c.send(&msg("LATER", b""), wait).await.unwrap().code, "AA");
        let (_, p, _) = sub
            .recv(Duration::from_secs(10))
            .await
            .expect("a later record");
        let r: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            (r["seq"].as_u64(), r["hl7"]["control_id"].as_str()),
            (Some(7), Some("LATER"))
        );
        assert_eq!(self::connects(&d), 1);
        d.stop().await;
    }

    fn connects(d: &crate::app::Daemon) -> u64 {
        d.telemetry().sink.connects.load(Ordering::Relaxed)
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let waits: Vec<_> = (0..6).map(|_| b.next()).collect();
        let bounds = [500u64, 1000, 2000, 4000, 4000, 4000];
        for (w, hi) in waits.iter().zip(bounds) {
            let ms = w.as_millis() as u64;
            assert!(ms >= hi / 2 && ms <= hi, "{ms} not in [{}, {hi}]", hi / 2);
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(500));
    }
}
