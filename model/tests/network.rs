//! The score network against the published code's outputs (`forward.npz`)
//! and the published architecture's state-dict names.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dig_model::{DigModel, ModelConfig};
use tch::{Device, Kind, Tensor};

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
fn forward_step_matches_published_forward_npz() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let fw = npz("forward.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    assert_eq!(ctx.cached_layers(), 2);
    let (t, r) = model.net.forward_step(
        &ctx,
        &fw["tr"],
        &fw["rot_mat"],
        Some(&fw["mask"]),
        &fw["step"],
    );
    let dt = max_abs_diff(&t, &fw["tr_eps"]);
    let dr = max_abs_diff(&r, &fw["rot_eps"]);
    println!("max |dT| = {dt:e}, max |dR| = {dr:e}");
    assert!(dt < 1e-4, "translation score differs by {dt}");
    assert!(dr < 1e-4, "rotation score differs by {dr}");
}

#[test]
fn memory_light_order_equals_cached_pair_values() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let fw = npz("forward.npz");
    let cached = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let light = model.net.prepare(&f["single"], &f["pair"], 0);
    assert_eq!(light.cached_layers(), 0);
    let (t1, r1) = model.net.forward_step(
        &cached,
        &fw["tr"],
        &fw["rot_mat"],
        Some(&fw["mask"]),
        &fw["step"],
    );
    let (t2, r2) = model.net.forward_step(
        &light,
        &fw["tr"],
        &fw["rot_mat"],
        Some(&fw["mask"]),
        &fw["step"],
    );
    assert!(max_abs_diff(&t1, &t2) < 1e-5);
    assert!(max_abs_diff(&r1, &r2) < 1e-5);
    // and the light order also matches the published outputs
    assert!(max_abs_diff(&t2, &fw["tr_eps"]) < 1e-4);
}

#[test]
fn published_defaults_have_exactly_the_published_state_dict() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/dig-reference-keys.json"),
    )
    .unwrap();
    let reference: BTreeMap<String, Vec<i64>> = serde_json::from_str(&text).unwrap();
    let model = DigModel::random(&ModelConfig::default(), 0, Device::Cpu);
    let ours: BTreeMap<String, Vec<i64>> = model.state_dict_shapes().into_iter().collect();
    let missing: Vec<_> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !reference.contains_key(*k))
        .collect();
    assert!(missing.is_empty(), "missing keys: {missing:?}");
    assert!(extra.is_empty(), "extra keys: {extra:?}");
    for (k, shape) in &reference {
        assert_eq!(&ours[k], shape, "shape of {k}");
    }
    assert_eq!(reference.len(), 248);
    let params = model.num_parameters();
    assert!(
        (81_000_000..83_000_000).contains(&params),
        "{params} parameters"
    );
}

#[test]
fn mis_shaped_weight_is_an_error_naming_key_and_both_shapes() {
    let cfg = ModelConfig::load(&data("config.json")).unwrap();
    let mut named = Tensor::read_safetensors(data("model.safetensors")).unwrap();
    for (k, t) in named.iter_mut() {
        if k == "x2d_proj.1.weight" {
            *t = Tensor::zeros([31, 128], (Kind::Float, Device::Cpu));
        }
    }
    let err = DigModel::from_tensors(&cfg, named, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("x2d_proj.1.weight") && err.contains("[31, 128]") && err.contains("[32, 128]"),
        "{err}"
    );
}

#[test]
fn missing_and_extra_keys_are_errors_naming_the_key() {
    let cfg = ModelConfig::load(&data("config.json")).unwrap();
    let named: Vec<_> = Tensor::read_safetensors(data("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k != "st_module.encoder.layers.1.attn.pair_bias.weight")
        .collect();
    let err = DigModel::from_tensors(&cfg, named, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("st_module.encoder.layers.1.attn.pair_bias.weight") && err.contains("missing"),
        "{err}"
    );

    let mut named = Tensor::read_safetensors(data("model.safetensors")).unwrap();
    named.push((
        "st_module.encoder.layers.2.norm1.weight".into(),
        Tensor::zeros([64], (Kind::Float, Device::Cpu)),
    ));
    let err = DigModel::from_tensors(&cfg, named, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unexpected key st_module.encoder.layers.2.norm1.weight"),
        "{err}"
    );
}

/// Rotation by `angle` about the unit axis `u`, row-major, as a tensor.
fn rotation(u: [f64; 3], angle: f64) -> Tensor {
    let n = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let u = u.map(|x| x / n);
    let (s, c) = angle.sin_cos();
    let r = [
        c + u[0] * u[0] * (1.0 - c),
        u[0] * u[1] * (1.0 - c) - u[2] * s,
        u[0] * u[2] * (1.0 - c) + u[1] * s,
        u[1] * u[0] * (1.0 - c) + u[2] * s,
        c + u[1] * u[1] * (1.0 - c),
        u[1] * u[2] * (1.0 - c) - u[0] * s,
        u[2] * u[0] * (1.0 - c) - u[1] * s,
        u[2] * u[1] * (1.0 - c) + u[0] * s,
        c + u[2] * u[2] * (1.0 - c),
    ];
    Tensor::from_slice(&r.map(|x| x as f32)).view([3, 3])
}

#[test]
fn chiral_features_added_at_zero_leave_the_function_unchanged() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let chiral = model.with_chiral_features().unwrap();
    let cfg = chiral.net.config();
    assert!(cfg.chiral_features);
    // 4 heads: 4 triples. The old keys, and one new matrix per layer.
    let old: BTreeMap<String, Vec<i64>> = model.state_dict_shapes().into_iter().collect();
    let new: BTreeMap<String, Vec<i64>> = chiral.state_dict_shapes().into_iter().collect();
    let added: Vec<_> = new.iter().filter(|(k, _)| !old.contains_key(*k)).collect();
    let expected: Vec<(String, Vec<i64>)> = (0..cfg.n_layer)
        .map(|i| {
            let h = cfg.n_heads;
            (
                format!("st_module.encoder.layers.{i}.attn.chiral_out.weight"),
                vec![cfg.d_model, h * (h - 1) * (h - 2) / 6],
            )
        })
        .collect();
    assert_eq!(
        added
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>(),
        expected
    );
    assert!(old.iter().all(|(k, v)| new.get(k) == Some(v)));

    let f = npz("features.npz");
    let fw = npz("forward.npz");
    let run = |m: &DigModel| {
        let ctx = m.net.prepare(&f["single"], &f["pair"], u64::MAX);
        m.net.forward_step(
            &ctx,
            &fw["tr"],
            &fw["rot_mat"],
            Some(&fw["mask"]),
            &fw["step"],
        )
    };
    let ((t0, r0), (t1, r1)) = (run(&model), run(&chiral));
    assert!(
        t0.equal(&t1) && r0.equal(&r1),
        "zero chiral_out must add exactly 0"
    );
    assert!(
        chiral.with_chiral_features().is_err(),
        "adding them twice is an error"
    );
}

#[test]
fn chiral_features_keep_the_network_equivariant_under_rotations() {
    let model = DigModel::load_dir(&data(""), Device::Cpu)
        .unwrap()
        .with_chiral_features()
        .unwrap();
    // Non-zero chiral weights, so that the new path carries signal.
    tch::manual_seed(3);
    let named: Vec<(String, Tensor)> = model
        .state_dict()
        .into_iter()
        .map(|(k, t)| {
            if k.ends_with("chiral_out.weight") {
                let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.5;
                (k, r)
            } else {
                (k, t)
            }
        })
        .collect();
    let cfg = model.net.config().clone();
    let model = DigModel::from_tensors(&cfg, named, Device::Cpu).unwrap();
    let f = npz("features.npz");
    let fw = npz("forward.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let (tr, rot) = (fw["tr"].shallow_clone(), fw["rot_mat"].shallow_clone());
    let (t0, r0) = model
        .net
        .forward_step(&ctx, &tr, &rot, Some(&fw["mask"]), &fw["step"]);

    // The whole pose turned by Q: global points Q (R^T p + T), so T -> Q T, R -> R Q^T.
    let q = rotation([0.3, -0.5, 0.8], 2.1);
    let (t1, r1) = model.net.forward_step(
        &ctx,
        &tr.matmul(&q.tr()),
        &rot.matmul(&q.tr()),
        Some(&fw["mask"]),
        &fw["step"],
    );
    let (dt, dr) = (
        max_abs_diff(&t1, &t0.matmul(&q.tr())),
        max_abs_diff(&r1, &r0),
    );
    assert!(
        dt < 1e-4 && dr < 1e-4,
        "translation score {dt}, rotation score {dr}"
    );

    // The new path matters: the same pose without it scores differently.
    let plain = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let ctx = plain.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let (tp, _) = plain
        .net
        .forward_step(&ctx, &tr, &rot, Some(&fw["mask"]), &fw["step"]);
    assert!(max_abs_diff(&tp, &t0) > 1e-3);
}

#[test]
fn with_config_copies_weights_and_refuses_another_shape() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let mut cfg = model.net.config().clone();
    cfg.tr_sigma_max = 200.0;
    let wide = model.with_config(&cfg).unwrap();
    assert_eq!(wide.net.config().tr_sigma_max, 200.0);
    let (a, b) = (model.state_dict(), wide.state_dict());
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs");
    }
    cfg.d_pair = 16;
    let err = model.with_config(&cfg).err().unwrap().to_string();
    assert!(
        err.contains("rp_proj.relative_attention_bias.weight")
            && err.contains("[64, 32]")
            && err.contains("[64, 16]"),
        "{err}"
    );
}

#[test]
fn orientation_features_start_at_zero_and_keep_the_network_equivariant() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let mut cfg = model.net.config().clone();
    cfg.orientation_features = true;
    let oriented = model.with_config(&cfg).unwrap();
    let old: BTreeMap<String, Vec<i64>> = model.state_dict_shapes().into_iter().collect();
    let new: BTreeMap<String, Vec<i64>> = oriented.state_dict_shapes().into_iter().collect();
    let added: Vec<String> = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect();
    let n = cfg.n_heads * dig_model::config::ORIENT_POINTS * 3;
    let mut expected = Vec::new();
    for i in 0..cfg.n_layer {
        expected.push(format!(
            "st_module.encoder.layers.{i}.attn.orient_out.weight"
        ));
        expected.push(format!(
            "st_module.encoder.layers.{i}.attn.orient_value.weight"
        ));
    }
    assert_eq!(added, expected);
    assert_eq!(new[&expected[0]], vec![cfg.d_model, n]);
    assert_eq!(new[&expected[1]], vec![n, cfg.d_model]);

    let f = npz("features.npz");
    let fw = npz("forward.npz");
    let (tr, rot) = (fw["tr"].shallow_clone(), fw["rot_mat"].shallow_clone());
    let run = |m: &DigModel, tr: &Tensor, rot: &Tensor| {
        let ctx = m.net.prepare(&f["single"], &f["pair"], u64::MAX);
        m.net
            .forward_step(&ctx, tr, rot, Some(&fw["mask"]), &fw["step"])
    };
    let ((t0, r0), (t1, r1)) = (run(&model, &tr, &rot), run(&oriented, &tr, &rot));
    assert!(
        t0.equal(&t1) && r0.equal(&r1),
        "zero orient_out must add exactly 0"
    );

    // Non-zero output weights: the new path carries signal, and turning the
    // whole pose (T -> Q T, R -> R Q^T) turns the translation score with it
    // and leaves the rotation score alone.
    tch::manual_seed(4);
    let named: Vec<(String, Tensor)> = oriented
        .state_dict()
        .into_iter()
        .map(|(k, t)| {
            if k.ends_with("orient_out.weight") {
                let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.5;
                (k, r)
            } else {
                (k, t)
            }
        })
        .collect();
    let oriented = DigModel::from_tensors(&cfg, named, Device::Cpu).unwrap();
    let (t2, r2) = run(&oriented, &tr, &rot);
    assert!(max_abs_diff(&t2, &t0) > 1e-3 && max_abs_diff(&r2, &r0) > 1e-3);
    let q = rotation([0.3, -0.5, 0.8], 2.1);
    let (t3, r3) = run(&oriented, &tr.matmul(&q.tr()), &rot.matmul(&q.tr()));
    let (dt, dr) = (
        max_abs_diff(&t3, &t2.matmul(&q.tr())),
        max_abs_diff(&r3, &r2),
    );
    assert!(
        dt < 1e-4 && dr < 1e-4,
        "translation score {dt}, rotation score {dr}"
    );
    // Moving the whole pose changes nothing either.
    let shift = Tensor::from_slice(&[40f32, -25.0, 13.0]).view([1, 1, 3]);
    let (t4, r4) = run(&oriented, &(&tr + shift), &rot);
    let (dt, dr) = (max_abs_diff(&t4, &t2), max_abs_diff(&r4, &r2));
    assert!(
        dt < 1e-3 && dr < 1e-3,
        "after a shift: translation {dt}, rotation {dr}"
    );
}
