//! The Redis key layout: the one place that knows Redis keys. Every key
//! starts with a prefix (one per deployment, or per test).
//!
//! ```text
//! {p}:job:{job}               hash: state, tenant, num_shards, num_samples,
//!                             samples_done, shards_failed, error, created_at,
//!                             started_at, finished_at
//! {p}:job:{job}:done          set of finished shard indices (SADD says "new")
//! {p}:job:{job}:attempts      hash: shard index -> attempts started
//! {p}:job:{job}:failed        set of permanently failed shard indices
//! {p}:jobs:{tenant}           sorted set of job ids by creation time
//! {p}:unfinished              set of job ids not in a final state (all
//!                             tenants): what a restarted coordinator resumes
//! {p}:unfinished:{tenant}     the same for one tenant: its SCARD is the
//!                             tenant's unfinished-job count, its members
//!                             the jobs whose remaining samples make the
//!                             tenant's queued samples (per-tenant limits)
//! {p}:job:{job}:webhook       hash: url, state (pending|delivered|failed),
//!                             attempts, last_error, delivery (the
//!                             X-Dig-Delivery id), body (the JSON sent,
//!                             fixed at the first attempt so retries are
//!                             byte-identical); only jobs with a callback_url
//! {p}:webhooks:pending        sorted set: final jobs whose webhook is to be
//!                             sent, scored by the Unix ms of the next
//!                             attempt (while one is in flight: the end of
//!                             its sender's lease)
//! {p}:idem:{tenant}:{key}     Idempotency-Key -> job id
//! {p}:worker:{id}             hash: heartbeat (device, shard, samples/s), with TTL
//! ```

use crate::job::JobId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: &str) -> Self {
        RedisKeys {
            prefix: prefix.trim_end_matches(':').to_string(),
        }
    }
    pub fn job(&self, job: JobId) -> String {
        format!("{}:job:{job}", self.prefix)
    }
    pub fn job_done(&self, job: JobId) -> String {
        format!("{}:job:{job}:done", self.prefix)
    }
    pub fn job_attempts(&self, job: JobId) -> String {
        format!("{}:job:{job}:attempts", self.prefix)
    }
    pub fn job_failed(&self, job: JobId) -> String {
        format!("{}:job:{job}:failed", self.prefix)
    }
    pub fn tenant_jobs(&self, tenant: &str) -> String {
        format!("{}:jobs:{tenant}", self.prefix)
    }
    pub fn unfinished(&self) -> String {
        format!("{}:unfinished", self.prefix)
    }
    /// Jobs that reached each final state: a hash `state -> count`, so that
    /// counting jobs by state visits the unfinished jobs only.
    pub fn final_counts(&self) -> String {
        format!("{}:final-counts", self.prefix)
    }
    /// The tenant's unfinished jobs: `{unfinished}:{tenant}` (scripts that
    /// know the tenant only from the job's hash derive it the same way).
    pub fn tenant_unfinished(&self, tenant: &str) -> String {
        format!("{}:{tenant}", self.unfinished())
    }
    pub fn job_webhook(&self, job: JobId) -> String {
        format!("{}:job:{job}:webhook", self.prefix)
    }
    /// Batches with a webhook whose end is awaited.
    pub fn watched_batches(&self) -> String {
        format!("{}:batches:watched", self.prefix)
    }
    pub fn webhooks_pending(&self) -> String {
        format!("{}:webhooks:pending", self.prefix)
    }
    /// `{p}:job:` — job keys are this plus the id (for scripts that visit
    /// the jobs of a set).
    pub fn job_prefix(&self) -> String {
        format!("{}:job:", self.prefix)
    }
    pub fn idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{}:idem:{tenant}:{key}", self.prefix)
    }
    pub fn worker(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.prefix)
    }
    /// Pattern matching every key of this prefix (for cleanup in tests).
    pub fn all(&self) -> String {
        format!("{}:*", self.prefix)
    }
}
