//! The coordinator's loop: activating jobs from the jobs queue and driving
//! every active job one step per poll ([`Coordinator::tick`]).
//!
//! Each step reads the job's progress, then either finishes the job
//! (manifest and succeeded, or failed) or tops its outstanding shards up to
//! the window. "Outstanding" is tracked in memory as the set of shards this
//! coordinator published that the done set does not hold yet; a restart
//! starts that set empty, which can only publish a shard twice, never lose
//! one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dig_common::job::{JobId, JobSpec, JobState};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{JobProgress, ProgressStore};
use dig_common::queue::{JobDelivery, JobStream, ShardQueue};
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Mutex};
use tracing::{debug, error, info, warn};

use crate::error::{CoordinatorError, Result};
use crate::manifest::{Manifest, ManifestShard};

#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Most shards of one job outstanding (published, not done) at a time.
    /// 0 is taken as 1: a job must make progress.
    pub window_per_job: u64,
    /// How often every active job is looked at.
    pub poll_interval: Duration,
}

/// What the coordinator knows of a job it drives.
struct ActiveJob {
    spec: JobSpec,
    /// Shards published by this coordinator and not seen done yet.
    in_flight: BTreeSet<u64>,
    /// Every shard below this index was published (or seen done) since the
    /// job was activated, so a step looks for new work from here on only.
    next: u64,
}

/// What one step did to a job.
enum Step {
    /// Still running: keep it active.
    Running,
    /// Ended (succeeded, failed, cancelled or gone): forget it.
    Finished,
}

pub struct Coordinator {
    queue: Arc<dyn ShardQueue>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    progress: Arc<dyn ProgressStore>,
    settings: CoordinatorSettings,
    /// A tokio mutex: a step awaits the backing services while holding it,
    /// and `tick` and job activation must not interleave on one job.
    active: Mutex<BTreeMap<JobId, ActiveJob>>,
}

impl Coordinator {
    pub fn new(
        queue: Arc<dyn ShardQueue>,
        store: Arc<dyn ObjectStore>,
        layout: ObjectLayout,
        progress: Arc<dyn ProgressStore>,
        settings: CoordinatorSettings,
    ) -> Self {
        Coordinator {
            queue,
            store,
            layout,
            progress,
            settings,
            active: Mutex::new(BTreeMap::new()),
        }
    }

    /// The jobs being driven, ascending.
    pub async fn active_jobs(&self) -> Vec<JobId> {
        self.active.lock().await.keys().copied().collect()
    }

    /// Activates jobs that were running before a restart (their ids already
    /// left the jobs queue). Activates every job it can and returns the
    /// first error, if any.
    pub async fn resume(&self, jobs: &[JobId]) -> Result<()> {
        let mut first = None;
        for &job in jobs {
            if let Err(e) = self.activate(job).await {
                error!(%job, error = %e, "cannot resume job");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Starts driving `job`: loads its spec and marks it running. Returns
    /// `false` when the job has ended already (a redelivered id), so there
    /// is nothing to drive. Activating an active job changes nothing.
    pub async fn activate(&self, job: JobId) -> Result<bool> {
        let progress = self
            .progress
            .get(job)
            .await?
            .ok_or(CoordinatorError::UnknownJob(job))?;
        if progress.state.is_final() {
            debug!(%job, state = ?progress.state, "job has ended already");
            return Ok(false);
        }
        let spec = self.load_spec(job).await?;
        self.progress
            .set_state(job, JobState::Running, None)
            .await?;
        let mut active = self.active.lock().await;
        // An active job keeps its in-flight set: rebuilding it would
        // republish what is queued already.
        active.entry(job).or_insert_with(|| {
            info!(%job, shards = spec.num_shards(), "job activated");
            ActiveJob {
                spec,
                in_flight: BTreeSet::new(),
                next: 0,
            }
        });
        Ok(true)
    }

    async fn load_spec(&self, job: JobId) -> Result<JobSpec> {
        let bytes = match self.store.get(&self.layout.job_spec(job)).await {
            Ok(object) => object.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CoordinatorError::MissingSpec(job))
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|source| CoordinatorError::BadSpec { job, source })
    }

    /// One pass over the active jobs. A job whose step fails (a backing
    /// service unreachable) stays active and is tried again next pass.
    pub async fn tick(&self) {
        let mut active = self.active.lock().await;
        let mut finished = Vec::new();
        for (&job, state) in active.iter_mut() {
            match self.step(job, state).await {
                Ok(Step::Running) => {}
                Ok(Step::Finished) => finished.push(job),
                Err(e) => warn!(%job, error = %e, "job step failed; retrying next poll"),
            }
        }
        for job in finished {
            active.remove(&job);
        }
    }

    async fn step(&self, job: JobId, active: &mut ActiveJob) -> Result<Step> {
        let Some(progress) = self.progress.get(job).await? else {
            warn!(%job, "job vanished from the progress store; dropping it");
            return Ok(Step::Finished);
        };
        if progress.state.is_final() {
            // Cancelled (or ended by another coordinator): publish no more.
            info!(%job, state = ?progress.state, "job ended elsewhere");
            return Ok(Step::Finished);
        }
        if progress.shards_failed > 0 {
            // The worker recorded the shard's error; one lost shard makes an
            // incomplete ensemble, so the rest is not worth sampling.
            self.progress.set_state(job, JobState::Failed, None).await?;
            info!(%job, error = ?progress.error, "job failed");
            return Ok(Step::Finished);
        }
        let n = active.spec.num_shards();
        if progress.shards_done >= n {
            return self.finish(job, active, &progress).await;
        }

        let done: BTreeSet<u64> = self.progress.done_shards(job).await?.into_iter().collect();
        active.in_flight.retain(|i| !done.contains(i));
        let window = self.settings.window_per_job.max(1);
        while (active.in_flight.len() as u64) < window && active.next < n {
            let index = active.next;
            if !done.contains(&index) {
                self.queue
                    .publish_shard(&active.spec.shard(index), active.spec.priority)
                    .await?;
                active.in_flight.insert(index);
                debug!(%job, index, "shard published");
            }
            // Advanced only once published: a failed publish retries the
            // same shard next pass.
            active.next += 1;
        }
        Ok(Step::Running)
    }

    /// Every shard is done: write the manifest, then mark the job succeeded.
    /// In that order, so that a client never sees a succeeded job without
    /// its manifest; a crash in between rewrites the same manifest.
    async fn finish(&self, job: JobId, active: &ActiveJob, progress: &JobProgress) -> Result<Step> {
        let spec = &active.spec;
        let mut shards = Vec::with_capacity(spec.num_shards() as usize);
        for index in 0..spec.num_shards() {
            let task = spec.shard(index);
            let key = self.layout.shard(job, index);
            let (bytes, sha256) = match self.digest(&key).await {
                Ok(d) => d,
                Err(CoordinatorError::Store(object_store::Error::NotFound { .. })) => {
                    // The done set says done, the store disagrees; the store
                    // is the source of truth, and an incomplete ensemble
                    // must not pass for a complete one.
                    let error = format!("shard {index} is recorded done but {key} is missing");
                    error!(%job, "{error}");
                    self.progress
                        .set_state(job, JobState::Failed, Some(&error))
                        .await?;
                    return Ok(Step::Finished);
                }
                Err(e) => return Err(e),
            };
            shards.push(ManifestShard {
                index,
                start: task.start,
                end: task.end,
                key: key.to_string(),
                bytes,
                sha256,
            });
        }
        let manifest = Manifest {
            job,
            num_samples: spec.num_samples,
            shards,
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        self.store
            .put(&self.layout.manifest(job), PutPayload::from(json))
            .await?;
        self.progress
            .set_state(job, JobState::Succeeded, None)
            .await?;
        info!(%job, samples = progress.samples_done, "job succeeded");
        Ok(Step::Finished)
    }

    /// Size and SHA-256 of an object, streamed: shards can be large.
    async fn digest(&self, key: &object_store::path::Path) -> Result<(u64, String)> {
        let mut body = self.store.get(key).await?.into_stream();
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((bytes, hex::encode(hasher.finalize())))
    }

    /// Consumes the jobs queue and steps the active jobs every poll interval
    /// until `shutdown` turns true (or its sender is dropped).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut jobs: Option<JobStream> = None;
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if jobs.is_none() {
                // Retried every poll: the jobs queue may be briefly down
                // while the active jobs can still make progress.
                match self.queue.consume_jobs().await {
                    Ok(stream) => jobs = Some(stream),
                    Err(e) => error!(error = %e, "cannot consume the jobs queue"),
                }
            }
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = poll.tick() => self.tick().await,
                delivery = next_job(&mut jobs) => match delivery {
                    Some(Ok(delivery)) => self.accept(delivery).await,
                    // The stream keeps reconnecting by itself.
                    Some(Err(e)) => warn!(error = %e, "jobs queue"),
                    None => jobs = None,
                },
            }
        }
        info!("coordinator stopped");
    }

    /// Activates a submitted job, acking its id only once the job is
    /// recorded as running: a crash before that redelivers the id.
    async fn accept(&self, delivery: JobDelivery) {
        let job = delivery.job;
        let settled = match self.activate(job).await {
            Ok(_) => delivery.ack().await,
            Err(e) if e.is_permanent() => {
                error!(%job, error = %e, "dropping job");
                delivery.reject().await
            }
            Err(e) => {
                warn!(%job, error = %e, "cannot activate job; requeueing it");
                // A pause, so that an outage does not become a hot loop of
                // redeliveries.
                tokio::time::sleep(self.settings.poll_interval).await;
                delivery.requeue().await
            }
        };
        if let Err(e) = settled {
            warn!(%job, error = %e, "cannot settle the job delivery; it will come again");
        }
    }
}

/// The next job delivery, or never when there is no stream.
async fn next_job(jobs: &mut Option<JobStream>) -> Option<dig_common::Result<JobDelivery>> {
    match jobs {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
