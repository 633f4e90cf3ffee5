//! [`SessionConfig`]: timeouts, limits and cookie attributes, with safe defaults.
//!
//! The defaults follow OWASP ASVS level 2: sessions end after 30 minutes
//! idle or 12 hours in all; the cookie is named `id`, `HttpOnly`, `Secure`,
//! `SameSite=Lax`, `Path=/`, and lives as long as the browser session.
//!
//! ```
//! use std::time::Duration;
//! use session2::{SameSite, SessionConfig};
//!
//! let config = SessionConfig::default()
//!     .with_idle_timeout(Duration::from_secs(15 * 60))
//!     .with_absolute_timeout(None)
//!     .with_same_site(SameSite::Strict)
//!     .with_host_prefix(true);
//! assert_eq!(config.cookie_name(), "__Host-id");
//! ```

use std::time::Duration;

use crate::{Error, Result};

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only on same-site requests.
    Strict,
    /// Sent on same-site requests and top-level navigations (the default).
    Lax,
    /// Sent on every request; requires `Secure`.
    None,
}

/// How long the browser keeps the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieLifetime {
    /// No `Max-Age`: the browser drops the cookie when it closes (the default).
    BrowserSession,
    /// `Max-Age` follows the session's idle deadline and is refreshed with it.
    Persistent,
}

/// Configuration of a [`SessionManager`](crate::SessionManager).
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub(crate) idle_timeout: Duration,
    pub(crate) absolute_timeout: Option<Duration>,
    pub(crate) touch_interval: Duration,
    pub(crate) max_session_size: usize,
    pub(crate) lease_duration: Duration,
    pub(crate) lock_wait: Duration,
    pub(crate) cookie_name: String,
    pub(crate) host_prefix: bool,
    pub(crate) secure: bool,
    pub(crate) same_site: SameSite,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) lifetime: CookieLifetime,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Some(Duration::from_secs(12 * 60 * 60)),
            touch_interval: Duration::from_secs(60),
            max_session_size: 64 * 1024,
            // A waiter outlasts a dead holder's lease instead of failing.
            lease_duration: Duration::from_secs(10),
            lock_wait: Duration::from_secs(15),
            cookie_name: "id".to_owned(),
            host_prefix: false,
            secure: true,
            same_site: SameSite::Lax,
            path: "/".to_owned(),
            domain: None,
            lifetime: CookieLifetime::BrowserSession,
        }
    }
}

impl SessionConfig {
    /// A session ends after this long without a request (default 30 minutes).
    #[must_use]
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// A session ends this long after it was created, however active
    /// (default 12 hours); `None` disables the absolute timeout.
    #[must_use]
    pub fn with_absolute_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.absolute_timeout = timeout;
        self
    }

    /// A request that only reads moves the idle deadline at most once per
    /// this interval (default 1 minute), so reading does not write every time.
    #[must_use]
    pub fn with_touch_interval(mut self, interval: Duration) -> Self {
        self.touch_interval = interval;
        self
    }

    /// The largest encoded session, in bytes (default 64 KiB); an
    /// [`insert`](crate::Session::insert) beyond it fails. Requests of
    /// one session that each fit can together exceed it when their
    /// changes merge: a save that would grow the session past the limit
    /// is refused with a too-large error, saving nothing, and the others
    /// are kept.
    #[must_use]
    pub fn with_max_session_size(mut self, bytes: usize) -> Self {
        self.max_session_size = bytes;
        self
    }

    /// How long an exclusive session's lease binds if its holder never
    /// releases it, say because its process died (default 10 seconds). A
    /// handler that runs longer loses its exclusivity: its changes are then
    /// merged like a plain session's.
    #[must_use]
    pub fn with_lease_duration(mut self, duration: Duration) -> Self {
        self.lease_duration = duration;
        self
    }

    /// How long an exclusive session waits for another holder's lease before
    /// giving up with a lock-timeout error (default 15 seconds, longer than
    /// the default lease, so a lease left by a crashed process is waited out).
    #[must_use]
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The cookie's name (default `id`).
    #[must_use]
    pub fn with_cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie_name = name.into();
        self
    }

    /// Prefixes the cookie name with `__Host-`, which browsers accept only
    /// with `Secure`, `Path=/` and no `Domain`; [`SessionConfig::validate`]
    /// checks those.
    #[must_use]
    pub fn with_host_prefix(mut self, enabled: bool) -> Self {
        self.host_prefix = enabled;
        self
    }

    /// Whether the cookie carries `Secure` (default `true`; turn off only for
    /// plain-HTTP development).
    #[must_use]
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// The cookie's `SameSite` attribute (default `Lax`).
    #[must_use]
    pub fn with_same_site(mut self, same_site: SameSite) -> Self {
        self.same_site = same_site;
        self
    }

    /// The cookie's `Path` (default `/`).
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// The cookie's `Domain` (default none: the exact host only).
    #[must_use]
    pub fn with_domain(mut self, domain: Option<String>) -> Self {
        self.domain = domain;
        self
    }

    /// Browser-session or persistent cookies (default browser-session).
    #[must_use]
    pub fn with_cookie_lifetime(mut self, lifetime: CookieLifetime) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The cookie name as sent, with the `__Host-` prefix if enabled.
    pub fn cookie_name(&self) -> String {
        if self.host_prefix {
            format!("__Host-{}", self.cookie_name)
        } else {
            self.cookie_name.clone()
        }
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The absolute timeout, if any.
    pub fn absolute_timeout(&self) -> Option<Duration> {
        self.absolute_timeout
    }

    /// Checks the combination of settings; the manager calls it on creation.
    pub fn validate(&self) -> Result<()> {
        let name_ok = !self.cookie_name.is_empty()
            && self
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !name_ok {
            return Err(Error::config(format_args!(
                "cookie name `{}` is not a valid cookie token",
                self.cookie_name.escape_default()
            )));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::config("idle timeout must be above zero"));
        }
        if self.host_prefix && (!self.secure || self.path != "/" || self.domain.is_some()) {
            return Err(Error::config(
                "the `__Host-` prefix requires `Secure`, `Path=/` and no `Domain`",
            ));
        }
        if self.same_site == SameSite::None && !self.secure {
            return Err(Error::config("`SameSite=None` requires `Secure`"));
        }
        if self.max_session_size < 64 {
            return Err(Error::config(
                "maximum session size must be at least 64 bytes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe_and_valid() {
        let config = SessionConfig::default();
        config.validate().unwrap();
        assert!(config.secure);
        assert_eq!(config.same_site, SameSite::Lax);
        assert_eq!(config.idle_timeout, Duration::from_secs(1800));
        assert_eq!(config.absolute_timeout, Some(Duration::from_secs(43200)));
        assert_eq!(config.cookie_name(), "id");
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let bad = [
            SessionConfig::default()
                .with_host_prefix(true)
                .with_secure(false),
            SessionConfig::default()
                .with_host_prefix(true)
                .with_domain(Some("example.com".into())),
            SessionConfig::default()
                .with_host_prefix(true)
                .with_path("/app"),
            SessionConfig::default()
                .with_same_site(SameSite::None)
                .with_secure(false),
            SessionConfig::default().with_cookie_name("a b"),
            SessionConfig::default().with_cookie_name(""),
            SessionConfig::default().with_idle_timeout(Duration::ZERO),
        ];
        for config in bad {
            assert!(config.validate().unwrap_err().is_config(), "{config:?}");
        }
    }
}
