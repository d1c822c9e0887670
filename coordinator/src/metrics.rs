//! The cluster-wide metrics the coordinator exports (see
//! `dig_common::metrics::CoordinatorMetrics`): jobs by state, running jobs'
//! throughput, live workers and queue depth, read from Redis and the broker
//! every few seconds by [`ClusterMetrics::run`], so that one scrape target
//! gives the cluster view whatever the number of API replicas and workers.
//! And [`ShardAges`], the publication times behind
//! `dig_queue_oldest_shard_age_seconds`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dig_common::job::{JobId, JobState};
use dig_common::metrics::{self, CoordinatorMetrics};
use dig_common::progress::ProgressStore;
use dig_common::queue::ShardQueue;
use tokio::sync::watch;
use tracing::debug;

/// When each outstanding shard was first published.
#[derive(Default)]
pub struct ShardAges {
    published: Mutex<HashMap<(JobId, u64), Instant>>,
}

impl ShardAges {
    /// Counts a shard published (`dig_shards_published_total`) and notes the
    /// time; a shard published again keeps its first time.
    pub fn published(&self, job: JobId, index: u64) {
        metrics::coordinator().shards_published.inc();
        self.lock().entry((job, index)).or_insert_with(Instant::now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, u64), Instant>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the cluster's figures into the coordinator's metrics.
pub struct ClusterMetrics {
    queue: Arc<dyn ShardQueue>,
    progress: Arc<dyn ProgressStore>,
    ages: Arc<ShardAges>,
    metrics: &'static CoordinatorMetrics,
    /// Jobs with a `dig_job_samples_per_second` series.
    exported: Mutex<BTreeSet<JobId>>,
}

impl ClusterMetrics {
    pub fn new(
        queue: Arc<dyn ShardQueue>,
        progress: Arc<dyn ProgressStore>,
        ages: Arc<ShardAges>,
    ) -> Self {
        ClusterMetrics {
            queue,
            progress,
            ages,
            metrics: metrics::coordinator(),
            exported: Mutex::new(BTreeSet::new()),
        }
    }

    /// Refreshes every `interval` until `shutdown` turns true (or its
    /// sender is gone). Failures are logged at debug level and leave the
    /// figures as they were: metrics must not make noise during an outage
    /// that the services report already.
    pub async fn run(&self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.refresh().await,
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    /// One refresh of every cluster figure; each figure on its own, so one
    /// unreachable service does not stale the others.
    pub async fn refresh(&self) {
        let m = self.metrics;
        match self.queue.shard_queue_depth().await {
            Ok(n) => m.queue_depth.set(clamp(n)),
            Err(e) => debug!(error = %e, "metrics: cannot read the shard queue depth"),
        }
        match self.queue.parked_depth().await {
            Ok(n) => m.queue_parked.set(clamp(n)),
            Err(e) => debug!(error = %e, "metrics: cannot read the parking queue depth"),
        }
        match self.progress.count_jobs_by_state().await {
            Ok(counts) => {
                for (state, n) in counts {
                    m.jobs
                        .with_label_values(&[state_label(state)])
                        .set(clamp(n));
                }
            }
            Err(e) => debug!(error = %e, "metrics: cannot count jobs by state"),
        }
        let in_progress: Option<HashSet<String>> = match self.progress.workers().await {
            Ok(workers) => {
                m.workers_up.set(clamp(workers.len() as u64));
                Some(workers.into_iter().filter_map(|w| w.shard).collect())
            }
            Err(e) => {
                debug!(error = %e, "metrics: cannot read worker heartbeats");
                None
            }
        };
        if let Err(e) = self.refresh_jobs(in_progress).await {
            debug!(error = %e, "metrics: cannot read the running jobs");
        }
    }

    /// Per-job throughput of running jobs, and the oldest waiting shard.
    async fn refresh_jobs(&self, in_progress: Option<HashSet<String>>) -> dig_common::Result<()> {
        let now = unix_secs();
        let mut running = BTreeSet::new();
        let mut unfinished = HashSet::new();
        for job in self.progress.unfinished_jobs().await? {
            let Some(p) = self.progress.get(job).await? else {
                continue;
            };
            unfinished.insert(job);
            if p.state != JobState::Running {
                continue;
            }
            // As the API's `samples_per_sec`: done over the seconds since start.
            let rate = match p.started_at {
                Some(start) if now > start => p.samples_done as f64 / (now - start) as f64,
                _ => 0.0,
            };
            self.metrics
                .job_samples_per_second
                .with_label_values(&[job.to_string().as_str()])
                .set(rate);
            running.insert(job);
        }
        {
            let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
            for gone in exported.difference(&running) {
                let _ = self
                    .metrics
                    .job_samples_per_second
                    .remove_label_values(&[gone.to_string().as_str()]);
            }
            *exported = running;
        }

        // Forget the shards of ended jobs and the shards done; of the rest,
        // those a live worker names are not waiting.
        let jobs: BTreeSet<JobId> = {
            let mut ages = self.ages.lock();
            ages.retain(|(job, _), _| unfinished.contains(job));
            ages.keys().map(|(job, _)| *job).collect()
        };
        let mut done = HashSet::new();
        for job in jobs {
            for index in self.progress.done_shards(job).await? {
                done.insert((job, index));
            }
        }
        let oldest = {
            let mut ages = self.ages.lock();
            ages.retain(|key, _| !done.contains(key));
            ages.iter()
                .filter(|((job, index), _)| {
                    in_progress
                        .as_ref()
                        .is_none_or(|shards| !shards.contains(&format!("{job}/{index}")))
                })
                .map(|(_, at)| at.elapsed())
                .max()
                .unwrap_or_default()
        };
        self.metrics.oldest_shard_age.set(oldest.as_secs_f64());
        Ok(())
    }
}

/// Resolves once `shutdown` is true (or its sender is gone); the guard
/// `wait_for` returns is not `Send`, so it is dropped here.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The state's wire name (`"running"`), as the API and Redis spell it.
fn state_label(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use dig_common::job::{JobSpec, Priority};
    use dig_common::progress::{MemoryProgress, WorkerHeartbeat};
    use dig_common::queue::MemoryQueue;

    use super::*;

    fn spec(num_samples: u64) -> JobSpec {
        JobSpec {
            id: JobId::new(),
            tenant: "acme".into(),
            name: None,
            sequence: "MKV".into(),
            features_sha256: "0".repeat(64),
            num_samples,
            seed: 0,
            steps: None,
            model: "m".into(),
            priority: Priority::Interactive,
            shard_size: 5,
            created_at: 1,
            callback_url: None,
            solver: Default::default(),
            filter: None,
            steering: None,
            log_density: false,
            from_structure: None,
            flow_above: None,
        }
    }

    fn gauge(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn cluster_figures_come_from_the_progress_store_and_the_queue() {
        let queue = Arc::new(MemoryQueue::new());
        let progress = Arc::new(MemoryProgress::new());
        let ages = Arc::new(ShardAges::default());
        let cluster = ClusterMetrics::new(queue.clone(), progress.clone(), ages.clone());
        let (running, waiting, ended) = (spec(20), spec(10), spec(10));
        for s in [&running, &waiting, &ended] {
            progress.create_job(s).await.unwrap();
        }
        progress
            .set_state(running.id, JobState::Running, None)
            .await
            .unwrap();
        progress
            .set_state(ended.id, JobState::Succeeded, None)
            .await
            .unwrap();
        for index in 0..3 {
            queue
                .publish_shard(&running.shard(index), Priority::Interactive)
                .await
                .unwrap();
            ages.published(running.id, index);
        }
        progress.record_shard_done(running.id, 0, 5).await.unwrap();
        // Shard 1 is in progress on a worker; shard 2 waits.
        let beat = WorkerHeartbeat {
            id: "w1".into(),
            device: "cpu".into(),
            shard: Some(format!("{}/1", running.id)),
            samples_per_sec: 1.0,
            at: 0,
        };
        progress.heartbeat("w1", &beat, 30).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        cluster.refresh().await;

        let text = metrics::encode_text();
        assert_eq!(gauge(&text, r#"dig_jobs{state="running"}"#), Some(1.0));
        assert_eq!(gauge(&text, r#"dig_jobs{state="queued"}"#), Some(1.0));
        assert_eq!(gauge(&text, r#"dig_jobs{state="succeeded"}"#), Some(1.0));
        assert_eq!(gauge(&text, r#"dig_jobs{state="failed"}"#), Some(0.0));
        assert_eq!(gauge(&text, "dig_workers_up"), Some(1.0));
        assert_eq!(gauge(&text, "dig_queue_depth_shards"), Some(3.0));
        assert_eq!(gauge(&text, "dig_queue_parked_shards"), Some(0.0));
        let age = gauge(&text, "dig_queue_oldest_shard_age_seconds").unwrap();
        assert!(age > 0.0 && age < 60.0, "{age}");
        // Shard 0 is done: forgotten; 1 and 2 remain.
        assert_eq!(ages.lock().len(), 2);
        let series = format!(r#"dig_job_samples_per_second{{job_id="{}"}}"#, running.id);
        assert!(gauge(&text, &series).is_some(), "{text}");
        assert!(!text.contains(&waiting.id.to_string()), "{text}");

        // The job ends: its series and shard times go.
        progress
            .set_state(running.id, JobState::Cancelled, None)
            .await
            .unwrap();
        cluster.refresh().await;
        let text = metrics::encode_text();
        assert!(!text.contains(&running.id.to_string()), "{text}");
        assert_eq!(
            gauge(&text, "dig_queue_oldest_shard_age_seconds"),
            Some(0.0)
        );
        assert_eq!(ages.lock().len(), 0);
    }
}
