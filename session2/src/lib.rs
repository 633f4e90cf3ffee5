//! Persistent, concurrency-safe HTTP sessions with pluggable stores.
//!
//! `session2` keeps a visitor's session (a user id and typed data) in a
//! store that outlives the process and is shared by every worker: memory, a
//! directory of files, and more behind cargo features. It never loses an
//! update when one user's requests run concurrently, never adopts a
//! client-chosen id, and never resurrects a session after logout.
//!
//! # Quick start with axum
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use axum::{Router, routing::post};
//! use session2::{ExclusiveSession, MemoryStore, SessionLayer, SessionManager};
//!
//! async fn increment(ExclusiveSession(session): ExclusiveSession) -> String {
//!     let counter = session.get::<i64>("counter").ok().flatten().unwrap_or(0) + 1;
//!     session.insert("counter", counter).expect("a small value fits");
//!     format!("counter is at {counter}")
//! }
//!
//! let manager = SessionManager::new(MemoryStore::new());
//! let app: Router = Router::new()
//!     .route("/increment", post(increment))
//!     .layer(SessionLayer::new(manager));
//! # }
//! ```
//!
//! # Concepts
//!
//! - [`Session`] is the handle a handler reads and changes; [`SessionManager`]
//!   runs the request lifecycle around it, framework-agnostic; with the
//!   `axum` feature, [`SessionLayer`] and the extractors wire it into tower.
//! - [`SessionStore`] is the store contract: a handful of atomic primitives
//!   (load, create, compare-and-swap, delete, touch, purge, list, count,
//!   find by user) on which merging, locking, expiry and id rotation are
//!   built once.
//! - Stores never see a session id, only its SHA-256 [`SessionKey`].
//!
//! # Cargo features
//!
//! | Name | Description | Default |
//! |---|---|---|
//! | `memory` | [`MemoryStore`], in-process | yes |
//! | `directory` | [`DirectoryStore`], one file per session | yes |
//! | `sqlite` | `SqliteStore`, a table in an SQLite file (bundled SQLite) | no |
//! | `postgres` | `PostgresStore`, a PostgreSQL table | no |
//! | `mysql` | `MySqlStore`, a MySQL or MariaDB table | no |
//! | `redis` | `RedisStore`, Redis or a Redis Cluster | no |
//! | `redb` | `RedbStore`, one redb database file | no |
//! | `axum` | [`SessionLayer`] (tower) and axum extractors | no |
//! | `testing` | the public conformance suite for store crates | no |
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The README's examples, compiled and run as doctests.
#[cfg(all(
    doctest,
    feature = "axum",
    feature = "directory",
    feature = "sqlite",
    feature = "postgres",
    feature = "redis"
))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod clock;
mod config;
mod error;
mod id;
mod manager;
mod record;
mod session;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod util;

#[cfg(feature = "axum")]
mod extract;
#[cfg(feature = "axum")]
mod layer;

pub use crate::clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use crate::config::{CookieLifetime, SameSite, SessionConfig};
pub use crate::error::{Error, Result};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::extract::{ExclusiveSession, SessionRejection};
pub use crate::id::{SessionId, SessionKey};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::layer::{SessionFuture, SessionLayer, SessionService};
pub use crate::manager::{Outcome, RequestSession, SessionManager};
pub use crate::record::{Lease, RECORD_FORMAT, Record};
pub use crate::session::Session;
#[cfg(feature = "directory")]
pub use crate::store::DirectoryStore;
#[cfg(feature = "memory")]
pub use crate::store::MemoryStore;
#[cfg(feature = "mysql")]
pub use crate::store::MySqlStore;
#[cfg(feature = "postgres")]
pub use crate::store::PostgresStore;
#[cfg(feature = "redb")]
pub use crate::store::RedbStore;
#[cfg(feature = "redis")]
pub use crate::store::RedisStore;
#[cfg(feature = "sqlite")]
pub use crate::store::SqliteStore;
pub use crate::store::{Capabilities, CreateOutcome, LeaseOutcome, Page, SessionStore};
