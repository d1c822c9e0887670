#[test]
fn links() { let t = tch::Tensor::from_slice(&[1.0f32, 2.0]); assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 3.0); println!("cuda={}", tch::Cuda::is_available()); }
