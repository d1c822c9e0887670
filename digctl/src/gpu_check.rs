//! `digctl gpu-check`: everything a GPU machine must show before it joins a
//! fleet, in one command and one table (`gpu-check.sh` of `make gpu-bundle`
//! wraps it; the same command runs on the CPU in `make test`).
//!
//! 1. Parity: the published code's fixtures (`forward.npz`: one network
//!    call; `init_state.npz` -> `final_state.npz`: the 500-step sampler) on
//!    the device, against the tolerances a faithful float32 port meets.
//! 2. Speed: seconds per sample per sampler step of the published
//!    architecture (random weights) at each length, batch sizes doubling
//!    from 1 until the device's memory runs out, `--max-batch` or a step
//!    slower than `--max-step-secs`.
//! 3. End to end: `digctl standalone` (API, coordinator and a worker on the
//!    device in one process) runs a job of the fixture model through the HTTP
//!    API; the fetched samples are compared with `digctl sample` on the same
//!    device.
//!
//! `--precision tf32` lets cuBLAS use TensorFloat-32 for float32 matrix
//! products (libtorch's `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`, read at the
//! first product), so the parity rows state its error; on a CPU it changes
//! nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dig_model::rng::initial_state;
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::{DigModel, ModelConfig, Sampler, Schedule};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::device::parse_device;

/// The fixture model's 24-residue sequence for the end-to-end job (the
/// fixtures' features carry none; any 24 letters do).
const FIXTURE_SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";

/// The tolerances a faithful float32 port meets (fixtures/README.md).
const TOL_FORWARD: f64 = 1e-4;
const TOL_FINAL_TR: f64 = 1e-3;
const TOL_FINAL_ROT: f64 = 1e-4;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// float32 throughout (the parity tolerances apply).
    Fp32,
    /// float32 tensors, TensorFloat-32 matrix products on CUDA (about 10
    /// mantissa bits; the parity rows report its error, no verdict).
    Tf32,
}

#[derive(Args)]
pub struct GpuCheckArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The published fixtures: config.json, model.safetensors, features.npz,
    /// forward.npz, init_state.npz, final_state.npz (the bundle's fixtures/).
    #[arg(long)]
    fixtures: PathBuf,
    /// Protein lengths timed.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    lengths: Vec<i64>,
    /// Largest batch tried (batches double from 1 until the device's memory).
    #[arg(long, default_value_t = 1024)]
    max_batch: i64,
    /// Stop doubling once one step of a batch takes longer than this.
    #[arg(long, default_value_t = 4.0)]
    max_step_secs: f64,
    /// Timed steps per measurement, after one warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Time the fixture model instead of the published architecture (small
    /// enough for a CPU check).
    #[arg(long)]
    fixture_arch: bool,
    /// Samples of the end-to-end job.
    #[arg(long, default_value_t = 64)]
    job_samples: u64,
    /// Sampler steps of the end-to-end job (default: the model's 500).
    #[arg(long)]
    job_steps: Option<i64>,
    /// float32 products, or TensorFloat-32 ones on CUDA.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Working directory for the job's data (default: a temporary one, removed).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One row of the final table.
struct Row {
    check: String,
    value: String,
    limit: String,
    verdict: Verdict,
}

#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Ok,
    Fail,
    Info,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Info => "-",
        }
    }
}

fn within(err: f64, tol: f64, precision: Precision) -> Verdict {
    match precision {
        Precision::Tf32 => Verdict::Info,
        Precision::Fp32 if err < tol => Verdict::Ok,
        Precision::Fp32 => Verdict::Fail,
    }
}

fn npz(path: &Path, device: Device) -> Result<std::collections::BTreeMap<String, Tensor>> {
    Ok(Tensor::read_npz(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(args: GpuCheckArgs) -> Result<()> {
    if args.precision == Precision::Tf32 {
        // Read by libtorch at the first cuBLAS product, which has not run yet.
        std::env::set_var("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1");
    }
    let device = parse_device(&args.device)?;
    for f in [
        "config.json",
        "model.safetensors",
        "features.npz",
        "forward.npz",
        "init_state.npz",
        "final_state.npz",
    ] {
        if !args.fixtures.join(f).is_file() {
            bail!(
                "--fixtures {}: {f} is missing (the published fixtures: config.json, model.safetensors, features.npz, forward.npz, init_state.npz, final_state.npz)",
                args.fixtures.display()
            );
        }
    }
    if args.lengths.iter().any(|&l| l < 2) {
        bail!("--lengths: every length must be at least 2");
    }
    if args.max_batch < 1 {
        bail!("--max-batch must be at least 1");
    }
    let precision = match args.precision {
        Precision::Fp32 => "fp32",
        Precision::Tf32 => "tf32",
    };
    let started = Instant::now();
    eprintln!(
        "gpu-check: device {}, precision {precision}, {} CUDA device(s) visible to libtorch",
        args.device,
        tch::Cuda::device_count()
    );
    let mut rows = Vec::new();
    let mut report = json!({"device": args.device, "precision": precision});

    // 1. Parity.
    eprintln!("[1/3] parity against the published fixtures");
    let parity = parity(&args.fixtures, device)?;
    for (name, err, tol) in [
        (
            "parity: network call, translation score",
            parity.forward_tr,
            TOL_FORWARD,
        ),
        (
            "parity: network call, rotation score",
            parity.forward_rot,
            TOL_FORWARD,
        ),
        (
            "parity: 500-step sampler, translations (Å)",
            parity.final_tr,
            TOL_FINAL_TR,
        ),
        (
            "parity: 500-step sampler, rotations",
            parity.final_rot,
            TOL_FINAL_ROT,
        ),
    ] {
        rows.push(Row {
            check: name.into(),
            value: format!("max |diff| {err:.2e}"),
            limit: format!("{tol:.0e}"),
            verdict: within(err, tol, args.precision),
        });
    }
    report["parity"] = json!({
        "forward_tr": parity.forward_tr, "forward_rot": parity.forward_rot,
        "final_tr": parity.final_tr, "final_rot": parity.final_rot,
        "sampler_seconds": parity.sampler_secs,
    });

    // 2. Speed.
    eprintln!("[2/3] seconds per sample per sampler step");
    let model = if args.fixture_arch {
        DigModel::load_dir(&args.fixtures, device)?
    } else {
        DigModel::random(&ModelConfig::default(), 0, device)
    };
    let mut timings = Vec::new();
    for &l in &args.lengths {
        let t = time_length(&model, l, device, &args)?;
        let best = t
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .copied()
            .context("no batch fitted on the device")?;
        let one = t[0].1;
        let stop = t.last().map(|x| x.0).unwrap_or(1);
        rows.push(Row {
            check: format!("speed: L = {l}, batch 1"),
            value: format!("{one:.4} s/sample/step"),
            limit: String::new(),
            verdict: Verdict::Info,
        });
        rows.push(Row {
            check: format!("speed: L = {l}, best of batches 1..{stop}"),
            value: format!(
                "batch {}: {:.5} s/sample/step, {:.1} samples/min at 500 steps ({:.1}x batch 1)",
                best.0,
                best.1,
                60.0 / (best.1 * 500.0),
                one / best.1
            ),
            limit: String::new(),
            verdict: Verdict::Info,
        });
        timings.push(json!({
            "length": l,
            "batches": t.iter().map(|(b, s)| json!({"batch": b, "seconds_per_sample_step": s})).collect::<Vec<_>>(),
        }));
    }
    report["speed"] = json!({
        "architecture": if args.fixture_arch { "fixture" } else { "published" },
        "parameters": model.num_parameters(),
        "lengths": timings,
    });
    drop(model);

    // 3. End to end.
    eprintln!(
        "[3/3] a digctl standalone job with a worker on {}",
        args.device
    );
    let job = end_to_end(&args)?;
    rows.push(Row {
        check: format!("job: standalone, worker on {}", args.device),
        value: format!(
            "{} of {} samples in {:.1} s; vs digctl sample: max |dT| {:.2e} Å{}",
            job.fetched,
            args.job_samples,
            job.job_secs,
            job.max_tr_diff,
            if job.identical { ", bit-identical" } else { "" }
        ),
        limit: format!("{} samples, 1e-3 Å", args.job_samples),
        verdict: if job.fetched == args.job_samples && job.max_tr_diff < 1e-3 {
            Verdict::Ok
        } else {
            Verdict::Fail
        },
    });
    report["job"] = json!({
        "samples": args.job_samples, "fetched": job.fetched, "seconds": job.job_secs,
        "max_tr_diff": job.max_tr_diff, "max_rot_diff": job.max_rot_diff, "bit_identical": job.identical,
    });

    let failed = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    report["failed"] = json!(failed);
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    print_table(&rows, &args.device, precision, started.elapsed());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        bail!("gpu-check: {failed} check(s) failed");
    }
    Ok(())
}

fn print_table(rows: &[Row], device: &str, precision: &str, took: Duration) {
    let w0 = rows
        .iter()
        .map(|r| r.check.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let w1 = rows
        .iter()
        .map(|r| r.value.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    let w2 = rows
        .iter()
        .map(|r| r.limit.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    println!();
    println!(
        "gpu-check on {device} ({precision}), {:.0} s; digctl {}",
        took.as_secs_f64(),
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "{:<w0$}  {:<w1$}  {:<w2$}  result",
        "check", "value", "limit"
    );
    println!("{}", "-".repeat(w0 + w1 + w2 + 12));
    for r in rows {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r.check,
            r.value,
            r.limit,
            r.verdict.word()
        );
    }
}

struct Parity {
    forward_tr: f64,
    forward_rot: f64,
    final_tr: f64,
    final_rot: f64,
    sampler_secs: f64,
}

fn parity(dir: &Path, device: Device) -> Result<Parity> {
    let model = DigModel::load_dir(dir, device)?;
    let f = npz(&dir.join("features.npz"), device)?;
    let fw = npz(&dir.join("forward.npz"), device)?;
    let init = npz(&dir.join("init_state.npz"), device)?;
    let fin = npz(&dir.join("final_state.npz"), device)?;
    let get = |m: &std::collections::BTreeMap<String, Tensor>, k: &str, file: &str| {
        m.get(k)
            .map(|t| t.shallow_clone())
            .with_context(|| format!("{file} has no {k:?}"))
    };
    let _guard = tch::no_grad_guard();
    let ctx = model.net.prepare(
        &get(&f, "single", "features.npz")?,
        &get(&f, "pair", "features.npz")?,
        u64::MAX,
    );
    let (t, r) = model.net.forward_step(
        &ctx,
        &get(&fw, "tr", "forward.npz")?,
        &get(&fw, "rot_mat", "forward.npz")?,
        Some(&get(&fw, "mask", "forward.npz")?),
        &get(&fw, "step", "forward.npz")?,
    );
    let forward_tr = max_abs_diff(&t, &get(&fw, "tr_eps", "forward.npz")?);
    let forward_rot = max_abs_diff(&r, &get(&fw, "rot_eps", "forward.npz")?);
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(&model.net, Schedule::new(model.net.config(), &so3, None)?);
    let t0 = Instant::now();
    let (tr, rot) = sampler.run(
        &ctx,
        get(&init, "tr", "init_state.npz")?.unsqueeze(0),
        get(&init, "rot_mat", "init_state.npz")?.unsqueeze(0),
        |_| {},
    );
    synchronize(device);
    let sampler_secs = t0.elapsed().as_secs_f64();
    Ok(Parity {
        forward_tr,
        forward_rot,
        final_tr: max_abs_diff(&tr.squeeze_dim(0), &get(&fin, "tr", "final_state.npz")?),
        final_rot: max_abs_diff(
            &rot.squeeze_dim(0),
            &get(&fin, "rot_mat", "final_state.npz")?,
        ),
        sampler_secs,
    })
}

fn poses(b: i64, l: i64, device: Device) -> (Tensor, Tensor) {
    let (mut tr, mut rot) = (Vec::new(), Vec::new());
    for i in 0..b {
        let s = initial_state(0, i as u64, l as usize, 35.0);
        tr.extend(s.tr);
        rot.extend(s.rot);
    }
    (
        Tensor::from_slice(&tr).view([b, l, 3]).to_device(device),
        Tensor::from_slice(&rot)
            .view([b, l, 3, 3])
            .to_device(device),
    )
}

/// (batch, seconds per sample per step) for batches 1, 2, 4, ... until the
/// memory runs out (libtorch's out-of-memory error, caught), `max_batch`, or
/// a step slower than `max_step_secs`.
fn time_length(
    model: &DigModel,
    l: i64,
    device: Device,
    args: &GpuCheckArgs,
) -> Result<Vec<(i64, f64)>> {
    let cfg = model.net.config();
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(&model.net, Schedule::new(cfg, &so3, None)?);
    let plan = sampler.schedule().steps[sampler.schedule().steps.len() / 2];
    let _guard = tch::no_grad_guard();
    tch::manual_seed(l);
    let single = Tensor::randn([l, cfg.dim_single], (Kind::Float, device));
    let pair = Tensor::randn([l, l, cfg.dim_pair_repr], (Kind::Float, device));
    let ctx = model.net.prepare(&single, &pair, u64::MAX);
    let mut out = Vec::new();
    let mut b = 1;
    // libtorch's errors arrive as panics of tch's calls, with libtorch's
    // whole C++ backtrace in the message: the batch that does not fit prints
    // its first line only.
    let _quiet = QuietPanics::install();
    while b <= args.max_batch {
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (tr, rot) = poses(b, l, device);
            let _ = sampler.step(&ctx, &tr, &rot, &plan);
            synchronize(device);
            let start = Instant::now();
            for _ in 0..args.steps {
                let _ = sampler.step(&ctx, &tr, &rot, &plan);
            }
            synchronize(device);
            start.elapsed().as_secs_f64() / args.steps.max(1) as f64
        }));
        match attempt {
            Ok(step) => {
                eprintln!(
                    "  L = {l:>4}, batch {b:>5}: {:.5} s/sample/step ({step:.3} s per step)",
                    step / b as f64
                );
                out.push((b, step / b as f64));
                if step > args.max_step_secs {
                    break;
                }
            }
            Err(_) if !out.is_empty() => {
                eprintln!("  L = {l:>4}, batch {b:>5}: does not fit (error above), stopping");
                break;
            }
            Err(_) => bail!("L = {l}: even batch 1 failed on {:?} (error above)", device),
        }
        b *= 2;
    }
    Ok(out)
}

/// While alive, a panic prints `  error: ` and the first line of its
/// message (see [`first_line`]) instead of the message and a backtrace; the
/// previous hook comes back on drop.
struct QuietPanics(Option<PanicHook>);

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

impl QuietPanics {
    fn install() -> QuietPanics {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            eprintln!("  error: {}", first_line(message));
        }));
        QuietPanics(Some(previous))
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            std::panic::set_hook(previous);
        }
    }
}

/// The message up to its first line break, escaped (`\n` in a `Debug`
/// string, as in tch's `Torch("...")`) or not, e.g. libtorch's
/// `CUDA out of memory. Tried to allocate 32.00 GiB. ...` without the
/// `Exception raised from ...` frames after it.
fn first_line(message: &str) -> &str {
    let end = [message.find('\n'), message.find("\\n")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(message.len());
    &message[..end]
}

struct JobResult {
    fetched: u64,
    job_secs: f64,
    max_tr_diff: f64,
    max_rot_diff: f64,
    identical: bool,
}

/// The default working directory goes when the check ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills `digctl standalone` when the check ends, however it ends.
struct Standalone(Child);

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn end_to_end(args: &GpuCheckArgs) -> Result<JobResult> {
    let exe = std::env::current_exe().context("locating digctl")?;
    let (work, _remove) = match &args.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("dig-gpu-check-{}", std::process::id()));
            (d.clone(), Some(RemoveOnDrop(d)))
        }
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let data = work.join("standalone");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(work.join("standalone.log"))?;
    let mut child = Command::new(&exe);
    child
        .args([
            "standalone",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--model",
        ])
        .arg(&args.fixtures)
        .arg("--data-dir")
        .arg(&data)
        .env("DIG_WORKER_DEVICE", &args.device)
        .env("DIG_WORKER_BATCH_SIZE", "16")
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut server = Standalone(child.spawn().context("starting digctl standalone")?);
    // Ready once its API key is written and the API answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let key = loop {
        if let Some(status) = server.0.try_wait()? {
            bail!(
                "digctl standalone exited ({status}); its log: {}",
                work.join("standalone.log").display()
            );
        }
        if let Ok(key) = std::fs::read_to_string(data.join("api-key")) {
            let key = key.trim().to_string();
            let ok = Command::new(&exe)
                .arg("models")
                .env("DIG_API_URL", &url)
                .env("DIG_API_KEY", &key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
            if ok {
                break key;
            }
        }
        if Instant::now() > deadline {
            bail!("digctl standalone did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let client = |a: &[&str]| -> Result<String> {
        let out = Command::new(&exe)
            .args(a)
            .env("DIG_API_URL", &url)
            .env("DIG_API_KEY", &key)
            .output()?;
        if !out.status.success() {
            bail!(
                "digctl {} failed ({}): {}",
                a.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let features = args.fixtures.join("features.npz");
    let features = features.to_str().context("fixtures path is not UTF-8")?;
    let n = args.job_samples.to_string();
    let steps = args.job_steps.map(|s| s.to_string());
    let mut submit = vec![
        "submit",
        "--features",
        features,
        "--sequence",
        FIXTURE_SEQUENCE,
        "--num-samples",
        &n,
        "--seed",
        "1",
        "--shard-size",
        "16",
        "--name",
        "gpu-check",
    ];
    if let Some(s) = &steps {
        submit.extend(["--steps", s.as_str()]);
    }
    let t0 = Instant::now();
    let job = client(&submit)?;
    client(&["wait", &job, "--timeout", "900"])?;
    let job_secs = t0.elapsed().as_secs_f64();
    let fetched = work.join("fetched");
    client(&[
        "fetch",
        &job,
        "--out",
        fetched.to_str().context("work dir is not UTF-8")?,
    ])?;
    drop(server);

    // The same samples by `digctl sample` on the same device.
    let local = work.join("local");
    let mut sample = Command::new(&exe);
    sample
        .args(["sample", "--model"])
        .arg(&args.fixtures)
        .args([
            "--features",
            features,
            "--sequence",
            FIXTURE_SEQUENCE,
            "--num-samples",
            &n,
        ])
        .args([
            "--seed",
            "1",
            "--batch-size",
            "16",
            "--device",
            &args.device,
            "--out",
        ])
        .arg(&local)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("sample.log"))?);
    if let Some(s) = &steps {
        sample.args(["--steps", s]);
    }
    if !sample.status()?.success() {
        bail!(
            "digctl sample failed: {}",
            std::fs::read_to_string(work.join("sample.log"))
                .unwrap_or_default()
                .trim()
        );
    }
    let reference = Ensemble::read_npz(&local.join("samples.npz"), FIXTURE_SEQUENCE)?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(fetched.join("manifest.json"))?)?;
    let (mut tr, mut rot, mut index) = (Vec::new(), Vec::new(), Vec::new());
    for s in manifest["shards"]
        .as_array()
        .context("manifest without shards")?
    {
        let i = s["index"].as_u64().context("shard without index")?;
        let e = Ensemble::read_npz(
            &fetched.join("shards").join(format!("{i:06}.npz")),
            FIXTURE_SEQUENCE,
        )?;
        tr.extend(e.tr);
        rot.extend(e.rot_mat);
        index.extend(e.sample_index);
    }
    let fetched_n = index.len() as u64;
    let diff = |a: &[f32], b: &[f32]| {
        if a.len() != b.len() {
            return f64::INFINITY;
        }
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max)
    };
    let max_tr_diff = diff(&tr, &reference.tr);
    let max_rot_diff = diff(&rot, &reference.rot_mat);
    let identical = index == reference.sample_index
        && tr
            .iter()
            .zip(&reference.tr)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        && rot
            .iter()
            .zip(&reference.rot_mat)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        && tr.len() == reference.tr.len();
    Ok(JobResult {
        fetched: fetched_n,
        job_secs,
        max_tr_diff,
        max_rot_diff,
        identical,
    })
}

#[cfg(test)]
mod tests {
    use super::first_line;

    #[test]
    fn first_line_stops_at_an_escaped_or_a_real_line_break() {
        let oom = r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 32.00 GiB.\nException raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1574 (most recent call first):\nframe #0: c10::Error::Error")"#;
        assert_eq!(
            first_line(oom),
            r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 32.00 GiB."#
        );
        assert_eq!(first_line("one\ntwo"), "one");
        assert_eq!(first_line("no break"), "no break");
    }
}
