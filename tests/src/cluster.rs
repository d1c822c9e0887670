//! Running the services as users deploy them: `digctl api`, `digctl
//! coordinator` and `digctl worker` processes against the real RabbitMQ,
//! Redis and S3 server that `make test` starts (endpoints in the
//! `DIG_TEST_*` variables of `.services/env`), or `digctl standalone` with
//! none. Each [`Cluster`] has its own namespace (queue names, Redis prefix,
//! object prefix), API port, keys file and work directory, so tests run in
//! parallel; [`Cluster::cleanup`] removes what it left on the servers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dig_common::progress::{ProgressStore, RedisProgress, WorkerHeartbeat};
use dig_common::queue::RabbitQueue;
use dig_model::structure::Ensemble;
use object_store::ObjectStore;

use crate::{digctl_path, fixture};

pub use dig_test_support::{MODEL, SEQUENCE};

use dig_test_support::{env as env_var, Servers};

/// A running `digctl` service; killed (SIGKILL) when dropped.
pub struct Service {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `grace` for the exit; whether it exited successfully.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        false
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One isolated deployment for one test.
pub struct Cluster {
    pub namespace: String,
    pub dir: tempfile::TempDir,
    pub api_url: String,
    /// API keys of tenants `lab-a` and `lab-b`.
    pub key_a: String,
    pub key_b: String,
    env: Vec<(String, String)>,
    /// `digctl standalone`'s `--data-dir`, inside `dir` ("data").
    pub data_name: String,
    standalone: bool,
    next_worker: usize,
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `probe` every 200 ms until it holds: the tests' way to wait for
/// a readiness signal rather than a fixed sleep. After `timeout` it panics
/// naming `what` was awaited, with the logs of `svcs`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    svcs: &[&Service],
    mut probe: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}; logs:\n{}",
            svcs.iter()
                .map(|s| format!("--- {} ---\n{}", s.name, s.log()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A fresh key of `tenant` and its keys-file line, from `digctl api-key new`.
fn new_key(tenant: &str) -> (String, String) {
    let out = Command::new(digctl_path())
        .args(["api-key", "new", tenant])
        .output()
        .unwrap();
    assert!(out.status.success(), "api-key new failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key = lines.next().unwrap().to_string();
    let line = lines.next().unwrap().to_string();
    assert!(line.starts_with(&format!("{tenant} ")), "{line}");
    (key, line)
}

impl Cluster {
    fn base(label: &str, standalone: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let namespace = format!("e2e-{label}-{}-{}", std::process::id(), nanos());
        let port = free_port();
        let (key_a, line_a) = new_key("lab-a");
        let (key_b, line_b) = new_key("lab-b");
        let keys = dir.path().join("api-keys");
        std::fs::write(&keys, format!("{line_a}\n{line_b}\n")).unwrap();
        let mut env = vec![
            ("DIG_LOG".to_string(), "info".to_string()),
            ("DIG_NAMESPACE".into(), namespace.clone()),
            ("DIG_API_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("DIG_API_KEYS_FILE".into(), keys.display().to_string()),
            (
                "DIG_API_SPOOL_DIR".into(),
                dir.path().join("spool").display().to_string(),
            ),
            ("DIG_COORDINATOR_POLL_INTERVAL_MS".into(), "100".into()),
            ("DIG_WORKER_HEARTBEAT_SECS".into(), "1".into()),
            ("DIG_WORKER_BATCH_SIZE".into(), "5".into()),
            ("DIG_API_DEFAULT_MODEL".into(), MODEL.into()),
            // Test webhook receivers listen on 127.0.0.1.
            ("DIG_API_WEBHOOK_ALLOW_PRIVATE".into(), "true".into()),
            // Coordinator and worker metrics on any free port (several
            // services per host); `Service::metrics_addr` finds it.
            ("DIG_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
            // Tests read the logs as text (`job=... shard=...`).
            ("DIG_LOG_FORMAT".into(), "text".into()),
        ];
        if standalone {
            // Point the distributed settings at closed ports: the embedded
            // mode must not need (or touch) any server.
            env.push(("DIG_QUEUE_URL".into(), "amqp://127.0.0.1:1/%2f".into()));
            env.push(("DIG_PROGRESS_URL".into(), "redis://127.0.0.1:1/".into()));
        } else {
            env.extend([
                ("DIG_QUEUE_URL".into(), env_var("DIG_TEST_AMQP")),
                ("DIG_PROGRESS_URL".into(), env_var("DIG_TEST_REDIS")),
                ("DIG_STORE_KIND".into(), "s3".into()),
                (
                    "DIG_STORE_S3_ENDPOINT".into(),
                    env_var("DIG_TEST_S3_ENDPOINT"),
                ),
                ("DIG_STORE_S3_BUCKET".into(), env_var("DIG_TEST_S3_BUCKET")),
                ("DIG_STORE_PREFIX".into(), namespace.clone()),
            ]);
        }
        Cluster {
            namespace,
            api_url: format!("http://127.0.0.1:{port}"),
            key_a,
            key_b,
            dir,
            env,
            data_name: "data".into(),
            standalone,
            next_worker: 0,
        }
    }

    /// A deployment on the test servers; start its services with [`Cluster::start`].
    pub fn distributed(label: &str) -> Cluster {
        Cluster::base(label, false)
    }

    /// `digctl standalone` serving the fixture model; no servers needed.
    pub fn standalone(label: &str) -> (Cluster, Service) {
        Cluster::standalone_with(label, |_| {})
    }

    /// [`Cluster::standalone`] with the configuration changed by
    /// `configure` (e.g. [`Cluster::set_env`]) before the process starts.
    pub fn standalone_with(
        label: &str,
        configure: impl FnOnce(&mut Cluster),
    ) -> (Cluster, Service) {
        let mut c = Cluster::base(label, true);
        configure(&mut c);
        let data = c.dir.path().join(&c.data_name);
        let keys = c.dir.path().join("api-keys");
        let svc = c.spawn(
            "standalone",
            &[
                "standalone",
                "--data-dir",
                data.to_str().unwrap(),
                "--api-keys",
                keys.to_str().unwrap(),
                "--model",
                fixture("").to_str().unwrap(),
            ],
        );
        c.wait_ready(&svc);
        (c, svc)
    }

    /// A `digctl` service process with this deployment's configuration.
    /// Sets a configuration variable of the services started from now on.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
    }

    pub fn spawn(&self, name: &str, args: &[&str]) -> Service {
        self.spawn_with(name, args, &[])
    }

    /// [`Cluster::spawn`] with `extra` variables set over the deployment's
    /// (e.g. a second API replica's `DIG_API_LISTEN`).
    pub fn spawn_with(&self, name: &str, args: &[&str], extra: &[(&str, &str)]) -> Service {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(digctl_path())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied())
            .env("DIG_WORKER_ID", name)
            .env(
                "DIG_WORKER_CACHE_DIR",
                self.dir.path().join("cache").join(name),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Service {
            name: name.into(),
            child,
            log,
        }
    }

    /// Uploads the fixture model (directly to the store, as an operator does).
    pub fn upload_model(&self) {
        self.upload_model_dir(&fixture(""), MODEL);
    }

    /// Uploads model directory `dir` as `id`.
    pub fn upload_model_dir(&self, dir: &Path, id: &str) {
        assert!(!self.standalone, "standalone serves --model");
        let out = Command::new(digctl_path())
            .args(["upload-model", dir.to_str().unwrap(), id])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "upload-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_api(&self) -> Service {
        let svc = self.spawn("api", &["api"]);
        self.wait_ready(&svc);
        svc
    }

    pub fn start_coordinator(&self) -> Service {
        self.spawn("coordinator", &["coordinator"])
    }

    /// A worker named `worker-N`.
    pub fn start_worker(&mut self) -> Service {
        self.next_worker += 1;
        self.spawn(&format!("worker-{}", self.next_worker), &["worker"])
    }

    /// Waits until the API answers `/healthz`.
    pub fn wait_ready(&self, svc: &Service) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = self.api_url.trim_start_matches("http://").to_string();
        loop {
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready; log:\n{}",
                svc.name,
                svc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a `digctl` client command as `key`'s tenant.
    pub fn client(&self, key: &str, args: &[&str]) -> Output {
        Command::new(digctl_path())
            .args(args)
            .env("DIG_API_URL", &self.api_url)
            .env("DIG_API_KEY", key)
            .env("DIG_LOG", "warn")
            .output()
            .unwrap()
    }

    /// A client command that must succeed; its stdout.
    pub fn client_ok(&self, key: &str, args: &[&str]) -> String {
        let out = self.client(key, args);
        assert!(
            out.status.success(),
            "digctl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A client command that must fail; its stderr.
    pub fn client_err(&self, key: &str, args: &[&str]) -> String {
        let out = self.client(key, args);
        assert!(
            !out.status.success(),
            "digctl {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Runs `digctl` with this deployment's configuration (as an operator's
    /// command such as `reconcile` would run), not as a client.
    pub fn digctl_configured(&self, args: &[&str]) -> Output {
        Command::new(digctl_path())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DIG_LOG", "warn")
            .output()
            .unwrap()
    }

    /// `GET path` on the API over a raw TCP connection: the status code and
    /// the body (`None` when the API does not answer).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.api_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let code = reply.split_whitespace().nth(1)?.parse().ok()?;
        let body = reply
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Some((code, body))
    }

    /// [`Cluster::status`], or `None` while the API does not know the job
    /// (e.g. between a Redis flush and the entry's rebuild) or does not
    /// answer. A plain HTTP request, like [`Cluster::status`].
    pub fn try_status(&self, key: &str, job: &str) -> Option<serde_json::Value> {
        let addr = self.api_url.trim_start_matches("http://");
        let path = format!("/v1/jobs/{job}");
        match http_get_within(addr, Some(key), &path, Duration::from_secs(60))? {
            (200, body) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// Uploads the fixture features as tenant `key`; their SHA-256.
    pub fn upload_features(&self, key: &str) -> String {
        self.upload_features_from(key, &fixture("features.npz"))
    }

    /// Uploads the features `path` as tenant `key`; their SHA-256.
    pub fn upload_features_from(&self, key: &str, path: &Path) -> String {
        let out = self.client_ok(key, &["upload-features", "--json", path.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    }

    /// Polls until `job` has a finished shard or has succeeded (at most 120
    /// s, else a panic with `worker`'s log); the view then.
    pub fn wait_first_shard(&self, key: &str, job: &str, worker: &Service) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self.status(key, job);
            if v["shards"]["done"].as_u64().unwrap_or(0) >= 1 || v["state"] == "succeeded" {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no shard done: {v}\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submits a job of the fixture protein; its id.
    pub fn submit(&self, key: &str, sha: &str, num_samples: u64, extra: &[&str]) -> String {
        let n = num_samples.to_string();
        let mut args = vec![
            "submit",
            "--features-sha256",
            sha,
            "--sequence",
            SEQUENCE,
            "--num-samples",
            &n,
        ];
        args.extend_from_slice(extra);
        self.client_ok(key, &args).trim().to_string()
    }

    /// The job's view (`GET /v1/jobs/{id}`). A plain HTTP request rather
    /// than `digctl status`: tests poll this, and a process that loads
    /// libtorch per poll would take the CPU the workers need.
    pub fn status(&self, key: &str, job: &str) -> serde_json::Value {
        let (status, body) = self.api_get(key, &format!("/v1/jobs/{job}"));
        assert_eq!(status, 200, "GET /v1/jobs/{job}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A GET to the API as `key`'s tenant: status code and body.
    pub fn api_get(&self, key: &str, path: &str) -> (u16, String) {
        let addr = self.api_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let (status, _, body) = split_reply(&reply);
        (status, body)
    }

    /// A POST of the JSON `body` to the API as `key`'s tenant: status code
    /// and body.
    pub fn api_post(&self, key: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
        let (status, _, body) = self.api_post_reply(key, path, body);
        (status, body)
    }

    /// [`Cluster::api_post`] with the reply's header lines (`Name: value`,
    /// as sent) as well.
    pub fn api_post_reply(
        &self,
        key: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, Vec<String>, String) {
        let addr = self.api_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        split_reply(&reply)
    }

    /// A POST of raw `bytes` (`application/octet-stream`, an upload) to the
    /// API as `key`'s tenant: status code and body.
    pub fn api_post_bytes(&self, key: &str, path: &str, bytes: &[u8]) -> (u16, String) {
        let addr = self.api_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        )
        .unwrap();
        s.write_all(bytes).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let (status, _, body) = split_reply(&reply);
        (status, body)
    }

    /// Writes a webhook secrets file (`TENANT SECRET` lines) and points
    /// `api.webhook_secrets_file` of the services started from now on at it.
    pub fn set_webhook_secrets(&mut self, lines: &str) {
        let path = self.dir.path().join("webhook-secrets");
        std::fs::write(&path, lines).unwrap();
        self.set_env("DIG_API_WEBHOOK_SECRETS_FILE", path.to_str().unwrap());
    }

    /// Reads the job's event stream (`GET /v1/jobs/{job}/events`) as `key`'s
    /// tenant over a raw HTTP/1.0 connection until the server closes it or
    /// `timeout` passes: the HTTP status, the events `(name, data)` in order
    /// of arrival, and whether the server closed the stream.
    pub fn job_events(
        &self,
        key: &str,
        job: &str,
        timeout: Duration,
    ) -> (u16, Vec<(String, serde_json::Value)>, bool) {
        use std::io::BufRead;
        let addr = self.api_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.write_all(
            format!(
                "GET /v1/jobs/{job}/events HTTP/1.0\r\nHost: {addr}\r\n\
                 Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let deadline = Instant::now() + timeout;
        let mut reader = std::io::BufReader::new(s);
        let (mut status, mut in_body, mut closed) = (0u16, false, false);
        let (mut name, mut data) = (String::new(), String::new());
        let mut events = Vec::new();
        let mut line = String::new();
        while Instant::now() < deadline {
            // A read that times out keeps what it read in `line`.
            match reader.read_line(&mut line) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("reading the event stream: {e}"),
            }
            if !line.ends_with('\n') {
                continue;
            }
            let l = line.trim_end_matches(['\r', '\n']).to_string();
            line.clear();
            if status == 0 {
                status = l.split_whitespace().nth(1).unwrap().parse().unwrap();
            } else if !in_body {
                in_body = l.is_empty();
            } else if l.is_empty() {
                if !data.is_empty() {
                    let value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
                    events.push((std::mem::take(&mut name), value));
                }
                data.clear();
                name.clear();
            } else if let Some(v) = l.strip_prefix("event:") {
                name = v.trim_start().to_string();
            } else if let Some(v) = l.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        (status, events, closed)
    }

    /// Polls until the job is final (or `timeout`); its last view.
    pub fn wait_final(
        &self,
        key: &str,
        job: &str,
        timeout: Duration,
        services: &mut [&mut Service],
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.status(key, job);
            if matches!(
                v["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return v;
            }
            for s in services.iter_mut() {
                if let Some(status) = s.exited() {
                    panic!(
                        "{} exited ({status}) while waiting; log:\n{}",
                        s.name,
                        s.log()
                    );
                }
            }
            assert!(Instant::now() < deadline, "job {job} did not finish: {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Downloads the job's shards with `digctl fetch`; the ensembles, in shard order.
    pub fn fetch(&self, key: &str, job: &str) -> Vec<Ensemble> {
        self.fetch_with_sequence(key, job, SEQUENCE)
    }

    /// [`Cluster::fetch`] of a job of another protein.
    pub fn fetch_with_sequence(&self, key: &str, job: &str, sequence: &str) -> Vec<Ensemble> {
        let out = self.dir.path().join(format!("fetch-{job}"));
        self.client_ok(key, &["fetch", job, "--out", out.to_str().unwrap()]);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        manifest["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let i = s["index"].as_u64().unwrap();
                let path = out.join("shards").join(format!("{i:06}.npz"));
                Ensemble::read_npz(&path, sequence).unwrap()
            })
            .collect()
    }

    /// Redis, RabbitMQ and S3 clients on this deployment's namespace.
    pub async fn backends(&self) -> Backends {
        assert!(!self.standalone);
        let servers = Servers::connect(&self.namespace).await;
        Backends {
            progress: servers.progress.clone(),
            queue: servers.queue.clone(),
            store: servers.store.clone(),
            servers,
        }
    }

    /// Removes this deployment's queues, Redis keys and objects.
    pub async fn cleanup(&self) {
        if self.standalone {
            return;
        }
        Servers::connect(&self.namespace).await.cleanup().await;
    }
}

/// A server stopped (`scripts/services.sh stop-rabbitmq` or `stop-redis`)
/// until [`Outage::end`] or the drop of this guard (also on a panic) starts
/// it again (`restart-rabbitmq` / `restart-redis`, which start a stopped
/// server), so that a failing test never leaves a server down for the tests
/// after it. Redis is stopped with SHUTDOWN SAVE and comes back with its
/// data, as a production Redis with persistence does. The script serialises
/// itself with a lock in `.services/`, as the queue tests' restarts do;
/// callers serialise their own tests around the outage.
pub struct Outage {
    restart: &'static str,
    down: bool,
}

impl Outage {
    pub fn rabbitmq() -> Outage {
        services_sh("stop-rabbitmq");
        Outage {
            restart: "restart-rabbitmq",
            down: true,
        }
    }

    pub fn redis() -> Outage {
        services_sh("stop-redis");
        Outage {
            restart: "restart-redis",
            down: true,
        }
    }

    /// Starts the server and waits until it takes connections.
    pub fn end(mut self) {
        self.down = false;
        services_sh(self.restart);
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.down {
            self.down = false;
            let ok = Command::new(crate::repo_root().join("scripts/services.sh"))
                .arg(self.restart)
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|out| out.status.success());
            if !ok && !std::thread::panicking() {
                panic!("scripts/services.sh {} failed", self.restart);
            }
        }
    }
}

/// An HTTP/1.0 reply: status, header lines (`Name: value`), body.
fn split_reply(reply: &str) -> (u16, Vec<String>, String) {
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((reply, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {head}"));
    let headers = head.lines().skip(1).map(str::to_string).collect();
    (status, headers, body.to_string())
}

/// Runs `scripts/services.sh COMMAND`; its output only shows when it fails.
fn services_sh(command: &str) {
    let out = Command::new(crate::repo_root().join("scripts/services.sh"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/services.sh {command}: {e}"));
    assert!(
        out.status.success(),
        "scripts/services.sh {command} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// Direct clients of the servers, for assertions and cleanup.
pub struct Backends {
    pub progress: Arc<RedisProgress>,
    pub queue: Arc<RabbitQueue>,
    pub store: Arc<dyn ObjectStore>,
    servers: Servers,
}

impl Backends {
    /// Every object key of the deployment, sorted.
    pub async fn objects(&self) -> Vec<String> {
        self.servers.objects().await
    }

    /// Every Redis key of the deployment (`{namespace}:*`), sorted. KEYS, not
    /// SCAN: test namespaces are small.
    pub async fn redis_keys(&self) -> Vec<String> {
        let client = redis::Client::open(env_var("DIG_TEST_REDIS")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.servers.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Waits (at most `within`) until the shards and jobs queues hold no
    /// ready message: every job id taken by a coordinator, every shard by a
    /// worker.
    pub async fn wait_queues_drained(&self, within: Duration) {
        use dig_common::queue::ShardQueue;
        let deadline = Instant::now() + within;
        loop {
            let shards = self.queue.shard_queue_depth().await.unwrap();
            let jobs = self.queue.jobs_queue_depth().await.unwrap();
            if shards == 0 && jobs == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{shards} shard and {jobs} job messages stay queued after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn workers(&self) -> Vec<WorkerHeartbeat> {
        self.progress.workers().await.unwrap()
    }

    /// The shard outputs of `job` in the store, as `(index, ensemble)` in
    /// index order: what a job has written so far, manifest or not.
    pub async fn shard_ensembles(&self, job: &str, sequence: &str) -> Vec<(u64, Ensemble)> {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("{}/jobs/{job}/shards/", self.servers.prefix);
        let mut out = Vec::new();
        for key in self.objects().await {
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            let index: u64 = name
                .strip_suffix(".npz")
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected shard object {key}"));
            let bytes = self
                .store
                .get(&object_store::path::Path::from(key.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            out.push((index, Ensemble::read_npz(&path, sequence).unwrap()));
        }
        out
    }
}

/// Checks that `shards` hold samples of `reference` at most once each, with
/// bit-identical frames: the part of a run a cancelled job got to write.
/// Returns how many samples there were.
pub fn assert_samples_within(shards: &[Ensemble], reference: &Ensemble) -> usize {
    let l = reference.len_residues();
    let mut seen = std::collections::BTreeSet::new();
    for e in shards {
        for (k, &i) in e.sample_index.iter().enumerate() {
            assert!(seen.insert(i), "sample {i} appears more than once");
            let r = reference
                .sample_index
                .iter()
                .position(|&j| j == i)
                .unwrap_or_else(|| panic!("sample {i} is not in the reference run"));
            assert!(
                e.tr[k * l * 3..(k + 1) * l * 3] == reference.tr[r * l * 3..(r + 1) * l * 3]
                    && e.rot_mat[k * l * 9..(k + 1) * l * 9]
                        == reference.rot_mat[r * l * 9..(r + 1) * l * 9],
                "sample {i} differs from the local run"
            );
        }
    }
    seen.len()
}

/// `digctl sample` of the fixture model and features: the reference ensemble.
pub fn local_sample(dir: &Path, num_samples: u64, seed: u64, steps: u64, batch: usize) -> Ensemble {
    let out = dir.join(format!("local-{num_samples}-{seed}-{steps}-{batch}"));
    crate::digctl_ok(&[
        "sample",
        "--model",
        fixture("").to_str().unwrap(),
        "--features",
        fixture("features.npz").to_str().unwrap(),
        "--sequence",
        SEQUENCE,
        "--num-samples",
        &num_samples.to_string(),
        "--seed",
        &seed.to_string(),
        "--steps",
        &steps.to_string(),
        "--batch-size",
        &batch.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    Ensemble::read_npz(&out.join("samples.npz"), SEQUENCE).unwrap()
}

/// Checks that `shards` hold every index of `reference` exactly once, with
/// bit-identical frames.
pub fn assert_same_samples(shards: &[Ensemble], reference: &Ensemble) {
    let n = reference.num_samples();
    let l = reference.len_residues();
    let mut seen = vec![0u32; n];
    for e in shards {
        for (k, &i) in e.sample_index.iter().enumerate() {
            let i = usize::try_from(i).expect("non-negative index");
            assert!(i < n, "sample index {i} out of range 0..{n}");
            seen[i] += 1;
            let r = reference
                .sample_index
                .iter()
                .position(|&j| j as usize == i)
                .expect("reference has the index");
            assert!(
                e.tr[k * l * 3..(k + 1) * l * 3] == reference.tr[r * l * 3..(r + 1) * l * 3]
                    && e.rot_mat[k * l * 9..(k + 1) * l * 9]
                        == reference.rot_mat[r * l * 9..(r + 1) * l * 9],
                "sample {i} differs from the local run"
            );
        }
    }
    let wrong: Vec<(usize, u32)> = seen
        .iter()
        .enumerate()
        .filter(|(_, &c)| c != 1)
        .map(|(i, &c)| (i, c))
        .collect();
    assert!(
        wrong.is_empty(),
        "samples not present exactly once (index, count): {:?}",
        &wrong[..wrong.len().min(20)]
    );
}

impl Service {
    /// The address (`127.0.0.1:PORT`) of the service's metrics listener,
    /// from its `metrics listening on http://ADDR` log line (`DIG_METRICS_LISTEN`
    /// is port 0 in tests); waits up to a minute for the line.
    pub fn metrics_addr(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(addr) = log.lines().find_map(|l| {
                let (_, rest) = l.split_once("metrics listening on http://")?;
                let end = rest
                    .find(|c: char| {
                        !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                    })
                    .unwrap_or(rest.len());
                Some(rest[..end].to_string())
            }) {
                return addr;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before serving metrics; log:\n{log}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} logged no metrics address; log:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `GET path` on `addr` (`HOST:PORT`) over a raw HTTP/1.0 connection: the
/// status code and the body; `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_get_within(addr, None, path, Duration::from_secs(60))
}

/// [`http_get`] as `key`'s tenant (when given), giving up after `timeout`
/// without an answer.
pub fn http_get_within(
    addr: &str,
    key: Option<&str>,
    path: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

/// One sample of a Prometheus text exposition: name, labels (in the order
/// written), value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus text exposition (`# ` lines skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap_or(rest);
                let mut labels = Vec::new();
                // Label values here hold no `",` sequence (routes, ids, states).
                for pair in rest.split("\",").filter(|p| !p.is_empty()) {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                    }
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}
