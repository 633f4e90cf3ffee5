//! The conformance suite and file-level tests against the redb store.

use std::sync::Arc;

use session2::SessionStore;
use session2::store::RedbStore;

async fn factory() -> Option<Arc<dyn SessionStore>> {
    let dir = tempfile::tempdir().expect("a temporary directory").keep();
    let store = RedbStore::open(dir.join("sessions.redb"))
        .await
        .expect("open");
    store.setup().await.expect("setup");
    Some(Arc::new(store))
}

session2::conformance_tests!(factory);

/// Rename is one step here: no reader finds a session under both keys.
#[test]
fn a_rename_is_never_seen_half_done() {
    session2::testing::run(async {
        if let Some(store) = factory().await {
            session2::testing::a_rename_is_never_seen_half_done(store).await;
        }
    });
}

mod file {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use session2::store::RedbStore;

    const CHILD_ENV: &str = "SESSION2_REDB_HELD_FILE";

    /// Another process opening a file this process holds fails at once with
    /// an error that says so, instead of waiting or corrupting the file.
    #[test]
    fn a_file_held_by_another_process_fails_to_open() {
        if let Ok(path) = std::env::var(CHILD_ENV) {
            let started = Instant::now();
            let err = session2::testing::run(RedbStore::open(&path)).unwrap_err();
            assert!(err.is_backend(), "{err}");
            assert!(err.to_string().contains("another process"), "{err}");
            assert!(started.elapsed() < Duration::from_secs(5), "open waited");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.redb");
        let held = session2::testing::run(RedbStore::open(&path)).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "file::a_file_held_by_another_process_fails_to_open",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .output()
            .expect("the child test process runs");
        let output = String::from_utf8_lossy(&child.stdout);
        assert!(child.status.success(), "child: {output}");
        assert!(
            output.contains("1 passed"),
            "the child ran no test: {output}"
        );
        drop(held);
        // Once released, the file opens again.
        session2::testing::run(RedbStore::open(&path)).unwrap();
    }
}
