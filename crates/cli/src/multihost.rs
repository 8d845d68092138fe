//! The CLI as coordinator of a multi-host experiment (a spec with
//! `[[host]]`s): every command goes to the hosts' agents
//! (`stasis_agent::coordinator`). See docs/multihost.md.

use crate::commands::{checkpoint, restore, show, up, Cmd};
use crate::context::Ctx;
use crate::context::FreezeArgs;
use crate::ui::{mib, ms, print_json};
use anyhow::{anyhow, bail, Context, Result};
use stasis_agent::coordinator::{Coordinator, MhCheckpoint};
use stasis_agent::layout::Layout;
use stasis_core::spec::Experiment;
use stasis_proto::coordinator::CoordConfig;
use std::path::Path;
use std::time::Duration;

/// The coordinator's master key: `--key-file`, else `$STASIS_KEY_FILE`.
/// Each host's agent holds the key derived from it for that host
/// (`stasis key host NAME`).
pub(crate) fn master_key(ctx: &Ctx) -> Result<stasis_proto::Key> {
    let path = ctx.global.key_file.clone().or_else(|| std::env::var_os("STASIS_KEY_FILE").map(Into::into)).ok_or_else(
        || {
            anyhow!(
                "a multi-host experiment needs the coordinator's master key: pass --key-file (or set STASIS_KEY_FILE)"
            )
        },
    )?;
    let bytes = stasis_core::private::read_secret(&path).context("the key file")?;
    stasis_proto::Key::new(bytes.strip_suffix(b"\n").unwrap_or(&bytes))
        .map_err(|e| anyhow!("key file {}: {e}", path.display()))
}

/// The recorded spec of experiment `name`, if it is a multi-host one.
fn recorded(state: &Path, name: &str) -> Option<Experiment> {
    let text = std::fs::read_to_string(Layout::new(state, name).root().join("experiment.toml")).ok()?;
    Experiment::from_toml_str(&text, None).ok().filter(|e| e.placement.is_some())
}

/// Run `cli` if it concerns a multi-host experiment; `Ok(false)` otherwise.
pub async fn dispatch(ctx: &Ctx, cmd: &Cmd) -> Result<bool> {
    let state: &Path = &ctx.state;
    let exp = match cmd {
        Cmd::Up(a) => {
            let exp = super::commands::up::experiment(a)?;
            if exp.placement.is_none() {
                return Ok(false);
            }
            // Root disks (overlays, seeds, base identities) are one-host only so far.
            if let Some(n) = exp.nodes.iter().find(|n| n.image.is_some()) {
                bail!(
                    "node {:?} has an OS image: OS images run on one host only so far (docs/images.md); \
                     run it on one host (no [[host]] entries) or give the node no image",
                    n.name
                );
            }
            exp
        }
        _ => {
            let Ok(name) = ctx.experiment_name() else { return Ok(false) };
            match recorded(state, &name) {
                Some(e) => e,
                None => return Ok(false),
            }
        }
    };
    let layout = Layout::new(state, &exp.name);
    let coord = Coordinator::new(exp.clone(), master_key(ctx)?, &layout)?;
    match cmd {
        Cmd::Up(up::Args { no_wait, .. }) => {
            std::fs::create_dir_all(layout.root()).with_context(|| format!("creating {}", layout.root().display()))?;
            std::fs::write(layout.root().join("experiment.toml"), exp.to_toml()).context("recording the spec")?;
            let st = coord.up((!no_wait).then_some(Duration::from_secs(180))).await?;
            if ctx.json() {
                print_json(&st);
            } else {
                println!("experiment {} up on {} hosts", exp.name, st.len());
                print_status(&st);
            }
        }
        Cmd::Status(_) => {
            let st = coord.status().await?;
            if ctx.json() {
                print_json(&st);
            } else {
                print_status(&st);
                for c in coord.list()? {
                    if let Some(state) = part_states(&c) {
                        println!("  checkpoint {} {}: {state}", c.index, c.label());
                    }
                }
            }
        }
        Cmd::Checkpoint(checkpoint::Args {
            name,
            freeze: FreezeArgs { margin_ms, hold_lead_ms },
            pause_ms,
            live,
            faults,
        }) => {
            if *live || !faults.is_empty() {
                bail!("--live and --fault are not supported on a multi-host experiment yet");
            }
            let cfg = CoordConfig {
                margin_ns: margin_ms * 1_000_000,
                hold_lead_ns: hold_lead_ms * 1_000_000,
                min_frozen_ns: pause_ms * 1_000_000,
                // Saves of TCG guests (and sealing: fsync + hash) take seconds
                // on a busy host; STASIS_SAVE_BUDGET_MS shortens it (fault drills).
                // The chunked store commit comes after the resume, within
                // store_timeout_ns (default 300 s).
                save_budget_ns: std::env::var("STASIS_SAVE_BUDGET_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(120_000)
                    * 1_000_000,
                ..CoordConfig::default()
            };
            let s = coord.checkpoint(name.as_deref(), cfg).await?;
            if ctx.json() {
                print_json(&s);
            } else {
                let c = &s.checkpoint;
                println!(
                    "checkpoint {} {}: {} hosts, {} saved, stop skew {}, frozen {} (max error {})",
                    c.index,
                    c.label(),
                    c.parts.len(),
                    mib(c.bytes),
                    ms(c.stop_skew_ns),
                    ms(s.frozen_duration_ns),
                    ms(s.max_frozen_error_ns)
                );
            }
        }
        Cmd::List(_) => {
            let list = coord.list()?;
            if ctx.json() {
                print_json(&list);
            } else if list.is_empty() {
                println!("no checkpoints of {}", exp.name);
            } else {
                println!("{:>3}  {:<22} {:<16} {:>12}  hosts", "#", "id", "name", "size");
                for c in &list {
                    let hosts: Vec<&str> = c.parts.iter().map(|p| p.host.as_str()).collect();
                    println!(
                        "{:>3}  {:<22} {:<16} {:>12}  {}{}",
                        c.index,
                        c.ckpt,
                        c.name.as_deref().unwrap_or("-"),
                        mib(c.bytes),
                        hosts.join(","),
                        part_states(c).map(|s| format!("  ({s})")).unwrap_or_default()
                    );
                }
            }
        }
        Cmd::Show(show::Args { checkpoint }) => {
            let c = coord.open(checkpoint)?;
            if ctx.json() {
                print_json(&c);
            } else {
                println!("checkpoint {} ({}) of experiment {}", c.index, c.label(), c.experiment);
                println!("  size           {}", mib(c.bytes));
                println!("  stop skew      {}   (all components of all hosts)", ms(c.stop_skew_ns));
                if let Some(state) = part_states(&c) {
                    println!("  state          {state}");
                }
                for p in &c.parts {
                    println!("  host {} (part {}):", p.host, p.store_name);
                    for comp in &p.components {
                        println!(
                            "    {:<12} {:>12}  stop {:+.3} ms from plan  blake3 {}",
                            comp.name,
                            mib(comp.bytes),
                            (comp.stop_ns as f64 - c.freeze_at as f64) / 1e6,
                            &comp.blake3[..16]
                        );
                    }
                }
            }
        }
        Cmd::Restore(restore::Args { checkpoint, branch }) => {
            if branch.is_some() {
                bail!("branches are not supported for multi-host experiments yet");
            }
            let s = coord.restore(checkpoint, 300_000_000).await?;
            if ctx.json() {
                print_json(&s);
            } else {
                println!(
                    "restored {} on {} hosts in {}, resume skew {}",
                    s.checkpoint,
                    s.hosts,
                    ms(s.restore_ns),
                    ms(s.resume_skew_ns)
                );
            }
        }
        Cmd::Down(_) => {
            let n = coord.down().await?;
            if ctx.json() {
                print_json(&serde_json::json!({"experiment": exp.name, "stopped": n}));
            } else {
                println!("experiment {} down ({n} processes stopped)", exp.name);
            }
        }
        _ => bail!("this command is not supported for multi-host experiments yet"),
    }
    Ok(true)
}

/// What keeps a checkpoint from being plainly restorable, if anything: a
/// part whose store commit failed, or parts still only sealed on their host.
fn part_states(c: &MhCheckpoint) -> Option<String> {
    if let Some((host, reason)) = c.failed_part() {
        return Some(format!("NOT RESTORABLE: host {host} could not store its part: {reason}"));
    }
    let sealed = c.sealed_hosts();
    (!sealed.is_empty()).then(|| {
        format!(
            "restorable; parts sealed on {} (store commit not confirmed: at their agent's next start or restore)",
            sealed.join(",")
        )
    })
}

fn print_status(st: &[serde_json::Value]) {
    for s in st {
        if s["running"].as_bool() != Some(true) {
            println!("  (a host runs nothing)");
            continue;
        }
        let delay = if s["delay_node"].is_null() {
            String::new()
        } else {
            format!(", delay node pid {}", s["delay_node"]["pid"])
        };
        println!("  host {}{delay}", s["host"].as_str().unwrap_or("?"));
        for v in s["vms"].as_array().into_iter().flatten() {
            println!(
                "    {:<10} pid {:<8} {}",
                v["name"].as_str().unwrap_or("?"),
                v["pid"],
                if v["alive"].as_bool() == Some(true) { "running" } else { "DEAD" }
            );
        }
    }
}
