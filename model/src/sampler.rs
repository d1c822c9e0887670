//! The deterministic reverse-diffusion sampler on SE(3)^L.
//!
//! From an initial pose, each step evaluates the score network once for the
//! whole batch and moves translations by `g_T^2 dt s_T` and rotations by
//! `expmap(g_R^2 dt s_R)` (no noise is added, so the result is a pure
//! function of the initial state). The [`Schedule`] holds every per-step
//! scalar, computed once in f64; [`Sampler::run`] works on a batch of poses
//! of one protein sharing one [`ProteinContext`].

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::network::{ProteinContext, ScoreNetwork};
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
    /// `g_T^2 dt`, the translation update's factor on `s_T`.
    pub tr_gain: f64,
    /// `g_R^2 dt`.
    pub rot_gain: f64,
}

/// The whole step schedule of a run with `steps` steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub steps: Vec<StepPlan>,
}

impl Schedule {
    /// `steps` defaults to the model's `n_time_step`; fewer steps re-space the
    /// schedule (a speed/accuracy trade); more than `n_time_step` is refused.
    pub fn new(cfg: &ModelConfig, so3: &So3Tables, steps: Option<i64>) -> Result<Self> {
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
        let plans = (0..steps)
            .map(|k| {
                let t = 1.0 - k as f64 / steps as f64;
                let net_step = if steps == n {
                    k
                } else {
                    ((k * n) as f64 / steps as f64).round() as i64
                };
                let sigma_tr = tr_min.powf(1.0 - t) * tr_max.powf(t);
                let sigma_rot = rot_min.powf(1.0 - t) * rot_max.powf(t);
                let g_tr = sigma_tr * (2.0 * (tr_max / tr_min).ln()).sqrt();
                // The published code's factor 2 outside the root (sic).
                let g_rot = 2.0 * sigma_rot * (rot_max / rot_min).ln().sqrt();
                StepPlan {
                    t,
                    dt,
                    net_step,
                    sigma_tr,
                    sigma_rot,
                    rot_score_norm: so3.score_norm(sigma_rot),
                    tr_gain: g_tr * g_tr * dt,
                    rot_gain: g_rot * g_rot * dt,
                }
            })
            .collect();
        Ok(Schedule { steps: plans })
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Axis-angle vectors `(..., 3)` to rotation matrices `(..., 3, 3)` through
/// the unit quaternion (with the small-angle series of `sin(a/2)/a`).
pub fn expmap(v: &Tensor) -> Tensor {
    let angle = v.square().sum_dim_intlist(-1, true, Kind::Float).sqrt(); // (..., 1)
    let half = &angle * 0.5;
    let small = angle.abs().lt(1e-6);
    let sin_half_over = half.sin() / &angle;
    let series = -(angle.square() / 48.0) + 0.5;
    let sin_half_over = series.where_self(&small, &sin_half_over);
    let q = Tensor::cat(&[half.cos(), v * sin_half_over], -1); // (..., 4) = (r, i, j, k)
    let parts = q.unbind(-1);
    let (r, i, j, k) = (&parts[0], &parts[1], &parts[2], &parts[3]);
    let two_s = q
        .square()
        .sum_dim_intlist(-1, false, Kind::Float)
        .reciprocal()
        * 2.0;
    let one = |a: &Tensor, b: &Tensor| -(&two_s * (a * a + b * b)) + 1.0;
    let m = Tensor::stack(
        &[
            one(j, k),
            &two_s * (i * j - k * r),
            &two_s * (i * k + j * r),
            &two_s * (i * j + k * r),
            one(i, k),
            &two_s * (j * k - i * r),
            &two_s * (i * k - j * r),
            &two_s * (j * k + i * r),
            one(i, j),
        ],
        -1,
    );
    let mut shape = v.size();
    shape.pop();
    shape.extend([3, 3]);
    m.view(shape.as_slice())
}

/// Runs the schedule on batches of poses of one protein.
pub struct Sampler<'a> {
    net: &'a ScoreNetwork,
    schedule: Schedule,
}

impl<'a> Sampler<'a> {
    pub fn new(net: &'a ScoreNetwork, schedule: Schedule) -> Self {
        Sampler { net, schedule }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// One step on a batch `tr (B, L, 3)`, `rot (B, L, 3, 3)`.
    pub fn step(
        &self,
        ctx: &ProteinContext,
        tr: &Tensor,
        rot: &Tensor,
        plan: &StepPlan,
    ) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        let b = tr.size()[0];
        let step = Tensor::full([b], plan.net_step, (Kind::Int64, tr.device()));
        let (s_tr, s_rot) = self.net.forward_step(ctx, tr, rot, None, &step);
        let s_tr = s_tr / plan.sigma_tr;
        let s_rot = s_rot * plan.rot_score_norm;
        let tr = tr + s_tr * plan.tr_gain;
        let rot = expmap(&(s_rot * plan.rot_gain)).matmul(rot);
        (tr, rot)
    }

    /// The whole schedule from the given initial poses; `on_step(k)` after each step.
    pub fn run(
        &self,
        ctx: &ProteinContext,
        tr: Tensor,
        rot: Tensor,
        mut on_step: impl FnMut(usize),
    ) -> (Tensor, Tensor) {
        let (mut tr, mut rot) = (tr, rot);
        for (k, plan) in self.schedule.steps.iter().enumerate() {
            (tr, rot) = self.step(ctx, &tr, &rot, plan);
            on_step(k);
        }
        (tr, rot)
    }
}
