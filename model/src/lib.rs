//! The DiG protein model (Distributional Graphormer, NMI 2024) in tch.
pub fn hello() {}
