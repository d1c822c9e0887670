//! Structure output of the sampler: an [`Ensemble`] holds the sampled rigid
//! frames (translation `T` in Å and rotation `R` per residue) of one protein,
//! turns them into backbone atoms (N, CA, C, and the carbonyl O placed from
//! ideal peptide geometry, see [`Ensemble::backbone_with_oxygen`]), and
//! writes them as an npz that numpy reads (`tr`, `rot_mat`, `sample_index`),
//! as a multi-model PDB that analysis tools such as MDTraj read, and as an
//! XTC trajectory with a topology PDB ([`crate::xtc`]). File writes are
//! atomic: a crash leaves either the previous file or the finished new one,
//! never a partial file under the final name.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Kind, Tensor};

use crate::{ModelError, Result};

/// Position of N in the residue's local frame (Å), as in the published code.
const N_REF: [f64; 3] = [1.45597958, 0.0, 0.0];
/// Position of C in the residue's local frame (Å), as in the published code.
const C_REF: [f64; 3] = [-0.533655602, 1.42752619, 0.0];

/// C=O bond length (Å).
pub const C_O_BOND: f64 = 1.23;
/// The CA-C-O angle (degrees) of the ideal peptide: AlphaFold's and
/// OpenFold's `residue_constants.rigid_group_atom_positions` put O at
/// (0.627, 1.062, 0) Å in the psi frame (x along CA->C), 1.233 Å from C at
/// 120.56° from C->CA (Engh & Huber 1991 geometry).
pub const CA_C_O_ANGLE_DEG: f64 = 120.5;
/// The psi the last residue's O is placed with (it has no next N): 180°, so
/// N-CA-C-O = 0° and O lies in the residue's N-CA-C plane on N's side, the
/// plane and side where BioEmu's `_adjust_oxygen_pos`
/// (`bioemu/convert_chemgraph.py`) puts the C-terminal O.
pub const TERMINAL_PSI_DEG: f64 = 180.0;

/// The PDB format numbers residues and models with four digits.
const PDB_MAX_RESIDUES: usize = 9999;
const PDB_MAX_MODELS: usize = 9999;
/// Every PDB record is padded to this many columns.
const PDB_RECORD_WIDTH: usize = 80;

/// Per-sample results of steered sampling (`sampling::steering`): the
/// returned structure's potential energy `U(x)` (kT) and its group's
/// `log Z_hat`. Stored in the npz as `steer_energy` and `steer_log_z`
/// (N,) float64.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SteerRecord {
    pub energy: Vec<f64>,
    pub log_z: Vec<f64>,
}

/// Per-sample log-densities under the model (`sampling::flow`): stored in
/// the npz as `log_density` and `log_density_std_error` (N,) float64 (the
/// density of the structure at `t = 1/n_time_step`, Lebesgue on
/// translations x Haar of mass 1 on rotations; the error is Hutchinson's,
/// 0 for the exact divergence).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DensityRecord {
    pub log_density: Vec<f64>,
    pub std_error: Vec<f64>,
}

/// A set of sampled structures of one protein, CPU float32, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ensemble {
    /// One-letter amino-acid codes, one per residue (length L).
    pub sequence: String,
    /// Which sample of the run each structure is, (N,). Kept because a shard
    /// of a larger run holds samples that do not start at 0.
    pub sample_index: Vec<i64>,
    /// Translations, (N, L, 3), Å.
    pub tr: Vec<f32>,
    /// Rotation matrices, (N, L, 3, 3).
    pub rot_mat: Vec<f32>,
    /// Steered samples' energies and log normalising estimates (N each).
    pub steer: Option<SteerRecord>,
    /// Each sample's log-density, when asked for.
    pub log_density: Option<DensityRecord>,
}

impl Ensemble {
    /// Number of residues L.
    pub fn len_residues(&self) -> usize {
        self.sequence.chars().count()
    }

    /// Number of structures N.
    pub fn num_samples(&self) -> usize {
        self.sample_index.len()
    }

    /// Backbone atoms `[N, CA, C]` per residue of structure `sample` (Å):
    /// `CA = T`, `N = R^T n_ref + T`, `C = R^T c_ref + T`.
    ///
    /// # Panics
    /// If `sample >= num_samples()` or the arrays are shorter than the
    /// sequence and sample count say.
    pub fn backbone(&self, sample: usize) -> Vec<[[f32; 3]; 3]> {
        let l = self.len_residues();
        assert!(
            sample < self.num_samples(),
            "sample {sample} out of range: the ensemble has {} samples",
            self.num_samples()
        );
        let tr = &self.tr[sample * l * 3..(sample + 1) * l * 3];
        let rot = &self.rot_mat[sample * l * 9..(sample + 1) * l * 9];
        tr.chunks_exact(3)
            .zip(rot.chunks_exact(9))
            .map(|(t, r)| {
                // (R^T v)_k = sum_j R[j][k] v[j]. Summed in f64 so that the
                // only rounding is the final one to f32.
                let place = |v: [f64; 3]| -> [f32; 3] {
                    std::array::from_fn(|k| {
                        let rotated: f64 = (0..3).map(|j| f64::from(r[j * 3 + k]) * v[j]).sum();
                        (f64::from(t[k]) + rotated) as f32
                    })
                };
                [place(N_REF), [t[0], t[1], t[2]], place(C_REF)]
            })
            .collect()
    }

    /// Backbone atoms `[N, CA, C, O]` per residue of structure `sample` (Å):
    /// N, CA and C of [`Ensemble::backbone`], and the carbonyl O of
    /// [`carbonyl_oxygen`] (from the next residue's N, or the ideal
    /// [`TERMINAL_PSI_DEG`] for the last residue). Every structure writer
    /// (PDB, XTC, topology) writes these atoms in this order.
    ///
    /// # Panics
    /// As [`Ensemble::backbone`].
    pub fn backbone_with_oxygen(&self, sample: usize) -> Vec<[[f32; 3]; 4]> {
        let bb = self.backbone(sample);
        bb.iter()
            .enumerate()
            .map(|(i, &[n, ca, c])| {
                let next_n = bb.get(i + 1).map(|next| next[0]);
                [n, ca, c, carbonyl_oxygen(n, ca, c, next_n)]
            })
            .collect()
    }

    /// Physical validity of every sample ([`crate::evaluate::validity`] of
    /// its N, CA, C backbone), in sample order.
    pub fn validity(&self) -> Vec<crate::evaluate::Validity> {
        (0..self.num_samples())
            .map(|i| crate::evaluate::validity(&self.backbone(i)))
            .collect()
    }

    /// The samples whose sample index `indices` lists (ascending, as a
    /// manifest's `kept`), in this ensemble's order.
    pub fn select_indices(&self, indices: &[u64]) -> Ensemble {
        let l = self.len_residues();
        let pos: Vec<usize> = (0..self.num_samples())
            .filter(|&p| {
                u64::try_from(self.sample_index[p]).is_ok_and(|i| indices.binary_search(&i).is_ok())
            })
            .collect();
        Ensemble {
            sequence: self.sequence.clone(),
            sample_index: pos.iter().map(|&p| self.sample_index[p]).collect(),
            tr: pos
                .iter()
                .flat_map(|&p| self.tr[p * l * 3..(p + 1) * l * 3].iter().copied())
                .collect(),
            rot_mat: pos
                .iter()
                .flat_map(|&p| self.rot_mat[p * l * 9..(p + 1) * l * 9].iter().copied())
                .collect(),
            steer: self.steer.as_ref().map(|s| SteerRecord {
                energy: pos.iter().map(|&p| s.energy[p]).collect(),
                log_z: pos.iter().map(|&p| s.log_z[p]).collect(),
            }),
            log_density: self.log_density.as_ref().map(|d| DensityRecord {
                log_density: pos.iter().map(|&p| d.log_density[p]).collect(),
                std_error: pos.iter().map(|&p| d.std_error[p]).collect(),
            }),
        }
    }

    /// Appends `other`'s samples (of the same protein) after this one's.
    pub fn append(&mut self, other: Ensemble) {
        match (&mut self.steer, other.steer) {
            (Some(a), Some(b)) => {
                a.energy.extend(b.energy);
                a.log_z.extend(b.log_z);
            }
            (None, None) => {}
            (a, _) => {
                // Mixed: keep the steering record only when every part has one.
                *a = None;
            }
        }
        match (&mut self.log_density, other.log_density) {
            (Some(a), Some(b)) => {
                a.log_density.extend(b.log_density);
                a.std_error.extend(b.std_error);
            }
            (None, None) => {}
            (a, _) => *a = None,
        }
        self.sample_index.extend(other.sample_index);
        self.tr.extend(other.tr);
        self.rot_mat.extend(other.rot_mat);
    }

    /// Writes `tr` (N,L,3) f32, `rot_mat` (N,L,3,3) f32, `sample_index`
    /// (N,) i64 and each sample's physical validity (`valid` (N,) bool and
    /// the measured `ca_ca_max`, `c_n_max`, `clash_min` (N,) f32, Å) as an
    /// npz that `numpy.load` reads. Atomic: see the module doc.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        self.check_shapes().map_err(ModelError::Invalid)?;
        let validity = self.validity();
        write_atomically(path, |tmp| self.write_npz_to(File::create(tmp)?, &validity))
    }

    /// The same `.npz` as [`Ensemble::write_npz`], in memory (for object stores).
    pub fn npz_bytes(&self) -> Result<Vec<u8>> {
        self.npz_bytes_with(&self.validity())
    }

    /// [`Ensemble::npz_bytes`] with the samples' validity already measured
    /// ([`Ensemble::validity`]), for a caller that needs it too.
    pub fn npz_bytes_with(&self, validity: &[crate::evaluate::Validity]) -> Result<Vec<u8>> {
        self.check_shapes().map_err(ModelError::Invalid)?;
        if validity.len() != self.num_samples() {
            return Err(ModelError::Invalid(format!(
                "{} validity records for {} samples",
                validity.len(),
                self.num_samples()
            )));
        }
        let mut buf = io::Cursor::new(Vec::new());
        self.write_npz_to(&mut buf, validity)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        Ok(buf.into_inner())
    }

    /// Writes the `.npz` to any seekable writer. Written by hand rather than
    /// with tch's writer so that the zip carries a fixed timestamp: the same
    /// samples give the same bytes, which is what lets a re-run shard
    /// overwrite itself harmlessly and lets users compare runs by checksum.
    fn write_npz_to<W: Write + io::Seek>(
        &self,
        w: W,
        validity: &[crate::evaluate::Validity],
    ) -> io::Result<()> {
        let (n, l) = (self.num_samples() as i64, self.len_residues() as i64);
        let mut zip = zip::ZipWriter::new(w);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .large_file(self.tr.len() as u64 * 12 > u32::MAX as u64);
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // Physical validity per sample (evaluate.rs), from the coordinates
        // alone, so the same samples still give the same bytes.
        let measured = |f: fn(&crate::evaluate::Validity) -> f64| {
            f32s(&validity.iter().map(|v| f(v) as f32).collect::<Vec<_>>())
        };
        let members: [(&str, &str, Vec<i64>, Vec<u8>); 7] = [
            ("tr", "<f4", vec![n, l, 3], f32s(&self.tr)),
            ("rot_mat", "<f4", vec![n, l, 3, 3], f32s(&self.rot_mat)),
            (
                "sample_index",
                "<i8",
                vec![n],
                self.sample_index
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            (
                "valid",
                "|b1",
                vec![n],
                validity.iter().map(|v| u8::from(v.valid)).collect(),
            ),
            ("ca_ca_max", "<f4", vec![n], measured(|v| v.ca_ca_max)),
            ("c_n_max", "<f4", vec![n], measured(|v| v.c_n_max)),
            ("clash_min", "<f4", vec![n], measured(|v| v.clash_min)),
        ];
        let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let steer: Vec<(&str, &str, Vec<i64>, Vec<u8>)> = match &self.steer {
            Some(s) => vec![
                ("steer_energy", "<f8", vec![n], f64s(&s.energy)),
                ("steer_log_z", "<f8", vec![n], f64s(&s.log_z)),
            ],
            None => Vec::new(),
        };
        let density: Vec<(&str, &str, Vec<i64>, Vec<u8>)> = match &self.log_density {
            Some(d) => vec![
                ("log_density", "<f8", vec![n], f64s(&d.log_density)),
                ("log_density_std_error", "<f8", vec![n], f64s(&d.std_error)),
            ],
            None => Vec::new(),
        };
        for (name, descr, shape, data) in members.into_iter().chain(steer).chain(density) {
            zip.start_file(format!("{name}.npy"), opts)
                .map_err(io::Error::other)?;
            zip.write_all(&npy_header(descr, &shape))?;
            zip.write_all(&data)?;
        }
        zip.finish().map_err(io::Error::other)?;
        Ok(())
    }

    /// Reads an npz written by [`Ensemble::write_npz`]. The file does not
    /// store the sequence, so the caller supplies the one the ensemble was
    /// sampled for; its length must match the file's L.
    ///
    /// Also reads the published sampler's single state (`tr` (L,3), `rot_mat`
    /// (L,3,3), no `sample_index`) as one sample with index 0; a missing
    /// `sample_index` means `0..N`.
    pub fn read_npz(path: &Path, sequence: impl Into<String>) -> Result<Ensemble> {
        let sequence = sequence.into();
        let bad = |message: String| ModelError::format(path, message);
        // Reported separately so that a wrong path reads as such, not as a
        // malformed file.
        fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        let entries =
            Tensor::read_npz(path).map_err(|e| bad(format!("not a readable npz file: {e}")))?;
        let entry = |name: &str| entries.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let expected = "expected tr (N,L,3) float32, rot_mat (N,L,3,3) float32 and \
                        optionally sample_index (N,) int64";

        let tr = entry("tr").ok_or_else(|| bad(format!("no `tr` entry; {expected}")))?;
        let rot_mat =
            entry("rot_mat").ok_or_else(|| bad(format!("no `rot_mat` entry; {expected}")))?;
        for (name, t) in [("tr", tr), ("rot_mat", rot_mat)] {
            // Checked because the conversion below would silently round a
            // float64 file instead of reproducing it.
            if t.kind() != Kind::Float {
                return Err(bad(format!("`{name}` is {:?}; {expected}", t.kind())));
            }
        }
        let (tr_shape, rot_shape) = (tr.size(), rot_mat.size());
        let (n, l) = match (tr_shape.as_slice(), rot_shape.as_slice()) {
            ([n, lt, 3], [nr, lr, 3, 3]) if n == nr && lt == lr => (*n, *lt),
            ([lt, 3], [lr, 3, 3]) if lt == lr => (1, *lt),
            _ => {
                return Err(bad(format!(
                    "`tr` has shape {tr_shape:?} and `rot_mat` {rot_shape:?}; {expected}"
                )))
            }
        };
        let seq_len = sequence.chars().count();
        if l as usize != seq_len {
            return Err(bad(format!(
                "the structures have {l} residues but the given sequence has {seq_len}; \
                 pass the sequence the ensemble was sampled for"
            )));
        }

        let sample_index = match entry("sample_index") {
            None => (0..n).collect(),
            Some(t) => {
                if t.size() != [n] || !matches!(t.kind(), Kind::Int64 | Kind::Int) {
                    return Err(bad(format!(
                        "`sample_index` is {:?} with shape {:?}; {expected}",
                        t.kind(),
                        t.size()
                    )));
                }
                Vec::<i64>::try_from(t).map_err(|e| bad(e.to_string()))?
            }
        };
        let flat = |t: &Tensor| Vec::<f32>::try_from(&t.reshape([-1]));
        Ok(Ensemble {
            sequence,
            sample_index,
            tr: flat(tr).map_err(|e| bad(e.to_string()))?,
            rot_mat: flat(rot_mat).map_err(|e| bad(e.to_string()))?,
            steer: match (entry("steer_energy"), entry("steer_log_z")) {
                (Some(e), Some(z)) => {
                    let read = |name: &str, t: &Tensor| {
                        if t.size() != [n] {
                            return Err(bad(format!(
                                "`{name}` has shape {:?}, expected ({n},)",
                                t.size()
                            )));
                        }
                        Vec::<f64>::try_from(&t.to_kind(Kind::Double))
                            .map_err(|e| bad(e.to_string()))
                    };
                    Some(SteerRecord {
                        energy: read("steer_energy", e)?,
                        log_z: read("steer_log_z", z)?,
                    })
                }
                _ => None,
            },
            log_density: match (entry("log_density"), entry("log_density_std_error")) {
                (Some(d), Some(e)) => {
                    let read = |name: &str, t: &Tensor| {
                        if t.size() != [n] {
                            return Err(bad(format!(
                                "`{name}` has shape {:?}, expected ({n},)",
                                t.size()
                            )));
                        }
                        Vec::<f64>::try_from(&t.to_kind(Kind::Double))
                            .map_err(|e| bad(e.to_string()))
                    };
                    Some(DensityRecord {
                        log_density: read("log_density", d)?,
                        std_error: read("log_density_std_error", e)?,
                    })
                }
                _ => None,
            },
        })
    }

    /// Writes the backbone (N, CA, C, O of [`Ensemble::backbone_with_oxygen`])
    /// of every sample as a multi-model PDB: one `MODEL n` (n = 1, 2, ...)
    /// per sample, chain A, residues numbered from 1, and a `REMARK   1` line
    /// per model saying its sample index.
    ///
    /// Everything is checked before the first byte is written, so an error
    /// leaves `w` untouched. Errors (`InvalidData`): inconsistent array
    /// lengths, a letter [`three_letter`] does not know, more than 9999
    /// residues or models, or a coordinate that does not fit the `%8.3f`
    /// field (from -999.999 to 9999.999 Å) or is not finite.
    pub fn write_pdb<W: Write>(&self, w: W) -> io::Result<()> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
        self.check_shapes().map_err(invalid)?;
        let (n, l) = (self.num_samples(), self.len_residues());
        if l > PDB_MAX_RESIDUES || n > PDB_MAX_MODELS {
            return Err(invalid(format!(
                "{n} samples of {l} residues do not fit a PDB file (at most \
                 {PDB_MAX_MODELS} models of {PDB_MAX_RESIDUES} residues); write the npz instead"
            )));
        }
        let res_names = self.residue_names()?;
        for sample in 0..n {
            self.check_pdb_coordinates(sample, &self.backbone_with_oxygen(sample))?;
        }

        let mut w = BufWriter::new(w);
        for (model, index) in self.sample_index.iter().enumerate() {
            record(
                &mut w,
                &format!("REMARK   1 DIG MODEL {:>4} SAMPLE_INDEX {index}", model + 1),
            )?;
        }
        for sample in 0..n {
            record(&mut w, &format!("MODEL     {:>4}", sample + 1))?;
            write_atom_records(&mut w, &self.backbone_with_oxygen(sample), &res_names)?;
            record(&mut w, "ENDMDL")?;
        }
        record(&mut w, "END")?;
        w.flush()
    }

    /// [`Ensemble::write_pdb`] into a file, atomically (see the module doc).
    pub fn write_pdb_file(&self, path: &Path) -> Result<()> {
        write_atomically(path, |tmp| self.write_pdb(File::create(tmp)?))
    }

    /// Writes the topology of the ensemble's XTC trajectory
    /// ([`crate::xtc::XtcWriter`]) as a single-structure PDB: the atoms of
    /// [`Ensemble::backbone_with_oxygen`] (N, CA, C, O per residue, chain A,
    /// residues numbered from 1) at the coordinates of structure `sample`,
    /// no `MODEL` and no `CRYST1` record (the XTC has no box either). MDTraj
    /// (`md.load(xtc, top=pdb)`) and MDAnalysis (`Universe(pdb, xtc)`) read
    /// it as the XTC's topology; viewers show it as a structure.
    ///
    /// Errors (`InvalidData`, nothing written) as [`Ensemble::write_pdb`]'s
    /// for that structure, and `sample` out of range.
    pub fn write_topology_pdb<W: Write>(&self, sample: usize, w: W) -> io::Result<()> {
        if sample >= self.num_samples() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sample {sample} out of range: the ensemble has {} samples",
                    self.num_samples()
                ),
            ));
        }
        self.write_topology(Some(sample), w)
    }

    /// [`Ensemble::write_topology_pdb`] of the first structure into a file,
    /// atomically (see the module doc). An ensemble without structures (a
    /// filter kept none) gets its atoms at the origin: still the topology
    /// of its (empty) XTC.
    pub fn write_topology_pdb_file(&self, path: &Path) -> Result<()> {
        let sample = (self.num_samples() > 0).then_some(0);
        write_atomically(path, |tmp| self.write_topology(sample, File::create(tmp)?))
    }

    fn write_topology<W: Write>(&self, sample: Option<usize>, w: W) -> io::Result<()> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
        self.check_shapes().map_err(invalid)?;
        let l = self.len_residues();
        if l > PDB_MAX_RESIDUES {
            return Err(invalid(format!(
                "{l} residues do not fit a PDB file (at most {PDB_MAX_RESIDUES})"
            )));
        }
        let res_names = self.residue_names()?;
        let (remark, atoms) = match sample {
            Some(sample) => {
                let atoms = self.backbone_with_oxygen(sample);
                self.check_pdb_coordinates(sample, &atoms)?;
                (
                    format!(
                        "REMARK   1 DIG TOPOLOGY N CA C O; COORDINATES OF SAMPLE_INDEX {}",
                        self.sample_index[sample]
                    ),
                    atoms,
                )
            }
            None => (
                "REMARK   1 DIG TOPOLOGY N CA C O; NO SAMPLE, COORDINATES 0".to_string(),
                vec![[[0.0; 3]; 4]; l],
            ),
        };
        let mut w = BufWriter::new(w);
        record(&mut w, &remark)?;
        write_atom_records(&mut w, &atoms, &res_names)?;
        record(&mut w, "END")?;
        w.flush()
    }

    /// Every structure as an XTC trajectory ([`crate::xtc::XtcWriter`]) into
    /// a file, atomically (see the module doc).
    pub fn write_xtc_file(&self, path: &Path) -> Result<()> {
        write_atomically(path, |tmp| {
            let mut xtc = crate::xtc::XtcWriter::new(BufWriter::new(File::create(tmp)?));
            xtc.write_ensemble(self, None)?;
            xtc.into_inner().flush()
        })
    }

    /// The PDB residue names of the sequence; `InvalidData` naming the first
    /// letter [`three_letter`] does not know.
    fn residue_names(&self) -> io::Result<Vec<&'static str>> {
        self.sequence
            .chars()
            .enumerate()
            .map(|(i, code)| {
                three_letter(code).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "residue {} is `{code}`, not one of the 20 standard one-letter \
                             codes or X",
                            i + 1
                        ),
                    )
                })
            })
            .collect()
    }

    /// `InvalidData` naming the first coordinate of structure `sample`
    /// (`atoms`) that does not fit the PDB `%8.3f` field.
    fn check_pdb_coordinates(&self, sample: usize, atoms: &[[[f32; 3]; 4]]) -> io::Result<()> {
        for (residue, atoms) in atoms.iter().enumerate() {
            for (atom, xyz) in BACKBONE_ATOMS.iter().zip(atoms) {
                if let Some(&x) = xyz.iter().find(|&&x| pdb_coordinate(x).is_none()) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "sample index {} (model {}), residue {}, atom {}: coordinate {x} Å \
                             does not fit the PDB %8.3f field (-999.999 to 9999.999 Å); \
                             write the npz instead",
                            self.sample_index[sample],
                            sample + 1,
                            residue + 1,
                            atom.name.trim(),
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that the array lengths agree with the sequence and sample count.
    fn check_shapes(&self) -> std::result::Result<(), String> {
        let (n, l) = (self.num_samples(), self.len_residues());
        if self.tr.len() != n * l * 3 || self.rot_mat.len() != n * l * 9 {
            return Err(format!(
                "inconsistent ensemble: {n} samples of {l} residues need {} translation and {} \
                 rotation values, got {} and {}",
                n * l * 3,
                n * l * 9,
                self.tr.len(),
                self.rot_mat.len()
            ));
        }
        if let Some(d) = &self.log_density {
            if d.log_density.len() != n || d.std_error.len() != n {
                return Err(format!(
                    "inconsistent ensemble: {n} samples but {} log-densities and {} errors",
                    d.log_density.len(),
                    d.std_error.len()
                ));
            }
        }
        if let Some(st) = &self.steer {
            if st.energy.len() != n || st.log_z.len() != n {
                return Err(format!(
                    "inconsistent ensemble: {n} samples but {} steering energies and {} log Z",
                    st.energy.len(),
                    st.log_z.len()
                ));
            }
        }
        Ok(())
    }

    /// [`Ensemble::read_npz`] for a file whose sequence is not at hand: L
    /// comes from the file's `tr` and the sequence is all `X` (unknown), so
    /// the ensemble serves geometry (backbones, RMSD) but not residue names.
    pub fn read_npz_any(path: &Path) -> Result<Ensemble> {
        fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        let entries = Tensor::read_npz(path)
            .map_err(|e| ModelError::format(path, format!("not a readable npz file: {e}")))?;
        // A missing or misshapen `tr` gives 0 here and read_npz's own message.
        let l = entries
            .iter()
            .find(|(name, _)| name == "tr")
            .and_then(|(_, t)| match t.size().as_slice() {
                [_, l, 3] | [l, 3] => usize::try_from(*l).ok(),
                _ => None,
            })
            .unwrap_or(0);
        drop(entries);
        Ensemble::read_npz(path, "X".repeat(l))
    }
}

/// The carbonyl O of a residue (Å) from its N, CA, C and the next residue's
/// N, with ideal peptide geometry: C=O [`C_O_BOND`], CA-C-O
/// [`CA_C_O_ANGLE_DEG`], and O in the plane of CA, C and N(i+1), on the
/// other side of the CA-C axis from N(i+1): the dihedral N-CA-C-O is
/// psi + 180°, psi being N-CA-C-N(i+1). This is AlphaFold's and OpenFold's
/// construction (the ideal O of the psi rigid group, rotated by the
/// residue's psi; `openfold/np/residue_constants.py`
/// `rigid_group_atom_positions`, `openfold/utils/feats.py`
/// `frames_and_literature_positions_to_atom14_pos`). BioEmu's
/// `_adjust_oxygen_pos` puts O in the same plane and on the same side, along
/// the bisector of CA->C and N(i+1)->C; both agree when CA-C-N(i+1) is 119°,
/// and the fixed angle keeps CA-C-O ideal where a sampled chain is not.
///
/// Without a next residue (`next_n` is `None`) psi is [`TERMINAL_PSI_DEG`].
/// Where N(i+1) lies on the CA-C line psi is undefined and taken as 0.
pub fn carbonyl_oxygen(
    n: [f32; 3],
    ca: [f32; 3],
    c: [f32; 3],
    next_n: Option<[f32; 3]>,
) -> [f32; 3] {
    let (n, ca, c) = (n.map(f64::from), ca.map(f64::from), c.map(f64::from));
    let psi = match next_n {
        Some(next) => dihedral(n, ca, c, next.map(f64::from)),
        None => TERMINAL_PSI_DEG.to_radians(),
    };
    place_atom(
        n,
        ca,
        c,
        C_O_BOND,
        CA_C_O_ANGLE_DEG.to_radians(),
        psi + std::f64::consts::PI,
    )
    .map(|x| x as f32)
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn unit(a: [f64; 3]) -> [f64; 3] {
    let norm = dot(a, a).sqrt();
    a.map(|x| x / norm)
}

/// The dihedral angle a-b-c-d (radians, IUPAC sign), 0 where it is undefined.
fn dihedral(a: [f64; 3], b: [f64; 3], c: [f64; 3], d: [f64; 3]) -> f64 {
    let axis = unit(sub(c, b));
    let project = |v: [f64; 3]| {
        let along = dot(v, axis);
        [
            v[0] - along * axis[0],
            v[1] - along * axis[1],
            v[2] - along * axis[2],
        ]
    };
    let (v, w) = (project(sub(a, b)), project(sub(d, c)));
    dot(cross(axis, v), w).atan2(dot(v, w))
}

/// The atom `d` with |cd| = `bond`, angle b-c-d = `angle` and dihedral
/// a-b-c-d = `torsion` (radians): the natural extension reference frame
/// (NeRF) of Parsons et al., J. Comput. Chem. 26, 1063 (2005).
fn place_atom(
    a: [f64; 3],
    b: [f64; 3],
    c: [f64; 3],
    bond: f64,
    angle: f64,
    torsion: f64,
) -> [f64; 3] {
    let bc = unit(sub(c, b));
    let normal = unit(cross(sub(b, a), bc));
    let m = cross(normal, bc);
    let local = [
        -bond * angle.cos(),
        bond * angle.sin() * torsion.cos(),
        bond * angle.sin() * torsion.sin(),
    ];
    std::array::from_fn(|k| c[k] + local[0] * bc[k] + local[1] * m[k] + local[2] * normal[k])
}

/// The three-letter PDB residue name of a one-letter amino-acid code: the 20
/// standard amino acids (upper case) and `X` for unknown (`UNK`).
pub fn three_letter(code: char) -> Option<&'static str> {
    Some(match code {
        'A' => "ALA",
        'R' => "ARG",
        'N' => "ASN",
        'D' => "ASP",
        'C' => "CYS",
        'Q' => "GLN",
        'E' => "GLU",
        'G' => "GLY",
        'H' => "HIS",
        'I' => "ILE",
        'L' => "LEU",
        'K' => "LYS",
        'M' => "MET",
        'F' => "PHE",
        'P' => "PRO",
        'S' => "SER",
        'T' => "THR",
        'W' => "TRP",
        'Y' => "TYR",
        'V' => "VAL",
        'X' => "UNK",
        _ => return None,
    })
}

/// A backbone atom as the PDB ATOM record spells it.
struct PdbAtom {
    /// Columns 13-16: element symbols of one letter start in column 14.
    name: &'static str,
    element: &'static str,
}

/// In the order of [`Ensemble::backbone_with_oxygen`].
const BACKBONE_ATOMS: [PdbAtom; 4] = [
    PdbAtom {
        name: " N  ",
        element: "N",
    },
    PdbAtom {
        name: " CA ",
        element: "C",
    },
    PdbAtom {
        name: " C  ",
        element: "C",
    },
    PdbAtom {
        name: " O  ",
        element: "O",
    },
];

const CHAIN_ID: char = 'A';

/// The `ATOM` records of one structure (`atoms` per residue, coordinates
/// checked by the caller) and its `TER` record. Serials count from 1 in
/// every structure, as the models of a file are alternatives of one chain.
fn write_atom_records(
    w: &mut impl Write,
    atoms: &[[[f32; 3]; 4]],
    res_names: &[&str],
) -> io::Result<()> {
    let mut serial = 0;
    for (residue, atoms) in atoms.iter().enumerate() {
        for (atom, xyz) in BACKBONE_ATOMS.iter().zip(atoms) {
            serial += 1;
            let [x, y, z] = xyz.map(|c| pdb_coordinate(c).expect("coordinates checked"));
            record(
                w,
                &format!(
                    "ATOM  {serial:>5} {name}{alt_loc}{res_name:>3} {chain}{res_seq:>4}\
                     {i_code}   {x}{y}{z}{occupancy:>6.2}{temp_factor:>6.2}          \
                     {element:>2}",
                    name = atom.name,
                    alt_loc = ' ',
                    res_name = res_names[residue],
                    chain = CHAIN_ID,
                    res_seq = residue + 1,
                    i_code = ' ',
                    occupancy = 1.0,
                    temp_factor = 0.0,
                    element = atom.element,
                ),
            )?;
        }
    }
    if let Some(last) = res_names.last() {
        serial += 1;
        let l = res_names.len();
        record(
            w,
            &format!("TER   {serial:>5}      {last:>3} {CHAIN_ID}{l:>4}"),
        )?;
    }
    Ok(())
}

/// `x` as `%8.3f`, or `None` when it would not fit eight columns or is not a
/// number. Decided on the formatted text, not on a bound, because the sign
/// takes a column (-1000 does not fit, 9999.999 does) and rounding can add a
/// digit (9999.9996 becomes 10000.000).
fn pdb_coordinate(x: f32) -> Option<String> {
    let text = format!("{x:8.3}");
    (x.is_finite() && text.len() == 8).then_some(text)
}

/// Writes one PDB record padded to the fixed 80 columns.
fn record(w: &mut impl Write, line: &str) -> io::Result<()> {
    debug_assert!(
        line.len() <= PDB_RECORD_WIDTH,
        "PDB record too long: {line}"
    );
    writeln!(w, "{line:<PDB_RECORD_WIDTH$}")
}

/// Writes `path` by letting `write` fill a temporary file in the same
/// directory, flushing it to disk and renaming it over `path`. The rename is
/// atomic within a file system, so readers see the old file or the complete
/// new one. The temporary name is hidden and lacks the final extension, so
/// nothing that looks for finished files picks it up.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let fail = |e: io::Error| ModelError::format(path, format!("cannot write: {e}"));
    let file_name = path
        .file_name()
        .ok_or_else(|| fail(io::Error::other("the path does not name a file")))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write(&tmp)
        // Data must be on disk before the rename makes it visible, or a crash
        // could leave a complete-looking name over incomplete content.
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(fail(e));
    }
    // Makes the rename itself durable. Best effort: some file systems do not
    // support syncing a directory, and the new file is already in place.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The header of a version-1.0 `.npy` array, padded to a multiple of 64 bytes.
pub(crate) fn npy_header(descr: &str, shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}
