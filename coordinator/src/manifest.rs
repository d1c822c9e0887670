//! The manifest of a succeeded job: which objects hold its samples, with a
//! digest each, so a client can download and verify the whole ensemble
//! without listing the bucket.

use dig_common::job::JobId;
use serde::{Deserialize, Serialize};

/// `jobs/{id}/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub job: JobId,
    pub num_samples: u64,
    /// Every shard, by ascending index.
    pub shards: Vec<ManifestShard>,
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
}
