//! Store-level benchmark (no HTTP): load, save (compare-and-swap), create
//! and touch per second at a given concurrency over a set of sessions; and
//! resident memory per session of the memory stores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use session2::{
    Clock, CreateOutcome, Record, SessionId, SessionKey, SessionStore, SystemClock, Timestamp,
};

#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// The store URL (`memory` for the memory store).
    #[arg(long)]
    pub(crate) store: String,
    #[arg(long, default_value_t = 10_000)]
    pub(crate) sessions: usize,
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Seconds per operation.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) seconds: f64,
}

/// Operations per second of each primitive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoreResult {
    pub(crate) store: String,
    pub(crate) load: f64,
    pub(crate) save: f64,
    pub(crate) create: f64,
    pub(crate) touch: f64,
}

pub(crate) async fn open(url: &str) -> anyhow::Result<Arc<dyn SessionStore>> {
    let store: Arc<dyn SessionStore> = match url {
        "memory" => Arc::new(session2::MemoryStore::new()),
        url => session2::store::open(url).await?,
    };
    store.setup().await?;
    Ok(store)
}

/// A 200-byte session, as the brief's memory figure asks.
pub(crate) fn record(now: Timestamp) -> Record {
    let mut record = Record::new(now, now.saturating_add(Duration::from_secs(3600)), None);
    record.data = format!(r#"{{"counter":1,"payload":"{}"}}"#, "x".repeat(174)).into_bytes();
    assert_eq!(record.data.len(), 200);
    record
}

pub(crate) async fn run(args: StoreArgs) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(&measure(&args).await?)?);
    Ok(())
}

pub(crate) async fn measure(args: &StoreArgs) -> anyhow::Result<StoreResult> {
    let store = open(&args.store).await?;
    let now = SystemClock.now();
    let template = record(now);
    let keys: Arc<Vec<SessionKey>> = Arc::new(
        (0..args.sessions)
            .map(|_| SessionId::generate().key())
            .collect(),
    );
    // Seed concurrently.
    repeat(args.concurrency, Duration::MAX, keys.len() as u64, {
        let (store, keys, template) = (Arc::clone(&store), Arc::clone(&keys), template.clone());
        move |_, _, n| {
            let (store, keys, template) = (Arc::clone(&store), Arc::clone(&keys), template.clone());
            async move {
                let outcome = store.create(&keys[n as usize], &template, now).await?;
                anyhow::ensure!(outcome == CreateOutcome::Created);
                Ok(())
            }
        }
    })
    .await?;
    let window = Duration::from_secs_f64(args.seconds);
    let (_, load) = repeat(args.concurrency, window, u64::MAX, {
        let (store, keys) = (Arc::clone(&store), Arc::clone(&keys));
        move |_, _, n| {
            let (store, keys) = (Arc::clone(&store), Arc::clone(&keys));
            async move {
                let key = keys[(n as usize * 7919) % keys.len()];
                anyhow::ensure!(store.load(&key, now).await?.is_some());
                Ok(())
            }
        }
    })
    .await?;
    // Save: each worker owns every `concurrency`-th key and knows its version.
    let versions: Arc<Vec<AtomicU64>> =
        Arc::new((0..keys.len()).map(|_| AtomicU64::new(1)).collect());
    let (_, save) = repeat(args.concurrency, window, u64::MAX, {
        let (store, keys, versions, template, concurrency) = (
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::clone(&versions),
            template.clone(),
            args.concurrency,
        );
        move |worker, n, _| {
            let (store, keys, versions, mut next) = (
                Arc::clone(&store),
                Arc::clone(&keys),
                Arc::clone(&versions),
                template.clone(),
            );
            async move {
                let per_worker = keys.len() / concurrency;
                let index = worker + concurrency * ((n as usize) % per_worker.max(1));
                let version = versions[index].load(Ordering::Relaxed);
                next.version = version + 1;
                anyhow::ensure!(
                    store.replace(&keys[index], version, &next, now).await?,
                    "compare-and-swap lost"
                );
                versions[index].store(version + 1, Ordering::Relaxed);
                Ok(())
            }
        }
    })
    .await?;
    let (_, create) = repeat(args.concurrency, window, u64::MAX, {
        let (store, template) = (Arc::clone(&store), template.clone());
        move |_, _, _| {
            let (store, template) = (Arc::clone(&store), template.clone());
            async move {
                let outcome = store
                    .create(&SessionId::generate().key(), &template, now)
                    .await?;
                anyhow::ensure!(outcome == CreateOutcome::Created);
                Ok(())
            }
        }
    })
    .await?;
    let (_, touch) = repeat(args.concurrency, window, u64::MAX, {
        let (store, keys) = (Arc::clone(&store), Arc::clone(&keys));
        move |_, _, n| {
            let (store, keys) = (Arc::clone(&store), Arc::clone(&keys));
            async move {
                let key = keys[(n as usize * 7919) % keys.len()];
                let deadline = now.saturating_add(Duration::from_secs(3600 + n % 1000));
                anyhow::ensure!(store.touch(&key, now, deadline).await?);
                Ok(())
            }
        }
    })
    .await?;
    // Leave nothing behind: every session above expires within a day.
    store
        .purge_expired(now.saturating_add(Duration::from_secs(2 * 86_400)))
        .await?;
    Ok(StoreResult {
        store: args.store.clone(),
        load,
        save,
        create,
        touch,
    })
}

/// Runs `operation(worker, worker's count, global count)` from `workers`
/// tasks until `window` has passed or `total` operations were done; returns
/// how many were done and how many per second.
pub(crate) async fn repeat<F, Fut>(
    workers: usize,
    window: Duration,
    total: u64,
    operation: F,
) -> anyhow::Result<(u64, f64)>
where
    F: Fn(usize, u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (operation, issued) = (operation.clone(), Arc::clone(&issued));
        tasks.push(tokio::spawn(async move {
            let mut mine = 0u64;
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total || started.elapsed() >= window {
                    return Ok::<_, anyhow::Error>(mine);
                }
                operation(worker, mine, n).await?;
                mine += 1;
            }
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    Ok((done, done as f64 / started.elapsed().as_secs_f64()))
}

#[derive(Debug, clap::Args)]
pub(crate) struct MemoryArgs {
    #[arg(long, value_enum)]
    pub(crate) library: crate::server::Library,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) sessions: usize,
}

/// Resident bytes per stored session, from `/proc/self/statm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MemoryResult {
    pub(crate) library: String,
    pub(crate) sessions: usize,
    pub(crate) bytes_per_session: f64,
}

fn resident_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(pages * 4096)
}

pub(crate) async fn memory(args: MemoryArgs) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let before = resident_bytes()?;
    let mut keep_alive: Vec<Box<dyn std::any::Any>> = Vec::new();
    match args.library {
        crate::server::Library::Session2 => {
            let store = session2::MemoryStore::new();
            let template = record(now);
            for _ in 0..args.sessions {
                store
                    .create(&SessionId::generate().key(), &template, now)
                    .await?;
            }
            keep_alive.push(Box::new(store));
        }
        crate::server::Library::TowerSessions => {
            use tower_sessions::session_store::SessionStore as _;
            let store = tower_sessions::MemoryStore::default();
            let payload: serde_json::Value = serde_json::from_slice(&record(now).data)?;
            let data: std::collections::HashMap<String, serde_json::Value> =
                serde_json::from_value(payload)?;
            for _ in 0..args.sessions {
                let mut session = tower_sessions::session::Record {
                    id: tower_sessions::session::Id::default(),
                    data: data.clone(),
                    expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                };
                store.create(&mut session).await?;
            }
            keep_alive.push(Box::new(store));
        }
        crate::server::Library::Bare | crate::server::Library::BareLayered => {
            anyhow::bail!("the bare servers have no store")
        }
    }
    let after = resident_bytes()?;
    let result = MemoryResult {
        library: format!("{:?}", args.library),
        sessions: args.sessions,
        bytes_per_session: (after.saturating_sub(before)) as f64 / args.sessions as f64,
    };
    println!("{}", serde_json::to_string(&result)?);
    drop(keep_alive);
    Ok(())
}
