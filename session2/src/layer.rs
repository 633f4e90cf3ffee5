//! [`SessionLayer`] and [`SessionService`]: the tower middleware around the
//! [`SessionManager`] lifecycle.
//!
//! For every request the service reads the `Cookie` headers, puts a
//! [`RequestSession`] into the request's extensions (where the
//! [`Session`](crate::Session) and [`ExclusiveSession`](crate::ExclusiveSession)
//! extractors find it), runs the inner service and then finishes the
//! session from the response's status:
//!
//! - a response below 500 saves the changes and may carry a `Set-Cookie`;
//! - a 5xx response, an error from the inner service or a panic saves
//!   nothing (an exclusive session's lease is released, and the panic then
//!   continues to unwind);
//! - if saving fails because the store is unreachable, the response becomes
//!   a 503, since the handler's changes were not kept.
//!
//! Nothing touches the store unless a handler extracts the session.
//!
//! ```
//! use axum::{Router, routing::get};
//! use session2::{MemoryStore, Session, SessionLayer, SessionManager};
//!
//! async fn visits(session: Session) -> String {
//!     let visits = session.get::<u64>("visits").ok().flatten().unwrap_or(0) + 1;
//!     session.insert("visits", visits).expect("a number fits");
//!     format!("visit number {visits}")
//! }
//!
//! let app: Router = Router::new()
//!     .route("/", get(visits))
//!     .layer(SessionLayer::new(SessionManager::new(MemoryStore::new())));
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::{Outcome, RequestSession, SessionManager};

/// Installs session handling on every request of the wrapped service.
#[derive(Clone, Debug)]
pub struct SessionLayer {
    manager: SessionManager,
}

impl SessionLayer {
    /// A layer running `manager`'s lifecycle.
    pub fn new(manager: SessionManager) -> Self {
        Self { manager }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            manager: self.manager.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    manager: SessionManager,
}

/// What the layer leaves in the request's extensions for the extractors.
#[derive(Clone, Debug)]
pub(crate) struct RequestSessionHandle(pub(crate) Arc<RequestSession>);

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let cookies = request
            .headers()
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok());
        let session = Arc::new(self.manager.start_from_headers(cookies));
        request
            .extensions_mut()
            .insert(RequestSessionHandle(Arc::clone(&session)));
        // The clone is not necessarily ready; keep the one that was polled.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = match AssertUnwindSafe(inner.call(request)).catch_unwind().await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => {
                    finish_failed(&session).await;
                    return Err(err);
                }
                Err(panic) => {
                    finish_failed(&session).await;
                    std::panic::resume_unwind(panic);
                }
            };
            finish(&session, response).await
        })
    }
}

async fn finish_failed(session: &RequestSession) {
    if let Err(err) = session.finish(Outcome::Failure).await {
        tracing::warn!(error = %err, "failed to release the session after a failed request");
    }
}

async fn finish<ResBody: Default, E>(
    session: &RequestSession,
    mut response: Response<ResBody>,
) -> Result<Response<ResBody>, E> {
    match session
        .finish(Outcome::from_status(response.status().as_u16()))
        .await
    {
        Ok(None) => Ok(response),
        Ok(Some(cookie)) => {
            match HeaderValue::try_from(cookie) {
                Ok(value) => {
                    response.headers_mut().append(SET_COOKIE, value);
                }
                Err(err) => {
                    tracing::error!(error = %err, "session cookie is not a valid header value")
                }
            }
            Ok(response)
        }
        Err(err) => {
            tracing::error!(error = %err, "session not saved; answering 503");
            let mut unavailable = Response::new(ResBody::default());
            *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            unavailable
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(unavailable)
        }
    }
}
