//! The PTP service of one agent: statime 0.4 over UDP/IPv4 multicast with
//! software timestamps, steering an `OverlayClock` over a [`SkewedClock`].
//!
//! The real system clock is never touched: statime steers only the overlay
//! (a shift and a frequency factor kept in memory). Packet timestamps are the
//! kernel's software `CLOCK_REALTIME` stamps; each is mapped through the skew
//! and then the overlay, exactly as a clock reading would be.
//!
//! One grandmaster (priority1 64) and any number of slave-only nodes on one
//! L2 segment; each node needs its own network namespace (ports 319/320 fixed).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use rand::{rngs::StdRng, SeedableRng};
use statime::{
    config::{
        AcceptAnyMaster, ClockIdentity, DelayMechanism, InstanceConfig, PortConfig, PtpMinorVersion, SdoId,
        TimePropertiesDS, TimeSource,
    },
    filters::{KalmanConfiguration, KalmanFilter},
    port::{
        is_message_buffer_compatible, NoForwardedTLVs, PortAction, PortActionIterator, TimestampContext, MAX_DATA_LEN,
    },
    time::{Duration, Interval, Time},
    OverlayClock, PtpInstance, PtpInstanceState, SharedClock,
};
use timestamped_socket::{
    interface::InterfaceName,
    socket::{open_interface_udp4, InterfaceTimestampMode, Open, Socket, Timestamp},
};
use tokio::time::Instant;

use crate::metrics::{true_error_ns, Metrics, SyncState};
use crate::skew::{time_ns, HostClock, Skew, SkewedClock};

const PTP_PRIMARY_MULTICAST: Ipv4Addr = Ipv4Addr::new(224, 0, 1, 129);
const EVENT_PORT: u16 = 319;
const GENERAL_PORT: u16 = 320;

/// How to run one PTP node.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Network interface to run PTP on (inside this process's namespace).
    pub interface: String,
    /// Be the grandmaster (otherwise slave-only).
    pub grandmaster: bool,
    /// Injected base-clock offset, ns.
    pub offset_ns: i64,
    /// Injected base-clock drift, ppm.
    pub drift_ppm: f64,
    /// PTP domain.
    pub domain: u8,
    /// log2 of the sync and delay-request intervals in seconds (-4 = 16/s).
    pub log_sync_interval: i8,
}

impl ServiceConfig {
    /// Defaults for `interface`: slave, no injected error, domain 0, 16 syncs/s
    /// (more samples keep the Kalman filter steadier when the host is loaded).
    pub fn new(interface: impl Into<String>) -> Self {
        ServiceConfig {
            interface: interface.into(),
            grandmaster: false,
            offset_ns: 0,
            drift_ppm: 0.0,
            domain: 0,
            log_sync_interval: -4,
        }
    }
}

/// Errors of [`start`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The interface name is not valid.
    #[error("invalid interface name {0:?}")]
    InterfaceName(String),
    /// Opening or configuring a PTP socket failed.
    #[error("opening the PTP {which} socket on {interface}")]
    Socket {
        /// "event" or "general".
        which: &'static str,
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Errors that end a running service.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A socket failed while sending or receiving.
    #[error("PTP socket {op} failed")]
    Socket {
        /// "send" or "recv".
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Overlay = OverlayClock<SkewedClock>;

#[derive(Debug, Clone, Copy)]
struct Status {
    state: SyncState,
    offset_ns: Option<f64>,
    delay_ns: Option<f64>,
}

/// The agent's handle to its synchronised clock; cheap to clone, thread-safe.
#[derive(Debug, Clone)]
pub struct SyncedClock {
    clock: SharedClock<Overlay>,
    skew: Skew,
    status: Arc<Mutex<Status>>,
}

impl SyncedClock {
    /// A synced clock over a skewed `CLOCK_REALTIME`, not yet steered.
    pub fn new(offset_ns: i64, drift_ppm: f64) -> Self {
        let base = SkewedClock::new(HostClock::Realtime, offset_ns, drift_ppm);
        SyncedClock {
            skew: base.skew(),
            clock: SharedClock::new(OverlayClock::new(base)),
            status: Arc::new(Mutex::new(Status { state: SyncState::Listening, offset_ns: None, delay_ns: None })),
        }
    }

    /// Synchronised time now, ns since the epoch (PTP timescale of the grandmaster).
    pub fn now(&self) -> i128 {
        self.synced_at_host(HostClock::Realtime.now_ns())
    }

    /// What the synced clock reads (read) at host `CLOCK_REALTIME` instant `host_ns`.
    pub fn synced_at_host(&self, host_ns: u64) -> i128 {
        let overlay = self.clock.0.lock().expect("overlay lock");
        time_ns(overlay.time_from_underlying(Time::from_nanos(self.skew.base_at(host_ns))))
    }

    /// The host `CLOCK_REALTIME` instant at which the synced clock reads
    /// `synced_ns`, under the overlay's current steering (later steering can
    /// move it by the amount it corrects).
    pub fn host_realtime_at(&self, synced_ns: i128) -> u64 {
        let now = HostClock::Realtime.now_ns();
        let mut h = (synced_ns - (self.synced_at_host(now) - now as i128)) as i64;
        // synced(h) has slope 1 +- a few hundred ppm: each step shrinks the
        // miss by that factor, so two or three steps reach the nanosecond.
        for _ in 0..4 {
            let miss = self.synced_at_host(h as u64) - synced_ns;
            if miss == 0 {
                break;
            }
            h -= miss as i64;
        }
        h as u64
    }

    /// The `CLOCK_MONOTONIC` instant (as used by `stasis_core::clock::wait_until`)
    /// at which the synced clock reads `synced_ns`.
    pub fn mono_at(&self, synced_ns: i128) -> stasis_core::clock::MonoNs {
        let rt = HostClock::Realtime.now_ns() as i128;
        let mono = stasis_core::clock::mono_ns() as i128;
        (mono + (self.host_realtime_at(synced_ns) as i128 - rt)).max(0) as u64
    }

    /// The injected base-clock error.
    pub fn skew(&self) -> Skew {
        self.skew
    }

    /// A metrics sample taken now.
    pub fn metrics(&self) -> Metrics {
        let status = *self.status.lock().expect("status lock");
        let mono = stasis_core::clock::mono_ns();
        let host = HostClock::Realtime.now_ns();
        let synced = self.synced_at_host(host);
        Metrics {
            mono_ns: mono,
            state: status.state,
            offset_estimate_ns: status.offset_ns,
            true_error_ns: Some(true_error_ns(synced, host)),
            path_delay_ns: status.delay_ns,
            synced_ns: synced,
        }
    }

    fn timestamp_to_time(&self, ts: Timestamp) -> Time {
        let host_ns = ts.seconds as u64 * 1_000_000_000 + ts.nanos as u64;
        let overlay = self.clock.0.lock().expect("overlay lock");
        overlay.time_from_underlying(Time::from_nanos(self.skew.base_at(host_ns)))
    }

    fn set_status(&self, status: Status) {
        *self.status.lock().expect("status lock") = status;
    }
}

/// A started PTP node: its clock and the task running the protocol.
pub struct Service {
    /// The synchronised clock.
    pub clock: SyncedClock,
    /// The protocol task; ends only on a socket error.
    pub task: tokio::task::JoinHandle<Result<(), RunError>>,
}

/// Open the sockets and start the PTP node on the current tokio runtime.
pub async fn start(config: ServiceConfig) -> Result<Service, StartError> {
    let interface: InterfaceName =
        config.interface.parse().map_err(|_| StartError::InterfaceName(config.interface.clone()))?;
    let open = |port: u16, mode, which| {
        let sock = open_interface_udp4(interface, port, mode, None)
            .and_then(|s| {
                s.join_multicast(SocketAddrV4::new(PTP_PRIMARY_MULTICAST, 0), interface)?;
                Ok(s)
            })
            .map_err(|source| StartError::Socket { which, interface: config.interface.clone(), source })?;
        Ok::<_, StartError>(sock)
    };
    let event = open(EVENT_PORT, InterfaceTimestampMode::SoftwareAll, "event")?;
    let general = open(GENERAL_PORT, InterfaceTimestampMode::None, "general")?;

    let clock = SyncedClock::new(config.offset_ns, config.drift_ppm);
    let identity = clock_identity(interface);
    tracing::info!(identity = ?identity.0, gm = config.grandmaster, "ptp node starting");
    let task = tokio::spawn(run(config, identity, clock.clone(), event, general));
    Ok(Service { clock, task })
}

/// EUI-64 from the interface's MAC; random if it has none.
fn clock_identity(interface: InterfaceName) -> ClockIdentity {
    let mac =
        timestamped_socket::interface::interfaces().ok().and_then(|all| all.get(&interface).and_then(|d| d.mac()));
    match mac {
        Some(m) if m.iter().any(|b| *b != 0) => ClockIdentity([m[0], m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]),
        _ => ClockIdentity(rand::random()),
    }
}

#[derive(Default)]
struct Timers {
    announce: Option<Instant>,
    sync: Option<Instant>,
    announce_receipt: Option<Instant>,
    delay_request: Option<Instant>,
    filter_update: Option<Instant>,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Wake {
    Event(usize, Option<Timestamp>),
    General(usize),
    Announce,
    Sync,
    AnnounceReceipt,
    DelayRequest,
    FilterUpdate,
    Bmca,
}

async fn run(
    config: ServiceConfig,
    identity: ClockIdentity,
    clock: SyncedClock,
    mut event: Socket<SocketAddrV4, Open>,
    mut general: Socket<SocketAddrV4, Open>,
) -> Result<(), RunError> {
    let instance_config = InstanceConfig {
        clock_identity: identity,
        priority_1: if config.grandmaster { 64 } else { 128 },
        priority_2: 128,
        domain_number: config.domain,
        slave_only: !config.grandmaster,
        sdo_id: SdoId::default(),
        path_trace: false,
    };
    let time_properties = TimePropertiesDS::new_arbitrary_time(false, false, TimeSource::InternalOscillator);
    let instance: PtpInstance<KalmanFilter, std::sync::RwLock<PtpInstanceState>> =
        PtpInstance::new(instance_config, time_properties);
    let interval = Interval::from_log_2(config.log_sync_interval);
    let port_config = PortConfig {
        acceptable_master_list: AcceptAnyMaster,
        delay_mechanism: DelayMechanism::E2E { interval },
        announce_interval: Interval::from_log_2(-2),
        announce_receipt_timeout: 3,
        sync_interval: interval,
        master_only: false,
        delay_asymmetry: Duration::ZERO,
        minor_ptp_version: PtpMinorVersion::One,
    };
    let in_bmca =
        instance.add_port(port_config, KalmanConfiguration::default(), clock.clock.clone(), StdRng::from_entropy());
    let mut timers = Timers::default();
    let (mut port, actions) = in_bmca.end_bmca();
    let mut pending = handle(actions, &mut event, &mut general, &mut timers, &clock).await?;
    while let Some((ctx, t)) = pending {
        pending = handle(port.handle_send_timestamp(ctx, t), &mut event, &mut general, &mut timers, &clock).await?;
    }
    let mut bmca_at = Instant::now() + instance.bmca_interval();
    let mut event_buf = [0u8; MAX_DATA_LEN];
    let mut general_buf = [0u8; 2048];
    loop {
        let wake = tokio::select! {
            r = event.recv(&mut event_buf) => {
                let r = r.map_err(|source| RunError::Socket { op: "recv", source })?;
                Wake::Event(r.bytes_read, r.timestamp)
            }
            r = general.recv(&mut general_buf) => {
                let r = r.map_err(|source| RunError::Socket { op: "recv", source })?;
                Wake::General(r.bytes_read)
            }
            () = sleep_until(timers.announce) => Wake::Announce,
            () = sleep_until(timers.sync) => Wake::Sync,
            () = sleep_until(timers.announce_receipt) => Wake::AnnounceReceipt,
            () = sleep_until(timers.delay_request) => Wake::DelayRequest,
            () = sleep_until(timers.filter_update) => Wake::FilterUpdate,
            () = tokio::time::sleep_until(bmca_at) => Wake::Bmca,
        };
        let actions = match wake {
            Wake::Event(n, ts) => {
                let data = &event_buf[..n];
                match ts {
                    Some(ts) if is_message_buffer_compatible(data) => {
                        port.handle_event_receive(data, clock.timestamp_to_time(ts))
                    }
                    Some(_) => PortActionIterator::empty(),
                    None => {
                        tracing::warn!("event message without a receive timestamp");
                        PortActionIterator::empty()
                    }
                }
            }
            Wake::General(n) => port.handle_general_receive(&general_buf[..n]),
            Wake::Announce => {
                timers.announce = None;
                port.handle_announce_timer(&mut NoForwardedTLVs)
            }
            Wake::Sync => {
                timers.sync = None;
                port.handle_sync_timer()
            }
            Wake::AnnounceReceipt => {
                timers.announce_receipt = None;
                port.handle_announce_receipt_timer()
            }
            Wake::DelayRequest => {
                timers.delay_request = None;
                port.handle_delay_request_timer()
            }
            Wake::FilterUpdate => {
                timers.filter_update = None;
                port.handle_filter_update_timer()
            }
            Wake::Bmca => {
                let mut in_bmca = port.start_bmca();
                instance.bmca(&mut [&mut in_bmca]);
                let (p, actions) = in_bmca.end_bmca();
                port = p;
                bmca_at = Instant::now() + instance.bmca_interval();
                // end_bmca's actions are 'static; handle them here rather than
                // forcing every arm's borrow to 'static.
                let mut pending = handle(actions, &mut event, &mut general, &mut timers, &clock).await?;
                while let Some((ctx, t)) = pending {
                    pending = handle(port.handle_send_timestamp(ctx, t), &mut event, &mut general, &mut timers, &clock)
                        .await?;
                }
                PortActionIterator::empty()
            }
        };
        let mut pending = handle(actions, &mut event, &mut general, &mut timers, &clock).await?;
        while let Some((ctx, t)) = pending {
            pending = handle(port.handle_send_timestamp(ctx, t), &mut event, &mut general, &mut timers, &clock).await?;
        }
        let estimate = port.port_current_ds_contribution();
        clock.set_status(Status {
            state: port.port_ds().port_state.into(),
            offset_ns: estimate.as_ref().map(|e| e.offset_from_master.nanos_lossy()),
            delay_ns: estimate.as_ref().map(|e| e.mean_delay.nanos_lossy()),
        });
    }
}

async fn handle(
    actions: PortActionIterator<'_>,
    event: &mut Socket<SocketAddrV4, Open>,
    general: &mut Socket<SocketAddrV4, Open>,
    timers: &mut Timers,
    clock: &SyncedClock,
) -> Result<Option<(TimestampContext, Time)>, RunError> {
    let mut pending = None;
    let now = Instant::now();
    for action in actions {
        match action {
            PortAction::SendEvent { context, data, .. } => {
                let sent = event
                    .send_to(data, SocketAddrV4::new(PTP_PRIMARY_MULTICAST, EVENT_PORT))
                    .await
                    .map_err(|source| RunError::Socket { op: "send", source })?;
                match sent {
                    Some(ts) => pending = Some((context, clock.timestamp_to_time(ts))),
                    None => tracing::warn!("event message without a send timestamp"),
                }
            }
            PortAction::SendGeneral { data, .. } => {
                general
                    .send_to(data, SocketAddrV4::new(PTP_PRIMARY_MULTICAST, GENERAL_PORT))
                    .await
                    .map_err(|source| RunError::Socket { op: "send", source })?;
            }
            PortAction::ResetAnnounceTimer { duration } => timers.announce = Some(now + duration),
            PortAction::ResetSyncTimer { duration } => timers.sync = Some(now + duration),
            PortAction::ResetDelayRequestTimer { duration } => timers.delay_request = Some(now + duration),
            PortAction::ResetAnnounceReceiptTimer { duration } => timers.announce_receipt = Some(now + duration),
            PortAction::ResetFilterUpdateTimer { duration } => timers.filter_update = Some(now + duration),
            PortAction::ForwardTLV { .. } => {}
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use statime::Clock;

    #[tokio::test]
    async fn start_refuses_a_bad_interface_name() {
        let err = start(ServiceConfig::new("this-name-is-far-too-long")).await.err().unwrap();
        assert!(matches!(err, StartError::InterfaceName(_)), "{err}");
    }

    #[tokio::test]
    async fn start_refuses_a_missing_interface() {
        let err = start(ServiceConfig::new("nosuchif0")).await.err().unwrap();
        assert!(matches!(err, StartError::Socket { which: "event", .. }), "{err}");
    }

    #[test]
    fn unsteered_synced_clock_has_exactly_the_injected_error() {
        let c = SyncedClock::new(3_000_000, 50.0);
        let origin = c.skew().origin_host_ns;
        // 2 s after the origin, +50 ppm adds 100 µs
        let h = origin + 2_000_000_000;
        assert_eq!(c.synced_at_host(h) - h as i128, 3_100_000);
        let m = c.metrics();
        let err = m.true_error_ns.unwrap();
        assert!((3_000_000.0..3_100_000.0).contains(&err), "{err}");
        assert_eq!(m.state, SyncState::Listening);
    }

    #[test]
    fn stepping_the_overlay_moves_the_true_error_not_the_base() {
        let c = SyncedClock::new(-2_000_000, 0.0);
        let mut shared = c.clock.clone();
        shared.step_clock(Duration::from_nanos(2_000_000)).unwrap();
        let h = HostClock::Realtime.now_ns();
        assert_eq!(c.synced_at_host(h) - h as i128, 0);
        // the base clock still carries its injected error
        assert_eq!(c.skew().base_at(h) as i128 - h as i128, -2_000_000);
    }

    #[test]
    fn host_instant_of_a_synced_reading_inverts_the_clock() {
        let c = SyncedClock::new(-2_000_000, -30.0);
        let mut shared = c.clock.clone();
        shared.set_frequency(25.0).unwrap();
        let target = c.now() + 1_000_000_000;
        let h = c.host_realtime_at(target);
        assert!((c.synced_at_host(h) - target).abs() <= 1);
        // about 1 s from now on the host clock (the rate error is a few ppm)
        let from_now = h as i128 - HostClock::Realtime.now_ns() as i128;
        assert!((999_000_000..1_000_100_000).contains(&from_now), "{from_now}");
        let mono_from_now = c.mono_at(target) as i128 - stasis_core::clock::mono_ns() as i128;
        assert!((999_000_000..1_000_100_000).contains(&mono_from_now), "{mono_from_now}");
    }

    #[test]
    fn frequency_correction_cancels_drift() {
        let c = SyncedClock::new(0, 50.0);
        let mut shared = c.clock.clone();
        // the overlay runs at (1 + f) times the base: f = 1/(1+50e-6) - 1
        shared.set_frequency(1e6 / (1.0 + 50e-6) - 1e6).unwrap();
        let h0 = HostClock::Realtime.now_ns();
        let e0 = c.synced_at_host(h0) - h0 as i128;
        let h1 = h0 + 10_000_000_000;
        let e1 = c.synced_at_host(h1) - h1 as i128;
        // uncorrected, 10 s at +50 ppm would add 500 µs
        assert!((e1 - e0).abs() < 10, "{e0} {e1}");
    }
}
