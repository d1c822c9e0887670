//! Observability end to end: the `/metrics` of `digctl api`, `digctl
//! coordinator` and `digctl worker` processes (on the real RabbitMQ, Redis
//! and SeaweedFS) checked against what a job did; the worker's JSON logs;
//! and every query of the Grafana dashboard
//! (`charts/dig-cluster/dashboards/dig-cluster.json`) evaluated by a real
//! Prometheus (Debian's `prometheus` package, `/usr/bin/prometheus`)
//! scraping the three services.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dig_tests::cluster::{http_get, parse_metrics, Cluster, Sample, Service};
use dig_tests::repo_root;

/// These tests run several processes that each want both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BATCH: u64 = 5; // DIG_WORKER_BATCH_SIZE of every Cluster
const PROMETHEUS: &str = "/usr/bin/prometheus";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A distributed deployment for these tests: one sampling thread per
/// process (the machine is shared), worker logs as JSON.
fn cluster(label: &str) -> Cluster {
    let mut c = Cluster::distributed(label);
    c.set_env("OMP_NUM_THREADS", "1");
    c.upload_model();
    c
}

/// Waits until `n` workers beat.
fn wait_for_workers(c: &Cluster, n: usize, svcs: &[&Service]) {
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(60);
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

fn logs(svcs: &[&Service]) -> String {
    svcs.iter()
        .map(|s| format!("--- {}\n{}", s.name, s.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The series of `/metrics` at `addr`.
fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) =
        http_get(addr, "/metrics").unwrap_or_else(|| panic!("no answer from {addr}/metrics"));
    assert_eq!(status, 200, "GET {addr}/metrics: {body}");
    parse_metrics(&body)
}

/// The sum of the series named `name` whose labels include every `labels` pair.
fn sum(series: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    series
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn has(series: &[Sample], name: &str) -> bool {
    series.iter().any(|(n, _, _)| n == name)
}

#[test]
fn every_services_metrics_match_what_a_job_did() {
    let _serial = serial();
    let mut c = cluster("metrics");
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    c.set_env("DIG_LOG_FORMAT", "json");
    let mut w1 = c.start_worker();
    let mut w2 = c.start_worker();
    let coordinator_addr = coordinator.metrics_addr();
    let worker_addrs = [w1.metrics_addr(), w2.metrics_addr()];
    let api_addr = c.api_url.trim_start_matches("http://").to_string();
    wait_for_workers(&c, 2, &[&w1, &w2]);
    for addr in [&coordinator_addr, &worker_addrs[0], &worker_addrs[1]] {
        assert_eq!(
            http_get(addr, "/healthz"),
            Some((200, "ok".to_string())),
            "{addr}"
        );
    }

    let (num, steps, shard_size) = (40u64, 10u64, 10u64);
    let shards = num / shard_size;
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        num,
        &[
            "--seed",
            "5",
            "--steps",
            &steps.to_string(),
            "--shard-size",
            &shard_size.to_string(),
        ],
    );
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(600),
        &mut [&mut api, &mut coordinator, &mut w1, &mut w2],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    let svcs = [&api, &coordinator, &w1, &w2];

    // The workers: what they sampled, once per shard.
    let workers: Vec<_> = worker_addrs.iter().map(|a| scrape(a)).collect();
    let total = |name: &str, labels: &[(&str, &str)]| -> f64 {
        workers.iter().map(|s| sum(s, name, labels)).sum()
    };
    assert_eq!(
        total("dig_samples_generated_total", &[]),
        num as f64,
        "{}",
        logs(&svcs)
    );
    for (w, s) in [&w1, &w2].iter().zip(&workers) {
        // Each worker's counter carries its id, present even at zero.
        assert!(
            s.iter().any(|(n, l, _)| n == "dig_samples_generated_total"
                && l.iter().any(|(k, v)| k == "worker" && v == &w.name)),
            "{}: {s:?}",
            w.name
        );
        assert!(sum(s, "dig_worker_heartbeats_total", &[]) >= 1.0, "{s:?}");
        assert_eq!(sum(s, "dig_worker_busy", &[]), 0.0, "{s:?}");
    }
    assert_eq!(total("dig_shards_completed_total", &[]), shards as f64);
    let l = [("length_bucket", "1-64")]; // the fixture protein has 24 residues
    assert_eq!(total("dig_shard_duration_seconds_count", &l), shards as f64);
    assert!(total("dig_shard_duration_seconds_sum", &l) > 0.0);
    // One observation per sampler step of each batch.
    assert_eq!(
        total("dig_sampler_step_seconds_count", &l),
        (steps * num / BATCH) as f64
    );
    for cache in ["model", "feature"] {
        let hits = total(&format!("dig_{cache}_cache_hits_total"), &[]);
        let misses = total(&format!("dig_{cache}_cache_misses_total"), &[]);
        assert_eq!(hits + misses, shards as f64, "{cache} cache");
        // Each worker loads the model and prepares the protein once.
        assert!(
            (1.0..=2.0).contains(&misses),
            "{cache} cache misses: {misses}"
        );
    }
    for name in [
        "dig_shards_failed_total",
        "dig_shards_retried_total",
        "dig_shards_dead_lettered_total",
    ] {
        assert!(workers.iter().all(|s| has(s, name)), "{name} missing");
        assert_eq!(total(name, &[]), 0.0, "{name}");
    }

    // The coordinator: what it published, and the cluster view from Redis
    // (refreshed every few seconds).
    let deadline = Instant::now() + Duration::from_secs(60);
    let coord = loop {
        let s = scrape(&coordinator_addr);
        let settled = sum(&s, "dig_jobs", &[("state", "succeeded")]) >= 1.0
            && sum(&s, "dig_jobs", &[("state", "running")]) == 0.0
            && !has(&s, "dig_job_samples_per_second");
        if settled {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator's cluster figures did not catch up: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(sum(&coord, "dig_shards_published_total", &[]) >= shards as f64);
    assert_eq!(sum(&coord, "dig_jobs", &[("state", "succeeded")]), 1.0);
    assert_eq!(sum(&coord, "dig_jobs", &[("state", "failed")]), 0.0);
    assert_eq!(sum(&coord, "dig_workers_up", &[]), 2.0);
    assert_eq!(sum(&coord, "dig_queue_depth_shards", &[]), 0.0);
    assert_eq!(sum(&coord, "dig_queue_parked_shards", &[]), 0.0);
    assert_eq!(sum(&coord, "dig_queue_oldest_shard_age_seconds", &[]), 0.0);

    // The API: requests by route template, never by raw path.
    let api_series = scrape(&api_addr);
    let post_jobs = [("route", "/v1/jobs"), ("method", "POST"), ("status", "202")];
    assert_eq!(
        sum(&api_series, "dig_api_requests_total", &post_jobs),
        1.0,
        "{api_series:?}"
    );
    assert!(
        sum(
            &api_series,
            "dig_api_requests_total",
            &[
                ("route", "/v1/jobs/{id}"),
                ("method", "GET"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    assert!(
        sum(
            &api_series,
            "dig_api_requests_total",
            &[("route", "/v1/features"), ("method", "POST")]
        ) >= 1.0
    );
    assert!(
        sum(
            &api_series,
            "dig_api_request_duration_seconds_count",
            &[("route", "/v1/jobs"), ("method", "POST")]
        ) >= 1.0
    );
    assert!(
        !api_series
            .iter()
            .any(|(_, l, _)| l.iter().any(|(_, v)| v.contains(&job))),
        "a raw path became a label: {api_series:?}"
    );

    // Structured logs: the workers' lines are JSON, and every line logged
    // while a shard is handled carries its job and index (the `shard` span).
    let mut shard_lines = 0;
    for w in [&w1, &w2] {
        for line in w.log().lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", w.name));
            let about_a_shard = v["message"] == "shard done" || v["span"]["name"] == "shard";
            if !about_a_shard {
                continue;
            }
            shard_lines += 1;
            assert_eq!(v["span"]["name"], "shard", "{line}");
            assert_eq!(v["span"]["job"], job.as_str(), "{line}");
            assert!(v["span"]["shard"].as_u64().is_some(), "{line}");
            if v["message"] == "shard done" {
                assert_eq!(v["span"]["shard"], v["shard"], "{line}");
            }
        }
    }
    assert!(
        shard_lines >= shards,
        "too few shard lines in the worker logs:\n{}",
        logs(&[&w1, &w2])
    );

    drop((api, coordinator, w1, w2));
    runtime().block_on(c.cleanup());
}

// ----------------------------------------------------------- Prometheus

/// A Prometheus server for one test; killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Starts `/usr/bin/prometheus` scraping `targets` (`(job, addr)`)
    /// every second; waits until it is ready.
    fn start(targets: &[(&str, &str)]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} is missing: install Debian's Prometheus (`apt-get install -y prometheus`; \
             scripts/deploy-tools.sh does) to run the dashboard test"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{addr}\"]\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(&p.addr, "/-/ready").map(|r| r.0) != Some(200) {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query` of `expr` now: the result vector, or the error
    /// Prometheus gave.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = format!("query={}", form_encode(expr));
        let mut s = TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST /api/v1/query HTTP/1.0\r\nHost: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        let (_, json) = reply
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not an HTTP reply: {reply}"))?;
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

/// `application/x-www-form-urlencoded` of `text`.
fn form_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Every query (`expr`) of the dashboard, as `(name, expr)` with the name
/// `"panel title / refId"`.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                let title = map.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(|e| e.as_str()) {
                    let reference = map.get("refId").and_then(|r| r.as_str()).unwrap_or("?");
                    out.push((format!("{title} / {reference}"), expr.to_string()));
                }
                for child in map.values() {
                    walk(child, title, out);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, title, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], "", &mut out);
    out
}

/// `expr` with Grafana's interval variables and the dashboard's template
/// variables replaced by concrete values Prometheus accepts.
fn concrete(expr: &str, variables: &[String]) -> String {
    let mut e = expr.to_string();
    for (name, value) in [
        ("__rate_interval", "15s"),
        ("__interval", "5s"),
        ("__range", "5m"),
    ] {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    for name in variables {
        // Any value: the dashboard's variables select among series.
        e = e
            .replace(&format!("${{{name}}}"), ".*")
            .replace(&format!("[[{name}]]"), ".*")
            .replace(&format!("${name}"), ".*");
    }
    e
}

#[test]
fn every_dashboard_query_returns_series_from_a_real_prometheus() {
    let path = repo_root().join("charts/dig-cluster/dashboards/dig-cluster.json");
    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    let queries: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(name, expr)| {
            let e = concrete(&expr, &variables);
            assert!(!e.contains('$'), "{name}: a variable is left in {e:?}");
            (name, e)
        })
        .collect();
    assert!(
        queries.len() >= 10,
        "too few dashboard queries: {queries:?}"
    );
    // The panels the issue asks for read these metrics.
    for metric in [
        "dig_samples_generated_total",
        "dig_queue_depth_shards",
        "dig_queue_oldest_shard_age_seconds",
        "dig_jobs",
        "dig_shard_duration_seconds_bucket",
        "dig_shards_failed_total",
        "dig_shards_retried_total",
        "dig_shards_dead_lettered_total",
        "dig_api_request_duration_seconds_bucket",
        "dig_model_cache_hits_total",
        "dig_feature_cache_hits_total",
        "dig_workers_up",
    ] {
        assert!(
            queries.iter().any(|(_, e)| e.contains(metric)),
            "no dashboard query reads {metric}"
        );
    }

    let _serial = serial();
    let mut c = cluster("dashboard");
    let mut api = c.start_api();
    let mut coordinator = c.start_coordinator();
    let mut worker = c.start_worker();
    let api_addr = c.api_url.trim_start_matches("http://").to_string();
    let coordinator_addr = coordinator.metrics_addr();
    let worker_addr = worker.metrics_addr();
    wait_for_workers(&c, 1, &[&worker]);
    let prometheus = Prometheus::start(&[
        ("api", &api_addr),
        ("coordinator", &coordinator_addr),
        ("worker", &worker_addr),
    ]);
    // Every target scraped before the job starts, so rates have a baseline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = prometheus.query("sum(up)").unwrap();
        if up.first().and_then(|s| s["value"][1].as_str()) == Some("3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus does not scrape the three services: {up:?}\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        // Long enough (tens of seconds) to be seen running by a few
        // refreshes of the coordinator's cluster figures and their scrapes.
        // (The coordinator refreshes them every 5 s; this is about 15 s of
        // sampling on an idle core.)
        400,
        &["--seed", "9", "--steps", "50", "--shard-size", "20"],
    );
    // Each query is evaluated every second until it has returned series
    // once (some read figures that exist only while the job runs, others
    // only once a shard is done); an error fails at once.
    let mut pending: BTreeMap<String, String> = queries.into_iter().collect();
    let mut final_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    while !pending.is_empty() {
        pending.retain(|name, expr| match prometheus.query(expr) {
            Ok(result) => result.is_empty(),
            Err(e) => panic!("dashboard query {name:?} failed: {e}\n  expr: {expr}"),
        });
        if pending.is_empty() {
            break;
        }
        let view = c.status(&c.key_a, &job);
        if matches!(
            view["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            // The figures of the end need a scrape and a refresh or two.
            let since = *final_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "dashboard queries returned no series during or after the job ({view}):\n{}",
                pending
                    .iter()
                    .map(|(name, expr)| format!("  {name}: {expr}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        for s in [&mut api, &mut coordinator, &mut worker] {
            if let Some(status) = s.exited() {
                panic!("{} exited ({status}); log:\n{}", s.name, s.log());
            }
        }
        assert!(Instant::now() < deadline, "the job did not finish: {view}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let done = c.wait_final(
        &c.key_a,
        &job,
        Duration::from_secs(900),
        &mut [&mut api, &mut coordinator, &mut worker],
    );
    assert_eq!(done["state"], "succeeded", "{done}");

    drop(prometheus);
    drop((api, coordinator, worker));
    runtime().block_on(c.cleanup());
}
