//! Behaviour of `ProgressStore`: every case runs against both
//! `MemoryProgress` and `RedisProgress` (the Redis of `DIG_TEST_REDIS`, under
//! a fresh `test-{uuid}` prefix that is deleted afterwards), so the embedded
//! mode and the cluster cannot drift apart.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use dig_common::job::{FilterCriteria, JobId, JobSpec, JobState, Priority, SampleFilter, Solver};
use dig_common::progress::{
    now_ms, LimitExceeded, MemoryProgress, ProgressStore, RedisProgress, ShardAttempts, TenantCaps,
    TenantUsage, WebhookAttempt, WebhookClaim, WebhookState, WebhookStatus, WorkerHeartbeat,
};
use dig_common::CommonError;
use futures::FutureExt;

type Store = Arc<dyn ProgressStore>;

fn spec(tenant: &str, num_samples: u64, shard_size: u64, created_at: u64) -> JobSpec {
    JobSpec {
        id: JobId::new(),
        tenant: tenant.into(),
        name: None,
        sequence: "MKV".into(),
        features_sha256: "0".repeat(64),
        num_samples,
        seed: 7,
        steps: None,
        model: "m".into(),
        priority: Priority::Interactive,
        shard_size,
        created_at,
        callback_url: None,
        solver: Default::default(),
        filter: None,
        steering: None,
        log_density: false,
        from_structure: None,
        flow_above: None,
    }
}

async fn with_memory<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    case(Arc::new(MemoryProgress::new())).await;
}

async fn with_redis<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = std::env::var("DIG_TEST_REDIS")
        .expect("DIG_TEST_REDIS unset: run scripts/services.sh (make test does)");
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let store: Store = Arc::new(
        RedisProgress::connect(&url, &prefix)
            .await
            .expect("connect to DIG_TEST_REDIS"),
    );
    // Clean up even when the case fails, then fail with its panic.
    let outcome = AssertUnwindSafe(case(store.clone())).catch_unwind().await;
    store.delete_all().await.expect("delete_all");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One `#[tokio::test]` per implementation for each behaviour.
macro_rules! behaviours {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_memory(super::$name).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_redis(super::$name).await;
                }
            )*
        }
    };
}

behaviours!(
    created_job_is_queued_with_its_spec_counters,
    unknown_job_is_none_and_updates_are_not_found,
    creating_an_existing_job_again_keeps_its_progress,
    shard_done_twice_counts_once,
    shard_index_out_of_range_is_invalid,
    concurrent_shard_reports_give_exact_totals,
    running_sets_started_at_and_final_sets_finished_at,
    final_state_is_not_overwritten,
    attempts_count_up_per_shard,
    reported_failures_are_counted_apart_from_deaths,
    forgiven_attempts_count_down_not_below_zero,
    shard_failure_counts_once_and_keeps_first_error,
    list_jobs_pages_newest_first_within_tenant,
    list_jobs_rejects_unknown_cursor,
    idempotency_key_returns_first_job,
    heartbeats_are_listed_and_expire,
    rebuild_from_done_restores_counters_after_flush,
    rebuild_with_every_shard_done_is_succeeded,
    rebuild_with_state_keeps_the_given_final_state,
    delete_all_forgets_everything,
    unfinished_jobs_are_every_tenants_jobs_not_final,
    delete_job_undoes_a_creation,
    released_idempotency_key_binds_again,
    tenant_caps_are_checked_with_the_creation,
    a_batch_is_created_whole_within_the_caps_or_not_at_all,
    final_states_and_done_samples_free_tenant_usage,
    webhooks_become_due_when_final_and_are_claimed_once,
    webhook_attempts_are_recorded_until_delivered_or_given_up,
    delete_job_forgets_usage_and_webhook,
    rebuild_recreates_a_lost_webhook_and_usage,
    jobs_are_counted_by_state_across_tenants,
    batch_webhooks_are_watched_then_due_once_and_forgettable,
    valid_counts_and_sampling_settings_are_kept,
);

async fn valid_counts_and_sampling_settings_are_kept(store: Store) {
    let mut s = spec("acme", 10, 4, 100);
    s.steps = Some(50);
    s.solver = Solver::Heun;
    s.filter = Some(SampleFilter {
        criteria: FilterCriteria::Physical,
        max_draw_factor: 2,
    });
    store.create_job(&s).await.unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(
        (p.solver, p.steps, p.filter, p.samples_valid),
        (Solver::Heun, Some(50), s.filter, Some(0))
    );
    // The draw limit (20) makes 5 shards, the last ones drawn on demand.
    assert_eq!(p.num_shards, 5);
    assert!(store.record_shard(s.id, 0, 4, Some(3)).await.unwrap());
    assert!(!store.record_shard(s.id, 0, 4, Some(3)).await.unwrap());
    assert!(store.record_shard(s.id, 4, 4, Some(1)).await.unwrap());
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!((p.samples_done, p.samples_valid), (8, Some(4)));
    // A shard recorded without its count leaves the count as it was.
    assert!(store.record_shard_done(s.id, 1, 4).await.unwrap());
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!((p.samples_done, p.samples_valid), (12, Some(4)));
    // A rebuilt entry keeps the settings.
    store.rebuild_from_done(&s, &[0, 1]).await.unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(
        (p.solver, p.steps, p.filter),
        (Solver::Heun, Some(50), s.filter)
    );
}

async fn delete_job_undoes_a_creation(store: Store) {
    let keep = spec("acme", 10, 5, 100);
    let s = spec("acme", 10, 5, 101);
    store.create_job(&keep).await.unwrap();
    store.create_job(&s).await.unwrap();
    store.start_attempt(s.id, 0).await.unwrap();
    store.record_shard_done(s.id, 1, 5).await.unwrap();
    store.delete_job(&s).await.unwrap();
    assert_eq!(store.get(s.id).await.unwrap(), None);
    assert_eq!(store.done_shards(s.id).await.unwrap(), Vec::<u64>::new());
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 1);
    assert_eq!(
        store.list_jobs("acme", 10, None).await.unwrap(),
        vec![keep.id]
    );
    assert_eq!(store.unfinished_jobs().await.unwrap(), vec![keep.id]);
}

async fn released_idempotency_key_binds_again(store: Store) {
    let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
    assert_eq!(store.idempotent_job("acme", "k", a).await.unwrap(), a);
    // Releasing on behalf of another job changes nothing.
    store.release_idempotency("acme", "k", b).await.unwrap();
    assert_eq!(store.idempotent_job("acme", "k", b).await.unwrap(), a);
    store.release_idempotency("acme", "k", a).await.unwrap();
    assert_eq!(store.idempotent_job("acme", "k", c).await.unwrap(), c);
}

async fn unfinished_jobs_are_every_tenants_jobs_not_final(store: Store) {
    let a = spec("acme", 10, 10, 100);
    let b = spec("other", 10, 10, 101);
    let c = spec("acme", 10, 10, 102);
    for s in [&a, &b, &c] {
        store.create_job(s).await.unwrap();
    }
    let mut all = vec![a.id, b.id, c.id];
    all.sort();
    assert_eq!(store.unfinished_jobs().await.unwrap(), all);
    store
        .set_state(a.id, JobState::Running, None)
        .await
        .unwrap();
    store
        .set_state(b.id, JobState::Cancelled, None)
        .await
        .unwrap();
    store
        .set_state(c.id, JobState::Failed, Some("x"))
        .await
        .unwrap();
    assert_eq!(store.unfinished_jobs().await.unwrap(), vec![a.id]);
    // A final job stays out even if someone tries to revive it.
    store
        .set_state(b.id, JobState::Running, None)
        .await
        .unwrap();
    assert_eq!(store.unfinished_jobs().await.unwrap(), vec![a.id]);
    // Rebuilt after a flush: in while shards are missing, out when all done.
    store.delete_all().await.unwrap();
    assert_eq!(store.unfinished_jobs().await.unwrap(), Vec::<JobId>::new());
    store.rebuild_from_done(&a, &[]).await.unwrap();
    store.rebuild_from_done(&b, &[0]).await.unwrap();
    assert_eq!(store.unfinished_jobs().await.unwrap(), vec![a.id]);
}

async fn created_job_is_queued_with_its_spec_counters(store: Store) {
    let s = spec("acme", 1003, 100, 1_700_000_000);
    store.create_job(&s).await.unwrap();
    let p = store.get(s.id).await.unwrap().expect("job exists");
    assert_eq!(p.state, JobState::Queued);
    assert_eq!(p.tenant, "acme");
    assert_eq!(p.num_shards, 11);
    assert_eq!(p.num_samples, 1003);
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (0, 0, 0));
    assert_eq!(p.error, None);
    assert_eq!(p.created_at, 1_700_000_000);
    assert_eq!((p.started_at, p.finished_at), (None, None));
    assert_eq!(store.done_shards(s.id).await.unwrap(), Vec::<u64>::new());
    assert_eq!(store.list_jobs("acme", 10, None).await.unwrap(), vec![s.id]);
}

async fn unknown_job_is_none_and_updates_are_not_found(store: Store) {
    let job = JobId::new();
    assert_eq!(store.get(job).await.unwrap(), None);
    assert!(matches!(
        store.set_state(job, JobState::Running, None).await,
        Err(CommonError::NotFound(_))
    ));
    assert!(matches!(
        store.record_shard_done(job, 0, 1).await,
        Err(CommonError::NotFound(_))
    ));
    assert!(matches!(
        store.record_shard_failed(job, 0, "x").await,
        Err(CommonError::NotFound(_))
    ));
    // Nothing was created as a side effect.
    assert_eq!(store.get(job).await.unwrap(), None);
    assert_eq!(store.done_shards(job).await.unwrap(), Vec::<u64>::new());
}

async fn creating_an_existing_job_again_keeps_its_progress(store: Store) {
    let s = spec("acme", 40, 10, 100);
    store.create_job(&s).await.unwrap();
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    store.record_shard_done(s.id, 1, 10).await.unwrap();
    store.create_job(&s).await.unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Running);
    assert_eq!((p.shards_done, p.samples_done), (1, 10));
}

async fn shard_done_twice_counts_once(store: Store) {
    let s = spec("acme", 1003, 100, 100);
    store.create_job(&s).await.unwrap();
    assert!(store.record_shard_done(s.id, 10, 3).await.unwrap());
    assert!(!store.record_shard_done(s.id, 10, 3).await.unwrap());
    assert!(store.record_shard_done(s.id, 2, 100).await.unwrap());
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.shards_done, 2);
    assert_eq!(p.samples_done, 103);
    assert_eq!(store.done_shards(s.id).await.unwrap(), vec![2, 10]);
}

async fn shard_index_out_of_range_is_invalid(store: Store) {
    let s = spec("acme", 30, 10, 100);
    store.create_job(&s).await.unwrap();
    assert!(matches!(
        store.record_shard_done(s.id, 3, 10).await,
        Err(CommonError::Invalid(_))
    ));
    assert!(matches!(
        store.record_shard_failed(s.id, 3, "x").await,
        Err(CommonError::Invalid(_))
    ));
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!((p.shards_done, p.samples_done, p.shards_failed), (0, 0, 0));
}

async fn concurrent_shard_reports_give_exact_totals(store: Store) {
    // 100 shards of 7 samples; 10 tasks each report every shard (in a
    // different order), as if each shard were redelivered 10 times.
    let s = spec("acme", 700, 7, 100);
    store.create_job(&s).await.unwrap();
    let tasks: Vec<_> = (0..10u64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut counted = 0u64;
                for i in 0..100u64 {
                    let shard = (i * 37 + t * 11) % 100;
                    if store.record_shard_done(s.id, shard, 7).await.unwrap() {
                        counted += 1;
                    }
                }
                counted
            })
        })
        .collect();
    let mut counted = 0;
    for task in tasks {
        counted += task.await.unwrap();
    }
    assert_eq!(counted, 100, "each shard counted by exactly one report");
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.shards_done, 100);
    assert_eq!(p.samples_done, 700);
    assert_eq!(
        store.done_shards(s.id).await.unwrap(),
        (0..100).collect::<Vec<u64>>()
    );
}

async fn running_sets_started_at_and_final_sets_finished_at(store: Store) {
    let s = spec("acme", 10, 10, 100);
    store.create_job(&s).await.unwrap();
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    let running = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(running.state, JobState::Running);
    let started = running.started_at.expect("started_at set");
    assert!(started >= 1_700_000_000, "unix seconds, got {started}");
    assert_eq!(running.finished_at, None);
    store
        .set_state(s.id, JobState::Failed, Some("shard 0: out of memory"))
        .await
        .unwrap();
    let failed = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.started_at, Some(started));
    assert!(failed.finished_at.unwrap() >= started);
    assert_eq!(failed.error.as_deref(), Some("shard 0: out of memory"));
}

async fn final_state_is_not_overwritten(store: Store) {
    let s = spec("acme", 10, 10, 100);
    store.create_job(&s).await.unwrap();
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    store
        .set_state(s.id, JobState::Cancelled, None)
        .await
        .unwrap();
    let cancelled = store.get(s.id).await.unwrap().unwrap();
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    store
        .set_state(s.id, JobState::Queued, Some("late"))
        .await
        .unwrap();
    store
        .set_state(s.id, JobState::Succeeded, None)
        .await
        .unwrap();
    let after = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Cancelled);
    assert_eq!(after, cancelled);
}

async fn attempts_count_up_per_shard(store: Store) {
    let s = spec("acme", 30, 10, 100);
    store.create_job(&s).await.unwrap();
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap().started, 1);
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap().started, 2);
    assert_eq!(store.start_attempt(s.id, 2).await.unwrap().started, 1);
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap().started, 3);
}

async fn reported_failures_are_counted_apart_from_deaths(store: Store) {
    let s = spec("acme", 30, 10, 100);
    store.create_job(&s).await.unwrap();
    let a = |started, failed| ShardAttempts { started, failed };
    // First delivery: nothing before it.
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap(), a(1, 0));
    assert_eq!(store.record_attempt_failed(s.id, 0).await.unwrap(), 1);
    // Second: the first reported its failure, so no death.
    let second = store.start_attempt(s.id, 0).await.unwrap();
    assert_eq!((second, second.deaths()), (a(2, 1), 0));
    // Its worker dies; the third and fourth die as well.
    store.start_attempt(s.id, 0).await.unwrap();
    store.start_attempt(s.id, 0).await.unwrap();
    let fifth = store.start_attempt(s.id, 0).await.unwrap();
    assert_eq!((fifth, fifth.deaths()), (a(5, 1), 3));
    // A forgiven start (transient failure, shutdown) is neither.
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 4);
    assert_eq!(store.record_attempt_failed(s.id, 0).await.unwrap(), 2);
    let next = store.start_attempt(s.id, 0).await.unwrap();
    assert_eq!((next, next.deaths()), (a(5, 2), 2));
    // Other shards have their own counts.
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap(), a(1, 0));
}

async fn forgiven_attempts_count_down_not_below_zero(store: Store) {
    let s = spec("acme", 30, 10, 100);
    store.create_job(&s).await.unwrap();
    // Nothing to forgive: no counter appears.
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 0);
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 1);
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 2);
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap().started, 1);
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 1);
    // The next attempt is the second again; other shards are untouched.
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 2);
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 1);
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 0);
    assert_eq!(store.forgive_attempt(s.id, 0).await.unwrap(), 0);
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 1);
    assert_eq!(store.start_attempt(s.id, 1).await.unwrap().started, 2);
}

async fn shard_failure_counts_once_and_keeps_first_error(store: Store) {
    let s = spec("acme", 50, 10, 100);
    store.create_job(&s).await.unwrap();
    store
        .record_shard_failed(s.id, 3, "CUDA out of memory")
        .await
        .unwrap();
    store
        .record_shard_failed(s.id, 3, "CUDA out of memory")
        .await
        .unwrap();
    store
        .record_shard_failed(s.id, 4, "NaN in coordinates")
        .await
        .unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.shards_failed, 2);
    assert_eq!(p.error.as_deref(), Some("shard 3: CUDA out of memory"));
    assert_eq!(
        p.state,
        JobState::Queued,
        "the coordinator decides the job's fate"
    );
}

async fn list_jobs_pages_newest_first_within_tenant(store: Store) {
    // Pairs share a creation second, so ties must be broken by id too.
    let mut specs: Vec<JobSpec> = (0..5).map(|i| spec("acme", 10, 10, 1000 + i / 2)).collect();
    for s in &specs {
        store.create_job(s).await.unwrap();
    }
    for i in 0..2 {
        store
            .create_job(&spec("globex", 10, 10, 2000 + i))
            .await
            .unwrap();
    }
    specs.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));
    let newest_first: Vec<JobId> = specs.iter().map(|s| s.id).collect();

    let page1 = store.list_jobs("acme", 3, None).await.unwrap();
    assert_eq!(page1, newest_first[..3]);
    let page2 = store.list_jobs("acme", 3, Some(page1[2])).await.unwrap();
    assert_eq!(page2, newest_first[3..]);
    assert_eq!(
        store.list_jobs("acme", 3, Some(page2[1])).await.unwrap(),
        Vec::<JobId>::new()
    );
    assert_eq!(
        store.list_jobs("acme", 0, None).await.unwrap(),
        Vec::<JobId>::new()
    );

    let globex = store.list_jobs("globex", 10, None).await.unwrap();
    assert_eq!(globex.len(), 2);
    assert!(
        globex.iter().all(|id| !newest_first.contains(id)),
        "no other tenant's jobs"
    );
    assert_eq!(
        store.list_jobs("initech", 10, None).await.unwrap(),
        Vec::<JobId>::new()
    );
}

async fn list_jobs_rejects_unknown_cursor(store: Store) {
    let a = spec("acme", 10, 10, 100);
    let b = spec("globex", 10, 10, 100);
    store.create_job(&a).await.unwrap();
    store.create_job(&b).await.unwrap();
    assert!(matches!(
        store.list_jobs("acme", 10, Some(b.id)).await,
        Err(CommonError::Invalid(_))
    ));
    assert!(matches!(
        store.list_jobs("initech", 10, Some(a.id)).await,
        Err(CommonError::Invalid(_))
    ));
}

async fn idempotency_key_returns_first_job(store: Store) {
    let (first, second) = (JobId::new(), JobId::new());
    assert_eq!(
        store.idempotent_job("acme", "key-1", first).await.unwrap(),
        first
    );
    assert_eq!(
        store.idempotent_job("acme", "key-1", second).await.unwrap(),
        first
    );
    // Keys are per tenant, and other keys are free.
    assert_eq!(
        store
            .idempotent_job("globex", "key-1", second)
            .await
            .unwrap(),
        second
    );
    assert_eq!(
        store.idempotent_job("acme", "key-2", second).await.unwrap(),
        second
    );
}

async fn heartbeats_are_listed_and_expire(store: Store) {
    let gpu = WorkerHeartbeat {
        id: "w-gpu".into(),
        device: "cuda:0".into(),
        shard: Some(format!("{}/3", JobId::new())),
        samples_per_sec: 12.5,
        at: 1_700_000_000,
    };
    let cpu = WorkerHeartbeat {
        id: "w-cpu".into(),
        device: "cpu".into(),
        shard: None,
        samples_per_sec: 0.25,
        at: 1_700_000_001,
    };
    store.heartbeat(&gpu.id, &gpu, 1).await.unwrap();
    store.heartbeat(&cpu.id, &cpu, 30).await.unwrap();
    assert_eq!(
        store.workers().await.unwrap(),
        vec![cpu.clone(), gpu.clone()]
    );

    // A new beat replaces the old one entirely (the shard is gone).
    let idle = WorkerHeartbeat {
        shard: None,
        at: gpu.at + 1,
        ..gpu.clone()
    };
    store.heartbeat(&idle.id, &idle, 1).await.unwrap();
    assert_eq!(store.workers().await.unwrap(), vec![cpu.clone(), idle]);

    // The expiry is the point: the 1 s beat's TTL runs out, the 30 s one's not.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(store.workers().await.unwrap(), vec![cpu]);
    assert!(matches!(
        store.heartbeat("w", &gpu, 0).await,
        Err(CommonError::Invalid(_))
    ));
}

async fn rebuild_from_done_restores_counters_after_flush(store: Store) {
    let s = spec("acme", 1003, 100, 100);
    store.create_job(&s).await.unwrap();
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    for shard in [0, 3, 10] {
        store
            .record_shard_done(s.id, shard, s.shard(shard).len())
            .await
            .unwrap();
    }
    let before = store.get(s.id).await.unwrap().unwrap();
    let done = store.done_shards(s.id).await.unwrap();

    store.delete_all().await.unwrap(); // Redis lost everything
    assert_eq!(store.get(s.id).await.unwrap(), None);

    // The object store lists the finished shards, in any order, maybe twice.
    store.rebuild_from_done(&s, &[10, 0, 3, 0]).await.unwrap();
    let after = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Running);
    assert_eq!((after.shards_done, after.samples_done), (3, 203));
    assert_eq!(
        (after.shards_done, after.samples_done),
        (before.shards_done, before.samples_done)
    );
    assert_eq!(
        (after.num_shards, after.num_samples),
        (before.num_shards, before.num_samples)
    );
    assert_eq!(
        (&after.tenant, after.created_at),
        (&before.tenant, before.created_at)
    );
    assert_eq!(after.finished_at, None);
    assert_eq!(store.done_shards(s.id).await.unwrap(), done);
    assert_eq!(store.list_jobs("acme", 10, None).await.unwrap(), vec![s.id]);

    // And redelivered shards still count once.
    assert!(!store.record_shard_done(s.id, 3, 100).await.unwrap());
    assert!(store.record_shard_done(s.id, 4, 100).await.unwrap());
    assert_eq!(store.get(s.id).await.unwrap().unwrap().samples_done, 303);
}

async fn rebuild_with_every_shard_done_is_succeeded(store: Store) {
    let s = spec("acme", 1003, 100, 100);
    store
        .rebuild_from_done(&s, &(0..11).collect::<Vec<u64>>())
        .await
        .unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Succeeded);
    assert_eq!((p.shards_done, p.samples_done), (11, 1003));
    assert!(p.finished_at.is_some());
    assert!(matches!(
        store.rebuild_from_done(&s, &[11]).await,
        Err(CommonError::Invalid(_))
    ));
}

async fn rebuild_with_state_keeps_the_given_final_state(store: Store) {
    // A cancelled job whose every shard had finished: not succeeded (it has
    // no manifest), and not unfinished.
    let s = spec("acme", 30, 10, 100);
    let all: Vec<u64> = (0..3).collect();
    store
        .rebuild_with_state(&s, &all, JobState::Cancelled, None, None)
        .await
        .unwrap();
    let p = store.get(s.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Cancelled);
    assert_eq!(p.samples_valid, None);
    assert_eq!((p.shards_done, p.samples_done), (3, 30));
    assert!(p.finished_at.is_some());
    assert_eq!(p.error, None);
    assert!(!store.unfinished_jobs().await.unwrap().contains(&s.id));
    assert_eq!(store.list_jobs("acme", 10, None).await.unwrap(), vec![s.id]);
    // Final is terminal, as after any other way there.
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    assert_eq!(
        store.get(s.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );

    // A failed one keeps its error; a running one is unfinished.
    let f = spec("acme", 30, 10, 101);
    store
        .rebuild_with_state(&f, &[1], JobState::Failed, Some("shard 0: boom"), Some(7))
        .await
        .unwrap();
    let p = store.get(f.id).await.unwrap().unwrap();
    assert_eq!(p.state, JobState::Failed);
    assert_eq!(p.error.as_deref(), Some("shard 0: boom"));
    assert_eq!(
        (p.shards_done, p.samples_done, p.samples_valid),
        (1, 10, Some(7))
    );
    let r = spec("acme", 30, 10, 102);
    store
        .rebuild_with_state(&r, &all, JobState::Running, None, None)
        .await
        .unwrap();
    let p = store.get(r.id).await.unwrap().unwrap();
    assert_eq!((p.state, p.finished_at), (JobState::Running, None));
    let unfinished = store.unfinished_jobs().await.unwrap();
    assert!(unfinished.contains(&r.id) && !unfinished.contains(&f.id));
}

async fn delete_all_forgets_everything(store: Store) {
    let s = spec("acme", 10, 10, 100);
    store.create_job(&s).await.unwrap();
    store.start_attempt(s.id, 0).await.unwrap();
    store.idempotent_job("acme", "k", s.id).await.unwrap();
    let beat = WorkerHeartbeat {
        id: "w".into(),
        device: "cpu".into(),
        shard: None,
        samples_per_sec: 1.0,
        at: 1,
    };
    store.heartbeat("w", &beat, 60).await.unwrap();
    store.delete_all().await.unwrap();
    assert_eq!(store.get(s.id).await.unwrap(), None);
    assert_eq!(
        store.list_jobs("acme", 10, None).await.unwrap(),
        Vec::<JobId>::new()
    );
    assert_eq!(store.workers().await.unwrap(), Vec::new());
    assert_eq!(store.start_attempt(s.id, 0).await.unwrap().started, 1);
    let other = JobId::new();
    assert_eq!(
        store.idempotent_job("acme", "k", other).await.unwrap(),
        other
    );
}

#[tokio::test]
async fn redis_unreachable_is_an_error_not_a_panic() {
    // Port 1 is never Redis; connect must give up with an error.
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        RedisProgress::connect("redis://127.0.0.1:1/", "test-unreachable"),
    )
    .await
    .expect("connect gives up in time");
    assert!(matches!(result, Err(CommonError::Progress(_))));
}

// ------------------------------------------------------------ tenant limits

fn caps(max_jobs: u64, max_queued_samples: u64) -> TenantCaps {
    TenantCaps {
        max_jobs,
        max_queued_samples,
    }
}

fn usage(unfinished_jobs: u64, queued_samples: u64) -> TenantUsage {
    TenantUsage {
        unfinished_jobs,
        queued_samples,
    }
}

async fn tenant_caps_are_checked_with_the_creation(store: Store) {
    let c = caps(2, 25);
    let a = spec("acme", 10, 5, 100);
    assert_eq!(store.create_job_within(&a, c).await.unwrap(), None);
    // Creating it again is no new job, whatever the caps.
    assert_eq!(store.create_job_within(&a, caps(0, 0)).await.unwrap(), None);
    let big = spec("acme", 16, 4, 101);
    assert_eq!(
        store.create_job_within(&big, c).await.unwrap(),
        Some(LimitExceeded::Samples {
            queued: 10,
            requested: 16,
            limit: 25
        })
    );
    assert_eq!(store.get(big.id).await.unwrap(), None);
    let b = spec("acme", 15, 5, 102);
    assert_eq!(store.create_job_within(&b, c).await.unwrap(), None);
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(2, 25));
    let third = spec("acme", 1, 1, 103);
    assert_eq!(
        store.create_job_within(&third, c).await.unwrap(),
        Some(LimitExceeded::Jobs {
            unfinished: 2,
            limit: 2
        })
    );
    assert_eq!(store.get(third.id).await.unwrap(), None);
    assert_eq!(
        store.list_jobs("acme", 10, None).await.unwrap(),
        vec![b.id, a.id]
    );
    // Other tenants are counted apart; plain creation ignores caps.
    assert_eq!(store.tenant_usage("other").await.unwrap(), usage(0, 0));
    store.create_job(&third).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(3, 26));

    // Concurrent creations never overshoot.
    let tenant = "race";
    let tries: Vec<_> = (0..12)
        .map(|i| {
            let (store, s) = (store.clone(), spec(tenant, 5, 5, 200 + i));
            tokio::spawn(async move { store.create_job_within(&s, caps(4, 1000)).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for t in tries {
        if t.await.unwrap().is_none() {
            created += 1;
        }
    }
    assert_eq!(created, 4);
    assert_eq!(store.tenant_usage(tenant).await.unwrap(), usage(4, 20));
}

async fn a_batch_is_created_whole_within_the_caps_or_not_at_all(store: Store) {
    let c = caps(5, 100);
    let single = spec("acme", 10, 5, 100);
    store.create_job(&single).await.unwrap();
    // Five more jobs would make six: refused, nothing created.
    let five: Vec<JobSpec> = (0..5).map(|i| spec("acme", 2, 1, 110 + i)).collect();
    assert_eq!(
        store.create_jobs_within(&five, c).await.unwrap(),
        Some(LimitExceeded::Jobs {
            unfinished: 1,
            limit: 5
        })
    );
    for s in &five {
        assert_eq!(store.get(s.id).await.unwrap(), None);
    }
    // 10 + 4 x 23 = 102 samples: refused by the sample cap.
    let heavy: Vec<JobSpec> = (0..4).map(|i| spec("acme", 23, 5, 120 + i)).collect();
    assert_eq!(
        store.create_jobs_within(&heavy, c).await.unwrap(),
        Some(LimitExceeded::Samples {
            queued: 10,
            requested: 92,
            limit: 100
        })
    );
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(1, 10));
    // Four fit; each entry as create_job makes it, listed in creation order.
    let four = &five[..4];
    assert_eq!(store.create_jobs_within(four, c).await.unwrap(), None);
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(5, 18));
    for s in four {
        let p = store.get(s.id).await.unwrap().unwrap();
        assert_eq!(
            (
                p.state,
                p.num_samples,
                p.num_shards,
                p.samples_done,
                p.created_at
            ),
            (JobState::Queued, 2, 2, 0, s.created_at)
        );
    }
    let listed = store.list_jobs("acme", 10, None).await.unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[0], four[3].id);
    assert_eq!(listed[4], single.id);
    // The same batch again (a retried submission): nothing new, not counted twice.
    assert_eq!(store.create_jobs_within(four, c).await.unwrap(), None);
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(5, 18));

    // Single submissions racing with batches never pass the cap together.
    let tenant = "race";
    let mut tries = Vec::new();
    for i in 0..6u64 {
        let batch_store = store.clone();
        let batch: Vec<JobSpec> = (0..3)
            .map(|k| spec(tenant, 1, 1, 300 + 10 * i + k))
            .collect();
        tries.push(tokio::spawn(async move {
            let n = batch.len() as u64;
            match batch_store
                .create_jobs_within(&batch, caps(7, 1000))
                .await
                .unwrap()
            {
                None => n,
                Some(_) => 0,
            }
        }));
        let (store, s) = (store.clone(), spec(tenant, 1, 1, 400 + i));
        tries.push(tokio::spawn(async move {
            match store.create_job_within(&s, caps(7, 1000)).await.unwrap() {
                None => 1,
                Some(_) => 0,
            }
        }));
    }
    let mut created = 0;
    for t in tries {
        created += t.await.unwrap();
    }
    let used = store.tenant_usage(tenant).await.unwrap();
    assert_eq!(used.unfinished_jobs, created);
    // A single is refused only at 7 unfinished, so the six singles alone
    // make at least 6.
    assert!((6..=7).contains(&created), "{created} jobs created");
}

async fn final_states_and_done_samples_free_tenant_usage(store: Store) {
    let a = spec("acme", 10, 5, 100);
    let b = spec("acme", 20, 5, 101);
    store.create_job(&a).await.unwrap();
    store.create_job(&b).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(2, 30));
    store
        .set_state(b.id, JobState::Running, None)
        .await
        .unwrap();
    store.record_shard_done(b.id, 1, 5).await.unwrap();
    store.record_shard_done(b.id, 1, 5).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(2, 25));
    store
        .set_state(a.id, JobState::Cancelled, None)
        .await
        .unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(1, 15));
    // A shard finishing after the end changes nothing.
    store.record_shard_done(a.id, 0, 5).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(1, 15));
    store.set_state(b.id, JobState::Failed, None).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(0, 0));
}

// ------------------------------------------------------------ webhooks

fn hooked(tenant: &str, url: &str) -> JobSpec {
    JobSpec {
        callback_url: Some(url.into()),
        ..spec(tenant, 10, 5, 100)
    }
}

async fn webhooks_become_due_when_final_and_are_claimed_once(store: Store) {
    let s = hooked("acme", "https://acme.example.org/hook");
    store.create_job(&s).await.unwrap();
    let plain = spec("acme", 10, 5, 100);
    store.create_job(&plain).await.unwrap();
    assert_eq!(store.webhook(plain.id).await.unwrap(), None);
    let w = store.webhook(s.id).await.unwrap().unwrap();
    assert_eq!(
        w,
        WebhookStatus {
            url: "https://acme.example.org/hook".into(),
            state: WebhookState::Pending,
            attempts: 0,
            last_error: None,
            delivery: s.id.to_string(),
        }
    );
    let now = now_ms();
    assert!(store
        .claim_webhooks(now, now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    store
        .set_state(s.id, JobState::Running, None)
        .await
        .unwrap();
    assert!(store
        .claim_webhooks(now_ms(), now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    store
        .set_state(s.id, JobState::Succeeded, None)
        .await
        .unwrap();
    store
        .set_state(plain.id, JobState::Succeeded, None)
        .await
        .unwrap();
    let now = now_ms();
    let claims = store.claim_webhooks(now, now + 60_000, 10).await.unwrap();
    assert_eq!(
        claims,
        vec![WebhookClaim {
            job: s.id,
            url: "https://acme.example.org/hook".into(),
            delivery: s.id.to_string(),
            attempt: 1,
            body: None,
        }]
    );
    // Held for the lease: nobody else gets it meanwhile.
    assert!(store
        .claim_webhooks(now + 59_999, now + 120_000, 10)
        .await
        .unwrap()
        .is_empty());
    // A sender that never reports: due again when the lease ends.
    let again = store
        .claim_webhooks(now + 60_000, now + 120_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(store.webhook(s.id).await.unwrap().unwrap().attempts, 2);

    // Concurrent claimers: one gets it.
    let t = hooked("acme", "http://127.0.0.1:9/x");
    store.create_job(&t).await.unwrap();
    store.set_state(t.id, JobState::Failed, None).await.unwrap();
    let later = now + 200_000;
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim_webhooks(later, later + 60_000, 10)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tries {
        got.extend(t.await.unwrap());
    }
    let mut jobs: Vec<JobId> = got.iter().map(|c| c.job).collect();
    jobs.sort();
    let mut expected = vec![s.id, t.id];
    expected.sort();
    assert_eq!(jobs, expected);
}

async fn webhook_attempts_are_recorded_until_delivered_or_given_up(store: Store) {
    let s = hooked("acme", "https://acme.example.org/hook");
    store.create_job(&s).await.unwrap();
    store
        .set_state(s.id, JobState::Cancelled, None)
        .await
        .unwrap();
    let now = now_ms();
    let c = store.claim_webhooks(now, now + 60_000, 10).await.unwrap();
    assert_eq!(c.len(), 1);
    // The first attempt fixes the body; later ones get it back.
    assert_eq!(
        store.fix_webhook_body(s.id, "{\"a\":1}").await.unwrap(),
        "{\"a\":1}"
    );
    assert_eq!(
        store.fix_webhook_body(s.id, "{\"b\":2}").await.unwrap(),
        "{\"a\":1}"
    );
    store
        .record_webhook_attempt(
            s.id,
            WebhookAttempt::Retry {
                error: "HTTP 500",
                at_ms: now + 1000,
            },
        )
        .await
        .unwrap();
    let w = store.webhook(s.id).await.unwrap().unwrap();
    assert_eq!(
        (w.state, w.attempts, w.last_error.as_deref()),
        (WebhookState::Pending, 1, Some("HTTP 500"))
    );
    assert!(store
        .claim_webhooks(now + 999, now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    let c = store
        .claim_webhooks(now + 1000, now + 60_000, 10)
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].attempt, c[0].body.as_deref()), (2, Some("{\"a\":1}")));
    store
        .record_webhook_attempt(s.id, WebhookAttempt::Delivered)
        .await
        .unwrap();
    let w = store.webhook(s.id).await.unwrap().unwrap();
    assert_eq!((w.state, w.attempts), (WebhookState::Delivered, 2));
    assert!(store
        .claim_webhooks(now + 10_000_000, now + 20_000_000, 10)
        .await
        .unwrap()
        .is_empty());
    // Delivered is final: a late report changes nothing.
    store
        .record_webhook_attempt(s.id, WebhookAttempt::GaveUp { error: "late" })
        .await
        .unwrap();
    assert_eq!(
        store.webhook(s.id).await.unwrap().unwrap().state,
        WebhookState::Delivered
    );

    let g = hooked("acme", "https://acme.example.org/other");
    store.create_job(&g).await.unwrap();
    store
        .set_state(g.id, JobState::Succeeded, None)
        .await
        .unwrap();
    let now = now_ms();
    assert_eq!(
        store
            .claim_webhooks(now, now + 60_000, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .record_webhook_attempt(g.id, WebhookAttempt::GaveUp { error: "HTTP 404" })
        .await
        .unwrap();
    let w = store.webhook(g.id).await.unwrap().unwrap();
    assert_eq!(
        (w.state, w.attempts, w.last_error.as_deref()),
        (WebhookState::Failed, 1, Some("HTTP 404"))
    );
    assert!(store
        .claim_webhooks(now + 10_000_000, now + 20_000_000, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn delete_job_forgets_usage_and_webhook(store: Store) {
    let s = hooked("acme", "https://acme.example.org/hook");
    store.create_job(&s).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(1, 10));
    store.delete_job(&s).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(0, 0));
    assert_eq!(store.webhook(s.id).await.unwrap(), None);
    let now = now_ms();
    assert!(store
        .claim_webhooks(now, now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn rebuild_recreates_a_lost_webhook_and_usage(store: Store) {
    let s = hooked("acme", "https://acme.example.org/hook");
    // As after a flush: nothing in the store; the spec has the callback.
    store.rebuild_from_done(&s, &[0]).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(1, 5));
    let w = store.webhook(s.id).await.unwrap().unwrap();
    assert_eq!((w.state, w.attempts), (WebhookState::Pending, 0));
    let now = now_ms();
    assert!(store
        .claim_webhooks(now, now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    // Every shard done: succeeded, so the webhook is due.
    store.rebuild_from_done(&s, &[0, 1]).await.unwrap();
    assert_eq!(store.tenant_usage("acme").await.unwrap(), usage(0, 0));
    let now = now_ms();
    let c = store.claim_webhooks(now, now + 60_000, 10).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].delivery, s.id.to_string());
}

async fn jobs_are_counted_by_state_across_tenants(store: Store) {
    let count = |counts: Vec<(JobState, u64)>| -> Vec<u64> {
        let order = [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ];
        assert_eq!(
            counts.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            order,
            "every state, in order"
        );
        counts.into_iter().map(|(_, n)| n).collect()
    };
    assert_eq!(count(store.count_jobs_by_state().await.unwrap()), [0; 5]);
    let jobs: Vec<JobSpec> = (0..5)
        .map(|i| spec(if i % 2 == 0 { "acme" } else { "other" }, 10, 5, 100 + i))
        .collect();
    for s in &jobs {
        store.create_job(s).await.unwrap();
    }
    for (s, state) in jobs[1..].iter().zip([
        JobState::Running,
        JobState::Running,
        JobState::Succeeded,
        JobState::Cancelled,
    ]) {
        store.set_state(s.id, state, None).await.unwrap();
    }
    assert_eq!(
        count(store.count_jobs_by_state().await.unwrap()),
        [1, 2, 1, 0, 1]
    );
    // A job undone is counted no more.
    store.delete_job(&jobs[0]).await.unwrap();
    assert_eq!(
        count(store.count_jobs_by_state().await.unwrap()),
        [0, 2, 1, 0, 1]
    );
    // Rebuilt entries count once, in their new state.
    store
        .rebuild_with_state(&jobs[3], &[], JobState::Succeeded, None, None)
        .await
        .unwrap();
    store
        .rebuild_with_state(&jobs[4], &[], JobState::Failed, Some("x"), None)
        .await
        .unwrap();
    store
        .rebuild_with_state(&jobs[1], &[], JobState::Cancelled, None, None)
        .await
        .unwrap();
    assert_eq!(
        count(store.count_jobs_by_state().await.unwrap()),
        [0, 1, 1, 1, 1]
    );
}

async fn batch_webhooks_are_watched_then_due_once_and_forgettable(store: Store) {
    let batch = JobId::new();
    let other = JobId::new();
    store
        .register_batch_webhook(batch, "https://acme.example.org/batch")
        .await
        .unwrap();
    // Registering again changes nothing.
    store
        .register_batch_webhook(batch, "https://elsewhere.example.org/")
        .await
        .unwrap();
    store
        .register_batch_webhook(other, "https://acme.example.org/other")
        .await
        .unwrap();
    let mut both = vec![batch, other];
    both.sort();
    assert_eq!(store.watched_batches().await.unwrap(), both);
    let w = store.webhook(batch).await.unwrap().unwrap();
    assert_eq!(
        (w.url.as_str(), w.state, w.attempts),
        ("https://acme.example.org/batch", WebhookState::Pending, 0)
    );
    // Not due while the batch runs.
    let now = now_ms();
    assert!(store
        .claim_webhooks(now, now + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    store.batch_ended(batch).await.unwrap();
    assert_eq!(store.watched_batches().await.unwrap(), vec![other]);
    let now = now_ms();
    let claims = store.claim_webhooks(now, now + 60_000, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        (claims[0].job, claims[0].attempt, claims[0].delivery.clone()),
        (batch, 1, batch.to_string())
    );
    store
        .record_webhook_attempt(batch, WebhookAttempt::Delivered)
        .await
        .unwrap();
    // Ended again (a second look): a delivered webhook is not due again.
    store.batch_ended(batch).await.unwrap();
    assert!(store
        .claim_webhooks(now_ms(), now_ms() + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.webhook(batch).await.unwrap().unwrap().state,
        WebhookState::Delivered
    );
    // A batch is not a job: no progress, not counted.
    assert!(store.get(batch).await.unwrap().is_none());
    // Forgotten: neither watched nor with a webhook.
    store.forget_batch(other).await.unwrap();
    assert!(store.watched_batches().await.unwrap().is_empty());
    assert!(store.webhook(other).await.unwrap().is_none());
}
