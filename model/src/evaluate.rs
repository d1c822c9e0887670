//! Scoring sampled backbones: physical validity by BioEmu's criteria and
//! CA-RMSD after optimal superposition.
//!
//! Validity follows `filter_unphysical_traj` of microsoft/bioemu (its
//! `_filter_unphysical_traj_masks`): a structure is physical when
//! - every consecutive CA-CA distance is below [`MAX_CA_CA`] (4.5 Å),
//! - every consecutive C(i)-N(i+1) distance is below [`MAX_C_N`] (2.0 Å),
//! - no two backbone atoms (N, CA, C) of residues more than
//!   [`CLASH_MIN_SEPARATION`] apart (`|i - j| > 2`, as mdtraj's
//!   `compute_contacts` skips `(i, i+1)` and `(i, i+2)`) are at
//!   [`CLASH_DISTANCE`] (1.0 Å) or closer.
//!
//! BioEmu measures clashes over all heavy atoms of its full-atom structures;
//! DiG samples backbones only, so here the atoms are N, CA and C.
//!
//! The RMSD is Horn's quaternion method (J. Opt. Soc. Am. A 4, 629, 1987):
//! the optimal rotation is the eigenvector of the largest eigenvalue of a
//! symmetric 4x4 matrix, found by Jacobi iteration. A unit quaternion is
//! always a proper rotation, so mirror images are never superposed (what the
//! determinant-sign fix does in Kabsch's SVD formulation). The RMSD is then
//! evaluated directly from the rotated coordinates, in f64, so that identical
//! structures give 0 to rounding rather than the square root of a
//! cancellation error.

/// A consecutive CA-CA distance must be below this (Å).
pub const MAX_CA_CA: f64 = 4.5;
/// A consecutive C(i)-N(i+1) distance must be below this (Å).
pub const MAX_C_N: f64 = 2.0;
/// Backbone atoms of residues more than [`CLASH_MIN_SEPARATION`] apart must
/// be farther apart than this (Å).
pub const CLASH_DISTANCE: f64 = 1.0;
/// Residue pairs with `|i - j|` up to this are not checked for clashes.
pub const CLASH_MIN_SEPARATION: usize = 2;

/// Name of the CA-CA criterion in [`Validity::failed`].
pub const CA_CA: &str = "ca-ca";
/// Name of the C-N criterion in [`Validity::failed`].
pub const C_N: &str = "c-n";
/// Name of the clash criterion in [`Validity::failed`].
pub const CLASH: &str = "clash";
/// Every criterion, in the order [`Validity::failed`] lists them.
pub const CRITERIA: [&str; 3] = [CA_CA, C_N, CLASH];

/// The physical-validity verdict on one backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Validity {
    /// Largest consecutive CA-CA distance (Å); 0 for fewer than two residues.
    pub ca_ca_max: f64,
    /// Largest consecutive C(i)-N(i+1) distance (Å); 0 for fewer than two residues.
    pub c_n_max: f64,
    /// Smallest distance between backbone atoms of residues more than two
    /// apart (Å); infinite when there is no such pair (three residues or fewer).
    pub clash_min: f64,
    /// All criteria pass.
    pub valid: bool,
    /// The criteria that fail, as [`CA_CA`], [`C_N`], [`CLASH`], in that order.
    pub failed: Vec<&'static str>,
}

/// Checks one backbone (`[N, CA, C]` per residue, Å) against the criteria of
/// the module doc. A non-finite coordinate makes the distances it enters NaN,
/// and a NaN distance fails its criterion (it cannot be shown to pass).
pub fn validity(backbone: &[[[f32; 3]; 3]]) -> Validity {
    let atoms: Vec<[[f64; 3]; 3]> = backbone
        .iter()
        .map(|res| res.map(|a| a.map(f64::from)))
        .collect();
    let (mut ca_ca_max, mut c_n_max) = (0.0f64, 0.0f64);
    for pair in atoms.windows(2) {
        ca_ca_max = nan_max(ca_ca_max, dist(pair[0][1], pair[1][1]));
        c_n_max = nan_max(c_n_max, dist(pair[0][2], pair[1][0]));
    }
    let clash_min = min_nonlocal_distance(&atoms);
    // A NaN compares false, so it passes none of these.
    let passes = [
        ca_ca_max < MAX_CA_CA,
        c_n_max < MAX_C_N,
        clash_min > CLASH_DISTANCE,
    ];
    let failed: Vec<&'static str> = CRITERIA
        .iter()
        .zip(passes)
        .filter(|&(_, pass)| !pass)
        .map(|(&name, _)| name)
        .collect();
    Validity {
        ca_ca_max,
        c_n_max,
        clash_min,
        valid: failed.is_empty(),
        failed,
    }
}

/// The exact smallest distance between atoms of residues more than
/// [`CLASH_MIN_SEPARATION`] apart, by a sweep along x: the atoms sorted by x,
/// each is compared only with earlier atoms whose x lies within the best
/// distance so far. Compact or extended, a protein's backbone has few atoms
/// in such a slab, so this is far below the all-pairs cost (about 0.2 ms for
/// L = 214 and 1 ms for L = 1070 at the dev profile's opt-level 1).
fn min_nonlocal_distance(atoms: &[[[f64; 3]; 3]]) -> f64 {
    let mut points: Vec<([f64; 3], usize)> = atoms
        .iter()
        .enumerate()
        .flat_map(|(i, res)| res.iter().map(move |&p| (p, i)))
        .collect();
    if points.iter().any(|(p, _)| p.iter().any(|v| !v.is_finite())) {
        return f64::NAN;
    }
    points.sort_unstable_by(|a, b| a.0[0].total_cmp(&b.0[0]));
    let mut best = f64::INFINITY; // squared
    for (a, &(pa, ra)) in points.iter().enumerate() {
        for &(pb, rb) in points[..a].iter().rev() {
            let dx = pa[0] - pb[0];
            if dx * dx >= best {
                break;
            }
            if ra.abs_diff(rb) <= CLASH_MIN_SEPARATION {
                continue;
            }
            best = best.min(dist2(pa, pb));
        }
    }
    best.sqrt()
}

/// Points centred on their mean, ready to be superposed on one another.
/// Build each structure once when comparing it with many.
#[derive(Debug, Clone, PartialEq)]
pub struct Centered {
    points: Vec<[f64; 3]>,
}

impl Centered {
    /// Centres `points`.
    pub fn new(points: impl IntoIterator<Item = [f64; 3]>) -> Self {
        let mut points: Vec<[f64; 3]> = points.into_iter().collect();
        let n = points.len().max(1) as f64;
        let mut mean = [0.0; 3];
        for p in &points {
            for k in 0..3 {
                mean[k] += p[k] / n;
            }
        }
        for p in &mut points {
            for k in 0..3 {
                p[k] -= mean[k];
            }
        }
        Centered { points }
    }

    /// The CA atoms of a backbone (`[N, CA, C]` per residue).
    pub fn ca(backbone: &[[[f32; 3]; 3]]) -> Self {
        Self::new(backbone.iter().map(|res| res[1].map(f64::from)))
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The centred coordinates.
    pub fn points(&self) -> &[[f64; 3]] {
        &self.points
    }

    /// The mirror image (z negated): the same distances, the opposite
    /// handedness. A structure and its mirror image are never superposed by
    /// a proper rotation, so `a.mirrored().rmsd(b)` is near 0 only where `a`
    /// is `b`'s mirror image.
    pub fn mirrored(&self) -> Centered {
        Centered {
            points: self.points.iter().map(|&[x, y, z]| [x, y, -z]).collect(),
        }
    }

    /// The proper rotation `R` (row-major) that minimises
    /// `sum_i |R self_i - target_i|^2`.
    ///
    /// # Panics
    /// If the two have different numbers of points.
    pub fn rotation_onto(&self, target: &Centered) -> [[f64; 3]; 3] {
        assert_eq!(
            self.len(),
            target.len(),
            "superposing {} points onto {}",
            self.len(),
            target.len()
        );
        // s[a][b] = sum_i x_a y_b (x: self, y: target).
        let mut s = [[0.0f64; 3]; 3];
        for (x, y) in self.points.iter().zip(&target.points) {
            for a in 0..3 {
                for b in 0..3 {
                    s[a][b] += x[a] * y[b];
                }
            }
        }
        let [[sxx, sxy, sxz], [syx, syy, syz], [szx, szy, szz]] = s;
        let horn = [
            [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
            [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
            [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
            [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
        ];
        quaternion_rotation(top_eigenvector(horn))
    }

    /// RMSD after optimal superposition (translation and proper rotation), Å.
    /// 0 for no points.
    ///
    /// # Panics
    /// If the two have different numbers of points.
    pub fn rmsd(&self, target: &Centered) -> f64 {
        if self.is_empty() && target.is_empty() {
            return 0.0;
        }
        let r = self.rotation_onto(target);
        let sum: f64 = self
            .points
            .iter()
            .zip(&target.points)
            .map(|(x, y)| {
                let rx: [f64; 3] = std::array::from_fn(|a| (0..3).map(|b| r[a][b] * x[b]).sum());
                dist2(rx, *y)
            })
            .sum();
        (sum / self.len() as f64).sqrt()
    }
}

/// RMSD of two point sets after optimal superposition (translation and
/// proper rotation), Å.
///
/// # Panics
/// If the two have different lengths.
pub fn rmsd(a: &[[f64; 3]], b: &[[f64; 3]]) -> f64 {
    Centered::new(a.iter().copied()).rmsd(&Centered::new(b.iter().copied()))
}

/// CA-RMSD of two backbones (`[N, CA, C]` per residue) after optimal
/// superposition, Å.
///
/// # Panics
/// If the two have different lengths.
pub fn ca_rmsd(a: &[[[f32; 3]; 3]], b: &[[[f32; 3]; 3]]) -> f64 {
    Centered::ca(a).rmsd(&Centered::ca(b))
}

/// The unit eigenvector of the largest eigenvalue of a symmetric 4x4 matrix,
/// by cyclic Jacobi rotations.
fn top_eigenvector(mut a: [[f64; 4]; 4]) -> [f64; 4] {
    let mut v = [[0.0f64; 4]; 4];
    for (k, row) in v.iter_mut().enumerate() {
        row[k] = 1.0;
    }
    let scale: f64 = a.iter().flatten().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let off: f64 = (0..4)
            .flat_map(|p| (p + 1..4).map(move |q| (p, q)))
            .map(|(p, q)| a[p][q] * a[p][q])
            .sum();
        // NaN: a NaN input, nothing to converge to.
        if off <= 1e-32 * scale || off.is_nan() {
            break;
        }
        for p in 0..3 {
            for q in p + 1..4 {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let sign = if theta < 0.0 { -1.0 } else { 1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (kp, kq) = (row[p], row[q]);
                    row[p] = c * kp - s * kq;
                    row[q] = s * kp + c * kq;
                }
                let (row_p, row_q) = (a[p], a[q]);
                a[p] = std::array::from_fn(|k| c * row_p[k] - s * row_q[k]);
                a[q] = std::array::from_fn(|k| s * row_p[k] + c * row_q[k]);
                for row in v.iter_mut() {
                    let (kp, kq) = (row[p], row[q]);
                    row[p] = c * kp - s * kq;
                    row[q] = s * kp + c * kq;
                }
            }
        }
    }
    let top = (0..4)
        .max_by(|&i, &j| a[i][i].total_cmp(&a[j][j]))
        .unwrap_or(0);
    let q = [v[0][top], v[1][top], v[2][top], v[3][top]];
    let norm = q.iter().map(|x| x * x).sum::<f64>().sqrt();
    q.map(|x| x / norm)
}

/// The rotation matrix of a unit quaternion `(w, x, y, z)`.
fn quaternion_rotation([w, x, y, z]: [f64; 4]) -> [[f64; 3]; 3] {
    [
        [
            w * w + x * x - y * y - z * z,
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            w * w - x * x + y * y - z * z,
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            w * w - x * x - y * y + z * z,
        ],
    ]
}

fn dist2(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| (a[k] - b[k]) * (a[k] - b[k])).sum()
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    dist2(a, b).sqrt()
}

/// `max` that keeps a NaN (`f64::max` drops it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator of numbers in [0, 1).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A chiral, irregular set of points: a helix with noise.
    fn helix(n: usize) -> Vec<[f64; 3]> {
        let mut rng = Lcg(7);
        (0..n)
            .map(|i| {
                let t = i as f64 * 100f64.to_radians();
                [
                    2.3 * t.cos() + 0.3 * rng.next(),
                    2.3 * t.sin() + 0.3 * rng.next(),
                    1.5 * i as f64 + 0.3 * rng.next(),
                ]
            })
            .collect()
    }

    /// Rotation about the unit axis `u` by `angle`, then translation by `t`.
    fn rigid_motion(points: &[[f64; 3]], u: [f64; 3], angle: f64, t: [f64; 3]) -> Vec<[f64; 3]> {
        let n = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let u = u.map(|x| x / n);
        let (s, c) = angle.sin_cos();
        let r = [
            [
                c + u[0] * u[0] * (1.0 - c),
                u[0] * u[1] * (1.0 - c) - u[2] * s,
                u[0] * u[2] * (1.0 - c) + u[1] * s,
            ],
            [
                u[1] * u[0] * (1.0 - c) + u[2] * s,
                c + u[1] * u[1] * (1.0 - c),
                u[1] * u[2] * (1.0 - c) - u[0] * s,
            ],
            [
                u[2] * u[0] * (1.0 - c) - u[1] * s,
                u[2] * u[1] * (1.0 - c) + u[0] * s,
                c + u[2] * u[2] * (1.0 - c),
            ],
        ];
        points
            .iter()
            .map(|p| std::array::from_fn(|a| (0..3).map(|b| r[a][b] * p[b]).sum::<f64>() + t[a]))
            .collect()
    }

    #[test]
    fn rmsd_to_a_rotated_and_translated_copy_is_zero() {
        let a = helix(50);
        for (axis, angle) in [
            ([0.3, -0.5, 0.8], 2.0),
            ([1.0, 0.0, 0.0], std::f64::consts::PI),
            ([0.0, 0.0, 1.0], 1e-9),
            ([1.0, 1.0, 1.0], -2.9),
        ] {
            let b = rigid_motion(&a, axis, angle, [10.0, -20.0, 5.5]);
            let r = rmsd(&a, &b);
            assert!(r < 1e-6, "axis {axis:?} angle {angle}: rmsd {r}");
            assert!(rmsd(&b, &a) < 1e-6);
        }
        assert!(rmsd(&a, &a) < 1e-6);
    }

    #[test]
    fn rmsd_to_a_mirror_image_is_not_zero() {
        let a = helix(50);
        let mirrored: Vec<[f64; 3]> = a.iter().map(|p| [p[0], p[1], -p[2]]).collect();
        let b = rigid_motion(&mirrored, [0.2, 0.7, -0.1], 1.0, [3.0, 0.0, -1.0]);
        let r = rmsd(&a, &b);
        assert!(r > 1.0, "a mirror image must not superpose: rmsd {r}");
    }

    #[test]
    fn the_mirror_image_superposes_on_a_mirrored_copy_only() {
        let a = helix(50);
        let reflected: Vec<[f64; 3]> = a.iter().map(|p| [-p[0], p[1], p[2]]).collect();
        let b = Centered::new(rigid_motion(
            &reflected,
            [0.2, 0.7, -0.1],
            1.0,
            [3.0, 0.0, -1.0],
        ));
        let a = Centered::new(a);
        // Reflected through another plane, then moved: a.mirrored() is b.
        assert!(a.mirrored().rmsd(&b) < 1e-6, "{}", a.mirrored().rmsd(&b));
        assert!(a.rmsd(&b) > 1.0);
        // The mirror image of the mirror image is the original.
        assert_eq!(a.mirrored().mirrored().points(), a.points());
        assert!(a.mirrored().rmsd(&a) > 1.0);
    }

    #[test]
    fn rmsd_of_known_displacements() {
        // Cube vertices: mean 0, sum of x_a x_b = 8 delta_ab.
        let cube: Vec<[f64; 3]> = (0..8)
            .map(|i| {
                [
                    if i & 1 == 0 { -1.0 } else { 1.0 },
                    if i & 2 == 0 { -1.0 } else { 1.0 },
                    if i & 4 == 0 { -1.0 } else { 1.0 },
                ]
            })
            .collect();
        // Every atom moved along z by 0.5 z: no rotation helps, rmsd 0.5.
        let stretched: Vec<[f64; 3]> = cube.iter().map(|p| [p[0], p[1], 1.5 * p[2]]).collect();
        let r = rmsd(&cube, &stretched);
        assert!((r - 0.5).abs() < 1e-9, "{r}");
        // Uniform scaling by s: rmsd |s - 1| sqrt(mean |x|^2) = 0.5 sqrt(3),
        // also after moving the scaled copy rigidly.
        let scaled: Vec<[f64; 3]> = cube.iter().map(|p| p.map(|v| 1.5 * v)).collect();
        let moved = rigid_motion(&scaled, [1.0, -2.0, 0.5], 0.7, [4.0, 4.0, 4.0]);
        let r = rmsd(&cube, &moved);
        assert!((r - 0.5 * 3f64.sqrt()).abs() < 1e-9, "{r}");
        // One of four atoms moved by d, translation only: the centroid takes
        // d/4, the moved atom keeps 3d/4; rmsd^2 = (9/16 + 3/16) d^2 / 4.
        let line: Vec<[f64; 3]> = (0..4).map(|i| [0.0, 0.0, i as f64 * 100.0]).collect();
        let mut bent = line.clone();
        bent[0][2] -= 2.0; // along the line: no rotation can absorb it
        let expected = ((9.0 / 16.0 + 3.0 / 16.0) * 4.0 / 4.0f64).sqrt();
        let r = rmsd(&line, &bent);
        assert!((r - expected).abs() < 1e-9, "{r} vs {expected}");
    }

    /// An ideal straight chain: CA every 3.8 Å along x, N and C 1.45 Å from
    /// CA, C(i)-N(i+1) 1.3 Å; nothing else within 8 Å.
    fn ideal_chain(l: usize) -> Vec<[[f32; 3]; 3]> {
        (0..l)
            .map(|i| {
                let x = 3.8 * i as f32;
                [[x - 1.25, 0.7, 0.0], [x, 0.0, 0.0], [x + 1.25, 0.7, 0.0]]
            })
            .collect()
    }

    #[test]
    fn an_ideal_chain_is_valid() {
        let v = validity(&ideal_chain(30));
        assert!(v.valid, "{v:?}");
        assert!(v.failed.is_empty());
        assert!((v.ca_ca_max - 3.8).abs() < 1e-5, "{v:?}");
        assert!((v.c_n_max - 1.3).abs() < 1e-5, "{v:?}");
        assert!(v.clash_min > 8.0, "{v:?}");
        // Too short for any non-local pair.
        let short = validity(&ideal_chain(3));
        assert!(short.valid && short.clash_min.is_infinite(), "{short:?}");
    }

    #[test]
    fn a_ca_ca_gap_fails_only_ca_ca() {
        let mut chain = ideal_chain(30);
        chain[10][1][1] += 3.0; // this CA only: 4.84 Å to both neighbours
        let v = validity(&chain);
        assert!(!v.valid);
        assert_eq!(v.failed, vec![CA_CA], "{v:?}");
        assert!(v.ca_ca_max > MAX_CA_CA && v.c_n_max < MAX_C_N, "{v:?}");
    }

    #[test]
    fn a_long_peptide_bond_fails_only_c_n() {
        let mut chain = ideal_chain(30);
        chain[11][0][2] += 1.7; // N of residue 11: 2.14 Å from C of residue 10
        let v = validity(&chain);
        assert_eq!(v.failed, vec![C_N], "{v:?}");
        assert!(v.c_n_max > MAX_C_N && v.ca_ca_max < MAX_CA_CA, "{v:?}");
    }

    #[test]
    fn a_clash_fails_only_clash_and_near_neighbours_do_not_count() {
        let mut chain = ideal_chain(30);
        // N of the first residue has no peptide bond to check; put it 0.5 Å
        // from the CA of residue 3.
        let ca3 = chain[3][1];
        chain[0][0] = [ca3[0], ca3[1], ca3[2] + 0.5];
        let v = validity(&chain);
        assert_eq!(v.failed, vec![CLASH], "{v:?}");
        assert!((v.clash_min - 0.5).abs() < 1e-5, "{v:?}");
        // The same, two residues apart: not a clash by the criteria.
        let mut chain = ideal_chain(30);
        let ca2 = chain[2][1];
        chain[0][0] = [ca2[0], ca2[1], ca2[2] + 0.5];
        let v = validity(&chain);
        assert!(v.valid, "{v:?}");
    }

    #[test]
    fn non_finite_coordinates_fail() {
        let mut chain = ideal_chain(10);
        chain[5][1][0] = f32::NAN;
        let v = validity(&chain);
        assert!(!v.valid);
        assert!(
            v.failed.contains(&CA_CA) && v.failed.contains(&CLASH),
            "{v:?}"
        );
    }

    #[test]
    fn sweep_finds_the_same_minimum_as_all_pairs() {
        let mut rng = Lcg(42);
        for trial in 0..20 {
            // A random walk of CA steps 3.8 Å: compact, with close contacts.
            let mut pos = [0.0f64; 3];
            let chain: Vec<[[f32; 3]; 3]> = (0..120)
                .map(|_| {
                    let d = [rng.next() - 0.5, rng.next() - 0.5, rng.next() - 0.5];
                    let n = d.iter().map(|x| x * x).sum::<f64>().sqrt();
                    for k in 0..3 {
                        pos[k] += 3.8 * d[k] / n;
                    }
                    let jitter = |rng: &mut Lcg| -> [f32; 3] {
                        std::array::from_fn(|k| (pos[k] + 1.4 * (rng.next() - 0.5)) as f32)
                    };
                    let n_atom = jitter(&mut rng);
                    let c_atom = jitter(&mut rng);
                    [n_atom, pos.map(|v| v as f32), c_atom]
                })
                .collect();
            let atoms: Vec<[[f64; 3]; 3]> =
                chain.iter().map(|r| r.map(|a| a.map(f64::from))).collect();
            let mut brute = f64::INFINITY;
            for i in 0..atoms.len() {
                for j in i + 3..atoms.len() {
                    for a in atoms[i] {
                        for b in atoms[j] {
                            brute = brute.min(dist(a, b));
                        }
                    }
                }
            }
            let v = validity(&chain);
            assert_eq!(v.clash_min, brute, "trial {trial}");
        }
    }
}
