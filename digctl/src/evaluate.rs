//! `digctl evaluate`: scores a sampled ensemble for physical validity
//! (BioEmu's criteria, [`dig_model::evaluate`]) and for closeness to
//! reference structures (CA-RMSD after optimal superposition), optionally
//! to the nearest frame of the training data, and draws the samples on the
//! plane of CA-RMSD to two references.
//!
//! Output: a JSON summary on stdout and in a file (`--out`, or
//! `evaluation.json` in the samples directory), and a short human summary
//! on stderr.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dig_model::backbone::{read_pdb, read_trajectory};
use dig_model::dataset::read_manifest;
use dig_model::evaluate::{
    validity, Centered, Validity, CLASH_DISTANCE, CLASH_MIN_SEPARATION, CRITERIA, MAX_CA_CA,
    MAX_C_N,
};
use dig_model::structure::Ensemble;
use serde::Deserialize;
use serde_json::{json, Value};

/// A sample "is close" to a reference within this CA-RMSD (Å); the summary
/// reports the fraction of such samples as `fraction_within_3A`.
const WITHIN: f64 = 3.0;
const WITHIN_KEY: &str = "fraction_within_3A";
/// A sample farther than this CA-RMSD (Å) from every training frame counts
/// as misfolded: `fraction_farther_than_6A` of the nearest-frame summary.
const FAR: f64 = 6.0;
const FAR_KEY: &str = "fraction_farther_than_6A";
/// Of all samples, those farther than [`FAR`] from every training frame
/// whose mirror image lies within [`FAR`] of one: the wrong handedness of a
/// learnt fold, not a new fold.
const MIRROR_KEY: &str = "fraction_mirror_images";

/// Which ensemble `--reweight` estimates from steered samples.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Reweight {
    /// The unsteered model's ensemble: weights `Z_hat exp(U)`.
    Unsteered,
    /// The steered (tilted) target: weights `Z_hat`.
    Tilted,
}

/// Size of the `--plot` PNG in pixels.
const PLOT_SIZE: (u32, u32) = (800, 800);
/// DejaVu Sans (licence in `digctl/assets/LICENSE_DEJAVU`), so that the plot
/// has text on machines without system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

#[derive(Args)]
pub struct EvaluateArgs {
    /// The samples: an .npz (`tr`, `rot_mat`, `sample_index`), a `digctl sample --out`
    /// directory (samples.npz) or a `digctl fetch --out` directory (manifest.json, shards/).
    #[arg(long)]
    samples: PathBuf,
    /// A reference structure (PDB; its first model), with the samples' residues. Repeat for
    /// several; each is named after its file stem.
    #[arg(long = "reference", required = true)]
    references: Vec<PathBuf>,
    /// Training-data manifest (JSON Lines, as for `digctl train`): also report each sample's
    /// CA-RMSD to the nearest training frame, and draw the frames on --plot.
    #[arg(long)]
    frames: Option<PathBuf>,
    /// Where to write the JSON summary (default: evaluation.json in the samples directory;
    /// none for an .npz).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw a PNG: x = CA-RMSD to the first reference, y = to the second (needs two).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Steered samples (npz with `steer_energy`, `steer_log_z`): weight every
    /// fraction (valid, within 3 Å, farther than 6 Å) by self-normalised
    /// importance weights towards the unsteered ensemble (`unsteered`) or the
    /// steering target (`tilted`); the summary gives the weights' effective
    /// sample size, and --plot sizes each sample by its weight.
    #[arg(long, value_enum)]
    reweight: Option<Reweight>,
    /// With --plot: draw another ensemble's samples underneath in grey (for
    /// example the unsteered run beside a steered one).
    #[arg(long, requires = "plot")]
    overlay: Option<PathBuf>,
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        if args.references.len() < 2 {
            bail!(
                "--plot needs two --reference structures (x: CA-RMSD to the first, y: to the \
                 second); got {}",
                args.references.len()
            );
        }
        if let Some(ext) = plot.extension().and_then(|e| e.to_str()) {
            if !ext.eq_ignore_ascii_case("png") {
                bail!("--plot writes a PNG; name it *.png, not {}", plot.display());
            }
        }
    }
    let (ensemble, samples_dir) = read_samples(&args.samples)?;
    let l = ensemble.len_residues();
    let refs = read_references(&args.references, l)?;
    let frames = args
        .frames
        .as_deref()
        .map(|m| read_training_frames(m, l))
        .transpose()?;

    let mut records = score(&ensemble, &refs, frames.as_ref());
    let mut ess = None;
    if let Some(mode) = args.reweight {
        let st = ensemble.steer.as_ref().ok_or_else(|| {
            anyhow!(
                "--reweight needs steered samples: {} has no steer_energy/steer_log_z (sample with --steer)",
                args.samples.display()
            )
        })?;
        let w = dig_model::sampling::steering::reweight(
            &st.log_z,
            &st.energy,
            mode == Reweight::Unsteered,
        );
        ess = Some(dig_model::sampling::steering::effective_sample_size(&w));
        for (r, w) in records.iter_mut().zip(w) {
            r.weight = w;
        }
    }
    let mut summary = summary_json(&args.samples, l, &refs, frames.as_ref(), &records);
    if let (Some(mode), Some(ess)) = (args.reweight, ess) {
        summary["reweighted"] = json!({
            "towards": match mode { Reweight::Unsteered => "unsteered", Reweight::Tilted => "tilted" },
            "effective_sample_size": ess,
            "note": "fractions are importance-weighted; medians and min/max are of the samples as drawn",
        });
    }

    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    eprint!("{}", human_summary(l, &refs, frames.as_ref(), &records));
    let out = args
        .out
        .clone()
        .or_else(|| samples_dir.map(|d| d.join("evaluation.json")));
    if let Some(out) = out {
        write_atomically(&out, |w| w.write_all(format!("{text}\n").as_bytes()))?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(path) = &args.plot {
        let overlay = match &args.overlay {
            Some(o) => {
                let (e, _) = read_samples(o)?;
                if e.len_residues() != l {
                    bail!(
                        "--overlay {} has {} residues, the samples {l}",
                        o.display(),
                        e.len_residues()
                    );
                }
                Some((o.clone(), score(&e, &refs, None)))
            }
            None => None,
        };
        plot(
            path,
            &args.samples,
            &refs,
            frames.as_ref(),
            &records,
            ensemble.num_samples(),
            args.reweight.is_some(),
            overlay.as_ref(),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------- input

/// The samples of `path`, ordered by sample index, and the directory to put
/// `evaluation.json` in when `path` is one.
fn read_samples(path: &Path) -> Result<(Ensemble, Option<PathBuf>)> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot read --samples {}", path.display()))?;
    if !meta.is_dir() {
        return Ok((merge(vec![(path.to_path_buf(), read_npz(path)?)])?, None));
    }
    let manifest = path.join("manifest.json");
    let single = path.join("samples.npz");
    let parts = if manifest.is_file() {
        read_fetched(path, &manifest)?
    } else if single.is_file() {
        vec![(single.clone(), read_npz(&single)?)]
    } else if path.join("shards").is_dir() {
        bail!(
            "{} has shards/ but no manifest.json: `digctl fetch` writes the manifest last, so \
             the download is incomplete; run the fetch again",
            path.display()
        );
    } else {
        bail!(
            "{} holds neither samples.npz (`digctl sample --out`) nor manifest.json with \
             shards/ (`digctl fetch --out`)",
            path.display()
        );
    };
    Ok((merge(parts)?, Some(path.to_path_buf())))
}

fn read_npz(path: &Path) -> Result<Ensemble> {
    Ok(Ensemble::read_npz_any(path)?)
}

/// The part of a results manifest (`dig_coordinator::Manifest`) this needs.
#[derive(Deserialize)]
struct FetchManifest {
    shards: Vec<FetchShard>,
}

#[derive(Deserialize)]
struct FetchShard {
    index: u64,
    start: u64,
    end: u64,
}

/// Every shard a `digctl fetch` directory's manifest lists.
fn read_fetched(dir: &Path, manifest: &Path) -> Result<Vec<(PathBuf, Ensemble)>> {
    let text = fs::read(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let m: FetchManifest = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a results manifest of `digctl fetch`",
            manifest.display()
        )
    })?;
    if m.shards.is_empty() {
        bail!("{} lists no shards", manifest.display());
    }
    let mut shards = m.shards;
    shards.sort_by_key(|s| (s.start, s.index));
    shards
        .iter()
        .map(|s| {
            let path = dir.join("shards").join(format!("{:06}.npz", s.index));
            if !path.is_file() {
                bail!(
                    "{} lists shard {} (samples {}..{}), but {} is missing; run the fetch again",
                    manifest.display(),
                    s.index,
                    s.start,
                    s.end,
                    path.display()
                );
            }
            let e = read_npz(&path)?;
            let expected = s.end.saturating_sub(s.start);
            if e.num_samples() as u64 != expected {
                bail!(
                    "{} holds {} samples, but {} says shard {} has samples {}..{}",
                    path.display(),
                    e.num_samples(),
                    manifest.display(),
                    s.index,
                    s.start,
                    s.end
                );
            }
            Ok((path, e))
        })
        .collect()
}

/// One ensemble of every part's samples, ordered by sample index.
fn merge(parts: Vec<(PathBuf, Ensemble)>) -> Result<Ensemble> {
    let (first, _) = parts.first().ok_or_else(|| anyhow!("no samples"))?;
    let l = parts[0].1.len_residues();
    let mut all: Vec<(i64, usize, usize)> = Vec::new(); // (index, part, sample)
    for (p, (path, e)) in parts.iter().enumerate() {
        if e.len_residues() != l {
            bail!(
                "{} has {} residues, but {} has {l}: the shards are not of one protein",
                path.display(),
                e.len_residues(),
                first.display()
            );
        }
        all.extend(
            e.sample_index
                .iter()
                .enumerate()
                .map(|(i, &index)| (index, p, i)),
        );
    }
    if all.is_empty() {
        bail!("{} holds no samples", first.display());
    }
    all.sort_by_key(|&(index, p, i)| (index, p, i));
    for w in all.windows(2) {
        if w[0].0 == w[1].0 {
            bail!(
                "sample index {} appears twice ({} and {})",
                w[0].0,
                parts[w[0].1].0.display(),
                parts[w[1].1].0.display()
            );
        }
    }
    let mut merged = Ensemble {
        sequence: parts[0].1.sequence.clone(),
        sample_index: Vec::with_capacity(all.len()),
        tr: Vec::with_capacity(all.len() * l * 3),
        rot_mat: Vec::with_capacity(all.len() * l * 9),
        steer: parts
            .iter()
            .all(|(_, e)| e.steer.is_some())
            .then(Default::default),
        log_density: parts
            .iter()
            .all(|(_, e)| e.log_density.is_some())
            .then(Default::default),
    };
    for &(index, p, i) in &all {
        let e = &parts[p].1;
        if let (Some(m), Some(d)) = (merged.log_density.as_mut(), e.log_density.as_ref()) {
            m.log_density.push(d.log_density[i]);
            m.std_error.push(d.std_error[i]);
        }
        if let (Some(m), Some(s)) = (merged.steer.as_mut(), e.steer.as_ref()) {
            m.energy.push(s.energy[i]);
            m.log_z.push(s.log_z[i]);
        }
        merged.sample_index.push(index);
        merged
            .tr
            .extend_from_slice(&e.tr[i * l * 3..(i + 1) * l * 3]);
        merged
            .rot_mat
            .extend_from_slice(&e.rot_mat[i * l * 9..(i + 1) * l * 9]);
    }
    Ok(merged)
}

/// A reference structure's CA atoms.
struct Reference {
    name: String,
    path: PathBuf,
    ca: Centered,
}

fn read_references(paths: &[PathBuf], l: usize) -> Result<Vec<Reference>> {
    let names = reference_names(paths);
    paths
        .iter()
        .zip(names)
        .map(|(path, name)| {
            let t = read_pdb(path)?;
            let n = t.len_residues();
            if n != l {
                bail!(
                    "reference {} has {n} residues, but the samples have {l}: a reference must \
                     be the sampled protein, residue for residue",
                    path.display()
                );
            }
            let first = t
                .frames
                .first()
                .ok_or_else(|| anyhow!("reference {} has no model", path.display()))?;
            Ok(Reference {
                name,
                path: path.clone(),
                ca: Centered::ca(first),
            })
        })
        .collect()
}

/// File stems, made unique with `-2`, `-3`, ... where two are the same.
fn reference_names(paths: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(paths.len());
    for p in paths {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "reference".into());
        let mut name = stem.clone();
        let mut k = 2;
        while names.contains(&name) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        names.push(name);
    }
    names
}

/// The training frames of a data manifest that have the samples' residue count.
struct TrainingFrames {
    manifest: PathBuf,
    frames: Vec<Centered>,
    /// Trajectories used, with their frame counts.
    used: Vec<(PathBuf, usize)>,
    /// Trajectories of another residue count (another protein), with it.
    skipped: Vec<(PathBuf, usize)>,
}

fn read_training_frames(manifest: &Path, l: usize) -> Result<TrainingFrames> {
    let entries = read_manifest(manifest)?;
    let mut out = TrainingFrames {
        manifest: manifest.to_path_buf(),
        frames: Vec::new(),
        used: Vec::new(),
        skipped: Vec::new(),
    };
    for e in &entries {
        let t = read_trajectory(&e.trajectory, e.topology.as_deref())?;
        if t.len_residues() != l {
            eprintln!(
                "note: skipping training trajectory {} ({} residues, the samples have {l})",
                e.trajectory.display(),
                t.len_residues()
            );
            out.skipped.push((e.trajectory.clone(), t.len_residues()));
            continue;
        }
        out.used.push((e.trajectory.clone(), t.frames.len()));
        out.frames.extend(t.frames.iter().map(|f| Centered::ca(f)));
    }
    if out.frames.is_empty() {
        bail!(
            "{}: no training trajectory has the samples' {l} residues",
            manifest.display()
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------- scoring

/// What is measured on one sample.
struct Record {
    index: i64,
    validity: Validity,
    /// CA-RMSD to each reference, in order (Å).
    rmsd: Vec<f64>,
    /// CA-RMSD to the nearest training frame (Å), with --frames.
    nearest: Option<f64>,
    /// The same for the sample's mirror image (Å), with --frames.
    nearest_mirror: Option<f64>,
    /// Weight in every fraction (1/N, or the importance weight with --reweight).
    weight: f64,
}

/// Scores every sample, on all cores.
fn score(e: &Ensemble, refs: &[Reference], frames: Option<&TrainingFrames>) -> Vec<Record> {
    let one = |i: usize| {
        let bb = e.backbone(i);
        let ca = Centered::ca(&bb);
        let nearest_of = |ca: &Centered| {
            frames.map(|t| {
                let best = t
                    .frames
                    .iter()
                    .map(|f| ca.rmsd(f))
                    .fold(f64::INFINITY, f64::min);
                // Only NaN distances (non-finite coordinates) leave it infinite.
                if best.is_finite() {
                    best
                } else {
                    f64::NAN
                }
            })
        };
        let nearest = nearest_of(&ca);
        let nearest_mirror = nearest_of(&ca.mirrored());
        Record {
            index: e.sample_index[i],
            validity: validity(&bb),
            rmsd: refs.iter().map(|r| ca.rmsd(&r.ca)).collect(),
            nearest,
            nearest_mirror,
            weight: 1.0 / e.num_samples() as f64,
        }
    };
    let n = e.num_samples();
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n)
        .max(1);
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let one = &one;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(one)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("scoring thread panicked"))
            .collect()
    })
}

/// Statistics of the finite values of `values`; NaN where there are none.
struct Stats {
    median: f64,
    mean: f64,
    min: f64,
    max: f64,
    p05: f64,
    p95: f64,
}

impl Stats {
    fn of(values: impl Iterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let mean = if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        Stats {
            median: percentile(&v, 0.5),
            mean,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            p05: percentile(&v, 0.05),
            p95: percentile(&v, 0.95),
        }
    }
}

/// The `p` quantile of sorted values, interpolated linearly between order
/// statistics (numpy's default); NaN for none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let h = (n - 1) as f64 * p;
            let lo = h.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

/// Weighted fraction of the samples whose value is below [`WITHIN`]
/// (weights 1/N unless reweighted).
fn fraction_within(records: &[Record], value: impl Fn(&Record) -> f64) -> f64 {
    fraction(records, |r| value(r) < WITHIN)
}

/// Farther than [`FAR`] from every training frame (or not measurable).
fn misfolded(r: &Record) -> bool {
    r.nearest.is_none_or(|d| d.is_nan() || d > FAR)
}

/// Misfolded, but within [`FAR`] of a training frame once reflected.
fn mirror_image(r: &Record) -> bool {
    misfolded(r) && r.nearest_mirror.is_some_and(|d| d <= FAR)
}

/// Kish's effective sample size of the records' weights (N when uniform).
fn ess(records: &[Record]) -> f64 {
    let total: f64 = records.iter().map(|r| r.weight).sum();
    total * total / records.iter().map(|r| r.weight * r.weight).sum::<f64>()
}

/// Standard error of a (weighted) fraction `f`: `sqrt(f (1 - f) / ESS)`.
fn fraction_se(records: &[Record], f: f64) -> f64 {
    (f * (1.0 - f) / ess(records)).sqrt()
}

/// Weighted fraction of the samples for which `pred` holds, of their total weight.
fn fraction(records: &[Record], pred: impl Fn(&Record) -> bool) -> f64 {
    let total: f64 = records.iter().map(|r| r.weight).sum();
    (0.0 + records
        .iter()
        .filter(|r| pred(r))
        .map(|r| r.weight)
        .sum::<f64>())
        / total
}

fn failure_count(records: &[Record], criterion: &str) -> usize {
    records
        .iter()
        .filter(|r| r.validity.failed.contains(&criterion))
        .count()
}

// ---------------------------------------------------------------- output

fn summary_json(
    samples: &Path,
    l: usize,
    refs: &[Reference],
    frames: Option<&TrainingFrames>,
    records: &[Record],
) -> Value {
    let n = records.len();
    let valid = records.iter().filter(|r| r.validity.valid).count();
    let valid_fraction = fraction(records, |r| r.validity.valid);
    let failures: serde_json::Map<String, Value> = CRITERIA
        .iter()
        .map(|c| (c.to_string(), json!(failure_count(records, c))))
        .collect();
    let references: Vec<Value> = refs
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let s = Stats::of(records.iter().map(|rec| rec.rmsd[k]));
            let within = fraction_within(records, |rec| rec.rmsd[k]);
            json!({
                "name": r.name,
                "path": r.path,
                "median": s.median,
                "mean": s.mean,
                "min": s.min,
                "p05": s.p05,
                "p95": s.p95,
                WITHIN_KEY: within,
                "fraction_within_3A_se": fraction_se(records, within),
            })
        })
        .collect();
    let nearest_frame = frames.map(|t| {
        let s = Stats::of(records.iter().filter_map(|r| r.nearest));
        json!({
            "manifest": t.manifest,
            "frames": t.frames.len(),
            "trajectories": t.used.iter().map(|(p, f)| json!({"path": p, "frames": f})).collect::<Vec<_>>(),
            "skipped": t.skipped.iter().map(|(p, l)| json!({"path": p, "residues": l})).collect::<Vec<_>>(),
            "median": s.median,
            "mean": s.mean,
            "min": s.min,
            "max": s.max,
            WITHIN_KEY: fraction_within(records, |r| r.nearest.unwrap_or(f64::NAN)),
            FAR_KEY: fraction(records, misfolded),
            MIRROR_KEY: fraction(records, mirror_image),
        })
    });
    // The valid samples alone: does what is valid keep the ensemble's shape?
    let valid_recs: Vec<&Record> = records.iter().filter(|r| r.validity.valid).collect();
    let valid_total: f64 = valid_recs.iter().map(|r| r.weight).sum();
    let valid_frac = |pred: &dyn Fn(&Record) -> bool| {
        if valid_total > 0.0 {
            valid_recs
                .iter()
                .filter(|r| pred(r))
                .map(|r| r.weight)
                .sum::<f64>()
                / valid_total
        } else {
            f64::NAN
        }
    };
    let valid_only = json!({
        "samples": valid_recs.len(),
        "references": refs.iter().enumerate().map(|(k, r)| json!({
            "name": r.name,
            "median": Stats::of(valid_recs.iter().map(|rec| rec.rmsd[k])).median,
            WITHIN_KEY: valid_frac(&|rec: &Record| rec.rmsd[k] < WITHIN),
        })).collect::<Vec<_>>(),
        "nearest_frame_median": frames.map(|_| Stats::of(valid_recs.iter().filter_map(|r| r.nearest)).median),
    });
    let per_sample: Vec<Value> = records
        .iter()
        .map(|r| {
            let rmsd: serde_json::Map<String, Value> = refs
                .iter()
                .zip(&r.rmsd)
                .map(|(rf, &x)| (rf.name.clone(), json!(x)))
                .collect();
            let mut v = json!({
                "index": r.index,
                "valid": r.validity.valid,
                "failed": r.validity.failed,
                "ca_ca_max": r.validity.ca_ca_max,
                "c_n_max": r.validity.c_n_max,
                "clash_min": r.validity.clash_min,
                "rmsd": rmsd,
            });
            if let Some(x) = r.nearest {
                v["nearest_frame_rmsd"] = json!(x);
            }
            if let Some(x) = r.nearest_mirror {
                v["mirror_nearest_frame_rmsd"] = json!(x);
            }
            v
        })
        .collect();
    let mut summary = json!({
        "samples": samples,
        "num_samples": n,
        "num_residues": l,
        "valid": valid,
        "valid_fraction": valid_fraction,
        "valid_fraction_se": fraction_se(records, valid_fraction),
        "failures": failures,
        "criteria": {
            "ca_ca_max": MAX_CA_CA,
            "c_n_max": MAX_C_N,
            "clash_distance": CLASH_DISTANCE,
            "clash_min_separation": CLASH_MIN_SEPARATION,
            "within": WITHIN,
        },
        "references": references,
        "valid_samples": valid_only,
        "per_sample": per_sample,
    });
    if let Some(nf) = nearest_frame {
        summary["nearest_frame"] = nf;
    }
    summary
}

fn human_summary(
    l: usize,
    refs: &[Reference],
    frames: Option<&TrainingFrames>,
    records: &[Record],
) -> String {
    let n = records.len();
    let valid = records.iter().filter(|r| r.validity.valid).count();
    let mut s = format!(
        "{n} samples of {l} residues: {valid} valid ({:.1}%)",
        100.0 * fraction(records, |r| r.validity.valid)
    );
    if valid < n {
        let parts: Vec<String> = CRITERIA
            .iter()
            .map(|c| format!("{c} {}", failure_count(records, c)))
            .collect();
        s.push_str(&format!("; failed: {}", parts.join(", ")));
    }
    s.push('\n');
    for (k, r) in refs.iter().enumerate() {
        let st = Stats::of(records.iter().map(|rec| rec.rmsd[k]));
        let f = fraction_within(records, |rec| rec.rmsd[k]);
        s.push_str(&format!(
            "  {}: median CA-RMSD {:.2} Å (5-95% {:.2}-{:.2}), {:.1}% (± {:.1}) within {WITHIN} Å\n",
            r.name,
            st.median,
            st.p05,
            st.p95,
            100.0 * f,
            100.0 * fraction_se(records, f)
        ));
    }
    if let Some(t) = frames {
        let st = Stats::of(records.iter().filter_map(|r| r.nearest));
        s.push_str(&format!(
            "  nearest of {} training frames: median CA-RMSD {:.2} Å, mean {:.2} Å, {:.1}% farther than {FAR} Å \
             ({:.1}% mirror images: within {FAR} Å of a frame once reflected)\n",
            t.frames.len(),
            st.median,
            st.mean,
            100.0 * fraction(records, misfolded),
            100.0 * fraction(records, mirror_image)
        ));
    }
    s
}

/// Writes `path` through a temporary file in the same directory and a
/// rename, so that the final name only ever holds a complete file.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} does not name a file", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    });
    if let Err(e) = result.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------- plot

#[allow(clippy::too_many_arguments)]
fn plot(
    path: &Path,
    samples: &Path,
    refs: &[Reference],
    frames: Option<&TrainingFrames>,
    records: &[Record],
    n: usize,
    weighted: bool,
    overlay: Option<&(PathBuf, Vec<Record>)>,
) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is not a valid TrueType font"))?;
    let (a, b) = (&refs[0], &refs[1]);
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (valid, invalid): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| r.validity.valid);
    // Marker radius: 3 px, or with --reweight 3 px at the mean weight,
    // growing as the square root of the weight (1-12 px).
    let radius = |r: &Record| -> i32 {
        if weighted {
            (3.0 * (r.weight * n as f64).sqrt())
                .round()
                .clamp(1.0, 12.0) as i32
        } else {
            3
        }
    };
    let points = |rs: Vec<&Record>| -> Vec<((f64, f64), i32)> {
        rs.iter()
            .map(|r| ((r.rmsd[0], r.rmsd[1]), radius(r)))
            .filter(|(p, _)| finite(p))
            .collect()
    };
    let (valid, invalid) = (points(valid), points(invalid));
    let grey: Vec<(f64, f64)> = overlay
        .map(|(_, rs)| {
            rs.iter()
                .map(|r| (r.rmsd[0], r.rmsd[1]))
                .filter(finite)
                .collect()
        })
        .unwrap_or_default();
    let train: Vec<(f64, f64)> = frames
        .map(|t| {
            t.frames
                .iter()
                .map(|f| (f.rmsd(&a.ca), f.rmsd(&b.ca)))
                .filter(finite)
                .collect()
        })
        .unwrap_or_default();
    // One range for both axes, so that the diagonal means "equally far".
    let top = valid
        .iter()
        .chain(&invalid)
        .map(|(p, _)| p)
        .chain(&train)
        .chain(&grey)
        .flat_map(|&(x, y)| [x, y])
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.05 } else { 1.0 };

    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let draw_err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let source = samples
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("CA-RMSD of {n} samples ({source})"),
                ("sans-serif", 24),
            )
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..top, 0f64..top)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!("CA-RMSD to {} (Å)", a.name))
            .y_desc(format!("CA-RMSD to {} (Å)", b.name))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 19))
            .light_line_style(RGBColor(242, 242, 242))
            .draw()
            .map_err(|e| draw_err(&e))?;

        let blue = RGBColor(31, 119, 180);
        let red = RGBColor(214, 39, 40);
        let orange = RGBColor(230, 110, 0);
        // The overlay lowest, then invalid samples, valid ones over them,
        // training frames (hollow, so that samples stay visible) on top.
        if let Some((o, _)) = overlay {
            let label = o
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let gray = RGBColor(150, 150, 150);
            chart
                .draw_series(
                    grey.iter()
                        .map(|&p| Circle::new(p, 2, gray.mix(0.6).filled())),
                )
                .map_err(|e| draw_err(&e))?
                .label(format!("{label} ({})", grey.len()))
                .legend(move |p| Circle::new(p, 3, gray.filled()));
        }
        chart
            .draw_series(
                invalid
                    .iter()
                    .map(|&(p, r)| Cross::new(p, r + 1, red.mix(0.8).stroke_width(2))),
            )
            .map_err(|e| draw_err(&e))?
            .label(format!("invalid samples ({})", invalid.len()))
            .legend(move |p| Cross::new(p, 4, red.stroke_width(2)));
        chart
            .draw_series(
                valid
                    .iter()
                    .map(|&(p, r)| Circle::new(p, r, blue.mix(0.7).filled())),
            )
            .map_err(|e| draw_err(&e))?
            .label(format!("valid samples ({})", valid.len()))
            .legend(move |p| Circle::new(p, 4, blue.filled()));
        if frames.is_some() {
            let triangle = move |p| {
                EmptyElement::at(p)
                    + PathElement::new(
                        vec![(0, -6), (-5, 3), (5, 3), (0, -6)],
                        orange.stroke_width(2),
                    )
            };
            chart
                .draw_series(train.iter().map(|&p| triangle(p)))
                .map_err(|e| draw_err(&e))?
                .label(format!("training frames ({})", train.len()))
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(
                            vec![(0, -6), (-5, 3), (5, 3), (0, -6)],
                            orange.stroke_width(2),
                        )
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
    }
    write_atomically(path, |file| {
        let mut enc = png::Encoder::new(file, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(&buf)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        // numpy.percentile([1, 2, 3, 4, 10], 95) = 8.8
        assert!((percentile(&v, 0.95) - 8.8).abs() < 1e-12);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(percentile(&[7.0], 0.05), 7.0);
    }

    #[test]
    fn reference_names_are_stems_made_unique() {
        let names = reference_names(&[
            PathBuf::from("a/closed.pdb"),
            PathBuf::from("b/closed.pdb"),
            PathBuf::from("open.pdb"),
        ]);
        assert_eq!(names, ["closed", "closed-2", "open"]);
    }
}
