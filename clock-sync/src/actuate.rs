//! Acting at an instant of the synchronised clock: block until the synced
//! clock reads `T`, sleeping until shortly before and spinning the rest.
//!
//! The wait runs on the host's `CLOCK_MONOTONIC` (what the scheduler sleeps
//! on); the synced instant is converted to it through the overlay's steering
//! twice: once to sleep, and again just before spinning, so a correction the
//! PTP filter made during a long sleep is followed. The returned
//! [`Actuation`] says where the target was, when the thread actually got
//! there, and the synced clock's true error at that moment (exact on one
//! machine, where the grandmaster's time is the host `CLOCK_REALTIME`; see
//! [`crate::metrics`]).
//!
//! The thread spins for up to `spin_ns` (plus the sleep's wake-up lateness):
//! call it from a thread that may block, or use [`wait_until_synced_async`],
//! which sleeps on the runtime until 2 ms before and blocks only for those.
//! On a loaded host, run the waiting thread under `SCHED_FIFO`: under
//! `SCHED_OTHER` it was measured waking milliseconds late (docs/skew-bench.md).

use serde::{Deserialize, Serialize};
use stasis_core::clock::{mono_ns, realtime_ns, MonoNs};

use crate::service::SyncedClock;

/// The last part of the wait that is spun rather than slept: longer than a
/// scheduler wake-up usually takes on a loaded host.
pub const DEFAULT_SPIN_NS: u64 = 300_000;

/// What happened in one [`wait_until_synced`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actuation {
    /// The synced instant asked for, ns since the epoch.
    pub target_synced: i128,
    /// The host `CLOCK_REALTIME` instant at which the synced clock reads the
    /// target (under the steering just before the spin).
    pub target_realtime: u64,
    /// The same instant on `CLOCK_MONOTONIC`: what the thread waited for.
    pub target_mono: MonoNs,
    /// When the wait ended, `CLOCK_MONOTONIC` (≥ `target_mono`).
    pub woke_mono: MonoNs,
    /// `CLOCK_REALTIME − CLOCK_MONOTONIC` at the end of the wait: maps
    /// monotonic stamps (e.g. of the command that follows) to real time.
    pub realtime_minus_mono: i128,
    /// The synced clock's error against the host `CLOCK_REALTIME` at the
    /// target: `target_synced − target_realtime` (positive: the synced clock
    /// is ahead, so it reached `T` early). The true error on one machine;
    /// on separate hosts, only the offset to this host's own clock.
    pub clock_error_ns: i64,
    /// The target had already passed when the wait began (no sleep, no spin).
    pub late_on_entry: bool,
}

impl Actuation {
    /// How long after the target the thread woke (≥ 0 unless the clocks
    /// were inconsistent).
    pub fn wake_lateness_ns(&self) -> i64 {
        self.woke_mono as i64 - self.target_mono as i64
    }

    /// A monotonic instant of this host, as `CLOCK_REALTIME` ns.
    pub fn mono_to_realtime(&self, mono: MonoNs) -> i128 {
        mono as i128 + self.realtime_minus_mono
    }
}

/// Convert a host `CLOCK_REALTIME` target to `CLOCK_MONOTONIC`, given one
/// simultaneous pair of readings of the two clocks. Pure arithmetic.
#[must_use]
pub fn realtime_to_mono(target_realtime: u64, realtime_now: u64, mono_now: MonoNs) -> MonoNs {
    (mono_now as i128 + target_realtime as i128 - realtime_now as i128).max(0) as u64
}

/// The synced clock's error at host instant `host_realtime` given what it
/// reads there. Pure arithmetic.
#[must_use]
pub fn clock_error_ns(synced: i128, host_realtime: u64) -> i64 {
    (synced - host_realtime as i128) as i64
}

/// Block until `clock` reads `target_synced`: sleep until `spin_ns` before,
/// re-convert the target under the current steering, then spin.
pub fn wait_until_synced_spin(clock: &SyncedClock, target_synced: i128, spin_ns: u64) -> Actuation {
    let (rt, mono) = paired_now();
    let late_on_entry = clock.synced_at_host(rt) >= target_synced;
    if !late_on_entry {
        let first = realtime_to_mono(clock.host_realtime_at(target_synced), rt, mono);
        let now = mono_ns();
        if first > now + spin_ns {
            std::thread::sleep(std::time::Duration::from_nanos(first - now - spin_ns));
        }
    }
    // Convert again: the filter may have stepped or slewed while we slept.
    let target_realtime = clock.host_realtime_at(target_synced);
    let (rt, mono) = paired_now();
    let target_mono = realtime_to_mono(target_realtime, rt, mono);
    let mut woke = mono_ns();
    while woke < target_mono {
        std::hint::spin_loop();
        woke = mono_ns();
    }
    Actuation {
        target_synced,
        target_realtime,
        target_mono,
        woke_mono: woke,
        realtime_minus_mono: rt as i128 - mono as i128,
        clock_error_ns: clock_error_ns(target_synced, target_realtime),
        late_on_entry,
    }
}

/// [`wait_until_synced_spin`] with [`DEFAULT_SPIN_NS`].
pub fn wait_until_synced(clock: &SyncedClock, target_synced: i128) -> Actuation {
    wait_until_synced_spin(clock, target_synced, DEFAULT_SPIN_NS)
}

/// How long before the target an async caller stops sleeping on its runtime
/// (whose timers have millisecond granularity) and blocks instead.
pub const RUNTIME_LEAD_NS: u64 = 2_000_000;

/// For async callers: sleep on the tokio runtime until [`RUNTIME_LEAD_NS`]
/// before `target_synced`, then [`wait_until_synced_spin`]. Blocks the
/// runtime's thread for the last ~2 ms (other tasks on a current-thread
/// runtime wait that long), so the action that follows runs on time.
pub async fn wait_until_synced_async(clock: &SyncedClock, target_synced: i128, spin_ns: u64) -> Actuation {
    let at = clock.mono_at(target_synced);
    let now = mono_ns();
    if at > now + RUNTIME_LEAD_NS {
        tokio::time::sleep(std::time::Duration::from_nanos(at - now - RUNTIME_LEAD_NS)).await;
    }
    wait_until_synced_spin(clock, target_synced, spin_ns)
}

/// `CLOCK_REALTIME` and `CLOCK_MONOTONIC` read together: the realtime read
/// sits between two monotonic reads and is paired with their midpoint.
fn paired_now() -> (u64, MonoNs) {
    let a = mono_ns();
    let rt = realtime_ns();
    let b = mono_ns();
    (rt, a + (b - a) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_targets_map_by_the_clock_offset() {
        // realtime 1000 s ↔ mono 50 s: a target 2 ms later in real time is 2 ms later in mono
        assert_eq!(realtime_to_mono(1_000_002_000_000, 1_000_000_000_000, 50_000_000_000), 50_002_000_000);
        // a past target maps to the past
        assert_eq!(realtime_to_mono(999_999_000_000, 1_000_000_000_000, 50_000_000_000), 49_999_000_000);
        // never below 0
        assert_eq!(realtime_to_mono(0, 1_000_000_000_000, 5), 0);
    }

    #[test]
    fn clock_error_is_synced_minus_host() {
        assert_eq!(clock_error_ns(1_000_003_000, 1_000_000_000), 3_000);
        assert_eq!(clock_error_ns(999_998_000, 1_000_000_000), -2_000);
    }

    #[test]
    fn the_error_of_an_unsteered_clock_is_exactly_the_injected_one() {
        // No PTP running: the overlay is the identity, the synced clock is
        // the skewed base; its error where it reads T is offset + drift.
        let c = SyncedClock::new(3_000_000, 50.0);
        let target = c.now() + 2_000_000; // 2 ms ahead on the synced clock
        let h = c.host_realtime_at(target);
        let skew = c.skew();
        // synced(h) = h + error(h) = target, so error = target − h
        assert_eq!(clock_error_ns(target, h), skew.error_at(h));
    }

    #[test]
    fn a_real_short_wait_wakes_at_or_after_the_target() {
        // +3 ms and +50 ppm: the clock reaches T 3 ms (and a bit) early
        let c = SyncedClock::new(3_000_000, 50.0);
        let target = c.now() + 5_000_000;
        let a = wait_until_synced(&c, target);
        assert!(!a.late_on_entry);
        assert!(a.woke_mono >= a.target_mono);
        assert!(c.synced_at_host(a.mono_to_realtime(a.woke_mono) as u64) >= target - 1_000);
        assert_eq!(a.clock_error_ns, c.skew().error_at(a.target_realtime));
        assert!((3_000_000..3_100_000).contains(&a.clock_error_ns), "{}", a.clock_error_ns);
        // the monotonic target and the realtime target are the same instant
        assert_eq!(a.mono_to_realtime(a.target_mono), a.target_realtime as i128);
    }

    #[tokio::test]
    async fn the_async_wait_also_ends_at_or_after_the_target() {
        let c = SyncedClock::new(-2_000_000, -30.0);
        let target = c.now() + 10_000_000;
        let a = wait_until_synced_async(&c, target, DEFAULT_SPIN_NS).await;
        assert!(a.woke_mono >= a.target_mono);
        assert_eq!(a.clock_error_ns, c.skew().error_at(a.target_realtime));
    }

    #[test]
    fn a_past_target_returns_at_once_and_says_so() {
        let c = SyncedClock::new(-2_000_000, -30.0);
        let target = c.now() - 10_000_000;
        let a = wait_until_synced(&c, target);
        assert!(a.late_on_entry);
        assert!(a.wake_lateness_ns() >= 9_000_000, "{}", a.wake_lateness_ns());
    }
}
