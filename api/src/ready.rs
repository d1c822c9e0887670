//! `GET /readyz`: whether the service's dependencies answer.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dig_common::job::JobId;
use serde::Serialize;
use utoipa::ToSchema;

use crate::openapi::ErrorDetail;
use crate::Shared;

/// Each dependency: `"ok"`, or why it is not.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReadyChecks {
    /// The broker (RabbitMQ): the shard queue's depth.
    queue: String,
    /// The progress store (Redis): a job read.
    progress: String,
    /// The object store (S3): a metadata request.
    store: String,
}

/// The readiness answer; `error` only when not ready.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ready` or `unavailable`.
    status: String,
    checks: ReadyChecks,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
}

/// `f`'s outcome within `limit`, as `"ok"` or a message.
async fn check(limit: Duration, f: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

/// Readiness: the broker, the progress store and the object store each
/// answer within the configured timeout (3 s by default), checked at once.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness,
         example = json!({"status": "ready", "checks": {"queue": "ok", "progress": "ok", "store": "ok"}})),
        (status = 503, description = "A dependency failed or did not answer in time; its check and `error.message` say why", body = Readiness),
    )
)]
pub(crate) async fn readyz(State(st): State<Shared>) -> Response {
    let limit = st.limits.ready_timeout;
    // Any id does: an unknown job is an answer too.
    let probe: JobId = "00000000-0000-0000-0000-000000000000"
        .parse()
        .expect("a valid UUID");
    let model_config = st
        .layout
        .model_file(&st.limits.default_model, "config.json");
    let (queue, progress, store) = tokio::join!(
        check(limit, async {
            st.queue
                .shard_queue_depth()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }),
        check(limit, async {
            st.progress
                .get(probe)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }),
        check(limit, async {
            match st.store.head(&model_config).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }),
    );
    let failures: Vec<String> = [
        ("queue", &queue),
        ("progress", &progress),
        ("store", &store),
    ]
    .into_iter()
    .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
    .collect();
    let text = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".into());
    let checks = ReadyChecks {
        queue: text(queue),
        progress: text(progress),
        store: text(store),
    };
    if failures.is_empty() {
        let body = Readiness {
            status: "ready".into(),
            checks,
            error: None,
        };
        return (StatusCode::OK, Json(body)).into_response();
    }
    let message = format!("not ready: {}", failures.join("; "));
    tracing::warn!(%message, "readiness check failed");
    let body = Readiness {
        status: "unavailable".into(),
        checks,
        error: Some(ErrorDetail {
            code: "not_ready".into(),
            message,
        }),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
