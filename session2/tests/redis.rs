//! The conformance suite and Redis-specific tests against a real server
//! (`SESSION2_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use session2::store::RedisStore;
use session2::{
    Clock, CreateOutcome, Record, SessionId, SessionKey, SessionStore, SystemClock, Timestamp,
};

/// A fresh store under a random prefix (its own hash tag), or `None` when
/// Redis is unreachable outside CI.
async fn factory() -> Option<Arc<dyn SessionStore>> {
    Some(Arc::new(fresh_store().await?))
}

session2::conformance_tests!(factory);

/// Rename is one step here: no reader finds a session under both keys.
#[test]
fn a_rename_is_never_seen_half_done() {
    session2::testing::run(async {
        if let Some(store) = factory().await {
            session2::testing::a_rename_is_never_seen_half_done(store).await;
        }
    });
}

/// The suite again over RESP3, whose replies have their own types (a
/// missing field is a RESP3 null).
mod resp3 {
    use std::sync::Arc;

    use session2::{SessionId, SessionStore};

    async fn factory() -> Option<Arc<dyn SessionStore>> {
        let prefix = format!("s2resp3-{}", SessionId::generate().key().fingerprint());
        let base = super::redis_url();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}protocol=resp3&prefix={prefix}");
        let store = session2::testing::require_server("redis", session2::store::open(&url).await)?;
        store.setup().await.expect("setup");
        Some(store)
    }

    session2::conformance_tests!(factory);
}

/// The suite again on a store built on the application's own connection
/// ([`RedisStore::new`]) rather than from a URL.
mod on_the_applications_connection {
    use std::sync::Arc;

    use redis::aio::ConnectionManager;
    use session2::store::RedisStore;
    use session2::{SessionId, SessionStore};

    async fn factory() -> Option<Arc<dyn SessionStore>> {
        let prefix = format!("s2script-{}", SessionId::generate().key().fingerprint());
        let client = redis::Client::open(super::redis_url()).expect("redis URL");
        let connection =
            session2::testing::require_server("redis", ConnectionManager::new(client).await)?;
        let store = RedisStore::new(connection).with_prefix(prefix);
        store.setup().await.expect("setup");
        Some(Arc::new(store))
    }

    session2::conformance_tests!(factory);
}

fn redis_url() -> String {
    std::env::var("SESSION2_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn fresh_store() -> Option<RedisStore> {
    let prefix = format!("s2test-{}", SessionId::generate().key().fingerprint());
    let store =
        session2::testing::require_server("redis", RedisStore::connect(&redis_url()).await)?
            .with_prefix(prefix);
    store.setup().await.expect("setup");
    Some(store)
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The keys under the store prefix `prefix`, found by `SCAN` in large steps:
/// `KEYS` blocks a shared server, and times out once it holds millions of keys.
async fn keys_under(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let pattern = format!("{{{prefix}}}:*");
    let (mut cursor, mut found) = (0u64, Vec::new());
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(raw)
            .await
            .unwrap();
        found.extend(keys);
        if next == 0 {
            return found;
        }
        cursor = next;
    }
}

fn new_key() -> SessionKey {
    SessionId::generate().key()
}

fn record(now: Timestamp, ttl: Duration, user: Option<&str>) -> Record {
    let mut record = Record::new(now, now.saturating_add(ttl), None);
    record.user = user.map(str::to_owned);
    record
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn primitives_follow_the_contract() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let key = new_key();
    let mut first = record(now, HOUR, Some("alice"));
    first.data = b"\xff\x00 not json at all".to_vec();
    assert_eq!(
        store.create(&key, &first, now).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store.create(&key, &first, now).await.unwrap(),
        CreateOutcome::Collision
    );
    assert_eq!(store.load(&key, now).await.unwrap(), Some(first.clone()));

    let mut second = first.clone();
    second.version = 2;
    second.user = Some("bob".into());
    assert!(!store.replace(&key, 7, &second, now).await.unwrap());
    assert!(store.replace(&key, 1, &second, now).await.unwrap());
    assert!(store.find_by_user("alice", now).await.unwrap().is_empty());
    assert_eq!(
        store.find_by_user("bob", now).await.unwrap(),
        vec![(key, second.clone())]
    );

    let later = now.saturating_add(Duration::from_secs(60));
    let deadline = later.saturating_add(HOUR);
    assert!(store.touch(&key, later, deadline).await.unwrap());
    let touched = store.load(&key, later).await.unwrap().unwrap();
    assert_eq!(
        (touched.version, touched.accessed_at, touched.idle_deadline),
        (2, later, deadline)
    );
    assert_eq!(touched.data, second.data);

    // Expired per the caller's clock although Redis still holds it.
    let far = now.saturating_add(3 * HOUR);
    assert_eq!(store.load(&key, far).await.unwrap(), None);
    assert!(!store.replace(&key, 2, &second, far).await.unwrap());
    assert!(
        !store
            .touch(&key, far, far.saturating_add(HOUR))
            .await
            .unwrap()
    );
    assert!(store.find_by_user("bob", far).await.unwrap().is_empty());
    assert_eq!(store.count().await.unwrap(), 1);

    assert!(!store.delete(&key, Some(1)).await.unwrap());
    assert!(store.delete(&key, Some(2)).await.unwrap());
    assert!(!store.delete(&key, None).await.unwrap());
    assert!(
        !store.replace(&key, 2, &second, now).await.unwrap(),
        "replace recreated a deleted record"
    );
    assert_eq!(store.load(&key, now).await.unwrap(), None);
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test]
async fn list_pages_in_key_order_and_purge_is_exact() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let mut keys: Vec<SessionKey> = (0..25).map(|_| new_key()).collect();
    for (i, key) in keys.iter().enumerate() {
        let ttl = if i % 2 == 0 { HOUR } else { 2 * HOUR };
        store
            .create(key, &record(now, ttl, Some("u")), now)
            .await
            .unwrap();
    }
    keys.sort();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after.as_ref(), 10).await.unwrap();
        seen.extend(page.records.iter().map(|(key, _)| *key));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, keys);
    assert_eq!(store.count().await.unwrap(), 25);
    assert_eq!(
        store.purge_expired(now.saturating_add(HOUR)).await.unwrap(),
        13
    );
    assert_eq!(store.count().await.unwrap(), 12);
    assert_eq!(store.find_by_user("u", now).await.unwrap().len(), 12);
    assert_eq!(
        store.purge_expired(now.saturating_add(HOUR)).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn redis_expires_a_session_by_itself() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let key = new_key();
    store
        .create(
            &key,
            &record(now, Duration::from_millis(300), Some("eve")),
            now,
        )
        .await
        .unwrap();
    let mut raw = raw().await;
    let name = store.session_key_name(&key);
    assert!(raw.exists::<_, bool>(&name).await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !raw.exists::<_, bool>(&name).await.unwrap(),
        "redis kept an expired session"
    );
    // The index entries it left behind are dropped by reads.
    assert_eq!(store.count().await.unwrap(), 0);
    let prefix = store.prefix();
    let exp: usize = raw.zcard(format!("{{{prefix}}}:exp")).await.unwrap();
    assert_eq!(exp, 0);
    assert!(
        store
            .find_by_user("eve", SystemClock.now())
            .await
            .unwrap()
            .is_empty()
    );
    let user_set: usize = raw.scard(format!("{{{prefix}}}:u:eve")).await.unwrap();
    assert_eq!(user_set, 0);
}

#[tokio::test]
async fn purge_leaves_no_index_entries_of_expired_or_deleted_sessions() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let mut live = Vec::new();
    for i in 0..10 {
        let key = new_key();
        let ttl = if i < 6 { HOUR } else { 3 * HOUR };
        store
            .create(&key, &record(now, ttl, Some("carol")), now)
            .await
            .unwrap();
        if i >= 6 {
            live.push(key);
        }
        if i == 0 || i == 9 {
            store.delete(&key, None).await.unwrap();
            live.retain(|k| *k != key);
        }
    }
    assert_eq!(
        store
            .purge_expired(now.saturating_add(2 * HOUR))
            .await
            .unwrap(),
        5
    );
    let mut raw = raw().await;
    let prefix = store.prefix();
    let mut user_set: Vec<String> = raw.smembers(format!("{{{prefix}}}:u:carol")).await.unwrap();
    let mut exp: Vec<String> = raw
        .zrange(format!("{{{prefix}}}:exp"), 0, -1)
        .await
        .unwrap();
    let mut index: Vec<String> = raw
        .zrange(format!("{{{prefix}}}:keys"), 0, -1)
        .await
        .unwrap();
    let owners: usize = raw.hlen(format!("{{{prefix}}}:owner")).await.unwrap();
    let mut expected: Vec<String> = live.iter().map(SessionKey::to_hex).collect();
    for list in [&mut user_set, &mut exp, &mut index, &mut expected] {
        list.sort();
    }
    assert_eq!(user_set, expected);
    assert_eq!(exp, expected);
    assert_eq!(index, expected);
    assert_eq!(owners, expected.len());

    assert_eq!(
        store
            .purge_expired(now.saturating_add(4 * HOUR))
            .await
            .unwrap(),
        3
    );
    let left = keys_under(&mut raw, prefix).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn corrupt_values_are_decode_errors_and_purged() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let mut raw = raw().await;

    let garbage = new_key();
    let _: () = raw
        .set(
            store.session_key_name(&garbage),
            b"\x00\xffgarbage".as_slice(),
        )
        .await
        .unwrap();
    assert!(store.load(&garbage, now).await.unwrap_err().is_decode());

    // A hash, as earlier builds stored sessions, with a garbled field.
    let garbled = new_key();
    store
        .create(&garbled, &record(now, HOUR, Some("dan")), now)
        .await
        .unwrap();
    let hash = store.session_key_name(&garbled);
    let _: () = raw.del(&hash).await.unwrap();
    let _: () = raw
        .hset_multiple(
            &hash,
            &[
                ("version", "not a number"),
                ("expires_at", "1"),
                ("data", ""),
            ],
        )
        .await
        .unwrap();
    assert!(store.load(&garbled, now).await.unwrap_err().is_decode());
    assert!(store.find_by_user("dan", now).await.unwrap().is_empty());
    assert!(store.list(None, 10).await.unwrap().records.is_empty());

    // Both are marked for purge by the failed loads, and purge deletes them.
    assert_eq!(store.count().await.unwrap(), 2);
    assert_eq!(store.purge_expired(now).await.unwrap(), 2);
    assert_eq!(store.count().await.unwrap(), 0);
    let prefix = store.prefix();
    let left = keys_under(&mut raw, prefix).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn open_parses_the_prefix_option() {
    if fresh_store().await.is_none() {
        return;
    }
    let url = format!("{}?prefix=opened-{}", redis_url(), new_key().fingerprint());
    let store = session2::store::open(&url).await.unwrap();
    assert_eq!(store.name(), "redis");
    assert!(store.capabilities().is_multiprocess_safe);
    assert_eq!(store.count().await.unwrap(), 0);
    let trailing = format!("{}?prefix=app:", redis_url());
    let same = session2::store::open(&trailing).await.unwrap();
    assert!(format!("{same:?}").contains(r#"prefix: "app""#), "{same:?}");
    let bad = format!("{}?prefix=a{{b", redis_url());
    assert!(session2::store::open(&bad).await.unwrap_err().is_config());
}

#[tokio::test]
async fn independent_connections_lose_no_update() {
    let Some(first) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let key = new_key();
    let mut initial = record(now, HOUR, None);
    initial.data = br#"{"n":0}"#.to_vec();
    first.create(&key, &initial, now).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        // A separate connection each, as separate processes would have.
        let store = RedisStore::connect(&redis_url())
            .await
            .unwrap()
            .with_prefix(first.prefix());
        for _ in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    session2::testing::increment_by_compare_and_swap(&store, &key, "n", now).await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = first.load(&key, now).await.unwrap().unwrap();
    assert_eq!(last.data, br#"{"n":400}"#);
    assert_eq!(last.version, 401);
}

#[tokio::test]
async fn an_unreachable_server_is_a_prompt_backend_error() {
    let started = std::time::Instant::now();
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(err.is_backend(), "{err}");
    assert!(err.to_string().contains("redis"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "connect hung");
    let err = session2::store::open("redis://127.0.0.1:1/0?prefix=x")
        .await
        .unwrap_err();
    assert!(err.is_backend(), "{err}");
}

#[tokio::test]
async fn saves_that_move_the_expiry_later_leave_the_index_to_purge() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let key = new_key();
    let first = record(now, HOUR, Some("dave"));
    store.create(&key, &first, now).await.unwrap();
    let mut raw = raw().await;
    let prefix = store.prefix().to_owned();
    let score = |raw: &mut redis::aio::MultiplexedConnection| {
        let mut raw = raw.clone();
        let (prefix, hex) = (prefix.clone(), key.to_hex());
        async move {
            let score: Option<i64> = raw.zscore(format!("{{{prefix}}}:exp"), hex).await.unwrap();
            score
        }
    };
    let first_expiry = first.expires_at().as_millis();
    assert_eq!(score(&mut raw).await, Some(first_expiry));

    let mut later = first.clone();
    later.version = 2;
    later.idle_deadline = now.saturating_add(2 * HOUR);
    assert!(store.replace(&key, 1, &later, now).await.unwrap());
    assert_eq!(
        score(&mut raw).await,
        Some(first_expiry),
        "an expiry moved later does not rewrite the index"
    );

    // Purge past the indexed score finds the session alive and moves its entry.
    let between = now.saturating_add(HOUR + Duration::from_secs(60));
    assert_eq!(store.purge_expired(between).await.unwrap(), 0);
    assert_eq!(score(&mut raw).await, Some(later.expires_at().as_millis()));
    assert!(store.load(&key, between).await.unwrap().is_some());

    let mut earlier = later.clone();
    earlier.version = 3;
    earlier.idle_deadline = now.saturating_add(Duration::from_secs(600));
    assert!(store.replace(&key, 2, &earlier, now).await.unwrap());
    assert_eq!(
        score(&mut raw).await,
        Some(earlier.expires_at().as_millis()),
        "an expiry moved earlier rewrites the index at once"
    );
    assert_eq!(
        store
            .purge_expired(now.saturating_add(Duration::from_secs(601)))
            .await
            .unwrap(),
        1
    );
    let left = keys_under(&mut raw, &prefix).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn one_purge_batch_cleans_the_indexes_of_many_users() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let users = [
        Some("fay"),
        Some("gus"),
        None,
        Some("fay"),
        Some("gus"),
        None,
    ];
    let mut keys = Vec::new();
    for user in users {
        let key = new_key();
        store
            .create(&key, &record(now, HOUR, user), now)
            .await
            .unwrap();
        keys.push(key);
    }
    let survivor = new_key();
    store
        .create(&survivor, &record(now, 3 * HOUR, Some("fay")), now)
        .await
        .unwrap();
    // A hash Redis already dropped by itself: only its index entries are left.
    let mut raw = raw().await;
    let _: () = raw.del(store.session_key_name(&keys[1])).await.unwrap();

    let later = now.saturating_add(2 * HOUR);
    assert_eq!(store.purge_expired(later).await.unwrap(), 5);
    let prefix = store.prefix();
    let fay: Vec<String> = raw.smembers(format!("{{{prefix}}}:u:fay")).await.unwrap();
    assert_eq!(fay, vec![survivor.to_hex()]);
    let gus: usize = raw.scard(format!("{{{prefix}}}:u:gus")).await.unwrap();
    assert_eq!(gus, 0);
    let owners: Vec<String> = raw.hkeys(format!("{{{prefix}}}:owner")).await.unwrap();
    assert_eq!(owners, vec![survivor.to_hex()]);
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(
        store.find_by_user("fay", later).await.unwrap(),
        vec![(survivor, record(now, 3 * HOUR, Some("fay")))]
    );
}

/// A server that forgot the scripts (restarted, or `SCRIPT FLUSH`) is sent
/// them again by the next call, which then succeeds.
#[tokio::test]
async fn scripts_are_loaded_again_when_the_server_forgot_them() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let now = SystemClock.now();
    let key = new_key();
    let first = record(now, Duration::from_secs(60), None);
    assert_eq!(
        store.create(&key, &first, now).await.unwrap(),
        CreateOutcome::Created
    );
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw().await)
        .await
        .unwrap();
    let mut next = first.clone();
    next.version = 2;
    next.data = br#"{"n":2}"#.to_vec();
    assert!(store.replace(&key, 1, &next, now).await.unwrap());
    assert_eq!(store.load(&key, now).await.unwrap(), Some(next));
}

/// Where Redis will drop `name`, in Unix milliseconds by this machine's clock.
async fn dropped_at(raw: &mut redis::aio::MultiplexedConnection, name: &str) -> i64 {
    let left: i64 = raw.pttl(name).await.unwrap();
    assert!(left > 0, "{name} has no expiry in Redis (PTTL {left})");
    SystemClock.now().as_millis() + left
}

/// Saves `record` at `now` as its next version, idle until `idle_deadline`.
async fn save(
    store: &RedisStore,
    key: &SessionKey,
    record: &mut Record,
    idle_deadline: Timestamp,
    now: Timestamp,
) {
    record.version += 1;
    record.idle_deadline = idle_deadline;
    let saved = store.replace(key, record.version - 1, record, now).await;
    assert!(
        saved.unwrap(),
        "compare-and-swap to version {}",
        record.version
    );
}

/// Redis drops a session's key at or after the session's expiry, never
/// before and at most an hour after: every save and touch sets the key's
/// expiry past the session's by its remaining lifetime, at most an hour.
#[tokio::test]
async fn a_key_outlives_its_session_by_at_most_an_hour() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let mut raw = raw().await;
    let now = SystemClock.now();
    let at = |after: Duration| now.saturating_add(after);
    let minutes = |n: u64| Duration::from_secs(60 * n);
    let key = new_key();
    let name = store.session_key_name(&key);
    // The test's own round trips take far less than this.
    let near = |actual: i64, expected: Timestamp| {
        let off = (actual - expected.as_millis()).abs();
        assert!(
            off < 5_000,
            "Redis drops the key {off} ms away from {expected:?}"
        );
    };

    let first = record(now, minutes(10), None);
    store.create(&key, &first, now).await.unwrap();
    near(dropped_at(&mut raw, &name).await, at(minutes(20)));

    let mut next = first.clone();
    save(&store, &key, &mut next, at(minutes(15)), at(minutes(5))).await;
    near(dropped_at(&mut raw, &name).await, at(minutes(25)));

    // At most an hour of slack.
    assert!(
        store
            .touch(&key, at(minutes(10)), at(minutes(120)))
            .await
            .unwrap()
    );
    near(dropped_at(&mut raw, &name).await, at(minutes(180)));
    save(&store, &key, &mut next, at(minutes(300)), at(minutes(10))).await;
    near(dropped_at(&mut raw, &name).await, at(minutes(360)));

    // A key without an expiry (left by hand, say) gets one at the next save.
    let _: bool = raw.persist(&name).await.unwrap();
    save(&store, &key, &mut next, at(minutes(310)), at(minutes(10))).await;
    near(dropped_at(&mut raw, &name).await, at(minutes(370)));

    // An expiry moved back takes the key's along, so that it never
    // outlives its session by more than its slack. The session ends on time.
    save(&store, &key, &mut next, at(minutes(30)), at(minutes(10))).await;
    near(dropped_at(&mut raw, &name).await, at(minutes(50)));
    assert!(store.load(&key, at(minutes(29))).await.unwrap().is_some());
    assert_eq!(store.load(&key, at(minutes(30))).await.unwrap(), None);
    assert_eq!(store.purge_expired(at(minutes(31))).await.unwrap(), 1);
    assert!(!raw.exists::<_, bool>(&name).await.unwrap());
}

/// A touch whose idle deadline lies past the absolute deadline leaves the
/// key to Redis no later than an hour after the absolute deadline, where
/// the session ends, and a later touch leaves it there.
#[tokio::test]
async fn a_touch_cut_short_by_the_absolute_deadline_keeps_the_key_in_bounds() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let mut raw = raw().await;
    let now = SystemClock.now();
    let at = |minutes: u64| now.saturating_add(Duration::from_secs(60 * minutes));
    let key = new_key();
    let name = store.session_key_name(&key);
    let mut first = record(now, Duration::from_secs(120), None);
    first.absolute_deadline = Some(at(20));
    store.create(&key, &first, now).await.unwrap();

    assert!(store.touch(&key, at(1), at(300)).await.unwrap());
    let dropped = dropped_at(&mut raw, &name).await;
    let absolute = at(20).as_millis();
    assert!(
        (absolute - 5_000..=absolute + 3_600_000).contains(&dropped),
        "Redis drops the key {} s after the absolute deadline",
        (dropped - absolute) / 1000
    );
    assert!(store.touch(&key, at(1), at(301)).await.unwrap());
    let again = dropped_at(&mut raw, &name).await;
    assert!(
        (again - dropped).abs() < 2_000,
        "moved by {} ms",
        again - dropped
    );
    assert_eq!(store.load(&key, at(20)).await.unwrap(), None);
}
