//! Durations and sizes as people write them (configuration) and read them (reports).
//!
//! One parser per quantity, so `"10m"` means the same in every configuration key, and one
//! duration formatter, so an age reads the same in `siterelay status`, `siterelay queue stats`
//! and `siterelay watch`.

use std::time::Duration;

/// Parse a duration: a whole number with an optional unit, `ms`, `s`, `m`, `h` or `d`
/// (`"500ms"`, `"45s"`, `"30m"`, `"12h"`, `"7d"`); no unit means seconds (`"90"`). Spaces
/// around the number and unit are allowed (`"30 m"`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
}

/// Parse a size: `"512 MiB"`, `"2GiB"`, `"100 MB"`, `"4096"` (bytes).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A number of seconds for people, to two units: `42s`, `3m12s`, `5h04m`, `2d03h`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// [`human_secs`] of a [`Duration`] (whole seconds; the fraction is dropped).
pub fn human_duration(d: Duration) -> String {
    human_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("45s"), Some(s(45)));
        assert_eq!(parse_duration("10m"), Some(s(600)));
        assert_eq!(parse_duration("2h"), Some(s(7200)));
        assert_eq!(parse_duration("7d"), Some(s(604_800)));
        assert_eq!(parse_duration(" 30 m "), Some(s(1800)));
        assert_eq!(parse_duration("90"), Some(s(90)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "1w", "1.5h", "-1s", "m", "1h30m", "10 parsecs"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_duration(&format!("{}d", u64::MAX)), None);
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("100 MB"), Some(100_000_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("10 parsecs"), None);
    }

    #[test]
    fn durations_read_to_two_units() {
        assert_eq!(human_secs(42), "42s");
        assert_eq!(human_secs(192), "3m12s");
        assert_eq!(human_secs(3900), "1h05m");
        assert_eq!(human_secs(2 * 86_400 + 3 * 3600 + 59), "2d03h");
        assert_eq!(human_duration(Duration::from_millis(61_900)), "1m01s");
    }
}
