//! Reproducible initial states: the starting pose of sample `i` of a job is a
//! pure function of `(seed, i)`, never of a global generator, so a shard
//! re-run after a crash, or the same sample drawn alone or in any batch,
//! starts from identical bytes.
//!
//! The exact recipe (part of the on-disk contract; changing it changes
//! every seed's samples):
//! 1. A ChaCha20 stream keyed by `seed` (`ChaCha20Rng::seed_from_u64`) with
//!    stream number `i` (`set_stream(i)`): counter-based, so sample `i` needs
//!    no draws of samples `0..i`.
//! 2. Uniform doubles `u = next_u64 >> 11` scaled by `2^-53`, in `[0, 1)`.
//! 3. Translations first: `3L` standard normals by Box–Muller on pairs
//!    `(u1, u2)`: `r = sqrt(-2 ln(1 - u1))`, `z0 = r cos(2 pi u2)`,
//!    `z1 = r sin(2 pi u2)`, filled residue by residue (x, y, z), times
//!    `tr_sigma_max`.
//! 4. Then rotations: per residue three uniforms `(u1, u2, u3)` give
//!    Shoemake's uniform unit quaternion `(w, x, y, z) = (sqrt(1-u1) sin 2 pi u2,
//!    sqrt(1-u1) cos 2 pi u2, sqrt(u1) sin 2 pi u3, sqrt(u1) cos 2 pi u3)`,
//!    turned into a rotation matrix (uniform on SO(3)).
//!
//! Everything is computed in f64 and stored as f32.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The starting pose of one sample: `tr (L, 3)` and `rot (L, 3, 3)`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialState {
    pub tr: Vec<f32>,
    pub rot: Vec<f32>,
}

/// A uniform double in `[0, 1)`: `(next_u64 >> 11) * 2^-53`.
pub fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `n` standard normals by Box-Muller on pairs of [`uniform`]s, as the
/// initial translations are drawn (`r = sqrt(-2 ln(1 - u1))`, `r cos(2 pi u2)`
/// then `r sin(2 pi u2)`); an odd `n` drops the last of its pair.
pub fn standard_normals(rng: &mut ChaCha20Rng, n: usize) -> Vec<f64> {
    let two_pi = 2.0 * std::f64::consts::PI;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(rng), uniform(rng));
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        out.push(r * (two_pi * u2).cos());
        out.push(r * (two_pi * u2).sin());
    }
    out.truncate(n);
    out
}

/// Rotation matrix of a unit quaternion `(w, x, y, z)`, row-major.
pub fn quaternion_to_matrix([w, x, y, z]: [f64; 4]) -> [f64; 9] {
    [
        1.0 - 2.0 * (y * y + z * z),
        2.0 * (x * y - z * w),
        2.0 * (x * z + y * w),
        2.0 * (x * y + z * w),
        1.0 - 2.0 * (x * x + z * z),
        2.0 * (y * z - x * w),
        2.0 * (x * z - y * w),
        2.0 * (y * z + x * w),
        1.0 - 2.0 * (x * x + y * y),
    ]
}

/// The initial state of sample `index` under `seed` for a protein of `len` residues.
pub fn initial_state(seed: u64, index: u64, len: usize, tr_sigma_max: f64) -> InitialState {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(index);
    initial_state_from(&mut rng, len, tr_sigma_max)
}

/// Steps 2-4 of the recipe on a given stream (the particles of a steered
/// group draw their own, `sampling::noise`).
pub fn initial_state_from(rng: &mut ChaCha20Rng, len: usize, tr_sigma_max: f64) -> InitialState {
    let two_pi = 2.0 * std::f64::consts::PI;
    let tr = standard_normals(rng, 3 * len)
        .into_iter()
        .map(|z| (z * tr_sigma_max) as f32)
        .collect();
    let mut rot = Vec::with_capacity(9 * len);
    for _ in 0..len {
        let (u1, u2, u3) = (uniform(rng), uniform(rng), uniform(rng));
        let (a, b) = ((1.0 - u1).sqrt(), u1.sqrt());
        let q = [
            a * (two_pi * u2).sin(),
            a * (two_pi * u2).cos(),
            b * (two_pi * u3).sin(),
            b * (two_pi * u3).cos(),
        ];
        rot.extend(quaternion_to_matrix(q).iter().map(|&v| v as f32));
    }
    InitialState { tr, rot }
}
