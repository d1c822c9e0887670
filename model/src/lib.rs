//! The DiG protein model (Distributional Graphormer, Nature Machine
//! Intelligence 2024) in tch: the score network under the published
//! state-dict names, the IGSO(3) tables, the deterministic reverse-diffusion
//! sampler on SE(3)^L, and structure writers. No network code lives here.
//!
//! `../shared/MODEL.md` is the specification this crate implements.

pub mod backbone;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod empirical;
pub mod error;
pub mod evaluate;
pub mod features;
mod kernels;
pub mod network;
pub mod rng;
pub mod sampling;
pub mod so3;
pub mod structure;
pub mod trainer;
pub mod training;
pub mod trajfile;
pub mod weights;
pub mod xtc;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use network::{ProteinContext, ScoreNetwork};
pub use sampling::{Sampler, Schedule, Solver};
pub use weights::DigModel;
