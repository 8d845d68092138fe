//! A Garage cluster for the object-store tests: one node per place (a lab
//! host's network namespace, or loopback ports for tests without a lab),
//! replication factor 3, consistent mode, one bucket and one access key.
//! The binary is the one `scripts/garage.sh` caches under
//! `.cache/garage/<version>/bin/garage` (`make test` builds it once).
//!
//! Dropping the [`Garage`] kills every node and removes its directories,
//! also when the test failed. Nodes can be stopped ([`Garage::stop`]) and
//! started again ([`Garage::start`]) to test a checkpoint with nodes down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Garage version `scripts/garage.sh` installs.
pub const VERSION: &str = "2.5.0";
/// The bucket every cluster has.
pub const BUCKET: &str = "stasis";
/// The S3 region Garage answers for.
pub const REGION: &str = "garage";

/// The garage binary: `$STASIS_GARAGE_BIN` if set (e.g. one built at
/// opt-level 3 for benchmarks, see `scripts/garage.sh`), else the cached
/// one (panics, naming the install script, if absent).
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("STASIS_GARAGE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.exists(), "STASIS_GARAGE_BIN={} does not exist", bin.display());
        return bin;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join(".cache/garage").join(VERSION).join("bin/garage");
    assert!(bin.exists(), "{} is missing: run `bash scripts/garage.sh` (make test does)", bin.display());
    bin
}

/// Where a node runs.
#[derive(Debug, Clone)]
pub struct Place {
    /// The network namespace (None: this one).
    pub ns: Option<String>,
    /// The address it binds (its host's address, or 127.0.0.1).
    pub ip: String,
    /// Port base: S3 on base, RPC on base+1, admin on base+3.
    pub port_base: u16,
}

/// One node.
pub struct Node {
    pub place: Place,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// `http://ip:port` of its S3 API.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.place.ip, self.place.port_base)
    }

    fn command(&self) -> Command {
        let mut c = match &self.place.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        c.arg("-c").arg(&self.config);
        c.env("RUST_LOG", "garage=warn");
        c
    }

    /// Runs `garage ARGS` against this node; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("run garage");
        assert!(
            out.status.success(),
            "garage {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = self.command().args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A running cluster.
pub struct Garage {
    pub nodes: Vec<Node>,
    pub key_id: String,
    pub secret: String,
}

fn hex(seed: &str, len: usize) -> String {
    let mut out = String::new();
    let mut n = 0u32;
    while out.len() < len {
        let h = blake3::hash(format!("{seed}-{n}").as_bytes());
        out.push_str(&h.to_hex());
        n += 1;
    }
    out.truncate(len);
    out
}

impl Garage {
    /// Starts one node per place under `dir`, joins them, lays out the
    /// cluster (one zone per node, replication factor 3), creates the
    /// bucket and a key allowed on it.
    pub fn new(dir: &Path, places: Vec<Place>) -> Garage {
        let seed = format!("{}-{:?}", std::process::id(), Instant::now());
        let secret_rpc = hex(&format!("rpc-{seed}"), 64);
        let mut g = Garage {
            nodes: Vec::new(),
            key_id: format!("GK{}", hex(&format!("key-{seed}"), 24)),
            secret: hex(&format!("secret-{seed}"), 64),
        };
        for (i, place) in places.into_iter().enumerate() {
            let ndir = dir.join(format!("garage-{}", i + 1));
            std::fs::create_dir_all(ndir.join("meta")).expect("garage dirs");
            std::fs::create_dir_all(ndir.join("data")).expect("garage dirs");
            let config = ndir.join("garage.toml");
            let (ip, base) = (&place.ip, place.port_base);
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
                     replication_factor = 3\nconsistency_mode = \"consistent\"\n\
                     rpc_bind_addr = \"{ip}:{rpc}\"\nrpc_public_addr = \"{ip}:{rpc}\"\n\
                     rpc_secret = \"{secret_rpc}\"\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{ip}:{base}\"\nroot_domain = \".s3.garage\"\n\
                     [admin]\napi_bind_addr = \"{ip}:{admin}\"\n",
                    meta = ndir.join("meta").display(),
                    data = ndir.join("data").display(),
                    rpc = base + 1,
                    admin = base + 3,
                ),
            )
            .expect("garage config");
            // It holds the cluster's RPC secret.
            std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            g.nodes.push(Node { log: ndir.join("garage.log"), dir: ndir, config, place, child: None });
        }
        for i in 0..g.nodes.len() {
            g.start(i);
        }
        // Node ids, connect everyone to the first, one zone each.
        let ids: Vec<String> = g
            .nodes
            .iter()
            .map(|n| wait_for(n, &["node", "id", "-q"], Duration::from_secs(30)).trim().to_owned())
            .collect();
        for id in &ids[1..] {
            g.nodes[0].cli(&["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            g.nodes[0].cli(&["layout", "assign", "-z", &format!("z{}", i + 1), "-c", "1G", short]);
        }
        g.nodes[0].cli(&["layout", "apply", "--version", "1"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while g.nodes[0].try_cli(&["bucket", "create", BUCKET]).is_none() {
            assert!(Instant::now() < deadline, "garage: the bucket could not be created; logs:\n{}", g.logs());
            std::thread::sleep(Duration::from_millis(300));
        }
        g.nodes[0].cli(&["key", "import", "--yes", "-n", "stasis-test", &g.key_id, &g.secret]);
        g.nodes[0].cli(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "stasis-test"]);
        g
    }

    /// Starts (or restarts) node `i` and waits until its S3 port answers.
    pub fn start(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).expect("garage log");
        let child = n
            .command()
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        n.child = Some(child);
        wait_for(n, &["status"], Duration::from_secs(30));
    }

    /// Waits until every running node answers a quorum read (after a
    /// restart, nodes reconnect to each other within seconds).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            while n.try_cli(&["bucket", "info", BUCKET]).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "garage: {} does not reach quorum; logs:\n{}",
                    n.endpoint(),
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    /// SIGKILLs node `i` (its data stays, so it can start again).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every node's S3 endpoint, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    /// The nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {}\n{}", n.log.display(), std::fs::read_to_string(&n.log).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn wait_for(n: &Node, args: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(out) = n.try_cli(args) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "garage node {} did not answer `garage {}`; log:\n{}",
            n.endpoint(),
            args.join(" "),
            std::fs::read_to_string(&n.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.dir);
        }
    }
}
