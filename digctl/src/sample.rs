//! `digctl sample`: draw an ensemble of one protein on this machine.
//!
//! Everything the run needs is read and validated before the first step, so
//! bad input fails in a second with a message, and the output directory only
//! ever holds finished files (`run.json` is written last).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_common::job::SampleFilter;
use dig_model::backbone::read_poses;
use dig_model::features::{check_sequence, read_fasta, Features};
use dig_model::sampling::steering::Steering;
use dig_model::sampling::{
    read_initial_state, sample_ensemble, sample_ensemble_steered_until, InitialPoses, Partial,
    SteerSpec,
};
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::{DigModel, Sampler, Schedule};

use crate::device::parse_device;
use crate::progress::Progress;

#[derive(Args)]
pub struct SampleArgs {
    /// Model directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Features as one .npz with `single (L,384)`, `pair (L,L,128)` and optionally `sequence`.
    #[arg(long, conflicts_with_all = ["single", "pair"], required_unless_present_all = ["single", "pair"])]
    features: Option<PathBuf>,
    /// Single representation `(L,384)` as .npy (with --pair).
    #[arg(long, requires = "pair")]
    single: Option<PathBuf>,
    /// Pair representation `(L,L,128)` as .npy (with --single).
    #[arg(long, requires = "single")]
    pair: Option<PathBuf>,
    /// One-letter amino-acid sequence (default: the one stored with the features).
    #[arg(long, conflicts_with = "fasta")]
    sequence: Option<String>,
    /// FASTA file whose first record is the sequence.
    #[arg(long)]
    fasta: Option<PathBuf>,
    /// Number of structures to sample (default with --init-state: one per stored state).
    #[arg(long)]
    num_samples: Option<u64>,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Seed of the counter-based initial-state RNG: sample i depends on (seed, i) only.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler steps (default: the model's n_time_step); fewer is faster and less accurate.
    #[arg(long)]
    steps: Option<i64>,
    /// ODE solver: euler (the published update), exp (exponential
    /// integrator), heun (second order, 2 calls per step), ab2 (second
    /// order, 1 call per step). See docs/performance.md for their fidelity.
    /// flow: the probability-flow ODE (Heun, 2 calls per step), whose
    /// samples have the densities of `digctl density` (docs/density.md).
    #[arg(long, default_value = "euler")]
    solver: dig_model::sampling::Solver,
    /// Follow the probability-flow ODE (half the published drift) at
    /// diffusion times above T and --solver's update at T and below: the
    /// flow carries the prior's spread down, the published update copes
    /// with an inexact score near the data (examples/adk/README.md, "Why
    /// the closed state is lost"). T in [0, 1]; 1 is the plain solver.
    /// Not with --solver flow, --noise, --steer or --log-density.
    #[arg(long, value_name = "T")]
    flow_above: Option<f64>,
    /// Keep only physically valid samples (`physical`: consecutive CA-CA
    /// < 4.5 Å, C(i)-N(i+1) < 2.0 Å, no atoms of residues more than two apart
    /// closer than 1.0 Å): exactly --num-samples valid ones, the first in
    /// sample-index order, drawing indices past --num-samples as needed (the
    /// same set a service job with `filter: "physical"` returns).
    #[arg(long, value_parser = ["physical"])]
    filter: Option<String>,
    /// With --filter: draw at most this many times --num-samples.
    #[arg(long, default_value_t = 3, requires = "filter")]
    max_draw_factor: u64,
    /// Steer the sampler with potentials by sequential Monte Carlo: a JSON
    /// steering file (README, "Steering") or a preset (`physical`). Each
    /// sample's energy and log normalising estimate go into samples.npz
    /// (`steer_energy`, `steer_log_z`) for `digctl evaluate --reweight`.
    #[arg(long, conflicts_with = "init_state")]
    steer: Option<String>,
    /// The stochastic sampler without steering: the reverse SDE with this
    /// noise factor (1: the SDE; 0 would be the published update). Euler only.
    #[arg(long, conflicts_with_all = ["steer", "init_state"])]
    noise: Option<f64>,
    /// libtorch threads (default: libtorch's choice, one per core).
    #[arg(long)]
    threads: Option<i32>,
    /// Start from these poses (`tr (N,L,3)`/`(L,3)`, `rot_mat`) instead of seeded noise.
    #[arg(long)]
    init_state: Option<PathBuf>,
    /// Partial diffusion: start from this structure (PDB, or DCD/XTC with
    /// --from-topology; several structures: sample i starts from structure
    /// i mod M), noised by the forward process to --from-time, and run the
    /// sampler from there. Small times relax or repair the input, larger
    /// ones explore around it; 1 is ordinary sampling.
    #[arg(long, requires = "from_time", conflicts_with_all = ["init_state", "steer", "noise"])]
    from_structure: Option<PathBuf>,
    /// Topology of a DCD or XTC --from-structure (PSF, PDB or GRO).
    #[arg(long, requires = "from_structure")]
    from_topology: Option<PathBuf>,
    /// Diffusion time to start from, in (0, 1]; snapped down to the
    /// schedule's grid (t_k = 1 - k/steps).
    #[arg(long, requires = "from_structure")]
    from_time: Option<f64>,
    /// Also the log-density of every returned sample (digctl density's
    /// probability-flow ODE; --flow-steps, --divergence, --probe-seed):
    /// `log_density` and `log_density_std_error` in samples.npz. Costs
    /// 2 x --flow-steps forward passes per sample, each with the
    /// divergence's vector-Jacobian products.
    #[arg(long)]
    log_density: bool,
    #[command(flatten)]
    flow: crate::density::FlowArgs,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Memory for cached per-layer pair values; beyond it the memory-light order is used.
    #[arg(long, default_value_t = 4096)]
    pair_cache_mb: u64,
    /// Output directory: samples.npz, samples.pdb, samples.xtc + topology.pdb, run.json.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = DigModel::load_dir(&args.model, device)
        .with_context(|| format!("cannot load model directory {}", args.model.display()))?;
    let cfg = model.net.config().clone();
    let features = match (&args.features, &args.single, &args.pair) {
        (Some(f), _, _) => Features::from_npz(f)?,
        (None, Some(s), Some(p)) => Features::from_npy(s, p)?,
        _ => bail!("give --features F.npz, or --single S.npy with --pair P.npy"),
    };
    features.validate(&cfg)?;
    let len = features.len();
    let sequence = match (&args.sequence, &args.fasta, &features.sequence) {
        (Some(s), _, _) => check_sequence(s, len)?,
        (None, Some(f), _) => check_sequence(&read_fasta(f)?, len)?,
        (None, None, Some(s)) => check_sequence(s, len)?,
        (None, None, None) => {
            tracing::warn!(
                "no sequence given (--sequence or --fasta); residues are written as UNK"
            );
            "X".repeat(len as usize)
        }
    };
    let init = match &args.init_state {
        Some(path) => {
            let init = read_initial_state(path, len)?;
            if let Some(n) = args.num_samples {
                if n as usize != init.len() {
                    bail!(
                        "--init-state {} holds {} states but --num-samples is {n}",
                        path.display(),
                        init.len()
                    );
                }
            }
            init
        }
        None => {
            let n = args
                .num_samples
                .context("--num-samples is required (how many structures to sample)")?;
            InitialPoses::Seeded {
                seed: args.seed,
                indices: (0..n).collect(),
            }
        }
    };
    if init.is_empty() {
        bail!("--num-samples must be at least 1");
    }
    let so3 = So3Tables::compute();
    if let Some(t) = args.threads {
        if t < 1 {
            bail!("--threads must be at least 1, got {t}");
        }
        tch::set_num_threads(t);
    }
    let mut schedule = Schedule::with_solver(&cfg, &so3, args.steps, args.solver)?;
    if let Some(t_c) = args.flow_above {
        for (clash, set) in [
            ("--noise", args.noise.is_some()),
            ("--steer", args.steer.is_some()),
            ("--log-density", args.log_density),
        ] {
            if set {
                bail!("--flow-above cannot be combined with {clash} (it changes the ODE those assume)");
            }
        }
        schedule = schedule.with_flow_above(&cfg, t_c)?;
    }
    // Partial diffusion: the tail of the schedule from --from-time, and the
    // input structures noised to its first step's level.
    let partial = match (&args.from_structure, args.from_time) {
        (Some(path), Some(t)) => {
            if !(t > 0.0 && t <= 1.0) {
                bail!("--from-time must be in (0, 1], got {t}");
            }
            let (tr, rot, m) = read_poses(path, args.from_topology.as_deref(), len as usize)
                .with_context(|| format!("--from-structure {}", path.display()))?;
            let (tail, partial) = Partial::new(&schedule, tr, rot, m, len as usize, t)?;
            schedule = tail;
            Some(partial)
        }
        _ => None,
    };
    let steps = schedule.len();
    let density_settings = if args.log_density {
        // The density of what this solver samples.
        let ode = match args.solver {
            dig_model::Solver::Flow => dig_model::sampling::flow::Ode::Flow,
            _ => dig_model::sampling::flow::Ode::Published,
        };
        Some(args.flow.settings(true, ode)?)
    } else {
        None
    };
    let (spec, steering): (Option<SteerSpec>, Option<Steering>) = match (&args.steer, args.noise) {
        (Some(arg), _) => {
            let spec = crate::steer::load(arg)?;
            let s = spec
                .compile(len as usize, args.solver)
                .map_err(|e| anyhow::anyhow!("--steer {arg}: {e}"))?;
            (Some(spec), Some(s))
        }
        (None, Some(eta)) => {
            if !(eta > 0.0 && eta <= 2.0) {
                bail!("--noise must be in (0, 2], got {eta}");
            }
            if args.solver != dig_model::Solver::Euler {
                bail!(
                    "--noise: the stochastic update is Euler-Maruyama; use --solver euler (got {})",
                    args.solver
                );
            }
            (None, Some(Steering::stochastic(eta)))
        }
        (None, None) => (None, None),
    };
    let particles = steering.as_ref().map_or(1, |s| s.particles);
    let calls = schedule.network_calls() * particles;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let started = Instant::now();
    let ctx = model.net.prepare(
        &features.single.to_device(device),
        &features.pair.to_device(device),
        args.pair_cache_mb.saturating_mul(1 << 20),
    );
    let sampler = Sampler::new(&model.net, schedule);
    let n = init.len();
    tracing::info!(
        "sampling {n} structures of L = {len} with {steps} {}{} steps ({calls} network calls each), batch {} on {:?}",
        args.solver,
        args.flow_above.map_or(String::new(), |t| format!(" (probability flow above t = {t})")),
        args.batch_size,
        device
    );
    // A partial-diffusion run noises its inputs; from t = 1 it is ordinary
    // sampling from the prior.
    let draw = |init: &InitialPoses| {
        let noised;
        let init = match (&partial, init) {
            (Some(p), InitialPoses::Seeded { seed, indices }) => {
                noised = p.poses(*seed, indices.clone());
                &noised
            }
            _ => init,
        };
        let mut progress = Progress::new((init.len() * steps).max(1) as u64, "sampling");
        let e = match (&steering, init) {
            (Some(st), InitialPoses::Seeded { seed, indices }) => sample_ensemble_steered_until(
                &sampler,
                &ctx,
                *seed,
                indices,
                args.batch_size,
                st,
                cfg.tr_sigma_max,
                &sequence,
                |b| progress.inc(b as u64),
                &|| false,
            )
            .expect("never asked to stop"),
            _ => sample_ensemble(
                &sampler,
                &ctx,
                init,
                args.batch_size,
                cfg.tr_sigma_max,
                &sequence,
                |b| progress.inc(b as u64),
            ),
        };
        progress.finish();
        e
    };
    let mut filtered = None;
    let ensemble = if args.filter.is_some() {
        if args.init_state.is_some() {
            bail!("--filter draws further seeded samples; it cannot be used with --init-state");
        }
        if !(1..=10).contains(&args.max_draw_factor) {
            bail!(
                "--max-draw-factor must be between 1 and 10, got {}",
                args.max_draw_factor
            );
        }
        let (e, summary) = draw_valid(
            n as u64,
            args.seed,
            args.max_draw_factor,
            args.batch_size as u64,
            &draw,
        );
        filtered = Some(summary);
        e
    } else {
        draw(&init)
    };
    let mut ensemble = ensemble;
    if let Some(settings) = &density_settings {
        let mut progress = Progress::new(
            (ensemble.num_samples() * settings.steps) as u64,
            "log-density",
        );
        ensemble.log_density = Some(dig_model::sampling::flow::ensemble_log_density(
            &model.net,
            &ctx,
            &so3,
            &ensemble,
            settings,
            args.batch_size,
            |b| progress.inc(b as u64),
        ));
        progress.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = ensemble.num_samples();
    let validity = ensemble.validity();
    let valid = validity.iter().filter(|v| v.valid).count();

    let npz = args.out.join("samples.npz");
    let pdb = args.out.join("samples.pdb");
    ensemble.write_npz(&npz)?;
    ensemble.write_pdb_file(&pdb)?;
    let (xtc, topology) = write_trajectory(&ensemble, &args.out)?;
    let run = serde_json::json!({
        "model": args.model,
        "sequence": sequence,
        "length": len,
        "num_samples": n,
        "seed": args.init_state.is_none().then_some(args.seed),
        "init_state": args.init_state,
        "steps": steps,
        "solver": args.solver.as_str(),
        "flow_above": args.flow_above,
        "network_calls_per_sample": calls,
        "noise": steering.as_ref().map(|s| s.noise),
        "steering": spec,
        "from_structure": partial.as_ref().map(|p| serde_json::json!({
            "path": args.from_structure,
            "structures": p.start.structures,
            "from_time": p.from_time,
            "start_step": p.start_step,
            "start_time": p.start_time,
            "sigma_tr": p.noise().map(|n| n.sigma_tr),
            "sigma_rot": p.noise().map(|n| n.sigma_rot),
        })),
        "samples_valid": valid,
        "log_density": density_settings.as_ref().map(|d| serde_json::json!({
            "ode": d.ode.as_str(),
            "flow_steps": d.steps,
            "divergence": d.divergence.map(|v| v.to_string()),
            "probe_seed": d.seed,
            "network_forward_passes_per_sample": 2 * d.steps,
            "vector_jacobian_products_per_sample": 2 * d.steps * d.divergence.map_or(0, |v| v.products(len)),
        })),
        "filter": filtered.as_ref().map(|f: &FilterSummary| serde_json::json!({
            "criteria": "physical",
            "max_draw_factor": args.max_draw_factor,
            "requested": f.requested,
            "drawn": f.drawn,
            "valid_fraction": f.valid_drawn as f64 / f.drawn.max(1) as f64,
            "complete": f.requested as usize == n,
        })),
        "device": args.device,
        "seconds": seconds,
        "files": {
            "npz": "samples.npz",
            "pdb": "samples.pdb",
            "xtc": "samples.xtc",
            "topology": "topology.pdb",
        },
    });
    let tmp = args.out.join(".run.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&run)? + "\n")?;
    std::fs::rename(&tmp, args.out.join("run.json"))?;
    println!(
        "{n} structures in {seconds:.1} s ({:.2} s/sample), {valid} physically valid\n  {}\n  {}",
        seconds / n.max(1) as f64,
        npz.display(),
        pdb.display()
    );
    println!("  {}\n  {}", xtc.display(), topology.display());
    if let Some(f) = filtered {
        if (n as u64) < f.requested {
            bail!(
                "physical filter: {} of {} drawn samples are valid ({:.1}%), {} requested; \
                 --max-draw-factor {} allows at most {} draws. The {n} valid samples are in {}",
                f.valid_drawn,
                f.drawn,
                100.0 * f.valid_drawn as f64 / f.drawn.max(1) as f64,
                f.requested,
                args.max_draw_factor,
                f.requested * args.max_draw_factor,
                args.out.display()
            );
        }
    }
    Ok(())
}

/// What `--filter` drew.
struct FilterSummary {
    requested: u64,
    drawn: u64,
    valid_drawn: u64,
}

/// The first `requested` physically valid samples in index order, drawing
/// indices `0..requested` first and then further ones, as many as the valid
/// fraction so far says are needed (a fifth more), up to `factor` times the
/// request. The set is the first `requested` valid indices, whatever the
/// rounds, as a service job's; rounds end at multiples of `batch` so batches
/// start where a worker's do (shards a multiple of the batch size), and the
/// samples are bit-identical to the service's.
fn draw_valid(
    requested: u64,
    seed: u64,
    factor: u64,
    batch: u64,
    draw: &dyn Fn(&InitialPoses) -> Ensemble,
) -> (Ensemble, FilterSummary) {
    let limit = requested * factor;
    let align = |i: u64| i.div_ceil(batch.max(1)) * batch.max(1);
    let (mut drawn, mut valid_drawn) = (0u64, 0u64);
    let mut kept: Option<Ensemble> = None;
    let mut next = align(requested).min(limit);
    loop {
        let e = draw(&InitialPoses::Seeded {
            seed,
            indices: (drawn..next).collect(),
        });
        // Sample indices of the valid samples (the draw is in index order).
        let valid: Vec<u64> = e
            .validity()
            .iter()
            .zip(&e.sample_index)
            .filter(|(v, _)| v.valid)
            .map(|(_, &i)| i as u64)
            .collect();
        valid_drawn += valid.len() as u64;
        drawn = next;
        let have = kept.as_ref().map_or(0, |k| k.num_samples() as u64);
        let take = (requested - have).min(valid.len() as u64) as usize;
        let picked = e.select_indices(&valid[..take]);
        match kept.as_mut() {
            None => kept = Some(picked),
            Some(k) => k.append(picked),
        }
        let have = have + take as u64;
        if have == requested || drawn >= limit {
            let summary = FilterSummary {
                requested,
                drawn,
                valid_drawn,
            };
            return (kept.expect("set above"), summary);
        }
        let fraction = valid_drawn as f64 / drawn as f64;
        let more = SampleFilter::more_draws(requested - have, valid_drawn, drawn);
        next = align(drawn + more).min(limit);
        tracing::info!(
            "{have} of {requested} valid after {drawn} draws ({:.0}%); drawing {} more",
            100.0 * fraction,
            next - drawn
        );
    }
}

/// Writes `ensemble` as the trajectory `samples.xtc` (N, CA, C, O of every
/// sample, nm) and its topology `topology.pdb` (the first sample's atoms)
/// in `out`, each atomically; their paths.
fn write_trajectory(
    ensemble: &dig_model::structure::Ensemble,
    out: &std::path::Path,
) -> Result<(PathBuf, PathBuf)> {
    let (xtc, topology) = (out.join("samples.xtc"), out.join("topology.pdb"));
    ensemble.write_xtc_file(&xtc)?;
    ensemble.write_topology_pdb_file(&topology)?;
    Ok((xtc, topology))
}
