//! The receive stage: where a complete message from any transport becomes a row in the outbox
//! (or an entry in quarantine) and an answer for its sender.
//!
//! Sources own sockets and serial ports; they frame bytes into complete messages and hand each
//! one here, to the [`FeedIntake`] of its feed. The intake decides (the pure checks of
//! `crate::hl7::intake`: header, separators, one message per frame, character set, the feed's
//! policy, required segments), stores the message (one append, committed and fsynced by the
//! outbox's writer) or quarantines it, counts it, adds it to the feed's inventory, and returns
//! the acknowledgement. The source writes that acknowledgement only after this returns, so an
//! `AA` always follows the commit that holds the message, and an `AE` the commit that holds its
//! quarantine entry; when the store cannot take the message, or quarantine cannot keep it
//! (full, failing), the answer is `AR`, so the sender keeps it.
//!
//! Everything that reaches the outbox passes through here: MLLP connections
//! (`crate::sources::mllp`), serial ports (`crate::sources::serial`: HL7 frames, ASTM
//! messages, device lines) and the quarantine retry of `siterelay queue rejected retry`
//! (`crate::status`), which runs the same checks with the feed's current settings.
//!
//! What this stage must never do: touch a socket or a port, build records (that happens at
//! publish time, from the stored bytes), or answer before the commit.

mod device;
mod hl7;
mod quarantine;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::hl7::charset::Charset;
use crate::hl7::intake::{Policy, Responder};
use crate::inventory::FeedInventory;
use crate::outbox::{Outbox, SourceKind};
use crate::telemetry::FeedCounters;

pub use hl7::RetryOutcome;
pub use quarantine::RejectNotice;

/// One feed's receive stage: shared by every connection of an MLLP feed, or by a serial port.
pub struct FeedIntake {
    /// Feed name (topic level, `seq` space).
    pub name: Arc<str>,
    /// `mllp` or `serial`, stored with every row.
    pub source_kind: SourceKind,
    /// Charset assumed when MSH-18 is empty (a serial port's configured charset).
    pub default_charset: Charset,
    /// Identity in acknowledgements built without a usable MSH.
    pub responder: Responder,
    /// The feed's counters (health).
    pub counters: Arc<FeedCounters>,
    /// What the feed has carried (inventory).
    pub inventory: Arc<FeedInventory>,
    /// Where messages and quarantine entries are committed.
    pub outbox: Outbox,
    /// Metadata-only notices of rejected messages for the sink, when
    /// `records.publish_rejects` is on.
    pub rejects: Option<mpsc::Sender<RejectNotice>>,
    /// Which message types, processing ids and separators the feed takes.
    pub policy: Policy,
    /// Resends within this window are acknowledged again but stored once (None: off).
    pub dedup_window: Option<Duration>,
    /// Messages one batch frame may hold; a larger batch is answered `AE`, nothing of it stored.
    pub max_batch_messages: usize,
    /// Permits to work on a batch, shared by every feed of the daemon ([`BATCHES_AT_ONCE`]).
    pub batch_permits: Arc<tokio::sync::Semaphore>,
}

/// Batch frames the daemon works on at once, over all feeds; the others wait their turn.
///
/// A batch is checked and committed as a whole, so while it is handled each of its messages is
/// held in memory with its header, about 2.5 KiB for a 180-byte ADT (measured with
/// `examples/batch_bomb.rs`): 10,000 messages (the default `max_batch_messages`) made the
/// daemon's peak RSS 26 MiB higher, and 8 such batches at once 175 MiB higher, most of which
/// the allocator kept afterwards. Two at a time bound that to what two batches need, whatever
/// the number of connections; a waiting batch's sender gets its answer when its turn comes (on
/// the development machine one batch of 10,000 alone was answered in 0.09-0.13 s, and of eight
/// sent at once the last in 0.66-0.82 s). A batch over the limit is answered at once without
/// waiting.
pub const BATCHES_AT_ONCE: usize = 2;

/// A fresh set of [`BATCHES_AT_ONCE`] permits (one per daemon).
pub fn batch_permits() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(BATCHES_AT_ONCE))
}
