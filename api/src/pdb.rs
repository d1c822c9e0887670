//! Shard npz -> PDB, without libtorch at run time.
//!
//! A shard object is the npz that `Ensemble::npz_bytes` writes (`tr`
//! (N,L,3) f32, `rot_mat` (N,L,3,3) f32, `sample_index` (N,) i64).
//! [`read_shard`] parses it in memory (the model crate's reader needs a file
//! and tch); the PDB text itself comes from `Ensemble::write_pdb`, so the
//! atoms are byte for byte what the model crate writes. The one change is the
//! numbering: `write_pdb` numbers models 1, 2, ... within the file, here the
//! model number is the job-wide sample index + 1, in `MODEL` and in the
//! `REMARK   1 DIG MODEL` line, so a shard's PDB and the whole job's PDB
//! number a sample alike. For a job's samples `0..N` in order, the
//! concatenation ([`remarks`], [`models`] of every shard, [`END`]) is exactly
//! what `write_pdb` writes for the whole ensemble.

use std::io::{self, Cursor, Read};

use dig_model::structure::{three_letter, Ensemble};

/// The PDB `MODEL` serial has four columns.
pub const MAX_MODELS: u64 = 9999;
/// The PDB residue number has four columns.
pub const MAX_RESIDUES: usize = 9999;
/// The last record of a PDB file (padded like every record).
pub const END: &str = "END";

/// Why a job or a shard cannot be written as PDB, for the client; `None`
/// when it can. `last_index` is the largest sample index to be written.
pub fn unfit_reason(sequence: &str, last_index: Option<u64>) -> Option<String> {
    let l = sequence.chars().count();
    if l > MAX_RESIDUES {
        return Some(format!(
            "the protein has {l} residues; a PDB file holds at most {MAX_RESIDUES}; \
             download the npz instead"
        ));
    }
    if let Some((i, c)) = sequence
        .chars()
        .enumerate()
        .find(|(_, c)| three_letter(*c).is_none())
    {
        return Some(format!(
            "residue {} is `{c}`, which has no PDB residue name; download the npz instead",
            i + 1
        ));
    }
    match last_index {
        Some(i) if i >= MAX_MODELS => Some(format!(
            "sample {i} would be model {}; a PDB file numbers models up to {MAX_MODELS}; \
             download the npz instead",
            i + 1
        )),
        _ => None,
    }
}

/// One PDB record: `line` padded to 80 columns, as `write_pdb` writes it.
fn record(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(format!("{line:<80}\n").as_bytes());
}

fn remark_line(index: u64) -> String {
    format!("REMARK   1 DIG MODEL {:>4} SAMPLE_INDEX {index}", index + 1)
}

/// The `REMARK   1` header lines of samples `indices` (global indices).
pub fn remarks(indices: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in indices {
        record(&mut out, &remark_line(i));
    }
    out
}

/// The `END` record.
pub fn end() -> Vec<u8> {
    let mut out = Vec::with_capacity(81);
    record(&mut out, END);
    out
}

/// A whole PDB file of `ens`: its remarks, its models and `END`, numbered by
/// sample index.
pub fn shard_pdb(ens: &Ensemble) -> io::Result<Vec<u8>> {
    renumber(ens, true)
}

/// Only the `MODEL ... ENDMDL` blocks of `ens`, numbered by sample index:
/// the part of a shard in a job-wide PDB.
pub fn models(ens: &Ensemble) -> io::Result<Vec<u8>> {
    renumber(ens, false)
}

fn renumber(ens: &Ensemble, whole_file: bool) -> io::Result<Vec<u8>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut indices = Vec::with_capacity(ens.sample_index.len());
    for &i in &ens.sample_index {
        match u64::try_from(i) {
            Ok(i) if i < MAX_MODELS => indices.push(i),
            _ => {
                return Err(invalid(format!(
                    "sample index {i} cannot be a PDB model number (1 to {MAX_MODELS})"
                )))
            }
        }
    }
    let mut raw = Vec::new();
    ens.write_pdb(&mut raw)?;
    let mut out = Vec::with_capacity(raw.len());
    let (mut remark, mut model) = (0, 0);
    for line in raw.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b"REMARK   1 DIG MODEL ") {
            let i = *indices
                .get(remark)
                .ok_or_else(|| invalid("more REMARK lines than samples".into()))?;
            if whole_file {
                record(&mut out, &remark_line(i));
            }
            remark += 1;
        } else if line.starts_with(b"MODEL ") {
            let i = *indices
                .get(model)
                .ok_or_else(|| invalid("more MODEL records than samples".into()))?;
            record(&mut out, &format!("MODEL     {:>4}", i + 1));
            model += 1;
        } else if line.trim_ascii_end() == END.as_bytes() {
            if whole_file {
                out.extend_from_slice(line);
            }
        } else {
            out.extend_from_slice(line);
        }
    }
    if remark != indices.len() || model != indices.len() {
        return Err(invalid(format!(
            "write_pdb wrote {remark} remarks and {model} models for {} samples",
            indices.len()
        )));
    }
    Ok(out)
}

/// Parses a shard npz (in memory) for `sequence`, the job's sequence; its
/// length must match the arrays' L. Like `Ensemble::read_npz`, a missing
/// `sample_index` means `0..N`, and `sample_index` may be i64 or i32.
pub fn read_shard(bytes: &[u8], sequence: &str) -> Result<Ensemble, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable npz file: {e}"))?;
    let expected = "expected tr (N,L,3) float32, rot_mat (N,L,3,3) float32 and \
                    optionally sample_index (N,) int64";
    let tr = read_npy(&mut zip, "tr")?.ok_or_else(|| format!("no `tr` entry; {expected}"))?;
    let rot =
        read_npy(&mut zip, "rot_mat")?.ok_or_else(|| format!("no `rot_mat` entry; {expected}"))?;
    let (n, l) = match (tr.shape.as_slice(), rot.shape.as_slice()) {
        ([n, lt, 3], [nr, lr, 3, 3]) if n == nr && lt == lr => (*n, *lt),
        _ => {
            return Err(format!(
                "`tr` has shape {:?} and `rot_mat` {:?}; {expected}",
                tr.shape, rot.shape
            ))
        }
    };
    let seq_len = sequence.chars().count();
    if l != seq_len {
        return Err(format!(
            "the structures have {l} residues but the job's sequence has {seq_len}"
        ));
    }
    let sample_index = match read_npy(&mut zip, "sample_index")? {
        None => (0..n as i64).collect(),
        Some(s) if s.shape == [n] => s.ints("sample_index")?,
        Some(s) => {
            return Err(format!(
                "`sample_index` has shape {:?}; {expected}",
                s.shape
            ))
        }
    };
    Ok(Ensemble {
        sequence: sequence.to_string(),
        sample_index,
        tr: tr.f32s("tr")?,
        rot_mat: rot.f32s("rot_mat")?,
        steer: None,
        log_density: None,
    })
}

/// One `.npy` member: little-endian, C order.
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Npy {
    fn f32s(&self, name: &str) -> Result<Vec<f32>, String> {
        if self.descr != "<f4" {
            return Err(format!(
                "`{name}` is {}, expected float32 (<f4)",
                self.descr
            ));
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    fn ints(&self, name: &str) -> Result<Vec<i64>, String> {
        match self.descr.as_str() {
            "<i8" => Ok(self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()),
            "<i4" => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect()),
            d => Err(format!("`{name}` is {d}, expected int64 (<i8)")),
        }
    }
}

fn read_npy(zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str) -> Result<Option<Npy>, String> {
    let mut file = match zip.by_name(&format!("{name}.npy")) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("`{name}`: {e}")),
    };
    let mut bytes = Vec::with_capacity(file.size() as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("`{name}`: {e}"))?;
    parse_npy(&bytes)
        .map(Some)
        .map_err(|e| format!("`{name}`: {e}"))
}

fn parse_npy(bytes: &[u8]) -> Result<Npy, String> {
    let bad = || "not an .npy array".to_string();
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(bad)?;
    let value_after = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or_else(|| format!("the .npy header has no '{key}'"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = value_after("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(bad)?
        .replace('|', "<");
    if value_after("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = value_after("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(bad)?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    let item = match descr.as_str() {
        "<f4" | "<i4" => 4,
        "<i8" | "<f8" => 8,
        d => return Err(format!("unsupported dtype {d}")),
    };
    let data = bytes[start + header_len..].to_vec();
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(bad)?;
    if count.checked_mul(item) != Some(data.len()) {
        return Err(format!(
            "shape {shape:?} needs {} bytes of data, the array has {}",
            count.saturating_mul(item),
            data.len()
        ));
    }
    Ok(Npy { descr, shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic ensemble with proper rotation matrices.
    fn ensemble(sequence: &str, indices: std::ops::Range<i64>) -> Ensemble {
        let l = sequence.len();
        let (mut tr, mut rot) = (Vec::new(), Vec::new());
        for s in indices.clone() {
            for r in 0..l {
                let a = 0.3 * s as f32 + 0.7 * r as f32;
                tr.extend([3.8 * r as f32, 1.5 * a.sin() - s as f32, 2.0 * a.cos()]);
                let (c, n) = (a.cos(), a.sin());
                rot.extend([c, -n, 0.0, n, c, 0.0, 0.0, 0.0, 1.0]);
            }
        }
        Ensemble {
            sequence: sequence.into(),
            sample_index: indices.collect(),
            tr,
            rot_mat: rot,
            steer: None,
            log_density: None,
        }
    }

    #[test]
    fn npz_round_trips_through_the_model_writer() {
        let e = ensemble("MKTAYX", 5..9);
        let back = read_shard(&e.npz_bytes().unwrap(), "MKTAYX").unwrap();
        assert_eq!(back, e);
        let err = read_shard(&e.npz_bytes().unwrap(), "MKT").unwrap_err();
        assert!(err.contains("6 residues"), "{err}");
        assert!(read_shard(b"nope", "MKT")
            .unwrap_err()
            .contains("not a readable npz"));
    }

    #[test]
    fn shards_concatenate_to_the_whole_ensemble_pdb() {
        let all = ensemble("MKTAYI", 0..7);
        let mut expected = Vec::new();
        all.write_pdb(&mut expected).unwrap();

        let mut joined = remarks(0..7);
        for r in [0..3, 3..6, 6..7] {
            joined.extend(models(&ensemble("MKTAYI", r)).unwrap());
        }
        joined.extend(end());
        assert_eq!(
            String::from_utf8(joined).unwrap(),
            String::from_utf8(expected).unwrap()
        );

        // A later shard alone: write_pdb's bytes but for the model numbers.
        let shard = ensemble("MKTAYI", 3..6);
        let mut plain = Vec::new();
        shard.write_pdb(&mut plain).unwrap();
        let ours = String::from_utf8(shard_pdb(&shard).unwrap()).unwrap();
        let plain = String::from_utf8(plain).unwrap();
        assert_eq!(ours.lines().count(), plain.lines().count());
        for (a, b) in ours.lines().zip(plain.lines()) {
            if b.starts_with("MODEL ") || b.starts_with("REMARK   1 DIG MODEL") {
                assert_ne!(a, b);
            } else {
                assert_eq!(a, b);
            }
        }
        assert!(ours.contains(&format!("{:<80}\n", "MODEL        4")));
        assert!(ours.contains(&format!(
            "{:<80}\n",
            "REMARK   1 DIG MODEL    6 SAMPLE_INDEX 5"
        )));
        assert!(ours.ends_with(&format!("{:<80}\n", "END")));
    }

    #[test]
    fn pdb_limits() {
        assert!(unfit_reason("MKT", Some(9998)).is_none());
        assert!(unfit_reason("MKT", Some(9999))
            .unwrap()
            .contains("model 10000"));
        assert!(unfit_reason("MKBT", None).unwrap().contains("residue 3"));
        let e = ensemble("MK", 9998..10000);
        assert!(models(&e).is_err());
    }
}
