//! `stasis log`: the history tree.

use crate::context::Ctx;
use crate::ui::{mib, print_json, utc};
use anyhow::Result;
use stasis_agent::history::{children_of, log_entry, Branches, History, LogEntry};
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let layout = ctx.layout(&exp);
    let store = Store::open(&layout.checkpoints())?;
    let list = store.list()?;
    let entries: Vec<LogEntry> = list.iter().map(log_entry).collect();
    let branches = History::new(&layout).branches(&list)?;
    if ctx.json() {
        print_json(&serde_json::json!({"checkpoints": entries, "branches": branches}));
    } else {
        print_log(&entries, &branches);
    }
    Ok(())
}

pub fn print_log(entries: &[LogEntry], branches: &Branches) {
    fn walk(e: &LogEntry, depth: usize, entries: &[LogEntry], branches: &Branches) {
        let disk: u64 = e.disks.values().map(|d| d.1).sum();
        let heads: Vec<&str> = branches.0.iter().filter(|(_, b)| b.head == e.id).map(|(n, _)| n.as_str()).collect();
        println!(
            "{}* {} {:<10} [{}] {} state {} disk +{}{}",
            "  ".repeat(depth),
            e.id,
            e.name.as_deref().unwrap_or("-"),
            e.branch,
            utc(e.created_unix_ms / 1000),
            mib(e.bytes),
            mib(disk),
            if heads.is_empty() { String::new() } else { format!("  <- head of {}", heads.join(", ")) }
        );
        for c in children_of(entries, Some(&e.id)) {
            walk(c, depth + 1, entries, branches);
        }
    }
    for root in children_of(entries, None) {
        walk(root, 0, entries, branches);
    }
}
