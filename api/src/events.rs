//! `GET /v1/jobs/{id}/events`: a job's progress as Server-Sent Events.
//!
//! The server reads the job every [`Limits::events_poll`](crate::Limits)
//! (500 ms) and sends only what changed:
//!
//! | event | data | when |
//! |---|---|---|
//! | `progress` | the job view (as `GET /v1/jobs/{id}`) | first, then whenever the state, `samples_done` or a shard count changes |
//! | `state` | `{"id", "state", "previous"}` | first (`previous` null), then on each state change |
//! | `end` | the final job view | once the job is final; the server then closes the stream |
//! | `error` | `{"error": {"code", "message"}}` | the job vanished or the progress store stayed unreachable; the stream closes |
//!
//! Events carry increasing `id`s; comment lines (`: keep-alive`) keep idle
//! connections open every [`Limits::events_keep_alive`](crate::Limits). A
//! stream closed without `end` (a server shutting down or restarting, a
//! proxy) is not an answer: clients reconnect or poll `GET /v1/jobs/{id}`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::HeaderName;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dig_common::job::{JobId, JobState};
use dig_common::progress::JobProgress;
use serde_json::json;
use tokio::sync::watch;

use crate::openapi::ErrorBody;
use crate::{full_view, owned_job, ApiResult, Shared, Tenant};

/// Consecutive failed reads of the job after which the stream gives up.
const MAX_READ_FAILURES: u32 = 10;

/// What a change is measured on.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    state: JobState,
    samples_done: u64,
    shards_done: u64,
    shards_failed: u64,
    shards_total: u64,
}

impl Snapshot {
    fn of(p: &JobProgress) -> Self {
        Snapshot {
            state: p.state,
            samples_done: p.samples_done,
            shards_done: p.shards_done,
            shards_failed: p.shards_failed,
            shards_total: p.num_shards,
        }
    }
}

/// The state of one stream.
struct Follow {
    st: Shared,
    job: JobId,
    /// The read made by the handler, sent first.
    first: Option<JobProgress>,
    last: Option<Snapshot>,
    queue: VecDeque<Event>,
    ended: bool,
    failures: u32,
    next_id: u64,
    shutdown: watch::Receiver<bool>,
}

/// Resolves when `rx` turns true; never when its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Follow {
    fn push(&mut self, name: &str, data: serde_json::Value) {
        let event = Event::default()
            .event(name)
            .id(self.next_id.to_string())
            .json_data(&data)
            .unwrap_or_else(|_| Event::default().event(name).data("{}"));
        self.next_id += 1;
        self.queue.push_back(event);
    }

    fn fail(&mut self, code: &str, message: String) {
        self.push(
            "error",
            json!({"error": {"code": code, "message": message}}),
        );
        self.ended = true;
    }

    async fn observe(&mut self, p: JobProgress) {
        let snap = Snapshot::of(&p);
        if self.last == Some(snap) {
            return;
        }
        let view = match full_view(&self.st, self.job, &p).await {
            Ok(v) => v,
            // The webhook part is missing; the counters are what matter here.
            Err(_) => crate::job_view(self.job, &p),
        };
        let view = serde_json::to_value(&view).unwrap_or_default();
        self.push("progress", view.clone());
        let previous = self.last.map(|l| l.state);
        if previous != Some(p.state) {
            self.push(
                "state",
                json!({"id": self.job, "state": p.state, "previous": previous}),
            );
        }
        if p.state.is_final() {
            self.push("end", view);
            self.ended = true;
        }
        self.last = Some(snap);
    }

    /// The next event, or `None` when the stream is over.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            let progress = match self.first.take() {
                Some(p) => p,
                None => {
                    let poll = self.st.limits.events_poll;
                    tokio::select! {
                        biased;
                        _ = stopped(&mut self.shutdown) => return None,
                        _ = tokio::time::sleep(poll) => {}
                    }
                    match self.st.progress.get(self.job).await {
                        Ok(Some(p)) => {
                            self.failures = 0;
                            p
                        }
                        Ok(None) => {
                            let job = self.job;
                            self.fail("not_found", format!("job {job} no longer exists"));
                            continue;
                        }
                        Err(e) => {
                            self.failures += 1;
                            tracing::warn!(job = %self.job, error = %e, failures = self.failures, "events: cannot read the job");
                            if self.failures >= MAX_READ_FAILURES {
                                self.fail(
                                    "unavailable",
                                    "the progress store is unreachable; poll GET /v1/jobs/{id}"
                                        .into(),
                                );
                            }
                            continue;
                        }
                    }
                }
            };
            self.observe(progress).await;
        }
    }
}

/// Follows a job as Server-Sent Events until it is final: `progress` (the
/// job view) whenever its state or counters change, `state` on each state
/// change, and `end` (the final view), after which the stream closes.
/// One event of the stream (the schema of each, not of the stream).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // a schema only: events are written as text
pub(crate) struct SseEvent {
    /// `progress`, `state`, `end` or `error`.
    event: String,
    /// The event's number in this stream, from 1.
    id: Option<String>,
    /// The event's JSON (see the response's description).
    data: String,
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "A `text/event-stream`: events `progress` (data: the job view) \
            when the state, samples_done or shard counts change, `state` (`{id, state, previous}`) \
            on each state change, `end` (the final job view) once the job is final, after which the \
            stream closes; `error` (`{error: {code, message}}`) if the job cannot be followed. \
            Comment lines keep an idle stream alive. A stream closed without `end` is no answer: \
            reconnect or poll `GET /v1/jobs/{id}`.",
            body = SseEvent, content_type = "text/event-stream"),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn job_events(
    State(st): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, p) = owned_job(&st, &tenant, &id).await?;
    let keep_alive = st.limits.events_keep_alive;
    let follow = Follow {
        shutdown: st.shutdown.clone(),
        st,
        job,
        first: Some(p),
        last: None,
        queue: VecDeque::new(),
        ended: false,
        failures: 0,
        next_id: 1,
    };
    let stream = futures::stream::unfold(follow, Follow::next);
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive));
    // Proxies such as nginx would otherwise buffer the stream.
    Ok(([(HeaderName::from_static("x-accel-buffering"), "no")], sse).into_response())
}
