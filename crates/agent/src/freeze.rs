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
        FreezeConfig {
            margin_ns: 300_000_000,
            hold_lead_ns: 20_000_000,
            resume_margin_ns: 100_000_000,
            min_frozen_ns: 0,
        }
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
            Some(r) if r + Self::SLACK >= self.sent && r <= self.replied + Self::SLACK => {
                r.clamp(self.sent, self.replied)
            }
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
    let max_frozen_error_ns = measured.iter().map(|&(s, r)| r.saturating_sub(s).abs_diff(duration)).max().unwrap_or(0);
    let max_stop_lateness_ns = stops.map(|s| s.abs_diff(planned)).max().unwrap_or(0);
    Fidelity { stop_skew_ns, max_frozen_error_ns, max_stop_lateness_ns }
}

/// A deliberate break of the temporal firewall, injected by
/// `stasis checkpoint --fault` to show that the instruments can fail
/// (docs/guest-kmod.md, "The instruments can fail"). Never used otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    /// `late-resume=NODE:DURATION`: resume VM `node` `by_ns` later than its
    /// own stop + D. Under TCG its clocks stay frozen for longer, so it falls
    /// behind the other guests by `by_ns` (inter-VM skew) and the report's
    /// frozen-duration error for it is `by_ns`.
    LateResume { node: String, by_ns: u64 },
    /// `sigstop=NODE:DURATION`: at T, freeze VM `node`'s QEMU process with
    /// SIGSTOP for `for_ns` instead of QMP `stop`, then SIGCONT it and stop
    /// it through QMP as usual. QEMU's virtual clock keeps following the
    /// host while the process is merely descheduled, so the guest's clocks
    /// jump by `for_ns`: the pause the firewall exists to hide.
    SigStop { node: String, for_ns: u64 },
}

/// A `--fault` argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "fault {text:?}: {reason} (expected late-resume=NODE:DURATION or sigstop=NODE:DURATION, e.g. late-resume=a:200ms)"
)]
pub struct FaultError {
    pub text: String,
    pub reason: String,
}

impl std::str::FromStr for Fault {
    type Err = FaultError;
    fn from_str(text: &str) -> Result<Fault, FaultError> {
        let bad = |reason: &str| FaultError { text: text.to_string(), reason: reason.to_string() };
        let (kind, rest) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (node, dur) = rest.rsplit_once(':').ok_or_else(|| bad("no ':' between node and duration"))?;
        if node.is_empty() {
            return Err(bad("empty node name"));
        }
        let ns = stasis_core::spec::parse_duration_ns(dur).map_err(|e| bad(&e))?;
        if ns == 0 {
            return Err(bad("zero duration"));
        }
        let node = node.to_string();
        match kind {
            "late-resume" => Ok(Fault::LateResume { node, by_ns: ns }),
            "sigstop" => Ok(Fault::SigStop { node, for_ns: ns }),
            other => Err(bad(&format!("unknown fault kind {other:?}"))),
        }
    }
}

impl Fault {
    /// The VM the fault targets.
    pub fn node(&self) -> &str {
        match self {
            Fault::LateResume { node, .. } | Fault::SigStop { node, .. } => node,
        }
    }
}

/// Extra delay the faults add to `node`'s resume.
#[must_use]
pub fn late_resume_ns(faults: &[Fault], node: &str) -> u64 {
    faults
        .iter()
        .map(|f| match f {
            Fault::LateResume { node: n, by_ns } if n == node => *by_ns,
            _ => 0,
        })
        .sum()
}

/// How long `node`'s QEMU is to be held with SIGSTOP at T, if at all.
#[must_use]
pub fn sigstop_ns(faults: &[Fault], node: &str) -> Option<u64> {
    faults.iter().find_map(|f| match f {
        Fault::SigStop { node: n, for_ns } if n == node => Some(*for_ns),
        _ => None,
    })
}

/// Largest |frozen − D| of any component for which a checkpoint still
/// counts as transparent in its verdict. Every ns of it becomes skew between
/// that component's virtual clock and the others' (the goal is 100 µs); the
/// tolerance is what the busy 2-core development host achieves with margin
/// (docs/eval-time.md: p50 ~0.1 ms, outliers up to 24 ms under load 14),
/// so that a verdict other than clean means something went wrong, not that
/// the host was busy; a deliberate 200 ms late resume is 4× above it.
pub const FROZEN_ERROR_TOLERANCE_NS: u64 = 50_000_000;

/// The fidelity verdict of one checkpoint, from the host's measurements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// No finding.
    pub clean: bool,
    /// One line per component whose frozen duration missed D by more than
    /// the tolerance.
    pub findings: Vec<String>,
    pub tolerance_ns: u64,
}

/// Judge a checkpoint from D and each component's (name, measured frozen
/// duration). A component with no measured duration (0: it did not resume)
/// is a finding too.
#[must_use]
pub fn verdict(duration: u64, frozen: &[(&str, u64)], tolerance_ns: u64) -> Verdict {
    let mut findings = Vec::new();
    for &(name, f) in frozen {
        if f == 0 {
            findings.push(format!("{name}: no resume instant measured"));
            continue;
        }
        let err = f.abs_diff(duration);
        if err > tolerance_ns {
            let how = if f > duration { "longer" } else { "shorter" };
            findings.push(format!(
                "{name}: frozen {:.3} ms {how} than D (tolerance {:.3} ms): its clocks are now {:.3} ms {} the others'",
                err as f64 / 1e6,
                tolerance_ns as f64 / 1e6,
                err as f64 / 1e6,
                if f > duration { "behind" } else { "ahead of" },
            ));
        }
    }
    Verdict { clean: findings.is_empty(), findings, tolerance_ns }
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
    #[test]
    fn faults_parse_and_bad_ones_are_named() {
        assert_eq!(
            "late-resume=a:200ms".parse::<Fault>(),
            Ok(Fault::LateResume { node: "a".into(), by_ns: 200_000_000 })
        );
        assert_eq!(
            "sigstop=vm-b:2s".parse::<Fault>(),
            Ok(Fault::SigStop { node: "vm-b".into(), for_ns: 2_000_000_000 })
        );
        for bad in
            ["late-resume", "late-resume=a", "late-resume=:2s", "late-resume=a:0ms", "late-resume=a:2", "freeze=a:2s"]
        {
            let e = bad.parse::<Fault>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        let f = [
            "late-resume=a:200ms".parse().unwrap(),
            "late-resume=a:1ms".parse().unwrap(),
            "sigstop=b:2s".parse().unwrap(),
        ];
        assert_eq!(late_resume_ns(&f, "a"), 201_000_000);
        assert_eq!(late_resume_ns(&f, "b"), 0);
        assert_eq!(sigstop_ns(&f, "b"), Some(2_000_000_000));
        assert_eq!(sigstop_ns(&f, "a"), None);
    }

    #[test]
    fn verdict_flags_a_component_frozen_off_d() {
        let d = 1_000_000_000;
        let v = verdict(d, &[("a", d + 3_000_000), ("b", d - 1_000), ("delay-node", d)], FROZEN_ERROR_TOLERANCE_NS);
        assert!(v.clean, "{v:?}");
        let v = verdict(d, &[("a", d + 200_000_000), ("b", d)], FROZEN_ERROR_TOLERANCE_NS);
        assert!(!v.clean);
        assert_eq!(v.findings.len(), 1);
        assert!(v.findings[0].starts_with("a: frozen 200.000 ms longer"), "{v:?}");
        let v = verdict(d, &[("b", d - 60_000_000), ("c", 0)], FROZEN_ERROR_TOLERANCE_NS);
        assert!(v.findings[0].contains("shorter") && v.findings[0].contains("ahead of"), "{v:?}");
        assert!(v.findings[1].contains("no resume"), "{v:?}");
    }
}
