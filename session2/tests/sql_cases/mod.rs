//! Cases every SQL store runs beyond the conformance suite, stamped into
//! each store's test file by [`sql_store_cases!`].
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use session2::{CreateOutcome, Record, SessionId, SessionKey, SessionStore, Timestamp};

/// A table name no other case or run uses: `s2test_<unix seconds>_<random>`,
/// so that [`is_stale_test_table`] can tell old ones.
pub fn unique_table_name() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    format!(
        "s2test_{seconds}_{}",
        &SessionId::generate().key().to_hex()[..12]
    )
}

/// Whether `table` is a test table (or its `_schema` companion) made by
/// [`unique_table_name`] more than an hour ago: test runs drop those, so
/// the shared test database does not fill up. Only names of the exact form
/// qualify, so they are safe to quote into a `DROP TABLE`.
pub fn is_stale_test_table(table: &str) -> bool {
    let Some(rest) = table.strip_prefix("s2test_") else {
        return false;
    };
    let Some((seconds, suffix)) = rest.split_once('_') else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let suffix_ok = matches!(suffix.len(), 12 | 19)
        && suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    suffix_ok && seconds.parse::<u64>().is_ok_and(|made| made + 3600 < now)
}

pub fn key() -> SessionKey {
    SessionId::generate().key()
}

pub const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

pub fn record_at(now: Timestamp, ttl: Duration) -> Record {
    Record::new(now, now.saturating_add(ttl), None)
}

/// The primitives on one fresh store, briefly (the full contract is the
/// conformance suite's job).
pub async fn contract_smoke(store: Arc<dyn SessionStore>) {
    let hour = Duration::from_secs(3600);
    let a = key();
    let mut record = record_at(NOW, hour);
    record.user = Some("alice".into());
    record.data = b"\xff\x00 not json at all".to_vec();
    assert_eq!(
        store.create(&a, &record, NOW).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store.create(&a, &record, NOW).await.unwrap(),
        CreateOutcome::Collision
    );
    assert_eq!(store.load(&a, NOW).await.unwrap(), Some(record.clone()));

    // Compare-and-swap.
    let mut next = record.clone();
    next.version = 2;
    next.data = b"{\"n\":1}".to_vec();
    next.lease = Some(session2::Lease {
        token: u64::MAX,
        until: NOW.saturating_add(Duration::from_secs(5)),
    });
    assert!(!store.replace(&a, 7, &next, NOW).await.unwrap());
    assert!(store.replace(&a, 1, &next, NOW).await.unwrap());
    assert!(!store.replace(&a, 1, &next, NOW).await.unwrap());
    assert_eq!(store.load(&a, NOW).await.unwrap(), Some(next.clone()));

    // Touch moves the idle deadline only.
    let later = NOW.saturating_add(Duration::from_secs(60));
    let deadline = later.saturating_add(hour);
    assert!(store.touch(&a, later, deadline).await.unwrap());
    let touched = store.load(&a, later).await.unwrap().unwrap();
    assert_eq!((touched.version, &touched.data), (2, &next.data));
    assert_eq!(
        (touched.accessed_at, touched.idle_deadline),
        (later, deadline)
    );

    // Expiry is decided by `now` alone.
    let past = deadline.saturating_add(Duration::from_millis(1));
    assert_eq!(store.load(&a, deadline).await.unwrap(), None);
    assert!(
        !store
            .touch(&a, past, past.saturating_add(hour))
            .await
            .unwrap()
    );
    assert!(!store.replace(&a, 2, &next, deadline).await.unwrap());
    assert!(store.find_by_user("alice", later).await.unwrap().len() == 1);
    assert!(
        store
            .find_by_user("alice", deadline)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .find_by_user("alice ", later)
            .await
            .unwrap()
            .is_empty()
    );
    // An expired record may be overwritten by create.
    let fresh = record_at(deadline, hour);
    assert_eq!(
        store.create(&a, &fresh, deadline).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(store.load(&a, deadline).await.unwrap(), Some(fresh));

    // Delete, optionally at a version.
    assert!(!store.delete(&a, Some(9)).await.unwrap());
    assert!(store.delete(&a, Some(1)).await.unwrap());
    assert!(!store.delete(&a, None).await.unwrap());
    assert!(!store.replace(&a, 1, &record, NOW).await.unwrap());
    assert_eq!(store.load(&a, NOW).await.unwrap(), None);

    // Purge deletes exactly the records expired at `now`.
    for i in 0..5u64 {
        let ttl = Duration::from_secs(10 * (i + 1));
        store
            .create(&key(), &record_at(NOW, ttl), NOW)
            .await
            .unwrap();
    }
    assert_eq!(store.count().await.unwrap(), 5);
    let purged = store
        .purge_expired(NOW.saturating_add(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(purged, 2);
    assert_eq!(store.count().await.unwrap(), 3);

    // Keyset paging in key order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after.as_ref(), 2).await.unwrap();
        seen.extend(page.records.iter().map(|(key, _)| *key));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3);
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(store.list(None, 0).await.unwrap().records.is_empty());
}

/// `setup()` again, from a second store object too, loses nothing.
pub async fn setup_twice_keeps_sessions(
    store: Arc<dyn SessionStore>,
    again: Arc<dyn SessionStore>,
) {
    let keys: Vec<_> = (0..3).map(|_| key()).collect();
    for key in &keys {
        let record = record_at(NOW, Duration::from_secs(3600));
        store.create(key, &record, NOW).await.unwrap();
    }
    store.setup().await.unwrap();
    again.setup().await.unwrap();
    again.setup().await.unwrap();
    assert_eq!(again.count().await.unwrap(), 3);
    for key in &keys {
        assert!(again.load(key, NOW).await.unwrap().is_some());
    }
}

/// A 10 MiB data blob of every byte value comes back intact.
pub async fn large_data_round_trips(store: Arc<dyn SessionStore>) {
    let mut record = record_at(NOW, Duration::from_secs(3600));
    record.data = (0..10 * 1024 * 1024)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let k = key();
    assert_eq!(
        store.create(&k, &record, NOW).await.unwrap(),
        CreateOutcome::Created
    );
    let loaded = store.load(&k, NOW).await.unwrap().unwrap();
    assert!(loaded.data == record.data, "10 MiB data came back changed");
    let mut next = record.clone();
    next.version = 2;
    next.data.reverse();
    assert!(store.replace(&k, 1, &next, NOW).await.unwrap());
    assert!(store.load(&k, NOW).await.unwrap().unwrap().data == next.data);
}

/// The `expires_at` column is purge's index, which saves leave alone while
/// the expiry moves later (so that a save writes no index entry), lower
/// when it moves earlier, and which purge moves to the real expiry of a
/// live row. `indexed` reads the column of a key straight from the table.
pub async fn expiry_index_moves_only_when_it_must<F, Fut>(store: Arc<dyn SessionStore>, indexed: F)
where
    F: Fn(SessionKey) -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let minute = Duration::from_secs(60);
    let at = |minutes: u32| NOW.saturating_add(minutes * minute);
    let a = key();
    let mut record = record_at(NOW, 10 * minute);
    store.create(&a, &record, NOW).await.unwrap();
    assert_eq!(indexed(a).await, at(10).as_millis());

    let mut save = |idle: u32, user: Option<&str>| {
        let expected = record.version;
        record.version += 1;
        record.idle_deadline = at(idle);
        record.user = user.map(str::to_owned);
        (expected, record.clone())
    };
    let (expected, later) = save(20, None);
    assert!(store.replace(&a, expected, &later, NOW).await.unwrap());
    assert_eq!(indexed(a).await, at(10).as_millis(), "a later expiry");
    let (expected, login) = save(30, Some("ada"));
    assert!(store.replace(&a, expected, &login, NOW).await.unwrap());
    assert_eq!(indexed(a).await, at(10).as_millis(), "a new user");
    let (expected, earlier) = save(3, Some("ada"));
    assert!(store.replace(&a, expected, &earlier, NOW).await.unwrap());
    assert_eq!(indexed(a).await, at(3).as_millis(), "an earlier expiry");
    let (expected, again) = save(40, None);
    assert!(store.replace(&a, expected, &again, NOW).await.unwrap());
    assert_eq!(store.load(&a, at(5)).await.unwrap(), Some(again));

    assert_eq!(store.purge_expired(at(5)).await.unwrap(), 0);
    assert_eq!(indexed(a).await, at(40).as_millis(), "purge moved it");
    assert_eq!(store.purge_expired(at(40)).await.unwrap(), 1);
}

/// Stamps the SQL-store cases into a test file that has `store()` (a fresh,
/// set-up store on a unique table, or `None` when the server is down),
/// `store_on(table)`, `url()` and `indexed_expiry(table, key)` (the raw
/// `expires_at` column of a row).
macro_rules! sql_store_cases {
    () => {
        /// Rename is one `UPDATE`: no reader finds a session under both keys.
        #[test]
        fn a_rename_is_never_seen_half_done() {
            session2::testing::run(async {
                if let Some(store) = store().await {
                    session2::testing::a_rename_is_never_seen_half_done(store).await;
                }
            });
        }

        #[test]
        fn primitives_work() {
            session2::testing::run(async {
                if let Some(store) = store().await {
                    sql_cases::contract_smoke(store).await;
                }
            });
        }

        #[test]
        fn setup_twice_on_a_table_holding_sessions_loses_nothing() {
            session2::testing::run(async {
                let table = sql_cases::unique_table_name();
                if let (Some(first), Some(second)) =
                    (store_on(&table).await, store_on(&table).await)
                {
                    sql_cases::setup_twice_keeps_sessions(first, second).await;
                }
            });
        }

        #[test]
        fn saves_leave_the_expiry_index_alone_until_purge() {
            session2::testing::run(async {
                let table = sql_cases::unique_table_name();
                if let Some(store) = store_on(&table).await {
                    let indexed = |key| {
                        let table = table.clone();
                        async move { indexed_expiry(&table, &key).await }
                    };
                    sql_cases::expiry_index_moves_only_when_it_must(store, indexed).await;
                }
            });
        }

        #[test]
        fn ten_mebibytes_of_data_round_trip() {
            session2::testing::run(async {
                if let Some(store) = store().await {
                    sql_cases::large_data_round_trips(store).await;
                }
            });
        }

        #[test]
        fn url_opens_the_table_it_names() {
            session2::testing::run(async {
                if store().await.is_none() {
                    return;
                }
                let table = sql_cases::unique_table_name();
                let named = format!("{}?table={table}", url());
                let first = session2::store::open(&named).await.unwrap();
                first.setup().await.unwrap();
                let second = session2::store::open(&named).await.unwrap();
                let other = format!("{}?table={}", url(), sql_cases::unique_table_name());
                let other = session2::store::open(&other).await.unwrap();
                other.setup().await.unwrap();
                let key = sql_cases::key();
                let record =
                    sql_cases::record_at(sql_cases::NOW, std::time::Duration::from_secs(60));
                first.create(&key, &record, sql_cases::NOW).await.unwrap();
                assert_eq!(
                    second.load(&key, sql_cases::NOW).await.unwrap(),
                    Some(record)
                );
                assert_eq!(other.count().await.unwrap(), 0);
            });
        }

        #[test]
        fn url_with_sql_in_the_table_name_is_refused() {
            session2::testing::run(async {
                for bad in ["x;DROP TABLE y", "a%20b", "1abc", "t\"", ""] {
                    let url = format!("{}?table={bad}", url());
                    let err = session2::store::open(&url).await.unwrap_err();
                    assert!(err.is_config(), "{url}: {err}");
                }
            });
        }
    };
}
