//! Versioned machine types. `-machine pc` is an alias QEMU moves to its
//! newest `pc-i440fx-X.Y` with every release, and a VM's saved state only
//! loads into the machine type it was saved from: a checkpoint taken under
//! QEMU 7.2 as `pc` is `pc-i440fx-7.2`, which QEMU 10.0 still offers, but
//! 10.0's `pc` is `pc-i440fx-10.0`. So a VM is launched with the versioned
//! type its alias resolves to, the checkpoint records it, and a restore
//! launches exactly that one — refused, naming it, when this QEMU lacks it
//! (as libvirt records the expanded machine type in a domain's XML).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The machine a spec asks for when it names none.
pub const DEFAULT: &str = "pc";

/// One line of `qemu-system-x86_64 -machine help`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    pub name: String,
    /// `pc` → `pc-i440fx-10.0`.
    pub alias_of: Option<String>,
    pub deprecated: bool,
}

/// What one QEMU binary offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineTypes(pub Vec<MachineType>);

impl MachineTypes {
    /// Parses `-machine help` (QEMU 7.2 … 10.x print the same shape:
    /// a header line, then `NAME  DESCRIPTION [(alias of X)] [(default)] [(deprecated)]`).
    pub fn parse(help: &str) -> MachineTypes {
        let mut out = Vec::new();
        for line in help.lines() {
            let Some((name, rest)) = line.split_once(char::is_whitespace) else { continue };
            if name.is_empty() || line.starts_with("Supported machines") || !name.bytes().all(is_name_byte) {
                continue;
            }
            let alias_of = rest
                .split("(alias of ")
                .nth(1)
                .and_then(|s| s.split(')').next())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            out.push(MachineType { name: name.to_owned(), alias_of, deprecated: rest.contains("(deprecated)") });
        }
        MachineTypes(out)
    }

    pub fn get(&self, name: &str) -> Option<&MachineType> {
        self.0.iter().find(|m| m.name == name)
    }

    /// The versioned type `name` stands for: its alias target, or itself.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let m = self.get(name)?;
        Some(m.alias_of.clone().unwrap_or_else(|| m.name.clone()))
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot run {qemu} -machine help")]
    Run {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{qemu} -machine help failed ({status}): {stderr}")]
    Failed { qemu: String, status: std::process::ExitStatus, stderr: String },
    #[error("{qemu} offers no machine type {name:?}{} (`{qemu} -machine help` lists what it has)",
        newest.as_ref().map(|n| format!(": its newest is {n:?}; a state saved by a newer QEMU does not load into an older one")).unwrap_or_default())]
    Unknown {
        qemu: String,
        name: String,
        /// What this QEMU's `pc` stands for (its own version), when it has one.
        newest: Option<String>,
    },
}

/// `qemu -machine help` of binary `qemu`, asked once per binary per process.
pub fn probe(qemu: &str) -> Result<MachineTypes, MachineError> {
    static CACHE: OnceLock<Mutex<HashMap<String, MachineTypes>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(qemu) {
        return Ok(t.clone());
    }
    let out = std::process::Command::new(qemu)
        .args(["-machine", "help"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| MachineError::Run { qemu: qemu.to_owned(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).chars().take(500).collect();
        return Err(MachineError::Failed { qemu: qemu.to_owned(), status: out.status, stderr });
    }
    let types = MachineTypes::parse(&String::from_utf8_lossy(&out.stdout));
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(qemu.to_owned(), types.clone());
    Ok(types)
}

/// The versioned machine type `name` stands for on binary `qemu`.
pub fn resolve(qemu: &str, name: &str) -> Result<String, MachineError> {
    let types = probe(qemu)?;
    types.resolve(name).ok_or_else(|| MachineError::Unknown {
        qemu: qemu.to_owned(),
        name: name.to_owned(),
        newest: types.resolve(DEFAULT),
    })
}

/// Refuses a machine type binary `qemu` does not offer.
pub fn check(qemu: &str, name: &str) -> Result<(), MachineError> {
    let types = probe(qemu)?;
    match types.get(name) {
        Some(_) => Ok(()),
        None => {
            Err(MachineError::Unknown { qemu: qemu.to_owned(), name: name.to_owned(), newest: types.resolve(DEFAULT) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpts of the real output of Debian's 7.2 and 10.0.2.
    const QEMU_7_2: &str = "Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
none                 empty machine
";
    const QEMU_10_0: &str = "Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)
pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.9        Standard PC (i440FX + PIIX, 1996) (deprecated)
isapc                ISA-only PC
none                 empty machine
";

    #[test]
    fn the_alias_resolves_to_each_versions_own_type() {
        let old = MachineTypes::parse(QEMU_7_2);
        let new = MachineTypes::parse(QEMU_10_0);
        assert_eq!(old.resolve("pc").as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(new.resolve("pc").as_deref(), Some("pc-i440fx-10.0"));
        assert_eq!(old.resolve("q35").as_deref(), Some("pc-q35-7.2"));
        assert_eq!(new.resolve("pc-i440fx-7.2").as_deref(), Some("pc-i440fx-7.2"), "a versioned type is itself");
        assert!(new.get("pc-i440fx-2.9").unwrap().deprecated);
        assert!(!new.get("pc-i440fx-7.2").unwrap().deprecated);
        assert_eq!(old.resolve("pc-i440fx-10.0"), None, "7.2 cannot run what 10.0 saved");
        assert!(old.get("Supported").is_none());
    }

    #[test]
    fn garbage_parses_to_nothing_it_could_launch() {
        let t = MachineTypes::parse("\n\u{0}\u{1}  x\n(alias of pc)\n   pc\n");
        assert_eq!(t.resolve("pc"), None);
    }
}
