//! One file per subcommand (cargo's `src/bin/cargo/commands/<verb>.rs`
//! shape): each defines its arguments (`Args`) and an `exec` that calls a
//! library operation and prints its result.

use crate::context::Ctx;
use anyhow::Result;
use clap::Subcommand;

pub mod branch;
pub mod checkpoint;
pub mod console;
pub mod cp;
pub mod diff;
pub mod down;
pub mod exec;
pub mod fsck;
pub mod gc;
pub mod key;
pub mod list;
pub mod log;
pub mod restore;
pub mod resume;
pub mod show;
pub mod status;
pub mod supervise;
pub mod swap_in;
pub mod swap_out;
pub mod up;
pub mod validate;

#[derive(Subcommand)]
pub enum Cmd {
    /// Start the experiment described by SPEC (TOML, or an NS script: `.ns`/`.tcl`)
    Up(up::Args),
    /// Parse SPEC, resolve its images and print the experiment it describes
    /// (nodes, images, boot modes, interfaces, networks); starts nothing
    Validate(validate::Args),
    /// Show what runs
    Status(status::Args),
    /// Freeze every VM and the network at one instant, save, resume
    Checkpoint(checkpoint::Args),
    /// Take the experiment's periodic checkpoints (`[checkpoint]` in the
    /// spec, or --every) and delete old ones by retention, in the foreground
    /// until SIGINT/SIGTERM
    Supervise(supervise::Args),
    /// Checkpoint the experiment, then stop every process and remove its
    /// sockets (checkpoints and disks stay); `stasis swap-in` brings it back
    SwapOut(swap_out::Args),
    /// Bring a swapped-out experiment back (its swap-out checkpoint, or CHECKPOINT)
    SwapIn(swap_in::Args),
    /// Resume an experiment that a killed checkpoint left frozen: every
    /// stopped VM, the delay node and held ports start again at one instant
    Resume(resume::Args),
    /// List the checkpoints
    List(list::Args),
    /// Show one checkpoint's manifest and fidelity report
    Show(show::Args),
    /// Replace what runs by a checkpoint (name, id, index, `latest`, a
    /// checkpoint directory, or a branch name: that branch's latest checkpoint)
    Restore(restore::Args),
    /// Start a new line of history NAME from CHECKPOINT (no disk is copied);
    /// `stasis restore NAME` runs it
    Branch(branch::Args),
    /// The history tree: every checkpoint with its branch, parent, time and sizes
    Log(log::Args),
    /// What changed from checkpoint A to B: sizes, shared and new chunks per component, disks
    Diff(diff::Args),
    /// Stop every process of the experiment (checkpoints stay)
    Down(down::Args),
    /// Run a command in a node through its guest agent; exits with its status
    Exec(exec::Args),
    /// Copy a file out of a node (`NODE:PATH LOCAL`) or into one (`LOCAL NODE:PATH`)
    Cp(cp::Args),
    /// Attach to a node's serial console (Ctrl-] detaches)
    Console(console::Args),
    /// Check the checkpoint store: every manifest, file and chunk (exit 1 if anything is wrong)
    Fsck(fsck::Args),
    /// Remove chunks that no checkpoint references, and qcow2 disk images
    /// that no checkpoint, branch or running VM needs
    Gc(gc::Args),
    /// Multi-host keys: `stasis key host NAME` prints the key file of host
    /// NAME's agent, derived from the master key (--key-file)
    Key(key::Args),
}

/// Run one subcommand.
pub async fn exec(ctx: &Ctx, cmd: &Cmd) -> Result<()> {
    // Nothing to start or to find running: no host, local or remote, is asked.
    match cmd {
        Cmd::Validate(a) => return validate::exec(ctx, &a.spec, &a.images),
        Cmd::Up(a) if a.dry_run => return validate::exec(ctx, &a.spec, &a.images),
        _ => {}
    }
    let _job = job_lock(ctx, cmd)?;
    if !matches!(cmd, Cmd::Key(_)) && crate::multihost::dispatch(ctx, cmd).await? {
        return Ok(());
    }
    match cmd {
        Cmd::Up(a) => up::exec(ctx, a).await,
        Cmd::Validate(a) => validate::exec(ctx, &a.spec, &a.images),
        Cmd::Status(a) => status::exec(ctx, a).await,
        Cmd::Checkpoint(a) => checkpoint::exec(ctx, a).await,
        Cmd::Supervise(a) => supervise::exec(ctx, a).await,
        Cmd::SwapOut(a) => swap_out::exec(ctx, a).await,
        Cmd::SwapIn(a) => swap_in::exec(ctx, a).await,
        Cmd::Resume(a) => resume::exec(ctx, a).await,
        Cmd::List(a) => list::exec(ctx, a),
        Cmd::Show(a) => show::exec(ctx, a),
        Cmd::Restore(a) => restore::exec(ctx, a).await,
        Cmd::Branch(a) => branch::exec(ctx, a),
        Cmd::Log(a) => log::exec(ctx, a),
        Cmd::Diff(a) => diff::exec(ctx, a),
        Cmd::Down(a) => down::exec(ctx, a).await,
        Cmd::Exec(a) => exec::exec(ctx, a).await,
        Cmd::Cp(a) => cp::exec(ctx, a).await,
        Cmd::Console(a) => console::exec(ctx, a).await,
        Cmd::Fsck(a) => fsck::exec(ctx, a),
        Cmd::Gc(a) => gc::exec(ctx, a),
        Cmd::Key(a) => key::exec(ctx, a),
    }
}

/// The experiment's job lock ([`stasis_agent::job`]) for the commands that
/// change what runs or its history, held until the command returns; a
/// second one is refused naming the first. Read-only commands take none,
/// nor do `exec`, `cp` and `console`, which only talk to a guest: during a
/// checkpoint they wait for the thawed guest (or its restored successor);
/// `up` takes it once it knows the experiment's name; `gc` has the store's
/// own lock. Without an experiment to lock, the command reports that itself.
fn job_lock(ctx: &Ctx, cmd: &Cmd) -> Result<Option<stasis_agent::job::JobLock>> {
    let command = match cmd {
        Cmd::Checkpoint(_) => "checkpoint",
        Cmd::SwapOut(_) => "swap-out",
        Cmd::SwapIn(_) => "swap-in",
        Cmd::Resume(_) => "resume",
        Cmd::Restore(_) => "restore",
        Cmd::Branch(_) => "branch",
        Cmd::Down(_) => "down",
        _ => return Ok(None),
    };
    let Ok(exp) = ctx.experiment_name() else { return Ok(None) };
    let layout = ctx.layout(&exp);
    if !layout.root().is_dir() {
        return Ok(None);
    }
    Ok(Some(stasis_agent::job::JobLock::acquire(&layout, &exp, command)?))
}
