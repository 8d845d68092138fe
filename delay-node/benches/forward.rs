//! `cargo bench -p delay-node`: forwarding throughput (scheduler core alone,
//! and end to end through unix sockets) and delay accuracy. Prints figures.

use delay_node::config::{LinkConfig, PortConfig, Shaping, Topology};
use delay_node::control::Client;
use delay_node::node::Node;
use delay_node::sched::{Action, Scheduler};
use stasis_core::clock::mono_ns;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn link_topo(dir: &Path, sh: Shaping) -> Topology {
    Topology {
        ports: (0..2)
            .map(|i| PortConfig {
                name: format!("vm{i}"),
                socket: dir.join(format!("vm{i}.sock")),
                kind: Default::default(),
                peer: None,
            })
            .collect(),
        lans: vec![],
        links: vec![LinkConfig { name: "l".into(), a: "vm0".into(), b: "vm1".into(), a_to_b: sh, b_to_a: sh }],
        seed: 0,
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0]);
    f
}

fn core_throughput(len: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sh = Shaping { bandwidth_bps: 0, queue_packets: u32::MAX, ..Shaping::default() };
    let mut s = Scheduler::new(&link_topo(dir.path(), sh), 0);
    s.set_connected(1, true);
    let n = 2_000_000u64;
    let f = frame(len);
    let mut out = Vec::with_capacity(64);
    let t0 = Instant::now();
    let mut delivered = 0u64;
    for i in 0..n {
        s.ingress(i, 0, f.clone());
        if i % 32 == 31 {
            s.poll(i, &mut out);
            delivered += out.drain(..).filter(|a| matches!(a, Action::Deliver { .. })).count() as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(delivered, n);
    println!(
        "core   {len:>5} B: {:>10.0} frames/s {:>7.2} Gbit/s (scheduler only, incl. one copy per frame)",
        n as f64 / secs,
        n as f64 * len as f64 * 8.0 / secs / 1e9
    );
}

struct Running {
    rt: tokio::runtime::Runtime,
    ctl: Client,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

impl Running {
    fn start(sh: Shaping, fifo: bool) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let topo = link_topo(dir.path(), sh);
        let control = dir.path().join("ctl.sock");
        let node = Node::bind(&topo, &control, None, None).unwrap();
        let thread = std::thread::spawn(move || {
            if fifo {
                let p = libc::sched_param { sched_priority: 10 };
                // SAFETY: plain syscall; failing leaves the normal policy.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
            }
            node.run().unwrap()
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ctl = rt.block_on(Client::connect(&control)).unwrap();
        let path = dir.path().to_owned();
        Running { rt, ctl, thread: Some(thread), _dir: dir, dir: path }
    }
    fn stats(&mut self) -> delay_node::sched::Stats {
        self.rt.block_on(self.ctl.stats()).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.ctl.shutdown());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn socket_throughput(len: usize) {
    let sh = Shaping { bandwidth_bps: 0, queue_packets: 100_000, ..Shaping::default() };
    let mut node = Running::start(sh, false);
    let mut tx = UnixStream::connect(node.dir.join("vm0.sock")).unwrap();
    let mut rx = UnixStream::connect(node.dir.join("vm1.sock")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let dur = Duration::from_secs(2);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let t0 = Instant::now();
        let mut last = t0;
        while let Ok(n) = rx.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes += n as u64;
            last = Instant::now();
        }
        (bytes, (last - t0).as_secs_f64())
    });
    // 32 frames per write, like a guest sending bursts; the sender is not the bottleneck.
    let mut batch = Vec::new();
    for _ in 0..32 {
        batch.extend_from_slice(&(len as u32).to_be_bytes());
        batch.extend_from_slice(&frame(len));
    }
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < dur {
        tx.write_all(&batch).unwrap();
        sent += 32;
    }
    let (bytes, secs) = reader.join().unwrap();
    let frames = bytes / (len as u64 + 4);
    let st = node.stats();
    println!(
        "socket {len:>5} B: {:>10.0} frames/s {:>7.2} Gbit/s (unix sockets in and out, node on one thread; {} of {} frames delivered, {} dropped at the queue)",
        frames as f64 / secs,
        frames as f64 * len as f64 * 8.0 / secs / 1e9,
        frames,
        sent,
        st.pipes[0].counters.dropped_queue
    );
}

fn delay_accuracy(load: f64, fifo: bool) {
    let bw = 100_000_000u64;
    let len = 1500usize;
    let sh = Shaping { bandwidth_bps: bw, delay_ns: 10_000_000, queue_packets: 1000, ..Shaping::default() };
    let mut node = Running::start(sh, fifo);
    let mut tx = UnixStream::connect(node.dir.join("vm0.sock")).unwrap();
    let mut rx = UnixStream::connect(node.dir.join("vm1.sock")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        while let Ok(n) = rx.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let gap = ((len * 8) as f64 * 1e9 / bw as f64 / load) as u64;
    let mut w = Vec::new();
    w.extend_from_slice(&(len as u32).to_be_bytes());
    w.extend_from_slice(&frame(len));
    let start = mono_ns();
    let n = 3 * 1_000_000_000 / gap;
    for i in 0..n {
        let at = start + i * gap;
        let now = mono_ns();
        // Sleep (no spin: the sender must not steal the node's core); pacing error only shifts arrivals.
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        tx.write_all(&w).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let st = node.stats();
    let e = st.release_error.unwrap();
    println!(
        "delay  10 ms, {:>3.0}% load of 100 Mbit/s, 1500 B, node {}: release error (actual - scheduled) p50 {:>6} ns p99 {:>6} ns max {:>8} ns over {} frames ({} dropped)",
        load * 100.0,
        if fifo { "SCHED_FIFO" } else { "SCHED_OTHER" },
        e.p50_ns,
        e.p99_ns,
        e.max_ns,
        e.count,
        st.pipes[0].counters.dropped_queue
    );
    drop(node);
    reader.join().unwrap();
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is ignored.
    core_throughput(64);
    core_throughput(1500);
    socket_throughput(64);
    socket_throughput(1500);
    for fifo in [false, true] {
        delay_accuracy(0.5, fifo);
        delay_accuracy(0.95, fifo);
    }
}
