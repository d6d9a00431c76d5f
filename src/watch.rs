//! `siterelay watch`: the central team's view of the whole fleet, through the broker.
//!
//! Subscribes to every appliance's `status` and `health` topics and keeps one row per appliance:
//! online or offline (and since when), age of the last health report, backlog, feeds up, and
//! certificate days left, with problems flagged. The state machine ([`Fleet`]) is pure; the
//! terminal loop redraws once a second, so hundreds of appliances stay cheap. `--json` prints one
//! line per update for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::health::Health;
use crate::sink::control::Status;

/// Command-line arguments of `siterelay watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Broker URL: `mqtts://host:port` (mutual TLS) or `mqtt://host:port` (lab only).
    #[arg(long)]
    pub broker: String,
    /// CA certificate(s) the broker must chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate of the watcher.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client key of the watcher.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Topic prefix used by the appliances.
    #[arg(long, default_value = "siterelay")]
    pub prefix: String,
    /// A health report older than this marks an appliance stale.
    #[arg(long, default_value_t = 90)]
    pub stale_secs: u64,
    /// Print one JSON line per update instead of a table (set by the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// MQTT client id (default: siterelay-watch-<pid>).
    #[arg(long)]
    pub client_id: Option<String>,
}

/// What the watcher knows about one appliance.
#[derive(Debug, Clone, Default)]
struct Appliance {
    online: Option<bool>,
    reason: Option<String>,
    bdseq: Option<i64>,
    status_at_us: Option<i64>,
    health_at_us: Option<i64>,
    health: Option<Health>,
    /// Pending counts of the last few reports (backlog trend).
    pending_trend: Vec<u64>,
    /// Boot ids of the last few births, oldest first (see [`duplicate_id`]).
    boot_ids: Vec<String>,
}

/// Births whose boot ids alternate (`x, y, x`) come from two machines running with one
/// appliance id (a cloned SD card): a reboot changes the boot id once and never goes back.
fn duplicate_id(boot_ids: &[String]) -> bool {
    boot_ids.windows(3).any(|w| w[0] == w[2] && w[0] != w[1])
}

/// One appliance as displayed (and as printed by `--json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// Appliance id.
    pub appliance: String,
    /// `online`, `offline` or `unknown`.
    pub state: String,
    /// For offline: `lost` or `shutdown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Birth sequence of the current status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bdseq: Option<i64>,
    /// Seconds since the status last changed (as seen by this watcher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_age_secs: Option<u64>,
    /// Seconds since the last health report arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_age_secs: Option<u64>,
    /// Pending records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Age of the oldest pending record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_secs: Option<u64>,
    /// Feeds listening/connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feeds_up: Option<usize>,
    /// Feeds configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feeds_total: Option<usize>,
    /// Client certificate days left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_days_left: Option<i64>,
    /// Held records (set aside on the appliance; `siterelay queue held` there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
    /// Problems: `offline`, `stale`, `backlog-growing`, `held`, `damaged-store` (a store found
    /// damaged at start and not yet salvaged), `cert-expiring`, `clock`,
    /// `duplicate-id` (births alternate between two machines: two boxes share this id).
    pub problems: Vec<String>,
}

/// The fleet as seen through the broker.
#[derive(Debug, Default)]
pub struct Fleet {
    appliances: BTreeMap<String, Appliance>,
    prefix: String,
    stale_secs: u64,
    /// When this watcher started (µs): health reports are not retained, so an appliance the
    /// retained status shows online has sent none *to this watcher* until its next report.
    /// Until `stale_secs` have passed since then, no report yet is not "stale".
    watching_since_us: Option<i64>,
}

impl Fleet {
    /// An empty fleet view for topics under `prefix`.
    pub fn new(prefix: &str, stale_secs: u64) -> Fleet {
        Fleet {
            appliances: BTreeMap::new(),
            prefix: prefix.to_string(),
            stale_secs,
            watching_since_us: None,
        }
    }

    /// The same, for a watcher that started at `now_us`: an appliance is not called stale for
    /// want of a report this watcher could not have seen yet.
    pub fn watching_since(mut self, now_us: i64) -> Fleet {
        self.watching_since_us = Some(now_us);
        self
    }

    /// Apply one message; returns the appliance it concerned, if it was understood.
    pub fn apply(&mut self, topic: &str, payload: &[u8], now_us: i64) -> Option<String> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (appliance, kind) = rest.split_once('/')?;
        match kind {
            "status" => {
                if payload.is_empty() {
                    // A cleared retained status: forget the appliance.
                    self.appliances.remove(appliance);
                    return Some(appliance.to_string());
                }
                let s: Status = serde_json::from_slice(payload).ok()?;
                let a = self.appliances.entry(appliance.to_string()).or_default();
                // Every birth's boot id counts, even one the bdseq rule below ignores: the other
                // box of a cloned pair keeps its own bdseq.
                let boot = s.host.as_ref().and_then(|h| h.get("boot_id"));
                if s.state == "online"
                    && let Some(b) = boot.and_then(serde_json::Value::as_str)
                {
                    a.boot_ids.push(b.to_owned());
                    if a.boot_ids.len() > 6 {
                        a.boot_ids.remove(0);
                    }
                }
                // A death from an older connection must not override a newer birth.
                if a.bdseq.is_some_and(|b| s.bdseq < b) {
                    return None;
                }
                let online = s.state == "online";
                if a.online != Some(online) || a.bdseq != Some(s.bdseq) {
                    a.status_at_us = Some(now_us);
                }
                a.online = Some(online);
                a.reason = s.reason;
                a.bdseq = Some(s.bdseq);
                Some(appliance.to_string())
            }
            "health" => {
                let h: Health = serde_json::from_slice(payload).ok()?;
                let a = self.appliances.entry(appliance.to_string()).or_default();
                a.health_at_us = Some(now_us);
                a.pending_trend.push(h.outbox.pending_count);
                if a.pending_trend.len() > 4 {
                    a.pending_trend.remove(0);
                }
                a.health = Some(h);
                Some(appliance.to_string())
            }
            _ => None,
        }
    }

    /// Number of appliances known.
    pub fn len(&self) -> usize {
        self.appliances.len()
    }

    /// True when no appliance is known.
    pub fn is_empty(&self) -> bool {
        self.appliances.is_empty()
    }

    /// The row of one appliance.
    pub fn row(&self, appliance: &str, now_us: i64) -> Option<Row> {
        let a = self.appliances.get(appliance)?;
        let age = |t: Option<i64>| t.map(|t| ((now_us - t).max(0) / 1_000_000) as u64);
        let h = a.health.as_ref();
        let mut problems = Vec::new();
        if a.online == Some(false) {
            problems.push("offline".to_string());
        }
        let health_age = age(a.health_at_us);
        let waiting_first_report = health_age.is_none()
            && age(self.watching_since_us).is_some_and(|s| s <= self.stale_secs);
        if a.online != Some(false)
            && !waiting_first_report
            && health_age.is_none_or(|s| s > self.stale_secs)
        {
            problems.push("stale".into());
        }
        let growing = a.pending_trend.len() >= 3
            && a.pending_trend.windows(2).all(|w| w[1] > w[0])
            && h.and_then(|h| h.outbox.oldest_pending_age_secs)
                .is_some_and(|s| s >= 60.0);
        if growing {
            problems.push("backlog-growing".into());
        }
        let held = h.map(|h| h.outbox.held_count).filter(|&n| n > 0);
        if held.is_some() {
            problems.push("held".into());
        }
        if h.is_some_and(|h| h.outbox.damaged_stores.iter().any(|d| !d.salvaged)) {
            problems.push("damaged-store".into());
        }
        let cert = h.and_then(|h| h.certificates.client_days_left);
        if cert.is_some_and(|d| d < 30) {
            problems.push("cert-expiring".into());
        }
        if h.is_some_and(|h| h.clock.suspect || h.clock.synchronized == Some(false)) {
            problems.push("clock".into());
        }
        if duplicate_id(&a.boot_ids) {
            problems.push("duplicate-id".into());
        }
        Some(Row {
            appliance: appliance.to_string(),
            state: match a.online {
                Some(true) => "online",
                Some(false) => "offline",
                None => "unknown",
            }
            .to_string(),
            reason: a.reason.clone(),
            bdseq: a.bdseq,
            state_age_secs: age(a.status_at_us),
            health_age_secs: health_age,
            pending: h.map(|h| h.outbox.pending_count),
            oldest_pending_secs: h.and_then(|h| h.outbox.oldest_pending_age_secs.map(|s| s as u64)),
            feeds_up: h.map(|h| {
                h.feeds
                    .iter()
                    .filter(|f| f.state == "listening" || f.state == "connected")
                    .count()
            }),
            feeds_total: h.map(|h| h.feeds.len()),
            cert_days_left: cert,
            held,
            problems,
        })
    }

    /// Every row: appliances with problems first, then by name.
    pub fn rows(&self, now_us: i64) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .appliances
            .keys()
            .filter_map(|a| self.row(a, now_us))
            .collect();
        rows.sort_by(|a, b| {
            b.problems
                .is_empty()
                .cmp(&a.problems.is_empty())
                .reverse()
                .then_with(|| a.appliance.cmp(&b.appliance))
        });
        rows
    }
}

/// The table as text (no terminal control codes).
pub fn render_table(rows: &[Row]) -> String {
    use std::fmt::Write;
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut o = String::new();
    let bad = rows.iter().filter(|r| !r.problems.is_empty()).count();
    let _ = writeln!(o, "{} appliances, {} with problems", rows.len(), bad);
    let _ = writeln!(
        o,
        "{:<28} {:<8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>6}  PROBLEMS",
        "APPLIANCE", "STATE", "SINCE", "HEALTH", "PENDING", "OLDEST", "FEEDS", "CERT"
    );
    for r in rows {
        let _ = writeln!(
            o,
            "{:<28} {:<8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>6}  {}",
            r.appliance,
            r.state,
            r.state_age_secs
                .map(crate::units::human_secs)
                .unwrap_or_else(|| "-".into()),
            r.health_age_secs
                .map(crate::units::human_secs)
                .unwrap_or_else(|| "-".into()),
            opt(r.pending),
            r.oldest_pending_secs
                .map(crate::units::human_secs)
                .unwrap_or_else(|| "-".into()),
            match (r.feeds_up, r.feeds_total) {
                (Some(u), Some(t)) => format!("{u}/{t}"),
                _ => "-".into(),
            },
            r.cert_days_left
                .map(|d| format!("{d}d"))
                .unwrap_or_else(|| "-".into()),
            r.problems.join(",")
        );
    }
    o
}

fn parse_broker(url: &str) -> anyhow::Result<(bool, String, u16)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        bail!("--broker must start with mqtts:// (or mqtt:// for a lab broker)");
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().context("broker port")?),
        None => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    Ok((tls, host, port))
}

/// Run the watcher until interrupted.
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let (tls, host, port) = parse_broker(&args.broker)?;
    let id = args
        .client_id
        .clone()
        .unwrap_or_else(|| format!("siterelay-watch-{}", std::process::id()));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(16 * 1024 * 1024));
    if tls {
        let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
            bail!("mqtts:// needs --ca, --cert and --key");
        };
        let cfg = crate::tls::mqtt_client_config(ca, cert, key)?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(cfg),
        ));
    }
    let (client, mut el) = AsyncClient::new(o, 64);
    let filters = [
        format!("{}/+/status", args.prefix),
        format!("{}/+/health", args.prefix),
    ];
    let mut fleet =
        Fleet::new(&args.prefix, args.stale_secs).watching_since(crate::outbox::now_us());
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        client.subscribe(f.clone(), QoS::AtLeastOnce).await?;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let now = crate::outbox::now_us();
                    if let Some(a) = fleet.apply(&topic, &p.payload, now)
                        && args.json
                        && let Some(row) = fleet.row(&a, now)
                    {
                        println!("{}", serde_json::to_string(&row)?);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("siterelay watch: broker connection: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            },
            _ = redraw.tick(), if !args.json => {
                // Redrawn every second even without messages: ages change.
                print!("\x1b[2J\x1b[H{}", render_table(&fleet.rows(crate::outbox::now_us())));
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(pending: u64, oldest: Option<f64>, cert: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema": "siterelay.health.v1", "appliance": "a", "at": "2026-11-30T00:00:00Z",
            "uptime_secs": 5,
            "outbox": {"pending_count": pending, "pending_bytes": 0, "oldest_pending_age_secs": oldest,
                       "delivered_last_interval": 0, "store_bytes": 0, "store_max_bytes": 1, "refused_full": 0},
            "feeds": [{"name": "adt", "kind": "mllp", "state": "listening", "connected_peers": 0,
                       "received": 0, "acks": {"AA": 0, "AE": 0, "AR": 0}, "duplicates": 0,
                       "discarded_bytes": 0, "oversized": 0, "incomplete": 0}],
            "mqtt": {"broker": "b:1", "connected": true, "connects": 1, "connection_failures": 0,
                     "published": 0, "acked": 0, "refused": 0},
            "certificates": {"client_days_left": cert},
            "clock": {"synchronized": true, "suspect": false}
        }))
        .unwrap()
    }

    fn status(state: &str, bdseq: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema": "siterelay.status.v1", "appliance": "a", "state": state, "bdseq": bdseq,
            "reason": if state == "offline" { Some("lost") } else { None }
        }))
        .unwrap()
    }

    #[test]
    fn a_stale_death_does_not_hide_a_newer_birth() {
        let mut f = Fleet::new("siterelay", 90);
        f.apply("siterelay/a/status", &status("online", 4), 0);
        assert!(
            f.apply("siterelay/a/status", &status("offline", 3), 1)
                .is_none()
        );
        assert_eq!(f.row("a", 1).unwrap().state, "online");
        f.apply("siterelay/a/status", &status("offline", 4), 2);
        let r = f.row("a", 2).unwrap();
        assert_eq!(
            (r.state.as_str(), r.reason.as_deref()),
            ("offline", Some("lost"))
        );
        assert_eq!(r.problems, ["offline"]);
    }

    #[test]
    fn a_watcher_that_just_started_shows_retained_online_boxes_online_not_stale() {
        // The retained status arrives at once; the first health report only with the box's
        // next interval. Until stale_secs have passed since the watcher started, that is
        // not "stale"; after, a box that still sent nothing is.
        let start = 1_000_000_000;
        let mut f = Fleet::new("siterelay", 90).watching_since(start);
        f.apply("siterelay/a/status", &status("online", 1), start);
        let r = f.row("a", start + 1_000_000).unwrap();
        assert_eq!((r.state.as_str(), r.problems.len()), ("online", 0), "{r:?}");
        let r = f.row("a", start + 91_000_000).unwrap();
        assert_eq!(r.problems, ["stale"]);
        // A box that reports is judged by its report's age as before.
        f.apply(
            "siterelay/a/health",
            &health(0, None, 300),
            start + 95_000_000,
        );
        assert!(f.row("a", start + 96_000_000).unwrap().problems.is_empty());
    }

    #[test]
    fn problems_flag_stale_health_growing_backlog_and_expiring_certificates() {
        let mut f = Fleet::new("siterelay", 90);
        f.apply("siterelay/a/status", &status("online", 1), 0);
        for (i, p) in [10u64, 20, 30].iter().enumerate() {
            f.apply(
                "siterelay/a/health",
                &health(*p, Some(120.0), 12),
                i as i64 * 1_000_000,
            );
        }
        let r = f.row("a", 3_000_000).unwrap();
        assert_eq!(r.problems, ["backlog-growing", "cert-expiring"]);
        assert_eq!(
            (r.feeds_up, r.feeds_total, r.pending),
            (Some(1), Some(1), Some(30))
        );
        let later = f.row("a", 200_000_000).unwrap();
        assert!(later.problems.contains(&"stale".to_string()));
    }

    #[test]
    fn held_records_are_a_problem_and_old_reports_without_them_still_read() {
        let mut f = Fleet::new("siterelay", 90);
        f.apply("siterelay/a/status", &status("online", 1), 0);
        f.apply("siterelay/a/health", &health(3, Some(1.0), 300), 0);
        let r = f.row("a", 0).unwrap();
        assert_eq!((r.held, r.problems.len()), (None, 0));
        let mut v: serde_json::Value = serde_json::from_slice(&health(3, Some(1.0), 300)).unwrap();
        v["outbox"]["held_count"] = 2.into();
        f.apply("siterelay/a/health", &serde_json::to_vec(&v).unwrap(), 0);
        let r = f.row("a", 0).unwrap();
        assert_eq!(
            (r.held, r.problems.as_slice()),
            (Some(2), &["held".to_string()][..])
        );
    }

    #[test]
    fn a_damaged_store_not_salvaged_is_a_problem_and_a_salvaged_one_is_not() {
        let mut f = Fleet::new("siterelay", 90);
        f.apply("siterelay/a/status", &status("online", 1), 0);
        let mut v: serde_json::Value = serde_json::from_slice(&health(3, Some(1.0), 300)).unwrap();
        let store = |salvaged: bool| {
            serde_json::json!({
                "path": "/var/lib/siterelay/damaged/20261203T081500Z/outbox.sqlite",
                "reason": "database disk image is malformed", "salvaged": salvaged,
                "salvage_hint": "siterelay queue salvage ...", "seq_complete": true,
            })
        };
        v["outbox"]["damaged_stores"] = serde_json::json!([store(false)]);
        f.apply("siterelay/a/health", &serde_json::to_vec(&v).unwrap(), 0);
        assert_eq!(f.row("a", 0).unwrap().problems, ["damaged-store"]);
        v["outbox"]["damaged_stores"] = serde_json::json!([store(true)]);
        f.apply("siterelay/a/health", &serde_json::to_vec(&v).unwrap(), 0);
        assert!(f.row("a", 0).unwrap().problems.is_empty());
    }

    #[test]
    fn rows_list_problem_appliances_first() {
        let mut f = Fleet::new("siterelay", 90);
        f.apply("siterelay/b-ok/status", &status("online", 1), 0);
        f.apply("siterelay/b-ok/health", &health(0, None, 300), 0);
        f.apply("siterelay/z-down/status", &status("offline", 1), 0);
        let names: Vec<_> = f.rows(0).into_iter().map(|r| r.appliance).collect();
        assert_eq!(names, ["z-down", "b-ok"]);
        assert!(render_table(&f.rows(0)).contains("2 appliances, 1 with problems"));
    }

    #[test]
    fn broker_urls_need_a_scheme() {
        assert_eq!(
            parse_broker("mqtts://hub:8883").unwrap(),
            (true, "hub".into(), 8883)
        );
        assert_eq!(
            parse_broker("mqtt://hub").unwrap(),
            (false, "hub".into(), 1883)
        );
        assert!(parse_broker("hub:8883").is_err());
    }

    fn birth(bdseq: i64, boot_id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema": "siterelay.status.v1", "appliance": "a", "state": "online", "bdseq": bdseq,
            "at": "2026-11-30T00:00:00Z", "host": {"arch": "x86_64", "boot_id": boot_id}
        }))
        .unwrap()
    }

    #[test]
    fn births_alternating_between_two_boot_ids_flag_two_boxes_with_one_id_and_a_reboot_does_not() {
        let topic = "siterelay/a/status";
        let mut f = Fleet::new("siterelay", 60);
        // A reboot: one change of boot id, never back.
        for (bdseq, boot) in [(1, "x"), (2, "x"), (3, "y"), (4, "y")] {
            f.apply(topic, &birth(bdseq, boot), 0);
        }
        f.apply("siterelay/a/health", &health(0, None, 365), 0);
        assert!(
            !f.row("a", 0)
                .unwrap()
                .problems
                .contains(&"duplicate-id".to_string())
        );
        // A cloned SD card: the two boxes knock each other off and take turns, each with its
        // own bdseq (the older one's births are ignored for state, not for this check).
        let mut g = Fleet::new("siterelay", 60);
        for (bdseq, boot) in [(7, "x"), (7, "y"), (8, "x")] {
            g.apply(topic, &birth(bdseq, boot), 0);
        }
        g.apply("siterelay/a/health", &health(0, None, 365), 0);
        assert_eq!(g.row("a", 0).unwrap().problems, ["duplicate-id"]);
    }
}
