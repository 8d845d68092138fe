//! The delay node's saved state as read back from a file: the state envelope
//! (magic, kind, version, length cap, CRC) and the postcard payload inside,
//! then what the node does with a state that decodes: restore it (every
//! saved time, count and sequence number checked), thaw, take a frame on
//! every port and run the schedule for a simulated hour, as a restored node
//! would. Seeds in fuzz/seeds/delay_node_state are real saves.
#![no_main]
use delay_node::sched::Scheduler;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

/// Polls at most this many deadlines per input, so a schedule that keeps
/// producing work cannot stall the fuzzer.
const MAX_POLLS: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir"));
    let path = dir.path().join("dn.state");
    std::fs::write(&path, data).expect("write input");
    let Ok(state) = delay_node::state::NodeState::read_file(&path) else { return };
    let Ok(mut node) = Scheduler::restore(&state.topology, &state) else { return };
    for port in 0..node.port_count() {
        node.set_connected(port, true);
    }
    let start = 1_000_000_000;
    node.thaw(start).expect("a restored node is frozen");
    let mut frame = vec![0u8; 64];
    frame[..6].fill(0xff); // broadcast: every LAN floods it
    for port in 0..node.port_count() {
        node.ingress(start, port, frame.clone());
    }
    let end = start + 3_600_000_000_000;
    let mut out = Vec::new();
    node.poll(start, &mut out);
    for _ in 0..MAX_POLLS {
        match node.next_deadline() {
            Some(d) if d <= end => node.poll(d.max(start), &mut out),
            _ => break,
        }
        out.clear();
    }
});
