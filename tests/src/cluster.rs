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
use dig_common::queue::{RabbitQueue, ShardQueue};
use dig_common::store::{open_store, StoreConfig, StoreKind};
use dig_model::structure::Ensemble;
use futures::TryStreamExt;
use object_store::ObjectStore;

use crate::{digctl_path, fixture};

/// The fixture protein's sequence (`model/tests/data/features.npz`).
pub const SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";
/// The id the fixture model is uploaded under.
pub const MODEL: &str = "dig-small";

fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `make test`, or `scripts/services.sh` and `source .services/env`")
    })
}

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

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
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
    standalone: bool,
    next_worker: usize,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let c = Cluster::base(label, true);
        let data = c.dir.path().join("data");
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
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(digctl_path())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

    /// Uploads the fixture features as tenant `key`; their SHA-256.
    pub fn upload_features(&self, key: &str) -> String {
        let out = self.client_ok(
            key,
            &[
                "upload-features",
                "--json",
                fixture("features.npz").to_str().unwrap(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["sha256"].as_str().unwrap().to_string()
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

    /// The job's view from `digctl status --json`.
    pub fn status(&self, key: &str, job: &str) -> serde_json::Value {
        serde_json::from_str(&self.client_ok(key, &["status", "--json", job])).unwrap()
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
        let progress = RedisProgress::connect(&env_var("DIG_TEST_REDIS"), &self.namespace)
            .await
            .unwrap();
        let queue = RabbitQueue::connect(&env_var("DIG_TEST_AMQP"), &self.namespace)
            .await
            .unwrap();
        let cfg = StoreConfig {
            kind: StoreKind::S3,
            s3_endpoint: Some(env_var("DIG_TEST_S3_ENDPOINT")),
            s3_bucket: Some(env_var("DIG_TEST_S3_BUCKET")),
            prefix: self.namespace.clone(),
            ..StoreConfig::default()
        };
        Backends {
            progress,
            queue,
            store: open_store(&cfg).unwrap(),
            prefix: self.namespace.clone(),
        }
    }

    /// Removes this deployment's queues, Redis keys and objects.
    pub async fn cleanup(&self) {
        if self.standalone {
            return;
        }
        let b = self.backends().await;
        b.queue.purge_and_delete().await.unwrap();
        b.progress.delete_all().await.unwrap();
        for key in b.objects().await {
            b.store
                .delete(&object_store::path::Path::from(key))
                .await
                .unwrap();
        }
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// Direct clients of the servers, for assertions and cleanup.
pub struct Backends {
    pub progress: RedisProgress,
    pub queue: RabbitQueue,
    pub store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Backends {
    /// Every object key of the deployment, sorted.
    pub async fn objects(&self) -> Vec<String> {
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let mut keys: Vec<String> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub async fn workers(&self) -> Vec<WorkerHeartbeat> {
        self.progress.workers().await.unwrap()
    }
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
