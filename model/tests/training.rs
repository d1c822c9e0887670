//! The training loss, frames and IGSO(3) draws against the published code's
//! values (`train.npz`, `igso3_sample.npz`; TRAINING.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use dig_model::training::{diffusion_loss, frames, Batch, Igso3, Noise};
use dig_model::DigModel;
use tch::{Device, Kind, Tensor};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn npz(name: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_npz(data(name)).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn fixture_noise(t: &BTreeMap<String, Tensor>) -> Noise {
    Noise {
        steps: Vec::<i64>::try_from(&t["step"]).unwrap(),
        tr: f32s(&t["tr_noise"]),
        rot: f32s(&t["rot_noise_vec"]),
    }
}

#[test]
fn frames_from_atoms_equal_published_frames() {
    let t = npz("train.npz");
    let (b, l, _) = t["ca"].size3().unwrap();
    let (n, ca, c) = (f32s(&t["n"]), f32s(&t["ca"]), f32s(&t["c"]));
    let mask = Vec::<bool>::try_from(t["mask"].flatten(0, -1)).unwrap();
    let (mut worst_t, mut worst_r) = (0f64, 0f64);
    for s in 0..b as usize {
        let present: Vec<usize> = (0..l as usize)
            .filter(|&i| !mask[s * l as usize + i])
            .collect();
        let p = |v: &[f32], i: usize| {
            let o = (s * l as usize + i) * 3;
            [v[o] as f64, v[o + 1] as f64, v[o + 2] as f64]
        };
        let atoms: Vec<[[f64; 3]; 3]> = present
            .iter()
            .map(|&i| [p(&n, i), p(&ca, i), p(&c, i)])
            .collect();
        let (tr, rot) = frames(&atoms).unwrap();
        let want_t = t["tr"].get(s as i64);
        let want_r = t["rot_mat"].get(s as i64);
        for (k, &i) in present.iter().enumerate() {
            let wt = f32s(&want_t.get(i as i64));
            let wr = f32s(&want_r.get(i as i64));
            for d in 0..3 {
                worst_t = worst_t.max((tr[3 * k + d] - wt[d]).abs() as f64);
            }
            for d in 0..9 {
                worst_r = worst_r.max((rot[9 * k + d] - wr[d]).abs() as f64);
            }
        }
    }
    println!("frames: max |dT| = {worst_t:e} Å, max |dR| = {worst_r:e}");
    assert!(worst_t < 1e-4, "translations differ by {worst_t}");
    assert!(worst_r < 1e-5, "rotations differ by {worst_r}");
}

#[test]
fn loss_and_every_gradient_match_the_published_loss() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let t = npz("train.npz");
    let mut igso = Igso3::new();
    let batch = Batch {
        tr: t["tr"].shallow_clone(),
        rot: t["rot_mat"].shallow_clone(),
        mask: t["mask"].shallow_clone(),
    };
    let noise = fixture_noise(&t);
    let parts = diffusion_loss(
        &model.net,
        &f["single"],
        &f["pair"],
        &batch,
        &noise,
        &mut igso,
        None,
    );
    // Intermediates first: a failure here says where a difference starts.
    let pad = t["mask"].unsqueeze(-1);
    let checks = [
        (
            "tr_sigma",
            &parts.tr_sigma,
            t["tr_sigma"].shallow_clone(),
            1e-5,
        ),
        (
            "rot_sigma",
            &parts.rot_sigma,
            t["rot_sigma"].shallow_clone(),
            1e-6,
        ),
        (
            "rot_noise_mat",
            &parts.rot_noise_mat,
            t["rot_noise_mat"].shallow_clone(),
            1e-5,
        ),
        (
            "rot_score",
            &parts.rot_score,
            t["rot_score"].shallow_clone(),
            1e-3,
        ),
        (
            "rot_score_norm",
            &parts
                .rot_score_norm
                .view([2, 1, 1])
                .expand([2, 24, 1], false),
            t["rot_score_norm"].shallow_clone(),
            1e-5,
        ),
        (
            "tr_pert",
            &parts.tr_pert,
            t["tr_pert"].masked_fill(&pad, 0.0),
            1e-4,
        ),
        (
            "rot_pert",
            &parts.rot_pert,
            t["rot_pert"].masked_fill(&pad.unsqueeze(-1), 0.0),
            1e-5,
        ),
        (
            "pred_tr_eps",
            &parts.pred_tr,
            t["pred_tr_eps"].masked_fill(&pad, 0.0),
            1e-4,
        ),
        (
            "pred_rot_eps",
            &parts.pred_rot,
            t["pred_rot_eps"].masked_fill(&pad, 0.0),
            1e-4,
        ),
    ];
    for (name, got, want, tol) in checks {
        let d = max_abs_diff(
            &got.nan_to_num(0.0, None, None),
            &want.nan_to_num(0.0, None, None),
        );
        println!("{name}: max abs diff {d:e}");
        assert!(d < tol, "{name} differs by {d}");
    }
    for (name, got) in [
        ("loss", &parts.loss),
        ("tr_loss", &parts.tr_loss),
        ("rot_loss", &parts.rot_loss),
    ] {
        let (g, w) = (got.double_value(&[]), t[name].double_value(&[]));
        println!("{name}: {g} (published {w})");
        assert!(((g - w) / w).abs() < 1e-4, "{name} = {g}, published {w}");
    }
    parts.loss.backward();
    let mut checked = 0;
    for (name, p) in model.trainable() {
        let want = &t[&format!("grad/{name}")];
        let got = p.grad();
        assert!(got.defined(), "no gradient for {name}");
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let d = max_abs_diff(&got, want);
        assert!(
            d <= 1e-4 * scale,
            "gradient of {name} differs by {d:e} (largest entry {scale:e})"
        );
        checked += 1;
    }
    let published = t.keys().filter(|k| k.starts_with("grad/")).count();
    assert_eq!(checked, published, "every published gradient compared");
}

#[test]
fn inverse_cdf_angles_match_the_published_draws() {
    let s = npz("igso3_sample.npz");
    let eps = Vec::<f64>::try_from(&s["eps"].to_kind(Kind::Double)).unwrap();
    let (k, m) = s["u"].size2().unwrap();
    let u = Vec::<f64>::try_from(s["u"].to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let omega = Vec::<f64>::try_from(s["omega"].to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let mut igso = Igso3::new();
    let mut worst = 0f64;
    for e in 0..k as usize {
        for j in 0..m as usize {
            let got = igso.sample_angle(eps[e], u[e * m as usize + j]);
            worst = worst.max((got - omega[e * m as usize + j]).abs());
        }
    }
    println!("max |d omega| = {worst:e} rad");
    assert!(worst < 1e-6, "angles differ by {worst} rad");
}

/// The IGSO(3) angle CDF computed here, independently of the crate's
/// tables: density `(1 - cos w)/pi * sum_l (2l+1) exp(-l(l+1) eps^2)
/// sin((l+1/2) w) / sin(w/2)`, integrated by the trapezoid rule on a grid
/// ten times finer than the published one, normalised to 1.
fn reference_cdf(eps: f64) -> (Vec<f64>, Vec<f64>) {
    let n = 20_000;
    let pi = std::f64::consts::PI;
    let lmax = ((60.0 / (eps * eps)).sqrt() as usize + 2).min(2000);
    let pdf = |w: f64| {
        if w <= 0.0 {
            return 0.0;
        }
        let s: f64 = (0..lmax)
            .map(|l| {
                let l = l as f64;
                (2.0 * l + 1.0) * (-l * (l + 1.0) * eps * eps).exp() * ((l + 0.5) * w).sin()
            })
            .sum::<f64>()
            / (w / 2.0).sin();
        s * (1.0 - w.cos()) / pi
    };
    let ws: Vec<f64> = (0..=n).map(|i| pi * i as f64 / n as f64).collect();
    let ps: Vec<f64> = ws.iter().map(|&w| pdf(w)).collect();
    let mut cdf = vec![0.0; n + 1];
    for i in 1..=n {
        cdf[i] = cdf[i - 1] + 0.5 * (ps[i] + ps[i - 1]) * (ws[i] - ws[i - 1]);
    }
    let total = cdf[n];
    (ws, cdf.into_iter().map(|c| c / total).collect())
}

/// Kolmogorov-Smirnov: the rotation angles of `Noise::draw` (ChaCha
/// uniforms through the inverse CDF) against [`reference_cdf`], at the noise
/// levels of several diffusion steps.
#[test]
fn drawn_angles_pass_a_ks_test_against_the_igso3_density() {
    use dig_model::training::sigmas;
    use rand::SeedableRng;
    let cfg = dig_model::ModelConfig::default();
    let mut igso = Igso3::new();
    let l = 1500;
    let mut tested = 0;
    for seed in 0..3u64 {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let noise = Noise::draw(&mut rng, 2, l, &cfg, &mut igso).unwrap();
        for (b, &k) in noise.steps.iter().enumerate() {
            let (_, sigma) = sigmas(&cfg, k);
            let mut angles: Vec<f64> = noise.rot[b * l * 3..(b + 1) * l * 3]
                .chunks_exact(3)
                .map(|v| ((v[0] * v[0] + v[1] * v[1] + v[2] * v[2]) as f64).sqrt())
                .collect();
            angles.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (ws, cdf) = reference_cdf(sigma);
            let n = angles.len() as f64;
            let mut d = 0f64;
            for (i, &w) in angles.iter().enumerate() {
                let j = ws.partition_point(|&o| o <= w).clamp(1, ws.len() - 1);
                let t = (w - ws[j - 1]) / (ws[j] - ws[j - 1]);
                let f = cdf[j - 1] + t * (cdf[j] - cdf[j - 1]);
                d = d
                    .max((f - i as f64 / n).abs())
                    .max((f - (i + 1) as f64 / n).abs());
            }
            // 1% critical value of the one-sample KS statistic.
            let crit = 1.63 / n.sqrt();
            println!("step {k}, sigma_rot {sigma:.4}: KS D = {d:.4} (1% critical {crit:.4})");
            assert!(d < crit, "angles at sigma {sigma} fail KS: D = {d}");
            tested += 1;
        }
    }
    assert_eq!(tested, 6);
}

/// `--high-t-weight`: the steps with t >= from come with the stated
/// probability (within 4 standard errors over 20 000 draws), every step of
/// each region is drawn, and the noise levels follow the steps.
#[test]
fn weighted_time_steps_favour_high_noise_by_the_stated_factor() {
    use dig_model::training::{sigmas, TimeWeighting};
    use rand::SeedableRng;
    let cfg = dig_model::ModelConfig::default();
    let n = cfg.n_time_step;
    let w = TimeWeighting {
        from: 0.7,
        weight: 3.0,
    };
    let h = w.high_steps(n);
    // t = 1 - k/n >= 0.7  <=>  k <= 0.3 n.
    assert_eq!(h, (0.3 * n as f64).floor() as i64 + 1);
    let p = w.high_probability(n);
    assert!((p - 3.0 * h as f64 / (3.0 * h as f64 + (n - h) as f64)).abs() < 1e-12);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let draws = 20_000;
    let mut seen = vec![0u32; n as usize];
    for _ in 0..draws {
        seen[w.draw(&mut rng, n) as usize] += 1;
    }
    let high: u32 = seen[..h as usize].iter().sum();
    let frac = high as f64 / draws as f64;
    let se = (p * (1.0 - p) / draws as f64).sqrt();
    assert!((frac - p).abs() < 4.0 * se, "{frac} vs {p} ± {se}");
    assert!(seen.iter().all(|&c| c > 0), "a step was never drawn");
    // Per step, high ones come about 3x as often as low ones.
    let per_high = high as f64 / h as f64;
    let per_low = (draws - high) as f64 / (n - h) as f64;
    assert!(
        (per_high / per_low - 3.0).abs() < 0.2,
        "{per_high} / {per_low}"
    );
    // The batch's noise is drawn at its steps.
    let mut igso = Igso3::new();
    let noise = Noise::draw_weighted(&mut rng, 5, 4, &cfg, &mut igso, &w).unwrap();
    assert_eq!(noise.steps.len(), 5);
    assert_eq!(noise.tr.len(), 5 * 4 * 3);
    for (b, &k) in noise.steps.iter().enumerate() {
        let (s_tr, _) = sigmas(&cfg, k);
        let big = noise.tr[b * 12..(b + 1) * 12]
            .iter()
            .map(|x| (*x as f64).abs())
            .fold(0.0, f64::max);
        assert!(big < 6.0 * s_tr, "step {k}: {big} vs sigma {s_tr}");
    }
}
