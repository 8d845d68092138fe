//! Fuzzing every decoder of outside bytes (frames, messages, sealed frames)
//! and the state machines with arbitrary input: nothing panics, and every
//! message survives a round trip.

use proptest::prelude::*;
use stasis_proto::agent::{AgentConfig, AgentCore};
use stasis_proto::auth::{Direction, Key, Opener, Sealer};
use stasis_proto::coordinator::{CoordConfig, CoordinatorCore};
use stasis_proto::msg::*;
use stasis_proto::wire::{decode_frame, encode_frame, MAX_FRAME};

fn ckpt() -> impl Strategy<Value = CkptId> {
    // Mostly the round's own id (1), so the state machines get past the id check.
    prop_oneof![3 => Just(1u64), 1 => 1u64..].prop_map(|n| CkptId::new(n).unwrap())
}

fn component() -> impl Strategy<Value = Component> {
    (".{0,12}", any::<u64>(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(name, bytes, blake3, stop_ns)| Component {
        name,
        bytes,
        blake3,
        stop_ns,
    })
}

fn message() -> impl Strategy<Value = Message> {
    let code = prop_oneof![
        Just(ErrorCode::BadMagic),
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::AuthFailed),
        Just(ErrorCode::Malformed),
        Just(ErrorCode::OutOfOrder),
        Just(ErrorCode::Internal)
    ];
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>(), any::<u16>(), any::<[u8; 32]>()).prop_map(
            |(magic, min_version, max_version, nonce)| Message::Hello(Hello { magic, min_version, max_version, nonce })
        ),
        (any::<u16>(), any::<[u8; 32]>()).prop_map(|(version, nonce)| Message::Welcome(Welcome { version, nonce })),
        any::<[u8; 32]>().prop_map(|proof| Message::Auth(Auth { proof })),
        (ckpt(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(ckpt, freeze_at, hold_lead_ns, deadline)| {
            Message::Prepare(Prepare { ckpt, freeze_at, hold_lead_ns, deadline })
        }),
        (ckpt(), prop::collection::vec(component(), 0..4))
            .prop_map(|(ckpt, components)| Message::Saved(Saved { ckpt, components })),
        (ckpt(), ".{0,20}", prop::collection::vec(any::<u64>(), 0..4))
            .prop_map(|(ckpt, reason, stops_ns)| Message::SaveFailed(SaveFailed { ckpt, reason, stops_ns })),
        (ckpt(), any::<u64>()).prop_map(|(ckpt, resume_after_ns)| Message::Commit(Commit { ckpt, resume_after_ns })),
        (ckpt(), any::<u64>()).prop_map(|(ckpt, resume_after_ns)| Message::Abort(Abort { ckpt, resume_after_ns })),
        (ckpt(), prop::collection::vec((".{0,8}", any::<u64>(), any::<u64>()), 0..4)).prop_map(|(ckpt, v)| {
            Message::Resumed(Resumed {
                ckpt,
                components: v
                    .into_iter()
                    .map(|(name, stop_ns, resume_ns)| ResumedComponent { name, stop_ns, resume_ns })
                    .collect(),
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_ns)| Message::Ping(Ping { seq, sent_ns })),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, sent_ns, agent_ns)| Message::Pong(Pong {
            seq,
            sent_ns,
            agent_ns
        })),
        (code, ".{0,20}").prop_map(|(code, message)| Message::Error(ErrorMsg { code, message })),
    ]
}

fn session() -> (Sealer, Opener) {
    let k = Key::new(&[5; 32]).unwrap().session(1, (1, 1), &[1; 32], &[2; 32]);
    (Sealer::new(k.clone(), Direction::ToAgent), Opener::new(k, Direction::ToAgent))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn frame_decoder_never_panics(buf in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(Some((payload, used))) = decode_frame(&buf) {
            prop_assert_eq!(used, payload.len() + 4);
            prop_assert!(used <= buf.len() && !payload.is_empty() && payload.len() <= MAX_FRAME);
        }
    }

    #[test]
    fn message_decoder_never_panics(buf in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Message::decode(&buf) {
            prop_assert_ne!(buf[0], 0);
            prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn typed_garbage_never_panics(t in 1u8..=12, body in prop::collection::vec(any::<u8>(), 0..128)) {
        let mut buf = vec![t];
        buf.extend(body);
        let _ = Message::decode(&buf);
    }

    #[test]
    fn sealed_frame_opener_never_panics(buf in prop::collection::vec(any::<u8>(), 0..128)) {
        let (_, mut o) = session();
        prop_assert!(o.open(&buf).is_err(), "random bytes never carry a valid MAC");
    }

    #[test]
    fn every_message_round_trips(m in message()) {
        prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m.clone());
        let frame = encode_frame(&m.encode()).unwrap();
        let (payload, used) = decode_frame(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(Message::decode(payload).unwrap(), m.clone());
        let (mut s, mut o) = session();
        prop_assert_eq!(o.open(&s.seal(&m)).unwrap(), m);
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = m.encode();
        let i = flip.index(b.len());
        b[i] ^= 1 << bit;
        let _ = Message::decode(&b);
        let _ = Message::decode(&b[..cut.index(b.len())]);
        // A flipped bit in a sealed frame is always caught by the MAC or the sequence check.
        let (mut s, mut o) = session();
        let mut f = s.seal(&m);
        let j = flip.index(f.len());
        f[j] ^= 1 << bit;
        prop_assert!(o.open(&f).is_err());
    }

    #[test]
    fn agent_core_survives_any_message_sequence(msgs in prop::collection::vec((message(), 0u8..6), 0..24)) {
        let mut a = AgentCore::new(AgentConfig::default());
        let mut now = 0u64;
        for (m, host) in msgs {
            now += 1_000_000;
            let _ = a.on_message(now, m);
            let _ = match host {
                0 => a.frozen(now).map(|_| ()),
                1 => a.saved(now, vec![]).map(|_| ()),
                2 => a.save_failed(now, "x".into(), vec![]).map(|_| ()),
                3 => a.resumed(now, vec![]).map(|_| ()),
                4 => { let _ = a.tick(now.saturating_mul(1_000)); Ok(()) }
                _ => { let _ = a.disconnected(now); Ok(()) }
            };
        }
    }

    #[test]
    fn coordinator_core_survives_any_input(inputs in prop::collection::vec((message(), 0usize..5, 0u8..5), 0..32)) {
        let mut c = CoordinatorCore::new(CkptId::new(1).unwrap(), 4, CoordConfig::default());
        let mut now = 1_000u64;
        let _ = c.start(now);
        for (m, from, what) in inputs {
            now += 100_000_000;
            match what {
                0 | 1 => { let _ = c.on_message(now, from, m); }
                4 => {
                    // Resumed/Saved are what agents send most; force them often.
                    let ckpt = CkptId::new(1).unwrap();
                    let _ = c.on_message(now, from, Message::Saved(Saved { ckpt, components: vec![] }));
                    let _ = c.on_message(now, from, Message::Resumed(Resumed { ckpt, components: vec![] }));
                }
                2 => { let _ = c.on_disconnect(now, from); }
                _ => { let _ = c.on_timer(now); }
            }
        }
    }
}
