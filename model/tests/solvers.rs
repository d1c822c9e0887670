//! The sampler's solvers on a score field whose flow is known in closed
//! form, derived here independently of the crate: the order of each solver
//! (error halves or quarters when the step halves), each solver's
//! samples independent of the batch they are drawn in, and what the
//! published update does to an ensemble spread along a path.

use std::path::PathBuf;

use dig_model::sampling::{expmap, integrate, ScoreField, Solver, StepPlan};
use dig_model::so3::So3Tables;
use dig_model::{DigModel, ModelConfig, Sampler, Schedule};
use tch::{Device, Kind, Tensor};

/// Axis-angle vector of a rotation matrix (row-major), f64.
fn log_map(m: &[f64]) -> [f64; 3] {
    let tr = m[0] + m[4] + m[8];
    let angle = ((tr - 1.0) / 2.0).clamp(-1.0, 1.0).acos();
    let w = [m[7] - m[5], m[2] - m[6], m[3] - m[1]];
    let s = if angle < 1e-9 {
        0.5
    } else {
        angle / (2.0 * angle.sin())
    };
    [w[0] * s, w[1] * s, w[2] * s]
}

fn matmul3(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut c = vec![0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            c[3 * i + j] = (0..3).map(|k| a[3 * i + k] * b[3 * k + j]).sum();
        }
    }
    c
}

fn transpose3(a: &[f64]) -> Vec<f64> {
    vec![a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8]]
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// The field `s_T = -lambda(tau) (T - a) / g_T^2`, `s_R = -lambda(tau)
/// log(R R*^T) / g_R^2`, `lambda(tau) = 1 + tau`, `tau = 1 - t`. The ODE
/// `dx/dtau = g^2 s` then contracts the pose onto `(a, R*)` with the
/// closed-form flow `T(1) = a + (T0 - a) e^{-3/2}`,
/// `R(1) = expmap(e^{-3/2} log(R0 R*^T)) R*`.
struct Contraction {
    cfg: ModelConfig,
    a: Tensor,
    target: Vec<f64>,
    calls: usize,
}

impl ScoreField for Contraction {
    fn score(&mut self, tr: &Tensor, rot: &Tensor, plan: &StepPlan) -> (Tensor, Tensor) {
        self.calls += 1;
        let lambda = 1.0 + (1.0 - plan.t);
        let g_tr2 =
            plan.sigma_tr.powi(2) * 2.0 * (self.cfg.tr_sigma_max / self.cfg.tr_sigma_min).ln();
        let g_rot2 =
            4.0 * plan.sigma_rot.powi(2) * (self.cfg.rot_sigma_max / self.cfg.rot_sigma_min).ln();
        let s_tr = (tr - &self.a) * (-lambda / g_tr2);
        let r = f64s(rot);
        let mut v = Vec::new();
        for m in r.chunks_exact(9) {
            let rel = matmul3(m, &transpose3(&self.target));
            v.extend(log_map(&rel).map(|x| (-lambda / g_rot2 * x) as f32));
        }
        let s_rot = Tensor::from_slice(&v).view(tr.size().as_slice());
        (s_tr, s_rot)
    }
}

#[test]
fn each_solver_converges_at_its_order_on_a_closed_form_flow() {
    let cfg = ModelConfig::default();
    let so3 = So3Tables::compute();
    let target_axis = [0.3f64, -0.5, 0.8];
    let target = f64s(&expmap(
        &Tensor::from_slice(&target_axis.map(|x| x as f32)).view([1, 1, 3]),
    ));
    let a = Tensor::from_slice(&[1.5f32, -2.0, 0.5]).view([1, 1, 3]);
    let t0 = Tensor::from_slice(&[20.0f32, 10.0, -15.0]).view([1, 1, 3]);
    let r0 = expmap(&Tensor::from_slice(&[-1.2f32, 0.4, 0.9]).view([1, 1, 3]));
    let decay = (-1.5f64).exp();
    let v0 = log_map(&matmul3(&f64s(&r0), &transpose3(&target)));
    let error = |solver: Solver, steps: i64, flow_above: Option<f64>| -> (f64, usize) {
        let mut schedule = Schedule::with_solver(&cfg, &so3, Some(steps), solver).unwrap();
        if let Some(t_c) = flow_above {
            schedule = schedule.with_flow_above(&cfg, t_c).unwrap();
        }
        // The ODE's drift factor c (1/2 on the flow's steps) scales the
        // exponent: T(1) = a + (T0 - a) exp(-int c lambda dtau).
        let decay = match flow_above {
            None => decay,
            Some(t_c) => {
                let tau_c = 1.0 - t_c;
                let lam = |a: f64, b: f64| (b - a) + (b * b - a * a) / 2.0;
                (-(0.5 * lam(0.0, tau_c) + lam(tau_c, 1.0))).exp()
            }
        };
        let want_tr: Vec<f64> = f64s(&(&a + (&t0 - &a) * decay));
        let want_rot = matmul3(
            &f64s(&expmap(
                &Tensor::from_slice(&v0.map(|x| (x * decay) as f32)).view([1, 1, 3]),
            )),
            &target,
        );
        let mut field = Contraction {
            cfg: cfg.clone(),
            a: a.shallow_clone(),
            target: target.clone(),
            calls: 0,
        };
        let (tr, rot) = integrate(
            &schedule,
            &mut field,
            t0.shallow_clone(),
            r0.shallow_clone(),
            |_| {},
        );
        let dt: f64 = f64s(&tr)
            .iter()
            .zip(&want_tr)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let rel = matmul3(&f64s(&rot), &transpose3(&want_rot));
        let dr = log_map(&rel).iter().map(|x| x * x).sum::<f64>().sqrt();
        assert_eq!(field.calls, schedule.network_calls(), "{solver} calls");
        (dt + 10.0 * dr, field.calls)
    };
    // The flow solver integrates another ODE (the probability flow): its
    // distance to the published run does not vanish with the step.
    // With `--flow-above 0.5` (a point of every grid here) each solver
    // integrates the flow above and the published ODE below at its order:
    // Heun's corrector and ab2's history take the slope of the ODE of the
    // step, not of its neighbour's.
    for (solver, flow_above) in Solver::ALL
        .into_iter()
        .filter(|&s| s != Solver::Flow)
        .flat_map(|s| [(s, None), (s, Some(0.5))])
    {
        let (e1, c1) = error(solver, 10, flow_above);
        let (e2, _) = error(solver, 20, flow_above);
        let (e3, _) = error(solver, 40, flow_above);
        let (r1, r2) = (e1 / e2, e2 / e3);
        println!("{solver}, flow above {flow_above:?}: error {e1:.3e} / {e2:.3e} / {e3:.3e} at 10/20/40 steps ({c1} calls at 10): ratios {r1:.2}, {r2:.2}");
        let (lo, hi) = match solver {
            Solver::Euler | Solver::Exp => (1.7, 2.4),
            Solver::Heun | Solver::Ab2 => (3.3, 4.8),
            Solver::Flow => unreachable!(),
        };
        assert!(
            (lo..hi).contains(&r2),
            "{solver}, flow above {flow_above:?}: error ratio {r2} when the step halves"
        );
    }
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[test]
fn every_solver_gives_a_sample_the_same_alone_in_a_batch_and_again() {
    let model = DigModel::load_dir(&data(""), Device::Cpu).unwrap();
    let f: std::collections::BTreeMap<String, Tensor> = Tensor::read_npz(data("features.npz"))
        .unwrap()
        .into_iter()
        .collect();
    let ctx = model.net.prepare(&f["single"], &f["pair"], u64::MAX);
    let so3 = So3Tables::compute();
    let init = |indices: &[u64]| {
        let (mut tr, mut rot) = (Vec::new(), Vec::new());
        for &i in indices {
            let s = dig_model::rng::initial_state(5, i, 24, 35.0);
            tr.extend(s.tr);
            rot.extend(s.rot);
        }
        let n = indices.len() as i64;
        (
            Tensor::from_slice(&tr).view([n, 24, 3]),
            Tensor::from_slice(&rot).view([n, 24, 3, 3]),
        )
    };
    for solver in Solver::ALL {
        let schedule = Schedule::with_solver(model.net.config(), &so3, Some(8), solver).unwrap();
        let sampler = Sampler::new(&model.net, schedule);
        let indices = [2u64, 3, 4, 5];
        let (tr, rot) = init(&indices);
        let (batch, _) = sampler.run(&ctx, tr.shallow_clone(), rot.shallow_clone(), |_| {});
        let (again, _) = sampler.run(&ctx, tr, rot, |_| {});
        assert!(batch.equal(&again), "{solver}: a rerun differs");
        for (pos, &i) in indices.iter().enumerate() {
            let (tr, rot) = init(&[i]);
            let (alone, _) = sampler.run(&ctx, tr, rot, |_| {});
            let d = (alone.get(0) - batch.get(pos as i64))
                .abs()
                .max()
                .double_value(&[]);
            // A few float32 roundings of the largest coordinate: this random
            // model throws atoms hundreds of Å out in 8 steps.
            let scale = batch.abs().max().double_value(&[]);
            assert!(
                d <= 1e-4 + 1e-6 * scale,
                "{solver}: sample {i} differs by {d} Å alone and in a batch (largest coordinate {scale} Å)"
            );
        }
    }
}

/// The exact translation score of data spread along a path: a uniform
/// mixture of `K` frames `m_k = c + u_k D` (`u_k` evenly from -1/2 to 1/2,
/// `D (L, 3)` the end-to-end displacement), each blurred by `N(0, s0^2)`
/// per coordinate. At time t the forward process blurs each by `sigma_tr^2`
/// more, so `s_T = sum_k w_k (m_k - T) / v`, `v = s0^2 + sigma_tr^2`, `w`
/// the posterior weights of the frames. Rotations carry no signal (score 0).
struct Path {
    frames: Tensor, // (K, L, 3)
    s0: f64,
}

impl ScoreField for Path {
    fn score(&mut self, tr: &Tensor, _rot: &Tensor, plan: &StepPlan) -> (Tensor, Tensor) {
        let v = self.s0 * self.s0 + plan.sigma_tr * plan.sigma_tr;
        let tr64 = tr.to_kind(Kind::Double);
        // (B, K, L, 3) differences m_k - T.
        let diff = self.frames.unsqueeze(0) - tr64.unsqueeze(1);
        let logw = diff
            .square()
            .sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Double)
            * (-0.5 / v);
        let w = logw.softmax(1, Kind::Double); // (B, K)
        let s = (diff * w.unsqueeze(-1).unsqueeze(-1)).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Double,
        ) / v;
        (s.to_kind(Kind::Float), tr.zeros_like())
    }
}

/// Fractions of `tr (B, L, 3)` whose nearest frame is among the first
/// `third` frames, the middle, the last `third`, and the spread (standard
/// deviation) of the nearest frame's index.
fn nearest_frames(frames: &Tensor, tr: &Tensor, third: i64) -> (f64, f64, f64, f64) {
    let k = frames.size()[0];
    let d = (frames.unsqueeze(0) - tr.to_kind(Kind::Double).unsqueeze(1))
        .square()
        .sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Double);
    let idx = Vec::<i64>::try_from(d.argmin(1, false)).unwrap();
    let n = idx.len() as f64;
    let first = idx.iter().filter(|&&i| i < third).count() as f64 / n;
    let last = idx.iter().filter(|&&i| i >= k - third).count() as f64 / n;
    let mean = idx.iter().sum::<i64>() as f64 / n;
    let sd = (idx.iter().map(|&i| (i as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    (first, 1.0 - first - last, last, sd)
}

/// With the exact score of an ensemble spread evenly along a path (98
/// frames, 6.9 Å CA-RMSD end to end: the AdK DIMS path's shape), the
/// probability-flow ODE returns the path's own spread, and the published
/// update (`g^2 dt s`: the reverse SDE's drift without its noise, twice the
/// probability flow's) returns only the path's middle, at the published
/// 35 Å and more so at 200 Å. (On Gaussian data `N(mu, s0^2)` the published
/// ODE scales `T - mu` by `(s0^2 + sigma_min^2) / (s0^2 + sigma_max^2)`, the
/// probability flow by its square root.) So the state fractions of the
/// published sampler (examples/adk) come from the model's errors, not from
/// an exact score: a better score moves them towards the middle of the
/// path, not towards the data's.
#[test]
fn the_published_update_returns_the_middle_of_a_path_where_the_probability_flow_returns_all_of_it()
{
    tch::manual_seed(3);
    let (k, l, n) = (98i64, 8i64, 1000i64);
    let opts = (Kind::Double, Device::Cpu);
    let centre = Tensor::randn([l, 3], opts) * 5.0;
    let d = Tensor::randn([l, 3], opts);
    // Scale D so the ends lie 6.9 Å CA-RMSD apart.
    let rms = (d.square().sum(Kind::Double).double_value(&[]) / l as f64).sqrt();
    let d = d * (6.9 / rms);
    let u = Tensor::linspace(-0.5, 0.5, k, opts);
    let frames = centre.unsqueeze(0) + u.view([k, 1, 1]) * d.unsqueeze(0);
    let third = 30;
    let data = nearest_frames(&frames, &frames, third);
    let so3 = So3Tables::compute();
    let rot = Tensor::eye(3, (Kind::Float, Device::Cpu)).expand([n, l, 3, 3], true);
    let mut narrowest = f64::INFINITY;
    for sigma_max in [35.0, 200.0] {
        let cfg = ModelConfig {
            tr_sigma_max: sigma_max,
            ..ModelConfig::default()
        };
        let start = Tensor::randn([n, l, 3], (Kind::Float, Device::Cpu)) * sigma_max;
        let run = |solver: Solver, steps: i64, flow_above: Option<f64>| {
            let mut schedule = Schedule::with_solver(&cfg, &so3, Some(steps), solver).unwrap();
            if let Some(t_c) = flow_above {
                schedule = schedule.with_flow_above(&cfg, t_c).unwrap();
            }
            let mut field = Path {
                frames: frames.shallow_clone(),
                s0: 0.3,
            };
            let (tr, _) = integrate(
                &schedule,
                &mut field,
                start.shallow_clone(),
                rot.shallow_clone(),
                |_| {},
            );
            nearest_frames(&frames, &tr, third)
        };
        let published = run(Solver::Euler, 500, None);
        let flow = run(Solver::Flow, 100, None);
        let hybrid = run(Solver::Euler, 500, Some(0.3));
        let hybrid_ab2 = run(Solver::Ab2, 50, Some(0.3));
        let late = run(Solver::Euler, 500, Some(0.6));
        for (name, f) in [
            ("frames", data),
            ("published, 500 steps", published),
            ("flow, 100 Heun steps", flow),
            ("flow above 0.3, euler 500", hybrid),
            ("flow above 0.3, ab2 50", hybrid_ab2),
            ("flow above 0.6, euler 500", late),
        ] {
            println!(
                "tr_sigma_max {sigma_max}: {name}: first 30 frames {:.3}, middle {:.3}, last 30 {:.3}, spread of the frame index {:.1}",
                f.0, f.1, f.2, f.3
            );
        }
        // The probability flow: the path's own fractions (binomial standard
        // error at n = 1000: 0.015; the prior is N(0, sigma_max^2), not
        // quite p_1).
        assert!((flow.0 - data.0).abs() < 0.06, "{flow:?} vs {data:?}");
        assert!((flow.2 - data.2).abs() < 0.06, "{flow:?} vs {data:?}");
        assert!((flow.3 / data.3 - 1.0).abs() < 0.1, "{flow:?} vs {data:?}");
        // The flow down to t = 0.3 (sigma_tr 0.58 Å at 35 Å, 0.98 Å at 200 Å,
        // below the path's length) and the published update below it: the
        // path's fractions again.
        for h in [hybrid, hybrid_ab2] {
            assert!((h.0 - data.0).abs() < 0.06, "{h:?} vs {data:?}");
            assert!((h.2 - data.2).abs() < 0.06, "{h:?} vs {data:?}");
            assert!((h.3 / data.3 - 1.0).abs() < 0.1, "{h:?} vs {data:?}");
        }
        // The published update: the middle only.
        assert!(published.0 < 0.01 && published.2 < 0.01, "{published:?}");
        assert!(published.3 < 0.35 * data.3, "{published:?} vs {data:?}");
        // ... and the larger the schedule's noise, the narrower.
        assert!(published.3 < narrowest, "{published:?} at {sigma_max} Å");
        narrowest = published.3;
    }
}

/// `with_flow_above`: 1 changes nothing, 0 on Heun is `--solver flow` bit
/// for bit, the steps above the switch carry half the gains (the
/// exponential integrator its own), and bad values are refused by name.
#[test]
fn flow_above_switches_the_steps_above_it_to_the_probability_flow() {
    let cfg = ModelConfig::default();
    let so3 = So3Tables::compute();
    let plain = |solver| Schedule::with_solver(&cfg, &so3, Some(20), solver).unwrap();
    for solver in [Solver::Euler, Solver::Exp, Solver::Heun, Solver::Ab2] {
        let same = plain(solver).with_flow_above(&cfg, 1.0).unwrap();
        assert_eq!(same.steps, plain(solver).steps, "{solver}");
        let mixed = plain(solver).with_flow_above(&cfg, 0.5).unwrap();
        assert_eq!(mixed.flow_above, Some(0.5));
        for (m, p) in mixed.steps.iter().zip(&plain(solver).steps) {
            if m.t > 0.5 {
                assert_eq!(m.drift, 0.5, "{solver} at t {}", m.t);
                let ratio = m.tr_gain / p.tr_gain;
                match solver {
                    Solver::Exp => {
                        // sigma^2 (1 - rho) over sigma^2 (1 - rho^2) = 1 / (1 + rho)
                        let rho = (cfg.tr_sigma_max / cfg.tr_sigma_min).powf(-m.dt);
                        assert!((ratio - 1.0 / (1.0 + rho)).abs() < 1e-12, "{ratio} {rho}");
                    }
                    _ => {
                        assert_eq!(m.tr_gain, p.tr_gain * 0.5);
                        assert_eq!(m.rot_gain, p.rot_gain * 0.5);
                    }
                }
            } else {
                assert_eq!(m, p, "{solver} at t {}", m.t);
            }
        }
        // A partial-diffusion tail keeps the switch.
        assert_eq!(mixed.tail(5).flow_above, Some(0.5));
    }
    let flow = plain(Solver::Flow);
    let heun0 = plain(Solver::Heun).with_flow_above(&cfg, 0.0).unwrap();
    assert_eq!(heun0.steps, flow.steps);
    let start = Tensor::randn([4, 8, 3], (Kind::Float, Device::Cpu)) * 35.0;
    let rot = Tensor::eye(3, (Kind::Float, Device::Cpu)).expand([4, 8, 3, 3], true);
    let frames = Tensor::randn([5, 8, 3], (Kind::Double, Device::Cpu));
    let field = || Path {
        frames: frames.shallow_clone(),
        s0: 0.3,
    };
    let run = |s: &Schedule| {
        integrate(
            s,
            &mut field(),
            start.shallow_clone(),
            rot.shallow_clone(),
            |_| {},
        )
        .0
    };
    assert!(
        run(&heun0).equal(&run(&flow)),
        "heun with flow above 0 is not flow"
    );
    for (solver, t_c, want) in [
        (
            Solver::Euler,
            1.5,
            "--flow-above must be a diffusion time in [0, 1], got 1.5",
        ),
        (
            Solver::Euler,
            -0.1,
            "--flow-above must be a diffusion time in [0, 1], got -0.1",
        ),
        (
            Solver::Euler,
            f64::NAN,
            "--flow-above must be a diffusion time in [0, 1], got NaN",
        ),
        (
            Solver::Flow,
            0.5,
            "--solver flow follows the probability flow at every step already",
        ),
    ] {
        let err = plain(solver)
            .with_flow_above(&cfg, t_c)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
}
