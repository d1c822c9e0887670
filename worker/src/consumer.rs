//! The queue consumer around [`ShardSampler`]: take a shard, make sure the
//! job's model and features are on local disk, sample, write the shard
//! output at its deterministic key, record completion in the progress store
//! and only then ack. A crash anywhere before the ack redelivers the shard;
//! the re-run writes identical bytes and the completion counts once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dig_common::job::{JobId, JobSpec, ShardTask};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, WorkerHeartbeat};
use dig_common::queue::{ShardDelivery, ShardQueue};
use dig_common::store::FeatureStore;
use dig_common::CommonError;
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use tch::Device;
use tokio::sync::watch;

use crate::shard::ShardSampler;

/// What a worker needs to know besides its connections.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub id: String,
    pub device: Device,
    pub batch_size: usize,
    pub pair_cache_bytes: u64,
    /// Local copies of models and features.
    pub cache_dir: PathBuf,
    /// Attempts per shard before it is parked and its job fails.
    pub max_attempts: u32,
    /// Seconds between heartbeats; a worker is listed for three of them.
    pub heartbeat_secs: u64,
}

/// The backing services a worker talks to.
#[derive(Clone)]
pub struct WorkerContext {
    pub queue: Arc<dyn ShardQueue>,
    pub store: Arc<dyn ObjectStore>,
    pub layout: ObjectLayout,
    pub features: Arc<FeatureStore>,
    pub progress: Arc<dyn ProgressStore>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    #[error("{0}")]
    Other(String),
}

pub struct Worker {
    ctx: WorkerContext,
    settings: WorkerSettings,
    sampler: Arc<Mutex<ShardSampler>>,
    status: Arc<Mutex<Status>>,
}

/// What the heartbeat reports.
#[derive(Default)]
struct Status {
    /// `"{job}/{index}"` of the shard being sampled.
    shard: Option<String>,
    /// Samples per second of sampling, smoothed over recent shards.
    samples_per_sec: f64,
}

impl Worker {
    pub fn new(ctx: WorkerContext, settings: WorkerSettings) -> Self {
        let sampler = ShardSampler::new(
            settings.device,
            settings.batch_size,
            settings.pair_cache_bytes,
        );
        Worker {
            ctx,
            settings,
            sampler: Arc::new(Mutex::new(sampler)),
            status: Arc::default(),
        }
    }

    /// Publishes one heartbeat now.
    pub async fn beat(&self) -> Result<(), WorkerError> {
        let (shard, samples_per_sec) = {
            let st = self.status.lock().expect("status lock");
            (st.shard.clone(), st.samples_per_sec)
        };
        let info = WorkerHeartbeat {
            id: self.settings.id.clone(),
            device: device_name(self.settings.device),
            shard,
            samples_per_sec,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let ttl = 3 * self.settings.heartbeat_secs.max(1);
        self.ctx
            .progress
            .heartbeat(&self.settings.id, &info, ttl)
            .await?;
        Ok(())
    }

    /// Beats every `heartbeat_secs` until `shutdown`; errors are logged,
    /// not fatal (Redis may be briefly away).
    async fn heartbeats(&self, mut shutdown: watch::Receiver<bool>) {
        let mut every =
            tokio::time::interval(Duration::from_secs(self.settings.heartbeat_secs.max(1)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = every.tick() => {
                    if let Err(e) = self.beat().await {
                        tracing::warn!(worker = %self.settings.id, "heartbeat: {e}");
                    }
                }
            }
        }
    }

    /// Consumes shards until `shutdown` turns true (checked between shards),
    /// publishing heartbeats meanwhile.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let beats = self.heartbeats(shutdown.clone());
        let consume = self.consume(shutdown);
        tokio::pin!(beats);
        tokio::select! {
            // Heartbeats end only with shutdown, and so does consuming.
            r = consume => r,
            _ = &mut beats => Ok(()),
        }
    }

    async fn consume(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut shards = self.ctx.queue.consume_shards(1).await?;
        loop {
            let delivery = tokio::select! {
                _ = stopped(&mut shutdown) => return Ok(()),
                next = shards.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(worker = %self.settings.id, "shard queue: {e}; retrying");
                        continue;
                    }
                    None => return Ok(()),
                },
            };
            self.handle(delivery).await?;
        }
    }

    async fn handle(&self, delivery: ShardDelivery) -> Result<(), WorkerError> {
        let task = delivery.task;
        let attempt = self
            .ctx
            .progress
            .start_attempt(task.job, task.index)
            .await?;
        match self.process(&task).await {
            Ok(()) => delivery.ack().await?,
            Err(e) if attempt >= self.settings.max_attempts => {
                let reason = e.to_string();
                tracing::error!(job = %task.job, shard = task.index, attempt, "shard failed for good: {reason}");
                self.ctx.queue.park_shard(&task, &reason).await?;
                self.ctx
                    .progress
                    .record_shard_failed(task.job, task.index, &reason)
                    .await?;
                delivery.ack().await?;
            }
            Err(e) => {
                tracing::warn!(job = %task.job, shard = task.index, attempt, "shard failed, will retry: {e}");
                delivery.requeue().await?;
            }
        }
        Ok(())
    }

    /// Samples one shard and records it; idempotent.
    pub async fn process(&self, task: &ShardTask) -> Result<(), WorkerError> {
        let spec = self.spec(task.job).await?;
        let model_dir = self.local_model(&spec.model).await?;
        let features = self.local_features(&spec.features_sha256).await?;
        self.status.lock().expect("status lock").shard =
            Some(format!("{}/{}", task.job, task.index));
        let started = Instant::now();
        let sampler = self.sampler.clone();
        let (spec2, task2) = (spec.clone(), *task);
        let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, WorkerError> {
            let mut sampler = sampler.lock().expect("sampler lock");
            let ensemble = sampler.sample(&spec2, &task2, &model_dir, &features)?;
            ensemble
                .npz_bytes()
                .map_err(|e| WorkerError::Other(e.to_string()))
        })
        .await
        .map_err(|e| WorkerError::Other(format!("sampling task panicked: {e}")));
        {
            let mut st = self.status.lock().expect("status lock");
            st.shard = None;
            if bytes.as_ref().is_ok_and(|b| b.is_ok()) {
                let rate = task.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
                st.samples_per_sec = if st.samples_per_sec == 0.0 {
                    rate
                } else {
                    0.7 * st.samples_per_sec + 0.3 * rate
                };
            }
        }
        let bytes = bytes??;
        // Identical bytes on a re-run: overwriting is harmless.
        self.ctx
            .store
            .put(
                &self.ctx.layout.shard(task.job, task.index),
                PutPayload::from(bytes),
            )
            .await?;
        let new = self
            .ctx
            .progress
            .record_shard_done(task.job, task.index, task.len())
            .await?;
        tracing::info!(job = %task.job, shard = task.index, samples = task.len(), new, "shard done");
        Ok(())
    }

    async fn spec(&self, job: JobId) -> Result<JobSpec, WorkerError> {
        let bytes = self
            .ctx
            .store
            .get(&self.ctx.layout.job_spec(job))
            .await?
            .bytes()
            .await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| WorkerError::Other(format!("job {job}: unreadable spec: {e}")))
    }

    /// The model directory in the local cache, downloaded once.
    async fn local_model(&self, model: &str) -> Result<PathBuf, WorkerError> {
        let dir = self.settings.cache_dir.join("models").join(model);
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(CommonError::from)?;
        // Weights first, config last: a directory with a config is complete.
        for file in ["model.safetensors", "config.json"] {
            let bytes = self
                .ctx
                .store
                .get(&self.ctx.layout.model_file(model, file))
                .await?
                .bytes()
                .await?;
            write_atomically(&dir.join(file), &bytes).await?;
        }
        Ok(dir)
    }

    async fn local_features(&self, sha256: &str) -> Result<PathBuf, WorkerError> {
        let path = self
            .settings
            .cache_dir
            .join("features")
            .join(format!("{sha256}.npz"));
        if !path.is_file() {
            tokio::fs::create_dir_all(path.parent().expect("has parent"))
                .await
                .map_err(CommonError::from)?;
            self.ctx.features.fetch_to(sha256, &path).await?;
        }
        Ok(path)
    }
}

/// Resolves once `shutdown` is true (or its sender is gone). The guard
/// `wait_for` returns is not `Send`; it is dropped here, not held by callers.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// `cpu`, `cuda:0`, ...: how heartbeats name a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let tmp = path.with_extension("part");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(CommonError::from)?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(CommonError::from)?;
    Ok(())
}
