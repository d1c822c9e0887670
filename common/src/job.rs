//! Jobs and shards: what a client asks for (`JobSpec`), the unit of work on
//! the queue (`ShardTask`), and how a job is cut into shards.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job id: a UUIDv7, so ids sort by creation time (newest-first listings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// Interactive work overtakes bulk work in the shard queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Bulk,
}

impl Priority {
    /// AMQP message priority (the shard queue has `x-max-priority` 2).
    pub fn amqp(self) -> u8 {
        match self {
            Priority::Interactive => 2,
            Priority::Bulk => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The immutable description of a job, stored once at submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub tenant: String,
    pub name: Option<String>,
    pub sequence: String,
    pub features_sha256: String,
    pub num_samples: u64,
    pub seed: u64,
    /// Sampler steps; `None` = the model's `n_time_step`.
    pub steps: Option<i64>,
    pub model: String,
    pub priority: Priority,
    pub shard_size: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Where to POST the job's view once it is final (a webhook); absent
    /// from specs written before webhooks existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl JobSpec {
    pub fn num_shards(&self) -> u64 {
        self.num_samples.div_ceil(self.shard_size)
    }

    /// The task of shard `index`: samples `[index * shard_size, ...)`.
    pub fn shard(&self, index: u64) -> ShardTask {
        let start = index * self.shard_size;
        ShardTask {
            job: self.id,
            index,
            start,
            end: (start + self.shard_size).min(self.num_samples),
        }
    }
}

/// One unit of work: samples `[start, end)` of a job. Everything else the
/// worker needs (features, seed, model) is in the job's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardTask {
    pub job: JobId,
    pub index: u64,
    pub start: u64,
    pub end: u64,
}

impl ShardTask {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Default shard size for a protein of `len` residues: about `target_sample_steps`
/// sample-steps of work per shard (cost per sample-step grows about as L^1.5
/// over the range that matters), at least 1 sample.
pub fn default_shard_size(len: u64, steps: u64) -> u64 {
    // Calibrated on a 2-core CPU with the published architecture: about
    // 0.2 s per sample-step at L = 128; aim at a few minutes per shard there,
    // much less per shard on a GPU, which is still minutes, not hours.
    let per_sample = steps.max(1) as f64 * (len.max(1) as f64 / 128.0).powf(1.5);
    ((16.0 * 500.0) / per_sample).round().clamp(1.0, 1000.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u64, shard: u64) -> JobSpec {
        JobSpec {
            id: JobId::new(),
            tenant: "t".into(),
            name: None,
            sequence: "A".into(),
            features_sha256: "0".repeat(64),
            num_samples: n,
            seed: 0,
            steps: None,
            model: "m".into(),
            priority: Priority::Interactive,
            shard_size: shard,
            created_at: 0,
            callback_url: None,
        }
    }

    #[test]
    fn shards_cover_every_sample_exactly_once() {
        let s = spec(1003, 100);
        assert_eq!(s.num_shards(), 11);
        let mut next = 0;
        for i in 0..s.num_shards() {
            let t = s.shard(i);
            assert_eq!(t.start, next);
            next = t.end;
        }
        assert_eq!(next, 1003);
        assert_eq!(s.shard(10).len(), 3);
    }

    #[test]
    fn default_shard_size_shrinks_with_length() {
        assert_eq!(default_shard_size(128, 500), 16);
        assert!(default_shard_size(64, 500) > 16);
        assert_eq!(default_shard_size(1000, 500), 1);
        assert_eq!(default_shard_size(10, 10), 1000);
    }

    #[test]
    fn job_ids_sort_by_creation() {
        let a = JobId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    }
}

/// `batches/{id}.json`: a batch as submitted (written by the API before its
/// jobs are queued). Its progress is its jobs'; the coordinator reads the
/// record to give a batch its webhook back after the progress store lost it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: JobId,
    pub tenant: String,
    pub name: Option<String>,
    /// Unix seconds of the submission.
    pub created_at: u64,
    /// The batch's jobs, in entry order.
    pub jobs: Vec<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// `jobs/{id}/state.json`: how a job that did not succeed ended (written by
/// the coordinator when it fails a job or sees it cancelled, and by the API
/// when it cancels one), so that progress rebuilt from the object store
/// keeps the job's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMarker {
    pub job: JobId,
    /// `failed` or `cancelled`.
    pub state: JobState,
    pub error: Option<String>,
    /// Unix seconds the marker was written.
    pub written_at: u64,
}
