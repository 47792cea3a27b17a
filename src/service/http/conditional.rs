//! Conditional requests and byte ranges (RFC 9110 §13 and §14): pure functions of the
//! request's header values and the file's validators, so every rule is unit-tested (and
//! fuzzed) without a file or a socket.
//!
//! The order is RFC 9110 §13.2.2's: `If-Match` (else `If-Unmodified-Since`) may fail with
//! 412; `If-None-Match` (else `If-Modified-Since`) may answer 304; then a `Range` of a `GET`
//! is honoured only if its `If-Range` (when present) still names the current file —
//! otherwise the whole file is sent, so a resumed download never splices old and new bytes.

use std::time::{Duration, SystemTime};

/// The last second an HTTP date can express (31 Dec 9999 23:59:59 UTC).
pub const MAX_HTTP_DATE: u64 = 253_402_300_799;

/// `secs` since the epoch as an HTTP date, or `None` past year 9999 (which the format
/// cannot express: a file's modification time can be anything its owner sets).
pub fn http_date(secs: u64) -> Option<String> {
    (secs <= MAX_HTTP_DATE)
        .then(|| httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
}

/// An HTTP date as seconds since the epoch; `None` if it is not a valid HTTP date (or
/// before 1970).
pub fn parse_date(value: &str) -> Option<u64> {
    httpdate::parse_http_date(value.trim())
        .ok()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// A decimal number as the RFCs write them: one or more ASCII digits, nothing else (no
/// sign, no spaces inside, no overflow). `u64::from_str` would accept `+30`.
pub fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A parsed byte range request against a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable `Range` (absent, not bytes, malformed, or several ranges): the whole file.
    Whole,
    /// Bytes `start..=end`, within the file.
    Part(u64, u64),
    /// Cannot be satisfied: 416.
    Unsatisfiable,
}

/// Parse a `Range` header value for a file of `size` bytes (one range only; several ranges
/// are answered with the whole file, which the RFC allows; a malformed one is ignored, as
/// RFC 9110 §14.2 says).
pub fn parse_range(value: &str, size: u64) -> Range {
    let value = value.trim();
    let Some(spec) = value
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &value[6..])
    else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Range::Whole,
        // `-n`: the last n bytes.
        (true, false) => match digits(b) {
            None => Range::Whole,
            Some(0) => Range::Unsatisfiable,
            Some(_) if size == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part(size.saturating_sub(n), size - 1),
        },
        (false, _) => {
            let Some(start) = digits(a) else {
                return Range::Whole;
            };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match digits(b) {
                    Some(e) if e >= start => e,
                    _ => return Range::Whole,
                }
            };
            if start >= size {
                return Range::Unsatisfiable;
            }
            Range::Part(start, end.min(size - 1))
        }
    }
}

/// The file's validators, as its response would state them.
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    /// The strong entity tag, quotes included.
    pub etag: &'a str,
    /// The modification time in seconds, when it can be stated (`Last-Modified`).
    pub modified: Option<u64>,
    /// The current time in seconds (the response's `Date`).
    pub now: u64,
}

/// The request's conditional and range header values (each list header's lines joined
/// with commas).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// `If-Match`.
    pub if_match: Option<String>,
    /// `If-None-Match`.
    pub if_none_match: Option<String>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<String>,
    /// `If-Unmodified-Since`.
    pub if_unmodified_since: Option<String>,
    /// `If-Range`.
    pub if_range: Option<String>,
    /// `Range`.
    pub range: Option<String>,
}

impl Conditions {
    /// No conditional or range header: the answer is the whole file, whatever its state.
    pub fn is_empty(&self) -> bool {
        self.if_match.is_none()
            && self.if_none_match.is_none()
            && self.if_modified_since.is_none()
            && self.if_unmodified_since.is_none()
            && self.if_range.is_none()
            && self.range.is_none()
    }
}

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 412: a precondition (`If-Match`, `If-Unmodified-Since`) failed.
    PreconditionFailed,
    /// 304: the client's copy is current.
    NotModified,
    /// Send the file, or the part of it the range names.
    Send(Range),
}

/// Whether an entity-tag list (`"a", W/"b"` or `*`) holds `etag`, comparing weakly (a `W/`
/// prefix is ignored) or strongly (a weak tag never matches).
fn list_matches(list: &str, etag: &str, weak: bool) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || (weak && t.strip_prefix("W/") == Some(etag)))
}

/// Whether an `If-Range` value names the current file: an entity tag must match strongly;
/// a date must equal `Last-Modified` exactly, and only if that date is strong (the file was
/// last changed at least a second before now, RFC 9110 §8.8.2.2).
fn if_range_matches(value: &str, v: &Validators<'_>) -> bool {
    let value = value.trim();
    if value.starts_with("W/") {
        return false;
    }
    if value.starts_with('"') {
        return value == v.etag;
    }
    match (parse_date(value), v.modified) {
        (Some(date), Some(m)) => date == m && m < v.now,
        _ => false,
    }
}

/// Evaluate the conditions of a `GET` (`ranges`: true) or `HEAD` (ranges are defined for
/// `GET` only, RFC 9110 §14.2) against a file of `size` bytes with validators `v`.
pub fn evaluate(c: &Conditions, v: &Validators<'_>, size: u64, ranges: bool) -> Outcome {
    if let Some(list) = &c.if_match {
        if !list_matches(list, v.etag, false) {
            return Outcome::PreconditionFailed;
        }
    } else if let (Some(date), Some(m)) = (
        c.if_unmodified_since.as_deref().and_then(parse_date),
        v.modified,
    ) {
        if m > date {
            return Outcome::PreconditionFailed;
        }
    }
    if let Some(list) = &c.if_none_match {
        if list_matches(list, v.etag, true) {
            return Outcome::NotModified;
        }
    } else if let (Some(date), Some(m)) = (
        c.if_modified_since.as_deref().and_then(parse_date),
        v.modified,
    ) {
        if m <= date {
            return Outcome::NotModified;
        }
    }
    let Some(range) = c.range.as_deref().filter(|_| ranges) else {
        return Outcome::Send(Range::Whole);
    };
    if c.if_range
        .as_deref()
        .is_some_and(|ir| !if_range_matches(ir, v))
    {
        return Outcome::Send(Range::Whole);
    }
    Outcome::Send(parse_range(range, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=0-0", 10), Range::Part(0, 0));
        assert_eq!(parse_range("bytes=5-100", 10), Range::Part(5, 9));
        assert_eq!(parse_range("Bytes=5-", 10), Range::Part(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), Range::Part(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Range::Part(0, 9));
        assert_eq!(parse_range("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-1", 0), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Range::Whole);
        assert_eq!(parse_range("items=0-1", 10), Range::Whole);
        assert_eq!(parse_range("bytes=5-2", 10), Range::Whole);
        assert_eq!(parse_range("bytes=+5-", 10), Range::Whole);
        assert_eq!(parse_range("bytes=5-+7", 10), Range::Whole);
        assert_eq!(parse_range("bytes=-+3", 10), Range::Whole);
        assert_eq!(parse_range("bytes=", 10), Range::Whole);
        assert_eq!(parse_range("bytés=1-", 10), Range::Whole);
        assert_eq!(
            parse_range("bytes=0-99999999999999999999", 10),
            Range::Whole
        );
    }

    #[test]
    fn digits_are_digits_only() {
        assert_eq!(digits("30"), Some(30));
        assert_eq!(digits("007"), Some(7));
        for bad in [
            "",
            "+30",
            "-1",
            " 3",
            "3 ",
            "0x10",
            "1e3",
            "99999999999999999999",
        ] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dates_past_9999_are_not_written() {
        assert_eq!(
            http_date(0).as_deref(),
            Some("Thu, 01 Jan 1970 00:00:00 GMT")
        );
        assert!(http_date(MAX_HTTP_DATE).is_some());
        assert_eq!(http_date(MAX_HTTP_DATE + 1), None);
        assert_eq!(http_date(u64::MAX), None);
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:01 GMT"), Some(1));
        assert_eq!(parse_date("yesterday"), None);
    }

    fn v(modified: Option<u64>) -> Validators<'static> {
        Validators {
            etag: "\"abc\"",
            modified,
            now: 2_000_000_000,
        }
    }

    fn c(pairs: &[(&str, &str)]) -> Conditions {
        let mut c = Conditions::default();
        for (k, val) in pairs {
            let slot = match *k {
                "im" => &mut c.if_match,
                "inm" => &mut c.if_none_match,
                "ims" => &mut c.if_modified_since,
                "ius" => &mut c.if_unmodified_since,
                "ir" => &mut c.if_range,
                _ => &mut c.range,
            };
            *slot = Some(val.to_string());
        }
        c
    }

    #[test]
    fn preconditions_in_rfc_order() {
        use Outcome::*;
        let lm = "Sun, 13 Sep 2020 12:26:40 GMT"; // 1_600_000_000
        let m = Some(1_600_000_000);
        let e = |pairs: &[(&str, &str)]| evaluate(&c(pairs), &v(m), 100, true);
        assert_eq!(e(&[]), Send(Range::Whole));
        assert_eq!(e(&[("im", "\"x\"")]), PreconditionFailed);
        assert_eq!(e(&[("im", "W/\"abc\"")]), PreconditionFailed, "strong");
        assert_eq!(e(&[("im", "\"x\", \"abc\"")]), Send(Range::Whole));
        assert_eq!(e(&[("im", "*")]), Send(Range::Whole));
        assert_eq!(
            e(&[("ius", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            PreconditionFailed
        );
        assert_eq!(e(&[("ius", lm)]), Send(Range::Whole));
        // If-Match present: If-Unmodified-Since is not looked at.
        assert_eq!(
            e(&[("im", "*"), ("ius", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Send(Range::Whole)
        );
        assert_eq!(e(&[("inm", "W/\"abc\"")]), NotModified, "weak");
        assert_eq!(e(&[("inm", "\"x\"")]), Send(Range::Whole));
        assert_eq!(e(&[("ims", lm)]), NotModified);
        assert_eq!(
            e(&[("ims", "Sun, 13 Sep 2020 12:26:39 GMT")]),
            Send(Range::Whole)
        );
        // If-None-Match present: If-Modified-Since is ignored.
        assert_eq!(e(&[("inm", "\"x\""), ("ims", lm)]), Send(Range::Whole));
        // 412 before 304.
        assert_eq!(e(&[("im", "\"x\""), ("inm", "*")]), PreconditionFailed);
        // Without a modification time, date conditions are ignored.
        let none = |pairs: &[(&str, &str)]| evaluate(&c(pairs), &v(None), 100, true);
        assert_eq!(none(&[("ims", lm)]), Send(Range::Whole));
        assert_eq!(
            none(&[("ius", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Send(Range::Whole)
        );
    }

    #[test]
    fn if_range_guards_the_range() {
        use Outcome::*;
        let lm = "Sun, 13 Sep 2020 12:26:40 GMT";
        let m = Some(1_600_000_000);
        let e = |pairs: &[(&str, &str)]| evaluate(&c(pairs), &v(m), 100, true);
        let part = Send(Range::Part(10, 99));
        assert_eq!(e(&[("r", "bytes=10-")]), part);
        assert_eq!(e(&[("r", "bytes=10-"), ("ir", "\"abc\"")]), part);
        assert_eq!(e(&[("r", "bytes=10-"), ("ir", lm)]), part);
        for stale in [
            "\"abd\"",
            "W/\"abc\"",
            "Sun, 13 Sep 2020 12:26:41 GMT",
            "Sun, 13 Sep 2020 12:26:39 GMT",
            "nonsense",
            "",
        ] {
            assert_eq!(
                e(&[("r", "bytes=10-"), ("ir", stale)]),
                Send(Range::Whole),
                "{stale}"
            );
        }
        // A date that is not at least a second older than now is weak: never matches.
        let fresh = Validators {
            etag: "\"abc\"",
            modified: Some(1_600_000_000),
            now: 1_600_000_000,
        };
        assert_eq!(
            evaluate(&c(&[("r", "bytes=10-"), ("ir", lm)]), &fresh, 100, true),
            Send(Range::Whole)
        );
        // HEAD: no ranges.
        assert_eq!(
            evaluate(&c(&[("r", "bytes=10-")]), &v(m), 100, false),
            Send(Range::Whole)
        );
    }
}
