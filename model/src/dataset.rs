//! Training data: a manifest of trajectories, each with the features of its
//! protein, turned into residue frames and split into training and
//! validation frames.
//!
//! The manifest is JSON Lines, one object per trajectory:
//! `{"trajectory": "frames.pdb", "topology": "top.psf", "features": "f.npz", "weight": 1.0}`
//! (`topology` may be omitted for a PDB, `weight` defaults to 1; relative
//! paths are taken from the manifest's folder).

use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::backbone::{read_trajectory, resolve};
use crate::features::Features;
use crate::training::frames;
use crate::{ModelConfig, ModelError, Result};

/// One line of a data manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub trajectory: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<PathBuf>,
    pub features: PathBuf,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Reads a manifest; paths come back resolved against its folder.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut e: ManifestEntry = serde_json::from_str(line).map_err(|e| {
            ModelError::format(
                path,
                format!(
                    "line {}: {e} (expected {{\"trajectory\": ..., \"topology\": ..., \"features\": ..., \"weight\": ...}})",
                    i + 1
                ),
            )
        })?;
        if !(e.weight.is_finite() && e.weight > 0.0) {
            return Err(ModelError::format(
                path,
                format!(
                    "line {}: weight must be a positive number, got {}",
                    i + 1,
                    e.weight
                ),
            ));
        }
        e.trajectory = resolve(base, &e.trajectory);
        e.topology = e.topology.map(|t| resolve(base, &t));
        e.features = resolve(base, &e.features);
        out.push(e);
    }
    if out.is_empty() {
        return Err(ModelError::format(
            path,
            "the manifest lists no trajectories",
        ));
    }
    Ok(out)
}

/// The frames of one trajectory with its protein's features.
pub struct ProteinData {
    pub name: String,
    pub entry: ManifestEntry,
    pub features: Features,
    /// Per frame: `tr (L*3)`, `rot (L*9)`.
    pub frames: Vec<(Vec<f32>, Vec<f32>)>,
    /// Indices into `frames` used for training and for validation.
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

impl ProteinData {
    pub fn len_residues(&self) -> usize {
        self.features.len() as usize
    }

    /// The structure a training frame keeps at t = 1, averaged over the
    /// training frames: `|x0|^2 / tr_sigma_max^2` (nats; `x0` the frame's
    /// CA translations, centred), the log-likelihood ratio of the frame's
    /// own orientation against a random one under the last noise level.
    /// The sampler starts from the prior, which holds none: a model trained
    /// where this is large learns to read structure out of the noise, not
    /// to fold a cloud without it (examples/adk/README.md, "Stage 3": 57.6
    /// nats for AdK's DIMS frames at 35 Å went with a quarter of mirror
    /// images; 1.8 at 200 Å). 0 without training frames.
    pub fn terminal_signal(&self, tr_sigma_max: f64) -> f64 {
        if self.train.is_empty() {
            return 0.0;
        }
        let total: f64 = self
            .train
            .iter()
            .map(|&i| {
                self.frames[i]
                    .0
                    .iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
            })
            .sum();
        total / self.train.len() as f64 / (tr_sigma_max * tr_sigma_max)
    }
}

/// `digctl train` warns above this terminal signal (nats; see
/// [`ProteinData::terminal_signal`]).
pub const TERMINAL_SIGNAL_WARN: f64 = 10.0;

/// Loads every manifest entry: reads the trajectory, checks it against the
/// features (residue count), builds frames and holds out `val_fraction` of
/// each trajectory's frames (chosen by `seed`; at least one frame stays for
/// training, and a trajectory of two or more frames gives at least one to
/// validation when the fraction is positive).
pub fn load(
    entries: &[ManifestEntry],
    cfg: &ModelConfig,
    val_fraction: f64,
    seed: u64,
) -> Result<Vec<ProteinData>> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(ModelError::Invalid(format!(
            "--val-fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let mut out = Vec::new();
    for (n, e) in entries.iter().enumerate() {
        let features = Features::from_npz(&e.features)?;
        features
            .validate(cfg)
            .map_err(|err| ModelError::format(&e.features, err.to_string()))?;
        let traj = read_trajectory(&e.trajectory, e.topology.as_deref())?;
        let l = features.len() as usize;
        if traj.len_residues() != l {
            return Err(ModelError::format(
                &e.trajectory,
                format!(
                    "has {} residues but the features {} are for L = {l}",
                    traj.len_residues(),
                    e.features.display()
                ),
            ));
        }
        if let Some(seq) = &features.sequence {
            let got = traj.sequence();
            if seq.len() == got.len() {
                if let Some(i) = seq
                    .chars()
                    .zip(got.chars())
                    .position(|(a, b)| a != b && a != 'X' && b != 'X')
                {
                    return Err(ModelError::format(
                        &e.trajectory,
                        format!(
                            "residue {} is {} but the features' sequence has {} there",
                            traj.residues[i],
                            got.chars().nth(i).unwrap(),
                            seq.chars().nth(i).unwrap()
                        ),
                    ));
                }
            }
        }
        let mut fr = Vec::with_capacity(traj.frames.len());
        for (k, f) in traj.frames.iter().enumerate() {
            let atoms: Vec<[[f64; 3]; 3]> =
                f.iter().map(|r| r.map(|a| a.map(|v| v as f64))).collect();
            fr.push(
                frames(&atoms).map_err(|m| {
                    ModelError::format(&e.trajectory, format!("frame {}: {m}", k + 1))
                })?,
            );
        }
        let count = fr.len();
        let mut order: Vec<usize> = (0..count).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(1_000_000 + n as u64);
        for i in (1..count).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut n_val = (val_fraction * count as f64).round() as usize;
        if val_fraction > 0.0 && count >= 2 {
            n_val = n_val.max(1);
        }
        n_val = n_val.min(count.saturating_sub(1));
        let mut val: Vec<usize> = order[..n_val].to_vec();
        let mut train: Vec<usize> = order[n_val..].to_vec();
        val.sort_unstable();
        train.sort_unstable();
        let name = e
            .trajectory
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(ProteinData {
            name,
            entry: e.clone(),
            features,
            frames: fr,
            train,
            val,
        });
    }
    Ok(out)
}
