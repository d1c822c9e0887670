//! The worker against real RabbitMQ, Redis and SeaweedFS (S3): two workers
//! drain a job's shards, every shard lands once at its key with the bytes a
//! local run gives, and a redelivered shard neither duplicates nor changes
//! anything; cancelled jobs' shards are skipped or stopped unwritten,
//! shutdown finishes or requeues the shard in progress, transient store
//! failures cost no attempt and workers dying on a shard do, and a model
//! uploaded again under its id is sampled, not the cached copy. Servers come
//! from `scripts/services.sh` (`make test` runs it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dig_common::job::{JobId, JobSpec, JobState, Priority};
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{RabbitQueue, ShardQueue};
use dig_common::store::FeatureStore;
use dig_worker::consumer::{Worker, WorkerContext, WorkerSettings};
use dig_worker::shard::ShardSampler;
use object_store::{ObjectStore, PutPayload};
use tch::Device;

use dig_test_support::{fixture as data, Servers};

struct Cluster {
    ctx: WorkerContext,
    rabbit: Arc<RabbitQueue>,
    redis: Arc<RedisProgress>,
    cache: tempfile::TempDir,
    servers: Servers,
}

/// A worker running in the test's runtime.
struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    worker: Arc<Worker>,
    handle: tokio::task::JoinHandle<Result<(), dig_worker::consumer::WorkerError>>,
}

impl Running {
    /// The shard the worker samples, once it samples one (polled often, so
    /// that even a short shard is seen in progress).
    async fn shard_in_progress(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(shard) = self.worker.current_shard() {
                return shard;
            }
            assert!(Instant::now() < deadline, "the worker never took a shard");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the worker samples nothing.
    async fn wait_until_idle(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.worker.current_shard().is_some() {
            assert!(Instant::now() < deadline, "still sampling after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks for shutdown and waits (at most `within`) for `run` to return Ok.
    async fn shut_down(self, within: Duration) {
        // Fails only when the worker has returned already.
        let _ = self.stop.send(true);
        tokio::time::timeout(within, self.handle)
            .await
            .expect("the worker did not stop in time")
            .unwrap()
            .unwrap();
    }
}

async fn cluster() -> Cluster {
    let servers = Servers::fresh().await;
    let (store, layout) = (servers.store.clone(), servers.layout.clone());
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
    let (rabbit, redis) = (servers.queue.clone(), servers.progress.clone());
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
        cache,
        servers,
    }
}

impl Cluster {
    /// Uploads the fixture model and features and stores a job spec (10 steps).
    async fn submit(&self, num_samples: u64, shard_size: u64) -> JobSpec {
        self.submit_steps(num_samples, shard_size, 10).await
    }

    /// [`Cluster::submit`] with `steps` sampler steps.
    async fn submit_steps(&self, num_samples: u64, shard_size: u64, steps: i64) -> JobSpec {
        let bytes = std::fs::read(data("features.npz")).unwrap();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))]);
        let feature = self.ctx.features.put_stream(body).await.unwrap();
        self.servers.upload_fixture_model().await;
        let spec = JobSpec {
            id: JobId::new(),
            tenant: "lab".into(),
            name: None,
            sequence: "MKTAYIAKQRQISFVKSHFSRQLE".into(),
            features_sha256: feature.sha256,
            num_samples,
            seed: 5,
            steps: Some(steps),
            model: "dig-small".into(),
            priority: Priority::Interactive,
            shard_size,
            created_at: 0,
            callback_url: None,
            solver: Default::default(),
            filter: None,
            steering: None,
            log_density: false,
            from_structure: None,
            flow_above: None,
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
            cancel_poll: Duration::from_millis(250),
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_millis(200),
            ..WorkerSettings::default()
        }
    }

    /// Runs a worker until the returned sender says stop.
    fn spawn_worker(&self, ctx: WorkerContext, settings: WorkerSettings) -> Running {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let worker = Arc::new(Worker::new(ctx, settings));
        let w = worker.clone();
        Running {
            stop,
            worker,
            handle: tokio::spawn(async move { w.run(stopped).await }),
        }
    }

    /// Asserts that shard `i` of `spec` in the store is what a single
    /// local sampler gives, byte for byte.
    async fn assert_shard_is_local(&self, spec: &JobSpec, i: u64) {
        let got = self.shard_bytes(spec, i).await;
        assert!(
            got.as_ref() == expected_shard(spec, i).as_slice(),
            "shard {i} differs from the local run"
        );
    }

    /// The bytes of shard `i` of `spec` in the store.
    async fn shard_bytes(&self, spec: &JobSpec, i: u64) -> bytes::Bytes {
        self.ctx
            .store
            .get(&self.ctx.layout.shard(spec.id, i))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    async fn shard_exists(&self, spec: &JobSpec, i: u64) -> bool {
        match self
            .ctx
            .store
            .head(&self.ctx.layout.shard(spec.id, i))
            .await
        {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => panic!("head: {e}"),
        }
    }

    /// Polls the ready shards until there are `n` (for at most `within`).
    async fn wait_for_depth(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let depth = self.rabbit.shard_queue_depth().await.unwrap();
            if depth == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{depth} shards ready after {within:?}, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cleanup(self) {
        self.servers.cleanup().await;
    }
}

/// The bytes a single local sampler gives for shard `i` of `spec`.
fn expected_shard(spec: &JobSpec, i: u64) -> Vec<u8> {
    expected_shard_with(spec, i, &data(""))
}

/// [`expected_shard`] with the model in `model_dir`.
fn expected_shard_with(spec: &JobSpec, i: u64, model_dir: &std::path::Path) -> Vec<u8> {
    let mut s = ShardSampler::new(Device::Cpu, 2, u64::MAX);
    s.sample(spec, &spec.shard(i), model_dir, &data("features.npz"))
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
        c.assert_shard_is_local(&spec, i).await;
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
async fn a_model_uploaded_again_under_its_id_is_sampled_not_the_cached_copy() {
    let c = cluster().await;
    let spec = c.submit(4, 2).await;
    let w = Worker::new(c.ctx.clone(), c.settings("w1"));
    w.process(&spec.shard(0)).await.unwrap();
    c.assert_shard_is_local(&spec, 0).await;

    // Other weights under the same id: the fixture's, each scaled by 0.9.
    let other = tempfile::tempdir().unwrap();
    let scaled: Vec<(String, tch::Tensor)> =
        tch::Tensor::read_safetensors(data("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name, t * 0.9))
            .collect();
    tch::Tensor::write_safetensors(&scaled, other.path().join("model.safetensors")).unwrap();
    std::fs::copy(data("config.json"), other.path().join("config.json")).unwrap();
    for file in ["config.json", "model.safetensors"] {
        let bytes = std::fs::read(other.path().join(file)).unwrap();
        c.ctx
            .store
            .put(
                &c.ctx.layout.model_file("dig-small", file),
                PutPayload::from(bytes),
            )
            .await
            .unwrap();
    }

    // The same worker, with the old model on disk and in memory, samples
    // the next shard with the new one.
    w.process(&spec.shard(1)).await.unwrap();
    let got = c.shard_bytes(&spec, 1).await;
    let new = expected_shard_with(&spec, 1, other.path());
    assert!(
        new != expected_shard(&spec, 1),
        "the scaled model samples the same"
    );
    assert!(
        got.as_ref() == new.as_slice(),
        "shard 1 came from the cached old model"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_a_cancelled_job_are_acked_and_skipped_without_an_attempt() {
    let c = cluster().await;
    let cancelled = c.submit(6, 2).await;
    c.redis
        .set_state(cancelled.id, JobState::Cancelled, None)
        .await
        .unwrap();
    let live = c.submit(2, 2).await;
    // The cancelled job's three shards first, then one of a live job: with
    // one shard at a time, the live one is done only after the others were
    // settled.
    for i in 0..cancelled.num_shards() {
        c.rabbit
            .publish_shard(&cancelled.shard(i), cancelled.priority)
            .await
            .unwrap();
    }
    c.rabbit
        .publish_shard(&live.shard(0), live.priority)
        .await
        .unwrap();
    let w = c.spawn_worker(c.ctx.clone(), c.settings("w1"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while c.redis.done_shards(live.id).await.unwrap() != vec![0] {
        assert!(Instant::now() < deadline, "the live shard was never done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shut_down(Duration::from_secs(60)).await;
    // Acked, not requeued: nothing comes back once the consumer is gone
    // (the broker requeues an unacked message asynchronously, as the
    // channel closes: a window for one to show).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    assert_eq!(c.rabbit.parked_depth().await.unwrap(), 0);
    let p = c.redis.get(cancelled.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Cancelled);
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (0, 0, 0));
    for i in 0..cancelled.num_shards() {
        assert!(!c.shard_exists(&cancelled, i).await, "shard {i} written");
        // No attempt was started at the skipped shards: this is the first.
        assert_eq!(
            c.redis
                .start_attempt(cancelled.id, i)
                .await
                .unwrap()
                .started,
            1
        );
    }
    assert!(c.shard_exists(&live, 0).await);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_shard_stops_at_a_batch_boundary_when_its_job_is_cancelled() {
    let c = cluster().await;
    // 1000 batches of 2: many minutes of sampling, unless stopped.
    let spec = c.submit_steps(2000, 2000, 50).await;
    c.redis
        .set_state(spec.id, JobState::Running, None)
        .await
        .unwrap();
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let w = c.spawn_worker(c.ctx.clone(), c.settings("w1"));
    assert_eq!(w.shard_in_progress().await, format!("{}/0", spec.id));
    c.redis
        .set_state(spec.id, JobState::Cancelled, None)
        .await
        .unwrap();
    // Noticed within a poll (250 ms), stopped at the next batch.
    w.wait_until_idle(Duration::from_secs(120)).await;
    w.shut_down(Duration::from_secs(60)).await;
    // Acked, not requeued: a window for a requeue at the channel's close to
    // show, as above.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0, "acked");
    assert_eq!(c.rabbit.parked_depth().await.unwrap(), 0);
    assert!(
        !c.shard_exists(&spec, 0).await,
        "a stopped shard was written"
    );
    assert_eq!(
        c.redis.done_shards(spec.id).await.unwrap(),
        Vec::<u64>::new()
    );
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Cancelled);
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (0, 0, 0));
    assert_eq!(p.error, None);
    c.cleanup().await;
}

/// An object store whose first `failures` puts of shard outputs fail the way
/// an unreachable S3 server does (a `Generic` error); the rest pass through.
#[derive(Debug)]
struct FlakyStore {
    inner: Arc<dyn ObjectStore>,
    failures: usize,
    puts: AtomicUsize,
    /// Shard puts wait here for a permit (when set).
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Reads of job specs: one per shard the worker starts.
    spec_reads: AtomicUsize,
}

impl std::fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlakyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if location.as_ref().contains("/shards/")
            && self.puts.fetch_add(1, Ordering::SeqCst) < self.failures
        {
            return Err(object_store::Error::Generic {
                store: "S3",
                source: "error sending request: operation timed out".into(),
            });
        }
        if let (true, Some(gate)) = (location.as_ref().contains("/shards/"), &self.gate) {
            gate.acquire().await.expect("gate open").forget();
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        if location.as_ref().ends_with("spec.json") {
            self.spec_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_shard_samples_while_the_previous_one_uploads() {
    let c = cluster().await;
    let spec = c.submit(4, 2).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Arc::new(FlakyStore {
        inner: c.ctx.store.clone(),
        failures: 0,
        puts: AtomicUsize::new(0),
        gate: Some(gate.clone()),
        spec_reads: AtomicUsize::new(0),
    });
    let ctx = WorkerContext {
        store: held.clone(),
        ..c.ctx.clone()
    };
    for i in 0..2 {
        c.rabbit
            .publish_shard(&spec.shard(i), spec.priority)
            .await
            .unwrap();
    }
    let w = c.spawn_worker(ctx, c.settings("w1"));
    // Shard 0 sampled and its upload held at the gate; shard 1 started
    // (its spec read) meanwhile: sampling overlaps the upload.
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.puts.load(Ordering::SeqCst) < 1 || held.spec_reads.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "no overlap: {} shard puts, {} spec reads",
            held.puts.load(Ordering::SeqCst),
            held.spec_reads.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing is recorded or acked before its object is written, and at
    // most one upload is in flight: shard 1's waits for shard 0's.
    assert!(c.redis.done_shards(spec.id).await.unwrap().is_empty());
    assert!(!c.shard_exists(&spec, 0).await);
    // A window for a second upload to start, if one could (nothing signals
    // one that does not).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        held.puts.load(Ordering::SeqCst),
        1,
        "a second upload started"
    );
    gate.add_permits(16);
    while c.redis.done_shards(spec.id).await.unwrap() != vec![0, 1] {
        assert!(Instant::now() < deadline, "the shards were never done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.shut_down(Duration::from_secs(60)).await;
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    for i in 0..2 {
        c.assert_shard_is_local(&spec, i).await;
    }
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (2, 4, 0));
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_store_error_is_retried_without_counting_an_attempt() {
    let c = cluster().await;
    let spec = c.submit(4, 4).await;
    let flaky = Arc::new(FlakyStore {
        inner: c.ctx.store.clone(),
        failures: 2,
        puts: AtomicUsize::new(0),
        gate: None,
        spec_reads: AtomicUsize::new(0),
    });
    let ctx = WorkerContext {
        store: flaky.clone(),
        ..c.ctx.clone()
    };
    // One attempt only: a counted failure would park the shard at once.
    let settings = WorkerSettings {
        max_attempts: 1,
        ..c.settings("w1")
    };
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let w = c.spawn_worker(ctx, settings);
    let deadline = Instant::now() + Duration::from_secs(300);
    while c.redis.done_shards(spec.id).await.unwrap() != vec![0] {
        assert!(
            c.rabbit.parked_depth().await.unwrap() == 0,
            "the transient failure was counted: shard parked"
        );
        assert!(Instant::now() < deadline, "the shard was never done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shut_down(Duration::from_secs(60)).await;
    // Two failed puts, then the one that landed.
    assert_eq!(flaky.puts.load(Ordering::SeqCst), 3);
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (1, 4, 0));
    assert_eq!(p.error, None);
    assert_eq!(c.rabbit.parked_depth().await.unwrap(), 0);
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    // Three attempts ran, two were forgiven: the next one is the second.
    assert_eq!(c.redis.start_attempt(spec.id, 0).await.unwrap().started, 2);
    c.assert_shard_is_local(&spec, 0).await;
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_workers_died_max_deaths_times_is_parked_without_running_again() {
    let c = cluster().await;
    let spec = c.submit(2, 2).await;
    // Three workers started it and died (SIGKILL, out of memory) without
    // reporting anything; one more reported a failure.
    for n in 1..=3 {
        assert_eq!(c.redis.start_attempt(spec.id, 0).await.unwrap().started, n);
    }
    assert_eq!(c.redis.record_attempt_failed(spec.id, 0).await.unwrap(), 1);
    assert_eq!(c.redis.start_attempt(spec.id, 0).await.unwrap().started, 4);
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let settings = WorkerSettings {
        max_deaths: 3,
        ..c.settings("w1")
    };
    let w = c.spawn_worker(c.ctx.clone(), settings);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.rabbit.parked_depth().await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "shard was never parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shut_down(Duration::from_secs(60)).await;
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.shards_failed), (0, 1));
    let error = p.error.unwrap();
    assert!(
        error
            == "shard 0: parked after 3 attempts whose worker died without reporting an error \
                (killed, preempted, out of memory or a crash that takes the process down; \
                worker.max_deaths = 3); 1 reported failures",
        "{error}"
    );
    assert!(!c.shard_exists(&spec, 0).await, "the shard ran again");
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaths_below_max_deaths_cost_no_attempt() {
    let c = cluster().await;
    let spec = c.submit(2, 2).await;
    // Five preemptions, and a worker allowed a single failed attempt: the
    // deaths must not have spent it.
    for _ in 0..5 {
        c.redis.start_attempt(spec.id, 0).await.unwrap();
    }
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let settings = WorkerSettings {
        max_attempts: 1,
        max_deaths: 6,
        ..c.settings("w1")
    };
    let w = c.spawn_worker(c.ctx.clone(), settings);
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.redis.done_shards(spec.id).await.unwrap() != vec![0] {
        assert_eq!(c.rabbit.parked_depth().await.unwrap(), 0, "parked");
        assert!(Instant::now() < deadline, "the shard was never done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shut_down(Duration::from_secs(60)).await;
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (1, 2, 0));
    assert!(c.shard_exists(&spec, 0).await);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_shard_in_progress_finish_within_the_grace() {
    let c = cluster().await;
    // 30 batches of 2 samples and 10 steps.
    let spec = c.submit_steps(60, 60, 10).await;
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let settings = WorkerSettings {
        shutdown_grace: Duration::from_secs(600),
        ..c.settings("w1")
    };
    let w = c.spawn_worker(c.ctx.clone(), settings);
    w.shard_in_progress().await;
    w.stop.send(true).unwrap();
    assert!(
        c.redis.done_shards(spec.id).await.unwrap().is_empty(),
        "the shard finished before the shutdown; the test needs a longer one"
    );
    w.shut_down(Duration::from_secs(600)).await;
    // Finished, written, recorded and acked before run returned.
    assert_eq!(c.redis.done_shards(spec.id).await.unwrap(), vec![0]);
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!(p.samples_done, 60);
    // Acked, not requeued: a window for a requeue at the channel's close to
    // show, as above.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.rabbit.shard_queue_depth().await.unwrap(), 0);
    c.assert_shard_is_local(&spec, 0).await;
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_requeues_the_shard_in_progress_uncounted() {
    let c = cluster().await;
    let spec = c.submit_steps(2000, 2000, 50).await;
    c.rabbit
        .publish_shard(&spec.shard(0), spec.priority)
        .await
        .unwrap();
    let settings = WorkerSettings {
        shutdown_grace: Duration::from_millis(500),
        ..c.settings("w1")
    };
    let w = c.spawn_worker(c.ctx.clone(), settings);
    w.shard_in_progress().await;
    // Half a second of grace, then the next batch boundary.
    w.shut_down(Duration::from_secs(120)).await;
    // Requeued for another worker, nothing written or recorded, and the
    // interrupted attempt taken back.
    c.wait_for_depth(1, Duration::from_secs(30)).await;
    assert!(!c.shard_exists(&spec, 0).await);
    let p = c.redis.get(spec.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (0, 0, 0));
    assert_eq!(c.redis.start_attempt(spec.id, 0).await.unwrap().started, 1);
    c.cleanup().await;
}
