//! Shared by the trainer tests: one AdK fragment and a tiny architecture.
#![allow(dead_code)]

use std::path::PathBuf;

use dig_model::dataset::{ManifestEntry, ProteinData};
use dig_model::features::synthetic;
use dig_model::trainer::{LrSchedule, TrainOptions, Trainer};
use dig_model::training::frames;
use dig_model::ModelConfig;
use tch::Tensor;

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Residues 11-34 of adenylate kinase (`adk_open.pdb`), as stored in
/// `train.npz` (its first batch element): `[N, CA, C]` per residue.
pub fn adk_fragment() -> Vec<[[f64; 3]; 3]> {
    let t: std::collections::BTreeMap<String, Tensor> = Tensor::read_npz(data("train.npz"))
        .unwrap()
        .into_iter()
        .collect();
    let get = |k: &str| Vec::<f32>::try_from(t[k].get(0).flatten(0, -1)).unwrap();
    let (n, ca, c) = (get("n"), get("ca"), get("c"));
    (0..24)
        .map(|i| {
            let p = |v: &[f32]| [v[3 * i] as f64, v[3 * i + 1] as f64, v[3 * i + 2] as f64];
            [p(&n), p(&ca), p(&c)]
        })
        .collect()
}

/// AdK residues 11-34.
pub const FRAGMENT: &str = "GAPGAGKGTQAQFIMEKYGIPQIS";

pub fn one_structure() -> ProteinData {
    let atoms = adk_fragment();
    let f = frames(&atoms).unwrap();
    ProteinData {
        name: "adk-11-34".into(),
        entry: ManifestEntry {
            trajectory: "adk-11-34.pdb".into(),
            topology: None,
            features: "adk-11-34.npz".into(),
            weight: 1.0,
        },
        features: synthetic(FRAGMENT).unwrap(),
        frames: vec![f],
        train: vec![0],
        val: vec![],
    }
}

pub fn tiny() -> ModelConfig {
    ModelConfig {
        d_model: 32,
        d_pair: 16,
        n_layer: 2,
        n_heads: 4,
        dim_feedforward: 64,
        ..ModelConfig::default()
    }
}

pub fn options(steps: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size: 4,
        lr: 1e-3,
        warmup: 5,
        schedule: LrSchedule::Cosine,
        min_lr_fraction: 0.1,
        clip: 1.0,
        crop: 16, // crops of 16 of the 24 residues: the crop path runs too
        seed: 7,
        val_fraction: 0.0,
        dropout: 0.1, // dropout's generator is part of what must resume exactly
        ema: None,
        time_weighting: None,
        exact_target_above: None,
    }
}

pub fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
    t.model.state_dict()
}
