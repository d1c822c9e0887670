//! The object-store layout: the one place that knows object keys. Every
//! key lives under an optional prefix (one per deployment, or per test).
//!
//! ```text
//! {prefix}features/{sha256}.npz          content-addressed protein features
//! {prefix}tenants/{tenant}/features/{sha256}.json   a tenant's reference to features: {"length": L}
//! {prefix}structures/{sha256}.pdb       content-addressed uploaded structures (partial diffusion)
//! {prefix}tenants/{tenant}/structures/{sha256}.json a tenant's reference to them: {"residues": L, "structures": M}
//! {prefix}models/{model}/config.json     model directories
//! {prefix}models/{model}/model.safetensors
//! {prefix}jobs/{job}/spec.json           immutable job spec
//! {prefix}jobs/{job}/shards/{index:06}.npz   shard outputs (source of truth)
//! {prefix}jobs/{job}/manifest.json       written when the job succeeds
//! {prefix}jobs/{job}/manifest.partial.json   the API's cache of a failed or
//!                                        cancelled job's finished shards and digests
//! {prefix}jobs/{job}/state.json          written when the job fails or is cancelled
//! ```

use object_store::path::Path;

use crate::job::JobId;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectLayout {
    prefix: String,
}

impl ObjectLayout {
    /// `prefix` is empty or ends without a slash (one is added).
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        ObjectLayout {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    fn path(&self, rest: String) -> Path {
        Path::from(format!("{}{rest}", self.prefix))
    }

    pub fn features(&self, sha256: &str) -> Path {
        self.path(format!("features/{sha256}.npz"))
    }
    /// The marker saying that `tenant` uploaded features `sha256`.
    pub fn tenant_features(&self, tenant: &str, sha256: &str) -> Path {
        self.path(format!("tenants/{tenant}/features/{sha256}.json"))
    }
    /// An uploaded structure file (PDB), by the SHA-256 of its bytes.
    pub fn structure(&self, sha256: &str) -> Path {
        self.path(format!("structures/{sha256}.pdb"))
    }
    /// The marker saying that `tenant` uploaded structures `sha256`.
    pub fn tenant_structures(&self, tenant: &str, sha256: &str) -> Path {
        self.path(format!("tenants/{tenant}/structures/{sha256}.json"))
    }
    pub fn model_dir(&self, model: &str) -> Path {
        self.path(format!("models/{model}"))
    }
    pub fn model_file(&self, model: &str, file: &str) -> Path {
        self.path(format!("models/{model}/{file}"))
    }
    pub fn job_spec(&self, job: JobId) -> Path {
        self.path(format!("jobs/{job}/spec.json"))
    }
    pub fn shard(&self, job: JobId, index: u64) -> Path {
        self.path(format!("jobs/{job}/shards/{index:06}.npz"))
    }
    pub fn shards_dir(&self, job: JobId) -> Path {
        self.path(format!("jobs/{job}/shards"))
    }
    pub fn manifest(&self, job: JobId) -> Path {
        self.path(format!("jobs/{job}/manifest.json"))
    }
    pub fn partial_manifest(&self, job: JobId) -> Path {
        self.path(format!("jobs/{job}/manifest.partial.json"))
    }
    /// The final-state marker of a job that failed or was cancelled, so that
    /// the state survives a loss of the progress store.
    pub fn job_state(&self, job: JobId) -> Path {
        self.path(format!("jobs/{job}/state.json"))
    }
    /// A batch's record: its tenant and jobs (`POST /v1/batches`).
    pub fn batch(&self, batch: JobId) -> Path {
        self.path(format!("batches/{batch}.json"))
    }
    /// The folder of every batch's record, for listing the batches.
    pub fn batches_dir(&self) -> Path {
        self.path("batches".to_string())
    }
    /// The folder of every job's folder, for listing the jobs.
    pub fn jobs_dir(&self) -> Path {
        self.path("jobs".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let job: JobId = "01938a2e-0000-7000-8000-000000000001".parse().unwrap();
        let l = ObjectLayout::new("test-1/");
        assert_eq!(
            l.shard(job, 7).as_ref(),
            "test-1/jobs/01938a2e-0000-7000-8000-000000000001/shards/000007.npz"
        );
        assert_eq!(
            ObjectLayout::new("").features("ab").as_ref(),
            "features/ab.npz"
        );
        assert_eq!(
            l.model_file("dig", "config.json").as_ref(),
            "test-1/models/dig/config.json"
        );
        assert_eq!(
            l.job_state(job).as_ref(),
            "test-1/jobs/01938a2e-0000-7000-8000-000000000001/state.json"
        );
        assert_eq!(l.jobs_dir().as_ref(), "test-1/jobs");
        assert_eq!(ObjectLayout::new("").jobs_dir().as_ref(), "jobs");
    }
}
