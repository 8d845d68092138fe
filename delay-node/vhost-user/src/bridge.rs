//! [`Bridge`]: two [`VhostPort`]s joined back to back (a zero-delay wire), for
//! measuring the vhost-user path and as the smallest example of how the delay
//! node drives ports: frames a port refuses (no buffer, device stopped) wait
//! in a per-port queue and are retried when that guest posts buffers or its
//! device starts again.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::warn;

use crate::port::{PortEvent, VhostError, VhostPort};

/// Frames waiting for one side before further ones are dropped (drop-tail).
pub const PENDING_LIMIT: usize = 4096;

/// One of the bridge's two ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    fn idx(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
    /// "a" or "b".
    pub fn name(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// Counters of a bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Frames delivered into side A's / B's guest.
    pub delivered: [AtomicU64; 2],
    /// Frames for side A / B dropped because its pending queue was full.
    pub dropped: [AtomicU64; 2],
    /// Frames for side A / B that waited at least once.
    pub deferred: [AtomicU64; 2],
}

/// Two ports and the forwarding thread between them.
pub struct Bridge {
    ports: Arc<[VhostPort; 2]>,
    stats: Arc<BridgeStats>,
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

enum Msg {
    Port(Side, PortEvent),
    Flush(Side),
    Quit,
}

impl Bridge {
    /// Serves `a` and `b`; `observe` sees every port event except frames (on
    /// the forwarding thread, after the bridge acted on it).
    pub fn new(
        a: &Path,
        b: &Path,
        mut observe: impl FnMut(Side, &PortEvent) + Send + 'static,
    ) -> Result<Bridge, VhostError> {
        let (tx, rx) = channel();
        let port = |side: Side, path: &Path| {
            let tx = tx.clone();
            VhostPort::serve(path, move |ev| {
                let _ = tx.send(Msg::Port(side, ev));
            })
        };
        let ports = Arc::new([port(Side::A, a)?, port(Side::B, b)?]);
        let stats = Arc::new(BridgeStats::default());
        let (p, s) = (ports.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-bridge".into())
            .spawn(move || forward(&p, &s, rx, &mut observe))
            .map_err(VhostError::Spawn)?;
        Ok(Bridge { ports, stats, tx, thread: Some(thread) })
    }

    /// The port of one side.
    pub fn port(&self, side: Side) -> &VhostPort {
        &self.ports[side.idx()]
    }

    /// Holds one side (see [`VhostPort::hold`]): frames for it wait in the bridge.
    pub fn hold(&self, side: Side) {
        self.port(side).hold();
    }

    /// Releases one side and retries the frames that waited for it.
    pub fn release(&self, side: Side) {
        self.port(side).release();
        let _ = self.tx.send(Msg::Flush(side));
    }

    /// Counters since creation.
    pub fn stats(&self) -> &BridgeStats {
        &self.stats
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn forward(ports: &[VhostPort; 2], stats: &BridgeStats, rx: Receiver<Msg>, observe: &mut dyn FnMut(Side, &PortEvent)) {
    let mut pending: [VecDeque<Vec<u8>>; 2] = [VecDeque::new(), VecDeque::new()];
    let flush = |side: Side, pending: &mut [VecDeque<Vec<u8>>; 2]| {
        let q = &mut pending[side.idx()];
        while let Some(f) = q.front() {
            match ports[side.idx()].deliver(f) {
                Ok(true) => {
                    q.pop_front();
                    stats.delivered[side.idx()].fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => break,
                Err(e) => {
                    warn!(side = side.name(), error = %e, "dropping a frame the guest ring refused");
                    q.pop_front();
                    stats.dropped[side.idx()].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    while let Ok(msg) = rx.recv() {
        let (side, ev) = match msg {
            Msg::Quit => return,
            Msg::Flush(side) => {
                flush(side, &mut pending);
                continue;
            }
            Msg::Port(side, ev) => (side, ev),
        };
        match ev {
            PortEvent::Frame(f) => {
                ports[side.idx()].tx_consumed(1);
                let to = side.other();
                let q = &mut pending[to.idx()];
                if q.is_empty() {
                    match ports[to.idx()].deliver(&f) {
                        Ok(true) => {
                            stats.delivered[to.idx()].fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(side = to.name(), error = %e, "dropping a frame the guest ring refused");
                            stats.dropped[to.idx()].fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                if q.len() >= PENDING_LIMIT {
                    stats.dropped[to.idx()].fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.deferred[to.idx()].fetch_add(1, Ordering::Relaxed);
                    q.push_back(f);
                    // Older frames may be deliverable by now (no RX kick comes
                    // while the guest still has free buffers).
                    flush(to, &mut pending);
                }
            }
            other => {
                if matches!(other, PortEvent::RxReady | PortEvent::Started) {
                    flush(side, &mut pending);
                }
                observe(side, &other);
            }
        }
    }
}
