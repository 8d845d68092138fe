//! Which accelerator QEMU should use on this host: KVM where hardware
//! virtualisation really works, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: hosts that are themselves VMs may offer
//! it through PVM (the `kvm_pvm` module, a software hypervisor), under which
//! stock Debian guest kernels do not boot. Detection is split into a probe of
//! the host ([`probe`], does I/O) and a pure decision ([`decide`]) so the
//! rules are unit-tested without touching the machine.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Environment variable that overrides detection: `kvm` or `tcg`.
pub const ENV_OVERRIDE: &str = "STASIS_ACCEL";

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator; works everywhere, slower.
    Tcg,
}

impl Accel {
    /// The name QEMU uses in `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no accelerator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?} (expected kvm or tcg)")]
pub struct UnknownAccel(pub String);

impl FromStr for Accel {
    type Err = UnknownAccel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(UnknownAccel(s.to_owned())),
        }
    }
}

/// The chosen accelerator and why, for the caller's (one) warning when it is TCG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// What [`probe`] found out about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    /// Value of `STASIS_ACCEL`, if set.
    pub env_override: Option<String>,
    /// `/dev/kvm`: opened and answered the KVM ioctls, or why not.
    pub kvm: Result<KvmInfo, String>,
    /// The PVM software hypervisor module is loaded.
    pub pvm_loaded: bool,
}

/// Answers of `/dev/kvm` to the basic ioctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmInfo {
    /// `KVM_GET_API_VERSION`; 12 on every Linux since 2.6.22.
    pub api_version: i32,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)` > 0.
    pub user_memory: bool,
}

/// The KVM API version every usable kernel reports.
pub const KVM_API_VERSION: i32 = 12;

/// Pure decision from a probe. Order: explicit override, then KVM usable and
/// not PVM, else TCG with the reason.
pub fn decide(probe: &HostProbe) -> AccelChoice {
    let mut bad_override = None;
    if let Some(raw) = &probe.env_override {
        match raw.parse::<Accel>() {
            Ok(accel) => {
                return AccelChoice { accel, reason: format!("{ENV_OVERRIDE}={raw} set") };
            }
            Err(e) => bad_override = Some(format!("{ENV_OVERRIDE} ignored: {e}; ")),
        }
    }
    let prefix = bad_override.unwrap_or_default();
    let tcg = |why: String| AccelChoice { accel: Accel::Tcg, reason: format!("{prefix}{why}") };
    match &probe.kvm {
        Err(why) => tcg(format!("/dev/kvm unusable: {why}")),
        Ok(info) if info.api_version != KVM_API_VERSION => {
            tcg(format!("/dev/kvm reports API version {} (expected {KVM_API_VERSION})", info.api_version))
        }
        Ok(info) if !info.user_memory => tcg("/dev/kvm lacks KVM_CAP_USER_MEMORY".to_owned()),
        Ok(_) if probe.pvm_loaded => {
            tcg("/dev/kvm is the PVM software hypervisor (module kvm_pvm); stock guest kernels do not boot under it"
                .to_owned())
        }
        Ok(_) => {
            AccelChoice { accel: Accel::Kvm, reason: format!("{prefix}/dev/kvm usable (hardware virtualisation)") }
        }
    }
}

/// Look at this host: the override variable, `/dev/kvm`, `/sys/module/kvm_pvm`.
pub fn probe() -> HostProbe {
    HostProbe {
        env_override: std::env::var(ENV_OVERRIDE).ok().filter(|s| !s.trim().is_empty()),
        kvm: probe_kvm(Path::new("/dev/kvm")),
        pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// Probe and decide.
pub fn detect() -> AccelChoice {
    let choice = decide(&probe());
    tracing::debug!(accel = %choice.accel, reason = %choice.reason, "accelerator chosen");
    choice
}

// ioctl numbers: _IO(KVMIO=0xAE, nr).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
const KVM_CAP_USER_MEMORY: libc::c_ulong = 3;

fn probe_kvm(dev: &Path) -> Result<KvmInfo, String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for this whole
    // function; KVM_GET_API_VERSION takes no argument and writes no memory.
    let api_version = unsafe { libc::ioctl(fd, KVM_GET_API_VERSION as _, 0) };
    if api_version < 0 {
        return Err(format!("KVM_GET_API_VERSION failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above; KVM_CHECK_EXTENSION takes an integer by value.
    let user_memory = unsafe { libc::ioctl(fd, KVM_CHECK_EXTENSION as _, KVM_CAP_USER_MEMORY) };
    Ok(KvmInfo { api_version, user_memory: user_memory > 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: KvmInfo = KvmInfo { api_version: 12, user_memory: true };

    fn host(env: Option<&str>, kvm: Result<KvmInfo, String>, pvm: bool) -> HostProbe {
        HostProbe { env_override: env.map(str::to_owned), kvm, pvm_loaded: pvm }
    }

    #[test]
    fn hardware_kvm_is_chosen() {
        assert_eq!(decide(&host(None, Ok(GOOD), false)).accel, Accel::Kvm);
    }

    #[test]
    fn pvm_means_tcg_with_reason() {
        let c = decide(&host(None, Ok(GOOD), true));
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
    }

    #[test]
    fn missing_dev_kvm_means_tcg() {
        let c = decide(&host(None, Err("cannot open /dev/kvm: nope".into()), false));
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("nope"));
    }

    #[test]
    fn odd_api_version_or_no_user_memory_means_tcg() {
        let old = KvmInfo { api_version: 11, user_memory: true };
        assert_eq!(decide(&host(None, Ok(old), false)).accel, Accel::Tcg);
        let nomem = KvmInfo { api_version: 12, user_memory: false };
        assert_eq!(decide(&host(None, Ok(nomem), false)).accel, Accel::Tcg);
    }

    #[test]
    fn override_wins_both_ways() {
        let c = decide(&host(Some("kvm"), Ok(GOOD), true));
        assert_eq!(c.accel, Accel::Kvm);
        assert!(c.reason.contains("STASIS_ACCEL"));
        assert_eq!(decide(&host(Some("TCG"), Ok(GOOD), false)).accel, Accel::Tcg);
    }

    #[test]
    fn bad_override_is_ignored_and_said() {
        let c = decide(&host(Some("xen"), Ok(GOOD), true));
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("ignored") && c.reason.contains("PVM"), "{}", c.reason);
    }

    #[test]
    fn parse_and_display_round_trip() {
        for a in [Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>(), Ok(a));
        }
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn probing_this_host_does_not_panic() {
        // On the project's machines this is PVM → TCG; elsewhere anything goes.
        let c = detect();
        assert!(!c.reason.is_empty());
    }
}
