//! Structure input for training: backbones from DCD (PSF or PDB topology),
//! XTC (GRO or PDB topology) and multi-model PDB, checked frame by frame
//! against MDAnalysis reading the same files (the MDAnalysisTests data in
//! the project's venv), and the errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use dig_model::backbone::{read_trajectory, BackboneSelection, Trajectory};
use dig_model::trajfile::read_topology;
use serde_json::Value;

/// An MDAnalysisTests data file.
fn data(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/lib/python3.11/site-packages/MDAnalysisTests/data")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: install MDAnalysisTests in .venv (requirements-dev.txt)",
        p.display()
    );
    p
}

/// Runs `script` with the project's Python (MDAnalysis installed) and parses
/// the JSON it prints.
fn python_json(script: &str, args: &[&Path]) -> Value {
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
        "python failed (needs MDAnalysis in .venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python prints JSON")
}

/// MDAnalysis's reading of `Universe(*argv)`: per residue with backbone
/// atoms its id and the atom indices of N, CA, C, and those atoms' positions
/// (Å) in every frame.
const MDA_BACKBONE: &str = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import MDAnalysis as mda
u = mda.Universe(*sys.argv[1:])
res, idx = [], []
for r in u.select_atoms("name N CA C").residues:
    idx.append([int(r.atoms.select_atoms("name " + n)[0].index) for n in ("N", "CA", "C")])
    res.append([int(r.resid), r.resname])
frames = [ts.positions[idx].tolist() for ts in u.trajectory]
print(json.dumps({"n_atoms": u.atoms.n_atoms, "residues": res, "indices": idx, "frames": frames}))
"#;

fn mda_backbone(files: &[&Path]) -> Value {
    python_json(MDA_BACKBONE, files)
}

/// Checks residues (number, name) and frame count against MDAnalysis and
/// returns the largest coordinate difference over all frames, Å.
fn max_difference(ours: &Trajectory, reference: &Value) -> f64 {
    let res = reference["residues"].as_array().unwrap();
    assert_eq!(ours.residues.len(), res.len(), "residue count");
    for (r, m) in ours.residues.iter().zip(res) {
        assert_eq!(r.number, m[0].as_i64().unwrap(), "residue {r}");
        assert_eq!(r.name, m[1].as_str().unwrap(), "residue {r}");
    }
    let frames = reference["frames"].as_array().unwrap();
    assert_eq!(ours.frames.len(), frames.len(), "frame count");
    let mut max = 0f64;
    for (f, m) in ours.frames.iter().zip(frames) {
        let m = m.as_array().unwrap();
        assert_eq!(f.len(), m.len());
        for (res, mres) in f.iter().zip(m) {
            for (atom, matom) in res.iter().zip(mres.as_array().unwrap()) {
                for (v, mv) in atom.iter().zip(matom.as_array().unwrap()) {
                    max = max.max((*v as f64 - mv.as_f64().unwrap()).abs());
                }
            }
        }
    }
    max
}

/// Reads `trajectory` with `topology`, compares with MDAnalysis reading the
/// same files and returns (ours, largest difference).
fn compare(trajectory: &Path, topology: Option<&Path>, tolerance: f64) -> Trajectory {
    let ours = read_trajectory(trajectory, topology)
        .unwrap_or_else(|e| panic!("reading {}: {e}", trajectory.display()));
    let files: Vec<&Path> = match topology {
        Some(t) => vec![t, trajectory],
        None => vec![trajectory],
    };
    let reference = mda_backbone(&files);
    let max = max_difference(&ours, &reference);
    eprintln!(
        "{} ({} frames, {} residues): max |ours - MDAnalysis| = {max:.3e} Å",
        trajectory.file_name().unwrap().to_string_lossy(),
        ours.frames.len(),
        ours.residues.len()
    );
    assert!(max <= tolerance, "max difference {max} Å > {tolerance} Å");
    ours
}

fn message(r: dig_model::Result<Trajectory>) -> String {
    match r {
        Ok(t) => panic!("expected an error, read {} frames", t.frames.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

const ADK_RESIDUES: usize = 214;

#[test]
fn dcd_with_psf_topology_matches_mdanalysis() {
    let t = compare(&data("adk_dims.dcd"), Some(&data("adk.psf")), 1e-3);
    assert_eq!(t.frames.len(), 98); // the header's NSET says 500
    assert_eq!(t.len_residues(), ADK_RESIDUES);
    assert!(
        t.sequence().starts_with("MRIILLGAPGAGKGTQAQ"),
        "{}",
        t.sequence()
    );
    assert_eq!(t.residues[0].chain, "4AKE");
}

#[test]
fn dcd_with_pdb_topology_matches_mdanalysis() {
    // adk_open.pdb has the 3341 atoms of adk.psf in the same order.
    let t = compare(&data("adk_dims.dcd"), Some(&data("adk_open.pdb")), 1e-3);
    assert_eq!((t.frames.len(), t.len_residues()), (98, ADK_RESIDUES));
    let psf = read_trajectory(&data("adk_dims.dcd"), Some(&data("adk.psf"))).unwrap();
    assert_eq!(t.frames, psf.frames);
    assert_eq!(t.sequence(), psf.sequence());
}

#[test]
fn namd_dcd_with_namd_psf_matches_mdanalysis() {
    let t = compare(
        &data("adk_gbis_tmd-fast1_NAMD.dcd"),
        Some(&data("adk_closed_NAMD.psf")),
        1e-3,
    );
    assert_eq!((t.frames.len(), t.len_residues()), (100, ADK_RESIDUES));
}

#[test]
fn xtc_with_gro_topology_matches_mdanalysis() {
    let t = compare(&data("adk_oplsaa.xtc"), Some(&data("adk_oplsaa.gro")), 1e-2);
    assert_eq!((t.frames.len(), t.len_residues()), (10, ADK_RESIDUES));
    // 47681 atoms with water: the backbone is in Å, not nm.
    let ca = t.frames[0][0][1];
    assert!(ca.iter().any(|v| v.abs() > 10.0), "{ca:?}");
}

#[test]
fn xtc_with_pdb_topology_matches_mdanalysis() {
    let t = compare(&data("adk_oplsaa.xtc"), Some(&data("adk_oplsaa.pdb")), 1e-2);
    assert_eq!((t.frames.len(), t.len_residues()), (10, ADK_RESIDUES));
    let gro = read_trajectory(&data("adk_oplsaa.xtc"), Some(&data("adk_oplsaa.gro"))).unwrap();
    assert_eq!(t.frames, gro.frames);
}

#[test]
fn single_model_pdbs_match_mdanalysis() {
    for name in ["adk_closed.pdb", "adk_open.pdb", "adk_oplsaa.pdb"] {
        let t = compare(&data(name), None, 1e-3);
        assert_eq!((t.frames.len(), t.len_residues()), (1, ADK_RESIDUES));
    }
}

#[test]
fn multi_model_pdb_matches_mdanalysis() {
    let dir = tempfile::tempdir().unwrap();
    let pdb = dir.path().join("adk_5models.pdb");
    python_json(
        r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import MDAnalysis as mda
u = mda.Universe(sys.argv[1], sys.argv[2])
with mda.Writer(sys.argv[3], multiframe=True) as w:
    for ts in u.trajectory[:5]:
        w.write(u.atoms)
print(json.dumps(True))
"#,
        &[&data("adk.psf"), &data("adk_dims.dcd"), &pdb],
    );
    let t = compare(&pdb, None, 1e-3);
    assert_eq!((t.frames.len(), t.len_residues()), (5, ADK_RESIDUES));
    // And the DCD it was written from, to PDB's 3 decimals.
    let dcd = read_trajectory(&data("adk_dims.dcd"), Some(&data("adk.psf"))).unwrap();
    let max = t
        .frames
        .iter()
        .zip(&dcd.frames)
        .flat_map(|(a, b)| a.iter().zip(b))
        .flat_map(|(a, b)| a.iter().zip(b))
        .flat_map(|(a, b)| a.iter().zip(b))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("5-model PDB vs its DCD: max difference {max:.2e} Å");
    assert!(max <= 5.1e-4, "{max}");
}

// ---------------------------------------------------------------------------
// DCD variants, written from adk_dims.dcd (little-endian, 4-byte markers,
// no unit cell).

/// The records (payloads) of a little-endian DCD with 4-byte markers, with
/// the offset of each payload.
fn dcd_records(bytes: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let n = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        out.push((pos + 4, &bytes[pos + 4..pos + 4 + n]));
        pos += n + 8;
    }
    out
}

struct Variant {
    big_endian: bool,
    wide_markers: bool,
    unit_cell: bool,
    four_dims: bool,
}

/// adk_dims.dcd rewritten in another byte order, marker width, with a unit
/// cell record and/or a fourth coordinate record per frame.
fn rewrite_dcd(src: &[u8], v: &Variant) -> Vec<u8> {
    let recs = dcd_records(src);
    let mut out = Vec::new();
    let emit = |out: &mut Vec<u8>, payload: &[u8]| {
        let n = payload.len() as u64;
        let marker = match (v.wide_markers, v.big_endian) {
            (false, false) => (n as u32).to_le_bytes().to_vec(),
            (false, true) => (n as u32).to_be_bytes().to_vec(),
            (true, false) => n.to_le_bytes().to_vec(),
            (true, true) => n.to_be_bytes().to_vec(),
        };
        out.extend_from_slice(&marker);
        out.extend_from_slice(payload);
        out.extend_from_slice(&marker);
    };
    // 4-byte words of a little-endian payload in the variant's byte order.
    let words = |p: &[u8]| -> Vec<u8> {
        p.chunks(4)
            .flat_map(|w| {
                let mut w = w.to_vec();
                if v.big_endian {
                    w.reverse();
                }
                w
            })
            .collect()
    };
    let mut header = recs[0].1.to_vec();
    header[4 + 40..4 + 44].copy_from_slice(&(v.unit_cell as i32).to_le_bytes());
    header[4 + 44..4 + 48].copy_from_slice(&(v.four_dims as i32).to_le_bytes());
    let mut h = header[..4].to_vec(); // "CORD"
    h.extend(words(&header[4..]));
    emit(&mut out, &h);
    let title = recs[1].1;
    let mut t = words(&title[..4]); // NTITLE, then the text as it is
    t.extend_from_slice(&title[4..]);
    emit(&mut out, &t);
    emit(&mut out, &words(recs[2].1));
    let natom = recs[3].1.len() / 4;
    for xyz in recs[3..].chunks(3) {
        if v.unit_cell {
            let cell: Vec<u8> = [80.0f64, 90.0, 80.5, 60.0, 60.0, 90.0]
                .iter()
                .flat_map(|c| {
                    if v.big_endian {
                        c.to_be_bytes()
                    } else {
                        c.to_le_bytes()
                    }
                })
                .collect();
            emit(&mut out, &cell);
        }
        for (_, r) in xyz {
            emit(&mut out, &words(r));
        }
        if v.four_dims {
            emit(&mut out, &words(&vec![0u8; 4 * natom]));
        }
    }
    out
}

#[test]
fn dcd_byte_order_marker_width_unit_cell_and_fourth_dimension_read_alike() {
    let src = std::fs::read(data("adk_dims.dcd")).unwrap();
    let psf = data("adk.psf");
    let plain = read_trajectory(&data("adk_dims.dcd"), Some(&psf)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for big_endian in [false, true] {
        for wide_markers in [false, true] {
            for (unit_cell, four_dims) in [(false, false), (true, false), (true, true)] {
                let v = Variant {
                    big_endian,
                    wide_markers,
                    unit_cell,
                    four_dims,
                };
                let bytes = rewrite_dcd(&src, &v);
                if !(big_endian || wide_markers || unit_cell || four_dims) {
                    assert_eq!(bytes, src, "the rewrite is the identity");
                }
                let path = dir.path().join(format!("variant{n}.dcd"));
                n += 1;
                std::fs::write(&path, &bytes).unwrap();
                let t = read_trajectory(&path, Some(&psf)).unwrap_or_else(|e| {
                    panic!("big-endian {big_endian}, 8-byte markers {wide_markers}, unit cell {unit_cell}, 4 dims {four_dims}: {e}")
                });
                assert_eq!(t.frames, plain.frames, "variant {n}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Topologies

#[test]
fn psf_ext_layout_keeps_insertion_codes() {
    // CHARMM-GUI's EXT PSF of 1A2C: residues 1H, 1G, ..., 1A, 1, 2, ...
    let path = data("1a2c_ins_code.psf");
    let atoms = read_topology(&path).unwrap();
    assert_eq!(atoms.len(), 571);
    let sel = BackboneSelection::from_atoms(&atoms, &path).unwrap();
    assert_eq!(sel.residues.len(), 36);
    let first = &sel.residues[0];
    assert_eq!(
        (
            first.chain.as_str(),
            first.number,
            first.insertion,
            first.name.as_str()
        ),
        ("PROA", 1, 'H', "THR")
    );
    assert_eq!(sel.residues[8].to_string(), "CYM 1 (chain PROA)");
    // The same backbone atoms as MDAnalysis selects (which merges the
    // residues that differ only by insertion code, so compare atoms).
    let reference = python_json(
        r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import MDAnalysis as mda
u = mda.Universe(sys.argv[1])
print(json.dumps(u.select_atoms("name N CA C").indices.tolist()))
"#,
        &[&path],
    );
    let ours: Vec<u64> = sel.atoms.iter().flatten().map(|&i| i as u64).collect();
    let theirs: Vec<u64> = reference
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn psf_space_separated_namd_layout_reads_like_the_standard_one() {
    let psf = data("adk.psf");
    let text = std::fs::read_to_string(&psf).unwrap();
    // Flag it NAMD and squeeze the atom lines to single blanks.
    let mut out = String::new();
    let mut in_atoms = 0usize;
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            out.push_str("PSF NAMD\n");
            continue;
        }
        if in_atoms > 0 {
            out.push_str(&line.split_whitespace().collect::<Vec<_>>().join(" "));
            in_atoms -= 1;
        } else {
            if line.contains("!NATOM") {
                in_atoms = line.split_whitespace().next().unwrap().parse().unwrap();
            }
            out.push_str(line);
        }
        out.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let namd = dir.path().join("adk_namd.psf");
    std::fs::write(&namd, out).unwrap();
    let a = read_topology(&psf).unwrap();
    let b = read_topology(&namd).unwrap();
    assert_eq!(a.len(), 3341);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.residue, &x.name), (&y.residue, &y.name));
    }
}

#[test]
fn gro_topology_names_the_atoms_of_the_xtc() {
    let atoms = read_topology(&data("adk_oplsaa.gro")).unwrap();
    assert_eq!(atoms.len(), 47681);
    assert_eq!(
        (atoms[0].residue.name.as_str(), atoms[0].name.as_str()),
        ("MET", "N")
    );
    let last = atoms.last().unwrap();
    assert_eq!(
        (
            last.residue.number,
            last.residue.name.as_str(),
            last.name.as_str()
        ),
        (11302, "NA+", "NA")
    );
}

// ---------------------------------------------------------------------------
// Bad input

#[test]
fn atom_count_mismatch_names_both_files() {
    let msg = message(read_trajectory(
        &data("adk_dims.dcd"),
        Some(&data("adk_oplsaa.gro")),
    ));
    assert_mentions(
        &msg,
        &[
            "adk_dims.dcd has 3341 atoms per frame",
            "adk_oplsaa.gro has 47681",
        ],
    );
    let msg = message(read_trajectory(
        &data("adk_oplsaa.xtc"),
        Some(&data("adk.psf")),
    ));
    assert_mentions(
        &msg,
        &[
            "adk_oplsaa.xtc has 47681 atoms per frame",
            "adk.psf has 3341",
        ],
    );
}

#[test]
fn pdb_missing_a_ca_names_the_residue_and_the_atom() {
    let text = std::fs::read_to_string(data("adk_open.pdb")).unwrap();
    let mut removed = None;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let drop = removed.is_none()
                && l.starts_with("ATOM")
                && l[12..16].trim() == "CA"
                && l[22..26].trim() == "10";
            if drop {
                removed = Some(l.to_string());
            }
            !drop
        })
        .collect();
    let removed = removed.expect("adk_open.pdb has a CA in residue 10");
    assert_eq!(&removed[17..20], "GLY");
    let dir = tempfile::tempdir().unwrap();
    let pdb = dir.path().join("no_ca.pdb");
    std::fs::write(&pdb, kept.join("\n")).unwrap();
    let msg = message(read_trajectory(&pdb, None));
    assert_mentions(&msg, &["no_ca.pdb", "residue GLY 10", "no CA atom"]);
    // As a topology too, before any atom counting.
    let msg = message(read_trajectory(&data("adk_dims.dcd"), Some(&pdb)));
    assert_mentions(&msg, &["no_ca.pdb", "residue GLY 10", "no CA atom"]);
}

#[test]
fn non_finite_dcd_coordinate_names_frame_residue_and_atom() {
    let src = std::fs::read(data("adk_dims.dcd")).unwrap();
    let reference = mda_backbone(&[&data("adk.psf"), &data("adk_dims.dcd")]);
    // CA of the 7th residue, Y, frame 5.
    let ca = reference["indices"][6][1].as_u64().unwrap() as usize;
    let recs = dcd_records(&src);
    let (y_record, _) = recs[3 + 3 * 4 + 1];
    let mut bytes = src.clone();
    bytes[y_record + 4 * ca..y_record + 4 * ca + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.dcd");
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_trajectory(&path, Some(&data("adk.psf"))));
    assert_mentions(
        &msg,
        &["nan.dcd", "frame 5 ", "atom CA of residue GLY 7", "NaN"],
    );
}

#[test]
fn non_finite_pdb_coordinate_names_frame_residue_and_atom() {
    let text = std::fs::read_to_string(data("adk_closed.pdb")).unwrap();
    let mut done = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if !done && l.starts_with("ATOM") && l[12..16].trim() == "C" && l[22..26].trim() == "3"
            {
                done = true;
                format!("{}{:>8}{}", &l[..30], "inf", &l[38..])
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(done);
    let dir = tempfile::tempdir().unwrap();
    let pdb = dir.path().join("inf.pdb");
    std::fs::write(&pdb, lines.join("\n")).unwrap();
    let msg = message(read_trajectory(&pdb, None));
    assert_mentions(&msg, &["inf.pdb", "frame 1 ", "atom C of residue ILE 3"]);
}

#[test]
fn truncated_dcd_names_the_incomplete_frame() {
    let src = std::fs::read(data("adk_dims.dcd")).unwrap();
    let recs = dcd_records(&src);
    // Cut in the middle of the Z record of frame 50.
    let (z, payload) = recs[3 + 3 * 49 + 2];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.dcd");
    std::fs::write(&path, &src[..z + payload.len() / 2]).unwrap();
    let msg = message(read_trajectory(&path, Some(&data("adk.psf"))));
    assert_mentions(
        &msg,
        &["cut.dcd", "truncated", "frame 50 (its Z coordinates)"],
    );
    // Cut inside the header.
    std::fs::write(&path, &src[..200]).unwrap();
    let msg = message(read_trajectory(&path, Some(&data("adk.psf"))));
    assert_mentions(&msg, &["cut.dcd", "truncated", "title block"]);
    // An empty file.
    let msg = message(read_trajectory(&data("empty.dcd"), Some(&data("adk.psf"))));
    assert_mentions(&msg, &["empty.dcd", "too short for a DCD file"]);
}

#[test]
fn dcd_with_fixed_atoms_is_unsupported() {
    let mut bytes = std::fs::read(data("adk_dims.dcd")).unwrap();
    // NAMNF is ICNTRL[8]: marker, "CORD", 8 integers.
    bytes[4 + 4 + 32..4 + 4 + 36].copy_from_slice(&12i32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixed.dcd");
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_trajectory(&path, Some(&data("adk.psf"))));
    assert_mentions(&msg, &["fixed.dcd", "12 fixed atoms", "not supported"]);
}

fn xtc_offsets() -> Vec<usize> {
    let v = python_json(
        r#"
import json, sys
from MDAnalysis.lib.formats.libmdaxdr import XTCFile
print(json.dumps(XTCFile(sys.argv[1]).offsets.tolist()))
"#,
        &[&data("adk_oplsaa.xtc")],
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn truncated_or_corrupt_xtc_names_the_frame() {
    let src = std::fs::read(data("adk_oplsaa.xtc")).unwrap();
    let offsets = xtc_offsets();
    assert_eq!(offsets.len(), 10);
    let gro = data("adk_oplsaa.gro");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.xtc");
    // Inside the compressed coordinates of frame 4, and inside its header.
    for cut in [offsets[3] + 5000, offsets[3] + 30] {
        std::fs::write(&path, &src[..cut]).unwrap();
        let msg = message(read_trajectory(&path, Some(&gro)));
        assert_mentions(
            &msg,
            &["cut.xtc", "frame 4", "truncated", "3 complete frames"],
        );
    }
    // A frame whose magic number is wrong.
    let mut bytes = src.clone();
    bytes[offsets[6]..offsets[6] + 4].copy_from_slice(&7i32.to_be_bytes());
    let path = dir.path().join("bad_magic.xtc");
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_trajectory(&path, Some(&gro)));
    assert_mentions(&msg, &["bad_magic.xtc", "frame 7", "magic number 7"]);
    // A byte count beyond the end of the file (molly would allocate it).
    let mut bytes = src.clone();
    bytes[offsets[2] + 88..offsets[2] + 92].copy_from_slice(&u32::MAX.to_be_bytes());
    let path = dir.path().join("bad_size.xtc");
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_trajectory(&path, Some(&gro)));
    assert_mentions(&msg, &["bad_size.xtc", "frame 3", "truncated"]);
    // A size index (smallidx) out of range.
    let mut bytes = src.clone();
    bytes[offsets[4] + 84..offsets[4] + 88].copy_from_slice(&0u32.to_be_bytes());
    let path = dir.path().join("bad_smallidx.xtc");
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_trajectory(&path, Some(&gro)));
    assert_mentions(&msg, &["bad_smallidx.xtc", "frame 5", "corrupt"]);
    // Damaged compressed bytes: molly's decoder asserts on these (its panic
    // message shows in the test output); it is an error naming the frame,
    // not a crash. (Other damage can decode to wrong coordinates: XTC has
    // no checksum.)
    let mut bytes = src.clone();
    bytes[offsets[4] + 95..offsets[4] + 99].copy_from_slice(&[0; 4]);
    let path = dir.path().join("bad_bits.xtc");
    std::fs::write(&path, &bytes).unwrap();
    if let Err(e) = read_trajectory(&path, Some(&gro)) {
        assert_mentions(&e.to_string(), &["bad_bits.xtc", "frame 5"]);
    }
}

#[test]
fn dcd_and_xtc_need_a_topology() {
    for name in ["adk_dims.dcd", "adk_oplsaa.xtc"] {
        let msg = message(read_trajectory(&data(name), None));
        assert_mentions(&msg, &[name, "needs a topology"]);
    }
}

#[test]
fn unknown_topology_and_trajectory_formats_are_named() {
    let msg = message(read_trajectory(
        &data("adk_dims.dcd"),
        Some(&data("adk_oplsaa.tpr")),
    ));
    assert_mentions(&msg, &["adk_oplsaa.tpr", "unknown topology format"]);
    let msg = message(read_trajectory(
        &data("adk_oplsaa.trr"),
        Some(&data("adk_oplsaa.gro")),
    ));
    assert_mentions(&msg, &["adk_oplsaa.trr", "unknown trajectory format"]);
}

#[test]
fn truncated_topologies_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data("adk.psf")).unwrap();
    let psf = dir.path().join("cut.psf");
    std::fs::write(&psf, text.lines().take(1000).collect::<Vec<_>>().join("\n")).unwrap();
    let msg = message(read_trajectory(&data("adk_dims.dcd"), Some(&psf)));
    assert_mentions(&msg, &["cut.psf", "ends after 993 of its 3341 atoms"]);
    let text = std::fs::read_to_string(data("adk_oplsaa.gro")).unwrap();
    let gro = dir.path().join("cut.gro");
    std::fs::write(&gro, text.lines().take(1002).collect::<Vec<_>>().join("\n")).unwrap();
    let msg = message(read_trajectory(&data("adk_oplsaa.xtc"), Some(&gro)));
    assert_mentions(&msg, &["cut.gro", "ends after 1000 of its 47681 atoms"]);
}
