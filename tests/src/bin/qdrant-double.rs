//! `qdrant-double`: the Qdrant-compatible test server as a process, for tests
//! that need Qdrant in another process (crash campaigns) and for trying the
//! `tandem` CLI without a Qdrant. See `docs/qdrant-double.md`.
//!
//! Prints `qdrant-double listening on http://127.0.0.1:PORT` on stdout once it
//! accepts connections (with `--port 0`, read the port from that line), and
//! stops gracefully (flushing every collection) on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tandem_tests::qdrant_double::{Durability, QdrantDouble};

/// A Qdrant-compatible gRPC server on qdrant-edge, for tests.
#[derive(Parser)]
#[command(name = "qdrant-double", version)]
struct Args {
    /// Port to listen on (127.0.0.1); 0 picks a free one.
    #[arg(long, default_value_t = 6334)]
    port: u16,
    /// Directory for the collections (created if missing; existing ones are served).
    #[arg(long)]
    data_dir: PathBuf,
    /// Require this API key on every call.
    #[arg(long, env = "QDRANT_DOUBLE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// When writes are flushed to disk.
    #[arg(long, value_enum, default_value_t = Flush::EveryWrite)]
    flush: Flush,
}

#[derive(Clone, Copy, ValueEnum)]
enum Flush {
    /// Before answering each `wait=true` write: acknowledged writes survive a kill -9.
    EveryWrite,
    /// Only at shutdown: faster; a kill -9 loses unflushed writes.
    OnShutdown,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut builder = QdrantDouble::builder()
        .port(args.port)
        .data_dir(&args.data_dir)
        .durability(match args.flush {
            Flush::EveryWrite => Durability::EveryWrite,
            Flush::OnShutdown => Durability::OnShutdown,
        });
    if let Some(key) = args.api_key {
        builder = builder.with_api_key(key);
    }
    let double = match builder.start().await {
        Ok(double) => double,
        Err(err) => {
            eprintln!("qdrant-double: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("qdrant-double listening on {}", double.url());
    if let Err(err) = stop_signal().await {
        eprintln!("qdrant-double: cannot wait for a signal: {err}");
    }
    double.shutdown().await;
    ExitCode::SUCCESS
}

async fn stop_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = term.recv() => Ok(()),
    }
}
