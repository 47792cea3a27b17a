//! Parsing durations (`60`, `60s`, `500ms`, `2m`, `1.5s`) and sizes (`4096`, `64k`, `16M`,
//! `16MiB`, `1G`) given on the command line. Sizes use powers of two.

use std::time::Duration;

/// Parse a duration: a number with an optional unit `ms`, `s` (default), `m` or `h`.
///
/// # Errors
/// A message naming what is wrong, for clap to print.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (examples: 60, 60s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "invalid duration {text:?}: must be zero or positive"
        ));
    }
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Parse a size in bytes: a whole number with an optional suffix `k`, `M`, `G` (powers of
/// two, case-insensitive, `B`/`iB` optional).
///
/// # Errors
/// A message naming what is wrong, for clap to print.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        _ => (body, 0),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {text:?} (examples: 4096, 64k, 16M)"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
