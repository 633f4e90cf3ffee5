//! HTTP tests of `session2 demo`: the real binary on loopback, driven by a
//! real HTTP client that keeps cookies as a browser does.
//!
//! The scenarios run once per store URL (see the `stores` module at the
//! bottom); restart and two-process scenarios only on persistent,
//! multiprocess-safe stores.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Demo;

use reqwest::StatusCode;
use reqwest::header::SET_COOKIE;
use serde_json::Value;

/// A browser-like client: keeps cookies, does not follow redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a client")
}

/// A client without a cookie jar, for hand-made `Cookie` headers.
fn bare() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a client")
}

async fn state(client: &reqwest::Client, demo: &Demo) -> Value {
    let response = client
        .get(demo.url("/api/session"))
        .send()
        .await
        .expect("GET /api/session");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

async fn post(client: &reqwest::Client, demo: &Demo, path: &str) -> reqwest::Response {
    client
        .post(demo.url(path))
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST {path}: {err}"))
}

fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect()
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned()
}

/// Every file below `dir`, for "touched nothing outside the store" checks.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `POST /sessions/end` for `fingerprint`; returns the status.
async fn end_session(client: &reqwest::Client, demo: &Demo, fingerprint: &str) -> StatusCode {
    let form = [("fingerprint", fingerprint)];
    let response = client
        .post(demo.url("/sessions/end"))
        .form(&form)
        .send()
        .await
        .unwrap();
    response.status()
}

/// The scenarios every store runs. `store` is the store URL.
mod scenarios {
    use super::*;

    pub(crate) async fn increment_persists(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        let first = post(&client, &demo, "/increment").await;
        assert_eq!(first.status(), StatusCode::SEE_OTHER);
        assert_eq!(first.headers()["location"], "/");
        let cookies = set_cookies(&first);
        assert_eq!(cookies.len(), 1, "{cookies:?}");
        assert!(
            cookies[0].contains("HttpOnly")
                && cookies[0].contains("SameSite=Lax")
                && cookies[0].contains("Path=/")
        );
        let second = post(&client, &demo, "/increment").await;
        assert!(
            set_cookies(&second).is_empty(),
            "an unchanged id sends no cookie again"
        );
        let state = state(&client, &demo).await;
        assert_eq!(state["counter"], 2);
        assert_eq!(state["active"], true);
        let page = client
            .get(demo.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("Counter is at 2."), "{page}");
        let fingerprint = state["fingerprint"].as_str().unwrap();
        assert!(page.contains(fingerprint));
    }

    pub(crate) async fn increment_fail_saves_nothing(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        post(&client, &demo, "/increment").await;
        let failed = post(&client, &demo, "/increment-fail").await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(set_cookies(&failed).is_empty());
        assert_eq!(state(&client, &demo).await["counter"], 1);
        // The failed request released its lease: the next increment does not wait.
        let next = post(&client, &demo, "/increment").await;
        assert_eq!(next.status(), StatusCode::SEE_OTHER);
        assert_eq!(state(&client, &demo).await["counter"], 2);

        let anonymous = browser();
        let failed = post(&anonymous, &demo, "/increment-fail").await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            set_cookies(&failed).is_empty(),
            "a failed new session gets no cookie"
        );
    }

    pub(crate) async fn logout_deletes_and_revokes(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        let created = post(&client, &demo, "/increment").await;
        let id = cookie_value(&set_cookies(&created)[0]);
        let logout = post(&client, &demo, "/logout").await;
        assert_eq!(logout.status(), StatusCode::SEE_OTHER);
        let revoked = set_cookies(&logout);
        assert_eq!(revoked.len(), 1);
        assert!(
            revoked[0].starts_with("id=;") && revoked[0].contains("Max-Age=0"),
            "{revoked:?}"
        );
        assert!(
            revoked[0].contains("Path=/")
                && revoked[0].contains("SameSite=Lax")
                && revoked[0].contains("HttpOnly")
        );
        assert_eq!(state(&client, &demo).await["active"], false);
        // Replaying the old cookie by hand finds nothing: it was deleted server-side.
        let body = common::session_state(&demo, &format!("id={id}")).await;
        assert_eq!(body["active"], false);
        assert_eq!(body["counter"], 0);
    }

    pub(crate) async fn logout_without_session_is_harmless(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        let logout = post(&client, &demo, "/logout").await;
        assert_eq!(logout.status(), StatusCode::SEE_OTHER);
        assert!(set_cookies(&logout).is_empty());
    }

    pub(crate) async fn logout_fail_keeps_the_session(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        post(&client, &demo, "/increment").await;
        let failed = post(&client, &demo, "/logout-fail").await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(set_cookies(&failed).is_empty());
        let state = state(&client, &demo).await;
        assert_eq!(state["active"], true);
        assert_eq!(state["counter"], 1);
    }

    pub(crate) async fn anonymous_get_sets_no_cookie(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        for path in ["/", "/api/session", "/", "/nonexistent"] {
            let response = client.get(demo.url(path)).send().await.unwrap();
            assert!(set_cookies(&response).is_empty(), "GET {path} set a cookie");
        }
        assert_eq!(state(&client, &demo).await["active"], false);
    }

    pub(crate) async fn login_renews_the_id_and_keeps_the_counter(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        let created = post(&client, &demo, "/increment").await;
        let before = cookie_value(&set_cookies(&created)[0]);
        post(&client, &demo, "/increment").await;
        let fingerprint_before = state(&client, &demo).await["fingerprint"].clone();
        let login = client
            .post(demo.url("/login"))
            .form(&[("user", "alice <b>")])
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let renewed = set_cookies(&login);
        assert_eq!(renewed.len(), 1);
        let after = cookie_value(&renewed[0]);
        assert_ne!(before, after, "login must renew the session id");
        let state = state(&client, &demo).await;
        assert_eq!(state["user"], "alice <b>");
        assert_eq!(state["counter"], 2);
        assert_ne!(state["fingerprint"], fingerprint_before);
        let page = client
            .get(demo.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains("alice &lt;b&gt;") && !page.contains("alice <b>"),
            "the user name is escaped"
        );
        // The pre-login id is dead.
        let old = common::session_state(&demo, &format!("id={before}")).await;
        assert_eq!(old["active"], false);
        let empty = client
            .post(demo.url("/login"))
            .form(&[("user", "  ")])
            .send()
            .await
            .unwrap();
        assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
    }

    pub(crate) async fn forged_cookies_get_a_fresh_session(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let before = files_below(cwd);
        let unknown = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let junk = "x".repeat(10 * 1024);
        let forged = [
            "../../etc/passwd",
            "/etc/passwd",
            "..%2f..%2fetc%2fpasswd",
            "session2-data/../../x",
            "",
            unknown,
            junk.as_str(),
            "\u{7f}\u{1}",
        ];
        for value in forged {
            let cookie = format!("id={value}");
            let Ok(request) = bare()
                .post(demo.url("/increment"))
                .header("cookie", &cookie)
                .build()
            else {
                continue; // not even a valid header value
            };
            let response = bare().execute(request).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::SEE_OTHER,
                "cookie {cookie:.40}"
            );
            let cookies = set_cookies(&response);
            assert_eq!(
                cookies.len(),
                1,
                "a fresh session gets exactly one new cookie"
            );
            let id = cookie_value(&cookies[0]);
            assert_ne!(id, value, "a client-chosen id must never be adopted");
            assert_eq!(id.len(), 32);
            let state: Value = common::session_state(&demo, &format!("id={id}")).await;
            assert_eq!(
                state["counter"], 1,
                "the forged cookie's request started from zero"
            );
        }
        // A read with an unknown id revokes the stale cookie and stores nothing.
        let read = bare()
            .get(demo.url("/api/session"))
            .header("cookie", format!("id={unknown}"))
            .send()
            .await
            .unwrap();
        let revoked = set_cookies(&read);
        assert!(
            revoked.len() == 1 && revoked[0].contains("Max-Age=0"),
            "{revoked:?}"
        );
        // Nothing was written outside the store's own directory.
        let is_store_file = |path: &Path| {
            path.starts_with(cwd.join("session2-data"))
                || path.starts_with(cwd.join("store"))
                || path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("sessions."))
        };
        let outside: Vec<_> = files_below(cwd)
            .into_iter()
            .filter(|path| !before.contains(path) && !is_store_file(path))
            .collect();
        assert!(
            outside.is_empty(),
            "files appeared outside the store: {outside:?}"
        );
        assert!(!Path::new("/etc/passwd-session2").exists());
    }

    pub(crate) async fn concurrent_increments_end_at_64(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let client = browser();
        let created = client.post(demo.url("/increment")).send().await.unwrap();
        assert_eq!(created.status(), StatusCode::SEE_OTHER);
        let tasks: Vec<_> = (0..63)
            .map(|_| {
                let client = client.clone();
                let url = demo.url("/increment");
                tokio::spawn(async move { client.post(url).send().await.unwrap().status() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::SEE_OTHER);
        }
        assert_eq!(state(&client, &demo).await["counter"], 64);
    }

    pub(crate) async fn sessions_page_lists_and_ends_sessions(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let laptop = browser();
        let phone = browser();
        let login = |client: reqwest::Client, user: &'static str| {
            let url = demo.url("/login");
            async move {
                client
                    .post(url)
                    .form(&[("user", user)])
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        };
        let anonymous = browser().get(demo.url("/sessions")).send().await.unwrap();
        assert_eq!(
            anonymous.status(),
            StatusCode::SEE_OTHER,
            "no user, no sessions page"
        );
        post(&laptop, &demo, "/increment").await;
        assert_eq!(login(laptop.clone(), "carol").await, StatusCode::SEE_OTHER);
        assert_eq!(login(phone.clone(), "carol").await, StatusCode::SEE_OTHER);
        let other = browser();
        assert_eq!(login(other.clone(), "mallory").await, StatusCode::SEE_OTHER);
        let page = laptop
            .get(demo.url("/sessions"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("2 active session(s)"), "{page}");
        assert_eq!(page.matches("this device").count(), 1);
        let phone_fingerprint = state(&phone, &demo).await["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned();
        let mallory_fingerprint = state(&other, &demo).await["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(page.contains(&phone_fingerprint) && !page.contains(&mallory_fingerprint));
        // Someone else's session cannot be ended from here.
        let foreign = end_session(&laptop, &demo, &mallory_fingerprint).await;
        assert_eq!(foreign, StatusCode::NOT_FOUND);
        assert_eq!(state(&other, &demo).await["active"], true);
        // End the phone's session from the laptop.
        let ended = end_session(&laptop, &demo, &phone_fingerprint).await;
        assert_eq!(ended, StatusCode::SEE_OTHER);
        assert_eq!(state(&phone, &demo).await["active"], false);
        let page = laptop
            .get(demo.url("/sessions"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("1 active session(s)"), "{page}");
        // Log out everywhere.
        assert_eq!(login(phone.clone(), "carol").await, StatusCode::SEE_OTHER);
        let everywhere = post(&laptop, &demo, "/logout-everywhere").await;
        assert_eq!(everywhere.status(), StatusCode::SEE_OTHER);
        assert!(
            set_cookies(&everywhere)
                .iter()
                .any(|cookie| cookie.contains("Max-Age=0"))
        );
        assert_eq!(state(&laptop, &demo).await["active"], false);
        assert_eq!(state(&phone, &demo).await["active"], false);
        assert_eq!(
            state(&other, &demo).await["active"],
            true,
            "other users are untouched"
        );
    }

    pub(crate) async fn restart_keeps_the_session(store: &str, cwd: &Path) {
        let demo = Demo::start(store, cwd);
        let created = bare().post(demo.url("/increment")).send().await.unwrap();
        let cookie = format!("id={}", cookie_value(&set_cookies(&created)[0]));
        demo.stop();
        let demo = Demo::start(store, cwd);
        let incremented = bare()
            .post(demo.url("/increment"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(
            set_cookies(&incremented).is_empty(),
            "the restarted demo kept the id"
        );
        let state: Value = common::session_state(&demo, &cookie).await;
        assert_eq!(
            state["active"], true,
            "the restarted demo knows the session"
        );
        assert_eq!(state["counter"], 2);
    }

    /// SIGKILL the demo while clients increment; after a restart on the same
    /// store every session is readable and holds at least every increment
    /// that was acknowledged (at most one more: saved, but its answer lost).
    pub(crate) async fn sigkill_loses_no_acknowledged_increment(store: &str, cwd: &Path) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        const CLIENTS: usize = 16;
        let demo = Demo::start(store, cwd);
        let mut cookies = Vec::new();
        for _ in 0..CLIENTS {
            let created = bare().post(demo.url("/increment")).send().await.unwrap();
            cookies.push(format!("id={}", cookie_value(&set_cookies(&created)[0])));
        }
        let total = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = cookies
            .iter()
            .map(|cookie| {
                let (url, cookie, total) =
                    (demo.url("/increment"), cookie.clone(), Arc::clone(&total));
                tokio::spawn(async move {
                    let client = bare();
                    let mut acknowledged = 1u64;
                    loop {
                        match client.post(&url).header("cookie", &cookie).send().await {
                            Ok(response) if response.status() == StatusCode::SEE_OTHER => {
                                acknowledged += 1;
                                total.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => return acknowledged,
                        }
                    }
                })
            })
            .collect();
        while total.load(Ordering::SeqCst) < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        demo.stop(); // SIGKILL, mid-request
        let mut acknowledged = Vec::new();
        for task in tasks {
            acknowledged.push(task.await.unwrap());
        }
        let demo = Demo::start(store, cwd);
        for (cookie, acknowledged) in cookies.iter().zip(acknowledged) {
            let state: Value = common::session_state(&demo, cookie).await;
            assert_eq!(state["active"], true, "a session was lost in the crash");
            let counter = state["counter"].as_u64().unwrap();
            assert!(
                counter == acknowledged || counter == acknowledged + 1,
                "counter {counter} after {acknowledged} acknowledged increments"
            );
            // And the session still works after the crash (no lease left behind for long).
            let next = bare()
                .post(demo.url("/increment"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(next.status(), StatusCode::SEE_OTHER);
        }
    }

    pub(crate) async fn two_processes_share_the_store(store: &str, cwd: &Path) {
        let first = Demo::start(store, cwd);
        let second = Demo::start(store, cwd);
        let created = bare().post(first.url("/increment")).send().await.unwrap();
        let id = cookie_value(&set_cookies(&created)[0]);
        let cookie = format!("id={id}");
        let mut tasks = Vec::new();
        for n in 0..40 {
            let url = if n % 2 == 0 {
                first.url("/increment")
            } else {
                second.url("/increment")
            };
            let cookie = cookie.clone();
            tasks.push(tokio::spawn(async move {
                bare()
                    .post(url)
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::SEE_OTHER);
        }
        for demo in [&first, &second] {
            let state: Value = common::session_state(demo, &cookie).await;
            assert_eq!(state["counter"], 41, "both processes see every increment");
        }
    }
}

/// Stamps the scenarios for one store. `$url` maps the test's working
/// directory to a store URL, or `None` when the store's server is
/// unreachable (skipped loudly, or failed under `CI=true`).
macro_rules! demo_tests {
    ($store:ident, $url:expr, [$($scenario:ident),* $(,)?]) => {
        mod $store {
            use super::*;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let cwd = tempfile::tempdir().expect("a temporary directory");
                    let url: fn(&Path) -> Option<String> = $url;
                    if let Some(url) = url(cwd.path()) {
                        scenarios::$scenario(&url, cwd.path()).await;
                    }
                }
            )*
        }
    };
}

macro_rules! every_scenario {
    ($store:ident, $url:expr) => {
        demo_tests!(
            $store,
            $url,
            [
                increment_persists,
                increment_fail_saves_nothing,
                logout_deletes_and_revokes,
                logout_without_session_is_harmless,
                logout_fail_keeps_the_session,
                anonymous_get_sets_no_cookie,
                login_renews_the_id_and_keeps_the_counter,
                forged_cookies_get_a_fresh_session,
                concurrent_increments_end_at_64,
                sessions_page_lists_and_ends_sessions,
            ]
        );
    };
}

every_scenario!(memory, |_| Some("memory:".to_owned()));
every_scenario!(directory, |cwd| Some(format!(
    "dir:{}",
    cwd.join("store").display()
)));
every_scenario!(sqlite, |cwd| Some(format!(
    "sqlite:{}",
    cwd.join("sessions.db").display()
)));
every_scenario!(redb, |cwd| Some(format!(
    "redb:{}",
    cwd.join("sessions.redb").display()
)));
every_scenario!(postgres, |_| common::postgres_store());
every_scenario!(mysql, |_| common::mysql_store());
every_scenario!(redis, |_| common::redis_store());
every_scenario!(redis_cluster, |_| common::redis_cluster_store());

// No `--store`: the demo's embedded default, a directory under its working directory.
every_scenario!(default_store, |_| Some(String::new()));

demo_tests!(
    sqlite_processes,
    |cwd| Some(format!("sqlite:{}", cwd.join("sessions.db").display())),
    [
        restart_keeps_the_session,
        two_processes_share_the_store,
        sigkill_loses_no_acknowledged_increment,
    ]
);

demo_tests!(
    postgres_processes,
    |_| common::postgres_store(),
    [restart_keeps_the_session, two_processes_share_the_store]
);

demo_tests!(
    mysql_processes,
    |_| common::mysql_store(),
    [restart_keeps_the_session, two_processes_share_the_store]
);

demo_tests!(
    redis_processes,
    |_| common::redis_store(),
    [restart_keeps_the_session, two_processes_share_the_store]
);

demo_tests!(
    redb_restart,
    |cwd| Some(format!("redb:{}", cwd.join("sessions.redb").display())),
    [restart_keeps_the_session]
);

demo_tests!(
    directory_processes,
    |cwd| Some(format!("dir:{}", cwd.join("store").display())),
    [
        restart_keeps_the_session,
        two_processes_share_the_store,
        sigkill_loses_no_acknowledged_increment,
    ]
);
