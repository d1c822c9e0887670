//! The probability-flow ODE of the published diffusion: structures to noise
//! (`encode`), noise to structures (`decode`) and the log-density of a
//! structure under the model, by the change of variables along the flow.
//!
//! # The ODE
//! The forward process (see [`noise`](super::noise)) perturbs translations
//! by Gaussian noise of variance `sigma_tr(t)^2`, `g_T^2 = d sigma_tr^2/dt =
//! 2 sigma_tr^2 ln(tr_max/tr_min)`, and rotations by Brownian motion on
//! SO(3) whose marginal is IGSO(3) of parameter `sigma_rot(t)` (heat kernel
//! at time `2 sigma_rot^2`, axis-angle increments of covariance `dt I_3`),
//! `g_R^2 = 4 sigma_rot^2 ln(rot_max/rot_min)`. Both are SDEs
//! `dx = g dW` (on SO(3): `R <- expmap(g dW) R`, space frame), whose
//! Fokker-Planck equation `dp/dt = (g^2/2) Laplacian p` is also the continuity
//! equation of the deterministic velocity
//!
//! ```text
//! dT/dt = -(1/2) g_T^2 s_T,      dR/dt = [-(1/2) g_R^2 s_R]_x R      (forward time t)
//! ```
//!
//! with `s = grad log p_t` (translations: the Euclidean gradient; rotations:
//! the gradient along right-invariant fields `R -> expmap(eps e_a) R`, the
//! frame in which the network's `s_R` acts). This is the probability-flow ODE
//! ([`Ode::Flow`]): half the drift of the published update (`g^2 dt s`, the
//! reverse SDE's drift) and no noise. Its solutions carry `p_t` to `p_t'` for
//! all t, t' when `s` is the true score.
//!
//! The published sampler integrates the other deterministic ODE,
//! `dx/dtau = g^2 s` ([`Ode::Published`]), which with a true score would
//! contract every sample towards a mode. The shipped models were trained and
//! tuned with it, and their scores are not accurate enough for the
//! probability flow: on the AdK model 0 of 8 probability-flow samples are
//! physically valid (CA-CA gaps, 12-15 Å from every training frame) where
//! the published ODE gives about two thirds (docs/density.md). Any
//! deterministic ODE pushes the prior forward to some density, and the
//! change of variables below holds for both: with `c` the drift factor (1/2
//! or 1), the density is that of the ensemble that ODE samples. So
//! `Ode::Published` (the default) gives the density of what `euler`, `exp`,
//! `heun` and `ab2` return (to their accuracy), `Ode::Flow` that of
//! `--solver flow`'s samples.
//!
//! # Density
//! Along a solution of `dx/dt = -c g^2 s` (forward time),
//! `d/dt log q_t(x_t) = -div(velocity) = c g^2 div s` for the density `q_t`
//! the ODE transports, so with `I = int_{t_end}^{1} c g^2 div s dt` along the
//! encoding path, `log q_{t_end}(x) = log q_1(x_1) - I`, `q_1` the prior. The divergence on SO(3) is the
//! Riemannian one for the bi-invariant (Haar) measure: in right-invariant
//! coordinates `div V = sum_a E_a V_a` (the structure constants drop out on
//! a unimodular group), so the rotation part is the trace of the Jacobian of
//! `s_R` under the perturbation `R -> (I + [eps]_x) R` at `eps = 0` (the
//! same first derivatives as `expmap(eps) R`). The trace over the `6L`
//! coordinates of a structure is taken exactly (one vector-Jacobian product
//! per coordinate, batched) or by Hutchinson's estimator with `K` Rademacher
//! probes per evaluation (unbiased; its standard error from the probes'
//! spread is reported with every density).
//!
//! Base density at `t = 1` (the sampler's prior): translations
//! `N(0, tr_max^2)` per coordinate, rotations uniform. Densities are w.r.t.
//! Lebesgue measure on translations (Å^-3 per residue) times the Haar
//! measure of total mass 1 on each rotation (the uniform rotation has
//! log-density 0). The true `p_1` differs slightly from the prior (IGSO(3)
//! at `rot_max = 1.65` is uniform within about 4 % in density, the data's
//! spread adds to `tr_max^2`); that difference is part of the model.
//!
//! The density is that of `p_{t_end}`, `t_end = 1/n_time_step`, the last
//! time the network was trained on (`sigma_tr = 0.1007` Å, `sigma_rot =
//! 0.0202` rad for the published constants): no call is made outside the
//! trained range.
//!
//! # Integration
//! Heun's method (trapezoid rule with an Euler predictor) on `steps` equal
//! steps between `t_end` and 1, the network given the fractional training
//! step `(1 - t) n_time_step` of each time. The log-density integral uses
//! the same two evaluations per step (the augmented ODE of `(x, log p)`).
//! Decoding runs the same grid backwards; encode then decode returns the
//! structure up to the discretisation error of both directions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

use super::solvers::expmap;
use crate::config::ModelConfig;
use crate::network::{ProteinContext, ScoreNetwork};
use crate::so3::So3Tables;

/// The noise schedule as functions of continuous time.
#[derive(Debug, Clone, Copy)]
pub struct FlowTimes {
    pub tr_min: f64,
    pub tr_max: f64,
    pub rot_min: f64,
    pub rot_max: f64,
    pub n_time_step: i64,
}

impl FlowTimes {
    pub fn new(cfg: &ModelConfig) -> Self {
        FlowTimes {
            tr_min: cfg.tr_sigma_min,
            tr_max: cfg.tr_sigma_max,
            rot_min: cfg.rot_sigma_min,
            rot_max: cfg.rot_sigma_max,
            n_time_step: cfg.n_time_step,
        }
    }

    pub fn sigma_tr(&self, t: f64) -> f64 {
        super::schedule::sigma(self.tr_min, self.tr_max, t)
    }

    pub fn sigma_rot(&self, t: f64) -> f64 {
        super::schedule::sigma(self.rot_min, self.rot_max, t)
    }

    /// `g_T(t)^2 = d sigma_tr^2 / dt`.
    pub fn g2_tr(&self, t: f64) -> f64 {
        2.0 * self.sigma_tr(t).powi(2) * (self.tr_max / self.tr_min).ln()
    }

    /// `g_R(t)^2 = d (2 sigma_rot^2) / dt` (the published `g_R` squared).
    pub fn g2_rot(&self, t: f64) -> f64 {
        4.0 * self.sigma_rot(t).powi(2) * (self.rot_max / self.rot_min).ln()
    }

    /// The earliest time the network was trained on, where densities live.
    pub fn t_end(&self) -> f64 {
        1.0 / self.n_time_step as f64
    }
}

/// Scores at continuous time `t`, differentiable in the poses when autograd
/// is on: `(s_T, s_R)`, each `(B, L, 3)`.
pub trait FlowField {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, t: f64) -> (Tensor, Tensor);
}

/// The score network as a [`FlowField`]: `s_T = T_eps / sigma_tr(t)`,
/// `s_R = R_eps * score_norm(sigma_rot(t))`, at the fractional training step
/// `(1 - t) n_time_step`.
pub struct NetworkFlowField<'a> {
    pub net: &'a ScoreNetwork,
    pub ctx: &'a ProteinContext,
    pub so3: &'a So3Tables,
    pub times: FlowTimes,
    /// Forward passes made, each over a whole batch.
    pub forward_passes: usize,
}

impl<'a> NetworkFlowField<'a> {
    pub fn new(net: &'a ScoreNetwork, ctx: &'a ProteinContext, so3: &'a So3Tables) -> Self {
        NetworkFlowField {
            net,
            ctx,
            so3,
            times: FlowTimes::new(net.config()),
            forward_passes: 0,
        }
    }
}

impl FlowField for NetworkFlowField<'_> {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, t: f64) -> (Tensor, Tensor) {
        self.forward_passes += 1;
        let b = tr.size()[0];
        let step = (1.0 - t) * self.times.n_time_step as f64;
        let step = Tensor::full([b], step, (Kind::Float, tr.device()));
        let (s_tr, s_rot) = self.net.forward_grad(self.ctx, tr, rot, &step);
        let t_sigma = self.times.sigma_tr(t);
        let norm = self.so3.score_norm(self.times.sigma_rot(t));
        (s_tr / t_sigma, s_rot * norm)
    }
}

/// How the divergence (the trace of the score's Jacobian) is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// One vector-Jacobian product per coordinate (6L per evaluation).
    Exact,
    /// Hutchinson's estimator: `probes` Rademacher vectors per evaluation.
    Hutchinson { probes: usize },
}

impl Divergence {
    /// Vector-Jacobian products per structure and evaluation.
    pub fn products(&self, len: i64) -> usize {
        match self {
            Divergence::Exact => 6 * len as usize,
            Divergence::Hutchinson { probes } => *probes,
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::Exact => f.write_str("exact"),
            Divergence::Hutchinson { probes } => write!(f, "hutchinson:{probes}"),
        }
    }
}

impl std::str::FromStr for Divergence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "exact" {
            return Ok(Divergence::Exact);
        }
        match s.strip_prefix("hutchinson:").map(str::parse::<usize>) {
            Some(Ok(k)) if k >= 2 => Ok(Divergence::Hutchinson { probes: k }),
            Some(Ok(_)) => {
                Err("hutchinson needs at least 2 probes (its error comes from their spread)".into())
            }
            _ => Err(format!(
                "unknown divergence {s:?}; use exact or hutchinson:K (K probes, at least 2)"
            )),
        }
    }
}

/// Which deterministic ODE is integrated (and whose density is computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ode {
    /// The published sampler's ODE, `dx/dtau = g^2 s` (the reverse SDE's
    /// drift without its noise): the density of the ensemble the published
    /// update (and `exp`, `heun`, `ab2`, to their accuracy) returns.
    #[default]
    Published,
    /// The probability-flow ODE, `dx/dtau = g^2 s / 2`: the density of the
    /// distribution the score describes (exact for a perfect score).
    Flow,
}

impl Ode {
    /// The factor on `g^2 s`.
    pub fn drift(self) -> f64 {
        match self {
            Ode::Published => 1.0,
            Ode::Flow => 0.5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ode::Published => "published",
            Ode::Flow => "flow",
        }
    }
}

impl std::str::FromStr for Ode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "published" => Ok(Ode::Published),
            "flow" => Ok(Ode::Flow),
            _ => Err(format!("unknown ODE {s:?}; use published or flow")),
        }
    }
}

/// Settings of one run of the flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowSettings {
    /// The ODE integrated.
    pub ode: Ode,
    /// Heun steps between `t_end` and 1 (two score evaluations each).
    pub steps: usize,
    /// The density integral: `None` integrates the poses only.
    pub divergence: Option<Divergence>,
    /// Seed of the Hutchinson probes (per sample: a ChaCha20 stream keyed by
    /// `seed | "digprobe"` with the sample's index as stream number).
    pub seed: u64,
    /// Vector-Jacobian products batched into one backward pass.
    pub chunk: usize,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            ode: Ode::Published,
            steps: 100,
            divergence: None,
            seed: 0,
            chunk: 64,
        }
    }
}

/// The end of a run: the poses and, with a divergence, per sample the
/// integral `int (1/2) g^2 div s dt` from the start time to the end time
/// (signed with the direction) and its estimator variance.
pub struct FlowRun {
    pub tr: Tensor,
    pub rot: Tensor,
    pub integral: Vec<f64>,
    pub variance: Vec<f64>,
    /// Score evaluations per structure (each one forward pass, plus the
    /// divergence's vector-Jacobian products when asked).
    pub evaluations: usize,
}

/// `[v]_x`: `(..., 3)` to skew matrices `(..., 3, 3)`.
fn hat(v: &Tensor) -> Tensor {
    let p = v.unbind(-1);
    let z = p[0].zeros_like();
    let m = Tensor::stack(
        &[
            &z,
            &(-&p[2]),
            &p[1], //
            &p[2],
            &z,
            &(-&p[0]), //
            &(-&p[1]),
            &p[0],
            &z,
        ],
        -1,
    );
    let mut shape = v.size();
    shape.pop();
    shape.extend([3, 3]);
    m.view(shape.as_slice())
}

/// Per-sample probe streams.
fn probe_rngs(seed: u64, indices: &[u64]) -> Vec<ChaCha20Rng> {
    indices
        .iter()
        .map(|&i| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            key[8..16].copy_from_slice(b"digprobe");
            let mut rng = ChaCha20Rng::from_seed(key);
            rng.set_stream(i);
            rng
        })
        .collect()
}

/// One evaluation: the scores and, if asked, each sample's divergence
/// estimate and the variance of that estimate.
struct Evaluation {
    s_tr: Tensor,
    s_rot: Tensor,
    div: Option<(Vec<f64>, Vec<f64>)>,
}

fn evaluate(
    field: &mut impl FlowField,
    tr: &Tensor,
    rot: &Tensor,
    t: f64,
    settings: &FlowSettings,
    rngs: &mut [ChaCha20Rng],
) -> Evaluation {
    let Some(divergence) = settings.divergence else {
        let (s_tr, s_rot) = tch::no_grad(|| field.score(tr, rot, t));
        return Evaluation {
            s_tr,
            s_rot,
            div: None,
        };
    };
    let (b, l) = (tr.size()[0], tr.size()[1]);
    let device = tr.device();
    let m = divergence.products(l);
    // Each sample's vectors, (m, L*6) per sample.
    let vectors: Vec<Vec<f32>> = match divergence {
        Divergence::Exact => vec![],
        Divergence::Hutchinson { .. } => rngs
            .iter_mut()
            .map(|rng| {
                (0..m * l as usize * 6)
                    .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                    .collect()
            })
            .collect(),
    };
    let mut quad = vec![Vec::with_capacity(m); b as usize];
    let mut scores = None;
    let mut start = 0;
    while start < m {
        let c = settings.chunk.max(1).min(m - start);
        // V: (c, B, L*6)
        let v = match divergence {
            Divergence::Exact => {
                let idx =
                    Tensor::arange_start(start as i64, (start + c) as i64, (Kind::Int64, device));
                idx.one_hot(6 * l)
                    .to_kind(Kind::Float)
                    .unsqueeze(1)
                    .expand([c as i64, b, 6 * l], true)
            }
            Divergence::Hutchinson { .. } => {
                let per: Vec<f32> = (0..c)
                    .flat_map(|j| {
                        vectors.iter().flat_map(move |vs| {
                            vs[(start + j) * l as usize * 6..(start + j + 1) * l as usize * 6]
                                .iter()
                                .copied()
                        })
                    })
                    .collect();
                Tensor::from_slice(&per)
                    .view([c as i64, b, 6 * l])
                    .to_device(device)
            }
        };
        // Coordinates 0..3L-1: translations (residue-major, x y z); 3L..6L-1:
        // rotations, likewise.
        let v = v.reshape([c as i64 * b, 2, l, 3]);
        let reps = |x: &Tensor| {
            let mut shape = vec![c as i64];
            shape.extend(x.size());
            let mut flat = vec![c as i64 * b];
            flat.extend(&x.size()[1..]);
            x.detach()
                .unsqueeze(0)
                .expand(shape.as_slice(), true)
                .reshape(flat.as_slice())
        };
        let (s_tr, s_rot, g_tr, g_rot) = tch::with_grad(|| {
            let delta =
                Tensor::zeros([c as i64 * b, l, 3], (Kind::Float, device)).set_requires_grad(true);
            let eps =
                Tensor::zeros([c as i64 * b, l, 3], (Kind::Float, device)).set_requires_grad(true);
            let r = reps(rot);
            let tr_in = reps(tr) + &delta;
            let rot_in = &r + hat(&eps).matmul(&r);
            let (s_tr, s_rot) = field.score(&tr_in, &rot_in, t);
            let out = (&s_tr * v.select(1, 0)).sum(Kind::Float)
                + (&s_rot * v.select(1, 1)).sum(Kind::Float);
            let g = Tensor::run_backward(&[out], &[&delta, &eps], false, false);
            (
                s_tr.detach(),
                s_rot.detach(),
                g[0].shallow_clone(),
                g[1].shallow_clone(),
            )
        });
        let q = (g_tr * v.select(1, 0) + g_rot * v.select(1, 1))
            .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double)
            .view([c as i64, b]);
        let q =
            Vec::<f64>::try_from(&q.to_device(Device::Cpu).view([-1])).expect("divergence values");
        for j in 0..c {
            for (i, qs) in quad.iter_mut().enumerate() {
                qs.push(q[j * b as usize + i]);
            }
        }
        if scores.is_none() {
            scores = Some((
                s_tr.view([c as i64, b, l, 3]).get(0),
                s_rot.view([c as i64, b, l, 3]).get(0),
            ));
        }
        start += c;
    }
    let (s_tr, s_rot) = scores.expect("at least one product");
    let (mut div, mut var) = (Vec::new(), Vec::new());
    for qs in &quad {
        match divergence {
            Divergence::Exact => {
                div.push(qs.iter().sum());
                var.push(0.0);
            }
            Divergence::Hutchinson { probes } => {
                let k = probes as f64;
                let mean = qs.iter().sum::<f64>() / k;
                let s2 = qs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0);
                div.push(mean);
                var.push(s2 / k);
            }
        }
    }
    Evaluation {
        s_tr,
        s_rot,
        div: Some((div, var)),
    }
}

/// Heun's method on the poses from time `from` to `to` (either direction) on `settings.steps`
/// equal steps; `indices` name the samples (the probes' streams).
pub fn flow(
    field: &mut impl FlowField,
    times: &FlowTimes,
    (tr, rot): (&Tensor, &Tensor),
    (from, to): (f64, f64),
    settings: &FlowSettings,
    indices: &[u64],
    mut on_step: impl FnMut(usize),
) -> FlowRun {
    let b = tr.size()[0] as usize;
    assert_eq!(indices.len(), b, "one index per sample");
    let n = settings.steps.max(1);
    let h = (to - from) / n as f64;
    let mut rngs = probe_rngs(settings.seed, indices);
    let (mut tr, mut rot) = (tr.detach(), rot.detach());
    let mut integral = vec![0.0; b];
    let mut variance = vec![0.0; b];
    let mut evaluations = 0;
    // Velocity in forward time: -(1/2) g^2 s.
    let velocity = |e: &Evaluation, t: f64| {
        (
            &e.s_tr * (-settings.ode.drift() * times.g2_tr(t)),
            &e.s_rot * (-settings.ode.drift() * times.g2_rot(t)),
        )
    };
    for j in 0..n {
        let t0 = from + j as f64 * h;
        let t1 = if j + 1 == n {
            to
        } else {
            from + (j + 1) as f64 * h
        };
        let e0 = evaluate_weighted(field, &tr, &rot, t0, times, settings, &mut rngs);
        let (u0_tr, u0_rot) = velocity(&e0, t0);
        let tr_pred = &tr + &u0_tr * h;
        let rot_pred = expmap(&(&u0_rot * h)).matmul(&rot);
        let e1 = evaluate_weighted(field, &tr_pred, &rot_pred, t1, times, settings, &mut rngs);
        let (u1_tr, u1_rot) = velocity(&e1, t1);
        tr = &tr + (u0_tr + u1_tr) * (h / 2.0);
        rot = expmap(&((u0_rot + u1_rot) * (h / 2.0))).matmul(&rot);
        evaluations += 2;
        for e in [&e0, &e1] {
            if let Some((d, v)) = &e.div {
                for i in 0..b {
                    integral[i] += h / 2.0 * d[i];
                    variance[i] += (h / 2.0).powi(2) * v[i];
                }
            }
        }
        on_step(j);
    }
    FlowRun {
        tr,
        rot,
        integral,
        variance,
        evaluations,
    }
}

/// [`evaluate`] with the divergence of the weighted score
/// `((1/2) g_T^2 s_T, (1/2) g_R^2 s_R)`: translations and rotations have
/// different gains, so the trace is taken of the field the density integral
/// needs, `(1/2) g^2 div s`, directly.
fn evaluate_weighted(
    field: &mut impl FlowField,
    tr: &Tensor,
    rot: &Tensor,
    t: f64,
    times: &FlowTimes,
    settings: &FlowSettings,
    rngs: &mut [ChaCha20Rng],
) -> Evaluation {
    struct Weighted<'f, F: FlowField> {
        inner: &'f mut F,
        w_tr: f64,
        w_rot: f64,
    }
    impl<F: FlowField> FlowField for Weighted<'_, F> {
        fn score(&mut self, tr: &Tensor, rot: &Tensor, t: f64) -> (Tensor, Tensor) {
            let (a, b) = self.inner.score(tr, rot, t);
            (a * self.w_tr, b * self.w_rot)
        }
    }
    let c = settings.ode.drift();
    let (w_tr, w_rot) = (c * times.g2_tr(t), c * times.g2_rot(t));
    let mut weighted = Weighted {
        inner: field,
        w_tr,
        w_rot,
    };
    let e = evaluate(&mut weighted, tr, rot, t, settings, rngs);
    Evaluation {
        s_tr: e.s_tr / w_tr,
        s_rot: e.s_rot / w_rot,
        div: e.div,
    }
}

/// The prior's log-density at `t = 1`, per sample: `N(0, tr_max^2)` per
/// translation coordinate, uniform rotations (log-density 0).
pub fn log_prior(times: &FlowTimes, tr: &Tensor) -> Vec<f64> {
    let (b, l) = (tr.size()[0], tr.size()[1]);
    let s2 = times.tr_max * times.tr_max;
    let sq = tr
        .to_kind(Kind::Double)
        .square()
        .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double)
        .to_device(Device::Cpu);
    let sq = Vec::<f64>::try_from(&sq).expect("squared norms");
    let norm = 1.5 * l as f64 * (2.0 * std::f64::consts::PI * s2).ln();
    (0..b as usize).map(|i| -0.5 * sq[i] / s2 - norm).collect()
}

/// Log-densities of structures under the model (at `t_end`), with the
/// standard error of each (0 for the exact divergence).
pub struct Density {
    pub log_density: Vec<f64>,
    pub std_error: Vec<f64>,
    /// The encoded noise (`t = 1`) and the prior's log-density there.
    pub noise_tr: Tensor,
    pub noise_rot: Tensor,
    pub log_prior: Vec<f64>,
    pub evaluations: usize,
}

/// Encodes the structures and returns their log-densities.
pub fn log_density(
    field: &mut impl FlowField,
    times: &FlowTimes,
    tr: &Tensor,
    rot: &Tensor,
    settings: &FlowSettings,
    indices: &[u64],
    on_step: impl FnMut(usize),
) -> Density {
    let mut settings = *settings;
    settings
        .divergence
        .get_or_insert(Divergence::Hutchinson { probes: 8 });
    let run = flow(
        field,
        times,
        (tr, rot),
        (times.t_end(), 1.0),
        &settings,
        indices,
        on_step,
    );
    let prior = log_prior(times, &run.tr);
    Density {
        log_density: prior
            .iter()
            .zip(&run.integral)
            .map(|(p, i)| p - i)
            .collect(),
        std_error: run.variance.iter().map(|v| v.sqrt()).collect(),
        noise_tr: run.tr,
        noise_rot: run.rot,
        log_prior: prior,
        evaluations: run.evaluations,
    }
}

/// Axis-angle vector of a rotation matrix (row-major), the inverse of
/// [`expmap`] for angles in `[0, pi]`.
pub fn logmap(r: &[f64; 9]) -> [f64; 3] {
    let skew = [r[7] - r[5], r[2] - r[6], r[3] - r[1]];
    // |skew| = 2 sin(angle), trace - 1 = 2 cos(angle): atan2 is
    // well-conditioned at every angle (acos of the trace is not near pi).
    let sin2 = (skew[0] * skew[0] + skew[1] * skew[1] + skew[2] * skew[2]).sqrt();
    let angle = sin2.atan2(r[0] + r[4] + r[8] - 1.0);
    if angle < 1e-6 {
        return skew.map(|v| v / 2.0);
    }
    if sin2 > 2e-3 {
        return skew.map(|v| v / sin2 * angle);
    }
    // Near pi: the axis from the symmetric part, (R + R^T)/2 + I = 2 n n^T
    // (+ O(pi - angle)): its largest column, normalised; the sign from the
    // skew part.
    let diag = [r[0], r[4], r[8]];
    let k = (0..3)
        .max_by(|&a, &b| diag[a].total_cmp(&diag[b]))
        .unwrap_or(0);
    let col = [
        if k == 0 {
            r[0] + 1.0
        } else {
            (r[k] + r[3 * k]) / 2.0
        },
        if k == 1 {
            r[4] + 1.0
        } else {
            (r[3 + k] + r[1 + 3 * k]) / 2.0
        },
        if k == 2 {
            r[8] + 1.0
        } else {
            (r[6 + k] + r[2 + 3 * k]) / 2.0
        },
    ];
    let norm = (col[0] * col[0] + col[1] * col[1] + col[2] * col[2])
        .sqrt()
        .max(1e-300);
    let mut n = col.map(|v| v / norm);
    if n[0] * skew[0] + n[1] * skew[1] + n[2] * skew[2] < 0.0 {
        n = n.map(|v| -v);
    }
    n.map(|v| v * angle)
}

/// Points between two encoded structures in the noise space at `t = 1`:
/// translations by spherical interpolation of the whole `3L` vector (the
/// prior is an isotropic Gaussian, whose typical set is a shell: slerp stays
/// on it, a straight line would cut inside), rotations along each residue's
/// geodesic `expmap(s log(R_b R_a^T)) R_a`. `fractions` in [0, 1].
pub fn interpolate_noise(
    (tr_a, rot_a): (&[f32], &[f32]),
    (tr_b, rot_b): (&[f32], &[f32]),
    fractions: &[f64],
) -> (Vec<f32>, Vec<f32>) {
    let dot: f64 = tr_a
        .iter()
        .zip(tr_b)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let na: f64 = tr_a.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = tr_b.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
    let theta = (dot / (na * nb).max(1e-300)).clamp(-1.0, 1.0).acos();
    let l = rot_a.len() / 9;
    // Each residue's relative rotation R_b R_a^T as an axis-angle vector.
    let rel: Vec<[f64; 3]> = (0..l)
        .map(|i| {
            let a = &rot_a[i * 9..i * 9 + 9];
            let b = &rot_b[i * 9..i * 9 + 9];
            let mut m = [0.0f64; 9];
            for r in 0..3 {
                for c in 0..3 {
                    m[3 * r + c] = (0..3)
                        .map(|k| b[3 * r + k] as f64 * a[3 * c + k] as f64)
                        .sum();
                }
            }
            logmap(&m)
        })
        .collect();
    let (mut tr, mut rot) = (Vec::new(), Vec::new());
    for &s in fractions {
        let (wa, wb) = if theta < 1e-6 {
            (1.0 - s, s)
        } else {
            (
                ((1.0 - s) * theta).sin() / theta.sin(),
                (s * theta).sin() / theta.sin(),
            )
        };
        tr.extend(
            tr_a.iter()
                .zip(tr_b)
                .map(|(&a, &b)| (wa * a as f64 + wb * b as f64) as f32),
        );
        let v: Vec<f32> = rel.iter().flat_map(|r| r.map(|x| (x * s) as f32)).collect();
        let step = expmap(&Tensor::from_slice(&v).view([l as i64, 3]));
        let r = step.matmul(&Tensor::from_slice(rot_a).view([l as i64, 3, 3]));
        rot.extend(Vec::<f32>::try_from(r.flatten(0, -1)).expect("float32 rotations"));
    }
    (tr, rot)
}

/// The log-density of every sample of `ensemble` (encoded in batches of
/// `batch_size`; sample `i`'s probes are its own stream, so the numbers do
/// not depend on the batch or the shard). `progress(samples)` after each
/// step of a batch.
pub fn ensemble_log_density(
    net: &ScoreNetwork,
    ctx: &ProteinContext,
    so3: &So3Tables,
    ensemble: &crate::structure::Ensemble,
    settings: &FlowSettings,
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> crate::structure::DensityRecord {
    let mut settings = *settings;
    settings
        .divergence
        .get_or_insert(Divergence::Hutchinson { probes: 4 });
    let times = FlowTimes::new(net.config());
    let mut field = NetworkFlowField::new(net, ctx, so3);
    let (n, l) = (ensemble.num_samples(), ensemble.len_residues());
    let mut out = crate::structure::DensityRecord::default();
    for start in (0..n).step_by(batch_size.max(1)) {
        let end = (start + batch_size.max(1)).min(n);
        let b = (end - start) as i64;
        let tr = Tensor::from_slice(&ensemble.tr[start * l * 3..end * l * 3])
            .view([b, l as i64, 3])
            .to_device(ctx.device());
        let rot = Tensor::from_slice(&ensemble.rot_mat[start * l * 9..end * l * 9])
            .view([b, l as i64, 3, 3])
            .to_device(ctx.device());
        // Densities are of centred structures (as the model was trained).
        let tr = &tr - tr.mean_dim([1i64].as_slice(), true, Kind::Float);
        let indices: Vec<u64> = ensemble.sample_index[start..end]
            .iter()
            .map(|&i| i as u64)
            .collect();
        let d = log_density(&mut field, &times, &tr, &rot, &settings, &indices, |_| {
            progress(b as usize)
        });
        out.log_density.extend(d.log_density);
        out.std_error.extend(d.std_error);
    }
    out
}
