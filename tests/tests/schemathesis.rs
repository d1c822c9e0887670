//! Generated API testing: Schemathesis (from the project's venv) on every
//! route of `/openapi.json`, against `digctl standalone` as tenant a and
//! against `digctl api` on the real RabbitMQ, Redis and SeaweedFS as tenant
//! b. Every response must be no 5xx and conform to the document (status
//! code, content type, headers, body schema), and every request the
//! document calls valid must be accepted (`positive_data_acceptance`): the
//! document states every constraint a schema can state (patterns, lengths,
//! enums, bounds from the deployment's limits), and the refusals it cannot
//! state are excluded by name: `tests/schemathesis.toml` (the features
//! upload's body is an npz, the structures upload's a PDB) and
//! `tests/schemathesis_hooks.py` (features or structures never uploaded, a callback without a webhook secret, steering that
//! depends on the protein...). The stateful phase follows the document's links
//! (submit, then read, cancel, fetch) on the jobs and batches the API made. Afterwards
//! neither the object store, nor Redis, nor the queues hold anything that
//! belongs to no job.

use std::process::Command;

use dig_tests::cluster::Cluster;
use dig_tests::repo_root;

/// Runs Schemathesis against `c`'s API as `key`: the number of generated
/// cases and of the API links its stateful phase followed. Panics with its
/// report unless every check passed.
fn schemathesis(c: &Cluster, key: &str, seed: &str) -> (u64, u64) {
    let features = c.upload_features(key);
    // Structures of the fixture protein, for `from_structure`.
    let closed = std::fs::read(repo_root().join("tests/data/adk-fragment/closed.pdb")).unwrap();
    let (status, text) = c.api_post_bytes(key, "/v1/structures", &closed);
    assert!(status == 201 || status == 200, "{text}");
    let structures = serde_json::from_str::<serde_json::Value>(&text).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let config = repo_root().join("tests/schemathesis.toml");
    let out = Command::new(repo_root().join(".venv/bin/schemathesis"))
        .args([
            "--config-file",
            config.to_str().unwrap(),
            "run",
            &format!("{}/openapi.json", c.api_url),
            "-H",
            &format!("Authorization: Bearer {key}"),
            "--max-examples",
            "60",
            "--workers",
            "1",
            "--seed",
            seed,
            "--no-color",
        ])
        // Submissions made usable, so that the stateful phase follows the
        // links from them (tests/schemathesis_hooks.py).
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", repo_root().join("tests"))
        .env("DIG_SCHEMATHESIS_FEATURES", &features)
        .env("DIG_SCHEMATHESIS_STRUCTURES", &structures)
        .output()
        .expect("schemathesis in .venv (requirements-dev.txt; make test installs it)");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "  1796 generated, 1796 passed, 4 skipped"
    let line = report
        .lines()
        .find(|l| l.contains(" generated,"))
        .unwrap_or_else(|| panic!("no summary in:\n{report}"));
    let generated: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        line.contains(&format!("{generated} passed")),
        "not every case passed: {line}"
    );
    eprintln!("schemathesis: {}", line.trim());
    // "     API Links:    30 covered / 84 selected / 84 total (74 inferred)"
    let links = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("API Links:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no stateful phase in:\n{report}"));
    eprintln!("schemathesis: {links} API links followed in the stateful phase");
    (generated, links)
}

#[test]
fn generated_requests_get_documented_answers_and_no_5xx_in_both_modes() {
    let (c, _svc) = Cluster::standalone("schemathesis");
    let (standalone, links_a) = schemathesis(&c, &c.key_a, "1");

    // A coordinator and a worker too: the jobs the stateful phase submits
    // finish (1-3 samples of 1 step), so their event streams end.
    let mut d = Cluster::distributed("schemathesis");
    d.upload_model();
    let _api = d.start_api();
    let _coordinator = d.start_coordinator();
    let _worker = d.start_worker();
    let (distributed, links_b) = schemathesis(&d, &d.key_b, "2");
    assert!(
        links_a > 0 && links_b > 0,
        "the stateful phase followed no link ({links_a}, {links_b})"
    );
    assert!(
        standalone + distributed >= 1000,
        "{standalone} + {distributed} cases"
    );

    // No object without a job: every job key in the store has its spec and
    // a progress entry.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = rt.block_on(d.backends());
    // No message without a job: the coordinator took every job id and the
    // worker every shard (a cancelled job's shards are skipped and acked),
    // and nothing was parked.
    rt.block_on(async {
        use dig_common::queue::ShardQueue;
        b.wait_queues_drained(std::time::Duration::from_secs(120))
            .await;
        assert_eq!(b.queue.parked_depth().await.unwrap(), 0, "parked shards");
    });
    let objects = rt.block_on(b.objects());
    for key in &objects {
        if let Some(rest) = key.split("/jobs/").nth(1) {
            let id = rest.split('/').next().unwrap();
            assert!(
                objects
                    .iter()
                    .any(|k| k.ends_with(&format!("jobs/{id}/spec.json"))),
                "{key} belongs to no job spec"
            );
            let job = id.parse().unwrap();
            assert!(
                rt.block_on(dig_common::progress::ProgressStore::get(
                    b.progress.as_ref(),
                    job
                ))
                .unwrap()
                .is_some(),
                "{key} belongs to no job in the progress store"
            );
        }
    }
    // No Redis key without a job: every job's key family has the job's
    // entry and spec, and every Idempotency-Key names a job that exists.
    let keys = rt.block_on(b.redis_keys());
    let ns = &d.namespace;
    let client = redis::Client::open(std::env::var("DIG_TEST_REDIS").unwrap()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for key in &keys {
        let rest = &key[ns.len() + 1..];
        let job = if let Some(r) = rest.strip_prefix("job:") {
            r.split(':').next().unwrap().to_string()
        } else if rest.starts_with("idem:") {
            redis::cmd("GET")
                .arg(key)
                .query::<String>(&mut conn)
                .unwrap()
        } else {
            continue;
        };
        // A batch's webhook is kept under its id, beside its record.
        if objects
            .iter()
            .any(|k| k.ends_with(&format!("batches/{job}.json")))
        {
            continue;
        }
        assert!(
            keys.contains(&format!("{ns}:job:{job}")),
            "{key} belongs to no job in the progress store"
        );
        assert!(
            objects
                .iter()
                .any(|k| k.ends_with(&format!("jobs/{job}/spec.json"))),
            "{key} belongs to no job spec"
        );
    }
    rt.block_on(d.cleanup());
}
