//! `stasis-mandel master|worker ...`: the demo's distributed Mandelbrot job.
//! The master hands out row bands over TCP and keeps the image in memory;
//! when every band is in, it prints the image to the console (see
//! `stasis_guest_tools::mandel` and `docs/demo.md`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use stasis_guest_tools::args::{ArgsError, Flags};
use stasis_guest_tools::clocks::{default_node, mono_ns, sleep_until};
use stasis_guest_tools::json::{emit_line, JsonLine};
use stasis_guest_tools::mandel::{image_lines, master_line, Job, Params, Task, NO_BAND};

const USAGE: &str = "usage:
  stasis-mandel master [--port 7000] [--width 640] [--height 480] [--max-iter 256]
                       [--band-rows 8] [--node NAME]
  stasis-mandel worker --master IP:PORT [--node NAME]";

fn fail(msg: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("stasis-mandel: {msg}");
    std::process::exit(code);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_default();
    let result = match sub.as_str() {
        "master" => parse_master(args).map(run_master),
        "worker" => parse_worker(args).map(run_worker),
        _ => fail(USAGE, 2),
    };
    match result {
        Err(e) => fail(format_args!("{e}\n{USAGE}"), 2),
        Ok(Err(e)) => fail(e, 1),
        Ok(Ok(())) => {}
    }
}

// ------------------------------------------------------------------ master

struct MasterOpts {
    port: u16,
    params: Params,
    node: String,
}

fn parse_master(args: impl Iterator<Item = String>) -> Result<MasterOpts, ArgsError> {
    let f = Flags::parse(args, &["--port", "--width", "--height", "--max-iter", "--band-rows", "--node"])?;
    Ok(MasterOpts {
        port: f.get("--port", 7000)?,
        params: Params {
            width: f.get("--width", 640)?,
            height: f.get("--height", 480)?,
            max_iter: f.get("--max-iter", 256)?,
            band_rows: f.get("--band-rows", 8)?,
        },
        node: f.get("--node", default_node())?,
    })
}

struct Shared {
    job: Job,
    workers: u32,
}

type State = Arc<(Mutex<Shared>, Condvar)>;

fn run_master(o: MasterOpts) -> io::Result<()> {
    let job = Job::new(o.params).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let bands = job.params().bands();
    let listener = TcpListener::bind(("0.0.0.0", o.port))?;
    let state: State = Arc::new((Mutex::new(Shared { job, workers: 0 }), Condvar::new()));
    master_line(&o.node, 0, bands, 0, mono_ns()).emit();
    {
        let state = state.clone();
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                match stream {
                    Ok(s) => {
                        let state = state.clone();
                        std::thread::spawn(move || serve(id as u64, s, state));
                    }
                    Err(e) => eprintln!("stasis-mandel: accept: {e}"),
                }
            }
        });
    }
    let (lock, cv) = &*state;
    let mut g = lock.lock().expect("master state");
    let (mut shown_done, mut shown_workers) = (0, 0);
    loop {
        let (done, workers) = (g.job.bands_done(), g.workers);
        if (done, workers) != (shown_done, shown_workers) {
            master_line(&o.node, done, bands, workers, mono_ns()).emit();
            (shown_done, shown_workers) = (done, workers);
        }
        if g.job.is_done() {
            break;
        }
        g = cv.wait(g).expect("master state");
    }
    let params = g.job.params();
    let image = g.job.image().to_vec();
    drop(g);
    cv.notify_all();
    for line in image_lines(&o.node, &params, &image, mono_ns()) {
        emit_line(&line);
    }
    // Let the connections tell their workers; they close as they do.
    let deadline = mono_ns() + 5_000_000_000;
    while lock.lock().map(|g| g.workers).unwrap_or(0) > 0 && mono_ns() < deadline {
        sleep_until(mono_ns() + 100_000_000);
    }
    Ok(())
}

/// One worker connection: results in, tasks out; on any error its bands
/// go back to the pool.
fn serve(id: u64, mut s: TcpStream, state: State) {
    let _ = s.set_nodelay(true);
    let (lock, cv) = &*state;
    if let Ok(mut g) = lock.lock() {
        g.workers += 1;
    }
    cv.notify_all();
    let result = serve_loop(id, &mut s, &state);
    if let Ok(mut g) = lock.lock() {
        g.workers -= 1;
        g.job.lost(id);
    }
    cv.notify_all();
    if let Err(e) = result {
        eprintln!("stasis-mandel: worker connection {id}: {e}");
    }
}

fn serve_loop(id: u64, s: &mut TcpStream, state: &State) -> io::Result<()> {
    let (lock, cv) = &**state;
    loop {
        let mut head = [0u8; 8];
        s.read_exact(&mut head)?;
        let band = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
        if len > 64 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "result too large"));
        }
        let mut pixels = vec![0u8; len];
        s.read_exact(&mut pixels)?;
        let mut g = lock.lock().expect("master state");
        if band != NO_BAND {
            g.job.complete(band, &pixels).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            cv.notify_all();
        }
        let task = loop {
            if let Some(t) = g.job.next_task(id) {
                break t;
            }
            if g.job.is_done() {
                break Task::DONE;
            }
            g = cv.wait(g).expect("master state");
        };
        drop(g);
        s.write_all(&task.encode())?;
        if task.band == NO_BAND {
            return Ok(());
        }
    }
}

// ------------------------------------------------------------------ worker

struct WorkerOpts {
    master: SocketAddr,
    node: String,
}

fn parse_worker(args: impl Iterator<Item = String>) -> Result<WorkerOpts, ArgsError> {
    let f = Flags::parse(args, &["--master", "--node"])?;
    Ok(WorkerOpts {
        master: f.opt("--master")?.ok_or(ArgsError::Required("--master"))?,
        node: f.get("--node", default_node())?,
    })
}

fn worker_line(node: &str, event: &str, bands: u64) -> JsonLine {
    JsonLine::new()
        .str("tool", "mandel")
        .str("role", "worker")
        .str("node", node)
        .str("event", event)
        .u64("bands", bands)
        .u64("mono_ns", mono_ns())
}

fn run_worker(o: WorkerOpts) -> io::Result<()> {
    let mut computed = 0u64;
    loop {
        // Boot order differs: retry until the master listens, and again
        // whenever a connection breaks before the job is done.
        let mut s = loop {
            match TcpStream::connect_timeout(&o.master, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(_) => sleep_until(mono_ns() + 500_000_000),
            }
        };
        let _ = s.set_nodelay(true);
        worker_line(&o.node, "connected", computed).emit();
        match work(&mut s, &mut computed) {
            Ok(()) => {
                worker_line(&o.node, "done", computed).emit();
                return Ok(());
            }
            Err(e) => {
                eprintln!("stasis-mandel: connection to {}: {e}; reconnecting", o.master);
                sleep_until(mono_ns() + 500_000_000);
            }
        }
    }
}

fn work(s: &mut TcpStream, computed: &mut u64) -> io::Result<()> {
    let mut msg = Vec::from(NO_BAND.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    loop {
        s.write_all(&msg)?;
        let mut b = [0u8; 24];
        s.read_exact(&mut b)?;
        let task = Task::decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if task.band == NO_BAND {
            return Ok(());
        }
        let pixels = task.compute();
        *computed += 1;
        msg.clear();
        msg.extend_from_slice(&task.band.to_le_bytes());
        msg.extend_from_slice(&(pixels.len() as u32).to_le_bytes());
        msg.extend_from_slice(&pixels);
    }
}
