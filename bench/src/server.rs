//! The benchmark server: the same routes on session2, on tower-sessions, or
//! on no session layer at all (the floor for anonymous requests: the same
//! routes, none of them touching a session, so that the floor differs from
//! the others by the session layer alone), or behind a layer that does
//! nothing (what adding any layer to axum's routes costs).
//!
//! | route | does |
//! |---|---|
//! | `POST /rmw` | counter + 1, returns it (session2: plain session) |
//! | `POST /rmw-exclusive` | the same through session2's exclusive session |
//! | `GET /read` | returns the counter |
//! | `GET /anon` | touches no session |
//! | `POST /login` | sets the user, renewing the id, keeps the counter |
//! | `POST /logout` | deletes the session |

use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::routing::{get, post};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Library {
    Session2,
    TowerSessions,
    Bare,
    /// The bare server's routes behind a layer that does nothing, added by
    /// `Router::layer` as both session servers add theirs.
    BareLayered,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    #[arg(long, value_enum)]
    pub(crate) library: Library,
    /// memory, sqlite:PATH, postgres://…, mysql://…, redis://…
    #[arg(long, default_value = "memory")]
    pub(crate) store: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) port: u16,
    /// Connections in each SQL pool (the same for both libraries).
    #[arg(long, default_value_t = 16)]
    pub(crate) pool: u32,
}

const COUNTER: &str = "counter";

async fn app(args: &ServerArgs) -> anyhow::Result<Router> {
    Ok(match args.library {
        Library::Session2 => session2_app(args).await?,
        Library::TowerSessions => tower_sessions_app(args).await?,
        Library::Bare => bare_app(),
        Library::BareLayered => bare_app().layer(PassThrough),
    })
}

/// Every route answers `ok` without a session: the same routing work as the
/// session servers, and no session layer.
fn bare_app() -> Router {
    ROUTES.iter().fold(Router::new(), |router, (method, path)| {
        let filter = axum::routing::MethodFilter::try_from(method.clone())
            .expect("the routes' methods are GET and POST");
        router.route(path, axum::routing::on(filter, || async { "ok" }))
    })
}

/// A layer that returns the service it wraps: `Router::layer` still boxes
/// each route again, as it does for a session layer.
#[derive(Clone, Copy)]
struct PassThrough;

impl<S> tower_layer::Layer<S> for PassThrough {
    type Service = S;

    fn layer(&self, inner: S) -> S {
        inner
    }
}

/// Every route of the benchmark servers, as the table above lists them.
const ROUTES: [(axum::http::Method, &str); 6] = [
    (axum::http::Method::POST, "/rmw"),
    (axum::http::Method::POST, "/rmw-exclusive"),
    (axum::http::Method::GET, "/read"),
    (axum::http::Method::GET, "/anon"),
    (axum::http::Method::POST, "/login"),
    (axum::http::Method::POST, "/logout"),
];

pub(crate) async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let app = app(&args).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn session2_app(args: &ServerArgs) -> anyhow::Result<Router> {
    use session2::{
        ExclusiveSession, Session, SessionConfig, SessionLayer, SessionManager, SessionStore,
    };

    // SQL stores get the very pool the tower-sessions server gets, and the
    // table the URL names (`table=…`), as `session2::store::open` would.
    let (url, table) = split_table(&args.store);
    let table = table.as_deref();
    let store: Arc<dyn SessionStore> = match url.as_str() {
        "memory" => Arc::new(session2::MemoryStore::new()),
        url if url.starts_with("sqlite:") => Arc::new(on_table(
            session2::SqliteStore::from_pool(sqlite_pool(url, args.pool).await?),
            table,
            session2::SqliteStore::with_table_name,
        )?),
        url if url.starts_with("postgres") => Arc::new(on_table(
            session2::PostgresStore::from_pool(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(args.pool)
                    .connect(url)
                    .await?,
            ),
            table,
            session2::PostgresStore::with_table_name,
        )?),
        url if url.starts_with("mysql") => Arc::new(on_table(
            session2::MySqlStore::from_pool(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(args.pool)
                    .connect(url)
                    .await?,
            ),
            table,
            session2::MySqlStore::with_table_name,
        )?),
        _ => session2::store::open(&args.store).await?,
    };
    store.setup().await?;
    let manager =
        SessionManager::from_arc(store).with_config(SessionConfig::default().with_secure(false))?;

    fn bump(session: &Session) -> String {
        let next = session.get::<i64>(COUNTER).ok().flatten().unwrap_or(0) + 1;
        session.insert(COUNTER, next).expect("a number fits");
        next.to_string()
    }
    Ok(Router::new()
        .route(
            "/rmw",
            post(|session: Session| async move { bump(&session) }),
        )
        .route(
            "/rmw-exclusive",
            post(|ExclusiveSession(session): ExclusiveSession| async move { bump(&session) }),
        )
        .route(
            "/read",
            get(|session: Session| async move {
                session
                    .get::<i64>(COUNTER)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
                    .to_string()
            }),
        )
        .route("/anon", get(|| async { "ok" }))
        .route(
            "/login",
            post(|session: Session| async move {
                session.set_user("bench-user");
                session
                    .get::<i64>(COUNTER)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
                    .to_string()
            }),
        )
        .route(
            "/logout",
            post(|session: Session| async move {
                session.expire();
                "0"
            }),
        )
        .layer(SessionLayer::new(manager)))
}

async fn tower_sessions_app(args: &ServerArgs) -> anyhow::Result<Router> {
    use tower_sessions::{Expiry, Session, SessionManagerLayer};

    async fn bump(session: Session) -> String {
        let next = session
            .get::<i64>(COUNTER)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
            + 1;
        session.insert(COUNTER, next).await.expect("insert");
        next.to_string()
    }
    fn routes<S: tower_sessions::SessionStore + Clone>(store: S) -> Router {
        let layer = SessionManagerLayer::new(store)
            .with_secure(false)
            .with_expiry(Expiry::OnInactivity(time::Duration::minutes(30)));
        Router::new()
            .route("/rmw", post(bump))
            .route("/rmw-exclusive", post(bump))
            .route(
                "/read",
                get(|session: Session| async move {
                    session
                        .get::<i64>(COUNTER)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                        .to_string()
                }),
            )
            .route("/anon", get(|| async { "ok" }))
            .route(
                "/login",
                post(|session: Session| async move {
                    session.cycle_id().await.expect("cycle id");
                    session.insert("user", "bench-user").await.expect("insert");
                    session
                        .get::<i64>(COUNTER)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                        .to_string()
                }),
            )
            .route(
                "/logout",
                post(|session: Session| async move {
                    session.flush().await.expect("flush");
                    "0"
                }),
            )
            .layer(layer)
    }

    let store = args.store.as_str();
    Ok(if store == "memory" {
        routes(tower_sessions::MemoryStore::default())
    } else if store.starts_with("sqlite:") {
        let store =
            tower_sessions_sqlx_store::SqliteStore::new(sqlite_pool(store, args.pool).await?);
        store.migrate().await?;
        routes(store)
    } else if store.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(args.pool)
            .connect(store)
            .await?;
        let store = tower_sessions_sqlx_store::PostgresStore::new(pool);
        store.migrate().await?;
        routes(store)
    } else if store.starts_with("mysql") {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(args.pool)
            .connect(store)
            .await?;
        let store = tower_sessions_sqlx_store::MySqlStore::new(pool);
        store.migrate().await?;
        routes(store)
    } else if store.starts_with("redis") {
        use tower_sessions_redis_store::fred::prelude::*;
        let config = Config::from_url(store).context("a redis URL")?;
        let pool = Pool::new(config, None, None, None, 1)?;
        pool.init().await?;
        routes(tower_sessions_redis_store::RedisStore::new(pool))
    } else {
        bail!("store `{store}` is not supported by the tower-sessions server")
    })
}

/// `store` on the table `table` names, if it names one.
fn on_table<S>(
    store: S,
    table: Option<&str>,
    with_table_name: impl FnOnce(S, &str) -> session2::Result<S>,
) -> anyhow::Result<S> {
    Ok(match table {
        Some(name) => with_table_name(store, name)?,
        None => store,
    })
}

/// Splits the `table=NAME` option off a store URL: the connection gets the
/// rest, the session2 store the table name.
fn split_table(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut table = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|option| match option.strip_prefix("table=") {
            Some(name) => {
                table = Some(name.to_owned());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, table)
}

/// The SQLite pool both libraries get: WAL, a busy timeout, `pool` connections.
async fn sqlite_pool(url: &str, pool: u32) -> anyhow::Result<sqlx::SqlitePool> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(5));
    Ok(sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(pool)
        .connect_with(options)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_server_answers_the_same_routes() {
        for library in [
            Library::Session2,
            Library::TowerSessions,
            Library::Bare,
            Library::BareLayered,
        ] {
            let args = ServerArgs {
                library,
                store: "memory".to_owned(),
                port: 0,
                pool: 1,
            };
            let app = app(&args).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let mut connection = crate::load::Connection::new(address);
            for (method, path) in ROUTES {
                let (status, _) = connection.call(method.clone(), path).await.unwrap();
                assert_eq!(status, 200, "{library:?} {method} {path}");
            }
            let (status, _) = connection
                .call(axum::http::Method::GET, "/none")
                .await
                .unwrap();
            assert_eq!(status, 404, "{library:?}");
            server.abort();
        }
    }

    #[test]
    fn the_table_option_goes_to_the_store_and_the_rest_to_the_pool() {
        assert_eq!(
            split_table("postgres://u@h/db?table=bench&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some("bench".to_owned())
            )
        );
        assert_eq!(
            split_table("mysql://u@h/db?table=bench"),
            ("mysql://u@h/db".to_owned(), Some("bench".to_owned()))
        );
        assert_eq!(split_table("memory"), ("memory".to_owned(), None));
    }
}
