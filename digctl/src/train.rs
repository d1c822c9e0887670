//! `digctl train`: train or fine-tune DiG on molecular-dynamics frames with
//! the published loss (../shared/TRAINING.md).
//!
//! Output: a model directory (`config.json`, `model.safetensors`) that
//! `digctl sample`, `upload-model` and the workers load unchanged, plus
//! `training.json` (data, hyper-parameters, losses, time) and
//! `checkpoint/` (weights and optimizer state) for `--resume`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dig_model::dataset::{load, read_manifest};
use dig_model::trainer::{LrSchedule, TrainOptions, Trainer};
use dig_model::{DigModel, ModelConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::device::parse_device;

#[derive(Clone, Copy, ValueEnum)]
enum Schedule {
    /// Linear warm-up, then constant (the published configuration).
    Constant,
    /// Linear warm-up, then cosine decay to --min-lr-fraction of --lr.
    Cosine,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Weights {
    /// The optimizer's weights after the last update.
    Raw,
    /// The exponential moving average of the weights (needs --ema).
    Ema,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Weights::Raw => "raw",
            Weights::Ema => "ema",
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Data manifest: JSON Lines, one object per trajectory with `trajectory`,
    /// `topology` (may be omitted for a PDB), `features` (.npz) and optional
    /// `weight`; relative paths from the manifest's folder.
    #[arg(long)]
    data: PathBuf,
    /// Output model directory (created; holds checkpoint/ while training).
    #[arg(long)]
    out: PathBuf,
    /// Start from this model directory's weights and architecture (fine-tuning).
    #[arg(long, conflicts_with = "size")]
    init: Option<PathBuf>,
    /// Architecture of a model trained from scratch: `small` (d_model 128,
    /// d_pair 64, 4 layers, 8 heads, feed-forward 256), `published` (81.9 M
    /// parameters) or `d_model,d_pair,n_layer,n_heads[,dim_feedforward]`.
    #[arg(long, default_value = "small")]
    size: String,
    /// Optimizer updates in all (with --resume: the total to reach).
    #[arg(long, default_value_t = 10_000)]
    steps: u64,
    /// Structures per update (even: time steps come in mirrored pairs).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate of Adam (published: 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warm-up steps (published: 30 000; default: that or a tenth of --steps, whichever is smaller).
    #[arg(long)]
    warmup: Option<u64>,
    /// Learning rate after the warm-up.
    #[arg(long, value_enum, default_value = "constant")]
    schedule: Schedule,
    /// With --schedule cosine: the final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.05)]
    min_lr_fraction: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Longest contiguous window of residues per batch (published: 256).
    #[arg(long, default_value_t = 256)]
    crop: usize,
    /// Seed of every random draw (initial weights, batches, noise, dropout).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of each trajectory's frames held out for the validation loss.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Dropout in training mode (published: 0.1).
    #[arg(long, default_value_t = dig_model::training::DROPOUT)]
    dropout: f64,
    /// Write a checkpoint (and the model directory) every this many steps.
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Validation loss every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    val_every: u64,
    /// Mean losses logged every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch threads (default: libtorch's choice, usually one per core).
    #[arg(long)]
    threads: Option<i32>,
    /// Continue the run in --out from its checkpoint (same options and data;
    /// --steps may be raised). Bit-identical to an uninterrupted run on the
    /// same machine and thread count.
    #[arg(long)]
    resume: bool,
    /// Stop after this update (validation, checkpoint and model directory
    /// written there) although the learning-rate schedule runs to --steps;
    /// `--resume` continues the run as if it had not stopped. For a stage of
    /// a longer recipe, or a run that must fit a session.
    #[arg(long, value_name = "N")]
    stop_at: Option<u64>,
    /// Keep an exponential moving average of the weights with this decay
    /// (e.g. 0.999: about the last 1000 updates), checkpointed beside the
    /// weights; its validation loss is measured beside theirs.
    #[arg(long)]
    ema: Option<f64>,
    /// Which weights the model directory holds: the trained ones (`raw`) or
    /// their moving average (`ema`, needs --ema). The other set is written
    /// to the model directory's `raw/` or `ema/` folder (a model directory
    /// too), and `training.json` says which is which.
    #[arg(long, value_enum, default_value = "raw")]
    model_weights: Weights,
    /// Draw training time steps with t >= --high-t-from this many times as
    /// often as the others (each step independently, not in the published
    /// mirrored pairs); validation keeps the published draw. Not published:
    /// examples/adk/README.md says what it was measured for.
    #[arg(long, value_name = "W")]
    high_t_weight: Option<f64>,
    /// With --high-t-weight: where high noise starts (a diffusion time).
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.7,
        requires = "high_t_weight"
    )]
    high_t_from: f64,
    /// Above this diffusion time, train on the exact score of the
    /// protein's training frames at each perturbed pose (averaged over
    /// global rotations by importance sampling, 512 rotations per example)
    /// instead of the score of the one frame that was noised: the same
    /// minimiser, far less variance at high noise, about 0.07 s more per
    /// such example at 214 residues and 88 frames. Not published:
    /// examples/adk/README.md says what it was measured for.
    #[arg(long, value_name = "T")]
    exact_target_above: Option<f64>,
    /// Give each layer's point attention the handedness of what its heads
    /// attend to (`chiral_features` of config.rs; not published). With
    /// --init of a model without them they are added at zero, so training
    /// starts from that model's function. examples/adk/README.md, "Mirror
    /// images", says why.
    #[arg(long)]
    chiral_features: bool,
    /// Give each layer's point attention the mean of value directions
    /// turned by each residue's frame, without its position
    /// (`orientation_features` of config.rs; not published). With --init of
    /// a model without them they are added at zero, so training starts from
    /// that model's function. examples/adk/README.md, "An orientation
    /// channel", says why.
    #[arg(long)]
    orientation_features: bool,
    /// The largest translation noise (Å; published 35): the model's
    /// `tr_sigma_max`, for a fresh model or in place of --init's. At the
    /// published 35 Å a protein of a few hundred residues keeps so much of
    /// its structure at t = 1 that the model never learns to fold pure
    /// noise (examples/adk/README.md, "Mirror images").
    #[arg(long)]
    tr_sigma_max: Option<f64>,
}

/// `small`, `published` or `d_model,d_pair,n_layer,n_heads[,dim_feedforward]`.
pub fn parse_size(s: &str) -> Result<ModelConfig> {
    let base = ModelConfig::default();
    match s {
        "published" => Ok(base),
        "small" => Ok(ModelConfig {
            d_model: 128,
            d_pair: 64,
            n_layer: 4,
            n_heads: 8,
            dim_feedforward: 256,
            ..base
        }),
        dims => {
            let v: Vec<i64> = dims
                .split(',')
                .map(|x| x.trim().parse::<i64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--size {dims:?}: use small, published or d_model,d_pair,n_layer,n_heads[,dim_feedforward]"
                    )
                })?;
            if !(v.len() == 4 || v.len() == 5) {
                bail!("--size {dims:?}: give 4 or 5 numbers (d_model,d_pair,n_layer,n_heads[,dim_feedforward])");
            }
            let cfg = ModelConfig {
                d_model: v[0],
                d_pair: v[1],
                n_layer: v[2],
                n_heads: v[3],
                dim_feedforward: v.get(4).copied().unwrap_or(2 * v[0]),
                ..base
            };
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("--size {dims:?}: {e}"))?;
            Ok(cfg)
        }
    }
}

fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let device = parse_device(&args.device)?;
    if let Some(n) = args.threads {
        if n < 1 {
            bail!("--threads must be at least 1, got {n}");
        }
        tch::set_num_threads(n);
    }
    let warmup = args.warmup.unwrap_or((args.steps / 10).min(30_000));
    let opts = TrainOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup,
        schedule: match args.schedule {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine,
        },
        min_lr_fraction: args.min_lr_fraction,
        clip: args.clip,
        crop: args.crop,
        seed: args.seed,
        val_fraction: args.val_fraction,
        dropout: args.dropout,
        ema: args.ema,
        time_weighting: args
            .high_t_weight
            .map(|weight| dig_model::training::TimeWeighting {
                weight,
                from: args.high_t_from,
            }),
        exact_target_above: args.exact_target_above,
    };
    opts.validate()?;
    if args.model_weights == Weights::Ema && args.ema.is_none() {
        bail!("--model-weights ema needs --ema DECAY (for example --ema 0.999)");
    }
    let stop = match args.stop_at {
        Some(n) if n == 0 || n > args.steps => {
            bail!(
                "--stop-at must be between 1 and --steps ({}), got {n}",
                args.steps
            )
        }
        Some(n) => n,
        None => args.steps,
    };
    if args.checkpoint_every == 0 || args.val_every == 0 || args.log_every == 0 {
        bail!("--checkpoint-every, --val-every and --log-every must be at least 1");
    }
    let has_checkpoint = Trainer::read_checkpoint_state(&args.out)?.is_some();
    if has_checkpoint && !args.resume {
        bail!(
            "{} already holds a training run (checkpoint/); add --resume to continue it or choose another --out",
            args.out.display()
        );
    }

    // The architecture: from --init, or fresh from --size and --seed.
    let (model, init_desc) = match &args.init {
        Some(dir) => {
            let model = DigModel::load_dir(dir, device)
                .with_context(|| format!("--init {}", dir.display()))?;
            let mut desc = json!({"from": dir.display().to_string()});
            let mut cfg = model.net.config().clone();
            let mut added = Vec::new();
            if args.chiral_features && !cfg.chiral_features {
                cfg.chiral_features = true;
                added.push("chiral_features");
            }
            if args.orientation_features && !cfg.orientation_features {
                cfg.orientation_features = true;
                added.push("orientation_features");
            }
            if !added.is_empty() {
                desc["added"] = json!(added.join(", "));
            }
            if let Some(s) = args.tr_sigma_max {
                if s != cfg.tr_sigma_max {
                    desc["changed"] = json!({"tr_sigma_max": {"from": cfg.tr_sigma_max, "to": s}});
                    cfg.tr_sigma_max = s;
                }
            }
            if &cfg == model.net.config() {
                (model, desc)
            } else {
                let changed = model
                    .with_config(&cfg)
                    .map_err(|e| anyhow::anyhow!("--init {}: {e}", dir.display()))?;
                (changed, desc)
            }
        }
        None => {
            let mut cfg = parse_size(&args.size)?;
            cfg.chiral_features = args.chiral_features;
            cfg.orientation_features = args.orientation_features;
            if let Some(s) = args.tr_sigma_max {
                cfg.tr_sigma_max = s;
            }
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("--chiral-features/--tr-sigma-max: {e}"))?;
            (
                DigModel::random(&cfg, args.seed as i64, device),
                json!({"random": {"size": args.size, "seed": args.seed}}),
            )
        }
    };
    let cfg = model.net.config().clone();
    let entries = read_manifest(&args.data)?;
    let data = load(&entries, &cfg, args.val_fraction, args.seed)?;
    let mut trainer = Trainer::new(model, data, opts.clone())?;
    if args.resume {
        trainer.resume(&args.out)?;
        eprintln!("resuming {} at step {}", args.out.display(), trainer.step);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let data_desc: Vec<serde_json::Value> = trainer
        .data()
        .iter()
        .map(|p| {
            json!({
                "trajectory": p.entry.trajectory.display().to_string(),
                "topology": p.entry.topology.as_ref().map(|t| t.display().to_string()),
                "features": p.entry.features.display().to_string(),
                "weight": p.entry.weight,
                "residues": p.len_residues(),
                "terminal_signal_nats": p.terminal_signal(cfg.tr_sigma_max),
                "frames": p.frames.len(),
                "train_frames": p.train.len(),
                "val_frames": p.val.len(),
            })
        })
        .collect();
    for p in trainer.data() {
        eprintln!(
            "{}: {} residues, {} frames ({} training, {} validation)",
            p.name,
            p.len_residues(),
            p.frames.len(),
            p.train.len(),
            p.val.len()
        );
        let signal = p.terminal_signal(cfg.tr_sigma_max);
        if signal > dig_model::dataset::TERMINAL_SIGNAL_WARN {
            // The noise level that leaves 1.5 nats (AdK at 200 Å: 1.4).
            let wide = cfg.tr_sigma_max * (signal / 1.5).sqrt();
            eprintln!(
                "warning: {}: at tr_sigma_max {} Å its training frames keep {signal:.1} nats of \
                 structure at t = 1 (|x0|^2 / sigma^2), which the sampler's prior does not have; \
                 models trained so fold mirror images (examples/adk/README.md, \"Stage 3\"). \
                 --tr-sigma-max {:.0} leaves 1.5 nats.",
                p.name,
                cfg.tr_sigma_max,
                wide.ceil()
            );
        }
    }
    eprintln!(
        "model: d_model {}, d_pair {}, {} layers, {} heads{}, {} parameters; {} steps of batch {} on {:?}, {} threads",
        cfg.d_model,
        cfg.d_pair,
        cfg.n_layer,
        cfg.n_heads,
        if cfg.chiral_features { ", chiral features" } else { "" },
        trainer.model.num_parameters(),
        opts.steps,
        opts.batch_size,
        device,
        tch::get_num_threads()
    );
    let command: Vec<String> = std::env::args().collect();
    let summary = |t: &Trainer, seconds: f64, finished: bool| {
        json!({
            "finished": finished,
            "command": command.join(" "),
            "init": init_desc,
            "model": cfg,
            "parameters": t.model.num_parameters(),
            "data": {"manifest": args.data.display().to_string(), "trajectories": data_desc},
            "hyperparameters": t.opts,
            "steps_done": t.step,
            "final": {
                "train_loss": t.history.last().map(|p| p.loss),
                "val_loss": t.validation.last().map(|p| p.loss),
            },
            "history": t.history,
            "validation": t.validation,
            "validation_ema": t.validation_ema,
            "weights": {
                "model": args.model_weights.name(),
                "ema_decay": args.ema,
                "other": t.has_ema().then_some(match args.model_weights {
                    Weights::Raw => "ema/",
                    Weights::Ema => "raw/",
                }),
            },
            "time": {
                "seconds": seconds,
                "threads": tch::get_num_threads(),
                "device": format!("{device:?}"),
            },
        })
    };
    let save = |t: &mut Trainer, seconds: f64, finished: bool| -> Result<()> {
        t.save_checkpoint(&args.out, seconds)?;
        if t.has_ema() {
            let (main, other) = match args.model_weights {
                Weights::Raw => (false, "ema"),
                Weights::Ema => (true, "raw"),
            };
            let other_dir = args.out.join(other);
            t.with_ema_weights(|m| m.save_dir(if main { &args.out } else { &other_dir }))?;
            t.model
                .save_dir(if main { &other_dir } else { &args.out })?;
        } else {
            t.model.save_dir(&args.out)?;
        }
        write_json_atomic(
            &args.out.join("training.json"),
            &summary(t, seconds, finished),
        )
    };

    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(opts.steps);
        bar.set_style(
            ProgressStyle::with_template(
                "train [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(trainer.step);
        bar
    });
    let session = Instant::now();
    let seconds = |t: &Trainer| t.seconds_before + session.elapsed().as_secs_f64();
    if trainer.step > stop {
        bail!(
            "the run in {} is at update {}, already past --stop-at {stop}",
            args.out.display(),
            trainer.step
        );
    }
    while trainer.step < stop {
        let st = trainer.train_step()?;
        let s = trainer.step;
        if let Some(bar) = &bar {
            bar.set_position(s);
            bar.set_message(format!(
                "loss {:.3} (tr {:.3} rot {:.3})",
                st.loss, st.tr_loss, st.rot_loss
            ));
        }
        if s.is_multiple_of(args.log_every) || s == stop {
            if let Some(p) = trainer.log_window() {
                let line = format!(
                    "step {s}/{}: loss {:.4} (tr {:.4}, rot {:.4}), lr {:.2e}, grad norm {:.3}, {:.0} s",
                    opts.steps,
                    p.loss,
                    p.tr_loss,
                    p.rot_loss,
                    p.lr.unwrap_or(0.0),
                    p.grad_norm.unwrap_or(0.0),
                    seconds(&trainer)
                );
                match &bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
        if s.is_multiple_of(args.val_every) || s == stop {
            if let Some(v) = trainer.validate(4)? {
                let ema = match trainer.validate_ema(4)? {
                    Some(e) => format!(
                        "; EMA weights {:.4} (tr {:.4}, rot {:.4})",
                        e.loss, e.tr_loss, e.rot_loss
                    ),
                    None => String::new(),
                };
                let line = format!(
                    "step {s}: validation loss {:.4} (tr {:.4}, rot {:.4}){ema}",
                    v.loss, v.tr_loss, v.rot_loss
                );
                match &bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
        if s.is_multiple_of(args.checkpoint_every) || s == stop {
            let secs = seconds(&trainer);
            save(&mut trainer, secs, s == opts.steps)?;
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if trainer.step == opts.steps && !args.out.join("training.json").exists() {
        let secs = seconds(&trainer);
        save(&mut trainer, secs, true)?;
    }
    if trainer.step < opts.steps {
        eprintln!(
            "stopped at update {} of {} (--stop-at); continue with --resume",
            trainer.step, opts.steps
        );
    }
    eprintln!(
        "trained {} steps in {:.0} s (this session {:.0} s); model in {}",
        trainer.step,
        seconds(&trainer),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
