//! The worker: turns shard tasks into sampled structures.
//!
//! [`shard::ShardSampler`] is the compute core: it keeps the loaded model
//! (per model id) and the protein's pair-derived tensors (per features
//! SHA-256) between shards, so consecutive shards of one protein pay the
//! per-protein cost once, and samples a shard's indices with the
//! `(seed, index)` rule, so a shard re-run after a crash gives the same bytes.
//!
//! The queue consumer around it (RabbitMQ deliveries, object-store writes,
//! Redis progress, acks) is not built yet.

pub mod shard;
