//! The periodic checkpoint policy (`[checkpoint] every = "5m"`, `keep = 10`,
//! `keep_daily = 7`) that `stasis supervise` carries out: how often it
//! checkpoints, and which of its own checkpoints it keeps.

use super::{Source, SpecError, SpecErrorKind};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The shortest `every` (a checkpoint of even one VM takes a while).
pub const MIN_EVERY_S: u64 = 1;
/// The longest `every`: a year.
pub const MAX_EVERY_S: u64 = 366 * 24 * 3600;
/// The most checkpoints `keep` / `keep_daily` may ask to keep.
pub const MAX_KEEP: u32 = 100_000;

/// How often the supervisor checkpoints and what it keeps (present only
/// when the spec has a `[checkpoint]` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPolicy {
    /// Seconds between the starts of two periodic checkpoints.
    pub every_s: u64,
    /// The newest this many periodic checkpoints are kept (at least 1).
    pub keep: u32,
    /// Also the newest periodic checkpoint of each of the last this many
    /// UTC days that have one (0: none beyond `keep`).
    pub keep_daily: u32,
}

/// `keep` when the table does not say.
pub const DEFAULT_KEEP: u32 = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoint {
    every: Option<Spanned<String>>,
    keep: Option<Spanned<i64>>,
    keep_daily: Option<Spanned<i64>>,
}

const SUBJECT: &str = "[checkpoint]";

pub(super) fn resolve(
    src: &Source,
    raw: Option<&Spanned<RawCheckpoint>>,
) -> Result<Option<CheckpointPolicy>, SpecError> {
    use SpecErrorKind::*;
    let Some(table) = raw else { return Ok(None) };
    let raw = table.get_ref();
    let subject = || Some(SUBJECT.to_owned());
    let every = raw.every.as_ref().ok_or_else(|| {
        src.error(MissingField, table.span(), subject(), Some("every"), "`every` is needed, e.g. every = \"5m\"")
    })?;
    let every_s =
        parse_interval_s(every.get_ref()).map_err(|m| src.error(BadUnit, every.span(), subject(), Some("every"), m))?;
    if !(MIN_EVERY_S..=MAX_EVERY_S).contains(&every_s) {
        return Err(src.error(
            OutOfRange,
            every.span(),
            subject(),
            Some("every"),
            format!("every = \"{}\" must be from 1s to 366d", every.get_ref()),
        ));
    }
    let count = |v: &Option<Spanned<i64>>, field: &str, min: i64, default: u32| -> Result<u32, SpecError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        if n < min || n > i64::from(MAX_KEEP) {
            return Err(src.error(
                OutOfRange,
                v.span(),
                subject(),
                Some(field),
                format!("{field} = {n} must be from {min} to {MAX_KEEP}"),
            ));
        }
        Ok(n as u32)
    };
    let keep = count(&raw.keep, "keep", 1, DEFAULT_KEEP)?;
    let keep_daily = count(&raw.keep_daily, "keep_daily", 0, 0)?;
    Ok(Some(CheckpointPolicy { every_s, keep, keep_daily }))
}

const INTERVAL_UNITS: &str = "s, m, h, d";

/// Parses a whole number of seconds, minutes, hours or days (`"10s"`,
/// `"5m"`, `"2h"`, `"1d"`) into seconds.
pub fn parse_interval_s(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    let unit_s: u64 = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "" => return Err(format!("\"{text}\" needs a unit ({INTERVAL_UNITS})")),
        u => return Err(format!("unknown unit \"{u}\" in \"{text}\" (expected a whole number of {INTERVAL_UNITS})")),
    };
    let n: u64 = number.parse().map_err(|_| format!("\"{text}\" is not a whole number of {INTERVAL_UNITS}"))?;
    n.checked_mul(unit_s).ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Prints seconds with the largest unit that divides them exactly.
pub fn format_interval_s(s: u64) -> String {
    for (unit, suffix) in [(24 * 3600, "d"), (3600, "h"), (60, "m")] {
        if s != 0 && s.is_multiple_of(unit) {
            return format!("{}{suffix}", s / unit);
        }
    }
    format!("{s}s")
}

pub(super) fn to_toml(p: &CheckpointPolicy) -> String {
    format!(
        "\n[checkpoint]\nevery = \"{}\"\nkeep = {}\nkeep_daily = {}\n",
        format_interval_s(p.every_s),
        p.keep,
        p.keep_daily
    )
}

impl std::fmt::Display for CheckpointPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "every {}, keep the newest {}", format_interval_s(self.every_s), self.keep)?;
        if self.keep_daily > 0 {
            write!(f, " and the last of each of {} days", self.keep_daily)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_and_print_back() {
        assert_eq!(parse_interval_s("10s"), Ok(10));
        assert_eq!(parse_interval_s("5m"), Ok(300));
        assert_eq!(parse_interval_s("5min"), Ok(300));
        assert_eq!(parse_interval_s("2h"), Ok(7200));
        assert_eq!(parse_interval_s("1d"), Ok(86400));
        assert!(parse_interval_s("5").unwrap_err().contains("needs a unit"));
        assert!(parse_interval_s("5ms").unwrap_err().contains("unknown unit"));
        assert!(parse_interval_s("1.5h").is_err());
        assert!(parse_interval_s("99999999999999999999d").is_err());
        for s in [1, 59, 60, 90, 3600, 86400, 90000] {
            assert_eq!(parse_interval_s(&format_interval_s(s)), Ok(s));
        }
    }
}
