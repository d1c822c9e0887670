//! Uploaded structures: the starting points of partial-diffusion jobs
//! (`from_structure`). A PDB file, one structure or several (MODEL records),
//! is checked the way `digctl sample --from-structure` reads it (backbone N,
//! CA and C of every residue, frames that can be built), stored once under
//! the SHA-256 of its bytes (`structures/{sha256}.pdb`), and marked as the
//! tenant's (`tenants/{tenant}/structures/{sha256}.json`), like features.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::openapi::{BinarySchema, ErrorBody};
use crate::{ApiError, ApiResult, ApiState, Shared, Tenant};
use dig_common::store::check_sha256;

/// Largest accepted structure file: a few thousand models of a large
/// protein's backbone.
pub(crate) const MAX_STRUCTURE_BYTES: usize = 64 << 20;

/// Uploaded structures.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = StructureRef)]
pub(crate) struct StructureRef {
    /// SHA-256 of the file, 64 lowercase hex digits: the `from_structure` of jobs.
    #[schema(min_length = 64, max_length = 64, pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    /// Residues per structure.
    pub residues: u64,
    /// Structures (models) in the file.
    pub structures: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// The tenant's marker: what the file holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct StructureMarker {
    pub residues: u64,
    pub structures: u64,
}

/// Uploads structures to start partial-diffusion jobs from: a PDB file
/// (one structure, or several as MODEL records) with the backbone atoms N,
/// CA and C of every residue.
#[utoipa::path(
    post,
    path = "/v1/structures",
    tag = "structures",
    request_body(content = inline(BinarySchema), content_type = "application/octet-stream", description = "A PDB file"),
    responses(
        (status = 201, description = "Stored (new for this tenant)", body = StructureRef),
        (status = 200, description = "This tenant had uploaded the same bytes before", body = StructureRef),
        (status = 400, description = "Not a structure the sampler can start from; the message says why", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "Larger than 64 MiB", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn upload_structures(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("structures exceed the limit of {MAX_STRUCTURE_BYTES} bytes"),
            )
        } else {
            ApiError::new(r.status(), "invalid_body", r.body_text())
        }
    })?;
    let data = body.clone();
    let (residues, structures) = tokio::task::spawn_blocking(move || check_structures(&data))
        .await
        .map_err(ApiError::internal)??;
    let sha256 = hex::encode(Sha256::digest(&body));
    let bytes = body.len() as u64;
    match st
        .store
        .put_opts(
            &st.layout.structure(&sha256),
            PutPayload::from(body),
            PutMode::Create.into(),
        )
        .await
    {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(ApiError::store(e)),
    }
    let marker = serde_json::to_vec(&StructureMarker {
        residues,
        structures,
    })
    .map_err(ApiError::internal)?;
    let status = match st
        .store
        .put_opts(
            &st.layout.tenant_structures(&tenant, &sha256),
            PutPayload::from(marker),
            PutMode::Create.into(),
        )
        .await
    {
        Ok(_) => StatusCode::CREATED,
        Err(object_store::Error::AlreadyExists { .. }) => StatusCode::OK,
        Err(e) => return Err(ApiError::store(e)),
    };
    tracing::info!(%tenant, %sha256, residues, structures, "stored structures");
    Ok((
        status,
        Json(StructureRef {
            sha256,
            residues,
            structures,
            bytes,
        }),
    )
        .into_response())
}

/// `(residues, structures)` of a PDB upload, or a 400 saying why the
/// sampler cannot start from it.
fn check_structures(bytes: &[u8]) -> ApiResult<(u64, u64)> {
    let name = std::path::Path::new("the upload");
    let bad = |e: dig_model::ModelError| {
        ApiError::invalid(format!("not a structure file (PDB expected): {e}"))
    };
    let traj = dig_model::backbone::read_pdb_bytes(bytes, name).map_err(bad)?;
    let len = traj.len_residues();
    let (_, _, m) = dig_model::backbone::poses_of(&traj, name, len).map_err(bad)?;
    Ok((len as u64, m as u64))
}

/// What `tenant` uploaded as structures `sha`; 404 otherwise.
pub(crate) async fn owned_structures(
    st: &ApiState,
    tenant: &str,
    sha: &str,
) -> ApiResult<StructureMarker> {
    check_sha256(sha).map_err(|e| ApiError::invalid(format!("from_structure: {e}")))?;
    let path = st.layout.tenant_structures(tenant, sha);
    let bytes = match st.store.get(&path).await {
        Ok(r) => r.bytes().await.map_err(ApiError::store)?,
        Err(object_store::Error::NotFound { .. }) => {
            let message = format!(
                "from_structure: structures {sha} not found; upload them with POST /v1/structures"
            );
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "structures_not_found",
                message,
            ));
        }
        Err(e) => return Err(ApiError::store(e)),
    };
    serde_json::from_slice(&bytes).map_err(ApiError::internal)
}
