//! The pipeline benchmark: one job through the whole distributed path
//! (`digctl api` → RabbitMQ → `digctl coordinator` → `digctl worker` → S3,
//! progress in Redis) against `digctl sample` doing the same work on the same
//! machine, in one run. Prints samples/s of both and their ratio.
//!
//! ```sh
//! make bench-pipeline        # = scripts/services.sh; source .services/env;
//!                            #   target/release/pipeline-bench [--samples N --steps T ...]
//! ```
//!
//! Timings: the pipeline from the submission (features already uploaded, as
//! a portal does once per protein) until the job is `succeeded`, manifest
//! written; the worker is started and idle beforehand (a service is long
//! running). The bare sampler from process start to exit (`digctl sample`
//! loads the model and features and writes its outputs). Both sample the
//! same model, features, seed, steps and batch size, and the benchmark checks
//! that the job's shards equal the local run, sample for sample.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dig_common::progress::ProgressStore;
use dig_tests::cluster::{assert_same_samples, Cluster};
use dig_tests::{digctl_ok, digctl_path, repo_root};

struct Args {
    samples: u64,
    steps: u64,
    batch: usize,
    shard_size: u64,
    /// `small` or `published` demo model, or a model directory.
    model: String,
    features: PathBuf,
    workers: usize,
    /// libtorch threads of `digctl sample` and of each worker; 0: libtorch's
    /// choice (one per core).
    threads: usize,
}

fn parse() -> Args {
    let mut a = Args {
        samples: 1000,
        steps: 20,
        batch: 8,
        shard_size: 128,
        model: "small".into(),
        features: repo_root().join("examples/hp35/features.npz"),
        workers: 1,
        threads: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        };
        match flag.as_str() {
            "--samples" => a.samples = value().parse().expect("--samples N"),
            "--steps" => a.steps = value().parse().expect("--steps T"),
            "--batch-size" => a.batch = value().parse().expect("--batch-size B"),
            "--shard-size" => a.shard_size = value().parse().expect("--shard-size S"),
            "--model" => a.model = value(),
            "--features" => a.features = value().into(),
            "--workers" => a.workers = value().parse().expect("--workers N"),
            "--threads" => a.threads = value().parse().expect("--threads N"),
            "-h" | "--help" => {
                println!(
                    "pipeline-bench [--samples 1000] [--steps 20] [--batch-size 8] \
                     [--shard-size 128] [--model small|published|DIR] [--features F.npz] [--workers 1] \
                     [--threads 0]\n\
                     --threads N: libtorch threads of digctl sample and of each worker (0: one per core).\n\
                     Needs the servers of .services/env (scripts/services.sh)."
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other}; see --help"),
        }
    }
    a
}

/// `digctl sample`'s thread option for `--threads N` (none for 0, libtorch's choice).
fn threads_args(threads: usize) -> Vec<String> {
    match threads {
        0 => Vec::new(),
        n => vec!["--threads".into(), n.to_string()],
    }
}

fn main() {
    let args = parse();
    let mut c = Cluster::distributed("bench");
    let model_dir = match args.model.as_str() {
        "small" | "published" => {
            let dir = c.dir.path().join("model");
            digctl_ok(&[
                "demo-model",
                dir.to_str().unwrap(),
                "--size",
                &args.model,
                "--seed",
                "0",
            ]);
            dir
        }
        path => PathBuf::from(path),
    };
    let features = args.features.to_str().unwrap().to_string();
    let (n, steps, batch, shard) = (
        args.samples.to_string(),
        args.steps.to_string(),
        args.batch.to_string(),
        args.shard_size.to_string(),
    );
    eprintln!(
        "pipeline-bench: {} samples x {} steps, batch {}, shards of {}, {} worker(s), model {}, {} thread(s)",
        args.samples,
        args.steps,
        args.batch,
        args.shard_size,
        args.workers,
        args.model,
        match args.threads {
            0 => "default".to_string(),
            n => n.to_string(),
        }
    );

    // The bare sampler.
    let local_out = c.dir.path().join("local");
    let t0 = Instant::now();
    let status = Command::new(digctl_path())
        .args([
            "sample",
            "--model",
            model_dir.to_str().unwrap(),
            "--features",
            &features,
            "--num-samples",
            &n,
            "--seed",
            "7",
            "--steps",
            &steps,
            "--batch-size",
            &batch,
            "--out",
            local_out.to_str().unwrap(),
        ])
        .args(threads_args(args.threads))
        .env("DIG_LOG", "warn")
        .status()
        .expect("run digctl sample");
    assert!(status.success(), "digctl sample failed");
    let bare = t0.elapsed().as_secs_f64();

    // The pipeline.
    c.set_env("DIG_WORKER_BATCH_SIZE", &batch);
    c.set_env("DIG_WORKER_THREADS", &args.threads.to_string());
    c.set_env("DIG_API_DEFAULT_MODEL", "bench-model");
    c.upload_model_dir(&model_dir, "bench-model");
    let _api = c.start_api();
    let _coordinator = c.start_coordinator();
    let workers: Vec<_> = (0..args.workers).map(|_| c.start_worker()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while b.workers().await.len() < args.workers {
            assert!(Instant::now() < deadline, "workers did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let out = c.client_ok(&c.key_a, &["upload-features", "--json", &features]);
    let sha: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sha = sha["sha256"].as_str().unwrap().to_string();
    let sequence = dig_model::features::Features::from_npz(&args.features)
        .ok()
        .and_then(|f| f.sequence)
        .expect("the features carry their sequence");
    let t1 = Instant::now();
    let job = c
        .client_ok(
            &c.key_a,
            &[
                "submit",
                "--features-sha256",
                &sha,
                "--sequence",
                &sequence,
                "--num-samples",
                &n,
                "--seed",
                "7",
                "--steps",
                &steps,
                "--shard-size",
                &shard,
            ],
        )
        .trim()
        .to_string();
    // Polled in Redis, not with `digctl status`: a client process per poll
    // would take CPU from the worker.
    let id = job.parse().expect("job id");
    let done = rt.block_on(async {
        let b = c.backends().await;
        loop {
            let p = b.progress.get(id).await.unwrap().expect("job exists");
            if p.state.is_final() {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let pipeline = t1.elapsed().as_secs_f64();
    assert_eq!(done.state, dig_common::job::JobState::Succeeded, "{done:?}");
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        for w in &workers {
            eprintln!("--- {}\n{}", w.name, w.log());
        }
    }
    drop(workers);

    // Same samples, or the comparison means nothing.
    let reference =
        dig_model::structure::Ensemble::read_npz(&local_out.join("samples.npz"), sequence.clone())
            .unwrap();
    let shards = c.fetch_with_sequence(&c.key_a, &job, &sequence);
    if args.shard_size.is_multiple_of(args.batch as u64) {
        assert_same_samples(&shards, &reference);
    }
    rt.block_on(c.cleanup());

    let s = args.samples as f64;
    println!("path                 seconds   samples/s");
    println!("digctl sample       {bare:8.2}   {:9.2}", s / bare);
    println!("pipeline            {pipeline:8.2}   {:9.2}", s / pipeline);
    println!(
        "ratio pipeline/bare (samples/s): {:.3}  (goal >= 0.97)",
        bare / pipeline
    );
}
