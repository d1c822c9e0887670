//! The axum REST API of dig-cluster: feature uploads, job submission,
//! progress and results.
//!
//! Routes (`/v1` ones need `Authorization: Bearer KEY` of a tenant,
//! [`Tenants`]; a tenant sees only its own features and jobs):
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | liveness: `ok` |
//! | `GET /readyz` | readiness: broker, progress store and object store each answer within [`Limits::ready_timeout`]; 503 naming the failing check otherwise |
//! | `GET /openapi.json` | the OpenAPI 3 document of these routes (generated with utoipa, [`openapi`]) |
//! | `POST /v1/features` | upload a features npz (streamed, validated, content-addressed) |
//! | `POST /v1/structures` | upload a PDB of structures that partial-diffusion jobs (`from_structure`) start from ([`structures`]) |
//! | `GET /v1/models` | the models in the object store, with their config and weight size |
//! | `POST /v1/jobs` | submit a job (`Idempotency-Key` honoured; optional `callback_url`, [`webhooks`]); 429 past the tenant's limits |
//! | `GET /v1/jobs` | the tenant's jobs, newest first, paged by `cursor` |
//! | `GET /v1/jobs/{id}` | one job: state, counters, `samples_per_sec`, `eta_seconds`, `webhook` |
//! | `GET /v1/jobs/{id}/events` | the job's progress as Server-Sent Events until it is final ([`events`](crate::events)) |
//! | `POST /v1/jobs/{id}/cancel` | cancel a job that is not final (409 if it is) |
//! | `GET /v1/jobs/{id}/results` | the manifest: every shard of a succeeded job (`"complete": true`), or the finished shards of a failed or cancelled one (`"complete": false`) |
//! | `GET /v1/jobs/{id}/results.pdb` | the whole ensemble of a succeeded job as one multi-model PDB, streamed shard by shard |
//! | `GET /v1/jobs/{id}/results.xtc` | the whole ensemble of a succeeded job as an XTC trajectory (N, CA, C, O), streamed shard by shard |
//! | `GET /v1/jobs/{id}/topology.pdb` | the topology of `results.xtc` (its atoms, at the first sample's coordinates) |
//! | `GET /v1/jobs/{id}/results/{shard}` | one finished shard: npz (default), or `?format=pdb` / `{shard}.pdb` as PDB |
//!
//! Errors are JSON: `{"error": {"code": "...", "message": "..."}}`, the
//! message written for a person.
//!
//! Feature ownership: the feature file itself is content-addressed and
//! shared (`features/{sha}.npz`); a tenant owns features it uploaded, which
//! is recorded by a small JSON marker `{"length": L}` at
//! `{prefix}tenants/{tenant}/features/{sha}.json` (see `ObjectLayout::tenant_features`).
//!
//! Submission order: spec object, progress entry, then the job id on the
//! jobs queue (the coordinator expects the first two before the third). If a
//! later step fails, the earlier ones are undone (progress entry and spec
//! deleted, the Idempotency-Key released), so a failed submission leaves
//! nothing behind and can be retried with the same key.
//!
//! Per-tenant limits ([`Limits::max_jobs_per_tenant`],
//! [`Limits::max_queued_samples_per_tenant`]): a submission that would give
//! the tenant more unfinished jobs, or more samples waiting (`num_samples -
//! samples_done` summed over its unfinished jobs), is refused with 429
//! `limit_exceeded` and leaves nothing behind. The check is atomic with the
//! creation of the progress entry (one Redis script), so concurrent
//! submissions cannot overshoot; it visits the tenant's unfinished jobs, at
//! most the job cap of them.
//!
//! PDB output (see [`pdb`]): a sample is `MODEL` (global sample index + 1),
//! so at most 9999 samples and 9999 residues fit; beyond that the PDB routes
//! answer 422 and the npz is the way.

mod batches;
mod error;
pub mod events;
mod metrics;
mod models;
mod openapi;
pub mod pdb;
mod ready;
mod results;
pub mod structures;
mod tenants;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dig_common::job::{
    default_shard_size, FilterCriteria, JobId, JobSpec, JobState, Priority, SampleFilter, Solver,
};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{
    JobProgress, LimitExceeded, ProgressStore, TenantCaps, WebhookState, WebhookStatus,
};
use dig_common::queue::ShardQueue;
use dig_common::store::{check_sha256, FeatureStore, AMINO_ACIDS};
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};

pub use error::ApiError;
pub use openapi::openapi;
pub use tenants::{is_valid_tenant, new_api_key, Tenants, TenantsError};
pub use webhooks::{Deliverer, WebhookSecrets, WebhookSettings};

use openapi::{
    BinarySchema, ErrorBody, FeatureRefSchema, JobStateSchema, PrioritySchema, WebhookStateSchema,
};

/// Request limits and defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_num_samples: u64,
    pub max_steps: i64,
    pub max_shard_size: u64,
    /// Model used when a job names none.
    pub default_model: String,
    /// Steps used to size shards when a job gives none.
    pub default_steps: u64,
    pub default_page: usize,
    pub max_page: usize,
    /// How long each `/readyz` check may take before it counts as failed.
    pub ready_timeout: Duration,
    /// Longest a request may take until its response starts (408 past it);
    /// feature uploads are exempt.
    pub request_timeout: Duration,
    /// Most unfinished (queued or running) jobs of one tenant.
    pub max_jobs_per_tenant: u64,
    /// Most samples one tenant may have waiting: `num_samples -
    /// samples_done` summed over its unfinished jobs, the new one included.
    pub max_queued_samples_per_tenant: u64,
    /// Most entries in one batch.
    pub max_batch_entries: usize,
    /// Whether callback URLs may name loopback, private or link-local
    /// addresses (`api.webhook_allow_private`).
    pub allow_private_callbacks: bool,
    /// How often an event stream reads its job.
    pub events_poll: Duration,
    /// Longest silence on an event stream before a keep-alive comment.
    pub events_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_num_samples: 1_000_000,
            max_steps: 500,
            max_shard_size: 100_000,
            default_model: "dig-protein".into(),
            default_steps: 500,
            default_page: 50,
            max_page: 500,
            ready_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            max_jobs_per_tenant: 20_000,
            max_queued_samples_per_tenant: 10_000_000,
            max_batch_entries: 10_000,
            allow_private_callbacks: false,
            events_poll: Duration::from_millis(500),
            events_keep_alive: Duration::from_secs(15),
        }
    }
}

/// Everything the handlers share.
pub struct ApiState {
    pub queue: Arc<dyn ShardQueue>,
    pub store: Arc<dyn ObjectStore>,
    pub layout: ObjectLayout,
    pub features: Arc<FeatureStore>,
    pub progress: Arc<dyn ProgressStore>,
    pub tenants: Tenants,
    pub limits: Limits,
    /// Tenants' webhook signing secrets: a tenant without one cannot give
    /// a `callback_url`.
    pub webhook_secrets: WebhookSecrets,
    /// Turns true when the server shuts down: open event streams end then
    /// (a graceful shutdown waits for every open response). A receiver
    /// whose sender is gone never ends them.
    pub shutdown: watch::Receiver<bool>,
    /// `/openapi.json`, made once from the limits.
    pub openapi: std::sync::OnceLock<axum::body::Bytes>,
}

impl Limits {
    fn tenant_caps(&self) -> TenantCaps {
        TenantCaps {
            max_jobs: self.max_jobs_per_tenant,
            max_queued_samples: self.max_queued_samples_per_tenant,
        }
    }
}

type Shared = Arc<ApiState>;
type ApiResult<T> = Result<T, ApiError>;

/// The service's routes. Every route here is in the OpenAPI document
/// ([`openapi`]); add new ones to both.
pub fn router(state: ApiState) -> Router {
    let timeout = state.limits.request_timeout;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready::readyz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route(
            "/v1/features",
            post(upload_features).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/structures",
            post(structures::upload_structures)
                .layer(DefaultBodyLimit::max(structures::MAX_STRUCTURE_BYTES)),
        )
        .route("/v1/models", get(models::list_models))
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route(
            "/v1/batches",
            post(batches::submit_batch).layer(DefaultBodyLimit::max(batches::MAX_BODY_BYTES)),
        )
        .route("/v1/batches/{id}", get(batches::get_batch))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/results", get(results::get_results))
        .route("/v1/jobs/{id}/results.pdb", get(results::get_results_pdb))
        .route("/v1/jobs/{id}/results.xtc", get(results::get_results_xtc))
        .route("/v1/jobs/{id}/topology.pdb", get(results::get_topology_pdb))
        .route("/v1/jobs/{id}/results/{shard}", get(results::get_shard))
        // A stalled or trickling client cannot hold a request open.
        .layer(axum::middleware::from_fn(move |req, next| {
            within(timeout, req, next)
        }))
        // Request counts and latencies by route template (`metrics.rs`).
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(Arc::new(state))
}

/// Runs the request with a deadline on its response's start: 408 past it.
/// Uploads (`POST /v1/features`, up to gigabytes) are exempt.
async fn within(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path() == "/v1/features" {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request took longer than {} s (api.request_timeout_secs); send it whole",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain", example = "ok"))
)]
async fn healthz() -> &'static str {
    "ok"
}

#[derive(Serialize, Deserialize)]
struct FeatureMarker {
    length: u64,
}

// ---------------------------------------------------------------- auth

/// `Query` whose rejection (a malformed or repeated parameter) is a JSON
/// 400 `invalid_request` like every other error, not axum's plain text.
pub(crate) struct JsonQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for JsonQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| JsonQuery(q))
            .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))
    }
}

/// The authenticated tenant of a request.
pub struct Tenant(pub String);

impl FromRequestParts<Shared> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> ApiResult<Self> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        state
            .tenants
            .authenticate(key)
            .map(|t| Tenant(t.to_string()))
            .ok_or_else(ApiError::unauthorized)
    }
}

// ---------------------------------------------------------------- features

/// Uploads protein features (an npz with `single`, `pair` and `sequence`).
#[utoipa::path(
    post,
    path = "/v1/features",
    tag = "features",
    request_body(content = inline(BinarySchema), content_type = "application/octet-stream", description = "The features npz"),
    responses(
        (status = 201, description = "Stored (new for this tenant)", body = FeatureRefSchema),
        (status = 200, description = "This tenant had uploaded the same bytes before", body = FeatureRefSchema),
        (status = 400, description = "Not valid features; the message says why", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn upload_features(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let max = st.features.max_bytes();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("features exceed the limit of {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let stream = Box::pin(body.into_data_stream());
    let fref = match st.features.put_stream(stream).await {
        Ok(f) => f,
        Err(dig_common::CommonError::Invalid(m)) if m.starts_with("features exceed the limit") => {
            return Err(too_large())
        }
        Err(e) => return Err(e.into()),
    };
    let marker = st.layout.tenant_features(&tenant, &fref.sha256);
    let payload = serde_json::to_vec(&FeatureMarker {
        length: fref.length,
    })
    .map_err(ApiError::internal)?;
    let status = match st
        .store
        .put_opts(&marker, PutPayload::from(payload), PutMode::Create.into())
        .await
    {
        Ok(_) => StatusCode::CREATED,
        Err(object_store::Error::AlreadyExists { .. }) => StatusCode::OK,
        Err(e) => return Err(ApiError::store(e)),
    };
    Ok((status, Json(fref)).into_response())
}

/// The length of features `sha` that `tenant` uploaded; 404 otherwise.
async fn owned_features(st: &ApiState, tenant: &str, sha: &str) -> ApiResult<u64> {
    check_sha256(sha).map_err(|e| ApiError::invalid(format!("features_sha256: {e}")))?;
    let path = st.layout.tenant_features(tenant, sha);
    let bytes = match st.store.get(&path).await {
        Ok(r) => r.bytes().await.map_err(ApiError::store)?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "features_not_found",
                format!("features {sha} not found; upload them with POST /v1/features"),
            ))
        }
        Err(e) => return Err(ApiError::store(e)),
    };
    let marker: FeatureMarker = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
    Ok(marker.length)
}

// ---------------------------------------------------------------- jobs

/// A job request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitJob {
    /// A name for people, at most 200 characters.
    #[schema(max_length = 200)]
    name: Option<String>,
    /// One-letter amino-acid codes (`ACDEFGHIKLMNPQRSTVWYX`), as long as the features.
    #[schema(
        min_length = 1,
        pattern = "^[ACDEFGHIKLMNPQRSTVWYX]+$",
        example = "MKTAYIAKQRQISFVKSHFSRQLE"
    )]
    sequence: String,
    /// The features, uploaded by this tenant with `POST /v1/features`: the
    /// SHA-256 it answered, 64 lowercase hex digits.
    #[schema(min_length = 64, max_length = 64, pattern = "^[0-9a-f]{64}$")]
    features_sha256: String,
    /// How many samples to draw (at most `api.max_num_samples`).
    #[schema(minimum = 1)]
    num_samples: u64,
    /// The RNG seed; random when absent.
    #[schema(minimum = 0)]
    seed: Option<u64>,
    /// Sampler steps, at most the model's `n_time_step`; the model's own
    /// number when absent.
    #[schema(minimum = 1)]
    steps: Option<i64>,
    /// How the sampler integrates: `euler` (the published update, the
    /// default), `exp`, `heun` or `ab2` (see the README's fidelity table),
    /// or `flow` (the probability-flow ODE, docs/density.md).
    #[schema(value_type = Option<openapi::SolverSchema>)]
    solver: Option<Solver>,
    /// `physical`: return exactly `num_samples` physically valid samples,
    /// drawing sample indices past `num_samples` to replace invalid ones.
    #[schema(value_type = Option<openapi::FilterSchema>)]
    filter: Option<FilterCriteria>,
    /// With `filter`: draw at most this many times `num_samples` (1 to 10,
    /// default 3); past it the job fails, its valid samples fetchable.
    #[schema(minimum = 1, maximum = 10)]
    max_draw_factor: Option<u64>,
    /// Steered sampling by sequential Monte Carlo (README, "Steering"):
    /// `particles` (1-64, default 4), `ess_threshold` ((0, 1], 0.5),
    /// `window` ([t_start, t_end], [0.9, 0.1]), `noise` ((0, 2], 1) and
    /// `potentials` (each with `type` chain_break, clash, rmsd, rg, distance
    /// or q, a flat-bottom form and, for rmsd and q, `reference_ca`: the
    /// reference's CA coordinates, one [x, y, z] per residue). Needs solver
    /// euler. Each sample's `steer_energy` and `steer_log_z` go into the
    /// shards' npz.
    #[schema(schema_with = openapi::steering_schema)]
    steering: Option<serde_json::Value>,
    /// Also each returned sample's log-density under the model
    /// (probability-flow ODE, 50 Heun steps, Hutchinson's estimator with 4
    /// probes: `digctl sample --log-density`): `log_density` and
    /// `log_density_std_error` (float64) in every shard's npz. About
    /// 100 forward passes and 400 vector-Jacobian products more per sample.
    log_density: Option<bool>,
    /// Follow the probability-flow ODE (half the published drift) above
    /// this diffusion time and `solver`'s update at and below it
    /// (`digctl sample --flow-above`; examples/adk/README.md). In [0, 1];
    /// not with solver `flow`, `steering` or `log_density`.
    #[schema(minimum = 0.0, maximum = 1.0)]
    flow_above: Option<f64>,
    /// Partial diffusion (docs/density.md): start every sample from these
    /// structures, uploaded by this tenant with `POST /v1/structures` (the
    /// SHA-256 it answered; sample `i` from structure `i mod M`), noised by
    /// the forward process to `from_time`, which it needs. Not with
    /// `steering`.
    #[schema(min_length = 64, max_length = 64, pattern = "^[0-9a-f]{64}$")]
    from_structure: Option<String>,
    /// With `from_structure`: the diffusion time in (0, 1] to start from
    /// (snapped down to the schedule's grid): small times relax or repair
    /// the input, larger ones explore around it; 1 is sampling from the prior.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    from_time: Option<f64>,
    /// A model listed by `GET /v1/models`; the service's default when absent.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]*$"
    )]
    model: Option<String>,
    #[schema(value_type = Option<PrioritySchema>)]
    pub(crate) priority: Option<Priority>,
    /// Samples per shard; sized from the protein and the steps when absent.
    #[schema(minimum = 1)]
    shard_size: Option<u64>,
    /// An http(s) URL that gets one signed `POST` of the job view when the
    /// job is final (headers `X-Dig-Event`, `X-Dig-Delivery`,
    /// `X-Dig-Signature: sha256=HMAC`); needs a webhook secret configured
    /// for the tenant. Delivered at least once: deduplicate by `X-Dig-Delivery`.
    #[schema(
        max_length = 2048,
        pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\s]+",
        example = "https://lab.example.org/hooks/dig"
    )]
    callback_url: Option<String>,
}

fn is_valid_model_name(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 128
        && !m.starts_with('.')
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Where to find a job and its results.
#[derive(Serialize, ToSchema)]
pub(crate) struct JobLinks {
    #[serde(rename = "self")]
    #[schema(rename = "self")]
    this: String,
    results: String,
}

pub(crate) fn links(id: JobId) -> JobLinks {
    JobLinks {
        this: format!("/v1/jobs/{id}"),
        results: format!("/v1/jobs/{id}/results"),
    }
}

/// How a job samples (from its spec).
#[derive(Serialize, ToSchema)]
struct SamplingView {
    #[schema(value_type = String, example = "euler")]
    solver: Solver,
    /// Sampler steps (null for a job submitted before steps were resolved).
    steps: Option<u64>,
    /// Network calls per sample.
    network_calls_per_sample: Option<u64>,
    /// `physical` when the job keeps valid samples only.
    #[schema(value_type = Option<String>, example = "physical")]
    filter: Option<FilterCriteria>,
    max_draw_factor: Option<u64>,
    /// The job's steering with every default filled in (absent: the
    /// deterministic sampler); network_calls_per_sample counts its particles.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    steering: Option<serde_json::Value>,
    /// Each returned sample's log-density is in the shards' npz.
    log_density: bool,
    /// Partial diffusion: the uploaded structures (`sha256`, `structures`)
    /// and the requested `from_time`; absent for sampling from the prior.
    /// network_calls_per_sample counts the steps run.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    from_structure: Option<dig_common::job::FromStructure>,
    /// The probability-flow ODE above this diffusion time, the solver's
    /// update below; absent: the solver's ODE throughout.
    #[serde(skip_serializing_if = "Option::is_none")]
    flow_above: Option<f64>,
}

#[derive(Serialize, ToSchema)]
struct ShardCounts {
    done: u64,
    failed: u64,
    total: u64,
}

/// A job's webhook as clients see it.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookView {
    url: String,
    #[schema(value_type = WebhookStateSchema)]
    state: WebhookState,
    /// Attempts started so far.
    attempts: u32,
    /// Why the latest failed attempt failed.
    last_error: Option<String>,
}

impl From<WebhookStatus> for WebhookView {
    fn from(w: WebhookStatus) -> Self {
        WebhookView {
            url: w.url,
            state: w.state,
            attempts: w.attempts,
            last_error: w.last_error,
        }
    }
}

/// A job as clients see it.
#[derive(Serialize, ToSchema)]
pub(crate) struct JobView {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    #[schema(value_type = JobStateSchema)]
    state: JobState,
    num_samples: u64,
    /// Samples drawn so far (with a filter, may pass `num_samples`).
    samples_done: u64,
    /// Physically valid samples among `samples_done` (null when unknown).
    samples_valid: Option<u64>,
    sampling: SamplingView,
    /// Shards done and failed; `total` is every shard the job may have (with
    /// a filter, up to the draw limit; most are drawn only if needed).
    shards: ShardCounts,
    /// The first failure, e.g. `"shard 3: reason"`.
    error: Option<String>,
    /// Unix seconds.
    created_at: u64,
    /// Unix seconds of the switch to running.
    started_at: Option<u64>,
    /// Unix seconds of the switch to a final state.
    finished_at: Option<u64>,
    /// `samples_done` over the seconds since `started_at` (until
    /// `finished_at` once final); null before the start or when no whole
    /// second has passed.
    samples_per_sec: Option<f64>,
    /// Remaining samples over `samples_per_sec`, rounded up; 0 once final,
    /// null while the rate is unknown or zero.
    eta_seconds: Option<u64>,
    links: JobLinks,
    /// The webhook of a job submitted with a `callback_url`; absent otherwise
    /// (and in the webhook's own body).
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<WebhookView>,
}

/// The answer to an accepted submission.
#[derive(Serialize, ToSchema)]
struct SubmittedJob {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    #[schema(value_type = JobStateSchema)]
    state: JobState,
    links: JobLinks,
}

/// A page of jobs.
#[derive(Serialize, ToSchema)]
struct JobList {
    jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(value_type = Option<String>, format = Uuid)]
    next_cursor: Option<JobId>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `(samples_per_sec, eta_seconds)` of a job at Unix second `now`.
fn throughput(p: &JobProgress, now: u64) -> (Option<f64>, Option<u64>) {
    let end = if p.state.is_final() {
        p.finished_at
    } else {
        Some(now)
    };
    let rate = match (p.started_at, end) {
        (Some(start), Some(end)) if end > start => {
            Some(p.samples_done as f64 / (end - start) as f64)
        }
        _ => None,
    };
    let eta = if p.state.is_final() {
        Some(0)
    } else {
        rate.filter(|r| *r > 0.0).map(|r| {
            let remaining = p.num_samples.saturating_sub(p.samples_done);
            (remaining as f64 / r).ceil() as u64
        })
    };
    (rate, eta)
}

/// The view of a job without its webhook (what a webhook sends).
pub(crate) fn job_view(id: JobId, p: &JobProgress) -> JobView {
    let (samples_per_sec, eta_seconds) = throughput(p, now_secs());
    JobView {
        id,
        state: p.state,
        num_samples: p.num_samples,
        samples_done: p.samples_done,
        samples_valid: p.samples_valid,
        sampling: SamplingView {
            solver: p.solver,
            steps: p.steps,
            network_calls_per_sample: p.steps.map(|s| {
                dig_common::job::network_calls(
                    p.solver,
                    s,
                    p.steering.as_ref(),
                    p.from_structure.as_ref(),
                )
            }),
            filter: p.filter.map(|f| f.criteria),
            max_draw_factor: p.filter.map(|f| f.max_draw_factor),
            steering: p.steering.clone(),
            log_density: p.log_density,
            from_structure: p.from_structure.clone(),
            flow_above: p.flow_above,
        },
        shards: ShardCounts {
            done: p.shards_done,
            failed: p.shards_failed,
            total: p.num_shards,
        },
        error: p.error.clone(),
        created_at: p.created_at,
        started_at: p.started_at,
        finished_at: p.finished_at,
        samples_per_sec,
        eta_seconds,
        links: links(id),
        webhook: None,
    }
}

/// The view of a job with its webhook, as `GET /v1/jobs/{id}` answers.
pub(crate) async fn full_view(st: &ApiState, id: JobId, p: &JobProgress) -> ApiResult<JobView> {
    let mut view = job_view(id, p);
    view.webhook = st.progress.webhook(id).await?.map(WebhookView::from);
    Ok(view)
}

/// 429 for a submission past a tenant limit.
pub(crate) fn limit_error(tenant: &str, refused: LimitExceeded) -> ApiError {
    let message = match refused {
        LimitExceeded::Jobs { unfinished, limit } => {
            let jobs = if unfinished == 1 { "job" } else { "jobs" };
            format!("tenant {tenant} has {unfinished} unfinished {jobs}; the limit is {limit}")
        }
        LimitExceeded::Samples {
            queued,
            requested,
            limit,
        } => format!(
            "tenant {tenant} has {queued} samples queued; {requested} more would pass the limit of {limit}"
        ),
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
}

/// What [`validate`] looked up in the object store, kept so that the
/// entries of a batch that share features or a model cost one lookup.
#[derive(Default)]
pub(crate) struct Lookups {
    features: std::collections::HashMap<String, Result<u64, ApiError>>,
    /// A model's `n_time_step`, or why it cannot be used.
    models: std::collections::HashMap<String, Result<i64, ApiError>>,
}

fn copy_err(e: &ApiError) -> ApiError {
    ApiError::new(e.status, e.code, e.message.clone())
}

impl Lookups {
    async fn features(&mut self, st: &ApiState, tenant: &str, sha: &str) -> ApiResult<u64> {
        if let Some(r) = self.features.get(sha) {
            return r.as_ref().map(|l| *l).map_err(copy_err);
        }
        let r = owned_features(st, tenant, sha).await;
        // An internal error is not remembered: it may be passing.
        if r.as_ref().is_err_and(|e| e.status.is_server_error()) {
            return r;
        }
        let copy = r.as_ref().map(|l| *l).map_err(copy_err);
        self.features.insert(sha.to_string(), r);
        copy
    }

    /// What `tenant` uploaded as structures `sha` (not cached: batches
    /// rarely share them).
    async fn structures(
        &mut self,
        st: &ApiState,
        tenant: &str,
        sha: &str,
    ) -> ApiResult<structures::StructureMarker> {
        structures::owned_structures(st, tenant, sha).await
    }

    /// The model's `n_time_step` (from its `config.json`).
    async fn model(&mut self, st: &ApiState, model: &str) -> ApiResult<i64> {
        if let Some(r) = self.models.get(model) {
            return r.as_ref().copied().map_err(copy_err);
        }
        let r = match st
            .store
            .get(&st.layout.model_file(model, "config.json"))
            .await
        {
            Ok(object) => {
                let bytes = object.bytes().await.map_err(ApiError::store)?;
                match serde_json::from_slice::<dig_model::ModelConfig>(&bytes) {
                    Ok(cfg) => Ok(cfg.n_time_step),
                    Err(e) => Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "unknown_model",
                        format!("model: '{model}' has an unreadable config.json ({e})"),
                    )),
                }
            }
            Err(object_store::Error::NotFound { .. }) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_model",
                format!("model: unknown model '{model}'"),
            )),
            Err(e) => return Err(ApiError::store(e)),
        };
        let copy = r.as_ref().copied().map_err(copy_err);
        self.models.insert(model.to_string(), r);
        copy
    }
}

/// Checks a submission against the limits and the store; the spec to run.
pub(crate) async fn validate(
    st: &ApiState,
    tenant: &str,
    req: SubmitJob,
    lookups: &mut Lookups,
) -> ApiResult<JobSpec> {
    let lim = &st.limits;
    if let Some(name) = &req.name {
        if name.chars().count() > 200 {
            return Err(ApiError::invalid("name: at most 200 characters"));
        }
    }
    if req.sequence.is_empty() {
        return Err(ApiError::invalid("sequence: must not be empty"));
    }
    if let Some((i, c)) = req
        .sequence
        .chars()
        .enumerate()
        .find(|(_, c)| !AMINO_ACIDS.contains(*c))
    {
        return Err(ApiError::invalid(format!(
            "sequence: invalid letter '{c}' at position {}; allowed: {AMINO_ACIDS}",
            i + 1
        )));
    }
    if !(1..=lim.max_num_samples).contains(&req.num_samples) {
        return Err(ApiError::invalid(format!(
            "num_samples: must be between 1 and {}, got {}",
            lim.max_num_samples, req.num_samples
        )));
    }
    if let Some(s) = req.steps {
        if !(1..=lim.max_steps).contains(&s) {
            return Err(ApiError::invalid(format!(
                "steps: must be between 1 and {}, got {s}",
                lim.max_steps
            )));
        }
    }
    if let Some(s) = req.shard_size {
        if !(1..=lim.max_shard_size).contains(&s) {
            return Err(ApiError::invalid(format!(
                "shard_size: must be between 1 and {}, got {s}",
                lim.max_shard_size
            )));
        }
    }
    if let Some(url) = &req.callback_url {
        webhooks::check_callback_url(url, st.limits.allow_private_callbacks)
            .map_err(ApiError::invalid)?;
        if st.webhook_secrets.get(tenant).is_none() {
            return Err(ApiError::invalid(format!(
                "callback_url: no webhook secret is configured for tenant {tenant}, so its \
                 webhooks cannot be signed; ask the operator to add one (api.webhook_secrets_file)"
            )));
        }
    }
    let model = req.model.unwrap_or_else(|| lim.default_model.clone());
    if !is_valid_model_name(&model) {
        return Err(ApiError::invalid(format!("model: invalid name '{model}'")));
    }
    let length = lookups.features(st, tenant, &req.features_sha256).await?;
    let seq_len = req.sequence.chars().count() as u64;
    if seq_len != length {
        return Err(ApiError::invalid(format!(
            "sequence length {seq_len} does not match the features' length {length}"
        )));
    }
    let n_time_step = lookups.model(st, &model).await?;
    if let Some(s) = req.steps {
        if s > n_time_step {
            return Err(ApiError::invalid(format!(
                "steps: model '{model}' has {n_time_step} time steps; steps must be between 1 \
                 and {n_time_step}, got {s}"
            )));
        }
    }
    let filter = match (req.filter, req.max_draw_factor) {
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "max_draw_factor: only with filter (\"physical\")",
            ))
        }
        (None, None) => None,
        (Some(criteria), factor) => {
            let factor = factor.unwrap_or(SampleFilter::DEFAULT_MAX_DRAW_FACTOR);
            if !(1..=10).contains(&factor) {
                return Err(ApiError::invalid(format!(
                    "max_draw_factor: must be between 1 and 10, got {factor}"
                )));
            }
            Some(SampleFilter {
                criteria,
                max_draw_factor: factor,
            })
        }
    };
    let steering = match &req.steering {
        None => None,
        Some(v) => {
            let spec = dig_model::sampling::SteerSpec::from_value(v).map_err(|e| {
                ApiError::invalid(dig_model::sampling::steering::qualify("steering", &e))
            })?;
            let solver: dig_model::Solver = req
                .solver
                .unwrap_or_default()
                .as_str()
                .parse()
                .expect("every job solver is a model solver");
            spec.compile(length as usize, solver).map_err(|e| {
                ApiError::invalid(dig_model::sampling::steering::qualify("steering", &e))
            })?;
            Some(serde_json::to_value(&spec).expect("a steering spec serializes"))
        }
    };
    let from_structure = match (req.from_structure, req.from_time) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "from_time: needed with from_structure (a diffusion time in (0, 1])",
            ))
        }
        (None, Some(_)) => return Err(ApiError::invalid(
            "from_structure: needed with from_time (upload structures with POST /v1/structures)",
        )),
        (Some(sha), Some(t)) => {
            if !(t > 0.0 && t <= 1.0) {
                return Err(ApiError::invalid(format!(
                    "from_time: must be in (0, 1], got {t}"
                )));
            }
            if steering.is_some() {
                return Err(ApiError::invalid(
                    "from_structure: cannot be combined with steering (steered sampling starts \
                     from the prior)",
                ));
            }
            let marker = lookups.structures(st, tenant, &sha).await?;
            if marker.residues != length {
                return Err(ApiError::invalid(format!(
                    "from_structure: the structures have {} residues, the protein (its \
                     features) {length}",
                    marker.residues
                )));
            }
            Some(dig_common::job::FromStructure {
                sha256: sha,
                from_time: t,
                structures: marker.structures,
            })
        }
    };
    if let Some(t) = req.flow_above {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid(format!(
                "flow_above: must be a diffusion time in [0, 1], got {t}"
            )));
        }
        for (clash, set) in [
            (
                "solver flow (the probability flow at every step already)",
                req.solver == Some(Solver::Flow),
            ),
            ("steering", steering.is_some()),
            ("log_density", req.log_density == Some(true)),
        ] {
            if set {
                return Err(ApiError::invalid(format!(
                    "flow_above: cannot be combined with {clash}"
                )));
            }
        }
    }
    let steps = req.steps.unwrap_or(n_time_step);
    let steps_for_size = dig_common::job::network_calls(
        req.solver.unwrap_or_default(),
        steps as u64,
        steering.as_ref(),
        from_structure.as_ref(),
    );
    Ok(JobSpec {
        id: JobId::new(),
        tenant: tenant.to_string(),
        name: req.name,
        sequence: req.sequence,
        features_sha256: req.features_sha256,
        num_samples: req.num_samples,
        seed: req.seed.unwrap_or_else(rand::random),
        steps: Some(steps),
        model,
        priority: req.priority.unwrap_or_default(),
        shard_size: req
            .shard_size
            .unwrap_or_else(|| default_shard_size(length, steps_for_size)),
        created_at: now_secs(),
        callback_url: req.callback_url,
        solver: req.solver.unwrap_or_default(),
        filter,
        steering,
        log_density: req.log_density.unwrap_or(false),
        from_structure,
        flow_above: req.flow_above,
    })
}

/// Submits a job. With `Idempotency-Key`, a repeated request answers the
/// job of the first one (200) instead of creating another.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = SubmitJob,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1 to 255 visible ASCII characters; repeats of a request answer the first one's job")),
    responses(
        (status = 202, description = "Accepted and queued", body = SubmittedJob),
        (status = 200, description = "The job of an earlier request with the same Idempotency-Key", body = JobView),
        (status = 400, description = "Invalid request; the message names the field", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "Features not uploaded by this tenant", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key belongs to an unfinished or failed submission", body = ErrorBody),
        (status = 429, description = "The tenant's unfinished jobs or queued samples would pass its limit (code `limit_exceeded`); nothing was created", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn submit_job(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|r| ApiError::new(r.status(), "invalid_body", r.body_text()))?;
    let req: SubmitJob = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid job request: {e}")))?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(idempotency_key(v)?),
    };
    let spec = validate(&st, &tenant, req, &mut Lookups::default()).await?;
    let id = spec.id;
    if let Some(key) = &idem {
        let bound = st.progress.idempotent_job(&tenant, key, id).await?;
        if bound != id {
            return match st.progress.get(bound).await? {
                Some(p) if p.tenant == tenant => {
                    Ok((StatusCode::OK, Json(full_view(&st, bound, &p).await?)).into_response())
                }
                _ => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    "an earlier request with this Idempotency-Key is still in progress or failed; \
                     use a new key",
                )),
            };
        }
    }
    // A cheap early refusal; the check that counts is atomic with the creation.
    let caps = st.limits.tenant_caps();
    let early = async {
        let usage = st.progress.tenant_usage(&tenant).await?;
        match caps.check(usage, spec.num_samples) {
            Some(refused) => Err(limit_error(&tenant, refused)),
            None => Ok(()),
        }
    };
    let created = match early.await {
        Ok(()) => create_job(&st, &spec, caps).await,
        Err(e) => Err(e),
    };
    if let Err(e) = created {
        if let Some(key) = &idem {
            // Let a retry with the same key create the job.
            if let Err(r) = st.progress.release_idempotency(&tenant, key, id).await {
                tracing::error!(job = %id, error = %r, "cannot release the Idempotency-Key of a failed submission");
            }
        }
        return Err(e);
    }
    let body = SubmittedJob {
        id,
        state: JobState::Queued,
        links: links(id),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The value of an `Idempotency-Key` header, checked.
pub(crate) fn idempotency_key(v: &axum::http::HeaderValue) -> ApiResult<String> {
    v.to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .ok_or_else(|| ApiError::invalid("Idempotency-Key: 1 to 255 visible ASCII characters"))
}

/// Spec object, progress entry (within the tenant's `caps`), jobs queue: in
/// that order, undoing the earlier steps when a later one fails or the caps
/// refuse the job.
async fn create_job(st: &ApiState, spec: &JobSpec, caps: TenantCaps) -> ApiResult<()> {
    let spec_path = st.layout.job_spec(spec.id);
    let json = serde_json::to_vec(spec).map_err(ApiError::internal)?;
    st.store
        .put_opts(&spec_path, PutPayload::from(json), PutMode::Create.into())
        .await
        .map_err(ApiError::store)?;
    match st.progress.create_job_within(spec, caps).await {
        Ok(None) => {}
        Ok(Some(refused)) => {
            if let Err(d) = st.store.delete(&spec_path).await {
                tracing::error!(job = %spec.id, error = %d, "cannot delete the spec of a refused submission");
            }
            return Err(limit_error(&spec.tenant, refused));
        }
        Err(e) => return Err(undo(st, spec, &spec_path, e).await),
    }
    if let Err(e) = st.queue.publish_job(spec.id).await {
        return Err(undo(st, spec, &spec_path, e).await);
    }
    tracing::info!(job = %spec.id, tenant = %spec.tenant, samples = spec.num_samples, "job submitted");
    Ok(())
}

/// Deletes the progress entry and the spec of a failed submission.
async fn undo(
    st: &ApiState,
    spec: &JobSpec,
    spec_path: &object_store::path::Path,
    e: dig_common::CommonError,
) -> ApiError {
    tracing::error!(job = %spec.id, error = %e, "submission failed; undoing it");
    if let Err(d) = st.progress.delete_job(spec).await {
        tracing::error!(job = %spec.id, error = %d, "cannot delete the progress entry of a failed submission");
    }
    if let Err(d) = st.store.delete(spec_path).await {
        tracing::error!(job = %spec.id, error = %d, "cannot delete the spec of a failed submission");
    }
    ApiError::from(e)
}

pub(crate) fn parse_id(id: &str) -> ApiResult<JobId> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("job {id} not found")))
}

/// The job's progress if it exists and belongs to `tenant`; 404 otherwise.
async fn owned_job(st: &ApiState, tenant: &str, id: &str) -> ApiResult<(JobId, JobProgress)> {
    let job = parse_id(id)?;
    match st.progress.get(job).await? {
        Some(p) if p.tenant == tenant => Ok((job, p)),
        _ => Err(ApiError::not_found(format!("job {id} not found"))),
    }
}

/// One of the tenant's jobs.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_job(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    Ok(Json(full_view(&st, job, &p).await?))
}

pub(crate) fn already_final(job: JobId, state: JobState) -> ApiError {
    let what = match state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "been cancelled",
        // Not final: not reached; worded anyway.
        JobState::Queued => "been queued",
        JobState::Running => "started",
    };
    ApiError::new(
        StatusCode::CONFLICT,
        "already_final",
        format!("job {job} has already {what}; only a queued or running job can be cancelled"),
    )
}

/// Cancels a job that is queued or running: its state becomes `cancelled`
/// and no further shards are published; shards already running finish.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "Cancelled; the job as it is now", body = JobView),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
        (status = 409, description = "The job is already final (code `already_final`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn cancel_job(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    if p.state.is_final() {
        return Err(already_final(job, p.state));
    }
    st.progress
        .set_state(job, JobState::Cancelled, None)
        .await?;
    // A final state is terminal: if the job finished in the meantime, the
    // call above changed nothing, and the answer says what did happen.
    let p = st
        .progress
        .get(job)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    if p.state != JobState::Cancelled {
        return Err(already_final(job, p.state));
    }
    write_cancel_marker(&st, job).await;
    tracing::info!(%job, %tenant, "job cancelled");
    Ok(Json(full_view(&st, job, &p).await?))
}

/// Writes the cancelled job's state marker (`jobs/{id}/state.json`), so that
/// the cancellation survives the progress store losing its data before a
/// coordinator saw it. A failure is logged only: the coordinator writes the
/// same marker when it sees the job cancelled.
pub(crate) async fn write_cancel_marker(st: &ApiState, job: JobId) {
    let marker = dig_common::job::StateMarker {
        job,
        state: JobState::Cancelled,
        error: None,
        written_at: now_secs(),
    };
    let result = match serde_json::to_vec_pretty(&marker) {
        Ok(json) => st
            .store
            .put(&st.layout.job_state(job), PutPayload::from(json))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        tracing::warn!(%job, error = %e, "cannot write the cancelled job's state marker; the coordinator will");
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Page size (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page (a job id); empty: the first page.
    #[param(
        pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"
    )]
    cursor: Option<String>,
    /// Only jobs in this state; empty: every state.
    #[param(pattern = "^(queued|running|succeeded|failed|cancelled)?$")]
    state: Option<String>,
}

/// The tenant's jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "Invalid limit, cursor or state", body = ErrorBody),
        (status = 404, description = "The cursor names none of the tenant's jobs", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_jobs(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    JsonQuery(q): JsonQuery<ListQuery>,
) -> ApiResult<Json<JobList>> {
    let limit = q.limit.unwrap_or(st.limits.default_page);
    if !(1..=st.limits.max_page).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit: must be between 1 and {}",
            st.limits.max_page
        )));
    }
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<JobId>()
                .map_err(|_| ApiError::invalid("cursor: not a job id"))?,
        ),
    };
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(name) => Some(
            serde_json::from_value::<JobState>(serde_json::Value::String(name.to_string()))
                .map_err(|_| {
                    ApiError::invalid(format!(
                        "state: unknown state '{name}'; use queued, running, succeeded, failed or cancelled"
                    ))
                })?,
        ),
    };
    // Without a filter, one page of the tenant's listing. With one, pages
    // are scanned until `limit` jobs match or the listing ends; the cursor
    // is the last job looked at, so the next page goes on from there.
    let mut jobs = Vec::with_capacity(limit);
    let mut next = None;
    let mut from = cursor;
    'pages: loop {
        let ids = match st.progress.list_jobs(&tenant, limit, from).await {
            // A well-formed cursor that names none of the tenant's jobs (a
            // schema cannot tell): the page it points into is not found.
            Err(dig_common::CommonError::Invalid(m)) if from == cursor && cursor.is_some() => {
                return Err(ApiError::not_found(format!("cursor: {m}")))
            }
            other => other?,
        };
        for (k, id) in ids.iter().enumerate() {
            if let Some(p) = st.progress.get(*id).await? {
                if state.is_none_or(|s| s == p.state) {
                    jobs.push(full_view(&st, *id, &p).await?);
                }
            }
            if jobs.len() == limit {
                // More may follow unless this was the listing's very end.
                let last_of_page = k + 1 == ids.len();
                if !(last_of_page && ids.len() < limit) {
                    next = Some(*id);
                }
                break 'pages;
            }
        }
        if ids.len() < limit {
            break;
        }
        from = ids.last().copied();
    }
    Ok(Json(JobList {
        jobs,
        next_cursor: next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(
        state: JobState,
        done: u64,
        started: Option<u64>,
        finished: Option<u64>,
    ) -> JobProgress {
        JobProgress {
            state,
            tenant: "t".into(),
            num_shards: 10,
            num_samples: 100,
            shards_done: done / 10,
            samples_done: done,
            shards_failed: 0,
            error: None,
            created_at: 900,
            started_at: started,
            finished_at: finished,
            samples_valid: None,
            solver: Default::default(),
            steps: None,
            filter: None,
            steering: None,
            log_density: false,
            from_structure: None,
            flow_above: None,
        }
    }

    #[test]
    fn throughput_and_eta() {
        // Not started: nothing known.
        let p = progress(JobState::Queued, 0, None, None);
        assert_eq!(throughput(&p, 1000), (None, None));
        // Started this second: no rate yet.
        let p = progress(JobState::Running, 0, Some(1000), None);
        assert_eq!(throughput(&p, 1000), (None, None));
        // Running, nothing done: rate 0, eta unknown.
        assert_eq!(throughput(&p, 1010), (Some(0.0), None));
        // 30 in 20 s: 1.5/s, 70 left: 46.67 s, rounded up.
        let p = progress(JobState::Running, 30, Some(1000), None);
        assert_eq!(throughput(&p, 1020), (Some(1.5), Some(47)));
        // Final: measured to finished_at, whatever now is.
        let p = progress(JobState::Succeeded, 100, Some(1000), Some(1040));
        assert_eq!(throughput(&p, 5000), (Some(2.5), Some(0)));
        // Cancelled before it started.
        let p = progress(JobState::Cancelled, 0, None, Some(1040));
        assert_eq!(throughput(&p, 5000), (None, Some(0)));
    }
}
