//! Saves and leases of a [`RedisStore`] that owns its connection
//! ([`RedisStore::connect`]), made by optimistic transaction instead of by
//! script: the writer reads its whole batch with one `WATCH` and `MGET`,
//! decides each job here, and writes the winners in one `MULTI` … `EXEC`,
//! which Redis runs only if no other client changed one of the batch's
//! sessions since the `WATCH`.
//!
//! Why: inside a Lua script every `redis.call` costs Redis several times
//! the command itself, and the scripts' string work more still (about
//! 43,000 instructions per save in a batch of 16, against 18,600 here), so
//! the commands that do the same work natively leave Redis far more time.
//!
//! What it guarantees, as the scripts do:
//!
//! - each job has the outcome it would have alone, in queue order: a later
//!   job on the same session sees an earlier one's write;
//! - an aborted transaction writes nothing; the batch is read and decided
//!   again, up to [`ATTEMPTS`] times, then made by the scripts, which no
//!   other client can interrupt;
//! - a session `MGET` cannot read (missing, or a hash of earlier builds)
//!   goes to the scripts after the transaction, which know both;
//! - `WATCH` holds per connection, and any other user of a connection
//!   could clear it (with an `EXEC`, `DISCARD` or `UNWATCH` of its own):
//!   so the writer has a connection of its own, which it drops after any
//!   error and opens anew for its next batch. A `WATCH` never carries over
//!   to another connection.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisWrite as _, Value};
use tokio::sync::oneshot;

use super::{
    Head, RedisStore, STORE, decode_head, decode_stored, key_expiry, record_size, write_record,
};
use crate::store::LeaseOutcome;
use crate::store::writer::{SwapJob, answer_all};
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

/// How many times a batch is read and tried before the scripts make it.
pub(super) const ATTEMPTS: usize = 3;

/// A job for a Redis store's writer.
pub(super) enum RedisJob {
    /// A compare-and-swap.
    Save(SwapJob),
    /// A lease to take.
    Lease(LeaseJob),
}

/// A lease queued for the writer, and where its outcome goes.
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

impl RedisJob {
    fn key(&self) -> &SessionKey {
        match self {
            Self::Save(job) => &job.key,
            Self::Lease(job) => &job.key,
        }
    }

    /// Sends the outcome of a job that was decided.
    fn answer(self, decision: Decision) {
        // A caller that gave up no longer listens; what was written stands.
        match (self, decision) {
            (Self::Save(job), Decision::Saved(saved)) => drop(job.reply.send(Ok(saved))),
            (Self::Lease(job), Decision::Leased(leased)) => drop(job.reply.send(Ok(leased))),
            (job, _) => job.fail(Error::backend(STORE, "a save and a lease were mixed up")),
        }
    }

    /// Sends `err` as the job's outcome.
    fn fail(self, err: Error) {
        match self {
            Self::Save(job) => answer_all([job.reply], err),
            Self::Lease(job) => answer_all([job.reply], err),
        }
    }
}

/// Sends `err` to every job of `jobs`: the last gets it whole, the others
/// a copy without its source.
pub(super) fn fail_all(jobs: impl IntoIterator<Item = RedisJob>, err: Error) {
    let mut jobs = jobs.into_iter().peekable();
    while let Some(job) = jobs.next() {
        if jobs.peek().is_none() {
            job.fail(err);
            return;
        }
        job.fail(err.duplicate());
    }
}

/// What one attempt decided for a job.
#[derive(Debug)]
enum Decision {
    Saved(bool),
    Leased(LeaseReply),
    /// `MGET` could not read the session: the scripts decide.
    Scripted,
}

/// A session as the batch has it so far.
enum Current<'a> {
    /// `MGET` read nothing: missing, or not a string.
    Unknown,
    /// Not a session2 record.
    Unreadable,
    /// As `MGET` read it.
    Stored(Head<'a>, &'a [u8]),
    /// As an earlier job of the batch wrote it.
    Written(Cow<'a, Record>),
}

impl Current<'_> {
    /// The version, expiry and user a job decides by.
    fn head(&self) -> Option<Head<'_>> {
        match self {
            Self::Unknown | Self::Unreadable => None,
            Self::Stored(head, _) => Some(*head),
            Self::Written(record) => Some(Head {
                version: record.version,
                expires_at: record.expires_at().as_millis(),
                user: record.user.as_deref(),
            }),
        }
    }
}

/// What a test does between a read and its transaction.
#[cfg(test)]
pub(super) type Interference = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The writer's own connection, opened at its first batch.
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
                .map_err(|err| Error::backend_source(STORE, "connect the session writer", err))?;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("connected above"))
    }

    /// Makes the jobs of `batch` and answers each.
    pub(super) async fn write(&mut self, store: &RedisStore, batch: Vec<RedisJob>) {
        for _ in 0..ATTEMPTS {
            match self.attempt(store, &batch).await {
                Ok(Some(decisions)) => {
                    let mut scripted = Vec::new();
                    for (job, decision) in batch.into_iter().zip(decisions) {
                        match decision {
                            Decision::Scripted => scripted.push(job),
                            decision => job.answer(decision),
                        }
                    }
                    for job in scripted {
                        store.write_alone(job).await;
                    }
                    return;
                }
                // Another client changed a session of the batch: read it again.
                Ok(None) => {}
                Err(err) => {
                    // The connection may hold a `WATCH` or half a transaction.
                    self.connection = None;
                    fail_all(batch, err);
                    return;
                }
            }
        }
        store.write_by_script(batch).await;
    }

    /// Reads, decides and writes `batch` once; `None` when another client
    /// changed one of its sessions first, and nothing was written.
    async fn attempt(
        &mut self,
        store: &RedisStore,
        batch: &[RedisJob],
    ) -> Result<Option<Vec<Decision>>> {
        let mut slots: HashMap<SessionKey, usize> = HashMap::with_capacity(batch.len());
        let mut names = Vec::with_capacity(batch.len());
        for job in batch {
            slots.entry(*job.key()).or_insert_with(|| {
                names.push(store.keys.session(job.key()));
                names.len() - 1
            });
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
            stored.map_err(|err| Error::backend_source(STORE, "read sessions to save", err))?;
        if stored.len() != names.len() {
            return Err(Error::backend(STORE, "unexpected reply to MGET"));
        }
        let mut current: Vec<Current> = stored
            .iter()
            .map(|stored| match stored {
                None => Current::Unknown,
                Some(bytes) => match decode_head(bytes) {
                    Ok((head, _)) => Current::Stored(head, bytes),
                    Err(_) => Current::Unreadable,
                },
            })
            .collect();
        let mut writes = Pipeline::with_capacity(batch.len() + 1);
        writes.atomic();
        let decisions: Vec<Decision> = batch
            .iter()
            .map(|job| {
                let current = &mut current[slots[job.key()]];
                match job {
                    RedisJob::Save(job) => save(store, &mut writes, current, job),
                    RedisJob::Lease(job) => lease(store, &mut writes, current, job),
                }
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
            .map_err(|err| Error::backend_source(STORE, "save sessions", err))?;
        match written {
            Value::Nil => Ok(None),
            Value::Array(replies) => {
                if let Some(Value::ServerError(err)) = replies
                    .iter()
                    .find(|reply| matches!(reply, Value::ServerError(_)))
                {
                    let err = redis::RedisError::from(err.clone());
                    return Err(Error::backend_source(STORE, "save sessions", err));
                }
                Ok(Some(decisions))
            }
            _ => Err(Error::backend(STORE, "unexpected reply to EXEC")),
        }
    }
}

/// Decides a save as the scripts' `swap` does, and queues its writes.
fn save<'a>(
    store: &RedisStore,
    writes: &mut Pipeline,
    current: &mut Current<'a>,
    job: &'a SwapJob,
) -> Decision {
    let Some(old) = current.head() else {
        return match current {
            Current::Unknown => Decision::Scripted,
            _ => Decision::Saved(false),
        };
    };
    let now = job.now.as_millis();
    if old.expires_at <= now || old.version != job.expected_version {
        return Decision::Saved(false);
    }
    let record = &job.record;
    let hex = job.key.hex_bytes();
    let expires_at = record.expires_at().as_millis();
    let mut set = Cmd::with_capacity(5, 128 + record_size(record));
    set.arg("SET").arg(store.keys.session(&job.key));
    write_record(&mut set.writer_for_next_arg(), record);
    set.arg("PXAT")
        .arg(key_expiry(record.expires_at(), job.now).as_millis().max(1));
    writes.add_command(set).ignore();
    // An index entry may run early, never late (see `index_expiry` in the scripts).
    if expires_at < old.expires_at {
        writes
            .cmd("ZADD")
            .arg(&store.keys.expiry)
            .arg(expires_at)
            .arg(&hex[..])
            .ignore();
    }
    let user = record.user.as_deref();
    if user != old.user {
        index_user(store, writes, &hex, old.user, user);
    }
    *current = Current::Written(Cow::Borrowed(record));
    Decision::Saved(true)
}

/// Moves `hex` in the user index from `old` to `new`, as the scripts'
/// `index_user` does.
fn index_user(
    store: &RedisStore,
    writes: &mut Pipeline,
    hex: &[u8],
    old: Option<&str>,
    new: Option<&str>,
) {
    let keys = &store.keys;
    if let Some(old) = old {
        writes.cmd("SREM").arg(keys.user(old)).arg(hex).ignore();
    }
    match new {
        Some(new) => {
            writes
                .cmd("HSET")
                .arg(&keys.owners)
                .arg(hex)
                .arg(new)
                .ignore();
            writes.cmd("SADD").arg(keys.user(new)).arg(hex).ignore();
        }
        None => {
            writes.cmd("HDEL").arg(&keys.owners).arg(hex).ignore();
        }
    }
}

/// Decides a lease as the lease script does, and queues its write.
fn lease(
    store: &RedisStore,
    writes: &mut Pipeline,
    current: &mut Current<'_>,
    job: &LeaseJob,
) -> Decision {
    let missing = || Decision::Leased(LeaseReply::Decided(LeaseOutcome::Missing));
    let record = match &*current {
        Current::Unknown => return Decision::Scripted,
        Current::Unreadable => return Decision::Leased(LeaseReply::Unreadable),
        Current::Stored(head, _) if head.expires_at <= job.now.as_millis() => return missing(),
        Current::Stored(_, bytes) => match decode_stored(bytes) {
            Ok(record) => record,
            Err(_) => return Decision::Leased(LeaseReply::Unreadable),
        },
        Current::Written(record) if record.is_expired_at(job.now) => return missing(),
        Current::Written(record) => record.as_ref().clone(),
    };
    if record.is_leased_at(job.now) {
        return Decision::Leased(LeaseReply::Decided(LeaseOutcome::Held(record)));
    }
    let leased = record.with_lease(job.lease);
    let mut set = Cmd::with_capacity(4, 64 + record_size(&leased));
    set.arg("SET").arg(store.keys.session(&job.key));
    write_record(&mut set.writer_for_next_arg(), &leased);
    set.arg("KEEPTTL");
    writes.add_command(set).ignore();
    *current = Current::Written(Cow::Owned(leased.clone()));
    Decision::Leased(LeaseReply::Decided(LeaseOutcome::Taken(leased)))
}
