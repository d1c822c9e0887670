//! The one configuration of every dig-cluster service.
//!
//! Settings come from, in increasing precedence: the defaults below, a TOML
//! file (`--config FILE` or `DIG_CONFIG`), and `DIG_*` environment
//! variables. Each setting `section.name` has the variable
//! `DIG_SECTION_NAME` (upper case), e.g. `worker.batch_size` is
//! `DIG_WORKER_BATCH_SIZE`; the top-level `namespace` is `DIG_NAMESPACE`.
//! S3 credentials left unset fall back to the standard `AWS_*` variables
//! (see [`StoreConfig`]), so secrets need not be in the file.
//!
//! ```toml
//! namespace = "dig"              # RabbitMQ queue names and Redis key prefix
//! [queue]
//! url = "amqp://127.0.0.1:5672/%2f"
//! [progress]
//! url = "redis://127.0.0.1:6379/"
//! [store]
//! kind = "s3"                    # or "local"
//! s3_endpoint = "http://seaweedfs:8333"
//! s3_bucket = "dig"
//! [api]
//! listen = "0.0.0.0:8080"
//! keys_file = "/etc/dig/api-keys"
//! [coordinator]
//! window_per_job = 8
//! [worker]
//! device = "cuda"
//! batch_size = 16
//! ```
//!
//! The README's "Configuration" section documents every setting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CommonError, Result};
use crate::store::{StoreConfig, StoreKind};

/// The variables under `DIG_` that are not settings (the CLI's own).
/// `DIG_LOG_FORMAT` (`json` or `text`) is read by the logging set-up.
const NOT_SETTINGS: &[&str] = &[
    "DIG_CONFIG",
    "DIG_LOG",
    "DIG_LOG_FORMAT",
    "DIG_API_URL",
    "DIG_API_KEY",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Names this deployment's RabbitMQ queues (`{namespace}.shards`,
    /// `{namespace}.jobs`) and prefixes its Redis keys (`{namespace}:`), so
    /// several deployments can share servers.
    pub namespace: String,
    pub queue: QueueSection,
    pub progress: ProgressSection,
    pub store: StoreSection,
    pub api: ApiSection,
    pub coordinator: CoordinatorSection,
    pub worker: WorkerSection,
    pub metrics: MetricsSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    /// AMQP URL of RabbitMQ.
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProgressSection {
    /// Redis URL.
    pub url: String,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `s3` or `local`.
    pub kind: StoreKind,
    /// Directory of a local store.
    pub local_dir: PathBuf,
    /// Unset: `AWS_ENDPOINT_URL`, then Amazon S3.
    pub s3_endpoint: Option<String>,
    /// Unset: `AWS_BUCKET`.
    pub s3_bucket: Option<String>,
    /// Unset: `AWS_REGION`, else `us-east-1`.
    pub s3_region: Option<String>,
    /// Unset (both): `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// Key prefix inside the bucket or directory.
    pub prefix: String,
}

// Hand-written so that logging a configuration never prints the secret.
impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_store_config().fmt(f)
    }
}

impl StoreSection {
    pub fn to_store_config(&self) -> StoreConfig {
        StoreConfig {
            kind: self.kind,
            s3_endpoint: self.s3_endpoint.clone(),
            s3_bucket: self.s3_bucket.clone(),
            s3_region: self.s3_region.clone(),
            s3_access_key_id: self.s3_access_key_id.clone(),
            s3_secret_access_key: self.s3_secret_access_key.clone(),
            local_dir: Some(self.local_dir.clone()),
            prefix: self.prefix.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Address the API listens on.
    pub listen: String,
    /// Tenants' keys: one `TENANT SHA256_HEX_OF_KEY` line per key.
    pub keys_file: PathBuf,
    /// Largest feature upload, bytes.
    pub max_feature_bytes: u64,
    /// Most samples of one job.
    pub max_num_samples: u64,
    /// Largest shard a job may ask for.
    pub max_shard_size: u64,
    /// Longest a request may take until its response starts (reading its
    /// body included; a slow or stalled client gets 408). Feature uploads
    /// are exempt (they are large); streamed responses are not cut. Also
    /// the deadline for a request's headers (and for the next request on
    /// an idle connection): a client that trickles them is disconnected.
    pub request_timeout_secs: u64,
    /// Model of jobs that name none.
    pub default_model: String,
    /// Where uploads are spooled while validated; empty: the system's
    /// temporary directory. Needs room for a few `max_feature_bytes`.
    pub spool_dir: PathBuf,
    /// Most unfinished (queued or running) jobs of one tenant.
    pub max_jobs_per_tenant: u64,
    /// Most entries (jobs) in one `POST /v1/batches`.
    pub max_batch_entries: u64,
    /// Most samples one tenant may have waiting: the sum of
    /// `num_samples - samples_done` over its unfinished jobs.
    pub max_queued_samples_per_tenant: u64,
    /// Tenants' webhook signing secrets: one `TENANT SECRET` line each
    /// (`#` comments). Empty: no tenant may give a `callback_url`.
    pub webhook_secrets_file: PathBuf,
    /// Attempts at delivering a webhook before it is given up.
    pub webhook_max_attempts: u32,
    /// Pause after the first failed delivery, ms; doubling after each
    /// further failure, at most 10 minutes.
    pub webhook_backoff_ms: u64,
    /// Time allowed for one delivery (connect, send, answer), seconds.
    pub webhook_timeout_secs: u64,
    /// Whether webhooks may go to loopback, private and link-local addresses
    /// (off: refused at submission and at delivery, against SSRF).
    pub webhook_allow_private: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSection {
    /// Most shards of one job published and not yet done.
    pub window_per_job: u64,
    /// How often the coordinator looks at every running job, ms.
    pub poll_interval_ms: u64,
    /// Fair share: most shards of one tenant and one priority published and
    /// not yet done, at least; the coordinator raises it to twice the live
    /// workers divided among the tenants with work of that priority, so a
    /// lone tenant still keeps every worker busy.
    pub tenant_window: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Name in heartbeats and logs; empty: `{hostname}-{pid}`.
    pub id: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Samples drawn together on the device.
    pub batch_size: usize,
    /// Memory for per-protein pair tensors, MiB (above it: a slower, lighter path).
    pub pair_cache_mb: u64,
    /// Local copies of models and features.
    pub cache_dir: PathBuf,
    /// Attempts at a shard that ended in an error the worker reported
    /// before it is parked and its job fails.
    pub max_attempts: u32,
    /// Attempts at a shard whose worker died (killed, preempted, out of
    /// memory: nothing reported) before it is parked: a shard that takes
    /// down every worker running it. Deaths never count as `max_attempts`.
    pub max_deaths: u32,
    /// Seconds between heartbeats (a worker is listed for 3 of them).
    pub heartbeat_secs: u64,
    /// On SIGTERM, how long a shard in progress may run on before it is
    /// stopped at a batch boundary and requeued. Keep it below the
    /// platform's kill deadline (Kubernetes' terminationGracePeriodSeconds).
    pub shutdown_grace_secs: u64,
    /// CPU threads libtorch uses for one forward pass; 0: its default (one
    /// per core). Set it when several workers (or other busy processes)
    /// share the cores: OpenMP threads waiting on each other spin.
    pub threads: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "dig".into(),
            queue: QueueSection::default(),
            progress: ProgressSection::default(),
            store: StoreSection::default(),
            api: ApiSection::default(),
            coordinator: CoordinatorSection::default(),
            worker: WorkerSection::default(),
            metrics: MetricsSection::default(),
        }
    }
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            url: "amqp://127.0.0.1:5672/%2f".into(),
        }
    }
}

impl Default for ProgressSection {
    fn default() -> Self {
        ProgressSection {
            url: "redis://127.0.0.1:6379/".into(),
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::Local,
            local_dir: "dig-data/store".into(),
            s3_endpoint: None,
            s3_bucket: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            prefix: String::new(),
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: "127.0.0.1:8080".into(),
            keys_file: "api-keys".into(),
            max_feature_bytes: 2 << 30,
            max_num_samples: 1_000_000,
            max_shard_size: 100_000,
            request_timeout_secs: 30,
            default_model: "dig-protein".into(),
            spool_dir: PathBuf::new(),
            max_jobs_per_tenant: 20_000,
            max_batch_entries: 10_000,
            max_queued_samples_per_tenant: 10_000_000,
            webhook_secrets_file: PathBuf::new(),
            webhook_max_attempts: 12,
            webhook_backoff_ms: 1000,
            webhook_timeout_secs: 10,
            webhook_allow_private: false,
        }
    }
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        CoordinatorSection {
            window_per_job: 8,
            poll_interval_ms: 500,
            tenant_window: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `digctl coordinator` and `digctl worker` serve `GET /metrics`
    /// (Prometheus text format) and `GET /healthz`; port 0 picks a free
    /// port (logged as `metrics listening on http://ADDR`); empty: no
    /// listener. The API (and `digctl standalone`) serves `/metrics` on
    /// `api.listen` instead.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: "127.0.0.1:9100".into(),
        }
    }
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            id: String::new(),
            device: "cpu".into(),
            batch_size: 8,
            pair_cache_mb: 4096,
            cache_dir: "dig-cache".into(),
            max_attempts: 3,
            max_deaths: 20,
            heartbeat_secs: 10,
            shutdown_grace_secs: 60,
            threads: 0,
        }
    }
}

impl Config {
    /// Defaults, then `file` (if given, else `DIG_CONFIG` if set), then the
    /// `DIG_*` variables of the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let from_env = std::env::var_os("DIG_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(from_env);
        let text = match &file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                CommonError::Invalid(format!("cannot read config file {}: {e}", path.display()))
            })?),
            None => None,
        };
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::from_sources(text.as_deref(), file.as_deref(), &vars)
    }

    /// [`Config::load`] with the file's text and the environment given.
    pub fn from_sources(
        toml_text: Option<&str>,
        origin: Option<&Path>,
        vars: &[(String, String)],
    ) -> Result<Config> {
        let base = match toml_text {
            None => Config::default(),
            Some(text) => toml::from_str(text).map_err(|e| {
                let name = origin.map_or("config".into(), |p| p.display().to_string());
                CommonError::Invalid(format!("{name}: {e}"))
            })?,
        };
        base.with_env(vars)
    }

    /// Applies `DIG_*` overrides. A variable that names no setting is an
    /// error (a typo would otherwise be silently ignored); so is a value of
    /// the wrong type, naming the variable.
    pub fn with_env(self, vars: &[(String, String)]) -> Result<Config> {
        let mut tree = serde_json::to_value(&self).expect("config serializes");
        let settings = setting_vars(&tree);
        for (name, value) in vars {
            if !name.starts_with("DIG_") || NOT_SETTINGS.contains(&name.as_str()) {
                continue;
            }
            // Test-harness variables share the prefix but are not settings.
            if name.starts_with("DIG_TEST_") {
                continue;
            }
            let Some((section, field)) = settings
                .iter()
                .find_map(|(var, s, f)| (var == name).then_some((s.clone(), f.clone())))
            else {
                return Err(CommonError::Invalid(format!(
                    "{name} is not a setting; settings are {}",
                    settings
                        .iter()
                        .map(|(v, _, _)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let slot = match &section {
                None => &mut tree[&field],
                Some(s) => &mut tree[s][&field],
            };
            *slot = match slot {
                Value::Number(_) => {
                    let n: u64 = value.trim().parse().map_err(|_| {
                        CommonError::Invalid(format!(
                            "{name}: expected a whole number, got {value:?}"
                        ))
                    })?;
                    Value::from(n)
                }
                Value::Bool(_) => Value::Bool(match value.trim() {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => {
                        return Err(CommonError::Invalid(format!(
                            "{name}: expected true or false, got {value:?}"
                        )))
                    }
                }),
                // Strings, paths, unset options: an empty value unsets an option.
                Value::Null if value.is_empty() => Value::Null,
                _ => Value::String(value.clone()),
            };
        }
        serde_json::from_value(tree)
            .map_err(|e| CommonError::Invalid(format!("environment settings: {e}")))
    }

    /// Every setting as `(variable, section, field)`.
    pub fn settings() -> Vec<(String, Option<String>, String)> {
        setting_vars(&serde_json::to_value(Config::default()).expect("config serializes"))
    }

    /// The directory uploads are spooled to.
    pub fn spool_dir(&self) -> PathBuf {
        if self.api.spool_dir.as_os_str().is_empty() {
            std::env::temp_dir().join("dig-uploads")
        } else {
            self.api.spool_dir.clone()
        }
    }

    /// The worker id: the configured one, else `{hostname}-{pid}`.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    }
}

fn setting_vars(tree: &Value) -> Vec<(String, Option<String>, String)> {
    let mut out = Vec::new();
    if let Value::Object(top) = tree {
        for (key, value) in top {
            match value {
                Value::Object(section) => {
                    for field in section.keys() {
                        out.push((
                            format!("DIG_{}_{}", key, field).to_ascii_uppercase(),
                            Some(key.clone()),
                            field.clone(),
                        ));
                    }
                }
                _ => out.push((format!("DIG_{key}").to_ascii_uppercase(), None, key.clone())),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_file_or_env() {
        let c = Config::from_sources(None, None, &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.api.max_feature_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(c.store.kind, StoreKind::Local);
    }

    #[test]
    fn file_then_env_override() {
        let text = r#"
            namespace = "lab"
            [store]
            kind = "s3"
            s3_bucket = "from-file"
            [worker]
            batch_size = 4
            device = "cuda"
        "#;
        let c = Config::from_sources(
            Some(text),
            None,
            &vars(&[
                ("DIG_WORKER_BATCH_SIZE", "16"),
                ("DIG_STORE_S3_ENDPOINT", "http://s3:8333"),
                ("DIG_API_KEYS_FILE", "/etc/dig/keys"),
                ("DIG_LOG", "debug"),
                ("DIG_LOG_FORMAT", "json"),
                ("DIG_METRICS_LISTEN", "0.0.0.0:9100"),
                ("DIG_TEST_AMQP", "ignored"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.namespace, "lab");
        assert_eq!(c.store.kind, StoreKind::S3);
        assert_eq!(c.store.s3_bucket.as_deref(), Some("from-file"));
        assert_eq!(c.store.s3_endpoint.as_deref(), Some("http://s3:8333"));
        assert_eq!(c.worker.batch_size, 16);
        assert_eq!(c.worker.device, "cuda");
        assert_eq!(c.api.keys_file, PathBuf::from("/etc/dig/keys"));
        assert_eq!(c.metrics.listen, "0.0.0.0:9100");
        // Untouched sections keep their defaults.
        assert_eq!(c.coordinator, CoordinatorSection::default());
    }

    #[test]
    fn errors_name_the_culprit() {
        let e = Config::from_sources(None, None, &vars(&[("DIG_WORKER_BACH_SIZE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DIG_WORKER_BACH_SIZE is not a setting")
                && e.contains("DIG_WORKER_BATCH_SIZE"),
            "{e}"
        );
        let e = Config::from_sources(None, None, &vars(&[("DIG_WORKER_BATCH_SIZE", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DIG_WORKER_BATCH_SIZE: expected a whole number"),
            "{e}"
        );
        let e = Config::from_sources(
            Some("[worker]\nbatch = 3\n"),
            Some(Path::new("x.toml")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("x.toml:") && e.contains("batch"), "{e}");
        let e = Config::from_sources(None, None, &vars(&[("DIG_STORE_KIND", "ftp")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
    }

    #[test]
    fn every_setting_has_a_variable() {
        let names: Vec<String> = Config::settings().into_iter().map(|(v, _, _)| v).collect();
        for expected in [
            "DIG_NAMESPACE",
            "DIG_QUEUE_URL",
            "DIG_PROGRESS_URL",
            "DIG_STORE_KIND",
            "DIG_STORE_S3_SECRET_ACCESS_KEY",
            "DIG_API_LISTEN",
            "DIG_API_MAX_JOBS_PER_TENANT",
            "DIG_API_WEBHOOK_SECRETS_FILE",
            "DIG_COORDINATOR_WINDOW_PER_JOB",
            "DIG_WORKER_HEARTBEAT_SECS",
            "DIG_WORKER_MAX_DEATHS",
            "DIG_WORKER_SHUTDOWN_GRACE_SECS",
            "DIG_METRICS_LISTEN",
            "DIG_WORKER_THREADS",
            "DIG_API_MAX_BATCH_ENTRIES",
            "DIG_COORDINATOR_TENANT_WINDOW",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing");
        }
        assert_eq!(names.len(), 1 + 1 + 1 + 8 + 16 + 3 + 10 + 1);
    }

    #[test]
    fn the_secret_is_not_logged() {
        let mut c = Config::default();
        c.store.s3_secret_access_key = Some("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
