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
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,sqlite,postgres,mysql,redis"
    )]
    stores: Vec<String>,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    mysql: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    #[arg(long, default_value_t = 64)]
    users: usize,
    /// The numbers of users of (f), read-modify-write with few users, as
    /// most applications see most of the time (0 skips it).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    few_users: Vec<usize>,
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Runs of every row, the libraries taking turns; the report gives
    /// medians. 0 skips the HTTP benchmarks.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Runs of each contention row (e): they count lost updates, which
    /// one run shows as well as three, and the run must fit 15 minutes.
    /// 0 skips them.
    #[arg(long, default_value_t = 1)]
    contention_rounds: usize,
    /// Expired sessions to purge on each SQL store and Redis (0 skips the scale runs).
    #[arg(long, default_value_t = 1_000_000)]
    purge_sessions: u64,
    /// Sessions in the directory store's scale run (0 skips it): a million
    /// take about 7 minutes on a disk that discards freed blocks at once.
    #[arg(long, default_value_t = 100_000)]
    directory_sessions: u64,
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
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(library: Library, store: &str) -> anyhow::Result<Self> {
        let library =
            clap::ValueEnum::to_possible_value(&library).context("every library has a name")?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["server", "--library", library.get_name(), "--store", store])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let address = loop {
            let line = lines
                .next()
                .context("the server exited before listening")??;
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
        "postgres" => (with_bench_table(&args.postgres), args.postgres.clone()),
        "mysql" => (with_bench_table(&args.mysql), args.mysql.clone()),
        "redis" => (
            format!("{}?prefix=bench-session2:", args.redis),
            args.redis.clone(),
        ),
        other => bail!("unknown store `{other}`"),
    };
    Ok(StoreUrls { ours, theirs })
}

/// session2's table on the SQL servers, made afresh by each run.
const BENCH_TABLE: &str = "bench_session2";

fn with_bench_table(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}table={BENCH_TABLE}")
}

/// Drops both libraries' tables on a SQL server, so that each run starts
/// from empty tables of the same size: sessions left by earlier runs (the
/// store-level runs alone add 10,000 a run) would make one library's
/// table, and its indexes, larger than the other's.
async fn drop_session_tables(url: &str) -> anyhow::Result<()> {
    let statements = [
        format!("DROP TABLE IF EXISTS {BENCH_TABLE}"),
        format!("DROP TABLE IF EXISTS {BENCH_TABLE}_schema"),
        "DROP TABLE IF EXISTS tower_sessions.session".to_owned(),
    ];
    crate::scale::execute(url, &statements).await?;
    Ok(())
}

/// Deletes every session of session2's store at `url`, with its index
/// entries: on Redis, where the SQL stores drop their tables, so that each
/// run starts from empty indexes (the store-level runs alone leave about
/// 100,000 sessions, which live for up to two hours).
async fn purge_every_session(url: &str) -> anyhow::Result<()> {
    let store = crate::store::open(url).await?;
    store
        .purge_expired(session2::Timestamp::from_millis(i64::MAX))
        .await?;
    Ok(())
}

const ALL_WORKLOADS: [Workload; 7] = [
    Workload::Rmw,
    Workload::RmwExclusive,
    Workload::Read,
    Workload::Anon,
    Workload::Mix,
    Workload::Contention,
    Workload::ContentionExclusive,
];

/// How many times each row of `workload` runs.
fn rounds_of(args: &AllArgs, workload: Workload) -> usize {
    match workload {
        Workload::Contention | Workload::ContentionExclusive => args.contention_rounds,
        _ => args.rounds,
    }
}

/// The processes of each store's server, charged for their CPU per request.
fn store_processes(store: &str) -> Vec<String> {
    let names: &[&str] = match store {
        "postgres" => &["postgres"],
        "mysql" => &["mariadbd", "mysqld"],
        "redis" => &["redis-server"],
        _ => &[],
    };
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// The middle one of `values` (the upper one of an even count).
fn middle<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// The middle run of each figure (requests/s, p99, CPU), each taken on its
/// own; errors, mismatches and lost updates add up over all runs.
fn median(runs: &[LoadResult]) -> LoadResult {
    let optional = |values: Vec<Option<f64>>| {
        values
            .iter()
            .all(Option::is_some)
            .then(|| middle(values.into_iter().flatten().collect()))
    };
    LoadResult {
        workload: runs[0].workload.clone(),
        requests: runs.iter().map(|run| run.requests).sum(),
        errors: runs.iter().map(|run| run.errors).sum(),
        mismatches: runs.iter().map(|run| run.mismatches).sum(),
        lost_updates: runs.iter().map(|run| run.lost_updates).sum(),
        requests_per_second: middle(runs.iter().map(|run| run.requests_per_second).collect()),
        p50_us: middle(runs.iter().map(|run| run.p50_us).collect()),
        p99_us: middle(runs.iter().map(|run| run.p99_us).collect()),
        server_cpu_us: optional(runs.iter().map(|run| run.server_cpu_us).collect()),
        store_cpu_us: optional(runs.iter().map(|run| run.store_cpu_us).collect()),
        load_cpu_us: optional(runs.iter().map(|run| run.load_cpu_us).collect()),
    }
}

/// One row's runs for one library.
struct Row {
    store: String,
    workload: Workload,
    users: usize,
    library: Library,
    runs: Vec<LoadResult>,
}

impl Row {
    fn median(&self) -> LoadResult {
        median(&self.runs)
    }

    /// Server plus store CPU per request, median over the runs.
    fn cpu_us(&self) -> Option<f64> {
        let totals: Option<Vec<f64>> = self
            .runs
            .iter()
            .map(|run| Some(run.server_cpu_us? + run.store_cpu_us.unwrap_or(0.0)))
            .collect();
        totals.map(middle)
    }
}

#[derive(Default)]
struct Results {
    http: Vec<Row>,
    store: Vec<StoreResult>,
    raw: Vec<(String, String)>,
    memory: Vec<MemoryResult>,
    purge: Vec<crate::scale::PurgeResult>,
    directory: Option<crate::scale::DirectoryResult>,
}

pub(crate) async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("session2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut results = Results::default();
    // Every line of progress says when it came, so a run over its time
    // shows which part grew.
    macro_rules! progress {
        ($($line:tt)*) => {
            eprintln!("[{:>4.0} s] {}", started.elapsed().as_secs_f64(), format_args!($($line)*))
        };
    }
    for name in &args.stores {
        let urls = store_urls(&args, name, &scratch)?;
        if matches!(name.as_str(), "postgres" | "mysql")
            && let Err(err) = drop_session_tables(&urls.theirs).await
        {
            progress!("could not drop the session tables on {name}: {err:#}");
        }
        if name == "redis"
            && let Err(err) = purge_every_session(&urls.ours).await
        {
            progress!("could not clear session2's bench prefix on redis: {err:#}");
        }
        // All three servers run side by side, so the libraries can take
        // turns on each row: drift of the machine hits both alike.
        let mut servers = Vec::new();
        for (library, url) in [
            (Library::Session2, &urls.ours),
            (Library::TowerSessions, &urls.theirs),
            (Library::Bare, &"memory".to_owned()),
            (Library::BareLayered, &"memory".to_owned()),
        ] {
            match Server::start(library, url) {
                Ok(server) => servers.push((library, server)),
                Err(err) => progress!("skipping {library:?} on {name}: {err:#}"),
            }
        }
        for (workload, users, rounds) in plan(&args) {
            let takes_part = |library: Library| match library {
                Library::Session2 => true,
                Library::TowerSessions => !matches!(
                    workload,
                    Workload::RmwExclusive | Workload::ContentionExclusive
                ),
                Library::Bare | Library::BareLayered => {
                    workload == Workload::Anon && users == args.users
                }
            };
            let servers: Vec<_> = servers
                .iter()
                .filter(|(library, _)| takes_part(*library))
                .collect();
            for row in measure_rows(name, &servers, workload, users, rounds, &args).await? {
                let result = row.median();
                progress!(
                    "{name} {:?} {workload:?}, {users} users: {:.0} req/s, p99 {} µs, cpu {:?} µs, {} errors, {} mismatches, {} lost",
                    row.library,
                    result.requests_per_second,
                    result.p99_us,
                    row.cpu_us(),
                    result.errors,
                    result.mismatches,
                    result.lost_updates
                );
                results.http.push(row);
            }
        }
        drop(servers);
        match crate::store::measure(&StoreArgs {
            store: urls.ours.clone(),
            sessions: 10_000,
            concurrency: 32,
            seconds: 2.0,
        })
        .await
        {
            Ok(result) => {
                progress!("{name} store: {result:?}");
                results.store.push(result);
            }
            Err(err) => progress!("store benchmark on {name} failed: {err:#}"),
        }
        if let Some(raw) = raw_figure(&args, name, &scratch) {
            progress!("{name} raw: {raw}");
            results.raw.push((name.clone(), raw));
        }
    }
    if args.purge_sessions > 0 {
        for name in args
            .stores
            .iter()
            .filter(|name| ["sqlite", "postgres", "mysql"].contains(&name.as_str()))
        {
            let server_url = match name.as_str() {
                "postgres" => args.postgres.clone(),
                "mysql" => args.mysql.clone(),
                _ => format!("sqlite:{}", scratch.join("purge.db").display()),
            };
            match crate::scale::purge(name, &server_url, args.purge_sessions).await {
                Ok(result) => {
                    progress!("{name} purge: {result:?}");
                    results.purge.push(result);
                }
                Err(err) => progress!("purge benchmark on {name} failed: {err:#}"),
            }
        }
        if args.stores.iter().any(|name| name == "redis") {
            match crate::scale::redis_purge(&args.redis, args.purge_sessions).await {
                Ok(result) => {
                    progress!("redis purge: {result:?}");
                    results.purge.push(result);
                }
                Err(err) => progress!("purge benchmark on redis failed: {err:#}"),
            }
        }
    }
    if args.directory_sessions > 0 {
        match crate::scale::directory(&scratch, args.directory_sessions).await {
            Ok(result) => {
                progress!("directory scale: {result:?}");
                results.directory = Some(result);
            }
            Err(err) => progress!("directory benchmark failed: {err:#}"),
        }
    }
    for library in ["session2", "tower-sessions"] {
        let output = Command::new(std::env::current_exe()?)
            .args(["memory", "--library", library])
            .output()?;
        let line = String::from_utf8_lossy(&output.stdout);
        results.memory.push(
            serde_json::from_str(line.trim())
                .with_context(|| format!("memory benchmark: {line}"))?,
        );
    }
    let report = render(&args, &results, started.elapsed());
    std::fs::write(&args.output, report)?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The HTTP rows to run on each store, as (workload, users, rounds): those
/// of (a) to (e), then those of (f), read-modify-write with few users.
fn plan(args: &AllArgs) -> Vec<(Workload, usize, usize)> {
    if args.rounds == 0 {
        return Vec::new();
    }
    let mut plan: Vec<_> = ALL_WORKLOADS
        .iter()
        .map(|&workload| (workload, args.users, rounds_of(args, workload)))
        .filter(|&(_, _, rounds)| rounds > 0)
        .collect();
    // A count equal to `--users` is (a) itself: its table shows (a)'s rows.
    let few_users = args
        .few_users
        .iter()
        .filter(|users| ![0, args.users].contains(users));
    plan.extend(few_users.map(|&users| (Workload::Rmw, users, args.rounds)));
    plan
}

/// Runs `workload` with `users` users on each of `servers` for `rounds`
/// rounds, the libraries taking turns.
async fn measure_rows(
    store: &str,
    servers: &[&(Library, Server)],
    workload: Workload,
    users: usize,
    rounds: usize,
    args: &AllArgs,
) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = servers
        .iter()
        .map(|(library, _)| Row {
            store: store.to_owned(),
            workload,
            users,
            library: *library,
            runs: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        // Alternate who goes first, so neither always runs on a warmer machine.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..rows.len()).collect()
        } else {
            (0..rows.len()).rev().collect()
        };
        for index in order {
            let server = &servers[index].1;
            let load = LoadArgs {
                address: server.address,
                workload,
                users,
                warmup: args.warmup,
                duration: args.duration,
                server_pid: Some(server.pid()),
                store_processes: store_processes(store),
                mix: crate::load::Mix::default(),
            };
            rows[index].runs.push(crate::load::measure(&load).await?);
        }
    }
    Ok(rows)
}

/// The raw server's own figure at concurrency 32, from its own tool.
fn raw_figure(args: &AllArgs, store: &str, scratch: &std::path::Path) -> Option<String> {
    let run = |command: &mut Command| -> Option<String> {
        let output = command.output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    };
    match store {
        "redis" => {
            let text = run(Command::new("redis-benchmark").args([
                "-h",
                "127.0.0.1",
                "-p",
                "6379",
                "-c",
                "32",
                "-n",
                "200000",
                "-q",
                "-t",
                "get,set",
                "-d",
                "400",
            ]))?;
            // Progress lines end in carriage returns; keep the summaries.
            let summaries: Vec<&str> = text
                .split(['\r', '\n'])
                .map(str::trim)
                .filter(|part| part.contains("requests per second"))
                .collect();
            Some(format!(
                "redis-benchmark -c 32 -d 400: {}",
                summaries.join("; ")
            ))
        }
        "postgres" => {
            let script = scratch.join("pgbench.sql");
            std::fs::write(
                &script,
                "\\set k random(1, 10000)\nINSERT INTO pgbench_session (key, version, data) VALUES (:k, 1, repeat('x', 400)) ON CONFLICT (key) DO UPDATE SET version = pgbench_session.version + 1, data = EXCLUDED.data;\nSELECT version, data FROM pgbench_session WHERE key = :k;\n",
            )
            .ok()?;
            run(Command::new("psql").args([&args.postgres, "-qc", "CREATE TABLE IF NOT EXISTS pgbench_session (key int PRIMARY KEY, version bigint, data text)"]))?;
            let text = run(Command::new("pgbench")
                .args(["-n", "-c", "32", "-j", "2", "-T", "5", "-f"])
                .arg(&script)
                .arg(&args.postgres))?;
            let tps = text
                .lines()
                .find(|line| line.starts_with("tps"))?
                .to_owned();
            Some(format!(
                "pgbench, one upsert + one select per transaction: {tps}"
            ))
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
            Some(format!(
                "mariadb-slap -c 32, each query one upsert + one select: {:.0} queries/s",
                16_000.0 / seconds
            ))
        }
        _ => None,
    }
}

fn version_of(command: &str, args: &[&str]) -> String {
    Command::new(command)
        .args(args)
        .output()
        .ok()
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "not found".to_owned())
}

fn render(args: &AllArgs, results: &Results, took: Duration) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .map(|line| line.split(':').nth(1).unwrap_or_default().trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().next().map(|line| {
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1_048_576
            })
        })
        .unwrap_or(0);
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "session2 beside tower-sessions {}, measured in one run by `bench/run.sh` (`session2-bench all`).",
        TOWER_SESSIONS_VERSION
    );
    let _ = writeln!(
        out,
        "Ratios are session2 / tower-sessions: above 1 means session2 serves more requests per second.\n"
    );
    let _ = writeln!(out, "## Machine and settings\n");
    let _ = writeln!(out, "- CPU: {cpu}, {cores} cores; memory: {memory} GiB");
    let _ = writeln!(
        out,
        "- {}; PostgreSQL: {}; MariaDB: {}; Redis: {}",
        version_of("rustc", &["--version"]),
        version_of("psql", &["--version"]),
        version_of("mariadb", &["--version"]),
        version_of("redis-server", &["--version"])
    );
    let _ = writeln!(
        out,
        "- load: {} virtual users, each with its own keep-alive connection and cookie, closed loop, each writing its requests and reading its answers in its own task; {} rounds of {:.1} s warm-up and {:.1} s measured per row ({} for the contention rows of (e)); load generator, servers and databases share the machine",
        args.users, args.rounds, args.warmup, args.duration, args.contention_rounds
    );
    let _ = writeln!(
        out,
        "- both libraries: the same axum routes, 16 connections per SQL pool, one multiplexed Redis connection, 30-minute idle expiry, a plain-HTTP (non-Secure) cookie"
    );
    let _ = writeln!(out, "- run time: {:.0} s\n", took.as_secs_f64());

    let row_of = |store: &str, workload: Workload, users: usize, library: Library| {
        results.http.iter().find(|row| {
            row.store == store
                && row.workload == workload
                && row.users == users
                && row.library == library
        })
    };
    let row = |store: &str, workload: Workload, library: Library| {
        row_of(store, workload, args.users, library)
    };
    let cpu = |row: Option<&Row>| {
        row.and_then(Row::cpu_us)
            .map_or("–".to_owned(), |cpu| format!("{cpu:.0}"))
    };
    let table_of = |out: &mut String,
                    title: &str,
                    workload: Workload,
                    ours_workload: Workload,
                    users: usize| {
        let _ = writeln!(out, "### {title}\n");
        let _ = writeln!(
            out,
            "| store | session2 req/s | tower-sessions req/s | ratio (per-round range) | session2 p99 | tower-sessions p99 | CPU µs/request, session2 | CPU µs/request, tower-sessions | errors / mismatches (session2, tower-sessions) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for store in &args.stores {
            let (Some(ours_row), theirs_row) = (
                row_of(store, ours_workload, users, Library::Session2),
                row_of(store, workload, users, Library::TowerSessions),
            ) else {
                continue;
            };
            let ours = ours_row.median();
            let theirs = theirs_row.map(Row::median);
            let ratio = theirs_row.map_or("–".to_owned(), |theirs_row| {
                let paired: Vec<f64> = ours_row
                    .runs
                    .iter()
                    .zip(&theirs_row.runs)
                    .map(|(a, b)| a.requests_per_second / b.requests_per_second)
                    .collect();
                let (low, high) = paired.iter().fold((f64::MAX, f64::MIN), |(low, high), r| {
                    (low.min(*r), high.max(*r))
                });
                format!(
                    "{:.2}× ({low:.2}–{high:.2})",
                    ours.requests_per_second / theirs_row.median().requests_per_second
                )
            });
            let _ = writeln!(
                out,
                "| {store} | {:.0} | {} | {ratio} | {} µs | {} | {} | {} | {}/{}, {} |",
                ours.requests_per_second,
                theirs.as_ref().map_or("–".to_owned(), |t| format!(
                    "{:.0}",
                    t.requests_per_second
                )),
                ours.p99_us,
                theirs
                    .as_ref()
                    .map_or("–".to_owned(), |t| format!("{} µs", t.p99_us)),
                cpu(Some(ours_row)),
                cpu(theirs_row),
                ours.errors,
                ours.mismatches,
                theirs.as_ref().map_or("–".to_owned(), |t| format!(
                    "{}/{}",
                    t.errors, t.mismatches
                )),
            );
        }
        let _ = writeln!(out);
    };
    let table = |out: &mut String, title: &str, workload: Workload, ours_workload: Workload| {
        table_of(out, title, workload, ours_workload, args.users);
    };
    let _ = writeln!(out, "## HTTP\n");
    let _ = writeln!(
        out,
        "Each row is the median of {} runs of {:.1} s (after {:.1} s of warm-up), the libraries taking turns; the range is the lowest and highest ratio of the paired runs. \\
\
         CPU µs/request is the CPU time the server process and the store's server (PostgreSQL, MariaDB or Redis; none for the in-process stores) used per request in the measured window: it depends far less on what else the two cores are doing than requests/s does.\n",
        args.rounds, args.duration, args.warmup
    );
    table(
        &mut out,
        "(a) read-modify-write of a counter, plain session",
        Workload::Rmw,
        Workload::Rmw,
    );
    table(
        &mut out,
        "(a′) read-modify-write, session2's exclusive session",
        Workload::Rmw,
        Workload::RmwExclusive,
    );
    table(&mut out, "(b) read only", Workload::Read, Workload::Read);
    table(
        &mut out,
        "(c) anonymous (the handler does not touch the session)",
        Workload::Anon,
        Workload::Anon,
    );
    let _ = writeln!(
        out,
        "The floor for (c): a bare axum server with no session layer, in the same rounds. \\\n\
         Beside it, the same server with a layer that does nothing, added by `Router::layer` as both libraries' layers are: \
         axum then boxes each route again, whatever the layer does.\n"
    );
    let _ = writeln!(
        out,
        "| store | bare axum req/s | session2 anonymous / bare | tower-sessions anonymous / bare | bare with a no-op layer req/s | session2 anonymous / bare with a no-op layer | CPU µs/request: bare, bare with a no-op layer, session2, tower-sessions |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for store in &args.stores {
        let Some(bare) = row(store, Workload::Anon, Library::Bare) else {
            continue;
        };
        let floor = bare.median().requests_per_second;
        let layered = row(store, Workload::Anon, Library::BareLayered);
        let layered_floor = layered.map(|row| row.median().requests_per_second);
        let ratio = |library, floor: Option<f64>| match (row(store, Workload::Anon, library), floor)
        {
            (Some(row), Some(floor)) => {
                format!("{:.2}×", row.median().requests_per_second / floor)
            }
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {store} | {floor:.0} | {} | {} | {} | {} | {}, {}, {}, {} |",
            ratio(Library::Session2, Some(floor)),
            ratio(Library::TowerSessions, Some(floor)),
            layered_floor.map_or("–".to_owned(), |floor| format!("{floor:.0}")),
            ratio(Library::Session2, layered_floor),
            cpu(Some(bare)),
            cpu(layered),
            cpu(row(store, Workload::Anon, Library::Session2)),
            cpu(row(store, Workload::Anon, Library::TowerSessions))
        );
    }
    let _ = writeln!(out);
    table(
        &mut out,
        "(d) mix: 90% read-modify-write, 5% read, 3% login, 2% logout",
        Workload::Mix,
        Workload::Mix,
    );
    if args.contention_rounds > 0 {
        let _ = writeln!(
            out,
            "### (e) contention: {} users share one session, read-modify-write\n",
            args.users
        );
        let (runs, summed) = match args.contention_rounds {
            1 => ("One run".to_owned(), ""),
            rounds => (
                format!("{rounds} runs"),
                "; lost updates are added up over them",
            ),
        };
        let _ = writeln!(
            out,
            "{runs} of {:.1} s per row (after {:.1} s of warm-up){summed}.\n",
            args.duration, args.warmup
        );
        let _ = writeln!(
            out,
            "| store | session2 exclusive: req/s, lost updates | session2 plain: req/s, lost updates | tower-sessions: req/s, lost updates |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        for store in &args.stores {
            let find = |library, workload| {
                row(store, workload, library)
                    .map(Row::median)
                    .map(|r| format!("{:.0}, {} lost", r.requests_per_second, r.lost_updates))
                    .unwrap_or_else(|| "–".to_owned())
            };
            let _ = writeln!(
                out,
                "| {store} | {} | {} | {} |",
                find(Library::Session2, Workload::ContentionExclusive),
                find(Library::Session2, Workload::Contention),
                find(Library::TowerSessions, Workload::Contention)
            );
        }
        let _ = writeln!(out);
    }
    for &users in args.few_users.iter().filter(|users| **users > 0) {
        let title = format!(
            "(f) read-modify-write, plain session, {users} user{}: most applications, most of the time",
            if users == 1 { "" } else { "s" }
        );
        table_of(&mut out, &title, Workload::Rmw, Workload::Rmw, users);
    }
    let _ = writeln!(
        out,
        "## Store level (session2, no HTTP; 32 concurrent tasks over 10,000 sessions of 200 bytes)\n"
    );
    let _ = writeln!(
        out,
        "| store | load/s | save (compare-and-swap)/s | create/s | touch/s |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for result in &results.store {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            short_store(&result.store),
            result.load,
            result.save,
            result.create,
            result.touch
        );
    }
    let _ = writeln!(
        out,
        "\nThe raw servers at the same concurrency, as the physical limit:\n"
    );
    for (store, raw) in &results.raw {
        let _ = writeln!(out, "- {store}: {raw}");
    }
    let _ = writeln!(out, "\n## Scale: purging expired sessions\n");
    let _ = writeln!(
        out,
        "| store | expired sessions | session2 `purge_expired` | one raw `DELETE` | ratio | until the server is done: session2, raw, ratio |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for result in &results.purge {
        let drained = match result.drained {
            Some(drained) => format!(
                "{:.2} s, {:.2} s, {:.2}×",
                drained.store_seconds,
                drained.raw_seconds,
                drained.store_seconds / drained.raw_seconds
            ),
            None => "the same".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} (purged {}) | {:.2} s | {:.2} s | {:.2}× | {drained} |",
            result.store,
            result.sessions,
            result.purged,
            result.store_seconds,
            result.raw_seconds,
            result.store_seconds / result.raw_seconds
        );
    }
    let _ = writeln!(
        out,
        "\nSQL stores: each figure is the mean of two runs on freshly seeded tables, in the order session2, raw, raw, session2 (SQLite: fresh copies of one seeded database file). `purge_expired` deletes in batches of 100,000 rows on SQLite and MariaDB and in one statement on PostgreSQL, then moves the early expiry entries of live rows (none here)."
    );
    if results.purge.iter().any(|result| result.drained.is_some()) {
        let _ = writeln!(
            out,
            "\nMariaDB: a `DELETE` returns while InnoDB still holds the deleted rows; its background purge threads remove them afterwards, on the same two cores. The last column times each run until InnoDB's history list is back where it was before the run (`SHOW ENGINE INNODB STATUS`), and each run starts only once the one before has drained. Batches let the background purge work while later batches run; one big `DELETE` leaves all of it for after."
        );
    }
    if results.purge.iter().any(|result| result.store == "redis") {
        let _ = writeln!(
            out,
            "\nRedis: `purge_expired` runs one script per 1,000 sessions; its raw column is one Lua script per 10,000 sessions (`ZRANGEBYSCORE`, `UNLINK`, `ZREM`) on the same keys, not a `DELETE`."
        );
    }
    if let Some(result) = &results.directory {
        let _ = writeln!(
            out,
            "\n## Scale: the directory store with {} sessions\n",
            result.sessions
        );
        let _ = writeln!(
            out,
            "Creates go through the store (each one fsyncs twice) on a sample; the other sessions are written directly, then synced; loads are random, 32 at a time, for 5 s; the raw column is `rm -rf` of an identical tree.\n"
        );
        out.push_str(&crate::scale::render_directory(result));
    }
    let _ = writeln!(
        out,
        "\n## Memory store: resident memory per session (200-byte payload)\n"
    );
    let _ = writeln!(out, "| library | sessions | bytes per session |");
    let _ = writeln!(out, "|---|---:|---:|");
    for result in &results.memory {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} |",
            result.library, result.sessions, result.bytes_per_session
        );
    }
    let _ = writeln!(out, "\n## Reproduce\n\n```sh\nbench/run.sh\n```");
    out
}

fn short_store(url: &str) -> &str {
    url.split([':', '?']).next().unwrap_or(url)
}

const TOWER_SESSIONS_VERSION: &str =
    "0.14 (tower-sessions-sqlx-store 0.15, tower-sessions-redis-store 0.16)";

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parsed(args: &[&str]) -> AllArgs {
        let cli = crate::Cli::parse_from(["session2-bench", "all"].iter().chain(args));
        match cli.command {
            crate::Command::All(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn contention_rows_run_their_own_number_of_rounds() {
        let defaults = parsed(&[]);
        assert_eq!(rounds_of(&defaults, Workload::Rmw), 3);
        assert_eq!(rounds_of(&defaults, Workload::Anon), 3);
        assert_eq!(rounds_of(&defaults, Workload::Contention), 1);
        assert_eq!(rounds_of(&defaults, Workload::ContentionExclusive), 1);
        let chosen = parsed(&["--rounds", "5", "--contention-rounds", "2"]);
        assert_eq!(rounds_of(&chosen, Workload::Mix), 5);
        assert_eq!(rounds_of(&chosen, Workload::ContentionExclusive), 2);
        let none = parsed(&["--contention-rounds", "0"]);
        let planned: Vec<_> = plan(&none)
            .into_iter()
            .map(|(workload, ..)| workload)
            .collect();
        assert!(!planned.contains(&Workload::Contention), "{planned:?}");
        assert!(
            !planned.contains(&Workload::ContentionExclusive),
            "{planned:?}"
        );
        assert!(planned.contains(&Workload::Rmw), "{planned:?}");
        assert!(!render(&none, &Results::default(), Duration::ZERO).contains("### (e)"));
    }

    #[test]
    fn the_report_says_how_often_the_contention_rows_ran() {
        let report = |args: &[&str]| render(&parsed(args), &Results::default(), Duration::ZERO);
        assert!(report(&[]).contains("One run of 2.0 s per row (after 0.3 s of warm-up).\n"));
        assert!(report(&["--contention-rounds", "3"]).contains(
            "3 runs of 2.0 s per row (after 0.3 s of warm-up); lost updates are added up over them.\n"
        ));
    }

    #[test]
    fn few_users_add_read_modify_write_rows_unless_zero_or_the_main_count() {
        let few = |args: &[&str]| -> Vec<usize> {
            plan(&parsed(args))
                .into_iter()
                .skip(ALL_WORKLOADS.len())
                .map(|(workload, users, rounds)| {
                    assert_eq!((workload, rounds), (Workload::Rmw, 3));
                    users
                })
                .collect()
        };
        assert_eq!(few(&[]), [1, 4]);
        assert_eq!(few(&["--few-users", "0"]), Vec::<usize>::new());
        assert_eq!(few(&["--few-users", "2,64,8"]), [2, 8]);
        assert!(plan(&parsed(&["--rounds", "0"])).is_empty());
    }

    fn row(workload: Workload, users: usize, library: Library, requests_per_second: f64) -> Row {
        let run = LoadResult {
            workload: format!("{workload:?}"),
            requests: 1,
            errors: 0,
            mismatches: 0,
            lost_updates: 0,
            requests_per_second,
            p50_us: 1,
            p99_us: 2,
            server_cpu_us: None,
            store_cpu_us: None,
            load_cpu_us: None,
        };
        Row {
            store: "memory".to_owned(),
            workload,
            users,
            library,
            runs: vec![run],
        }
    }

    #[test]
    fn each_number_of_few_users_gets_its_own_table_and_zero_skips_them() {
        let args = parsed(&["--stores", "memory"]);
        let results = Results {
            http: vec![
                row(Workload::Rmw, 64, Library::Session2, 6400.0),
                row(Workload::Rmw, 64, Library::TowerSessions, 3200.0),
                row(Workload::Rmw, 4, Library::Session2, 400.0),
                row(Workload::Rmw, 4, Library::TowerSessions, 800.0),
            ],
            ..Results::default()
        };
        let report = render(&args, &results, Duration::ZERO);
        let table = |title: &str| {
            let start = report.find(title).expect(title);
            let end = report[start..]
                .find("\n\n###")
                .map_or(report.len(), |end| start + end);
            report[start..end].to_owned()
        };
        assert!(table("### (a) ").contains("| memory | 6400 | 3200 | 2.00× "));
        assert!(
            table("### (f) read-modify-write, plain session, 4 users")
                .contains("| memory | 400 | 800 | 0.50× ")
        );
        assert!(report.contains("### (f) read-modify-write, plain session, 1 user: "));
        let skipped = render(&parsed(&["--few-users", "0"]), &results, Duration::ZERO);
        assert!(!skipped.contains("### (f)"));
    }

    #[test]
    fn anonymous_requests_are_set_against_both_bare_servers() {
        let args = parsed(&["--stores", "memory"]);
        let anonymous =
            |library, requests_per_second| row(Workload::Anon, 64, library, requests_per_second);
        let mut results = Results {
            http: vec![
                anonymous(Library::Session2, 1000.0),
                anonymous(Library::TowerSessions, 900.0),
                anonymous(Library::Bare, 1250.0),
                anonymous(Library::BareLayered, 1100.0),
            ],
            ..Results::default()
        };
        let report = render(&args, &results, Duration::ZERO);
        assert!(
            report.contains("| memory | 1250 | 0.80× | 0.72× | 1100 | 0.91× | "),
            "{report}"
        );
        results.http.pop();
        let report = render(&args, &results, Duration::ZERO);
        assert!(
            report.contains("| memory | 1250 | 0.80× | 0.72× | – | – | "),
            "{report}"
        );
    }
}
