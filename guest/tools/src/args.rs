//! A minimal `--flag value` command-line parser (the tools stay std-only).

use std::fmt;
use std::str::FromStr;

/// Why the command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag the tool does not know.
    Unknown(String),
    /// A flag given without its value.
    MissingValue(String),
    /// A value that does not parse.
    BadValue {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
    },
    /// A required flag that is absent.
    Required(&'static str),
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgsError::Unknown(a) => write!(f, "unknown argument {a:?}"),
            ArgsError::MissingValue(a) => write!(f, "{a} needs a value"),
            ArgsError::BadValue { flag, value } => write!(f, "bad value {value:?} for {flag}"),
            ArgsError::Required(a) => write!(f, "{a} is required"),
        }
    }
}

impl std::error::Error for ArgsError {}

/// `--flag value` pairs in command-line order.
#[derive(Debug, Clone)]
pub struct Flags {
    pairs: Vec<(String, String)>,
}

impl Flags {
    /// Splits `args` into pairs, refusing flags not in `known`. Accepts both
    /// `--flag value` and `--flag=value`.
    pub fn parse<I: IntoIterator<Item = String>>(args: I, known: &[&str]) -> Result<Flags, ArgsError> {
        let mut pairs = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (a.clone(), None),
            };
            if !known.contains(&flag.as_str()) {
                return Err(ArgsError::Unknown(a));
            }
            let value = match inline {
                Some(v) => v,
                None => it.next().ok_or_else(|| ArgsError::MissingValue(flag.clone()))?,
            };
            pairs.push((flag, value));
        }
        Ok(Flags { pairs })
    }

    /// The last value of `flag` parsed as `T`, or `default`.
    pub fn get<T: FromStr>(&self, flag: &str, default: T) -> Result<T, ArgsError> {
        Ok(self.opt(flag)?.unwrap_or(default))
    }

    /// The last value of `flag` parsed as `T`, if given.
    pub fn opt<T: FromStr>(&self, flag: &str) -> Result<Option<T>, ArgsError> {
        match self.pairs.iter().rev().find(|(f, _)| f == flag) {
            None => Ok(None),
            Some((f, v)) => v.parse().map(Some).map_err(|_| ArgsError::BadValue { flag: f.clone(), value: v.clone() }),
        }
    }

    /// Every value of a repeatable `flag`, in order.
    pub fn all<T: FromStr>(&self, flag: &str) -> Result<Vec<T>, ArgsError> {
        self.pairs
            .iter()
            .filter(|(f, _)| f == flag)
            .map(|(f, v)| v.parse().map_err(|_| ArgsError::BadValue { flag: f.clone(), value: v.clone() }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, known: &[&str]) -> Result<Flags, ArgsError> {
        Flags::parse(s.split_whitespace().map(String::from), known)
    }

    #[test]
    fn values_defaults_and_repeats() {
        let f = parse("--port 5000 --to a --to=b --rate 2.5", &["--port", "--to", "--rate", "--node"]).unwrap();
        assert_eq!(f.get::<u16>("--port", 1).unwrap(), 5000);
        assert_eq!(f.get::<f64>("--rate", 1.0).unwrap(), 2.5);
        assert_eq!(f.get::<String>("--node", "x".into()).unwrap(), "x");
        assert_eq!(f.all::<String>("--to").unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn refusals() {
        assert_eq!(parse("--bogus 1", &["--port"]).unwrap_err(), ArgsError::Unknown("--bogus".into()));
        assert_eq!(parse("--port", &["--port"]).unwrap_err(), ArgsError::MissingValue("--port".into()));
        let f = parse("--port x", &["--port"]).unwrap();
        assert!(matches!(f.get::<u16>("--port", 1), Err(ArgsError::BadValue { .. })));
    }
}
