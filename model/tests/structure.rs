//! Structure output: backbone geometry, the npz (checked against numpy) and
//! the multi-model PDB (checked column by column and against MDTraj).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use dig_model::structure::{
    carbonyl_oxygen, three_letter, Ensemble, CA_C_O_ANGLE_DEG, C_O_BOND, TERMINAL_PSI_DEG,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N_REF: [f64; 3] = [1.45597958, 0.0, 0.0];
const C_REF: [f64; 3] = [-0.533655602, 1.42752619, 0.0];

/// A uniformly random rotation matrix (Shoemake's unit quaternion), row-major.
fn random_rotation(rng: &mut impl Rng) -> [f32; 9] {
    use std::f64::consts::TAU;
    let (u1, u2, u3): (f64, f64, f64) = (rng.random(), rng.random(), rng.random());
    let (a, b) = ((1.0 - u1).sqrt(), u1.sqrt());
    let [w, x, y, z] = [
        a * (TAU * u2).sin(),
        a * (TAU * u2).cos(),
        b * (TAU * u3).sin(),
        b * (TAU * u3).cos(),
    ];
    [
        1.0 - 2.0 * (y * y + z * z),
        2.0 * (x * y - w * z),
        2.0 * (x * z + w * y),
        2.0 * (x * y + w * z),
        1.0 - 2.0 * (x * x + z * z),
        2.0 * (y * z - w * x),
        2.0 * (x * z - w * y),
        2.0 * (y * z + w * x),
        1.0 - 2.0 * (x * x + y * y),
    ]
    .map(|v| v as f32)
}

/// `sample_index.len()` random structures of `sequence`: translations
/// uniform in a 40 Å box, uniformly random rotations.
fn random_ensemble(seed: u64, sequence: &str, sample_index: Vec<i64>) -> Ensemble {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count = sample_index.len() * sequence.len();
    let tr = (0..count * 3)
        .map(|_| rng.random_range(-20.0f32..20.0))
        .collect();
    let rot_mat = (0..count).flat_map(|_| random_rotation(&mut rng)).collect();
    Ensemble {
        sequence: sequence.to_string(),
        sample_index,
        tr,
        rot_mat,
        steer: None,
        log_density: None,
    }
}

/// One residue with the given frame.
fn single_residue(t: [f32; 3], r: [f32; 9]) -> Ensemble {
    Ensemble {
        sequence: "G".into(),
        sample_index: vec![0],
        tr: t.to_vec(),
        rot_mat: r.to_vec(),
        steer: None,
        log_density: None,
    }
}

const IDENTITY: [f32; 9] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum::<f64>().sqrt()
}

fn to_f64(v: [f32; 3]) -> [f64; 3] {
    v.map(f64::from)
}

/// Runs `script` with the project's Python (numpy and MDTraj installed) and
/// parses the JSON it prints.
fn python_json(script: &str, args: &[&Path]) -> serde_json::Value {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; create the venv (ENVIRONMENT.md)",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "python failed (needs numpy and mdtraj in .venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python prints JSON")
}

fn pdb_text(ensemble: &Ensemble) -> String {
    let mut buf = Vec::new();
    ensemble.write_pdb(&mut buf).expect("writes PDB");
    String::from_utf8(buf).expect("PDB is ASCII")
}

/// Columns `first..=last` of a PDB line, 1-based as the format defines them.
fn cols(line: &str, first: usize, last: usize) -> &str {
    &line[first - 1..last]
}

#[test]
fn backbone_for_identity_rotation_places_n_and_c_at_reference_offsets() {
    let bb = single_residue([1.0, 2.0, 3.0], IDENTITY).backbone(0);
    let [n, ca, c] = bb[0];
    assert_eq!(ca, [1.0, 2.0, 3.0]);
    assert_eq!(n, [(1.0 + N_REF[0]) as f32, 2.0, 3.0]);
    assert_eq!(c, [(1.0 + C_REF[0]) as f32, (2.0 + C_REF[1]) as f32, 3.0]);
}

#[test]
fn backbone_applies_the_transpose_of_the_rotation() {
    // R = rotation by +90 degrees about z: R x = y. R^T x = -y, so N lies
    // along -y; with R instead of R^T it would lie along +y.
    let r = [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let [n, _, c] = single_residue([0.0; 3], r).backbone(0)[0];
    assert_eq!(n, [0.0, -N_REF[0] as f32, 0.0]);
    // R^T (cx, cy, 0) = (cy, -cx, 0).
    assert_eq!(c, [C_REF[1] as f32, -C_REF[0] as f32, 0.0]);
}

#[test]
fn backbone_bond_lengths_and_angle_are_those_of_the_reference_frame_for_random_rotations() {
    let ensemble = random_ensemble(7, "ACDEFGHIKL", vec![0, 1, 2]);
    let n_ca = N_REF.iter().map(|v| v * v).sum::<f64>().sqrt();
    let ca_c = C_REF.iter().map(|v| v * v).sum::<f64>().sqrt();
    let angle = (N_REF.iter().zip(&C_REF).map(|(a, b)| a * b).sum::<f64>() / (n_ca * ca_c)).acos();
    for sample in 0..ensemble.num_samples() {
        for [n, ca, c] in ensemble.backbone(sample) {
            let (n, ca, c) = (to_f64(n), to_f64(ca), to_f64(c));
            assert!(
                (distance(n, ca) - n_ca).abs() < 1e-5,
                "N-CA {}",
                distance(n, ca)
            );
            assert!(
                (distance(c, ca) - ca_c).abs() < 1e-5,
                "CA-C {}",
                distance(c, ca)
            );
            let dot: f64 = (0..3).map(|k| (n[k] - ca[k]) * (c[k] - ca[k])).sum();
            let got = (dot / (distance(n, ca) * distance(c, ca))).acos();
            assert!(
                (got - angle).abs() < 1e-5,
                "N-CA-C {got} rad, expected {angle}"
            );
        }
    }
}

#[test]
fn npz_round_trip_is_bit_identical() {
    let mut ensemble = random_ensemble(1, "MKTAYIAKQR", vec![17, 3, 42]);
    // Values a lossy path would change: negative zero, a subnormal, a NaN
    // with a payload, the extremes.
    ensemble.tr[..5].copy_from_slice(&[
        -0.0,
        f32::from_bits(1),
        f32::from_bits(0x7fc0_1234),
        f32::MAX,
        f32::MIN,
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.npz");
    ensemble.write_npz(&path).unwrap();
    let back = Ensemble::read_npz(&path, "MKTAYIAKQR").unwrap();
    assert_eq!(back.sequence, ensemble.sequence);
    assert_eq!(back.sample_index, vec![17, 3, 42]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.tr), bits(&ensemble.tr));
    assert_eq!(bits(&back.rot_mat), bits(&ensemble.rot_mat));
}

#[test]
fn npz_is_read_by_numpy_with_shapes_dtypes_and_values() {
    let ensemble = random_ensemble(2, "ACDEFGH", vec![5, 6]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.npz");
    ensemble.write_npz(&path).unwrap();
    let got = python_json(
        r#"
import json, sys, numpy as np
d = np.load(sys.argv[1])
# float32 as its bit pattern: JSON decimals need not round-trip exactly.
bits = lambda a: a.view(np.uint32) if a.dtype == np.float32 else a
print(json.dumps({k: {"shape": list(d[k].shape), "dtype": str(d[k].dtype),
                      "values": bits(d[k]).ravel().tolist()} for k in d.files}))
"#,
        &[&path],
    );
    let entries = got.as_object().unwrap();
    assert_eq!(entries.len(), 7, "{got}");
    for (name, shape, dtype) in [
        ("tr", vec![2, 7, 3], "float32"),
        ("rot_mat", vec![2, 7, 3, 3], "float32"),
        ("sample_index", vec![2], "int64"),
        ("valid", vec![2], "bool"),
        ("ca_ca_max", vec![2], "float32"),
        ("c_n_max", vec![2], "float32"),
        ("clash_min", vec![2], "float32"),
    ] {
        assert_eq!(got[name]["shape"], serde_json::json!(shape), "{name}");
        assert_eq!(got[name]["dtype"], dtype, "{name}");
    }
    let values =
        |name: &str| -> Vec<i64> { serde_json::from_value(got[name]["values"].clone()).unwrap() };
    let bits = |v: &[f32]| v.iter().map(|x| i64::from(x.to_bits())).collect::<Vec<_>>();
    assert_eq!(values("tr"), bits(&ensemble.tr));
    assert_eq!(values("rot_mat"), bits(&ensemble.rot_mat));
    assert_eq!(values("sample_index"), vec![5, 6]);
    // Each sample's validity, as `evaluate` measures it.
    let validity = ensemble.validity();
    let valid: Vec<bool> = serde_json::from_value(got["valid"]["values"].clone()).unwrap();
    assert_eq!(valid, validity.iter().map(|v| v.valid).collect::<Vec<_>>());
    let measured = |f: fn(&dig_model::evaluate::Validity) -> f64| {
        bits(&validity.iter().map(|v| f(v) as f32).collect::<Vec<_>>())
    };
    assert_eq!(values("ca_ca_max"), measured(|v| v.ca_ca_max));
    assert_eq!(values("c_n_max"), measured(|v| v.c_n_max));
    assert_eq!(values("clash_min"), measured(|v| v.clash_min));
}

#[test]
fn write_npz_replaces_an_existing_file_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.npz");
    std::fs::write(&path, b"old content").unwrap();
    let ensemble = random_ensemble(3, "GG", vec![0]);
    ensemble.write_npz(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["samples.npz"]);
    assert_eq!(Ensemble::read_npz(&path, "GG").unwrap(), ensemble);
}

#[test]
fn write_npz_into_a_missing_directory_fails_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("samples.npz");
    let err = random_ensemble(3, "GG", vec![0])
        .write_npz(&path)
        .unwrap_err();
    assert!(err.to_string().contains("missing/samples.npz"), "{err}");
    assert!(!path.exists());
}

#[test]
fn write_npz_rejects_arrays_that_disagree_with_the_sequence() {
    let mut ensemble = random_ensemble(3, "GGG", vec![0]);
    ensemble.sequence = "GG".into();
    let dir = tempfile::tempdir().unwrap();
    let err = ensemble.write_npz(&dir.path().join("x.npz")).unwrap_err();
    assert!(
        err.to_string().contains("2 residues need 6 translation"),
        "{err}"
    );
}

#[test]
fn read_npz_rejects_a_sequence_of_the_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.npz");
    random_ensemble(4, "ACDE", vec![0, 1])
        .write_npz(&path)
        .unwrap();
    let err = Ensemble::read_npz(&path, "ACD").unwrap_err();
    assert!(
        err.to_string()
            .contains("have 4 residues but the given sequence has 3"),
        "{err}"
    );
}

#[test]
fn read_npz_reads_the_published_single_state_as_sample_zero() {
    // The published sampler's final state: tr (24,3), rot_mat (24,3,3), no
    // sample_index.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/final_state.npz");
    let sequence = "A".repeat(24);
    let ensemble = Ensemble::read_npz(&path, sequence).unwrap();
    assert_eq!((ensemble.num_samples(), ensemble.len_residues()), (1, 24));
    assert_eq!(ensemble.sample_index, vec![0]);
    assert_eq!((ensemble.tr.len(), ensemble.rot_mat.len()), (72, 216));
}

#[test]
fn three_letter_knows_the_twenty_standard_amino_acids_and_x() {
    let expected = [
        ('A', "ALA"),
        ('R', "ARG"),
        ('N', "ASN"),
        ('D', "ASP"),
        ('C', "CYS"),
        ('Q', "GLN"),
        ('E', "GLU"),
        ('G', "GLY"),
        ('H', "HIS"),
        ('I', "ILE"),
        ('L', "LEU"),
        ('K', "LYS"),
        ('M', "MET"),
        ('F', "PHE"),
        ('P', "PRO"),
        ('S', "SER"),
        ('T', "THR"),
        ('W', "TRP"),
        ('Y', "TYR"),
        ('V', "VAL"),
        ('X', "UNK"),
    ];
    for (code, name) in expected {
        assert_eq!(three_letter(code), Some(name), "{code}");
    }
    for code in ['B', 'Z', 'O', 'U', 'a', '-', ' '] {
        assert_eq!(three_letter(code), None, "{code}");
    }
}

#[test]
fn pdb_records_have_the_fixed_wwpdb_columns() {
    let ensemble = Ensemble {
        sequence: "MG".into(),
        sample_index: vec![17, 4],
        tr: vec![
            1.0, -2.5, 3.25, 10.0, 20.0, -999.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
        ],
        rot_mat: IDENTITY.repeat(4),
        steer: None,
        log_density: None,
    };
    let text = pdb_text(&ensemble);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.iter().all(|l| l.len() == 80),
        "every record has 80 columns"
    );
    let trimmed: Vec<&str> = lines.iter().map(|l| l.trim_end()).collect();
    assert_eq!(trimmed[0], "REMARK   1 DIG MODEL    1 SAMPLE_INDEX 17");
    assert_eq!(trimmed[1], "REMARK   1 DIG MODEL    2 SAMPLE_INDEX 4");
    assert_eq!(trimmed[2], "MODEL        1");
    assert_eq!(cols(trimmed[2], 11, 14), "   1");

    // Second atom of model 1: CA of MET 1 at (1, -2.5, 3.25).
    let ca = lines[4];
    assert_eq!(cols(ca, 1, 6), "ATOM  ");
    assert_eq!(cols(ca, 7, 11), "    2");
    assert_eq!(cols(ca, 12, 12), " ");
    assert_eq!(cols(ca, 13, 16), " CA ");
    assert_eq!(cols(ca, 17, 17), " ");
    assert_eq!(cols(ca, 18, 20), "MET");
    assert_eq!(cols(ca, 21, 21), " ");
    assert_eq!(cols(ca, 22, 22), "A");
    assert_eq!(cols(ca, 23, 26), "   1");
    assert_eq!(cols(ca, 27, 30), "    ");
    assert_eq!(cols(ca, 31, 38), "   1.000");
    assert_eq!(cols(ca, 39, 46), "  -2.500");
    assert_eq!(cols(ca, 47, 54), "   3.250");
    assert_eq!(cols(ca, 55, 60), "  1.00");
    assert_eq!(cols(ca, 61, 66), "  0.00");
    assert_eq!(cols(ca, 67, 76), "          ");
    assert_eq!(cols(ca, 77, 78), " C");

    // O of MET 1, from CA 1, C 1 and N of GLY 2 (ideal geometry, the
    // values computed independently with numpy: O in the CA-C-N(2) plane,
    // 1.23 Å from C, CA-C-O 120.5°, on the side away from N(2)).
    let o1 = lines[6];
    assert_eq!(
        (
            cols(o1, 7, 11),
            cols(o1, 13, 16),
            cols(o1, 18, 20),
            cols(o1, 23, 26)
        ),
        ("    4", " O  ", "MET", "   1")
    );
    assert_eq!(
        (cols(o1, 31, 38), cols(o1, 39, 46), cols(o1, 47, 54)),
        ("   0.230", "  -0.494", "   4.310")
    );
    assert_eq!(cols(o1, 77, 78), " O");

    // N and C of GLY 2: atom names, element, and the N offset in x.
    let (n2, c2) = (lines[7], lines[9]);
    assert_eq!(
        (
            cols(n2, 7, 11),
            cols(n2, 13, 16),
            cols(n2, 18, 20),
            cols(n2, 23, 26)
        ),
        ("    5", " N  ", "GLY", "   2")
    );
    assert_eq!(cols(n2, 31, 38), "  11.456");
    assert_eq!(cols(n2, 47, 54), "-999.000");
    assert_eq!(cols(n2, 77, 78), " N");
    assert_eq!(
        (cols(c2, 13, 16), cols(c2, 31, 38), cols(c2, 39, 46)),
        (" C  ", "   9.466", "  21.428")
    );
    // The last residue's O: ideal psi 180°, in its own N-CA-C plane on N's side.
    let o2 = lines[10];
    assert_eq!(
        (
            cols(o2, 7, 11),
            cols(o2, 13, 16),
            cols(o2, 31, 38),
            cols(o2, 39, 46),
            cols(o2, 47, 54)
        ),
        ("    8", " O  ", "  10.240", "  22.383", "-999.000")
    );

    assert_eq!(trimmed[11], "TER       9      GLY A   2");
    assert_eq!(trimmed[12], "ENDMDL");
    assert_eq!(trimmed[13], "MODEL        2");
    assert_eq!(cols(lines[14], 7, 11), "    1", "serials restart per model");
    assert_eq!(trimmed[22], "TER       9      GLY A   2");
    assert_eq!(trimmed[23], "ENDMDL");
    assert_eq!(trimmed[24], "END");
    assert_eq!(lines.len(), 25);
}

#[test]
fn pdb_rejects_coordinates_that_do_not_fit_the_8_3_field_without_writing() {
    for bad in [
        12345.0,
        10000.0,
        9999.9996,
        -1000.0,
        -999.9996,
        f32::NAN,
        f32::INFINITY,
    ] {
        let ensemble = single_residue([0.0, bad, 0.0], IDENTITY);
        let mut buf = Vec::new();
        let err = ensemble.write_pdb(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData, "{bad}");
        assert!(
            err.to_string().contains("does not fit the PDB %8.3f field"),
            "{err}"
        );
        assert!(buf.is_empty(), "nothing written for {bad}");
    }
    // The widest values that do fit, in z where N, C and O have no offset.
    for (z, field) in [(9999.999, "9999.999"), (-999.999, "-999.999")] {
        let text = pdb_text(&single_residue([0.0, 0.0, z], IDENTITY));
        let atoms: Vec<&str> = text.lines().filter(|l| l.starts_with("ATOM")).collect();
        // N, CA, C and the terminal O (psi 180°: in the N-CA-C plane, z = 0
        // offset for the identity rotation).
        assert_eq!(atoms.len(), 4);
        assert!(atoms.iter().all(|a| cols(a, 47, 54) == field), "{text}");
    }
}

#[test]
fn pdb_rejects_an_unknown_residue_letter() {
    let ensemble = random_ensemble(5, "ACB", vec![0]);
    let err = ensemble.write_pdb(Vec::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidData);
    assert!(err.to_string().contains("residue 3 is `B`"), "{err}");
}

#[test]
fn write_pdb_file_writes_the_same_text_atomically() {
    let ensemble = random_ensemble(6, "ACDEF", vec![0, 1]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.pdb");
    ensemble.write_pdb_file(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pdb_text(&ensemble));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["samples.pdb"]);
}

#[test]
fn mdtraj_loads_the_multi_model_pdb_with_the_sampled_ca_distances() {
    let sequence = "MKTAYIAKQRQISFVKSHFSRQX";
    let ensemble = random_ensemble(8, sequence, vec![10, 11, 12, 13]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.pdb");
    ensemble.write_pdb_file(&path).unwrap();
    let got = python_json(
        r#"
import json, sys, mdtraj as md
t = md.load_pdb(sys.argv[1])
ca = t.topology.select("name CA")
pairs = [[ca[i], ca[i + 1]] for i in range(len(ca) - 1)]
d = md.compute_distances(t, pairs) * 10.0
print(json.dumps({"n_frames": t.n_frames, "n_atoms": t.n_atoms, "n_residues": t.n_residues,
                  "residues": [r.name for r in t.topology.residues],
                  "elements": sorted({a.element.symbol for a in t.topology.atoms}),
                  "ca_ca": d.astype(float).tolist()}))
"#,
        &[&path],
    );
    let l = sequence.len();
    assert_eq!(got["n_frames"], 4);
    assert_eq!(got["n_atoms"], 4 * l);
    assert_eq!(got["n_residues"], l);
    assert_eq!(got["residues"][0], "MET");
    assert_eq!(got["residues"][l - 1], "UNK");
    assert_eq!(got["elements"], serde_json::json!(["C", "N", "O"]));
    let ca_ca: Vec<Vec<f64>> = serde_json::from_value(got["ca_ca"].clone()).unwrap();
    assert_eq!(ca_ca.len(), 4);
    for (sample, frame) in ca_ca.iter().enumerate() {
        assert_eq!(frame.len(), l - 1);
        for (i, &mdtraj) in frame.iter().enumerate() {
            let ca = |r: usize| -> [f32; 3] {
                std::array::from_fn(|k| ensemble.tr[(sample * l + r) * 3 + k])
            };
            let sampled = distance(to_f64(ca(i)), to_f64(ca(i + 1)));
            // The file holds the coordinates rounded to 0.001 Å, which moves
            // a distance by up to sqrt(3) * 0.001 Å (about 0.0003 Å on
            // average); 0.001 Å holds for these inputs.
            assert!(
                (mdtraj - sampled).abs() < 1e-3,
                "frame {sample}, CA {i}-{}: mdtraj {mdtraj} Å, tr {sampled} Å",
                i + 1
            );
            // Against the rounded coordinates only MDTraj's float32 nm
            // arithmetic remains, so a units or column slip would show here.
            let written = |r: usize| ca(r).map(|x| format!("{x:.3}").parse::<f64>().unwrap());
            let expected = distance(written(i), written(i + 1));
            assert!(
                (mdtraj - expected).abs() < 1e-4,
                "frame {sample}, CA {i}-{}: mdtraj {mdtraj} Å, written {expected} Å",
                i + 1
            );
        }
    }
}

#[test]
fn npz_bytes_equal_the_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Ensemble {
        sequence: "AG".into(),
        sample_index: vec![4, 5],
        tr: (0..12).map(|x| x as f32).collect(),
        rot_mat: (0..36).map(|x| x as f32 * 0.5).collect(),
        steer: None,
        log_density: None,
    };
    let path = dir.path().join("x.npz");
    e.write_npz(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), e.npz_bytes().unwrap());
}

// ---------------------------------------------------------------- backbone O

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| a[k] * b[k]).sum()
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// The angle a-b-c in degrees.
fn angle_deg(a: [f64; 3], b: [f64; 3], c: [f64; 3]) -> f64 {
    let (u, v) = (sub(a, b), sub(c, b));
    (dot(u, v) / (dot(u, u) * dot(v, v)).sqrt())
        .acos()
        .to_degrees()
}

/// The dihedral a-b-c-d in degrees (IUPAC sign, as MDTraj computes it).
fn dihedral_deg(a: [f64; 3], b: [f64; 3], c: [f64; 3], d: [f64; 3]) -> f64 {
    let (b0, b1, b2) = (sub(a, b), sub(c, b), sub(d, c));
    let n = dot(b1, b1).sqrt();
    let axis = b1.map(|x| x / n);
    let v = sub(b0, axis.map(|x| x * dot(b0, axis)));
    let w = sub(b2, axis.map(|x| x * dot(b2, axis)));
    dot(cross(axis, v), w).atan2(dot(v, w)).to_degrees()
}

/// `a - b` wrapped into (-180, 180] degrees.
fn angle_diff(a: f64, b: f64) -> f64 {
    let d = (a - b).rem_euclid(360.0);
    if d > 180.0 {
        d - 360.0
    } else {
        d
    }
}

/// Every O of `e`: C=O 1.23 ± 0.01 Å, CA-C-O within 120-121°, N, CA, C
/// those of `backbone`; for residue i < L-1 O in the plane of CA(i), C(i),
/// N(i+1) and on the other side of the CA-C axis from N(i+1) (dihedral
/// N-CA-C-O = N-CA-C-N(i+1) + 180°); for the last residue the ideal psi of
/// 180° (N-CA-C-O = 0°). Returns how many O were checked against a next N.
fn assert_ideal_oxygens(e: &Ensemble) -> usize {
    let l = e.len_residues();
    let mut against_next = 0;
    for s in 0..e.num_samples() {
        let (bb, bbo) = (e.backbone(s), e.backbone_with_oxygen(s));
        assert_eq!(bbo.len(), l);
        for i in 0..l {
            let [n, ca, c, o] = bbo[i];
            assert_eq!([n, ca, c], bb[i], "sample {s} residue {i}");
            let [n, ca, c, o] = [n, ca, c, o].map(to_f64);
            let co = distance(c, o);
            assert!(
                (co - 1.23).abs() <= 0.01,
                "sample {s} residue {i}: C=O {co}"
            );
            let a = angle_deg(ca, c, o);
            assert!(
                (120.0..=121.0).contains(&a),
                "sample {s} residue {i}: CA-C-O {a}°"
            );
            let psi_o = dihedral_deg(n, ca, c, o);
            if i + 1 < l {
                let next = to_f64(bb[i + 1][0]);
                // Distance of N(i+1) from the CA-C line: below 0.1 Å its
                // side (and the plane) is numerically ill-defined.
                let axis = sub(c, ca);
                let off_axis = dot(cross(axis, sub(next, c)), cross(axis, sub(next, c))).sqrt()
                    / dot(axis, axis).sqrt();
                if off_axis < 0.1 {
                    continue;
                }
                let normal = cross(sub(ca, c), sub(next, c));
                let from_plane = dot(sub(o, c), normal).abs() / dot(normal, normal).sqrt();
                assert!(
                    from_plane < 1e-3,
                    "sample {s} residue {i}: O is {from_plane} Å off the CA-C-N(i+1) plane"
                );
                let psi = dihedral_deg(n, ca, c, next);
                let d = angle_diff(psi_o, psi);
                assert!(
                    (d.abs() - 180.0).abs() < 0.05,
                    "sample {s} residue {i}: N-CA-C-O {psi_o}°, psi {psi}°"
                );
                against_next += 1;
            } else {
                assert!(
                    angle_diff(psi_o, 0.0).abs() < 0.05,
                    "last residue: N-CA-C-O {psi_o}°, expected 0° (psi 180°)"
                );
            }
        }
    }
    against_next
}

#[test]
fn oxygen_has_ideal_peptide_geometry_in_random_and_sampled_ensembles() {
    // Random frames: N(i+1) anywhere around C(i), the hardest case for a
    // construction that must keep bond, angle and plane.
    let random = random_ensemble(11, "MKTAYIAKQRQISFVKSHFSRQLEGG", vec![0, 1, 2, 3, 4]);
    let checked = assert_ideal_oxygens(&random);
    assert!(checked >= 5 * 24, "{checked}");
    // The published sampler's final state of the fixture protein.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/final_state.npz");
    let sampled = Ensemble::read_npz(&path, "MKTAYIAKQRQISFVKSHFSRQLE").unwrap();
    assert_eq!(assert_ideal_oxygens(&sampled), 23);
    // One residue: only the terminal rule.
    assert_eq!(
        assert_ideal_oxygens(&single_residue([1.0, 2.0, 3.0], IDENTITY)),
        0
    );
}

#[test]
fn carbonyl_oxygen_lies_opposite_the_next_nitrogen() {
    // CA at the origin, C along +x, N(i+1) in the xy-plane at +y: O must be
    // in the xy-plane at -y, 1.23 Å from C, at 120.5° from C->CA.
    let (n, ca, c) = ([-0.5, -1.4, 0.0], [0.0; 3], [1.5, 0.0, 0.0]);
    let o = carbonyl_oxygen(n, ca, c, Some([2.2, 1.2, 0.0]));
    let expected = [
        1.5 + 1.23 * (180.0f64 - CA_C_O_ANGLE_DEG).to_radians().cos(),
        -1.23 * (180.0f64 - CA_C_O_ANGLE_DEG).to_radians().sin(),
        0.0,
    ];
    for k in 0..3 {
        assert!(
            (f64::from(o[k]) - expected[k]).abs() < 1e-6,
            "{o:?} vs {expected:?}"
        );
    }
    assert_eq!(
        (C_O_BOND, CA_C_O_ANGLE_DEG, TERMINAL_PSI_DEG),
        (1.23, 120.5, 180.0)
    );
    // Without a next N: in the N-CA-C plane, on N's side (-y here).
    let last = carbonyl_oxygen(n, ca, c, None);
    assert!(last[2].abs() < 1e-6 && last[1] < -1.0, "{last:?}");
    // N(i+1) on the CA-C line: psi undefined, still a finite ideal O.
    let o = carbonyl_oxygen(n, ca, c, Some([3.0, 0.0, 0.0])).map(f64::from);
    assert!((distance(o, to_f64(c)) - 1.23).abs() < 1e-6, "{o:?}");
}

/// Adenylate kinase (`examples/adk/closed.pdb`, N, CA, C, O of 214
/// residues) as DiG frames: the O the writers place can be compared with
/// the crystal's.
fn adk_closed() -> (PathBuf, Ensemble) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/adk/closed.pdb");
    let t = dig_model::backbone::read_pdb(&path).unwrap();
    let atoms: Vec<[[f64; 3]; 3]> = t.frames[0]
        .iter()
        .map(|r| r.map(|a| a.map(f64::from)))
        .collect();
    let (tr, rot_mat) = dig_model::training::frames(&atoms).unwrap();
    let e = Ensemble {
        sequence: t.sequence(),
        sample_index: vec![0],
        tr,
        rot_mat,
        steer: None,
        log_density: None,
    };
    (path, e)
}

/// MDTraj: DSSP (simplified, per frame) of `argv[1]` (optionally with
/// topology `argv[2]`).
pub const MDTRAJ_DSSP: &str = r#"
import json, sys, mdtraj as md
t = md.load(sys.argv[1]) if len(sys.argv) == 2 else md.load(sys.argv[1], top=sys.argv[2])
d = md.compute_dssp(t, simplified=True)
print(json.dumps({"n_residues": t.n_residues, "dssp": ["".join(f) for f in d]}))
"#;

#[test]
fn mdtraj_computes_dssp_on_the_written_pdb() {
    let dir = tempfile::tempdir().unwrap();
    let sequence = "MKTAYIAKQRQISFVKSHFSRQLE";
    let random = random_ensemble(12, sequence, vec![0, 1, 2]);
    let path = dir.path().join("random.pdb");
    random.write_pdb_file(&path).unwrap();
    let got = python_json(MDTRAJ_DSSP, &[&path]);
    assert_eq!(got["n_residues"], 24);
    let dssp: Vec<String> = serde_json::from_value(got["dssp"].clone()).unwrap();
    assert_eq!(dssp.len(), 3);
    for frame in &dssp {
        assert_eq!(frame.len(), 24, "{frame}");
        assert!(frame.chars().all(|c| "HEC".contains(c)), "{frame}");
    }
}

#[test]
fn placed_oxygens_reproduce_the_crystal_and_its_dssp() {
    let (crystal, e) = adk_closed();
    assert_eq!(e.len_residues(), 214);
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("adk.pdb");
    e.write_pdb_file(&ours).unwrap();
    let got = python_json(
        r#"
import json, sys, numpy as np, mdtraj as md
ref, ours = md.load(sys.argv[1]), md.load(sys.argv[2])
sel = lambda t, name: [a.index for a in t.topology.atoms if a.name == name]
# Superpose ours (centred frames) on the crystal by N, CA, C.
bb = lambda t: sorted(sel(t, "N") + sel(t, "CA") + sel(t, "C"))
ours.superpose(ref, atom_indices=bb(ours), ref_atom_indices=bb(ref))
# The crystal lacks the last residue's O (it has OXT-style naming).
ro, oo = sel(ref, "O"), sel(ours, "O")[:len(sel(ref, "O"))]
d = np.linalg.norm(ref.xyz[0, ro] - ours.xyz[0, oo], axis=1) * 10.0
print(json.dumps({"o_dev": d.astype(float).tolist(),
                  "ref": "".join(md.compute_dssp(ref, simplified=True)[0]),
                  "ours": "".join(md.compute_dssp(ours, simplified=True)[0])}))
"#,
        &[&crystal, &ours],
    );
    let mut dev: Vec<f64> = serde_json::from_value(got["o_dev"].clone()).unwrap();
    assert_eq!(dev.len(), 213);
    dev.sort_by(f64::total_cmp);
    let (median, p90) = (dev[dev.len() / 2], dev[dev.len() * 9 / 10]);
    let (reference, ours) = (got["ref"].as_str().unwrap(), got["ours"].as_str().unwrap());
    let same = reference
        .chars()
        .zip(ours.chars())
        .filter(|(a, b)| a == b)
        .count();
    eprintln!(
        "O deviation from the crystal: median {median:.3} Å, 90th percentile {p90:.3} Å, \
         max {:.3} Å; DSSP agrees on {same} of 214\n  crystal {reference}\n  placed  {ours}",
        dev[dev.len() - 1]
    );
    assert_eq!(ours.len(), 214);
    // Measured: median 0.14 Å, 90% 0.29 Å; DSSP differs only at the C
    // terminus, where the crystal lacks the last O ("NA").
    assert!(median < 0.2 && p90 < 0.35, "median {median} Å, 90% {p90} Å");
    assert!(same >= 210, "DSSP agrees on {same} of 214 residues");
}
