//! Clock steps (issue 12): a Raspberry Pi without an RTC boots in 1970 and steps to the right
//! time when NTP first answers. The daemon runs here on a test wall clock
//! (`Daemon::start_with_clock`) over real sockets, a real SQLite file and the in-process
//! mutual-TLS broker; the system clock is never touched. Timers (backoff, PUBACK timeouts, the
//! health interval) run on monotonic time whatever this clock does: the health reports below
//! keep coming across the step, and `tests/clock_audit.rs` keeps wall-clock reads out of timer
//! code.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterelay::app::Daemon;
use siterelay::clock::Clock;

/// 2026-12-03T08:00:00Z, µs.
fn synced() -> i64 {
    "2026-12-03T08:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_microsecond()
}

/// The next payload on a topic ending in `suffix` that satisfies `want`.
async fn next_where(
    sub: &mut siterelay_testkit::subscriber::Subscriber,
    suffix: &str,
    timeout: Duration,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (topic, payload, _) = sub
            .recv(left)
            .await
            .unwrap_or_else(|| panic!("nothing matching on */{suffix} in {timeout:?}"));
        if topic.ends_with(suffix) {
            let v: Value = serde_json::from_slice(&payload).unwrap();
            if want(&v) {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_that_booted_in_1970_keeps_its_records_and_duplicate_window_when_ntp_steps_it_to_2026()
 {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut records = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut health = broker.subscribe(&env, "siterelay/test-box/health").await;
    let text = env.config_text(
        broker.port,
        &[("adt", "127.0.0.1:0")],
        "health_interval_secs = 5",
    ) + "dedup_window = \"1d\"\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let clock = Clock::manual(30_000_000);
    let d = Daemon::start_with_clock(&cfg, clock.clone()).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    for i in 0..3 {
        assert_eq!(
            c.send(&adt(&format!("T{i}")), ACK_WAIT).await.unwrap().code,
            "AA"
        );
    }
    assert_eq!(
        c.send(b"this is not HL7 at all", ACK_WAIT)
            .await
            .unwrap()
            .code,
        "AE"
    );
    let got = records.collect(3, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 3);
    for r in &got {
        let v = json(&r.1);
        check_schema("record", &v);
        // What the clock said: the central side reads `health.clock.suspect` (below) and
        // orders by seq, never by received_at.
        assert!(
            v["received_at"]
                .as_str()
                .unwrap()
                .starts_with("1970-01-01T"),
            "{v}"
        );
    }
    let before = next_where(&mut health, "/health", Duration::from_secs(20), |_| true).await;
    check_schema("health", &before);
    assert_eq!(before["clock"]["suspect"], true, "{}", before["clock"]);
    let outbox = d.outbox().clone();
    assert!(
        wait_until(Duration::from_secs(10), || outbox
            .gauges()
            .delivered
            .load(Ordering::Relaxed)
            == 3)
        .await
    );

    // Ten minutes later NTP answers: the clock steps 56 years forward.
    clock.advance(Duration::from_secs(600));
    clock.set(synced());
    // The sender resends T1 (its ACK was lost, say): recognised within the one-day window.
    assert_eq!(c.send(&adt("T1"), ACK_WAIT).await.unwrap().code, "AA");
    assert_eq!(
        d.telemetry().feed("adt").duplicates.load(Ordering::Relaxed),
        1,
        "the resend after the step is recognised"
    );
    assert_eq!(c.send(&adt("T9"), ACK_WAIT).await.unwrap().code, "AA");
    let after = records.collect(1, Duration::from_secs(20)).await;
    let v = json(&after[0].1);
    assert_eq!(v["seq"], 4, "the resend was not forwarded again: {v}");
    assert!(
        v["received_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-12-03T"),
        "{v}"
    );

    // Pruning right after the step keeps the delivered records (retain_delivered, 7 days,
    // runs from the step) and the quarantined message (30 days).
    outbox.prune().await;
    outbox.flush().await;
    let r = outbox.reader().unwrap();
    for row in 1..=3 {
        assert_eq!(r.row_state(row).unwrap(), Some("delivered"), "row {row}");
    }
    assert_eq!(r.quarantined(None).unwrap().len(), 1);

    // Health keeps coming on its (monotonic) interval, and says what happened.
    let stepped = next_where(&mut health, "/health", Duration::from_secs(20), |h| {
        h["clock"]["steps"].as_u64() >= Some(1)
    })
    .await;
    check_schema("health", &stepped);
    let clock_health = &stepped["clock"];
    assert_eq!(clock_health["suspect"], false, "{clock_health}");
    assert!(
        clock_health["last_step_secs"].as_f64().unwrap() > 1.7e9,
        "{clock_health}"
    );
    assert!(
        stepped["at"].as_str().unwrap().starts_with("2026-12-03T"),
        "{stepped}"
    );
    drop(r);
    // Every outbox handle must go for the writer to stop.
    drop(outbox);
    d.stop().await;
}
