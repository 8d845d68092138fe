//! `stasis key host NAME`: the key file of host NAME's agent, derived from
//! the coordinator's master key (`--key-file` / `$STASIS_KEY_FILE`). Each
//! agent holds only its own host's key (docs/multihost.md, "Keys").

use crate::context::Ctx;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Print host NAME's key (64 hex digits and a newline): write it to the
    /// agent's key file, readable by its owner only
    Host { name: String },
}

pub fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    match &a.what {
        What::Host { name } => {
            let master = crate::multihost::master_key(ctx)?;
            println!("{}", master.host_key_hex(name));
        }
    }
    Ok(())
}
