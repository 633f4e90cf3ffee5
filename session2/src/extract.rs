//! axum extractors: [`Session`] (merging) and [`ExclusiveSession`] (locked).
//!
//! Both read the [`RequestSession`](crate::RequestSession) that
//! [`SessionLayer`](crate::SessionLayer) put into the request; extracting
//! is what loads the session, so a handler without either extractor costs
//! no store access. Failures become a [`SessionRejection`]: 503 when the
//! store is unreachable or the lock is busy, 500 with a hint when the layer
//! is missing.
//!
//! ```
//! use session2::{ExclusiveSession, Session};
//!
//! // Read-modify-write: one request at a time per session.
//! async fn increment(ExclusiveSession(session): ExclusiveSession) {
//!     let n = session.get::<i64>("n").ok().flatten().unwrap_or(0);
//!     let _ = session.insert("n", n + 1);
//! }
//!
//! // Independent keys: concurrent requests merge.
//! async fn set_theme(session: Session) {
//!     let _ = session.insert("theme", "dark");
//! }
//! ```

use std::ops::Deref;

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode};

use crate::layer::RequestSessionHandle;
use crate::{Error, Session};

/// A session whose lease is held from extraction until the response is
/// saved: no other [`ExclusiveSession`] of the same session runs meanwhile,
/// in this process or any other.
#[derive(Clone, Debug)]
pub struct ExclusiveSession(pub Session);

impl Deref for ExclusiveSession {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.0
    }
}

/// Why a session could not be extracted.
#[derive(Debug)]
pub struct SessionRejection {
    error: Error,
}

impl SessionRejection {
    /// The underlying error.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The status the rejection answers with.
    pub fn status(&self) -> StatusCode {
        if self.error.is_transient() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl std::fmt::Display for SessionRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SessionRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl IntoResponse for SessionRejection {
    fn into_response(self) -> Response {
        let status = self.status();
        if self.error.is_usage() {
            tracing::error!(error = %self.error, "session extractor misused");
        } else {
            tracing::warn!(error = %self.error, "session unavailable");
        }
        let body = if self.error.is_usage() {
            self.error.to_string()
        } else if self.error.is_lock_timeout() {
            "the session is busy with another request; try again".to_owned()
        } else {
            "sessions are unavailable right now; try again".to_owned()
        };
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn handle(parts: &Parts) -> Result<RequestSessionHandle, SessionRejection> {
    parts
        .extensions
        .get::<RequestSessionHandle>()
        .cloned()
        .ok_or_else(|| SessionRejection {
            error: Error::usage(
                "session layer is missing: is `SessionLayer` installed on this route?",
            ),
        })
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = SessionRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let handle = handle(parts)?;
        handle
            .0
            .session()
            .await
            .map_err(|error| SessionRejection { error })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ExclusiveSession {
    type Rejection = SessionRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let handle = handle(parts)?;
        handle
            .0
            .exclusive_session()
            .await
            .map(ExclusiveSession)
            .map_err(|error| SessionRejection { error })
    }
}
