//! Session ids and the hashed keys that stores use in their place.
//!
//! A [`SessionId`] is 192 bits from the operating system's CSPRNG, written as
//! 32 characters of URL-safe base64. [`SessionId::parse`] accepts exactly that
//! format and nothing else, so an empty, oversized, path-like or otherwise
//! forged cookie value never reaches a store, a file name or a log line.
//!
//! Stores never see the id itself: they key records by its SHA-256 hash, the
//! [`SessionKey`]. A leaked table, dump or directory listing therefore gives
//! no live session id, and lookups compare hashes, not the secret. Logs show
//! [`SessionKey::fingerprint`], a short prefix of the hash.
//!
//! ```
//! use session2::SessionId;
//!
//! let id = SessionId::generate();
//! let text = id.to_string();
//! assert_eq!(SessionId::parse(&text), Some(id.clone()));
//! assert_eq!(SessionId::parse("../../etc/passwd"), None);
//! assert_eq!(id.key().to_hex().len(), 64);
//! ```

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

const ID_BYTES: usize = 24;
/// Length of a session id's text form: 24 bytes in base64 without padding.
const ID_TEXT_LEN: usize = 32;
const FINGERPRINT_LEN: usize = 12;

/// A session id as sent in the cookie: a secret bearer token.
///
/// Its `Debug` output is redacted; its `Display` output is the cookie value
/// and must only ever go into a `Set-Cookie` header.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId([u8; ID_BYTES]);

impl SessionId {
    /// A new id from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Panics only if the operating system cannot provide random bytes, in
    /// which case no secure session id can be made at all.
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        Self(bytes)
    }

    /// Parses a cookie value; `None` unless it is exactly the format
    /// [`SessionId::generate`] produces (32 URL-safe base64 characters).
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != ID_TEXT_LEN {
            return None;
        }
        // The decoder takes only the URL-safe alphabet, without padding; 32
        // characters are exactly 24 bytes, with no spare bits to forge.
        let mut bytes = [0u8; ID_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(ID_BYTES) => Some(Self(bytes)),
            _ => None,
        }
    }

    /// The hashed key stores file this session under.
    pub fn key(&self) -> SessionKey {
        SessionKey(Sha256::digest(self.0).into())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.key().fingerprint())
    }
}

/// The SHA-256 hash of a [`SessionId`]: the only key a store ever sees.
///
/// Ordered by its bytes, which is also the order of its hex text, so stores
/// can page through keys with either.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// The key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters: safe as a file name or a text column.
    pub fn to_hex(&self) -> String {
        Self::hex_text(&self.hex_bytes()).to_owned()
    }

    /// [`to_hex`](Self::to_hex) without the allocation, for keys that are
    /// built on every request (a Redis key name, a command argument).
    pub(crate) fn hex_bytes(&self) -> [u8; 64] {
        let mut hex = [0; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        hex
    }

    /// The text of [`hex_bytes`](Self::hex_bytes).
    pub(crate) fn hex_text(hex: &[u8; 64]) -> &str {
        std::str::from_utf8(hex).expect("every byte comes from HEX, which is ASCII")
    }

    /// Parses 64 hex characters (either case); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(bytes))
    }

    /// A short, non-secret name for logs and admin tools: the first 12 hex
    /// characters of the key.
    pub fn fingerprint(&self) -> String {
        let mut hex = self.to_hex();
        hex.truncate(FINGERPRINT_LEN);
        hex
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({})", self.fingerprint())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_differ() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        let text = a.to_string();
        assert_eq!(text.len(), ID_TEXT_LEN);
        assert_eq!(SessionId::parse(&text), Some(a));
    }

    #[test]
    fn parse_rejects_everything_but_the_generated_format() {
        let valid = SessionId::generate().to_string();
        let too_long = format!("{valid}A");
        let junk = "x".repeat(10 * 1024);
        let with_slash = format!("{}/", &valid[..31]);
        let with_plus = format!("{}+", &valid[..31]);
        let with_padding = format!("{}=", &valid[..31]);
        let non_ascii = format!("{}é", &valid[..30]);
        let with_space = format!(" {}", &valid[..31]);
        let with_nul = format!("{}\0", &valid[..31]);
        let with_dot = format!("{}.", &valid[..31]);
        for bad in [
            "",
            "../../etc/passwd",
            "/etc/passwd",
            "....................../........",
            &valid[..31],
            &too_long,
            &junk,
            &with_slash,
            &with_plus,
            &with_padding,
            &non_ascii,
            &with_space,
            &with_nul,
            &with_dot,
            "%2e%2e%2f%2e%2e%2fetc%2fpasswd%20%20%20",
        ] {
            assert_eq!(SessionId::parse(bad), None, "accepted {bad:?}");
        }
    }

    #[test]
    fn key_is_sha256_and_hex_round_trips() {
        let id = SessionId::generate();
        let key = id.key();
        assert_eq!(key, id.key());
        let hex = key.to_hex();
        assert!(hex.bytes().all(|b| HEX.contains(&b)));
        assert_eq!(SessionKey::from_hex(&hex), Some(key));
        assert_eq!(SessionKey::from_hex(&hex.to_uppercase()), Some(key));
        assert_eq!(SessionKey::from_hex("zz"), None);
        assert_eq!(key.fingerprint(), hex[..FINGERPRINT_LEN]);
    }

    #[test]
    fn hex_is_lowercase_high_nibble_first() {
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(0x11).wrapping_add(0x0f);
        }
        let key = SessionKey::from_bytes(bytes);
        let expected: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(key.to_hex(), expected);
        assert_eq!(SessionKey::hex_text(&key.hex_bytes()), expected);
        assert!(expected.starts_with("0f2031"), "{expected}");
    }

    #[test]
    fn debug_output_does_not_leak_the_id() {
        let id = SessionId::generate();
        assert!(!format!("{id:?}").contains(&id.to_string()));
    }
}
