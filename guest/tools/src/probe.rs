//! Clock-step statistics of the probe: an I/O-free core fed with samples.
//!
//! Per report window it yields, for each clock, the largest step (delta
//! between consecutive samples minus the nominal interval) and, for each clock
//! against CLOCK_MONOTONIC, the largest change of their difference between
//! consecutive samples. A pause of P seconds that leaks into one clock shows
//! as a step of about P in that clock and a disagreement of about P with
//! monotonic (or, if it leaks into monotonic itself, in every disagreement).
//!
//! The TSC is converted to nanoseconds with a rate calibrated once, over the
//! first window, as the median of the per-pair tick/ns ratios: a single leaked
//! pause during calibration cannot skew it.

/// One reading of the four clocks, taken back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CLOCK_MONOTONIC, ns.
    pub mono_ns: u64,
    /// CLOCK_REALTIME, ns.
    pub real_ns: u64,
    /// CLOCK_BOOTTIME, ns.
    pub boot_ns: u64,
    /// Raw TSC ticks.
    pub tsc: u64,
}

/// Largest step per clock in a window, ns (negative: the clock advanced less
/// than the nominal interval between every pair of samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// CLOCK_MONOTONIC.
    pub mono: i64,
    /// CLOCK_REALTIME.
    pub real: i64,
    /// CLOCK_BOOTTIME.
    pub boot: i64,
    /// TSC converted to ns.
    pub tsc: i64,
}

/// Largest absolute change between consecutive samples of (clock − monotonic), ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disagreement {
    /// CLOCK_REALTIME against CLOCK_MONOTONIC.
    pub real_mono: u64,
    /// CLOCK_BOOTTIME against CLOCK_MONOTONIC.
    pub boot_mono: u64,
    /// TSC (in ns) against CLOCK_MONOTONIC.
    pub tsc_mono: u64,
}

/// The statistics of one report window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowReport {
    /// Window number, from 1.
    pub window: u64,
    /// The last sample of the window.
    pub last: Sample,
    /// Samples taken in the window.
    pub samples: u64,
    /// `None` when the window holds no pair of samples (the very first
    /// window with a single sample).
    pub max_step: Option<Steps>,
    /// `None` exactly when `max_step` is.
    pub max_disagree: Option<Disagreement>,
    /// TSC ticks per nanosecond in use (`None` until calibrated).
    pub tsc_ticks_per_ns: Option<f64>,
}

/// Accumulates samples and closes report windows.
#[derive(Debug, Clone)]
pub struct ProbeCore {
    interval_ns: u64,
    prev: Option<Sample>,
    window: Vec<Sample>,
    window_no: u64,
    tsc_ticks_per_ns: Option<f64>,
}

/// Median of the per-pair TSC tick/ns ratios, `None` without a usable pair.
pub fn calibrate_tsc(samples: &[Sample]) -> Option<f64> {
    let mut ratios: Vec<f64> = samples
        .windows(2)
        .filter(|w| w[1].mono_ns > w[0].mono_ns && w[1].tsc > w[0].tsc)
        .map(|w| (w[1].tsc - w[0].tsc) as f64 / (w[1].mono_ns - w[0].mono_ns) as f64)
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(ratios[ratios.len() / 2])
}

fn diff(a: u64, b: u64) -> i64 {
    b as i64 - a as i64
}

impl ProbeCore {
    /// A probe sampling every `interval_ns`.
    pub fn new(interval_ns: u64) -> Self {
        ProbeCore { interval_ns, prev: None, window: Vec::new(), window_no: 0, tsc_ticks_per_ns: None }
    }

    /// Adds a sample to the current window.
    pub fn push(&mut self, s: Sample) {
        self.window.push(s);
    }

    /// Closes the current window; `None` if it holds no sample. The last
    /// sample carries over, so a step across the boundary counts in the next window.
    pub fn close_window(&mut self) -> Option<WindowReport> {
        let last = *self.window.last()?;
        if self.tsc_ticks_per_ns.is_none() {
            let mut all: Vec<Sample> = self.prev.iter().copied().collect();
            all.extend_from_slice(&self.window);
            self.tsc_ticks_per_ns = calibrate_tsc(&all);
        }
        let nominal = self.interval_ns as i64;
        let mut steps: Option<Steps> = None;
        let mut dis: Option<Disagreement> = None;
        let mut prev = self.prev;
        for &s in &self.window {
            if let Some(p) = prev {
                let d_mono = diff(p.mono_ns, s.mono_ns);
                let d_real = diff(p.real_ns, s.real_ns);
                let d_boot = diff(p.boot_ns, s.boot_ns);
                let d_tsc = match self.tsc_ticks_per_ns {
                    Some(r) => (s.tsc.wrapping_sub(p.tsc) as i64 as f64 / r) as i64,
                    None => d_mono,
                };
                let st = Steps {
                    mono: d_mono - nominal,
                    real: d_real - nominal,
                    boot: d_boot - nominal,
                    tsc: d_tsc - nominal,
                };
                let di = Disagreement {
                    real_mono: (d_real - d_mono).unsigned_abs(),
                    boot_mono: (d_boot - d_mono).unsigned_abs(),
                    tsc_mono: (d_tsc - d_mono).unsigned_abs(),
                };
                steps = Some(match steps {
                    None => st,
                    Some(m) => Steps {
                        mono: m.mono.max(st.mono),
                        real: m.real.max(st.real),
                        boot: m.boot.max(st.boot),
                        tsc: m.tsc.max(st.tsc),
                    },
                });
                dis = Some(match dis {
                    None => di,
                    Some(m) => Disagreement {
                        real_mono: m.real_mono.max(di.real_mono),
                        boot_mono: m.boot_mono.max(di.boot_mono),
                        tsc_mono: m.tsc_mono.max(di.tsc_mono),
                    },
                });
            }
            prev = Some(s);
        }
        self.window_no += 1;
        let report = WindowReport {
            window: self.window_no,
            last,
            samples: self.window.len() as u64,
            max_step: steps,
            max_disagree: dis,
            tsc_ticks_per_ns: self.tsc_ticks_per_ns,
        };
        self.prev = Some(last);
        self.window.clear();
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    /// A clean 3 GHz guest sampled every 10 ms from t0, with optional extra
    /// nanoseconds leaked into each clock from sample `from` on.
    fn sample(i: u64, leak: [u64; 4]) -> Sample {
        let t = 5 * SEC + i * 10 * MS;
        Sample {
            mono_ns: t + leak[0],
            real_ns: 1_700_000_000 * SEC + t + leak[1],
            boot_ns: t + 7 + leak[2],
            tsc: 3 * (t + leak[3]),
        }
    }

    fn window(core: &mut ProbeCore, range: std::ops::Range<u64>, leak_from: u64, leak: [u64; 4]) -> WindowReport {
        for i in range {
            core.push(sample(i, if i >= leak_from { leak } else { [0; 4] }));
        }
        core.close_window().unwrap()
    }

    #[test]
    fn steady_clocks_show_no_step_and_calibrate_tsc() {
        let mut core = ProbeCore::new(10 * MS);
        let r = window(&mut core, 0..100, u64::MAX, [0; 4]);
        assert_eq!(r.window, 1);
        assert_eq!(r.samples, 100);
        assert_eq!(r.tsc_ticks_per_ns, Some(3.0));
        assert_eq!(r.max_step, Some(Steps { mono: 0, real: 0, boot: 0, tsc: 0 }));
        assert_eq!(r.max_disagree, Some(Disagreement { real_mono: 0, boot_mono: 0, tsc_mono: 0 }));
        assert_eq!(r.last, sample(99, [0; 4]));
    }

    #[test]
    fn pause_leaking_into_tsc_only_shows_as_tsc_step() {
        let mut core = ProbeCore::new(10 * MS);
        window(&mut core, 0..100, u64::MAX, [0; 4]);
        let r = window(&mut core, 100..200, 150, [0, 0, 0, 5 * SEC]);
        let s = r.max_step.unwrap();
        assert_eq!(s.tsc, 5 * SEC as i64);
        assert_eq!((s.mono, s.real, s.boot), (0, 0, 0));
        let d = r.max_disagree.unwrap();
        assert_eq!(d.tsc_mono, 5 * SEC);
        assert_eq!((d.real_mono, d.boot_mono), (0, 0));
        // The step is not repeated in the next window.
        let r = window(&mut core, 200..300, 0, [0, 0, 0, 5 * SEC]);
        assert_eq!(r.max_step.unwrap().tsc, 0);
    }

    #[test]
    fn pause_leaking_into_real_and_boot_but_not_mono() {
        let mut core = ProbeCore::new(10 * MS);
        let leak = [0, 2 * SEC, 3 * SEC, 0];
        let r = window(&mut core, 0..100, 40, leak);
        let s = r.max_step.unwrap();
        assert_eq!((s.mono, s.real, s.boot, s.tsc), (0, 2 * SEC as i64, 3 * SEC as i64, 0));
        let d = r.max_disagree.unwrap();
        assert_eq!((d.real_mono, d.boot_mono, d.tsc_mono), (2 * SEC, 3 * SEC, 0));
    }

    #[test]
    fn step_across_window_boundary_counts_in_next_window() {
        let mut core = ProbeCore::new(10 * MS);
        let r1 = window(&mut core, 0..100, 100, [SEC; 4]);
        assert_eq!(r1.max_step.unwrap().mono, 0);
        let r2 = window(&mut core, 100..200, 100, [SEC; 4]);
        let s = r2.max_step.unwrap();
        assert_eq!((s.mono, s.real, s.boot, s.tsc), (SEC as i64, SEC as i64, SEC as i64, SEC as i64));
        // Every clock moved together: no disagreement.
        assert_eq!(r2.max_disagree.unwrap(), Disagreement { real_mono: 0, boot_mono: 0, tsc_mono: 0 });
    }

    #[test]
    fn calibration_survives_a_leak_in_the_first_window() {
        let mut core = ProbeCore::new(10 * MS);
        let r = window(&mut core, 0..100, 50, [0, 0, 0, 4 * SEC]);
        assert_eq!(r.tsc_ticks_per_ns, Some(3.0));
        assert_eq!(r.max_step.unwrap().tsc, 4 * SEC as i64);
    }

    #[test]
    fn late_samples_show_as_positive_mono_step() {
        let mut core = ProbeCore::new(10 * MS);
        core.push(sample(0, [0; 4]));
        core.push(sample(1, [0; 4]));
        core.push(sample(3, [0; 4])); // one sample missed: 10 ms late
        let r = core.close_window().unwrap();
        assert_eq!(r.max_step.unwrap().mono, 10 * MS as i64);
    }

    #[test]
    fn single_sample_window_has_no_statistics_and_empty_window_no_report() {
        let mut core = ProbeCore::new(10 * MS);
        assert!(core.close_window().is_none());
        core.push(sample(0, [0; 4]));
        let r = core.close_window().unwrap();
        assert_eq!(r.samples, 1);
        assert!(r.max_step.is_none() && r.max_disagree.is_none());
        assert_eq!(r.tsc_ticks_per_ns, None);
    }

    #[test]
    fn median_calibration_ignores_outliers() {
        let mut s: Vec<Sample> = (0..11).map(|i| sample(i, [0; 4])).collect();
        s[5].tsc += 1_000_000_000;
        assert_eq!(calibrate_tsc(&s), Some(3.0));
        assert_eq!(calibrate_tsc(&s[..1]), None);
    }
}
