//! The coordinator against real RabbitMQ, Redis and SeaweedFS (S3), with
//! simulated workers (a small dummy object per shard instead of the sampler,
//! which would make these tests slow): the window bounds outstanding shards,
//! a finished job gets a manifest whose digests match the objects, a failed
//! shard fails the job, and a restarted coordinator finishes a job without
//! losing or double-counting shards. Servers come from `scripts/services.sh`
//! (`make test` runs it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dig_common::job::{BatchRecord, JobId, JobSpec, JobState, Priority, ShardTask};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{
    JobProgress, ProgressStore, RedisProgress, WebhookAttempt, WebhookState,
};
use dig_common::queue::{JobStream, RabbitQueue, ShardQueue, ShardStream};
use dig_coordinator::{
    Action, Coordinator, CoordinatorError, CoordinatorSettings, Manifest, Reconciled, StateMarker,
};
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use dig_test_support::Servers;

/// The real queue, remembering every shard published through it, so that
/// tests can count outstanding shards exactly (queue depth alone misses the
/// deliveries a consumer holds).
struct CountingQueue {
    inner: Arc<RabbitQueue>,
    published: Mutex<Vec<u64>>,
    /// Every publication: job, shard, priority.
    tasks: Mutex<Vec<(JobId, u64, Priority)>>,
}

impl CountingQueue {
    fn published(&self) -> Vec<u64> {
        self.published.lock().unwrap().clone()
    }
}

#[async_trait]
impl ShardQueue for CountingQueue {
    async fn publish_shard(&self, task: &ShardTask, priority: Priority) -> dig_common::Result<()> {
        self.inner.publish_shard(task, priority).await?;
        self.published.lock().unwrap().push(task.index);
        self.tasks
            .lock()
            .unwrap()
            .push((task.job, task.index, priority));
        Ok(())
    }
    async fn publish_job(&self, job: JobId) -> dig_common::Result<()> {
        self.inner.publish_job(job).await
    }
    async fn park_shard(&self, task: &ShardTask, reason: &str) -> dig_common::Result<()> {
        self.inner.park_shard(task, reason).await
    }
    async fn consume_shards(&self, prefetch: u16) -> dig_common::Result<ShardStream> {
        self.inner.consume_shards(prefetch).await
    }
    async fn consume_jobs(&self) -> dig_common::Result<JobStream> {
        self.inner.consume_jobs().await
    }
    async fn shard_queue_depth(&self) -> dig_common::Result<u64> {
        self.inner.shard_queue_depth().await
    }
    async fn parked_depth(&self) -> dig_common::Result<u64> {
        self.inner.parked_depth().await
    }
    async fn purge_and_delete(&self) -> dig_common::Result<()> {
        self.inner.purge_and_delete().await
    }
}

struct Cluster {
    queue: Arc<CountingQueue>,
    redis: Arc<RedisProgress>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    servers: Servers,
}

async fn cluster() -> Cluster {
    let servers = Servers::fresh().await;
    Cluster {
        queue: Arc::new(CountingQueue {
            inner: servers.queue.clone(),
            published: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
        }),
        redis: servers.progress.clone(),
        store: servers.store.clone(),
        layout: servers.layout.clone(),
        servers,
    }
}

impl Cluster {
    fn coordinator(&self, window: u64) -> Coordinator {
        Coordinator::new(
            self.queue.clone(),
            self.store.clone(),
            self.layout.clone(),
            self.redis.clone(),
            CoordinatorSettings {
                window_per_job: window,
                poll_interval: Duration::from_millis(50),
                tenant_window: 16,
            },
        )
    }

    /// Stores a job's spec and its queued progress entry, as the api does.
    async fn submit(&self, num_samples: u64, shard_size: u64) -> JobSpec {
        self.submit_as("lab", Priority::Interactive, num_samples, shard_size)
            .await
    }

    async fn submit_as(
        &self,
        tenant: &str,
        priority: Priority,
        num_samples: u64,
        shard_size: u64,
    ) -> JobSpec {
        let spec = JobSpec {
            id: JobId::new(),
            tenant: tenant.into(),
            name: None,
            sequence: "MKTAYIAKQRQISFVKSHFSRQLE".into(),
            features_sha256: "0".repeat(64),
            num_samples,
            seed: 5,
            steps: Some(10),
            model: "dig-small".into(),
            priority,
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
        self.store
            .put(&self.layout.job_spec(spec.id), PutPayload::from(json))
            .await
            .unwrap();
        self.redis.create_job(&spec).await.unwrap();
        spec
    }

    async fn progress(&self, job: JobId) -> JobProgress {
        self.redis.get(job).await.unwrap().unwrap()
    }

    /// A simulated worker doing one shard: takes a delivery, writes a dummy
    /// object, records the shard done and acks. Returns the task and whether
    /// the done record was new.
    async fn work_one(&self, shards: &mut ShardStream) -> (ShardTask, bool) {
        let delivery = tokio::time::timeout(Duration::from_secs(10), shards.next())
            .await
            .expect("a shard within 10 s")
            .unwrap()
            .unwrap();
        let task = delivery.task;
        self.store
            .put(
                &self.layout.shard(task.job, task.index),
                PutPayload::from(dummy_shard(&task)),
            )
            .await
            .unwrap();
        let new = self
            .redis
            .record_shard_done(task.job, task.index, task.len())
            .await
            .unwrap();
        delivery.ack().await.unwrap();
        (task, new)
    }

    async fn manifest(&self, job: JobId) -> Option<Manifest> {
        match self.store.get(&self.layout.manifest(job)).await {
            Ok(o) => Some(serde_json::from_slice(&o.bytes().await.unwrap()).unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// Checks the manifest of a succeeded job against the objects.
    async fn check_manifest(&self, spec: &JobSpec) {
        let m = self.manifest(spec.id).await.expect("a manifest");
        assert_eq!((m.job, m.num_samples), (spec.id, spec.num_samples));
        assert_eq!(m.shards.len() as u64, spec.num_shards());
        for (i, s) in m.shards.iter().enumerate() {
            let task = spec.shard(i as u64);
            assert_eq!(
                (s.index, s.start, s.end),
                (task.index, task.start, task.end)
            );
            let key = self.layout.shard(spec.id, s.index);
            assert_eq!(s.key, key.as_ref());
            let bytes = self.store.get(&key).await.unwrap().bytes().await.unwrap();
            assert_eq!(bytes.as_ref(), dummy_shard(&task).as_slice());
            assert_eq!(s.bytes, bytes.len() as u64);
            assert_eq!(s.sha256, hex::encode(Sha256::digest(&bytes)));
        }
    }

    async fn cleanup(self) {
        self.servers.cleanup().await;
    }
}

/// Distinct bytes per shard, so that a manifest mixing shards up shows.
/// Writes a batch record as the API does.
async fn put_batch(c: &Cluster, id: JobId, jobs: Vec<JobId>, url: Option<&str>) {
    let record = BatchRecord {
        id,
        tenant: "lab-a".into(),
        name: None,
        created_at: 0,
        jobs,
        callback_url: url.map(str::to_string),
    };
    c.store
        .put(
            &c.layout.batch(id),
            PutPayload::from(serde_json::to_vec(&record).unwrap()),
        )
        .await
        .unwrap();
}

const HOOK: &str = "https://portal.example/hook";

fn dummy_shard(task: &ShardTask) -> Vec<u8> {
    format!(
        "shard {} of {} [{}, {})\n",
        task.index, task.job, task.start, task.end
    )
    .repeat(100)
    .into_bytes()
}

fn outstanding(published: &[u64], done: &BTreeSet<u64>) -> usize {
    published
        .iter()
        .collect::<BTreeSet<_>>()
        .iter()
        .filter(|i| !done.contains(i))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_three_bounds_outstanding_shards_and_the_job_gets_a_manifest() {
    let c = cluster().await;
    let spec = c.submit(28, 3).await; // 10 shards, the last of 1 sample
    assert_eq!(spec.num_shards(), 10);
    let coord = c.coordinator(3);
    coord.resume(&[spec.id]).await.unwrap();
    // Queued until its first shard is published.
    assert_eq!(c.progress(spec.id).await.state, JobState::Queued);

    let mut shards = c.queue.consume_shards(1).await.unwrap();
    let mut done = BTreeSet::new();
    for i in 0..10 {
        coord.tick().await;
        if i == 0 {
            let p = c.progress(spec.id).await;
            assert_eq!(p.state, JobState::Running);
            assert!(p.started_at.is_some());
        }
        // Exactly the window (or what is left) is outstanding after a tick.
        assert_eq!(
            outstanding(&c.queue.published(), &done),
            3.min(10 - done.len())
        );
        assert!(c.queue.shard_queue_depth().await.unwrap() <= 3);
        let (task, new) = c.work_one(&mut shards).await;
        assert!(new, "shard {} counted twice", task.index);
        done.insert(task.index);
    }
    coord.tick().await;

    let published: BTreeSet<u64> = c.queue.published().into_iter().collect();
    assert_eq!(published, (0..10).collect());
    assert_eq!(c.queue.published().len(), 10, "no shard published twice");
    let p = c.progress(spec.id).await;
    assert_eq!(p.state, JobState::Succeeded);
    assert_eq!((p.shards_done, p.samples_done), (10, 28));
    c.check_manifest(&spec).await;
    assert!(coord.active_jobs().await.is_empty());
    drop(shards);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failed_for_good_fails_the_job_without_a_manifest() {
    let c = cluster().await;
    let spec = c.submit(8, 2).await; // 4 shards
    let coord = c.coordinator(2);
    coord.resume(&[spec.id]).await.unwrap();
    coord.tick().await;
    assert_eq!(c.queue.published(), vec![0, 1]);

    let mut shards = c.queue.consume_shards(1).await.unwrap();
    c.work_one(&mut shards).await; // shard 0 done
    let delivery = tokio::time::timeout(Duration::from_secs(10), shards.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.task.index, 1);
    // As a worker does after its last attempt.
    c.queue.park_shard(&delivery.task, "boom").await.unwrap();
    c.redis
        .record_shard_failed(spec.id, 1, "boom")
        .await
        .unwrap();
    delivery.ack().await.unwrap();

    coord.tick().await;
    let p = c.progress(spec.id).await;
    assert_eq!(p.state, JobState::Failed);
    assert_eq!(p.error.as_deref(), Some("shard 1: boom"));
    assert!(c.manifest(spec.id).await.is_none());
    // The failure is also recorded in the store, for a rebuild of Redis.
    let marker = c.store.get(&c.layout.job_state(spec.id)).await.unwrap();
    let marker: StateMarker = serde_json::from_slice(&marker.bytes().await.unwrap()).unwrap();
    assert_eq!(marker.state, JobState::Failed);
    assert_eq!(marker.error.as_deref(), Some("shard 1: boom"));
    assert!(coord.active_jobs().await.is_empty());
    // Nothing more is published for the failed job.
    coord.tick().await;
    assert_eq!(c.queue.published(), vec![0, 1]);
    assert_eq!(c.queue.shard_queue_depth().await.unwrap(), 0);
    drop(shards);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_job_with_every_shard_done_once() {
    let c = cluster().await;
    let spec = c.submit(12, 2).await; // 6 shards
    let mut shards = c.queue.consume_shards(1).await.unwrap();
    let mut counted: BTreeMap<u64, u32> = BTreeMap::new();

    let first = c.coordinator(2);
    first.resume(&[spec.id]).await.unwrap();
    for _ in 0..2 {
        first.tick().await;
        let (task, new) = c.work_one(&mut shards).await;
        *counted.entry(task.index).or_default() += u32::from(new);
    }
    first.tick().await;
    // Crash mid-job with shards published and not done.
    drop(first);

    let second = c.coordinator(2);
    second.resume(&[spec.id]).await.unwrap();
    for _ in 0..50 {
        second.tick().await;
        if c.progress(spec.id).await.state.is_final() {
            break;
        }
        let (task, new) = c.work_one(&mut shards).await;
        *counted.entry(task.index).or_default() += u32::from(new);
    }

    let p = c.progress(spec.id).await;
    assert_eq!(p.state, JobState::Succeeded);
    assert_eq!((p.shards_done, p.samples_done), (6, 12));
    assert_eq!(
        c.redis.done_shards(spec.id).await.unwrap(),
        (0..6).collect::<Vec<_>>()
    );
    // Republished shards ran again, but each was counted done exactly once.
    assert_eq!(counted, (0..6).map(|i| (i, 1)).collect());
    c.check_manifest(&spec).await;
    drop(shards);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_takes_jobs_off_the_jobs_queue_and_stops_on_shutdown() {
    let c = cluster().await;
    let spec = c.submit(5, 1).await; // 5 shards
    let coord = Arc::new(c.coordinator(2));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn({
        let coord = coord.clone();
        async move { coord.run(shutdown).await }
    });
    c.queue.publish_job(spec.id).await.unwrap();

    let mut shards = c.queue.consume_shards(1).await.unwrap();
    for _ in 0..5 {
        c.work_one(&mut shards).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c.progress(spec.id).await.state.is_final() {
        assert!(tokio::time::Instant::now() < deadline, "job did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.progress(spec.id).await.state, JobState::Succeeded);
    c.check_manifest(&spec).await;

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run stops on shutdown")
        .unwrap();
    drop((shards, coord));
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_entry_vanishes_mid_run_is_rebuilt_from_the_store_and_finishes() {
    let c = cluster().await;
    let spec = c.submit(12, 2).await; // 6 shards
    let mut shards = c.queue.consume_shards(1).await.unwrap();
    let mut counted: BTreeMap<u64, u32> = BTreeMap::new();
    let coord = c.coordinator(2);
    coord.resume(&[spec.id]).await.unwrap();
    for _ in 0..2 {
        coord.tick().await;
        let (task, new) = c.work_one(&mut shards).await;
        *counted.entry(task.index).or_default() += u32::from(new);
    }

    // The job is in a batch with a webhook (and another batch has none).
    let batch = JobId::new();
    put_batch(&c, batch, vec![spec.id], Some(HOOK)).await;
    put_batch(&c, JobId::new(), vec![spec.id], None).await;
    c.redis.register_batch_webhook(batch, HOOK).await.unwrap();

    // Redis loses every key: entry, done set, unfinished index, the
    // batch's webhook and watch.
    c.redis.delete_all().await.unwrap();
    coord.tick().await;
    let p = c.progress(spec.id).await;
    assert_eq!(p.state, JobState::Running);
    assert_eq!((p.shards_done, p.samples_done), (2, 4));
    assert_eq!(c.redis.unfinished_jobs().await.unwrap(), vec![spec.id]);
    assert_eq!(coord.active_jobs().await, vec![spec.id]);
    // The batch's webhook came back with the job: pending, watched.
    let hook = c
        .redis
        .webhook(batch)
        .await
        .unwrap()
        .expect("batch webhook");
    assert_eq!(
        (hook.url.as_str(), hook.state),
        (HOOK, WebhookState::Pending)
    );
    assert_eq!(hook.delivery, batch.to_string());
    assert_eq!(c.redis.watched_batches().await.unwrap(), vec![batch]);

    for _ in 0..50 {
        coord.tick().await;
        if c.progress(spec.id).await.state.is_final() {
            break;
        }
        let (task, new) = c.work_one(&mut shards).await;
        *counted.entry(task.index).or_default() += u32::from(new);
    }
    let p = c.progress(spec.id).await;
    assert_eq!(p.state, JobState::Succeeded);
    assert_eq!((p.shards_done, p.samples_done), (6, 12));
    assert_eq!(counted, (0..6).map(|i| (i, 1)).collect());
    c.check_manifest(&spec).await;
    drop(shards);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_without_an_entry_is_rebuilt_from_its_spec_or_else_unknown() {
    let c = cluster().await;
    let spec = c.submit(4, 2).await;
    c.redis.delete_all().await.unwrap();
    let coord = c.coordinator(2);
    assert!(coord.activate(spec.id).await.unwrap());
    let p = c.progress(spec.id).await;
    assert_eq!((p.state, p.shards_done), (JobState::Running, 0));
    assert_eq!(coord.active_jobs().await, vec![spec.id]);
    // No entry and no spec: nothing to run, an error that drops the id.
    let err = coord.activate(JobId::new()).await.unwrap_err();
    assert!(matches!(err, CoordinatorError::UnknownJob(_)), "{err}");
    assert!(err.is_permanent());
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_rebuilds_each_kind_of_job_from_the_store() {
    let c = cluster().await;
    let coord = c.coordinator(10);
    let reconciler = coord.reconciler().clone();
    let mut shards = c.queue.consume_shards(1).await.unwrap();

    // Succeeded through the coordinator (manifest written).
    let succeeded = c.submit(4, 2).await;
    coord.resume(&[succeeded.id]).await.unwrap();
    coord.tick().await;
    for _ in 0..2 {
        c.work_one(&mut shards).await;
    }
    coord.tick().await;
    assert_eq!(c.progress(succeeded.id).await.state, JobState::Succeeded);

    // Cancelled (as the API does) while running: the coordinator, seeing
    // it, writes the state marker.
    let cancelled = c.submit(4, 2).await;
    coord.resume(&[cancelled.id]).await.unwrap();
    c.redis
        .set_state(cancelled.id, JobState::Cancelled, None)
        .await
        .unwrap();
    coord.tick().await;
    assert!(coord.active_jobs().await.is_empty());
    let marker = c
        .store
        .get(&c.layout.job_state(cancelled.id))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let marker: StateMarker = serde_json::from_slice(&marker).unwrap();
    assert_eq!(
        (marker.job, marker.state),
        (cancelled.id, JobState::Cancelled)
    );
    // Drain what was published for it.
    while tokio::time::timeout(Duration::from_millis(500), shards.next())
        .await
        .is_ok()
    {}

    // Every shard in the store, no manifest (the coordinator died before).
    let complete = c.submit(6, 2).await;
    // Some shards in the store, one of them never recorded done.
    let partial = c.submit(8, 2).await;
    for (spec, indices) in [(&complete, 0..3), (&partial, 1..3)] {
        for i in indices {
            let task = spec.shard(i);
            c.store
                .put(
                    &c.layout.shard(spec.id, i),
                    PutPayload::from(dummy_shard(&task)),
                )
                .await
                .unwrap();
        }
    }
    c.redis.record_shard_done(partial.id, 1, 2).await.unwrap();
    // Failed before markers existed: none in the store.
    let failed = c.submit(4, 2).await;
    c.redis
        .set_state(failed.id, JobState::Failed, Some("shard 0: boom"))
        .await
        .unwrap();

    // A dry run reports and changes nothing.
    let before_keys = c.redis.unfinished_jobs().await.unwrap();
    let dry = reconciler.reconcile_all(true).await.unwrap();
    assert_eq!(dry.len(), 5);
    assert!(c.manifest(complete.id).await.is_none());
    assert_eq!(c.redis.unfinished_jobs().await.unwrap(), before_keys);
    assert_eq!(c.redis.done_shards(partial.id).await.unwrap(), vec![1]);

    // Redis loses every entry but `partial`'s and `failed`'s.
    for spec in [&succeeded, &cancelled, &complete] {
        c.redis.delete_job(spec).await.unwrap();
    }
    let outcomes: BTreeMap<JobId, Reconciled> = reconciler
        .reconcile_all(false)
        .await
        .unwrap()
        .into_iter()
        .map(|(job, r)| (job, r.unwrap()))
        .collect();
    assert_eq!(outcomes.len(), 5);
    let r = &outcomes[&succeeded.id];
    assert_eq!(
        (r.before, r.after, r.action),
        (None, JobState::Succeeded, Action::Rebuilt)
    );
    let r = &outcomes[&cancelled.id];
    assert_eq!(
        (r.before, r.after, r.action),
        (None, JobState::Cancelled, Action::Rebuilt)
    );
    let r = &outcomes[&complete.id];
    assert_eq!((r.after, r.manifest_written), (JobState::Succeeded, true));
    let r = &outcomes[&partial.id];
    assert_eq!(
        (r.before, r.after, r.action, r.shards_recorded),
        (Some(JobState::Queued), JobState::Queued, Action::Merged, 1)
    );
    let r = &outcomes[&failed.id];
    assert_eq!((r.after, r.action), (JobState::Failed, Action::Marked));

    let p = c.progress(succeeded.id).await;
    assert_eq!(
        (p.state, p.shards_done, p.samples_done),
        (JobState::Succeeded, 2, 4)
    );
    let p = c.progress(cancelled.id).await;
    assert_eq!(p.state, JobState::Cancelled);
    let p = c.progress(complete.id).await;
    assert_eq!(
        (p.state, p.shards_done, p.samples_done),
        (JobState::Succeeded, 3, 6)
    );
    c.check_manifest(&complete).await;
    assert_eq!(c.redis.done_shards(partial.id).await.unwrap(), vec![1, 2]);
    assert_eq!(c.progress(partial.id).await.samples_done, 4);
    assert!(c.store.head(&c.layout.job_state(failed.id)).await.is_ok());
    // Only `partial` is left to run; a second pass changes nothing.
    assert_eq!(c.redis.unfinished_jobs().await.unwrap(), vec![partial.id]);
    let again = reconciler.reconcile_all(false).await.unwrap();
    assert!(again
        .iter()
        .all(|(_, r)| r.as_ref().unwrap().action == Action::None));
    drop(shards);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_gives_batches_the_webhook_redis_lost_and_nothing_else() {
    let c = cluster().await;
    let reconciler = c.coordinator(10).reconciler().clone();
    let job = c.submit(4, 2).await;
    let (lost, kept, delivered, quiet) = (JobId::new(), JobId::new(), JobId::new(), JobId::new());
    for batch in [lost, kept, delivered] {
        put_batch(&c, batch, vec![job.id], Some(HOOK)).await;
    }
    put_batch(&c, quiet, vec![job.id], None).await;
    c.redis.register_batch_webhook(kept, HOOK).await.unwrap();
    c.redis
        .register_batch_webhook(delivered, HOOK)
        .await
        .unwrap();
    c.redis.batch_ended(delivered).await.unwrap();
    c.redis
        .record_webhook_attempt(delivered, WebhookAttempt::Delivered)
        .await
        .unwrap();

    // A dry run names the batch and changes nothing.
    assert_eq!(
        reconciler.reconcile_batches(true).await.unwrap(),
        vec![lost]
    );
    assert!(c.redis.webhook(lost).await.unwrap().is_none());
    assert_eq!(
        reconciler.reconcile_batches(false).await.unwrap(),
        vec![lost]
    );
    let hook = c.redis.webhook(lost).await.unwrap().expect("restored");
    assert_eq!(
        (hook.url.as_str(), hook.state, hook.attempts),
        (HOOK, WebhookState::Pending, 0)
    );
    let mut watched = c.redis.watched_batches().await.unwrap();
    watched.sort();
    let mut expected = vec![lost, kept];
    expected.sort();
    assert_eq!(watched, expected);
    // A delivered webhook stays delivered; a batch without one gets none.
    assert_eq!(
        c.redis.webhook(delivered).await.unwrap().unwrap().state,
        WebhookState::Delivered
    );
    assert!(c.redis.webhook(quiet).await.unwrap().is_none());
    assert_eq!(reconciler.reconcile_batches(false).await.unwrap(), vec![]);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_bounds_each_tenant_and_serves_interactive_jobs_first() {
    let c = cluster().await;
    // Lab A: 6 bulk jobs of 4 shards; lab B: one bulk job; then lab A's
    // interactive job, submitted last.
    let mut a_bulk = Vec::new();
    for _ in 0..6 {
        a_bulk.push(c.submit_as("lab-a", Priority::Bulk, 8, 2).await);
    }
    let b_bulk = c.submit_as("lab-b", Priority::Bulk, 8, 2).await;
    let a_live = c.submit_as("lab-a", Priority::Interactive, 4, 2).await;
    // Window 3 per job, tenant window 16 (no live workers to raise it).
    let coord = c.coordinator(3);
    let mut ids: Vec<JobId> = a_bulk.iter().map(|s| s.id).collect();
    ids.extend([b_bulk.id, a_live.id]);
    coord.resume(&ids).await.unwrap();
    coord.tick().await;

    let tasks = c.queue.tasks.lock().unwrap().clone();
    let count =
        |pred: &dyn Fn(&(JobId, u64, Priority)) -> bool| tasks.iter().filter(|t| pred(t)).count();
    // The interactive job first, whole (2 shards, within its window).
    assert_eq!(
        &tasks[..2],
        &[
            (a_live.id, 0, Priority::Interactive),
            (a_live.id, 1, Priority::Interactive)
        ]
    );
    // Lab A's bulk work is capped at the tenant window: 16 of its 24 shards,
    // oldest jobs first (window 3 each: 3+3+3+3+3+1).
    let a_ids: BTreeSet<JobId> = a_bulk.iter().map(|s| s.id).collect();
    assert_eq!(count(&|t| a_ids.contains(&t.0)), 16);
    let per_job: Vec<usize> = a_bulk.iter().map(|s| count(&|t| t.0 == s.id)).collect();
    assert_eq!(per_job, vec![3, 3, 3, 3, 3, 1]);
    // Lab B, submitted after all of them, is not starved: its window is out.
    assert_eq!(count(&|t| t.0 == b_bulk.id), 3);
    // Jobs that got no shard are still queued; the others run.
    assert_eq!(c.progress(a_bulk[5].id).await.state, JobState::Running);
    assert_eq!(c.progress(b_bulk.id).await.state, JobState::Running);
    assert_eq!(tasks.len(), 2 + 16 + 3);

    // Nothing done yet: another tick publishes nothing more.
    coord.tick().await;
    assert_eq!(c.queue.tasks.lock().unwrap().len(), 21);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_job_beyond_the_tenant_window_stays_queued() {
    let c = cluster().await;
    let first = c.submit_as("lab-a", Priority::Bulk, 40, 2).await; // 20 shards
    let second = c.submit_as("lab-a", Priority::Bulk, 4, 2).await;
    let coord = Coordinator::new(
        c.queue.clone(),
        c.store.clone(),
        c.layout.clone(),
        c.redis.clone(),
        CoordinatorSettings {
            window_per_job: 20,
            poll_interval: Duration::from_millis(50),
            tenant_window: 5,
        },
    );
    coord.resume(&[first.id, second.id]).await.unwrap();
    coord.tick().await;
    let tasks = c.queue.tasks.lock().unwrap().clone();
    assert_eq!(tasks.len(), 5);
    assert!(tasks.iter().all(|t| t.0 == first.id));
    assert_eq!(c.progress(second.id).await.state, JobState::Queued);
    c.cleanup().await;
}
