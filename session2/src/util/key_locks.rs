//! In-process locks per session key.
//!
//! Requests for one session that run in the same process meet here
//! instead of racing each other in the store: exclusive requests queue for
//! the lease, first come first served, and only the head contends in the
//! store with other processes; plain saves that lost a compare-and-swap
//! gather in a batch written together. A lock guards a value its holders
//! share (a lease handed on, a batch). Entries die with their last user,
//! and dead entries are swept as the map grows, so it never holds more
//! than about twice the sessions in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::SessionKey;

/// A map from session key to an async mutex over a `T`, shared by every
/// clone of a manager; a key's value starts as `T::default()` whenever its
/// entry is new.
#[derive(Debug)]
pub(crate) struct KeyLocks<T> {
    state: Mutex<State<T>>,
}

#[derive(Debug)]
struct State<T> {
    locks: HashMap<SessionKey, Weak<tokio::sync::Mutex<T>>>,
    sweep_at: usize,
}

impl<T> Default for KeyLocks<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                locks: HashMap::new(),
                sweep_at: 0,
            }),
        }
    }
}

const MIN_SWEEP: usize = 1024;

impl<T: Default> KeyLocks<T> {
    /// The lock of `key`, shared with every other current user of the key.
    pub(crate) fn lock_for(&self, key: &SessionKey) -> Arc<tokio::sync::Mutex<T>> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.locks.len() >= state.sweep_at.max(MIN_SWEEP) {
            state.locks.retain(|_, lock| lock.strong_count() > 0);
            state.sweep_at = state.locks.len() * 2;
        }
        // One hash of the key, whether its entry is alive, dead or missing.
        let slot = state.locks.entry(*key).or_default();
        if let Some(lock) = slot.upgrade() {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(T::default()));
        *slot = Arc::downgrade(&lock);
        lock
    }

    /// The lock of `key` if anyone uses it now, without making one.
    pub(crate) fn existing(&self, key: &SessionKey) -> Option<Arc<tokio::sync::Mutex<T>>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .locks
            .get(key)?
            .upgrade()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().locks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionId;

    #[test]
    fn one_key_shares_one_lock_and_dead_entries_are_swept() {
        let locks = KeyLocks::<()>::default();
        let key = SessionId::generate().key();
        let first = locks.lock_for(&key);
        assert!(Arc::ptr_eq(&first, &locks.lock_for(&key)));
        drop(first);
        for _ in 0..(MIN_SWEEP * 3) {
            drop(locks.lock_for(&SessionId::generate().key()));
        }
        assert!(locks.len() <= MIN_SWEEP * 2 + 1, "{}", locks.len());
    }

    #[test]
    fn only_a_lock_in_use_exists_and_its_value_lives_as_long() {
        let locks = KeyLocks::<Option<u32>>::default();
        let key = SessionId::generate().key();
        assert!(locks.existing(&key).is_none());
        let lock = locks.lock_for(&key);
        *lock.try_lock().unwrap() = Some(7);
        let found = locks.existing(&key).expect("a lock in use");
        assert!(Arc::ptr_eq(&lock, &found));
        assert_eq!(*found.try_lock().unwrap(), Some(7));
        drop((lock, found));
        assert!(locks.existing(&key).is_none());
        assert_eq!(*locks.lock_for(&key).try_lock().unwrap(), None);
    }
}
