//! HL7 DTM/TS timestamps to RFC 3339, keeping their precision and saying where the zone came from.
//!
//! `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`. A value with an hour or finer becomes an
//! instant written with its offset (`2026-06-01T10:30:00+01:00`); when the message gave no offset the
//! feed's time zone supplies it (so BST and GMT both come out right) and `zone` says `assumed`.
//! A value with day precision or coarser stays a date (`2026-06-01`, `2026-06`, `2026`) and is
//! never turned into an instant: a birth date must not move across midnight.

use jiff::civil::{Date, DateTime};
use jiff::tz::{Offset, TimeZone};
use serde::Serialize;

/// Precision of an HL7 timestamp, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `YYYY`
    Year,
    /// `YYYYMM`
    Month,
    /// `YYYYMMDD`
    Day,
    /// `YYYYMMDDHH`
    Hour,
    /// `YYYYMMDDHHMM`
    Minute,
    /// `YYYYMMDDHHMMSS`
    Second,
    /// `YYYYMMDDHHMMSS.S` to `.SSSS`
    Fraction,
}

/// Where the offset of an instant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneSource {
    /// The message carried `+/-ZZZZ`.
    Given,
    /// The feed's configured time zone was applied.
    Assumed,
}

/// A normalised timestamp as it appears in records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimeValue {
    /// RFC 3339 instant (hour precision or finer) or ISO 8601 date (day precision or coarser).
    pub value: String,
    /// The HL7 string exactly as sent.
    pub hl7: String,
    /// Precision as sent.
    pub precision: Precision,
    /// For instants: whether the offset was in the message or assumed from the feed's zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<ZoneSource>,
}

fn digits(s: &str, from: usize, n: usize) -> Option<i32> {
    let part = s.get(from..from + n)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

/// Parse an HL7 DTM/TS value (only its first component, `TS.1`, is considered).
/// Returns `None` when it is not a valid timestamp.
pub fn parse_dtm(raw: &str, tz: &TimeZone, component_sep: u8) -> Option<TimeValue> {
    let first = raw.split(component_sep as char).next().unwrap_or("").trim();
    if first.is_empty() {
        return None;
    }
    let (body, offset) = match first.find(['+', '-']) {
        Some(i) => {
            let (b, o) = first.split_at(i);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            if o.len() != 5 {
                return None;
            }
            let hh = digits(o, 1, 2)?;
            let mm = digits(o, 3, 2)?;
            if hh > 14 || mm > 59 {
                return None;
            }
            (
                b,
                Some(Offset::from_seconds(sign * (hh * 3600 + mm * 60)).ok()?),
            )
        }
        None => (first, None),
    };
    let (main, frac) = match body.split_once('.') {
        Some((m, f)) => {
            if f.is_empty()
                || f.len() > 4
                || !f.bytes().all(|b| b.is_ascii_digit())
                || m.len() != 14
            {
                return None;
            }
            (m, Some(f))
        }
        None => (body, None),
    };
    let precision = match (main.len(), frac) {
        (14, Some(_)) => Precision::Fraction,
        (4, _) => Precision::Year,
        (6, _) => Precision::Month,
        (8, _) => Precision::Day,
        (10, _) => Precision::Hour,
        (12, _) => Precision::Minute,
        (14, _) => Precision::Second,
        _ => return None,
    };
    let year = digits(main, 0, 4)? as i16;
    let month = if main.len() >= 6 {
        digits(main, 4, 2)? as i8
    } else {
        1
    };
    let day = if main.len() >= 8 {
        digits(main, 6, 2)? as i8
    } else {
        1
    };
    let date = Date::new(year, month, day).ok()?;
    if precision <= Precision::Day {
        let value = match precision {
            Precision::Year => format!("{year:04}"),
            Precision::Month => format!("{year:04}-{month:02}"),
            _ => date.to_string(),
        };
        return Some(TimeValue {
            value,
            hl7: raw.to_string(),
            precision,
            zone: None,
        });
    }
    let hour = digits(main, 8, 2)? as i8;
    let minute = if main.len() >= 12 {
        digits(main, 10, 2)? as i8
    } else {
        0
    };
    let second = if main.len() >= 14 {
        digits(main, 12, 2)? as i8
    } else {
        0
    };
    let nanos = match frac {
        Some(f) => format!("{f:0<9}").parse::<i32>().ok()?,
        None => 0,
    };
    let dt = DateTime::new(year, month, day, hour, minute, second, nanos).ok()?;
    let (zoned, zone) = match offset {
        Some(off) => (
            dt.to_zoned_datetime(TimeZone::fixed(off)).ok()?,
            ZoneSource::Given,
        ),
        None => (dt.to_zoned_datetime(tz.clone()).ok()?, ZoneSource::Assumed),
    };
    let off = zoned.offset();
    let secs = off.seconds();
    let sign = if secs < 0 { '-' } else { '+' };
    let (oh, om) = (secs.abs() / 3600, (secs.abs() % 3600) / 60);
    let frac_txt = match frac {
        Some(f) => format!(".{f}"),
        None => String::new(),
    };
    let value = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}{}{:02}:{:02}",
        zoned.year(),
        zoned.month(),
        zoned.day(),
        zoned.hour(),
        zoned.minute(),
        zoned.second(),
        frac_txt,
        sign,
        oh,
        om
    );
    Some(TimeValue {
        value,
        hl7: raw.to_string(),
        precision,
        zone: Some(zone),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn london() -> TimeZone {
        TimeZone::get("Europe/London").unwrap()
    }

    #[test]
    fn unzoned_times_take_the_feed_zone_on_both_sides_of_the_clock_change() {
        // 2026-03-29 01:00 UTC clocks go forward in the UK.
        let winter = parse_dtm("20260328120000", &london(), b'^').unwrap();
        assert_eq!(winter.value, "2026-03-28T12:00:00+00:00");
        assert_eq!(winter.zone, Some(ZoneSource::Assumed));
        let summer = parse_dtm("20260330120000", &london(), b'^').unwrap();
        assert_eq!(summer.value, "2026-03-30T12:00:00+01:00");
    }

    #[test]
    fn given_offset_is_kept_and_marked_given() {
        let t = parse_dtm("202607011030-0500", &london(), b'^').unwrap();
        assert_eq!(t.value, "2026-07-01T10:30:00-05:00");
        assert_eq!(t.precision, Precision::Minute);
        assert_eq!(t.zone, Some(ZoneSource::Given));
    }

    #[test]
    fn dates_stay_dates_in_summer_time() {
        let t = parse_dtm("19800615", &london(), b'^').unwrap();
        assert_eq!(t.value, "1980-06-15");
        assert_eq!(t.precision, Precision::Day);
        assert_eq!(t.zone, None);
        assert_eq!(
            parse_dtm("198006", &london(), b'^').unwrap().value,
            "1980-06"
        );
        assert_eq!(parse_dtm("1980", &london(), b'^').unwrap().value, "1980");
    }

    #[test]
    fn fractions_keep_their_digits() {
        let t = parse_dtm("20261130093000.12+0000", &london(), b'^').unwrap();
        assert_eq!(t.value, "2026-11-30T09:30:00.12+00:00");
        assert_eq!(t.precision, Precision::Fraction);
    }

    #[test]
    fn invalid_values_are_rejected() {
        for bad in [
            "",
            "2026133",
            "20261301",
            "20260230",
            "2026113025",
            "20261130.5",
            "abc",
            "20261130+1",
        ] {
            assert_eq!(parse_dtm(bad, &london(), b'^'), None, "{bad}");
        }
    }

    #[test]
    fn only_the_first_component_counts() {
        let t = parse_dtm("20261130^S", &london(), b'^').unwrap();
        assert_eq!(t.value, "2026-11-30");
        assert_eq!(t.hl7, "20261130^S");
    }
}
