//! `stasis gc`: drop chunks and disk images nothing reaches.

use crate::context::Ctx;
use crate::ui::{mib, print_json};
use anyhow::Result;
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let layout = ctx.layout(&exp);
    let store = Store::open(&layout.checkpoints())?;
    let report = store.gc()?;
    let disks = stasis_agent::diskgc::gc_disks(&layout, &store)?;
    if ctx.json() {
        let mut v = serde_json::to_value(&report)?;
        v["disks"] = serde_json::to_value(&disks)?;
        print_json(&v);
    } else {
        println!(
            "removed {} disk images ({}), kept {}",
            disks.images_removed,
            mib(disks.bytes_removed),
            disks.images_kept
        );
        println!(
            "removed {} chunks ({}), kept {} of {} checkpoints, removed {} unpublished",
            report.chunks_removed,
            mib(report.bytes_removed),
            report.chunks_kept,
            report.checkpoints,
            report.unpublished_removed
        );
    }
    Ok(())
}
