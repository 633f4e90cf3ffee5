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
