//! Steered sampling by sequential Monte Carlo (`../shared/STEERING.md`).
//!
//! Each returned sample `i` owns a group of `K` particles
//! ([`super::noise`]: their initial poses and every noise and resampling
//! draw come from sample `i`'s own streams, so the group's result does not
//! depend on batch, shard or worker). The particles move with the
//! stochastic update (the reverse SDE, noise factor `eta`). Target: the
//! tilted distribution `q(x) ∝ p(x) exp(-U(x))`, `p` what the unsteered
//! stochastic sampler returns, `U` the sum of the potentials (kT).
//!
//! Per step `k` (time `t_k`), for every particle:
//! 1. the network's scores give the denoised translations
//!    `x0_k = T + sigma_tr(t_k)^2 s_T` (the CA atoms of the predicted
//!    structure; rotations are not used);
//! 2. once `t_k <= window[0]`, the log-weight gains `-(U(x0_k) - U(x0_{k-1}))`
//!    (`U(x0_{-1}) = 0` at the first such step);
//! 3. the particle moves (stochastic update);
//! 4. while `window[1] <= t_k <= window[0]`, a group whose effective sample
//!    size `(sum w)^2 / sum w^2` is below `ess_threshold * K` is resampled
//!    (systematic resampling, one uniform from the group's stream); the
//!    group's `log Z` gains the log of its mean weight, and its weights
//!    become equal (the mean, kept in `log Z`).
//!
//! After the last step the weights gain `-(U(x) - U(x0_last))` with `x` the
//! returned structure itself, so each particle's log-weight telescopes to
//! `-U(x)` plus the resampling corrections. One particle is returned per
//! group, drawn by its final weight (one more uniform), with
//! `steer_energy = U(x)` and `steer_log_z = log Z_hat`, Z_hat the product of
//! the mean weights at each resampling and the final mean weight: an
//! unbiased estimate of `E_p[exp(-U)]`. Reweighting returned samples by
//! `Z_hat` gives consistent estimates under `q` for any `K`; by
//! `Z_hat exp(U(x))` under the unsteered `p` ([`reweight`]).
//!
//! Gradient guidance (`guidance = gamma > 0`): inside the window the
//! translation update gains `delta = -gamma g_T^2 dt grad_x0 U(x0_k)`, the
//! gradient taken with respect to the denoised CA positions and applied to
//! the noisy ones (the approximation `d x0 / d T ~ I`, which ignores the
//! denoiser's Jacobian). The proposal is then not the unsteered kernel, so
//! each step's log-weight also gains `log N(x'; m, s^2) - log N(x'; m + delta,
//! s^2) = -(|delta|^2 + 2 s delta.z) / (2 s^2)` (`s = eta g_T sqrt(dt)`, `z`
//! the drawn normals): the weights, `Z_hat` and the reweighting stay exact;
//! the approximation only affects how useful the guidance is.
//!
//! Network calls per returned sample: `K` times the steps.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::noise::{noise_stream, particle_initial_state, sde_update, step_normals, tensor3};
use super::potentials::{PotentialSet, PotentialSpec};
use super::schedule::{Schedule, Solver};
use super::solvers::ScoreField;
use crate::rng::uniform;

/// Most particles per returned sample.
pub const MAX_PARTICLES: usize = 64;

fn default_particles() -> usize {
    4
}
fn default_ess() -> f64 {
    0.5
}
fn default_window() -> [f64; 2] {
    [0.9, 0.1]
}
fn default_noise() -> f64 {
    1.0
}

/// Steering settings as a user writes them (`digctl sample --steer FILE`,
/// a job's `steering`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    /// Particles per returned sample, 1..=64.
    #[serde(default = "default_particles")]
    pub particles: usize,
    /// Resample a group when its ESS falls below this fraction of K, (0, 1].
    #[serde(default = "default_ess")]
    pub ess_threshold: f64,
    /// `[t_start, t_end]` in diffusion time (1 = noise, 0 = data): weights
    /// accumulate from `t_start`, resampling happens between the two.
    #[serde(default = "default_window")]
    pub window: [f64; 2],
    /// Noise factor `eta` of the stochastic update, (0, 2].
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// The potentials, summed.
    #[serde(default)]
    pub potentials: Vec<PotentialSpec>,
    /// Gradient guidance, [0, 1000]: inside the window the translation score
    /// gains `-guidance * grad U(x0)` (module docs), and the weights the
    /// proposal's correction, so the weights stay exact. 0: none.
    #[serde(default)]
    pub guidance: f64,
}

/// Presets: `physical` (chain breaks and clashes, 4 particles, noise 0.3,
/// weights from t = 0.5: tuned on the AdK model, docs/steering.md).
pub fn preset(name: &str) -> Option<SteerSpec> {
    match name {
        "physical" => Some(
            serde_json::from_value(serde_json::json!({
                "particles": 4,
                "ess_threshold": 0.5,
                "window": [0.5, 0.0],
                "noise": 0.3,
                "potentials": [
                    {"type": "chain_break", "target": 3.8, "flat_bottom": 0.4, "slope": 3.0, "order": 2, "linear_from": 1.0},
                    {"type": "clash", "target": 4.0, "flat_bottom": 0.0, "slope": 3.0, "order": 2, "linear_from": 1.0}
                ]
            }))
            .expect("the preset parses"),
        ),
        _ => None,
    }
}

/// Preset names.
pub const PRESETS: &[&str] = &["physical"];

/// Validated steering for a protein of a given length.
#[derive(Debug, Clone, PartialEq)]
pub struct Steering {
    pub particles: usize,
    pub ess_threshold: f64,
    pub t_start: f64,
    pub t_end: f64,
    pub noise: f64,
    pub potentials: PotentialSet,
    pub guidance: f64,
}

impl Steering {
    /// The stochastic sampler without steering: one particle, no potential.
    pub fn stochastic(noise: f64) -> Self {
        Steering {
            particles: 1,
            ess_threshold: 0.5,
            t_start: 1.0,
            t_end: 0.0,
            noise,
            potentials: PotentialSet::default(),
            guidance: 0.0,
        }
    }
}

impl SteerSpec {
    /// Parses JSON text, naming the field of any error (`potentials[1].type: ...`).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        Self::from_value(&value)
    }

    /// Parses a JSON value (a job's `steering`), naming the field of any error.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, String> {
        if !value.is_object() {
            return Err(format!(
                "must be a JSON object (particles, ess_threshold, window, noise, guidance, potentials), got {value}"
            ));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })
    }

    /// Checks every number and compiles the potentials for a protein of
    /// `len` residues sampled with `solver`. Errors name the field, relative
    /// to the steering object (`particles: ...`, `potentials[0].target: ...`).
    pub fn compile(&self, len: usize, solver: Solver) -> Result<Steering, String> {
        if !(1..=MAX_PARTICLES).contains(&self.particles) {
            return Err(format!(
                "particles: must be between 1 and {MAX_PARTICLES}, got {}",
                self.particles
            ));
        }
        if !(self.ess_threshold > 0.0 && self.ess_threshold <= 1.0) {
            return Err(format!(
                "ess_threshold: must be in (0, 1], got {}",
                self.ess_threshold
            ));
        }
        let [t_start, t_end] = self.window;
        if !(t_start.is_finite()
            && t_end.is_finite()
            && 0.0 <= t_end
            && t_end <= t_start
            && t_start <= 1.0)
        {
            return Err(format!(
                "window: must be [t_start, t_end] with 1 >= t_start >= t_end >= 0 (diffusion time, 1 = noise), got [{t_start}, {t_end}]"
            ));
        }
        if !(self.noise > 0.0 && self.noise <= 2.0) {
            return Err(format!("noise: must be in (0, 2], got {}", self.noise));
        }
        if solver != Solver::Euler {
            return Err(format!(
                "solver: steering moves particles with the stochastic Euler update; use solver euler (got {solver})"
            ));
        }
        if !(0.0..=1000.0).contains(&self.guidance) {
            return Err(format!(
                "guidance: must be in [0, 1000], got {}",
                self.guidance
            ));
        }
        if self.guidance > 0.0 && self.potentials.is_empty() {
            return Err("guidance: needs at least one potential".into());
        }
        if self.particles > 1 && self.potentials.is_empty() {
            return Err("potentials: more than one particle needs at least one potential".into());
        }
        let terms = self
            .potentials
            .iter()
            .enumerate()
            .map(|(i, p)| p.compile(len).map_err(|e| format!("potentials[{i}].{e}")))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Steering {
            particles: self.particles,
            ess_threshold: self.ess_threshold,
            t_start,
            t_end,
            noise: self.noise,
            potentials: PotentialSet { terms },
            guidance: self.guidance,
        })
    }
}

/// An error of [`SteerSpec::from_value`] or [`SteerSpec::compile`] as the
/// field `name` of a larger object: `name.<field>: message`, or `name:
/// message` for the object as a whole (every field error is `path:
/// message` with a path of no spaces; other messages have a space before
/// any colon). The API's 400s and the worker's shard errors both use it.
pub fn qualify(name: &str, e: &str) -> String {
    let field = e
        .split_once(':')
        .is_some_and(|(f, _)| !f.is_empty() && !f.contains(' '));
    if field {
        format!("{name}.{e}")
    } else {
        format!("{name}: {e}")
    }
}

/// The returned particle of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupResult {
    /// `(L, 3)` and `(L, 3, 3)`, row-major.
    pub tr: Vec<f32>,
    pub rot: Vec<f32>,
    /// `U(x)` of the returned structure (kT).
    pub energy: f64,
    /// `log Z_hat` of the group.
    pub log_z: f64,
    /// How often the group was resampled.
    pub resamplings: u32,
}

fn log_mean_exp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + (v.iter().map(|x| (x - m).exp()).sum::<f64>() / v.len() as f64).ln()
}

/// Normalised weights of log-weights.
fn normalised(log_w: &[f64]) -> Vec<f64> {
    let m = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = log_w.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|x| x / s).collect()
}

/// Systematic resampling: `K` ancestors from normalised weights and one uniform.
fn systematic(w: &[f64], u: f64) -> Vec<usize> {
    let k = w.len();
    let mut out = Vec::with_capacity(k);
    let mut cum = w[0];
    let mut j = 0;
    for i in 0..k {
        let point = (i as f64 + u) / k as f64;
        while point > cum && j + 1 < k {
            j += 1;
            cum += w[j];
        }
        out.push(j);
    }
    out
}

/// CA positions of every particle from a `(P, L, 3)` tensor.
fn positions(t: &Tensor, p: usize, len: usize) -> Vec<Vec<[f64; 3]>> {
    positions_of(&floats(t), p, len)
}

/// A tensor's values on the CPU as float32, flattened.
fn floats(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
        .expect("float32 values")
}

/// CA positions of every particle from flat `(P, L, 3)` values.
fn positions_of(flat: &[f32], p: usize, len: usize) -> Vec<Vec<[f64; 3]>> {
    (0..p)
        .map(|i| {
            flat[i * len * 3..(i + 1) * len * 3]
                .chunks_exact(3)
                .map(|c| [f64::from(c[0]), f64::from(c[1]), f64::from(c[2])])
                .collect()
        })
        .collect()
}

/// Runs steered (or, with one particle and no potential, plain stochastic)
/// sampling of the groups `indices` under `seed`: `len` residues, every
/// group's `K` particles in one batch. `on_step(k)` after each step.
#[allow(clippy::too_many_arguments)]
pub fn sample_groups(
    schedule: &Schedule,
    field: &mut impl ScoreField,
    steering: &Steering,
    seed: u64,
    indices: &[u64],
    len: usize,
    tr_sigma_max: f64,
    device: Device,
    on_step: impl FnMut(usize),
) -> Vec<GroupResult> {
    let potentials = &steering.potentials;
    let energy = |x: &[[f64; 3]], grad: bool| {
        if grad {
            potentials.energy_and_gradient(x)
        } else {
            (potentials.energy(x), Vec::new())
        }
    };
    sample_groups_with(
        schedule,
        field,
        steering,
        (!potentials.is_empty()).then_some(&energy as &EnergyFn<'_>),
        seed,
        indices,
        len,
        tr_sigma_max,
        device,
        on_step,
    )
}

/// An energy of CA positions: `(U, grad U)`, the gradient only when asked
/// (else empty).
pub type EnergyFn<'a> = dyn Fn(&[[f64; 3]], bool) -> (f64, Vec<[f64; 3]>) + 'a;

/// [`sample_groups`] with any energy function of the CA positions in place
/// of `steering.potentials` (`None`: unsteered).
#[allow(clippy::too_many_arguments)]
pub fn sample_groups_with(
    schedule: &Schedule,
    field: &mut impl ScoreField,
    steering: &Steering,
    energy: Option<&EnergyFn<'_>>,
    seed: u64,
    indices: &[u64],
    len: usize,
    tr_sigma_max: f64,
    device: Device,
    mut on_step: impl FnMut(usize),
) -> Vec<GroupResult> {
    let _guard = tch::no_grad_guard();
    let k = steering.particles;
    let g = indices.len();
    let p = g * k;
    let (mut tr0, mut rot0) = (
        Vec::with_capacity(p * len * 3),
        Vec::with_capacity(p * len * 9),
    );
    for &i in indices {
        for q in 0..k {
            let s = particle_initial_state(seed, i, q as u64, len, tr_sigma_max);
            tr0.extend(s.tr);
            rot0.extend(s.rot);
        }
    }
    let mut tr = tensor3(&tr0, p, len, device);
    let mut rot = Tensor::from_slice(&rot0)
        .view([p as i64, len as i64, 3, 3])
        .to_device(device);
    let mut rngs: Vec<_> = indices.iter().map(|&i| noise_stream(seed, i)).collect();
    let steered = energy.is_some();
    let energy = |x: &[[f64; 3]], grad: bool| energy.map_or((0.0, Vec::new()), |f| f(x, grad));
    let mut log_w = vec![0.0f64; p];
    let mut prev_u = vec![0.0f64; p];
    let mut log_z = vec![0.0f64; g];
    let mut resamplings = vec![0u32; g];
    for (step, plan) in schedule.steps.iter().enumerate() {
        let (s_tr, s_rot) = field.score(&tr, &rot, plan);
        let guide = steered && steering.guidance > 0.0 && plan.t <= steering.t_start;
        let mut grads: Vec<Vec<[f64; 3]>> = Vec::new();
        if steered && plan.t <= steering.t_start {
            let x0 = &tr + &s_tr * (plan.sigma_tr * plan.sigma_tr);
            let ca = positions(&x0, p, len);
            for (j, x) in ca.iter().enumerate() {
                let (u, g) = energy(x, guide);
                log_w[j] -= u - prev_u[j];
                prev_u[j] = u;
                if guide {
                    grads.push(g);
                }
            }
        }
        let (mut z_tr, mut z_rot) = (
            Vec::with_capacity(p * len * 3),
            Vec::with_capacity(p * len * 3),
        );
        for rng in rngs.iter_mut() {
            let (a, b) = step_normals(rng, k, len);
            z_tr.extend(a);
            z_rot.extend(b);
        }
        let (zt, zr) = (
            tensor3(&z_tr, p, len, device),
            tensor3(&z_rot, p, len, device),
        );
        (tr, rot) = sde_update(
            &tr,
            &rot,
            (&s_tr, &s_rot),
            plan,
            steering.noise,
            Some((&zt, &zr)),
        );
        if guide {
            // The guided proposal moves the mean by delta = -guidance *
            // gain * grad U(x0); the unguided kernel N(m, s^2) against the
            // guided N(m + delta, s^2) at the drawn point gives the weight
            // log N(x'|m) - log N(x'|m + delta) = -(|delta|^2 + 2 s delta.z) / (2 s^2).
            let s = steering.noise * plan.tr_gain.sqrt();
            let c = -steering.guidance * plan.tr_gain;
            let mut delta = Vec::with_capacity(p * len * 3);
            for (j, g) in grads.iter().enumerate() {
                let mut corr = 0.0;
                for (i, gi) in g.iter().enumerate() {
                    for kk in 0..3 {
                        let d = (c * gi[kk]) as f32;
                        let z = f64::from(z_tr[(j * len + i) * 3 + kk]);
                        corr += f64::from(d) * f64::from(d) + 2.0 * s * f64::from(d) * z;
                        delta.push(d);
                    }
                }
                log_w[j] -= corr / (2.0 * s * s);
            }
            tr += tensor3(&delta, p, len, device);
        }
        let in_window = plan.t <= steering.t_start && plan.t >= steering.t_end;
        if steered && k > 1 && in_window {
            let mut ancestors: Vec<i64> = (0..p as i64).collect();
            let mut any = false;
            for gi in 0..g {
                let lw = &log_w[gi * k..(gi + 1) * k];
                let w = normalised(lw);
                let ess = 1.0 / w.iter().map(|x| x * x).sum::<f64>();
                if ess < steering.ess_threshold * k as f64 {
                    let u = uniform(&mut rngs[gi]);
                    let pick = systematic(&w, u);
                    log_z[gi] += log_mean_exp(lw);
                    let old_u: Vec<f64> = prev_u[gi * k..(gi + 1) * k].to_vec();
                    for (q, &a) in pick.iter().enumerate() {
                        ancestors[gi * k + q] = (gi * k + a) as i64;
                        prev_u[gi * k + q] = old_u[a];
                        log_w[gi * k + q] = 0.0;
                    }
                    resamplings[gi] += 1;
                    any = true;
                }
            }
            if any {
                let idx = Tensor::from_slice(&ancestors).to_device(device);
                tr = tr.index_select(0, &idx);
                rot = rot.index_select(0, &idx);
            }
        }
        on_step(step);
    }
    let tr_all = floats(&tr);
    let rot_all = floats(&rot);
    // The final increment on the returned structures themselves.
    let mut final_u = vec![0.0f64; p];
    if steered {
        for (j, x) in positions_of(&tr_all, p, len).iter().enumerate() {
            final_u[j] = energy(x, false).0;
            log_w[j] -= final_u[j] - prev_u[j];
        }
    }
    (0..g)
        .map(|gi| {
            let lw = &log_w[gi * k..(gi + 1) * k];
            let chosen = if k == 1 {
                0
            } else {
                let w = normalised(lw);
                let u = uniform(&mut rngs[gi]);
                let mut cum = 0.0;
                let mut c = k - 1;
                for (q, x) in w.iter().enumerate() {
                    cum += x;
                    if u < cum {
                        c = q;
                        break;
                    }
                }
                c
            };
            let j = gi * k + chosen;
            GroupResult {
                tr: tr_all[j * len * 3..(j + 1) * len * 3].to_vec(),
                rot: rot_all[j * len * 9..(j + 1) * len * 9].to_vec(),
                energy: final_u[j],
                log_z: if steered {
                    log_z[gi] + log_mean_exp(lw)
                } else {
                    0.0
                },
                resamplings: resamplings[gi],
            }
        })
        .collect()
}

/// Self-normalised importance weights of returned samples: towards the
/// unsteered ensemble (`unsteered = true`: `Z_hat exp(U)`) or the tilted
/// one (`Z_hat`). Sums to 1.
pub fn reweight(log_z: &[f64], energy: &[f64], unsteered: bool) -> Vec<f64> {
    let lw: Vec<f64> = log_z
        .iter()
        .zip(energy)
        .map(|(z, u)| if unsteered { z + u } else { *z })
        .collect();
    normalised(&lw)
}

/// Kish's effective sample size of normalised weights.
pub fn effective_sample_size(w: &[f64]) -> f64 {
    1.0 / w.iter().map(|x| x * x).sum::<f64>()
}
