//! The flagship demo in small: the GEC8 NS script imported as is, a
//! distributed Mandelbrot job on its four VMs, one checkpoint, two VMs
//! killed with SIGKILL, the whole experiment restored — and the image is
//! bit-identical to the one computed on the host, produced by a run that
//! went on from the checkpoint rather than starting over.

use stasis_eval::demo::{connections, decode_image, host_reference, mandel_lines, png, progress};
use stasis_guest_tools::mandel::Params;
use stasis_system_tests::Experiment;
use std::time::{Duration, Instant};

/// ~15 s of work for four TCG guests on two idle cores (minutes under load,
/// under 5 s on a fast CI machine), in 48 small bands so that a checkpoint
/// taken after the first bands still finds most of the job ahead.
const PARAMS: Params = Params { width: 256, height: 192, max_iter: 60000, band_rows: 4 };

fn lines(exp: &Experiment, node: &str, incarnation: u32) -> Vec<serde_json::Value> {
    mandel_lines(&std::fs::read(exp.console(node, incarnation)).unwrap_or_default())
}

fn bands_done(exp: &Experiment, incarnation: u32) -> u64 {
    progress(&lines(exp, "nodea", incarnation)).last().map_or(0, |p| p.0)
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn mandelbrot_job_survives_two_killed_vms_bit_identically() {
    let exp = Experiment::new("gec8", "");
    let ns = exp.dir.path().join("gec8.ns");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gec8.ns");
    std::fs::copy(script, &ns).expect("copy examples/gec8.ns");
    let master = format!(
        "nodeA=stasis-mandel master --width {} --height {} --max-iter {} --band-rows {}",
        PARAMS.width, PARAMS.height, PARAMS.max_iter, PARAMS.band_rows
    );
    let mut args = vec!["up".to_string(), ns.to_string_lossy().into_owned(), "--run".into(), master];
    for n in ["nodeA", "nodeB", "nodeC", "nodeD"] {
        args.extend(["--run".into(), format!("{n}=stasis-mandel worker --master 10.0.1.1:7000")]);
    }
    let up = exp.json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(up["vms"].as_array().map(Vec::len), Some(4), "{up}");

    // A checkpoint as soon as every worker is connected and the job is
    // under way (under TCG one of four guests may boot seconds late: a
    // checkpoint taken before its worker connected would see it connect
    // after the restore, rightly, and the test could not tell that from a
    // reconnection).
    wait("every worker connected", Duration::from_secs(90), || {
        ["nodea", "nodeb", "nodec", "noded"].iter().all(|n| connections(&lines(&exp, n, 1)) >= 1)
    });
    wait("a first band", Duration::from_secs(60), || bands_done(&exp, 1) >= 1);
    let seen = bands_done(&exp, 1);
    exp.json(&["checkpoint", "--name", "mid"]);

    // Kill two workers' VMs at once. On a fast machine the job may already
    // have finished since the checkpoint; the restore below must then still
    // go on from the checkpoint's mid-job state, which is what is asserted.
    let at_kill = bands_done(&exp, 1);
    let total = u64::from(PARAMS.bands());
    if decode_image(&lines(&exp, "nodea", 1)).is_ok() {
        eprintln!("the job finished before the kill ({at_kill}/{total} bands): the restore is still from mid-job");
    }
    for (name, pid, _) in exp.pids().into_iter().filter(|p| p.0 == "nodeb" || p.0 == "nodec") {
        eprintln!("kill -9 {name} (pid {pid}) at {at_kill}/{total} bands");
        // SAFETY: kill(2) of a QEMU this test's experiment started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    wait("the killed VMs to show as dead", Duration::from_secs(10), || {
        exp.pids().iter().filter(|p| (p.0 == "nodeb" || p.0 == "nodec") && !p.2).count() == 2
    });

    // Restore the whole experiment and let the job finish.
    assert!(exp.run(&["down"]).status.success());
    let r = exp.json(&["restore", "mid"]);
    assert_eq!(r["summary"]["vms"], 4, "{r}");
    wait("the image from the restored master", Duration::from_secs(150), || {
        decode_image(&lines(&exp, "nodea", 2)).is_ok()
    });
    let restored = lines(&exp, "nodea", 2);
    let img = decode_image(&restored).expect("decodes");

    // Bit-identical to the image computed on the host, PNG bytes too.
    let reference = host_reference(&PARAMS);
    assert_eq!(img.crc32, reference.crc32);
    assert!(img.pixels == reference.pixels, "pixels differ from the host's");
    assert_eq!(png(&img).unwrap(), png(&reference).unwrap());

    // The restored master went on from the checkpoint: its first progress
    // line already counts the bands it had before the checkpoint, and no
    // worker had to reconnect (the TCP connections survived).
    let p = progress(&restored);
    let first = p.first().expect("progress after the restore").0;
    assert!(first > seen, "restored master starts at {first} bands, the checkpoint had at least {seen}: {p:?}");
    assert_eq!(p.last().unwrap().0, total);
    assert!(p.len() as u64 <= total - seen, "fewer progress lines than a run from scratch: {p:?}");
    for n in ["nodea", "nodeb", "nodec", "noded"] {
        let l = lines(&exp, n, 2);
        assert_eq!(connections(&l), 0, "{n} reconnected after the restore: {l:?}");
        assert!(
            l.iter().any(|v| v["role"] == "worker" && v["event"] == "done"),
            "worker on {n} finished in the restored timeline"
        );
    }
}
