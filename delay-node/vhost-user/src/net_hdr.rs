//! The virtio-net feature set this backend offers and the per-packet header
//! (`struct virtio_net_hdr` / `virtio_net_hdr_mrg_rxbuf`) it implies.
//!
//! We offer no offloads: every frame is a complete Ethernet frame with a
//! correct checksum, the header's flags and GSO type are always 0.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: enables `SET_VRING_ENABLE` and protocol
/// feature negotiation.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// `VHOST_F_LOG_ALL`: dirty-page logging. Without it QEMU puts a migration
/// blocker on the device; with it, our writes through vm-memory are logged.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Features offered to the frontend: VERSION_1, MRG_RXBUF and the two
/// vhost-user ones above. Offloads, multiqueue, event-idx and packed rings are
/// left out on purpose (less state; exact accounting is simpler).
/// `VHOST_USER_F_PROTOCOL_FEATURES` is required by QEMU 7.2's vhost-user-net
/// (without it `vhost_net_start` fails with EINVAL and migration is blocked
/// for lack of `LOG_SHMFD`); see `proxy` for the quirk it brings.
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    | (1 << VHOST_F_LOG_ALL);

/// Layout of the virtio-net header for a negotiated feature set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HdrLayout {
    /// 12 bytes with VERSION_1 or MRG_RXBUF (`num_buffers` present), else 10.
    pub len12: bool,
    /// A received frame may span several guest buffers (MRG_RXBUF).
    pub mergeable: bool,
}

impl HdrLayout {
    /// Legacy device without mergeable buffers: 10-byte header.
    pub const LEGACY: HdrLayout = HdrLayout { len12: false, mergeable: false };
    /// What QEMU and Linux negotiate with [`OFFERED_FEATURES`].
    pub const MODERN_MRG: HdrLayout = HdrLayout { len12: true, mergeable: true };

    /// The layout implied by the features the driver acknowledged.
    pub fn from_features(acked: u64) -> HdrLayout {
        let version_1 = acked & (1 << VIRTIO_F_VERSION_1) != 0;
        let mergeable = acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        HdrLayout { len12: version_1 || mergeable, mergeable }
    }

    /// Header length in bytes.
    #[allow(clippy::len_without_is_empty)] // a header length, never empty
    pub fn len(self) -> usize {
        if self.len12 {
            12
        } else {
            10
        }
    }

    /// The header put before a received frame spread over `buffers` buffers:
    /// no checksum offload, no GSO, and `num_buffers` when the layout has it
    /// (1 when buffers are not merged, as the spec requires for VERSION_1).
    pub fn rx_header(self, buffers: u16) -> Vec<u8> {
        let mut h = vec![0u8; self.len()];
        if self.len12 {
            h[10..12].copy_from_slice(&buffers.to_le_bytes());
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_features() {
        assert_eq!(HdrLayout::from_features(0), HdrLayout::LEGACY);
        assert_eq!(HdrLayout::from_features(OFFERED_FEATURES), HdrLayout::MODERN_MRG);
        let v1_only = HdrLayout::from_features(1 << VIRTIO_F_VERSION_1);
        assert_eq!((v1_only.len(), v1_only.mergeable), (12, false));
        let mrg_only = HdrLayout::from_features(1 << VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!((mrg_only.len(), mrg_only.mergeable), (12, true));
        assert_eq!(HdrLayout::LEGACY.len(), 10);
    }

    #[test]
    fn rx_header_carries_only_num_buffers() {
        assert_eq!(HdrLayout::MODERN_MRG.rx_header(3), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        assert_eq!(HdrLayout::LEGACY.rx_header(1), vec![0u8; 10]);
    }

    #[test]
    fn offers_no_offloads() {
        use virtio_bindings::virtio_net::*;
        for bit in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_MQ,
        ] {
            assert_eq!(OFFERED_FEATURES & (1 << bit), 0, "bit {bit}");
        }
    }
}
