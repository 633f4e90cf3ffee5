//! The HTTP half of the outage tests, shared by every server store: an axum
//! app over the store, requests while the server is down, and after.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use session2::{Session, SessionConfig, SessionLayer, SessionManager, SessionStore};

/// A test's own throwaway server, stopped and started again mid-test.
pub trait Outage {
    /// Stops the server at once, as a crash or a network cut would.
    fn stop(&mut self);
    /// Starts it again on the same port and data.
    fn start(&mut self);
}

/// While the server is down, requests that need the session answer 503 and
/// nothing panics; once it is back, the same application (no restart)
/// serves again and the session stored before the outage is intact.
pub async fn requests_get_503_then_succeed(store: Arc<dyn SessionStore>, server: &mut dyn Outage) {
    let manager = SessionManager::from_arc(store)
        .with_config(SessionConfig::default().with_secure(false))
        .unwrap();
    let app = Router::new()
        .route(
            "/set/{value}",
            post(|session: Session, axum::extract::Path(value): axum::extract::Path<i64>| async move {
                session.insert("n", value).unwrap();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/get",
            get(|session: Session| async move { session.get::<i64>("n").unwrap().unwrap_or(-1).to_string() }),
        )
        .layer(SessionLayer::new(manager));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let set = |value: i64| client.post(format!("http://{address}/set/{value}")).send();
    assert_eq!(set(1).await.unwrap().status(), StatusCode::NO_CONTENT);

    server.stop();
    let in_flight: Vec<_> = (2..6).map(|value| tokio::spawn(set(value))).collect();
    for request in in_flight {
        assert_eq!(
            request.await.unwrap().unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    server.start();
    // Connections the server dropped fail once each (503); then the store
    // reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let read = client
            .get(format!("http://{address}/get"))
            .send()
            .await
            .unwrap();
        if read.status() == StatusCode::OK {
            break read.text().await.unwrap();
        }
        assert_eq!(read.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "the application never served again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value, "1", "the session stored before the outage is intact");
    assert_eq!(set(7).await.unwrap().status(), StatusCode::NO_CONTENT);
}
