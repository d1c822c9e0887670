//! Proteome-scale batches end to end: `digctl api`, `digctl coordinator` and
//! two `digctl worker` processes on the real RabbitMQ, Redis and SeaweedFS.
//!
//! A batch of 500 small entries is submitted in one call; right after it, an
//! interactive job of the same tenant and a bulk job of another tenant. The
//! interactive job overtakes the batch (its shards carry the higher queue
//! priority, and the coordinator serves interactive jobs first), and the
//! other tenant's bulk job is not starved behind the 500 (fair share: the
//! coordinator caps each tenant's outstanding shards). Every job of the
//! batch succeeds with its samples exactly once, bit-identical to `digctl
//! sample`, and `GET /v1/batches/{id}` adds them up.

use std::time::{Duration, Instant};

use dig_common::queue::ShardQueue;
use dig_model::structure::Ensemble;
use dig_tests::cluster::{assert_same_samples, local_sample, Cluster, Service, SEQUENCE};
use serde_json::{json, Value};

const BATCH: usize = 2; // DIG_WORKER_BATCH_SIZE here
const STEPS: u64 = 20;
const ENTRIES: usize = 500;

fn note(start: Instant, what: &str) {
    eprintln!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
}

fn logs(svcs: &[&Service]) -> String {
    svcs.iter()
        .map(|s| format!("--- {}:\n{}", s.name, s.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn final_state(v: &Value) -> bool {
    matches!(
        v["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[test]
fn a_500_entry_batch_completes_after_an_interactive_job_submitted_later() {
    // One libtorch thread per process: four processes share two cores.
    std::env::set_var("OMP_NUM_THREADS", "1");
    let start = Instant::now();
    let mut c = Cluster::distributed("batch");
    c.set_env("DIG_WORKER_BATCH_SIZE", &BATCH.to_string());
    c.upload_model();
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let w1 = c.start_worker();
    let w2 = c.start_worker();
    let sha_a = c.upload_features(&c.key_a);
    let sha_b = c.upload_features(&c.key_b);
    let entry = |sha: &str, samples: u64, seed: u64| {
        json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": samples,
               "seed": seed, "steps": STEPS, "shard_size": 2})
    };

    // 500 entries, seeds 1 and 2 alternating (so two local runs check them all).
    let entries: Vec<Value> = (0..ENTRIES)
        .map(|i| entry(&sha_a, 2, 1 + (i % 2) as u64))
        .collect();
    let (status, body) = c.api_post(
        &c.key_a,
        "/v1/batches",
        &json!({"name": "proteome", "jobs": entries}),
    );
    assert_eq!(status, 202, "{body}");
    let submitted: Value = serde_json::from_str(&body).unwrap();
    let batch = submitted["id"].as_str().unwrap().to_string();
    let jobs: Vec<String> = submitted["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(jobs.len(), ENTRIES);
    note(start, "batch submitted");

    // After it: lab-a's interactive job and lab-b's bulk job.
    let mut live = entry(&sha_a, 8, 3);
    live["shard_size"] = json!(4);
    let (status, body) = c.api_post(&c.key_a, "/v1/jobs", &live);
    assert_eq!(status, 202, "{body}");
    let live_id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut other = entry(&sha_b, 2, 1);
    other["priority"] = json!("bulk");
    let (status, body) = c.api_post(&c.key_b, "/v1/jobs", &other);
    assert_eq!(status, 202, "{body}");
    let other_id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Each of the two finishes while the batch is still under way.
    let batch_path = format!("/v1/batches/{batch}");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut pending = vec![
        (c.key_a.clone(), live_id.clone()),
        (c.key_b.clone(), other_id.clone()),
    ];
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "jobs {pending:?} did not finish; logs:\n{}",
            logs(&[&api, &coordinator, &w1, &w2])
        );
        let mut still = Vec::new();
        for (key, job) in pending {
            let v = c.status(&key, &job);
            if !final_state(&v) {
                still.push((key, job));
                continue;
            }
            assert_eq!(v["state"], "succeeded", "{v}");
            let (s, b) = c.api_get(&c.key_a, &batch_path);
            assert_eq!(s, 200, "{b}");
            let view: Value = serde_json::from_str(&b).unwrap();
            let ended = view["jobs_by_state"]["succeeded"].as_u64().unwrap();
            note(
                start,
                &format!(
                    "job {job} succeeded (created {}, started {}, finished {}); \
                     batch jobs succeeded: {ended}",
                    v["created_at"], v["started_at"], v["finished_at"]
                ),
            );
            assert_ne!(
                view["state"], "succeeded",
                "the batch finished first: {}, created {}, finished {}",
                view["jobs_by_state"], view["created_at"], view["finished_at"]
            );
            assert!(
                ended < ENTRIES as u64 - 100,
                "{ended} of the batch's jobs were done already"
            );
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(200));
    }

    // The batch completes.
    let view = loop {
        let (s, b) = c.api_get(&c.key_a, &batch_path);
        assert_eq!(s, 200, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        if final_state(&v) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the batch did not finish: {}; logs:\n{}",
            v["jobs_by_state"],
            logs(&[&api, &coordinator, &w1, &w2])
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    note(start, "batch finished");
    assert_eq!(view["state"], "succeeded", "{}", view["jobs_by_state"]);
    assert_eq!(view["jobs_by_state"]["succeeded"], ENTRIES as u64);
    assert_eq!(
        (view["num_samples"].as_u64(), view["samples_done"].as_u64()),
        (Some(2 * ENTRIES as u64), Some(2 * ENTRIES as u64))
    );

    // Every sample of every job once, bit-identical to `digctl sample`.
    let refs = [
        local_sample(c.dir.path(), 2, 1, STEPS, BATCH),
        local_sample(c.dir.path(), 2, 2, STEPS, BATCH),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = c.backends().await;
        let objects = b.objects().await;
        let shards: Vec<&String> = objects.iter().filter(|k| k.contains("/shards/")).collect();
        // 500 + 2 (interactive) + 1 (lab-b): no more, no fewer.
        assert_eq!(shards.len(), ENTRIES + 2 + 1);
        let dir = tempfile::tempdir().unwrap();
        for (i, job) in jobs.iter().enumerate() {
            let key = format!("{}/jobs/{job}/shards/000000.npz", c.namespace);
            let bytes = b
                .store
                .get(&object_store::path::Path::from(key.as_str()))
                .await
                .unwrap_or_else(|e| panic!("job {i} ({job}): {e}"))
                .bytes()
                .await
                .unwrap();
            let path = dir.path().join(format!("{i}.npz"));
            std::fs::write(&path, &bytes).unwrap();
            let e = Ensemble::read_npz(&path, SEQUENCE).unwrap();
            assert_same_samples(&[e], &refs[i % 2]);
        }
        let live_shards: Vec<Ensemble> = b
            .shard_ensembles(&live_id, SEQUENCE)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_same_samples(
            &live_shards,
            &local_sample(c.dir.path(), 8, 3, STEPS, BATCH),
        );
        assert_eq!(b.queue.shard_queue_depth().await.unwrap(), 0);
        assert_eq!(b.queue.parked_depth().await.unwrap(), 0);
    });
    note(start, "every sample checked");
    drop((api, coordinator, w1, w2));
    rt.block_on(c.cleanup());
}

/// `digctl batch submit | status | wait | cancel` on a distributed cluster:
/// a batch file naming a local features file, refused whole with every bad
/// entry listed, then accepted, waited for and summed up.
#[test]
fn digctl_batch_commands_submit_follow_and_refuse() {
    std::env::set_var("OMP_NUM_THREADS", "1");
    let mut c = Cluster::distributed("batch-cli");
    c.set_env("DIG_WORKER_BATCH_SIZE", &BATCH.to_string());
    c.upload_model();
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let worker = c.start_worker();
    let features = dig_tests::fixture("features.npz");
    let dir = c.dir.path();
    std::fs::copy(&features, dir.join("p1.npz")).unwrap();
    let line = |samples: i64, seed: u64| {
        json!({"sequence": SEQUENCE, "features": "p1.npz", "num_samples": samples,
               "seed": seed, "steps": STEPS, "shard_size": 2})
        .to_string()
    };

    // Entries 1 and 3 are bad: refused whole, both named, nothing created.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "# three proteins\n{}\n{}\n{}\n{}\n",
            line(2, 1),
            line(0, 2),
            line(2, 3),
            json!({"sequence": "MKTAY", "features": "p1.npz", "num_samples": 1})
        ),
    )
    .unwrap();
    let err = c.client_err(&c.key_a, &["batch", "submit", bad.to_str().unwrap()]);
    assert!(err.contains("2 of 4 entries are invalid"), "{err}");
    assert!(err.contains("entry 1: num_samples"), "{err}");
    assert!(err.contains("entry 3: sequence length 5"), "{err}");
    let (_, jobs) = c.api_get(&c.key_a, "/v1/jobs");
    assert_eq!(
        serde_json::from_str::<Value>(&jobs).unwrap()["jobs"],
        json!([]),
        "a refused batch created jobs"
    );

    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        format!("{}\n{}\n{}\n", line(2, 1), line(4, 2), line(2, 1)),
    )
    .unwrap();
    let out = c.client_ok(
        &c.key_a,
        &["batch", "submit", good.to_str().unwrap(), "--name", "three"],
    );
    let batch = out.trim().to_string();
    c.client_ok(
        &c.key_a,
        &[
            "batch",
            "wait",
            &batch,
            "--poll-secs",
            "1",
            "--timeout",
            "300",
        ],
    );
    let status = c.client_ok(&c.key_a, &["batch", "status", &batch]);
    assert!(status.contains("state     succeeded"), "{status}");
    assert!(status.contains("jobs      3 (3 succeeded)"), "{status}");
    assert!(status.contains("samples   8 of 8"), "{status}");
    assert!(status.contains("name      three"), "{status}");
    let v: Value =
        serde_json::from_str(&c.client_ok(&c.key_a, &["batch", "status", "--json", &batch]))
            .unwrap();
    let ids: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    // Entries 0 and 2 are the same request: the same samples.
    let first = c.fetch(&c.key_a, &ids[0]);
    let third = c.fetch(&c.key_a, &ids[2]);
    let reference = local_sample(c.dir.path(), 2, 1, STEPS, BATCH);
    assert_same_samples(&first, &reference);
    assert_same_samples(&third, &reference);
    assert_same_samples(
        &c.fetch(&c.key_a, &ids[1]),
        &local_sample(c.dir.path(), 4, 2, STEPS, BATCH),
    );
    // Nothing left to cancel; another tenant does not see it.
    let err = c.client_err(&c.key_a, &["batch", "cancel", &batch]);
    assert!(
        err.contains("has ended (succeeded)") && err.contains("409"),
        "{err}"
    );
    let err = c.client_err(&c.key_b, &["batch", "status", &batch]);
    assert!(err.contains("not found") && err.contains("404"), "{err}");
    drop((api, coordinator, worker));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(c.cleanup());
}
