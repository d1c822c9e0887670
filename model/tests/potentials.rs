//! Each steering potential's value and gradient on crafted structures: the
//! values worked out by hand, the gradients against central differences.

use dig_model::sampling::potentials::{PotentialKind, PotentialSpec, Side};
use dig_model::sampling::steering::{preset, SteerSpec};
use dig_model::sampling::Solver;

fn spec(kind: PotentialKind) -> PotentialSpec {
    PotentialSpec {
        kind,
        weight: None,
        target: None,
        flat_bottom: None,
        slope: None,
        order: None,
        linear_from: None,
        side: None,
        residues: None,
        min_separation: None,
        cutoff: None,
        reference: None,
        reference_ca: None,
    }
}

/// A straight chain along x with CA-CA spacing `d`.
fn line(n: usize, d: f64) -> Vec<[f64; 3]> {
    (0..n).map(|i| [i as f64 * d, 0.0, 0.0]).collect()
}

/// A wiggly, irregular chain (no symmetry that would hide a wrong gradient).
fn wiggly(n: usize) -> Vec<[f64; 3]> {
    (0..n)
        .map(|i| {
            let t = i as f64;
            [
                3.1 * t + 0.7 * (1.3 * t).sin(),
                2.0 * (0.9 * t).cos() + 0.1 * t,
                1.5 * (0.4 * t).sin() * t.sqrt(),
            ]
        })
        .collect()
}

fn check_gradient(p: &dig_model::sampling::potentials::Potential, x: &[[f64; 3]]) {
    let (u, g) = p.energy_and_gradient(x, true);
    assert!(
        u > 0.0,
        "{:?}: the crafted structure must have energy to test a gradient",
        p.kind
    );
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..x.len() {
        for k in 0..3 {
            let mut a = x.to_vec();
            let mut b = x.to_vec();
            a[i][k] += h;
            b[i][k] -= h;
            let fd = (p.energy(&a) - p.energy(&b)) / (2.0 * h);
            worst = worst.max((fd - g[i][k]).abs() / (1.0 + fd.abs()));
        }
    }
    assert!(worst < 1e-5, "{:?}: gradient off by {worst}", p.kind);
}

#[test]
fn chain_break_counts_only_gaps_past_the_flat_bottom() {
    let mut s = spec(PotentialKind::ChainBreak);
    s.flat_bottom = Some(0.5);
    s.slope = Some(2.0);
    s.order = Some(2.0);
    let p = s.compile(5).unwrap();
    // 3.8 +- 0.5 is free.
    assert_eq!(p.energy(&line(5, 3.8)), 0.0);
    assert_eq!(p.energy(&line(5, 4.29)), 0.0);
    // Spacing 5.0: each of 4 gaps exceeds by 0.7: 4 * (2 * 0.7)^2 = 7.84.
    assert!((p.energy(&line(5, 5.0)) - 7.84).abs() < 1e-12);
    // Too short counts as well (side both): 3.0 is 0.3 past: 4 * 0.36 = 1.44.
    assert!((p.energy(&line(5, 3.0)) - 1.44).abs() < 1e-12);
    // A linear tail from 1 Å past: at 0.3 + ... spacing 6.3 -> e = 2.0:
    // g(1) = 4, slope there 2 * 2^2 * 1 = 8, g(2) = 4 + 8 = 12 per gap.
    s.linear_from = Some(1.0);
    let p = s.compile(5).unwrap();
    assert!((p.energy(&line(5, 6.3)) - 48.0).abs() < 1e-9);
    check_gradient(
        &p,
        &line(5, 5.1)
            .iter()
            .enumerate()
            .map(|(i, v)| [v[0], 0.3 * i as f64, 0.0])
            .collect::<Vec<_>>(),
    );
}

#[test]
fn clash_counts_close_pairs_more_than_two_apart() {
    let mut s = spec(PotentialKind::Clash);
    s.slope = Some(1.0);
    let p = s.compile(6).unwrap();
    // A straight chain at 3.8 Å: residues 3 apart are 11.4 Å apart: no clash.
    assert_eq!(p.energy(&line(6, 3.8)), 0.0);
    // Fold residue 5 back onto residue 0 at 3 Å: one pair 1 Å under 4.0.
    let mut x = line(5, 3.8);
    x.push([0.0, 3.0, 0.0]);
    let d5: Vec<f64> = (1..5)
        .map(|i| ((x[i][0]).powi(2) + 9.0f64).sqrt())
        .collect();
    let want: f64 = 1.0
        + d5.iter()
            .filter(|&&d| d < 4.0)
            .map(|d| (4.0 - d).powi(2))
            .sum::<f64>();
    // Pairs with residue 5 more than 2 apart: (0,5), (1,5), (2,5).
    let want_pairs: f64 = 1.0
        + [1usize, 2]
            .iter()
            .map(|&i| ((x[i][0]).powi(2) + 9.0f64).sqrt())
            .filter(|&d| d < 4.0)
            .map(|d| (4.0 - d).powi(2))
            .sum::<f64>();
    let _ = want;
    assert!(
        (p.energy(&x) - want_pairs).abs() < 1e-12,
        "{} vs {want_pairs}",
        p.energy(&x)
    );
    check_gradient(&p, &x);
    // A separation past the chain (any usize the API reads): no
    // pair, no energy, no overflow.
    let mut far = spec(PotentialKind::Clash);
    far.min_separation = Some(usize::MAX);
    let p = far.compile(6).unwrap();
    assert_eq!(p.energy(&x), 0.0);
}

#[test]
fn rg_distance_rmsd_and_q_measure_what_they_say() {
    let n = 12;
    let x = wiggly(n);
    // Radius of gyration of a line of 3 points at -1, 0, 1: sqrt(2/3).
    let mut s = spec(PotentialKind::Rg);
    s.target = Some(0.0);
    let p = s.compile(3).unwrap();
    let pts = [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]];
    assert!((p.value(&pts) - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert!((p.energy(&pts) - 2.0 / 3.0).abs() < 1e-12);
    let mut s = spec(PotentialKind::Rg);
    s.target = Some(3.0);
    check_gradient(&s.compile(n).unwrap(), &x);

    let mut s = spec(PotentialKind::Distance);
    s.residues = Some([1, 3]);
    s.target = Some(1.0);
    s.side = Some(Side::Above);
    let p = s.compile(3).unwrap();
    assert_eq!(p.value(&pts), 2.0);
    assert_eq!(p.energy(&pts), 1.0);
    let mut s = spec(PotentialKind::Distance);
    s.residues = Some([2, 9]);
    s.target = Some(5.0);
    check_gradient(&s.compile(n).unwrap(), &x);

    // RMSD to a rotated and shifted copy is 0; to a copy with one atom
    // moved by 2 Å along a direction, positive and rotation-invariant.
    let rotated: Vec<[f64; 3]> = x
        .iter()
        .map(|v| [-v[1] + 4.0, v[0] - 1.0, v[2] + 2.0])
        .collect();
    let mut s = spec(PotentialKind::Rmsd);
    s.reference_ca = Some(rotated.clone());
    let p = s.compile(n).unwrap();
    assert!(p.value(&x) < 1e-9, "{}", p.value(&x));
    let mut moved = rotated.clone();
    moved[4][2] += 2.0;
    s.reference_ca = Some(moved);
    let p = s.compile(n).unwrap();
    let r = p.value(&x);
    assert!(r > 0.3 && r < 2.0 / (n as f64).sqrt() + 1e-9, "{r}");
    check_gradient(&p, &x);

    // Q of the reference itself is sigmoid(5 (d - 1.2 d)) averaged: each
    // contact 1 / (1 + exp(-d)), so above 0.99 for contacts over 4.6 Å.
    // An alpha helix: contacts i, i+4 at about 6.2 Å.
    let x: Vec<[f64; 3]> = (0..n)
        .map(|i| {
            let a = (100.0f64 * i as f64).to_radians();
            [2.3 * a.cos(), 2.3 * a.sin(), 1.5 * i as f64]
        })
        .collect();
    let mut s = spec(PotentialKind::Q);
    s.reference_ca = Some(x.clone());
    s.target = Some(1.0);
    let p = s.compile(n).unwrap();
    let q = p.value(&x);
    assert!(q > 0.99 && q < 1.0, "{q}");
    // Stretched by 2x every contact is lost.
    let far: Vec<[f64; 3]> = x
        .iter()
        .map(|v| [2.0 * v[0], 2.0 * v[1], 2.0 * v[2]])
        .collect();
    assert!(p.value(&far) < 0.05);
    assert!(p.energy(&far) > 0.9);
    let squeezed: Vec<[f64; 3]> = x
        .iter()
        .map(|v| [1.3 * v[0], 1.25 * v[1], 1.2 * v[2]])
        .collect();
    check_gradient(&p, &squeezed);
}

#[test]
fn steering_specs_are_checked_field_by_field() {
    let err = |text: &str| {
        let spec = SteerSpec::from_json(text);
        match spec {
            Err(e) => e,
            Ok(s) => s.compile(10, Solver::Euler).unwrap_err(),
        }
    };
    assert!(err(r#"{"potentials": [{"type": "bogus"}]}"#)
        .starts_with("potentials[0].type: unknown variant `bogus`"));
    assert!(
        err(r#"{"particles": 0, "potentials": [{"type": "clash"}]}"#)
            .starts_with("particles: must be between 1 and 64")
    );
    assert!(
        err(r#"{"particles": 65, "potentials": [{"type": "clash"}]}"#).starts_with("particles:")
    );
    assert!(
        err(r#"{"ess_threshold": 1.5, "potentials": [{"type": "clash"}]}"#)
            .starts_with("ess_threshold:")
    );
    assert!(
        err(r#"{"window": [0.1, 0.9], "potentials": [{"type": "clash"}]}"#).starts_with("window:")
    );
    assert!(err(r#"{"noise": 0, "potentials": [{"type": "clash"}]}"#).starts_with("noise:"));
    assert!(
        err(r#"{"potentials": [{"type": "rg"}]}"#).starts_with("potentials[0].target: required")
    );
    assert!(err(
        r#"{"potentials": [{"type": "clash"}, {"type": "rg", "target": 3, "slope": -1}]}"#
    )
    .starts_with("potentials[1].slope:"));
    assert!(
        err(r#"{"potentials": [{"type": "distance", "residues": [1, 11], "target": 3}]}"#)
            .starts_with("potentials[0].residues:")
    );
    assert!(
        err(r#"{"potentials": [{"type": "rmsd", "reference_ca": [[0,0,0]]}]}"#).starts_with(
            "potentials[0].reference_ca: the reference has 1 residues, the protein 10"
        )
    );
    assert!(
        err(r#"{"potentials": [{"type": "clash", "residues": [1, 2]}]}"#)
            .starts_with("potentials[0].residues: not a parameter")
    );
    let e = err(r#"{"potentials": [{"type": "clash"}], "particle": 3}"#);
    assert!(e.contains("unknown field `particle`"), "{e}");
    assert!(err(r#"{"potentials": []}"#).starts_with("potentials: more than one particle"));
    let ok = SteerSpec::from_json(r#"{"potentials": [{"type": "clash"}]}"#).unwrap();
    assert!(ok
        .compile(10, Solver::Ab2)
        .unwrap_err()
        .starts_with("solver:"));
    let physical = preset("physical").unwrap();
    let s = physical.compile(10, Solver::Euler).unwrap();
    assert_eq!(s.particles, 4);
    assert_eq!(s.potentials.terms.len(), 2);
}
