//! Partial diffusion (`digctl sample --from-structure --from-time`) on the
//! AdK-fragment model: t = 1 is ordinary sampling bit for bit, a small t
//! stays near the input, every sample is a pure function of (seed, index)
//! whatever the batch, and bad inputs are named.

use std::path::Path;
use std::process::Command;

use dig_model::structure::Ensemble;
use dig_tests::digctl_path;
use dig_tests::fragment::{data, SEQUENCE};

fn sample(out: &Path, extra: &[&str]) -> (bool, String) {
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
            "6",
            "--seed",
            "3",
            "--steps",
            "20",
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
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn read(out: &Path) -> Ensemble {
    Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap()
}

#[test]
fn from_time_one_is_ordinary_sampling_and_a_small_time_stays_near_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let closed = data("closed.pdb");
    let closed = closed.to_str().unwrap();
    let plain = dir.path().join("plain");
    assert!(sample(&plain, &[]).0);
    let t1 = dir.path().join("t1");
    let (ok, err) = sample(&t1, &["--from-structure", closed, "--from-time", "1"]);
    assert!(ok, "{err}");
    let (a, b) = (read(&plain), read(&t1));
    assert_eq!(a.sample_index, b.sample_index);
    assert!(a
        .tr
        .iter()
        .zip(&b.tr)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a
        .rot_mat
        .iter()
        .zip(&b.rot_mat)
        .all(|(x, y)| x.to_bits() == y.to_bits()));

    // t = 0.3 of 20 steps: steps 14..19 run from the noised input.
    let small = dir.path().join("small");
    let (ok, err) = sample(
        &small,
        &[
            "--from-structure",
            closed,
            "--from-time",
            "0.3",
            "--batch-size",
            "1",
        ],
    );
    assert!(ok, "{err}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(small.join("run.json")).unwrap()).unwrap();
    let fs = &run["from_structure"];
    assert_eq!(fs["start_step"], 14, "{run}");
    assert_eq!(fs["structures"], 1);
    assert!((fs["start_time"].as_f64().unwrap() - 0.3).abs() < 1e-9);
    assert!((fs["sigma_tr"].as_f64().unwrap() - 0.1f64.powf(0.7) * 35f64.powf(0.3)).abs() < 1e-9);
    let e = read(&small);
    let reference = dig_model::backbone::read_pdb(&data("closed.pdb")).unwrap();
    for i in 0..e.num_samples() {
        let rmsd = dig_model::evaluate::ca_rmsd(&e.backbone(i), &reference.frames[0]);
        assert!(rmsd < 1.0, "sample {i} moved {rmsd} Å from the input");
    }
    // Batch 4: the same samples.
    let batched = dir.path().join("batched");
    assert!(
        sample(
            &batched,
            &[
                "--from-structure",
                closed,
                "--from-time",
                "0.3",
                "--batch-size",
                "4"
            ]
        )
        .0
    );
    let f = read(&batched);
    let worst =
        e.tr.iter()
            .zip(&f.tr)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
    assert!(worst < 1e-3, "batch changes a sample by {worst} Å");
}

#[test]
fn bad_partial_diffusion_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let closed = data("closed.pdb");
    let closed = closed.to_str().unwrap();
    let out = dir.path().join("out");
    for (t, msg) in [
        ("0", "--from-time must be in (0, 1], got 0"),
        ("1.5", "--from-time must be in (0, 1], got 1.5"),
    ] {
        let (ok, err) = sample(&out, &["--from-structure", closed, "--from-time", t]);
        assert!(!ok);
        assert!(err.contains(msg), "{err}");
    }
    let full = dig_tests::repo_root().join("examples/adk/closed.pdb");
    let (ok, err) = sample(
        &out,
        &[
            "--from-structure",
            full.to_str().unwrap(),
            "--from-time",
            "0.5",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("214 residues per structure, but the protein (its features) has 24"),
        "{err}"
    );
    let notes = dir.path().join("notes.pdb");
    std::fs::write(&notes, "not a structure\n").unwrap();
    let (ok, err) = sample(
        &out,
        &[
            "--from-structure",
            notes.to_str().unwrap(),
            "--from-time",
            "0.5",
        ],
    );
    assert!(!ok);
    assert!(err.contains("notes.pdb: no ATOM records"), "{err}");
    let (ok, err) = sample(&out, &["--from-structure", closed]);
    assert!(!ok);
    assert!(err.contains("--from-time"), "{err}");
    assert!(
        !out.join("run.json").exists(),
        "nothing written for a refused run"
    );
}
