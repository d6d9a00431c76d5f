//! An MLLP feed: its receive stage, its TLS, and its listener, bound at start-up so that a bad
//! or busy address fails start-up rather than the first connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::config::{MllpFeedConfig, Unaccepted};
use crate::hl7::charset::Charset;
use crate::hl7::intake::Policy;
use crate::intake::FeedIntake;
use crate::outbox::SourceKind;
use crate::record::FeedRecordSettings;
use crate::sources::mllp::allow::AllowList;
use crate::sources::mllp::certs::MllpTls;
use crate::sources::mllp::limits::{PeerRates, Slots};
use crate::sources::mllp::server::{FeedContext, Guard, MllpListener};
use tokio::sync::Semaphore;

use super::Shared;

/// One MLLP feed, bound but not yet serving.
pub(super) struct Feed {
    pub name: String,
    /// The address it is bound to (the port the OS chose, for `:0`).
    pub addr: SocketAddr,
    pub listener: MllpListener,
    pub intake: Arc<FeedIntake>,
    /// How its records are built.
    pub records: FeedRecordSettings,
    /// Its TLS, when configured (reloaded on SIGHUP).
    pub tls: Option<Arc<MllpTls>>,
}

/// Build feed `f`'s receive stage and bind its listener.
pub(super) async fn bind(f: &MllpFeedConfig, shared: &Shared) -> anyhow::Result<Feed> {
    let default_charset = Charset::from_msh18(&f.default_charset).context("default_charset")?;
    let timezone = jiff::tz::TimeZone::get(&f.timezone).context("timezone")?;
    let records = super::sink::mllp_records(f, timezone, default_charset);
    let counters = shared.telemetry.feed(&f.name);
    let tls = match &f.tls {
        None => None,
        Some(t) => Some(Arc::new(
            MllpTls::load(&f.name, t, counters.clone())
                .with_context(|| format!("TLS for feed {}", f.name))?,
        )),
    };
    let intake = Arc::new(FeedIntake {
        name: Arc::from(f.name.as_str()),
        source_kind: SourceKind::Mllp,
        default_charset,
        responder: shared.responder(),
        counters,
        inventory: shared.inventory(&f.name),
        outbox: shared.outbox.clone(),
        rejects: shared.rejects.clone(),
        policy: policy(f),
        dedup_window: (!f.dedup_window.is_zero()).then_some(f.dedup_window),
        max_batch_messages: f.max_batch_messages,
        batch_permits: shared.batch_permits.clone(),
    });
    let allow = AllowList::parse(&f.allow)
        .map_err(|(i, why)| anyhow::anyhow!("feed {}: allow[{i}]: {why}", f.name))?;
    let ctx = FeedContext {
        intake: intake.clone(),
        max_message_bytes: f.max_message_bytes,
        idle_timeout: f.idle_timeout,
        tls: tls.clone(),
        guard: Guard {
            allow,
            slots: Mutex::new(Slots::new(f.max_connections, f.max_connections_per_peer)),
            rates: Mutex::new(PeerRates::new(
                f.peer_messages_per_sec,
                f.peer_bytes_per_sec,
            )),
            frame_timeout: f.frame_timeout,
            handshake_timeout: f.handshake_timeout,
            // Handshakes hold no slot; bound them apart (each costs a little CPU and memory).
            handshakes: Arc::new(Semaphore::new(f.max_connections.saturating_mul(2).max(4))),
        },
    };
    let listener = MllpListener::bind(f.listen_addr(), ctx)
        .await
        .with_context(|| format!("feed {}: cannot listen on {}", f.name, f.listen))?;
    Ok(Feed {
        name: f.name.clone(),
        addr: listener.local_addr()?,
        listener,
        intake,
        records,
        tls,
    })
}

/// The acceptance policy a feed's configuration describes.
fn policy(f: &MllpFeedConfig) -> Policy {
    Policy {
        accept: f.accept.clone(),
        ignore_unaccepted: f.unaccepted == Unaccepted::Ignore,
        processing_ids: f.processing_ids.clone(),
        strict: f.strict,
    }
}
