//! Shared by the `tandem serve` process tests: the stores a test runs on, the
//! service as a child process on an ephemeral port, and a blocking HTTP client.
#![allow(dead_code)] // each test binary uses its own part

pub mod browser;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::pg::TestSchema;
use tandem_tests::qdrant_double::QdrantDouble;

/// Dimension of every test collection.
pub const DIM: usize = 4;

/// The binary, with no configuration leaking in from the environment.
pub fn tandem(cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    for var in [
        "DATABASE_URL",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "TANDEM_CONFIG",
        "TANDEM_DATA_DIR",
        "TANDEM_METRICS_ADDR",
        "TANDEM_API_TOKEN",
        "TANDEM_LISTEN",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c.current_dir(cwd);
    c
}

/// The stores of one test.
pub enum Stores {
    /// SQLite + qdrant-edge in a temporary directory.
    Embedded {
        /// The working directory (the data directory is `data` inside).
        dir: tempfile::TempDir,
    },
    /// PostgreSQL (a schema of its own) + the Qdrant test server, run by a
    /// runtime of the test's own.
    Servers {
        /// The working directory.
        dir: tempfile::TempDir,
        /// The Qdrant-compatible test server.
        double: Box<QdrantDouble>,
        /// The PostgreSQL schema (dropped at the end).
        schema: TestSchema,
        /// The runtime serving the double.
        rt: tokio::runtime::Runtime,
    },
}

impl Stores {
    /// Embedded stores in a fresh directory.
    pub fn embedded() -> Self {
        Stores::Embedded {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// PostgreSQL at DATABASE_URL (or the local default; unreachable fails the
    /// test) and a Qdrant test server started for the test.
    pub fn servers() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (double, schema) =
            rt.block_on(async { (QdrantDouble::start().await, TestSchema::new().await) });
        Stores::Servers {
            dir: tempfile::tempdir().expect("a temporary directory"),
            double: Box::new(double),
            schema,
            rt,
        }
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        match self {
            Stores::Embedded { dir } | Stores::Servers { dir, .. } => dir.path(),
        }
    }

    /// The global flags that select these stores (dimension 4).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--dim".to_owned(), DIM.to_string()];
        match self {
            Stores::Embedded { dir } => {
                a.push("--data-dir".into());
                a.push(dir.path().join("data").display().to_string());
            }
            Stores::Servers { double, schema, .. } => {
                a.extend([
                    "--postgres-url".into(),
                    schema.url().to_owned(),
                    "--postgres-schema".into(),
                    schema.name().to_owned(),
                    "--qdrant-url".into(),
                    double.url(),
                    "--collection".into(),
                    schema.name().to_owned(),
                ]);
            }
        }
        a
    }

    /// The double (servers only).
    pub fn double(&self) -> &QdrantDouble {
        match self {
            Stores::Servers { double, .. } => double,
            Stores::Embedded { .. } => panic!("embedded stores have no Qdrant server"),
        }
    }

    /// Runs a future on the test's runtime (servers only).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Stores::Servers { rt, .. } => rt.block_on(f),
            Stores::Embedded { .. } => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(f),
        }
    }

    /// Writes `text` as `tandem.toml` in the working directory and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let p = self.dir().join("tandem.toml");
        std::fs::write(&p, text).expect("tandem.toml is written");
        p
    }

    /// Runs a command of the CLI on these stores; returns (exit code, stdout, stderr).
    pub fn cli(&self, extra_global: &[&str], args: &[&str]) -> (i32, String, String) {
        let out = tandem(self.dir())
            .args(self.args())
            .args(extra_global)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tandem runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `tandem serve` as a child process.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stderr_path: PathBuf,
    agent: ureq::Agent,
    token: Option<String>,
}

/// What the service answered.
#[derive(Debug)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// Headers, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    /// The error body's code, asserting the status.
    pub fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert!(v["code"].is_string(), "{v}");
        assert!(v["retryable"].is_boolean(), "{v}");
        assert!(
            v["outcome"] == "not_applied" || v["outcome"] == "unknown",
            "{v}"
        );
        v
    }
}

/// A client agent that reports every status as a response.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

fn into_resp(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Resp {
    let mut r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    let headers = r
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"));
    Resp {
        status,
        headers,
        body,
    }
}

impl Server {
    /// Starts `tandem <global> serve <serve_args>` (on `--listen
    /// 127.0.0.1:0` unless they name another) in the stores' directory and
    /// waits until it listens.
    pub fn start(stores: &Stores, global: &[&str], serve_args: &[&str]) -> Self {
        Self::start_with_env(stores, global, serve_args, &[])
    }

    /// [`Server::start`] with environment variables.
    pub fn start_with_env(
        stores: &Stores,
        global: &[&str],
        serve_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let stderr_path = stores
            .dir()
            .join(format!("serve-{}.stderr", uuid::Uuid::new_v4().simple()));
        let stderr = std::fs::File::create(&stderr_path).expect("the stderr file");
        let mut cmd = tandem(stores.dir());
        cmd.args(stores.args())
            .args(global)
            .arg("serve")
            .args(serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if !serve_args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("tandem serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(base) = line
            .trim()
            .strip_prefix("tandem serve: listening on ")
            // A wildcard address is reached on loopback.
            .map(|b| b.replace("://0.0.0.0:", "://127.0.0.1:"))
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tandem serve did not start (stdout {line:?}); stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let token = env
            .iter()
            .find(|(k, _)| *k == "TANDEM_API_TOKEN")
            .map(|(_, v)| (*v).to_owned());
        Server {
            child: Some(child),
            base,
            stderr_path,
            agent: agent(Duration::from_secs(120)),
            token,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything it logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn with_auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header("authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    /// `GET path` (with the token, if the server has one).
    pub fn get(&self, path: &str) -> Resp {
        let url = format!("{}{path}", self.base);
        into_resp(self.with_auth(self.agent.get(&url)).call(), &url)
    }

    /// `GET path` with these headers only.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let url = format!("{}{path}", self.base);
        let mut r = self.agent.get(&url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        into_resp(r.call(), &url)
    }

    /// `POST path` with a JSON body (and the token).
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// `POST path` with a JSON body and an idempotency key.
    pub fn post_keyed(&self, path: &str, key: &str, body: &Value) -> Resp {
        self.post_raw(
            path,
            &[
                ("content-type", "application/json"),
                ("idempotency-key", key),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// `POST path` with these headers (plus the token) and bytes.
    pub fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let url = format!("{}{path}", self.base);
        let mut r = self.with_auth(self.agent.post(&url));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        into_resp(r.send(body), &url)
    }

    /// The latest status snapshot.
    pub fn status(&self) -> Value {
        let r = self.get("/api/v1/status");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// Waits (polling the status) until `ok` holds; panics after `within`.
    pub fn wait_for_status(
        &self,
        within: Duration,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; last status:\n{s:#}\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> (i32, String) {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM is sent");
        let status = child.wait().expect("tandem serve exits");
        (status.code().unwrap_or(-1), self.stderr())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A record with a 4-d vector.
pub fn record(id: &str, scope: &str, item: &str, n: u32) -> Value {
    serde_json::json!({
        "id": id,
        "scope": scope,
        "content": format!("record {n} of {item}"),
        "metadata": {"item": item, "n": n},
        "vector": [1.0, n as f32 + 1.0, 0.5, (n % 3) as f32],
    })
}

/// A fixed UUID numbered `n`.
pub fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// The names of every metric a Prometheus text lists (`_bucket`, `_sum`
/// and `_count` series under their histogram's name too).
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_owned());
            }
        }
        names.insert(name);
    }
    names
}

/// The value of a metric line (exact name and labels text), e.g.
/// `tandem_commits_total{op="upsert"}`; the sum when `labels` is a prefix
/// shared by several lines is not computed: the match is exact.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every series of metric `name`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
