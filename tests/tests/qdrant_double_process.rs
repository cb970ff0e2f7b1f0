//! The `qdrant-double` binary: a Qdrant test server in its own process, whose
//! acknowledged writes survive `kill -9` and whose collections survive restarts.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CountPointsBuilder, CreateCollectionBuilder, Distance, PointStruct, UpsertPointsBuilder,
    VectorParamsBuilder,
};

/// A server process, killed when dropped (also when a test fails half-way).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free port and returns it with its URL (read from the
/// line it prints once it listens).
fn spawn(data_dir: &Path, extra: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qdrant-double"))
        .args(["--port", "0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qdrant-double");
    let stdout = child.stdout.take().unwrap();
    let child = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("qdrant-double listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

fn client(url: &str) -> Qdrant {
    Qdrant::from_url(url)
        .timeout(Duration::from_secs(10))
        .skip_compatibility_check()
        .build()
        .unwrap()
}

async fn count(client: &Qdrant) -> u64 {
    client
        .count(CountPointsBuilder::new("c").exact(true))
        .await
        .unwrap()
        .result
        .unwrap()
        .count
}

fn points(from: u64, n: u64) -> Vec<PointStruct> {
    (from..from + n)
        .map(|i| PointStruct::new(i, vec![1.0, i as f32], qdrant_client::Payload::new()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_restarts() {
    let dir = tempfile::tempdir().unwrap();

    let (mut first, url) = spawn(dir.path(), &[]);
    let c = client(&url);
    c.create_collection(
        CreateCollectionBuilder::new("c")
            .vectors_config(VectorParamsBuilder::new(2, Distance::Dot)),
    )
    .await
    .unwrap();
    c.upsert_points(UpsertPointsBuilder::new("c", points(0, 40)).wait(true))
        .await
        .unwrap();
    first.0.kill().unwrap(); // SIGKILL: no flush on the way out
    first.0.wait().unwrap();

    let (mut second, url) = spawn(dir.path(), &[]);
    let c = client(&url);
    assert_eq!(count(&c).await, 40);
    c.upsert_points(UpsertPointsBuilder::new("c", points(40, 10)).wait(true))
        .await
        .unwrap();
    // SIGTERM: a graceful stop.
    let status = Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(second.0.wait().unwrap().success());

    let (_third, url) = spawn(dir.path(), &["--flush", "on-shutdown"]);
    assert_eq!(count(&client(&url)).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_checks_the_api_key() {
    let dir = tempfile::tempdir().unwrap();
    // The key comes from the environment, as `--api-key`'s documented fallback.
    let mut child = Command::new(env!("CARGO_BIN_EXE_qdrant-double"))
        .args(["--port", "0", "--data-dir"])
        .arg(dir.path())
        .env("QDRANT_DOUBLE_API_KEY", "k3y")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let err = client(&url).list_collections().await.unwrap_err();
    match err {
        qdrant_client::QdrantError::ResponseError { status } => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        other => panic!("expected a gRPC error, got {other:?}"),
    }
    let keyed = Qdrant::from_url(&url)
        .api_key("k3y")
        .skip_compatibility_check()
        .build()
        .unwrap();
    assert!(
        keyed
            .list_collections()
            .await
            .unwrap()
            .collections
            .is_empty()
    );
}
