//! `tandem`: the command-line tool of Tandem.
//!
//! Wiring only: the protocol lives in [`tandem_core::Coordinator`]; this crate
//! parses the command line and configuration, opens the chosen stores
//! ([`backend`]), calls the coordinator and prints the result. See
//! `docs/cli.md` for every command, option and exit code.

mod backend;
mod bench;
mod cli;
mod commands;
mod demo;
mod embed;
mod error;
mod ingest;
mod output;
mod serve;
mod settings;
mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::backend::Stores;
use crate::cli::{Cli, Command};
use crate::error::{AppError, EXIT_OK, Redactor, one_line};
use crate::output::Output;
use crate::settings::{FileConfig, Settings};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `demo` only uses a server named on the command line, never one from the
    // environment or the configuration file: it writes a fresh data set.
    let explicit = ExplicitServers {
        postgres: from_command_line(&matches, "postgres_url"),
        qdrant: from_command_line(&matches, "qdrant_url"),
    };
    let out = Output {
        json: cli.global.json,
        quiet: cli.global.quiet,
    };

    // The embedder's vectors go to the active collection, or to a
    // re-index's new one.
    let reindex_to_dim = match &cli.command {
        Command::Reindex(args) => args.to_dim,
        _ => None,
    };
    let settings = FileConfig::load(cli.global.config.as_deref())
        .and_then(|file| Settings::resolve(&cli.global, file))
        .and_then(|s| s.check_embed_dimensions(reindex_to_dim).map(|()| s));
    let settings = match settings {
        Ok(s) => s,
        Err(e) => return fail(&e, &Redactor::default(), out),
    };
    // The demo injects failures on purpose and narrates them: the coordinator's
    // warnings about them would only repeat the story.
    let quiet_level = match cli.command {
        Command::Demo(_) => "error",
        // A service logs what it does: start, stop, recovery, failures.
        Command::Serve(_) => "info",
        _ => "warn",
    };
    telemetry::init_logging(cli.global.verbose, quiet_level, settings.redactor.clone());

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &AppError::Failed(format!("cannot start the runtime: {e}")),
                &settings.redactor,
                out,
            );
        }
    };
    let redactor = settings.redactor.clone();
    let result = runtime.block_on(run(cli, settings, explicit, out));
    // Blocking tasks (a reader parked on stdin) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => error::exit(code),
        Err(e) => fail(&e, &redactor, out),
    }
}

/// Which server URLs were given as flags (not through the environment).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExplicitServers {
    /// `--postgres-url` was on the command line.
    pub postgres: bool,
    /// `--qdrant-url` was on the command line.
    pub qdrant: bool,
}

fn from_command_line(matches: &clap::ArgMatches, id: &str) -> bool {
    let mut m = Some(matches);
    while let Some(cur) = m {
        if cur.value_source(id) == Some(ValueSource::CommandLine) {
            return true;
        }
        m = cur.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// Reports a failure: one line on stderr, and under `--json` (unless the
/// command already printed its report) a JSON document on stdout too.
fn fail(e: &AppError, redactor: &Redactor, out: Output) -> ExitCode {
    let message = one_line(e, redactor);
    eprintln!("error: {message}");
    if out.json && !output::json_printed() {
        out.json(&serde_json::json!({
            "ok": false,
            "error": {"message": message, "exit_code": e.exit_code()},
        }));
    }
    error::exit(e.exit_code())
}

async fn run(
    cli: Cli,
    settings: Settings,
    explicit: ExplicitServers,
    out: Output,
) -> Result<u8, AppError> {
    let Cli { global, command } = cli;
    // The service renders its own metrics (on its listener, and on
    // --metrics-addr too).
    if let Some(addr) = settings.metrics_addr
        && !matches!(command, Command::Serve(_))
    {
        telemetry::serve_metrics(addr)?;
    }
    match command {
        Command::Serve(args) => serve::run(*args, &settings, out).await,
        Command::BenchApi(args) => serve::bench_api(*args, &settings, out).await,
        Command::Demo(args) => demo::run(args, &global, explicit, out).await,
        Command::Bench(args) => bench::run(*args, &global, &settings, out).await,
        Command::Migrate => {
            let report = backend::migrate(&settings).await?;
            commands::print_migrate(&report, out);
            Ok(EXIT_OK)
        }
        command => {
            let stores = Stores::open(&settings).await?;
            let coordinator = Arc::new(stores.coordinator(settings.coordinator.clone())?);
            if settings.metrics_addr.is_some() {
                spawn_gauge_refresh(coordinator.clone());
            }
            match command {
                Command::Ingest(args) => {
                    if args.atomic
                        && settings.coordinator.write_mode == tandem_core::WriteMode::Deferred
                    {
                        return Err(AppError::Usage(
                            "--atomic runs the ingest as a saga, whose steps are synchronous: \
                             it cannot be combined with --write-mode deferred"
                                .into(),
                        ));
                    }
                    let mode = settings.embed.mode;
                    let embedder = embed::build(&settings.embed, mode, settings.dimension)?;
                    let embedder = match embedder {
                        Some(e) => {
                            embed::check_dimension(e.as_ref(), &settings.embed).await?;
                            Some(ingest::IngestEmbedder {
                                describe: embed::describe(e.as_ref(), &settings.embed),
                                embedder: e,
                            })
                        }
                        None => None,
                    };
                    let plan = ingest::IngestPlan {
                        input: args.input,
                        batch_size: args.batch_size.unwrap_or(settings.batch_size),
                        embed: mode,
                        idempotency_prefix: args.idempotency_prefix,
                        optimize: args.optimize,
                        retry: ingest::BatchRetry {
                            retries: args.batch_retries,
                            retry_for: args
                                .batch_retry_for
                                .unwrap_or(ingest::BatchRetry::DEFAULT_RETRY_FOR),
                        },
                        atomic: args.atomic,
                        replace_scope: args.replace_scope.map(tandem_core::Scope::from),
                        wait_indexed: args.wait_indexed,
                    };
                    ingest::run(
                        plan,
                        embedder,
                        &stores,
                        coordinator,
                        out,
                        &settings.redactor,
                    )
                    .await?;
                    Ok(EXIT_OK)
                }
                Command::Delete(args) => commands::delete(args, &stores, &coordinator, out).await,
                Command::Search(args) => {
                    commands::search(args, &stores, &coordinator, &settings, out).await
                }
                Command::Recover => commands::recover(&stores, &coordinator, out).await,
                Command::Verify(args) => commands::verify(args, &stores, &coordinator, out).await,
                Command::Stats => commands::stats(&stores, &coordinator, out).await,
                Command::Saga(args) => commands::saga(args, &stores, &coordinator, out).await,
                Command::IndexWorker(args) => {
                    commands::index_worker(args, &stores, &coordinator, out).await
                }
                Command::Dlq(args) => commands::dlq(args, &stores, &coordinator, out).await,
                Command::Reindex(args) => {
                    commands::reindex(args, &stores, &coordinator, &settings, out).await
                }
                Command::Demo(_)
                | Command::Migrate
                | Command::Bench(_)
                | Command::Serve(_)
                | Command::BenchApi(_) => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

/// Keeps the pending-intents gauge fresh while a long command runs.
fn spawn_gauge_refresh(coordinator: Arc<backend::AppCoordinator>) {
    tokio::spawn(async move {
        loop {
            // `stats` sets `tandem_pending_intents`.
            let _ = coordinator.stats().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}
