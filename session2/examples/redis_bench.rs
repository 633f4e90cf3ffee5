//! Load and save (compare-and-swap) throughput of the Redis store.
//!
//! Creates 10,000 sessions under a fresh prefix, then runs 32 concurrent
//! tasks over one multiplexed connection (what an application gets from
//! [`RedisStore::connect`]): first loads of random sessions, then
//! compare-and-swap saves (each task owns its share of the sessions, so every
//! swap succeeds and each one is a single script round trip). Deletes what it
//! created at the end.
//!
//! ```text
//! cargo run --release -p session2 --features redis --example redis_bench -- [URL] [OPS]
//! ```
//!
//! `URL` defaults to `SESSION2_TEST_REDIS_URL` or `redis://127.0.0.1:6379`;
//! `OPS`, the operations per phase, to 200,000. Compare with
//! `redis-benchmark -q -t get,set -c 32 -n 200000` on the same server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use session2::store::RedisStore;
use session2::{Clock, Record, SessionId, SessionKey, SessionStore, SystemClock};

const SESSIONS: usize = 10_000;
const CONCURRENCY: usize = 32;

/// A small deterministic generator, enough to spread reads over the sessions.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::main]
async fn main() -> session2::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| {
        std::env::var("SESSION2_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    });
    let ops: usize = args
        .next()
        .map(|ops| ops.parse().expect("OPS is a number"))
        .unwrap_or(200_000);
    let prefix = format!("bench-{}", SessionId::generate().key().fingerprint());
    let store = Arc::new(RedisStore::connect(&url).await?.with_prefix(&prefix));

    let now = SystemClock.now();
    let ttl = Duration::from_secs(3600);
    let mut template = Record::new(now, now.saturating_add(ttl), None);
    template.user = Some("bench-user".into());
    template.data =
        br#"{"cart":[1,2,3],"counter":0,"name":"a typical small session of about 100 bytes"}"#
            .to_vec();
    let keys: Arc<Vec<SessionKey>> =
        Arc::new((0..SESSIONS).map(|_| SessionId::generate().key()).collect());
    let started = Instant::now();
    run_tasks(SESSIONS, {
        let store = Arc::clone(&store);
        let keys = Arc::clone(&keys);
        let template = template.clone();
        move |_, index, _| {
            let store = Arc::clone(&store);
            let key = keys[index];
            let template = template.clone();
            async move {
                store.create(&key, &template, now).await?;
                Ok(())
            }
        }
    })
    .await?;
    report("create", SESSIONS, started.elapsed());

    let started = Instant::now();
    run_tasks(ops, {
        let store = Arc::clone(&store);
        let keys = Arc::clone(&keys);
        move |_, _, random| {
            let store = Arc::clone(&store);
            let key = keys[usize::try_from(random).unwrap_or(0) % SESSIONS];
            async move {
                let loaded = store.load(&key, now).await?;
                assert!(loaded.is_some(), "a bench session vanished");
                Ok(())
            }
        }
    })
    .await?;
    report("load", ops, started.elapsed());

    // Each task swaps only its own sessions (index % CONCURRENCY == task), so
    // it knows their versions and every swap succeeds: version = round + 1.
    let started = Instant::now();
    run_tasks(ops, {
        let store = Arc::clone(&store);
        let keys = Arc::clone(&keys);
        let template = template.clone();
        move |task, op, _| {
            let store = Arc::clone(&store);
            let per_task = SESSIONS / CONCURRENCY;
            let slot = (op / CONCURRENCY) % per_task;
            let round = (op / CONCURRENCY / per_task) as u64;
            let key = keys[slot * CONCURRENCY + task];
            let mut record = template.clone();
            record.version = round + 2;
            async move {
                let swapped = store.replace(&key, round + 1, &record, now).await?;
                assert!(swapped, "a compare-and-swap failed");
                Ok(())
            }
        }
    })
    .await?;
    report("save (compare-and-swap)", ops, started.elapsed());

    let purged = store
        .purge_expired(now.saturating_add(ttl).saturating_add(ttl))
        .await?;
    println!("cleaned up {purged} sessions under prefix {prefix}");
    Ok(())
}

/// Runs `total` operations on `CONCURRENCY` tasks; operation `op` of task
/// `task` is `make(task, op, random)`, with `op` counting up from `task` in
/// steps of `CONCURRENCY`.
async fn run_tasks<F, Fut>(total: usize, make: F) -> session2::Result<()>
where
    F: Fn(usize, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = session2::Result<()>> + Send,
{
    let mut tasks = Vec::new();
    for task in 0..CONCURRENCY {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut random = 0x9e37_79b9_7f4a_7c15 ^ (task as u64 + 1);
            let mut op = task;
            while op < total {
                make(task, op, next_random(&mut random)).await?;
                op += CONCURRENCY;
            }
            Ok::<_, session2::Error>(())
        }));
    }
    for task in tasks {
        task.await.expect("a bench task panicked")?;
    }
    Ok(())
}

fn report(phase: &str, ops: usize, elapsed: Duration) {
    let per_second = ops as f64 / elapsed.as_secs_f64();
    println!(
        "{phase:<24} {ops:>8} ops in {:>6.2} s: {per_second:>9.0} ops/s",
        elapsed.as_secs_f64()
    );
}
