//! The conformance suite and SQLite-specific cases against [`SqliteStore`],
//! each store on its own database file in a temporary directory.

#[macro_use]
mod sql_cases;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use session2::store::SqliteStore;
use session2::{CreateOutcome, SessionKey, SessionStore};

/// One temporary directory per test process, one database file per store.
fn directory() -> &'static tempfile::TempDir {
    static DIRECTORY: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIRECTORY.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

fn database() -> PathBuf {
    directory()
        .path()
        .join(format!("{}.db", sql_cases::unique_table_name()))
}

fn url() -> String {
    format!("sqlite:{}", database().display())
}

async fn factory() -> Option<Arc<dyn SessionStore>> {
    store().await
}

async fn store() -> Option<Arc<dyn SessionStore>> {
    store_on(&sql_cases::unique_table_name()).await
}

/// A set-up store on `table`, in a database file of its own (named after
/// the table, so that two stores on one table share it).
async fn store_on(table: &str) -> Option<Arc<dyn SessionStore>> {
    let path = directory().path().join(format!("{table}.db"));
    let store = SqliteStore::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("open the database")
        .with_table_name(table)
        .expect("a valid table name");
    store.setup().await.expect("setup");
    Some(Arc::new(store))
}

session2::conformance_tests!(factory);
sql_store_cases!();

/// The raw `expires_at` column of `key`'s row in `table` (in its own file).
async fn indexed_expiry(table: &str, key: &SessionKey) -> i64 {
    let path = directory().path().join(format!("{table}.db"));
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("open the database");
    sqlx::query_scalar(&format!(
        "SELECT expires_at FROM \"{table}\" WHERE key = ?1"
    ))
    .bind(key.as_bytes().as_slice())
    .fetch_one(&pool)
    .await
    .expect("read the row")
}

#[tokio::test]
async fn table_name_with_sql_is_refused() {
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    for bad in ["s; DROP TABLE t", "s\"", "a b", "über", ""] {
        assert!(store.clone().with_table_name(bad).unwrap_err().is_config());
    }
    assert_eq!(store.table_name(), "session2_sessions");
}

const WORKER_DATABASE: &str = "SESSION2_TEST_SQLITE_WORKER_DATABASE";
const WORKER_KEY: &str = "SESSION2_TEST_SQLITE_WORKER_KEY";
const WORKERS: u64 = 4;
const INCREMENTS: u64 = 50;

/// Several OS processes on one database file, each incrementing one
/// counter by compare-and-swap with retry: no increment is lost.
#[test]
fn processes_share_one_file_without_lost_updates() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let (Ok(path), Ok(key)) = (std::env::var(WORKER_DATABASE), std::env::var(WORKER_KEY)) {
        let key = SessionKey::from_hex(&key).unwrap();
        runtime.block_on(increment(&path, key, INCREMENTS));
        return;
    }
    let path = database();
    let url = format!("sqlite:{}", path.display());
    let key = sql_cases::key();
    runtime.block_on(async {
        let store = SqliteStore::connect(&url).await.unwrap();
        store.setup().await.unwrap();
        let mut record = sql_cases::record_at(sql_cases::NOW, Duration::from_secs(3600));
        record.data = b"{\"n\":0}".to_vec();
        assert_eq!(
            store.create(&key, &record, sql_cases::NOW).await.unwrap(),
            CreateOutcome::Created
        );
    });
    let name = "processes_share_one_file_without_lost_updates";
    let children: Vec<_> = (0..WORKERS)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(WORKER_DATABASE, &url)
                .env(WORKER_KEY, key.to_hex())
                // The workers' own test summaries would read like this run's.
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a worker process failed");
    }
    runtime.block_on(async {
        let store = SqliteStore::connect(&url).await.unwrap();
        let record = store.load(&key, sql_cases::NOW).await.unwrap().unwrap();
        assert_eq!(counter(&record.data), WORKERS * INCREMENTS);
        assert_eq!(record.version, 1 + WORKERS * INCREMENTS);
    });
}

fn counter(data: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(data).unwrap();
    value["n"].as_u64().unwrap()
}

async fn increment(url: &str, key: SessionKey, times: u64) {
    let store = SqliteStore::connect(url).await.unwrap();
    for _ in 0..times {
        session2::testing::increment_by_compare_and_swap(&store, &key, "n", sql_cases::NOW).await;
    }
}

/// A row whose metadata was damaged outside the library (SQLite columns
/// take any type) loads as a decode error and is skipped by listings: no
/// panic, and the other sessions stay readable.
#[test]
fn damaged_row_is_a_decode_error_not_a_panic() {
    session2::testing::run(async {
        let table = sql_cases::unique_table_name();
        let path = directory().path().join(format!("{table}.db"));
        let store = SqliteStore::connect(&format!("sqlite:{}", path.display()))
            .await
            .unwrap()
            .with_table_name(&table)
            .unwrap();
        store.setup().await.unwrap();
        let (damaged, intact) = (sql_cases::key(), sql_cases::key());
        let record = sql_cases::record_at(sql_cases::NOW, Duration::from_secs(60));
        for key in [&damaged, &intact] {
            store.create(key, &record, sql_cases::NOW).await.unwrap();
        }
        sqlx::query(&format!(
            "UPDATE \"{table}\" SET version = 'not a number' WHERE \"key\" = ?1"
        ))
        .bind(damaged.as_bytes().as_slice())
        .execute(store.pool())
        .await
        .unwrap();
        let err = store.load(&damaged, sql_cases::NOW).await.unwrap_err();
        assert!(err.is_decode(), "{err}");
        assert_eq!(
            store.load(&intact, sql_cases::NOW).await.unwrap(),
            Some(record)
        );
        let page = store.list(None, 10).await.unwrap();
        assert_eq!(page.records.len(), 1);
        assert_eq!(page.records[0].0, intact);
        assert!(store.delete(&damaged, None).await.unwrap());
    });
}
