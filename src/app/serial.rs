//! A serial port: its receive stage and its port settings. Nothing is opened here: each port's
//! task (`crate::sources::serial::run`) opens the device and reopens it when it goes away, so a
//! port that is missing at start-up is reported as waiting rather than failing start-up.

use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, SerialConfig};
use crate::hl7::charset::Charset;
use crate::hl7::intake::Policy;
use crate::intake::FeedIntake;
use crate::outbox::SourceKind;
use crate::record::FeedRecordSettings;
use crate::sources::serial::SerialContext;
use crate::telemetry::PortState;

use super::Shared;

/// One serial port, ready for its task.
pub(super) struct Port {
    pub name: String,
    pub intake: Arc<FeedIntake>,
    /// How its records are built.
    pub records: FeedRecordSettings,
    /// What its task runs with.
    pub ctx: SerialContext,
}

/// Build port `sc`'s receive stage (settings already checked by `Config::check`) and mark the
/// port waiting until its task opens it.
pub(super) fn prepare(sc: &SerialConfig, cfg: &Config, shared: &Shared) -> anyhow::Result<Port> {
    let charset = Charset::from_msh18(&sc.charset).context("serial charset")?;
    let timezone = jiff::tz::TimeZone::get(&sc.timezone).context("timezone")?;
    let records = super::sink::serial_records(sc, timezone, charset);
    let counters = shared.telemetry.feed(&sc.name);
    counters.set_port_state(PortState::Waiting, None);
    // HL7 over serial takes every type (no `accept` list) and has no duplicate window.
    let intake = Arc::new(FeedIntake {
        name: Arc::from(sc.name.as_str()),
        source_kind: SourceKind::Serial,
        default_charset: charset,
        responder: shared.responder(),
        counters,
        inventory: shared.inventory(&sc.name),
        outbox: shared.outbox.clone(),
        rejects: shared.rejects.clone(),
        policy: Policy::default(),
        dedup_window: None,
        max_batch_messages: crate::config::DEFAULT_MAX_BATCH_MESSAGES,
        batch_permits: shared.batch_permits.clone(),
    });
    Ok(Port {
        name: sc.name.clone(),
        intake: intake.clone(),
        records,
        ctx: SerialContext {
            name: Arc::from(sc.name.as_str()),
            cfg: sc.clone(),
            intake,
            store_max_bytes: cfg.store.max_bytes,
        },
    })
}
