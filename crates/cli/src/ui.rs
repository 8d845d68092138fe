//! Output: progress on a terminal, and the few formatting helpers every
//! command shares.

use stasis_agent::event::{Event, Observer};
use std::io::IsTerminal;
use std::time::Duration;

/// A spinner on stderr showing the latest event (only on a terminal, and
/// never with `--json`).
pub struct Ui {
    bar: Option<indicatif::ProgressBar>,
}

impl Ui {
    pub fn new(json: bool) -> Ui {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Ui { bar }
    }

    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Ui {
    fn event(&self, e: &Event) {
        if let Some(b) = &self.bar {
            let msg = match e {
                Event::VmLaunched { node, .. } => format!("VM {node} launched"),
                Event::DelayNodeStarted { .. } => "delay node started".into(),
                Event::Planned { .. } => "freeze planned".into(),
                Event::Stopped { component, .. } => format!("{component} stopped"),
                Event::Saving { component } => format!("saving {component}"),
                Event::Saved { component, bytes, .. } => format!("{component} saved ({})", mib(*bytes)),
                Event::Committed { checkpoint, .. } => format!("checkpoint {checkpoint} committed, resuming"),
                Event::Resumed { component, .. } => format!("{component} resumed"),
                Event::Aborted { reason, .. } => format!("aborted: {reason}"),
                Event::Restoring { checkpoint } => format!("restoring {checkpoint}"),
                Event::Restored { .. } => "restored".into(),
                Event::Ready { node } => format!("{node} booted"),
            };
            b.set_message(msg);
        }
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

/// `YYYY-MM-DD HH:MM:SSZ` of a Unix time (proleptic Gregorian, UTC).
pub fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(super::utc(1_795_312_637), "2026-11-22 01:57:17Z");
    }
}
