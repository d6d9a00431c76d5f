//! How `siterelay watch` copes with a large fleet: applies status and health messages for N
//! appliances to the watcher's state machine and times the per-message work and a full table
//! redraw. Prints figures; asserts nothing.
//!
//! ```text
//! cargo run --release --example watch_bench -- 500
//! ```

use std::time::Instant;

use siterelay::watch::{Fleet, render_table};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let health = |i: usize| {
        serde_json::to_vec(&serde_json::json!({
            "schema": "siterelay.health.v1", "appliance": format!("box-{i}"), "at": "2026-11-30T00:00:00Z",
            "uptime_secs": 60,
            "outbox": {"pending_count": i, "pending_bytes": 0, "oldest_pending_age_secs": 1.0,
                       "delivered_last_interval": 0, "store_bytes": 0, "store_max_bytes": 1, "refused_full": 0},
            "feeds": [{"name": "adt", "kind": "mllp", "state": "listening", "connected_peers": 1,
                       "received": 1, "acks": {"AA": 1, "AE": 0, "AR": 0}, "duplicates": 0,
                       "discarded_bytes": 0, "oversized": 0, "incomplete": 0}],
            "mqtt": {"broker": "x:1", "connected": true, "connects": 1, "connection_failures": 0,
                     "published": 1, "acked": 1, "refused": 0},
            "certificates": {"client_days_left": 100},
            "clock": {"synchronized": true, "suspect": false}
        }))
        .unwrap()
    };
    let status = |i: usize| {
        serde_json::to_vec(&serde_json::json!({
            "schema": "siterelay.status.v1", "appliance": format!("box-{i}"), "state": "online", "bdseq": 1
        }))
        .unwrap()
    };
    let mut fleet = Fleet::new("siterelay", 90);
    let rounds = 10;
    let t = Instant::now();
    for r in 0..rounds {
        for i in 0..n {
            let now = (r * 30_000_000) as i64;
            fleet.apply(&format!("siterelay/box-{i}/status"), &status(i), now);
            fleet.apply(&format!("siterelay/box-{i}/health"), &health(i), now);
        }
    }
    let per_msg = t.elapsed() / (rounds * n * 2) as u32;
    let t = Instant::now();
    let draws = 20;
    let mut bytes = 0;
    for _ in 0..draws {
        bytes += render_table(&fleet.rows(300_000_000)).len();
    }
    let per_draw = t.elapsed() / draws;
    println!(
        "{n} appliances: {per_msg:?} per status/health message (JSON parse included); {per_draw:?} per full table redraw ({} bytes); redraws happen once a second",
        bytes / draws as usize
    );
}
