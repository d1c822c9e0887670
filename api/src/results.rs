//! Results: the manifest, single shards (npz as stored, or PDB), and the
//! whole ensemble of a succeeded job as one streamed PDB or XTC trajectory
//! (with its topology PDB). The whole-job formats are converted shard by
//! shard ([`shard_stream`]), so the API never holds a job's ensemble.
//!
//! A failed or cancelled job's shards that were finished stay downloadable:
//! its manifest lists them (`"complete": false`), built from the object
//! store's listing (the source of truth) with each shard's SHA-256. Digests
//! are cached in `jobs/{id}/manifest.partial.json` and reused while a shard
//! keeps its size, so a request hashes only shards not seen before (those
//! still running at the end finish later and join the manifest).

use std::collections::{BTreeMap, HashSet};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use dig_common::job::{JobId, JobSpec, JobState};
use dig_model::structure::Ensemble;
use futures::{StreamExt, TryStreamExt};
use object_store::PutPayload;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use crate::openapi::{BinarySchema, ErrorBody, ManifestSchema};
use crate::{owned_job, pdb, ApiError, ApiResult, Shared, Tenant};

const PDB_TYPE: &str = "chemical/x-pdb";
/// XTC has no registered media type.
const XTC_TYPE: &str = "application/octet-stream";

/// The manifest of a finished job: its shards with their sample ranges,
/// sizes and SHA-256. Every shard of a succeeded job (`"complete": true`);
/// the finished shards of a failed or cancelled one (`"complete": false`).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results",
    tag = "results",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "The manifest", body = ManifestSchema),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
        (status = 409, description = "The job is not finished yet (code `not_finished`); its finished shards are at `/v1/jobs/{id}/results/{shard}`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_results(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    let manifest = match p.state {
        JobState::Succeeded => {
            let bytes = st
                .store
                .get(&st.layout.manifest(job))
                .await
                .map_err(ApiError::store)?
                .bytes()
                .await
                .map_err(ApiError::store)?;
            let mut m: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::internal(format!("job {job}: bad manifest: {e}")))?;
            m.insert("complete".into(), true.into());
            serde_json::Value::Object(m)
        }
        // A filtered job that fell short has the manifest of its valid
        // samples (`kept` per shard) beside its state marker.
        JobState::Failed if p.filter.is_some() => {
            match st.store.get(&st.layout.manifest(job)).await {
                Ok(object) => {
                    let bytes = object.bytes().await.map_err(ApiError::store)?;
                    let mut m: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_slice(&bytes).map_err(|e| {
                            ApiError::internal(format!("job {job}: bad manifest: {e}"))
                        })?;
                    m.insert("complete".into(), false.into());
                    serde_json::Value::Object(m)
                }
                Err(object_store::Error::NotFound { .. }) => {
                    serde_json::to_value(partial_manifest(&st, job).await?)
                        .map_err(ApiError::internal)?
                }
                Err(e) => return Err(ApiError::store(e)),
            }
        }
        JobState::Failed | JobState::Cancelled => {
            serde_json::to_value(partial_manifest(&st, job).await?).map_err(ApiError::internal)?
        }
        JobState::Queued | JobState::Running => {
            // 409, not 404: the job exists; its results do not yet.
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_finished",
                format!(
                    "job {job} is not finished yet; its finished shards are at \
                     /v1/jobs/{job}/results/{{shard}}"
                ),
            ));
        }
    };
    Ok(axum::Json(manifest).into_response())
}

/// One shard of a manifest (the coordinator's shape).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
struct ManifestEntry {
    index: u64,
    start: u64,
    end: u64,
    key: String,
    bytes: u64,
    sha256: String,
}

/// The manifest of a failed or cancelled job.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct PartialManifest {
    job: JobId,
    num_samples: u64,
    complete: bool,
    shards: Vec<ManifestEntry>,
}

/// The finished shards of `job` as the store lists them, with digests
/// (cached, see the module documentation).
async fn partial_manifest(st: &Shared, job: JobId) -> ApiResult<PartialManifest> {
    let spec = job_spec(st, job).await?;
    let num_shards = spec.num_shards();
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    let mut listing = st.store.list(Some(&st.layout.shards_dir(job)));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(ApiError::store)?;
        let index = meta
            .location
            .filename()
            .and_then(|f| f.strip_suffix(".npz"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|i| *i < num_shards && st.layout.shard(job, *i) == meta.location);
        if let Some(index) = index {
            stored.insert(index, meta.size);
        }
    }
    let cache_path = st.layout.partial_manifest(job);
    let cached: Option<PartialManifest> = match st.store.get(&cache_path).await {
        Ok(r) => match r.bytes().await {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let known: BTreeMap<u64, ManifestEntry> = cached
        .as_ref()
        .map(|m| m.shards.iter().map(|s| (s.index, s.clone())).collect())
        .unwrap_or_default();
    let mut shards = Vec::with_capacity(stored.len());
    for (&index, &size) in &stored {
        let entry = match known.get(&index) {
            Some(e) if e.bytes == size => e.clone(),
            _ => {
                let key = st.layout.shard(job, index);
                let (bytes, sha256) = match digest(st, &key).await {
                    Ok(d) => d,
                    // Listed a moment ago, gone now: not a finished shard.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(ApiError::store(e)),
                };
                let task = spec.shard(index);
                ManifestEntry {
                    index,
                    start: task.start,
                    end: task.end,
                    key: key.to_string(),
                    bytes,
                    sha256,
                }
            }
        };
        shards.push(entry);
    }
    let manifest = PartialManifest {
        job,
        num_samples: spec.num_samples,
        complete: false,
        shards,
    };
    if cached.as_ref() != Some(&manifest) {
        match serde_json::to_vec_pretty(&manifest) {
            Ok(json) => {
                if let Err(e) = st.store.put(&cache_path, PutPayload::from(json)).await {
                    // Only a cache: the next request hashes again.
                    tracing::warn!(%job, error = %e, "cannot cache the partial manifest");
                }
            }
            Err(e) => tracing::warn!(%job, error = %e, "cannot serialize the partial manifest"),
        }
    }
    Ok(manifest)
}

/// Size and SHA-256 of an object, streamed.
async fn digest(
    st: &Shared,
    key: &object_store::path::Path,
) -> Result<(u64, String), object_store::Error> {
    let mut body = st.store.get(key).await?.into_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Npz,
    Pdb,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ShardQuery {
    /// `npz` (default: the stored object) or `pdb` (converted).
    #[param(pattern = "^(npz|pdb)$")]
    format: Option<String>,
}

/// The shard index and format of `{shard}` (`3`, `3.npz`, `3.pdb`) and
/// `?format=`; they must agree.
fn shard_and_format(shard: &str, query: Option<&str>) -> ApiResult<(String, Format)> {
    let (number, suffix) = if let Some(n) = shard.strip_suffix(".pdb") {
        (n, Some(Format::Pdb))
    } else if let Some(n) = shard.strip_suffix(".npz") {
        (n, Some(Format::Npz))
    } else {
        (shard, None)
    };
    let asked = match query {
        None => None,
        Some("npz") => Some(Format::Npz),
        Some("pdb") => Some(Format::Pdb),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "format: must be npz or pdb, got '{other}'"
            )))
        }
    };
    let format = match (suffix, asked) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(format!(
                "shard '{shard}' and format={} disagree; give one of them",
                query.unwrap_or_default()
            )))
        }
        (a, b) => a.or(b).unwrap_or(Format::Npz),
    };
    Ok((number.to_string(), format))
}

/// The job's stored spec (sequence and shard plan).
async fn job_spec(st: &Shared, job: JobId) -> ApiResult<JobSpec> {
    let bytes = st
        .store
        .get(&st.layout.job_spec(job))
        .await
        .map_err(ApiError::store)?
        .bytes()
        .await
        .map_err(ApiError::store)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("job {job}: unreadable spec: {e}")))
}

fn unfit_for_pdb(message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "pdb_unavailable", message)
}

/// Shard `index` (its npz bytes) of `spec` as an ensemble, checked against
/// the shard's planned sample range.
fn shard_ensemble(spec: &JobSpec, index: u64, npz: &[u8]) -> Result<Ensemble, String> {
    let fail = |m: String| format!("shard {index} of job {}: {m}", spec.id);
    let ens = pdb::read_shard(npz, &spec.sequence).map_err(fail)?;
    let task = spec.shard(index);
    let planned: Vec<i64> = (task.start as i64..task.end as i64).collect();
    if ens.sample_index != planned {
        return Err(fail(format!(
            "holds samples {:?}..; the plan says {}..{}",
            ens.sample_index.first(),
            task.start,
            task.end
        )));
    }
    Ok(ens)
}

/// The PDB text of shard `index` (its npz bytes) of `spec`: numbered by
/// sample index, checked against the shard's planned sample range.
/// `whole_file`: remarks, models and `END`; else the models only.
fn convert_shard(
    spec: &JobSpec,
    index: u64,
    npz: &[u8],
    whole_file: bool,
    kept: Option<&[u64]>,
) -> Result<Vec<u8>, String> {
    let mut ens = shard_ensemble(spec, index, npz)?;
    if let Some(kept) = kept {
        ens = ens.select_indices(kept);
    }
    let out = if whole_file {
        pdb::shard_pdb(&ens)
    } else {
        pdb::models(&ens)
    };
    out.map_err(|e| format!("shard {index} of job {}: {e}", spec.id))
}

/// The XTC frames of shard `index` (its npz bytes) of `spec`, one per sample
/// that `kept` lists (every sample when `None`), as
/// `dig_model::xtc::XtcWriter` appends them: the job's frames are the
/// concatenation of its shards', byte for byte what `digctl sample` writes.
fn shard_xtc(
    spec: &JobSpec,
    index: u64,
    npz: &[u8],
    kept: Option<&[u64]>,
) -> Result<Vec<u8>, String> {
    let mut ens = shard_ensemble(spec, index, npz)?;
    if let Some(kept) = kept {
        ens = ens.select_indices(kept);
    }
    dig_model::xtc::xtc_bytes(&ens, None)
        .map_err(|e| format!("shard {index} of job {}: {e}", spec.id))
}

/// One finished shard: the stored npz, or the same samples as a
/// multi-model PDB (`MODEL` = sample index + 1).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results/{shard}",
    tag = "results",
    params(
        ("id" = String, Path, format = Uuid, description = "The job id"),
        ("shard" = String, Path, pattern = "^[0-9]{1,18}(\\.(npz|pdb))?$", description = "Shard index from 0, optionally with `.npz` or `.pdb`"),
        ShardQuery,
    ),
    responses(
        (status = 200, description = "The shard", content(
            (inline(BinarySchema) = "application/octet-stream"),
            (String = "chemical/x-pdb"),
        )),
        (status = 400, description = "Unknown format, or the suffix and format disagree", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant, no such shard, or the shard is not done yet", body = ErrorBody),
        (status = 422, description = "The shard does not fit a PDB file (more than 9999 models or residues, or unknown residues)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_shard(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, shard)): Path<(String, String)>,
    crate::JsonQuery(q): crate::JsonQuery<ShardQuery>,
) -> ApiResult<Response> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    let (number, format) = shard_and_format(&shard, q.format.as_deref())?;
    let index: u64 = number
        .parse()
        .ok()
        .filter(|i| *i < p.num_shards)
        .ok_or_else(|| ApiError::not_found(format!("job {job} has no shard {shard}")))?;
    let spec = match format {
        Format::Npz => None,
        Format::Pdb => {
            let spec = job_spec(&st, job).await?;
            let last = spec.shard(index).end.checked_sub(1);
            if let Some(m) = pdb::unfit_reason(&spec.sequence, last) {
                return Err(unfit_for_pdb(format!("shard {index} of job {job}: {m}")));
            }
            Some(spec)
        }
    };
    let result = match st.store.get(&st.layout.shard(job, index)).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ApiError::not_found(format!(
                "shard {index} of job {job} is not done yet"
            )))
        }
        Err(e) => return Err(ApiError::store(e)),
    };
    let Some(spec) = spec else {
        let size = result.meta.size;
        let stream = result.into_stream().map_err(std::io::Error::other);
        return Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, size.to_string()),
            ],
            Body::from_stream(stream),
        )
            .into_response());
    };
    let npz = result.bytes().await.map_err(ApiError::store)?;
    let text = tokio::task::spawn_blocking(move || convert_shard(&spec, index, &npz, true, None))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, PDB_TYPE.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{job}-{index:06}.pdb\""),
            ),
        ],
        text,
    )
        .into_response())
}

/// The whole ensemble of a succeeded job as one multi-model PDB: header
/// remarks, then the models of every shard in order (`MODEL` = sample index
/// + 1), then `END`. Streamed shard by shard; a shard that cannot be read
/// or converted mid-stream aborts the response (the body ends in an error).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results.pdb",
    tag = "results",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "Every sample of the job, in order", body = String, content_type = "chemical/x-pdb"),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet): code `not_succeeded`; the message gives its state", body = ErrorBody),
        (status = 422, description = "The job does not fit a PDB file (more than 9999 samples or residues, or unknown residues)", body = ErrorBody),
        (status = 500, description = "A shard of the job is missing from the object store (code `results_incomplete`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_results_pdb(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (spec, selection) = succeeded_job(&st, &tenant, &id).await?;
    let job = spec.id;
    let indices: Vec<u64> = selection.sample_indices(&spec);
    if let Some(m) = pdb::unfit_reason(&spec.sequence, indices.last().copied()) {
        return Err(unfit_for_pdb(format!(
            "job {job} has {} samples of {} residues: {m}",
            spec.num_samples,
            spec.sequence.chars().count()
        )));
    }
    check_shards_stored(&st, &spec, &selection).await?;
    let head = pdb::remarks(indices);
    let stream = shard_stream(
        st,
        spec,
        selection,
        head,
        pdb::end(),
        "results.pdb",
        |spec, i, npz, kept| convert_shard(spec, i, npz, false, kept),
    );
    Ok((
        [
            (header::CONTENT_TYPE, PDB_TYPE.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{job}.pdb\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The whole ensemble of a succeeded job as an XTC trajectory: one frame
/// per sample in order (N, CA, C, O per residue, nm, precision 0.001 nm,
/// step and time = sample index, no box), the atoms of `topology.pdb`.
/// Byte for byte the `samples.xtc` of `digctl sample` for the same inputs.
/// Streamed shard by shard; a shard that cannot be read or converted
/// mid-stream aborts the response (the body ends in an error).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results.xtc",
    tag = "results",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "Every sample of the job, in order, as XTC frames", content(
            (inline(BinarySchema) = "application/octet-stream"),
        )),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet): code `not_succeeded`; the message gives its state", body = ErrorBody),
        (status = 500, description = "A shard of the job is missing from the object store (code `results_incomplete`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_results_xtc(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (spec, selection) = succeeded_job(&st, &tenant, &id).await?;
    let job = spec.id;
    check_shards_stored(&st, &spec, &selection).await?;
    let stream = shard_stream(
        st,
        spec,
        selection,
        Vec::new(),
        Vec::new(),
        "results.xtc",
        shard_xtc,
    );
    Ok((
        [
            (header::CONTENT_TYPE, XTC_TYPE.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{job}.xtc\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The topology of `results.xtc`: one structure of N, CA, C, O per residue
/// (chain A, residues numbered from 1) at the coordinates of the job's
/// first sample, no `MODEL` or `CRYST1`; what MDTraj (`md.load(xtc,
/// top=pdb)`) and MDAnalysis (`Universe(pdb, xtc)`) take as topology.
/// Byte for byte the `topology.pdb` of `digctl sample`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/topology.pdb",
    tag = "results",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "The atoms of every frame of results.xtc", body = String, content_type = "chemical/x-pdb"),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet): code `not_succeeded`; the message gives its state", body = ErrorBody),
        (status = 422, description = "The protein does not fit a PDB file (more than 9999 residues, or unknown residues)", body = ErrorBody),
        (status = 500, description = "The job's first shard is missing from the object store (code `results_incomplete`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_topology_pdb(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (spec, selection) = succeeded_job(&st, &tenant, &id).await?;
    let job = spec.id;
    if let Some(m) = pdb::unfit_reason(&spec.sequence, None) {
        return Err(unfit_for_pdb(format!("job {job}: {m}")));
    }
    // The first sample of the result: of a filtered job, its first kept one.
    let (shard, first) = match &selection.0 {
        None => (0, 0),
        Some(kept) => kept
            .iter()
            .find_map(|(&i, k)| k.first().map(|&j| (i, j)))
            .ok_or_else(|| {
                ApiError::internal(format!("job {job}: its manifest keeps no sample"))
            })?,
    };
    let npz = match st.store.get(&st.layout.shard(job, shard)).await {
        Ok(r) => r.bytes().await.map_err(ApiError::store)?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(results_incomplete(job, shard));
        }
        Err(e) => return Err(ApiError::store(e)),
    };
    let text = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let ens = shard_ensemble(&spec, shard, &npz)?;
        let pos = ens
            .sample_index
            .iter()
            .position(|&j| j as u64 == first.max(spec.shard(shard).start))
            .unwrap_or(0);
        let mut out = Vec::new();
        ens.write_topology_pdb(pos, &mut out)
            .map_err(|e| format!("shard {shard} of job {job}: {e}"))?;
        Ok(out)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, PDB_TYPE.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{job}-topology.pdb\""),
            ),
        ],
        text,
    )
        .into_response())
}

/// Which shards and samples make a job's result: every sample of every
/// shard, or for a filtered job the manifest's shards and kept indices.
struct Selection(Option<BTreeMap<u64, Vec<u64>>>);

impl Selection {
    fn shards(&self, spec: &JobSpec) -> Vec<u64> {
        match &self.0 {
            None => (0..spec.num_shards()).collect(),
            Some(kept) => kept.keys().copied().collect(),
        }
    }

    fn kept(&self, shard: u64) -> Option<Vec<u64>> {
        self.0
            .as_ref()
            .map(|k| k.get(&shard).cloned().unwrap_or_default())
    }

    /// The result's sample indices, in order.
    fn sample_indices(&self, spec: &JobSpec) -> Vec<u64> {
        match &self.0 {
            None => (0..spec.num_samples).collect(),
            Some(kept) => kept.values().flatten().copied().collect(),
        }
    }
}

/// The spec of `id` if it is a job of `tenant` that has succeeded, and the
/// selection its result is; 404 for no job of `tenant`, 409 for a job that
/// has not succeeded.
async fn succeeded_job(st: &Shared, tenant: &str, id: &str) -> ApiResult<(JobSpec, Selection)> {
    let (job, p) = owned_job(st, tenant, id).await?;
    if p.state != JobState::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_succeeded",
            format!(
                "job {job} has not succeeded (it is {})",
                format!("{:?}", p.state).to_lowercase()
            ),
        ));
    }
    let spec = job_spec(st, job).await?;
    if spec.filter.is_none() {
        return Ok((spec, Selection(None)));
    }
    #[derive(Deserialize)]
    struct Kept {
        index: u64,
        #[serde(default)]
        kept: Vec<u64>,
    }
    #[derive(Deserialize)]
    struct KeptManifest {
        shards: Vec<Kept>,
    }
    let bytes = st
        .store
        .get(&st.layout.manifest(job))
        .await
        .map_err(ApiError::store)?
        .bytes()
        .await
        .map_err(ApiError::store)?;
    let m: KeptManifest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("job {job}: bad manifest: {e}")))?;
    let kept = m.shards.into_iter().map(|s| (s.index, s.kept)).collect();
    Ok((spec, Selection(Some(kept))))
}

fn results_incomplete(job: JobId, shard: u64) -> ApiError {
    tracing::error!(%job, shard, "succeeded job lacks a shard");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "results_incomplete",
        format!("shard {shard} of job {job} is missing from the object store"),
    )
}

/// Every shard of `spec` is in the store: checked before the first byte of
/// a whole-job download, while an error can still be a status.
async fn check_shards_stored(st: &Shared, spec: &JobSpec, selection: &Selection) -> ApiResult<()> {
    let job = spec.id;
    let stored: HashSet<String> = st
        .store
        .list(Some(&st.layout.shards_dir(job)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .map_err(ApiError::store)?;
    match selection
        .shards(spec)
        .into_iter()
        .find(|i| !stored.contains(st.layout.shard(job, *i).as_ref()))
    {
        Some(missing) => Err(results_incomplete(job, missing)),
        None => Ok(()),
    }
}

/// Converts shard `index` (its npz bytes) of a job to the bytes it
/// contributes to a whole-job download.
/// With a filter, only the kept sample indices (the last argument).
type ConvertShard = fn(&JobSpec, u64, &[u8], Option<&[u64]>) -> Result<Vec<u8>, String>;

/// What a whole-job download sends next.
enum Next {
    Head,
    Shard(u64),
    Tail,
    Done,
}

/// `head`, then each shard of `spec` in order fetched from the store and
/// converted by `convert` (on the blocking pool; one shard in memory at a
/// time), then `tail`. A shard that cannot be fetched or converted ends the
/// stream in an error (logged with `what`).
fn shard_stream(
    st: Shared,
    spec: JobSpec,
    selection: Selection,
    head: Vec<u8>,
    tail: Vec<u8>,
    what: &'static str,
    convert: ConvertShard,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let shards = std::sync::Arc::new(selection.shards(&spec));
    let selection = std::sync::Arc::new(selection);
    let spec = std::sync::Arc::new(spec);
    // `Next::Shard(k)`: the k-th shard of the selection.
    let count = shards.len() as u64;
    let after = move |k: u64| {
        if k < count {
            Next::Shard(k)
        } else {
            Next::Tail
        }
    };
    futures::stream::unfold(Next::Head, move |next| {
        let (st, spec, head, tail) = (st.clone(), spec.clone(), head.clone(), tail.clone());
        let (shards, selection) = (shards.clone(), selection.clone());
        async move {
            let (chunk, next) = match next {
                Next::Done => return None,
                Next::Head => (Ok(head), after(0)),
                Next::Tail => (Ok(tail), Next::Done),
                Next::Shard(k) => match shard_bytes(
                    &st,
                    &spec,
                    shards[k as usize],
                    selection.kept(shards[k as usize]),
                    convert,
                )
                .await
                {
                    Ok(bytes) => (Ok(bytes), after(k + 1)),
                    Err(e) => {
                        tracing::error!(job = %spec.id, error = %e, "{what} aborted");
                        (Err(std::io::Error::other(e)), Next::Done)
                    }
                },
            };
            Some((chunk.map(Bytes::from), next))
        }
    })
    // Empty chunks (an XTC has no head or tail) are not sent.
    .try_filter(|b| futures::future::ready(!b.is_empty()))
}

/// Fetches shard `index` and converts it with `convert`.
async fn shard_bytes(
    st: &Shared,
    spec: &std::sync::Arc<JobSpec>,
    index: u64,
    kept: Option<Vec<u64>>,
    convert: ConvertShard,
) -> Result<Vec<u8>, String> {
    let npz = st
        .store
        .get(&st.layout.shard(spec.id, index))
        .await
        .map_err(|e| e.to_string())?
        .bytes()
        .await
        .map_err(|e| e.to_string())?;
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || convert(&spec, index, &npz, kept.as_deref()))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_and_formats() {
        let ok = |s: &str, q: Option<&str>| shard_and_format(s, q).unwrap();
        assert_eq!(ok("3", None), ("3".into(), Format::Npz));
        assert_eq!(ok("3.npz", None), ("3".into(), Format::Npz));
        assert_eq!(ok("3.pdb", None), ("3".into(), Format::Pdb));
        assert_eq!(ok("3", Some("pdb")), ("3".into(), Format::Pdb));
        assert_eq!(ok("3.pdb", Some("pdb")), ("3".into(), Format::Pdb));
        assert!(shard_and_format("3.pdb", Some("npz")).is_err());
        let e = shard_and_format("3", Some("cif")).unwrap_err();
        assert!(e.message.contains("npz or pdb"), "{}", e.message);
    }
}
