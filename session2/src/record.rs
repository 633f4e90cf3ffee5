//! The stored form of a session: metadata columns plus an opaque data blob.
//!
//! A [`Record`] is what a store persists under a [`SessionKey`](crate::SessionKey).
//! Stores read and write its metadata (version, user, deadlines, lease) and
//! keep [`Record::data`] as opaque bytes; the library alone encodes and
//! decodes the data map, so a corrupt blob is detected in one place, whatever
//! the store, and treated as an absent session.
//!
//! Stores that keep a whole record as one value (files, Redis, redb) use
//! [`Record::encode`] and [`Record::decode`]: versioned JSON, never a format
//! that can run code.
//!
//! ```
//! use session2::{Record, Timestamp};
//!
//! let now = Timestamp::from_millis(1_000);
//! let record = Record::new(now, now.saturating_add(std::time::Duration::from_secs(60)), None);
//! let bytes = record.encode();
//! assert_eq!(Record::decode(&bytes).unwrap(), record);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Error, Result, Timestamp};

/// The format number written into every encoded record.
pub const RECORD_FORMAT: u32 = 1;

/// One stored session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Bumped by every successful compare-and-swap; a new record has version 1.
    pub version: u64,
    /// The logged-in user's id, indexed by stores for [`find_by_user`](crate::SessionStore::find_by_user).
    pub user: Option<String>,
    /// When the session was first stored.
    pub created_at: Timestamp,
    /// When a request last used the session (as of the last write or touch).
    pub accessed_at: Timestamp,
    /// The session expires when idle past this instant.
    pub idle_deadline: Timestamp,
    /// The session expires at this instant however active it is, if set.
    pub absolute_deadline: Option<Timestamp>,
    /// The lease of an exclusive session, if one holds the record.
    pub lease: Option<Lease>,
    /// The encoded data map, opaque to stores.
    pub data: Vec<u8>,
}

/// An exclusive session's claim on a record, released by compare-and-swap
/// and void after [`Lease::until`] if its holder dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// A random token naming the holder.
    pub token: u64,
    /// The lease is void from this instant on.
    pub until: Timestamp,
}

impl Lease {
    /// Whether the lease still binds at `now`.
    pub fn is_held_at(&self, now: Timestamp) -> bool {
        self.until > now
    }
}

impl Record {
    /// A version-1 record with no user, no lease and an empty data map.
    pub fn new(
        now: Timestamp,
        idle_deadline: Timestamp,
        absolute_deadline: Option<Timestamp>,
    ) -> Self {
        Self {
            version: 1,
            user: None,
            created_at: now,
            accessed_at: now,
            idle_deadline,
            absolute_deadline,
            lease: None,
            data: EMPTY_DATA.to_vec(),
        }
    }

    /// The instant the record expires: the earlier of its two deadlines.
    pub fn expires_at(&self) -> Timestamp {
        match self.absolute_deadline {
            Some(absolute) => absolute.min(self.idle_deadline),
            None => self.idle_deadline,
        }
    }

    /// Whether the record is expired at `now` (a deadline equal to `now` has passed).
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.expires_at() <= now
    }

    /// Whether another holder's lease binds the record at `now`.
    pub fn is_leased_at(&self, now: Timestamp) -> bool {
        self.lease.is_some_and(|lease| lease.is_held_at(now))
    }

    /// The record with `lease` taken on it: one version higher, as
    /// [`SessionStore::lease`](crate::SessionStore::lease) stores it.
    ///
    /// ```
    /// use session2::{Lease, Record, Timestamp};
    ///
    /// let now = Timestamp::from_millis(1_000);
    /// let lease = Lease { token: 7, until: Timestamp::from_millis(2_000) };
    /// let leased = Record::new(now, Timestamp::from_millis(9_000), None).with_lease(lease);
    /// assert_eq!((leased.version, leased.lease), (2, Some(lease)));
    /// assert!(leased.is_leased_at(now));
    /// ```
    #[must_use]
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.take_lease(lease);
        self
    }

    /// Takes `lease` on the record in place, as [`with_lease`](Self::with_lease) does.
    pub(crate) fn take_lease(&mut self, lease: Lease) {
        self.version = self.version.wrapping_add(1);
        self.lease = Some(lease);
    }

    /// The whole record as versioned JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        let stored = StoredRecord {
            format: RECORD_FORMAT,
            version: self.version,
            user: self.user.as_deref(),
            created_at: self.created_at,
            accessed_at: self.accessed_at,
            idle_deadline: self.idle_deadline,
            absolute_deadline: self.absolute_deadline,
            lease: self.lease,
            data: &self.data,
        };
        serde_json::to_vec(&stored).expect("a record always serializes")
    }

    /// Decodes [`Record::encode`]'s output; a decode error for anything else,
    /// including a record of an unknown format.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        let stored: OwnedStoredRecord = match serde_json::from_slice(bytes) {
            Ok(stored) => stored,
            Err(err) => {
                return Err(match serde_json::from_slice::<FormatOnly>(bytes) {
                    Ok(found) if found.format != RECORD_FORMAT => unknown_format(found.format),
                    _ => Error::decode(err),
                });
            }
        };
        if stored.format != RECORD_FORMAT {
            return Err(unknown_format(stored.format));
        }
        Ok(Self {
            version: stored.version,
            user: stored.user,
            created_at: stored.created_at,
            accessed_at: stored.accessed_at,
            idle_deadline: stored.idle_deadline,
            absolute_deadline: stored.absolute_deadline,
            lease: stored.lease,
            data: stored.data,
        })
    }
}

fn unknown_format(format: u32) -> Error {
    Error::decode(format_args!(
        "record format {format} is not supported (expected {RECORD_FORMAT})"
    ))
}

#[derive(Serialize)]
struct StoredRecord<'a> {
    format: u32,
    version: u64,
    user: Option<&'a str>,
    created_at: Timestamp,
    accessed_at: Timestamp,
    idle_deadline: Timestamp,
    absolute_deadline: Option<Timestamp>,
    lease: Option<Lease>,
    #[serde(serialize_with = "data_as_raw_json::serialize")]
    data: &'a [u8],
}

#[derive(Deserialize)]
struct OwnedStoredRecord {
    format: u32,
    version: u64,
    user: Option<String>,
    created_at: Timestamp,
    accessed_at: Timestamp,
    idle_deadline: Timestamp,
    absolute_deadline: Option<Timestamp>,
    lease: Option<Lease>,
    #[serde(deserialize_with = "data_as_raw_json::deserialize")]
    data: Vec<u8>,
}

/// The encoding of an empty data map.
pub(crate) const EMPTY_DATA: &[u8] = b"{}";

/// A session's data: key to JSON value, kept as raw JSON text so that reading
/// a value never re-encodes the others.
pub(crate) type DataMap = BTreeMap<String, Box<RawValue>>;

pub(crate) fn encode_data(data: &DataMap) -> Vec<u8> {
    serde_json::to_vec(data).expect("raw JSON values always serialize")
}

pub(crate) fn decode_data(bytes: &[u8]) -> Result<DataMap> {
    serde_json::from_slice(bytes).map_err(Error::decode)
}

/// The encoded size one entry adds to the data map: key, value and punctuation.
pub(crate) fn entry_size(key: &str, value: &RawValue) -> usize {
    key.len() + value.get().len() + 4
}

/// Embeds the data blob as JSON when it is a JSON object (it always is when
/// the library wrote it) and as an array of bytes otherwise, so a corrupt blob
/// survives a round trip through a whole-record store and is detected when the
/// library decodes the data.
mod data_as_raw_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub(super) fn serialize<S: Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(data)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        {
            Some(raw) if raw.get().starts_with('{') => raw.serialize(serializer),
            _ => serializer.collect_seq(data),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if raw.get().starts_with('{') {
            Ok(raw.get().as_bytes().to_vec())
        } else {
            serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let now = Timestamp::from_millis(10);
        let mut record = Record::new(
            now,
            Timestamp::from_millis(100),
            Some(Timestamp::from_millis(50)),
        );
        record.user = Some("alice".into());
        record.lease = Some(Lease {
            token: 7,
            until: Timestamp::from_millis(20),
        });
        record.data = br#"{"counter":3,"name":"x"}"#.to_vec();
        record
    }

    #[test]
    fn record_round_trips_and_embeds_data_as_json() {
        let record = sample();
        let bytes = record.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains(r#""data":{"counter":3,"name":"x"}"#),
            "{text}"
        );
        assert!(text.contains(r#""format":1"#));
        assert_eq!(Record::decode(&bytes).unwrap(), record);
    }

    #[test]
    fn corrupt_data_blob_survives_encoding_and_fails_data_decode() {
        let mut record = sample();
        record.data = b"\xff\x00not json".to_vec();
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded.data, record.data);
        assert!(decode_data(&decoded.data).unwrap_err().is_decode());
    }

    #[test]
    fn garbage_and_unknown_formats_are_decode_errors() {
        for bad in [&b""[..], b"{", b"null", b"\x00\x01", br#"{"format":2}"#] {
            assert!(Record::decode(bad).unwrap_err().is_decode());
        }
        let text = String::from_utf8(sample().encode())
            .unwrap()
            .replace(r#""format":1"#, r#""format":9"#);
        assert!(
            Record::decode(text.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("format 9")
        );
    }

    #[test]
    fn expiry_is_the_earlier_deadline() {
        let record = sample();
        assert_eq!(record.expires_at(), Timestamp::from_millis(50));
        assert!(!record.is_expired_at(Timestamp::from_millis(49)));
        assert!(record.is_expired_at(Timestamp::from_millis(50)));
    }
}
