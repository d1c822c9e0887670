//! `digctl`'s HTTP client commands: drive any dig-cluster API from a shell
//! or a script.
//!
//! | command | does |
//! |---|---|
//! | `upload-features F.npz` | streams AlphaFold features to `POST /v1/features`; prints `sha256 HEX  length L  bytes N` |
//! | `submit ...` | uploads features if given a file, `POST /v1/jobs`; prints only the job id on stdout (`--wait` then waits) |
//! | `status JOB` | state, samples, shards, rate, ETA, times and error of a job |
//! | `wait JOB` | follows the job's event stream (polling if the stream breaks) until it is final: exit 0 when it succeeded, an error when it failed, was cancelled or `--timeout` passed |
//! | `fetch JOB --out DIR` | downloads and verifies the result shards (resumable; the finished shards of a failed or cancelled job, said to be partial), or the whole ensemble as one PDB |
//! | `cancel JOB` | `POST /v1/jobs/{id}/cancel`; prints the new state |
//! | `jobs` | the tenant's jobs, newest first (`--all` follows the cursor) |
//! | `models` | the models the service can sample with |
//! | `batch submit FILE` | many jobs in one all-or-nothing call (`POST /v1/batches`); `batch status`, `batch wait`, `batch cancel` ([`batch`]) |
//!
//! Every command takes `--api URL` (or `DIG_API_URL`; default
//! `http://127.0.0.1:8080`) and needs a tenant key, `--api-key KEY` or
//! better `DIG_API_KEY` (a command line is visible to other users).
//! Machine-readable output goes to stdout (`--json` prints the server's JSON
//! as sent); progress and notes go to stderr: a bar on a terminal, log lines
//! otherwise. An API error ends the command with
//! `error: MESSAGE (HTTP STATUS CODE)` and a non-zero exit status.

mod batch;
mod events;
mod http;
mod render;
mod transfer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dig_common::job::{JobId, JobState, Priority};
use dig_common::store::{is_sha256, AMINO_ACIDS};
use serde_json::Value;

use http::{is_transient, Api, JobPage, JobView, ModelList, SubmitRequest, Submitted};
use render::{
    format_unix, human_bytes, human_duration, job_summary, progress_message, run_time, state_name,
    table, Meter, Unit,
};

/// The API URL when neither `--api` nor `DIG_API_URL` gives one.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

/// `DIG_API_URL` if set and not empty, else [`DEFAULT_API_URL`].
fn default_api_url() -> String {
    std::env::var("DIG_API_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_API_URL.to_string())
}

/// Where the API is and who is asking; flattened into each client command.
///
/// The environment variables are read here rather than by clap's `env`
/// attribute, which needs clap's `env` feature (not enabled for digctl).
#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// API base URL [env: DIG_API_URL]
    #[arg(long, value_name = "URL", default_value_t = default_api_url())]
    pub api: String,
    /// Bearer API key [env: DIG_API_KEY] (prefer the variable: command lines are visible to other users)
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,
}

impl ClientOpts {
    /// `--api-key`, else `DIG_API_KEY`.
    fn key(&self) -> Result<String> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("DIG_API_KEY").ok())
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "no API key: pass --api-key KEY or set DIG_API_KEY \
                     (the dig-cluster API answers only requests with a tenant's key)"
                )
            })
    }

    fn connect(&self) -> Result<Api> {
        Api::new(&self.api, self.key()?)
    }
}

/// How `wait` (and `submit --wait`) follows a job: its event stream, or
/// status requests when the stream is unavailable or breaks.
#[derive(Args, Debug, Clone)]
pub struct WaitOpts {
    /// Milliseconds between status requests when polling (at least 100).
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub poll_ms: u64,
    /// Give up waiting after this many seconds (the job keeps running).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

/// Queue class of a job.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum PriorityArg {
    /// Overtakes bulk work (the default).
    Interactive,
    /// Runs when no interactive work waits.
    Bulk,
}

impl From<PriorityArg> for Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Interactive => Priority::Interactive,
            PriorityArg::Bulk => Priority::Bulk,
        }
    }
}

/// What `fetch` downloads.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFormat {
    /// The result shards as written (`shards/NNNNNN.npz`), verified against the manifest.
    Npz,
    /// The whole ensemble as one multi-model PDB (`JOB.pdb`).
    Pdb,
    /// The whole ensemble as an XTC trajectory (`JOB.xtc`, N, CA, C, O) and
    /// its topology (`JOB-topology.pdb`).
    Xtc,
}

/// The client subcommands; main.rs flattens them into its own.
// Parsed once per process: the size of the larger variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Upload an AlphaFold features .npz to the service; prints its content address.
    UploadFeatures {
        #[command(flatten)]
        opts: ClientOpts,
        /// .npz with `single (L,384)`, `pair (L,L,128)` and optionally `sequence`.
        file: PathBuf,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Submit a sampling job; prints its id (only the id: `JOB=$(digctl submit ...)`).
    Submit {
        #[command(flatten)]
        opts: ClientOpts,
        /// Features .npz to upload first.
        #[arg(
            long,
            value_name = "FILE.npz",
            conflicts_with = "features_sha256",
            required_unless_present = "features_sha256"
        )]
        features: Option<PathBuf>,
        /// SHA-256 of features uploaded before (see `upload-features`).
        #[arg(long, value_name = "HEX")]
        features_sha256: Option<String>,
        /// One-letter sequence (default: --fasta, else the `sequence` stored in --features).
        #[arg(long, conflicts_with = "fasta")]
        sequence: Option<String>,
        /// FASTA file whose first record is the sequence.
        #[arg(long, value_name = "FILE")]
        fasta: Option<PathBuf>,
        /// Structures to sample.
        #[arg(long, value_name = "N")]
        num_samples: u64,
        /// Seed: sample i is a pure function of (model, features, seed, i, steps) (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Sampler steps (default: the model's).
        #[arg(long)]
        steps: Option<i64>,
        /// ODE solver: euler (published, default), exp, heun, ab2
        /// (`--solver ab2 --steps 50`: 10x fewer network calls; README).
        #[arg(long, value_parser = ["euler", "exp", "heun", "ab2", "flow"])]
        solver: Option<String>,
        /// `physical`: exactly --num-samples physically valid samples,
        /// drawing further sample indices to replace invalid ones.
        #[arg(long, value_parser = ["physical"])]
        filter: Option<String>,
        /// With --filter: draw at most this many times --num-samples (default 3).
        #[arg(long, requires = "filter")]
        max_draw_factor: Option<u64>,
        /// Steer the sampler: a JSON steering file (references read from
        /// the PDBs it names, sent as CA coordinates) or a preset (`physical`);
        /// the job's `steering` (README, "Steering"). Needs --solver euler.
        #[arg(long, value_name = "FILE|PRESET")]
        steer: Option<String>,
        /// Also each returned sample's log-density (the job's
        /// `log_density`; `log_density` in every shard's npz).
        #[arg(long)]
        log_density: bool,
        /// The probability-flow ODE above diffusion time T, --solver's
        /// update below (the job's `flow_above`; `digctl sample --flow-above`).
        #[arg(long, value_name = "T")]
        flow_above: Option<f64>,
        /// Partial diffusion: upload this PDB (one structure or several
        /// MODELs) and start every sample from it, noised to --from-time
        /// (the job's `from_structure`; docs/density.md).
        #[arg(
            long,
            value_name = "FILE.pdb",
            requires = "from_time",
            conflicts_with = "steer"
        )]
        from_structure: Option<PathBuf>,
        /// With --from-structure: the diffusion time in (0, 1] to start from.
        #[arg(long, value_name = "T", requires = "from_structure")]
        from_time: Option<f64>,
        /// Model id (see `digctl models`; default: the service's).
        #[arg(long, value_name = "ID")]
        model: Option<String>,
        /// Queue class.
        #[arg(long, value_enum)]
        priority: Option<PriorityArg>,
        /// Samples per shard (default: sized by protein length and steps).
        #[arg(long, value_name = "N")]
        shard_size: Option<u64>,
        /// A name for the job.
        #[arg(long)]
        name: Option<String>,
        /// Retries with the same key return the first submission's job instead of a new one.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// http(s) URL that gets a signed POST of the job's view when it ends (a webhook).
        #[arg(long, value_name = "URL")]
        callback_url: Option<String>,
        /// Then wait until the job is final, as `digctl wait` does.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        wait_opts: WaitOpts,
        /// Print the server's JSON answer instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Show a job's state and progress.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
        job: JobId,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a job is final; fails unless it succeeded.
    Wait {
        #[command(flatten)]
        opts: ClientOpts,
        job: JobId,
        #[command(flatten)]
        wait_opts: WaitOpts,
    },
    /// Download a succeeded job's results into a directory (resumable).
    Fetch {
        #[command(flatten)]
        opts: ClientOpts,
        job: JobId,
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// npz: shards + manifest.json; pdb: one JOB.pdb; xtc: JOB.xtc + JOB-topology.pdb.
        #[arg(long, value_enum, default_value = "npz")]
        format: FetchFormat,
        /// Shards downloaded at the same time.
        #[arg(long, value_name = "N", default_value_t = 4,
              value_parser = clap::value_parser!(u64).range(1..=64))]
        parallel: u64,
    },
    /// Cancel a job; prints its new state.
    Cancel {
        #[command(flatten)]
        opts: ClientOpts,
        job: JobId,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// List your jobs, newest first.
    Jobs {
        #[command(flatten)]
        opts: ClientOpts,
        /// Jobs per page (default: the service's).
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Start after this job id (a previous page's next cursor).
        #[arg(long, value_name = "JOB")]
        cursor: Option<String>,
        /// Follow the cursor through every page.
        #[arg(long)]
        all: bool,
        /// Print JSON (`{"jobs": [...], "next_cursor": ...}`).
        #[arg(long)]
        json: bool,
    },
    /// Many jobs at once: submit a batch file, follow it, cancel it.
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// List the models the service can sample with.
    Models {
        #[command(flatten)]
        opts: ClientOpts,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one client command on its own tokio runtime.
pub fn run(cmd: ClientCommand) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(execute(cmd))
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn execute(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Batch(cmd) => batch::run(cmd).await,
        ClientCommand::UploadFeatures { opts, file, json } => {
            let api = opts.connect()?;
            let up = transfer::upload_features(&api, &file).await?;
            if json {
                print_json(&up.json)?;
            } else {
                let f = &up.feature;
                println!(
                    "sha256 {}  length {}  bytes {}",
                    f.sha256, f.length, f.bytes
                );
            }
            Ok(())
        }
        ClientCommand::Submit {
            opts,
            features,
            features_sha256,
            sequence,
            fasta,
            num_samples,
            seed,
            steps,
            solver,
            filter,
            max_draw_factor,
            steer,
            log_density,
            flow_above,
            from_structure,
            from_time,
            model,
            priority,
            shard_size,
            name,
            idempotency_key,
            callback_url,
            wait,
            wait_opts,
            json,
        } => {
            let steering = steer
                .as_deref()
                .map(|s| {
                    crate::steer::load(s)
                        .map(|spec| serde_json::to_value(spec).expect("serializes"))
                })
                .transpose()?;
            if num_samples == 0 {
                bail!("--num-samples must be at least 1");
            }
            let features_sha256 = match features_sha256 {
                Some(h) => {
                    let h = h.trim().to_ascii_lowercase();
                    if !is_sha256(&h) {
                        bail!("--features-sha256 must be 64 hexadecimal digits, got {h:?}");
                    }
                    Some(h)
                }
                None => None,
            };
            let sequence = resolve_sequence(sequence, fasta, features.clone()).await?;
            let api = opts.connect()?;
            let (sha256, length) = match (&features, features_sha256) {
                (Some(path), _) => {
                    let up = transfer::upload_features(&api, path).await?;
                    eprintln!(
                        "{} features {}: sha256 {}, L = {}, {}",
                        if up.created {
                            "uploaded"
                        } else {
                            "already had"
                        },
                        path.display(),
                        up.feature.sha256,
                        up.feature.length,
                        human_bytes(up.feature.bytes)
                    );
                    (up.feature.sha256, Some(up.feature.length))
                }
                (None, Some(h)) => (h, None),
                (None, None) => unreachable!("clap requires --features or --features-sha256"),
            };
            let residues = sequence.chars().count() as u64;
            if let Some(length) = length.filter(|l| *l != residues) {
                bail!(
                    "the sequence has {residues} residues but the features describe L = {length}"
                );
            }
            if let Some(t) = from_time.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
                bail!("--from-time must be in (0, 1], got {t}");
            }
            let from_structure = match &from_structure {
                Some(path) => {
                    let (up, created) = transfer::upload_structures(&api, path).await?;
                    if up.residues != residues {
                        bail!(
                            "--from-structure {}: {} residues per structure, but the protein has {residues}",
                            path.display(),
                            up.residues
                        );
                    }
                    eprintln!(
                        "{} structures {}: sha256 {}, {} of {} residues",
                        if created { "uploaded" } else { "already had" },
                        path.display(),
                        up.sha256,
                        up.structures,
                        up.residues
                    );
                    Some(up.sha256)
                }
                None => None,
            };
            let request = SubmitRequest {
                name,
                sequence,
                features_sha256: sha256,
                num_samples,
                seed,
                steps,
                model,
                priority: priority.map(Priority::from),
                shard_size,
                callback_url,
                solver,
                filter,
                max_draw_factor,
                steering,
                log_density,
                from_structure,
                from_time,
                flow_above,
            };
            let answer = api
                .post(&["v1", "jobs"], Some(&request), idempotency_key.as_deref())
                .await?;
            let submitted: Submitted = answer.parse("the job submission")?;
            if json {
                print_json(&answer.json)?;
            } else {
                println!("{}", submitted.id);
            }
            let replay = answer.status == reqwest::StatusCode::OK;
            eprintln!(
                "{} job {} ({num_samples} samples): {}",
                if replay {
                    "idempotent replay of"
                } else {
                    "submitted"
                },
                submitted.id,
                state_name(submitted.state)
            );
            if wait {
                let view = wait_for(&api, submitted.id, &wait_opts).await?;
                if json {
                    // The final state too, so a script needs no second call.
                    let (_, answer) = api.job(view.id).await?;
                    print_json(&answer.json)?;
                }
            }
            Ok(())
        }
        ClientCommand::Status { opts, job, json } => {
            let api = opts.connect()?;
            let (view, answer) = api.job(job).await?;
            if json {
                print_json(&answer.json)?;
            } else {
                println!("{}", job_summary(&view));
            }
            Ok(())
        }
        ClientCommand::Wait {
            opts,
            job,
            wait_opts,
        } => {
            let api = opts.connect()?;
            wait_for(&api, job, &wait_opts).await.map(|_| ())
        }
        ClientCommand::Fetch {
            opts,
            job,
            out,
            format,
            parallel,
        } => {
            let api = opts.connect()?;
            match format {
                FetchFormat::Npz => {
                    let started = Instant::now();
                    let f = transfer::fetch_npz(&api, job, &out, parallel as usize).await?;
                    if let Some(p) = &f.partial {
                        eprintln!(
                            "job {job} {}: partial results, {} of {} shards ({} of {} samples)",
                            p.state, f.shards, p.total_shards, p.samples, p.num_samples
                        );
                    }
                    println!(
                        "wrote {} shards{} ({} downloaded, {} already present; {}) to {} and {} in {}",
                        f.shards,
                        if f.partial.is_some() { " (partial)" } else { "" },
                        f.downloaded,
                        f.shards - f.downloaded,
                        human_bytes(f.bytes),
                        f.shards_dir.display(),
                        f.manifest.display(),
                        human_duration(started.elapsed().as_secs_f64())
                    );
                }
                FetchFormat::Pdb => {
                    let (path, bytes) = transfer::fetch_pdb(&api, job, &out).await?;
                    println!("wrote {} ({})", path.display(), human_bytes(bytes));
                }
                FetchFormat::Xtc => {
                    for (path, bytes) in transfer::fetch_xtc(&api, job, &out).await? {
                        println!("wrote {} ({})", path.display(), human_bytes(bytes));
                    }
                }
            }
            Ok(())
        }
        ClientCommand::Cancel { opts, job, json } => {
            let api = opts.connect()?;
            let answer = api
                .post::<Value>(&["v1", "jobs", &job.to_string(), "cancel"], None, None)
                .await?;
            let view: JobView = answer.parse("the cancellation")?;
            if json {
                print_json(&answer.json)?;
            } else {
                println!("{}", state_name(view.state));
            }
            Ok(())
        }
        ClientCommand::Jobs {
            opts,
            limit,
            cursor,
            all,
            json,
        } => list_jobs(&opts.connect()?, limit, cursor, all, json).await,
        ClientCommand::Models { opts, json } => {
            let api = opts.connect()?;
            let answer = api.get(&["v1", "models"], &[]).await?;
            let list: ModelList = answer.parse("the model list")?;
            if json {
                return print_json(&answer.json);
            }
            let dim = |m: &http::ModelInfo, key: &str| {
                m.config
                    .as_ref()
                    .and_then(|c| c.get(key))
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into())
            };
            let rows: Vec<Vec<String>> = list
                .models
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        dim(m, "d_model"),
                        dim(m, "n_layer"),
                        m.bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!("{}", table(&["ID", "D_MODEL", "N_LAYER", "SIZE"], &rows));
            Ok(())
        }
    }
}

/// The sequence to submit: `--sequence`, the first record of `--fasta`, or
/// the `sequence` stored in the features file; upper-cased, without
/// whitespace, letters of [`AMINO_ACIDS`].
async fn resolve_sequence(
    sequence: Option<String>,
    fasta: Option<PathBuf>,
    features: Option<PathBuf>,
) -> Result<String> {
    let raw = match (sequence, fasta, features) {
        (Some(s), _, _) => s,
        (None, Some(path), _) => dig_model::features::read_fasta(&path)?,
        (None, None, Some(path)) => tokio::task::spawn_blocking(move || sequence_of_npz(&path))
            .await
            .context("reading the features file")??,
        (None, None, None) => bail!(
            "give the sequence with --sequence or --fasta \
             (it cannot be read from --features-sha256)"
        ),
    };
    normalize_sequence(&raw)
}

/// The `sequence` array of a features `.npz`. dig-model has no reader of
/// that array alone, so this reads the whole file.
fn sequence_of_npz(path: &Path) -> Result<String> {
    dig_model::features::Features::from_npz(path)?
        .sequence
        .ok_or_else(|| {
            anyhow!(
                "{} has no 'sequence' array; give the sequence with --sequence or --fasta",
                path.display()
            )
        })
}

/// Removes whitespace, upper-cases, and checks the alphabet.
fn normalize_sequence(raw: &str) -> Result<String> {
    let seq: String = raw
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if seq.is_empty() {
        bail!("the sequence is empty");
    }
    if let Some((i, c)) = seq
        .chars()
        .enumerate()
        .find(|(_, c)| !AMINO_ACIDS.contains(*c))
    {
        bail!(
            "the sequence has {c:?} at position {}, which is not an amino-acid code \
             (allowed: {AMINO_ACIDS})",
            i + 1
        );
    }
    Ok(seq)
}

/// Consecutive failed polls `wait` rides out (server restarts, proxies).
const MAX_TRANSIENT_FAILURES: u32 = 10;

/// The pause after the `failures`-th failed poll in a row: doubling from
/// `poll`, at most 30 s.
fn backoff(poll: Duration, failures: u32) -> Duration {
    (poll * 2u32.pow(failures.min(6))).min(Duration::from_secs(30))
}

/// What `wait` shows of a job: the bar (or log lines) and the last state.
struct Watch {
    job: JobId,
    meter: Meter,
    last_state: Option<JobState>,
}

impl Watch {
    fn show(&mut self, view: &JobView) {
        if self.last_state != Some(view.state) {
            if !self.meter.is_bar() {
                tracing::info!("job {}: {}", self.job, state_name(view.state));
            }
            self.last_state = Some(view.state);
        }
        self.meter.set_total(view.num_samples);
        self.meter.set_position(view.samples_done);
        self.meter.set_message(progress_message(view));
    }

    fn timed_out(&self, opts: &WaitOpts) -> anyhow::Error {
        let job = self.job;
        let state = self.last_state.map_or("unknown", state_name);
        anyhow!(
            "timed out after {} waiting for job {job} (last state: {state}); \
             it keeps running: `digctl status {job}`",
            human_duration(opts.timeout.unwrap_or(0) as f64)
        )
    }
}

/// Follows a job until it is final: its view when it succeeded, an error
/// naming the state and the job's error otherwise, or on `--timeout`. The
/// job's event stream first; if it cannot be opened or breaks, polling.
async fn wait_for(api: &Api, job: JobId, opts: &WaitOpts) -> Result<JobView> {
    let deadline = opts
        .timeout
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut watch = Watch {
        job,
        meter: Meter::new(None, Unit::Samples, &format!("job {job}")),
        last_state: None,
    };
    let streamed = {
        let follow = events::follow(api, job, |view| watch.show(view));
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), follow).await.ok(),
            None => Some(follow.await),
        }
    };
    let outcome = match streamed {
        None => Err(watch.timed_out(opts)),
        Some(Ok(view)) => Ok(view),
        Some(Err(e)) => {
            tracing::debug!("job {job}: {e:#}; polling instead");
            poll_until_final(api, &mut watch, opts, deadline).await
        }
    };
    watch.meter.finish();
    let view = outcome?;
    let took = run_time(&view)
        .map(|s| format!(" in {}", human_duration(s)))
        .unwrap_or_default();
    match view.state {
        JobState::Succeeded => {
            eprintln!("job {job} succeeded: {} samples{took}", view.num_samples);
            Ok(view)
        }
        state => Err(anyhow!(
            "job {job} {}{took}{}",
            state_name(state),
            view.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
    }
}

/// Polls `GET /v1/jobs/{id}` every `--poll-ms` until the job is final,
/// riding out transient failures.
async fn poll_until_final(
    api: &Api,
    watch: &mut Watch,
    opts: &WaitOpts,
    deadline: Option<Instant>,
) -> Result<JobView> {
    let job = watch.job;
    let poll = Duration::from_millis(opts.poll_ms);
    let mut failures = 0u32;
    loop {
        let pause = match api.job(job).await {
            Ok((view, _)) => {
                failures = 0;
                watch.show(&view);
                if view.state.is_final() {
                    return Ok(view);
                }
                poll
            }
            Err(e) if is_transient(&e) && failures < MAX_TRANSIENT_FAILURES => {
                failures += 1;
                let pause = backoff(poll, failures);
                tracing::warn!(
                    "{e:#}; trying again in {:.1}s ({failures}/{MAX_TRANSIENT_FAILURES})",
                    pause.as_secs_f64()
                );
                pause
            }
            Err(e) => return Err(e),
        };
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if now >= deadline {
                return Err(watch.timed_out(opts));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
        } else {
            tokio::time::sleep(pause).await;
        }
    }
}

/// `digctl jobs`: one page, or every page with `all`.
async fn list_jobs(
    api: &Api,
    limit: Option<u64>,
    mut cursor: Option<String>,
    all: bool,
    json: bool,
) -> Result<()> {
    let mut jobs: Vec<Value> = Vec::new();
    let next = loop {
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let answer = api.get(&["v1", "jobs"], &query).await?;
        let page: JobPage = answer.parse("the job list")?;
        let raw = answer
            .json
            .get("jobs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let empty = page.jobs.is_empty();
        jobs.extend(raw);
        match page.next_cursor {
            Some(next) if all && !empty && cursor.as_deref() != Some(next.as_str()) => {
                cursor = Some(next)
            }
            next => break next,
        }
    };
    if json {
        return print_json(&serde_json::json!({"jobs": jobs, "next_cursor": next}));
    }
    let views: Vec<JobView> = jobs
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()
        .context("unexpected answer for the job list")?;
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                state_name(v.state).to_string(),
                format!("{}/{}", v.samples_done, v.num_samples),
                v.created_at.map(format_unix).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!("{}", table(&["ID", "STATE", "SAMPLES", "CREATED"], &rows));
    if let Some(next) = next.filter(|_| !all) {
        eprintln!("more jobs: --all, or --cursor {next}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_needs_features_and_samples() {
        let ok = Cli::try_parse_from([
            "digctl",
            "submit",
            "--features-sha256",
            "ab",
            "--sequence",
            "ACD",
            "--num-samples",
            "3",
            "--priority",
            "bulk",
        ]);
        assert!(ok.is_ok());
        let both = Cli::try_parse_from([
            "digctl",
            "submit",
            "--features",
            "f.npz",
            "--features-sha256",
            "ab",
            "--num-samples",
            "3",
        ]);
        assert!(both.is_err());
        let neither = Cli::try_parse_from(["digctl", "submit", "--num-samples", "3"]);
        assert!(neither.is_err());
    }

    #[test]
    fn job_arguments_must_be_job_ids() {
        let id = JobId::new().to_string();
        assert!(Cli::try_parse_from(["digctl", "status", &id]).is_ok());
        assert!(Cli::try_parse_from(["digctl", "status", "../etc"]).is_err());
        let fetch = Cli::try_parse_from(["digctl", "fetch", &id, "--out", "d", "--format", "pdb"]);
        assert!(fetch.is_ok());
        let fetch = Cli::try_parse_from(["digctl", "fetch", &id, "--out", "d", "--format", "xtc"]);
        assert!(fetch.is_ok());
        assert!(Cli::try_parse_from(["digctl", "wait", &id, "--poll-ms", "10"]).is_err());
    }

    #[test]
    fn a_missing_key_names_both_ways_to_give_one() {
        let opts = ClientOpts {
            api: DEFAULT_API_URL.into(),
            api_key: Some("  ".into()),
        };
        // A blank flag is a missing key (not a fall-back to the variable).
        let e = opts.key().unwrap_err().to_string();
        assert!(e.contains("--api-key") && e.contains("DIG_API_KEY"), "{e}");
        let opts = ClientOpts {
            api_key: Some(" k ".into()),
            ..opts
        };
        assert_eq!(opts.key().unwrap(), "k");
    }

    #[test]
    fn sequences_are_normalized_and_checked() {
        assert_eq!(normalize_sequence("acd ef\nG").unwrap(), "ACDEFG");
        let e = normalize_sequence("ACZ").unwrap_err().to_string();
        assert!(e.contains("'Z' at position 3"), "{e}");
        assert!(normalize_sequence(" \n").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_half_a_minute() {
        let poll = Duration::from_millis(1000);
        assert_eq!(backoff(poll, 1), Duration::from_secs(2));
        assert_eq!(backoff(poll, 3), Duration::from_secs(8));
        assert_eq!(backoff(poll, 10), Duration::from_secs(30));
    }
}
