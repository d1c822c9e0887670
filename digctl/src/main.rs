//! `digctl`: the dig-cluster command line.
//!
//! Local work that needs no servers: `sample` draws an ensemble on this
//! machine, `convert-checkpoint` turns a published DiG checkpoint into a model
//! directory, `demo-model` writes an untrained model for trying things out,
//! and `bench` measures the sampler against the published code's strategy.
//!
//! The services: `api`, `coordinator`, `worker` (one process each, from one
//! configuration) and `standalone` (all three in one process, no servers);
//! `upload-model`, `reconcile` and `api-key new` for operators.
//!
//! The client: `upload-features`, `submit`, `status`, `wait`, `fetch`,
//! `cancel`, `jobs`, `models` against any API URL.

mod bench;
mod bench_train;
mod client;
mod density;
mod device;
mod evaluate;
mod fidelity;
mod frames;
mod gpu_check;
mod interpolate;
mod metrics_http;
mod progress;
mod reconcile;
mod sample;
mod services;
mod steer;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dig_model::checkpoint::read_torch_checkpoint;
use dig_model::weights::infer_config;
use dig_model::{DigModel, ModelConfig};
use tch::Device;

#[derive(Parser)]
#[command(
    name = "digctl",
    version,
    about = "DiG protein ensembles: sample locally, convert checkpoints, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample an ensemble of backbone structures of one protein on this machine.
    Sample(sample::SampleArgs),
    /// Score sampled ensembles: physical validity (BioEmu's criteria) and CA-RMSD to
    /// reference structures and to the nearest training frame; optionally a PNG plot.
    Evaluate(evaluate::EvaluateArgs),
    /// Log-density of given structures under the model (probability-flow
    /// ODE): per structure, in file order, with its standard error.
    Density(density::DensityArgs),
    /// A path between two structures through the diffusion: both encoded to
    /// noise, interpolated there, every frame decoded (with its log-density).
    Interpolate(interpolate::InterpolateArgs),
    /// Convert a published DiG checkpoint (.pth) into a model directory.
    ConvertCheckpoint {
        /// `checkpoint.pth` as published (`{"state_dict": {"module.<key>": tensor}}`).
        checkpoint: PathBuf,
        /// Output model directory (config.json + model.safetensors).
        out_dir: PathBuf,
        /// A config.json for the schedule settings; dimensions are read off the checkpoint otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a model directory with random weights (UNTRAINED; for demos and benchmarks).
    DemoModel {
        out_dir: PathBuf,
        /// `small` (fast on a CPU) or `published` (the published architecture, 81.9 M parameters).
        #[arg(long, default_value = "small")]
        size: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Train or fine-tune DiG on structures (MD frames) with the published loss.
    Train(train::TrainArgs),
    /// Show the backbone frames the training reader gets from a structure file.
    Frames(frames::FramesArgs),
    /// Make feature files.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Fidelity of fewer network calls: every solver and step count against
    /// the published 500-step Euler run from the same initial states.
    BenchFidelity(fidelity::FidelityArgs),
    /// Benchmark the sampler: naive (published strategy) against the optimized path.
    Bench(bench::BenchArgs),
    /// Check a GPU machine in one command: parity against the published
    /// fixtures on the device, speed of the published architecture at each
    /// length and batch up to the memory, and a `digctl standalone` job with
    /// a worker on the device; one table (`gpu-check.sh` of `make gpu-bundle`).
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Benchmark a training update: the native trainer against the published
    /// PyTorch step (bench/published-dig), same sizes, lengths and threads.
    BenchTrain(bench_train::BenchTrainArgs),
    /// Run the REST API (RabbitMQ, Redis and the object store from the configuration).
    Api(services::ConfigArg),
    /// Run the coordinator: shards submitted jobs onto the queue, writes manifests.
    Coordinator(services::ConfigArg),
    /// Run a worker: samples shard tasks on its device.
    Worker(services::ConfigArg),
    /// Run API, coordinator and a worker in one process, with no servers.
    Standalone(services::StandaloneArgs),
    /// Upload a model directory to the object store under an id.
    UploadModel(services::UploadModelArgs),
    /// Rebuild job progress in Redis from the object store (after Redis lost data).
    Reconcile(reconcile::ReconcileArgs),
    /// API keys for tenants.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Subcommand)]
enum FeaturesCommand {
    /// Deterministic single/pair arrays from the sequence alone (residue
    /// identity, position): for proteins without AlphaFold output. Labelled
    /// synthetic in the file; a model trained on them is specific to that protein.
    Synth {
        /// One-letter amino-acid sequence.
        #[arg(long, conflicts_with = "fasta", required_unless_present = "fasta")]
        sequence: Option<String>,
        /// FASTA file whose first record is the sequence.
        #[arg(long)]
        fasta: Option<PathBuf>,
        /// Output .npz (single, pair, sequence, synthetic).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Print a fresh key for TENANT and the line to append to the keys file.
    New {
        /// Tenant name (letters, digits, '-', '_', '.').
        tenant: String,
    },
}

fn demo_config(size: &str) -> anyhow::Result<ModelConfig> {
    match size {
        "published" => Ok(ModelConfig::default()),
        "small" => Ok(ModelConfig {
            d_model: 256,
            d_pair: 64,
            n_layer: 4,
            n_heads: 8,
            ..ModelConfig::default()
        }),
        other => anyhow::bail!("unknown --size {other:?}; use 'small' or 'published'"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Density(args) => density::run(args),
        Command::Interpolate(args) => interpolate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::GpuCheck(args) => gpu_check::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::BenchFidelity(args) => fidelity::run(args),
        Command::Train(args) => train::run(args),
        Command::Frames(args) => frames::run(args),
        Command::Features(FeaturesCommand::Synth {
            sequence,
            fasta,
            out,
        }) => {
            let sequence = match (sequence, fasta) {
                (Some(s), _) => s,
                (None, Some(f)) => dig_model::features::read_fasta(&f)?,
                (None, None) => anyhow::bail!("give --sequence or --fasta"),
            };
            let f = dig_model::features::synthetic(sequence.trim())?;
            f.write_npz(&out, Some(dig_model::features::SYNTHETIC_LABEL))?;
            println!(
                "wrote {} (synthetic features, L = {}; not AlphaFold output)",
                out.display(),
                f.len()
            );
            Ok(())
        }
        Command::Api(args) => services::api(args),
        Command::Coordinator(args) => services::coordinator(args),
        Command::Worker(args) => services::worker(args),
        Command::Standalone(args) => services::standalone(args),
        Command::UploadModel(args) => services::upload_model_cmd(args),
        Command::Reconcile(args) => reconcile::run(args),
        Command::ApiKey(ApiKeyCommand::New { tenant }) => {
            if !dig_api::is_valid_tenant(&tenant) {
                anyhow::bail!(
                    "invalid tenant name {tenant:?}: use letters, digits, '-', '_' and '.'"
                );
            }
            let (key, sha) = dig_api::new_api_key();
            // stdout: the key, then the keys-file line (`| tail -n1 >> keys`).
            eprintln!(
                "The key (first line) goes to the tenant and is stored nowhere; \
                 append the second line to the API keys file."
            );
            println!("{key}");
            println!("{tenant} {sha}");
            Ok(())
        }
        Command::Client(cmd) => client::run(cmd),
        Command::ConvertCheckpoint {
            checkpoint,
            out_dir,
            config,
        } => {
            let named = read_torch_checkpoint(&checkpoint)?;
            let cfg = match config {
                Some(path) => ModelConfig::load(&path)?,
                None => infer_config(&named)?,
            };
            let model = DigModel::from_tensors(&cfg, named, Device::Cpu)?;
            model.save_dir(&out_dir)?;
            println!(
                "wrote {} ({} parameters; d_model {}, {} layers, {} heads)",
                out_dir.display(),
                model.num_parameters(),
                cfg.d_model,
                cfg.n_layer,
                cfg.n_heads
            );
            Ok(())
        }
        Command::DemoModel {
            out_dir,
            size,
            seed,
        } => {
            let cfg = demo_config(&size)?;
            let model = DigModel::random(&cfg, seed, Device::Cpu);
            model.save_dir(&out_dir)?;
            std::fs::write(
                out_dir.join("UNTRAINED.txt"),
                format!(
                    "This model has random weights (seed {seed}, size {size}); it is NOT trained.\n\
                     Its samples exercise the pipeline but are not protein structures.\n\
                     Use `digctl convert-checkpoint` on a published DiG checkpoint for real work.\n"
                ),
            )?;
            println!(
                "wrote UNTRAINED demo model ({size}, {} parameters) to {}",
                model.num_parameters(),
                out_dir.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    progress::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
