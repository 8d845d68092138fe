//! A message-level shim between QEMU and `vhost-user-backend`'s request
//! handler, for one QEMU 7.2 quirk.
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` as soon as the guest driver
//! acks its features, before `vhost_dev_start` has sent `SET_FEATURES` to the
//! backend. The `vhost` crate's request dispatcher rejects `SET_VRING_ENABLE`
//! until `VHOST_USER_F_PROTOCOL_FEATURES` is acked by `SET_FEATURES`, and drops
//! the connection. Not offering protocol features is no way out: QEMU then
//! fails `vhost_net_start` with EINVAL (it re-sends the enable state after
//! start) and falls back to userspace virtio, and it blocks migration for
//! lack of `LOG_SHMFD`. So the shim holds `SET_VRING_ENABLE` back until the
//! first `SET_FEATURES` and then replays the last state QEMU asked for on
//! each queue (QEMU 7.2 as shipped by Debian does not send it again: observed
//! message order GET_FEATURES … SET_VRING_ENABLE×n … SET_FEATURES,
//! SET_MEM_TABLE, per queue NUM/BASE/ADDR/KICK/CALL).
//!
//! A held request that asks for a reply gets one from the shim: the `vhost`
//! crate adds `REPLY_ACK` to the protocol features the backend offers, and
//! QEMU 10.0 sets `NEED_REPLY` on that early `SET_VRING_ENABLE` and then
//! blocks in its start-up until the ack arrives (with `-daemonize` the
//! parent process never returned: docs/qemu.md, "QEMU 10"). The ack cannot
//! interleave with a backend reply: the frontend waits for each reply
//! before it sends its next request. Everything else (including file
//! descriptors) is passed through unchanged.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tracing::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header: request, flags, payload size (little-endian u32 each).
const HDR_LEN: usize = 12;
/// Header flags: protocol version 1, "this is a reply", "reply wanted".
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The vhost-user spec caps payloads well below this; larger means garbage.
const MAX_PAYLOAD: usize = 0x1000_0000;
/// Most fds one message carries (`SET_MEM_TABLE`: one per region, ≤ 8... 509
/// with memory slots, which we do not offer).
const MAX_FDS: usize = 32;

/// What the shim does with one frontend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    Swallow,
}

/// The filtering rule, separate from the I/O so it is testable.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    features_set: bool,
    /// Last held `SET_VRING_ENABLE` (index, num) per queue, in arrival order.
    held: Vec<(u32, u32)>,
}

impl Filter {
    /// `payload` is the message body (for `SET_VRING_ENABLE`: index, num).
    pub(crate) fn judge(&mut self, request: u32, payload: &[u8]) -> Verdict {
        match request {
            SET_FEATURES => {
                self.features_set = true;
                Verdict::Forward
            }
            SET_VRING_ENABLE if !self.features_set && payload.len() >= 8 => {
                let index = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
                let num = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
                self.held.retain(|&(i, _)| i != index);
                self.held.push((index, num));
                Verdict::Swallow
            }
            _ => Verdict::Forward,
        }
    }

    /// Messages to send right after a forwarded `SET_FEATURES`: the held
    /// enable states, once.
    pub(crate) fn replay(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|(index, num)| {
                let mut m = Vec::with_capacity(HDR_LEN + 8);
                m.extend(SET_VRING_ENABLE.to_le_bytes());
                m.extend(1u32.to_le_bytes()); // flags: protocol version 1, no reply wanted
                m.extend(8u32.to_le_bytes());
                m.extend(index.to_le_bytes());
                m.extend(num.to_le_bytes());
                m
            })
            .collect()
    }
}

/// The `REPLY_ACK` answer to `request`: success (a zero u64).
pub(crate) fn ack(request: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR_LEN + 8);
    m.extend(request.to_le_bytes());
    m.extend((FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    m.extend(8u32.to_le_bytes());
    m.extend(0u64.to_le_bytes());
    m
}

fn read_header(qemu: &UnixStream, hdr: &mut [u8; HDR_LEN]) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let (n, nfds) = {
        let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HDR_LEN }];
        // The frontend sends header, payload and fds in one sendmsg; the fds
        // arrive with the first byte.
        // SAFETY: the iovec points at `hdr`, which is HDR_LEN bytes and outlives the call.
        unsafe { qemu.recv_with_fds(&mut iov, &mut fds) }.map_err(io::Error::from)?
    };
    let owned: Vec<OwnedFd> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in our table; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut qemu_ref = qemu;
    qemu_ref.read_exact(&mut hdr[n..])?;
    Ok(Some(owned))
}

/// Copies frontend → backend messages until either side closes.
pub(crate) fn pump_requests(qemu: UnixStream, backend: UnixStream, name: &str) -> io::Result<()> {
    let mut filter = Filter::default();
    let mut hdr = [0u8; HDR_LEN];
    let mut qemu_read = &qemu;
    let result = loop {
        let fds = match read_header(&qemu, &mut hdr) {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
        if size > MAX_PAYLOAD {
            break Err(io::Error::new(io::ErrorKind::InvalidData, format!("payload of {size} bytes")));
        }
        let mut msg = hdr.to_vec();
        msg.resize(HDR_LEN + size, 0);
        if let Err(e) = qemu_read.read_exact(&mut msg[HDR_LEN..]) {
            break Err(e);
        }
        match filter.judge(request, &msg[HDR_LEN..]) {
            Verdict::Swallow => {
                let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
                debug!(port = name, request, flags, "held a SET_VRING_ENABLE sent before SET_FEATURES");
                if flags & FLAG_NEED_REPLY != 0 {
                    if let Err(e) = (&qemu).write_all(&ack(request)) {
                        break Err(e);
                    }
                }
                continue;
            }
            Verdict::Forward => tracing::trace!(port = name, request, size, fds = fds.len(), "request"),
        }
        let sent = if fds.is_empty() {
            (&backend).write_all(&msg)
        } else {
            use std::os::fd::AsRawFd;
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            match backend.send_with_fds(&[&msg[..]], &raw) {
                Ok(n) if n == msg.len() => Ok(()),
                Ok(n) => (&backend).write_all(&msg[n..]),
                Err(e) => Err(io::Error::from(e)),
            }
        };
        if let Err(e) = sent {
            break Err(e);
        }
        if request == SET_FEATURES {
            let replay = filter.replay();
            if let Err(e) = replay.iter().try_for_each(|m| (&backend).write_all(m)) {
                break Err(e);
            }
            if !replay.is_empty() {
                debug!(port = name, n = replay.len(), "replayed held SET_VRING_ENABLE");
            }
        }
    };
    let _ = backend.shutdown(Shutdown::Both);
    let _ = qemu.shutdown(Shutdown::Both);
    result
}

/// Copies backend → frontend bytes (replies carry no fds here) until either
/// side closes.
pub(crate) fn pump_replies(backend: UnixStream, qemu: UnixStream) -> io::Result<()> {
    let r = io::copy(&mut &backend, &mut &qemu).map(|_| ());
    let _ = qemu.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_vring_enable_until_set_features_then_replays_the_last_state() {
        let enable = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
        let mut f = Filter::default();
        assert_eq!(f.judge(1, &[]), Verdict::Forward, "GET_FEATURES");
        assert_eq!(f.judge(SET_VRING_ENABLE, &enable(0, 0)), Verdict::Swallow);
        assert_eq!(f.judge(SET_VRING_ENABLE, &enable(1, 1)), Verdict::Swallow);
        assert_eq!(f.judge(SET_VRING_ENABLE, &enable(0, 1)), Verdict::Swallow);
        assert_eq!(f.judge(SET_FEATURES, &[0; 8]), Verdict::Forward);
        let r = f.replay();
        assert_eq!(r.len(), 2, "one per queue, last state wins");
        assert_eq!(&r[0][12..], &enable(1, 1)[..]);
        assert_eq!(&r[1][12..], &enable(0, 1)[..]);
        assert_eq!(&r[0][..12], &[18, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]);
        assert!(f.replay().is_empty(), "replayed once");
        assert_eq!(f.judge(SET_VRING_ENABLE, &enable(0, 0)), Verdict::Forward);
    }

    #[test]
    fn a_held_request_that_wants_a_reply_is_acked_and_nothing_reaches_the_backend() {
        let (qemu_side, qemu_end) = UnixStream::pair().unwrap();
        let (backend_end, backend_side) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || pump_requests(qemu_end, backend_end, "t"));
        let mut m = Vec::new();
        m.extend(SET_VRING_ENABLE.to_le_bytes());
        m.extend((FLAG_VERSION | FLAG_NEED_REPLY).to_le_bytes());
        m.extend(8u32.to_le_bytes());
        m.extend([0u8, 0, 0, 0, 1, 0, 0, 0]);
        (&qemu_side).write_all(&m).unwrap();
        let mut reply = [0u8; HDR_LEN + 8];
        (&qemu_side).read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..], &ack(SET_VRING_ENABLE)[..]);
        assert_eq!(&reply[..12], &[18, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0], "a reply (0x4) of version 1 with 8 bytes");
        assert_eq!(&reply[12..], &[0; 8], "success");
        drop(qemu_side);
        t.join().unwrap().unwrap();
        let mut rest = Vec::new();
        (&backend_side).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the held request is not forwarded: {rest:?}");
    }

    #[test]
    fn passes_messages_and_fds_through() {
        let (qemu_side, qemu_end) = UnixStream::pair().unwrap();
        let (backend_end, backend_side) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || pump_requests(qemu_end, backend_end, "t"));
        let msg = |req: u32, payload: &[u8]| {
            let mut m = Vec::new();
            m.extend(req.to_le_bytes());
            m.extend(1u32.to_le_bytes());
            m.extend((payload.len() as u32).to_le_bytes());
            m.extend(payload);
            m
        };
        // An early enable (swallowed), then SET_FEATURES, then an enable with an fd.
        (&qemu_side).write_all(&msg(SET_VRING_ENABLE, &[0; 8])).unwrap();
        (&qemu_side).write_all(&msg(SET_FEATURES, &[7; 8])).unwrap();
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        let m3 = msg(SET_VRING_ENABLE, &[1; 8]);
        qemu_side.send_with_fds(&[&m3[..]], &[file.as_raw_fd()]).unwrap();
        drop(qemu_side);
        let mut got = [0u8; 60];
        let mut fds = [-1; 4];
        let mut n = 0;
        let mut nfds = 0;
        while n < got.len() {
            let mut iov = [libc::iovec { iov_base: got[n..].as_mut_ptr().cast(), iov_len: got.len() - n }];
            // SAFETY: the iovec points into `got`, which outlives the call.
            let (k, kf) = unsafe { backend_side.recv_with_fds(&mut iov, &mut fds[nfds..]) }.unwrap();
            assert!(k > 0, "backend side closed early after {n} bytes");
            n += k;
            nfds += kf;
        }
        // SET_FEATURES, the replayed early enable, then the late one.
        assert_eq!(&got[..20], &msg(SET_FEATURES, &[7; 8])[..]);
        assert_eq!(&got[20..40], &msg(SET_VRING_ENABLE, &[0; 8])[..]);
        assert_eq!(&got[40..], &m3[..]);
        assert_eq!(nfds, 1, "the fd travels with its message");
        // SAFETY: the fd was just received and is owned by nobody else.
        drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        t.join().unwrap().unwrap();
    }
}
