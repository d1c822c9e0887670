//! The API against real RabbitMQ, Redis and SeaweedFS (S3), each test under
//! its own `test-{uuid}` prefix, cleaned up at the end. Servers come from
//! `scripts/services.sh` (`make test` runs it).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use dig_api::{new_api_key, router, ApiState, Limits, Tenants};
use dig_common::job::{JobId, JobSpec, JobState, Priority};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{JobStream, RabbitQueue, ShardQueue};
use dig_common::store::{open_store, FeatureStore, StoreConfig, StoreKind};
use dig_model::features::Features;
use dig_model::sampling::{sample_ensemble, InitialPoses};
use dig_model::so3::So3Tables;
use dig_model::structure::Ensemble;
use dig_model::{DigModel, Sampler, Schedule};
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data");
const SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";

use dig_test_support::Servers;

struct Ctx {
    app: Router,
    queue: Arc<RabbitQueue>,
    redis: Arc<RedisProgress>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    key_a: String,
    key_b: String,
    _tmp: tempfile::TempDir,
    servers: Servers,
}

async fn ctx() -> Ctx {
    ctx_with(64 << 20, |_| {}).await
}

async fn ctx_with_limit(max_bytes: u64) -> Ctx {
    ctx_with(max_bytes, |_| {}).await
}

/// A test context whose state `tweak` may change before the router is built.
async fn ctx_with(max_bytes: u64, tweak: impl FnOnce(&mut ApiState)) -> Ctx {
    let servers = Servers::fresh().await;
    servers.upload_fixture_model().await;
    let (store, layout) = (servers.store.clone(), servers.layout.clone());
    let (queue, redis) = (servers.queue.clone(), servers.progress.clone());
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
    let mut state = ApiState {
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
        webhook_secrets: Default::default(),
        shutdown: tokio::sync::watch::channel(false).1,
        openapi: Default::default(),
    };
    tweak(&mut state);
    Ctx {
        app: router(state),
        queue,
        redis,
        store,
        layout,
        key_a,
        key_b,
        _tmp: tmp,
        servers,
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
        self.post_json("/v1/jobs", key, body, idem).await
    }

    /// A JSON POST with an optional Idempotency-Key.
    async fn post_json(
        &self,
        uri: &str,
        key: &str,
        body: &Value,
        idem: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = idem {
            headers.push(("idempotency-key", k));
        }
        self.json(
            "POST",
            uri,
            Some(key),
            &headers,
            Body::from(body.to_string()),
        )
        .await
    }

    /// Status, content type and the body, which may end in an error (a
    /// streamed response aborted mid-way).
    async fn fetch(
        &self,
        uri: &str,
        key: Option<&str>,
    ) -> (StatusCode, String, Result<Vec<u8>, String>) {
        let mut req = Request::builder().method("GET").uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string());
        (status, ctype, body)
    }

    /// Submits a job of tenant A through the API; its stored spec.
    async fn submitted(&self, num_samples: u64, shard_size: u64) -> JobSpec {
        let (_, f) = self.upload(&self.key_a).await;
        let mut body = valid_job();
        body["features_sha256"] = f["sha256"].clone();
        body["num_samples"] = json!(num_samples);
        body["shard_size"] = json!(shard_size);
        let (s, v) = self.submit(&self.key_a, &body, None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id: JobId = v["id"].as_str().unwrap().parse().unwrap();
        serde_json::from_slice(
            &self
                .store
                .get(&self.layout.job_spec(id))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap()
    }

    async fn keys_under(&self, dir: &str) -> Vec<String> {
        self.servers.objects_under(dir).await
    }

    async fn cleanup(self) {
        self.servers.cleanup().await;
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
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "not_finished");
    assert!(message(&v).contains("is not finished yet"), "{v}");

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
    let mut expected = manifest.clone();
    expected["complete"] = json!(true);
    assert_eq!((s, v), (StatusCode::OK, expected));

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

// ---------------------------------------------------------------- readiness

#[tokio::test]
async fn readyz_is_ready_when_every_dependency_answers() {
    let c = ctx().await;
    let (s, v) = c.json("GET", "/readyz", None, &[], Body::empty()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"status": "ready", "checks": {"queue": "ok", "progress": "ok", "store": "ok"}})
    );
    c.cleanup().await;
}

#[tokio::test]
async fn readyz_names_a_failing_dependency() {
    // A local store whose directory is replaced by a file: every request fails at once.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let broken = open_store(&StoreConfig {
        kind: StoreKind::Local,
        local_dir: Some(root.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::remove_dir(&root).unwrap();
    std::fs::write(&root, b"not a directory").unwrap();
    let c = ctx_with(64 << 20, |st| st.store = broken).await;
    let (s, v) = c.json("GET", "/readyz", None, &[], Body::empty()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["status"], "unavailable");
    assert_eq!(
        (&v["checks"]["queue"], &v["checks"]["progress"]),
        (&json!("ok"), &json!("ok"))
    );
    let store = v["checks"]["store"].as_str().unwrap();
    assert!(store.contains("Not a directory"), "{v}");
    assert_eq!(v["error"]["code"], "not_ready");
    assert_eq!(message(&v), format!("not ready: store: {store}"));
    c.cleanup().await;
}

#[tokio::test]
async fn readyz_does_not_hang_on_a_hung_dependency() {
    // An "S3 server" that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let hung = open_store(&StoreConfig {
        kind: StoreKind::S3,
        s3_endpoint: Some(format!("http://{addr}")),
        s3_bucket: Some("hung".into()),
        prefix: "p".into(),
        ..Default::default()
    })
    .unwrap();
    let c = ctx_with(64 << 20, |st| {
        st.store = hung;
        st.limits.ready_timeout = Duration::from_millis(500);
    })
    .await;
    let t0 = Instant::now();
    let (s, v) = c.json("GET", "/readyz", None, &[], Body::empty()).await;
    let took = t0.elapsed();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        v["checks"],
        json!({"queue": "ok", "progress": "ok", "store": "no answer within 500 ms"})
    );
    assert_eq!(message(&v), "not ready: store: no answer within 500 ms");
    server.abort();
    c.cleanup().await;
}

// ---------------------------------------------------------------- OpenAPI

/// Every route the router serves, with its methods.
const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/openapi.json", &["get"]),
    ("/v1/features", &["post"]),
    ("/v1/structures", &["post"]),
    ("/v1/models", &["get"]),
    ("/v1/jobs", &["get", "post"]),
    ("/v1/jobs/{id}", &["get"]),
    ("/v1/jobs/{id}/events", &["get"]),
    ("/v1/jobs/{id}/cancel", &["post"]),
    ("/v1/jobs/{id}/results", &["get"]),
    ("/v1/jobs/{id}/results.pdb", &["get"]),
    ("/v1/jobs/{id}/results.xtc", &["get"]),
    ("/v1/jobs/{id}/topology.pdb", &["get"]),
    ("/v1/jobs/{id}/results/{shard}", &["get"]),
    ("/v1/batches", &["post"]),
    ("/v1/batches/{id}", &["get"]),
    ("/v1/batches/{id}/cancel", &["post"]),
];

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let c = ctx().await;
    let (s, doc) = c
        .json("GET", "/openapi.json", None, &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
    assert_eq!(documented, served);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": "A tenant's API key"})
    );
    for (path, methods) in ROUTES {
        let item = paths[*path].as_object().unwrap();
        let listed: BTreeSet<&str> = item.keys().map(String::as_str).collect();
        assert_eq!(listed, methods.iter().copied().collect(), "{path}");
        for m in *methods {
            let security = &item[*m]["security"];
            if path.starts_with("/v1/") {
                assert_eq!(security, &json!([{"bearer": []}]), "{m} {path}");
            } else {
                assert!(security.is_null(), "{m} {path}: {security}");
            }
            // The router serves it: a handler's answer, not the router's
            // empty 404 or 405.
            let uri = path
                .replace("{id}", &JobId::new().to_string())
                .replace("{shard}", "0");
            let (status, body) = c
                .call(&m.to_uppercase(), &uri, Some(&c.key_a), &[], Body::empty())
                .await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
            assert!(
                status != StatusCode::NOT_FOUND || !body.is_empty(),
                "{m} {uri} is not routed"
            );
        }
    }
    let job = &doc["components"]["schemas"]["JobView"]["properties"];
    for field in ["state", "samples_per_sec", "eta_seconds", "links"] {
        assert!(job[field].is_object(), "JobView.{field}: {job}");
    }
    let states = &doc["components"]["schemas"]["JobState"]["enum"];
    assert_eq!(
        states,
        &json!(["queued", "running", "succeeded", "failed", "cancelled"])
    );
    c.cleanup().await;
}

#[tokio::test]
async fn the_document_states_the_deployments_limits_and_the_fields_formats() {
    let c = ctx_with(1 << 30, |st| {
        st.limits.max_num_samples = 777;
        st.limits.max_steps = 321;
        st.limits.max_shard_size = 99;
        st.limits.max_batch_entries = 12;
        st.limits.max_page = 33;
        st.limits.default_page = 10;
    })
    .await;
    let (_, doc) = c
        .json("GET", "/openapi.json", None, &[], Body::empty())
        .await;
    let job = &doc["components"]["schemas"]["SubmitJob"]["properties"];
    assert_eq!(job["num_samples"]["maximum"], 777);
    assert_eq!(job["steps"]["maximum"], 321);
    assert_eq!(job["shard_size"]["maximum"], 99);
    assert_eq!(job["features_sha256"]["pattern"], "^[0-9a-f]{64}$");
    assert_eq!(job["sequence"]["minLength"], 1);
    assert_eq!(job["name"]["maxLength"], 200);
    assert_eq!(
        doc["components"]["schemas"]["Solver"]["enum"],
        json!(["euler", "exp", "heun", "ab2", "flow"])
    );
    assert_eq!(job["steering"]["properties"]["particles"]["maximum"], 64);
    assert_eq!(
        doc["components"]["schemas"]["SubmitBatch"]["properties"]["jobs"]["maxItems"],
        12
    );
    let limit = doc["paths"]["/v1/jobs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(limit["schema"]["maximum"], 33);
    // A well-formed cursor naming none of the tenant's jobs: not found
    // (schema-valid, so not a 400); a malformed one: 400.
    let (s, v) = c
        .json(
            "GET",
            &format!("/v1/jobs?cursor={}", JobId::new()),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(message(&v).starts_with("cursor: "), "{v}");
    let (s, v) = c
        .json(
            "GET",
            "/v1/jobs?cursor=abc",
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (s, message(&v)),
        (StatusCode::BAD_REQUEST, "cursor: not a job id".into())
    );
    c.cleanup().await;
}

// ---------------------------------------------------------------- models

#[tokio::test]
async fn models_are_listed_with_config_and_weight_size() {
    let c = ctx().await;
    let cfg = json!({"d_model": 8, "note": "config only"});
    c.store
        .put(
            &c.layout.model_file("alpha", "config.json"),
            PutPayload::from(cfg.to_string().into_bytes()),
        )
        .await
        .unwrap();
    // Weights without a config: not a model.
    c.store
        .put(
            &c.layout.model_file("zeta", "model.safetensors"),
            PutPayload::from(vec![0u8; 10]),
        )
        .await
        .unwrap();
    let (s, v) = c.json("GET", "/v1/models", None, &[], Body::empty()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = c
        .json("GET", "/v1/models", Some(&c.key_b), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/config.json")).unwrap()).unwrap();
    let weights = std::fs::metadata(format!("{FIXTURES}/model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(
        v,
        json!({"models": [
            {"id": "alpha", "config": cfg, "bytes": null},
            {"id": "dig-small", "config": fixture, "bytes": weights},
        ]})
    );
    c.cleanup().await;
}

// ---------------------------------------------------------------- job view

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn job_view_reports_throughput_and_eta() {
    let c = ctx().await;
    let spec = c.submitted(10, 4).await;
    let id = spec.id;
    let uri = format!("/v1/jobs/{id}");
    let (_, v) = c
        .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(
        (&v["samples_per_sec"], &v["eta_seconds"]),
        (&Value::Null, &Value::Null)
    );

    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    assert!(c.redis.record_shard_done(id, 0, 4).await.unwrap());
    // Time passing is the point: the rate needs a whole second since the start.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = now_secs();
    let (s, v) = c
        .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
        .await;
    let after = now_secs();
    assert_eq!(s, StatusCode::OK, "{v}");
    let started = v["started_at"].as_u64().unwrap();
    let rate = v["samples_per_sec"].as_f64().unwrap();
    // 4 samples over the whole seconds since the start, as of the request.
    let possible: Vec<f64> = (before..=after)
        .map(|now| 4.0 / (now - started) as f64)
        .collect();
    assert!(possible.contains(&rate), "{rate} not in {possible:?}");
    assert_eq!(v["eta_seconds"], json!((6.0 / rate).ceil() as u64), "{v}");
    // The list shows the same view.
    let (_, list) = c
        .json("GET", "/v1/jobs", Some(&c.key_a), &[], Body::empty())
        .await;
    assert!(list["jobs"][0]["samples_per_sec"].is_f64(), "{list}");

    assert!(c.redis.record_shard_done(id, 1, 4).await.unwrap());
    assert!(c.redis.record_shard_done(id, 2, 2).await.unwrap());
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();
    // Time passing is the point: now is past finished_at, so a rate measured
    // to now would differ from the one measured to finished_at.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, v) = c
        .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
        .await;
    let finished = v["finished_at"].as_u64().unwrap();
    assert!(finished > started, "{v}");
    // Final: measured up to finished_at, not to now.
    assert_eq!(
        v["samples_per_sec"],
        json!(10.0 / (finished - started) as f64)
    );
    assert_eq!(v["eta_seconds"], 0);
    assert_eq!(v["samples_done"], 10);
    c.cleanup().await;
}

// ---------------------------------------------------------------- cancel

#[tokio::test]
async fn cancel_stops_a_job_once() {
    let c = ctx().await;
    let queued = c.submitted(10, 4).await.id;
    let running = c.submitted(10, 4).await.id;
    c.redis
        .set_state(running, JobState::Running, None)
        .await
        .unwrap();
    let cancel = |id: JobId| format!("/v1/jobs/{id}/cancel");

    let (s, _) = c
        .json("POST", &cancel(queued), None, &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = c
        .json("POST", &cancel(queued), Some(&c.key_b), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(message(&v), format!("job {queued} not found"));
    let (s, _) = c
        .json(
            "POST",
            &cancel(JobId::new()),
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    for id in [queued, running] {
        let (s, v) = c
            .json("POST", &cancel(id), Some(&c.key_a), &[], Body::empty())
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["id"], id.to_string());
        assert_eq!(v["state"], "cancelled");
        assert_eq!(v["eta_seconds"], 0);
        assert!(v["finished_at"].is_u64(), "{v}");
        assert_eq!(
            c.redis.get(id).await.unwrap().unwrap().state,
            JobState::Cancelled
        );
        // The API writes the state marker itself: a Redis loss before any
        // coordinator saw the cancel still rebuilds the job as cancelled.
        let marker = c.store.get(&c.layout.job_state(id)).await.unwrap();
        let m: dig_common::job::StateMarker =
            serde_json::from_slice(&marker.bytes().await.unwrap()).unwrap();
        assert_eq!((m.job, m.state, m.error), (id, JobState::Cancelled, None));
    }
    let (s, v) = c
        .json("POST", &cancel(queued), Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "already_final");
    assert!(
        message(&v).starts_with(&format!("job {queued} has already been cancelled")),
        "{v}"
    );

    let done = c.submitted(10, 4).await.id;
    c.redis
        .set_state(done, JobState::Succeeded, None)
        .await
        .unwrap();
    let (s, v) = c
        .json("POST", &cancel(done), Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        message(&v).starts_with(&format!("job {done} has already succeeded")),
        "{v}"
    );
    assert_eq!(
        c.redis.get(done).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
    c.cleanup().await;
}

// ---------------------------------------------------------------- PDB results

/// Samples every shard of `spec` with the fixture model, as a worker would.
fn sample_shards(spec: &JobSpec) -> Vec<Ensemble> {
    let dir = std::path::Path::new(FIXTURES);
    let model = DigModel::load_dir(dir, tch::Device::Cpu).unwrap();
    let cfg = model.net.config().clone();
    let features = Features::from_npz(&dir.join("features.npz")).unwrap();
    let ctx = model.net.prepare(&features.single, &features.pair, 1 << 30);
    let so3 = So3Tables::compute();
    let sampler = Sampler::new(&model.net, Schedule::new(&cfg, &so3, spec.steps).unwrap());
    (0..spec.num_shards())
        .map(|i| {
            let task = spec.shard(i);
            let init = InitialPoses::Seeded {
                seed: spec.seed,
                indices: (task.start..task.end).collect(),
            };
            sample_ensemble(
                &sampler,
                &ctx,
                &init,
                4,
                cfg.tr_sigma_max,
                &spec.sequence,
                |_| {},
            )
        })
        .collect()
}

/// MODEL numbers and ATOM coordinates of a PDB text, by model.
fn parse_pdb(text: &str) -> Vec<(u64, Vec<[f32; 3]>)> {
    let mut models: Vec<(u64, Vec<[f32; 3]>)> = Vec::new();
    for line in text.lines() {
        assert_eq!(line.len(), 80, "{line:?}");
        if line.starts_with("MODEL ") {
            models.push((line[10..14].trim().parse().unwrap(), Vec::new()));
        } else if line.starts_with("ATOM  ") {
            let xyz = [30, 38, 46].map(|c| line[c..c + 8].trim().parse::<f32>().unwrap());
            models.last_mut().unwrap().1.push(xyz);
        }
    }
    models
}

#[tokio::test]
async fn pdb_results_of_a_succeeded_job() {
    let c = ctx().await;
    let spec = c.submitted(10, 4).await;
    let id = spec.id;
    let shards = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || sample_shards(&spec))
            .await
            .unwrap()
    };
    assert_eq!(shards.len(), 3);
    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    for (i, e) in shards.iter().enumerate() {
        c.store
            .put(
                &c.layout.shard(id, i as u64),
                PutPayload::from(e.npz_bytes().unwrap()),
            )
            .await
            .unwrap();
        c.redis
            .record_shard_done(id, i as u64, e.num_samples() as u64)
            .await
            .unwrap();
    }

    // A shard as PDB while the job still runs; the suffix and the query agree.
    let (s, ctype, pdb1) = c
        .fetch(
            &format!("/v1/jobs/{id}/results/1?format=pdb"),
            Some(&c.key_a),
        )
        .await;
    let pdb1 = String::from_utf8(pdb1.unwrap()).unwrap();
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::OK, "chemical/x-pdb"),
        "{pdb1}"
    );
    let (_, _, again) = c
        .fetch(&format!("/v1/jobs/{id}/results/1.pdb"), Some(&c.key_a))
        .await;
    assert_eq!(again.unwrap(), pdb1.as_bytes());
    // The coordinates are those of the npz the API serves, read by the model crate.
    let (_, _, npz) = c
        .fetch(&format!("/v1/jobs/{id}/results/1"), Some(&c.key_a))
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let npz_path = tmp.path().join("1.npz");
    std::fs::write(&npz_path, npz.unwrap()).unwrap();
    let from_npz = Ensemble::read_npz(&npz_path, spec.sequence.clone()).unwrap();
    assert_eq!(from_npz.sample_index, vec![4, 5, 6, 7]);
    let models = parse_pdb(&pdb1);
    assert_eq!(
        models.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    for (k, (_, atoms)) in models.iter().enumerate() {
        // N, CA, C, O per residue.
        let expected: Vec<[f32; 3]> = from_npz
            .backbone_with_oxygen(k)
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(atoms.len(), 4 * SEQUENCE.len());
        for (a, e) in atoms.iter().zip(&expected) {
            for d in 0..3 {
                assert!((a[d] - e[d]).abs() <= 5.1e-4, "model {k}: {a:?} vs {e:?}");
            }
        }
    }
    assert!(pdb1.starts_with(&format!(
        "{:<80}\n",
        "REMARK   1 DIG MODEL    5 SAMPLE_INDEX 4"
    )));
    assert!(pdb1.ends_with(&format!("{:<80}\n{:<80}\n", "ENDMDL", "END")));

    // The whole job: not before it succeeded.
    let uri = format!("/v1/jobs/{id}/results.pdb");
    let (s, _, b) = c.fetch(&uri, Some(&c.key_a)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "not_succeeded");
    assert!(message(&v).contains("has not succeeded (it is"), "{v}");
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();
    let (s, ctype, all) = c.fetch(&uri, Some(&c.key_a)).await;
    let all = String::from_utf8(all.unwrap()).unwrap();
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::OK, "chemical/x-pdb"),
        "{all}"
    );
    let models = parse_pdb(&all);
    assert_eq!(
        models.iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>()
    );
    assert_eq!(all.lines().filter(|l| l.trim_end() == "END").count(), 1);
    assert_eq!(all.lines().last().unwrap().trim_end(), "END");
    // Byte for byte what the model crate writes for the whole ensemble.
    let whole = Ensemble {
        sequence: spec.sequence.clone(),
        sample_index: shards.iter().flat_map(|e| e.sample_index.clone()).collect(),
        tr: shards.iter().flat_map(|e| e.tr.clone()).collect(),
        rot_mat: shards.iter().flat_map(|e| e.rot_mat.clone()).collect(),
        steer: None,
        log_density: None,
    };
    let mut expected = Vec::new();
    whole.write_pdb(&mut expected).unwrap();
    assert_eq!(all, String::from_utf8(expected).unwrap());

    // Other tenants see nothing.
    let (s, _, _) = c.fetch(&uri, Some(&c.key_b)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = c.fetch(&uri, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    c.cleanup().await;
}

#[tokio::test]
async fn pdb_results_refusals_and_aborts() {
    let c = ctx().await;
    let spec = c.submitted(10, 4).await;
    let id = spec.id;
    let e = |v: &[u8]| -> Value { serde_json::from_slice(v).unwrap() };

    // Conflicting or unknown formats.
    for uri in [
        format!("/v1/jobs/{id}/results/0.pdb?format=npz"),
        format!("/v1/jobs/{id}/results/0?format=cif"),
    ] {
        let (s, _, b) = c.fetch(&uri, Some(&c.key_a)).await;
        let v = e(&b.unwrap());
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert!(message(&v).contains("format"), "{v}");
    }
    let (s, _, b) = c
        .fetch(&format!("/v1/jobs/{id}/results/0.pdb"), Some(&c.key_a))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        message(&e(&b.unwrap())),
        format!("shard 0 of job {id} is not done yet")
    );

    // A succeeded job that lacks a shard: an error before the first byte.
    let sample = |indices: std::ops::Range<i64>| {
        let n = indices.clone().count();
        let l = SEQUENCE.len();
        Ensemble {
            sequence: SEQUENCE.into(),
            sample_index: indices.collect(),
            tr: (0..n * l * 3).map(|x| x as f32 * 0.01).collect(),
            rot_mat: (0..n * l)
                .flat_map(|_| [1., 0., 0., 0., 1., 0., 0., 0., 1.])
                .collect(),
            steer: None,
            log_density: None,
        }
    };
    for (i, r) in [(0, 0..4), (2, 8..10)] {
        c.store
            .put(
                &c.layout.shard(id, i),
                PutPayload::from(sample(r).npz_bytes().unwrap()),
            )
            .await
            .unwrap();
    }
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();
    let uri = format!("/v1/jobs/{id}/results.pdb");
    let (s, _, b) = c.fetch(&uri, Some(&c.key_a)).await;
    let v = e(&b.unwrap());
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "results_incomplete");
    assert_eq!(
        message(&v),
        format!("shard 1 of job {id} is missing from the object store")
    );

    // A shard that turns out unreadable mid-stream aborts the body.
    c.store
        .put(
            &c.layout.shard(id, 1),
            PutPayload::from(b"not an npz".to_vec()),
        )
        .await
        .unwrap();
    let (s, _, b) = c.fetch(&uri, Some(&c.key_a)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.is_err(), "the body should end in an error");
    // The same shard alone: a JSON error.
    let (s, _, b) = c
        .fetch(&format!("/v1/jobs/{id}/results/1.pdb"), Some(&c.key_a))
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(e(&b.unwrap())["error"]["code"], "internal");

    // More samples than PDB model numbers.
    let big = c.submitted(10_000, 1000).await.id;
    c.redis
        .set_state(big, JobState::Succeeded, None)
        .await
        .unwrap();
    let (s, _, b) = c
        .fetch(&format!("/v1/jobs/{big}/results.pdb"), Some(&c.key_a))
        .await;
    let v = e(&b.unwrap());
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "pdb_unavailable");
    assert!(message(&v).contains("10000"), "{v}");
    assert!(message(&v).contains("npz"), "{v}");
    let (s, _, _) = c
        .fetch(&format!("/v1/jobs/{big}/results/9.pdb"), Some(&c.key_a))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    c.cleanup().await;
}

// ---------------------------------------------------------------- XTC results

/// Samples `indices` of a synthetic ensemble of the test protein (proper
/// rotations, distinct coordinates per sample).
fn synthetic(indices: std::ops::Range<i64>) -> Ensemble {
    let l = SEQUENCE.len();
    let (mut tr, mut rot) = (Vec::new(), Vec::new());
    for s in indices.clone() {
        for r in 0..l {
            let a = 0.3 * s as f32 + 0.7 * r as f32;
            tr.extend([3.8 * r as f32, 1.5 * a.sin() - s as f32, 2.0 * a.cos()]);
            let (c, n) = (a.cos(), a.sin());
            rot.extend([c, -n, 0.0, n, c, 0.0, 0.0, 0.0, 1.0]);
        }
    }
    Ensemble {
        sequence: SEQUENCE.into(),
        sample_index: indices.collect(),
        tr,
        rot_mat: rot,
        steer: None,
        log_density: None,
    }
}

#[tokio::test]
async fn xtc_results_and_topology_of_a_succeeded_job() {
    let c = ctx().await;
    let spec = c.submitted(10, 4).await;
    let id = spec.id;
    let shards = [synthetic(0..4), synthetic(4..8), synthetic(8..10)];
    for (i, e) in shards.iter().enumerate() {
        c.store
            .put(
                &c.layout.shard(id, i as u64),
                PutPayload::from(e.npz_bytes().unwrap()),
            )
            .await
            .unwrap();
    }
    let (xtc, top) = (
        format!("/v1/jobs/{id}/results.xtc"),
        format!("/v1/jobs/{id}/topology.pdb"),
    );
    // Not before the job succeeded.
    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    for uri in [&xtc, &top] {
        let (s, _, b) = c.fetch(uri, Some(&c.key_a)).await;
        assert_eq!(s, StatusCode::CONFLICT, "{uri}");
        let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "not_succeeded");
        assert!(
            message(&v).contains("has not succeeded (it is running)"),
            "{v}"
        );
    }
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();

    // Byte for byte the model crate's XTC of the whole ensemble, and its
    // topology (sample 0's atoms).
    let whole = Ensemble {
        sequence: SEQUENCE.into(),
        sample_index: (0..10).collect(),
        tr: shards.iter().flat_map(|e| e.tr.clone()).collect(),
        rot_mat: shards.iter().flat_map(|e| e.rot_mat.clone()).collect(),
        steer: None,
        log_density: None,
    };
    let (s, ctype, body) = c.fetch(&xtc, Some(&c.key_a)).await;
    assert_eq!(
        (s, ctype.as_str()),
        (StatusCode::OK, "application/octet-stream")
    );
    assert!(
        body.unwrap() == dig_model::xtc::xtc_bytes(&whole, None).unwrap(),
        "results.xtc differs from XtcWriter's bytes of the whole ensemble"
    );
    let (s, ctype, body) = c.fetch(&top, Some(&c.key_a)).await;
    assert_eq!((s, ctype.as_str()), (StatusCode::OK, "chemical/x-pdb"));
    let mut expected = Vec::new();
    whole.write_topology_pdb(0, &mut expected).unwrap();
    assert_eq!(
        String::from_utf8(body.unwrap()).unwrap(),
        String::from_utf8(expected).unwrap()
    );

    // Other tenants see nothing; no key, 401.
    for uri in [&xtc, &top] {
        let (s, _, _) = c.fetch(uri, Some(&c.key_b)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        let (s, _, _) = c.fetch(uri, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
    }

    // A shard that turns out unreadable mid-stream aborts the body.
    c.store
        .put(
            &c.layout.shard(id, 1),
            PutPayload::from(b"not an npz".to_vec()),
        )
        .await
        .unwrap();
    let (s, _, b) = c.fetch(&xtc, Some(&c.key_a)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.is_err(), "the body should end in an error");
    // A missing shard: an error before the first byte; without shard 0 no topology.
    for i in [1, 0] {
        c.store.delete(&c.layout.shard(id, i)).await.unwrap();
    }
    for (uri, missing) in [(&xtc, 0), (&top, 0)] {
        let (s, _, b) = c.fetch(uri, Some(&c.key_a)).await;
        let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{uri}: {v}");
        assert_eq!(v["error"]["code"], "results_incomplete");
        assert_eq!(
            message(&v),
            format!("shard {missing} of job {id} is missing from the object store")
        );
    }
    c.cleanup().await;
}

/// The real queue, except that job ids cannot be published (a broker that
/// went away between the store writes and the publish).
struct JobsQueueDown(Arc<dyn ShardQueue>);

#[async_trait::async_trait]
impl ShardQueue for JobsQueueDown {
    async fn publish_shard(
        &self,
        task: &dig_common::job::ShardTask,
        priority: dig_common::job::Priority,
    ) -> dig_common::Result<()> {
        self.0.publish_shard(task, priority).await
    }
    async fn publish_job(&self, _job: JobId) -> dig_common::Result<()> {
        Err(dig_common::CommonError::Other("broker unreachable".into()))
    }
    async fn park_shard(
        &self,
        task: &dig_common::job::ShardTask,
        reason: &str,
    ) -> dig_common::Result<()> {
        self.0.park_shard(task, reason).await
    }
    async fn consume_shards(
        &self,
        prefetch: u16,
    ) -> dig_common::Result<dig_common::queue::ShardStream> {
        self.0.consume_shards(prefetch).await
    }
    async fn consume_jobs(&self) -> dig_common::Result<JobStream> {
        self.0.consume_jobs().await
    }
    async fn shard_queue_depth(&self) -> dig_common::Result<u64> {
        self.0.shard_queue_depth().await
    }
    async fn parked_depth(&self) -> dig_common::Result<u64> {
        self.0.parked_depth().await
    }
    async fn purge_and_delete(&self) -> dig_common::Result<()> {
        self.0.purge_and_delete().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_that_cannot_be_queued_is_undone_and_its_key_released() {
    let c = ctx_with(64 << 20, |st| {
        st.queue = Arc::new(JobsQueueDown(st.queue.clone()));
    })
    .await;
    let (_, f) = c.upload(&c.key_a).await;
    let mut body = valid_job();
    body["features_sha256"] = f["sha256"].clone();
    let (status, v) = c.submit(&c.key_a, &body, Some("retry-me")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    // Nothing of the job remains: no spec, no progress entry, no listing.
    assert_eq!(c.keys_under("jobs").await, Vec::<String>::new());
    assert_eq!(
        c.redis.list_jobs("lab-a", 10, None).await.unwrap(),
        Vec::<JobId>::new()
    );
    assert_eq!(
        c.redis.unfinished_jobs().await.unwrap(),
        Vec::<JobId>::new()
    );
    // And the key is free again: a retry would create the job.
    let fresh = JobId::new();
    assert_eq!(
        c.redis
            .idempotent_job("lab-a", "retry-me", fresh)
            .await
            .unwrap(),
        fresh
    );
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_filters_by_state_across_pages() {
    let c = ctx().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(c.submitted(10, 10).await.id);
    }
    for &i in [0, 2, 4].iter() {
        c.redis
            .set_state(ids[i], JobState::Running, None)
            .await
            .unwrap();
    }
    let page = |uri: String| {
        let c = &c;
        async move {
            let (s, v) = c
                .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let got: Vec<String> = v["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_string())
                .collect();
            (got, v["next_cursor"].as_str().map(str::to_string))
        }
    };
    // Newest first, two per page, only the running ones.
    let (first, next) = page("/v1/jobs?state=running&limit=2".into()).await;
    assert_eq!(first, vec![ids[4].to_string(), ids[2].to_string()]);
    let next = next.expect("a second page");
    let (second, end) = page(format!("/v1/jobs?state=running&limit=2&cursor={next}")).await;
    assert_eq!(second, vec![ids[0].to_string()]);
    assert_eq!(end, None);
    let (queued, _) = page("/v1/jobs?state=queued".into()).await;
    assert_eq!(queued, vec![ids[3].to_string(), ids[1].to_string()]);
    let (s, v) = c
        .json(
            "GET",
            "/v1/jobs?state=done",
            Some(&c.key_a),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("unknown state 'done'"), "{v}");
    c.cleanup().await;
}

impl Ctx {
    async fn submit_batch(
        &self,
        key: &str,
        body: &Value,
        idem: Option<&str>,
    ) -> (StatusCode, Value) {
        self.post_json("/v1/batches", key, body, idem).await
    }

    /// Nothing of any job or batch exists: no object, no progress entry,
    /// no listing of either tenant.
    async fn assert_nothing_created(&self) {
        assert_eq!(self.keys_under("jobs").await, Vec::<String>::new());
        assert_eq!(self.keys_under("batches").await, Vec::<String>::new());
        for tenant in ["lab-a", "lab-b"] {
            assert_eq!(
                self.redis.list_jobs(tenant, 10, None).await.unwrap(),
                Vec::<JobId>::new()
            );
        }
        assert_eq!(
            self.redis.unfinished_jobs().await.unwrap(),
            Vec::<JobId>::new()
        );
    }
}

fn ids_of(v: &Value) -> Vec<JobId> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_all_or_nothing_aggregated_and_cancelled_whole() {
    let c = ctx().await;
    let mut jobs = c.queue.consume_jobs().await.unwrap();
    let (_, f) = c.upload(&c.key_a).await;
    let entry = |samples: u64| {
        let mut b = valid_job();
        b["features_sha256"] = f["sha256"].clone();
        b["num_samples"] = json!(samples);
        b
    };

    // Two bad entries of five: 400 naming both by index, nothing created.
    let mut bad_model = entry(2);
    bad_model["model"] = json!("no-such-model");
    let body =
        json!({"name": "proteome", "jobs": [entry(2), entry(0), entry(3), bad_model, entry(1)]});
    let (s, v) = c.submit_batch(&c.key_a, &body, Some("b-1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_batch");
    let entries = v["error"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{v}");
    assert_eq!(
        (entries[0]["index"].as_u64(), entries[1]["index"].as_u64()),
        (Some(1), Some(3))
    );
    assert!(
        entries[0]["message"]
            .as_str()
            .unwrap()
            .contains("num_samples"),
        "{v}"
    );
    assert_eq!(entries[1]["code"], "unknown_model");
    assert!(message(&v).starts_with("2 of 5 entries are invalid"), "{v}");
    // Whole-request errors.
    let (s, v) = c.submit_batch(&c.key_a, &json!({"jobs": []}), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("1 to 10000 entries"), "{v}");
    let (s, v) = c
        .submit_batch(&c.key_a, &json!({"jobs": [entry(1)], "colour": 1}), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("colour"), "{v}");
    c.assert_nothing_created().await;
    assert_eq!(next_job(&mut jobs, Duration::from_millis(500)).await, None);

    // Three good entries (the key was not used up by the refusal).
    let mut live = entry(4);
    live["priority"] = json!("interactive");
    let body = json!({"name": "proteome", "jobs": [entry(2), live, entry(3)]});
    let (s, v) = c.submit_batch(&c.key_a, &body, Some("b-1")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let batch = v["id"].as_str().unwrap().to_string();
    let ids = ids_of(&v);
    assert_eq!(ids.len(), 3);
    assert_eq!(v["links"]["self"], format!("/v1/batches/{batch}"));
    // Queued in entry order, each once; bulk unless the entry said otherwise.
    for &id in &ids {
        assert_eq!(next_job(&mut jobs, Duration::from_secs(5)).await, Some(id));
    }
    assert_eq!(next_job(&mut jobs, Duration::from_millis(500)).await, None);
    let mut priorities = Vec::new();
    for &id in &ids {
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
        priorities.push(spec.priority);
    }
    assert_eq!(
        priorities,
        [Priority::Bulk, Priority::Interactive, Priority::Bulk]
    );

    // Aggregated view.
    let uri = format!("/v1/batches/{batch}");
    let (s, v) = c
        .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["state"].as_str(),
            v["num_jobs"].as_u64(),
            v["num_samples"].as_u64()
        ),
        (Some("queued"), Some(3), Some(9))
    );
    assert_eq!(v["jobs_by_state"]["queued"], 3);
    assert_eq!(ids_of(&v), ids);
    // Another tenant sees nothing; a repeat with the key answers the batch.
    let (s, _) = c
        .json("GET", &uri, Some(&c.key_b), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = c.submit_batch(&c.key_a, &body, Some("b-1")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"].as_str(), Some(batch.as_str()));
    assert_eq!(c.redis.list_jobs("lab-a", 10, None).await.unwrap().len(), 3);

    // One job runs and succeeds, one runs; then the batch is cancelled: the
    // finished job keeps its state, the others are cancelled.
    c.redis
        .set_state(ids[0], JobState::Running, None)
        .await
        .unwrap();
    c.redis.record_shard_done(ids[0], 0, 2).await.unwrap();
    c.redis
        .set_state(ids[0], JobState::Succeeded, None)
        .await
        .unwrap();
    c.redis
        .set_state(ids[1], JobState::Running, None)
        .await
        .unwrap();
    let (_, v) = c
        .json("GET", &uri, Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(
        (v["state"].as_str(), v["samples_done"].as_u64()),
        (Some("running"), Some(2))
    );
    assert_eq!(v["finished_at"], Value::Null);
    let cancel = format!("{uri}/cancel");
    let (s, v) = c
        .json("POST", &cancel, Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "cancelled");
    assert_eq!(
        (
            v["jobs_by_state"]["succeeded"].as_u64(),
            v["jobs_by_state"]["cancelled"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert!(v["finished_at"].as_u64().is_some(), "{v}");
    for (&id, want) in ids.iter().zip([
        JobState::Succeeded,
        JobState::Cancelled,
        JobState::Cancelled,
    ]) {
        assert_eq!(c.redis.get(id).await.unwrap().unwrap().state, want);
    }
    // Each job this cancel ended has its state marker (a Redis loss keeps
    // it cancelled); the succeeded one has none.
    for (&id, marked) in ids.iter().zip([false, true, true]) {
        match c.store.get(&c.layout.job_state(id)).await {
            Ok(r) => {
                assert!(marked, "job {id} got a marker");
                let m: dig_common::job::StateMarker =
                    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                assert_eq!((m.job, m.state), (id, JobState::Cancelled));
            }
            Err(object_store::Error::NotFound { .. }) => assert!(!marked, "job {id}: no marker"),
            Err(e) => panic!("{e}"),
        }
    }
    let (s, v) = c
        .json("POST", &cancel, Some(&c.key_a), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("has ended (cancelled)"), "{v}");
    let (s, _) = c
        .json("POST", &cancel, Some(&c.key_b), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    drop(jobs);
    c.cleanup().await;
}

#[tokio::test]
async fn a_batch_past_the_tenant_limits_is_refused_whole() {
    let c = ctx_with(64 << 20, |st| st.limits.max_jobs_per_tenant = 2).await;
    let (_, f) = c.upload(&c.key_a).await;
    let mut e = valid_job();
    e["features_sha256"] = f["sha256"].clone();
    let (s, v) = c
        .submit_batch(&c.key_a, &json!({"jobs": [e, e, e]}), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded");
    assert!(
        message(&v).contains("has 0 unfinished jobs; the batch's 3 more would pass the limit of 2"),
        "{v}"
    );
    c.assert_nothing_created().await;
    c.cleanup().await;
}

#[tokio::test]
async fn a_batch_that_cannot_be_queued_is_undone_whole() {
    let c = ctx_with(64 << 20, |st| {
        st.queue = Arc::new(JobsQueueDown(st.queue.clone()));
    })
    .await;
    let (_, f) = c.upload(&c.key_a).await;
    let mut e = valid_job();
    e["features_sha256"] = f["sha256"].clone();
    let body = json!({"jobs": [e, e, e, e]});
    let (s, v) = c.submit_batch(&c.key_a, &body, Some("again")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    c.assert_nothing_created().await;
    // The key is free again.
    let fresh = JobId::new();
    assert_eq!(
        c.redis
            .idempotent_job("lab-a", "batch:again", fresh)
            .await
            .unwrap(),
        fresh
    );
    c.cleanup().await;
}
