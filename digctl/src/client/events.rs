//! Following a job through `GET /v1/jobs/{id}/events` (Server-Sent Events):
//! an incremental parser of the `text/event-stream` format and the loop
//! that turns `progress` and `end` events into job views.

use anyhow::{anyhow, bail, Context, Result};
use dig_common::job::JobId;
use futures::StreamExt;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use reqwest::Method;

use super::http::{Api, JobView};

/// One event: its name (`message` when the server gave none), data (lines
/// joined by `\n`) and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Turns the bytes of an event stream, in chunks of any size, into events:
/// `field: value` lines (one optional space after the colon), a blank line
/// ending an event, `:` comments ignored. Lines end in `\n` or `\r\n`.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in chunk {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(e) = self.line_done(&String::from_utf8_lossy(&line)) {
                events.push(e);
            }
        }
        events
    }

    fn line_done(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let event = self.event.take();
            let id = self.id.take();
            if self.data.is_empty() {
                return None;
            }
            return Some(SseEvent {
                event: event.unwrap_or_else(|| "message".into()),
                data: std::mem::take(&mut self.data).join("\n"),
                id,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            "id" => self.id = Some(value.to_string()),
            _ => {} // `retry` and unknown fields
        }
        None
    }
}

/// Follows `job`'s events, calling `on_view` with each `progress` view,
/// until the `end` event: the final view. An error when the stream cannot
/// be opened or ends (or breaks) before `end`; the caller then polls.
pub async fn follow(api: &Api, job: JobId, mut on_view: impl FnMut(&JobView)) -> Result<JobView> {
    let url = api.url(&["v1", "jobs", &job.to_string(), "events"]);
    // No total timeout: the stream lasts as long as the job. The client's
    // read timeout still ends a stream that goes silent (the server sends
    // keep-alive comments well within it).
    let request = api
        .request(Method::GET, url.clone())
        .header(ACCEPT, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache");
    let response = api.send(request).await?;
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| api.transport(&url, e))?;
        for event in parser.feed(&chunk) {
            match event.event.as_str() {
                "progress" | "end" => {
                    let view: JobView = serde_json::from_str(&event.data).with_context(|| {
                        format!("unexpected {} event: {}", event.event, event.data)
                    })?;
                    on_view(&view);
                    if event.event == "end" {
                        return Ok(view);
                    }
                }
                "error" => bail!("the event stream ended with an error: {}", event.data),
                _ => {} // `state` (the views carry it) and future events
            }
        }
    }
    Err(anyhow!(
        "the event stream of job {job} closed before the job ended"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_lines() {
        let text = ": keep-alive\n\nevent: progress\nid: 1\ndata: {\"a\":1}\n\n\
                    event: state\r\ndata:{\"s\":2}\r\n\r\ndata: x\ndata: y\n\n";
        // Every split point gives the same events.
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut got = p.feed(&text.as_bytes()[..cut]);
            got.extend(p.feed(&text.as_bytes()[cut..]));
            assert_eq!(
                got,
                vec![
                    SseEvent {
                        event: "progress".into(),
                        data: "{\"a\":1}".into(),
                        id: Some("1".into())
                    },
                    SseEvent {
                        event: "state".into(),
                        data: "{\"s\":2}".into(),
                        id: None
                    },
                    SseEvent {
                        event: "message".into(),
                        data: "x\ny".into(),
                        id: None
                    },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_event_without_data_or_blank_line_is_not_sent() {
        let mut p = SseParser::default();
        assert!(p.feed(b"event: progress\n\n").is_empty());
        assert!(p.feed(b"event: end\ndata: {}").is_empty());
        assert_eq!(p.feed(b"\n\n").len(), 1);
    }
}
