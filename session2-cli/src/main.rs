//! The `session2` command: store setup, administration, migration between
//! stores, and the demo web app.
//!
//! Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
//! Errors go to stderr as `session2: …`, never as a panic or stack trace.

mod admin;
mod demo;
mod migrate;
mod output;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use session2::SessionStore;

const STORE_URLS: &str =
    "memory:, dir:PATH, sqlite:PATH, redb:PATH, postgres://…, mysql://…, redis://…";

/// Persistent, concurrency-safe HTTP sessions: store setup, administration,
/// migration and the demo.
///
/// Stores are named by URL: memory:, dir:PATH, sqlite:PATH, redb:PATH,
/// postgres://…, mysql://…, redis://… (options as query parameters, such as
/// ?table=NAME).
#[derive(Debug, Parser)]
#[command(name = "session2", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A store URL with the options every command takes.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The store URL.
    #[arg(value_name = "URL")]
    url: String,
    /// The table name, for SQL stores (same as `?table=NAME`).
    #[arg(long, value_name = "NAME")]
    table: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the demo web app (counter, login, logout, your sessions) on any store.
    #[command(
        after_help = "Examples:\n  session2 demo\n  session2 demo --store dir:./sessions --port 8080"
    )]
    Demo(demo::DemoArgs),
    /// Create what a store needs (directory, tables, indexes); idempotent, never destroys data.
    #[command(
        after_help = "Examples:\n  session2 setup dir:./sessions\n  session2 setup postgres://app@db/app --table sessions"
    )]
    Setup(StoreArgs),
    /// List sessions: fingerprint, user, times, size, state. Never shows a session id.
    #[command(
        after_help = "Examples:\n  session2 list dir:./sessions\n  session2 list dir:./sessions --user alice --json"
    )]
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only the live sessions of this user.
        #[arg(long)]
        user: Option<String>,
        /// At most this many sessions.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one session's fields and data, by fingerprint (from `list`).
    #[command(after_help = "Example:\n  session2 show dir:./sessions 3fa2c41b09de")]
    Show {
        #[command(flatten)]
        store: StoreArgs,
        /// The fingerprint, or at least its first 6 hex digits.
        fingerprint: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the number of stored sessions (expired ones not yet purged included).
    #[command(after_help = "Example:\n  session2 count dir:./sessions")]
    Count(StoreArgs),
    /// Counts by state and age, size distribution, sessions per user.
    #[command(
        after_help = "Examples:\n  session2 stats dir:./sessions\n  session2 stats dir:./sessions --top 5 --json"
    )]
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        /// How many of the users with the most sessions to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete expired sessions (for cron).
    #[command(
        after_help = "Examples:\n  session2 purge dir:./sessions\n  session2 purge dir:./sessions --dry-run"
    )]
    Purge {
        #[command(flatten)]
        store: StoreArgs,
        /// Only count what would be purged.
        #[arg(long)]
        dry_run: bool,
    },
    /// Log a user out everywhere: delete every session of theirs.
    #[command(
        name = "logout-user",
        after_help = "Example:\n  session2 logout-user dir:./sessions alice"
    )]
    LogoutUser {
        #[command(flatten)]
        store: StoreArgs,
        /// The user id.
        user: String,
    },
    /// Copy every live session from one store to another, keeping ids, users, data and deadlines.
    #[command(
        after_help = "Examples:\n  session2 migrate dir:./sessions postgres://app@db/app\n  session2 migrate redis://127.0.0.1 sqlite:sessions.db --batch 1000"
    )]
    Migrate {
        /// The source store URL.
        from: String,
        /// The target store URL (set up automatically).
        to: String,
        /// Sessions read per batch.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A mistake in how the command was called: exit status 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

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
            eprintln!("session2: {}", error_chain(&err));
            let usage = err.chain().any(|cause| {
                cause.is::<UsageError>()
                    || cause
                        .downcast_ref::<session2::Error>()
                        .is_some_and(|err| err.is_config() || err.is_unsupported())
            });
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error and its causes as one line, `a: b: c`, skipping a cause whose
/// text the line already ends with (library errors carry their source's
/// text and keep the source too).
fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::serve(args).await,
        Command::Setup(store) => {
            let (url, opened) = open(&store, "setup").await?;
            opened
                .setup()
                .await
                .with_context(|| format!("failed to set up `{url}`"))?;
            println!("store `{}` at {url} is set up", opened.name());
            Ok(())
        }
        Command::List {
            store,
            user,
            limit,
            json,
        } => admin::list(open(&store, "list").await?.1, user, limit, json).await,
        Command::Show {
            store,
            fingerprint,
            json,
        } => admin::show(open(&store, "show").await?.1, &fingerprint, json).await,
        Command::Count(store) => admin::count(open(&store, "count").await?.1).await,
        Command::Stats { store, top, json } => {
            admin::stats(open(&store, "stats").await?.1, top, json).await
        }
        Command::Purge { store, dry_run } => {
            admin::purge(open(&store, "purge").await?.1, dry_run).await
        }
        Command::LogoutUser { store, user } => {
            admin::logout_user(open(&store, "logout-user").await?.1, &user).await
        }
        Command::Migrate {
            from,
            to,
            batch,
            json,
        } => {
            if from == to {
                return Err(UsageError("FROM and TO are the same store".into()).into());
            }
            let source = open(
                &StoreArgs {
                    url: from,
                    table: None,
                },
                "migrate",
            )
            .await?
            .1;
            let target = open(
                &StoreArgs {
                    url: to,
                    table: None,
                },
                "migrate",
            )
            .await?
            .1;
            migrate::migrate(source, target, batch as usize, json).await
        }
    }
}

/// Opens the store named by `store`, refusing `memory:` (it holds nothing
/// between runs of the command). Returns the URL used and the store.
async fn open(store: &StoreArgs, command: &str) -> anyhow::Result<(String, Arc<dyn SessionStore>)> {
    if store.url.starts_with("memory:") {
        return Err(UsageError(format!(
            "`session2 {command}` needs a persistent store: `memory:` holds nothing between runs (use one of {STORE_URLS})"
        ))
        .into());
    }
    let url = match &store.table {
        Some(table) if store.url.contains('?') => format!("{}&table={table}", store.url),
        Some(table) => format!("{}?table={table}", store.url),
        None => store.url.clone(),
    };
    let opened = session2::store::open(&url)
        .await
        .with_context(|| format!("failed to open the store `{}`", store.url))?;
    Ok((url, opened))
}
