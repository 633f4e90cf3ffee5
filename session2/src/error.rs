//! The one error type of the library: what failed, the kind of failure, and its source.
//!
//! Callers branch on the kind with predicates ([`Error::is_backend`],
//! [`Error::is_decode`], …) rather than on a public enum, so new kinds can be
//! added without breaking anyone. Messages are lowercase, carry context
//! ("failed to load session from `directory`: …") and keep their source.

use std::fmt;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a session store, the session manager or a session handle.
///
/// ```
/// let err = session2::Error::backend("redis", "connection refused");
/// assert!(err.is_backend());
/// assert_eq!(err.to_string(), "session store `redis` failed: connection refused");
/// ```
pub struct Error {
    kind: Kind,
    message: String,
    source: Option<Source>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Backend,
    Decode,
    TooLarge,
    LockTimeout,
    Config,
    Unsupported,
    Usage,
}

impl Error {
    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The store's server or file system failed or could not be reached.
    pub fn backend(store: &str, detail: impl fmt::Display) -> Self {
        Self::new(
            Kind::Backend,
            format!("session store `{store}` failed: {detail}"),
        )
    }

    /// The same kind and message, without the source: for each of several
    /// callers one failure reaches (the batching stores' writers, a batch
    /// of saves of one session).
    pub(crate) fn duplicate(&self) -> Self {
        Self::new(self.kind, self.message.clone())
    }

    /// Like [`Error::backend`], keeping the underlying error as the source.
    pub fn backend_source(
        store: &str,
        context: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let mut err = Self::new(
            Kind::Backend,
            format!("session store `{store}` failed to {context}: {source}"),
        );
        err.source = Some(Box::new(source));
        err
    }

    /// A stored record or a session value could not be decoded.
    pub fn decode(detail: impl fmt::Display) -> Self {
        Self::new(
            Kind::Decode,
            format!("failed to decode session data: {detail}"),
        )
    }

    /// The encoded session would exceed the configured size limit.
    pub fn too_large(size: usize, limit: usize) -> Self {
        Self::new(
            Kind::TooLarge,
            format!("session would be {size} bytes, above the limit of {limit} bytes"),
        )
    }

    /// An exclusive session could not take the session's lease in time.
    pub fn lock_timeout(waited: std::time::Duration) -> Self {
        Self::new(
            Kind::LockTimeout,
            format!(
                "session is locked by another request; gave up after {} ms",
                waited.as_millis()
            ),
        )
    }

    /// The configuration or a store URL is invalid.
    pub fn config(detail: impl fmt::Display) -> Self {
        Self::new(
            Kind::Config,
            format!("invalid session configuration: {detail}"),
        )
    }

    /// A store kind that was not compiled in; names the cargo feature to enable.
    pub fn unsupported(scheme: &str, feature: &str) -> Self {
        Self::new(
            Kind::Unsupported,
            format!(
                "store `{scheme}` is not available: build session2 with the cargo feature `{feature}`"
            ),
        )
    }

    /// The library was used in a way it does not allow (a programming error).
    pub fn usage(detail: impl fmt::Display) -> Self {
        Self::new(Kind::Usage, detail.to_string())
    }

    /// Adds context in front of the message: "`context`: message".
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The store's server or file system failed or could not be reached.
    pub fn is_backend(&self) -> bool {
        self.kind == Kind::Backend
    }

    /// Stored data could not be decoded (a corrupt record or a value of another type).
    pub fn is_decode(&self) -> bool {
        self.kind == Kind::Decode
    }

    /// The session would exceed its size limit.
    pub fn is_too_large(&self) -> bool {
        self.kind == Kind::TooLarge
    }

    /// Waiting for an exclusive session's lease took too long.
    pub fn is_lock_timeout(&self) -> bool {
        self.kind == Kind::LockTimeout
    }

    /// The configuration or a store URL is invalid.
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }

    /// The requested store was not compiled in.
    pub fn is_unsupported(&self) -> bool {
        self.kind == Kind::Unsupported
    }

    /// The library was misused (for example, the session layer is missing).
    pub fn is_usage(&self) -> bool {
        self.kind == Kind::Usage
    }

    /// Whether retrying later may succeed (an unreachable store, a held lock).
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, Kind::Backend | Kind::LockTimeout)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_source_keeps_the_source_and_context() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let err = Error::backend_source("directory", "load session", io);
        assert!(err.is_backend() && err.is_transient());
        assert_eq!(
            err.to_string(),
            "session store `directory` failed to load session: permission denied"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn unsupported_names_the_feature() {
        let err = Error::unsupported("redis", "redis");
        assert!(err.is_unsupported());
        assert!(err.to_string().contains("cargo feature `redis`"));
    }
}
