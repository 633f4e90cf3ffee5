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
