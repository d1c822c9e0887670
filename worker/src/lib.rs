//! The GPU worker: consumes shard tasks, runs the DiG sampler
//! (`dig-model`) and writes shard outputs to the object store.
//!
//! Not implemented yet: a placeholder in the workspace layout until the
//! sampling cluster is built. The sampling itself lives in
//! `dig_model::pipeline`, which `digctl sample` already uses.
