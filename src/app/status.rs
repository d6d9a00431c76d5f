//! What the appliance reports about itself (the health report's sources, shared with the sink's
//! fleet messages) and the local status socket (`siterelay status`, the quarantine retry).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::health::{FeedInfo, HealthContext};
use crate::intake::FeedIntake;
use crate::status::StatusContext;

use super::Shared;

/// The health report's sources; `feeds` holds each MLLP feed's bound address, in config order.
pub(super) fn health(
    cfg: &Config,
    feeds: &[(String, SocketAddr)],
    shared: &Shared,
) -> HealthContext {
    HealthContext {
        appliance: cfg.appliance_id.clone(),
        started_at_us: shared.outbox.clock().now_us(),
        started: std::time::Instant::now(),
        clock: shared.outbox.clock().clone(),
        telemetry: shared.telemetry.clone(),
        gauges: shared.outbox.gauges(),
        store_max_bytes: cfg.store.max_bytes,
        quarantine_max_bytes: cfg.store.quarantine_budget(),
        data_dir: cfg.data_dir.clone(),
        identity: shared.identity.clone(),
        broker: format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        feeds: cfg
            .mllp
            .iter()
            .zip(feeds)
            .map(|(f, (_, addr))| FeedInfo {
                name: f.name.clone(),
                kind: "mllp",
                endpoint: addr.to_string(),
                tls: f.tls.is_some(),
            })
            .chain(cfg.serial.iter().map(|s| FeedInfo {
                name: s.name.clone(),
                kind: "serial",
                endpoint: s.device.display().to_string(),
                tls: false,
            }))
            .collect(),
    }
}

/// The status socket task, under `data_dir`; `intakes` are every feed's receive stage, which
/// the quarantine retry goes through. A socket that cannot be bound is logged by the task, and
/// start-up goes on without it.
pub(super) fn serve(
    cfg: &Config,
    health: HealthContext,
    intakes: HashMap<String, Arc<FeedIntake>>,
    shared: &Shared,
    shutdown: crate::shutdown::Shutdown,
) -> impl Future<Output = ()> + Send + 'static {
    crate::status::serve(
        crate::status::socket_path(&cfg.data_dir),
        Arc::new(StatusContext {
            health,
            outbox: shared.outbox.clone(),
            intakes,
            responder: shared.responder(),
        }),
        shutdown,
    )
}
