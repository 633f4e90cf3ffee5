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
//!
//! On a quiet process, a job runs on its caller's task instead, as the
//! writer would run it (a lone job, alone), and the writers hold the jobs
//! that queue meanwhile as they would behind a batch of their own. So a
//! lone request costs no hand-off between tasks, and batches form as
//! before.
//!
//! While few jobs are under way, a store serves them as a pool of
//! connections would serve their callers, each at once: the writers of
//! PostgreSQL and MySQL let out several batches side by side, and Redis's
//! callers run their jobs alone on the multiplexed connection. With more,
//! batches go out one (Redis: two) at a time, so that the jobs that queue
//! meanwhile go out together.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::{Error, Result, SessionKey};

/// A compare-and-swap queued for a writer, and where its outcome goes.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "redis"))]
pub(crate) struct SwapJob {
    pub(crate) key: crate::SessionKey,
    pub(crate) expected_version: u64,
    pub(crate) record: crate::Record,
    pub(crate) now: crate::Timestamp,
    pub(crate) reply: oneshot::Sender<Result<bool>>,
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "redis"))]
impl SessionJob for SwapJob {
    fn key(&self) -> &SessionKey {
        &self.key
    }
}

/// How many jobs may wait for a writer before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// How many lone batches in a row, each leaving no other job queued, make
/// a writer call its process quiet (see [`Writers::run`]).
///
/// There is nothing to batch a job with on a quiet server, and the two
/// hand-offs to a writer task and back cost it much of its CPU: one
/// user's PostgreSQL read-modify-writes used 186 µs of the server's CPU
/// each through the writers, against 133 µs run alone, and made 15% more
/// requests (MySQL: 15%). Under load, a moment with nothing out comes
/// now and then, between two batches: running alone every job that found
/// one (0.6% of the jobs with 64 users) made PostgreSQL's
/// read-modify-writes 10-15% slower in paired runs, for reasons not found.
const IDLE_STREAK: usize = 8;

/// How many jobs may be under way, on average as batches go out (see
/// [`Demand`]), for a writer to send them side by side as
/// [`Batching::side_by_side_when_few`] allows.
///
/// A few callers gain nothing from waiting for each other's round trips:
/// with four users, PostgreSQL's read-modify-writes waited for the batch
/// out before theirs and made 0.66× the requests of tower-sessions, whose
/// pool serves each at once (MySQL: 0.77×). Let out side by side, they
/// made 1.32× as many as one batch at a time (MySQL: 1.31×; medians of 4
/// and 5 paired runs of 2 s), and as many commits per request as before
/// with 64 users. Many jobs gain from going out together: past this, one
/// batch at a time costs the database less per job.
const FEW_JOBS: f64 = 3.0;

/// How many batches a writer lets out at once while few jobs are under
/// way: one for each of [`FEW_JOBS`] and one more, as a pool of
/// connections would serve them.
const FEW_JOBS_BATCHES_OUT: usize = 4;

/// A writer's running estimate of how many jobs are under way: those out,
/// going out and still queued, averaged over about the last ten batches.
/// Averaged, so that the moment between two batches does not pass for a
/// quiet one.
#[derive(Debug, Default)]
struct Demand {
    average: f64,
}

impl Demand {
    /// Counts the `jobs` under way as a batch goes out.
    fn count(&mut self, jobs: usize) {
        self.average += (jobs as f64 - self.average) / 10.0;
    }

    fn is_few(&self) -> bool {
        self.average <= FEW_JOBS
    }
}

/// The runtime a writer runs on, and its queue.
type RuntimeWriter<J> = (tokio::runtime::Id, mpsc::Sender<J>);

/// The queues of the writers of one table, one per runtime.
pub(crate) struct Writers<J> {
    queues: Mutex<Vec<RuntimeWriter<J>>>,
    shared: Arc<Shared>,
}

/// What the writers of a table share with their callers.
#[derive(Debug, Default)]
struct Shared {
    /// How many callers may run their jobs alone at once; none unless
    /// the process is quiet. Set to one by a writer that sent
    /// [`IDLE_STREAK`] lone batches in a row, or to
    /// [`FEW_JOBS_BATCHES_OUT`] by one that runs jobs
    /// [alone when few](Batching::alone_when_few) are under way; cleared
    /// by a caller that finds that many running alone. Under load callers
    /// only read it.
    alone_at_once: AtomicUsize,
    /// How many jobs run on their callers' tasks.
    alone: AtomicUsize,
    /// Wakes the writers when the last of those is done.
    alone_done: Notify,
}

/// A writer's end of its queue.
pub(crate) struct Queue<J> {
    jobs: mpsc::Receiver<J>,
    shared: Arc<Shared>,
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
            shared: Arc::default(),
        }
    }
}

impl<J: Send + 'static> Writers<J> {
    /// Runs `job` and waits for its outcome, which `outcome` receives.
    ///
    /// When this process is quiet (its writers sent [`IDLE_STREAK`] lone
    /// batches in a row, and no job runs alone now; or, for writers that
    /// run jobs [alone when few](Batching::alone_when_few), few jobs are
    /// under way and fewer than [`FEW_JOBS_BATCHES_OUT`] run alone), the
    /// job runs on the caller's task as `alone(job)`, which answers it,
    /// and the writers hold the jobs that queue meanwhile, as they would
    /// behind batches of their own.
    /// Otherwise the job goes to the writer on the caller's runtime, first
    /// started as `start(queue)` if needed; outside a tokio runtime it runs
    /// alone.
    pub(crate) async fn run<T, F, A>(
        &self,
        store: &'static str,
        mut job: J,
        outcome: oneshot::Receiver<Result<T>>,
        start: impl Fn(Queue<J>) -> F,
        alone: impl FnOnce(J) -> A,
    ) -> Result<T>
    where
        F: Future<Output = ()> + Send + 'static,
        A: Future<Output = ()>,
    {
        let running_alone = Alone::try_enter(&self.shared);
        if running_alone.is_none() {
            match self.send(job, start).await {
                Ok(()) => return answer(store, outcome).await,
                Err(refused) => job = refused,
            }
        }
        alone(job).await;
        drop(running_alone);
        answer(store, outcome).await
    }

    /// Queues `job` for the writer on the caller's runtime, first starting
    /// one as `start(queue)` if there is none or it has stopped. Gives the
    /// job back outside a tokio runtime.
    async fn send<F>(&self, mut job: J, start: impl Fn(Queue<J>) -> F) -> std::result::Result<(), J>
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

    fn queue<F>(&self, start: impl Fn(Queue<J>) -> F) -> Option<mpsc::Sender<J>>
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
        let shared = Arc::clone(&self.shared);
        runtime.spawn(start(Queue { jobs, shared }));
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

/// A job running on its caller's task, counted while this lives; the
/// writers wake when the last such job is done.
struct Alone<'a>(&'a Shared);

impl<'a> Alone<'a> {
    /// A job run alone, if the process is quiet and fewer jobs than it
    /// allows run alone; otherwise the process is no longer quiet.
    fn try_enter(shared: &'a Shared) -> Option<Self> {
        let at_once = shared.alone_at_once.load(Ordering::Relaxed);
        if at_once == 0 {
            return None;
        }
        let entered = Self(shared);
        if shared.alone.fetch_add(1, Ordering::SeqCst) < at_once {
            return Some(entered);
        }
        shared.alone_at_once.store(0, Ordering::Relaxed);
        None
    }
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        if self.0.alone.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.alone_done.notify_waiters();
        }
    }
}

/// A job queued for a writer: the session it is for.
pub(crate) trait SessionJob {
    fn key(&self) -> &SessionKey;
}

/// How a writer sends the jobs that queue out in batches.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batching {
    /// The most jobs one batch holds.
    pub(crate) max_jobs: usize,
    /// How many batches may be out at once, a job run on its caller's
    /// task counting as one. With one, the jobs that queue while a batch
    /// is out wait for it, and go out together.
    pub(crate) max_batches_out: usize,
    /// How many batches may be out at once while few jobs are under way
    /// (see [`FEW_JOBS`]), if more than `max_batches_out`.
    pub(crate) few_jobs_batches_out: usize,
    /// Whether, while few jobs are under way (see [`FEW_JOBS`]), callers
    /// run their jobs alone, up to [`FEW_JOBS_BATCHES_OUT`] at once.
    pub(crate) alone_when_few: bool,
    /// Whether a batch holds at most one job of a session (a statement
    /// can change a row only once); the session's later jobs wait for
    /// later batches, in the order they queued.
    pub(crate) one_per_session: bool,
}

impl Batching {
    /// One batch out at a time, of up to `max_jobs` jobs, sessions repeating.
    pub(crate) const fn one_at_a_time(max_jobs: usize) -> Self {
        Self {
            max_jobs,
            max_batches_out: 1,
            few_jobs_batches_out: 1,
            alone_when_few: false,
            one_per_session: false,
        }
    }

    /// As `self`, but while few jobs are under way (see [`FEW_JOBS`]),
    /// callers run their jobs alone, up to [`FEW_JOBS_BATCHES_OUT`] at
    /// once: for a store whose connection is multiplexed, where a job
    /// alone takes no connection, and so nothing from a job on another
    /// task, and spares two hand-offs between tasks.
    pub(crate) const fn alone_when_few(self) -> Self {
        Self {
            alone_when_few: true,
            ..self
        }
    }

    /// As `self`, but while few jobs are under way (see [`FEW_JOBS`]),
    /// up to [`FEW_JOBS_BATCHES_OUT`] batches go out at once: for a store
    /// that serves statements side by side, on connections of a pool.
    pub(crate) const fn side_by_side_when_few(self) -> Self {
        Self {
            few_jobs_batches_out: FEW_JOBS_BATCHES_OUT,
            ..self
        }
    }

    /// How many batches may be out at once, given the jobs under way.
    fn batches_out(&self, demand: &Demand) -> usize {
        if demand.is_few() {
            self.max_batches_out.max(self.few_jobs_batches_out)
        } else {
            self.max_batches_out
        }
    }
}

/// A writer's loop: takes the jobs that queued, as `batching` allows, and
/// runs each batch as `run(batch)`, until every queue handle is gone and
/// every batch has come back. Each batch is polled once before the next
/// is taken, so batches that send a command on a multiplexed connection
/// at their first poll send them in the order they were taken, and Redis
/// runs them so.
pub(crate) async fn run_batches<J: SessionJob, F>(
    queue: Queue<J>,
    batching: Batching,
    run: impl Fn(Vec<J>) -> F,
) where
    F: Future<Output = ()>,
{
    use futures_util::StreamExt as _;
    let Queue { mut jobs, shared } = queue;
    let mut queued: Vec<J> = Vec::with_capacity(batching.max_jobs);
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    let mut lone_batches = 0;
    let mut demand = Demand::default();
    let mut jobs_out = 0;
    loop {
        let alone_done = shared.alone_done.notified();
        tokio::pin!(alone_done);
        let mut alone = shared.alone.load(Ordering::SeqCst);
        if alone > 0 {
            // Listening before counting again, so that a job that ends
            // alone in between still wakes this writer.
            alone_done.as_mut().enable();
            alone = shared.alone.load(Ordering::SeqCst);
        }
        let batches_out = batching.batches_out(&demand);
        let may_send = |running: usize| running + alone < batches_out;
        if may_send(running.len()) && !queued.is_empty() {
            let batch = if batching.one_per_session {
                take_one_per_session(&mut queued)
            } else {
                // `split_off` hands over exactly the jobs and keeps the capacity.
                queued.split_off(0)
            };
            lone_batches = if batch.len() == 1 && queued.is_empty() && jobs.is_empty() {
                lone_batches + 1
            } else {
                0
            };
            if lone_batches == IDLE_STREAK {
                shared.alone_at_once.fetch_max(1, Ordering::Relaxed);
                // Once a caller ends the quiet, the count starts again.
                lone_batches = 0;
            }
            demand.count(jobs_out + batch.len() + queued.len());
            if batching.alone_when_few && demand.is_few() {
                let at_once = FEW_JOBS_BATCHES_OUT;
                shared.alone_at_once.store(at_once, Ordering::Relaxed);
            }
            jobs_out += batch.len();
            let (jobs, sent) = (batch.len(), run(batch));
            running.push(async move {
                sent.await;
                jobs
            });
        }
        if !open && queued.is_empty() && running.is_empty() {
            break;
        }
        let room = batching.max_jobs.saturating_sub(queued.len());
        tokio::select! {
            biased;
            Some(back) = running.next(), if !running.is_empty() => jobs_out -= back,
            received = jobs.recv_many(&mut queued, room), if open && room > 0 && may_send(running.len()) => {
                open = received > 0;
            }
            () = &mut alone_done, if alone > 0 => {}
            // Unreachable: with nothing out, every queued job can go out.
            else => break,
        }
    }
}

/// Takes from `queued` the first job of each session, in order; the
/// others stay, in order.
fn take_one_per_session<J: SessionJob>(queued: &mut Vec<J>) -> Vec<J> {
    let mut sessions = std::collections::HashSet::with_capacity(queued.len());
    let (batch, later): (Vec<J>, Vec<J>) = queued
        .drain(..)
        .partition(|job| sessions.insert(*job.key()));
    *queued = later;
    batch
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, oneshot};

    use super::{
        Alone, Batching, IDLE_STREAK, Queue, SessionJob, Shared, Writers, run_batches,
        take_one_per_session,
    };
    use crate::{SessionId, SessionKey};

    /// A job the tests can tell apart: its number, and its session.
    #[derive(Debug)]
    struct Numbered(u32, SessionKey);

    impl SessionJob for Numbered {
        fn key(&self) -> &SessionKey {
            &self.1
        }
    }

    /// A batch the test holds open: its jobs' numbers, and the sender that ends it.
    type Held = (Vec<u32>, oneshot::Sender<()>);

    /// A writer running as `batching` on a current-thread runtime (so that
    /// it runs exactly when the test yields), with batches the test ends.
    struct Writer {
        queue: Option<mpsc::Sender<Numbered>>,
        shared: Arc<Shared>,
        started: Arc<Mutex<Vec<Held>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Writer {
        fn start(batching: Batching) -> Self {
            let (queue, jobs) = mpsc::channel(64);
            let shared = Arc::<Shared>::default();
            let started: Arc<Mutex<Vec<Held>>> = Arc::default();
            let queue_end = Queue {
                jobs,
                shared: Arc::clone(&shared),
            };
            let task = tokio::spawn({
                let started = Arc::clone(&started);
                run_batches(queue_end, batching, move |batch: Vec<Numbered>| {
                    let (end, ended) = oneshot::channel();
                    let numbers = batch.iter().map(|job| job.0).collect();
                    started.lock().unwrap().push((numbers, end));
                    async move {
                        let _ = ended.await;
                    }
                })
            });
            Self {
                queue: Some(queue),
                shared,
                started,
                task,
            }
        }

        /// Queues the jobs numbered `numbers`, of `session`, and lets the writer run.
        async fn send(&self, numbers: impl IntoIterator<Item = u32>, session: SessionKey) {
            for number in numbers {
                let queue = self.queue.as_ref().unwrap();
                queue.send(Numbered(number, session)).await.unwrap();
            }
            settle().await;
        }

        /// The jobs of the batches out, in the order they went out.
        fn out(&self) -> Vec<Vec<u32>> {
            let started = self.started.lock().unwrap();
            started.iter().map(|(jobs, _)| jobs.clone()).collect()
        }

        /// Ends the batch out that went out first, and lets the writer run.
        async fn end_first(&self) {
            let (_, end) = self.started.lock().unwrap().remove(0);
            end.send(()).unwrap();
            settle().await;
        }

        /// Closes the queue and ends every batch, until the writer stops.
        async fn stop(mut self) {
            self.queue = None;
            while !self.task.is_finished() {
                let ends: Vec<_> = self.started.lock().unwrap().drain(..).collect();
                for (_, end) in ends {
                    end.send(()).unwrap();
                }
                settle().await;
            }
            self.task.await.unwrap();
        }
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn on_one_thread(test: impl std::future::Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(test);
    }

    fn session() -> SessionKey {
        SessionId::generate().key()
    }

    /// As the SQL stores batch: one batch out at a time.
    const ONE_AT_A_TIME: Batching = Batching::one_at_a_time(256);

    #[test]
    fn batches_go_out_in_order_and_at_most_so_many_at_once() {
        on_one_thread(async {
            let writer = Writer::start(Batching {
                max_batches_out: 2,
                ..Batching::one_at_a_time(3)
            });
            writer.send([1], session()).await;
            assert_eq!(writer.out(), [vec![1]]);
            // The first batch is still out: the next goes out beside it,
            // taking at most three of the queued jobs.
            writer.send(2..=6, session()).await;
            assert_eq!(writer.out(), [vec![1], vec![2, 3, 4]]);
            // Two are out: the rest wait until one comes back.
            settle().await;
            assert_eq!(writer.out().len(), 2);
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![2, 3, 4], vec![5, 6]]);
            writer.stop().await;
        });
    }

    #[test]
    fn the_jobs_that_queue_while_a_batch_is_out_go_out_together_after_it() {
        on_one_thread(async {
            let writer = Writer::start(ONE_AT_A_TIME);
            writer.send([1], session()).await;
            writer.send(2..=4, session()).await;
            assert_eq!(writer.out(), [vec![1]]);
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![2, 3, 4]]);
            writer.stop().await;
        });
    }

    /// As the SQL stores batch: one batch out at a time, unless few jobs
    /// are under way.
    const SIDE_BY_SIDE_WHEN_FEW: Batching = ONE_AT_A_TIME.side_by_side_when_few();

    #[test]
    fn few_jobs_under_way_go_out_side_by_side_as_a_pool_would_serve_them() {
        on_one_thread(async {
            let writer = Writer::start(SIDE_BY_SIDE_WHEN_FEW);
            for number in 1..=5 {
                writer.send([number], session()).await;
            }
            assert_eq!(writer.out(), [vec![1], vec![2], vec![3], vec![4]]);
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![2], vec![3], vec![4], vec![5]]);
            writer.stop().await;
        });
    }

    #[test]
    fn many_jobs_under_way_go_out_one_batch_at_a_time_until_they_are_few_again() {
        on_one_thread(async {
            let writer = Writer::start(SIDE_BY_SIDE_WHEN_FEW);
            writer.send([1], session()).await;
            writer.send(2..=40, session()).await;
            assert_eq!(writer.out(), [vec![1], (2..=40).collect()]);
            // So many jobs under way: the next waits for the batches out.
            writer.send([41], session()).await;
            assert_eq!(writer.out().len(), 2);
            writer.end_first().await;
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![41]]);
            // Lone jobs, one after another: soon they are few again.
            let mut number = 42;
            while writer.out().len() == 1 {
                assert!(number < 52, "still one at a time after ten lone batches");
                writer.send([number], session()).await;
                if writer.out().len() == 1 {
                    writer.end_first().await;
                }
                number += 1;
            }
            assert!(number > 43, "side by side again at once");
            writer.stop().await;
        });
    }

    #[test]
    fn a_job_run_alone_holds_the_writer_as_a_batch_out_would() {
        on_one_thread(async {
            let writer = Writer::start(ONE_AT_A_TIME);
            writer.shared.alone_at_once.store(1, Ordering::Relaxed);
            let alone = Alone::try_enter(&writer.shared).expect("quiet");
            writer.send(1..=2, session()).await;
            assert!(writer.out().is_empty(), "held while the job runs alone");
            drop(alone);
            settle().await;
            assert_eq!(writer.out(), [vec![1, 2]], "sent together once it is done");
            writer.stop().await;
        });
    }

    #[test]
    fn a_session_has_one_job_in_a_batch_and_its_jobs_keep_their_order() {
        on_one_thread(async {
            let writer = Writer::start(Batching {
                one_per_session: true,
                ..ONE_AT_A_TIME
            });
            let [a, b] = [session(), session()];
            writer.send([1], a).await;
            writer.send([2, 3], a).await;
            writer.send([4], b).await;
            writer.send([5], a).await;
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![2, 4]]);
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![3]]);
            writer.end_first().await;
            assert_eq!(writer.out(), [vec![5]]);
            writer.stop().await;
        });
    }

    #[test]
    fn a_closed_queue_still_sends_every_job_it_holds() {
        on_one_thread(async {
            let writer = Writer::start(Batching {
                max_jobs: 2,
                one_per_session: true,
                ..ONE_AT_A_TIME
            });
            let a = session();
            writer.send([1], a).await;
            writer.send([2, 3, 4], a).await;
            let started = Arc::clone(&writer.started);
            writer.stop().await;
            assert!(started.lock().unwrap().is_empty());
        });
    }

    #[test]
    fn each_batch_takes_the_first_job_of_each_session_in_order() {
        let [a, b, c] = [(); 3].map(|()| session());
        let mut queued: Vec<_> = [a, b, a, c, a, b]
            .into_iter()
            .zip(0..)
            .map(|(key, number)| Numbered(number, key))
            .collect();
        let mut batches = Vec::new();
        while !queued.is_empty() {
            let batch = take_one_per_session(&mut queued);
            batches.push(batch.iter().map(|job| job.0).collect::<Vec<_>>());
        }
        assert_eq!(batches, [vec![0, 1, 3], vec![2, 5], vec![4]]);
    }

    /// A job that answers where it ran.
    type Answered = (SessionKey, oneshot::Sender<crate::Result<&'static str>>);

    impl SessionJob for Answered {
        fn key(&self) -> &SessionKey {
            &self.0
        }
    }

    /// Runs a job through `writers`, whose writer sends it in a batch and
    /// answers "writer"; run alone, it answers "alone".
    async fn run_job(writers: &Writers<Answered>) -> &'static str {
        run_job_batching(writers, ONE_AT_A_TIME).await
    }

    /// [`run_job`], with a writer that batches as `batching`.
    async fn run_job_batching(writers: &Writers<Answered>, batching: Batching) -> &'static str {
        let (reply, outcome) = oneshot::channel();
        let start = |queue| {
            run_batches(queue, batching, |batch: Vec<Answered>| async move {
                for (_, reply) in batch {
                    let _ = reply.send(Ok("writer"));
                }
            })
        };
        let alone = async |(_, reply): Answered| {
            // As a round trip would, letting other callers in meanwhile.
            tokio::task::yield_now().await;
            let _ = reply.send(Ok("alone"));
        };
        writers
            .run("test", (session(), reply), outcome, start, alone)
            .await
            .unwrap()
    }

    #[test]
    fn a_job_runs_alone_once_its_writer_has_sent_lone_batches_a_while() {
        on_one_thread(async {
            let writers = Writers::default();
            for _ in 0..IDLE_STREAK {
                assert_eq!(run_job(&writers).await, "writer");
            }
            assert_eq!(run_job(&writers).await, "alone");
            assert_eq!(run_job(&writers).await, "alone");
            // Two callers at once: the second finds the first running alone.
            let (first, second) = tokio::join!(run_job(&writers), run_job(&writers));
            assert_eq!([first, second], ["alone", "writer"]);
            // The process is no longer quiet, until the writer has sent
            // lone batches a while again (the second job was the first).
            for _ in 1..IDLE_STREAK {
                assert_eq!(run_job(&writers).await, "writer");
            }
            assert_eq!(run_job(&writers).await, "alone");
        });
    }

    #[test]
    fn with_few_jobs_under_way_up_to_four_run_alone_at_once() {
        on_one_thread(async {
            let batching = ONE_AT_A_TIME.alone_when_few();
            let writers = Writers::default();
            let run = || run_job_batching(&writers, batching);
            assert_eq!(run().await, "writer", "its batch finds few jobs under way");
            let four = futures_util::future::join_all((0..4).map(|_| run())).await;
            assert_eq!(four, ["alone"; 4]);
            // A fifth at once finds four alone: it goes to the writer,
            // which finds few under way again.
            let five = futures_util::future::join_all((0..5).map(|_| run())).await;
            assert_eq!(five, ["alone", "alone", "alone", "alone", "writer"]);
            assert_eq!(run().await, "alone");
        });
    }

    #[test]
    fn with_many_jobs_under_way_none_runs_alone() {
        on_one_thread(async {
            let writer = Writer::start(ONE_AT_A_TIME.alone_when_few());
            let at_once = || writer.shared.alone_at_once.load(Ordering::Relaxed);
            writer.send([1], session()).await;
            assert_eq!(at_once(), 4, "one job under way is few");
            // A caller found four alone; then many jobs queue.
            writer.shared.alone_at_once.store(0, Ordering::Relaxed);
            writer.send(2..=40, session()).await;
            writer.end_first().await;
            assert_eq!(writer.out(), [(2..=40).collect::<Vec<_>>()]);
            assert_eq!(at_once(), 0, "39 jobs under way are many");
            writer.stop().await;
        });
    }

    #[test]
    fn without_alone_when_few_a_lone_batch_leaves_the_process_busy() {
        on_one_thread(async {
            let writers = Writers::default();
            assert_eq!(run_job(&writers).await, "writer");
            let (first, second) = tokio::join!(run_job(&writers), run_job(&writers));
            assert_eq!([first, second], ["writer", "writer"]);
        });
    }

    #[test]
    fn batches_of_more_than_one_job_keep_the_process_busy() {
        on_one_thread(async {
            let writers = Writers::default();
            for _ in 0..IDLE_STREAK * 3 {
                let (first, second) = tokio::join!(run_job(&writers), run_job(&writers));
                assert_eq!([first, second], ["writer", "writer"]);
            }
        });
    }
}
