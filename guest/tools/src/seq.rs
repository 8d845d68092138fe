//! Sequence accounting of received flows: gaps, duplicates, reordering.
//!
//! Pure core: the receiver feeds it `(sender, record)` pairs in arrival order.
//! Definitions (per flow):
//! - `received`: distinct sequence numbers received (duplicates not counted),
//!   so it reaches the announced total exactly when the flow is complete;
//! - `highest`: the highest sequence number seen;
//! - `missing`: numbers below `highest` never received (a late arrival fills
//!   its gap and lowers it);
//! - `dups`: arrivals of a number already received;
//! - `reordered`: first arrivals of a number below `highest`.
//!
//! Received numbers are kept as disjoint ranges, so memory grows with the
//! number of gaps, not with the length of the flow.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::record::Record;

/// How one arrival was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A new number at or above the highest seen.
    InOrder,
    /// A new number below the highest seen.
    Reordered,
    /// A number already received.
    Duplicate,
}

/// The accounting of one flow.
#[derive(Debug, Clone, Default)]
pub struct FlowTracker {
    /// first -> last (inclusive) of each run of received numbers.
    runs: BTreeMap<u64, u64>,
    received: u64,
    highest: Option<u64>,
    dups: u64,
    reordered: u64,
    total: Option<u64>,
    completion_reported: bool,
}

impl FlowTracker {
    /// A flow with nothing received.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one arrival of `seq`; `total` is the count the sender
    /// announced in the record (0 = unbounded).
    pub fn record(&mut self, seq: u64, total: u64) -> Arrival {
        if total != 0 {
            self.total = Some(total);
        }
        if let Some((_, &last)) = self.runs.range(..=seq).next_back() {
            if seq <= last {
                self.dups += 1;
                return Arrival::Duplicate;
            }
        }
        // Insert seq, merging with the run ending at seq-1 and the one starting at seq+1.
        let left = seq
            .checked_sub(1)
            .and_then(|p| self.runs.range(..=p).next_back().filter(|(_, &l)| l == p).map(|(&s, _)| s));
        let last = seq.checked_add(1).and_then(|n| self.runs.remove(&n)).unwrap_or(seq);
        self.runs.insert(left.unwrap_or(seq), last);
        self.received += 1;
        match self.highest {
            Some(h) if seq < h => {
                self.reordered += 1;
                Arrival::Reordered
            }
            _ => {
                self.highest = Some(seq);
                Arrival::InOrder
            }
        }
    }

    /// Distinct numbers received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Highest number seen.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// The number after the highest seen (0 before any arrival).
    pub fn next_expected(&self) -> u64 {
        self.highest.map_or(0, |h| h.saturating_add(1))
    }

    /// Numbers below the highest seen that were never received.
    pub fn missing(&self) -> u64 {
        self.next_expected() - self.received
    }

    /// Arrivals of an already-received number.
    pub fn dups(&self) -> u64 {
        self.dups
    }

    /// First arrivals below the highest seen.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// The sender's announced total, if bounded.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Whether every announced record arrived.
    pub fn is_complete(&self) -> bool {
        self.total.is_some_and(|t| self.received >= t)
    }

    /// True exactly once: on the first call after the flow became complete.
    pub fn take_completion(&mut self) -> bool {
        if self.is_complete() && !self.completion_reported {
            self.completion_reported = true;
            return true;
        }
        false
    }

    /// Number of disjoint runs held (memory use; 1 for a gap-free flow).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

/// A flow's identity: the sender's address and the flow id in its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source IP address (not port: a reconnecting TCP sender keeps its flow).
    pub sender: IpAddr,
    /// Flow id from the record.
    pub flow: u32,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.sender, self.flow)
    }
}

/// All flows a receiver has seen.
#[derive(Debug, Clone, Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, FlowTracker>,
}

impl FlowTable {
    /// No flows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one record from `sender`; returns the classification and
    /// whether this arrival completed the flow (true once per flow).
    pub fn on_record(&mut self, sender: IpAddr, rec: &Record) -> (FlowKey, Arrival, bool) {
        let key = FlowKey { sender, flow: rec.flow };
        let t = self.flows.entry(key).or_default();
        let arrival = t.record(rec.seq, rec.total);
        let completed = t.take_completion();
        (key, arrival, completed)
    }

    /// One flow.
    pub fn get(&self, key: &FlowKey) -> Option<&FlowTracker> {
        self.flows.get(key)
    }

    /// Every flow, in a stable order.
    pub fn iter_sorted(&self) -> Vec<(FlowKey, &FlowTracker)> {
        let mut v: Vec<_> = self.flows.iter().map(|(k, t)| (*k, t)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut FlowTracker, seqs: &[u64]) -> Vec<Arrival> {
        seqs.iter().map(|&s| t.record(s, 0)).collect()
    }

    #[test]
    fn in_order_flow_has_no_gaps() {
        let mut t = FlowTracker::new();
        feed(&mut t, &(0..1000).collect::<Vec<_>>());
        assert_eq!((t.received(), t.highest(), t.missing(), t.dups(), t.reordered()), (1000, Some(999), 0, 0, 0));
        assert_eq!(t.next_expected(), 1000);
        assert_eq!(t.runs(), 1);
    }

    #[test]
    fn gap_is_missing_until_filled_by_late_arrival() {
        let mut t = FlowTracker::new();
        assert_eq!(feed(&mut t, &[0, 1, 4, 5]), vec![Arrival::InOrder; 4]);
        assert_eq!((t.received(), t.highest(), t.missing()), (4, Some(5), 2));
        assert_eq!(t.runs(), 2);
        assert_eq!(t.record(3, 0), Arrival::Reordered);
        assert_eq!((t.missing(), t.reordered()), (1, 1));
        assert_eq!(t.record(2, 0), Arrival::Reordered);
        assert_eq!((t.missing(), t.reordered(), t.received()), (0, 2, 6));
        assert_eq!(t.runs(), 1, "filled gaps merge the runs");
    }

    #[test]
    fn duplicates_count_once_whether_in_run_or_at_edges() {
        let mut t = FlowTracker::new();
        feed(&mut t, &[0, 1, 2, 7]);
        assert_eq!(feed(&mut t, &[0, 2, 7, 1]), vec![Arrival::Duplicate; 4]);
        assert_eq!((t.received(), t.dups(), t.missing(), t.reordered()), (4, 4, 4, 0));
        assert_eq!(t.record(3, 0), Arrival::Reordered);
        assert_eq!(t.record(3, 0), Arrival::Duplicate);
        assert_eq!((t.received(), t.dups(), t.missing()), (5, 5, 3));
    }

    #[test]
    fn flow_starting_late_counts_earlier_numbers_missing() {
        let mut t = FlowTracker::new();
        assert_eq!(t.missing(), 0);
        assert_eq!(t.next_expected(), 0);
        t.record(10, 0);
        assert_eq!((t.missing(), t.highest()), (10, Some(10)));
    }

    #[test]
    fn completion_reported_exactly_once_and_not_by_duplicates() {
        let mut t = FlowTracker::new();
        for s in [0, 1, 1, 1] {
            t.record(s, 3);
            assert!(!t.take_completion(), "duplicates must not complete the flow");
        }
        assert_eq!(t.total(), Some(3));
        t.record(2, 3);
        assert!(t.is_complete());
        assert!(t.take_completion());
        assert!(!t.take_completion());
        t.record(2, 3);
        assert!(!t.take_completion());
    }

    #[test]
    fn unbounded_flow_never_completes() {
        let mut t = FlowTracker::new();
        t.record(0, 0);
        assert_eq!(t.total(), None);
        assert!(!t.take_completion());
    }

    #[test]
    fn extreme_sequence_numbers() {
        let mut t = FlowTracker::new();
        assert_eq!(t.record(u64::MAX, 0), Arrival::InOrder);
        assert_eq!(t.record(u64::MAX, 0), Arrival::Duplicate);
        assert_eq!(t.record(u64::MAX - 1, 0), Arrival::Reordered);
        assert_eq!(t.runs(), 1);
    }

    #[test]
    fn matches_a_naive_model_on_a_scrambled_stream() {
        // Deterministic pseudo-random arrivals with losses, dups and reordering,
        // checked against a HashSet model.
        let mut t = FlowTracker::new();
        let mut seen = std::collections::HashSet::new();
        let (mut dups, mut reord, mut hi): (u64, u64, Option<u64>) = (0, 0, None);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..5000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = match x % 10 {
                0 => continue,                 // lost
                1 => i.saturating_sub(x % 50), // late or duplicate
                _ => i,
            };
            let a = t.record(seq, 0);
            let expect = if !seen.insert(seq) {
                dups += 1;
                Arrival::Duplicate
            } else if hi.is_some_and(|h| seq < h) {
                reord += 1;
                Arrival::Reordered
            } else {
                hi = Some(seq);
                Arrival::InOrder
            };
            assert_eq!(a, expect, "seq {seq}");
        }
        let h = hi.unwrap();
        assert_eq!(t.highest(), Some(h));
        assert_eq!(t.received(), seen.len() as u64);
        assert_eq!(t.missing(), (0..=h).filter(|s| !seen.contains(s)).count() as u64);
        assert_eq!((t.dups(), t.reordered()), (dups, reord));
    }

    #[test]
    fn table_separates_flows_by_sender_and_id() {
        let mut table = FlowTable::new();
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        let b: IpAddr = "10.1.1.3".parse().unwrap();
        let rec = |flow, seq| Record { flow, seq, total: 2, send_mono_ns: 0 };
        table.on_record(a, &rec(7, 0));
        table.on_record(b, &rec(7, 1));
        let (key, arrival, done) = table.on_record(a, &rec(7, 1));
        assert_eq!((key.to_string(), arrival, done), ("10.1.1.1/7".to_string(), Arrival::InOrder, true));
        table.on_record(a, &rec(8, 0));
        let flows = table.iter_sorted();
        assert_eq!(flows.len(), 3);
        let kb = FlowKey { sender: b, flow: 7 };
        assert_eq!(table.get(&kb).unwrap().missing(), 1);
    }
}
