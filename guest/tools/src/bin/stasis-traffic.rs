//! `stasis-traffic recv|send ...`: sequence-numbered UDP/TCP traffic whose
//! receiver accounts every gap, duplicate and reordering (see `docs/guest.md`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stasis_guest_tools::args::{ArgsError, Flags};
use stasis_guest_tools::clocks::{default_node, mono_ns, sleep_until};
use stasis_guest_tools::json::JsonLine;
use stasis_guest_tools::lines::{recv_line, send_line};
use stasis_guest_tools::pace::{Pace, Pacer, DEFAULT_MAX_LATE_NS};
use stasis_guest_tools::record::{check_frame_len, Record, HEADER_LEN};
use stasis_guest_tools::seq::{FlowKey, FlowTable, FlowTracker};

const USAGE: &str = "usage:
  stasis-traffic recv --port 5000 [--proto udp|tcp] [--report-ms 1000] [--node NAME]
  stasis-traffic send --to IP:PORT [--to ...] [--proto udp|tcp] [--rate PPS] [--size BYTES]
                      [--count N] [--flow ID] [--report-ms 1000] [--node NAME]
  (--rate and --count are per destination; --count 0 = unbounded; the sender exits
   after its final done=true lines)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

impl std::str::FromStr for Proto {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "udp" => Ok(Proto::Udp),
            "tcp" => Ok(Proto::Tcp),
            _ => Err(()),
        }
    }
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

fn fail(msg: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("stasis-traffic: {msg}");
    std::process::exit(code);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_default();
    let result = match sub.as_str() {
        "recv" => parse_recv(args).map(run_recv),
        "send" => parse_send(args).map(run_send),
        "clockx" => parse_clockx(args).map(run_clockx),
        "work" => parse_work(args).map(run_work),
        _ => fail(USAGE, 2),
    };
    match result {
        Err(e) => fail(format_args!("{e}\n{USAGE}"), 2),
        Ok(Err(e)) => fail(e, 1),
        Ok(Ok(())) => {}
    }
}

// ---------------------------------------------------------------- receiver

struct RecvOpts {
    port: u16,
    proto: Proto,
    report_ns: u64,
    node: String,
}

fn parse_recv(args: impl Iterator<Item = String>) -> Result<RecvOpts, ArgsError> {
    let f = Flags::parse(args, &["--port", "--proto", "--report-ms", "--node"])?;
    Ok(RecvOpts {
        port: f.opt("--port")?.ok_or(ArgsError::Required("--port"))?,
        proto: f.get("--proto", Proto::Udp)?,
        report_ns: f.get::<u64>("--report-ms", 1000)?.max(1) * 1_000_000,
        node: f.opt("--node")?.unwrap_or_else(default_node),
    })
}

fn flow_line(o: &RecvOpts, key: &FlowKey, t: &FlowTracker) -> JsonLine {
    recv_line(&o.node, o.proto.name(), key, t, mono_ns())
}

fn report_flows(o: &RecvOpts, table: &FlowTable) {
    for (key, t) in table.iter_sorted() {
        flow_line(o, &key, t).emit();
    }
}

fn account(o: &RecvOpts, table: &mut FlowTable, from: IpAddr, bytes: &[u8], bad: &mut u64) {
    match Record::decode(bytes) {
        Ok(rec) => {
            let (key, _, completed) = table.on_record(from, &rec);
            if completed {
                let t = table.get(&key).expect("flow just recorded");
                flow_line(o, &key, t).emit();
            }
        }
        Err(e) => {
            *bad += 1;
            if bad.is_power_of_two() {
                eprintln!("stasis-traffic: ignored {bad} malformed record(s) from {from}: {e}");
            }
        }
    }
}

/// Sequence number of the start handshake's hello (never a record's).
const HELLO_SEQ: u64 = u64::MAX;

fn is_hello(bytes: &[u8]) -> bool {
    Record::decode(bytes).map(|r| r.seq == HELLO_SEQ).unwrap_or(false)
}

/// UDP start barrier: send hellos until the receiver echoes one, so that no
/// numbered record is lost to a receiver that has not bound its port yet
/// (a guest that boots later than the sender). Gives up after `limit` and
/// starts anyway, saying so.
fn await_receiver(o: &SendOpts, sock: &UdpSocket, addr: SocketAddr, limit: Duration) -> io::Result<()> {
    let hello = Record { flow: o.flow, seq: HELLO_SEQ, total: o.count, send_mono_ns: mono_ns() };
    let mut out = vec![0u8; o.size.max(64)];
    hello.encode_into(&mut out);
    let mut back = vec![0u8; 65536];
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = mono_ns() + limit.as_nanos() as u64;
    while mono_ns() < deadline {
        let _ = sock.send_to(&out, addr); // ECONNREFUSED from an earlier hello: just try again
        match sock.recv_from(&mut back) {
            Ok((n, from)) if from == addr && is_hello(&back[..n]) => {
                sock.set_read_timeout(None)?;
                return Ok(());
            }
            Ok(_) => {}
            Err(_) => {} // timeout or refused: the receiver is not there yet
        }
    }
    sock.set_read_timeout(None)?;
    eprintln!("stasis-traffic: no answer from a receiver at {addr} after {limit:?}; sending anyway");
    Ok(())
}

fn run_recv(o: RecvOpts) -> io::Result<()> {
    match o.proto {
        Proto::Udp => recv_udp(o),
        Proto::Tcp => recv_tcp(o),
    }
}

/// Receive buffer asked for UDP, so that a guest busy elsewhere does not drop
/// records in its own socket (which would read as network loss).
const UDP_RCVBUF: libc::c_int = 8 << 20;

fn grow_rcvbuf(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size = UDP_RCVBUF;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: the fd is a live socket owned by `sock`; `size` outlives the
        // call and its length is passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return; // FORCE needs CAP_NET_ADMIN (root in guests); else capped by rmem_max
        }
    }
}

fn recv_udp(o: RecvOpts) -> io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", o.port))?;
    grow_rcvbuf(&sock);
    let mut table = FlowTable::new();
    let mut buf = vec![0u8; 65536];
    let mut bad = 0u64;
    let mut next_report = mono_ns() + o.report_ns;
    loop {
        let now = mono_ns();
        if now >= next_report {
            report_flows(&o, &table);
            next_report = (next_report + o.report_ns).max(now + 1);
        }
        let wait = (next_report.saturating_sub(now)).max(1_000_000);
        sock.set_read_timeout(Some(Duration::from_nanos(wait)))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if is_hello(&buf[..n]) => {
                // A sender asks whether we listen before it numbers records:
                // answer with the same bytes. Not a record of any flow.
                let _ = sock.send_to(&buf[..n], from);
            }
            Ok((n, from)) => account(&o, &mut table, from.ip(), &buf[..n], &mut bad),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn recv_tcp(o: RecvOpts) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", o.port))?;
    let o = Arc::new(o);
    let table = Arc::new(Mutex::new(FlowTable::new()));
    {
        let (o, table) = (o.clone(), table.clone());
        std::thread::spawn(move || loop {
            sleep_until(mono_ns() + o.report_ns);
            let t = table.lock().unwrap_or_else(|p| p.into_inner());
            report_flows(&o, &t);
        });
    }
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("stasis-traffic: accept: {e}");
                continue;
            }
        };
        let (o, table) = (o.clone(), table.clone());
        std::thread::spawn(move || {
            let peer = stream.peer_addr().map(|a| a.ip());
            if let Ok(peer) = peer {
                if let Err(e) = read_tcp_records(&o, &table, peer, stream) {
                    eprintln!("stasis-traffic: connection from {peer}: {e}");
                }
            }
        });
    }
    Ok(())
}

fn read_tcp_records(o: &RecvOpts, table: &Mutex<FlowTable>, peer: IpAddr, stream: TcpStream) -> io::Result<()> {
    let mut r = io::BufReader::with_capacity(64 * 1024, stream);
    let mut buf = vec![0u8; HEADER_LEN];
    let mut bad = 0u64;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len =
            check_frame_len(u32::from_be_bytes(len)).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        buf.resize(len, 0);
        r.read_exact(&mut buf)?;
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        account(o, &mut t, peer, &buf, &mut bad);
    }
}

// ------------------------------------------------------------------ sender

struct SendOpts {
    to: Vec<SocketAddr>,
    proto: Proto,
    rate: f64,
    size: usize,
    count: u64,
    flow: u32,
    report_ns: u64,
    node: String,
}

fn parse_send(args: impl Iterator<Item = String>) -> Result<SendOpts, ArgsError> {
    let f = Flags::parse(args, &["--to", "--proto", "--rate", "--size", "--count", "--flow", "--report-ms", "--node"])?;
    let to: Vec<SocketAddr> = f.all("--to")?;
    if to.is_empty() {
        return Err(ArgsError::Required("--to"));
    }
    let size: usize = f.get("--size", 64)?;
    if !(HEADER_LEN..=65507).contains(&size) {
        return Err(ArgsError::BadValue {
            flag: "--size".into(),
            value: format!("{size} (must be {HEADER_LEN}..=65507)"),
        });
    }
    let rate: f64 = f.get("--rate", 100.0)?;
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(ArgsError::BadValue { flag: "--rate".into(), value: rate.to_string() });
    }
    Ok(SendOpts {
        to,
        proto: f.get("--proto", Proto::Udp)?,
        rate,
        size,
        count: f.get("--count", 0)?,
        flow: f.get("--flow", 1)?,
        report_ns: f.get::<u64>("--report-ms", 1000)?.max(1) * 1_000_000,
        node: f.opt("--node")?.unwrap_or_else(default_node),
    })
}

/// Without IP_RECVERR Linux reports a UDP datagram dropped by the local
/// qdisc as sent (`ENOBUFS` is swallowed); with it, `send_to` fails and the
/// record is retried with the same sequence number, so `missing` at the
/// receiver never counts the sender's own drops.
fn report_local_drops(sock: &UdpSocket, v4: bool) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    let (level, opt) = if v4 { (libc::IPPROTO_IP, libc::IP_RECVERR) } else { (libc::IPPROTO_IPV6, libc::IPV6_RECVERR) };
    // SAFETY: the fd is a live socket owned by `sock`; `on` outlives the call
    // and its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        eprintln!("stasis-traffic: IP_RECVERR: {}", io::Error::last_os_error());
    }
}

struct Dest {
    addr: SocketAddr,
    sent: u64,
    done: bool,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
}

fn connect_tcp(addr: SocketAddr) -> TcpStream {
    let mut attempts = 0u64;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return s;
            }
            Err(e) => {
                attempts += 1;
                if attempts.is_power_of_two() {
                    eprintln!("stasis-traffic: connect {addr}: {e} (attempt {attempts}, retrying)");
                }
                sleep_until(mono_ns() + 100_000_000);
            }
        }
    }
}

fn progress_line(o: &SendOpts, d: &Dest) -> JsonLine {
    send_line(&o.node, o.proto.name(), &d.addr.to_string(), d.sent, d.done, mono_ns())
}

fn send_one(o: &SendOpts, d: &mut Dest, buf: &mut [u8]) -> io::Result<()> {
    let rec = Record { flow: o.flow, seq: d.sent, total: o.count, send_mono_ns: mono_ns() };
    match o.proto {
        Proto::Udp => {
            rec.encode_into(buf);
            let sock = d.udp.as_ref().expect("udp socket");
            sock.send_to(buf, d.addr).map(|_| ())
        }
        Proto::Tcp => {
            // One buffer, one write: length prefix + record.
            buf[0..4].copy_from_slice(&(o.size as u32).to_be_bytes());
            rec.encode_into(&mut buf[4..]);
            if d.tcp.is_none() {
                d.tcp = Some(connect_tcp(d.addr));
            }
            let r = d.tcp.as_mut().expect("connected").write_all(buf);
            if r.is_err() {
                d.tcp = None; // reconnect on the next send; the record is retried
            }
            r
        }
    }
}

fn run_send(o: SendOpts) -> io::Result<()> {
    let mut dests = Vec::new();
    for &addr in &o.to {
        let mut d = Dest { addr, sent: 0, done: false, udp: None, tcp: None };
        match o.proto {
            Proto::Udp => {
                let any: SocketAddr =
                    if addr.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("literal address");
                let sock = UdpSocket::bind(any)?;
                await_receiver(&o, &sock, addr, Duration::from_secs(120))?;
                report_local_drops(&sock, addr.is_ipv4());
                d.udp = Some(sock);
            }
            Proto::Tcp => d.tcp = Some(connect_tcp(addr)),
        }
        dests.push(d);
    }
    let mut buf = vec![0u8; o.size + if o.proto == Proto::Tcp { 4 } else { 0 }];
    let n = dests.len();
    // Sends alternate between destinations, so each gets `rate` per second.
    let start = mono_ns();
    let mut pacer = Pacer::new(start, Pacer::period_for_rate(o.rate * n as f64), DEFAULT_MAX_LATE_NS);
    let mut next_report = start + o.report_ns;
    let mut rr = 0usize;
    let mut errors = 0u64;
    loop {
        let now = mono_ns();
        if now >= next_report {
            for d in &dests {
                progress_line(&o, d).emit();
            }
            next_report = (next_report + o.report_ns).max(now + 1);
        }
        match pacer.poll(now) {
            Pace::WaitUntil(t) => sleep_until(t.min(next_report)),
            Pace::Send { .. } => {
                let d = &mut dests[rr % n];
                rr += 1;
                if d.done {
                    continue;
                }
                match send_one(&o, d, &mut buf) {
                    Ok(()) => {
                        d.sent += 1;
                        if o.count != 0 && d.sent >= o.count {
                            d.done = true;
                            progress_line(&o, d).emit();
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors.is_power_of_two() {
                            eprintln!(
                                "stasis-traffic: send to {}: {e} ({errors} errors; seq {} retried)",
                                d.addr, d.sent
                            );
                        }
                    }
                }
                if dests.iter().all(|d| d.done) {
                    return Ok(());
                }
            }
        }
    }
}

// ------------------------------------------------- clock exchange, work rate

const USAGE_X: &str = "usage (time eval, docs/guest.md):
  stasis-traffic clockx --serve PORT [--node NAME]
  stasis-traffic clockx --peer IP:PORT [--interval-ms 100] [--node NAME]
  stasis-traffic work [--window-ms 100] [--kmod /proc/stasis_fw] [--kmod-ms 1000] [--nice 19] [--node NAME]";

struct ClockxOpts {
    serve: Option<u16>,
    peer: Option<SocketAddr>,
    interval_ns: u64,
    node: String,
}

fn parse_clockx(args: impl Iterator<Item = String>) -> Result<ClockxOpts, ArgsError> {
    let f = Flags::parse(args, &["--serve", "--peer", "--interval-ms", "--node"])?;
    let o = ClockxOpts {
        serve: f.opt("--serve")?,
        peer: f.opt("--peer")?,
        interval_ns: f.get("--interval-ms", 100u64)?.max(1) * 1_000_000,
        node: f.get("--node", default_node())?,
    };
    if o.serve.is_some() == o.peer.is_some() {
        eprintln!("{USAGE_X}");
        return Err(ArgsError::Required("exactly one of --serve/--peer"));
    }
    Ok(o)
}

/// Server: stamps t2 on receipt and t3 just before the reply. Client: one
/// exchange per interval, one JSON line per answered exchange.
fn run_clockx(o: ClockxOpts) -> io::Result<()> {
    use stasis_guest_tools::clockx::{decode, encode, Exchange, PACKET_LEN};
    let mut buf = [0u8; 256];
    if let Some(port) = o.serve {
        let sock = UdpSocket::bind(("0.0.0.0", port))?;
        loop {
            let (n, from) = sock.recv_from(&mut buf)?;
            let t2 = mono_ns();
            if let Some((seq, t1, _, _)) = decode(&buf[..n]) {
                let t3 = mono_ns();
                let _ = sock.send_to(&encode(seq, t1, t2, t3), from);
            }
        }
    }
    let Some(peer) = o.peer else { return Ok(()) };
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    let mut seq = 0u64;
    let mut next = mono_ns();
    loop {
        sleep_until(next);
        next = (next + o.interval_ns).max(mono_ns());
        seq += 1;
        sock.set_read_timeout(Some(Duration::from_nanos(o.interval_ns.max(20_000_000))))?;
        let t1 = mono_ns();
        if sock.send_to(&encode(seq, t1, 0, 0), peer).is_err() {
            continue;
        }
        // Wait for this exchange's answer; late answers of older ones are
        // dropped; a timeout (lost or late) leaves it to the next interval.
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            let t4 = mono_ns();
            if let Some((s, _, t2, t3)) = decode(&buf[..n]) {
                if s == seq && n == PACKET_LEN {
                    let x = Exchange { t1, t2, t3, t4 };
                    JsonLine::new()
                        .str("tool", "clockx")
                        .str("node", &o.node)
                        .u64("seq", seq)
                        .u64("t1", t1)
                        .u64("t2", t2)
                        .u64("t3", t3)
                        .u64("t4", t4)
                        .i64("theta_ns", x.offset_ns())
                        .i64("delta_ns", x.delay_ns())
                        .emit();
                    break;
                }
            }
        }
    }
}

struct WorkOpts {
    window_ns: u64,
    kmod: Option<String>,
    kmod_ns: u64,
    nice: i32,
    node: String,
}

fn parse_work(args: impl Iterator<Item = String>) -> Result<WorkOpts, ArgsError> {
    let f = Flags::parse(args, &["--window-ms", "--kmod", "--kmod-ms", "--nice", "--node"])?;
    Ok(WorkOpts {
        window_ns: f.get("--window-ms", 100u64)?.max(1) * 1_000_000,
        kmod: f.opt("--kmod")?,
        kmod_ns: f.get("--kmod-ms", 1000u64)?.max(1) * 1_000_000,
        nice: f.get("--nice", 0i32)?,
        node: f.get("--node", default_node())?,
    })
}

/// Busy loop counting iterations per window of CLOCK_MONOTONIC (the guest's
/// CPU allocation as it sees it). With `--kmod`, every `--kmod-ms` it also
/// reads the guest-kmod's counters, prints them and writes `reset`, so that
/// each `kmodw` line holds the largest steps of that window alone.
fn run_work(o: WorkOpts) -> io::Result<()> {
    use stasis_guest_tools::clockx::WorkWindows;
    const CHUNK: u64 = 20_000;
    if o.nice != 0 {
        // SAFETY: nice(2) only changes this process's scheduling priority.
        unsafe { libc::nice(o.nice) };
    }
    let start = mono_ns();
    let mut windows = WorkWindows::new(o.window_ns, start);
    let mut next_kmod = start + o.kmod_ns;
    let mut acc = 0u64;
    if let Some(p) = &o.kmod {
        let _ = std::fs::write(p, "reset");
    }
    loop {
        for i in 0..CHUNK {
            acc = std::hint::black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        let now = mono_ns();
        if let Some(w) = windows.add(CHUNK, now) {
            JsonLine::new()
                .str("tool", "work")
                .str("node", &o.node)
                .u64("mono_ns", w.end_ns)
                .u64("len_ns", w.len_ns)
                .u64("iters", w.iters)
                .emit();
        }
        if let (Some(p), true) = (&o.kmod, now >= next_kmod) {
            let text = std::fs::read_to_string(p).ok();
            let _ = std::fs::write(p, "reset");
            JsonLine::new()
                .str("tool", "kmodw")
                .str("node", &o.node)
                .u64("mono_ns", now)
                .raw_object("kmod", text.as_deref())
                .emit();
            next_kmod = (next_kmod + o.kmod_ns).max(now + 1);
        }
    }
}
