//! [`PostgresStore`]: sessions in a PostgreSQL table, shared by every process and machine.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes | yes | yes | yes: expired rows are never returned; [`purge_expired`](crate::SessionStore::purge_expired) deletes them in one statement | yes: one `INSERT … ON CONFLICT DO UPDATE … WHERE expired` |
//!
//! Use it when the application already runs PostgreSQL: build it from the
//! application's own pool with [`PostgresStore::from_pool`], or from a URL
//! with [`PostgresStore::connect`]. Every primitive is one statement, so one
//! round trip; compare-and-swap is an `UPDATE … WHERE version = $n`.
//! Concurrent compare-and-swaps are batched: the saves that queue while one
//! batch statement runs go together in the next, one `UPDATE … FROM
//! UNNEST(…)` that swaps each row at its own expected version and returns
//! the keys that won, so many saves cost the server about one statement
//! and one commit. Each save still has the outcome it would have alone, and
//! its caller hears back once the statement has committed (see
//! `store/batched_swap.rs`).
//! [`setup`](crate::SessionStore::setup) creates the table (default
//! `session2_sessions`, see [`PostgresStore::with_table_name`]), its indexes
//! and a `<table>_schema` table idempotently; it never drops anything.
//!
//! When the server goes away, calls fail with backend errors
//! ([`Error::is_backend`](crate::Error::is_backend)) and the pool reconnects
//! once it is back.
//!
//! ```no_run
//! use session2::{SessionManager, SessionStore, store::PostgresStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = PostgresStore::connect("postgres://postgres@localhost/app")
//!     .await?
//!     .with_table_name("web_sessions")?;
//! store.setup().await?;
//! let manager = SessionManager::new(store);
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::{Executor, Row};

use super::batched_swap::BatchedTable;
use super::sql::{self, Backend, Dialect, SqlTable, impl_sql_session_store};
use crate::Result;

impl Backend for sqlx::Postgres {
    const STORE: &'static str = "postgres";
    const DIALECT: Dialect = Dialect::Postgres;

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

/// A store keeping sessions in a PostgreSQL table; clones share the pool.
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct PostgresStore {
    pub(super) table: BatchedTable<sqlx::Postgres>,
}

impl PostgresStore {
    /// A store on the application's own pool, using the table
    /// `session2_sessions`.
    pub fn from_pool(pool: PgPool) -> Self {
        let table =
            SqlTable::new(pool, sql::DEFAULT_TABLE).expect("the default table name is valid");
        Self {
            table: BatchedTable::new(table),
        }
    }

    /// Connects to the server at `url` (`postgres://user:password@host:port/database`)
    /// with a pool of up to 16 connections that waits at most 5 seconds for
    /// a connection.
    ///
    /// Fails with a backend error when the server cannot be reached, and
    /// with a configuration error when the URL is invalid.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|err| {
            sql::backend_error(<sqlx::Postgres as Backend>::STORE, "parse the URL", err)
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            // Each operation is one statement: a ping before it would double
            // the round trips. A connection the server dropped fails once,
            // with a backend error, and is replaced.
            .test_before_acquire(false);
        let pool = sql::connect_pool(pool, options).await?;
        Ok(Self::from_pool(pool))
    }

    /// The same store on another table: a name of ASCII letters, digits and
    /// `_`, not starting with a digit, at most 56 characters. Anything else
    /// is refused with a configuration error, so no text from outside ever
    /// reaches SQL.
    pub fn with_table_name(self, name: &str) -> Result<Self> {
        Ok(Self {
            table: self.table.with_table_name(name)?,
        })
    }

    /// The session table's name.
    pub fn table_name(&self) -> &str {
        &self.table.table
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.table.pool
    }

    async fn setup_schema(&self) -> Result<()> {
        let name = &self.table.table;
        let t = Dialect::Postgres.quote(name);
        let schema = Dialect::Postgres.quote(&format!("{name}_schema"));
        let user_index = Dialect::Postgres.quote(&format!("{name}_user"));
        let expiry_index = Dialect::Postgres.quote(&format!("{name}_expiry"));
        let fail = |err| sql::backend_error("postgres", "set up the session table", err);
        let mut tx = self.table.pool.begin().await.map_err(fail)?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can collide in PostgreSQL's
        // catalog: serialize setups of this table.
        let connection: &mut sqlx::PgConnection = &mut tx;
        let lock = format!("session2 setup {name}");
        connection
            .execute(sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&lock))
            .await
            .map_err(fail)?;
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                \"key\" BYTEA PRIMARY KEY CHECK (octet_length(\"key\") = 32),
                version BIGINT NOT NULL,
                user_id TEXT NULL,
                created_at BIGINT NOT NULL,
                accessed_at BIGINT NOT NULL,
                idle_deadline BIGINT NOT NULL,
                absolute_deadline BIGINT NULL,
                expires_at BIGINT NOT NULL,
                lease_token BIGINT NULL,
                lease_until BIGINT NULL,
                data BYTEA NOT NULL
            )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {user_index} ON {t} (user_id) WHERE user_id IS NOT NULL"
            ),
            format!("CREATE INDEX IF NOT EXISTS {expiry_index} ON {t} (expires_at)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema} (
                version BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )"
            ),
        ];
        for statement in &statements {
            connection.execute(statement.as_str()).await.map_err(fail)?;
        }
        let newest: Option<i64> = connection
            .fetch_one(format!("SELECT MAX(version) FROM {schema}").as_str())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(fail)?;
        sql::check_schema_version(name, newest)?;
        let insert = format!(
            "INSERT INTO {schema} (version, applied_at) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        connection
            .execute(
                sqlx::query(&insert)
                    .bind(sql::SCHEMA_VERSION)
                    .bind(sql::applied_at()),
            )
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)
    }
}

impl_sql_session_store!(PostgresStore, "postgres");
