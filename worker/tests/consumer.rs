//! The worker against real RabbitMQ, Redis and SeaweedFS (S3): two workers
//! drain a job's shards, every shard lands once at its key with the bytes a
//! local run gives, and a redelivered shard neither duplicates nor changes
//! anything. Servers come from `scripts/services.sh` (`make test` runs it).

use std::path::PathBuf;
use std::sync::Arc;

use dig_common::job::{JobId, JobSpec, Priority};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{RabbitQueue, ShardQueue};
use dig_common::store::{open_store, FeatureStore, StoreConfig, StoreKind};
use dig_worker::consumer::{Worker, WorkerContext, WorkerSettings};
use dig_worker::shard::ShardSampler;
use futures::TryStreamExt;
use object_store::{ObjectStore, PutPayload};
use tch::Device;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data")
        .join(name)
}

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run scripts/services.sh (make test does)"))
}

struct Cluster {
    ctx: WorkerContext,
    rabbit: Arc<RabbitQueue>,
    redis: Arc<RedisProgress>,
    prefix: String,
    cache: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let prefix = format!("test-{}", JobId::new());
    let store = open_store(&StoreConfig {
        kind: StoreKind::S3,
        s3_endpoint: Some(env("DIG_TEST_S3_ENDPOINT")),
        s3_bucket: Some(env("DIG_TEST_S3_BUCKET")),
        prefix: prefix.clone(),
        ..Default::default()
    })
    .unwrap();
    let layout = ObjectLayout::new(&prefix);
    let cache = tempfile::tempdir().unwrap();
    let features = Arc::new(
        FeatureStore::new(
            store.clone(),
            layout.clone(),
            1 << 30,
            cache.path().join("tmp"),
        )
        .unwrap(),
    );
    let rabbit = Arc::new(
        RabbitQueue::connect(&env("DIG_TEST_AMQP"), &prefix)
            .await
            .unwrap(),
    );
    let redis = Arc::new(
        RedisProgress::connect(&env("DIG_TEST_REDIS"), &prefix)
            .await
            .unwrap(),
    );
    let ctx = WorkerContext {
        queue: rabbit.clone(),
        store,
        layout,
        features,
        progress: redis.clone(),
    };
    Cluster {
        ctx,
        rabbit,
        redis,
        prefix,
        cache,
    }
}

impl Cluster {
    /// Uploads the fixture model and features and stores a job spec.
    async fn submit(&self, num_samples: u64, shard_size: u64) -> JobSpec {
        let bytes = std::fs::read(data("features.npz")).unwrap();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))]);
        let feature = self.ctx.features.put_stream(body).await.unwrap();
        for file in ["config.json", "model.safetensors"] {
            let bytes = std::fs::read(data(file)).unwrap();
            self.ctx
                .store
                .put(
                    &self.ctx.layout.model_file("dig-small", file),
                    PutPayload::from(bytes),
                )
                .await
                .unwrap();
        }
        let spec = JobSpec {
            id: JobId::new(),
            tenant: "lab".into(),
            name: None,
            sequence: "MKTAYIAKQRQISFVKSHFSRQLE".into(),
            features_sha256: feature.sha256,
            num_samples,
            seed: 5,
            steps: Some(10),
            model: "dig-small".into(),
            priority: Priority::Interactive,
            shard_size,
            created_at: 0,
        };
        let json = serde_json::to_vec(&spec).unwrap();
        self.ctx
            .store
            .put(&self.ctx.layout.job_spec(spec.id), PutPayload::from(json))
            .await
            .unwrap();
        self.redis.create_job(&spec).await.unwrap();
        spec
    }

    fn settings(&self, id: &str) -> WorkerSettings {
        WorkerSettings {
            id: id.into(),
            device: Device::Cpu,
            batch_size: 2,
            pair_cache_bytes: u64::MAX,
            cache_dir: self.cache.path().join(id),
            max_attempts: 3,
            heartbeat_secs: 1,
        }
    }

    async fn cleanup(self) {
        self.rabbit.purge_and_delete().await.unwrap();
        self.redis.delete_all().await.unwrap();
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let keys: Vec<_> = self
            .ctx
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap();
        for k in keys {
            self.ctx.store.delete(&k).await.unwrap();
        }
    }
}

/// The bytes a single local sampler gives for shard `i` of `spec`.
fn expected_shard(spec: &JobSpec, i: u64) -> Vec<u8> {
    let mut s = ShardSampler::new(Device::Cpu, 2, u64::MAX);
    s.sample(spec, &spec.shard(i), &data(""), &data("features.npz"))
        .unwrap()
        .npz_bytes()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_drain_a_job_and_every_shard_lands_once_with_local_bytes() {
    let c = cluster().await;
    let spec = c.submit(12, 3).await;
    for i in 0..spec.num_shards() {
        c.rabbit
            .publish_shard(&spec.shard(i), spec.priority)
            .await
            .unwrap();
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|id| {
            let w = Worker::new(c.ctx.clone(), c.settings(id));
            let rx = stopped.clone();
            tokio::spawn(async move { w.run(rx).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let p = c.redis.get(spec.id).await.unwrap().unwrap();
        if p.shards_done == spec.num_shards() {
            assert_eq!(p.samples_done, 12);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job did not finish: {p:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Both workers beat (every second) and report a sampling rate once they
    // have finished a shard; idle now, so no current shard.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let beats = c.redis.workers().await.unwrap();
        let ids: Vec<&str> = beats.iter().map(|b| b.id.as_str()).collect();
        let ready = ids == ["w1", "w2"]
            && beats
                .iter()
                .all(|b| b.device == "cpu" && b.shard.is_none() && b.samples_per_sec > 0.0);
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "heartbeats incomplete: {beats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.send(true).unwrap();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    let mut done = c.redis.done_shards(spec.id).await.unwrap();
    done.sort();
    assert_eq!(done, vec![0, 1, 2, 3]);
    for i in 0..spec.num_shards() {
        let got = c
            .ctx
            .store
            .get(&c.ctx.layout.shard(spec.id, i))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            got.as_ref() == expected_shard(&spec, i).as_slice(),
            "shard {i} differs from the local run"
        );
    }
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_shard_counts_once_and_rewrites_identical_bytes() {
    let c = cluster().await;
    let spec = c.submit(4, 2).await;
    let w = Worker::new(c.ctx.clone(), c.settings("w1"));
    w.process(&spec.shard(1)).await.unwrap();
    let key = c.ctx.layout.shard(spec.id, 1);
    let first = c.ctx.store.get(&key).await.unwrap().bytes().await.unwrap();
    w.process(&spec.shard(1)).await.unwrap(); // as after a crash before the ack
    let second = c.ctx.store.get(&key).await.unwrap().bytes().await.unwrap();
    assert!(first == second);
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done), (1, 2));
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_features_are_gone_is_parked_after_max_attempts() {
    let c = cluster().await;
    let spec = c.submit(2, 2).await;
    c.ctx
        .store
        .delete(&c.ctx.layout.features(&spec.features_sha256))
        .await
        .unwrap();
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let w = Worker::new(c.ctx.clone(), c.settings("w1"));
    let handle = tokio::spawn(async move { w.run(stopped).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while c.rabbit.parked_depth().await.unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "shard was never parked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!(p.shards_failed, 1);
    let error = p.error.unwrap();
    assert!(
        error.starts_with("shard 0:") && error.contains("not found"),
        "{error}"
    );
    assert!(
        c.ctx
            .store
            .head(&c.ctx.layout.shard(spec.id, 0))
            .await
            .is_err(),
        "no output for a failed shard"
    );
    c.cleanup().await;
}
