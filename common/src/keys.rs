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
