//! The public conformance suite: one set of cases every store must pass.
//!
//! A store crate stamps the whole suite into its tests with
//! [`conformance_tests!`](crate::conformance_tests), giving it a factory
//! that returns a fresh, isolated, set-up store (a unique table, prefix or
//! directory per call: the cases run in parallel). The factory returns
//! `None` to skip when its server is unreachable; [`require_server`] makes
//! that decision uniformly: a failure under `CI=true`, a loud warning
//! elsewhere, never a silent pass.
//!
//! The cases cover the store contract (round trip, create collision,
//! compare-and-swap, no resurrection, rename, touch, expiry, purge, paging,
//! per-user index, 64 concurrent writers) and the manager's guarantees on
//! top of the store (merging, leases, logout winning, corrupt and oversized
//! data, no raw id in the store).
//!
//! ```no_run
//! use std::sync::Arc;
//! use session2::{MemoryStore, SessionStore};
//!
//! async fn factory() -> Option<Arc<dyn SessionStore>> {
//!     Some(Arc::new(MemoryStore::new()))
//! }
//!
//! session2::conformance_tests!(factory);
//! # fn main() {}
//! ```

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{
    Clock, CreateOutcome, Lease, LeaseOutcome, ManualClock, Outcome, Record, SessionConfig,
    SessionId, SessionKey, SessionManager, SessionStore, SystemClock, Timestamp,
};

/// Stamps one `#[test]` per conformance case, each calling `$factory` for a
/// fresh store. See the [module docs](crate::testing).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance_tests!(@cases $factory;
            round_trip_keeps_every_field,
            create_reports_collision_and_never_overwrites,
            create_may_replace_an_expired_record,
            replace_is_compare_and_swap,
            replace_never_resurrects_a_deleted_record,
            replace_fails_on_an_expired_record,
            delete_honours_the_expected_version,
            rename_moves_a_session_only_from_the_expected_version,
            a_session_is_never_renamed_onto_its_own_key,
            touch_moves_only_the_idle_deadline,
            touch_never_passes_the_absolute_deadline,
            load_hides_idle_and_absolute_expired_records,
            purge_removes_exactly_the_expired,
            purge_follows_every_move_of_the_expiry,
            a_prolonged_record_lives_past_its_first_expiry,
            list_pages_in_key_order,
            find_by_user_follows_rotation_and_delete,
            concurrent_compare_and_swap_loses_nothing,
            concurrent_saves_of_many_sessions_keep_every_field,
            concurrent_loads_each_get_their_own_record,
            concurrent_leases_and_saves_each_get_their_own_outcome,
            large_record_round_trips,
            corrupt_data_reads_as_a_fresh_session,
            oversized_session_is_refused_at_insert,
            no_raw_session_id_reaches_the_store,
            merge_keeps_keys_of_concurrent_requests,
            merge_refuses_the_changes_that_would_outgrow_the_size_limit,
            parallel_saves_keep_what_fits_and_refuse_the_rest,
            a_session_over_the_size_limit_can_still_shrink,
            a_hot_session_keeps_every_parallel_change,
            logout_wins_over_a_slow_request,
            expiry_follows_the_clock,
            lease_excludes_a_second_holder_and_expires,
            lease_is_taken_in_one_step,
            exclusive_increments_lose_nothing,
            failed_request_saves_nothing_and_releases_the_lease,
            a_refused_exclusive_save_releases_its_lease,
            abandoned_request_releases_its_lease,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::testing::run(async {
                    if let Some(store) = $factory().await {
                        $crate::testing::cases::$case(store).await;
                    }
                });
            }
        )*
    };
}

/// Runs a future on a fresh multi-threaded runtime, as the stamped tests do.
pub fn run<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a test runtime starts")
        .block_on(future)
}

/// Decides what an unreachable test server means: under `CI=true` the test
/// fails; elsewhere a loud `SKIPPED` line goes to stderr and `None` comes back.
///
/// # Panics
///
/// Under `CI=true`, when `result` is an error.
pub fn require_server<T, E: Display>(server: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("test server `{server}` is unreachable in CI: {err}")
        }
        Err(err) => {
            eprintln!(
                "\n!!!!!!!! SKIPPED: test server `{server}` is unreachable ({err}); its tests did NOT run !!!!!!!!\n"
            );
            None
        }
    }
}

/// Adds one to the integer `field` of the JSON data map of the record under
/// `key` by compare-and-swap, retrying until it wins and keeping every other
/// field: the load-modify-replace loop a store must make lossless, for
/// tests with many tasks or processes.
///
/// # Panics
///
/// When the store fails, the record is missing, or its data is not a JSON
/// object.
pub async fn increment_by_compare_and_swap(
    store: &dyn SessionStore,
    key: &SessionKey,
    field: &str,
    now: Timestamp,
) {
    loop {
        let current = store
            .load(key, now)
            .await
            .expect("load")
            .expect("the record exists");
        let mut data: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&current.data).expect("the data is a JSON object");
        let value = data
            .get(field)
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        data.insert(field.to_owned(), (value + 1).into());
        let mut next = current.clone();
        next.version += 1;
        next.data = serde_json::to_vec(&data).expect("JSON encodes");
        if store
            .replace(key, current.version, &next, now)
            .await
            .expect("replace")
        {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Renames one session along a chain of keys while another task reads
/// each pair, the new key first, and fails when a read finds the session
/// under both: a store whose [`rename`](SessionStore::rename) is one step
/// never shows that. Every store of this crate but the directory store
/// (whose readers take no lock) runs it; the create-then-delete default
/// fails it, between its two steps.
///
/// # Panics
///
/// When a read finds both keys, or the store fails.
pub async fn a_rename_is_never_seen_half_done(store: Arc<dyn SessionStore>) {
    const RENAMES: usize = 400;
    let now = SystemClock.now();
    let keys: Arc<Vec<SessionKey>> =
        Arc::new((0..=RENAMES).map(|_| SessionId::generate().key()).collect());
    let mut record = Record::new(now, now.saturating_add(Duration::from_secs(1800)), None);
    record.data = br#"{"cart":1}"#.to_vec();
    let created = store.create(&keys[0], &record, now).await.expect("create");
    assert_eq!(created, CreateOutcome::Created);
    // The rename under way: `keys[at]` to `keys[at + 1]`.
    let at = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let (store, keys, at) = (Arc::clone(&store), Arc::clone(&keys), Arc::clone(&at));
        async move {
            let (mut both, mut reads) = (0, 0);
            loop {
                let i = at.load(Ordering::SeqCst);
                if i == RENAMES {
                    return (both, reads);
                }
                // Once the new key is there, the old one must be gone for good.
                let moved = store.load(&keys[i + 1], now).await.expect("load");
                let left = store.load(&keys[i], now).await.expect("load");
                both += usize::from(moved.is_some() && left.is_some());
                reads += 1;
                tokio::task::yield_now().await;
            }
        }
    });
    for i in 0..RENAMES {
        at.store(i, Ordering::SeqCst);
        let version = record.version + i as u64;
        let moved = Record {
            version: version + 1,
            ..record.clone()
        };
        let renamed = store.rename(&keys[i], version, &keys[i + 1], &moved, now);
        assert!(
            renamed.await.expect("rename"),
            "rename {i} found its session"
        );
    }
    at.store(RENAMES, Ordering::SeqCst);
    let (both, reads) = reader.await.expect("the reader finishes");
    assert_eq!(
        both, 0,
        "{both} of {reads} reads found the session under both keys"
    );
    let last = Record {
        version: record.version + RENAMES as u64,
        ..record
    };
    assert_eq!(
        store.load(&keys[RENAMES], now).await.expect("load"),
        Some(last)
    );
}

/// The conformance cases, each taking a fresh store.
pub mod cases {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn real_now() -> Timestamp {
        SystemClock.now()
    }

    fn new_key() -> SessionKey {
        SessionId::generate().key()
    }

    /// A live record created at `now`, idle for 30 minutes, absolute 12 hours.
    fn record_at(now: Timestamp) -> Record {
        Record::new(
            now,
            now.saturating_add(30 * MINUTE),
            Some(now.saturating_add(12 * 60 * MINUTE)),
        )
    }

    fn with_data(mut record: Record, data: &str) -> Record {
        record.data = data.as_bytes().to_vec();
        record
    }

    async fn create(store: &dyn SessionStore, key: &SessionKey, record: &Record, now: Timestamp) {
        let outcome = store.create(key, record, now).await.expect("create");
        assert_eq!(outcome, CreateOutcome::Created);
    }

    fn manager(store: &Arc<dyn SessionStore>, clock: &ManualClock) -> SessionManager {
        SessionManager::from_arc(Arc::clone(store))
            .with_config(SessionConfig::default().with_secure(false))
            .expect("valid config")
            .with_clock(clock.clone())
    }

    /// The `name=value` part of a `Set-Cookie` value.
    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap_or_default().to_owned()
    }

    fn cookie_value(set_cookie: &str) -> String {
        cookie_pair(set_cookie)
            .split_once('=')
            .map(|(_, value)| value.to_owned())
            .unwrap_or_default()
    }

    /// Runs one request that sets `key` to `value`; returns the `Set-Cookie` value.
    async fn request_setting(
        manager: &SessionManager,
        cookie: Option<&str>,
        key: &str,
        value: i64,
    ) -> Option<String> {
        let request = manager.start(cookie);
        request
            .session()
            .await
            .expect("load")
            .insert(key, value)
            .expect("insert");
        request.finish(Outcome::Success).await.expect("save")
    }

    /// Every field written is read back unchanged.
    pub async fn round_trip_keeps_every_field(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let mut record = with_data(record_at(now), r#"{"a":1,"b":"two","c":[1,2,3]}"#);
        record.version = 7;
        record.user = Some("user-é-42".into());
        record.accessed_at = now.saturating_add(Duration::from_millis(5));
        record.lease = Some(Lease {
            token: u64::MAX - 3,
            until: now.saturating_add(MINUTE),
        });
        create(&*store, &key, &record, now).await;
        assert_eq!(store.load(&key, now).await.unwrap(), Some(record.clone()));
        assert_eq!(
            store.load(&new_key(), now).await.unwrap(),
            None,
            "an unknown key loads as None"
        );
        let mut no_absolute = with_data(record_at(now), "{}");
        no_absolute.absolute_deadline = None;
        let other = new_key();
        create(&*store, &other, &no_absolute, now).await;
        assert_eq!(store.load(&other, now).await.unwrap(), Some(no_absolute));
    }

    /// A second create under a live key reports a collision and writes nothing.
    pub async fn create_reports_collision_and_never_overwrites(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let first = with_data(record_at(now), r#"{"owner":"first"}"#);
        create(&*store, &key, &first, now).await;
        let second = with_data(record_at(now), r#"{"owner":"second"}"#);
        assert_eq!(
            store.create(&key, &second, now).await.unwrap(),
            CreateOutcome::Collision
        );
        assert_eq!(store.load(&key, now).await.unwrap(), Some(first));
    }

    /// An expired record does not block a create under its key.
    pub async fn create_may_replace_an_expired_record(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let mut short = record_at(now);
        short.idle_deadline = now.saturating_add(MINUTE);
        create(&*store, &key, &short, now).await;
        let later = now.saturating_add(2 * MINUTE);
        let fresh = with_data(record_at(later), r#"{"new":true}"#);
        assert_eq!(
            store.create(&key, &fresh, later).await.unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(store.load(&key, later).await.unwrap(), Some(fresh));
    }

    /// Replace succeeds only at the stored version.
    pub async fn replace_is_compare_and_swap(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let original = record_at(now);
        create(&*store, &key, &original, now).await;
        let mut next = with_data(original.clone(), r#"{"n":2}"#);
        next.version = 2;
        assert!(
            !store.replace(&key, 5, &next, now).await.unwrap(),
            "a wrong version must lose"
        );
        assert_eq!(store.load(&key, now).await.unwrap(), Some(original));
        assert!(store.replace(&key, 1, &next, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), Some(next.clone()));
        assert!(
            !store.replace(&key, 1, &next, now).await.unwrap(),
            "the old version is stale now"
        );

        // A replace writes the whole record: optional fields can come and go.
        let mut full = next.clone();
        full.version = 3;
        full.user = Some("replace-user".into());
        full.lease = Some(Lease {
            token: 9,
            until: now.saturating_add(MINUTE),
        });
        assert!(store.replace(&key, 2, &full, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), Some(full.clone()));
        let mut bare = full;
        bare.version = 4;
        bare.user = None;
        bare.lease = None;
        bare.absolute_deadline = None;
        assert!(store.replace(&key, 3, &bare, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), Some(bare));
        assert!(
            store
                .find_by_user("replace-user", now)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A replace after a delete does not bring the record back.
    pub async fn replace_never_resurrects_a_deleted_record(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let original = record_at(now);
        create(&*store, &key, &original, now).await;
        assert!(store.delete(&key, None).await.unwrap());
        let mut next = original;
        next.version = 2;
        assert!(!store.replace(&key, 1, &next, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), None);
        assert!(
            !store.replace(&new_key(), 1, &next, now).await.unwrap(),
            "never creates"
        );
    }

    /// A record expired at `now` cannot be replaced.
    pub async fn replace_fails_on_an_expired_record(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let original = record_at(now);
        create(&*store, &key, &original, now).await;
        let later = now.saturating_add(31 * MINUTE);
        let mut next = original;
        next.version = 2;
        assert!(!store.replace(&key, 1, &next, later).await.unwrap());
    }

    /// `delete(key, Some(version))` deletes only at that version.
    pub async fn delete_honours_the_expected_version(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        create(&*store, &key, &record_at(now), now).await;
        assert!(!store.delete(&key, Some(2)).await.unwrap());
        assert!(store.load(&key, now).await.unwrap().is_some());
        assert!(store.delete(&key, Some(1)).await.unwrap());
        assert!(
            !store.delete(&key, None).await.unwrap(),
            "deleting twice reports false"
        );
        assert_eq!(store.load(&key, now).await.unwrap(), None);
    }

    /// Rename moves a session to a new key, with its user index entry,
    /// only from the expected version and never over a live record.
    pub async fn rename_moves_a_session_only_from_the_expected_version(
        store: Arc<dyn SessionStore>,
    ) {
        let now = real_now();
        let user = format!("user-{}", new_key().fingerprint());
        let (old, new) = (new_key(), new_key());
        let mut stored = with_data(record_at(now), r#"{"cart":3}"#);
        stored.user = Some(user.clone());
        create(&*store, &old, &stored, now).await;
        let mut moved = with_data(stored.clone(), r#"{"cart":3,"signed_in":true}"#);
        moved.version = 2;

        assert!(!store.rename(&old, 5, &new, &moved, now).await.unwrap());
        let taken = new_key();
        let holder = with_data(record_at(now), r#"{"other":1}"#);
        create(&*store, &taken, &holder, now).await;
        assert!(!store.rename(&old, 1, &taken, &moved, now).await.unwrap());
        assert!(
            !store
                .rename(&new_key(), 1, &new, &moved, now)
                .await
                .unwrap()
        );
        assert_eq!(store.load(&old, now).await.unwrap(), Some(stored));
        assert_eq!(store.load(&taken, now).await.unwrap(), Some(holder));
        assert_eq!(store.load(&new, now).await.unwrap(), None);

        assert!(store.rename(&old, 1, &new, &moved, now).await.unwrap());
        assert_eq!(store.load(&old, now).await.unwrap(), None);
        assert_eq!(store.load(&new, now).await.unwrap(), Some(moved.clone()));
        let owned: Vec<SessionKey> = store
            .find_by_user(&user, now)
            .await
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(owned, [new]);
        assert_eq!(store.count().await.unwrap(), 2);

        // An expired record under the new key gives way, as to `create`.
        let stale = new_key();
        let mut short = record_at(now);
        short.idle_deadline = now.saturating_add(MINUTE);
        create(&*store, &stale, &short, now).await;
        let later = now.saturating_add(2 * MINUTE);
        let mut again = moved.clone();
        again.version = 3;
        assert!(
            !store.rename(&new, 1, &stale, &again, later).await.unwrap(),
            "an older version is not the expected one either"
        );
        assert!(store.rename(&new, 2, &stale, &again, later).await.unwrap());
        assert_eq!(store.load(&stale, later).await.unwrap(), Some(again));
        assert_eq!(store.load(&new, later).await.unwrap(), None);
        assert_eq!(store.count().await.unwrap(), 2);
    }

    /// A session's own key is never free for it: renamed onto it, live or
    /// expired, it stays as it was (no store replaces it in place).
    pub async fn a_session_is_never_renamed_onto_its_own_key(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let stored = with_data(record_at(now), r#"{"cart":3}"#);
        create(&*store, &key, &stored, now).await;
        let mut renewed = with_data(stored.clone(), r#"{"cart":3,"signed_in":true}"#);
        renewed.version = 2;
        assert!(!store.rename(&key, 1, &key, &renewed, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), Some(stored.clone()));

        // Past its expiry, when its key would be free for any other session.
        let later = stored.expires_at().saturating_add(MINUTE);
        let mut late = record_at(later);
        late.version = 2;
        assert!(!store.rename(&key, 1, &key, &late, later).await.unwrap());
        assert_eq!(store.load(&key, later).await.unwrap(), None);
    }

    /// Touch moves `accessed_at` and the idle deadline, nothing else.
    pub async fn touch_moves_only_the_idle_deadline(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let original = with_data(record_at(now), r#"{"keep":"me"}"#);
        create(&*store, &key, &original, now).await;
        let later = now.saturating_add(20 * MINUTE);
        let deadline = later.saturating_add(30 * MINUTE);
        assert!(store.touch(&key, later, deadline).await.unwrap());
        let touched = store
            .load(&key, now.saturating_add(40 * MINUTE))
            .await
            .unwrap()
            .expect("touch extended the deadline");
        assert_eq!(touched.version, original.version);
        assert_eq!(touched.data, original.data);
        assert_eq!(touched.accessed_at, later);
        assert_eq!(touched.idle_deadline, deadline);
        assert_eq!(touched.absolute_deadline, original.absolute_deadline);
        assert!(
            !store.touch(&new_key(), later, deadline).await.unwrap(),
            "a missing record"
        );
        let after_expiry = deadline.saturating_add(MINUTE);
        assert!(
            !store
                .touch(&key, after_expiry, after_expiry.saturating_add(MINUTE))
                .await
                .unwrap(),
            "an expired record"
        );
    }

    /// A touch whose idle deadline falls after the absolute deadline leaves
    /// the session ending at the absolute one, for loads and for purge.
    pub async fn touch_never_passes_the_absolute_deadline(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let mut record = record_at(now);
        let absolute = record.absolute_deadline.expect("record_at sets one");
        let before = |by: Duration| {
            Timestamp::from_millis(absolute.as_millis() - i64::try_from(by.as_millis()).unwrap())
        };
        record.idle_deadline = before(20 * MINUTE);
        create(&*store, &key, &record, now).await;
        let late = before(30 * MINUTE);
        assert!(
            store
                .touch(&key, late, absolute.saturating_add(30 * MINUTE))
                .await
                .unwrap()
        );
        let just_before = before(MINUTE);
        assert!(store.load(&key, just_before).await.unwrap().is_some());
        assert_eq!(store.purge_expired(just_before).await.unwrap(), 0);
        let after = absolute.saturating_add(MINUTE);
        assert_eq!(store.load(&key, after).await.unwrap(), None);
        assert_eq!(store.purge_expired(after).await.unwrap(), 1);
        assert_eq!(store.count().await.unwrap(), 0);
    }

    /// Neither an idle-expired nor an absolute-expired record is returned.
    pub async fn load_hides_idle_and_absolute_expired_records(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let idle = new_key();
        create(&*store, &idle, &record_at(now), now).await;
        let absolute = new_key();
        let mut record = record_at(now);
        record.idle_deadline = now.saturating_add(24 * 60 * MINUTE);
        record.absolute_deadline = Some(now.saturating_add(45 * MINUTE));
        create(&*store, &absolute, &record, now).await;
        let at_idle_deadline = now.saturating_add(30 * MINUTE);
        assert_eq!(
            store.load(&idle, at_idle_deadline).await.unwrap(),
            None,
            "a deadline equal to now has passed"
        );
        assert!(
            store
                .load(&absolute, at_idle_deadline)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            store
                .load(&absolute, now.saturating_add(46 * MINUTE))
                .await
                .unwrap(),
            None
        );
    }

    /// Purge deletes exactly the records expired at `now`.
    pub async fn purge_removes_exactly_the_expired(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let mut live = Vec::new();
        for i in 0..10 {
            let key = new_key();
            let mut record = record_at(now);
            record.user = Some(format!("purge-user-{}", i % 2));
            if i % 2 == 0 {
                record.idle_deadline = now.saturating_add(10 * MINUTE);
            } else {
                live.push(key);
            }
            create(&*store, &key, &record, now).await;
        }
        let later = now.saturating_add(20 * MINUTE);
        assert_eq!(store.purge_expired(later).await.unwrap(), 5);
        assert_eq!(store.count().await.unwrap(), 5);
        for key in &live {
            assert!(store.load(key, later).await.unwrap().is_some());
        }
        assert!(
            store
                .find_by_user("purge-user-0", now)
                .await
                .unwrap()
                .is_empty(),
            "the user index keeps no purged session"
        );
        assert_eq!(
            store
                .find_by_user("purge-user-1", later)
                .await
                .unwrap()
                .len(),
            5
        );
        assert_eq!(
            store.purge_expired(later).await.unwrap(),
            0,
            "a second purge finds nothing"
        );
    }

    /// Purge uses each record's latest expiry, whether a replace or a touch
    /// moved it later, or a replace moved it earlier.
    pub async fn purge_follows_every_move_of_the_expiry(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let at = |minutes: u32| now.saturating_add(minutes * MINUTE);
        let mut record = record_at(now);
        record.idle_deadline = at(10);
        let (later, earlier) = (new_key(), new_key());
        create(&*store, &later, &record, now).await;
        create(&*store, &earlier, &record, now).await;

        let mut moved = record.clone();
        moved.version += 1;
        moved.idle_deadline = at(20);
        assert!(store.replace(&later, 1, &moved, now).await.unwrap());
        assert!(store.touch(&later, at(5), at(30)).await.unwrap());
        moved.idle_deadline = at(3);
        assert!(store.replace(&earlier, 1, &moved, now).await.unwrap());

        assert_eq!(
            store.purge_expired(at(4)).await.unwrap(),
            1,
            "the moved-earlier record"
        );
        assert!(store.load(&earlier, now).await.unwrap().is_none());
        assert_eq!(
            store.purge_expired(at(25)).await.unwrap(),
            0,
            "past the first and the replaced expiry, before the touched one"
        );
        assert!(store.load(&later, at(25)).await.unwrap().is_some());
        assert_eq!(store.purge_expired(at(31)).await.unwrap(), 1);
        assert!(store.load(&later, now).await.unwrap().is_none());
        assert_eq!(store.count().await.unwrap(), 0);
    }

    /// A record whose expiry a save pushed later is whole and alive past
    /// its first expiry, for every primitive: stores may keep an early
    /// expiry index entry, never an early verdict. Its absolute deadline
    /// still ends it when that comes first.
    pub async fn a_prolonged_record_lives_past_its_first_expiry(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let at = |minutes: u32| now.saturating_add(minutes * MINUTE);
        let key = new_key();
        let mut record = with_data(record_at(now), r#"{"n":1}"#);
        record.user = Some("ada".to_owned());
        record.idle_deadline = at(10);
        record.absolute_deadline = Some(at(40));
        create(&*store, &key, &record, now).await;
        let mut prolonged = record.clone();
        prolonged.version = 2;
        prolonged.accessed_at = at(5);
        prolonged.idle_deadline = at(25);
        assert!(store.replace(&key, 1, &prolonged, at(5)).await.unwrap());

        let past_first = at(15);
        assert_eq!(store.purge_expired(past_first).await.unwrap(), 0);
        assert_eq!(
            store.load(&key, past_first).await.unwrap(),
            Some(prolonged.clone())
        );
        assert_eq!(
            store.find_by_user("ada", past_first).await.unwrap(),
            vec![(key, prolonged.clone())]
        );
        assert_eq!(
            store
                .create(&key, &record_at(past_first), past_first)
                .await
                .unwrap(),
            CreateOutcome::Collision,
            "a live record is never taken for an expired one"
        );
        assert!(store.touch(&key, past_first, at(35)).await.unwrap());
        let lease = Lease {
            token: 9,
            until: at(16),
        };
        assert!(matches!(
            store.lease(&key, lease, past_first).await.unwrap(),
            LeaseOutcome::Taken(_)
        ));
        let mut renewed = store.load(&key, past_first).await.unwrap().unwrap();
        assert_eq!(
            (renewed.version, renewed.idle_deadline, renewed.lease),
            (3, at(35), Some(lease))
        );
        renewed.version = 4;
        renewed.lease = None;
        renewed.idle_deadline = at(50);
        assert!(store.replace(&key, 3, &renewed, past_first).await.unwrap());
        assert_eq!(store.purge_expired(at(39)).await.unwrap(), 0);
        assert_eq!(store.load(&key, at(39)).await.unwrap(), Some(renewed));
        assert_eq!(
            store.purge_expired(at(40)).await.unwrap(),
            1,
            "the absolute deadline ends it"
        );
        assert_eq!(store.count().await.unwrap(), 0);
    }

    /// `list` pages through every record once, in ascending key order.
    pub async fn list_pages_in_key_order(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let mut keys: Vec<SessionKey> = (0..25).map(|_| new_key()).collect();
        for key in &keys {
            create(&*store, key, &record_at(now), now).await;
        }
        keys.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(after.as_ref(), 10).await.unwrap();
            assert!(page.records.len() <= 10);
            seen.extend(page.records.iter().map(|(key, _)| *key));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, keys);
        assert_eq!(store.count().await.unwrap(), 25);
        assert!(
            store
                .list(keys.last(), 10)
                .await
                .unwrap()
                .records
                .is_empty()
        );
    }

    /// The per-user index follows login (id rotation), logout and delete.
    pub async fn find_by_user_follows_rotation_and_delete(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let user = format!("user-{}", new_key().fingerprint());
        let mut cookies = Vec::new();
        for device in 0..3 {
            let set_cookie = request_setting(&manager, None, "device", device)
                .await
                .expect("a new session sets a cookie");
            let request = manager.start(Some(&cookie_pair(&set_cookie)));
            request.session().await.unwrap().set_user(user.clone());
            let renewed = request
                .finish(Outcome::Success)
                .await
                .unwrap()
                .expect("login renews the id");
            assert_ne!(cookie_value(&renewed), cookie_value(&set_cookie));
            let old = manager.start(Some(&cookie_pair(&set_cookie)));
            assert!(
                old.session().await.unwrap().is_new(),
                "the pre-login id no longer works"
            );
            cookies.push(cookie_pair(&renewed));
        }
        let sessions = manager.sessions_of_user(&user).await.unwrap();
        assert_eq!(sessions.len(), 3);
        let expected: Vec<SessionKey> = {
            let mut keys: Vec<_> = cookies
                .iter()
                .map(|cookie| SessionId::parse(&cookie_value(cookie)).unwrap().key())
                .collect();
            keys.sort();
            keys
        };
        let mut found: Vec<_> = sessions.iter().map(|(key, _)| *key).collect();
        found.sort();
        assert_eq!(found, expected);
        assert_eq!(store.count().await.unwrap(), 3);
        let logout = manager.start(Some(&cookies[0]));
        logout.session().await.unwrap().expire();
        logout.finish(Outcome::Success).await.unwrap();
        assert_eq!(manager.sessions_of_user(&user).await.unwrap().len(), 2);
        assert_eq!(manager.delete_user_sessions(&user).await.unwrap(), 2);
        assert!(manager.sessions_of_user(&user).await.unwrap().is_empty());
        assert_eq!(store.count().await.unwrap(), 0);
    }

    /// 64 tasks incrementing one record by compare-and-swap lose nothing.
    pub async fn concurrent_compare_and_swap_loses_nothing(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        create(&*store, &key, &with_data(record_at(now), r#"{"n":0}"#), now).await;
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    increment_by_compare_and_swap(&*store, &key, "n", now).await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let last = store.load(&key, now).await.unwrap().unwrap();
        assert_eq!(last.data, br#"{"n":64}"#);
        assert_eq!(last.version, 65);
    }

    /// 64 sessions saved at once (stores may write them together) each
    /// end as their own save left them, field by field, or untouched when
    /// the save was stale; and purge follows each one's new expiry.
    pub async fn concurrent_saves_of_many_sessions_keep_every_field(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let sessions: Vec<_> = (0..64u64)
            .map(|i| {
                let mut record = with_data(record_at(now), &format!(r#"{{"i":{i}}}"#));
                record.user = (i % 2 == 1).then(|| format!("before-{i}"));
                (new_key(), record)
            })
            .collect();
        for (key, record) in &sessions {
            create(&*store, key, record, now).await;
        }
        // Every sixth save is stale; every fourth brings the expiry earlier
        // (10 minutes instead of 30), the rest push it later (an hour).
        let saves: Vec<_> = sessions
            .iter()
            .zip(0u64..)
            .map(|((key, before), i)| {
                let mut after = with_data(before.clone(), &format!(r#"{{"i":{i},"saved":true}}"#));
                after.version = 2;
                after.accessed_at = now.saturating_add(Duration::from_millis(i));
                after.idle_deadline = now.saturating_add(if i % 4 == 0 { 10 } else { 60 } * MINUTE);
                after.absolute_deadline = (i % 3 != 0).then(|| now.saturating_add(600 * MINUTE));
                after.user = (i % 5 != 0).then(|| format!("after-{i}"));
                after.lease = (i % 7 == 0).then(|| Lease {
                    token: i,
                    until: now.saturating_add(MINUTE),
                });
                let expected_version = if i % 6 == 0 { 9 } else { 1 };
                (*key, expected_version, before.clone(), after)
            })
            .collect();
        let tasks: Vec<_> = saves
            .iter()
            .map(|(key, expected_version, _, after)| {
                let (store, key, expected_version, after) =
                    (Arc::clone(&store), *key, *expected_version, after.clone());
                tokio::spawn(async move {
                    store
                        .replace(&key, expected_version, &after, now)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for (task, (key, expected_version, before, after)) in tasks.into_iter().zip(&saves) {
            let swapped = task.await.unwrap();
            let stored = store.load(key, now).await.unwrap().unwrap();
            if *expected_version == 1 {
                assert!(swapped, "a save at the right version wins");
                assert_eq!(&stored, after);
            } else {
                assert!(!swapped, "a stale save loses");
                assert_eq!(&stored, before);
            }
        }
        // At 20 minutes exactly the sessions whose save brought the expiry to 10 are gone.
        let expired = saves
            .iter()
            .filter(|(_, expected_version, _, after)| {
                *expected_version == 1 && after.expires_at() < now.saturating_add(20 * MINUTE)
            })
            .count();
        let later = now.saturating_add(20 * MINUTE);
        assert_eq!(store.purge_expired(later).await.unwrap(), expired as u64);
        assert_eq!(store.count().await.unwrap(), (64 - expired) as u64);
    }

    /// 64 loads at once (stores may read them together), of live, missing
    /// and expired sessions and some of the same session, each get what a
    /// load of their own gives, as of their own `now`.
    pub async fn concurrent_loads_each_get_their_own_record(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let mut sessions = Vec::new();
        for i in 0..48u64 {
            let key = new_key();
            let mut record = with_data(record_at(now), &format!(r#"{{"i":{i}}}"#));
            // Every third session ends after 10 minutes instead of 30.
            if i % 3 == 0 {
                record.idle_deadline = now.saturating_add(10 * MINUTE);
            }
            create(&*store, &key, &record, now).await;
            sessions.push((key, Some(record)));
        }
        sessions.extend((0..8).map(|_| (new_key(), None)));
        // Eight more loads of sessions already in the list.
        let repeats: Vec<_> = sessions.iter().step_by(6).take(8).cloned().collect();
        sessions.extend(repeats);
        let later = now.saturating_add(20 * MINUTE);
        let loads: Vec<_> = sessions
            .iter()
            .zip(0u64..)
            .map(|((key, record), i)| {
                // Every other load comes from a request 20 minutes later.
                let at = if i % 2 == 0 { now } else { later };
                let expected = record.clone().filter(|record| !record.is_expired_at(at));
                let (store, key) = (Arc::clone(&store), *key);
                let task = tokio::spawn(async move { store.load(&key, at).await.unwrap() });
                (task, expected)
            })
            .collect();
        for (task, expected) in loads {
            assert_eq!(task.await.unwrap(), expected);
        }
    }

    /// 64 leases and 8 saves at once (stores may make them together), of
    /// live, missing, expired and already leased sessions, and pairs of
    /// leases of one session: each gets what it would get alone, as of its
    /// own `now`, and of each pair exactly one takes the lease.
    pub async fn concurrent_leases_and_saves_each_get_their_own_outcome(
        store: Arc<dyn SessionStore>,
    ) {
        let now = real_now();
        let later = now.saturating_add(20 * MINUTE);
        let held = Lease {
            token: 999,
            until: now.saturating_add(60 * MINUTE),
        };
        let mut sessions = Vec::new();
        for i in 0..56u64 {
            let key = new_key();
            let mut record = with_data(record_at(now), &format!(r#"{{"i":{i}}}"#));
            record.user = (i % 2 == 1).then(|| format!("user-{i}"));
            // Every fourth session ends after 10 minutes instead of 30.
            if i % 4 == 0 {
                record.idle_deadline = now.saturating_add(10 * MINUTE);
            }
            // Sessions 32 to 39 are leased by someone else already.
            if (32..40).contains(&i) {
                record.lease = Some(held);
            }
            create(&*store, &key, &record, now).await;
            sessions.push((key, Some(record)));
        }
        sessions.extend((0..8).map(|_| (new_key(), None)));
        let lease_of = |i: u64, at: Timestamp| Lease {
            token: 1 + i,
            until: at.saturating_add(MINUTE),
        };
        // Lone leases (0..32 and 32..40 and the missing ones), then a
        // second lease of each of 40..48 for pairs, then saves of 48..56.
        let mut leases = Vec::new();
        for (i, (key, record)) in (0u64..).zip(&sessions) {
            if (48..56).contains(&i) {
                continue;
            }
            // Every other lease comes from a request 20 minutes later.
            let at = if i % 2 == 0 { now } else { later };
            leases.push((i, *key, record.clone(), lease_of(i, at), at));
        }
        for i in 40..48u64 {
            // At the first lease's `now`: a lease that ran out by a later
            // request's clock is rightly taken again.
            let (key, record) = &sessions[i as usize];
            let at = if i % 2 == 0 { now } else { later };
            leases.push((i, *key, record.clone(), lease_of(100 + i, at), at));
        }
        let lease_tasks: Vec<_> = leases
            .iter()
            .map(|(_, key, _, lease, at)| {
                let (store, key, lease, at) = (Arc::clone(&store), *key, *lease, *at);
                tokio::spawn(async move { store.lease(&key, lease, at).await.unwrap() })
            })
            .collect();
        let save_tasks: Vec<_> = sessions[48..56]
            .iter()
            .map(|(key, record)| {
                let mut after = record.clone().expect("a live session");
                after.version = 2;
                after.data = br#"{"saved":true}"#.to_vec();
                after.user = Some("saver".into());
                let (store, key) = (Arc::clone(&store), *key);
                let task = tokio::spawn({
                    let after = after.clone();
                    async move { store.replace(&key, 1, &after, now).await.unwrap() }
                });
                (key, after, task)
            })
            .collect();
        let mut outcomes = Vec::new();
        for (task, lease) in lease_tasks.into_iter().zip(&leases) {
            outcomes.push((task.await.unwrap(), lease));
        }
        for (outcome, (i, key, record, lease, at)) in &outcomes {
            if (40..48).contains(i) {
                continue;
            }
            let expected = match record {
                Some(record) if record.is_expired_at(*at) => LeaseOutcome::Missing,
                Some(record) if record.lease.is_some() => LeaseOutcome::Held(record.clone()),
                Some(record) => LeaseOutcome::Taken(Record {
                    version: record.version + 1,
                    lease: Some(*lease),
                    ..record.clone()
                }),
                None => LeaseOutcome::Missing,
            };
            assert_eq!(outcome, &expected, "lease {i}");
            if let LeaseOutcome::Taken(taken) = outcome {
                assert_eq!(store.load(key, *at).await.unwrap().as_ref(), Some(taken));
            }
        }
        for pair in 40..48u64 {
            let of_pair: Vec<_> = outcomes
                .iter()
                .filter(|(_, (i, ..))| *i == pair)
                .map(|(outcome, (_, key, ..))| (outcome, key))
                .collect();
            let taken: Vec<_> = of_pair
                .iter()
                .filter_map(|(outcome, _)| match outcome {
                    LeaseOutcome::Taken(record) => Some(record),
                    _ => None,
                })
                .collect();
            assert_eq!(taken.len(), 1, "one lease of pair {pair} is taken");
            let taken = taken[0];
            assert_eq!(taken.version, 2);
            for (outcome, key) in of_pair {
                if let LeaseOutcome::Held(record) = outcome {
                    assert_eq!(
                        record, taken,
                        "the other lease of pair {pair} sees the first"
                    );
                }
                assert_eq!(store.load(key, now).await.unwrap().as_ref(), Some(taken));
            }
        }
        for (key, after, task) in save_tasks {
            assert!(task.await.unwrap(), "a save at the right version wins");
            assert_eq!(store.load(&key, now).await.unwrap(), Some(after));
        }
    }

    /// A 1 MiB data blob round-trips unchanged.
    pub async fn large_record_round_trips(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let blob = format!(r#"{{"blob":"{}"}}"#, "x".repeat(1024 * 1024));
        let record = with_data(record_at(now), &blob);
        create(&*store, &key, &record, now).await;
        assert_eq!(store.load(&key, now).await.unwrap(), Some(record));
    }

    /// Undecodable session data reads as a fresh session: no panic, no error.
    pub async fn corrupt_data_reads_as_a_fresh_session(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let id = SessionId::generate();
        let mut record = record_at(clock.now());
        record.data = b"\xff\x00 not json {".to_vec();
        create(&*store, &id.key(), &record, clock.now()).await;
        assert_eq!(
            store
                .load(&id.key(), clock.now())
                .await
                .unwrap()
                .map(|r| r.data),
            Some(record.data.clone()),
            "opaque bytes are stored as given"
        );
        let cookie = format!("id={id}");
        let request = manager.start(Some(&cookie));
        let session = request
            .session()
            .await
            .expect("a corrupt record is not an error");
        assert!(session.is_new());
        assert_eq!(session.get::<i64>("n").unwrap(), None);
        session.insert("n", 1).unwrap();
        let set_cookie = request
            .finish(Outcome::Success)
            .await
            .unwrap()
            .expect("a fresh session gets a cookie");
        assert_ne!(
            cookie_value(&set_cookie),
            id.to_string(),
            "the old id is not adopted"
        );
    }

    /// An insert that would exceed the size limit fails, and nothing oversized is saved.
    pub async fn oversized_session_is_refused_at_insert(store: Arc<dyn SessionStore>) {
        let manager = SessionManager::from_arc(Arc::clone(&store))
            .with_config(SessionConfig::default().with_max_session_size(4096))
            .unwrap();
        let request = manager.start(None);
        let session = request.session().await.unwrap();
        session.insert("small", "fits").unwrap();
        let err = session.insert("big", "x".repeat(8192)).unwrap_err();
        assert!(err.is_too_large(), "{err}");
        let set_cookie = request.finish(Outcome::Success).await.unwrap().unwrap();
        let next = manager.start(Some(&cookie_pair(&set_cookie)));
        let session = next.session().await.unwrap();
        assert_eq!(
            session.get::<String>("small").unwrap().as_deref(),
            Some("fits")
        );
        assert_eq!(session.get::<String>("big").unwrap(), None);
    }

    /// The raw session id appears in no key and no record the store holds.
    pub async fn no_raw_session_id_reaches_the_store(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let mut ids = Vec::new();
        for n in 0..5 {
            let set_cookie = request_setting(&manager, None, "n", n).await.unwrap();
            let request = manager.start(Some(&cookie_pair(&set_cookie)));
            request
                .session()
                .await
                .unwrap()
                .set_user(format!("user-{n}"));
            let renewed = request.finish(Outcome::Success).await.unwrap().unwrap();
            ids.push(cookie_value(&set_cookie));
            ids.push(cookie_value(&renewed));
        }
        let page = store.list(None, 100).await.unwrap();
        assert_eq!(page.records.len(), 5);
        for (key, record) in &page.records {
            let stored = format!(
                "{} {}",
                key.to_hex(),
                String::from_utf8_lossy(&record.encode())
            );
            for id in &ids {
                assert!(!stored.contains(id.as_str()), "raw id found in the store");
                let id_bytes = SessionId::parse(id).unwrap();
                assert_ne!(
                    key,
                    &SessionKey::from_bytes(pad(id_bytes.to_string().as_bytes()))
                );
            }
        }
    }

    fn pad(bytes: &[u8]) -> [u8; 32] {
        let mut padded = [0u8; 32];
        let len = bytes.len().min(32);
        padded[..len].copy_from_slice(&bytes[..len]);
        padded
    }

    /// Two requests of one session writing different keys keep both.
    pub async fn merge_keeps_keys_of_concurrent_requests(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let cookie = cookie_pair(&request_setting(&manager, None, "base", 0).await.unwrap());
        let first = manager.start(Some(&cookie));
        let second = manager.start(Some(&cookie));
        first.session().await.unwrap().insert("a", 1).unwrap();
        let second_session = second.session().await.unwrap();
        second_session.insert("b", 2).unwrap();
        second_session.remove("base");
        first.finish(Outcome::Success).await.unwrap();
        second.finish(Outcome::Success).await.unwrap();
        let check = manager.start(Some(&cookie));
        let session = check.session().await.unwrap();
        assert_eq!(session.get::<i64>("a").unwrap(), Some(1));
        assert_eq!(session.get::<i64>("b").unwrap(), Some(2));
        assert_eq!(session.get::<i64>("base").unwrap(), None);
    }

    /// A manager whose sessions hold at most `limit` bytes.
    fn limited_manager(store: &Arc<dyn SessionStore>, limit: usize) -> SessionManager {
        SessionManager::from_arc(Arc::clone(store))
            .with_config(SessionConfig::default().with_max_session_size(limit))
            .expect("valid config")
    }

    /// What the session under `cookie` holds: its keys, and its size as
    /// an insert counts it.
    async fn stored_keys(manager: &SessionManager, cookie: &str) -> (Vec<String>, usize) {
        let request = manager.start(Some(cookie));
        let session = request.session().await.unwrap();
        let state = session.lock();
        let size = crate::session::data_size(&state.data);
        (state.data.keys().cloned().collect(), size)
    }

    /// Two requests that each fit the size limit, but not together: the
    /// second save is refused as too large, and only the first's changes
    /// are stored.
    pub async fn merge_refuses_the_changes_that_would_outgrow_the_size_limit(
        store: Arc<dyn SessionStore>,
    ) {
        const LIMIT: usize = 4096;
        let manager = limited_manager(&store, LIMIT);
        let set_cookie = request_setting(&manager, None, "base", 0).await.unwrap();
        let cookie = cookie_pair(&set_cookie);
        let first = manager.start(Some(&cookie));
        let second = manager.start(Some(&cookie));
        first
            .session()
            .await
            .unwrap()
            .insert("a", "x".repeat(2500))
            .unwrap();
        let second_session = second.session().await.unwrap();
        second_session.insert("b", "y".repeat(2500)).unwrap();
        second_session.insert("base", 1).unwrap();
        first.finish(Outcome::Success).await.unwrap();
        let key = SessionId::parse(&cookie_value(&set_cookie)).unwrap().key();
        let version = |record: Option<Record>| record.expect("stored").version;
        let saved = version(store.load(&key, real_now()).await.unwrap());
        let err = second.finish(Outcome::Success).await.unwrap_err();
        assert!(err.is_too_large(), "{err}");
        let after = version(store.load(&key, real_now()).await.unwrap());
        assert_eq!(after, saved, "a refused save writes nothing");
        let (keys, size) = stored_keys(&manager, &cookie).await;
        assert_eq!(keys, ["a", "base"]);
        assert!(size <= LIMIT, "{size} bytes stored");
        let check = manager.start(Some(&cookie));
        let session = check.session().await.unwrap();
        assert_eq!(
            session.get::<i64>("base").unwrap(),
            Some(0),
            "nothing of the refused save"
        );
    }

    /// Parallel saves of one session that fit the size limit each, and
    /// only two at a time: every save but one is stored, the other is
    /// refused as too large, whatever order they are written in.
    pub async fn parallel_saves_keep_what_fits_and_refuse_the_rest(store: Arc<dyn SessionStore>) {
        const LIMIT: usize = 4096;
        let manager = limited_manager(&store, LIMIT);
        let cookie = cookie_pair(&request_setting(&manager, None, "base", 0).await.unwrap());
        let mut requests = Vec::new();
        for name in ["a", "b", "c"] {
            let request = Arc::new(manager.start(Some(&cookie)));
            request
                .session()
                .await
                .unwrap()
                .insert(name, "z".repeat(1500))
                .unwrap();
            requests.push((name, request));
        }
        let saves: Vec<_> = requests
            .into_iter()
            .map(|(name, request)| {
                let save = tokio::spawn(async move { request.finish(Outcome::Success).await });
                (name, save)
            })
            .collect();
        let mut kept = vec!["base"];
        let mut refused = 0;
        for (name, save) in saves {
            match save.await.unwrap() {
                Ok(_) => kept.push(name),
                Err(err) if err.is_too_large() => refused += 1,
                Err(err) => panic!("unexpected error: {err}"),
            }
        }
        assert_eq!(refused, 1);
        kept.sort_unstable();
        let (keys, size) = stored_keys(&manager, &cookie).await;
        assert_eq!(keys, kept);
        assert!(size <= LIMIT, "{size} bytes stored");
    }

    /// A session already over the size limit (a process with a larger
    /// limit wrote it) still saves a request that makes it smaller.
    pub async fn a_session_over_the_size_limit_can_still_shrink(store: Arc<dyn SessionStore>) {
        let roomy = limited_manager(&store, 64 * 1024);
        let request = roomy.start(None);
        let session = request.session().await.unwrap();
        for name in ["a", "b", "c"] {
            session.insert(name, "w".repeat(2500)).unwrap();
        }
        let cookie = cookie_pair(&request.finish(Outcome::Success).await.unwrap().unwrap());
        let tight = limited_manager(&store, 4096);
        let request = tight.start(Some(&cookie));
        request.session().await.unwrap().remove("a");
        request.finish(Outcome::Success).await.unwrap();
        let (keys, _) = stored_keys(&tight, &cookie).await;
        assert_eq!(keys, ["b", "c"]);
    }

    /// Parallel requests of one session from two processes (two managers
    /// on one store), all loaded before any saves, keep every change, with
    /// no more writes than requests: saves batched in one process are
    /// written together, and compare-and-swap still catches the other
    /// process.
    pub async fn a_hot_session_keeps_every_parallel_change(store: Arc<dyn SessionStore>) {
        const REQUESTS: i64 = 24;
        let clock = ManualClock::starting_now();
        let ours = manager(&store, &clock);
        let theirs = manager(&store, &clock);
        let set_cookie = request_setting(&ours, None, "base", 0).await.unwrap();
        let cookie = cookie_pair(&set_cookie);
        let key = SessionId::parse(&cookie_value(&set_cookie)).unwrap().key();
        let mut requests = Vec::new();
        for index in 0..REQUESTS {
            let manager = if index % 3 == 0 { &theirs } else { &ours };
            let request = Arc::new(manager.start(Some(&cookie)));
            let session = request.session().await.unwrap();
            session.insert(format!("k{index}"), index).unwrap();
            requests.push(request);
        }
        let loaded = store.load(&key, clock.now()).await.unwrap().unwrap();
        let saves: Vec<_> = requests
            .into_iter()
            .map(|request| tokio::spawn(async move { request.finish(Outcome::Success).await }))
            .collect();
        for save in saves {
            save.await.unwrap().unwrap();
        }
        let saved = store.load(&key, clock.now()).await.unwrap().unwrap();
        assert!(saved.version <= loaded.version + REQUESTS as u64);
        let check = ours.start(Some(&cookie));
        let session = check.session().await.unwrap();
        assert_eq!(session.get::<i64>("base").unwrap(), Some(0));
        for index in 0..REQUESTS {
            assert_eq!(
                session.get::<i64>(&format!("k{index}")).unwrap(),
                Some(index)
            );
        }
    }

    /// A request that loaded before a logout cannot bring the session back.
    pub async fn logout_wins_over_a_slow_request(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let cookie = cookie_pair(&request_setting(&manager, None, "n", 1).await.unwrap());
        let slow = manager.start(Some(&cookie));
        slow.session().await.unwrap().insert("n", 2).unwrap();
        let logout = manager.start(Some(&cookie));
        logout.session().await.unwrap().expire();
        let revoked = logout
            .finish(Outcome::Success)
            .await
            .unwrap()
            .expect("logout revokes the cookie");
        assert!(revoked.contains("Max-Age=0"), "{revoked}");
        assert_eq!(slow.finish(Outcome::Success).await.unwrap(), None);
        assert_eq!(
            store.count().await.unwrap(),
            0,
            "the slow request resurrected the session"
        );
        assert!(
            manager
                .start(Some(&cookie))
                .session()
                .await
                .unwrap()
                .is_new()
        );
    }

    /// Idle and absolute timeouts, and touching by read-only requests.
    pub async fn expiry_follows_the_clock(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = manager(&store, &clock);
        let cookie = cookie_pair(&request_setting(&manager, None, "n", 1).await.unwrap());
        for _ in 0..3 {
            clock.advance(20 * MINUTE);
            let read = manager.start(Some(&cookie));
            assert!(
                !read.session().await.unwrap().is_new(),
                "a session read every 20 minutes stays alive"
            );
            assert_eq!(
                read.finish(Outcome::Success).await.unwrap(),
                None,
                "touching sends no cookie for browser-session cookies"
            );
        }
        clock.advance(31 * MINUTE);
        assert!(
            manager
                .start(Some(&cookie))
                .session()
                .await
                .unwrap()
                .is_new(),
            "idle for 31 minutes"
        );

        let cookie = cookie_pair(&request_setting(&manager, None, "n", 1).await.unwrap());
        for _ in 0..40 {
            clock.advance(20 * MINUTE);
            let read = manager.start(Some(&cookie));
            let alive = !read.session().await.unwrap().is_new();
            read.finish(Outcome::Success).await.unwrap();
            if !alive {
                break;
            }
        }
        let request = manager.start(Some(&cookie));
        assert!(
            request.session().await.unwrap().is_new(),
            "the absolute timeout ends even an active session"
        );
        let revoked = request
            .finish(Outcome::Success)
            .await
            .unwrap()
            .expect("the stale cookie is revoked");
        assert!(revoked.contains("Max-Age=0"));
    }

    /// `lease` takes a free lease (version up by one), reports a held one
    /// without writing, and takes a lease again once it has run out.
    pub async fn lease_is_taken_in_one_step(store: Arc<dyn SessionStore>) {
        let now = real_now();
        let key = new_key();
        let lease = |token, until| Lease { token, until };
        assert_eq!(
            store
                .lease(&key, lease(1, now.saturating_add(MINUTE)), now)
                .await
                .unwrap(),
            LeaseOutcome::Missing
        );
        let mut original = with_data(record_at(now), r#"{"n":1}"#);
        // Every field differs from the others, so a lease that hands one
        // back in another's place shows.
        original.user = Some("lease-user".into());
        original.accessed_at = now.saturating_add(Duration::from_millis(5));
        create(&*store, &key, &original, now).await;

        let first = lease(1, now.saturating_add(MINUTE));
        let taken = Record {
            version: 2,
            lease: Some(first),
            ..original.clone()
        };
        assert_eq!(
            store.lease(&key, first, now).await.unwrap(),
            LeaseOutcome::Taken(taken.clone())
        );
        assert_eq!(store.load(&key, now).await.unwrap(), Some(taken.clone()));
        let second = lease(2, now.saturating_add(2 * MINUTE));
        assert_eq!(
            store.lease(&key, second, now).await.unwrap(),
            LeaseOutcome::Held(taken.clone()),
            "a live lease is not taken twice"
        );
        assert_eq!(store.load(&key, now).await.unwrap(), Some(taken.clone()));

        let later = now.saturating_add(MINUTE);
        let third = lease(3, later.saturating_add(MINUTE));
        assert_eq!(
            store.lease(&key, third, later).await.unwrap(),
            LeaseOutcome::Taken(Record {
                version: 3,
                lease: Some(third),
                ..original.clone()
            }),
            "a lease that ran out is free"
        );
        let expired = now.saturating_add(31 * MINUTE);
        assert_eq!(
            store
                .lease(&key, lease(4, expired.saturating_add(MINUTE)), expired)
                .await
                .unwrap(),
            LeaseOutcome::Missing,
            "an expired record is not leased"
        );
    }

    /// An exclusive session's lease keeps a second holder out until it
    /// expires on its own.
    pub async fn lease_excludes_a_second_holder_and_expires(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        // Two managers over one store: two processes, as far as locking goes.
        let process = || {
            SessionManager::from_arc(Arc::clone(&store))
                .with_config(
                    SessionConfig::default()
                        .with_lock_wait(Duration::from_millis(200))
                        .with_lease_duration(Duration::from_secs(30)),
                )
                .unwrap()
                .with_clock(clock.clone())
        };
        let (first, second) = (process(), process());
        let cookie = cookie_pair(&request_setting(&first, None, "n", 1).await.unwrap());
        let holder = first.start(Some(&cookie));
        holder
            .exclusive_session()
            .await
            .unwrap()
            .insert("n", 2)
            .unwrap();
        let waiter = second.start(Some(&cookie));
        let err = waiter.exclusive_session().await.unwrap_err();
        assert!(err.is_lock_timeout(), "{err}");
        let local_waiter = first.start(Some(&cookie));
        let err = local_waiter.exclusive_session().await.unwrap_err();
        assert!(
            err.is_lock_timeout(),
            "a waiter in the holder's own process too: {err}"
        );
        // The holder's process dies: nothing runs its cleanup, and the lease
        // ends by itself.
        std::mem::forget(holder);
        clock.advance(Duration::from_secs(31));
        let next = second.start(Some(&cookie));
        let session = next
            .exclusive_session()
            .await
            .expect("an expired lease is taken over");
        assert_eq!(
            session.get::<i64>("n").unwrap(),
            Some(1),
            "the dead holder's changes were never saved"
        );
        session.insert("n", 3).unwrap();
        next.finish(Outcome::Success).await.unwrap();
        let record = store
            .load(
                &SessionId::parse(&cookie_value(&cookie)).unwrap().key(),
                clock.now(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            record.lease, None,
            "a finished exclusive session releases its lease"
        );
    }

    /// 32 concurrent read-modify-write requests through the exclusive
    /// session, from two processes (two managers on one store), end at
    /// exactly 32: each process passes the lease on between its own
    /// requests, and the lease still excludes the other process.
    pub async fn exclusive_increments_lose_nothing(store: Arc<dyn SessionStore>) {
        let process = || {
            SessionManager::from_arc(Arc::clone(&store))
                .with_config(SessionConfig::default().with_lock_wait(Duration::from_secs(60)))
                .unwrap()
        };
        let (manager, other) = (process(), process());
        let cookie = cookie_pair(&request_setting(&manager, None, "n", 0).await.unwrap());
        let tasks: Vec<_> = (0..32)
            .map(|index| {
                let manager = if index % 2 == 0 { &manager } else { &other }.clone();
                let cookie = cookie.clone();
                tokio::spawn(async move {
                    let request = manager.start(Some(&cookie));
                    let session = request.exclusive_session().await.unwrap();
                    let n = session.get::<i64>("n").unwrap().unwrap();
                    tokio::task::yield_now().await;
                    session.insert("n", n + 1).unwrap();
                    request.finish(Outcome::Success).await.unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let check = manager.start(Some(&cookie));
        assert_eq!(
            check.session().await.unwrap().get::<i64>("n").unwrap(),
            Some(32)
        );
    }

    /// A 5xx response saves nothing, sends no cookie and frees the lease.
    pub async fn failed_request_saves_nothing_and_releases_the_lease(store: Arc<dyn SessionStore>) {
        let clock = ManualClock::starting_now();
        let manager = SessionManager::from_arc(Arc::clone(&store))
            .with_config(SessionConfig::default().with_lock_wait(Duration::from_millis(200)))
            .unwrap()
            .with_clock(clock.clone());
        let fresh = manager.start(None);
        fresh.session().await.unwrap().insert("n", 1).unwrap();
        assert_eq!(fresh.finish(Outcome::Failure).await.unwrap(), None);
        assert_eq!(store.count().await.unwrap(), 0);

        let cookie = cookie_pair(&request_setting(&manager, None, "n", 1).await.unwrap());
        let failing = manager.start(Some(&cookie));
        let session = failing.exclusive_session().await.unwrap();
        session.insert("n", 2).unwrap();
        session.expire();
        assert_eq!(failing.finish(Outcome::Failure).await.unwrap(), None);
        let next = manager.start(Some(&cookie));
        let session = next
            .exclusive_session()
            .await
            .expect("the failed request released its lease");
        assert_eq!(session.get::<i64>("n").unwrap(), Some(1));
    }

    /// An exclusive save the store cannot take (here: a plain request
    /// grew the session meanwhile, so the exclusive one's changes no
    /// longer fit the size limit) releases its lease: the next exclusive
    /// request goes at once instead of waiting for the lease to expire.
    pub async fn a_refused_exclusive_save_releases_its_lease(store: Arc<dyn SessionStore>) {
        const LIMIT: usize = 4096;
        let manager = SessionManager::from_arc(Arc::clone(&store))
            .with_config(
                SessionConfig::default()
                    .with_max_session_size(LIMIT)
                    .with_lease_duration(Duration::from_secs(600))
                    .with_lock_wait(Duration::from_millis(200)),
            )
            .unwrap();
        let cookie = cookie_pair(&request_setting(&manager, None, "base", 0).await.unwrap());
        let holder = manager.start(Some(&cookie));
        holder
            .exclusive_session()
            .await
            .unwrap()
            .insert("a", "x".repeat(2500))
            .unwrap();
        let plain = manager.start(Some(&cookie));
        plain
            .session()
            .await
            .unwrap()
            .insert("b", "y".repeat(2500))
            .unwrap();
        plain
            .finish(Outcome::Success)
            .await
            .expect("a plain save goes past the lease");
        let err = holder.finish(Outcome::Success).await.unwrap_err();
        assert!(err.is_too_large(), "{err}");
        let key = SessionId::parse(&cookie_value(&cookie)).unwrap().key();
        let record = store.load(&key, real_now()).await.unwrap().unwrap();
        assert_eq!(record.lease, None, "the refused save released its lease");
        let next = manager.start(Some(&cookie));
        let session = next
            .exclusive_session()
            .await
            .expect("the next exclusive request goes at once");
        assert_eq!(session.get::<String>("a").unwrap(), None);
        assert_eq!(
            session.get::<String>("b").unwrap().map(|b| b.len()),
            Some(2500)
        );
        next.finish(Outcome::Success).await.unwrap();
    }

    /// A request dropped before it finished (a client that went away)
    /// releases its lease at once instead of holding the session until the
    /// lease expires.
    pub async fn abandoned_request_releases_its_lease(store: Arc<dyn SessionStore>) {
        let manager = SessionManager::from_arc(Arc::clone(&store))
            .with_config(
                SessionConfig::default()
                    .with_lease_duration(Duration::from_secs(600))
                    .with_lock_wait(Duration::from_secs(30)),
            )
            .unwrap();
        let cookie = cookie_pair(&request_setting(&manager, None, "n", 1).await.unwrap());
        let abandoned = manager.start(Some(&cookie));
        abandoned
            .exclusive_session()
            .await
            .unwrap()
            .insert("n", 99)
            .unwrap();
        drop(abandoned);
        let next = manager.start(Some(&cookie));
        let session = tokio::time::timeout(Duration::from_secs(20), next.exclusive_session())
            .await
            .expect("the abandoned lease was released long before it expired")
            .unwrap();
        assert_eq!(
            session.get::<i64>("n").unwrap(),
            Some(1),
            "nothing of the abandoned request was saved"
        );
        next.finish(Outcome::Success).await.unwrap();
    }
}
