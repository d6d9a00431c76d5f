//! The outbox's part of the daemon: opening it (with the retention and duplicate-window
//! settings of every feed), reading back what each feed carried in the previous run, and the
//! task that prunes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::inventory::{FeedInventory, FeedInventoryData};
use crate::outbox::{Outbox, OutboxOptions, WriterThread, damage};
use crate::sink::mqtt::INVENTORY_KEY;

/// How often delivered rows past retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Open the outbox and start its writer thread. A damaged store (`quick_check`, or an open
/// that SQLite refuses as malformed) is moved aside and a fresh one started in its place
/// (`crate::outbox::damage`), so the daemon starts instead of failing again at every restart.
pub(super) fn open(
    cfg: &Config,
    clock: crate::clock::Clock,
) -> anyhow::Result<(Outbox, WriterThread)> {
    let path = cfg.outbox_path();
    let opts = OutboxOptions {
        max_bytes: cfg.store.max_bytes,
        quarantine_max_bytes: cfg.store.quarantine_budget(),
        retain_delivered: cfg.store.retain_delivered,
        retain_rejected: cfg.store.retain_rejected,
        dedup_keep: cfg
            .mllp
            .iter()
            .map(|f| f.dedup_window)
            .max()
            .unwrap_or_default(),
        secure_delete: cfg.store.secure_delete,
    };
    damage::check_at_start(&path).context("checking the outbox")?;
    match Outbox::open_with_clock(&path, opts.clone(), clock.clone()) {
        Err(e) if damage::is_damage(&e) => {
            damage::set_aside(&path, &e.to_string()).context("moving a damaged outbox aside")?;
            Outbox::open_with_clock(&path, opts, clock)
        }
        opened => opened,
    }
    .context("opening the outbox")
}

/// Every feed's name: the MLLP feeds, then the serial ports, in config order.
pub(super) fn feed_names(cfg: &Config) -> Vec<&str> {
    cfg.mllp
        .iter()
        .map(|f| f.name.as_str())
        .chain(cfg.serial.iter().map(|s| s.name.as_str()))
        .collect()
}

/// Each named feed's inventory, carrying on from what the previous run saved (empty for a new
/// feed, or when nothing readable was saved).
pub(super) fn saved_inventories(
    outbox: &Outbox,
    names: &[&str],
) -> Vec<(String, Arc<FeedInventory>)> {
    let mut saved: BTreeMap<String, FeedInventoryData> = outbox
        .reader()
        .ok()
        .and_then(|r| r.meta(INVENTORY_KEY).ok().flatten())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    names
        .iter()
        .map(|n| {
            let data = saved.remove(*n).unwrap_or_default();
            (n.to_string(), Arc::new(FeedInventory::from_saved(data)))
        })
        .collect()
}

/// Prune at once, then every [`PRUNE_EVERY`] until shutdown.
pub(super) async fn prune_every(outbox: Outbox, shutdown: crate::shutdown::Shutdown) {
    loop {
        outbox.prune().await;
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.requested() => break,
        }
    }
}
