use super::*;
use crate::config::{LanConfig, LanMember, LinkConfig, PortConfig};

const MS: u64 = 1_000_000;

fn ports(n: usize) -> Vec<PortConfig> {
    (0..n)
        .map(|i| PortConfig {
            name: format!("p{i}"),
            socket: format!("/nonexistent/p{i}").into(),
            kind: Default::default(),
            peer: None,
        })
        .collect()
}

fn link(s: Shaping) -> Topology {
    Topology {
        ports: ports(2),
        lans: vec![],
        links: vec![LinkConfig { name: "l".into(), a: "p0".into(), b: "p1".into(), a_to_b: s, b_to_a: s }],
        seed: 7,
    }
}

fn lan(n: usize, s: Shaping) -> Topology {
    Topology {
        ports: ports(n),
        lans: vec![LanConfig {
            name: "lan".into(),
            members: (0..n).map(|i| LanMember { port: format!("p{i}"), to_lan: s, from_lan: s }).collect(),
        }],
        links: vec![],
        seed: 7,
    }
}

fn connected(t: &Topology, now: MonoNs) -> Scheduler {
    let mut s = Scheduler::new(t, now);
    for p in 0..s.port_count() {
        s.set_connected(p, true);
    }
    s
}

/// A frame with a sequence number in its payload.
fn frame(dst: u8, src: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, dst]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src]);
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    f
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[14..18].try_into().unwrap())
}

/// (port, seq, due) of every delivery.
fn deliveries(out: &mut Vec<Action>) -> Vec<(PortId, u32, MonoNs)> {
    out.drain(..)
        .filter_map(|a| match a {
            Action::Deliver { port, frame, due, .. } => Some((port, seq_of(&frame), due)),
            _ => None,
        })
        .collect()
}

/// Run from `from` to `to`, polling exactly at each deadline, and collect deliveries.
fn run(s: &mut Scheduler, from: MonoNs, to: MonoNs) -> Vec<(PortId, u32, MonoNs)> {
    let mut out = Vec::new();
    let mut got = Vec::new();
    s.poll(from, &mut out);
    got.extend(deliveries(&mut out));
    while let Some(d) = s.next_deadline() {
        if d > to {
            break;
        }
        s.poll(d.max(from), &mut out);
        for (p, q, due) in deliveries(&mut out) {
            assert_eq!(due.max(from), d.max(from), "released exactly when due");
            got.push((p, q, due));
        }
    }
    s.poll(to, &mut out);
    got.extend(deliveries(&mut out));
    got
}

#[test]
fn serialisation_and_delay_are_exact_to_the_nanosecond() {
    let sh = Shaping { bandwidth_bps: 100_000_000, delay_ns: 10 * MS, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    // 1500 B at 100 Mbit/s = 120 µs; two back-to-back frames queue behind each other.
    s.ingress(1_000, 0, frame(1, 0, 1, 1500));
    s.ingress(1_000, 0, frame(1, 0, 2, 1500));
    s.ingress(500_000, 0, frame(1, 0, 3, 64)); // serialiser idle again: 64 B = 5120 ns
    let got = run(&mut s, 1_000, 20 * MS);
    assert_eq!(
        got,
        vec![(1, 1, 1_000 + 120_000 + 10 * MS), (1, 2, 1_000 + 240_000 + 10 * MS), (1, 3, 500_000 + 5_120 + 10 * MS),]
    );
    // Not one nanosecond early.
    let mut s = connected(&link(sh), 0);
    s.ingress(0, 0, frame(1, 0, 1, 1500));
    let mut out = Vec::new();
    s.poll(120_000 + 10 * MS - 1, &mut out);
    assert!(out.is_empty());
    s.poll(120_000 + 10 * MS, &mut out);
    assert_eq!(deliveries(&mut out), vec![(1, 1, 120_000 + 10 * MS)]);
}

#[test]
fn serialisation_time_rounds_up() {
    assert_eq!(tx_time_ns(14, 3), 37_333_333_334);
    assert_eq!(tx_time_ns(1500, 1_000_000_000), 12_000);
    assert_eq!(tx_time_ns(1500, 0), 0);
}

#[test]
fn drop_tail_queue_limits_packets_and_bytes() {
    let sh = Shaping { bandwidth_bps: 1_000_000, queue_packets: 3, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    for q in 0..5 {
        s.ingress(0, 0, frame(1, 0, q, 100)); // 800 µs each
    }
    let st = s.stats(0);
    assert_eq!(st.pipes[0].counters.dropped_queue, 2);
    assert_eq!(st.pipes[0].backlog_frames, 3);
    // After the first frame is serialised there is room for one more.
    s.ingress(800_000, 0, frame(1, 0, 5, 100));
    s.ingress(800_000, 0, frame(1, 0, 6, 100));
    assert_eq!(s.stats(800_000).pipes[0].counters.dropped_queue, 3);
    let got: Vec<u32> = run(&mut s, 800_000, 10_000 * MS).into_iter().map(|d| d.1).collect();
    assert_eq!(got, vec![0, 1, 2, 5]);

    let sh = Shaping { bandwidth_bps: 1_000_000, queue_bytes: 250, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    for q in 0..3 {
        s.ingress(0, 0, frame(1, 0, q, 100));
    }
    assert_eq!(s.stats(0).pipes[0].counters.dropped_queue, 1);
}

#[test]
fn loss_rate_is_within_bounds_and_reproducible() {
    let sh = Shaping { bandwidth_bps: 0, loss: 0.1, queue_packets: u32::MAX, ..Shaping::default() };
    let n = 100_000u64;
    let lost = |seed: u64| {
        let mut t = link(sh);
        t.seed = seed;
        let mut s = connected(&t, 0);
        for q in 0..n {
            s.ingress(q, 0, frame(1, 0, q as u32, 64));
        }
        s.stats(n).pipes[0].counters.dropped_loss
    };
    let a = lost(1);
    // mean 10 000, sigma ~95: 5 sigma.
    assert!((9_525..=10_475).contains(&a), "lost {a}");
    assert_eq!(a, lost(1));
    assert_ne!(a, lost(2));
}

#[test]
fn jitter_stays_in_range_and_never_reorders() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: MS, jitter_ns: 500_000, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    for q in 0..40 {
        s.ingress(q as u64 * 10_000, 0, frame(1, 0, q, 64));
    }
    let got = run(&mut s, 0, 100 * MS);
    assert_eq!(got.len(), 40);
    let mut last = 0;
    for (i, &(_, q, due)) in got.iter().enumerate() {
        assert_eq!(q, i as u32);
        assert!(due >= last);
        last = due;
        let sent = i as u64 * 10_000;
        assert!(due >= sent + MS && due <= sent + MS + 500_000 + 400_000, "due {due} sent {sent}");
    }
}

#[test]
fn freeze_and_thaw_preserve_every_remaining_delay() {
    let sh = Shaping { bandwidth_bps: 100_000_000, delay_ns: 10 * MS, ..Shaping::default() };
    let base = 1_000 * MS;
    // Reference: never frozen.
    let mut r = connected(&link(sh), base);
    let mut f = connected(&link(sh), base);
    for q in 0..20u32 {
        let t = base + q as u64 * 700_000;
        r.ingress(t, 0, frame(1, 0, q, 1000));
        f.ingress(t, 0, frame(1, 0, q, 1000));
    }
    let freeze = base + 15 * MS;
    let frozen_for = 3_000 * MS + 17;
    let reference = run(&mut r, base, base + 100 * MS);
    f.schedule_freeze(base, freeze, 0).unwrap();
    let before = run(&mut f, base, freeze);
    assert!(f.is_frozen());
    // Frozen: a long wait releases nothing.
    let mut out = Vec::new();
    f.poll(freeze + 2_000 * MS, &mut out);
    assert!(deliveries(&mut out).is_empty());
    let rep = f.thaw(freeze + frozen_for).unwrap();
    assert_eq!(rep.frozen_for_ns, frozen_for);
    assert_eq!(rep.held_frames, 0);
    let after = run(&mut f, freeze + frozen_for, freeze + frozen_for + 100 * MS);
    assert!(!before.is_empty() && !after.is_empty());
    let mut all = before.clone();
    all.extend(after.iter().map(|&(p, q, due)| (p, q, due - frozen_for)));
    assert_eq!(all, reference, "every frame keeps its remaining delay to the nanosecond");
    for d in &before {
        assert!(d.2 <= freeze);
    }
}

#[test]
fn frames_arriving_while_frozen_get_the_frozen_virtual_arrival() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: 5 * MS, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    s.schedule_freeze(0, 10 * MS, 0).unwrap();
    let mut out = Vec::new();
    s.poll(10 * MS, &mut out);
    assert_eq!(out, vec![Action::Frozen { at: 10 * MS }]);
    s.ingress(12 * MS, 0, frame(1, 0, 1, 64));
    // An arrival after the freeze instant but before the poll noticed it is also stamped at the freeze.
    let mut s2 = connected(&link(sh), 0);
    s2.schedule_freeze(0, 10 * MS, 0).unwrap();
    s2.ingress(11 * MS, 0, frame(1, 0, 1, 64));
    s2.poll(11 * MS, &mut out);
    for s in [&mut s, &mut s2] {
        s.thaw(50 * MS).unwrap();
        assert_eq!(run(s, 50 * MS, 100 * MS), vec![(1, 1, 55 * MS)]);
    }
}

#[test]
fn hold_lead_holds_late_frames_and_reports_lateness() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: 10 * MS, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    for q in 0..10u32 {
        s.ingress(q as u64 * MS, 0, frame(1, 0, q, 64)); // due at 10, 11, ..., 19 ms
    }
    s.schedule_freeze(0, 15 * MS, 2 * MS).unwrap(); // hold from 13 ms
    let before = run(&mut s, 0, 15 * MS);
    assert_eq!(before.iter().map(|d| d.1).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(s.is_frozen());
    let (inflight, held) = s.frame_counts();
    assert_eq!((inflight, held), (4, 3)); // 13, 14, 15 ms held; 16..19 in flight
    let rep = s.thaw(100 * MS).unwrap();
    assert_eq!(rep.held_frames, 3);
    assert_eq!(rep.max_hold_lateness_ns, 2 * MS);
    let mut out = Vec::new();
    s.poll(100 * MS, &mut out);
    let got = deliveries(&mut out);
    assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![3, 4, 5]);
    let rest = run(&mut s, 100 * MS, 200 * MS);
    assert_eq!(rest, vec![(1, 6, 101 * MS), (1, 7, 102 * MS), (1, 8, 103 * MS), (1, 9, 104 * MS)]);
}

#[test]
fn per_port_freeze_holds_only_that_port() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: MS, ..Shaping::default() };
    let mut s = connected(&link(sh), 0);
    s.schedule_port_freeze(0, 1, 5 * MS, 0);
    for q in 0..10u32 {
        s.ingress(q as u64 * MS, 0, frame(1, 0, q, 64));
        s.ingress(q as u64 * MS, 1, frame(0, 1, 100 + q, 64));
    }
    let got = run(&mut s, 0, 20 * MS);
    let to1: Vec<u32> = got.iter().filter(|d| d.0 == 1).map(|d| d.1).collect();
    let to0: Vec<u32> = got.iter().filter(|d| d.0 == 0).map(|d| d.1).collect();
    assert_eq!(to1, vec![0, 1, 2, 3]);
    assert_eq!(to0.len(), 10);
    let (n, late) = s.thaw_port(20 * MS, 1).unwrap();
    assert_eq!((n, late), (6, 15 * MS));
    let got = run(&mut s, 20 * MS, 30 * MS);
    assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8, 9]);
    assert!(matches!(s.thaw_port(30 * MS, 1), Err(SchedError::PortNotFrozen(_))));
}

#[test]
fn lan_learns_macs_and_floods_unknown_and_broadcast() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: MS, ..Shaping::default() };
    let mut s = connected(&lan(3, sh), 0);
    s.ingress(0, 0, frame(1, 0, 1, 64)); // to p1's MAC, unknown: flooded
    let got = run(&mut s, 0, 10 * MS);
    assert_eq!(got, vec![(1, 1, 2 * MS), (2, 1, 2 * MS)]);
    s.ingress(10 * MS, 1, frame(0, 1, 2, 64)); // p0 was learned: unicast
    assert_eq!(run(&mut s, 10 * MS, 20 * MS), vec![(0, 2, 12 * MS)]);
    s.ingress(20 * MS, 0, frame(1, 0, 3, 64)); // p1 learned now
    assert_eq!(run(&mut s, 20 * MS, 30 * MS), vec![(1, 3, 22 * MS)]);
    let mut b = frame(0, 2, 4, 64);
    b[0..6].copy_from_slice(&[0xff; 6]);
    s.ingress(30 * MS, 2, b);
    let got: Vec<PortId> = run(&mut s, 30 * MS, 40 * MS).into_iter().map(|d| d.0).collect();
    assert_eq!(got, vec![0, 1]);
}

#[test]
fn lan_access_links_shape_each_direction() {
    // to_lan 1 ms then from_lan 2 ms, serialisation on both stages.
    let mut t = lan(2, Shaping::default());
    t.lans[0].members[0].to_lan = Shaping { bandwidth_bps: 8_000_000, delay_ns: MS, ..Shaping::default() };
    t.lans[0].members[1].from_lan = Shaping { bandwidth_bps: 4_000_000, delay_ns: 2 * MS, ..Shaping::default() };
    let mut s = connected(&t, 0);
    s.ingress(0, 0, frame(1, 0, 1, 100)); // 100 µs at 8 Mbit/s, 200 µs at 4 Mbit/s
    assert_eq!(run(&mut s, 0, 10 * MS), vec![(1, 1, 100_000 + MS + 200_000 + 2 * MS)]);
}

#[test]
fn unconnected_and_unattached_ports_drop_and_count() {
    let sh = Shaping { bandwidth_bps: 0, ..Shaping::default() };
    let mut t = link(sh);
    t.ports.push(PortConfig {
        name: "lonely".into(),
        socket: "/nonexistent/l".into(),
        kind: Default::default(),
        peer: None,
    });
    let mut s = Scheduler::new(&t, 0);
    s.set_connected(0, true);
    s.ingress(0, 0, frame(1, 0, 1, 64));
    s.ingress(0, 2, frame(1, 0, 1, 64));
    assert!(run(&mut s, 0, MS).is_empty());
    let st = s.stats(MS);
    assert_eq!(st.ports[1].counters.dropped_unconnected, 1);
    assert_eq!(st.ports[2].counters.dropped_unattached, 1);
}

#[test]
fn save_is_refused_unless_frozen_and_thaw_unless_frozen() {
    let mut s = connected(&link(Shaping::default()), 0);
    assert_eq!(s.save().unwrap_err(), SchedError::NotFrozen);
    assert_eq!(s.thaw(5).unwrap_err(), SchedError::NotFrozen);
    s.schedule_freeze(0, 10, 0).unwrap();
    assert_eq!(s.save().unwrap_err(), SchedError::NotFrozen);
    assert_eq!(s.schedule_freeze(0, 10, 0).unwrap_err(), SchedError::FreezeScheduled);
    let mut out = Vec::new();
    s.poll(10, &mut out);
    assert!(s.save().is_ok());
    assert_eq!(s.schedule_freeze(0, 10, 0).unwrap_err(), SchedError::AlreadyFrozen);
}

/// Save/restore in the middle of LAN + link traffic with loss and jitter gives
/// exactly the future of a node that was never saved.
#[test]
fn restore_continues_exactly_like_the_original() {
    let sh =
        Shaping { bandwidth_bps: 50_000_000, delay_ns: 3 * MS, jitter_ns: 100_000, loss: 0.05, ..Shaping::default() };
    let mut t = lan(3, sh);
    t.ports.extend((3..5).map(|i| PortConfig {
        name: format!("p{i}"),
        socket: format!("/nonexistent/p{i}").into(),
        kind: Default::default(),
        peer: None,
    }));
    t.links.push(LinkConfig { name: "l".into(), a: "p3".into(), b: "p4".into(), a_to_b: sh, b_to_a: sh });
    let traffic = |s: &mut Scheduler, from: u64, to: u64| {
        let mut out = Vec::new();
        let mut got = Vec::new();
        let mut now = from;
        let mut q = (from / 100_000) as u32;
        while now < to {
            s.poll(now, &mut out);
            got.extend(deliveries(&mut out));
            if !s.is_frozen() {
                s.ingress(
                    now,
                    (q % 3) as usize,
                    frame(((q + 1) % 3) as u8, (q % 3) as u8, q, 200 + (q as usize % 1200)),
                );
                s.ingress(now, 3 + (q % 2) as usize, frame(9, 8, q, 1500));
            }
            q += 1;
            now += 100_000;
        }
        got
    };
    let freeze = 200 * MS;
    let mut a = connected(&t, 0);
    let mut b = connected(&t, 0);
    a.schedule_freeze(0, freeze, 300_000).unwrap();
    b.schedule_freeze(0, freeze, 300_000).unwrap();
    let ga = traffic(&mut a, 0, freeze + 1);
    let gb = traffic(&mut b, 0, freeze + 1);
    assert_eq!(ga, gb);
    let state = b.save().unwrap();
    let (inflight, held) = b.frame_counts();
    assert!(inflight > 10 && held > 0, "in flight {inflight}, held {held}");
    let path = tempfile::tempdir().unwrap();
    let file = path.path().join("s.bin");
    state.write_file(&file).unwrap();
    let loaded = NodeState::read_file(&file).unwrap();
    assert_eq!(loaded, state);
    let mut c = Scheduler::restore(&t, &loaded).unwrap();
    for p in 0..5 {
        c.set_connected(p, true);
    }
    assert_eq!(c.frame_counts(), (inflight, held));
    let thaw = 5_000 * MS;
    let ra = a.thaw(thaw).unwrap();
    let rc = c.thaw(thaw).unwrap();
    assert_eq!((ra.held_frames, ra.max_hold_lateness_ns), (rc.held_frames, rc.max_hold_lateness_ns));
    assert!(ra.max_hold_lateness_ns <= 300_000);
    let fa = traffic(&mut a, thaw, thaw + 300 * MS);
    let fc = traffic(&mut c, thaw, thaw + 300 * MS);
    assert!(fa.len() > 1000);
    assert_eq!(fa, fc);
    assert_eq!(a.stats(0).pipes, c.stats(0).pipes);
}

#[test]
fn restore_refuses_a_foreign_topology() {
    let mut s = connected(&link(Shaping::default()), 0);
    s.schedule_freeze(0, 0, 0).unwrap();
    let mut out = Vec::new();
    s.poll(0, &mut out);
    let st = s.save().unwrap();
    let mut other = link(Shaping::default());
    other.links[0].a_to_b.delay_ns = 1;
    assert!(matches!(Scheduler::restore(&other, &st), Err(RestoreError::ForeignTopology)));
}

#[test]
fn state_file_refuses_corruption_and_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = connected(&link(Shaping { delay_ns: MS, ..Shaping::default() }), 0);
    s.ingress(0, 0, frame(1, 0, 1, 64));
    s.schedule_freeze(0, 10, 0).unwrap();
    let mut out = Vec::new();
    s.poll(10, &mut out);
    let st = s.save().unwrap();
    let file = dir.path().join("s.bin");
    let w = st.write_file(&file).unwrap();
    assert_eq!(w.bytes, std::fs::metadata(&file).unwrap().len());
    // Frames of the experiment's traffic: the owner's only, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[60] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let e = NodeState::read_file(&file).unwrap_err();
    assert!(format!("{:?}", e).contains("Checksum"), "{e:?}");
    std::fs::write(&file, b"{\"ports\":[]}").unwrap();
    assert!(NodeState::read_file(&file).is_err());
    let other = stasis_core::envelope::Kind { name: "qemu", ..crate::state::KIND };
    std::fs::write(&file, stasis_core::envelope::encode(&other, &st).unwrap()).unwrap();
    let e = NodeState::read_file(&file).unwrap_err();
    assert!(format!("{:?}", e).contains("WrongKind"), "{e:?}");
}

/// A saved link with one frame in flight each way.
fn saved_link() -> (Topology, NodeState) {
    let t = link(Shaping { delay_ns: MS, ..Shaping::default() });
    let mut s = connected(&t, 0);
    s.ingress(0, 0, frame(1, 0, 1, 64));
    s.ingress(0, 1, frame(0, 1, 2, 64));
    s.schedule_freeze(0, 10, 0).unwrap();
    let mut out = Vec::new();
    s.poll(10, &mut out);
    let st = s.save().unwrap();
    (t, st)
}

/// [`saved_link`] with a frame held at p1 too.
fn saved_with_frames() -> (Topology, NodeState) {
    let (t, mut st) = saved_link();
    st.ports[1].held.push(HeldState { data: frame(1, 0, 3, 64), late_ns: 5 });
    assert!(st.pipes.iter().all(|p| p.frames.len() == 1));
    (t, st)
}

fn out_of_range(r: Result<Scheduler, RestoreError>) -> &'static str {
    match r {
        Err(RestoreError::OutOfRange { field, .. }) => field,
        Err(e) => panic!("expected OutOfRange, got {e}"),
        Ok(_) => panic!("a hostile state was restored"),
    }
}

#[test]
fn restore_refuses_saved_times_that_would_overflow_naming_the_field() {
    let (t, st) = saved_with_frames();
    Scheduler::restore(&t, &st).unwrap();
    type Edit = fn(&mut NodeState);
    let cases: [(&str, Edit); 5] = [
        ("pipe busy_remaining_ns", |st| st.pipes[0].busy_remaining_ns = u64::MAX),
        ("pipe last_exit_remaining_ns", |st| st.pipes[1].last_exit_remaining_ns = u64::MAX),
        ("frame remaining_ns", |st| {
            let f = &mut st.pipes[0].frames[0];
            (f.remaining_ns, f.tx_remaining_ns) = (u64::MAX, u64::MAX);
        }),
        ("held late_ns", |st| st.ports[1].held[0].late_ns = u64::MAX),
        ("held late_ns", |st| st.ports[1].held[0].late_ns = VT_BASE + 1),
    ];
    for (field, edit) in cases {
        let mut bad = st.clone();
        edit(&mut bad);
        assert_eq!(out_of_range(Scheduler::restore(&t, &bad)), field);
    }
    let e = RestoreError::OutOfRange { field: "held late_ns", value: u64::MAX, max: VT_BASE };
    assert!(e.to_string().contains("held late_ns"), "{e}");
}

#[test]
fn restore_refuses_counters_and_sequence_numbers_that_would_overflow() {
    let (t, st) = saved_with_frames();
    type Edit = fn(&mut NodeState);
    let cases: [(&str, Edit); 5] = [
        ("next_seq", |st| st.next_seq = u64::MAX),
        ("pipe frames_in", |st| st.pipes[0].counters.frames_in = u64::MAX),
        ("pipe dropped_loss", |st| st.pipes[1].counters.dropped_loss = u64::MAX),
        ("port bytes_out", |st| st.ports[0].counters.bytes_out = u64::MAX),
        ("port errors", |st| st.ports[1].counters.errors = MAX_COUNT + 1),
    ];
    for (field, edit) in cases {
        let mut bad = st.clone();
        edit(&mut bad);
        assert_eq!(out_of_range(Scheduler::restore(&t, &bad)), field);
    }
    // A frame whose tie-break the node would hand out again.
    let mut bad = st.clone();
    bad.pipes[0].frames[0].seq = bad.next_seq;
    assert!(matches!(Scheduler::restore(&t, &bad), Err(RestoreError::Inconsistent(_))));
    // A held frame larger than any frame.
    let mut bad = st.clone();
    bad.ports[1].held[0].data = vec![0; crate::frame::MAX_FRAME + 1];
    assert!(matches!(Scheduler::restore(&t, &bad), Err(RestoreError::Inconsistent(_))));
}

#[test]
fn a_state_at_every_cap_restores_and_runs_without_overflow() {
    let (t, mut st) = saved_with_frames();
    st.next_seq = MAX_COUNT;
    for p in &mut st.pipes {
        p.busy_remaining_ns = MAX_REMAINING;
        p.last_exit_remaining_ns = MAX_REMAINING;
        p.counters = PipeCounters {
            frames_in: MAX_COUNT,
            bytes_in: MAX_COUNT,
            frames_out: MAX_COUNT,
            bytes_out: MAX_COUNT,
            dropped_queue: MAX_COUNT,
            dropped_loss: MAX_COUNT,
        };
        for f in &mut p.frames {
            (f.remaining_ns, f.tx_remaining_ns) = (MAX_REMAINING, MAX_REMAINING);
        }
    }
    for p in &mut st.ports {
        p.counters = PortCounters {
            frames_in: MAX_COUNT,
            bytes_in: MAX_COUNT,
            frames_out: MAX_COUNT,
            bytes_out: MAX_COUNT,
            dropped_unconnected: MAX_COUNT,
            dropped_unattached: MAX_COUNT,
            errors: MAX_COUNT,
        };
    }
    st.ports[1].held[0].late_ns = VT_BASE;
    let mut r = Scheduler::restore(&t, &st).unwrap();
    for p in 0..r.port_count() {
        r.set_connected(p, true);
    }
    r.thaw(1_000).unwrap();
    r.ingress(2_000, 0, frame(1, 0, 9, 64));
    r.note_port_error(1);
    let got = run(&mut r, 2_000, 10 * MS);
    assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![3], "the held frame, nothing else yet");
    assert_eq!(r.stats(10 * MS).ports[0].counters.frames_in, MAX_COUNT + 1);
}

/// Serialises as a sequence claiming `0` elements and holding none.
struct ClaimedSeq(usize);

impl serde::Serialize for ClaimedSeq {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        s.serialize_seq(Some(self.0))?.end()
    }
}

#[test]
fn a_saved_count_of_2_pow_40_frames_allocates_nothing_and_is_refused() {
    let (_, st) = saved_with_frames();
    // NodeState's fields in order, with one pipe whose frame list claims
    // 2^40 entries (48 TiB of FrameState) and the file ending there.
    let hostile =
        (&st.topology, st.rng_seed, st.rng_stream, st.rng_word_pos, st.next_seq, [(0u64, 0u64, ClaimedSeq(1 << 40))]);
    let bytes = stasis_core::envelope::encode(&crate::state::KIND, &hostile).unwrap();
    assert!(bytes.len() < 4096);
    // An allocation of the claimed size would abort the test process.
    let e = stasis_core::envelope::decode::<NodeState>(&crate::state::KIND, &bytes).unwrap_err();
    assert!(matches!(e, stasis_core::envelope::EnvelopeError::Decode(_)), "{e:?}");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary bytes in a valid envelope, or mutations of a real state, never panic the loader.
        #[test]
        fn state_loader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8)) {
            let (t, saved) = saved_link();
            if let Ok(st) = stasis_core::envelope::decode::<NodeState>(&crate::state::KIND, &stasis_core::envelope::encode(&crate::state::KIND, &data).unwrap()) {
                let _ = Scheduler::restore(&t, &st);
            }
            let mut payload = postcard::to_stdvec(&saved).unwrap();
            for (i, v) in flips {
                let i = i.index(payload.len());
                payload[i] = v;
            }
            if let Ok(st) = postcard::from_bytes::<NodeState>(&payload) {
                if let Ok(mut r) = Scheduler::restore(&st.topology.clone(), &st) {
                    let _ = r.thaw(1_000);
                    let _ = run(&mut r, 1_000, 10_000 * MS);
                }
            }
        }
    }
}

fn vhost_link(sh: Shaping) -> Topology {
    let mut t = link(sh);
    for p in &mut t.ports {
        p.kind = crate::config::PortKind::VhostUser;
    }
    t
}

#[test]
fn vhost_ports_ignore_the_hold_lead() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: 10 * MS, ..Shaping::default() };
    let mut s = connected(&vhost_link(sh), 0);
    for q in 0..10u32 {
        s.ingress(q as u64 * MS, 0, frame(1, 0, q, 64)); // due at 10, 11, ..., 19 ms
    }
    s.schedule_freeze(0, 15 * MS, 2 * MS).unwrap(); // the lead would hold from 13 ms
    let before = run(&mut s, 0, 15 * MS);
    assert_eq!(before.iter().map(|d| d.1).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(s.frame_counts(), (4, 1)); // only the frame due at the freeze instant waits
    let rep = s.thaw(100 * MS).unwrap();
    assert_eq!((rep.held_frames, rep.max_hold_lateness_ns), (1, 0));
}

#[test]
fn a_blocked_port_keeps_its_frames_in_order_and_releases_them_when_unblocked() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: MS, ..Shaping::default() };
    let mut s = connected(&vhost_link(sh), 0);
    for q in 0..3u32 {
        s.ingress(0, 0, frame(1, 0, q, 64));
    }
    let mut out = Vec::new();
    s.poll(MS, &mut out);
    let got = deliveries(&mut out);
    assert_eq!(got.len(), 3);
    // The I/O layer delivered frame 0 and could not deliver 1 and 2 (no buffer).
    s.unsend(1, frame(1, 0, 2, 64), MS);
    s.unsend(1, frame(1, 0, 1, 64), MS);
    s.set_blocked(1, true);
    s.ingress(MS, 0, frame(1, 0, 3, 64));
    let later = run(&mut s, MS, 10 * MS);
    assert!(later.is_empty(), "nothing is handed over while blocked: {later:?}");
    assert_eq!(s.frame_counts(), (0, 3));
    assert_eq!(s.next_deadline(), None, "a blocked port does not spin the loop");
    s.set_blocked(1, false);
    assert_eq!(s.next_deadline(), Some(0));
    s.poll(10 * MS, &mut out);
    assert_eq!(deliveries(&mut out).iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(s.stats(10 * MS).ports[1].counters.frames_out, 4);
}

#[test]
fn a_blocked_port_outside_a_freeze_has_a_bounded_backlog() {
    let sh = Shaping { bandwidth_bps: 0, delay_ns: 0, queue_packets: 1_000_000, ..Shaping::default() };
    let mut s = connected(&vhost_link(sh), 0);
    s.set_blocked(1, true);
    let n = BLOCKED_BACKLOG as u32 + 10;
    for q in 0..n {
        s.ingress(0, 0, frame(1, 0, q, 64));
    }
    let mut out = Vec::new();
    s.poll(MS, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.frame_counts(), (0, BLOCKED_BACKLOG as u64));
    assert_eq!(s.stats(MS).ports[1].counters.dropped_unconnected, 10);
}
