//! [`MySqlStore`]: sessions in a MySQL or MariaDB table, shared by every process and machine.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes | yes | yes | yes: expired rows are never returned; [`purge_expired`](crate::SessionStore::purge_expired) deletes them in batches | yes: an `INSERT` that fails on a live row's primary key; an expired row is deleted and the insert retried |
//!
//! Use it when the application already runs MySQL (5.7 or later) or MariaDB
//! (10.3 or later): build it from the application's own pool with
//! [`MySqlStore::from_pool`], or from a URL with [`MySqlStore::connect`].
//! Every primitive is one statement, so one round trip; compare-and-swap is
//! an `UPDATE … WHERE version = ?`. Concurrent compare-and-swaps are
//! batched: the saves that queue while one batch runs go together in the
//! next, one transaction that locks their rows (`SELECT … FOR UPDATE`),
//! decides each swap from its row's version and deadlines, and writes the
//! winners in one `INSERT … ON DUPLICATE KEY UPDATE`. Each save still has
//! the outcome it would have alone, and its caller hears back once the
//! transaction has committed. [`setup`](crate::SessionStore::setup)
//! creates the InnoDB table (default `session2_sessions`, see
//! [`MySqlStore::with_table_name`]) with its indexes, and a `<table>_schema`
//! table, idempotently; it never drops anything.
//!
//! Session data is a `LONGBLOB`; the largest session the server accepts is
//! bounded by its `max_allowed_packet` (16 MiB by default on MariaDB, 64 MiB
//! on MySQL 8). User ids are compared byte for byte (`utf8mb4_bin`).
//!
//! When the server goes away, calls fail with backend errors
//! ([`Error::is_backend`](crate::Error::is_backend)) and the pool reconnects
//! once it is back.
//!
//! ```no_run
//! use session2::{SessionManager, SessionStore, store::MySqlStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = MySqlStore::connect("mysql://root@localhost/app")
//!     .await?
//!     .with_table_name("web_sessions")?;
//! store.setup().await?;
//! let manager = SessionManager::new(store);
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlQueryResult};

use super::batched_swap::BatchedTable;
use super::sql::{self, Backend, Dialect, SqlTable, impl_sql_session_store};
use crate::Result;

impl Backend for sqlx::MySql {
    const STORE: &'static str = "mysql";
    const DIALECT: Dialect = Dialect::MySql;

    fn rows_affected(result: &MySqlQueryResult) -> u64 {
        result.rows_affected()
    }
}

/// A store keeping sessions in a MySQL or MariaDB table; clones share the pool.
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub struct MySqlStore {
    pub(super) table: BatchedTable<sqlx::MySql>,
}

impl MySqlStore {
    /// A store on the application's own pool, using the table
    /// `session2_sessions`.
    pub fn from_pool(pool: MySqlPool) -> Self {
        let table =
            SqlTable::new(pool, sql::DEFAULT_TABLE).expect("the default table name is valid");
        Self {
            table: BatchedTable::new(table),
        }
    }

    /// Connects to the server at `url` (`mysql://user:password@host:port/database`)
    /// with a pool of up to 16 connections that waits at most 5 seconds for
    /// a connection.
    ///
    /// Fails with a backend error when the server cannot be reached, and
    /// with a configuration error when the URL is invalid.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = MySqlConnectOptions::from_str(url).map_err(|err| {
            sql::backend_error(<sqlx::MySql as Backend>::STORE, "parse the URL", err)
        })?;
        let pool = MySqlPoolOptions::new()
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
    pub fn pool(&self) -> &MySqlPool {
        &self.table.pool
    }

    async fn setup_schema(&self) -> Result<()> {
        let name = &self.table.table;
        let t = Dialect::MySql.quote(name);
        let schema = Dialect::MySql.quote(&format!("{name}_schema"));
        let fail = |err| sql::backend_error("mysql", "set up the session table", err);
        // MySQL commits DDL implicitly, so there is no transaction to share:
        // each statement is idempotent on its own.
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                `key` BINARY(32) NOT NULL,
                version BIGINT NOT NULL,
                user_id TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
                created_at BIGINT NOT NULL,
                accessed_at BIGINT NOT NULL,
                idle_deadline BIGINT NOT NULL,
                absolute_deadline BIGINT NULL,
                expires_at BIGINT NOT NULL,
                lease_token BIGINT NULL,
                lease_until BIGINT NULL,
                data LONGBLOB NOT NULL,
                PRIMARY KEY (`key`),
                INDEX user_id_index (user_id(191)),
                INDEX expires_at_index (expires_at)
            ) ENGINE = InnoDB"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema} (
                version BIGINT NOT NULL PRIMARY KEY,
                applied_at BIGINT NOT NULL
            ) ENGINE = InnoDB"
            ),
        ];
        for statement in &statements {
            sqlx::raw_sql(statement)
                .execute(&self.table.pool)
                .await
                .map_err(fail)?;
        }
        let newest: Option<i64> = sqlx::query_scalar(&format!("SELECT MAX(version) FROM {schema}"))
            .fetch_one(&self.table.pool)
            .await
            .map_err(fail)?;
        sql::check_schema_version(name, newest)?;
        sqlx::query(&format!(
            "INSERT IGNORE INTO {schema} (version, applied_at) VALUES (?, ?)"
        ))
        .bind(sql::SCHEMA_VERSION)
        .bind(sql::applied_at())
        .execute(&self.table.pool)
        .await
        .map_err(fail)?;
        Ok(())
    }
}

impl_sql_session_store!(MySqlStore, "mysql");
