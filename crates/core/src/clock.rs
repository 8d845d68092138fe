//! The host clock that every scheduled freeze, thaw and measurement uses.
//!
//! Instants are nanoseconds of `CLOCK_MONOTONIC`, shared by every process on a
//! host, so a QEMU stop instant measured by the agent and a delay-node freeze
//! instant are directly comparable. Saved state never stores these instants:
//! they mean nothing after a restart (see STYLE.md, "Persist").

use std::time::Duration;

/// Nanoseconds of `CLOCK_MONOTONIC` on this host.
pub type MonoNs = u64;

/// Now on the host's monotonic clock.
pub fn mono_ns() -> MonoNs {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now on the host's wall clock (`CLOCK_REALTIME`), in ns since the epoch.
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Map a recent wall-clock instant (e.g. a QMP event's timestamp) onto the
/// monotonic clock, assuming the wall clock was not stepped in between.
/// The offset is read between two monotonic reads, so it is exact to well
/// under a microsecond.
pub fn wall_to_mono(wall_ns: u64) -> MonoNs {
    let before = mono_ns();
    let wall = realtime_ns();
    let after = mono_ns();
    let mono_at_wall = before + (after - before) / 2;
    (wall_ns as i128 - wall as i128 + mono_at_wall as i128).max(0) as u64
}

/// Block the calling thread until `deadline`: sleep until shortly before it,
/// then spin, so the wake-up error is a few microseconds rather than the
/// scheduler's tick. Returns the instant actually reached.
pub fn wait_until(deadline: MonoNs) -> MonoNs {
    const SPIN: u64 = 200_000; // the last 200 µs are spun, not slept
    loop {
        let now = mono_ns();
        if now >= deadline {
            return now;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(Duration::from_nanos(left - SPIN));
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a);
    }

    #[test]
    fn wall_instants_map_onto_the_monotonic_clock() {
        let mono = mono_ns();
        let wall = realtime_ns();
        let mapped = wall_to_mono(wall);
        assert!(mapped.abs_diff(mono) < 1_000_000, "{mapped} vs {mono}");
        assert!(wall_to_mono(wall - 5_000_000_000).abs_diff(mono - 5_000_000_000) < 1_000_000);
    }

    #[test]
    fn wait_until_reaches_deadline() {
        let deadline = mono_ns() + 1_000_000;
        let reached = wait_until(deadline);
        assert!(reached >= deadline);
    }
}
