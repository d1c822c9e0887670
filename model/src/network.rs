//! The DiG protein score network (`forward_step`), under the published
//! state-dict key names so that published checkpoints load unchanged.
//!
//! The network splits into a per-protein part and a per-step part. Everything
//! derived from the pair representation (`x2d`, and each layer's pair bias
//! and pair value) depends on neither the pose nor the diffusion step, so
//! [`ScoreNetwork::prepare`] computes it once into a [`ProteinContext`] that
//! every step and every sample of that protein reuse. The published code
//! recomputes it at every step, which is where most of its time goes.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, ORIENT_POINTS, QUERY_POINTS, VALUE_POINTS};
use crate::kernels;

/// Linear layer without bias, `y = x W^T`, as the published `bias=False` layers.
fn linear_nobias(vs: nn::Path, din: i64, dout: i64) -> nn::Linear {
    nn::linear(
        vs,
        din,
        dout,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

fn linear(vs: nn::Path, din: i64, dout: i64) -> nn::Linear {
    nn::linear(vs, din, dout, Default::default())
}

fn layer_norm(vs: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(vs, vec![dim], Default::default())
}

/// Relative-position bucket of `r = i - j` (T5-style, bidirectional).
pub fn relative_position_bucket(r: i64, num_buckets: i64, max_distance: i64) -> i64 {
    let nb = num_buckets / 2;
    let mut bucket = if r < 0 { nb } else { 0 };
    let n = r.abs();
    let max_exact = nb / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let scaled = ((n as f64 / max_exact as f64).ln()
            / (max_distance as f64 / max_exact as f64).ln()
            * (nb - max_exact) as f64) as i64; // trunc, as the published int cast
        bucket += (max_exact + scaled).min(nb - 1);
    }
    bucket
}

/// Sinusoidal embedding of the (possibly fractional) diffusion step.
fn step_embedding(step: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let scale = (10000f64).ln() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Float, step.device())) * -scale).exp(); // (h,)
    let args = step.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // (B, h)
    Tensor::cat(&[args.sin(), args.cos()], 1) // (B, d)
}

/// `LayerNorm -> Linear -> ReLU -> Linear(3)` (`st_module.diff_head.fc_t|fc_eps`).
#[derive(Debug)]
struct DiffHead {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl DiffHead {
    fn new(vs: nn::Path, d: i64) -> Self {
        DiffHead {
            norm: layer_norm(&vs / "0", d),
            fc1: linear(&vs / "1", d, d),
            fc2: linear(&vs / "3", d, 3),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(&self.norm.forward(x)).relu())
    }
}

/// The per-layer pair-derived tensors of one protein.
#[derive(Debug)]
struct LayerPair {
    /// `pair_bias(x2d) / sqrt(3)`, (H, L, L).
    bias: Tensor,
    /// `pair_value(x2d)` laid out as the attention contraction reads it:
    /// (L*H, L, c), batch (i, h), rows j. `None` past the memory budget.
    value: Option<Tensor>,
}

/// Everything the network needs about one protein that no step changes.
#[derive(Debug)]
pub struct ProteinContext {
    len: i64,
    /// Projected single representation, before the step embedding, (L, d).
    x1d: Tensor,
    /// Projected pair representation with relative positions, (L, L, d_pair).
    x2d: Tensor,
    layers: Vec<LayerPair>,
}

impl ProteinContext {
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of layers whose pair value is cached (the rest use the
    /// memory-light contraction order).
    pub fn cached_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.value.is_some()).count()
    }
    pub fn device(&self) -> Device {
        self.x1d.device()
    }
}

/// Invariant point attention as DiG uses it (`st_module.encoder.layers.{i}.attn`).
#[derive(Debug)]
struct PointAttention {
    heads: i64,
    head_dim: i64,
    scalar_query: nn::Linear,
    scalar_key: nn::Linear,
    scalar_value: nn::Linear,
    point_query: nn::Linear,
    point_key: nn::Linear,
    point_value: nn::Linear,
    pair_bias: nn::Linear,
    pair_value: nn::Linear,
    trained_point_weight: Tensor,
    fc_out: nn::Linear,
    /// With `chiral_features`: the heads' handedness features into the
    /// output (`attn.chiral_out`, no bias, zero-initialised).
    chiral_out: Option<nn::Linear>,
    /// With `orientation_features`: value directions (`attn.orient_value`,
    /// no bias) and their mean in the residue's frame into the output
    /// (`attn.orient_out`, no bias, zero-initialised).
    orient: Option<(nn::Linear, nn::Linear)>,
}

/// The handedness of what the heads attend to: for each unordered triple of
/// heads `(a, b, c)`, the triple product `u_a . (u_b x u_c)` of their mean
/// value points in the residue's frame, each squashed to `u / sqrt(1 + |u|^2)`
/// (Å; length below 1). `o_l (B, L, H*8, 3)` -> `(B, L, H(H-1)(H-2)/6)`.
/// A distance cannot tell a fold from its mirror image; these change sign
/// with it, and do not change under a rotation of the whole pose (the local
/// frame turns with it).
pub(crate) fn chiral_triples(o_l: &Tensor, heads: i64) -> Tensor {
    let (b, l) = (o_l.size()[0], o_l.size()[1]);
    let u = o_l
        .view([b, l, heads, VALUE_POINTS, 3])
        .mean_dim(3, false, Kind::Float); // (B, L, H, 3)
    let u = &u / (u.square().sum_dim_intlist(-1, true, Kind::Float) + 1.0).sqrt();
    let (mut ia, mut ib, mut ic) = (Vec::new(), Vec::new(), Vec::new());
    for a in 0..heads {
        for bb in a + 1..heads {
            for c in bb + 1..heads {
                ia.push(a);
                ib.push(bb);
                ic.push(c);
            }
        }
    }
    let pick = |idx: &[i64]| u.index_select(2, &Tensor::from_slice(idx).to_device(u.device()));
    let (ua, ub, uc) = (pick(&ia), pick(&ib), pick(&ic)); // (B, L, T, 3)
    (ua * ub.linalg_cross(&uc, -1)).sum_dim_intlist(-1, false, Kind::Float)
}

/// Frames of a batch of poses: `R (B,L,3,3)`, `T (B,L,3)`.
struct Frames<'a> {
    rot: &'a Tensor,
    tr: &'a Tensor,
}

impl Frames<'_> {
    /// Local points `(B, L, N, 3)` to the global frame: `R^T p + T`.
    fn to_global(&self, p: &Tensor) -> Tensor {
        p.matmul(self.rot) + self.tr.unsqueeze(2)
    }
    /// Global points `(B, L, N, 3)` to the local frame: `R (p - T)`.
    fn to_local(&self, p: &Tensor) -> Tensor {
        (p - self.tr.unsqueeze(2)).matmul(&self.rot.transpose(-1, -2))
    }
}

impl PointAttention {
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let (d, h) = (cfg.d_model, cfg.n_heads);
        PointAttention {
            heads: h,
            head_dim: cfg.head_dim(),
            trained_point_weight: vs.var(
                "trained_point_weight",
                &[h],
                nn::Init::Const(0.541324854612918),
            ),
            scalar_query: linear_nobias(&vs / "scalar_query", d, d),
            scalar_key: linear_nobias(&vs / "scalar_key", d, d),
            scalar_value: linear_nobias(&vs / "scalar_value", d, d),
            point_query: linear_nobias(&vs / "point_query", d, h * QUERY_POINTS * 3),
            point_key: linear_nobias(&vs / "point_key", d, h * QUERY_POINTS * 3),
            point_value: linear_nobias(&vs / "point_value", d, h * VALUE_POINTS * 3),
            pair_bias: linear_nobias(&vs / "pair_bias", cfg.d_pair, h),
            pair_value: linear_nobias(&vs / "pair_value", cfg.d_pair, d),
            fc_out: linear(&vs / "fc_out", 2 * d + 32 * h, d),
            chiral_out: cfg.chiral_features.then(|| {
                nn::linear(
                    &vs / "chiral_out",
                    cfg.chiral_triples(),
                    d,
                    nn::LinearConfig {
                        bias: false,
                        ws_init: nn::Init::Const(0.0),
                        ..Default::default()
                    },
                )
            }),
            orient: cfg.orientation_features.then(|| {
                let n = h * ORIENT_POINTS * 3;
                (
                    linear_nobias(&vs / "orient_value", d, n),
                    nn::linear(
                        &vs / "orient_out",
                        n,
                        d,
                        nn::LinearConfig {
                            bias: false,
                            ws_init: nn::Init::Const(0.0),
                            ..Default::default()
                        },
                    ),
                )
            }),
        }
    }

    fn prepare(&self, x2d: &Tensor, cache_value: bool) -> LayerPair {
        let l = x2d.size()[0];
        let bias = (self.pair_bias.forward(x2d) / 3f64.sqrt())
            .permute([2, 0, 1])
            .contiguous(); // (H, L, L)
        let value = cache_value.then(|| {
            self.pair_value
                .forward(x2d) // (L, L, d)
                .view([l, l, self.heads, self.head_dim])
                .permute([0, 2, 1, 3]) // (L_i, H, L_j, c)
                .contiguous()
                .view([l * self.heads, l, self.head_dim])
        });
        LayerPair { bias, value }
    }

    fn forward(
        &self,
        x: &Tensor,
        frames: &Frames,
        pair: &LayerPair,
        x2d: &Tensor,
        mask_bias: Option<&Tensor>,
        fused: bool,
    ) -> Tensor {
        let (b, l, d) = x.size3().unwrap();
        let (h, c) = (self.heads, self.head_dim);
        let heads = |t: Tensor| t.view([b, l, h, c]).permute([0, 2, 1, 3]); // (B, H, L, c)
        let q = heads(self.scalar_query.forward(x));
        let k = heads(self.scalar_key.forward(x));
        let v = heads(self.scalar_value.forward(x));
        let a_s = q.matmul(&k.transpose(-1, -2)) * (1.0 / ((3 * c) as f64).sqrt()); // (B, H, L, L)
                                                                                    // The orientation channel's attention: scalar and pair terms only.
                                                                                    // Point distances grow with the translation noise and would make it
                                                                                    // attend to whatever few residues the noise put nearest.
        let orient_attn = self.orient.as_ref().map(|_| {
            let mut logits = &a_s + &pair.bias;
            if let Some(mb) = mask_bias {
                logits += mb;
            }
            logits.softmax(-1, Kind::Float)
        });

        let pts =
            |lin: &nn::Linear, n: i64| frames.to_global(&lin.forward(x).view([b, l, h * n, 3])); // (B, L, H*n, 3)
        let q_pts = pts(&self.point_query, QUERY_POINTS).view([b, l, h, QUERY_POINTS, 3]);
        let k_pts = pts(&self.point_key, QUERY_POINTS).view([b, l, h, QUERY_POINTS, 3]);
        let v_pts = pts(&self.point_value, VALUE_POINTS); // (B, L, H*8, 3)
        let w_p = 1.0 / (3.0 * QUERY_POINTS as f64 * 9.0 / 2.0).sqrt();
        let head_w = self.trained_point_weight.softplus() * (-0.5 * w_p); // (H,)
        let mut logits = if fused && x.device() == Device::Cpu {
            let coef = Vec::<f32>::try_from(&head_w).expect("float32 point weights");
            let q_pts = q_pts.permute([0, 2, 1, 3, 4]).contiguous(); // (B, H, L, P, 3)
            let k_t = k_pts.permute([0, 2, 3, 4, 1]).contiguous(); // (B, H, P, 3, L)
            let mut logits = a_s.contiguous();
            kernels::add_point_logits_cpu(&mut logits, &q_pts, &k_t, &pair.bias, &coef);
            logits
        } else {
            a_s + kernels::point_distance_sum(&q_pts, &k_pts) * head_w.view([1, h, 1, 1])
                + &pair.bias
        };
        if let Some(mb) = mask_bias {
            logits += mb;
        }
        let attn = logits.softmax(-1, Kind::Float); // (B, H, L, L)

        let o_s = attn.matmul(&v).permute([0, 2, 1, 3]).reshape([b, l, d]);
        let v_pts = v_pts
            .view([b, l, h, VALUE_POINTS * 3])
            .permute([0, 2, 1, 3]); // (B, H, L, 24)
        let o_g = attn
            .matmul(&v_pts)
            .permute([0, 2, 1, 3])
            .reshape([b, l, h * VALUE_POINTS, 3]);
        let o_l = frames.to_local(&o_g); // (B, L, H*8, 3)
                                         // A vector norm, not sqrt(sum of squares): its gradient at a zero vector
                                         // (the points of padded residues, whose frames are zero) is 0, not NaN.
        let o_n = o_l.norm_scalaropt_dim(2.0, [-1i64], false); // (B, L, H*8)
        let o_z = match &pair.value {
            Some(value) => {
                // batch (i, h): (L*H, B, L_j) x (L*H, L_j, c)
                let a = attn.permute([2, 1, 0, 3]).contiguous().view([l * h, b, l]);
                a.bmm(value)
                    .view([l, h, b, c])
                    .permute([2, 0, 1, 3])
                    .reshape([b, l, d])
            }
            None => {
                // Memory-light order: contract attention with x2d first
                // (batch i), then apply each head's slice of pair_value.
                let dp = x2d.size()[2];
                let a = attn.permute([2, 0, 1, 3]).reshape([l, b * h, l]);
                let ax = a.bmm(x2d).view([l, b, h, dp]); // (L, B, H, dp)
                let w = self.pair_value.ws.view([h, c, dp]);
                Tensor::einsum("ibhk,hck->bihc", &[ax, w], None::<i64>).reshape([b, l, d])
            }
        };
        let chiral = self
            .chiral_out
            .as_ref()
            .map(|lin| lin.forward(&chiral_triples(&o_l, h)));
        let orient = self
            .orient
            .as_ref()
            .zip(orient_attn)
            .map(|((value, out), attn)| {
                // R_j^T p_j: directions in the global frame, no translation.
                let n = ORIENT_POINTS * 3;
                let dirs = value
                    .forward(x)
                    .view([b, l, h * ORIENT_POINTS, 3])
                    .matmul(frames.rot)
                    .view([b, l, h, n])
                    .permute([0, 2, 1, 3]); // (B, H, L, P*3)
                let mean = attn
                    .matmul(&dirs)
                    .permute([0, 2, 1, 3])
                    .reshape([b, l, h * ORIENT_POINTS, 3])
                    .matmul(&frames.rot.transpose(-1, -2)) // R_i m: the residue's frame
                    .reshape([b, l, h * n]);
                out.forward(&mean)
            });
        let o_l = o_l.reshape([b, l, h * VALUE_POINTS * 3]);
        let mut out = self.fc_out.forward(&Tensor::cat(&[o_s, o_l, o_z, o_n], -1));
        if let Some(c) = chiral {
            out += c;
        }
        if let Some(o) = orient {
            out += o;
        }
        out
    }
}

#[derive(Debug)]
struct FeedForward {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

#[derive(Debug)]
struct EncoderLayer {
    norm1: nn::LayerNorm,
    attn: PointAttention,
    norm2: nn::LayerNorm,
    ffn: FeedForward,
}

impl EncoderLayer {
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        let ff = &vs / "ffn" / "ff";
        EncoderLayer {
            norm1: layer_norm(&vs / "norm1", d),
            attn: PointAttention::new(&vs / "attn", cfg),
            norm2: layer_norm(&vs / "norm2", d),
            ffn: FeedForward {
                fc1: linear(&ff / "0", d, cfg.dim_feedforward),
                fc2: linear(&ff / "3", cfg.dim_feedforward, d),
            },
        }
    }
}

/// The score network: `forward_step(pose, mask, step, features) -> (T_eps, R_eps)`.
#[derive(Debug)]
pub struct ScoreNetwork {
    cfg: ModelConfig,
    x1d_norm: nn::LayerNorm,
    x1d_proj: nn::Linear,
    x2d_norm: nn::LayerNorm,
    x2d_proj: nn::Linear,
    rel_pos: nn::Embedding,
    layers: Vec<EncoderLayer>,
    fc_t: DiffHead,
    fc_eps: DiffHead,
}

impl ScoreNetwork {
    /// Builds the network under `vs` with the published key names.
    pub fn new(vs: &nn::Path, cfg: &ModelConfig) -> Self {
        // The published model carries an empty `step_emb.dummy` buffer; keep
        // it so that our state dict has exactly the published keys.
        let _ = vs.sub("step_emb").zeros_no_train("dummy", &[0]);
        let enc = vs / "st_module" / "encoder" / "layers";
        let head = vs / "st_module" / "diff_head";
        ScoreNetwork {
            cfg: cfg.clone(),
            x1d_norm: layer_norm(vs / "x1d_proj" / "0", cfg.dim_single),
            x1d_proj: linear_nobias(vs / "x1d_proj" / "1", cfg.dim_single, cfg.d_model),
            x2d_norm: layer_norm(vs / "x2d_proj" / "0", cfg.dim_pair_repr),
            x2d_proj: linear_nobias(vs / "x2d_proj" / "1", cfg.dim_pair_repr, cfg.d_pair),
            rel_pos: nn::embedding(
                vs / "rp_proj" / "relative_attention_bias",
                cfg.rp_num_buckets,
                cfg.d_pair,
                Default::default(),
            ),
            layers: (0..cfg.n_layer)
                .map(|i| EncoderLayer::new(&enc / i, cfg))
                .collect(),
            fc_t: DiffHead::new(&head / "fc_t", cfg.d_model),
            fc_eps: DiffHead::new(&head / "fc_eps", cfg.d_model),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes the cached pair values of a protein of length `len` take.
    pub fn pair_cache_bytes(&self, len: i64) -> u64 {
        (self.cfg.n_layer * len * len * self.cfg.d_model) as u64 * 4
    }

    /// Computes the per-protein tensors. `single (L, 384)`, `pair (L, L, 128)`,
    /// float32 on the model's device. Layers' pair values are cached while the
    /// cache stays within `budget_bytes`; the rest use the memory-light order.
    pub fn prepare(&self, single: &Tensor, pair: &Tensor, budget_bytes: u64) -> ProteinContext {
        let _guard = tch::no_grad_guard();
        self.context(single, pair, budget_bytes)
    }

    /// [`prepare`](Self::prepare) under whatever grad mode the caller is in.
    fn context(&self, single: &Tensor, pair: &Tensor, budget_bytes: u64) -> ProteinContext {
        let l = single.size()[0];
        let x1d = self.x1d_proj.forward(&self.x1d_norm.forward(single)); // (L, d)
        let idx: Vec<i64> = (0..l)
            .flat_map(|i| (0..l).map(move |j| (i, j)))
            .map(|(i, j)| {
                relative_position_bucket(i - j, self.cfg.rp_num_buckets, self.cfg.rp_max_distance)
            })
            .collect();
        let idx = Tensor::from_slice(&idx)
            .view([l, l])
            .to_device(single.device());
        let x2d = self.x2d_proj.forward(&self.x2d_norm.forward(pair)) + self.rel_pos.forward(&idx); // (L, L, dp)
        let per_layer = (l * l * self.cfg.d_model) as u64 * 4;
        let cached = (budget_bytes / per_layer.max(1)) as usize;
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| layer.attn.prepare(&x2d, i < cached))
            .collect();
        ProteinContext {
            len: l,
            x1d,
            x2d,
            layers,
        }
    }

    /// One evaluation of the score network for a batch of poses of one protein.
    ///
    /// `tr (B, L, 3)`, `rot (B, L, 3, 3)`, `mask (B, L)` bool (true = padded)
    /// or `None`, `step (B,)` (float or int). Returns `(T_eps, R_eps)`, each
    /// `(B, L, 3)`, the translation score already in the global frame.
    pub fn forward_step(
        &self,
        ctx: &ProteinContext,
        tr: &Tensor,
        rot: &Tensor,
        mask: Option<&Tensor>,
        step: &Tensor,
    ) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        self.trunk(ctx, tr, rot, mask, step, None)
    }

    /// [`forward_step`](Self::forward_step) under autograd: differentiable in
    /// the poses (and the weights), the prepared per-protein tensors held
    /// constant; the point logits use tensor ops (the fused CPU kernel has no
    /// backward). The probability-flow ODE's divergence needs it.
    pub fn forward_grad(
        &self,
        ctx: &ProteinContext,
        tr: &Tensor,
        rot: &Tensor,
        step: &Tensor,
    ) -> (Tensor, Tensor) {
        self.trunk(ctx, tr, rot, None, step, Some(0.0))
    }

    /// The same function as [`forward_step`](Self::forward_step), differentiable
    /// in every parameter: the per-protein tensors are recomputed under
    /// autograd, the point logits use tensor ops (the fused CPU kernel has no
    /// backward) and the pair value takes the memory-light order (cheaper
    /// than the cache for the few poses of a training batch). `dropout` is
    /// the published p (0.1) in training mode, `None` in evaluation mode.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        single: &Tensor,
        pair: &Tensor,
        tr: &Tensor,
        rot: &Tensor,
        mask: Option<&Tensor>,
        step: &Tensor,
        dropout: Option<f64>,
    ) -> (Tensor, Tensor) {
        let ctx = self.context(single, pair, 0);
        self.trunk(&ctx, tr, rot, mask, step, Some(dropout.unwrap_or(0.0)))
    }

    /// `training`: `Some(p)` for the differentiable path with dropout `p`.
    // `x = x + ...`, not `x += ...`: an in-place add would overwrite the
    // input that the previous layer norm saved for the backward pass.
    #[allow(clippy::assign_op_pattern)]
    fn trunk(
        &self,
        ctx: &ProteinContext,
        tr: &Tensor,
        rot: &Tensor,
        mask: Option<&Tensor>,
        step: &Tensor,
        training: Option<f64>,
    ) -> (Tensor, Tensor) {
        let mask_bias = mask.map(|m| {
            // A row that is all padding is treated as unpadded.
            let all = m.all_dims(Some(&[1i64][..]), true);
            let m = m.logical_and(&all.logical_not());
            Tensor::zeros(m.size(), (Kind::Float, m.device()))
                .masked_fill(&m, f64::NEG_INFINITY)
                .unsqueeze(1)
                .unsqueeze(1) // (B, 1, 1, L)
        });
        let p = training.unwrap_or(0.0);
        let drop = |t: Tensor| {
            if p > 0.0 {
                t.dropout(p, true)
            } else {
                t
            }
        };
        let frames = Frames { rot, tr };
        let mut x = ctx.x1d.unsqueeze(0) + step_embedding(step, self.cfg.d_model).unsqueeze(1); // (B, L, d)
        for (layer, pair) in self.layers.iter().zip(&ctx.layers) {
            let a = layer.attn.forward(
                &layer.norm1.forward(&x),
                &frames,
                pair,
                &ctx.x2d,
                mask_bias.as_ref(),
                training.is_none(),
            );
            x = x + drop(a);
            let hidden = drop(layer.ffn.fc1.forward(&layer.norm2.forward(&x)).gelu("none"));
            x = x + drop(layer.ffn.fc2.forward(&hidden));
        }
        let t_eps = self.fc_t.forward(&x); // (B, L, 3), residue frame
        let r_eps = self.fc_eps.forward(&x);
        // R^T t per residue: t_k = sum_j R[j][k] t_j.
        let t_eps = t_eps.unsqueeze(-2).matmul(rot).squeeze_dim(-2);
        (t_eps, r_eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chiral_triples_are_triple_products_that_change_sign_in_a_mirror() {
        // Three heads of 8 value points each; head k's points
        // average to e_k scaled, so the one triple is det(u0, u1, u2).
        let mut v = vec![0f32; 3 * 8 * 3];
        let means = [[3.0f32, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.0, 1.0]];
        for (h, m) in means.iter().enumerate() {
            for p in 0..8 {
                // Offsets that cancel over the 8 points.
                let off = if p % 2 == 0 { 0.25 } else { -0.25 };
                for k in 0..3 {
                    v[(h * 8 + p) * 3 + k] = m[k] + off;
                }
            }
        }
        let o_l = Tensor::from_slice(&v).view([1, 1, 24, 3]);
        let t = chiral_triples(&o_l, 3);
        assert_eq!(t.size(), vec![1, 1, 1]);
        let squash = |m: [f32; 3]| {
            let n = (1.0 + m.iter().map(|x| x * x).sum::<f32>()).sqrt();
            m.map(|x| x / n)
        };
        let [a, b, c] = means.map(squash);
        let det = a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0])
            + a[2] * (b[0] * c[1] - b[1] * c[0]);
        let got = t.double_value(&[0, 0, 0]) as f32;
        assert!(
            (got - det).abs() < 1e-6 && det.abs() > 0.1,
            "{got} vs {det}"
        );
        // Mirrored (z negated): the sign flips.
        let mirror = Tensor::from_slice(&[1f32, 1.0, -1.0]);
        let m = chiral_triples(&(&o_l * &mirror), 3).double_value(&[0, 0, 0]) as f32;
        assert!((m + det).abs() < 1e-6, "{m} vs {}", -det);
        // 8 heads: 56 triples.
        let o_l = Tensor::randn([2, 5, 64, 3], (Kind::Float, Device::Cpu));
        assert_eq!(chiral_triples(&o_l, 8).size(), vec![2, 5, 56]);
    }
}
