//! The axum REST API of dig-cluster: feature uploads, job submission,
//! progress and results.
//!
//! Every `/v1` route needs `Authorization: Bearer KEY` of a tenant
//! ([`Tenants`]). Errors are JSON: `{"error": {"code", "message"}}`.
//!
//! Feature ownership: the feature file itself is content-addressed and
//! shared (`features/{sha}.npz`); a tenant owns features it uploaded, which
//! is recorded by a small JSON marker `{"length": L}` at
//! `{prefix}tenants/{tenant}/features/{sha}.json` (see `ObjectLayout::tenant_features`).
//!
//! Submission order: spec object, progress entry, then the job id on the
//! jobs queue (the coordinator expects the first two before the third). If a
//! later step fails the spec object is deleted again; the progress store has
//! no delete, so a failed publish leaves a queued progress entry behind
//! (logged).

mod error;
mod tenants;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dig_common::job::{default_shard_size, JobId, JobSpec, JobState, Priority};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{JobProgress, ProgressStore};
use dig_common::queue::ShardQueue;
use dig_common::store::{check_sha256, FeatureStore, AMINO_ACIDS};
use futures::TryStreamExt;
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use error::ApiError;
pub use tenants::{is_valid_tenant, new_api_key, Tenants, TenantsError};

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
}

type Shared = Arc<ApiState>;
type ApiResult<T> = Result<T, ApiError>;

/// The service's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/features",
            post(upload_features).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/results", get(get_results))
        .route("/v1/jobs/{id}/results/{shard}", get(get_shard))
        .with_state(Arc::new(state))
}

#[derive(Serialize, Deserialize)]
struct FeatureMarker {
    length: u64,
}

// ---------------------------------------------------------------- auth

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
        Err(e) => return Err(ApiError::internal(e)),
    };
    Ok((status, Json(fref)).into_response())
}

/// The length of features `sha` that `tenant` uploaded; 404 otherwise.
async fn owned_features(st: &ApiState, tenant: &str, sha: &str) -> ApiResult<u64> {
    check_sha256(sha).map_err(|e| ApiError::invalid(format!("features_sha256: {e}")))?;
    let path = st.layout.tenant_features(tenant, sha);
    let bytes = match st.store.get(&path).await {
        Ok(r) => r.bytes().await.map_err(ApiError::internal)?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "features_not_found",
                format!("features {sha} not found; upload them with POST /v1/features"),
            ))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let marker: FeatureMarker = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
    Ok(marker.length)
}

// ---------------------------------------------------------------- jobs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJob {
    name: Option<String>,
    sequence: String,
    features_sha256: String,
    num_samples: u64,
    seed: Option<u64>,
    steps: Option<i64>,
    model: Option<String>,
    priority: Option<Priority>,
    shard_size: Option<u64>,
}

fn is_valid_model_name(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 128
        && !m.starts_with('.')
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn links(id: JobId) -> serde_json::Value {
    json!({"self": format!("/v1/jobs/{id}"), "results": format!("/v1/jobs/{id}/results")})
}

fn job_view(id: JobId, p: &JobProgress) -> serde_json::Value {
    json!({
        "id": id,
        "state": p.state,
        "num_samples": p.num_samples,
        "samples_done": p.samples_done,
        "shards": {"done": p.shards_done, "failed": p.shards_failed, "total": p.num_shards},
        "error": p.error,
        "created_at": p.created_at,
        "started_at": p.started_at,
        "finished_at": p.finished_at,
        "links": links(id),
    })
}

/// Checks a submission against the limits and the store; the spec to run.
async fn validate(st: &ApiState, tenant: &str, req: SubmitJob) -> ApiResult<JobSpec> {
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
    let model = req.model.unwrap_or_else(|| lim.default_model.clone());
    if !is_valid_model_name(&model) {
        return Err(ApiError::invalid(format!("model: invalid name '{model}'")));
    }
    let length = owned_features(st, tenant, &req.features_sha256).await?;
    let seq_len = req.sequence.chars().count() as u64;
    if seq_len != length {
        return Err(ApiError::invalid(format!(
            "sequence length {seq_len} does not match the features' length {length}"
        )));
    }
    match st
        .store
        .head(&st.layout.model_file(&model, "config.json"))
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_model",
                format!("model: unknown model '{model}'"),
            ))
        }
        Err(e) => return Err(ApiError::internal(e)),
    }
    let steps_for_size = req.steps.map(|s| s as u64).unwrap_or(lim.default_steps);
    Ok(JobSpec {
        id: JobId::new(),
        tenant: tenant.to_string(),
        name: req.name,
        sequence: req.sequence,
        features_sha256: req.features_sha256,
        num_samples: req.num_samples,
        seed: req.seed.unwrap_or_else(rand::random),
        steps: req.steps,
        model,
        priority: req.priority.unwrap_or_default(),
        shard_size: req
            .shard_size
            .unwrap_or_else(|| default_shard_size(length, steps_for_size)),
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

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
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| {
                    !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key: 1 to 255 visible ASCII characters")
                })?;
            Some(k.to_string())
        }
    };
    let spec = validate(&st, &tenant, req).await?;
    let id = spec.id;
    if let Some(key) = &idem {
        let bound = st.progress.idempotent_job(&tenant, key, id).await?;
        if bound != id {
            return match st.progress.get(bound).await? {
                Some(p) if p.tenant == tenant => {
                    Ok((StatusCode::OK, Json(job_view(bound, &p))).into_response())
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
    create_job(&st, &spec).await?;
    let body = json!({"id": id, "state": JobState::Queued, "links": links(id)});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Spec object, progress entry, jobs queue: in that order, undoing the spec
/// object when a later step fails.
async fn create_job(st: &ApiState, spec: &JobSpec) -> ApiResult<()> {
    let spec_path = st.layout.job_spec(spec.id);
    let json = serde_json::to_vec(spec).map_err(ApiError::internal)?;
    st.store
        .put_opts(&spec_path, PutPayload::from(json), PutMode::Create.into())
        .await
        .map_err(ApiError::internal)?;
    let rest = async {
        st.progress.create_job(spec).await?;
        st.queue.publish_job(spec.id).await
    };
    if let Err(e) = rest.await {
        if let Err(d) = st.store.delete(&spec_path).await {
            tracing::error!(job = %spec.id, error = %d, "cannot delete the spec of a failed submission");
        }
        tracing::error!(job = %spec.id, "submission failed; a queued progress entry may remain");
        return Err(ApiError::internal(e));
    }
    tracing::info!(job = %spec.id, tenant = %spec.tenant, samples = spec.num_samples, "job submitted");
    Ok(())
}

fn parse_id(id: &str) -> ApiResult<JobId> {
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

async fn get_job(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    Ok(Json(job_view(job, &p)))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
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
    let ids = st.progress.list_jobs(&tenant, limit, cursor).await?;
    let mut jobs = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(p) = st.progress.get(*id).await? {
            jobs.push(job_view(*id, &p));
        }
    }
    let next = if ids.len() == limit {
        ids.last().copied()
    } else {
        None
    };
    Ok(Json(json!({"jobs": jobs, "next_cursor": next})))
}

async fn get_results(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    if p.state != JobState::Succeeded {
        return Err(ApiError::not_found("job has not succeeded yet"));
    }
    let bytes = st
        .store
        .get(&st.layout.manifest(job))
        .await
        .map_err(ApiError::internal)?
        .bytes()
        .await
        .map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

async fn get_shard(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, shard)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    let index: u64 = shard
        .trim_end_matches(".npz")
        .parse()
        .ok()
        .filter(|i| *i < p.num_shards)
        .ok_or_else(|| ApiError::not_found(format!("job {job} has no shard {shard}")))?;
    let result = match st.store.get(&st.layout.shard(job, index)).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ApiError::not_found(format!(
                "shard {index} of job {job} is not done yet"
            )))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let size = result.meta.size;
    let stream = result.into_stream().map_err(std::io::Error::other);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
