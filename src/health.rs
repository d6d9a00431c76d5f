//! What the appliance says about itself: the health report, the birth certificate's host facts,
//! certificate expiry and clock state. Pure reads of counters and of the system; publishing is
//! the sink's job.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::outbox::{HeldRow, OutboxError, OutboxGauges, Reader};
use crate::record::rfc3339_us;
use crate::telemetry::Telemetry;

/// Schema of health payloads.
pub const HEALTH_SCHEMA: &str = "siterelay.health.v1";

/// A feed as configured, for birth and health.
#[derive(Debug, Clone, Serialize)]
pub struct FeedInfo {
    /// Feed name.
    pub name: String,
    /// `mllp` or `serial`.
    pub kind: &'static str,
    /// Listen address or device path.
    pub endpoint: String,
    /// Whether the listener uses TLS.
    pub tls: bool,
}

/// Most held records listed one by one in a report (all are counted).
pub const HELD_LISTED: usize = 100;

/// What a report reads from the outbox file (the rest comes from counters).
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    /// Receive time of the oldest pending message that is not held.
    pub oldest_pending_us: Option<i64>,
    /// The first [`HELD_LISTED`] held records, oldest first (no content).
    pub held: Vec<HeldRow>,
    /// Held records per feed.
    pub held_per_feed: Vec<(String, u64)>,
}

impl StoreView {
    /// Read it (off the async threads: this is SQLite).
    pub fn read(r: &Reader) -> Result<StoreView, OutboxError> {
        let mut held = r.held(None, false)?;
        held.truncate(HELD_LISTED);
        Ok(StoreView {
            oldest_pending_us: r.oldest_pending_us()?,
            held,
            held_per_feed: r.held_per_feed()?,
        })
    }
}

/// Static facts the health report needs.
#[derive(Debug, Clone)]
pub struct HealthContext {
    /// Appliance id.
    pub appliance: String,
    /// Process start (wall clock, µs since epoch).
    pub started_at_us: i64,
    /// Process start (monotonic).
    pub started: Instant,
    /// The wall clock reports are stamped with and certificate expiry is measured against (the
    /// outbox's: the system clock but in tests).
    pub clock: crate::clock::Clock,
    /// Counters.
    pub telemetry: Arc<Telemetry>,
    /// Outbox counters.
    pub gauges: Arc<OutboxGauges>,
    /// Configured store cap.
    pub store_max_bytes: u64,
    /// Quarantine's budget within it.
    pub quarantine_max_bytes: u64,
    /// Data directory (disk free).
    pub data_dir: PathBuf,
    /// The MQTT client identity in use (its certificate's and CA's expiry), not the files on
    /// disk: after a renewal that was refused, health still shows the certificate in use.
    pub identity: Option<Arc<crate::sink::identity::ClientIdentity>>,
    /// Configured feeds.
    pub feeds: Vec<FeedInfo>,
    /// `host:port` of the broker.
    pub broker: String,
}

/// The health report (`siterelay.health.v1`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// Always `siterelay.health.v1`.
    pub schema: String,
    /// Appliance id.
    pub appliance: String,
    /// When this report was made (RFC 3339 UTC).
    pub at: String,
    /// Seconds since the process started.
    pub uptime_secs: u64,
    /// Outbox state.
    pub outbox: OutboxHealth,
    /// Per feed.
    pub feeds: Vec<FeedHealth>,
    /// Held records (set aside because they cannot be published; `outbox.held_count` counts
    /// them all), oldest first, at most 100. Empty when none is held.
    #[serde(default)]
    pub held: Vec<HeldHealth>,
    /// Broker connection.
    pub mqtt: MqttHealth,
    /// Free bytes on the data directory's file system.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_free_bytes: Option<u64>,
    /// Resident memory of the process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rss_bytes: Option<u64>,
    /// Days until certificates expire (negative: expired).
    pub certificates: CertHealth,
    /// Clock state.
    pub clock: ClockHealth,
}

/// Outbox section of the health report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxHealth {
    /// Messages waiting for the broker.
    pub pending_count: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Age of the oldest pending message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub oldest_pending_age_secs: Option<f64>,
    /// Records confirmed by the broker since the previous report.
    pub delivered_last_interval: u64,
    /// Bytes the store occupies on disk, counted against the cap: the database's pages in use
    /// (pending and retained delivered messages, quarantine, the duplicate log) and the WAL.
    pub store_bytes: u64,
    /// The cap on `store_bytes` (`store.max_bytes`).
    pub store_max_bytes: u64,
    /// Messages refused because the store, its quarantine budget or the disk was full, since
    /// start.
    pub refused_full: u64,
    /// Bytes kept in quarantine.
    #[serde(default)]
    pub quarantine_bytes: u64,
    /// Quarantine's budget (`store.quarantine_max_bytes`).
    #[serde(default)]
    pub quarantine_max_bytes: u64,
    /// The disk filled up: the space reserve is in use and new messages are refused (`AR`)
    /// until delivered records have been pruned and space given back.
    #[serde(default)]
    pub space_short: bool,
    /// Delivered records pruned before `store.retain_delivered` because space was short or the
    /// store over its cap, since start (retention is a maximum, not a promise).
    #[serde(default)]
    pub pruned_early: u64,
    /// When that last happened.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retention_cut_at: Option<String>,
    /// Held records now (included in `pending_count`): the health flag for "a person must
    /// look at this appliance's held records".
    #[serde(default)]
    pub held_count: u64,
    /// Their bytes (included in `pending_bytes`).
    #[serde(default)]
    pub held_bytes: u64,
    /// Stores found damaged at start and moved aside (`<data_dir>/damaged/`), oldest first, at
    /// most 10; listed until someone deletes their directory. One not yet salvaged makes the
    /// appliance degraded.
    #[serde(default)]
    pub damaged_stores: Vec<DamagedStoreHealth>,
}

/// A damaged store moved aside at start (no message content).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DamagedStoreHealth {
    /// The moved file, on the appliance.
    pub path: String,
    /// When it was moved aside.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub moved_at: Option<String>,
    /// Why it was taken as damaged (SQLite's words).
    pub reason: String,
    /// `siterelay queue salvage` has been run on it (its undelivered messages were exported).
    pub salvaged: bool,
    /// What to run on the appliance.
    pub salvage_hint: String,
    /// Every feed's last `seq` could be read: each feed carried on at its last `seq` + 1. If
    /// false, every feed carried on above `seq_floor`.
    pub seq_complete: bool,
    /// When `seq_complete` is false: every feed's `seq`s in the fresh store are above this
    /// (µs since the epoch when the store was replaced).
    #[serde(default)]
    pub seq_floor: u64,
    /// Each feed seen in the damaged store: the last `seq` read there and the first `seq` of
    /// the fresh store. The `seq`s between that the central side has not received were in the
    /// damaged store (pending there, or never used): they will not arrive.
    #[serde(default)]
    pub feeds: Vec<crate::outbox::damage::FeedResume>,
}

impl DamagedStoreHealth {
    /// From what the data directory holds.
    pub fn from_store(d: &crate::outbox::damage::DamagedStore) -> DamagedStoreHealth {
        let path = d.path.display().to_string();
        DamagedStoreHealth {
            salvage_hint: format!(
                "siterelay queue salvage {path} (docs/operations.md, \"A damaged store\")"
            ),
            path,
            moved_at: d.note.as_ref().map(|n| rfc3339_us(n.moved_at_us)),
            reason: d.note.as_ref().map_or_else(
                || "unknown (damaged.json unreadable)".to_owned(),
                |n| crate::text::bounded(&n.reason).into_owned(),
            ),
            salvaged: d.salvaged.is_some(),
            seq_complete: d.note.as_ref().is_some_and(|n| n.seq_complete),
            seq_floor: d.note.as_ref().map_or(0, |n| n.seq_floor),
            feeds: d.note.as_ref().map(|n| n.feeds.clone()).unwrap_or_default(),
        }
    }
}

/// One held record in the health report: enough to tell "held on the box" from "not arrived
/// yet", and no message content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldHealth {
    /// Feed name.
    pub feed: String,
    /// The record's `seq` (the gap the central side sees).
    pub seq: u64,
    /// The record's `id`.
    pub id: String,
    /// The id `siterelay queue held` commands take (outbox row id).
    pub row: i64,
    /// `too_large`, `refused` or `unbuildable`.
    pub reason: String,
    /// What exactly (sizes and limits, the broker's reason code).
    pub detail: String,
    /// Held since (RFC 3339 UTC).
    pub since: String,
    /// Size of the stored message.
    pub bytes: u64,
}

/// One feed in the health report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedHealth {
    /// Feed name.
    pub name: String,
    /// `mllp`.
    pub kind: String,
    /// `listening` for MLLP feeds (serial: `connected`, `waiting`, `error`).
    pub state: String,
    /// Connections open now.
    pub connected_peers: u64,
    /// Complete frames received since start.
    pub received: u64,
    /// Answers sent since start, by MSA-1 code.
    pub acks: AckCounts,
    /// Resends recognised as duplicates (acknowledged again, not forwarded twice).
    pub duplicates: u64,
    /// Bytes discarded outside frames.
    pub discarded_bytes: u64,
    /// Frames over the size limit.
    pub oversized: u64,
    /// Frames never finished.
    pub incomplete: u64,
    /// Device lines stored cut at `max_message_bytes` (`complete: false`), since start.
    #[serde(default)]
    pub truncated: u64,
    /// Messages answered `AE` and kept in quarantine, since start.
    #[serde(default)]
    pub quarantined: u64,
    /// Messages outside the feed's `accept` list, acknowledged and dropped, since start.
    #[serde(default)]
    pub ignored: u64,
    /// Time of the last stored message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_message_at: Option<String>,
    /// Records of this feed held now (set aside; listed in `held`).
    #[serde(default)]
    pub held: u64,
    /// MLLP: connections closed at once (outside `allow`, over the per-address cap, too many
    /// handshakes, a client certificate not allowed), since start.
    #[serde(default)]
    pub refused_connections: u64,
    /// MLLP: messages answered `AR` because their address was over its rate, since start.
    #[serde(default)]
    pub rate_limited: u64,
    /// Batches answered `AE` for holding more than `max_batch_messages`, since start.
    #[serde(default)]
    pub batches_too_large: u64,
    /// MLLP over TLS: the server certificate presented now.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls_certificate: Option<FeedCertificate>,
}

/// The server certificate an MLLP feed presents now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedCertificate {
    /// Its subject.
    pub subject: String,
    /// End of validity (RFC 3339 UTC).
    pub not_after: String,
    /// Days until then (negative: expired).
    pub days_left: i64,
    /// The last reload refused (the certificate above stayed in use).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reload_error: Option<String>,
}

/// ACK counts by code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct AckCounts {
    /// Accepted.
    pub AA: u64,
    /// Rejected: unusable content.
    pub AE: u64,
    /// Refused: try later.
    pub AR: u64,
}

/// MQTT section of the health report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MqttHealth {
    /// `host:port` of the broker.
    pub broker: String,
    /// Connected now (true whenever a health report is published).
    pub connected: bool,
    /// Successful connections since start.
    pub connects: u64,
    /// Failed attempts or lost connections since start.
    pub connection_failures: u64,
    /// Records published (including resends).
    pub published: u64,
    /// PUBACKs that confirmed delivery.
    pub acked: u64,
    /// PUBACKs with a failure reason code.
    pub refused: u64,
    /// The last connection error, without any message content.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    /// The MQTT packet limit records are held to: the smaller of siterelay's own limit and the
    /// broker's CONNACK Maximum Packet Size (0 before the first connection).
    #[serde(default)]
    pub packet_limit_bytes: u64,
    /// The broker's CONNACK Maximum Packet Size, when it gave one (MQTT 5).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub broker_max_packet_bytes: Option<u64>,
}

/// Certificate expiry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertHealth {
    /// This appliance's client certificate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_days_left: Option<i64>,
    /// The CA certificate the broker must chain to (the earliest expiring one in the file).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ca_days_left: Option<i64>,
}

/// Clock state as the kernel reports it (NTP discipline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockHealth {
    /// The kernel clock is synchronised (NTP or similar); None if unknown.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub synchronized: Option<bool>,
    /// Kernel's maximum error estimate, microseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_error_us: Option<i64>,
    /// Kernel's estimated error, microseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub est_error_us: Option<i64>,
    /// The clock's current offset from its time source as the kernel's discipline sees it
    /// (adjtimex), microseconds; only meaningful while `synchronized`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset_us: Option<i64>,
    /// True when the wall clock is obviously wrong: before 2026-01-01 (this software did not
    /// exist), or before the client certificate's start of validity. Times this appliance
    /// stamps meanwhile (`received_at` of records, `at` of reports) are the clock's reading.
    pub suspect: bool,
    /// Steps of the wall clock the outbox noticed since start (jumps of more than 10 s against
    /// the monotonic clock; its retention stamps were moved with them).
    #[serde(default)]
    pub steps: u64,
    /// The last step: how far the clock jumped (seconds; negative: back).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_step_secs: Option<f64>,
    /// When it was noticed (RFC 3339, after the step).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_step_at: Option<String>,
}

/// Days from now until the certificate(s) in a PEM file expire: the earliest one.
pub fn cert_days_left(path: &Path) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let now = jiff::Timestamp::now().as_second();
    CertificateDer::pem_file_iter(path)
        .ok()?
        .filter_map(|c| c.ok())
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            Some(cert.validity().not_after.timestamp())
        })
        .min()
        .map(|not_after| (not_after - now).div_euclid(86_400))
}

/// The kernel's view of clock synchronisation (adjtimex), when available, with the system
/// clock.
pub fn clock_state(client_cert_not_before: Option<i64>) -> ClockHealth {
    clock_state_at(&crate::clock::Clock::system(), client_cert_not_before)
}

/// [`clock_state`] judged by `clock` (steps are filled in by the report).
pub fn clock_state_at(
    clock: &crate::clock::Clock,
    client_cert_not_before: Option<i64>,
) -> ClockHealth {
    let r = crate::sys::clock_reading();
    let (synchronized, max_error_us, est_error_us, offset_us) = (
        r.map(|r| r.synchronized),
        r.map(|r| r.max_error_us),
        r.map(|r| r.est_error_us),
        r.map(|r| r.offset_us),
    );
    let now = clock.now_secs();
    let cert_start = client_cert_not_before.unwrap_or(0);
    ClockHealth {
        synchronized,
        max_error_us,
        est_error_us,
        offset_us,
        suspect: clock.implausible() || now < cert_start,
        steps: 0,
        last_step_secs: None,
        last_step_at: None,
    }
}

/// Free bytes on the file system holding `path`.
pub fn disk_free(path: &Path) -> Option<u64> {
    crate::sys::fs_free(path)
}

/// Resident set size of this process.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * crate::sys::page_size())
}

/// Host facts for the birth message.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// `PRETTY_NAME` from /etc/os-release.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub os: Option<String>,
    /// Kernel release.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel: Option<String>,
    /// CPU architecture.
    pub arch: &'static str,
    /// Host name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hostname: Option<String>,
    /// The kernel's boot id (new at every boot): two boxes running with one appliance id (a
    /// cloned SD card) show up as births alternating between two boot ids.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub boot_id: Option<String>,
}

/// Read the host facts.
pub fn host_facts() -> HostFacts {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    HostFacts {
        os,
        kernel: read("/proc/sys/kernel/osrelease"),
        arch: std::env::consts::ARCH,
        hostname: read("/proc/sys/kernel/hostname"),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
    }
}

impl HealthContext {
    /// Build a report. `store` comes from the outbox reader; `delivered_last_interval` from the
    /// caller's bookkeeping.
    pub fn report(&self, store: &StoreView, delivered_last_interval: u64) -> Health {
        let oldest_pending_us = store.oldest_pending_us;
        let now_us = self.clock.now_us();
        let now_secs = now_us.div_euclid(1_000_000);
        let in_use = self.identity.as_ref().map(|i| i.current());
        let g = &self.gauges;
        let t = &self.telemetry;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let feeds = self
            .feeds
            .iter()
            .map(|f| {
                let c = t.feed(&f.name);
                let last = ld(&c.last_message_us);
                FeedHealth {
                    name: f.name.clone(),
                    kind: f.kind.to_string(),
                    state: c.port_state().as_str().to_string(),
                    connected_peers: ld(&c.connections_open),
                    received: ld(&c.frames),
                    acks: AckCounts {
                        AA: ld(&c.ack_aa),
                        AE: ld(&c.ack_ae),
                        AR: ld(&c.ack_ar),
                    },
                    duplicates: ld(&c.duplicates),
                    discarded_bytes: ld(&c.discarded_bytes),
                    oversized: ld(&c.oversized),
                    incomplete: ld(&c.incomplete),
                    truncated: ld(&c.truncated),
                    quarantined: ld(&c.quarantined),
                    ignored: ld(&c.ignored),
                    last_message_at: (last > 0).then(|| rfc3339_us(last as i64)),
                    held: store
                        .held_per_feed
                        .iter()
                        .find(|(n, _)| n == &f.name)
                        .map_or(0, |(_, n)| *n),
                    refused_connections: ld(&c.refused_connections),
                    rate_limited: ld(&c.rate_limited),
                    batches_too_large: ld(&c.batches_too_large),
                    tls_certificate: c.tls_certificate().map(|t| FeedCertificate {
                        not_after: rfc3339_us(t.not_after.saturating_mul(1_000_000)),
                        days_left: (t.not_after - now_us / 1_000_000).div_euclid(86_400),
                        subject: t.subject,
                        reload_error: t.reload_error,
                    }),
                }
            })
            .collect();
        let s = &t.sink;
        Health {
            schema: HEALTH_SCHEMA.to_string(),
            appliance: self.appliance.clone(),
            at: rfc3339_us(now_us),
            uptime_secs: self.started.elapsed().as_secs(),
            outbox: OutboxHealth {
                pending_count: ld(&g.pending_count),
                pending_bytes: ld(&g.pending_bytes),
                oldest_pending_age_secs: oldest_pending_us
                    .map(|t| ((now_us - t).max(0) as f64) / 1e6),
                delivered_last_interval,
                store_bytes: ld(&g.store_bytes),
                store_max_bytes: self.store_max_bytes,
                refused_full: ld(&g.refused_full),
                quarantine_bytes: ld(&g.quarantine_bytes),
                quarantine_max_bytes: self.quarantine_max_bytes,
                space_short: g.space_short.load(Ordering::Relaxed),
                pruned_early: ld(&g.pruned_early),
                retention_cut_at: match g.retention_cut_at_us.load(Ordering::Relaxed) {
                    0 => None,
                    t => Some(rfc3339_us(t)),
                },
                held_count: ld(&g.held_count),
                held_bytes: ld(&g.held_bytes),
                damaged_stores: crate::outbox::damage::list(&self.data_dir)
                    .iter()
                    .map(DamagedStoreHealth::from_store)
                    .collect(),
            },
            feeds,
            held: store
                .held
                .iter()
                .map(|h| HeldHealth {
                    feed: h.feed.clone(),
                    seq: h.seq,
                    id: h.record_id.clone(),
                    row: h.row_id,
                    reason: crate::text::bounded(&h.reason).into_owned(),
                    detail: crate::text::bounded(&h.detail).into_owned(),
                    since: rfc3339_us(h.since_us),
                    bytes: h.size,
                })
                .collect(),
            mqtt: MqttHealth {
                broker: self.broker.clone(),
                connected: ld(&s.connected) == 1,
                connects: ld(&s.connects),
                connection_failures: ld(&s.connection_failures),
                published: ld(&s.published),
                acked: ld(&s.acked),
                refused: ld(&s.refused),
                last_error: s.last_error(),
                packet_limit_bytes: ld(&s.packet_limit),
                broker_max_packet_bytes: Some(ld(&s.broker_max_packet)).filter(|&b| b > 0),
            },
            disk_free_bytes: disk_free(&self.data_dir),
            rss_bytes: rss_bytes(),
            certificates: CertHealth {
                client_days_left: in_use.as_ref().map(|i| i.days_left(now_secs)),
                ca_days_left: in_use.as_ref().and_then(|i| i.ca_days_left(now_secs)),
            },
            clock: ClockHealth {
                steps: ld(&g.clock_steps),
                last_step_secs: match g.clock_last_step_us.load(Ordering::Relaxed) {
                    0 => None,
                    d => Some(d as f64 / 1e6),
                },
                last_step_at: match g.clock_last_step_at_us.load(Ordering::Relaxed) {
                    0 => None,
                    t => Some(rfc3339_us(t)),
                },
                ..clock_state_at(&self.clock, in_use.as_ref().map(|i| i.not_before))
            },
        }
    }
}
