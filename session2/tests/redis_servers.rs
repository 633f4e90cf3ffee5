//! The Redis store against throwaway `redis-server` processes this test
//! starts itself: a three-node Redis Cluster running the whole conformance
//! suite, and a server stopped and restarted under a live store.
//!
//! Each server runs under `sh`, which kills it when the test process closes
//! the shell's standard input, so no server outlives the tests even when a
//! test panics or the process is killed.

mod http_outage;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` that stops when this value is dropped or the test
/// process exits.
#[derive(Debug)]
struct Server {
    port: u16,
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl Server {
    /// Starts `redis-server` on `port` with `extra` arguments, in `dir`.
    fn start(port: u16, dir: &Path, extra: &[&str]) -> std::io::Result<Self> {
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(r#"redis-server "$@" & read _; kill $!; wait"#)
            .arg("sh")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.display().to_string(),
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = shell.stdin.take();
        let server = Self { port, shell, stdin };
        server.wait_until_up()?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_until_up(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "ping"])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("PONG"));
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {} did not answer",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server and waits until it is gone.
    fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.shell.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A loopback port that is free, and whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        // Cluster nodes also listen on port + 10000.
        let Some(bus) = port.checked_add(10_000) else {
            let candidate = port % 20_000 + 20_000;
            if TcpListener::bind(("127.0.0.1", candidate)).is_ok()
                && TcpListener::bind(("127.0.0.1", candidate + 10_000)).is_ok()
            {
                return candidate;
            }
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

fn has_redis_server() -> Result<(), String> {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .map(drop)
        .map_err(|err| format!("cannot run `redis-server`: {err}"))
}

mod cluster {
    use std::sync::Arc;

    use session2::{SessionId, SessionStore, store::RedisStore};
    use tokio::sync::OnceCell;

    use super::*;

    /// Three masters sharing the 16384 slots, started once per test process.
    #[derive(Debug)]
    struct Cluster {
        nodes: Vec<Server>,
        _dir: tempfile::TempDir,
    }

    fn start_cluster() -> Result<Cluster, String> {
        has_redis_server()?;
        let dir =
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|err| err.to_string())?;
        let mut nodes = Vec::new();
        for index in 0..3 {
            let node_dir = dir.path().join(format!("node{index}"));
            std::fs::create_dir_all(&node_dir).map_err(|err| err.to_string())?;
            let node = Server::start(
                free_port(),
                &node_dir,
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
            )
            .map_err(|err| err.to_string())?;
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|err| err.to_string())?;
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stdout)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .map_err(|err| err.to_string())?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the cluster never reached cluster_state:ok".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(Cluster { nodes, _dir: dir })
    }

    static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

    async fn cluster() -> Option<&'static Cluster> {
        let started = CLUSTER
            .get_or_init(|| async {
                tokio::task::spawn_blocking(start_cluster)
                    .await
                    .map_err(|err| err.to_string())?
            })
            .await;
        session2::testing::require_server("redis-cluster", started.as_ref())
    }

    /// A store under a fresh prefix, so a fresh hash slot of the cluster.
    async fn factory() -> Option<Arc<dyn SessionStore>> {
        let cluster = cluster().await?;
        let urls: Vec<String> = cluster.nodes.iter().map(Server::url).collect();
        let store = RedisStore::connect_cluster(urls)
            .await
            .expect("connect to the cluster")
            .with_prefix(format!("c-{}", SessionId::generate().key().fingerprint()));
        store.setup().await.expect("setup");
        Some(Arc::new(store))
    }

    session2::conformance_tests!(factory);
}

mod restart {
    use session2::store::{LeaseOutcome, RedisStore};
    use session2::{Clock, Lease, Record, SessionId, SessionStore, SystemClock};

    use super::*;

    /// A server that goes away mid-use gives backend errors, never a panic,
    /// and the same store works again once a server is back on the port.
    #[test]
    fn a_store_survives_its_server_restarting() {
        if session2::testing::require_server("redis-server", has_redis_server()).is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = Server::start(port, dir.path(), &[]).expect("redis-server starts");
        let url = server.url();
        session2::testing::run(async move {
            let store = RedisStore::connect(&url).await.expect("connect");
            let now = SystemClock.now();
            let key = SessionId::generate().key();
            let record = Record::new(now, now.saturating_add(Duration::from_secs(600)), None);
            store.create(&key, &record, now).await.unwrap();
            assert!(store.load(&key, now).await.unwrap().is_some());
            // Saves and leases start the store's writer and its connection.
            let saved = Record {
                version: 2,
                ..record.clone()
            };
            assert!(store.replace(&key, 1, &saved, now).await.unwrap());
            let lease = Lease {
                token: 1,
                until: now.saturating_add(Duration::from_secs(5)),
            };
            let leased = store.lease(&key, lease, now).await.unwrap();
            assert_eq!(leased, LeaseOutcome::Taken(saved.clone().with_lease(lease)));

            server.stop();
            let err = store.load(&key, now).await.unwrap_err();
            assert!(err.is_backend(), "{err}");
            for _ in 0..3 {
                assert!(
                    store
                        .create(&key, &record, now)
                        .await
                        .unwrap_err()
                        .is_backend()
                );
                assert!(store.count().await.unwrap_err().is_backend());
                assert!(store.purge_expired(now).await.unwrap_err().is_backend());
                let saving = store.replace(&key, 3, &saved, now).await;
                assert!(saving.unwrap_err().is_backend());
                assert!(
                    store
                        .lease(&key, lease, now)
                        .await
                        .unwrap_err()
                        .is_backend()
                );
            }

            let server = Server::start(port, dir.path(), &[]).expect("redis-server restarts");
            let deadline = Instant::now() + Duration::from_secs(20);
            // The data died with the server (no persistence); the store reconnects.
            let loaded = loop {
                match store.load(&key, now).await {
                    Ok(loaded) => break loaded,
                    Err(err) => {
                        assert!(err.is_backend(), "{err}");
                        assert!(Instant::now() < deadline, "never reconnected: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            assert_eq!(loaded, None);
            store.create(&key, &record, now).await.unwrap();
            assert_eq!(store.load(&key, now).await.unwrap(), Some(record.clone()));
            assert_eq!(store.count().await.unwrap(), 1);
            // The writer opens a new connection of its own.
            assert!(store.replace(&key, 1, &saved, now).await.unwrap());
            let leased = store.lease(&key, lease, now).await.unwrap();
            assert_eq!(leased, LeaseOutcome::Taken(saved.clone().with_lease(lease)));

            // A restart while the writer is idle costs the next save nothing.
            server.stop();
            let server = Server::start(port, dir.path(), &[]).expect("redis-server restarts");
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Err(err) = store.create(&key, &record, now).await {
                assert!(Instant::now() < deadline, "never reconnected: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(store.replace(&key, 1, &saved, now).await.unwrap());
            drop(server);
        });
    }
}

mod outage_over_http {
    use std::sync::Arc;

    use session2::RedisStore;

    use super::*;

    /// A throwaway `redis-server` with AOF on, so its data survives a restart.
    struct Persistent {
        port: u16,
        dir: std::path::PathBuf,
        server: Option<Server>,
    }

    const PERSISTENT: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

    impl http_outage::Outage for Persistent {
        fn stop(&mut self) {
            if let Some(server) = self.server.take() {
                server.stop();
            }
        }
        fn start(&mut self) {
            self.server = Some(
                Server::start(self.port, &self.dir, &PERSISTENT).expect("redis-server restarts"),
            );
        }
    }

    /// Redis goes away with requests in flight: see [`http_outage`]; with
    /// persistence on, the sessions stored before are intact.
    #[test]
    fn requests_get_503_while_redis_is_down_and_succeed_after() {
        if session2::testing::require_server("redis-server", has_redis_server()).is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut server = Persistent {
            port,
            dir: dir.path().to_path_buf(),
            server: None,
        };
        http_outage::Outage::start(&mut server);
        let url = format!("redis://127.0.0.1:{port}");
        session2::testing::run(async move {
            let store = RedisStore::connect(&url).await.expect("connect");
            http_outage::requests_get_503_then_succeed(Arc::new(store), &mut server).await;
        });
    }
}
