//! XTC output end to end: `digctl sample` writes `samples.xtc` and
//! `topology.pdb` that MDTraj and MDAnalysis read as the sampled N, CA, C, O
//! (DSSP included), and a job's `results.xtc` / `topology.pdb` (and
//! `results.pdb`) through `digctl standalone` and `digctl fetch --format
//! xtc` are those files byte for byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dig_model::structure::Ensemble;
use dig_tests::cluster::{Cluster, SEQUENCE};
use dig_tests::{digctl_ok, fixture, python};
use serde_json::Value;

/// DIG_WORKER_BATCH_SIZE of every Cluster: `digctl sample` with this batch
/// size samples bit for bit what a worker does.
const BATCH: usize = 5;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `digctl sample` of the fixture model and protein into `dir/name`.
fn sample(dir: &Path, name: &str, n: u64, seed: u64, steps: u64, batch: usize) -> PathBuf {
    let out = dir.join(name);
    digctl_ok(&[
        "sample",
        "--model",
        s(&fixture("")),
        "--features",
        s(&fixture("features.npz")),
        "--sequence",
        SEQUENCE,
        "--num-samples",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
        "--steps",
        &steps.to_string(),
        "--batch-size",
        &batch.to_string(),
        "--out",
        s(&out),
    ]);
    out
}

/// MDTraj and MDAnalysis reading `argv[1]` (XTC) with topology `argv[2]`.
const READ_BOTH: &str = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, mdtraj as md, MDAnalysis as mda
t = md.load(sys.argv[1], top=sys.argv[2])
u = mda.Universe(sys.argv[2], sys.argv[1])
print(json.dumps({
    "mdtraj": {"n_frames": t.n_frames, "n_atoms": t.n_atoms,
               "xyz": (t.xyz.astype(np.float64) * 10.0).tolist(),
               "time": t.time.astype(float).tolist(),
               "names": [a.name for a in t.topology.atoms],
               "residues": "".join(r.code or "X" for r in t.topology.residues),
               "dssp": ["".join(f) for f in md.compute_dssp(t, simplified=True)]},
    "mda": {"n_frames": len(u.trajectory), "n_atoms": u.atoms.n_atoms,
            "xyz": [ts.positions.astype(float).tolist() for ts in u.trajectory],
            "names": [str(n) for n in u.atoms.names]},
}))
"#;

#[test]
fn sample_writes_an_xtc_and_topology_that_mdtraj_and_mdanalysis_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = sample(dir.path(), "run", 6, 2, 20, 3);
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "run.json",
            "samples.npz",
            "samples.pdb",
            "samples.xtc",
            "topology.pdb"
        ],
        "finished files only"
    );
    let run: Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["files"]["xtc"], "samples.xtc");
    assert_eq!(run["files"]["topology"], "topology.pdb");

    let ens = Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap();
    let expected: Vec<Vec<[f32; 3]>> = (0..6)
        .map(|i| ens.backbone_with_oxygen(i).into_iter().flatten().collect())
        .collect();
    let text = python(
        READ_BOTH,
        &[&out.join("samples.xtc"), &out.join("topology.pdb")],
    );
    let got: Value = serde_json::from_str(&text).unwrap();
    let l = SEQUENCE.len();
    for reader in ["mdtraj", "mda"] {
        let r = &got[reader];
        assert_eq!(r["n_frames"], 6, "{reader}");
        assert_eq!(r["n_atoms"], 4 * l, "{reader}");
        assert_eq!(
            r["names"],
            serde_json::json!(["N", "CA", "C", "O"].repeat(l))
        );
        let frames: Vec<Vec<[f64; 3]>> = serde_json::from_value(r["xyz"].clone()).unwrap();
        let mut worst = 0.0f64;
        for (f, e) in frames.iter().zip(&expected) {
            assert_eq!(f.len(), e.len());
            for (a, b) in f.iter().zip(e) {
                for k in 0..3 {
                    worst = worst.max((a[k] - f64::from(b[k])).abs());
                }
            }
        }
        // Coordinates on a 0.001 nm grid: at most 0.005 Å off, plus float32.
        assert!(worst <= 0.006, "{reader}: up to {worst} Å from the npz");
    }
    assert_eq!(got["mdtraj"]["residues"], SEQUENCE);
    assert_eq!(
        got["mdtraj"]["time"],
        serde_json::json!([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    );
    let dssp: Vec<String> = serde_json::from_value(got["mdtraj"]["dssp"].clone()).unwrap();
    assert_eq!(dssp.len(), 6);
    for frame in &dssp {
        assert_eq!(frame.len(), l, "one DSSP letter per residue: {frame}");
        assert!(frame.chars().all(|c| "HEC".contains(c)), "{frame}");
    }

    // The PDB has the same four atoms per residue, and MDTraj's DSSP runs on it.
    let text = python(
        r#"
import json, sys, mdtraj as md
t = md.load(sys.argv[1])
print(json.dumps({"n_atoms": t.n_atoms, "dssp": ["".join(f) for f in md.compute_dssp(t, simplified=True)]}))
"#,
        &[&out.join("samples.pdb")],
    );
    let pdb: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pdb["n_atoms"], 4 * l);
    let dssp: Vec<String> = serde_json::from_value(pdb["dssp"].clone()).unwrap();
    assert!(
        dssp.len() == 6 && dssp.iter().all(|f| f.len() == l),
        "{dssp:?}"
    );
}

#[test]
fn a_jobs_results_xtc_and_pdb_are_what_digctl_sample_writes_standalone() {
    let (c, mut svc) = Cluster::standalone("xtc");
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        10,
        &["--seed", "3", "--steps", "20", "--shard-size", "5"],
    );
    let v = c.wait_final(&c.key_a, &job, Duration::from_secs(600), &mut [&mut svc]);
    assert_eq!(v["state"], "succeeded", "{v}\n{}", svc.log());

    let out = c.dir.path().join("fetch-xtc");
    let printed = c.client_ok(
        &c.key_a,
        &["fetch", &job, "--out", s(&out), "--format", "xtc"],
    );
    let (xtc, topology) = (
        out.join(format!("{job}.xtc")),
        out.join(format!("{job}-topology.pdb")),
    );
    assert!(
        printed.contains(s(&xtc)) && printed.contains(s(&topology)),
        "{printed}"
    );
    c.client_ok(
        &c.key_a,
        &["fetch", &job, "--out", s(&out), "--format", "pdb"],
    );

    // The same inputs through `digctl sample`: the same bytes.
    let local = sample(c.dir.path(), "local", 10, 3, 20, BATCH);
    let read = |p: &Path| std::fs::read(p).unwrap();
    let remote_xtc = read(&xtc);
    assert!(!remote_xtc.is_empty());
    assert!(
        remote_xtc == read(&local.join("samples.xtc")),
        "results.xtc differs from digctl sample's samples.xtc"
    );
    assert_eq!(
        String::from_utf8(read(&topology)).unwrap(),
        String::from_utf8(read(&local.join("topology.pdb"))).unwrap()
    );
    assert_eq!(
        String::from_utf8(read(&out.join(format!("{job}.pdb")))).unwrap(),
        String::from_utf8(read(&local.join("samples.pdb"))).unwrap(),
        "results.pdb (4 atoms per residue) equals samples.pdb"
    );
    // Both Python readers take the downloaded pair.
    let text = python(READ_BOTH, &[&xtc, &topology]);
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got["mdtraj"]["n_frames"], 10);
    assert_eq!(got["mda"]["n_frames"], 10);
    assert_eq!(got["mda"]["n_atoms"], 4 * SEQUENCE.len());

    // The routes answer like results.pdb: 404 for another tenant's or an
    // unknown job, 401 without a key.
    for route in ["results.xtc", "topology.pdb"] {
        let path = format!("/v1/jobs/{job}/{route}");
        let (status, body) = c.api_get(&c.key_b, &path);
        assert_eq!(status, 404, "{route}: {body}");
        let unknown = format!("/v1/jobs/00000000-0000-4000-8000-000000000000/{route}");
        assert_eq!(c.api_get(&c.key_a, &unknown).0, 404, "{route}");
        assert_eq!(c.http_get(&path).map(|r| r.0), Some(401), "{route}");
    }
    // (results.xtc is binary; `fetch` above read it.)
    let (status, text) = c.api_get(&c.key_a, &format!("/v1/jobs/{job}/topology.pdb"));
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.as_bytes(), read(&topology));
    assert!(svc.exited().is_none(), "standalone exited:\n{}", svc.log());
    assert!(svc.terminate(Duration::from_secs(30)), "{}", svc.log());
}
