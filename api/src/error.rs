//! The API's errors: `{"error": {"code": "...", "message": "..."}}` with a
//! status. Internal failures answer a generic message; the detail is logged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dig_common::CommonError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
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
}

impl From<CommonError> for ApiError {
    fn from(e: CommonError) -> Self {
        match e {
            CommonError::Invalid(m) => ApiError::invalid(m),
            CommonError::NotFound(m) => ApiError::not_found(format!("not found: {m}")),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code, "message": self.message}
        });
        (self.status, Json(body)).into_response()
    }
}
