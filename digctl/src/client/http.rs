//! The HTTP layer of the client commands: one authenticated [`Api`] per
//! command, the API's error envelope as [`ApiError`], unreachable servers and
//! broken connections as [`TransportError`], and the JSON shapes the
//! commands read.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dig_common::job::{JobId, JobState, Priority};
use reqwest::header::HeaderValue;
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Time allowed to open a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence on an open connection; big transfers have no total limit,
/// but a stalled one fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Total time for a small JSON request and its answer.
pub const JSON_TIMEOUT: Duration = Duration::from_secs(60);

/// An error answer of the API: `{"error": {"code", "message"}}` with a 4xx or
/// 5xx status, or whatever a proxy answered instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// The API's machine-readable code (`not_found`, `invalid_request`, ...);
    /// `None` when the answer was not the API's JSON envelope.
    pub code: Option<String>,
    pub message: String,
    /// A refused batch's invalid entries: `(index, message)`.
    pub entries: Vec<(u64, String)>,
}

impl ApiError {
    /// Reads an error answer's body; bodies that are not the API's envelope
    /// (a proxy's HTML page, plain text, nothing) still give a message.
    pub fn from_body(status: StatusCode, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Envelope {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            code: Option<String>,
            message: Option<String>,
            #[serde(default)]
            entries: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            index: u64,
            message: String,
        }
        let mut entries = Vec::new();
        let reason = status.canonical_reason().unwrap_or("request failed");
        let (code, mut message) = match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope { error }) => (
                {
                    entries = error
                        .entries
                        .into_iter()
                        .map(|e| (e.index, e.message))
                        .collect();
                    error.code.filter(|c| !c.is_empty())
                },
                error
                    .message
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or_else(|| reason.to_string()),
            ),
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let first = text.lines().next().unwrap_or("").trim();
                let message = if first.is_empty() || first.starts_with('<') {
                    reason.to_string()
                } else {
                    truncate(first, 200)
                };
                (None, message)
            }
        };
        if status == StatusCode::UNAUTHORIZED {
            message.push_str("; check --api-key or DIG_API_KEY");
        }
        ApiError {
            status: status.as_u16(),
            code,
            message,
            entries,
        }
    }

    /// Worth retrying: the server is overloaded, restarting or behind a
    /// proxy that lost it for a moment.
    pub fn is_transient(&self) -> bool {
        matches!(self.status, 429 | 500 | 502 | 503 | 504)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} (HTTP {} {code})", self.message, self.status)?,
            None => write!(f, "{} (HTTP {})", self.message, self.status)?,
        }
        for (index, message) in &self.entries {
            write!(f, "\n  entry {index}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// No connection: refused, unknown host, TLS failure, connect timeout.
    Connect,
    /// A connection went silent for longer than the read or total timeout.
    Timeout,
    /// Anything else on the wire (reset connection, broken body).
    Other,
}

/// A request that got no HTTP answer.
#[derive(Debug, Clone)]
pub struct TransportError {
    pub kind: TransportKind,
    /// The API base URL (`--api`).
    pub base: String,
    /// The URL of the failed request.
    pub url: String,
    /// The innermost cause, e.g. "Connection refused (os error 111)".
    pub cause: String,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TransportKind::Connect => write!(
                f,
                "cannot reach the dig-cluster API at {} ({}); check --api or DIG_API_URL",
                self.base, self.cause
            ),
            TransportKind::Timeout => {
                write!(f, "request to {} timed out ({})", self.url, self.cause)
            }
            TransportKind::Other => write!(f, "request to {} failed: {}", self.url, self.cause),
        }
    }
}

impl std::error::Error for TransportError {}

/// The innermost message of an error's source chain.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether a command may try again after `e`: the server could not be
/// reached or answered with an overload or gateway status.
pub fn is_transient(e: &anyhow::Error) -> bool {
    if let Some(api) = e.downcast_ref::<ApiError>() {
        return api.is_transient();
    }
    e.downcast_ref::<TransportError>().is_some()
}

/// A successful JSON answer: its status (201 vs 200 matters for uploads and
/// idempotent submissions) and body, kept raw for `--json`.
pub struct Answer {
    pub status: StatusCode,
    pub json: Value,
}

impl Answer {
    /// The body as `T`; `what` names the answer in the error.
    pub fn parse<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        T::deserialize(&self.json)
            .with_context(|| format!("unexpected answer for {what}: {}", self.json))
    }
}

/// An authenticated client of one dig-cluster API.
pub struct Api {
    client: Client,
    base: Url,
    key: String,
}

impl Api {
    /// `base` is the API's URL (a path prefix is kept: `https://host/dig/`),
    /// `key` a tenant's bearer key.
    pub fn new(base: &str, key: String) -> Result<Self> {
        let mut url = Url::parse(base.trim()).with_context(|| {
            format!("--api {base:?} is not a URL (expected e.g. http://127.0.0.1:8080)")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            bail!("--api {base:?} must be an http:// or https:// URL");
        }
        url.set_query(None);
        url.set_fragment(None);
        HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key contains characters that cannot be sent in a header")?;
        let client = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("digctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Api {
            client,
            base: url,
            key,
        })
    }

    /// The URL of `segments` under the base, each segment percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in Api::new: the base URL can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// A request with the bearer key.
    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.client.request(method, url).bearer_auth(&self.key)
    }

    /// Sends a request built by [`Api::request`]; an error answer becomes an
    /// [`ApiError`], no answer a [`TransportError`].
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let request = request.build().context("cannot build the request")?;
        let url = request.url().clone();
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| self.transport(&url, e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(ApiError::from_body(status, &body).into())
    }

    /// Describes a failure of a request (or of reading its body) to `url`.
    pub fn transport(&self, url: &Url, e: reqwest::Error) -> anyhow::Error {
        let kind = if e.is_connect() {
            TransportKind::Connect
        } else if e.is_timeout() {
            TransportKind::Timeout
        } else {
            TransportKind::Other
        };
        TransportError {
            kind,
            base: self.base.to_string(),
            url: url.to_string(),
            cause: root_cause(&e),
        }
        .into()
    }

    async fn json_answer(&self, url: Url, request: RequestBuilder) -> Result<Answer> {
        let response = self.send(request.timeout(JSON_TIMEOUT)).await?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport(&url, e))?;
        let json = serde_json::from_slice(&body).with_context(|| {
            format!(
                "the answer of {url} is not JSON; is {} a dig-cluster API?",
                self.base
            )
        })?;
        Ok(Answer { status, json })
    }

    /// `GET` a JSON resource.
    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Answer> {
        let url = self.url(segments);
        let request = self.request(Method::GET, url.clone()).query(query);
        self.json_answer(url, request).await
    }

    /// `POST` a JSON body (or none) and read a JSON answer.
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        segments: &[&str],
        body: Option<&B>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer> {
        let url = self.url(segments);
        let mut request = self.request(Method::POST, url.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.json_answer(url, request).await
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, job: JobId) -> Result<(JobView, Answer)> {
        let answer = self.get(&["v1", "jobs", &job.to_string()], &[]).await?;
        let view = answer.parse("the job's status")?;
        Ok((view, answer))
    }
}

// ---------------------------------------------------------------- shapes

/// `POST /v1/jobs` body.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub sequence: String,
    pub features_sha256: String,
    pub num_samples: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_draw_factor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<serde_json::Value>,
    /// Each returned sample's log-density (`log_density: true`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub log_density: bool,
    /// Partial diffusion: uploaded structures' SHA-256 and the start time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_structure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_time: Option<f64>,
    /// The probability flow above this time (`flow_above`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_above: Option<f64>,
}

/// `POST /v1/jobs` answer (202, or the full view on an idempotent replay).
#[derive(Debug, Clone, Deserialize)]
pub struct Submitted {
    pub id: JobId,
    pub state: JobState,
}

/// Shard counters of a job view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct ShardCounts {
    #[serde(default)]
    pub done: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub total: u64,
}

/// `GET /v1/jobs/{id}` answer. Fields a server may not send yet default.
#[derive(Debug, Clone, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub state: JobState,
    #[serde(default)]
    pub num_samples: u64,
    #[serde(default)]
    pub samples_done: u64,
    #[serde(default)]
    pub shards: ShardCounts,
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub samples_per_sec: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// Present for jobs submitted with a `callback_url`.
    #[serde(default)]
    pub webhook: Option<WebhookView>,
}

/// The `webhook` of a job view.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookView {
    pub url: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    #[serde(default)]
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// `GET /v1/jobs` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    pub next_cursor: Option<String>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    /// The model's `config.json`, if the server sends it.
    #[serde(default)]
    pub config: Option<Value>,
    pub bytes: Option<u64>,
}

/// `GET /v1/models` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_formats_message_status_and_code() {
        let body = br#"{"error":{"code":"not_found","message":"job 42 not found"}}"#;
        let e = ApiError::from_body(StatusCode::NOT_FOUND, body);
        assert_eq!(e.to_string(), "job 42 not found (HTTP 404 not_found)");
        assert!(!e.is_transient());
        let e = ApiError::from_body(
            StatusCode::CONFLICT,
            br#"{"error":{"code":"conflict","message":"job already finished"}}"#,
        );
        assert_eq!(e.to_string(), "job already finished (HTTP 409 conflict)");
    }

    #[test]
    fn unauthorized_points_at_the_key_options() {
        let body = br#"{"error":{"code":"unauthorized","message":"missing or unknown API key"}}"#;
        let e = ApiError::from_body(StatusCode::UNAUTHORIZED, body);
        assert_eq!(
            e.to_string(),
            "missing or unknown API key; check --api-key or DIG_API_KEY (HTTP 401 unauthorized)"
        );
    }

    #[test]
    fn non_envelope_bodies_still_give_a_message() {
        let e = ApiError::from_body(
            StatusCode::BAD_GATEWAY,
            b"<html><body>502 Bad Gateway</body></html>",
        );
        assert_eq!(e.to_string(), "Bad Gateway (HTTP 502)");
        assert!(e.is_transient());
        let e = ApiError::from_body(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(e.to_string(), "Service Unavailable (HTTP 503)");
        let e = ApiError::from_body(StatusCode::BAD_REQUEST, b"bad thing\nmore");
        assert_eq!(e.to_string(), "bad thing (HTTP 400)");
        let long = "x".repeat(300);
        let e = ApiError::from_body(StatusCode::BAD_REQUEST, long.as_bytes());
        assert_eq!(e.message.len(), 203);
        // An envelope without a message falls back to the status reason.
        let e = ApiError::from_body(StatusCode::NOT_FOUND, br#"{"error":{"code":"x"}}"#);
        assert_eq!(e.to_string(), "Not Found (HTTP 404 x)");
    }

    #[test]
    fn transient_errors_are_recognised_through_anyhow() {
        let e: anyhow::Error = ApiError::from_body(StatusCode::SERVICE_UNAVAILABLE, b"").into();
        assert!(is_transient(&e));
        let e: anyhow::Error = ApiError::from_body(StatusCode::NOT_FOUND, b"").into();
        assert!(!is_transient(&e));
        let e: anyhow::Error = TransportError {
            kind: TransportKind::Connect,
            base: "http://127.0.0.1:1/".into(),
            url: "http://127.0.0.1:1/v1/jobs".into(),
            cause: "Connection refused (os error 111)".into(),
        }
        .into();
        assert!(is_transient(&e));
        assert_eq!(
            e.to_string(),
            "cannot reach the dig-cluster API at http://127.0.0.1:1/ \
             (Connection refused (os error 111)); check --api or DIG_API_URL"
        );
        assert!(!is_transient(&anyhow::anyhow!("other")));
    }

    #[test]
    fn urls_keep_a_base_path_and_encode_segments() {
        let api = Api::new("http://example.org:8080", "k".into()).unwrap();
        assert_eq!(
            api.url(&["v1", "jobs"]).as_str(),
            "http://example.org:8080/v1/jobs"
        );
        let api = Api::new("https://example.org/dig/?x=1", "k".into()).unwrap();
        assert_eq!(
            api.url(&["v1", "jobs", "a/b", "results.pdb"]).as_str(),
            "https://example.org/dig/v1/jobs/a%2Fb/results.pdb"
        );
        assert!(Api::new("example.org", "k".into()).is_err());
        assert!(Api::new("ftp://example.org", "k".into()).is_err());
        assert!(Api::new("http://example.org", "bad\nkey".into()).is_err());
    }

    #[test]
    fn job_views_parse_with_and_without_optional_fields() {
        let id = JobId::new();
        let full = serde_json::json!({
            "id": id, "state": "running", "num_samples": 100, "samples_done": 40,
            "shards": {"done": 2, "failed": 0, "total": 5}, "error": null,
            "created_at": 1_700_000_000u64, "started_at": 1_700_000_010u64,
            "finished_at": null, "samples_per_sec": 2.5, "eta_seconds": 24.0,
            "links": {"self": "/v1/jobs/x"}
        });
        let v: JobView = serde_json::from_value(full).unwrap();
        assert_eq!(v.id, id);
        assert_eq!(v.state, JobState::Running);
        assert_eq!(v.shards.total, 5);
        assert_eq!(v.eta_seconds, Some(24.0));
        let lean = serde_json::json!({"id": id, "state": "queued"});
        let v: JobView = serde_json::from_value(lean).unwrap();
        assert_eq!(v.num_samples, 0);
        assert_eq!(v.samples_per_sec, None);
        assert!(v.webhook.is_none());
        let hooked = serde_json::json!({"id": id, "state": "succeeded", "webhook": {
            "url": "https://x.org/h", "state": "delivered", "attempts": 2, "last_error": "HTTP 500"}});
        let v: JobView = serde_json::from_value(hooked).unwrap();
        let w = v.webhook.unwrap();
        assert_eq!((w.state.as_str(), w.attempts), ("delivered", 2));
    }

    #[test]
    fn submit_requests_leave_out_unset_fields() {
        let req = SubmitRequest {
            name: None,
            sequence: "ACD".into(),
            features_sha256: "ab".repeat(32),
            num_samples: 3,
            seed: Some(7),
            steps: None,
            model: None,
            priority: Some(Priority::Bulk),
            shard_size: None,
            callback_url: None,
            solver: None,
            filter: None,
            max_draw_factor: None,
            steering: None,
            log_density: false,
            from_structure: None,
            from_time: None,
            flow_above: None,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "sequence": "ACD", "features_sha256": "ab".repeat(32),
                "num_samples": 3, "seed": 7, "priority": "bulk"
            })
        );
    }
}
