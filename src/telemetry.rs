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
    /// ACKs sent, by MSA-1 code.
    pub ack_aa: AtomicU64,
    /// `AE` answers (unusable content).
    pub ack_ae: AtomicU64,
    /// `AR` answers (could not take it now).
    pub ack_ar: AtomicU64,
    /// Bytes received outside any frame and discarded.
    pub discarded_bytes: AtomicU64,
    /// Frames over `max_message_bytes`.
    pub oversized: AtomicU64,
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
