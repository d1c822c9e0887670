//! Bad input to `digctl sample`: each case fails with a message naming the
//! problem, and leaves no output that looks finished.

use std::path::{Path, PathBuf};

use dig_tests::{digctl_err, fixture};
use tch::{Device, Kind, Tensor};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn out(&self) -> PathBuf {
        self.path("out")
    }
    /// Writes single/pair .npy files of the given shapes.
    fn npy(&self, single: &[i64], pair: &[i64]) -> (String, String) {
        let (s, p) = (self.path("single.npy"), self.path("pair.npy"));
        Tensor::randn(single, (Kind::Float, Device::Cpu))
            .write_npy(&s)
            .unwrap();
        Tensor::randn(pair, (Kind::Float, Device::Cpu))
            .write_npy(&p)
            .unwrap();
        (s.to_str().unwrap().into(), p.to_str().unwrap().into())
    }
    /// Runs `digctl sample` with the fixture model and `extra` args; returns stderr.
    fn sample(&self, extra: &[&str]) -> String {
        let model = fixture("");
        let out = self.out();
        let mut args = vec![
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = digctl_err(&args);
        assert_no_finished_output(&out);
        err
    }
}

fn assert_no_finished_output(out: &Path) {
    for f in ["samples.npz", "samples.pdb", "run.json"] {
        assert!(!out.join(f).exists(), "{f} was written despite the error");
    }
}

fn features() -> String {
    fixture("features.npz").to_str().unwrap().to_string()
}

#[test]
fn length_of_single_differing_from_pair_is_rejected() {
    let c = Case::new();
    let (s, p) = c.npy(&[24, 384], &[23, 23, 128]);
    let err = c.sample(&["--single", &s, "--pair", &p, "--num-samples", "1"]);
    assert!(
        err.contains("length mismatch: single has L = 24 but pair is 23 x 23"),
        "{err}"
    );
}

#[test]
fn sequence_length_differing_from_features_is_rejected() {
    let c = Case::new();
    let err = c.sample(&[
        "--features",
        &features(),
        "--num-samples",
        "1",
        "--sequence",
        "ACDEFGHIK",
    ]);
    assert!(
        err.contains("sequence has 9 residues but the features have L = 24"),
        "{err}"
    );
}

#[test]
fn feature_widths_other_than_384_and_128_are_rejected() {
    let c = Case::new();
    let (s, p) = c.npy(&[24, 256], &[24, 24, 128]);
    let err = c.sample(&["--single", &s, "--pair", &p, "--num-samples", "1"]);
    assert!(
        err.contains("single representation has shape [24, 256]; expected (L, 384)"),
        "{err}"
    );
    let (s, p) = c.npy(&[24, 384], &[24, 24, 64]);
    let err = c.sample(&["--single", &s, "--pair", &p, "--num-samples", "1"]);
    assert!(
        err.contains("pair representation has shape [24, 24, 64]; expected (L, L, 128)"),
        "{err}"
    );
}

#[test]
fn nan_or_inf_in_features_is_rejected() {
    let c = Case::new();
    let (s, p) = c.npy(&[24, 384], &[24, 24, 128]);
    let pair = Tensor::randn([24, 24, 128], (Kind::Float, Device::Cpu));
    let _ = pair.get(3).get(5).get(7).fill_(f64::NAN);
    let _ = pair.get(4).get(5).get(7).fill_(f64::INFINITY);
    pair.write_npy(&p).unwrap();
    let err = c.sample(&["--single", &s, "--pair", &p, "--num-samples", "1"]);
    assert!(
        err.contains("pair representation contains 2 NaN or infinite values"),
        "{err}"
    );
}

#[test]
fn letters_outside_the_amino_acid_alphabet_are_rejected() {
    let c = Case::new();
    let err = c.sample(&[
        "--features",
        &features(),
        "--num-samples",
        "1",
        "--sequence",
        "MKTAYIAKQRQISFVKSHFSRQLB",
    ]);
    assert!(
        err.contains("sequence has 'B' at position 24 which is not an amino-acid code"),
        "{err}"
    );
}

#[test]
fn zero_samples_is_rejected() {
    let c = Case::new();
    let err = c.sample(&["--features", &features(), "--num-samples", "0"]);
    assert!(err.contains("--num-samples must be at least 1"), "{err}");
}

#[test]
fn unreadable_model_directory_is_rejected() {
    let c = Case::new();
    let out = c.out();
    let missing = c.path("no-such-model");
    let err = digctl_err(&[
        "sample",
        "--model",
        missing.to_str().unwrap(),
        "--features",
        &features(),
        "--num-samples",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("cannot load model directory") && err.contains("no-such-model"),
        "{err}"
    );
    assert_no_finished_output(&out);
    // A directory whose weights are not safetensors.
    let bad = c.path("bad-model");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(fixture("config.json"), bad.join("config.json")).unwrap();
    std::fs::write(bad.join("model.safetensors"), b"not weights").unwrap();
    let err = digctl_err(&[
        "sample",
        "--model",
        bad.to_str().unwrap(),
        "--features",
        &features(),
        "--num-samples",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("model.safetensors") && err.contains("not a readable safetensors file"),
        "{err}"
    );
    assert_no_finished_output(&out);
}

#[test]
fn init_state_of_the_wrong_length_is_rejected() {
    let c = Case::new();
    let init = c.path("init.npz");
    let tr = Tensor::zeros([20, 3], (Kind::Float, Device::Cpu));
    let rot = Tensor::eye(3, (Kind::Float, Device::Cpu))
        .expand([20, 3, 3], false)
        .contiguous();
    Tensor::write_npz(&[("tr", &tr), ("rot_mat", &rot)], &init).unwrap();
    let err = c.sample(&[
        "--features",
        &features(),
        "--init-state",
        init.to_str().unwrap(),
    ]);
    assert!(
        err.contains("has 20 residues but the features have L = 24"),
        "{err}"
    );
}

#[test]
fn cuda_request_without_cuda_fails_clearly() {
    if tch::Cuda::is_available() {
        return; // a GPU machine: the request is valid there
    }
    let c = Case::new();
    let err = c.sample(&[
        "--features",
        &features(),
        "--num-samples",
        "1",
        "--device",
        "cuda:0",
    ]);
    assert!(
        err.contains("--device cuda:0 requested but no CUDA device is available"),
        "{err}"
    );
}
