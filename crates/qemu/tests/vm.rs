//! Real QEMU: launch, stop/cont, save, restore, failures, daemonization.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{nic_listener, spec, tempdir, KillOnDrop};
use stasis_qemu::vm::{LaunchError, RunState, Vm, VmError};

#[tokio::test]
async fn save_kill_restore_cont() {
    let dir = tempdir();
    let (l0, nic) = nic_listener(dir.path(), "n0", "52:54:00:12:34:01");
    let s = spec("ck", &dir.path().join("run"), vec![nic]);
    let serial = dir.path().join("serial.log");
    let mut vm = Vm::launch(&s, &serial, None).await.expect("launch");
    let guard = KillOnDrop::new(&vm);
    assert!(vm.is_alive());
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    let states = vm.nic_states().await.unwrap();
    let n0 = states.iter().find(|(id, _)| id == "n0").expect("netdev n0 listed");
    assert!(n0.1.contains("n0.sock"), "{states:?}");

    // Refused while running, and nothing left behind.
    let state_file = dir.path().join("vm.state");
    match vm.save(&state_file).await {
        Err(VmError::NotStopped(RunState::Running)) => {}
        other => panic!("save of a running VM: {other:?}"),
    }
    assert!(!state_file.exists());
    assert_eq!(vm.status().await.unwrap(), RunState::Running);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = vm.stop().await.unwrap();
    assert!(stop.replied >= stop.sent);
    assert_eq!(vm.status().await.unwrap(), RunState::Paused);
    let report = vm.save(&state_file).await.expect("save");
    assert_eq!(report.bytes, std::fs::metadata(&state_file).unwrap().len());
    assert!(report.bytes > 1 << 20, "a 256 MiB guest's state is more than 1 MiB: {report:?}");
    assert!(!dir.path().join("vm.state.partial").exists());
    assert_eq!(vm.status().await.unwrap(), RunState::PostMigrate);
    // QEMU refuses a second migration straight away; so do we, with a typed error.
    match vm.save(&dir.path().join("again.state")).await {
        Err(VmError::NotStopped(RunState::PostMigrate)) => {}
        other => panic!("save from postmigrate: {other:?}"),
    }

    // A checkpoint resumes the source: cont works from postmigrate.
    vm.cont().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    vm.stop().await.unwrap();
    // And a save after that works again.
    let second = vm.save(&dir.path().join("vm2.state")).await.expect("second save");
    assert!(second.bytes > 1 << 20);

    vm.kill();
    for _ in 0..200 {
        if !vm.is_alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!vm.is_alive(), "SIGKILLed QEMU still alive");
    drop(guard);

    // Restore into a new process with the identical device set.
    let mut restored = Vm::launch(&s, &serial, Some(&state_file)).await.expect("launch incoming");
    let _guard = KillOnDrop::new(&restored);
    assert_ne!(restored.pid, vm.pid);
    match restored.cont().await {
        Err(VmError::IncomingPending) => {}
        other => panic!("cont before wait_incoming: {other:?}"),
    }
    restored.wait_incoming(Duration::from_secs(60)).await.expect("incoming");
    assert_eq!(restored.status().await.unwrap(), RunState::Paused);
    restored.cont().await.unwrap();
    assert_eq!(restored.status().await.unwrap(), RunState::Running);
    // No trace of the restore on the wire: QEMU's post-migration announcements
    // (RARP, ethertype 0x8035) are switched off.
    let frames = tokio::task::spawn_blocking(move || {
        let _original = l0.accept().unwrap(); // the killed VM's connection
        let (conn, _) = l0.accept().unwrap();
        read_frames(conn, Duration::from_millis(1500))
    })
    .await
    .unwrap();
    assert!(!frames.iter().any(|f| f.len() >= 14 && f[12..14] == [0x80, 0x35]), "RARP after restore: {frames:?}");
    assert!(restored.is_alive());
    assert_eq!(restored.status().await.unwrap(), RunState::Running);
    restored.quit().await.unwrap();
    assert!(!restored.is_alive());
}

/// `-netdev stream` frames (4-byte big-endian length + Ethernet frame) read
/// from `conn` for `window`.
fn read_frames(mut conn: std::os::unix::net::UnixStream, window: Duration) -> Vec<Vec<u8>> {
    use std::io::Read;
    let end = std::time::Instant::now() + window;
    conn.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while std::time::Instant::now() < end {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
    }
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if rest.len() < 4 + n {
            break;
        }
        frames.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    frames
}

#[tokio::test]
async fn restore_from_garbage_fails_with_qemu_message() {
    let dir = tempdir();
    let s = spec("bad", &dir.path().join("run"), vec![]);
    let garbage = dir.path().join("garbage.state");
    std::fs::write(&garbage, b"this is not a migration stream").unwrap();
    // QEMU may fail while launch still connects, or later while loading.
    let err = match Vm::launch(&s, &dir.path().join("serial.log"), Some(&garbage)).await {
        Ok(mut vm) => {
            let _guard = KillOnDrop::new(&vm);
            match vm.wait_incoming(Duration::from_secs(30)).await {
                Err(e @ VmError::Dead { .. }) => e.to_string(),
                other => panic!("restore from garbage: {other:?}"),
            }
        }
        Err(e @ LaunchError::DiedAfterStart { .. }) => e.to_string(),
        Err(other) => panic!("launch from garbage: {other:?}"),
    };
    assert!(err.contains("load of migration failed"), "{err}");
}

#[tokio::test]
async fn missing_kernel_reports_qemu_error() {
    let dir = tempdir();
    let mut s = spec("nokernel", &dir.path().join("run"), vec![]);
    s.kernel = dir.path().join("no-such-vmlinuz");
    match Vm::launch(&s, &dir.path().join("serial.log"), None).await {
        Err(LaunchError::Exited { log, .. }) => {
            assert!(log.contains("could not open kernel file") && log.contains("no-such-vmlinuz"), "{log}")
        }
        other => panic!("launch without kernel: {other:?}"),
    }
}

#[tokio::test]
async fn missing_nic_socket_refused_before_spawn() {
    let dir = tempdir();
    let nic = stasis_qemu::NicSpec {
        id: "n0".into(),
        mac: "52:54:00:00:00:09".into(),
        socket: dir.path().join("absent.sock"),
        backend: Default::default(),
    };
    let s = spec("nonic", &dir.path().join("run"), vec![nic]);
    match Vm::launch(&s, &dir.path().join("serial.log"), None).await {
        Err(e @ LaunchError::NicSocket { .. }) => assert!(e.to_string().contains("absent.sock")),
        other => panic!("launch without NIC socket: {other:?}"),
    }
    assert!(!s.pid_path().exists(), "QEMU must not have been started");
}

#[tokio::test]
async fn dead_nic_listener_detected() {
    let dir = tempdir();
    // The socket file exists but nobody listens: QEMU 7.2 fails to connect and never retries.
    let (listener, nic) = nic_listener(dir.path(), "n0", "52:54:00:00:00:0a");
    drop(listener);
    let s = spec("deadnic", &dir.path().join("run"), vec![nic]);
    match Vm::launch(&s, &dir.path().join("serial.log"), None).await {
        Err(LaunchError::NicNotConnected { state, .. }) => assert!(state.contains("error"), "{state}"),
        other => panic!("launch with dead NIC listener: {other:?}"),
    }
    // launch killed the QEMU it started.
    let pid: u32 = std::fs::read_to_string(s.pid_path()).unwrap().trim().parse().unwrap();
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("QEMU {pid} left running after a failed launch");
}

const LAUNCHER_ENV: &str = "STASIS_QEMU_TEST_LAUNCHER_DIR";

/// Not a test on its own: the body of the separate launching process of
/// `vm_outlives_launching_process`.
#[tokio::test]
#[ignore = "helper run as a child process"]
async fn launcher_child() {
    if std::env::var_os(LAUNCHER_ENV).is_none() {
        return;
    }
    // Relative paths (the parent set our working directory): launch must make
    // them absolute, since the daemon moves to `/`.
    let s = spec("daemon", Path::new("run"), vec![]);
    let vm = Vm::launch(&s, Path::new("serial.log"), None).await.expect("launch in child");
    println!("LAUNCHED-PID={}", vm.pid);
}

#[tokio::test]
async fn vm_outlives_launching_process() {
    let dir = tempdir();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "launcher_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(LAUNCHER_ENV, "1")
        .current_dir(dir.path())
        .output()
        .expect("run launcher child");
    // Guard first (from the pidfile), so QEMU is killed whatever fails below.
    let qmp_path = dir.path().join("run/qmp.sock");
    let pidfile = std::fs::read_to_string(dir.path().join("run/qemu.pid")).unwrap_or_default();
    let _guard = pidfile.trim().parse().ok().map(|pid| KillOnDrop { pid, qmp_path: qmp_path.clone() });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("LAUNCHED-PID=").map(|(_, pid)| pid.trim()))
        .unwrap_or_else(|| panic!("child printed no pid: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
        .parse()
        .unwrap();
    assert_eq!(pidfile.trim(), pid.to_string());
    assert!(out.status.success());
    // Another spelling of the same socket path still identifies the process.
    let mut vm = Vm::attach("daemon", &dir.path().join("run/../run/qmp.sock"), pid).await.expect("attach");
    assert!(vm.is_alive(), "QEMU died with its launcher");
    // A second launch into the same run directory must not take it over.
    let s = spec("daemon", &dir.path().join("run"), vec![]);
    match Vm::launch(&s, &dir.path().join("serial2.log"), None).await {
        Err(LaunchError::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("second launch in a live run dir: {other:?}"),
    }
    assert!(dir.path().join("serial.log").exists() && dir.path().join("run/qemu.log").exists());
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    vm.stop().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), RunState::Paused);
    vm.quit().await.unwrap();
    assert!(!vm.is_alive());
}

/// Guest script (the project image runs `stasis.run`; the fallback test image
/// prints the same kind of lines by itself): a counter on the console.
const TICKER: &str = "i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.5; done";

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Complete `tick N` lines of `text`, in order.
fn ticks(text: &str) -> Vec<u64> {
    text.split('\n')
        .rev()
        .skip(1) // the last piece is not a complete line
        .filter_map(|l| l.trim().strip_prefix("tick ")?.split_whitespace().next()?.parse().ok())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// The console log from byte `from` on.
fn console(serial: &Path, from: usize) -> String {
    let bytes = std::fs::read(serial).unwrap_or_default();
    String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).into_owned()
}

/// Console output from byte `from` on, once it shows a tick >= `at_least`.
async fn wait_for_tick(serial: &Path, from: usize, at_least: u64) -> String {
    for _ in 0..1200 {
        let text = console(serial, from);
        if ticks(&text).last().is_some_and(|&t| t >= at_least) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no tick >= {at_least} on the guest console within 120 s; console: {}", console(serial, 0));
}

#[tokio::test]
async fn restored_guest_continues_from_the_checkpoint() {
    let dir = tempdir();
    let mut s = spec("tl", &dir.path().join("run"), vec![]);
    s.append = format!("console=ttyS0 panic=-1 stasis.node=tl stasis.run={}", base64(TICKER.as_bytes()));
    let serial = dir.path().join("serial.log");
    let mut vm = Vm::launch(&s, &serial, None).await.expect("launch");
    let guard = KillOnDrop::new(&vm);
    wait_for_tick(&serial, 0, 2).await;

    vm.stop().await.unwrap();
    let saved_len = std::fs::metadata(&serial).unwrap().len() as usize;
    let at_save = console(&serial, 0);
    let last_before = *ticks(&at_save).last().unwrap();
    let state = dir.path().join("tl.state");
    vm.save(&state).await.expect("save");
    // The original timeline moves on past the checkpoint …
    vm.cont().await.unwrap();
    wait_for_tick(&serial, saved_len, last_before + 3).await;
    vm.kill();
    while vm.is_alive() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);

    // … and the restored one picks up exactly where the checkpoint was.
    let offset = std::fs::metadata(&serial).unwrap().len() as usize;
    let mut r = Vm::launch(&s, &serial, Some(&state)).await.expect("restore");
    let _guard = KillOnDrop::new(&r);
    r.wait_incoming(Duration::from_secs(60)).await.expect("incoming");
    r.cont().await.unwrap();
    let restored = wait_for_tick(&serial, offset, last_before + 2).await;
    // A line cut by the stop continues after the restore: join it back.
    let partial = &at_save[at_save.rfind('\n').map_or(0, |i| i + 1)..];
    let after = format!("{partial}{restored}");
    let first = ticks(&after)[0];
    assert_eq!(first, last_before + 1, "console after restore: {after:?}");
    r.quit().await.unwrap();
}

#[test]
fn base64_matches_reference() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[tokio::test]
async fn live_save_keeps_running_and_restores_its_start() {
    let dir = tempdir();
    let mut s = spec("live", &dir.path().join("run"), vec![]);
    s.append = format!("console=ttyS0 panic=-1 stasis.node=live stasis.run={}", base64(TICKER.as_bytes()));
    let serial = dir.path().join("serial.log");
    let mut vm = Vm::launch(&s, &serial, None).await.expect("launch");
    let guard = KillOnDrop::new(&vm);
    wait_for_tick(&serial, 0, 2).await;

    vm.stop().await.unwrap();
    match vm.save_live(&dir.path().join("no.state")).await {
        Err(VmError::NotRunning(RunState::Paused)) => {}
        other => panic!("live save of a paused VM: {other:?}"),
    }
    vm.cont().await.unwrap();

    let state = dir.path().join("live.state");
    let before = *ticks(&console(&serial, 0)).last().unwrap();
    let report = vm.save_live(&state).await.expect("live save");
    let after = *ticks(&console(&serial, 0)).last().unwrap();
    assert!(report.bytes > 1 << 20);
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    // Paused only briefly, by QEMU's own account.
    assert!(report.downtime.is_some_and(|d| d < Duration::from_secs(2)), "{report:?}");
    // A stopped save still works after a live one.
    vm.stop().await.unwrap();
    vm.save(&dir.path().join("normal.state")).await.expect("stopped save after a live one");
    vm.cont().await.unwrap();
    wait_for_tick(&serial, 0, after + 3).await;
    vm.kill();
    while vm.is_alive() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);

    let at_restore = std::fs::metadata(&serial).unwrap().len() as usize;
    let mut r = Vm::launch(&s, &serial, Some(&state)).await.expect("restore");
    let _guard = KillOnDrop::new(&r);
    r.wait_incoming(Duration::from_secs(60)).await.expect("incoming");
    r.cont().await.unwrap();
    let restored = wait_for_tick(&serial, at_restore, before + 1).await;
    let first = *ticks(&format!("\n{restored}")).first().unwrap();
    assert!(
        // (+2: a console line cut by the snapshot is not counted)
        (before + 1..=after + 2).contains(&first),
        "restored timeline starts at tick {first}, live save ran from tick {before} to {after}"
    );
    r.quit().await.unwrap();
}
