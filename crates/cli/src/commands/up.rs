//! `stasis up SPEC`: start an experiment and wait until every guest booted.

use crate::context::{tools, Ctx};
use crate::ui::print_json;
use anyhow::{bail, Context, Result};
use stasis_agent::event::EventLog;
use stasis_agent::host;
use stasis_core::spec::Experiment;
use stasis_store::Store;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub spec: PathBuf,
    /// Return once QEMU runs instead of waiting for every guest to boot
    #[arg(long)]
    pub no_wait: bool,
    /// Also run CMD in the guest NODE at boot, after the spec's own
    /// commands (repeatable)
    #[arg(long = "run", value_name = "NODE=CMD")]
    pub run: Vec<String>,
    /// Start even when the experiment needs more memory than the host has
    /// available (a warning instead of a refusal)
    #[arg(long)]
    pub overcommit: bool,
    /// The image for OS name NAME (`os`, `tb-set-node-os`), before the
    /// spec's [images] and the image directories (repeatable)
    #[arg(long = "image", value_name = "NAME=PATH", value_parser = crate::install::parse_image_override)]
    pub images: Vec<(String, PathBuf)>,
    /// Print the experiment SPEC describes (as `stasis validate`) and start nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// The spec of `stasis up`, with its `--run` commands.
pub fn experiment(a: &Args) -> Result<Experiment> {
    let mut exp = super::validate::resolve(&a.spec, &a.images)?;
    add_runs(&mut exp, &a.run)?;
    for w in &exp.warnings {
        eprintln!("stasis: warning: {w}");
    }
    Ok(exp)
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let exp = experiment(a)?;
    admit(&exp, a.overcommit)?;
    let layout = ctx.layout(&exp.name);
    let tools = tools()?;
    std::fs::create_dir_all(layout.root()).with_context(|| format!("creating {}", layout.root().display()))?;
    let _job = stasis_agent::job::JobLock::acquire(&layout, &exp.name, "up")?;
    let log = EventLog::open(&layout.events_file(), &ctx.ui);
    // Images `up` creates are named by no record until it returns.
    let images = Store::open(&layout.checkpoints())?.gc_lock(false)?;
    let rt = host::up(&exp, &layout, &tools, &log).await;
    drop(images);
    let rt = rt?;
    stasis_agent::swap::clear(&layout);
    std::fs::write(layout.root().join("experiment.toml"), exp.to_toml()).context("recording the spec")?;
    if !a.no_wait {
        if let Err(e) = host::wait_ready(&rt, host::ready_timeout(&exp), &log).await {
            ctx.ui.done();
            bail!("{e}");
        }
    }
    ctx.ui.done();
    if ctx.json() {
        print_json(&rt);
    } else {
        println!(
            "experiment {} up: {} VMs ({}), state in {}",
            exp.name,
            rt.vms.len(),
            rt.accel,
            layout.root().display()
        );
        for v in &rt.vms {
            println!("  {:<10} pid {:<8} console {}", v.name, v.pid, v.serial_log.display());
        }
    }
    Ok(())
}

/// Appends each `NODE=CMD` of `stasis up --run` to that node's run list.
/// Refuses (or with `overcommit` warns about) an experiment whose memory
/// this host cannot give, before anything starts.
fn admit(exp: &Experiment, overcommit: bool) -> Result<()> {
    use stasis_core::admission;
    let available = admission::mem_available_mib().context("reading the host's available memory")?;
    for d in admission::demand(exp).iter().filter(|d| d.host.is_none()) {
        if let Err(e) = admission::check(&exp.name, d, available) {
            if !overcommit {
                return Err(e.into());
            }
            tracing::warn!("{e}");
        }
    }
    Ok(())
}

pub fn add_runs(exp: &mut Experiment, runs: &[String]) -> Result<()> {
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

#[cfg(test)]
mod tests {
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
