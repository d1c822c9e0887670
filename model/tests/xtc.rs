//! XTC output: frames read back by MDTraj, MDAnalysis and the crate's own
//! reader (molly) equal the ensemble's N, CA, C, O within the 0.01 Å grid;
//! shard-by-shard writing gives the bytes of the whole ensemble; the
//! topology PDB is what both Python readers take; DSSP runs on it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use dig_model::structure::Ensemble;
use dig_model::xtc::{xtc_bytes, XtcWriter, MAX_ABS_COORDINATE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Runs `script` with the project's Python (numpy, MDTraj, MDAnalysis) and
/// parses the JSON it prints.
fn python_json(script: &str, args: &[&Path]) -> Value {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `make setup`", python.display()));
    assert!(
        output.status.success(),
        "python failed (needs mdtraj and MDAnalysis in .venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python prints JSON")
}

/// Random frames (uniform rotations by normalised random matrices' QR is
/// not needed: any orthonormal frame does) with translations in a `span` Å
/// box around `centre`.
fn random_ensemble(
    seed: u64,
    sequence: &str,
    sample_index: Vec<i64>,
    centre: f32,
    span: f32,
) -> Ensemble {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count = sample_index.len() * sequence.len();
    let tr = (0..count * 3)
        .map(|_| centre + rng.random_range(-span / 2.0..span / 2.0))
        .collect();
    let rot_mat = (0..count)
        .flat_map(|_| {
            // A rotation about a random axis by a random angle (Rodrigues).
            let axis: [f64; 3] = std::array::from_fn(|_| rng.random_range(-1.0..1.0));
            let norm = axis.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-9);
            let [x, y, z] = axis.map(|a| a / norm);
            let t: f64 = rng.random_range(0.0..std::f64::consts::TAU);
            let (c, s, v) = (t.cos(), t.sin(), 1.0 - t.cos());
            [
                c + x * x * v,
                x * y * v - z * s,
                x * z * v + y * s,
                y * x * v + z * s,
                c + y * y * v,
                y * z * v - x * s,
                z * x * v - y * s,
                z * y * v + x * s,
                c + z * z * v,
            ]
            .map(|r| r as f32)
        })
        .collect();
    Ensemble {
        sequence: sequence.into(),
        sample_index,
        tr,
        rot_mat,
        steer: None,
        log_density: None,
    }
}

/// Samples `range` of `e` as their own ensemble (a shard).
fn slice(e: &Ensemble, range: std::ops::Range<usize>) -> Ensemble {
    let l = e.len_residues();
    Ensemble {
        sequence: e.sequence.clone(),
        sample_index: e.sample_index[range.clone()].to_vec(),
        tr: e.tr[range.start * l * 3..range.end * l * 3].to_vec(),
        rot_mat: e.rot_mat[range.start * l * 9..range.end * l * 9].to_vec(),
        steer: None,
        log_density: None,
    }
}

/// The ensemble's atoms per frame, flattened (N, CA, C, O per residue), Å.
fn atoms(e: &Ensemble) -> Vec<Vec<[f32; 3]>> {
    (0..e.num_samples())
        .map(|s| e.backbone_with_oxygen(s).into_iter().flatten().collect())
        .collect()
}

/// MDTraj and MDAnalysis reading `argv[1]` (XTC) with topology `argv[2]`:
/// frames (Å), steps, times, atom names, residue names, box, DSSP.
const READ_BOTH: &str = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, mdtraj as md, MDAnalysis as mda
xtc, top = sys.argv[1], sys.argv[2]
t = md.load(xtc, top=top)
with md.formats.XTCTrajectoryFile(xtc) as f:
    _, time, step, box = f.read()
u = mda.Universe(top, xtc)
frames, steps, times, dims = [], [], [], []
for ts in u.trajectory:
    frames.append(ts.positions.astype(float).tolist())
    steps.append(int(ts.data["step"]))
    times.append(float(ts.time))
    dims.append(None if ts.dimensions is None else ts.dimensions.astype(float).tolist())
print(json.dumps({
    "mdtraj": {"n_frames": t.n_frames, "n_atoms": t.n_atoms,
               "xyz": (t.xyz.astype(np.float64) * 10.0).tolist(),
               "step": step.astype(int).tolist(), "time": time.astype(float).tolist(),
               "box": None if box is None else box.astype(float).tolist(),
               "unitcell": None if t.unitcell_vectors is None else t.unitcell_vectors.tolist(),
               "names": [a.name for a in t.topology.atoms],
               "residues": [r.name for r in t.topology.residues],
               "elements": [a.element.symbol for a in t.topology.atoms],
               "dssp": ["".join(f) for f in md.compute_dssp(t, simplified=True)]},
    "mda": {"n_frames": len(u.trajectory), "n_atoms": u.atoms.n_atoms, "xyz": frames,
            "step": steps, "time": times, "dimensions": dims,
            "names": [str(n) for n in u.atoms.names],
            "residues": [str(r.resname) for r in u.residues]},
}))
"#;

/// Largest |difference| between the readers' frames and the ensemble's atoms.
fn max_error(read: &Value, expected: &[Vec<[f32; 3]>]) -> f64 {
    let frames: Vec<Vec<[f64; 3]>> = serde_json::from_value(read.clone()).unwrap();
    assert_eq!(frames.len(), expected.len());
    let mut worst = 0.0f64;
    for (f, e) in frames.iter().zip(expected) {
        assert_eq!(f.len(), e.len());
        for (a, b) in f.iter().zip(e) {
            for k in 0..3 {
                worst = worst.max((a[k] - f64::from(b[k])).abs());
            }
        }
    }
    worst
}

/// Writes `e` as XTC + topology into `dir` and checks both Python readers.
fn check_readers(dir: &Path, e: &Ensemble) -> Value {
    let (xtc, top) = (dir.join("samples.xtc"), dir.join("topology.pdb"));
    e.write_xtc_file(&xtc).unwrap();
    e.write_topology_pdb_file(&top).unwrap();
    let got = python_json(READ_BOTH, &[&xtc, &top]);
    let (n, l) = (e.num_samples(), e.len_residues());
    let expected = atoms(e);
    let steps: Vec<i64> = e.sample_index.clone();
    let names: Vec<&str> = ["N", "CA", "C", "O"].repeat(l);
    for reader in ["mdtraj", "mda"] {
        let r = &got[reader];
        assert_eq!(r["n_frames"], n, "{reader}");
        assert_eq!(r["n_atoms"], 4 * l, "{reader}");
        assert_eq!(r["names"], serde_json::json!(names), "{reader}");
        assert_eq!(r["residues"][0], "MET", "{reader}");
        assert_eq!(r["residues"].as_array().unwrap().len(), l, "{reader}");
        assert_eq!(r["step"], serde_json::json!(steps), "{reader}");
        let times: Vec<f64> = serde_json::from_value(r["time"].clone()).unwrap();
        assert_eq!(times, steps.iter().map(|&s| s as f64).collect::<Vec<_>>());
        // 0.001 nm integers: rounding moves a coordinate by at most 0.005 Å,
        // plus float32 nm arithmetic in the readers.
        let err = max_error(&r["xyz"], &expected);
        assert!(
            err <= 0.006,
            "{reader}: coordinates differ by up to {err} Å"
        );
    }
    assert_eq!(
        got["mdtraj"]["elements"],
        serde_json::json!(["N", "C", "C", "O"].repeat(l))
    );
    // A zero box, which both readers take as no box.
    assert!(got["mdtraj"]["box"].is_null(), "{}", got["mdtraj"]["box"]);
    assert!(got["mdtraj"]["unitcell"].is_null());
    assert!(got["mda"]["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d.is_null() || d.as_array().unwrap().iter().take(3).all(|x| x == 0.0)));
    let dssp: Vec<String> = serde_json::from_value(got["mdtraj"]["dssp"].clone()).unwrap();
    assert_eq!(dssp.len(), n);
    for frame in &dssp {
        assert_eq!(
            frame.chars().count(),
            l,
            "one DSSP letter per residue: {frame}"
        );
        assert!(frame.chars().all(|c| "HEC".contains(c)), "{frame}");
    }
    got
}

#[test]
fn mdtraj_and_mdanalysis_read_the_xtc_and_topology_with_the_ensemble_atoms() {
    let dir = tempfile::tempdir().unwrap();
    let e = random_ensemble(
        1,
        "MKTAYIAKQRQISFVKSHFSRQLEX",
        vec![3, 4, 5, 6, 7],
        0.0,
        40.0,
    );
    check_readers(dir.path(), &e);
}

#[test]
fn frames_of_at_most_nine_atoms_are_plain_floats_and_read_alike() {
    // Two residues: 8 atoms, below GROMACS' compression threshold.
    let dir = tempfile::tempdir().unwrap();
    let e = random_ensemble(2, "MG", vec![0, 1, 2], 5.0, 30.0);
    check_readers(dir.path(), &e);
    let bytes = std::fs::read(dir.path().join("samples.xtc")).unwrap();
    // Header (magic, natoms, step, time, box, natoms) then 24 floats.
    assert_eq!(bytes.len(), 3 * (4 * 14 + 8 * 3 * 4));
    assert_eq!(&bytes[..4], &1995i32.to_be_bytes());
}

#[test]
fn coordinates_across_the_whole_range_survive_the_compression() {
    // Frames spanning up to ±MAX_ABS_COORDINATE: the widest integer ranges
    // the encoder packs (over 60 bits per coordinate triple), and far-off
    // frames of a compact protein.
    let dir = tempfile::tempdir().unwrap();
    let mut e = random_ensemble(3, "MKTAYIAKQRQISF", vec![0, 1, 2, 3], 0.0, 20.0);
    let l = e.len_residues();
    let edge = MAX_ABS_COORDINATE - 5.0;
    // Sample 1: residues alternate between the extremes of every axis.
    for r in 0..l {
        let sign = if r % 2 == 0 { 1.0 } else { -1.0 };
        for k in 0..3 {
            e.tr[(l + r) * 3 + k] = sign * edge * if k == 1 { -1.0 } else { 1.0 };
        }
    }
    // Sample 2: a compact chain far from the origin; sample 3 tiny moves.
    for v in &mut e.tr[2 * l * 3..3 * l * 3] {
        *v += -9000.0;
    }
    for v in &mut e.tr[3 * l * 3..4 * l * 3] {
        *v *= 0.01;
    }
    check_readers(dir.path(), &e);
}

#[test]
fn the_crates_own_reader_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let e = random_ensemble(4, "MKTAYIAKQRQISFVK", vec![0, 1, 2], 0.0, 40.0);
    let (xtc, top) = (dir.path().join("s.xtc"), dir.path().join("top.pdb"));
    e.write_xtc_file(&xtc).unwrap();
    e.write_topology_pdb_file(&top).unwrap();
    let t = dig_model::trajfile::read_with_topology(&xtc, &top).unwrap();
    assert_eq!(t.sequence(), "MKTAYIAKQRQISFVK");
    assert_eq!(t.frames.len(), 3);
    for (s, frame) in t.frames.iter().enumerate() {
        for (got, want) in frame.iter().zip(e.backbone(s)) {
            for (a, b) in got.iter().zip(want) {
                for k in 0..3 {
                    assert!((a[k] - b[k]).abs() <= 0.006, "{a:?} vs {b:?}");
                }
            }
        }
    }
    // The topology alone is a PDB of sample 0 (0.001 Å).
    let p = dig_model::backbone::read_pdb(&top).unwrap();
    assert_eq!(p.frames.len(), 1);
    for (got, want) in p.frames[0].iter().zip(e.backbone(0)) {
        for (a, b) in got.iter().zip(want) {
            for k in 0..3 {
                assert!((a[k] - b[k]).abs() <= 5.1e-4, "{a:?} vs {b:?}");
            }
        }
    }
}

#[test]
fn shards_appended_give_the_bytes_of_the_whole_ensemble_and_keep_selects_frames() {
    let whole = random_ensemble(5, "MKTAYIAKQRQ", (0..10).collect(), 0.0, 30.0);
    let expected = xtc_bytes(&whole, None).unwrap();
    let mut w = XtcWriter::new(Vec::new());
    for r in [0..4, 4..8, 8..10] {
        let n = w.write_ensemble(&slice(&whole, r.clone()), None).unwrap();
        assert_eq!(n, r.len());
    }
    assert_eq!(w.frames(), 10);
    assert_eq!(w.into_inner(), expected);

    // A keep mask per shard writes exactly the kept samples.
    let keep: Vec<bool> = (0..10).map(|i| i % 3 != 1).collect();
    let mut w = XtcWriter::new(Vec::new());
    for r in [0..4, 4..8, 8..10] {
        w.write_ensemble(&slice(&whole, r.clone()), Some(&keep[r]))
            .unwrap();
    }
    assert_eq!(w.frames(), 7);
    let kept = {
        let idx: Vec<usize> = (0..10).filter(|&i| keep[i]).collect();
        let l = whole.len_residues();
        Ensemble {
            sequence: whole.sequence.clone(),
            sample_index: idx.iter().map(|&i| whole.sample_index[i]).collect(),
            tr: idx
                .iter()
                .flat_map(|&i| whole.tr[i * l * 3..(i + 1) * l * 3].to_vec())
                .collect(),
            rot_mat: idx
                .iter()
                .flat_map(|&i| whole.rot_mat[i * l * 9..(i + 1) * l * 9].to_vec())
                .collect(),
            steer: None,
            log_density: None,
        }
    };
    assert_eq!(w.into_inner(), xtc_bytes(&kept, None).unwrap());

    // The file writer writes the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.xtc");
    whole.write_xtc_file(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), expected);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["samples.xtc"], "no temporary file left");
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let good = random_ensemble(6, "MKTAY", vec![0, 1], 0.0, 20.0);
    let mut w = XtcWriter::new(Vec::new());
    w.write_ensemble(&good, None).unwrap();
    let before = xtc_bytes(&good, None).unwrap();

    let refused = |w: &mut XtcWriter<Vec<u8>>, e: &Ensemble, keep: Option<&[bool]>| {
        let err = w.write_ensemble(e, keep).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        err.to_string()
    };
    // A non-finite or out-of-range coordinate in the second sample: the
    // first is not written either.
    for bad in [f32::NAN, f32::INFINITY, MAX_ABS_COORDINATE + 1.0] {
        let mut e = good.clone();
        e.tr[5 * 3 + 1] = bad;
        let m = refused(&mut w, &e, None);
        assert!(m.contains("sample index 1, residue 1"), "{m}");
    }
    let mut other = random_ensemble(6, "MKT", vec![2], 0.0, 20.0);
    let m = refused(&mut w, &other, None);
    assert!(
        m.contains("12 atoms (3 residues) cannot follow frames of 20"),
        "{m}"
    );
    other = good.clone();
    let m = refused(&mut w, &other, Some(&[true]));
    assert!(m.contains("1 entries for 2 samples"), "{m}");
    other.sample_index = vec![0, -1];
    let m = refused(&mut w, &other, None);
    assert!(m.contains("sample index -1"), "{m}");
    other = good.clone();
    other.tr.pop();
    assert!(refused(&mut w, &other, None).contains("inconsistent ensemble"));
    assert_eq!(w.frames(), 2);
    assert_eq!(w.into_inner(), before);

    // The topology needs residue names.
    let mut unknown = good.clone();
    unknown.sequence = "MKTBY".into();
    let err = unknown.write_topology_pdb(0, Vec::new()).unwrap_err();
    assert!(err.to_string().contains("residue 4 is `B`"), "{err}");
    assert!(good.write_topology_pdb(2, Vec::new()).is_err());
}

#[test]
fn the_topology_is_one_structure_of_n_ca_c_o() {
    let e = random_ensemble(7, "MG", vec![9, 10], 0.0, 20.0);
    let mut buf = Vec::new();
    e.write_topology_pdb(1, &mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().all(|l| l.len() == 80));
    assert_eq!(
        lines[0].trim_end(),
        "REMARK   1 DIG TOPOLOGY N CA C O; COORDINATES OF SAMPLE_INDEX 10"
    );
    let atoms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("ATOM  "))
        .collect();
    let names: Vec<&str> = atoms.iter().map(|a| &a[12..16]).collect();
    assert_eq!(
        names,
        [" N  ", " CA ", " C  ", " O  ", " N  ", " CA ", " C  ", " O  "]
    );
    assert_eq!(&atoms[3][17..20], "MET");
    assert_eq!(&atoms[7][17..20], "GLY");
    assert_eq!(&atoms[3][76..78], " O");
    // The coordinates of sample 1 (index 10), %8.3f.
    let o = e.backbone_with_oxygen(1)[0][3];
    assert_eq!(
        &atoms[3][30..54],
        format!("{:8.3}{:8.3}{:8.3}", o[0], o[1], o[2])
    );
    assert_eq!(
        lines[lines.len() - 2].trim_end(),
        "TER       9      GLY A   2"
    );
    assert_eq!(lines[lines.len() - 1].trim_end(), "END");
    assert!(!text.contains("MODEL") && !text.contains("CRYST1"));
}
