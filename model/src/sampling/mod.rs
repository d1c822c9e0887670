//! Sampling: everything that turns noise into structures.
//!
//! * [`schedule`]: the published step schedule (times, sigmas, gains) and
//!   the [`Solver`]s that integrate it;
//! * [`solvers`]: the deterministic update of each solver ([`integrate`]),
//!   the network as a [`ScoreField`] and [`Sampler`];
//! * [`noise`]: the stochastic variant (reverse SDE, Euler-Maruyama) and the
//!   per-sample random streams its noise comes from;
//! * [`potentials`]: potentials on the denoised structure (physical terms
//!   and collective variables) with flat-bottom forms;
//! * [`steering`]: sequential Monte Carlo over particle groups, with the
//!   importance weights that recover the unsteered ensemble;
//! * [`flow`]: the probability-flow ODE: encode, decode and the
//!   log-density of a structure;
//! * [`ensemble`]: batches of samples of one protein into an [`Ensemble`](crate::structure::Ensemble).

pub mod ensemble;
pub mod flow;
pub mod noise;
pub mod potentials;
pub mod schedule;
pub mod solvers;
pub mod steering;

pub use ensemble::{
    read_initial_state, sample_ensemble, sample_ensemble_steered_until, sample_ensemble_until,
    InitialPoses, Partial, PartialNoise, PartialStart,
};
pub use schedule::{Schedule, Solver, StepPlan};
pub use solvers::{expmap, integrate, NetworkField, Sampler, ScoreField};
pub use steering::{SteerSpec, Steering};
