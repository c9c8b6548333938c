//! RFC 3339 timestamps for audit records.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 3339 in UTC: `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`.
///
/// Our own because it must be total: a certificate's notAfter comes from
/// the upstream and may lie before 1970 or after 9999, where humantime
/// panics or fails. Years outside 0000..=9999 are clamped to those bounds
/// (RFC 3339 has four-digit years).
pub(crate) fn rfc3339(t: SystemTime, micros: bool) -> String {
    // Seconds and microseconds since the epoch, floored (so pre-epoch
    // instants still have a fraction in 0..1_000_000).
    let (mut secs, mut micro) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_micros()),
        Err(e) => {
            let d = e.duration();
            let s = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_micros() {
                0 => (-s, 0),
                us => (-s - 1, 1_000_000 - us),
            }
        }
    };
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const MIN: i64 = -62_167_219_200;
    const MAX: i64 = 253_402_300_799;
    if secs < MIN {
        (secs, micro) = (MIN, 0);
    } else if secs > MAX {
        (secs, micro) = (MAX, 999_999);
    }
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if micros {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micro:06}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: i64, micros: u32) -> SystemTime {
        let base = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        base + Duration::from_micros(u64::from(micros))
    }

    #[test]
    fn rfc3339_table() {
        let cases: &[(i64, u32, &str)] = &[
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (1_795_442_587, 123_456, "2026-11-23T14:03:07.123456Z"),
            (951_782_400, 1, "2000-02-29T00:00:00.000001Z"),
            (-1, 500_000, "1969-12-31T23:59:59.500000Z"),
            (-86_400 * 365, 0, "1969-01-01T00:00:00.000000Z"),
            (253_402_300_799, 999_999, "9999-12-31T23:59:59.999999Z"),
            (253_402_300_800, 0, "9999-12-31T23:59:59.999999Z"),
            (-62_167_219_200, 0, "0000-01-01T00:00:00.000000Z"),
            (-62_167_219_201, 0, "0000-01-01T00:00:00.000000Z"),
        ];
        for &(secs, us, want) in cases {
            assert_eq!(rfc3339(at(secs, us), true), want, "secs={secs} us={us}");
        }
        assert_eq!(rfc3339(at(1_795_442_587, 999_999), false), "2026-11-23T14:03:07Z");
        // Instants before the epoch with a fraction floor correctly.
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_micros(1), true), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn rfc3339_agrees_with_humantime_after_the_epoch() {
        for secs in [0u64, 59, 86_399, 1_000_000_000, 1_700_000_000, 4_102_444_800] {
            for us in [0u32, 1, 999_999] {
                let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(us.into());
                assert_eq!(rfc3339(t, true), humantime::format_rfc3339_micros(t).to_string());
            }
        }
    }
}
