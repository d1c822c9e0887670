//! DCD and XTC trajectories with a topology (PSF, PDB or GRO) naming their
//! atoms.
//!
//! * DCD (CHARMM, NAMD, LAMMPS, as MDAnalysis reads it): Fortran
//!   unformatted records, either byte order, 4-byte record markers (8-byte
//!   markers of CHARMM `-i8` builds are detected too). Coordinates are Å.
//! * XTC (GROMACS) through the `molly` crate. Coordinates are nm and come
//!   back in Å.
//! * PSF (CHARMM/X-PLOR/NAMD; standard, EXT and space-separated layouts),
//!   PDB (its first model) and GRO topologies. The segment id of a PSF is the
//!   chain; a GRO file has no chains.
//!
//! Only the backbone atoms (N, CA, C) of each frame are kept. Every error
//! names the file, and for a bad frame the frame (counted from 1).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use crate::backbone::{
    self, Backbone, BackboneSelection, Format, ResidueId, TopologyAtom, Trajectory,
};
use crate::{ModelError, Result};

/// Backbone frames of a DCD or XTC `trajectory` whose atoms `topology`
/// (`.psf`, `.pdb`/`.ent` or `.gro`) names, atom for atom and in the same
/// order. A PDB trajectory names its own atoms and is read without the
/// topology.
pub fn read_with_topology(trajectory: &Path, topology: &Path) -> Result<Trajectory> {
    let format = Format::of(trajectory)?;
    if format == Format::Pdb {
        return backbone::read_pdb(trajectory);
    }
    let atoms = read_topology(topology)?;
    let sel = BackboneSelection::from_atoms(&atoms, topology)?;
    let frames = match format {
        Format::Dcd => read_dcd(trajectory, topology, &sel)?,
        Format::Xtc => read_xtc(trajectory, topology, &sel)?,
        Format::Pdb => unreachable!("PDB handled above"),
    };
    if frames.is_empty() {
        return Err(ModelError::format(
            trajectory,
            "the trajectory has no frames",
        ));
    }
    let t = Trajectory {
        residues: sel.residues,
        frames,
    };
    t.check_finite(trajectory)?;
    Ok(t)
}

/// The atoms of a topology file, in file order, by extension: `.psf`,
/// `.pdb`/`.ent` (its first model) or `.gro`.
pub fn read_topology(path: &Path) -> Result<Vec<TopologyAtom>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("psf") => read_psf(path),
        Some("pdb") | Some("ent") => Ok(backbone::pdb_topology(path)?.0),
        Some("gro") => read_gro(path),
        _ => Err(ModelError::format(
            path,
            "unknown topology format (expected .psf, .pdb or .gro)",
        )),
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Characters `a..b` of `line`, shorter or empty past its end.
fn col(line: &str, a: usize, b: usize) -> &str {
    line.get(a.min(line.len())..b.min(line.len())).unwrap_or("")
}

/// A residue number with an optional one-letter insertion code (`27`,
/// `-3`, `1H`).
fn parse_resid(s: &str) -> Option<(i64, char)> {
    let s = s.trim();
    let (num, icode) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => (&s[..s.len() - 1], c),
        _ => (s, ' '),
    };
    Some((num.parse().ok()?, icode))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PsfLayout {
    /// `(I8,1X,A4,1X,A4,1X,A4,1X,A4,...)`
    Standard,
    /// `(I10,1X,A8,1X,A8,1X,A8,1X,A8,...)`, flagged `EXT`.
    Extended,
    /// Whitespace-separated (NAMD/VMD), flagged `NAMD` or as a fallback.
    Split,
}

/// Segment id, residue id, residue name and atom name of one `!NATOM` line.
fn psf_atom(line: &str, layout: PsfLayout) -> Option<(String, (i64, char), String, String)> {
    let (index, segid, resid, resname, name) = match layout {
        PsfLayout::Split => {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            (f[0], f[1], f[2], f[3], f[4])
        }
        PsfLayout::Standard | PsfLayout::Extended => {
            // Field widths and the separating blanks; a line that does not
            // fit them is read as whitespace-separated (as MDAnalysis does).
            let (w0, w) = if layout == PsfLayout::Standard {
                (8, 4)
            } else {
                (10, 8)
            };
            let starts: Vec<usize> = (0..4).map(|k| w0 + 1 + k * (w + 1)).collect();
            if line.len() < starts[3] + 1 || !line.is_ascii() {
                return None;
            }
            if starts.iter().any(|&s| line.as_bytes()[s - 1] != b' ') {
                return None;
            }
            let f = |k: usize| col(line, starts[k], starts[k] + w).trim();
            (col(line, 0, w0), f(0), f(1), f(2), f(3))
        }
    };
    index.trim().parse::<u64>().ok()?;
    let resid = parse_resid(resid)?;
    if resname.is_empty() || name.is_empty() {
        return None;
    }
    Some((
        segid.to_string(),
        resid,
        resname.to_string(),
        name.to_string(),
    ))
}

/// The `!NATOM` section of a CHARMM/X-PLOR/NAMD PSF file.
fn read_psf(path: &Path) -> Result<Vec<TopologyAtom>> {
    let text = read_text(path)?;
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l).unwrap_or("");
    if !header.starts_with("PSF") {
        return Err(ModelError::format(
            path,
            "not a PSF file (the first line does not start with PSF)",
        ));
    }
    let flags: Vec<&str> = header[3..].split_whitespace().collect();
    let layout = if flags.contains(&"NAMD") {
        PsfLayout::Split
    } else if flags.contains(&"EXT") {
        PsfLayout::Extended
    } else {
        PsfLayout::Standard
    };
    let natom = loop {
        let Some((_, line)) = lines.next() else {
            return Err(ModelError::format(path, "no !NATOM section"));
        };
        let mut words = line.split_whitespace();
        if let (Some(n), Some(tag)) = (words.next(), words.next()) {
            if tag.starts_with("!NATOM") {
                break n.parse::<usize>().map_err(|_| {
                    ModelError::format(path, format!("unreadable atom count in {line:?}"))
                })?;
            }
        }
    };
    let mut atoms = Vec::with_capacity(natom);
    for i in 0..natom {
        let Some((ln, line)) = lines.next() else {
            return Err(ModelError::format(
                path,
                format!("the !NATOM section ends after {i} of its {natom} atoms: truncated file?"),
            ));
        };
        let (segid, (number, insertion), resname, name) = psf_atom(line, layout)
            .or_else(|| psf_atom(line, PsfLayout::Split))
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    format!(
                        "line {}: unreadable atom {} of the !NATOM section ({natom} atoms): {line:?}",
                        ln + 1,
                        i + 1
                    ),
                )
            })?;
        atoms.push(TopologyAtom {
            residue: ResidueId {
                chain: segid,
                number,
                insertion,
                name: resname,
            },
            name,
        });
    }
    Ok(atoms)
}

/// The atoms of a GRO file (its first frame): title, atom count, then per
/// atom residue number (5 columns), residue name (5), atom name (5), atom
/// number (5) and x, y, z in nm. The coordinates are not needed here.
fn read_gro(path: &Path) -> Result<Vec<TopologyAtom>> {
    let text = read_text(path)?;
    let mut lines = text.lines();
    let _title = lines.next();
    let count = lines.next().unwrap_or("");
    let natom: usize = count.trim().parse().map_err(|_| {
        ModelError::format(
            path,
            format!("line 2 should be the atom count, found {count:?}: not a GRO file?"),
        )
    })?;
    let mut atoms = Vec::with_capacity(natom);
    for i in 0..natom {
        let Some(line) = lines.next() else {
            return Err(ModelError::format(
                path,
                format!("the file ends after {i} of its {natom} atoms: truncated file?"),
            ));
        };
        let bad = || {
            ModelError::format(
                path,
                format!("line {}: unreadable atom line {line:?}", i + 3),
            )
        };
        // 20 columns of names and numbers, then three coordinates of at
        // least 5 characters each.
        if line.len() < 35 {
            return Err(bad());
        }
        let number: i64 = col(line, 0, 5).trim().parse().map_err(|_| bad())?;
        let resname = col(line, 5, 10).trim();
        let name = col(line, 10, 15).trim();
        if resname.is_empty() || name.is_empty() {
            return Err(bad());
        }
        atoms.push(TopologyAtom {
            residue: ResidueId {
                chain: String::new(),
                number,
                insertion: ' ',
                name: resname.to_string(),
            },
            name: name.to_string(),
        });
    }
    Ok(atoms)
}

/// The error for a trajectory whose atom count differs from its topology's.
fn count_mismatch(trajectory: &Path, topology: &Path, n_traj: usize, n_top: usize) -> ModelError {
    let name = trajectory
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| trajectory.display().to_string());
    ModelError::format(
        trajectory,
        format!(
            "{name} has {n_traj} atoms per frame but the topology {} has {n_top}: \
             they must describe the same atoms in the same order",
            topology.display()
        ),
    )
}

/// Reads `buf.len()` bytes or up to the end of the input; returns how many.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// DCD

/// A DCD file being read: its byte order, record-marker width and position.
struct DcdFile<'a> {
    path: &'a Path,
    r: BufReader<File>,
    len: u64,
    pos: u64,
    big_endian: bool,
    /// 8-byte record markers (CHARMM built with 64-bit integers).
    wide_markers: bool,
}

impl DcdFile<'_> {
    fn i32_at(&self, b: &[u8], i: usize) -> i32 {
        let w: [u8; 4] = b[4 * i..4 * i + 4].try_into().expect("4 bytes");
        if self.big_endian {
            i32::from_be_bytes(w)
        } else {
            i32::from_le_bytes(w)
        }
    }

    fn f32_at(&self, b: &[u8], i: usize) -> f32 {
        f32::from_bits(self.i32_at(b, i) as u32)
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::format(self.path, msg)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(self.err(format!(
                "truncated: the file ({} bytes) ends inside {what}",
                self.len
            )));
        }
        self.r
            .read_exact(buf)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn marker(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = if self.wide_markers { 8 } else { 4 };
        self.read_exact(&mut b[..n], what)?;
        Ok(match (self.wide_markers, self.big_endian) {
            (false, false) => u32::from_le_bytes(b[..4].try_into().expect("4")) as u64,
            (false, true) => u32::from_be_bytes(b[..4].try_into().expect("4")) as u64,
            (true, false) => u64::from_le_bytes(b),
            (true, true) => u64::from_be_bytes(b),
        })
    }

    /// One Fortran record into `buf`; `expect` is its length when known.
    fn record(&mut self, buf: &mut Vec<u8>, expect: Option<usize>, what: &str) -> Result<()> {
        let len = self.marker(what)?;
        if let Some(e) = expect {
            if len != e as u64 {
                return Err(self.err(format!(
                    "{what}: the record is {len} bytes long where {e} were expected: corrupt file"
                )));
            }
        }
        if self.pos + len > self.len {
            return Err(self.err(format!(
                "truncated: the file ({} bytes) ends inside {what}",
                self.len
            )));
        }
        buf.resize(len as usize, 0);
        self.read_exact(buf, what)?;
        let end = self.marker(what)?;
        if end != len {
            return Err(self.err(format!(
                "{what}: the record's markers disagree ({len} bytes at its start, {end} at its end): corrupt file"
            )));
        }
        Ok(())
    }
}

/// Backbone frames of a DCD file; `sel` is the topology's backbone.
fn read_dcd(path: &Path, topology: &Path, sel: &BackboneSelection) -> Result<Vec<Backbone>> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    // The header record is 84 bytes ("CORD" and 20 integers): its leading
    // marker tells the byte order and the marker width.
    let mut head = [0u8; 12];
    let n = read_up_to(&mut r, &mut head).map_err(|e| ModelError::io(path, e))?;
    if n < head.len() {
        return Err(ModelError::format(
            path,
            format!("{len} bytes is too short for a DCD file"),
        ));
    }
    let w4 = |b: &[u8]| -> [u8; 4] { b[..4].try_into().expect("4 bytes") };
    let w8 = |b: &[u8]| -> [u8; 8] { b[..8].try_into().expect("8 bytes") };
    let (big_endian, wide_markers) = if &head[4..8] == b"CORD"
        && u32::from_le_bytes(w4(&head)) == 84
    {
        (false, false)
    } else if &head[4..8] == b"CORD" && u32::from_be_bytes(w4(&head)) == 84 {
        (true, false)
    } else if &head[8..12] == b"CORD" && u64::from_le_bytes(w8(&head)) == 84 {
        (false, true)
    } else if &head[8..12] == b"CORD" && u64::from_be_bytes(w8(&head)) == 84 {
        (true, true)
    } else {
        return Err(ModelError::format(
            path,
            "not a coordinate DCD file: it does not start with an 84-byte header record holding \"CORD\"",
        ));
    };
    r.seek_relative(-(n as i64))
        .map_err(|e| ModelError::io(path, e))?;
    let mut f = DcdFile {
        path,
        r,
        len,
        pos: 0,
        big_endian,
        wide_markers,
    };
    let mut buf = Vec::new();
    f.record(&mut buf, Some(84), "the header")?;
    // ICNTRL[0..20] after "CORD". NSET (ICNTRL[0]) is not trusted: CHARMM
    // writes the planned count and an interrupted run leaves it wrong, so
    // frames are read up to the end of the file, as MDAnalysis counts them.
    let icntrl: Vec<i32> = (0..20).map(|i| f.i32_at(&buf[4..], i)).collect();
    let namnf = icntrl[8];
    // CHARMM files set ICNTRL[19] (the version); only they have the flags.
    let charmm = icntrl[19] != 0;
    let unit_cell = charmm && icntrl[10] != 0;
    let four_dims = charmm && icntrl[11] == 1;
    f.record(&mut buf, None, "the title block")?;
    f.record(&mut buf, Some(4), "the atom count (NATOM) record")?;
    let natom = f.i32_at(&buf, 0);
    if natom <= 0 {
        return Err(f.err(format!("the header gives {natom} atoms")));
    }
    let natom = natom as usize;
    if namnf != 0 {
        return Err(f.err(format!(
            "the file has {namnf} fixed atoms (NAMNF in the header): DCD files with fixed \
             atoms are not supported; write the trajectory without fixed atoms"
        )));
    }
    if natom != sel.n_atoms {
        return Err(count_mismatch(path, topology, natom, sel.n_atoms));
    }
    let marker = if wide_markers { 8 } else { 4 };
    let frame_bytes = (3 + four_dims as u64) * (4 * natom as u64 + 2 * marker)
        + if unit_cell { 48 + 2 * marker } else { 0 };
    let mut frames = Vec::with_capacity(((len - f.pos) / frame_bytes).min(1 << 20) as usize);
    let mut xyz: [Vec<u8>; 3] = Default::default();
    while f.pos < len {
        let k = frames.len() + 1;
        if unit_cell {
            // Usually 6 doubles; any length is skipped, as libdcd does.
            f.record(&mut buf, None, &format!("frame {k} (its unit cell)"))?;
        }
        for (axis, b) in ["X", "Y", "Z"].iter().zip(xyz.iter_mut()) {
            f.record(
                b,
                Some(4 * natom),
                &format!("frame {k} (its {axis} coordinates)"),
            )?;
        }
        if four_dims {
            f.record(
                &mut buf,
                Some(4 * natom),
                &format!("frame {k} (its 4th dimension)"),
            )?;
        }
        let frame: Backbone = sel
            .atoms
            .iter()
            .map(|idx| idx.map(|i| [0, 1, 2].map(|a| f.f32_at(&xyz[a], i))))
            .collect();
        frames.push(frame);
    }
    Ok(frames)
}

// ---------------------------------------------------------------------------
// XTC

/// Bytes of an XTC frame header: magic, natoms, step, time, box (9), natoms.
const XTC_HEADER: usize = 56;

/// Backbone frames of an XTC file; `sel` is the topology's backbone.
fn read_xtc(path: &Path, topology: &Path, sel: &BackboneSelection) -> Result<Vec<Backbone>> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let io_err = |e| ModelError::io(path, e);
    let mut reader = molly::XTCReader::new(BufReader::with_capacity(1 << 20, file));
    // Decode only up to the last backbone atom, keeping the backbone ones.
    let mut wanted: Vec<u32> = sel.atoms.iter().flatten().map(|&i| i as u32).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let selection = molly::selection::AtomSelection::from_index_list(&wanted);
    let rank = |i: usize| wanted.binary_search(&(i as u32)).expect("selected atom");
    let mut frame = molly::Frame::default();
    let mut scratch = Vec::new();
    let mut frames = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let k = frames.len() + 1;
        let err = |msg: String| ModelError::format(path, format!("frame {k}: {msg}"));
        // molly panics on an inconsistent header and allocates whatever
        // size a corrupt one gives: check the header and the size of the
        // compressed block before it reads them.
        let mut head = [0u8; XTC_HEADER + 40];
        let n = read_up_to(&mut reader.file, &mut head).map_err(io_err)?;
        reader.file.seek_relative(-(n as i64)).map_err(io_err)?;
        let be = |i: usize| u32::from_be_bytes(head[4 * i..4 * i + 4].try_into().expect("4"));
        let truncated = || {
            err(format!(
                "truncated: the file ({len} bytes) ends inside this frame ({} complete frames before it)",
                k - 1
            ))
        };
        if n < XTC_HEADER {
            return Err(truncated());
        }
        let magic = be(0);
        if magic != 1995 && magic != 2023 {
            return Err(err(format!(
                "not an XTC frame (magic number {magic}, expected 1995 or 2023): corrupt file{}",
                if k == 1 { " or not an XTC file" } else { "" }
            )));
        }
        let natoms = be(1) as usize;
        if be(13) as usize != natoms {
            return Err(err(format!(
                "the header gives {natoms} and {} atoms: corrupt file",
                be(13)
            )));
        }
        if natoms != sel.n_atoms {
            return Err(count_mismatch(path, topology, natoms, sel.n_atoms));
        }
        // After the header: 9 or fewer atoms are stored as plain floats;
        // more as precision, minint[3], maxint[3], smallidx, byte count
        // (u32, or u64 for magic 2023) and the bytes padded to 4.
        let size = if natoms <= 9 {
            XTC_HEADER as u64 + 12 * natoms as u64
        } else {
            let prelude = XTC_HEADER + 32 + if magic == 2023 { 8 } else { 4 };
            if n < prelude {
                return Err(truncated());
            }
            // molly indexes its size table with smallidx unchecked.
            let smallidx = be(21);
            if !(9..73).contains(&smallidx) {
                return Err(err(format!(
                    "corrupt compressed coordinates (size index {smallidx}, expected 9 to 72)"
                )));
            }
            let nbytes = if magic == 2023 {
                (be(22) as u64) << 32 | be(23) as u64
            } else {
                be(22) as u64
            };
            prelude as u64 + nbytes.div_ceil(4) * 4
        };
        if pos + size > len {
            return Err(truncated());
        }
        // molly's decoder asserts on some corrupt data: a panic there is a
        // corrupt frame, not a crash of the caller.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            reader.read_frame_with_scratch(&mut frame, &mut scratch, &selection)
        }));
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(truncated()),
            Ok(Err(e)) => return Err(err(format!("unreadable: {e}"))),
            Err(_) => return Err(err("corrupt compressed coordinates".into())),
        }
        if frame.positions.len() != 3 * wanted.len() {
            return Err(err("corrupt compressed coordinates".into()));
        }
        pos = reader.file.stream_position().map_err(io_err)?;
        let at = |i: usize| -> [f32; 3] {
            let p = 3 * rank(i);
            [0, 1, 2].map(|a| frame.positions[p + a] * 10.0) // nm to Å
        };
        frames.push(sel.atoms.iter().map(|idx| idx.map(at)).collect());
    }
    Ok(frames)
}
