//! The conformance suite against the memory store.

use std::sync::Arc;

use session2::{MemoryStore, SessionStore};

async fn factory() -> Option<Arc<dyn SessionStore>> {
    Some(Arc::new(MemoryStore::new()))
}

session2::conformance_tests!(factory);
