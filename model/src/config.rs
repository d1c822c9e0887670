//! Hyper-parameters of the DiG protein model, as stored in a model
//! directory's `config.json`. `Default` is the published architecture
//! (about 81.9 M parameters).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub d_model: i64,
    pub d_pair: i64,
    pub n_layer: i64,
    pub n_heads: i64,
    pub dim_feedforward: i64,
    /// Width of AlphaFold's single representation.
    pub dim_single: i64,
    /// Width of AlphaFold's pair representation.
    pub dim_pair_repr: i64,
    pub n_time_step: i64,
    pub tr_sigma_min: f64,
    pub tr_sigma_max: f64,
    pub rot_sigma_min: f64,
    pub rot_sigma_max: f64,
    pub rp_num_buckets: i64,
    pub rp_max_distance: i64,
    /// Not published (examples/adk/README.md, "Mirror images"): each
    /// layer's point attention also feeds the handedness of what every head
    /// attends to, the triple products of the heads' mean value points in
    /// the residue's frame, through `attn.chiral_out` (zero-initialised, so
    /// adding it to a trained model leaves its function unchanged). Off in
    /// the published architecture and absent from its config files.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub chiral_features: bool,
    /// Not published (examples/adk/README.md, "Two changes aimed at the high-noise score"):
    /// each layer's point attention also averages value *directions*
    /// `R_j^T p_j` (`attn.orient_value`, `ORIENT_POINTS` per head) without
    /// the residues' positions, and feeds their mean in the residue's frame
    /// to the output through `attn.orient_out` (zero-initialised, so adding
    /// it to a trained model leaves its function unchanged). The published
    /// value points carry `+ T_j`, which at high translation noise swamps
    /// the consensus of the residues' orientations that the rotation score
    /// needs there. Off in the published architecture.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub orientation_features: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            d_model: 768,
            d_pair: 256,
            n_layer: 12,
            n_heads: 32,
            dim_feedforward: 1024,
            dim_single: 384,
            dim_pair_repr: 128,
            n_time_step: 500,
            tr_sigma_min: 0.1,
            tr_sigma_max: 35.0,
            rot_sigma_min: 0.02,
            rot_sigma_max: 1.65,
            rp_num_buckets: 64,
            rp_max_distance: 128,
            chiral_features: false,
            orientation_features: false,
        }
    }
}

/// Query and key points per head in point attention.
pub const QUERY_POINTS: i64 = 4;
/// Value points per head in point attention.
pub const VALUE_POINTS: i64 = 8;
/// Value directions per head with `orientation_features`.
pub const ORIENT_POINTS: i64 = 4;

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, format!("not a valid model config: {e}")))?;
        cfg.validate().map_err(|m| ModelError::format(path, m))?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serializes");
        std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
    }

    /// Number of handedness features per residue and layer with
    /// `chiral_features`: one per unordered triple of heads.
    pub fn chiral_triples(&self) -> i64 {
        let h = self.n_heads;
        h * (h - 1) * (h - 2) / 6
    }

    /// Per-head width of the scalar attention.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("d_model", self.d_model),
            ("d_pair", self.d_pair),
            ("n_layer", self.n_layer),
            ("n_heads", self.n_heads),
            ("dim_feedforward", self.dim_feedforward),
            ("n_time_step", self.n_time_step),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(format!("{name} must be positive, got {v}"));
            }
        }
        if self.d_model % self.n_heads != 0 {
            return Err(format!(
                "d_model ({}) must be divisible by n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if self.d_model % 2 != 0 || self.d_model < 4 {
            return Err("d_model must be even and at least 4 (sinusoidal step embedding)".into());
        }
        if self.rp_num_buckets < 4 || self.rp_num_buckets % 4 != 0 {
            return Err("rp_num_buckets must be a positive multiple of 4".into());
        }
        if !(self.tr_sigma_min > 0.0 && self.tr_sigma_max > self.tr_sigma_min) {
            return Err("need 0 < tr_sigma_min < tr_sigma_max".into());
        }
        if !(self.rot_sigma_min > 0.0 && self.rot_sigma_max > self.rot_sigma_min) {
            return Err("need 0 < rot_sigma_min < rot_sigma_max".into());
        }
        if self.chiral_features && self.n_heads < 3 {
            return Err(format!(
                "chiral_features needs at least 3 heads (a triple product), got n_heads {}",
                self.n_heads
            ));
        }
        Ok(())
    }
}
