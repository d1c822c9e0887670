//! The job lifecycle features of the API against real RabbitMQ, Redis and
//! SeaweedFS (S3), as in `api.rs` (each test under its own `test-{uuid}`
//! prefix, cleaned up at the end): live progress as Server-Sent Events,
//! signed webhooks with retries, per-tenant limits, and the finished shards
//! of failed and cancelled jobs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use dig_api::{
    new_api_key, router, ApiState, Deliverer, Limits, Tenants, WebhookSecrets, WebhookSettings,
};
use dig_common::job::{JobId, JobSpec, JobState};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, RedisProgress, TenantUsage};
use dig_common::store::FeatureStore;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use object_store::{ObjectStore, PutPayload};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tower::ServiceExt;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data");
const SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";
const SECRET_A: &str = "whsec-lab-a-0123456789abcdef";

use dig_test_support::Servers;

struct Ctx {
    app: Router,
    redis: Arc<RedisProgress>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    key_a: String,
    key_b: String,
    secrets: WebhookSecrets,
    /// Sends the server's shutdown.
    stop: watch::Sender<bool>,
    _tmp: tempfile::TempDir,
    servers: Servers,
}

/// A context whose limits `tweak` may change. Tenant lab-a has a webhook
/// secret, lab-b none. Event streams poll every 50 ms.
async fn ctx_with(tweak: impl FnOnce(&mut Limits)) -> Ctx {
    let servers = Servers::fresh().await;
    servers.upload_fixture_model().await;
    let (store, layout) = (servers.store.clone(), servers.layout.clone());
    let (queue, redis) = (servers.queue.clone(), servers.progress.clone());
    let tmp = tempfile::tempdir().unwrap();
    let features = Arc::new(
        FeatureStore::new(
            store.clone(),
            layout.clone(),
            64 << 20,
            tmp.path().join("up"),
        )
        .unwrap(),
    );
    let (key_a, sha_a) = new_api_key();
    let (key_b, sha_b) = new_api_key();
    let tenants = Tenants::parse(&format!("lab-a {sha_a}\nlab-b {sha_b}\n")).unwrap();
    let secrets = WebhookSecrets::parse(&format!("lab-a {SECRET_A}\n")).unwrap();
    let mut limits = Limits {
        default_model: "dig-small".into(),
        events_poll: Duration::from_millis(50),
        // The test's receivers listen on 127.0.0.1.
        allow_private_callbacks: true,
        ..Limits::default()
    };
    tweak(&mut limits);
    let (stop, shutdown) = watch::channel(false);
    let state = ApiState {
        queue: queue.clone(),
        store: store.clone(),
        layout: layout.clone(),
        features,
        progress: redis.clone(),
        tenants,
        limits,
        webhook_secrets: secrets.clone(),
        shutdown,
        openapi: Default::default(),
    };
    Ctx {
        app: router(state),
        redis,
        store,
        layout,
        key_a,
        key_b,
        secrets,
        stop,
        _tmp: tmp,
        servers,
    }
}

async fn ctx() -> Ctx {
    ctx_with(|_| {}).await
}

impl Ctx {
    async fn json(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
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
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    /// Uploads the fixture features as `key`'s tenant; their SHA-256.
    async fn upload(&self, key: &str) -> String {
        let data = std::fs::read(format!("{FIXTURES}/features.npz")).unwrap();
        let req = Request::builder()
            .method("POST")
            .uri("/v1/features")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(data))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        assert!(resp.status().is_success());
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    }

    fn job_body(&self, sha: &str, num_samples: u64, shard_size: u64) -> Value {
        json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": num_samples,
               "shard_size": shard_size, "steps": 5, "seed": 7})
    }

    /// Submits a job as `key`'s tenant: status and answer.
    async fn submit(&self, key: &str, body: &Value) -> (StatusCode, Value) {
        self.json("POST", "/v1/jobs", Some(key), Some(body)).await
    }

    /// Submits a job of lab-a that must be accepted; its stored spec.
    async fn submitted(&self, body: &Value) -> JobSpec {
        let (s, v) = self.submit(&self.key_a, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id: JobId = v["id"].as_str().unwrap().parse().unwrap();
        let bytes = self
            .store
            .get(&self.layout.job_spec(id))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    async fn job(&self, id: JobId) -> Value {
        let (s, v) = self
            .json("GET", &format!("/v1/jobs/{id}"), Some(&self.key_a), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    async fn keys_under(&self, dir: &str) -> Vec<String> {
        self.servers.objects_under(dir).await
    }

    fn deliverer(&self, settings: WebhookSettings) -> Deliverer {
        Deliverer::new(self.redis.clone(), self.secrets.clone(), settings).unwrap()
    }

    async fn cleanup(self) {
        self.servers.cleanup().await;
    }
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
        .to_string()
}

// ---------------------------------------------------------------- events

/// What an event stream sent: events `(name, id, data)` and whether a
/// keep-alive comment came.
#[derive(Default, Debug)]
struct Received {
    events: Vec<(String, u64, Value)>,
    comments: usize,
    /// The stream ended (rather than the read timing out).
    closed: bool,
}

/// Opens `/v1/jobs/{id}/events` and reads it until it closes or `limit`
/// passes, in a task; the receiver of what arrived so far is shared.
async fn open_events(
    c: &Ctx,
    id: JobId,
    limit: Duration,
) -> (
    StatusCode,
    HeaderMap,
    Arc<Mutex<Received>>,
    tokio::task::JoinHandle<()>,
) {
    let req = Request::builder()
        .uri(format!("/v1/jobs/{id}/events"))
        .header("authorization", format!("Bearer {}", c.key_a))
        .body(Body::empty())
        .unwrap();
    let resp = c.app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let got = Arc::new(Mutex::new(Received::default()));
    let sink = got.clone();
    let reader = tokio::spawn(async move {
        let mut body = resp.into_body().into_data_stream();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
                Err(_) => return,
                Ok(None) => break,
                Ok(Some(chunk)) => chunk.unwrap(),
            };
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let (mut name, mut eid, mut data) = (String::new(), 0u64, String::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        sink.lock().unwrap().comments += 1;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_string();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        eid = v.parse().unwrap();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !name.is_empty() {
                    let data: Value = serde_json::from_str(&data).unwrap();
                    sink.lock().unwrap().events.push((name, eid, data));
                }
            }
        }
        sink.lock().unwrap().closed = true;
    });
    (status, headers, got, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_progress_in_order_until_the_final_state() {
    let c = ctx_with(|l| l.events_keep_alive = Duration::from_millis(150)).await;
    let sha = c.upload(&c.key_a).await;
    let spec = c.submitted(&c.job_body(&sha, 10, 4)).await;
    let id = spec.id;

    let (status, headers, got, reader) = open_events(&c, id, Duration::from_secs(60)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    // What the coordinator and the workers would do, with pauses longer
    // than the poll (each step is seen) and the keep-alive (a comment comes).
    let pause = || tokio::time::sleep(Duration::from_millis(400));
    pause().await;
    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    pause().await;
    c.redis.record_shard_done(id, 1, 4).await.unwrap();
    pause().await;
    c.redis.record_shard_done(id, 0, 4).await.unwrap();
    c.redis.record_shard_done(id, 0, 4).await.unwrap(); // redelivered: no change
    pause().await;
    c.redis.record_shard_done(id, 2, 2).await.unwrap();
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the stream ends after the final state")
        .unwrap();

    let got = std::mem::take(&mut *got.lock().unwrap());
    assert!(got.closed);
    assert!(got.comments >= 1, "no keep-alive comment: {got:?}");
    // Each change once, in order (the pauses are longer than the poll, so
    // on an idle machine every step is its own poll; a slow one may merge
    // steps, never reorder or repeat them).
    let ids: Vec<u64> = got.events.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<u64>>());
    let progress: Vec<(Value, u64, Value)> = got
        .events
        .iter()
        .filter(|(n, _, _)| n == "progress")
        .map(|(_, _, v)| {
            (
                v["state"].clone(),
                v["samples_done"].as_u64().unwrap(),
                v["shards"].clone(),
            )
        })
        .collect();
    assert_eq!(progress[0].1, 0);
    assert_eq!(progress.last().unwrap().1, 10);
    for pair in progress.windows(2) {
        assert!(pair[0].1 <= pair[1].1, "samples_done went down: {pair:?}");
        assert_ne!(pair[0], pair[1], "a progress event without a change");
    }
    let states: Vec<(Value, Value)> = got
        .events
        .iter()
        .filter(|(n, _, _)| n == "state")
        .map(|(_, _, v)| (v["state"].clone(), v["previous"].clone()))
        .collect();
    assert_eq!(
        states,
        [
            (json!("queued"), Value::Null),
            (json!("running"), json!("queued")),
            (json!("succeeded"), json!("running")),
        ]
    );
    let names: Vec<&str> = got.events.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(&names[..2], ["progress", "state"], "{names:?}");
    assert_eq!(
        &names[names.len() - 3..],
        ["progress", "state", "end"],
        "{names:?}"
    );
    assert_eq!(names.iter().filter(|n| **n == "end").count(), 1);
    if progress.len() == 5 {
        // The usual case: every step seen.
        let done: Vec<u64> = progress.iter().map(|p| p.1).collect();
        assert_eq!(done, [0, 0, 4, 8, 10]);
    }
    let (_, _, end) = got.events.last().unwrap();
    assert_eq!(end["id"], id.to_string());
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["shards"], json!({"done": 3, "failed": 0, "total": 3}));
    // A progress event is the job view.
    assert_eq!(got.events[0].2["links"]["self"], format!("/v1/jobs/{id}"));
    drop(got);

    // Tenants own their streams.
    let uri = format!("/v1/jobs/{id}/events");
    let (s, v) = c.json("GET", &uri, Some(&c.key_b), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = c.json("GET", &uri, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = c
        .json(
            "GET",
            &format!("/v1/jobs/{}/events", JobId::new()),
            Some(&c.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_final_job_end_at_once_and_shutdown_ends_open_streams() {
    let c = ctx().await;
    let sha = c.upload(&c.key_a).await;
    let done = c.submitted(&c.job_body(&sha, 10, 5)).await.id;
    c.redis
        .set_state(done, JobState::Cancelled, None)
        .await
        .unwrap();
    let (_, _, got, reader) = open_events(&c, done, Duration::from_secs(10)).await;
    reader.await.unwrap();
    let got = std::mem::take(&mut *got.lock().unwrap());
    assert!(got.closed);
    let names: Vec<&str> = got.events.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["progress", "state", "end"]);
    assert_eq!(got.events[2].2["state"], "cancelled");
    drop(got);

    // A stream of an unfinished job ends when the server shuts down.
    let open = c.submitted(&c.job_body(&sha, 10, 5)).await.id;
    let (_, _, got, reader) = open_events(&c, open, Duration::from_secs(30)).await;
    // The first two events (progress, state) arrive; nothing else changes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().events.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the stream's first two events did not arrive: {:?}",
            got.lock().unwrap().events
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.lock().unwrap().events.len(), 2);
    let asked = Instant::now();
    c.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("shutdown ends the stream")
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(2));
    let got = std::mem::take(&mut *got.lock().unwrap());
    assert!(got.closed);
    assert!(got.events.iter().all(|(n, _, _)| n != "end"), "{got:?}");
    drop(got);
    c.cleanup().await;
}

// ---------------------------------------------------------------- webhooks

/// One received webhook request.
#[derive(Clone, Debug)]
struct Hook {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A webhook receiver on a local port answering the statuses of `script`
/// in turn (the last one from then on); what it received.
async fn receiver(
    script: Vec<u16>,
) -> (String, Arc<Mutex<Vec<Hook>>>, tokio::task::JoinHandle<()>) {
    let got: Arc<Mutex<Vec<Hook>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            let script = script.clone();
            async move {
                let mut hooks = sink.lock().unwrap();
                hooks.push(Hook {
                    headers,
                    body: body.to_vec(),
                });
                let k = (hooks.len() - 1).min(script.len() - 1);
                StatusCode::from_u16(script[k]).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, got, server)
}

fn fast(max_attempts: u32) -> WebhookSettings {
    WebhookSettings {
        max_attempts,
        backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        poll: Duration::from_millis(50),
        allow_private: true,
        ..WebhookSettings::default()
    }
}

fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET_A.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_are_checked_and_need_a_secret() {
    let c = ctx().await;
    let sha_a = c.upload(&c.key_a).await;
    let sha_b = c.upload(&c.key_b).await;
    for (url, needle) in [
        ("ftp://lab.example.org/hook", "http:// or https://"),
        ("not a url", "not a URL"),
        ("http://", "callback_url"),
    ] {
        let mut body = c.job_body(&sha_a, 10, 5);
        body["callback_url"] = json!(url);
        let (s, v) = c.submit(&c.key_a, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert!(message(&v).contains(needle), "{url}: {v}");
    }
    let mut body = c.job_body(&sha_b, 10, 5);
    body["callback_url"] = json!("https://lab-b.example.org/hook");
    let (s, v) = c.submit(&c.key_b, &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        message(&v).contains("no webhook secret is configured for tenant lab-b"),
        "{v}"
    );
    assert!(c.keys_under("jobs").await.is_empty());
    // A job without a callback_url has no webhook in its view.
    let plain = c.submitted(&c.job_body(&sha_a, 10, 5)).await;
    assert!(plain.callback_url.is_none());
    assert!(c.job(plain.id).await.get("webhook").is_none());
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_recorded() {
    let c = ctx().await;
    let (url, hooks, server) = receiver(vec![500, 200]).await;
    let sha = c.upload(&c.key_a).await;
    let mut body = c.job_body(&sha, 10, 5);
    body["callback_url"] = json!(url);
    let spec = c.submitted(&body).await;
    let id = spec.id;
    assert_eq!(spec.callback_url.as_deref(), Some(url.as_str()));
    assert_eq!(
        c.job(id).await["webhook"],
        json!({"url": url, "state": "pending", "attempts": 0, "last_error": null})
    );
    let d = c.deliverer(fast(3));
    // Not before the job is final.
    assert_eq!(d.deliver_due().await.unwrap(), 0);
    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    assert_eq!(d.deliver_due().await.unwrap(), 0);
    c.redis
        .set_state(id, JobState::Succeeded, None)
        .await
        .unwrap();

    assert_eq!(d.deliver_due().await.unwrap(), 1);
    let w = &c.job(id).await["webhook"];
    assert_eq!(
        (&w["state"], &w["attempts"]),
        (&json!("pending"), &json!(1)),
        "{w}"
    );
    assert!(
        w["last_error"].as_str().unwrap().contains("HTTP 500"),
        "{w}"
    );
    // Not again before the pause.
    assert_eq!(d.deliver_due().await.unwrap(), 0);
    // The backoff (200 ms) passing is the point: then the retry is due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    let w = &c.job(id).await["webhook"];
    assert_eq!(
        (&w["state"], &w["attempts"]),
        (&json!("delivered"), &json!(2)),
        "{w}"
    );
    // Delivered: nothing is due even once another backoff has passed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.deliver_due().await.unwrap(), 0);

    let hooks = hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 2);
    assert_eq!(hooks[0].body, hooks[1].body, "retries send the same bytes");
    for h in &hooks {
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["x-dig-event"], "job.succeeded");
        assert_eq!(h.headers["x-dig-delivery"], id.to_string());
        assert_eq!(
            h.headers["x-dig-signature"].to_str().unwrap(),
            expected_signature(&h.body)
        );
    }
    let sent: Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(sent["id"], id.to_string());
    assert_eq!(sent["state"], "succeeded");
    assert_eq!(sent["num_samples"], 10);
    assert!(sent.get("webhook").is_none(), "{sent}");
    server.abort();
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_give_up_after_the_last_attempt_and_are_sent_by_one_replica() {
    let c = ctx().await;
    let sha = c.upload(&c.key_a).await;
    let (url, hooks, server) = receiver(vec![503]).await;
    let mut body = c.job_body(&sha, 10, 5);
    body["callback_url"] = json!(url);
    let failing = c.submitted(&body).await.id;
    // Cancelling is a final state too.
    let (s, _) = c
        .json(
            "POST",
            &format!("/v1/jobs/{failing}/cancel"),
            Some(&c.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let d = c.deliverer(fast(2));
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    // The backoff (200 ms) passing is the point: then the retry is due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    let w = &c.job(failing).await["webhook"];
    assert_eq!(
        (&w["state"], &w["attempts"]),
        (&json!("failed"), &json!(2)),
        "{w}"
    );
    assert!(
        w["last_error"].as_str().unwrap().contains("HTTP 503"),
        "{w}"
    );
    // Given up: nothing is due even once another backoff has passed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.deliver_due().await.unwrap(), 0);
    {
        let hooks = hooks.lock().unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].headers["x-dig-event"], "job.cancelled");
    }
    server.abort();

    // Nobody listening: the error says so.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut body = c.job_body(&sha, 10, 5);
    body["callback_url"] = json!(format!("http://127.0.0.1:{closed}/hook"));
    let refused = c.submitted(&body).await.id;
    c.redis
        .set_state(refused, JobState::Failed, Some("boom"))
        .await
        .unwrap();
    assert_eq!(d.deliver_due().await.unwrap(), 1);
    let w = &c.job(refused).await["webhook"];
    assert!(
        w["last_error"].as_str().unwrap().contains("cannot connect"),
        "{w}"
    );

    // Two replicas looking at once: one sends.
    let (url, hooks, server) = receiver(vec![200]).await;
    let mut body = c.job_body(&sha, 10, 5);
    body["callback_url"] = json!(url);
    let once = c.submitted(&body).await.id;
    c.redis
        .set_state(once, JobState::Succeeded, None)
        .await
        .unwrap();
    let (d1, d2) = (c.deliverer(fast(3)), c.deliverer(fast(3)));
    let (n1, n2) = tokio::join!(d1.deliver_due(), d2.deliver_due());
    let sent_once = |n: usize| n == 1 || n == 2; // `refused` may be due again
    assert!(sent_once(n1.unwrap() + n2.unwrap()));
    assert_eq!(hooks.lock().unwrap().len(), 1);
    assert_eq!(c.job(once).await["webhook"]["state"], "delivered");
    server.abort();
    c.cleanup().await;
}

// ---------------------------------------------------------------- limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_answer_429_and_leave_nothing_behind() {
    let c = ctx_with(|l| {
        l.max_jobs_per_tenant = 2;
        l.max_queued_samples_per_tenant = 25;
    })
    .await;
    let sha = c.upload(&c.key_a).await;
    let first = c.submitted(&c.job_body(&sha, 10, 4)).await.id;
    let second = c.submitted(&c.job_body(&sha, 10, 4)).await.id;
    let specs_before = c.keys_under("jobs").await;

    let (s, v) = c.submit(&c.key_a, &c.job_body(&sha, 1, 1)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(
        v,
        json!({"error": {"code": "limit_exceeded",
                         "message": "tenant lab-a has 2 unfinished jobs; the limit is 2"}})
    );
    assert_eq!(c.keys_under("jobs").await, specs_before);
    assert_eq!(
        c.redis.list_jobs("lab-a", 10, None).await.unwrap(),
        vec![second, first]
    );
    // Another tenant has its own count.
    let sha_b = c.upload(&c.key_b).await;
    let (s, v) = c.submit(&c.key_b, &c.job_body(&sha_b, 10, 4)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // A final job frees its place; samples done no longer count.
    c.redis
        .set_state(first, JobState::Cancelled, None)
        .await
        .unwrap();
    c.redis.record_shard_done(second, 0, 4).await.unwrap();
    assert_eq!(
        c.redis.tenant_usage("lab-a").await.unwrap(),
        TenantUsage {
            unfinished_jobs: 1,
            queued_samples: 6
        }
    );
    let (s, v) = c.submit(&c.key_a, &c.job_body(&sha, 20, 4)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(
        message(&v),
        "tenant lab-a has 6 samples queued; 20 more would pass the limit of 25"
    );
    let third = c.submitted(&c.job_body(&sha, 19, 4)).await.id;
    assert_eq!(
        c.redis.tenant_usage("lab-a").await.unwrap(),
        TenantUsage {
            unfinished_jobs: 2,
            queued_samples: 25
        }
    );
    // An idempotent replay creates nothing, so it is no refusal.
    c.redis
        .set_state(third, JobState::Failed, None)
        .await
        .unwrap();
    let body = c.job_body(&sha, 5, 5);
    let with_key = || {
        Request::builder()
            .method("POST")
            .uri("/v1/jobs")
            .header("authorization", format!("Bearer {}", c.key_a))
            .header("content-type", "application/json")
            .header("idempotency-key", "k1")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = c.app.clone().oneshot(with_key()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // Now at the job limit again; the replay answers the first job.
    let resp = c.app.clone().oneshot(with_key()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_cannot_overshoot_the_limit() {
    let c = Arc::new(ctx_with(|l| l.max_jobs_per_tenant = 3).await);
    let sha = c.upload(&c.key_a).await;
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let (c, body) = (c.clone(), c.job_body(&sha, 5, 5));
            tokio::spawn(async move { c.submit(&c.key_a, &body).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tries {
        statuses.push(t.await.unwrap());
    }
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((accepted, refused), (3, 5), "{statuses:?}");
    assert_eq!(c.redis.list_jobs("lab-a", 10, None).await.unwrap().len(), 3);
    let specs = c.keys_under("jobs").await;
    assert_eq!(specs.len(), 3, "{specs:?}");
    Arc::into_inner(c).unwrap().cleanup().await;
}

// ---------------------------------------------------------------- results

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_failed_jobs_list_their_finished_shards() {
    let c = ctx().await;
    let sha = c.upload(&c.key_a).await;
    let spec = c.submitted(&c.job_body(&sha, 10, 4)).await;
    let id = spec.id;
    let put = |i: u64, bytes: &'static [u8]| {
        let (store, path) = (c.store.clone(), c.layout.shard(id, i));
        async move {
            store.put(&path, PutPayload::from(bytes)).await.unwrap();
        }
    };
    put(0, b"shard zero").await;
    put(2, b"shard two, shorter").await;
    c.redis
        .set_state(id, JobState::Running, None)
        .await
        .unwrap();
    let uri = format!("/v1/jobs/{id}/results");
    let (s, v) = c.json("GET", &uri, Some(&c.key_a), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("not finished yet"), "{v}");

    let (s, _) = c
        .json(
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            Some(&c.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let entry = |i: u64, start: u64, end: u64, bytes: &[u8]| {
        json!({"index": i, "start": start, "end": end,
               "key": c.layout.shard(id, i).to_string(), "bytes": bytes.len(),
               "sha256": hex::encode(Sha256::digest(bytes))})
    };
    let (s, v) = c.json("GET", &uri, Some(&c.key_a), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"job": id, "num_samples": 10, "complete": false, "shards": [
            entry(0, 0, 4, b"shard zero"), entry(2, 8, 10, b"shard two, shorter")]})
    );
    // A shard that was running at the cancel finishes later, and joins.
    put(1, b"shard one").await;
    let (_, v) = c.json("GET", &uri, Some(&c.key_a), None).await;
    let indices: Vec<u64> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(v["shards"][1], entry(1, 4, 8, b"shard one"));
    // Digests come from the cache while a shard keeps its size.
    let cache = c.layout.partial_manifest(id);
    let mut cached: Value =
        serde_json::from_slice(&c.store.get(&cache).await.unwrap().bytes().await.unwrap()).unwrap();
    cached["shards"][0]["sha256"] = json!("ab".repeat(32));
    c.store
        .put(&cache, PutPayload::from(cached.to_string().into_bytes()))
        .await
        .unwrap();
    let (_, v) = c.json("GET", &uri, Some(&c.key_a), None).await;
    assert_eq!(v["shards"][0]["sha256"], "ab".repeat(32));
    // The shards themselves stay downloadable.
    let req = Request::builder()
        .uri(format!("/v1/jobs/{id}/results/2"))
        .header("authorization", format!("Bearer {}", c.key_a))
        .body(Body::empty())
        .unwrap();
    let resp = c.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Others see nothing.
    let (s, _) = c.json("GET", &uri, Some(&c.key_b), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A failed job with no finished shard: an empty partial manifest.
    let failed = c.submitted(&c.job_body(&sha, 10, 4)).await.id;
    c.redis
        .set_state(failed, JobState::Failed, Some("shard 0: boom"))
        .await
        .unwrap();
    let (s, v) = c
        .json(
            "GET",
            &format!("/v1/jobs/{failed}/results"),
            Some(&c.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"job": failed, "num_samples": 10, "complete": false, "shards": []})
    );
    c.cleanup().await;
}

// ---------------------------------------------------------------- SSRF

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_the_services_own_network_are_refused_unless_allowed() {
    let c = ctx_with(|l| l.allow_private_callbacks = false).await;
    let sha = c.upload(&c.key_a).await;
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://localhost/hook",
    ] {
        let mut body = c.job_body(&sha, 10, 5);
        body["callback_url"] = json!(url);
        let (s, v) = c.submit(&c.key_a, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert!(message(&v).contains("public addresses only"), "{url}: {v}");
    }
    assert!(c.keys_under("jobs").await.is_empty());

    // A webhook accepted under a laxer policy is not sent under a strict one:
    // the receiver hears nothing, the attempt says why.
    let lax = ctx().await;
    let sha = lax.upload(&lax.key_a).await;
    let (url, hooks, server) = receiver(vec![200]).await;
    let mut body = lax.job_body(&sha, 10, 5);
    body["callback_url"] = json!(url);
    let job = lax.submitted(&body).await.id;
    lax.redis
        .set_state(job, JobState::Succeeded, None)
        .await
        .unwrap();
    let strict = WebhookSettings {
        allow_private: false,
        ..fast(1)
    };
    assert_eq!(lax.deliverer(strict).deliver_due().await.unwrap(), 1);
    let w = &lax.job(job).await["webhook"];
    assert_eq!(w["state"], "failed", "{w}");
    assert!(
        w["last_error"]
            .as_str()
            .unwrap()
            .contains("public addresses only"),
        "{w}"
    );
    assert!(hooks.lock().unwrap().is_empty());
    server.abort();
    c.cleanup().await;
    lax.cleanup().await;
}
