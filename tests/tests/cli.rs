//! `digctl sample` and `digctl convert-checkpoint` as users run them, on the
//! published code's fixtures.

use std::collections::BTreeMap;
use std::path::Path;

use dig_model::{DigModel, ModelConfig};
use dig_tests::{digctl_ok, fixture, python};
use tch::{Device, Tensor};

fn npz(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_npz(path).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_checkpoint_gives_a_model_whose_forward_matches_published() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let text = digctl_ok(&["convert-checkpoint", s(&fixture("checkpoint.pth")), s(&out)]);
    assert!(text.contains("d_model 64, 2 layers, 4 heads"), "{text}");
    let cfg = ModelConfig::load(&out.join("config.json")).unwrap();
    assert_eq!(cfg, ModelConfig::load(&fixture("config.json")).unwrap());
    let model = DigModel::load_dir(&out, Device::Cpu).unwrap();
    let f = npz(&fixture("features.npz"));
    let fw = npz(&fixture("forward.npz"));
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let (t, r) = model.net.forward_step(
        &ctx,
        &fw["tr"],
        &fw["rot_mat"],
        Some(&fw["mask"]),
        &fw["step"],
    );
    assert!(max_abs_diff(&t, &fw["tr_eps"]) < 1e-4);
    assert!(max_abs_diff(&r, &fw["rot_eps"]) < 1e-4);
}

#[test]
fn sample_from_published_init_state_reproduces_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let model_dir = fixture("");
    let text = digctl_ok(&[
        "sample",
        "--model",
        s(&model_dir),
        "--features",
        s(&fixture("features.npz")),
        "--init-state",
        s(&fixture("init_state.npz")),
        "--sequence",
        "MKTAYIAKQRQISFVKSHFSRQLE",
        "--out",
        s(&out),
    ]);
    assert!(text.contains("1 structures"), "{text}");
    let got = npz(&out.join("samples.npz"));
    let fin = npz(&fixture("final_state.npz"));
    assert_eq!(got["tr"].size(), [1, 24, 3]);
    assert_eq!(Vec::<i64>::try_from(&got["sample_index"]).unwrap(), vec![0]);
    let dt = max_abs_diff(&got["tr"].get(0), &fin["tr"]);
    let dr = max_abs_diff(&got["rot_mat"].get(0), &fin["rot_mat"]);
    assert!(dt < 1e-3, "translations differ by {dt} A");
    assert!(dr < 1e-4, "rotations differ by {dr}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["steps"], 500);
    assert_eq!(run["num_samples"], 1);
}

#[test]
fn seeded_runs_are_reproducible_and_pdb_matches_npz_in_mdtraj() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str, batch: &str| {
        let out = dir.path().join(name);
        digctl_ok(&[
            "sample",
            "--model",
            s(&fixture("")),
            "--features",
            s(&fixture("features.npz")),
            "--num-samples",
            "5",
            "--batch-size",
            batch,
            "--seed",
            seed,
            "--steps",
            "50",
            "--out",
            s(&out),
        ]);
        out
    };
    let a = run("a", "7", "2");
    let b = run("b", "7", "2");
    let c = run("c", "8", "2");
    let d = run("d", "7", "5");
    let bytes = |p: &Path| std::fs::read(p.join("samples.npz")).unwrap();
    assert!(
        bytes(&a) == bytes(&b),
        "same seed, same batch: bit-identical output files"
    );
    assert!(bytes(&a) != bytes(&c), "another seed gives other samples");
    let (ta, td) = (npz(&a.join("samples.npz")), npz(&d.join("samples.npz")));
    assert!(
        max_abs_diff(&ta["tr"], &td["tr"]) < 1e-4,
        "batch size must not change samples"
    );
    assert_eq!(
        Vec::<i64>::try_from(&ta["sample_index"]).unwrap(),
        vec![0, 1, 2, 3, 4]
    );

    // MDTraj reads the PDB; its CA-CA distances equal those of the sampler's frames.
    let out = python(
        r#"
import sys, numpy as np, mdtraj as md
t = md.load_pdb(sys.argv[1]); z = np.load(sys.argv[2])
ca = t.topology.select("name CA")
pdb = np.linalg.norm(np.diff(t.xyz[:, ca] * 10.0, axis=1), axis=-1)
ref = np.linalg.norm(np.diff(z["tr"].astype(np.float64), axis=1), axis=-1)
print(t.n_frames, t.n_atoms, float(np.abs(pdb - ref).max()))
"#,
        &[&a.join("samples.pdb"), &a.join("samples.npz")],
    );
    let v: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(v[0], "5", "frames");
    assert_eq!(v[1], "96", "atoms = 4 per residue (N, CA, C, O)");
    let err: f64 = v[2].parse().unwrap();
    assert!(
        err < 2e-3,
        "CA-CA distances in the PDB differ from the sampler's by {err} A"
    );
}

/// `bench-fidelity --flow-above`: every setting follows the flow above T, the
/// reference too. Its 500-step Euler row equals a `digctl sample --flow-above`
/// run from the same seed bit for bit (median 0), and a reference sampled
/// with another switch is refused by name.
#[test]
fn bench_fidelity_with_flow_above_matches_digctl_sample() {
    let dir = tempfile::tempdir().unwrap();
    let sample = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let (model, features) = (fixture(""), fixture("features.npz"));
        let mut args = vec![
            "sample",
            "--model",
            s(&model),
            "--features",
            s(&features),
            "--num-samples",
            "3",
            "--batch-size",
            "3",
            "--seed",
            "0",
            "--threads",
            "1",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        digctl_ok(&args);
        out
    };
    let flow = sample("flow", &["--flow-above", "0.5"]);
    let plain = sample("plain", &[]);
    let fidelity = |reference: &Path, extra: &[&str]| {
        let json = dir.path().join("fidelity.json");
        let (model, features) = (fixture(""), fixture("features.npz"));
        let (pdb, npz) = (flow.join("samples.pdb"), reference.join("samples.npz"));
        let mut args = vec![
            "bench-fidelity",
            "--model",
            s(&model),
            "--features",
            s(&features),
            "--reference",
            s(&pdb),
            "--samples",
            "3",
            "--batch-size",
            "3",
            "--threads",
            "1",
            "--solvers",
            "euler",
            "--steps",
            "500",
            "--reference-samples",
            s(&npz),
            "--json",
            s(&json),
        ];
        args.extend_from_slice(extra);
        let out = dig_tests::digctl(&args);
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), text, json)
    };
    let (ok, err, json) = fidelity(&flow, &["--flow-above", "0.5"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["flow_above"], 0.5, "{v}");
    let row = &v["rows"][1];
    assert_eq!(
        (row["solver"].as_str(), row["steps"].as_i64()),
        (Some("euler"), Some(500))
    );
    assert_eq!(
        row["median_rmsd"], 0.0,
        "the flow-above Euler run is digctl sample's: {v}"
    );
    assert_eq!(row["p95_rmsd"], 0.0, "{v}");
    // The same reference against the plain sampler: refused, naming both.
    let (ok, err, _) = fidelity(&flow, &[]);
    assert!(!ok);
    assert!(
        err.contains(
            "was sampled with flow_above 0.5 (its run.json), this run with --flow-above none"
        ),
        "{err}"
    );
    let (ok, err, _) = fidelity(&plain, &["--flow-above", "0.5"]);
    assert!(!ok);
    assert!(
        err.contains("flow_above none (its run.json), this run with --flow-above 0.5"),
        "{err}"
    );
    // The plain reference with the plain sampler: its Euler row is it too,
    // and the flow run lies elsewhere.
    let (ok, err, json) = fidelity(&plain, &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["rows"][1]["median_rmsd"], 0.0, "{v}");
    assert_eq!(v["flow_above"], serde_json::Value::Null);
    let moved = max_abs_diff(
        &npz(&flow.join("samples.npz"))["tr"],
        &npz(&plain.join("samples.npz"))["tr"],
    );
    assert!(moved > 0.1, "the flow above 0.5 moved nothing: {moved}");
}
