//! Scale: purging a large number of expired sessions through the store,
//! beside the single raw `DELETE … WHERE expires_at <= now` on an identical
//! table of the same server, the physical floor.
//!
//! Rows are seeded in bulk by SQL (a million inserts through the store API
//! would measure the seeding, not the purge).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::Connection;

/// One store's purge figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PurgeResult {
    pub(crate) store: String,
    pub(crate) sessions: u64,
    pub(crate) purged: u64,
    pub(crate) store_seconds: f64,
    pub(crate) raw_seconds: f64,
}

/// The SQL that seeds `count` expired rows into `table`, per dialect.
fn seed_sql(kind: &str, table: &str, count: u64) -> String {
    let columns = "(\"key\", version, user_id, created_at, accessed_at, idle_deadline, absolute_deadline, expires_at, lease_token, lease_until, data)";
    match kind {
        "postgres" => format!(
            "INSERT INTO {table} {columns} SELECT decode(md5(g::text) || md5((-g)::text), 'hex'), 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, '\\x7b7d'::bytea FROM generate_series(1, {count}) AS g"
        ),
        "sqlite" => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) INSERT INTO {table} {columns} SELECT randomblob(32), 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, X'7b7d' FROM n"
        ),
        _ => format!(
            "INSERT INTO {table} {} WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT UNHEX(SHA2(i, 256)), 1, NULL, 1, 1, 1, NULL, 1, NULL, NULL, X'7b7d' FROM n",
            columns.replace('"', "`")
        ),
    }
}

async fn execute(url: &str, statements: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    if url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    } else if url.starts_with("mysql") {
        let mut connection = sqlx::MySqlConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    } else {
        let mut connection = sqlx::SqliteConnection::connect(url).await?;
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut connection).await?;
        }
    }
    Ok(started.elapsed())
}

/// Seeds `count` expired rows in a fresh table, purges them through the
/// store, then does the same with one raw `DELETE`.
pub(crate) async fn purge(kind: &str, server_url: &str, count: u64) -> anyhow::Result<PurgeResult> {
    let suffix = std::process::id();
    let ours = format!("bench_purge_{suffix}");
    let raw = format!("bench_purge_raw_{suffix}");
    let separator = if server_url.contains('?') { '&' } else { '?' };
    let mut timings = Vec::new();
    let mut purged = 0;
    for (table, through_store) in [(&ours, true), (&raw, false)] {
        let store = session2::store::open(&format!("{server_url}{separator}table={table}")).await?;
        store.setup().await?;
        let mut prepare = Vec::new();
        if kind == "mysql" {
            prepare.push("SET SESSION max_recursive_iterations = 100000000".to_owned());
        }
        prepare.push(seed_sql(kind, table, count));
        execute(server_url, &prepare).await?;
        let now = session2::Timestamp::from_millis(2);
        let took = if through_store {
            let started = Instant::now();
            purged = store.purge_expired(now).await?;
            started.elapsed()
        } else {
            execute(server_url, &[format!("DELETE FROM {table} WHERE expires_at <= 2")]).await?
        };
        timings.push(took.as_secs_f64());
        drop(store);
        let schema = format!("{table}_schema");
        execute(server_url, &[format!("DROP TABLE {table}"), format!("DROP TABLE {schema}")]).await?;
    }
    Ok(PurgeResult {
        store: kind.to_owned(),
        sessions: count,
        purged,
        store_seconds: timings[0],
        raw_seconds: timings[1],
    })
}
