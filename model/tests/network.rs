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
