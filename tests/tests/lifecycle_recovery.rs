//! The cluster survives what production throws at it: a coordinator killed
//! (SIGKILL) mid-job and restarted, Redis losing every key of the
//! deployment mid-job (and after a job succeeded), a RabbitMQ restart
//! mid-job, a Redis restart mid-job, and a shard that cannot succeed (its features object deleted)
//! next to a job that can. `digctl api`, `coordinator` and `worker`
//! processes on the real servers of `scripts/services.sh`.
//!
//! Every succeeded job is checked sample by sample against `digctl sample`
//! with the same inputs: each index exactly once, frames bit-identical, and
//! one shard object per shard. The waits are generous (two shared cores)
//! and nothing asserts on how long anything took.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_common::job::{JobId, JobState};
use dig_common::layout::ObjectLayout;
use dig_common::progress::ProgressStore;
use dig_common::queue::ShardQueue;
use dig_model::structure::Ensemble;
use dig_tests::cluster::{
    assert_same_samples, local_sample, wait_until, Cluster, Outage, Service, SEQUENCE,
};
use object_store::ObjectStore;

/// These tests run several processes that each want both cores, and one
/// of them stops the broker: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BATCH: usize = 5; // DIG_WORKER_BATCH_SIZE of every Cluster
const STEPS: u64 = 20;
const SHARD: u64 = 10; // a multiple of BATCH: shards equal the local run
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn logs(svcs: &[&Service]) -> String {
    svcs.iter()
        .map(|s| format!("--- {} ---\n{}", s.name, s.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A deployment with the model uploaded and a small window, so that a job's
/// shards are published all along its run (not all at once at the start).
fn cluster(label: &str) -> Cluster {
    let mut c = Cluster::distributed(label);
    c.set_env("DIG_COORDINATOR_WINDOW_PER_JOB", "2");
    c.upload_model();
    c
}

/// Waits until `n` workers beat (so all of them are consuming).
fn wait_for_workers(c: &Cluster, rt: &tokio::runtime::Runtime, n: usize, svcs: &[&Service]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    rt.block_on(async {
        let b = c.backends().await;
        while b.workers().await.len() < n {
            assert!(
                Instant::now() < deadline,
                "workers did not start; logs:\n{}",
                logs(svcs)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Waits until the job has at least `k` shards done.
fn wait_for_shards(
    c: &Cluster,
    rt: &tokio::runtime::Runtime,
    job: &str,
    k: usize,
    svcs: &[&Service],
) {
    let id: JobId = job.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    rt.block_on(async {
        let b = c.backends().await;
        while b.progress.done_shards(id).await.unwrap().len() < k {
            assert!(
                Instant::now() < deadline,
                "job {job} did not get {k} shards done; logs:\n{}",
                logs(svcs)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Polls the job's view until the job is final; its last view. A
/// job the API does not know for a moment (its entry being rebuilt) is
/// waited for too.
fn wait_final(c: &Cluster, job: &str, svcs: &[&Service]) -> serde_json::Value {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let view = c.try_status(&c.key_a, job);
        if let Some(v) = &view {
            if matches!(
                v["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return v.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not finish: {view:?}; logs:\n{}",
            logs(svcs)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A succeeded job of `n` samples: counted once per sample and shard, one
/// object per shard, and the samples equal `digctl sample`'s.
fn check_succeeded(
    c: &Cluster,
    rt: &tokio::runtime::Runtime,
    view: &serde_json::Value,
    job: &str,
    n: u64,
    seed: u64,
) {
    let shards = n.div_ceil(SHARD);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["samples_done"], n, "{view}");
    assert_eq!(view["shards"]["done"], shards, "{view}");
    assert_eq!(view["shards"]["total"], shards, "{view}");
    let objects = rt.block_on(async { c.backends().await.objects().await });
    let shard_objects = objects
        .iter()
        .filter(|k| k.contains(&format!("/jobs/{job}/shards/")))
        .count() as u64;
    assert_eq!(shard_objects, shards, "{objects:?}");
    let fetched = c.fetch(&c.key_a, job);
    assert_eq!(fetched.len() as u64, shards);
    assert_same_samples(&fetched, &reference(c, n, seed));
}

/// `digctl sample` of the fixture with these parameters, run once per test.
fn reference(c: &Cluster, n: u64, seed: u64) -> Ensemble {
    let dir = c.dir.path();
    let saved = dir.join(format!("local-{n}-{seed}-{STEPS}-{BATCH}/samples.npz"));
    if saved.is_file() {
        return Ensemble::read_npz(&saved, SEQUENCE).unwrap();
    }
    local_sample(dir, n, seed, STEPS, BATCH)
}

fn submit(c: &Cluster, sha: &str, n: u64, seed: u64) -> String {
    c.submit(
        &c.key_a,
        sha,
        n,
        &[
            "--seed",
            &seed.to_string(),
            "--steps",
            &STEPS.to_string(),
            "--shard-size",
            &SHARD.to_string(),
        ],
    )
}

#[test]
fn a_coordinator_killed_mid_job_resumes_every_job_without_losing_or_repeating_a_shard() {
    let _serial = serial();
    let rt = runtime();
    let mut c = cluster("crash");
    let api = c.start_api();
    let w1 = c.start_worker();
    let w2 = c.start_worker();
    wait_for_workers(&c, &rt, 2, &[&w1, &w2]);
    let sha = c.upload_features(&c.key_a);

    // Submitted before any coordinator runs: its id waits on the jobs queue.
    let first = submit(&c, &sha, 100, 21);
    let mut coordinator = c.start_coordinator();
    wait_for_shards(&c, &rt, &first, 3, &[&coordinator, &w1, &w2]);
    coordinator.kill();

    // Submitted while no coordinator runs: its id is on the jobs queue,
    // while the first job's was acked by the killed coordinator.
    let second = submit(&c, &sha, 40, 22);
    // A restart killed again early, then one that stays. Killed as soon as
    // it logs its metrics listener (its configuration loaded, the process
    // up), so the kill lands in its start (connecting, reconciling,
    // resuming, publishing), never before the process has run at all.
    let mut early = c.start_coordinator();
    early.metrics_addr();
    early.kill();
    let coordinator = c.start_coordinator();

    let svcs = [&api, &coordinator, &w1, &w2];
    let v1 = wait_final(&c, &first, &svcs);
    let v2 = wait_final(&c, &second, &svcs);
    check_succeeded(&c, &rt, &v1, &first, 100, 21);
    check_succeeded(&c, &rt, &v2, &second, 40, 22);
    rt.block_on(async {
        let b = c.backends().await;
        assert_eq!(b.progress.unfinished_jobs().await.unwrap(), vec![]);
        assert_eq!(b.queue.parked_depth().await.unwrap(), 0);
    });
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

#[test]
fn job_progress_lost_in_redis_is_rebuilt_from_the_object_store() {
    let _serial = serial();
    let rt = runtime();
    let mut c = cluster("flush");
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let w1 = c.start_worker();
    let w2 = c.start_worker();
    let svcs = [&api, &coordinator, &w1, &w2];
    wait_for_workers(&c, &rt, 2, &svcs);
    let sha = c.upload_features(&c.key_a);

    // Mid-job: every key of the deployment goes (entry, done set, attempts,
    // unfinished index, tenant listing). The coordinator rebuilds the entry
    // from the shard objects and carries on.
    let job = submit(&c, &sha, 100, 31);
    wait_for_shards(&c, &rt, &job, 3, &svcs);
    rt.block_on(async { c.backends().await.progress.delete_all().await.unwrap() });
    let view = wait_final(&c, &job, &svcs);
    check_succeeded(&c, &rt, &view, &job, 100, 31);
    assert!(
        coordinator
            .log()
            .contains("job vanished from the progress store; rebuilding it"),
        "the job was not rebuilt by the coordinator; log:\n{}",
        coordinator.log()
    );

    // A cancelled job: the coordinator leaves a marker in the store. Large
    // enough (100 shards) that the two workers cannot finish it before the
    // cancel arrives on a loaded machine (40 samples once did).
    let cancelled = submit(&c, &sha, 1000, 32);
    c.client_ok(&c.key_a, &["cancel", &cancelled]);
    let marker = ObjectLayout::new(&c.namespace).job_state(cancelled.parse().unwrap());
    wait_until(
        "the cancelled job has a state marker",
        Duration::from_secs(120),
        &svcs,
        || rt.block_on(async { c.backends().await.store.head(&marker).await.is_ok() }),
    );

    // After the fact: Redis forgets both, `digctl reconcile` rebuilds them.
    rt.block_on(async { c.backends().await.progress.delete_all().await.unwrap() });
    assert!(c.try_status(&c.key_a, &job).is_none());
    let out = c.digctl_configured(&["reconcile", "--dry-run"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&job))
        .unwrap_or_else(|| panic!("no row for {job}:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[1..6],
        ["lab-a", "missing", "succeeded", "10/10", "rebuilt"],
        "{table}"
    );
    assert!(
        c.try_status(&c.key_a, &job).is_none(),
        "a dry run changed something"
    );

    let out = c.digctl_configured(&["reconcile"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (id, state) in [(&job, "succeeded"), (&cancelled, "cancelled")] {
        let row = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[2..4], ["missing", state], "{table}");
    }
    let view = c.status(&c.key_a, &job);
    check_succeeded(&c, &rt, &view, &job, 100, 31);
    assert_eq!(c.status(&c.key_a, &cancelled)["state"], "cancelled");
    let listed = c.client_ok(&c.key_a, &["jobs"]);
    assert!(
        listed.contains(&job) && listed.contains(&cancelled),
        "{listed}"
    );

    // Once in agreement, a second run changes nothing.
    let out = c.digctl_configured(&["reconcile", "--job", &job, "--json"]);
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["action"], "none", "{line}");
    assert_eq!(line["after"], "succeeded", "{line}");
    rt.block_on(async {
        let b = c.backends().await;
        assert_eq!(b.progress.unfinished_jobs().await.unwrap(), vec![]);
        let p = b.progress.get(job.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(p.state, JobState::Succeeded);
    });
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

/// A server restarted mid-job under api, coordinator and two workers: a
/// 100-sample job (seed `seed`) has 2 shards done when `stop` takes the
/// server down; /readyz must answer 503, and `during` gets the cluster, the
/// features' SHA-256 and the readiness body for its own checks of the
/// outage. The server comes back, /readyz answers 200 again, and a 20-sample
/// job (seed `seed + 1`) submitted after it shows that the coordinator's
/// jobs consumer is back. Both succeed, exactly; the store then holds the
/// specs of these two jobs only, and the tenant's listing these two.
fn restart_mid_job(
    label: &str,
    seed: u64,
    stop: fn() -> Outage,
    during: impl FnOnce(&Cluster, &str, &serde_json::Value),
) {
    let _serial = serial();
    let rt = runtime();
    let mut c = cluster(label);
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let w1 = c.start_worker();
    let w2 = c.start_worker();
    let svcs = [&api, &coordinator, &w1, &w2];
    wait_for_workers(&c, &rt, 2, &svcs);
    let sha = c.upload_features(&c.key_a);
    wait_until("/readyz is 200", Duration::from_secs(120), &svcs, || {
        c.http_get("/readyz").is_some_and(|(code, _)| code == 200)
    });

    let job = submit(&c, &sha, 100, seed);
    wait_for_shards(&c, &rt, &job, 2, &svcs);
    let outage = stop();
    let mut last = None;
    wait_until("/readyz is 503", Duration::from_secs(120), &svcs, || {
        last = c.http_get("/readyz");
        last.as_ref().is_some_and(|(code, _)| *code == 503)
    });
    let (_, body) = last.unwrap();
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["status"], "unavailable", "{body}");
    during(&c, &sha, &readiness);
    outage.end();
    wait_until(
        "/readyz is 200 again",
        Duration::from_secs(120),
        &svcs,
        || c.http_get("/readyz").is_some_and(|(code, _)| code == 200),
    );

    let after = submit(&c, &sha, 20, seed + 1);
    let v1 = wait_final(&c, &job, &svcs);
    let v2 = wait_final(&c, &after, &svcs);
    check_succeeded(&c, &rt, &v1, &job, 100, seed);
    check_succeeded(&c, &rt, &v2, &after, 20, seed + 1);
    let specs: Vec<String> = rt
        .block_on(async { c.backends().await.objects().await })
        .into_iter()
        .filter(|k| k.ends_with("/spec.json"))
        .collect();
    assert_eq!(specs.len(), 2, "{specs:?}");
    let listed = c.client_ok(&c.key_a, &["jobs"]);
    assert_eq!(
        listed.lines().filter(|l| l.contains("succeeded")).count(),
        2,
        "{listed}"
    );
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

#[test]
fn a_rabbitmq_restart_mid_job_loses_no_shard_and_readyz_reports_it() {
    restart_mid_job("broker", 41, Outage::rabbitmq, |_, _, readiness| {
        assert_ne!(readiness["checks"]["queue"], "ok", "{readiness}");
        assert_eq!(readiness["checks"]["progress"], "ok", "{readiness}");
    });
}

/// Redis stopped mid-job (saving its data, as a production Redis with
/// persistence does) and started again: /readyz says so, a submission
/// meanwhile gets a 503 naming the progress store and leaves no spec
/// behind, and every service reconnects by itself.
#[test]
fn a_redis_restart_mid_job_loses_no_shard_and_submissions_meanwhile_get_503() {
    restart_mid_job("redis", 51, Outage::redis, |c, sha, readiness| {
        assert_ne!(readiness["checks"]["progress"], "ok", "{readiness}");
        assert_eq!(readiness["checks"]["queue"], "ok", "{readiness}");
        let request = serde_json::json!({
            "sequence": SEQUENCE, "features_sha256": sha, "num_samples": 10,
            "seed": 99, "steps": STEPS, "shard_size": SHARD,
        });
        let (status, headers, body) = c.api_post_reply(&c.key_a, "/v1/jobs", &request);
        assert_eq!(status, 503, "{body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "unavailable", "{body}");
        assert_eq!(
            error["error"]["message"], "the progress store is unavailable; try again later",
            "{body}"
        );
        assert!(
            headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case("retry-after: 5")),
            "{headers:?}"
        );
        // The outage lasting is the point (nothing to wait for): workers
        // carry on sampling meanwhile and retry what they cannot record.
        std::thread::sleep(Duration::from_secs(3));
    });
}

#[test]
fn a_shard_that_keeps_failing_is_parked_and_fails_its_job_only() {
    let _serial = serial();
    let rt = runtime();
    let mut c = cluster("parked");
    c.set_env("DIG_WORKER_MAX_ATTEMPTS", "2");
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let good_sha = c.upload_features(&c.key_a);

    // Features no other job uses (the fixture's, slightly changed), so no
    // worker has them cached; deleted from the store once submitted.
    let variant = c.dir.path().join("variant.npz");
    dig_tests::python(
        "import sys, numpy as np\n\
         d = np.load(sys.argv[1])\n\
         single = d['single'].copy(); single[0, 0] += np.float32(0.5)\n\
         np.savez(sys.argv[2], single=single, pair=d['pair'])\n",
        &[&dig_tests::fixture("features.npz"), &variant],
    );
    let out = c.client_ok(
        &c.key_a,
        &["upload-features", "--json", variant.to_str().unwrap()],
    );
    let bad_sha = serde_json::from_str::<serde_json::Value>(&out).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(bad_sha, good_sha);
    let bad = submit(&c, &bad_sha, 20, 51);
    let good = submit(&c, &good_sha, 60, 52);
    let features = ObjectLayout::new(&c.namespace).features(&bad_sha);
    rt.block_on(async { c.backends().await.store.delete(&features).await.unwrap() });

    let w1 = c.start_worker();
    let w2 = c.start_worker();
    let svcs = [&api, &coordinator, &w1, &w2];
    let failed = wait_final(&c, &bad, &svcs);
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("shard ") && error.contains(&bad_sha),
        "the error should name the shard and the missing features: {failed}"
    );
    rt.block_on(async {
        let b = c.backends().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while b.queue.parked_depth().await.unwrap() < 1 {
            assert!(Instant::now() < deadline, "nothing was parked");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The failure is recorded in the store, for a rebuild.
        let marker = ObjectLayout::new(&c.namespace).job_state(bad.parse().unwrap());
        let bytes = b.store.get(&marker).await.unwrap().bytes().await.unwrap();
        let marker: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(marker["state"], "failed", "{marker}");
        assert_eq!(marker["error"], error, "{marker}");
    });

    let view = wait_final(&c, &good, &svcs);
    check_succeeded(&c, &rt, &view, &good, 60, 52);
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}
