//! What every command needs: the global options, the state directory, the
//! experiment a command is about, the tools, and the opening of a
//! checkpoint or of a running experiment for a checkpoint.

use crate::ui::{mib, Ui};
use anyhow::{anyhow, bail, Context, Result};
use stasis_agent::event::EventLog;
use stasis_agent::freeze::FreezeConfig;
use stasis_agent::host::{Runtime, Tools};
use stasis_agent::layout::Layout;
use stasis_store::Store;
use std::path::{Path, PathBuf};

/// The options every subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Where experiments and their checkpoints live [default: $STASIS_STATE_DIR or the user data dir]
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Which experiment (needed only when the state dir holds several)
    #[arg(short, long, global = true)]
    pub experiment: Option<String>,
    /// Machine-readable output: one JSON document per result, no progress
    #[arg(long, global = true)]
    pub json: bool,
    /// Multi-host experiments: the coordinator's master key (each agent holds
    /// its host's key, `stasis key host NAME`) [default: $STASIS_KEY_FILE]
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
}

/// A command's context: the global options and the resolved state directory.
pub struct Ctx {
    pub global: Global,
    pub state: PathBuf,
    pub ui: Ui,
}

impl Ctx {
    pub fn new(global: Global) -> Result<Ctx> {
        let state = state_dir(&global)?;
        // Checkpoints hold guest memory: refuse a state dir another user owns
        // or can write (an attacker's /tmp/stasis), make ours 0700.
        stasis_core::private::ensure_private_dir(&state).context("the state directory")?;
        let ui = Ui::new(global.json);
        Ok(Ctx { global, state, ui })
    }

    pub fn json(&self) -> bool {
        self.global.json
    }

    /// The experiment a command is about: named, or the only one there is.
    pub fn experiment_name(&self) -> Result<String> {
        if let Some(e) = &self.global.experiment {
            return Ok(e.clone());
        }
        let mut names = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.state) {
            for e in rd.flatten() {
                if e.path().join("experiment.toml").exists() {
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        match names.len() {
            1 => Ok(names.remove(0)),
            0 => bail!("no experiment in {} (start one with `stasis up SPEC`)", self.state.display()),
            _ => bail!("several experiments in {}: {}; choose one with -e", self.state.display(), names.join(", ")),
        }
    }

    pub fn layout(&self, exp: &str) -> Layout {
        Layout::new(&self.state, exp)
    }

    /// A checkpoint by name/id/index/latest in the current experiment, or by
    /// the path of a checkpoint directory.
    pub fn open_checkpoint(&self, which: &str) -> Result<(String, stasis_store::Checkpoint)> {
        let as_path = Path::new(which);
        if which.contains('/') && as_path.is_dir() {
            let parent = as_path.parent().ok_or_else(|| anyhow!("{which}: not a checkpoint directory"))?;
            let id =
                as_path.file_name().ok_or_else(|| anyhow!("{which}: not a checkpoint directory"))?.to_string_lossy();
            let store = Store::open(parent)?;
            let ckpt = store.open_checkpoint(&id)?;
            let exp = self.experiment_name()?;
            return Ok((exp, ckpt));
        }
        let exp = self.experiment_name()?;
        let store = Store::open(&self.layout(&exp).checkpoints())?;
        let ckpt = store.open_checkpoint(which)?;
        Ok((exp, ckpt))
    }

    /// The digest of the experiment's recorded spec, if it parses.
    pub fn recorded_digest(&self, layout: &Layout) -> Option<String> {
        std::fs::read_to_string(layout.root().join("experiment.toml"))
            .ok()
            .and_then(|t| stasis_core::spec::Experiment::from_toml_str(&t, None).ok())
            .map(|e| e.digest())
    }
}

fn state_dir(g: &Global) -> Result<PathBuf> {
    if let Some(d) = &g.state_dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("STASIS_STATE_DIR") {
        return Ok(PathBuf::from(d));
    }
    dirs::data_dir().map(|d| d.join("stasis")).ok_or_else(|| anyhow!("no user data dir; pass --state-dir"))
}

/// Where the programs and the guest image are.
pub fn tools() -> Result<Tools> {
    let exe = std::env::current_exe().context("locating the stasis binary")?;
    let bin_dir = exe.parent().ok_or_else(|| anyhow!("binary has no directory"))?.to_path_buf();
    let inst = crate::install::Installation::locate(&bin_dir, &|k| std::env::var_os(k));
    let (delay_node_bin, image) = (inst.delay_node, inst.guest_dir);
    let choice = stasis_qemu::accel::detect();
    if matches!(choice.accel, stasis_qemu::accel::Accel::Tcg) {
        tracing::warn!(reason = %choice.reason, "KVM not usable: running guests under TCG (software emulation, slower)");
    }
    Ok(Tools {
        delay_node_bin,
        default_kernel: image.join("vmlinuz"),
        default_initrd: image.join("initrd.img"),
        accel: choice.accel,
    })
}

/// What every checkpoint command (stop-and-copy, `--live`, swap-out) opens
/// before it freezes: the running experiment, its store, the freeze
/// settings, the event log, and the store's gc lock (shared), held until the
/// command ends because the disk overlays a checkpoint switches to are named
/// by no record until it commits.
pub struct ForCheckpoint<'a> {
    pub exp: String,
    pub layout: Layout,
    pub rt: Runtime,
    pub store: Store,
    pub cfg: FreezeConfig,
    pub log: EventLog<'a>,
    _images: stasis_store::GcLock,
}

/// The freeze settings a checkpoint command was given.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct FreezeArgs {
    /// Lead time of the freeze instant, ms
    #[arg(long, default_value_t = 300)]
    pub margin_ms: u64,
    /// How long before the stop the delay node holds frames for a VM, ms
    #[arg(long, default_value_t = 20)]
    pub hold_lead_ms: u64,
}

impl<'a> ForCheckpoint<'a> {
    pub fn open(ctx: &'a Ctx, f: FreezeArgs, pause_ms: u64) -> Result<ForCheckpoint<'a>> {
        defer_interrupts();
        let exp = ctx.experiment_name()?;
        let layout = ctx.layout(&exp);
        let rt = Runtime::load(&layout)?;
        let store = Store::open(&layout.checkpoints())?;
        let cfg = FreezeConfig {
            margin_ns: f.margin_ms * 1_000_000,
            hold_lead_ns: f.hold_lead_ms * 1_000_000,
            min_frozen_ns: pause_ms * 1_000_000,
            ..FreezeConfig::default()
        };
        let log = EventLog::open(&layout.events_file(), &ctx.ui);
        let _images = store.gc_lock(false)?;
        Ok(ForCheckpoint { exp, layout, rt, store, cfg, log, _images })
    }
}

/// While a checkpoint runs, the experiment is frozen and only this process
/// resumes it: an interrupt (Ctrl-C, SIGTERM, SIGHUP) must not end it half
/// way. From here on such a signal is only noted, and the command finishes
/// (a few seconds). After a SIGKILL, `stasis resume` is the way on.
pub fn defer_interrupts() {
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

/// A failed checkpoint on a full file system says so plainly: the store's
/// directory and how much room is left.
pub fn no_space_hint(e: anyhow::Error, store: &Store) -> anyhow::Error {
    let text = format!("{e:#}");
    let enospc = text.contains("No space left on device") || text.contains("os error 28");
    let free = stasis_agent::swap::free_bytes(store.root());
    if enospc || free.is_some_and(|f| f < 16 << 20) {
        let free = free.map(mib).unwrap_or_else(|| "?".into());
        return e.context(format!(
            "no space left for the checkpoint in {} ({free} free); the experiment keeps running",
            store.root().display()
        ));
    }
    e
}
