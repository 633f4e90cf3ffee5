//! `session2 demo`: the original demo's pages on any store.
//!
//! Routes (a contract the tests rely on):
//! `GET /` (HTML), `GET /api/session` (JSON), `POST /increment`,
//! `POST /increment-fail`, `POST /login` (form field `user`),
//! `POST /logout`, `POST /logout-fail`, `GET /sessions` (the user's
//! sessions, each with a button to end it), `POST /sessions/end` (form
//! field `fingerprint`), `POST /logout-everywhere`.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use session2::{ExclusiveSession, Session, SessionConfig, SessionLayer, SessionManager};

/// The store used when `--store` is not given: embedded and persistent.
const DEFAULT_STORE: &str = "dir:session2-data";
const COUNTER: &str = "counter";
const MAX_USER_LEN: usize = 128;
const STYLE: &str = "body{font-family:sans-serif;max-width:44em;margin:2em auto}form{display:inline-block;margin:.2em}td,th{padding:.2em .6em;text-align:left}";

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// The store URL (memory:, dir:PATH, …); default: a directory under the current one.
    #[arg(long, default_value = DEFAULT_STORE)]
    store: String,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

pub(crate) async fn serve(args: DemoArgs) -> anyhow::Result<()> {
    let store = session2::store::open(&args.store).await?;
    store
        .setup()
        .await
        .with_context(|| format!("failed to set up the store `{}`", args.store))?;
    // Plain HTTP: a Secure cookie would never come back.
    let manager =
        SessionManager::from_arc(store).with_config(SessionConfig::default().with_secure(false))?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("failed to listen on {}:{}", args.host, args.port))?;
    let address: SocketAddr = listener.local_addr()?;
    println!("session2 demo on store {}", args.store);
    println!("cookies are not Secure: the demo serves plain HTTP");
    println!("listening on http://{address}/");
    axum::serve(listener, app(manager))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the demo server failed")?;
    println!("session2 demo stopped");
    Ok(())
}

/// The demo's routes over `manager`.
pub(crate) fn app(manager: SessionManager) -> Router {
    Router::<SessionManager>::new()
        .route("/", get(index))
        .route("/api/session", get(api_session))
        .route("/increment", post(increment))
        .route("/increment-fail", post(increment_fail))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/logout-fail", post(logout_fail))
        .route("/sessions", get(sessions_page))
        .route("/sessions/end", post(end_session))
        .route("/logout-everywhere", post(logout_everywhere))
        .layer(SessionLayer::new(manager.clone()))
        .with_state(manager)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// The session as the demo's JSON API shows it.
#[derive(Debug, Serialize)]
struct SessionView {
    active: bool,
    user: Option<String>,
    counter: i64,
    fingerprint: Option<String>,
}

impl SessionView {
    fn of(session: &Session) -> Self {
        Self {
            active: !session.is_new() && session.has_info(),
            user: session.user(),
            counter: counter(session),
            fingerprint: session.fingerprint(),
        }
    }
}

/// The counter; a value of another type (an old or foreign session) reads as 0.
fn counter(session: &Session) -> i64 {
    session.get::<i64>(COUNTER).ok().flatten().unwrap_or(0)
}

fn bump(session: &Session) -> session2::Result<()> {
    session.insert(COUNTER, counter(session) + 1)
}

async fn api_session(session: Session) -> Json<SessionView> {
    Json(SessionView::of(&session))
}

async fn index(session: Session) -> Html<String> {
    let view = SessionView::of(&session);
    let user = match &view.user {
        Some(user) => format!(
            "<p id=\"user\">Logged in as <strong>{}</strong>.</p>",
            escape(user)
        ),
        None => "<p id=\"user\">Not logged in.</p>".to_owned(),
    };
    let fingerprint = match &view.fingerprint {
        Some(fingerprint) => format!(
            "<p id=\"fingerprint\">Session <code>{}</code></p>",
            escape(fingerprint)
        ),
        None => "<p id=\"fingerprint\">No session stored yet.</p>".to_owned(),
    };
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>session2 demo</title>
<style>{STYLE}</style>
</head>
<body>
<h1>session2 demo</h1>
<p id="counter">Counter is at {counter}.</p>
{user}
{fingerprint}
<form method="post" action="/increment"><button id="increment">Increment</button></form>
<form method="post" action="/increment-fail"><button id="increment-fail">Increment, then fail</button></form>
<form method="post" action="/login"><input id="user-name" name="user" placeholder="user name" required maxlength="{MAX_USER_LEN}"><button id="login">Log in</button></form>
<form method="post" action="/logout"><button id="logout">Log out</button></form>
<form method="post" action="/logout-fail"><button id="logout-fail">Log out, then fail</button></form>
<p><a id="sessions-link" href="/sessions">Your sessions</a></p>
</body>
</html>
"#,
        counter = view.counter,
    ))
}

async fn increment(ExclusiveSession(session): ExclusiveSession) -> Response {
    match bump(&session) {
        Ok(()) => Redirect::to("/").into_response(),
        Err(err) => (StatusCode::PAYLOAD_TOO_LARGE, err.to_string()).into_response(),
    }
}

async fn increment_fail(ExclusiveSession(session): ExclusiveSession) -> Response {
    let _ = bump(&session);
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "incremented, then failed: nothing was saved",
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    user: String,
}

async fn login(session: Session, Form(form): Form<LoginForm>) -> Response {
    let user = form.user.trim();
    if user.is_empty() || user.chars().count() > MAX_USER_LEN {
        return (
            StatusCode::BAD_REQUEST,
            format!("a user name is 1 to {MAX_USER_LEN} characters"),
        )
            .into_response();
    }
    session.set_user(user);
    Redirect::to("/").into_response()
}

async fn logout(session: Session) -> Redirect {
    session.expire();
    Redirect::to("/")
}

async fn logout_fail(session: Session) -> Response {
    session.expire();
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "logged out, then failed: the session survives",
    )
        .into_response()
}

/// `GET /sessions`: the logged-in user's sessions, with "this device" marked.
async fn sessions_page(State(manager): State<SessionManager>, session: Session) -> Response {
    let Some(user) = session.user() else {
        return Redirect::to("/").into_response();
    };
    let sessions = match manager.sessions_of_user(&user).await {
        Ok(sessions) => sessions,
        Err(err) => return store_unavailable(&err),
    };
    let current = session.fingerprint();
    let mut rows = String::new();
    for (key, record) in &sessions {
        let fingerprint = key.fingerprint();
        let this_device = current.as_deref() == Some(fingerprint.as_str());
        rows.push_str(&format!(
            r#"<tr class="session"><td><code>{fingerprint}</code>{marker}</td><td>{created}</td><td>{accessed}</td>
<td><form method="post" action="/sessions/end"><input type="hidden" name="fingerprint" value="{fingerprint}"><button class="end">End</button></form></td></tr>
"#,
            fingerprint = escape(&fingerprint),
            marker = if this_device { r#" <strong class="this-device">this device</strong>"# } else { "" },
            created = escape(&crate::output::format_time(record.created_at)),
            accessed = escape(&crate::output::format_time(record.accessed_at)),
        ));
    }
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Your sessions — session2 demo</title><style>{STYLE}</style></head>
<body>
<h1>Sessions of {user}</h1>
<p id="session-count">{count} active session(s).</p>
<table>
<tr><th>Session</th><th>Created</th><th>Last access</th><th></th></tr>
{rows}</table>
<form method="post" action="/logout-everywhere"><button id="logout-everywhere">Log out everywhere</button></form>
<p><a href="/">Back</a></p>
</body>
</html>
"#,
        user = escape(&user),
        count = sessions.len(),
    ))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct EndForm {
    fingerprint: String,
}

/// `POST /sessions/end`: ends one of the logged-in user's own sessions.
async fn end_session(
    State(manager): State<SessionManager>,
    session: Session,
    Form(form): Form<EndForm>,
) -> Response {
    let Some(user) = session.user() else {
        return (StatusCode::FORBIDDEN, "log in first").into_response();
    };
    let sessions = match manager.sessions_of_user(&user).await {
        Ok(sessions) => sessions,
        Err(err) => return store_unavailable(&err),
    };
    // Only a session of this very user can be ended from here.
    let Some((key, _)) = sessions
        .iter()
        .find(|(key, _)| key.fingerprint() == form.fingerprint)
    else {
        return (StatusCode::NOT_FOUND, "no such session of yours").into_response();
    };
    if session.fingerprint().as_deref() == Some(form.fingerprint.as_str()) {
        session.expire();
        return Redirect::to("/").into_response();
    }
    match manager.delete_session(key).await {
        Ok(_) => Redirect::to("/sessions").into_response(),
        Err(err) => store_unavailable(&err),
    }
}

/// `POST /logout-everywhere`: ends every session of the logged-in user.
async fn logout_everywhere(State(manager): State<SessionManager>, session: Session) -> Response {
    let Some(user) = session.user() else {
        return Redirect::to("/").into_response();
    };
    if let Err(err) = manager.delete_user_sessions(&user).await {
        return store_unavailable(&err);
    }
    session.expire();
    Redirect::to("/").into_response()
}

fn store_unavailable(err: &session2::Error) -> Response {
    tracing::error!(error = %err, "session store unavailable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "sessions are unavailable right now; try again",
    )
        .into_response()
}

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape(r#"<script>"x" & 'y'</script>"#),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}
