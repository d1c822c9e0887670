//! Prometheus metrics of the services: one registry per process
//! ([`registry`]), and the metrics of each service as a group that
//! registers itself into it on first use ([`api`], [`coordinator`],
//! [`worker`]). `digctl standalone` runs the three services in one process
//! and so exports all three groups from one registry.
//!
//! Every name starts with `dig_` and carries its unit (`_seconds`,
//! `_shards`, `_total` for counters). Labels are bounded: API routes are
//! route templates (`/v1/jobs/{id}`), never raw paths; protein lengths are
//! one of [`LENGTH_BUCKETS`]; per-job series exist only while the job runs.
//!
//! | metric | type | labels | exported by |
//! |---|---|---|---|
//! | `dig_api_requests_total` | counter | `route`, `method`, `status` | api |
//! | `dig_api_request_duration_seconds` | histogram | `route`, `method` | api |
//! | `dig_jobs` | gauge | `state` | coordinator (cluster-wide, from Redis) |
//! | `dig_job_samples_per_second` | gauge | `job_id` | coordinator (running jobs only) |
//! | `dig_shards_published_total` | counter | | coordinator |
//! | `dig_queue_depth_shards` | gauge | | coordinator (ready messages of the shard queue) |
//! | `dig_queue_parked_shards` | gauge | | coordinator (the parking queue) |
//! | `dig_queue_oldest_shard_age_seconds` | gauge | | coordinator (see [`CoordinatorMetrics::oldest_shard_age`]) |
//! | `dig_workers_up` | gauge | | coordinator (live heartbeats in Redis) |
//! | `dig_shards_completed_total` | counter | | worker |
//! | `dig_shards_failed_total` | counter | | worker |
//! | `dig_shards_retried_total` | counter | | worker |
//! | `dig_shards_dead_lettered_total` | counter | | worker |
//! | `dig_samples_generated_total` | counter | `worker` | worker |
//! | `dig_sampler_step_seconds` | histogram | `length_bucket` | worker |
//! | `dig_shard_duration_seconds` | histogram | `length_bucket` | worker |
//! | `dig_model_cache_hits_total`, `dig_model_cache_misses_total` | counter | | worker |
//! | `dig_feature_cache_hits_total`, `dig_feature_cache_misses_total` | counter | | worker |
//! | `dig_worker_busy` | gauge | | worker (1 while sampling a shard) |
//! | `dig_worker_heartbeats_total` | counter | | worker |
//!
//! The per-job label is `job_id`, not `job`: Prometheus gives every scraped
//! series the label `job` (the scrape job), and would rename ours.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The content type of [`encode_text`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The protein length buckets of the sampler histograms (`length_bucket`).
pub const LENGTH_BUCKETS: [&str; 5] = ["1-64", "65-128", "129-256", "257-512", "513+"];

/// The [`LENGTH_BUCKETS`] entry of a protein of `residues` residues.
pub fn length_bucket(residues: usize) -> &'static str {
    match residues {
        0..=64 => LENGTH_BUCKETS[0],
        65..=128 => LENGTH_BUCKETS[1],
        129..=256 => LENGTH_BUCKETS[2],
        257..=512 => LENGTH_BUCKETS[3],
        _ => LENGTH_BUCKETS[4],
    }
}

/// The process's registry: every metric of this module is in it.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// Every registered metric in Prometheus' text exposition format.
pub fn encode_text() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry().gather(), &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    registry()
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid metric"),
    )
}

/// The API's request metrics (`dig_api_*`), recorded by its middleware.
pub struct ApiMetrics {
    /// `dig_api_requests_total{route, method, status}`.
    pub requests: IntCounterVec,
    /// `dig_api_request_duration_seconds{route, method}`: until the
    /// response head (a streamed body, e.g. an event stream, goes on after).
    pub request_duration: HistogramVec,
}

/// The API's metrics, registered on first use.
pub fn api() -> &'static ApiMetrics {
    static API: OnceLock<ApiMetrics> = OnceLock::new();
    API.get_or_init(|| ApiMetrics {
        requests: counter_vec(
            "dig_api_requests_total",
            "API requests by route template, method and status code",
            &["route", "method", "status"],
        ),
        request_duration: histogram_vec(
            "dig_api_request_duration_seconds",
            "Seconds from an API request to its response head, by route template and method",
            &["route", "method"],
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        ),
    })
}

/// The coordinator's metrics: what it publishes, and the cluster-wide
/// figures it reads from Redis and the broker, so that one scrape target
/// gives the cluster view.
pub struct CoordinatorMetrics {
    /// `dig_shards_published_total`: shards put on the shard queue.
    pub shards_published: IntCounter,
    /// `dig_jobs{state}`: jobs of every tenant by state.
    pub jobs: IntGaugeVec,
    /// `dig_job_samples_per_second{job_id}`: a running job's samples done
    /// over the seconds since it started (the API's `samples_per_sec`).
    pub job_samples_per_second: GaugeVec,
    /// `dig_queue_depth_shards`: shards ready in the shard queue (not yet
    /// delivered to a worker).
    pub queue_depth: IntGauge,
    /// `dig_queue_parked_shards`: shards in the parking queue.
    pub queue_parked: IntGauge,
    /// `dig_queue_oldest_shard_age_seconds`: the age of the oldest shard
    /// this coordinator published that is neither done nor named by a live
    /// worker's heartbeat as in progress; 0 when there is none. An
    /// approximation of the wait of the oldest queued shard: a shard counts
    /// from its first publication (a requeued shard keeps its age), a shard
    /// a worker took counts until the worker's next heartbeat (at once,
    /// normally: workers beat when a shard starts), and a restarted
    /// coordinator starts afresh.
    pub oldest_shard_age: Gauge,
    /// `dig_workers_up`: workers with a live heartbeat.
    pub workers_up: IntGauge,
}

/// The coordinator's metrics, registered on first use.
pub fn coordinator() -> &'static CoordinatorMetrics {
    static COORDINATOR: OnceLock<CoordinatorMetrics> = OnceLock::new();
    COORDINATOR.get_or_init(|| CoordinatorMetrics {
        shards_published: counter(
            "dig_shards_published_total",
            "Shards published to the shard queue by the coordinator",
        ),
        jobs: register(
            IntGaugeVec::new(
                Opts::new("dig_jobs", "Jobs of every tenant by state (from Redis)"),
                &["state"],
            )
            .expect("valid metric"),
        ),
        job_samples_per_second: register(
            GaugeVec::new(
                Opts::new(
                    "dig_job_samples_per_second",
                    "Samples per second of each running job since its start (from Redis)",
                ),
                &["job_id"],
            )
            .expect("valid metric"),
        ),
        queue_depth: gauge(
            "dig_queue_depth_shards",
            "Shards waiting in the shard queue, not yet delivered to a worker",
        ),
        queue_parked: gauge(
            "dig_queue_parked_shards",
            "Shards in the parking queue (given up after their attempts)",
        ),
        oldest_shard_age: register(
            Gauge::new(
                "dig_queue_oldest_shard_age_seconds",
                "Seconds since the oldest outstanding shard not in progress on a worker was published",
            )
            .expect("valid metric"),
        ),
        workers_up: gauge("dig_workers_up", "Workers with a live heartbeat (from Redis)"),
    })
}

/// A worker's metrics.
pub struct WorkerMetrics {
    /// `dig_shards_completed_total`: shards sampled, written and recorded
    /// (a redelivered shard that was done already counts again).
    pub shards_completed: IntCounter,
    /// `dig_shards_failed_total`: deliveries that ended in an error
    /// (transient or not; stops for a cancellation or shutdown are no failure).
    pub shards_failed: IntCounter,
    /// `dig_shards_retried_total`: failed shards requeued for another try.
    pub shards_retried: IntCounter,
    /// `dig_shards_dead_lettered_total`: shards parked after their last
    /// attempt (their job fails).
    pub shards_dead_lettered: IntCounter,
    /// `dig_samples_generated_total{worker}`: samples of completed shards.
    pub samples_generated: IntCounterVec,
    /// `dig_sampler_step_seconds{length_bucket}`: one sampler step of one
    /// batch (wall time between step completions).
    pub sampler_step: HistogramVec,
    /// `dig_shard_duration_seconds{length_bucket}`: a completed shard from
    /// its delivery to its recorded completion (inputs, sampling, upload).
    pub shard_duration: HistogramVec,
    /// `dig_model_cache_hits_total` / `_misses_total`: a shard found its
    /// model loaded already, or loaded it.
    pub model_cache_hits: IntCounter,
    pub model_cache_misses: IntCounter,
    /// `dig_feature_cache_hits_total` / `_misses_total`: a shard found its
    /// protein's pair-derived tensors (its features) prepared already, or
    /// prepared them.
    pub feature_cache_hits: IntCounter,
    pub feature_cache_misses: IntCounter,
    /// `dig_worker_busy`: 1 while a shard samples, else 0.
    pub busy: IntGauge,
    /// `dig_worker_heartbeats_total`: heartbeats published.
    pub heartbeats: IntCounter,
}

/// A worker's metrics, registered on first use.
pub fn worker() -> &'static WorkerMetrics {
    static WORKER: OnceLock<WorkerMetrics> = OnceLock::new();
    WORKER.get_or_init(|| WorkerMetrics {
        shards_completed: counter(
            "dig_shards_completed_total",
            "Shards sampled, written to the object store and recorded done",
        ),
        shards_failed: counter(
            "dig_shards_failed_total",
            "Shard deliveries that ended in an error",
        ),
        shards_retried: counter(
            "dig_shards_retried_total",
            "Failed shards requeued for another attempt",
        ),
        shards_dead_lettered: counter(
            "dig_shards_dead_lettered_total",
            "Shards parked after their last attempt",
        ),
        samples_generated: counter_vec(
            "dig_samples_generated_total",
            "Samples of completed shards, by worker",
            &["worker"],
        ),
        sampler_step: histogram_vec(
            "dig_sampler_step_seconds",
            "Seconds per sampler step of one batch, by protein length",
            &["length_bucket"],
            exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
        ),
        shard_duration: histogram_vec(
            "dig_shard_duration_seconds",
            "Seconds from a shard's delivery to its recorded completion, by protein length",
            &["length_bucket"],
            exponential_buckets(0.1, 2.0, 18).expect("valid buckets"),
        ),
        model_cache_hits: counter(
            "dig_model_cache_hits_total",
            "Shards whose model was loaded already",
        ),
        model_cache_misses: counter(
            "dig_model_cache_misses_total",
            "Shards that loaded their model",
        ),
        feature_cache_hits: counter(
            "dig_feature_cache_hits_total",
            "Shards whose protein features were prepared already",
        ),
        feature_cache_misses: counter(
            "dig_feature_cache_misses_total",
            "Shards that prepared their protein's features",
        ),
        busy: gauge(
            "dig_worker_busy",
            "1 while the worker samples a shard, else 0",
        ),
        heartbeats: counter(
            "dig_worker_heartbeats_total",
            "Heartbeats the worker published",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_length_buckets_cover_every_length() {
        assert_eq!(length_bucket(1), "1-64");
        assert_eq!(length_bucket(64), "1-64");
        assert_eq!(length_bucket(65), "65-128");
        assert_eq!(length_bucket(256), "129-256");
        assert_eq!(length_bucket(257), "257-512");
        assert_eq!(length_bucket(512), "257-512");
        assert_eq!(length_bucket(513), "513+");
        assert_eq!(length_bucket(100_000), "513+");
    }

    /// The value of the series `name{labels}` in `text`, labels as written
    /// by the encoder (sorted, quoted), e.g. `route="/v1/jobs"`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn metrics_groups_register_once_and_render_as_text() {
        // Each group twice: the second call finds it registered.
        let (a, c, w) = (api(), coordinator(), worker());
        assert!(std::ptr::eq(a, api()) && std::ptr::eq(c, coordinator()));
        assert!(std::ptr::eq(w, worker()));
        a.requests
            .with_label_values(&["/v1/jobs/{id}", "GET", "200"])
            .inc();
        a.request_duration
            .with_label_values(&["/v1/jobs/{id}", "GET"])
            .observe(0.003);
        c.jobs.with_label_values(&["succeeded"]).set(2);
        c.job_samples_per_second.with_label_values(&["j1"]).set(1.5);
        w.samples_generated.with_label_values(&["w1"]).inc_by(5);
        w.shard_duration
            .with_label_values(&[length_bucket(24)])
            .observe(1.0);
        let text = encode_text();
        for name in [
            "dig_api_requests_total",
            "dig_api_request_duration_seconds",
            "dig_jobs",
            "dig_job_samples_per_second",
            "dig_shards_published_total",
            "dig_queue_depth_shards",
            "dig_queue_parked_shards",
            "dig_queue_oldest_shard_age_seconds",
            "dig_workers_up",
            "dig_shards_completed_total",
            "dig_shards_failed_total",
            "dig_shards_retried_total",
            "dig_shards_dead_lettered_total",
            "dig_samples_generated_total",
            "dig_shard_duration_seconds",
            "dig_model_cache_hits_total",
            "dig_model_cache_misses_total",
            "dig_feature_cache_hits_total",
            "dig_feature_cache_misses_total",
            "dig_worker_busy",
            "dig_worker_heartbeats_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        assert!(
            value(
                &text,
                r#"dig_api_requests_total{method="GET",route="/v1/jobs/{id}",status="200"}"#
            )
            .is_some_and(|v| v >= 1.0),
            "{text}"
        );
        assert!(
            value(
                &text,
                r#"dig_shard_duration_seconds_count{length_bucket="1-64"}"#
            )
            .is_some_and(|v| v >= 1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"dig_jobs{state="succeeded"}"#),
            Some(2.0),
            "{text}"
        );
        // Removing a label value removes its series.
        c.job_samples_per_second
            .remove_label_values(&["j1"])
            .unwrap();
        assert!(!encode_text().contains(r#"job_id="j1""#));
    }
}
