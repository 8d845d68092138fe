//! The JSON lines the tools print, built in one place — and, with the
//! `parse` feature (host side: agent, tests, eval), parsed back into types.
//!
//! Formats (one object per line, `docs/guest.md` has the field meanings):
//! - probe: `{"tool":"probe","node","window","mono_ns","real_ns","boot_ns","tsc","samples","interval_ns","max_step_ns":{"mono","real","boot","tsc"},"max_disagree_ns":{"real_mono","boot_mono","tsc_mono"}}`
//! - receiver: `{"tool":"traffic","role":"recv","node","proto","flow","received","highest","missing","dups","reordered","total","mono_ns"}`
//! - sender: `{"tool":"traffic","role":"send","node","proto","dest","sent","done","mono_ns"}`
//!
//! `/init` prints `STASIS-READY node=NAME` once the node is up.

use crate::json::JsonLine;
use crate::probe::WindowReport;
use crate::seq::{FlowKey, FlowTracker};

/// The line `/init` prints when the node is up, before the node name.
pub const READY_PREFIX: &str = "STASIS-READY node=";

/// A probe window report.
pub fn probe_line(node: &str, interval_ns: u64, r: &WindowReport) -> JsonLine {
    let step = r.max_step;
    let dis = r.max_disagree;
    JsonLine::new()
        .str("tool", "probe")
        .str("node", node)
        .u64("window", r.window)
        .u64("mono_ns", r.last.mono_ns)
        .u64("real_ns", r.last.real_ns)
        .u64("boot_ns", r.last.boot_ns)
        .u64("tsc", r.last.tsc)
        .u64("samples", r.samples)
        .u64("interval_ns", interval_ns)
        .object(
            "max_step_ns",
            JsonLine::new()
                .opt_i64("mono", step.map(|s| s.mono))
                .opt_i64("real", step.map(|s| s.real))
                .opt_i64("boot", step.map(|s| s.boot))
                .opt_i64("tsc", step.map(|s| s.tsc)),
        )
        .object(
            "max_disagree_ns",
            JsonLine::new()
                .opt_u64("real_mono", dis.map(|d| d.real_mono))
                .opt_u64("boot_mono", dis.map(|d| d.boot_mono))
                .opt_u64("tsc_mono", dis.map(|d| d.tsc_mono)),
        )
}

/// A receiver's state of one flow at `mono_ns`.
pub fn recv_line(node: &str, proto: &str, key: &FlowKey, t: &FlowTracker, mono_ns: u64) -> JsonLine {
    JsonLine::new()
        .str("tool", "traffic")
        .str("role", "recv")
        .str("node", node)
        .str("proto", proto)
        .str("flow", &key.to_string())
        .u64("received", t.received())
        .opt_u64("highest", t.highest())
        .u64("missing", t.missing())
        .u64("dups", t.dups())
        .u64("reordered", t.reordered())
        .opt_u64("total", t.total())
        .u64("mono_ns", mono_ns)
}

/// A sender's progress towards one destination at `mono_ns`.
pub fn send_line(node: &str, proto: &str, dest: &str, sent: u64, done: bool, mono_ns: u64) -> JsonLine {
    JsonLine::new()
        .str("tool", "traffic")
        .str("role", "send")
        .str("node", node)
        .str("proto", proto)
        .str("dest", dest)
        .u64("sent", sent)
        .bool("done", done)
        .u64("mono_ns", mono_ns)
}

/// Typed parsing of console lines (feature `parse`).
#[cfg(any(test, feature = "parse"))]
pub mod parse {
    use serde::Deserialize;
    use std::fmt;

    /// Largest steps per clock, ns (`None` only in a one-sample first window).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    pub struct ClockSteps {
        /// CLOCK_MONOTONIC.
        pub mono: Option<i64>,
        /// CLOCK_REALTIME.
        pub real: Option<i64>,
        /// CLOCK_BOOTTIME.
        pub boot: Option<i64>,
        /// TSC in ns.
        pub tsc: Option<i64>,
    }

    /// Largest disagreements with CLOCK_MONOTONIC, ns.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    pub struct ClockDisagreement {
        /// Realtime against monotonic.
        pub real_mono: Option<u64>,
        /// Boottime against monotonic.
        pub boot_mono: Option<u64>,
        /// TSC against monotonic.
        pub tsc_mono: Option<u64>,
    }

    /// A `stasis-probe` window report.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct ProbeLine {
        /// Node name.
        pub node: String,
        /// Window number from 1.
        pub window: u64,
        /// Last sample: CLOCK_MONOTONIC, ns.
        pub mono_ns: u64,
        /// Last sample: CLOCK_REALTIME, ns.
        pub real_ns: u64,
        /// Last sample: CLOCK_BOOTTIME, ns.
        pub boot_ns: u64,
        /// Last sample: TSC ticks.
        pub tsc: u64,
        /// Samples in the window.
        pub samples: u64,
        /// Nominal sampling interval, ns.
        pub interval_ns: u64,
        /// Largest step per clock.
        pub max_step_ns: ClockSteps,
        /// Largest disagreement per clock pair.
        pub max_disagree_ns: ClockDisagreement,
    }

    /// A `stasis-traffic recv` flow line.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct RecvLine {
        /// Node name.
        pub node: String,
        /// `udp` or `tcp`.
        pub proto: String,
        /// `SENDER_IP/FLOW_ID`.
        pub flow: String,
        /// Distinct sequence numbers received.
        pub received: u64,
        /// Highest sequence number seen.
        pub highest: Option<u64>,
        /// Numbers below `highest` never received.
        pub missing: u64,
        /// Arrivals of already-received numbers.
        pub dups: u64,
        /// First arrivals below `highest`.
        pub reordered: u64,
        /// Announced total, `None` if unbounded.
        pub total: Option<u64>,
        /// Receiver's CLOCK_MONOTONIC, ns.
        pub mono_ns: u64,
    }

    /// A `stasis-traffic send` progress line.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    pub struct SendLine {
        /// Node name.
        pub node: String,
        /// `udp` or `tcp`.
        pub proto: String,
        /// `IP:PORT`.
        pub dest: String,
        /// Records handed to the kernel.
        pub sent: u64,
        /// Whether `--count` was reached.
        pub done: bool,
        /// Sender's CLOCK_MONOTONIC, ns.
        pub mono_ns: u64,
    }

    /// One line of a guest console.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ConsoleLine {
        /// `STASIS-READY node=NAME` (possibly after firmware junk on the same line).
        Ready {
            /// The node name.
            node: String,
        },
        /// A probe report.
        Probe(ProbeLine),
        /// A receiver flow line.
        Recv(RecvLine),
        /// A sender line.
        Send(SendLine),
        /// Anything else: workload output, blank lines, firmware noise.
        Text(String),
    }

    /// Why a line that claims to be a tool line is not one.
    #[derive(Debug)]
    pub enum LineError {
        /// Starts with `{` but is not valid JSON of the expected shape (a torn line?).
        Json(serde_json::Error),
        /// A JSON object with a `tool`/`role` this crate does not know.
        UnknownTool(String),
    }

    impl fmt::Display for LineError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                LineError::Json(_) => write!(f, "malformed tool line"),
                LineError::UnknownTool(t) => write!(f, "unknown tool line kind {t:?}"),
            }
        }
    }

    impl std::error::Error for LineError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            match self {
                LineError::Json(e) => Some(e),
                LineError::UnknownTool(_) => None,
            }
        }
    }

    /// Classifies one console line (trailing `\r`/`\n` ignored).
    pub fn parse_line(line: &str) -> Result<ConsoleLine, LineError> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(i) = line.find(super::READY_PREFIX) {
            let node = line[i + super::READY_PREFIX.len()..].trim().to_string();
            return Ok(ConsoleLine::Ready { node });
        }
        if !line.starts_with('{') {
            return Ok(ConsoleLine::Text(line.to_string()));
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(LineError::Json)?;
        let kind = (v["tool"].as_str().unwrap_or(""), v["role"].as_str().unwrap_or(""));
        match kind {
            ("probe", _) => serde_json::from_value(v).map(ConsoleLine::Probe),
            ("traffic", "recv") => serde_json::from_value(v).map(ConsoleLine::Recv),
            ("traffic", "send") => serde_json::from_value(v).map(ConsoleLine::Send),
            (t, r) => return Err(LineError::UnknownTool(format!("{t}/{r}"))),
        }
        .map_err(LineError::Json)
    }
}

#[cfg(test)]
mod tests {
    use super::parse::*;
    use super::*;
    use crate::probe::{ProbeCore, Sample};
    use crate::seq::FlowTable;

    #[test]
    fn probe_line_round_trips() {
        let mut core = ProbeCore::new(10_000_000);
        for i in 0..5u64 {
            let t = 1_000_000_000 + i * 10_000_000 + if i == 4 { 2_000_000_000 } else { 0 };
            core.push(Sample { mono_ns: t, real_ns: t + 5, boot_ns: t + 7, tsc: 2 * t });
        }
        let r = core.close_window().unwrap();
        let line = probe_line("n\"1", 10_000_000, &r).finish();
        let ConsoleLine::Probe(p) = parse_line(&line).unwrap() else { panic!("{line}") };
        assert_eq!(p.node, "n\"1");
        assert_eq!((p.window, p.samples, p.interval_ns), (1, 5, 10_000_000));
        assert_eq!(p.mono_ns, r.last.mono_ns);
        assert_eq!(p.max_step_ns.mono, Some(2_000_000_000));
        assert_eq!(p.max_disagree_ns.tsc_mono, Some(0));
    }

    #[test]
    fn first_single_sample_window_parses_with_nulls() {
        let mut core = ProbeCore::new(10);
        core.push(Sample { mono_ns: 1, real_ns: 1, boot_ns: 1, tsc: 1 });
        let line = probe_line("a", 10, &core.close_window().unwrap()).finish();
        let ConsoleLine::Probe(p) = parse_line(&line).unwrap() else { panic!("{line}") };
        assert_eq!(p.max_step_ns.real, None);
        assert_eq!(p.max_disagree_ns.boot_mono, None);
    }

    #[test]
    fn traffic_lines_round_trip() {
        let mut table = FlowTable::new();
        let rec = |seq| crate::record::Record { flow: 7, seq, total: 0, send_mono_ns: 0 };
        let ip = "10.1.1.1".parse().unwrap();
        for s in [0, 2, 2, 1] {
            table.on_record(ip, &rec(s));
        }
        let (key, t) = table.iter_sorted()[0];
        let line = recv_line("b", "udp", &key, t, 42).finish();
        let ConsoleLine::Recv(r) = parse_line(&line).unwrap() else { panic!("{line}") };
        assert_eq!(
            r,
            RecvLine {
                node: "b".into(),
                proto: "udp".into(),
                flow: "10.1.1.1/7".into(),
                received: 3,
                highest: Some(2),
                missing: 0,
                dups: 1,
                reordered: 1,
                total: None,
                mono_ns: 42
            }
        );
        let line = send_line("a", "tcp", "10.1.1.2:5000", 10, true, 9).finish();
        assert_eq!(
            parse_line(&format!("{}\r\n", line.trim_end())).unwrap(),
            ConsoleLine::Send(SendLine {
                node: "a".into(),
                proto: "tcp".into(),
                dest: "10.1.1.2:5000".into(),
                sent: 10,
                done: true,
                mono_ns: 9
            })
        );
    }

    #[test]
    fn ready_text_and_refusals() {
        assert_eq!(
            parse_line("Booting from ROM..\x1b[0m.\rSTASIS-READY node=a\r").unwrap(),
            ConsoleLine::Ready { node: "a".into() }
        );
        assert_eq!(parse_line("iperf Done.").unwrap(), ConsoleLine::Text("iperf Done.".into()));
        assert!(matches!(parse_line("{\"tool\":\"probe\",\"node\":\"a\",\"win"), Err(LineError::Json(_))));
        assert!(matches!(parse_line("{\"tool\":\"probe\"}"), Err(LineError::Json(_))));
        assert!(matches!(parse_line("{\"tool\":\"other\"}"), Err(LineError::UnknownTool(_))));
    }
}
