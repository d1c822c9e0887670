//! The queue consumer around [`ShardSampler`]: take a shard, make sure the
//! job's model and features are on local disk, sample, write the shard
//! output at its deterministic key, record completion in the progress store
//! and only then ack. A crash anywhere before the ack redelivers the shard;
//! the re-run writes identical bytes and the completion counts once.
//!
//! # Sampling while the previous shard uploads
//!
//! The consumer holds up to two deliveries (prefetch 2): once a shard is
//! sampled, its upload (object written, completion recorded, then the ack)
//! runs as a task while the consumer takes and samples the next shard. At
//! most one upload is in flight: before handing over the next one, the
//! consumer waits for the previous, whose verdict (a transient failure's
//! pause, say) then applies. So a slow object store costs throughput only
//! where an upload takes longer than sampling a shard. A crash while both
//! are open redelivers both; the cost of the second delivery is that a
//! worker may hold one shard more than it samples (it waits in the
//! prefetch buffer while the current one samples).
//!
//! # Ending a shard early
//!
//! - **The job ended** (cancelled through the API, or failed, or finished by
//!   a duplicate delivery): before sampling, the worker reads the job's
//!   state and acks a shard of a final job without doing anything. While a
//!   shard samples, a watcher reads the state every
//!   [`WorkerSettings::cancel_poll`] and raises a [`StopFlag`] that the
//!   sampler checks between batches; the shard is then acked, neither written
//!   nor recorded. Shards finished earlier stay in the store.
//! - **Shutdown** (SIGTERM to `digctl worker`): no new shard is taken; the
//!   shard in progress may finish for [`WorkerSettings::shutdown_grace`],
//!   after which the same flag stops it at its next batch and the delivery is
//!   requeued for another worker. [`Worker::run`] then returns `Ok`.
//!
//! # Failures and attempts
//!
//! A failure is *transient* when the shard is not at fault and a later try
//! can succeed unchanged: the object store unreachable or timing out
//! (`object_store`'s `Generic` errors: connection failures, timeouts and 5xx
//! once its own retries are spent), Redis unreachable, the broker
//! disconnected, the local cache disk. Everything else is *permanent*: a
//! missing spec, model or features object, unreadable data, a sampler error.
//! See [`WorkerError::is_transient`].
//!
//! Deaths are not failures. Every attempt is counted in the progress store
//! when it *starts* ([`ProgressStore::start_attempt`]), before anything can
//! go wrong; one that ends in an error the worker reports is also counted as
//! *failed* ([`ProgressStore::record_attempt_failed`]); one that ends for a
//! reason that is not the shard's (a transient failure, a shutdown past its
//! grace) is taken back ([`ProgressStore::forgive_attempt`]); a successful
//! one is acked and never starts again. So every earlier start that is
//! neither failed nor taken back was a *death*: its worker was SIGKILLed,
//! preempted, ran out of memory or crashed, and never reported anything
//! ([`ShardAttempts::deaths`]). On a preemptible fleet deaths are routine and
//! cost nothing: only reported failures count towards `max_attempts`. A
//! separate, larger cap, `max_deaths`, parks a shard whose workers have died
//! that many times without it being run again, so a shard that takes down
//! every worker running it (a crash that kills the process) cannot loop
//! forever; the job's error says which cap it was. A transient failure
//! requeues the shard at once and pauses this worker's consuming for a
//! backoff (1 s doubling to 30 s, reset by the next shard handled), so other
//! workers can take the shard meanwhile and an outage is not a hot loop.
//! Reported (permanent) failures are retried until `max_attempts`, then the
//! shard is parked (the parking queue) and its failure recorded with the
//! reason, which fails the job.
//!
//! The price: a failure taken for transient that is in fact lasting (every
//! worker's cache disk broken, a store answering every write with an error
//! it files under `Generic`) is retried for as long as it lasts, at most
//! every 30 s per worker and logged each time, instead of failing the job.
//! And a worker killed at the end of a shutdown (the platform's deadline
//! shorter than `shutdown_grace`, or a second signal) counts like a crash:
//! keep the grace below Kubernetes' `terminationGracePeriodSeconds`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dig_common::error::store_is_transient;
use dig_common::job::{JobId, JobSpec, ShardTask};
use dig_common::layout::ObjectLayout;
use dig_common::metrics;
use dig_common::progress::{ProgressStore, ShardAttempts, WorkerHeartbeat};
use dig_common::queue::{ShardDelivery, ShardQueue, ShardStream};
use dig_common::store::FeatureStore;
use dig_common::CommonError;
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use tch::Device;
use tokio::sync::watch;
use tracing::Instrument;

use crate::shard::{ShardError, ShardSampler};

/// What a worker needs to know besides its connections.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub id: String,
    pub device: Device,
    pub batch_size: usize,
    pub pair_cache_bytes: u64,
    /// Local copies of models and features.
    pub cache_dir: PathBuf,
    /// Attempts per shard that ended in a reported error before it is
    /// parked and its job fails.
    pub max_attempts: u32,
    /// Attempts per shard whose worker died (reported nothing) before it is
    /// parked; deaths never count towards `max_attempts`.
    pub max_deaths: u32,
    /// Seconds between heartbeats; a worker is listed for three of them.
    pub heartbeat_secs: u64,
    /// After shutdown is asked for, how long the shard in progress may run
    /// on before it is stopped at a batch boundary and requeued.
    pub shutdown_grace: Duration,
    /// How often the job of the shard in progress is checked for a final
    /// state (a cancellation).
    pub cancel_poll: Duration,
    /// Pause after a transient failure; doubles up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            id: "worker".into(),
            device: Device::Cpu,
            batch_size: 8,
            pair_cache_bytes: 4096 << 20,
            cache_dir: "dig-cache".into(),
            max_attempts: 3,
            max_deaths: 20,
            heartbeat_secs: 10,
            shutdown_grace: Duration::from_secs(60),
            cancel_poll: Duration::from_secs(1),
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

/// The backing services a worker talks to.
#[derive(Clone)]
pub struct WorkerContext {
    pub queue: Arc<dyn ShardQueue>,
    pub store: Arc<dyn ObjectStore>,
    pub layout: ObjectLayout,
    pub features: Arc<FeatureStore>,
    pub progress: Arc<dyn ProgressStore>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("{0}")]
    Other(String),
    /// The shard was stopped before it was complete; nothing was written.
    #[error("shard stopped: {0}")]
    Stopped(StopReason),
}

impl WorkerError {
    /// Whether the failure is not the shard's and a later try may succeed
    /// as it is (see the module docs): such a failure is retried without
    /// counting an attempt.
    pub fn is_transient(&self) -> bool {
        match self {
            WorkerError::Common(e) => common_is_transient(e),
            WorkerError::Store(e) => store_is_transient(e),
            WorkerError::Shard(_) | WorkerError::Other(_) => false,
            // Not a failure at all; the caller decides what a stop means.
            WorkerError::Stopped(_) => false,
        }
    }
}

fn common_is_transient(e: &CommonError) -> bool {
    // Local files are only the worker's cache: a full or broken disk is
    // this worker's trouble, not the shard's.
    e.unavailable().is_some() || matches!(e, CommonError::Io(_))
}

/// Why a shard in progress was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its job reached a final state (cancelled, failed or succeeded).
    JobEnded,
    /// The worker is shutting down and the grace period is over.
    Shutdown,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::JobEnded => "its job has ended",
            StopReason::Shutdown => "the worker is shutting down",
        })
    }
}

/// A request to stop the shard in progress at its next batch, shared between
/// the watcher and the sampling thread. The first reason given sticks.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    const RUN: u8 = 0;
    const JOB_ENDED: u8 = 1;
    const SHUTDOWN: u8 = 2;

    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a stop; whether this call was the first to ask.
    pub fn request(&self, why: StopReason) -> bool {
        let code = match why {
            StopReason::JobEnded => Self::JOB_ENDED,
            StopReason::Shutdown => Self::SHUTDOWN,
        };
        self.0
            .compare_exchange(Self::RUN, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            Self::JOB_ENDED => Some(StopReason::JobEnded),
            Self::SHUTDOWN => Some(StopReason::Shutdown),
            _ => None,
        }
    }

    pub fn is_set(&self) -> bool {
        self.reason().is_some()
    }
}

/// Pauses after transient failures: `start` doubling to `max`.
struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(start: Duration, max: Duration) -> Self {
        Backoff {
            start,
            max: max.max(start),
            next: start,
        }
    }

    fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.start;
    }
}

/// What the consumer does after a delivery.
enum Next {
    /// Take the next shard.
    Continue,
    /// A transient failure: pause consuming for a backoff first.
    Backoff,
    /// Shutting down: take nothing more.
    Exit,
}

#[derive(Clone)]
pub struct Worker {
    ctx: WorkerContext,
    settings: WorkerSettings,
    sampler: Arc<Mutex<ShardSampler>>,
    status: Arc<Mutex<Status>>,
}

/// A shard sampled and not yet stored: what its upload needs.
pub struct Sampled {
    residues: usize,
    valid: u64,
    bytes: Vec<u8>,
    /// When its delivery arrived (the shard-duration metric).
    delivered: Instant,
}

/// Unsettled deliveries a worker holds: the shard sampling and the one
/// uploading.
const PREFETCH: u16 = 2;

/// The upload in flight: its delivery settles when the task ends, with what
/// the consumer does next.
type Upload = tokio::task::JoinHandle<Next>;

/// Waits for the upload in flight, if any; its verdict (`Continue` when none).
async fn settle_upload(upload: &mut Option<Upload>) -> Next {
    match upload.take() {
        None => Next::Continue,
        Some(h) => h.await.unwrap_or_else(|e| {
            // Its delivery was neither acked nor requeued here: the broker
            // redelivers it when this worker's channel closes.
            tracing::error!("a shard upload task panicked: {e}");
            Next::Continue
        }),
    }
}

/// What the heartbeat reports.
#[derive(Default)]
struct Status {
    /// `"{job}/{index}"` of the shard being sampled.
    shard: Option<String>,
    /// Samples per second of sampling, smoothed over recent shards.
    samples_per_sec: f64,
}

impl Worker {
    pub fn new(ctx: WorkerContext, settings: WorkerSettings) -> Self {
        let sampler = ShardSampler::new(
            settings.device,
            settings.batch_size,
            settings.pair_cache_bytes,
        );
        // The worker's series exist from the start, at zero.
        let m = metrics::worker();
        m.samples_generated
            .with_label_values(&[settings.id.as_str()])
            .inc_by(0);
        m.busy.set(0);
        Worker {
            ctx,
            settings,
            sampler: Arc::new(Mutex::new(sampler)),
            status: Arc::default(),
        }
    }

    /// Publishes one heartbeat now.
    pub async fn beat(&self) -> Result<(), WorkerError> {
        let (shard, samples_per_sec) = {
            let st = self.status.lock().expect("status lock");
            (st.shard.clone(), st.samples_per_sec)
        };
        let info = WorkerHeartbeat {
            id: self.settings.id.clone(),
            device: device_name(self.settings.device),
            shard,
            samples_per_sec,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let ttl = 3 * self.settings.heartbeat_secs.max(1);
        self.ctx
            .progress
            .heartbeat(&self.settings.id, &info, ttl)
            .await?;
        metrics::worker().heartbeats.inc();
        Ok(())
    }

    /// The shard being sampled, as `"{job}/{index}"` (what heartbeats say).
    pub fn current_shard(&self) -> Option<String> {
        self.status.lock().expect("status lock").shard.clone()
    }

    /// A heartbeat now, so that watchers see a shard start or end at once
    /// rather than at the next beat; a failure waits for the next beat.
    async fn beat_now(&self) {
        if let Err(e) = self.beat().await {
            tracing::debug!(worker = %self.settings.id, "heartbeat: {e}");
        }
    }

    /// Beats every `heartbeat_secs`, for as long as it is polled; errors
    /// are logged, not fatal (Redis may be briefly away).
    async fn heartbeats(&self) -> Infallible {
        let mut every =
            tokio::time::interval(Duration::from_secs(self.settings.heartbeat_secs.max(1)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = self.beat().await {
                tracing::warn!(worker = %self.settings.id, "heartbeat: {e}");
            }
        }
    }

    /// Consumes shards until `shutdown` turns true (or its sender is
    /// dropped), publishing heartbeats meanwhile. A shard in progress at
    /// shutdown finishes within [`WorkerSettings::shutdown_grace`] or goes
    /// back to the queue; either way this returns `Ok` once it is settled.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let beats = self.heartbeats();
        let consume = self.consume(shutdown);
        tokio::pin!(beats);
        tokio::select! {
            // Heartbeats go on while the last shard finishes, and end with it.
            r = consume => r,
            never = &mut beats => match never {},
        }
    }

    async fn consume(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let id = &self.settings.id;
        let mut backoff =
            Backoff::new(self.settings.retry_backoff, self.settings.retry_backoff_max);
        // The first subscription's failure is fatal (a wrong URL shows at
        // start); later ones are retried.
        // Prefetch 2: the shard being sampled and the one being uploaded
        // (acked once stored); at most one upload is in flight.
        let mut shards: Option<ShardStream> = Some(self.ctx.queue.consume_shards(PREFETCH).await?);
        let mut upload: Option<Upload> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let stream = match &mut shards {
                Some(stream) => stream,
                None => match self.ctx.queue.consume_shards(PREFETCH).await {
                    Ok(stream) => shards.insert(stream),
                    Err(e) => {
                        let pause = backoff.next_pause();
                        tracing::warn!(worker = %id, "cannot consume the shard queue: {e}; retrying in {pause:?}");
                        if pause_unless_stopped(pause, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            let delivery = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                next = stream.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(worker = %id, "shard queue: {e}; retrying");
                        continue;
                    }
                    None => break,
                },
            };
            // Every line logged about the shard carries its job and index.
            let span =
                tracing::info_span!("shard", job = %delivery.task.job, shard = delivery.task.index);
            let next = self
                .handle(delivery, &shutdown, &mut upload)
                .instrument(span)
                .await;
            let next = match next {
                // Settled before unsubscribing: its ack needs the channel.
                Next::Backoff | Next::Exit => {
                    settle_upload(&mut upload).await;
                    next
                }
                Next::Continue => next,
            };
            match next {
                Next::Continue => backoff.reset(),
                Next::Backoff => {
                    // Unsubscribe for the pause: what the broker would hand
                    // this worker meanwhile (the requeued shard included)
                    // goes to the others.
                    shards = None;
                    let pause = backoff.next_pause();
                    tracing::info!(worker = %id, "pausing {pause:?} after a transient failure");
                    if pause_unless_stopped(pause, &mut shutdown).await {
                        break;
                    }
                }
                Next::Exit => break,
            }
        }
        settle_upload(&mut upload).await;
        tracing::info!(worker = %id, "worker stopped: no shard in progress");
        Ok(())
    }

    /// Runs one delivery to its end and settles it; never fails (a failure
    /// to settle is logged: the broker redelivers what was not settled).
    async fn handle(
        &self,
        delivery: ShardDelivery,
        shutdown: &watch::Receiver<bool>,
        upload: &mut Option<Upload>,
    ) -> Next {
        let task = delivery.task;
        let (job, shard) = (task.job, task.index);
        if *shutdown.borrow() {
            // Taken just as the shutdown came: not started, so not counted.
            settle(&task, "requeue", delivery.requeue().await);
            return Next::Exit;
        }
        match self.ctx.progress.get(job).await {
            Ok(Some(p)) if p.state.is_final() => {
                tracing::info!(%job, shard, state = ?p.state, "job has ended; shard skipped");
                settle(&task, "ack", delivery.ack().await);
                return Next::Continue;
            }
            Ok(_) => {}
            Err(e) => {
                let e = WorkerError::from(e);
                if e.is_transient() {
                    return self.retry_later(delivery, false, &e).await;
                }
                // An unreadable entry: let the attempt decide.
                tracing::warn!(%job, shard, "cannot read the job's state: {e}");
            }
        }
        let attempts = match self.ctx.progress.start_attempt(job, shard).await {
            Ok(a) => a,
            Err(e) => return self.retry_later(delivery, false, &e.into()).await,
        };
        let deaths = attempts.deaths();
        if deaths >= self.settings.max_deaths {
            // Running it again may kill this worker too.
            let reason = format!(
                "parked after {deaths} attempts whose worker died without reporting an error \
                 (killed, preempted, out of memory or a crash that takes the process down; \
                 worker.max_deaths = {}); {} reported failures",
                self.settings.max_deaths, attempts.failed
            );
            return self.give_up(delivery, attempts.started, &reason).await;
        }
        if deaths > 0 {
            tracing::info!(%job, shard, deaths, "shard redelivered after its worker died (not counted as a failure)");
        }
        let stop = StopFlag::new();
        let sampled = {
            let watcher = self.watch(&task, &stop, shutdown.clone());
            tokio::pin!(watcher);
            tokio::select! {
                r = self.sample_shard(&task, &stop) => r,
                never = &mut watcher => match never {},
            }
        };
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => return self.settle_failure(delivery, attempts, e).await,
        };
        // The next shard samples while this one uploads: at most one upload
        // in flight, so the previous one settles first (its verdict is what
        // the consumer does next), and this delivery is acked only once its
        // object is written and its completion recorded, as before.
        let previous = settle_upload(upload).await;
        let this = self.clone();
        let span = tracing::Span::current();
        *upload = Some(tokio::spawn(
            async move {
                let task = delivery.task;
                match this.store_shard(&task, sampled).await {
                    Ok(()) => {
                        settle(&task, "ack", delivery.ack().await);
                        Next::Continue
                    }
                    Err(e) => this.settle_failure(delivery, attempts, e).await,
                }
            }
            .instrument(span),
        ));
        previous
    }

    /// Settles a delivery whose attempt ended in `e`: acked when its job
    /// ended, requeued uncounted at shutdown or after a transient failure,
    /// otherwise counted as a reported failure and retried or parked.
    async fn settle_failure(
        &self,
        delivery: ShardDelivery,
        attempts: ShardAttempts,
        e: WorkerError,
    ) -> Next {
        let task = delivery.task;
        let (job, shard) = (task.job, task.index);
        match e {
            WorkerError::Stopped(StopReason::JobEnded) => {
                tracing::info!(%job, shard, "job has ended; shard stopped unwritten");
                settle(&task, "ack", delivery.ack().await);
                Next::Continue
            }
            WorkerError::Stopped(StopReason::Shutdown) => {
                self.forgive(&task).await;
                let requeued = delivery.requeue().await;
                if requeued.is_ok() {
                    tracing::warn!(%job, shard, "shard stopped at shutdown and requeued for another worker");
                }
                settle(&task, "requeue", requeued);
                Next::Exit
            }
            e if e.is_transient() => self.retry_later(delivery, true, &e).await,
            e => {
                metrics::worker().shards_failed.inc();
                let failed = match self.ctx.progress.record_attempt_failed(job, shard).await {
                    Ok(n) => n,
                    Err(store) => {
                        // Unrecorded, the attempt would later count as a
                        // death; retry the shard when the store is back.
                        tracing::warn!(%job, shard, "cannot record the failure ({store}); shard requeued: {e}");
                        return self.retry_later(delivery, true, &store.into()).await;
                    }
                };
                let max = self.settings.max_attempts;
                if failed >= max {
                    let reason = format!(
                        "failed {failed} times (worker.max_attempts = {max}), the last: {e}"
                    );
                    return self.give_up(delivery, attempts.started, &reason).await;
                }
                metrics::worker().shards_retried.inc();
                tracing::warn!(%job, shard, failed, "shard failed, will retry: {e}");
                settle(&task, "requeue", delivery.requeue().await);
                Next::Continue
            }
        }
    }

    /// A transient failure: takes the attempt back (if one was counted),
    /// requeues the shard and asks for a pause.
    async fn retry_later(&self, delivery: ShardDelivery, counted: bool, e: &WorkerError) -> Next {
        let task = delivery.task;
        metrics::worker().shards_failed.inc();
        metrics::worker().shards_retried.inc();
        tracing::warn!(job = %task.job, shard = task.index, "transient failure, shard requeued (no attempt counted): {e}");
        if counted {
            self.forgive(&task).await;
        }
        settle(&task, "requeue", delivery.requeue().await);
        Next::Backoff
    }

    /// Takes back the attempt at `task`; a failure leaves it counted.
    async fn forgive(&self, task: &ShardTask) {
        if let Err(e) = self
            .ctx
            .progress
            .forgive_attempt(task.job, task.index)
            .await
        {
            tracing::warn!(job = %task.job, shard = task.index, "cannot take the attempt back, it stays counted: {e}");
        }
    }

    /// Parks the shard, records its failure (which fails the job), acks.
    async fn give_up(&self, delivery: ShardDelivery, attempt: u32, reason: &str) -> Next {
        let task = delivery.task;
        tracing::error!(job = %task.job, shard = task.index, attempt, "shard failed for good: {reason}");
        // The verdict could not be parked or recorded: deliver the shard
        // again later, when the same failure can be.
        if let Err(e) = self.ctx.queue.park_shard(&task, reason).await {
            return self.retry_later(delivery, true, &e.into()).await;
        }
        metrics::worker().shards_dead_lettered.inc();
        if let Err(e) = self
            .ctx
            .progress
            .record_shard_failed(task.job, task.index, reason)
            .await
        {
            let e = WorkerError::from(e);
            if e.is_transient() {
                return self.retry_later(delivery, true, &e).await;
            }
            // An unknown job, say: there is no job left to fail.
            tracing::warn!(job = %task.job, shard = task.index, "cannot record the failure: {e}");
        }
        settle(&task, "ack", delivery.ack().await);
        Next::Continue
    }

    /// Runs beside a shard: raises `stop` when the job reaches a final state
    /// (polled every `cancel_poll`) or when the shutdown grace is over.
    async fn watch(
        &self,
        task: &ShardTask,
        stop: &StopFlag,
        mut shutdown: watch::Receiver<bool>,
    ) -> Infallible {
        let (job, shard) = (task.job, task.index);
        let mut poll =
            tokio::time::interval(self.settings.cancel_poll.max(Duration::from_millis(10)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // immediate; the state was read just before
        let mut grace_over: Option<tokio::time::Instant> = None;
        loop {
            if stop.is_set() {
                return std::future::pending().await;
            }
            let grace = async {
                match grace_over {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = poll.tick() => match self.ctx.progress.get(job).await {
                    Ok(Some(p)) if p.state.is_final() => {
                        tracing::info!(%job, shard, state = ?p.state, "job has ended; stopping its shard at the next batch");
                        stop.request(StopReason::JobEnded);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%job, "cannot read the job's state: {e}"),
                },
                _ = stopped(&mut shutdown), if grace_over.is_none() => {
                    let grace = self.settings.shutdown_grace;
                    tracing::info!(
                        worker = %self.settings.id,
                        %job,
                        shard,
                        grace_secs = grace.as_secs_f64(),
                        "shutting down: taking no more shards, letting the shard in progress finish"
                    );
                    grace_over = Some(tokio::time::Instant::now() + grace);
                }
                _ = grace => {
                    tracing::warn!(
                        worker = %self.settings.id,
                        %job,
                        shard,
                        "shutdown grace is over: stopping the shard at the next batch"
                    );
                    stop.request(StopReason::Shutdown);
                }
            }
        }
    }

    /// Samples one shard and records it; idempotent.
    pub async fn process(&self, task: &ShardTask) -> Result<(), WorkerError> {
        self.process_until(task, &StopFlag::new()).await
    }

    /// [`Worker::process`] that gives up with [`WorkerError::Stopped`] at the
    /// first batch boundary after `stop` is raised, writing and recording
    /// nothing. A shard sampled completely is still written, unless its job
    /// ended meanwhile.
    pub async fn process_until(
        &self,
        task: &ShardTask,
        stop: &StopFlag,
    ) -> Result<(), WorkerError> {
        let sampled = self.sample_shard(task, stop).await?;
        self.store_shard(task, sampled).await
    }

    /// The sampling half of [`Worker::process_until`]: the shard's npz bytes,
    /// unless `stop` was raised (or its job ended) first.
    async fn sample_shard(
        &self,
        task: &ShardTask,
        stop: &StopFlag,
    ) -> Result<Sampled, WorkerError> {
        let delivered = Instant::now();
        let spec = self.spec(task.job).await?;
        let model_dir = self.local_model(&spec.model).await?;
        let features = self.local_features(&spec.features_sha256).await?;
        let structure = match &spec.from_structure {
            Some(f) => Some(self.local_structure(&f.sha256).await?),
            None => None,
        };
        if let Some(why) = stop.reason() {
            return Err(WorkerError::Stopped(why));
        }
        self.status.lock().expect("status lock").shard =
            Some(format!("{}/{}", task.job, task.index));
        metrics::worker().busy.set(1);
        self.beat_now().await;
        let started = Instant::now();
        let sampler = self.sampler.clone();
        let (spec2, task2, stop2) = (spec.clone(), *task, stop.clone());
        let bytes =
            tokio::task::spawn_blocking(move || -> Result<(usize, u64, Vec<u8>), WorkerError> {
                let mut sampler = sampler.lock().expect("sampler lock");
                let ensemble = sampler.sample_from(
                    &spec2,
                    &task2,
                    &model_dir,
                    &features,
                    structure.as_deref(),
                    &|| stop2.is_set(),
                )?;
                let validity = ensemble.validity();
                let bytes = ensemble
                    .npz_bytes_with(&validity)
                    .map_err(|e| WorkerError::Other(e.to_string()))?;
                let valid = validity.iter().filter(|v| v.valid).count() as u64;
                Ok((ensemble.len_residues(), valid, bytes))
            })
            .await
            .map_err(|e| WorkerError::Other(format!("sampling task panicked: {e}")));
        {
            let mut st = self.status.lock().expect("status lock");
            st.shard = None;
            metrics::worker().busy.set(0);
            if bytes.as_ref().is_ok_and(|b| b.is_ok()) {
                let rate = task.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
                st.samples_per_sec = if st.samples_per_sec == 0.0 {
                    rate
                } else {
                    0.7 * st.samples_per_sec + 0.3 * rate
                };
            }
        }
        self.beat_now().await;
        let (residues, valid, bytes) = match bytes? {
            Err(WorkerError::Shard(ShardError::Stopped)) => {
                let why = stop.reason().unwrap_or(StopReason::Shutdown);
                return Err(WorkerError::Stopped(why));
            }
            other => other?,
        };
        if stop.reason() == Some(StopReason::JobEnded) {
            // Complete, but nobody wants it any more.
            return Err(WorkerError::Stopped(StopReason::JobEnded));
        }
        Ok(Sampled {
            residues,
            valid,
            bytes,
            delivered,
        })
    }

    /// The storing half: writes the shard's object, then records its
    /// completion (counted once however often it is stored).
    async fn store_shard(&self, task: &ShardTask, sampled: Sampled) -> Result<(), WorkerError> {
        let Sampled {
            residues,
            valid,
            bytes,
            delivered,
        } = sampled;
        // Identical bytes on a re-run: overwriting is harmless.
        self.ctx
            .store
            .put(
                &self.ctx.layout.shard(task.job, task.index),
                PutPayload::from(bytes),
            )
            .await?;
        let new = self
            .ctx
            .progress
            .record_shard(task.job, task.index, task.len(), Some(valid))
            .await?;
        tracing::info!(job = %task.job, shard = task.index, samples = task.len(), valid, new, "shard done");
        let m = metrics::worker();
        m.shards_completed.inc();
        m.samples_generated
            .with_label_values(&[self.settings.id.as_str()])
            .inc_by(task.len());
        m.shard_duration
            .with_label_values(&[metrics::length_bucket(residues)])
            .observe(delivered.elapsed().as_secs_f64());
        Ok(())
    }

    async fn spec(&self, job: JobId) -> Result<JobSpec, WorkerError> {
        let bytes = self
            .ctx
            .store
            .get(&self.ctx.layout.job_spec(job))
            .await?
            .bytes()
            .await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| WorkerError::Other(format!("job {job}: unreadable spec: {e}")))
    }

    /// The model directory in the local cache, downloaded once per version:
    /// the directory is keyed by the store objects' ETags (two HEADs a
    /// shard), so a model uploaded again under the same id is fetched again
    /// and sampled, not the copy cached before.
    async fn local_model(&self, model: &str) -> Result<PathBuf, WorkerError> {
        // A few tries: an upload that lands between the HEADs and the GETs
        // changes the version, and the next try fetches the new one.
        for _ in 0..3 {
            let files = ["model.safetensors", "config.json"];
            let mut tags = Vec::with_capacity(files.len());
            for file in files {
                let meta = self
                    .ctx
                    .store
                    .head(&self.ctx.layout.model_file(model, file))
                    .await?;
                tags.push(version_tag(&meta));
            }
            let dir = self
                .settings
                .cache_dir
                .join("models")
                .join(model)
                .join(model_version(&tags));
            if dir.join("config.json").is_file() {
                return Ok(dir);
            }
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(CommonError::from)?;
            // Weights first, config last: a directory with a config is
            // complete.
            let mut changed = false;
            for (file, tag) in files.iter().zip(&tags) {
                let got = self
                    .ctx
                    .store
                    .get(&self.ctx.layout.model_file(model, file))
                    .await?;
                if version_tag(&got.meta) != *tag {
                    changed = true;
                    break;
                }
                let bytes = got.bytes().await?;
                write_atomically(&dir.join(file), &bytes).await?;
            }
            if !changed {
                return Ok(dir);
            }
            // Complete or absent: drop the half-fetched version.
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        Err(WorkerError::Other(format!(
            "model {model} changed in the store three times while this worker fetched it"
        )))
    }

    /// A local copy of uploaded structures (a partial-diffusion job's
    /// start), fetched once: complete or absent, as features.
    async fn local_structure(&self, sha256: &str) -> Result<PathBuf, WorkerError> {
        dig_common::store::check_sha256(sha256)?;
        let path = self
            .settings
            .cache_dir
            .join("structures")
            .join(format!("{sha256}.pdb"));
        if !path.is_file() {
            let dir = path.parent().expect("has parent");
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(CommonError::from)?;
            let key = self.ctx.features.layout().structure(sha256);
            let bytes = self
                .ctx
                .features
                .store()
                .get(&key)
                .await
                .map_err(CommonError::from)?
                .bytes()
                .await
                .map_err(CommonError::from)?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let part = dir.join(format!("{sha256}.pdb.part-{}-{nanos}", std::process::id()));
            tokio::fs::write(&part, &bytes)
                .await
                .map_err(CommonError::from)?;
            tokio::fs::rename(&part, &path)
                .await
                .map_err(CommonError::from)?;
        }
        Ok(path)
    }

    async fn local_features(&self, sha256: &str) -> Result<PathBuf, WorkerError> {
        let path = self
            .settings
            .cache_dir
            .join("features")
            .join(format!("{sha256}.npz"));
        if !path.is_file() {
            tokio::fs::create_dir_all(path.parent().expect("has parent"))
                .await
                .map_err(CommonError::from)?;
            self.ctx.features.fetch_to(sha256, &path).await?;
        }
        Ok(path)
    }
}

/// Resolves once `shutdown` is true (or its sender is gone). The guard
/// `wait_for` returns is not `Send`; it is dropped here, not held by callers.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Sleeps for `pause`; true if shutdown came first.
async fn pause_unless_stopped(pause: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stopped(shutdown) => true,
        _ = tokio::time::sleep(pause) => false,
    }
}

/// Logs a delivery that could not be settled: the broker delivers it again
/// (to this worker or another), and shards are idempotent.
fn settle(task: &ShardTask, verb: &str, result: dig_common::Result<()>) {
    if let Err(e) = result {
        tracing::warn!(job = %task.job, shard = task.index, "cannot {verb} the delivery, it will come again: {e}");
    }
}

/// `cpu`, `cuda:0`, ...: how heartbeats name a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What identifies one upload of a store object: its ETag, or its size
/// and modification time where the store gives none.
fn version_tag(meta: &object_store::ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => tag.clone(),
        None => format!(
            "{}-{}",
            meta.size,
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        ),
    }
}

/// The local directory name of one version of a model: the first 16 hex
/// digits of the SHA-256 of its files' tags, so that a model uploaded again
/// under its id is fetched again instead of served stale from the cache.
fn model_version(tags: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for tag in tags {
        hasher.update(tag.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize()[..8])
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let tmp = path.with_extension("part");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(CommonError::from)?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(CommonError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(msg: &str) -> Box<dyn std::error::Error + Send + Sync> {
        msg.into()
    }

    #[test]
    fn outages_are_transient_and_bad_data_is_not() {
        let generic = || object_store::Error::Generic {
            store: "S3",
            source: boxed("error sending request: operation timed out"),
        };
        let not_found = || object_store::Error::NotFound {
            path: "jobs/x/spec.json".into(),
            source: boxed("404"),
        };
        let transient = [
            WorkerError::Store(generic()),
            WorkerError::Common(CommonError::Store(generic())),
            WorkerError::Common(CommonError::Io(std::io::Error::other("disk full"))),
            WorkerError::Common(CommonError::Progress(redis::RedisError::from(
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            ))),
            WorkerError::Common(CommonError::Progress(redis::RedisError::from(
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ))),
        ];
        for e in &transient {
            assert!(e.is_transient(), "{e:?}");
        }
        let permanent = [
            WorkerError::Store(not_found()),
            WorkerError::Common(CommonError::Store(not_found())),
            WorkerError::Store(object_store::Error::PermissionDenied {
                path: "x".into(),
                source: boxed("403"),
            }),
            WorkerError::Common(CommonError::NotFound("features f00".into())),
            WorkerError::Common(CommonError::Invalid("bad".into())),
            WorkerError::Common(CommonError::Progress(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "bad reply",
            )))),
            WorkerError::Other("job x: unreadable spec".into()),
            WorkerError::Shard(ShardError::Invalid {
                job: "x".into(),
                index: 0,
                message: "sequence".into(),
            }),
            WorkerError::Stopped(StopReason::Shutdown),
        ];
        for e in &permanent {
            assert!(!e.is_transient(), "{e:?}");
        }
    }

    #[test]
    fn the_first_stop_reason_sticks() {
        let stop = StopFlag::new();
        assert_eq!(stop.reason(), None);
        let seen_by_sampler = stop.clone();
        assert!(stop.request(StopReason::JobEnded));
        assert!(!stop.request(StopReason::Shutdown));
        assert_eq!(seen_by_sampler.reason(), Some(StopReason::JobEnded));
        assert!(seen_by_sampler.is_set());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let pauses: Vec<u64> = (0..7).map(|_| b.next_pause().as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_secs(1));
    }
}
