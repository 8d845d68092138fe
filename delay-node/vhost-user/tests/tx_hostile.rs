//! A hostile guest's TX ring: a chain claiming terabytes is dropped, counted
//! and returned to the guest without the host allocating anything near its
//! claimed size (the allocator below records the largest single request).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use stasis_vhost_user::net_hdr::HdrLayout;
use stasis_vhost_user::ring::{drain_tx, sim::Guest, MAX_FRAME, MAX_TX_CHAINS_PER_DRAIN};

struct Largest;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only
// records the largest requested size.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

#[test]
fn a_terabyte_tx_chain_is_dropped_and_counted_without_allocating_it() {
    let (mut g, mut q) = Guest::new(256);
    // 256 descriptors of 4 GiB each: ~1 TiB claimed by one chain.
    g.post(&vec![(0x10_0000, u32::MAX, 0); 256]);
    LARGEST.store(0, Ordering::Relaxed);
    let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, MAX_TX_CHAINS_PER_DRAIN).expect("drain");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert_eq!(d.frames.len(), 0);
    assert_eq!(d.refused, 1, "the chain is counted");
    assert_eq!(g.used_idx(), 1, "the chain went back to the guest");
    assert!(largest <= 12 + MAX_FRAME, "allocated {largest} bytes for a refused chain");
}

#[test]
fn many_full_size_chains_over_the_same_guest_buffer_are_taken_a_bounded_batch_at_a_time() {
    let (mut g, mut q) = Guest::new(1024);
    let len = (12 + MAX_FRAME) as u32;
    for _ in 0..1024 {
        g.post(&[(0x10_0000, len, 0)]);
    }
    let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, MAX_TX_CHAINS_PER_DRAIN).expect("drain");
    assert_eq!(d.frames.len(), MAX_TX_CHAINS_PER_DRAIN);
    assert!(d.more);
    assert_eq!(g.used_idx() as usize, MAX_TX_CHAINS_PER_DRAIN);
}
