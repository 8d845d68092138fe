//! The base clock of one agent: a host clock plus an injected offset and drift.
//!
//! All agents on one machine share one real clock, so to test synchronisation
//! each agent's base clock is made wrong on purpose: `base(h) = h + offset +
//! (h - origin) * drift_ppm / 1e6`, where `h` is the host clock. Because the
//! formula is known, the true error of anything built on top of the base clock
//! is computable exactly from one host-clock reading (see `crate::metrics`).

use statime::time::{Duration, Time};

/// Which host clock a [`SkewedClock`] reads.
///
/// The PTP service needs [`HostClock::Realtime`]: the kernel's software packet
/// timestamps are `CLOCK_REALTIME`, and packet timestamps and clock readings
/// must be on the same base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostClock {
    /// `CLOCK_REALTIME` (the clock of the kernel's software timestamps).
    Realtime,
    /// `CLOCK_MONOTONIC`.
    Monotonic,
}

impl HostClock {
    /// Nanoseconds now on this host clock.
    pub fn now_ns(self) -> u64 {
        match self {
            HostClock::Realtime => stasis_core::clock::realtime_ns(),
            HostClock::Monotonic => stasis_core::clock::mono_ns(),
        }
    }
}

/// The injected error of a base clock: pure arithmetic, no clock reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Skew {
    /// Constant offset added to the host clock, nanoseconds.
    pub offset_ns: i64,
    /// Rate error in parts per million (+50 runs 50 µs/s fast).
    pub drift_ppm: f64,
    /// Host instant from which the drift accumulates.
    pub origin_host_ns: u64,
}

impl Skew {
    /// No error at all.
    pub fn none(origin_host_ns: u64) -> Self {
        Skew { offset_ns: 0, drift_ppm: 0.0, origin_host_ns }
    }

    /// The base clock's error at host instant `host_ns`, nanoseconds.
    pub fn error_at(&self, host_ns: u64) -> i64 {
        let elapsed = host_ns as i64 - self.origin_host_ns as i64;
        self.offset_ns + (elapsed as f64 * self.drift_ppm / 1e6).round() as i64
    }

    /// The base clock's reading at host instant `host_ns`.
    pub fn base_at(&self, host_ns: u64) -> u64 {
        (host_ns as i64 + self.error_at(host_ns)) as u64
    }
}

/// Errors of the base clock: it is read-only, statime steers an overlay on top.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum BaseClockError {
    /// Something tried to step or slew the base clock itself.
    #[error("the skewed base clock is read-only")]
    ReadOnly,
}

/// A host clock with an injected [`Skew`]; implements statime's `Clock` as a
/// read-only clock (only `now` works), so it can sit under an `OverlayClock`.
#[derive(Debug, Clone, Copy)]
pub struct SkewedClock {
    host: HostClock,
    skew: Skew,
}

impl SkewedClock {
    /// A base clock over `host`, wrong by `offset_ns` now and drifting by
    /// `drift_ppm` from now on.
    pub fn new(host: HostClock, offset_ns: i64, drift_ppm: f64) -> Self {
        Self::with_skew(host, Skew { offset_ns, drift_ppm, origin_host_ns: host.now_ns() })
    }

    /// A base clock over `host` with a given skew.
    pub fn with_skew(host: HostClock, skew: Skew) -> Self {
        SkewedClock { host, skew }
    }

    /// The host clock underneath.
    pub fn host(&self) -> HostClock {
        self.host
    }

    /// The injected error.
    pub fn skew(&self) -> Skew {
        self.skew
    }

    /// The base clock's reading, as a statime [`Time`], at host instant `host_ns`.
    pub fn time_at(&self, host_ns: u64) -> Time {
        Time::from_nanos(self.skew.base_at(host_ns))
    }
}

impl statime::Clock for SkewedClock {
    type Error = BaseClockError;

    fn now(&self) -> Time {
        self.time_at(self.host.now_ns())
    }

    fn step_clock(&mut self, _offset: Duration) -> Result<Time, Self::Error> {
        Err(BaseClockError::ReadOnly)
    }

    fn set_frequency(&mut self, _ppm: f64) -> Result<Time, Self::Error> {
        Err(BaseClockError::ReadOnly)
    }

    fn set_properties(&mut self, _time_properties_ds: &statime::config::TimePropertiesDS) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Nanoseconds since the epoch of a statime [`Time`].
pub fn time_ns(t: Time) -> i128 {
    t.secs() as i128 * 1_000_000_000 + t.subsec_nanos() as i128
}

#[cfg(test)]
mod tests {
    use super::*;
    use statime::Clock;

    #[test]
    fn skew_is_offset_plus_accumulated_drift() {
        let s = Skew { offset_ns: 3_000_000, drift_ppm: 50.0, origin_host_ns: 1_000_000_000 };
        assert_eq!(s.error_at(1_000_000_000), 3_000_000);
        // 2 s later, +50 ppm has gained 100 µs.
        assert_eq!(s.error_at(3_000_000_000), 3_100_000);
        // before the origin the drift runs backwards
        assert_eq!(s.error_at(0), 3_000_000 - 50_000);
        assert_eq!(s.base_at(3_000_000_000), 3_003_100_000);
    }

    #[test]
    fn negative_skew() {
        let s = Skew { offset_ns: -2_000_000, drift_ppm: -30.0, origin_host_ns: 0 };
        assert_eq!(s.error_at(10_000_000_000), -2_000_000 - 300_000);
    }

    #[test]
    fn no_skew_is_the_host_clock() {
        let s = Skew::none(5);
        assert_eq!(s.base_at(123_456_789), 123_456_789);
    }

    #[test]
    fn now_is_the_skewed_host_reading() {
        let c = SkewedClock::new(HostClock::Realtime, 3_000_000, 0.0);
        let before = HostClock::Realtime.now_ns();
        let now = time_ns(c.now());
        let after = HostClock::Realtime.now_ns();
        assert!(now >= before as i128 + 3_000_000 && now <= after as i128 + 3_000_000);
    }

    #[test]
    fn base_clock_refuses_to_be_steered() {
        let mut c = SkewedClock::new(HostClock::Monotonic, 0, 0.0);
        assert_eq!(c.step_clock(Duration::from_nanos(5)), Err(BaseClockError::ReadOnly));
        assert_eq!(c.set_frequency(1.0), Err(BaseClockError::ReadOnly));
    }

    #[test]
    fn time_ns_round_trips() {
        let t = Time::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(time_ns(t), 1_700_000_000_123_456_789);
    }
}
