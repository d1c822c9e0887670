//! Ensembles as XTC trajectories (GROMACS' compressed format), the format
//! MDTraj, MDAnalysis, GROMACS, VMD and PyMOL read fastest.
//!
//! One frame per sample: the atoms of [`Ensemble::backbone_with_oxygen`]
//! (N, CA, C, O per residue, the order of the topology PDB that
//! [`Ensemble::write_topology_pdb`] writes), in nm, at precision
//! [`PRECISION`] (0.001 nm = 0.01 Å), `step` and `time` the sample index, and
//! a zero box (the samples have none). The encoding is the `molly` crate's
//! writer (the GROMACS `xdr3dfcoord` algorithm: integer coordinates with
//! run-length coded small differences; frames of at most 9 atoms are plain
//! floats, as GROMACS writes them).
//!
//! An XTC file is its frames one after another, with no file header, so
//! [`XtcWriter`] appends the frames of successive ensembles (the shards of a
//! job) to any writer without holding more than one of them; the bytes are
//! those of writing the concatenated ensemble at once.

use std::io::{self, Write};

use crate::structure::Ensemble;

/// Coordinates are stored as integers in units of 1 / `PRECISION` nm.
pub const PRECISION: f32 = 1000.0;

/// The largest |coordinate| (Å) an XTC frame holds here: 1000 nm keeps every
/// span within 2^21 integer units, so that the three sizes of a frame's
/// bounding box multiply within 64 bits, the range `molly`'s encoder packs
/// exactly (and far below GROMACS' own limit of 2^31 units).
pub const MAX_ABS_COORDINATE: f32 = 10_000.0;

/// Appends XTC frames to `W`, one per sample; see the module doc.
pub struct XtcWriter<W: Write> {
    inner: W,
    /// Atoms per frame, fixed by the first ensemble written.
    natoms: Option<usize>,
    frames: u64,
}

impl<W: Write> XtcWriter<W> {
    pub fn new(inner: W) -> Self {
        XtcWriter {
            inner,
            natoms: None,
            frames: 0,
        }
    }

    /// Appends one frame per sample of `ens` for which `keep` is true (every
    /// sample when `keep` is `None`), in order. Returns how many were written.
    ///
    /// Everything is checked before the first byte is written, so an error
    /// leaves the writer as it was. Errors (`InvalidData`): inconsistent
    /// array lengths, a `keep` of another length than the sample count, a
    /// negative sample index or one above `u32::MAX` (the XTC step), another
    /// atom count than the ensembles written before, or a coordinate that is
    /// not finite or beyond [`MAX_ABS_COORDINATE`].
    pub fn write_ensemble(&mut self, ens: &Ensemble, keep: Option<&[bool]>) -> io::Result<usize> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
        let (n, l) = (ens.num_samples(), ens.len_residues());
        if ens.tr.len() != n * l * 3 || ens.rot_mat.len() != n * l * 9 {
            return Err(invalid(format!(
                "inconsistent ensemble: {n} samples of {l} residues need {} translation and {} \
                 rotation values, got {} and {}",
                n * l * 3,
                n * l * 9,
                ens.tr.len(),
                ens.rot_mat.len()
            )));
        }
        if let Some(keep) = keep {
            if keep.len() != n {
                return Err(invalid(format!(
                    "the keep mask has {} entries for {n} samples",
                    keep.len()
                )));
            }
        }
        let natoms = 4 * l;
        if let Some(before) = self.natoms {
            if before != natoms {
                return Err(invalid(format!(
                    "frames of {natoms} atoms ({l} residues) cannot follow frames of {before} \
                     atoms in one XTC file"
                )));
            }
        }
        let mut encoded = Vec::new();
        let mut written = 0;
        for sample in 0..n {
            if keep.is_some_and(|k| !k[sample]) {
                continue;
            }
            let index = ens.sample_index[sample];
            let step = u32::try_from(index).map_err(|_| {
                invalid(format!(
                    "sample index {index} cannot be an XTC step (0 to {})",
                    u32::MAX
                ))
            })?;
            let mut nm = Vec::with_capacity(natoms);
            for (residue, atoms) in ens.backbone_with_oxygen(sample).iter().enumerate() {
                for (atom, xyz) in ["N", "CA", "C", "O"].iter().zip(atoms) {
                    if let Some(x) = xyz
                        .iter()
                        .find(|x| !(x.is_finite() && x.abs() <= MAX_ABS_COORDINATE))
                    {
                        return Err(invalid(format!(
                            "sample index {index}, residue {}, atom {atom}: coordinate {x} Å \
                             is beyond the XTC range (±{MAX_ABS_COORDINATE} Å) or not finite",
                            residue + 1
                        )));
                    }
                    nm.push(xyz.map(|x| (f64::from(x) / 10.0) as f32));
                }
            }
            molly::XTCWriter::new(&mut encoded).write_frame_parts(
                step,
                step as f32,
                [0.0; 9],
                nm.iter(),
                PRECISION,
            )?;
            written += 1;
        }
        self.inner.write_all(&encoded)?;
        self.natoms = Some(natoms);
        self.frames += written as u64;
        Ok(written)
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The underlying writer (not flushed).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// The XTC frames of `ens` (those `keep` selects) as bytes: what
/// [`XtcWriter::write_ensemble`] appends.
pub fn xtc_bytes(ens: &Ensemble, keep: Option<&[bool]>) -> io::Result<Vec<u8>> {
    let mut w = XtcWriter::new(Vec::new());
    w.write_ensemble(ens, keep)?;
    Ok(w.into_inner())
}
