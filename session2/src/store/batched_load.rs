//! Batched loads for the SQL stores: the loads of concurrent requests are
//! one `SELECT … WHERE key IN (…)` together, instead of one statement (and,
//! on SQLite, two hand-offs to the connection's thread) each.
//!
//! Every load of a table goes to one loader task (per runtime, see
//! `store/writer.rs`), which reads the keys that queued while its last
//! statement ran in one statement ([`SqlTable::read_many`](super::sql::SqlTable::read_many))
//! and answers each caller with what a load of its own would have given:
//! the record if it is live at the caller's `now`, `None` if it is missing
//! or expired, a decode error if its row cannot be read. A lone load runs
//! alone, with the one-key statement, and on a quiet process on its
//! caller's task (see `store/writer.rs`). While few loads are under way,
//! up to four batches go out at once, as a pool would serve them, instead
//! of waiting for each other. When a batch fails, each of its loads
//! gets the error, unless the database refused the statement (which one
//! key might cause): then they run again each on its own, all at once.

use std::collections::HashMap;
use std::future::Future;

use tokio::sync::oneshot;

use super::sql::MAX_LOADS;
use super::writer::{
    Batching, Queue, SessionJob, Writers, answer_all, is_refused_statement, run_batches,
    run_each_alone,
};
use crate::{Error, Record, Result, SessionKey, Timestamp};

/// A table that can read many records at once.
pub(crate) trait LoadMany: Clone + Send + Sync + 'static {
    /// The store name for errors.
    const STORE: &'static str;

    /// The records of `keys` (repeats allowed) that are live at `now`, each
    /// with its record or the error decoding its row; others left out.
    fn load_many(
        &self,
        keys: &[SessionKey],
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<(SessionKey, Result<Record>)>>> + Send;

    /// One load, alone.
    fn load_one(
        &self,
        key: &SessionKey,
        now: Timestamp,
    ) -> impl Future<Output = Result<Option<Record>>> + Send;
}

/// A load queued for the loader, and where its outcome goes.
struct LoadJob {
    key: SessionKey,
    now: Timestamp,
    reply: oneshot::Sender<Result<Option<Record>>>,
}

/// The loaders of one table, one per runtime.
#[derive(Debug, Default)]
pub(crate) struct BatchedLoads {
    loaders: Writers<LoadJob>,
}

impl BatchedLoads {
    /// Loads `key` from `table` as of `now`, together with the loads that queue meanwhile.
    pub(crate) async fn load<T: LoadMany>(
        &self,
        table: &T,
        key: &SessionKey,
        now: Timestamp,
    ) -> Result<Option<Record>> {
        let (reply, outcome) = oneshot::channel();
        let job = LoadJob {
            key: *key,
            now,
            reply,
        };
        let start = |jobs| load_batches(table.clone(), jobs);
        self.loaders
            .run(T::STORE, job, outcome, start, |job| load_alone(table, job))
            .await
    }
}

/// Runs `job` on its own and answers it.
async fn load_alone<T: LoadMany>(table: &T, job: LoadJob) {
    let record = table.load_one(&job.key, job.now).await;
    // A caller that gave up no longer listens.
    let _ = job.reply.send(record);
}

/// The loader: reads the queued loads in batches until every queue handle is gone.
async fn load_batches<T: LoadMany>(table: T, jobs: Queue<LoadJob>) {
    let batching = Batching::one_at_a_time(MAX_LOADS).side_by_side_when_few();
    run_batches(jobs, batching, |batch| load_together(&table, batch)).await;
}

impl SessionJob for LoadJob {
    fn key(&self) -> &SessionKey {
        &self.key
    }
}

/// Reads the loads of `batch` in one statement and answers
/// each. A lone load runs alone. When the statement fails, every load gets
/// its error, unless the database refused it (see [`is_refused_statement`]):
/// then each load runs alone, all at once.
async fn load_together<T: LoadMany>(table: &T, mut batch: Vec<LoadJob>) {
    if let [_] = batch.as_slice() {
        return load_alone(table, batch.remove(0)).await;
    }
    let Some(earliest) = batch.iter().map(|job| job.now).min() else {
        return;
    };
    let keys: Vec<_> = batch.iter().map(|job| job.key).collect();
    let err = match table.load_many(&keys, earliest).await {
        Ok(records) => return answer_from(records, &mut batch),
        Err(err) => err,
    };
    if !is_refused_statement(&err) {
        return answer_all(batch.drain(..).map(|job| job.reply), err);
    }
    tracing::debug!(error = %err, loads = batch.len(), "a batch of session loads was refused; running each on its own");
    run_each_alone(batch.drain(..), |job| {
        let table = table.clone();
        async move { load_alone(&table, job).await }
    })
    .await;
}

/// Answers each job of `batch` (emptying it) from the records one
/// statement read for all of them, as of its own `now`.
fn answer_from(records: Vec<(SessionKey, Result<Record>)>, batch: &mut Vec<LoadJob>) {
    let mut loads_left: HashMap<SessionKey, usize> = HashMap::with_capacity(batch.len());
    for job in batch.iter() {
        *loads_left.entry(job.key).or_default() += 1;
    }
    let mut found: HashMap<_, _> = records.into_iter().collect();
    for job in batch.drain(..) {
        let left = loads_left.entry(job.key).or_default();
        *left -= 1;
        // The last load of a key takes its record; the others get copies.
        let record = if *left == 0 {
            found.remove(&job.key)
        } else {
            found.get(&job.key).map(|record| match record {
                Ok(record) => Ok(record.clone()),
                Err(_) => Err(Error::decode("the session row cannot be decoded")),
            })
        };
        let outcome = record
            .transpose()
            .map(|record| record.filter(|record| !record.is_expired_at(job.now)));
        // A caller that gave up no longer listens.
        let _ = job.reply.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::SessionId;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn job(
        key: SessionKey,
        now: Timestamp,
    ) -> (LoadJob, oneshot::Receiver<Result<Option<Record>>>) {
        let (reply, outcome) = oneshot::channel();
        (LoadJob { key, now, reply }, outcome)
    }

    /// A table whose server cannot be reached; counts the loads run alone.
    #[derive(Clone, Default)]
    struct Unreachable {
        alone: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl LoadMany for Unreachable {
        const STORE: &'static str = "test";

        async fn load_many(
            &self,
            _: &[SessionKey],
            _: Timestamp,
        ) -> Result<Vec<(SessionKey, Result<Record>)>> {
            Err(Error::backend(Self::STORE, "connection refused"))
        }

        async fn load_one(&self, _: &SessionKey, _: Timestamp) -> Result<Option<Record>> {
            self.alone
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(Error::backend(Self::STORE, "connection refused"))
        }
    }

    #[test]
    fn a_batch_that_cannot_reach_the_server_fails_each_load_without_trying_it_again() {
        crate::testing::run(async {
            let table = Unreachable::default();
            let (batch, outcomes): (Vec<_>, Vec<_>) = (0..5)
                .map(|_| job(SessionId::generate().key(), NOW))
                .unzip();
            load_together(&table, batch).await;
            for outcome in outcomes {
                assert!(outcome.await.unwrap().unwrap_err().is_backend());
            }
            assert_eq!(table.alone.load(std::sync::atomic::Ordering::Relaxed), 0);
        });
    }

    #[test]
    fn each_load_of_a_batch_gets_what_it_would_get_alone() {
        let [live, missing, corrupt] = [(); 3].map(|()| SessionId::generate().key());
        let record = Record::new(NOW, NOW.saturating_add(Duration::from_secs(60)), None);
        let later = NOW.saturating_add(Duration::from_secs(120));
        let (mut batch, outcomes): (Vec<_>, Vec<_>) = [
            job(live, NOW),
            // The same key, loaded by a request whose `now` is past its expiry.
            job(live, later),
            job(missing, NOW),
            job(corrupt, NOW),
            job(corrupt, NOW),
            job(live, NOW),
        ]
        .into_iter()
        .unzip();
        let read = vec![
            (live, Ok(record.clone())),
            (corrupt, Err(Error::decode("bad row"))),
        ];
        answer_from(read, &mut batch);
        assert!(batch.is_empty());
        let outcomes: Vec<_> = outcomes
            .into_iter()
            .map(|mut outcome| outcome.try_recv().unwrap())
            .collect();
        assert_eq!(outcomes[0].as_ref().unwrap(), &Some(record.clone()));
        assert_eq!(
            outcomes[1].as_ref().unwrap(),
            &None,
            "expired at its own now"
        );
        assert_eq!(outcomes[2].as_ref().unwrap(), &None, "missing");
        assert!(outcomes[3].as_ref().unwrap_err().is_decode());
        assert!(outcomes[4].as_ref().unwrap_err().is_decode());
        assert_eq!(outcomes[5].as_ref().unwrap(), &Some(record));
    }
}
