//! `siterelay metrics`: the health report as Prometheus text (exposition format 0.0.4), for
//! node_exporter's textfile collector or any scraper of files.
//!
//! The figures are those of the health report the daemon serves on its status socket (and
//! publishes on its `health` topic), plus each feed's queue depth from the outbox file, as
//! `siterelay queue stats` reads it. Names follow Prometheus' conventions: a `siterelay_`
//! prefix, base units (`_bytes`, `_seconds`), counters ending `_total`. Labels are feed names
//! (letters, digits, `-` and `_` only: `config` checks them) and, on `siterelay_info`, the
//! appliance, broker and version. No message content and no patient identifier is ever in a
//! metric.

use std::fmt::Write;

use crate::health::Health;
use crate::outbox::FeedStats;

/// One metric family being written: HELP and TYPE once, then its samples.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction; others as Rust prints them.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The metrics of a running daemon: its health report and the outbox's per-feed figures.
pub fn render(h: &Health, stats: &[FeedStats]) -> String {
    let mut o = Out {
        text: String::new(),
    };
    o.one(
        "siterelay_up",
        "gauge",
        "1 when the daemon answered on its status socket.",
        1.0,
    );
    o.family(
        "siterelay_info",
        "gauge",
        "The appliance, its broker and this siterelay's version.",
    );
    o.sample(
        "siterelay_info",
        &[
            ("appliance", &h.appliance),
            ("broker", &h.mqtt.broker),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );
    o.one(
        "siterelay_degraded",
        "gauge",
        "1 when siterelay status would exit 1: broker not connected, held records, a damaged store not salvaged, or a certificate expiring within 14 days.",
        flag(!crate::status::degraded(h).is_empty()),
    );
    o.one(
        "siterelay_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        h.uptime_secs as f64,
    );

    let b = &h.outbox;
    o.one(
        "siterelay_outbox_pending_records",
        "gauge",
        "Records waiting for the broker's confirmation (held ones included).",
        b.pending_count as f64,
    );
    o.one(
        "siterelay_outbox_pending_bytes",
        "gauge",
        "Bytes of the pending records.",
        b.pending_bytes as f64,
    );
    o.one(
        "siterelay_outbox_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest pending record (0 when none).",
        b.oldest_pending_age_secs.unwrap_or(0.0),
    );
    o.one(
        "siterelay_outbox_held_records",
        "gauge",
        "Records held: they cannot be published as they are (siterelay queue held).",
        b.held_count as f64,
    );
    o.one(
        "siterelay_outbox_damaged_stores",
        "gauge",
        "Stores found damaged at start and moved aside, not yet salvaged (siterelay queue salvage; docs/operations.md).",
        b.damaged_stores.iter().filter(|d| !d.salvaged).count() as f64,
    );
    o.one(
        "siterelay_outbox_held_bytes",
        "gauge",
        "Bytes of the held records.",
        b.held_bytes as f64,
    );
    o.one(
        "siterelay_outbox_store_bytes",
        "gauge",
        "Bytes the store occupies on disk.",
        b.store_bytes as f64,
    );
    o.one(
        "siterelay_outbox_store_max_bytes",
        "gauge",
        "The store's cap, store.max_bytes.",
        b.store_max_bytes as f64,
    );
    o.one(
        "siterelay_outbox_quarantine_bytes",
        "gauge",
        "Bytes of quarantined (AE) messages.",
        b.quarantine_bytes as f64,
    );
    o.one(
        "siterelay_outbox_refused_full_total",
        "counter",
        "Messages refused (AR) because the store was full, since start.",
        b.refused_full as f64,
    );
    o.one(
        "siterelay_outbox_space_short",
        "gauge",
        "1 while new messages are refused for want of disk space.",
        flag(b.space_short),
    );
    o.one(
        "siterelay_outbox_delivered_last_interval_records",
        "gauge",
        "Records delivered since the previous health report.",
        b.delivered_last_interval as f64,
    );

    let m = &h.mqtt;
    o.one(
        "siterelay_mqtt_connected",
        "gauge",
        "1 while connected to the broker.",
        flag(m.connected),
    );
    o.one(
        "siterelay_mqtt_connects_total",
        "counter",
        "Successful connections to the broker since start.",
        m.connects as f64,
    );
    o.one(
        "siterelay_mqtt_connection_failures_total",
        "counter",
        "Failed or lost connections since start.",
        m.connection_failures as f64,
    );
    o.one(
        "siterelay_mqtt_published_total",
        "counter",
        "Records published since start (resends included).",
        m.published as f64,
    );
    o.one(
        "siterelay_mqtt_delivered_total",
        "counter",
        "Records the broker confirmed (PUBACK) since start.",
        m.acked as f64,
    );
    o.one(
        "siterelay_mqtt_refused_total",
        "counter",
        "PUBACKs with a failure reason code since start.",
        m.refused as f64,
    );
    o.one(
        "siterelay_mqtt_packet_limit_bytes",
        "gauge",
        "The MQTT packet limit records are held to (0 before the first connection).",
        m.packet_limit_bytes as f64,
    );

    o.family(
        "siterelay_certificate_days_left",
        "gauge",
        "Days until the certificate expires (negative: expired).",
    );
    for (which, days) in [
        ("client", h.certificates.client_days_left),
        ("ca", h.certificates.ca_days_left),
    ] {
        if let Some(d) = days {
            o.sample(
                "siterelay_certificate_days_left",
                &[("certificate", which)],
                d as f64,
            );
        }
    }
    if let Some(s) = h.clock.synchronized {
        o.one(
            "siterelay_clock_synchronized",
            "gauge",
            "1 when the kernel clock is synchronised (NTP).",
            flag(s),
        );
    }
    o.one(
        "siterelay_clock_suspect",
        "gauge",
        "1 when the wall clock is obviously wrong.",
        flag(h.clock.suspect),
    );
    if let Some(d) = h.disk_free_bytes {
        o.one(
            "siterelay_disk_free_bytes",
            "gauge",
            "Free bytes on the data directory's file system.",
            d as f64,
        );
    }
    if let Some(r) = h.rss_bytes {
        o.one(
            "siterelay_resident_memory_bytes",
            "gauge",
            "The daemon's resident memory.",
            r as f64,
        );
    }

    // Per feed: the health report's counters, then the outbox's queue depth.
    type FeedFigure = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::health::FeedHealth) -> f64,
    );
    let per_feed: [FeedFigure; 9] = [
        (
            "siterelay_feed_up",
            "gauge",
            "1 when the feed is listening (MLLP) or its port is open (serial).",
            |f| flag(f.state == "listening" || f.state == "connected"),
        ),
        (
            "siterelay_feed_connected_peers",
            "gauge",
            "Connections open now.",
            |f| f.connected_peers as f64,
        ),
        (
            "siterelay_feed_received_total",
            "counter",
            "Complete messages received since start.",
            |f| f.received as f64,
        ),
        (
            "siterelay_feed_duplicates_total",
            "counter",
            "Resends recognised as duplicates since start.",
            |f| f.duplicates as f64,
        ),
        (
            "siterelay_feed_quarantined_total",
            "counter",
            "Messages answered AE and quarantined since start.",
            |f| f.quarantined as f64,
        ),
        (
            "siterelay_feed_ignored_total",
            "counter",
            "Messages outside the feed's accept list, acknowledged and dropped, since start.",
            |f| f.ignored as f64,
        ),
        (
            "siterelay_feed_oversized_total",
            "counter",
            "Frames over the size limit since start.",
            |f| f.oversized as f64,
        ),
        (
            "siterelay_feed_incomplete_total",
            "counter",
            "Frames never finished since start.",
            |f| f.incomplete as f64,
        ),
        (
            "siterelay_feed_held_records",
            "gauge",
            "Records of this feed held now.",
            |f| f.held as f64,
        ),
    ];
    for (name, kind, help, value) in per_feed {
        o.family(name, kind, help);
        for f in &h.feeds {
            o.sample(name, &[("feed", &f.name)], value(f));
        }
    }
    o.family(
        "siterelay_feed_acks_total",
        "counter",
        "Acknowledgements sent since start, by MSA-1 code.",
    );
    for f in &h.feeds {
        for (code, n) in [("AA", f.acks.AA), ("AE", f.acks.AE), ("AR", f.acks.AR)] {
            o.sample(
                "siterelay_feed_acks_total",
                &[("feed", &f.name), ("code", code)],
                n as f64,
            );
        }
    }
    let from_store: [(&str, &str, fn(&FeedStats) -> f64); 3] = [
        (
            "siterelay_feed_pending_records",
            "Records of this feed waiting for the broker (the queue depth).",
            |s| s.pending as f64,
        ),
        (
            "siterelay_feed_pending_bytes",
            "Bytes of this feed's pending records.",
            |s| s.pending_bytes as f64,
        ),
        (
            "siterelay_feed_delivered_records",
            "Delivered records of this feed still kept (store.retain_delivered).",
            |s| s.delivered as f64,
        ),
    ];
    for (name, help, value) in from_store {
        o.family(name, "gauge", help);
        for s in stats {
            o.sample(name, &[("feed", &s.feed)], value(s));
        }
    }
    o.text
}

/// What to print when the daemon does not answer: `siterelay_up 0`, so an alert can fire on it.
pub fn render_down() -> String {
    let mut o = Out {
        text: String::new(),
    };
    o.one(
        "siterelay_up",
        "gauge",
        "1 when the daemon answered on its status socket.",
        0.0,
    );
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_integers_have_no_fraction() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(-2.0), "-2");
        assert_eq!(number(1.5), "1.5");
    }
}
