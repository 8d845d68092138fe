//! Every decoder of bytes an agent or coordinator receives: the length
//! framing, plain (handshake) messages — every Request and Reply included —
//! and sealed frames under a fixed session key. A message that decodes must
//! survive a round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_proto::auth::{Direction, Key, Opener};
use stasis_proto::msg::Message;
use stasis_proto::wire::decode_frame;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame(data);
    if let Ok(m) = Message::decode(data) {
        assert_eq!(Message::decode(&m.encode()).expect("re-decodes"), m);
    }
    let key = Key::new(&[7; 32]).expect("32 bytes").session(1, (1, 1), &[1; 32], &[2; 32]);
    let mut opener = Opener::new(key, Direction::ToAgent);
    let _ = opener.open(data);
});
