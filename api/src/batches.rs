//! Batches: many job requests in one call, for proteome-scale work.
//!
//! `POST /v1/batches` takes `{name?, jobs: [job request, ...]}` (each entry
//! what `POST /v1/jobs` takes; entries without a `priority` are `bulk`) and
//! is all-or-nothing: every entry is validated first, and one invalid entry
//! refuses the whole batch with 400 `invalid_batch` listing every invalid
//! entry by index. An accepted batch is a set of ordinary jobs (each with its
//! own id, events, results and webhook) plus a record in the object store
//! (`batches/{id}.json`: tenant, name, the job ids in entry order) that
//! `GET /v1/batches/{id}` aggregates and `POST /v1/batches/{id}/cancel`
//! cancels.
//!
//! Creation order is that of a single job, step by step for all entries:
//! every spec object, the batch record, every progress entry, then every job
//! id onto the jobs queue. A failure at any step undoes what was done
//! (progress entries, specs, record, the Idempotency-Key), so a failed batch
//! can be retried whole. A job id already published when a later publish
//! fails is dropped by the coordinator (its spec is gone).
//!
//! Tenant limits count the batch whole: the tenant's unfinished jobs plus the
//! batch's entries, and its queued samples plus the batch's, must stay within
//! the caps, or the batch is refused with 429 and nothing is created. The
//! check that counts is atomic with the creation of every entry's progress
//! entry (one Redis script), as a single job's is with its own, so
//! submissions racing with a batch cannot pass a cap; an early check
//! refuses most such batches before any spec is written.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dig_common::job::{BatchRecord, JobId, JobSpec, JobState, Priority};
use dig_common::CommonError;
use std::collections::HashMap;
use std::sync::Arc;

use dig_common::layout::ObjectLayout;
use dig_common::progress::{JobProgress, LimitExceeded, ProgressStore};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::openapi::{ErrorBody, JobStateSchema};
use crate::{
    idempotency_key, links, now_secs, parse_id, validate, ApiError, ApiResult, ApiState, JobLinks,
    Lookups, Shared, SubmitJob, Tenant,
};

/// Largest `POST /v1/batches` body: room for 10 000 entries of long
/// sequences.
pub(crate) const MAX_BODY_BYTES: usize = 64 << 20;

/// How many object-store or Redis calls a batch makes at once.
const CONCURRENCY: usize = 16;

/// A batch request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBatch {
    /// A name for people, at most 200 characters.
    #[schema(max_length = 200)]
    name: Option<String>,
    /// The jobs, each what `POST /v1/jobs` takes; `priority` defaults to
    /// `bulk` here. At most `api.max_batch_entries`.
    #[schema(min_items = 1)]
    jobs: Vec<SubmitJob>,
    /// An http(s) URL that gets one signed `POST` of the batch's view
    /// (without the per-job list) when every job of the batch is final
    /// (`X-Dig-Event: batch.succeeded`, `batch.failed` or
    /// `batch.cancelled`); needs a webhook secret for the tenant, as a
    /// job's `callback_url` does. Entries may have their own.
    #[schema(
        max_length = 2048,
        pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\s]+",
        example = "https://lab.example.org/hooks/dig-batch"
    )]
    callback_url: Option<String>,
}

/// One invalid entry of a refused batch.
#[derive(Serialize, ToSchema)]
pub(crate) struct EntryError {
    /// The entry's position in `jobs`, from 0.
    index: usize,
    code: String,
    message: String,
}

/// The 400 answer to a batch with invalid entries.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchErrorBody {
    error: BatchErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BatchErrorDetail {
    /// `invalid_batch`.
    code: String,
    message: String,
    /// Every invalid entry, in order (absent for a batch-level error such
    /// as an invalid `callback_url`, code `invalid_request`).
    #[schema(required = false)]
    entries: Vec<EntryError>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BatchLinks {
    #[serde(rename = "self")]
    #[schema(rename = "self")]
    this: String,
    cancel: String,
}

fn batch_links(id: JobId) -> BatchLinks {
    BatchLinks {
        this: format!("/v1/batches/{id}"),
        cancel: format!("/v1/batches/{id}/cancel"),
    }
}

/// A job of an accepted batch.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchJobRef {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    links: JobLinks,
}

/// The answer to an accepted batch.
#[derive(Serialize, ToSchema)]
pub(crate) struct SubmittedBatch {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    #[schema(value_type = JobStateSchema)]
    state: JobState,
    /// The jobs, in the order of the request's entries.
    jobs: Vec<BatchJobRef>,
    links: BatchLinks,
}

/// Jobs of a batch by state.
#[derive(Serialize, ToSchema, Default, PartialEq, Debug)]
pub(crate) struct StateCounts {
    queued: u64,
    running: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    /// Jobs whose progress is gone (the progress store lost it; `digctl
    /// reconcile` rebuilds it).
    unknown: u64,
}

/// One job of a batch, briefly.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchJobView {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    /// Null when the job's progress is gone.
    #[schema(value_type = Option<JobStateSchema>)]
    state: Option<JobState>,
    num_samples: u64,
    samples_done: u64,
    error: Option<String>,
}

/// A batch: its jobs' progress added up.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchView {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    name: Option<String>,
    /// `queued` until a job starts, `running` until every job is final,
    /// then `succeeded` (all succeeded), `failed` (one failed) or
    /// `cancelled` (none failed, one cancelled).
    #[schema(value_type = JobStateSchema)]
    state: JobState,
    num_jobs: u64,
    jobs_by_state: StateCounts,
    num_samples: u64,
    samples_done: u64,
    /// Unix seconds.
    created_at: u64,
    /// Unix seconds the last job ended; null until every job is final.
    finished_at: Option<u64>,
    /// Every job, in entry order (left out of the batch's webhook body).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    jobs: Vec<BatchJobView>,
    links: BatchLinks,
    /// The batch's webhook, when it was submitted with a `callback_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<crate::WebhookView>,
}

/// The state of a batch from its jobs' states.
fn batch_state(counts: &StateCounts, num_jobs: u64) -> JobState {
    let ended = counts.succeeded + counts.failed + counts.cancelled;
    if ended == num_jobs {
        if counts.failed > 0 {
            JobState::Failed
        } else if counts.cancelled > 0 {
            JobState::Cancelled
        } else {
            JobState::Succeeded
        }
    } else if counts.running > 0 || ended > 0 {
        JobState::Running
    } else {
        JobState::Queued
    }
}

/// Submits many jobs at once, all or none.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    request_body = SubmitBatch,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1 to 255 visible ASCII characters; repeats of a request answer the first one's batch")),
    responses(
        (status = 202, description = "Accepted: every job queued", body = SubmittedBatch),
        (status = 200, description = "The batch of an earlier request with the same Idempotency-Key", body = BatchView),
        (status = 400, description = "Invalid entries (code `invalid_batch`, each listed in `entries` by index) or an invalid request; nothing was created", body = BatchErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key belongs to an unfinished or failed submission", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 MiB", body = ErrorBody),
        (status = 429, description = "The batch would take the tenant past its limits (code `limit_exceeded`); nothing was created", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit_batch(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|r| ApiError::new(r.status(), "invalid_body", r.body_text()))?;
    let req: SubmitBatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid batch request: {e}")))?;
    let idem = headers
        .get("idempotency-key")
        .map(idempotency_key)
        .transpose()?;
    if let Some(name) = &req.name {
        if name.chars().count() > 200 {
            return Err(ApiError::invalid("name: at most 200 characters"));
        }
    }
    if let Some(url) = &req.callback_url {
        crate::webhooks::check_callback_url(url, st.limits.allow_private_callbacks)
            .map_err(ApiError::invalid)?;
        if st.webhook_secrets.get(&tenant).is_none() {
            return Err(ApiError::invalid(format!(
                "callback_url: no webhook secret is configured for tenant {tenant}, so its \
                 webhooks cannot be signed; ask the operator to add one (api.webhook_secrets_file)"
            )));
        }
    }
    let max = st.limits.max_batch_entries;
    if req.jobs.is_empty() || req.jobs.len() > max {
        return Err(ApiError::invalid(format!(
            "jobs: a batch has 1 to {max} entries, got {}",
            req.jobs.len()
        )));
    }

    // Every entry checked before anything is created.
    let mut lookups = Lookups::default();
    let mut specs = Vec::with_capacity(req.jobs.len());
    let mut invalid = Vec::new();
    for (index, mut entry) in req.jobs.into_iter().enumerate() {
        entry.priority = Some(entry.priority.unwrap_or(Priority::Bulk));
        match validate(&st, &tenant, entry, &mut lookups).await {
            Ok(spec) => specs.push(spec),
            Err(e) if e.status.is_server_error() => return Err(e),
            Err(e) => invalid.push(EntryError {
                index,
                code: e.code.to_string(),
                message: e.message,
            }),
        }
    }
    if !invalid.is_empty() {
        let total = specs.len() + invalid.len();
        let first = &invalid[0];
        let message = format!(
            "{} of {total} entries are invalid, nothing was created; the first: entry {}: {}",
            invalid.len(),
            first.index,
            first.message
        );
        let body = BatchErrorBody {
            error: BatchErrorDetail {
                code: "invalid_batch".into(),
                message,
                entries: invalid,
            },
        };
        return Ok((StatusCode::BAD_REQUEST, Json(body)).into_response());
    }

    let batch = BatchRecord {
        id: JobId::new(),
        tenant: tenant.clone(),
        name: req.name,
        created_at: now_secs(),
        jobs: specs.iter().map(|s| s.id).collect(),
        callback_url: req.callback_url,
    };
    let id = batch.id;
    // Batch keys live beside job keys; the prefix keeps them apart.
    let idem = idem.map(|k| format!("batch:{k}"));
    if let Some(key) = &idem {
        let bound = st.progress.idempotent_job(&tenant, key, id).await?;
        if bound != id {
            return match load_record(&st, &tenant, bound).await {
                Ok(record) => Ok((StatusCode::OK, Json(view(&st, record).await?)).into_response()),
                Err(_) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    "an earlier request with this Idempotency-Key is still in progress or failed; \
                     use a new key",
                )),
            };
        }
    }
    let created = match check_caps(&st, &tenant, &specs).await {
        Ok(()) => create(&st, &batch, &specs).await,
        Err(e) => Err(e),
    };
    if let Err(e) = created {
        if let Some(key) = &idem {
            if let Err(r) = st.progress.release_idempotency(&tenant, key, id).await {
                tracing::error!(batch = %id, error = %r, "cannot release the Idempotency-Key of a failed batch");
            }
        }
        return Err(e);
    }
    let samples: u64 = specs.iter().map(|s| s.num_samples).sum();
    tracing::info!(batch = %id, %tenant, jobs = specs.len(), samples, "batch submitted");
    let body = SubmittedBatch {
        id,
        state: JobState::Queued,
        jobs: specs
            .iter()
            .map(|s| BatchJobRef {
                id: s.id,
                links: links(s.id),
            })
            .collect(),
        links: batch_links(id),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// 429 unless the tenant's unfinished jobs and queued samples, with the
/// batch's, stay within its caps: a cheap early refusal, before any spec is
/// written; the check that counts is atomic with the creation of the
/// progress entries ([`ProgressStore::create_jobs_within`]).
async fn check_caps(st: &ApiState, tenant: &str, specs: &[JobSpec]) -> ApiResult<()> {
    let usage = st.progress.tenant_usage(tenant).await?;
    let samples: u64 = specs.iter().map(|s| s.num_samples).sum();
    match st
        .limits
        .tenant_caps()
        .check_many(usage, specs.len() as u64, samples)
    {
        Some(refused) => Err(batch_limit_error(tenant, specs.len(), refused)),
        None => Ok(()),
    }
}

/// The 429 of a batch of `jobs` jobs that `refused` names.
fn batch_limit_error(tenant: &str, jobs: usize, refused: LimitExceeded) -> ApiError {
    let message = match refused {
        LimitExceeded::Jobs { unfinished, limit } => format!(
            "tenant {tenant} has {unfinished} unfinished jobs; the batch's {jobs} more would pass the limit of {limit}"
        ),
        LimitExceeded::Samples {
            queued,
            requested,
            limit,
        } => format!(
            "tenant {tenant} has {queued} samples queued; the batch's {requested} more would pass the limit of {limit}"
        ),
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
}

/// Specs, record, progress entries, job ids: each step for every job before
/// the next; a failure undoes everything.
async fn create(st: &ApiState, batch: &BatchRecord, specs: &[JobSpec]) -> ApiResult<()> {
    let mut written = Vec::new();
    let result = create_steps(st, batch, specs, &mut written).await;
    if let Err(e) = result {
        if e.refused.is_some() {
            tracing::info!(batch = %batch.id, reason = %e.detail, "batch refused by the tenant's caps; undoing it");
        } else {
            tracing::error!(batch = %batch.id, error = %e.detail, "batch submission failed; undoing it");
        }
        undo(st, batch, specs, &written).await;
        return Err(match (e.refused, e.unavailable) {
            (Some(refused), _) => batch_limit_error(&batch.tenant, specs.len(), refused),
            (None, Some(server)) => ApiError::unavailable(server, e.detail),
            (None, None) => ApiError::internal(e.detail),
        });
    }
    Ok(())
}

/// A step of [`create_steps`] that failed: what for the log, and the
/// server that was unavailable when that was the cause (a 503).
struct StepFailed {
    detail: String,
    unavailable: Option<&'static str>,
    /// The tenant's caps refused the batch (a 429).
    refused: Option<LimitExceeded>,
}

fn step_failed(what: impl std::fmt::Display, e: impl Into<CommonError>) -> StepFailed {
    let e = e.into();
    StepFailed {
        detail: format!("{what}: {e}"),
        unavailable: e.unavailable(),
        refused: None,
    }
}

fn encoding_failed(e: serde_json::Error) -> StepFailed {
    StepFailed {
        detail: e.to_string(),
        unavailable: None,
        refused: None,
    }
}

/// What [`create_steps`] got done, for [`undo`].
#[derive(PartialEq, PartialOrd)]
enum Done {
    Specs,
    Record,
    Progress,
    Webhook,
}

async fn create_steps(
    st: &ApiState,
    batch: &BatchRecord,
    specs: &[JobSpec],
    done: &mut Vec<Done>,
) -> Result<(), StepFailed> {
    // Specs: written all, or the ones written are deleted by the undo
    // (deleting a spec that was never written is harmless).
    done.push(Done::Specs);
    // Owned values in the futures: borrowed ones trip the compiler's
    // `Send` check of stream combinators inside axum handlers.
    let store = st.store.clone();
    let items: Vec<_> = specs
        .iter()
        .map(|s| (s.id, st.layout.job_spec(s.id), serde_json::to_vec(s)))
        .collect();
    futures::stream::iter(items)
        .map(move |(id, path, json)| {
            let store = store.clone();
            async move {
                let json = json.map_err(encoding_failed)?;
                store
                    .put_opts(&path, PutPayload::from(json), PutMode::Create.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| step_failed(format_args!("job {id}: spec"), e))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    done.push(Done::Record);
    let json = serde_json::to_vec(batch).map_err(encoding_failed)?;
    st.store
        .put_opts(
            &st.layout.batch(batch.id),
            PutPayload::from(json),
            PutMode::Create.into(),
        )
        .await
        .map_err(|e| step_failed("batch record", e))?;
    done.push(Done::Progress);
    // Every entry in one atomic step with the tenant's caps: single
    // submissions racing with the batch cannot pass a cap.
    let refused = st
        .progress
        .create_jobs_within(specs, st.limits.tenant_caps())
        .await
        .map_err(|e| step_failed("progress entries", e))?;
    if let Some(refused) = refused {
        return Err(StepFailed {
            detail: format!("refused by the tenant's caps: {refused:?}"),
            unavailable: None,
            refused: Some(refused),
        });
    }
    if let Some(url) = &batch.callback_url {
        done.push(Done::Webhook);
        st.progress
            .register_batch_webhook(batch.id, url)
            .await
            .map_err(|e| step_failed("batch webhook", e))?;
    }
    // In entry order, so that a batch's jobs start in the order given.
    for spec in specs {
        st.queue
            .publish_job(spec.id)
            .await
            .map_err(|e| step_failed(format_args!("job {}: jobs queue", spec.id), e))?;
    }
    Ok(())
}

/// Deletes what a failed batch submission created.
async fn undo(st: &ApiState, batch: &BatchRecord, specs: &[JobSpec], done: &[Done]) {
    if done.contains(&Done::Webhook) {
        if let Err(e) = st.progress.forget_batch(batch.id).await {
            tracing::error!(batch = %batch.id, error = %e, "cannot delete the webhook of a failed batch");
        }
    }
    if done.contains(&Done::Progress) {
        let progress = st.progress.clone();
        futures::stream::iter(specs.to_vec())
            .for_each_concurrent(CONCURRENCY, move |spec| {
                let progress = progress.clone();
                async move {
                    if let Err(e) = progress.delete_job(&spec).await {
                        tracing::error!(job = %spec.id, error = %e, "cannot delete the progress entry of a failed batch");
                    }
                }
            })
            .await;
    }
    if done.contains(&Done::Record) {
        if let Err(e) = st.store.delete(&st.layout.batch(batch.id)).await {
            tracing::error!(batch = %batch.id, error = %e, "cannot delete the record of a failed batch");
        }
    }
    if done.contains(&Done::Specs) {
        let store = st.store.clone();
        let items: Vec<_> = specs
            .iter()
            .map(|s| (s.id, st.layout.job_spec(s.id)))
            .collect();
        futures::stream::iter(items)
            .for_each_concurrent(CONCURRENCY, move |(id, path)| {
                let store = store.clone();
                async move {
                    match store.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            tracing::error!(job = %id, error = %e, "cannot delete the spec of a failed batch")
                        }
                    }
                }
            })
            .await;
    }
}

/// Batch records read, by object key: a record never changes once written
/// (cancelling a batch changes its jobs, not the record), so a portal
/// polling a batch costs the object store one read per API process, not
/// one per poll. Bounded: emptied when it reaches [`RECORD_CACHE_ENTRIES`].
static RECORDS: std::sync::LazyLock<std::sync::Mutex<HashMap<String, Arc<BatchRecord>>>> =
    std::sync::LazyLock::new(Default::default);
const RECORD_CACHE_ENTRIES: usize = 4096;

/// The batch's record if it exists and belongs to `tenant`; 404 otherwise.
async fn load_record(st: &ApiState, tenant: &str, id: JobId) -> ApiResult<BatchRecord> {
    let key = st.layout.batch(id).to_string();
    let cached = RECORDS.lock().expect("record cache").get(&key).cloned();
    let found = match cached {
        Some(record) => Ok(Some((*record).clone())),
        None => dig_common::store::read_batch_record(st.store.as_ref(), &st.layout, id).await,
    };
    if let Ok(Some(record)) = &found {
        let mut cache = RECORDS.lock().expect("record cache");
        if cache.len() >= RECORD_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Arc::new(record.clone()));
    }
    match found {
        Ok(Some(record)) if record.tenant == tenant => Ok(record),
        Ok(_) => Err(ApiError::not_found(format!("batch {id} not found"))),
        Err(e) => Err(ApiError::from(e)),
    }
}

/// Every job's progress, in entry order (`None`: gone).
async fn progress_of(
    progress: &Arc<dyn ProgressStore>,
    jobs: &[JobId],
) -> dig_common::Result<Vec<Option<JobProgress>>> {
    let progress = progress.clone();
    futures::stream::iter(jobs.to_vec())
        .map(move |job| {
            let progress = progress.clone();
            async move { progress.get(job).await }
        })
        .buffered(CONCURRENCY * 4)
        .try_collect()
        .await
}

async fn view(st: &ApiState, record: BatchRecord) -> ApiResult<BatchView> {
    let has_webhook = record.callback_url.is_some();
    let id = record.id;
    let progress = progress_of(&st.progress, &record.jobs).await?;
    let mut view = aggregate(record, progress);
    if has_webhook {
        view.webhook = st.progress.webhook(id).await?.map(crate::WebhookView::from);
    }
    Ok(view)
}

/// A batch's webhook body and event when the batch has ended: its view
/// without the per-job list; `None` while it is under way.
pub(crate) async fn ended_body(
    store: &dyn ObjectStore,
    layout: &ObjectLayout,
    progress: &Arc<dyn ProgressStore>,
    batch: JobId,
) -> Result<Option<(String, JobState, String)>, String> {
    let record = dig_common::store::read_batch_record(store, layout, batch)
        .await
        .map_err(|e| format!("cannot read batch {batch}: {e}"))?
        .ok_or_else(|| format!("batch {batch} has no record"))?;
    let tenant = record.tenant.clone();
    let jobs = progress_of(progress, &record.jobs)
        .await
        .map_err(|e| format!("cannot read the batch's jobs: {e}"))?;
    let mut view = aggregate(record, jobs);
    if !view.state.is_final() {
        return Ok(None);
    }
    view.jobs.clear();
    let body = serde_json::to_string(&view).map_err(|e| e.to_string())?;
    Ok(Some((body, view.state, tenant)))
}

fn aggregate(record: BatchRecord, progress: Vec<Option<JobProgress>>) -> BatchView {
    let mut counts = StateCounts::default();
    let (mut num_samples, mut samples_done, mut finished_at) = (0, 0, Some(0));
    let mut jobs = Vec::with_capacity(record.jobs.len());
    for (&id, p) in record.jobs.iter().zip(progress) {
        counts.add(p.as_ref().map(|p| p.state));
        let Some(p) = p else {
            finished_at = None;
            jobs.push(BatchJobView {
                id,
                state: None,
                num_samples: 0,
                samples_done: 0,
                error: None,
            });
            continue;
        };
        num_samples += p.num_samples;
        samples_done += p.samples_done;
        finished_at = match (finished_at, p.finished_at) {
            (Some(a), Some(b)) if p.state.is_final() => Some(a.max(b)),
            _ => None,
        };
        jobs.push(BatchJobView {
            id,
            state: Some(p.state),
            num_samples: p.num_samples,
            samples_done: p.samples_done,
            error: p.error,
        });
    }
    let num_jobs = record.jobs.len() as u64;
    BatchView {
        id: record.id,
        name: record.name,
        state: batch_state(&counts, num_jobs),
        num_jobs,
        jobs_by_state: counts,
        num_samples,
        samples_done,
        created_at: record.created_at,
        finished_at,
        jobs,
        links: batch_links(record.id),
        webhook: None,
    }
}

/// One of the tenant's batches, its jobs' progress added up.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    params(("id" = String, Path, format = Uuid, description = "The batch id")),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such batch of this tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_batch(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchView>> {
    let id = parse_batch_id(&id)?;
    let record = load_record(&st, &tenant, id).await?;
    Ok(Json(view(&st, record).await?))
}

fn parse_batch_id(id: &str) -> ApiResult<JobId> {
    parse_id(id).map_err(|_| ApiError::not_found(format!("batch {id} not found")))
}

/// Cancels every job of the batch that is not final yet (as `POST
/// /v1/jobs/{id}/cancel` does for one); finished jobs keep their results.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/cancel",
    tag = "batches",
    params(("id" = String, Path, format = Uuid, description = "The batch id")),
    responses(
        (status = 200, description = "Every unfinished job cancelled; the batch as it is now", body = BatchView),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such batch of this tenant", body = ErrorBody),
        (status = 409, description = "Every job of the batch is final already (code `already_final`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel_batch(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchView>> {
    let id = parse_batch_id(&id)?;
    let record = load_record(&st, &tenant, id).await?;
    let progress = progress_of(&st.progress, &record.jobs).await?;
    let open: Vec<JobId> = record
        .jobs
        .iter()
        .zip(&progress)
        .filter(|(_, p)| p.as_ref().is_some_and(|p| !p.state.is_final()))
        .map(|(&job, _)| job)
        .collect();
    if open.is_empty() {
        let state = aggregate(record, progress).state;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_final",
            format!(
                "batch {id} has ended ({}); only a batch with queued or running jobs can be cancelled",
                serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        ));
    }
    // A job that ended meanwhile keeps its final state (set_state ignores it).
    let progress = st.progress.clone();
    futures::stream::iter(open.clone())
        .map(move |job| {
            let progress = progress.clone();
            async move { progress.set_state(job, JobState::Cancelled, None).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    tracing::info!(batch = %id, %tenant, jobs = open.len(), "batch cancelled");
    let view = view(&st, record).await?;
    // State markers of the jobs this call cancelled (those still cancelled;
    // one that ended meanwhile keeps its own end).
    let open: std::collections::HashSet<JobId> = open.into_iter().collect();
    let cancelled: Vec<JobId> = view
        .jobs
        .iter()
        .filter(|j| j.state == Some(JobState::Cancelled) && open.contains(&j.id))
        .map(|j| j.id)
        .collect();
    futures::stream::iter(cancelled)
        .for_each_concurrent(CONCURRENCY, |job| crate::write_cancel_marker(&st, job))
        .await;
    Ok(Json(view))
}

impl StateCounts {
    /// Counts one job in `state` (`None`: its progress is gone).
    fn add(&mut self, state: Option<JobState>) {
        *match state {
            None => &mut self.unknown,
            Some(JobState::Queued) => &mut self.queued,
            Some(JobState::Running) => &mut self.running,
            Some(JobState::Succeeded) => &mut self.succeeded,
            Some(JobState::Failed) => &mut self.failed,
            Some(JobState::Cancelled) => &mut self.cancelled,
        } += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(q: u64, r: u64, s: u64, f: u64, c: u64) -> StateCounts {
        StateCounts {
            queued: q,
            running: r,
            succeeded: s,
            failed: f,
            cancelled: c,
            unknown: 0,
        }
    }

    #[test]
    fn batch_state_from_jobs() {
        assert_eq!(batch_state(&counts(3, 0, 0, 0, 0), 3), JobState::Queued);
        assert_eq!(batch_state(&counts(2, 1, 0, 0, 0), 3), JobState::Running);
        // One ended, others waiting: under way.
        assert_eq!(batch_state(&counts(2, 0, 1, 0, 0), 3), JobState::Running);
        assert_eq!(batch_state(&counts(0, 0, 3, 0, 0), 3), JobState::Succeeded);
        assert_eq!(batch_state(&counts(0, 0, 1, 1, 1), 3), JobState::Failed);
        assert_eq!(batch_state(&counts(0, 0, 2, 0, 1), 3), JobState::Cancelled);
        // A job whose progress is gone keeps the batch unfinished.
        let mut c = counts(0, 0, 2, 0, 0);
        c.unknown = 1;
        assert_eq!(batch_state(&c, 3), JobState::Running);
    }
}
