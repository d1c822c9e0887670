//! `digctl bench-train`: seconds per training update of the native trainer
//! against the published PyTorch training step (`bench/published-dig/`,
//! run by its own Python in the same invocation), for the same architecture,
//! protein length, batch and thread count. Prints a table and the ratios;
//! never a pass/fail test.
//!
//! Both sides do the same work per update: the published loss in train mode
//! (dropout 0.1) on random single/pair features and random frames, backward,
//! gradient clipping at 1 and one Adam step, float32 on the CPU.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_model::dataset::{ManifestEntry, ProteinData};
use dig_model::features::Features;
use dig_model::rng::initial_state;
use dig_model::trainer::{LrSchedule, TrainOptions, Trainer};
use dig_model::{DigModel, ModelConfig};
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Architectures: `small` (the shipped AdK model's) and/or `published`
    /// (81.9 M parameters), or d_model,d_pair,n_layer,n_heads[,dim_feedforward].
    #[arg(long, value_delimiter = ';', default_value = "small;published")]
    sizes: Vec<String>,
    /// Protein lengths (no crop: the whole protein is one crop).
    #[arg(long, value_delimiter = ',', default_value = "128,214")]
    lengths: Vec<i64>,
    /// Structures per update (even: the published loss draws time steps in pairs).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// libtorch threads, each a row.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<i32>,
    /// Timed updates per measurement, after one untimed warm-up update.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Python with PyTorch for the published step (default: the project's .venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The vendored published code (`train_step.py` and `model/`).
    #[arg(long, default_value = "bench/published-dig")]
    published_code: PathBuf,
    /// Where the published code caches its SO(3) tables (about 5 minutes to
    /// compute the first time).
    #[arg(long, default_value = "target/published-dig-cache")]
    published_cache: PathBuf,
    /// Time the native trainer only.
    #[arg(long)]
    native_only: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Random features and `frames` random frames of a protein of `l` residues.
fn synthetic_protein(cfg: &ModelConfig, l: i64, frames: usize) -> ProteinData {
    tch::manual_seed(0);
    let features = Features {
        single: Tensor::randn([l, cfg.dim_single], (Kind::Float, Device::Cpu)),
        pair: Tensor::randn([l, l, cfg.dim_pair_repr], (Kind::Float, Device::Cpu)),
        sequence: None,
    };
    let frames: Vec<(Vec<f32>, Vec<f32>)> = (0..frames)
        .map(|i| {
            let s = initial_state(0, i as u64, l as usize, 10.0);
            (s.tr, s.rot)
        })
        .collect();
    ProteinData {
        name: format!("random L={l}"),
        entry: ManifestEntry {
            trajectory: PathBuf::from("(random frames)"),
            topology: None,
            features: PathBuf::from("(random features)"),
            weight: 1.0,
        },
        features,
        train: (0..frames.len()).collect(),
        val: Vec::new(),
        frames,
    }
}

/// Seconds of each timed native update.
fn native(cfg: &ModelConfig, l: i64, args: &BenchTrainArgs) -> Result<(Vec<f64>, i64)> {
    let model = DigModel::random(cfg, 0, Device::Cpu);
    let params = model.num_parameters();
    let opts = TrainOptions {
        steps: 1_000_000,
        batch_size: args.batch_size,
        lr: 1e-4,
        warmup: 1,
        schedule: LrSchedule::Constant,
        min_lr_fraction: 1.0,
        clip: 1.0,
        crop: l as usize,
        seed: 0,
        val_fraction: 0.0,
        dropout: 0.1,
        ema: None,
        time_weighting: None,
        exact_target_above: None,
    };
    let data = synthetic_protein(cfg, l, 8);
    let mut trainer = Trainer::new(model, vec![data], opts)?;
    let mut times = Vec::new();
    for i in 0..=args.steps {
        let t0 = Instant::now();
        trainer.train_step()?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((times, params))
}

#[derive(serde::Deserialize)]
struct Published {
    seconds: Vec<f64>,
    parameters: i64,
    torch: String,
}

fn published(
    cfg: &ModelConfig,
    l: i64,
    threads: i32,
    python: &PathBuf,
    args: &BenchTrainArgs,
) -> Result<Published> {
    let script =
        std::fs::canonicalize(args.published_code.join("train_step.py")).with_context(|| {
            format!(
                "{}: no train_step.py (run from the repository root, or pass --published-code)",
                args.published_code.display()
            )
        })?;
    std::fs::create_dir_all(&args.published_cache)
        .with_context(|| format!("cannot create {}", args.published_cache.display()))?;
    // The step runs in the cache folder: a relative interpreter path is made
    // absolute first (not canonical: a venv's python is a symlink whose
    // target is outside the venv).
    let python = if python.components().count() > 1 {
        std::path::absolute(python).with_context(|| format!("no Python at {}", python.display()))?
    } else {
        python.clone()
    };
    let out = Command::new(&python)
        .current_dir(&args.published_cache)
        .arg(&script)
        .args(["--d-model", &cfg.d_model.to_string()])
        .args(["--d-pair", &cfg.d_pair.to_string()])
        .args(["--n-layer", &cfg.n_layer.to_string()])
        .args(["--n-heads", &cfg.n_heads.to_string()])
        .args(["--dim-feedforward", &cfg.dim_feedforward.to_string()])
        .args(["--length", &l.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the published training step failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("unexpected output of the published step: {stdout}"))
}

pub fn run(args: BenchTrainArgs) -> Result<()> {
    if args.batch_size == 0 || args.batch_size % 2 == 1 {
        bail!("--batch-size must be even (the published loss draws time steps in pairs)");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(t) = args.threads.iter().find(|&&t| t < 1) {
        bail!("--threads must be at least 1, got {t}");
    }
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let sizes: Vec<(String, ModelConfig)> = args
        .sizes
        .iter()
        .map(|s| Ok((s.clone(), crate::train::parse_size(s)?)))
        .collect::<Result<_>>()?;
    println!(
        "training update: batch {}, float32, dropout 0.1, clip 1, Adam; median of {} timed updates after 1 warm-up",
        args.batch_size, args.steps
    );
    if !args.native_only {
        println!(
            "published: bench/published-dig/train_step.py (microsoft/Graphormer ac154fe) under {}",
            python.display()
        );
    }
    println!(
        "{:<10} {:>5} {:>8} {:>10} {:>14} {:>17} {:>9}",
        "size", "L", "threads", "parameters", "native s/upd", "published s/upd", "speed-up"
    );
    let mut native_by = std::collections::HashMap::new();
    let mut torch_version = None;
    for (name, cfg) in &sizes {
        for &l in &args.lengths {
            for &threads in &args.threads {
                // The published step first, in its own process, while this
                // one holds no model: the larger rows need most of the memory.
                let theirs =
                    (!args.native_only).then(|| published(cfg, l, threads, &python, &args));
                tch::set_num_threads(threads);
                let (times, params) = native(cfg, l, &args)?;
                let ours = median(times);
                native_by.insert((name.clone(), l, threads), ours);
                let (theirs, ratio) = match theirs {
                    None => ("-".to_string(), "-".to_string()),
                    Some(theirs) => match theirs {
                        Ok(p) => {
                            if p.parameters != params {
                                eprintln!(
                                    "warning: the published model has {} parameters, the native {params}",
                                    p.parameters
                                );
                            }
                            torch_version = Some(p.torch.clone());
                            let theirs = median(p.seconds);
                            (format!("{theirs:.3}"), format!("{:.2}x", theirs / ours))
                        }
                        // Reported in the row: the published step does not
                        // fit (the kernel's OOM killer) is itself a result.
                        Err(e) => {
                            let why = if e.to_string().contains("SIGKILL") {
                                "killed (OOM?)"
                            } else {
                                "failed"
                            };
                            eprintln!("published step, {name} L={l} {threads} threads: {e:#}");
                            (why.to_string(), "-".to_string())
                        }
                    },
                };
                println!(
                    "{name:<10} {l:>5} {threads:>8} {params:>10} {ours:>14.3} {theirs:>17} {ratio:>9}"
                );
            }
        }
    }
    if let Some(v) = torch_version {
        println!("published step under PyTorch {v}");
    }
    if args.threads.len() > 1 {
        let (a, b) = (args.threads[0], args.threads[args.threads.len() - 1]);
        for (name, _) in &sizes {
            for &l in &args.lengths {
                let (x, y) = (
                    native_by[&(name.clone(), l, a)],
                    native_by[&(name.clone(), l, b)],
                );
                println!(
                    "native {name} L={l}: {b} threads {:.2}x the speed of {a}",
                    x / y
                );
            }
        }
    }
    Ok(())
}
