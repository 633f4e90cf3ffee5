//! [`PostgresStore`]: sessions in a PostgreSQL table, shared by every process and machine.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes | yes | yes | yes: expired rows are never returned; [`purge_expired`](crate::SessionStore::purge_expired) deletes them in one statement | yes: one `INSERT … ON CONFLICT DO UPDATE … WHERE expired` |
//!
//! Use it when the application already runs PostgreSQL: build it from the
//! application's own pool with [`PostgresStore::from_pool`], or from a URL
//! with [`PostgresStore::connect`]. Every primitive is one statement, so one
//! round trip; compare-and-swap is an `UPDATE … WHERE version = $n`.
//! Concurrent compare-and-swaps are batched: the saves that queue while one
//! batch statement runs go together in the next, one `UPDATE … FROM
//! UNNEST(…)` that swaps each row at its own expected version and returns
//! the keys that won, so many saves cost the server about one statement
//! and one commit. Each save still has the outcome it would have alone, and
//! its caller hears back once the statement has committed.
//! [`setup`](crate::SessionStore::setup) creates the table (default
//! `session2_sessions`, see [`PostgresStore::with_table_name`]), its indexes
//! and a `<table>_schema` table idempotently; it never drops anything.
//!
//! When the server goes away, calls fail with backend errors
//! ([`Error::is_backend`](crate::Error::is_backend)) and the pool reconnects
//! once it is back.
//!
//! ```no_run
//! use session2::{SessionManager, SessionStore, store::PostgresStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = PostgresStore::connect("postgres://postgres@localhost/app")
//!     .await?
//!     .with_table_name("web_sessions")?;
//! store.setup().await?;
//! let manager = SessionManager::new(store);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::{Executor, Row};
use tokio::sync::{mpsc, oneshot};

use super::sql::{self, Backend, Dialect, SqlTable, Swap, impl_sql_session_store};
use super::writer::{Writers, answer};
use crate::{Record, Result, SessionKey, Timestamp};

/// The most compare-and-swaps one statement makes.
const MAX_SWAPS: usize = 256;

impl Backend for sqlx::Postgres {
    const STORE: &'static str = "postgres";
    const DIALECT: Dialect = Dialect::Postgres;

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

/// A store keeping sessions in a PostgreSQL table; clones share the pool.
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct PostgresStore {
    table: BatchedTable,
}

impl PostgresStore {
    /// A store on the application's own pool, using the table
    /// `session2_sessions`.
    pub fn from_pool(pool: PgPool) -> Self {
        let table =
            SqlTable::new(pool, sql::DEFAULT_TABLE).expect("the default table name is valid");
        Self {
            table: BatchedTable::new(table),
        }
    }

    /// Connects to the server at `url` (`postgres://user:password@host:port/database`)
    /// with a pool of up to 16 connections that waits at most 5 seconds for
    /// a connection.
    ///
    /// Fails with a backend error when the server cannot be reached, and
    /// with a configuration error when the URL is invalid.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|err| {
            sql::backend_error(<sqlx::Postgres as Backend>::STORE, "parse the URL", err)
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            // Each operation is one statement: a ping before it would double
            // the round trips. A connection the server dropped fails once,
            // with a backend error, and is replaced.
            .test_before_acquire(false);
        let pool = sql::connect_pool(pool, options).await?;
        Ok(Self::from_pool(pool))
    }

    /// The same store on another table: a name of ASCII letters, digits and
    /// `_`, not starting with a digit, at most 56 characters. Anything else
    /// is refused with a configuration error, so no text from outside ever
    /// reaches SQL.
    pub fn with_table_name(self, name: &str) -> Result<Self> {
        Ok(Self {
            table: self.table.with_table_name(name)?,
        })
    }

    /// The session table's name.
    pub fn table_name(&self) -> &str {
        &self.table.table
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.table.pool
    }

    async fn setup_schema(&self) -> Result<()> {
        let name = &self.table.table;
        let t = Dialect::Postgres.quote(name);
        let schema = Dialect::Postgres.quote(&format!("{name}_schema"));
        let user_index = Dialect::Postgres.quote(&format!("{name}_user"));
        let expiry_index = Dialect::Postgres.quote(&format!("{name}_expiry"));
        let fail = |err| sql::backend_error("postgres", "set up the session table", err);
        let mut tx = self.table.pool.begin().await.map_err(fail)?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can collide in PostgreSQL's
        // catalog: serialize setups of this table.
        let connection: &mut sqlx::PgConnection = &mut tx;
        let lock = format!("session2 setup {name}");
        connection
            .execute(sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&lock))
            .await
            .map_err(fail)?;
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                \"key\" BYTEA PRIMARY KEY CHECK (octet_length(\"key\") = 32),
                version BIGINT NOT NULL,
                user_id TEXT NULL,
                created_at BIGINT NOT NULL,
                accessed_at BIGINT NOT NULL,
                idle_deadline BIGINT NOT NULL,
                absolute_deadline BIGINT NULL,
                expires_at BIGINT NOT NULL,
                lease_token BIGINT NULL,
                lease_until BIGINT NULL,
                data BYTEA NOT NULL
            )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {user_index} ON {t} (user_id) WHERE user_id IS NOT NULL"
            ),
            format!("CREATE INDEX IF NOT EXISTS {expiry_index} ON {t} (expires_at)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema} (
                version BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )"
            ),
        ];
        for statement in &statements {
            connection.execute(statement.as_str()).await.map_err(fail)?;
        }
        let newest: Option<i64> = connection
            .fetch_one(format!("SELECT MAX(version) FROM {schema}").as_str())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(fail)?;
        sql::check_schema_version(name, newest)?;
        let insert = format!(
            "INSERT INTO {schema} (version, applied_at) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        connection
            .execute(
                sqlx::query(&insert)
                    .bind(sql::SCHEMA_VERSION)
                    .bind(sql::applied_at()),
            )
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)
    }
}

impl_sql_session_store!(PostgresStore, "postgres");

/// A compare-and-swap queued for the writer, and where its outcome goes.
struct SwapJob {
    key: SessionKey,
    expected_version: u64,
    record: Record,
    now: Timestamp,
    reply: oneshot::Sender<Result<bool>>,
}

/// A session table whose compare-and-swaps are batched: concurrent saves
/// go to one writer task (per runtime, see `store/writer.rs`), which makes
/// the swaps that queued while its last statement ran in one `UPDATE … FROM
/// UNNEST(…)`, a statement and a commit for many saves instead of one each.
/// Each swap has the outcome it would have alone, after the swaps queued
/// before it: a key appears at most once per statement, and a save of a
/// key already in the statement waits for the next. A lone save runs
/// alone, and when a batch statement fails its saves run again one by one,
/// so a failure reaches only the saves that fail alone. Everything else
/// goes to the [`SqlTable`] it derefs to.
#[derive(Clone, Debug)]
struct BatchedTable {
    sql: SqlTable<sqlx::Postgres>,
    writers: Arc<Writers<SwapJob>>,
}

impl std::ops::Deref for BatchedTable {
    type Target = SqlTable<sqlx::Postgres>;

    fn deref(&self) -> &Self::Target {
        &self.sql
    }
}

impl BatchedTable {
    fn new(table: SqlTable<sqlx::Postgres>) -> Self {
        Self {
            sql: table,
            writers: Arc::default(),
        }
    }

    /// The same pool on another table, with its own writer.
    fn with_table_name(&self, table: &str) -> Result<Self> {
        Ok(Self::new(self.sql.with_table_name(table)?))
    }

    /// The same table, purged in batches of `rows`.
    #[cfg(test)]
    fn with_purge_batch(self, rows: i64) -> Self {
        Self::new(self.sql.with_purge_batch(rows))
    }

    async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let (reply, outcome) = oneshot::channel();
        let job = SwapJob {
            key: *key,
            expected_version,
            record: record.clone(),
            now,
            reply,
        };
        let table = &self.sql;
        match self
            .writers
            .send(job, |jobs| swap_batches(table.clone(), jobs))
            .await
        {
            Ok(()) => answer("postgres", outcome).await,
            // No tokio runtime to run a writer on: this save goes alone.
            Err(job) => {
                table
                    .replace(&job.key, job.expected_version, &job.record, job.now)
                    .await
            }
        }
    }
}

/// The writer: swaps the queued saves in batches until every queue handle is gone.
async fn swap_batches(table: SqlTable<sqlx::Postgres>, mut jobs: mpsc::Receiver<SwapJob>) {
    let mut queued = Vec::with_capacity(MAX_SWAPS);
    while jobs.recv_many(&mut queued, MAX_SWAPS).await > 0 {
        while !queued.is_empty() {
            swap_together(&table, take_distinct_keys(&mut queued)).await;
        }
    }
}

/// Takes from `queued` the first job of each key, in order; the later
/// jobs of a key stay, in order, for the next statement.
fn take_distinct_keys(queued: &mut Vec<SwapJob>) -> Vec<SwapJob> {
    let mut keys = HashSet::with_capacity(queued.len());
    let (distinct, later) = queued.drain(..).partition(|job| keys.insert(job.key));
    *queued = later;
    distinct
}

/// Runs `jobs` (of distinct keys) in one statement and answers each; alone
/// when there is one, or when the statement fails.
async fn swap_together(table: &SqlTable<sqlx::Postgres>, jobs: Vec<SwapJob>) {
    if jobs.len() > 1 {
        let swaps: Vec<_> = jobs
            .iter()
            .map(|job| Swap {
                key: &job.key,
                expected_version: job.expected_version,
                record: &job.record,
                now: job.now,
            })
            .collect();
        match table.replace_many(&swaps).await {
            Ok(swapped) => {
                for job in jobs {
                    // A caller that gave up no longer listens; its save stands.
                    let _ = job.reply.send(Ok(swapped.contains(&job.key)));
                }
                return;
            }
            Err(err) => tracing::debug!(
                error = %err,
                saves = jobs.len(),
                "a batch of session saves failed; running each on its own"
            ),
        }
    }
    for job in jobs {
        let swapped = table
            .replace(&job.key, job.expected_version, &job.record, job.now)
            .await;
        let _ = job.reply.send(swapped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SessionId, SessionStore};

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn record(data: &[u8]) -> Record {
        Record {
            data: data.to_vec(),
            ..Record::new(NOW, NOW.saturating_add(Duration::from_secs(3600)), None)
        }
    }

    /// A save of `key` from version 1 to one holding `data`, and where its outcome comes.
    fn save(key: SessionKey, data: &[u8]) -> (SwapJob, oneshot::Receiver<Result<bool>>) {
        let (reply, outcome) = oneshot::channel();
        let record = Record {
            version: 2,
            ..record(data)
        };
        let job = SwapJob {
            key,
            expected_version: 1,
            record,
            now: NOW,
            reply,
        };
        (job, outcome)
    }

    #[test]
    fn each_statement_takes_the_first_save_of_each_key_in_order() {
        let [a, b, c] = [(); 3].map(|()| SessionId::generate().key());
        let mut queued: Vec<_> = [a, b, a, c, a, b]
            .into_iter()
            .map(|key| save(key, b"x").0)
            .collect();
        let mut statements = Vec::new();
        while !queued.is_empty() {
            let jobs = take_distinct_keys(&mut queued);
            statements.push(jobs.iter().map(|job| job.key).collect::<Vec<_>>());
        }
        assert_eq!(statements, [vec![a, b, c], vec![a, b], vec![a]]);
    }

    #[test]
    fn a_failing_save_fails_alone_and_the_rest_of_its_batch_lands() {
        crate::testing::run(async {
            let url = std::env::var("SESSION2_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
            let connected = PostgresStore::connect(&url).await;
            let Some(store) = crate::testing::require_server("postgres", connected) else {
                return;
            };
            let table = format!("s2unit_{}", &SessionId::generate().key().to_hex()[..16]);
            let store = store.with_table_name(&table).unwrap();
            store.setup().await.unwrap();
            let keys = [(); 3].map(|()| SessionId::generate().key());
            for key in &keys {
                store.create(key, &record(b"before"), NOW).await.unwrap();
            }
            // A trigger stands in for a save the database refuses.
            let t = Dialect::Postgres.quote(&table);
            let trigger = Dialect::Postgres.quote(&format!("{table}_poison"));
            for statement in [
                format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.data = 'poison'::bytea THEN RAISE EXCEPTION 'poisoned save'; END IF; \
                     RETURN NEW; END $$"
                ),
                format!(
                    "CREATE TRIGGER poison BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                ),
            ] {
                store.pool().execute(statement.as_str()).await.unwrap();
            }
            let (jobs, outcomes): (Vec<_>, Vec<_>) = [
                save(keys[0], b"first"),
                save(keys[1], b"poison"),
                save(keys[2], b"third"),
            ]
            .into_iter()
            .unzip();
            // Together, the statement fails and changes nothing.
            let swaps: Vec<_> = jobs
                .iter()
                .map(|job| Swap {
                    key: &job.key,
                    expected_version: job.expected_version,
                    record: &job.record,
                    now: job.now,
                })
                .collect();
            assert!(store.table.replace_many(&swaps).await.is_err());
            let data = async |key| store.load(key, NOW).await.unwrap().unwrap().data;
            assert_eq!(data(&keys[0]).await, b"before");
            // Through the writer, only the poisoned save fails.
            swap_together(&store.table, jobs).await;
            let mut swapped = Vec::new();
            for outcome in outcomes {
                swapped.push(outcome.await.unwrap().ok());
            }
            assert_eq!(swapped, [Some(true), None, Some(true)]);
            assert_eq!(data(&keys[0]).await, b"first");
            assert_eq!(data(&keys[1]).await, b"before");
            assert_eq!(data(&keys[2]).await, b"third");
            for statement in [
                format!("DROP TABLE {t}"),
                format!(
                    "DROP TABLE {}",
                    Dialect::Postgres.quote(&format!("{table}_schema"))
                ),
                format!("DROP FUNCTION {trigger}"),
            ] {
                store.pool().execute(statement.as_str()).await.unwrap();
            }
        });
    }
}
