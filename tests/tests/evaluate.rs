//! `digctl evaluate` on the adenylate kinase crystal structures
//! (examples/adk: closed 1AKE, open 4AKE, 214 residues), turned into
//! samples: their CA atoms survive the trip through frames exactly, so each
//! is a valid sample at CA-RMSD 0 from itself.

use std::path::{Path, PathBuf};

use dig_model::backbone::read_pdb;
use dig_model::structure::Ensemble;
use dig_model::training::frames;
use dig_tests::{digctl, digctl_err, repo_root};
use serde_json::Value;

type Atoms = Vec<[[f64; 3]; 3]>;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn adk(name: &str) -> PathBuf {
    repo_root().join("examples/adk").join(name)
}

/// `[N, CA, C]` per residue of a PDB's first model.
fn atoms(pdb: &Path) -> Atoms {
    read_pdb(pdb).unwrap().frames[0]
        .iter()
        .map(|r| r.map(|a| a.map(f64::from)))
        .collect()
}

/// Writes the structures as one npz, sample `k` with index `indices[k]`.
fn write_samples(path: &Path, structures: &[Atoms], indices: &[i64]) {
    let l = structures[0].len();
    let mut e = Ensemble {
        sequence: "X".repeat(l),
        sample_index: indices.to_vec(),
        tr: Vec::new(),
        rot_mat: Vec::new(),
        steer: None,
        log_density: None,
    };
    for a in structures {
        let (tr, rot) = frames(a).unwrap();
        e.tr.extend(tr);
        e.rot_mat.extend(rot);
    }
    e.write_npz(path).unwrap();
}

/// Runs `digctl evaluate`, expects success; returns the JSON on stdout and stderr.
fn evaluate(args: &[&str]) -> (Value, String) {
    let mut full = vec!["evaluate"];
    full.extend_from_slice(args);
    let out = digctl(&full);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "digctl {full:?} failed:\n{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (json, stderr)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// Checks the closed/open pair (samples 0 and 1) scored against both.
fn check_closed_open(v: &Value) {
    assert_eq!(v["num_samples"], 2);
    assert_eq!(v["num_residues"], 214);
    assert_eq!(v["valid"], 2, "{v:#}");
    assert_eq!(f(&v["valid_fraction"]), 1.0);
    for c in ["ca-ca", "c-n", "clash"] {
        assert_eq!(v["failures"][c], 0, "{c}");
    }
    let per = v["per_sample"].as_array().unwrap();
    assert_eq!(per[0]["index"], 0);
    assert_eq!(per[1]["index"], 1);
    for (k, (own, other)) in [("closed", "open"), ("open", "closed")].iter().enumerate() {
        let r = &per[k];
        assert_eq!(r["valid"], true, "{r}");
        assert_eq!(r["failed"], Value::Array(vec![]));
        assert!(f(&r["ca_ca_max"]) < 4.5 && f(&r["c_n_max"]) < 2.0 && f(&r["clash_min"]) > 1.0);
        let to_self = f(&r["rmsd"][own]);
        let to_other = f(&r["rmsd"][other]);
        assert!(to_self < 1e-3, "sample {k}: {to_self} A from itself");
        // mdtraj.rmsd of the crystal structures' CA atoms: 6.909 A.
        assert!(
            (to_other - 6.909).abs() < 0.01,
            "sample {k}: {to_other} A from the other state"
        );
    }
    let refs = v["references"].as_array().unwrap();
    assert_eq!(refs[0]["name"], "closed");
    assert_eq!(refs[1]["name"], "open");
    for r in refs {
        assert!(f(&r["min"]) < 1e-3, "{r}");
        assert!((f(&r["median"]) - 3.45).abs() < 0.2, "{r}");
        assert_eq!(f(&r["fraction_within_3A"]), 0.5, "{r}");
        assert!(f(&r["p05"]) < f(&r["median"]) && f(&r["median"]) < f(&r["p95"]));
    }
}

#[test]
fn crystal_structures_are_valid_and_at_zero_rmsd_from_themselves() {
    let dir = tempfile::tempdir().unwrap();
    // A `digctl sample --out` directory.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    write_samples(
        &run.join("samples.npz"),
        &[atoms(&adk("closed.pdb")), atoms(&adk("open.pdb"))],
        &[0, 1],
    );
    let (v, stderr) = evaluate(&[
        "--samples",
        s(&run),
        "--reference",
        s(&adk("closed.pdb")),
        "--reference",
        s(&adk("open.pdb")),
    ]);
    check_closed_open(&v);
    assert!(v.get("nearest_frame").is_none());
    // The default --out of a directory; the same JSON as stdout.
    assert_eq!(read_json(&run.join("evaluation.json")), v);
    assert!(stderr.contains("2 valid (100.0%)"), "{stderr}");
    assert!(stderr.contains("closed: median CA-RMSD"), "{stderr}");
    assert!(stderr.contains("50.0% (± 35.4) within 3 Å"), "{stderr}");
}

#[test]
fn fetched_shards_are_read_in_sample_order() {
    let dir = tempfile::tempdir().unwrap();
    let fetched = dir.path().join("job");
    std::fs::create_dir_all(fetched.join("shards")).unwrap();
    write_samples(
        &fetched.join("shards/000000.npz"),
        &[atoms(&adk("closed.pdb"))],
        &[0],
    );
    write_samples(
        &fetched.join("shards/000001.npz"),
        &[atoms(&adk("open.pdb"))],
        &[1],
    );
    // As `digctl fetch` writes it, shards listed last-first.
    let shard = |index: u64| {
        serde_json::json!({"index": index, "start": index, "end": index + 1,
            "key": format!("jobs/x/shards/{index:06}.npz"), "bytes": 1, "sha256": "0".repeat(64)})
    };
    let manifest = serde_json::json!({
        "job": "00000000-0000-0000-0000-000000000000",
        "num_samples": 2,
        "shards": [shard(1), shard(0)],
        "complete": true,
    });
    std::fs::write(fetched.join("manifest.json"), manifest.to_string()).unwrap();
    let out = dir.path().join("summary.json");
    let (v, _) = evaluate(&[
        "--samples",
        s(&fetched),
        "--reference",
        s(&adk("closed.pdb")),
        "--reference",
        s(&adk("open.pdb")),
        "--out",
        s(&out),
    ]);
    check_closed_open(&v);
    assert_eq!(read_json(&out), v);
    assert!(
        !fetched.join("evaluation.json").exists(),
        "--out replaces the default"
    );

    // A shard the manifest lists but the directory lacks.
    std::fs::remove_file(fetched.join("shards/000001.npz")).unwrap();
    let err = digctl_err(&[
        "evaluate",
        "--samples",
        s(&fetched),
        "--reference",
        s(&adk("closed.pdb")),
    ]);
    assert!(err.contains("000001.npz is missing"), "{err}");
}

#[test]
fn a_broken_structure_is_invalid_and_names_the_criterion() {
    let dir = tempfile::tempdir().unwrap();
    let closed = atoms(&adk("closed.pdb"));
    let mut broken = closed.clone();
    for atom in &mut broken[100] {
        atom[0] += 10.0; // residue 101 moved 10 A away from its neighbours
    }
    let npz = dir.path().join("samples.npz");
    write_samples(&npz, &[closed, broken], &[0, 1]);
    let out = dir.path().join("eval.json");
    let (v, stderr) = evaluate(&[
        "--samples",
        s(&npz),
        "--reference",
        s(&adk("closed.pdb")),
        "--out",
        s(&out),
    ]);
    assert_eq!(read_json(&out), v);
    assert!(
        !dir.path().join("evaluation.json").exists(),
        "no default file next to an .npz"
    );
    assert_eq!(v["valid"], 1);
    assert_eq!(f(&v["valid_fraction"]), 0.5);
    assert_eq!(v["failures"]["ca-ca"], 1);
    assert_eq!(v["failures"]["c-n"], 1);
    let per = v["per_sample"].as_array().unwrap();
    assert_eq!(per[0]["valid"], true);
    let bad = &per[1];
    assert_eq!(bad["valid"], false);
    let failed: Vec<&str> = bad["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        failed.contains(&"ca-ca") && failed.contains(&"c-n"),
        "{failed:?}"
    );
    assert!(f(&bad["ca_ca_max"]) > 9.0, "{bad}");
    assert!(f(&bad["rmsd"]["closed"]) > 0.3, "{bad}");
    assert!(stderr.contains("1 valid (50.0%)"), "{stderr}");
    assert!(stderr.contains("ca-ca 1"), "{stderr}");
}

#[test]
fn a_reference_of_another_length_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("samples.npz");
    write_samples(&npz, &[atoms(&adk("closed.pdb"))], &[0]);
    // The first 200 residues of the open structure.
    let text = std::fs::read_to_string(adk("open.pdb")).unwrap();
    let short: String = text
        .lines()
        .filter(|line| {
            !line.starts_with("ATOM") || line[22..26].trim().parse::<i64>().is_ok_and(|n| n <= 200)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let short_pdb = dir.path().join("short_open.pdb");
    std::fs::write(&short_pdb, short).unwrap();
    let err = digctl_err(&[
        "evaluate",
        "--samples",
        s(&npz),
        "--reference",
        s(&adk("closed.pdb")),
        "--reference",
        s(&short_pdb),
    ]);
    assert!(err.contains("short_open.pdb"), "{err}");
    assert!(err.contains("200 residues") && err.contains("214"), "{err}");
}

/// The misfolded samples of the AdK models are mostly mirror images of the
/// training frames; evaluate counts them apart from other misfolds.
#[test]
fn mirror_images_of_training_frames_are_counted_apart() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("samples.npz");
    let closed = atoms(&adk("closed.pdb"));
    // Every atom reflected through the x = 0 plane: the frames rebuilt from
    // it are proper rotations, the CA trace is the mirror image.
    let mirrored: Atoms = closed
        .iter()
        .map(|r| r.map(|[x, y, z]| [-x, y, z]))
        .collect();
    // Stretched 1.5x: far from every frame, and so is its mirror image.
    let stretched: Atoms = closed
        .iter()
        .map(|r| r.map(|a| a.map(|x| 1.5 * x)))
        .collect();
    write_samples(&npz, &[closed, mirrored, stretched], &[0, 1, 2]);
    let (v, stderr) = evaluate(&[
        "--samples",
        s(&npz),
        "--reference",
        s(&adk("closed.pdb")),
        "--frames",
        s(&adk("manifest.jsonl")),
    ]);
    let per = v["per_sample"].as_array().unwrap();
    assert!(f(&per[0]["nearest_frame_rmsd"]) < 1e-3, "{}", per[0]);
    assert!(f(&per[0]["mirror_nearest_frame_rmsd"]) > 6.0, "{}", per[0]);
    assert!(f(&per[1]["nearest_frame_rmsd"]) > 6.0, "{}", per[1]);
    assert!(f(&per[1]["mirror_nearest_frame_rmsd"]) < 1e-3, "{}", per[1]);
    assert!(f(&per[2]["nearest_frame_rmsd"]) > 6.0, "{}", per[2]);
    assert!(f(&per[2]["mirror_nearest_frame_rmsd"]) > 6.0, "{}", per[2]);
    let nf = &v["nearest_frame"];
    assert!(
        (f(&nf["fraction_farther_than_6A"]) - 2.0 / 3.0).abs() < 1e-12,
        "{nf}"
    );
    assert!(
        (f(&nf["fraction_mirror_images"]) - 1.0 / 3.0).abs() < 1e-12,
        "{nf}"
    );
    assert!(
        stderr.contains("66.7% farther than 6 Å (33.3% mirror images"),
        "{stderr}"
    );
}

#[test]
fn plot_is_a_png_with_training_frames_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("samples.npz");
    let closed = atoms(&adk("closed.pdb"));
    let mut broken = closed.clone();
    broken[50][1][1] += 3.0;
    write_samples(&npz, &[closed, atoms(&adk("open.pdb")), broken], &[0, 1, 2]);
    let png = dir.path().join("rmsd.png");
    let (v, stderr) = evaluate(&[
        "--samples",
        s(&npz),
        "--reference",
        s(&adk("closed.pdb")),
        "--reference",
        s(&adk("open.pdb")),
        "--frames",
        s(&adk("manifest.jsonl")),
        "--plot",
        s(&png),
    ]);
    // dims.pdb (98 frames), closed.pdb and open.pdb.
    let nf = &v["nearest_frame"];
    assert_eq!(nf["frames"], 100, "{nf}");
    let per = v["per_sample"].as_array().unwrap();
    for r in &per[..2] {
        // The crystal structures are training frames themselves.
        assert!(f(&r["nearest_frame_rmsd"]) < 1e-3, "{r}");
    }
    assert!(f(&per[2]["nearest_frame_rmsd"]) > 1e-3);
    assert!(
        stderr.contains("nearest of 100 training frames"),
        "{stderr}"
    );

    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (800, 800));
    assert!(
        (5_000..2_000_000).contains(&bytes.len()),
        "{} bytes",
        bytes.len()
    );

    // x and y need two references.
    let err = digctl_err(&[
        "evaluate",
        "--samples",
        s(&npz),
        "--reference",
        s(&adk("closed.pdb")),
        "--plot",
        s(&png),
    ]);
    assert!(err.contains("--plot needs two --reference"), "{err}");
}
