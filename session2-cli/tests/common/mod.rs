//! Helpers shared by the integration tests of the `session2` binary.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A running `session2 demo`; killed (SIGKILL) when stopped or dropped.
pub struct Demo {
    child: Child,
    pub base: String,
}

impl Demo {
    /// Starts the demo on `store` (the default store when empty) on a free port.
    pub fn start(store: &str, cwd: &Path) -> Demo {
        Self::start_on(store, cwd, 0)
    }

    /// Starts the demo on `store` on `port` (0: a free one).
    pub fn start_on(store: &str, cwd: &Path, port: u16) -> Demo {
        let mut command = Command::new(env!("CARGO_BIN_EXE_session2"));
        command.args(["demo", "--port", &port.to_string()]);
        if !store.is_empty() {
            command.args(["--store", store]);
        }
        let mut child = command
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the session2 binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the demo exited before listening (store {store})"))
                .expect("readable stdout");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim_end_matches('/').to_owned();
            }
        };
        // Keep draining stdout so the demo never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Demo { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a port in the URL")
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /api/session` with `cookie` as the whole `Cookie` header.
pub async fn session_state(demo: &Demo, cookie: &str) -> Value {
    reqwest::Client::new()
        .get(demo.url("/api/session"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("GET /api/session")
        .json()
        .await
        .expect("JSON")
}

/// A table name or key prefix no other test or run uses, of the form the
/// SQL tests recognise and drop after an hour: `s2test_<unix seconds>_<hex>`.
pub fn unique_name() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    format!(
        "s2test_{seconds}_{}",
        &session2::SessionId::generate().key().to_hex()[..12]
    )
}

/// The URL of a test server's store with a fresh table or prefix, or `None`
/// (skipped loudly, or a failure under `CI=true`) when the server does not
/// answer. `env` names the variable that overrides `default`; `option` is
/// the store's isolation parameter (`table` or `prefix`).
pub fn server_store(server: &str, env: &str, default: &str, option: &str) -> Option<String> {
    let url = std::env::var(env).unwrap_or_else(|_| default.to_owned());
    let authority = url.split("://").nth(1).unwrap_or_default();
    let host_port = authority.split(['/', '?']).next().unwrap_or_default();
    let host_port = host_port.rsplit('@').next().unwrap_or_default().to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .map_err(|err| err.to_string())
        .and_then(|mut addresses| {
            addresses
                .next()
                .ok_or_else(|| format!("no address for {host_port}"))
        })
        .and_then(|address| {
            std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(3))
                .map_err(|err| format!("{host_port}: {err}"))
        });
    session2::testing::require_server(server, reachable)?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}{option}={}", unique_name()))
}

pub fn postgres_store() -> Option<String> {
    server_store(
        "postgres",
        "SESSION2_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        "table",
    )
}

pub fn mysql_store() -> Option<String> {
    server_store(
        "mysql",
        "SESSION2_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
        "table",
    )
}

pub fn redis_store() -> Option<String> {
    server_store(
        "redis",
        "SESSION2_TEST_REDIS_URL",
        "redis://127.0.0.1:6379",
        "prefix",
    )
}

/// A three-node Redis Cluster of this test process's own, started once and
/// stopped when the process exits: each `redis-server` runs under a shell
/// that kills it when the process's end closes the shell's standard input.
struct Cluster {
    ports: Vec<u16>,
    _nodes: Vec<Child>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_cluster() -> Result<Cluster, String> {
    let dir = tempfile::tempdir().map_err(|err| err.to_string())?;
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for index in 0..3 {
        let port = free_port();
        let node_dir = dir.path().join(format!("node{index}"));
        std::fs::create_dir_all(&node_dir).map_err(|err| err.to_string())?;
        let child = Command::new("sh")
            .args(["-c", r#"redis-server "$@" & read _; kill $!; wait"#, "sh"])
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
            .arg("--dir")
            .arg(&node_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("redis-server: {err}"))?;
        nodes.push(child);
        ports.push(port);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for port in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("a cluster node never listened".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let addresses: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .map_err(|err| format!("redis-cli: {err}"))?;
    if !created.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        ));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for port in &ports {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .map_err(|err| err.to_string())?;
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err("the cluster never reached cluster_state:ok".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(Cluster {
        ports,
        _nodes: nodes,
        _dir: dir,
    })
}

/// A fresh store (its own prefix) on this process's Redis Cluster.
pub fn redis_cluster_store() -> Option<String> {
    static CLUSTER: std::sync::OnceLock<Result<Cluster, String>> = std::sync::OnceLock::new();
    let cluster = CLUSTER.get_or_init(start_cluster);
    let cluster = session2::testing::require_server("redis cluster", cluster.as_ref())?;
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    Some(format!(
        "redis+cluster://{}/?prefix={}",
        nodes.join(","),
        unique_name()
    ))
}
