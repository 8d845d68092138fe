//! `stasis show CHECKPOINT`: what a checkpoint saved and how faithful it was.

use crate::context::Ctx;
use crate::ui::{mib, ms, print_json};
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub checkpoint: String,
}

pub fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let (_, ckpt) = ctx.open_checkpoint(&a.checkpoint)?;
    let report = std::fs::read_to_string(ckpt.dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if ctx.json() {
        print_json(
            &serde_json::json!({"manifest": ckpt.manifest, "report": report, "verdict": verdict_of(&ckpt.manifest)}),
        );
        return Ok(());
    }
    print_show(&ckpt);
    if let Some(stops) = report.as_ref().and_then(|r| r["stops"].as_array()).filter(|s| !s.is_empty()) {
        // QEMU freezes a guest's clocks between the stop's write and its STOP event.
        let width = |s: &serde_json::Value| Some(s["stop_event_ns"].as_u64()?.saturating_sub(s["sent_ns"].as_u64()?));
        let parts: Vec<String> = stops
            .iter()
            .map(|s| {
                format!("{} {}", s["component"].as_str().unwrap_or("?"), width(s).map(ms).unwrap_or_else(|| "?".into()))
            })
            .collect();
        println!("  stop bracket   {}   (each VM's clocks froze within this after its stop was written; taken as write + 0.3 ms)", parts.join(", "));
    }
    if let Some(f) = report.as_ref().and_then(|r| r["faults"].as_array()).filter(|f| !f.is_empty()) {
        println!("  faults         injected on purpose: {}", serde_json::Value::from(f.clone()));
    }
    print_verdict(&verdict_of(&ckpt.manifest));
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
    println!(
        "  in flight      {} frames in the delay node, {} held back from VMs before their stop",
        f.frames_in_flight, f.frames_held
    );
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
    println!(
        "  {:<12} {:<10} {:>11} {:>12} {:>12} {:>12}",
        "component", "kind", "size", "stop", "frozen", "error vs D"
    );
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
pub fn verdict_of(m: &stasis_store::manifest::Manifest) -> stasis_agent::freeze::Verdict {
    let frozen: Vec<(&str, u64)> = m.components.iter().map(|c| (c.name.as_str(), c.frozen_ns)).collect();
    stasis_agent::freeze::verdict(m.freeze.frozen_duration_ns, &frozen, stasis_agent::freeze::FROZEN_ERROR_TOLERANCE_NS)
}

pub fn print_verdict(v: &stasis_agent::freeze::Verdict) {
    if v.clean {
        println!("  fidelity       clean: every component frozen within {} of D", ms(v.tolerance_ns));
    } else {
        println!("  fidelity       NOT CLEAN: the guests can tell");
        for f in &v.findings {
            println!("                 {f}");
        }
    }
}
