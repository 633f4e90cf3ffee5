//! In-process locks per session key.
//!
//! Exclusive requests for one session that run in the same process queue
//! here, first come first served, instead of polling the store for the
//! lease: only the head of the queue contends for the lease in the store,
//! with the requests of other processes. Entries die with their last user,
//! and dead entries are swept as the map grows, so it never holds more than
//! about twice the sessions in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::SessionKey;

/// A map from session key to an async mutex, shared by every clone of a manager.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<SessionKey, Weak<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

const MIN_SWEEP: usize = 1024;

impl KeyLocks {
    /// The lock of `key`, shared with every other current user of the key.
    pub(crate) fn lock_for(&self, key: &SessionKey) -> Arc<tokio::sync::Mutex<()>> {
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
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        *slot = Arc::downgrade(&lock);
        lock
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
        let locks = KeyLocks::default();
        let key = SessionId::generate().key();
        let first = locks.lock_for(&key);
        assert!(Arc::ptr_eq(&first, &locks.lock_for(&key)));
        drop(first);
        for _ in 0..(MIN_SWEEP * 3) {
            drop(locks.lock_for(&SessionId::generate().key()));
        }
        assert!(locks.len() <= MIN_SWEEP * 2 + 1, "{}", locks.len());
    }
}
