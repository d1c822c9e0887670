//! The vocabulary shared by dig-cluster's services: job and shard types, the
//! object-store layout, the Redis key layout, and the clients of the three
//! backing services behind traits with an embedded (single-process)
//! implementation each:
//!
//! - [`config`]: the services' configuration (file + `DIG_*` variables);
//! - [`job`]: `JobSpec`, `ShardTask`, states and shard planning;
//! - [`layout`]: the one place that knows object-store keys;
//! - [`keys`]: the one place that knows Redis keys;
//! - [`store`]: object store (S3 or local files) and content-addressed features;
//! - [`queue`]: shard queue (RabbitMQ or in-process);
//! - [`progress`]: job state and counters (Redis or in-memory);
//! - [`metrics`]: the process's Prometheus registry and the services' metrics.

pub mod config;
pub mod error;
pub mod job;
pub mod keys;
pub mod layout;
pub mod metrics;
pub mod progress;
pub mod queue;
pub mod store;

pub use error::{CommonError, Result};
