//! `digctl density`: the model's log-density of given structures, by the
//! probability-flow ODE (`dig_model::sampling::flow`): each structure is
//! encoded to noise at t = 1 and the change of variables gives
//! `log p(x) = log prior(x_1) - int (1/2) g^2 div s dt`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dig_model::backbone::read_poses;
use dig_model::evaluate::rmsd;
use dig_model::features::Features;
use dig_model::sampling::flow::{
    flow, log_density, log_prior, Density, Divergence, FlowSettings, FlowTimes, NetworkFlowField,
    Ode,
};
use dig_model::so3::So3Tables;
use dig_model::DigModel;
use serde_json::json;
use tch::Tensor;

use crate::device::parse_device;
use crate::progress::Progress;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Csv,
}

/// The flow's settings shared by `density`, `sample --log-density`,
/// `interpolate`.
#[derive(Args, Clone)]
pub struct FlowArgs {
    /// The ODE: `published` (the published sampler's `g^2 s` drift: the
    /// density of the ensemble euler, exp, heun and ab2 return) or `flow`
    /// (the probability-flow ODE, `g^2 s / 2`: the score's own
    /// distribution, what `--solver flow` samples). docs/density.md.
    /// Default: published (sample --log-density: the one its solver follows).
    #[arg(long, value_parser = parse_ode)]
    pub ode: Option<Ode>,
    /// Heun steps of the probability-flow ODE between t = 1/n_time_step and
    /// 1 (two network evaluations each).
    #[arg(long = "flow-steps", default_value_t = 50)]
    pub flow_steps: usize,
    /// The divergence: `exact` (6L vector-Jacobian products per
    /// evaluation) or `hutchinson:K` (K Rademacher probes per evaluation,
    /// at least 2; the standard error comes from their spread).
    #[arg(long, default_value = "hutchinson:4", value_parser = parse_divergence)]
    pub divergence: Divergence,
    /// Seed of the Hutchinson probes (each structure has its own stream).
    #[arg(long = "probe-seed", default_value_t = 0)]
    pub probe_seed: u64,
}

fn parse_divergence(s: &str) -> std::result::Result<Divergence, String> {
    s.parse()
}

fn parse_ode(s: &str) -> std::result::Result<Ode, String> {
    s.parse()
}

impl FlowArgs {
    /// The settings, with `default_ode` where --ode is not given.
    pub fn settings(&self, with_density: bool, default_ode: Ode) -> Result<FlowSettings> {
        if !(1..=1000).contains(&self.flow_steps) {
            bail!(
                "--flow-steps must be between 1 and 1000, got {}",
                self.flow_steps
            );
        }
        Ok(FlowSettings {
            ode: self.ode.unwrap_or(default_ode),
            steps: self.flow_steps,
            divergence: with_density.then_some(self.divergence),
            seed: self.probe_seed,
            chunk: 64,
        })
    }
}

#[derive(Args)]
pub struct DensityArgs {
    /// Model directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Features of the protein (.npz with single, pair).
    #[arg(long)]
    features: PathBuf,
    /// Structures to score: multi-model PDB, DCD or XTC (DCD and XTC with
    /// --topology), each of the protein's residues, scored in file order.
    #[arg(long)]
    structures: PathBuf,
    /// Topology for DCD (PSF or PDB) and XTC (PDB or GRO).
    #[arg(long)]
    topology: Option<PathBuf>,
    #[command(flatten)]
    flow: FlowArgs,
    /// Structures per forward pass (times the probes of Hutchinson's estimator).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Also decode each structure's noise back (the same ODE, no
    /// divergence) and report the CA-RMSD of decode(encode(x)) to x.
    #[arg(long)]
    round_trip: bool,
    /// With --round-trip: only the round trip, no density (no divergence:
    /// forward passes only).
    #[arg(long, requires = "round_trip")]
    no_density: bool,
    /// json (default) or csv.
    #[arg(long, value_enum, default_value = "json")]
    format: OutputFormat,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
}

pub fn run(args: DensityArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(t) = args.threads {
        if t < 1 {
            bail!("--threads must be at least 1, got {t}");
        }
        tch::set_num_threads(t);
    }
    let settings = args.flow.settings(!args.no_density, Ode::Published)?;
    let model = DigModel::load_dir(&args.model, device)
        .with_context(|| format!("cannot load model directory {}", args.model.display()))?;
    let features = Features::from_npz(&args.features)?;
    features.validate(model.net.config())?;
    let len = features.len();
    let (tr, rot, n) = read_poses(&args.structures, args.topology.as_deref(), len as usize)?;
    let tr = Tensor::from_slice(&tr).view([n as i64, len, 3]);
    let rot = Tensor::from_slice(&rot).view([n as i64, len, 3, 3]);
    let so3 = So3Tables::compute();
    let times = FlowTimes::new(model.net.config());
    let ctx = model.net.prepare(
        &features.single.to_device(device),
        &features.pair.to_device(device),
        4096 << 20,
    );
    let mut field = NetworkFlowField::new(&model.net, &ctx, &so3);
    let started = Instant::now();
    let mut progress = Progress::new((n * settings.steps) as u64, "density");
    let mut rows = Vec::with_capacity(n);
    let mut evaluations = 0;
    for start in (0..n).step_by(args.batch_size) {
        let end = (start + args.batch_size).min(n);
        let b = (end - start) as i64;
        let indices: Vec<u64> = (start as u64..end as u64).collect();
        let (x_tr, x_rot) = (
            tr.narrow(0, start as i64, b).to_device(device),
            rot.narrow(0, start as i64, b).to_device(device),
        );
        let d = if args.no_density {
            // Encoding alone: no divergence, no density.
            let run = flow(
                &mut field,
                &times,
                (&x_tr, &x_rot),
                (times.t_end(), 1.0),
                &settings,
                &indices,
                |_| progress.inc(b as u64),
            );
            Density {
                log_density: vec![f64::NAN; b as usize],
                std_error: vec![f64::NAN; b as usize],
                log_prior: log_prior(&times, &run.tr),
                noise_tr: run.tr,
                noise_rot: run.rot,
                evaluations: run.evaluations,
            }
        } else {
            log_density(
                &mut field,
                &times,
                &x_tr,
                &x_rot,
                &settings,
                &indices,
                |_| progress.inc(b as u64),
            )
        };
        evaluations = d.evaluations;
        let mut back_rmsd = vec![None; b as usize];
        if args.round_trip {
            let mut plain = settings;
            plain.divergence = None;
            let back = flow(
                &mut field,
                &times,
                (&d.noise_tr, &d.noise_rot),
                (1.0, times.t_end()),
                &plain,
                &indices,
                |_| {},
            );
            let ca = |t: &Tensor, i: i64| -> Vec<[f64; 3]> {
                let v = Vec::<f32>::try_from(t.get(i).to_device(tch::Device::Cpu).flatten(0, -1))
                    .expect("float32");
                v.chunks(3)
                    .map(|c| [c[0] as f64, c[1] as f64, c[2] as f64])
                    .collect()
            };
            let input = tr.narrow(0, start as i64, b);
            for (i, r) in back_rmsd.iter_mut().enumerate() {
                *r = Some(rmsd(&ca(&back.tr, i as i64), &ca(&input, i as i64)));
            }
        }
        for (i, back) in back_rmsd.into_iter().enumerate() {
            rows.push((d.log_density[i], d.std_error[i], d.log_prior[i], back));
        }
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let products = settings.divergence.map_or(0, |d| d.products(len));
    let mut text = String::new();
    match args.format {
        OutputFormat::Json => {
            let report = json!({
                "model": args.model,
                "structures": args.structures,
                "length": len,
                "density": "log-density of the centred structure at t = 1/n_time_step: Lebesgue on translations (Å^-3 per residue) x Haar of mass 1 on each rotation",
                "ode": settings.ode.as_str(),
                "flow_steps": settings.steps,
                "divergence": settings.divergence.map(|d| d.to_string()),
                "network_forward_passes_per_structure": evaluations,
                "vector_jacobian_products_per_structure": evaluations * products,
                "seconds": seconds,
                "results": rows.iter().enumerate().map(|(i, (lp, se, prior, back))| json!({
                    "index": i,
                    "log_density": lp,
                    "per_residue": lp / len as f64,
                    "std_error": se,
                    "log_prior_of_noise": prior,
                    "round_trip_ca_rmsd": back,
                })).collect::<Vec<_>>(),
            });
            text.push_str(&serde_json::to_string_pretty(&report)?);
            text.push('\n');
        }
        OutputFormat::Csv => {
            text.push_str("index,log_density,per_residue,std_error\n");
            for (i, (lp, se, _, _)) in rows.iter().enumerate() {
                text.push_str(&format!("{i},{lp:.6},{:.6},{se:.6}\n", lp / len as f64));
            }
        }
    }
    match &args.out {
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path)?;
            eprintln!(
                "{n} structures scored in {seconds:.1} s ({} forward passes and {} vector-Jacobian products each): {}",
                evaluations,
                evaluations * products,
                path.display()
            );
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}
