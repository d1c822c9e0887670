//! Potentials on a structure's CA atoms, in units of kT, for steering
//! ([`super::steering`]): physical terms (chain breaks, clashes) and
//! collective variables (CA-RMSD to a reference after superposition, radius
//! of gyration, the CA-CA distance of two residues, the fraction of native
//! contacts Q). Steering evaluates them on the denoised structure the
//! network predicts at each step (translations `T + sigma_tr^2 s_T`; the
//! rotations are not used: every potential here reads CA atoms only).
//!
//! # The flat-bottom form
//! Each term maps a value `v` (a distance, an RMSD, ...) to an energy with
//! `weight`, `target`, `flat_bottom`, `slope`, `order`, optional
//! `linear_from` and a `side`:
//!
//! ```text
//! e = max(0, |v - target| - flat_bottom)      side "both"
//! e = max(0, (target - flat_bottom) - v)      side "below" (only values under target count)
//! e = max(0, v - (target + flat_bottom))      side "above"
//! g(e) = (slope e)^order                                     e <= linear_from (or no linear_from)
//! g(e) = g(lf) + order slope^order lf^(order-1) (e - lf)     e > lf = linear_from (linear tail)
//! U = weight g(e)
//! ```
//!
//! Per term (defaults in brackets):
//! * `chain_break`: `v` = CA(i)-CA(i+1) distance, summed over consecutive
//!   pairs [target 3.8 Å, flat_bottom 0.5, side both];
//! * `clash`: `v` = CA-CA distance of residues more than `min_separation`
//!   [2] apart, summed over pairs [target 4.0 Å, side below];
//! * `rmsd`: CA-RMSD to `reference` after optimal superposition [target 0,
//!   side both]; the reference must have the protein's length;
//! * `rg`: radius of gyration of the CA atoms (`target` required);
//! * `distance`: CA-CA distance of `residues: [i, j]` (1-based positions in
//!   the sequence; `target` required);
//! * `q`: fraction of native contacts to `reference`, CA-based: native pairs
//!   are residues more than 3 apart with reference CA-CA below `cutoff` [10
//!   Å], `Q = mean 1 / (1 + exp(5 (d - 1.2 d_ref)))` (Best-Hummer-Eaton with
//!   beta 5 /Å and lambda 1.2 for CA atoms) [target 1, side below].
//!
//! The defaults otherwise: weight 1, flat_bottom 0, slope 1, order 2, no
//! linear tail.

use serde::{Deserialize, Serialize};

use crate::evaluate::Centered;

/// Which deviations from the target count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Both,
    Below,
    Above,
}

/// The kinds of potential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PotentialKind {
    ChainBreak,
    Clash,
    Rmsd,
    Rg,
    Distance,
    Q,
}

impl PotentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PotentialKind::ChainBreak => "chain_break",
            PotentialKind::Clash => "clash",
            PotentialKind::Rmsd => "rmsd",
            PotentialKind::Rg => "rg",
            PotentialKind::Distance => "distance",
            PotentialKind::Q => "q",
        }
    }
}

/// One potential term as a user writes it (JSON); see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PotentialSpec {
    #[serde(rename = "type")]
    pub kind: PotentialKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_bottom: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slope: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_from: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    /// `distance`: the two residues, 1-based.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residues: Option<[usize; 2]>,
    /// `clash`: pairs of residues more than this many apart count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_separation: Option<usize>,
    /// `q`: native-contact cutoff in the reference, Å.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<f64>,
    /// `rmsd`, `q`: a PDB file (the CLI reads it, relative to the steering
    /// file, and replaces it by `reference_ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// `rmsd`, `q`: the reference's CA coordinates, Å, one per residue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_ca: Option<Vec<[f64; 3]>>,
}

/// The flat-bottom form of a term (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlatBottom {
    pub weight: f64,
    pub target: f64,
    pub flat_bottom: f64,
    pub slope: f64,
    pub order: f64,
    pub linear_from: Option<f64>,
    pub side: Side,
}

impl FlatBottom {
    /// `(U(v), dU/dv)`.
    pub fn eval(&self, v: f64) -> (f64, f64) {
        let (e, sign) = match self.side {
            Side::Both => {
                let d = v - self.target;
                ((d.abs() - self.flat_bottom).max(0.0), d.signum())
            }
            Side::Below => (((self.target - self.flat_bottom) - v).max(0.0), -1.0),
            Side::Above => ((v - (self.target + self.flat_bottom)).max(0.0), 1.0),
        };
        if e <= 0.0 {
            return (0.0, 0.0);
        }
        let (s, n) = (self.slope, self.order);
        let (g, dg) = match self.linear_from {
            Some(lf) if e > lf => {
                let slope_at = n * s.powf(n) * lf.powf(n - 1.0);
                ((s * lf).powf(n) + slope_at * (e - lf), slope_at)
            }
            _ => ((s * e).powf(n), n * s * (s * e).powf(n - 1.0)),
        };
        (self.weight * g, self.weight * dg * sign)
    }
}

/// What a term measures, with whatever it precomputes.
#[derive(Debug, Clone, PartialEq)]
enum Measure {
    ChainBreak,
    Clash { min_separation: usize },
    Rmsd { reference: Centered },
    Rg,
    Distance { i: usize, j: usize },
    Q { contacts: Vec<(usize, usize, f64)> },
}

/// A validated potential term for a protein of a given length.
#[derive(Debug, Clone, PartialEq)]
pub struct Potential {
    pub kind: PotentialKind,
    pub form: FlatBottom,
    measure: Measure,
}

const Q_BETA: f64 = 5.0;
const Q_LAMBDA: f64 = 1.2;

fn finite(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{name} must be a finite number, got {v}"))
    }
}

impl PotentialSpec {
    /// The term for a protein of `len` residues; errors name the field
    /// (relative to this term).
    pub fn compile(&self, len: usize) -> Result<Potential, String> {
        use PotentialKind::*;
        let kind = self.kind;
        let (target_default, side_default, flat_default) = match kind {
            ChainBreak => (Some(3.8), Side::Both, 0.5),
            Clash => (Some(4.0), Side::Below, 0.0),
            Rmsd => (Some(0.0), Side::Both, 0.0),
            Q => (Some(1.0), Side::Below, 0.0),
            Rg | Distance => (None, Side::Both, 0.0),
        };
        let target = match self.target.or(target_default) {
            Some(t) => finite("target", t)?,
            None => {
                return Err(format!(
                    "target: required for a {} potential",
                    kind.as_str()
                ))
            }
        };
        let form = FlatBottom {
            weight: finite("weight", self.weight.unwrap_or(1.0))?,
            target,
            flat_bottom: finite("flat_bottom", self.flat_bottom.unwrap_or(flat_default))?,
            slope: finite("slope", self.slope.unwrap_or(1.0))?,
            order: finite("order", self.order.unwrap_or(2.0))?,
            linear_from: self
                .linear_from
                .map(|v| finite("linear_from", v))
                .transpose()?,
            side: self.side.unwrap_or(side_default),
        };
        if form.weight < 0.0 {
            return Err(format!("weight: must be at least 0, got {}", form.weight));
        }
        if form.flat_bottom < 0.0 {
            return Err(format!(
                "flat_bottom: must be at least 0, got {}",
                form.flat_bottom
            ));
        }
        if form.slope <= 0.0 {
            return Err(format!("slope: must be positive, got {}", form.slope));
        }
        if !(1.0..=8.0).contains(&form.order) {
            return Err(format!(
                "order: must be between 1 and 8, got {}",
                form.order
            ));
        }
        if let Some(lf) = form.linear_from {
            if lf <= 0.0 {
                return Err(format!("linear_from: must be positive, got {lf}"));
            }
        }
        let unused = |field: &str, present: bool| -> Result<(), String> {
            if present {
                Err(format!(
                    "{field}: not a parameter of a {} potential",
                    kind.as_str()
                ))
            } else {
                Ok(())
            }
        };
        let reference = || -> Result<Vec<[f64; 3]>, String> {
            if self.reference.is_some() && self.reference_ca.is_none() {
                return Err("reference: a file name is read by digctl; a job takes reference_ca (the CA coordinates)".into());
            }
            let ca = self.reference_ca.clone().ok_or_else(|| {
                format!("reference_ca: required for a {} potential", kind.as_str())
            })?;
            if ca.len() != len {
                return Err(format!(
                    "reference_ca: the reference has {} residues, the protein {len}",
                    ca.len()
                ));
            }
            if ca.iter().flatten().any(|v| !v.is_finite()) {
                return Err("reference_ca: coordinates must be finite".into());
            }
            Ok(ca)
        };
        unused("residues", self.residues.is_some() && kind != Distance)?;
        unused(
            "min_separation",
            self.min_separation.is_some() && kind != Clash,
        )?;
        unused("cutoff", self.cutoff.is_some() && kind != Q)?;
        unused(
            "reference_ca",
            self.reference_ca.is_some() && !matches!(kind, Rmsd | Q),
        )?;
        unused(
            "reference",
            self.reference.is_some() && !matches!(kind, Rmsd | Q),
        )?;
        let measure = match kind {
            ChainBreak => Measure::ChainBreak,
            // A separation past the chain leaves no pair (and cannot
            // overflow the loop's bounds).
            Clash => Measure::Clash {
                min_separation: self.min_separation.unwrap_or(2).min(len),
            },
            Rg => Measure::Rg,
            Distance => {
                let [a, b] = self
                    .residues
                    .ok_or("residues: required for a distance potential ([i, j], 1-based)")?;
                if a == 0 || b == 0 || a > len || b > len || a == b {
                    return Err(format!(
                        "residues: [{a}, {b}] must be two different positions in 1..={len}"
                    ));
                }
                Measure::Distance { i: a - 1, j: b - 1 }
            }
            Rmsd => Measure::Rmsd {
                reference: Centered::new(reference()?),
            },
            Q => {
                let cutoff = finite("cutoff", self.cutoff.unwrap_or(10.0))?;
                if cutoff <= 0.0 {
                    return Err(format!("cutoff: must be positive, got {cutoff}"));
                }
                let ca = reference()?;
                let mut contacts = Vec::new();
                for i in 0..len {
                    for j in i + 4..len {
                        let d = dist(ca[i], ca[j]);
                        if d < cutoff {
                            contacts.push((i, j, d));
                        }
                    }
                }
                if contacts.is_empty() {
                    return Err(format!(
                        "reference_ca: no native contacts within the cutoff of {cutoff} Å"
                    ));
                }
                Measure::Q { contacts }
            }
        };
        Ok(Potential {
            kind,
            form,
            measure,
        })
    }
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    let d = sub(a, b);
    (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
}

/// Adds `c * d|a - b|/da` to `grad[i]` and its negative to `grad[j]`.
fn push_pair(grad: &mut [[f64; 3]], i: usize, j: usize, ca: &[[f64; 3]], c: f64) {
    let d = sub(ca[i], ca[j]);
    let r = dist(ca[i], ca[j]).max(1e-12);
    for k in 0..3 {
        grad[i][k] += c * d[k] / r;
        grad[j][k] -= c * d[k] / r;
    }
}

impl Potential {
    /// The collective variable itself (the sum's terms have none: NaN), for
    /// reports.
    pub fn value(&self, ca: &[[f64; 3]]) -> f64 {
        match &self.measure {
            Measure::ChainBreak | Measure::Clash { .. } => f64::NAN,
            Measure::Rmsd { reference } => Centered::new(ca.iter().copied()).rmsd(reference),
            Measure::Rg => rg(ca),
            Measure::Distance { i, j } => dist(ca[*i], ca[*j]),
            Measure::Q { contacts } => q_value(ca, contacts),
        }
    }

    /// The energy (kT) of the CA atoms `ca`, one per residue.
    pub fn energy(&self, ca: &[[f64; 3]]) -> f64 {
        self.energy_and_gradient(ca, false).0
    }

    /// The energy and, when `with_gradient`, its gradient with respect to
    /// every CA position (else empty).
    pub fn energy_and_gradient(
        &self,
        ca: &[[f64; 3]],
        with_gradient: bool,
    ) -> (f64, Vec<[f64; 3]>) {
        let n = ca.len();
        let mut grad = if with_gradient {
            vec![[0.0; 3]; n]
        } else {
            Vec::new()
        };
        let f = &self.form;
        let mut u = 0.0;
        match &self.measure {
            Measure::ChainBreak => {
                for i in 0..n.saturating_sub(1) {
                    let (e, de) = f.eval(dist(ca[i], ca[i + 1]));
                    u += e;
                    if with_gradient && de != 0.0 {
                        push_pair(&mut grad, i + 1, i, ca, de);
                    }
                }
            }
            Measure::Clash { min_separation } => {
                // Only distances under the target (plus flat bottom, for
                // side both/above) can count: skip the square root otherwise.
                let reach = f.target + f.flat_bottom;
                let reach2 = if f.side == Side::Below {
                    reach * reach
                } else {
                    f64::INFINITY
                };
                for i in 0..n {
                    for j in i + min_separation + 1..n {
                        let d = sub(ca[i], ca[j]);
                        let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
                        if r2 >= reach2 {
                            continue;
                        }
                        let (e, de) = f.eval(r2.sqrt());
                        u += e;
                        if with_gradient && de != 0.0 {
                            push_pair(&mut grad, i, j, ca, de);
                        }
                    }
                }
            }
            Measure::Rg => {
                let g = rg(ca);
                let (e, de) = f.eval(g);
                u = e;
                if with_gradient && de != 0.0 && g > 0.0 {
                    let c = centre(ca);
                    for (gi, x) in grad.iter_mut().zip(ca) {
                        for k in 0..3 {
                            gi[k] = de * (x[k] - c[k]) / (n as f64 * g);
                        }
                    }
                }
            }
            Measure::Distance { i, j } => {
                let (e, de) = f.eval(dist(ca[*i], ca[*j]));
                u = e;
                if with_gradient && de != 0.0 {
                    push_pair(&mut grad, *i, *j, ca, de);
                }
            }
            Measure::Rmsd { reference } => {
                let x = Centered::new(ca.iter().copied());
                let r = x.rotation_onto(reference);
                let y = reference.points();
                let mut sum = 0.0;
                // R^T y_i: the reference in the structure's frame.
                let back: Vec<[f64; 3]> = y
                    .iter()
                    .map(|p| std::array::from_fn(|b| (0..3).map(|a| r[a][b] * p[a]).sum()))
                    .collect();
                for (xi, yi) in x.points().iter().zip(&back) {
                    let d = sub(*xi, *yi);
                    sum += d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
                }
                let rmsd = (sum / n as f64).sqrt();
                let (e, de) = f.eval(rmsd);
                u = e;
                if with_gradient && de != 0.0 && rmsd > 0.0 {
                    for ((gi, xi), yi) in grad.iter_mut().zip(x.points()).zip(&back) {
                        for k in 0..3 {
                            gi[k] = de * (xi[k] - yi[k]) / (n as f64 * rmsd);
                        }
                    }
                }
            }
            Measure::Q { contacts } => {
                let q = q_value(ca, contacts);
                let (e, de) = f.eval(q);
                u = e;
                if with_gradient && de != 0.0 {
                    let m = contacts.len() as f64;
                    for &(i, j, d0) in contacts {
                        let s = sigmoid_q(dist(ca[i], ca[j]), d0);
                        push_pair(&mut grad, i, j, ca, de * (-Q_BETA * s * (1.0 - s) / m));
                    }
                }
            }
        }
        (u, grad)
    }
}

fn centre(ca: &[[f64; 3]]) -> [f64; 3] {
    let n = ca.len().max(1) as f64;
    let mut c = [0.0; 3];
    for x in ca {
        for k in 0..3 {
            c[k] += x[k] / n;
        }
    }
    c
}

/// Radius of gyration, Å.
pub fn rg(ca: &[[f64; 3]]) -> f64 {
    let c = centre(ca);
    let n = ca.len().max(1) as f64;
    (ca.iter()
        .map(|x| {
            let d = sub(*x, c);
            d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        })
        .sum::<f64>()
        / n)
        .sqrt()
}

fn sigmoid_q(d: f64, d0: f64) -> f64 {
    1.0 / (1.0 + (Q_BETA * (d - Q_LAMBDA * d0)).exp())
}

fn q_value(ca: &[[f64; 3]], contacts: &[(usize, usize, f64)]) -> f64 {
    contacts
        .iter()
        .map(|&(i, j, d0)| sigmoid_q(dist(ca[i], ca[j]), d0))
        .sum::<f64>()
        / contacts.len() as f64
}

/// Every term of a steering set, summed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PotentialSet {
    pub terms: Vec<Potential>,
}

impl PotentialSet {
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn energy(&self, ca: &[[f64; 3]]) -> f64 {
        self.terms.iter().map(|t| t.energy(ca)).sum()
    }

    /// The energy and its gradient with respect to the CA positions.
    pub fn energy_and_gradient(&self, ca: &[[f64; 3]]) -> (f64, Vec<[f64; 3]>) {
        let mut grad = vec![[0.0; 3]; ca.len()];
        let mut u = 0.0;
        for t in &self.terms {
            let (e, g) = t.energy_and_gradient(ca, true);
            u += e;
            for (a, b) in grad.iter_mut().zip(g) {
                for k in 0..3 {
                    a[k] += b[k];
                }
            }
        }
        (u, grad)
    }
}
