//! [`MemoryStore`]: sessions in the process's memory, the original's volatile store.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | no | no | yes | yes: evicted on write and by purge | yes |
//!
//! For tests, development and single-process applications that can afford
//! to log everyone out on restart. An expiry index makes eviction cost
//! proportional to what expired, so dead sessions never pile up; a user index
//! serves [`find_by_user`](crate::SessionStore::find_by_user).
//!
//! ```
//! use session2::{MemoryStore, SessionManager};
//!
//! let manager = SessionManager::new(MemoryStore::new());
//! assert!(!manager.store().capabilities().is_multiprocess_safe);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, btree_map};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::store::{Capabilities, CreateOutcome, LeaseOutcome, Page, SessionStore};
use crate::{Lease, Record, Result, SessionKey, Timestamp};

/// An in-memory store; clones share the same sessions.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<SessionKey, Entry>,
    /// One entry per record, due no later than the record expires: a save
    /// that pushes the expiry later leaves it be, and purge moves an entry
    /// it finds early. So a session that stays in use costs one index move
    /// per idle period, not two tree updates per save.
    by_expiry: BTreeSet<(Timestamp, SessionKey)>,
    by_user: HashMap<String, BTreeSet<SessionKey>>,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    /// The time of the record's `by_expiry` entry: never after its expiry.
    indexed: Timestamp,
}

impl State {
    fn insert(&mut self, key: SessionKey, record: Record) {
        let expires_at = record.expires_at();
        if let Some(user) = &record.user {
            self.by_user.entry(user.clone()).or_default().insert(key);
        }
        match self.records.entry(key) {
            btree_map::Entry::Occupied(mut slot) => {
                let mut indexed = slot.get().indexed;
                if indexed > expires_at {
                    self.by_expiry.remove(&(indexed, key));
                    self.by_expiry.insert((expires_at, key));
                    indexed = expires_at;
                }
                let old = slot.insert(Entry { record, indexed });
                self.unindex_user(&key, &old.record);
            }
            btree_map::Entry::Vacant(slot) => {
                self.by_expiry.insert((expires_at, key));
                slot.insert(Entry {
                    record,
                    indexed: expires_at,
                });
            }
        }
    }

    fn remove(&mut self, key: &SessionKey) -> Option<Record> {
        let old = self.records.remove(key)?;
        self.by_expiry.remove(&(old.indexed, *key));
        self.unindex_user(key, &old.record);
        Some(old.record)
    }

    /// Drops `key` from the user index of `old`, unless the current record
    /// (if any) has the same user.
    fn unindex_user(&mut self, key: &SessionKey, old: &Record) {
        let Some(user) = &old.user else {
            return;
        };
        let current = self.records.get(key).map(|entry| &entry.record);
        if current.and_then(|record| record.user.as_ref()) != Some(user)
            && let Some(keys) = self.by_user.get_mut(user)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    fn get(&self, key: &SessionKey) -> Option<&Record> {
        self.records.get(key).map(|entry| &entry.record)
    }

    fn live(&self, key: &SessionKey, now: Timestamp) -> Option<&Record> {
        self.get(key).filter(|record| !record.is_expired_at(now))
    }

    /// The live record of `key`, to change in place: only where the change
    /// moves neither its expiry nor its user, which the indexes follow.
    fn live_mut(&mut self, key: &SessionKey, now: Timestamp) -> Option<&mut Record> {
        self.records
            .get_mut(key)
            .map(|entry| &mut entry.record)
            .filter(|record| !record.is_expired_at(now))
    }

    fn purge(&mut self, now: Timestamp) -> u64 {
        let mut purged = 0;
        while let Some(&(indexed, key)) = self.by_expiry.first() {
            if indexed > now {
                break;
            }
            let Some(entry) = self.records.get_mut(&key) else {
                self.by_expiry.pop_first();
                continue;
            };
            let expires_at = entry.record.expires_at();
            if expires_at > now {
                // An early entry of a record a save prolonged: move it.
                entry.indexed = expires_at;
                self.by_expiry.pop_first();
                self.by_expiry.insert((expires_at, key));
            } else {
                self.remove(&key);
                purged += 1;
            }
        }
        purged
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent: every
        // mutation is a single insert or remove.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            is_multiprocess_safe: false,
            is_thread_safe: true,
        }
    }

    async fn setup(&self) -> Result<()> {
        Ok(())
    }

    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        Ok(self.state().live(key, now).cloned())
    }

    async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let mut state = self.state();
        state.purge(now);
        if state.records.contains_key(key) {
            return Ok(CreateOutcome::Collision);
        }
        state.insert(*key, record.clone());
        Ok(CreateOutcome::Created)
    }

    async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let mut state = self.state();
        match state.live(key, now) {
            Some(stored) if stored.version == expected_version => {
                state.insert(*key, record.clone());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn lease(&self, key: &SessionKey, lease: Lease, now: Timestamp) -> Result<LeaseOutcome> {
        let mut state = self.state();
        let Some(stored) = state.live_mut(key, now) else {
            return Ok(LeaseOutcome::Missing);
        };
        if stored.is_leased_at(now) {
            return Ok(LeaseOutcome::Held(stored.clone()));
        }
        // A lease moves neither the expiry nor the user.
        stored.take_lease(lease);
        Ok(LeaseOutcome::Taken(stored.clone()))
    }

    async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool> {
        let mut state = self.state();
        match state.get(key) {
            Some(stored) if expected_version.is_none_or(|version| version == stored.version) => {
                state.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Under one lock: at every moment the session is under exactly one key.
    async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let mut state = self.state();
        state.purge(now);
        if state.records.contains_key(new_key)
            || state
                .get(key)
                .is_none_or(|stored| stored.version != expected_version)
        {
            return Ok(false);
        }
        state.remove(key);
        state.insert(*new_key, record.clone());
        Ok(true)
    }

    async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let mut state = self.state();
        let Some(stored) = state.live(key, accessed_at) else {
            return Ok(false);
        };
        let mut touched = stored.clone();
        touched.accessed_at = accessed_at;
        touched.idle_deadline = idle_deadline;
        state.insert(*key, touched);
        Ok(true)
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
        Ok(self.state().purge(now))
    }

    async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page> {
        let state = self.state();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut records: Vec<_> = state
            .records
            .range((start, Bound::Unbounded))
            .take(limit.saturating_add(1))
            .map(|(key, entry)| (*key, entry.record.clone()))
            .collect();
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|(key, _)| *key)
        } else {
            None
        };
        Ok(Page { records, next })
    }

    async fn count(&self) -> Result<u64> {
        Ok(self.state().records.len() as u64)
    }

    async fn find_by_user(&self, user: &str, now: Timestamp) -> Result<Vec<(SessionKey, Record)>> {
        let state = self.state();
        let Some(keys) = state.by_user.get(user) else {
            return Ok(Vec::new());
        };
        Ok(keys
            .iter()
            .filter_map(|key| state.live(key, now).map(|record| (*key, record.clone())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_millis(1_000_000 + minutes * MINUTE)
    }

    fn expiring_at(minutes: i64) -> Record {
        Record::new(at(0), at(minutes), None)
    }

    fn index_of(state: &State) -> Vec<Timestamp> {
        state
            .by_expiry
            .iter()
            .map(|(indexed, _)| *indexed)
            .collect()
    }

    #[test]
    fn a_later_expiry_keeps_the_index_entry_and_an_earlier_one_moves_it() {
        let mut state = State::default();
        let key = SessionKey::from_bytes([1; 32]);
        state.insert(key, expiring_at(10));
        state.insert(key, expiring_at(20));
        assert_eq!(
            index_of(&state),
            vec![at(10)],
            "a save does not touch the index"
        );
        state.insert(key, expiring_at(5));
        assert_eq!(index_of(&state), vec![at(5)], "an entry is never late");
    }

    #[test]
    fn purge_moves_an_early_entry_and_removes_what_expired() {
        let mut state = State::default();
        let (prolonged, ending) = (
            SessionKey::from_bytes([1; 32]),
            SessionKey::from_bytes([2; 32]),
        );
        state.insert(prolonged, expiring_at(10));
        state.insert(prolonged, expiring_at(30));
        state.insert(ending, expiring_at(15));
        assert_eq!(state.purge(at(20)), 1);
        assert_eq!(
            index_of(&state),
            vec![at(30)],
            "the early entry moved to the real expiry"
        );
        assert_eq!(
            state.records[&prolonged].indexed,
            at(30),
            "and the record knows"
        );
        assert!(state.get(&prolonged).is_some() && state.get(&ending).is_none());
        assert_eq!(state.purge(at(29)), 0);
        assert_eq!(state.purge(at(30)), 1);
        assert!(state.records.is_empty() && state.by_expiry.is_empty());
    }
}
