//! The vocabulary shared by dig-cluster's services: job and shard types,
//! configuration, queue topology, Redis keys and the object-store layout.
//!
//! Empty for now: it is filled in with the sampling cluster (the REST API,
//! coordinator and workers). Nothing here is used yet.
