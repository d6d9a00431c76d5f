//! `siterelay status`: the local view for trust IT.
//!
//! The daemon listens on a Unix socket, `<data_dir>/status.sock` (mode 0600, in a 0700
//! directory: only the daemon's user and root can ask). Each connection receives one JSON
//! document, the same report the health topic carries, and is closed. When nothing answers,
//! the command falls back to what the outbox file says.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use std::collections::HashMap;

use crate::health::{Health, HealthContext, StoreView};
use crate::hl7::charset::Charset;
use crate::hl7::intake::{self, Responder};
use crate::intake::FeedIntake;
use crate::inventory::FeedInventory;
use crate::outbox::{Outbox, Reader, SourceKind};

/// What the status socket needs: the health sources, and for `retry`, the outbox and each
/// feed's current character-set setting.
pub struct StatusContext {
    /// Health report sources.
    pub health: HealthContext,
    /// The outbox.
    pub outbox: Outbox,
    /// Each configured feed's receive stage (its current settings): a retry goes through it.
    pub intakes: HashMap<String, Arc<FeedIntake>>,
    /// Identity in minimal NAKs (not sent anywhere on a retry, but the intake needs one).
    pub responder: Responder,
}

/// The socket path inside a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("status.sock")
}

/// Serve requests until shutdown. A client writes one line: `status` (or nothing) for the
/// health report, `retry all` / `retry <id>` to pass quarantined messages through the intake
/// again, or `held retry all` / `held retry <row>` to release held records (the sink publishes
/// them at once); it gets one JSON document back.
pub async fn serve(path: PathBuf, ctx: Arc<StatusContext>, shutdown: crate::shutdown::Shutdown) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "status socket unavailable; `siterelay status` will read the outbox only");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let db = ctx.health.data_dir.join("outbox.sqlite");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.requested() => break,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let ctx = ctx.clone();
        let db = db.clone();
        tokio::spawn(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while line.len() < 64 {
                    match stream.read(&mut byte).await {
                        Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                        _ => break,
                    }
                }
            })
            .await;
            let request = String::from_utf8_lossy(&line).trim().to_string();
            let body = if read.is_err() || request.is_empty() || request == "status" {
                let ctx2 = ctx.clone();
                let report = tokio::task::spawn_blocking(move || {
                    let store = Reader::open(&db)
                        .and_then(|r| StoreView::read(&r))
                        .unwrap_or_default();
                    ctx2.health.report(&store, 0)
                })
                .await;
                report.ok().and_then(|r| serde_json::to_vec(&r).ok())
            } else if let Some(which) = request.strip_prefix("held retry ") {
                let which = if which == "all" {
                    None
                } else {
                    which.parse().ok().map(Some).unwrap_or(Some(-1))
                };
                Some(serde_json::to_vec(&held_retry(&ctx, &db, which).await).unwrap_or_default())
            } else if let Some(which) = request.strip_prefix("retry ") {
                let which = if which == "all" {
                    None
                } else {
                    which.parse().ok().map(Some).unwrap_or(Some(-1))
                };
                Some(serde_json::to_vec(&retry(&ctx, &db, which).await).unwrap_or_default())
            } else {
                Some(br#"{"ok":false,"error":"unknown request"}"#.to_vec())
            };
            if let Some(body) = body {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    debug!("status socket closed");
}

/// Pass quarantined messages (one, or all) through the intake again with the feeds' current
/// settings (character set and acceptance policy): those that pass become ordinary messages (new `seq`, `"reprocessed": true`) and
/// leave the quarantine; the others stay.
async fn retry(ctx: &StatusContext, db: &Path, which: Option<i64>) -> serde_json::Value {
    let db = db.to_path_buf();
    let rows = match tokio::task::spawn_blocking(move || {
        Reader::open(&db).and_then(|r| r.quarantined(which))
    })
    .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return serde_json::json!({"ok": false, "error": e.to_string()}),
        Err(e) => return serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    if rows.is_empty() {
        return serde_json::json!({"ok": false, "error": "no such quarantined message"});
    }
    let mut results = Vec::new();
    for row in rows {
        let intake = match ctx.intakes.get(&row.feed) {
            Some(i) => i.clone(),
            // A feed no longer configured: UTF-8 and no acceptance policy, counted nowhere.
            None => Arc::new(FeedIntake {
                name: Arc::from(row.feed.as_str()),
                source_kind: if row.source_kind == "serial" {
                    SourceKind::Serial
                } else {
                    SourceKind::Mllp
                },
                default_charset: Charset::Utf8,
                responder: ctx.responder.clone(),
                counters: Default::default(),
                inventory: Arc::new(FeedInventory::from_saved(Default::default())),
                outbox: ctx.outbox.clone(),
                rejects: None,
                policy: intake::Policy::default(),
                dedup_window: None,
                max_batch_messages: crate::config::DEFAULT_MAX_BATCH_MESSAGES,
                batch_permits: crate::intake::batch_permits(),
            }),
        };
        let outcome = intake.retry(&row).await;
        results.push(serde_json::to_value(outcome).unwrap_or_default());
    }
    serde_json::json!({"ok": true, "results": results})
}

/// Release held records (one row, or all): they become ordinary pending rows again and the sink
/// publishes them at once; one that still cannot be published is held again.
async fn held_retry(ctx: &StatusContext, db: &Path, which: Option<i64>) -> serde_json::Value {
    let db = db.to_path_buf();
    let rows = match tokio::task::spawn_blocking(move || {
        Reader::open(&db).and_then(|r| r.held(which, false))
    })
    .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return serde_json::json!({"ok": false, "error": e.to_string()}),
        Err(e) => return serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    if rows.is_empty() {
        let error = if which.is_some() {
            "no such held record"
        } else {
            "no held records"
        };
        return serde_json::json!({"ok": false, "error": error});
    }
    match ctx.outbox.unhold(which).await {
        Ok(unheld) => {
            let released: Vec<serde_json::Value> = rows
                .iter()
                .filter(|r| unheld.row_ids.contains(&r.row_id))
                .map(|r| serde_json::json!({"row": r.row_id, "feed": r.feed, "seq": r.seq}))
                .collect();
            serde_json::json!({"ok": true, "released": released})
        }
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}

/// A certificate expiring within this many days makes `siterelay status` report degraded.
pub const CERT_DEGRADED_DAYS: i64 = 14;

/// Why a running appliance is degraded (empty: healthy): the broker not connected, held
/// records, a damaged store moved aside at start and not yet salvaged, a certificate expiring within [`CERT_DEGRADED_DAYS`] or expired. `siterelay status`
/// exits 1 when there is any, and the metrics carry the same figures.
pub fn degraded(h: &Health) -> Vec<String> {
    let mut why = Vec::new();
    if !h.mqtt.connected {
        why.push("broker not connected".to_string());
    }
    if h.outbox.held_count > 0 {
        why.push(format!("{} held record(s)", h.outbox.held_count));
    }
    let damaged = h
        .outbox
        .damaged_stores
        .iter()
        .filter(|d| !d.salvaged)
        .count();
    if damaged > 0 {
        why.push(format!("{damaged} damaged store(s) not salvaged"));
    }
    for (what, days) in [
        ("client certificate", h.certificates.client_days_left),
        ("CA certificate", h.certificates.ca_days_left),
    ] {
        match days {
            Some(d) if d < 0 => why.push(format!("{what} EXPIRED")),
            Some(d) if d < CERT_DEGRADED_DAYS => why.push(format!("{what} expires in {d} day(s)")),
            _ => {}
        }
    }
    why
}

/// Send one request line to a running daemon and read its JSON answer.
pub async fn request(path: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(path).await?;
        s.write_all(format!("{line}\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        serde_json::from_slice(&buf).map_err(std::io::Error::other)
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// Ask a running daemon for its report.
pub async fn query(path: &Path) -> std::io::Result<Health> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(path).await?;
        s.write_all(b"status\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        serde_json::from_slice::<Health>(&buf).map_err(std::io::Error::other)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The report as a person reads it.
pub fn render(h: &Health) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "siterelay {}: running for {} (report at {})",
        h.appliance,
        crate::units::human_secs(h.uptime_secs),
        h.at
    );
    let degraded = degraded(h);
    if degraded.is_empty() {
        let _ = writeln!(o, "health    OK");
    } else {
        let _ = writeln!(o, "health    DEGRADED: {}", degraded.join("; "));
    }
    let m = &h.mqtt;
    let _ = writeln!(
        o,
        "broker    {} ({} connects, {} failures{})",
        if m.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        m.connects,
        m.connection_failures,
        m.last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
    let b = &h.outbox;
    let _ = writeln!(
        o,
        "outbox    {} pending ({}), oldest {}; store {} of {} cap",
        b.pending_count,
        human_bytes(b.pending_bytes),
        b.oldest_pending_age_secs
            .map(|s| crate::units::human_secs(s as u64))
            .unwrap_or_else(|| "-".into()),
        human_bytes(b.store_bytes),
        human_bytes(b.store_max_bytes)
    );
    if b.space_short {
        let _ = writeln!(
            o,
            "          DISK FULL: new messages are refused (AR) until space is freed \
             (docs/operations.md, \"Full disk\")"
        );
    }
    if b.quarantine_bytes > 0 || b.pruned_early > 0 {
        let _ = writeln!(
            o,
            "          quarantine {} of {}{}",
            human_bytes(b.quarantine_bytes),
            human_bytes(b.quarantine_max_bytes),
            if b.pruned_early > 0 {
                format!(
                    "; {} delivered record(s) pruned before retain_delivered to make room{}",
                    b.pruned_early,
                    b.retention_cut_at
                        .as_deref()
                        .map(|t| format!(", last at {t}"))
                        .unwrap_or_default()
                )
            } else {
                String::new()
            }
        );
    }
    if b.held_count > 0 {
        let _ = writeln!(
            o,
            "HELD      {} record(s) ({}) cannot be published as they are: see `siterelay queue held`",
            b.held_count,
            human_bytes(b.held_bytes)
        );
        for hr in &h.held {
            let _ = writeln!(
                o,
                "  row {:<8} {} seq {}: {} ({})",
                hr.row, hr.feed, hr.seq, hr.reason, hr.detail
            );
        }
    }
    for d in &b.damaged_stores {
        let _ = writeln!(
            o,
            "DAMAGED   store moved aside{}: {}",
            d.moved_at
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default(),
            crate::text::for_terminal(&d.reason)
        );
        if d.salvaged {
            let _ = writeln!(
                o,
                "          salvaged; delete its directory once its messages are re-sent: {}",
                d.path
            );
        } else {
            let _ = writeln!(
                o,
                "          its undelivered messages were NOT forwarded: {}",
                crate::text::for_terminal(&d.salvage_hint)
            );
        }
    }
    let _ = writeln!(o, "feeds");
    for f in &h.feeds {
        let _ = writeln!(
            o,
            "  {:<20} {:<5} {:<10} {} peer(s), received {} (AA {}, AE {}, AR {}){}",
            f.name,
            f.kind,
            f.state,
            f.connected_peers,
            f.received,
            f.acks.AA,
            f.acks.AE,
            f.acks.AR,
            f.last_message_at
                .as_deref()
                .map(|t| format!(", last at {t}"))
                .unwrap_or_default()
        );
    }
    let c = &h.certificates;
    let days = |d: Option<i64>| match d {
        Some(d) if d < 0 => format!("EXPIRED {} day(s) ago", -d),
        Some(d) if d < 30 => format!("{d} days left (RENEW SOON)"),
        Some(d) => format!("{d} days left"),
        None => "unknown".into(),
    };
    let _ = writeln!(
        o,
        "certs     client {}, CA {}",
        days(c.client_days_left),
        days(c.ca_days_left)
    );
    let k = &h.clock;
    let _ = writeln!(
        o,
        "clock     {}{}",
        match k.synchronized {
            Some(true) => "synchronised".to_string(),
            Some(false) => "NOT synchronised".to_string(),
            None => "synchronisation unknown".to_string(),
        },
        if k.suspect {
            " (CLOCK LOOKS WRONG)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "host      disk free {}, memory {}",
        h.disk_free_bytes
            .map(human_bytes)
            .unwrap_or_else(|| "?".into()),
        h.rss_bytes.map(human_bytes).unwrap_or_else(|| "?".into())
    );
    o
}
