//! [`Session`]: the handle a request handler reads and changes.
//!
//! A handle is loaded once per request by the [`SessionManager`](crate::SessionManager)
//! and is cheap to clone; clones share the same state. Reads and writes are
//! synchronous: the store was already consulted when the handle was made,
//! and the changes are written after the response, in one go.
//!
//! The handle records which keys this request set or removed and whether it
//! changed the user; at save time only those changes are merged into the
//! stored session, so concurrent requests that touch different keys never
//! undo each other.
//!
//! ```
//! # let session = session2::Session::detached();
//! session.insert("theme", "dark")?;
//! assert_eq!(session.get::<String>("theme")?.as_deref(), Some("dark"));
//! session.set_user("user-42"); // also renews the session id at save
//! assert!(session.has_info());
//! # Ok::<_, session2::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::record::{DataMap, EMPTY_DATA, entry_size};
use crate::{Error, Record, Result, SessionId, SessionKey, Timestamp};

/// A request's view of its session: user, typed data, timestamps, logout
/// and id renewal.
///
/// Cheap to clone; clones share state. Reads and writes are synchronous;
/// the [`SessionManager`](crate::SessionManager) loaded it before the
/// handler ran and saves this request's changes after the response.
///
/// ```
/// let session = session2::Session::detached();
/// session.insert("cart", vec!["apple", "pear"])?;
/// assert_eq!(session.get::<Vec<String>>("cart")?.map(|cart| cart.len()), Some(2));
/// assert!(session.remove("cart"));
/// # Ok::<_, session2::Error>(())
/// ```
#[derive(Clone)]
pub struct Session {
    state: Arc<Mutex<SessionState>>,
}

/// The session as loaded from the store: the base that changes merge into.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) id: SessionId,
    pub(crate) key: SessionKey,
    pub(crate) record: Record,
}

#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) stored: Option<Stored>,
    pub(crate) data: DataMap,
    pub(crate) user: Option<String>,
    pub(crate) created_at: Timestamp,
    pub(crate) accessed_at: Timestamp,
    /// Keys set (`Some`) or removed (`None`) by this request.
    pub(crate) changes: BTreeMap<String, Option<Box<RawValue>>>,
    pub(crate) user_changed: bool,
    pub(crate) rotate: bool,
    pub(crate) expired: bool,
    /// The token of the lease this request holds, for an exclusive session.
    pub(crate) lease_token: Option<u64>,
    size: usize,
    max_size: usize,
}

impl SessionState {
    pub(crate) fn fresh(now: Timestamp, max_size: usize) -> Self {
        Self {
            stored: None,
            data: DataMap::new(),
            user: None,
            created_at: now,
            accessed_at: now,
            changes: BTreeMap::new(),
            user_changed: false,
            rotate: false,
            expired: false,
            lease_token: None,
            size: EMPTY_DATA.len(),
            max_size,
        }
    }

    pub(crate) fn loaded(stored: Stored, data: DataMap, max_size: usize) -> Self {
        let size = data_size(&data);
        Self {
            data,
            user: stored.record.user.clone(),
            created_at: stored.record.created_at,
            accessed_at: stored.record.accessed_at,
            stored: Some(stored),
            changes: BTreeMap::new(),
            user_changed: false,
            rotate: false,
            expired: false,
            lease_token: None,
            size,
            max_size,
        }
    }

    pub(crate) fn is_dirty(&self) -> bool {
        !self.changes.is_empty() || self.user_changed || self.rotate
    }

    pub(crate) fn has_info(&self) -> bool {
        self.user.is_some() || !self.data.is_empty()
    }
}

/// The encoded size of a data map, as [`crate::record::encode_data`] writes it.
pub(crate) fn data_size(data: &DataMap) -> usize {
    EMPTY_DATA.len()
        + data
            .iter()
            .map(|(key, value)| entry_size(key, value))
            .sum::<usize>()
}

impl Session {
    pub(crate) fn from_state(state: SessionState) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A session attached to no store, for unit tests of handlers and for
    /// documentation examples; nothing it holds is ever saved.
    pub fn detached() -> Self {
        Self::from_state(SessionState::fresh(Timestamp::from_millis(0), usize::MAX))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        // Every mutation below leaves the state consistent before it can
        // panic, so a poisoned lock still holds a usable state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The logged-in user's id, if any.
    pub fn user(&self) -> Option<String> {
        self.lock().user.clone()
    }

    /// Logs `user` in. The session id is renewed when the session is saved
    /// (a defence against session fixation); the session's data is kept.
    pub fn set_user(&self, user: impl Into<String>) {
        let mut state = self.lock();
        state.user = Some(user.into());
        state.user_changed = true;
        state.rotate = true;
    }

    /// Forgets the user but keeps the session's data; the id is renewed too.
    pub fn clear_user(&self) {
        let mut state = self.lock();
        if state.user.take().is_some() {
            state.user_changed = true;
            state.rotate = true;
        }
    }

    /// The value under `key`, decoded as `T`; `None` if there is none.
    ///
    /// # Errors
    ///
    /// A decode error if the stored value is not a valid `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let state = self.lock();
        let Some(raw) = state.data.get(key) else {
            return Ok(None);
        };
        serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|err| Error::decode(format_args!("value of `{key}`: {err}")))
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    ///
    /// A too-large error, leaving the session unchanged, if the encoded
    /// session would exceed the configured maximum size; a usage error if
    /// `value` cannot be encoded as JSON.
    pub fn insert(&self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        let key = key.into();
        let raw = serde_json::value::to_raw_value(&value).map_err(|err| {
            Error::usage(format_args!(
                "failed to encode session value `{key}`: {err}"
            ))
        })?;
        let mut state = self.lock();
        let old = state.data.get(&key).map_or(0, |old| entry_size(&key, old));
        let size = state.size - old + entry_size(&key, &raw);
        if size > state.max_size {
            return Err(Error::too_large(size, state.max_size));
        }
        state.size = size;
        state.changes.insert(key.clone(), Some(raw.clone()));
        state.data.insert(key, raw);
        Ok(())
    }

    /// Removes `key`; returns whether it was present.
    pub fn remove(&self, key: &str) -> bool {
        let mut state = self.lock();
        let Some(old) = state.data.remove(key) else {
            return false;
        };
        state.size -= entry_size(key, &old);
        state.changes.insert(key.to_owned(), None);
        true
    }

    /// The keys present, in order.
    pub fn keys(&self) -> Vec<String> {
        self.lock().data.keys().cloned().collect()
    }

    /// Whether the session holds a user or any data: only such a session is
    /// stored and gets a cookie.
    pub fn has_info(&self) -> bool {
        self.lock().has_info()
    }

    /// Whether the session was not in the store when the request began.
    pub fn is_new(&self) -> bool {
        self.lock().stored.is_none()
    }

    /// When the session was created.
    pub fn created_at(&self) -> Timestamp {
        self.lock().created_at
    }

    /// When a request last used the session, before this one.
    pub fn accessed_at(&self) -> Timestamp {
        self.lock().accessed_at
    }

    /// A short, non-secret name of the stored session for logs and pages;
    /// `None` for a session not yet stored.
    pub fn fingerprint(&self) -> Option<String> {
        self.lock()
            .stored
            .as_ref()
            .map(|stored| stored.key.fingerprint())
    }

    /// Logs out: after a successful response the stored session is deleted
    /// and the cookie revoked. Nothing set on this handle afterwards is saved.
    pub fn expire(&self) {
        self.lock().expired = true;
    }

    /// Whether [`Session::expire`] was called.
    pub fn is_expired(&self) -> bool {
        self.lock().expired
    }

    /// Renews the session id at save, keeping user and data.
    pub fn cycle_id(&self) {
        self.lock().rotate = true;
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Session")
            .field(
                "fingerprint",
                &state.stored.as_ref().map(|stored| stored.key.fingerprint()),
            )
            .field("user", &state.user)
            .field("keys", &state.data.keys().collect::<Vec<_>>())
            .field("changed", &state.is_dirty())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(max_size: usize) -> Session {
        Session::from_state(SessionState::fresh(Timestamp::from_millis(0), max_size))
    }

    #[test]
    fn insert_get_remove_record_changes() {
        let session = Session::detached();
        assert!(!session.has_info());
        session.insert("n", 5).unwrap();
        assert_eq!(session.get::<i64>("n").unwrap(), Some(5));
        assert!(session.get::<String>("n").unwrap_err().is_decode());
        assert!(session.remove("n"));
        assert!(!session.remove("n"));
        assert_eq!(session.get::<i64>("n").unwrap(), None);
        let state = session.lock();
        assert!(matches!(state.changes.get("n"), Some(None)));
        assert!(state.is_dirty());
    }

    #[test]
    fn size_limit_refuses_insert_and_keeps_old_value() {
        let session = limited(100);
        session.insert("a", "small").unwrap();
        let err = session.insert("a", "x".repeat(200)).unwrap_err();
        assert!(err.is_too_large(), "{err}");
        assert_eq!(
            session.get::<String>("a").unwrap().as_deref(),
            Some("small")
        );
        let state = session.lock();
        assert_eq!(state.size, data_size(&state.data));
    }

    #[test]
    fn size_tracks_the_encoded_data() {
        let session = limited(usize::MAX);
        session.insert("a", vec![1, 2, 3]).unwrap();
        session.insert("b", "text").unwrap();
        session.insert("a", 1).unwrap();
        session.remove("b");
        let state = session.lock();
        let encoded = crate::record::encode_data(&state.data);
        assert!(
            state.size >= encoded.len(),
            "{} < {}",
            state.size,
            encoded.len()
        );
        assert_eq!(state.size, data_size(&state.data));
    }

    #[test]
    fn set_user_marks_rotation_and_clear_user_too() {
        let session = Session::detached();
        session.set_user("alice");
        assert_eq!(session.user().as_deref(), Some("alice"));
        assert!(session.lock().rotate);
        session.clear_user();
        assert_eq!(session.user(), None);
        assert!(!session.has_info());
    }
}
