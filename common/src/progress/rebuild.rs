//! What the Redis and in-memory stores share when they rebuild a job's
//! entry from the shards the object store holds (and when they record one).

use std::collections::BTreeSet;

use crate::error::{CommonError, Result};
use crate::job::{JobId, JobSpec, JobState};

pub(super) fn check_shard(job: JobId, shard: u64, num_shards: u64) -> Result<()> {
    if shard >= num_shards {
        return Err(CommonError::Invalid(format!(
            "job {job} has {num_shards} shards, no shard {shard}"
        )));
    }
    Ok(())
}

/// What [`ProgressStore::rebuild_from_done`] makes of a done list: succeeded
/// when it holds every shard, else running.
pub(super) fn derived_state(spec: &JobSpec, done_shards: &[u64]) -> JobState {
    let done: BTreeSet<u64> = done_shards.iter().copied().collect();
    if done.len() as u64 == spec.num_shards() {
        JobState::Succeeded
    } else {
        JobState::Running
    }
}

/// Samples of the given shards (deduplicated, checked against the spec).
pub(super) fn done_samples(spec: &JobSpec, done: &BTreeSet<u64>) -> Result<u64> {
    let n = spec.num_shards();
    done.iter().try_fold(0, |acc, &i| {
        check_shard(spec.id, i, n)?;
        Ok(acc + spec.shard(i).len())
    })
}
