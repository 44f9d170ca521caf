//! Human-readable durations (`90s`, `5m`, `1h30m`) and byte sizes (`512MiB`, `2GB`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration written as a sum of `<number><unit>` terms, units `ms`, `s`, `m`, `h`, `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty duration".into());
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("duration `{text}` lacks a unit (ms, s, m, h, d)"))?;
            if digits == 0 {
                return Err(format!(
                    "duration `{text}` must start each term with a number"
                ));
            }
            let number: f64 = rest[..digits]
                .parse()
                .map_err(|_| format!("bad number in duration `{text}`"))?;
            let after = &rest[digits..];
            let unit_len = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let seconds = match after[..unit_len].trim() {
                "ms" => 0.001,
                "s" | "sec" | "secs" => 1.0,
                "m" | "min" | "mins" => 60.0,
                "h" | "hr" | "hours" => 3600.0,
                "d" | "days" => 86400.0,
                other => {
                    return Err(format!(
                        "unknown unit `{other}` in duration `{text}` (use ms, s, m, h, d)"
                    ));
                }
            };
            total += Duration::from_secs_f64(number * seconds);
            rest = &after[unit_len..];
        }
        Ok(Self(total))
    }
}

/// A size in bytes written as `<number><unit>`, units B, KB/MB/GB/TB (powers of 1000)
/// and KiB/MiB/GiB/TiB (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        if split == 0 {
            return Err(format!("byte size `{text}` must start with a number"));
        }
        let number: f64 = trimmed[..split]
            .parse()
            .map_err(|_| format!("bad number in byte size `{text}`"))?;
        let multiplier: u64 = match trimmed[split..].trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in byte size `{text}` (use B, KB, MB, GB, KiB, MiB, GiB, ...)"
                ));
            }
        };
        Ok(Self((number * multiplier as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_compound_terms() {
        let parse = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse("5").unwrap_err().contains("lacks a unit"));
        assert!(parse("5 weeks").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
    }

    #[test]
    fn byte_sizes_parse_decimal_and_binary_units() {
        let parse = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(parse("2GiB"), Ok(2 << 30));
        assert_eq!(parse("512 MiB"), Ok(512 << 20));
        assert_eq!(parse("1GB"), Ok(1_000_000_000));
        assert_eq!(parse("100"), Ok(100));
        assert!(parse("12 parsecs").is_err());
        assert!(parse("GiB").is_err());
    }
}
