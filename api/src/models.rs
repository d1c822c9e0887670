//! `GET /v1/models`: the model directories of the object store.

use axum::extract::State;
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use utoipa::ToSchema;

use crate::openapi::ErrorBody;
use crate::{ApiError, ApiResult, Shared, Tenant};

/// A model: `models/{id}/config.json` and `models/{id}/model.safetensors`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ModelInfo {
    /// The name jobs give as `model`.
    id: String,
    /// `config.json`, parsed (null if it is not valid JSON).
    #[schema(value_type = Object)]
    config: serde_json::Value,
    /// Size of `model.safetensors` in bytes; null if the weights are missing.
    bytes: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ModelList {
    /// Sorted by id.
    models: Vec<ModelInfo>,
}

/// The models jobs can use: every model directory with a `config.json`.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses(
        (status = 200, description = "The models, sorted by id", body = ModelList),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_models(
    State(st): State<Shared>,
    Tenant(_): Tenant,
) -> ApiResult<Json<ModelList>> {
    // `models/` itself: the model directory of the empty name.
    let dir = st.layout.model_dir("");
    let listing = st
        .store
        .list_with_delimiter(Some(&dir))
        .await
        .map_err(ApiError::store)?;
    let ids: Vec<String> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    let found: Vec<Option<ModelInfo>> = futures::stream::iter(ids)
        .map(|id| model_info(&st, id))
        .buffered(8)
        .try_collect()
        .await?;
    let mut models: Vec<ModelInfo> = found.into_iter().flatten().collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(ModelList { models }))
}

/// The model `id`, or `None` when its directory has no `config.json`.
async fn model_info(st: &Shared, id: String) -> ApiResult<Option<ModelInfo>> {
    let config = match st
        .store
        .get(&st.layout.model_file(&id, "config.json"))
        .await
    {
        Ok(r) => r.bytes().await.map_err(ApiError::store)?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(ApiError::internal(e)),
    };
    let config = serde_json::from_slice(&config).unwrap_or_else(|e| {
        tracing::warn!(model = %id, error = %e, "config.json is not valid JSON");
        serde_json::Value::Null
    });
    let bytes = match st
        .store
        .head(&st.layout.model_file(&id, "model.safetensors"))
        .await
    {
        Ok(m) => Some(m.size),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(ApiError::store(e)),
    };
    Ok(Some(ModelInfo { id, config, bytes }))
}
