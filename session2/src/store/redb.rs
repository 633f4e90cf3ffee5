//! [`RedbStore`]: sessions in one redb database file, for a single-process application.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes: crash-safe transactions | no: one process holds the file | yes | no: purge, proportional to what expired | yes: one write transaction |
//!
//! See [`RedbStore`] for when to use it, its tables and file locking.
//!
//! ```no_run
//! use session2::{SessionManager, store::RedbStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = RedbStore::open("sessions.redb").await?;
//! let manager = SessionManager::new(store);
//! # let _ = manager;
//! # Ok(()) }
//! ```

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use crate::store::{Capabilities, CreateOutcome, Page, SessionStore};
use crate::{Error, Record, Result, SessionKey, Timestamp};

const STORE: &str = "redb";

const RECORDS: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("session2_records");
const BY_EXPIRY: TableDefinition<'static, (i64, &[u8]), ()> =
    TableDefinition::new("session2_by_expiry");
const BY_USER: TableDefinition<'static, (&str, &[u8]), ()> =
    TableDefinition::new("session2_by_user");

/// Expired sessions one purge transaction deletes.
const PURGE_BATCH: usize = 1_000;
/// Sorts after every 32-byte key in a tuple index.
const AFTER_ALL_KEYS: &[u8] = &[0xff; 33];

/// A store in one redb database file; clones share the open database.
///
/// | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
/// |---|---|---|---|---|
/// | yes: crash-safe transactions | no: one process holds the file | yes | no: purge, proportional to what expired | yes: one write transaction |
///
/// Use it for an application that runs as one process and wants its sessions
/// to survive restarts without running a database server. The file is locked
/// while a store holds it: opening it a second time (from another process,
/// or another store in the same process) fails at once with an error saying
/// the file is in use, rather than waiting or corrupting it.
///
/// Three tables: the records (key bytes → [`Record::encode`]), an expiry
/// index ((expires at, key) → ()) that makes
/// [`purge_expired`](SessionStore::purge_expired) cost what expired, and a
/// user index ((user, key) → ()) for
/// [`find_by_user`](SessionStore::find_by_user). Every write is one write
/// transaction, so compare-and-swap and create are atomic; redb calls run on
/// tokio's blocking threads.
#[cfg_attr(docsrs, doc(cfg(feature = "redb")))]
#[derive(Clone, Debug)]
pub struct RedbStore {
    database: Arc<Database>,
    path: Arc<PathBuf>,
}

impl RedbStore {
    /// Opens the database at `path`, creating the file and its tables if
    /// they do not exist.
    ///
    /// Fails at once with a backend error if another process (or another
    /// store in this process) has the file open, and with a backend error if
    /// the file is not a redb database or cannot be read.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let opened_path = path.clone();
        let database = tokio::task::spawn_blocking(move || -> Result<Database> {
            let database = Database::create(&opened_path).map_err(|err| match err {
                DatabaseError::DatabaseAlreadyOpen => Error::backend_source(
                    STORE,
                    &format!(
                        "open `{}`: another process (or another store in this process) is using the database file",
                        opened_path.display()
                    ),
                    err,
                ),
                other => Error::backend_source(
                    STORE,
                    &format!("open `{}`", opened_path.display()),
                    other,
                ),
            })?;
            create_tables(&database).map_err(|err| {
                Error::backend_source(STORE, "create the session tables", err)
            })?;
            Ok(database)
        })
        .await
        .map_err(|err| Error::backend_source(STORE, "open the database", err))??;
        Ok(Self {
            database: Arc::new(database),
            path: Arc::new(path),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a blocking thread with the database.
    async fn blocking<T, F>(&self, context: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        let database = Arc::clone(&self.database);
        tokio::task::spawn_blocking(move || work(&database))
            .await
            .map_err(|err| Error::backend_source(STORE, context, err))?
            .map_err(|err| Error::backend_source(STORE, context, err))
    }
}

fn create_tables(database: &Database) -> Result<(), redb::Error> {
    let transaction = database.begin_write()?;
    transaction.open_table(RECORDS)?;
    transaction.open_table(BY_EXPIRY)?;
    transaction.open_table(BY_USER)?;
    transaction.commit()?;
    Ok(())
}

/// The stored record under `key`: `None` when missing, `Some(Err)` when it
/// cannot be decoded.
fn stored(
    transaction: &WriteTransaction,
    key: &SessionKey,
) -> Result<Option<Result<Record>>, redb::Error> {
    let records = transaction.open_table(RECORDS)?;
    let value = records.get(key.as_bytes().as_slice())?;
    Ok(value.map(|bytes| Record::decode(bytes.value())))
}

/// Writes `record` and its index entries, replacing `old` (the record
/// stored before, if it could be decoded).
fn put(
    transaction: &WriteTransaction,
    key: &SessionKey,
    old: Option<&Record>,
    record: &Record,
) -> Result<(), redb::Error> {
    if let Some(old) = old {
        unindex(transaction, key, old)?;
    }
    let key_bytes = key.as_bytes().as_slice();
    transaction
        .open_table(RECORDS)?
        .insert(key_bytes, record.encode().as_slice())?;
    transaction
        .open_table(BY_EXPIRY)?
        .insert((record.expires_at().as_millis(), key_bytes), ())?;
    if let Some(user) = &record.user {
        transaction
            .open_table(BY_USER)?
            .insert((user.as_str(), key_bytes), ())?;
    }
    Ok(())
}

fn unindex(
    transaction: &WriteTransaction,
    key: &SessionKey,
    old: &Record,
) -> Result<(), redb::Error> {
    let key_bytes = key.as_bytes().as_slice();
    transaction
        .open_table(BY_EXPIRY)?
        .remove((old.expires_at().as_millis(), key_bytes))?;
    if let Some(user) = &old.user {
        transaction
            .open_table(BY_USER)?
            .remove((user.as_str(), key_bytes))?;
    }
    Ok(())
}

/// Deletes the record under `key` and the index entries of `old`.
fn remove(
    transaction: &WriteTransaction,
    key: &SessionKey,
    old: Option<&Record>,
) -> Result<(), redb::Error> {
    transaction
        .open_table(RECORDS)?
        .remove(key.as_bytes().as_slice())?;
    if let Some(old) = old {
        unindex(transaction, key, old)?;
    }
    Ok(())
}

fn key_from(bytes: &[u8]) -> Option<SessionKey> {
    <[u8; 32]>::try_from(bytes).ok().map(SessionKey::from_bytes)
}

/// One purge transaction: deletes up to [`PURGE_BATCH`] records due at
/// `now`; returns (deleted, index entries examined).
fn purge_batch(database: &Database, now: Timestamp) -> Result<(u64, usize), redb::Error> {
    let transaction = database.begin_write()?;
    let due: Vec<(i64, Vec<u8>)> = {
        let by_expiry = transaction.open_table(BY_EXPIRY)?;
        let upper = (now.as_millis(), AFTER_ALL_KEYS);
        let mut due = Vec::new();
        for entry in by_expiry.range::<(i64, &[u8])>(..=upper)?.take(PURGE_BATCH) {
            let (index_key, _) = entry?;
            let (expires_at, key_bytes) = index_key.value();
            due.push((expires_at, key_bytes.to_vec()));
        }
        due
    };
    let examined = due.len();
    let mut deleted = 0;
    for (expires_at, key_bytes) in due {
        transaction
            .open_table(BY_EXPIRY)?
            .remove((expires_at, key_bytes.as_slice()))?;
        // An entry of another length was not written by this store: just dropped.
        let Some(key) = key_from(&key_bytes) else {
            continue;
        };
        match stored(&transaction, &key)? {
            None => {}
            Some(Err(_)) => {
                remove(&transaction, &key, None)?;
                deleted += 1;
            }
            Some(Ok(record)) if record.is_expired_at(now) => {
                remove(&transaction, &key, Some(&record))?;
                deleted += 1;
            }
            // A stale entry: the record moved on and has its own entry.
            Some(Ok(_)) => {}
        }
    }
    transaction.commit()?;
    Ok((deleted, examined))
}

#[async_trait]
impl SessionStore for RedbStore {
    fn name(&self) -> &'static str {
        STORE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            is_multiprocess_safe: false,
            is_thread_safe: true,
        }
    }

    async fn setup(&self) -> Result<()> {
        self.blocking("create the session tables", create_tables)
            .await
    }

    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        let key = *key;
        let bytes = self
            .blocking("load session", move |database| {
                let transaction = database.begin_read()?;
                let records = transaction.open_table(RECORDS)?;
                let value = records.get(key.as_bytes().as_slice())?;
                Ok(value.map(|bytes| bytes.value().to_vec()))
            })
            .await?;
        match bytes {
            None => Ok(None),
            Some(bytes) => {
                let record = Record::decode(&bytes)?;
                Ok((!record.is_expired_at(now)).then_some(record))
            }
        }
    }

    async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let key = *key;
        let record = record.clone();
        self.blocking("create session", move |database| {
            let transaction = database.begin_write()?;
            let old = match stored(&transaction, &key)? {
                Some(Ok(old)) if !old.is_expired_at(now) => return Ok(CreateOutcome::Collision),
                Some(Ok(old)) => Some(old),
                Some(Err(_)) | None => None,
            };
            put(&transaction, &key, old.as_ref(), &record)?;
            transaction.commit()?;
            Ok(CreateOutcome::Created)
        })
        .await
    }

    async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let key = *key;
        let record = record.clone();
        self.blocking("replace session", move |database| {
            let transaction = database.begin_write()?;
            let Some(Ok(old)) = stored(&transaction, &key)? else {
                return Ok(false);
            };
            if old.is_expired_at(now) || old.version != expected_version {
                return Ok(false);
            }
            put(&transaction, &key, Some(&old), &record)?;
            transaction.commit()?;
            Ok(true)
        })
        .await
    }

    async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool> {
        let key = *key;
        self.blocking("delete session", move |database| {
            let transaction = database.begin_write()?;
            let old = match (stored(&transaction, &key)?, expected_version) {
                (None, _) => return Ok(false),
                (Some(Ok(old)), Some(version)) if old.version != version => return Ok(false),
                (Some(Err(_)), Some(_)) => return Ok(false),
                (Some(old), _) => old.ok(),
            };
            remove(&transaction, &key, old.as_ref())?;
            transaction.commit()?;
            Ok(true)
        })
        .await
    }

    /// In one write transaction: at every moment the session is under
    /// exactly one key.
    async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        if key == new_key {
            return Ok(false);
        }
        let (key, new_key) = (*key, *new_key);
        let record = record.clone();
        self.blocking("rename session", move |database| {
            let transaction = database.begin_write()?;
            let Some(Ok(old)) = stored(&transaction, &key)? else {
                return Ok(false);
            };
            // What `create` would replace under the new key: an expired
            // record, or one that cannot be read.
            let displaced = match stored(&transaction, &new_key)? {
                Some(Ok(held)) if !held.is_expired_at(now) => return Ok(false),
                Some(Ok(held)) => Some(held),
                Some(Err(_)) | None => None,
            };
            if old.version != expected_version {
                return Ok(false);
            }
            remove(&transaction, &key, Some(&old))?;
            put(&transaction, &new_key, displaced.as_ref(), &record)?;
            transaction.commit()?;
            Ok(true)
        })
        .await
    }

    async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let key = *key;
        self.blocking("touch session", move |database| {
            let transaction = database.begin_write()?;
            let Some(Ok(old)) = stored(&transaction, &key)? else {
                return Ok(false);
            };
            if old.is_expired_at(accessed_at) {
                return Ok(false);
            }
            let mut touched = old.clone();
            touched.accessed_at = accessed_at;
            touched.idle_deadline = idle_deadline;
            put(&transaction, &key, Some(&old), &touched)?;
            transaction.commit()?;
            Ok(true)
        })
        .await
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
        let mut purged = 0;
        loop {
            let (deleted, examined) = self
                .blocking("purge expired sessions", move |database| {
                    purge_batch(database, now)
                })
                .await?;
            purged += deleted;
            if examined < PURGE_BATCH {
                return Ok(purged);
            }
        }
    }

    async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page> {
        let after = after.copied();
        let mut entries = self
            .blocking("list sessions", move |database| {
                let transaction = database.begin_read()?;
                let records = transaction.open_table(RECORDS)?;
                let start = after.as_ref().map(|key| key.as_bytes().as_slice());
                let lower = start.map_or(Bound::Unbounded, Bound::Excluded);
                let mut entries = Vec::new();
                for entry in records
                    .range::<&[u8]>((lower, Bound::Unbounded))?
                    .take(limit.saturating_add(1))
                {
                    let (key, value) = entry?;
                    if let Some(key) = key_from(key.value()) {
                        entries.push((key, Record::decode(value.value()).ok()));
                    }
                }
                Ok(entries)
            })
            .await?;
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|(key, _)| *key)
        } else {
            None
        };
        let records = entries
            .into_iter()
            .filter_map(|(key, record)| record.map(|record| (key, record)))
            .collect();
        Ok(Page { records, next })
    }

    async fn count(&self) -> Result<u64> {
        self.blocking("count sessions", |database| {
            let transaction = database.begin_read()?;
            Ok(transaction.open_table(RECORDS)?.len()?)
        })
        .await
    }

    async fn find_by_user(&self, user: &str, now: Timestamp) -> Result<Vec<(SessionKey, Record)>> {
        let user = user.to_owned();
        self.blocking("find sessions by user", move |database| {
            let transaction = database.begin_read()?;
            let by_user = transaction.open_table(BY_USER)?;
            let records = transaction.open_table(RECORDS)?;
            let lower: (&str, &[u8]) = (user.as_str(), &[]);
            let upper: (&str, &[u8]) = (user.as_str(), AFTER_ALL_KEYS);
            let mut found = Vec::new();
            for entry in by_user.range(lower..=upper)? {
                let (index_key, _) = entry?;
                let Some(key) = key_from(index_key.value().1) else {
                    continue;
                };
                let Some(value) = records.get(key.as_bytes().as_slice())? else {
                    continue;
                };
                if let Ok(record) = Record::decode(value.value())
                    && record.user.as_deref() == Some(user.as_str())
                    && !record.is_expired_at(now)
                {
                    found.push((key, record));
                }
            }
            Ok(found)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn corrupt_record_is_a_decode_error_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).await.unwrap();
        let key = SessionKey::from_bytes([3; 32]);
        let now = Timestamp::from_millis(1_000);
        let record = Record::new(now, Timestamp::from_millis(2_000), None);
        assert_eq!(
            store.create(&key, &record, now).await.unwrap(),
            CreateOutcome::Created
        );
        {
            let transaction = store.database.begin_write().unwrap();
            transaction
                .open_table(RECORDS)
                .unwrap()
                .insert(key.as_bytes().as_slice(), b"\xff garbage".as_slice())
                .unwrap();
            transaction.commit().unwrap();
        }
        assert!(store.load(&key, now).await.unwrap_err().is_decode());
        assert_eq!(store.list(None, 10).await.unwrap().records, vec![]);
        assert_eq!(store.count().await.unwrap(), 1);
        assert_eq!(
            store
                .purge_expired(Timestamp::from_millis(2_000))
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_held_file_fails_to_open_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = RedbStore::open(&path).await.unwrap();
        let err = RedbStore::open(&path).await.unwrap_err();
        assert!(err.is_backend());
        assert!(err.to_string().contains("another process"), "{err}");
    }
}
