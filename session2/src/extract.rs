//! axum extractors (in progress).
