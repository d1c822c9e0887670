//! A fused CPU kernel for the attention logits of point attention.
//!
//! The point term `sum_p |q_g[i,h,p] - k_g[j,h,p]|` is a sum of Euclidean
//! norms, not a bilinear form, so it cannot ride on a matrix multiply. As
//! plain tensor ops (or `cdist`) it materialises `B*H*P*L*L` distances and
//! then makes several more passes over `B*H*L*L` logits: at L = 256 that
//! costs more than all the layer's matrix products together. This kernel
//! reads each query point once, streams the key points in a layout where
//! `j` is contiguous (so the compiler vectorises the inner loop), and adds
//! the point term and the pair bias into the scalar logits in place: one
//! pass over the logits instead of five. Other devices use tensor ops.

use tch::{Device, Kind, Tensor};

/// Adds `coef[h] * sum_p |q[b,h,i,p] - k[b,h,j,p]| + bias[h,i,j]` to
/// `logits[b,h,i,j]` in place.
///
/// `logits (B,H,L,L)`, `q (B,H,L,P,3)`, `k_t (B,H,P,3,L)`, `bias (H,L,L)`,
/// all contiguous float32 on the CPU; `coef` has H entries.
pub fn add_point_logits_cpu(
    logits: &mut Tensor,
    q: &Tensor,
    k_t: &Tensor,
    bias: &Tensor,
    coef: &[f32],
) {
    let (b, h, l, _) = logits.size4().expect("logits (B,H,L,L)");
    let p = q.size()[3] as usize;
    for t in [&*logits, q, k_t, bias] {
        assert!(t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    }
    assert_eq!(q.size(), [b, h, l, p as i64, 3]);
    assert_eq!(k_t.size(), [b, h, p as i64, 3, l]);
    assert_eq!(bias.size(), [h, l, l]);
    assert_eq!(coef.len(), h as usize);
    let (bh, l) = ((b * h) as usize, l as usize);
    // SAFETY: the asserts above pin every tensor's length, kind and layout;
    // the slices live only inside this call, while the tensors are borrowed.
    let (out, q, k_t, bias) = unsafe {
        (
            std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, bh * l * l),
            std::slice::from_raw_parts(q.data_ptr() as *const f32, bh * l * p * 3),
            std::slice::from_raw_parts(k_t.data_ptr() as *const f32, bh * p * 3 * l),
            std::slice::from_raw_parts(bias.data_ptr() as *const f32, h as usize * l * l),
        )
    };
    let threads = (tch::get_num_threads().max(1) as usize).min(bh);
    let per = bh.div_ceil(threads);
    std::thread::scope(|s| {
        for (chunk_idx, chunk) in out.chunks_mut(per * l * l).enumerate() {
            s.spawn(move || {
                let mut acc = vec![0f32; l];
                for (n, plane) in chunk.chunks_mut(l * l).enumerate() {
                    let bhi = chunk_idx * per + n; // index into (B*H)
                    let head = bhi % h as usize;
                    let keys = &k_t[bhi * p * 3 * l..(bhi + 1) * p * 3 * l];
                    let bias = &bias[head * l * l..(head + 1) * l * l];
                    for (i, row) in plane.chunks_mut(l).enumerate() {
                        let qi = &q[(bhi * l + i) * p * 3..(bhi * l + i + 1) * p * 3];
                        point_distance_row(qi, keys, &mut acc);
                        let c = coef[head];
                        let brow = &bias[i * l..(i + 1) * l];
                        for j in 0..l {
                            row[j] += c * acc[j] + brow[j];
                        }
                    }
                }
            });
        }
    });
}

/// `acc[j] = sum_p |qi[p] - k[p][j]|` for one query row; `keys (P, 3, L)`.
#[inline(always)]
fn distance_row_body(qi: &[f32], keys: &[f32], acc: &mut [f32]) {
    let l = acc.len();
    acc.fill(0.0);
    for (pt, q) in qi.chunks_exact(3).enumerate() {
        let (qx, qy, qz) = (q[0], q[1], q[2]);
        let kx = &keys[(pt * 3) * l..(pt * 3 + 1) * l];
        let ky = &keys[(pt * 3 + 1) * l..(pt * 3 + 2) * l];
        let kz = &keys[(pt * 3 + 2) * l..(pt * 3 + 3) * l];
        for j in 0..l {
            let (dx, dy, dz) = (qx - kx[j], qy - ky[j], qz - kz[j]);
            acc[j] += (dx * dx + dy * dy + dz * dz).sqrt();
        }
    }
}

/// The same body compiled for AVX2 (8-wide square roots), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn distance_row_avx2(qi: &[f32], keys: &[f32], acc: &mut [f32]) {
    distance_row_body(qi, keys, acc)
}

fn point_distance_row(qi: &[f32], keys: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { distance_row_avx2(qi, keys, acc) };
    }
    distance_row_body(qi, keys, acc)
}

/// `sum_p |q[b,i,h,p] - k[b,j,h,p]|` as tensor ops, `(B, H, L, L)`, from
/// `q, k (B, L, H, P, 3)`: the path for GPUs, where element-wise work is cheap.
/// `cdist` in its exact (difference-based) mode: the matmul expansion
/// `|q|^2 + |k|^2 - 2 q.k` loses too much in float32 for points tens of Å out.
pub fn point_distance_sum(q: &Tensor, k: &Tensor) -> Tensor {
    if q.device() != Device::Cpu {
        return point_distance_sum_broadcast(q, k);
    }
    let (b, l, h, p, _) = q.size5().expect("points (B,L,H,P,3)");
    let q = q
        .permute([0, 2, 3, 1, 4])
        .contiguous()
        .view([b * h * p, l, 3]);
    let k = k
        .permute([0, 2, 3, 1, 4])
        .contiguous()
        .view([b * h * p, l, 3]);
    let d = Tensor::cdist(&q, &k, 2.0, Some(2)); // (B*H*P, L, L)
    d.view([b, h, p, l, l])
        .sum_dim_intlist(2, false, Kind::Float)
}

/// [`point_distance_sum`] as the published code computes it: the
/// differences broadcast to `(B, L, L, H, P, 3)` and their norms summed.
/// Used on GPUs: libtorch's CUDA `cdist` (exact mode) gives each distance
/// its own thread block, which for 3-vectors leaves almost every thread idle
/// (the native step ran 6-8x slower than the published one on an H200,
/// docs/gpu.md); the broadcast is a few elementwise kernels.
pub fn point_distance_sum_broadcast(q: &Tensor, k: &Tensor) -> Tensor {
    let d = (q.unsqueeze(2) - k.unsqueeze(1)).norm_scalaropt_dim(2.0, [-1i64], false); // (B, L, L, H, P)
    d.sum_dim_intlist(-1, false, Kind::Float)
        .permute([0, 3, 1, 2]) // (B, H, L, L)
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query and key points `(B, L, H, P, 3)`, tens of Å apart, from `seed`.
    fn points(seed: i64, b: i64, l: i64, h: i64, p: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let o = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([b, l, h, p, 3], o) * 20.0;
        let k = Tensor::randn([b, l, h, p, 3], o) * 20.0;
        (q, k)
    }

    #[test]
    fn broadcast_point_distances_equal_cdist() {
        let (q, k) = points(5, 2, 19, 3, 4);
        let a = point_distance_sum(&q, &k);
        let c = point_distance_sum_broadcast(&q, &k);
        assert_eq!(a.size(), c.size());
        let diff = (a - c).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "max |diff| {diff}");
    }

    #[test]
    fn fused_cpu_kernel_equals_tensor_ops() {
        let (b, l, h, p) = (2, 37, 3, 4);
        let (q, k) = points(3, b, l, h, p);
        let o = (Kind::Float, Device::Cpu);
        let a_s = Tensor::randn([b, h, l, l], o);
        let bias = Tensor::randn([h, l, l], o);
        let coef = [-0.1f32, -0.02, -0.3];
        let expected = &a_s
            + point_distance_sum(&q, &k) * Tensor::from_slice(&coef).view([1, h, 1, 1])
            + &bias;
        let mut got = a_s.copy();
        let q_t = q.permute([0, 2, 1, 3, 4]).contiguous();
        let k_t = k.permute([0, 2, 3, 4, 1]).contiguous();
        add_point_logits_cpu(&mut got, &q_t, &k_t, &bias, &coef);
        let diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "fused kernel differs by {diff}");
    }
}
