//! The API against real RabbitMQ, Redis and SeaweedFS (S3), each test under
//! its own `test-{uuid}` prefix, cleaned up at the end. Servers come from
//! `scripts/services.sh` (`make test` runs it).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use dig_api::{new_api_key, router, ApiState, Limits, Tenants};
use dig_common::job::{JobId, JobSpec, JobState};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{JobStream, RabbitQueue, ShardQueue};
use dig_common::store::{open_store, FeatureStore, StoreConfig, StoreKind};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data");
const SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run scripts/services.sh (make test does)"))
}

struct Ctx {
    app: Router,
    queue: Arc<RabbitQueue>,
    redis: Arc<RedisProgress>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    prefix: String,
    key_a: String,
    key_b: String,
    _tmp: tempfile::TempDir,
}

async fn ctx() -> Ctx {
    ctx_with_limit(64 << 20).await
}

async fn ctx_with_limit(max_bytes: u64) -> Ctx {
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
    for file in ["config.json", "model.safetensors"] {
        let data = std::fs::read(format!("{FIXTURES}/{file}")).unwrap();
        store
            .put(
                &layout.model_file("dig-small", file),
                PutPayload::from(data),
            )
            .await
            .unwrap();
    }
    let queue = Arc::new(
        RabbitQueue::connect(&env("DIG_TEST_AMQP"), &prefix)
            .await
            .unwrap(),
    );
    let redis = Arc::new(
        RedisProgress::connect(&env("DIG_TEST_REDIS"), &prefix)
            .await
            .unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let features = Arc::new(
        FeatureStore::new(
            store.clone(),
            layout.clone(),
            max_bytes,
            tmp.path().join("up"),
        )
        .unwrap(),
    );
    let (key_a, sha_a) = new_api_key();
    let (key_b, sha_b) = new_api_key();
    let tenants_file = tmp.path().join("tenants");
    std::fs::write(
        &tenants_file,
        format!("# test tenants\nlab-a {sha_a}\n\nlab-b {sha_b}\n"),
    )
    .unwrap();
    let state = ApiState {
        queue: queue.clone(),
        store: store.clone(),
        layout: layout.clone(),
        features,
        progress: redis.clone(),
        tenants: Tenants::from_file(&tenants_file).unwrap(),
        limits: Limits {
            default_model: "dig-small".into(),
            ..Limits::default()
        },
    };
    Ctx {
        app: router(state),
        queue,
        redis,
        store,
        layout,
        prefix,
        key_a,
        key_b,
        _tmp: tmp,
    }
}

impl Ctx {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    async fn json(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, Value) {
        let (s, b) = self.call(method, uri, key, headers, body).await;
        let v = serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
        (s, v)
    }

    async fn upload(&self, key: &str) -> (StatusCode, Value) {
        let data = std::fs::read(format!("{FIXTURES}/features.npz")).unwrap();
        self.json("POST", "/v1/features", Some(key), &[], Body::from(data))
            .await
    }

    async fn submit(&self, key: &str, body: &Value, idem: Option<&str>) -> (StatusCode, Value) {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = idem {
            headers.push(("idempotency-key", k));
        }
        self.json(
            "POST",
            "/v1/jobs",
            Some(key),
            &headers,
            Body::from(body.to_string()),
        )
        .await
    }

    async fn keys_under(&self, dir: &str) -> Vec<String> {
        let p = object_store::path::Path::from(format!("{}/{dir}", self.prefix));
        self.store
            .list(Some(&p))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        self.queue.purge_and_delete().await.unwrap();
        self.redis.delete_all().await.unwrap();
        let all = self.keys_under("").await;
        for k in all {
            self.store.delete(&k.into()).await.unwrap();
        }
    }
}

/// The next job id on the jobs queue (acked), or `None` within `wait`.
async fn next_job(jobs: &mut JobStream, wait: Duration) -> Option<JobId> {
    match tokio::time::timeout(wait, jobs.next()).await {
        Err(_) => None,
        Ok(d) => {
            let d = d.unwrap().unwrap();
            let id = d.job;
            d.ack().await.unwrap();
            Some(id)
        }
    }
}

fn valid_job() -> Value {
    json!({"sequence": SEQUENCE, "num_samples": 10, "steps": 5, "seed": 7})
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
        .to_string()
}

#[tokio::test]
async fn features_upload_and_auth() {
    let c = ctx().await;
    let data = std::fs::read(format!("{FIXTURES}/features.npz")).unwrap();
    let sha = hex::encode(Sha256::digest(&data));

    let (s, v) = c.upload(&c.key_a).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v, json!({"sha256": sha, "length": 24, "bytes": data.len()}));
    let (s, v2) = c.upload(&c.key_a).await;
    assert_eq!(s, StatusCode::OK, "{v2}");
    assert_eq!(v2, v);
    // Another tenant uploading the same bytes owns them too.
    let (s, v3) = c.upload(&c.key_b).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v3, v);

    let (s, v) = c
        .json(
            "POST",
            "/v1/features",
            Some("wrong"),
            &[],
            Body::from(data.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, v) = c.json("GET", "/v1/jobs", None, &[], Body::empty()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(!message(&v).is_empty());

    let (s, v) = c
        .json(
            "POST",
            "/v1/features",
            Some(&c.key_a),
            &[],
            Body::from("not a zip"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(!message(&v).is_empty());

    let (s, b) = c.call("GET", "/healthz", None, &[], Body::empty()).await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, b"ok".as_slice()));
    c.cleanup().await;
}

#[tokio::test]
async fn job_submission_is_stored_tracked_and_queued_once() {
    let c = ctx().await;
    let mut jobs = c.queue.consume_jobs().await.unwrap();
    let (_, f) = c.upload(&c.key_a).await;
    let mut body = valid_job();
    body["features_sha256"] = f["sha256"].clone();

    let (s, v) = c.submit(&c.key_a, &body, Some("req-1")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id: JobId = v["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(v["state"], "queued");
    assert_eq!(v["links"]["self"], format!("/v1/jobs/{id}"));

    let spec: JobSpec = serde_json::from_slice(
        &c.store
            .get(&c.layout.job_spec(id))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec.tenant, "lab-a");
    assert_eq!(spec.model, "dig-small");
    assert_eq!((spec.num_samples, spec.seed, spec.steps), (10, 7, Some(5)));
    let p = c.redis.get(id).await.unwrap().unwrap();
    assert_eq!((p.state, p.tenant.as_str()), (JobState::Queued, "lab-a"));
    assert_eq!(next_job(&mut jobs, Duration::from_secs(10)).await, Some(id));

    // The same Idempotency-Key: the same job, nothing new published.
    let (s, v) = c.submit(&c.key_a, &body, Some("req-1")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id.to_string());
    assert_eq!(next_job(&mut jobs, Duration::from_secs(1)).await, None);

    let (s, v) = c
        .json(
            "GET",
            &format!("/v1/jobs/{id}"),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "queued");
    assert_eq!(v["shards"]["total"], spec.num_shards());
    assert_eq!(v["samples_done"], 0);
    let (s, v) = c
        .json(
            "GET",
            "/v1/jobs?limit=10",
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(v["jobs"][0]["id"], id.to_string());
    let (s, v) = c
        .json(
            "GET",
            &format!("/v1/jobs/{id}/results"),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(message(&v), "job has not succeeded yet");

    // Another tenant sees nothing of it.
    for uri in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/results")] {
        let (s, _) = c
            .json("GET", &uri, Some(&c.key_b), &[], Body::empty())
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
    }
    let (_, v) = c
        .json("GET", "/v1/jobs", Some(&c.key_b), &[], Body::empty())
        .await;
    assert_eq!(v["jobs"], json!([]));
    drop(jobs);
    c.cleanup().await;
}

#[tokio::test]
async fn invalid_submissions_leave_nothing_behind() {
    let c = ctx().await;
    let mut jobs = c.queue.consume_jobs().await.unwrap();
    let (_, f) = c.upload(&c.key_a).await;
    let sha = f["sha256"].as_str().unwrap().to_string();
    let with = |k: &str, v: Value| {
        let mut b = valid_job();
        b["features_sha256"] = json!(sha);
        b[k] = v;
        b
    };
    let cases = [
        (
            with("sequence", json!("MKTAYIAKQRQISFVKSHFSRQLB")),
            "letter",
        ),
        (with("sequence", json!("MKTAYIAKQRQ")), "length"),
        (with("num_samples", json!(0)), "num_samples"),
        (with("num_samples", json!(1_000_001)), "num_samples"),
        (with("steps", json!(501)), "steps"),
        (with("features_sha256", json!("ab".repeat(32))), "not found"),
        (with("features_sha256", json!("xyz")), "SHA-256"),
        (with("model", json!("no-such-model")), "no-such-model"),
        (with("model", json!("../x")), "model"),
        (json!({"sequence": SEQUENCE}), "features_sha256"),
    ];
    for (body, needle) in &cases {
        let (s, v) = c.submit(&c.key_a, body, None).await;
        assert!(s.is_client_error(), "{body}: {s} {v}");
        assert!(message(&v).contains(needle), "{body}: {v}");
    }
    // Features of another tenant are unknown to this one.
    let (s, v) = c.submit(&c.key_b, &with("seed", json!(1)), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    assert_eq!(c.keys_under("jobs").await, Vec::<String>::new());
    assert!(c
        .redis
        .list_jobs("lab-a", 10, None)
        .await
        .unwrap()
        .is_empty());
    assert!(c
        .redis
        .list_jobs("lab-b", 10, None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(next_job(&mut jobs, Duration::from_secs(1)).await, None);
    drop(jobs);
    c.cleanup().await;
}

#[tokio::test]
async fn oversized_upload_is_413_and_stores_nothing() {
    let c = ctx_with_limit(1000).await;
    let (s, v) = c.upload(&c.key_a).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(message(&v).contains("1000 bytes"), "{v}");
    assert_eq!(c.keys_under("features").await, Vec::<String>::new());
    assert_eq!(c.keys_under("tenants").await, Vec::<String>::new());
    c.cleanup().await;
}

#[tokio::test]
async fn results_of_a_succeeded_job() {
    let c = ctx().await;
    let (_, f) = c.upload(&c.key_a).await;
    let mut body = valid_job();
    body["features_sha256"] = f["sha256"].clone();
    let (s, v) = c.submit(&c.key_a, &body, None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id: JobId = v["id"].as_str().unwrap().parse().unwrap();

    // What the workers and the coordinator would do.
    let shard = b"shard bytes".to_vec();
    c.store
        .put(&c.layout.shard(id, 0), PutPayload::from(shard.clone()))
        .await
        .unwrap();
    let (s, b) = c
        .call(
            "GET",
            &format!("/v1/jobs/{id}/results/0"),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!((s, b), (StatusCode::OK, shard));
    let manifest = json!({"job": id, "num_samples": 10, "shards": []});
    c.store
        .put(
            &c.layout.manifest(id),
            PutPayload::from(manifest.to_string().into_bytes()),
        )
        .await
        .unwrap();
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();
    let (s, v) = c
        .json(
            "GET",
            &format!("/v1/jobs/{id}/results"),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, manifest));

    for uri in [
        format!("/v1/jobs/{id}/results/1"),
        format!("/v1/jobs/{id}/results/x"),
    ] {
        let (s, _) = c
            .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
    }
    let (s, _) = c
        .json(
            "GET",
            &format!("/v1/jobs/{id}/results/0"),
            Some(&c.key_b),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    c.cleanup().await;
}
