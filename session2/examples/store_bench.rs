//! Store-level throughput: create, load and save (compare-and-swap)
//! operations per second at a given concurrency, over a set of sessions.
//!
//! ```text
//! cargo run --release --example store_bench --features sqlite,postgres,mysql -- URL \
//!     [--sessions 10000] [--concurrency 32] [--seconds 10]
//! ```
//!
//! `URL` is any store URL (`sqlite:bench.db`, `postgres://…`, `mysql://…`,
//! `memory:`, `dir:…`). On SQL stores the benchmark uses the table
//! `session2_bench` unless the URL names one with `?table=`; it deletes its
//! sessions at the end. Each phase runs `--concurrency`
//! tasks: `create` inserts the sessions, `load` reads random sessions, and
//! `save` has every task replace sessions of its own share by
//! compare-and-swap on the version it last wrote, so each save is exactly
//! one store operation and none conflicts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session2::{Clock, CreateOutcome, Record, SessionId, SessionKey, SystemClock};

struct Options {
    url: String,
    sessions: usize,
    concurrency: usize,
    seconds: u64,
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        url: String::new(),
        sessions: 10_000,
        concurrency: 32,
        seconds: 10,
    };
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|value| value.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--sessions" => options.sessions = number("--sessions")? as usize,
            "--concurrency" => options.concurrency = number("--concurrency")? as usize,
            "--seconds" => options.seconds = number("--seconds")?,
            url if options.url.is_empty() && !url.starts_with("--") => options.url = url.into(),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if options.url.is_empty() {
        return Err("usage: store_bench URL [--sessions N] [--concurrency N] [--seconds N]".into());
    }
    options.concurrency = options.concurrency.clamp(1, options.sessions.max(1));
    Ok(options)
}

/// A store URL on the bench table, unless it already names a table.
fn with_bench_table(url: &str) -> String {
    let sql = ["sqlite:", "postgres:", "postgresql:", "mysql:", "mariadb:"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if !sql || url.contains("table=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}table=session2_bench")
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("store_bench: {message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(err) = runtime.block_on(run(options)) {
        eprintln!("store_bench: {err:#}");
        std::process::exit(1);
    }
}

async fn run(options: Options) -> session2::Result<()> {
    let url = with_bench_table(&options.url);
    let store = session2::store::open(&url).await?;
    store.setup().await?;
    println!(
        "store `{}`: {} sessions, concurrency {}, {} s per phase",
        store.name(),
        options.sessions,
        options.concurrency,
        options.seconds
    );

    let now = SystemClock.now();
    let keys: Arc<Vec<SessionKey>> = Arc::new(
        (0..options.sessions)
            .map(|_| SessionId::generate().key())
            .collect(),
    );
    let mut template = Record::new(now, now.saturating_add(Duration::from_secs(3600)), None);
    template.data = br#"{"counter":0,"theme":"dark","cart":[1,2,3]}"#.to_vec();
    template.user = None;

    // Create: every task inserts its share of the keys.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for share in shares(options.sessions, options.concurrency) {
        let (store, keys, record) = (Arc::clone(&store), Arc::clone(&keys), template.clone());
        tasks.push(tokio::spawn(async move {
            for key in &keys[share] {
                let outcome = store.create(key, &record, now).await?;
                assert_eq!(outcome, CreateOutcome::Created);
            }
            Ok::<_, session2::Error>(())
        }));
    }
    for task in tasks {
        task.await.expect("a create task")?;
    }
    report("create", options.sessions as u64, started.elapsed());

    // Load: random keys until the time is up.
    let duration = Duration::from_secs(options.seconds);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..options.concurrency {
        let (store, keys, done) = (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut random = 0x9e37_79b9_7f4a_7c15_u64 ^ (task as u64 + 1);
            while started.elapsed() < duration {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let key = &keys[(random % keys.len() as u64) as usize];
                let record = store.load(key, now).await?;
                assert!(record.is_some(), "a created session loads");
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, session2::Error>(())
        }));
    }
    for task in tasks {
        task.await.expect("a load task")?;
    }
    report("load", done.load(Ordering::Relaxed), started.elapsed());

    // Save: compare-and-swap on the task's own sessions, round robin.
    let done = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for share in shares(options.sessions, options.concurrency) {
        let (store, keys, record) = (Arc::clone(&store), Arc::clone(&keys), template.clone());
        let (done, conflicts) = (Arc::clone(&done), Arc::clone(&conflicts));
        tasks.push(tokio::spawn(async move {
            let mine = &keys[share];
            let mut versions = vec![1u64; mine.len()];
            let mut next = record;
            let mut i = 0;
            while started.elapsed() < duration {
                let slot = i % mine.len();
                next.version = versions[slot] + 1;
                next.data =
                    format!(r#"{{"counter":{},"theme":"dark"}}"#, next.version).into_bytes();
                if store
                    .replace(&mine[slot], versions[slot], &next, now)
                    .await?
                {
                    versions[slot] += 1;
                } else {
                    conflicts.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, session2::Error>(())
        }));
    }
    for task in tasks {
        task.await.expect("a save task")?;
    }
    report("save", done.load(Ordering::Relaxed), started.elapsed());
    let conflicts = conflicts.load(Ordering::Relaxed);
    if conflicts > 0 {
        println!(
            "  {conflicts} saves lost their compare-and-swap (unexpected: shares are disjoint)"
        );
    }

    for key in keys.iter() {
        store.delete(key, None).await?;
    }
    Ok(())
}

/// Splits `0..total` into `parts` contiguous, non-empty ranges.
fn shares(total: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    (0..parts)
        .map(|part| (total * part / parts)..(total * (part + 1) / parts))
        .collect()
}

fn report(phase: &str, operations: u64, elapsed: Duration) {
    let per_second = operations as f64 / elapsed.as_secs_f64();
    println!("  {phase:<6} {operations:>9} ops in {elapsed:>8.2?}: {per_second:>10.0} ops/s");
}
