//! Request metrics (`dig_api_requests_total`, `dig_api_request_duration_seconds`,
//! see `dig_common::metrics`): a middleware around every route, labelling a
//! request by its route template (`/v1/jobs/{id}`), never its raw path, so
//! that the number of series stays bounded. Requests no route matches are
//! `route="unmatched"`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

/// The middleware: times the request to its response head and counts it.
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // Standard methods only: a client cannot mint series with made-up ones.
    let method = match *request.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS
        | Method::PATCH => request.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let m = dig_common::metrics::api();
    m.request_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn count(route: &str, method: &str, status: &str) -> u64 {
        dig_common::metrics::api()
            .requests
            .with_label_values(&[route, method, status])
            .get()
    }

    #[tokio::test]
    async fn requests_are_labelled_by_route_template_not_path() {
        let app = Router::new()
            .route("/metrics-test/{id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(track));
        let before = count("/metrics-test/{id}", "GET", "200");
        let unmatched = count("unmatched", "GET", "404");
        for path in ["/metrics-test/a", "/metrics-test/b", "/nowhere/c"] {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            app.clone().oneshot(request).await.unwrap();
        }
        assert_eq!(count("/metrics-test/{id}", "GET", "200"), before + 2);
        assert_eq!(count("unmatched", "GET", "404"), unmatched + 1);
        let text = dig_common::metrics::encode_text();
        assert!(!text.contains("/metrics-test/a"), "{text}");
        assert!(
            text.contains(
                r#"dig_api_request_duration_seconds_count{method="GET",route="/metrics-test/{id}"}"#
            ),
            "{text}"
        );
    }
}
