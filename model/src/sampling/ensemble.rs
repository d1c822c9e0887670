//! Sampling an ensemble: the glue between the initial-state RNG, the sampler
//! and the output [`Ensemble`]. Samples of one protein are drawn in batches
//! of `batch_size` that share one [`ProteinContext`]; sample `i` depends only
//! on `(model, features, seed, i, steps)`, whatever batch it lands in.

use tch::{Device, Kind, Tensor};

use super::schedule::Schedule;
use super::solvers::Sampler;
use crate::network::ProteinContext;
use crate::rng::initial_state;
use crate::structure::Ensemble;
use crate::{ModelError, Result};

/// Where the initial poses come from.
pub enum InitialPoses {
    /// Drawn from `(seed, index)` by the counter-based RNG.
    Seeded { seed: u64, indices: Vec<u64> },
    /// Given explicitly (for example the published code's `init_state.npz`):
    /// `tr (N, L, 3)`, `rot (N, L, 3, 3)`; sample indices are `0..N`.
    Given { tr: Tensor, rot: Tensor },
    /// Partial diffusion: sample `i` starts from structure `i mod M` of
    /// `start`, noised by the forward process to its schedule's start
    /// ([`PartialStart`]).
    Noised {
        seed: u64,
        indices: Vec<u64>,
        start: std::sync::Arc<PartialStart>,
    },
}

/// Where a partial-diffusion run starts: `M` structures (frames centred on
/// the mean CA, `tr (M*L*3)`, `rot (M*L*9)`) and the noise level of the
/// first step run, `sigma_tr`, `sigma_rot` (none at `t = 0`: the input
/// itself). Sample `i`'s forward-process draws come from a ChaCha20 stream
/// keyed by `seed (u64 LE) | "digpartl" | 0 | 0` with stream number `i`: per
/// residue 3 translation normals (x y z, [`standard_normals`]), then per
/// residue an axis (3 normals, normalised) and an IGSO(3) angle by inverse
/// CDF of one uniform ([`uniform`](crate::rng::uniform)) on the published
/// table of `sigma_rot`; `T = T0 + sigma_tr z`, `R = expmap(angle axis) R0`
/// (space frame, as in training).
pub struct PartialStart {
    pub tr: Vec<f32>,
    pub rot: Vec<f32>,
    pub structures: usize,
    pub len: usize,
    /// The forward process's level at the start; `None` at `t = 0`.
    pub noise: Option<PartialNoise>,
}

/// The noise level of a partial-diffusion start and the IGSO(3) angle CDF
/// of its `sigma_rot` (on the published table's angles).
pub struct PartialNoise {
    pub sigma_tr: f64,
    pub sigma_rot: f64,
    pub omegas: Vec<f64>,
    pub cdf: Vec<f64>,
}

impl PartialStart {
    /// The start of sample `index` under `seed`: `(tr (L*3), rot (L*9))`.
    pub fn pose(&self, seed: u64, index: u64) -> (Vec<f32>, Vec<f32>) {
        use rand::SeedableRng;
        let l = self.len;
        let m = (index % self.structures as u64) as usize;
        let tr0 = &self.tr[m * l * 3..(m + 1) * l * 3];
        let rot0 = &self.rot[m * l * 9..(m + 1) * l * 9];
        let Some(PartialNoise {
            sigma_tr: s_tr,
            omegas,
            cdf,
            ..
        }) = &self.noise
        else {
            return (tr0.to_vec(), rot0.to_vec());
        };
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(b"digpartl");
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(key);
        rng.set_stream(index);
        let z = crate::rng::standard_normals(&mut rng, 3 * l);
        let tr: Vec<f32> = tr0
            .iter()
            .zip(&z)
            .map(|(&t, &z)| (t as f64 + s_tr * z) as f32)
            .collect();
        let mut v = Vec::with_capacity(3 * l);
        for _ in 0..l {
            let a = crate::rng::standard_normals(&mut rng, 3);
            let norm = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]).sqrt().max(1e-12);
            let angle = crate::training::interp(crate::rng::uniform(&mut rng), cdf, omegas);
            v.extend(a.iter().map(|x| (x / norm * angle) as f32));
        }
        let noise = super::solvers::expmap(&Tensor::from_slice(&v).view([l as i64, 3]));
        let rot = noise.matmul(&Tensor::from_slice(rot0).view([l as i64, 3, 3]));
        (
            tr,
            Vec::<f32>::try_from(rot.flatten(0, -1)).expect("float32 rotations"),
        )
    }
}

/// A partial-diffusion run: its start ([`PartialStart`]) and where in the
/// schedule it begins.
pub struct Partial {
    pub start: std::sync::Arc<PartialStart>,
    /// The requested diffusion time, in (0, 1].
    pub from_time: f64,
    /// The first step run (0: the whole schedule, from the prior; the
    /// schedule's length: none, the input returned as it is).
    pub start_step: usize,
    /// The time of that step (0 when no step is run).
    pub start_time: f64,
}

impl Partial {
    /// Partial diffusion of the structures `(tr, rot)` (`structures` of
    /// `len` residues, as [`crate::backbone::read_poses`] returns them) from
    /// diffusion time `from_time` in (0, 1]: the tail of `schedule` that
    /// runs and the start. One rule for `digctl sample --from-structure`
    /// and jobs with `from_structure`, so both draw the same samples.
    pub fn new(
        schedule: &Schedule,
        tr: Vec<f32>,
        rot: Vec<f32>,
        structures: usize,
        len: usize,
        from_time: f64,
    ) -> Result<(Schedule, Partial)> {
        if !(from_time > 0.0 && from_time <= 1.0) {
            return Err(ModelError::Invalid(format!(
                "from_time must be in (0, 1], got {from_time}"
            )));
        }
        let k0 = schedule.first_step_at(from_time);
        let start_time = schedule.steps.get(k0).map_or(0.0, |p| p.t);
        let noise = schedule.steps.get(k0).map(|p| {
            let (omegas, cdf) = crate::training::Igso3::new().cdf(p.sigma_rot);
            PartialNoise {
                sigma_tr: p.sigma_tr,
                sigma_rot: p.sigma_rot,
                omegas,
                cdf,
            }
        });
        let tail = if k0 > 0 {
            schedule.tail(k0)
        } else {
            schedule.clone()
        };
        Ok((
            tail,
            Partial {
                start: std::sync::Arc::new(PartialStart {
                    tr,
                    rot,
                    structures,
                    len,
                    noise,
                }),
                from_time,
                start_step: k0,
                start_time,
            },
        ))
    }

    /// The initial poses of sample `indices` under `seed`: the inputs noised
    /// to the start; from t = 1 (no step skipped), ordinary sampling from
    /// the prior, bit for bit.
    pub fn poses(&self, seed: u64, indices: Vec<u64>) -> InitialPoses {
        if self.start_step == 0 {
            InitialPoses::Seeded { seed, indices }
        } else {
            InitialPoses::Noised {
                seed,
                indices,
                start: self.start.clone(),
            }
        }
    }

    /// The noise level of the start (`None` when the run starts from the
    /// prior or runs no step).
    pub fn noise(&self) -> Option<&PartialNoise> {
        self.start.noise.as_ref().filter(|_| self.start_step > 0)
    }
}

impl InitialPoses {
    pub fn len(&self) -> usize {
        match self {
            InitialPoses::Seeded { indices, .. } | InitialPoses::Noised { indices, .. } => {
                indices.len()
            }
            InitialPoses::Given { tr, .. } => tr.size()[0] as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn indices(&self) -> Vec<i64> {
        match self {
            InitialPoses::Seeded { indices, .. } | InitialPoses::Noised { indices, .. } => {
                indices.iter().map(|&i| i as i64).collect()
            }
            InitialPoses::Given { tr, .. } => (0..tr.size()[0]).collect(),
        }
    }

    /// The poses of positions `range` as `(tr (B,L,3), rot (B,L,3,3))` on `device`.
    fn batch(
        &self,
        range: std::ops::Range<usize>,
        len: i64,
        tr_sigma_max: f64,
        device: Device,
    ) -> (Tensor, Tensor) {
        match self {
            InitialPoses::Seeded { seed, indices } => {
                let b = range.len() as i64;
                let (mut tr, mut rot) = (Vec::new(), Vec::new());
                for &i in &indices[range] {
                    let s = initial_state(*seed, i, len as usize, tr_sigma_max);
                    tr.extend(s.tr);
                    rot.extend(s.rot);
                }
                (
                    Tensor::from_slice(&tr).view([b, len, 3]).to_device(device),
                    Tensor::from_slice(&rot)
                        .view([b, len, 3, 3])
                        .to_device(device),
                )
            }
            InitialPoses::Noised {
                seed,
                indices,
                start,
            } => {
                let b = range.len() as i64;
                let (mut tr, mut rot) = (Vec::new(), Vec::new());
                for &i in &indices[range] {
                    let (t, r) = start.pose(*seed, i);
                    tr.extend(t);
                    rot.extend(r);
                }
                (
                    Tensor::from_slice(&tr).view([b, len, 3]).to_device(device),
                    Tensor::from_slice(&rot)
                        .view([b, len, 3, 3])
                        .to_device(device),
                )
            }
            InitialPoses::Given { tr, rot } => {
                let (s, e) = (range.start as i64, range.end as i64);
                (
                    tr.narrow(0, s, e - s).to_device(device),
                    rot.narrow(0, s, e - s).to_device(device),
                )
            }
        }
    }
}

/// Loads `tr` and `rot_mat` from an `.npz`, as `(N, L, ...)` (a single state
/// `(L, 3)` counts as N = 1), checking them against the protein length.
pub fn read_initial_state(path: &std::path::Path, len: i64) -> Result<InitialPoses> {
    let named = Tensor::read_npz(path)
        .map_err(|e| ModelError::format(path, format!("not a readable .npz ({e})")))?;
    let get = |key: &str| {
        named
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.to_kind(Kind::Float))
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    format!("no '{key}' array; expected tr (L,3) and rot_mat (L,3,3)"),
                )
            })
    };
    let (mut tr, mut rot) = (get("tr")?, get("rot_mat")?);
    if tr.dim() == 2 {
        tr = tr.unsqueeze(0);
    }
    if rot.dim() == 3 {
        rot = rot.unsqueeze(0);
    }
    let (ts, rs) = (tr.size(), rot.size());
    if ts.len() != 3 || ts[2] != 3 || rs.len() != 4 || rs[2..] != [3, 3] || rs[..2] != ts[..2] {
        return Err(ModelError::format(
            path,
            format!("tr {ts:?} and rot_mat {rs:?} are not (N,L,3) and (N,L,3,3)"),
        ));
    }
    if ts[1] != len {
        return Err(ModelError::Invalid(format!(
            "initial state {} has {} residues but the features have L = {len}",
            path.display(),
            ts[1]
        )));
    }
    Ok(InitialPoses::Given { tr, rot })
}

/// Samples every pose of `init` in batches of `batch_size`, calling
/// `progress(samples_done, step_in_batch)` after each step.
pub fn sample_ensemble(
    sampler: &Sampler,
    ctx: &ProteinContext,
    init: &InitialPoses,
    batch_size: usize,
    tr_sigma_max: f64,
    sequence: &str,
    progress: impl FnMut(usize),
) -> Ensemble {
    let never = || false;
    sample_ensemble_until(
        sampler,
        ctx,
        init,
        batch_size,
        tr_sigma_max,
        sequence,
        progress,
        &never,
    )
    .expect("never asked to stop")
}

/// [`sample_ensemble`] that asks `stop` before each batch and gives up,
/// returning `None`, when it answers true: a caller can interrupt a long run
/// at the next batch boundary (a cancelled job, a worker shutting down).
/// Batches are the unit of work, so nothing of a stopped run is returned.
#[allow(clippy::too_many_arguments)]
pub fn sample_ensemble_until(
    sampler: &Sampler,
    ctx: &ProteinContext,
    init: &InitialPoses,
    batch_size: usize,
    tr_sigma_max: f64,
    sequence: &str,
    mut progress: impl FnMut(usize),
    stop: &dyn Fn() -> bool,
) -> Option<Ensemble> {
    let n = init.len();
    let l = ctx.len();
    let mut tr_out = Vec::with_capacity(n * l as usize * 3);
    let mut rot_out = Vec::with_capacity(n * l as usize * 9);
    let mut start = 0;
    while start < n {
        if stop() {
            return None;
        }
        let end = (start + batch_size.max(1)).min(n);
        let (tr, rot) = init.batch(start..end, l, tr_sigma_max, ctx.device());
        let b = end - start;
        let (tr, rot) = sampler.run(ctx, tr, rot, |_| progress(b));
        tr_out.extend(
            Vec::<f32>::try_from(tr.to_device(Device::Cpu).flatten(0, -1)).expect("float32 output"),
        );
        rot_out.extend(
            Vec::<f32>::try_from(rot.to_device(Device::Cpu).flatten(0, -1))
                .expect("float32 output"),
        );
        start = end;
    }
    Some(Ensemble {
        sequence: sequence.to_string(),
        sample_index: init.indices(),
        tr: tr_out,
        rot_mat: rot_out,
        steer: None,
        log_density: None,
    })
}

/// Stochastic or steered sampling ([`super::steering`]) of the samples
/// `indices` under `seed`: batches of `max(1, batch_size / K)` whole
/// particle groups (`K = steering.particles`), so a forward pass holds about
/// `batch_size` particles. `progress(samples)` after each step, `stop` before
/// each batch as in [`sample_ensemble_until`]. The ensemble carries each
/// sample's energy and `log Z_hat` when steering has potentials.
#[allow(clippy::too_many_arguments)]
pub fn sample_ensemble_steered_until(
    sampler: &Sampler,
    ctx: &ProteinContext,
    seed: u64,
    indices: &[u64],
    batch_size: usize,
    steering: &super::steering::Steering,
    tr_sigma_max: f64,
    sequence: &str,
    mut progress: impl FnMut(usize),
    stop: &dyn Fn() -> bool,
) -> Option<Ensemble> {
    let l = ctx.len() as usize;
    let groups = (batch_size / steering.particles).max(1);
    let mut out = Ensemble {
        sequence: sequence.to_string(),
        sample_index: indices.iter().map(|&i| i as i64).collect(),
        tr: Vec::with_capacity(indices.len() * l * 3),
        rot_mat: Vec::with_capacity(indices.len() * l * 9),
        steer: (!steering.potentials.is_empty()).then(Default::default),
        log_density: None,
    };
    for chunk in indices.chunks(groups) {
        if stop() {
            return None;
        }
        let mut field = super::solvers::NetworkField {
            net: sampler.net(),
            ctx,
        };
        let results = super::steering::sample_groups(
            sampler.schedule(),
            &mut field,
            steering,
            seed,
            chunk,
            l,
            tr_sigma_max,
            ctx.device(),
            |_| progress(chunk.len()),
        );
        for r in results {
            out.tr.extend(r.tr);
            out.rot_mat.extend(r.rot);
            if let Some(s) = &mut out.steer {
                s.energy.push(r.energy);
                s.log_z.push(r.log_z);
            }
        }
    }
    Some(out)
}
