//! `session2-bench all`: every benchmark over every store, in one run, and
//! the `BENCHMARKS.md` report with the ratio session2 / tower-sessions.
//!
//! Both libraries get the same server code, the same store server, the same
//! pool size, the same payloads and the same load; only the session layer
//! differs.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::load::{LoadArgs, LoadResult, Workload};
use crate::server::Library;
use crate::store::{MemoryResult, StoreArgs, StoreResult};

#[derive(Debug, clap::Args)]
pub(crate) struct AllArgs {
    /// Stores to run: memory, sqlite, postgres, mysql, redis.
    #[arg(long, value_delimiter = ',', default_value = "memory,sqlite,postgres,mysql,redis")]
    stores: Vec<String>,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    mysql: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    #[arg(long, default_value_t = 64)]
    users: usize,
    #[arg(long, default_value_t = 1.5)]
    warmup: f64,
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Expired sessions to purge on each SQL store (0 skips the scale run).
    #[arg(long, default_value_t = 1_000_000)]
    purge_sessions: u64,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// A benchmark server in its own process.
struct Server {
    child: Child,
    address: SocketAddr,
}

impl Server {
    fn start(library: Library, store: &str) -> anyhow::Result<Self> {
        let library = match library {
            Library::Session2 => "session2",
            Library::TowerSessions => "tower-sessions",
            Library::Bare => "bare",
        };
        let mut child = Command::new(std::env::current_exe()?)
            .args(["server", "--library", library, "--store", store])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let address = loop {
            let line = lines.next().context("the server exited before listening")??;
            if let Some(url) = line.strip_prefix("listening on http://") {
                break url.parse()?;
            }
        };
        Ok(Self { child, address })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct StoreUrls {
    name: String,
    ours: String,
    theirs: String,
}

fn store_urls(args: &AllArgs, name: &str, scratch: &std::path::Path) -> anyhow::Result<StoreUrls> {
    let (ours, theirs) = match name {
        "memory" => ("memory".to_owned(), "memory".to_owned()),
        "sqlite" => (
            format!("sqlite:{}", scratch.join("session2.db").display()),
            format!("sqlite:{}", scratch.join("tower.db").display()),
        ),
        // The SQL servers get the same pool; each library uses its own table.
        "postgres" => (args.postgres.clone(), args.postgres.clone()),
        "mysql" => (args.mysql.clone(), args.mysql.clone()),
        "redis" => (format!("{}?prefix=bench-session2:", args.redis), args.redis.clone()),
        other => bail!("unknown store `{other}`"),
    };
    Ok(StoreUrls { name: name.to_owned(), ours, theirs })
}

#[derive(Default)]
struct Results {
    /// (store, workload, library) -> result
    http: Vec<(String, Workload, Library, LoadResult)>,
    store: Vec<StoreResult>,
    raw: Vec<(String, String)>,
    memory: Vec<MemoryResult>,
    purge: Vec<crate::scale::PurgeResult>,
    floor: Vec<(String, LoadResult)>,
}

pub(crate) async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("session2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut results = Results::default();
    let load = |address, workload| LoadArgs { address, workload, users: args.users, warmup: args.warmup, duration: args.duration };

    for name in &args.stores {
        let urls = store_urls(&args, name, &scratch)?;
        // The floor for anonymous requests, measured beside each store's rows.
        let bare = Server::start(Library::Bare, "memory")?;
        let floor = crate::load::measure(&load(bare.address, Workload::Anon)).await?;
        eprintln!("bare anon: {:.0} req/s", floor.requests_per_second);
        drop(bare);
        results.floor.push((name.clone(), floor));
        for (library, url) in [(Library::Session2, &urls.ours), (Library::TowerSessions, &urls.theirs)] {
            let server = match Server::start(library, url) {
                Ok(server) => server,
                Err(err) => {
                    eprintln!("skipping {library:?} on {name}: {err:#}");
                    continue;
                }
            };
            for workload in [
                Workload::Rmw,
                Workload::RmwExclusive,
                Workload::Read,
                Workload::Anon,
                Workload::Mix,
                Workload::Contention,
                Workload::ContentionExclusive,
            ] {
                if library == Library::TowerSessions && matches!(workload, Workload::RmwExclusive | Workload::ContentionExclusive) {
                    continue;
                }
                let result = crate::load::measure(&load(server.address, workload)).await?;
                eprintln!(
                    "{name} {library:?} {workload:?}: {:.0} req/s, p99 {} µs, {} errors, {} mismatches, {} lost",
                    result.requests_per_second, result.p99_us, result.errors, result.mismatches, result.lost_updates
                );
                results.http.push((urls.name.clone(), workload, library, result));
            }
        }
        match crate::store::measure(&StoreArgs { store: urls.ours.clone(), sessions: 10_000, concurrency: 32, seconds: 3.0 }).await {
            Ok(result) => {
                eprintln!("{name} store: {result:?}");
                results.store.push(result);
            }
            Err(err) => eprintln!("store benchmark on {name} failed: {err:#}"),
        }
        if let Some(raw) = raw_figure(&args, name, &scratch) {
            results.raw.push((name.clone(), raw));
        }
    }
    if args.purge_sessions > 0 {
        for name in args.stores.iter().filter(|name| ["sqlite", "postgres", "mysql"].contains(&name.as_str())) {
            let server_url = match name.as_str() {
                "postgres" => args.postgres.clone(),
                "mysql" => args.mysql.clone(),
                _ => format!("sqlite:{}", scratch.join("purge.db").display()),
            };
            match crate::scale::purge(name, &server_url, args.purge_sessions).await {
                Ok(result) => {
                    eprintln!("{name} purge: {result:?}");
                    results.purge.push(result);
                }
                Err(err) => eprintln!("purge benchmark on {name} failed: {err:#}"),
            }
        }
    }
    for library in ["session2", "tower-sessions"] {
        let output = Command::new(std::env::current_exe()?).args(["memory", "--library", library]).output()?;
        let line = String::from_utf8_lossy(&output.stdout);
        results.memory.push(serde_json::from_str(line.trim()).with_context(|| format!("memory benchmark: {line}"))?);
    }
    let report = render(&args, &results, started.elapsed());
    std::fs::write(&args.output, report)?;
    eprintln!("wrote {} in {:.0} s", args.output.display(), started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The raw server's own figure at concurrency 32, from its own tool.
fn raw_figure(args: &AllArgs, store: &str, scratch: &std::path::Path) -> Option<String> {
    let run = |command: &mut Command| -> Option<String> {
        let output = command.output().ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    };
    match store {
        "redis" => {
            let text = run(Command::new("redis-benchmark").args(["-h", "127.0.0.1", "-p", "6379", "-c", "32", "-n", "200000", "-q", "-t", "get,set", "-d", "400"]))?;
            // Progress lines end in carriage returns; keep the summaries.
            let summaries: Vec<&str> =
                text.split(['\r', '\n']).map(str::trim).filter(|part| part.contains("requests per second")).collect();
            Some(format!("redis-benchmark -c 32 -d 400: {}", summaries.join("; ")))
        }
        "postgres" => {
            let script = scratch.join("pgbench.sql");
            std::fs::write(
                &script,
                "\\set k random(1, 10000)\nINSERT INTO pgbench_session (key, version, data) VALUES (:k, 1, repeat('x', 400)) ON CONFLICT (key) DO UPDATE SET version = pgbench_session.version + 1, data = EXCLUDED.data;\nSELECT version, data FROM pgbench_session WHERE key = :k;\n",
            )
            .ok()?;
            run(Command::new("psql").args([&args.postgres, "-qc", "CREATE TABLE IF NOT EXISTS pgbench_session (key int PRIMARY KEY, version bigint, data text)"]))?;
            let text = run(Command::new("pgbench").args(["-n", "-c", "32", "-j", "2", "-T", "5", "-f"]).arg(&script).arg(&args.postgres))?;
            let tps = text.lines().find(|line| line.starts_with("tps"))?.to_owned();
            Some(format!("pgbench, one upsert + one select per transaction: {tps}"))
        }
        "mysql" => {
            // mariadb-slap drops the schema it ran in: give it one of its own.
            let text = run(Command::new("mariadb-slap").args([
                "-h", "127.0.0.1", "-uroot", "--create-schema=session2_slap", "--concurrency=32", "--iterations=1", "--number-of-queries=16000",
                "--create=CREATE TABLE IF NOT EXISTS slap_session (k INT PRIMARY KEY, version BIGINT, data TEXT)",
                "--query=INSERT INTO slap_session VALUES (FLOOR(RAND()*10000), 1, REPEAT('x', 400)) ON DUPLICATE KEY UPDATE version = version + 1; SELECT version, data FROM slap_session WHERE k = FLOOR(RAND()*10000)",
                "--delimiter=;",
            ]))?;
            let seconds: f64 = text
                .lines()
                .find(|line| line.contains("Average number of seconds"))?
                .rsplit(':')
                .next()?
                .trim()
                .trim_end_matches(" seconds")
                .parse()
                .ok()?;
            Some(format!("mariadb-slap -c 32, each query one upsert + one select: {:.0} queries/s", 16_000.0 / seconds))
        }
        _ => None,
    }
}

fn version_of(command: &str, args: &[&str]) -> String {
    Command::new(command)
        .args(args)
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "not found".to_owned())
}

fn render(args: &AllArgs, results: &Results, took: Duration) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|line| line.starts_with("model name")).map(|line| line.split(':').nth(1).unwrap_or_default().trim().to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| info.lines().next().map(|line| line.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1_048_576))
        .unwrap_or(0);
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(out, "session2 beside tower-sessions {}, measured in one run by `bench/run.sh` (`session2-bench all`).", TOWER_SESSIONS_VERSION);
    let _ = writeln!(out, "Ratios are session2 / tower-sessions: above 1 means session2 serves more requests per second.\n");
    let _ = writeln!(out, "## Machine and settings\n");
    let _ = writeln!(out, "- CPU: {cpu}, {cores} cores; memory: {memory} GiB");
    let _ = writeln!(out, "- {}; PostgreSQL: {}; MariaDB: {}; Redis: {}", version_of("rustc", &["--version"]), version_of("psql", &["--version"]), version_of("mariadb", &["--version"]), version_of("redis-server", &["--version"]));
    let _ = writeln!(out, "- load: {} virtual users, each with its own keep-alive connection and cookie, closed loop; {:.1} s warm-up, {:.1} s measured per row; load generator and server share the machine", args.users, args.warmup, args.duration);
    let _ = writeln!(out, "- both libraries: the same axum routes, 16 connections per SQL pool, one multiplexed Redis connection, 30-minute idle expiry, a plain-HTTP (non-Secure) cookie");
    let _ = writeln!(out, "- run time: {:.0} s\n", took.as_secs_f64());

    let table = |out: &mut String, title: &str, workload: Workload, ours_workload: Workload| {
        let _ = writeln!(out, "### {title}\n");
        let _ = writeln!(out, "| store | session2 req/s | tower-sessions req/s | ratio | session2 p99 | tower-sessions p99 | errors / mismatches (session2, tower-sessions) |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
        for store in &args.stores {
            let find = |library, workload| results.http.iter().find(|(s, w, l, _)| s == store && *w == workload && *l == library).map(|(_, _, _, r)| r);
            let (Some(ours), theirs) = (find(Library::Session2, ours_workload), find(Library::TowerSessions, workload)) else { continue };
            let ratio = theirs.map_or("–".to_owned(), |theirs| format!("{:.2}×", ours.requests_per_second / theirs.requests_per_second));
            let _ = writeln!(
                out,
                "| {store} | {:.0} | {} | {ratio} | {} µs | {} | {}/{}, {} |",
                ours.requests_per_second,
                theirs.map_or("–".to_owned(), |t| format!("{:.0}", t.requests_per_second)),
                ours.p99_us,
                theirs.map_or("–".to_owned(), |t| format!("{} µs", t.p99_us)),
                ours.errors,
                ours.mismatches,
                theirs.map_or("–".to_owned(), |t| format!("{}/{}", t.errors, t.mismatches)),
            );
        }
        let _ = writeln!(out);
    };
    let _ = writeln!(out, "## HTTP\n");
    table(&mut out, "(a) read-modify-write of a counter, plain session", Workload::Rmw, Workload::Rmw);
    table(&mut out, "(a′) read-modify-write, session2's exclusive session", Workload::Rmw, Workload::RmwExclusive);
    table(&mut out, "(b) read only", Workload::Read, Workload::Read);
    table(&mut out, "(c) anonymous (the handler does not touch the session)", Workload::Anon, Workload::Anon);
    let _ = writeln!(out, "The floor for (c): a bare axum server with no session layer, measured just before each store's rows.\n");
    let _ = writeln!(out, "| store | bare axum req/s | session2 anonymous / bare | tower-sessions anonymous / bare |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (store, floor) in &results.floor {
        let ratio = |library| {
            results
                .http
                .iter()
                .find(|(s, w, l, _)| s == store && *w == Workload::Anon && *l == library)
                .map_or("–".to_owned(), |(_, _, _, r)| format!("{:.2}×", r.requests_per_second / floor.requests_per_second))
        };
        let _ = writeln!(out, "| {store} | {:.0} | {} | {} |", floor.requests_per_second, ratio(Library::Session2), ratio(Library::TowerSessions));
    }
    let _ = writeln!(out);
    table(&mut out, "(d) mix: 90% read-modify-write, 5% read, 3% login, 2% logout", Workload::Mix, Workload::Mix);
    let _ = writeln!(out, "### (e) contention: {} users share one session, read-modify-write\n", args.users);
    let _ = writeln!(out, "| store | session2 exclusive: req/s, lost updates | session2 plain: req/s, lost updates | tower-sessions: req/s, lost updates |");
    let _ = writeln!(out, "|---|---|---|---|");
    for store in &args.stores {
        let find = |library, workload| results.http.iter().find(|(s, w, l, _)| s == store && *w == workload && *l == library).map(|(_, _, _, r)| format!("{:.0}, {} lost", r.requests_per_second, r.lost_updates)).unwrap_or_else(|| "–".to_owned());
        let _ = writeln!(out, "| {store} | {} | {} | {} |", find(Library::Session2, Workload::ContentionExclusive), find(Library::Session2, Workload::Contention), find(Library::TowerSessions, Workload::Contention));
    }
    let _ = writeln!(out, "\n## Store level (session2, no HTTP; 32 concurrent tasks over 10,000 sessions of 200 bytes)\n");
    let _ = writeln!(out, "| store | load/s | save (compare-and-swap)/s | create/s | touch/s |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for result in &results.store {
        let _ = writeln!(out, "| {} | {:.0} | {:.0} | {:.0} | {:.0} |", short_store(&result.store), result.load, result.save, result.create, result.touch);
    }
    let _ = writeln!(out, "\nThe raw servers at the same concurrency, as the physical limit:\n");
    for (store, raw) in &results.raw {
        let _ = writeln!(out, "- {store}: {raw}");
    }
    let _ = writeln!(out, "\n## Scale: purging expired sessions\n");
    let _ = writeln!(out, "| store | expired sessions | session2 `purge_expired` (batches of 100,000) | one raw `DELETE` | ratio |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for result in &results.purge {
        let _ = writeln!(
            out,
            "| {} | {} (purged {}) | {:.2} s | {:.2} s | {:.2}× |",
            result.store, result.sessions, result.purged, result.store_seconds, result.raw_seconds, result.store_seconds / result.raw_seconds
        );
    }
    let _ = writeln!(out, "\n## Memory store: resident memory per session (200-byte payload)\n");
    let _ = writeln!(out, "| library | sessions | bytes per session |");
    let _ = writeln!(out, "|---|---:|---:|");
    for result in &results.memory {
        let _ = writeln!(out, "| {} | {} | {:.0} |", result.library, result.sessions, result.bytes_per_session);
    }
    let _ = writeln!(out, "\n## Reproduce\n\n```sh\nbench/run.sh\n```");
    out
}

fn short_store(url: &str) -> &str {
    url.split([':', '?']).next().unwrap_or(url)
}

const TOWER_SESSIONS_VERSION: &str = "0.14 (tower-sessions-sqlx-store 0.15, tower-sessions-redis-store 0.16)";
