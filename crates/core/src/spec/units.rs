//! Quantities written with units in a spec: memory and byte sizes, bit
//! rates, durations. Parsing is exact (decimal fractions are allowed only
//! when they give a whole number of the base unit) and every parser has a
//! formatter that prints the shortest exact form, so the canonical spec
//! round-trips.

// `%` rather than `is_multiple_of`: the workspace MSRV is 1.80.
#![allow(clippy::manual_is_multiple_of)]

/// Splits `"10.5 ms"` into `("10.5", "ms")`.
fn split_number(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(text.len());
    (&text[..end], text[end..].trim())
}

/// Exact `number * unit` for a decimal `number` such as `1.5`; `None` when
/// the result is not a whole number, overflows, or the number is malformed.
fn scale_decimal(number: &str, unit: u128) -> Result<u128, String> {
    let number: String = number.chars().filter(|&c| c != '_').collect();
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number.as_str(), ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err("no number".into());
    }
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("\"{number}\" is not a number"));
    }
    if int.len() + frac.len() > 30 {
        return Err("number too large".into());
    }
    let digits = format!("{int}{frac}");
    let mantissa: u128 =
        if digits.is_empty() { 0 } else { digits.parse().map_err(|_| format!("\"{number}\" is not a number"))? };
    let divisor = 10u128.pow(frac.len() as u32);
    let product = mantissa.checked_mul(unit).ok_or("number too large")?;
    if product % divisor != 0 {
        return Err(format!("\"{number}\" is not a whole number of the base unit"));
    }
    Ok(product / divisor)
}

const KIB: u128 = 1024;
const MIB: u128 = 1024 * 1024;
const GIB: u128 = 1024 * 1024 * 1024;
const TIB: u128 = 1024 * 1024 * 1024 * 1024;

/// Multiplier of a size suffix; all are binary (QEMU's `-m 256M` means MiB).
fn size_unit(suffix: &str) -> Option<u128> {
    Some(match suffix {
        "" | "B" => 1,
        "K" | "k" | "KB" | "kB" | "KiB" => KIB,
        "M" | "MB" | "MiB" => MIB,
        "G" | "GB" | "GiB" => GIB,
        "T" | "TB" | "TiB" => TIB,
        _ => return None,
    })
}

const SIZE_UNITS: &str = "B, K, KB, KiB, M, MB, MiB, G, GB, GiB, T, TB, TiB";

/// Parses a byte size such as `"64KB"` or `"1.5G"` (binary multiples).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, suffix) = split_number(text);
    let unit = size_unit(suffix)
        .ok_or_else(|| format!("unknown size unit \"{suffix}\" in \"{text}\" (expected {SIZE_UNITS})"))?;
    let bytes = scale_decimal(number, unit)?;
    u64::try_from(bytes).map_err(|_| format!("\"{text}\" is too large"))
}

/// Parses a memory size; a bare number means MiB (as QEMU's `-m`).
pub fn parse_memory_mib(text: &str) -> Result<u64, String> {
    let (number, suffix) = split_number(text);
    let unit = if suffix.is_empty() {
        MIB
    } else {
        size_unit(suffix)
            .ok_or_else(|| format!("unknown size unit \"{suffix}\" in \"{text}\" (expected {SIZE_UNITS})"))?
    };
    let bytes = scale_decimal(number, unit)?;
    if bytes % MIB != 0 {
        return Err(format!("\"{text}\" is not a whole number of MiB"));
    }
    u64::try_from(bytes / MIB).map_err(|_| format!("\"{text}\" is too large"))
}

/// Prints MiB as `"<n>G"` when whole GiB, else `"<n>M"`.
pub fn format_memory_mib(mib: u64) -> String {
    if mib != 0 && mib % 1024 == 0 {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

/// Prints bytes with the largest binary suffix that divides them exactly.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
        let unit = unit as u64;
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

const RATE_UNITS: &str = "b, Kb, Mb, Gb, bit, kbit, Mbit, Gbit, bps, Kbps, Mbps, Gbps";

/// Parses a bit rate, Emulab style: `"100Mb"`, `"1Gbit"`, `"56kbps"`. The
/// multiples are decimal (1 Kb = 1000 bits per second) and the unit always
/// counts bits; a bare number is bits per second.
pub fn parse_bandwidth_bps(text: &str) -> Result<u64, String> {
    let (number, suffix) = split_number(text);
    let (prefix, rest) = match suffix.chars().next() {
        Some('k' | 'K') => (1_000u128, &suffix[1..]),
        Some('M') => (1_000_000, &suffix[1..]),
        Some('G') => (1_000_000_000, &suffix[1..]),
        _ => (1, suffix),
    };
    let known = matches!(rest, "b" | "bit" | "bits" | "bps") || (rest.is_empty() && prefix == 1);
    if !known {
        return Err(format!("unknown rate unit \"{suffix}\" in \"{text}\" (expected {RATE_UNITS}; rates count bits)"));
    }
    let bps = scale_decimal(number, prefix)?;
    u64::try_from(bps).map_err(|_| format!("\"{text}\" is too large"))
}

/// Prints a rate with the largest decimal suffix that divides it exactly.
pub fn format_bandwidth_bps(bps: u64) -> String {
    for (unit, suffix) in [(1_000_000_000u64, "Gb"), (1_000_000, "Mb"), (1_000, "Kb")] {
        if bps != 0 && bps % unit == 0 {
            return format!("{}{suffix}", bps / unit);
        }
    }
    format!("{bps}b")
}

const DURATION_UNITS: &str = "ns, us, ms, s";

/// Parses a duration such as `"10ms"`, `"1.5us"`, `"0"` into nanoseconds.
pub fn parse_duration_ns(text: &str) -> Result<u64, String> {
    let (number, suffix) = split_number(text);
    let unit: u128 = match suffix {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "" if scale_decimal(number, 1) == Ok(0) => 1,
        "" => return Err(format!("\"{text}\" needs a unit ({DURATION_UNITS})")),
        _ => return Err(format!("unknown time unit \"{suffix}\" in \"{text}\" (expected {DURATION_UNITS})")),
    };
    let ns = scale_decimal(number, unit)?;
    u64::try_from(ns).map_err(|_| format!("\"{text}\" is too large"))
}

/// Prints nanoseconds with the largest unit that divides them exactly.
pub fn format_duration_ns(ns: u64) -> String {
    if ns == 0 {
        return "0ms".into();
    }
    for (unit, suffix) in [(1_000_000_000u64, "s"), (1_000_000, "ms"), (1_000, "us")] {
        if ns % unit == 0 {
            return format!("{}{suffix}", ns / unit);
        }
    }
    format!("{ns}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("256M"), Ok(256));
        assert_eq!(parse_memory_mib("512MiB"), Ok(512));
        assert_eq!(parse_memory_mib("1G"), Ok(1024));
        assert_eq!(parse_memory_mib("1.5G"), Ok(1536));
        assert_eq!(parse_memory_mib("300"), Ok(300));
        assert_eq!(parse_memory_mib("99T"), Ok(99 * 1024 * 1024));
        assert!(parse_memory_mib("1500K").is_err());
        assert!(parse_memory_mib("12 furlongs").is_err());
        assert!(parse_memory_mib("G").is_err());
        assert!(parse_memory_mib("1.2.3G").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_bandwidth_bps("100Mb"), Ok(100_000_000));
        assert_eq!(parse_bandwidth_bps("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth_bps("56kbit"), Ok(56_000));
        assert_eq!(parse_bandwidth_bps("2.5Mbps"), Ok(2_500_000));
        assert_eq!(parse_bandwidth_bps("9600"), Ok(9600));
        assert!(parse_bandwidth_bps("10Xb").is_err());
        assert!(parse_bandwidth_bps("10MB").is_err(), "bytes are not bits");
        assert!(parse_bandwidth_bps("0.5b").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("10ms"), Ok(10_000_000));
        assert_eq!(parse_duration_ns("1.5us"), Ok(1_500));
        assert_eq!(parse_duration_ns("2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration_ns("0"), Ok(0));
        assert_eq!(parse_duration_ns("7 ns"), Ok(7));
        assert!(parse_duration_ns("5 parsecs").is_err());
        assert!(parse_duration_ns("5").is_err());
        assert!(parse_duration_ns("0.5ns").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for ns in [0, 1, 999, 1_000, 1_500, 10_000_000, 3_000_000_000, 1_234_567_891] {
            assert_eq!(parse_duration_ns(&format_duration_ns(ns)), Ok(ns));
        }
        for bps in [1, 999, 56_000, 100_000_000, 1_000_000_000, 2_500_000] {
            assert_eq!(parse_bandwidth_bps(&format_bandwidth_bps(bps)), Ok(bps));
        }
        for b in [0, 1, 1023, 1024, 65_536, 3 << 30] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
        for m in [64, 256, 1024, 1536, 16384] {
            assert_eq!(parse_memory_mib(&format_memory_mib(m)), Ok(m));
        }
    }
}
