//! `stasis diff A B`: sizes, shared and new chunks per component, disks.

use crate::context::Ctx;
use crate::ui::{mib, print_json};
use anyhow::Result;
use stasis_agent::history::{diff, DiffReport};

#[derive(clap::Args, Debug)]
pub struct Args {
    pub a: String,
    pub b: String,
}

pub fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let (_, ca) = ctx.open_checkpoint(&a.a)?;
    let (_, cb) = ctx.open_checkpoint(&a.b)?;
    let d = diff(&ca, &cb);
    if ctx.json() {
        print_json(&d);
    } else {
        print_diff(&d);
    }
    Ok(())
}

pub fn print_diff(d: &DiffReport) {
    println!("{} -> {}", d.a, d.b);
    println!(
        "  {:<12} {:>11} {:>11} {:>9} {:>9} {:>7}",
        "component", "size A", "size B", "chunks B", "shared", "dirty"
    );
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
        let a =
            d.disks_a.get(node).map(|(p, b)| format!("{} ({})", p.display(), mib(*b))).unwrap_or_else(|| "-".into());
        println!("  disk {node}: A {a}; B {} ({} written since its previous checkpoint)", path.display(), mib(*bytes));
    }
}
