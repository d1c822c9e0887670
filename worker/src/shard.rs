//! Sampling one shard, with the model and the protein context cached
//! across shards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dig_common::job::{JobSpec, ShardTask};
use dig_common::metrics;
use dig_model::backbone::read_poses;
use dig_model::features::{check_sequence, Features};
use dig_model::sampling::flow::{ensemble_log_density, Divergence, FlowSettings, Ode};
use dig_model::sampling::{
    sample_ensemble_steered_until, sample_ensemble_until, InitialPoses, Partial, SteerSpec,
};
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::{DigModel, ProteinContext, Sampler, Schedule, Solver};
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Model(#[from] dig_model::ModelError),
    #[error("shard {index} of job {job}: {message}")]
    Invalid {
        job: String,
        index: u64,
        message: String,
    },
    /// The caller's stop check said stop, at a batch boundary; nothing of
    /// the shard is kept.
    #[error("sampling stopped before the shard was complete")]
    Stopped,
}

/// Cache hits and misses, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub model_hits: u64,
    pub model_misses: u64,
    pub protein_hits: u64,
    pub protein_misses: u64,
}

struct LoadedProtein {
    sha256: String,
    ctx: ProteinContext,
}

/// Samples shards on one device, caching the last model and protein.
pub struct ShardSampler {
    device: Device,
    batch_size: usize,
    pair_cache_bytes: u64,
    so3: So3Tables,
    // The protein context borrows nothing from the model, but it is only
    // valid for the model that made it: dropping the model drops it too.
    // Keyed by the model's local directory, not its id: the worker fetches
    // a model re-uploaded under the same id into a new directory.
    model: Option<(PathBuf, DigModel)>,
    protein: Option<LoadedProtein>,
    pub stats: CacheStats,
}

impl ShardSampler {
    pub fn new(device: Device, batch_size: usize, pair_cache_bytes: u64) -> Self {
        ShardSampler {
            device,
            batch_size: batch_size.max(1),
            pair_cache_bytes,
            so3: So3Tables::compute(),
            model: None,
            protein: None,
            stats: CacheStats::default(),
        }
    }

    fn model(&mut self, model_dir: &Path) -> Result<&DigModel, ShardError> {
        if self.model.as_ref().is_some_and(|(dir, _)| dir == model_dir) {
            self.stats.model_hits += 1;
            metrics::worker().model_cache_hits.inc();
        } else {
            self.stats.model_misses += 1;
            metrics::worker().model_cache_misses.inc();
            self.protein = None;
            self.model = Some((
                model_dir.to_path_buf(),
                DigModel::load_dir(model_dir, self.device)?,
            ));
        }
        Ok(&self.model.as_ref().expect("just loaded").1)
    }

    /// Samples the indices of `task` for `spec`. `model_dir` and
    /// `features_path` are local copies of the job's model and features.
    pub fn sample(
        &mut self,
        spec: &JobSpec,
        task: &ShardTask,
        model_dir: &Path,
        features_path: &Path,
    ) -> Result<Ensemble, ShardError> {
        self.sample_until(spec, task, model_dir, features_path, &|| false)
    }

    /// [`ShardSampler::sample`] that asks `stop` before each batch and
    /// returns [`ShardError::Stopped`] once it answers true. The model and
    /// protein stay cached, so the next shard pays nothing extra.
    pub fn sample_until(
        &mut self,
        spec: &JobSpec,
        task: &ShardTask,
        model_dir: &Path,
        features_path: &Path,
        stop: &dyn Fn() -> bool,
    ) -> Result<Ensemble, ShardError> {
        self.sample_from(spec, task, model_dir, features_path, None, stop)
    }

    /// [`ShardSampler::sample_until`] with the local copy of the job's
    /// uploaded structures (`structure`), which a partial-diffusion job
    /// (`from_structure`) needs.
    pub fn sample_from(
        &mut self,
        spec: &JobSpec,
        task: &ShardTask,
        model_dir: &Path,
        features_path: &Path,
        structure: Option<&Path>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Ensemble, ShardError> {
        let invalid = |message: String| ShardError::Invalid {
            job: spec.id.to_string(),
            index: task.index,
            message,
        };
        self.model(model_dir)?;
        let (_, model) = self.model.as_ref().expect("model loaded");
        let cfg = model.net.config().clone();
        if self
            .protein
            .as_ref()
            .is_some_and(|p| p.sha256 == spec.features_sha256)
        {
            self.stats.protein_hits += 1;
            metrics::worker().feature_cache_hits.inc();
        } else {
            self.stats.protein_misses += 1;
            metrics::worker().feature_cache_misses.inc();
            self.protein = None; // free the old context before building the new one
            let features = Features::from_npz(features_path)?;
            features.validate(&cfg)?;
            let ctx = model.net.prepare(
                &features.single.to_device(self.device),
                &features.pair.to_device(self.device),
                self.pair_cache_bytes,
            );
            self.protein = Some(LoadedProtein {
                sha256: spec.features_sha256.clone(),
                ctx,
            });
        }
        let ctx = &self.protein.as_ref().expect("protein loaded").ctx;
        let sequence =
            check_sequence(&spec.sequence, ctx.len()).map_err(|e| invalid(e.to_string()))?;
        if *task != spec.shard(task.index) {
            return Err(invalid(format!(
                "the task covers samples {}..{}, the job's shard {} is {:?}",
                task.start,
                task.end,
                task.index,
                spec.shard(task.index)
            )));
        }
        let mut schedule =
            Schedule::with_solver(&cfg, &self.so3, spec.steps, model_solver(spec.solver))?;
        if let Some(t_c) = spec.flow_above {
            // Validated at submission; checked again, as any spec field.
            if spec.steering.is_some() || spec.log_density {
                return Err(invalid(
                    "flow_above cannot be combined with steering or log_density".into(),
                ));
            }
            schedule = schedule
                .with_flow_above(&cfg, t_c)
                .map_err(|e| invalid(format!("flow_above: {e}")))?;
        }
        let indices: Vec<u64> = (task.start..task.end).collect();
        // Partial diffusion: `digctl sample --from-structure`'s rule, so a
        // job draws what the CLI draws.
        let init = match &spec.from_structure {
            None => InitialPoses::Seeded {
                seed: spec.seed,
                indices,
            },
            Some(from) => {
                if spec.steering.is_some() {
                    return Err(invalid(
                        "from_structure cannot be combined with steering".into(),
                    ));
                }
                let path = structure.ok_or_else(|| {
                    invalid(format!("structures {} were not fetched", from.sha256))
                })?;
                let (tr, rot, m) = read_poses(path, None, ctx.len() as usize)
                    .map_err(|e| invalid(format!("from_structure: {e}")))?;
                let (tail, partial) =
                    Partial::new(&schedule, tr, rot, m, ctx.len() as usize, from.from_time)
                        .map_err(|e| invalid(format!("from_structure: {e}")))?;
                schedule = tail;
                partial.poses(spec.seed, indices)
            }
        };
        let sampler = Sampler::new(&model.net, schedule);
        // Seconds per step: the time between step completions (a batch's
        // first step also carries the batch's set-up).
        let step_seconds = metrics::worker()
            .sampler_step
            .with_label_values(&[metrics::length_bucket(ctx.len() as usize)]);
        let mut last_step = Instant::now();
        let on_step = |_| {
            step_seconds.observe(last_step.elapsed().as_secs_f64());
            last_step = Instant::now();
        };
        let ensemble = match &spec.steering {
            None => sample_ensemble_until(
                &sampler,
                ctx,
                &init,
                self.batch_size,
                cfg.tr_sigma_max,
                &sequence,
                on_step,
                stop,
            ),
            Some(value) => {
                // Validated at submission; checked again, as any spec field.
                let steering = SteerSpec::from_value(value)
                    .and_then(|s| s.compile(ctx.len() as usize, model_solver(spec.solver)))
                    .map_err(|e| invalid(dig_model::sampling::steering::qualify("steering", &e)))?;
                sample_ensemble_steered_until(
                    &sampler,
                    ctx,
                    spec.seed,
                    &(task.start..task.end).collect::<Vec<_>>(),
                    self.batch_size,
                    &steering,
                    cfg.tr_sigma_max,
                    &sequence,
                    on_step,
                    stop,
                )
            }
        }
        .ok_or(ShardError::Stopped)?;
        let mut ensemble = ensemble;
        if spec.log_density {
            // `digctl sample --log-density`'s defaults, per-sample probe
            // streams: the numbers do not depend on the shard.
            let settings = FlowSettings {
                ode: match spec.solver {
                    dig_common::job::Solver::Flow => Ode::Flow,
                    _ => Ode::Published,
                },
                steps: dig_common::job::LOG_DENSITY_FLOW_STEPS,
                divergence: Some(Divergence::Hutchinson {
                    probes: dig_common::job::LOG_DENSITY_PROBES,
                }),
                seed: 0,
                chunk: 64,
            };
            if stop() {
                return Err(ShardError::Stopped);
            }
            ensemble.log_density = Some(ensemble_log_density(
                &model.net,
                ctx,
                &self.so3,
                &ensemble,
                &settings,
                self.batch_size,
                |_| {},
            ));
        }
        Ok(ensemble)
    }
}

/// The model's solver for the one a job names (exhaustive both ways: a
/// solver added to either enum must be added here).
pub fn model_solver(solver: dig_common::job::Solver) -> Solver {
    use dig_common::job::Solver as Job;
    match solver {
        Job::Euler => Solver::Euler,
        Job::Exp => Solver::Exp,
        Job::Heun => Solver::Heun,
        Job::Ab2 => Solver::Ab2,
        Job::Flow => Solver::Flow,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_model_solver_has_a_job_name() {
        for s in dig_model::Solver::ALL {
            let job: dig_common::job::Solver = s.as_str().parse().unwrap();
            assert_eq!(super::model_solver(job), s);
        }
    }
}
