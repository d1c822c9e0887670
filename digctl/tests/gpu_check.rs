//! `gpu-check.sh --device cpu`: the GPU machine's one command, run on the CPU
//! the way `make test` checks it (the script of `make gpu-bundle`, driving
//! this build's digctl and the published fixtures of model/tests/data).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn gpu_check(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(root().join("scripts/gpu-check.sh"))
        .args(args)
        .env("DIGCTL", env!("CARGO_BIN_EXE_digctl"))
        .output()
        .expect("run gpu-check.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_gpu_check_runs_on_the_cpu_and_prints_one_table() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("check.json");
    let (ok, out, err) = gpu_check(&["--device", "cpu", "--json", json.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // Parity against the published fixtures, as the model tests measure it.
    let p = &report["parity"];
    for (k, tol) in [
        ("forward_tr", 1e-4),
        ("forward_rot", 1e-4),
        ("final_tr", 1e-3),
        ("final_rot", 1e-4),
    ] {
        let v = p[k].as_f64().unwrap();
        assert!((0.0..tol).contains(&v), "{k} = {v}");
    }
    // Batches double from 1 to --max-batch 8 at both CPU lengths.
    let lengths = report["speed"]["lengths"].as_array().unwrap();
    let seen: Vec<(i64, Vec<i64>)> = lengths
        .iter()
        .map(|l| {
            let b = l["batches"].as_array().unwrap();
            (
                l["length"].as_i64().unwrap(),
                b.iter().map(|x| x["batch"].as_i64().unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(seen, [(24, vec![1, 2, 4, 8]), (48, vec![1, 2, 4, 8])]);
    assert_eq!(report["speed"]["architecture"], "fixture");
    // The standalone job returned every sample, bit for bit digctl sample's.
    assert_eq!(report["job"]["fetched"], 16, "{report}");
    assert_eq!(report["job"]["bit_identical"], true, "{report}");
    assert_eq!(report["failed"], 0);
    // One table: a header and one row per check, each with its verdict.
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("gpu-check on cpu (fp32)"))
        .collect();
    assert!(
        table[1].starts_with("check") && table[1].ends_with("result"),
        "{out}"
    );
    let rows = &table[3..];
    assert_eq!(rows.len(), 9, "{out}");
    assert_eq!(
        rows.iter().filter(|r| r.ends_with("  ok")).count(),
        5,
        "{out}"
    );
    assert!(
        rows[8].starts_with("job: standalone, worker on cpu"),
        "{out}"
    );
    assert!(
        rows[8].contains("16 of 16 samples") && rows[8].contains("bit-identical"),
        "{out}"
    );
}

#[test]
fn the_gpu_check_names_what_is_missing() {
    let (ok, _, err) = gpu_check(&["--device", "cuda"]);
    assert!(!ok);
    assert!(
        err.contains("--device cuda requested but no CUDA device is available"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("scripts/gpu-check.sh"))
        .args(["--device", "cpu"])
        .env("DIGCTL", env!("CARGO_BIN_EXE_digctl"))
        .env("DIG_FIXTURES", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("config.json is missing"), "{err}");
    let (ok, _, err) = gpu_check(&["--device", "cpu", "--torch-lib", "/nonexistent"]);
    assert!(!ok);
    assert!(
        err.contains("--torch-lib /nonexistent holds no libtorch_cpu.so"),
        "{err}"
    );
}
