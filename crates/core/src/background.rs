//! Work that must not take CPU or disk time from the guests: the store
//! commit that follows a checkpoint's resume (chunking, hashing,
//! compressing hundreds of MiB) runs while the experiment runs again, on
//! the same cores as its vCPUs. Run at the lowest priority that still makes
//! progress, it yields to every guest thread that wants the CPU.

/// The nice value background work runs at (the lowest: CFS gives a
/// nice-19 thread ~1.5 % of a core against one busy nice-0 thread, and
/// everything when the core is idle; SCHED_IDLE could starve it forever
/// under a guest that never sleeps).
pub const NICE: i32 = 19;

/// Runs `f` on a thread of its own at nice [`NICE`] and idle-class-like
/// I/O priority (best effort, level 7), and returns what it returns.
/// Threads `f` starts inherit both (Linux keeps them per thread and copies
/// them at thread creation); the caller's own priority is untouched. A
/// panic in `f` is resumed in the caller. Failing to lower a priority is
/// not an error: the work then runs at the caller's priority
/// ([`Priority::of_this_thread`] tells which).
pub fn run<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("stasis-background".into())
            .spawn_scoped(s, || {
                lower_this_thread();
                f()
            })
            .expect("cannot start a thread");
        match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A thread's CPU and I/O priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub nice: i32,
    /// `ioprio_get(2)`'s value: class << 13 | level.
    pub ioprio: i32,
}

impl Priority {
    /// The calling thread's.
    pub fn of_this_thread() -> Priority {
        // SAFETY: plain syscalls on the calling thread (who 0 = this thread).
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
            let ioprio = libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) as i32;
            Priority { nice, ioprio }
        }
    }
}

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_BE: libc::c_int = 2;
/// Best effort, lowest level.
pub const IOPRIO_LOWEST: i32 = IOPRIO_CLASS_BE << 13 | 7;

fn lower_this_thread() {
    // SAFETY: plain syscalls on the calling thread (who 0 = this thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, NICE);
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_LOWEST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_low_and_so_do_its_threads_but_the_caller_does_not() {
        let before = Priority::of_this_thread();
        let (inside, child) = run(|| {
            let inside = Priority::of_this_thread();
            let child = std::thread::spawn(Priority::of_this_thread).join().unwrap();
            (inside, child)
        });
        assert_eq!(inside, Priority { nice: NICE, ioprio: IOPRIO_LOWEST });
        assert_eq!(child, inside, "threads the work starts inherit its priority");
        assert_eq!(Priority::of_this_thread(), before, "the caller's priority is untouched");
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| run(|| panic!("boom")));
        assert!(r.is_err());
    }
}
