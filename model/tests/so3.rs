//! The IGSO(3) tables against the published code's output
//! (`tests/data/so3_tables.npz`, made by the published numpy implementation).

use std::path::Path;
use std::time::Instant;

use dig_model::so3::{row, So3Tables, N_EPS, N_OMEGA};
use tch::Tensor;

const REL_TOL: f64 = 1e-6;

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
fn max_rel_error(actual: &[f64], expected: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len());
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs() / e.abs().max(floor))
        .enumerate()
        .fold(
            (0.0, 0),
            |(best, at), (i, r)| {
                if r > best {
                    (r, i)
                } else {
                    (best, at)
                }
            },
        )
        .into()
}

#[test]
fn grids_equal_reference() {
    let reference = reference();
    let tables = So3Tables::compute();
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
/// something: where the density is at least 1e-9 of its peak. Below that,
/// for small eps, the published `f` is cancellation noise around zero (about
/// 1e-12 absolute against a peak of ~1e6) and its score swings through
/// thousands with either sign; ours is the true value there. Those points
/// carry no weight in `exp_score_norm` (checked by the test above).
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
        let peak = pdf.iter().cloned().fold(0.0, f64::max);
        let resolved: Vec<usize> = (0..N_OMEGA).filter(|&m| pdf[m] >= 1e-9 * peak).collect();
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

/// The cdf is compared at every angle. It starts near 1e-9 for the widest
/// eps; values below 1e-12 would only be rounding of an empty sum, so they
/// are compared absolutely (floor 1e-12).
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
    let tables = So3Tables::compute();
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
