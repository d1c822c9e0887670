//! The job lifecycle through the API, end to end, as deployed: `digctl api`,
//! `digctl coordinator` and `digctl worker` processes on real RabbitMQ,
//! Redis and SeaweedFS (and `digctl standalone` with none):
//!
//! - live progress as Server-Sent Events, and `digctl wait` following them;
//! - a webhook to a receiver run by the test: retried after a 500, signed
//!   (HMAC-SHA256 checked here), delivered once;
//! - per-tenant limits answering 429;
//! - the finished shards of a cancelled job, fetched as partial results.
//!
//! Every succeeded job is checked sample by sample against `digctl sample`
//! (each index exactly once, frames bit-identical); a cancelled job's
//! samples, as far as they go, likewise.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dig_tests::cluster::{
    assert_same_samples, assert_samples_within, http_get, local_sample, parse_metrics, wait_until,
    Cluster, Service,
};
use dig_tests::digctl_path;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// These tests run several processes that each want both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BATCH: usize = 5; // DIG_WORKER_BATCH_SIZE of every Cluster
const SECRET_A: &str = "whsec-e2e-lab-a-5f0c1d2e3a4b";

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
fn wait_for_workers(c: &Cluster, n: usize, svcs: &[&Service]) {
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(120);
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

/// The whole cluster on the test servers, with the fixture model.
fn started(c: &mut Cluster) -> Vec<Service> {
    c.upload_model();
    let api = c.start_api();
    let coordinator = c.start_coordinator();
    let worker = c.start_worker();
    wait_for_workers(c, 1, &[&worker]);
    vec![api, coordinator, worker]
}

fn logs(svcs: &[Service]) -> String {
    svcs.iter()
        .map(|s| format!("--- {}\n{}", s.name, s.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn events_follow_a_job_through_the_cluster_to_succeeded() {
    let _serial = serial();
    let mut c = Cluster::distributed("events");
    let mut svcs = started(&mut c);
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        40,
        &["--seed", "5", "--steps", "20", "--shard-size", "10"],
    );
    // `digctl wait` at the same time, polling only every 10 minutes: it
    // finishes with the job only if it follows the event stream.
    let waiter = Command::new(digctl_path())
        .args(["wait", &job, "--poll-ms", "600000", "--timeout", "600"])
        .env("DIG_API_URL", &c.api_url)
        .env("DIG_API_KEY", &c.key_a)
        .env("DIG_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let (status, events, closed) = c.job_events(&c.key_a, &job, Duration::from_secs(600));
    assert_eq!(status, 200, "{}", logs(&svcs));
    assert!(
        closed,
        "the stream did not end: {events:?}\n{}",
        logs(&svcs)
    );

    // In order: progress views whose samples_done never goes down, states
    // moving forward, and the final state last.
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"progress"), "{names:?}");
    assert_eq!(names.last(), Some(&"end"), "{names:?}");
    assert_eq!(names.iter().filter(|n| **n == "end").count(), 1);
    let done: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, v)| v["samples_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert_eq!(done.last(), Some(&40));
    let rank = |s: &str| match s {
        "queued" => 0,
        "running" => 1,
        "succeeded" => 2,
        other => panic!("unexpected state {other}"),
    };
    let states: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "state")
        .map(|(_, v)| v["state"].as_str().unwrap())
        .collect();
    assert!(
        states.windows(2).all(|w| rank(w[0]) < rank(w[1])),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&"succeeded"));
    let (_, end) = events.last().unwrap();
    assert_eq!(end["id"], job.as_str());
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["samples_done"], 40);
    assert_eq!(end["shards"]["done"], 4);

    let out = wait_with_timeout(waiter, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "digctl wait failed: {stderr}");
    assert!(stderr.contains(&format!("job {job} succeeded")), "{stderr}");

    let shards = c.fetch(&c.key_a, &job);
    let reference = local_sample(c.dir.path(), 40, 5, 20, BATCH);
    assert_same_samples(&shards, &reference);
    for s in &mut svcs {
        assert!(s.exited().is_none(), "{} exited:\n{}", s.name, s.log());
    }
    drop(svcs);
    runtime().block_on(c.cleanup());
}

/// How many `GET /v1/jobs/{id}/events` the API at `addr` has answered 200
/// (`dig_api_requests_total`, counted once the stream's head is ready); 0
/// when it does not answer.
fn event_streams_opened(addr: &str) -> f64 {
    let Some((200, body)) = http_get(addr, "/metrics") else {
        return 0.0;
    };
    parse_metrics(&body)
        .iter()
        .filter(|(name, labels, _)| {
            name == "dig_api_requests_total"
                && labels.contains(&("route".into(), "/v1/jobs/{id}/events".into()))
                && labels.contains(&("status".into(), "200".into()))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Waits for a child's exit, killing it after `limit`.
fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the child did not finish within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

// ---------------------------------------------------------------- webhooks

/// One request the receiver got: lower-cased headers and the body.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A tiny HTTP server on a std listener, in a thread: answers the statuses
/// of `script` in turn (the last one from then on) and records requests.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(script: Vec<u16>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/dig", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Some(request) = read_request(&stream) else {
                    continue;
                };
                let n = {
                    let mut g = sink.lock().unwrap();
                    g.push(request);
                    g.len()
                };
                let status = script[(n - 1).min(script.len() - 1)];
                let mut stream = stream;
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                    .as_bytes(),
                );
            }
        });
        Receiver { url, got }
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn read_request(stream: &std::net::TcpStream) -> Option<Received> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let path = first.split_whitespace().nth(1)?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Received {
        path,
        headers,
        body,
    })
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Polls the job until its webhook is no longer pending; the job's view.
fn wait_webhook_settled(c: &Cluster, job: &str, limit: Duration, svcs: &[Service]) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = c.status(&c.key_a, job);
        if v["webhook"]["state"] != "pending" {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook stayed pending: {v}\n{}",
            logs(svcs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_webhook_is_retried_after_a_500_signed_and_delivered_once() {
    let _serial = serial();
    let hooks = Receiver::start(vec![500, 200]);
    let mut c = Cluster::distributed("webhook");
    c.set_webhook_secrets(&format!("# e2e\nlab-a {SECRET_A}\n"));
    let mut svcs = started(&mut c);
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        20,
        &[
            "--seed",
            "9",
            "--steps",
            "15",
            "--shard-size",
            "10",
            "--callback-url",
            &hooks.url,
        ],
    );
    let v = c.status(&c.key_a, &job);
    assert_eq!(v["webhook"]["state"], "pending", "{v}");
    assert_eq!(v["webhook"]["attempts"], 0, "{v}");
    {
        let mut refs: Vec<&mut Service> = svcs.iter_mut().collect();
        let done = c.wait_final(&c.key_a, &job, Duration::from_secs(600), &mut refs);
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    let v = wait_webhook_settled(&c, &job, Duration::from_secs(60), &svcs);
    assert_eq!(v["webhook"]["state"], "delivered", "{v}");
    assert_eq!(v["webhook"]["attempts"], 2, "{v}");
    assert_eq!(v["webhook"]["url"], hooks.url.as_str());
    assert!(
        v["webhook"]["last_error"].as_str().unwrap().contains("500"),
        "{v}"
    );
    // Nothing more comes after the delivery.
    std::thread::sleep(Duration::from_secs(3));
    let got = hooks.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, got[1].body, "the retry sent other bytes");
    for r in &got {
        assert_eq!(r.path, "/hooks/dig");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-dig-event"], "job.succeeded");
        assert_eq!(r.headers["x-dig-delivery"], job);
        assert_eq!(
            r.headers["x-dig-signature"],
            format!("sha256={}", hmac_hex(SECRET_A, &r.body))
        );
    }
    let sent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(sent["id"], job.as_str());
    assert_eq!(sent["state"], "succeeded");
    assert_eq!(sent["samples_done"], 20);
    // `digctl status` says so too.
    let text = c.client_ok(&c.key_a, &["status", &job]);
    assert!(text.contains("webhook   delivered (2 attempts)"), "{text}");

    let shards = c.fetch(&c.key_a, &job);
    let reference = local_sample(c.dir.path(), 20, 9, 15, BATCH);
    assert_same_samples(&shards, &reference);
    drop(svcs);
    runtime().block_on(c.cleanup());
}

// ---------------------------------------------------------------- limits

#[test]
fn per_tenant_limits_refuse_with_429_and_leave_nothing_behind() {
    let _serial = serial();
    let rt = runtime();
    let mut c = Cluster::distributed("limits");
    c.set_env("DIG_API_MAX_JOBS_PER_TENANT", "3");
    c.set_env("DIG_API_MAX_QUEUED_SAMPLES_PER_TENANT", "100");
    c.upload_model();
    // No coordinator: jobs stay queued, unfinished.
    let _api = c.start_api();
    let sha = c.upload_features(&c.key_a);
    let args = ["--seed", "1", "--steps", "5"];
    let jobs: Vec<String> = (0..3)
        .map(|_| c.submit(&c.key_a, &sha, 10, &args))
        .collect();
    let before = rt.block_on(async { c.backends().await.objects().await });

    let submit_err = |key: &str, sha: &str, n: &str| {
        c.client_err(
            key,
            &[
                "submit",
                "--features-sha256",
                sha,
                "--sequence",
                dig_tests::cluster::SEQUENCE,
                "--num-samples",
                n,
            ],
        )
    };
    let err = submit_err(&c.key_a, &sha, "1");
    assert!(
        err.contains("tenant lab-a has 3 unfinished jobs; the limit is 3")
            && err.contains("HTTP 429 limit_exceeded"),
        "{err}"
    );
    let after = rt.block_on(async { c.backends().await.objects().await });
    assert_eq!(before, after, "a refused submission left something behind");
    let listed = c.client_ok(&c.key_a, &["jobs", "--json"]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 3, "{listed}");

    // Another tenant is counted apart.
    let sha_b = c.upload_features(&c.key_b);
    c.submit(&c.key_b, &sha_b, 10, &args);

    // A cancelled job frees its place; the sample cap still holds.
    c.client_ok(&c.key_a, &["cancel", &jobs[0]]);
    let err = submit_err(&c.key_a, &sha, "81");
    assert!(
        err.contains("tenant lab-a has 20 samples queued; 81 more would pass the limit of 100")
            && err.contains("HTTP 429"),
        "{err}"
    );
    c.submit(&c.key_a, &sha, 80, &args);
    let err = submit_err(&c.key_a, &sha, "1");
    assert!(err.contains("has 3 unfinished jobs"), "{err}");
    rt.block_on(c.cleanup());
}

#[test]
fn a_stream_ends_with_the_api_and_wait_goes_on_polling() {
    let _serial = serial();
    let rt = runtime();
    let c = Cluster::distributed("fallback");
    c.upload_model();
    // No coordinator: the job stays queued until cancelled.
    let mut api = c.start_api();
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(&c.key_a, &sha, 10, &["--seed", "1", "--steps", "5"]);
    let waiter = Command::new(digctl_path())
        .args(["wait", &job, "--poll-ms", "200", "--timeout", "300"])
        .env("DIG_API_URL", &c.api_url)
        .env("DIG_API_KEY", &c.key_a)
        .env("DIG_LOG", "digctl=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, events, closed) = std::thread::scope(|s| {
        let reader = s.spawn(|| c.job_events(&c.key_a, &job, Duration::from_secs(120)));
        // Both streams open, this reader's and `digctl wait`'s: the API has
        // answered two event-stream requests (its request counter).
        let api_addr = c.api_url.trim_start_matches("http://").to_string();
        wait_until(
            "the API has answered both event-stream requests",
            Duration::from_secs(60),
            &[&api],
            || event_streams_opened(&api_addr) >= 2.0,
        );
        // SIGTERM: the open streams end, so the API exits promptly.
        let asked = Instant::now();
        assert!(api.terminate(Duration::from_secs(30)), "{}", api.log());
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "{:?}",
            asked.elapsed()
        );
        reader.join().unwrap()
    });
    assert_eq!(status, 200);
    assert!(closed);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["progress", "state"], "{events:?}");

    // `digctl wait` polls through the restart and sees the cancel.
    let _api = c.start_api();
    c.client_ok(&c.key_a, &["cancel", &job]);
    let out = wait_with_timeout(waiter, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("job {job} cancelled")), "{stderr}");
    assert!(stderr.contains("polling instead"), "{stderr}");
    rt.block_on(c.cleanup());
}

// ---------------------------------------------------------------- partial results

#[test]
fn a_cancelled_jobs_finished_shards_are_fetched_as_partial_results_standalone() {
    let _serial = serial();
    let hooks = Receiver::start(vec![200]);
    let (c, mut svc) = Cluster::standalone_with("partial", |c| {
        c.set_webhook_secrets(&format!("lab-a {SECRET_A}\n"));
    });
    let sha = c.upload_features(&c.key_a);
    // Many short shards: some finish before the cancel, most do not.
    let job = c.submit(
        &c.key_a,
        &sha,
        200,
        &[
            "--seed",
            "4",
            "--steps",
            "30",
            "--shard-size",
            "5",
            "--callback-url",
            &hooks.url,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = c.status(&c.key_a, &job);
        if v["shards"]["done"].as_u64().unwrap() >= 2 {
            break;
        }
        assert!(v["state"] != "succeeded", "finished before the cancel: {v}");
        assert!(
            Instant::now() < deadline,
            "no shard finished: {v}\n{}",
            svc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.client_ok(&c.key_a, &["cancel", &job]);
    // The worker has seen the cancel (it skips or stops the job's shards,
    // logging "job has ended"): a shard that was running has finished.
    wait_until(
        "the standalone worker logs that the cancelled job has ended",
        Duration::from_secs(60),
        &[&svc],
        || {
            svc.log()
                .lines()
                .any(|l| l.contains("job has ended") && l.contains(job.as_str()))
        },
    );
    let v = c.status(&c.key_a, &job);
    assert_eq!(v["state"], "cancelled", "{v}");
    let done = v["shards"]["done"].as_u64().unwrap();
    assert!((2..40).contains(&done), "{v}");

    let out = c.dir.path().join("fetch-partial");
    let fetched = c.client(&c.key_a, &["fetch", &job, "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&fetched.stderr);
    let stdout = String::from_utf8_lossy(&fetched.stdout);
    assert!(fetched.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("job {job} cancelled: partial results")),
        "{stderr}"
    );
    assert!(stdout.contains("(partial)"), "{stdout}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], false);
    let shards: Vec<dig_model::structure::Ensemble> = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let i = s["index"].as_u64().unwrap();
            let path = out.join("shards").join(format!("{i:06}.npz"));
            dig_model::structure::Ensemble::read_npz(&path, dig_tests::cluster::SEQUENCE).unwrap()
        })
        .collect();
    assert!(shards.len() as u64 >= done, "{manifest}");
    // The reference up to the last sample fetched: sample i does not depend
    // on how many follow it (shards of one batch each).
    let last = shards
        .iter()
        .flat_map(|e| e.sample_index.iter().copied())
        .max()
        .unwrap() as u64;
    let reference = local_sample(c.dir.path(), last + 1, 4, 30, BATCH);
    let n = assert_samples_within(&shards, &reference);
    assert_eq!(n, shards.len() * 5);

    // The cancellation's webhook, from the standalone process.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status(&c.key_a, &job)["webhook"]["state"] != "delivered" {
        assert!(Instant::now() < deadline, "no webhook:\n{}", svc.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = hooks.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].headers["x-dig-event"], "job.cancelled");
    assert_eq!(
        got[0].headers["x-dig-signature"],
        format!("sha256={}", hmac_hex(SECRET_A, &got[0].body))
    );
    assert!(svc.exited().is_none(), "standalone exited:\n{}", svc.log());
    assert!(svc.terminate(Duration::from_secs(30)), "{}", svc.log());
}

/// A batch with a `callback_url` gets one signed POST when its last job
/// ends: event `batch.succeeded`, delivery id the batch's, the body the
/// batch's view without the per-job list; its view shows it delivered.
#[test]
fn a_batch_webhook_is_sent_once_when_every_job_has_ended() {
    let _serial = serial();
    let hooks = Receiver::start(vec![200]);
    let mut c = Cluster::distributed("batch-hook");
    c.set_webhook_secrets(&format!("lab-a {SECRET_A}\n"));
    let svcs = started(&mut c);
    let sha = c.upload_features(&c.key_a);
    let entry = |seed: u64| {
        serde_json::json!({"sequence": dig_tests::cluster::SEQUENCE, "features_sha256": sha,
            "num_samples": 5, "seed": seed, "steps": 5, "shard_size": 5})
    };
    // Lab B has no webhook secret: its batch with a callback is refused.
    let sha_b = c.upload_features(&c.key_b);
    let mut b_entry = entry(1);
    b_entry["features_sha256"] = sha_b.clone().into();
    let (status, body) = c.api_post(
        &c.key_b,
        "/v1/batches",
        &serde_json::json!({"jobs": [b_entry], "callback_url": hooks.url}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("no webhook secret is configured for tenant lab-b"),
        "{body}"
    );

    let (status, body) = c.api_post(
        &c.key_a,
        "/v1/batches",
        &serde_json::json!({"name": "hooked", "jobs": [entry(1), entry(2), entry(3)],
                            "callback_url": hooks.url}),
    );
    assert_eq!(status, 202, "{body}");
    let batch = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/batches/{batch}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let view = loop {
        let (s, b) = c.api_get(&c.key_a, &path);
        assert_eq!(s, 200, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        if v["state"] == "succeeded" && v["webhook"]["state"] != "pending" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "batch or webhook unfinished: {} {}\n{}",
            v["state"],
            v["webhook"],
            logs(&svcs)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(view["webhook"]["state"], "delivered", "{}", view["webhook"]);
    assert_eq!(view["webhook"]["attempts"], 1);
    // Sent once: a window for a second POST to show (nothing signals one
    // that does not come).
    std::thread::sleep(Duration::from_secs(4));
    let got = hooks.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.path, "/hooks/dig");
    assert_eq!(r.headers["x-dig-event"], "batch.succeeded");
    assert_eq!(r.headers["x-dig-delivery"], batch);
    assert_eq!(
        r.headers["x-dig-signature"],
        format!("sha256={}", hmac_hex(SECRET_A, &r.body))
    );
    let sent: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(sent["id"], batch.as_str());
    assert_eq!(sent["state"], "succeeded");
    assert_eq!(sent["name"], "hooked");
    assert_eq!(sent["jobs_by_state"]["succeeded"], 3);
    assert_eq!(sent["samples_done"], 15);
    assert!(
        sent.get("jobs").is_none(),
        "the per-job list was sent: {sent}"
    );
    assert!(sent.get("webhook").is_none(), "{sent}");
    drop(svcs);
    runtime().block_on(c.cleanup());
}
