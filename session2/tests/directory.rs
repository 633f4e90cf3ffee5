//! The conformance suite and file-level tests against the directory store.

use std::sync::Arc;

use session2::{DirectoryStore, SessionStore};

async fn factory() -> Option<Arc<dyn SessionStore>> {
    let dir = tempfile::tempdir().expect("a temporary directory").keep();
    let store = DirectoryStore::new(dir.join("sessions"));
    store.setup().await.expect("setup");
    Some(Arc::new(store))
}

session2::conformance_tests!(factory);

mod files {
    use std::process::Command;
    use std::time::Duration;

    use session2::{
        Clock, DirectoryStore, Outcome, Record, SessionConfig, SessionId, SessionManager,
        SessionStore, SystemClock,
    };

    const WORKER_ENV: &str = "SESSION2_HAMMER_WORKER";
    const PROCESSES: usize = 4;
    const ROUNDS: i64 = 20;

    /// A set-up store in a fresh temporary directory (kept while the
    /// returned guard lives), and its root.
    async fn fresh_store() -> (tempfile::TempDir, std::path::PathBuf, DirectoryStore) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sessions");
        let store = DirectoryStore::new(&root);
        store.setup().await.unwrap();
        (dir, root, store)
    }

    fn counter(record: &Record, name: &str) -> i64 {
        let value: serde_json::Value = serde_json::from_slice(&record.data).expect("valid data");
        value[name].as_i64().unwrap_or(0)
    }

    /// One worker process: increments `n` in every session `ROUNDS` times
    /// through exclusive sessions (leases across processes), and `raw`
    /// `ROUNDS` times by raw compare-and-swap (which must not disturb `n`).
    async fn hammer(root: &str, ids: &[SessionId]) {
        let store = DirectoryStore::new(root);
        let manager = SessionManager::new(store.clone())
            .with_config(SessionConfig::default().with_lock_wait(Duration::from_secs(120)))
            .unwrap();
        for _ in 0..ROUNDS {
            for id in ids {
                let request = manager.start(Some(&format!("id={id}")));
                let session = request.exclusive_session().await.expect("lease");
                assert!(!session.is_new(), "the session must exist");
                let n = session.get::<i64>("n").unwrap().unwrap();
                session.insert("n", n + 1).unwrap();
                request.finish(Outcome::Success).await.expect("save");

                session2::testing::increment_by_compare_and_swap(
                    &store,
                    &id.key(),
                    "raw",
                    SystemClock.now(),
                )
                .await;
            }
        }
    }

    #[test]
    fn several_processes_hammer_the_same_sessions() {
        if let Ok(spec) = std::env::var(WORKER_ENV) {
            let (root, ids) = spec.split_once('|').unwrap();
            let ids: Vec<SessionId> = ids
                .split(',')
                .map(|id| SessionId::parse(id).unwrap())
                .collect();
            session2::testing::run(hammer(root, &ids));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sessions");
        let store = DirectoryStore::new(&root);
        let ids: Vec<SessionId> = (0..3).map(|_| SessionId::generate()).collect();
        session2::testing::run(async {
            store.setup().await.unwrap();
            let now = SystemClock.now();
            for id in &ids {
                let mut record =
                    Record::new(now, now.saturating_add(Duration::from_secs(3600)), None);
                record.data = br#"{"n":0}"#.to_vec();
                store.create(&id.key(), &record, now).await.unwrap();
            }
        });
        let spec = format!(
            "{}|{}",
            root.display(),
            ids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let exe = std::env::current_exe().unwrap();
        let mut workers: Vec<_> = (0..PROCESSES)
            .map(|_| {
                Command::new(&exe)
                    .args([
                        "--exact",
                        "files::several_processes_hammer_the_same_sessions",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(WORKER_ENV, &spec)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("a worker process starts")
            })
            .collect();
        // Meanwhile, read continuously until the workers are done: a torn
        // file would fail to decode.
        let reads = session2::testing::run(async {
            let mut reads = 0u64;
            while workers
                .iter_mut()
                .any(|worker| worker.try_wait().unwrap().is_none())
            {
                for id in &ids {
                    let record = store
                        .load(&id.key(), SystemClock.now())
                        .await
                        .expect("never a torn read");
                    assert!(record.is_some());
                    reads += 1;
                }
            }
            reads
        });
        for mut worker in workers {
            assert!(worker.wait().unwrap().success(), "a worker failed");
        }
        assert!(reads > 0);
        session2::testing::run(async {
            for id in &ids {
                let record = store
                    .load(&id.key(), SystemClock.now())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    counter(&record, "n"),
                    PROCESSES as i64 * ROUNDS,
                    "an exclusive increment was lost"
                );
                assert_eq!(
                    counter(&record, "raw"),
                    PROCESSES as i64 * ROUNDS,
                    "a compare-and-swap increment was lost"
                );
                assert_eq!(record.lease, None);
            }
        });
    }

    #[test]
    fn corrupt_and_foreign_files_never_panic() {
        session2::testing::run(async {
            let (_dir, root, store) = fresh_store().await;
            let now = SystemClock.now();
            let id = SessionId::generate();
            let key = id.key();
            let record = Record::new(now, now.saturating_add(Duration::from_secs(600)), None);
            store.create(&key, &record, now).await.unwrap();
            let hex = key.to_hex();
            let path = root.join(&hex[..2]).join(&hex);
            for garbage in [
                &b""[..],
                b"{\"format\":1",
                b"\x00\xff\xfe",
                br#"{"format":99}"#,
            ] {
                std::fs::write(&path, garbage).unwrap();
                let err = store.load(&key, now).await.unwrap_err();
                assert!(err.is_decode(), "{err}");
                // Through the manager a corrupt record is a fresh session.
                let manager = SessionManager::new(store.clone());
                let request = manager.start(Some(&format!("id={id}")));
                assert!(request.session().await.unwrap().is_new());
                assert!(
                    store.list(None, 10).await.unwrap().records.is_empty(),
                    "list skips it"
                );
            }
            // Foreign files in the tree are ignored by list, count and purge.
            std::fs::write(root.join("README"), "not a session").unwrap();
            std::fs::write(root.join(&hex[..2]).join("notes.txt"), "x").unwrap();
            assert_eq!(store.count().await.unwrap(), 1);
            // Purge removes the undecodable record once its time has come.
            let later = now.saturating_add(Duration::from_secs(3600));
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(now.to_system_time()).unwrap();
            assert_eq!(store.purge_expired(later).await.unwrap(), 1);
            assert_eq!(store.count().await.unwrap(), 0);
            assert!(root.join("README").exists());
        });
    }

    #[test]
    fn files_are_private_sharded_and_named_by_hash() {
        session2::testing::run(async {
            use std::os::unix::fs::PermissionsExt;
            let (_dir, root, store) = fresh_store().await;
            store.setup().await.unwrap();
            let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
            let manager = SessionManager::new(store.clone());
            let request = manager.start(None);
            request.session().await.unwrap().insert("n", 1).unwrap();
            let cookie = request.finish(Outcome::Success).await.unwrap().unwrap();
            let id = cookie
                .split(';')
                .next()
                .unwrap()
                .split_once('=')
                .unwrap()
                .1
                .to_owned();
            let hex = SessionId::parse(&id).unwrap().key().to_hex();
            let path = root.join(&hex[..2]).join(&hex);
            assert!(path.is_file());
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let mut names = Vec::new();
            for entry in walk(&root) {
                names.push(entry.clone());
                let contents = std::fs::read(&entry).unwrap_or_default();
                assert!(!String::from_utf8_lossy(&contents).contains(&id));
                assert!(!entry.to_string_lossy().contains(&id));
            }
            assert!(!names.is_empty());
        });
    }

    /// Loads, lists and user look-ups open session files with `O_NOATIME`:
    /// under `relatime` the future modification time (the expiry) would
    /// otherwise make every read write the file's access time.
    #[test]
    fn reads_leave_the_access_time_alone() {
        session2::testing::run(async {
            use std::fs::FileTimes;
            use std::time::SystemTime;
            let (_dir, root, store) = fresh_store().await;
            let now = SystemClock.now();
            let key = SessionId::generate().key();
            let mut record = Record::new(now, now.saturating_add(Duration::from_secs(600)), None);
            record.user = Some("atime-user".to_owned());
            store.create(&key, &record, now).await.unwrap();
            let hex = key.to_hex();
            let path = root.join(&hex[..2]).join(&hex);
            let past = SystemTime::now() - Duration::from_secs(3 * 86_400);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_times(FileTimes::new().set_accessed(past))
                .unwrap();
            let atime = || std::fs::metadata(&path).unwrap().accessed().unwrap();
            assert_eq!(atime(), past);
            assert!(store.load(&key, now).await.unwrap().is_some());
            assert_eq!(store.list(None, 10).await.unwrap().records.len(), 1);
            assert_eq!(
                store.find_by_user("atime-user", now).await.unwrap().len(),
                1
            );
            // Not yet due: purge leaves it, and its access time, alone.
            assert_eq!(store.purge_expired(now).await.unwrap(), 0);
            assert_eq!(atime(), past, "a read updated the access time");
        });
    }

    /// Purge over many shards, both with user markers (records are read to
    /// find their marker) and without any (the metadata decides): exactly
    /// the expired records go, with their markers; a corrupt due file goes,
    /// a corrupt live one, a fresh temporary file and foreign files stay.
    #[test]
    fn purge_over_many_shards_removes_exactly_the_expired() {
        for with_users in [false, true] {
            session2::testing::run(purge_over_many_shards(with_users));
        }
    }

    async fn purge_over_many_shards(with_users: bool) {
        const SESSIONS: usize = 200;
        let (_dir, root, store) = fresh_store().await;
        let now = SystemClock.now();
        let minutes = |n: u64| now.saturating_add(Duration::from_secs(60 * n));
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for i in 0..SESSIONS {
            let key = SessionId::generate().key();
            let deadline = if i % 2 == 0 { minutes(10) } else { minutes(30) };
            let mut record = Record::new(now, deadline, None);
            if with_users && i % 3 != 0 {
                record.user = Some(format!("user-{}", i % 7));
            }
            store.create(&key, &record, now).await.unwrap();
            if i % 2 == 0 {
                expired.push(key);
            } else {
                live.push(key);
            }
        }
        let path = |key: &session2::SessionKey| {
            let hex = key.to_hex();
            root.join(&hex[..2]).join(hex)
        };
        // A corrupt due file and a corrupt live one.
        let corrupt_due = SessionId::generate().key();
        let corrupt_live = SessionId::generate().key();
        for (key, expiry) in [(&corrupt_due, minutes(5)), (&corrupt_live, minutes(40))] {
            let file = path(key);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, b"{\"format\":1").unwrap();
            let handle = std::fs::File::options().write(true).open(&file).unwrap();
            handle.set_modified(expiry.to_system_time()).unwrap();
        }
        // A fresh temporary file (a write in progress) and foreign files.
        let shard = root.join(&live[0].to_hex()[..2]);
        std::fs::write(shard.join(".tmp-in-progress"), b"x").unwrap();
        std::fs::write(shard.join("notes.txt"), b"x").unwrap();
        let shards: std::collections::HashSet<_> = expired
            .iter()
            .map(|key| key.to_hex()[..2].to_owned())
            .collect();
        assert!(shards.len() > 50, "spread over many shards");

        let later = minutes(20);
        assert_eq!(
            store.purge_expired(later).await.unwrap(),
            expired.len() as u64 + 1
        );
        for key in &expired {
            assert!(!path(key).exists());
        }
        assert!(!path(&corrupt_due).exists(), "a corrupt due file is purged");
        assert!(path(&corrupt_live).exists(), "a corrupt live file stays");
        for key in &live {
            assert!(store.load(key, later).await.unwrap().is_some());
        }
        assert!(shard.join(".tmp-in-progress").exists());
        assert!(shard.join("notes.txt").exists());
        assert_eq!(store.count().await.unwrap(), live.len() as u64 + 1);
        // Exactly the live sessions keep their user markers.
        let mut markers = Vec::new();
        if let Ok(users) = std::fs::read_dir(root.join("users")) {
            for user in users {
                for marker in std::fs::read_dir(user.unwrap().path()).unwrap() {
                    markers.push(marker.unwrap().file_name().into_string().unwrap());
                }
            }
        }
        markers.sort();
        let mut expected: Vec<String> = live
            .iter()
            .enumerate()
            .filter(|(i, _)| with_users && (2 * i + 1) % 3 != 0)
            .map(|(_, key)| key.to_hex())
            .collect();
        expected.sort();
        assert_eq!(markers, expected, "markers of purged sessions are removed");
        assert_eq!(store.purge_expired(later).await.unwrap(), 0);
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
        found
    }
}
