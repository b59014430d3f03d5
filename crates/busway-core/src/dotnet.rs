//! serde helpers for .NET value types in message contracts, written and read the way
//! MassTransit's System.Text.Json serializer does (`SystemTextJsonMessageSerializer`:
//! camelCase names, no string enum converter, decimals as strings).
//!
//! Use them with `#[serde(with = "busway::dotnet::time_span")]` on a field; each module has an
//! `option` child for `Option<T>` fields (`#[serde(default, with =
//! "busway::dotnet::time_span::option")]`).
//!
//! | C# | on the wire | Rust | attribute |
//! |---|---|---|---|
//! | `TimeSpan` | `"1.02:03:04.5000000"` | `std::time::Duration` | [`time_span`] |
//! | `DateTime` (Unspecified) | `"2026-12-03T10:00:00.1234567"` | `chrono::NaiveDateTime` | [`date_time`] |
//! | `DateTime` (Utc) | `"2026-12-03T10:00:00Z"` | `chrono::DateTime<Utc>` | [`date_time_utc`] |
//! | `DateTimeOffset` | `"2026-12-03T10:00:00+01:00"` | `chrono::DateTime<FixedOffset>` | [`date_time_offset`] |
//! | `byte[]` | base64 | `Vec<u8>` | [`bytes`] |
//!
//! `decimal` (a string; `rust_decimal::Decimal` reads a string or a number), `Guid`
//! (`uuid::Uuid`) and enums (numbers: `serde_repr`) need no helper; see
//! `docs/guide/dotnet-contracts.md`.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDateTime, Timelike, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

/// The serde functions of a module with `format(&$arg) -> String` and
/// `parse(&str) -> Result<$ty, String>`: `serialize` and `deserialize` for `$ty`, and an
/// `option` child for `Option<$ty>`.
macro_rules! string_form {
    ($ty:ty, $arg:ty) => {
        /// Writes [`format()`].
        pub fn serialize<S: Serializer>(value: &$arg, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_str(&format(value))
        }

        /// Reads [`parse()`].
        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
            parse(&String::deserialize(deserializer)?).map_err(D::Error::custom)
        }

        /// The same for an `Option` field (JSON `null` is `None`).
        pub mod option {
            use super::*;

            /// Writes `Some` as the plain form and `None` as `null`.
            pub fn serialize<S: Serializer>(
                value: &Option<$ty>,
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                match value {
                    Some(v) => super::serialize(v, serializer),
                    None => serializer.serialize_none(),
                }
            }

            /// Reads `null` (or a missing field, with `#[serde(default)]`) as `None`.
            pub fn deserialize<'de, D: Deserializer<'de>>(
                deserializer: D,
            ) -> Result<Option<$ty>, D::Error> {
                match Option::<String>::deserialize(deserializer)? {
                    Some(text) => super::parse(&text).map(Some).map_err(D::Error::custom),
                    None => Ok(None),
                }
            }
        }
    };
}

/// `TimeSpan` as System.Text.Json writes it (the `"c"` format): `[d.]hh:mm:ss[.fffffff]`,
/// days only when there are any, seven fraction digits when the ticks are not whole
/// seconds. Reads one to seven fraction digits; a negative span is an error (use a signed
/// type of your own for those).
///
/// ```
/// use std::time::Duration;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Retry {
///     #[serde(with = "busway_core::dotnet::time_span")]
///     after: Duration,
/// }
/// let json = serde_json::to_string(&Retry { after: Duration::from_millis(93_784_500) }).unwrap();
/// assert_eq!(json, r#"{"after":"1.02:03:04.5000000"}"#);
/// let back: Retry = serde_json::from_str(r#"{"after":"00:00:30"}"#).unwrap();
/// assert_eq!(back.after, Duration::from_secs(30));
/// ```
pub mod time_span {
    use super::*;

    string_form!(Duration, Duration);

    /// Formats `value` as .NET does (sub-tick nanoseconds are dropped).
    pub fn format(value: &Duration) -> String {
        let secs = value.as_secs();
        let ticks = u64::from(value.subsec_nanos()) / 100;
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let mut out = String::new();
        if days > 0 {
            let _ = write!(out, "{days}.");
        }
        let _ = write!(
            out,
            "{:02}:{:02}:{:02}",
            rest / 3600,
            rest % 3600 / 60,
            rest % 60
        );
        if ticks > 0 {
            let _ = write!(out, ".{ticks:07}");
        }
        out
    }

    /// Reads `[-][d.]hh:mm:ss[.f..fffffff]` (and `d` alone, as `TimeSpan.Parse` does).
    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = || format!("`{text}` is not a .NET TimeSpan ([d.]hh:mm:ss[.fffffff])");
        if text.starts_with('-') {
            return Err(format!(
                "`{text}` is a negative TimeSpan; Duration cannot hold it"
            ));
        }
        let (clock, fraction) = match text.rsplit_once('.') {
            Some((head, tail)) if head.contains(':') && !tail.contains(':') => (head, Some(tail)),
            _ => (text, None),
        };
        let (days, clock) = match clock.split_once('.') {
            Some((d, rest)) => (d.parse::<u64>().map_err(|_| bad())?, rest),
            None if !clock.contains(':') => {
                let days = clock.parse::<u64>().map_err(|_| bad())?;
                return Ok(Duration::from_secs(days * 86_400));
            }
            None => (0, clock),
        };
        let parts: Vec<&str> = clock.split(':').collect();
        let [h, m, s] = parts.as_slice() else {
            return Err(bad());
        };
        let field = |v: &str, max: u64| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n < max && !v.is_empty())
                .ok_or_else(bad)
        };
        let (h, m, s) = (field(h, 24)?, field(m, 60)?, field(s, 60)?);
        let ticks = match fraction {
            None => 0,
            Some(f) if (1..=7).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
                f.parse::<u64>().map_err(|_| bad())? * 10u64.pow(7 - f.len() as u32)
            }
            Some(_) => return Err(bad()),
        };
        let secs = days
            .checked_mul(86_400)
            .and_then(|d| d.checked_add(h * 3600 + m * 60 + s))
            .ok_or_else(bad)?;
        Ok(Duration::new(secs, (ticks * 100) as u32))
    }
}

/// The fraction .NET writes: up to seven digits, trailing zeros trimmed, none when zero.
fn trimmed_fraction(nanos: u32) -> String {
    let ticks = u64::from(nanos % 1_000_000_000) / 100;
    if ticks == 0 {
        return String::new();
    }
    let digits = format!("{ticks:07}");
    format!(".{}", digits.trim_end_matches('0'))
}

/// A `DateTime` of kind Unspecified, as System.Text.Json writes it: no offset, the fraction
/// trimmed (`2026-12-03T10:00:00`, `2026-12-03T10:00:00.1234567`). Reads that, and a string
/// with `Z` or an offset as the UTC time it names.
///
/// ```
/// use chrono::NaiveDateTime;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Shift {
///     #[serde(with = "busway_core::dotnet::date_time")]
///     starts: NaiveDateTime,
/// }
/// let s: Shift = serde_json::from_str(r#"{"starts":"2026-12-03T10:00:00.1234567"}"#).unwrap();
/// assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"starts":"2026-12-03T10:00:00.1234567"}"#);
/// ```
pub mod date_time {
    use super::*;

    string_form!(NaiveDateTime, NaiveDateTime);

    /// Formats `value` as .NET does.
    pub fn format(value: &NaiveDateTime) -> String {
        format!(
            "{}{}",
            value.format("%Y-%m-%dT%H:%M:%S"),
            trimmed_fraction(value.nanosecond())
        )
    }

    /// Reads an ISO 8601 date and time, with or without an offset.
    pub fn parse(text: &str) -> Result<NaiveDateTime, String> {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
            return Ok(t);
        }
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.naive_utc())
            .map_err(|e| format!("`{text}` is not a .NET DateTime: {e}"))
    }
}

/// A `DateTime` of kind Utc, as System.Text.Json writes it: `Z`, the fraction trimmed
/// (`2026-12-03T10:00:00Z`). Reads any RFC 3339 time (and one without an offset as UTC).
pub mod date_time_utc {
    use super::*;

    string_form!(DateTime<Utc>, DateTime<Utc>);

    /// Formats `value` as .NET does.
    pub fn format(value: &DateTime<Utc>) -> String {
        format!("{}Z", super::date_time::format(&value.naive_utc()))
    }

    /// Reads an RFC 3339 time, or one without an offset taken as UTC.
    pub fn parse(text: &str) -> Result<DateTime<Utc>, String> {
        super::date_time::parse(text).map(|t| t.and_utc())
    }
}

/// A `DateTimeOffset`, as System.Text.Json writes it: the offset always as `+hh:mm`
/// (`+00:00`, never `Z`), the fraction trimmed.
///
/// ```
/// use chrono::{DateTime, FixedOffset};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Booked {
///     #[serde(with = "busway_core::dotnet::date_time_offset")]
///     at: DateTime<FixedOffset>,
/// }
/// let b: Booked = serde_json::from_str(r#"{"at":"2026-12-03T10:00:00.5+01:00"}"#).unwrap();
/// assert_eq!(serde_json::to_string(&b).unwrap(), r#"{"at":"2026-12-03T10:00:00.5+01:00"}"#);
/// ```
pub mod date_time_offset {
    use super::*;

    string_form!(DateTime<FixedOffset>, DateTime<FixedOffset>);

    /// Formats `value` as .NET does.
    pub fn format(value: &DateTime<FixedOffset>) -> String {
        let offset = value.offset().local_minus_utc();
        let sign = if offset < 0 { '-' } else { '+' };
        let offset = offset.unsigned_abs();
        format!(
            "{}{sign}{:02}:{:02}",
            super::date_time::format(&value.naive_local()),
            offset / 3600,
            offset % 3600 / 60
        )
    }

    /// Reads an RFC 3339 time.
    pub fn parse(text: &str) -> Result<DateTime<FixedOffset>, String> {
        DateTime::parse_from_rfc3339(text)
            .map_err(|e| format!("`{text}` is not a .NET DateTimeOffset: {e}"))
    }
}

/// `byte[]` as System.Text.Json writes it: standard base64 with padding.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Scan {
///     #[serde(with = "busway_core::dotnet::bytes")]
///     image: Vec<u8>,
/// }
/// let json = serde_json::to_string(&Scan { image: vec![0, 1, 2, 253, 254, 255] }).unwrap();
/// assert_eq!(json, r#"{"image":"AAEC/f7/"}"#);
/// ```
pub mod bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    string_form!(Vec<u8>, [u8]);

    /// Formats `value` as base64.
    pub fn format(value: &[u8]) -> String {
        STANDARD.encode(value)
    }

    /// Reads base64.
    pub fn parse(text: &str) -> Result<Vec<u8>, String> {
        STANDARD
            .decode(text)
            .map_err(|e| format!("not base64 (a .NET byte[]): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings as .NET 8 writes them (`TimeSpan.ToString("c")`, System.Text.Json's
    /// trimmed round-trip dates).
    #[test]
    fn time_spans_like_dotnet() {
        let cases = [
            (Duration::ZERO, "00:00:00"),
            (Duration::from_secs(30), "00:00:30"),
            (Duration::from_millis(1500), "00:00:01.5000000"),
            (Duration::from_nanos(100), "00:00:00.0000001"),
            (
                Duration::from_secs(86_400 + 2 * 3600 + 3 * 60 + 4),
                "1.02:03:04",
            ),
            (Duration::from_secs(10 * 86_400), "10.00:00:00"),
        ];
        for (d, text) in cases {
            assert_eq!(time_span::format(&d), text);
            assert_eq!(time_span::parse(text), Ok(d), "{text}");
        }
        assert_eq!(
            time_span::parse("00:00:00.5"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(time_span::parse("3"), Ok(Duration::from_secs(3 * 86_400)));
        for bad in [
            "",
            "1:2",
            "00:60:00",
            "24:00:00",
            "00:00:00.12345678",
            "-00:00:01",
            "a.b",
        ] {
            assert!(time_span::parse(bad).is_err(), "{bad}");
        }
        // Sub-tick precision is dropped, as .NET cannot hold it.
        assert_eq!(
            time_span::format(&Duration::from_nanos(150)),
            "00:00:00.0000001"
        );
    }

    #[test]
    fn dates_like_dotnet() {
        let t = date_time::parse("2026-12-03T10:00:00.1234567").expect("unspecified");
        assert_eq!(date_time::format(&t), "2026-12-03T10:00:00.1234567");
        let whole = date_time::parse("2026-12-03T10:00:00").expect("whole seconds");
        assert_eq!(date_time::format(&whole), "2026-12-03T10:00:00");
        let half = date_time::parse("2026-12-03T10:00:00.5").expect("short fraction");
        assert_eq!(date_time::format(&half), "2026-12-03T10:00:00.5");
        let utc = date_time_utc::parse("2026-12-03T10:00:00.1200000Z").expect("utc");
        assert_eq!(date_time_utc::format(&utc), "2026-12-03T10:00:00.12Z");
        let offset = date_time_offset::parse("2026-12-03T10:00:00-05:30").expect("offset");
        assert_eq!(
            date_time_offset::format(&offset),
            "2026-12-03T10:00:00-05:30"
        );
        let zero = date_time_offset::parse("2026-12-03T10:00:00Z").expect("Z");
        assert_eq!(date_time_offset::format(&zero), "2026-12-03T10:00:00+00:00");
        // An offset read into an Unspecified value is the UTC time it names.
        assert_eq!(
            date_time::format(&date_time::parse("2026-12-03T11:00:00+01:00").expect("o")),
            "2026-12-03T10:00:00"
        );
        assert!(date_time::parse("03/12/2026").is_err());
    }

    #[test]
    fn bytes_like_dotnet() {
        assert_eq!(bytes::format(b"hello"), "aGVsbG8=");
        assert_eq!(bytes::parse("aGVsbG8="), Ok(b"hello".to_vec()));
        assert!(bytes::parse("not base64!").is_err());
    }
}
