//! Every read of the wall clock in the daemon, reviewed (issue 12, clock steps).
//!
//! The wall clock steps (a Pi without an RTC boots in 1970; NTP steps it later; an RTC drifts).
//! Timers, timeouts, backoff, rate limits and intervals must therefore use monotonic time
//! (`std::time::Instant`, `tokio::time`), and calendar times must come from the injectable
//! `siterelay::clock::Clock` where they are recorded or compared. This test lists every place
//! outside tests that reads the wall clock and fails when one appears, moves or goes, so that a
//! new one is looked at: is it a duration (then use `Instant`) or a calendar time (then say
//! why here)?

use std::collections::BTreeMap;
use std::path::Path;

/// What reads the wall clock.
const PATTERNS: [&str; 8] = [
    "SystemTime::now",
    "Timestamp::now",
    "Zoned::now",
    "ZonedDateTime::now",
    "UNIX_EPOCH",
    "unixepoch",
    "'now'",
    "chrono::",
];

/// Calls of the free function `now_us()` (the system clock), not the method `.now_us()` of a
/// `Clock`.
fn free_now_us(line: &str) -> usize {
    line.match_indices("now_us()")
        .filter(|(i, _)| {
            let before = &line[..*i];
            !before.ends_with('.') && !before.ends_with("fn ")
        })
        .count()
}

/// Every allowed read, per file, with its reason. Counts are exact.
const ALLOWED: &[(&str, usize, &str)] = &[
    ("src/clock.rs", 1, "the system clock itself (Clock::system)"),
    (
        "src/outbox/mod.rs",
        0,
        "(now_us() is defined here as Clock::system().now_us(), for display)",
    ),
    (
        "src/health.rs",
        1,
        "cert_days_left(path): check-config's certificate expiry, a calendar comparison at one moment",
    ),
    (
        "src/preflight.rs",
        1,
        "start-up checks: certificate validity dates against now (calendar)",
    ),
    (
        "src/app/expiry.rs",
        1,
        "the daily certificate-expiry warning in the log, for the MQTT and MLLP certificates in \
         use (calendar; the interval is tokio's)",
    ),
    (
        "src/sink/mqtt.rs",
        1,
        "seed of the reconnect jitter (any number will do)",
    ),
    (
        "src/telemetry.rs",
        1,
        "a feed's last_message_at in health (display)",
    ),
    (
        "src/outbox/reader.rs",
        1,
        "`queue stats`: age of the oldest pending message (display)",
    ),
    (
        "src/outbox/damage.rs",
        3,
        "a damaged store at start: when it was moved aside (a calendar note for people), and the \
         seq/bdseq floor for a store whose numbers cannot be read (now in microseconds, or the \
         damaged files' modification time if later; docs/contract.md states the clock assumption); \
         the third is in its unit tests",
    ),
    (
        "src/outbox/salvage.rs",
        1,
        "`queue salvage`: when the export was made (a note in salvaged.json)",
    ),
    (
        "src/enrol.rs",
        1,
        "`enrol --install-cert`: the certificate's validity dates against now (calendar, one moment)",
    ),
    (
        "src/watch.rs",
        3,
        "`siterelay watch` (central side): when a report arrived and how long ago (display)",
    ),
    (
        "src/intake/hl7.rs",
        4,
        "MSH-7 of the ACKs it builds (the sender's display; not stored)",
    ),
    (
        "src/intake/quarantine.rs",
        1,
        "MSH-7 of an AE built for a quarantined message (not stored)",
    ),
    (
        "proto/src/hl7/intake.rs",
        2,
        "ACK control-id prefix (unique per process) and MSH-7 of ACKs",
    ),
];

fn strip_tests(text: &str) -> &str {
    // Unit tests sit at the end of a file, in `#[cfg(test)] mod tests`.
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

fn scan(dir: &Path, root: &Path, out: &mut BTreeMap<String, usize>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            // Test-only modules (`#[cfg(test)] mod test_support;`).
            && !path.ends_with("test_support.rs")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = strip_tests(&text);
            let n: usize = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| {
                    PATTERNS.iter().map(|p| l.matches(p).count()).sum::<usize>() + free_now_us(l)
                })
                .sum();
            if n > 0 {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, n);
            }
        }
    }
}

#[test]
fn every_wall_clock_read_outside_tests_is_one_reviewed_for_clock_steps() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = BTreeMap::new();
    scan(&root.join("src"), root, &mut found);
    scan(&root.join("proto/src"), root, &mut found);
    let allowed: BTreeMap<String, usize> = ALLOWED
        .iter()
        .filter(|(_, n, _)| *n > 0)
        .map(|(f, n, _)| (f.to_string(), *n))
        .collect();
    assert_eq!(
        found, allowed,
        "wall-clock reads changed: a duration must use Instant/tokio::time, a calendar time the \
         injectable Clock where it is recorded or compared; list any other in ALLOWED with why"
    );
}

#[test]
fn the_audit_finds_a_wall_clock_read_in_timer_code() {
    // The scanner itself: what a timer written against the wall clock would look like.
    let line = "let deadline = now_us() + backoff; let t = std::time::SystemTime::now();";
    let n = PATTERNS
        .iter()
        .map(|p| line.matches(p).count())
        .sum::<usize>()
        + free_now_us(line);
    assert_eq!(n, 2);
    assert_eq!(free_now_us("self.outbox.clock().now_us()"), 0);
}
