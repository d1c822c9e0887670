//! The published DiG training loss (`MainModel.forward` with `compute_loss`)
//! and what it needs: residue frames from backbone atoms, IGSO(3) angle
//! draws by inverse CDF, the noise of one training batch, and a plain Adam
//! whose state can be saved and restored bit for bit.
//!
//! `../shared/TRAINING.md` is the specification; `fixtures/dig-small/train.npz`
//! and `igso3_sample.npz` hold the published code's values, and the tests
//! compare against them.

use std::collections::HashMap;

use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::network::ScoreNetwork;
use crate::sampling::expmap;
use crate::sampling::schedule::sigma;
use crate::so3::{self, So3Tables};
use crate::{ModelError, Result};

/// Dropout probability of the published modules in training mode.
pub const DROPOUT: f64 = 0.1;

/// Frame `(T, R)` of one residue from its N, CA, C atoms (Å), before centring:
/// `T = CA`; `R` has rows `x, y, z` (TRAINING.md). `None` for a degenerate
/// residue (coincident atoms or collinear N-CA-C).
pub fn residue_frame(n: [f64; 3], ca: [f64; 3], c: [f64; 3]) -> Option<[f64; 9]> {
    let sub = |a: [f64; 3], b: [f64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let norm = |a: [f64; 3]| dot(a, a).sqrt();
    let p1 = sub(n, ca);
    let n1 = norm(p1);
    let p2 = sub(c, n);
    let denom = -dot(p1, p2);
    if n1 < 1e-6 || denom.abs() < 1e-12 {
        return None;
    }
    let x = [p1[0] / n1, p1[1] / n1, p1[2] / n1];
    let alpha = dot(p1, p1) / denom;
    let y = [
        alpha * p2[0] + p1[0],
        alpha * p2[1] + p1[1],
        alpha * p2[2] + p1[2],
    ];
    let ny = norm(y);
    if ny < 1e-6 || !ny.is_finite() {
        return None;
    }
    let y = [y[0] / ny, y[1] / ny, y[2] / ny];
    let z = [
        x[1] * y[2] - x[2] * y[1],
        x[2] * y[0] - x[0] * y[2],
        x[0] * y[1] - x[1] * y[0],
    ];
    Some([x[0], x[1], x[2], y[0], y[1], y[2], z[0], z[1], z[2]])
}

/// Frames of one structure: `tr (L*3)` centred per axis on the mean CA,
/// `rot (L*9)` row-major. `atoms[i] = [N, CA, C]` of residue `i`.
pub fn frames(atoms: &[[[f64; 3]; 3]]) -> std::result::Result<(Vec<f32>, Vec<f32>), String> {
    let l = atoms.len();
    if l == 0 {
        return Err("no residues".into());
    }
    let mut centre = [0.0f64; 3];
    for a in atoms {
        for (k, c) in centre.iter_mut().enumerate() {
            *c += a[1][k] / l as f64;
        }
    }
    let mut tr = Vec::with_capacity(3 * l);
    let mut rot = Vec::with_capacity(9 * l);
    for (i, a) in atoms.iter().enumerate() {
        let r = residue_frame(a[0], a[1], a[2]).ok_or_else(|| {
            format!(
                "residue {} has degenerate backbone geometry (N, CA, C coincide or are collinear)",
                i + 1
            )
        })?;
        tr.extend((0..3).map(|k| (a[1][k] - centre[k]) as f32));
        rot.extend(r.iter().map(|&v| v as f32));
    }
    Ok((tr, rot))
}

/// `np.interp(x, xp, fp)` for increasing `xp`: clamps outside the range.
pub fn interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    let n = xp.len();
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= xp[0] {
        return fp[0];
    }
    if x >= xp[n - 1] {
        return fp[n - 1];
    }
    // Largest j with xp[j] <= x (x < xp[n-1], so j < n-1).
    let j = xp.partition_point(|&v| v <= x) - 1;
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    slope * (x - xp[j]) + fp[j]
}

/// IGSO(3) tables for training: `score_norm` per `eps` and, per `eps` row
/// as it is first needed, the score and CDF over the 2000 angles.
pub struct Igso3 {
    tables: So3Tables,
    rows: HashMap<usize, (Vec<f64>, Vec<f64>)>,
}

impl Igso3 {
    pub fn new() -> Self {
        Igso3 {
            tables: So3Tables::compute(),
            rows: HashMap::new(),
        }
    }

    pub fn tables(&self) -> &So3Tables {
        &self.tables
    }

    /// `(score, cdf)` of the row the published lookup picks for `sigma`,
    /// computed on first use; borrowed from the cache, never copied.
    fn row(rows: &mut HashMap<usize, (Vec<f64>, Vec<f64>)>, sigma: f64) -> &(Vec<f64>, Vec<f64>) {
        let e = So3Tables::eps_index(sigma);
        rows.entry(e).or_insert_with(|| {
            let (score, _pdf, cdf) = so3::row(e);
            (score, cdf)
        })
    }

    /// Angle of a rotation drawn from IGSO(3) at `sigma`, by inverse CDF of `u`.
    pub fn sample_angle(&mut self, sigma: f64, u: f64) -> f64 {
        let (_, cdf) = Self::row(&mut self.rows, sigma);
        interp(u, cdf, &self.tables.omegas)
    }

    /// `d/dw log f` at angle `omega` (interpolated on the table).
    pub fn score(&mut self, omega: f64, sigma: f64) -> f64 {
        let (score, _) = Self::row(&mut self.rows, sigma);
        interp(omega, &self.tables.omegas, score)
    }

    /// `exp_score_norm` at `sigma` (the sampler's lookup).
    pub fn score_norm(&self, sigma: f64) -> f64 {
        self.tables.score_norm(sigma)
    }

    /// The IGSO(3) density of the rotation angle at `sigma`, on the grid:
    /// `(omegas, cdf)`, for tests and diagnostics.
    pub fn cdf(&mut self, sigma: f64) -> (Vec<f64>, Vec<f64>) {
        let omegas = self.tables.omegas.clone();
        (omegas, Self::row(&mut self.rows, sigma).1.clone())
    }
}

impl Default for Igso3 {
    fn default() -> Self {
        Self::new()
    }
}

/// `sigma_tr(t)` and `sigma_rot(t)` of step `k`, `t = 1 - k/n`.
pub fn sigmas(cfg: &ModelConfig, k: i64) -> (f64, f64) {
    let t = 1.0 - k as f64 / cfg.n_time_step as f64;
    (
        sigma(cfg.tr_sigma_min, cfg.tr_sigma_max, t),
        sigma(cfg.rot_sigma_min, cfg.rot_sigma_max, t),
    )
}

/// The random draws of one training batch.
#[derive(Debug)]
pub struct Noise {
    /// Diffusion step per batch element, `(B,)`.
    pub steps: Vec<i64>,
    /// Translation noise `z ~ N(0, sigma_tr^2)`, `(B, L, 3)` flattened.
    pub tr: Vec<f32>,
    /// Rotation noise as axis-angle vectors `v = axis * omega`, `(B, L, 3)`.
    pub rot: Vec<f32>,
}

fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn normal_pair(rng: &mut ChaCha20Rng) -> (f64, f64) {
    let (u1, u2) = (uniform(rng), uniform(rng));
    let r = (-2.0 * (1.0 - u1).ln()).sqrt();
    let a = 2.0 * std::f64::consts::PI * u2;
    (r * a.cos(), r * a.sin())
}

impl Noise {
    /// Draws the noise of a batch of `b` (even) structures of `l` residues
    /// from `rng`: mirrored steps, Gaussian translations, IGSO(3) rotations.
    pub fn draw(
        rng: &mut ChaCha20Rng,
        b: usize,
        l: usize,
        cfg: &ModelConfig,
        igso: &mut Igso3,
    ) -> Result<Noise> {
        if b == 0 || !b.is_multiple_of(2) {
            return Err(ModelError::Invalid(format!(
                "the batch size must be even (mirrored time steps come in pairs), got {b}"
            )));
        }
        let n = cfg.n_time_step;
        let half: Vec<i64> = (0..b / 2)
            .map(|_| ((uniform(rng) * n as f64) as i64).min(n - 1))
            .collect();
        let steps: Vec<i64> = half
            .iter()
            .copied()
            .chain(half.iter().map(|k| n - 1 - k))
            .collect();
        Self::at_steps(rng, steps, l, cfg, igso)
    }

    /// [`Noise::draw`] with the time steps drawn by `weighting` instead of
    /// in mirrored pairs (each of the `b` independently; any `b >= 1`).
    pub fn draw_weighted(
        rng: &mut ChaCha20Rng,
        b: usize,
        l: usize,
        cfg: &ModelConfig,
        igso: &mut Igso3,
        weighting: &TimeWeighting,
    ) -> Result<Noise> {
        let n = cfg.n_time_step;
        let steps = (0..b).map(|_| weighting.draw(rng, n)).collect();
        Self::at_steps(rng, steps, l, cfg, igso)
    }

    /// The noise of structures at the given time `steps`.
    fn at_steps(
        rng: &mut ChaCha20Rng,
        steps: Vec<i64>,
        l: usize,
        cfg: &ModelConfig,
        igso: &mut Igso3,
    ) -> Result<Noise> {
        let b = steps.len();
        let mut tr = Vec::with_capacity(b * l * 3);
        let mut rot = Vec::with_capacity(b * l * 3);
        for &k in &steps {
            let (s_tr, s_rot) = sigmas(cfg, k);
            for _ in 0..l {
                let (a, bb) = normal_pair(rng);
                let (c, _) = normal_pair(rng);
                tr.extend([(a * s_tr) as f32, (bb * s_tr) as f32, (c * s_tr) as f32]);
            }
            for _ in 0..l {
                let (a, bb) = normal_pair(rng);
                let (c, _) = normal_pair(rng);
                let norm = (a * a + bb * bb + c * c).sqrt().max(1e-12);
                let omega = igso.sample_angle(s_rot, uniform(rng));
                rot.extend([a, bb, c].map(|v| (v / norm * omega) as f32));
            }
        }
        Ok(Noise { steps, tr, rot })
    }
}

/// Training time steps weighted towards high noise (not published: the
/// published loader draws `t` uniformly): steps whose time `t = 1 - k/n` is
/// at least `from` are drawn `weight` times as often per step as the others.
/// Every step keeps a positive probability, so the loss still has the score
/// as its minimiser at every `t`; only the model's effort moves.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimeWeighting {
    pub from: f64,
    pub weight: f64,
}

impl TimeWeighting {
    /// Steps `0..high` have `t >= from` (of `n`).
    pub fn high_steps(&self, n: i64) -> i64 {
        (0..n)
            .filter(|&k| 1.0 - k as f64 / n as f64 >= self.from - 1e-12)
            .count() as i64
    }

    /// The probability that a drawn step has `t >= from`.
    pub fn high_probability(&self, n: i64) -> f64 {
        let h = self.high_steps(n) as f64;
        let rest = n as f64 - h;
        self.weight * h / (self.weight * h + rest)
    }

    /// One step in `0..n`.
    pub fn draw(&self, rng: &mut ChaCha20Rng, n: i64) -> i64 {
        let h = self.high_steps(n);
        let pick = |u: f64, lo: i64, hi: i64| (lo + (u * (hi - lo) as f64) as i64).min(hi - 1);
        let (region, u) = (uniform(rng), uniform(rng));
        if h == n || (h > 0 && region < self.high_probability(n)) {
            pick(u, 0, h)
        } else {
            pick(u, h, n)
        }
    }
}

/// A batch of structures of one protein crop: `tr (B, L, 3)`,
/// `rot (B, L, 3, 3)`, `mask (B, L)` (true = padded; padded entries of `tr`
/// and `rot` may hold anything, NaN included).
pub struct Batch {
    pub tr: Tensor,
    pub rot: Tensor,
    pub mask: Tensor,
}

/// The loss and everything it was computed from.
pub struct LossParts {
    pub loss: Tensor,
    pub tr_loss: Tensor,
    pub rot_loss: Tensor,
    pub tr_sigma: Tensor,
    pub rot_sigma: Tensor,
    pub rot_noise_mat: Tensor,
    pub rot_score: Tensor,
    pub rot_score_norm: Tensor,
    pub tr_pert: Tensor,
    pub rot_pert: Tensor,
    pub pred_tr: Tensor,
    pub pred_rot: Tensor,
}

/// The published loss of one batch: perturb by `noise`, call the network,
/// mean squared error against the score targets over all `B*L*3` entries
/// (padded entries zero, still in the denominator). `dropout`: `Some(p)` in
/// training mode.
pub fn diffusion_loss(
    net: &ScoreNetwork,
    single: &Tensor,
    pair: &Tensor,
    batch: &Batch,
    noise: &Noise,
    igso: &mut Igso3,
    dropout: Option<f64>,
) -> LossParts {
    diffusion_loss_with(net, single, pair, batch, noise, igso, dropout, None)
}

/// Score targets in place of the noise's own: called per example with its
/// diffusion time, perturbed pose `tr (1, L, 3)`, `rot (1, L, 3, 3)` and
/// noise levels; `Some((s_T, s_R))` (each `(1, L, 3)`, the sampler's
/// convention) replaces that example's targets.
pub type TargetFn<'a> = dyn FnMut(f64, &Tensor, &Tensor, f64, f64) -> Option<(Tensor, Tensor)> + 'a;

/// [`diffusion_loss`] with the targets of some examples given by `targets`
/// (`digctl train --exact-target-above`).
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss_with(
    net: &ScoreNetwork,
    single: &Tensor,
    pair: &Tensor,
    batch: &Batch,
    noise: &Noise,
    igso: &mut Igso3,
    dropout: Option<f64>,
    targets: Option<&mut TargetFn<'_>>,
) -> LossParts {
    let cfg = net.config();
    let dev = batch.tr.device();
    let (b, l, _) = batch.tr.size3().expect("tr (B, L, 3)");
    let f32s = |v: Vec<f64>| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>());
    let (s_tr, s_rot): (Vec<f64>, Vec<f64>) = noise.steps.iter().map(|&k| sigmas(cfg, k)).unzip();
    let norms: Vec<f64> = s_rot.iter().map(|&s| igso.score_norm(s)).collect();
    // Score of each rotation draw: score(omega) * v / omega.
    let mut score = Vec::with_capacity(noise.rot.len());
    for (i, v) in noise.rot.chunks_exact(3).enumerate() {
        let sigma = s_rot[i / l as usize];
        let v = [v[0] as f64, v[1] as f64, v[2] as f64];
        let omega = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        let s = if omega > 0.0 {
            igso.score(omega, sigma) / omega
        } else {
            0.0
        };
        score.extend(v.map(|x| (x * s) as f32));
    }
    let tr_sigma = f32s(s_tr).to_device(dev);
    let rot_sigma = f32s(s_rot).to_device(dev);
    let rot_score_norm = f32s(norms).to_device(dev);
    let rot_score = Tensor::from_slice(&score).view([b, l, 3]).to_device(dev);
    let z = Tensor::from_slice(&noise.tr).view([b, l, 3]).to_device(dev);
    let v = Tensor::from_slice(&noise.rot)
        .view([b, l, 3])
        .to_device(dev);

    let pad = batch.mask.unsqueeze(-1); // (B, L, 1)
    let rot_noise_mat = expmap(&v);
    let tr_pert = (&batch.tr + &z).masked_fill(&pad, 0.0);
    let rot_pert = rot_noise_mat
        .matmul(&batch.rot)
        .masked_fill(&pad.unsqueeze(-1), 0.0);
    let tr_target = (-&z / tr_sigma.view([b, 1, 1])).masked_fill(&pad, 0.0);
    let rot_target = (&rot_score / rot_score_norm.view([b, 1, 1])).masked_fill(&pad, 0.0);
    if let Some(f) = targets {
        let _guard = tch::no_grad_guard();
        let n = cfg.n_time_step as f64;
        for (i, &k) in noise.steps.iter().enumerate() {
            let i64_ = i as i64;
            let padded = batch.mask.get(i64_).any().int64_value(&[]) != 0;
            if padded {
                continue;
            }
            let (st, sr) = sigmas(cfg, k);
            let t = 1.0 - k as f64 / n;
            if let Some((s_t, s_r)) = f(
                t,
                &tr_pert.narrow(0, i64_, 1),
                &rot_pert.narrow(0, i64_, 1),
                st,
                sr,
            ) {
                tr_target.narrow(0, i64_, 1).copy_(&(s_t * st));
                rot_target
                    .narrow(0, i64_, 1)
                    .copy_(&(s_r / igso.score_norm(sr)));
            }
        }
    }
    let step = Tensor::from_slice(&noise.steps).to_device(dev);
    let (pred_tr, pred_rot) = net.forward_train(
        single,
        pair,
        &tr_pert,
        &rot_pert,
        Some(&batch.mask),
        &step,
        dropout,
    );
    let pred_tr = pred_tr.masked_fill(&pad, 0.0);
    let pred_rot = pred_rot.masked_fill(&pad, 0.0);
    let tr_loss = (&pred_tr - tr_target).square().mean(Kind::Float);
    let rot_loss = (&pred_rot - rot_target).square().mean(Kind::Float);
    LossParts {
        loss: &tr_loss + &rot_loss,
        tr_loss,
        rot_loss,
        tr_sigma,
        rot_sigma,
        rot_noise_mat,
        rot_score,
        rot_score_norm,
        tr_pert,
        rot_pert,
        pred_tr,
        pred_rot,
    }
}

/// Adam (Kingma & Ba) over named parameters, with its moments kept as named
/// tensors so that a checkpoint restores it exactly.
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates done so far (bias correction).
    pub t: i64,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    /// `params`: the trainable tensors (sorted by name for a stable order).
    pub fn new(mut params: Vec<(String, Tensor)>) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 0,
            params,
            m,
            v,
        }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Global gradient norm, and the factor applied to clip it to `max_norm`.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let sq: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.square().sum(Kind::Double))
            .collect();
        if sq.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&sq, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let f = max_norm / (total + 1e-6);
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(f);
                }
            }
        }
        total
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for ((_, p), (m, v)) in self
            .params
            .iter_mut()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
        {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = if self.weight_decay > 0.0 {
                &g + &*p * self.weight_decay
            } else {
                g
            };
            let _ = m.g_mul_scalar_(self.beta1);
            let _ = m.g_add_(&(&g * (1.0 - self.beta1)));
            let _ = v.g_mul_scalar_(self.beta2);
            let _ = v.g_add_(&(g.square() * (1.0 - self.beta2)));
            let denom = (&*v / bc2).sqrt() + self.eps;
            let _ = p.g_sub_(&((&*m / &denom) * (lr / bc1)));
        }
    }

    /// The moments as named tensors (`adam.m.<key>`, `adam.v.<key>`), on the CPU.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("adam.m.{name}"), m.to_device(Device::Cpu)));
            out.push((format!("adam.v.{name}"), v.to_device(Device::Cpu)));
        }
        out
    }

    /// Restores the moments written by [`state`](Self::state) and the update count.
    pub fn load_state(&mut self, named: &HashMap<String, Tensor>, t: i64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for ((name, p), (m, v)) in self
            .params
            .iter()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
        {
            for (prefix, dst) in [("adam.m.", &mut *m), ("adam.v.", &mut *v)] {
                let key = format!("{prefix}{name}");
                let src = named.get(&key).ok_or_else(|| {
                    ModelError::Checkpoint(format!("optimizer state has no {key}"))
                })?;
                if src.size() != p.size() {
                    return Err(ModelError::Checkpoint(format!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        src.size(),
                        p.size()
                    )));
                }
                dst.copy_(src);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Exponential moving average of named parameters (the weights diffusion
/// models are usually sampled from): after every update,
/// `shadow <- decay * shadow + (1 - decay) * param`, starting from the
/// weights the run starts with. After `n` updates of weights `w_1 .. w_n`
/// from `w_0`, `shadow = decay^n w_0 + sum_k (1 - decay) decay^(n-k) w_k`.
pub struct Ema {
    pub decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// A shadow copy of `params` (sorted by name for a stable order).
    pub fn new(decay: f64, params: &[(String, Tensor)]) -> Result<Self> {
        if !(decay > 0.0 && decay < 1.0) {
            return Err(ModelError::Invalid(format!(
                "--ema must be in (0, 1), got {decay}"
            )));
        }
        let _guard = tch::no_grad_guard();
        let mut shadow: Vec<(String, Tensor)> = params
            .iter()
            .map(|(k, p)| (k.clone(), p.detach().copy()))
            .collect();
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Ema { decay, shadow })
    }

    /// One update towards `params` (same names as at creation).
    pub fn update(&mut self, params: &[(String, Tensor)]) {
        let _guard = tch::no_grad_guard();
        for ((ks, s), (kp, p)) in self.shadow.iter_mut().zip(params) {
            debug_assert_eq!(ks, kp);
            let _ = s.g_mul_scalar_(self.decay);
            let _ = s.g_add_(&(p.detach() * (1.0 - self.decay)));
        }
    }

    /// The averaged weights, under the parameters' names.
    pub fn weights(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// The shadow as named tensors (`ema.<key>`), on the CPU, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(k, t)| (format!("ema.{k}"), t.to_device(Device::Cpu)))
            .collect()
    }

    /// Restores the shadow written by [`state`](Self::state).
    pub fn load_state(&mut self, named: &HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, s) in &mut self.shadow {
            let key = format!("ema.{name}");
            let src = named.get(&key).ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "the checkpoint has no {key}: it was written without --ema"
                ))
            })?;
            if src.size() != s.size() {
                return Err(ModelError::Checkpoint(format!(
                    "{key} has shape {:?}, the parameter {:?}",
                    src.size(),
                    s.size()
                )));
            }
            s.copy_(src);
        }
        Ok(())
    }

    /// Swaps the averaged weights into `params` and the params' weights into
    /// the shadow (twice: back as before), so a loss can be measured with
    /// the averaged weights without copying the model.
    pub fn swap_into(&mut self, params: &[(String, Tensor)]) {
        let _guard = tch::no_grad_guard();
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            let tmp = p.detach().copy();
            let mut p = p.shallow_clone();
            p.copy_(s);
            s.copy_(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_the_average_of_a_known_sequence_of_weights() {
        // w_0 = 1 (start), then w_k = k for k = 1..=5, decay 0.9:
        // shadow = 0.9^5 * 1 + sum_k 0.1 * 0.9^(5-k) * k.
        let p = Tensor::from_slice(&[1.0f64, -2.0]);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let mut ema = Ema::new(0.9, &params).unwrap();
        let mut want = [1.0f64, -2.0];
        for k in 1..=5 {
            let mut q = p.shallow_clone();
            q.copy_(&Tensor::from_slice(&[k as f64, 10.0 * k as f64]));
            ema.update(&params);
            want[0] = 0.9 * want[0] + 0.1 * k as f64;
            want[1] = 0.9 * want[1] + 0.1 * (10.0 * k as f64);
        }
        let closed = 0.9f64.powi(5)
            + (1..=5)
                .map(|k| 0.1 * 0.9f64.powi(5 - k) * k as f64)
                .sum::<f64>();
        assert!((want[0] - closed).abs() < 1e-12);
        let got: Vec<f64> = Vec::try_from(&ema.weights()[0].1).unwrap();
        assert!((got[0] - closed).abs() < 1e-12, "{got:?} vs {closed}");
        assert!((got[1] - want[1]).abs() < 1e-12, "{got:?} vs {want:?}");
        // The parameter itself holds the last weights, untouched.
        assert_eq!(Vec::<f64>::try_from(&p).unwrap(), vec![5.0, 50.0]);
        // Swapping twice leaves both sets as they were, bit for bit.
        ema.swap_into(&params);
        assert_eq!(Vec::<f64>::try_from(&p).unwrap(), got);
        ema.swap_into(&params);
        assert_eq!(Vec::<f64>::try_from(&p).unwrap(), vec![5.0, 50.0]);
        assert_eq!(Vec::<f64>::try_from(&ema.weights()[0].1).unwrap(), got);
        assert!(Ema::new(1.0, &params).is_err());
        assert!(Ema::new(0.0, &params).is_err());
    }

    #[test]
    fn interp_matches_numpy_semantics() {
        let xp = [0.0, 1.0, 2.0];
        let fp = [10.0, 20.0, 40.0];
        assert_eq!(interp(-1.0, &xp, &fp), 10.0);
        assert_eq!(interp(0.5, &xp, &fp), 15.0);
        assert_eq!(interp(1.5, &xp, &fp), 30.0);
        assert_eq!(interp(2.0, &xp, &fp), 40.0);
        assert_eq!(interp(3.0, &xp, &fp), 40.0);
    }

    #[test]
    fn frame_rebuilds_n_direction_and_ca() {
        let n = [1.0, 2.0, 3.0];
        let ca = [2.2, 2.5, 3.1];
        let c = [3.0, 3.7, 2.6];
        let r = residue_frame(n, ca, c).unwrap();
        // Orthonormal with det +1.
        let row = |i: usize| [r[3 * i], r[3 * i + 1], r[3 * i + 2]];
        let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
        for i in 0..3 {
            for j in 0..3 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot(row(i), row(j)) - want).abs() < 1e-12);
            }
        }
        // x points from CA to N.
        let p1 = [n[0] - ca[0], n[1] - ca[1], n[2] - ca[2]];
        let len = dot(p1, p1).sqrt();
        assert!((dot(row(0), p1) - len).abs() < 1e-12);
        // C lies in the x-y plane.
        let pc = [c[0] - ca[0], c[1] - ca[1], c[2] - ca[2]];
        assert!(dot(row(2), pc).abs() < 1e-12);
        assert!(residue_frame(n, n, c).is_none());
    }
}
