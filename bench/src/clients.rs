//! `clients`: the two libraries' Redis clients alone, without sessions or HTTP.
//!
//! Each of `--tasks` tasks loops a `GET` then a `SET` of its own 100-byte
//! value for `--seconds`, on each client in turn, `--rounds` times:
//! redis-rs's multiplexed connection, redis-rs's `ConnectionManager`
//! around one (what session2's `RedisStore` talks through) and fred as
//! the tower-sessions server has it (a pool). The tasks share
//! `--connections` connections (one, as both benchmark servers have it),
//! task `i` taking connection `i % connections`. It prints each run as a
//! JSON line, then the medians, so that a gap between the libraries with
//! few users can be set against the gap between their clients.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, MultiplexedConnection};
use serde::Serialize;
use tower_sessions_redis_store::fred::prelude::{
    ClientLike as _, Config, KeysInterface as _, Pool,
};

/// The value each task writes, as long as a small session.
const VALUE: [u8; 100] = [b'x'; 100];

#[derive(Debug, clap::Args)]
pub(crate) struct ClientsArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub(crate) url: String,
    /// Tasks sharing the connections, each with its own key.
    #[arg(long, default_value_t = 4)]
    pub(crate) tasks: usize,
    /// Connections the tasks share (fred: its pool's size).
    #[arg(long, default_value_t = 1)]
    pub(crate) connections: usize,
    #[arg(long, default_value_t = 3.0)]
    pub(crate) seconds: f64,
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: usize,
}

/// A client under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    RedisMultiplexed,
    RedisConnectionManager,
    Fred,
}

const KINDS: [Kind; 3] = [
    Kind::RedisMultiplexed,
    Kind::RedisConnectionManager,
    Kind::Fred,
];

/// One run of one client.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClientRun {
    pub(crate) client: Kind,
    pub(crate) tasks: usize,
    pub(crate) connections: usize,
    /// `GET` and `SET` pairs made, all tasks together.
    pub(crate) pairs: u64,
    /// `GET` and `SET` pairs per second, all tasks together.
    pub(crate) pairs_per_second: f64,
    /// This process's CPU time per pair, in µs.
    pub(crate) cpu_us_per_pair: f64,
}

/// A connection of one of the clients, cloned into each task.
#[derive(Clone)]
enum Connection {
    Multiplexed(MultiplexedConnection),
    Manager(ConnectionManager),
    Fred(Pool),
}

impl Connection {
    /// A connection of `kind`; for fred, a pool of `pool` connections.
    async fn open(kind: Kind, url: &str, pool: usize) -> anyhow::Result<Self> {
        let client = || redis::Client::open(url);
        Ok(match kind {
            Kind::RedisMultiplexed => {
                Self::Multiplexed(client()?.get_multiplexed_async_connection().await?)
            }
            Kind::RedisConnectionManager => Self::Manager(ConnectionManager::new(client()?).await?),
            Kind::Fred => {
                let pool = Pool::new(Config::from_url(url)?, None, None, None, pool)?;
                pool.init().await?;
                Self::Fred(pool)
            }
        })
    }

    async fn get_then_set(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Self::Multiplexed(connection) => get_then_set_redis(connection, key).await,
            Self::Manager(connection) => get_then_set_redis(connection, key).await,
            Self::Fred(pool) => {
                let _: Option<Vec<u8>> = pool.get(key).await?;
                let () = pool.set(key, VALUE.as_slice(), None, None, false).await?;
                Ok(())
            }
        }
    }

    async fn delete(&mut self, keys: &[String]) -> anyhow::Result<()> {
        match self {
            Self::Multiplexed(connection) => delete_redis(connection, keys).await,
            Self::Manager(connection) => delete_redis(connection, keys).await,
            Self::Fred(pool) => {
                let _: i64 = pool.del(keys.to_vec()).await?;
                Ok(())
            }
        }
    }
}

async fn get_then_set_redis(
    connection: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> anyhow::Result<()> {
    let _: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(connection).await?;
    let () = redis::cmd("SET")
        .arg(key)
        .arg(VALUE.as_slice())
        .query_async(connection)
        .await?;
    Ok(())
}

async fn delete_redis(
    connection: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
) -> anyhow::Result<()> {
    let _: i64 = redis::cmd("DEL").arg(keys).query_async(connection).await?;
    Ok(())
}

/// Runs `kind` with `tasks` tasks sharing `connections` connections for
/// `duration`, on keys under `stem`, and deletes the keys afterwards.
pub(crate) async fn run_client(
    kind: Kind,
    url: &str,
    tasks: usize,
    connections: usize,
    duration: Duration,
    stem: &str,
) -> anyhow::Result<ClientRun> {
    anyhow::ensure!(connections > 0, "--connections must be at least 1");
    let mut opened = Vec::with_capacity(connections);
    if kind == Kind::Fred {
        // One pool of that many connections, which spreads its callers.
        opened.push(Connection::open(kind, url, connections).await?);
    } else {
        for _ in 0..connections {
            opened.push(Connection::open(kind, url, 1).await?);
        }
    }
    let keys: Vec<String> = (0..tasks).map(|task| format!("{stem}:{task}")).collect();
    let cpu_before = crate::load::cpu_time_us(std::process::id());
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (task, key) in keys.iter().cloned().enumerate() {
        let mut connection = opened[task % opened.len()].clone();
        running.spawn(async move {
            let mut pairs = 0_u64;
            while start.elapsed() < duration {
                connection.get_then_set(&key).await?;
                pairs += 1;
            }
            anyhow::Ok(pairs)
        });
    }
    let mut pairs = 0;
    for done in running.join_all().await {
        pairs += done?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_us = crate::load::cpu_time_us(std::process::id())
        .zip(cpu_before)
        .map_or(0.0, |(after, before)| after - before);
    opened[0].delete(&keys).await?;
    anyhow::ensure!(pairs > 0, "{kind:?} made no GET and SET in {duration:?}");
    Ok(ClientRun {
        client: kind,
        tasks,
        connections,
        pairs,
        pairs_per_second: pairs as f64 / seconds,
        cpu_us_per_pair: cpu_us / pairs as f64,
    })
}

pub(crate) async fn run(args: ClientsArgs) -> anyhow::Result<()> {
    let stem = format!("bench-clients-{}", std::process::id());
    let duration = Duration::from_secs_f64(args.seconds);
    let mut runs = Vec::new();
    for _ in 0..args.rounds {
        for kind in KINDS {
            let (tasks, connections) = (args.tasks, args.connections);
            let run = run_client(kind, &args.url, tasks, connections, duration, &stem).await?;
            println!("{}", serde_json::to_string(&run)?);
            runs.push(run);
        }
    }
    for kind in KINDS {
        let mut rates: Vec<f64> = runs
            .iter()
            .filter(|run| run.client == kind)
            .map(|run| run.pairs_per_second)
            .collect();
        rates.sort_by(f64::total_cmp);
        if let Some(median) = rates.get(rates.len() / 2) {
            println!(
                "{kind:?}: median {median:.0} pairs/s over {} runs of {} tasks on {} connections",
                rates.len(),
                args.tasks,
                args.connections
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter of Redis's `INFO` section `section`.
    async fn info_counter(
        connection: &mut MultiplexedConnection,
        section: &str,
        prefix: &str,
    ) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(connection)
            .await
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |count| count.trim().parse().unwrap())
    }

    /// `SET`s Redis has run so far.
    async fn sets_run(connection: &mut MultiplexedConnection) -> u64 {
        info_counter(connection, "commandstats", "cmdstat_set:calls=").await
    }

    /// Clients connected to Redis now.
    async fn connected(connection: &mut MultiplexedConnection) -> u64 {
        info_counter(connection, "clients", "connected_clients:").await
    }

    /// Needs the Redis the benchmark uses (`scripts/services.sh`).
    #[tokio::test]
    async fn every_client_makes_pairs_on_its_connections_and_leaves_no_key() {
        let url = "redis://127.0.0.1:6379/";
        let stem = format!("bench-clients-test-{}", std::process::id());
        let mut connection = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|err| panic!("the benchmark's Redis at {url}: {err}"));
        for (kind, connections) in KINDS
            .into_iter()
            .flat_map(|kind| [(kind, 1_usize), (kind, 2)])
        {
            let (sets_before, connected_before) = (
                sets_run(&mut connection).await,
                connected(&mut connection).await,
            );
            let stem = stem.clone();
            let running = tokio::spawn(async move {
                run_client(kind, url, 3, connections, Duration::from_millis(400), &stem).await
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let opened = connected(&mut connection)
                .await
                .saturating_sub(connected_before);
            assert!(
                opened >= connections as u64,
                "{kind:?} opened {opened} of {connections}"
            );
            let run = running
                .await
                .unwrap()
                .unwrap_or_else(|err| panic!("{kind:?} against {url}: {err:#}"));
            assert!(run.pairs > 0 && run.pairs_per_second > 0.0, "{kind:?}");
            assert!(
                sets_run(&mut connection).await - sets_before >= run.pairs,
                "{kind:?} counted pairs Redis did not run"
            );
            assert_eq!((run.tasks, run.connections), (3, connections));
        }
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{stem}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
