//! One writer task per tokio runtime, fed by a queue: the plumbing shared
//! by SQLite's group commit (`store/group_commit.rs`), the batched loads
//! and compare-and-swaps of PostgreSQL and MySQL (`store/batched_load.rs`,
//! `store/batched_swap.rs`), PostgreSQL's batched leases
//! (`store/batched_lease.rs`) and Redis's batched loads and saves
//! (`store/redis.rs`).
//!
//! A writer lives on the runtime of the callers that queue jobs for it: a
//! writer on another runtime might never run, as a current-thread runtime
//! runs tasks only while something blocks on it. So each runtime that
//! writes gets its own writer (usually there is one), started at its first
//! job and started again if that runtime has shut down since. A writer
//! ends when every handle to its queue is gone.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// A compare-and-swap queued for a writer, and where its outcome goes.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "redis"))]
pub(crate) struct SwapJob {
    pub(crate) key: crate::SessionKey,
    pub(crate) expected_version: u64,
    pub(crate) record: crate::Record,
    pub(crate) now: crate::Timestamp,
    pub(crate) reply: oneshot::Sender<Result<bool>>,
}

/// How many jobs may wait for a writer before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// The runtime a writer runs on, and its queue.
type RuntimeWriter<J> = (tokio::runtime::Id, mpsc::Sender<J>);

/// The queues of the writers of one table, one per runtime.
pub(crate) struct Writers<J> {
    queues: Mutex<Vec<RuntimeWriter<J>>>,
}

impl<J> std::fmt::Debug for Writers<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writers").finish_non_exhaustive()
    }
}

impl<J> Default for Writers<J> {
    fn default() -> Self {
        Self {
            queues: Mutex::default(),
        }
    }
}

impl<J: Send + 'static> Writers<J> {
    /// Queues `job` for the writer on the caller's runtime, first starting
    /// one as `start(queue)` if there is none or it has stopped. Gives the
    /// job back outside a tokio runtime.
    pub(crate) async fn send<F>(
        &self,
        mut job: J,
        start: impl Fn(mpsc::Receiver<J>) -> F,
    ) -> std::result::Result<(), J>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // A writer whose runtime is shutting down refuses the job: start another.
        for _ in 0..2 {
            let Some(queue) = self.queue(&start) else {
                break;
            };
            match queue.send(job).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(refused)) => job = refused,
            }
        }
        Err(job)
    }

    fn queue<F>(&self, start: impl Fn(mpsc::Receiver<J>) -> F) -> Option<mpsc::Sender<J>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.retain(|(_, queue)| !queue.is_closed());
        if let Some((_, queue)) = queues.iter().find(|(id, _)| *id == runtime.id()) {
            return Some(queue.clone());
        }
        let (queue, jobs) = mpsc::channel(QUEUE);
        runtime.spawn(start(jobs));
        queues.push((runtime.id(), queue.clone()));
        Some(queue)
    }

    /// Whether a writer runs on the runtime `id`, for tests.
    #[cfg(all(test, feature = "sqlite"))]
    pub(crate) fn runs_on(&self, id: tokio::runtime::Id) -> bool {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .iter()
            .any(|(runtime, queue)| *runtime == id && !queue.is_closed())
    }
}

/// A writer's loop for batches that need not wait for one another: takes
/// the jobs that queued, at most `max_batch` at a time, and runs each batch
/// as `run(batch)`, up to `in_flight` batches at once, until every queue
/// handle is gone. Each batch is polled once before the next is taken, so
/// batches that send a command on a multiplexed connection at their first
/// poll send them in the order they were taken, and Redis runs them so.
///
/// With one batch at a time, the jobs that queue meanwhile wait a whole
/// round trip before theirs goes out, and the connection and the server
/// idle while the writer answers a batch: one batch in flight capped
/// Redis's store-level loads and saves.
#[cfg(feature = "redis")]
pub(crate) async fn run_batches_in_flight<J, F>(
    mut jobs: mpsc::Receiver<J>,
    max_batch: usize,
    in_flight: usize,
    run: impl Fn(Vec<J>) -> F,
) where
    F: Future<Output = ()>,
{
    use futures_util::StreamExt as _;
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            received = jobs.recv_many(&mut batch, max_batch), if running.len() < in_flight => {
                if received == 0 {
                    break;
                }
                // `split_off` hands over exactly the jobs and keeps the capacity.
                running.push(run(batch.split_off(0)));
            }
        }
    }
    while running.next().await.is_some() {}
}

/// The outcome a writer sends back for a job; a backend error of `store`
/// if the writer stopped (its runtime shut down) before answering.
pub(crate) async fn answer<T>(
    store: &'static str,
    outcome: oneshot::Receiver<Result<T>>,
) -> Result<T> {
    outcome.await.unwrap_or_else(|_| {
        Err(Error::backend(
            store,
            "the session writer stopped (its runtime shut down) before answering",
        ))
    })
}

/// Sends `err` to every caller of `replies`: the first gets it whole, the
/// others a copy without its source.
pub(crate) fn answer_all<T>(
    replies: impl IntoIterator<Item = oneshot::Sender<Result<T>>>,
    err: Error,
) {
    let mut replies = replies.into_iter();
    let Some(first) = replies.next() else {
        return;
    };
    for reply in replies {
        // A caller that gave up no longer listens.
        let _ = reply.send(Err(err.duplicate()));
    }
    let _ = first.send(Err(err));
}

/// Whether `err` is a statement the database refused (a constraint, a
/// trigger, a value out of range), which may be the fault of one item of a
/// batch, rather than a failure to reach the server or a timeout, which each
/// item would meet again on its own.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) fn is_refused_statement(err: &Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<sqlx::Error>())
        .is_some_and(|source| matches!(source, sqlx::Error::Database(_)))
}

/// After a batch the database refused (see [`is_refused_statement`]): runs
/// each of `jobs` on its own, all at once, as `alone` runs and answers it,
/// so that the refusal reaches only the jobs refused alone.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) async fn run_each_alone<J, F>(jobs: impl IntoIterator<Item = J>, alone: impl Fn(J) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for job in jobs {
        running.spawn(alone(job));
    }
    while running.join_next().await.is_some() {}
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, oneshot};

    use super::run_batches_in_flight;

    /// A batch the test holds open: its jobs, and the sender that ends it.
    type Held = (Vec<u32>, oneshot::Sender<()>);

    #[test]
    fn batches_go_out_in_order_and_at_most_so_many_at_once() {
        // One thread: the writer runs exactly when the test yields.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (queue, jobs) = mpsc::channel(16);
            let started: Arc<Mutex<Vec<Held>>> = Arc::default();
            let writer = tokio::spawn({
                let started = Arc::clone(&started);
                run_batches_in_flight(jobs, 3, 2, move |batch: Vec<u32>| {
                    let (end, ended) = oneshot::channel();
                    started.lock().unwrap().push((batch, end));
                    async move {
                        let _ = ended.await;
                    }
                })
            });
            let batches = || -> Vec<Vec<u32>> {
                let started = started.lock().unwrap();
                started.iter().map(|(jobs, _)| jobs.clone()).collect()
            };
            let settle = || async {
                for _ in 0..50 {
                    tokio::task::yield_now().await;
                }
            };
            queue.send(1).await.unwrap();
            settle().await;
            assert_eq!(batches(), [vec![1]]);
            // The first batch is still running: the next goes out beside it,
            // taking at most three of the queued jobs.
            for job in 2..=6 {
                queue.send(job).await.unwrap();
            }
            settle().await;
            assert_eq!(batches(), [vec![1], vec![2, 3, 4]]);
            // Two are running: the rest wait until one ends.
            settle().await;
            assert_eq!(batches().len(), 2);
            let (_, end) = started.lock().unwrap().remove(0);
            end.send(()).unwrap();
            settle().await;
            assert_eq!(batches(), [vec![2, 3, 4], vec![5, 6]]);
            drop(queue);
            for (_, end) in started.lock().unwrap().drain(..) {
                end.send(()).unwrap();
            }
            writer.await.unwrap();
        });
    }
}
