//! Timings of the VM operations a checkpoint is made of, on a real TCG guest:
//! QMP `stop`/`cont` round trips, save (bytes, time) and restore time.
//! Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p stasis-qemu --bench vm_timings` (guest image as for the
//! tests: `$STASIS_GUEST_KERNEL`/`$STASIS_GUEST_INITRD` or `target/guest/`).
//! `STASIS_BENCH_BOOT_S` (default 10) is how long the guest boots before measuring,
//! `STASIS_BENCH_MEMORY_MIB` (default 256) its memory, `STASIS_BENCH_FILL_MIB`
//! (default 0) how much random data the guest writes to its tmpfs first (the
//! project image runs it from `stasis.run`), to measure a guest whose RAM is full.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stasis_qemu::accel::Accel;
use stasis_qemu::vm::{Vm, VmSpec};

const STOP_CONT_ROUNDS: usize = 200;
const SAVES: usize = 5;
const RESTORES: usize = 3;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn guest_image() -> (PathBuf, PathBuf) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let kernel = std::env::var_os("STASIS_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/guest/vmlinuz"));
    let initrd = std::env::var_os("STASIS_GUEST_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| kernel.with_file_name("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        eprintln!(
            "guest image missing ({} / {}): build it (guest/build.sh) or set STASIS_GUEST_KERNEL",
            kernel.display(),
            initrd.display()
        );
        std::process::exit(2);
    }
    (kernel, initrd)
}

fn append(fill_mib: u64) -> String {
    if fill_mib == 0 {
        return "console=ttyS0 panic=-1".into();
    }
    let script = format!("dd if=/dev/urandom of=/tmp/fill bs=1M count={fill_mib} 2>/dev/null && echo FILLED");
    format!("console=ttyS0 panic=-1 stasis.run={}", base64(script.as_bytes()))
}

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// (median, p95, max) in microseconds.
fn summary(mut ns: Vec<u64>) -> (f64, f64, f64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.5), at(0.95), at(1.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Guard(Option<(u32, PathBuf)>);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((pid, qmp)) = &self.0 {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&*qmp.to_string_lossy()) {
                // SAFETY: signals one process we checked is the QEMU we started.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned()
}

#[tokio::main]
async fn main() {
    let (kernel, initrd) = guest_image();
    let dir = tempfile::Builder::new().prefix("sqb").tempdir_in("/tmp").unwrap();
    let memory_mib = env_u64("STASIS_BENCH_MEMORY_MIB", 256) as u32;
    let spec = VmSpec {
        name: "bench".into(),
        memory_mib,
        vcpus: 1,
        kernel,
        initrd,
        append: append(env_u64("STASIS_BENCH_FILL_MIB", 0)),
        nics: vec![],
        accel: Accel::Tcg,
        disk: None,
        machine: None,
        firmware: false,
        seed: None,
        run_dir: dir.path().join("run"),
    };
    let serial = dir.path().join("serial.log");
    let mut guard = Guard(None);

    let t = Instant::now();
    let mut vm = Vm::launch(&spec, &serial, None).await.expect("launch");
    let launch = t.elapsed();
    guard.0 = Some((vm.pid, vm.qmp_path.clone()));
    let boot = Duration::from_secs(env_u64("STASIS_BENCH_BOOT_S", 10));
    println!("launch (to QMP ready): {:.1} ms; letting the guest boot for {boot:?}", ms(launch));
    tokio::time::sleep(boot).await;
    println!("serial before measuring: {:?}", last_line(&serial));

    let (mut stops, mut conts) = (Vec::new(), Vec::new());
    for _ in 0..STOP_CONT_ROUNDS {
        stops.push(vm.stop().await.unwrap().round_trip_ns());
        tokio::time::sleep(Duration::from_millis(5)).await;
        conts.push(vm.cont().await.unwrap().round_trip_ns());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s50, s95, smax) = summary(stops);
    let (c50, c95, cmax) = summary(conts);
    println!("QMP stop round trip ({STOP_CONT_ROUNDS}x): median {s50:.0} us, p95 {s95:.0} us, max {smax:.0} us");
    println!("QMP cont round trip ({STOP_CONT_ROUNDS}x): median {c50:.0} us, p95 {c95:.0} us, max {cmax:.0} us");

    let state = dir.path().join("bench.state");
    for i in 0..SAVES {
        vm.stop().await.unwrap();
        let r = vm.save(&state).await.expect("save");
        println!(
            "save {i}: {:.1} MiB in {:.0} ms (migrate {:.0} ms, fsync {:.0} ms) = {:.0} MiB/s",
            r.bytes as f64 / (1 << 20) as f64,
            ms(r.total),
            ms(r.migrate),
            ms(r.sync),
            r.bytes as f64 / (1 << 20) as f64 / r.total.as_secs_f64()
        );
        vm.cont().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 0..SAVES {
        let r = vm.save_live(&dir.path().join("live.state")).await.expect("live save");
        println!(
            "live save {i}: {:.1} MiB in {:.0} ms (migrate {:.0} ms, fsync {:.0} ms), guest paused {:?} by QEMU's account",
            r.bytes as f64 / (1 << 20) as f64,
            ms(r.total),
            ms(r.migrate),
            ms(r.sync),
            r.downtime
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    vm.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("serial when killed: {:?}", last_line(&serial));

    for i in 0..RESTORES {
        let t = Instant::now();
        let mut r = Vm::launch(&spec, &serial, Some(&state)).await.expect("launch incoming");
        guard.0 = Some((r.pid, r.qmp_path.clone()));
        let launched = t.elapsed();
        r.wait_incoming(Duration::from_secs(120)).await.expect("incoming");
        let loaded = t.elapsed();
        let c = r.cont().await.unwrap();
        println!(
            "restore {i}: launch {:.0} ms, state loaded at {:.0} ms, cont round trip {:.0} us",
            ms(launched),
            ms(loaded),
            c.round_trip_ns() as f64 / 1000.0
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("  serial 2 s after cont: {:?}", last_line(&serial));
        r.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
