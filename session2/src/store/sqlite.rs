//! [`SqliteStore`]: sessions in a table of an SQLite database file, shared by the processes of one machine.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | yes | yes | yes | yes: expired rows are never returned; [`purge_expired`](crate::SessionStore::purge_expired) deletes them in batches | yes: one `INSERT … ON CONFLICT DO UPDATE … WHERE expired` |
//!
//! Multiprocess safe means: several processes of one machine on one database
//! file on a local file system (SQLite's locks do not work over NFS).
//!
//! Use it for a single machine that needs sessions to survive restarts
//! without a database server: several worker processes can share one file.
//! [`SqliteStore::connect`] opens (and creates) the file in WAL mode with a
//! 5-second busy timeout, so writers queue instead of failing;
//! [`SqliteStore::from_pool`] takes the application's own pool. Every
//! primitive is one statement, and SQLite runs each on the connection's own
//! thread, never on the async runtime's workers. The exception is a
//! compare-and-swap that changes the user or brings the expiry earlier:
//! SQLite rewrites the index entries of every column an `UPDATE` names, so
//! a save first tries the statement that names no indexed column, which
//! matches whenever neither moves, and falls back to the full one.
//!
//! Writes (create, save, lease, delete, rename, touch) are group-committed: one
//! writer task per table applies the writes that queued while its last
//! transaction ran in one transaction, and answers each caller once that
//! transaction is committed. Concurrent saves then share one sync of the
//! write-ahead log instead of queueing for SQLite's single write lock, one
//! commit each; each write's outcome is the one it would have had alone.
//! See `store/group_commit.rs`.
//! [`setup`](crate::SessionStore::setup) creates the table (default
//! `session2_sessions`, see [`SqliteStore::with_table_name`]), its indexes
//! and a `<table>_schema` table idempotently; it never drops anything.
//!
//! ```no_run
//! use session2::{SessionManager, SessionStore, store::SqliteStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = SqliteStore::connect("sqlite:sessions.db")
//!     .await?
//!     .with_table_name("web_sessions")?;
//! store.setup().await?;
//! let manager = SessionManager::new(store);
//! # Ok(()) }
//! ```

use std::time::Duration;

use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
};
use sqlx::{Executor, Row};

use super::group_commit::GroupCommitTable;
use super::sql::{self, Backend, Dialect, SqlTable, impl_sql_session_store};
use crate::Result;

impl Backend for sqlx::Sqlite {
    const STORE: &'static str = "sqlite";
    const DIALECT: Dialect = Dialect::Sqlite;

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

/// A store keeping sessions in a table of an SQLite database; clones share the pool.
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub struct SqliteStore {
    pub(super) table: GroupCommitTable,
}

impl SqliteStore {
    /// A store on the application's own pool, using the table
    /// `session2_sessions`.
    ///
    /// For several processes on one file, open the pool's connections as
    /// [`SqliteStore::connect`] does: WAL journal mode and a busy timeout,
    /// or writers fail with "database is locked" instead of waiting.
    pub fn from_pool(pool: SqlitePool) -> Self {
        let table =
            SqlTable::new(pool, sql::DEFAULT_TABLE).expect("the default table name is valid");
        Self {
            table: GroupCommitTable::new(table),
        }
    }

    /// Opens the database at `url` (`sqlite:PATH`, created if missing) in
    /// WAL mode with a 5-second busy timeout, with a pool of up to 8
    /// connections.
    ///
    /// `sqlite::memory:` opens a private in-memory database (one connection,
    /// kept open), which of course is neither persistent nor shared by
    /// processes. Fails with a backend error when the file cannot be opened
    /// or created.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|err| sql::backend_error("sqlite", "parse the database URL", err))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            // The database lives as long as a connection to it.
            SqlitePoolOptions::new()
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(8)
        };
        let pool = pool
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|err| sql::backend_error("sqlite", "open the database", err))?;
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
    pub fn pool(&self) -> &SqlitePool {
        &self.table.pool
    }

    async fn setup_schema(&self) -> Result<()> {
        let name = &self.table.table;
        let t = Dialect::Sqlite.quote(name);
        let schema = Dialect::Sqlite.quote(&format!("{name}_schema"));
        let user_index = Dialect::Sqlite.quote(&format!("{name}_user"));
        let expiry_index = Dialect::Sqlite.quote(&format!("{name}_expiry"));
        let fail = |err| sql::backend_error("sqlite", "set up the session table", err);
        // `BEGIN IMMEDIATE` takes the write lock first, so processes running
        // setup at once queue behind each other (busy timeout) instead of
        // failing to upgrade a read lock.
        let mut tx = self
            .table
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(fail)?;
        let connection: &mut sqlx::SqliteConnection = &mut tx;
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                \"key\" BLOB NOT NULL PRIMARY KEY CHECK (length(\"key\") = 32),
                version INTEGER NOT NULL,
                user_id TEXT NULL,
                created_at INTEGER NOT NULL,
                accessed_at INTEGER NOT NULL,
                idle_deadline INTEGER NOT NULL,
                absolute_deadline INTEGER NULL,
                expires_at INTEGER NOT NULL,
                lease_token INTEGER NULL,
                lease_until INTEGER NULL,
                data BLOB NOT NULL
            )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {user_index} ON {t} (user_id) WHERE user_id IS NOT NULL"
            ),
            format!("CREATE INDEX IF NOT EXISTS {expiry_index} ON {t} (expires_at)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema} (
                version INTEGER PRIMARY KEY,
                applied_at INTEGER NOT NULL
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
        let insert =
            format!("INSERT OR IGNORE INTO {schema} (version, applied_at) VALUES (?1, ?2)");
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

impl_sql_session_store!(SqliteStore, "sqlite");
