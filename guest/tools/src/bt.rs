//! The BitTorrent eval's I/O-free core (`stasis-bt`): the deterministic
//! payload, SHA-1, the single-file `.torrent` (bencode) and its info-hash,
//! and parsers for what the swarm's programs print (Enhanced CTorrent's
//! status line, opentracker's scrape reply).
//!
//! The payload is made twice from the same seed: on the host at image-build
//! time (to write the `.torrent`, the tracker's whitelist and the expected
//! digest) and in the seeder guest at boot — so the image carries a few
//! hundred bytes instead of the payload.

/// Byte `8·i .. 8·i+8` of the payload of `seed`: splitmix64 of the block
/// index, so any range can be made without the bytes before it.
fn block(seed: u64, i: u64) -> [u8; 8] {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the payload bytes of `seed` starting at byte `offset`.
pub fn payload_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut out = 0;
    while out < buf.len() {
        let b = block(seed, pos / 8);
        let from = (pos % 8) as usize;
        let n = (8 - from).min(buf.len() - out);
        buf[out..out + n].copy_from_slice(&b[from..from + n]);
        out += n;
        pos += n as u64;
    }
}

/// Streaming SHA-1 (FIPS 180-4). BitTorrent names pieces and torrents by it;
/// here it is an integrity check, not a security boundary.
#[derive(Clone)]
pub struct Sha1 {
    h: [u32; 5],
    buf: [u8; 64],
    used: usize,
    len: u64,
}

impl Default for Sha1 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha1 {
    /// The initial state.
    pub fn new() -> Sha1 {
        Sha1 { h: [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0], buf: [0; 64], used: 0, len: 0 }
    }

    fn compress(h: &mut [u32; 5], block: &[u8]) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = *h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.used > 0 {
            let n = (64 - self.used).min(data.len());
            self.buf[self.used..self.used + n].copy_from_slice(&data[..n]);
            self.used += n;
            data = &data[n..];
            if self.used < 64 {
                return;
            }
            let b = self.buf;
            Self::compress(&mut self.h, &b);
            self.used = 0;
        }
        let mut chunks = data.chunks_exact(64);
        for c in &mut chunks {
            Self::compress(&mut self.h, c);
        }
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.used = rest.len();
    }

    /// The digest.
    pub fn finish(mut self) -> [u8; 20] {
        let bits = self.len.wrapping_mul(8);
        self.update(&[0x80]);
        while self.used != 56 {
            self.update(&[0]);
        }
        self.update(&bits.to_be_bytes());
        let mut out = [0u8; 20];
        for (i, v) in self.h.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// SHA-1 of `data` in one call.
    pub fn digest(data: &[u8]) -> [u8; 20] {
        let mut s = Sha1::new();
        s.update(data);
        s.finish()
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses 40 hex digits.
pub fn unhex20(s: &str) -> Option<[u8; 20]> {
    if s.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A single-file torrent of the payload of `seed`.
#[derive(Debug, Clone)]
pub struct Torrent {
    /// The bencoded metainfo file.
    pub bytes: Vec<u8>,
    /// SHA-1 of the bencoded `info` dictionary: the swarm's name.
    pub info_hash: [u8; 20],
    /// SHA-1 of the whole payload (what a leecher checks at the end).
    pub file_sha1: [u8; 20],
    /// Number of pieces.
    pub pieces: u64,
}

fn bstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(format!("{}:", s.len()).as_bytes());
    out.extend_from_slice(s);
}

/// Makes the metainfo of the `size`-byte payload of `seed`, named `name`,
/// announced to `announce`, with `piece_len`-byte pieces and the BEP 27
/// `private` flag (clients then use the tracker only: no DHT, no PEX). Keys
/// are written in sorted order, as bencode requires.
pub fn make_torrent(seed: u64, size: u64, piece_len: u64, name: &str, announce: &str) -> Torrent {
    let piece_len = piece_len.max(1);
    let mut pieces = Vec::new();
    let mut whole = Sha1::new();
    let mut buf = vec![0u8; piece_len as usize];
    let mut off = 0;
    let mut n = 0;
    while off < size {
        let len = piece_len.min(size - off) as usize;
        payload_fill(seed, off, &mut buf[..len]);
        pieces.extend_from_slice(&Sha1::digest(&buf[..len]));
        whole.update(&buf[..len]);
        off += len as u64;
        n += 1;
    }
    let mut info = b"d".to_vec();
    bstr(&mut info, b"length");
    info.extend_from_slice(format!("i{size}e").as_bytes());
    bstr(&mut info, b"name");
    bstr(&mut info, name.as_bytes());
    bstr(&mut info, b"piece length");
    info.extend_from_slice(format!("i{piece_len}e").as_bytes());
    bstr(&mut info, b"pieces");
    bstr(&mut info, &pieces);
    bstr(&mut info, b"private");
    info.extend_from_slice(b"i1e");
    info.push(b'e');
    let mut bytes = b"d".to_vec();
    bstr(&mut bytes, b"announce");
    bstr(&mut bytes, announce.as_bytes());
    bstr(&mut bytes, b"info");
    bytes.extend_from_slice(&info);
    bytes.push(b'e');
    Torrent { bytes, info_hash: Sha1::digest(&info), file_sha1: whole.finish(), pieces: n }
}

/// Enhanced CTorrent's status line, e.g.
/// `| 0/2/3 [12/128/128] 3MB,0MB | 250,0K/s | 250,0K E:0,0`:
/// the numbers in brackets are pieces had / total / available in the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Pieces this client has (verified).
    pub have: u64,
    /// Pieces in the torrent.
    pub total: u64,
    /// Pieces available from connected peers.
    pub avail: u64,
}

/// Parses one status line (any text around the bracket is ignored).
pub fn parse_status(line: &str) -> Option<Status> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let mut it = line[open + 1..close].split('/').map(|x| x.trim().parse::<u64>());
    let (have, total, avail) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
    if it.next().is_some() || total == 0 || have > total {
        return None;
    }
    Some(Status { have, total, avail })
}

/// Bytes of the payload a client holding `have` of `total` pieces has, at
/// most `size` (the last piece may be short; which pieces are held is not
/// known, so a short last piece counts as full until the end).
pub fn bytes_done(have: u64, total: u64, piece_len: u64, size: u64) -> u64 {
    if have >= total {
        size
    } else {
        (have * piece_len).min(size)
    }
}

/// `%xx` for every byte (a scrape or announce URL's `info_hash`).
pub fn url_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("%{x:02X}")).collect()
}

/// The `complete` count (seeders) in a tracker's scrape reply (HTTP response
/// with a bencoded body); `None` if it is not there.
pub fn scrape_complete(reply: &[u8]) -> Option<u64> {
    let key = b"8:completei";
    let at = reply.windows(key.len()).position(|w| w == key)? + key.len();
    let end = at + reply[at..].iter().position(|&c| c == b'e')?;
    std::str::from_utf8(&reply[at..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(hex(&Sha1::digest(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(hex(&Sha1::digest(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(
            hex(&Sha1::digest(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // A million 'a' fed in uneven chunks exercises the buffering.
        let mut s = Sha1::new();
        let a = vec![b'a'; 1000];
        for i in 0..1000 {
            s.update(&a[..(i % 7) + 1]);
            s.update(&a[(i % 7) + 1..]);
        }
        assert_eq!(hex(&s.finish()), "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
    }

    #[test]
    fn payload_is_addressable_and_seeded() {
        let mut whole = vec![0u8; 1000];
        payload_fill(7, 0, &mut whole);
        let mut part = vec![0u8; 333];
        payload_fill(7, 501, &mut part);
        assert_eq!(&whole[501..834], &part[..]);
        let mut other = vec![0u8; 1000];
        payload_fill(8, 0, &mut other);
        assert_ne!(whole, other);
        // Not degenerate: roughly uniform bytes.
        let ones: u32 = whole.iter().map(|b| b.count_ones()).sum();
        assert!((3600..4400).contains(&ones), "{ones} one bits of 8000");
    }

    #[test]
    fn torrent_is_bencoded_with_sorted_keys_and_hashes_pieces() {
        let t = make_torrent(1, 100_000, 32768, "p.bin", "http://10.0.1.1:6969/announce");
        assert_eq!(t.pieces, 4);
        let s = String::from_utf8_lossy(&t.bytes);
        assert!(s.starts_with("d8:announce29:http://10.0.1.1:6969/announce4:infod6:lengthi100000e4:name5:p.bin12:piece lengthi32768e6:pieces80:"), "{s}");
        assert!(t.bytes.ends_with(b"7:privatei1eee"));
        let info_at = t.bytes.windows(6).position(|w| w == b"4:info").unwrap() + 6;
        assert_eq!(Sha1::digest(&t.bytes[info_at..t.bytes.len() - 1]), t.info_hash);
        let mut data = vec![0u8; 100_000];
        payload_fill(1, 0, &mut data);
        assert_eq!(Sha1::digest(&data), t.file_sha1);
        let pieces_at = t.bytes.windows(10).position(|w| w == b"6:pieces80").unwrap() + 11;
        assert_eq!(&t.bytes[pieces_at + 60..pieces_at + 80], &Sha1::digest(&data[98304..]));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status("| 0/2/3 [12/128/100] 3MB,0MB | 250,0K/s | 250,0K E:0,0"),
            Some(Status { have: 12, total: 128, avail: 100 })
        );
        assert_eq!(
            parse_status("- 0/0/1 [0/32/0] 0MB,0MB | 0,0K/s | 0,0K E:0,0 Connecting"),
            Some(Status { have: 0, total: 32, avail: 0 })
        );
        assert_eq!(parse_status("Creating file \"payload.bin\""), None);
        assert_eq!(parse_status("x [5/4/4]"), None);
        assert_eq!(parse_status("x [1/0/0]"), None);
        assert_eq!(parse_status("x [1/2]"), None);
        assert_eq!(bytes_done(3, 4, 32768, 100_000), 98304);
        assert_eq!(bytes_done(4, 4, 32768, 100_000), 100_000);
    }

    #[test]
    fn scrape_and_hex() {
        let r =
            b"HTTP/1.0 200 OK\r\n\r\nd5:filesd20:xxxxxxxxxxxxxxxxxxxxd8:completei1e10:downloadedi0e10:incompletei2eeee";
        assert_eq!(scrape_complete(r), Some(1));
        assert_eq!(scrape_complete(b"d5:filesdee"), None);
        assert_eq!(url_encode(&[0x0a, 0xff]), "%0A%FF");
        let h = Sha1::digest(b"abc");
        assert_eq!(unhex20(&hex(&h)), Some(h));
        assert_eq!(unhex20("zz"), None);
    }
}
