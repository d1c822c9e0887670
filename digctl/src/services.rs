//! The services as `digctl` subcommands: `api`, `coordinator`, `worker`
//! (one process each, talking through RabbitMQ, Redis and the object store
//! named by the configuration) and `standalone` (all three in one process
//! with the in-process queue and progress store and a local directory as the
//! object store: the same code paths, no servers). `upload-model` puts a
//! model directory into the configured object store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_api::{ApiState, Deliverer, Limits, Tenants, WebhookSecrets, WebhookSettings};
use dig_common::config::Config;
use dig_common::layout::ObjectLayout;
use dig_common::progress::{MemoryProgress, ProgressStore, RedisProgress};
use dig_common::queue::{MemoryQueue, RabbitQueue, ShardQueue};
use dig_common::store::{open_store, FeatureStore, StoreKind};
use dig_coordinator::{Coordinator, CoordinatorSettings};
use dig_model::ModelConfig;
use dig_worker::consumer::{Worker, WorkerContext, WorkerSettings};
use object_store::ObjectStore;
use tokio::sync::watch;
use tracing::{info, warn};

/// `--config` of every service command.
#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file (TOML); `DIG_*` variables override it. Default: `DIG_CONFIG`, else built-in defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn load(&self) -> Result<Config> {
        Ok(Config::load(self.config.as_deref())?)
    }
}

#[derive(Args, Debug)]
pub struct StandaloneArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Address to listen on [default: the configuration's api.listen, 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<String>,
    /// Where jobs, results, models and caches are kept.
    #[arg(long, default_value = "dig-data")]
    pub data_dir: PathBuf,
    /// Tenants' API keys file [default: DATA_DIR/api-keys, created with one
    /// key for tenant `local` (saved in DATA_DIR/api-key) when missing].
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// A model directory (config.json + model.safetensors) to serve as the default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UploadModelArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Model directory (config.json + model.safetensors).
    pub dir: PathBuf,
    /// Model id jobs name it by (letters, digits, `-`, `_`, `.`).
    pub id: String,
}

/// The three backing services and what sits on them.
struct Backends {
    queue: Arc<dyn ShardQueue>,
    progress: Arc<dyn ProgressStore>,
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    features: Arc<FeatureStore>,
}

impl Backends {
    /// RabbitMQ, Redis and the configured object store.
    async fn distributed(cfg: &Config) -> Result<Backends> {
        let queue = RabbitQueue::connect(&cfg.queue.url, &cfg.namespace)
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {}", redact(&cfg.queue.url)))?;
        let progress = RedisProgress::connect(&cfg.progress.url, &cfg.namespace)
            .await
            .with_context(|| format!("cannot connect to Redis at {}", redact(&cfg.progress.url)))?;
        Self::with(cfg, Arc::new(queue), Arc::new(progress))
    }

    fn with(
        cfg: &Config,
        queue: Arc<dyn ShardQueue>,
        progress: Arc<dyn ProgressStore>,
    ) -> Result<Backends> {
        let store_cfg = cfg.store.to_store_config();
        let store = open_store(&store_cfg).context("cannot open the object store")?;
        let layout = store_cfg.layout();
        let features = FeatureStore::new(
            store.clone(),
            layout.clone(),
            cfg.api.max_feature_bytes,
            cfg.spool_dir(),
        )?;
        Ok(Backends {
            queue,
            progress,
            store,
            layout,
            features: Arc::new(features),
        })
    }

    fn api_state(
        &self,
        cfg: &Config,
        tenants: Tenants,
        webhook_secrets: WebhookSecrets,
        shutdown: watch::Receiver<bool>,
    ) -> ApiState {
        ApiState {
            queue: self.queue.clone(),
            store: self.store.clone(),
            layout: self.layout.clone(),
            features: self.features.clone(),
            progress: self.progress.clone(),
            tenants,
            limits: Limits {
                max_num_samples: cfg.api.max_num_samples,
                max_shard_size: cfg.api.max_shard_size,
                request_timeout: Duration::from_secs(cfg.api.request_timeout_secs.max(1)),
                default_model: cfg.api.default_model.clone(),
                max_jobs_per_tenant: cfg.api.max_jobs_per_tenant,
                max_batch_entries: usize::try_from(cfg.api.max_batch_entries).unwrap_or(usize::MAX),
                allow_private_callbacks: cfg.api.webhook_allow_private,
                max_queued_samples_per_tenant: cfg.api.max_queued_samples_per_tenant,
                ..Limits::default()
            },
            webhook_secrets,
            shutdown,
            openapi: Default::default(),
        }
    }

    /// The webhook sender every API process runs (see `dig_api::webhooks`).
    fn deliverer(&self, cfg: &Config, secrets: WebhookSecrets) -> Result<Deliverer> {
        let settings = WebhookSettings {
            max_attempts: cfg.api.webhook_max_attempts.max(1),
            backoff: Duration::from_millis(cfg.api.webhook_backoff_ms.max(1)),
            timeout: Duration::from_secs(cfg.api.webhook_timeout_secs.max(1)),
            allow_private: cfg.api.webhook_allow_private,
            ..WebhookSettings::default()
        };
        Deliverer::new(self.progress.clone(), secrets, settings)
            .map(|d| d.with_batches(self.store.clone(), self.layout.clone()))
            .context("cannot set up the webhook client")
    }

    fn coordinator(&self, cfg: &Config) -> Coordinator {
        Coordinator::new(
            self.queue.clone(),
            self.store.clone(),
            self.layout.clone(),
            self.progress.clone(),
            CoordinatorSettings {
                window_per_job: cfg.coordinator.window_per_job,
                poll_interval: Duration::from_millis(cfg.coordinator.poll_interval_ms.max(10)),
                tenant_window: cfg.coordinator.tenant_window,
            },
        )
    }

    fn worker(&self, cfg: &Config) -> Result<Worker> {
        let device = crate::device::parse_device(&cfg.worker.device)?;
        if cfg.worker.batch_size == 0 {
            bail!("worker.batch_size must be at least 1");
        }
        Ok(Worker::new(
            WorkerContext {
                queue: self.queue.clone(),
                store: self.store.clone(),
                layout: self.layout.clone(),
                features: self.features.clone(),
                progress: self.progress.clone(),
            },
            WorkerSettings {
                id: cfg.worker_id(),
                device,
                batch_size: cfg.worker.batch_size,
                pair_cache_bytes: cfg.worker.pair_cache_mb.saturating_mul(1 << 20),
                cache_dir: cfg.worker.cache_dir.clone(),
                max_attempts: cfg.worker.max_attempts.max(1),
                max_deaths: cfg.worker.max_deaths.max(1),
                heartbeat_secs: cfg.worker.heartbeat_secs,
                shutdown_grace: Duration::from_secs(cfg.worker.shutdown_grace_secs),
                ..WorkerSettings::default()
            },
        ))
    }
}

/// Applies `worker.threads` (0: libtorch's default).
fn set_threads(cfg: &Config) {
    if cfg.worker.threads > 0 {
        let n = i32::try_from(cfg.worker.threads).unwrap_or(i32::MAX);
        tch::set_num_threads(n);
        info!(threads = n, "libtorch threads set (worker.threads)");
    }
}

/// A URL with its password (if any) replaced, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A watch that turns true on Ctrl-C or SIGTERM.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

async fn serve_api(state: ApiState, listen: &str, stop: watch::Receiver<bool>) -> Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("api.listen: {listen:?} is not an address like 127.0.0.1:8080"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    info!("API listening on http://{}", listener.local_addr()?);
    // One registry per process: standalone's coordinator and worker metrics too.
    let header_timeout = state.limits.request_timeout;
    let app = dig_api::router(state).merge(crate::metrics_http::routes());
    serve_http(listener, app, header_timeout, stop).await;
    Ok(())
}

/// Serves `app` on `listener` until `stop`, as `axum::serve` with graceful
/// shutdown does, plus a deadline for each request's headers: hyper's
/// `header_read_timeout`, which needs a timer that `axum::serve` does not
/// give it. A client that trickles its headers (slowloris) or leaves a
/// kept-alive connection idle is disconnected after `header_timeout`; the
/// router's request timeout bounds the rest of a request.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off, do not spin.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// How often the coordinator reads the cluster-wide figures of its metrics
/// (jobs by state, queue depth, live workers) from Redis and the broker.
const METRICS_REFRESH: Duration = Duration::from_secs(5);

/// Binds `metrics.listen` (unless empty) and serves `/metrics` there in the
/// background until `stop`: the coordinator's and the worker's exporter.
async fn serve_metrics(cfg: &Config, stop: watch::Receiver<bool>) -> Result<()> {
    if let Some(listener) = crate::metrics_http::bind(&cfg.metrics.listen).await? {
        tokio::spawn(async move {
            if let Err(e) = crate::metrics_http::serve(listener, stop).await {
                warn!(error = %e, "the metrics listener failed");
            }
        });
    }
    Ok(())
}

/// The webhook secrets of `api.webhook_secrets_file`; none when unset.
fn load_webhook_secrets(cfg: &Config) -> Result<WebhookSecrets> {
    let path = &cfg.api.webhook_secrets_file;
    if path.as_os_str().is_empty() {
        return Ok(WebhookSecrets::default());
    }
    WebhookSecrets::from_file(path).with_context(|| {
        format!(
            "cannot read the webhook secrets file {} (api.webhook_secrets_file: `TENANT SECRET` lines)",
            path.display()
        )
    })
}

fn load_tenants(path: &Path) -> Result<Tenants> {
    let tenants = Tenants::from_file(path).with_context(|| {
        format!(
            "cannot read the API keys file {} (create keys with `digctl api-key new TENANT`)",
            path.display()
        )
    })?;
    if tenants.is_empty() {
        warn!(
            "{} has no keys: every request will be refused",
            path.display()
        );
    }
    Ok(tenants)
}

pub fn api(args: ConfigArg) -> Result<()> {
    let cfg = args.load()?;
    let tenants = load_tenants(&cfg.api.keys_file)?;
    let secrets = load_webhook_secrets(&cfg)?;
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        let backends = Backends::distributed(&cfg).await?;
        let deliverer = backends.deliverer(&cfg, secrets.clone())?;
        let state = backends.api_state(&cfg, tenants, secrets, stop.clone());
        let hooks_stop = stop.clone();
        let hooks = tokio::spawn(async move { deliverer.run(hooks_stop).await });
        let served = serve_api(state, &cfg.api.listen, stop).await;
        if served.is_err() {
            // No shutdown signal will come to stop it.
            hooks.abort();
        }
        // After a signal it stops by itself, once an attempt under way ends.
        let _ = hooks.await;
        served
    })
}

pub fn coordinator(args: ConfigArg) -> Result<()> {
    let cfg = args.load()?;
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        serve_metrics(&cfg, stop.clone()).await?;
        let backends = Backends::distributed(&cfg).await?;
        let coordinator = backends.coordinator(&cfg);
        let cluster = coordinator.cluster_metrics();
        let cluster_stop = stop.clone();
        tokio::spawn(async move { cluster.run(METRICS_REFRESH, cluster_stop).await });
        resume(&coordinator, backends.progress.as_ref()).await?;
        coordinator.run(stop).await;
        Ok(())
    })
}

/// Picks up the jobs a previous coordinator was driving. First makes the
/// progress store agree with the object store, so that jobs Redis lost (a
/// flush, a restore from an old snapshot) are rebuilt and resumed too.
async fn resume(coordinator: &Coordinator, progress: &dyn ProgressStore) -> Result<()> {
    match coordinator.reconcile().await {
        Ok(outcomes) => {
            let mut changed = 0;
            for (job, outcome) in &outcomes {
                match outcome {
                    Ok(r) if r.action != dig_coordinator::Action::None => changed += 1,
                    Ok(_) => {}
                    Err(e) => warn!(%job, error = %e, "cannot reconcile job"),
                }
            }
            info!(
                jobs = outcomes.len(),
                changed, "progress store reconciled with the object store"
            );
        }
        // Not fatal: the jobs Redis still knows can run meanwhile.
        Err(e) => warn!(error = %e, "cannot list the jobs in the object store; not reconciled"),
    }
    let jobs = progress
        .unfinished_jobs()
        .await
        .context("cannot list unfinished jobs")?;
    if !jobs.is_empty() {
        info!(jobs = jobs.len(), "resuming unfinished jobs");
    }
    // A job that cannot be resumed (its spec is gone) is logged and skipped.
    let _ = coordinator.resume(&jobs).await;
    Ok(())
}

/// A worker until SIGTERM (or Ctrl-C): then it takes no more shards, lets the
/// shard in progress finish for `worker.shutdown_grace_secs`, stops it past
/// that at its next batch and requeues it, and exits 0. A second signal
/// exits at once (the broker requeues the shard; its attempt stays counted).
pub fn worker(args: ConfigArg) -> Result<()> {
    let cfg = args.load()?;
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        serve_metrics(&cfg, stop.clone()).await?;
        let backends = Backends::distributed(&cfg).await?;
        let worker = backends.worker(&cfg)?;
        set_threads(&cfg);
        info!(
            id = %cfg.worker_id(),
            device = %cfg.worker.device,
            batch = cfg.worker.batch_size,
            shutdown_grace_secs = cfg.worker.shutdown_grace_secs,
            "worker started"
        );
        tokio::spawn(exit_on_second_signal(stop.clone()));
        worker.run(stop).await?;
        info!(id = %cfg.worker_id(), "worker exited cleanly");
        Ok(())
    })
}

/// Once `stop` is true, exits the process on the next SIGTERM or Ctrl-C.
async fn exit_on_second_signal(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        return;
    }
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    warn!("second signal: exiting now; the shard in progress goes back to the queue");
    std::process::exit(130);
}

pub fn standalone(args: StandaloneArgs) -> Result<()> {
    let mut cfg = args.config.load()?;
    let data = &args.data_dir;
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    cfg.store.kind = StoreKind::Local;
    cfg.store.local_dir = data.join("store");
    cfg.worker.cache_dir = data.join("cache");
    if cfg.api.spool_dir.as_os_str().is_empty() {
        cfg.api.spool_dir = data.join("uploads");
    }
    if let Some(listen) = &args.listen {
        cfg.api.listen = listen.clone();
    }
    let keys_file = match &args.api_keys {
        Some(f) => f.clone(),
        None => default_keys(data)?,
    };
    let tenants = load_tenants(&keys_file)?;
    let secrets = load_webhook_secrets(&cfg)?;
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        let backends = Backends::with(
            &cfg,
            Arc::new(MemoryQueue::new()),
            Arc::new(MemoryProgress::new()),
        )?;
        if let Some(dir) = &args.model {
            upload_model(
                &backends.store,
                &backends.layout,
                dir,
                &cfg.api.default_model,
            )
            .await?;
        }
        let coordinator = backends.coordinator(&cfg);
        let worker = backends.worker(&cfg)?;
        set_threads(&cfg);
        info!(
            data = %data.display(),
            keys = %keys_file.display(),
            "standalone: API, coordinator and worker in one process (in-process queue and progress, local store)"
        );
        let deliverer = backends.deliverer(&cfg, secrets.clone())?;
        let state = backends.api_state(&cfg, tenants, secrets, stop.clone());
        let api = serve_api(state, &cfg.api.listen, stop.clone());
        let coord = coordinator.run(stop.clone());
        let cluster = coordinator.cluster_metrics();
        let cluster = cluster.run(METRICS_REFRESH, stop.clone());
        let work = worker.run(stop.clone());
        let hooks = deliverer.run(stop.clone());
        let (api, (), work, (), ()) = tokio::join!(api, coord, work, hooks, cluster);
        api?;
        work?;
        Ok(())
    })
}

/// DATA/api-keys, created with a key for tenant `local` when missing.
fn default_keys(data: &Path) -> Result<PathBuf> {
    let keys = data.join("api-keys");
    if !keys.exists() {
        let (key, sha) = dig_api::new_api_key();
        let key_file = data.join("api-key");
        write_private(&key_file, &format!("{key}\n"))?;
        std::fs::write(&keys, format!("# TENANT SHA256_OF_KEY\nlocal {sha}\n"))?;
        eprintln!(
            "created an API key for tenant 'local' in {} (use it as DIG_API_KEY)",
            key_file.display()
        );
    }
    Ok(keys)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn upload_model_cmd(args: UploadModelArgs) -> Result<()> {
    let cfg = args.config.load()?;
    let store_cfg = cfg.store.to_store_config();
    let store = open_store(&store_cfg).context("cannot open the object store")?;
    runtime()?.block_on(upload_model(
        &store,
        &store_cfg.layout(),
        &args.dir,
        &args.id,
    ))
}

/// Checks `dir` is a loadable model directory, then uploads the weights and
/// then config.json: workers take a model whose config.json exists as complete.
async fn upload_model(
    store: &Arc<dyn ObjectStore>,
    layout: &ObjectLayout,
    dir: &Path,
    id: &str,
) -> Result<()> {
    let valid_id = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid_id {
        bail!("invalid model id {id:?}: use letters, digits, '-', '_' and '.' (not first)");
    }
    let config = dir.join("config.json");
    ModelConfig::load(&config)
        .with_context(|| format!("{} is not a model directory", dir.display()))?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        bail!(
            "{} is not a model directory: model.safetensors is missing",
            dir.display()
        );
    }
    for (file, name) in [(&weights, "model.safetensors"), (&config, "config.json")] {
        let path = layout.model_file(id, name);
        let mut reader = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let mut writer = object_store::buffered::BufWriter::new(store.clone(), path.clone());
        tokio::io::copy(&mut reader, &mut writer)
            .await
            .with_context(|| format!("cannot upload {} to {path}", file.display()))?;
        tokio::io::AsyncWriteExt::shutdown(&mut writer)
            .await
            .with_context(|| format!("cannot upload {} to {path}", file.display()))?;
    }
    info!(model = id, "model uploaded");
    eprintln!("uploaded model {id} from {}", dir.display());
    Ok(())
}
