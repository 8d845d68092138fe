//! A short real-time boost of a QEMU's control threads around an instant
//! that must be met: the resume of a checkpoint.
//!
//! A QMP command is read by QEMU's monitor I/O thread (`IO mon_iothread`)
//! and executed by its main loop thread (the process's first thread); on a
//! busy host either may wait milliseconds for a CPU behind other VMs' vCPU
//! threads, and every such millisecond at `cont` becomes skew between this
//! guest's clocks and the others'. [`Boost::control_threads`] puts those two
//! threads into `SCHED_FIFO` (priority 1, below every kernel RT thread) for
//! the moment; dropping the [`Boost`] puts them back. vCPU threads are left
//! alone, so a spinning guest cannot starve the host. Use with care: a
//! boosted main thread was seen spinning for minutes while its VM was
//! stopped, starving the ordinary threads it waited for (a priority-inversion
//! livelock on a 2-core host); the agent uses it only when asked
//! (`STASIS_QEMU_BOOST=1`). If the process holding
//! a `Boost` dies before dropping it, the two threads stay real-time; they
//! block in their event loops, so this costs latency for others, not CPU.

use std::io;

/// Threads boosted to `SCHED_FIFO`, restored to their old policy on drop.
#[derive(Debug, Default)]
pub struct Boost {
    /// (tid, old policy, old priority).
    threads: Vec<(libc::pid_t, libc::c_int, libc::c_int)>,
}

/// Thread name (comm) of QEMU's monitor I/O thread.
const MONITOR_THREAD: &str = "IO mon_iothread";
/// Thread names (comm) of QEMU's vCPU threads begin with this.
const VCPU_THREAD_PREFIX: &str = "CPU ";

impl Boost {
    /// Boost the main thread and the monitor I/O thread of QEMU process `pid`.
    /// Fails (changing nothing) if the process is gone or the caller may not
    /// set real-time policies.
    pub fn control_threads(pid: u32) -> io::Result<Boost> {
        Self::threads(pid, false)
    }

    /// The main thread, the monitor thread, and with `vcpus` the vCPU
    /// threads (`CPU n/TCG`): kept private, a vCPU thread of a running guest
    /// in `SCHED_FIFO` would hold a host CPU.
    fn threads(pid: u32, vcpus: bool) -> io::Result<Boost> {
        let mut tids = vec![pid as libc::pid_t];
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else { continue };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let comm = comm.trim_end();
            if comm == MONITOR_THREAD || (vcpus && comm.starts_with(VCPU_THREAD_PREFIX)) {
                tids.push(tid);
            }
        }
        let mut boost = Boost::default();
        for tid in tids {
            // SAFETY: sched_getscheduler/sched_getparam/sched_setscheduler on a
            // thread id; they only read or write the kernel's scheduling
            // attributes of that thread through valid pointers to `param`.
            unsafe {
                let policy = libc::sched_getscheduler(tid);
                let mut old = libc::sched_param { sched_priority: 0 };
                if policy < 0 || libc::sched_getparam(tid, &mut old) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let param = libc::sched_param { sched_priority: 1 };
                if libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) != 0 {
                    return Err(io::Error::last_os_error());
                }
                boost.threads.push((tid, policy, old.sched_priority));
            }
        }
        Ok(boost)
    }

    /// How many threads are boosted.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Nothing boosted.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        for &(tid, policy, prio) in &self.threads {
            let param = libc::sched_param { sched_priority: prio };
            // SAFETY: as above; restores the attributes read before.
            if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
                tracing::debug!(tid, error = %io::Error::last_os_error(), "could not restore a QEMU thread's scheduling policy (gone?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: reads the policy of a thread id.
        unsafe { libc::sched_getscheduler(tid) }
    }

    #[test]
    fn boost_sets_fifo_and_drop_restores() {
        // Our own process stands in for QEMU: its main thread is boosted
        // (there is no monitor thread).
        let pid = std::process::id();
        let before = policy(pid as libc::pid_t);
        match Boost::control_threads(pid) {
            Ok(b) => {
                assert_eq!(b.len(), 1);
                assert_eq!(policy(pid as libc::pid_t), libc::SCHED_FIFO);
                drop(b);
                assert_eq!(policy(pid as libc::pid_t), before);
            }
            // Not root / no CAP_SYS_NICE: the error is reported, nothing changed.
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                assert_eq!(policy(pid as libc::pid_t), before);
            }
        }
    }

    #[test]
    fn a_gone_process_is_an_error() {
        assert!(Boost::control_threads(u32::MAX / 2).is_err());
    }
}
