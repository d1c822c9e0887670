//! The coordinator: takes submitted jobs off the jobs queue, cuts each into
//! shards of sample indices, publishes the shards to the shard queue lazily
//! and watches their completions in the progress store until the job ends.
//!
//! Lazy publishing keeps at most [`CoordinatorSettings::window_per_job`]
//! shards of a job outstanding (published, not yet done). A big bulk job
//! therefore never floods the queue ahead of jobs submitted after it, and a
//! cancelled or failed job leaves little queued work behind.
//!
//! The coordinator holds no state that matters across restarts: the object
//! store has each job's spec and shard outputs, the progress store has the
//! done set. A restarted coordinator re-activates its jobs
//! ([`Coordinator::resume`], or redelivered job ids) and publishes again
//! every shard not in the done set; shards it had published before may then
//! run twice, which is harmless because workers are idempotent.
//!
//! When every shard is done it writes `jobs/{id}/manifest.json` (see
//! [`Manifest`]) and marks the job succeeded; when any shard failed for good
//! it writes `jobs/{id}/state.json` (see [`StateMarker`]), marks the job
//! failed and stops publishing its shards. A job it sees cancelled gets the
//! same marker.
//!
//! The progress store (Redis) may lose its data: [`Reconciler`] rebuilds
//! entries from the object store (spec, shard objects, manifest, marker).
//! The coordinator runs it over every job at start
//! ([`Coordinator::reconcile`]), and for a single job whose entry is missing
//! when its id arrives or vanishes while it runs; `digctl reconcile` runs it
//! on demand.

mod coordinator;
mod error;
mod manifest;
mod metrics;
mod reconcile;

pub use coordinator::{Coordinator, CoordinatorSettings};
pub use error::{CoordinatorError, Result};
pub use manifest::{Manifest, ManifestShard};
pub use metrics::{ClusterMetrics, ShardAges};
pub use reconcile::{Action, Reconciled, Reconciler, StateMarker};
