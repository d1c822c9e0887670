//! IGSO(3) tables for the rotation part of the DiG sampler.
//!
//! The sampler scales its rotation score by `score_norm(sigma)`, the expected
//! norm of the IGSO(3) score at noise level `sigma`. The published code
//! tabulates it on a grid of 1000 `eps` (log-spaced over `[0.01, 2]`) and
//! 2000 angles `omega_m = pi*m/2000`, from the truncated series (MODEL.md)
//!
//! ```text
//! f(w, eps) = sum_{l<2000} (2l+1) exp(-l(l+1) eps^2) sin((l+1/2) w) / sin(w/2)
//! ```
//!
//! and its `w`-derivative, which takes about four minutes. Two observations
//! make it cheap (about 0.1 s in the unoptimised test build on two cores)
//! without changing the values beyond rounding:
//!
//! * The terms decay like `exp(-l(l+1) eps^2)`, so each `eps` only needs the
//!   `l` with `l(l+1) eps^2 <= 50`: a dropped term is below `e^-50 ~ 2e-22`
//!   of the leading one. The cap `l < 2000` of the spec is kept but never
//!   binds (`eps = 0.01` needs `l <= 706`).
//! * For small `eps` even that is hundreds of terms for each of the 2000
//!   angles. There the series is summed in closed form instead: Poisson
//!   summation over the half-integers `l + 1/2` turns it into a sum of
//!   Gaussians around `w = 2 pi k`, of which at most three matter below
//!   `POISSON_BELOW_EPS = 0.5`. Both forms are the same function; a unit
//!   test below checks they agree (f to 1e-10, score to 1e-9) on both sides
//!   of the switch.
//!
//! Where `f` is below about 1e-9 of its peak (large `omega`, small `eps`),
//! the published direct sum is dominated by its own rounding (~1e-15 of the
//! peak, from cancellation), so its score there is degraded and further out
//! arbitrary; the closed form gives the true value. That region carries no
//! weight in `exp_score_norm`, which is all the sampler reads.

use std::f64::consts::PI;
use std::num::NonZeroUsize;
use std::thread;

/// Number of angles `omega_m = pi*m/N_OMEGA`, `m = 1..=N_OMEGA`.
pub const N_OMEGA: usize = 2000;
/// Number of log-spaced `eps` in `[EPS_MIN, EPS_MAX]`.
pub const N_EPS: usize = 1000;
/// Smallest tabulated `eps` (published `MIN_EPS`).
pub const EPS_MIN: f64 = 0.01;
/// Largest tabulated `eps` (published `MAX_EPS`).
pub const EPS_MAX: f64 = 2.0;
/// The spec's cap on the series index `l`.
const L_CAP: usize = 2000;
/// Terms whose Gaussian factor is below `exp(-EXPONENT_CUTOFF)` are dropped.
const EXPONENT_CUTOFF: f64 = 50.0;
/// Below this `eps` the closed (Poisson-summed) form is used; at and above
/// it the direct series, which then needs at most 14 terms. At this `eps`
/// the closed form needs at most three Gaussians, so neither is costly.
const POISSON_BELOW_EPS: f64 = 0.5;

/// The table the sampler reads, plus the grids it was computed on.
#[derive(Debug, Clone, PartialEq)]
pub struct So3Tables {
    /// `eps_e`, `e = 0..N_EPS`.
    pub eps: Vec<f64>,
    /// `omega_m`, `m = 1..=N_OMEGA`.
    pub omegas: Vec<f64>,
    /// `exp_score_norm(eps_e)`, one per `eps`.
    pub exp_score_norms: Vec<f64>,
}

impl So3Tables {
    /// Computes `exp_score_norm` for every `eps` of the grid.
    pub fn compute() -> Self {
        let grid = OmegaGrid::new();
        let eps = eps_grid();
        let mut exp_score_norms = vec![0.0; N_EPS];
        // The rows are independent and cost about the same each, so equal
        // contiguous chunks keep the available cores evenly busy.
        let workers = thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let chunk = N_EPS.div_ceil(workers);
        thread::scope(|scope| {
            for (norms, eps) in exp_score_norms.chunks_mut(chunk).zip(eps.chunks(chunk)) {
                let grid = &grid;
                scope.spawn(move || {
                    for (norm, &e) in norms.iter_mut().zip(eps) {
                        *norm = expected_score_norm(e, grid);
                    }
                });
            }
        });
        So3Tables {
            eps,
            omegas: grid.omega,
            exp_score_norms,
        }
    }

    /// The published lookup: `exp_score_norms[eps_index(sigma)]`.
    pub fn score_norm(&self, sigma: f64) -> f64 {
        self.exp_score_norms[Self::eps_index(sigma)]
    }

    /// `clip(round((log10 sigma - log10 EPS_MIN) / (log10 EPS_MAX - log10 EPS_MIN) * N_EPS), 0, N_EPS-1)`.
    ///
    /// The published code multiplies by `N_EPS`, not `N_EPS - 1`, so the index
    /// runs up to half a step ahead of the grid (`eps_500` maps to 501) and
    /// `sigma = EPS_MAX` lands on 1000 before clipping; the sampler was run
    /// with that, so it is kept. Rounding is half-to-even like `np.around`.
    /// `sigma <= 0` or NaN maps to 0, as the clipped integer cast does there.
    pub fn eps_index(sigma: f64) -> usize {
        let position = (sigma.log10() - EPS_MIN.log10()) / (EPS_MAX.log10() - EPS_MIN.log10());
        let index = (position * N_EPS as f64).round_ties_even();
        if index.is_nan() {
            0
        } else {
            // In range after the clamp, so the cast is exact.
            index.clamp(0.0, (N_EPS - 1) as f64) as usize
        }
    }
}

/// Full rows for one eps index (for tests/diagnostics): (score over omegas,
/// pdf, cdf), with `cdf = cumsum(pdf) * pi / N_OMEGA` as published.
///
/// # Panics
/// If `eps_index >= N_EPS`.
pub fn row(eps_index: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert!(
        eps_index < N_EPS,
        "eps index {eps_index} out of range 0..{N_EPS}"
    );
    let grid = OmegaGrid::new();
    let kernel = Kernel::new(eps_of(eps_index));
    let (mut score, mut pdf, mut cdf) = (Vec::new(), Vec::new(), Vec::new());
    let mut cumulative = 0.0;
    for m in 0..N_OMEGA {
        let (f, s) = kernel.at(&grid, m);
        let p = f * grid.haar[m];
        cumulative += p;
        score.push(s);
        pdf.push(p);
        cdf.push(cumulative * PI / N_OMEGA as f64);
    }
    (score, pdf, cdf)
}

/// `sqrt(sum_w score^2 pdf / sum_w pdf / pi)` for one `eps`, as published.
fn expected_score_norm(eps: f64, grid: &OmegaGrid) -> f64 {
    let kernel = Kernel::new(eps);
    let mut weighted = 0.0;
    let mut total = 0.0;
    for m in 0..N_OMEGA {
        let (f, score) = kernel.at(grid, m);
        let pdf = f * grid.haar[m];
        weighted += score * score * pdf;
        total += pdf;
    }
    (weighted / total / PI).sqrt()
}

/// `eps_e = 10^(log10 EPS_MIN + e (log10 EPS_MAX - log10 EPS_MIN) / (N_EPS-1))`.
fn eps_of(e: usize) -> f64 {
    let (lo, hi) = (EPS_MIN.log10(), EPS_MAX.log10());
    10f64.powf(lo + e as f64 * (hi - lo) / (N_EPS - 1) as f64)
}

fn eps_grid() -> Vec<f64> {
    (0..N_EPS).map(eps_of).collect()
}

/// The angle-only quantities, computed once and shared by every `eps`.
///
/// The per-angle loops index plain `Vec`s rather than chaining iterators:
/// this crate is built at opt-level 0 in `cargo test`, where every
/// un-inlined `next()` costs more than the arithmetic it drives.
struct OmegaGrid {
    omega: Vec<f64>,
    /// `sin(w/2)`, the denominator `D` of the series.
    half_sin: Vec<f64>,
    /// `cos(w/2)`.
    half_cos: Vec<f64>,
    /// `(sin w, cos w)`: one step of the `(l + 1/2) w` rotation.
    step: Vec<(f64, f64)>,
    /// `cot(w/2) / 2 = d/dw log sin(w/2)`.
    half_cot: Vec<f64>,
    /// `(1 - cos w) / pi`, the Haar measure of the angle; written as
    /// `2 sin^2(w/2) / pi` so it keeps full precision at small `w`.
    haar: Vec<f64>,
}

impl OmegaGrid {
    fn new() -> Self {
        let mut grid = OmegaGrid {
            omega: Vec::with_capacity(N_OMEGA),
            half_sin: Vec::with_capacity(N_OMEGA),
            half_cos: Vec::with_capacity(N_OMEGA),
            step: Vec::with_capacity(N_OMEGA),
            half_cot: Vec::with_capacity(N_OMEGA),
            haar: Vec::with_capacity(N_OMEGA),
        };
        for m in 1..=N_OMEGA {
            let w = PI * m as f64 / N_OMEGA as f64;
            let (half_sin, half_cos) = (w / 2.0).sin_cos();
            grid.omega.push(w);
            grid.half_sin.push(half_sin);
            grid.half_cos.push(half_cos);
            grid.step.push(w.sin_cos());
            grid.half_cot.push(half_cos / (2.0 * half_sin));
            grid.haar.push(2.0 * half_sin * half_sin / PI);
        }
        grid
    }
}

/// The series `f(w, eps)` and its score `d/dw log f` for one `eps`, in the
/// form that converges in few terms there.
enum Kernel {
    /// The spec's series; `coefficient[l] = (2l+1) exp(-l(l+1) eps^2)` for
    /// the `l` with `l(l+1) eps^2 <= EXPONENT_CUTOFF`.
    Series { coefficient: Vec<f64> },
    /// Its Poisson-summed form (see [`Kernel::poisson_at`]).
    Poisson { inv_eps2: f64, prefactor: f64 },
}

impl Kernel {
    fn new(eps: f64) -> Self {
        if eps < POISSON_BELOW_EPS {
            Self::poisson(eps)
        } else {
            Self::series(eps)
        }
    }

    fn series(eps: f64) -> Self {
        let eps2 = eps * eps;
        let mut coefficient = Vec::new();
        let mut l = 0;
        while l < L_CAP && (l * (l + 1)) as f64 * eps2 <= EXPONENT_CUTOFF {
            coefficient.push((2 * l + 1) as f64 * (-((l * (l + 1)) as f64) * eps2).exp());
            l += 1;
        }
        Kernel::Series { coefficient }
    }

    fn poisson(eps: f64) -> Self {
        let inv_eps2 = 1.0 / (eps * eps);
        Kernel::Poisson {
            inv_eps2,
            prefactor: (eps * eps / 4.0).exp() * PI.sqrt() / 2.0 * inv_eps2 / eps,
        }
    }

    /// `(f, score)` at the grid angle `omega[m]`.
    fn at(&self, grid: &OmegaGrid, m: usize) -> (f64, f64) {
        match self {
            Kernel::Series { coefficient } => Self::series_at(coefficient, grid, m),
            Kernel::Poisson {
                inv_eps2,
                prefactor,
            } => Self::poisson_at(*inv_eps2, *prefactor, grid, m),
        }
    }

    /// The truncated series of the spec.
    ///
    /// The score numerator is summed term by term as published,
    /// `D (l+1/2) cos((l+1/2) w) - sin((l+1/2) w) cos(w/2) / 2`: at small `w`
    /// and large `eps` the score is `O(w^3)` while `G/F` and `cot(w/2)/2` are
    /// each `O(1/w)`, so the shorter `G/F - cot(w/2)/2` would lose eight
    /// digits. `sin`/`cos((l+1/2) w)` come from rotating by `w` each step,
    /// accurate to ~1e-16 per step and two libm calls cheaper per term.
    fn series_at(coefficient: &[f64], grid: &OmegaGrid, m: usize) -> (f64, f64) {
        let (d, half_cos) = (grid.half_sin[m], grid.half_cos[m]);
        let (step_sin, step_cos) = grid.step[m];
        // (sin, cos) of (l + 1/2) w, starting at l = 0.
        let (mut s, mut c) = (d, half_cos);
        let mut sum_f = 0.0;
        let mut sum_score = 0.0;
        let mut half_l = 0.5;
        for a in coefficient {
            sum_f += a * s;
            sum_score += a * (d * half_l * c - s * half_cos / 2.0);
            (s, c) = (s * step_cos + c * step_sin, c * step_cos - s * step_sin);
            half_l += 1.0;
        }
        // f = sum_f / D; score = (sum_score / D^2) / f.
        (sum_f / d, sum_score / (d * sum_f))
    }

    /// The Poisson-summed form of the same series.
    ///
    /// With `l(l+1) = (l+1/2)^2 - 1/4` and the summand even in `x = l + 1/2`,
    /// Poisson summation over the half-integers gives the exact identity
    ///
    /// ```text
    /// f(w) sin(w/2) = e^{eps^2/4} sqrt(pi) / (2 eps^3)
    ///                 * sum_k (-1)^k u_k exp(-u_k^2 / (4 eps^2)),   u_k = w - 2 pi k.
    /// ```
    ///
    /// Factoring out `exp(-w^2 / (4 eps^2))` leaves weights
    /// `r_k = exp(-pi k (pi k - w) / eps^2) <= 1` on `0 < w <= pi`, so the
    /// score `d/dw log f = T'/T - cot(w/2)/2` with `T = sum (-1)^k u_k r_k`
    /// and `T' = sum (-1)^k r_k (1 - u_k^2 / (2 eps^2))` is finite
    /// everywhere, also where `f` itself underflows to zero. The spec's cap
    /// `l < 2000` is not visible here; the terms it cuts are below
    /// `exp(-400)` for every tabulated `eps`.
    fn poisson_at(inv_eps2: f64, prefactor: f64, grid: &OmegaGrid, m: usize) -> (f64, f64) {
        let w = grid.omega[m];
        // k = 0 (r_0 = 1), then each side.
        let mut sums = (w, 1.0 - w * w * inv_eps2 / 2.0);
        add_gaussians(w, inv_eps2, 1.0, &mut sums);
        add_gaussians(w, inv_eps2, -1.0, &mut sums);
        let (t, dt) = sums;
        let gaussian = (-w * w * inv_eps2 / 4.0).exp();
        (
            prefactor * gaussian * t / grid.half_sin[m],
            dt / t - grid.half_cot[m],
        )
    }
}

/// Adds the `k = direction, 2 direction, ..` terms to `(T, T')` of
/// [`Kernel::poisson_at`]. The exponent `pi k (pi k - w) / eps^2` grows with
/// `|k|` on either side, so the first term below `e^-EXPONENT_CUTOFF` ends it.
fn add_gaussians(w: f64, inv_eps2: f64, direction: f64, (t, dt): &mut (f64, f64)) {
    let mut k = direction;
    // (-1)^k
    let mut sign = -1.0;
    loop {
        let exponent = PI * k * (PI * k - w) * inv_eps2;
        if exponent > EXPONENT_CUTOFF {
            return;
        }
        let signed_r = sign * (-exponent).exp();
        let u = w - 2.0 * PI * k;
        *t += signed_r * u;
        *dt += signed_r * (1.0 - u * u * inv_eps2 / 2.0);
        k += direction;
        sign = -sign;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed form and the direct series are one function: check them
    /// against each other on both sides of the switch. Compared where the
    /// density is at least 1e-6 of its peak (below that the direct sum is
    /// rounding noise), and the score relative to at least 1e-4 of the row's
    /// largest score (it vanishes at `w = pi` by symmetry). Not at `eps = 2`:
    /// there `T'/T` and `cot(w/2)/2` cancel to about ten digits at small `w`
    /// (the score is 1e-6 relative off), which is why the closed form is only
    /// used below `POISSON_BELOW_EPS`.
    #[test]
    fn poisson_form_equals_direct_series() {
        let grid = OmegaGrid::new();
        for eps in [0.05, 0.1, 0.3, 0.5, 1.0] {
            let (series, poisson) = (Kernel::series(eps), Kernel::poisson(eps));
            let rows: Vec<((f64, f64), (f64, f64))> = (0..N_OMEGA)
                .map(|m| (series.at(&grid, m), poisson.at(&grid, m)))
                .collect();
            let peak = rows.iter().fold(0.0, |a: f64, ((f, _), _)| a.max(*f));
            let score_scale = 1e-4 * rows.iter().fold(0.0, |a: f64, ((_, s), _)| a.max(s.abs()));
            for (m, &((f_series, score_series), (f_poisson, score_poisson))) in
                rows.iter().enumerate()
            {
                if f_series < 1e-6 * peak {
                    continue;
                }
                let rel_f = (f_series - f_poisson).abs() / f_series;
                assert!(rel_f < 1e-10, "f eps={eps} m={m}: rel {rel_f:e}");
                let rel_score =
                    (score_series - score_poisson).abs() / score_series.abs().max(score_scale);
                assert!(
                    rel_score < 1e-9,
                    "score eps={eps} m={m}: {score_series} vs {score_poisson} (rel {rel_score:e})"
                );
            }
        }
    }
}
