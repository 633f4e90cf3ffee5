//! [`DirectoryStore`]: one file per session in a directory, the original's
//! directory store with its flaws fixed.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes | yes (`flock`) | yes | purge only | yes |
//!
//! Layout under the root (created with mode 0700 by
//! [`setup`](crate::SessionStore::setup)):
//!
//! ```text
//! ab/.lock                  a lock file per shard
//! ab/ab12…ef                one session; the name is its key's 64 hex digits
//! users/<sha256 of user>/ab12…ef   an empty marker per session of that user
//! ```
//!
//! - File names come only from the hashed key, never from the cookie, so no
//!   client input reaches a path; sessions are spread over 256 shards.
//! - Every write goes to a temporary file in the shard, is fsynced and then
//!   renamed over the old file: a reader sees the old or the new record,
//!   never a torn one, and a crash never leaves a broken session.
//! - Writers take the shard's lock file with `flock`, so compare-and-swap is
//!   atomic across threads and processes on one machine (not across
//!   machines: `flock` over NFS is not to be trusted).
//! - A rename (the id renewal at login) writes the new file, then deletes
//!   the old one at its version (the store contract's default): a reader
//!   in between may find both, and a crash in between leaves both, never
//!   neither. One step would need readers to take the shards' locks.
//! - A file's modification time is set to its record's expiry, so purge
//!   visits only the files whose time has come. It takes each shard's lock
//!   once for a batch of that shard's due files, re-checks each under the
//!   lock and unlinks it; it reads a record only when a user marker may need
//!   removing (decided from the metadata alone while no user has a marker).
//!   Purge works on a few shards at once.
//! - Session files are opened with `O_NOATIME` (when the process owns them),
//!   so a load does not update the access time: reads dirty no inode.
//! - All file I/O runs on tokio's blocking pool, never on a worker thread.
//!
//! ```no_run
//! use session2::{DirectoryStore, SessionManager, SessionStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = DirectoryStore::new("/var/lib/myapp/sessions");
//! store.setup().await?;
//! let manager = SessionManager::new(store);
//! # Ok(()) }
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::store::{Capabilities, CreateOutcome, Page, SessionStore};
use crate::{Error, Record, Result, SessionKey, Timestamp};

const STORE_NAME: &str = "directory";
const LOCK_FILE: &str = ".lock";
const USERS_DIR: &str = "users";
const TEMP_PREFIX: &str = ".tmp-";
/// A temporary file older than this was left by a crash and is removed by purge.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// Purge re-checks and unlinks at most this many due files of one shard per
/// taking of the shard's lock, so writers to the shard never wait for long.
const PURGE_BATCH: usize = 256;
/// The coarsest timestamp a file system may keep (FAT: 2 s): purge trusts a
/// file's modification time as its expiry only when it is this much past.
const MTIME_SLACK: Duration = Duration::from_secs(2);
/// Purge works on this many shards at once, each on the blocking pool.
const PURGE_SHARDS_AT_ONCE: usize = 3;

/// A store keeping one file per session under a root directory.
#[derive(Clone, Debug)]
pub struct DirectoryStore {
    root: Arc<PathBuf>,
}

impl DirectoryStore {
    /// A store rooted at `root`; call [`setup`](SessionStore::setup) once to
    /// create the directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Arc::new(root.into()),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs blocking file work on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        context: &'static str,
        work: impl FnOnce(&Files) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let files = Files {
            root: Arc::clone(&self.root),
        };
        match tokio::task::spawn_blocking(move || work(&files)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(into_error(context, err)),
            Err(join) => Err(Error::backend(
                STORE_NAME,
                format_args!("{context}: {join}"),
            )),
        }
    }
}

/// Undecodable records travel through `io::Error` as `InvalidData` with a
/// [`DecodeFailure`] inside, and come back out as decode errors.
#[derive(Debug)]
struct DecodeFailure(Error);

impl std::fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DecodeFailure {}

fn into_error(context: &str, err: io::Error) -> Error {
    if err
        .get_ref()
        .is_some_and(|inner| inner.is::<DecodeFailure>())
    {
        let inner = err.into_inner().expect("checked above");
        return inner
            .downcast::<DecodeFailure>()
            .map_or_else(Error::decode, |failure| failure.0);
    }
    Error::backend_source(STORE_NAME, context, err)
}

/// The blocking half of the store: paths and file operations.
struct Files {
    root: Arc<PathBuf>,
}

impl Files {
    fn shard_dir(&self, hex: &str) -> PathBuf {
        self.root.join(&hex[..2])
    }

    fn record_path(&self, hex: &str) -> PathBuf {
        self.shard_dir(hex).join(hex)
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        let digest = Sha256::digest(user.as_bytes());
        let hex = SessionKey::from_bytes(digest.into()).to_hex();
        self.root.join(USERS_DIR).join(hex)
    }

    /// Takes the lock of `hex`'s shard for the duration of `work`.
    fn locked<T>(&self, hex: &str, work: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.locked_shard(&hex[..2], work)
    }

    /// Takes the lock of `shard` (two hex digits) for the duration of `work`.
    fn locked_shard<T>(&self, shard: &str, work: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let shard = self.root.join(shard);
        let lock = match open_lock(&shard) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                ensure_private_dir(&self.root, &shard)?;
                open_lock(&shard)?
            }
            other => other?,
        };
        lock.lock()?;
        let result = work();
        lock.unlock()?;
        result
    }

    /// The record at `hex`: `None` if there is no file.
    fn read(&self, hex: &str) -> io::Result<Option<Record>> {
        let mut file = match open_for_reading(&self.record_path(hex)) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let size = file.metadata().map_or(0, |metadata| metadata.len());
        decode(&read_all(&mut file, size)?).map(Some)
    }

    /// Like [`Files::read`], but an undecodable file reads as absent.
    fn read_lenient(&self, hex: &str) -> io::Result<Option<Record>> {
        match self.read(hex) {
            Err(err) if err.kind() == io::ErrorKind::InvalidData => Ok(None),
            other => other,
        }
    }

    /// Writes `record` atomically: a temporary file, fsynced, renamed over
    /// the old one. `durable` also fsyncs the directory so the rename
    /// survives a crash.
    fn write(&self, hex: &str, record: &Record, durable: bool) -> io::Result<()> {
        let shard = self.shard_dir(hex);
        let temp = shard.join(format!("{TEMP_PREFIX}{hex}-{}", std::process::id()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&record.encode())?;
            file.set_modified(record.expires_at().to_system_time())?;
            if durable {
                file.sync_all()?;
            }
            fs::rename(&temp, self.record_path(hex))?;
            if durable {
                File::open(&shard)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn remove(&self, hex: &str, record: Option<&Record>) -> io::Result<()> {
        remove_if_present(&self.record_path(hex))?;
        if let Some(user) = record.and_then(|record| record.user.as_deref()) {
            remove_if_present(&self.user_dir(user).join(hex))?;
        }
        Ok(())
    }

    /// Adds the user marker of `new` and drops the one of `old` if the user changed.
    fn index_user(&self, hex: &str, old: Option<&Record>, new: &Record) -> io::Result<()> {
        let old_user = old.and_then(|record| record.user.as_deref());
        let new_user = new.user.as_deref();
        if let Some(user) = new_user.filter(|user| Some(*user) != old_user) {
            let dir = self.user_dir(user);
            ensure_private_dir(&self.root, &dir)?;
            File::create(dir.join(hex))?;
        }
        if let Some(user) = old_user.filter(|user| Some(*user) != new_user) {
            remove_if_present(&self.user_dir(user).join(hex))?;
        }
        Ok(())
    }

    /// The shard directories, in key order.
    fn shards(&self) -> io::Result<Vec<String>> {
        let entries = fs::read_dir(&*self.root).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                io::ErrorKind::NotFound,
                format!("directory `{}` does not exist; create it with `session2 setup` or `SessionStore::setup`", self.root.display()),
            ),
            _ => err,
        })?;
        let mut shards: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        shards.sort();
        Ok(shards)
    }

    /// The record names in one shard, sorted.
    fn records_in(&self, shard: &str) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = match fs::read_dir(self.root.join(shard)) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| SessionKey::from_hex(name).is_some() && name.starts_with(shard))
                .collect(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err),
        };
        names.sort();
        Ok(names)
    }

    /// Purges one shard: lists it without the lock, noting the files whose
    /// modification time (their expiry) has come, then takes the shard's lock
    /// once per batch of them to re-check and unlink each.
    fn purge_shard(&self, shard: &str, now: Timestamp) -> io::Result<u64> {
        let dir = self.root.join(shard);
        let mut due = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(metadata) = entry.metadata() else {
                continue; // removed meanwhile
            };
            if name.starts_with(TEMP_PREFIX) {
                let age = metadata
                    .modified()
                    .ok()
                    .and_then(|at| SystemTime::now().duration_since(at).ok());
                if age.is_some_and(|age| age > STALE_TEMP_AGE) {
                    remove_if_present(&entry.path())?;
                }
                continue;
            }
            if SessionKey::from_hex(&name).is_none() || !name.starts_with(shard) {
                continue;
            }
            if is_due(&metadata, now) {
                due.push(name);
            }
        }
        let mut purged = 0;
        for batch in due.chunks(PURGE_BATCH) {
            purged += self.locked_shard(shard, || {
                // User markers are only ever added under the lock of their
                // record's shard: while no user has a marker, none can appear
                // for this shard's records, and the metadata decides alone.
                let markers = self.any_user_markers()?;
                let mut purged = 0;
                for name in batch {
                    let removed = if markers {
                        self.purge_reading(&dir, name, now)?
                    } else {
                        self.purge_by_metadata(&dir, name, now)?
                    };
                    purged += u64::from(removed);
                }
                Ok(purged)
            })?;
        }
        Ok(purged)
    }

    /// Whether any user has a marker directory (they are never removed, so
    /// this stays true once a session had a user).
    fn any_user_markers(&self) -> io::Result<bool> {
        match fs::read_dir(self.root.join(USERS_DIR)) {
            Ok(mut entries) => Ok(entries.next().is_some()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Under the shard's lock: unlinks the record `name` if its modification
    /// time (a replace or touch may have renamed a newer file over it) says
    /// it is still due. A corrupt file goes the same way. A file due only
    /// within [`MTIME_SLACK`] is read to decide, so that a file system
    /// keeping coarse timestamps never has a live session purged.
    fn purge_by_metadata(&self, dir: &Path, name: &str, now: Timestamp) -> io::Result<bool> {
        let path = dir.join(name);
        let surely_now = Timestamp::from_millis(
            now.as_millis()
                .saturating_sub(i64::try_from(MTIME_SLACK.as_millis()).unwrap_or(i64::MAX)),
        );
        match fs::symlink_metadata(&path) {
            Ok(metadata) if is_due(&metadata, surely_now) => {
                remove_if_present(&path)?;
                Ok(true)
            }
            Ok(metadata) if is_due(&metadata, now) => self.purge_reading(dir, name, now),
            Ok(_) => Ok(false),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Under the shard's lock: reads the record `name` if its modification
    /// time says it is still due, and removes it with its user marker if it
    /// is expired; an undecodable one is removed too (its marker, if any,
    /// is dropped by the next `find_by_user` of its user).
    fn purge_reading(&self, dir: &Path, name: &str, now: Timestamp) -> io::Result<bool> {
        let mut file = match open_for_reading(&dir.join(name)) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        };
        let metadata = file.metadata()?;
        if !is_due(&metadata, now) {
            return Ok(false);
        }
        match decode(&read_all(&mut file, metadata.len())?) {
            Ok(record) if record.is_expired_at(now) => {
                self.remove(name, Some(&record))?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(session = %&name[..12], "purging an undecodable session file");
                self.remove(name, None)?;
                Ok(true)
            }
            Err(err) => Err(err),
        }
    }
}

/// Whether a record file's modification time, its record's expiry, has come.
fn is_due(metadata: &fs::Metadata, now: Timestamp) -> bool {
    metadata
        .modified()
        .is_ok_and(|at| Timestamp::from_system_time(at) <= now)
}

/// Opens `path` for reading with `O_NOATIME`, so that reading does not
/// update the access time (under `relatime`, the future modification time
/// would make every read write the inode). `O_NOATIME` is refused with
/// `EPERM` on files the process does not own: those are opened plainly.
fn open_for_reading(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => File::open(path),
        other => other,
    }
}

/// Reads the rest of `file`, expecting `size` bytes: usually two `read`s
/// (`File::read_to_end` would first query the size and offset again).
fn read_all(file: &mut File, size: u64) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; usize::try_from(size).unwrap_or(0).saturating_add(1)];
    let mut len = 0;
    loop {
        match file.read(&mut bytes[len..]) {
            Ok(0) => break,
            Ok(read) => len += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
        if len == bytes.len() {
            bytes.resize(len.saturating_mul(2).max(64), 0);
        }
    }
    bytes.truncate(len);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> io::Result<Record> {
    Record::decode(bytes)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, DecodeFailure(err)))
}

fn open_lock(shard: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(shard.join(LOCK_FILE))
}

/// Creates `dir` (and parents up to `root`) with mode 0700; fails if `root`
/// itself is missing, so a store that was never set up says so.
fn ensure_private_dir(root: &Path, dir: &Path) -> io::Result<()> {
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "directory `{}` does not exist; create it with `session2 setup` or `SessionStore::setup`",
                root.display()
            ),
        ));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[async_trait]
impl SessionStore for DirectoryStore {
    fn name(&self) -> &'static str {
        STORE_NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            is_multiprocess_safe: true,
            is_thread_safe: true,
        }
    }

    async fn setup(&self) -> Result<()> {
        self.blocking("create the session directory", |files| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&*files.root)?;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(files.root.join(USERS_DIR))
        })
        .await
    }

    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        let hex = key.to_hex();
        let record = self
            .blocking("load a session", move |files| files.read(&hex))
            .await?;
        Ok(record.filter(|record| !record.is_expired_at(now)))
    }

    async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let hex = key.to_hex();
        let record = record.clone();
        self.blocking("create a session", move |files| {
            files.locked(&hex, || {
                let old = files.read_lenient(&hex)?;
                if old.as_ref().is_some_and(|old| !old.is_expired_at(now)) {
                    return Ok(CreateOutcome::Collision);
                }
                files.index_user(&hex, old.as_ref(), &record)?;
                files.write(&hex, &record, true)?;
                Ok(CreateOutcome::Created)
            })
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
        let hex = key.to_hex();
        let record = record.clone();
        self.blocking("save a session", move |files| {
            files.locked(&hex, || {
                let Some(old) = files.read_lenient(&hex)? else {
                    return Ok(false);
                };
                if old.version != expected_version || old.is_expired_at(now) {
                    return Ok(false);
                }
                files.index_user(&hex, Some(&old), &record)?;
                files.write(&hex, &record, true)?;
                Ok(true)
            })
        })
        .await
    }

    async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool> {
        let hex = key.to_hex();
        self.blocking("delete a session", move |files| {
            files.locked(&hex, || match files.read(&hex) {
                Ok(Some(old)) if expected_version.is_none_or(|version| version == old.version) => {
                    files.remove(&hex, Some(&old))?;
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(err)
                    if err.kind() == io::ErrorKind::InvalidData && expected_version.is_none() =>
                {
                    files.remove(&hex, None)?;
                    Ok(true)
                }
                Err(err) if err.kind() == io::ErrorKind::InvalidData => Ok(false),
                Err(err) => Err(err),
            })
        })
        .await
    }

    async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let hex = key.to_hex();
        self.blocking("touch a session", move |files| {
            files.locked(&hex, || {
                let Some(mut record) = files.read_lenient(&hex)? else {
                    return Ok(false);
                };
                if record.is_expired_at(accessed_at) {
                    return Ok(false);
                }
                record.accessed_at = accessed_at;
                record.idle_deadline = idle_deadline;
                // Losing a touch in a crash only shortens the idle deadline:
                // no directory fsync.
                files.write(&hex, &record, false)?;
                Ok(true)
            })
        })
        .await
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
        // Unlinking waits on the journal: a few shards at a time overlap those waits.
        let mut shards = self
            .blocking("purge expired sessions", |files| files.shards())
            .await?
            .into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut purged = 0;
        loop {
            while running.len() < PURGE_SHARDS_AT_ONCE {
                let Some(shard) = shards.next() else { break };
                let store = self.clone();
                running.spawn(async move {
                    store
                        .blocking("purge expired sessions", move |files| {
                            files.purge_shard(&shard, now)
                        })
                        .await
                });
            }
            match running.join_next().await {
                None => return Ok(purged),
                Some(Ok(result)) => purged += result?,
                Some(Err(join)) => {
                    return Err(Error::backend(
                        STORE_NAME,
                        format_args!("purge expired sessions: {join}"),
                    ));
                }
            }
        }
    }

    async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page> {
        let after = after.map(SessionKey::to_hex);
        self.blocking("list sessions", move |files| {
            let mut records = Vec::new();
            let first_shard = after.as_deref().map_or("", |after| &after[..2]);
            'shards: for shard in files.shards()? {
                if shard.as_str() < first_shard {
                    continue;
                }
                for name in files.records_in(&shard)? {
                    if after.as_deref().is_some_and(|after| name.as_str() <= after) {
                        continue;
                    }
                    if records.len() == limit {
                        break 'shards;
                    }
                    if let Some(record) = files.read_lenient(&name)? {
                        let key = SessionKey::from_hex(&name).expect("filtered to valid keys");
                        records.push((key, record));
                    }
                }
            }
            let full = records.len() == limit;
            let next = if full {
                records.last().map(|(key, _)| *key)
            } else {
                None
            };
            Ok(Page { records, next })
        })
        .await
    }

    async fn count(&self) -> Result<u64> {
        self.blocking("count sessions", |files| {
            let mut count = 0;
            for shard in files.shards()? {
                count += files.records_in(&shard)?.len() as u64;
            }
            Ok(count)
        })
        .await
    }

    async fn find_by_user(&self, user: &str, now: Timestamp) -> Result<Vec<(SessionKey, Record)>> {
        let user = user.to_owned();
        self.blocking("find a user's sessions", move |files| {
            let dir = files.user_dir(&user);
            let names: Vec<String> = match fs::read_dir(&dir) {
                Ok(entries) => entries
                    .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                    .filter(|name| SessionKey::from_hex(name).is_some())
                    .collect(),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(err) => return Err(err),
            };
            let mut found = Vec::new();
            for name in names {
                match files.read_lenient(&name)? {
                    Some(record) if record.user.as_deref() == Some(user.as_str()) => {
                        if !record.is_expired_at(now) {
                            found.push((SessionKey::from_hex(&name).expect("filtered"), record));
                        }
                    }
                    // A marker left by a crash or a purge race: drop it.
                    _ => remove_if_present(&dir.join(&name))?,
                }
            }
            found.sort_by_key(|(key, _)| *key);
            Ok(found)
        })
        .await
    }
}
