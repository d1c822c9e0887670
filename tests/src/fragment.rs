//! The AdK-fragment test model (`tests/data/adk-fragment`, about 60 %
//! valid at 20 steps) as the filter and steering tests sample it, locally
//! with `digctl sample` and through the service with `digctl submit`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::Cluster;
use crate::{digctl_path, repo_root};

pub const SEQUENCE: &str = "AGKGTQAQFIMEKYGIPQISTGDM";
pub const MODEL: &str = "adk-fragment";
/// `DIG_WORKER_BATCH_SIZE` of every [`Cluster`].
pub const BATCH: &str = "5";

pub fn data(name: &str) -> PathBuf {
    repo_root().join("tests/data/adk-fragment").join(name)
}

/// `digctl sample` of the fragment into `out` with `extra` options (one
/// thread); its exit status and standard error.
pub fn sample(
    out: &Path,
    (num, seed, steps): (u64, u64, u64),
    batch: &str,
    extra: &[&str],
) -> (bool, String) {
    let o = Command::new(digctl_path())
        .args([
            "sample",
            "--model",
            data("model").to_str().unwrap(),
            "--features",
            data("features.npz").to_str().unwrap(),
            "--sequence",
            SEQUENCE,
            "--num-samples",
            &num.to_string(),
            "--seed",
            &seed.to_string(),
            "--steps",
            &steps.to_string(),
            "--batch-size",
            batch,
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `digctl submit` of the fragment (features `sha`) as tenant A with
/// `extra` options; the job id.
pub fn submit(
    c: &Cluster,
    sha: &str,
    (num, seed, steps): (u64, u64, u64),
    shard: u64,
    extra: &[&str],
) -> String {
    let (num, seed, steps, shard) = (
        num.to_string(),
        seed.to_string(),
        steps.to_string(),
        shard.to_string(),
    );
    let mut args = vec![
        "submit",
        "--features-sha256",
        sha,
        "--sequence",
        SEQUENCE,
        "--model",
        MODEL,
        "--num-samples",
        &num,
        "--seed",
        &seed,
        "--steps",
        &steps,
        "--shard-size",
        &shard,
    ];
    args.extend_from_slice(extra);
    c.client_ok(&c.key_a, &args).trim().to_string()
}
