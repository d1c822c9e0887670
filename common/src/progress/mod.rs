//! Job progress: state, counters and worker heartbeats, behind
//! [`ProgressStore`] with two implementations of the same semantics:
//!
//! - [`RedisProgress`]: the cluster's store, laid out as in [`crate::keys`];
//!   every read-modify-write is one Lua script or one `MULTI` block, so any
//!   number of coordinators, workers and API servers can share it;
//! - [`MemoryProgress`]: the embedded single-process mode (and tests).
//!
//! The semantics both implement:
//!
//! - Shards are delivered at least once, so [`ProgressStore::record_shard_done`]
//!   counts a shard only the first time it is reported (the done set decides),
//!   and [`ProgressStore::record_shard_failed`] likewise once per shard.
//! - A final state (succeeded, failed, cancelled) is terminal: later
//!   [`ProgressStore::set_state`] calls are ignored, so a slow worker that says
//!   "running" cannot resurrect a cancelled job.
//! - `shards_done` is not a stored counter but the size of the done set, so it
//!   can never disagree with [`ProgressStore::done_shards`].
//! - All times are Unix **seconds** (like `JobSpec::created_at`): they are for
//!   people and for listings; throughput comes from the workers' own
//!   `samples_per_sec` in their heartbeats, not from these timestamps.
//! - The object store is the source of truth for finished shards; after Redis
//!   loses its data, [`ProgressStore::rebuild_from_done`] recreates a job's
//!   entry from the list of shards found there.
//! - Per-tenant limits ([`ProgressStore::create_job_within`]) are checked and
//!   the job created in one step, so concurrent submissions cannot overshoot
//!   them. A tenant's usage is computed from its set of unfinished jobs
//!   (kept with the create and final-state transitions), visiting each of
//!   them: bounded by the job cap.
//! - A job created with a `callback_url` gets a webhook entry (pending). Its
//!   switch to a final state makes the webhook due; [`ProgressStore::claim_webhooks`]
//!   hands each due webhook to one caller at a time for a lease, so API
//!   replicas do not send it twice unless a sender dies mid-attempt (then the
//!   lease runs out and another sends it again: at least once).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{CommonError, Result};
use crate::job::{JobId, JobSpec, JobState, SampleFilter, Solver};
use crate::keys::RedisKeys;

mod memory;
mod rebuild;
mod redis_store;

pub use self::memory::MemoryProgress;
use self::rebuild::{check_shard, derived_state, done_samples};
pub use self::redis_store::RedisProgress;
use self::redis_store::{field, required};

/// What a client sees of a job while and after it runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobProgress {
    pub state: JobState,
    pub tenant: String,
    pub num_shards: u64,
    pub num_samples: u64,
    pub shards_done: u64,
    pub samples_done: u64,
    pub shards_failed: u64,
    /// The first failure, as `"shard 3: reason"` (or what `set_state` was given).
    pub error: Option<String>,
    /// Unix seconds (the spec's `created_at`).
    pub created_at: u64,
    /// Unix seconds of the first switch to running.
    pub started_at: Option<u64>,
    /// Unix seconds of the switch to a final state.
    pub finished_at: Option<u64>,
    /// Physically valid samples among `samples_done`; `None` when a shard
    /// was recorded without its count (by a worker older than the count).
    #[serde(default)]
    pub samples_valid: Option<u64>,
    /// The spec's solver, steps and filter, so the job view needs no spec.
    #[serde(default)]
    pub solver: Solver,
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default)]
    pub filter: Option<SampleFilter>,
    /// The spec's steering, as stored (absent: deterministic sampling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<serde_json::Value>,
    /// The spec's `log_density`.
    #[serde(default)]
    pub log_density: bool,
    /// The spec's partial-diffusion start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_structure: Option<crate::job::FromStructure>,
    /// The spec's `flow_above`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_above: Option<f64>,
}

impl JobProgress {
    /// A new job's entry: queued, nothing done, the spec's settings.
    pub fn queued(spec: &JobSpec) -> JobProgress {
        JobProgress {
            state: JobState::Queued,
            tenant: spec.tenant.clone(),
            num_shards: spec.num_shards(),
            num_samples: spec.num_samples,
            shards_done: 0,
            samples_done: 0,
            shards_failed: 0,
            error: None,
            created_at: spec.created_at,
            started_at: None,
            finished_at: None,
            samples_valid: Some(0),
            solver: spec.solver,
            steps: spec.steps.map(|s| s.max(0) as u64),
            filter: spec.filter,
            steering: spec.steering.clone(),
            log_density: spec.log_density,
            from_structure: spec.from_structure.clone(),
            flow_above: spec.flow_above,
        }
    }
}

/// The spec's sampling settings as progress-store fields (name, value).
fn sampling_fields(spec: &JobSpec) -> Vec<(&'static str, String)> {
    let mut fields = vec![("solver", spec.solver.as_str().to_string())];
    if let Some(steps) = spec.steps {
        fields.push(("steps", steps.to_string()));
    }
    if let Some(filter) = spec.filter {
        fields.push((
            "filter",
            serde_json::to_string(&filter).expect("a filter serializes"),
        ));
    }
    if let Some(steering) = &spec.steering {
        fields.push(("steering", steering.to_string()));
    }
    if spec.log_density {
        fields.push(("log_density", "true".to_string()));
    }
    if let Some(t) = spec.flow_above {
        fields.push(("flow_above", t.to_string()));
    }
    if let Some(f) = &spec.from_structure {
        fields.push((
            "from_structure",
            serde_json::to_string(f).expect("a start serializes"),
        ));
    }
    fields
}

/// Caps a tenant's new job must fit under ([`ProgressStore::create_job_within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCaps {
    /// Most unfinished jobs.
    pub max_jobs: u64,
    /// Most samples waiting: `num_samples - samples_done` summed over the
    /// unfinished jobs, the new one included.
    pub max_queued_samples: u64,
}

/// What a tenant has waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantUsage {
    pub unfinished_jobs: u64,
    pub queued_samples: u64,
}

impl TenantCaps {
    /// Whether a new job of `requested` samples fits beside `usage`.
    pub fn check(&self, usage: TenantUsage, requested: u64) -> Option<LimitExceeded> {
        self.check_many(usage, 1, requested)
    }

    /// Whether `jobs` new jobs of `requested` samples in all fit beside
    /// `usage` (a batch counts whole).
    pub fn check_many(
        &self,
        usage: TenantUsage,
        jobs: u64,
        requested: u64,
    ) -> Option<LimitExceeded> {
        if usage.unfinished_jobs.saturating_add(jobs) > self.max_jobs {
            Some(LimitExceeded::Jobs {
                unfinished: usage.unfinished_jobs,
                limit: self.max_jobs,
            })
        } else if usage.queued_samples.saturating_add(requested) > self.max_queued_samples {
            Some(LimitExceeded::Samples {
                queued: usage.queued_samples,
                requested,
                limit: self.max_queued_samples,
            })
        } else {
            None
        }
    }
}

/// Why [`ProgressStore::create_job_within`] created nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// The tenant has `unfinished` jobs already; the cap is `limit`.
    Jobs { unfinished: u64, limit: u64 },
    /// `queued` samples wait already; `requested` more would pass `limit`.
    Samples {
        queued: u64,
        requested: u64,
        limit: u64,
    },
}

/// Where a job's webhook stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookState {
    /// Not sent yet (the job is not final), or being retried.
    Pending,
    /// A 2xx answer came back.
    Delivered,
    /// Every attempt failed; no more are made.
    Failed,
}

/// A job's webhook.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookStatus {
    pub url: String,
    pub state: WebhookState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Why the latest failed attempt failed.
    pub last_error: Option<String>,
    /// The `X-Dig-Delivery` id: one per job, the same on every attempt.
    pub delivery: String,
}

/// A due webhook handed to one sender by [`ProgressStore::claim_webhooks`].
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookClaim {
    pub job: JobId,
    pub url: String,
    pub delivery: String,
    /// The number of this attempt, from 1.
    pub attempt: u32,
    /// The body an earlier attempt fixed ([`ProgressStore::fix_webhook_body`]).
    pub body: Option<String>,
}

/// How a webhook attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookAttempt<'a> {
    Delivered,
    /// Failed; due again at Unix ms `at_ms`.
    Retry {
        error: &'a str,
        at_ms: u64,
    },
    /// Failed, and no more attempts are made.
    GaveUp {
        error: &'a str,
    },
}

/// The attempts at one shard so far ([`ProgressStore::start_attempt`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardAttempts {
    /// Attempts started and not taken back, the one starting included.
    pub started: u32,
    /// Of those, the ones that ended in an error their worker reported
    /// ([`ProgressStore::record_attempt_failed`]).
    pub failed: u32,
}

impl ShardAttempts {
    /// Earlier attempts that ended without any report: each worker running
    /// one died (SIGKILL, preemption, out of memory, a crash that takes the
    /// process down). Successful attempts are acked and never start again,
    /// so every other earlier start is a reported failure or a death.
    pub fn deaths(&self) -> u32 {
        self.started.saturating_sub(1 + self.failed)
    }
}

/// A worker's periodic "I am alive", kept for `ttl_secs` after each beat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WorkerHeartbeat {
    pub id: String,
    /// e.g. `"cuda:0"` or `"cpu"`.
    pub device: String,
    /// The shard being sampled, e.g. `"{job}/3"`; `None` when idle.
    pub shard: Option<String>,
    pub samples_per_sec: f64,
    /// Unix seconds of the beat.
    pub at: u64,
}

#[async_trait]
pub trait ProgressStore: Send + Sync {
    /// Registers a queued job and lists it under its tenant (and, with a
    /// `callback_url`, its pending webhook). Creating a job that already
    /// exists changes nothing (a retried submission must not reset the
    /// counters of a running job).
    async fn create_job(&self, spec: &JobSpec) -> Result<()>;

    /// [`ProgressStore::create_job`] if the tenant stays within `caps` with
    /// this job; otherwise nothing is created and the answer says which cap
    /// it would pass. Check and creation are one atomic step. A job that
    /// exists already is left as it is (`None`).
    async fn create_job_within(
        &self,
        spec: &JobSpec,
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>>;

    /// [`ProgressStore::create_job`] for every spec of `specs` (one
    /// tenant's, a batch) if the tenant stays within `caps` with all of
    /// them; otherwise none is created. Check and creation are one atomic
    /// step, so single submissions racing with a batch cannot pass a cap.
    /// Jobs that exist already are left as they are and not counted twice.
    async fn create_jobs_within(
        &self,
        specs: &[JobSpec],
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>>;

    /// The tenant's unfinished jobs and the samples they still have to draw.
    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage>;

    /// The job's webhook, `None` when it was created without a `callback_url`.
    async fn webhook(&self, job: JobId) -> Result<Option<WebhookStatus>>;

    /// Takes up to `limit` webhooks due at Unix ms `now_ms` (their job is
    /// final, their next attempt time has come): counts an attempt at each
    /// and holds it until `lease_until_ms`, so that no other caller takes it
    /// meanwhile. The caller reports each with
    /// [`ProgressStore::record_webhook_attempt`]; one it never reports is
    /// due again when the lease ends.
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookClaim>>;

    /// Fixes the body of the job's webhook unless an earlier attempt did;
    /// returns the fixed one (every attempt sends the same bytes).
    async fn fix_webhook_body(&self, job: JobId, body: &str) -> Result<String>;

    /// Records how an attempt ended: delivered or given up (no longer due),
    /// or due again at a later time. Ignored unless the webhook is pending.
    async fn record_webhook_attempt(&self, job: JobId, outcome: WebhookAttempt<'_>) -> Result<()>;

    /// The job's progress, `None` if unknown.
    async fn get(&self, job: JobId) -> Result<Option<JobProgress>>;

    /// Moves the job to `state` (recording `error` when given): the first
    /// switch to running sets `started_at`, a final state sets `finished_at`.
    /// Once final, a job keeps its state; the call is then a no-op.
    /// `NotFound` if the job is unknown.
    async fn set_state(&self, job: JobId, state: JobState, error: Option<&str>) -> Result<()>;

    /// Counts shard `shard` (with `samples` samples, `valid` of them
    /// physically valid when known) as done unless it already was; returns
    /// whether this call counted it. `NotFound` for an unknown job, `Invalid`
    /// for a shard index out of range.
    async fn record_shard(
        &self,
        job: JobId,
        shard: u64,
        samples: u64,
        valid: Option<u64>,
    ) -> Result<bool>;

    /// [`record_shard`](Self::record_shard) without a valid count.
    async fn record_shard_done(&self, job: JobId, shard: u64, samples: u64) -> Result<bool> {
        self.record_shard(job, shard, samples, None).await
    }

    /// Indices of the finished shards, ascending.
    async fn done_shards(&self, job: JobId) -> Result<Vec<u64>>;

    /// Counts one more attempt at `shard` as started; returns the attempts
    /// so far (`started` 1 on the first delivery) and how many of them
    /// reported a failure, read in the same atomic step.
    async fn start_attempt(&self, job: JobId, shard: u64) -> Result<ShardAttempts>;

    /// Counts the attempt in progress at `shard` as failed by an error its
    /// worker reported (not a death); returns the reported failures so far.
    async fn record_attempt_failed(&self, job: JobId, shard: u64) -> Result<u32>;

    /// Takes back one started attempt at `shard` (never below zero): the
    /// attempt ended for a reason that is not the shard's (a backing service
    /// unreachable, the worker shutting down), so it counts neither as a
    /// failure nor as a death. Returns the started attempts that remain.
    async fn forgive_attempt(&self, job: JobId, shard: u64) -> Result<u32>;

    /// Counts shard `shard` as failed for good (once per shard) and keeps the
    /// job's first error as `"shard {shard}: {reason}"`. Does not change the
    /// job's state: the coordinator decides whether the job fails.
    async fn record_shard_failed(&self, job: JobId, shard: u64, reason: &str) -> Result<()>;

    /// The tenant's jobs, newest first (by `created_at`, then by id), at most
    /// `limit`; `cursor` is the last id of the previous page, excluded.
    /// `Invalid` when the cursor is not one of this tenant's jobs.
    async fn list_jobs(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<JobId>>;

    /// Binds the tenant's Idempotency-Key `key` to `job` unless it is bound
    /// already; returns the job the key is bound to (the earlier one if any,
    /// else `job`). A binding lasts [`IDEMPOTENCY_TTL_SECS`].
    async fn idempotent_job(&self, tenant: &str, key: &str, job: JobId) -> Result<JobId>;

    /// Unbinds `key` if it is bound to `job` (a submission that failed after
    /// binding, so that a retry with the same key can succeed).
    async fn release_idempotency(&self, tenant: &str, key: &str, job: JobId) -> Result<()>;

    /// Forgets a job entirely (entry, done and failed sets, attempts, tenant
    /// listing, unfinished index): undoing a submission that failed halfway.
    async fn delete_job(&self, spec: &JobSpec) -> Result<()>;

    /// Publishes the worker's heartbeat, forgotten `ttl_secs` (≥ 1) later
    /// unless renewed.
    async fn heartbeat(&self, worker_id: &str, info: &WorkerHeartbeat, ttl_secs: u64)
        -> Result<()>;

    /// The live workers' latest heartbeats, by id.
    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>>;

    /// Recreates the job's entry (counters and done set) from the shards the
    /// object store holds, e.g. after Redis lost its data: `samples_done`
    /// from the shards' ranges, state succeeded when every shard is done,
    /// else running. Replaces whatever entry the job had; failure counts and
    /// the error start afresh (those shards will be retried).
    async fn rebuild_from_done(&self, spec: &JobSpec, done_shards: &[u64]) -> Result<()>;

    /// [`rebuild_from_done`](Self::rebuild_from_done) with the state (and
    /// error) given instead of derived from the done set: for a job whose end
    /// the object store records (the state marker of a failed or cancelled
    /// job), so that it never shows as running again, nor as succeeded
    /// without a manifest. A final state sets `finished_at` and keeps the job
    /// out of the unfinished set.
    /// `samples_valid`: the valid samples of the done shards, when known.
    async fn rebuild_with_state(
        &self,
        spec: &JobSpec,
        done_shards: &[u64],
        state: JobState,
        error: Option<&str>,
        samples_valid: Option<u64>,
    ) -> Result<()>;

    /// Every job not in a final state, of all tenants, ascending: what a
    /// (re)started coordinator must drive. A job enters the set when created
    /// and leaves it when it reaches a final state.
    async fn unfinished_jobs(&self) -> Result<Vec<JobId>>;

    /// How many jobs of all tenants are in each state, every state listed
    /// (for metrics). Redis: final states from counters kept by the state
    /// transitions (and rebuilds), queued and running by visiting the
    /// unfinished jobs only (pipelined), so the cost follows the jobs under
    /// way, not every job ever submitted.
    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>>;

    /// Gives batch `batch` a pending webhook to `url` (kept like a job's,
    /// under the batch's id) and lists the batch among those whose end is
    /// awaited ([`ProgressStore::watched_batches`]). Idempotent.
    async fn register_batch_webhook(&self, batch: JobId, url: &str) -> Result<()>;

    /// The batches registered and not ended yet, ascending.
    async fn watched_batches(&self) -> Result<Vec<JobId>>;

    /// The batch has ended: its pending webhook becomes due now and the
    /// batch leaves the watched set (atomically).
    async fn batch_ended(&self, batch: JobId) -> Result<()>;

    /// Forgets a batch's webhook and watch (undoing a failed submission).
    async fn forget_batch(&self, batch: JobId) -> Result<()>;

    /// Deletes everything of this store (every key of the prefix): for tests.
    async fn delete_all(&self) -> Result<()>;
}

/// How long an Idempotency-Key stays bound to its job: a day, as common
/// payment APIs do; a client retrying later than that gets a new job.
pub const IDEMPOTENCY_TTL_SECS: u64 = 86_400;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds (webhook schedules).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `X-Dig-Delivery` id of a job's webhook: the job id (one webhook per
/// job), so that even a webhook recreated after Redis lost its data keeps
/// the id receivers deduplicate by.
fn delivery_id(job: JobId) -> String {
    job.to_string()
}

/// The refusal a usage of `jobs` unfinished jobs and `queued` samples gives
/// a new job of `requested` samples under `caps` (`status` as the create
/// script answers: -1 job cap, -2 sample cap).
fn refusal(
    status: i64,
    jobs: u64,
    queued: u64,
    requested: u64,
    caps: TenantCaps,
) -> Option<LimitExceeded> {
    match status {
        -1 => Some(LimitExceeded::Jobs {
            unfinished: jobs,
            limit: caps.max_jobs,
        }),
        -2 => Some(LimitExceeded::Samples {
            queued,
            requested,
            limit: caps.max_queued_samples,
        }),
        _ => None,
    }
}

fn parse_webhook(job: JobId, map: HashMap<String, String>) -> Result<Option<WebhookStatus>> {
    if map.is_empty() {
        return Ok(None);
    }
    let state = match map.get("state").map(String::as_str) {
        Some("pending") => WebhookState::Pending,
        Some("delivered") => WebhookState::Delivered,
        Some("failed") => WebhookState::Failed,
        other => {
            return Err(CommonError::Other(format!(
                "job {job}: bad webhook state {other:?} in progress store"
            )))
        }
    };
    Ok(Some(WebhookStatus {
        url: required(&map, job, "url")?,
        state,
        attempts: field(&map, job, "attempts")?.unwrap_or(0),
        last_error: map.get("last_error").cloned(),
        delivery: map
            .get("delivery")
            .cloned()
            .unwrap_or_else(|| delivery_id(job)),
    }))
}

/// The wire name of a state (`"running"`), the one serde gives it, so Redis
/// and the API spell states alike.
fn state_name(state: JobState) -> String {
    match serde_json::to_value(state) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("JobState serializes as a string"),
    }
}

fn parse_state(name: &str) -> Result<JobState> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| CommonError::Other(format!("unknown job state {name:?} in progress store")))
}

const ALL_STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

fn shard_error(shard: u64, reason: &str) -> String {
    format!("shard {shard}: {reason}")
}
