//! `stasis`: bring experiments up, checkpoint them, restore them.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use stasis_agent::event::{Event, EventLog, Observer};
use stasis_agent::freeze::FreezeConfig;
use stasis_agent::host::{self, Runtime, Tools};
use stasis_agent::layout::Layout;
use stasis_core::spec::Experiment;
use stasis_store::Store;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod multihost;

#[derive(Parser)]
#[command(name = "stasis", version, about = "Transparent, synchronised checkpoints of whole experiments")]
struct Cli {
    /// Where experiments and their checkpoints live [default: $STASIS_STATE_DIR or the user data dir]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Which experiment (needed only when the state dir holds several)
    #[arg(short, long, global = true)]
    experiment: Option<String>,
    /// Machine-readable output: one JSON document per result, no progress
    #[arg(long, global = true)]
    json: bool,
    /// Multi-host experiments: the key shared with the agents [default: $STASIS_KEY_FILE]
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the experiment described by SPEC (TOML, or an NS script: `.ns`/`.tcl`)
    Up {
        spec: PathBuf,
        /// Return once QEMU runs instead of waiting for every guest to boot
        #[arg(long)]
        no_wait: bool,
        /// Also run CMD in the guest NODE at boot, after the spec's own
        /// commands (repeatable)
        #[arg(long = "run", value_name = "NODE=CMD")]
        run: Vec<String>,
    },
    /// Show what runs
    Status,
    /// Freeze every VM and the network at one instant, save, resume
    Checkpoint {
        #[arg(long)]
        name: Option<String>,
        /// Lead time of the freeze instant, ms
        #[arg(long, default_value_t = 300)]
        margin_ms: u64,
        /// How long before the stop the delay node holds frames for a VM, ms
        #[arg(long, default_value_t = 20)]
        hold_lead_ms: u64,
        /// Keep the experiment frozen at least this long, ms
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Break transparency on purpose, to test the instruments:
        /// late-resume=NODE:DURATION or sigstop=NODE:DURATION (docs/guest-kmod.md)
        #[arg(long = "fault", hide = true)]
        faults: Vec<stasis_agent::freeze::Fault>,
        /// Live checkpoint: the same consistency instant, but QEMU writes
        /// guest RAM in the background while the guests run (stream NICs only)
        #[arg(long, conflicts_with = "pause_ms")]
        live: bool,
    },
    /// Checkpoint the experiment, then stop every process and remove its
    /// sockets (checkpoints and disks stay); `stasis swap-in` brings it back
    SwapOut {
        #[arg(long)]
        name: Option<String>,
        /// Lead time of the freeze instant, ms
        #[arg(long, default_value_t = 300)]
        margin_ms: u64,
        /// How long before the stop the delay node holds frames for a VM, ms
        #[arg(long, default_value_t = 20)]
        hold_lead_ms: u64,
    },
    /// Bring a swapped-out experiment back (its swap-out checkpoint, or CHECKPOINT)
    SwapIn { checkpoint: Option<String> },
    /// Resume an experiment that a killed checkpoint left frozen: every
    /// stopped VM, the delay node and held ports start again at one instant
    Resume,
    /// List the checkpoints
    List,
    /// Show one checkpoint's manifest and fidelity report
    Show { checkpoint: String },
    /// Replace what runs by a checkpoint (name, id, index, `latest`, a
    /// checkpoint directory, or a branch name: that branch's latest checkpoint)
    Restore {
        checkpoint: String,
        /// Continue on this branch (created from CHECKPOINT if new); later
        /// checkpoints belong to it
        #[arg(long)]
        branch: Option<String>,
    },
    /// Start a new line of history NAME from CHECKPOINT (no disk is copied);
    /// `stasis restore NAME` runs it
    Branch { checkpoint: String, name: String },
    /// The history tree: every checkpoint with its branch, parent, time and sizes
    Log,
    /// What changed from checkpoint A to B: sizes, shared and new chunks per component, disks
    Diff { a: String, b: String },
    /// Stop every process of the experiment (checkpoints stay)
    Down,
    /// Check the checkpoint store: every manifest, file and chunk (exit 1 if anything is wrong)
    Fsck,
    /// Remove chunks that no checkpoint references, and qcow2 disk images
    /// that no checkpoint, branch or running VM needs
    Gc,
}

struct Ui {
    bar: Option<indicatif::ProgressBar>,
}

impl Ui {
    fn new(json: bool) -> Ui {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Ui { bar }
    }
    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Ui {
    fn event(&self, e: &Event) {
        if let Some(b) = &self.bar {
            let msg = match e {
                Event::VmLaunched { node, .. } => format!("VM {node} launched"),
                Event::DelayNodeStarted { .. } => "delay node started".into(),
                Event::Planned { .. } => "freeze planned".into(),
                Event::Stopped { component, .. } => format!("{component} stopped"),
                Event::Saving { component } => format!("saving {component}"),
                Event::Saved { component, bytes, .. } => format!("{component} saved ({})", mib(*bytes)),
                Event::Committed { checkpoint, .. } => format!("checkpoint {checkpoint} committed, resuming"),
                Event::Resumed { component, .. } => format!("{component} resumed"),
                Event::Aborted { reason, .. } => format!("aborted: {reason}"),
                Event::Restoring { checkpoint } => format!("restoring {checkpoint}"),
                Event::Restored { .. } => "restored".into(),
                Event::Ready { node } => format!("{node} booted"),
            };
            b.set_message(msg);
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

fn state_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.state_dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("STASIS_STATE_DIR") {
        return Ok(PathBuf::from(d));
    }
    dirs::data_dir().map(|d| d.join("stasis")).ok_or_else(|| anyhow!("no user data dir; pass --state-dir"))
}

/// The experiment a command is about: named, or the only one there is.
fn experiment_name(cli: &Cli, state: &Path) -> Result<String> {
    if let Some(e) = &cli.experiment {
        return Ok(e.clone());
    }
    let mut names = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state) {
        for e in rd.flatten() {
            if e.path().join("experiment.toml").exists() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => bail!("no experiment in {} (start one with `stasis up SPEC`)", state.display()),
        _ => bail!("several experiments in {}: {}; choose one with -e", state.display(), names.join(", ")),
    }
}

fn tools() -> Result<Tools> {
    let exe = std::env::current_exe().context("locating the stasis binary")?;
    let bin_dir = exe.parent().ok_or_else(|| anyhow!("binary has no directory"))?.to_path_buf();
    let delay_node_bin = std::env::var_os("STASIS_DELAY_NODE").map(PathBuf::from).unwrap_or_else(|| bin_dir.join("delay-node"));
    let image = std::env::var_os("STASIS_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| bin_dir.join("..").join("guest"));
    let choice = stasis_qemu::accel::detect();
    if matches!(choice.accel, stasis_qemu::accel::Accel::Tcg) {
        tracing::warn!(reason = %choice.reason, "KVM not usable: running guests under TCG (software emulation, slower)");
    }
    Ok(Tools { delay_node_bin, default_kernel: image.join("vmlinuz"), default_initrd: image.join("initrd.img"), accel: choice.accel })
}

/// Appends each `NODE=CMD` of `stasis up --run` to that node's run list.
fn add_runs(exp: &mut Experiment, runs: &[String]) -> Result<()> {
    for r in runs {
        let Some((node, cmd)) = r.split_once('=') else {
            bail!("--run {r:?}: expected NODE=CMD");
        };
        if cmd.trim().is_empty() {
            bail!("--run {r:?}: empty command for node {node:?}");
        }
        let names: Vec<String> = exp.nodes.iter().map(|n| n.name.clone()).collect();
        // NS scripts name nodes by variable (`nodeA` becomes `nodea`): accept either.
        let ns_name = node.to_ascii_lowercase().replace('_', "-");
        let Some(n) = exp.nodes.iter_mut().find(|n| n.name == node || n.name == ns_name) else {
            bail!("--run {r:?}: no node {node:?} in experiment {:?} (nodes: {})", exp.name, names.join(", "));
        };
        n.run.push(cmd.to_string());
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

async fn run(cli: Cli) -> Result<()> {
    let state = state_dir(&cli)?;
    if multihost::dispatch(&cli, &state).await? {
        return Ok(());
    }
    let ui = Ui::new(cli.json);
    match &cli.cmd {
        Cmd::Up { spec, no_wait, run } => {
            let mut exp = Experiment::from_file(spec)?;
            add_runs(&mut exp, run)?;
            let layout = Layout::new(&state, &exp.name);
            let tools = tools()?;
            std::fs::create_dir_all(layout.root()).with_context(|| format!("creating {}", layout.root().display()))?;
            let log = EventLog::open(&layout.events_file(), &ui);
            // Images `up` creates are named by no record until it returns.
            let images = Store::open(&layout.checkpoints())?.gc_lock(false)?;
            let rt = host::up(&exp, &layout, &tools, &log).await;
            drop(images);
            let rt = rt?;
            stasis_agent::swap::clear(&layout);
            std::fs::write(layout.root().join("experiment.toml"), exp.to_toml()).context("recording the spec")?;
            if !no_wait {
                if let Err(e) = host::wait_ready(&rt, Duration::from_secs(180), &log).await {
                    ui.done();
                    bail!("{e}");
                }
            }
            ui.done();
            if cli.json {
                print_json(&rt);
            } else {
                println!("experiment {} up: {} VMs ({}), state in {}", exp.name, rt.vms.len(), rt.accel, layout.root().display());
                for v in &rt.vms {
                    println!("  {:<10} pid {:<8} console {}", v.name, v.pid, v.serial_log.display());
                }
            }
        }
        Cmd::Status => {
            let name = experiment_name(&cli, &state)?;
            let layout = Layout::new(&state, &name);
            match Runtime::load(&layout) {
                Ok(rt) => {
                    let alive = rt.alive();
                    // Parts a killed checkpoint left frozen (only asked when every process lives).
                    // (Not while a checkpoint runs: it holds each VM's QMP connection.)
                    let in_progress = Store::open(&layout.checkpoints()).ok().and_then(|s| s.checkpoints_in_progress().ok()).unwrap_or_default();
                    let frozen = if in_progress.is_empty() && alive.iter().all(|(_, _, a)| *a) {
                        stasis_agent::recover::frozen_parts(&rt).await.ok()
                    } else {
                        None
                    };
                    if cli.json {
                        print_json(&serde_json::json!({"experiment": name, "running": true, "incarnation": rt.incarnation,
                            "restored_from": rt.restored_from, "frozen": frozen, "checkpoint_in_progress": in_progress,
                            "processes": alive.iter().map(|(n, p, a)| serde_json::json!({"name": n, "pid": p, "alive": a})).collect::<Vec<_>>()}));
                    } else {
                        println!("experiment {name}: incarnation {}{}", rt.incarnation, rt.restored_from.as_ref().map(|c| format!(", restored from {c}")).unwrap_or_default());
                        for (n, p, a) in &alive {
                            println!("  {:<12} pid {:<8} {}", n, p, if *a { "running" } else { "DEAD" });
                        }
                        if !in_progress.is_empty() {
                            println!("a checkpoint is in progress (pid {in_progress:?})");
                        } else if let Some(f) = frozen.as_ref().filter(|f| !f.is_empty()) {
                            println!("FROZEN by a checkpoint that did not finish: {}; `stasis resume` starts it again", f.describe());
                        }
                    }
                }
                Err(stasis_agent::host::AttachError::NotRunning(_)) => {
                    let swapped = stasis_agent::swap::swapped_out(&layout);
                    if cli.json {
                        print_json(&serde_json::json!({"experiment": name, "running": false, "swapped_out": swapped}));
                    } else if let Some(s) = swapped {
                        let label = s.name.as_deref().map(|n| format!("{} {n:?}", s.checkpoint)).unwrap_or(s.checkpoint.clone());
                        println!("experiment {name}: swapped out (checkpoint {label}, branch {}); `stasis swap-in` brings it back", s.branch);
                    } else {
                        println!("experiment {name}: not running");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Checkpoint { name, margin_ms, hold_lead_ms, pause_ms, live: true, faults } => {
            if !faults.is_empty() {
                bail!("--fault applies to stop-and-copy checkpoints, not --live");
            }
            let o = open_for_checkpoint(&cli, &state, &ui, *margin_ms, *hold_lead_ms, *pause_ms)?;
            let s = stasis_agent::live::checkpoint_live(&o.rt, &o.store, name.as_deref(), &o.cfg, &o.log).await;
            ui.done();
            let s = s.map_err(|e| no_space_hint(e.into(), &o.store))?;
            if cli.json {
                print_json(&s);
            } else {
                let c = &s.summary;
                println!(
                    "live checkpoint {} {}: {} VMs, {} saved, stop skew {}, guest downtime max {} ({}), save {}, {} frames in flight",
                    c.info.index, c.info.name.as_deref().map(|n| format!("{n:?}")).unwrap_or_else(|| c.info.id.clone()),
                    c.vms, mib(c.bytes), ms(c.stop_skew_ns), ms(s.max_downtime_ns),
                    s.downtime.iter().map(|d| format!("{} {}", d.node, ms(d.downtime_ns))).collect::<Vec<_>>().join(", "),
                    ms(c.save_ns), c.frames_in_flight
                );
            }
        }
        Cmd::SwapOut { name, margin_ms, hold_lead_ms } => {
            let o = open_for_checkpoint(&cli, &state, &ui, *margin_ms, *hold_lead_ms, 0)?;
            let r = stasis_agent::swap::swap_out(&o.rt, &o.layout, &o.store, name.as_deref(), &o.cfg, &o.log).await;
            ui.done();
            let (s, rec) = r.map_err(|e| no_space_hint(e.into(), &o.store))?;
            let exp = &o.exp;
            if cli.json {
                print_json(&serde_json::json!({"checkpoint": s, "swapped_out": rec}));
            } else {
                println!(
                    "swapped out {exp}: checkpoint {} ({} saved), {} processes stopped; `stasis swap-in` brings it back",
                    s.info.id, mib(s.bytes), rec.stopped
                );
            }
        }
        Cmd::SwapIn { checkpoint } => {
            let exp = experiment_name(&cli, &state)?;
            let layout = Layout::new(&state, &exp);
            let rec = stasis_agent::swap::swapped_out(&layout);
            let which = match (checkpoint, &rec) {
                (Some(c), _) => c.clone(),
                (None, Some(r)) => r.checkpoint.clone(),
                (None, None) => bail!("experiment {exp} is not swapped out (no {}); name a checkpoint, or use `stasis restore`", layout.root().join(stasis_agent::swap::SWAP_FILE).display()),
            };
            if let Ok(rt) = Runtime::load(&layout) {
                if rt.alive().iter().any(|(_, _, a)| *a) {
                    bail!("experiment {exp} is running; swap it out first (or use `stasis restore`)");
                }
            }
            // A checkpoint restores only into the QEMU version (and machine type) that saved it.
            if let Some(r) = &rec {
                let here = stasis_agent::swap::qemu_version();
                let (a, b) = (stasis_agent::swap::qemu_major_minor(&r.qemu_version), stasis_agent::swap::qemu_major_minor(&here));
                if a.is_some() && b.is_some() && a != b {
                    bail!("checkpoint {} was saved by {:?}, but this host runs {:?}: a restore needs the same QEMU version and machine type", r.checkpoint, r.qemu_version, here);
                }
            }
            let (_, ckpt) = open_checkpoint(&cli, &state, &which)?;
            let store = Store::open(&layout.checkpoints())?;
            let recorded = std::fs::read_to_string(layout.root().join("experiment.toml"))
                .ok()
                .and_then(|t| Experiment::from_toml_str(&t, None).ok())
                .map(|e| e.digest());
            let tools = tools()?;
            let log = EventLog::open(&layout.events_file(), &ui);
            let images = store.gc_lock(false)?;
            let r = host::restore(&exp, recorded.as_deref(), &ckpt, &layout, &tools, 200_000_000, None, &log).await;
            drop(images);
            ui.done();
            let (rt, s) = r?;
            stasis_agent::swap::clear(&layout);
            if cli.json {
                print_json(&serde_json::json!({"summary": s, "runtime": rt}));
            } else {
                println!("swapped in {} ({} VMs) in {}, resume skew {}", s.checkpoint, s.vms, ms(s.restore_ns), ms(s.resume_skew_ns));
            }
        }
        Cmd::Resume => {
            let exp = experiment_name(&cli, &state)?;
            let layout = Layout::new(&state, &exp);
            let rt = Runtime::load(&layout)?;
            let store = Store::open(&layout.checkpoints())?;
            let r = stasis_agent::recover::resume_frozen(&rt, &store, 200_000_000, Duration::from_secs(120)).await;
            ui.done();
            let r = r?;
            if cli.json {
                print_json(&r);
            } else if r.frozen.is_empty() {
                println!("experiment {exp}: nothing is frozen");
            } else {
                println!("resumed {exp}: {} (at one instant, within {})", r.frozen.describe(), ms(r.max_error_ns));
            }
        }
        Cmd::Checkpoint { name, margin_ms, hold_lead_ms, pause_ms, live: false, faults } => {
            let o = open_for_checkpoint(&cli, &state, &ui, *margin_ms, *hold_lead_ms, *pause_ms)?;
            let s = host::checkpoint_with_faults(&o.rt, &o.store, name.as_deref(), &o.cfg, faults, &o.log).await;
            ui.done();
            let s = s.map_err(|e| no_space_hint(e.into(), &o.store))?;
            let verdict = o.store.open_checkpoint(&s.info.id).ok().map(|c| verdict_of(&c.manifest));
            if cli.json {
                let mut v = serde_json::to_value(&s)?;
                v["verdict"] = serde_json::to_value(&verdict)?;
                print_json(&v);
            } else {
                println!(
                    "checkpoint {} {}: {} VMs, {} saved, stop skew {}, frozen {} (max error {}), save {}, {} frames in flight ({} held)",
                    s.info.index, s.info.name.as_deref().map(|n| format!("{n:?}")).unwrap_or_else(|| s.info.id.clone()),
                    s.vms, mib(s.bytes), ms(s.stop_skew_ns), ms(s.frozen_duration_ns), ms(s.max_frozen_error_ns), ms(s.save_ns),
                    s.frames_in_flight, s.frames_held
                );
                if let Some(v) = &verdict {
                    print_verdict(v);
                }
            }
        }
        Cmd::List => {
            let exp = experiment_name(&cli, &state)?;
            let store = Store::open(&Layout::new(&state, &exp).checkpoints())?;
            let list = store.list()?;
            if cli.json {
                print_json(&list);
            } else if list.is_empty() {
                println!("no checkpoints of {exp}");
            } else {
                println!("{:>3}  {:<24} {:<16} {:>12}", "#", "id", "name", "size");
                for c in &list {
                    println!("{:>3}  {:<24} {:<16} {:>12}", c.index, c.id, c.name.as_deref().unwrap_or("-"), mib(c.bytes));
                }
            }
        }
        Cmd::Fsck => {
            let exp = experiment_name(&cli, &state)?;
            let store = Store::open(&Layout::new(&state, &exp).checkpoints())?;
            let report = store.fsck()?;
            if cli.json {
                print_json(&report);
            } else {
                println!(
                    "{} checkpoints ({} logical), {} chunks referenced, {} stored ({}), {} orphan ({})",
                    report.checkpoints,
                    mib(report.logical_bytes),
                    report.chunks_referenced,
                    report.chunks_stored,
                    mib(report.stored_bytes),
                    report.orphan_chunks,
                    mib(report.orphan_bytes)
                );
                for p in &report.problems {
                    println!("PROBLEM: {}", p.message);
                }
            }
            if !report.is_clean() {
                bail!("fsck: {} problem(s) in {}", report.problems.len(), store.root().display());
            }
        }
        Cmd::Gc => {
            let exp = experiment_name(&cli, &state)?;
            let store = Store::open(&Layout::new(&state, &exp).checkpoints())?;
            let report = store.gc()?;
            let disks = stasis_agent::diskgc::gc_disks(&Layout::new(&state, &exp), &store)?;
            if cli.json {
                let mut v = serde_json::to_value(&report)?;
                v["disks"] = serde_json::to_value(&disks)?;
                print_json(&v);
            } else {
                println!("removed {} disk images ({}), kept {}", disks.images_removed, mib(disks.bytes_removed), disks.images_kept);
                println!(
                    "removed {} chunks ({}), kept {} of {} checkpoints, removed {} unpublished",
                    report.chunks_removed,
                    mib(report.bytes_removed),
                    report.chunks_kept,
                    report.checkpoints,
                    report.unpublished_removed
                );
            }
        }
        Cmd::Show { checkpoint } => {
            let (_, ckpt) = open_checkpoint(&cli, &state, checkpoint)?;
            let report = std::fs::read_to_string(ckpt.dir.join("report.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if cli.json {
                print_json(&serde_json::json!({"manifest": ckpt.manifest, "report": report, "verdict": verdict_of(&ckpt.manifest)}));
            } else {
                print_show(&ckpt);
                if let Some(stops) = report.as_ref().and_then(|r| r["stops"].as_array()).filter(|s| !s.is_empty()) {
                    // QEMU freezes a guest's clocks between the stop's write and its STOP event.
                    let width = |s: &serde_json::Value| Some(s["stop_event_ns"].as_u64()?.saturating_sub(s["sent_ns"].as_u64()?));
                    let parts: Vec<String> = stops.iter().map(|s| format!("{} {}", s["component"].as_str().unwrap_or("?"), width(s).map(ms).unwrap_or_else(|| "?".into()))).collect();
                    println!("  stop bracket   {}   (each VM's clocks froze within this after its stop was written; taken as write + 0.3 ms)", parts.join(", "));
                }
                if let Some(f) = report.as_ref().and_then(|r| r["faults"].as_array()).filter(|f| !f.is_empty()) {
                    println!("  faults         injected on purpose: {}", serde_json::Value::from(f.clone()));
                }
                print_verdict(&verdict_of(&ckpt.manifest));
            }
        }
        Cmd::Restore { checkpoint, branch } => {
            // A branch name stands for the branch's latest checkpoint.
            let exp0 = experiment_name(&cli, &state)?;
            let branches = read_branches(&Layout::new(&state, &exp0));
            let (which, branch) = match branches.get(checkpoint.as_str()) {
                Some(b) if branch.is_none() && Store::open(&Layout::new(&state, &exp0).checkpoints())?.open_checkpoint(checkpoint).is_err() => {
                    (b.head.clone(), Some(checkpoint.clone()))
                }
                _ => (checkpoint.clone(), branch.clone()),
            };
            let (exp, ckpt) = open_checkpoint(&cli, &state, &which)?;
            let layout = Layout::new(&state, &exp);
            if let Some(name) = &branch {
                let mut all = read_branches(&layout);
                all.entry(name.clone()).or_insert_with(|| BranchRec { from: ckpt.info.id.clone(), head: ckpt.info.id.clone(), created_unix_ms: now_ms() });
                write_branches(&layout, &all)?;
            }
            let recorded = std::fs::read_to_string(layout.root().join("experiment.toml"))
                .ok()
                .and_then(|t| Experiment::from_toml_str(&t, None).ok())
                .map(|e| e.digest());
            let tools = tools()?;
            let log = EventLog::open(&layout.events_file(), &ui);
            let images = Store::open(&layout.checkpoints())?.gc_lock(false)?;
            let r = host::restore(&exp, recorded.as_deref(), &ckpt, &layout, &tools, 200_000_000, branch.as_deref(), &log).await;
            drop(images);
            ui.done();
            let (rt, s) = r?;
            stasis_agent::swap::clear(&layout);
            if cli.json {
                print_json(&serde_json::json!({"summary": s, "runtime": rt}));
            } else {
                println!("restored {} ({} VMs) in {}, resume skew {}", s.checkpoint, s.vms, ms(s.restore_ns), ms(s.resume_skew_ns));
            }
        }
        Cmd::Branch { checkpoint, name } => {
            let (exp, ckpt) = open_checkpoint(&cli, &state, checkpoint)?;
            let layout = Layout::new(&state, &exp);
            if name.is_empty() || name.contains(['/', ' ']) {
                bail!("bad branch name {name:?}");
            }
            let mut all = read_branches(&layout);
            if all.contains_key(name.as_str()) || name == host::MAIN_BRANCH {
                bail!("branch {name:?} exists already");
            }
            let rec = BranchRec { from: ckpt.info.id.clone(), head: ckpt.info.id.clone(), created_unix_ms: now_ms() };
            all.insert(name.clone(), rec.clone());
            write_branches(&layout, &all)?;
            if cli.json {
                print_json(&serde_json::json!({"branch": name, "from": rec.from}));
            } else {
                println!("branch {name} starts at {} (run it with `stasis restore {name}`)", rec.from);
            }
        }
        Cmd::Log => {
            let exp = experiment_name(&cli, &state)?;
            let layout = Layout::new(&state, &exp);
            let store = Store::open(&layout.checkpoints())?;
            let entries: Vec<LogEntry> = store.list()?.into_iter().map(log_entry).collect();
            if cli.json {
                print_json(&serde_json::json!({"checkpoints": entries, "branches": read_branches(&layout)}));
            } else {
                print_log(&entries, &read_branches(&layout));
            }
        }
        Cmd::Diff { a, b } => {
            let (_, ca) = open_checkpoint(&cli, &state, a)?;
            let (_, cb) = open_checkpoint(&cli, &state, b)?;
            let d = diff(&ca, &cb);
            if cli.json {
                print_json(&d);
            } else {
                print_diff(&d);
            }
        }
        Cmd::Down => {
            let exp = experiment_name(&cli, &state)?;
            let n = host::down(&Layout::new(&state, &exp)).await?;
            if cli.json {
                print_json(&serde_json::json!({"experiment": exp, "stopped": n}));
            } else {
                println!("experiment {exp} down ({n} processes stopped)");
            }
        }
    }
    Ok(())
}

/// The human form of `stasis show`: what was saved and how faithful the
/// checkpoint was.
fn print_show(ckpt: &stasis_store::Checkpoint) {
    let m = &ckpt.manifest;
    let f = &m.freeze;
    println!("checkpoint {} ({}) of experiment {}", m.index, ckpt.info.label(), m.experiment.name);
    if let Some(p) = &m.parent {
        println!("  restored-from  {p}");
    }
    println!("  size           {}", mib(ckpt.info.bytes));
    println!("  stop skew      {}   (spread of the stop instants of all components)", ms(f.stop_skew_ns));
    println!("  frozen D       {}", ms(f.frozen_duration_ns));
    if let Some(e) = m.timings.extra.get("max_frozen_error_ns") {
        println!("  D error        {}   (largest |frozen − D| of any component)", ms(*e));
    }
    println!("  in flight      {} frames in the delay node, {} held back from VMs before their stop", f.frames_in_flight, f.frames_held);
    if let Some(l) = m.timings.extra.get("max_hold_lateness_ns") {
        println!("  hold lateness  {}   (largest delay a held frame paid)", ms(*l));
    }
    println!("  save           {}", ms(m.timings.total_save_ns));
    if m.timings.extra.get(stasis_agent::live::LIVE_KEY) == Some(&1) {
        println!("  live           guest RAM written in the background while the guests ran");
        for (k, v) in &m.timings.extra {
            if let Some(node) = k.strip_prefix(stasis_agent::live::DOWNTIME_KEY) {
                println!("  downtime       {node}: {}   (QEMU STOP to RESUME)", ms(*v));
            }
        }
    }
    println!("  {:<12} {:<10} {:>11} {:>12} {:>12} {:>12}", "component", "kind", "size", "stop", "frozen", "error vs D");
    let first = m.components.iter().map(|c| c.stop_ns).min().unwrap_or(0);
    for c in &m.components {
        let kind = match c.kind {
            stasis_store::manifest::ComponentKind::Vm => "vm",
            stasis_store::manifest::ComponentKind::DelayNode => "delay-node",
        };
        println!(
            "  {:<12} {:<10} {:>11} {:>12} {:>12} {:>12}",
            c.name,
            kind,
            mib(c.bytes),
            format!("+{}", ms(c.stop_ns - first)),
            ms(c.frozen_ns),
            ms(c.frozen_ns.abs_diff(f.frozen_duration_ns))
        );
    }
}

/// The fidelity verdict of a checkpoint from its manifest: every
/// component's measured frozen duration against D.
fn verdict_of(m: &stasis_store::manifest::Manifest) -> stasis_agent::freeze::Verdict {
    let frozen: Vec<(&str, u64)> = m.components.iter().map(|c| (c.name.as_str(), c.frozen_ns)).collect();
    stasis_agent::freeze::verdict(m.freeze.frozen_duration_ns, &frozen, stasis_agent::freeze::FROZEN_ERROR_TOLERANCE_NS)
}

fn print_verdict(v: &stasis_agent::freeze::Verdict) {
    if v.clean {
        println!("  fidelity       clean: every component frozen within {} of D", ms(v.tolerance_ns));
    } else {
        println!("  fidelity       NOT CLEAN: the guests can tell");
        for f in &v.findings {
            println!("                 {f}");
        }
    }
}

/// A failed checkpoint on a full file system says so plainly: the store's
/// directory and how much room is left.
/// What every checkpoint command (stop-and-copy, `--live`, swap-out) opens
/// before it freezes: the running experiment, its store, the freeze
/// settings, the event log, and the store's gc lock (shared), held until the
/// command ends because the disk overlays a checkpoint switches to are named
/// by no record until it commits.
struct ForCheckpoint<'a> {
    exp: String,
    layout: Layout,
    rt: Runtime,
    store: Store,
    cfg: FreezeConfig,
    log: EventLog<'a>,
    _images: stasis_store::GcLock,
}

fn open_for_checkpoint<'a>(cli: &Cli, state: &Path, ui: &'a Ui, margin_ms: u64, hold_lead_ms: u64, pause_ms: u64) -> Result<ForCheckpoint<'a>> {
    defer_interrupts();
    let exp = experiment_name(cli, state)?;
    let layout = Layout::new(state, &exp);
    let rt = Runtime::load(&layout)?;
    let store = Store::open(&layout.checkpoints())?;
    let cfg = FreezeConfig { margin_ns: margin_ms * 1_000_000, hold_lead_ns: hold_lead_ms * 1_000_000, min_frozen_ns: pause_ms * 1_000_000, ..FreezeConfig::default() };
    let log = EventLog::open(&layout.events_file(), ui);
    let _images = store.gc_lock(false)?;
    Ok(ForCheckpoint { exp, layout, rt, store, cfg, log, _images })
}

/// While a checkpoint runs, the experiment is frozen and only this process
/// resumes it: an interrupt (Ctrl-C, SIGTERM, SIGHUP) must not end it half
/// way. From here on such a signal is only noted, and the command finishes
/// (a few seconds). After a SIGKILL, `stasis resume` is the way on.
fn defer_interrupts() {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
        if let Ok(mut sig) = signal(kind) {
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    // Not eprintln!: after a hangup stderr may be gone.
                    let _ = writeln!(std::io::stderr(), "stasis: interrupt noted; finishing the checkpoint first, so that the experiment is not left frozen");
                }
            });
        }
    }
}

fn no_space_hint(e: anyhow::Error, store: &Store) -> anyhow::Error {
    let text = format!("{e:#}");
    let enospc = text.contains("No space left on device") || text.contains("os error 28");
    let free = stasis_agent::swap::free_bytes(store.root());
    if enospc || free.is_some_and(|f| f < 16 << 20) {
        let free = free.map(mib).unwrap_or_else(|| "?".into());
        return e.context(format!("no space left for the checkpoint in {} ({free} free); the experiment keeps running", store.root().display()));
    }
    e
}

/// A checkpoint by name/id/index/latest in the current experiment, or by the
/// path of a checkpoint directory.
fn open_checkpoint(cli: &Cli, state: &Path, which: &str) -> Result<(String, stasis_store::Checkpoint)> {
    let as_path = Path::new(which);
    if which.contains('/') && as_path.is_dir() {
        let parent = as_path.parent().ok_or_else(|| anyhow!("{which}: not a checkpoint directory"))?;
        let id = as_path.file_name().ok_or_else(|| anyhow!("{which}: not a checkpoint directory"))?.to_string_lossy();
        let store = Store::open(parent)?;
        let ckpt = store.open_checkpoint(&id)?;
        let exp = experiment_name(cli, state)?;
        return Ok((exp, ckpt));
    }
    let exp = experiment_name(cli, state)?;
    let store = Store::open(&Layout::new(state, &exp).checkpoints())?;
    let ckpt = store.open_checkpoint(which)?;
    Ok((exp, ckpt))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A named line of history (`branches.json` in the experiment's state dir).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct BranchRec {
    /// The checkpoint it starts from.
    from: String,
    /// Its latest checkpoint (`from` until one is taken on it).
    head: String,
    created_unix_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn branches_file(layout: &Layout) -> PathBuf {
    layout.root().join("branches.json")
}

/// The recorded branches, heads brought up to date from the checkpoints'
/// lineage (a checkpoint taken on a branch moves its head).
fn read_branches(layout: &Layout) -> std::collections::BTreeMap<String, BranchRec> {
    let mut all: std::collections::BTreeMap<String, BranchRec> =
        std::fs::read(branches_file(layout)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    if let Ok(store) = Store::open(&layout.checkpoints()) {
        for info in store.list().unwrap_or_default() {
            let l = read_lineage(&info);
            if let Some(b) = all.get_mut(&l.branch) {
                b.head = info.id.clone();
            }
        }
    }
    all
}

fn write_branches(layout: &Layout, all: &std::collections::BTreeMap<String, BranchRec>) -> Result<()> {
    let path = branches_file(layout);
    std::fs::create_dir_all(layout.root())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(all)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read_lineage(info: &stasis_store::CheckpointInfo) -> host::Lineage {
    std::fs::read(info.dir.join(host::LINEAGE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| host::Lineage { branch: host::MAIN_BRANCH.into(), prev: info.parent.clone() })
}

/// One checkpoint in `stasis log`.
#[derive(Debug, serde::Serialize)]
struct LogEntry {
    id: String,
    index: u64,
    name: Option<String>,
    branch: String,
    parent: Option<String>,
    created_unix_ms: u64,
    /// Recorded state (memory, devices, delay node), before deduplication.
    bytes: u64,
    /// The checkpoint's frozen disk image per node, and its size on disk
    /// (only what was written since the previous checkpoint of its line).
    disks: std::collections::BTreeMap<String, (PathBuf, u64)>,
}

fn frozen_disks(dir: &Path) -> std::collections::BTreeMap<String, (PathBuf, u64)> {
    let map: std::collections::BTreeMap<String, PathBuf> =
        std::fs::read(dir.join(host::DISKS_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    map.into_iter()
        .map(|(node, path)| {
            use std::os::unix::fs::MetadataExt;
            let used = std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0);
            (node, (path, used))
        })
        .collect()
}

fn log_entry(info: stasis_store::CheckpointInfo) -> LogEntry {
    let l = read_lineage(&info);
    LogEntry {
        disks: frozen_disks(&info.dir),
        id: info.id,
        index: info.index,
        name: info.name,
        branch: l.branch,
        parent: l.prev,
        created_unix_ms: info.created_unix_ms,
        bytes: info.bytes,
    }
}

fn print_log(entries: &[LogEntry], branches: &std::collections::BTreeMap<String, BranchRec>) {
    let ids: std::collections::HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let children = |p: Option<&str>| -> Vec<&LogEntry> {
        entries.iter().filter(|e| match (e.parent.as_deref(), p) {
            (Some(x), Some(y)) => x == y,
            (x, None) => x.is_none_or(|x| !ids.contains(x)),
            _ => false,
        }).collect()
    };
    fn walk<'a>(e: &'a LogEntry, depth: usize, children: &dyn Fn(Option<&str>) -> Vec<&'a LogEntry>, branches: &std::collections::BTreeMap<String, BranchRec>) {
        let t = utc(e.created_unix_ms / 1000);
        let disk: u64 = e.disks.values().map(|d| d.1).sum();
        let heads: Vec<&str> = branches.iter().filter(|(_, b)| b.head == e.id).map(|(n, _)| n.as_str()).collect();
        println!(
            "{}* {} {:<10} [{}] {} state {} disk +{}{}",
            "  ".repeat(depth),
            e.id,
            e.name.as_deref().unwrap_or("-"),
            e.branch,
            t,
            mib(e.bytes),
            mib(disk),
            if heads.is_empty() { String::new() } else { format!("  <- head of {}", heads.join(", ")) }
        );
        for c in children(Some(&e.id)) {
            walk(c, depth + 1, children, branches);
        }
    }
    for root in children(None) {
        walk(root, 0, &children, branches);
    }
}

/// `stasis diff A B` for one component.
#[derive(Debug, serde::Serialize)]
struct ComponentDiff {
    name: String,
    bytes_a: u64,
    bytes_b: u64,
    chunks_a: usize,
    chunks_b: usize,
    /// Chunks of B also in A (by id), and their bytes.
    shared_chunks: usize,
    shared_bytes: u64,
    /// Fraction of B's bytes in chunks A does not have: how much of the VM's state changed.
    dirty_share: f64,
}

#[derive(Debug, serde::Serialize)]
struct DiffReport {
    a: String,
    b: String,
    components: Vec<ComponentDiff>,
    /// Frozen disk images of A and B per node (path, bytes on disk).
    disks_a: std::collections::BTreeMap<String, (PathBuf, u64)>,
    disks_b: std::collections::BTreeMap<String, (PathBuf, u64)>,
}

fn diff(a: &stasis_store::Checkpoint, b: &stasis_store::Checkpoint) -> DiffReport {
    let mut components = Vec::new();
    for cb in &b.manifest.components {
        let ca = a.manifest.component(&cb.name);
        let set_a: std::collections::HashSet<&str> =
            ca.and_then(|c| c.chunks.as_ref()).map(|v| v.iter().map(|c| c.id.as_str()).collect()).unwrap_or_default();
        let chunks_b = cb.chunks.as_deref().unwrap_or(&[]);
        let shared: Vec<_> = chunks_b.iter().filter(|c| set_a.contains(c.id.as_str())).collect();
        let shared_bytes: u64 = shared.iter().map(|c| c.len).sum();
        components.push(ComponentDiff {
            name: cb.name.clone(),
            bytes_a: ca.map(|c| c.bytes).unwrap_or(0),
            bytes_b: cb.bytes,
            chunks_a: ca.and_then(|c| c.chunks.as_ref()).map(Vec::len).unwrap_or(0),
            chunks_b: chunks_b.len(),
            shared_chunks: shared.len(),
            shared_bytes,
            dirty_share: if cb.bytes == 0 { 0.0 } else { 1.0 - shared_bytes as f64 / cb.bytes as f64 },
        });
    }
    DiffReport {
        a: a.info.id.clone(),
        b: b.info.id.clone(),
        components,
        disks_a: frozen_disks(&a.dir),
        disks_b: frozen_disks(&b.dir),
    }
}

fn print_diff(d: &DiffReport) {
    println!("{} -> {}", d.a, d.b);
    println!("  {:<12} {:>11} {:>11} {:>9} {:>9} {:>7}", "component", "size A", "size B", "chunks B", "shared", "dirty");
    for c in &d.components {
        println!(
            "  {:<12} {:>11} {:>11} {:>9} {:>9} {:>6.1}%",
            c.name,
            mib(c.bytes_a),
            mib(c.bytes_b),
            c.chunks_b,
            c.shared_chunks,
            100.0 * c.dirty_share
        );
    }
    for (node, (path, bytes)) in &d.disks_b {
        let a = d.disks_a.get(node).map(|(p, b)| format!("{} ({})", p.display(), mib(*b))).unwrap_or_else(|| "-".into());
        println!("  disk {node}: A {a}; B {} ({} written since its previous checkpoint)", path.display(), mib(*bytes));
    }
}

/// `YYYY-MM-DD HH:MM:SSZ` of a Unix time (proleptic Gregorian, UTC).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(super::utc(1_795_312_637), "2026-11-22 01:57:17Z");
    }

    #[test]
    fn run_options_append_to_the_named_node() {
        let text = "set ns [new Simulator]\nset nodeA [$ns node]\nset nodeB [$ns node]\n\
                    tb-set-node-startcmd $nodeB \"first\"\n";
        let mut exp = stasis_core::spec::Experiment::from_ns_script(text, None).unwrap();
        let runs = ["nodeB=second x=1".to_string(), "nodea=a-cmd".to_string()];
        super::add_runs(&mut exp, &runs).unwrap();
        assert_eq!(exp.node("nodeb").unwrap().run, ["first", "second x=1"]);
        assert_eq!(exp.node("nodea").unwrap().run, ["a-cmd"]);
        for (bad, needle) in [("nodez=x", "no node \"nodez\""), ("nodea", "NODE=CMD"), ("nodea= ", "empty command")] {
            let e = super::add_runs(&mut exp, &[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let e = super::add_runs(&mut exp, &["nodez=x".to_string()]).unwrap_err().to_string();
        assert!(e.contains("nodea, nodeb"), "names the nodes there are: {e}");
    }
}
