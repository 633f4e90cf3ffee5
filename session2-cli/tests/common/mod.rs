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
