//! The vhost-user TX path with guest memory the input fabricates: the input
//! is a list of descriptors (addr, len, flags, next) written straight into the
//! descriptor table, plus avail-ring entries. drain_tx must never panic,
//! never allocate for a chain that cannot be a frame, and only yield frames
//! within the virtio-net bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_vhost_user::net_hdr::HdrLayout;
use stasis_vhost_user::ring::{drain_tx, sim::Guest, MAX_FRAME, MAX_TX_CHAINS_PER_DRAIN};

const SIZE: u16 = 64;

fuzz_target!(|data: &[u8]| {
    let (g, mut q) = Guest::new(SIZE);
    // Descriptor table at 0, 16 bytes each: the first 1024 input bytes.
    let (table, rest) = data.split_at(data.len().min(16 * SIZE as usize));
    g.poke(0, table);
    // Avail ring at 0x1_0000: flags, idx, ring[SIZE].
    let (avail, _) = rest.split_at(rest.len().min(4 + 2 * SIZE as usize));
    g.poke(0x1_0000, avail);
    let layout = if data.first().is_some_and(|b| b & 1 == 1) { HdrLayout::MODERN_MRG } else { HdrLayout::LEGACY };
    for _ in 0..4 {
        match drain_tx(&mut q, &g.mem, layout, MAX_TX_CHAINS_PER_DRAIN) {
            Ok(d) => {
                for f in &d.frames {
                    assert!(f.len() <= MAX_FRAME);
                }
                if !d.more {
                    break;
                }
            }
            Err(_) => break,
        }
    }
});
