//! Opening a store from a URL, the syntax shared by the CLI and the demo.
//!
//! | URL | store |
//! |---|---|
//! | `memory:` | [`MemoryStore`](super::MemoryStore) |
//! | `dir:PATH` | [`DirectoryStore`](super::DirectoryStore) |
//! | `sqlite:PATH`, `redb:PATH`, `postgres://…`, `mysql://…`, `redis://…` | their stores, when compiled in |
//! | `redis+cluster://host:port,host:port` | the Redis store on a Redis Cluster (the client finds the other nodes) |
//!
//! The SQL stores take the table name as a query parameter, as in
//! `postgres://localhost/app?table=web_sessions` (default
//! `session2_sessions`); it is validated, then removed from the URL handed
//! to the driver. `mariadb://` is accepted as `mysql://`. The Redis store
//! takes its key prefix the same way: `redis://localhost/0?prefix=app`
//! (default `session2`).
//!
//! A scheme whose store was not compiled in fails with an error that names
//! the cargo feature to enable.

use std::sync::Arc;

use super::SessionStore;
use crate::{Error, Result};

/// Opens the store a URL names, without calling [`SessionStore::setup`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = session2::store::open("memory:").await?;
/// assert_eq!(store.name(), "memory");
/// assert!(session2::store::open("gopher://x").await.unwrap_err().is_config());
/// # Ok::<_, session2::Error>(()) }).unwrap();
/// ```
pub async fn open(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (scheme, rest) = url.split_once(':').ok_or_else(|| {
        Error::config(format_args!(
            "store URL `{url}` has no scheme; expected `memory:`, `dir:PATH`, `sqlite:PATH`, `redb:PATH`, `postgres://…`, `mysql://…` or `redis://…`"
        ))
    })?;
    match scheme {
        "memory" => open_memory(rest),
        "dir" => open_directory(rest),
        "sqlite" => open_sqlite(url).await,
        "redb" => open_redb(rest).await,
        "postgres" | "postgresql" => open_postgres(url).await,
        "mysql" | "mariadb" => open_mysql(&format!("mysql:{rest}")).await,
        "redis" | "rediss" => open_redis(url).await,
        "redis+cluster" => open_redis_cluster(url).await,
        other => Err(Error::config(format_args!(
            "unknown store scheme `{other}` in `{url}`; expected memory, dir, sqlite, redb, postgres, mysql or redis"
        ))),
    }
}

#[cfg(feature = "memory")]
fn open_memory(rest: &str) -> Result<Arc<dyn SessionStore>> {
    if !rest.is_empty() {
        return Err(Error::config("`memory:` takes no path or options"));
    }
    Ok(Arc::new(super::MemoryStore::new()))
}

#[cfg(not(feature = "memory"))]
fn open_memory(_rest: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("memory", "memory"))
}

#[cfg(feature = "directory")]
fn open_directory(path: &str) -> Result<Arc<dyn SessionStore>> {
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() {
        return Err(Error::config("`dir:` needs a path, as in `dir:./sessions`"));
    }
    if let Some((_, options)) = path.split_once('?') {
        return Err(Error::config(format_args!(
            "`dir:` takes no options, got `?{options}`"
        )));
    }
    Ok(Arc::new(super::DirectoryStore::new(path)))
}

#[cfg(not(feature = "directory"))]
fn open_directory(_path: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("dir", "directory"))
}

/// `sqlite:PATH[?table=NAME]`: the database file is created if missing.
#[cfg(feature = "sqlite")]
async fn open_sqlite(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (url, table) = super::sql::split_table_parameter(url)?;
    if matches!(url.as_str(), "sqlite:" | "sqlite://") {
        return Err(Error::config(
            "`sqlite:` needs a path, as in `sqlite:sessions.db`",
        ));
    }
    let store = super::SqliteStore::connect(&url).await?;
    Ok(Arc::new(match table {
        Some(table) => store.with_table_name(&table)?,
        None => store,
    }))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_url: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("sqlite", "sqlite"))
}

/// `postgres://user:password@host:port/database[?table=NAME]`.
#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (url, table) = super::sql::split_table_parameter(url)?;
    let store = super::PostgresStore::connect(&url).await?;
    Ok(Arc::new(match table {
        Some(table) => store.with_table_name(&table)?,
        None => store,
    }))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("postgres", "postgres"))
}

/// `mysql://user:password@host:port/database[?table=NAME]` (`mariadb://` too).
#[cfg(feature = "mysql")]
async fn open_mysql(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (url, table) = super::sql::split_table_parameter(url)?;
    let store = super::MySqlStore::connect(&url).await?;
    Ok(Arc::new(match table {
        Some(table) => store.with_table_name(&table)?,
        None => store,
    }))
}

#[cfg(not(feature = "mysql"))]
async fn open_mysql(_url: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("mysql", "mysql"))
}

#[cfg(feature = "redb")]
async fn open_redb(path: &str) -> Result<Arc<dyn SessionStore>> {
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() {
        return Err(Error::config(
            "`redb:` needs a path, as in `redb:./sessions.redb`",
        ));
    }
    Ok(Arc::new(super::RedbStore::open(path).await?))
}

#[cfg(not(feature = "redb"))]
async fn open_redb(_path: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("redb", "redb"))
}

/// Splits the store's own `prefix` option off a Redis URL, leaving the
/// client's options (such as `protocol=resp3`) in place.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn split_redis_prefix(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut prefix = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("prefix=") {
            Some(value) => {
                prefix = Some(value.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    if rest.is_empty() {
        (base.to_owned(), prefix)
    } else {
        (format!("{base}?{}", rest.join("&")), prefix)
    }
}

/// `redis://[user:password@]host[:port][/db][?prefix=NAME]`.
#[cfg(feature = "redis")]
async fn open_redis(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (url, prefix) = split_redis_prefix(url);
    if let Some(prefix) = &prefix {
        super::redis::check_prefix(prefix)?;
    }
    let store = super::RedisStore::connect(&url).await?;
    Ok(Arc::new(match prefix {
        Some(prefix) => store.try_with_prefix(prefix)?,
        None => store,
    }))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_url: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("redis", "redis"))
}

/// `redis+cluster://host:port,host:port/[?prefix=NAME]`: some nodes of a
/// Redis Cluster; the client discovers the others.
#[cfg(feature = "redis")]
async fn open_redis_cluster(url: &str) -> Result<Arc<dyn SessionStore>> {
    let (url, prefix) = split_redis_prefix(url);
    let nodes = url
        .strip_prefix("redis+cluster://")
        .unwrap_or_default()
        .trim_end_matches('/')
        .split(',')
        .filter(|node| !node.is_empty())
        .map(|node| format!("redis://{node}"))
        .collect::<Vec<_>>();
    if nodes.is_empty() {
        return Err(Error::config(
            "`redis+cluster://` needs nodes, as in `redis+cluster://10.0.0.1:7000,10.0.0.2:7000`",
        ));
    }
    if let Some(prefix) = &prefix {
        super::redis::check_prefix(prefix)?;
    }
    let store = super::RedisStore::connect_cluster(nodes).await?;
    Ok(Arc::new(match prefix {
        Some(prefix) => store.try_with_prefix(prefix)?,
        None => store,
    }))
}

#[cfg(not(feature = "redis"))]
async fn open_redis_cluster(_url: &str) -> Result<Arc<dyn SessionStore>> {
    Err(Error::unsupported("redis+cluster", "redis"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_and_missing_schemes_are_config_errors() {
        assert!(open("nope").await.unwrap_err().is_config());
        assert!(open("ftp://x").await.unwrap_err().is_config());
        assert!(open("dir:").await.unwrap_err().is_config());
        assert!(open("memory:x").await.unwrap_err().is_config());
    }

    #[test]
    fn redis_prefix_is_split_off_and_other_options_kept() {
        assert_eq!(
            split_redis_prefix("redis://h:1/2"),
            ("redis://h:1/2".to_owned(), None)
        );
        assert_eq!(
            split_redis_prefix("redis://h/0?prefix=app"),
            ("redis://h/0".to_owned(), Some("app".to_owned()))
        );
        assert_eq!(
            split_redis_prefix("redis://h?protocol=resp3&prefix=a:b"),
            (
                "redis://h?protocol=resp3".to_owned(),
                Some("a:b".to_owned())
            )
        );
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_cluster_url_needs_nodes() {
        assert!(open("redis+cluster://").await.unwrap_err().is_config());
        assert!(
            open("redis+cluster:///?prefix=app")
                .await
                .unwrap_err()
                .is_config()
        );
    }
}
