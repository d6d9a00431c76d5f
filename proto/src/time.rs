//! HL7 DTM/TS timestamps to RFC 3339, keeping their precision and saying where the zone came from.
//!
//! `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`. A value with an hour or finer becomes an
//! instant written with its offset (`2026-06-01T10:30:00+01:00`); when the message gave no offset the
//! feed's time zone supplies it (so BST and GMT both come out right) and `zone` says `assumed`.
//! A value with day precision or coarser stays a date (`2026-06-01`, `2026-06`, `2026`) and is
//! never turned into an instant: a birth date must not move across midnight.

use jiff::civil::{Date, DateTime};
use jiff::tz::{Offset, TimeZone};
use memchr::memchr;
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
    if part.is_empty() {
        return None;
    }
    part.bytes().try_fold(0i32, |v, b| {
        let d = b.is_ascii_digit().then(|| i32::from(b - b'0'))?;
        v.checked_mul(10)?.checked_add(d)
    })
}

/// Parse an HL7 DTM/TS value (only its first component, `TS.1`, is considered).
/// Returns `None` when it is not a valid timestamp.
pub fn parse_dtm(raw: &str, tz: &TimeZone, component_sep: u8) -> Option<TimeValue> {
    let first = if component_sep.is_ascii() {
        let end = memchr(component_sep, raw.as_bytes()).unwrap_or(raw.len());
        // An ASCII byte is always a character boundary.
        &raw[..end]
    } else {
        raw.split(char::from(component_sep)).next().unwrap_or("")
    }
    .trim();
    if first.is_empty() {
        return None;
    }
    let (body, offset) = match first.bytes().position(|b| b == b'+' || b == b'-') {
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
    let (main, frac) = match memchr(b'.', body.as_bytes()).map(|i| (&body[..i], &body[i + 1..])) {
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
        let mut value = Ascii::default();
        value.num(year.into(), 4);
        if precision >= Precision::Month {
            value.push(b'-');
            value.num(month.into(), 2);
        }
        if precision == Precision::Day {
            value.push(b'-');
            value.num(date.day().into(), 2);
        }
        let value = value.into_string();
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
    // The fraction's digits (1 to 4, checked above) as nanoseconds.
    let nanos = frac.map_or(0, |f| {
        let n = f.bytes().fold(0, |n, b| n * 10 + i32::from(b - b'0'));
        (f.len()..9).fold(n, |n, _| n * 10)
    });
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
    let sign = if secs < 0 { b'-' } else { b'+' };
    let (oh, om) = (secs.abs() / 3600, (secs.abs() % 3600) / 60);
    // `YYYY-MM-DDTHH:MM:SS[.F]+HH:MM`, written without the formatting machinery (hot path).
    let mut value = Ascii::default();
    value.num(zoned.year().into(), 4);
    for (sep, n) in [
        (b'-', zoned.month()),
        (b'-', zoned.day()),
        (b'T', zoned.hour()),
        (b':', zoned.minute()),
        (b':', zoned.second()),
    ] {
        value.push(sep);
        value.num(n.into(), 2);
    }
    if let Some(f) = frac {
        value.push(b'.');
        // At most four ASCII digits, checked above.
        f.bytes().for_each(|b| value.push(b));
    }
    value.push(sign);
    value.num(oh, 2);
    value.push(b':');
    value.num(om, 2);
    let value = value.into_string();
    Some(TimeValue {
        value,
        hl7: raw.to_string(),
        precision,
        zone: Some(zone),
    })
}

/// A time of day exactly as sent, with no date and no zone conversion: a time of birth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalTime {
    /// `HH`, `HH:MM`, `HH:MM:SS` or `HH:MM:SS.F` (1 to 4 digits), as many parts as were sent.
    pub value: String,
    /// `hour`, `minute`, `second` or `fraction`.
    pub precision: Precision,
    /// The UTC offset sent with the value (`+01:00`); informative only, never applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
}

/// A date of birth (PID-7, and the like): the calendar date exactly as sent, never moved by a
/// zone, and the time of day as its own local value when the sender gave one. `hl7` in the date
/// keeps the whole original. None when it is not a valid HL7 DTM/TS.
pub fn parse_birth(raw: &str, component_sep: u8) -> Option<(TimeValue, Option<LocalTime>)> {
    // UTC has no gaps, so every valid civil time reads back unchanged; an offset that was sent
    // is kept as sent (the civil fields are not converted either way).
    let tv = parse_dtm(raw, &TimeZone::UTC, component_sep)?;
    if tv.precision <= Precision::Day {
        return Some((tv, None));
    }
    // `YYYY-MM-DDTHH:MM:SS[.F]+HH:MM`: the date, the time, the offset.
    let v = &tv.value;
    let date = v.get(..10)?.to_owned();
    let (civil_time, off) = v.get(11..)?.split_at(v.len() - 11 - 6);
    let shown = match tv.precision {
        Precision::Hour => &civil_time[..2],
        Precision::Minute => &civil_time[..5],
        _ => civil_time,
    };
    let time = LocalTime {
        value: shown.to_owned(),
        precision: tv.precision,
        offset: (tv.zone == Some(ZoneSource::Given)).then(|| off.to_owned()),
    };
    let date = TimeValue {
        value: date,
        hl7: tv.hl7,
        precision: Precision::Day,
        zone: None,
    };
    Some((date, Some(time)))
}

/// A short ASCII text built on the stack (a timestamp is at most 30 bytes).
struct Ascii {
    buf: [u8; 40],
    len: usize,
}

impl Default for Ascii {
    fn default() -> Self {
        Ascii {
            buf: [0; 40],
            len: 0,
        }
    }
}

impl Ascii {
    /// Appends an ASCII byte (dropped, never reached, if the buffer were full).
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// Appends `n` zero-padded to `width` characters, sign included, as
    /// `format!("{n:0width$}")` does.
    fn num(&mut self, n: i32, width: usize) {
        let mut width = width;
        if n < 0 {
            self.push(b'-');
            width = width.saturating_sub(1);
        }
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for _ in (digits.len() - i)..width {
            self.push(b'0');
        }
        digits[i..].iter().for_each(|&d| self.push(d));
    }

    fn into_string(self) -> String {
        // Only ASCII bytes are ever pushed.
        std::str::from_utf8(&self.buf[..self.len])
            .unwrap_or_default()
            .to_owned()
    }
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
    fn every_part_is_zero_padded() {
        let utc = TimeZone::UTC;
        for (hl7, value) in [
            ("0001", "0001"),
            ("000102", "0001-02"),
            ("00010203", "0001-02-03"),
            ("0001020304", "0001-02-03T04:00:00+00:00"),
            ("20260102030405.0006-0930", "2026-01-02T03:04:05.0006-09:30"),
            ("202601020304+0005", "2026-01-02T03:04:00+00:05"),
        ] {
            assert_eq!(parse_dtm(hl7, &utc, b'^').unwrap().value, value, "{hl7}");
        }
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

    #[test]
    fn a_birth_date_with_a_time_stays_the_date_sent_and_the_time_is_its_own_local_value() {
        // The finding: 199909090000 became 1999-09-09T00:00:00+01:00, which a consumer
        // converting to UTC files on 8 September.
        let (date, time) = parse_birth("199909090000", b'^').unwrap();
        assert_eq!(date.value, "1999-09-09");
        assert_eq!(date.hl7, "199909090000");
        assert_eq!(date.precision, Precision::Day);
        assert_eq!(date.zone, None);
        let time = time.unwrap();
        assert_eq!(
            (time.value.as_str(), time.precision, time.offset),
            ("00:00", Precision::Minute, None)
        );
        let table: &[(&str, &str, Option<(&str, Precision, Option<&str>)>)] = &[
            ("19990909", "1999-09-09", None),
            ("199909", "1999-09", None),
            ("1999", "1999", None),
            (
                "1999090923",
                "1999-09-09",
                Some(("23", Precision::Hour, None)),
            ),
            (
                "19990909235959",
                "1999-09-09",
                Some(("23:59:59", Precision::Second, None)),
            ),
            (
                "19990909235959.12",
                "1999-09-09",
                Some(("23:59:59.12", Precision::Fraction, None)),
            ),
            // An offset is reported, never applied: 23:30 at -0500 is still the 9th.
            (
                "199909092330-0500",
                "1999-09-09",
                Some(("23:30", Precision::Minute, Some("-05:00"))),
            ),
            (
                "20260329013000",
                "2026-03-29",
                Some(("01:30:00", Precision::Second, None)),
            ),
        ];
        for (raw, date, time) in table {
            let (d, t) = parse_birth(raw, b'^').unwrap();
            assert_eq!(d.value, *date, "{raw}");
            assert_eq!(
                t.map(|t| (t.value, t.precision, t.offset)),
                time.map(|(v, p, o)| (v.to_owned(), p, o.map(str::to_owned))),
                "{raw}"
            );
        }
        assert!(parse_birth("19991309", b'^').is_none());
    }
}
