//! The freeze plan: the pure arithmetic of one synchronised checkpoint on a
//! host, with every instant passed in (no clock is read here).
//!
//! A checkpoint freezes every component at one planned instant `T`, saves, and
//! resumes each component exactly `D` after *its own* measured stop instant
//! (the same `D` for all). Stop skew between components then never becomes
//! skew between their virtual clocks: only the error in realising `D` leaks
//! into the experiment. This module decides `T` and `D` and judges how well a
//! checkpoint kept to them.

use serde::{Deserialize, Serialize};
use stasis_core::clock::MonoNs;

/// Tunables of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeConfig {
    /// How far in the future the freeze instant is placed: more than the time
    /// it takes to tell every component about it.
    pub margin_ns: u64,
    /// How long before its VM stops the delay node stops delivering to it, so
    /// nothing it sent is stranded inside QEMU (stream mode).
    pub hold_lead_ns: u64,
    /// Slack added to the measured save time before the common resume.
    pub resume_margin_ns: u64,
    /// Keep everything frozen at least this long (a pause of chosen length,
    /// e.g. to show that even a long gap stays invisible).
    pub min_frozen_ns: u64,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig { margin_ns: 300_000_000, hold_lead_ns: 20_000_000, resume_margin_ns: 100_000_000, min_frozen_ns: 0 }
    }
}

/// Where a component stopped, as measured around its stop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopStamp {
    /// The request was sent at or after this instant.
    pub sent: MonoNs,
    /// The component confirmed it had stopped at or before this instant.
    pub replied: MonoNs,
    /// The component's own report of the instant (QEMU's STOP/RESUME event
    /// timestamp mapped onto the monotonic clock), if it gave one.
    pub reported: Option<MonoNs>,
}

impl StopStamp {
    /// Slack allowed around the bracket for a reported instant (clock
    /// mapping and timestamp resolution).
    const SLACK: u64 = 100_000;

    /// Best estimate of the instant: the component's own report when it lies
    /// inside the bracket, else the middle of the bracket.
    pub fn instant(&self) -> MonoNs {
        match self.reported {
            Some(r) if r + Self::SLACK >= self.sent && r <= self.replied + Self::SLACK => r.clamp(self.sent, self.replied),
            _ => self.sent + (self.replied.saturating_sub(self.sent)) / 2,
        }
    }
}

/// The freeze instant for a checkpoint requested at `now`.
#[must_use]
pub fn plan_freeze(now: MonoNs, cfg: &FreezeConfig) -> MonoNs {
    now + cfg.margin_ns
}

/// The common frozen duration `D`, decided once everything is saved at
/// `saved_at`: long enough that the earliest-stopped component can still
/// resume in the future.
#[must_use]
pub fn frozen_duration(stops: &[MonoNs], saved_at: MonoNs, cfg: &FreezeConfig) -> u64 {
    let first = stops.iter().copied().min().unwrap_or(saved_at);
    (saved_at.saturating_sub(first) + cfg.resume_margin_ns).max(cfg.min_frozen_ns)
}

/// When each component must resume: its own stop instant plus `D`.
#[must_use]
pub fn resume_instants(stops: &[MonoNs], duration: u64) -> Vec<MonoNs> {
    stops.iter().map(|s| s + duration).collect()
}

/// How faithful a finished checkpoint was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Largest minus smallest stop instant across components.
    pub stop_skew_ns: u64,
    /// Largest |actual frozen duration − D| across components.
    pub max_frozen_error_ns: u64,
    /// Largest distance of a stop instant from the planned instant.
    pub max_stop_lateness_ns: u64,
}

/// Judge a checkpoint from the planned instant, `D`, and each component's
/// measured (stop, resume) instants.
#[must_use]
pub fn fidelity(planned: MonoNs, duration: u64, measured: &[(MonoNs, MonoNs)]) -> Fidelity {
    let stops = measured.iter().map(|m| m.0);
    let (lo, hi) = stops.clone().fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let stop_skew_ns = if measured.is_empty() { 0 } else { hi - lo };
    let max_frozen_error_ns =
        measured.iter().map(|&(s, r)| r.saturating_sub(s).abs_diff(duration)).max().unwrap_or(0);
    let max_stop_lateness_ns = stops.map(|s| s.abs_diff(planned)).max().unwrap_or(0);
    Fidelity { stop_skew_ns, max_frozen_error_ns, max_stop_lateness_ns }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_instant_is_the_report_inside_the_bracket_else_its_middle() {
        assert_eq!(StopStamp { sent: 100, replied: 300, reported: None }.instant(), 200);
        assert_eq!(StopStamp { sent: 100, replied: 100, reported: None }.instant(), 100);
        assert_eq!(StopStamp { sent: 100, replied: 300, reported: Some(290) }.instant(), 290);
        // A report far outside the bracket is not believed.
        assert_eq!(StopStamp { sent: 1_000_000, replied: 1_000_300, reported: Some(5_000_000) }.instant(), 1_000_150);
    }

    #[test]
    fn every_component_is_frozen_for_the_same_duration() {
        let cfg = FreezeConfig::default();
        let t = plan_freeze(1_000, &cfg);
        assert_eq!(t, 1_000 + cfg.margin_ns);
        let stops = [t + 10, t + 900, t + 450];
        let saved_at = t + 2_000_000_000;
        let d = frozen_duration(&stops, saved_at, &cfg);
        assert_eq!(d, 2_000_000_000 - 10 + cfg.resume_margin_ns);
        let resumes = resume_instants(&stops, d);
        for (s, r) in stops.iter().zip(&resumes) {
            assert_eq!(r - s, d);
            assert!(*r > saved_at, "every resume is in the future of the save");
        }
    }

    #[test]
    fn a_chosen_pause_is_a_floor_not_an_addition() {
        let cfg = FreezeConfig { min_frozen_ns: 5_000_000_000, ..FreezeConfig::default() };
        assert_eq!(frozen_duration(&[0, 10], 1_000_000_000, &cfg), 5_000_000_000);
        assert_eq!(frozen_duration(&[0], 9_000_000_000, &cfg), 9_000_000_000 + cfg.resume_margin_ns);
    }

    #[test]
    fn fidelity_reports_skew_and_duration_error() {
        let d = 1_000;
        let f = fidelity(500, d, &[(500, 1_500), (520, 1_520), (510, 1_710)]);
        assert_eq!(f.stop_skew_ns, 20);
        assert_eq!(f.max_frozen_error_ns, 200);
        assert_eq!(f.max_stop_lateness_ns, 20);
        assert_eq!(fidelity(0, 5, &[]), Fidelity::default());
    }
}
