//! Moving Ethernet frames between byte slices and a virtio-net device's split
//! virtqueues in guest memory: filling the guest's receive (RX) buffers and
//! draining its transmit (TX) chains. No sockets, no threads: the caller holds
//! the queue (and its lock) and the guest memory.
//!
//! Exactness rule for RX: a frame is either wholly published in the used ring
//! (one used-index store covers all of a merged frame's buffers) or not taken
//! at all (every descriptor chain popped for it is given back). So "what the
//! guest can consume" is exactly "what [`deliver_frame`] returned `Delivered`
//! for".

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::net_hdr::HdrLayout;

/// What [`deliver_frame`] did with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Delivery {
    /// Published in the used ring, spread over `buffers` guest buffers.
    Delivered { buffers: u16 },
    /// The guest has not posted enough free receive buffers; nothing changed.
    NoBuffer,
}

/// Why a ring operation failed. Any of these means the guest (or the
/// frontend) handed us a ring we cannot trust; the port stops using it.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("reading the available ring")]
    Avail(#[source] virtio_queue::Error),
    #[error("guest memory access at {addr:#x}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("frame of {frame} bytes does not fit a {capacity}-byte receive buffer and buffers cannot be merged")]
    BufferTooSmall { frame: usize, capacity: usize },
    #[error("frame of {0} bytes is larger than any virtio-net frame")]
    FrameTooLarge(usize),
}

/// Largest frame we put in a ring: 64 KiB covers any frame a no-offload
/// guest can build, and bounds how many buffers one frame may take.
pub const MAX_FRAME: usize = 65_535;

/// Writable (device-writable) or readable segments of one descriptor chain.
struct Chain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

fn pop_chain<M: GuestMemory>(q: &mut Queue, mem: &M, writable: bool) -> Result<Option<Chain>, RingError> {
    // `iter` re-reads the guest's avail index, so buffers posted since the last
    // call are seen.
    let mut it = q.iter(mem).map_err(RingError::Avail)?;
    let Some(chain) = it.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut segments = Vec::new();
    let mut capacity = 0usize;
    // The guest chooses every length: sum them saturating (a chain of
    // 4 GiB descriptors must not wrap), and the caller checks the total
    // before it allocates anything. The chain's length itself is bounded by
    // the queue size (virtio-queue stops a chain after that many).
    for desc in chain {
        if desc.is_write_only() == writable {
            segments.push((desc.addr(), desc.len() as usize));
            capacity = capacity.saturating_add(desc.len() as usize);
        }
    }
    Ok(Some(Chain { head, segments, capacity }))
}

fn write_at<M: GuestMemory>(mem: &M, addr: GuestAddress, bytes: &[u8]) -> Result<(), RingError> {
    mem.write_slice(bytes, addr).map_err(|source| RingError::Memory { addr: addr.raw_value(), source })
}

/// Publishes `elems` (head, written length) as the next used-ring entries and
/// then moves the used index once, so the guest sees all of them or none.
fn publish_used<M: GuestMemory>(q: &mut Queue, mem: &M, elems: &[(u16, u32)]) -> Result<(), RingError> {
    let used = GuestAddress(q.used_ring());
    let size = q.size();
    let next = q.next_used();
    for (i, &(head, len)) in elems.iter().enumerate() {
        let slot = next.wrapping_add(i as u16) % size;
        // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; }
        let elem = used.unchecked_add(4 + 8 * u64::from(slot));
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        raw[4..].copy_from_slice(&len.to_le_bytes());
        write_at(mem, elem, &raw)?;
    }
    let new_idx = next.wrapping_add(elems.len() as u16);
    // The entries (and the buffers' contents) must be visible before the index.
    fence(Ordering::Release);
    let idx_addr = used.unchecked_add(2);
    mem.store(u16::to_le(new_idx), idx_addr, Ordering::Release)
        .map_err(|source| RingError::Memory { addr: idx_addr.raw_value(), source })?;
    q.set_next_used(new_idx);
    Ok(())
}

/// Puts one Ethernet frame (no FCS) into the guest's receive queue, preceded
/// by a virtio-net header that announces no offloads.
pub fn deliver_frame<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    frame: &[u8],
    layout: HdrLayout,
) -> Result<Delivery, RingError> {
    if frame.len() > MAX_FRAME {
        return Err(RingError::FrameTooLarge(frame.len()));
    }
    let total = layout.len() + frame.len();
    let mut chains: Vec<Chain> = Vec::new();
    let mut capacity = 0usize;
    while capacity < total {
        if !layout.mergeable && !chains.is_empty() {
            let cap = chains[0].capacity;
            give_back(q, chains.len());
            return Err(RingError::BufferTooSmall { frame: total, capacity: cap });
        }
        match pop_chain(q, mem, true) {
            Ok(Some(c)) => {
                capacity += c.capacity;
                chains.push(c);
            }
            Ok(None) => {
                give_back(q, chains.len());
                return Ok(Delivery::NoBuffer);
            }
            Err(e) => {
                give_back(q, chains.len());
                return Err(e);
            }
        }
    }

    let header = layout.rx_header(chains.len() as u16);
    // Header and frame as one logical byte string, written segment by segment.
    let part = |off: usize, n: usize| -> (&[u8], &[u8]) {
        let h = &header[off.min(header.len())..(off + n).min(header.len())];
        let f0 = off.saturating_sub(header.len());
        let f = &frame[f0.min(frame.len())..(off + n).saturating_sub(header.len()).min(frame.len())];
        (h, f)
    };
    let mut elems = Vec::with_capacity(chains.len());
    let mut off = 0usize;
    for c in &chains {
        let mut written = 0usize;
        for &(addr, len) in &c.segments {
            if off == total {
                break;
            }
            let n = len.min(total - off);
            let (h, f) = part(off, n);
            if !h.is_empty() {
                write_at(mem, addr, h)?;
            }
            if !f.is_empty() {
                write_at(mem, addr.unchecked_add(h.len() as u64), f)?;
            }
            written += n;
            off += n;
        }
        elems.push((c.head, written as u32));
    }
    publish_used(q, mem, &elems)?;
    Ok(Delivery::Delivered { buffers: elems.len() as u16 })
}

fn give_back(q: &mut Queue, n: usize) {
    for _ in 0..n {
        q.go_to_previous_position();
    }
}

/// Most chains one [`drain_tx`] call takes; the caller drains again when
/// [`TxDrain::more`] says so (after handing the frames on), so one kick never
/// turns a whole ring's worth of guest-chosen buffers into host memory at once.
pub const MAX_TX_CHAINS_PER_DRAIN: usize = 256;

/// What one [`drain_tx`] took from the guest's TX ring.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TxDrain {
    /// The frames, virtio-net header stripped, in ring order.
    pub frames: Vec<Vec<u8>>,
    /// Chains refused without reading them (shorter than the header, or
    /// longer than header plus [`MAX_FRAME`]); each was returned to the guest
    /// as used with length 0, as a NIC drops a frame it cannot send.
    pub refused: u64,
    /// The call stopped at its chain limit; the ring may hold more.
    pub more: bool,
}

/// Takes up to `max_chains` chains the guest has queued for transmission,
/// strips the virtio-net header and returns the frames in order; each chain
/// is returned to the guest (used, length 0). A chain whose guest-chosen
/// length cannot be a frame is refused before anything is allocated for it.
pub fn drain_tx<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    layout: HdrLayout,
    max_chains: usize,
) -> Result<TxDrain, RingError> {
    let mut out = TxDrain::default();
    let mut done = Vec::new();
    while done.len() < max_chains {
        let Some(c) = pop_chain(q, mem, false)? else {
            break;
        };
        done.push((c.head, 0u32));
        if c.capacity < layout.len() || c.capacity - layout.len() > MAX_FRAME {
            tracing::debug!(bytes = c.capacity, "refused a TX chain that cannot hold a frame");
            out.refused += 1;
            continue;
        }
        let mut buf = vec![0u8; c.capacity];
        let mut off = 0;
        for (addr, len) in c.segments {
            if let Err(source) = mem.read_slice(&mut buf[off..off + len], addr) {
                // Give back what was taken before failing: the guest must not
                // lose ring entries to our error.
                publish_used(q, mem, &done)?;
                return Err(RingError::Memory { addr: addr.raw_value(), source });
            }
            off += len;
        }
        buf.drain(..layout.len());
        out.frames.push(buf);
    }
    out.more = done.len() == max_chains;
    if !done.is_empty() {
        publish_used(q, mem, &done)?;
    }
    Ok(out)
}

/// A split virtqueue laid out in plain memory and driven the way a guest
/// driver would (descriptor table, available ring, used ring): for tests and
/// fuzz targets of the ring code with fabricated guest memory.
pub mod sim {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    /// `VRING_DESC_F_NEXT`.
    pub const NEXT: u16 = 1;
    /// `VRING_DESC_F_WRITE`: device-writable (a receive buffer).
    pub const WRITE: u16 = 2;
    /// Where the simulated guest's buffers start.
    pub const BUF_BASE: u64 = 0x10_0000;
    /// Size of the simulated guest memory.
    pub const MEM_SIZE: u64 = 0x40_0000;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1_0000;
    const USED: u64 = 0x2_0000;

    /// The guest side of one queue.
    pub struct Guest {
        pub mem: GuestMemoryMmap,
        pub size: u16,
        next_desc: u16,
    }

    impl Guest {
        /// A guest with 4 MiB of memory and one ready queue of `size` entries.
        pub fn new(size: u16) -> (Guest, Queue) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .expect("map simulated guest memory");
            let mut q = Queue::new(size).expect("queue size is a power of two");
            q.set_size(size);
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            (Guest { mem, size, next_desc: 0 }, q)
        }

        /// Posts one chain of `(addr, len, flags)` descriptors.
        pub fn post(&mut self, descs: &[(u64, u32, u16)]) {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let d = (head + i as u16) % self.size;
                let last = i + 1 == descs.len();
                let next = (d + 1) % self.size;
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                let a = GuestAddress(DESC + 16 * u64::from(d));
                self.write(a, addr);
                self.write(a.unchecked_add(8), len);
                self.write(a.unchecked_add(12), flags);
                self.write(a.unchecked_add(14), if last { 0 } else { next });
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            let idx = self.avail_idx();
            self.write(GuestAddress(AVAIL + 4 + 2 * u64::from(idx % self.size)), head);
            self.write(GuestAddress(AVAIL + 2), idx.wrapping_add(1));
        }

        /// Posts `n` single-descriptor receive buffers of `len` bytes, each
        /// at `BUF_BASE + 64 KiB × its descriptor index`.
        pub fn post_rx(&mut self, n: u16, len: u32) {
            for _ in 0..n {
                let addr = BUF_BASE + u64::from(self.next_desc) * 0x1_0000;
                self.post(&[(addr, len, WRITE)]);
            }
        }

        /// Overwrites raw bytes anywhere in guest memory (rings included).
        pub fn poke(&self, addr: u64, bytes: &[u8]) {
            let _ = self.mem.write_slice(bytes, GuestAddress(addr));
        }

        fn write<T: vm_memory::ByteValued>(&self, a: GuestAddress, v: T) {
            self.mem.write_obj(v, a).expect("inside simulated memory");
        }

        pub fn avail_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap_or(0)
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0)
        }

        /// (head, length) of used-ring slot `slot`.
        pub fn used_elem(&self, slot: u64) -> (u32, u32) {
            let a = GuestAddress(USED + 4 + 8 * slot);
            (self.mem.read_obj(a).unwrap_or(0), self.mem.read_obj(a.unchecked_add(4)).unwrap_or(0))
        }

        pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).expect("inside simulated memory");
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use sim::{Guest, BUF_BASE, WRITE};
    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn delivers_one_frame_with_header_into_one_buffer() {
        let (mut g, mut q) = Guest::new(16);
        g.post_rx(1, 2048);
        let f = frame(1514);
        let d = deliver_frame(&mut q, &g.mem, &f, HdrLayout::MODERN_MRG).unwrap();
        assert_eq!(d, Delivery::Delivered { buffers: 1 });
        assert_eq!(g.used_idx(), 1);
        assert_eq!(g.used_elem(0), (0, 12 + 1514));
        assert_eq!(g.read(BUF_BASE, 12), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "no offloads, num_buffers = 1");
        assert_eq!(g.read(BUF_BASE + 12, 1514), f);
    }

    #[test]
    fn no_buffer_leaves_ring_untouched() {
        let (g, mut q) = Guest::new(16);
        assert_eq!(deliver_frame(&mut q, &g.mem, &frame(60), HdrLayout::MODERN_MRG).unwrap(), Delivery::NoBuffer);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(g.used_idx(), 0);
    }

    #[test]
    fn merges_buffers_and_publishes_them_with_one_index_store() {
        let (mut g, mut q) = Guest::new(16);
        g.post_rx(3, 1000);
        let f = frame(2500); // 12 + 2500 = 2512 bytes: three 1000-byte buffers
        let d = deliver_frame(&mut q, &g.mem, &f, HdrLayout::MODERN_MRG).unwrap();
        assert_eq!(d, Delivery::Delivered { buffers: 3 });
        assert_eq!(g.used_idx(), 3);
        assert_eq!(g.used_elem(0), (0, 1000));
        assert_eq!(g.used_elem(1), (1, 1000));
        assert_eq!(g.used_elem(2), (2, 512));
        assert_eq!(g.read(BUF_BASE + 10, 2), vec![3, 0], "num_buffers");
        let mut got = g.read(BUF_BASE + 12, 988);
        got.extend(g.read(BUF_BASE + 0x1_0000, 1000));
        got.extend(g.read(BUF_BASE + 0x2_0000, 512));
        assert_eq!(got, f);
    }

    #[test]
    fn partial_merge_gives_every_buffer_back() {
        let (mut g, mut q) = Guest::new(16);
        g.post_rx(2, 1000);
        assert_eq!(deliver_frame(&mut q, &g.mem, &frame(2500), HdrLayout::MODERN_MRG).unwrap(), Delivery::NoBuffer);
        assert_eq!(q.next_avail(), 0, "both popped buffers are given back");
        assert_eq!(g.used_idx(), 0);
        assert_eq!(
            deliver_frame(&mut q, &g.mem, &frame(100), HdrLayout::MODERN_MRG).unwrap(),
            Delivery::Delivered { buffers: 1 }
        );
        assert_eq!(g.used_elem(0), (0, 112));
    }

    #[test]
    fn without_merging_a_small_buffer_is_an_error_and_is_given_back() {
        let (mut g, mut q) = Guest::new(16);
        g.post_rx(2, 1000);
        let e = deliver_frame(&mut q, &g.mem, &frame(1500), HdrLayout::LEGACY).unwrap_err();
        assert!(matches!(e, RingError::BufferTooSmall { frame: 1510, capacity: 1000 }), "{e}");
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn legacy_header_is_ten_bytes_and_multi_descriptor_chains_are_filled_in_order() {
        let (mut g, mut q) = Guest::new(16);
        g.post(&[(BUF_BASE, 10, WRITE), (BUF_BASE + 0x1_0000, 2000, WRITE)]);
        let f = frame(300);
        assert_eq!(deliver_frame(&mut q, &g.mem, &f, HdrLayout::LEGACY).unwrap(), Delivery::Delivered { buffers: 1 });
        assert_eq!(g.used_elem(0), (0, 310));
        assert_eq!(g.read(BUF_BASE, 10), vec![0u8; 10]);
        assert_eq!(g.read(BUF_BASE + 0x1_0000, 300), f);
    }

    #[test]
    fn used_ring_wraps_around() {
        let (mut g, mut q) = Guest::new(4);
        for round in 0..3u16 {
            g.post_rx(4, 2048);
            for i in 0..4u16 {
                let d = deliver_frame(&mut q, &g.mem, &frame(64), HdrLayout::MODERN_MRG).unwrap();
                assert_eq!(d, Delivery::Delivered { buffers: 1 }, "round {round} frame {i}");
            }
            assert_eq!(deliver_frame(&mut q, &g.mem, &frame(64), HdrLayout::MODERN_MRG).unwrap(), Delivery::NoBuffer);
        }
        assert_eq!(g.used_idx(), 12);
        assert_eq!(q.next_used(), 12);
    }

    #[test]
    fn drains_tx_frames_without_header() {
        let (mut g, mut q) = Guest::new(16);
        let f1 = frame(60);
        let f2 = frame(1514);
        // Header and frame in one readable descriptor, or header then data.
        let mut hdr_and_f1 = vec![0u8; 12];
        hdr_and_f1.extend(&f1);
        g.mem.write_slice(&hdr_and_f1, GuestAddress(BUF_BASE)).unwrap();
        g.mem.write_slice(&[0u8; 12], GuestAddress(BUF_BASE + 0x1_0000)).unwrap();
        g.mem.write_slice(&f2, GuestAddress(BUF_BASE + 0x2_0000)).unwrap();
        g.post(&[(BUF_BASE, hdr_and_f1.len() as u32, 0)]);
        g.post(&[(BUF_BASE + 0x1_0000, 12, 0), (BUF_BASE + 0x2_0000, 1514, 0)]);
        let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 16).unwrap();
        assert_eq!(d.frames, vec![f1, f2]);
        assert_eq!((d.refused, d.more), (0, false));
        assert_eq!(g.used_idx(), 2);
        assert_eq!(drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 16).unwrap(), TxDrain::default());
    }

    #[test]
    fn short_tx_chain_is_refused_but_returned_to_the_guest() {
        let (mut g, mut q) = Guest::new(16);
        g.post(&[(BUF_BASE, 8, 0)]);
        g.post(&[(BUF_BASE, 12 + 60, 0)]);
        let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 16).unwrap();
        assert_eq!(d.refused, 1);
        assert_eq!(d.frames.len(), 1, "the next chain is still taken");
        assert_eq!(g.used_idx(), 2);
    }

    #[test]
    fn oversize_tx_chain_is_refused_unread_and_returned_used() {
        let (mut g, mut q) = Guest::new(16);
        // 16 GiB claimed by four descriptors far outside guest memory: reading
        // (or allocating) any of it would fail or abort.
        g.post(&[(1 << 40, u32::MAX, 0); 4]);
        // One byte more than any frame, inside guest memory.
        g.post(&[(BUF_BASE, (12 + MAX_FRAME + 1) as u32, 0)]);
        let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 16).unwrap();
        assert_eq!((d.frames.len(), d.refused), (0, 2));
        assert_eq!(g.used_idx(), 2);
        assert_eq!(g.used_elem(0), (0, 0));
        assert_eq!(g.used_elem(1), (4, 0));
    }

    #[test]
    fn a_drain_takes_at_most_max_chains_and_says_more_remain() {
        let (mut g, mut q) = Guest::new(16);
        g.poke(BUF_BASE, &[0u8; 12 + 60]);
        for _ in 0..10 {
            g.post(&[(BUF_BASE, 12 + 60, 0)]);
        }
        let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 4).unwrap();
        assert_eq!((d.frames.len(), d.more), (4, true));
        assert_eq!(g.used_idx(), 4);
        let d = drain_tx(&mut q, &g.mem, HdrLayout::MODERN_MRG, 8).unwrap();
        assert_eq!((d.frames.len(), d.more), (6, false));
        assert_eq!(g.used_idx(), 10);
    }

    #[test]
    fn oversized_frame_is_refused() {
        let (_g, mut q) = Guest::new(16);
        let (g, _) = Guest::new(16);
        assert!(matches!(
            deliver_frame(&mut q, &g.mem, &vec![0u8; MAX_FRAME + 1], HdrLayout::MODERN_MRG),
            Err(RingError::FrameTooLarge(_))
        ));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Whatever buffers the guest posts, a frame is either wholly in
            /// the used ring with its exact bytes, or nothing changed.
            #[test]
            fn delivery_is_all_or_nothing(
                bufs in proptest::collection::vec(1u32..3000, 0..8),
                len in 0usize..9000,
                mergeable in any::<bool>(),
            ) {
                let layout = HdrLayout { len12: true, mergeable };
                let (mut g, mut q) = Guest::new(16);
                for &b in &bufs {
                    g.post_rx(1, b);
                }
                let f = frame(len);
                let total = 12 + len;
                match deliver_frame(&mut q, &g.mem, &f, layout) {
                    Ok(Delivery::Delivered { buffers }) => {
                        prop_assert_eq!(g.used_idx(), buffers);
                        let mut got = Vec::new();
                        for i in 0..u64::from(buffers) {
                            let (id, n) = g.used_elem(i);
                            prop_assert_eq!(u64::from(id), i);
                            got.extend(g.read(BUF_BASE + i * 0x1_0000, n as usize));
                        }
                        prop_assert_eq!(got.len(), total);
                        prop_assert_eq!(u16::from_le_bytes([got[10], got[11]]), buffers);
                        prop_assert_eq!(&got[12..], &f[..]);
                        prop_assert!(mergeable || buffers == 1);
                    }
                    Ok(Delivery::NoBuffer) => {
                        prop_assert_eq!(q.next_avail(), 0);
                        prop_assert_eq!(g.used_idx(), 0);
                        let cap: usize = bufs.iter().map(|&b| b as usize).sum();
                        let expected = if mergeable { cap < total } else { bufs.is_empty() };
                        prop_assert!(expected, "NoBuffer with {} bytes of buffers for {} bytes", cap, total);
                    }
                    Err(RingError::BufferTooSmall { .. }) => {
                        prop_assert!(!mergeable);
                        prop_assert_eq!(q.next_avail(), 0);
                        prop_assert_eq!(g.used_idx(), 0);
                    }
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
        }
    }
}
