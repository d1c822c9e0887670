//! Jobs and shards: what a client asks for (`JobSpec`), the unit of work on
//! the queue (`ShardTask`), and how a job is cut into shards.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job id: a UUIDv7, so ids sort by creation time (newest-first listings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// Interactive work overtakes bulk work in the shard queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Bulk,
}

impl Priority {
    /// AMQP message priority (the shard queue has `x-max-priority` 2).
    pub fn amqp(self) -> u8 {
        match self {
            Priority::Interactive => 2,
            Priority::Bulk => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// How the sampler integrates (the names of `dig_model::Solver`; the worker
/// maps one to the other with an exhaustive match).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// The published update (one network call per step).
    #[default]
    Euler,
    /// Exponential integrator of the linear part (one call per step).
    Exp,
    /// Heun, second order (two calls per step, one at the last).
    Heun,
    /// Two-step Adams-Bashforth, second order (one call per step).
    Ab2,
    /// The probability-flow ODE by Heun's method (two calls per step, one
    /// at the last).
    Flow,
}

impl Solver {
    pub fn as_str(self) -> &'static str {
        match self {
            Solver::Euler => "euler",
            Solver::Exp => "exp",
            Solver::Heun => "heun",
            Solver::Ab2 => "ab2",
            Solver::Flow => "flow",
        }
    }

    /// Network calls per sample for `steps` steps.
    pub fn network_calls(self, steps: u64) -> u64 {
        match self {
            Solver::Heun | Solver::Flow => (2 * steps).saturating_sub(1),
            _ => steps,
        }
    }
}

impl std::str::FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "euler" => Ok(Solver::Euler),
            "exp" => Ok(Solver::Exp),
            "heun" => Ok(Solver::Heun),
            "ab2" => Ok(Solver::Ab2),
            "flow" => Ok(Solver::Flow),
            _ => Err(format!(
                "unknown solver `{s}`; one of euler, exp, heun, ab2, flow"
            )),
        }
    }
}

/// Which samples a job keeps: with `physical`, only physically valid ones
/// (consecutive CA-CA < 4.5 Å, C(i)-N(i+1) < 2.0 Å, no atoms of residues
/// more than two apart closer than 1.0 Å), drawing sample indices past
/// `num_samples` to replace the others, at most `max_draw_factor` times the
/// request in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleFilter {
    pub criteria: FilterCriteria,
    pub max_draw_factor: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterCriteria {
    Physical,
}

impl SampleFilter {
    pub const DEFAULT_MAX_DRAW_FACTOR: u64 = 3;

    /// How many more samples to draw when `valid` of the `drawn` so far
    /// passed and `missing` more are wanted: the missing count over the
    /// valid fraction seen (taken as at least 1 %), with 20 % to spare; at
    /// least one. The one top-up rule of the coordinator and `digctl sample`.
    pub fn more_draws(missing: u64, valid: u64, drawn: u64) -> u64 {
        let fraction = valid as f64 / drawn.max(1) as f64;
        ((missing as f64 / fraction.max(0.01) * 1.2).ceil() as u64).max(1)
    }
}

/// The immutable description of a job, stored once at submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub tenant: String,
    pub name: Option<String>,
    pub sequence: String,
    pub features_sha256: String,
    pub num_samples: u64,
    pub seed: u64,
    /// Sampler steps; `None` = the model's `n_time_step`.
    pub steps: Option<i64>,
    pub model: String,
    pub priority: Priority,
    pub shard_size: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Where to POST the job's view once it is final (a webhook); absent
    /// from specs written before webhooks existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The sampler's integrator; absent from specs written before solvers
    /// existed (= euler).
    #[serde(default)]
    pub solver: Solver,
    /// Keep only valid samples, topping up (see [`SampleFilter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<SampleFilter>,
    /// Steered or stochastic sampling: a `SteerSpec` of `dig_model`
    /// (`sampling::steering`), validated by the API and stored with every
    /// default filled in. Absent: the deterministic sampler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<serde_json::Value>,
    /// Also each returned sample's log-density (probability-flow ODE with
    /// [`LOG_DENSITY_FLOW_STEPS`] Heun steps and Hutchinson's estimator with
    /// [`LOG_DENSITY_PROBES`] probes, probe seed 0: `digctl sample
    /// --log-density`'s defaults), in every shard's npz.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_density: bool,
    /// Partial diffusion: every sample starts from one of these uploaded
    /// structures noised to `from_time` (`digctl sample --from-structure`).
    /// Absent: sampling from the prior.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_structure: Option<FromStructure>,
    /// The probability-flow ODE above this diffusion time, the solver's
    /// update below (`digctl sample --flow-above`); absent: the solver's
    /// ODE throughout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_above: Option<f64>,
}

/// Where a partial-diffusion job starts: sample `i` from structure
/// `i mod structures` of the uploaded PDB `sha256`, noised by the forward
/// process to `from_time` (snapped down to the schedule's grid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FromStructure {
    /// SHA-256 of the uploaded PDB (`POST /v1/structures`).
    pub sha256: String,
    /// Diffusion time in (0, 1].
    pub from_time: f64,
    /// Structures (models) in the file.
    pub structures: u64,
}

impl FromStructure {
    /// Steps of a `steps`-step schedule that a run from `from_time` takes:
    /// those at times `1 - k/steps` at most `from_time` (the rule of the
    /// model's `Schedule::first_step_at`).
    pub fn steps_run(&self, steps: u64) -> u64 {
        (0..steps)
            .filter(|&k| 1.0 - k as f64 / steps as f64 <= self.from_time + 1e-12)
            .count() as u64
    }
}

/// Heun steps of a job's `log_density` (`digctl sample --flow-steps` default).
pub const LOG_DENSITY_FLOW_STEPS: usize = 50;
/// Hutchinson probes of a job's `log_density` (`--divergence hutchinson:4`).
pub const LOG_DENSITY_PROBES: usize = 4;

/// Network calls per sample of a job of `steps` steps (what the job view
/// and `run.json` state): the solver's calls over the steps run, times the
/// steering particles.
pub fn network_calls(
    solver: Solver,
    steps: u64,
    steering: Option<&serde_json::Value>,
    from_structure: Option<&FromStructure>,
) -> u64 {
    let run = from_structure.map_or(steps, |f| f.steps_run(steps));
    solver.network_calls(run) * steering_particles(steering)
}

/// Particles per returned sample of a stored steering object (1 without one).
pub fn steering_particles(steering: Option<&serde_json::Value>) -> u64 {
    steering
        .and_then(|s| s.get("particles"))
        .and_then(|p| p.as_u64())
        .unwrap_or(1)
        .max(1)
}

impl JobSpec {
    /// Sample indices the job may draw: `num_samples`, or with a filter
    /// `max_draw_factor` times that.
    pub fn draw_limit(&self) -> u64 {
        match self.filter {
            Some(f) => self.num_samples.saturating_mul(f.max_draw_factor.max(1)),
            None => self.num_samples,
        }
    }

    /// Every shard the job may have: the draw limit cut into shards. For a
    /// job without a filter, the shards that cover `num_samples`.
    pub fn num_shards(&self) -> u64 {
        self.draw_limit().div_ceil(self.shard_size)
    }

    /// The shards drawn first: those covering `[0, num_samples)`. A filtered
    /// job draws more (up to [`num_shards`](Self::num_shards)) only while its
    /// valid samples fall short.
    pub fn initial_shards(&self) -> u64 {
        self.num_samples.div_ceil(self.shard_size)
    }

    /// The task of shard `index`: samples `[index * shard_size, ...)`, cut at
    /// the draw limit.
    pub fn shard(&self, index: u64) -> ShardTask {
        let start = index * self.shard_size;
        ShardTask {
            job: self.id,
            index,
            start,
            end: (start + self.shard_size).min(self.draw_limit()),
        }
    }

    /// Network calls per sample, once `steps` is resolved (the API stores
    /// the model's own number when the request has none).
    pub fn network_calls(&self) -> Option<u64> {
        self.steps.map(|s| {
            network_calls(
                self.solver,
                s.max(0) as u64,
                self.steering.as_ref(),
                self.from_structure.as_ref(),
            )
        })
    }
}

/// One unit of work: samples `[start, end)` of a job. Everything else the
/// worker needs (features, seed, model) is in the job's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardTask {
    pub job: JobId,
    pub index: u64,
    pub start: u64,
    pub end: u64,
}

impl ShardTask {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Default shard size for a protein of `len` residues: about `target_sample_steps`
/// sample-steps of work per shard (cost per sample-step grows about as L^1.5
/// over the range that matters), at least 1 sample.
pub fn default_shard_size(len: u64, steps: u64) -> u64 {
    // Calibrated on a 2-core CPU with the published architecture: about
    // 0.2 s per sample-step at L = 128; aim at a few minutes per shard there,
    // much less per shard on a GPU, which is still minutes, not hours.
    let per_sample = steps.max(1) as f64 * (len.max(1) as f64 / 128.0).powf(1.5);
    ((16.0 * 500.0) / per_sample).round().clamp(1.0, 1000.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u64, shard: u64) -> JobSpec {
        JobSpec {
            id: JobId::new(),
            tenant: "t".into(),
            name: None,
            sequence: "A".into(),
            features_sha256: "0".repeat(64),
            num_samples: n,
            seed: 0,
            steps: None,
            model: "m".into(),
            priority: Priority::Interactive,
            shard_size: shard,
            created_at: 0,
            callback_url: None,
            solver: Solver::Euler,
            filter: None,
            steering: None,
            log_density: false,
            flow_above: None,
            from_structure: None,
        }
    }

    #[test]
    fn shards_cover_every_sample_exactly_once() {
        let s = spec(1003, 100);
        assert_eq!(s.num_shards(), 11);
        let mut next = 0;
        for i in 0..s.num_shards() {
            let t = s.shard(i);
            assert_eq!(t.start, next);
            next = t.end;
        }
        assert_eq!(next, 1003);
        assert_eq!(s.shard(10).len(), 3);
    }

    #[test]
    fn a_filtered_job_may_draw_past_its_request_in_whole_shards() {
        let mut s = spec(10, 4);
        assert_eq!(
            (s.num_shards(), s.initial_shards(), s.draw_limit()),
            (3, 3, 10)
        );
        assert_eq!(s.shard(2).end, 10);
        s.filter = Some(SampleFilter {
            criteria: FilterCriteria::Physical,
            max_draw_factor: 3,
        });
        // Shards partition [0, 30): the first three cover the request (the
        // third runs past it to 12), the other five are drawn only if needed.
        assert_eq!(
            (s.num_shards(), s.initial_shards(), s.draw_limit()),
            (8, 3, 30)
        );
        assert_eq!((s.shard(2).start, s.shard(2).end), (8, 12));
        assert_eq!((s.shard(7).start, s.shard(7).end), (28, 30));
    }

    #[test]
    fn solvers_name_and_count_their_calls() {
        for (name, solver, calls) in [
            ("euler", Solver::Euler, 50),
            ("exp", Solver::Exp, 50),
            ("heun", Solver::Heun, 99),
            ("ab2", Solver::Ab2, 50),
            ("flow", Solver::Flow, 99),
        ] {
            assert_eq!(name.parse::<Solver>().unwrap(), solver);
            assert_eq!(solver.as_str(), name);
            assert_eq!(
                serde_json::to_string(&solver).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(solver.network_calls(50), calls);
        }
        assert!("rk4"
            .parse::<Solver>()
            .unwrap_err()
            .contains("unknown solver `rk4`"));
        // A spec written before solvers existed reads as euler, no filter.
        let old = r#"{"id":"0190d3a0-0000-7000-8000-000000000000","tenant":"t","name":null,
            "sequence":"A","features_sha256":"00","num_samples":1,"seed":0,"steps":null,
            "model":"m","priority":"bulk","shard_size":1,"created_at":0}"#;
        let spec: JobSpec = serde_json::from_str(old).unwrap();
        assert_eq!((spec.solver, spec.filter), (Solver::Euler, None));
    }

    #[test]
    fn default_shard_size_shrinks_with_length() {
        assert_eq!(default_shard_size(128, 500), 16);
        assert!(default_shard_size(64, 500) > 16);
        assert_eq!(default_shard_size(1000, 500), 1);
        assert_eq!(default_shard_size(10, 10), 1000);
    }

    #[test]
    fn job_ids_sort_by_creation() {
        let a = JobId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    }
}

/// `batches/{id}.json`: a batch as submitted (written by the API before its
/// jobs are queued). Its progress is its jobs'; the coordinator reads the
/// record to give a batch its webhook back after the progress store lost it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: JobId,
    pub tenant: String,
    pub name: Option<String>,
    /// Unix seconds of the submission.
    pub created_at: u64,
    /// The batch's jobs, in entry order.
    pub jobs: Vec<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// `jobs/{id}/state.json`: how a job that did not succeed ended (written by
/// the coordinator when it fails a job or sees it cancelled, and by the API
/// when it cancels one), so that progress rebuilt from the object store
/// keeps the job's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMarker {
    pub job: JobId,
    /// `failed` or `cancelled`.
    pub state: JobState,
    pub error: Option<String>,
    /// Unix seconds the marker was written.
    pub written_at: u64,
}
