//! Wiring: sources -> intake -> outbox -> record -> sink, with one shutdown signal.
//!
//! A running daemon is made of: the outbox (its writer thread, and a task pruning it), each
//! feed's receive stage (`crate::intake::FeedIntake`), one listener per MLLP feed, one task per
//! serial port, the MQTT sink (which builds the records), and the local status socket. Each part
//! is built in its own module here, in the manner of ntpd-rs's `daemon/spawn/`:
//!
//! - `store.rs`: opening the outbox, reading back each feed's inventory, the pruning task;
//! - `feeds.rs`: an MLLP feed (its receive stage, TLS, the bound listener);
//! - `serial.rs`: a serial port (its receive stage and port settings);
//! - `sink.rs`: the MQTT client TLS, the reject notices channel, how each feed's records are
//!   built, and the sink itself;
//! - `status.rs`: the health report's sources and the status socket.
//!
//! [`Daemon::start`] builds them in this order: the data directory's lock (`lock.rs`: one daemon
//! per data directory), the MQTT client TLS (a missing or unreadable
//! certificate fails start-up before anything is opened), the outbox, the counters and the
//! inventories saved by the previous run, then every MLLP feed in config order, each with its
//! TLS and bound to its address here (so an address that cannot be bound fails start-up: `main`
//! sends READY=1 only after `start` returns), then the serial ports (marked waiting; each port is opened by its own task,
//! so a missing device does not fail start-up), then the sink. Only then are the tasks spawned:
//! the listeners and serial ports, the status socket (a socket that cannot be bound is logged,
//! not fatal), the sink and the pruning task.
//!
//! [`Daemon::stop`] stops the listeners and serial ports first (in-flight messages finish or
//! are refused `AR`; after `LISTENER_GRACE` (5 s) they are aborted, which loses nothing
//! unacknowledged), then waits for the status socket, the sink and pruning, then for the outbox
//! writer to commit its last batch.

pub mod expiry;
mod feeds;
mod lock;
mod serial;
mod sink;
mod status;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::hl7::intake::Responder;
use crate::intake::{FeedIntake, RejectNotice};
use crate::inventory::FeedInventory;
use crate::outbox::{Outbox, WriterThread};
use crate::record::FeedRecordSettings;
use crate::telemetry::Telemetry;

/// How long listeners get to finish in-flight messages at shutdown.
const LISTENER_GRACE: Duration = Duration::from_secs(5);
/// How often [`Daemon::failed`] checks that the outbox writer answers.
const WRITER_PROBE_EVERY: Duration = Duration::from_secs(5);
/// A writer that has not answered a probe for this long is taken as dead (the slowest fsync
/// of a large group on an SD card is far below it).
pub const WRITER_PROBE_LIMIT: Duration = Duration::from_secs(60);

/// A running siterelay.
pub struct Daemon {
    /// Held for the daemon's life: no second daemon can open this data directory.
    _lock: lock::DataDirLock,
    feeds: Vec<(String, SocketAddr)>,
    shutdown: crate::shutdown::Trigger,
    listeners: JoinSet<()>,
    /// The sink and the pruning task: the daemon cannot do its job without them.
    others: JoinSet<()>,
    /// The status socket: useful, not vital (a socket that cannot be bound ends it early).
    aux: JoinSet<()>,
    outbox: Outbox,
    writer: WriterThread,
    telemetry: Arc<Telemetry>,
    /// The TLS of every MLLP feed that has it (reloaded on SIGHUP).
    mllp_tls: crate::sources::mllp::certs::Reloader,
    /// The permits batches wait for (shared with every feed's intake).
    batch_permits: Arc<tokio::sync::Semaphore>,
}

/// What every feed's receive stage is built from, besides the feed's own settings.
struct Shared {
    /// The appliance id, for acknowledgements built without a usable MSH.
    appliance_id: String,
    outbox: Outbox,
    telemetry: Arc<Telemetry>,
    /// What each feed has carried, one per configured feed.
    inventories: Vec<(String, Arc<FeedInventory>)>,
    /// Reject notices for the sink, when `records.publish_rejects` is on.
    rejects: Option<mpsc::Sender<RejectNotice>>,
    /// The MQTT client identity in use (None with `insecure_plaintext`).
    identity: Option<Arc<crate::sink::identity::ClientIdentity>>,
    /// Batches worked on at once, over all feeds (`intake::BATCHES_AT_ONCE`).
    batch_permits: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Identity in acknowledgements built without a usable MSH.
    fn responder(&self) -> Responder {
        Responder {
            application: "SITERELAY".into(),
            facility: self.appliance_id.clone(),
        }
    }

    /// The inventory of a configured feed.
    fn inventory(&self, name: &str) -> Arc<FeedInventory> {
        self.inventories
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| i.clone())
            .expect("an inventory per feed")
    }
}

/// Every feed's receive stage (the quarantine retry goes through them too) and how its
/// records are built, by feed name.
fn by_name(
    mllp: &[feeds::Feed],
    ports: &[serial::Port],
) -> (
    HashMap<String, Arc<FeedIntake>>,
    HashMap<String, FeedRecordSettings>,
) {
    let every = || {
        (mllp.iter().map(|f| (&f.name, &f.intake, &f.records)))
            .chain(ports.iter().map(|p| (&p.name, &p.intake, &p.records)))
    };
    (
        every().map(|(n, i, _)| (n.clone(), i.clone())).collect(),
        every().map(|(n, _, r)| (n.clone(), r.clone())).collect(),
    )
}

impl Daemon {
    /// Start everything described by `cfg` (already checked by [`crate::config::load`]).
    pub async fn start(cfg: &Config) -> anyhow::Result<Daemon> {
        Daemon::start_with_clock(cfg, crate::clock::Clock::system()).await
    }

    /// [`Daemon::start`] with the wall clock the daemon stamps and compares calendar times
    /// with (`received_at`, retention, the duplicate window, reports, certificate expiry): a
    /// test clock, to step it. Timers, timeouts and backoff never read it (monotonic time).
    pub async fn start_with_clock(
        cfg: &Config,
        clock: crate::clock::Clock,
    ) -> anyhow::Result<Daemon> {
        let lock = lock::DataDirLock::acquire(&cfg.data_dir)?;
        let identity = sink::client_identity(cfg)?;
        let (outbox, writer) = store::open(cfg, clock)?;
        let names = store::feed_names(cfg);
        let telemetry = Arc::new(Telemetry::new(names.iter().copied()));
        let inventories = store::saved_inventories(&outbox, &names);
        let (rejects, rejects_rx) = sink::reject_channel(cfg);
        let shared = Shared {
            appliance_id: cfg.appliance_id.clone(),
            outbox: outbox.clone(),
            telemetry: telemetry.clone(),
            inventories,
            rejects,
            identity: identity.clone(),
            batch_permits: crate::intake::batch_permits(),
        };
        let batch_permits = shared.batch_permits.clone();

        let mut mllp = Vec::new();
        for f in &cfg.mllp {
            mllp.push(feeds::bind(f, &shared).await?);
        }
        let ports = cfg
            .serial
            .iter()
            .map(|sc| serial::prepare(sc, cfg, &shared))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let feeds: Vec<(String, SocketAddr)> =
            mllp.iter().map(|f| (f.name.clone(), f.addr)).collect();
        let mllp_tls = crate::sources::mllp::certs::Reloader(
            mllp.iter().filter_map(|f| f.tls.clone()).collect(),
        );
        let (intakes, records) = by_name(&mllp, &ports);
        let health = status::health(cfg, &feeds, &shared);
        let sink = sink::build(cfg, identity.clone(), records, rejects_rx, &health, &shared);

        let (shutdown, shutdown_rx) = crate::shutdown::channel();
        let mut listeners = JoinSet::new();
        for f in mllp {
            listeners.spawn(f.listener.serve(shutdown_rx.clone()));
        }
        for p in ports {
            listeners.spawn(crate::sources::serial::run(p.ctx, shutdown_rx.clone()));
        }
        let mut others = JoinSet::new();
        let mut aux = JoinSet::new();
        aux.spawn(status::serve(
            cfg,
            health,
            intakes,
            &shared,
            shutdown_rx.clone(),
        ));
        others.spawn(sink.run(shutdown_rx.clone()));
        aux.spawn(expiry::run(
            expiry::Watched {
                mqtt: identity.clone(),
                mllp: mllp_tls.clone(),
            },
            expiry::EVERY,
            shutdown_rx.clone(),
        ));
        if let Some(id) = identity {
            aux.spawn(id.watch(shutdown_rx.clone()));
        }
        others.spawn(store::prune_every(outbox.clone(), shutdown_rx));
        // Test builds only: a vital task that dies after the given time, so a test can show the
        // daemon noticing a dead part (a fault that cannot be made from outside the process).
        #[cfg(debug_assertions)]
        if let Some(ms) = std::env::var("SITERELAY_TEST_VITAL_TASK_DIES_AFTER_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            others.spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                panic!("injected by SITERELAY_TEST_VITAL_TASK_DIES_AFTER_MS");
            });
        }
        info!(
            appliance = %cfg.appliance_id,
            feeds = feeds.len(),
            version = env!("CARGO_PKG_VERSION"),
            "siterelay started"
        );
        Ok(Daemon {
            _lock: lock,
            feeds,
            shutdown,
            listeners,
            others,
            aux,
            outbox,
            writer,
            telemetry,
            mllp_tls,
            batch_permits,
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

    /// What reloads every MLLP feed's certificate, key, client CA and CRL (for SIGHUP; each
    /// feed also reloads by itself when its files change).
    pub fn mllp_certificates(&self) -> crate::sources::mllp::certs::Reloader {
        self.mllp_tls.clone()
    }

    /// Live counters.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// The permits a batch frame waits for before it is handled (`intake::BATCHES_AT_ONCE`),
    /// for tests that hold them.
    pub fn batch_permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.batch_permits.clone()
    }

    /// The outbox handle (for stats in tests and tools).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Resolves when a vital part of the daemon has stopped on its own (a listener or serial
    /// port task, the sink or pruning ended, or the outbox writer no longer answers within
    /// [`WRITER_PROBE_LIMIT`]), saying which. The daemon cannot do its job any more: `main`
    /// stops and exits non-zero, so systemd restarts it. Never resolves otherwise.
    pub async fn failed(&mut self) -> String {
        let outbox = self.outbox.clone();
        let writer = async move {
            loop {
                tokio::time::sleep(WRITER_PROBE_EVERY).await;
                match tokio::time::timeout(WRITER_PROBE_LIMIT, outbox.probe()).await {
                    Ok(true) => {}
                    Ok(false) => return "the outbox writer thread has stopped".to_owned(),
                    Err(_) => {
                        return format!(
                            "the outbox writer has not answered for {}s",
                            WRITER_PROBE_LIMIT.as_secs()
                        );
                    }
                }
            }
        };
        let ended = |what: &str, r: Result<(), tokio::task::JoinError>| match r {
            Ok(()) => format!("{what} ended"),
            Err(e) if e.is_panic() => format!("{what} panicked"),
            Err(e) => format!("{what} stopped: {e}"),
        };
        tokio::select! {
            Some(r) = self.listeners.join_next() => ended("a listener or serial port task", r),
            Some(r) = self.others.join_next() => ended("the sink or the pruning task", r),
            why = writer => why,
        }
    }

    /// Graceful stop: listeners and serial ports, then the status socket, sink and pruning,
    /// then the outbox writer.
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
        while self.aux.join_next().await.is_some() {}
        self.outbox.flush().await;
        drop(self.outbox);
        // Let the writer finish its last transaction off the async threads.
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        info!("siterelay stopped");
    }
}
