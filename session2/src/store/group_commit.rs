//! Group commit for [`SqliteStore`](super::SqliteStore): the writes of
//! concurrent requests share one transaction, so one sync of SQLite's
//! write-ahead log makes many saves durable.
//!
//! SQLite lets one connection write at a time. On a pool, concurrent saves
//! queue for the write lock (sleeping in the busy handler) and each commits,
//! and syncs the log, alone. Here every write of one table goes through a
//! single writer task instead: it takes all the writes that queued while
//! its last transaction ran, applies them in order in one `BEGIN IMMEDIATE`
//! transaction, commits once, and only then answers each caller. So:
//!
//! - each write's outcome (created or collision, swapped or renamed or
//!   not, lease taken or held) is the one it would have had alone, after
//!   the writes queued before it;
//! - a caller hears `Ok` only once its write is committed;
//! - if a write of a batch fails, the transaction is rolled back, that
//!   write's caller gets the error, and the other writes go again together;
//!   if beginning or committing the transaction fails (the write lock stays
//!   busy, the disk fails), every write of the batch gets the error, as each
//!   would alone.
//!
//! A lone write runs on its own, as it would without the writer, and on a
//! quiet process on its caller's task (see `store/writer.rs`). There is
//! one writer per runtime that writes (see `store/writer.rs`); it holds a
//! pool connection only while a batch runs. Loads never go through it:
//! they are batched apart (`store/batched_load.rs`).

use std::ops::Deref;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::batched_load::BatchedLoads;
use super::sql::SqlTable;
use super::writer::{Batching, Queue, SessionJob, Writers, answer_all, run_batches};
use crate::store::{CreateOutcome, LeaseOutcome};
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

/// The most writes one transaction applies.
const MAX_BATCH: usize = 256;

/// A write primitive and its arguments.
enum Write {
    Create {
        key: SessionKey,
        record: Record,
        now: Timestamp,
    },
    Replace {
        key: SessionKey,
        expected_version: u64,
        record: Record,
        now: Timestamp,
    },
    Lease {
        key: SessionKey,
        lease: Lease,
        now: Timestamp,
    },
    Delete {
        key: SessionKey,
        expected_version: Option<u64>,
    },
    Rename {
        key: SessionKey,
        expected_version: u64,
        new_key: SessionKey,
        record: Record,
        now: Timestamp,
    },
    Touch {
        key: SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    },
}

/// What a [`Write`] gave.
enum Outcome {
    Create(CreateOutcome),
    Changed(bool),
    Lease(LeaseOutcome),
}

/// A queued write and where its outcome goes.
struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Outcome>>,
}

impl SessionJob for Job {
    fn key(&self) -> &SessionKey {
        match &self.write {
            Write::Create { key, .. }
            | Write::Replace { key, .. }
            | Write::Lease { key, .. }
            | Write::Delete { key, .. }
            | Write::Rename { key, .. }
            | Write::Touch { key, .. } => key,
        }
    }
}

/// A session table whose writes are group-committed by one writer task;
/// everything else goes to the [`SqlTable`] it derefs to.
#[derive(Clone)]
pub(crate) struct GroupCommitTable {
    table: SqlTable<sqlx::Sqlite>,
    /// The writers, shared by the clones.
    writers: Arc<Writers<Job>>,
    /// The loaders, shared by the clones.
    loads: Arc<BatchedLoads>,
    /// Batches committed in one transaction, for tests.
    #[cfg(test)]
    together: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for GroupCommitTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.table.fmt(f)
    }
}

impl Deref for GroupCommitTable {
    type Target = SqlTable<sqlx::Sqlite>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

impl GroupCommitTable {
    pub(crate) fn new(table: SqlTable<sqlx::Sqlite>) -> Self {
        Self {
            table,
            writers: Arc::default(),
            loads: Arc::default(),
            #[cfg(test)]
            together: Arc::default(),
        }
    }

    /// The same pool on another table, with its own writer.
    pub(crate) fn with_table_name(&self, table: &str) -> Result<Self> {
        Ok(Self::new(self.table.with_table_name(table)?))
    }

    /// The same table, purged in batches of `rows`.
    #[cfg(test)]
    pub(crate) fn with_purge_batch(self, rows: i64) -> Self {
        Self::new(self.table.with_purge_batch(rows))
    }

    /// A load, read together with the loads that queue meanwhile (see
    /// `store/batched_load.rs`); it does not wait for the writer.
    pub(crate) async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        self.loads.load(&self.table, key, now).await
    }

    pub(crate) async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let write = Write::Create {
            key: *key,
            record: record.clone(),
            now,
        };
        match self.submit(write).await? {
            Outcome::Create(outcome) => Ok(outcome),
            _ => Err(mismatched()),
        }
    }

    pub(crate) async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let write = Write::Replace {
            key: *key,
            expected_version,
            record: record.clone(),
            now,
        };
        self.submit_changed(write).await
    }

    pub(crate) async fn lease(
        &self,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseOutcome> {
        let write = Write::Lease {
            key: *key,
            lease,
            now,
        };
        match self.submit(write).await? {
            Outcome::Lease(outcome) => Ok(outcome),
            _ => Err(mismatched()),
        }
    }

    pub(crate) async fn delete(
        &self,
        key: &SessionKey,
        expected_version: Option<u64>,
    ) -> Result<bool> {
        let write = Write::Delete {
            key: *key,
            expected_version,
        };
        self.submit_changed(write).await
    }

    pub(crate) async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let write = Write::Rename {
            key: *key,
            expected_version,
            new_key: *new_key,
            record: record.clone(),
            now,
        };
        self.submit_changed(write).await
    }

    pub(crate) async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let write = Write::Touch {
            key: *key,
            accessed_at,
            idle_deadline,
        };
        self.submit_changed(write).await
    }

    async fn submit_changed(&self, write: Write) -> Result<bool> {
        match self.submit(write).await? {
            Outcome::Changed(changed) => Ok(changed),
            _ => Err(mismatched()),
        }
    }

    /// Queues `write` for the writer and waits for its committed outcome.
    async fn submit(&self, write: Write) -> Result<Outcome> {
        let (reply, outcome) = oneshot::channel();
        let start = |jobs| {
            let writer = Writer {
                table: self.table.clone(),
                #[cfg(test)]
                together: self.together.clone(),
            };
            writer.run(jobs)
        };
        let alone = async |job: Job| {
            let outcome = apply_alone(&self.table, &job.write).await;
            // A caller that gave up no longer listens; its write stands.
            let _ = job.reply.send(outcome);
        };
        let job = Job { write, reply };
        self.writers.run("sqlite", job, outcome, start, alone).await
    }
}

fn mismatched() -> Error {
    Error::backend(
        "sqlite",
        "the session writer answered a different kind of write",
    )
}

/// The task that commits a table's queued writes.
struct Writer {
    table: SqlTable<sqlx::Sqlite>,
    #[cfg(test)]
    together: Arc<std::sync::atomic::AtomicUsize>,
}

impl Writer {
    /// Commits the queued writes in batches until every queue handle is gone.
    async fn run(self, jobs: Queue<Job>) {
        let batching = Batching::one_at_a_time(MAX_BATCH);
        run_batches(jobs, batching, |batch| self.commit(batch)).await;
    }

    /// Applies and commits `batch`, then answers each job.
    async fn commit(&self, mut batch: Vec<Job>) {
        let table = &self.table;
        while batch.len() > 1 {
            match apply_together(table, &batch).await {
                Ok(outcomes) => {
                    #[cfg(test)]
                    self.together
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for (job, outcome) in batch.drain(..).zip(outcomes) {
                        // A caller that gave up no longer listens; its write stands.
                        let _ = job.reply.send(Ok(outcome));
                    }
                    return;
                }
                Err(BatchFailure::Write(index, err)) => {
                    tracing::debug!(error = %err, writes = batch.len(), "a write of a batch failed; the others go again");
                    let failed = batch.remove(index);
                    let _ = failed.reply.send(Err(err));
                }
                Err(BatchFailure::Transaction(err)) => {
                    return answer_all(batch.drain(..).map(|job| job.reply), err);
                }
            }
        }
        if let Some(job) = batch.pop() {
            let outcome = apply_alone(table, &job.write).await;
            let _ = job.reply.send(outcome);
        }
    }
}

/// Why a batch committed nothing.
enum BatchFailure {
    /// The write at this index of the batch failed: it fails alone.
    Write(usize, Error),
    /// Beginning or committing the transaction failed: every write fails.
    Transaction(Error),
}

/// Applies every write of `batch` in one transaction and commits it; on any
/// error nothing is committed.
async fn apply_together(
    table: &SqlTable<sqlx::Sqlite>,
    batch: &[Job],
) -> std::result::Result<Vec<Outcome>, BatchFailure> {
    let context = "commit a batch of session writes";
    let failed = |err| BatchFailure::Transaction(table.error(context, err));
    let mut transaction = table
        .pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(failed)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (index, job) in batch.iter().enumerate() {
        match apply(table, &mut transaction, &job.write).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(err) => {
                // Dropped unfinished, the transaction would roll back too, but later.
                let _ = transaction.rollback().await;
                return Err(BatchFailure::Write(index, err));
            }
        }
    }
    transaction.commit().await.map_err(failed)?;
    Ok(outcomes)
}

/// Applies `write` in a transaction of its own, as it would go without the writer.
async fn apply_alone(table: &SqlTable<sqlx::Sqlite>, write: &Write) -> Result<Outcome> {
    let mut connection = table.acquire("write session").await?;
    apply(table, &mut connection, write).await
}

async fn apply(
    table: &SqlTable<sqlx::Sqlite>,
    connection: &mut sqlx::SqliteConnection,
    write: &Write,
) -> Result<Outcome> {
    match write {
        Write::Create { key, record, now } => table
            .create_on(connection, key, record, *now)
            .await
            .map(Outcome::Create),
        Write::Replace {
            key,
            expected_version,
            record,
            now,
        } => table
            .replace_on(connection, key, *expected_version, record, *now)
            .await
            .map(Outcome::Changed),
        Write::Lease { key, lease, now } => table
            .lease_on(connection, key, *lease, *now)
            .await
            .map(Outcome::Lease),
        Write::Delete {
            key,
            expected_version,
        } => table
            .delete_on(connection, key, *expected_version)
            .await
            .map(Outcome::Changed),
        Write::Rename {
            key,
            expected_version,
            new_key,
            record,
            now,
        } => table
            .rename_on(connection, key, *expected_version, new_key, record, *now)
            .await
            .map(Outcome::Changed),
        Write::Touch {
            key,
            accessed_at,
            idle_deadline,
        } => table
            .touch_on(connection, key, *accessed_at, *idle_deadline)
            .await
            .map(Outcome::Changed),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use sqlx::{Connection, Executor};

    use super::*;
    use crate::store::SqliteStore;
    use crate::{SessionId, SessionStore};

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn record(data: &[u8]) -> Record {
        Record {
            data: data.to_vec(),
            ..Record::new(NOW, NOW.saturating_add(Duration::from_secs(3600)), None)
        }
    }

    /// A store on a fresh database file in `dir`, set up.
    async fn store_in(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite:{}", dir.path().join("sessions.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.setup().await.unwrap();
        store
    }

    /// Sessions created through `store`, each with `data` "<i>".
    async fn sessions(store: &SqliteStore, count: usize) -> Vec<SessionKey> {
        let mut keys = Vec::new();
        for i in 0..count {
            let key = SessionId::generate().key();
            let created = store
                .create(&key, &record(i.to_string().as_bytes()), NOW)
                .await;
            assert_eq!(created.unwrap(), CreateOutcome::Created);
            keys.push(key);
        }
        keys
    }

    /// A queued job and the receiver of its outcome.
    fn job(write: Write) -> (Job, oneshot::Receiver<Result<Outcome>>) {
        let (reply, outcome) = oneshot::channel();
        (Job { write, reply }, outcome)
    }

    fn replace(key: SessionKey, expected_version: u64, data: &[u8]) -> Write {
        Write::Replace {
            key,
            expected_version,
            record: Record {
                version: expected_version + 1,
                ..record(data)
            },
            now: NOW,
        }
    }

    fn writer(store: &SqliteStore) -> Writer {
        Writer {
            table: store.table.table.clone(),
            together: Arc::default(),
        }
    }

    /// The data of `key` as another connection to the file reads it.
    async fn data_on_disk(dir: &tempfile::TempDir, key: &SessionKey) -> Option<Vec<u8>> {
        let url = format!("sqlite:{}", dir.path().join("sessions.db").display());
        let other = SqliteStore::connect(&url).await.unwrap();
        let record = other.load(key, NOW).await.unwrap();
        record.map(|record| record.data)
    }

    #[test]
    fn a_batch_gives_each_write_its_own_outcome_in_order_and_commits_them() {
        crate::testing::run(async {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(&dir).await;
            let keys = sessions(&store, 5).await;
            let new_key = SessionId::generate().key();
            let lease = Lease {
                token: 7,
                until: NOW.saturating_add(Duration::from_secs(60)),
            };
            let writes = vec![
                replace(keys[0], 1, b"swapped"),
                // Stale: the first write of the batch already moved it on.
                replace(keys[0], 1, b"lost"),
                replace(keys[0], 2, b"swapped again"),
                replace(keys[1], 5, b"stale"),
                Write::Create {
                    key: keys[2],
                    record: record(b"collides"),
                    now: NOW,
                },
                Write::Create {
                    key: new_key,
                    record: record(b"new"),
                    now: NOW,
                },
                Write::Touch {
                    key: keys[2],
                    accessed_at: NOW,
                    idle_deadline: NOW.saturating_add(Duration::from_secs(7200)),
                },
                Write::Delete {
                    key: keys[3],
                    expected_version: Some(1),
                },
                Write::Lease {
                    key: keys[4],
                    lease,
                    now: NOW,
                },
                Write::Lease {
                    key: keys[4],
                    lease: Lease { token: 8, ..lease },
                    now: NOW,
                },
            ];
            let (batch, outcomes): (Vec<_>, Vec<_>) = writes.into_iter().map(job).unzip();
            let writer = writer(&store);
            writer.commit(batch).await;
            assert_eq!(
                writer.together.load(Ordering::Relaxed),
                1,
                "one transaction"
            );
            let mut outcomes = outcomes.into_iter();
            let mut next = async || outcomes.next().unwrap().await.unwrap().unwrap();
            for expected in [true, false, true, false] {
                assert!(matches!(next().await, Outcome::Changed(changed) if changed == expected));
            }
            assert!(matches!(
                next().await,
                Outcome::Create(CreateOutcome::Collision)
            ));
            assert!(matches!(
                next().await,
                Outcome::Create(CreateOutcome::Created)
            ));
            assert!(matches!(next().await, Outcome::Changed(true)));
            assert!(matches!(next().await, Outcome::Changed(true)));
            assert!(
                matches!(next().await, Outcome::Lease(LeaseOutcome::Taken(record)) if record.lease == Some(lease))
            );
            assert!(
                matches!(next().await, Outcome::Lease(LeaseOutcome::Held(record)) if record.lease == Some(lease))
            );
            // Committed: a new connection to the file sees every write.
            let on_disk = async |key| data_on_disk(&dir, key).await;
            assert_eq!(on_disk(&keys[0]).await.unwrap(), b"swapped again");
            assert_eq!(on_disk(&keys[1]).await.unwrap(), b"1");
            assert_eq!(on_disk(&new_key).await.unwrap(), b"new");
            assert_eq!(on_disk(&keys[3]).await, None);
        });
    }

    #[test]
    fn a_failing_write_fails_alone_and_the_rest_of_its_batch_commits() {
        crate::testing::run(async {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(&dir).await;
            let keys = sessions(&store, 3).await;
            // A trigger stands in for a write the database refuses.
            sqlx::query(
                "CREATE TRIGGER poison BEFORE UPDATE ON session2_sessions \
                 WHEN NEW.data = CAST('poison' AS BLOB) BEGIN SELECT RAISE(ABORT, 'poisoned write'); END",
            )
            .execute(store.pool())
            .await
            .unwrap();
            let writes = || {
                vec![
                    replace(keys[0], 1, b"first"),
                    replace(keys[1], 1, b"poison"),
                    replace(keys[2], 1, b"third"),
                ]
            };
            // Together, the batch fails at the poisoned write and leaves nothing behind.
            let (batch, _): (Vec<_>, Vec<_>) = writes().into_iter().map(job).unzip();
            let failure = apply_together(&store.table.table, &batch).await;
            assert!(matches!(failure, Err(BatchFailure::Write(1, _))));
            assert_eq!(data_on_disk(&dir, &keys[0]).await.unwrap(), b"0");
            // Committed through the writer, only the poisoned write fails.
            let (batch, outcomes): (Vec<_>, Vec<_>) = writes().into_iter().map(job).unzip();
            let writer = writer(&store);
            writer.commit(batch).await;
            assert_eq!(
                writer.together.load(Ordering::Relaxed),
                1,
                "the others commit together"
            );
            let mut answers = Vec::new();
            for outcome in outcomes {
                answers.push(outcome.await);
            }
            let outcomes = answers;
            let changed = |index: usize| match &outcomes[index] {
                Ok(Ok(Outcome::Changed(changed))) => Some(*changed),
                Ok(Err(_)) => None,
                _ => panic!("no outcome for write {index}"),
            };
            assert_eq!(
                [changed(0), changed(1), changed(2)],
                [Some(true), None, Some(true)]
            );
            assert_eq!(data_on_disk(&dir, &keys[0]).await.unwrap(), b"first");
            assert_eq!(data_on_disk(&dir, &keys[1]).await.unwrap(), b"1");
            assert_eq!(data_on_disk(&dir, &keys[2]).await.unwrap(), b"third");
        });
    }

    #[test]
    fn a_batch_that_cannot_take_the_write_lock_fails_every_write_and_writes_nothing() {
        crate::testing::run(async {
            let dir = tempfile::tempdir().unwrap();
            let keys = sessions(&store_in(&dir).await, 3).await;
            // Another process holds the write lock past the busy timeout.
            let url = format!("sqlite:{}", dir.path().join("sessions.db").display());
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                .unwrap()
                .busy_timeout(Duration::from_millis(100));
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            let store = SqliteStore::from_pool(pool);
            let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
            other.execute("BEGIN IMMEDIATE").await.unwrap();
            let (batch, outcomes): (Vec<_>, Vec<_>) = keys
                .iter()
                .map(|key| job(replace(*key, 1, b"blocked")))
                .unzip();
            let writer = writer(&store);
            writer.commit(batch).await;
            for outcome in outcomes {
                assert!(outcome.await.unwrap().is_err());
            }
            assert_eq!(writer.together.load(Ordering::Relaxed), 0);
            other.execute("ROLLBACK").await.unwrap();
            for key in &keys {
                assert_ne!(data_on_disk(&dir, key).await.unwrap(), b"blocked");
            }
        });
    }

    #[test]
    fn concurrent_saves_share_transactions_and_every_one_lands() {
        crate::testing::run(async {
            let dir = tempfile::tempdir().unwrap();
            let store = store_in(&dir).await;
            let keys = sessions(&store, 64).await;
            let rounds = 20;
            let mut tasks = tokio::task::JoinSet::new();
            for key in keys.clone() {
                let store = store.clone();
                tasks.spawn(async move {
                    for version in 1..=rounds {
                        let write = Record {
                            version: version + 1,
                            ..record(version.to_string().as_bytes())
                        };
                        assert!(store.replace(&key, version, &write, NOW).await.unwrap());
                    }
                });
            }
            while let Some(task) = tasks.join_next().await {
                task.unwrap();
            }
            assert!(store.table.together.load(Ordering::Relaxed) > 0);
            for key in &keys {
                let data = data_on_disk(&dir, key).await.unwrap();
                assert_eq!(data, rounds.to_string().as_bytes());
            }
        });
    }

    #[test]
    fn each_runtime_that_writes_gets_a_writer_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let current_thread = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let first = current_thread();
        let (store, keys) = first.block_on(async {
            let store = store_in(&dir).await;
            let keys = sessions(&store, 2).await;
            (store, keys)
        });
        // `first` now runs nothing, its writer included: a write from
        // another runtime must not wait for it.
        let second = current_thread();
        let write = Record {
            version: 2,
            ..record(b"second")
        };
        second.block_on(async {
            let written = store.replace(&keys[0], 1, &write, NOW);
            let written = tokio::time::timeout(Duration::from_secs(30), written).await;
            assert!(written.expect("the write does not hang").unwrap());
        });
        // Once `first` is gone, so is its writer from the list.
        let first_id = first.handle().id();
        drop(first);
        crate::testing::run(async {
            assert!(store.replace(&keys[1], 1, &write, NOW).await.unwrap());
            assert_eq!(data_on_disk(&dir, &keys[1]).await.unwrap(), b"second");
        });
        assert!(!store.table.writers.runs_on(first_id));
    }
}
