//! Leases of a [`RedisStore`] that owns its connection
//! ([`RedisStore::connect`]), taken by optimistic transaction instead of by
//! script: the lease writer reads its whole batch with one `WATCH` and
//! `MGET`, decides each lease here, and writes the leases it took in one
//! `MULTI` … `EXEC`, which Redis runs only if no other client changed one
//! of the batch's sessions since the `WATCH`.
//!
//! Why: a lease reads a session and writes it back changed. A script does
//! that with two `redis.call`s and Lua string work on the whole session,
//! which cost Redis about 54,000 instructions per lease even in batches;
//! here Redis runs a `SET` and its share of four commands, and the
//! application does the string work. (A save needs no read, so it stays
//! one script per batch: the transaction's second round trip would cost
//! the application more than the script costs Redis.)
//!
//! What it guarantees, as the lease script does:
//!
//! - each lease has the outcome it would have alone, in queue order: of
//!   several leases of one session in a batch, the first takes it and the
//!   others find it held;
//! - an aborted transaction writes nothing; the batch is read and decided
//!   again, up to [`ATTEMPTS`] times, then leased by script, which no
//!   other client can interrupt;
//! - a session `MGET` cannot read (missing, or a hash of earlier builds)
//!   is leased by script after the transaction, which knows both;
//! - `WATCH` holds per connection, and any other user of a connection
//!   could clear it (with an `EXEC`, `DISCARD` or `UNWATCH` of its own):
//!   so the writer has a connection of its own, which it drops after any
//!   error and opens anew for its next batch. A `WATCH` never carries over
//!   to another connection.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisWrite as _, Value};
use tokio::sync::oneshot;

use super::{RedisStore, STORE, decode_head, decode_rest, record_size, write_record};
use crate::store::LeaseOutcome;
use crate::store::writer::answer_all;
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

/// How many times a batch is read and tried before the script leases it.
pub(super) const ATTEMPTS: usize = 3;

/// A lease queued for the lease writer, and where its outcome goes.
pub(super) struct LeaseJob {
    pub(super) key: SessionKey,
    pub(super) lease: Lease,
    pub(super) now: Timestamp,
    pub(super) reply: oneshot::Sender<Result<LeaseReply>>,
}

/// What a lease attempt found.
#[derive(Debug)]
pub(super) enum LeaseReply {
    /// Decided: missing, held or taken.
    Decided(LeaseOutcome),
    /// The session cannot be read; `load` reports why (and marks it for purge).
    Unreadable,
}

/// What one attempt decided for a lease; `None` when `MGET` could not
/// read the session, and the script decides.
type Decision = Option<LeaseReply>;

/// A session as the batch has it so far.
enum Current<'a> {
    /// `MGET` read nothing: missing, or not a string.
    Unknown,
    /// As `MGET` read it.
    Stored(&'a [u8]),
    /// As an earlier lease of the batch wrote it.
    Leased(Record),
}

/// What a test does between a read and its transaction.
#[cfg(test)]
pub(super) type Interference = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The lease writer's own connection, opened at its first batch.
pub(super) struct Transactions {
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    /// Runs between each read and its transaction: tests write there as
    /// another client would.
    #[cfg(test)]
    pub(super) between: Option<Box<dyn FnMut() -> Interference + Send>>,
}

impl Transactions {
    pub(super) fn new(client: redis::Client) -> Self {
        Self {
            client,
            connection: None,
            #[cfg(test)]
            between: None,
        }
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection> {
        if self.connection.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)));
            let connection = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|err| Error::backend_source(STORE, "connect the lease writer", err))?;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("connected above"))
    }

    /// Tries the leases of `batch` and answers each.
    pub(super) async fn lease(&mut self, store: &RedisStore, batch: Vec<LeaseJob>) {
        for _ in 0..ATTEMPTS {
            match self.attempt(store, &batch).await {
                Ok(Some(decisions)) => {
                    let mut scripted = Vec::new();
                    for (job, decision) in batch.into_iter().zip(decisions) {
                        match decision {
                            // A caller that gave up no longer listens; its lease stands
                            // until it runs out.
                            Some(reply) => drop(job.reply.send(Ok(reply))),
                            None => scripted.push(job),
                        }
                    }
                    for job in scripted {
                        store.lease_alone(job).await;
                    }
                    return;
                }
                // Another client changed a session of the batch: read it again.
                Ok(None) => {}
                Err(err) => {
                    // The connection may hold a `WATCH` or half a transaction.
                    self.connection = None;
                    answer_all(batch.into_iter().map(|job| job.reply), err);
                    return;
                }
            }
        }
        for job in batch {
            store.lease_alone(job).await;
        }
    }

    /// Reads, decides and writes `batch` once; `None` when another client
    /// changed one of its sessions first, and nothing was written.
    async fn attempt(
        &mut self,
        store: &RedisStore,
        batch: &[LeaseJob],
    ) -> Result<Option<Vec<Decision>>> {
        let mut slots: HashMap<SessionKey, usize> = HashMap::with_capacity(batch.len());
        let mut names = Vec::with_capacity(batch.len());
        // Per slot, how many leases of the batch are yet to be decided.
        let mut undecided = Vec::with_capacity(batch.len());
        for job in batch {
            let slot = *slots.entry(job.key).or_insert_with(|| {
                names.push(store.keys.session(&job.key));
                undecided.push(0);
                names.len() - 1
            });
            undecided[slot] += 1;
        }
        let mut read = Pipeline::with_capacity(2);
        read.cmd("WATCH").arg(&names).ignore();
        read.cmd("MGET").arg(&names);
        let reused = self.connection.is_some();
        let mut stored = read.query_async(self.connection().await?).await;
        if reused
            && stored
                .as_ref()
                .is_err_and(redis::RedisError::is_unrecoverable_error)
        {
            // The connection died while idle (the server restarted, say):
            // the read wrote nothing, so it goes again on a new connection.
            self.connection = None;
            stored = read.query_async(self.connection().await?).await;
        }
        let (stored,): (Vec<Option<Vec<u8>>>,) =
            stored.map_err(|err| Error::backend_source(STORE, "read sessions to lease", err))?;
        if stored.len() != names.len() {
            return Err(Error::backend(STORE, "unexpected reply to MGET"));
        }
        let mut current: Vec<Current> = stored
            .iter()
            .map(|stored| stored.as_deref().map_or(Current::Unknown, Current::Stored))
            .collect();
        let mut writes = Pipeline::with_capacity(batch.len());
        writes.atomic();
        let decisions: Vec<Decision> = batch
            .iter()
            .map(|job| {
                let slot = slots[&job.key];
                undecided[slot] -= 1;
                let later = undecided[slot] > 0;
                decide(&mut writes, &mut current[slot], later, &names[slot], job)
            })
            .collect();
        #[cfg(test)]
        if let Some(between) = &mut self.between {
            between().await;
        }
        let connection = self.connection().await?;
        if writes.cmd_iter().next().is_none() {
            redis::cmd("UNWATCH")
                .exec_async(connection)
                .await
                .map_err(|err| Error::backend_source(STORE, "end a read of sessions", err))?;
            return Ok(Some(decisions));
        }
        let written: Value = writes
            .query_async(connection)
            .await
            .map_err(|err| Error::backend_source(STORE, "lease sessions", err))?;
        match written {
            Value::Nil => Ok(None),
            Value::Array(replies) => {
                if let Some(Value::ServerError(err)) = replies
                    .iter()
                    .find(|reply| matches!(reply, Value::ServerError(_)))
                {
                    let err = redis::RedisError::from(err.clone());
                    return Err(Error::backend_source(STORE, "lease sessions", err));
                }
                Ok(Some(decisions))
            }
            _ => Err(Error::backend(STORE, "unexpected reply to EXEC")),
        }
    }
}

/// Decides a lease on the session `name` as the lease script does, and
/// queues its write. Only when `later` leases of the batch read the
/// session after this one does `current` keep a copy of what it wrote.
fn decide(
    writes: &mut Pipeline,
    current: &mut Current<'_>,
    later: bool,
    name: &str,
    job: &LeaseJob,
) -> Decision {
    let missing = Some(LeaseReply::Decided(LeaseOutcome::Missing));
    let record = match &*current {
        Current::Unknown => return None,
        // The script's test: the expiry as stored, before the rest is read.
        Current::Stored(bytes) => match decode_head(bytes) {
            Ok((head, _)) if head.expires_at <= job.now.as_millis() => return missing,
            Ok((head, rest)) => match decode_rest(head, rest) {
                Ok(record) => record,
                Err(_) => return Some(LeaseReply::Unreadable),
            },
            Err(_) => return Some(LeaseReply::Unreadable),
        },
        Current::Leased(record) if record.is_expired_at(job.now) => return missing,
        Current::Leased(record) => record.clone(),
    };
    if record.is_leased_at(job.now) {
        return Some(LeaseReply::Decided(LeaseOutcome::Held(record)));
    }
    let leased = record.with_lease(job.lease);
    let mut set = Cmd::with_capacity(4, 64 + name.len() + record_size(&leased));
    set.arg("SET").arg(name);
    write_record(&mut set.writer_for_next_arg(), &leased);
    set.arg("KEEPTTL");
    writes.add_command(set).ignore();
    if later {
        *current = Current::Leased(leased.clone());
    }
    Some(LeaseReply::Decided(LeaseOutcome::Taken(leased)))
}
