//! The stochastic variant of the sampler: the reverse SDE of the published
//! diffusion, integrated by Euler-Maruyama, and the per-sample random
//! streams its noise comes from.
//!
//! # The update
//! The published forward process perturbs translations by `sigma_tr(t) z`
//! (variance `sigma_tr^2`, so `d(sigma_tr^2)/dt = g_T^2` with
//! `g_T = sigma_tr sqrt(2 ln(tr_max/tr_min))`) and rotations by IGSO(3) of
//! parameter `sigma_rot`, whose density `sum (2l+1) exp(-l(l+1) eps^2) chi_l`
//! is the heat kernel of Brownian motion on SO(3) at time `2 sigma_rot^2`
//! (axis-angle increments of covariance `dt I_3`), so `g_R^2 = d(2
//! sigma_rot^2)/dt = 4 sigma_rot^2 ln(rot_max/rot_min)`: exactly the
//! published `g_R = 2 sigma_rot sqrt(ln(rot_max/rot_min))`. The published
//! deterministic update `T + g_T^2 dt s_T`, `expmap(g_R^2 dt s_R) R` is
//! therefore the drift of the reverse SDE without its noise. The stochastic
//! update of step `k` (from `t_k` to `t_k - dt`) adds that noise, scaled by
//! a factor `eta` (the job's `noise`):
//!
//! ```text
//! T <- T + g_T^2 dt s_T + eta g_T sqrt(dt) z_T
//! R <- expmap(g_R^2 dt s_R + eta g_R sqrt(dt) z_R) R      (space frame, as published)
//! ```
//!
//! with `z_T, z_R ~ N(0, I_3)` per residue. `eta = 1` is the reverse SDE
//! (Euler-Maruyama); `eta = 0` gives back the published update bit for bit.
//! With re-spaced steps `g^2 dt` is the step's `tr_gain`/`rot_gain` and the
//! noise scale is its square root. Only the Euler schedule has a stochastic
//! form here (`exp`, `heun` and `ab2` integrate the deterministic ODE).
//!
//! # Random streams (part of the on-disk contract)
//! * Noise and resampling draws of sample (group) `i`: a ChaCha20 stream
//!   keyed by the 32 bytes `seed (u64 LE) | "dignoise" | 0 (u64) | 0 (u64)`
//!   with stream number `i`. Per step, in this order: the translation
//!   normals of particle 0 (`3L`, residue by residue, x y z), its rotation
//!   normals (`3L`), then particle 1's, and so on; then the resampling
//!   uniform of the group when it resamples. Normals by
//!   [`standard_normals`](crate::rng::standard_normals).
//! * Initial pose of particle `p` of group `i`: particle 0 starts where the
//!   unsteered sample `i` starts ([`initial_state`]`(seed, i)`); particle
//!   `p >= 1` from [`initial_state`] with the ChaCha20 key
//!   `seed (u64 LE) | "digpartc" | p (u64 LE) | 0 (u64)` and stream `i`.
//!
//! So sample `i` is a pure function of (model, features, seed, i, settings),
//! whatever batch, shard or worker draws it.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Tensor};

use super::schedule::StepPlan;
use super::solvers::expmap;
use crate::rng::{initial_state, standard_normals, InitialState};

fn keyed(seed: u64, tag: &[u8; 8], word: u64, stream: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(tag);
    key[16..24].copy_from_slice(&word.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// The noise (and resampling) stream of sample `index` under `seed`.
pub fn noise_stream(seed: u64, index: u64) -> ChaCha20Rng {
    keyed(seed, b"dignoise", 0, index)
}

/// The initial pose of particle `particle` of sample `index`'s group.
pub fn particle_initial_state(
    seed: u64,
    index: u64,
    particle: u64,
    len: usize,
    tr_sigma_max: f64,
) -> InitialState {
    if particle == 0 {
        return initial_state(seed, index, len, tr_sigma_max);
    }
    // initial_state keys its stream by seed_from_u64(seed); a particle's
    // stream is keyed by 32 bytes of its own, drawn through the same recipe.
    let mut rng = keyed(seed, b"digpartc", particle, index);
    crate::rng::initial_state_from(&mut rng, len, tr_sigma_max)
}

/// Standard normals for one step of `particles` particles of `len`
/// residues from one group's stream: `(z_T, z_R)`, each `particles * len * 3`.
pub fn step_normals(rng: &mut ChaCha20Rng, particles: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let n = 3 * len;
    let (mut z_tr, mut z_rot) = (
        Vec::with_capacity(particles * n),
        Vec::with_capacity(particles * n),
    );
    for _ in 0..particles {
        z_tr.extend(standard_normals(rng, n).into_iter().map(|v| v as f32));
        z_rot.extend(standard_normals(rng, n).into_iter().map(|v| v as f32));
    }
    (z_tr, z_rot)
}

/// The stochastic update of one step on a batch `tr (P, L, 3)`, `rot (P, L,
/// 3, 3)` with scores `s_tr`, `s_rot` and normals `z_tr`, `z_rot` (`(P, L,
/// 3)`, on any device); `eta = 0` is the published update.
pub fn sde_update(
    tr: &Tensor,
    rot: &Tensor,
    (s_tr, s_rot): (&Tensor, &Tensor),
    plan: &StepPlan,
    eta: f64,
    noise: Option<(&Tensor, &Tensor)>,
) -> (Tensor, Tensor) {
    match noise {
        Some((z_tr, z_rot)) if eta > 0.0 => {
            let tr = tr + s_tr * plan.tr_gain + z_tr * (eta * plan.tr_gain.sqrt());
            let v = s_rot * plan.rot_gain + z_rot * (eta * plan.rot_gain.sqrt());
            (tr, expmap(&v).matmul(rot))
        }
        _ => {
            let tr = tr + s_tr * plan.tr_gain;
            (tr, expmap(&(s_rot * plan.rot_gain)).matmul(rot))
        }
    }
}

/// `(P, L, 3)` float32 tensor on `device` from a flat vector.
pub fn tensor3(v: &[f32], p: usize, len: usize, device: Device) -> Tensor {
    Tensor::from_slice(v)
        .view([p as i64, len as i64, 3])
        .to_device(device)
}
