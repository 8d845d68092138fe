//! NTP-style clock exchange between two guests (`stasis-traffic clockx`) and
//! the work-rate counter (`stasis-traffic work`): the I/O-free parts.
//!
//! A client stamps `t1` (its CLOCK_MONOTONIC) and sends; the server stamps
//! `t2` on receipt and `t3` just before replying; the client stamps `t4` on
//! receipt. With a symmetric path the server's clock minus the client's is
//! θ = ((t2 − t1) + (t3 − t4)) / 2 and the round trip without the server's
//! own time is δ = (t4 − t1) − (t3 − t2). The guests booted at different
//! instants, so θ itself is arbitrary; its *change* across a checkpoint is
//! the skew the checkpoint introduced between the two virtual clocks.

/// Size of a clock-exchange datagram: magic, sequence number, t1, t2, t3.
pub const PACKET_LEN: usize = 40;
const MAGIC: u64 = 0x5354_4153_4953_4358; // "STASISCX"

/// One exchange's four timestamps, in ns of each side's CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Client send.
    pub t1: u64,
    /// Server receive.
    pub t2: u64,
    /// Server send.
    pub t3: u64,
    /// Client receive.
    pub t4: u64,
}

impl Exchange {
    /// Server clock minus client clock, ns.
    pub fn offset_ns(&self) -> i64 {
        let a = self.t2 as i128 - self.t1 as i128;
        let b = self.t3 as i128 - self.t4 as i128;
        ((a + b) / 2) as i64
    }

    /// Round-trip delay excluding the server's turnaround, ns.
    pub fn delay_ns(&self) -> i64 {
        ((self.t4 as i128 - self.t1 as i128) - (self.t3 as i128 - self.t2 as i128)) as i64
    }
}

/// Encodes a datagram (`t2`, `t3` zero in a request).
pub fn encode(seq: u64, t1: u64, t2: u64, t3: u64) -> [u8; PACKET_LEN] {
    let mut b = [0u8; PACKET_LEN];
    for (i, v) in [MAGIC, seq, t1, t2, t3].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// Decodes a datagram into `(seq, t1, t2, t3)`; `None` if it is not one.
pub fn decode(b: &[u8]) -> Option<(u64, u64, u64, u64)> {
    if b.len() != PACKET_LEN {
        return None;
    }
    let w = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    (w(0) == MAGIC).then(|| (w(1), w(2), w(3), w(4)))
}

/// Counts busy-loop iterations per window of CLOCK_MONOTONIC.
#[derive(Debug, Clone)]
pub struct WorkWindows {
    window_ns: u64,
    start_ns: u64,
    iters: u64,
}

/// One finished work window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkWindow {
    /// Guest monotonic time at the end of the window (when it was noticed).
    pub end_ns: u64,
    /// Its actual length, ns (≥ the nominal window).
    pub len_ns: u64,
    /// Iterations counted in it.
    pub iters: u64,
}

impl WorkWindows {
    /// Starts the first window at `now_ns`.
    pub fn new(window_ns: u64, now_ns: u64) -> Self {
        WorkWindows { window_ns: window_ns.max(1), start_ns: now_ns, iters: 0 }
    }

    /// Adds `iters` iterations done by `now_ns`; returns the window they
    /// closed, if any (the next window starts at `now_ns`).
    pub fn add(&mut self, iters: u64, now_ns: u64) -> Option<WorkWindow> {
        self.iters += iters;
        let len = now_ns.saturating_sub(self.start_ns);
        if len < self.window_ns {
            return None;
        }
        let w = WorkWindow { end_ns: now_ns, len_ns: len, iters: self.iters };
        self.start_ns = now_ns;
        self.iters = 0;
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_and_delay_of_a_symmetric_path() {
        // Server clock = client + 1_000_000; one-way 50 µs; turnaround 7 µs.
        let t1 = 5_000_000u64;
        let t2 = t1 + 50_000 + 1_000_000;
        let t3 = t2 + 7_000;
        let t4 = t3 - 1_000_000 + 50_000;
        let x = Exchange { t1, t2, t3, t4 };
        assert_eq!(x.offset_ns(), 1_000_000);
        assert_eq!(x.delay_ns(), 100_000);
    }

    #[test]
    fn negative_offset_and_asymmetry_error() {
        // Server behind by 3 s; path 10 µs out, 30 µs back: θ errs by 10 µs.
        let t1 = 10_000_000_000u64;
        let t2 = t1 + 10_000 - 3_000_000_000;
        let t3 = t2 + 1_000;
        let t4 = t3 + 3_000_000_000 + 30_000;
        let x = Exchange { t1, t2, t3, t4 };
        assert_eq!(x.offset_ns(), -3_000_000_000 - 10_000);
        assert_eq!(x.delay_ns(), 40_000);
    }

    #[test]
    fn packets_round_trip_and_foreign_bytes_are_refused() {
        let p = encode(7, 1, 2, 3);
        assert_eq!(decode(&p), Some((7, 1, 2, 3)));
        let mut bad = p;
        bad[0] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&p[..39]), None);
    }

    #[test]
    fn work_windows_close_on_time_and_restart() {
        let mut w = WorkWindows::new(100, 1_000);
        assert_eq!(w.add(5, 1_050), None);
        assert_eq!(w.add(5, 1_120), Some(WorkWindow { end_ns: 1_120, len_ns: 120, iters: 10 }));
        assert_eq!(w.add(3, 1_219), None);
        assert_eq!(w.add(1, 1_220), Some(WorkWindow { end_ns: 1_220, len_ns: 100, iters: 4 }));
    }
}
