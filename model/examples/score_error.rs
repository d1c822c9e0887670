//! How far a model's score is from the exact score of its training frames,
//! per diffusion time, on the forward process's own noised frames.
//!
//! ```sh
//! cargo run --release -p dig-model --example score_error -- \
//!     examples/adk/model examples/adk/manifest.jsonl [SAMPLES_PER_TIME]
//! ```
//!
//! For each time, draws frames of the first manifest entry, noises them by
//! the forward process, and prints the mean squared difference between the
//! network's outputs and the exact score ([`dig_model::empirical`], all the
//! entry's frames) in the units of the training targets, beside the mean
//! square of the exact score and the published loss against the noise's own
//! target (which exceeds the first by the target's variance). The last two
//! columns put the translation error in ångström: the RMS distance between
//! the network's denoised positions `x + sigma^2 s_T` and the exact ones,
//! and the RMS size of the exact ones (the frames' CA positions, turned and
//! averaged by the posterior).

use std::path::Path;

use dig_model::dataset::{load, read_manifest};
use dig_model::empirical::{rng, EmpiricalScore};
use dig_model::sampling::solvers::expmap;
use dig_model::training::{sigmas, Igso3};
use dig_model::DigModel;
use rand::RngCore;
use tch::{Device, Kind, Tensor};

fn uniform(r: &mut impl RngCore) -> f64 {
    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn normal(r: &mut impl RngCore) -> f64 {
    let u1 = uniform(r).max(1e-300);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform(r)).cos()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: score_error MODEL_DIR MANIFEST [SAMPLES_PER_TIME]");
        std::process::exit(2);
    }
    let per_time: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(32);
    tch::set_num_threads(
        std::env::var("THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
    );
    let _guard = tch::no_grad_guard();
    let model = DigModel::load_dir(Path::new(&args[1]), Device::Cpu)?;
    let cfg = model.net.config().clone();
    let entries = read_manifest(Path::new(&args[2]))?;
    let data = load(&entries[..1], &cfg, 0.0, 0)?;
    let prot = &data[0];
    let l = prot.len_residues();
    let ctx = model
        .net
        .prepare(&prot.features.single, &prot.features.pair, 1 << 30);
    let mut emp = EmpiricalScore::new(&prot.frames);
    let mut igso = Igso3::new();
    let mut r = rng(2024);
    println!(
        "{} frames of {} residues; {} draws per time; mean over residues and coordinates",
        prot.frames.len(),
        l,
        per_time
    );
    println!(
        "t     sigma_tr sigma_rot | tr: (net-exact)^2  exact^2  (net-noise)^2 | rot: (net-exact)^2  exact^2  (net-noise)^2 | x0 err Å  E[x0] Å"
    );
    for t in [0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.3] {
        let k = ((1.0 - t) * cfg.n_time_step as f64).round() as i64;
        let (st, sr) = sigmas(&cfg, k);
        let norm = igso.score_norm(sr);
        let mut acc = [0.0f64; 7];
        for _ in 0..per_time {
            let f = (r.next_u64() % prot.frames.len() as u64) as usize;
            let (t0, r0) = &prot.frames[f];
            let mut c = [0.0; 3];
            for i in 0..l {
                for a in 0..3 {
                    c[a] += t0[3 * i + a] as f64 / l as f64;
                }
            }
            let mut tr = Vec::with_capacity(3 * l);
            let mut z = Vec::with_capacity(3 * l);
            let mut v = Vec::with_capacity(3 * l);
            let mut s_noise = Vec::with_capacity(3 * l);
            for i in 0..l {
                for a in 0..3 {
                    let e = st * normal(&mut r);
                    z.push(e);
                    tr.push((t0[3 * i + a] as f64 - c[a] + e) as f32);
                }
                let axis = [normal(&mut r), normal(&mut r), normal(&mut r)];
                let n = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt();
                let om = igso.sample_angle(sr, uniform(&mut r));
                let sc = igso.score(om, sr) / om;
                for a in axis {
                    v.push((a / n * om) as f32);
                    s_noise.push(a / n * om * sc / norm);
                }
            }
            let trt = Tensor::from_slice(&tr).view([1, l as i64, 3]);
            let vt = Tensor::from_slice(&v).view([1, l as i64, 3]);
            let r0t = Tensor::from_slice(r0).view([1, l as i64, 3, 3]);
            let rott = expmap(&vt).matmul(&r0t);
            let step = Tensor::from_slice(&[k]);
            let (p_tr, p_rot) = model.net.forward_step(&ctx, &trt, &rott, None, &step);
            let (e_tr, e_rot, _) = emp.score_batch(&trt, &rott, st, sr, &mut r);
            let e_tr = e_tr * st;
            let e_rot = e_rot / norm;
            let n_tr = Tensor::from_slice(&z.iter().map(|e| (-e / st) as f32).collect::<Vec<_>>())
                .view([1, l as i64, 3]);
            let n_rot = Tensor::from_slice(&s_noise.iter().map(|&x| x as f32).collect::<Vec<_>>())
                .view([1, l as i64, 3]);
            let m = |x: Tensor| x.square().mean(Kind::Float).double_value(&[]);
            // The exact denoised positions E[G T0 | x] = x + sigma^2 s_T.
            acc[6] += m(&trt + &e_tr * st);
            acc[0] += m(&p_tr - &e_tr);
            acc[1] += m(e_tr.shallow_clone());
            acc[2] += m(&p_tr - &n_tr);
            acc[3] += m(&p_rot - &e_rot);
            acc[4] += m(e_rot.shallow_clone());
            acc[5] += m(&p_rot - &n_rot);
        }
        let a = acc.map(|x| x / per_time as f64);
        println!(
            "{t:<5} {st:>8.2} {sr:>9.3} | {:>17.4} {:>8.4} {:>14.4} | {:>18.4} {:>8.4} {:>14.4} | {:>9.2} {:>9.2}",
            a[0],
            a[1],
            a[2],
            a[3],
            a[4],
            a[5],
            st * a[0].sqrt(),
            a[6].sqrt()
        );
    }
    Ok(())
}
