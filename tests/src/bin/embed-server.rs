//! `embed-server`: the OpenAI-compatible test embedding server as a process,
//! for trying `tandem ingest --embed openai` without a model. Deterministic
//! vectors, no faults (the tests inject those in process).
//!
//! Prints `embed-server listening on http://127.0.0.1:PORT/v1` on stdout once
//! it accepts connections; stops on Ctrl-C.

use clap::Parser;
use tandem_tests::embed_server::EmbedServer;

/// An OpenAI-compatible `/v1/embeddings` server with deterministic vectors.
#[derive(Parser)]
#[command(name = "embed-server", version)]
struct Args {
    /// Port to listen on (127.0.0.1); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Dimension of the vectors (a request's `dimensions` overrides it).
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Require this API key.
    #[arg(long, env = "EMBED_SERVER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let server = EmbedServer::start_on(args.dim, args.api_key.as_deref(), args.port).await?;
    println!("embed-server listening on {}", server.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
