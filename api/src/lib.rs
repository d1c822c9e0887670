//! The axum REST API (`/v1/features`, `/v1/jobs`, results, health, metrics).
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout
//! until the sampling cluster is built. Today, `digctl sample` is the way to
//! produce ensembles.
