//! The store contract: the few primitives every back end implements.
//!
//! A [`SessionStore`] keeps [`Record`]s under [`SessionKey`]s. Everything the
//! library promises (no lost updates, no resurrected sessions, exclusive
//! sessions across processes, expiry, id rotation, per-user logout) is built
//! once, in the [`SessionManager`](crate::SessionManager), out of these
//! primitives; a store only has to make each one atomic:
//!
//! | primitive | contract |
//! |---|---|
//! | [`load`](SessionStore::load) | the record and its version; `None` if missing or expired |
//! | [`create`](SessionStore::create) | insert only if no live record has the key; a collision never overwrites |
//! | [`replace`](SessionStore::replace) | compare-and-swap on the version; never recreates a deleted record |
//! | [`delete`](SessionStore::delete) | remove, optionally only at a given version |
//! | [`touch`](SessionStore::touch) | move the idle deadline without rewriting data or bumping the version |
//! | [`purge_expired`](SessionStore::purge_expired) | delete every record expired at `now` |
//! | [`list`](SessionStore::list), [`count`](SessionStore::count) | page through records by key, count them |
//! | [`find_by_user`](SessionStore::find_by_user) | a user's live sessions, through an index |
//!
//! Stores receive "now" from the caller and never read a clock, so expiry is
//! decided by one clock and tests can move it.
//!
//! Third-party stores prove they meet the contract by running the public
//! conformance suite (`session2::testing`, cargo feature `testing`).

#[cfg(feature = "postgres")]
mod batched_lease;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod batched_load;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod batched_swap;
#[cfg(feature = "directory")]
mod directory;
#[cfg(feature = "sqlite")]
mod group_commit;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redb")]
mod redb;
#[cfg(feature = "redis")]
mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod url;
#[cfg(any(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "redis"
))]
mod writer;

use std::fmt;
use std::future::Future;

use async_trait::async_trait;

#[cfg(feature = "directory")]
#[cfg_attr(docsrs, doc(cfg(feature = "directory")))]
pub use self::directory::DirectoryStore;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use self::memory::MemoryStore;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use self::mysql::MySqlStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresStore;
#[cfg(feature = "redb")]
#[cfg_attr(docsrs, doc(cfg(feature = "redb")))]
pub use self::redb::RedbStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use self::sqlite::SqliteStore;
pub use self::url::open;
use crate::{Lease, Record, Result, SessionKey, Timestamp};

/// What a store can safely be shared by, so an application can refuse a
/// store that does not fit its deployment (the original's two flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Several OS processes (workers, machines) may use the store at once.
    pub is_multiprocess_safe: bool,
    /// Several threads of one process may use the store at once.
    pub is_thread_safe: bool,
}

/// Whether [`SessionStore::create`] stored the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The record was stored.
    Created,
    /// A live record already has this key; nothing was written.
    Collision,
}

/// What [`SessionStore::lease`] found under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// No live record has the key; nothing was written.
    Missing,
    /// Another holder's lease binds at `now` (or, for a store that leases
    /// by compare-and-swap, other writers kept changing the record): the
    /// record as stored; nothing was written. Try again later.
    Held(Record),
    /// The lease is taken: the record as now stored, one version higher
    /// and carrying the new lease.
    Taken(Record),
}

/// What a lease by compare-and-swap is made of: the record of a key, and a
/// compare-and-swap of it ([`SessionStore::load`] and
/// [`SessionStore::replace`], for a store).
pub(crate) trait LoadAndSwap: Sync {
    fn load_record(
        &self,
        key: &SessionKey,
        now: Timestamp,
    ) -> impl Future<Output = Result<Option<Record>>> + Send;

    fn swap_record(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> impl Future<Output = Result<bool>> + Send;
}

impl<S: SessionStore + ?Sized> LoadAndSwap for S {
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

/// How many times [`lease_by_compare_and_swap`] loads and swaps (and
/// PostgreSQL's batched lease tries) before it reports the record as held.
pub(crate) const MAX_LEASE_ATTEMPTS: usize = 64;

/// A lease by a load and a compare-and-swap, repeated while another writer
/// wins the swap: the default [`SessionStore::lease`], and MySQL's batched
/// one. A record that other writers change on every attempt,
/// [`MAX_LEASE_ATTEMPTS`] times over, is reported
/// [`Held`](LeaseOutcome::Held): the caller then waits and tries again, as
/// for a held lease, instead of spinning here.
pub(crate) async fn lease_by_compare_and_swap(
    table: &(impl LoadAndSwap + ?Sized),
    key: &SessionKey,
    lease: Lease,
    now: Timestamp,
) -> Result<LeaseOutcome> {
    let mut attempts = 0;
    loop {
        let Some(record) = table.load_record(key, now).await? else {
            return Ok(LeaseOutcome::Missing);
        };
        attempts += 1;
        if record.is_leased_at(now) || attempts > MAX_LEASE_ATTEMPTS {
            return Ok(LeaseOutcome::Held(record));
        }
        let version = record.version;
        let leased = record.with_lease(lease);
        if table.swap_record(key, version, &leased, now).await? {
            return Ok(LeaseOutcome::Taken(leased));
        }
    }
}

/// One page of [`SessionStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Records in ascending key order.
    pub records: Vec<(SessionKey, Record)>,
    /// The key to pass as `after` for the next page; `None` on the last page.
    pub next: Option<SessionKey>,
}

/// A session back end: a map from [`SessionKey`] to versioned [`Record`].
///
/// All methods are safe to call concurrently from many tasks, and, for a
/// store whose [`capabilities`](SessionStore::capabilities) say so, from many
/// processes. A method fails with a backend error
/// ([`Error::is_backend`](crate::Error::is_backend)) when the server or file
/// system cannot be reached; it never panics on stored data it cannot read.
#[async_trait]
pub trait SessionStore: Send + Sync + fmt::Debug + 'static {
    /// A short name for errors and logs, such as `"postgres"`.
    fn name(&self) -> &'static str;

    /// Whether the store is safe across processes and threads.
    fn capabilities(&self) -> Capabilities;

    /// Creates what the store needs (directory, table, indexes). Idempotent:
    /// running it on a store that already holds sessions changes nothing and
    /// never drops or truncates data.
    async fn setup(&self) -> Result<()>;

    /// The record stored under `key`.
    ///
    /// Returns `None` when the key is missing or the record is expired at
    /// `now`. A record whose metadata cannot be decoded fails with a decode
    /// error ([`Error::is_decode`](crate::Error::is_decode)), which the manager
    /// treats as an absent session.
    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>>;

    /// Stores `record` under `key` only if no live record has that key.
    ///
    /// An expired record under the key may be replaced. On
    /// [`CreateOutcome::Collision`] nothing is written.
    async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome>;

    /// Compare-and-swap: replaces the record under `key` with `record` only
    /// if the stored record's version is `expected_version`.
    ///
    /// Returns `false`, writing nothing, when the versions differ, or when
    /// the record is missing or expired at `now`: a replace never recreates a
    /// deleted session. The caller sets `record.version` (normally
    /// `expected_version + 1`).
    async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool>;

    /// Loads the live record under `key` and, unless another lease binds it
    /// at `now`, takes `lease` on it in the same atomic step: the stored
    /// record's version goes up by one and its lease becomes `lease`.
    ///
    /// The default does a [`load`](SessionStore::load) and a
    /// [`replace`](SessionStore::replace), repeated when another writer
    /// wins the compare-and-swap; stores that can do both in one round trip
    /// override it. A decode error is returned as [`load`](SessionStore::load) returns it.
    async fn lease(&self, key: &SessionKey, lease: Lease, now: Timestamp) -> Result<LeaseOutcome> {
        lease_by_compare_and_swap(self, key, lease, now).await
    }

    /// Deletes the record under `key`; with `expected_version`, only if the
    /// stored version matches. Returns whether a record was deleted.
    async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool>;

    /// Moves the session under `key` to `new_key` as `record`: the renewal
    /// of a session's id (at login, say), which keeps its data.
    ///
    /// Returns `false`, leaving both keys as they were, when the record
    /// under `key` is missing or not at `expected_version`, or when a live
    /// record holds `new_key` (an expired one may be replaced, as by
    /// [`create`](SessionStore::create)), or when `new_key` is `key`: a
    /// session's own key is never free for it. The default creates under
    /// `new_key`, then deletes `key` at `expected_version`, and deletes the
    /// new record again when that fails; stores that can do both in one
    /// step override it.
    async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        if key == new_key || self.create(new_key, record, now).await? == CreateOutcome::Collision {
            return Ok(false);
        }
        if self.delete(key, Some(expected_version)).await? {
            return Ok(true);
        }
        self.delete(new_key, None).await?;
        Ok(false)
    }

    /// Sets `accessed_at` and `idle_deadline` of a live record without
    /// rewriting its data or changing its version, so a concurrent
    /// compare-and-swap is unaffected. Returns `false` when the record is
    /// missing or expired at `accessed_at`.
    async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool>;

    /// Deletes every record expired at `now` and returns how many it deleted.
    /// Records that cannot be decoded are deleted too (they can never be read).
    async fn purge_expired(&self, now: Timestamp) -> Result<u64>;

    /// Up to `limit` records with keys after `after` (from the start when
    /// `None`), in ascending key order. Expired records not yet purged may
    /// be included (an admin tool reports them); undecodable ones are
    /// skipped. Memory use is bounded by `limit`, not by the store's size.
    async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page>;

    /// The number of records stored, expired ones not yet purged included.
    async fn count(&self) -> Result<u64>;

    /// The live records (at `now`) whose user is `user`, through an index:
    /// never a scan of every session.
    async fn find_by_user(&self, user: &str, now: Timestamp) -> Result<Vec<(SessionKey, Record)>>;
}

/// Tests that several stores share; each store's module runs them on a store
/// made for the case.
#[cfg(all(
    test,
    any(
        feature = "sqlite",
        feature = "postgres",
        feature = "mysql",
        feature = "redis"
    )
))]
pub(crate) mod test_support {
    /// A table name no other test uses.
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) fn fresh_table_name() -> String {
        format!(
            "s2unit_{}",
            &crate::SessionId::generate().key().to_hex()[..16]
        )
    }

    /// A PostgreSQL store on a fresh table of the test server, set up;
    /// `None` when the server is unreachable outside CI (see
    /// `require_server`). [`drop_postgres_table`] drops it.
    #[cfg(feature = "postgres")]
    pub(crate) async fn postgres_on_fresh_table() -> Option<crate::store::PostgresStore> {
        let url = std::env::var("SESSION2_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let connected = crate::store::PostgresStore::connect(&url).await;
        let store = crate::testing::require_server("postgres", connected)?
            .with_table_name(&fresh_table_name())
            .unwrap();
        crate::SessionStore::setup(&store).await.unwrap();
        Some(store)
    }

    /// Runs `statement` (test set-up or clean-up) on `store`'s pool.
    #[cfg(feature = "postgres")]
    pub(crate) async fn run_on_postgres(store: &crate::store::PostgresStore, statement: &str) {
        sqlx::Executor::execute(store.pool(), statement)
            .await
            .unwrap();
    }

    /// Drops the table of a [`postgres_on_fresh_table`] store.
    #[cfg(feature = "postgres")]
    pub(crate) async fn drop_postgres_table(store: &crate::store::PostgresStore) {
        use crate::store::sql::Dialect;
        let table = store.table_name();
        for table in [table.to_owned(), format!("{table}_schema")] {
            run_on_postgres(
                store,
                &format!("DROP TABLE {}", Dialect::Postgres.quote(&table)),
            )
            .await;
        }
    }

    /// Purges with batches of 3 sessions: expired sessions spread over
    /// several batches, several of them sharing one expiry across a batch
    /// boundary, and live sessions whose expiry index entry ran early among
    /// them; half have a user. Every expired session goes, with its entry in
    /// the user index; every live one stays, and the early entries move.
    pub(crate) async fn purge_in_small_batches(store: impl crate::SessionStore) {
        use std::time::Duration;
        // The real clock: Redis expires keys by it.
        let now = crate::Clock::now(&crate::SystemClock);
        let at = |seconds: u64| now.saturating_add(Duration::from_secs(seconds));
        store.setup().await.unwrap();
        let mut live = Vec::new();
        for i in 0..16u64 {
            let key = crate::SessionId::generate().key();
            // Expiries of 10 s (nine alike) and 20 s; every fourth session
            // is prolonged to an hour, leaving its index entry early.
            let mut record = crate::Record::new(now, at(if i % 3 == 0 { 20 } else { 10 }), None);
            record.user = (i % 2 == 0).then(|| "batch-user".to_owned());
            assert_eq!(
                store.create(&key, &record, now).await.unwrap(),
                crate::store::CreateOutcome::Created
            );
            if i % 4 == 0 {
                let prolonged = crate::Record {
                    version: 2,
                    idle_deadline: at(3_600),
                    ..record
                };
                assert!(store.replace(&key, 1, &prolonged, now).await.unwrap());
                live.push(key);
            }
        }
        assert_eq!(store.purge_expired(at(30)).await.unwrap(), 12);
        assert_eq!(store.count().await.unwrap(), 4);
        for key in &live {
            assert!(store.load(key, at(30)).await.unwrap().is_some());
        }
        let users_sessions = store.find_by_user("batch-user", at(30)).await.unwrap();
        assert_eq!(users_sessions.len(), live.len());
        assert_eq!(store.purge_expired(at(30)).await.unwrap(), 0);
        assert_eq!(store.purge_expired(at(3_600)).await.unwrap(), 4);
        let users_sessions = store.find_by_user("batch-user", at(3_600)).await.unwrap();
        assert!(users_sessions.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A record that another writer changes before every swap: each load
    /// finds a new version, and every swap loses.
    #[derive(Default)]
    struct AlwaysChanged {
        loads: AtomicUsize,
    }

    impl LoadAndSwap for AlwaysChanged {
        async fn load_record(&self, _: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
            // Like a real round trip, give the runtime a turn (and the test's timeout).
            tokio::task::yield_now().await;
            let loads = self.loads.fetch_add(1, Ordering::Relaxed) as u64;
            let record = Record::new(now, now.saturating_add(Duration::from_secs(60)), None);
            Ok(Some(Record {
                version: 1 + loads,
                ..record
            }))
        }

        async fn swap_record(
            &self,
            _: &SessionKey,
            _: u64,
            _: &Record,
            _: Timestamp,
        ) -> Result<bool> {
            Ok(false)
        }
    }

    #[test]
    fn a_lease_that_keeps_losing_its_swap_reports_the_record_held() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a test runtime starts");
        runtime.block_on(async {
            let table = AlwaysChanged::default();
            let now = Timestamp::from_millis(1_000_000);
            let lease = Lease {
                token: 1,
                until: now.saturating_add(Duration::from_secs(10)),
            };
            let key = crate::SessionId::generate().key();
            let outcome = tokio::time::timeout(
                Duration::from_secs(10),
                lease_by_compare_and_swap(&table, &key, lease, now),
            )
            .await
            .expect("the lease gives up rather than spin")
            .unwrap();
            let LeaseOutcome::Held(latest) = outcome else {
                panic!("expected the record reported held, got {outcome:?}");
            };
            assert_eq!(
                latest.lease, None,
                "nobody holds it: other writers kept changing it"
            );
            assert_eq!(table.loads.load(Ordering::Relaxed), MAX_LEASE_ATTEMPTS + 1);
        });
    }
}
