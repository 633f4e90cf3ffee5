//! The `session2` command: the demo web app and store setup.
//!
//! Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error
//! (from clap). Errors go to stderr as `session2: …`.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Persistent, concurrency-safe HTTP sessions: store setup and the demo.
#[derive(Debug, Parser)]
#[command(name = "session2", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the demo web app (counter, login, logout) on any store.
    ///
    /// Example: session2 demo --store dir:./sessions --port 8080
    Demo(demo::DemoArgs),
    /// Create what a store needs (directory, tables); idempotent, never destroys data.
    ///
    /// Example: session2 setup dir:./sessions
    Setup {
        /// The store URL: memory:, dir:PATH, sqlite:PATH, redb:PATH, postgres://…, mysql://…, redis://…
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SESSION2_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("session2: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("session2: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::serve(args).await,
        Command::Setup { url } => {
            let store = session2::store::open(&url).await?;
            store.setup().await?;
            println!("store `{}` at {url} is set up", store.name());
            Ok(())
        }
    }
}
