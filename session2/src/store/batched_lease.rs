//! Batched leases for [`PostgresStore`](super::PostgresStore): the leases
//! of concurrent exclusive requests are one `UPDATE … FROM UNNEST(…)
//! RETURNING` together, which sets only the version and the lease of each
//! row it takes, never its data; a lease that nothing holds costs that one
//! statement.
//!
//! Every lease of a table goes to one task (per runtime, see
//! `store/writer.rs`; on a quiet process a lone lease runs on its caller's
//! task instead), which tries the leases that queued while its last
//! statement ran together ([`LeaseMany::lease_many`]) and answers each
//! caller; while few leases are under way, up to four batches go out at
//! once. So:
//!
//! - each lease has the outcome it would have alone, at its own `now`; of
//!   several leases of one session in a batch, one takes it and the others
//!   find it held;
//! - when a batch fails, it takes nothing, and each of its leases gets the
//!   error; unless the database refused the statement (which one lease
//!   might cause): then each lease runs again on its own, all at once.
//!
//! The statement names only the leases it took. For the others the caller
//! reads the record (through the batched loads, `store/batched_load.rs`) to
//! tell a missing session from a held one. A held row costs the statement
//! no lock and no wait: PostgreSQL skips a row whose current version does
//! not meet the statement's condition, even while its holder saves it.
//!
//! MySQL leases by compare-and-swap instead (see `store/batched_swap.rs`).

use std::future::Future;

use tokio::sync::oneshot;

use super::batched_load::{BatchedLoads, LoadMany};
use super::writer::{
    Batching, Queue, SessionJob, Writers, answer_all, is_refused_statement, run_batches,
    run_each_alone,
};
use super::{LeaseOutcome, MAX_LEASE_ATTEMPTS};
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

/// The most leases one batch tries.
const MAX_LEASES: usize = 256;

/// A lease to take on `key`, unless its record is missing, expired or
/// leased at `now`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseAttempt {
    pub(crate) key: SessionKey,
    pub(crate) lease: Lease,
    pub(crate) now: Timestamp,
}

/// What a batch tells of one lease: the record it took, one version
/// higher and with the lease, or `None` when it did not take it.
pub(crate) type Taken = Result<Option<Record>>;

/// A table that can try many leases at once (and read records, to tell
/// why a lease was not taken).
pub(crate) trait LeaseMany: LoadMany {
    /// Tries `attempts` (in key order; a key may repeat, and is then taken
    /// at most once) at once, committed together or not at all, each at its
    /// own `now`. Returns what it took of each, in order; a record that
    /// cannot be decoded fails only the lease that took it.
    fn lease_many(
        &self,
        attempts: &[LeaseAttempt],
    ) -> impl Future<Output = Result<Vec<Taken>>> + Send;
}

/// A lease queued for the lease task, and where its outcome goes.
struct LeaseJob {
    attempt: LeaseAttempt,
    reply: oneshot::Sender<Taken>,
}

/// The lease tasks of one table, one per runtime.
#[derive(Debug, Default)]
pub(crate) struct BatchedLeases {
    takers: Writers<LeaseJob>,
}

impl BatchedLeases {
    /// Takes `lease` on `key` in `table` as of `now`, together with the
    /// leases that queue meanwhile; reads the record through `loads` when
    /// it was not taken. A record released between the two is tried again,
    /// up to [`MAX_LEASE_ATTEMPTS`] times, then reported held, as
    /// [`lease_by_compare_and_swap`](super::lease_by_compare_and_swap) does.
    pub(crate) async fn lease<T: LeaseMany>(
        &self,
        table: &T,
        loads: &BatchedLoads,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseOutcome> {
        let attempt = LeaseAttempt {
            key: *key,
            lease,
            now,
        };
        let mut attempts = 0;
        loop {
            if let Some(record) = self.try_lease(table, attempt).await? {
                return Ok(LeaseOutcome::Taken(record));
            }
            let Some(record) = loads.load(table, key, now).await? else {
                return Ok(LeaseOutcome::Missing);
            };
            attempts += 1;
            if record.is_leased_at(now) || attempts >= MAX_LEASE_ATTEMPTS {
                return Ok(LeaseOutcome::Held(record));
            }
        }
    }

    async fn try_lease<T: LeaseMany>(&self, table: &T, attempt: LeaseAttempt) -> Taken {
        let (reply, outcome) = oneshot::channel();
        let job = LeaseJob { attempt, reply };
        let start = |jobs| lease_batches(table.clone(), jobs);
        self.takers
            .run(T::STORE, job, outcome, start, |job| lease_alone(table, job))
            .await
    }
}

/// The lease task: tries the queued leases in batches until every queue
/// handle is gone.
async fn lease_batches<T: LeaseMany>(table: T, jobs: Queue<LeaseJob>) {
    let batching = Batching::one_at_a_time(MAX_LEASES).side_by_side_when_few();
    run_batches(jobs, batching, |batch| lease_together(&table, batch)).await;
}

impl SessionJob for LeaseJob {
    fn key(&self) -> &SessionKey {
        &self.attempt.key
    }
}

/// Tries the leases of `batch` together and answers each.
/// When the batch fails, every lease gets its error, unless the database
/// refused it (see [`is_refused_statement`]): then each runs alone, all at once.
async fn lease_together<T: LeaseMany>(table: &T, mut batch: Vec<LeaseJob>) {
    // In key order, so that batches of two processes lock their rows in the
    // same order and cannot deadlock (see `store/batched_swap.rs`); stable,
    // so that the leases of one key keep their order.
    batch.sort_by_key(|job| job.attempt.key);
    let attempts: Vec<_> = batch.iter().map(|job| job.attempt).collect();
    let err = match table.lease_many(&attempts).await {
        Ok(taken) if taken.len() == batch.len() => {
            for (job, taken) in batch.drain(..).zip(taken) {
                // A caller that gave up no longer listens; a lease it took
                // runs out at its deadline.
                let _ = job.reply.send(taken);
            }
            return;
        }
        Ok(_) => Error::backend(T::STORE, "a lease batch told of another number of leases"),
        Err(err) => err,
    };
    if batch.len() == 1 || !is_refused_statement(&err) {
        return answer_all(batch.drain(..).map(|job| job.reply), err);
    }
    tracing::debug!(error = %err, leases = batch.len(), "a batch of session leases was refused; running each on its own");
    run_each_alone(batch.drain(..), |job| {
        let table = table.clone();
        async move { lease_alone(&table, job).await }
    })
    .await;
}

/// Tries the lease of `job` in a batch of its own and answers it.
async fn lease_alone<T: LeaseMany>(table: &T, job: LeaseJob) {
    let taken = match table.lease_many(&[job.attempt]).await {
        Ok(mut taken) => taken.pop().unwrap_or(Ok(None)),
        Err(err) => Err(err),
    };
    // A caller that gave up no longer listens; a lease it took runs out
    // at its deadline.
    let _ = job.reply.send(taken);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::{Record, SessionId, SessionStore};

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn attempt(key: SessionKey, token: u64) -> LeaseAttempt {
        LeaseAttempt {
            key,
            lease: Lease {
                token,
                until: NOW.saturating_add(Duration::from_secs(10)),
            },
            now: NOW,
        }
    }

    fn job(attempt: LeaseAttempt) -> (LeaseJob, oneshot::Receiver<Taken>) {
        let (reply, outcome) = oneshot::channel();
        (LeaseJob { attempt, reply }, outcome)
    }

    /// The keys and lease tokens of one batch, in order.
    type Batch = Vec<(SessionKey, u64)>;

    /// A table that records each batch's leases and takes the first lease
    /// of each key, as a database would.
    #[derive(Clone, Default)]
    struct Recording {
        batches: Arc<Mutex<Vec<Batch>>>,
        unreachable: bool,
    }

    impl LoadMany for Recording {
        const STORE: &'static str = "test";

        async fn load_many(
            &self,
            _: &[SessionKey],
            _: Timestamp,
        ) -> Result<Vec<(SessionKey, Result<Record>)>> {
            unreachable!("a lease batch reads nothing")
        }

        async fn load_one(&self, _: &SessionKey, _: Timestamp) -> Result<Option<Record>> {
            unreachable!("a lease batch reads nothing")
        }
    }

    impl LeaseMany for Recording {
        async fn lease_many(&self, attempts: &[LeaseAttempt]) -> Result<Vec<Taken>> {
            self.batches.lock().unwrap().push(
                attempts
                    .iter()
                    .map(|attempt| (attempt.key, attempt.lease.token))
                    .collect(),
            );
            if self.unreachable {
                return Err(Error::backend("test", "connection refused"));
            }
            let mut taken = std::collections::HashSet::new();
            Ok(attempts
                .iter()
                .map(|attempt| {
                    Ok(taken
                        .insert(attempt.key)
                        .then(|| live(b"").with_lease(attempt.lease)))
                })
                .collect())
        }
    }

    #[test]
    fn a_batch_tries_its_leases_in_key_order_keeping_each_keys_order() {
        let [a, b] = {
            let mut keys = [(); 2].map(|()| SessionId::generate().key());
            keys.sort();
            keys
        };
        let table = Recording::default();
        let (batch, outcomes): (Vec<_>, Vec<_>) =
            [attempt(b, 1), attempt(a, 2), attempt(b, 3), attempt(a, 4)]
                .into_iter()
                .map(job)
                .unzip();
        crate::testing::run(lease_together(&table, batch));
        assert_eq!(
            table.batches.lock().unwrap().as_slice(),
            &[vec![(a, 2), (a, 4), (b, 1), (b, 3)]],
            "one batch, in key order, each key's leases in the order queued"
        );
        let taken: Vec<_> = outcomes
            .into_iter()
            .map(|mut outcome| outcome.try_recv().unwrap().unwrap().is_some())
            .collect();
        assert_eq!(
            taken,
            [true, true, false, false],
            "each answer reaches its own caller: the first lease of each key takes it"
        );
    }

    #[test]
    fn a_batch_that_cannot_reach_the_server_fails_each_lease_without_trying_it_again() {
        let table = Recording {
            unreachable: true,
            ..Recording::default()
        };
        let (batch, outcomes): (Vec<_>, Vec<_>) = (0..3)
            .map(|token| job(attempt(SessionId::generate().key(), token)))
            .unzip();
        crate::testing::run(lease_together(&table, batch));
        for mut outcome in outcomes {
            assert!(outcome.try_recv().unwrap().unwrap_err().is_backend());
        }
        assert_eq!(
            table.batches.lock().unwrap().len(),
            1,
            "tried once, together"
        );
    }

    fn live(data: &[u8]) -> Record {
        let mut record = Record::new(NOW, NOW.saturating_add(Duration::from_secs(60)), None);
        record.data = data.to_vec();
        record
    }

    /// One batch of leases of live, leased, missing and expired sessions,
    /// and two leases of one session: the free ones are taken, one lease of
    /// the pair takes it, and a lease writes nothing but the version and
    /// the lease. Then, through the lease task, the others are told.
    async fn each_lease_of_a_batch_gets_its_own_outcome<T: LeaseMany>(
        table: &T,
        store: &dyn SessionStore,
    ) {
        let [pair, free, held, missing, expired] = [(); 5].map(|()| SessionId::generate().key());
        let holder = attempt(held, 99).lease;
        for (key, record) in [
            (pair, live(b"pair")),
            (free, live(b"free")),
            (held, live(b"held").with_lease(holder)),
            (expired, live(b"expired")),
        ] {
            store.create(&key, &record, NOW).await.unwrap();
        }
        let later = NOW.saturating_add(Duration::from_secs(120));
        let expired_at_its_now = LeaseAttempt {
            now: later,
            ..attempt(expired, 6)
        };
        let mut attempts = vec![
            attempt(pair, 1),
            attempt(pair, 2),
            attempt(free, 3),
            attempt(held, 4),
            attempt(missing, 5),
            expired_at_its_now,
        ];
        attempts.sort_by_key(|attempt| attempt.key);
        let taken: std::collections::HashMap<_, _> = attempts
            .iter()
            .zip(table.lease_many(&attempts).await.unwrap())
            .map(|(attempt, taken)| (attempt.lease.token, taken.unwrap()))
            .collect();
        let (pair_record, other) = match (&taken[&1], &taken[&2]) {
            (Some(record), None) => (record.clone(), 2),
            (None, Some(record)) => (record.clone(), 1),
            other => panic!("exactly one lease of the pair takes it, got {other:?}"),
        };
        assert_eq!(pair_record.version, live(b"").version + 1);
        assert_eq!(pair_record.data, b"pair");
        let free_record = taken[&3].clone().expect("a free lease is taken");
        assert_eq!(free_record.data, b"free");
        for token in [4, 5, 6] {
            assert_eq!(taken[&token], None, "lease {token} is not taken");
        }
        assert_eq!(
            store.load(&pair, NOW).await.unwrap(),
            Some(pair_record.clone())
        );
        assert_eq!(store.load(&free, NOW).await.unwrap(), Some(free_record));
        assert_eq!(
            store.load(&held, NOW).await.unwrap().unwrap().lease,
            Some(holder)
        );
        // Through the lease task and the batched loads, every lease is told.
        let (leases, loads) = (BatchedLeases::default(), BatchedLoads::default());
        let lease = |attempt: LeaseAttempt| {
            let (leases, loads) = (&leases, &loads);
            async move {
                leases
                    .lease(table, loads, &attempt.key, attempt.lease, attempt.now)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            lease(attempt(pair, other)).await,
            LeaseOutcome::Held(pair_record)
        );
        assert!(matches!(
            lease(attempt(held, 7)).await,
            LeaseOutcome::Held(record) if record.lease == Some(holder)
        ));
        assert_eq!(lease(attempt(missing, 8)).await, LeaseOutcome::Missing);
        assert_eq!(lease(expired_at_its_now).await, LeaseOutcome::Missing);
        let fresh = SessionId::generate().key();
        store.create(&fresh, &live(b"fresh"), NOW).await.unwrap();
        let LeaseOutcome::Taken(record) = lease(attempt(fresh, 10)).await else {
            panic!("a free lease is taken");
        };
        assert_eq!(record.lease, Some(attempt(fresh, 10).lease));
        assert_eq!(store.load(&fresh, NOW).await.unwrap(), Some(record));
    }

    /// With the table refusing leases of token 666: a batch holding one
    /// fails whole and takes nothing, and through the lease task only that
    /// lease fails.
    async fn a_poisoned_lease_fails_alone<T: LeaseMany>(table: &T, store: &dyn SessionStore) {
        let keys = [(); 3].map(|()| SessionId::generate().key());
        for key in &keys {
            store.create(key, &live(b"x"), NOW).await.unwrap();
        }
        let mut attempts = vec![
            attempt(keys[0], 1),
            attempt(keys[1], 666),
            attempt(keys[2], 3),
        ];
        attempts.sort_by_key(|attempt| attempt.key);
        assert!(table.lease_many(&attempts).await.is_err());
        for key in &keys {
            assert_eq!(store.load(key, NOW).await.unwrap().unwrap().lease, None);
        }
        let (batch, outcomes): (Vec<_>, Vec<_>) = attempts.iter().copied().map(job).unzip();
        lease_together(table, batch).await;
        for (attempt, outcome) in attempts.iter().zip(outcomes) {
            let taken = outcome.await.unwrap();
            let stored = store.load(&attempt.key, NOW).await.unwrap();
            if attempt.lease.token == 666 {
                assert!(taken.is_err(), "the poisoned lease fails");
                assert_eq!(stored.unwrap().lease, None);
            } else {
                assert_eq!(taken.unwrap(), stored, "the others are taken");
            }
        }
    }

    #[test]
    fn postgres_leases_in_batches() {
        use crate::store::sql::Dialect;
        use crate::store::test_support::{
            drop_postgres_table, postgres_on_fresh_table, run_on_postgres,
        };
        crate::testing::run(async {
            let Some(store) = postgres_on_fresh_table().await else {
                return;
            };
            let t = Dialect::Postgres.quote(store.table_name());
            let trigger = Dialect::Postgres.quote(&format!("{}_guard", store.table_name()));
            // A lease that named the data column (even to write it again)
            // would fail: only a save may.
            for statement in [
                format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.lease_token = 666 THEN RAISE EXCEPTION 'poisoned lease'; END IF; \
                     IF NEW.lease_token IS NOT NULL THEN RAISE EXCEPTION 'a lease wrote the data'; END IF; \
                     RETURN NEW; END $$"
                ),
                format!(
                    "CREATE TRIGGER guard_data BEFORE UPDATE OF data ON {t} FOR EACH ROW \
                     EXECUTE FUNCTION {trigger}()"
                ),
                format!(
                    "CREATE TRIGGER guard_lease BEFORE UPDATE OF lease_token ON {t} FOR EACH ROW \
                     WHEN (NEW.lease_token = 666) EXECUTE FUNCTION {trigger}()"
                ),
            ] {
                run_on_postgres(&store, &statement).await;
            }
            each_lease_of_a_batch_gets_its_own_outcome(&*store.table, &store).await;
            a_poisoned_lease_fails_alone(&*store.table, &store).await;
            drop_postgres_table(&store).await;
            run_on_postgres(&store, &format!("DROP FUNCTION {trigger}")).await;
        });
    }
}
