//! The cluster end to end, as deployed: `digctl api`, `digctl coordinator`
//! and `digctl worker` processes on real RabbitMQ, Redis and SeaweedFS, driven
//! with the `digctl` client commands; and `digctl standalone` with no server.
//!
//! Every succeeded job is checked sample by sample against `digctl sample`
//! with the same model, features, seed, steps and batch size: each index
//! exactly once, frames bit-identical. (Shard sizes are multiples of the
//! batch size, so both group samples into the same batches.)

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_common::progress::ProgressStore;
use dig_common::queue::ShardQueue;
use dig_tests::cluster::{assert_same_samples, local_sample, Cluster, Service};

/// These tests run several processes that each want both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BATCH: usize = 5; // DIG_WORKER_BATCH_SIZE of every Cluster

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `n` workers beat (so all of them are consuming).
fn wait_for_workers(c: &Cluster, rt: &tokio::runtime::Runtime, n: usize, svcs: &[&Service]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        let b = c.backends().await;
        while b.workers().await.len() < n {
            assert!(
                Instant::now() < deadline,
                "workers did not start; logs:\n{}",
                svcs.iter()
                    .map(|s| s.log())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// The job ids (first words shaped like a UUID) of a `digctl jobs` table.
fn job_ids(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_string)
        .collect()
}

#[test]
fn a_job_through_api_rabbitmq_two_workers_and_s3_equals_local_sampling() {
    let _serial = serial();
    let rt = runtime();
    let mut c = Cluster::distributed("flow");
    c.upload_model();
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut w1 = c.start_worker();
    let mut w2 = c.start_worker();
    wait_for_workers(&c, &rt, 2, &[&w1, &w2]);

    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        200,
        &["--seed", "11", "--steps", "20", "--shard-size", "25"],
    );
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(300),
        &mut [&mut api, &mut coordinator, &mut w1, &mut w2],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["samples_done"], 200);
    assert_eq!(done["shards"]["done"], 8);
    assert_eq!(done["shards"]["total"], 8);

    let shards = c.fetch(&c.key_a, &job);
    assert_eq!(shards.len(), 8);
    let reference = local_sample(c.dir.path(), 200, 11, 20, BATCH);
    assert_same_samples(&shards, &reference);

    // Both worker processes took part.
    for w in [&w1, &w2] {
        assert!(
            w.log().contains("shard done"),
            "{} sampled no shard; log:\n{}",
            w.name,
            w.log()
        );
    }
    rt.block_on(async {
        let b = c.backends().await;
        assert_eq!(b.queue.shard_queue_depth().await.unwrap(), 0);
        assert_eq!(b.queue.parked_depth().await.unwrap(), 0);
        let objects = b.objects().await;
        let shard_objects = objects.iter().filter(|k| k.contains("/shards/")).count();
        assert_eq!(shard_objects, 8, "{objects:?}");
    });
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

#[test]
fn a_worker_killed_mid_shard_loses_and_duplicates_no_sample() {
    let _serial = serial();
    let rt = runtime();
    let mut c = Cluster::distributed("kill");
    c.upload_model();
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut victim = c.start_worker();
    wait_for_workers(&c, &rt, 1, &[&victim]);

    let sha = c.upload_features(&c.key_a);
    // Long shards (8 batches of 60 steps), so the kill lands inside one.
    let job = c.submit(
        &c.key_a,
        &sha,
        120,
        &["--seed", "3", "--steps", "60", "--shard-size", "40"],
    );
    // Kill the worker while its heartbeat names a shard in progress.
    let killed_shard = rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let beats = b.workers().await;
            if let Some(shard) = beats.first().and_then(|w| w.shard.clone()) {
                victim.kill();
                return shard;
            }
            assert!(
                Instant::now() < deadline,
                "the worker never reported a shard; log:\n{}",
                victim.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let index: u64 = killed_shard.rsplit('/').next().unwrap().parse().unwrap();
    let done_at_kill = rt.block_on(async {
        let b = c.backends().await;
        b.progress.done_shards(job.parse().unwrap()).await.unwrap()
    });
    assert!(
        !done_at_kill.contains(&index),
        "shard {index} finished before the kill; the test needs longer shards"
    );

    let mut rescuer = c.start_worker();
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(300),
        &mut [&mut api, &mut coordinator, &mut rescuer],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["samples_done"], 120);
    assert!(
        rescuer.log().contains("shard done"),
        "the redelivered shard went nowhere; log:\n{}",
        rescuer.log()
    );
    let shards = c.fetch(&c.key_a, &job);
    let reference = local_sample(c.dir.path(), 120, 3, 60, BATCH);
    assert_same_samples(&shards, &reference);
    drop((api, coordinator, rescuer));
    rt.block_on(c.cleanup());
}

/// Starts workers one after another and SIGKILLs each as soon as its
/// heartbeat names `shard` (as a preempted spot instance dies): `kills` times.
fn kill_each_worker_on(
    c: &mut Cluster,
    rt: &tokio::runtime::Runtime,
    shard: &str,
    kills: usize,
    extra: &[(&str, &str)],
) {
    for k in 1..=kills {
        let name = format!("victim-{shard}-{k}").replace('/', "-");
        let mut victim = c.spawn_with(&name, &["worker"], extra);
        rt.block_on(async {
            let b = c.backends().await;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let beats = b.workers().await;
                if beats
                    .iter()
                    .any(|w| w.id == name && w.shard.as_deref() == Some(shard))
                {
                    victim.kill();
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} never reported {shard}; log:\n{}",
                    victim.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(
            !victim.log().contains("shard done"),
            "{name} finished the shard before its kill; the test needs a longer shard"
        );
    }
}

#[test]
fn preemption_costs_no_attempt_and_a_shard_that_kills_every_worker_is_parked_after_max_deaths() {
    let _serial = serial();
    let rt = runtime();
    let mut c = Cluster::distributed("deaths");
    c.upload_model();
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let sha = c.upload_features(&c.key_a);
    // One long shard (8 batches of 60 steps), so each kill lands inside it.
    let args = ["--steps", "60", "--shard-size", "40"];

    // Production defaults (3 attempts, 20 deaths): five workers killed on the
    // one shard, then a sixth finishes it, every sample as digctl sample's.
    let job = c.submit(&c.key_a, &sha, 40, &[&["--seed", "5"][..], &args].concat());
    kill_each_worker_on(&mut c, &rt, &format!("{job}/0"), 5, &[]);
    let mut rescuer = c.start_worker();
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(300),
        &mut [&mut api, &mut coordinator, &mut rescuer],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["samples_done"], 40);
    assert!(
        rescuer
            .log()
            .contains("shard redelivered after its worker died"),
        "{}",
        rescuer.log()
    );
    let reference = local_sample(c.dir.path(), 40, 5, 60, BATCH);
    assert_same_samples(&c.fetch(&c.key_a, &job), &reference);
    rescuer.terminate(Duration::from_secs(30));

    // A shard that takes down every worker: parked after worker.max_deaths
    // (3 here) without running a fourth time, the job failed saying so.
    let doomed = c.submit(&c.key_a, &sha, 40, &[&["--seed", "6"][..], &args].concat());
    let capped = [("DIG_WORKER_MAX_DEATHS", "3")];
    kill_each_worker_on(&mut c, &rt, &format!("{doomed}/0"), 3, &capped);
    let mut last = c.spawn_with("last", &["worker"], &capped);
    let failed = c.wait_final(
        &c.key_a,
        &doomed,
        Duration::from_secs(120),
        &mut [&mut api, &mut coordinator, &mut last],
    );
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(
        failed["error"],
        "shard 0: parked after 3 attempts whose worker died without reporting an error \
         (killed, preempted, out of memory or a crash that takes the process down; \
         worker.max_deaths = 3); 0 reported failures",
        "{failed}"
    );
    assert!(!last.log().contains("shard done"), "{}", last.log());
    rt.block_on(async {
        let b = c.backends().await;
        assert_eq!(b.queue.parked_depth().await.unwrap(), 1);
        let objects = b.objects().await;
        assert!(
            !objects
                .iter()
                .any(|k| k.contains(&format!("{doomed}/shards/"))),
            "{objects:?}"
        );
    });
    drop((api, coordinator, last));
    rt.block_on(c.cleanup());
}

#[test]
fn idempotency_tenants_and_validation_over_http() {
    let _serial = serial();
    let rt = runtime();
    let c = Cluster::distributed("rules");
    c.upload_model();
    let _api = c.start_api();
    let sha = c.upload_features(&c.key_a);

    // The same Idempotency-Key gives the same job, once.
    let args = [
        "--seed",
        "1",
        "--steps",
        "5",
        "--idempotency-key",
        "portal-42",
    ];
    let first = c.submit(&c.key_a, &sha, 10, &args);
    let again = c.submit(&c.key_a, &sha, 10, &args);
    assert_eq!(first, again);
    let jobs = c.client_ok(&c.key_a, &["jobs"]);
    assert_eq!(job_ids(&jobs), vec![first.clone()], "{jobs}");

    // Another tenant sees nothing of it; no key or a wrong key is 401.
    let err = c.client_err(&c.key_b, &["status", &first]);
    assert!(err.contains("404") && err.contains("not found"), "{err}");
    let err = c.client_err(
        &c.key_b,
        &[
            "submit",
            "--features-sha256",
            &sha,
            "--sequence",
            dig_tests::cluster::SEQUENCE,
            "--num-samples",
            "1",
        ],
    );
    assert!(err.contains("404") && err.contains("features"), "{err}");
    let err = c.client_err("dig_not-a-key", &["status", &first]);
    assert!(err.contains("401"), "{err}");

    // Invalid requests: a 4xx naming the problem, and nothing left behind.
    let before = rt.block_on(async {
        let b = c.backends().await;
        (
            b.objects().await,
            b.queue.shard_queue_depth().await.unwrap(),
        )
    });
    for (extra, num, expect) in [
        (
            vec![],
            "2000000",
            "num_samples: must be between 1 and 1000000",
        ),
        (vec!["--steps", "100000"], "10", "steps"),
        (vec!["--model", "no-such-model"], "10", "unknown model"),
        (vec!["--shard-size", "0"], "10", "shard_size"),
    ] {
        let mut args = vec![
            "submit",
            "--features-sha256",
            &sha,
            "--sequence",
            dig_tests::cluster::SEQUENCE,
            "--num-samples",
            num,
        ];
        args.extend(extra.iter().copied());
        let err = c.client_err(&c.key_a, &args);
        assert!(
            err.contains("HTTP 400") && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    let err = c.client_err(
        &c.key_a,
        &[
            "submit",
            "--features-sha256",
            &sha,
            "--sequence",
            "MKT",
            "--num-samples",
            "1",
        ],
    );
    assert!(
        err.contains("does not match the features' length 24"),
        "{err}"
    );
    let after = rt.block_on(async {
        let b = c.backends().await;
        (
            b.objects().await,
            b.queue.shard_queue_depth().await.unwrap(),
        )
    });
    assert_eq!(before, after, "a refused submission left something behind");
    let jobs = c.client_ok(&c.key_a, &["jobs"]);
    assert_eq!(job_ids(&jobs), vec![first.clone()], "{jobs}");
    rt.block_on(c.cleanup());
}

#[test]
fn standalone_runs_the_same_flow_with_no_server() {
    let _serial = serial();
    let (c, mut svc) = Cluster::standalone("standalone");
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        200,
        &["--seed", "11", "--steps", "20", "--shard-size", "25"],
    );
    let done = c.wait_final(&c.key_a, &job, Duration::from_secs(300), &mut [&mut svc]);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["samples_done"], 200);
    let shards = c.fetch(&c.key_a, &job);
    let reference = local_sample(c.dir.path(), 200, 11, 20, BATCH);
    assert_same_samples(&shards, &reference);
    // Same results as the distributed run's, by construction of the test:
    // both equal the local run. And no server was contacted.
    let log = svc.log();
    assert!(!log.contains("RabbitMQ") && !log.contains("Redis"), "{log}");
}
