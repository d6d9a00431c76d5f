//! The wall clock, injectable: what the daemon stamps and compares calendar times with.
//!
//! A Raspberry Pi has no real-time clock: it boots in 1970 (or at the last shutdown time, or at
//! the build date of systemd) and the clock *steps* to the right time when NTP first answers,
//! possibly long after siterelay started; a box with a drifting RTC steps back. Two kinds of
//! time are therefore kept apart:
//!
//! - **Monotonic time** (`std::time::Instant`, `tokio::time`): every timer, timeout, backoff,
//!   rate limit and interval. It never steps. Nothing in the daemon measures a *duration* with
//!   the wall clock (`tests/clock_audit.rs` fails if a wall-clock read appears outside the files
//!   allowed to make one).
//! - **Wall time** ([`Clock`]): only where a calendar time is *recorded* (a message's
//!   `received_at`, a delivery or quarantine stamp, a hold's `since`, a report's `at`) or
//!   *compared with one stored* (retention, the duplicate window, certificate expiry). The
//!   outbox notices when this clock steps (it compares it with the monotonic clock) and
//!   restamps what it recorded before the step (`outbox/steps.rs`).
//!
//! [`Clock::system`] is the production clock: one `clock_gettime` per read, as before.
//! [`Clock::manual`] is a test clock that only moves when told, on its wall side
//! ([`Clock::set`], [`Clock::step`]: the calendar jumps, monotonic time does not) or on both
//! ([`Clock::advance`]: time passes).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// The earliest wall time this build can run at: a clock reading earlier than this is certainly
/// wrong (siterelay did not exist before it). 2026-01-01T00:00:00Z, in µs since the epoch.
pub const PLAUSIBLE_FROM_US: i64 = 1_767_225_600 * 1_000_000;

/// Where wall time comes from. Cheap to clone (a tag, or one `Arc`).
#[derive(Clone, Default)]
pub struct Clock(Source);

#[derive(Clone, Default)]
enum Source {
    /// The system's clocks (`CLOCK_REALTIME`, `CLOCK_MONOTONIC`).
    #[default]
    System,
    /// A test clock.
    Manual(Arc<Manual>),
}

/// A manual clock's two readings, µs.
#[derive(Debug)]
struct Manual {
    wall_us: AtomicI64,
    mono_us: AtomicI64,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Source::System => f.write_str("Clock::system"),
            Source::Manual(m) => write!(
                f,
                "Clock::manual(wall {} µs, monotonic {} µs)",
                m.wall_us.load(Ordering::Relaxed),
                m.mono_us.load(Ordering::Relaxed)
            ),
        }
    }
}

/// The origin of [`Clock::mono_us`] for the system clock (first use in this process).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// A test clock reading `wall_us` (µs since the epoch); it moves only when told.
    pub fn manual(wall_us: i64) -> Clock {
        Clock(Source::Manual(Arc::new(Manual {
            wall_us: AtomicI64::new(wall_us),
            mono_us: AtomicI64::new(0),
        })))
    }

    /// Wall time, µs since the Unix epoch.
    pub fn now_us(&self) -> i64 {
        match &self.0 {
            Source::System => jiff::Timestamp::now().as_microsecond(),
            Source::Manual(m) => m.wall_us.load(Ordering::SeqCst),
        }
    }

    /// Wall time, whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> i64 {
        self.now_us().div_euclid(1_000_000)
    }

    /// Monotonic time, µs since an arbitrary origin: never steps (the outbox compares it with
    /// [`Clock::now_us`] to notice steps of the wall clock).
    pub fn mono_us(&self) -> i64 {
        match &self.0 {
            Source::System => origin().elapsed().as_micros() as i64,
            Source::Manual(m) => m.mono_us.load(Ordering::SeqCst),
        }
    }

    /// Whether this wall clock reads a time that is certainly wrong (before
    /// [`PLAUSIBLE_FROM_US`]).
    pub fn implausible(&self) -> bool {
        self.now_us() < PLAUSIBLE_FROM_US
    }

    /// Test clock: set the wall time (a step; monotonic time does not move). No effect on the
    /// system clock.
    pub fn set(&self, wall_us: i64) {
        if let Source::Manual(m) = &self.0 {
            m.wall_us.store(wall_us, Ordering::SeqCst);
        }
    }

    /// Test clock: step the wall time by `delta_us` (monotonic time does not move).
    pub fn step(&self, delta_us: i64) {
        if let Source::Manual(m) = &self.0 {
            m.wall_us.fetch_add(delta_us, Ordering::SeqCst);
        }
    }

    /// Test clock: let `d` pass (both readings move).
    pub fn advance(&self, d: Duration) {
        if let Source::Manual(m) = &self.0 {
            let us = d.as_micros() as i64;
            m.mono_us.fetch_add(us, Ordering::SeqCst);
            m.wall_us.fetch_add(us, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_steps_its_wall_time_alone_and_advances_both() {
        let c = Clock::manual(1_000);
        let same = c.clone();
        c.step(5_000_000);
        assert_eq!((same.now_us(), same.mono_us()), (5_001_000, 0));
        c.advance(Duration::from_secs(2));
        assert_eq!((same.now_us(), same.mono_us()), (7_001_000, 2_000_000));
        c.set(42);
        assert_eq!(same.now_us(), 42);
        assert!(same.implausible());
        same.set(PLAUSIBLE_FROM_US);
        assert!(!c.implausible());
    }

    #[test]
    fn the_system_clock_reads_the_system_time_and_its_monotonic_reading_never_goes_back() {
        let c = Clock::system();
        let before = jiff::Timestamp::now().as_microsecond();
        let now = c.now_us();
        assert!((now - before).abs() < 60_000_000, "{now} vs {before}");
        let a = c.mono_us();
        let b = c.mono_us();
        assert!(b >= a);
        // Steps are for test clocks only.
        c.step(1_000_000_000);
        assert!((c.now_us() - before).abs() < 60_000_000);
    }
}
