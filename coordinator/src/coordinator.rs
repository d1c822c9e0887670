//! The coordinator's loop: activating jobs from the jobs queue and driving
//! every active job one step per poll ([`Coordinator::tick`]).
//!
//! Each step reads the job's progress, then either finishes the job
//! (manifest and succeeded, or failed) or tops its outstanding shards up to
//! the window. "Outstanding" is tracked in memory as the set of shards this
//! coordinator published that the done set does not hold yet; a restart
//! starts that set empty, which can only publish a shard twice, never lose
//! one.
//!
//! A job whose progress entry is missing (Redis lost its data) is rebuilt
//! from the object store ([`Reconciler`]) rather than dropped, both when its
//! id arrives and while it runs; a job that fails, or that the coordinator
//! sees cancelled, gets a state marker in the object store so that a rebuild
//! keeps it ended.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dig_common::job::{JobId, JobSpec, JobState, SampleFilter};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{JobProgress, ProgressStore};
use dig_common::queue::{JobDelivery, JobStream, ShardQueue};
use futures::{FutureExt, StreamExt};
use object_store::ObjectStore;
use tokio::sync::{watch, Mutex};
use tracing::{debug, error, info, warn};

use crate::error::{CoordinatorError, Result};
use crate::metrics::{ClusterMetrics, ShardAges};
use crate::reconcile::{Reconciled, Reconciler};

#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Most shards of one job outstanding (published, not done) at a time.
    /// 0 is taken as 1: a job must make progress.
    pub window_per_job: u64,
    /// How often every active job is looked at.
    pub poll_interval: Duration,
    /// Fair share: most shards of one tenant and one priority outstanding
    /// at a time, at least; raised to twice the live workers shared among
    /// the tenants with jobs of that priority (see [`Coordinator::tick`]).
    /// 0 is taken as 1.
    pub tenant_window: u64,
}

/// What the coordinator knows of a job it drives.
struct ActiveJob {
    spec: JobSpec,
    /// Shards published by this coordinator and not seen done yet.
    in_flight: BTreeSet<u64>,
    /// Every shard below this index was published (or seen done) since the
    /// job was activated, so a step looks for new work from here on only.
    next: u64,
    /// Whether the job's state was `queued` when last looked at.
    queued: bool,
    /// Shards to publish: all of them, or for a filtered job those drawn so
    /// far (the initial ones, raised while valid samples fall short).
    planned: u64,
    /// A filtered job's valid sample indices per done shard, as read from
    /// the shard objects (the source of truth), each read once.
    valid: BTreeMap<u64, Vec<u64>>,
}

/// Where a filtered job stands (see [`Coordinator::filtered_step`]).
enum Filtered {
    /// The done shards from 0 hold enough valid samples: these shards and
    /// their kept indices make the result.
    Enough(BTreeMap<u64, Vec<u64>>),
    /// Not decided until more shards are done.
    Waiting,
    /// Every shard up to the draw limit is done and still short.
    Short {
        kept: BTreeMap<u64, Vec<u64>>,
        valid: u64,
        drawn: u64,
    },
}

/// What looking at a job found.
enum Step {
    /// Still running, these shards done: it may get more published.
    Running(BTreeSet<u64>),
    /// Still running, nothing to publish this pass (just rebuilt).
    Wait,
    /// Ended (succeeded, failed, cancelled or gone): forget it.
    Finished,
}

pub struct Coordinator {
    queue: Arc<dyn ShardQueue>,
    progress: Arc<dyn ProgressStore>,
    reconciler: Reconciler,
    settings: CoordinatorSettings,
    /// A tokio mutex: a step awaits the backing services while holding it,
    /// and `tick` and job activation must not interleave on one job.
    active: Mutex<BTreeMap<JobId, ActiveJob>>,
    /// Publication times of outstanding shards, for metrics.
    shard_ages: Arc<ShardAges>,
    /// Passes made, for the occasional look at every waiting job.
    ticks: std::sync::atomic::AtomicU64,
    /// When the batches' webhooks were last reconciled.
    batches_reconciled: std::sync::Mutex<Option<Instant>>,
}

/// A progress store that lost its data makes every job vanish at once:
/// the batches' webhooks are given back once for all of them.
const BATCH_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

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
            reconciler: Reconciler::new(store, layout, progress.clone()),
            progress,
            settings,
            active: Mutex::new(BTreeMap::new()),
            shard_ages: Arc::default(),
            ticks: std::sync::atomic::AtomicU64::new(0),
            batches_reconciled: std::sync::Mutex::new(None),
        }
    }

    /// The cluster-wide metrics this coordinator exports (run its
    /// [`ClusterMetrics::run`] beside [`Coordinator::run`]).
    pub fn cluster_metrics(&self) -> ClusterMetrics {
        ClusterMetrics::new(
            self.queue.clone(),
            self.progress.clone(),
            self.shard_ages.clone(),
        )
    }

    /// The jobs being driven, ascending.
    pub async fn active_jobs(&self) -> Vec<JobId> {
        self.active.lock().await.keys().copied().collect()
    }

    /// Makes the progress store agree with the object store for every job
    /// the store holds (see [`Reconciler`]): what a coordinator does at start,
    /// before [`resume`](Self::resume), so that jobs lost by the progress
    /// store are resumed (or listed as ended) again. Each job's outcome;
    /// `Err` only when the jobs cannot be listed.
    /// The batches' webhooks are reconciled too (logged, not returned).
    pub async fn reconcile(&self) -> Result<Vec<(JobId, Result<Reconciled>)>> {
        let jobs = self.reconciler.reconcile_all(false).await?;
        self.reconcile_batches().await;
        Ok(jobs)
    }

    /// Gives the batches whose webhook the progress store lost their
    /// webhook back ([`Reconciler::reconcile_batches`]); at most once per
    /// [`BATCH_RECONCILE_INTERVAL`].
    async fn reconcile_batches(&self) {
        {
            let mut last = self.batches_reconciled.lock().expect("lock");
            if last.is_some_and(|t| t.elapsed() < BATCH_RECONCILE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.reconciler.reconcile_batches(false).await {
            Ok(batches) if !batches.is_empty() => {
                info!(
                    batches = batches.len(),
                    "batch webhooks given back from the object store"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot reconcile the batches' webhooks"),
        }
    }

    /// The reconciler this coordinator uses.
    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
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
    /// is nothing to drive. Activating an active job changes nothing. A job
    /// without a progress entry is rebuilt from the object store first;
    /// `UnknownJob` if the store has no spec of it either.
    pub async fn activate(&self, job: JobId) -> Result<bool> {
        let progress = match self.progress.get(job).await? {
            Some(p) => p,
            None => {
                warn!(%job, "job has no progress entry; rebuilding it from the object store");
                match self.reconciler.reconcile_job(job, false).await {
                    Ok(_) => {}
                    Err(CoordinatorError::MissingSpec(_)) => {
                        return Err(CoordinatorError::UnknownJob(job))
                    }
                    Err(e) => return Err(e),
                }
                self.progress
                    .get(job)
                    .await?
                    .ok_or(CoordinatorError::UnknownJob(job))?
            }
        };
        if progress.state.is_final() {
            debug!(%job, state = ?progress.state, "job has ended already");
            // E.g. cancelled while its id waited in the jobs queue.
            self.mark_ended(job, &progress).await?;
            return Ok(false);
        }
        let spec = self.reconciler.load_spec(job).await?;
        // The job stays queued until its first shard is published (a bulk
        // batch's jobs wait their turn); it is in the unfinished set since
        // its creation, so a restart finds it either way.
        let mut active = self.active.lock().await;
        // An active job keeps its in-flight set: rebuilding it would
        // republish what is queued already.
        active.entry(job).or_insert_with(|| {
            info!(%job, shards = spec.num_shards(), "job activated");
            ActiveJob {
                planned: if spec.filter.is_some() {
                    spec.initial_shards()
                } else {
                    spec.num_shards()
                },
                spec,
                in_flight: BTreeSet::new(),
                next: 0,
                queued: true,
                valid: BTreeMap::new(),
            }
        });
        Ok(true)
    }

    /// Writes the state marker of a job that failed or was cancelled (a
    /// succeeded job has its manifest).
    async fn mark_ended(&self, job: JobId, progress: &JobProgress) -> Result<()> {
        if matches!(progress.state, JobState::Failed | JobState::Cancelled) {
            self.reconciler
                .write_marker(job, progress.state, progress.error.as_deref())
                .await?;
        }
        Ok(())
    }

    /// Fails the job: marker first, then the state, so that a crash in
    /// between leaves a job that is still unfinished (and fails again when
    /// resumed), never a failed job without its marker.
    async fn fail(&self, job: JobId, error: Option<&str>) -> Result<()> {
        self.reconciler
            .write_marker(job, JobState::Failed, error)
            .await?;
        self.progress
            .set_state(job, JobState::Failed, error)
            .await?;
        Ok(())
    }

    /// One pass over the active jobs: each is looked at (finished, failed,
    /// ended elsewhere, rebuilt), then shards are published within two
    /// bounds. Per job, at most `window_per_job` outstanding. Per tenant and
    /// priority (fair share), at most the tenant window: `tenant_window`, or
    /// twice the live workers divided by the tenants with active jobs of that
    /// priority if that is more, so one tenant's thousands of jobs cannot
    /// fill the queue ahead of another tenant's, while a lone tenant still
    /// keeps every worker busy. Interactive jobs are served before bulk ones
    /// (their shards also carry the higher queue priority), older jobs
    /// before newer ones. A job whose step fails (a backing service
    /// unreachable) stays active and is tried again next pass.
    pub async fn tick(&self) {
        let tick = self
            .ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut active = self.active.lock().await;
        let mut finished = Vec::new();
        let mut ready = Vec::new();
        // Jobs under way first: their outstanding shards set the budgets.
        let (started, mut waiting): (Vec<JobId>, Vec<JobId>) =
            active.keys().copied().partition(|j| !active[j].queued);
        for job in started {
            let state = active.get_mut(&job).expect("listed above");
            self.look(job, state, &mut ready, &mut finished).await;
        }

        // What each tenant has outstanding, per priority, and how many
        // tenants share each priority (queued jobs count as sharing).
        let mut outstanding: BTreeMap<(u8, String), u64> = BTreeMap::new();
        for (job, a) in active.iter() {
            if finished.contains(job) {
                continue;
            }
            *outstanding
                .entry((a.spec.priority.amqp(), a.spec.tenant.clone()))
                .or_default() += a.in_flight.len() as u64;
        }
        let mut tenants: BTreeMap<u8, u64> = BTreeMap::new();
        for (priority, _) in outstanding.keys() {
            *tenants.entry(*priority).or_default() += 1;
        }
        let workers = match self.progress.workers().await {
            Ok(w) => w.len() as u64,
            Err(e) => {
                debug!(error = %e, "cannot count the live workers");
                0
            }
        };
        let cap = |priority: u8| {
            let sharing = tenants.get(&priority).copied().unwrap_or(1).max(1);
            self.settings
                .tenant_window
                .max(1)
                .max((2 * workers).div_ceil(sharing))
        };
        let mut budgets: BTreeMap<(u8, String), u64> = outstanding
            .into_iter()
            .map(|((p, t), n)| ((p, t), cap(p).saturating_sub(n)))
            .collect();

        // Jobs not started yet are looked at (two Redis calls each) only
        // while their tenant has room, and every 20th pass regardless (to
        // notice a cancellation): a bulk batch of thousands waiting costs
        // next to nothing per pass.
        let order = |job: &JobId, active: &BTreeMap<JobId, ActiveJob>| {
            (std::cmp::Reverse(active[job].spec.priority.amqp()), *job)
        };
        waiting.sort_by_key(|j| order(j, &active));
        let mut room: BTreeMap<(u8, String), u64> = budgets.clone();
        for job in waiting {
            let state = active.get_mut(&job).expect("listed above");
            let key = (state.spec.priority.amqp(), state.spec.tenant.clone());
            let left = room.get(&key).copied().unwrap_or(0);
            if left == 0 && !tick.is_multiple_of(20) {
                continue;
            }
            // Reserve what this job could take, so later jobs of the same
            // tenant are only looked at while room remains.
            let want = self
                .settings
                .window_per_job
                .max(1)
                .min(state.spec.num_shards());
            room.insert(key, left.saturating_sub(want));
            self.look(job, state, &mut ready, &mut finished).await;
        }
        for job in &finished {
            active.remove(job);
        }

        // Interactive first, then by age (job ids are time-ordered).
        ready.sort_by_key(|(job, _)| order(job, &active));
        for (job, done) in ready {
            let Some(state) = active.get_mut(&job) else {
                continue;
            };
            let key = (state.spec.priority.amqp(), state.spec.tenant.clone());
            let budget = budgets.get(&key).copied().unwrap_or(0);
            match self.publish(job, state, &done, budget).await {
                Ok(n) => {
                    if let Some(b) = budgets.get_mut(&key) {
                        *b = b.saturating_sub(n);
                    }
                }
                Err(e) => warn!(%job, error = %e, "cannot publish shards; retrying next poll"),
            }
        }
    }

    /// One [`step`](Self::step), its outcome sorted into `ready` (to
    /// publish for) or `finished` (to forget).
    async fn look(
        &self,
        job: JobId,
        state: &mut ActiveJob,
        ready: &mut Vec<(JobId, BTreeSet<u64>)>,
        finished: &mut Vec<JobId>,
    ) {
        match self.step(job, state).await {
            Ok(Step::Running(done)) => ready.push((job, done)),
            Ok(Step::Wait) => {}
            Ok(Step::Finished) => finished.push(job),
            Err(e) => warn!(%job, error = %e, "job step failed; retrying next poll"),
        }
    }

    async fn step(&self, job: JobId, active: &mut ActiveJob) -> Result<Step> {
        let Some(progress) = self.progress.get(job).await? else {
            warn!(%job, "job vanished from the progress store; rebuilding it from the object store");
            let rebuilt = match self.reconciler.reconcile_job(job, false).await {
                Ok(r) => r,
                Err(CoordinatorError::MissingSpec(_)) => {
                    // Spec and entry both gone: a submission undone.
                    warn!(%job, "the job's spec is gone too; dropping it");
                    return Ok(Step::Finished);
                }
                Err(e) => return Err(e),
            };
            info!(%job, state = ?rebuilt.after, shards_done = rebuilt.shards_recorded, "job rebuilt from the object store");
            // Whatever lost this job lost the batches' webhooks too.
            self.reconcile_batches().await;
            if rebuilt.after.is_final() {
                return Ok(Step::Finished);
            }
            // What was in flight may have been recorded done in the lost
            // entry, or queued: start over, publishing every shard not done
            // (a shard queued twice is harmless, a shard never redone is not).
            active.in_flight.clear();
            active.next = 0;
            return Ok(Step::Wait);
        };
        if progress.state.is_final() {
            // Cancelled (or ended by another coordinator): publish no more.
            self.mark_ended(job, &progress).await?;
            info!(%job, state = ?progress.state, "job ended elsewhere");
            return Ok(Step::Finished);
        }
        if progress.shards_failed > 0 {
            // The worker recorded the shard's error; one lost shard makes an
            // incomplete ensemble, so the rest is not worth sampling. The
            // error recorded first stays the job's error.
            self.fail(job, progress.error.as_deref()).await?;
            info!(%job, error = ?progress.error, "job failed");
            return Ok(Step::Finished);
        }
        let n = active.spec.num_shards();
        if active.spec.filter.is_none() && progress.shards_done >= n {
            return self.finish(job, active, &progress, None).await;
        }

        let done: BTreeSet<u64> = self.progress.done_shards(job).await?.into_iter().collect();
        if active.spec.filter.is_some() {
            match self.filtered_step(active, &done).await? {
                Filtered::Enough(kept) => {
                    return self.finish(job, active, &progress, Some(&kept)).await
                }
                Filtered::Short { kept, valid, drawn } => {
                    let f = active.spec.filter.expect("filtered");
                    let error = format!(
                        "physical filter: {valid} of {drawn} drawn samples are valid ({:.1}%), \
                         {} requested; max_draw_factor {} allows at most {} draws. The {valid} \
                         valid samples stay fetchable",
                        100.0 * valid as f64 / drawn.max(1) as f64,
                        active.spec.num_samples,
                        f.max_draw_factor,
                        active.spec.draw_limit(),
                    );
                    // The manifest of what there is, then the marker and
                    // state (a marker wins over a manifest on rebuild).
                    if let Err(missing) = self
                        .reconciler
                        .write_manifest(&active.spec, Some(&kept))
                        .await?
                    {
                        error!(%job, "{missing}");
                    }
                    self.fail(job, Some(&error)).await?;
                    info!(%job, valid, drawn, "filtered job failed short of its request");
                    return Ok(Step::Finished);
                }
                Filtered::Waiting => {}
            }
        }
        active.in_flight.retain(|i| !done.contains(i));
        active.queued = progress.state == JobState::Queued;
        Ok(Step::Running(done))
    }

    /// Publishes shards of the job not done and not outstanding, at most
    /// `budget` of them and up to the job's window; the number published.
    /// A queued job becomes running with its first shard.
    async fn publish(
        &self,
        job: JobId,
        active: &mut ActiveJob,
        done: &BTreeSet<u64>,
        budget: u64,
    ) -> Result<u64> {
        let n = active.planned.min(active.spec.num_shards());
        let window = self.settings.window_per_job.max(1);
        let mut published = 0;
        while (active.in_flight.len() as u64) < window && published < budget && active.next < n {
            let index = active.next;
            if !done.contains(&index) {
                if active.queued {
                    self.progress
                        .set_state(job, JobState::Running, None)
                        .await?;
                    active.queued = false;
                    info!(%job, "job started");
                }
                self.queue
                    .publish_shard(&active.spec.shard(index), active.spec.priority)
                    .await?;
                active.in_flight.insert(index);
                self.shard_ages.published(job, index);
                published += 1;
                debug!(%job, index, "shard published");
            }
            // Advanced only once published: a failed publish retries the
            // same shard next pass.
            active.next += 1;
        }
        Ok(published)
    }

    /// Every shard is done: write the manifest, then mark the job succeeded.
    /// In that order, so that a client never sees a succeeded job without
    /// its manifest; a crash in between rewrites the same manifest.
    async fn finish(
        &self,
        job: JobId,
        active: &ActiveJob,
        progress: &JobProgress,
        kept: Option<&BTreeMap<u64, Vec<u64>>>,
    ) -> Result<Step> {
        if let Err(error) = self.reconciler.write_manifest(&active.spec, kept).await? {
            // The done set says done, the store disagrees; the store is the
            // source of truth, and an incomplete ensemble must not pass for
            // a complete one.
            error!(%job, "{error}");
            self.fail(job, Some(&error)).await?;
            return Ok(Step::Finished);
        }
        self.progress
            .set_state(job, JobState::Succeeded, None)
            .await?;
        info!(%job, samples = progress.samples_done, "job succeeded");
        Ok(Step::Finished)
    }

    /// A filtered job: reads the valid samples of the done shards from index
    /// 0 on (each shard once) until one is not done or the request is met.
    /// The result is the first `num_samples` valid indices in index order, so
    /// it depends on neither timing nor restarts. When every planned shard is
    /// done and valid samples fall short, more shards are planned: as many as
    /// the valid fraction so far says are needed, a fifth more, up to the
    /// draw limit.
    async fn filtered_step(
        &self,
        active: &mut ActiveJob,
        done: &BTreeSet<u64>,
    ) -> Result<Filtered> {
        let spec = active.spec.clone();
        let want = spec.num_samples;
        // After a restart, shards published earlier may be done already.
        if let Some(&last) = done.iter().next_back() {
            active.planned = active.planned.max(last + 1);
        }
        let mut kept = BTreeMap::new();
        let (mut valid, mut drawn) = (0u64, 0u64);
        let mut index = 0;
        while index < spec.num_shards() && done.contains(&index) {
            if let std::collections::btree_map::Entry::Vacant(slot) = active.valid.entry(index) {
                let v = self
                    .reconciler
                    .shard_valid(&spec, index)
                    .await?
                    .ok_or_else(|| {
                        CoordinatorError::Inconsistent(format!(
                            "shard {index} of filtered job {} has no `valid` array (written by \
                             an older worker?)",
                            spec.id
                        ))
                    })?;
                slot.insert(v);
            }
            let v = &active.valid[&index];
            let take = (want - valid).min(v.len() as u64) as usize;
            kept.insert(index, v[..take].to_vec());
            valid += take as u64;
            drawn += spec.shard(index).len();
            if valid == want {
                return Ok(Filtered::Enough(kept));
            }
            index += 1;
        }
        if index == spec.num_shards() {
            return Ok(Filtered::Short { kept, valid, drawn });
        }
        if index >= active.planned {
            // Every planned shard is done: plan more.
            let need = SampleFilter::more_draws(want - valid, valid, drawn);
            let more = need.div_ceil(spec.shard_size).max(1);
            let before = active.planned;
            active.planned = (active.planned + more).min(spec.num_shards());
            info!(job = %spec.id, valid, drawn, shards = active.planned - before, "valid samples fall short; drawing more");
        }
        Ok(Filtered::Waiting)
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
                    Some(Ok(delivery)) => {
                        // Take what else has arrived too, activating up to
                        // 32 at once: a batch's thousands of ids would
                        // otherwise wait one poll (or one spec read) each.
                        let mut arrived = vec![delivery];
                        while arrived.len() < 1000 {
                            match next_job(&mut jobs).now_or_never() {
                                Some(Some(Ok(d))) => arrived.push(d),
                                _ => break,
                            }
                        }
                        futures::stream::iter(arrived)
                            .for_each_concurrent(32, |d| self.accept(d))
                            .await;
                    }
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
