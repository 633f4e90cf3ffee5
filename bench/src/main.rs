//! `session2-bench`: session2 beside tower-sessions, in one run.
//!
//! - `server`: an axum app with the same routes on either library (or none);
//! - `load`: a closed-loop load generator that checks every answer;
//! - `store`: store-level operations per second without HTTP;
//! - `memory`: resident memory per session in the memory store;
//! - `clients`: the two libraries' Redis clients alone;
//! - `all`: everything above over every store, written to `BENCHMARKS.md`.

mod clients;
mod load;
mod report;
mod scale;
mod server;
mod store;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "session2-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the benchmark routes.
    Server(server::ServerArgs),
    /// Drive a server with virtual users and print one JSON result line.
    Load(load::LoadArgs),
    /// Store-level operations per second.
    Store(store::StoreArgs),
    /// Resident memory per session of the memory stores.
    Memory(store::MemoryArgs),
    /// The two libraries' Redis clients alone: `GET` and `SET` per task.
    Clients(clients::ClientsArgs),
    /// Run everything and write the report.
    All(report::AllArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Load(args) => load::run(args).await,
            Command::Store(args) => store::run(args).await,
            Command::Memory(args) => store::memory(args).await,
            Command::Clients(args) => clients::run(args).await,
            Command::All(args) => report::all(args).await,
        }
    })
}
