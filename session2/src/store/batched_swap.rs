//! Batched compare-and-swap for [`PostgresStore`](super::PostgresStore)
//! and [`MySqlStore`](super::MySqlStore): the saves of concurrent requests
//! cost the server about one statement and one commit together, instead of
//! one each.
//!
//! Every save of a table goes to one writer task (per runtime, see
//! `store/writer.rs`). It takes the saves that queued while its last batch
//! ran and makes them together ([`SwapMany::swap_many`]: one `UPDATE …
//! FROM UNNEST(…)` on PostgreSQL; a `SELECT … FOR UPDATE` and one
//! multi-row write in a transaction on MySQL), then answers each caller
//! once that has committed. So:
//!
//! - each save has the outcome it would have alone, after the saves queued
//!   before it: a batch holds each key at most once, and a later save of a
//!   key waits for the next batch, in order;
//! - a lone save runs alone, with the store's one-row statement, and on a
//!   quiet process on its caller's task (see `store/writer.rs`);
//! - while few saves are under way, up to four batches go out at once,
//!   as a pool would serve them, instead of waiting for each other;
//! - when a batch fails, nothing of it is committed, and each of its saves
//!   gets the error; unless the database refused the statement (a
//!   constraint or trigger, which one save might cause): then each save
//!   runs again on its own, all at once, so the refusal reaches only the
//!   saves refused alone.
//!
//! Loads are batched too (`store/batched_load.rs`), and so are leases. On
//! PostgreSQL a lease is a statement of its own that sets only the
//! version and the lease (`store/batched_lease.rs`). On MySQL it is a
//! batched load and a batched compare-and-swap (taking the lease is a save
//! of the record at the version just read, one higher and with the lease),
//! repeated if another writer wins the swap: MySQL's `UPDATE` cannot tell
//! which rows it took, and taking them in a transaction of their own
//! (`SELECT … FOR UPDATE`) locks a hot session's row against its holder's
//! save every time another request asks for it. So a MySQL lease sends and
//! writes the session's data again, as the save that releases it does:
//! cheap for the small sessions this is built for, twice the writes of an
//! exclusive request for a large one.
//!
//! The other primitives (create, delete, touch) go straight to the pool,
//! as they are rarer than saves.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::LeaseOutcome;
#[cfg(feature = "postgres")]
use super::batched_lease::BatchedLeases;
use super::batched_load::{BatchedLoads, LoadMany};
use super::sql::{Backend, SqlTable, Swap};
use super::writer::{
    Batching, Queue, SwapJob, Writers, answer_all, is_refused_statement, run_batches,
    run_each_alone,
};
#[cfg(feature = "mysql")]
use super::{LoadAndSwap, lease_by_compare_and_swap};
use crate::{Lease, Record, Result, SessionKey, Timestamp};

/// The most saves one batch makes.
const MAX_SWAPS: usize = 256;

/// The fewest saves made together; fewer run each with its own statement,
/// side by side. A batch statement costs more than a one-row `UPDATE`
/// (on MySQL it is a transaction of three statements), so with few users
/// small batches cost more than they save: running those of fewer than
/// four saves side by side made four users' read-modify-writes 9%
/// (PostgreSQL) and 11% (MySQL) faster in paired runs, and 16 or 64
/// users as fast as before (eight instead of four: MySQL 9% slower at 16).
const MIN_SWAPS: usize = 4;

/// A table that can make many compare-and-swaps at once.
pub(crate) trait SwapMany: Clone + Send + Sync + 'static {
    /// Makes `swaps` (of distinct keys) at once, committed together or not
    /// at all, each with the outcome it would have alone; returns the keys
    /// whose swap won.
    fn swap_many(
        &self,
        swaps: &[Swap<'_>],
    ) -> impl Future<Output = Result<HashSet<SessionKey>>> + Send;

    /// One compare-and-swap, alone.
    fn swap_one(&self, swap: Swap<'_>) -> impl Future<Output = Result<bool>> + Send;
}

impl SwapJob {
    fn swap(&self) -> Swap<'_> {
        Swap {
            key: &self.key,
            expected_version: self.expected_version,
            record: &self.record,
            now: self.now,
        }
    }
}

/// A session table whose saves, loads and leases are batched; everything
/// else goes to the [`SqlTable`] it derefs to.
#[derive(Debug)]
pub(crate) struct BatchedTable<DB: sqlx::Database> {
    sql: SqlTable<DB>,
    writers: Arc<Writers<SwapJob>>,
    loads: Arc<BatchedLoads>,
    /// PostgreSQL's leases (unused on MySQL).
    #[cfg(feature = "postgres")]
    leases: Arc<BatchedLeases>,
}

impl<DB: sqlx::Database> Clone for BatchedTable<DB> {
    fn clone(&self) -> Self {
        Self {
            sql: self.sql.clone(),
            writers: Arc::clone(&self.writers),
            loads: Arc::clone(&self.loads),
            #[cfg(feature = "postgres")]
            leases: Arc::clone(&self.leases),
        }
    }
}

impl<DB: sqlx::Database> std::ops::Deref for BatchedTable<DB> {
    type Target = SqlTable<DB>;

    fn deref(&self) -> &Self::Target {
        &self.sql
    }
}

impl<DB> BatchedTable<DB>
where
    DB: Backend,
    SqlTable<DB>: SwapMany + LoadMany,
{
    pub(crate) fn new(table: SqlTable<DB>) -> Self {
        Self {
            sql: table,
            writers: Arc::default(),
            loads: Arc::default(),
            #[cfg(feature = "postgres")]
            leases: Arc::default(),
        }
    }

    /// The same pool on another table, with its own writer.
    pub(crate) fn with_table_name(&self, table: &str) -> Result<Self> {
        Ok(Self::new(self.sql.with_table_name(table)?))
    }

    /// The same table, purged in batches of `rows`.
    #[cfg(test)]
    pub(crate) fn with_purge_batch(self, rows: i64) -> Self {
        Self::new(self.sql.with_purge_batch(rows))
    }

    /// A load, read together with the loads that queue meanwhile (see `store/batched_load.rs`).
    pub(crate) async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        self.loads.load(&self.sql, key, now).await
    }

    pub(crate) async fn replace(
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
        let start = |jobs| swap_batches(table.clone(), jobs);
        self.writers
            .run(DB::STORE, job, outcome, start, |job| swap_alone(table, job))
            .await
    }
}

#[cfg(feature = "postgres")]
impl BatchedTable<sqlx::Postgres> {
    /// A lease, tried together with the leases that queue meanwhile (see
    /// `store/batched_lease.rs`).
    pub(crate) async fn lease(
        &self,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseOutcome> {
        self.leases
            .lease(&self.sql, &self.loads, key, lease, now)
            .await
    }
}

#[cfg(feature = "mysql")]
impl BatchedTable<sqlx::MySql> {
    /// A lease by a batched load and a batched compare-and-swap, so that
    /// the leases of concurrent requests share statements too.
    pub(crate) async fn lease(
        &self,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseOutcome> {
        lease_by_compare_and_swap(self, key, lease, now).await
    }
}

#[cfg(feature = "mysql")]
impl LoadAndSwap for BatchedTable<sqlx::MySql> {
    async fn load_record(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        self.load(key, now).await
    }

    async fn swap_record(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        self.replace(key, expected_version, record, now).await
    }
}

/// The writer: makes the queued saves in batches until every queue handle is gone.
async fn swap_batches<T: SwapMany>(table: T, jobs: Queue<SwapJob>) {
    let batching = Batching {
        one_per_session: true,
        ..Batching::one_at_a_time(MAX_SWAPS).side_by_side_when_few()
    };
    run_batches(jobs, batching, |batch| swap_together(&table, batch)).await;
}

/// Makes the save of `job` on its own and answers it.
async fn swap_alone<T: SwapMany>(table: &T, job: SwapJob) {
    let swapped = table.swap_one(job.swap()).await;
    // A caller that gave up no longer listens; its save stands.
    let _ = job.reply.send(swapped);
}

/// Makes `jobs` (of distinct keys) together and answers each. Fewer than
/// [`MIN_SWAPS`] run each alone, side by side. When the batch fails, every save gets its error, unless the
/// database refused it (see [`is_refused_statement`]): then each save runs
/// alone, all at once (their keys differ).
async fn swap_together<T: SwapMany>(table: &T, mut jobs: Vec<SwapJob>) {
    if jobs.len() < MIN_SWAPS {
        let each_alone = jobs.into_iter().map(|job| swap_alone(table, job));
        futures_util::future::join_all(each_alone).await;
        return;
    }
    // In key order, so that the batches of two processes (PostgreSQL locks
    // the rows of an `UPDATE … FROM UNNEST` in the array's order) take their
    // row locks in the same order and cannot deadlock. Their keys differ, so
    // the order changes no outcome.
    jobs.sort_unstable_by_key(|job| job.key);
    let swaps: Vec<_> = jobs.iter().map(SwapJob::swap).collect();
    let err = match table.swap_many(&swaps).await {
        Ok(swapped) => {
            for job in jobs {
                // A caller that gave up no longer listens; its save stands.
                let _ = job.reply.send(Ok(swapped.contains(&job.key)));
            }
            return;
        }
        Err(err) => err,
    };
    if !is_refused_statement(&err) {
        return answer_all(jobs.into_iter().map(|job| job.reply), err);
    }
    tracing::debug!(error = %err, saves = jobs.len(), "a batch of session saves was refused; running each on its own");
    run_each_alone(jobs, |job| {
        let table = table.clone();
        async move { swap_alone(&table, job).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    /// A table that keeps the keys of each batch in the order given, and
    /// of each save made alone, and lets every save win.
    #[derive(Clone, Default)]
    struct Recording {
        batches: Arc<std::sync::Mutex<Vec<Vec<SessionKey>>>>,
        alone: Arc<std::sync::Mutex<Vec<SessionKey>>>,
    }

    impl SwapMany for Recording {
        async fn swap_many(&self, swaps: &[Swap<'_>]) -> Result<HashSet<SessionKey>> {
            let keys: Vec<_> = swaps.iter().map(|swap| *swap.key).collect();
            self.batches.lock().unwrap().push(keys.clone());
            Ok(keys.into_iter().collect())
        }

        async fn swap_one(&self, swap: Swap<'_>) -> Result<bool> {
            self.alone.lock().unwrap().push(*swap.key);
            Ok(true)
        }
    }

    #[test]
    fn fewer_saves_than_make_a_batch_go_each_alone() {
        crate::testing::run(async {
            for saves in 1..=MIN_SWAPS {
                let table = Recording::default();
                let keys: Vec<_> = (0..saves).map(|_| SessionId::generate().key()).collect();
                let (jobs, outcomes): (Vec<_>, Vec<_>) =
                    keys.iter().map(|key| save(*key, b"x")).unzip();
                swap_together(&table, jobs).await;
                for outcome in outcomes {
                    assert!(outcome.await.unwrap().unwrap());
                }
                let (batches, alone) = (table.batches.lock().unwrap(), table.alone.lock().unwrap());
                if saves < MIN_SWAPS {
                    assert!(batches.is_empty());
                    assert_eq!(*alone, keys);
                } else {
                    assert_eq!(batches.len(), 1);
                    assert!(alone.is_empty());
                }
            }
        });
    }

    #[test]
    fn a_batch_swaps_its_rows_in_key_order() {
        crate::testing::run(async {
            let table = Recording::default();
            let mut keys: Vec<_> = (0..16).map(|_| SessionId::generate().key()).collect();
            let (jobs, outcomes): (Vec<_>, Vec<_>) =
                keys.iter().map(|key| save(*key, b"x")).unzip();
            swap_together(&table, jobs).await;
            for outcome in outcomes {
                assert!(
                    outcome.await.unwrap().unwrap(),
                    "each save hears its own outcome"
                );
            }
            keys.sort_unstable();
            assert_eq!(*table.batches.lock().unwrap(), [keys]);
        });
    }

    /// A table whose server cannot be reached; counts the saves run alone.
    #[derive(Clone, Default)]
    struct Unreachable {
        alone: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl SwapMany for Unreachable {
        async fn swap_many(&self, _: &[Swap<'_>]) -> Result<HashSet<SessionKey>> {
            Err(crate::Error::backend("test", "connection refused"))
        }

        async fn swap_one(&self, _: Swap<'_>) -> Result<bool> {
            self.alone
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(crate::Error::backend("test", "connection refused"))
        }
    }

    #[test]
    fn a_batch_that_cannot_reach_the_server_fails_each_save_without_trying_it_again() {
        crate::testing::run(async {
            let table = Unreachable::default();
            let (jobs, outcomes): (Vec<_>, Vec<_>) = (0..5)
                .map(|_| save(SessionId::generate().key(), b"x"))
                .unzip();
            swap_together(&table, jobs).await;
            for outcome in outcomes {
                assert!(outcome.await.unwrap().unwrap_err().is_backend());
            }
            assert_eq!(table.alone.load(std::sync::atomic::Ordering::Relaxed), 0);
        });
    }

    /// With the table refusing saves of the data `poison`: a batch holding
    /// one fails whole and changes nothing, and through the writer only
    /// that save fails.
    async fn a_poisoned_save_fails_alone<T: SwapMany>(table: &T, store: &dyn SessionStore) {
        let keys = [(); MIN_SWAPS].map(|()| SessionId::generate().key());
        for key in &keys {
            store.create(key, &record(b"before"), NOW).await.unwrap();
        }
        let (jobs, outcomes): (Vec<_>, Vec<_>) = [
            save(keys[0], b"first"),
            save(keys[1], b"poison"),
            save(keys[2], b"third"),
            save(keys[3], b"fourth"),
        ]
        .into_iter()
        .unzip();
        let swaps: Vec<_> = jobs.iter().map(SwapJob::swap).collect();
        assert!(table.swap_many(&swaps).await.is_err());
        let data = async |key| store.load(key, NOW).await.unwrap().unwrap().data;
        assert_eq!(data(&keys[0]).await, b"before");
        swap_together(table, jobs).await;
        let mut swapped = Vec::new();
        for outcome in outcomes {
            swapped.push(outcome.await.unwrap().ok());
        }
        assert_eq!(swapped, [Some(true), None, Some(true), Some(true)]);
        assert_eq!(data(&keys[0]).await, b"first");
        assert_eq!(data(&keys[1]).await, b"before");
        assert_eq!(data(&keys[2]).await, b"third");
        assert_eq!(data(&keys[3]).await, b"fourth");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_a_poisoned_save_fails_alone() {
        use crate::store::sql::Dialect;
        use crate::store::test_support::{
            drop_postgres_table, postgres_on_fresh_table, run_on_postgres,
        };
        crate::testing::run(async {
            let Some(store) = postgres_on_fresh_table().await else {
                return;
            };
            let t = Dialect::Postgres.quote(store.table_name());
            let trigger = Dialect::Postgres.quote(&format!("{}_poison", store.table_name()));
            run_on_postgres(
                &store,
                &format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.data = 'poison'::bytea THEN RAISE EXCEPTION 'poisoned save'; END IF; \
                     RETURN NEW; END $$"
                ),
            )
            .await;
            run_on_postgres(
                &store,
                &format!(
                    "CREATE TRIGGER poison BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                ),
            )
            .await;
            a_poisoned_save_fails_alone(&*store.table, &store).await;
            drop_postgres_table(&store).await;
            run_on_postgres(&store, &format!("DROP FUNCTION {trigger}")).await;
        });
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_a_poisoned_save_fails_alone() {
        use sqlx::Executor;

        use crate::store::MySqlStore;
        use crate::store::sql::Dialect;
        crate::testing::run(async {
            let url = std::env::var("SESSION2_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
            let connected = MySqlStore::connect(&url).await;
            let Some(store) = crate::testing::require_server("mysql", connected) else {
                return;
            };
            let table = crate::store::test_support::fresh_table_name();
            let store = store.with_table_name(&table).unwrap();
            store.setup().await.unwrap();
            let t = Dialect::MySql.quote(&table);
            let run = async |statement: String| {
                store.pool().execute(statement.as_str()).await.unwrap();
            };
            run(format!(
                "CREATE TRIGGER {} BEFORE UPDATE ON {t} FOR EACH ROW BEGIN \
                 IF NEW.data = 'poison' THEN SIGNAL SQLSTATE '45000' \
                 SET MESSAGE_TEXT = 'poisoned save'; END IF; END",
                Dialect::MySql.quote(&format!("{table}_poison"))
            ))
            .await;
            a_poisoned_save_fails_alone(&*store.table, &store).await;
            run(format!("DROP TABLE {t}")).await;
            run(format!(
                "DROP TABLE {}",
                Dialect::MySql.quote(&format!("{table}_schema"))
            ))
            .await;
        });
    }
}
