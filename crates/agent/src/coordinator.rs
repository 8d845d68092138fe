//! The coordinator of a multi-host experiment (run by the CLI): it talks to
//! every host's agent ([`crate::daemon`]) to bring the experiment up and
//! down, runs checkpoint rounds ([`stasis_proto::transport::run_round`]) and
//! keeps the catalogue: which agent holds which part of which checkpoint.
//!
//! A checkpoint exists once its catalogue manifest is durable
//! (`<state>/<experiment>/multihost/checkpoints/<id>.json`, written, fsynced
//! and renamed, directory fsynced) — the coordinator writes it when every
//! agent has reported SAVED (each agent's part is sealed — durable — on its
//! host before it says so), and only then sends COMMIT. Any failure before
//! that point aborts: every agent resumes and removes its part; nothing is
//! listed. After the resume each agent commits its sealed part into its
//! store and reports STORED; the catalogue then records every part's
//! [`PartState`] (a part whose commit failed makes the checkpoint not
//! restorable, and `list`/`show`/`status` say so).
//!
//! Restore: every agent is brought down, the delay node's host starts it
//! from its part (frozen), every host starts its VMs from its parts
//! (stopped), then all are told to resume at one common instant.

use crate::layout::Layout;
use crate::part::part_name;
use serde::{Deserialize, Serialize};
use stasis_core::clock::realtime_ns;
use stasis_core::spec::Experiment;
use stasis_proto::coordinator::CoordConfig;
use stasis_proto::msg::{CkptId, Op, Request};
use stasis_proto::transport::{run_round, Connection, HandshakeError};
use stasis_proto::{Key, Message};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long connecting to an agent (TCP and handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take (a VM launch from a checkpoint is the slowest).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a coordinator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("experiment {0:?} has no [[host]]: not a multi-host experiment")]
    NotMultiHost(String),
    #[error("cannot reach the agent of host {host:?} at {addr}")]
    Connect {
        host: String,
        addr: std::net::SocketAddr,
        #[source]
        source: HandshakeError,
    },
    #[error("agent of host {host:?}: {message}")]
    Agent { host: String, message: String },
    #[error("agent of host {host:?} went away")]
    Lost { host: String },
    #[error("agent of host {host:?} did not answer within {0:?}", REQUEST_TIMEOUT)]
    Timeout { host: String },
    #[error("checkpoint aborted, experiment resumed: {0}")]
    Aborted(String),
    #[error("a checkpoint named {0:?} exists already")]
    DuplicateName(String),
    #[error("no checkpoint {which:?} (known: {known})")]
    Unknown { which: String, known: String },
    #[error("checkpoint {ckpt} belongs to experiment {found:?} (digest {found_digest}), not to {expected:?} (digest {expected_digest})")]
    Foreign { ckpt: String, found: String, found_digest: String, expected: String, expected_digest: String },
    #[error("checkpoint {ckpt} is listed but not restorable: host {host:?} could not store its part: {reason}")]
    NotStored { ckpt: String, host: String, reason: String },
    #[error("checkpoint {ckpt} is not restorable: host {host:?} could not store its part: {reason}")]
    NotRestorable { ckpt: String, host: String, reason: String },
    #[error("guests not ready after {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged")]
    Catalogue {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One component of a checkpoint as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartComponent {
    pub name: String,
    pub bytes: u64,
    /// BLAKE3, hex.
    pub blake3: String,
    /// Stop instant on the synchronised clock, ns.
    pub stop_ns: u64,
}

/// Where a host's part of a checkpoint is, as the coordinator last heard.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PartState {
    /// Durable on its host (it said SAVED), its store commit not confirmed:
    /// the agent commits it after the resume, else at its next start or at
    /// the next restore. Restorable.
    Sealed,
    /// In its host's store. (Catalogues written before parts were sealed
    /// have no state: their parts were stored before SAVED.)
    #[default]
    Stored,
    /// Its host could not commit it into its store and removed it: the
    /// checkpoint is not restorable.
    Failed { reason: String },
}

/// What one host holds of a checkpoint (in its store, named `mh-<ckpt>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub host: String,
    pub store_name: String,
    pub components: Vec<PartComponent>,
    #[serde(default)]
    pub state: PartState,
}

/// The catalogue's manifest of one multi-host checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MhCheckpoint {
    pub ckpt: u64,
    pub name: Option<String>,
    pub index: u64,
    pub created_unix_ms: u64,
    pub experiment: String,
    pub digest: String,
    pub spec_toml: String,
    /// Planned freeze instant (synchronised clock, ns).
    pub freeze_at: u64,
    /// Largest minus smallest stop instant over every component of every host.
    pub stop_skew_ns: u64,
    pub parts: Vec<Part>,
    pub bytes: u64,
}

impl MhCheckpoint {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.ckpt.to_string())
    }

    /// The first part whose store commit failed (host, reason): the
    /// checkpoint cannot be restored.
    pub fn failed_part(&self) -> Option<(&str, &str)> {
        self.parts.iter().find_map(|p| match &p.state {
            PartState::Failed { reason } => Some((p.host.as_str(), reason.as_str())),
            _ => None,
        })
    }

    /// Hosts whose part is sealed but not confirmed stored.
    pub fn sealed_hosts(&self) -> Vec<&str> {
        self.parts.iter().filter(|p| p.state == PartState::Sealed).map(|p| p.host.as_str()).collect()
    }
}

/// How one host's store commit of its part went, after the resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartStore {
    pub host: String,
    pub state: PartState,
    /// When the commit began (synchronised clock, ns); `None`: not reported.
    pub started_ns: Option<u64>,
    pub commit_ns: Option<u64>,
    /// The latest resume instant the host reported (synchronised clock, ns).
    pub resumed_ns: Option<u64>,
}

/// The result of a checkpoint round.
#[derive(Debug, Clone, Serialize)]
pub struct MhCheckpointSummary {
    pub checkpoint: MhCheckpoint,
    /// The common frozen duration D.
    pub frozen_duration_ns: u64,
    /// Per component: resume − stop − D (how well D was kept), largest magnitude.
    pub max_frozen_error_ns: u64,
    /// From the request to the decision.
    pub round_ns: u64,
    /// Per host, in spec order: its part's store commit after the resume.
    pub stores: Vec<PartStore>,
}

/// The result of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct MhRestoreSummary {
    pub checkpoint: String,
    pub hosts: usize,
    pub restore_ns: u64,
    /// Largest minus smallest reported resume instant.
    pub resume_skew_ns: u64,
}

/// The coordinator of one multi-host experiment.
pub struct Coordinator {
    exp: Experiment,
    /// The master key; host `h`'s agent holds `key.for_host(h)`.
    key: Key,
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CoordError + '_ {
    move |source| CoordError::Io { path: path.to_owned(), source }
}

impl Coordinator {
    pub fn new(exp: Experiment, key: Key, layout: &Layout) -> Result<Coordinator, CoordError> {
        if exp.placement.is_none() {
            return Err(CoordError::NotMultiHost(exp.name.clone()));
        }
        Ok(Coordinator { dir: layout.root().join("multihost"), exp, key })
    }

    fn hosts(&self) -> &[stasis_core::spec::Host] {
        &self.exp.placement.as_ref().expect("checked in new").hosts
    }

    fn delay_host(&self) -> &str {
        &self.exp.placement.as_ref().expect("checked in new").delay_host
    }

    fn catalogue(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// Connect to every agent (in spec order).
    pub async fn connect_all(&self) -> Result<Vec<Connection>, CoordError> {
        let mut out = Vec::new();
        for h in self.hosts() {
            out.push(self.connect(h).await?);
        }
        Ok(out)
    }

    async fn connect(&self, h: &stasis_core::spec::Host) -> Result<Connection, CoordError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(h.agent, &self.key.for_host(&h.name))).await {
            Ok(r) => r.map_err(|source| CoordError::Connect { host: h.name.clone(), addr: h.agent, source }),
            Err(_) => Err(CoordError::Connect { host: h.name.clone(), addr: h.agent, source: HandshakeError::Timeout }),
        }
    }

    async fn request(&self, host: usize, conn: &mut Connection, op: Op) -> Result<serde_json::Value, CoordError> {
        let name = self.hosts()[host].name.clone();
        let id = realtime_ns();
        conn.send(&Message::Request(Request { id, op })).await.map_err(|_| CoordError::Lost { host: name.clone() })?;
        let wait = async {
            loop {
                match conn.recv().await {
                    Ok(Message::Reply(r)) if r.id == id => return Ok(r),
                    Ok(Message::Error(e)) => return Err(CoordError::Agent { host: name.clone(), message: e.message }),
                    Ok(other) => tracing::debug!(host = %name, got = other.name(), "ignored while waiting for a reply"),
                    Err(_) => return Err(CoordError::Lost { host: name.clone() }),
                }
            }
        };
        let r = tokio::time::timeout(REQUEST_TIMEOUT, wait)
            .await
            .map_err(|_| CoordError::Timeout { host: name.clone() })??;
        if !r.ok {
            return Err(CoordError::Agent { host: name, message: r.message });
        }
        Ok(serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null))
    }

    /// Send `op(host)` to every agent at once; the first error wins.
    async fn request_all(
        &self,
        conns: &mut [Connection],
        op: impl Fn(&str) -> Option<Op>,
    ) -> Result<Vec<serde_json::Value>, CoordError> {
        let futs = conns.iter_mut().enumerate().map(|(i, c)| {
            let op = op(&self.hosts()[i].name);
            async move {
                match op {
                    Some(op) => self.request(i, c, op).await,
                    None => Ok(serde_json::Value::Null),
                }
            }
        });
        futures::future::join_all(futs).await.into_iter().collect()
    }

    fn start_op(&self, host: &str, delay: bool, vms: bool, restore: Option<CkptId>, spec_toml: &str) -> Op {
        Op::Start { spec_toml: spec_toml.to_owned(), host: host.to_owned(), delay, vms, restore }
    }

    /// Bring every host's share up: the delay node first (VMs on other
    /// hosts connect to it at start), then every VM; then, with
    /// `wait_ready`, wait until every guest has booted.
    pub async fn up(&self, wait_ready: Option<Duration>) -> Result<Vec<serde_json::Value>, CoordError> {
        let mut conns = self.connect_all().await?;
        let spec = self.exp.to_toml();
        let d = self.hosts().iter().position(|h| h.name == self.delay_host()).expect("validated");
        self.request(d, &mut conns[d], self.start_op(self.delay_host(), true, false, None, &spec)).await?;
        self.request_all(&mut conns, |h| Some(self.start_op(h, false, true, None, &spec))).await?;
        if let Some(timeout) = wait_ready {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let st = self.request_all(&mut conns, |_| Some(Op::Status)).await?;
                let pending: Vec<String> = st
                    .iter()
                    .flat_map(|s| s["vms"].as_array().cloned().unwrap_or_default())
                    .filter(|v| !v["ready"].as_bool().unwrap_or(false))
                    .map(|v| v["name"].as_str().unwrap_or("?").to_owned())
                    .collect();
                if pending.is_empty() {
                    return Ok(st);
                }
                if std::time::Instant::now() > deadline {
                    return Err(CoordError::NotReady(timeout, pending.join(", ")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.request_all(&mut conns, |_| Some(Op::Status)).await
    }

    /// What every agent runs.
    pub async fn status(&self) -> Result<Vec<serde_json::Value>, CoordError> {
        let mut conns = self.connect_all().await?;
        self.request_all(&mut conns, |_| Some(Op::Status)).await
    }

    /// Stop everything on every host (unreachable hosts are reported, the
    /// others still stopped).
    pub async fn down(&self) -> Result<u64, CoordError> {
        let mut stopped = 0;
        let mut first_err = None;
        for (i, h) in self.hosts().iter().enumerate() {
            let r = match self.connect(h).await {
                Ok(mut c) => self.request(i, &mut c, Op::Down).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => stopped += v["stopped"].as_u64().unwrap_or(0),
                Err(e) => {
                    tracing::warn!(error = %e, "down");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stopped),
        }
    }

    /// Every checkpoint in the catalogue, oldest first.
    pub fn list(&self) -> Result<Vec<MhCheckpoint>, CoordError> {
        let dir = self.catalogue();
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => return Err(CoordError::Io { path: dir, source }),
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read(&p).map_err(io(&p))?;
            out.push(
                serde_json::from_slice(&text).map_err(|source| CoordError::Catalogue { path: p.clone(), source })?,
            );
        }
        out.sort_by_key(|c: &MhCheckpoint| (c.index, c.ckpt));
        Ok(out)
    }

    /// A checkpoint by name, id, index (`3` or `#3`) or `latest`.
    pub fn open(&self, which: &str) -> Result<MhCheckpoint, CoordError> {
        let all = self.list()?;
        let idx = which.strip_prefix('#').unwrap_or(which).parse::<u64>().ok();
        let found = if which == "latest" {
            all.last().cloned()
        } else {
            all.iter()
                .find(|c| c.name.as_deref() == Some(which) || c.ckpt.to_string() == which || Some(c.index) == idx)
                .cloned()
        };
        found.ok_or_else(|| CoordError::Unknown {
            which: which.into(),
            known: if all.is_empty() {
                "none".into()
            } else {
                all.iter().map(|c| format!("#{} {}", c.index, c.label())).collect::<Vec<_>>().join(", ")
            },
        })
    }

    fn write_manifest(&self, m: &MhCheckpoint) -> Result<(), CoordError> {
        let dir = self.catalogue();
        stasis_core::private::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{}.json", m.ckpt));
        let tmp = dir.join(format!(".{}.json.tmp", m.ckpt));
        let mut f = stasis_core::private::create_file(&tmp).map_err(io(&tmp))?;
        f.write_all(&serde_json::to_vec_pretty(m).expect("serialises")).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
        Ok(())
    }

    /// One checkpoint across every host.
    pub async fn checkpoint(&self, name: Option<&str>, cfg: CoordConfig) -> Result<MhCheckpointSummary, CoordError> {
        let existing = self.list()?;
        if let Some(n) = name {
            if existing.iter().any(|c| c.name.as_deref() == Some(n)) {
                return Err(CoordError::DuplicateName(n.into()));
            }
        }
        let index = existing.iter().map(|c| c.index).max().unwrap_or(0) + 1;
        let mut conns = self.connect_all().await?;
        self.collect_orphans(&mut conns, &existing).await?;
        let id = realtime_ns();
        let ckpt = CkptId::new(id).expect("the clock is past 1970");
        let hosts: Vec<String> = self.hosts().iter().map(|h| h.name.clone()).collect();
        let mut written: Option<MhCheckpoint> = None;
        let mut commit_err = None;
        let started = realtime_ns();
        let freeze_at = started + cfg.margin_ns;
        let outcome = run_round(
            conns,
            ckpt,
            cfg,
            realtime_ns,
            |ckpt, comps| {
                let parts: Vec<Part> = comps
                    .iter()
                    .map(|(i, cs)| Part {
                        host: hosts[*i].clone(),
                        store_name: part_name(ckpt),
                        components: cs
                            .iter()
                            .map(|c| PartComponent {
                                name: c.name.clone(),
                                bytes: c.bytes,
                                blake3: c.blake3.iter().map(|b| format!("{b:02x}")).collect(),
                                stop_ns: c.stop_ns,
                            })
                            .collect(),
                        state: PartState::Sealed,
                    })
                    .collect();
                let stops: Vec<u64> = parts.iter().flat_map(|p| p.components.iter().map(|c| c.stop_ns)).collect();
                let m = MhCheckpoint {
                    ckpt: ckpt.get(),
                    name: name.map(str::to_owned),
                    index,
                    created_unix_ms: realtime_ns() / 1_000_000,
                    experiment: self.exp.name.clone(),
                    digest: self.exp.digest(),
                    spec_toml: self.exp.to_toml(),
                    freeze_at,
                    stop_skew_ns: stops.iter().max().unwrap_or(&0) - stops.iter().min().unwrap_or(&0),
                    bytes: parts.iter().flat_map(|p| p.components.iter().map(|c| c.bytes)).sum(),
                    parts,
                };
                match self.write_manifest(&m) {
                    Ok(()) => {
                        written = Some(m);
                        Ok(())
                    }
                    Err(e) => {
                        let s = format!("{e}: {}", e.source_chain());
                        commit_err = Some(s.clone());
                        Err(s)
                    }
                }
            },
            |ckpt| {
                let p = self.catalogue().join(format!("{ckpt}.json"));
                let _ = std::fs::remove_file(p);
            },
        )
        .await;
        if !outcome.committed {
            let reason = match &outcome.abort {
                Some(stasis_proto::AbortReason::SaveFailed { agent, reason }) => {
                    format!("host {:?} could not save: {reason}", self.hosts()[*agent].name)
                }
                Some(stasis_proto::AbortReason::Deadline { missing }) => {
                    format!(
                        "no SAVED by the deadline from {}",
                        missing.iter().map(|i| self.hosts()[*i].name.clone()).collect::<Vec<_>>().join(", ")
                    )
                }
                Some(stasis_proto::AbortReason::Lost { agent }) => {
                    format!("lost the agent of host {:?} before it saved", self.hosts()[*agent].name)
                }
                Some(stasis_proto::AbortReason::Manifest(m)) => format!("catalogue manifest: {m}"),
                None => "unknown".into(),
            };
            return Err(CoordError::Aborted(reason));
        }
        let mut m = written.expect("committed means the manifest was written");
        let stores = self.record_stores(&mut m, &outcome);
        let d = outcome.resume_after_ns;
        let max_err = outcome
            .resumed
            .iter()
            .flatten()
            .flatten()
            .map(|r| (r.resume_ns.saturating_sub(r.stop_ns) as i64 - d as i64).unsigned_abs())
            .max()
            .unwrap_or(0);
        if !outcome.not_resumed.is_empty() {
            tracing::error!(hosts = ?outcome.not_resumed, "checkpoint committed but some hosts did not report resuming");
        }
        if let Some((host, reason)) = m.failed_part() {
            return Err(CoordError::NotStored { ckpt: m.label(), host: host.into(), reason: reason.into() });
        }
        Ok(MhCheckpointSummary {
            checkpoint: m,
            frozen_duration_ns: d,
            max_frozen_error_ns: max_err,
            round_ns: outcome.decided_at.saturating_sub(outcome.started),
            stores,
        })
    }

    /// Record in the catalogue what every host reported of its store
    /// commit (a part not heard of stays sealed).
    fn record_stores(&self, m: &mut MhCheckpoint, outcome: &stasis_proto::Outcome) -> Vec<PartStore> {
        let mut out = Vec::new();
        for (i, h) in self.hosts().iter().enumerate() {
            let stored = outcome.stored.get(i).cloned().flatten();
            let state = match &stored {
                Some(s) => match &s.error {
                    None => PartState::Stored,
                    Some(reason) => PartState::Failed { reason: reason.clone() },
                },
                None => PartState::Sealed,
            };
            if let Some(p) = m.parts.iter_mut().find(|p| p.host == h.name) {
                p.state = state.clone();
            }
            let resumed_ns = outcome.resumed.get(i).into_iter().flatten().flatten().map(|r| r.resume_ns).max();
            out.push(PartStore {
                host: h.name.clone(),
                state,
                started_ns: stored.as_ref().map(|s| s.started_ns),
                commit_ns: stored.as_ref().map(|s| s.commit_ns),
                resumed_ns,
            });
        }
        if let Err(e) = self.write_manifest(m) {
            // The catalogue keeps saying "sealed": true of what the hosts hold
            // unless a part failed, which the caller reports as well.
            tracing::error!(ckpt = m.ckpt, error = %e, "cannot record the parts' store commits in the catalogue");
        }
        out
    }

    /// Remove parts the agents hold of checkpoints the catalogue does not
    /// list: left by a round that aborted while their host was unreachable
    /// (an agent that resumed on its own keeps its files, in case the
    /// coordinator committed just before it was lost).
    async fn collect_orphans(&self, conns: &mut [Connection], listed: &[MhCheckpoint]) -> Result<(), CoordError> {
        let st = self.request_all(conns, |_| Some(Op::Status)).await?;
        for (i, s) in st.iter().enumerate() {
            for part in s["parts"].as_array().into_iter().flatten().filter_map(|p| p.as_str()) {
                let Some(id) = part.strip_prefix("mh-").and_then(|x| x.parse::<u64>().ok()) else { continue };
                if listed.iter().any(|c| c.ckpt == id) {
                    continue;
                }
                let Some(ckpt) = CkptId::new(id) else { continue };
                tracing::info!(host = %self.hosts()[i].name, part, "removing a part of an aborted checkpoint");
                self.request(i, &mut conns[i], Op::Forget { ckpt }).await?;
            }
        }
        Ok(())
    }

    /// Replace what runs on every host by checkpoint `which`, all resumed at
    /// one instant `margin_ns` after everything is loaded.
    pub async fn restore(&self, which: &str, margin_ns: u64) -> Result<MhRestoreSummary, CoordError> {
        let m = self.open(which)?;
        if let Some((host, reason)) = m.failed_part() {
            return Err(CoordError::NotRestorable { ckpt: m.label(), host: host.into(), reason: reason.into() });
        }
        if m.experiment != self.exp.name || m.digest != self.exp.digest() {
            return Err(CoordError::Foreign {
                ckpt: m.label(),
                found: m.experiment,
                found_digest: m.digest,
                expected: self.exp.name.clone(),
                expected_digest: self.exp.digest(),
            });
        }
        let started = realtime_ns();
        let ckpt = CkptId::new(m.ckpt).expect("catalogue ids are nonzero");
        let mut conns = self.connect_all().await?;
        self.request_all(&mut conns, |_| Some(Op::Down)).await?;
        let spec = m.spec_toml.clone();
        let d = self.hosts().iter().position(|h| h.name == self.delay_host()).expect("validated");
        self.request(d, &mut conns[d], self.start_op(self.delay_host(), true, false, Some(ckpt), &spec)).await?;
        self.request_all(&mut conns, |h| Some(self.start_op(h, false, true, Some(ckpt), &spec))).await?;
        let at = realtime_ns() + margin_ns;
        let resumed = self.request_all(&mut conns, |_| Some(Op::ResumeAt { at })).await?;
        let instants: Vec<u64> =
            resumed.iter().filter_map(|v| v.as_object()).flat_map(|o| o.values().filter_map(|x| x.as_u64())).collect();
        Ok(MhRestoreSummary {
            checkpoint: m.label(),
            hosts: conns.len(),
            restore_ns: realtime_ns() - started,
            resume_skew_ns: instants.iter().max().unwrap_or(&0) - instants.iter().min().unwrap_or(&0),
        })
    }
}

trait SourceChain {
    fn source_chain(&self) -> String;
}

impl<E: std::error::Error> SourceChain for E {
    fn source_chain(&self) -> String {
        let mut out = Vec::new();
        let mut cur = self.source();
        while let Some(c) = cur {
            out.push(c.to_string());
            cur = c.source();
        }
        out.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(host: &str, state: PartState) -> Part {
        Part { host: host.into(), store_name: "mh-1".into(), components: vec![], state }
    }

    fn ckpt(parts: Vec<Part>) -> MhCheckpoint {
        MhCheckpoint {
            ckpt: 1,
            name: None,
            index: 1,
            created_unix_ms: 0,
            experiment: "mh".into(),
            digest: "d".into(),
            spec_toml: String::new(),
            freeze_at: 0,
            stop_skew_ns: 0,
            parts,
            bytes: 0,
        }
    }

    #[test]
    fn a_failed_part_makes_the_checkpoint_not_restorable_and_sealed_ones_are_named() {
        let c = ckpt(vec![part("h1", PartState::Stored), part("h2", PartState::Sealed)]);
        assert_eq!(c.failed_part(), None);
        assert_eq!(c.sealed_hosts(), vec!["h2"]);
        let c = ckpt(vec![part("h1", PartState::Failed { reason: "disk full".into() }), part("h2", PartState::Stored)]);
        assert_eq!(c.failed_part(), Some(("h1", "disk full")));
        let back: MhCheckpoint = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c, "the state is kept in the catalogue");
    }

    #[test]
    fn parts_of_catalogues_from_before_sealing_are_stored() {
        let old = r#"{"host": "h1", "store_name": "mh-1", "components": []}"#;
        let p: Part = serde_json::from_str(old).unwrap();
        assert_eq!(p.state, PartState::Stored, "they were committed before SAVED");
    }
}
