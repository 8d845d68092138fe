//! `stasis fsck`: check every manifest, file and chunk of the store.

use crate::context::Ctx;
use crate::ui::{mib, print_json};
use anyhow::{bail, Result};
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let store = Store::open(&ctx.layout(&exp).checkpoints())?;
    let report = store.fsck()?;
    if ctx.json() {
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
    Ok(())
}
