//! Shards reproduce the local sampler exactly and reuse cached work.

use std::path::PathBuf;

use dig_common::job::{JobId, JobSpec, Priority};
use dig_model::sampling::{sample_ensemble, InitialPoses};
use dig_model::so3::So3Tables;
use dig_model::{DigModel, Sampler, Schedule};
use dig_worker::shard::{CacheStats, ShardSampler};
use tch::{Device, Tensor};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data")
        .join(name)
}

fn spec(n: u64, shard: u64) -> JobSpec {
    JobSpec {
        id: JobId::new(),
        tenant: "lab".into(),
        name: None,
        sequence: "MKTAYIAKQRQISFVKSHFSRQLE".into(),
        features_sha256: "f".repeat(64),
        num_samples: n,
        seed: 42,
        steps: Some(20),
        model: "dig-small".into(),
        priority: Priority::Interactive,
        shard_size: shard,
        created_at: 0,
        callback_url: None,
        solver: Default::default(),
        filter: None,
        steering: None,
        log_density: false,
        from_structure: None,
        flow_above: None,
    }
}

#[test]
fn shards_concatenate_to_the_local_run_bit_for_bit_with_one_protein_load() {
    let spec = spec(12, 4);
    let mut sampler = ShardSampler::new(Device::Cpu, 2, u64::MAX);
    let mut tr = Vec::new();
    let mut index = Vec::new();
    for i in 0..spec.num_shards() {
        let e = sampler
            .sample(&spec, &spec.shard(i), &data(""), &data("features.npz"))
            .unwrap();
        tr.extend(e.tr);
        index.extend(e.sample_index);
    }
    assert_eq!(index, (0..12).collect::<Vec<i64>>());
    assert_eq!(
        sampler.stats,
        CacheStats {
            model_hits: 2,
            model_misses: 1,
            protein_hits: 2,
            protein_misses: 1
        }
    );

    // The same samples drawn in one local run (batch 2, as the shards).
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f: std::collections::BTreeMap<_, _> = Tensor::read_npz(data("features.npz"))
        .unwrap()
        .into_iter()
        .collect();
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let s = Sampler::new(
        &model.net,
        Schedule::new(model.net.config(), &so3, Some(20)).unwrap(),
    );
    let init = InitialPoses::Seeded {
        seed: 42,
        indices: (0..12).collect(),
    };
    let local = sample_ensemble(&s, &ctx, &init, 2, 35.0, &spec.sequence, |_| {});
    assert!(local.tr == tr, "shard outputs differ from the local run");
}

#[test]
fn a_rerun_shard_gives_identical_bytes() {
    let spec = spec(6, 3);
    let mut a = ShardSampler::new(Device::Cpu, 3, u64::MAX);
    let mut b = ShardSampler::new(Device::Cpu, 3, u64::MAX);
    let x = a
        .sample(&spec, &spec.shard(1), &data(""), &data("features.npz"))
        .unwrap();
    let y = b
        .sample(&spec, &spec.shard(1), &data(""), &data("features.npz"))
        .unwrap();
    assert_eq!(x.sample_index, vec![3, 4, 5]);
    assert!(x.npz_bytes().unwrap() == y.npz_bytes().unwrap());
}

#[test]
fn a_sequence_of_the_wrong_length_fails_the_shard_with_its_index() {
    let mut spec = spec(2, 2);
    spec.sequence = "ACD".into();
    let mut s = ShardSampler::new(Device::Cpu, 2, u64::MAX);
    let err = s
        .sample(&spec, &spec.shard(0), &data(""), &data("features.npz"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shard 0 of job") && err.contains("sequence has 3 residues"),
        "{err}"
    );
}
