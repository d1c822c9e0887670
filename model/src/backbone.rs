//! Backbones (N, CA, C per residue) from structure files: multi-model PDB,
//! DCD with a PSF or PDB topology, XTC with a PDB or GRO topology.
//!
//! A residue is a protein residue when its atoms include any of N, CA, C;
//! it must then have all three (water, ions and ligands have none and are
//! skipped). Every error names the file and what is wrong with it.

use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// Backbone atoms of one structure: `[N, CA, C]` per residue, Å.
pub type Backbone = Vec<[[f32; 3]; 3]>;

/// One residue of the topology.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResidueId {
    pub chain: String,
    pub number: i64,
    pub insertion: char,
    pub name: String,
}

impl std::fmt::Display for ResidueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.number)?;
        if self.insertion != ' ' {
            write!(f, "{}", self.insertion)?;
        }
        if !self.chain.trim().is_empty() {
            write!(f, " (chain {})", self.chain.trim())?;
        }
        Ok(())
    }
}

/// Frames of one trajectory over one set of residues.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub residues: Vec<ResidueId>,
    pub frames: Vec<Backbone>,
}

impl Trajectory {
    pub fn len_residues(&self) -> usize {
        self.residues.len()
    }

    /// One-letter sequence of the residues (`X` for non-standard names).
    pub fn sequence(&self) -> String {
        self.residues.iter().map(|r| one_letter(&r.name)).collect()
    }

    /// Every coordinate of every frame must be finite; the error names the
    /// first frame (counted from 1), residue and atom that is not.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        for (f, frame) in self.frames.iter().enumerate() {
            for (i, res) in frame.iter().enumerate() {
                for (atom, xyz) in ["N", "CA", "C"].iter().zip(res) {
                    if xyz.iter().any(|v| !v.is_finite()) {
                        return Err(ModelError::format(
                            path,
                            format!(
                                "frame {} has a non-finite coordinate ({:?}) at atom {atom} of residue {}",
                                f + 1,
                                xyz,
                                self.residues[i]
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One-letter code of a three-letter residue name (`X` if not standard).
pub fn one_letter(name: &str) -> char {
    match name.trim().to_ascii_uppercase().as_str() {
        "ALA" => 'A',
        "ARG" => 'R',
        "ASN" => 'N',
        "ASP" => 'D',
        "CYS" | "CYX" => 'C',
        "GLN" => 'Q',
        "GLU" => 'E',
        "GLY" => 'G',
        "HIS" | "HSD" | "HSE" | "HSP" | "HID" | "HIE" | "HIP" => 'H',
        "ILE" => 'I',
        "LEU" => 'L',
        "LYS" => 'K',
        "MET" | "MSE" => 'M',
        "PHE" => 'F',
        "PRO" => 'P',
        "SER" => 'S',
        "THR" => 'T',
        "TRP" => 'W',
        "TYR" => 'Y',
        "VAL" => 'V',
        _ => 'X',
    }
}

/// An atom of a topology: its residue and name, in file order.
#[derive(Debug, Clone)]
pub struct TopologyAtom {
    pub residue: ResidueId,
    pub name: String,
}

/// Which atoms of a topology are the backbone: per residue the atom indices
/// of N, CA, C.
#[derive(Debug, Clone)]
pub struct BackboneSelection {
    pub residues: Vec<ResidueId>,
    pub atoms: Vec<[usize; 3]>,
    /// Number of atoms in the topology.
    pub n_atoms: usize,
}

impl BackboneSelection {
    /// Picks N, CA, C of every residue that has any of them (first
    /// occurrence of each name wins, as for alternate locations). A residue
    /// is a run of consecutive atoms with the same [`ResidueId`]: two chains
    /// numbered alike without chain ids, or residue numbers that wrap (GRO
    /// past 99999), stay apart.
    pub fn from_atoms(atoms: &[TopologyAtom], path: &Path) -> Result<Self> {
        // (first atom of the residue, indices of N, CA, C)
        let mut runs: Vec<(usize, [Option<usize>; 3])> = Vec::new();
        for (i, a) in atoms.iter().enumerate() {
            if runs
                .last()
                .is_none_or(|&(first, _)| atoms[first].residue != a.residue)
            {
                runs.push((i, [None; 3]));
            }
            let k = match a.name.trim() {
                "N" => 0,
                "CA" => 1,
                "C" => 2,
                _ => continue,
            };
            let slot = &mut runs.last_mut().expect("pushed above").1[k];
            if slot.is_none() {
                *slot = Some(i);
            }
        }
        let mut order = Vec::new();
        let mut sel = Vec::new();
        for (first, s) in runs {
            if s.iter().all(Option::is_none) {
                continue; // water, ions, ligands
            }
            let r = &atoms[first].residue;
            let mut idx = [0usize; 3];
            for (k, name) in ["N", "CA", "C"].iter().enumerate() {
                idx[k] = s[k].ok_or_else(|| {
                    ModelError::format(
                        path,
                        format!("residue {r} has no {name} atom (every protein residue needs N, CA and C)"),
                    )
                })?;
            }
            order.push(r.clone());
            sel.push(idx);
        }
        if sel.is_empty() {
            return Err(ModelError::format(
                path,
                "no protein backbone atoms (N, CA, C) found",
            ));
        }
        Ok(BackboneSelection {
            residues: order,
            atoms: sel,
            n_atoms: atoms.len(),
        })
    }

    /// Backbone of one frame from all atom coordinates `xyz (n_atoms)`, Å.
    pub fn pick(&self, xyz: &[[f32; 3]]) -> Backbone {
        self.atoms
            .iter()
            .map(|idx| [xyz[idx[0]], xyz[idx[1]], xyz[idx[2]]])
            .collect()
    }
}

/// A parsed PDB file: the atoms of each model with their coordinates.
struct PdbModels {
    atoms: Vec<TopologyAtom>,
    frames: Vec<Vec<[f32; 3]>>,
}

fn pdb_field(line: &str, a: usize, b: usize) -> &str {
    line.get(a..b.min(line.len())).unwrap_or("")
}

/// A 4-character hybrid-36 residue number (past 9999): `A000` is 10000,
/// `a000` follows `ZZZZ`.
fn hybrid36(s: &str) -> Option<i64> {
    let first = s.chars().next()?;
    if s.len() != 4 || !s.chars().all(|c| c.is_ascii_alphanumeric()) || first.is_ascii_digit() {
        return None;
    }
    let v = i64::from_str_radix(s, 36).ok()? - 10 * 36i64.pow(3) + 10_000;
    Some(if first.is_ascii_lowercase() {
        v + 26 * 36i64.pow(3)
    } else {
        v
    })
}

fn parse_pdb(path: &Path) -> Result<PdbModels> {
    let text = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    parse_pdb_bytes(&text, path)
}

/// [`parse_pdb`] of bytes already read; `path` names them in errors.
fn parse_pdb_bytes(text: &[u8], path: &Path) -> Result<PdbModels> {
    let text = String::from_utf8_lossy(text);
    let mut models: Vec<(Vec<TopologyAtom>, Vec<[f32; 3]>)> = Vec::new();
    let mut cur: (Vec<TopologyAtom>, Vec<[f32; 3]>) = (Vec::new(), Vec::new());
    let mut in_model = false;
    for (ln, line) in text.lines().enumerate() {
        let rec = pdb_field(line, 0, 6);
        if rec.starts_with("MODEL") {
            if !cur.0.is_empty() {
                models.push(std::mem::take(&mut cur));
            }
            in_model = true;
        } else if rec.starts_with("ENDMDL") {
            models.push(std::mem::take(&mut cur));
            in_model = false;
        } else if rec == "ATOM  " || rec == "HETATM" {
            let bad =
                |what: &str| ModelError::format(path, format!("line {}: {what}: {line:?}", ln + 1));
            if line.len() < 54 {
                return Err(bad("ATOM record shorter than 54 columns"));
            }
            let alt = pdb_field(line, 16, 17);
            if !(alt.trim().is_empty() || alt == "A" || alt == "1") {
                continue; // other alternate locations
            }
            let num = |a, b| {
                pdb_field(line, a, b)
                    .trim()
                    .parse::<f32>()
                    .map_err(|_| bad("unreadable coordinate"))
            };
            let xyz = [num(30, 38)?, num(38, 46)?, num(46, 54)?];
            let number = pdb_field(line, 22, 26).trim();
            let number = number
                .parse::<i64>()
                .ok()
                .or_else(|| hybrid36(number))
                .ok_or_else(|| bad("unreadable residue number"))?;
            cur.0.push(TopologyAtom {
                residue: ResidueId {
                    chain: pdb_field(line, 21, 22).to_string(),
                    number,
                    insertion: pdb_field(line, 26, 27).chars().next().unwrap_or(' '),
                    name: pdb_field(line, 17, 20).trim().to_string(),
                },
                name: pdb_field(line, 12, 16).trim().to_string(),
            });
            cur.1.push(xyz);
        } else if rec.starts_with("END") && !rec.starts_with("ENDMDL") && !in_model {
            break;
        }
    }
    if !cur.0.is_empty() {
        models.push(cur);
    }
    if models.is_empty() {
        return Err(ModelError::format(path, "no ATOM records: not a PDB file?"));
    }
    let atoms = models[0].0.clone();
    let mut frames = Vec::with_capacity(models.len());
    for (m, (a, xyz)) in models.into_iter().enumerate() {
        if a.len() != atoms.len() {
            return Err(ModelError::format(
                path,
                format!(
                    "model {} has {} atoms but model 1 has {}",
                    m + 1,
                    a.len(),
                    atoms.len()
                ),
            ));
        }
        frames.push(xyz);
    }
    Ok(PdbModels { atoms, frames })
}

/// Reads the topology of a PDB file (its first model).
pub fn pdb_topology(path: &Path) -> Result<(Vec<TopologyAtom>, Vec<[f32; 3]>)> {
    let mut m = parse_pdb(path)?;
    Ok((m.atoms, m.frames.swap_remove(0)))
}

/// Every model of a PDB file (one frame if it has no MODEL records).
pub fn read_pdb(path: &Path) -> Result<Trajectory> {
    pdb_trajectory(parse_pdb(path)?, path)
}

/// [`read_pdb`] of a PDB file's bytes (an upload); `name` names it in errors.
pub fn read_pdb_bytes(bytes: &[u8], name: &Path) -> Result<Trajectory> {
    pdb_trajectory(parse_pdb_bytes(bytes, name)?, name)
}

fn pdb_trajectory(m: PdbModels, path: &Path) -> Result<Trajectory> {
    let sel = BackboneSelection::from_atoms(&m.atoms, path)?;
    let t = Trajectory {
        residues: sel.residues.clone(),
        frames: m.frames.iter().map(|xyz| sel.pick(xyz)).collect(),
    };
    t.check_finite(path)?;
    Ok(t)
}

/// The kinds of trajectory file we read, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pdb,
    Dcd,
    Xtc,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("pdb") | Some("ent") => Ok(Format::Pdb),
            Some("dcd") => Ok(Format::Dcd),
            Some("xtc") => Ok(Format::Xtc),
            _ => Err(ModelError::format(
                path,
                "unknown trajectory format (expected .pdb, .dcd or .xtc)",
            )),
        }
    }
}

/// Reads backbone frames from `trajectory`, with `topology` (PSF, PDB or
/// GRO, atom for atom) for DCD and XTC. A PDB trajectory needs no topology.
pub fn read_trajectory(trajectory: &Path, topology: Option<&Path>) -> Result<Trajectory> {
    match Format::of(trajectory)? {
        Format::Pdb => read_pdb(trajectory),
        Format::Dcd | Format::Xtc => {
            let Some(top) = topology else {
                return Err(ModelError::format(
                    trajectory,
                    "a DCD or XTC trajectory needs a topology (PSF, PDB or GRO) naming its atoms",
                ));
            };
            crate::trajfile::read_with_topology(trajectory, top)
        }
    }
}

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The frames `(tr (N*L*3), rot (N*L*9))` of every structure in a PDB, DCD
/// or XTC file (each centred on its mean CA, as in training), checked
/// against the protein length `len`; `N` is the number of structures. The
/// errors name the file, and the structure and residue at fault.
pub fn read_poses(
    path: &Path,
    topology: Option<&Path>,
    len: usize,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    poses_of(&read_trajectory(path, topology)?, path, len)
}

/// The frames of `traj` as [`read_poses`] returns them, checked against
/// `len` residues; `path` names the structures in errors.
pub fn poses_of(traj: &Trajectory, path: &Path, len: usize) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    if traj.len_residues() != len {
        return Err(ModelError::Invalid(format!(
            "{}: {} residues per structure, but the protein (its features) has {len}",
            path.display(),
            traj.len_residues()
        )));
    }
    if traj.frames.is_empty() {
        return Err(ModelError::format(path, "no structures in the file"));
    }
    let (mut tr, mut rot) = (Vec::new(), Vec::new());
    for (k, f) in traj.frames.iter().enumerate() {
        let atoms: Vec<[[f64; 3]; 3]> = f.iter().map(|r| r.map(|a| a.map(f64::from))).collect();
        let (t, r) = crate::training::frames(&atoms)
            .map_err(|m| ModelError::format(path, format!("structure {}: {m}", k + 1)))?;
        tr.extend(t);
        rot.extend(r);
    }
    Ok((tr, rot, traj.frames.len()))
}
