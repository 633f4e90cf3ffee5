//! [`SessionManager`]: the request lifecycle, independent of any web framework.
//!
//! One request goes through three steps:
//!
//! 1. [`SessionManager::start`] takes the request's `Cookie` header and
//!    returns a [`RequestSession`]. Nothing is read yet.
//! 2. The handler asks for [`RequestSession::session`] (merging) or
//!    [`RequestSession::exclusive_session`] (locked); only then is the store
//!    read, once per request. A handler that never asks costs nothing.
//! 3. [`RequestSession::finish`] takes the response's outcome and returns the
//!    `Set-Cookie` value to send, if any. A successful response saves what
//!    changed; a failed one (5xx or panic) saves nothing.
//!
//! The guarantees built here, once for every store:
//!
//! - **No lost updates.** A save applies only this request's changes (keys
//!   set or removed, user set or cleared) by compare-and-swap on the stored
//!   version; on a conflict it reloads and reapplies them. An exclusive
//!   session also holds a lease in the record, taken and released by
//!   compare-and-swap, so read-modify-write handlers run one at a time
//!   across threads, processes and machines. A lease expires on its own if
//!   its holder dies.
//! - **No resurrection.** Compare-and-swap never recreates a record, so a
//!   logout wins over a slow concurrent request.
//! - **Strict ids.** An unknown, expired, corrupt or malformed id yields a
//!   fresh session with a new id; the client's id is never adopted.
//! - **Expiry** is checked on every load against both the record's deadlines
//!   and the current configuration, whatever the store does.
//! - **Id renewal**: [`Session::set_user`] or [`Session::cycle_id`] moves the
//!   session to a new id at save, and the old id stops working.
//!
//! ```
//! use session2::{MemoryStore, Outcome, SessionManager};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let manager = SessionManager::new(MemoryStore::new());
//!
//! // First request: no cookie; the handler stores a value.
//! let request = manager.start(None);
//! request.session().await?.insert("counter", 1)?;
//! let set_cookie = request.finish(Outcome::Success).await?.expect("a new session sets a cookie");
//!
//! // Second request: the browser sends the cookie back.
//! let cookie = set_cookie.split(';').next().unwrap();
//! let request = manager.start(Some(cookie));
//! assert_eq!(request.session().await?.get::<i32>("counter")?, Some(1));
//! # Ok::<_, session2::Error>(()) }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use crate::record::{DataMap, decode_data, encode_data};
use crate::session::{SessionState, Stored, data_size};
use crate::store::{CreateOutcome, LeaseOutcome, MAX_LEASE_ATTEMPTS};
use crate::util::key_locks::KeyLocks;
use crate::{
    Clock, CookieLifetime, Error, Lease, Record, Result, SameSite, Session, SessionConfig,
    SessionId, SessionKey, SessionStore, SystemClock, Timestamp,
};

/// How often a save retries after losing a compare-and-swap before giving up.
const MAX_SAVE_ATTEMPTS: u32 = 1_000;

/// Owns the store, the configuration and the clock; cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SessionStore>,
    config: SessionConfig,
    cookie_name: String,
    clock: Arc<dyn Clock>,
    /// Exclusive requests of one session queue here; each may pass its
    /// lease to the next (see `Handoff`).
    local_locks: Arc<KeyLocks<LocalTurn>>,
    /// Plain saves that lost a compare-and-swap wait here to be written
    /// together (see `SessionManager::write_batches`).
    save_batches: Arc<KeyLocks<Batch>>,
}

impl fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionManager")
            .field("store", &self.inner.store.name())
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Whether the response succeeded, which decides whether anything is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Any response but a 5xx: changes are saved.
    Success,
    /// A 5xx response or a panic: nothing is saved and no cookie is sent.
    Failure,
}

impl Outcome {
    /// `Failure` for a 5xx status, `Success` for any other.
    pub fn from_status(status: u16) -> Self {
        if (500..600).contains(&status) {
            Self::Failure
        } else {
            Self::Success
        }
    }
}

impl SessionManager {
    /// A manager over `store` with the default [`SessionConfig`].
    pub fn new(store: impl SessionStore) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A manager over a shared store, as returned by [`crate::store::open`].
    pub fn from_arc(store: Arc<dyn SessionStore>) -> Self {
        let config = SessionConfig::default();
        Self {
            inner: Arc::new(Inner {
                cookie_name: config.cookie_name(),
                store,
                config,
                clock: Arc::new(SystemClock),
                local_locks: Arc::default(),
                save_batches: Arc::default(),
            }),
        }
    }

    /// Replaces the configuration.
    ///
    /// # Errors
    ///
    /// A config error if [`SessionConfig::validate`] refuses it.
    pub fn with_config(self, config: SessionConfig) -> Result<Self> {
        config.validate()?;
        Ok(self.rebuild(|inner| {
            inner.cookie_name = config.cookie_name();
            inner.config = config;
        }))
    }

    /// Replaces the clock (tests move a [`ManualClock`](crate::ManualClock)).
    #[must_use]
    pub fn with_clock(self, clock: impl Clock) -> Self {
        self.rebuild(|inner| inner.clock = Arc::new(clock))
    }

    fn rebuild(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            store: Arc::clone(&self.inner.store),
            config: self.inner.config.clone(),
            cookie_name: self.inner.cookie_name.clone(),
            clock: Arc::clone(&self.inner.clock),
            local_locks: Arc::clone(&self.inner.local_locks),
            save_batches: Arc::clone(&self.inner.save_batches),
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The current time on the manager's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Begins a request from the value of its `Cookie` header, if any. Reads
    /// nothing from the store.
    pub fn start(&self, cookie_header: Option<&str>) -> RequestSession {
        self.request(self.incoming_id(cookie_header.into_iter()))
    }

    /// Like [`SessionManager::start`], for a request with several `Cookie` headers.
    pub fn start_from_headers<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a str>,
    ) -> RequestSession {
        self.request(self.incoming_id(cookie_headers))
    }

    fn request(&self, incoming: Incoming) -> RequestSession {
        RequestSession {
            manager: self.clone(),
            incoming,
            loaded: tokio::sync::OnceCell::new(),
            local_guard: std::sync::Mutex::new(None),
            finished: AtomicBool::new(false),
        }
    }

    /// Writes the batch of saves of the session `key`, and the saves that
    /// gather meanwhile, until none waits: each round merges every waiting
    /// save's changes, in order, onto the record the round before wrote
    /// (else a fresh load) and writes them by one compare-and-swap.
    async fn write_batches(&self, key: &SessionKey, batch: &tokio::sync::Mutex<Batch>) {
        let mut written = None;
        let mut backoff = Backoff::new(u64::from_le_bytes(
            key.as_bytes()[..8].try_into().expect("8 bytes"),
        ));
        let mut writer = Writer(Some(batch));
        loop {
            let saves = {
                let mut waiting = batch.lock().await;
                if waiting.saves.is_empty() {
                    waiting.writing = false;
                    writer.0 = None;
                    return;
                }
                std::mem::take(&mut waiting.saves)
            };
            let (mut changes, outcomes): (Vec<_>, Vec<_>) = saves.into_iter().unzip();
            let mut refused = Vec::new();
            let result = self
                .write_batch(key, &mut written, &mut changes, &mut refused, &mut backoff)
                .await;
            let mut refused = refused.into_iter().peekable();
            for (index, outcome) in outcomes.into_iter().enumerate() {
                let answer = match (refused.next_if(|(at, _)| *at == index), &result) {
                    (Some((_, too_large)), _) => Err(too_large.context("failed to save session")),
                    (None, Ok(done)) => Ok(*done),
                    (None, Err(err)) => Err(err.duplicate()),
                };
                // A request that went away no longer waits for its outcome.
                let _ = outcome.send(answer);
            }
        }
    }

    /// One round of `write_batches`: `written` is the record the round
    /// before wrote, if any, and becomes the one this round writes;
    /// `refused` gets the changes that would make the session too large
    /// (see [`apply_within_limit`](Self::apply_within_limit)), in order.
    async fn write_batch(
        &self,
        key: &SessionKey,
        written: &mut Option<Record>,
        changes: &mut [ChangeSet],
        refused: &mut Vec<(usize, Error)>,
        backoff: &mut Backoff,
    ) -> Result<Written> {
        let store = &self.inner.store;
        let save_failed = |err: Error| err.context("failed to save session");
        let now = self.now();
        let mut base = written.take();
        for attempt in 0..MAX_SAVE_ATTEMPTS {
            let current = match base.take().filter(|record| !self.is_expired(record, now)) {
                Some(record) => record,
                None => match store.load(key, now).await {
                    Ok(Some(latest)) if !self.is_expired(&latest, now) => latest,
                    Ok(_) => return Ok(Written::Dropped),
                    Err(err) if err.is_decode() => return Ok(Written::Dropped),
                    Err(err) => return Err(save_failed(err)),
                },
            };
            let merged = match self.apply_within_limit(&current, changes, now) {
                Ok((merged, now_refused)) => {
                    refused.extend(now_refused);
                    refused.sort_by_key(|(index, _)| *index);
                    if refused.len() == changes.len() {
                        // Every save of the round refused: nothing to write.
                        return Ok(Written::Dropped);
                    }
                    merged
                }
                Err(err) => {
                    tracing::warn!(session = %key.fingerprint(), error = %err, "session changed into unreadable data; changes dropped");
                    return Ok(Written::Dropped);
                }
            };
            if let Some(done) = self.write_over(key, current.version, &merged, now).await? {
                if let Written::Saved(_) = done {
                    *written = Some(merged);
                }
                return Ok(done);
            }
            // Another process wrote: reload, at once the first time.
            if attempt > 0 {
                Box::pin(backoff.wait()).await;
            }
        }
        Err(too_many_writers(store.name()))
    }

    /// Writes `merged` over version `expected` of the session `key` by
    /// compare-and-swap, or deletes the session when nothing is left in
    /// it (as if never stored); `None` when another write came first.
    async fn write_over(
        &self,
        key: &SessionKey,
        expected: u64,
        merged: &Record,
        now: Timestamp,
    ) -> Result<Option<Written>> {
        let store = &self.inner.store;
        let save_failed = |err: Error| err.context("failed to save session");
        if !has_info(merged) {
            let deleted = store
                .delete(key, Some(expected))
                .await
                .map_err(save_failed)?;
            return Ok(deleted.then_some(Written::Deleted));
        }
        let replaced = store
            .replace(key, expected, merged, now)
            .await
            .map_err(save_failed)?;
        Ok(replaced.then(|| Written::Saved(merged.expires_at())))
    }

    /// The record that results from applying `changes`, in order, onto
    /// `base`, one version higher. A lone change set's first call takes
    /// its `encoded_on`, a shortcut for the version its request loaded;
    /// any other merges onto `base` key by key, which is right for any
    /// version.
    fn apply(&self, base: &Record, changes: &mut [ChangeSet], now: Timestamp) -> Result<Record> {
        let config = &self.inner.config;
        let encoded_on = match changes {
            [only] => only.encoded_on.take(),
            _ => None,
        };
        let data = match encoded_on {
            _ if changes.iter().all(|changes| changes.data.is_empty()) => base.data.clone(),
            Some((version, encoded)) if version == base.version => encoded,
            _ => {
                let mut data = decode_data(&base.data)?;
                for changes in changes.iter() {
                    changes.apply_to(&mut data);
                }
                encode_data(&data)
            }
        };
        let mut merged = Record {
            version: base.version + 1,
            user: base.user.clone(),
            created_at: base.created_at,
            accessed_at: now,
            idle_deadline: now.saturating_add(config.idle_timeout),
            absolute_deadline: base.absolute_deadline,
            lease: base.lease,
            data,
        };
        for user in changes.iter().filter_map(|changes| changes.user.as_ref()) {
            merged.user.clone_from(user);
        }
        if let Some((lease, changes)) = merged.lease.and_then(|lease| {
            let holder = changes
                .iter()
                .find(|changes| changes.lease_token == Some(lease.token))?;
            Some((lease, holder))
        }) {
            merged.lease = changes.hand_off.then(|| Lease {
                token: lease.token,
                until: now.saturating_add(config.lease_duration),
            });
        }
        Ok(merged)
    }

    /// [`apply`](Self::apply), refusing each change set that would grow
    /// the session past the size limit, as an insert would have been
    /// refused: concurrent requests can each fit and together not. A
    /// refused set becomes one that changes nothing (so it stays refused
    /// if the merge runs again), and comes back with its error, by its
    /// index; the others apply in order.
    fn apply_within_limit(
        &self,
        base: &Record,
        changes: &mut [ChangeSet],
        now: Timestamp,
    ) -> Result<(Record, Vec<(usize, Error)>)> {
        let limit = self.inner.config.max_session_size;
        let merged = self.apply(base, changes, now)?;
        // An insert counts at most one byte more than the encoding (see
        // `data_size`), so data that short fits for sure.
        if merged.data.len() < limit {
            return Ok((merged, Vec::new()));
        }
        let mut data = decode_data(&base.data)?;
        let mut size = data_size(&data);
        let mut refused = Vec::new();
        for (index, set) in changes.iter_mut().enumerate() {
            let mut tried = data.clone();
            set.apply_to(&mut tried);
            let tried_size = data_size(&tried);
            // A set that shrinks a session already too large still applies.
            if tried_size > limit && tried_size > size {
                refused.push((index, Error::too_large(tried_size, limit)));
                *set = ChangeSet::default();
            } else {
                (data, size) = (tried, tried_size);
            }
        }
        if refused.is_empty() {
            return Ok((merged, refused));
        }
        Ok((self.apply(base, changes, now)?, refused))
    }

    /// Whether a session last accessed at `accessed_at` is to be touched
    /// at `now`: touches are spaced by the touch interval, so that reads do
    /// not write.
    fn touch_due(&self, accessed_at: Timestamp, now: Timestamp) -> bool {
        now.duration_since(accessed_at) >= self.inner.config.touch_interval
    }

    /// Releases the lease `token` holds on `key`, if it still does, without
    /// changing anything else but the version.
    async fn release_lease(&self, key: &SessionKey, token: u64) -> Result<()> {
        let store = &self.inner.store;
        // Plain saves keep the lease they find, so while they come the swap
        // can keep losing: after as many tries as a lease makes, the lease
        // is left to expire.
        for _ in 0..MAX_LEASE_ATTEMPTS {
            let now = self.now();
            let record = match store.load(key, now).await {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(()),
                Err(err) if err.is_decode() => return Ok(()),
                Err(err) => return Err(err.context("failed to release the session's lease")),
            };
            if record.lease.is_none_or(|lease| lease.token != token) {
                return Ok(());
            }
            let mut released = record.clone();
            released.lease = None;
            released.version = record.version + 1;
            if store.replace(key, record.version, &released, now).await? {
                return Ok(());
            }
        }
        tracing::warn!(session = %key.fingerprint(), "gave up releasing a lease that other writers kept changing; it expires on its own");
        Ok(())
    }

    fn incoming_id<'a>(&self, headers: impl Iterator<Item = &'a str>) -> Incoming {
        let mut incoming = Incoming::Absent;
        let values = headers
            .flat_map(|header| header.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == self.inner.cookie_name)
            .map(|(_, value)| value.trim_matches('"'));
        for value in values {
            match SessionId::parse(value) {
                Some(id) => return Incoming::Id(id),
                None => incoming = Incoming::Malformed,
            }
        }
        incoming
    }

    /// The sessions of `user` that are live now, for a "your devices" page.
    ///
    /// # Errors
    ///
    /// A backend error if the store fails.
    pub async fn sessions_of_user(&self, user: &str) -> Result<Vec<(SessionKey, Record)>> {
        self.inner.store.find_by_user(user, self.now()).await
    }

    /// Deletes every session of `user` ("log out everywhere"); returns how
    /// many it deleted.
    ///
    /// # Errors
    ///
    /// A backend error if the store fails; sessions deleted before the
    /// failure stay deleted.
    pub async fn delete_user_sessions(&self, user: &str) -> Result<u64> {
        let mut deleted = 0;
        for (key, _) in self.sessions_of_user(user).await? {
            if self.inner.store.delete(&key, None).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes one session by its key, as an admin page or a "log out that
    /// device" button does; returns whether it existed.
    ///
    /// # Errors
    ///
    /// A backend error if the store fails.
    pub async fn delete_session(&self, key: &SessionKey) -> Result<bool> {
        self.inner.store.delete(key, None).await
    }

    /// Deletes the sessions expired now; returns how many.
    ///
    /// # Errors
    ///
    /// A backend error if the store fails.
    pub async fn purge_expired(&self) -> Result<u64> {
        self.inner.store.purge_expired(self.now()).await
    }

    /// Starts a background task that purges expired sessions every
    /// `interval`, for stores without server-side expiry. It runs until the
    /// returned handle is aborted or the runtime shuts down; a failed purge
    /// is logged and retried at the next tick.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let manager = session2::SessionManager::new(session2::MemoryStore::new());
    /// let reaper = manager.spawn_reaper(std::time::Duration::from_secs(60));
    /// reaper.abort();
    /// # });
    /// ```
    pub fn spawn_reaper(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match manager.purge_expired().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::debug!(purged, "reaper purged expired sessions"),
                    Err(err) => {
                        tracing::warn!(error = %err, "reaper failed to purge expired sessions")
                    }
                }
            }
        })
    }

    /// Whether `record` is expired at `now` by its own deadlines or by the
    /// current configuration (which may be stricter than when it was written).
    fn is_expired(&self, record: &Record, now: Timestamp) -> bool {
        let config = &self.inner.config;
        record.is_expired_at(now)
            || record.accessed_at.saturating_add(config.idle_timeout) <= now
            || config
                .absolute_timeout
                .is_some_and(|timeout| record.created_at.saturating_add(timeout) <= now)
    }

    /// Loads the live record under `key`; `None` when missing, expired or corrupt.
    async fn load_live(
        &self,
        key: &SessionKey,
        now: Timestamp,
    ) -> Result<Option<(Record, DataMap)>> {
        let record = match self.inner.store.load(key, now).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(err) if err.is_decode() => {
                tracing::warn!(session = %key.fingerprint(), error = %err, "corrupt session record treated as absent");
                return Ok(None);
            }
            Err(err) => return Err(err.context("failed to load session")),
        };
        Ok(self.live_data(key, &record, now).map(|data| (record, data)))
    }

    /// The data of `record` if it is live by this manager's settings and readable.
    fn live_data(&self, key: &SessionKey, record: &Record, now: Timestamp) -> Option<DataMap> {
        if self.is_expired(record, now) {
            return None;
        }
        decode_data(&record.data)
            .inspect_err(|err| {
                tracing::warn!(session = %key.fingerprint(), error = %err, "corrupt session data treated as absent");
            })
            .ok()
    }

    fn fresh_state(&self) -> SessionState {
        SessionState::fresh(self.now(), self.inner.config.max_session_size)
    }

    fn new_record(&self, now: Timestamp) -> Record {
        let config = &self.inner.config;
        Record::new(
            now,
            now.saturating_add(config.idle_timeout),
            config
                .absolute_timeout
                .map(|timeout| now.saturating_add(timeout)),
        )
    }

    fn cookie(&self, id: &SessionId, expires_at: Option<Timestamp>, now: Timestamp) -> String {
        let mut cookie = self.cookie_base(id.to_string());
        if let (CookieLifetime::Persistent, Some(expires_at)) =
            (self.inner.config.lifetime, expires_at)
        {
            let seconds = expires_at.duration_since(now).as_secs();
            cookie.set_max_age(cookie::time::Duration::seconds(
                i64::try_from(seconds).unwrap_or(i64::MAX),
            ));
        }
        cookie.to_string()
    }

    /// A cookie that makes the browser drop the session cookie: the same
    /// name, path, domain and flags, `Max-Age=0`.
    fn revocation_cookie(&self) -> String {
        let mut cookie = self.cookie_base(String::new());
        cookie.set_max_age(cookie::time::Duration::ZERO);
        cookie.to_string()
    }

    fn cookie_base(&self, value: String) -> cookie::Cookie<'static> {
        let config = &self.inner.config;
        let mut cookie = cookie::Cookie::new(self.inner.cookie_name.clone(), value);
        cookie.set_http_only(true);
        cookie.set_secure(config.secure);
        cookie.set_path(config.path.clone());
        cookie.set_same_site(match config.same_site {
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::None => cookie::SameSite::None,
        });
        if let Some(domain) = &config.domain {
            cookie.set_domain(domain.clone());
        }
        cookie
    }
}

#[derive(Debug)]
enum Incoming {
    Absent,
    Malformed,
    Id(SessionId),
}

/// One request's session, from [`SessionManager::start`] to
/// [`RequestSession::finish`].
pub struct RequestSession {
    manager: SessionManager,
    incoming: Incoming,
    loaded: tokio::sync::OnceCell<Loaded>,
    /// This process's lock on the session, held by an exclusive session
    /// from before it takes the lease (or is handed it) until after it
    /// releases it (or hands it on).
    local_guard: std::sync::Mutex<Option<OwnedMutexGuard<LocalTurn>>>,
    finished: AtomicBool,
}

struct Loaded {
    session: Session,
    exclusive: bool,
}

impl fmt::Debug for RequestSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSession")
            .field("incoming", &self.incoming)
            .field("loaded", &self.loaded.get().map(|loaded| &loaded.session))
            .finish()
    }
}

/// The changes of one request, applied onto whatever version is stored.
/// The default changes nothing.
#[derive(Default)]
struct ChangeSet {
    data: std::collections::BTreeMap<String, Option<Box<serde_json::value::RawValue>>>,
    /// The handle's data map, encoded, with the version it was loaded at:
    /// the merge result as long as that version is still the stored one,
    /// which spares decoding the stored data again.
    encoded_on: Option<(u64, Vec<u8>)>,
    user: Option<Option<String>>,
    rotate: bool,
    lease_token: Option<u64>,
    /// Whether the save keeps the lease, renewed, for the next exclusive
    /// request of the session in this process (see `Handoff`).
    hand_off: bool,
}

impl ChangeSet {
    /// Sets and removes this request's keys in `data`.
    fn apply_to(&self, data: &mut DataMap) {
        for (key, value) in &self.data {
            match value {
                Some(value) => data.insert(key.clone(), value.clone()),
                None => data.remove(key),
            };
        }
    }
}

impl RequestSession {
    /// The session, loaded on first call; it merges this request's changes
    /// into the stored session at save.
    ///
    /// # Errors
    ///
    /// A backend error if the store cannot be read (send a 503). A corrupt or
    /// expired record is not an error: it yields a fresh session.
    pub async fn session(&self) -> Result<Session> {
        let loaded = self
            .loaded
            .get_or_try_init(|| async {
                Ok::<_, Error>(Loaded {
                    session: Session::from_state(self.load_plain().await?),
                    exclusive: false,
                })
            })
            .await?;
        Ok(loaded.session.clone())
    }

    /// The session, holding its lease until the response is saved, so no
    /// other exclusive session of the same session runs meanwhile.
    ///
    /// # Errors
    ///
    /// A lock-timeout error if another holder keeps the lease longer than
    /// the configured wait; a backend error if the store fails; a usage error
    /// if this request already loaded the session without the lock.
    pub async fn exclusive_session(&self) -> Result<Session> {
        let loaded = self
            .loaded
            .get_or_try_init(|| async {
                Ok::<_, Error>(Loaded {
                    session: Session::from_state(self.load_exclusive().await?),
                    exclusive: true,
                })
            })
            .await?;
        if !loaded.exclusive {
            return Err(Error::usage(
                "the session was already loaded without a lock in this request; ask for the exclusive session first",
            ));
        }
        Ok(loaded.session.clone())
    }

    async fn load_plain(&self) -> Result<SessionState> {
        let manager = &self.manager;
        let Incoming::Id(id) = &self.incoming else {
            return Ok(manager.fresh_state());
        };
        let key = id.key();
        Ok(match manager.load_live(&key, manager.now()).await? {
            Some((record, data)) => self.stored_state(id, key, record, data, None),
            None => manager.fresh_state(),
        })
    }

    /// The state of the stored session `record` under `key`, its data
    /// decoded, holding the lease `lease_token` if any.
    fn stored_state(
        &self,
        id: &SessionId,
        key: SessionKey,
        record: Record,
        data: DataMap,
        lease_token: Option<u64>,
    ) -> SessionState {
        let max_size = self.manager.inner.config.max_session_size;
        let stored = Stored {
            id: id.clone(),
            key,
            record,
        };
        let mut state = SessionState::loaded(stored, data, max_size);
        state.lease_token = lease_token;
        state
    }

    async fn load_exclusive(&self) -> Result<SessionState> {
        let manager = &self.manager;
        let Incoming::Id(id) = &self.incoming else {
            // A new session's id is known to nobody else: no lock needed.
            return Ok(manager.fresh_state());
        };
        let config = &manager.inner.config;
        let key = id.key();
        let token = lease_token();
        let started = tokio::time::Instant::now();
        let local = manager.inner.local_locks.lock_for(&key);
        let mut guard = tokio::time::timeout(config.lock_wait, local.lock_owned())
            .await
            .map_err(|_| Error::lock_timeout(started.elapsed()))?;
        let adopted = (guard.handoff.take()).and_then(|handoff| self.adopt(id, key, handoff));
        guard.chain = if adopted.is_some() {
            guard.chain + 1
        } else {
            0
        };
        *lock_ignoring_poison(&self.local_guard) = Some(guard);
        if let Some(state) = adopted {
            return Ok(state);
        }
        let result = self.take_lease(id, key, token, started).await;
        if result.is_err() {
            lock_ignoring_poison(&self.local_guard).take();
        }
        result
    }

    /// The session as the exclusive request before this one left it, with
    /// its lease, if that lease still binds; `None` sends this request to
    /// the store for a lease of its own.
    fn adopt(&self, id: &SessionId, key: SessionKey, handoff: Handoff) -> Option<SessionState> {
        let manager = &self.manager;
        let now = manager.now();
        let (record, token) = handoff.take(now)?;
        // Expired meanwhile (its absolute deadline passed): as in
        // `take_lease`, the lease on it does no harm; start afresh.
        Some(match manager.live_data(&key, &record, now) {
            Some(data) => self.stored_state(id, key, record, data, Some(token)),
            None => manager.fresh_state(),
        })
    }

    /// Loads the session and takes its lease in the store in one step,
    /// waiting while another process holds it.
    async fn take_lease(
        &self,
        id: &SessionId,
        key: SessionKey,
        token: u64,
        started: tokio::time::Instant,
    ) -> Result<SessionState> {
        let manager = &self.manager;
        let config = &manager.inner.config;
        let mut backoff = Backoff::new(token);
        loop {
            let now = manager.now();
            let lease = Lease {
                token,
                until: now.saturating_add(config.lease_duration),
            };
            let outcome = match manager.inner.store.lease(&key, lease, now).await {
                Ok(outcome) => outcome,
                Err(err) if err.is_decode() => {
                    tracing::warn!(session = %key.fingerprint(), error = %err, "corrupt session record treated as absent");
                    return Ok(manager.fresh_state());
                }
                Err(err) => return Err(err.context("failed to lock session")),
            };
            let leased = match outcome {
                LeaseOutcome::Missing => return Ok(manager.fresh_state()),
                LeaseOutcome::Held(_) => {
                    if started.elapsed() >= config.lock_wait {
                        return Err(Error::lock_timeout(started.elapsed()));
                    }
                    // Boxed, as in `save`: only a held lease waits.
                    Box::pin(backoff.wait()).await;
                    continue;
                }
                LeaseOutcome::Taken(leased) => leased,
            };
            // Expired by this manager's settings, or unreadable: nobody can
            // use it, so the lease on it does no harm; start afresh.
            let Some(data) = manager.live_data(&key, &leased, now) else {
                return Ok(manager.fresh_state());
            };
            return Ok(self.stored_state(id, key, leased, data, Some(token)));
        }
    }

    /// Finishes, without the asynchronous [`RequestSession::finish`], a
    /// request that needs nothing of the store at its end: its session was
    /// never loaded, or it is a stored plain session the request left as
    /// loaded, touched recently enough that no touch is due. Whether it
    /// was such a request; for any other, `finish` must follow.
    ///
    /// Read-only requests are the common case, and `finish` would take
    /// them through a boxed future only to find nothing to do.
    #[cfg(feature = "axum")]
    pub(crate) fn finish_without_store(&self) -> bool {
        if let Some(loaded) = self.loaded.get() {
            // An exclusive session holds a lease (and this process's lock) to release.
            if loaded.exclusive {
                return false;
            }
            let state = loaded.session.lock();
            // A session not stored is created, or its stale cookie revoked.
            let Some(stored) = &state.stored else {
                return false;
            };
            let manager = &self.manager;
            if state.is_dirty()
                || state.expired
                || manager.touch_due(stored.record.accessed_at, manager.now())
            {
                return false;
            }
        }
        self.finished.store(true, Ordering::SeqCst);
        true
    }

    /// Ends the request: saves the session if the outcome is a success and
    /// it changed, and returns the `Set-Cookie` header value to send.
    ///
    /// A failure saves nothing and releases an exclusive session's lease;
    /// so does a save that fails, if the store still answers. A second
    /// call does nothing and returns `Ok(None)`.
    ///
    /// # Errors
    ///
    /// A backend error if the store fails while saving; the response should
    /// then become a 503, since the handler's changes were not kept.
    pub async fn finish(&self, outcome: Outcome) -> Result<Option<String>> {
        // The first call took the request's changes and stored data with it.
        if self.finished.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let result = self.save_outcome(outcome).await;
        self.finished.store(true, Ordering::SeqCst);
        // After the lease is released: the next local request may go.
        lock_ignoring_poison(&self.local_guard).take();
        result
    }

    async fn save_outcome(&self, outcome: Outcome) -> Result<Option<String>> {
        let Some(loaded) = self.loaded.get() else {
            return Ok(None);
        };
        let manager = &self.manager;
        let now = manager.now();
        let (stored, changes, fresh_data, user, expired, has_info) = {
            let mut state = loaded.session.lock();
            let encoded_on = match &state.stored {
                Some(stored) if !state.changes.is_empty() => {
                    Some((stored.record.version, encode_data(&state.data)))
                }
                _ => None,
            };
            let changes = ChangeSet {
                encoded_on,
                data: std::mem::take(&mut state.changes),
                user: state.user_changed.then(|| state.user.clone()),
                rotate: state.rotate,
                lease_token: state.lease_token,
                hand_off: state.lease_token.is_some()
                    && !state.rotate
                    && outcome == Outcome::Success
                    && self.successor_waits(),
            };
            // The request is over: the stored bytes go to the save, uncopied.
            let stored = state.stored.as_mut().map(|stored| {
                let data = std::mem::take(&mut stored.record.data);
                let record = Record {
                    data,
                    ..stored.record.clone()
                };
                (stored.id.clone(), stored.key, record)
            });
            let fresh_data = if stored.is_none() {
                encode_data(&state.data)
            } else {
                Vec::new()
            };
            (
                stored,
                changes,
                fresh_data,
                state.user.clone(),
                state.expired,
                state.has_info(),
            )
        };
        let had_cookie = !matches!(self.incoming, Incoming::Absent);
        let revoke = || had_cookie.then(|| manager.revocation_cookie());

        let Some((id, key, base)) = stored else {
            if outcome == Outcome::Failure || expired || !has_info {
                return Ok(if outcome == Outcome::Success {
                    revoke()
                } else {
                    None
                });
            }
            return self.create(user, fresh_data, now).await.map(Some);
        };

        if outcome == Outcome::Failure {
            if let Some(token) = changes.lease_token {
                manager.release_lease(&key, token).await?;
            }
            return Ok(None);
        }
        if expired {
            manager
                .inner
                .store
                .delete(&key, None)
                .await
                .map_err(|err| err.context("failed to delete session"))?;
            tracing::debug!(session = %key.fingerprint(), "session expired by the application");
            return Ok(revoke());
        }
        let dirty = !changes.data.is_empty() || changes.user.is_some() || changes.rotate;
        if !dirty && changes.lease_token.is_none() {
            return self.touch(&id, &key, &base, now).await;
        }
        let lease_token = changes.lease_token;
        // Boxed: inline, the save's state (over 800 bytes) would make every
        // finish future, and the layer's allocation of it, too big for the
        // allocator's per-thread cache; two cached allocations cost less.
        let saved = Box::pin(self.save(id, key, base, changes, now)).await;
        if let (Err(err), Some(token)) = (&saved, lease_token) {
            // The save failed, so nothing wrote or handed on the lease:
            // release it, lest the next exclusive request wait for it to
            // expire. A store that is down fails this too; it then expires.
            if let Err(release) = manager.release_lease(&key, token).await {
                tracing::warn!(session = %key.fingerprint(), error = %release, save = %err, "failed to release the lease of a failed save");
            }
        }
        saved
    }

    async fn create(&self, user: Option<String>, data: Vec<u8>, now: Timestamp) -> Result<String> {
        let manager = &self.manager;
        let mut record = manager.new_record(now);
        record.user = user;
        record.data = data;
        for _ in 0..3 {
            let id = SessionId::generate();
            let key = id.key();
            let outcome = manager
                .inner
                .store
                .create(&key, &record, now)
                .await
                .map_err(|err| err.context("failed to create session"))?;
            if outcome == CreateOutcome::Created {
                tracing::debug!(session = %key.fingerprint(), "session created");
                return Ok(manager.cookie(&id, Some(record.expires_at()), now));
            }
        }
        Err(Error::backend(
            manager.inner.store.name(),
            "three fresh session ids collided; the store's create is not keeping records apart",
        ))
    }

    async fn touch(
        &self,
        id: &SessionId,
        key: &SessionKey,
        base: &Record,
        now: Timestamp,
    ) -> Result<Option<String>> {
        let manager = &self.manager;
        let config = &manager.inner.config;
        if !manager.touch_due(base.accessed_at, now) {
            return Ok(None);
        }
        let idle_deadline = now.saturating_add(config.idle_timeout);
        let touched = manager
            .inner
            .store
            .touch(key, now, idle_deadline)
            .await
            .map_err(|err| err.context("failed to touch session"))?;
        let expires_at = match base.absolute_deadline {
            Some(absolute) => absolute.min(idle_deadline),
            None => idle_deadline,
        };
        Ok((touched && config.lifetime == CookieLifetime::Persistent)
            .then(|| manager.cookie(id, Some(expires_at), now)))
    }

    /// Applies `changes` onto the stored session by compare-and-swap,
    /// reloading and reapplying on conflict; moves it to a new id if asked.
    ///
    /// A plain save that lost the race goes to this process's batch of
    /// saves of the session, as does any plain save while a batch is being
    /// written: a hot session (a page's parallel requests) then costs one
    /// write per batch, not a race and a backoff per save.
    async fn save(
        &self,
        id: SessionId,
        key: SessionKey,
        mut base: Record,
        mut changes: ChangeSet,
        now: Timestamp,
    ) -> Result<Option<String>> {
        let manager = &self.manager;
        let store = &manager.inner.store;
        let batches = &manager.inner.save_batches;
        let save_failed = |err: Error| err.context("failed to save session");
        let batched = changes.lease_token.is_none() && !changes.rotate;
        if batched && let Some(batch) = batches.existing(&key) {
            // Boxed, as the backoff below: only a hot session's saves wait here.
            return Box::pin(self.save_in_batch(&id, &key, batch, changes)).await;
        }
        // Any seed will do for jitter; the key spares a system call.
        let mut backoff = Backoff::new(u64::from_le_bytes(
            key.as_bytes()[..8].try_into().expect("8 bytes"),
        ));
        for _ in 0..MAX_SAVE_ATTEMPTS {
            let merged = manager.apply_within_limit(&base, std::slice::from_mut(&mut changes), now);
            let mut merged = match merged {
                Ok((merged, refused)) => match refused.into_iter().next() {
                    Some((_, too_large)) => return Err(save_failed(too_large)),
                    None => merged,
                },
                Err(err) => {
                    tracing::warn!(session = %key.fingerprint(), error = %err, "session changed into unreadable data; changes dropped");
                    return Ok(None);
                }
            };
            if changes.rotate && has_info(&merged) {
                let new_id = SessionId::generate();
                let new_key = new_id.key();
                merged.lease = None;
                // False when someone wrote the old record meanwhile: merge again.
                if store
                    .rename(&key, base.version, &new_key, &merged, now)
                    .await
                    .map_err(save_failed)?
                {
                    tracing::debug!(from = %key.fingerprint(), to = %new_key.fingerprint(), "session id renewed");
                    return Ok(Some(manager.cookie(
                        &new_id,
                        Some(merged.expires_at()),
                        now,
                    )));
                }
            } else {
                match manager.write_over(&key, base.version, &merged, now).await? {
                    Some(Written::Saved(expires_at)) => {
                        let cookie = self.refresh_cookie(&id, expires_at, now);
                        if let Some(token) = changes.lease_token.filter(|_| changes.hand_off) {
                            self.hand_off(key, merged, token);
                        }
                        return Ok(cookie);
                    }
                    Some(Written::Deleted) => return Ok(self.revocation()),
                    Some(Written::Dropped) | None => {}
                }
            }
            if batched {
                let batch = batches.lock_for(&key);
                return Box::pin(self.save_in_batch(&id, &key, batch, changes)).await;
            }
            // Lost a race: merge again onto the latest version, if there still is one.
            match store.load(&key, now).await {
                Ok(Some(latest)) if !manager.is_expired(&latest, now) => base = latest,
                Ok(_) => {
                    tracing::debug!(session = %key.fingerprint(), "session deleted by another request; changes dropped");
                    return Ok(None);
                }
                Err(err) if err.is_decode() => return Ok(None),
                Err(err) => return Err(save_failed(err)),
            }
            // Boxed: a timer would add 120 bytes to every save's state, for
            // a wait only a lost race takes.
            Box::pin(backoff.wait()).await;
        }
        Err(too_many_writers(store.name()))
    }

    /// Hands `changes` to this process's batch of saves of the session and
    /// waits for the batch's write; starts the batch's writer if none runs.
    async fn save_in_batch(
        &self,
        id: &SessionId,
        key: &SessionKey,
        batch: Arc<tokio::sync::Mutex<Batch>>,
        changes: ChangeSet,
    ) -> Result<Option<String>> {
        let (outcome, written) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut waiting = batch.lock().await;
            waiting.saves.push((changes, outcome));
            !std::mem::replace(&mut waiting.writing, true)
        };
        if start_writer {
            let (manager, key) = (self.manager.clone(), *key);
            let write = async move { manager.write_batches(&key, &batch).await };
            match tokio::runtime::Handle::try_current() {
                // A task of its own: a client that goes away does not take
                // the other requests' saves with it.
                Ok(runtime) => drop(runtime.spawn(write)),
                Err(_) => Box::pin(write).await,
            }
        }
        match written.await {
            Ok(Ok(Written::Saved(expires_at))) => {
                Ok(self.refresh_cookie(id, expires_at, self.manager.now()))
            }
            Ok(Ok(Written::Deleted)) => Ok(self.revocation()),
            Ok(Ok(Written::Dropped)) => Ok(None),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::backend(
                self.manager.inner.store.name(),
                "the batch of saves was abandoned; changes dropped",
            )),
        }
    }

    /// The cookie to send after a save that moved the session's expiry to
    /// `expires_at`: one for persistent cookies, none for session cookies.
    fn refresh_cookie(
        &self,
        id: &SessionId,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Option<String> {
        let manager = &self.manager;
        (manager.inner.config.lifetime == CookieLifetime::Persistent)
            .then(|| manager.cookie(id, Some(expires_at), now))
    }

    /// The cookie that revokes the one the request came with, if any.
    fn revocation(&self) -> Option<String> {
        let had_cookie = !matches!(self.incoming, Incoming::Absent);
        had_cookie.then(|| self.manager.revocation_cookie())
    }

    /// Whether another exclusive request of the session waits in this
    /// process for the lease this request holds, and may have it handed on.
    fn successor_waits(&self) -> bool {
        lock_ignoring_poison(&self.local_guard)
            .as_ref()
            .is_some_and(|turn| {
                turn.chain < MAX_HANDOFFS && Arc::strong_count(OwnedMutexGuard::mutex(turn)) > 1
            })
    }

    /// Leaves `record`, just written with the lease `token` kept, to the
    /// next exclusive request of the session in this process.
    fn hand_off(&self, key: SessionKey, record: Record, token: u64) {
        if let Some(turn) = lock_ignoring_poison(&self.local_guard).as_mut() {
            turn.handoff = Some(Handoff {
                manager: self.manager.clone(),
                key,
                record: Some(record),
                token,
            });
        }
    }
}

impl Drop for RequestSession {
    /// A request dropped before `finish` (a client that went away, a
    /// cancelled future) still releases its lease, in the background, so
    /// the session is not locked until the lease expires.
    fn drop(&mut self) {
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        let Some(loaded) = self.loaded.get() else {
            return;
        };
        let (token, key) = {
            let state = loaded.session.lock();
            match (state.lease_token, &state.stored) {
                (Some(token), Some(stored)) => (token, stored.key),
                _ => return,
            }
        };
        let guard = lock_ignoring_poison(&self.local_guard).take();
        release_in_background(self.manager.clone(), key, token, guard);
    }
}

fn lock_ignoring_poison<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A token for a new lease: the next of this process's counter, which
/// starts at a random point. Tokens must be unique among the holders of a
/// session, in every process; they never reach a client, so they need not
/// be secret. Consecutive numbers from a random start are unique within
/// the process and, across processes, collide only if two processes' runs
/// of tokens overlap (about one chance in 10^10 for a billion leases
/// each), as rare as two random tokens colliding; and they cost no system
/// call per exclusive request, where reading the OS's random source did.
fn lease_token() -> u64 {
    static NEXT: LazyLock<AtomicU64> = LazyLock::new(|| {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        AtomicU64::new(u64::from_le_bytes(bytes))
    });
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How many exclusive requests in a row may hold a session's lease by
/// hand-off before one gives it back to the store, so that other processes
/// waiting for it get their turn.
const MAX_HANDOFFS: u32 = 32;

/// What the lock of one session's exclusive requests in this process guards.
#[derive(Debug, Default)]
struct LocalTurn {
    /// The lease the request before passed on, until this one takes it.
    handoff: Option<Handoff>,
    /// How many requests in a row, the holder included, hold the lease by hand-off.
    chain: u32,
}

/// A lease an exclusive request kept at its save, renewed, for the next
/// exclusive request of the session in this process, with the record it
/// wrote: the next one then needs no round trip for a lease. Dropped
/// untaken (the next one went away), it releases the lease in the background.
#[derive(Debug)]
struct Handoff {
    manager: SessionManager,
    key: SessionKey,
    /// `None` once taken.
    record: Option<Record>,
    token: u64,
}

impl Handoff {
    /// The record and the lease's token, if the lease is still this one's
    /// and binds at `now`; otherwise the lease goes back to the store.
    fn take(mut self, now: Timestamp) -> Option<(Record, u64)> {
        let token = self.token;
        let record = self.record.take_if(|record| {
            record
                .lease
                .is_some_and(|lease| lease.token == token && lease.until > now)
        })?;
        Some((record, token))
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if self.record.is_some() {
            release_in_background(self.manager.clone(), self.key, self.token, ());
        }
    }
}

/// Releases the lease `token` holds on `key`, if it still does, in a task
/// of the current runtime, and drops `after` once done. Outside a runtime
/// nothing is released: the lease then expires on its own.
fn release_in_background<T: Send + 'static>(
    manager: SessionManager,
    key: SessionKey,
    token: u64,
    after: T,
) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(err) = manager.release_lease(&key, token).await {
                tracing::warn!(session = %key.fingerprint(), error = %err, "failed to release an abandoned lease");
            }
            drop(after);
        });
    }
}

/// Plain saves of one session waiting in this process to be written
/// together (see `SessionManager::write_batches`).
#[derive(Default)]
struct Batch {
    /// Each save's changes, and where its outcome goes.
    saves: Vec<(ChangeSet, tokio::sync::oneshot::Sender<Result<Written>>)>,
    /// Whether a writer is at work on the session's saves.
    writing: bool,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("saves", &self.saves.len())
            .field("writing", &self.writing)
            .finish()
    }
}

/// The writer of a `Batch` until it leaves the batch as it should; dropped
/// midway (its task cancelled, or a panic), it fails the waiting saves
/// and lets the next save start a writer, rather than leave them waiting.
struct Writer<'a>(Option<&'a tokio::sync::Mutex<Batch>>);

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if let Some(mut batch) = self.0.and_then(|batch| batch.try_lock().ok()) {
            batch.writing = false;
            batch.saves.clear();
        }
    }
}

/// What a batch's write did with the session.
#[derive(Clone, Copy, Debug)]
enum Written {
    /// Stored, expiring at this time.
    Saved(Timestamp),
    /// Deleted: nothing was left in it.
    Deleted,
    /// Not stored: the session was gone, its stored data unreadable, or
    /// every save of the batch refused as too large.
    Dropped,
}

/// Whether `record` holds anything worth storing: a user or some data.
fn has_info(record: &Record) -> bool {
    record.user.is_some() || record.data != crate::record::EMPTY_DATA
}

fn too_many_writers(store: &str) -> Error {
    Error::backend(
        store,
        "too many concurrent writers on one session; changes dropped",
    )
}

/// Jittered exponential backoff for lock waits and save retries.
struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    fn new(seed: u64) -> Self {
        Self {
            next: Duration::from_micros(500),
            seed: seed | 1,
        }
    }

    async fn wait(&mut self) {
        // xorshift: cheap jitter so waiters do not wake in lockstep.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = Duration::from_micros(self.seed % 1_000);
        tokio::time::sleep(self.next + jitter).await;
        self.next = (self.next * 2).min(Duration::from_millis(20));
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::{ManualClock, MemoryStore};

    #[test]
    fn lease_tokens_taken_at_once_on_many_threads_are_all_distinct() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| lease_token()).collect::<Vec<_>>()))
            .collect();
        let tokens: std::collections::HashSet<u64> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        assert_eq!(tokens.len(), 40_000);
    }

    #[tokio::test]
    async fn the_reaper_purges_expired_sessions() {
        let clock = ManualClock::starting_now();
        let store = MemoryStore::new();
        let manager = SessionManager::new(store.clone()).with_clock(clock.clone());
        let request = manager.start(None);
        request.session().await.unwrap().insert("n", 1).unwrap();
        request.finish(Outcome::Success).await.unwrap().unwrap();
        assert_eq!(store.count().await.unwrap(), 1);
        clock.advance(Duration::from_secs(31 * 60));
        let reaper = manager.spawn_reaper(Duration::from_millis(5));
        while store.count().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        reaper.abort();
    }

    #[test]
    fn outcome_follows_the_status() {
        assert_eq!(Outcome::from_status(200), Outcome::Success);
        assert_eq!(Outcome::from_status(404), Outcome::Success);
        assert_eq!(Outcome::from_status(500), Outcome::Failure);
        assert_eq!(Outcome::from_status(503), Outcome::Failure);
    }

    #[tokio::test]
    async fn requests_that_never_load_cost_nothing_and_send_nothing() {
        let manager = SessionManager::new(MemoryStore::new());
        let request = manager.start(Some("id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        assert_eq!(request.finish(Outcome::Success).await.unwrap(), None);
    }

    /// Stores a session holding `n = 1` through `manager`; the `Cookie`
    /// header that names it, and its id.
    async fn stored_session(manager: &SessionManager) -> (String, SessionId) {
        let first = manager.start(None);
        first.session().await.unwrap().insert("n", 1).unwrap();
        let cookie = first.finish(Outcome::Success).await.unwrap().unwrap();
        let header = cookie.split(';').next().unwrap().to_owned();
        let id = SessionId::parse(header.split_once('=').unwrap().1).unwrap();
        (header, id)
    }

    /// A memory store that counts loads and replaces, and yields before
    /// each, as a store across a network would.
    #[derive(Clone, Debug, Default)]
    struct Counting {
        inner: MemoryStore,
        loads: Arc<AtomicU64>,
        replaces: Arc<AtomicU64>,
        leases: Arc<AtomicU64>,
        /// While set, every replace loses, as to another writer.
        losing_replaces: Arc<AtomicBool>,
    }

    impl Counting {
        /// The record `id` names, as stored now.
        async fn stored(&self, id: &SessionId, manager: &SessionManager) -> Record {
            let record = self.inner.load(&id.key(), manager.now()).await.unwrap();
            record.expect("a stored session")
        }
    }

    #[async_trait::async_trait]
    impl SessionStore for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn capabilities(&self) -> crate::store::Capabilities {
            self.inner.capabilities()
        }
        async fn setup(&self) -> Result<()> {
            self.inner.setup().await
        }
        async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.inner.load(key, now).await
        }
        async fn create(
            &self,
            key: &SessionKey,
            record: &Record,
            now: Timestamp,
        ) -> Result<CreateOutcome> {
            self.inner.create(key, record, now).await
        }
        async fn replace(
            &self,
            key: &SessionKey,
            expected_version: u64,
            record: &Record,
            now: Timestamp,
        ) -> Result<bool> {
            self.replaces.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.losing_replaces.load(Ordering::SeqCst) {
                return Ok(false);
            }
            self.inner.replace(key, expected_version, record, now).await
        }
        async fn lease(
            &self,
            key: &SessionKey,
            lease: Lease,
            now: Timestamp,
        ) -> Result<LeaseOutcome> {
            self.leases.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.inner.lease(key, lease, now).await
        }
        async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool> {
            self.inner.delete(key, expected_version).await
        }
        // Forwarded, so that id renewals use the memory store's own atomic
        // rename rather than the trait's create-then-delete.
        async fn rename(
            &self,
            key: &SessionKey,
            expected_version: u64,
            new_key: &SessionKey,
            record: &Record,
            now: Timestamp,
        ) -> Result<bool> {
            tokio::task::yield_now().await;
            self.inner
                .rename(key, expected_version, new_key, record, now)
                .await
        }
        async fn touch(
            &self,
            key: &SessionKey,
            accessed_at: Timestamp,
            idle_deadline: Timestamp,
        ) -> Result<bool> {
            self.inner.touch(key, accessed_at, idle_deadline).await
        }
        async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
            self.inner.purge_expired(now).await
        }
        async fn list(
            &self,
            after: Option<&SessionKey>,
            limit: usize,
        ) -> Result<crate::store::Page> {
            self.inner.list(after, limit).await
        }
        async fn count(&self) -> Result<u64> {
            self.inner.count().await
        }
        async fn find_by_user(
            &self,
            user: &str,
            now: Timestamp,
        ) -> Result<Vec<(SessionKey, Record)>> {
            self.inner.find_by_user(user, now).await
        }
    }

    /// Plain saves keep a lease they find, so a release can lose its swap
    /// for as long as they come: it tries as often as a lease does, then
    /// leaves the lease to expire rather than spin.
    #[tokio::test]
    async fn a_release_that_keeps_losing_its_swap_gives_up() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (_, id) = stored_session(&manager).await;
        let now = manager.now();
        let lease = Lease {
            token: 7,
            until: now.saturating_add(Duration::from_secs(60)),
        };
        let key = id.key();
        let outcome = store.inner.lease(&key, lease, now).await.unwrap();
        assert!(matches!(outcome, LeaseOutcome::Taken(_)));
        store.losing_replaces.store(true, Ordering::SeqCst);
        let replaces = store.replaces.load(Ordering::SeqCst);
        let released = manager.release_lease(&key, lease.token);
        tokio::time::timeout(Duration::from_secs(10), released)
            .await
            .expect("the release gives up rather than spin")
            .unwrap();
        assert_eq!(
            store.replaces.load(Ordering::SeqCst) - replaces,
            MAX_LEASE_ATTEMPTS as u64
        );
        assert_eq!(store.stored(&id, &manager).await.lease, Some(lease));
    }

    /// Starts `count` requests of the session `cookie` names, each loading
    /// it and setting its own key (`k0`, `k1`, …) before any finishes.
    async fn parallel_requests(
        manager: &SessionManager,
        cookie: &str,
        count: usize,
    ) -> Vec<Arc<RequestSession>> {
        let mut requests = Vec::new();
        for index in 0..count {
            let request = Arc::new(manager.start(Some(cookie)));
            let session = request.session().await.unwrap();
            session.insert(format!("k{index}"), index).unwrap();
            requests.push(request);
        }
        requests
    }

    /// Parallel requests of one session (a page's calls to an API): the
    /// first save wins, the others lose once and go to the session's batch,
    /// written together by one load and one compare-and-swap.
    #[tokio::test]
    async fn parallel_saves_of_a_hot_session_are_written_together() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (cookie, id) = stored_session(&manager).await;
        let requests = parallel_requests(&manager, &cookie, 16).await;
        let loaded = store.stored(&id, &manager).await;
        let (loads, replaces) = (
            store.loads.load(Ordering::SeqCst),
            store.replaces.load(Ordering::SeqCst),
        );
        let mut finishing = tokio::task::JoinSet::new();
        for request in &requests {
            let request = Arc::clone(request);
            finishing.spawn(async move { request.finish(Outcome::Success).await.unwrap() });
        }
        finishing.join_all().await;
        assert_eq!(store.loads.load(Ordering::SeqCst) - loads, 1, "reloads");
        assert_eq!(
            store.replaces.load(Ordering::SeqCst) - replaces,
            16 + 1,
            "writes"
        );
        let stored = store.stored(&id, &manager).await;
        assert_eq!(stored.version, loaded.version + 2);
        let data = decode_data(&stored.data).unwrap();
        for index in 0..16 {
            assert_eq!(
                data[&format!("k{index}")].get(),
                index.to_string(),
                "k{index}"
            );
        }
        assert!(manager.inner.save_batches.existing(&id.key()).is_none());
    }

    /// A save of a session whose batch is being written joins the batch
    /// rather than racing its writer.
    #[tokio::test]
    async fn a_save_joins_the_batch_its_session_already_has() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (cookie, id) = stored_session(&manager).await;
        let [late] = <[_; 1]>::try_from(parallel_requests(&manager, &cookie, 1).await)
            .unwrap_or_else(|_| unreachable!());
        let batch = manager.inner.save_batches.lock_for(&id.key());
        batch.lock().await.writing = true;
        let replaces = store.replaces.load(Ordering::SeqCst);
        let waiting = tokio::spawn(async move { late.finish(Outcome::Success).await.unwrap() });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        assert_eq!(
            store.replaces.load(Ordering::SeqCst),
            replaces,
            "it raced the writer"
        );
        assert_eq!(batch.lock().await.saves.len(), 1);
        manager.write_batches(&id.key(), &batch).await;
        waiting.await.unwrap();
        assert_eq!(store.replaces.load(Ordering::SeqCst), replaces + 1);
        let stored = store.stored(&id, &manager).await;
        let data = decode_data(&stored.data).unwrap();
        assert!(
            data.contains_key("k0") && data.contains_key("n"),
            "{data:?}"
        );
    }

    /// A batch's writer dropped midway fails the saves it took and lets
    /// the next save start a writer of its own.
    #[tokio::test]
    async fn a_writer_dropped_midway_fails_its_saves_and_frees_the_batch() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (cookie, id) = stored_session(&manager).await;
        let [first, second] = <[_; 2]>::try_from(parallel_requests(&manager, &cookie, 2).await)
            .unwrap_or_else(|_| unreachable!());
        let batch = manager.inner.save_batches.lock_for(&id.key());
        batch.lock().await.writing = true;
        let waiting = tokio::spawn(async move { first.finish(Outcome::Success).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            batch.lock().await.saves.len(),
            1,
            "it did not join the batch"
        );
        // A writer that stops at its first await (the load) and is dropped.
        let key = id.key();
        let mut writer = Box::pin(manager.write_batches(&key, &batch));
        assert!(futures_poll_once(writer.as_mut()).await.is_pending());
        drop(writer);
        // A bound on the wait, so that a regression fails instead of hanging.
        let failed = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(
            failed
                .expect("the save still waits")
                .unwrap()
                .unwrap_err()
                .is_backend()
        );
        assert!(!batch.lock().await.writing);
        drop(batch);
        second.finish(Outcome::Success).await.unwrap();
        let stored = store.stored(&id, &manager).await;
        assert!(decode_data(&stored.data).unwrap().contains_key("k1"));
    }

    /// Polls `future` once; whether it finished.
    async fn futures_poll_once<F: Future>(
        future: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let mut future = Some(future);
        std::future::poll_fn(|cx| std::task::Poll::Ready(future.take().unwrap().poll(cx))).await
    }

    /// Runs `count` exclusive requests of the session `cookie` names at
    /// once, each adding one to `n`, and waits for all of them.
    async fn exclusive_increments(manager: &SessionManager, cookie: &str, count: usize) {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (manager, cookie) = (manager.clone(), cookie.to_owned());
            requests.spawn(async move {
                let request = manager.start(Some(&cookie));
                let session = request.exclusive_session().await.unwrap();
                let n = session.get::<i64>("n").unwrap().unwrap();
                session.insert("n", n + 1).unwrap();
                request.finish(Outcome::Success).await.unwrap();
            });
        }
        requests.join_all().await;
    }

    /// Exclusive requests queued for one session in one process pass the
    /// lease on with the record, each sparing a lease from the store, and
    /// give it back to the store after `MAX_HANDOFFS` in a row.
    #[tokio::test]
    async fn queued_exclusive_requests_pass_the_lease_on_a_while() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (cookie, id) = stored_session(&manager).await;
        let count = MAX_HANDOFFS as usize + 8;
        exclusive_increments(&manager, &cookie, count).await;
        assert_eq!(store.leases.load(Ordering::SeqCst), 2);
        let stored = store.stored(&id, &manager).await;
        assert_eq!(stored.lease, None, "the last request keeps its lease");
        assert_eq!(
            decode_data(&stored.data).unwrap()["n"].get(),
            (1 + count).to_string()
        );
    }

    /// An exclusive request of the session `cookie` names sets `n` to 2
    /// while a second one queues behind it, then finishes, handing the
    /// lease on; the second, as a task that runs `then` on its session
    /// once it has one.
    async fn hand_on<T, F>(
        manager: &SessionManager,
        cookie: &str,
        then: impl FnOnce(RequestSession, Session) -> F + Send + 'static,
    ) -> tokio::task::JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let first = manager.start(Some(cookie));
        let session = first.exclusive_session().await.unwrap();
        session.insert("n", 2).unwrap();
        let (manager, cookie) = (manager.clone(), cookie.to_owned());
        let next = tokio::spawn(async move {
            let request = manager.start(Some(&cookie));
            let session = request.exclusive_session().await.unwrap();
            then(request, session).await
        });
        tokio::task::yield_now().await;
        first.finish(Outcome::Success).await.unwrap();
        next
    }

    /// A lease handed on that expired before the next request could take
    /// it is not used: that request leases the session from the store.
    #[tokio::test]
    async fn a_lease_handed_on_too_late_is_taken_afresh() {
        let clock = ManualClock::starting_now();
        let store = Counting::default();
        let manager = SessionManager::new(store.clone()).with_clock(clock.clone());
        let (cookie, id) = stored_session(&manager).await;
        let next = hand_on(&manager, &cookie, |request, session| async move {
            let n = session.get::<i64>("n").unwrap().unwrap();
            session.insert("n", n + 1).unwrap();
            request.finish(Outcome::Success).await.unwrap();
        })
        .await;
        let handed = store.stored(&id, &manager).await;
        assert!(handed.lease.is_some(), "the lease was not handed on");
        clock.advance(manager.config().lease_duration + Duration::from_secs(1));
        next.await.unwrap();
        assert_eq!(store.leases.load(Ordering::SeqCst), 2);
        let stored = store.stored(&id, &manager).await;
        assert_eq!(stored.lease, None);
        assert_eq!(decode_data(&stored.data).unwrap()["n"].get(), "3");
    }

    /// A session handed on whose absolute deadline passed before the next
    /// request took it gives that request a fresh session, with no lease.
    #[tokio::test]
    async fn a_session_handed_on_past_its_deadline_starts_afresh() {
        let clock = ManualClock::starting_now();
        let store = Counting::default();
        let config = SessionConfig::default().with_absolute_timeout(Some(Duration::from_secs(5)));
        let manager = SessionManager::new(store.clone())
            .with_clock(clock.clone())
            .with_config(config)
            .unwrap();
        let (cookie, _) = stored_session(&manager).await;
        let next = hand_on(
            &manager,
            &cookie,
            |_, session| async move { session.is_new() },
        )
        .await;
        clock.advance(Duration::from_secs(6));
        assert!(next.await.unwrap(), "the expired session was handed on");
        assert_eq!(store.leases.load(Ordering::SeqCst), 1);
    }

    /// A lease handed on that nobody takes goes back to the store.
    #[tokio::test]
    async fn an_untaken_handoff_releases_its_lease() {
        let store = Counting::default();
        let manager = SessionManager::new(store.clone());
        let (_, id) = stored_session(&manager).await;
        let (key, now) = (id.key(), manager.now());
        let lease = Lease {
            token: 7,
            until: now.saturating_add(Duration::from_secs(10)),
        };
        let LeaseOutcome::Taken(record) = store.inner.lease(&key, lease, now).await.unwrap() else {
            panic!("not leased");
        };
        drop(Handoff {
            manager: manager.clone(),
            key,
            record: Some(record),
            token: 7,
        });
        for _ in 0..100 {
            if store
                .inner
                .load(&key, now)
                .await
                .unwrap()
                .unwrap()
                .lease
                .is_none()
            {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the lease is still held");
    }

    /// What a request leaves to its finish decides whether the layer may
    /// skip it: only a request whose session was never loaded, or a plain
    /// session left as loaded and touched recently, needs nothing of the store.
    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn only_requests_that_leave_nothing_to_store_finish_without_it() {
        let clock = ManualClock::starting_now();
        let store = MemoryStore::new();
        let manager = SessionManager::new(store.clone())
            .with_clock(clock.clone())
            .with_config(SessionConfig::default().with_touch_interval(Duration::from_secs(60)))
            .unwrap();
        let (header, id) = stored_session(&manager).await;
        let stored = || async { store.load(&id.key(), manager.now()).await.unwrap().unwrap() };
        let saved = stored().await;

        let never_loaded = manager.start(Some(&header));
        assert!(never_loaded.finish_without_store());
        let read = manager.start(Some(&header));
        assert_eq!(
            read.session().await.unwrap().get::<i64>("n").unwrap(),
            Some(1)
        );
        assert!(read.finish_without_store());
        assert_eq!(
            read.finish(Outcome::Success).await.unwrap(),
            None,
            "finished once"
        );
        assert_eq!(stored().await, saved);

        type Change = fn(&Session);
        let changes: [(&str, Change); 4] = [
            ("insert", |session| session.insert("n", 2).unwrap()),
            ("set_user", |session| session.set_user("ada")),
            ("cycle_id", Session::cycle_id),
            ("expire", Session::expire),
        ];
        for (name, change) in changes {
            let request = manager.start(Some(&header));
            change(&request.session().await.unwrap());
            assert!(!request.finish_without_store(), "{name}");
        }
        let exclusive = manager.start(Some(&header));
        exclusive.exclusive_session().await.unwrap();
        assert!(!exclusive.finish_without_store(), "a lease to release");
        exclusive.finish(Outcome::Success).await.unwrap();
        let fresh = manager.start(None);
        fresh.session().await.unwrap();
        assert!(!fresh.finish_without_store(), "a session not stored");
        let stale = manager.start(Some("id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        stale.session().await.unwrap();
        assert!(!stale.finish_without_store(), "a cookie to revoke");

        clock.advance(Duration::from_secs(61));
        let due = manager.start(Some(&header));
        due.session().await.unwrap();
        assert!(!due.finish_without_store(), "a touch is due");
    }

    #[tokio::test]
    async fn exclusive_after_plain_in_one_request_is_a_usage_error() {
        let manager = SessionManager::new(MemoryStore::new());
        let request = manager.start(None);
        request.session().await.unwrap();
        assert!(request.exclusive_session().await.unwrap_err().is_usage());
    }

    /// `finish` is public: a second call must not save again, whatever the
    /// first one left in the request (its changes, its lease token).
    #[tokio::test]
    async fn a_second_finish_saves_nothing() {
        let store = MemoryStore::new();
        let manager = SessionManager::new(store.clone());
        let (header, id) = stored_session(&manager).await;
        let stored = || async { store.load(&id.key(), manager.now()).await.unwrap().unwrap() };

        let exclusive = manager.start(Some(&header));
        exclusive
            .exclusive_session()
            .await
            .unwrap()
            .insert("n", 2)
            .unwrap();
        exclusive.finish(Outcome::Success).await.unwrap();
        let saved = stored().await;
        assert_eq!(exclusive.finish(Outcome::Success).await.unwrap(), None);
        assert_eq!(stored().await, saved, "the lease token saved nothing more");

        let login = manager.start(Some(&header));
        login.session().await.unwrap().set_user("ada");
        login.finish(Outcome::Success).await.unwrap().unwrap();
        let sessions = store.count().await.unwrap();
        assert_eq!(login.finish(Outcome::Success).await.unwrap(), None);
        assert_eq!(store.count().await.unwrap(), sessions);
    }

    #[test]
    fn the_first_valid_cookie_of_our_name_wins() {
        let manager = SessionManager::new(MemoryStore::new());
        let id = SessionId::generate();
        let header = format!("other=1; id=../x; id={id}");
        assert!(
            matches!(manager.start(Some(&header)).incoming, Incoming::Id(ref parsed) if *parsed == id)
        );
        assert!(matches!(
            manager.start(Some("id=../x")).incoming,
            Incoming::Malformed
        ));
        assert!(matches!(
            manager.start(Some("ids=x")).incoming,
            Incoming::Absent
        ));
    }
}
