//! The API's errors: `{"error": {"code": "...", "message": "..."}}` with a
//! status. Internal failures answer a generic message; the detail is logged.
//! A server behind the API that is down or unreachable for the moment
//! (Redis, RabbitMQ, the object store) answers 503 `unavailable` naming it,
//! with `Retry-After`: the request may be sent again as it is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dig_common::CommonError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

/// `Retry-After` of a 503 `unavailable`: reconnections take seconds.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 400: the request cannot be used as it is; the message says why.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key (send 'Authorization: Bearer KEY')",
        )
    }
    /// 500 with a generic message; `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; try again later",
        )
    }

    /// 503 for a server that is down or unreachable for now (`server`
    /// names it); `detail` goes to the log only.
    pub fn unavailable(server: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "{server} is unavailable");
        ApiError {
            retry_after: Some(UNAVAILABLE_RETRY_AFTER_SECS),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{server} is unavailable; try again later"),
            )
        }
    }

    /// An object-store failure: 503 when the store is unreachable or
    /// failing for now, 500 otherwise.
    pub fn store(e: object_store::Error) -> Self {
        CommonError::Store(e).into()
    }
}

impl From<CommonError> for ApiError {
    fn from(e: CommonError) -> Self {
        if let Some(server) = e.unavailable() {
            return ApiError::unavailable(server, e);
        }
        match e {
            CommonError::Invalid(m) => ApiError::invalid(m),
            CommonError::NotFound(m) => ApiError::not_found(format!("not found: {m}")),
            other => ApiError::internal(other),
        }
    }
}

impl From<object_store::Error> for ApiError {
    fn from(e: object_store::Error) -> Self {
        ApiError::store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code, "message": self.message}
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}
