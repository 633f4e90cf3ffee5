//! Scale: the stores with a million sessions in them.
//!
//! - [`purge`]: the SQL stores purge a large number of expired sessions
//!   through the store, beside the single raw `DELETE … WHERE expires_at <=
//!   now` on an identical table of the same server, the physical floor. Rows
//!   are seeded in bulk by SQL (a million inserts through the store API would
//!   measure the seeding, not the purge).
//! - [`redis_purge`]: the same for Redis, seeded by a server-side script that
//!   clones one session the store wrote, beside a raw script deleting the
//!   same layout in batches.
//! - [`directory`]: the directory store with a million session files: creates
//!   per second through the store on a sample (every create fsyncs twice),
//!   random loads per second, and `purge_expired` beside `rm -rf` of an
//!   identical tree.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use session2::{Clock as _, CreateOutcome, SessionId, SessionKey, SystemClock, Timestamp};
use sqlx::Connection;
use tower_sessions_redis_store::fred::prelude::{
    Client, ClientLike as _, Config, FromValue, Value,
};
use tower_sessions_redis_store::fred::types::{ClusterHash, CustomCommand};

/// One store's purge figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PurgeResult {
    pub(crate) store: String,
    pub(crate) sessions: u64,
    pub(crate) purged: u64,
    pub(crate) store_seconds: f64,
    pub(crate) raw_seconds: f64,
    /// MariaDB: the same runs timed until InnoDB's background purge has
    /// removed the deleted rows (its history list is back where it began).
    /// A `DELETE` returns before that, and the work left differs by how
    /// the rows were deleted.
    #[serde(default)]
    pub(crate) drained: Option<Drained>,
}

/// Seconds until the server has finished a deletion, background work included.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Drained {
    pub(crate) store_seconds: f64,
    pub(crate) raw_seconds: f64,
}

/// InnoDB's history list length: transactions whose deleted rows its
/// background purge has not removed yet.
async fn innodb_history_length(connection: &mut sqlx::MySqlConnection) -> anyhow::Result<u64> {
    use sqlx::Row as _;
    let row = sqlx::query("SHOW ENGINE INNODB STATUS")
        .fetch_one(&mut *connection)
        .await?;
    // Columns: Type, Name, Status.
    let status: String = row.try_get(2)?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("History list length "))
        .and_then(|count| count.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no history list length in SHOW ENGINE INNODB STATUS"))
}

/// Waits until InnoDB's history list is no longer than `baseline`, for at
/// most `patience`; returns the length it settled at.
async fn innodb_history_drained(
    connection: &mut sqlx::MySqlConnection,
    baseline: u64,
    patience: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + patience;
    loop {
        let length = innodb_history_length(connection).await?;
        if length <= baseline || Instant::now() >= deadline {
            return Ok(length);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SQL that seeds `count` expired rows into `table`, per dialect.
fn seed_sql(kind: &str, table: &str, count: u64) -> String {
    let columns = "(\"key\", version, user_id, created_at, accessed_at, idle_deadline, absolute_deadline, expires_at, lease_token, lease_until, data)";
    match kind {
        "postgres" => format!(
            "INSERT INTO {table} {columns} SELECT decode(md5(g::text) || md5((-g)::text), 'hex'), 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, '\\x7b7d'::bytea FROM generate_series(1, {count}) AS g"
        ),
        "sqlite" => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) INSERT INTO {table} {columns} SELECT randomblob(32), 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, X'7b7d' FROM n"
        ),
        // In key order: InnoDB fills its primary key B-tree page by page
        // instead of splitting pages at random (seconds instead of a minute).
        _ => format!(
            "INSERT INTO {table} {} WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT UNHEX(SHA2(i, 256)) AS k, 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, X'7b7d' FROM n ORDER BY k",
            columns.replace('"', "`")
        ),
    }
}

pub(crate) async fn execute(url: &str, statements: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    if url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    } else if url.starts_with("mysql") {
        let mut connection = sqlx::MySqlConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    } else {
        let mut connection = sqlx::SqliteConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    }
    Ok(started.elapsed())
}

/// Seeds `count` expired rows in a fresh table and purges them through the
/// store, or with one raw `DELETE`, in the order store, raw, raw, store:
/// whatever the server is still doing from the run before (a checkpoint,
/// autovacuum, InnoDB's purge) falls on both alike. Each figure is the
/// mean of its two runs. (SQLite: each run purges a fresh copy of one
/// seeded database, see [`SqliteCopies`].)
pub(crate) async fn purge(kind: &str, server_url: &str, count: u64) -> anyhow::Result<PurgeResult> {
    let suffix = std::process::id();
    let tables = [
        format!("bench_purge_{suffix}"),
        format!("bench_purge_raw_{suffix}"),
    ];
    let result = purge_runs(kind, server_url, count, &tables).await;
    // SQLite's databases go with their files (see `SqliteCopies`).
    if result.is_err() && kind != "sqlite" {
        // A failed run must not leave a million rows behind on the server.
        let drops: Vec<String> = tables
            .iter()
            .flat_map(|table| {
                [
                    format!("DROP TABLE IF EXISTS {table}"),
                    format!("DROP TABLE IF EXISTS {table}_schema"),
                ]
            })
            .collect();
        if let Err(err) = execute(server_url, &drops).await {
            eprintln!("could not drop the purge benchmark's tables: {err:#}");
        }
    }
    result
}

/// The four timed runs of [`purge`] on the tables `ours` and `raw`.
async fn purge_runs(
    kind: &str,
    server_url: &str,
    count: u64,
    [ours, raw]: &[String; 2],
) -> anyhow::Result<PurgeResult> {
    let separator = if server_url.contains('?') { '&' } else { '?' };
    let (mut store_seconds, mut raw_seconds) = (0.0, 0.0);
    let mut drained = (kind == "mysql").then_some(Drained {
        store_seconds: 0.0,
        raw_seconds: 0.0,
    });
    let mut monitor = match drained {
        Some(_) => Some(sqlx::MySqlConnection::connect(server_url).await?),
        None => None,
    };
    let copies = match kind {
        "sqlite" => Some(SqliteCopies::seeded(server_url, ours, count).await?),
        _ => None,
    };
    let mut purged = u64::MAX;
    for (table, through_store) in [(ours, true), (raw, false), (raw, false), (ours, true)] {
        let (run_url, table) = match &copies {
            // Every copy holds the template's table.
            Some(copies) => (copies.fresh_run()?, ours),
            None => (server_url.to_owned(), table),
        };
        let server_url = run_url.as_str();
        let store = session2::store::open(&format!("{server_url}{separator}table={table}")).await?;
        store.setup().await?;
        if copies.is_none() {
            let mut prepare = Vec::new();
            if kind == "mysql" {
                prepare.push("SET SESSION max_recursive_iterations = 100000000".to_owned());
            }
            prepare.push(seed_sql(kind, table, count));
            execute(server_url, &prepare).await?;
        }
        // The previous run's background work must not fall on this one.
        let baseline = match &mut monitor {
            Some(monitor) => {
                Some(innodb_history_drained(monitor, 0, Duration::from_secs(30)).await?)
            }
            None => None,
        };
        let now = session2::Timestamp::from_millis(2);
        let started = Instant::now();
        if through_store {
            purged = purged.min(store.purge_expired(now).await?);
        } else {
            execute(
                server_url,
                &[format!("DELETE FROM {table} WHERE expires_at <= 2")],
            )
            .await?;
        }
        let took = started.elapsed().as_secs_f64() / 2.0;
        let (seconds, drained_seconds) = if through_store {
            (
                &mut store_seconds,
                drained.as_mut().map(|d| &mut d.store_seconds),
            )
        } else {
            (
                &mut raw_seconds,
                drained.as_mut().map(|d| &mut d.raw_seconds),
            )
        };
        *seconds += took;
        if let (Some(monitor), Some(baseline), Some(drained_seconds)) =
            (&mut monitor, baseline, drained_seconds)
        {
            let left = innodb_history_drained(monitor, baseline, Duration::from_secs(120)).await?;
            if left > baseline {
                eprintln!(
                    "{table}: InnoDB's history list still held {left} (from {baseline}) after two minutes"
                );
            }
            *drained_seconds += started.elapsed().as_secs_f64() / 2.0;
        }
        drop(store);
        if copies.is_none() {
            let schema = format!("{table}_schema");
            execute(
                server_url,
                &[
                    format!("DROP TABLE {table}"),
                    format!("DROP TABLE {schema}"),
                ],
            )
            .await?;
        }
    }
    Ok(PurgeResult {
        store: kind.to_owned(),
        sessions: count,
        purged,
        store_seconds,
        raw_seconds,
        drained,
    })
}

/// SQLite's purge runs: a database seeded once (the template), and the
/// copy of it each run purges. Seeding a million rows under random keys
/// takes SQLite longer than purging them; a copy of the file takes a
/// fraction of a second and gives every run the same pages.
struct SqliteCopies {
    template: PathBuf,
    run: PathBuf,
}

impl SqliteCopies {
    /// Seeds `count` expired rows into `table` of the database at `url`
    /// (`sqlite:PATH`), which becomes the template.
    async fn seeded(url: &str, table: &str, count: u64) -> anyhow::Result<Self> {
        let template = PathBuf::from(
            url.strip_prefix("sqlite:")
                .ok_or_else(|| anyhow::anyhow!("not a sqlite: URL: {url}"))?,
        );
        let copies = Self {
            run: template.with_extension("run.db"),
            template,
        };
        let store = session2::store::open(&format!("{url}?table={table}")).await?;
        store.setup().await?;
        drop(store);
        // The checkpoint moves every page out of the write-ahead log, so the
        // database file alone holds the table.
        let checkpoint = "PRAGMA wal_checkpoint(TRUNCATE)".to_owned();
        execute(url, &[seed_sql("sqlite", table, count), checkpoint]).await?;
        Ok(copies)
    }

    /// Replaces the run's database with a fresh copy of the template; its URL.
    fn fresh_run(&self) -> anyhow::Result<String> {
        remove_database(&self.run);
        std::fs::copy(&self.template, &self.run)?;
        Ok(format!("sqlite:{}", self.run.display()))
    }
}

impl Drop for SqliteCopies {
    fn drop(&mut self) {
        remove_database(&self.template);
        remove_database(&self.run);
    }
}

/// Removes a SQLite database and its write-ahead log files, if there.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

/// Sessions one seeding, deleting or sweeping script handles: at most a few
/// hundred milliseconds of server time, so other clients are never blocked
/// for long.
const REDIS_BATCH: u64 = 10_000;

/// Clones the session string ARGV[5] under ARGV[4] new keys numbered from
/// ARGV[3], leaving each as the store's `write` leaves a session without a
/// user: the string, expiring (`PXAT`) at ARGV[6], its `expires_at`, and an
/// entry in each sorted set. KEYS[1] = expiry index, KEYS[2] = key index;
/// ARGV[1] = session key prefix, ARGV[2] = 48 hex digits every key starts with.
const REDIS_SEED: &str = r"
local sprefix, stem = ARGV[1], ARGV[2]
local first, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local session, expires_at = ARGV[5], ARGV[6]
-- The index entries go in by a thousand per ZADD (Redis's Lua unpacks at
-- most 8,000 values at once): half the calls of one ZADD per session.
local expiring, listed = {}, {}
local function index()
  redis.call('ZADD', KEYS[1], unpack(expiring))
  redis.call('ZADD', KEYS[2], unpack(listed))
  expiring, listed = {}, {}
end
for i = first, first + count - 1 do
  local hex = stem .. string.format('%016x', i)
  local skey = sprefix .. hex
  redis.call('SET', skey, session, 'PXAT', expires_at)
  local n = #listed
  expiring[n + 1], expiring[n + 2] = expires_at, hex
  listed[n + 1], listed[n + 2] = 0, hex
  if #listed == 2000 then index() end
end
if #listed > 0 then index() end
return count
";

/// The raw baseline: what a Redis user keeping the same two indexes would
/// write to drop expired sessions, with no per-session read or check: take
/// ARGV[3] due members from the expiry index, `UNLINK` their sessions, remove
/// them from the key index and, as they are its lowest entries, from the
/// expiry index by rank. KEYS as [`REDIS_SEED`]; ARGV[1] = session key
/// prefix, ARGV[2] = now. Returns {sessions unlinked, members taken}.
const REDIS_RAW_DELETE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local unlinked = 0
-- Redis's Lua unpacks at most 8,000 values at once.
for from = 1, #due, 1000 do
  local names, members = {}, {}
  for i = from, math.min(from + 999, #due) do
    names[#names + 1] = ARGV[1] .. due[i]
    members[#members + 1] = due[i]
  end
  unlinked = unlinked + redis.call('UNLINK', unpack(names))
  redis.call('ZREM', KEYS[2], unpack(members))
end
if #due > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #due - 1) end
return { unlinked, #due }
";

/// Unlinks the sessions [`REDIS_SEED`] may have written for the same ARGV[1..4],
/// whether or not they still exist: the clean-up after a failed run.
const REDIS_SWEEP: &str = r"
local last = tonumber(ARGV[3]) + tonumber(ARGV[4]) - 1
local unlinked = 0
for from = tonumber(ARGV[3]), last, 1000 do
  local names = {}
  for i = from, math.min(from + 999, last) do
    names[#names + 1] = ARGV[1] .. ARGV[2] .. string.format('%016x', i)
  end
  unlinked = unlinked + redis.call('UNLINK', unpack(names))
end
return unlinked
";

/// The keys of one store prefix, named as `RedisStore` names them.
struct RedisKeys {
    prefix: String,
    sessions: String,
    expiry: String,
    keys: String,
    owners: String,
}

impl RedisKeys {
    fn new(prefix: String) -> Self {
        let tag = format!("{{{prefix}}}:");
        Self {
            sessions: format!("{tag}s:"),
            expiry: format!("{tag}exp"),
            keys: format!("{tag}keys"),
            owners: format!("{tag}owner"),
            prefix,
        }
    }
}

/// What is left to delete if a run stops half-way.
struct RedisLeftovers {
    /// Per prefix (ours, raw): the counters seeded and not yet seen deleted.
    seeded: [u64; 2],
    /// The key of the session created through the store, until deleted.
    template: Option<String>,
}

async fn redis_command<T: FromValue>(
    client: &Client,
    command: &'static str,
    args: Vec<Value>,
) -> anyhow::Result<T> {
    Ok(client
        .custom(
            CustomCommand::new_static(command, ClusterHash::FirstKey, false),
            args,
        )
        .await?)
}

async fn eval<T: FromValue>(
    client: &Client,
    script: &str,
    keys: &[&str],
    args: Vec<Value>,
) -> anyhow::Result<T> {
    let mut all: Vec<Value> = vec![script.into(), i64::try_from(keys.len())?.into()];
    all.extend(keys.iter().map(|key| Value::from(*key)));
    all.extend(args);
    redis_command(client, "EVAL", all).await
}

async fn zcard(client: &Client, key: &str) -> anyhow::Result<u64> {
    redis_command(client, "ZCARD", vec![key.into()]).await
}

/// Seeds `count` clones of `template` (a session's string, expiring at
/// `expires_at`) under `names`.
async fn redis_seed(
    client: &Client,
    names: &RedisKeys,
    stem: &str,
    template: &[u8],
    expires_at: Timestamp,
    count: u64,
    seeded: &mut u64,
) -> anyhow::Result<()> {
    while *seeded < count {
        let batch = REDIS_BATCH.min(count - *seeded);
        let first = *seeded;
        // A script that fails half-way keeps what it wrote: count the batch before.
        *seeded += batch;
        let mut args: Vec<Value> = vec![
            names.sessions.as_str().into(),
            stem.into(),
            i64::try_from(first)?.into(),
            i64::try_from(batch)?.into(),
        ];
        args.push(template.into());
        args.push(expires_at.as_millis().into());
        let _: i64 = eval(client, REDIS_SEED, &[&names.expiry, &names.keys], args).await?;
    }
    let indexed = zcard(client, &names.expiry).await?;
    anyhow::ensure!(
        indexed == count,
        "seeded {count} sessions under `{}`, but its expiry index holds {indexed}",
        names.prefix
    );
    Ok(())
}

/// Seeds `count` expired sessions in Redis under a fresh prefix, purges them
/// through the store, then seeds the same under a second prefix and deletes
/// them with [`REDIS_RAW_DELETE`] in batches of [`REDIS_BATCH`].
///
/// The seed clones, server-side, the string of one session created through
/// the store, so the layout is the store's own. The clones keep its real
/// expiry (an hour ahead) and the purge is given that instant as `now`: the
/// store decides expiry with the caller's clock only, while Redis, on its own
/// clock, keeps the keys alive, so the purge finds and deletes every one.
/// (Sessions whose `PXAT` Redis has already applied cost a purge less:
/// it only drops their index entries, and does not count them.)
pub(crate) async fn redis_purge(redis_url: &str, count: u64) -> anyhow::Result<PurgeResult> {
    let pid = std::process::id();
    let ours = RedisKeys::new(format!("bench-purge-{pid}"));
    let raw = RedisKeys::new(format!("bench-purge-raw-{pid}"));
    let stem = SessionId::generate().key().to_hex()[..48].to_owned();
    let client = Client::new(Config::from_url(redis_url)?, None, None, None);
    client.init().await?;
    let mut leftovers = RedisLeftovers {
        seeded: [0; 2],
        template: None,
    };
    let outcome = redis_purge_run(
        &client,
        redis_url,
        [&ours, &raw],
        &stem,
        count,
        &mut leftovers,
    )
    .await;
    let cleaned = redis_clean(&client, [&ours, &raw], &stem, &leftovers).await;
    let _ = client.quit().await;
    let result = outcome?;
    cleaned?;
    Ok(result)
}

async fn redis_purge_run(
    client: &Client,
    redis_url: &str,
    [ours, raw]: [&RedisKeys; 2],
    stem: &str,
    count: u64,
    leftovers: &mut RedisLeftovers,
) -> anyhow::Result<PurgeResult> {
    for names in [ours, raw] {
        let existing: u64 = redis_command(
            client,
            "EXISTS",
            vec![
                names.expiry.as_str().into(),
                names.keys.as_str().into(),
                names.owners.as_str().into(),
            ],
        )
        .await?;
        anyhow::ensure!(
            existing == 0,
            "keys under the prefix `{}` already exist",
            names.prefix
        );
    }
    let separator = if redis_url.contains('?') { '&' } else { '?' };
    let store =
        session2::store::open(&format!("{redis_url}{separator}prefix={}", ours.prefix)).await?;
    store.setup().await?;
    let now = SystemClock.now();
    let record = crate::store::record(now);
    let key = SessionId::generate().key();
    let name = format!("{}{}", ours.sessions, key.to_hex());
    leftovers.template = Some(name.clone());
    anyhow::ensure!(
        store.create(&key, &record, now).await? == CreateOutcome::Created,
        "the template session collided"
    );
    let template = match redis_command::<Value>(client, "GET", vec![name.as_str().into()]).await? {
        Value::Bytes(session) => session.to_vec(),
        Value::String(session) => session.as_bytes().to_vec(),
        other => anyhow::bail!("GET of the template session `{name}`: unexpected {other:?}"),
    };
    anyhow::ensure!(
        store.delete(&key, None).await?,
        "the template session could not be deleted"
    );
    leftovers.template = None;
    let due = record.expires_at();

    redis_seed(
        client,
        ours,
        stem,
        &template,
        due,
        count,
        &mut leftovers.seeded[0],
    )
    .await?;
    if count > 0 {
        let clone = SessionKey::from_hex(&format!("{stem}{:016x}", 0)).expect("64 hex digits");
        anyhow::ensure!(
            store.load(&clone, now).await?.as_ref() == Some(&record),
            "the store does not read a seeded session back as the one it wrote"
        );
    }
    let started = Instant::now();
    let purged = store.purge_expired(due).await?;
    let store_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        purged == count,
        "purge_expired deleted {purged} of {count} expired sessions"
    );
    let (expiry, keys) = (
        zcard(client, &ours.expiry).await?,
        zcard(client, &ours.keys).await?,
    );
    anyhow::ensure!(
        expiry == 0 && keys == 0,
        "after the purge the expiry index holds {expiry} entries and the key index {keys}"
    );
    leftovers.seeded[0] = 0;
    drop(store);

    redis_seed(
        client,
        raw,
        stem,
        &template,
        due,
        count,
        &mut leftovers.seeded[1],
    )
    .await?;
    let (due, batch) = (due.as_millis(), i64::try_from(REDIS_BATCH)?);
    let started = Instant::now();
    let mut unlinked = 0;
    loop {
        let args = vec![raw.sessions.as_str().into(), due.into(), batch.into()];
        let reply: Vec<u64> =
            eval(client, REDIS_RAW_DELETE, &[&raw.expiry, &raw.keys], args).await?;
        let [deleted, taken] = reply[..] else {
            anyhow::bail!("unexpected reply {reply:?} from the raw deletion")
        };
        unlinked += deleted;
        if taken < REDIS_BATCH {
            break;
        }
    }
    let raw_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        unlinked == count,
        "the raw deletion unlinked {unlinked} of {count} sessions"
    );
    let (expiry, keys) = (
        zcard(client, &raw.expiry).await?,
        zcard(client, &raw.keys).await?,
    );
    anyhow::ensure!(
        expiry == 0 && keys == 0,
        "after the raw deletion the expiry index holds {expiry} entries and the key index {keys}"
    );
    leftovers.seeded[1] = 0;
    Ok(PurgeResult {
        store: "redis".to_owned(),
        sessions: count,
        purged,
        store_seconds,
        raw_seconds,
        drained: None,
    })
}

/// Deletes whatever a run left under both prefixes.
async fn redis_clean(
    client: &Client,
    prefixes: [&RedisKeys; 2],
    stem: &str,
    leftovers: &RedisLeftovers,
) -> anyhow::Result<()> {
    for (names, seeded) in prefixes.into_iter().zip(leftovers.seeded) {
        let mut first = 0;
        while first < seeded {
            let batch = REDIS_BATCH.min(seeded - first);
            let args = vec![
                names.sessions.as_str().into(),
                stem.into(),
                i64::try_from(first)?.into(),
                i64::try_from(batch)?.into(),
            ];
            let _: i64 = eval(client, REDIS_SWEEP, &[], args).await?;
            first += batch;
        }
        let mut doomed: Vec<Value> = vec![
            names.expiry.as_str().into(),
            names.keys.as_str().into(),
            names.owners.as_str().into(),
        ];
        doomed.extend(
            leftovers
                .template
                .as_deref()
                .filter(|name| name.starts_with(&names.sessions))
                .map(Value::from),
        );
        let _: i64 = redis_command(client, "UNLINK", doomed).await?;
    }
    Ok(())
}

/// The directory store's figures with `sessions` session files on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DirectoryResult {
    pub(crate) store: String,
    pub(crate) sessions: u64,
    /// Sessions created through the store, and creates per second doing so.
    pub(crate) created: u64,
    pub(crate) creates_per_second: f64,
    /// Writing the other sessions' files directly, then `sync`.
    pub(crate) seed_seconds: f64,
    pub(crate) loads: u64,
    pub(crate) loads_per_second: f64,
    pub(crate) purged: u64,
    pub(crate) purge_seconds: f64,
    pub(crate) raw_seconds: f64,
    pub(crate) total_seconds: f64,
}

const DIRECTORY_CONCURRENCY: usize = 32;
/// Every create fsyncs its file and its shard directory (2,000 to 5,000
/// creates/s on the 2-core machine): a million through the store would take
/// minutes on their own, so creates are timed on a sample, up to this many or
/// this long, and the other sessions are seeded directly.
const DIRECTORY_CREATE_SAMPLE: u64 = 20_000;
const DIRECTORY_CREATE_WINDOW: Duration = Duration::from_secs(10);
const DIRECTORY_LOAD_WINDOW: Duration = Duration::from_secs(5);

/// A well-spread index from a counter (splitmix64), so loads hit files all
/// over the tree, not the ones just created.
fn spread(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fails early when the file system under `dir` cannot take one tree of
/// `count` files (a 4 KiB block and an inode each), rather than filling it.
/// Silent when `df` cannot tell.
fn check_room(dir: &Path, count: u64) -> anyhow::Result<()> {
    let df = |flag: &str| -> Option<(u64, u64)> {
        let output = Command::new("df")
            .arg("-P")
            .arg(flag)
            .arg(dir)
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        let columns: Vec<u64> = text
            .lines()
            .nth(1)?
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some((columns[0], columns[2]))
    };
    if let Some((_, free_kib)) = df("-k") {
        anyhow::ensure!(
            free_kib > count * 5,
            "{} has {} MiB free; {count} session files need about {} MiB",
            dir.display(),
            free_kib / 1024,
            count * 5 / 1024
        );
    }
    // File systems without an inode table report 0 inodes.
    if let Some((inodes, free)) = df("-i").filter(|(inodes, _)| *inodes > 0) {
        anyhow::ensure!(
            free > count + 1_000,
            "{} has {free} free inodes of {inodes}; {count} session files need as many",
            dir.display()
        );
    }
    Ok(())
}

/// Writes each key's file as a create through the store leaves it (name,
/// shard, bytes, mode, modification time = expiry, the shard's lock file),
/// but without the store's temporary file, rename and two fsyncs, one thread
/// per core over disjoint shards. Files already there are left alone.
/// Returns how many it wrote.
fn seed_tree(
    root: &Path,
    keys: &[SessionKey],
    bytes: &[u8],
    expiry: SystemTime,
) -> std::io::Result<u64> {
    let mut shards: Vec<Vec<&SessionKey>> = vec![Vec::new(); 256];
    for key in keys {
        shards[usize::from(key.as_bytes()[0])].push(key);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let write_shards = |thread: usize| -> std::io::Result<u64> {
        let mut written = 0;
        for (shard, keys) in shards.iter().enumerate().skip(thread).step_by(threads) {
            let dir = root.join(format!("{shard:02x}"));
            DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(".lock"))?;
            for key in keys {
                let mut file = match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(dir.join(key.to_hex()))
                {
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    other => other?,
                };
                file.write_all(bytes)?;
                file.set_modified(expiry)?;
                written += 1;
            }
        }
        Ok(written)
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| scope.spawn(move || write_shards(thread)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a seeding thread panicked"))
            .sum()
    })
}

/// Writes every dirty page to disk, so that writing back the seed does not
/// run into the timings that follow, and both trees start alike.
fn sync() -> anyhow::Result<()> {
    anyhow::ensure!(Command::new("sync").status()?.success(), "sync failed");
    Ok(())
}

/// Removes the benchmark's directory however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The directory store with `count` sessions, in a directory of its own
/// under `root` (removed afterwards):
///
/// 1. creates through the store at concurrency 32, on a sample of up to
///    20,000 sessions or 10 s;
/// 2. the rest of the `count` sessions seeded by writing their files
///    directly, bypassing the store (see [`seed_tree`]), then `sync`;
/// 3. random loads through the store at concurrency 32 for 5 s, each of
///    which must find its session (they live until an hour after `born`, and
///    load with `now` = `born`);
/// 4. `purge_expired` with `now` an hour after every session's expiry;
/// 5. the raw floor: `rm -rf` (`remove_dir_all`, single-threaded like the
///    purge) of an identical tree seeded the same way.
///
/// One tree exists at a time: the store's is empty by the time the raw one is
/// seeded. The tree's dentries, inodes and pages stay in memory after
/// seeding, so loads measure the store and the file system, not the disk.
/// Deletions do wait on the disk where the file system discards each freed
/// block at once (ext4 mounted with `discard`, as on the 2-core machine):
/// there one discard per file sets the pace of both the purge and `rm -rf`,
/// and a million sessions take about 10 minutes in all, so the report may
/// want a smaller `count`.
pub(crate) async fn directory(root: &Path, count: u64) -> anyhow::Result<DirectoryResult> {
    anyhow::ensure!(
        count > 0,
        "the directory benchmark needs at least one session"
    );
    let started = Instant::now();
    let work = root.join(format!("directory-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let _remove = RemoveOnDrop(work.clone());
    check_room(&work, count)?;
    let (ours, raw) = (work.join("store"), work.join("raw"));
    let store = session2::store::open(&format!("dir:{}", ours.display())).await?;
    store.setup().await?;
    let born = SystemClock.now();
    let template = Arc::new(crate::store::record(born));
    let purge_at = template
        .expires_at()
        .saturating_add(Duration::from_secs(3600));
    let keys: Arc<Vec<SessionKey>> =
        Arc::new((0..count).map(|_| SessionId::generate().key()).collect());

    let (created, creates_per_second) = crate::store::repeat(
        DIRECTORY_CONCURRENCY,
        DIRECTORY_CREATE_WINDOW,
        count.min(DIRECTORY_CREATE_SAMPLE),
        {
            let (store, keys, template) =
                (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&template));
            move |_, _, n| {
                let (store, keys, template) =
                    (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&template));
                async move {
                    let outcome = store
                        .create(&keys[usize::try_from(n)?], &template, born)
                        .await?;
                    anyhow::ensure!(outcome == CreateOutcome::Created, "a create collided");
                    Ok(())
                }
            }
        },
    )
    .await?;

    let seed_started = Instant::now();
    let seeded = {
        let (ours, keys, bytes, expiry) = (
            ours.clone(),
            Arc::clone(&keys),
            template.encode(),
            template.expires_at().to_system_time(),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let seeded = seed_tree(&ours, &keys, &bytes, expiry)?;
            sync()?;
            Ok(seeded)
        })
        .await??
    };
    let seed_seconds = seed_started.elapsed().as_secs_f64();
    anyhow::ensure!(
        created + seeded == count,
        "the store created {created} sessions and the seed wrote {seeded}, not {count} in all"
    );
    let stored = store.count().await?;
    anyhow::ensure!(
        stored == count,
        "the store counts {stored} sessions, not {count}"
    );

    let missed = Arc::new(AtomicU64::new(0));
    let (loads, loads_per_second) =
        crate::store::repeat(DIRECTORY_CONCURRENCY, DIRECTORY_LOAD_WINDOW, u64::MAX, {
            let (store, keys, missed) =
                (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&missed));
            move |_, _, n| {
                let (store, keys, missed) =
                    (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&missed));
                async move {
                    let key = keys[usize::try_from(spread(n) % keys.len() as u64)?];
                    if store.load(&key, born).await?.is_none() {
                        missed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                }
            }
        })
        .await?;
    let missed = missed.load(Ordering::Relaxed);
    anyhow::ensure!(
        missed == 0,
        "{missed} of {loads} loads did not find their session"
    );

    let purge_started = Instant::now();
    let purged = store.purge_expired(purge_at).await?;
    let purge_seconds = purge_started.elapsed().as_secs_f64();
    anyhow::ensure!(
        purged == count,
        "purge_expired deleted {purged} of {count} expired sessions"
    );
    let stored = store.count().await?;
    anyhow::ensure!(stored == 0, "{stored} sessions are left after the purge");
    drop(store);

    let raw_seconds = {
        let (keys, bytes, expiry) = (
            Arc::clone(&keys),
            template.encode(),
            template.expires_at().to_system_time(),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(raw.join("users"))?;
            let seeded = seed_tree(&raw, &keys, &bytes, expiry)?;
            anyhow::ensure!(
                seeded == count,
                "the raw tree got {seeded} files, not {count}"
            );
            sync()?;
            let started = Instant::now();
            std::fs::remove_dir_all(&raw)?;
            Ok(started.elapsed().as_secs_f64())
        })
        .await??
    };
    Ok(DirectoryResult {
        store: "directory".to_owned(),
        sessions: count,
        created,
        creates_per_second,
        seed_seconds,
        loads,
        loads_per_second,
        purged,
        purge_seconds,
        raw_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The directory figures as a markdown table.
pub(crate) fn render_directory(result: &DirectoryResult) -> String {
    format!(
        "| store | sessions | creates/s through the store (sample) | loads/s | `purge_expired` | raw deletion (`rm -rf`) | ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} (purged {}) | {:.0} ({} created) | {:.0} | {:.2} s | {:.2} s | {:.2}× |\n",
        result.store,
        result.sessions,
        result.purged,
        result.creates_per_second,
        result.created,
        result.loads_per_second,
        result.purge_seconds,
        result.raw_seconds,
        result.purge_seconds / result.raw_seconds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rows(url: &str, table: &str) -> i64 {
        let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut connection)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_sqlite_run_purges_a_full_copy_and_the_files_go_afterwards() {
        let dir = std::env::temp_dir().join(format!("session2-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let template = dir.join("purge.db");
        let url = format!("sqlite:{}", template.display());
        let copies = SqliteCopies::seeded(&url, "seeded", 25).await.unwrap();
        // A copy of the database file alone holds every row.
        for _ in 0..2 {
            let run = copies.fresh_run().unwrap();
            assert_eq!(rows(&run, "seeded").await, 25);
            execute(&run, &["DELETE FROM seeded".to_owned()])
                .await
                .unwrap();
            assert_eq!(rows(&run, "seeded").await, 0);
        }
        assert_eq!(
            rows(&url, "seeded").await,
            25,
            "runs leave the template alone"
        );
        let run = copies.run.clone();
        drop(copies);
        assert!(!template.exists() && !run.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
