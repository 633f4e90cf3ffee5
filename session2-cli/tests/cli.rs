//! Tests of the `session2` command line: the real binary against real stores.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use session2::testing::run;
use session2::{
    Clock, Outcome, Record, SessionId, SessionManager, SessionStore, SystemClock, Timestamp,
};

fn session2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_session2"))
        .args(args)
        .output()
        .expect("the session2 binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn succeed(args: &[&str]) -> String {
    let output = session2(args);
    assert!(
        output.status.success(),
        "session2 {args:?} failed: {}",
        stderr(&output)
    );
    stdout(&output)
}

#[track_caller]
fn fail(args: &[&str], code: i32) -> String {
    let output = session2(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "session2 {args:?}: {}{}",
        stdout(&output),
        stderr(&output)
    );
    let message = stderr(&output);
    assert!(
        message.starts_with("session2: ") || message.starts_with("error:"),
        "{message}"
    );
    assert!(
        !message.contains("panicked") && !message.contains("RUST_BACKTRACE"),
        "{message}"
    );
    message
}

/// Known contents: alice has two live sessions, bob one, and two sessions
/// expired (one idle, one absolute). Returns the live sessions' ids.
struct Seeded {
    alice: Vec<SessionId>,
    bob: SessionId,
}

async fn seed(url: &str) -> Seeded {
    let store: Arc<dyn SessionStore> = session2::store::open(url).await.unwrap();
    store.setup().await.unwrap();
    let manager = SessionManager::from_arc(Arc::clone(&store));
    let login = async |user: &str, counter: i64| {
        let request = manager.start(None);
        let session = request.session().await.unwrap();
        session.insert("counter", counter).unwrap();
        session.insert("note", format!("{user}'s <note>")).unwrap();
        session.set_user(user);
        let cookie = request.finish(Outcome::Success).await.unwrap().unwrap();
        SessionId::parse(cookie.split(';').next().unwrap().split_once('=').unwrap().1).unwrap()
    };
    let alice = vec![login("alice", 5).await, login("alice", 6).await];
    let bob = login("bob", 7).await;
    let now = SystemClock.now();
    let minute = Duration::from_secs(60);
    let mut idle = Record::new(now, now.saturating_add(minute), None);
    idle.idle_deadline = Timestamp::from_millis(now.as_millis() - 60_000);
    idle.data = br#"{"expired":"idle"}"#.to_vec();
    store
        .create(&SessionId::generate().key(), &idle, now)
        .await
        .unwrap();
    let mut absolute = Record::new(
        now,
        now.saturating_add(minute),
        Some(now.saturating_add(minute)),
    );
    absolute.absolute_deadline = Some(Timestamp::from_millis(now.as_millis() - 1));
    absolute.data = br#"{"expired":"absolute"}"#.to_vec();
    store
        .create(&SessionId::generate().key(), &absolute, now)
        .await
        .unwrap();
    Seeded { alice, bob }
}

fn dir_url(dir: &Path, name: &str) -> String {
    format!("dir:{}", dir.join(name).display())
}

#[test]
fn every_command_has_help_with_examples() {
    let top = succeed(&["--help"]);
    for command in [
        "demo",
        "setup",
        "list",
        "show",
        "count",
        "stats",
        "purge",
        "logout-user",
        "migrate",
    ] {
        assert!(top.contains(command), "{command} missing from --help");
        let help = succeed(&[command, "--help"]);
        assert!(
            help.contains("Example"),
            "`session2 {command} --help` has no example:\n{help}"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_runtime_errors_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    fail(&["bogus"], 2);
    fail(&["list"], 2);
    let message = fail(&["list", "memory:"], 2);
    assert!(message.contains("persistent store"), "{message}");
    let message = fail(&["list", "gopher://x"], 2);
    assert!(
        message.contains("unknown store scheme `gopher`"),
        "{message}"
    );
    fail(&["list", "no-scheme"], 2);
    fail(
        &["list", &format!("{}?table=x", dir_url(dir.path(), "s"))],
        2,
    );
    fail(&["migrate", "dir:a", "dir:a"], 2);
    fail(&["migrate", "dir:a", "dir:b", "--batch", "0"], 2);
    let url = dir_url(dir.path(), "never-set-up");
    let message = fail(&["list", &url], 1);
    assert!(
        message.contains("does not exist") && message.contains("session2 setup"),
        "{message}"
    );
    fail(&["count", &url], 1);
}

fn fingerprint(id: &SessionId) -> String {
    id.key().fingerprint()
}

/// How a store treats the seeded expired sessions: kept until purged, or
/// dropped at once by the server's own expiry (Redis).
#[derive(Clone, Copy)]
struct Expired(u64);

/// `list`, `show`, `count`, `stats` on known data.
fn known_data(url: &str, expired: Expired) {
    let seeded = run(seed(url));
    let total = 3 + expired.0;
    assert_eq!(succeed(&["count", url]).trim(), total.to_string());

    let table = succeed(&["list", url]);
    assert!(table.starts_with("FINGERPRINT"), "{table}");
    assert!(table.contains(&format!("{total} session(s) shown")));
    for id in seeded.alice.iter().chain([&seeded.bob]) {
        assert!(table.contains(&fingerprint(id)), "{table}");
        assert!(!table.contains(&id.to_string()), "a raw id was printed");
    }
    assert_eq!(table.matches("idle-expired").count() as u64, expired.0 / 2);
    assert_eq!(
        table.matches("absolute-expired").count() as u64,
        expired.0 / 2
    );
    let alice: Value =
        serde_json::from_str(&succeed(&["list", url, "--user", "alice", "--json"])).unwrap();
    let alice = alice.as_array().unwrap();
    assert_eq!(alice.len(), 2);
    assert!(
        alice
            .iter()
            .all(|row| row["user"] == "alice" && row["state"] == "live")
    );
    let limited: Value =
        serde_json::from_str(&succeed(&["list", url, "--limit", "2", "--json"])).unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 2);

    let bob = fingerprint(&seeded.bob);
    let shown = succeed(&["show", url, &bob]);
    assert!(
        shown.contains("bob") && shown.contains("\"counter\": 7") && shown.contains("bob's <note>"),
        "{shown}"
    );
    let shown: Value = serde_json::from_str(&succeed(&["show", url, &bob[..8], "--json"])).unwrap();
    assert_eq!(shown["user"], "bob");
    assert_eq!(shown["data"]["counter"], 7);
    assert_eq!(shown["key"], seeded.bob.key().to_hex());
    fail(&["show", url, "abc"], 2);
    let message = fail(&["show", url, "000000000000"], 1);
    assert!(message.contains("no session"), "{message}");

    let stats: Value = serde_json::from_str(&succeed(&["stats", url, "--json"])).unwrap();
    assert_eq!(stats["total"], total);
    assert_eq!(stats["live"], 3);
    assert_eq!(stats["idle_expired"], expired.0 / 2);
    assert_eq!(stats["absolute_expired"], expired.0 / 2);
    assert_eq!(stats["with_user"], 3);
    assert_eq!(stats["by_age"]["under_1_hour"], total);
    assert_eq!(stats["top_users"][0]["user"], "alice");
    assert_eq!(stats["top_users"][0]["sessions"], 2);
    assert!(stats["size_bytes"]["max"].as_u64().unwrap() > 0);
    let text = succeed(&["stats", url, "--top", "1"]);
    assert!(
        text.contains("  live              3") && text.contains("alice") && !text.contains("bob"),
        "{text}"
    );
}

/// `purge` removes exactly the expired sessions.
fn purge(url: &str, expired: Expired) {
    run(seed(url));
    let total = 3 + expired.0;
    assert!(
        succeed(&["purge", url, "--dry-run"])
            .contains(&format!("{} expired session(s) would be purged", expired.0))
    );
    assert_eq!(succeed(&["count", url]).trim(), total.to_string());
    let purged = succeed(&["purge", url]);
    assert!(
        purged.starts_with(&format!("purged {} expired session(s)", expired.0)),
        "{purged}"
    );
    assert_eq!(succeed(&["count", url]).trim(), "3");
    assert!(succeed(&["purge", url]).starts_with("purged 0 "));
}

/// `logout-user` deletes every session of that user and no other.
fn logout_user(url: &str) {
    run(seed(url));
    assert!(succeed(&["logout-user", url, "alice"]).contains("2 session(s) deleted"));
    let alice: Value =
        serde_json::from_str(&succeed(&["list", url, "--user", "alice", "--json"])).unwrap();
    assert!(alice.as_array().unwrap().is_empty());
    let bob: Value =
        serde_json::from_str(&succeed(&["list", url, "--user", "bob", "--json"])).unwrap();
    assert_eq!(bob.as_array().unwrap().len(), 1);
    assert!(succeed(&["logout-user", url, "nobody"]).contains("0 session(s) deleted"));
}

/// `setup` twice, the second time on a store holding sessions, loses nothing.
fn setup_twice(url: &str, expired: Expired) {
    assert!(succeed(&["setup", url]).contains("is set up"));
    run(seed(url));
    succeed(&["setup", url]);
    assert_eq!(succeed(&["count", url]).trim(), (3 + expired.0).to_string());
}

/// Stamps the command tests for one store; `$url` maps a scratch directory
/// to a fresh store URL, or `None` when its server is unreachable.
macro_rules! store_commands {
    ($store:ident, $url:expr, $expired:expr) => {
        mod $store {
            use super::*;

            fn url(dir: &Path) -> Option<String> {
                let url: fn(&Path) -> Option<String> = $url;
                url(dir)
            }

            #[test]
            fn list_show_count_stats_on_known_data() {
                let dir = tempfile::tempdir().unwrap();
                if let Some(url) = url(dir.path()) {
                    known_data(&url, $expired);
                }
            }

            #[test]
            fn purge_removes_exactly_the_expired() {
                let dir = tempfile::tempdir().unwrap();
                if let Some(url) = url(dir.path()) {
                    purge(&url, $expired);
                }
            }

            #[test]
            fn logout_user_deletes_every_session_of_that_user() {
                let dir = tempfile::tempdir().unwrap();
                if let Some(url) = url(dir.path()) {
                    logout_user(&url);
                }
            }

            #[test]
            fn setup_twice_is_harmless_and_keeps_data() {
                let dir = tempfile::tempdir().unwrap();
                if let Some(url) = url(dir.path()) {
                    setup_twice(&url, $expired);
                }
            }
        }
    };
}

store_commands!(directory, |dir| Some(dir_url(dir, "sessions")), Expired(2));
store_commands!(
    sqlite,
    |dir| Some(format!("sqlite:{}", dir.join("sessions.db").display())),
    Expired(2)
);
store_commands!(
    redb,
    |dir| Some(format!("redb:{}", dir.join("sessions.redb").display())),
    Expired(2)
);
store_commands!(postgres, |_| common::postgres_store(), Expired(2));
store_commands!(mysql, |_| common::mysql_store(), Expired(2));
// Redis drops a session whose deadline has passed by itself.
store_commands!(redis, |_| common::redis_store(), Expired(0));

/// Every live record of `from` is in `to`, field for field (but the lease).
async fn assert_same_live_sessions(from: &str, to: &str) {
    let from = session2::store::open(from).await.unwrap();
    let to = session2::store::open(to).await.unwrap();
    let now = SystemClock.now();
    let mut checked = 0;
    let page = from.list(None, 1_000).await.unwrap();
    for (key, record) in page
        .records
        .iter()
        .filter(|(_, record)| !record.is_expired_at(now))
    {
        let copied = to
            .load(key, now)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key:?} was not migrated"));
        let mut expected = record.clone();
        expected.lease = None;
        assert_eq!(copied, expected);
        checked += 1;
    }
    assert_eq!(
        checked as u64,
        to.count().await.unwrap(),
        "the target holds exactly the live sessions"
    );
}

/// Migrates `from` to `to`, checks every field, re-runs, and serves a
/// migrated session through the demo.
pub(crate) async fn migrate_and_check(from: &str, to: &str, cwd: &Path, expired: u64) {
    let seeded = seed(from).await;
    let summary: Value = serde_json::from_str(
        &succeed_async(&["migrate", from, to, "--batch", "2", "--json"]).await,
    )
    .unwrap();
    assert_eq!(summary["copied"], 3, "{summary}");
    assert_eq!(summary["expired"], expired);
    assert_same_live_sessions(from, to).await;
    let again: Value =
        serde_json::from_str(&succeed_async(&["migrate", from, to, "--json"]).await).unwrap();
    assert_eq!(again["copied"], 0, "a re-run copies nothing again");
    assert_eq!(again["unchanged"], 3);
    // A newer version in the source updates the target on the next run.
    let source = session2::store::open(from).await.unwrap();
    let manager = SessionManager::from_arc(source);
    let request = manager.start(Some(&format!("id={}", seeded.bob)));
    request
        .session()
        .await
        .unwrap()
        .insert("counter", 8)
        .unwrap();
    request.finish(Outcome::Success).await.unwrap();
    let third: Value =
        serde_json::from_str(&succeed_async(&["migrate", from, to, "--json"]).await).unwrap();
    assert_eq!(third["updated"], 1, "{third}");
    assert_same_live_sessions(from, to).await;
    let text = succeed_async(&["migrate", from, to]).await;
    let expected = format!("0 copied, 0 updated, 3 already up to date, {expired} expired skipped");
    assert!(text.contains(&expected), "{text}");
    // The migrated session works in the demo on the target store.
    demo_knows(to, &seeded.alice[0], cwd, 5, "alice").await;
    demo_knows(to, &seeded.bob, cwd, 8, "bob").await;
}

async fn succeed_async(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        succeed(&args)
    })
    .await
    .unwrap()
}

/// Starts `session2 demo` on `store` and checks it serves the session `id`.
async fn demo_knows(store: &str, id: &SessionId, cwd: &Path, counter: i64, user: &str) {
    let demo = common::Demo::start(store, cwd);
    let state: Value = common::session_state(&demo, &format!("id={id}")).await;
    assert_eq!(state["active"], true, "{state}");
    assert_eq!(state["counter"], counter);
    assert_eq!(state["user"], user);
}

/// Migrates between two stores, when both are reachable.
fn migration(from: Option<String>, to: Option<String>, dir: &Path) {
    if let (Some(from), Some(to)) = (from, to) {
        // Redis drops the seeded expired sessions by itself.
        let expired = if from.starts_with("redis") { 0 } else { 2 };
        run(migrate_and_check(&from, &to, dir, expired));
    }
}

#[test]
fn migrate_directory_to_directory() {
    let dir = tempfile::tempdir().unwrap();
    migration(
        Some(dir_url(dir.path(), "old")),
        Some(dir_url(dir.path(), "new")),
        dir.path(),
    );
}

#[test]
fn migrate_directory_to_postgres() {
    let dir = tempfile::tempdir().unwrap();
    migration(
        Some(dir_url(dir.path(), "old")),
        common::postgres_store(),
        dir.path(),
    );
}

#[test]
fn migrate_postgres_to_redis() {
    let dir = tempfile::tempdir().unwrap();
    migration(common::postgres_store(), common::redis_store(), dir.path());
}

#[test]
fn migrate_redis_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("sessions.db").display());
    migration(common::redis_store(), Some(sqlite), dir.path());
}

#[test]
fn migrate_sqlite_to_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("sessions.db").display());
    migration(Some(sqlite), Some(dir_url(dir.path(), "new")), dir.path());
}

#[test]
fn migrate_mysql_to_redb() {
    let dir = tempfile::tempdir().unwrap();
    let redb = format!("redb:{}", dir.path().join("sessions.redb").display());
    migration(common::mysql_store(), Some(redb), dir.path());
}

#[test]
fn unreachable_servers_fail_with_a_clear_message() {
    for url in [
        "postgres://postgres@127.0.0.1:1/test",
        "mysql://root@127.0.0.1:1/test",
        "redis://127.0.0.1:1",
    ] {
        let message = fail(&["count", url], 1);
        assert!(message.len() < 400, "one or two sentences: {message}");
    }
}
