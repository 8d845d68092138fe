//! QEMU control: launching VMs, the QMP client, stop/cont, save and restore of VM state.
//!
//! - [`accel`] decides between KVM and TCG on this host.
//! - [`qmp`] is a small async client of QEMU's machine protocol.
//! - [`vm`] launches daemonized QEMU processes and drives them: stop/cont with
//!   measured instants, save of a stopped VM's state, restore from it.
//!
//! See `docs/qemu.md` for the QEMU 7.2 behaviour this relies on and measured figures.

pub mod accel;
/// qcow2 data disks: base images and overlays made with `qemu-img`.
pub mod disk;
/// Versioned machine types: what `-machine pc` means on this QEMU, and what a checkpoint needs.
pub mod machine;
pub mod qmp;
pub mod sched;
pub mod vm;
pub mod vmstate;

pub use accel::{Accel, AccelChoice};
pub use qmp::{Qmp, QmpError, QmpEvent, Stamp};
pub use vm::{LaunchError, NicBackend, NicSpec, RunState, SaveReport, Vm, VmError, VmSpec};
