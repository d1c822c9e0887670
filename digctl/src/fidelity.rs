//! `digctl bench-fidelity`: how far fewer network calls move the samples.
//!
//! For each solver and step count, the same initial states (seed, indices
//! `0..N`) are sampled and compared with the published 500-step Euler run
//! from those states: per-sample CA-RMSD after superposition (median, 95th
//! percentile), the physically valid fraction, the 1-D Wasserstein distance
//! between the ensembles' RMSD-to-reference distributions (one per
//! reference structure), network calls and seconds per sample. Prints a
//! Markdown table (the one in docs/performance.md) and optionally JSON.
//! With `--flow-above T` every setting, the reference included, follows the
//! probability flow above t = T (the AdK model's recommended setting).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_model::backbone::read_pdb;
use dig_model::evaluate::{ca_rmsd, validity};
use dig_model::features::Features;
use dig_model::sampling::Solver;
use dig_model::sampling::{sample_ensemble, InitialPoses};
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::{DigModel, Sampler, Schedule};
use serde_json::json;

use crate::device::parse_device;

#[derive(Args)]
pub struct FidelityArgs {
    /// Model directory.
    #[arg(long, default_value = "examples/adk/model")]
    model: PathBuf,
    /// Features .npz of the protein.
    #[arg(long, default_value = "examples/adk/features.npz")]
    features: PathBuf,
    /// Reference structures for the ensemble distances (PDB, same residues).
    #[arg(long, default_values = ["examples/adk/closed.pdb", "examples/adk/open.pdb"])]
    reference: Vec<PathBuf>,
    /// Samples per setting (the same initial states for every setting).
    #[arg(long, default_value_t = 64)]
    samples: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Step counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,20,50,100,200")]
    steps: Vec<i64>,
    /// Solvers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "euler,exp,heun,ab2")]
    solvers: Vec<Solver>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// libtorch threads.
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Take the 500-step Euler reference from this `samples.npz` (a `digctl
    /// sample --solver euler` run of the same model, features, seed and
    /// batch size; its first --samples samples) instead of sampling it again.
    #[arg(long)]
    reference_samples: Option<PathBuf>,
    /// Follow the probability flow above diffusion time T in every setting,
    /// the reference included (`digctl sample --flow-above`): the fidelity of
    /// a recommended setting that uses it. A --reference-samples run must
    /// have been sampled with the same T (its run.json says).
    #[arg(long, value_name = "T")]
    flow_above: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// 1-D Wasserstein-1 distance of two samples of equal size.
fn wasserstein(a: &[f64], b: &[f64]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len().max(1) as f64
}

pub fn run(args: FidelityArgs) -> Result<()> {
    if let Some(t) = args.threads {
        tch::set_num_threads(t.max(1));
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let model = DigModel::load_dir(&args.model, device)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let cfg = model.net.config().clone();
    let features = Features::from_npz(&args.features)?;
    features.validate(&cfg)?;
    let l = features.len() as usize;
    let refs: Vec<(String, Vec<[[f32; 3]; 3]>)> = args
        .reference
        .iter()
        .map(|p| {
            let t = read_pdb(p)?;
            if t.len_residues() != l {
                bail!(
                    "{} has {} residues, the features L = {l}",
                    p.display(),
                    t.len_residues()
                );
            }
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((name, t.frames[0].clone()))
        })
        .collect::<Result<_>>()?;
    let ctx = model.net.prepare(
        &features.single.to_device(device),
        &features.pair.to_device(device),
        4096 << 20,
    );
    let so3 = So3Tables::compute();
    let sequence = "X".repeat(l);
    let poses = || InitialPoses::Seeded {
        seed: args.seed,
        indices: (0..args.samples).collect(),
    };
    let draw = |solver: Solver, steps: i64| -> Result<(Ensemble, f64, usize)> {
        let mut schedule = Schedule::with_solver(&cfg, &so3, Some(steps), solver)?;
        if let Some(t_c) = args.flow_above {
            schedule = schedule.with_flow_above(&cfg, t_c)?;
        }
        let calls = schedule.network_calls();
        let sampler = Sampler::new(&model.net, schedule);
        let t = Instant::now();
        let e = sample_ensemble(
            &sampler,
            &ctx,
            &poses(),
            args.batch_size,
            cfg.tr_sigma_max,
            &sequence,
            |_| {},
        );
        Ok((e, t.elapsed().as_secs_f64() / args.samples as f64, calls))
    };
    let n = args.samples as usize;
    let summarize = |e: &Ensemble| {
        let bb: Vec<Vec<[[f32; 3]; 3]>> = (0..n).map(|i| e.backbone(i)).collect();
        let valid = bb.iter().filter(|b| validity(b).valid).count() as f64 / n as f64;
        let to_refs: Vec<Vec<f64>> = refs
            .iter()
            .map(|(_, r)| bb.iter().map(|b| ca_rmsd(b, r)).collect())
            .collect();
        (bb, valid, to_refs)
    };

    let full = cfg.n_time_step;
    eprintln!(
        "reference: euler, {full} steps{}, {n} samples (seed {}) of {}",
        args.flow_above.map_or(String::new(), |t| format!(
            " (probability flow above t = {t})"
        )),
        args.seed,
        args.model.display()
    );
    let (reference, ref_secs, ref_calls) = match &args.reference_samples {
        None => draw(Solver::Euler, full)?,
        Some(path) => {
            let all = Ensemble::read_npz_any(path)?;
            let want: Vec<i64> = (0..n as i64).collect();
            if all.num_samples() < n || all.sample_index[..n] != want[..] || all.len_residues() != l
            {
                bail!(
                    "{} must hold samples 0..{n} of L = {l} (it has {} samples of L = {})",
                    path.display(),
                    all.num_samples(),
                    all.len_residues()
                );
            }
            let per = |v: &[f32], k: usize| v[..n * l * k].to_vec();
            let e = Ensemble {
                sequence: all.sequence.clone(),
                sample_index: want,
                tr: per(&all.tr, 3),
                rot_mat: per(&all.rot_mat, 9),
                steer: None,
                log_density: None,
            };
            // The run's record, when it has one: its switch to the published
            // update must be this run's, and it gives the seconds per sample.
            let record = path
                .parent()
                .map(|d| d.join("run.json"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(v) = &record {
                let theirs = v["flow_above"].as_f64();
                if theirs != args.flow_above {
                    let show = |t: Option<f64>| t.map_or("none".to_string(), |t| t.to_string());
                    bail!(
                        "{} was sampled with flow_above {} (its run.json), this run with --flow-above {}: the reference must follow the same ODE",
                        path.display(),
                        show(theirs),
                        show(args.flow_above)
                    );
                }
            }
            let secs = record
                .and_then(|v| Some(v["seconds"].as_f64()? / v["num_samples"].as_f64()?))
                .unwrap_or(f64::NAN);
            (e, secs, full as usize)
        }
    };
    let (ref_bb, ref_valid, ref_to) = summarize(&reference);
    let mut rows = vec![json!({
        "solver": "euler", "steps": full, "calls": ref_calls, "seconds_per_sample": ref_secs,
        "median_rmsd": 0.0, "p95_rmsd": 0.0, "valid_fraction": ref_valid,
        "wasserstein": refs.iter().map(|_| 0.0).collect::<Vec<_>>(), "reference": true,
    })];
    let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
    let mut table = format!(
        "| solver | steps | calls/sample | median CA-RMSD to 500-step (Å) | p95 (Å) | valid | {} | s/sample |\n|---|---|---|---|---|---|{}---|\n",
        names
            .iter()
            .map(|n| format!("W1 RMSD-to-{n} (Å)"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(names.len())
    );
    table.push_str(&format!(
        "| euler (reference) | {full} | {ref_calls} | 0 | 0 | {:.1}% | {} | {ref_secs:.2} |\n",
        100.0 * ref_valid,
        names.iter().map(|_| "0").collect::<Vec<_>>().join(" | ")
    ));
    for &solver in &args.solvers {
        for &steps in &args.steps {
            let (e, secs, calls) = draw(solver, steps)?;
            let (bb, valid, to) = summarize(&e);
            let mut d: Vec<f64> = bb.iter().zip(&ref_bb).map(|(a, b)| ca_rmsd(a, b)).collect();
            d.sort_by(f64::total_cmp);
            let w: Vec<f64> = to
                .iter()
                .zip(&ref_to)
                .map(|(a, b)| wasserstein(a, b))
                .collect();
            let (med, p95) = (quantile(&d, 0.5), quantile(&d, 0.95));
            eprintln!(
                "{solver} {steps} steps ({calls} calls): median {med:.3} Å, p95 {p95:.3} Å, valid {:.1}% (reference {:.1}%), W1 {w:.3?}, {secs:.2} s/sample",
                100.0 * valid,
                100.0 * ref_valid
            );
            table.push_str(&format!(
                "| {solver} | {steps} | {calls} | {med:.3} | {p95:.3} | {:.1}% | {} | {secs:.2} |\n",
                100.0 * valid,
                w.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" | ")
            ));
            rows.push(json!({
                "solver": solver.as_str(), "steps": steps, "calls": calls,
                "seconds_per_sample": secs, "median_rmsd": med, "p95_rmsd": p95,
                "valid_fraction": valid, "wasserstein": w, "reference": false,
            }));
        }
    }
    println!("{table}");
    if let Some(path) = &args.json {
        let out = json!({
            "model": args.model.display().to_string(),
            "samples": n, "seed": args.seed, "references": names,
            "flow_above": args.flow_above,
            "threads": tch::get_num_threads(), "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasserstein_of_shifted_samples_is_the_shift() {
        let a = [1.0, 3.0, 2.0];
        let b = [2.5, 3.5, 4.5];
        assert!((wasserstein(&a, &b) - 1.5).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
    }
}
