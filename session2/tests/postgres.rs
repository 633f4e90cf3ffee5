//! The conformance suite and SQL cases against [`PostgresStore`], on the server
//! at `SESSION2_TEST_POSTGRES_URL` (read at run time; default `postgres://postgres@127.0.0.1:5432/test`),
//! each store on its own table.

mod http_outage;
#[macro_use]
mod sql_cases;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use session2::store::PostgresStore;
use session2::{Lease, LeaseOutcome, SessionStore};
use sqlx::postgres::PgPoolOptions;

fn url() -> String {
    std::env::var("SESSION2_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn factory() -> Option<Arc<dyn SessionStore>> {
    store().await
}

async fn store() -> Option<Arc<dyn SessionStore>> {
    store_on(&sql_cases::unique_table_name()).await
}

/// A set-up store on `table`, or `None` (under CI: a panic) when the server is unreachable.
async fn store_on(table: &str) -> Option<Arc<dyn SessionStore>> {
    let connected = PostgresStore::connect(&url()).await;
    let store = session2::testing::require_server("postgres", connected)?;
    static CLEANED: AtomicBool = AtomicBool::new(false);
    if !CLEANED.swap(true, Ordering::SeqCst) {
        drop_stale_test_tables(store.pool()).await;
    }
    let store = store.with_table_name(table).expect("a valid table name");
    store.setup().await.expect("setup");
    Some(Arc::new(store))
}

/// Drops the test tables earlier runs left behind (more than an hour old).
async fn drop_stale_test_tables(pool: &sqlx::PgPool) {
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 's2test%'")
        .fetch_all(pool)
        .await
        .expect("list test tables");
    for table in tables
        .iter()
        .filter(|table| sql_cases::is_stale_test_table(table))
    {
        let drop = format!("\"{table}\"");
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {drop}"))
            .execute(pool)
            .await
            .expect("drop a stale test table");
    }
}

session2::conformance_tests!(factory);
sql_store_cases!();

/// The raw `expires_at` column of `key`'s row in `table`.
async fn indexed_expiry(table: &str, key: &session2::SessionKey) -> i64 {
    let pool = sqlx::PgPool::connect(&url()).await.expect("connect");
    sqlx::query_scalar(&format!(
        "SELECT expires_at FROM \"{table}\" WHERE key = $1"
    ))
    .bind(key.as_bytes().as_slice())
    .fetch_one(&pool)
    .await
    .expect("read the row")
}

#[test]
fn table_name_with_sql_is_refused() {
    session2::testing::run(async {
        let connected = PostgresStore::connect(&url()).await;
        let Some(store) = session2::testing::require_server("postgres", connected) else {
            return;
        };
        for bad in ["s; DROP TABLE t", "s\"", "a b", "über", "", "x`y"] {
            assert!(store.clone().with_table_name(bad).unwrap_err().is_config());
        }
        assert_eq!(store.table_name(), "session2_sessions");
    });
}

/// A throwaway PostgreSQL cluster on a free port under a temporary
/// directory, run as the `postgres` user when the test runs as root
/// (`initdb` refuses root). Stopped when dropped.
struct Cluster {
    directory: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn bin_directory() -> Option<PathBuf> {
        if let Ok(bin) = std::env::var("SESSION2_TEST_POSTGRES_BIN") {
            return Some(PathBuf::from(bin));
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop()
    }

    fn init() -> Result<Self, String> {
        let bin = Self::bin_directory().ok_or("no `initdb` under /usr/lib/postgresql")?;
        let directory = tempfile::tempdir().map_err(|err| err.to_string())?;
        let as_postgres = run_output(Command::new("id").arg("-u"))? == "0";
        if as_postgres {
            let uid: u32 = parse(&run_output(Command::new("id").args(["-u", "postgres"]))?)?;
            let gid: u32 = parse(&run_output(Command::new("id").args(["-g", "postgres"]))?)?;
            std::os::unix::fs::chown(directory.path(), Some(uid), Some(gid))
                .map_err(|err| err.to_string())?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|err| err.to_string())?
            .port();
        let cluster = Self {
            directory,
            bin,
            port,
            as_postgres,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        )?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.directory.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(program));
            command
        } else {
            Command::new(self.bin.join(program))
        };
        let output = command
            .args(args)
            .output()
            .map_err(|err| format!("{program}: {err}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    fn start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.directory.path().display()
        );
        let log = self
            .directory
            .path()
            .join("server.log")
            .display()
            .to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
    }

    fn stop(&self, mode: &str) -> Result<(), String> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "stop"])
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
    }
}

fn run_output(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|err| err.to_string())?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn parse(text: &str) -> Result<u32, String> {
    text.parse().map_err(|_| format!("not a number: `{text}`"))
}

/// The server stops mid-use: every call fails with a backend error (no
/// panic); once it is back, the same store object works again and the
/// session is intact.
#[test]
fn server_restart_gives_backend_errors_then_recovers() {
    let Some(cluster) = session2::testing::require_server("postgres (initdb)", Cluster::init())
    else {
        return;
    };
    cluster.start().expect("start the throwaway server");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = sql_cases::key();
    let now = sql_cases::NOW;
    let mut record = sql_cases::record_at(now, Duration::from_secs(3600));
    record.data = br#"{"n":1}"#.to_vec();
    let lease = Lease {
        token: 7,
        until: now.saturating_add(Duration::from_secs(60)),
    };
    let store = runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(1))
            .test_before_acquire(false)
            .connect(&cluster.url())
            .await
            .expect("connect to the throwaway server");
        let store = PostgresStore::from_pool(pool);
        store.setup().await.unwrap();
        store.create(&key, &record, now).await.unwrap();
        assert_eq!(store.load(&key, now).await.unwrap(), Some(record.clone()));
        store
    });

    cluster.stop("fast").expect("stop the server");
    runtime.block_on(async {
        for _ in 0..3 {
            let err = store.load(&key, now).await.unwrap_err();
            assert!(err.is_backend(), "{err}");
            let err = store.replace(&key, 1, &record, now).await.unwrap_err();
            assert!(err.is_backend(), "{err}");
        }
        let err = store.lease(&key, lease, now).await.unwrap_err();
        assert!(err.is_backend(), "{err}");
        let err = store.count().await.unwrap_err();
        assert!(err.is_backend() && err.is_transient(), "{err}");
    });

    cluster.start().expect("restart the server");
    runtime.block_on(async {
        // Connections the server dropped fail once each; then the pool
        // connects anew.
        let mut loaded = None;
        for _ in 0..10 {
            match store.load(&key, now).await {
                Ok(found) => {
                    loaded = Some(found);
                    break;
                }
                Err(err) => assert!(err.is_backend(), "{err}"),
            }
        }
        assert_eq!(loaded, Some(Some(record.clone())), "the session survived");
        let mut next = record.clone();
        next.version = 2;
        assert!(store.replace(&key, 1, &next, now).await.unwrap());
        assert_eq!(store.load(&key, now).await.unwrap(), Some(next.clone()));
        assert_eq!(
            store.lease(&key, lease, now).await.unwrap(),
            LeaseOutcome::Taken(next.with_lease(lease))
        );
    });
    drop(store);
    drop(runtime);
    cluster.stop("fast").expect("stop the server");
}

/// No server on the port: connecting fails, after the pool's 5-second
/// wait, with a backend error that names the cause.
#[test]
fn unreachable_server_is_a_backend_error_naming_the_cause() {
    session2::testing::run(async {
        let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test")
            .await
            .unwrap_err();
        assert!(err.is_backend() && err.is_transient(), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    });
}

impl http_outage::Outage for Cluster {
    fn stop(&mut self) {
        Cluster::stop(self, "immediate").expect("stop the server");
    }
    fn start(&mut self) {
        Cluster::start(self).expect("restart the server");
    }
}

/// The same outage seen through HTTP: see [`http_outage`].
#[test]
fn requests_get_503_while_the_server_is_down_and_succeed_after() {
    let Some(mut cluster) = session2::testing::require_server("postgres (initdb)", Cluster::init())
    else {
        return;
    };
    cluster.start().expect("start the throwaway server");
    session2::testing::run(async {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(1))
            .test_before_acquire(false)
            .connect(&cluster.url())
            .await
            .expect("connect to the throwaway server");
        let store = PostgresStore::from_pool(pool);
        store.setup().await.unwrap();
        http_outage::requests_get_503_then_succeed(Arc::new(store), &mut cluster).await;
    });
    cluster.stop("fast").expect("stop the server");
}
