//! The worker: turns shard tasks into sampled structures.
//!
//! [`shard::ShardSampler`] is the compute core: it keeps the loaded model
//! (per model id) and the protein's pair-derived tensors (per features
//! SHA-256) between shards, so consecutive shards of one protein pay the
//! per-protein cost once, and samples a shard's indices with the
//! `(seed, index)` rule, so a shard re-run after a crash gives the same bytes.
//!
//! [`consumer::Worker`] is the queue consumer around it: take a shard, fetch
//! the model and features once into a local cache, sample, write the shard's
//! output at its deterministic key, record completion, then ack. It skips or
//! stops (at a batch boundary) the shards of jobs that ended (cancelled),
//! finishes or requeues its shard on shutdown, and retries transient
//! failures without spending the shard's attempts (see its module docs).

pub mod consumer;
pub mod shard;
