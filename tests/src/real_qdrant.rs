//! Real Qdrant servers for the suites: one node, or an N-node cluster on
//! loopback, each node in its own process group with its own temporary
//! storage, stopped when dropped.
//!
//! # Where the server comes from
//!
//! [`Launcher::locate`] looks, in this order, for
//!
//! 1. `QDRANT_BIN`: a `qdrant` binary, started directly with the environment
//!    variables `../shared/qdrant/start` uses (ports, storage and snapshot
//!    paths, cluster mode, telemetry off);
//! 2. `TANDEM_QDRANT_START`: a start script with the interface of
//!    `../shared/qdrant/start` (`--http P --grpc P --p2p P --storage DIR
//!    [--cluster | --bootstrap URL]`, printing `pid=…` once the node is ready);
//! 3. `<workspace>/../shared/qdrant/start`, where this workspace is checked out
//!    next to the project's shared folder (CI and the developers' machines).
//!
//! Every node listens on 127.0.0.1 only (`QDRANT__SERVICE__HOST`).
//!
//! # Tests that need one
//!
//! A user's fresh clone has none of these. Tests that cannot run without a
//! real server are compiled with
//! `#[cfg_attr(not(real_qdrant), ignore = "needs a real Qdrant server: …")]`:
//! `tests/build.rs` sets the cfg `real_qdrant` when one of the three is there
//! at build time, so without a server cargo reports those tests as *ignored*,
//! with the reason on the same line, and never as passed. A test that does run
//! and finds no server (the file went away after the build) fails, saying so
//! ([`Launcher::require`]).
//!
//! # Ports
//!
//! Free ports are found by binding port 0 on 127.0.0.1 (three distinct ports
//! per node, held together until all are chosen). Another process may take a
//! port between that and the node's own bind; a node that does not come up on
//! its first ports is started again on fresh ones (a few times). A restart
//! ([`QdrantNode::restart`]) reuses the node's ports, storage and bootstrap
//! peer, as a restarted cluster member must.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

/// The cfg-gated tests' reason, for `ignore = …`.
pub const NEEDS_REAL_QDRANT: &str = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md";

/// How long a node may take to answer `/readyz`, and a cluster to form or heal.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
const TERM_WITHIN: Duration = Duration::from_secs(30);
/// Fresh ports tried when a node does not come up.
const PORT_ATTEMPTS: usize = 5;

/// How to start a real Qdrant node (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// A start script with the interface of `../shared/qdrant/start`.
    Script(PathBuf),
    /// A `qdrant` binary.
    Binary(PathBuf),
}

impl Launcher {
    /// `QDRANT_BIN`, else `TANDEM_QDRANT_START`, else
    /// `<workspace>/../shared/qdrant/start`, if that names a file.
    pub fn locate() -> Option<Launcher> {
        let named = |var: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .filter(|p| p.is_file())
        };
        if let Some(bin) = named("QDRANT_BIN") {
            return Some(Launcher::Binary(bin));
        }
        if let Some(script) = named("TANDEM_QDRANT_START") {
            return Some(Launcher::Script(script));
        }
        let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/qdrant/start");
        default.is_file().then_some(Launcher::Script(default))
    }

    /// [`locate`](Self::locate), or a panic with [`NEEDS_REAL_QDRANT`]: a test
    /// that needs a server never passes without one.
    pub fn require() -> Launcher {
        Self::locate().unwrap_or_else(|| panic!("{NEEDS_REAL_QDRANT}"))
    }
}

/// The three ports of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// REST.
    pub http: u16,
    /// gRPC (what Tandem connects to).
    pub grpc: u16,
    /// Cluster traffic (Raft and shard replication).
    pub p2p: u16,
}

impl Ports {
    /// Three distinct ports that were free a moment ago.
    fn free() -> Self {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
            .collect();
        let port = |i: usize| listeners[i].local_addr().expect("bound address").port();
        Self {
            http: port(0),
            grpc: port(1),
            p2p: port(2),
        }
    }
}

/// The running process of a node. Its pid is also its process group id: the
/// script's `setsid`, or `process_group(0)` for a binary started here.
#[derive(Debug)]
enum Running {
    /// Started by this process: reaped with `wait`.
    Child(Child),
    /// Started by a script and re-parented; watched through `/proc`.
    Detached(u32),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id(),
            Running::Detached(pid) => *pid,
        }
    }

    fn has_exited(&mut self) -> bool {
        match self {
            Running::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Running::Detached(pid) => !detached_alive(*pid),
        }
    }
}

/// Whether a process not ours is alive: present in `/proc`, not a zombie, and
/// still a Qdrant (not a process that got the pid after it was reaped).
fn detached_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qdrant"))
}

/// One real Qdrant node. Dropping it kills it (SIGKILL to its process group).
#[derive(Debug)]
pub struct QdrantNode {
    launcher: Launcher,
    ports: Ports,
    storage: PathBuf,
    /// `None`: a single node. `Some(None)`: the first node of a cluster.
    /// `Some(Some(url))`: a member that joins through that p2p URL.
    cluster: Option<Option<String>>,
    running: Option<Running>,
    starts: usize,
}

impl QdrantNode {
    /// Starts one node (not in cluster mode) with its storage under `storage`.
    pub fn start_single(launcher: &Launcher, storage: &Path) -> Self {
        Self::start_new(launcher, storage, None)
    }

    fn start_new(launcher: &Launcher, storage: &Path, cluster: Option<Option<String>>) -> Self {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            // A failed attempt may have left a half-initialised storage.
            let _ = std::fs::remove_dir_all(storage);
            let mut node = Self {
                launcher: launcher.clone(),
                ports: Ports::free(),
                storage: storage.to_path_buf(),
                cluster: cluster.clone(),
                running: None,
                starts: 0,
            };
            match node.launch() {
                Ok(()) => return node,
                Err(e) => last = e,
            }
        }
        panic!("a real Qdrant node did not start on {PORT_ATTEMPTS} sets of free ports: {last}")
    }

    /// REST URL, `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// gRPC URL, what `--qdrant-url` and `QdrantConfig::url` take.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.grpc)
    }

    /// The p2p URL other members bootstrap through.
    pub fn p2p_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.p2p)
    }

    /// Its ports.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// Its storage directory (kept across restarts).
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// The server's pid (= its process group), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(Running::pid)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.running {
            Some(r) => !r.has_exited(),
            None => false,
        }
    }

    /// Its log (the server's stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.storage.join("qdrant.log")
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it gracefully: SIGTERM, then waits for the exit (SIGKILL after
    /// 30 s).
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGTERM, TERM_WITHIN);
        if self.running.is_some() {
            self.kill9();
        }
    }

    /// Crashes it: SIGKILL to its process group, then waits for the exit.
    pub fn kill9(&mut self) {
        self.signal_and_wait(Signal::SIGKILL, READY_WITHIN);
        assert!(
            self.running.is_none(),
            "the Qdrant node on {} survived SIGKILL",
            self.http_url()
        );
    }

    fn signal_and_wait(&mut self, signal: Signal, within: Duration) {
        let Some(running) = &mut self.running else {
            return;
        };
        if !running.has_exited() {
            let pid = i32::try_from(running.pid()).expect("a pid fits in i32");
            // The group: the server and anything it started.
            let _ = killpg(Pid::from_raw(pid), signal);
        }
        let deadline = Instant::now() + within;
        while !running.has_exited() {
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Running::Child(c) = running {
            let _ = c.wait();
        }
        self.running = None;
    }

    /// Starts it again on the same ports, storage and bootstrap peer, and
    /// waits until it answers `/readyz`. Panics if it was still running.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart of a running node ({})",
            self.http_url()
        );
        self.running = None;
        if let Err(e) = self.launch() {
            panic!("restarting the Qdrant node on {}: {e}", self.http_url());
        }
    }

    /// Starts the process; on success it answers `/readyz`.
    fn launch(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.storage)
            .map_err(|e| format!("create {}: {e}", self.storage.display()))?;
        self.starts += 1;
        let ports = self.ports;
        let running = match &self.launcher {
            Launcher::Script(script) => {
                // A copy without its execute bits (CI's read-only copy of
                // `../shared`) still runs: through bash, which it is written for.
                let executable = std::fs::metadata(script).is_ok_and(|m| {
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                });
                let mut cmd = if executable {
                    Command::new(script)
                } else {
                    let mut c = Command::new("bash");
                    c.arg(script);
                    c
                };
                cmd.args(["--http", &ports.http.to_string()])
                    .args(["--grpc", &ports.grpc.to_string()])
                    .args(["--p2p", &ports.p2p.to_string()])
                    .arg("--storage")
                    .arg(&self.storage)
                    .arg("--log")
                    .arg(self.log_path());
                match &self.cluster {
                    None => {}
                    Some(None) => {
                        cmd.arg("--cluster");
                    }
                    Some(Some(url)) => {
                        cmd.args(["--bootstrap", url]);
                    }
                }
                clean_env(&mut cmd);
                let out = cmd
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    return Err(format!(
                        "{} exited {}: {}{}",
                        script.display(),
                        out.status,
                        stdout.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                let pid = stdout
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("pid="))
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(|| format!("{} printed no pid: {stdout:?}", script.display()))?;
                Running::Detached(pid)
            }
            Launcher::Binary(bin) => {
                let log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .map_err(|e| format!("open the log: {e}"))?;
                let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
                let mut cmd = Command::new(bin);
                clean_env(&mut cmd);
                let storage = self.storage.display().to_string();
                cmd.env("QDRANT__SERVICE__HTTP_PORT", ports.http.to_string())
                    .env("QDRANT__SERVICE__GRPC_PORT", ports.grpc.to_string())
                    .env(
                        "QDRANT__CLUSTER__ENABLED",
                        if self.cluster.is_some() {
                            "true"
                        } else {
                            "false"
                        },
                    )
                    .env("QDRANT__CLUSTER__P2P__PORT", ports.p2p.to_string())
                    .env(
                        "QDRANT__STORAGE__STORAGE_PATH",
                        format!("{storage}/storage"),
                    )
                    .env(
                        "QDRANT__STORAGE__SNAPSHOTS_PATH",
                        format!("{storage}/snapshots"),
                    )
                    .env("QDRANT__TELEMETRY_DISABLED", "true")
                    .current_dir(&self.storage);
                if let Some(bootstrap) = &self.cluster {
                    cmd.args(["--uri", &self.p2p_url()]);
                    if let Some(url) = bootstrap {
                        cmd.args(["--bootstrap", url]);
                    }
                }
                std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log2)
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
                Running::Child(child)
            }
        };
        self.running = Some(running);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                let tail = self.log_tail(15);
                self.kill9();
                Err(format!("{e}; last lines of its log:\n{tail}"))
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let url = format!("{}/readyz", self.http_url());
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if rest::get_status(&url) == Some(200) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!(
                    "the node exited before it was ready (ports {:?})",
                    self.ports
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{url} did not answer within {READY_WITHIN:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /cluster` of this node.
    pub fn cluster_info(&self) -> Result<Value, String> {
        rest::call("GET", &format!("{}/cluster", self.http_url()), None)
    }

    /// `GET /collections/NAME/cluster` of this node: its shards' replicas and
    /// their states.
    pub fn collection_cluster(&self, collection: &str) -> Result<Value, String> {
        rest::call(
            "GET",
            &format!("{}/collections/{collection}/cluster", self.http_url()),
            None,
        )
    }

    /// The exact point count of `collection` through this node
    /// (`POST /collections/NAME/points/count` with `exact: true`).
    pub fn count(&self, collection: &str) -> Result<u64, String> {
        let v = rest::call(
            "POST",
            &format!("{}/collections/{collection}/points/count", self.http_url()),
            Some(&serde_json::json!({ "exact": true })),
        )?;
        v["result"]["count"]
            .as_u64()
            .ok_or_else(|| format!("no count in {v}"))
    }
}

impl Drop for QdrantNode {
    fn drop(&mut self) {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
    }
}

/// Only what the launch sets reaches the node: no `QDRANT__*` from the
/// developer's shell (an API key, other ports), and loopback only.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("QDRANT__") {
            cmd.env_remove(key);
        }
    }
    cmd.env("QDRANT__SERVICE__HOST", "127.0.0.1");
}

/// N real Qdrant nodes, or one, with their storage in a temporary directory
/// (removed after every node was stopped).
#[derive(Debug)]
pub struct QdrantCluster {
    nodes: Vec<QdrantNode>,
    // Dropped after `nodes` (field order): the processes stop first.
    dir: tempfile::TempDir,
}

impl QdrantCluster {
    /// One node, not in cluster mode, with temporary storage.
    pub fn single(launcher: &Launcher) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let node = QdrantNode::start_single(launcher, &dir.path().join("node0"));
        Self {
            nodes: vec![node],
            dir,
        }
    }

    /// `n` nodes in one cluster: node 0 first (`--cluster`), the others
    /// bootstrapping through it. Returns once every node lists all `n` peers
    /// and knows the Raft leader.
    pub fn start(launcher: &Launcher, n: usize) -> Self {
        assert!(n >= 1, "a cluster has at least one node");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let first = QdrantNode::start_new(launcher, &dir.path().join("node0"), Some(None));
        let bootstrap = first.p2p_url();
        let mut nodes = vec![first];
        for i in 1..n {
            nodes.push(QdrantNode::start_new(
                launcher,
                &dir.path().join(format!("node{i}")),
                Some(Some(bootstrap.clone())),
            ));
        }
        let cluster = Self { nodes, dir };
        cluster.wait_for_peers();
        cluster
    }

    /// The nodes.
    pub fn nodes(&self) -> &[QdrantNode] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &QdrantNode {
        &self.nodes[i]
    }

    /// Node `i`, to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut QdrantNode {
        &mut self.nodes[i]
    }

    /// The temporary directory holding every node's storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until every running node lists every node as a peer and knows
    /// the Raft leader. Panics (with the last answers) after 60 s.
    pub fn wait_for_peers(&self) {
        let n = self.nodes.len();
        self.wait_until("every node to see every peer and a leader", || {
            for node in &self.nodes {
                let info = node.cluster_info()?;
                let peers = info["result"]["peers"].as_object().map_or(0, |p| p.len());
                let leader = &info["result"]["raft_info"]["leader"];
                if peers != n || leader.is_null() {
                    return Err(format!(
                        "{}: {peers} of {n} peers, leader {leader}",
                        node.http_url()
                    ));
                }
            }
            Ok(())
        });
    }

    /// Creates `collection` through node 0's REST API with `body` (e.g.
    /// `{"vectors": {"size": 16, "distance": "Cosine"}, "shard_number": 3,
    /// "replication_factor": 2}`), then waits until all its shards are
    /// active on every node.
    pub fn create_collection(&self, collection: &str, body: &Value) {
        let url = format!("{}/collections/{collection}", self.nodes[0].http_url());
        let v =
            rest::call("PUT", &url, Some(body)).unwrap_or_else(|e| panic!("PUT {url} {body}: {e}"));
        assert_eq!(v["result"], Value::Bool(true), "PUT {url}: {v}");
        self.wait_for_active(collection);
    }

    /// Waits until, seen from every node, `collection` has all of its
    /// `shard_number × replication_factor` replicas and each is `Active`,
    /// with no shard transfer under way. Panics (with the last answer) after
    /// 60 s.
    pub fn wait_for_active(&self, collection: &str) {
        let what = format!("every replica of `{collection}` to be Active");
        self.wait_until(&what, || {
            let config = rest::call(
                "GET",
                &format!("{}/collections/{collection}", self.nodes[0].http_url()),
                None,
            )?;
            let params = &config["result"]["config"]["params"];
            let shards = params["shard_number"].as_u64().unwrap_or(1);
            let factor = params["replication_factor"].as_u64().unwrap_or(1);
            for node in &self.nodes {
                let c = node.collection_cluster(collection)?;
                let r = &c["result"];
                let replicas: Vec<&Value> = ["local_shards", "remote_shards"]
                    .iter()
                    .flat_map(|k| r[*k].as_array().into_iter().flatten())
                    .collect();
                let transfers = r["shard_transfers"].as_array().map_or(0, Vec::len);
                let inactive: Vec<String> = replicas
                    .iter()
                    .filter(|s| s["state"] != "Active")
                    .map(|s| format!("shard {} {}", s["shard_id"], s["state"]))
                    .collect();
                if replicas.len() as u64 != shards * factor
                    || !inactive.is_empty()
                    || transfers > 0
                {
                    return Err(format!(
                        "{}: {} of {} replicas listed, not active: {inactive:?}, {transfers} transfer(s)",
                        node.http_url(),
                        replicas.len(),
                        shards * factor
                    ));
                }
            }
            Ok(())
        });
    }

    fn wait_until(&self, what: &str, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let last = match check() {
                Ok(()) => return,
                Err(e) => e,
            };
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} ---\n{}", n.http_url(), n.log_tail(8)))
                    .collect();
                panic!(
                    "waited {READY_WITHIN:?} for {what}; last: {last}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Blocking REST calls to a node on loopback (no proxy, 30 s at most).
pub mod rest {
    use std::sync::OnceLock;
    use std::time::Duration;

    use serde_json::Value;

    fn agent() -> &'static ureq::Agent {
        static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
        AGENT.get_or_init(|| {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into()
        })
    }

    /// The status of `GET url`, or `None` when nothing answered.
    pub fn get_status(url: &str) -> Option<u16> {
        agent()
            .get(url)
            .config()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// `METHOD url` with an optional JSON body; the JSON answer of a 2xx
    /// status, else an error naming the status and the answer.
    pub fn call(method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
        let a = agent();
        let text = body.map(Value::to_string);
        let sent = match (method, text) {
            ("GET", _) => a.get(url).call(),
            ("DELETE", _) => a.delete(url).call(),
            ("PUT", Some(t)) => a
                .put(url)
                .header("content-type", "application/json")
                .send(t),
            ("POST", Some(t)) => a
                .post(url)
                .header("content-type", "application/json")
                .send(t),
            ("PATCH", Some(t)) => a
                .patch(url)
                .header("content-type", "application/json")
                .send(t),
            (m, b) => return Err(format!("unsupported request {m} with body {b:?}")),
        };
        let mut resp = sent.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?;
        if !status.is_success() {
            return Err(format!("{method} {url}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method} {url}: not JSON ({e}): {text}"))
    }
}
