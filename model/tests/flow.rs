//! The probability-flow ODE against closed forms and the fixture model.
//!
//! Closed form: data whose translations are Gaussian, `N(mu, s0^2)` per
//! coordinate, and whose rotations are IGSO(3)(eps0) about a centre `C_i`.
//! The forward process keeps both families: at time t translations are
//! `N(mu, s0^2 + sigma_tr(t)^2)` and rotations IGSO(3) of
//! `sqrt(eps0^2 + sigma_rot(t)^2)` (heat kernels at times 2 eps^2 compose),
//! so the exact score is written down and the exact log-density at `t_end`
//! is known. The ODE's estimate, corrected for the one thing the ODE cannot
//! know (the prior is `N(0, tr_max^2)` x uniform, the true `p_1` is not quite
//! that: the correction `log p_1(x_1) - log prior(x_1)` is computed exactly
//! at the encoded `x_1`), must match it: within 0.02 nats with the exact
//! divergence, within 3 standard errors (plus that) with Hutchinson's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dig_model::rng::initial_state;
use dig_model::sampling::flow::{
    flow, log_density, log_prior, Divergence, FlowField, FlowSettings, FlowTimes, NetworkFlowField,
    Ode,
};
use dig_model::so3::So3Tables;
use dig_model::DigModel;
use tch::{Device, Kind, Tensor};

const L_MAX: i64 = 60;

fn times() -> FlowTimes {
    FlowTimes {
        tr_min: 0.1,
        tr_max: 35.0,
        rot_min: 0.02,
        rot_max: 1.65,
        n_time_step: 500,
    }
}

/// `log f(w, eps)` and `d log f / dw` of IGSO(3) (density w.r.t. the
/// normalised Haar measure), as differentiable double tensors of `w`.
// `f = f + ...`, not in place: the sums are part of the autograd graph.
#[allow(clippy::assign_op_pattern)]
fn igso3(w: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let half = w * 0.5;
    let (sh, ch) = (half.sin(), half.cos());
    let mut f = w.zeros_like();
    let mut df = w.zeros_like();
    for l in 0..L_MAX {
        let a = (2 * l + 1) as f64 * (-((l * (l + 1)) as f64) * eps * eps).exp();
        let x = w * (l as f64 + 0.5);
        f = f + x.sin() * a;
        df = df + (x.cos() * &sh * (l as f64 + 0.5) - x.sin() * &ch * 0.5) * a;
    }
    let f = &f / &sh;
    let df = df / sh.square();
    (f.log(), df / f)
}

/// Rotation angle and axis of `q (..., 3, 3)`.
fn angle_axis(q: &Tensor) -> (Tensor, Tensor) {
    let tr = q
        .diagonal(0, -2, -1)
        .sum_dim_intlist(-1, false, Kind::Double);
    let w = ((tr - 1.0) * 0.5).clamp(-1.0 + 1e-12, 1.0 - 1e-12).acos();
    let a = q - q.transpose(-1, -2);
    let vee = Tensor::stack(
        &[
            a.select(-2, 2).select(-1, 1),
            a.select(-2, 0).select(-1, 2),
            a.select(-2, 1).select(-1, 0),
        ],
        -1,
    );
    let n = vee / (w.sin() * 2.0).unsqueeze(-1);
    (w, n)
}

/// The exact score of the Gaussian x IGSO(3) data at time t.
struct Closed {
    mu: Tensor,     // (L, 3)
    centre: Tensor, // (L, 3, 3)
    s0: f64,
    eps0: f64,
    times: FlowTimes,
}

impl Closed {
    fn var_tr(&self, t: f64) -> f64 {
        self.s0 * self.s0 + self.times.sigma_tr(t).powi(2)
    }
    fn eps(&self, t: f64) -> f64 {
        (self.eps0 * self.eps0 + self.times.sigma_rot(t).powi(2)).sqrt()
    }
    /// Exact log p_t of each structure.
    fn log_p(&self, tr: &Tensor, rot: &Tensor, t: f64) -> Vec<f64> {
        let tr = tr.to_kind(Kind::Double);
        let v = self.var_tr(t);
        let l = tr.size()[1] as f64;
        let sq =
            (&tr - &self.mu)
                .square()
                .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double);
        let log_tr = sq * (-0.5 / v) - 1.5 * l * (2.0 * std::f64::consts::PI * v).ln();
        let q = self
            .centre
            .transpose(-1, -2)
            .matmul(&rot.to_kind(Kind::Double));
        let (w, _) = angle_axis(&q);
        let (logf, _) = igso3(&w, self.eps(t));
        let total = log_tr + logf.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        Vec::<f64>::try_from(&total).unwrap()
    }
}

impl FlowField for Closed {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, t: f64) -> (Tensor, Tensor) {
        let s_tr = (tr.to_kind(Kind::Double) - &self.mu) * (-1.0 / self.var_tr(t));
        let q = self
            .centre
            .transpose(-1, -2)
            .matmul(&rot.to_kind(Kind::Double));
        let (w, n) = angle_axis(&q);
        let (_, dlogf) = igso3(&w, self.eps(t));
        // Space-frame axis: C n.
        let axis = self.centre.matmul(&n.unsqueeze(-1)).squeeze_dim(-1);
        let s_rot = axis * dlogf.unsqueeze(-1);
        (s_tr.to_kind(Kind::Float), s_rot.to_kind(Kind::Float))
    }
}

fn expmap64(v: &Tensor) -> Tensor {
    dig_model::sampling::expmap(&v.to_kind(Kind::Float)).to_kind(Kind::Double)
}

/// Data: 4 structures of 3 residues drawn near the data distribution.
fn closed_case() -> (Closed, Tensor, Tensor) {
    tch::manual_seed(7);
    let l = 3;
    let mu = Tensor::rand([l, 3], (Kind::Double, Device::Cpu)) * 10.0 - 5.0;
    let centre = expmap64(&(Tensor::rand([l, 3], (Kind::Double, Device::Cpu)) * 2.0 - 1.0));
    let s0 = 1.5;
    let eps0 = 0.3;
    let tr = (mu.unsqueeze(0) + Tensor::randn([4, l, 3], (Kind::Double, Device::Cpu)) * s0)
        .to_kind(Kind::Float);
    // Angles 0.2 to 0.7 rad about random axes, then about each centre.
    let axes = Tensor::randn([4, l, 3], (Kind::Double, Device::Cpu));
    let axes = &axes / axes.norm_scalaropt_dim(2.0, [-1i64], true);
    let angles = Tensor::rand([4, l, 1], (Kind::Double, Device::Cpu)) * 0.5 + 0.2;
    let rot = centre
        .unsqueeze(0)
        .matmul(&expmap64(&(axes * angles)))
        .to_kind(Kind::Float);
    (
        Closed {
            mu,
            centre,
            s0,
            eps0,
            times: times(),
        },
        tr,
        rot,
    )
}

fn corrected(field: &Closed, d: &dig_model::sampling::flow::Density) -> Vec<f64> {
    let t = field.times;
    let p1 = field.log_p(&d.noise_tr, &d.noise_rot, 1.0);
    let prior = log_prior(&t, &d.noise_tr);
    d.log_density
        .iter()
        .zip(p1.iter().zip(&prior))
        .map(|(e, (a, b))| e + a - b)
        .collect()
}

#[test]
fn log_density_matches_the_closed_form_with_the_exact_divergence_and_hutchinson() {
    let (mut field, tr, rot) = closed_case();
    let t = times();
    let truth = field.log_p(&tr, &rot, t.t_end());
    let exact = FlowSettings {
        ode: Ode::Flow,
        steps: 200,
        divergence: Some(Divergence::Exact),
        ..Default::default()
    };
    let d = log_density(&mut field, &t, &tr, &rot, &exact, &[0, 1, 2, 3], |_| {});
    let est = corrected(&field, &d);
    for i in 0..4 {
        println!(
            "structure {i}: exact divergence {:.4} (uncorrected {:.4}), closed form {:.4}",
            est[i], d.log_density[i], truth[i]
        );
        assert!(
            (est[i] - truth[i]).abs() < 0.02,
            "{i}: {} vs {}",
            est[i],
            truth[i]
        );
        assert_eq!(d.std_error[i], 0.0);
    }
    let hutch = FlowSettings {
        ode: Ode::Flow,
        steps: 200,
        divergence: Some(Divergence::Hutchinson { probes: 4 }),
        seed: 3,
        ..Default::default()
    };
    let d = log_density(&mut field, &t, &tr, &rot, &hutch, &[0, 1, 2, 3], |_| {});
    let est = corrected(&field, &d);
    for i in 0..4 {
        println!(
            "structure {i}: Hutchinson (4 probes) {:.4} +- {:.4}, closed form {:.4}",
            est[i], d.std_error[i], truth[i]
        );
        assert!(
            d.std_error[i] > 0.0 && d.std_error[i] < 1.0,
            "{}",
            d.std_error[i]
        );
        assert!(
            (est[i] - truth[i]).abs() < 3.0 * d.std_error[i] + 0.02,
            "{i}: {} +- {} vs {}",
            est[i],
            d.std_error[i],
            truth[i]
        );
    }
}

#[test]
fn the_rotation_part_alone_matches_the_igso3_density() {
    // Four structures with the same translations: differences of their
    // log-densities are differences of the IGSO(3) terms alone.
    let (mut field, tr, rot) = closed_case();
    let t = times();
    let same_tr = tr.get(0).unsqueeze(0).expand([4, 3, 3], true).contiguous();
    let truth = field.log_p(&same_tr, &rot, t.t_end());
    let settings = FlowSettings {
        ode: Ode::Flow,
        steps: 200,
        divergence: Some(Divergence::Exact),
        ..Default::default()
    };
    let d = log_density(
        &mut field,
        &t,
        &same_tr,
        &rot,
        &settings,
        &[0, 1, 2, 3],
        |_| {},
    );
    let est = corrected(&field, &d);
    for i in 1..4 {
        let (a, b) = (est[i] - est[0], truth[i] - truth[0]);
        println!("rotations of {i} vs 0: {a:.4} estimated, {b:.4} IGSO(3)");
        assert!((a - b).abs() < 0.02, "{i}: {a} vs {b}");
    }
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn npz(name: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_npz(data(name)).unwrap().into_iter().collect()
}

#[test]
fn encode_then_decode_returns_the_fixture_models_samples() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let times = FlowTimes::new(model.net.config());
    let l = 24;
    let starts: Vec<_> = (0..3)
        .map(|i| initial_state(5, i, l, times.tr_max))
        .collect();
    let tr1 = Tensor::from_slice(&starts.iter().flat_map(|s| s.tr.clone()).collect::<Vec<_>>())
        .view([3, l as i64, 3]);
    let rot1 = Tensor::from_slice(
        &starts
            .iter()
            .flat_map(|s| s.rot.clone())
            .collect::<Vec<_>>(),
    )
    .view([3, l as i64, 3, 3]);
    // Both ODEs: the published one (stiffer: twice the drift) and the flow.
    for (ode, steps) in [(Ode::Published, 200), (Ode::Flow, 100)] {
        round_trip(&model, &ctx, &so3, &times, (&tr1, &rot1), ode, steps);
    }
}

fn round_trip(
    model: &DigModel,
    ctx: &dig_model::ProteinContext,
    so3: &So3Tables,
    times: &FlowTimes,
    (tr1, rot1): (&Tensor, &Tensor),
    ode: Ode,
    steps: usize,
) {
    let settings = FlowSettings {
        ode,
        steps,
        ..Default::default()
    };
    let mut field = NetworkFlowField::new(&model.net, ctx, so3);
    // Decode noise into structures, encode them back, decode again.
    let x0 = flow(
        &mut field,
        times,
        (tr1, rot1),
        (1.0, times.t_end()),
        &settings,
        &[0, 1, 2],
        |_| {},
    );
    let back = flow(
        &mut field,
        times,
        (&x0.tr, &x0.rot),
        (times.t_end(), 1.0),
        &settings,
        &[0, 1, 2],
        |_| {},
    );
    let again = flow(
        &mut field,
        times,
        (&back.tr, &back.rot),
        (1.0, times.t_end()),
        &settings,
        &[0, 1, 2],
        |_| {},
    );
    let d = (&again.tr - &x0.tr)
        .square()
        .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
        .sqrt();
    let worst = d.max().double_value(&[]);
    println!(
        "{ode:?}, {steps} steps: decode(encode(x)) vs x: max per-residue distance {worst:.4} Å"
    );
    assert!(worst < 0.1, "{worst}");
    // One sample alone equals the same sample in the batch.
    let alone = flow(
        &mut field,
        times,
        (&tr1.narrow(0, 1, 1), &rot1.narrow(0, 1, 1)),
        (1.0, times.t_end()),
        &settings,
        &[1],
        |_| {},
    );
    let diff = (&alone.tr.get(0) - &x0.tr.get(1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-3, "batch changes sample 1 by {diff} Å");
}

#[test]
fn partial_diffusion_from_time_zero_returns_the_input_unchanged() {
    use dig_model::sampling::{sample_ensemble, InitialPoses, PartialStart};
    use dig_model::{Sampler, Schedule};
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f = npz("features.npz");
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let schedule = Schedule::new(model.net.config(), &so3, Some(20)).unwrap();
    assert_eq!(schedule.first_step_at(0.0), 20);
    assert_eq!(schedule.first_step_at(1.0), 0);
    assert_eq!(schedule.first_step_at(0.5), 10);
    assert_eq!(schedule.first_step_at(0.49), 11);
    let init = npz("init_state.npz");
    let tr = Vec::<f32>::try_from(init["tr"].flatten(0, -1)).unwrap();
    let rot = Vec::<f32>::try_from(init["rot_mat"].flatten(0, -1)).unwrap();
    let start = std::sync::Arc::new(PartialStart {
        tr: tr.clone(),
        rot: rot.clone(),
        structures: 1,
        len: 24,
        noise: None,
    });
    let sampler = Sampler::new(&model.net, schedule.tail(20));
    let poses = InitialPoses::Noised {
        seed: 1,
        indices: vec![0, 1, 2],
        start,
    };
    let e = sample_ensemble(&sampler, &ctx, &poses, 2, 35.0, &"A".repeat(24), |_| {});
    assert_eq!(e.sample_index, [0, 1, 2]);
    for i in 0..3 {
        assert_eq!(e.tr[i * 72..(i + 1) * 72], tr[..]);
        assert_eq!(e.rot_mat[i * 216..(i + 1) * 216], rot[..]);
    }
}

#[test]
fn logmap_inverts_expmap_and_interpolation_ends_at_both_ends() {
    use dig_model::sampling::flow::{interpolate_noise, logmap};
    tch::manual_seed(11);
    let dirs = Tensor::randn([200, 3], (Kind::Double, Device::Cpu));
    let dirs = &dirs / dirs.norm_scalaropt_dim(2.0, [-1i64], true);
    // Angles up to pi - 1e-6, many near 0 and near pi.
    let angles = Tensor::cat(
        &[
            Tensor::rand([100, 1], (Kind::Double, Device::Cpu)) * (std::f64::consts::PI - 1e-3),
            Tensor::rand([50, 1], (Kind::Double, Device::Cpu)) * 1e-5,
            -(Tensor::rand([50, 1], (Kind::Double, Device::Cpu)) * 1e-3)
                + (std::f64::consts::PI - 1e-6),
        ],
        0,
    );
    let v = &dirs * &angles;
    let r = dig_model::sampling::expmap(&v.to_kind(Kind::Float)).to_kind(Kind::Double);
    let v = Vec::<f64>::try_from(v.flatten(0, -1)).unwrap();
    let r = Vec::<f64>::try_from(r.flatten(0, -1)).unwrap();
    for i in 0..200 {
        let m: [f64; 9] = r[i * 9..i * 9 + 9].try_into().unwrap();
        let back = logmap(&m);
        let err = (0..3)
            .map(|k| (back[k] - v[3 * i + k]).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 2e-3,
            "rotation {i}: {back:?} vs {:?}",
            &v[3 * i..3 * i + 3]
        );
    }
    // Two noise states of 3 residues: the path starts at a, ends at b, and
    // keeps the translation norm when both norms agree.
    let a = initial_state(1, 0, 3, 35.0);
    let b = initial_state(1, 1, 3, 35.0);
    let (tr, rot) = interpolate_noise((&a.tr, &a.rot), (&b.tr, &b.rot), &[0.0, 0.5, 1.0]);
    let close = |x: &[f32], y: &[f32], tol: f32| x.iter().zip(y).all(|(p, q)| (p - q).abs() < tol);
    assert!(close(&tr[..9], &a.tr, 1e-4) && close(&rot[..27], &a.rot, 1e-5));
    assert!(close(&tr[18..], &b.tr, 1e-4) && close(&rot[54..], &b.rot, 1e-4));
    // Each middle rotation is orthonormal.
    let mid = Tensor::from_slice(&rot[27..54]).view([3, 3, 3]);
    let eye = mid.matmul(&mid.transpose(-1, -2)) - Tensor::eye(3, (Kind::Float, Device::Cpu));
    assert!(eye.abs().max().double_value(&[]) < 1e-5);
}
