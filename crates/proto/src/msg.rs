//! The messages of the checkpoint protocol and their encoding: one type id
//! byte (0 is reserved and always invalid) followed by the postcard encoding
//! of the message body, with no trailing bytes allowed.

use serde::{Deserialize, Serialize};
use std::num::NonZeroU64;

/// Magic carried by [`Hello`]: "STSP" (stasis protocol).
pub const MAGIC: [u8; 4] = *b"STSP";
/// The protocol versions this build speaks.
pub const MIN_VERSION: u16 = 1;
/// See [`MIN_VERSION`].
pub const MAX_VERSION: u16 = 1;

/// A checkpoint's id: never 0 (0 is the reserved invalid value; postcard
/// refuses to decode it into a `NonZeroU64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CkptId(pub NonZeroU64);

impl CkptId {
    /// `None` for the reserved value 0.
    pub fn new(id: u64) -> Option<CkptId> {
        NonZeroU64::new(id).map(CkptId)
    }
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl std::fmt::Display for CkptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// First message, coordinator → agent: who I am and which versions I speak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub min_version: u16,
    pub max_version: u16,
    pub nonce: [u8; 32],
}

/// Agent → coordinator: the chosen version and the agent's nonce. No proof:
/// the client proves the key first ([`Auth`]), so a peer without the key
/// learns nothing computed from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    pub nonce: [u8; 32],
}

/// The sender's proof of the key (crate::auth): coordinator → agent first
/// (`"stasis coord"`), then agent → coordinator (`"stasis agent"`) once the
/// agent has checked the coordinator's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub proof: [u8; 32],
}

/// Freeze everything at `freeze_at` and save; report by `deadline`.
/// Instants are nanoseconds of the synchronised clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub ckpt: CkptId,
    pub freeze_at: u64,
    /// How long before its VM stops the delay node stops delivering to it.
    pub hold_lead_ns: u64,
    pub deadline: u64,
}

/// One saved component (a VM, a disk overlay, a delay node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub bytes: u64,
    pub blake3: [u8; 32],
    /// Measured stop instant on the synchronised clock.
    pub stop_ns: u64,
}

/// Agent → coordinator: everything on this host is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub ckpt: CkptId,
    pub components: Vec<Component>,
}

/// Agent → coordinator: this host could not save; the checkpoint must abort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveFailed {
    pub ckpt: CkptId,
    pub reason: String,
    /// Stop instants of the components that did stop (for the D rule).
    pub stops_ns: Vec<u64>,
}

/// Coordinator → agent: the manifest is durable; resume every component
/// `resume_after_ns` (D) after its own stop, keep the saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub ckpt: CkptId,
    pub resume_after_ns: u64,
}

/// Coordinator → agent: give up; resume D after each own stop, remove the
/// partial state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub ckpt: CkptId,
    pub resume_after_ns: u64,
}

/// One component's resume instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumedComponent {
    pub name: String,
    pub stop_ns: u64,
    pub resume_ns: u64,
}

/// Agent → coordinator: everything runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub ckpt: CkptId,
    pub components: Vec<ResumedComponent>,
}

/// Agent → coordinator, after [`Resumed`] of a committed round: this
/// host's part, sealed (durable) before [`Saved`], has been committed into
/// its store after the resume — or could not be (`error`), and is then
/// gone: the checkpoint is not restorable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub ckpt: CkptId,
    /// When the store commit began (synchronised clock, ns): after every
    /// local component resumed.
    pub started_ns: u64,
    /// How long it took.
    pub commit_ns: u64,
    /// Why it failed; `None`: stored.
    pub error: Option<String>,
}

/// RTT probe (for the freeze margin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub seq: u64,
    pub sent_ns: u64,
}

/// Answer to [`Ping`], with the agent's synchronised clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub seq: u64,
    pub sent_ns: u64,
    pub agent_ns: u64,
}

/// Coordinator → agent: one operation outside a checkpoint round (bring
/// this host's share of an experiment up or down, restore it, resume it).
/// Answered by a [`Reply`] with the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// What a [`Request`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Start this host's share of the experiment `spec_toml` (canonical
    /// TOML with `[[host]]`s), acting as host `host`: the delay node when
    /// `delay` (and it is placed here), the VMs when `vms`. With `restore`
    /// everything starts from this host's part of that checkpoint, stopped,
    /// until [`Op::ResumeAt`].
    Start { spec_toml: String, host: String, delay: bool, vms: bool, restore: Option<CkptId> },
    /// Resume every stopped component at `at` (synchronised clock, ns).
    ResumeAt { at: u64 },
    /// Stop every process of the experiment on this host.
    Down,
    /// What runs here (JSON in the reply's `detail`).
    Status,
    /// Remove this host's part of a checkpoint.
    Forget { ckpt: CkptId },
}

/// Agent → coordinator: the outcome of a [`Request`]; `detail` is JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub ok: bool,
    pub message: String,
    pub detail: String,
}

/// Why a peer refuses something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadMagic,
    VersionMismatch,
    AuthFailed,
    Malformed,
    OutOfOrder,
    Internal,
}

/// A refusal; the sender closes the connection after it when it is fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
}

/// Every protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Auth(Auth),
    Prepare(Prepare),
    Saved(Saved),
    SaveFailed(SaveFailed),
    Commit(Commit),
    Abort(Abort),
    Resumed(Resumed),
    Ping(Ping),
    Pong(Pong),
    Error(ErrorMsg),
    Request(Request),
    Reply(Reply),
    Stored(Stored),
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message type 0 is reserved and invalid")]
    ReservedType,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed {kind} body")]
    Body {
        kind: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{0} trailing bytes after the {1} body")]
    Trailing(usize, &'static str),
}

fn body<'a, T: Deserialize<'a>>(kind: &'static str, b: &'a [u8]) -> Result<T, DecodeError> {
    let (v, rest) = postcard::take_from_bytes(b).map_err(|source| DecodeError::Body { kind, source })?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len(), kind));
    }
    Ok(v)
}

impl Message {
    /// The type id on the wire (never 0).
    pub fn type_id(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome(_) => 2,
            Message::Auth(_) => 3,
            Message::Prepare(_) => 4,
            Message::Saved(_) => 5,
            Message::SaveFailed(_) => 6,
            Message::Commit(_) => 7,
            Message::Abort(_) => 8,
            Message::Resumed(_) => 9,
            Message::Ping(_) => 10,
            Message::Pong(_) => 11,
            Message::Error(_) => 12,
            Message::Request(_) => 13,
            Message::Reply(_) => 14,
            Message::Stored(_) => 15,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Auth(_) => "Auth",
            Message::Prepare(_) => "Prepare",
            Message::Saved(_) => "Saved",
            Message::SaveFailed(_) => "SaveFailed",
            Message::Commit(_) => "Commit",
            Message::Abort(_) => "Abort",
            Message::Resumed(_) => "Resumed",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::Error(_) => "Error",
            Message::Request(_) => "Request",
            Message::Reply(_) => "Reply",
            Message::Stored(_) => "Stored",
        }
    }

    /// Type id followed by the postcard body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.type_id()];
        // Serialising plain structs into a Vec cannot fail.
        let r = match self {
            Message::Hello(m) => postcard::to_extend(m, out),
            Message::Welcome(m) => postcard::to_extend(m, out),
            Message::Auth(m) => postcard::to_extend(m, out),
            Message::Prepare(m) => postcard::to_extend(m, out),
            Message::Saved(m) => postcard::to_extend(m, out),
            Message::SaveFailed(m) => postcard::to_extend(m, out),
            Message::Commit(m) => postcard::to_extend(m, out),
            Message::Abort(m) => postcard::to_extend(m, out),
            Message::Resumed(m) => postcard::to_extend(m, out),
            Message::Ping(m) => postcard::to_extend(m, out),
            Message::Pong(m) => postcard::to_extend(m, out),
            Message::Error(m) => postcard::to_extend(m, out),
            Message::Request(m) => postcard::to_extend(m, out),
            Message::Reply(m) => postcard::to_extend(m, out),
            Message::Stored(m) => postcard::to_extend(m, out),
        };
        out = r.expect("postcard into a Vec");
        out
    }

    /// Parse one message; refuses type 0, unknown types, malformed bodies
    /// and trailing bytes.
    pub fn decode(b: &[u8]) -> Result<Message, DecodeError> {
        let (&t, rest) = b.split_first().ok_or(DecodeError::Empty)?;
        Ok(match t {
            0 => return Err(DecodeError::ReservedType),
            1 => Message::Hello(body("Hello", rest)?),
            2 => Message::Welcome(body("Welcome", rest)?),
            3 => Message::Auth(body("Auth", rest)?),
            4 => Message::Prepare(body("Prepare", rest)?),
            5 => Message::Saved(body("Saved", rest)?),
            6 => Message::SaveFailed(body("SaveFailed", rest)?),
            7 => Message::Commit(body("Commit", rest)?),
            8 => Message::Abort(body("Abort", rest)?),
            9 => Message::Resumed(body("Resumed", rest)?),
            10 => Message::Ping(body("Ping", rest)?),
            11 => Message::Pong(body("Pong", rest)?),
            12 => Message::Error(body("Error", rest)?),
            13 => Message::Request(body("Request", rest)?),
            14 => Message::Reply(body("Reply", rest)?),
            15 => Message::Stored(body("Stored", rest)?),
            t => return Err(DecodeError::UnknownType(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> CkptId {
        CkptId::new(n).unwrap()
    }

    #[test]
    fn type_zero_is_refused() {
        assert_eq!(Message::decode(&[0]), Err(DecodeError::ReservedType));
        assert_eq!(Message::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Message::decode(&[200]), Err(DecodeError::UnknownType(200)));
    }

    #[test]
    fn checkpoint_id_zero_is_refused_on_the_wire() {
        assert!(CkptId::new(0).is_none());
        let mut b = Message::Commit(Commit { ckpt: id(1), resume_after_ns: 5 }).encode();
        assert_eq!(b[1], 1); // varint of the id
        b[1] = 0;
        assert!(matches!(Message::decode(&b), Err(DecodeError::Body { kind: "Commit", .. })));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut b = Message::Ping(Ping { seq: 1, sent_ns: 2 }).encode();
        b.push(0);
        assert_eq!(Message::decode(&b), Err(DecodeError::Trailing(1, "Ping")));
    }

    #[test]
    fn every_request_round_trips() {
        for m in crate::testing::every_op() {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn type_ids_are_distinct_and_nonzero() {
        let all = crate::testing::one_of_each();
        let mut ids: Vec<u8> = all.iter().map(|m| m.type_id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        assert!(ids[0] != 0);
        for m in all {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }
}
