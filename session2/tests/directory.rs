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
