//! The flagship demo's host side, I/O-free: reading the Mandelbrot job's
//! console lines (progress, the image), the reference image computed on the
//! host, the PNG, and the time-lost arithmetic. The driver is
//! `src/bin/stasis-demo.rs`; `docs/demo.md` tells the story.

use serde_json::Value;
use stasis_guest_tools::mandel::{base64_decode, crc32, Params, Task};

/// Why a console did not yield the image, or a PNG could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No `done` line yet.
    #[error("the master printed no \"done\" line")]
    NotDone,
    /// An image line is missing, repeated inconsistently, or out of range.
    #[error("image line {0} is missing or malformed")]
    BadLine(u64),
    /// The decoded bytes do not match the `done` line.
    #[error("decoded image: {what}: console says {said}, decoded {got}")]
    Mismatch { what: &'static str, said: String, got: String },
    /// PNG encoding failed.
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
}

/// The image as the master printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub max_iter: u32,
    /// One byte per pixel, row-major.
    pub pixels: Vec<u8>,
    /// CRC-32 the guest computed (checked against `pixels`).
    pub crc32: u32,
}

impl Image {
    /// BLAKE3 of the raw pixels, hex.
    pub fn digest(&self) -> String {
        blake3::hash(&self.pixels).to_hex().to_string()
    }
}

/// The `"tool":"mandel"` objects of a console, in order (serial logs may
/// carry junk before a line's `{`).
pub fn mandel_lines(console: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(console)
        .lines()
        .filter_map(|l| {
            let l = l.trim_matches(|c: char| c.is_control() || c.is_whitespace());
            let v: Value = serde_json::from_str(&l[l.find('{')?..]).ok()?;
            (v["tool"] == "mandel").then_some(v)
        })
        .collect()
}

/// `(bands_done, bands)` of each master progress line, in order.
pub fn progress(lines: &[Value]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|v| v["role"] == "master")
        .filter_map(|v| Some((v["bands_done"].as_u64()?, v["bands"].as_u64()?)))
        .collect()
}

/// Worker (re)connections seen on a console.
pub fn connections(lines: &[Value]) -> usize {
    lines.iter().filter(|v| v["role"] == "worker" && v["event"] == "connected").count()
}

/// Reassembles the image from the console's `image` lines and checks it
/// against the `done` line (size, line count, CRC-32).
pub fn decode_image(lines: &[Value]) -> Result<Image, DemoError> {
    let done = lines.iter().rev().find(|v| v["role"] == "done").ok_or(DemoError::NotDone)?;
    let field = |k: &str| done[k].as_u64().ok_or(DemoError::BadLine(u64::MAX));
    let (n, bytes) = (field("lines")?, field("bytes")?);
    let mut chunks: Vec<Option<Vec<u8>>> = vec![None; n as usize];
    for v in lines.iter().filter(|v| v["role"] == "image") {
        let i = v["line"].as_u64().ok_or(DemoError::BadLine(u64::MAX))?;
        let slot = chunks.get_mut(i as usize).ok_or(DemoError::BadLine(i))?;
        let data = v["data"].as_str().ok_or(DemoError::BadLine(i))?;
        // A restored master may print a line again; keep the last copy.
        *slot = Some(base64_decode(data).map_err(|_| DemoError::BadLine(i))?);
    }
    let mut pixels = Vec::with_capacity(bytes as usize);
    for (i, c) in chunks.into_iter().enumerate() {
        pixels.extend(c.ok_or(DemoError::BadLine(i as u64))?);
    }
    if pixels.len() as u64 != bytes {
        return Err(DemoError::Mismatch { what: "bytes", said: bytes.to_string(), got: pixels.len().to_string() });
    }
    let said = done["crc32"].as_str().unwrap_or("").to_string();
    let got = format!("{:08x}", crc32(&pixels));
    if said != got {
        return Err(DemoError::Mismatch { what: "crc32", said, got });
    }
    let img = Image {
        width: field("width")? as u32,
        height: field("height")? as u32,
        max_iter: field("max_iter")? as u32,
        crc32: crc32(&pixels),
        pixels,
    };
    if img.width as u64 * img.height as u64 != bytes {
        return Err(DemoError::Mismatch {
            what: "width × height",
            said: bytes.to_string(),
            got: format!("{}×{}", img.width, img.height),
        });
    }
    Ok(img)
}

/// The image the job must produce, computed on the host with the guest's
/// own pixel function.
pub fn host_reference(p: &Params) -> Image {
    let whole = Task { band: 0, y0: 0, rows: p.height, width: p.width, height: p.height, max_iter: p.max_iter };
    let pixels = whole.compute();
    Image { width: p.width, height: p.height, max_iter: p.max_iter, crc32: crc32(&pixels), pixels }
}

/// The palette: black inside the set, then deep blue → white → orange →
/// dark as the escape value grows (integer stops: same bytes everywhere).
pub fn palette() -> Vec<u8> {
    const STOPS: [(u32, [u32; 3]); 5] =
        [(1, [0, 7, 100]), (48, [32, 107, 203]), (110, [237, 255, 255]), (180, [255, 170, 0]), (255, [60, 10, 0])];
    let mut pal = vec![0u8; 3];
    for i in 1..=255u32 {
        let k = STOPS.windows(2).position(|w| i <= w[1].0).unwrap_or(STOPS.len() - 2);
        let ((a, ca), (b, cb)) = (STOPS[k], STOPS[k + 1]);
        let t = (i.max(a) - a, b - a);
        for c in 0..3 {
            pal.push(((ca[c] * (t.1 - t.0) + cb[c] * t.0) / t.1) as u8);
        }
    }
    pal
}

/// The image as an indexed-colour PNG (deterministic bytes for equal pixels).
pub fn png(img: &Image) -> Result<Vec<u8>, DemoError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette());
        let mut w = enc.write_header()?;
        w.write_image_data(&img.pixels)?;
        w.finish()?;
    }
    Ok(out)
}

/// What a failure cost, with stasis and without it (seconds).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TimeLost {
    /// The failure-free run, `stasis up` to the image.
    pub reference_s: f64,
    /// The run with checkpoints, a failure and a restore, `stasis up` to the image.
    pub with_stasis_s: f64,
    /// From `stasis up` to the kill in that run.
    pub until_kill_s: f64,
    /// `with_stasis_s − reference_s`.
    pub lost_with_stasis_s: f64,
    /// Restarting from scratch at the kill: `until_kill_s + reference_s`.
    pub from_scratch_s: f64,
    /// `from_scratch_s − reference_s` (= `until_kill_s`).
    pub lost_from_scratch_s: f64,
}

impl TimeLost {
    /// From the three measured durations.
    pub fn new(reference_s: f64, with_stasis_s: f64, until_kill_s: f64) -> TimeLost {
        TimeLost {
            reference_s,
            with_stasis_s,
            until_kill_s,
            lost_with_stasis_s: with_stasis_s - reference_s,
            from_scratch_s: until_kill_s + reference_s,
            lost_from_scratch_s: until_kill_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_guest_tools::mandel::image_lines;

    fn params() -> Params {
        Params { width: 90, height: 70, max_iter: 50, band_rows: 8 }
    }

    fn console(p: &Params, img: &[u8]) -> Vec<u8> {
        let mut text = String::from("\u{1b}[0mjunk\r\n{\"tool\":\"probe\"}\n");
        text.push_str("{\"tool\":\"mandel\",\"role\":\"master\",\"bands_done\":3,\"bands\":9}\n");
        for (i, l) in image_lines("nodea", p, img, 1).iter().enumerate() {
            if i == 1 {
                text.push_str("firmware noise ");
            }
            text.push_str(l);
        }
        text.into_bytes()
    }

    #[test]
    fn the_console_image_is_the_host_reference() {
        let p = params();
        let reference = host_reference(&p);
        let lines = mandel_lines(&console(&p, &reference.pixels));
        assert_eq!(progress(&lines), [(3, 9)]);
        let img = decode_image(&lines).unwrap();
        assert_eq!(img, reference);
        assert_eq!(img.digest(), reference.digest());
        assert_eq!(png(&img).unwrap(), png(&reference).unwrap());
    }

    #[test]
    fn damaged_consoles_are_refused() {
        let p = params();
        let good = host_reference(&p).pixels;
        assert!(matches!(decode_image(&[]), Err(DemoError::NotDone)));
        // One pixel differs from what the CRC covers.
        let mut lines = mandel_lines(&console(&p, &good));
        let mut other = good.clone();
        other[5] ^= 1;
        let bad = mandel_lines(&console(&p, &other));
        lines[1] = bad[1].clone();
        assert!(
            matches!(decode_image(&lines), Err(DemoError::Mismatch { what: "crc32", .. })),
            "{:?}",
            decode_image(&lines)
        );
        // A missing line.
        let mut lines = mandel_lines(&console(&p, &good));
        lines.remove(2);
        assert!(matches!(decode_image(&lines), Err(DemoError::BadLine(1))));
    }

    #[test]
    fn png_is_indexed_and_decodes_back() {
        let img = host_reference(&params());
        let bytes = png(&img).unwrap();
        let dec = png::Decoder::new(&bytes[..]);
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height, info.color_type), (90, 70, png::ColorType::Indexed));
        assert_eq!(&buf[..info.buffer_size()], &img.pixels[..]);
        let pal = palette();
        assert_eq!(pal.len(), 768);
        assert_eq!(&pal[..3], &[0, 0, 0]);
    }

    #[test]
    fn time_lost() {
        let t = TimeLost::new(100.0, 130.0, 60.0);
        assert_eq!(t.lost_with_stasis_s, 30.0);
        assert_eq!(t.from_scratch_s, 160.0);
        assert_eq!(t.lost_from_scratch_s, 60.0);
    }
}
