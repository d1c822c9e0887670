//! The coordinator: plans each job into shards of sample indices, publishes
//! them to RabbitMQ lazily and tracks completions in Redis.
//!
//! Not implemented yet: a placeholder in the workspace layout until the
//! sampling cluster is built.
