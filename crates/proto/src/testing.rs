//! Sample values for tests and fuzzing: one message of every type.

use crate::msg::*;

/// One message of every type, each with non-default fields.
pub fn one_of_each() -> Vec<Message> {
    let ckpt = CkptId::new(42).expect("nonzero");
    vec![
        Message::Hello(Hello { magic: MAGIC, min_version: 1, max_version: 3, nonce: [1; 32] }),
        Message::Welcome(Welcome { version: 1, nonce: [2; 32] }),
        Message::Auth(Auth { proof: [4; 32] }),
        Message::Prepare(Prepare { ckpt, freeze_at: 1 << 40, hold_lead_ns: 20_000_000, deadline: (1 << 40) + 5 }),
        Message::Saved(Saved {
            ckpt,
            components: vec![Component { name: "vm-a".into(), bytes: 93 << 20, blake3: [5; 32], stop_ns: 77 }],
        }),
        Message::SaveFailed(SaveFailed { ckpt, reason: "disk full".into(), stops_ns: vec![1, 2] }),
        Message::Commit(Commit { ckpt, resume_after_ns: 900_000_000 }),
        Message::Abort(Abort { ckpt, resume_after_ns: 800_000_000 }),
        Message::Resumed(Resumed {
            ckpt,
            components: vec![ResumedComponent { name: "vm-a".into(), stop_ns: 77, resume_ns: 99 }],
        }),
        Message::Ping(Ping { seq: 9, sent_ns: 10 }),
        Message::Pong(Pong { seq: 9, sent_ns: 10, agent_ns: 11 }),
        Message::Error(ErrorMsg { code: ErrorCode::AuthFailed, message: "wrong key".into() }),
        Message::Request(Request {
            id: 3,
            op: Op::Start {
                spec_toml: "name = \"x\"".into(),
                host: "h1".into(),
                delay: true,
                vms: false,
                restore: Some(ckpt),
            },
        }),
        Message::Reply(Reply { id: 3, ok: false, message: "no such checkpoint".into(), detail: "{}".into() }),
        Message::Stored(Stored {
            ckpt,
            started_ns: 1 << 40,
            commit_ns: 2_000_000_000,
            error: Some("disk full".into()),
        }),
    ]
}

/// One request of every operation.
pub fn every_op() -> Vec<Message> {
    let ckpt = CkptId::new(42).expect("nonzero");
    [
        Op::Start { spec_toml: "name = \"x\"".into(), host: "h1".into(), delay: false, vms: true, restore: None },
        Op::ResumeAt { at: 1 << 41 },
        Op::Down,
        Op::Status,
        Op::Forget { ckpt },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, op)| Message::Request(Request { id: i as u64 + 1, op }))
    .collect()
}
