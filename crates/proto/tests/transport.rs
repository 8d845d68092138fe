//! The protocol over real loopback TCP: handshakes, refusals, hostile bytes
//! and whole checkpoint rounds with misbehaving agents.

use stasis_core::clock::mono_ns;
use stasis_proto::agent::{AgentAction, AgentConfig, AgentCore, AgentState};
use stasis_proto::auth::{Direction, Key, OpenError, Sealer};
use stasis_proto::coordinator::{AbortReason, CoordConfig};
use stasis_proto::msg::{Auth, CkptId, Component, ErrorCode, Hello, Message, Ping, ResumedComponent, Welcome, MAGIC};
use stasis_proto::transport::{run_round, BindError, Connection, HandshakeError, Listener, RecvError};
use stasis_proto::wire::encode_frame;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn key() -> Key {
    Key::new(b"a shared test key, 32 bytes long").unwrap()
}

async fn listener() -> Listener {
    Listener::bind("127.0.0.1:0".parse().unwrap(), key()).await.unwrap()
}

async fn read_plain(s: &mut TcpStream) -> Message {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut b = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut b).await.unwrap();
    Message::decode(&b).unwrap()
}

async fn write_plain(s: &mut TcpStream, m: &Message) {
    s.write_all(&encode_frame(&m.encode()).unwrap()).await.unwrap();
}

/// A hand-made coordinator handshake that proves knowledge of `proof_key`.
async fn raw_handshake(addr: SocketAddr, proof_key: &Key) -> (TcpStream, Sealer) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let nonce_c = [9u8; 32];
    write_plain(&mut s, &Message::Hello(Hello { magic: MAGIC, min_version: 1, max_version: 1, nonce: nonce_c })).await;
    let Message::Welcome(Welcome { version, nonce }) = read_plain(&mut s).await else { panic!("no Welcome") };
    write_plain(&mut s, &Message::Auth(Auth { proof: proof_key.coord_proof(version, (1, 1), &nonce_c, &nonce) })).await;
    let sealer = Sealer::new(proof_key.session(version, (1, 1), &nonce_c, &nonce), Direction::ToAgent);
    (s, sealer)
}

#[tokio::test]
async fn handshake_then_messages_both_ways() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let client = tokio::spawn(async move { Connection::connect(addr, &key()).await.unwrap() });
    let mut agent = l.accept().await.unwrap();
    let mut coord = client.await.unwrap();
    assert_eq!((agent.version(), coord.version()), (1, 1));
    for m in stasis_proto::testing::one_of_each() {
        coord.send(&m).await.unwrap();
        assert_eq!(agent.recv().await.unwrap(), m);
        agent.send(&m).await.unwrap();
        assert_eq!(coord.recv().await.unwrap(), m);
    }
    drop(coord);
    assert!(matches!(agent.recv().await, Err(RecvError::Closed)));
}

#[tokio::test]
async fn wildcard_bind_is_refused() {
    let e = Listener::bind("0.0.0.0:0".parse().unwrap(), key()).await.err().unwrap();
    assert!(matches!(e, BindError::Wildcard(_)), "{e}");
    assert!(Listener::bind("[::]:0".parse().unwrap(), key()).await.is_err());
}

#[tokio::test]
async fn wrong_key_is_refused_both_ways() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let wrong = Key::new(b"not the shared key at all.......").unwrap();
    // A coordinator with the wrong key proves first and is refused by the agent.
    let e = Connection::connect(addr, &wrong).await.err().unwrap();
    assert!(matches!(e, HandshakeError::AuthFailed), "{e}");
    let r = l.accept().await.err().unwrap();
    assert!(matches!(r.error, HandshakeError::AuthFailed), "{}", r.error);
    // A hand-made client that guesses gets an Error, nothing else.
    let (mut s, _) = raw_handshake(addr, &wrong).await;
    let r = l.accept().await.err().unwrap();
    assert!(matches!(r.error, HandshakeError::AuthFailed), "{}", r.error);
    assert!(matches!(read_plain(&mut s).await, Message::Error(e) if e.code == ErrorCode::AuthFailed));
    // The listener still serves the right key.
    let ok = tokio::spawn(async move { Connection::connect(addr, &key()).await });
    assert!(l.accept().await.is_ok());
    assert!(ok.await.unwrap().is_ok());
}

/// Every 32-byte window of `bytes` that is a valid agent proof under `k`
/// for this handshake (what a client without the key could search offline).
fn agent_proofs_in(bytes: &[u8], k: &Key, nonce_c: &[u8; 32], nonce_a: &[u8; 32]) -> usize {
    bytes.windows(32).filter(|w| k.verify(true, 1, (1, 1), nonce_c, nonce_a, &(*w).try_into().unwrap())).count()
}

/// The client proves the key first: a client without it receives nothing
/// computed from the key (no agent proof to guess a weak key against).
#[tokio::test]
async fn a_client_without_the_key_gets_nothing_computed_from_it() {
    let mut l = listener().await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    let nonce_c = [9u8; 32];
    write_plain(&mut s, &Message::Hello(Hello { magic: MAGIC, min_version: 1, max_version: 1, nonce: nonce_c })).await;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut welcome = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut welcome).await.unwrap();
    // type id, version 1 (one varint byte), the agent's nonce: nothing else.
    assert_eq!(welcome.len(), 1 + 1 + 32, "Welcome carries no proof: {welcome:?}");
    let nonce_a: [u8; 32] = welcome[2..34].try_into().unwrap();
    assert_eq!(agent_proofs_in(&welcome, &key(), &nonce_c, &nonce_a), 0);
    write_plain(&mut s, &Message::Auth(Auth { proof: [0; 32] })).await;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(agent_proofs_in(&rest, &key(), &nonce_c, &nonce_a), 0);
    let (reply, _) = stasis_proto::wire::decode_frame(&rest).unwrap().unwrap();
    assert!(matches!(Message::decode(reply).unwrap(), Message::Error(e) if e.code == ErrorCode::AuthFailed));
    assert!(matches!(l.accept().await.err().unwrap().error, HandshakeError::AuthFailed));
}

/// An impostor at the agent's address (it does not know the key) cannot
/// answer the coordinator's proof with its own: the coordinator refuses it.
#[tokio::test]
async fn an_impostor_agent_is_refused_by_the_coordinator() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let impostor = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let Message::Hello(_) = read_plain(&mut s).await else { panic!("no Hello") };
        write_plain(&mut s, &Message::Welcome(Welcome { version: 1, nonce: [3; 32] })).await;
        let Message::Auth(_) = read_plain(&mut s).await else { panic!("no Auth") };
        write_plain(&mut s, &Message::Auth(Auth { proof: [7; 32] })).await;
        read_plain(&mut s).await
    });
    let e = Connection::connect(addr, &key()).await.err().unwrap();
    assert!(matches!(e, HandshakeError::AgentAuthFailed), "{e}");
    assert!(matches!(impostor.await.unwrap(), Message::Error(e) if e.code == ErrorCode::AuthFailed));
}

/// Each agent holds only its host's key, derived from the coordinator's
/// master key: the right host's key is served, another host's is refused.
#[tokio::test]
async fn per_host_keys_open_only_their_own_host() {
    let master = Key::new(b"the coordinator's master key....").unwrap();
    let mut l = Listener::bind("127.0.0.1:0".parse().unwrap(), master.for_host("h1")).await.unwrap();
    let addr = l.local_addr();
    let m = master.clone();
    let ok = tokio::spawn(async move { Connection::connect(addr, &m.for_host("h1")).await });
    assert!(l.accept().await.is_ok());
    assert!(ok.await.unwrap().is_ok());
    for wrong in [master.for_host("h2"), master.clone()] {
        let e = Connection::connect(addr, &wrong).await.err().unwrap();
        assert!(matches!(e, HandshakeError::AuthFailed), "{e}");
        assert!(l.accept().await.is_err());
    }
}

/// Both ends of a connection probe an idle peer (a host that lost power
/// sends neither FIN nor RST) and give up on unacknowledged data.
#[tokio::test]
async fn connections_have_keepalive_and_a_user_timeout() {
    use stasis_proto::transport::{keepalive_of, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, USER_TIMEOUT};
    let mut l = listener().await;
    let addr = l.local_addr();
    let c = tokio::spawn(async move { Connection::connect(addr, &key()).await.unwrap() });
    let agent = l.accept().await.unwrap();
    let coord = c.await.unwrap();
    let want = (
        true,
        KEEPALIVE_IDLE.as_secs() as u32,
        KEEPALIVE_INTERVAL.as_secs() as u32,
        KEEPALIVE_PROBES,
        USER_TIMEOUT.as_millis() as u32,
    );
    assert_eq!(keepalive_of(agent.raw_fd()).unwrap(), want, "agent side");
    assert_eq!(keepalive_of(coord.raw_fd()).unwrap(), want, "coordinator side");
}

/// The application idle timeout: a peer alive at the TCP level that says
/// nothing is reported, so the agent can drop it.
#[tokio::test]
async fn a_silent_authenticated_peer_is_reported_idle() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let c = tokio::spawn(async move { Connection::connect(addr, &key()).await.unwrap() });
    let mut agent = l.accept().await.unwrap();
    let _coord = c.await.unwrap();
    let e = agent.recv_within(Duration::from_millis(200)).await.err().unwrap();
    assert!(matches!(e, RecvError::Idle(d) if d == Duration::from_millis(200)), "{e}");
}

#[tokio::test]
async fn version_mismatch_is_refused_with_a_clear_error() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let e = Connection::connect_versions(addr, &key(), 2, 3).await.err().unwrap();
    match e {
        HandshakeError::Refused { code: ErrorCode::VersionMismatch, message } => {
            assert!(message.contains("ours 1..=1, theirs 2..=3"), "{message}")
        }
        e => panic!("{e}"),
    }
    let r = l.accept().await.err().unwrap();
    assert!(matches!(r.error, HandshakeError::VersionMismatch { theirs_min: 2, theirs_max: 3, .. }));
    // An overlapping range negotiates the highest common version.
    let ok = tokio::spawn(async move { Connection::connect_versions(addr, &key(), 0, 9).await.unwrap().version() });
    assert_eq!(l.accept().await.unwrap().version(), 1);
    assert_eq!(ok.await.unwrap(), 1);
}

#[tokio::test]
async fn hostile_bytes_are_refused_and_the_listener_keeps_serving() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let attacks: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // garbage (length 0x47455420: too long)
        vec![0xff, 0xff, 0xff, 0xff],                  // oversize length
        vec![0, 0, 0, 0],                              // empty frame
        vec![0, 0, 0, 100, 1, 2, 3],                   // truncated frame, then EOF
        vec![0, 0, 0, 1, 0],                           // reserved message type 0
        vec![0, 0, 0, 2, 1, 0xff],                     // Hello with a malformed body
        vec![0, 0, 0, 1, 77],                          // unknown type
    ];
    let n = attacks.len();
    for a in attacks {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&a).await.unwrap();
        s.shutdown().await.unwrap();
        let r = l.accept().await.err().expect("refused");
        assert!(!matches!(r.error, HandshakeError::Timeout), "{}", r.error);
    }
    let bad_magic = Message::Hello(Hello { magic: *b"HTTP", min_version: 1, max_version: 1, nonce: [0; 32] });
    let mut s = TcpStream::connect(addr).await.unwrap();
    write_plain(&mut s, &bad_magic).await;
    assert!(matches!(l.accept().await.err().unwrap().error, HandshakeError::BadMagic(m) if m == *b"HTTP"));
    let ok = tokio::spawn(async move { Connection::connect(addr, &key()).await });
    assert!(l.accept().await.is_ok(), "still serving after {n} attacks");
    assert!(ok.await.unwrap().is_ok());
}

#[tokio::test]
async fn forged_replayed_and_truncated_frames_after_the_handshake_are_refused() {
    let mut l = listener().await;
    let addr = l.local_addr();
    let ping = Message::Ping(Ping { seq: 1, sent_ns: 2 });

    let (mut s, mut sealer) = raw_handshake(addr, &key()).await;
    let mut agent = l.accept().await.unwrap();
    let f = sealer.seal(&ping);
    s.write_all(&encode_frame(&f).unwrap()).await.unwrap();
    assert_eq!(agent.recv().await.unwrap(), ping);
    s.write_all(&encode_frame(&f).unwrap()).await.unwrap();
    assert!(matches!(agent.recv().await, Err(RecvError::Open(OpenError::Sequence { got: 0, expected: 1 }))), "replay");

    let (mut s, mut sealer) = raw_handshake(addr, &key()).await;
    let mut agent = l.accept().await.unwrap();
    let mut f = sealer.seal(&ping);
    f[8] ^= 0x40;
    s.write_all(&encode_frame(&f).unwrap()).await.unwrap();
    assert!(matches!(agent.recv().await, Err(RecvError::Open(OpenError::BadMac))), "forged");

    let (mut s, mut sealer) = raw_handshake(addr, &key()).await;
    let mut agent = l.accept().await.unwrap();
    let f = encode_frame(&sealer.seal(&ping)).unwrap();
    s.write_all(&f[..f.len() - 5]).await.unwrap();
    drop(s);
    assert!(matches!(agent.recv().await, Err(RecvError::Io(_))), "truncated");
}

/// How a test agent misbehaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Normal,
    /// Dies between PREPARE and SAVED (its connection drops).
    DropAfterPrepare,
    SaveFails,
    /// Never reports; keeps its connection (a wedged host).
    Hang,
}

#[derive(Debug, Default, Clone)]
struct AgentLog {
    resumed_after: Option<u64>,
    discarded: bool,
    stored: bool,
}

/// An agent process in miniature: AgentCore over a Connection, with a fake
/// host whose components stop at the freeze instant and save in 20 ms.
async fn run_agent(mut conn: Connection, behaviour: Behaviour) -> AgentLog {
    let mut core = AgentCore::new(AgentConfig { orphan_grace_ns: 2_000_000_000, resume_margin_ns: 10_000_000 });
    let mut log = AgentLog::default();
    let (host_tx, mut host_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let mut stop_ns = 0;
    loop {
        let acts = tokio::select! {
            m = conn.recv() => match m {
                Ok(m) => {
                    if behaviour == Behaviour::DropAfterPrepare && matches!(m, Message::Prepare(_)) {
                        return log;
                    }
                    core.on_message(mono_ns(), m).expect("coordinator follows the protocol")
                }
                Err(_) => return log,
            },
            Some(ev) = host_rx.recv() => match ev {
                "frozen" => { stop_ns = mono_ns(); core.frozen(stop_ns).unwrap() }
                "saved" if behaviour == Behaviour::SaveFails => core.save_failed(mono_ns(), "disk full".into(), vec![stop_ns]).unwrap(),
                "saved" => core.saved(mono_ns(), vec![Component { name: "vm".into(), bytes: 1, blake3: [1; 32], stop_ns }]).unwrap(),
                "resumed" => core.resumed(mono_ns(), vec![ResumedComponent { name: "vm".into(), stop_ns, resume_ns: mono_ns() }]).unwrap(),
                "stored" => { log.stored = true; core.stored(mono_ns(), mono_ns(), 1, None).unwrap() }
                _ => unreachable!(),
            },
        };
        for a in acts {
            match a {
                AgentAction::FreezeAndSave { at, .. } if behaviour != Behaviour::Hang => {
                    let tx = host_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_nanos(at.saturating_sub(mono_ns()))).await;
                        let _ = tx.send("frozen");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = tx.send("saved");
                    });
                }
                AgentAction::FreezeAndSave { .. } | AgentAction::SetTimer { .. } => {}
                AgentAction::Send(m) => {
                    if conn.send(&m).await.is_err() {
                        return log;
                    }
                    // The round is over for this agent: resumed (and stored after a commit).
                    if matches!(m, Message::Resumed(_) | Message::Stored(_)) && core.state() == &AgentState::Idle {
                        return log;
                    }
                }
                AgentAction::StorePart { .. } => {
                    let _ = host_tx.send("stored");
                }
                AgentAction::Resume { after_ns, .. } => {
                    log.resumed_after = Some(after_ns);
                    let _ = host_tx.send("resumed");
                }
                AgentAction::Discard { .. } => log.discarded = true,
            }
        }
    }
}

struct Round {
    outcome: stasis_proto::Outcome,
    agents: Vec<AgentLog>,
    manifests: usize,
    removed: usize,
}

async fn round(behaviours: &[Behaviour]) -> Round {
    let mut l = listener().await;
    let addr = l.local_addr();
    let mut agents = Vec::new();
    let mut conns = Vec::new();
    for &b in behaviours {
        let c = tokio::spawn(async move { Connection::connect(addr, &key()).await.unwrap() });
        let a = l.accept().await.unwrap();
        agents.push(tokio::spawn(run_agent(a, b)));
        conns.push(c.await.unwrap());
    }
    let cfg = CoordConfig {
        margin_ns: 50_000_000,
        save_budget_ns: 500_000_000,
        resume_margin_ns: 20_000_000,
        resume_timeout_ns: 1_000_000_000,
        ..CoordConfig::default()
    };
    let manifests = Arc::new(Mutex::new(0));
    let removed = Arc::new(Mutex::new(0));
    let (m2, r2) = (manifests.clone(), removed.clone());
    let outcome = run_round(
        conns,
        CkptId::new(1).unwrap(),
        cfg,
        mono_ns,
        move |_, comps| {
            assert_eq!(comps.len(), 3);
            *m2.lock().unwrap() += 1;
            Ok(())
        },
        move |_| *r2.lock().unwrap() += 1,
    )
    .await;
    let mut logs = Vec::new();
    for a in agents {
        logs.push(tokio::time::timeout(Duration::from_secs(10), a).await.unwrap().unwrap());
    }
    let (manifests, removed) = (*manifests.lock().unwrap(), *removed.lock().unwrap());
    Round { outcome, agents: logs, manifests, removed }
}

#[tokio::test]
async fn round_commits_with_one_d_for_all() {
    let r = round(&[Behaviour::Normal; 3]).await;
    assert!(r.outcome.committed, "{:?}", r.outcome.abort);
    assert_eq!((r.manifests, r.removed), (1, 0));
    assert!(r.outcome.not_resumed.is_empty());
    assert!(r.outcome.stored.iter().all(|s| s.as_ref().is_some_and(|s| s.error.is_none())), "{:?}", r.outcome.stored);
    for a in &r.agents {
        assert_eq!(a.resumed_after, Some(r.outcome.resume_after_ns));
        assert!(!a.discarded);
        assert!(a.stored, "every agent stores its part after the resume");
    }
}

fn assert_aborted_and_others_resumed(r: &Round, bad: usize) {
    assert!(!r.outcome.committed);
    assert_eq!((r.manifests, r.removed), (0, 1), "no manifest, partial state removed");
    for (i, a) in r.agents.iter().enumerate() {
        if i != bad {
            assert_eq!(a.resumed_after, Some(r.outcome.resume_after_ns), "agent {i} keeps running");
            assert!(a.discarded, "agent {i} removes its partial state");
        }
    }
}

#[tokio::test]
async fn agent_dying_between_prepare_and_saved_aborts() {
    let r = round(&[Behaviour::Normal, Behaviour::DropAfterPrepare, Behaviour::Normal]).await;
    assert_eq!(r.outcome.abort, Some(AbortReason::Lost { agent: 1 }));
    assert_aborted_and_others_resumed(&r, 1);
}

#[tokio::test]
async fn failed_save_aborts() {
    let r = round(&[Behaviour::Normal, Behaviour::Normal, Behaviour::SaveFails]).await;
    assert!(matches!(&r.outcome.abort, Some(AbortReason::SaveFailed { agent: 2, reason }) if reason == "disk full"));
    assert_aborted_and_others_resumed(&r, 99);
}

#[tokio::test]
async fn silent_agent_aborts_at_the_deadline() {
    let r = round(&[Behaviour::Hang, Behaviour::Normal, Behaviour::Normal]).await;
    assert_eq!(r.outcome.abort, Some(AbortReason::Deadline { missing: vec![0] }));
    assert!(r.outcome.decided_at >= r.outcome.freeze_at + 500_000_000);
    assert_aborted_and_others_resumed(&r, 99);
}

#[tokio::test]
async fn a_stalled_client_does_not_block_others() {
    let mut l = listener().await;
    let addr = l.local_addr();
    // Connected first, never says anything (its refusal comes at the handshake timeout).
    let mut stalled: Vec<TcpStream> = Vec::new();
    for _ in 0..3 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    let ok = tokio::spawn(async move { Connection::connect(addr, &key()).await });
    let c = tokio::time::timeout(Duration::from_secs(2), l.accept())
        .await
        .expect("served before the stalled ones time out");
    assert!(c.is_ok());
    assert!(ok.await.unwrap().is_ok());
    drop(stalled);
}
