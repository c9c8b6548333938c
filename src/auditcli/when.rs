//! Points in time: the records' `ts` and the operator's `--since`/`--until`.
//!
//! Records carry RFC 3339 UTC (`2026-11-23T14:03:07.123456Z`); operators
//! type either such a time (zone optional, date alone allowed) or a
//! duration meaning "that long ago" (`24h`, `7d`, `1h30m`).
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a `--since`/`--until` value was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error(
        "{0:?} is neither an RFC 3339 time (2026-11-23T14:03:07Z, 2026-11-23) \
         nor a duration ago (24h, 7d, 1h30m)"
    )]
    Unrecognised(String),
    #[error("{0:?} reaches back before 1970")]
    BeforeEpoch(String),
}

/// An operator's point in time: RFC 3339, or a duration before `now`.
pub fn parse_instant(text: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let text = text.trim();
    if let Some(t) = parse_rfc3339(text) {
        return Ok(t);
    }
    // Only after the absolute form failed: "2026" parses as neither, but a
    // bare number must not be read as seconds ago by accident, so humantime
    // (which demands a unit) is the right second try.
    match humantime::parse_duration(text) {
        Ok(ago) => {
            now.checked_sub(ago).filter(|t| *t >= UNIX_EPOCH).ok_or(TimeError::BeforeEpoch(text.into()))
        }
        Err(_) => Err(TimeError::Unrecognised(text.into())),
    }
}

/// RFC 3339, leniently: `YYYY-MM-DD`, optionally followed by `T` (or `t`,
/// or a space) and `HH:MM[:SS[.fraction]]`, optionally followed by `Z` or
/// `±HH:MM`. A missing time is midnight; a missing zone is UTC (the log's
/// zone). `None` for anything else, including impossible dates and
/// instants before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let mut p = Cursor { s: text.as_bytes(), i: 0 };
    let year = p.digits(4)?;
    p.expect(b'-')?;
    let month = p.digits(2)?;
    p.expect(b'-')?;
    let day = p.digits(2)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let (mut hh, mut mm, mut ss, mut nanos) = (0, 0, 0, 0u32);
    let mut offset_secs = 0i64;
    if p.eat(b'T') || p.eat(b't') || p.eat(b' ') {
        hh = p.digits(2)?;
        p.expect(b':')?;
        mm = p.digits(2)?;
        if p.eat(b':') {
            ss = p.digits(2)?;
            if p.eat(b'.') {
                nanos = p.fraction()?;
            }
        }
        // 60 is a leap second; it is read as the next minute's first.
        if hh > 23 || mm > 59 || ss > 60 {
            return None;
        }
        let utc = p.eat(b'Z') || p.eat(b'z');
        if let Some(sign) = p.peek().filter(|b| !utc && (*b == b'+' || *b == b'-')) {
            p.i += 1;
            let oh = p.digits(2)?;
            p.expect(b':')?;
            let om = p.digits(2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            offset_secs = if sign == b'+' { off } else { -off };
        }
    }
    if p.i != p.s.len() {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.i += usize::from(hit);
        hit
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    /// Exactly `n` ASCII digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let field = self.s.get(self.i..self.i + n)?;
        if !field.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.i += n;
        Some(field.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')))
    }

    /// One or more digits after the decimal point, as nanoseconds (digits
    /// past the ninth are dropped: nothing finer exists here).
    fn fraction(&mut self) -> Option<u32> {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        let digits = &self.s[start..self.i];
        if digits.is_empty() {
            return None;
        }
        let mut nanos = 0u32;
        for k in 0..9 {
            nanos = nanos * 10 + digits.get(k).map_or(0, |d| u32::from(d - b'0'));
        }
        Some(nanos)
    }
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, the inverse of the writer's `civil_from_days`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = (m + 9) % 12; // March is 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::rfc3339;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn rfc3339_table() {
        let cases: &[(&str, Option<SystemTime>)] = &[
            ("2026-11-23T14:03:07.123456Z", Some(at(1_795_442_587, 123_456_000))),
            ("2026-11-23T14:03:07Z", Some(at(1_795_442_587, 0))),
            ("2026-11-23t14:03:07z", Some(at(1_795_442_587, 0))),
            ("2026-11-23 14:03:07", Some(at(1_795_442_587, 0))),
            ("2026-11-23T14:03", Some(at(1_795_442_580, 0))),
            ("2026-11-23", Some(at(1_795_392_000, 0))),
            ("2026-11-23T15:03:07+01:00", Some(at(1_795_442_587, 0))),
            ("2026-11-23T09:33:07-04:30", Some(at(1_795_442_587, 0))),
            ("2026-11-23T14:03:07.1Z", Some(at(1_795_442_587, 100_000_000))),
            ("2026-11-23T14:03:07.1234567891Z", Some(at(1_795_442_587, 123_456_789))),
            ("1970-01-01T00:00:00Z", Some(at(0, 0))),
            ("2000-02-29T00:00:00Z", Some(at(951_782_400, 0))),
            ("2016-12-31T23:59:60Z", Some(at(1_483_228_800, 0))),
            // Not times, or impossible ones.
            ("", None),
            ("2026", None),
            ("2026-11", None),
            ("2026-13-01", None),
            ("2026-02-29", None),
            ("2026-04-31", None),
            ("2026-11-00", None),
            ("2026-11-23T24:00:00Z", None),
            ("2026-11-23T14:60Z", None),
            ("2026-11-23T14:03:07.Z", None),
            ("2026-11-23T14:03:07+0100", None),
            ("2026-11-23T14:03:07Z ", None),
            ("2026-11-23T14", None),
            ("1969-12-31T23:59:59Z", None),
            ("+2026-11-23", None),
            ("２０２６-11-23", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rfc3339(text), *want, "{text:?}");
        }
    }

    #[test]
    fn reads_back_what_the_writer_writes() {
        for secs in [0u64, 59, 86_399, 951_782_400, 1_795_442_587, 4_102_444_800, 253_402_300_799] {
            for micros in [0u32, 1, 999_999] {
                let t = at(secs, micros * 1000);
                assert_eq!(parse_rfc3339(&rfc3339(t, true)), Some(t), "{secs}.{micros}");
            }
        }
    }

    #[test]
    fn instant_table() {
        let now = at(1_795_442_587, 0);
        let cases: &[(&str, Result<SystemTime, TimeError>)] = &[
            ("24h", Ok(at(1_795_442_587 - 86_400, 0))),
            ("7d", Ok(at(1_795_442_587 - 7 * 86_400, 0))),
            ("1h30m", Ok(at(1_795_442_587 - 5_400, 0))),
            ("90s", Ok(at(1_795_442_587 - 90, 0))),
            (" 2w ", Ok(at(1_795_442_587 - 14 * 86_400, 0))),
            ("2026-11-23", Ok(at(1_795_392_000, 0))),
            ("2026-11-23T14:03:07Z", Ok(now)),
            ("60", Err(TimeError::Unrecognised("60".into()))),
            ("yesterday", Err(TimeError::Unrecognised("yesterday".into()))),
            ("-24h", Err(TimeError::Unrecognised("-24h".into()))),
            ("2026-11-31", Err(TimeError::Unrecognised("2026-11-31".into()))),
            ("100y", Err(TimeError::BeforeEpoch("100y".into()))),
        ];
        for (text, want) in cases {
            assert_eq!(&parse_instant(text, now), want, "{text:?}");
        }
    }
}
