//! Fixed-rate send pacing on CLOCK_MONOTONIC without catch-up bursts.
//!
//! Sends are due every `period_ns`. A sender that falls a little behind
//! (scheduling noise) catches up; one that falls more than `max_late_ns`
//! behind — the whole guest was paused, say — skips ahead in time instead of
//! firing the missed sends in a burst. Sequence numbers are the caller's and
//! never skip.

/// What the sender should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Pace {
    /// Send one record now. `skipped_ns` is how much schedule time was
    /// dropped to avoid a burst (0 normally).
    Send {
        /// Schedule time dropped before this send, ns.
        skipped_ns: u64,
    },
    /// Nothing is due before this CLOCK_MONOTONIC instant.
    WaitUntil(u64),
}

/// The pacing state: when the next send is due.
#[derive(Debug, Clone)]
pub struct Pacer {
    period_ns: u64,
    next_ns: u64,
    max_late_ns: u64,
}

/// Lateness beyond which the pacer skips ahead instead of catching up.
pub const DEFAULT_MAX_LATE_NS: u64 = 100_000_000;

impl Pacer {
    /// First send due at `start_ns`, then every `period_ns` (at least 1).
    pub fn new(start_ns: u64, period_ns: u64, max_late_ns: u64) -> Self {
        Pacer { period_ns: period_ns.max(1), next_ns: start_ns, max_late_ns }
    }

    /// Period for `rate` sends per second (at least one per ~584 years).
    pub fn period_for_rate(rate_per_s: f64) -> u64 {
        if rate_per_s <= 0.0 {
            return u64::MAX / 2;
        }
        ((1e9 / rate_per_s).round() as u64).max(1)
    }

    /// Decides at `now_ns`; on `Send` the next send is scheduled.
    pub fn poll(&mut self, now_ns: u64) -> Pace {
        if now_ns < self.next_ns {
            return Pace::WaitUntil(self.next_ns);
        }
        let late = now_ns - self.next_ns;
        let mut skipped_ns = 0;
        if late > self.max_late_ns {
            skipped_ns = late;
            self.next_ns = now_ns;
        }
        self.next_ns = self.next_ns.saturating_add(self.period_ns);
        Pace::Send { skipped_ns }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn sends_at_fixed_period() {
        let mut p = Pacer::new(1000 * MS, 10 * MS, DEFAULT_MAX_LATE_NS);
        assert_eq!(p.poll(999 * MS), Pace::WaitUntil(1000 * MS));
        assert_eq!(p.poll(1000 * MS), Pace::Send { skipped_ns: 0 });
        assert_eq!(p.poll(1001 * MS), Pace::WaitUntil(1010 * MS));
        assert_eq!(p.poll(1010 * MS), Pace::Send { skipped_ns: 0 });
        assert_eq!(p.poll(1010 * MS), Pace::WaitUntil(1020 * MS));
    }

    #[test]
    fn small_lateness_is_caught_up() {
        let mut p = Pacer::new(0, 10 * MS, DEFAULT_MAX_LATE_NS);
        assert_eq!(p.poll(0), Pace::Send { skipped_ns: 0 });
        // 50 ms late: the missed sends are due at once (catch-up), then pacing resumes.
        let mut sends = 0;
        while let Pace::Send { skipped_ns } = p.poll(60 * MS) {
            assert_eq!(skipped_ns, 0);
            sends += 1;
        }
        assert_eq!(sends, 6); // due at 10,20,30,40,50,60 ms
        assert_eq!(p.poll(60 * MS), Pace::WaitUntil(70 * MS));
    }

    #[test]
    fn long_pause_skips_ahead_without_burst() {
        let mut p = Pacer::new(0, 10 * MS, DEFAULT_MAX_LATE_NS);
        assert_eq!(p.poll(0), Pace::Send { skipped_ns: 0 });
        // Guest paused 5 s: exactly one send, then the schedule restarts from now.
        assert_eq!(p.poll(5010 * MS), Pace::Send { skipped_ns: 5000 * MS });
        assert_eq!(p.poll(5010 * MS), Pace::WaitUntil(5020 * MS));
        assert_eq!(p.poll(5020 * MS), Pace::Send { skipped_ns: 0 });
    }

    #[test]
    fn period_for_rate() {
        assert_eq!(Pacer::period_for_rate(100.0), 10 * MS);
        assert_eq!(Pacer::period_for_rate(3.0), 333_333_333);
        assert!(Pacer::period_for_rate(0.0) > 1_000_000 * 1_000_000_000);
    }
}
