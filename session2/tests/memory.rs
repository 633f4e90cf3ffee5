//! The conformance suite against the memory store.

use std::sync::Arc;

use session2::{MemoryStore, SessionStore};

async fn factory() -> Option<Arc<dyn SessionStore>> {
    Some(Arc::new(MemoryStore::new()))
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
