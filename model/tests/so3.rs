//! The IGSO(3) tables against the published code's output
//! (`tests/data/so3_tables.npz`, made by the published numpy implementation).

use std::f64::consts::PI;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use dig_model::so3::{row, So3Tables, N_EPS, N_OMEGA};
use tch::Tensor;

const REL_TOL: f64 = 1e-6;

/// One table for the tests that only read it; the timed test computes its own.
fn tables() -> &'static So3Tables {
    static TABLES: OnceLock<So3Tables> = OnceLock::new();
    TABLES.get_or_init(So3Tables::compute)
}

struct Reference {
    eps: Vec<f64>,
    omegas: Vec<f64>,
    exp_score_norms: Vec<f64>,
    rows: Vec<usize>,
    /// (rows.len(), N_OMEGA), row-major.
    score_norms: Vec<f64>,
    /// (rows.len(), N_OMEGA), row-major.
    cdf_vals: Vec<f64>,
}

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/so3_tables.npz");
    let arrays = Tensor::read_npz(&path).expect("read so3_tables.npz");
    let get = |name: &str| -> Tensor {
        arrays
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing from so3_tables.npz"))
            .1
            .shallow_clone()
    };
    let floats =
        |name: &str| -> Vec<f64> { Vec::<f64>::try_from(get(name).flatten(0, -1)).unwrap() };
    let rows = Vec::<i64>::try_from(get("rows"))
        .unwrap()
        .into_iter()
        .map(|r| r as usize)
        .collect();
    Reference {
        eps: floats("eps"),
        omegas: floats("omegas"),
        exp_score_norms: floats("exp_score_norms"),
        rows,
        score_norms: floats("score_norms"),
        cdf_vals: floats("cdf_vals"),
    }
}

/// Largest `|actual - expected| / max(|expected|, floor)`, with its index.
/// A NaN anywhere counts as an infinite error.
fn max_rel_error(actual: &[f64], expected: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len());
    let mut worst = (0.0, 0);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let rel = (a - e).abs() / e.abs().max(floor);
        let rel = if rel.is_nan() { f64::INFINITY } else { rel };
        if rel > worst.0 {
            worst = (rel, i);
        }
    }
    worst
}

#[test]
fn grids_equal_reference() {
    let reference = reference();
    let tables = tables();
    assert_eq!(tables.eps.len(), N_EPS);
    assert_eq!(tables.omegas.len(), N_OMEGA);
    let (eps_err, _) = max_rel_error(&tables.eps, &reference.eps, 0.0);
    let (omega_err, _) = max_rel_error(&tables.omegas, &reference.omegas, 0.0);
    println!("max rel error: eps {eps_err:e}, omegas {omega_err:e}");
    assert!(eps_err < REL_TOL, "eps: {eps_err:e}");
    assert!(omega_err < REL_TOL, "omegas: {omega_err:e}");
}

#[test]
fn exp_score_norms_equal_reference() {
    let reference = reference();
    let start = Instant::now();
    let tables = So3Tables::compute();
    println!("So3Tables::compute() took {:?}", start.elapsed());
    let (err, at) = max_rel_error(&tables.exp_score_norms, &reference.exp_score_norms, 0.0);
    println!("exp_score_norms max rel error {err:e} at eps index {at}");
    assert!(
        err < REL_TOL,
        "exp_score_norms[{at}]: {} vs {} (rel {err:e})",
        tables.exp_score_norms[at],
        reference.exp_score_norms[at]
    );
}

/// The score rows are compared where the published direct sum means
/// something: where the kernel `f = pdf / ((1 - cos w) / pi)` is at least
/// 1e-6 of its peak (the density itself also vanishes at `w -> 0` through
/// the Haar factor, which is exact and not a reason to skip). The published
/// `f` carries rounding noise of about 1e-15 of its peak (cancellation in an
/// oscillating sum), so its score is good to ~1e-9 at that level and to only
/// ~1e-6 at 1e-9 of the peak; further out, for small eps, `f` is pure noise
/// around zero and its score swings through thousands with either sign,
/// where ours is the true value. Those points carry no weight in
/// `exp_score_norm` (checked by the test above).
///
/// The score vanishes at `omega = pi` by symmetry, where the published value
/// is rounding noise (e.g. -3e-11 for eps[699]); so errors are relative to
/// `max(|expected|, 1e-4 * the row's largest |expected|)`. That floor only
/// reaches the last angle: one step before pi the score is already ~1e-3 of
/// the row's largest.
#[test]
fn score_rows_equal_reference_where_density_is_resolved() {
    let reference = reference();
    let mut worst: f64 = 0.0;
    for (i, &e) in reference.rows.iter().enumerate() {
        let (score, pdf, _) = row(e);
        let expected = &reference.score_norms[i * N_OMEGA..(i + 1) * N_OMEGA];
        let kernel: Vec<f64> = (0..N_OMEGA)
            .map(|m| pdf[m] * PI / (1.0 - reference.omegas[m].cos()))
            .collect();
        let peak = kernel.iter().cloned().fold(0.0, f64::max);
        let resolved: Vec<usize> = (0..N_OMEGA).filter(|&m| kernel[m] >= 1e-6 * peak).collect();
        assert!(!resolved.is_empty());
        let actual: Vec<f64> = resolved.iter().map(|&m| score[m]).collect();
        let wanted: Vec<f64> = resolved.iter().map(|&m| expected[m]).collect();
        let floor = 1e-4 * wanted.iter().fold(0.0, |a: f64, s| a.max(s.abs()));
        let (err, at) = max_rel_error(&actual, &wanted, floor);
        println!(
            "score row eps[{e}]: {} of {N_OMEGA} angles resolved, max rel error {err:e}",
            resolved.len()
        );
        assert!(
            err < REL_TOL,
            "score eps[{e}] omega[{}]: {} vs {} (rel {err:e})",
            resolved[at],
            actual[at],
            wanted[at]
        );
        worst = worst.max(err);
    }
    println!("score rows max rel error {worst:e}");
}

/// The cdf is compared at every angle. Its smallest value, the first angle
/// of the widest eps, is about 6e-10, so a floor of 1e-12 (below which an
/// error would count absolutely) never comes into play on these rows; it
/// only keeps the measure finite if a cdf value were ever zero.
#[test]
fn cdf_rows_equal_reference() {
    let reference = reference();
    let mut worst: f64 = 0.0;
    for (i, &e) in reference.rows.iter().enumerate() {
        let (_, _, cdf) = row(e);
        let expected = &reference.cdf_vals[i * N_OMEGA..(i + 1) * N_OMEGA];
        let (err, at) = max_rel_error(&cdf, expected, 1e-12);
        assert!(
            err < REL_TOL,
            "cdf eps[{e}] omega[{at}]: {} vs {} (rel {err:e})",
            cdf[at],
            expected[at]
        );
        worst = worst.max(err);
    }
    println!("cdf rows max rel error {worst:e}");
}

#[test]
fn lookup_uses_published_index_with_clipping() {
    let tables = tables();
    // The ends of the grid; EPS_MAX itself computes 1000 and is clipped.
    assert_eq!(So3Tables::eps_index(0.01), 0);
    assert_eq!(So3Tables::eps_index(2.0), N_EPS - 1);
    // Outside the grid: clipped to the ends.
    assert_eq!(So3Tables::eps_index(1e-4), 0);
    assert_eq!(So3Tables::eps_index(0.0), 0);
    assert_eq!(So3Tables::eps_index(50.0), N_EPS - 1);
    // Mid grid the published `* N_EPS` (not `N_EPS - 1`) runs ahead:
    // eps_500 sits at 500 * 1000/999 = 500.5 and maps to 501.
    assert_eq!(So3Tables::eps_index(tables.eps[500]), 501);
    // sigma = 0.1: 1000 / log10(200) = 434.6 -> 435.
    assert_eq!(So3Tables::eps_index(0.1), 435);
    assert_eq!(tables.score_norm(0.1), tables.exp_score_norms[435]);
    assert_eq!(tables.score_norm(1e-4), tables.exp_score_norms[0]);
    assert_eq!(tables.score_norm(50.0), tables.exp_score_norms[N_EPS - 1]);
}
