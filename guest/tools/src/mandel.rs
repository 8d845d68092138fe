//! The distributed Mandelbrot job of the demo (`stasis-mandel`): the pixel
//! function, the master's band bookkeeping, the master/worker wire messages
//! and the console format of the finished image — all I/O-free.
//!
//! Determinism: a pixel is a pure function of its coordinates and the job's
//! parameters, computed with IEEE-754 `f64` additions and multiplications
//! only (no fused multiply-add, no transcendental functions), so every
//! machine — and every restored incarnation — produces the same bytes. The
//! image lives only in the master's memory until the job is done, so a
//! checkpoint holds the job's whole progress.
//!
//! Wire (TCP, little-endian `u32`s):
//! - worker → master: `[band][len]` + `len` bytes of pixels; the first
//!   message of a connection is `[NO_BAND][0]` ("ready").
//! - master → worker: `[band][y0][rows][width][height][max_iter]`; `band ==
//!   NO_BAND` means "the job is done, exit".
//!
//! Console (one JSON object per line, see `docs/demo.md`):
//! - `{"tool":"mandel","role":"master","node","bands_done","bands","workers","mono_ns"}`
//! - `{"tool":"mandel","role":"image","line","lines","data"}` (base64 of
//!   [`IMAGE_LINE_BYTES`] raw pixels, row-major, one byte per pixel)
//! - `{"tool":"mandel","role":"done","node","width","height","max_iter","bytes","crc32","lines","mono_ns"}`

use crate::json::JsonLine;

/// "No band": a worker's first message, or the master's "done".
pub const NO_BAND: u32 = u32::MAX;
/// Raw pixel bytes per console image line (4096 base64 characters).
pub const IMAGE_LINE_BYTES: usize = 3072;
/// Largest image side accepted.
pub const MAX_SIDE: u32 = 8192;

/// The region of the complex plane drawn: real axis.
const RE: (f64, f64) = (-2.2, 0.8);
/// Imaginary axis.
const IM: (f64, f64) = (-1.2, 1.2);

/// What the master was asked to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Iteration limit per pixel.
    pub max_iter: u32,
    /// Rows per band (the unit of work).
    pub band_rows: u32,
}

/// Why parameters or a message were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MandelError {
    /// A parameter out of range.
    BadParams(&'static str),
    /// A result for a band that does not exist.
    UnknownBand(u32),
    /// A result whose length is not the band's pixel count.
    BadLength {
        /// The band.
        band: u32,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// Text that is not base64.
    BadBase64,
}

impl std::fmt::Display for MandelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MandelError::BadParams(what) => write!(f, "bad parameters: {what}"),
            MandelError::UnknownBand(b) => write!(f, "result for unknown band {b}"),
            MandelError::BadLength { band, expected, got } => {
                write!(f, "band {band}: {got} bytes, expected {expected}")
            }
            MandelError::BadBase64 => write!(f, "not base64"),
        }
    }
}

impl std::error::Error for MandelError {}

impl Params {
    /// Checks the ranges.
    pub fn checked(self) -> Result<Params, MandelError> {
        if self.width == 0 || self.width > MAX_SIDE || self.height == 0 || self.height > MAX_SIDE {
            return Err(MandelError::BadParams("width and height must be 1..=8192"));
        }
        if self.max_iter == 0 || self.max_iter > 1 << 20 {
            return Err(MandelError::BadParams("max-iter must be 1..=1048576"));
        }
        if self.band_rows == 0 {
            return Err(MandelError::BadParams("band-rows must be at least 1"));
        }
        Ok(self)
    }

    /// Number of bands.
    pub fn bands(&self) -> u32 {
        self.height.div_ceil(self.band_rows)
    }

    /// The task of band `band`.
    pub fn task(&self, band: u32) -> Task {
        let y0 = band * self.band_rows;
        Task {
            band,
            y0,
            rows: self.band_rows.min(self.height - y0),
            width: self.width,
            height: self.height,
            max_iter: self.max_iter,
        }
    }
}

/// One unit of work as sent to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    /// Band number.
    pub band: u32,
    /// First row.
    pub y0: u32,
    /// Rows in the band.
    pub rows: u32,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Iteration limit.
    pub max_iter: u32,
}

impl Task {
    /// The "done" message.
    pub const DONE: Task = Task { band: NO_BAND, y0: 0, rows: 0, width: 0, height: 0, max_iter: 0 };

    /// Wire form.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        for (i, v) in [self.band, self.y0, self.rows, self.width, self.height, self.max_iter].into_iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// From wire form; refuses a task that is not a well-formed band.
    pub fn decode(b: &[u8; 24]) -> Result<Task, MandelError> {
        let v = |i: usize| u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        let t = Task { band: v(0), y0: v(1), rows: v(2), width: v(3), height: v(4), max_iter: v(5) };
        if t.band != NO_BAND
            && (t.width == 0
                || t.width > MAX_SIDE
                || t.height > MAX_SIDE
                || t.rows == 0
                || t.y0.checked_add(t.rows).is_none_or(|end| end > t.height))
        {
            return Err(MandelError::BadParams("task outside the image"));
        }
        Ok(t)
    }

    /// The band's pixels, row-major.
    pub fn compute(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.width as usize * self.rows as usize);
        for y in self.y0..self.y0 + self.rows {
            for x in 0..self.width {
                out.push(pixel(x, y, self.width, self.height, self.max_iter));
            }
        }
        out
    }
}

/// Escape-time value of pixel (x, y): 0 inside the set (`max_iter` reached),
/// else `1 + min(254, ⌊√(64·n)⌋)` for the `n` iterations needed to escape
/// (integers only: the colours do not depend on `max_iter`).
pub fn pixel(x: u32, y: u32, width: u32, height: u32, max_iter: u32) -> u8 {
    let cr = RE.0 + (x as f64 + 0.5) * ((RE.1 - RE.0) / width as f64);
    let ci = IM.1 - (y as f64 + 0.5) * ((IM.1 - IM.0) / height as f64);
    let (mut zr, mut zi) = (0.0f64, 0.0f64);
    let mut n = 0;
    while n < max_iter {
        let (zr2, zi2) = (zr * zr, zi * zi);
        if zr2 + zi2 > 4.0 {
            break;
        }
        zi = 2.0 * zr * zi + ci;
        zr = zr2 - zi2 + cr;
        n += 1;
    }
    if n == max_iter {
        0
    } else {
        1 + isqrt(64 * n as u64).min(254) as u8
    }
}

/// Integer square root (floor), exact.
fn isqrt(v: u64) -> u64 {
    let mut r = (v as f64).sqrt() as u64;
    while r * r > v {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= v {
        r += 1;
    }
    r
}

/// Where a band stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BandState {
    Pending,
    /// Handed to the worker connection with this id.
    Assigned(u64),
    Done,
}

/// The master's job: which band is where, and the image.
#[derive(Debug, Clone)]
pub struct Job {
    params: Params,
    bands: Vec<BandState>,
    done: u32,
    image: Vec<u8>,
}

impl Job {
    /// A job with every band pending.
    pub fn new(params: Params) -> Result<Job, MandelError> {
        let params = params.checked()?;
        Ok(Job {
            params,
            bands: vec![BandState::Pending; params.bands() as usize],
            done: 0,
            image: vec![0; params.width as usize * params.height as usize],
        })
    }

    /// The parameters.
    pub fn params(&self) -> Params {
        self.params
    }

    /// The lowest pending band, now assigned to connection `conn`.
    pub fn next_task(&mut self, conn: u64) -> Option<Task> {
        let i = self.bands.iter().position(|b| *b == BandState::Pending)?;
        self.bands[i] = BandState::Assigned(conn);
        Some(self.params.task(i as u32))
    }

    /// Stores a band's pixels (a repeated result is ignored). Returns
    /// whether it was new.
    pub fn complete(&mut self, band: u32, pixels: &[u8]) -> Result<bool, MandelError> {
        let state = self.bands.get_mut(band as usize).ok_or(MandelError::UnknownBand(band))?;
        let task = self.params.task(band);
        let expected = task.rows as usize * task.width as usize;
        if pixels.len() != expected {
            return Err(MandelError::BadLength { band, expected, got: pixels.len() });
        }
        if *state == BandState::Done {
            return Ok(false);
        }
        *state = BandState::Done;
        self.done += 1;
        let start = task.y0 as usize * task.width as usize;
        self.image[start..start + expected].copy_from_slice(pixels);
        Ok(true)
    }

    /// Connection `conn` is gone: its unfinished bands become pending again.
    pub fn lost(&mut self, conn: u64) {
        for b in &mut self.bands {
            if *b == BandState::Assigned(conn) {
                *b = BandState::Pending;
            }
        }
    }

    /// Bands finished.
    pub fn bands_done(&self) -> u32 {
        self.done
    }

    /// Whether every band is finished.
    pub fn is_done(&self) -> bool {
        self.done as usize == self.bands.len()
    }

    /// The image (complete once [`Job::is_done`]).
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

/// The master's progress line.
pub fn master_line(node: &str, done: u32, bands: u32, workers: u32, mono_ns: u64) -> JsonLine {
    JsonLine::new()
        .str("tool", "mandel")
        .str("role", "master")
        .str("node", node)
        .u64("bands_done", done.into())
        .u64("bands", bands.into())
        .u64("workers", workers.into())
        .u64("mono_ns", mono_ns)
}

/// The image as console lines: numbered base64 chunks, then the "done" line.
pub fn image_lines(node: &str, p: &Params, image: &[u8], mono_ns: u64) -> Vec<String> {
    let chunks: Vec<&[u8]> = image.chunks(IMAGE_LINE_BYTES).collect();
    let n = chunks.len() as u64;
    let mut out: Vec<String> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            JsonLine::new()
                .str("tool", "mandel")
                .str("role", "image")
                .u64("line", i as u64)
                .u64("lines", n)
                .str("data", &base64_encode(c))
                .finish()
        })
        .collect();
    out.push(
        JsonLine::new()
            .str("tool", "mandel")
            .str("role", "done")
            .str("node", node)
            .u64("width", p.width.into())
            .u64("height", p.height.into())
            .u64("max_iter", p.max_iter.into())
            .u64("bytes", image.len() as u64)
            .str("crc32", &format!("{:08x}", crc32(image)))
            .u64("lines", n)
            .u64("mono_ns", mono_ns)
            .finish(),
    );
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes standard base64 with padding.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, MandelError> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return Err(MandelError::BadBase64);
    }
    let val = |c: u8| -> Result<u32, MandelError> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(MandelError::BadBase64),
        } as u32)
    };
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (k, q) in b.chunks(4).enumerate() {
        let last = k == b.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(MandelError::BadBase64);
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

/// CRC-32 (IEEE 802.3, the zlib/PNG one).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { crc >> 1 ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(w: u32, h: u32, rows: u32) -> Params {
        Params { width: w, height: h, max_iter: 64, band_rows: rows }
    }

    #[test]
    fn pixels_are_the_set() {
        // The origin is inside, far points escape at once.
        let (w, h) = (300, 240);
        let x0 = ((0.0 - RE.0) / (RE.1 - RE.0) * w as f64) as u32;
        let y0 = h / 2;
        assert_eq!(pixel(x0, y0, w, h, 100), 0);
        assert!(pixel(0, 0, w, h, 100) > 0);
        assert_eq!(pixel(0, 0, w, h, 100), pixel(0, 0, w, h, 100));
        for v in [0u64, 1, 3, 4, 63, 64, 65, 1 << 40, (1 << 40) - 1] {
            let r = isqrt(v);
            assert!(r * r <= v && (r + 1) * (r + 1) > v, "{v}");
        }
    }

    #[test]
    fn bands_cover_the_image_once_whatever_the_order() {
        let p = params(37, 23, 5);
        assert_eq!(p.bands(), 5);
        assert_eq!(p.task(4).rows, 3);
        let mut job = Job::new(p).unwrap();
        let mut tasks = Vec::new();
        while let Some(t) = job.next_task(1) {
            tasks.push(t);
        }
        assert_eq!(tasks.len(), 5);
        for t in tasks.iter().rev() {
            assert!(job.complete(t.band, &t.compute()).unwrap());
        }
        assert!(job.is_done());
        let whole = Task { band: 0, y0: 0, rows: 23, width: 37, height: 23, max_iter: 64 }.compute();
        assert_eq!(job.image(), &whole[..]);
    }

    #[test]
    fn a_lost_connection_gives_its_bands_back() {
        let mut job = Job::new(params(10, 10, 2)).unwrap();
        let a = job.next_task(1).unwrap();
        let b = job.next_task(2).unwrap();
        job.lost(1);
        // The lowest pending band is a's again; b's stays with connection 2.
        assert_eq!(job.next_task(3).unwrap().band, a.band);
        assert_eq!(job.next_task(3).unwrap().band, 2);
        assert!(job.complete(b.band, &b.compute()).unwrap());
        // A late duplicate is harmless.
        assert!(!job.complete(b.band, &b.compute()).unwrap());
        assert_eq!(job.bands_done(), 1);
    }

    #[test]
    fn refusals() {
        assert!(Job::new(params(0, 10, 1)).is_err());
        assert!(Job::new(params(10, 10, 0)).is_err());
        let mut job = Job::new(params(10, 10, 2)).unwrap();
        assert_eq!(job.complete(9, &[0; 20]), Err(MandelError::UnknownBand(9)));
        assert_eq!(job.complete(0, &[0; 3]), Err(MandelError::BadLength { band: 0, expected: 20, got: 3 }));
        let mut bad = params(10, 10, 4).task(2).encode();
        bad[8] = 9; // rows = 9 from y0 = 8: past the end
        assert!(Task::decode(&bad).is_err());
    }

    #[test]
    fn task_wire_roundtrip() {
        let t = params(640, 480, 8).task(59);
        assert_eq!(Task::decode(&t.encode()).unwrap(), t);
        assert_eq!(Task::decode(&Task::DONE.encode()).unwrap(), Task::DONE);
    }

    #[test]
    fn base64_and_crc() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("Zm8").is_err());
        assert!(base64_decode("Z=8=").is_err());
        assert!(base64_decode("Zm8=Zm8=").is_err());
        assert!(base64_decode("Zm*=").is_err());
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn image_lines_carry_the_image() {
        let p = params(100, 70, 7);
        let img: Vec<u8> = (0..7000u32).map(|i| (i * 7) as u8).collect();
        let lines = image_lines("nodea", &p, &img, 5);
        assert_eq!(lines.len(), 3 + 1);
        let mut back = Vec::new();
        for l in &lines[..3] {
            let v: serde_json::Value = serde_json::from_str(l.trim_end()).unwrap();
            back.extend(base64_decode(v["data"].as_str().unwrap()).unwrap());
        }
        assert_eq!(back, img);
        let done: serde_json::Value = serde_json::from_str(lines[3].trim_end()).unwrap();
        assert_eq!(done["role"], "done");
        assert_eq!(done["crc32"], format!("{:08x}", crc32(&img)));
    }
}
