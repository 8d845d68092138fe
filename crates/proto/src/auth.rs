//! Authentication with a pre-shared key: a mutual HMAC-SHA256
//! challenge–response over both nonces, then a per-session key that seals
//! every later frame (sequence number + MAC), so a connection can be neither
//! hijacked, replayed nor reordered.
//!
//! ```text
//!   proof_coord = HMAC(K, "stasis coord" ‖ version ‖ offered ‖ nonce_c ‖ nonce_a)
//!   proof_agent = HMAC(K, "stasis agent" ‖ version ‖ offered ‖ nonce_c ‖ nonce_a)
//!   session     = HMAC(K, "stasis session" ‖ version ‖ offered ‖ nonce_c ‖ nonce_a)
//!   sealed frame = seq (u64 BE) ‖ message ‖ HMAC(session, dir ‖ seq ‖ message)
//! ```
//! The client (coordinator) proves the key first; the agent answers with its
//! own proof only to a client that proved it, so a peer without the key never
//! gets a value computed from it (nothing to search offline).
//!
//! **Per-host keys.** `K` is each host's own key,
//! `K_h = hex(HMAC(K_master, "stasis host key" ‖ len(h) ‖ h))` (see
//! [`Key::for_host`]): the coordinator holds the master key and derives the
//! key of every host it talks to; an agent holds only its own, so a
//! compromised host can neither impersonate another host nor command one.
//! `dir` is 1 for coordinator → agent and 2 for agent → coordinator, so a
//! frame cannot be reflected back to its sender. Tags are compared in
//! constant time (`hmac`'s `verify_slice`).

use crate::msg::{DecodeError, Message};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted: 256 bits, as many as the HMAC's output.
pub const MIN_KEY_LEN: usize = 32;

/// Length of a MAC tag.
pub const TAG_LEN: usize = 32;
const SEQ_LEN: usize = 8;

/// A pre-shared key of at least [`MIN_KEY_LEN`] bytes (make it random:
/// `head -c 32 /dev/urandom`; a short or guessable key can be searched
/// offline from one recorded handshake). Its `Debug` does not print it.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a key is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key of {0} bytes is shorter than {MIN_KEY_LEN}: use 32 random bytes (head -c 32 /dev/urandom)")]
    TooShort(usize),
}

impl Key {
    pub fn new(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Key(bytes.to_vec()))
    }

    /// The key of host `host`, derived from this (master) key: the 64 hex
    /// digits of `HMAC(master, "stasis host key" ‖ u32 BE len(host) ‖ host)`,
    /// as the host's key file holds them (`stasis key host NAME` prints them).
    pub fn for_host(&self, host: &str) -> Key {
        Key(self.host_key_hex(host).into_bytes())
    }

    /// The text of host `host`'s key file (see [`Key::for_host`]).
    pub fn host_key_hex(&self, host: &str) -> String {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"stasis host key");
        m.update(&(host.len() as u32).to_be_bytes());
        m.update(host.as_bytes());
        m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every proof and the session key cover the label, the chosen version,
    /// the version range the coordinator offered (so a peer that rewrote the
    /// Hello to force an older version breaks both proofs) and both nonces.
    fn mac(&self, label: &[u8], version: u16, offered: Offered, nonce_c: &[u8; 32], nonce_a: &[u8; 32]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(&version.to_be_bytes());
        m.update(&offered.0.to_be_bytes());
        m.update(&offered.1.to_be_bytes());
        m.update(nonce_c);
        m.update(nonce_a);
        m
    }

    /// The agent's proof of the key.
    pub fn agent_proof(&self, version: u16, offered: Offered, nonce_c: &[u8; 32], nonce_a: &[u8; 32]) -> [u8; 32] {
        self.mac(b"stasis agent", version, offered, nonce_c, nonce_a).finalize().into_bytes().into()
    }

    /// The coordinator's proof of the key.
    pub fn coord_proof(&self, version: u16, offered: Offered, nonce_c: &[u8; 32], nonce_a: &[u8; 32]) -> [u8; 32] {
        self.mac(b"stasis coord", version, offered, nonce_c, nonce_a).finalize().into_bytes().into()
    }

    /// Check a proof in constant time.
    pub fn verify(
        &self,
        agent: bool,
        version: u16,
        offered: Offered,
        nonce_c: &[u8; 32],
        nonce_a: &[u8; 32],
        proof: &[u8; 32],
    ) -> bool {
        let label: &[u8] = if agent { b"stasis agent" } else { b"stasis coord" };
        self.mac(label, version, offered, nonce_c, nonce_a).verify_slice(proof).is_ok()
    }

    /// The key that seals this session's frames.
    pub fn session(&self, version: u16, offered: Offered, nonce_c: &[u8; 32], nonce_a: &[u8; 32]) -> SessionKey {
        SessionKey(self.mac(b"stasis session", version, offered, nonce_c, nonce_a).finalize().into_bytes().into())
    }
}

/// The protocol version range (min, max) the coordinator offered in its Hello.
pub type Offered = (u16, u16);

/// The per-session key.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToAgent = 1,
    ToCoordinator = 2,
}

fn tag(key: &SessionKey, dir: Direction, seq: u64, msg: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(&key.0).expect("HMAC takes any key length");
    m.update(&[dir as u8]);
    m.update(&seq.to_be_bytes());
    m.update(msg);
    m
}

/// Seals outgoing messages of one direction, numbering them 0, 1, 2 …
pub struct Sealer {
    key: SessionKey,
    dir: Direction,
    next: u64,
}

impl Sealer {
    pub fn new(key: SessionKey, dir: Direction) -> Sealer {
        Sealer { key, dir, next: 0 }
    }

    /// The frame payload for `msg`.
    pub fn seal(&mut self, msg: &Message) -> Vec<u8> {
        let body = msg.encode();
        let seq = self.next;
        self.next += 1;
        let mut out = Vec::with_capacity(SEQ_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag(&self.key, self.dir, seq, &body).finalize().into_bytes());
        out
    }
}

/// Why a sealed frame is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("sealed frame of {0} bytes is too short")]
    Short(usize),
    #[error("bad MAC (forged, corrupted or wrong session)")]
    BadMac,
    #[error("sequence {got}, expected {expected} (replayed, reordered or dropped frame)")]
    Sequence { got: u64, expected: u64 },
    #[error("authenticated but undecodable")]
    Decode(#[from] DecodeError),
}

/// Checks incoming frames of one direction: MAC, then exact sequence.
pub struct Opener {
    key: SessionKey,
    dir: Direction,
    next: u64,
}

impl Opener {
    pub fn new(key: SessionKey, dir: Direction) -> Opener {
        Opener { key, dir, next: 0 }
    }

    pub fn open(&mut self, frame: &[u8]) -> Result<Message, OpenError> {
        if frame.len() < SEQ_LEN + 1 + TAG_LEN {
            return Err(OpenError::Short(frame.len()));
        }
        let (seq, rest) = frame.split_at(SEQ_LEN);
        let (body, mac) = rest.split_at(rest.len() - TAG_LEN);
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        tag(&self.key, self.dir, seq, body).verify_slice(mac).map_err(|_| OpenError::BadMac)?;
        if seq != self.next {
            return Err(OpenError::Sequence { got: seq, expected: self.next });
        }
        self.next += 1;
        Ok(Message::decode(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Ping;

    fn pair() -> (Sealer, Opener) {
        let k = Key::new(b"0123456789abcdef0123456789abcdef").unwrap().session(1, (1, 1), &[1; 32], &[2; 32]);
        (Sealer::new(k.clone(), Direction::ToAgent), Opener::new(k, Direction::ToAgent))
    }

    #[test]
    fn short_keys_are_refused_and_not_printed() {
        assert_eq!(Key::new(b"short").unwrap_err(), KeyError::TooShort(5));
        assert_eq!(Key::new(&[1; 31]).unwrap_err(), KeyError::TooShort(31));
        assert_eq!(format!("{:?}", Key::new(&[7; 32]).unwrap()), "Key(..)");
    }

    #[test]
    fn host_keys_differ_per_host_and_from_the_master() {
        let m = Key::new(&[9; 32]).unwrap();
        let (a, b) = (m.for_host("h1"), m.for_host("h2"));
        assert_eq!(a.0.len(), 64);
        assert_ne!(a.0, b.0);
        assert_ne!(a.0, m.0);
        assert_eq!(a.0, m.for_host("h1").0, "deterministic");
        assert_eq!(String::from_utf8(a.0.clone()).unwrap(), m.host_key_hex("h1"));
        // The length prefix keeps ("h", "1…") and ("h1", "…") apart.
        assert_ne!(m.for_host("h1").0, Key::new(&[9; 32]).unwrap().for_host("h").for_host("1").0);
        assert_ne!(Key::new(&[8; 32]).unwrap().for_host("h1").0, a.0, "depends on the master");
        let p = a.coord_proof(1, (1, 1), &[3; 32], &[4; 32]);
        assert!(!b.verify(false, 1, (1, 1), &[3; 32], &[4; 32], &p), "h1's key does not open h2");
    }

    #[test]
    fn proofs_depend_on_key_role_and_nonces() {
        let k = Key::new(&[1; 32]).unwrap();
        let other = Key::new(&[2; 32]).unwrap();
        let p = k.agent_proof(1, (1, 1), &[3; 32], &[4; 32]);
        assert!(k.verify(true, 1, (1, 1), &[3; 32], &[4; 32], &p));
        assert!(!other.verify(true, 1, (1, 1), &[3; 32], &[4; 32], &p));
        assert!(!k.verify(false, 1, (1, 1), &[3; 32], &[4; 32], &p), "an agent proof is not a coordinator proof");
        assert!(!k.verify(true, 1, (1, 1), &[3; 32], &[5; 32], &p));
        assert!(!k.verify(true, 2, (1, 1), &[3; 32], &[4; 32], &p));
        assert!(!k.verify(true, 1, (1, 2), &[3; 32], &[4; 32], &p), "the offered range is bound");
    }

    #[test]
    fn sealed_frames_open_in_order_only() {
        let (mut s, mut o) = pair();
        let m0 = Message::Ping(Ping { seq: 0, sent_ns: 0 });
        let m1 = Message::Ping(Ping { seq: 1, sent_ns: 1 });
        let f0 = s.seal(&m0);
        let f1 = s.seal(&m1);
        assert_eq!(o.open(&f1), Err(OpenError::Sequence { got: 1, expected: 0 }));
        assert_eq!(o.open(&f0).unwrap(), m0);
        assert_eq!(o.open(&f0), Err(OpenError::Sequence { got: 0, expected: 1 }), "replay refused");
        assert_eq!(o.open(&f1).unwrap(), m1);
    }

    #[test]
    fn tampering_and_reflection_are_refused() {
        let (mut s, mut o) = pair();
        let mut f = s.seal(&Message::Ping(Ping { seq: 9, sent_ns: 9 }));
        f[9] ^= 1;
        assert_eq!(o.open(&f), Err(OpenError::BadMac));
        assert_eq!(o.open(&f[..10]), Err(OpenError::Short(10)));
        let k = Key::new(b"0123456789abcdef0123456789abcdef").unwrap().session(1, (1, 1), &[1; 32], &[2; 32]);
        let mut back = Opener::new(k, Direction::ToCoordinator);
        let (mut s2, _) = pair();
        assert_eq!(back.open(&s2.seal(&Message::Ping(Ping { seq: 0, sent_ns: 0 }))), Err(OpenError::BadMac));
    }
}
