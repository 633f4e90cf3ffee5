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
//!
//! `Router::layer` gives each route its own copy of the layer, and axum
//! boxes each such route again: every request then goes through two boxed
//! routes. Wrapping the whole router once spares the second, about 600 of
//! the 13,800 instructions an anonymous request costs in the benchmark's
//! server (`BENCHMARKS.md`); requests no route matches then pass through
//! the layer too, without touching the store:
//!
//! ```
//! use axum::{Router, ServiceExt, extract::Request, routing::get};
//! use session2::{MemoryStore, SessionLayer, SessionManager};
//! use tower_layer::Layer as _;
//!
//! # async fn run() -> std::io::Result<()> {
//! let router: Router = Router::new().route("/", get(|| async { "hello" }));
//! let app = SessionLayer::new(SessionManager::new(MemoryStore::new())).layer(router);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, ServiceExt::<Request>::into_make_service(app)).await
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::FutureExt as _;
use futures_util::future::CatchUnwind;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = SessionFuture<S::Future, ResBody, S::Error>;

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
        // Called here, on the service `poll_ready` readied, rather than on a
        // clone inside the future: cloning a boxed axum route allocates.
        let state = match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(inner) => State::Running {
                inner: AssertUnwindSafe(inner).catch_unwind(),
                session,
            },
            Err(panic) => State::Finishing {
                finish: Box::pin(async move {
                    finish_failed(&session).await;
                    std::panic::resume_unwind(panic)
                }),
            },
        };
        SessionFuture { state }
    }
}

type BoxedFinish<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

/// The session's save after a response below 500: what
/// [`RequestSession::finish`] returns, the `Set-Cookie` value if any.
type BoxedSave = Pin<Box<dyn Future<Output = crate::Result<Option<String>>> + Send>>;

pin_project! {
    /// The future of one request through [`SessionService`]: the inner
    /// service's response, then the session's save.
    ///
    /// A request that needs nothing of the store at its end (its handler
    /// never loaded the session, or only read a plain session whose touch
    /// is not due) completes with the inner response and no further work;
    /// only a request with something to save, touch or release allocates
    /// the save's future. The response waits for the save here, outside
    /// that allocation, which keeps it small enough for the allocator's
    /// per-thread cache.
    pub struct SessionFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProjection]
    enum State<F, B, E> {
        Running {
            #[pin]
            inner: CatchUnwind<AssertUnwindSafe<F>>,
            session: Arc<RequestSession>,
        },
        Saving {
            save: BoxedSave,
            response: Response<B>,
        },
        Finishing {
            finish: BoxedFinish<B, E>,
        },
        Done,
    }
}

impl<F, B, E> fmt::Debug for SessionFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for SessionFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default + Send + 'static,
    E: Send + 'static,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProjection::Running { inner, session } => {
                    let answer = ready!(inner.poll(cx));
                    if session.finish_without_store() {
                        state.set(State::Done);
                        return Poll::Ready(match answer {
                            Ok(answer) => answer,
                            Err(panic) => std::panic::resume_unwind(panic),
                        });
                    }
                    let session = Arc::clone(session);
                    let next = match answer {
                        Ok(Ok(response)) => {
                            let outcome = Outcome::from_status(response.status().as_u16());
                            State::Saving {
                                save: Box::pin(async move { session.finish(outcome).await }),
                                response,
                            }
                        }
                        Ok(Err(err)) => State::Finishing {
                            finish: Box::pin(async move {
                                finish_failed(&session).await;
                                Err(err)
                            }),
                        },
                        Err(panic) => State::Finishing {
                            finish: Box::pin(async move {
                                finish_failed(&session).await;
                                std::panic::resume_unwind(panic)
                            }),
                        },
                    };
                    state.set(next);
                }
                StateProjection::Saving { save, response } => {
                    let saved = ready!(save.as_mut().poll(cx));
                    let response = std::mem::take(response);
                    state.set(State::Done);
                    return Poll::Ready(Ok(respond(response, saved)));
                }
                StateProjection::Finishing { finish } => {
                    let output = ready!(finish.as_mut().poll(cx));
                    state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProjection::Done => panic!("`SessionFuture` polled after it completed"),
            }
        }
    }
}

async fn finish_failed(session: &RequestSession) {
    if let Err(err) = session.finish(Outcome::Failure).await {
        tracing::warn!(error = %err, "failed to release the session after a failed request");
    }
}

/// The response after the session's save: with its `Set-Cookie`, or a 503
/// if the save failed.
fn respond<ResBody: Default>(
    mut response: Response<ResBody>,
    saved: crate::Result<Option<String>>,
) -> Response<ResBody> {
    match saved {
        Ok(None) => response,
        Ok(Some(cookie)) => {
            match HeaderValue::try_from(cookie) {
                Ok(value) => {
                    response.headers_mut().append(SET_COOKIE, value);
                }
                Err(err) => {
                    tracing::error!(error = %err, "session cookie is not a valid header value")
                }
            }
            response
        }
        Err(err) => {
            tracing::error!(error = %err, "session not saved; answering 503");
            let mut unavailable = Response::new(ResBody::default());
            *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            unavailable
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::MemoryStore;

    /// A service that counts its clones; `call` runs `respond` on the request.
    struct Counted<R> {
        clones: Arc<AtomicUsize>,
        respond: R,
    }

    impl<R: Clone> Clone for Counted<R> {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                clones: Arc::clone(&self.clones),
                respond: self.respond.clone(),
            }
        }
    }

    impl<R, F> Service<Request<()>> for Counted<R>
    where
        R: FnMut(Request<()>) -> F,
        F: Future<Output = Result<Response<String>, &'static str>> + Send + 'static,
    {
        type Response = Response<String>;
        type Error = &'static str;
        type Future = F;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<()>) -> F {
            (self.respond)(request)
        }
    }

    fn service<R>(respond: R) -> (SessionService<Counted<R>>, Arc<AtomicUsize>) {
        let clones = Arc::new(AtomicUsize::new(0));
        let manager = SessionManager::new(MemoryStore::new());
        let inner = Counted {
            clones: Arc::clone(&clones),
            respond,
        };
        (SessionLayer::new(manager).layer(inner), clones)
    }

    async fn send<S>(service: &mut S, cookie: Option<&str>) -> Result<Response<String>, S::Error>
    where
        S: Service<Request<()>, Response = Response<String>>,
    {
        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
        let mut request = Request::new(());
        if let Some(cookie) = cookie {
            request
                .headers_mut()
                .insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
        }
        service.call(request).await
    }

    /// The request's session if the handler is to use it: the tests send a
    /// cookie (any cookie) to say so.
    fn used_session(request: &Request<()>) -> Option<Arc<RequestSession>> {
        let handle = request.extensions().get::<RequestSessionHandle>()?;
        request
            .headers()
            .contains_key(COOKIE)
            .then(|| Arc::clone(&handle.0))
    }

    #[tokio::test]
    async fn requests_never_clone_the_inner_service() {
        let (mut service, clones) = service(|request: Request<()>| {
            let used = used_session(&request);
            async move {
                let Some(used) = used else {
                    return Ok(Response::new(String::new()));
                };
                let session = used.session().await.unwrap();
                let visits = session.get::<u64>("visits").unwrap().unwrap_or(0);
                session.insert("visits", visits + 1).unwrap();
                Ok(Response::new(visits.to_string()))
            }
        });
        let anonymous = send(&mut service, None).await.unwrap();
        assert!(anonymous.headers().get(SET_COOKIE).is_none());
        // A cookie of another application marks the requests that use the session.
        let created = send(&mut service, Some("other=1")).await.unwrap();
        let cookie = created.headers()[SET_COOKIE].to_str().unwrap();
        let pair = format!("other=1; {}", cookie.split(';').next().unwrap());
        let again = send(&mut service, Some(&pair)).await.unwrap();
        assert_eq!(again.body(), "1");
        assert_eq!(clones.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_panic_in_the_inner_call_surfaces_when_the_future_is_polled() {
        let (mut service, _) = service(|_: Request<()>| -> std::future::Ready<_> {
            panic!("inner call panic (expected by the test)")
        });
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let future = service.call(Request::new(()));
        assert!(AssertUnwindSafe(future).catch_unwind().await.is_err());
    }

    #[tokio::test]
    async fn an_inner_error_passes_through_and_saves_nothing() {
        let (mut service, _) = service(|request: Request<()>| {
            let used = used_session(&request);
            async move {
                if let Some(used) = used {
                    used.session().await.unwrap().insert("lost", 1).unwrap();
                }
                Err::<Response<String>, _>("inner failure")
            }
        });
        for cookie in [None, Some("other=1")] {
            let answer = send(&mut service, cookie).await;
            assert_eq!(answer.unwrap_err(), "inner failure", "{cookie:?}");
        }
        assert_eq!(service.manager.store().count().await.unwrap(), 0);
    }
}
