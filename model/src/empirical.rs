//! The exact score of a set of reference frames under the forward process.
//!
//! `p_t(x) = 1/N sum_i  integral dG  N(T; G T0_i, sigma_tr^2)
//!           prod_r f(angle(R_r G R0_ir^T); sigma_rot)`
//! over the `N` reference structures `(T0_i, R0_i)` (centred translations,
//! frames as `training::frames` builds them) and every global rotation `G`
//! (Haar measure): the forward process of `TRAINING.md` applied to the
//! frames turned at random. The network is equivariant, so this
//! rotation-averaged density is the one whose score its training loss is
//! minimised by. Its score,
//! `s_T = -(T - E[G T0_i]) / sigma_tr^2`,
//! `s_R,r = E[score(w) v / w]` with `v = log(R_r G R0_ir^T)`, `w = |v|`
//! (the training target before its division by `score_norm`),
//! takes expectations over the posterior of `(i, G)`. The integral over `G`
//! is done by self-normalised importance sampling with a proposal around
//! the rotation that best aligns the frames (a matrix-Fisher approximation
//! of the posterior, widened, mixed with uniform rotations).
//!
//! Used for measurements: how the samplers do with an accurate score at
//! high noise (examples/adk/README.md), and as a low-variance training
//! target there (`digctl train --exact-target-above`).

use std::collections::HashMap;
use std::f64::consts::PI;

use rand_chacha::ChaCha20Rng;
use tch::{Kind, Tensor};

use crate::rng::{quaternion_to_matrix, uniform};
use crate::sampling::flow::logmap;
use crate::so3::{self, So3Tables};

type M3 = [f64; 9];

fn mul(a: &M3, b: &M3) -> M3 {
    let mut c = [0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            c[3 * i + j] = a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
        }
    }
    c
}

fn transpose(a: &M3) -> M3 {
    [a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8]]
}

fn dot9(a: &M3, b: &M3) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Rotation matrix of an axis-angle vector (Rodrigues).
pub fn rotation(v: [f64; 3]) -> M3 {
    let a = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let (s, c) = if a < 1e-8 {
        (1.0 - a * a / 6.0, 0.5 - a * a / 24.0)
    } else {
        (a.sin() / a, (1.0 - a.cos()) / (a * a))
    };
    let k = [0.0, -v[2], v[1], v[2], 0.0, -v[0], -v[1], v[0], 0.0];
    let k2 = mul(&k, &k);
    let mut r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    for j in 0..9 {
        r[j] += s * k[j] + c * k2[j];
    }
    r
}

/// A generator for [`EmpiricalScore::score`].
pub fn rng(seed: u64) -> ChaCha20Rng {
    use rand::SeedableRng;
    ChaCha20Rng::seed_from_u64(seed)
}

fn normal(rng: &mut ChaCha20Rng) -> f64 {
    let u1 = uniform(rng).max(1e-300);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// A rotation uniform in Haar measure (a normalised Gaussian quaternion).
fn uniform_rotation(rng: &mut ChaCha20Rng) -> M3 {
    let q = [normal(rng), normal(rng), normal(rng), normal(rng)];
    let n = q.iter().map(|x| x * x).sum::<f64>().sqrt();
    quaternion_to_matrix(q.map(|v| v / n))
}

/// `log f(w; sigma)` (the IGSO(3) density against the normalised Haar
/// measure, up to a constant) on a grid of `cos w`, the table score
/// `d/dw log f` on the angle grid, and the slope of a linear fit of `log f`
/// in `cos w` (the proposal's concentration).
struct SigmaRow {
    log_f_by_cos: Vec<f64>,
    score: Vec<f64>,
    slope: f64,
}

const N_COS: usize = 4001;

impl SigmaRow {
    fn new(e: usize, omegas: &[f64]) -> Self {
        let (score, pdf, _) = so3::row(e);
        let log_f: Vec<f64> = omegas
            .iter()
            .zip(&pdf)
            .map(|(w, p)| (p * PI / (1.0 - w.cos())).max(1e-300).ln())
            .collect();
        // The table runs from w = pi/2000 to pi: cos w decreasing.
        let rev_w: Vec<f64> = omegas.iter().rev().map(|w| w.cos()).collect();
        let rev_f: Vec<f64> = log_f.iter().rev().copied().collect();
        let (lo, hi) = (rev_w[0], rev_w[rev_w.len() - 1]);
        let log_f_by_cos: Vec<f64> = (0..N_COS)
            .map(|j| {
                let c = (-1.0 + 2.0 * j as f64 / (N_COS - 1) as f64).clamp(lo, hi);
                crate::training::interp(c.min(hi - 1e-15), &rev_w, &rev_f)
            })
            .collect();
        // Weighted least squares of log f on cos w, weights the angle pdf.
        let (mut sw, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for ((w, p), y) in omegas.iter().zip(&pdf).zip(&log_f) {
            let x = w.cos();
            let p = p.max(0.0);
            sw += p;
            sx += p * x;
            sy += p * y;
            sxx += p * x * x;
            sxy += p * x * y;
        }
        let var = sxx / sw - (sx / sw).powi(2);
        let slope = if var > 1e-12 {
            (sxy / sw - sx * sy / (sw * sw)) / var
        } else {
            0.0
        };
        SigmaRow {
            log_f_by_cos,
            score,
            slope,
        }
    }

    fn log_f(&self, cos: f64) -> f64 {
        let x = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * (N_COS - 1) as f64;
        let j = (x as usize).min(N_COS - 2);
        let a = x - j as f64;
        self.log_f_by_cos[j] * (1.0 - a) + self.log_f_by_cos[j + 1] * a
    }
}

/// What one evaluation found besides the score.
#[derive(Debug, Clone, Copy)]
pub struct Diagnostics {
    /// Effective sample size of the importance weights over `(i, G)`.
    pub ess: f64,
    /// Posterior probability of the most probable reference structure.
    pub top_weight: f64,
    /// Its index.
    pub top_frame: usize,
}

/// Reference frames and the settings of the integral over rotations.
pub struct EmpiricalScore {
    n: usize,
    l: usize,
    /// `(n * l)` centred CA positions.
    t0: Vec<[f64; 3]>,
    /// `(n * l)` frames, row-major.
    r0: Vec<M3>,
    /// `|T0_i|^2`.
    t0_sq: Vec<f64>,
    /// Rotations drawn per evaluation.
    pub proposals: usize,
    /// Fraction of them uniform.
    pub uniform_fraction: f64,
    /// Widening of the matrix-Fisher proposal (standard deviations).
    pub widen: f64,
    /// Cap on the proposal's standard deviation (rad).
    pub max_std: f64,
    omegas: Vec<f64>,
    rows: HashMap<usize, SigmaRow>,
}

impl EmpiricalScore {
    /// `frames`: per structure `(tr (l*3), rot (l*9))` in float32, as
    /// `dataset::ProteinData::frames` holds them (translations are centred
    /// here on their mean).
    pub fn new(frames: &[(Vec<f32>, Vec<f32>)]) -> Self {
        let n = frames.len();
        assert!(n > 0, "no reference frames");
        let l = frames[0].0.len() / 3;
        let mut t0 = Vec::with_capacity(n * l);
        let mut r0 = Vec::with_capacity(n * l);
        let mut t0_sq = Vec::with_capacity(n);
        for (tr, rot) in frames {
            assert_eq!(tr.len(), l * 3, "reference structures differ in length");
            let mut c = [0.0; 3];
            for r in 0..l {
                for k in 0..3 {
                    c[k] += tr[3 * r + k] as f64 / l as f64;
                }
            }
            let mut sq = 0.0;
            for r in 0..l {
                let p = [0, 1, 2].map(|k| tr[3 * r + k] as f64 - c[k]);
                sq += p[0] * p[0] + p[1] * p[1] + p[2] * p[2];
                t0.push(p);
                let mut m = [0.0; 9];
                for (j, v) in m.iter_mut().enumerate() {
                    *v = rot[9 * r + j] as f64;
                }
                r0.push(m);
            }
            t0_sq.push(sq);
        }
        EmpiricalScore {
            n,
            l,
            t0,
            r0,
            t0_sq,
            proposals: 512,
            uniform_fraction: 0.25,
            widen: 1.5,
            max_std: 1.0,
            omegas: So3Tables::compute().omegas,
            rows: HashMap::new(),
        }
    }

    pub fn len_residues(&self) -> usize {
        self.l
    }

    /// The score at one pose: `x (l)` CA positions, `r (l)` frames, at the
    /// noise levels `sigma_tr`, `sigma_rot`. Returns `(s_T, s_R)` per
    /// residue in the sampler's convention and the diagnostics.
    pub fn score(
        &mut self,
        x: &[[f64; 3]],
        r: &[M3],
        sigma_tr: f64,
        sigma_rot: f64,
        rng: &mut ChaCha20Rng,
    ) -> (Vec<[f64; 3]>, Vec<[f64; 3]>, Diagnostics) {
        let (n, l) = (self.n, self.l);
        assert_eq!(x.len(), l);
        assert_eq!(r.len(), l);
        let e = So3Tables::eps_index(sigma_rot);
        let omegas = &self.omegas;
        let row = self
            .rows
            .entry(e)
            .or_insert_with(|| SigmaRow::new(e, omegas));
        let s2 = sigma_tr * sigma_tr;
        // <G, B_i> = sum_r x_r . G T0_ir; <G, A_ir> = trace(R_r G R0_ir^T);
        // K_i: the linear (matrix-Fisher) approximation of log p(x | i, G).
        let mut b = vec![[0.0; 9]; n];
        let mut a = vec![[0.0; 9]; n * l];
        let mut ks = vec![0f64; n * 9];
        for i in 0..n {
            for rr in 0..l {
                let p = &self.t0[i * l + rr];
                for u in 0..3 {
                    for v in 0..3 {
                        b[i][3 * u + v] += x[rr][u] * p[v];
                    }
                }
                a[i * l + rr] = mul(&transpose(&r[rr]), &self.r0[i * l + rr]);
                for j in 0..9 {
                    ks[9 * i + j] += a[i * l + rr][j] * row.slope * 0.5;
                }
            }
            for j in 0..9 {
                ks[9 * i + j] += b[i][j] / s2;
            }
        }
        let x_sq: f64 = x
            .iter()
            .map(|p| p[0] * p[0] + p[1] * p[1] + p[2] * p[2])
            .sum();

        // Proposal: per frame, a Gaussian in the right perturbation of
        // G*_i (the maximiser of <G, K_i>) with the covariance of the
        // quadratic form tr(M) I - M, M = V S D V^T (widened, capped);
        // frames mixed by their approximate evidence, and a uniform part.
        let kt = Tensor::from_slice(&ks).view([n as i64, 3, 3]);
        let (u, s, v) = kt.svd(true, true);
        let uf: Vec<f64> = Vec::try_from(u.flatten(0, -1)).unwrap();
        let sf: Vec<f64> = Vec::try_from(s.flatten(0, -1)).unwrap();
        let vf: Vec<f64> = Vec::try_from(v.flatten(0, -1)).unwrap();
        let cap = self.max_std * self.max_std;
        let mut comps: Vec<Component> = Vec::with_capacity(n);
        let mut evidence = Vec::with_capacity(n);
        for i in 0..n {
            let um: M3 = uf[9 * i..9 * i + 9].try_into().unwrap();
            let vm: M3 = vf[9 * i..9 * i + 9].try_into().unwrap();
            let m = mul(&um, &transpose(&vm));
            let det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6])
                + m[2] * (m[3] * m[7] - m[4] * m[6]);
            let d = [1.0, 1.0, det.signum()];
            let sd = [0, 1, 2].map(|j| sf[3 * i + j] * d[j]);
            let center = mul(
                &mul(&um, &[d[0], 0.0, 0.0, 0.0, d[1], 0.0, 0.0, 0.0, d[2]]),
                &transpose(&vm),
            );
            let tr_sd = sd[0] + sd[1] + sd[2];
            let var = [0, 1, 2].map(|j| {
                let p = tr_sd - sd[j];
                if p > 0.0 {
                    (self.widen * self.widen / p).min(cap)
                } else {
                    cap
                }
            });
            let log_norm = -0.5 * var.iter().map(|v| (2.0 * PI * v).ln()).sum::<f64>();
            evidence.push(tr_sd - self.t0_sq[i] / (2.0 * s2));
            comps.push(Component {
                center,
                basis: vm,
                var,
                log_norm,
            });
        }
        let emax = evidence.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut pi: Vec<f64> = evidence.iter().map(|e| (e - emax).exp()).collect();
        let z: f64 = pi.iter().sum();
        pi.iter_mut()
            .for_each(|p| *p = 0.5 * *p / z + 0.5 / n as f64);
        let log_pi: Vec<f64> = pi.iter().map(|p| p.ln()).collect();
        let mut cum_pi = pi.clone();
        for i in 1..n {
            cum_pi[i] += cum_pi[i - 1];
        }
        let m_total = self.proposals.max(1);
        let n_uniform = ((self.uniform_fraction * m_total as f64).round() as usize).min(m_total);
        let mut gs: Vec<M3> = Vec::with_capacity(m_total);
        let mut log_q: Vec<f64> = Vec::with_capacity(m_total);
        let mut parts = vec![0.0; n];
        for j in 0..m_total {
            let g = if j < n_uniform {
                uniform_rotation(rng)
            } else {
                let u = uniform(rng) * cum_pi[n - 1];
                let c = &comps[cum_pi.partition_point(|&v| v < u).min(n - 1)];
                let mut eps = [0.0; 3];
                for col in 0..3 {
                    let sc = c.var[col].sqrt() * normal(rng);
                    for (row_, e) in eps.iter_mut().enumerate() {
                        *e += c.basis[3 * row_ + col] * sc;
                    }
                }
                mul(&c.center, &rotation(eps))
            };
            // Density of g under the mixture (against normalised Haar).
            for (i, c) in comps.iter().enumerate() {
                parts[i] = log_pi[i] + c.log_density(&g);
            }
            let lg = log_sum_exp(&parts);
            let lq = if self.uniform_fraction >= 1.0 {
                0.0
            } else if self.uniform_fraction <= 0.0 {
                lg
            } else {
                log_add(
                    self.uniform_fraction.ln(),
                    (1.0 - self.uniform_fraction).ln() + lg,
                )
            };
            gs.push(g);
            log_q.push(lq);
        }

        // Log weights of every (G, i).
        let mut lw = vec![0.0; m_total * n];
        for (gi, g) in gs.iter().enumerate() {
            for i in 0..n {
                let mut lp = -(x_sq + self.t0_sq[i] - 2.0 * dot9(g, &b[i])) / (2.0 * s2);
                for ai in &a[i * l..(i + 1) * l] {
                    lp += row.log_f((dot9(g, ai) - 1.0) * 0.5);
                }
                lw[gi * n + i] = lp - log_q[gi];
            }
        }
        let mx = lw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut w: Vec<f64> = lw.iter().map(|v| (v - mx).exp()).collect();
        let total: f64 = w.iter().sum();
        w.iter_mut().for_each(|v| *v /= total);
        let ess = 1.0 / w.iter().map(|v| v * v).sum::<f64>();
        let mut per_frame = vec![0.0; n];
        for (j, v) in w.iter().enumerate() {
            per_frame[j % n] += v;
        }
        let (top_frame, top_weight) = per_frame
            .iter()
            .copied()
            .enumerate()
            .fold((0, 0.0), |acc, (i, v)| if v > acc.1 { (i, v) } else { acc });

        // Systematic resampling of the pairs (4096 draws): exact for the
        // pairs that hold the weight when it is concentrated, unbiased when
        // it is spread.
        let draws = 4096usize;
        let mut keep: Vec<(usize, f64)> = Vec::new();
        let u0 = uniform(rng) / draws as f64;
        let mut cum = 0.0;
        let mut next = 0usize;
        for (j, &wj) in w.iter().enumerate() {
            cum += wj;
            let mut copies = 0usize;
            while next < draws && u0 + next as f64 / draws as f64 <= cum {
                copies += 1;
                next += 1;
            }
            if copies > 0 {
                keep.push((j, copies as f64 / draws as f64));
            }
        }
        let cum: f64 = keep.iter().map(|k| k.1).sum();
        let mut s_tr = vec![[0.0; 3]; l];
        let mut s_rot = vec![[0.0; 3]; l];
        for &(j, wj) in &keep {
            let wj = wj / cum;
            let (g, i) = (&gs[j / n], j % n);
            for rr in 0..l {
                let p = &self.t0[i * l + rr];
                for u in 0..3 {
                    s_tr[rr][u] +=
                        wj * (g[3 * u] * p[0] + g[3 * u + 1] * p[1] + g[3 * u + 2] * p[2]);
                }
                let q = mul(&mul(&r[rr], g), &transpose(&self.r0[i * l + rr]));
                let v = logmap(&q);
                let om = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
                if om > 0.0 {
                    let sc = crate::training::interp(
                        om.clamp(self.omegas[0], self.omegas[self.omegas.len() - 1] - 1e-12),
                        &self.omegas,
                        &row.score,
                    ) / om;
                    for u in 0..3 {
                        s_rot[rr][u] += wj * sc * v[u];
                    }
                }
            }
        }
        for rr in 0..l {
            for u in 0..3 {
                s_tr[rr][u] = -(x[rr][u] - s_tr[rr][u]) / s2;
            }
        }
        (
            s_tr,
            s_rot,
            Diagnostics {
                ess,
                top_weight,
                top_frame,
            },
        )
    }

    /// [`Self::score`] on a batch of float32 tensors `tr (B, L, 3)`,
    /// `rot (B, L, 3, 3)`; returns float32 `(B, L, 3)` tensors on the
    /// device of `tr`.
    pub fn score_batch(
        &mut self,
        tr: &Tensor,
        rot: &Tensor,
        sigma_tr: f64,
        sigma_rot: f64,
        rng: &mut ChaCha20Rng,
    ) -> (Tensor, Tensor, Vec<Diagnostics>) {
        let dev = tr.device();
        let b = tr.size()[0];
        let l = self.l;
        let trf: Vec<f32> = Vec::try_from(
            tr.to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )
        .unwrap();
        let rotf: Vec<f32> = Vec::try_from(
            rot.to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )
        .unwrap();
        let mut out_tr = Vec::with_capacity(trf.len());
        let mut out_rot = Vec::with_capacity(trf.len());
        let mut diags = Vec::new();
        for bi in 0..b as usize {
            let x: Vec<[f64; 3]> = (0..l)
                .map(|r| [0, 1, 2].map(|k| trf[(bi * l + r) * 3 + k] as f64))
                .collect();
            let rr: Vec<M3> = (0..l)
                .map(|r| {
                    let mut m = [0.0; 9];
                    for (j, v) in m.iter_mut().enumerate() {
                        *v = rotf[(bi * l + r) * 9 + j] as f64;
                    }
                    m
                })
                .collect();
            let (st, sr, d) = self.score(&x, &rr, sigma_tr, sigma_rot, rng);
            out_tr.extend(st.iter().flat_map(|v| v.map(|c| c as f32)));
            out_rot.extend(sr.iter().flat_map(|v| v.map(|c| c as f32)));
            diags.push(d);
        }
        (
            Tensor::from_slice(&out_tr)
                .view([b, l as i64, 3])
                .to_device(dev),
            Tensor::from_slice(&out_rot)
                .view([b, l as i64, 3])
                .to_device(dev),
            diags,
        )
    }
}

/// One frame's Gaussian proposal on rotations: `center expmap(eps)`,
/// `eps ~ N(0, basis diag(var) basis^T)`.
struct Component {
    center: M3,
    basis: M3,
    var: [f64; 3],
    log_norm: f64,
}

impl Component {
    fn log_gauss(&self, eps: &[f64; 3]) -> f64 {
        let mut q = 0.0;
        for j in 0..3 {
            let c =
                self.basis[j] * eps[0] + self.basis[3 + j] * eps[1] + self.basis[6 + j] * eps[2];
            q += c * c / self.var[j];
        }
        self.log_norm - 0.5 * q
    }

    /// Log density of `g` against the normalised Haar measure: the
    /// Gaussian pushed through `expmap`, over the two nearest preimages.
    fn log_density(&self, g: &M3) -> f64 {
        let log_haar = |theta: f64| -> f64 {
            if theta < 1e-6 {
                -(8.0 * PI * PI).ln()
            } else {
                ((1.0 - theta.cos()) / (4.0 * PI * PI * theta * theta)).ln()
            }
        };
        let e1 = logmap(&mul(&transpose(&self.center), g));
        let th = (e1[0] * e1[0] + e1[1] * e1[1] + e1[2] * e1[2]).sqrt();
        let mut lg = self.log_gauss(&e1) - log_haar(th);
        if th > 1e-9 {
            let f = 1.0 - 2.0 * PI / th;
            let e2 = e1.map(|v| v * f);
            lg = log_add(lg, self.log_gauss(&e2) - log_haar(2.0 * PI - th));
        }
        lg
    }
}

fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn log_add(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn structure(seed: u64, l: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut tr = Vec::new();
        let mut rot = Vec::new();
        let mut p = [0.0f64; 3];
        for _ in 0..l {
            for v in p.iter_mut() {
                *v += 2.2 * normal(&mut rng);
            }
            tr.extend(p.map(|v| v as f32));
            rot.extend(uniform_rotation(&mut rng).map(|v| v as f32));
        }
        (tr, rot)
    }

    /// At low noise around a turned reference structure, the posterior
    /// picks that structure and turn, and the score is the training target
    /// of the noise that was added.
    #[test]
    fn at_low_noise_the_score_is_the_target_of_the_added_noise() {
        let l = 40;
        let frames = vec![structure(1, l), structure(2, l), structure(3, l)];
        let mut emp = EmpiricalScore::new(&frames);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let g = uniform_rotation(&mut rng);
        let (st, sr) = (0.3, 0.05);
        let i = 1;
        let c: [f64; 3] = {
            let mut c = [0.0; 3];
            for r in 0..l {
                for (k, v) in c.iter_mut().enumerate() {
                    *v += frames[i].0[3 * r + k] as f64 / l as f64;
                }
            }
            c
        };
        let mut x = Vec::new();
        let mut rr = Vec::new();
        let mut z_all = Vec::new();
        let mut v_all = Vec::new();
        for r in 0..l {
            let p = [0, 1, 2].map(|k| frames[i].0[3 * r + k] as f64 - c[k]);
            let gp = [0, 1, 2].map(|u| g[3 * u] * p[0] + g[3 * u + 1] * p[1] + g[3 * u + 2] * p[2]);
            let z = [0, 1, 2].map(|_| st * normal(&mut rng));
            x.push([gp[0] + z[0], gp[1] + z[1], gp[2] + z[2]]);
            z_all.push(z);
            let mut r0 = [0.0; 9];
            for (j, v) in r0.iter_mut().enumerate() {
                *v = frames[i].1[9 * r + j] as f64;
            }
            let v = [0, 1, 2].map(|_| 0.03 * normal(&mut rng));
            rr.push(mul(&mul(&rotation(v), &r0), &transpose(&g)));
            v_all.push(v);
        }
        emp.proposals = 256;
        let (s_tr, s_rot, d) = emp.score(&x, &rr, st, sr, &mut rng);
        assert_eq!(d.top_frame, i);
        assert!(d.top_weight > 0.999, "{d:?}");
        let mut igso = crate::training::Igso3::new();
        let mut err_tr: f64 = 0.0;
        let mut err_rot: f64 = 0.0;
        let mut size_rot: f64 = 0.0;
        for r in 0..l {
            // The posterior mean of the turn is within a small angle of g,
            // so compare with a tolerance well below the score's size.
            for u in 0..3 {
                err_tr = err_tr.max((s_tr[r][u] + z_all[r][u] / (st * st)).abs());
            }
            let v = v_all[r];
            let om = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            let sc = igso.score(om, sr) / om;
            for u in 0..3 {
                err_rot = err_rot.max((s_rot[r][u] - sc * v[u]).abs());
                size_rot = size_rot.max((sc * v[u]).abs());
            }
        }
        // Translation score ~ z / sigma^2 ~ 3; the turn's uncertainty
        // (about 0.3 / (2.2 sqrt(40 / 3)) rad on points 10 A out) moves it
        // by a fraction.
        assert!(err_tr < 1.5, "translation score off by {err_tr}");
        assert!(
            err_rot < 0.1 * size_rot,
            "rotation score off by {err_rot} of {size_rot}"
        );
    }

    /// The proposal's density is right: with only uniform rotations or
    /// only the matrix-Fisher proposal, the estimated scores agree.
    #[test]
    fn the_proposal_does_not_change_the_estimate() {
        let l = 20;
        let frames = vec![structure(4, l), structure(5, l)];
        let mut emp = EmpiricalScore::new(&frames);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        // A turned, noised structure at moderate noise: the posterior over
        // G is a few tenths of a radian wide.
        let (st, sr) = (6.0, 0.8);
        let g = uniform_rotation(&mut rng);
        let x: Vec<[f64; 3]> = (0..l)
            .map(|r| {
                let p = [0, 1, 2].map(|k| frames[0].0[3 * r + k] as f64);
                [0, 1, 2].map(|u| {
                    g[3 * u] * p[0]
                        + g[3 * u + 1] * p[1]
                        + g[3 * u + 2] * p[2]
                        + st * normal(&mut rng)
                })
            })
            .collect();
        let rr: Vec<M3> = (0..l)
            .map(|r| {
                let mut r0 = [0.0; 9];
                for (j, v) in r0.iter_mut().enumerate() {
                    *v = frames[0].1[9 * r + j] as f64;
                }
                let v = [0, 1, 2].map(|_| 0.5 * normal(&mut rng));
                mul(&mul(&rotation(v), &r0), &transpose(&g))
            })
            .collect();
        emp.proposals = 100000;
        emp.uniform_fraction = 1.0;
        let (a_tr, a_rot, da) = emp.score(&x, &rr, st, sr, &mut rng);
        assert!(da.ess > 100.0, "{da:?}");
        emp.proposals = 2000;
        emp.uniform_fraction = 0.0;
        emp.widen = 1.0;
        let (b_tr, b_rot, d) = emp.score(&x, &rr, st, sr, &mut rng);
        assert!(d.ess > 100.0, "{d:?}");
        let diff = |a: &[[f64; 3]], b: &[[f64; 3]]| {
            let mut m: f64 = 0.0;
            let mut s: f64 = 0.0;
            for (p, q) in a.iter().zip(b) {
                for u in 0..3 {
                    m = m.max((p[u] - q[u]).abs());
                    s = s.max(p[u].abs());
                }
            }
            (m, s)
        };
        let (m, s) = diff(&a_tr, &b_tr);
        assert!(m < 0.05 * s, "translation: {m} of {s}");
        let (m, s) = diff(&a_rot, &b_rot);
        assert!(m < 0.05 * s, "rotation: {m} of {s}");
    }

    /// The Gaussian proposal's density integrates to one against the
    /// normalised Haar measure (its expectation under uniform rotations).
    #[test]
    fn a_proposal_component_is_a_density() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for var in [[0.3, 0.5, 1.0], [1.0, 1.0, 1.0]] {
            let c = Component {
                center: uniform_rotation(&mut rng),
                basis: uniform_rotation(&mut rng),
                var,
                log_norm: -0.5 * var.iter().map(|v: &f64| (2.0 * PI * v).ln()).sum::<f64>(),
            };
            let n = 100_000;
            let mean: f64 = (0..n)
                .map(|_| c.log_density(&uniform_rotation(&mut rng)).exp())
                .sum::<f64>()
                / n as f64;
            assert!((mean - 1.0).abs() < 0.02, "{var:?}: {mean}");
        }
    }

    /// The score is the conditional expectation of the published training
    /// target given the noised pose (the frames turned uniformly at
    /// random): `E[(s_noise - s) . s] = 0`. The same check fails for a
    /// score that ignores the turn (the frames as they are), so it has the
    /// power to see an error of that size.
    #[test]
    fn the_score_is_the_expected_training_target() {
        let l = 12;
        let frames = vec![structure(11, l), structure(12, l), structure(13, l)];
        let mut emp = EmpiricalScore::new(&frames);
        emp.proposals = 256;
        let mut igso = crate::training::Igso3::new();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (st, sr) = (3.0, 0.6);
        let trials = 1500;
        // Per trial: (s_noise - s) . s for translations and rotations, with
        // the score and with the wrong one.
        let mut d = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..trials {
            let i = (rng.next_u64() % 3) as usize;
            let g = uniform_rotation(&mut rng);
            let mut x = Vec::new();
            let mut rr = Vec::new();
            let mut sn_tr = Vec::new();
            let mut sn_rot = Vec::new();
            for r in 0..l {
                let p = emp.t0[i * l + r];
                let z = [0, 1, 2].map(|_| st * normal(&mut rng));
                x.push(
                    [0, 1, 2].map(|u| {
                        g[3 * u] * p[0] + g[3 * u + 1] * p[1] + g[3 * u + 2] * p[2] + z[u]
                    }),
                );
                sn_tr.push(z.map(|v| -v / (st * st)));
                let axis = [normal(&mut rng), normal(&mut rng), normal(&mut rng)];
                let an = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt();
                let om = igso.sample_angle(sr, uniform(&mut rng));
                let v = axis.map(|a| a / an * om);
                rr.push(mul(&mul(&rotation(v), &emp.r0[i * l + r]), &transpose(&g)));
                let sc = igso.score(om, sr) / om;
                sn_rot.push(v.map(|c| c * sc));
            }
            let (s_tr, s_rot, _) = emp.score(&x, &rr, st, sr, &mut rng);
            // A wrong score to show the check's power: the proposal pinned
            // at each frame's best turn, so the turn's posterior is replaced
            // by its mode.
            emp.uniform_fraction = 0.0;
            emp.max_std = 1e-6;
            let saved = emp.widen;
            emp.widen = 1e-6;
            let (w_tr, w_rot, _) = emp.score(&x, &rr, st, sr, &mut rng);
            emp.uniform_fraction = 0.25;
            emp.max_std = 1.0;
            emp.widen = saved;
            let dot = |a: &[[f64; 3]], b: &[[f64; 3]], c: &[[f64; 3]]| -> f64 {
                a.iter()
                    .zip(b)
                    .zip(c)
                    .map(|((p, q), s)| (0..3).map(|u| (p[u] - q[u]) * s[u]).sum::<f64>())
                    .sum()
            };
            d[0].push(dot(&sn_tr, &s_tr, &s_tr));
            d[1].push(dot(&sn_rot, &s_rot, &s_rot));
            d[2].push(dot(&sn_tr, &w_tr, &w_tr));
            d[3].push(dot(&sn_rot, &w_rot, &w_rot));
        }
        let z = |v: &[f64]| {
            let n = v.len() as f64;
            let m = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
            m / (var / n).sqrt()
        };
        let zs: Vec<f64> = d.iter().map(|v| z(v)).collect();
        eprintln!(
            "z-scores: translations {:.2}, rotations {:.2}; mode of the turn: {:.2}, {:.2}",
            zs[0], zs[1], zs[2], zs[3]
        );
        assert!(zs[0].abs() < 4.0 && zs[1].abs() < 4.0, "{zs:?}");
        assert!(
            zs[2].abs() > 4.0 || zs[3].abs() > 4.0,
            "the check cannot see a wrong score: {zs:?}"
        );
    }
}
