//! vhost-user-net backend ports for the delay node.
//!
//! A [`VhostPort`] is the vhost-user backend of one VM NIC: QEMU connects to
//! its unix socket (`-chardev socket,path=… -netdev vhost-user`), and the port
//! reads the guest's transmit ring and writes its receive ring directly in the
//! guest's shared memory. Compared with `-netdev stream`, nothing waits in
//! QEMU between the node and the guest, so at a checkpoint every frame is
//! either in the guest's used ring (and so in its saved memory) or still with
//! the caller; and QEMU's device-stop messages give an in-band stop marker
//! ([`PortEvent::Stopped`]). See `docs/vhost-user.md`.

pub mod bridge;
pub mod net_hdr;
pub mod port;
mod proxy;
pub mod ring;

pub use bridge::{Bridge, Side};
pub use port::{PortEvent, PortStats, VhostError, VhostPort};
