//! What the SQL stores share: table names, statements, and rows as records.
//!
//! [`SqliteStore`](super::SqliteStore), [`PostgresStore`](super::PostgresStore)
//! and [`MySqlStore`](super::MySqlStore) keep one row per session in the same
//! columns and run the same statements, written here once for every dialect;
//! each store's own file holds only its connection setup and its schema.
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `key` | 32 bytes, primary key | the [`SessionKey`] |
//! | `version` | 64-bit integer | [`Record::version`], its bits as a signed integer |
//! | `user_id` | text, null, indexed | [`Record::user`] |
//! | `created_at`, `accessed_at`, `idle_deadline` | 64-bit integer | milliseconds since the epoch |
//! | `absolute_deadline` | 64-bit integer, null | milliseconds since the epoch |
//! | `expires_at` | 64-bit integer, indexed | when purge next looks at the row: never later than [`Record::expires_at`] |
//! | `lease_token`, `lease_until` | 64-bit integer, null | [`Record::lease`] |
//! | `data` | binary, up to at least 16 MiB | [`Record::data`], opaque bytes |
//!
//! A `<table>_schema` table beside it records the schema version that
//! `setup()` applied.
//!
//! Whether a row is alive is decided from its deadlines alone
//! (`idle_deadline`, `absolute_deadline`). `expires_at` only serves purge's
//! index, and it may be early: a save that pushes the expiry later leaves it
//! alone, so that the save writes no index entry (PostgreSQL can then update
//! the row in place, a HOT update, and InnoDB skips the secondary indexes).
//! A save that brings the expiry earlier lowers it; purge deletes the rows
//! that are really expired and moves the early entries of live rows to
//! their real expiry.

use std::fmt;

use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

#[cfg(any(feature = "postgres", feature = "mysql"))]
use std::collections::HashSet;

#[cfg(feature = "postgres")]
use super::batched_lease::{LeaseAttempt, LeaseMany, Taken};
use super::batched_load::LoadMany;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use super::batched_swap::SwapMany;
#[cfg(feature = "sqlite")]
use crate::store::LeaseOutcome;
use crate::store::{CreateOutcome, Page};
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

/// The table the SQL stores use unless told otherwise.
pub(crate) const DEFAULT_TABLE: &str = "session2_sessions";

/// The schema version `setup()` creates and records in `<table>_schema`.
///
/// Version 2 has the columns of version 1; `expires_at` became a lower
/// bound of the expiry (see the module docs), which a version 1 process
/// would take for the expiry itself. A version 1 table is a valid version 2
/// table as it stands.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// The longest accepted table name: `<table>_schema` and the index names
/// (`<table>_user`, `<table>_expiry`) must still fit in the 63 bytes
/// PostgreSQL keeps of an identifier (MySQL allows 64).
const MAX_TABLE_NAME: usize = 56;

/// How many rows one purge statement changes where purge goes in batches
/// (see [`Purge`]); moving live rows' early `expires_at` always does.
const PURGE_BATCH: i64 = 100_000;

/// The most keys one [`SqlTable::read_many`] reads.
pub(crate) const MAX_LOADS: usize = 256;

/// The columns `SELECT`ed for a record after its key, in the order
/// [`decode_row`] reads them.
fn select_columns(dialect: Dialect) -> String {
    let user_id = match dialect {
        // A `utf8mb4_bin` column reaches the driver flagged as binary, which
        // it refuses to decode as text: convert it to plain `utf8mb4`.
        #[cfg(feature = "mysql")]
        Dialect::MySql => "CONVERT(user_id USING utf8mb4)",
        #[allow(unreachable_patterns)]
        _ => "user_id",
    };
    format!(
        "version, {user_id}, created_at, accessed_at, idle_deadline, \
         absolute_deadline, lease_token, lease_until, data"
    )
}

/// The columns a record writes besides its key, in the order [`bind_record`] binds them.
const RECORD_COLUMNS: [&str; 10] = [
    "version",
    "user_id",
    "created_at",
    "accessed_at",
    "idle_deadline",
    "absolute_deadline",
    "expires_at",
    "lease_token",
    "lease_until",
    "data",
];

/// Checks a table name: an ASCII letter or underscore, then up to 55 ASCII
/// letters, digits or underscores. Nothing else is ever put into SQL text.
pub(crate) fn validate_table_name(name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        && name.len() <= MAX_TABLE_NAME;
    if valid {
        Ok(())
    } else {
        Err(Error::config(format_args!(
            "invalid SQL table name `{}`: expected an ASCII letter or `_` followed by at most {} ASCII letters, digits or `_`",
            name.escape_debug(),
            MAX_TABLE_NAME - 1
        )))
    }
}

/// Refuses a table whose `<table>_schema` records a newer schema than this
/// version of the library knows.
pub(crate) fn check_schema_version(table: &str, newest: Option<i64>) -> Result<()> {
    match newest {
        Some(version) if version > SCHEMA_VERSION => Err(Error::config(format_args!(
            "table `{table}` has schema version {version}, newer than this session2 knows ({SCHEMA_VERSION}); upgrade session2"
        ))),
        _ => Ok(()),
    }
}

/// The time `setup()` records beside the schema version (informational only).
pub(crate) fn applied_at() -> i64 {
    crate::Clock::now(&crate::SystemClock).as_millis()
}

/// Splits the `table` query parameter off a store URL: the URL to hand to
/// the driver (without it) and the table name, if given.
pub(crate) fn split_table_parameter(url: &str) -> Result<(String, Option<String>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut table = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("table", name)) => {
                if table.replace(name.to_owned()).is_some() {
                    return Err(Error::config("the store URL sets `table` twice"));
                }
            }
            _ => kept.push(pair),
        }
    }
    if let Some(name) = &table {
        validate_table_name(name)?;
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, table))
}

/// The SQL dialects the stores speak: identifier quoting and placeholders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PostgreSQL: `"name"`, `$1`.
    #[cfg(feature = "postgres")]
    Postgres,
    /// MySQL and MariaDB: `` `name` ``, `?`.
    #[cfg(feature = "mysql")]
    MySql,
    /// SQLite: `"name"`, `?1`.
    #[cfg(feature = "sqlite")]
    Sqlite,
}

impl Dialect {
    /// Quotes an identifier that [`validate_table_name`] accepted (or a fixed one).
    pub(crate) fn quote(self, identifier: &str) -> String {
        match self {
            #[cfg(feature = "mysql")]
            Self::MySql => format!("`{identifier}`"),
            #[allow(unreachable_patterns)]
            _ => format!("\"{identifier}\""),
        }
    }

    /// The function that returns the smaller of its arguments.
    fn least(self) -> &'static str {
        match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite => "MIN",
            #[allow(unreachable_patterns)]
            _ => "LEAST",
        }
    }

    /// The expression of a row's real expiry, [`Record::expires_at`], from
    /// its deadlines; `row` qualifies the columns (`""` or `"table."`).
    fn expiry(self, row: &str) -> String {
        format!(
            "{least}({row}idle_deadline, COALESCE({row}absolute_deadline, {row}idle_deadline))",
            least = self.least()
        )
    }

    /// The `n`th (1-based) placeholder of a statement.
    fn param(self, n: usize) -> String {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres => format!("${n}"),
            #[cfg(feature = "mysql")]
            Self::MySql => {
                let _ = n; // MySQL placeholders are positional only.
                "?".to_owned()
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite => format!("?{n}"),
        }
    }
}

/// The statements of one table, built once when the store is made.
///
/// Every statement binds its parameters in the order they appear, so the
/// same binding code serves `$n`, `?n` and `?` placeholders.
#[derive(Debug)]
pub(crate) struct Statements {
    /// key, now
    load: String,
    /// `load_many[i]`: 2^(i+1) keys, then now (see [`SqlTable::read_many`])
    load_many: Vec<String>,
    /// key, record; then (upsert dialects) now
    create: String,
    /// key, now: deletes an expired row that holds a key wanted anew
    /// (MySQL's create, every rename)
    delete_expired_key: String,
    /// record, key, expected version, now: lowers `expires_at` when the
    /// expiry moves earlier
    replace: String,
    /// (SQLite only) the same parameters as `replace`: matches only when the
    /// user stays and the expiry does not move earlier, and then names no
    /// indexed column, because SQLite rewrites the index entries of every
    /// column named in `SET`, even to its own value
    replace_in_place: Option<String>,
    /// (PostgreSQL only) keys, expected versions, nows, then the record
    /// columns, each an array: the compare-and-swap of many rows
    /// ([`SwapMany::swap_many`]), `RETURNING` the keys it changed
    #[cfg(feature = "postgres")]
    replace_many: Option<String>,
    /// (PostgreSQL only) keys, lease tokens, lease untils, nows, each an
    /// array: takes each free lease of a live row ([`LeaseMany::lease_many`]),
    /// `RETURNING` the rows it took (a row named twice is taken once)
    #[cfg(feature = "postgres")]
    lease_many: Option<String>,
    /// (SQLite only) lease token, lease until, key, now, now: takes a
    /// free lease, `RETURNING` the row (PostgreSQL batches its leases
    /// instead, `store/batched_lease.rs`; MySQL leases by compare-and-swap)
    #[cfg(feature = "sqlite")]
    lease: String,
    /// record, new key, key, expected version: moves the row to the new
    /// key (see [`SqlTable::rename_on`])
    rename: String,
    /// key
    delete: String,
    /// key, version
    delete_at_version: String,
    /// accessed_at, idle_deadline (three times), key, accessed_at
    touch: String,
    /// How expired rows are deleted.
    purge: Purge,
    /// Rows per purge batch: [`PURGE_BATCH`] (tests make it small).
    purge_batch: i64,
    /// now, now: moves a batch of early `expires_at` of live rows to their expiry
    purge_move: String,
    /// limit
    list_first: String,
    /// after, limit
    list_after: String,
    count: String,
    /// user, now
    find_by_user: String,
}

/// How a dialect deletes the expired rows.
#[derive(Debug)]
enum Purge {
    /// now, now: one statement (PostgreSQL: its row locks live in the rows,
    /// and nobody waits for an expired row).
    #[cfg(feature = "postgres")]
    Whole(String),
    /// now, now: a batch, repeated until one falls short: SQLite, where a
    /// batch holds the one write lock and so stops every save meanwhile,
    /// and MySQL, where it bounds the transaction and its undo log.
    /// On InnoDB a `DELETE` returns before its background purge has removed
    /// the rows; batches share the machine with the purge of the batches
    /// before them, so they return later than one big `DELETE` (about 2×
    /// for a million rows) but leave the server done sooner (about 0.9×).
    /// Batches that start where the last one ended, by `(expires_at, key)`,
    /// were measured too and were no faster.
    Batches(String),
}

impl Statements {
    pub(crate) fn new(dialect: Dialect, table: &str, purge_batch: i64) -> Self {
        let t = dialect.quote(table);
        let key = dialect.quote("key");
        let p = |n| dialect.param(n);
        let columns = select_columns(dialect);
        let expiry = dialect.expiry("");
        let least = dialect.least();
        let insert = format!(
            "INSERT INTO {t} ({key}, {}) VALUES ({})",
            RECORD_COLUMNS.join(", "),
            (1..=RECORD_COLUMNS.len() + 1)
                .map(p)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let create = match dialect {
            #[cfg(feature = "mysql")]
            Dialect::MySql => insert,
            #[allow(unreachable_patterns)]
            _ => format!(
                "{insert} ON CONFLICT ({key}) DO UPDATE SET {} WHERE {} <= {}",
                RECORD_COLUMNS
                    .iter()
                    .map(|column| format!("{column} = excluded.{column}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                dialect.expiry(&format!("{t}.")),
                p(RECORD_COLUMNS.len() + 2)
            ),
        };
        let n = RECORD_COLUMNS.len();
        // The placeholder of each record column, as `bind_record` binds them.
        let column_param = |column: &str| {
            let index = RECORD_COLUMNS.iter().position(|c| *c == column);
            p(index.expect("a record column") + 1)
        };
        let assign = |column: &&str| match *column {
            "expires_at" => format!("expires_at = {least}(expires_at, {})", column_param(column)),
            _ => format!("{column} = {}", column_param(column)),
        };
        let live_at_version = format!(
            "{key} = {} AND version = {} AND {expiry} > {}",
            p(n + 1),
            p(n + 2),
            p(n + 3)
        );
        let replace = format!(
            "UPDATE {t} SET {} WHERE {live_at_version}",
            RECORD_COLUMNS
                .iter()
                .map(assign)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let replace_in_place = match dialect {
            #[cfg(feature = "sqlite")]
            Dialect::Sqlite => Some(format!(
                "UPDATE {t} SET {} WHERE {live_at_version} AND expires_at <= {} AND user_id IS {}",
                RECORD_COLUMNS
                    .iter()
                    .filter(|column| !matches!(**column, "expires_at" | "user_id"))
                    .map(assign)
                    .collect::<Vec<_>>()
                    .join(", "),
                column_param("expires_at"),
                column_param("user_id"),
            )),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        #[cfg(feature = "postgres")]
        let replace_many = match dialect {
            #[cfg(feature = "postgres")]
            Dialect::Postgres => Some(format!(
                "UPDATE {t} SET {} FROM UNNEST($1::bytea[], $2::int8[], $3::int8[], $4::int8[], \
                 $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], \
                 $11::int8[], $12::int8[], $13::bytea[]) AS v({key}, expected, now, {}) \
                 WHERE {t}.{key} = v.{key} AND {t}.version = v.expected AND {} > v.now \
                 RETURNING {t}.{key}",
                RECORD_COLUMNS
                    .iter()
                    .map(|column| match *column {
                        "expires_at" =>
                            format!("expires_at = {least}({t}.expires_at, v.expires_at)"),
                        _ => format!("{column} = v.{column}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                RECORD_COLUMNS.join(", "),
                dialect.expiry(&format!("{t}.")),
            )),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        #[cfg(feature = "postgres")]
        let lease_many = match dialect {
            #[cfg(feature = "postgres")]
            Dialect::Postgres => Some(format!(
                "UPDATE {t} SET version = {t}.version + 1, lease_token = v.token, lease_until = v.until \
                 FROM UNNEST($1::bytea[], $2::int8[], $3::int8[], $4::int8[]) AS v({key}, token, until, now) \
                 WHERE {t}.{key} = v.{key} AND {} > v.now \
                 AND ({t}.lease_until IS NULL OR {t}.lease_until <= v.now) \
                 RETURNING {t}.{key}, {columns}",
                dialect.expiry(&format!("{t}.")),
            )),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        // A batch of the rows whose `expires_at` has come (first
        // placeholder) and whose real expiry compares to the second
        // placeholder as `compare` says. Batches address rows by their
        // physical id (a TID scan in PostgreSQL, the rowid in SQLite): by
        // key they cost several times more. A row updated meanwhile has a
        // new id, so the batch leaves it alone.
        let due_rows = |compare: &str| {
            let due = format!("expires_at <= {} AND {expiry} {compare} {}", p(1), p(2));
            match dialect {
                #[cfg(feature = "mysql")]
                Dialect::MySql => format!("WHERE {due} LIMIT {purge_batch}"),
                #[cfg(feature = "postgres")]
                Dialect::Postgres => format!(
                    "WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {due} LIMIT {purge_batch}))"
                ),
                #[allow(unreachable_patterns)]
                _ => format!(
                    "WHERE rowid IN (SELECT rowid FROM {t} WHERE {due} LIMIT {purge_batch})"
                ),
            }
        };
        Self {
            load: format!(
                "SELECT {key}, {columns} FROM {t} WHERE {key} = {} AND {expiry} > {}",
                p(1),
                p(2)
            ),
            load_many: (1..=MAX_LOADS.ilog2())
                .map(|power| {
                    let keys = 1usize << power;
                    format!(
                        "SELECT {key}, {columns} FROM {t} WHERE {key} IN ({}) AND {expiry} > {}",
                        (1..=keys).map(p).collect::<Vec<_>>().join(", "),
                        p(keys + 1)
                    )
                })
                .collect(),
            create,
            delete_expired_key: format!(
                "DELETE FROM {t} WHERE {key} = {} AND {expiry} <= {}",
                p(1),
                p(2)
            ),
            replace,
            replace_in_place,
            #[cfg(feature = "postgres")]
            replace_many,
            #[cfg(feature = "postgres")]
            lease_many,
            #[cfg(feature = "sqlite")]
            lease: format!(
                "UPDATE {t} SET version = version + 1, lease_token = {}, lease_until = {} \
                 WHERE {key} = {} AND {expiry} > {} AND (lease_until IS NULL OR lease_until <= {}) \
                 RETURNING {key}, {columns}",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
            ),
            rename: format!(
                "UPDATE {t} SET {}, {key} = {} WHERE {key} = {} AND version = {}",
                RECORD_COLUMNS
                    .iter()
                    .map(|column| format!("{column} = {}", column_param(column)))
                    .collect::<Vec<_>>()
                    .join(", "),
                p(n + 1),
                p(n + 2),
                p(n + 3)
            ),
            delete: format!("DELETE FROM {t} WHERE {key} = {}", p(1)),
            delete_at_version: format!(
                "DELETE FROM {t} WHERE {key} = {} AND version = {}",
                p(1),
                p(2)
            ),
            // MySQL evaluates `SET` from left to right: `expires_at` reads
            // `absolute_deadline` and itself, which this statement leaves as they were.
            touch: format!(
                "UPDATE {t} SET accessed_at = {}, idle_deadline = {}, expires_at = {least}(expires_at, \
                 CASE WHEN absolute_deadline IS NOT NULL AND absolute_deadline < {} \
                 THEN absolute_deadline ELSE {} END) WHERE {key} = {} AND {expiry} > {}",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6)
            ),
            purge: match dialect {
                #[cfg(feature = "postgres")]
                Dialect::Postgres => Purge::Whole(format!(
                    "DELETE FROM {t} WHERE expires_at <= $1 AND {expiry} <= $2"
                )),
                #[allow(unreachable_patterns)]
                _ => Purge::Batches(format!("DELETE FROM {t} {}", due_rows("<="))),
            },
            purge_batch,
            purge_move: format!("UPDATE {t} SET expires_at = {expiry} {}", due_rows(">")),
            list_first: format!(
                "SELECT {key}, {columns} FROM {t} ORDER BY {key} LIMIT {}",
                p(1)
            ),
            list_after: format!(
                "SELECT {key}, {columns} FROM {t} WHERE {key} > {} ORDER BY {key} LIMIT {}",
                p(1),
                p(2)
            ),
            count: format!("SELECT COUNT(*) FROM {t}"),
            find_by_user: format!(
                "SELECT {key}, {columns} FROM {t} WHERE user_id = {} AND {expiry} > {} ORDER BY {key}",
                p(1),
                p(2)
            ),
        }
    }
}

/// What the shared code needs to know about a driver beyond [`sqlx::Database`].
pub(crate) trait Backend: Database {
    /// The store name for errors and logs.
    const STORE: &'static str;
    /// How to write SQL for it.
    const DIALECT: Dialect;
    /// How many rows a statement changed (or matched, on MySQL).
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

/// One session table behind a pool: the statements of the [`SessionStore`]
/// primitives, shared by the three SQL stores.
///
/// [`SessionStore`]: crate::SessionStore
pub(crate) struct SqlTable<DB: Database> {
    pub(crate) pool: Pool<DB>,
    pub(crate) table: String,
    statements: std::sync::Arc<Statements>,
}

impl<DB: Backend> SqlTable<DB> {
    pub(crate) fn new(pool: Pool<DB>, table: &str) -> Result<Self> {
        validate_table_name(table)?;
        Ok(Self {
            pool,
            table: table.to_owned(),
            statements: std::sync::Arc::new(Statements::new(DB::DIALECT, table, PURGE_BATCH)),
        })
    }

    /// The same table, purged in batches of `rows`.
    #[cfg(test)]
    pub(crate) fn with_purge_batch(mut self, rows: i64) -> Self {
        self.statements = std::sync::Arc::new(Statements::new(DB::DIALECT, &self.table, rows));
        self
    }

    /// The same pool on another table.
    pub(crate) fn with_table_name(&self, table: &str) -> Result<Self> {
        Self::new(self.pool.clone(), table)
    }

    /// A backend error with this store's name, or a decode error for a
    /// value the driver could not decode.
    pub(crate) fn error(&self, context: &str, err: sqlx::Error) -> Error {
        backend_error(DB::STORE, context, err)
    }
}

impl<DB: Database> Clone for SqlTable<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            table: self.table.clone(),
            statements: self.statements.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for SqlTable<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlTable")
            .field("table", &self.table)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Maps a driver error: decode failures to decode errors, the rest to
/// backend errors that keep the driver's error as their source.
pub(crate) fn backend_error(store: &'static str, context: &str, err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            Error::decode(format_args!("`{store}` row: {err}"))
        }
        sqlx::Error::Configuration(_) => Error::config(format_args!("`{store}`: {err}")),
        err => Error::backend_source(store, context, err),
    }
}

/// Opens a pool, reporting why the server could not be reached: the pool
/// retries a refused connection until its timeout and then reports only
/// that it timed out, so on a timeout one more direct attempt names the
/// cause ("connection refused").
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn connect_pool<DB: Backend>(
    pool: sqlx::pool::PoolOptions<DB>,
    options: <DB::Connection as sqlx::Connection>::Options,
) -> Result<Pool<DB>> {
    use sqlx::ConnectOptions as _;
    let context = "connect to the server";
    match pool.connect_with(options.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => {
            let cause = match options.connect().await {
                Ok(_connection) => sqlx::Error::PoolTimedOut,
                Err(err) => err,
            };
            Err(backend_error(DB::STORE, context, cause))
        }
        Err(err) => Err(backend_error(DB::STORE, context, err)),
    }
}

/// The arguments of one compare-and-swap.
pub(crate) struct Swap<'a> {
    pub(crate) key: &'a SessionKey,
    pub(crate) expected_version: u64,
    pub(crate) record: &'a Record,
    pub(crate) now: Timestamp,
}

/// A u64 stored in a signed 64-bit column, bits unchanged.
fn to_i64(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

/// The inverse of [`to_i64`].
fn to_u64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

impl<DB> SqlTable<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB>,
    for<'r> Vec<u8>: Decode<'r, DB> + Type<DB>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// A connection from the pool, for the primitives below that run on one.
    pub(crate) async fn acquire(&self, context: &str) -> Result<sqlx::pool::PoolConnection<DB>> {
        self.pool
            .acquire()
            .await
            .map_err(|err| self.error(context, err))
    }

    pub(crate) async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        let context = "load session";
        self.load_on(&mut *self.acquire(context).await?, key, now)
            .await
    }

    /// [`load`](Self::load) on `connection`, which may be in a transaction.
    async fn load_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        now: Timestamp,
    ) -> Result<Option<Record>> {
        let row = sqlx::query(&self.statements.load)
            .bind(key.as_bytes().as_slice())
            .bind(now.as_millis())
            .fetch_optional(&mut *connection)
            .await
            .map_err(|err| self.error("load session", err))?;
        row.map(|row| decode_row(&row).map(|(_, record)| record))
            .transpose()
    }

    /// The records of `keys` (at most [`MAX_LOADS`], repeats allowed)
    /// that are live at `now`, in one statement: each with its record, or
    /// the error decoding its row; keys with no live record are left out.
    /// The keys are padded (by repeating one) to a power of two, so that a
    /// few prepared statements serve every batch.
    pub(crate) async fn read_many(
        &self,
        keys: &[SessionKey],
        now: Timestamp,
    ) -> Result<Vec<(SessionKey, Result<Record>)>> {
        let context = "load sessions";
        let Some(last) = keys.last() else {
            return Ok(Vec::new());
        };
        let padded = keys.len().next_power_of_two().max(2);
        let statement = usize::try_from(padded.ilog2() - 1)
            .ok()
            .and_then(|index| self.statements.load_many.get(index))
            .ok_or_else(|| Error::backend(DB::STORE, "too many keys for one load"))?;
        let mut query = sqlx::query(statement);
        for index in 0..padded {
            query = query.bind(keys.get(index).unwrap_or(last).as_bytes().as_slice());
        }
        let rows = query
            .bind(now.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(|err| self.error(context, err))?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode_row(row) {
                Ok((key, record)) => records.push((key, Ok(record))),
                // The error belongs to the row's key; a key that does not
                // decode cannot be one asked for.
                Err(err) => {
                    let key = row.try_get::<Vec<u8>, _>(0).ok();
                    if let Some(key) = key
                        .as_deref()
                        .and_then(|key| <[u8; 32]>::try_from(key).ok())
                    {
                        records.push((SessionKey::from_bytes(key), Err(err)));
                    }
                }
            }
        }
        Ok(records)
    }

    /// On a connection of the pool (SQLite group-commits instead: see
    /// `store/group_commit.rs`).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let mut connection = self.acquire("create session").await?;
        self.create_on(&mut connection, key, record, now).await
    }

    /// [`create`](Self::create) on `connection`, which may be in a transaction.
    pub(crate) async fn create_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let query = bind_record(
            sqlx::query(&self.statements.create).bind(key.as_bytes().as_slice()),
            record,
        );
        if self.upserts() {
            // One statement: insert, or overwrite a row that is expired at `now`.
            let result = query
                .bind(now.as_millis())
                .execute(&mut *connection)
                .await
                .map_err(|err| self.error("create session", err))?;
            return Ok(if DB::rows_affected(&result) == 1 {
                CreateOutcome::Created
            } else {
                CreateOutcome::Collision
            });
        }
        // MySQL: `ON DUPLICATE KEY UPDATE` cannot tell a collision from an
        // update, so insert, and on a duplicate key delete the row only if it
        // is expired and insert again. Keys are random: the first insert
        // almost always succeeds, in one round trip.
        match query.execute(&mut *connection).await {
            Ok(_) => return Ok(CreateOutcome::Created),
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {}
            Err(err) => return Err(self.error("create session", err)),
        }
        if !self
            .delete_if_expired(connection, key, now, "create session")
            .await?
        {
            return Ok(CreateOutcome::Collision);
        }
        let retry = bind_record(
            sqlx::query(&self.statements.create).bind(key.as_bytes().as_slice()),
            record,
        );
        match retry.execute(&mut *connection).await {
            Ok(_) => Ok(CreateOutcome::Created),
            // Another create took the key between our delete and insert.
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                Ok(CreateOutcome::Collision)
            }
            Err(err) => Err(self.error("create session", err)),
        }
    }

    fn upserts(&self) -> bool {
        match DB::DIALECT {
            #[cfg(feature = "mysql")]
            Dialect::MySql => false,
            #[allow(unreachable_patterns)]
            _ => true,
        }
    }

    /// On a connection of the pool (SQLite group-commits instead: see
    /// `store/group_commit.rs`).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let mut connection = self.acquire("replace session").await?;
        self.replace_on(&mut connection, key, expected_version, record, now)
            .await
    }

    /// [`replace`](Self::replace) on `connection`, which may be in a transaction.
    pub(crate) async fn replace_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let write = Swap {
            key,
            expected_version,
            record,
            now,
        };
        if let Some(in_place) = &self.statements.replace_in_place
            && self.run_replace(connection, in_place, &write).await?
        {
            return Ok(true);
        }
        self.run_replace(connection, &self.statements.replace, &write)
            .await
    }

    /// Runs one of the replace statements; whether it changed the row.
    async fn run_replace(
        &self,
        connection: &mut DB::Connection,
        statement: &str,
        write: &Swap<'_>,
    ) -> Result<bool> {
        let result = bind_record(sqlx::query(statement), write.record)
            .bind(write.key.as_bytes().as_slice())
            .bind(to_i64(write.expected_version))
            .bind(write.now.as_millis())
            .execute(&mut *connection)
            .await
            .map_err(|err| self.error("replace session", err))?;
        Ok(DB::rows_affected(&result) == 1)
    }

    /// Takes the lease with one `UPDATE … RETURNING` that matches only a
    /// live record with no binding lease; reads the row to tell a held
    /// lease from a missing record. On `connection`, which may be in a
    /// transaction (SQLite's group commit; PostgreSQL batches its leases,
    /// `store/batched_lease.rs`, and MySQL leases by compare-and-swap).
    #[cfg(feature = "sqlite")]
    pub(crate) async fn lease_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseOutcome> {
        let context = "lock session";
        loop {
            let row = sqlx::query(&self.statements.lease)
                .bind(to_i64(lease.token))
                .bind(lease.until.as_millis())
                .bind(key.as_bytes().as_slice())
                .bind(now.as_millis())
                .bind(now.as_millis())
                .fetch_optional(&mut *connection)
                .await
                .map_err(|err| self.error(context, err))?;
            if let Some(row) = row {
                return decode_row(&row).map(|(_, record)| LeaseOutcome::Taken(record));
            }
            match self.load_on(connection, key, now).await? {
                None => return Ok(LeaseOutcome::Missing),
                Some(record) if record.is_leased_at(now) => {
                    return Ok(LeaseOutcome::Held(record));
                }
                // Released between the two statements: try again.
                Some(_) => {}
            }
        }
    }

    /// On a connection of the pool (SQLite group-commits instead: see
    /// `store/group_commit.rs`).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let mut connection = self.acquire("rename session").await?;
        self.rename_on(&mut connection, key, expected_version, new_key, record, now)
            .await
    }

    /// [`SessionStore::rename`](crate::SessionStore::rename) on
    /// `connection`: one `UPDATE` of the row's key, so one round trip, and
    /// at every moment the session is under exactly one of the two keys. A
    /// row under `new_key` fails it on the primary key; an expired one is
    /// then deleted, as `create` would replace it, and the update tried
    /// once more. The connection may be in a transaction only where a
    /// failed statement leaves it usable (SQLite's group commit; not
    /// PostgreSQL).
    pub(crate) async fn rename_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        // The `UPDATE` would rewrite the session in place.
        if key == new_key {
            return Ok(false);
        }
        let context = "rename session";
        let rename = || {
            bind_record(sqlx::query(&self.statements.rename), record)
                .bind(new_key.as_bytes().as_slice())
                .bind(key.as_bytes().as_slice())
                .bind(to_i64(expected_version))
        };
        match rename().execute(&mut *connection).await {
            Ok(result) => return Ok(DB::rows_affected(&result) == 1),
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {}
            Err(err) => return Err(self.error(context, err)),
        }
        if !self
            .delete_if_expired(connection, new_key, now, context)
            .await?
        {
            return Ok(false);
        }
        match rename().execute(&mut *connection).await {
            Ok(result) => Ok(DB::rows_affected(&result) == 1),
            // A live row took the new key between our delete and update.
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => Ok(false),
            Err(err) => Err(self.error(context, err)),
        }
    }

    /// Deletes the row under `key` if it is expired at `now` (what a
    /// create may replace); whether there was one.
    async fn delete_if_expired(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        now: Timestamp,
        context: &str,
    ) -> Result<bool> {
        let deleted = sqlx::query(&self.statements.delete_expired_key)
            .bind(key.as_bytes().as_slice())
            .bind(now.as_millis())
            .execute(&mut *connection)
            .await
            .map_err(|err| self.error(context, err))?;
        Ok(DB::rows_affected(&deleted) == 1)
    }

    /// On a connection of the pool (SQLite group-commits instead: see
    /// `store/group_commit.rs`).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) async fn delete(
        &self,
        key: &SessionKey,
        expected_version: Option<u64>,
    ) -> Result<bool> {
        let mut connection = self.acquire("delete session").await?;
        self.delete_on(&mut connection, key, expected_version).await
    }

    /// [`delete`](Self::delete) on `connection`, which may be in a transaction.
    pub(crate) async fn delete_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        expected_version: Option<u64>,
    ) -> Result<bool> {
        let result = match expected_version {
            None => {
                sqlx::query(&self.statements.delete)
                    .bind(key.as_bytes().as_slice())
                    .execute(&mut *connection)
                    .await
            }
            Some(version) => {
                sqlx::query(&self.statements.delete_at_version)
                    .bind(key.as_bytes().as_slice())
                    .bind(to_i64(version))
                    .execute(&mut *connection)
                    .await
            }
        }
        .map_err(|err| self.error("delete session", err))?;
        Ok(DB::rows_affected(&result) == 1)
    }

    /// On a connection of the pool (SQLite group-commits instead: see
    /// `store/group_commit.rs`).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let mut connection = self.acquire("touch session").await?;
        self.touch_on(&mut connection, key, accessed_at, idle_deadline)
            .await
    }

    /// [`touch`](Self::touch) on `connection`, which may be in a transaction.
    pub(crate) async fn touch_on(
        &self,
        connection: &mut DB::Connection,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let result = sqlx::query(&self.statements.touch)
            .bind(accessed_at.as_millis())
            .bind(idle_deadline.as_millis())
            .bind(idle_deadline.as_millis())
            .bind(idle_deadline.as_millis())
            .bind(key.as_bytes().as_slice())
            .bind(accessed_at.as_millis())
            .execute(&mut *connection)
            .await
            .map_err(|err| self.error("touch session", err))?;
        Ok(DB::rows_affected(&result) == 1)
    }

    pub(crate) async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
        let statements = &self.statements;
        let purged = match &statements.purge {
            #[cfg(feature = "postgres")]
            Purge::Whole(statement) => self.run_purge_statement(statement, now).await?,
            Purge::Batches(statement) => self.each_batch(statement, now).await?,
        };
        // After the deletes, so that no batch moves a row only to delete it.
        self.each_batch(&statements.purge_move, now).await?;
        Ok(purged)
    }

    /// Runs a batched purge statement until a batch falls short; returns
    /// the rows changed.
    async fn each_batch(&self, statement: &str, now: Timestamp) -> Result<u64> {
        let mut changed = 0;
        loop {
            let batch = self.run_purge_statement(statement, now).await?;
            changed += batch;
            if batch < self.statements.purge_batch as u64 {
                return Ok(changed);
            }
        }
    }

    /// Runs a purge statement (placeholders: now, now) once; returns the
    /// rows changed.
    async fn run_purge_statement(&self, statement: &str, now: Timestamp) -> Result<u64> {
        let result = sqlx::query(statement)
            .bind(now.as_millis())
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(|err| self.error("purge expired sessions", err))?;
        Ok(DB::rows_affected(&result))
    }

    pub(crate) async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page> {
        if limit == 0 {
            return Ok(Page::default());
        }
        // One row more than asked tells whether another page follows.
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let rows = match after {
            None => {
                sqlx::query(&self.statements.list_first)
                    .bind(fetch)
                    .fetch_all(&self.pool)
                    .await
            }
            Some(after) => {
                sqlx::query(&self.statements.list_after)
                    .bind(after.as_bytes().as_slice())
                    .bind(fetch)
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(|err| self.error("list sessions", err))?;
        let more = rows.len() > limit;
        let records: Vec<_> = rows
            .iter()
            .take(limit)
            .filter_map(|row| decode_row(row).ok())
            .collect();
        let next = if more {
            records.last().map(|(key, _)| *key)
        } else {
            None
        };
        Ok(Page { records, next })
    }

    pub(crate) async fn count(&self) -> Result<u64> {
        let row = sqlx::query(&self.statements.count)
            .fetch_one(&self.pool)
            .await
            .map_err(|err| self.error("count sessions", err))?;
        let count: i64 = row
            .try_get(0)
            .map_err(|err| self.error("count sessions", err))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub(crate) async fn find_by_user(
        &self,
        user: &str,
        now: Timestamp,
    ) -> Result<Vec<(SessionKey, Record)>> {
        let rows = sqlx::query(&self.statements.find_by_user)
            .bind(user)
            .bind(now.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(|err| self.error("find sessions by user", err))?;
        Ok(rows
            .iter()
            .filter_map(|row| decode_row(row).ok())
            // MySQL compares text ignoring trailing spaces: keep exact matches only.
            .filter(|(_, record)| record.user.as_deref() == Some(user))
            .collect())
    }
}

#[cfg(feature = "postgres")]
impl SwapMany for SqlTable<sqlx::Postgres> {
    /// One `UPDATE … FROM UNNEST(…)`, which swaps each row at its own
    /// expected version and returns the keys it changed.
    async fn swap_many(&self, swaps: &[Swap<'_>]) -> Result<HashSet<SessionKey>> {
        let context = "replace sessions";
        let statement = self
            .statements
            .replace_many
            .as_deref()
            .ok_or_else(|| Error::backend("postgres", "no statement for many swaps"))?;
        let column = |value: fn(&Swap<'_>) -> i64| swaps.iter().map(value).collect::<Vec<_>>();
        let optional =
            |value: fn(&Swap<'_>) -> Option<i64>| swaps.iter().map(value).collect::<Vec<_>>();
        let rows = sqlx::query(statement)
            .bind(
                swaps
                    .iter()
                    .map(|swap| swap.key.as_bytes().as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(column(|swap| to_i64(swap.expected_version)))
            .bind(column(|swap| swap.now.as_millis()))
            .bind(column(|swap| to_i64(swap.record.version)))
            .bind(
                swaps
                    .iter()
                    .map(|swap| swap.record.user.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(column(|swap| swap.record.created_at.as_millis()))
            .bind(column(|swap| swap.record.accessed_at.as_millis()))
            .bind(column(|swap| swap.record.idle_deadline.as_millis()))
            .bind(optional(|swap| {
                swap.record.absolute_deadline.map(Timestamp::as_millis)
            }))
            .bind(column(|swap| swap.record.expires_at().as_millis()))
            .bind(optional(|swap| {
                swap.record.lease.map(|lease| to_i64(lease.token))
            }))
            .bind(optional(|swap| {
                swap.record.lease.map(|lease| lease.until.as_millis())
            }))
            .bind(
                swaps
                    .iter()
                    .map(|swap| swap.record.data.as_slice())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await
            .map_err(|err| self.error(context, err))?;
        rows.iter()
            .map(|row| {
                let key: Vec<u8> = row.try_get(0).map_err(|err| self.error(context, err))?;
                session_key(&key)
            })
            .collect()
    }

    async fn swap_one(&self, swap: Swap<'_>) -> Result<bool> {
        self.replace(swap.key, swap.expected_version, swap.record, swap.now)
            .await
    }
}

#[cfg(feature = "mysql")]
impl SwapMany for SqlTable<sqlx::MySql> {
    /// In one transaction: lock the rows and read their versions and
    /// deadlines (`SELECT … FOR UPDATE`), decide each swap from them, and
    /// write the winners in one `INSERT … ON DUPLICATE KEY UPDATE`, which
    /// updates every one of them, as they exist and are locked. MySQL has
    /// no `UPDATE … RETURNING` to tell the winners of one `UPDATE`.
    /// Both statements repeat their last key or row up to a power of two
    /// (a key locked twice, a row written twice with the same values), so
    /// that a few prepared statements serve every batch instead of one per
    /// batch size, more than sqlx's cache of 100 per connection keeps.
    async fn swap_many(&self, swaps: &[Swap<'_>]) -> Result<HashSet<SessionKey>> {
        let context = "replace sessions";
        let fail = |err| self.error(context, err);
        let Some(last) = swaps.last() else {
            return Ok(HashSet::new());
        };
        let t = Dialect::MySql.quote(&self.table);
        let places = |count: usize, each: &str| vec![each; count].join(", ");
        let mut transaction = self.pool.begin().await.map_err(fail)?;
        let keys = swaps.len().next_power_of_two();
        let lock = format!(
            "SELECT `key`, version, idle_deadline, absolute_deadline FROM {t} \
             WHERE `key` IN ({}) FOR UPDATE",
            places(keys, "?")
        );
        let mut query = sqlx::query(&lock);
        for index in 0..keys {
            let swap = swaps.get(index).unwrap_or(last);
            query = query.bind(swap.key.as_bytes().as_slice());
        }
        let mut current = std::collections::HashMap::with_capacity(swaps.len());
        for row in query.fetch_all(&mut *transaction).await.map_err(fail)? {
            let key: Vec<u8> = row.try_get(0).map_err(fail)?;
            let version: i64 = row.try_get(1).map_err(fail)?;
            let idle: i64 = row.try_get(2).map_err(fail)?;
            let absolute: Option<i64> = row.try_get(3).map_err(fail)?;
            let expiry = absolute.map_or(idle, |absolute| absolute.min(idle));
            current.insert(session_key(&key)?, (to_u64(version), expiry));
        }
        let winners: Vec<_> = swaps
            .iter()
            .filter(|swap| {
                current.get(swap.key).is_some_and(|&(version, expiry)| {
                    version == swap.expected_version && expiry > swap.now.as_millis()
                })
            })
            .collect();
        if let Some(last) = winners.last() {
            let rows = winners.len().next_power_of_two();
            let row = format!("({})", places(RECORD_COLUMNS.len() + 1, "?"));
            let write = format!(
                "INSERT INTO {t} (`key`, {}) VALUES {} ON DUPLICATE KEY UPDATE {}",
                RECORD_COLUMNS.join(", "),
                places(rows, &row),
                RECORD_COLUMNS
                    .iter()
                    .map(|column| match *column {
                        "expires_at" =>
                            "expires_at = LEAST(expires_at, VALUES(expires_at))".to_owned(),
                        _ => format!("{column} = VALUES({column})"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut query = sqlx::query(&write);
            for index in 0..rows {
                let swap = winners.get(index).unwrap_or(last);
                query = bind_record(query.bind(swap.key.as_bytes().as_slice()), swap.record);
            }
            query.execute(&mut *transaction).await.map_err(fail)?;
        }
        transaction.commit().await.map_err(fail)?;
        Ok(winners.iter().map(|swap| *swap.key).collect())
    }

    async fn swap_one(&self, swap: Swap<'_>) -> Result<bool> {
        self.replace(swap.key, swap.expected_version, swap.record, swap.now)
            .await
    }
}

#[cfg(feature = "postgres")]
impl LeaseMany for SqlTable<sqlx::Postgres> {
    /// One `UPDATE … FROM UNNEST(…) RETURNING`, which takes each free lease
    /// of a live row at its own `now` and returns the rows it took; a row
    /// named twice is taken once, by one of its leases (the one whose token
    /// it returns).
    async fn lease_many(&self, attempts: &[LeaseAttempt]) -> Result<Vec<Taken>> {
        let context = "lock sessions";
        let statement = self
            .statements
            .lease_many
            .as_deref()
            .ok_or_else(|| Error::backend("postgres", "no statement for many leases"))?;
        let column =
            |value: fn(&LeaseAttempt) -> i64| attempts.iter().map(value).collect::<Vec<_>>();
        let rows = sqlx::query(statement)
            .bind(
                attempts
                    .iter()
                    .map(|attempt| attempt.key.as_bytes().as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(column(|attempt| to_i64(attempt.lease.token)))
            .bind(column(|attempt| attempt.lease.until.as_millis()))
            .bind(column(|attempt| attempt.now.as_millis()))
            .fetch_all(&self.pool)
            .await
            .map_err(|err| self.error(context, err))?;
        let mut taken: Vec<Taken> = attempts.iter().map(|_| Ok(None)).collect();
        for row in &rows {
            let (key, record) = match decode_row(row) {
                Ok((key, record)) => (key, Ok(record)),
                Err(err) => {
                    let key: Vec<u8> = row.try_get(0).map_err(|err| self.error(context, err))?;
                    (session_key(&key)?, Err(err))
                }
            };
            let token = record
                .as_ref()
                .ok()
                .and_then(|record| record.lease)
                .map(|lease| lease.token);
            // The lease that took the row: its key's first one not yet
            // answered whose token the row carries (any, if it cannot be read).
            let taker = attempts.iter().zip(&taken).position(|(attempt, taken)| {
                attempt.key == key
                    && token.is_none_or(|token| token == attempt.lease.token)
                    && matches!(taken, Ok(None))
            });
            if let Some(taker) = taker {
                taken[taker] = record.map(Some);
            }
        }
        Ok(taken)
    }
}

/// [`LoadMany`] for each SQL store's table.
macro_rules! impl_load_many {
    ($db:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl LoadMany for SqlTable<$db> {
            const STORE: &'static str = $feature;

            async fn load_many(
                &self,
                keys: &[SessionKey],
                now: Timestamp,
            ) -> Result<Vec<(SessionKey, Result<Record>)>> {
                self.read_many(keys, now).await
            }

            async fn load_one(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
                self.load(key, now).await
            }
        }
    };
}

impl_load_many!(sqlx::Sqlite, "sqlite");
impl_load_many!(sqlx::Postgres, "postgres");
impl_load_many!(sqlx::MySql, "mysql");

/// A key read back from a row.
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn session_key(bytes: &[u8]) -> Result<SessionKey> {
    <[u8; 32]>::try_from(bytes)
        .map(SessionKey::from_bytes)
        .map_err(|_| Error::decode("a session row's key is not 32 bytes"))
}

/// Binds a record's columns (all but the key) in [`RECORD_COLUMNS`] order.
fn bind_record<'q, DB>(
    query: sqlx::query::Query<'q, DB, DB::Arguments<'q>>,
    record: &'q Record,
) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB>,
    &'q str: Type<DB>,
{
    query
        .bind(to_i64(record.version))
        .bind(record.user.as_deref())
        .bind(record.created_at.as_millis())
        .bind(record.accessed_at.as_millis())
        .bind(record.idle_deadline.as_millis())
        .bind(record.absolute_deadline.map(Timestamp::as_millis))
        .bind(record.expires_at().as_millis())
        .bind(record.lease.map(|lease| to_i64(lease.token)))
        .bind(record.lease.map(|lease| lease.until.as_millis()))
        .bind(record.data.as_slice())
}

/// A row of `SELECT key, select_columns()` as a record; a decode error for a
/// value that does not fit (a key that is not 32 bytes, a wrong column type).
fn decode_row<R>(row: &R) -> Result<(SessionKey, Record)>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn decode(err: sqlx::Error) -> Error {
        Error::decode(format_args!("session row: {err}"))
    }
    let key: Vec<u8> = row.try_get(0).map_err(decode)?;
    let key = <[u8; 32]>::try_from(key.as_slice())
        .map(SessionKey::from_bytes)
        .map_err(|_| {
            Error::decode(format_args!(
                "session row has a key of {} bytes, not 32",
                key.len()
            ))
        })?;
    let millis = |index: usize| row.try_get::<i64, _>(index).map_err(decode);
    let optional = |index: usize| row.try_get::<Option<i64>, _>(index).map_err(decode);
    let lease = match (optional(7)?, optional(8)?) {
        (Some(token), Some(until)) => Some(Lease {
            token: to_u64(token),
            until: Timestamp::from_millis(until),
        }),
        _ => None,
    };
    let record = Record {
        version: to_u64(millis(1)?),
        user: row.try_get(2).map_err(decode)?,
        created_at: Timestamp::from_millis(millis(3)?),
        accessed_at: Timestamp::from_millis(millis(4)?),
        idle_deadline: Timestamp::from_millis(millis(5)?),
        absolute_deadline: optional(6)?.map(Timestamp::from_millis),
        lease,
        data: row.try_get(9).map_err(decode)?,
    };
    Ok((key, record))
}

/// Implements [`SessionStore`](crate::SessionStore) for a SQL store whose
/// `table` field is a [`SqlTable`] and that has an inherent `setup_schema`.
macro_rules! impl_sql_session_store {
    ($store:ty, $name:literal) => {
        #[cfg(test)]
        impl $store {
            /// The same store, purging in batches of `rows`.
            pub(crate) fn with_purge_batch(self, rows: i64) -> Self {
                Self {
                    table: self.table.with_purge_batch(rows),
                }
            }
        }

        #[async_trait::async_trait]
        impl crate::SessionStore for $store {
            fn name(&self) -> &'static str {
                $name
            }

            fn capabilities(&self) -> crate::Capabilities {
                crate::Capabilities {
                    is_multiprocess_safe: true,
                    is_thread_safe: true,
                }
            }

            async fn setup(&self) -> crate::Result<()> {
                self.setup_schema().await
            }

            async fn load(
                &self,
                key: &crate::SessionKey,
                now: crate::Timestamp,
            ) -> crate::Result<Option<crate::Record>> {
                self.table.load(key, now).await
            }

            async fn create(
                &self,
                key: &crate::SessionKey,
                record: &crate::Record,
                now: crate::Timestamp,
            ) -> crate::Result<crate::CreateOutcome> {
                self.table.create(key, record, now).await
            }

            async fn replace(
                &self,
                key: &crate::SessionKey,
                expected_version: u64,
                record: &crate::Record,
                now: crate::Timestamp,
            ) -> crate::Result<bool> {
                self.table.replace(key, expected_version, record, now).await
            }

            async fn lease(
                &self,
                key: &crate::SessionKey,
                lease: crate::Lease,
                now: crate::Timestamp,
            ) -> crate::Result<crate::LeaseOutcome> {
                self.table.lease(key, lease, now).await
            }

            async fn delete(
                &self,
                key: &crate::SessionKey,
                expected_version: Option<u64>,
            ) -> crate::Result<bool> {
                self.table.delete(key, expected_version).await
            }

            async fn rename(
                &self,
                key: &crate::SessionKey,
                expected_version: u64,
                new_key: &crate::SessionKey,
                record: &crate::Record,
                now: crate::Timestamp,
            ) -> crate::Result<bool> {
                self.table
                    .rename(key, expected_version, new_key, record, now)
                    .await
            }

            async fn touch(
                &self,
                key: &crate::SessionKey,
                accessed_at: crate::Timestamp,
                idle_deadline: crate::Timestamp,
            ) -> crate::Result<bool> {
                self.table.touch(key, accessed_at, idle_deadline).await
            }

            async fn purge_expired(&self, now: crate::Timestamp) -> crate::Result<u64> {
                self.table.purge_expired(now).await
            }

            async fn list(
                &self,
                after: Option<&crate::SessionKey>,
                limit: usize,
            ) -> crate::Result<crate::Page> {
                self.table.list(after, limit).await
            }

            async fn count(&self) -> crate::Result<u64> {
                self.table.count().await
            }

            async fn find_by_user(
                &self,
                user: &str,
                now: crate::Timestamp,
            ) -> crate::Result<Vec<(crate::SessionKey, crate::Record)>> {
                self.table.find_by_user(user, now).await
            }
        }
    };
}

pub(crate) use impl_sql_session_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "sqlite")]
    #[test]
    fn read_many_gives_each_row_its_own_outcome() {
        crate::testing::run(async {
            use crate::SessionStore;
            let store = crate::store::SqliteStore::connect("sqlite::memory:")
                .await
                .unwrap();
            store.setup().await.unwrap();
            let now = Timestamp::from_millis(1_000_000);
            let record = Record::new(
                now,
                now.saturating_add(std::time::Duration::from_secs(60)),
                None,
            );
            let [good, corrupt, missing] = [(); 3].map(|()| crate::SessionId::generate().key());
            for key in [good, corrupt] {
                store.create(&key, &record, now).await.unwrap();
            }
            // SQLite keeps whatever type it is given: a version that is text.
            sqlx::query("UPDATE session2_sessions SET version = 'garbled' WHERE key = ?1")
                .bind(corrupt.as_bytes().as_slice())
                .execute(store.pool())
                .await
                .unwrap();
            let table = &store.table;
            let mut read = table
                .read_many(&[good, corrupt, missing], now)
                .await
                .unwrap();
            read.sort_by_key(|(key, _)| *key != good);
            let [(first, first_record), (second, second_record)] =
                <[_; 2]>::try_from(read).unwrap_or_else(|_| panic!("one entry per row found"));
            assert_eq!((first, first_record.unwrap()), (good, record));
            assert_eq!(second, corrupt);
            assert!(second_record.unwrap_err().is_decode());
        });
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_purges_in_batches() {
        crate::testing::run(async {
            let store = crate::store::SqliteStore::connect("sqlite::memory:")
                .await
                .unwrap()
                .with_purge_batch(3);
            crate::store::test_support::purge_in_small_batches(store).await;
        });
    }

    /// [`purge_in_small_batches`](crate::store::test_support::purge_in_small_batches) on a fresh table of the server at the URL
    /// in `$env` (default `$default`), which it then drops.
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    macro_rules! purge_in_small_batches_on_server {
        ($store:ty, $dialect:expr, $server:literal, $env:literal, $default:literal) => {
            crate::testing::run(async {
                let url = std::env::var($env).unwrap_or_else(|_| $default.to_owned());
                let connected = <$store>::connect(&url).await;
                let Some(store) = crate::testing::require_server($server, connected) else {
                    return;
                };
                let table = crate::store::test_support::fresh_table_name();
                let store = store.with_table_name(&table).unwrap().with_purge_batch(3);
                crate::store::test_support::purge_in_small_batches(store.clone()).await;
                for name in [table.clone(), format!("{table}_schema")] {
                    sqlx::query(&format!("DROP TABLE {}", $dialect.quote(&name)))
                        .execute(store.pool())
                        .await
                        .unwrap();
                }
            })
        };
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_purges_in_batches() {
        purge_in_small_batches_on_server!(
            crate::store::MySqlStore,
            Dialect::MySql,
            "mysql",
            "SESSION2_TEST_MYSQL_URL",
            "mysql://root@127.0.0.1:3306/test"
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_purges_whole_and_moves_in_batches() {
        purge_in_small_batches_on_server!(
            crate::store::PostgresStore,
            Dialect::Postgres,
            "postgres",
            "SESSION2_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test"
        );
    }

    #[test]
    fn table_names_are_validated() {
        for good in ["sessions", "_s", "Session2_sessions_v2", &"a".repeat(56)] {
            assert!(validate_table_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1sessions",
            "sessions; DROP TABLE users",
            "s\"x",
            "s`x",
            "s-x",
            "sé",
            "public.sessions",
            &"a".repeat(57),
        ] {
            assert!(validate_table_name(bad).unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn table_parameter_is_split_off() {
        assert_eq!(
            split_table_parameter("postgres://u@h/db?table=s1&sslmode=disable").unwrap(),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some("s1".to_owned())
            )
        );
        assert_eq!(
            split_table_parameter("sqlite:x.db?table=t").unwrap(),
            ("sqlite:x.db".to_owned(), Some("t".to_owned()))
        );
        assert_eq!(
            split_table_parameter("mysql://h/db").unwrap(),
            ("mysql://h/db".to_owned(), None)
        );
        assert!(split_table_parameter("mysql://h/db?table=a;b").is_err());
        assert!(split_table_parameter("mysql://h/db?table=a&table=b").is_err());
    }

    #[test]
    fn u64_round_trips_through_i64() {
        for value in [0, 1, u64::MAX, 1 << 63, 12_345] {
            assert_eq!(to_u64(to_i64(value)), value);
        }
    }
}
