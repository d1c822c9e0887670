//! The one error type of the coordinator.

use dig_common::job::JobId;
use dig_common::CommonError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The progress store has no entry for the job: it was never submitted
    /// (or its entry was deleted), so there is nothing to run.
    #[error("job {0} is unknown to the progress store")]
    UnknownJob(JobId),
    /// The job's spec is not in the object store.
    #[error("job {0} has no spec in the object store")]
    MissingSpec(JobId),
    /// The job's spec is there but unreadable.
    #[error("job {job} has an unreadable spec: {source}")]
    BadSpec {
        job: JobId,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("manifest: {0}")]
    Json(#[from] serde_json::Error),
    /// The object store contradicts itself (e.g. a shard listed, then gone).
    #[error("{0}")]
    Inconsistent(String),
}

impl CoordinatorError {
    /// Errors that retrying cannot fix: a job id with one of these is
    /// dropped from the jobs queue instead of being redelivered forever.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CoordinatorError::UnknownJob(_)
                | CoordinatorError::MissingSpec(_)
                | CoordinatorError::BadSpec { .. }
        )
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
