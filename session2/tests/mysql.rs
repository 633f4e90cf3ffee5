//! The conformance suite and SQL cases against [`MySqlStore`], on the server
//! at `SESSION2_TEST_MYSQL_URL` (read at run time; default `mysql://root@127.0.0.1:3306/test`),
//! each store on its own table.

mod http_outage;
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

/// The raw `expires_at` column of `key`'s row in `table`.
async fn indexed_expiry(table: &str, key: &session2::SessionKey) -> i64 {
    let pool = sqlx::MySqlPool::connect(&url()).await.expect("connect");
    sqlx::query_scalar(&format!("SELECT expires_at FROM `{table}` WHERE `key` = ?"))
        .bind(key.as_bytes().as_slice())
        .fetch_one(&pool)
        .await
        .expect("read the row")
}

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

/// No server on the port: connecting fails, after the pool's 5-second
/// wait, with a backend error that names the cause.
#[test]
fn unreachable_server_is_a_backend_error_naming_the_cause() {
    session2::testing::run(async {
        let err = MySqlStore::connect("mysql://root@127.0.0.1:1/test")
            .await
            .unwrap_err();
        assert!(err.is_backend() && err.is_transient(), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    });
}

/// A throwaway MariaDB server of this test's own: a data directory made by
/// `mariadb-install-db` under a temporary directory, on a free port.
mod outage {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use session2::SessionStore;

    use super::{MySqlStore, http_outage};

    struct Server {
        dir: tempfile::TempDir,
        port: u16,
        child: Option<Child>,
    }

    impl Server {
        fn init() -> Result<Self, String> {
            let dir = tempfile::tempdir().map_err(|err| err.to_string())?;
            let installed = Command::new("mariadb-install-db")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .arg(format!("--datadir={}", dir.path().join("data").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|err| format!("mariadb-install-db: {err}"))?;
            if !installed.success() {
                return Err(format!("mariadb-install-db failed: {installed}"));
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|err| err.to_string())?
                .port();
            Ok(Self {
                dir,
                port,
                child: None,
            })
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn start(&mut self) {
            let child = Command::new("mariadbd")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--skip-grant-tables",
                    "--bind-address=127.0.0.1",
                ])
                .arg(format!("--datadir={}", self.path("data").display()))
                .arg(format!("--socket={}", self.path("socket").display()))
                .arg(format!("--pid-file={}", self.path("pid").display()))
                .arg(format!("--port={}", self.port))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mariadbd starts");
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the throwaway MariaDB never listened"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        /// Stops the server as an outage would: at once (SIGKILL).
        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn url(&self) -> String {
            format!("mysql://root@127.0.0.1:{}/mysql", self.port)
        }

        fn exists() -> Result<(), String> {
            for program in ["mariadb-install-db", "mariadbd"] {
                let found = std::env::var_os("PATH").is_some_and(|paths| {
                    std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(program).exists())
                }) || Path::new("/usr/sbin").join(program).exists();
                if !found {
                    return Err(format!("{program} is not installed"));
                }
            }
            Ok(())
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop();
        }
    }

    impl http_outage::Outage for Server {
        fn stop(&mut self) {
            Server::stop(self);
        }
        fn start(&mut self) {
            Server::start(self);
        }
    }

    /// The server is killed with requests in flight: see [`http_outage`].
    #[test]
    fn requests_get_503_while_the_server_is_down_and_succeed_after() {
        if session2::testing::require_server("mariadb (mariadb-install-db)", Server::exists())
            .is_none()
        {
            return;
        }
        let mut server = Server::init().expect("a throwaway MariaDB data directory");
        server.start();
        let url = server.url();
        session2::testing::run(async {
            let store = MySqlStore::connect(&url).await.expect("connect");
            store.setup().await.unwrap();
            http_outage::requests_get_503_then_succeed(std::sync::Arc::new(store), &mut server)
                .await;
        });
    }
}
