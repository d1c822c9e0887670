//! `digctl interpolate`: a path between two structures through the
//! diffusion: both ends encoded to noise at t = 1 by the probability-flow
//! ODE, the noise interpolated (translations by slerp of the whole 3L
//! vector, rotations along each residue's geodesic), every frame decoded,
//! with its log-density from the decoding (`log p = log prior(noise) + int
//! (1/2) g^2 div s dt` along the decoding path).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_model::backbone::{read_poses, read_trajectory};
use dig_model::features::Features;
use dig_model::sampling::flow::{flow, interpolate_noise, log_prior, FlowTimes, NetworkFlowField};
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::DigModel;
use serde_json::json;
use tch::{Device, Tensor};

use crate::density::FlowArgs;
use crate::device::parse_device;
use crate::progress::Progress;

#[derive(Args)]
pub struct InterpolateArgs {
    /// Model directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Features of the protein (.npz with single, pair).
    #[arg(long)]
    features: PathBuf,
    /// The first end (a PDB; its first structure).
    #[arg(long)]
    from: PathBuf,
    /// The other end (a PDB; its first structure).
    #[arg(long)]
    to: PathBuf,
    /// Frames of the path, both ends included.
    #[arg(long, default_value_t = 11)]
    frames: usize,
    #[command(flatten)]
    flow: FlowArgs,
    /// Skip the per-frame log-density (the decoding then needs no
    /// divergence: about 10 times cheaper).
    #[arg(long)]
    no_density: bool,
    /// Frames decoded together.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Output directory: path.pdb, path.xtc + topology.pdb, samples.npz
    /// (`digctl evaluate --samples DIR` reads it), path.json.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
}

pub fn run(args: InterpolateArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    if args.frames < 2 || args.frames > 1000 {
        bail!(
            "--frames must be between 2 and 1000 (both ends included), got {}",
            args.frames
        );
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(t) = args.threads {
        if t < 1 {
            bail!("--threads must be at least 1, got {t}");
        }
        tch::set_num_threads(t);
    }
    let settings = args
        .flow
        .settings(!args.no_density, dig_model::sampling::flow::Ode::Published)?;
    let model = DigModel::load_dir(&args.model, device)
        .with_context(|| format!("cannot load model directory {}", args.model.display()))?;
    let features = Features::from_npz(&args.features)?;
    features.validate(model.net.config())?;
    let len = features.len();
    let end = |path: &PathBuf, flag: &str| -> Result<(Vec<f32>, Vec<f32>)> {
        let (tr, rot, _) = read_poses(path, None, len as usize)
            .with_context(|| format!("{flag} {}", path.display()))?;
        Ok((
            tr[..len as usize * 3].to_vec(),
            rot[..len as usize * 9].to_vec(),
        ))
    };
    let (a, b) = (end(&args.from, "--from")?, end(&args.to, "--to")?);
    let sequence = match &features.sequence {
        Some(s) => s.clone(),
        None => read_trajectory(&args.from, None)?.sequence(),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let so3 = So3Tables::compute();
    let times = FlowTimes::new(model.net.config());
    let ctx = model.net.prepare(
        &features.single.to_device(device),
        &features.pair.to_device(device),
        4096 << 20,
    );
    let mut field = NetworkFlowField::new(&model.net, &ctx, &so3);
    let started = Instant::now();
    let n = args.frames;
    let mut progress = Progress::new((2 + n) as u64 * settings.steps as u64, "interpolate");
    // Encode both ends (no density needed for them).
    let mut encode_settings = settings;
    encode_settings.divergence = None;
    let l = len;
    let tr = Tensor::from_slice(&[a.0.clone(), b.0.clone()].concat()).view([2, l, 3]);
    let rot = Tensor::from_slice(&[a.1.clone(), b.1.clone()].concat()).view([2, l, 3, 3]);
    let noise = flow(
        &mut field,
        &times,
        (&tr.to_device(device), &rot.to_device(device)),
        (times.t_end(), 1.0),
        &encode_settings,
        &[0, 1],
        |_| progress.inc(2),
    );
    let flat = |t: &Tensor| {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).expect("float32")
    };
    let (ntr, nrot) = (flat(&noise.tr), flat(&noise.rot));
    let (la, lr) = (l as usize * 3, l as usize * 9);
    let fractions: Vec<f64> = (0..n).map(|i| i as f64 / (n - 1) as f64).collect();
    let (ptr, prot) = interpolate_noise(
        (&ntr[..la], &nrot[..lr]),
        (&ntr[la..], &nrot[lr..]),
        &fractions,
    );
    // Decode every frame, with its log-density.
    let mut ensemble = Ensemble {
        sequence: sequence.clone(),
        sample_index: (0..n as i64).collect(),
        tr: Vec::with_capacity(n * la),
        rot_mat: Vec::with_capacity(n * lr),
        steer: None,
        log_density: None,
    };
    let mut densities = Vec::with_capacity(n);
    for start in (0..n).step_by(args.batch_size) {
        let end = (start + args.batch_size).min(n);
        let bsz = (end - start) as i64;
        let tr = Tensor::from_slice(&ptr[start * la..end * la]).view([bsz, l, 3]);
        let rot = Tensor::from_slice(&prot[start * lr..end * lr]).view([bsz, l, 3, 3]);
        let prior = log_prior(&times, &tr);
        let indices: Vec<u64> = (start as u64..end as u64).collect();
        let run = flow(
            &mut field,
            &times,
            (&tr.to_device(device), &rot.to_device(device)),
            (1.0, times.t_end()),
            &settings,
            &indices,
            |_| progress.inc(bsz as u64),
        );
        ensemble.tr.extend(flat(&run.tr));
        ensemble.rot_mat.extend(flat(&run.rot));
        for (i, p) in prior.iter().enumerate() {
            densities.push(
                settings
                    .divergence
                    .map(|_| (p + run.integral[i], run.variance[i].sqrt())),
            );
        }
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let validity = ensemble.validity();
    ensemble.write_npz(&args.out.join("samples.npz"))?;
    ensemble.write_pdb_file(&args.out.join("path.pdb"))?;
    ensemble.write_xtc_file(&args.out.join("path.xtc"))?;
    ensemble.write_topology_pdb_file(&args.out.join("topology.pdb"))?;
    let report = json!({
        "model": args.model,
        "from": args.from,
        "to": args.to,
        "frames": n,
        "ode": settings.ode.as_str(),
        "flow_steps": settings.steps,
        "divergence": settings.divergence.map(|d| d.to_string()),
        "interpolation": "noise at t = 1: translations by slerp of the 3L vector, rotations along each residue's geodesic",
        "seconds": seconds,
        "path": fractions.iter().enumerate().map(|(i, s)| json!({
            "frame": i,
            "fraction": s,
            "log_density": densities[i].map(|d| d.0),
            "std_error": densities[i].map(|d| d.1),
            "valid": validity[i].valid,
        })).collect::<Vec<_>>(),
        "files": {"npz": "samples.npz", "pdb": "path.pdb", "xtc": "path.xtc", "topology": "topology.pdb"},
    });
    let tmp = args.out.join(".path.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::rename(&tmp, args.out.join("path.json"))?;
    let valid = validity.iter().filter(|v| v.valid).count();
    println!(
        "{n} frames from {} to {} in {seconds:.1} s, {valid} physically valid: {}",
        args.from.display(),
        args.to.display(),
        args.out.display()
    );
    for (i, d) in densities.iter().enumerate() {
        if let Some((lp, se)) = d {
            println!(
                "  frame {i:>3}: log-density {lp:>10.1} (± {se:.1}){}",
                if validity[i].valid { "" } else { "  invalid" }
            );
        }
    }
    Ok(())
}
