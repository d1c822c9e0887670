//! `digctl bench`: seconds per sample per sampler step of
//! (a) the naive path, as the published code runs: batch 1 and every
//!     pair-derived tensor recomputed at every step, and
//! (b) the optimized path: pair tensors computed once per protein, batches
//!     of B samples per forward pass,
//! for the published architecture with random weights, plus this machine's
//! bound: the step's dense matrix-multiply FLOPs at the matmul throughput
//! measured in the same run. Prints a table; never a pass/fail test.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use dig_model::config::{QUERY_POINTS, VALUE_POINTS};
use dig_model::rng::initial_state;
use dig_model::so3::So3Tables;
use dig_model::{DigModel, ModelConfig, ProteinContext, Sampler, Schedule};
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct BenchArgs {
    /// Protein lengths to measure.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    lengths: Vec<i64>,
    /// Batch sizes of the optimized path.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batch_sizes: Vec<i64>,
    /// Timed steps per measurement (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Model directory to benchmark (default: the published architecture, random weights).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

/// Dense matrix-multiply FLOPs of one step of one sample (2 per multiply-add).
fn dense_flops(cfg: &ModelConfig, l: i64) -> f64 {
    let (d, h, ff) = (
        cfg.d_model as f64,
        cfg.n_heads as f64,
        cfg.dim_feedforward as f64,
    );
    let l = l as f64;
    let pts = h * (2 * QUERY_POINTS + VALUE_POINTS) as f64 * 3.0;
    let per_layer = l * d * d * 3.0       // scalar q, k, v
        + l * d * pts                     // point q, k, v
        + l * (2.0 * d + 32.0 * h) * d    // fc_out
        + 2.0 * l * d * ff                // feed-forward
        + 2.0 * l * l * d                 // q.k and A v
        + l * l * h * VALUE_POINTS as f64 * 3.0 // A v_points
        + l * l * d; // A x pair_value (cached)
    let heads = 2.0 * (l * d * d + l * d * 3.0);
    2.0 * (cfg.n_layer as f64 * per_layer + heads + l * d * cfg.dim_single as f64)
}

/// Sustained float32 matmul throughput (FLOP/s) on model-like shapes.
fn matmul_throughput() -> f64 {
    let a = Tensor::randn([2048, 768], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([768, 768], (Kind::Float, Device::Cpu));
    let _ = a.matmul(&b);
    let (mut n, start) = (0, Instant::now());
    while start.elapsed().as_secs_f64() < 2.0 {
        let _ = a.matmul(&b);
        n += 1;
    }
    n as f64 * 2.0 * 2048.0 * 768.0 * 768.0 / start.elapsed().as_secs_f64()
}

fn poses(b: i64, l: i64) -> (Tensor, Tensor) {
    let (mut tr, mut rot) = (Vec::new(), Vec::new());
    for i in 0..b {
        let s = initial_state(0, i as u64, l as usize, 35.0);
        tr.extend(s.tr);
        rot.extend(s.rot);
    }
    (
        Tensor::from_slice(&tr).view([b, l, 3]),
        Tensor::from_slice(&rot).view([b, l, 3, 3]),
    )
}

/// Seconds per step of `step` over `steps` timed steps after a warm-up.
fn time_steps(steps: usize, mut step: impl FnMut()) -> f64 {
    step();
    let start = Instant::now();
    for _ in 0..steps {
        step();
    }
    start.elapsed().as_secs_f64() / steps as f64
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => DigModel::load_dir(dir, Device::Cpu)?,
        None => DigModel::random(&ModelConfig::default(), 0, Device::Cpu),
    };
    let cfg = model.net.config().clone();
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(&model.net, Schedule::new(&cfg, &so3, None)?);
    let plan = sampler.schedule().steps[250];
    let threads = tch::get_num_threads();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "digctl bench: {} parameters, {threads} torch threads, {cpu}",
        model.num_parameters()
    );
    let flops_per_s = matmul_throughput();
    println!(
        "matmul throughput: {:.1} GFLOP/s (float32, 2048x768 @ 768x768)",
        flops_per_s / 1e9
    );
    println!();
    println!(
        "{:>5} {:>10} {:>14} {:>10} {:>10} {:>12}",
        "L", "path", "s/sample/step", "vs naive", "bound s", "x bound"
    );
    for &l in &args.lengths {
        tch::manual_seed(l);
        let single = Tensor::randn([l, cfg.dim_single], (Kind::Float, Device::Cpu));
        let pair = Tensor::randn([l, l, cfg.dim_pair_repr], (Kind::Float, Device::Cpu));
        let bound = dense_flops(&cfg, l) / flops_per_s;
        // (a) naive: the published code's order of work.
        let (tr, rot) = poses(1, l);
        let naive = time_steps(args.steps.clamp(1, 2), || {
            let ctx = model.net.prepare(&single, &pair, u64::MAX);
            let _ = sampler.step(&ctx, &tr, &rot, &plan);
        });
        println!(
            "{l:>5} {:>10} {naive:>14.4} {:>10} {bound:>10.4} {:>12.2}",
            "naive",
            "1.00x",
            naive / bound
        );
        // (b) optimized: one context per protein, batched samples.
        let t0 = Instant::now();
        let ctx: ProteinContext = model.net.prepare(&single, &pair, u64::MAX);
        let prep = t0.elapsed().as_secs_f64();
        for &b in &args.batch_sizes {
            let (tr, rot) = poses(b, l);
            let per_step = time_steps(args.steps, || {
                let _ = sampler.step(&ctx, &tr, &rot, &plan);
            });
            let s = per_step / b as f64;
            println!(
                "{l:>5} {:>10} {s:>14.4} {:>9.2}x {bound:>10.4} {:>12.2}",
                format!("batch {b}"),
                naive / s,
                s / bound
            );
        }
        println!("{l:>5} {:>10} {prep:>14.4}  (once per protein: x2d, pair bias and value of every layer)", "prepare");
    }
    println!();
    println!("bound = dense matmul FLOPs of one sample-step / measured matmul throughput; x bound = time / bound");
    Ok(())
}
