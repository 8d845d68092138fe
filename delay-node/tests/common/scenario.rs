//! The checkpoint-under-load scenario shared by `tests/exactness.rs` (which
//! asserts what a real fault breaks) and `benches/exactness.rs` (which prints
//! the figures and compares them with the 50 µs goal): sequence-numbered flows
//! through a LAN and a link, freeze under load, save, kill the node, start a
//! new one from the state, thaw.
//!
//! The structural checks (every frame exactly once and in order, frames really
//! crossed the checkpoint, nothing dropped, the events written) are asserted
//! here; the timing figures are returned.

use super::*;
use delay_node::config::{LanConfig, LanMember, LinkConfig, PortConfig, Shaping, Topology};
use stasis_core::clock::{mono_ns, MonoNs};
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MS: u64 = 1_000_000;
const LEN: usize = 100;
const BW: u64 = 100_000_000; // 100 B = 8 µs

/// (flow, src port, dst port, expected one-way delay)
fn flows() -> Vec<(u8, usize, usize, u64)> {
    let tx = 8_000;
    vec![
        (0, 0, 1, 2 * tx + 5 * MS),
        (1, 1, 2, 2 * tx + 5 * MS),
        (2, 2, 0, 2 * tx + 5 * MS),
        (3, 3, 4, tx + 10 * MS),
        (4, 4, 3, tx + 7 * MS),
    ]
}

fn topology(dir: &Path) -> Topology {
    let sh = |d: u64| Shaping { bandwidth_bps: BW, delay_ns: d, queue_packets: 1000, ..Shaping::default() };
    Topology {
        ports: (0..5)
            .map(|i| PortConfig {
                name: format!("vm{i}"),
                socket: dir.join(format!("vm{i}.sock")),
                kind: Default::default(),
                peer: None,
            })
            .collect(),
        lans: vec![LanConfig {
            name: "lan0".into(),
            members: (0..3)
                .map(|i| LanMember { port: format!("vm{i}"), to_lan: sh(2 * MS), from_lan: sh(3 * MS) })
                .collect(),
        }],
        links: vec![LinkConfig {
            name: "l0".into(),
            a: "vm3".into(),
            b: "vm4".into(),
            a_to_b: sh(10 * MS),
            b_to_a: sh(7 * MS),
        }],
        seed: 1,
    }
}

#[derive(Debug, Clone, Copy)]
struct Rx {
    flow: u8,
    seq: u32,
    sent: MonoNs,
    recv: MonoNs,
}

/// Receive frames addressed to `me` until end of stream.
fn receiver(mut s: UnixStream, me: u8) -> std::thread::JoinHandle<Vec<Rx>> {
    std::thread::spawn(move || {
        set_fifo(0);
        let mut got = Vec::new();
        while let Some(f) = read_frame(&mut s) {
            let recv = mono_ns();
            if f[0..6] != mac(me) {
                continue; // flooded before the switch learned the MAC: a NIC ignores it
            }
            got.push(Rx {
                flow: f[14],
                seq: u32::from_be_bytes(f[15..19].try_into().unwrap()),
                sent: u64::from_be_bytes(f[19..27].try_into().unwrap()),
                recv,
            });
        }
        got
    })
}

/// Send one flow's frames every `gap` ns from `start` while before `stop`; returns the next seq.
fn sender(
    mut s: UnixStream,
    (flow, src, dst): (u8, u8, u8),
    first: u32,
    start: MonoNs,
    stop: MonoNs,
    gap: u64,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        set_fifo(0);
        let mut seq = first;
        let mut next = start.max(mono_ns());
        loop {
            // Sleep, never spin: a spinning real-time thread would starve the node on 2 cores.
            let now = mono_ns();
            if next > now {
                std::thread::sleep(Duration::from_nanos(next - now));
            }
            let now = mono_ns();
            if now >= stop {
                return seq;
            }
            write_frame(&mut s, &test_frame(dst, src, flow, seq, now, LEN)).expect("send");
            seq += 1;
            next += gap;
        }
    })
}

struct Phase {
    rx: Vec<std::thread::JoinHandle<Vec<Rx>>>,
    tx: Vec<std::thread::JoinHandle<u32>>,
}

fn start_phase(sockets: &[PathBuf], first: &[u32], start: MonoNs, stop: MonoNs) -> Phase {
    let conns: Vec<UnixStream> = sockets.iter().map(|p| connect_retry(p)).collect();
    let rx = conns.iter().enumerate().map(|(i, c)| receiver(c.try_clone().unwrap(), i as u8)).collect();
    let tx = flows()
        .iter()
        .map(|&(flow, src, dst, _)| {
            // Staggered so the flows' frames do not all wake the 2 cores at once.
            let start = start + flow as u64 * 80_000;
            sender(
                conns[src].try_clone().unwrap(),
                (flow, src as u8, dst as u8),
                first[flow as usize],
                start,
                stop,
                400_000,
            )
        })
        .collect();
    Phase { rx, tx }
}

/// Virtual-delay errors (ns, measured minus configured) of one run.
pub struct Figures {
    /// At the receiving test clients, host time minus the frozen part.
    pub client: Vec<i64>,
    /// At the node boundary (pcap stamps), every frame.
    pub node: Vec<i64>,
    /// At the node boundary, the frames that crossed the checkpoint.
    pub crossed: Vec<i64>,
    /// Whether the test threads and the node got real-time priority.
    pub rt_ok: bool,
    /// How long the node was frozen (ns).
    pub frozen_for: u64,
}

/// (min, p50, p99, max) of `v`, sorting it.
pub fn summary(v: &mut [i64]) -> (i64, i64, i64, i64) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    (v[0], p(0.5), p(0.99), v[v.len() - 1])
}

/// Run the scenario once; panics on a structural fault.
pub fn run() -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(dir.path());
    let topo_path = dir.path().join("topo.json");
    std::fs::write(&topo_path, serde_json::to_string_pretty(&topo).unwrap()).unwrap();
    let control = dir.path().join("ctl.sock");
    let events = dir.path().join("events.jsonl");
    let state = dir.path().join("dn.state");
    let sockets: Vec<PathBuf> = topo.ports.iter().map(|p| p.socket.clone()).collect();
    let rt = rt();
    let rt_ok = set_fifo(0);

    // Phase A: traffic, then the "VMs" stop at T and the node freezes at T.
    let mut n1 = NodeProc::start(&topo_path, &control, None, &events);
    let mut ctl = client(&rt, &control);
    for i in 0..5 {
        rt.block_on(ctl.pcap(&format!("vm{i}"), Some(&dir.path().join(format!("a{i}.pcap"))))).unwrap();
    }
    let t0 = mono_ns() + 20 * MS;
    let freeze = t0 + 300 * MS;
    let a = start_phase(&sockets, &[0; 5], t0, freeze);
    rt.block_on(ctl.freeze_at(freeze, 0)).unwrap();
    let report = rt.block_on(ctl.save(&state)).unwrap();
    assert!(mono_ns() >= freeze);
    assert_eq!(report.frozen_at, freeze);
    // 10 ms of link delay at 2.5 kframe/s per flow: dozens of frames are inside the node.
    assert!(report.frames_in_flight >= 20, "{report:?}");
    let sent_a: Vec<u32> = a.tx.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..5 {
        rt.block_on(ctl.pcap(&format!("vm{i}"), None)).unwrap();
    }
    n1.kill();
    let rx_a: Vec<Rx> = a.rx.into_iter().flat_map(|h| h.join().unwrap()).collect();

    // Phase B: a new node from the state; the VMs reconnect; thaw at T2, traffic resumes at T2.
    let mut n2 = NodeProc::start(&topo_path, &control, Some(&state), &events);
    let mut ctl = client(&rt, &control);
    for i in 0..5 {
        rt.block_on(ctl.pcap(&format!("vm{i}"), Some(&dir.path().join(format!("b{i}.pcap"))))).unwrap();
    }
    let thaw = mono_ns() + 100 * MS;
    let end = thaw + 200 * MS;
    let b = start_phase(&sockets, &sent_a, thaw, end);
    let thawed = rt.block_on(ctl.thaw_at(thaw)).unwrap();
    assert_eq!(thawed.thawed_at, thaw);
    assert_eq!(thawed.held_frames, 0);
    let sent: Vec<u32> = b.tx.into_iter().map(|h| h.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(50)); // the last frames are 10 ms away
    let stats = rt.block_on(ctl.stats()).unwrap();
    for i in 0..5 {
        rt.block_on(ctl.pcap(&format!("vm{i}"), None)).unwrap();
    }
    rt.block_on(ctl.shutdown()).unwrap();
    let _ = n2.child.wait();
    let rx_b: Vec<Rx> = b.rx.into_iter().flat_map(|h| h.join().unwrap()).collect();
    for p in &stats.pipes {
        assert_eq!(p.counters.dropped_queue + p.counters.dropped_loss, 0, "{p:?}");
        assert_eq!(p.depth_frames, 0, "{p:?}");
    }

    // Every frame exactly once, in order per flow, at the receiving test client.
    let frozen = (freeze, thaw);
    let frozen_for = thaw - freeze;
    let mut per_flow: BTreeMap<u8, Vec<Rx>> = BTreeMap::new();
    for r in rx_a.iter().chain(rx_b.iter()) {
        per_flow.entry(r.flow).or_default().push(*r);
    }
    let mut client_err = Vec::new();
    let mut crossed = 0;
    for &(flow, _, _, expected) in &flows() {
        let got = per_flow.remove(&flow).unwrap_or_default();
        let seqs: Vec<u32> = got.iter().map(|r| r.seq).collect();
        let want: Vec<u32> = (0..sent[flow as usize]).collect();
        assert_eq!(seqs, want, "flow {flow}: every frame exactly once, in order");
        for r in &got {
            // Host time minus the part of [sent, recv] the node spent frozen.
            let overlap = r.recv.min(frozen.1).saturating_sub(r.sent.max(frozen.0));
            crossed += (overlap > 0) as usize;
            client_err.push((r.recv - r.sent - overlap) as i64 - expected as i64);
        }
    }
    assert!(crossed >= 20, "only {crossed} frames crossed the checkpoint");

    // At the node boundary (pcap: stamped when read from the sender's socket and
    // when written to the receiver's), each frame's virtual delay is exact.
    let mut ingress: BTreeMap<(u8, u32), (u64, bool)> = BTreeMap::new();
    let mut egress: BTreeMap<(u8, u32), (u64, bool)> = BTreeMap::new();
    for (phase_b, prefix) in [(false, "a"), (true, "b")] {
        for i in 0..5u8 {
            for (ts, f) in read_pcap(&dir.path().join(format!("{prefix}{i}.pcap"))) {
                let key = (f[14], u32::from_be_bytes(f[15..19].try_into().unwrap()));
                if f[6..12] == mac(i) {
                    assert!(ingress.insert(key, (ts, phase_b)).is_none(), "{key:?} entered twice");
                } else if f[0..6] == mac(i) {
                    assert!(egress.insert(key, (ts, phase_b)).is_none(), "{key:?} left twice");
                }
            }
        }
    }
    assert_eq!(ingress.len(), errors_len(&sent));
    assert_eq!(egress.len(), ingress.len());
    let mut node_err = Vec::new();
    let mut node_crossed = 0;
    let mut crossed_err = Vec::new();
    for (key, &(t_in, b_in)) in &ingress {
        let (t_out, b_out) = egress[key];
        let expected = flows()[key.0 as usize].3 as i64;
        let mut virt = t_out as i64 - t_in as i64;
        if b_out && !b_in {
            virt -= frozen_for as i64;
            node_crossed += 1;
        }
        node_err.push(virt - expected);
        if b_out && !b_in {
            crossed_err.push(virt - expected);
        }
    }
    assert!(node_crossed >= 20);
    let (cmin, c50, c99, cmax) = summary(&mut client_err);
    let (nmin, n50, n99, nmax) = summary(&mut node_err);
    let (xmin, x50, x99, xmax) = summary(&mut crossed_err);
    eprintln!(
        "frames {} crossed {crossed}; virtual-delay error (ns) at the clients: min {cmin} p50 {c50} p99 {c99} max {cmax}; \
         at the node boundary: min {nmin} p50 {n50} p99 {n99} max {nmax}; crossed frames at the node boundary: min {xmin} p50 {x50} p99 {x99} max {xmax}",
        client_err.len()
    );
    let ev = std::fs::read_to_string(&events).unwrap();
    for e in ["\"freeze\"", "\"saved\"", "\"thaw\"", "\"port_connected\""] {
        assert!(ev.contains(e), "events lack {e}: {ev}");
    }
    Figures { client: client_err, node: node_err, crossed: crossed_err, rt_ok, frozen_for }
}

fn errors_len(sent: &[u32]) -> usize {
    sent.iter().map(|&n| n as usize).sum()
}

/// (timestamp ns, frame) of every record of a nanosecond pcap file.
fn read_pcap(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[0..4], &0xa1b2_3c4du32.to_le_bytes());
    assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 1, "Ethernet link type");
    let mut out = Vec::new();
    let mut i = 24;
    while i + 16 <= b.len() {
        let sec = u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as u64;
        let nsec = u32::from_le_bytes(b[i + 4..i + 8].try_into().unwrap()) as u64;
        let len = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()) as usize;
        out.push((sec * 1_000_000_000 + nsec, b[i + 16..i + 16 + len].to_vec()));
        i += 16 + len;
    }
    assert_eq!(i, b.len(), "pcap ends on a record boundary");
    out
}
