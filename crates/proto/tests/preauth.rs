//! What an unauthenticated peer can make the agent spend: small frames, a
//! short time to say Hello, a few handshakes per source address.

use stasis_proto::auth::Key;
use stasis_proto::transport::{
    Connection, HandshakeError, Listener, RecvError, HELLO_TIMEOUT, MAX_HANDSHAKES_PER_SOURCE, PRE_AUTH_MAX_FRAME,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn key() -> Key {
    Key::new(b"a shared test key, 32 bytes long").unwrap()
}

async fn listener() -> Listener {
    Listener::bind("127.0.0.1:0".parse().unwrap(), key()).await.unwrap()
}

/// A connection from another loopback address (127.0.0.2).
async fn connect_from_other_source(addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    s.connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_flood_of_idle_connections_from_one_source_does_not_lock_out_another() {
    let mut l = listener().await;
    let addr = l.local_addr();
    // Far more idle connections than there are handshake slots.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(connect_from_other_source(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let client = tokio::spawn(async move { Connection::connect(addr, &key()).await });
    let served = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Ok(c) = l.accept().await {
                return c;
            }
        }
    })
    .await
    .expect("the coordinator was locked out by the flood");
    assert!(client.await.unwrap().is_ok());
    assert_eq!(served.peer().ip().to_string(), "127.0.0.1");
    eprintln!("served after {:?} with {} idle connections from 127.0.0.2", t.elapsed(), flood.len());
}

#[tokio::test]
async fn at_most_a_few_handshakes_per_source_are_in_progress() {
    let l = listener().await;
    let addr = l.local_addr();
    let mut conns = Vec::new();
    for _ in 0..MAX_HANDSHAKES_PER_SOURCE + 3 {
        conns.push(connect_from_other_source(addr).await);
        tokio::time::sleep(Duration::from_millis(20)).await; // accepted in this order
    }
    // Within the limit: kept until the Hello timeout. Beyond it: closed at once.
    let reads: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let r = tokio::time::timeout(HELLO_TIMEOUT / 2, s.read(&mut b)).await;
                matches!(r, Ok(Ok(0)) | Ok(Err(_)))
            })
        })
        .collect();
    let mut closed_at_once = Vec::new();
    for r in reads {
        closed_at_once.push(r.await.unwrap());
    }
    let want: Vec<bool> = (0..closed_at_once.len()).map(|i| i >= MAX_HANDSHAKES_PER_SOURCE).collect();
    assert_eq!(closed_at_once, want);
}

#[tokio::test]
async fn a_silent_client_is_cut_after_the_hello_timeout() {
    let mut l = listener().await;
    let _s = TcpStream::connect(l.local_addr()).await.unwrap();
    let t = Instant::now();
    let r = l.accept().await.err().expect("a refusal");
    assert!(matches!(r.error, HandshakeError::HelloTimeout(_)), "{}", r.error);
    assert!(t.elapsed() < HELLO_TIMEOUT + Duration::from_millis(1500), "cut after {:?}", t.elapsed());
}

#[tokio::test]
async fn a_large_frame_before_authentication_is_refused_unread() {
    let mut l = listener().await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    let len = PRE_AUTH_MAX_FRAME + 1;
    s.write_all(&(len as u32).to_be_bytes()).await.unwrap();
    let r = l.accept().await.err().expect("a refusal");
    assert!(matches!(r.error, HandshakeError::Recv(RecvError::PreAuthTooLong { len: 257, max: 256 })), "{}", r.error);
}

/// The proofs cover the version range the coordinator offered: a
/// coordinator proof computed for another range (as after a man in the
/// middle rewrote the Hello to force an older version) is refused.
#[tokio::test]
async fn a_proof_for_another_offered_version_range_is_refused() {
    use stasis_proto::msg::{Auth, Hello, Message, Welcome, MAGIC};
    use stasis_proto::wire::encode_frame;
    let k = key();
    let mut l = listener().await;
    let addr = l.local_addr();
    let handshake = |offered: (u16, u16)| {
        let k = k.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let nonce_c = [9u8; 32];
            let hello = Message::Hello(Hello { magic: MAGIC, min_version: 1, max_version: 1, nonce: nonce_c });
            s.write_all(&encode_frame(&hello.encode()).unwrap()).await.unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut b = vec![0; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut b).await.unwrap();
            let Message::Welcome(Welcome { version, nonce }) = Message::decode(&b).unwrap() else {
                panic!("no Welcome")
            };
            let auth = Message::Auth(Auth { proof: k.coord_proof(version, offered, &nonce_c, &nonce) });
            s.write_all(&encode_frame(&auth.encode()).unwrap()).await.unwrap();
            s.read_exact(&mut len).await.unwrap();
            let mut b = vec![0; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut b).await.unwrap();
            let reply = Message::decode(&b).unwrap();
            match reply {
                Message::Auth(a) => {
                    assert!(k.verify(true, version, (1, 1), &nonce_c, &nonce, &a.proof));
                    assert!(!k.verify(true, version, (1, 9), &nonce_c, &nonce, &a.proof), "names the offered range");
                    true
                }
                _ => false,
            }
        }
    };
    assert!(handshake((1, 1)).await, "the honest proof is accepted and answered");
    assert!(l.accept().await.is_ok());
    assert!(!handshake((1, 9)).await, "a proof for another range is refused");
    let r = l.accept().await.err().expect("a refusal");
    assert!(matches!(r.error, HandshakeError::AuthFailed), "{}", r.error);
}
