//! The step schedule of the reverse diffusion: times, noise levels and the
//! gains of each step, computed once in f64 (`../shared/MODEL.md`, "Sampler").

use crate::config::ModelConfig;
use crate::so3::So3Tables;
use crate::{ModelError, Result};

/// The scalars of one sampler step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPlan {
    /// Diffusion time `t_k = 1 - k/T'`.
    pub t: f64,
    pub dt: f64,
    /// Step index given to the network: the training step of time `t_k`,
    /// `round((1 - t_k) * n_time_step)` (exactly `k` at full length).
    pub net_step: i64,
    pub sigma_tr: f64,
    pub sigma_rot: f64,
    /// `score_norm(sigma_rot)` from the IGSO(3) table.
    pub rot_score_norm: f64,
    /// The translation update's factor on `s_T`: `c g_T^2 dt` (the
    /// exponential integrator's gain for `Solver::Exp`).
    pub tr_gain: f64,
    /// `c g_R^2 dt` (likewise).
    pub rot_gain: f64,
    /// `c`, the drift factor of the ODE this step integrates: 1 for the
    /// published ODE `dx/dtau = g^2 s`, 1/2 for the probability flow
    /// (`Solver::Flow`, and the steps above `--flow-above`).
    pub drift: f64,
}

/// How the sampler integrates its ODE (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Solver {
    /// The published update: one network call per step.
    #[default]
    Euler,
    /// Exponential integrator of the linear part: one call per step.
    Exp,
    /// Heun (trapezoid rule), second order: two calls per step.
    Heun,
    /// Two-step Adams-Bashforth, second order: one call per step.
    Ab2,
    /// The probability-flow ODE (half the published drift, `sampling::flow`)
    /// by Heun's method on the same grid: two calls per step, one at the last.
    Flow,
}

impl Solver {
    pub const ALL: [Solver; 5] = [
        Solver::Euler,
        Solver::Exp,
        Solver::Heun,
        Solver::Ab2,
        Solver::Flow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Solver::Euler => "euler",
            Solver::Exp => "exp",
            Solver::Heun => "heun",
            Solver::Ab2 => "ab2",
            Solver::Flow => "flow",
        }
    }

    /// Network calls per sample for a run of `steps` steps.
    pub fn network_calls(self, steps: usize) -> usize {
        match self {
            Solver::Heun | Solver::Flow => (2 * steps).saturating_sub(1),
            _ => steps,
        }
    }
}

impl std::fmt::Display for Solver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Solver {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        Solver::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                ModelError::Invalid(format!(
                    "unknown solver {s:?}; use euler (published), exp, heun, ab2 or flow"
                ))
            })
    }
}

/// The noise level at diffusion time `t` of a geometric schedule from
/// `min` (t = 0) to `max` (t = 1), as the published code computes it.
pub fn sigma(min: f64, max: f64, t: f64) -> f64 {
    min.powf(1.0 - t) * max.powf(t)
}

/// The exponential integrator's gains of the step from `t` to `t - dt` for
/// the ODE of drift factor `c` (1: published, 1/2: probability flow). With
/// the score as a denoiser the published ODE keeps `T - T0 ~ sigma_tr^2`
/// and `log(R R0^T) ~ sigma_rot^4` (the published `g_R` carries a factor
/// 2), the probability flow their square roots; holding the denoised pose
/// over the step, the exact gains are `sigma_tr^2 (1 - rho_tr^(2c))` and
/// `sigma_rot^2 (1 - rho_rot^(4c))`, `rho = sigma(t - dt) / sigma(t)`.
fn exp_gains(cfg: &ModelConfig, t: f64, dt: f64, c: f64) -> (f64, f64) {
    let (tr_min, tr_max) = (cfg.tr_sigma_min, cfg.tr_sigma_max);
    let (rot_min, rot_max) = (cfg.rot_sigma_min, cfg.rot_sigma_max);
    let (sigma_tr, sigma_rot) = (sigma(tr_min, tr_max, t), sigma(rot_min, rot_max, t));
    let (next_tr, next_rot) = (
        sigma(tr_min, tr_max, t - dt),
        sigma(rot_min, rot_max, t - dt),
    );
    let (rho_tr, rho_rot) = (next_tr / sigma_tr, next_rot / sigma_rot);
    if c == 1.0 {
        // The published gains, as they have always been computed.
        (
            sigma_tr * sigma_tr * (1.0 - rho_tr * rho_tr),
            sigma_rot * sigma_rot * (1.0 - rho_rot.powi(4)),
        )
    } else {
        (
            sigma_tr * sigma_tr * (1.0 - rho_tr.powf(2.0 * c)),
            sigma_rot * sigma_rot * (1.0 - rho_rot.powf(4.0 * c)),
        )
    }
}

/// The whole step schedule of a run with `steps` steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub steps: Vec<StepPlan>,
    pub solver: Solver,
    /// The time above which the steps follow the probability flow
    /// ([`Schedule::with_flow_above`]); `None`: the solver's own ODE.
    pub flow_above: Option<f64>,
}

impl Schedule {
    /// The published (Euler) schedule; see [`Schedule::with_solver`].
    pub fn new(cfg: &ModelConfig, so3: &So3Tables, steps: Option<i64>) -> Result<Self> {
        Self::with_solver(cfg, so3, steps, Solver::Euler)
    }

    /// `steps` defaults to the model's `n_time_step`; fewer steps re-space the
    /// schedule (a speed/accuracy trade); more than `n_time_step` is refused.
    /// `solver` sets the gains (exponential integrator) and how steps combine.
    pub fn with_solver(
        cfg: &ModelConfig,
        so3: &So3Tables,
        steps: Option<i64>,
        solver: Solver,
    ) -> Result<Self> {
        let n = cfg.n_time_step;
        let steps = steps.unwrap_or(n);
        if steps < 1 || steps > n {
            return Err(ModelError::Invalid(format!(
                "--steps must be between 1 and the model's n_time_step ({n}), got {steps}"
            )));
        }
        let (tr_min, tr_max) = (cfg.tr_sigma_min, cfg.tr_sigma_max);
        let (rot_min, rot_max) = (cfg.rot_sigma_min, cfg.rot_sigma_max);
        let dt = 1.0 / steps as f64;
        let drift = if solver == Solver::Flow { 0.5 } else { 1.0 };
        let plans = (0..steps)
            .map(|k| {
                let t = 1.0 - k as f64 / steps as f64;
                let net_step = if steps == n {
                    k
                } else {
                    ((k * n) as f64 / steps as f64).round() as i64
                };
                let sigma_tr = sigma(tr_min, tr_max, t);
                let sigma_rot = sigma(rot_min, rot_max, t);
                let g_tr = sigma_tr * (2.0 * (tr_max / tr_min).ln()).sqrt();
                // The published code's factor 2 outside the root (sic).
                let g_rot = 2.0 * sigma_rot * (rot_max / rot_min).ln().sqrt();
                let (tr_gain, rot_gain) = if solver == Solver::Exp {
                    exp_gains(cfg, t, dt, 1.0)
                } else {
                    (g_tr * g_tr * dt * drift, g_rot * g_rot * dt * drift)
                };
                StepPlan {
                    t,
                    dt,
                    net_step,
                    sigma_tr,
                    sigma_rot,
                    rot_score_norm: so3.score_norm(sigma_rot),
                    tr_gain,
                    rot_gain,
                    drift,
                }
            })
            .collect();
        Ok(Schedule {
            steps: plans,
            solver,
            flow_above: None,
        })
    }

    /// The steps at times above `t_c` follow the probability-flow ODE (half
    /// the published drift, `sampling::flow`), those at `t_c` and below the
    /// solver's own: a sampler that carries the prior's spread down to
    /// `t_c` as the probability flow does and then the published update's
    /// robustness to an inexact score below it (examples/adk/README.md,
    /// "Why the closed state is lost"). `t_c = 1` changes nothing; `t_c =
    /// 0` is the probability flow throughout. Network calls are the solver's.
    /// Refused for `Solver::Flow` (the flow throughout already).
    pub fn with_flow_above(mut self, cfg: &ModelConfig, t_c: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&t_c) {
            return Err(ModelError::Invalid(format!(
                "--flow-above must be a diffusion time in [0, 1], got {t_c}"
            )));
        }
        if self.solver == Solver::Flow {
            return Err(ModelError::Invalid(
                "--flow-above: --solver flow follows the probability flow at every step already; \
                 use euler, exp, heun or ab2 below the switch"
                    .into(),
            ));
        }
        for plan in self.steps.iter_mut().filter(|p| p.t > t_c + 1e-12) {
            plan.drift = 0.5;
            if self.solver == Solver::Exp {
                (plan.tr_gain, plan.rot_gain) = exp_gains(cfg, plan.t, plan.dt, 0.5);
            } else {
                plan.tr_gain *= 0.5;
                plan.rot_gain *= 0.5;
            }
        }
        self.flow_above = Some(t_c);
        Ok(self)
    }

    /// The first step of a run that starts at diffusion time `from_time`
    /// (partial diffusion): the first step whose time is at most
    /// `from_time`, so the start snaps down to the grid `t_k = 1 - k/T'`;
    /// `len()` (no step) at `from_time = 0`.
    pub fn first_step_at(&self, from_time: f64) -> usize {
        self.steps
            .iter()
            .position(|p| p.t <= from_time + 1e-12)
            .unwrap_or(self.steps.len())
    }

    /// The steps from `k` on (the same plans: times, gains, network steps).
    pub fn tail(&self, k: usize) -> Schedule {
        Schedule {
            steps: self.steps[k.min(self.steps.len())..].to_vec(),
            solver: self.solver,
            flow_above: self.flow_above,
        }
    }

    /// Network calls per sample.
    pub fn network_calls(&self) -> usize {
        self.solver.network_calls(self.steps.len())
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}
