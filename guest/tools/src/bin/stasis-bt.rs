//! `stasis-bt gen|torrent|seed|leech ...`: the BitTorrent eval's guest side.
//! The swarm itself is real programs (Enhanced CTorrent, opentracker); this
//! makes the payload and the metainfo (the same bytes on the host at image
//! build time and in the seeder at boot), runs the client, turns its status
//! line into JSON progress lines on the guest's CLOCK_MONOTONIC and checks
//! the completed file's SHA-1 (see `docs/eval-bt.md`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stasis_guest_tools::args::{ArgsError, Flags};
use stasis_guest_tools::bt::{self, Sha1};
use stasis_guest_tools::clocks::{default_node, mono_ns};
use stasis_guest_tools::json::JsonLine;

const USAGE: &str = "usage:
  stasis-bt gen --seed S --size BYTES --out FILE
  stasis-bt torrent --seed S --size BYTES --piece-kib K --name NAME --announce URL --out FILE.torrent
            (prints {\"info_hash\",\"sha1\",\"size\",\"pieces\"})
  stasis-bt seed --seed S --size BYTES --out FILE --torrent T [--port 6881] [--node NAME]
  stasis-bt leech --torrent T --out FILE --sha1 HEX --size BYTES --piece-kib K
            --tracker IP:PORT --info-hash HEX [--port 6881] [--node NAME]
  (CTorrent is run as `ctorrent`, found on PATH)";

const DONE_MARK: &str = "STASIS-BT-COMPLETE";

fn fail(msg: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("stasis-bt: {msg}");
    std::process::exit(code);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_default();
    let result = match sub.as_str() {
        "gen" => parse_gen(args).map(run_gen),
        "torrent" => parse_torrent(args).map(run_torrent),
        "seed" => parse_seed(args).map(run_seed),
        "leech" => parse_leech(args).map(run_leech),
        _ => fail(USAGE, 2),
    };
    match result {
        Err(e) => fail(format_args!("{e}\n{USAGE}"), 2),
        Ok(Err(e)) => fail(e, 1),
        Ok(Ok(())) => {}
    }
}

fn req<T: std::str::FromStr>(f: &Flags, flag: &'static str) -> Result<T, ArgsError> {
    f.opt(flag)?.ok_or(ArgsError::Required(flag))
}

// ---------------------------------------------------------------- gen

struct GenOpts {
    seed: u64,
    size: u64,
    out: String,
}

fn parse_gen(args: impl Iterator<Item = String>) -> Result<GenOpts, ArgsError> {
    let f = Flags::parse(args, &["--seed", "--size", "--out"])?;
    Ok(GenOpts { seed: req(&f, "--seed")?, size: req(&f, "--size")?, out: req(&f, "--out")? })
}

fn write_payload(seed: u64, size: u64, path: &str) -> io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (buf.len() as u64).min(size - off) as usize;
        bt::payload_fill(seed, off, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_all()
}

fn run_gen(o: GenOpts) -> io::Result<()> {
    write_payload(o.seed, o.size, &o.out)
}

// ---------------------------------------------------------------- torrent

struct TorrentOpts {
    seed: u64,
    size: u64,
    piece_len: u64,
    name: String,
    announce: String,
    out: String,
}

fn parse_torrent(args: impl Iterator<Item = String>) -> Result<TorrentOpts, ArgsError> {
    let f = Flags::parse(args, &["--seed", "--size", "--piece-kib", "--name", "--announce", "--out"])?;
    Ok(TorrentOpts {
        seed: req(&f, "--seed")?,
        size: req(&f, "--size")?,
        piece_len: req::<u64>(&f, "--piece-kib")?.max(1) * 1024,
        name: req(&f, "--name")?,
        announce: req(&f, "--announce")?,
        out: req(&f, "--out")?,
    })
}

fn run_torrent(o: TorrentOpts) -> io::Result<()> {
    let t = bt::make_torrent(o.seed, o.size, o.piece_len, &o.name, &o.announce);
    std::fs::write(&o.out, &t.bytes)?;
    JsonLine::new()
        .str("info_hash", &bt::hex(&t.info_hash))
        .str("sha1", &bt::hex(&t.file_sha1))
        .u64("size", o.size)
        .u64("piece_len", o.piece_len)
        .u64("pieces", t.pieces)
        .emit();
    Ok(())
}

// ---------------------------------------------------------------- seed

struct SeedOpts {
    seed: u64,
    size: u64,
    out: String,
    torrent: String,
    port: u16,
    node: String,
}

fn parse_seed(args: impl Iterator<Item = String>) -> Result<SeedOpts, ArgsError> {
    let f = Flags::parse(args, &["--seed", "--size", "--out", "--torrent", "--port", "--node"])?;
    Ok(SeedOpts {
        seed: req(&f, "--seed")?,
        size: req(&f, "--size")?,
        out: req(&f, "--out")?,
        torrent: req(&f, "--torrent")?,
        port: f.get("--port", 6881)?,
        node: f.get("--node", default_node())?,
    })
}

fn line(node: &str, role: &str, event: &str) -> JsonLine {
    JsonLine::new().str("tool", "bt").str("node", node).str("role", role).str("event", event)
}

/// Runs CTorrent with its stdout on a pseudo-terminal (into a pipe its stdio
/// would buffer the status line for tens of seconds); returns the child and
/// the terminal's master side to read.
fn spawn_ctorrent(args: &[&str]) -> io::Result<(Child, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the given ints; the
    // name, termios and winsize arguments may be null.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by openpty and are owned
    // by nobody else; each File closes its own.
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    let child = Command::new("ctorrent").args(args).stdin(Stdio::null()).stdout(slave).stderr(Stdio::null()).spawn()?;
    Ok((child, master))
}

/// Reads the terminal; `Ok(0)` once the last writer closed it (EIO on Linux).
fn read_pty(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            r => return r,
        }
    }
}

fn run_seed(o: SeedOpts) -> io::Result<()> {
    let t0 = mono_ns();
    write_payload(o.seed, o.size, &o.out)?;
    let t1 = mono_ns();
    // -f: the payload is known good, skip CTorrent's initial hash check.
    let port = o.port.to_string();
    let (mut child, mut out) = spawn_ctorrent(&["-f", "-e", "24", "-p", &port, "-s", &o.out, &o.torrent])?;
    line(&o.node, "seed", "seeding").u64("t_ns", mono_ns()).u64("gen_ns", t1 - t0).u64("size", o.size).emit();
    let mut buf = [0u8; 4096];
    while read_pty(&mut out, &mut buf)? > 0 {}
    let status = child.wait()?;
    line(&o.node, "seed", "exit").u64("t_ns", mono_ns()).str("status", &status.to_string()).emit();
    Ok(())
}

// ---------------------------------------------------------------- leech

struct LeechOpts {
    torrent: String,
    out: String,
    sha1: [u8; 20],
    size: u64,
    piece_len: u64,
    tracker: String,
    info_hash: [u8; 20],
    port: u16,
    node: String,
}

fn parse_leech(args: impl Iterator<Item = String>) -> Result<LeechOpts, ArgsError> {
    let f = Flags::parse(
        args,
        &["--torrent", "--out", "--sha1", "--size", "--piece-kib", "--tracker", "--info-hash", "--port", "--node"],
    )?;
    let hex20 = |flag: &'static str| -> Result<[u8; 20], ArgsError> {
        let v: String = req(&f, flag)?;
        bt::unhex20(&v).ok_or(ArgsError::BadValue { flag: flag.to_string(), value: v })
    };
    Ok(LeechOpts {
        torrent: req(&f, "--torrent")?,
        out: req(&f, "--out")?,
        sha1: hex20("--sha1")?,
        size: req(&f, "--size")?,
        piece_len: req::<u64>(&f, "--piece-kib")?.max(1) * 1024,
        tracker: req(&f, "--tracker")?,
        info_hash: hex20("--info-hash")?,
        port: f.get("--port", 6881)?,
        node: f.get("--node", default_node())?,
    })
}

/// Seeders the tracker knows for the torrent (`None`: no answer).
fn scrape(tracker: &str, info_hash: &[u8; 20]) -> Option<u64> {
    let addr = tracker.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET /scrape?info_hash={} HTTP/1.0\r\nHost: {tracker}\r\n\r\n", bt::url_encode(info_hash));
    s.write_all(req.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    bt::scrape_complete(&reply)
}

fn file_sha1(path: &str) -> io::Result<[u8; 20]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

fn run_leech(o: LeechOpts) -> io::Result<()> {
    // Start only once the tracker lists the seeder: every leecher's clock then
    // starts against a ready swarm, not against the seeder's boot.
    line(&o.node, "leech", "waiting").u64("t_ns", mono_ns()).emit();
    while scrape(&o.tracker, &o.info_hash).unwrap_or(0) < 1 {
        std::thread::sleep(Duration::from_millis(300));
    }
    let start = mono_ns();
    let port = o.port.to_string();
    let exit_cmd = format!("echo {DONE_MARK}");
    // -e 1: keep seeding to the other leechers after completion (the host
    // ends the run when every leecher is done).
    let (mut child, mut out) = spawn_ctorrent(&["-e", "1", "-p", &port, "-s", &o.out, "-X", &exit_cmd, &o.torrent])?;
    line(&o.node, "leech", "start").u64("t_ns", start).u64("size", o.size).emit();
    let mut buf = [0u8; 4096];
    let mut pending = Vec::<u8>::new();
    let mut last_have = None;
    let mut done = false;
    loop {
        let n = match read_pty(&mut out, &mut buf)? {
            0 => break,
            n => n,
        };
        let now = mono_ns();
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&c| c == b'\r' || c == b'\n') {
            let seg: Vec<u8> = pending.drain(..=i).collect();
            let seg = String::from_utf8_lossy(&seg);
            let mut complete = seg.contains(DONE_MARK);
            if let Some(st) = bt::parse_status(&seg) {
                if last_have != Some(st.have) && !done {
                    last_have = Some(st.have);
                    line(&o.node, "leech", "progress")
                        .u64("t_ns", now)
                        .u64("elapsed_ns", now - start)
                        .u64("have", st.have)
                        .u64("total", st.total)
                        .u64("bytes", bt::bytes_done(st.have, st.total, o.piece_len, o.size))
                        .emit();
                }
                complete |= st.have == st.total;
            }
            if complete && !done {
                done = true;
                let v0 = mono_ns();
                let digest = file_sha1(&o.out);
                let verify_ns = mono_ns() - v0;
                let (sha, ok) = match &digest {
                    Ok(d) => (bt::hex(d), *d == o.sha1),
                    Err(e) => (format!("error: {e}"), false),
                };
                line(&o.node, "leech", "done")
                    .u64("t_ns", now)
                    .u64("elapsed_ns", now - start)
                    .u64("bytes", o.size)
                    .str("sha1", &sha)
                    .bool("verified", ok)
                    .u64("verify_ns", verify_ns)
                    .emit();
            }
        }
        if pending.len() > 65536 {
            pending.clear();
        }
    }
    let status = child.wait()?;
    if !done {
        line(&o.node, "leech", "error").u64("t_ns", mono_ns()).str("status", &status.to_string()).emit();
        return Err(io::Error::other(format!("ctorrent exited ({status}) before the download completed")));
    }
    Ok(())
}
