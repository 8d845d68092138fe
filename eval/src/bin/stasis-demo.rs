//! `stasis-demo`: the GEC8 demo (issue 7). Imports an Emulab NS script as
//! is, runs a distributed Mandelbrot job on its nodes once without failures
//! (the reference), then again with periodic checkpoints, SIGKILLs the QEMU
//! of two worker VMs mid-run, notices as an operator would (`stasis status`
//! shows them dead), restores the whole experiment from the latest
//! checkpoint and lets the job finish. Decodes the image from the restored
//! master's console, writes both PNGs, checks they are bit-identical (and
//! equal to the image computed on the host), and prints the timeline and
//! the time lost against restarting from scratch. See `docs/demo.md`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use stasis_core::clock::mono_ns;
use stasis_core::spec::Experiment;
use stasis_eval::demo::{connections, decode_image, host_reference, mandel_lines, png, progress, Image, TimeLost};
use stasis_guest_tools::mandel::Params;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "stasis-demo", about = "The GEC8 demo: a distributed job survives two dead VMs")]
struct Args {
    /// The experiment (an Emulab NS script, imported as is)
    #[arg(long, default_value = "examples/gec8.ns")]
    spec: PathBuf,
    #[arg(long, default_value_t = 640)]
    width: u32,
    #[arg(long, default_value_t = 480)]
    height: u32,
    /// Iteration limit per pixel (the job's length)
    #[arg(long, default_value_t = 20000)]
    max_iter: u32,
    #[arg(long, default_value_t = 8)]
    band_rows: u32,
    /// Seconds between checkpoints [default: an eighth of the reference
    /// run, 3–30 s, so that the kill falls between checkpoints on a fast
    /// or a slow host alike; 15 s with --no-reference-run]
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop checkpointing after this many
    #[arg(long, default_value_t = 100)]
    max_checkpoints: usize,
    /// Nodes whose QEMU is killed [default: the second and third node]
    #[arg(long, value_delimiter = ',')]
    kill: Vec<String>,
    /// Kill once this fraction of the bands is done (and a checkpoint exists)
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// Skip the failure-free VM run: compare with the image computed on the
    /// host only (no time-lost figure)
    #[arg(long)]
    no_reference_run: bool,
    /// Where the PNGs and demo.json go
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// The stasis binary [default: next to this one]
    #[arg(long)]
    stasis: Option<PathBuf>,
    /// Give up on a run after this many seconds
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// One experiment in a private state directory; `Drop` brings it down and
/// kills anything that still names the directory.
struct Session {
    dir: tempfile::TempDir,
    bin: PathBuf,
    name: String,
    t0: u64,
    timeline: Vec<(f64, String)>,
    label: &'static str,
}

impl Session {
    fn new(bin: &Path, name: &str, label: &'static str) -> Result<Session> {
        let dir = tempfile::Builder::new().prefix("stasis-demo").tempdir_in("/tmp")?;
        Ok(Session { dir, bin: bin.to_path_buf(), name: name.to_string(), t0: mono_ns(), timeline: Vec::new(), label })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn elapsed(&self) -> f64 {
        (mono_ns() - self.t0) as f64 / 1e9
    }

    /// Records (and prints) one timeline entry.
    fn mark(&mut self, what: impl Into<String>) {
        let (t, what) = (self.elapsed(), what.into());
        println!("  [{}] t={t:7.1} s  {what}", self.label);
        self.timeline.push((t, what));
    }

    fn stasis(&self, args: &[&str]) -> Result<Value> {
        tracing::debug!("$ stasis {}", args.join(" "));
        let out = Command::new(&self.bin)
            .arg("--state-dir")
            .arg(self.state())
            .args(["-e", &self.name])
            .args(args)
            .arg("--json")
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("stasis {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("stasis {}: output is not JSON", args.join(" ")))
    }

    fn console(&self, node: &str, incarnation: u64) -> Vec<Value> {
        let path = self.state().join(&self.name).join("run/vm").join(node).join(format!("serial-{incarnation}.log"));
        mandel_lines(&std::fs::read(path).unwrap_or_default())
    }

    /// `(name, pid, alive)` of every process, from `stasis status`.
    fn processes(&self) -> Result<Vec<(String, u32, bool)>> {
        let v = self.stasis(&["status"])?;
        Ok(v["processes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or("").to_string(),
                            p["pid"].as_u64().unwrap_or(0) as u32,
                            p["alive"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin).arg("--state-dir").arg(self.state()).args(["-e", &self.name, "down"]).output();
        let needle = self.dir.path().to_string_lossy().into_owned();
        let Ok(rd) = std::fs::read_dir("/proc") else { return };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(&needle) {
                    // SAFETY: kill(2) of a process whose command line names our private temp dir.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// The job as `stasis up --run` options: master (and a worker) on the first
/// node, a worker on every node.
fn run_options(exp: &Experiment, p: &Params) -> Result<Vec<String>> {
    let master = exp.nodes.first().context("the experiment has no nodes")?;
    let ip = &master.ifaces.first().context("the first node has no network interface")?.ip;
    let mut runs = vec![format!(
        "{}=stasis-mandel master --width {} --height {} --max-iter {} --band-rows {}",
        master.name, p.width, p.height, p.max_iter, p.band_rows
    )];
    for n in &exp.nodes {
        runs.push(format!("{}=stasis-mandel worker --master {ip}:7000", n.name));
    }
    Ok(runs)
}

fn up(s: &mut Session, spec: &Path, runs: &[String]) -> Result<()> {
    let spec = spec.to_string_lossy().into_owned();
    let mut args = vec!["up", spec.as_str()];
    for r in runs {
        args.extend(["--run", r.as_str()]);
    }
    s.mark(format!("stasis up {spec} (booting)"));
    let v = s.stasis(&args)?;
    let vms = v["vms"].as_array().map_or(0, Vec::len);
    s.mark(format!("{vms} VMs booted ({}); the job starts", v["accel"].as_str().unwrap_or("?")));
    Ok(())
}

/// Polls the master's console until the image is out; marks progress every 25 %.
fn wait_done(s: &mut Session, master: &str, incarnation: u64, timeout: u64) -> Result<Image> {
    let mut shown = 0;
    loop {
        let lines = s.console(master, incarnation);
        if let Ok(img) = decode_image(&lines) {
            s.mark(format!("image complete on {master} ({}×{}, crc32 {:08x})", img.width, img.height, img.crc32));
            return Ok(img);
        }
        if let Some(&(done, bands)) = progress(&lines).last() {
            let quarter = done * 4 / bands.max(1);
            if quarter > shown && done < bands {
                shown = quarter;
                s.mark(format!("progress {done}/{bands} bands"));
            }
        }
        if s.elapsed() > timeout as f64 {
            bail!("no image from {master} after {timeout} s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct FailureRun {
    image: Image,
    until_kill_s: f64,
    total_s: f64,
    checkpoints: usize,
    bands_at_kill: u64,
    first_restored_progress: u64,
    reconnections_after_restore: usize,
    bands: u64,
}

fn failure_run(
    s: &mut Session,
    a: &Args,
    every: u64,
    exp: &Experiment,
    runs: &[String],
    kill: &[String],
) -> Result<FailureRun> {
    let master = exp.nodes[0].name.clone();
    up(s, &a.spec, runs)?;
    let every = every as f64;
    let mut next_ckpt = s.elapsed() + every;
    let (mut ckpts, mut last_ckpt_end) = (0usize, 0.0);
    let bands_at_kill;
    let bands;
    loop {
        let lines = s.console(&master, 1);
        if decode_image(&lines).is_ok() {
            bail!("the job finished before the kill: make it longer (--max-iter) or kill earlier (--kill-at)");
        }
        let (done, total) = progress(&lines).last().copied().unwrap_or((0, 1));
        // Checkpoint only once every worker is connected: a worker whose
        // guest booted late would otherwise connect again after a restore
        // of that checkpoint (rightly), which looks like a reconnection.
        let all_connected = || exp.nodes.iter().all(|n| connections(&s.console(&n.name, 1)) >= 1);
        if ckpts < a.max_checkpoints && s.elapsed() >= next_ckpt && all_connected() {
            let v = s.stasis(&["checkpoint", "--name", &format!("ck{}", ckpts + 1)])?;
            ckpts += 1;
            last_ckpt_end = s.elapsed();
            next_ckpt = last_ckpt_end + every;
            s.mark(format!(
                "checkpoint {ckpts} committed ({} VMs, {:.0} MiB, stop skew {:.2} ms; master had {done}/{total} bands)",
                v["vms"],
                v["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                v["stop_skew_ns"].as_f64().unwrap_or(0.0) / 1e6
            ));
        }
        // Kill halfway between two checkpoints: real work is lost.
        if ckpts >= 1 && done as f64 >= a.kill_at * total as f64 && s.elapsed() >= last_ckpt_end + every / 2.0 {
            let procs = s.processes()?;
            let mut pids = Vec::new();
            for k in kill {
                let (_, pid, _) =
                    procs.iter().find(|p| p.0 == *k).with_context(|| format!("no process for node {k:?}"))?;
                // SAFETY: kill(2) of a QEMU this demo's experiment started (pid from `stasis status`).
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                pids.push(format!("{k} (pid {pid})"));
            }
            bands_at_kill = done;
            bands = total;
            s.mark(format!("kill -9 the QEMU of {} — master at {done}/{total} bands", pids.join(", ")));
            break;
        }
        if s.elapsed() > a.timeout as f64 {
            bail!("the job made no progress towards the kill point in {} s", a.timeout);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let until_kill_s = s.elapsed();
    // The operator's view: the job stalls and `stasis status` shows dead VMs.
    loop {
        let dead: Vec<String> = s.processes()?.into_iter().filter(|p| !p.2).map(|p| p.0).collect();
        if !dead.is_empty() {
            s.mark(format!("failure detected: stasis status shows {} DEAD", dead.join(", ")));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    s.stasis(&["down"])?;
    s.mark("stasis down (the survivors too)");
    let r = s.stasis(&["restore", "latest"])?;
    let inc = s.stasis(&["status"])?["incarnation"].as_u64().unwrap_or(2);
    s.mark(format!(
        "stasis restore latest: checkpoint {} back in {:.1} s, every VM and the delay node resume (incarnation {inc})",
        r["summary"]["checkpoint"].as_str().unwrap_or("?"),
        r["summary"]["restore_ns"].as_f64().unwrap_or(0.0) / 1e9
    ));
    let image = wait_done(s, &master, inc, a.timeout)?;
    let total_s = s.elapsed();
    let restored = s.console(&master, inc);
    let first_restored_progress = progress(&restored).first().map_or(0, |p| p.0);
    let reconnections_after_restore = exp.nodes.iter().map(|n| connections(&s.console(&n.name, inc))).sum();
    Ok(FailureRun {
        image,
        until_kill_s,
        total_s,
        checkpoints: ckpts,
        bands_at_kill,
        first_restored_progress,
        reconnections_after_restore,
        bands,
    })
}

fn same(a: &Image, b: &Image) -> bool {
    a.pixels == b.pixels && a.digest() == b.digest()
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let a = Args::parse();
    let bin = match &a.stasis {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
    };
    if !bin.exists() {
        bail!("{} is missing: cargo build --bins", bin.display());
    }
    let exp = Experiment::from_file(&a.spec).with_context(|| format!("importing {}", a.spec.display()))?;
    if exp.nodes.len() < 3 {
        bail!("{}: the demo needs at least 3 nodes (a master and two to kill)", a.spec.display());
    }
    let kill: Vec<String> =
        if a.kill.is_empty() { exp.nodes[1..3].iter().map(|n| n.name.clone()).collect() } else { a.kill.clone() };
    for k in &kill {
        if k == &exp.nodes[0].name || exp.node(k).is_none() {
            bail!("--kill {k}: not a worker node of {} (the master runs on {})", a.spec.display(), exp.nodes[0].name);
        }
    }
    let params = Params { width: a.width, height: a.height, max_iter: a.max_iter, band_rows: a.band_rows }
        .checked()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runs = run_options(&exp, &params)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    println!(
        "== stasis demo: {} ({} nodes: {}), Mandelbrot {}×{} max-iter {} in {} bands; master on {}",
        a.spec.display(),
        exp.nodes.len(),
        exp.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(" "),
        params.width,
        params.height,
        params.max_iter,
        params.bands(),
        exp.nodes[0].name
    );
    let host = host_reference(&params);

    // The reference run: its image, when it finished (s) and its log lines.
    type Reference = (Image, f64, Vec<(f64, String)>);
    let mut reference: Option<Reference> = None;
    if !a.no_reference_run {
        println!("== 1. reference: the job without failures");
        let mut s = Session::new(&bin, &exp.name, "reference")?;
        up(&mut s, &a.spec, &runs)?;
        let img = wait_done(&mut s, &exp.nodes[0].name, 1, a.timeout)?;
        let t = s.elapsed();
        s.stasis(&["down"])?;
        reference = Some((img, t, std::mem::take(&mut s.timeline)));
    }

    let every = a.checkpoint_every.unwrap_or_else(|| match &reference {
        Some((_, t, _)) => ((*t / 8.0).round() as u64).clamp(3, 30),
        None => 15,
    });
    println!("== 2. the same job with a checkpoint every {every} s; kill -9 {} mid-run; restore", kill.join(" "));
    let mut s = Session::new(&bin, &exp.name, "failure")?;
    let f = failure_run(&mut s, &a, every, &exp, &runs, &kill)?;
    s.stasis(&["down"])?;
    let timeline = std::mem::take(&mut s.timeline);
    drop(s);

    println!("== 3. the result");
    let restored_png = png(&f.image)?;
    std::fs::write(a.out.join("restored.png"), &restored_png)?;
    let host_png = png(&host)?;
    let mut ok = same(&f.image, &host) && restored_png == host_png;
    println!(
        "  restored run: blake3 {} crc32 {:08x} -> {}",
        f.image.digest(),
        f.image.crc32,
        a.out.join("restored.png").display()
    );
    println!(
        "  host-computed: blake3 {} crc32 {:08x} ({})",
        host.digest(),
        host.crc32,
        if same(&f.image, &host) { "identical" } else { "DIFFERENT" }
    );
    let mut lost = None;
    if let Some((img, t, _)) = &reference {
        let ref_png = png(img)?;
        std::fs::write(a.out.join("reference.png"), &ref_png)?;
        let identical = same(&f.image, img) && ref_png == restored_png;
        ok &= identical;
        println!(
            "  reference run: blake3 {} crc32 {:08x} -> {}: pixels and PNG bytes {}",
            img.digest(),
            img.crc32,
            a.out.join("reference.png").display(),
            if identical { "IDENTICAL" } else { "DIFFERENT" }
        );
        lost = Some(TimeLost::new(*t, f.total_s, f.until_kill_s));
    }
    let resumed = f.first_restored_progress > 0 && f.reconnections_after_restore == 0;
    println!(
        "  the restored master went on from {} bands (it had {}/{} at the kill), with {} worker reconnections: {}",
        f.first_restored_progress.saturating_sub(1),
        f.bands_at_kill,
        f.bands,
        f.reconnections_after_restore,
        if resumed { "resumed from the checkpoint" } else { "NOT resumed from the checkpoint" }
    );
    ok &= resumed;
    if let Some(l) = &lost {
        println!(
            "  time: reference {:.1} s; with the failure and stasis {:.1} s (lost {:.1} s); restarting from scratch at the kill would take {:.1} s (lost {:.1} s)",
            l.reference_s, l.with_stasis_s, l.lost_with_stasis_s, l.from_scratch_s, l.lost_from_scratch_s
        );
    }
    let report = json!({
        "spec": a.spec, "params": {"width": params.width, "height": params.height, "max_iter": params.max_iter, "band_rows": params.band_rows, "bands": params.bands()},
        "nodes": exp.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(), "killed": kill,
        "checkpoint_every_s": every, "checkpoints": f.checkpoints,
        "reference": reference.as_ref().map(|(i, t, tl)| json!({"blake3": i.digest(), "crc32": format!("{:08x}", i.crc32), "seconds": t, "timeline": tl})),
        "failure": {"blake3": f.image.digest(), "crc32": format!("{:08x}", f.image.crc32), "seconds": f.total_s, "until_kill_s": f.until_kill_s,
                    "bands_at_kill": f.bands_at_kill, "first_restored_progress": f.first_restored_progress,
                    "reconnections_after_restore": f.reconnections_after_restore, "timeline": timeline},
        "host_reference": {"blake3": host.digest(), "crc32": format!("{:08x}", host.crc32)},
        "time_lost": lost, "identical": ok,
    });
    std::fs::write(a.out.join("demo.json"), serde_json::to_string_pretty(&report)?)?;
    if !ok {
        bail!("the restored run's image is not the reference (see {})", a.out.join("demo.json").display());
    }
    println!("== demo passed: the job survived two dead VMs; the image is bit-identical");
    Ok(())
}
