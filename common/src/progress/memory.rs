//! [`MemoryProgress`]: the embedded mode's progress store (see the parent
//! module).

use super::*;

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

#[derive(Default)]
struct JobEntry {
    progress: Option<JobProgress>,
    done: BTreeSet<u64>,
    failed: BTreeSet<u64>,
    attempts: HashMap<u64, u32>,
    /// Reported failures per shard.
    failed_attempts: HashMap<u64, u32>,
    /// The webhook and its fixed body.
    webhook: Option<(WebhookStatus, Option<String>)>,
}

#[derive(Default)]
struct Inner {
    /// Like Redis, attempts may exist for a job without progress.
    jobs: HashMap<JobId, JobEntry>,
    /// tenant -> (created_at, id): iterating backwards is newest first, with
    /// ties broken by id exactly as Redis breaks them by member.
    tenants: HashMap<String, BTreeSet<(u64, JobId)>>,
    idempotency: HashMap<(String, String), (JobId, Instant)>,
    workers: HashMap<String, (WorkerHeartbeat, Instant)>,
    /// Due webhooks: job -> Unix ms of the next attempt (or lease end).
    pending_webhooks: HashMap<JobId, u64>,
    /// Batches with a webhook whose end is awaited.
    watched_batches: BTreeSet<JobId>,
}

impl Inner {
    fn usage(&self, tenant: &str) -> TenantUsage {
        let mut usage = TenantUsage::default();
        for (_, id) in self.tenants.get(tenant).into_iter().flatten() {
            if let Some(p) = self.jobs.get(id).and_then(|e| e.progress.as_ref()) {
                if !p.state.is_final() {
                    usage.unfinished_jobs += 1;
                    usage.queued_samples += p.num_samples.saturating_sub(p.samples_done);
                }
            }
        }
        usage
    }

    fn create(&mut self, spec: &JobSpec, caps: Option<TenantCaps>) -> Option<LimitExceeded> {
        if self
            .jobs
            .get(&spec.id)
            .is_some_and(|e| e.progress.is_some())
        {
            return None;
        }
        if let Some(refused) =
            caps.and_then(|c| c.check(self.usage(&spec.tenant), spec.num_samples))
        {
            return Some(refused);
        }
        let entry = self.jobs.entry(spec.id).or_default();
        entry.progress = Some(JobProgress {
            shards_done: entry.done.len() as u64,
            ..JobProgress::queued(spec)
        });
        if let Some(url) = &spec.callback_url {
            entry.webhook = Some((new_webhook(spec.id, url), None));
        }
        self.tenants
            .entry(spec.tenant.clone())
            .or_default()
            .insert((spec.created_at, spec.id));
        None
    }
}

fn new_webhook(job: JobId, url: &str) -> WebhookStatus {
    WebhookStatus {
        url: url.to_string(),
        state: WebhookState::Pending,
        attempts: 0,
        last_error: None,
        delivery: delivery_id(job),
    }
}

/// The in-process implementation, for the embedded single-process mode. One
/// std mutex: no operation awaits while holding it, and each is as atomic as
/// its Redis script.
#[derive(Default)]
pub struct MemoryProgress {
    inner: Mutex<Inner>,
}

impl MemoryProgress {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave an entry half-updated (every update
        // is a few infallible assignments), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ProgressStore for MemoryProgress {
    async fn create_job(&self, spec: &JobSpec) -> Result<()> {
        self.lock().create(spec, None);
        Ok(())
    }

    async fn create_job_within(
        &self,
        spec: &JobSpec,
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>> {
        Ok(self.lock().create(spec, Some(caps)))
    }

    async fn create_jobs_within(
        &self,
        specs: &[JobSpec],
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>> {
        let mut inner = self.lock();
        let fresh: Vec<&JobSpec> = specs
            .iter()
            .filter(|s| inner.jobs.get(&s.id).is_none_or(|e| e.progress.is_none()))
            .collect();
        let Some(first) = fresh.first() else {
            return Ok(None);
        };
        let samples = fresh.iter().map(|s| s.num_samples).sum();
        let usage = inner.usage(&first.tenant);
        if let Some(refused) = caps.check_many(usage, fresh.len() as u64, samples) {
            return Ok(Some(refused));
        }
        for spec in fresh {
            inner.create(spec, None);
        }
        Ok(None)
    }

    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        Ok(self.lock().usage(tenant))
    }

    async fn webhook(&self, job: JobId) -> Result<Option<WebhookStatus>> {
        Ok(self
            .lock()
            .jobs
            .get(&job)
            .and_then(|e| e.webhook.as_ref())
            .map(|(w, _)| w.clone()))
    }

    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookClaim>> {
        let mut inner = self.lock();
        let mut due: Vec<(u64, JobId)> = inner
            .pending_webhooks
            .iter()
            .filter(|(_, &at)| at <= now_ms)
            .map(|(&job, &at)| (at, job))
            .collect();
        due.sort();
        let mut claims = Vec::new();
        for (_, job) in due.into_iter().take(limit) {
            let webhook = inner
                .jobs
                .get_mut(&job)
                .and_then(|e| e.webhook.as_mut())
                .filter(|(w, _)| w.state == WebhookState::Pending);
            let Some((w, body)) = webhook else {
                inner.pending_webhooks.remove(&job);
                continue;
            };
            w.attempts += 1;
            claims.push(WebhookClaim {
                job,
                url: w.url.clone(),
                delivery: w.delivery.clone(),
                attempt: w.attempts,
                body: body.clone(),
            });
            inner.pending_webhooks.insert(job, lease_until_ms);
        }
        Ok(claims)
    }

    async fn fix_webhook_body(&self, job: JobId, body: &str) -> Result<String> {
        let mut inner = self.lock();
        match inner.jobs.get_mut(&job).and_then(|e| e.webhook.as_mut()) {
            Some((_, fixed)) => Ok(fixed.get_or_insert_with(|| body.to_string()).clone()),
            None => Ok(body.to_string()),
        }
    }

    async fn record_webhook_attempt(&self, job: JobId, outcome: WebhookAttempt<'_>) -> Result<()> {
        let mut inner = self.lock();
        let Some((w, _)) = inner
            .jobs
            .get_mut(&job)
            .and_then(|e| e.webhook.as_mut())
            .filter(|(w, _)| w.state == WebhookState::Pending)
        else {
            return Ok(());
        };
        match outcome {
            WebhookAttempt::Delivered => {
                w.state = WebhookState::Delivered;
                inner.pending_webhooks.remove(&job);
            }
            WebhookAttempt::Retry { error, at_ms } => {
                w.last_error = Some(error.to_string());
                inner.pending_webhooks.insert(job, at_ms);
            }
            WebhookAttempt::GaveUp { error } => {
                w.state = WebhookState::Failed;
                w.last_error = Some(error.to_string());
                inner.pending_webhooks.remove(&job);
            }
        }
        Ok(())
    }

    async fn get(&self, job: JobId) -> Result<Option<JobProgress>> {
        Ok(self.lock().jobs.get(&job).and_then(|e| e.progress.clone()))
    }

    async fn set_state(&self, job: JobId, state: JobState, error: Option<&str>) -> Result<()> {
        let mut inner = self.lock();
        let p = inner
            .jobs
            .get_mut(&job)
            .and_then(|e| e.progress.as_mut())
            .ok_or_else(|| CommonError::NotFound(format!("job {job}")))?;
        if p.state.is_final() {
            tracing::debug!(%job, ?state, "job already final; state change ignored");
            return Ok(());
        }
        let now = now_secs();
        p.state = state;
        if state == JobState::Running && p.started_at.is_none() {
            p.started_at = Some(now);
        }
        if state.is_final() {
            p.finished_at = Some(now);
        }
        if let Some(error) = error {
            p.error = Some(error.to_string());
        }
        let webhook_pending = inner
            .jobs
            .get(&job)
            .and_then(|e| e.webhook.as_ref())
            .is_some_and(|(w, _)| w.state == WebhookState::Pending);
        if state.is_final() && webhook_pending {
            inner.pending_webhooks.entry(job).or_insert_with(now_ms);
        }
        Ok(())
    }

    async fn record_shard(
        &self,
        job: JobId,
        shard: u64,
        samples: u64,
        valid: Option<u64>,
    ) -> Result<bool> {
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(&job)
            .filter(|e| e.progress.is_some())
            .ok_or_else(|| CommonError::NotFound(format!("job {job}")))?;
        let p = entry.progress.as_mut().expect("filtered above");
        check_shard(job, shard, p.num_shards)?;
        if !entry.done.insert(shard) {
            return Ok(false);
        }
        p.shards_done = entry.done.len() as u64;
        p.samples_done += samples;
        if let Some(valid) = valid {
            p.samples_valid = Some(p.samples_valid.unwrap_or(0) + valid);
        }
        Ok(true)
    }

    async fn done_shards(&self, job: JobId) -> Result<Vec<u64>> {
        Ok(self
            .lock()
            .jobs
            .get(&job)
            .map(|e| e.done.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn start_attempt(&self, job: JobId, shard: u64) -> Result<ShardAttempts> {
        let mut inner = self.lock();
        let entry = inner.jobs.entry(job).or_default();
        let started = entry.attempts.entry(shard).or_insert(0);
        *started += 1;
        Ok(ShardAttempts {
            started: *started,
            failed: entry.failed_attempts.get(&shard).copied().unwrap_or(0),
        })
    }

    async fn record_attempt_failed(&self, job: JobId, shard: u64) -> Result<u32> {
        let mut inner = self.lock();
        let failed = inner
            .jobs
            .entry(job)
            .or_default()
            .failed_attempts
            .entry(shard)
            .or_insert(0);
        *failed += 1;
        Ok(*failed)
    }

    async fn forgive_attempt(&self, job: JobId, shard: u64) -> Result<u32> {
        let mut inner = self.lock();
        let attempts = inner
            .jobs
            .get_mut(&job)
            .and_then(|e| e.attempts.get_mut(&shard));
        Ok(match attempts {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        })
    }

    async fn record_shard_failed(&self, job: JobId, shard: u64, reason: &str) -> Result<()> {
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(&job)
            .filter(|e| e.progress.is_some())
            .ok_or_else(|| CommonError::NotFound(format!("job {job}")))?;
        let p = entry.progress.as_mut().expect("filtered above");
        check_shard(job, shard, p.num_shards)?;
        if entry.failed.insert(shard) {
            p.shards_failed += 1;
            p.error.get_or_insert_with(|| shard_error(shard, reason));
        }
        Ok(())
    }

    async fn list_jobs(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<JobId>> {
        let inner = self.lock();
        let Some(jobs) = inner.tenants.get(tenant) else {
            return match cursor {
                None => Ok(Vec::new()),
                Some(c) => Err(CommonError::Invalid(format!(
                    "cursor {c} is not a job of tenant {tenant}"
                ))),
            };
        };
        let mut newest_first = jobs.iter().rev().map(|&(_, id)| id).peekable();
        if let Some(c) = cursor {
            // Skip through the cursor itself.
            if !newest_first.by_ref().any(|id| id == c) {
                return Err(CommonError::Invalid(format!(
                    "cursor {c} is not a job of tenant {tenant}"
                )));
            }
        }
        Ok(newest_first.take(limit).collect())
    }

    async fn idempotent_job(&self, tenant: &str, key: &str, job: JobId) -> Result<JobId> {
        let now = Instant::now();
        let mut inner = self.lock();
        let slot = inner
            .idempotency
            .entry((tenant.to_string(), key.to_string()))
            .or_insert((job, now + Duration::from_secs(IDEMPOTENCY_TTL_SECS)));
        if slot.1 <= now {
            *slot = (job, now + Duration::from_secs(IDEMPOTENCY_TTL_SECS));
        }
        Ok(slot.0)
    }

    async fn release_idempotency(&self, tenant: &str, key: &str, job: JobId) -> Result<()> {
        let mut inner = self.lock();
        let k = (tenant.to_string(), key.to_string());
        if inner.idempotency.get(&k).is_some_and(|(j, _)| *j == job) {
            inner.idempotency.remove(&k);
        }
        Ok(())
    }

    async fn delete_job(&self, spec: &JobSpec) -> Result<()> {
        let mut inner = self.lock();
        inner.jobs.remove(&spec.id);
        inner.pending_webhooks.remove(&spec.id);
        if let Some(list) = inner.tenants.get_mut(&spec.tenant) {
            list.remove(&(spec.created_at, spec.id));
        }
        Ok(())
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        info: &WorkerHeartbeat,
        ttl_secs: u64,
    ) -> Result<()> {
        if ttl_secs == 0 {
            return Err(CommonError::Invalid(
                "heartbeat ttl must be at least 1 s".into(),
            ));
        }
        let expires = Instant::now() + Duration::from_secs(ttl_secs);
        self.lock()
            .workers
            .insert(worker_id.to_string(), (info.clone(), expires));
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.workers.retain(|_, (_, expires)| *expires > now);
        let mut workers: Vec<WorkerHeartbeat> =
            inner.workers.values().map(|(w, _)| w.clone()).collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    async fn rebuild_from_done(&self, spec: &JobSpec, done_shards: &[u64]) -> Result<()> {
        let state = derived_state(spec, done_shards);
        self.rebuild_with_state(spec, done_shards, state, None, None)
            .await
    }

    async fn rebuild_with_state(
        &self,
        spec: &JobSpec,
        done_shards: &[u64],
        state: JobState,
        error: Option<&str>,
        samples_valid: Option<u64>,
    ) -> Result<()> {
        let done: BTreeSet<u64> = done_shards.iter().copied().collect();
        let samples_done = done_samples(spec, &done)?;
        let now = now_secs();
        let mut inner = self.lock();
        let entry = inner.jobs.entry(spec.id).or_default();
        entry.progress = Some(JobProgress {
            state,
            shards_done: done.len() as u64,
            samples_done,
            error: error.map(str::to_string),
            started_at: Some(now),
            finished_at: state.is_final().then_some(now),
            samples_valid,
            ..JobProgress::queued(spec)
        });
        entry.done = done;
        entry.failed.clear();
        if let (None, Some(url)) = (&entry.webhook, &spec.callback_url) {
            entry.webhook = Some((new_webhook(spec.id, url), None));
        }
        let webhook_pending = entry
            .webhook
            .as_ref()
            .is_some_and(|(w, _)| w.state == WebhookState::Pending);
        if state.is_final() && webhook_pending {
            inner.pending_webhooks.entry(spec.id).or_insert_with(now_ms);
        }
        inner
            .tenants
            .entry(spec.tenant.clone())
            .or_default()
            .insert((spec.created_at, spec.id));
        Ok(())
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobId>> {
        let mut jobs: Vec<JobId> = self
            .lock()
            .jobs
            .iter()
            .filter(|(_, e)| e.progress.as_ref().is_some_and(|p| !p.state.is_final()))
            .map(|(&id, _)| id)
            .collect();
        jobs.sort();
        Ok(jobs)
    }

    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        let inner = self.lock();
        Ok(ALL_STATES
            .into_iter()
            .map(|state| {
                let n = inner
                    .jobs
                    .values()
                    .filter(|e| e.progress.as_ref().is_some_and(|p| p.state == state))
                    .count();
                (state, n as u64)
            })
            .collect())
    }

    async fn register_batch_webhook(&self, batch: JobId, url: &str) -> Result<()> {
        let mut inner = self.lock();
        // A batch's webhook lives in an entry without progress, as in Redis
        // under the batch's id.
        let entry = inner.jobs.entry(batch).or_default();
        if entry.webhook.is_none() {
            entry.webhook = Some((new_webhook(batch, url), None));
        }
        inner.watched_batches.insert(batch);
        Ok(())
    }

    async fn watched_batches(&self) -> Result<Vec<JobId>> {
        Ok(self.lock().watched_batches.iter().copied().collect())
    }

    async fn batch_ended(&self, batch: JobId) -> Result<()> {
        let mut inner = self.lock();
        let pending = inner
            .jobs
            .get(&batch)
            .and_then(|e| e.webhook.as_ref())
            .is_some_and(|(w, _)| w.state == WebhookState::Pending);
        if pending {
            inner.pending_webhooks.entry(batch).or_insert_with(now_ms);
        }
        inner.watched_batches.remove(&batch);
        Ok(())
    }

    async fn forget_batch(&self, batch: JobId) -> Result<()> {
        let mut inner = self.lock();
        inner.watched_batches.remove(&batch);
        inner.pending_webhooks.remove(&batch);
        if inner.jobs.get(&batch).is_some_and(|e| e.progress.is_none()) {
            inner.jobs.remove(&batch);
        }
        Ok(())
    }

    async fn delete_all(&self) -> Result<()> {
        *self.lock() = Inner::default();
        Ok(())
    }
}
