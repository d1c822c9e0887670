//! The sampler against the published code's runs (`init_state.npz` ->
//! `trajectory.npz`, `final_state.npz`), batch invariance and seeds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dig_model::rng::initial_state;
use dig_model::so3::So3Tables;
use dig_model::{DigModel, Sampler, Schedule};
use tch::{Device, Tensor};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn npz(name: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_npz(data(name)).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn sampler_reproduces_published_trajectory_and_final_state() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let init = npz("init_state.npz");
    let traj = npz("trajectory.npz");
    let fin = npz("final_state.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(
        &model.net,
        Schedule::new(model.net.config(), &so3, None).unwrap(),
    );
    let (mut tr, mut rot) = (init["tr"].unsqueeze(0), init["rot_mat"].unsqueeze(0));
    for k in 0..3 {
        (tr, rot) = sampler.step(&ctx, &tr, &rot, &sampler.schedule().steps[k]);
        let dt = max_abs_diff(&tr.squeeze_dim(0), &traj["tr"].get(k as i64));
        let dr = max_abs_diff(&rot.squeeze_dim(0), &traj["rot_mat"].get(k as i64));
        println!("step {}: max |dT| = {dt:e} A, max |dR| = {dr:e}", k + 1);
        assert!(
            dt < 1e-4 && dr < 1e-5,
            "step {} differs: {dt} A, {dr}",
            k + 1
        );
    }
    let (tr, rot) = sampler.run(
        &ctx,
        init["tr"].unsqueeze(0),
        init["rot_mat"].unsqueeze(0),
        |_| {},
    );
    let dt = max_abs_diff(&tr.squeeze_dim(0), &fin["tr"]);
    let dr = max_abs_diff(&rot.squeeze_dim(0), &fin["rot_mat"]);
    println!("final: max |dT| = {dt:e} A, max |dR| = {dr:e}");
    assert!(dt < 1e-3, "final translations differ by {dt} A");
    assert!(dr < 1e-4, "final rotations differ by {dr}");
}

fn initial_batch(seed: u64, indices: &[u64], len: usize) -> (Tensor, Tensor) {
    let states: Vec<_> = indices
        .iter()
        .map(|&i| initial_state(seed, i, len, 35.0))
        .collect();
    let n = indices.len() as i64;
    let l = len as i64;
    let tr: Vec<f32> = states.iter().flat_map(|s| s.tr.iter().copied()).collect();
    let rot: Vec<f32> = states.iter().flat_map(|s| s.rot.iter().copied()).collect();
    (
        Tensor::from_slice(&tr).view([n, l, 3]),
        Tensor::from_slice(&rot).view([n, l, 3, 3]),
    )
}

#[test]
fn a_sample_is_the_same_alone_or_in_a_batch() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(
        &model.net,
        Schedule::new(model.net.config(), &so3, Some(100)).unwrap(),
    );
    let indices = [3u64, 4, 5, 6, 7];
    let (tr, rot) = initial_batch(11, &indices, 24);
    let (batch_tr, _) = sampler.run(&ctx, tr, rot, |_| {});
    for (pos, &i) in indices.iter().enumerate() {
        let (tr, rot) = initial_batch(11, &[i], 24);
        let (alone, _) = sampler.run(&ctx, tr, rot, |_| {});
        let d = max_abs_diff(&alone.get(0), &batch_tr.get(pos as i64));
        assert!(
            d < 1e-4,
            "sample {i} differs by {d} A between batch and alone"
        );
    }
}

#[test]
fn initial_state_is_a_pure_function_of_seed_and_index() {
    let a = initial_state(7, 42, 10, 35.0);
    assert_eq!(a, initial_state(7, 42, 10, 35.0));
    assert_ne!(a, initial_state(7, 43, 10, 35.0));
    assert_ne!(a, initial_state(8, 42, 10, 35.0));
    // A longer protein extends the same stream: the first residues' translations agree.
    let b = initial_state(7, 42, 12, 35.0);
    assert_eq!(&a.tr[..30], &b.tr[..30]);
    // Rotations are proper: R R^T = I, det = 1.
    for r in a.rot.chunks(9) {
        let m = Tensor::from_slice(r)
            .view([3, 3])
            .to_kind(tch::Kind::Double);
        let eye = Tensor::eye(3, (tch::Kind::Double, Device::Cpu));
        assert!(max_abs_diff(&m.matmul(&m.tr()), &eye) < 1e-6);
        assert!((m.det().double_value(&[]) - 1.0).abs() < 1e-6);
    }
    // Translations have the prior's spread: std over many samples near 35 A.
    let all: Vec<f32> = (0..200)
        .flat_map(|i| initial_state(1, i, 50, 35.0).tr)
        .collect();
    let std = Tensor::from_slice(&all).std(true).double_value(&[]);
    assert!((std - 35.0).abs() < 1.0, "std {std}");
    // Pinned values: the recipe is an on-disk contract.
    let pinned = initial_state(0, 0, 1, 1.0);
    assert_eq!(pinned.tr, [0.22070119, -0.025042875, 0.77918017]);
    assert_eq!(pinned.rot[..3], [-0.7925238, -0.43147942, 0.43096584]);
}

#[test]
fn fewer_steps_respace_the_schedule() {
    let cfg = dig_model::ModelConfig::default();
    let so3 = So3Tables::compute();
    let full = Schedule::new(&cfg, &so3, None).unwrap();
    assert_eq!(full.len(), 500);
    assert!(full
        .steps
        .iter()
        .enumerate()
        .all(|(k, p)| p.net_step == k as i64));
    let s = Schedule::new(&cfg, &so3, Some(100)).unwrap();
    assert_eq!(s.len(), 100);
    assert_eq!(s.steps[1].net_step, 5);
    assert_eq!(s.steps[99].net_step, 495);
    assert!((s.steps[0].dt - 0.01).abs() < 1e-15);
    let err = Schedule::new(&cfg, &so3, Some(501))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("between 1 and the model's n_time_step (500)"),
        "{err}"
    );
    assert!(Schedule::new(&cfg, &so3, Some(0)).is_err());
}
