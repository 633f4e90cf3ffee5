//! The conformance suite and SQL cases against [`MySqlStore`], on the server
//! at `SESSION2_TEST_MYSQL_URL` (read at run time; default `mysql://root@127.0.0.1:3306/test`),
//! each store on its own table.

#[macro_use]
mod sql_cases;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use session2::SessionStore;
use session2::store::MySqlStore;

fn url() -> String {
    std::env::var("SESSION2_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

async fn factory() -> Option<Arc<dyn SessionStore>> {
    store().await
}

async fn store() -> Option<Arc<dyn SessionStore>> {
    store_on(&sql_cases::unique_table_name()).await
}

/// A set-up store on `table`, or `None` (under CI: a panic) when the server is unreachable.
async fn store_on(table: &str) -> Option<Arc<dyn SessionStore>> {
    let store = session2::testing::require_server("mysql", MySqlStore::connect(&url()).await)?;
    static CLEANED: AtomicBool = AtomicBool::new(false);
    if !CLEANED.swap(true, Ordering::SeqCst) {
        drop_stale_test_tables(store.pool()).await;
    }
    let store = store.with_table_name(table).expect("a valid table name");
    store.setup().await.expect("setup");
    Some(Arc::new(store))
}

/// Drops the test tables earlier runs left behind (more than an hour old).
async fn drop_stale_test_tables(pool: &sqlx::MySqlPool) {
    let tables: Vec<String> = sqlx::query_scalar("SELECT CONVERT(table_name USING utf8mb4) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name LIKE 's2test%'")
        .fetch_all(pool)
        .await
        .expect("list test tables");
    for table in tables
        .iter()
        .filter(|table| sql_cases::is_stale_test_table(table))
    {
        let drop = format!("`{table}`");
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {drop}"))
            .execute(pool)
            .await
            .expect("drop a stale test table");
    }
}

session2::conformance_tests!(factory);
sql_store_cases!();

#[test]
fn table_name_with_sql_is_refused() {
    session2::testing::run(async {
        let connected = MySqlStore::connect(&url()).await;
        let Some(store) = session2::testing::require_server("mysql", connected) else {
            return;
        };
        for bad in ["s; DROP TABLE t", "s\"", "a b", "über", "", "x`y"] {
            assert!(store.clone().with_table_name(bad).unwrap_err().is_config());
        }
        assert_eq!(store.table_name(), "session2_sessions");
    });
}

#[test]
fn mariadb_scheme_opens_the_mysql_store() {
    session2::testing::run(async {
        if store().await.is_none() {
            return;
        }
        let url = url().replacen("mysql://", "mariadb://", 1);
        let store = session2::store::open(&url).await.unwrap();
        assert_eq!(store.name(), "mysql");
    });
}
