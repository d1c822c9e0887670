//! Model directories (`config.json` + `model.safetensors`) and loading
//! weights under the published key names, strictly: a missing, extra or
//! mis-shaped key is an error that names the key and both shapes, never a
//! silently half-initialised network.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::network::ScoreNetwork;
use crate::{ModelError, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A score network together with the variable store that owns its weights.
pub struct DigModel {
    vs: nn::VarStore,
    pub net: ScoreNetwork,
}

impl DigModel {
    fn build(cfg: &ModelConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let net = ScoreNetwork::new(&vs.root(), cfg);
        DigModel { vs, net }
    }

    /// Random weights from a fixed seed (libtorch's default initialisers).
    /// Such a model is untrained: its samples are not protein structures.
    pub fn random(cfg: &ModelConfig, seed: i64, device: Device) -> Self {
        tch::manual_seed(seed);
        let model = Self::build(cfg, device);
        // Point weights initialise to a constant; perturb them so that every
        // head differs, as in a trained model.
        // In name order: `variables()` is a HashMap, whose order changes from
        // one process to the next, and each draw advances the generator.
        let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut t) in vars {
            if name.ends_with("trained_point_weight") {
                tch::no_grad(|| t.copy_(&(Tensor::randn(t.size(), (Kind::Float, device)) * 0.5)));
            }
        }
        model
    }

    /// Builds the architecture `cfg` and fills it from `named`, which must hold
    /// exactly the architecture's keys with the same shapes.
    pub fn from_tensors(
        cfg: &ModelConfig,
        named: Vec<(String, Tensor)>,
        device: Device,
    ) -> Result<Self> {
        let model = Self::build(cfg, device);
        let mut given: BTreeMap<String, Tensor> = named.into_iter().collect();
        let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let Some(src) = given.remove(&name) else {
                return Err(ModelError::Checkpoint(format!(
                    "key {name} is missing (the architecture expects shape {:?})",
                    var.size()
                )));
            };
            if src.size() != var.size() {
                return Err(ModelError::Checkpoint(format!(
                    "key {name} has shape {:?} in the checkpoint but the architecture expects {:?}",
                    src.size(),
                    var.size()
                )));
            }
            tch::no_grad(|| var.copy_(&src.to_kind(Kind::Float)));
        }
        if let Some((name, t)) = given.into_iter().next() {
            return Err(ModelError::Checkpoint(format!(
                "unexpected key {name} with shape {:?}: the architecture has no such parameter (wrong model config?)",
                t.size()
            )));
        }
        Ok(model)
    }

    /// The same network with `chiral_features` added (config.rs): every
    /// weight copied, the new `attn.chiral_out` zero, so the function is
    /// unchanged until training moves them. An error if it has them already.
    pub fn with_chiral_features(&self) -> Result<Self> {
        let mut cfg = self.net.config().clone();
        if cfg.chiral_features {
            return Err(ModelError::Checkpoint(
                "the model has chiral features already".into(),
            ));
        }
        cfg.chiral_features = true;
        self.with_config(&cfg)
    }

    /// This network's weights under another config: every parameter both
    /// have is copied (it must have the same shape); a parameter only `cfg`
    /// has keeps its initialiser (`chiral_out`: zero). For a changed noise
    /// schedule (the sigmas) or added chiral features.
    pub fn with_config(&self, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate().map_err(ModelError::Checkpoint)?;
        let model = Self::build(cfg, self.device());
        let old: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        // In name order, so that an error names the same key every time.
        let new: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
        for (name, mut var) in new {
            if let Some(src) = old.get(&name) {
                if src.size() != var.size() {
                    return Err(ModelError::Checkpoint(format!(
                        "key {name} has shape {:?}, but the new config needs {:?}",
                        src.size(),
                        var.size()
                    )));
                }
                tch::no_grad(|| var.copy_(src));
            }
        }
        Ok(model)
    }

    /// Loads a model directory.
    pub fn load_dir(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::format(
                dir,
                "not a model directory (expected config.json and model.safetensors)",
            ));
        }
        let cfg = ModelConfig::load(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(ModelError::format(
                &weights,
                "missing: a model directory needs model.safetensors",
            ));
        }
        let named = Tensor::read_safetensors(&weights).map_err(|e| {
            ModelError::format(&weights, format!("not a readable safetensors file: {e}"))
        })?;
        Self::from_tensors(&cfg, named, device)
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu)))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        // Write weights first and the config last: a directory with a config
        // is a finished one.
        let tmp = dir.join(".model.safetensors.tmp");
        Tensor::write_safetensors(&named, &tmp)?;
        std::fs::rename(&tmp, dir.join(WEIGHTS_FILE)).map_err(|e| ModelError::io(dir, e))?;
        self.net.config().save(&dir.join(CONFIG_FILE))
    }

    /// Every parameter name and shape, sorted by name.
    pub fn state_dict_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        v.sort();
        v
    }

    /// The trainable parameters under their published names (the empty
    /// `step_emb.dummy` buffer excluded), sharing storage with the network.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every variable (parameters and buffers) under its published name, on the CPU.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.to_device(Device::Cpu)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Overwrites every variable from `named` (same keys and shapes, as
    /// [`from_tensors`](Self::from_tensors) checks them).
    pub fn load_state_dict(&mut self, named: Vec<(String, Tensor)>) -> Result<()> {
        let fresh = Self::from_tensors(self.net.config(), named, Device::Cpu)?;
        let src: BTreeMap<String, Tensor> = fresh.vs.variables().into_iter().collect();
        for (name, mut var) in self.vs.variables() {
            tch::no_grad(|| var.copy_(&src[&name]));
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

/// Reads the architecture's dimensions off a state dict's shapes; the
/// schedule settings (sigmas, steps) keep the published defaults.
pub fn infer_config(named: &[(String, Tensor)]) -> Result<ModelConfig> {
    let shape = |key: &str| -> Result<Vec<i64>> {
        named
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.size())
            .ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "key {key} is missing; is this a DiG protein checkpoint?"
                ))
            })
    };
    let x1d = shape("x1d_proj.1.weight")?;
    let x2d = shape("x2d_proj.1.weight")?;
    let rp = shape("rp_proj.relative_attention_bias.weight")?;
    let heads = shape("st_module.encoder.layers.0.attn.trained_point_weight")?;
    let ff = shape("st_module.encoder.layers.0.ffn.ff.0.weight")?;
    let n_layer = (0..)
        .take_while(|i| {
            named
                .iter()
                .any(|(k, _)| k.starts_with(&format!("st_module.encoder.layers.{i}.")))
        })
        .count() as i64;
    Ok(ModelConfig {
        d_model: x1d[0],
        dim_single: x1d[1],
        d_pair: x2d[0],
        dim_pair_repr: x2d[1],
        rp_num_buckets: rp[0],
        n_heads: heads[0],
        dim_feedforward: ff[0],
        n_layer,
        chiral_features: named
            .iter()
            .any(|(k, _)| k.ends_with(".attn.chiral_out.weight")),
        ..ModelConfig::default()
    })
}
