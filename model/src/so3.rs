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
//! make it cheap (a few tens of milliseconds here) without changing the
//! values beyond rounding:
//!
//! * The terms decay like `exp(-l(l+1) eps^2)`, so each `eps` only needs the
//!   `l` with `l(l+1) eps^2 <= 50`: a dropped term is below `e^-50 ~ 2e-22`
//!   of the leading one. The cap `l < 2000` of the spec is kept but never
//!   binds (`eps = 0.01` needs `l <= 706`).
//! * For small `eps` even that is hundreds of terms for each of the 2000
//!   angles. There the series is summed in closed form instead: Poisson
//!   summation over the half-integers `l + 1/2` turns it into a sum of
//!   Gaussians around `w = 2 pi k` (see [`poisson_row`]), of which at most
//!   three matter below [`POISSON_BELOW_EPS`]. Both forms are the same
//!   function; a unit test below checks they agree to 1e-12.
//!
//! Where the density is below about `1e-12` of its peak (large `omega`,
//! small `eps`) the published direct sum is dominated by cancellation noise,
//! so its score there is arbitrary; the closed form gives the true value.
//! That region carries no weight in `exp_score_norm`, which is all the
//! sampler reads.

use std::f64::consts::PI;

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
        let exp_score_norms = eps
            .iter()
            .map(|&e| {
                let (score, pdf) = score_and_pdf(e, &grid);
                expected_score_norm(&score, &pdf)
            })
            .collect();
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
    let (score, pdf) = score_and_pdf(eps_of(eps_index), &grid);
    let step = PI / N_OMEGA as f64;
    let cdf = pdf
        .iter()
        .scan(0.0, |total, p| {
            *total += p;
            Some(*total * step)
        })
        .collect();
    (score, pdf, cdf)
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
struct OmegaGrid {
    omega: Vec<f64>,
    /// `sin(w/2)`, the denominator `D` of the series.
    half_sin: Vec<f64>,
    /// `cos(w/2)`.
    half_cos: Vec<f64>,
    /// `(1 - cos w) / pi`, the Haar measure of the angle; written as
    /// `2 sin^2(w/2)` so it keeps full precision at small `w`.
    haar: Vec<f64>,
}

impl OmegaGrid {
    fn new() -> Self {
        let omega: Vec<f64> = (1..=N_OMEGA)
            .map(|m| PI * m as f64 / N_OMEGA as f64)
            .collect();
        let (half_sin, half_cos): (Vec<f64>, Vec<f64>) =
            omega.iter().map(|w| (w / 2.0).sin_cos()).unzip();
        let haar = half_sin.iter().map(|s| 2.0 * s * s / PI).collect();
        OmegaGrid {
            omega,
            half_sin,
            half_cos,
            haar,
        }
    }
}

/// `(score, pdf)` over the angle grid for one `eps`.
fn score_and_pdf(eps: f64, grid: &OmegaGrid) -> (Vec<f64>, Vec<f64>) {
    let (expansion, score) = if eps < POISSON_BELOW_EPS {
        poisson_row(eps, grid)
    } else {
        series_row(eps, grid)
    };
    let pdf = expansion
        .iter()
        .zip(&grid.haar)
        .map(|(f, h)| f * h)
        .collect();
    (score, pdf)
}

/// `sqrt(sum score^2 pdf / sum pdf / pi)`, as published.
fn expected_score_norm(score: &[f64], pdf: &[f64]) -> f64 {
    let mut weighted = 0.0;
    let mut total = 0.0;
    for (s, p) in score.iter().zip(pdf) {
        weighted += s * s * p;
        total += p;
    }
    (weighted / total / PI).sqrt()
}

/// `(f, score)` from the series of the spec, truncated where
/// `l(l+1) eps^2 > EXPONENT_CUTOFF`.
///
/// The score numerator is summed term by term as published,
/// `D (l+1/2) cos((l+1/2) w) - sin((l+1/2) w) cos(w/2) / 2`: at small `w`
/// and large `eps` the score is `O(w^3)` while `G/F` and `cot(w/2)/2` are
/// each `O(1/w)`, so the shorter `G/F - cot(w/2)/2` would lose eight digits.
/// `sin`/`cos((l+1/2) w)` come from rotating by `w` each step, which is
/// accurate to ~1e-16 per step and avoids two libm calls per term.
fn series_row(eps: f64, grid: &OmegaGrid) -> (Vec<f64>, Vec<f64>) {
    let eps2 = eps * eps;
    // coefficient[l] = (2l+1) exp(-l(l+1) eps^2), only the non-negligible ones.
    let coefficient: Vec<f64> = (0..L_CAP)
        .map(|l| (l, (l * (l + 1)) as f64 * eps2))
        .take_while(|&(_, exponent)| exponent <= EXPONENT_CUTOFF)
        .map(|(l, exponent)| (2 * l + 1) as f64 * (-exponent).exp())
        .collect();
    let mut expansion = Vec::with_capacity(N_OMEGA);
    let mut score = Vec::with_capacity(N_OMEGA);
    for m in 0..N_OMEGA {
        let (d, half_cos) = (grid.half_sin[m], grid.half_cos[m]);
        let (step_sin, step_cos) = grid.omega[m].sin_cos();
        // (sin, cos) of (l + 1/2) w, starting at l = 0.
        let (mut s, mut c) = (d, half_cos);
        let mut sum_f = 0.0;
        let mut sum_score = 0.0;
        for (l, a) in coefficient.iter().enumerate() {
            sum_f += a * s;
            sum_score += a * (d * (l as f64 + 0.5) * c - s * half_cos / 2.0);
            (s, c) = (s * step_cos + c * step_sin, c * step_cos - s * step_sin);
        }
        // f = sum_f / D; score = (sum_score / D^2) / f.
        expansion.push(sum_f / d);
        score.push(sum_score / (d * sum_f));
    }
    (expansion, score)
}

/// `(f, score)` from the Poisson-summed form of the same series.
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
/// `r_k = exp(-pi k (pi k - w) / eps^2) <= 1` on `0 < w <= pi`, so the score
/// `d/dw log f = T'/T - cot(w/2)/2` with `T = sum (-1)^k u_k r_k` and
/// `T' = sum (-1)^k r_k (1 - u_k^2 / (2 eps^2))` is finite everywhere, also
/// where `f` itself underflows to zero. Terms with `r_k < e^-50` are dropped.
/// The spec's cap `l < 2000` is not visible here; the terms it cuts are below
/// `exp(-400)` for every tabulated `eps`.
fn poisson_row(eps: f64, grid: &OmegaGrid) -> (Vec<f64>, Vec<f64>) {
    let eps2 = eps * eps;
    let prefactor = (eps2 / 4.0).exp() * PI.sqrt() / (2.0 * eps2 * eps);
    let mut expansion = Vec::with_capacity(N_OMEGA);
    let mut score = Vec::with_capacity(N_OMEGA);
    for m in 0..N_OMEGA {
        let w = grid.omega[m];
        let mut t = 0.0;
        let mut dt = 0.0;
        // k = 0, then k = 1, -1, 2, -2, ... while the exponents stay small;
        // pi k (pi k - w) grows with |k| on both sides since 0 < w <= pi.
        let mut add = |k: i32| -> bool {
            let kf = f64::from(k);
            let exponent = PI * kf * (PI * kf - w) / eps2;
            if exponent > EXPONENT_CUTOFF {
                return false;
            }
            let r = (-exponent).exp();
            let u = w - 2.0 * PI * kf;
            let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
            t += sign * u * r;
            dt += sign * r * (1.0 - u * u / (2.0 * eps2));
            true
        };
        add(0);
        let mut k = 1;
        while add(k) {
            k += 1;
        }
        let mut k = -1;
        while add(k) {
            k -= 1;
        }
        let gaussian = (-w * w / (4.0 * eps2)).exp();
        let (d, half_cos) = (grid.half_sin[m], grid.half_cos[m]);
        expansion.push(prefactor * gaussian * t / d);
        score.push(dt / t - half_cos / (2.0 * d));
    }
    (expansion, score)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed form and the direct series are one function: check them
    /// against each other on both sides of the switch. Compared where the
    /// density is at least 1e-6 of its peak (below that the direct sum is
    /// rounding noise), and the score relative to at least 1e-4 of the row's
    /// largest score (it vanishes at `w = pi` by symmetry). Not at `eps = 2`:
    /// there `T'/T` and `cot(w/2)/2` cancel to six digits at small `w`, which
    /// is why the closed form is only used below `POISSON_BELOW_EPS`.
    #[test]
    fn poisson_form_equals_direct_series() {
        let grid = OmegaGrid::new();
        for eps in [0.05, 0.1, 0.3, 0.5, 1.0] {
            let (f_series, score_series) = series_row(eps, &grid);
            let (f_poisson, score_poisson) = poisson_row(eps, &grid);
            let peak = f_series.iter().cloned().fold(0.0, f64::max);
            let score_scale = 1e-4 * score_series.iter().fold(0.0, |a: f64, s| a.max(s.abs()));
            for m in (0..N_OMEGA).filter(|&m| f_series[m] >= 1e-6 * peak) {
                let rel_f = (f_series[m] - f_poisson[m]).abs() / f_series[m];
                assert!(rel_f < 1e-10, "f eps={eps} m={m}: rel {rel_f:e}");
                let rel_score = (score_series[m] - score_poisson[m]).abs()
                    / score_series[m].abs().max(score_scale);
                assert!(
                    rel_score < 1e-9,
                    "score eps={eps} m={m}: {} vs {} (rel {rel_score:e})",
                    score_series[m],
                    score_poisson[m]
                );
            }
        }
    }
}
#[cfg(test)]
mod timing {
    use super::*;
    #[test]
    fn timing_parts() {
        let t = std::time::Instant::now();
        let grid = OmegaGrid::new();
        eprintln!("grid {:?}", t.elapsed());
        let eps = eps_grid();
        let t = std::time::Instant::now();
        for &e in eps.iter().filter(|&&e| e < POISSON_BELOW_EPS) { std::hint::black_box(poisson_row(e, &grid)); }
        eprintln!("poisson {:?}", t.elapsed());
        let t = std::time::Instant::now();
        for &e in eps.iter().filter(|&&e| e >= POISSON_BELOW_EPS) { std::hint::black_box(series_row(e, &grid)); }
        eprintln!("series {:?}", t.elapsed());
        let t = std::time::Instant::now();
        for &e in eps.iter() { std::hint::black_box(score_and_pdf(e, &grid)); }
        eprintln!("all score_and_pdf {:?}", t.elapsed());
        let t = std::time::Instant::now();
        std::hint::black_box(So3Tables::compute());
        eprintln!("compute {:?}", t.elapsed());
    }
}
