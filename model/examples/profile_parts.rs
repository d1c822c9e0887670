//! Times the pieces of one attention layer at a given L and B (developer aid).
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn t<F: FnMut() -> Tensor>(name: &str, mut f: F) -> Tensor {
    let _ = f();
    let s = Instant::now();
    let mut r = f();
    for _ in 0..2 {
        r = f();
    }
    println!("{name:>28}: {:.4} s", s.elapsed().as_secs_f64() / 3.0);
    r
}
fn main() {
    let _g = tch::no_grad_guard();
    let l: i64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256);
    let b: i64 = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(16);
    let (h, p, c, d) = (32i64, 4i64, 24i64, 768i64);
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([b, l, d], o);
    let w = Tensor::randn([d, d], o);
    t("linear d->d", || x.matmul(&w));
    let q = Tensor::randn([b, l, h, p, 3], o) * 30.0;
    let k = Tensor::randn([b, l, h, p, 3], o) * 30.0;
    t("cdist+sum", || {
        let qq = q
            .permute([0, 2, 3, 1, 4])
            .contiguous()
            .view([b * h * p, l, 3]);
        let kk = k
            .permute([0, 2, 3, 1, 4])
            .contiguous()
            .view([b * h * p, l, 3]);
        Tensor::cdist(&qq, &kk, 2.0, Some(2))
            .view([b, h, p, l, l])
            .sum_dim_intlist(2, false, Kind::Float)
    });
    let qs = Tensor::randn([b, h, l, c], o);
    let ks = Tensor::randn([b, h, l, c], o);
    let a_s = t("q.k", || qs.matmul(&ks.transpose(-1, -2)));
    let bias = Tensor::randn([h, l, l], o);
    let lg = t("logits add x2", || &a_s + &a_s + &bias);
    let a = t("softmax", || lg.softmax(-1, Kind::Float));
    t("A v", || a.matmul(&qs));
    let value = Tensor::randn([l * h, l, c], o);
    let ap = t("A permute contiguous", || {
        a.permute([2, 1, 0, 3]).contiguous().view([l * h, b, l])
    });
    t("o_z bmm", || ap.bmm(&value));
    let w1 = Tensor::randn([d, 1024], o);
    t("ffn1", || x.matmul(&w1));
}
