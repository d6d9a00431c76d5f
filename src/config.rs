//! Configuration: one TOML file, typed with serde.
//!
//! Every section uses `deny_unknown_fields`, so a misspelt key is an error rather than a
//! silently ignored setting. Defaults live in named functions so that `docs/configuration.md`
//! can point at them. [`parse_all`] reads a file's text, runs every semantic check
//! ([`Config::check`]) and returns all problems at once, each with the line, the key and what to
//! do; a value of the wrong type does not stop it. [`load`] and [`parse`] wrap it for callers
//! that need a usable configuration. `siterelay check-config` and `siterelay run` both go
//! through [`crate::preflight::check_file`], which adds the checks that need the machine (TLS
//! material, the data directory, listeners, serial devices).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::hl7::normalise::NormaliseOptions;
pub use crate::units::{parse_bytes, parse_duration};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/siterelay/siterelay.toml";

/// The whole configuration of one appliance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The organisation this appliance serves, e.g. its ODS code (`RXX`). Copied into every
    /// record so the central side can scope local identifiers (MRNs) by organisation.
    pub organisation: String,
    /// Name of this appliance in MQTT topics and records, e.g. `rfh-edge-01`.
    /// Letters, digits, `-` and `_` only (it becomes a topic level).
    pub appliance_id: String,
    /// Directory holding the outbox database. Created if missing (mode 0700).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The durable outbox.
    #[serde(default)]
    pub store: StoreConfig,
    /// The central MQTT broker.
    pub mqtt: MqttConfig,
    /// What goes into each record.
    #[serde(default)]
    pub records: RecordsConfig,
    /// HL7 v2 feeds received over MLLP, one table per listening address.
    #[serde(default)]
    pub mllp: Vec<MllpFeedConfig>,
    /// Devices and analysers on serial ports, one table per port.
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
}

/// Protocol spoken on a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SerialProtocol {
    /// ASTM E1381 (CLSI LIS1-A) link layer carrying E1394 (LIS2-A2) records.
    #[serde(rename = "astm")]
    Astm,
    /// HL7 v2 in MLLP frames over the serial byte stream; ACKs are written back on the port.
    #[serde(rename = "hl7-mllp")]
    Hl7Mllp,
    /// Line-oriented output: each line (CR, LF or CRLF) is a message, or lines separated by less
    /// than `group_gap_ms` are one message.
    #[serde(rename = "lines")]
    Lines,
}

/// Parity setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Flow control setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// None.
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// One serial port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Feed name (topic level, `seq` key), e.g. `chem-analyser-1`.
    pub name: String,
    /// Device path. Prefer a stable name: `/dev/serial/by-id/...` or a udev symlink.
    pub device: PathBuf,
    /// `astm`, `hl7-mllp` or `lines`.
    pub protocol: SerialProtocol,
    /// Baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits: 5, 6, 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `even` or `odd`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Largest message accepted, in bytes.
    #[serde(default = "default_max_message_bytes", deserialize_with = "de_bytes")]
    pub max_message_bytes: u64,
    /// Longest wait between attempts to reopen a missing or failed port (backoff from 1 s).
    /// Old name: `reopen_max_secs`.
    #[serde(
        default = "default_reopen_max",
        alias = "reopen_max_secs",
        deserialize_with = "de_duration"
    )]
    pub reopen_max: Duration,
    /// Time zone for timestamps without an offset.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Character set of the device's text: `ASCII`, `8859/1`, `8859/15`, `UNICODE UTF-8`,
    /// `windows-1252`.
    #[serde(default = "default_serial_charset")]
    pub charset: String,
    /// ASTM only: accept frames with more than 240 characters of text (logged).
    #[serde(default)]
    pub astm_lenient: bool,
    /// `lines` only: consecutive lines less than this apart form one message (e.g. `"500ms"`).
    /// Absent: every line is a message.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub group_gap: Option<Duration>,
    /// Old name of `group_gap`, an integer of milliseconds. [`parse`] moves it into `group_gap`.
    #[serde(default)]
    group_gap_ms: Option<u64>,
    /// `hl7-mllp` only: as `normalise` of `[[mllp]]` (absent: on).
    #[serde(default)]
    pub normalise: Option<bool>,
    /// `hl7-mllp` only: as `demographics` of `[[mllp]]` (absent: on).
    #[serde(default)]
    pub demographics: Option<bool>,
    /// `hl7-mllp` only: as `nhs_authorities` of `[[mllp]]` (absent: `["NHS", "NHSNBR"]`).
    #[serde(default)]
    pub nhs_authorities: Option<Vec<String>>,
    /// Device model, copied into records.
    #[serde(default)]
    pub model: Option<String>,
    /// Where the device is, copied into records.
    #[serde(default)]
    pub location: Option<String>,
    /// Asset tag, copied into records.
    #[serde(default)]
    pub asset_tag: Option<String>,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `siterelay=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `auto` (no timestamps when running under systemd, i.e. when `JOURNAL_STREAM` is set),
    /// `always` or `never`. Applies to stderr output.
    #[serde(default)]
    pub timestamps: Timestamps,
    /// `auto` (the journal's native protocol, with fields such as `FEED=` and `CONTROL_ID=`,
    /// when running under systemd; stderr otherwise), `stderr` or `journald`.
    #[serde(default)]
    pub output: LogOutput,
}

/// Where log events go.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// journald when `JOURNAL_STREAM` is set and the journal socket is reachable, else stderr.
    #[default]
    Auto,
    /// Plain text lines on stderr.
    Stderr,
    /// journald's native protocol (structured fields); falls back to stderr if unreachable.
    Journald,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            timestamps: Timestamps::default(),
            output: LogOutput::default(),
        }
    }
}

/// Whether log lines carry their own timestamps.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Timestamps {
    /// Timestamps unless `JOURNAL_STREAM` is set (journald adds its own).
    #[default]
    Auto,
    /// Always print timestamps.
    Always,
    /// Never print timestamps.
    Never,
}

/// Outbox settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Cap on the bytes the store occupies on disk: undelivered and retained delivered messages,
    /// quarantine, the duplicate log and the WAL. Delivered messages are pruned first (before
    /// `retain_delivered`) to stay under it; when what is left reaches it, new messages are
    /// refused (`AR`) until the broker drains the backlog. Never overwrites or drops an
    /// undelivered message. Integer bytes or a string such as `"2 GiB"`.
    #[serde(default = "default_store_max_bytes", deserialize_with = "de_bytes")]
    pub max_bytes: u64,
    /// Quarantine's own budget within `max_bytes` (default: a tenth of it). A message that
    /// would be quarantined (`AE`) beyond it is refused (`AR`) instead, so its sender keeps it.
    #[serde(default, deserialize_with = "de_opt_bytes")]
    pub quarantine_max_bytes: Option<u64>,
    /// How long delivered messages are kept (for audit and replay) before pruning. Integer seconds
    /// or a string such as `"7d"`, `"12h"`, `"30m"`.
    #[serde(default = "default_retain_delivered", deserialize_with = "de_duration")]
    pub retain_delivered: Duration,
    /// How long messages answered `AE` are kept in quarantine (`siterelay queue rejected`).
    #[serde(default = "default_retain_rejected", deserialize_with = "de_duration")]
    pub retain_rejected: Duration,
    /// Overwrite deleted rows with zeros (SQLite's `secure_delete = FAST`; the pages they free
    /// leave the file by pruning's vacuum) and truncate the WAL after a prune, so delivered and
    /// expired patient data does not stay in the file. On by default;
    /// `false` only to measure what it costs (docs/performance.md). It does not replace an
    /// encrypted data partition: the file system and the disk may keep old blocks.
    #[serde(default = "default_true")]
    pub secure_delete: bool,
}

impl StoreConfig {
    /// Quarantine's budget: as configured, or a tenth of `max_bytes`.
    pub fn quarantine_budget(&self) -> u64 {
        self.quarantine_max_bytes.unwrap_or(self.max_bytes / 10)
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: default_store_max_bytes(),
            quarantine_max_bytes: None,
            retain_delivered: default_retain_delivered(),
            retain_rejected: default_retain_rejected(),
            secure_delete: true,
        }
    }
}

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 5 (default): PUBACK reason codes tell a refused record from a delivered one.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1, for brokers that do not speak 5.
    #[serde(rename = "3.1.1")]
    V311,
}

/// The central broker and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or IP address. With TLS it must match a name (or IP) in the broker's
    /// certificate.
    pub host: String,
    /// Broker port.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// PEM file with the CA certificate(s) the broker certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file with this appliance's client certificate (chain).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file with this appliance's private key (PKCS#8, PKCS#1 or SEC1). Keep it mode 0600.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// MQTT client id. Default `siterelay-<appliance_id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// First topic level. Records go to `<topic_prefix>/<appliance_id>/records/<feed>`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// `"5"` (default) or `"3.1.1"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// MQTT keep-alive interval.
    /// Old name: `keep_alive_secs`.
    #[serde(
        default = "default_keep_alive",
        alias = "keep_alive_secs",
        deserialize_with = "de_duration"
    )]
    pub keep_alive: Duration,
    /// Time allowed for TCP + TLS + CONNACK.
    /// Old name: `connect_timeout_secs`.
    #[serde(
        default = "default_connect_timeout",
        alias = "connect_timeout_secs",
        deserialize_with = "de_duration"
    )]
    pub connect_timeout: Duration,
    /// Upper bound of the reconnect backoff (exponential with jitter, starting at 0.5 s).
    /// Old name: `reconnect_max_secs`.
    #[serde(
        default = "default_reconnect_max",
        alias = "reconnect_max_secs",
        deserialize_with = "de_duration"
    )]
    pub reconnect_max: Duration,
    /// A PUBACK that has not arrived this long after its PUBLISH marks the connection as broken:
    /// it is dropped and every unconfirmed record is sent again on a new one.
    /// Old name: `ack_timeout_secs`.
    #[serde(
        default = "default_ack_timeout",
        alias = "ack_timeout_secs",
        deserialize_with = "de_duration"
    )]
    pub ack_timeout: Duration,
    /// Time between health reports on `<prefix>/<appliance_id>/health` (also sent on
    /// significant changes, at most every 5 s). Old name: `health_interval_secs`.
    #[serde(
        default = "default_health_interval",
        alias = "health_interval_secs",
        deserialize_with = "de_duration"
    )]
    pub health_interval: Duration,
    /// Records published and not yet acknowledged at any moment (QoS 1 window).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Most `replay` commands started in any hour (one runs at a time); beyond it a replay is
    /// refused with the reason in its reply. 0 turns replay off.
    #[serde(default = "default_replays_per_hour")]
    pub replays_per_hour: u32,
    /// Allow a connection without TLS. For lab use only: a warning is logged at every start.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// Record content switches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// Include the original message text as `raw` in every record.
    #[serde(default = "default_true")]
    pub include_raw: bool,
    /// Publish a metadata-only notice per rejected (`AE`) message to
    /// `<prefix>/<appliance_id>/rejects/<feed>` (no message content).
    #[serde(default)]
    pub publish_rejects: bool,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            include_raw: true,
            publish_rejects: false,
        }
    }
}

/// One HL7 v2 over MLLP feed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpFeedConfig {
    /// Feed name: a topic level and the key of per-feed sequence numbers, e.g. `pas-adt`.
    pub name: String,
    /// Address to listen on, e.g. `0.0.0.0:2575`.
    pub listen: String,
    /// Largest message accepted, in bytes. A larger frame is refused and the connection closed.
    #[serde(default = "default_max_message_bytes", deserialize_with = "de_bytes")]
    pub max_message_bytes: u64,
    /// A connection with no traffic for this long is closed. Old name: `idle_timeout_secs`.
    #[serde(
        default = "default_idle_timeout",
        alias = "idle_timeout_secs",
        deserialize_with = "de_duration"
    )]
    pub idle_timeout: Duration,
    /// Connections served at once on this feed (each takes a slot after its TLS handshake).
    /// When every slot is taken, the connection that has gone longest without completing a
    /// message is closed to admit a new one.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Addresses that may connect, as CIDR blocks or single addresses (IPv4 and IPv6), e.g.
    /// `["10.20.0.0/16", "fd00:1::/64"]`. Any other connection is closed at once, logged
    /// (address only, at most a few lines a minute) and counted (`refused_connections`).
    /// Empty (the default): every address.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Connections one address may hold open at once (handshakes included); beyond it a new
    /// connection from that address is closed at once.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Once a frame's first byte has arrived, the whole frame must arrive within this time, or
    /// the connection is closed (nothing stored, nothing acknowledged: the sender resends).
    #[serde(default = "default_frame_timeout", deserialize_with = "de_duration")]
    pub frame_timeout: Duration,
    /// A TLS handshake must finish within this time; a connection holds no slot until it has.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Messages a second one address may send (a second's worth may come at once); beyond it a
    /// message is answered `AR` ("rate limit ... resend later") without being read. 0 (the
    /// default): no limit.
    #[serde(default)]
    pub peer_messages_per_sec: u32,
    /// Bytes a second one address may send, e.g. `"2 MiB"`; beyond it, `AR` as above. 0 (the
    /// default): no limit.
    #[serde(default, deserialize_with = "de_bytes")]
    pub peer_bytes_per_sec: u64,
    /// Messages one batch frame (`FHS`/`BHS`) may hold; a larger batch is answered `AE` and
    /// nothing of it is stored.
    #[serde(default = "default_max_batch_messages")]
    pub max_batch_messages: usize,
    /// Time zone for HL7 timestamps that carry no offset (IANA name).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Character set assumed when MSH-18 is empty: `ASCII`, `8859/1`, `8859/15`, `UNICODE UTF-8`,
    /// `windows-1252`.
    #[serde(default = "default_charset")]
    pub default_charset: String,
    /// Add normalised clinical sections (patient, visit, event, merge, orders, observations) to
    /// each record. Off: the record carries the header and `raw` only.
    #[serde(default = "default_normalise")]
    pub normalise: bool,
    /// With `normalise`: include names, birth date, death, address and postcode. Off for data
    /// minimisation (identifiers and sex stay).
    #[serde(default = "default_demographics")]
    pub demographics: bool,
    /// Assigning authorities (PID-3.4) that mean "NHS number" (type `NH` always does).
    #[serde(default = "default_nhs_authorities")]
    pub nhs_authorities: Vec<String>,
    /// Message types and trigger events this feed takes, e.g. `["ADT^*", "ORU^R01"]`.
    /// Empty (the default): everything.
    #[serde(default)]
    pub accept: Vec<String>,
    /// What happens to a message outside `accept`: `refuse` (`AR` with ERR 200 or 201, the sender
    /// keeps it) or `ignore` (`AA`, not stored or forwarded, counted).
    #[serde(default)]
    pub unaccepted: Unaccepted,
    /// A message whose sender (MSH-3/4), control id (MSH-10) and content match one stored within
    /// this window is acknowledged again but not forwarded twice. Default 7 days; `0` turns
    /// detection off. At most 31 days.
    #[serde(default = "default_dedup_window", deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// MSH-11 processing ids this feed takes, e.g. `["P"]`; others get `AR` with ERR 202.
    /// Empty (the default): all.
    #[serde(default)]
    pub processing_ids: Vec<String>,
    /// Segments must be separated by CR alone, as the standard says: a message using LF or CRLF
    /// gets `AE` (ERR 100) and is quarantined. Off (the default): LF and CRLF are tolerated.
    #[serde(default)]
    pub strict: bool,
    /// TLS on the listener (optional).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

/// What to do with a message outside a feed's `accept` list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unaccepted {
    /// `AR` with ERR 200 (type) or 201 (event).
    #[default]
    Refuse,
    /// `AA`, dropped and counted.
    Ignore,
}

/// TLS for an MLLP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain presented to senders.
    pub cert_file: PathBuf,
    /// PEM private key for `cert_file`.
    pub key_file: PathBuf,
    /// When set, senders must present a client certificate that chains to this CA.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: the sender certificates allowed on this feed, by subject common
    /// name or DNS subject alternative name (case-insensitive), e.g. `["pas.trust.nhs.uk"]`.
    /// Any other certificate, even from the same CA, is refused. Empty (the default): any
    /// certificate that chains to `client_ca_file`.
    #[serde(default)]
    pub allow_names: Vec<String>,
    /// With `client_ca_file`: a PEM file of CRLs (`-----BEGIN X509 CRL-----`) from that CA; a
    /// sender whose certificate is revoked is refused at the handshake. Reloaded with the
    /// certificate (SIGHUP, or when the file changes).
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
}

fn default_dedup_window() -> Duration {
    // Seven days: a sender that lost an ACK resends within minutes, one restored from a backup
    // within days. The index costs memory (about 50 bytes per message in the window), not
    // throughput (docs/performance.md).
    Duration::from_secs(7 * 86_400)
}
// Per-feed normalisation defaults, the same for `[[mllp]]` and `[[serial]]` HL7 ports: those of
// `NormaliseOptions::default()`, their one home.
fn default_normalise() -> bool {
    true
}
fn default_demographics() -> bool {
    NormaliseOptions::default().demographics
}
fn default_nhs_authorities() -> Vec<String> {
    NormaliseOptions::default().nhs_authorities
}
fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_reopen_max() -> Duration {
    Duration::from_secs(30)
}
fn default_serial_charset() -> String {
    "8859/1".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/siterelay")
}
fn default_log_level() -> String {
    "info".into()
}
fn default_store_max_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}
fn default_retain_delivered() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_retain_rejected() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_mqtt_port() -> u16 {
    8883
}
fn default_topic_prefix() -> String {
    "siterelay".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_max_inflight() -> u16 {
    100
}
fn default_replays_per_hour() -> u32 {
    6
}
fn default_true() -> bool {
    true
}
fn default_max_message_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_connections() -> usize {
    64
}
fn default_max_connections_per_peer() -> usize {
    // A sender that needs more than a few parallel connections is rare; a quarter of the
    // default slots leaves room for three others even if one misbehaves.
    16
}
fn default_frame_timeout() -> Duration {
    // A 4 MiB message on a slow (1 Mbit/s) link takes about 35 s; typical messages take
    // milliseconds. 30 s covers everything short of that and stops a one-byte trickle early.
    Duration::from_secs(30)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
/// Messages one batch frame may hold unless a feed says otherwise (serial ports always).
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 10_000;
fn default_max_batch_messages() -> usize {
    DEFAULT_MAX_BATCH_MESSAGES
}
fn default_timezone() -> String {
    "Europe/London".into()
}
fn default_charset() -> String {
    "UNICODE UTF-8".into()
}

impl MqttConfig {
    /// Client id sent in CONNECT.
    pub fn client_id(&self, appliance_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("siterelay-{appliance_id}"))
    }
}

impl MllpFeedConfig {
    /// The listen address; [`Config::check`] has verified that it parses.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .parse()
            .expect("listen address validated by Config::check")
    }

    /// How this feed's records are normalised (`None`: `normalise = false`); `timezone` is the
    /// feed's `timezone`, resolved.
    pub fn normalise_options(&self, timezone: jiff::tz::TimeZone) -> Option<NormaliseOptions> {
        self.normalise.then(|| NormaliseOptions {
            timezone,
            demographics: self.demographics,
            nhs_authorities: self.nhs_authorities.clone(),
        })
    }
}

impl SerialConfig {
    /// How this port's records are normalised: for `hl7-mllp` as an `[[mllp]]` feed with the
    /// same keys would be (same defaults); `None` for other protocols and with `normalise = false`.
    pub fn normalise_options(&self, timezone: jiff::tz::TimeZone) -> Option<NormaliseOptions> {
        if self.protocol != SerialProtocol::Hl7Mllp
            || !self.normalise.unwrap_or_else(default_normalise)
        {
            return None;
        }
        Some(NormaliseOptions {
            timezone,
            demographics: self.demographics.unwrap_or_else(default_demographics),
            nhs_authorities: self
                .nhs_authorities
                .clone()
                .unwrap_or_else(default_nhs_authorities),
        })
    }
}

impl Config {
    /// Path of the outbox database inside `data_dir`.
    pub fn outbox_path(&self) -> PathBuf {
        self.data_dir.join("outbox.sqlite")
    }

    /// The largest message any source may store: the largest `max_message_bytes` of every
    /// `[[mllp]]` feed and every `[[serial]]` port (0 with no source at all).
    pub fn max_message_bytes(&self) -> u64 {
        self.mllp
            .iter()
            .map(|f| f.max_message_bytes)
            .chain(self.serial.iter().map(|s| s.max_message_bytes))
            .max()
            .unwrap_or(0)
    }

    /// Every semantic check start-up needs, beyond what serde already enforced.
    /// Returns problems keyed by their TOML path so the caller can add line numbers.
    pub fn check(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if !is_topic_safe(&self.appliance_id) {
            p.push(Problem::at(
                "appliance_id",
                "must be 1-64 characters of letters, digits, '-' or '_' (it becomes an MQTT topic level)",
            ));
        }
        check_level(&self.log.level, &mut p);
        let o = &self.organisation;
        if o.trim().is_empty() || o.len() > 64 || o.chars().any(|c| c.is_control()) {
            p.push(Problem::at(
                "organisation",
                "must be a short code such as an ODS code (\"RXX\"), at most 64 characters",
            ));
        }
        if self.store.max_bytes < 1024 * 1024 {
            p.push(Problem::at(
                "store.max_bytes",
                "must be at least 1 MiB (e.g. \"2 GiB\")",
            ));
        }
        if self
            .store
            .quarantine_max_bytes
            .is_some_and(|q| q > self.store.max_bytes)
        {
            p.push(Problem::at(
                "store.quarantine_max_bytes",
                "must not be larger than store.max_bytes (it is a part of it)",
            ));
        }
        self.check_mqtt(&mut p);
        if self.mllp.is_empty() && self.serial.is_empty() {
            p.push(Problem::at(
                "mllp",
                "no feeds configured: add at least one [[mllp]] table (name, listen) or [[serial]] table (name, device, protocol)",
            ));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, f) in self.mllp.iter().enumerate() {
            let at = |k: &str| format!("mllp[{i}].{k}");
            check_feed_name(&f.name, &at("name"), &mut names, &mut p);
            match f.listen.parse::<SocketAddr>() {
                Ok(a) => {
                    if a.port() != 0 && !addrs.insert(a) {
                        p.push(Problem::at(
                            at("listen"),
                            format!("address {a} is used by another feed"),
                        ));
                    }
                }
                Err(_) => p.push(Problem::at(
                    at("listen"),
                    format!(
                        "'{}' is not a socket address: use IP:PORT, e.g. \"0.0.0.0:2575\" or \"[::]:2575\"",
                        f.listen
                    ),
                )),
            }
            check_feed_common(
                &at,
                f.max_message_bytes,
                &f.timezone,
                ("default_charset", &f.default_charset),
                &mut p,
            );
            for (j, pat) in f.accept.iter().enumerate() {
                let (ty, tr) = pat.split_once('^').unwrap_or((pat.as_str(), "*"));
                let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok(ty) || !(tr == "*" || ok(tr)) {
                    p.push(Problem::at(
                        at(&format!("accept[{j}]")),
                        format!("'{pat}' is not TYPE, TYPE^* or TYPE^TRIGGER (e.g. \"ADT^*\", \"ORU^R01\")"),
                    ));
                }
            }
            if f.dedup_window > Duration::from_secs(31 * 86_400) {
                p.push(Problem::at(
                    at("dedup_window"),
                    "must be at most 31 days (\"31d\")",
                ));
            }
            for id in &f.processing_ids {
                if !["P", "T", "D"].contains(&id.as_str()) {
                    p.push(Problem::at(
                        at("processing_ids"),
                        format!("'{id}' is not a processing id: use \"P\", \"T\" or \"D\""),
                    ));
                }
            }
            if f.idle_timeout.is_zero() {
                p.push(Problem::at(
                    at("idle_timeout"),
                    "must be more than 0 (e.g. \"10m\")",
                ));
            }
            if f.max_connections == 0 {
                p.push(Problem::at(at("max_connections"), "must be at least 1"));
            }
            if f.max_connections_per_peer == 0 {
                p.push(Problem::at(
                    at("max_connections_per_peer"),
                    "must be at least 1",
                ));
            }
            if let Err((j, why)) = crate::sources::mllp::allow::AllowList::parse(&f.allow) {
                p.push(Problem::at(at(&format!("allow[{j}]")), why));
            }
            for (k, d) in [
                ("frame_timeout", f.frame_timeout),
                ("handshake_timeout", f.handshake_timeout),
            ] {
                if d.is_zero() {
                    p.push(Problem::at(at(k), "must be more than 0 (e.g. \"30s\")"));
                }
            }
            if f.max_batch_messages == 0 {
                p.push(Problem::at(at("max_batch_messages"), "must be at least 1"));
            }
            if let Some(t) = &f.tls {
                check_pem(
                    &t.cert_file,
                    PemKind::Certs,
                    &format!("mllp[{i}].tls.cert_file"),
                    &mut p,
                );
                check_pem(
                    &t.key_file,
                    PemKind::Key,
                    &format!("mllp[{i}].tls.key_file"),
                    &mut p,
                );
                if let Some(ca) = &t.client_ca_file {
                    check_pem(
                        ca,
                        PemKind::Certs,
                        &format!("mllp[{i}].tls.client_ca_file"),
                        &mut p,
                    );
                }
                if t.client_ca_file.is_none() {
                    for k in [
                        (!t.allow_names.is_empty()).then_some("allow_names"),
                        t.crl_file.is_some().then_some("crl_file"),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        p.push(Problem::at(
                            format!("mllp[{i}].tls.{k}"),
                            "needs tls.client_ca_file (senders present certificates only when it is set)",
                        ));
                    }
                }
                if let Some(crl) = &t.crl_file
                    && let Err(e) = crate::tls::load_crls(crl)
                {
                    p.push(Problem::at(
                        format!("mllp[{i}].tls.crl_file"),
                        e.to_string(),
                    ));
                }
            }
        }
        self.check_serial(&mut names, &mut p);
        p
    }

    fn check_serial(&self, names: &mut HashSet<String>, p: &mut Vec<Problem>) {
        let mut devices = HashSet::new();
        for (i, s) in self.serial.iter().enumerate() {
            let at = |k: &str| format!("serial[{i}].{k}");
            check_feed_name(&s.name, &at("name"), names, p);
            if !s.device.is_absolute() {
                p.push(Problem::at(
                    at("device"),
                    "must be an absolute path, e.g. \"/dev/serial/by-id/usb-FTDI_...-if00-port0\"",
                ));
            } else if !devices.insert(s.device.clone()) {
                p.push(Problem::at(
                    at("device"),
                    "is used by another [[serial]] table",
                ));
            }
            if s.baud == 0 || s.baud > 4_000_000 {
                p.push(Problem::at(
                    at("baud"),
                    "must be a baud rate such as 9600 or 115200",
                ));
            }
            if !(5..=8).contains(&s.data_bits) {
                p.push(Problem::at(at("data_bits"), "must be 5, 6, 7 or 8"));
            }
            if !(1..=2).contains(&s.stop_bits) {
                p.push(Problem::at(at("stop_bits"), "must be 1 or 2"));
            }
            check_feed_common(
                &at,
                s.max_message_bytes,
                &s.timezone,
                ("charset", &s.charset),
                p,
            );
            if s.reopen_max.is_zero() {
                p.push(Problem::at(
                    at("reopen_max"),
                    "must be more than 0 (e.g. \"30s\")",
                ));
            }
            if s.group_gap.is_some() && s.protocol != SerialProtocol::Lines {
                p.push(Problem::at(
                    at("group_gap"),
                    "applies to protocol = \"lines\" only",
                ));
            }
            if s.protocol != SerialProtocol::Hl7Mllp {
                let given = [
                    ("normalise", s.normalise.is_some()),
                    ("demographics", s.demographics.is_some()),
                    ("nhs_authorities", s.nhs_authorities.is_some()),
                ];
                for (key, _) in given.iter().filter(|(_, g)| *g) {
                    p.push(Problem::at(
                        at(key),
                        "applies to protocol = \"hl7-mllp\" only: remove it from this port",
                    ));
                }
            }
            if s.astm_lenient && s.protocol != SerialProtocol::Astm {
                p.push(Problem::at(
                    at("astm_lenient"),
                    "applies to protocol = \"astm\" only",
                ));
            }
        }
    }

    fn check_mqtt(&self, p: &mut Vec<Problem>) {
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            p.push(Problem::at("mqtt.host", "must name the broker host"));
        }
        if m.port == 0 {
            p.push(Problem::at("mqtt.port", "must be 1-65535"));
        }
        if !is_topic_safe(&m.topic_prefix) {
            p.push(Problem::at(
                "mqtt.topic_prefix",
                "must be letters, digits, '-' or '_' (one topic level)",
            ));
        }
        if m.max_inflight == 0 {
            p.push(Problem::at("mqtt.max_inflight", "must be at least 1"));
        }
        if m.keep_alive < Duration::from_secs(5) {
            p.push(Problem::at("mqtt.keep_alive", "must be at least 5s"));
        }
        // MQTT counts these in whole seconds.
        for (key, d) in [
            ("keep_alive", m.keep_alive),
            ("connect_timeout", m.connect_timeout),
        ] {
            if d.subsec_nanos() != 0 {
                p.push(Problem::at(
                    format!("mqtt.{key}"),
                    "must be whole seconds (e.g. \"10s\")",
                ));
            }
        }
        if m.health_interval < Duration::from_secs(5) {
            p.push(Problem::at("mqtt.health_interval", "must be at least 5s"));
        }
        if m.ack_timeout.is_zero() {
            p.push(Problem::at(
                "mqtt.ack_timeout",
                "must be more than 0 (e.g. \"60s\")",
            ));
        }
        if m.reconnect_max.is_zero() {
            p.push(Problem::at(
                "mqtt.reconnect_max",
                "must be more than 0 (e.g. \"30s\")",
            ));
        }
        let files = [
            ("ca_file", &m.ca_file, PemKind::Certs),
            ("cert_file", &m.cert_file, PemKind::Certs),
            ("key_file", &m.key_file, PemKind::Key),
        ];
        for (key, file, kind) in files {
            match file {
                Some(path) => check_pem(path, kind, &format!("mqtt.{key}"), p),
                None if !m.insecure_plaintext => p.push(Problem::at(
                    format!("mqtt.{key}"),
                    format!(
                        "is required for mutual TLS: set {key} = \"/etc/siterelay/...\" (plaintext MQTT needs insecure_plaintext = true)"
                    ),
                )),
                None => {}
            }
        }
    }
}

/// A feed name must be a topic level and unique across [[mllp]] and [[serial]].
fn check_feed_name(name: &str, key: &str, names: &mut HashSet<String>, p: &mut Vec<Problem>) {
    if !is_topic_safe(name) {
        p.push(Problem::at(
            key,
            "must be 1-64 characters of letters, digits, '-' or '_' (it becomes an MQTT topic level)",
        ));
    } else if !names.insert(name.to_string()) {
        p.push(Problem::at(
            key,
            format!("feed name '{name}' is used twice: names must be unique across [[mllp]] and [[serial]]"),
        ));
    }
}

/// Checks every kind of feed shares: size limit, time zone, character set.
fn check_feed_common(
    at: &dyn Fn(&str) -> String,
    max_message_bytes: u64,
    timezone: &str,
    (charset_key, charset): (&str, &str),
    p: &mut Vec<Problem>,
) {
    if !(1024..=64 * 1024 * 1024).contains(&max_message_bytes) {
        p.push(Problem::at(
            at("max_message_bytes"),
            "must be between 1 KiB and 64 MiB",
        ));
    }
    if jiff::tz::TimeZone::get(timezone).is_err() {
        p.push(Problem::at(
            at("timezone"),
            format!("unknown time zone '{timezone}': use an IANA name such as \"Europe/London\" or \"UTC\""),
        ));
    }
    if crate::hl7::charset::Charset::from_msh18(charset).is_none() {
        p.push(Problem::at(
            at(charset_key),
            "must be one of \"ASCII\", \"8859/1\", \"8859/15\", \"UNICODE UTF-8\", \"windows-1252\"",
        ));
    }
}

fn check_level(level: &str, p: &mut Vec<Problem>) {
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        p.push(Problem::at(
            "log.level",
            format!("'{level}' is not a valid filter: use error, warn, info, debug or trace"),
        ));
    }
}

/// True for a non-empty string of `[A-Za-z0-9_-]` at most 64 long.
pub fn is_topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Clone, Copy)]
enum PemKind {
    Certs,
    Key,
}

/// The largest PEM file read (a certificate chain or a key is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A PEM file's bytes: a regular file (a device such as `/dev/zero` would be read until memory
/// runs out, a FIFO would block for ever) of at most [`MAX_PEM_BYTES`].
pub(crate) fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let m = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file (a PEM file is expected)".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "larger than {} KiB: not a certificate or key file",
            MAX_PEM_BYTES / 1024
        ));
    }
    Ok(bytes)
}

fn check_pem(path: &Path, kind: PemKind, key: &str, p: &mut Vec<Problem>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bytes = match read_pem_file(path) {
        Ok(b) => b,
        Err(e) => {
            p.push(Problem::at(
                key,
                format!(
                    "cannot read '{}': {} (check the path and that the siterelay user may read it)",
                    path.display(),
                    e
                ),
            ));
            return;
        }
    };
    let ok = match kind {
        PemKind::Certs => CertificateDer::pem_slice_iter(&bytes).any(|c| c.is_ok()),
        PemKind::Key => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if !ok {
        let what = match kind {
            PemKind::Certs => "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            PemKind::Key => "a PEM private key (-----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY)",
        };
        p.push(Problem::at(
            key,
            format!("'{}' does not contain {what}", path.display()),
        ));
    }
}

/// One configuration problem, located by TOML key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `mllp[0].listen`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
    /// 1-based line in the file, when it could be found.
    pub line: Option<usize>,
}

impl Problem {
    fn at(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            message: message.into(),
            line: None,
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug)]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// Problems, in file order where lines are known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pr) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match pr.line {
                Some(l) => write!(f, "{}:{}: ", self.file.display(), l)?,
                None => write!(f, "{}: ", self.file.display())?,
            }
            if pr.key.is_empty() {
                write!(f, "{}", pr.message)?;
            } else {
                write!(f, "{}: {}", pr.key, pr.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Warnings that do not stop start-up (e.g. file permissions).
pub fn warnings(path: &Path, cfg: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut w = Vec::new();
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o002 != 0
    {
        w.push(format!(
            "{} is world-writable: anyone on this box could redirect patient data (chmod o-w)",
            path.display()
        ));
    }
    if let Some(k) = &cfg.mqtt.key_file
        && std::fs::metadata(k).is_ok()
        && let Err(e) = crate::sink::identity::check_key_mode(k)
    {
        w.push(format!("start-up will refuse this: {e}"));
    }
    for (i, f) in cfg.mllp.iter().enumerate() {
        let open = f
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        if open && f.allow.is_empty() && f.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none()) {
            w.push(format!(
                "mllp[{i}] ({}) listens on {} with no allow list and no client certificates: anyone who can reach the port can inject clinical messages (set allow = [\"<the senders' addresses>/32\", ...])",
                f.name, f.listen
            ));
        }
    }
    if cfg.mqtt.insecure_plaintext {
        w.push("mqtt.insecure_plaintext = true: records leave this box unencrypted and the broker is not authenticated".into());
    }
    for (i, s) in cfg.serial.iter().enumerate() {
        if let Some(gap) = s.group_gap
            && gap >= Duration::from_secs(60)
        {
            w.push(format!(
                "serial[{i}].group_gap is {}: lines that far apart form one message (a bare number is seconds; \"{}ms\" is milliseconds)",
                crate::units::human_duration(gap),
                gap.as_secs()
            ));
        }
    }
    w
}

/// Read, parse and check a configuration file. The one function both `run` and `check-config` use.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem::at(
            "",
            format!("cannot read the configuration file: {e}"),
        )],
    })?;
    parse(path, &text)
}

/// Parse and check configuration text; `path` is used in messages only.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    match parse_all(text) {
        (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
        (_, problems) => Err(ConfigError {
            file: path.to_path_buf(),
            problems,
        }),
    }
}

/// Every problem in configuration text, each with its line, and the configuration as far as it
/// could be read (`None` when the text is not TOML, a key is given under both its names, or a
/// required key is missing). A value of the wrong type does not stop the reading: the problem is
/// recorded, the key is read as if absent (its default) and the rest of the file is read, so one
/// run lists every problem. Semantic checks ([`Config::check`]) run on what was read, except on
/// keys that were themselves wrong.
pub fn parse_all(text: &str) -> (Option<Config>, Vec<Problem>) {
    let conflicts = alias_conflicts(text);
    if !conflicts.is_empty() {
        return (None, conflicts);
    }
    let mut problems = Vec::new();
    // Keys blanked out after a type error, or given a placeholder when missing, as dotted
    // paths: their own checks are not repeated.
    let mut blanked: Vec<String> = Vec::new();
    // Lines (of `work`) holding a placeholder for a missing key; later lines are one further
    // down in `work` than in `text` for each.
    let mut inserted: Vec<usize> = Vec::new();
    let mut work = text.to_string();
    let mut cfg: Option<Config> = None;
    // Each round removes one wrong key; a file has far fewer keys than this.
    for _ in 0..200 {
        let e = match toml::from_str::<Config>(&work) {
            Ok(c) => {
                cfg = Some(c);
                break;
            }
            Err(e) => e,
        };
        let at = e.span().map(|s| s.start);
        let line_in_text = |at: usize, inserted: &[usize]| {
            let l = line_of(&work, at);
            l - inserted.iter().filter(|&&i| i < l).count()
        };
        if let Some(field) = missing_field(e.message()) {
            // A required key is missing: report it (unless it was blanked for its type) and
            // read on with a placeholder string after the table's header.
            let (table, header_line) = match at {
                Some(at) => (table_path_at(&work, at), Some(line_of(&work, at))),
                None => (String::new(), None),
            };
            let key = if table.is_empty() {
                field.to_string()
            } else {
                format!("{table}.{field}")
            };
            if !blanked.contains(&key) {
                problems.push(Problem {
                    key: key.clone(),
                    message: "is required: add it (see docs/configuration.md)".into(),
                    line: at.map(|at| line_in_text(at, &inserted)),
                });
                blanked.push(key.clone());
            } else if inserted_for(&work, &inserted, field) {
                break; // a placeholder already failed for it
            }
            let (pos, new_line) = match header_line.filter(|_| !table.is_empty()) {
                Some(l) => {
                    let start = at.unwrap_or(0);
                    let eol = work[start..]
                        .find('\n')
                        .map_or(work.len(), |i| start + i + 1);
                    (eol, l + 1)
                }
                None => (0, 1),
            };
            let mut ins = format!("{field} = \"\"\n");
            if pos == work.len() && !work.ends_with('\n') {
                ins.insert(0, '\n');
            }
            work.insert_str(pos, &ins);
            for i in &mut inserted {
                if *i >= new_line {
                    *i += 1;
                }
            }
            inserted.push(new_line);
            continue;
        }
        let key = at.and_then(|at| key_at(&work, at)).unwrap_or_default();
        if !key.is_empty() && blanked.contains(&key) {
            // The placeholder of a missing key is of the wrong kind: a choice takes its first
            // name ("unknown variant ``, expected one of `astm`, ..."); anything else stops.
            let first = e
                .message()
                .split_once("expected one of `")
                .and_then(|(_, rest)| rest.split('`').next());
            let field = key.rsplit('.').next().unwrap_or(&key);
            let empty = format!("{field} = \"\"");
            match (first, at) {
                (Some(v), Some(at))
                    if work[at..].starts_with(&empty)
                        || work[..at].ends_with(&format!("{field} = ")) =>
                {
                    let start = work[..at].rfind('\n').map_or(0, |i| i + 1);
                    let end = work[start..].find('\n').map_or(work.len(), |i| start + i);
                    if work[start..end] != empty {
                        break;
                    }
                    work.replace_range(start..end, &format!("{field} = \"{v}\""));
                    continue;
                }
                _ => break,
            }
        }
        problems.push(Problem {
            key: key.clone(),
            message: describe_toml_error(&e, &key),
            line: at.map(|at| line_in_text(at, &inserted)),
        });
        // Blank the key's lines (keeping every line number) and read again.
        match at.and_then(|at| blank_key(&work, at)) {
            Some(next) if !key.is_empty() && next != work => {
                blanked.push(key);
                work = next;
            }
            _ => break,
        }
    }
    // A placeholder only lets the reading go on: the configuration it gives is checked but
    // not returned.
    let placeholders = !inserted.is_empty();
    let Some(mut cfg) = cfg else {
        problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        return (None, problems);
    };
    for s in &mut cfg.serial {
        if let Some(ms) = s.group_gap_ms.take() {
            s.group_gap = Some(Duration::from_millis(ms));
        }
    }
    for mut pr in cfg.check() {
        let (line, key) = place(text, &pr.key);
        if blanked.iter().any(|b| *b == key || *b == pr.key) {
            continue;
        }
        pr.line = line;
        pr.key = key;
        problems.push(pr);
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    (if placeholders { None } else { Some(cfg) }, problems)
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .trim()
        .strip_prefix("missing field `")?
        .split('`')
        .next()
}

/// True when a placeholder line for `field` was already inserted.
fn inserted_for(work: &str, inserted: &[usize], field: &str) -> bool {
    let want = format!("{field} = \"\"");
    work.lines()
        .enumerate()
        .any(|(i, l)| inserted.contains(&(i + 1)) && l == want)
}

/// The dotted path (`mqtt`, `mllp[1]`, `mllp[1].tls`) of the table whose header is on the line
/// of byte `offset`; empty for the top level.
fn table_path_at(text: &str, offset: usize) -> String {
    use toml::de::{DeTable, DeValue};
    let line = line_of(text, offset);
    fn find(t: &DeTable<'_>, text: &str, line: usize, path: &str) -> Option<String> {
        t.iter().find_map(|(k, v)| {
            let here = if path.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{path}.{}", k.get_ref())
            };
            match v.get_ref() {
                DeValue::Table(inner) => {
                    if line_of(text, k.span().start) == line {
                        Some(here.clone())
                    } else {
                        find(inner, text, line, &here)
                    }
                }
                DeValue::Array(a) => {
                    a.iter()
                        .enumerate()
                        .find_map(|(i, item)| match item.get_ref() {
                            DeValue::Table(inner) => {
                                let p = format!("{here}[{i}]");
                                if line_of(text, item.span().start) == line {
                                    Some(p)
                                } else {
                                    find(inner, text, line, &p)
                                }
                            }
                            _ => None,
                        })
                }
                _ => None,
            }
        })
    }
    DeTable::parse(text)
        .ok()
        .and_then(|d| find(d.get_ref(), text, line, ""))
        .unwrap_or_default()
}

/// The text with the key/value pair that holds byte `offset` replaced by blank lines (every
/// other line keeps its number); `None` when no pair holds it.
fn blank_key(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn in_table(t: &DeTable<'_>, offset: usize) -> Option<std::ops::Range<usize>> {
        t.iter().find_map(|(k, v)| {
            let whole = k.span().start..v.span().end.max(k.span().end);
            match v.get_ref() {
                // A whole table is never blanked: its keys would fall into the table before it.
                DeValue::Table(inner) => in_table(inner, offset),
                DeValue::Array(a) => a
                    .iter()
                    .find_map(|item| match item.get_ref() {
                        DeValue::Table(inner) => in_table(inner, offset),
                        _ => None,
                    })
                    .or_else(|| {
                        let of_tables = a
                            .iter()
                            .any(|item| matches!(item.get_ref(), DeValue::Table(_)));
                        (!of_tables && whole.contains(&offset)).then_some(whole)
                    }),
                _ => whole.contains(&offset).then_some(whole),
            }
        })
    }
    let doc = DeTable::parse(text).ok()?;
    let range = in_table(doc.get_ref(), offset)?;
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..range.start]);
    out.extend(text[range.clone()].chars().filter(|&c| c == '\n'));
    out.push_str(&text[range.end..]);
    Some(out)
}

/// Keys renamed after 0.1, when every duration took the same `"30s"`/`"10m"`/`"7d"` form, as
/// (table, old name, current name). The old names still work and are documented in
/// docs/configuration.md: an old `*_secs` key takes the same values as its new one (an integer
/// is seconds); `group_gap_ms` takes an integer of milliseconds. Giving both names is an error.
pub const ALIASES: &[(&str, &str, &str)] = &[
    ("mqtt", "keep_alive_secs", "keep_alive"),
    ("mqtt", "connect_timeout_secs", "connect_timeout"),
    ("mqtt", "reconnect_max_secs", "reconnect_max"),
    ("mqtt", "ack_timeout_secs", "ack_timeout"),
    ("mqtt", "health_interval_secs", "health_interval"),
    ("mllp", "idle_timeout_secs", "idle_timeout"),
    ("serial", "reopen_max_secs", "reopen_max"),
    ("serial", "group_gap_ms", "group_gap"),
];

/// A table that gives a key under both its old and its current name.
fn alias_conflicts(text: &str) -> Vec<Problem> {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new(); // toml::from_str reports the syntax error
    };
    let mut p = Vec::new();
    for (table, old, new) in ALIASES {
        let Some((_, v)) = doc.get_ref().iter().find(|(k, _)| k.get_ref() == table) else {
            continue;
        };
        let tables: Vec<(String, &DeTable<'_>)> = match v.get_ref() {
            DeValue::Table(t) => vec![(table.to_string(), t)],
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item.get_ref() {
                    DeValue::Table(t) => Some((format!("{table}[{i}]"), t)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for (at, t) in tables {
            let find = |name: &str| t.iter().find(|(k, _)| k.get_ref() == name).map(|(k, _)| k);
            if let (Some(_), Some(o)) = (find(new), find(old)) {
                p.push(Problem {
                    key: format!("{at}.{old}"),
                    message: format!(
                        "is the old name of `{new}`, which is also given: keep `{new}` only"
                    ),
                    line: Some(line_of(text, o.span().start)),
                });
            }
        }
    }
    p.sort_by_key(|p| p.line);
    p
}

/// The line of a key path such as `mllp[0].listen` in configuration text (or of its nearest
/// ancestor in the file).
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    place(text, key).0
}

/// The line of a problem's key and the key as the file spells it: checks name the current key
/// (`mllp[0].idle_timeout`), but a file may use its old name (`idle_timeout_secs`).
fn place(text: &str, key: &str) -> (Option<usize>, String) {
    if let Some((line, true)) = locate(text, key) {
        return (Some(line), key.to_string());
    }
    if let Some((at, last)) = key.rsplit_once('.') {
        let table = at.split('[').next().unwrap_or(at);
        for (t, old, new) in ALIASES {
            let alias = format!("{at}.{old}");
            if *t == table
                && *new == last
                && let Some((line, true)) = locate(text, &alias)
            {
                return (Some(line), alias);
            }
        }
    }
    (locate(text, key).map(|(line, _)| line), key.to_string())
}

/// The dotted path (`mllp[0].dedup_window`) of the key whose value holds byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    // Table spans need not cover their keys (`[[mllp]]` tables), so search every value.
    fn value(v: &toml::Spanned<DeValue<'_>>, offset: usize, path: String) -> Option<String> {
        match v.get_ref() {
            DeValue::Table(t) => table(t, offset, &path),
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, item)| value(item, offset, format!("{path}[{i}]")))
                .or_else(|| v.span().contains(&offset).then_some(path)),
            _ => v.span().contains(&offset).then_some(path),
        }
    }
    fn table(t: &DeTable<'_>, offset: usize, path: &str) -> Option<String> {
        t.iter().find_map(|(k, v)| {
            let here = if path.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{path}.{}", k.get_ref())
            };
            if k.span().contains(&offset) {
                return Some(here);
            }
            value(v, offset, here)
        })
    }
    let doc = DeTable::parse(text).ok()?;
    table(doc.get_ref(), offset, "")
}

/// toml's message without its own multi-line source excerpt (we print file:line ourselves), with
/// serde's type names put in the words of the configuration reference: `key` (the dotted path of
/// the value) chooses how an expected integer is described.
fn describe_toml_error(e: &toml::de::Error, key: &str) -> String {
    let msg = e.message().trim().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, known) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
        let hint = known
            .iter()
            .filter(|k| edit_distance(name, k) <= 2)
            .min_by_key(|k| edit_distance(name, k))
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        return format!(
            "unknown key{hint}: remove it or fix its spelling (see docs/configuration.md)"
        );
    }
    if msg.starts_with("unknown variant `") {
        let (given, rest) = msg["unknown variant `".len()..]
            .split_once('`')
            .unwrap_or(("", ""));
        let choices = rest
            .trim_start_matches(", expected ")
            .replace("one of ", "");
        return format!("\"{given}\" is not one of the choices: use {choices}").replace('`', "\"");
    }
    if msg == "wanted string or table" {
        return "expected one of its names in double quotes (see docs/configuration.md)".into();
    }
    if msg.starts_with("missing field") {
        return format!("{msg}: add it (see docs/configuration.md)");
    }
    let typed = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "));
    if let Some((found, expected)) = typed.and_then(|m| m.split_once(", expected ")) {
        return format!(
            "expected {}, found {}",
            expected_form(expected, key),
            found_form(found)
        );
    }
    if msg.starts_with("data did not match any variant") {
        return "expected a size: a number of bytes or a string such as \"512 MiB\" or \"2 GiB\""
            .to_string();
    }
    msg
}

/// Levenshtein distance, for "did you mean" on a misspelt key.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// serde's "expected" text in the reference's words.
fn expected_form(expected: &str, key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let int = |range: &str| {
        if last == "port" {
            "a port number (integer 1-65535)".to_string()
        } else {
            format!("a whole number ({range})")
        }
    };
    match expected {
        "u8" => int("0-255"),
        "u16" => int("0-65535"),
        "u32" | "u64" | "usize" => int("0 or more"),
        "a boolean" => "true or false (no quotes)".into(),
        "a string" => "a string in double quotes".into(),
        "a sequence" => "a list such as [\"...\"]".into(),
        "path string" => "a file path in double quotes".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e => e.to_string(),
    }
}

/// serde's "found" text (`string "18883"`, `integer `7``) in plain words.
fn found_form(found: &str) -> String {
    if let Some(s) = found.strip_prefix("string ") {
        return format!("the string {s}");
    }
    for (prefix, what) in [
        ("integer ", "the number"),
        ("floating point ", "the number"),
        ("boolean ", "the value"),
    ] {
        if let Some(v) = found.strip_prefix(prefix) {
            return format!("{what} {}", v.trim_matches('`'));
        }
    }
    match found {
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        f => f.to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Find the line of a dotted key path such as `mllp[1].tls.cert_file`; falls back to the nearest
/// ancestor that exists in the file. The flag is true when the whole path was found.
fn locate(text: &str, key: &str) -> Option<(usize, bool)> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut best: Option<usize> = None;
    let mut segs = Vec::new();
    for part in key.split('.') {
        if let Some((name, idx)) = part.split_once('[') {
            segs.push((
                name.to_string(),
                idx.trim_end_matches(']').parse::<usize>().ok(),
            ));
        } else {
            segs.push((part.to_string(), None));
        }
    }
    let mut cur: Option<&toml::Spanned<DeValue<'_>>> = None;
    let mut found = 0;
    for (name, idx) in &segs {
        let next = match cur {
            None => doc
                .get_ref()
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == name.as_str())
                .map(|(_, v)| v),
            Some(v) => v.get_ref().get(name.as_str()),
        };
        let Some(mut v) = next else { break };
        best = Some(line_of(text, v.span().start));
        if let Some(i) = idx {
            match v.get_ref().get(*i) {
                Some(item) => {
                    v = item;
                    best = Some(line_of(text, v.span().start));
                }
                None => break,
            }
        }
        cur = Some(v);
        found += 1;
    }
    best.map(|line| (line, found == segs.len()))
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_bytes(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a size: use a number of bytes or e.g. \"512 MiB\", \"2 GiB\""
            ))
        }),
    }
}

/// A duration key: a string such as `"30s"`, `"10m"`, `"2h"`, `"7d"`, `"500ms"` (see
/// [`parse_duration`]) or an integer number of seconds.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "a duration such as \"30s\", \"10m\", \"2h\", \"7d\" or an integer number of seconds",
            )
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(n))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            u64::try_from(n)
                .map(Duration::from_secs)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).ok_or_else(|| {
                E::custom(format!(
                    "'{s}' is not a duration: use e.g. \"30s\", \"10m\", \"2h\", \"7d\", \"500ms\" or an integer number of seconds"
                ))
            })
        }
    }
    d.deserialize_any(V)
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_bytes(d).map(Some)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    /// Found by the `config_loader` fuzz campaign's review: `ca_file = "/dev/zero"` made
    /// check-config (and start-up) read until memory ran out; a FIFO would block it for ever.
    #[test]
    fn a_pem_path_naming_a_device_a_fifo_or_a_huge_file_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; (super::MAX_PEM_BYTES + 1) as usize]).unwrap();
        for (path, expect) in [
            (std::path::PathBuf::from("/dev/zero"), "not a regular file"),
            (fifo, "not a regular file"),
            (big, "larger than 1024 KiB"),
        ] {
            let mut p = Vec::new();
            super::check_pem(&path, super::PemKind::Certs, "mqtt.ca_file", &mut p);
            assert_eq!(p.len(), 1, "{path:?}");
            assert!(p[0].message.contains(expect), "{path:?}: {}", p[0].message);
            assert!(p[0].message.contains(&path.display().to_string()));
        }
    }

    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match parse(Path::new("t.toml"), text) {
            Ok(_) => vec![],
            Err(e) => e.problems,
        }
    }

    const MINIMAL: &str = r#"
appliance_id = "box-1"
organisation = "RXX"
data_dir = "/tmp/x"
[mqtt]
host = "localhost"
insecure_plaintext = true
[[mllp]]
name = "adt"
listen = "127.0.0.1:2575"
"#;

    #[test]
    fn a_bad_allow_entry_is_reported_with_file_line_and_the_entry() {
        let text = format!("{MINIMAL}allow = [\"10.20.0.0/16\",\n  \"10.30.1.0/16\"]\n");
        let e = parse(Path::new("t.toml"), &text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("t.toml:"), "{shown}");
        assert!(shown.contains("mllp[0].allow[1]"), "{shown}");
        assert!(
            shown.contains("'10.30.1.0/16' has host bits set"),
            "{shown}"
        );
        assert!(e.problems[0].line.is_some(), "{:?}", e.problems);
        let ok = format!("{MINIMAL}allow = [\"10.20.0.0/16\", \"::1/128\", \"192.0.2.7\"]\n");
        assert!(parse(Path::new("t.toml"), &ok).is_ok());
    }

    #[test]
    fn certificate_checks_without_client_certificates_are_refused() {
        let text = format!(
            "{MINIMAL}[mllp.tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\nallow_names = [\"pas.trust.nhs.uk\"]\n"
        );
        let p = problems(&text);
        assert!(
            p.iter().any(|p| p.key == "mllp[0].tls.allow_names"
                && p.message.contains("needs tls.client_ca_file")),
            "{p:?}"
        );
    }

    #[test]
    fn an_open_plaintext_listener_without_an_allow_list_is_warned_about() {
        let open = MINIMAL.replace("127.0.0.1:2575", "0.0.0.0:2575");
        let cfg = parse(Path::new("t.toml"), &open).unwrap();
        let w = warnings(Path::new("/nonexistent.toml"), &cfg);
        assert!(w.iter().any(|w| w.contains("no allow list")), "{w:?}");
        let listed = format!("{open}allow = [\"10.20.0.0/16\"]\n");
        let cfg = parse(Path::new("t.toml"), &listed).unwrap();
        let w = warnings(Path::new("/nonexistent.toml"), &cfg);
        assert!(!w.iter().any(|w| w.contains("no allow list")), "{w:?}");
    }

    #[test]
    fn minimal_plaintext_config_is_accepted_with_defaults() {
        let cfg = parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(cfg.mllp[0].max_message_bytes, 4 * 1024 * 1024);
        assert_eq!(cfg.store.retain_delivered, Duration::from_secs(7 * 86400));
        assert_eq!(cfg.mqtt.topic_prefix, "siterelay");
        assert_eq!(cfg.mqtt.protocol, MqttProtocol::V5);
        assert_eq!(cfg.mqtt.client_id("box-1"), "siterelay-box-1");
    }

    #[test]
    fn windows_1252_is_a_charset_for_serial_ports_and_mllp_feeds() {
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:2575\"",
            "listen = \"127.0.0.1:2575\"\ndefault_charset = \"windows-1252\"\n\
             [[serial]]\nname = \"chem\"\ndevice = \"/dev/ttyS0\"\nprotocol = \"astm\"\n\
             charset = \"windows-1252\"",
        );
        let cfg = parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(cfg.serial[0].charset, "windows-1252");
        assert_eq!(cfg.mllp[0].default_charset, "windows-1252");
        let p = problems(&text.replace(
            "\"windows-1252\"\n[[serial]]",
            "\"windows-1250\"\n[[serial]]",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "mllp[0].default_charset");
        assert!(p[0].message.contains("\"windows-1252\""), "{p:?}");
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let text = MINIMAL.replace("name = \"adt\"", "name = \"adt\"\nlisen = \"x\"");
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(10));
        assert_eq!(p[0].key, "mllp[0].lisen");
        assert!(
            p[0].message
                .starts_with("unknown key (did you mean `listen`?)"),
            "{p:?}"
        );
    }

    #[test]
    fn bad_address_and_duplicate_name_are_each_reported_with_lines() {
        let text = format!("{MINIMAL}[[mllp]]\nname = \"adt\"\nlisten = \"0.0.0.0:99999\"\n");
        let p = problems(&text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].key.as_str(), p[0].line), ("mllp[1].name", Some(12)));
        assert_eq!((p[1].key.as_str(), p[1].line), ("mllp[1].listen", Some(13)));
        assert!(p[1].message.contains("not a socket address"));
    }

    #[test]
    fn tls_files_are_required_unless_plaintext_is_explicit() {
        let text = MINIMAL.replace("insecure_plaintext = true", "");
        let p = problems(&text);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"]);
        assert!(p.iter().all(|p| p.line == Some(5)), "{p:?}");
    }

    #[test]
    fn annotated_example_config_uses_only_known_keys_and_valid_values() {
        let text = include_str!("../docs/siterelay.example.toml");
        let cfg: Config = toml::from_str(text).expect("example parses with deny_unknown_fields");
        assert_eq!(cfg.mllp.len(), 2);
        // Only the certificate files, absent on a development machine, may be reported.
        let problems = cfg.check();
        assert!(
            problems
                .iter()
                .all(|p| p.key.starts_with("mqtt.") && p.key.ends_with("_file")),
            "{problems:?}"
        );
        // The commented-out [[serial]] examples, uncommented, are valid too.
        let (head, ports) = text.split_once("# One [[serial]] table").unwrap();
        let ports: String = ports
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg: Config = toml::from_str(&format!("{head}{ports}")).expect("serial examples parse");
        assert_eq!(cfg.serial.len(), 3);
        assert!(!cfg.serial[1].demographics.unwrap());
        assert_eq!(cfg.serial[2].group_gap, Some(Duration::from_millis(500)));
        let problems = cfg.check();
        assert!(
            problems
                .iter()
                .all(|p| p.key.starts_with("mqtt.") && p.key.ends_with("_file")),
            "{problems:?}"
        );
    }

    /// A 0.1 configuration: every duration under its old name, in its old form.
    const OLD_KEYS: &str = r#"
appliance_id = "box-1"
organisation = "RXX"
data_dir = "/tmp/x"
[store]
retain_delivered = "2d"
retain_rejected = 86400
[mqtt]
host = "localhost"
insecure_plaintext = true
keep_alive_secs = 20
connect_timeout_secs = 7
reconnect_max_secs = 45
ack_timeout_secs = 90
health_interval_secs = 15
[[mllp]]
name = "adt"
listen = "127.0.0.1:2575"
idle_timeout_secs = 120
dedup_window = "3d"
[[serial]]
name = "monitor"
device = "/dev/ttyS0"
protocol = "lines"
reopen_max_secs = 5
group_gap_ms = 250
[[serial]]
name = "gas"
device = "/dev/ttyS1"
protocol = "hl7-mllp"
"#;

    #[test]
    fn a_0_1_config_with_the_old_key_names_loads_as_before() {
        let cfg = parse(Path::new("t.toml"), OLD_KEYS).unwrap();
        let s = Duration::from_secs;
        assert_eq!(cfg.store.retain_delivered, s(2 * 86_400));
        assert_eq!(cfg.store.retain_rejected, s(86_400));
        let m = &cfg.mqtt;
        assert_eq!(
            (m.keep_alive, m.connect_timeout, m.reconnect_max),
            (s(20), s(7), s(45))
        );
        assert_eq!((m.ack_timeout, m.health_interval), (s(90), s(15)));
        assert_eq!(cfg.mllp[0].idle_timeout, s(120));
        assert_eq!(cfg.mllp[0].dedup_window, s(3 * 86_400));
        assert_eq!(cfg.serial[0].reopen_max, s(5));
        assert_eq!(cfg.serial[0].group_gap, Some(Duration::from_millis(250)));
        assert_eq!(cfg.serial[1].group_gap, None);
        assert_eq!(cfg.serial[1].reopen_max, s(30));
        // As in 0.1, an HL7 serial port is normalised with demographics and both authorities.
        let o = cfg.serial[1]
            .normalise_options(jiff::tz::TimeZone::UTC)
            .unwrap();
        assert!(o.demographics);
        assert_eq!(o.nhs_authorities, ["NHS", "NHSNBR"]);
        assert!(
            cfg.serial[0]
                .normalise_options(jiff::tz::TimeZone::UTC)
                .is_none()
        );
    }

    #[test]
    fn old_and_new_duration_keys_give_the_same_value() {
        let new = OLD_KEYS
            .replace("keep_alive_secs = 20", "keep_alive = \"20s\"")
            .replace("connect_timeout_secs = 7", "connect_timeout = \"7s\"")
            .replace("reconnect_max_secs = 45", "reconnect_max = 45")
            .replace("ack_timeout_secs = 90", "ack_timeout = \"90 s\"")
            .replace("health_interval_secs = 15", "health_interval = \"15s\"")
            .replace("idle_timeout_secs = 120", "idle_timeout = \"2m\"")
            .replace("reopen_max_secs = 5", "reopen_max = \"5s\"")
            .replace("group_gap_ms = 250", "group_gap = \"250ms\"");
        for (_, old, _) in ALIASES {
            assert!(!new.contains(old), "{old} still in {new}");
        }
        let a = parse(Path::new("t.toml"), OLD_KEYS).unwrap();
        let b = parse(Path::new("t.toml"), &new).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn a_key_under_both_its_names_is_an_error_with_file_and_line() {
        let text = OLD_KEYS
            .replace(
                "idle_timeout_secs = 120",
                "idle_timeout_secs = 120\nidle_timeout = \"2m\"",
            )
            .replace(
                "group_gap_ms = 250",
                "group_gap = \"1s\"\ngroup_gap_ms = 250",
            );
        let e = parse(Path::new("t.toml"), &text).unwrap_err();
        let keys: Vec<_> = e
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("mllp[0].idle_timeout_secs", Some(19)),
                ("serial[0].group_gap_ms", Some(28))
            ]
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(
                "t.toml:19: mllp[0].idle_timeout_secs: is the old name of `idle_timeout`, which is also given"
            ),
            "{shown}"
        );
    }

    #[test]
    fn duration_problems_name_the_key_as_written_and_its_line() {
        let p = problems(&MINIMAL.replace(
            "name = \"adt\"",
            "name = \"adt\"\nidle_timeout = \"10 minutes\"",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("mllp[0].idle_timeout", Some(10))
        );
        assert!(
            p[0].message.contains("'10 minutes' is not a duration"),
            "{p:?}"
        );
        // A check on a value given under its old name points at that name.
        let p = problems(&OLD_KEYS.replace("reopen_max_secs = 5", "reopen_max_secs = 0"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("serial[0].reopen_max_secs", Some(25))
        );
        let p = problems(&OLD_KEYS.replace("protocol = \"lines\"", "protocol = \"astm\""));
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("serial[0].group_gap_ms", Some(26))
        );
        // MQTT counts keep-alive and connect timeout in whole seconds.
        let p = problems(&OLD_KEYS.replace("keep_alive_secs = 20", "keep_alive = \"5500ms\""));
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("mqtt.keep_alive", Some(11))
        );
        assert!(p[0].message.contains("whole seconds"), "{p:?}");
        let p = problems(&OLD_KEYS.replace("ack_timeout_secs = 90", "ack_timeout = -1"));
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("mqtt.ack_timeout", Some(14))
        );
    }

    /// [`MINIMAL`] and a serial port speaking `protocol`; `extra` starts on line 15.
    fn with_port(protocol: &str, extra: &str) -> String {
        format!(
            "{MINIMAL}[[serial]]\nname = \"port\"\ndevice = \"/dev/ttyS0\"\nprotocol = \"{protocol}\"\n{extra}\n"
        )
    }

    #[test]
    fn serial_hl7_ports_take_the_normalisation_keys_and_other_protocols_refuse_them() {
        let tz = || jiff::tz::TimeZone::UTC;
        let text = with_port(
            "hl7-mllp",
            "demographics = false\nnhs_authorities = [\"NHSX\"]",
        );
        let cfg = parse(Path::new("t.toml"), &text).unwrap();
        let o = cfg.serial[0].normalise_options(tz()).unwrap();
        assert!(!o.demographics);
        assert_eq!(o.nhs_authorities, ["NHSX"]);
        let cfg = parse(
            Path::new("t.toml"),
            &with_port("hl7-mllp", "normalise = false"),
        )
        .unwrap();
        assert!(cfg.serial[0].normalise_options(tz()).is_none());
        for protocol in ["astm", "lines"] {
            let p = problems(&with_port(
                protocol,
                "demographics = false\nnormalise = true",
            ));
            let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
            assert_eq!(
                keys,
                [
                    ("serial[0].demographics", Some(15)),
                    ("serial[0].normalise", Some(16))
                ]
            );
            assert!(p[0].message.contains("\"hl7-mllp\" only"), "{p:?}");
            let cfg = parse(Path::new("t.toml"), &with_port(protocol, "")).unwrap();
            assert!(cfg.serial[0].normalise_options(tz()).is_none());
        }
    }

    #[test]
    fn per_feed_normalisation_defaults_are_those_of_normalise_options() {
        let tz = || jiff::tz::TimeZone::UTC;
        let cfg = parse(Path::new("t.toml"), &with_port("hl7-mllp", "")).unwrap();
        let d = NormaliseOptions::default();
        for o in [
            cfg.mllp[0].normalise_options(tz()).unwrap(),
            cfg.serial[0].normalise_options(tz()).unwrap(),
        ] {
            assert_eq!(o.demographics, d.demographics);
            assert_eq!(o.nhs_authorities, d.nhs_authorities);
        }
        // What 0.1 did and docs/configuration.md says: demographics on, both authorities.
        assert!(d.demographics);
        assert_eq!(d.nhs_authorities, ["NHS", "NHSNBR"]);
    }

    #[test]
    fn sizes_and_durations_accept_units() {
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("10 parsecs"), None);
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604800)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1w"), None);
    }

    #[test]
    fn every_value_of_the_example_replaced_by_a_wrong_type_is_reported_at_its_line_without_a_panic()
    {
        // Each key/value line of the annotated example, in turn given a value of every other
        // kind, or removed: the reading never panics, always ends, and names that line.
        let text = include_str!("../docs/siterelay.example.toml");
        let lines: Vec<&str> = text.lines().collect();
        let mut checked = 0;
        for (i, line) in lines.iter().enumerate() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.starts_with('#') || key.contains(' ') {
                continue;
            }
            for wrong in ["\"x\"", "5", "true", "[1, 2]", "{ a = 1 }", "-1"] {
                let mut edited = lines.clone();
                let replaced = format!("{key} = {wrong}");
                edited[i] = &replaced;
                let edited = edited.join("\n") + "\n";
                let (_, problems) = parse_all(&edited);
                for p in &problems {
                    assert!(
                        p.line.is_none_or(|l| l >= 1 && l <= lines.len() + 1),
                        "line {i}: {replaced}: {p:?}"
                    );
                }
                // A value the key cannot take is reported at its own line (a value it can
                // take, e.g. a string for a string key, may pass or fail later checks).
                let own = problems.iter().any(|p| p.line == Some(i + 1));
                let accepted = problems.iter().all(|p| {
                    p.key.starts_with("mqtt.ca_file")
                        || p.key.starts_with("mqtt.cert_file")
                        || p.key.starts_with("mqtt.key_file")
                });
                assert!(own || accepted, "line {}: {replaced}: {problems:?}", i + 1);
                checked += 1;
            }
            let mut removed = lines.clone();
            removed.remove(i);
            let _ = parse_all(&(removed.join("\n") + "\n"));
        }
        assert!(checked > 100, "{checked} edits checked");
    }
}
