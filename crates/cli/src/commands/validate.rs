//! `stasis validate SPEC` (and `stasis up --dry-run SPEC`): parse the spec,
//! resolve its images (checking they exist and are qcow2 or raw), and print
//! the experiment it describes — nodes, images, boot modes, interfaces with
//! MACs and addresses, LANs and links with their shaping — without starting
//! anything. A bad spec exits non-zero with `file:line:column: …`.

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::{anyhow, Context, Result};
use stasis_core::spec::Experiment;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    pub spec: PathBuf,
    /// The image for OS name NAME (`os`, `tb-set-node-os`), before the
    /// spec's [images] and the image directories (repeatable)
    #[arg(long = "image", value_name = "NAME=PATH", value_parser = crate::install::parse_image_override)]
    pub images: Vec<(String, PathBuf)>,
}

/// The spec, images resolved through this installation's catalog and `overrides`.
pub fn resolve(spec: &Path, overrides: &[(String, PathBuf)]) -> Result<Experiment> {
    let exe = std::env::current_exe().context("locating the stasis binary")?;
    let bin_dir = exe.parent().ok_or_else(|| anyhow!("binary has no directory"))?;
    let catalog = crate::install::Installation::locate(bin_dir, &|k| std::env::var_os(k)).catalog(overrides.to_vec());
    Ok(Experiment::from_file_with(spec, &catalog)?)
}

pub fn exec(ctx: &Ctx, spec: &Path, overrides: &[(String, PathBuf)]) -> Result<()> {
    let exp = resolve(spec, overrides)?;
    let d = exp.describe();
    if ctx.json() {
        print_json(&d);
    } else {
        print!("{d}");
    }
    Ok(())
}
