//! The delay node's stream framing (4-byte big-endian length + frame), fed in
//! arbitrary pieces: every frame it yields is within the Ethernet bounds, and
//! an error is final for that input.
#![no_main]
use delay_node::frame::{FrameDecoder, MAX_FRAME, MIN_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut d = FrameDecoder::new();
    for piece in rest.chunks(usize::from(split).max(1)) {
        d.extend(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => assert!(f.len() >= MIN_FRAME && f.len() <= MAX_FRAME),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
