//! The deterministic reverse-diffusion sampler on SE(3)^L.
//!
//! From an initial pose, the published sampler (`Solver::Euler`) evaluates
//! the score network once per step for the whole batch and moves
//! translations by `g_T^2 dt s_T` and rotations by `expmap(g_R^2 dt s_R)`
//! (no noise is added, so the result is a pure function of the initial
//! state): an Euler step of the ODE `dx/dtau = g(t)^2 s(x, t)`, `tau = 1 - t`.
//! Other solvers of the same ODE trade network calls for accuracy:
//!
//! * `Solver::Exp`, an exponential integrator: with the score written as a
//!   denoiser, `s_T = -(T - T0)/sigma_tr^2` and (small angles)
//!   `s_R = -log(R R0^T)/sigma_rot^2`, the ODE is linear in the pose with
//!   `T - T0 ~ sigma_tr^2` and `log(R R0^T) ~ sigma_rot^4` (the published
//!   `g_R` carries a factor 2). Holding the denoised pose fixed over a step
//!   and integrating that linear part exactly gives the gains
//!   `sigma_tr^2 (1 - rho_tr^2)` and `sigma_rot^2 (1 - rho_rot^4)`,
//!   `rho = sigma(t_{k+1}) / sigma(t_k)`, in place of `g^2 dt`. One call per step.
//! * `Solver::Heun`: the trapezoid rule with an Euler predictor, second
//!   order; rotation increments are averaged in the Lie algebra (space
//!   frame, left multiplication as published). Two calls per step, one on
//!   the last (whose end, `t = 0`, is outside the trained steps).
//! * `Solver::Ab2`: two-step Adams-Bashforth, second order, reusing the
//!   previous step's call: one call per step (Euler for the first).
//! * `Solver::Flow`: not the published ODE but the probability-flow ODE of
//!   the same diffusion (`dx/dtau = g^2 s / 2`, [`flow`](super::flow)),
//!   whose solutions carry the noise distribution to the model's: Heun's
//!   method on this grid (`flow::flow` integrates the same ODE on a
//!   continuous grid for encoding, decoding and densities).
//! * `Schedule::with_flow_above(t_c)`: any of the first four on the
//!   probability flow above `t_c` and on the published ODE below (the
//!   schedule's gains carry each step's drift factor).
//!
//! The [`Schedule`] holds every per-step scalar, computed once in f64;
//! [`Sampler::run`] works on a batch of poses of one protein sharing one
//! [`ProteinContext`]; [`integrate`] runs a schedule on any [`ScoreField`].

use tch::{Kind, Tensor};

use super::schedule::{Schedule, Solver, StepPlan};
use crate::network::{ProteinContext, ScoreNetwork};

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

    pub fn net(&self) -> &'a ScoreNetwork {
        self.net
    }

    /// One published (Euler) step on a batch `tr (B, L, 3)`, `rot (B, L, 3, 3)`.
    pub fn step(
        &self,
        ctx: &ProteinContext,
        tr: &Tensor,
        rot: &Tensor,
        plan: &StepPlan,
    ) -> (Tensor, Tensor) {
        let mut field = NetworkField { net: self.net, ctx };
        let (s_tr, s_rot) = field.score(tr, rot, plan);
        euler_update(tr, rot, &s_tr, &s_rot, plan)
    }

    /// The whole schedule from the given initial poses; `on_step(k)` after each step.
    pub fn run(
        &self,
        ctx: &ProteinContext,
        tr: Tensor,
        rot: Tensor,
        on_step: impl FnMut(usize),
    ) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        let mut field = NetworkField { net: self.net, ctx };
        integrate(&self.schedule, &mut field, tr, rot, on_step)
    }
}

/// The scores the sampler follows: `(s_T, s_R)`, each `(B, L, 3)`, at the
/// poses `tr`, `rot` and the time of `plan`.
pub trait ScoreField {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, plan: &StepPlan) -> (Tensor, Tensor);
}

/// The score network as a [`ScoreField`]: `s_T = T_eps / sigma_tr`,
/// `s_R = R_eps * score_norm(sigma_rot)`.
pub struct NetworkField<'a> {
    pub net: &'a ScoreNetwork,
    pub ctx: &'a ProteinContext,
}

impl ScoreField for NetworkField<'_> {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, plan: &StepPlan) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        let b = tr.size()[0];
        let step = Tensor::full([b], plan.net_step, (Kind::Int64, tr.device()));
        let (s_tr, s_rot) = self.net.forward_step(self.ctx, tr, rot, None, &step);
        (s_tr / plan.sigma_tr, s_rot * plan.rot_score_norm)
    }
}

/// `T + gain_T s_T`, `expmap(gain_R s_R) R`: the published update.
fn euler_update(
    tr: &Tensor,
    rot: &Tensor,
    s_tr: &Tensor,
    s_rot: &Tensor,
    plan: &StepPlan,
) -> (Tensor, Tensor) {
    let tr = tr + s_tr * plan.tr_gain;
    let rot = expmap(&(s_rot * plan.rot_gain)).matmul(rot);
    (tr, rot)
}

/// The plan of the point `t_{k+1}` (same `dt`), for Heun's corrector.
fn next_point(schedule: &Schedule, k: usize) -> Option<StepPlan> {
    // Its gains are g(t_{k+1})^2 dt (Heun's schedule is Euler's).
    schedule.steps.get(k + 1).copied()
}

/// Runs `schedule` on the poses with the scores of `field`.
pub fn integrate(
    schedule: &Schedule,
    field: &mut impl ScoreField,
    tr: Tensor,
    rot: Tensor,
    mut on_step: impl FnMut(usize),
) -> (Tensor, Tensor) {
    let (mut tr, mut rot) = (tr, rot);
    let mut previous: Option<(Tensor, Tensor, f64)> = None;
    for (k, plan) in schedule.steps.iter().enumerate() {
        let (s_tr, s_rot) = field.score(&tr, &rot, plan);
        match schedule.solver {
            Solver::Euler | Solver::Exp => {
                (tr, rot) = euler_update(&tr, &rot, &s_tr, &s_rot, plan);
            }
            Solver::Heun | Solver::Flow => {
                // The gains carry the drift factor (1/2 on the probability
                // flow's steps). The corrector's slope at t_{k+1} is that of
                // this step's ODE: with `--flow-above` the next point may
                // belong to the other one.
                let d_tr = &s_tr * plan.tr_gain;
                let d_rot = &s_rot * plan.rot_gain;
                match next_point(schedule, k) {
                    None => {
                        tr = &tr + d_tr;
                        rot = expmap(&d_rot).matmul(&rot);
                    }
                    Some(next) => {
                        let r = plan.drift / next.drift;
                        let tr_pred = &tr + &d_tr;
                        let rot_pred = expmap(&d_rot).matmul(&rot);
                        let (s2_tr, s2_rot) = field.score(&tr_pred, &rot_pred, &next);
                        tr = &tr + (d_tr + s2_tr * (r * next.tr_gain)) * 0.5;
                        let v = (d_rot + s2_rot * (r * next.rot_gain)) * 0.5;
                        rot = expmap(&v).matmul(&rot);
                    }
                }
            }
            Solver::Ab2 => {
                let d_tr = &s_tr * plan.tr_gain;
                let d_rot = &s_rot * plan.rot_gain;
                let (v_tr, v_rot) = match &previous {
                    None => (d_tr.shallow_clone(), d_rot.shallow_clone()),
                    // Across a `--flow-above` switch the previous slope is
                    // taken on this step's ODE (the drift factors' ratio),
                    // which keeps the method second order; with equal
                    // factors the weight is exactly 1/2.
                    Some((p_tr, p_rot, p_drift)) => {
                        let w = 0.5 * plan.drift / p_drift;
                        (&d_tr * 1.5 - p_tr * w, &d_rot * 1.5 - p_rot * w)
                    }
                };
                tr = &tr + v_tr;
                rot = expmap(&v_rot).matmul(&rot);
                previous = Some((d_tr, d_rot, plan.drift));
            }
        }
        on_step(k);
    }
    (tr, rot)
}
