//! Counters the daemon keeps about itself, and the named events that bump them.
//!
//! Each notable event is one function here: it logs (control ids, sizes and counts only, never
//! message contents) and increments the counter the health report publishes. Counters are plain
//! atomics so the hot path costs a relaxed add.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info, warn};

/// Per-feed counters.
#[derive(Debug, Default)]
pub struct FeedCounters {
    /// Complete frames received.
    pub frames: AtomicU64,
    /// Messages stored in the outbox.
    pub stored: AtomicU64,
    /// Messages stored: answered `AA` or `CA`, or not answered where none is sent (MSH-15
    /// `NE`, device lines). Health's `acks.AA`.
    pub ack_aa: AtomicU64,
    /// `AE` answers (unusable content).
    pub ack_ae: AtomicU64,
    /// `AR` answers (could not take it now).
    pub ack_ar: AtomicU64,
    /// Bytes received outside any frame and discarded.
    pub discarded_bytes: AtomicU64,
    /// Frames over `max_message_bytes`.
    pub oversized: AtomicU64,
    /// Device lines cut at `max_message_bytes`, stored flagged `complete: false`.
    pub truncated: AtomicU64,
    /// Messages answered `AE` and kept in quarantine, since start.
    pub quarantined: AtomicU64,
    /// Resends recognised as duplicates (acknowledged again, not forwarded twice).
    pub duplicates: AtomicU64,
    /// Messages outside the feed's `accept` list, acknowledged and dropped (`unaccepted = "ignore"`).
    pub ignored: AtomicU64,
    /// Frames never finished (no end block before EOF, timeout or a new start block).
    pub incomplete: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Receive time of the last stored message (µs since epoch), 0 if none.
    pub last_message_us: AtomicU64,
    /// Connections closed at once: outside the allow list, over the per-address cap, too many
    /// handshakes, or a client certificate not allowed on this feed.
    pub refused_connections: AtomicU64,
    /// Messages answered `AR` because their address was over its message or byte rate.
    pub rate_limited: AtomicU64,
    /// Batches answered `AE` because they held more than `max_batch_messages`.
    pub batches_too_large: AtomicU64,
    /// MLLP over TLS: the server certificate in use.
    tls_certificate: std::sync::Mutex<Option<CertInUse>>,
    /// Refused connections logged in the current window, and those not logged.
    refused_log: std::sync::Mutex<LogWindow>,
    /// Serial ports: [`PortState`] as a number (0 for listeners).
    port_state: AtomicU64,
    /// Serial ports: the last problem opening or reading the port.
    port_problem: std::sync::Mutex<Option<String>>,
}

/// State of a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Not a serial port (an MLLP listener).
    Listening = 0,
    /// Open and served.
    Connected = 1,
    /// Missing or lost; being reopened.
    Waiting = 2,
    /// Cannot be opened (permissions, busy, bad settings); retried.
    Error = 3,
}

impl PortState {
    /// Name in health reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PortState::Listening => "listening",
            PortState::Connected => "connected",
            PortState::Waiting => "waiting",
            PortState::Error => "error",
        }
    }
}

impl FeedCounters {
    /// Record a serial port's state and, if any, its last problem (no message content).
    pub fn set_port_state(&self, s: PortState, problem: Option<String>) {
        self.port_state.store(s as u64, Ordering::Relaxed);
        if let Some(p) = problem {
            *self.port_problem.lock().expect("lock") = Some(p);
        }
    }

    /// The port state (Listening for MLLP feeds).
    pub fn port_state(&self) -> PortState {
        match self.port_state.load(Ordering::Relaxed) {
            1 => PortState::Connected,
            2 => PortState::Waiting,
            3 => PortState::Error,
            _ => PortState::Listening,
        }
    }

    /// The last port problem.
    pub fn port_problem(&self) -> Option<String> {
        self.port_problem.lock().expect("lock").clone()
    }

    /// Record the server certificate an MLLP feed now presents (or a reload it refused).
    pub fn set_tls_certificate(&self, c: CertInUse) {
        *self
            .tls_certificate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// The server certificate an MLLP feed presents (None: no TLS).
    pub fn tls_certificate(&self) -> Option<CertInUse> {
        self.tls_certificate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The certificate a TLS listener presents now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInUse {
    /// Its subject, e.g. `CN=siterelay.trust.nhs.uk`.
    pub subject: String,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    /// The last reload that was refused (the certificate above stayed in use), and why.
    pub reload_error: Option<String>,
}

/// At most [`REFUSALS_LOGGED`] refused connections are logged per feed in each
/// [`REFUSAL_LOG_WINDOW`]; the rest are counted and summed up in one line.
#[derive(Debug, Default)]
struct LogWindow {
    started: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

/// Refused connections logged per window and feed (a scanner cannot flood the journal).
pub const REFUSALS_LOGGED: u32 = 5;
/// The window of [`REFUSALS_LOGGED`].
pub const REFUSAL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl LogWindow {
    /// Whether to log this one; when a new window starts, how many went unlogged in the last.
    fn admit(&mut self, now: std::time::Instant) -> (bool, u64) {
        let mut unlogged = 0;
        if self
            .started
            .is_none_or(|t| now.saturating_duration_since(t) >= REFUSAL_LOG_WINDOW)
        {
            unlogged = std::mem::take(&mut self.suppressed);
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED {
            self.logged += 1;
            (true, unlogged)
        } else {
            self.suppressed += 1;
            (false, unlogged)
        }
    }
}

/// MQTT sink counters.
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Successful CONNACKs.
    pub connects: AtomicU64,
    /// Connection attempts or sessions that failed.
    pub connection_failures: AtomicU64,
    /// Records published (including resends).
    pub published: AtomicU64,
    /// PUBACKs that confirmed delivery.
    pub acked: AtomicU64,
    /// PUBACKs whose reason code reported a failure.
    pub refused: AtomicU64,
    /// 1 while connected.
    pub connected: AtomicU64,
    /// The MQTT packet limit records are held to on the current (or last) connection: the
    /// smaller of our own limit and the broker's CONNACK Maximum Packet Size.
    pub packet_limit: AtomicU64,
    /// The broker's CONNACK Maximum Packet Size on the current (or last) connection; 0 when
    /// it gave none.
    pub broker_max_packet: AtomicU64,
    /// Last connection error (no message content).
    last_error: std::sync::Mutex<Option<String>>,
}

impl SinkCounters {
    /// Remember the last connection error.
    pub fn set_last_error(&self, e: &str) {
        // Health carries it: bounded, whatever a broker or a file put in it.
        *self.last_error.lock().expect("lock") = Some(crate::text::bounded(e).into_owned());
    }

    /// The last connection error.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("lock").clone()
    }
}

/// All counters of one running daemon.
#[derive(Debug, Default)]
pub struct Telemetry {
    feeds: BTreeMap<String, Arc<FeedCounters>>,
    /// The MQTT sink.
    pub sink: SinkCounters,
}

impl Telemetry {
    /// Counters for the given feed names.
    pub fn new<'a>(feeds: impl IntoIterator<Item = &'a str>) -> Telemetry {
        Telemetry {
            feeds: feeds
                .into_iter()
                .map(|f| (f.to_string(), Arc::default()))
                .collect(),
            sink: SinkCounters::default(),
        }
    }

    /// Counters of one feed (created on first use of an unknown name).
    pub fn feed(&self, name: &str) -> Arc<FeedCounters> {
        self.feeds.get(name).cloned().unwrap_or_default()
    }

    /// Every feed's counters.
    pub fn feeds(&self) -> impl Iterator<Item = (&String, &Arc<FeedCounters>)> {
        self.feeds.iter()
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Named events of an MLLP feed.
pub mod mllp {
    use super::*;

    /// A connection was accepted.
    pub fn connection_opened(c: &FeedCounters, feed: &str, peer: &str) {
        inc(&c.connections_total);
        inc(&c.connections_open);
        info!(feed, peer, "connection opened");
    }

    /// A connection was closed at once (address only: nothing was read from it). Logged at
    /// most [`REFUSALS_LOGGED`] times a [`REFUSAL_LOG_WINDOW`] per feed; always counted.
    pub fn connection_refused(c: &FeedCounters, feed: &str, peer: std::net::IpAddr, why: &str) {
        inc(&c.refused_connections);
        let (log, unlogged) = c
            .refused_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(std::time::Instant::now());
        if unlogged > 0 {
            warn!(
                feed,
                unlogged, "further refused connections in the last minute were counted, not logged"
            );
        }
        if log {
            warn!(feed, %peer, why, "connection refused and closed");
        }
    }

    /// A message answered `AR` because its address is over its rate (not read, not stored).
    pub fn rate_limited(c: &FeedCounters, feed: &str, peer: &str, size: usize, why: &str) {
        inc(&c.frames);
        inc(&c.ack_ar);
        inc(&c.rate_limited);
        debug!(
            feed,
            peer, size, why, "message refused (AR): over the address's rate"
        );
    }

    /// A connection ended, with how many messages it carried.
    pub fn connection_closed(c: &FeedCounters, feed: &str, peer: &str, messages: u64, why: &str) {
        c.connections_open.fetch_sub(1, Ordering::Relaxed);
        info!(feed, peer, messages, why, "connection closed");
    }

    /// Bytes outside a frame were discarded.
    pub fn discarded(c: &FeedCounters, feed: &str, peer: &str, bytes: usize) {
        c.discarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        warn!(feed, peer, bytes, "discarded bytes outside an MLLP frame");
    }

    /// A frame exceeded the size limit.
    pub fn oversized(c: &FeedCounters, feed: &str, peer: &str, seen: usize, limit: u64) {
        inc(&c.oversized);
        warn!(
            feed,
            peer, seen, limit, "frame exceeds max_message_bytes: refusing and closing"
        );
    }

    /// A device line ran past `max_message_bytes`: stored cut, flagged `complete: false`.
    pub fn truncated(c: &FeedCounters, feed: &str, seq: u64, size: usize, dropped: u64) {
        inc(&c.truncated);
        warn!(
            feed,
            seq,
            size,
            dropped,
            "line longer than max_message_bytes: stored cut, flagged complete: false"
        );
    }

    /// A frame was never finished.
    pub fn incomplete(c: &FeedCounters, feed: &str, peer: &str, bytes: usize, why: &str) {
        inc(&c.incomplete);
        warn!(
            feed,
            peer, bytes, why, "incomplete frame dropped (it was never acknowledged)"
        );
    }

    /// A message was committed and answered `AA`/`CA`.
    pub fn stored(c: &FeedCounters, feed: &str, control_id: &str, seq: u64, size: usize) {
        inc(&c.frames);
        inc(&c.stored);
        inc(&c.ack_aa);
        c.last_message_us
            .store(crate::outbox::now_us() as u64, Ordering::Relaxed);
        debug!(feed, control_id, seq, size, "stored and acknowledged");
    }

    /// A message was answered `AE` (not stored, not forwarded).
    pub fn rejected(c: &FeedCounters, feed: &str, peer: &str, size: usize, reason: &str) {
        inc(&c.frames);
        inc(&c.ack_ae);
        warn!(feed, peer, size, reason, "message rejected (AE)");
    }

    /// A message was answered `AR` (not stored; the sender should retry).
    pub fn refused(c: &FeedCounters, feed: &str, control_id: &str, size: usize, reason: &str) {
        inc(&c.frames);
        inc(&c.ack_ar);
        warn!(feed, control_id, size, reason, "message refused (AR)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scanner_gets_a_few_log_lines_a_minute_and_one_summary() {
        let t0 = std::time::Instant::now();
        let mut w = LogWindow::default();
        let logged = (0..1000).filter(|_| w.admit(t0).0).count();
        assert_eq!(logged, REFUSALS_LOGGED as usize);
        assert_eq!(
            w.admit(t0 + REFUSAL_LOG_WINDOW),
            (true, 1000 - u64::from(REFUSALS_LOGGED))
        );
    }
}
