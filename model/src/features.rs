//! A protein's inputs: AlphaFold's single `(L, 384)` and pair `(L, L, 128)`
//! representations plus its sequence, read from `.npz`/`.npy`/FASTA files and
//! validated before any work starts, with errors that say what to fix.

use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::{ModelError, Result};

/// One-letter codes accepted in sequences: the 20 standard amino acids and
/// `X` for an unknown residue.
pub const AMINO_ACIDS: &str = "ACDEFGHIKLMNPQRSTVWYX";

#[derive(Debug)]
pub struct Features {
    /// `(L, dim_single)` float32.
    pub single: Tensor,
    /// `(L, L, dim_pair_repr)` float32.
    pub pair: Tensor,
    /// Sequence stored alongside the features, if any.
    pub sequence: Option<String>,
}

/// An array read from an `.npy` member.
enum Npy {
    Float(Tensor),
    Text(Vec<String>),
}

/// Parses one `.npy` byte buffer: little-endian f4/f8 (as float32) and
/// unicode strings (`<U`), C order. Other dtypes are reported, not guessed.
fn parse_npy(bytes: &[u8], what: &str) -> std::result::Result<Npy, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{what} is not a .npy array"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(format!("{what}: truncated .npy header")),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or(format!("{what}: truncated header"))?,
    )
    .map_err(|_| format!("{what}: header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[i..].trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .unwrap_or("");
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(format!(
            "{what}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray"
        ));
    }
    let shape_txt = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .unwrap_or("");
    let shape: Vec<i64> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| format!("{what}: bad shape ({shape_txt})"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let data = &bytes[start + hlen..];
    let numel: i64 = shape.iter().product();
    let need = |size: usize| -> std::result::Result<&[u8], String> {
        data.get(..numel as usize * size)
            .ok_or(format!("{what}: data shorter than its shape {shape:?}"))
    };
    match descr {
        "<f4" => Ok(Npy::Float(Tensor::from_data_size(
            need(4)?,
            &shape,
            Kind::Float,
        ))),
        "<f8" => Ok(Npy::Float(
            Tensor::from_data_size(need(8)?, &shape, Kind::Double).to_kind(Kind::Float),
        )),
        d if d.starts_with("<U") => {
            let width: usize = d[2..]
                .parse()
                .map_err(|_| format!("{what}: bad dtype {d}"))?;
            let raw = need(4 * width)?;
            let text = raw
                .chunks(4 * width)
                .map(|c| {
                    c.chunks(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .take_while(|&u| u != 0)
                        .filter_map(char::from_u32)
                        .collect()
                })
                .collect();
            Ok(Npy::Text(text))
        }
        d => Err(format!("{what} has dtype {d}; expected float32")),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}

impl Features {
    /// Reads an `.npz` with `single`, `pair` and optionally `sequence` (a
    /// numpy string scalar or 1-element array).
    pub fn from_npz(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| ModelError::format(path, format!("not an .npz archive ({e})")))?;
        let (mut single, mut pair, mut sequence) = (None, None, None);
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| ModelError::format(path, e.to_string()))?;
            let name = entry.name().trim_end_matches(".npy").to_string();
            if !matches!(name.as_str(), "single" | "pair" | "sequence") {
                continue;
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| ModelError::io(path, e))?;
            let arr = parse_npy(&bytes, &format!("array '{name}'"))
                .map_err(|m| ModelError::format(path, m))?;
            match (name.as_str(), arr) {
                ("sequence", Npy::Text(t)) => sequence = Some(t.concat()),
                ("single", Npy::Float(t)) => single = Some(t),
                ("pair", Npy::Float(t)) => pair = Some(t),
                (n, _) => {
                    return Err(ModelError::format(
                        path,
                        format!("array '{n}' has the wrong dtype"),
                    ))
                }
            }
        }
        let missing = |n: &str| {
            ModelError::format(
                path,
                format!("no '{n}' array; expected single (L,384) and pair (L,L,128)"),
            )
        };
        Ok(Features {
            single: single.ok_or_else(|| missing("single"))?,
            pair: pair.ok_or_else(|| missing("pair"))?,
            sequence,
        })
    }

    /// Reads a separate `single.npy` and `pair.npy`.
    pub fn from_npy(single: &Path, pair: &Path) -> Result<Self> {
        let load = |p: &Path| match parse_npy(&read_file(p)?, "the file") {
            Ok(Npy::Float(t)) => Ok(t),
            Ok(Npy::Text(_)) => Err(ModelError::format(
                p,
                "holds text, expected a float32 array",
            )),
            Err(m) => Err(ModelError::format(p, m)),
        };
        Ok(Features {
            single: load(single)?,
            pair: load(pair)?,
            sequence: None,
        })
    }

    /// Number of residues.
    pub fn len(&self) -> i64 {
        self.single.size().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks shapes against the model and that every value is finite.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let s = self.single.size();
        let p = self.pair.size();
        if s.len() != 2 || s[1] != cfg.dim_single {
            return Err(ModelError::Invalid(format!(
                "single representation has shape {s:?}; expected (L, {})",
                cfg.dim_single
            )));
        }
        if p.len() != 3 || p[2] != cfg.dim_pair_repr {
            return Err(ModelError::Invalid(format!(
                "pair representation has shape {p:?}; expected (L, L, {})",
                cfg.dim_pair_repr
            )));
        }
        if s[0] == 0 {
            return Err(ModelError::Invalid(
                "features describe a protein of length 0".into(),
            ));
        }
        if p[0] != s[0] || p[1] != s[0] {
            return Err(ModelError::Invalid(format!(
                "length mismatch: single has L = {} but pair is {} x {}",
                s[0], p[0], p[1]
            )));
        }
        for (name, t) in [("single", &self.single), ("pair", &self.pair)] {
            let bad = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
            if bad > 0 {
                return Err(ModelError::Invalid(format!(
                    "{name} representation contains {bad} NaN or infinite values"
                )));
            }
        }
        Ok(())
    }
}

/// Upper-cases and checks a sequence against the alphabet and the length.
pub fn check_sequence(sequence: &str, len: i64) -> Result<String> {
    let seq: String = sequence
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if let Some((pos, c)) = seq.char_indices().find(|(_, c)| !AMINO_ACIDS.contains(*c)) {
        return Err(ModelError::Invalid(format!(
            "sequence has '{c}' at position {} which is not an amino-acid code (allowed: {AMINO_ACIDS})",
            pos + 1
        )));
    }
    if seq.len() as i64 != len {
        return Err(ModelError::Invalid(format!(
            "length mismatch: sequence has {} residues but the features have L = {len}",
            seq.len()
        )));
    }
    Ok(seq)
}

/// The first record of a FASTA file.
pub fn read_fasta(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some(h) if h.starts_with('>') => {}
        _ => {
            return Err(ModelError::format(
                path,
                "not a FASTA file (expected a '>' header line)",
            ))
        }
    }
    let seq: String = lines.take_while(|l| !l.starts_with('>')).collect();
    if seq.is_empty() {
        return Err(ModelError::format(
            path,
            "the first FASTA record has no sequence",
        ));
    }
    Ok(seq)
}

/// Version tag of [`synthetic`]: stored in the file's `synthetic` entry.
pub const SYNTHETIC_LABEL: &str =
    "synthetic features from the sequence (digctl features synth v1): \
single = residue one-hot + sinusoids of the residue position, pair = one-hot relative position; \
NOT AlphaFold output: a model trained on them is specific to this protein";

/// Deterministic single and pair arrays from the sequence alone, for
/// proteins without AlphaFold output:
/// - single `(L, 384)`: one-hot of the residue (20 standard + `X`) in
///   columns 0-20, then 64 sine/cosine pairs of the residue position `i`
///   at wavelengths `2 pi * 10000^(j/64)` in columns 21-148, zero beyond;
/// - pair `(L, L, 128)`: one-hot of `j - i` clipped to `[-63, 64]`.
pub fn synthetic(sequence: &str) -> Result<Features> {
    const AA: &str = "ACDEFGHIKLMNPQRSTVWY";
    let l = sequence.chars().count();
    if l == 0 {
        return Err(ModelError::Invalid("the sequence is empty".into()));
    }
    let mut single = vec![0f32; l * 384];
    for (i, c) in sequence.chars().enumerate() {
        let c = c.to_ascii_uppercase();
        let k = match AA.find(c) {
            Some(k) => k,
            None if c == 'X' => 20,
            None => {
                return Err(ModelError::Invalid(format!(
                "residue {} of the sequence is {c:?}; use the 20 standard one-letter codes or X",
                i + 1
            )))
            }
        };
        let row = &mut single[i * 384..(i + 1) * 384];
        row[k] = 1.0;
        for j in 0..64 {
            let freq = (10000f64).powf(-(j as f64) / 64.0);
            let a = i as f64 * freq;
            row[21 + 2 * j] = a.sin() as f32;
            row[22 + 2 * j] = a.cos() as f32;
        }
    }
    let mut pair = vec![0f32; l * l * 128];
    for i in 0..l {
        for j in 0..l {
            let r = (j as i64 - i as i64).clamp(-63, 64);
            pair[(i * l + j) * 128 + (r + 63) as usize] = 1.0;
        }
    }
    let l = l as i64;
    Ok(Features {
        single: Tensor::from_slice(&single).view([l, 384]),
        pair: Tensor::from_slice(&pair).view([l, l, 128]),
        sequence: Some(sequence.to_ascii_uppercase()),
    })
}

impl Features {
    /// Writes `single`, `pair`, `sequence` and, when given, a `synthetic`
    /// label as an `.npz` that `numpy.load` and [`Features::from_npz`] read.
    pub fn write_npz(&self, path: &Path, label: Option<&str>) -> Result<()> {
        use std::io::Write;
        let f32s = |t: &Tensor| -> Vec<u8> {
            Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1))
                .expect("float tensor")
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        let text = |s: &str| -> (String, Vec<u8>) {
            let chars: Vec<char> = s.chars().collect();
            (
                format!("<U{}", chars.len().max(1)),
                chars
                    .iter()
                    .flat_map(|&c| (c as u32).to_le_bytes())
                    .collect(),
            )
        };
        let mut members: Vec<(&str, String, Vec<i64>, Vec<u8>)> = vec![
            (
                "single",
                "<f4".into(),
                self.single.size(),
                f32s(&self.single),
            ),
            ("pair", "<f4".into(), self.pair.size(), f32s(&self.pair)),
        ];
        if let Some(seq) = &self.sequence {
            let (d, b) = text(seq);
            members.push(("sequence", d, vec![], b));
        }
        if let Some(label) = label {
            let (d, b) = text(label);
            members.push(("synthetic", d, vec![], b));
        }
        crate::structure::write_atomically(path, |tmp| {
            let mut zip = zip::ZipWriter::new(std::fs::File::create(tmp)?);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .last_modified_time(zip::DateTime::default());
            for (name, descr, shape, data) in members {
                zip.start_file(format!("{name}.npy"), opts)
                    .map_err(std::io::Error::other)?;
                zip.write_all(&crate::structure::npy_header(&descr, &shape))?;
                zip.write_all(&data)?;
            }
            zip.finish().map_err(std::io::Error::other)?;
            Ok(())
        })
    }
}
