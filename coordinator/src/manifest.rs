//! The manifest of a succeeded job: which objects hold its samples, with a
//! digest each, so a client can download and verify the whole ensemble
//! without listing the bucket.

use dig_common::job::{JobId, SampleFilter, Solver};
use serde::{Deserialize, Serialize};

/// `jobs/{id}/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub job: JobId,
    pub num_samples: u64,
    /// Every shard, by ascending index (with a filter: the shards whose
    /// valid samples make the result, in index order).
    pub shards: Vec<ManifestShard>,
    /// Physically valid samples in the listed shards (with a filter: those
    /// kept, `num_samples` when the job succeeded); absent when a shard
    /// predates validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_valid: Option<u64>,
    #[serde(default)]
    pub solver: Solver,
    /// Sampler steps (absent: the model's own number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_calls_per_sample: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<SampleFilter>,
    /// The job's steering as stored (absent: deterministic sampling); the
    /// shards' npz then hold `steer_energy` and `steer_log_z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<serde_json::Value>,
    /// The probability flow above this diffusion time (`flow_above`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_above: Option<f64>,
}

impl Manifest {
    /// Samples the manifest's result holds: with a filter, the kept ones.
    pub fn result_samples(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.kept.as_ref().map_or(s.end - s.start, |k| k.len() as u64))
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    pub index: u64,
    /// Samples `[start, end)` of the job.
    pub start: u64,
    pub end: u64,
    /// The object key (with the deployment's prefix).
    pub key: String,
    pub bytes: u64,
    /// SHA-256 of the object's bytes, lowercase hex.
    pub sha256: String,
    /// Physically valid samples of the shard (absent: not recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<u64>,
    /// With a filter: the sample indices of this shard that belong to the
    /// result (its valid ones, the last shard's cut at `num_samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<u64>>,
}
