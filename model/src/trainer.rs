//! The training loop behind `digctl train`: batches of frames of one protein
//! crop, the published loss, Adam with a linear warm-up, gradient clipping,
//! a validation loss on held-out frames, and checkpoints from which a run
//! resumes bit-identically (same machine, same thread count).
//!
//! Every random draw of step `s` comes from a ChaCha20 stream keyed by
//! `(seed, s)` (batch, crop, time steps, noise) and libtorch's generator
//! re-seeded from `(seed, s)` (dropout), so step `s` does not depend on how
//! the run got there: an interrupted and resumed run makes the same updates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dataset::ProteinData;
use crate::empirical::EmpiricalScore;
use crate::training::{Adam, Batch, Ema, Igso3, Noise};
use crate::weights::DigModel;
use crate::{ModelError, Result};

/// Learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The learning rate stays at `lr` (the published configuration).
    Constant,
    /// Cosine decay from `lr` to `lr * min_lr_fraction` at the last step.
    Cosine,
}

/// Everything that decides the updates of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: LrSchedule,
    pub min_lr_fraction: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    pub crop: usize,
    pub seed: u64,
    pub val_fraction: f64,
    pub dropout: f64,
    /// Decay of an exponential moving average of the weights kept beside
    /// them (`None`: no average).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    /// Training time steps weighted towards high noise (`--high-t-weight`);
    /// `None`: the published mirrored uniform draw. Validation always uses
    /// the published draw, so its losses compare across runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_weighting: Option<crate::training::TimeWeighting>,
    /// Above this diffusion time the training targets are the exact score
    /// of the protein's training frames at the perturbed pose (averaged
    /// over global rotations, [`crate::empirical`]) instead of the score of
    /// the one frame that was noised (`--exact-target-above`). The loss has
    /// the same minimiser and far less variance where the noise hides which
    /// frame it came from. Validation keeps the published targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_target_above: Option<f64>,
}

impl TrainOptions {
    /// Learning rate of update `s` (0-based).
    pub fn lr_at(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.lr * (s + 1) as f64 / self.warmup as f64;
        }
        match self.schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
                let x = ((s - self.warmup) as f64 / span).min(1.0);
                let f = self.min_lr_fraction
                    + (1.0 - self.min_lr_fraction) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos());
                self.lr * f
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        if self.batch_size == 0 || !self.batch_size.is_multiple_of(2) {
            return bad(format!(
                "--batch-size must be even and positive (time steps are drawn in mirrored pairs), got {}",
                self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if self.crop < 2 {
            return bad(format!(
                "--crop must be at least 2 residues, got {}",
                self.crop
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("--dropout must be in [0, 1), got {}", self.dropout));
        }
        if let Some(d) = self.ema {
            if !(d > 0.0 && d < 1.0) {
                return bad(format!("--ema must be in (0, 1), got {d}"));
            }
        }
        if let Some(w) = self.time_weighting {
            if !(w.weight.is_finite() && w.weight > 0.0) {
                return bad(format!(
                    "--high-t-weight must be positive, got {}",
                    w.weight
                ));
            }
            if !(w.from > 0.0 && w.from < 1.0) {
                return bad(format!("--high-t-from must be in (0, 1), got {}", w.from));
            }
        }
        if let Some(t) = self.exact_target_above {
            if !(0.0..1.0).contains(&t) {
                return bad(format!("--exact-target-above must be in [0, 1), got {t}"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_fraction) {
            return bad(format!(
                "--min-lr-fraction must be in [0, 1], got {}",
                self.min_lr_fraction
            ));
        }
        Ok(())
    }
}

/// Mean losses over a window of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
    pub tr_loss: f64,
    pub rot_loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
}

/// What a checkpoint stores besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub options: TrainOptions,
    /// Fingerprint of the data: per trajectory, residues and frame count.
    pub data: Vec<(String, usize, usize)>,
    pub history: Vec<LossPoint>,
    pub validation: Vec<LossPoint>,
    /// The validation loss of the averaged weights (with `--ema`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_ema: Vec<LossPoint>,
    pub seconds: f64,
    pub tensors: String,
}

/// Checkpoint folder inside a run's output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const STATE_FILE: &str = "state.json";

pub struct Trainer {
    pub model: DigModel,
    adam: Adam,
    data: Vec<ProteinData>,
    /// Per protein: `single (L, 384)` and `pair (L, L, 128)` on the device.
    feats: Vec<(Tensor, Tensor)>,
    pub opts: TrainOptions,
    igso: Igso3,
    /// Updates done.
    pub step: u64,
    pub history: Vec<LossPoint>,
    pub validation: Vec<LossPoint>,
    /// The validation loss of the averaged weights, at the same steps.
    pub validation_ema: Vec<LossPoint>,
    /// The moving average of the weights (`opts.ema`).
    ema: Option<Ema>,
    /// Training seconds of earlier sessions of this run (resumed).
    pub seconds_before: f64,
    window: Vec<(f64, f64, f64, f64)>,
    /// Exact-score targets per (protein, crop start, crop length), built on
    /// first use from the protein's training frames.
    exact: HashMap<(usize, usize, usize), EmpiricalScore>,
}

/// The result of one update.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    pub tr_loss: f64,
    pub rot_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

fn data_fingerprint(data: &[ProteinData]) -> Vec<(String, usize, usize)> {
    data.iter()
        .map(|p| (p.name.clone(), p.len_residues(), p.frames.len()))
        .collect()
}

impl Trainer {
    pub fn new(model: DigModel, data: Vec<ProteinData>, opts: TrainOptions) -> Result<Self> {
        opts.validate()?;
        if data.is_empty() {
            return Err(ModelError::Invalid("no training data".into()));
        }
        let device = model.device();
        let feats = data
            .iter()
            .map(|p| {
                (
                    p.features.single.to_device(device),
                    p.features.pair.to_device(device),
                )
            })
            .collect();
        let adam = Adam::new(model.trainable());
        let ema = match opts.ema {
            Some(decay) => Some(Ema::new(decay, adam.params())?),
            None => None,
        };
        Ok(Trainer {
            model,
            adam,
            data,
            feats,
            opts,
            igso: Igso3::new(),
            step: 0,
            history: Vec::new(),
            validation: Vec::new(),
            validation_ema: Vec::new(),
            ema,
            seconds_before: 0.0,
            window: Vec::new(),
            exact: HashMap::new(),
        })
    }

    pub fn data(&self) -> &[ProteinData] {
        &self.data
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    /// A crop window `[start, start + len)` of a protein of `l` residues.
    fn crop(&self, rng: &mut ChaCha20Rng, l: usize) -> (usize, usize) {
        if l <= self.opts.crop {
            (0, l)
        } else {
            let start = (rng.next_u64() % (l - self.opts.crop + 1) as u64) as usize;
            (start, self.opts.crop)
        }
    }

    /// Batch tensors of `frames` of protein `p` over residues `start..start+len`,
    /// translations re-centred on the crop's mean CA.
    fn batch(&self, p: usize, frames: &[usize], start: usize, len: usize) -> Batch {
        let prot = &self.data[p];
        let b = frames.len() as i64;
        let (mut tr, mut rot) = (Vec::new(), Vec::new());
        for &f in frames {
            let (t, r) = &prot.frames[f];
            let t = &t[start * 3..(start + len) * 3];
            let mut centre = [0f64; 3];
            for v in t.chunks_exact(3) {
                for k in 0..3 {
                    centre[k] += v[k] as f64 / len as f64;
                }
            }
            for v in t.chunks_exact(3) {
                for k in 0..3 {
                    tr.push((v[k] as f64 - centre[k]) as f32);
                }
            }
            rot.extend_from_slice(&r[start * 9..(start + len) * 9]);
        }
        let dev = self.device();
        let l = len as i64;
        Batch {
            tr: Tensor::from_slice(&tr).view([b, l, 3]).to_device(dev),
            rot: Tensor::from_slice(&rot).view([b, l, 3, 3]).to_device(dev),
            mask: Tensor::zeros([b, l], (Kind::Bool, dev)),
        }
    }

    fn features(&self, p: usize, start: usize, len: usize) -> (Tensor, Tensor) {
        let (s, q) = &self.feats[p];
        let (a, n) = (start as i64, len as i64);
        (
            s.narrow(0, a, n),
            q.narrow(0, a, n).narrow(1, a, n).contiguous(),
        )
    }

    /// The loss of `frames` of protein `p` over the crop `[start, start+len)`
    /// with noise drawn from `rng`; `dropout` as in
    /// [`diffusion_loss`](crate::training::diffusion_loss).
    /// `training`: time steps and targets as the options say (weighted,
    /// exact above a time); otherwise the published draw and targets.
    fn batch_loss(
        &mut self,
        rng: &mut ChaCha20Rng,
        p: usize,
        frames: &[usize],
        (start, len): (usize, usize),
        dropout: Option<f64>,
        training: bool,
    ) -> Result<crate::training::LossParts> {
        let (weighting, exact_above) = match training {
            true => (self.opts.time_weighting, self.opts.exact_target_above),
            false => (None, None),
        };
        let batch = self.batch(p, frames, start, len);
        let cfg = self.model.net.config();
        let noise = match weighting {
            None => Noise::draw(rng, frames.len(), len, cfg, &mut self.igso)?,
            Some(w) => Noise::draw_weighted(rng, frames.len(), len, cfg, &mut self.igso, &w)?,
        };
        let (single, pair) = self.features(p, start, len);
        let mut exact = match exact_above {
            None => None,
            Some(above) => {
                let emp_rng = ChaCha20Rng::seed_from_u64(rng.next_u64());
                let prot = &self.data[p];
                // One entry per crop window: bounded, for long proteins
                // cropped at many places (each holds the training frames of
                // its window).
                if self.exact.len() >= 32 && !self.exact.contains_key(&(p, start, len)) {
                    self.exact.clear();
                }
                let emp = self.exact.entry((p, start, len)).or_insert_with(|| {
                    let cropped: Vec<(Vec<f32>, Vec<f32>)> = prot
                        .train
                        .iter()
                        .map(|&f| {
                            let (t, r) = &prot.frames[f];
                            (
                                t[start * 3..(start + len) * 3].to_vec(),
                                r[start * 9..(start + len) * 9].to_vec(),
                            )
                        })
                        .collect();
                    EmpiricalScore::new(&cropped)
                });
                Some((above, emp, emp_rng))
            }
        };
        let has_exact = exact.is_some();
        let mut targets = |t: f64, tr: &Tensor, rot: &Tensor, s_tr: f64, s_rot: f64| {
            let (above, emp, emp_rng) = exact.as_mut()?;
            (t > *above).then(|| {
                let (a, b, _) = emp.score_batch(tr, rot, s_tr, s_rot, emp_rng);
                (a, b)
            })
        };
        let targets: Option<&mut crate::training::TargetFn<'_>> = has_exact.then_some(&mut targets);
        Ok(crate::training::diffusion_loss_with(
            &self.model.net,
            &single,
            &pair,
            &batch,
            &noise,
            &mut self.igso,
            dropout,
            targets,
        ))
    }

    /// One update (step `self.step`), returning its losses.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let s = self.step;
        let mut rng = ChaCha20Rng::seed_from_u64(self.opts.seed);
        rng.set_stream(s);
        // Protein by weight, then frames of it uniformly (with replacement).
        let total: f64 = self.data.iter().map(|p| p.entry.weight).sum();
        let mut x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut p = 0;
        while p + 1 < self.data.len() && x >= self.data[p].entry.weight {
            x -= self.data[p].entry.weight;
            p += 1;
        }
        let l = self.data[p].len_residues();
        let (start, len) = self.crop(&mut rng, l);
        let train = &self.data[p].train;
        let frames: Vec<usize> = (0..self.opts.batch_size)
            .map(|_| train[(rng.next_u64() % train.len() as u64) as usize])
            .collect();
        // Dropout draws from libtorch's generator, seeded by (seed, step);
        // everything else from the ChaCha stream.
        tch::manual_seed((self.opts.seed.wrapping_mul(1_000_003) ^ s) as i64 & i64::MAX);
        let dropout = (self.opts.dropout > 0.0).then_some(self.opts.dropout);
        let parts = self.batch_loss(&mut rng, p, &frames, (start, len), dropout, true)?;
        self.adam.zero_grad();
        parts.loss.backward();
        let grad_norm = self.adam.clip_grad_norm(self.opts.clip);
        let lr = self.opts.lr_at(s);
        let loss = parts.loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(ModelError::Invalid(format!(
                "the loss became {loss} at step {}; lower --lr or raise --warmup",
                s + 1
            )));
        }
        self.adam.step(lr);
        if let Some(ema) = &mut self.ema {
            ema.update(self.adam.params());
        }
        self.step += 1;
        let stats = StepStats {
            loss,
            tr_loss: parts.tr_loss.double_value(&[]),
            rot_loss: parts.rot_loss.double_value(&[]),
            grad_norm,
            lr,
        };
        self.window
            .push((stats.loss, stats.tr_loss, stats.rot_loss, stats.grad_norm));
        Ok(stats)
    }

    /// Closes the current logging window into `history` (mean losses).
    pub fn log_window(&mut self) -> Option<LossPoint> {
        if self.window.is_empty() {
            return None;
        }
        let n = self.window.len() as f64;
        let sum = self.window.iter().fold((0.0, 0.0, 0.0, 0.0), |a, w| {
            (a.0 + w.0, a.1 + w.1, a.2 + w.2, a.3 + w.3)
        });
        self.window.clear();
        let point = LossPoint {
            step: self.step,
            loss: sum.0 / n,
            tr_loss: sum.1 / n,
            rot_loss: sum.2 / n,
            lr: Some(self.opts.lr_at(self.step.saturating_sub(1))),
            grad_norm: Some(sum.3 / n),
        };
        self.history.push(point.clone());
        Some(point)
    }

    /// The loss on the held-out frames: each frame at `repeats` mirrored
    /// pairs of time steps drawn from a fixed stream (the same draws at every
    /// evaluation), dropout off. `None` when no frame is held out.
    pub fn validate(&mut self, repeats: usize) -> Result<Option<LossPoint>> {
        let point = self.validation_loss(repeats)?;
        if let Some(p) = &point {
            self.validation.push(p.clone());
        }
        Ok(point)
    }

    /// The validation loss of the averaged weights (the same draws as
    /// [`validate`](Self::validate)); `None` without `--ema` or held-out frames.
    pub fn validate_ema(&mut self, repeats: usize) -> Result<Option<LossPoint>> {
        let Some(mut ema) = self.ema.take() else {
            return Ok(None);
        };
        ema.swap_into(self.adam.params());
        let point = self.validation_loss(repeats);
        ema.swap_into(self.adam.params());
        self.ema = Some(ema);
        let point = point?;
        if let Some(p) = &point {
            self.validation_ema.push(p.clone());
        }
        Ok(point)
    }

    /// Whether the run keeps a moving average.
    pub fn has_ema(&self) -> bool {
        self.ema.is_some()
    }

    /// Runs `f` with the averaged weights in the model (the trained ones
    /// back afterwards, bit for bit); without `--ema`, with the trained ones.
    pub fn with_ema_weights<T>(&mut self, f: impl FnOnce(&DigModel) -> T) -> T {
        match self.ema.as_mut() {
            Some(ema) => {
                ema.swap_into(self.adam.params());
                let out = f(&self.model);
                ema.swap_into(self.adam.params());
                out
            }
            None => f(&self.model),
        }
    }

    /// The averaged weights, by name (`None` without `--ema`).
    pub fn ema_weights(&self) -> Option<&[(String, Tensor)]> {
        self.ema.as_ref().map(|e| e.weights())
    }

    fn validation_loss(&mut self, repeats: usize) -> Result<Option<LossPoint>> {
        let _guard = tch::no_grad_guard();
        let (mut sum, mut n) = ((0.0, 0.0, 0.0), 0usize);
        for p in 0..self.data.len() {
            let mut rng = ChaCha20Rng::seed_from_u64(self.opts.seed);
            rng.set_stream(u64::MAX - p as u64);
            let val = self.data[p].val.clone();
            let l = self.data[p].len_residues();
            for &f in &val {
                for _ in 0..repeats {
                    let crop = self.crop(&mut rng, l);
                    let parts = self.batch_loss(&mut rng, p, &[f, f], crop, None, false)?;
                    sum.0 += parts.loss.double_value(&[]);
                    sum.1 += parts.tr_loss.double_value(&[]);
                    sum.2 += parts.rot_loss.double_value(&[]);
                    n += 1;
                }
            }
        }
        if n == 0 {
            return Ok(None);
        }
        let k = n as f64;
        let point = LossPoint {
            step: self.step,
            loss: sum.0 / k,
            tr_loss: sum.1 / k,
            rot_loss: sum.2 / k,
            lr: None,
            grad_norm: None,
        };
        Ok(Some(point))
    }

    /// Writes a checkpoint into `out/checkpoint/` atomically: the tensors
    /// under a new name, then `state.json` (renamed into place) pointing at
    /// them, then older tensor files removed. A crash at any point leaves
    /// the previous checkpoint or the new one, never a mix.
    pub fn save_checkpoint(&self, out: &Path, seconds: f64) -> Result<()> {
        let dir = out.join(CHECKPOINT_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
        let name = format!("step-{:08}.safetensors", self.step);
        let mut named = self.model.state_dict();
        named.extend(self.adam.state());
        if let Some(ema) = &self.ema {
            named.extend(ema.state());
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        Tensor::write_safetensors(&named, &tmp)?;
        std::fs::rename(&tmp, dir.join(&name)).map_err(|e| ModelError::io(&dir, e))?;
        let state = CheckpointState {
            step: self.step,
            options: self.opts.clone(),
            data: data_fingerprint(&self.data),
            history: self.history.clone(),
            validation: self.validation.clone(),
            validation_ema: self.validation_ema.clone(),
            seconds,
            tensors: name.clone(),
        };
        let text = serde_json::to_string_pretty(&state).expect("state serializes");
        let tmp = dir.join(".state.json.tmp");
        std::fs::write(&tmp, text).map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| ModelError::io(&dir, e))?;
        for entry in std::fs::read_dir(&dir).map_err(|e| ModelError::io(&dir, e))? {
            let path = entry.map_err(|e| ModelError::io(&dir, e))?.path();
            let fname = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if fname.starts_with("step-") && fname != name {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// The checkpoint state of a run directory, if it has one.
    pub fn read_checkpoint_state(out: &Path) -> Result<Option<CheckpointState>> {
        let path = out.join(CHECKPOINT_DIR).join(STATE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::format(&path, format!("not a checkpoint state: {e}")))
    }

    /// Restores weights, optimizer moments, step and history from `out`'s
    /// checkpoint. The options must equal the checkpoint's, except `steps`
    /// (a run may be extended).
    pub fn resume(&mut self, out: &Path) -> Result<()> {
        let state = Self::read_checkpoint_state(out)?.ok_or_else(|| {
            ModelError::format(
                out.join(CHECKPOINT_DIR),
                "no checkpoint to resume from (run without --resume to start)",
            )
        })?;
        let mut a = state.options.clone();
        a.steps = self.opts.steps;
        if a != self.opts {
            let was = serde_json::to_value(&state.options).unwrap();
            let now = serde_json::to_value(&self.opts).unwrap();
            let diff: Vec<String> = now
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, v)| *k != "steps" && was.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: checkpoint {} vs now {v}", was[k]))
                .collect();
            return Err(ModelError::Invalid(format!(
                "--resume needs the options of the checkpointed run; these differ: {}",
                diff.join("; ")
            )));
        }
        let fp = data_fingerprint(&self.data);
        if fp != state.data {
            return Err(ModelError::Invalid(format!(
                "--resume needs the same data; the checkpoint was trained on {:?}, the manifest now gives {:?}",
                state.data, fp
            )));
        }
        let path: PathBuf = out.join(CHECKPOINT_DIR).join(&state.tensors);
        let named = Tensor::read_safetensors(&path)
            .map_err(|e| ModelError::format(&path, format!("unreadable checkpoint: {e}")))?;
        let (adam, rest): (Vec<_>, Vec<_>) =
            named.into_iter().partition(|(k, _)| k.starts_with("adam."));
        let (ema, model): (Vec<_>, Vec<_>) =
            rest.into_iter().partition(|(k, _)| k.starts_with("ema."));
        self.model.load_state_dict(model)?;
        if let Some(avg) = &mut self.ema {
            let ema: HashMap<String, Tensor> = ema
                .into_iter()
                .map(|(k, v)| (k, v.to_device(self.model.device())))
                .collect();
            avg.load_state(&ema)?;
        }
        let adam: HashMap<String, Tensor> = adam
            .into_iter()
            .map(|(k, v)| (k, v.to_device(self.device())))
            .collect();
        self.adam.load_state(&adam, state.step as i64)?;
        self.step = state.step;
        self.history = state.history;
        self.validation = state.validation;
        self.validation_ema = state.validation_ema;
        self.seconds_before = state.seconds;
        Ok(())
    }
}
