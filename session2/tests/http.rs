//! HTTP tests of `SessionLayer` and the extractors: an axum app on a real
//! loopback socket, driven by a real HTTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use reqwest::header::SET_COOKIE;
use session2::{
    CookieLifetime, DirectoryStore, ExclusiveSession, MemoryStore, Session, SessionConfig,
    SessionLayer, SessionManager, SessionStore,
};

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The body of a `GET`, as text.
async fn text(client: &reqwest::Client, url: String) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

fn plain_http(store: impl SessionStore) -> SessionManager {
    SessionManager::new(store)
        .with_config(SessionConfig::default().with_secure(false))
        .unwrap()
}

async fn set_key(session: Session, Path((key, value)): Path<(String, i64)>) -> StatusCode {
    session.insert(key, value).unwrap();
    StatusCode::NO_CONTENT
}

async fn get_key(session: Session, Path(key): Path<String>) -> String {
    session
        .get::<i64>(&key)
        .unwrap()
        .map_or_else(|| "none".to_owned(), |v| v.to_string())
}

async fn keys(session: Session) -> String {
    session.keys().join(",")
}

async fn panic_after_insert(ExclusiveSession(session): ExclusiveSession) -> StatusCode {
    session.insert("panicked", 1).unwrap();
    panic!("handler panic (expected by the test)");
}

fn app(manager: SessionManager) -> Router {
    Router::new()
        .route("/set/{key}/{value}", post(set_key))
        .route("/get/{key}", get(get_key))
        .route("/keys", get(keys))
        .route("/panic", post(panic_after_insert))
        .route("/untouched", get(|| async { "no session here" }))
        .layer(SessionLayer::new(manager))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_plain_writes_to_different_keys_lose_none() {
    let address = serve(app(plain_http(MemoryStore::new()))).await;
    let client = client();
    client
        .post(format!("http://{address}/set/start/0"))
        .send()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .post(format!("http://{address}/set/k{n}/{n}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let keys = text(&client, format!("http://{address}/keys")).await;
    assert_eq!(keys.split(',').count(), 65, "{keys}");
    for n in 0..64 {
        let value = text(&client, format!("http://{address}/get/k{n}")).await;
        assert_eq!(value, n.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_saves_nothing_and_frees_the_lease() {
    let manager = plain_http(MemoryStore::new())
        .with_config(
            SessionConfig::default()
                .with_secure(false)
                .with_lock_wait(Duration::from_millis(500)),
        )
        .unwrap();
    let app = app(manager).layer(axum::middleware::from_fn(catch_panic));
    let address = serve(app).await;
    let client = client();
    client
        .post(format!("http://{address}/set/n/1"))
        .send()
        .await
        .unwrap();
    let panicked = client
        .post(format!("http://{address}/panic"))
        .send()
        .await
        .unwrap();
    assert_eq!(panicked.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(panicked.headers().get(SET_COOKIE).is_none());
    let value = text(&client, format!("http://{address}/get/panicked")).await;
    assert_eq!(value, "none");
    // The lease was released: another exclusive request does not time out.
    let again = client
        .post(format!("http://{address}/panic"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "not a 503 lock timeout"
    );
}

/// Turns a panic into a 500, as `tower-http`'s `CatchPanic` does, without
/// the extra dependency.
async fn catch_panic(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_never_touch_the_store() {
    let dir = tempfile::tempdir().unwrap();
    // Never set up: any store access would fail with a 503.
    let store = DirectoryStore::new(dir.path().join("missing"));
    let address = serve(app(plain_http(store))).await;
    let client = client();
    for path in ["/untouched", "/keys", "/get/x"] {
        let response = client
            .get(format!("http://{address}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.headers().get(SET_COOKIE).is_none());
    }
    let with_cookie = reqwest::Client::new()
        .get(format!("http://{address}/untouched"))
        .header("cookie", "id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(
        with_cookie.status(),
        StatusCode::OK,
        "a handler without the extractor never loads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_answers_503_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sessions");
    let store = DirectoryStore::new(&root);
    store.setup().await.unwrap();
    let address = serve(app(plain_http(store.clone()))).await;
    let client = client();
    assert_eq!(
        client
            .post(format!("http://{address}/set/n/1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    // The store goes away mid-use.
    let moved = dir.path().join("moved-away");
    std::fs::rename(&root, &moved).unwrap();
    let down = client
        .post(format!("http://{address}/set/n/2"))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.headers()["retry-after"], "1");
    let fresh = reqwest::Client::new()
        .post(format!("http://{address}/set/n/3"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fresh.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a new session cannot be created either"
    );
    // Back again: the same application serves, and the old session is intact.
    std::fs::rename(&moved, &root).unwrap();
    let value = text(&client, format!("http://{address}/get/n")).await;
    assert_eq!(value, "1");
    assert_eq!(
        client
            .post(format!("http://{address}/set/n/4"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    let value = text(&client, format!("http://{address}/get/n")).await;
    assert_eq!(value, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_layer_is_a_500_with_a_hint() {
    let address = serve(Router::new().route("/keys", get(keys))).await;
    let response = reqwest::get(format!("http://{address}/keys"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = response.text().await.unwrap();
    assert!(body.contains("is `SessionLayer` installed"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_attributes_follow_the_configuration() {
    let manager = SessionManager::new(MemoryStore::new())
        .with_config(
            SessionConfig::default()
                .with_host_prefix(true)
                .with_cookie_lifetime(CookieLifetime::Persistent)
                .with_idle_timeout(Duration::from_secs(600)),
        )
        .unwrap();
    let address = serve(app(manager)).await;
    let response = reqwest::Client::new()
        .post(format!("http://{address}/set/n/1"))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-id="), "{cookie}");
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=600",
    ] {
        assert!(
            cookie.contains(attribute),
            "{attribute} missing from {cookie}"
        );
    }
    assert!(!cookie.contains("Domain"));
    // The cookie among others, and a second Cookie header, are both understood.
    let pair = cookie.split(';').next().unwrap();
    let value = reqwest::Client::new()
        .get(format!("http://{address}/get/n"))
        .header("cookie", "theme=dark; other=1")
        .header("cookie", format!("lang=en; {pair}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(value, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_flags_let_an_application_refuse_a_store() {
    let memory: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    let directory: Arc<dyn SessionStore> = Arc::new(DirectoryStore::new("unused"));
    assert!(!memory.capabilities().is_multiprocess_safe);
    assert!(memory.capabilities().is_thread_safe);
    assert!(directory.capabilities().is_multiprocess_safe);
}

/// The layer around the whole router, not around each route, serves
/// sessions the same; a path no route matches passes through untouched.
#[tokio::test]
async fn the_layer_may_wrap_the_whole_router() {
    use tower_layer::Layer as _;

    let routes = Router::new()
        .route("/set/{key}/{value}", post(set_key))
        .route("/get/{key}", get(get_key));
    let app = SessionLayer::new(plain_http(MemoryStore::new())).layer(routes);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(app),
        )
        .await
        .unwrap()
    });
    let client = client();
    let set = client
        .post(format!("http://{address}/set/n/7"))
        .send()
        .await
        .unwrap();
    assert!(set.headers().get(SET_COOKIE).is_some());
    assert_eq!(text(&client, format!("http://{address}/get/n")).await, "7");
    let missing = client
        .get(format!("http://{address}/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.headers().get(SET_COOKIE).is_none());
}
