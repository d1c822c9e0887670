//! `digctl batch submit | status | wait | cancel`: many jobs at once
//! (`POST /v1/batches`, all or nothing).
//!
//! The batch file is JSON Lines (one job request per line, as `POST
//! /v1/jobs` takes; blank lines and `#` comments skipped), a JSON array of
//! them, or `{"name": ..., "jobs": [...]}`. An entry may name a local
//! features file, `"features": "path.npz"` (relative to the batch file),
//! instead of `features_sha256`: each distinct file is uploaded once and the
//! entry gets its SHA-256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use dig_common::job::JobId;
use serde_json::{json, Map, Value};

use super::http::Api;
use super::render::{human_duration, Meter, Unit};
use super::{print_json, transfer, ClientOpts};

#[derive(Subcommand, Debug)]
pub enum BatchCommand {
    /// Submit every job of FILE in one call; prints the batch id. Nothing is
    /// created unless every entry is valid (the invalid ones are listed).
    Submit {
        #[command(flatten)]
        opts: ClientOpts,
        /// JSON Lines of job requests, a JSON array, or {"name", "jobs"}.
        file: PathBuf,
        /// A name for the batch (overrides the file's).
        #[arg(long)]
        name: Option<String>,
        /// Retries with the same key return the first submission's batch.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Print the server's JSON answer (the batch and its job ids).
        #[arg(long)]
        json: bool,
    },
    /// A batch's state and its jobs' progress added up.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
        batch: JobId,
        /// Print the server's JSON answer (with every job).
        #[arg(long)]
        json: bool,
    },
    /// Wait until every job of the batch is final; fails unless all succeeded.
    Wait {
        #[command(flatten)]
        opts: ClientOpts,
        batch: JobId,
        /// Seconds between status requests (at least 1).
        #[arg(long, value_name = "SECS", default_value_t = 5,
              value_parser = clap::value_parser!(u64).range(1..))]
        poll_secs: u64,
        /// Give up waiting after this many seconds (the batch keeps running).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Cancel every unfinished job of the batch; prints the batch's state.
    Cancel {
        #[command(flatten)]
        opts: ClientOpts,
        batch: JobId,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: BatchCommand) -> Result<()> {
    match cmd {
        BatchCommand::Submit {
            opts,
            file,
            name,
            idempotency_key,
            json,
        } => {
            let (file_name, mut jobs) = read_batch_file(&file)?;
            let api = opts.connect()?;
            upload_local_features(&api, &file, &mut jobs).await?;
            let mut body = json!({ "jobs": jobs });
            if let Some(n) = name.or(file_name) {
                body["name"] = json!(n);
            }
            let count = jobs_len(&body);
            let answer = api
                .post(&["v1", "batches"], Some(&body), idempotency_key.as_deref())
                .await?;
            let id = answer.json["id"]
                .as_str()
                .with_context(|| format!("unexpected answer to the batch: {}", answer.json))?
                .to_string();
            if json {
                print_json(&answer.json)?;
            } else {
                println!("{id}");
            }
            let replay = answer.status == reqwest::StatusCode::OK;
            eprintln!(
                "{} batch {id}: {count} jobs",
                if replay {
                    "idempotent replay of"
                } else {
                    "submitted"
                }
            );
            Ok(())
        }
        BatchCommand::Status { opts, batch, json } => {
            let api = opts.connect()?;
            let v = get(&api, batch).await?;
            if json {
                print_json(&v)?;
            } else {
                println!("{}", summary(&v));
            }
            Ok(())
        }
        BatchCommand::Wait {
            opts,
            batch,
            poll_secs,
            timeout,
        } => {
            let api = opts.connect()?;
            wait(&api, batch, Duration::from_secs(poll_secs), timeout).await
        }
        BatchCommand::Cancel { opts, batch, json } => {
            let api = opts.connect()?;
            let answer = api
                .post::<Value>(&["v1", "batches", &batch.to_string(), "cancel"], None, None)
                .await?;
            if json {
                print_json(&answer.json)?;
            } else {
                println!("{}", summary(&answer.json));
            }
            Ok(())
        }
    }
}

fn jobs_len(body: &Value) -> usize {
    body["jobs"].as_array().map_or(0, Vec::len)
}

/// The batch file's name (if it gives one) and its entries.
fn read_batch_file(path: &Path) -> Result<(Option<String>, Vec<Value>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read batch file {}", path.display()))?;
    parse_batch(&text).with_context(|| format!("batch file {}", path.display()))
}

fn parse_batch(text: &str) -> Result<(Option<String>, Vec<Value>)> {
    let trimmed = text.trim_start();
    // One JSON document (an array, or an object with "jobs")...
    if let Ok(doc) = serde_json::from_str::<Value>(text) {
        match doc {
            Value::Array(jobs) => return check_entries(None, jobs),
            Value::Object(mut o) if o.contains_key("jobs") => {
                let name = o.get("name").and_then(Value::as_str).map(str::to_string);
                let Some(Value::Array(jobs)) = o.remove("jobs") else {
                    bail!("\"jobs\" must be an array of job requests");
                };
                return check_entries(name, jobs);
            }
            _ => {}
        }
    } else if trimmed.starts_with('[') {
        // Not JSON Lines either; say what is wrong with the document.
        serde_json::from_str::<Value>(text).context("not a valid JSON array")?;
    }
    // ...or JSON Lines.
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("line {}: not a JSON job request", n + 1))?;
        jobs.push(v);
    }
    check_entries(None, jobs)
}

fn check_entries(name: Option<String>, jobs: Vec<Value>) -> Result<(Option<String>, Vec<Value>)> {
    if jobs.is_empty() {
        bail!("no job requests in it");
    }
    if let Some(i) = jobs.iter().position(|j| !j.is_object()) {
        bail!("entry {i} is not a JSON object (a job request)");
    }
    Ok((name, jobs))
}

/// Uploads each distinct `"features": "path.npz"` of the entries once and
/// replaces it by `features_sha256`.
async fn upload_local_features(api: &Api, file: &Path, jobs: &mut [Value]) -> Result<()> {
    let base = file.parent().unwrap_or(Path::new("."));
    let mut uploaded: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (i, job) in jobs.iter_mut().enumerate() {
        let o: &mut Map<String, Value> = job.as_object_mut().expect("checked: objects");
        let Some(features) = o.remove("features") else {
            continue;
        };
        let Some(rel) = features.as_str() else {
            bail!("entry {i}: \"features\" must be a path to a .npz file");
        };
        if o.contains_key("features_sha256") {
            bail!("entry {i}: give \"features\" or \"features_sha256\", not both");
        }
        let path = base.join(rel);
        let sha = match uploaded.get(&path) {
            Some(sha) => sha.clone(),
            None => {
                let up = transfer::upload_features(api, &path)
                    .await
                    .with_context(|| format!("entry {i}: features {}", path.display()))?;
                eprintln!(
                    "{} features {}: sha256 {}",
                    if up.created {
                        "uploaded"
                    } else {
                        "already had"
                    },
                    path.display(),
                    up.feature.sha256
                );
                uploaded.insert(path, up.feature.sha256.clone());
                up.feature.sha256
            }
        };
        o.insert("features_sha256".into(), json!(sha));
    }
    Ok(())
}

async fn get(api: &Api, batch: JobId) -> Result<Value> {
    Ok(api
        .get(&["v1", "batches", &batch.to_string()], &[])
        .await?
        .json)
}

/// A few lines about a batch view.
fn summary(v: &Value) -> String {
    let by = &v["jobs_by_state"];
    let mut states: Vec<String> = [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "unknown",
    ]
    .iter()
    .filter_map(|s| {
        let n = by[*s].as_u64().unwrap_or(0);
        (n > 0).then(|| format!("{n} {s}"))
    })
    .collect();
    if states.is_empty() {
        states.push("none".into());
    }
    let mut lines = vec![
        format!("batch     {}", v["id"].as_str().unwrap_or("?")),
        format!("state     {}", v["state"].as_str().unwrap_or("?")),
        format!(
            "jobs      {} ({})",
            v["num_jobs"].as_u64().unwrap_or(0),
            states.join(", ")
        ),
        format!(
            "samples   {} of {}",
            v["samples_done"].as_u64().unwrap_or(0),
            v["num_samples"].as_u64().unwrap_or(0)
        ),
    ];
    if let Some(name) = v["name"].as_str() {
        lines.insert(1, format!("name      {name}"));
    }
    let failed: Vec<String> = v["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["state"] == "failed")
        .take(5)
        .map(|j| {
            format!(
                "failed    {}: {}",
                j["id"].as_str().unwrap_or("?"),
                j["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    lines.extend(failed);
    lines.join("\n")
}

async fn wait(api: &Api, batch: JobId, poll: Duration, timeout: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let meter = Meter::new(None, Unit::Samples, &format!("batch {batch}"));
    loop {
        let v = get(api, batch).await?;
        let total = v["num_samples"].as_u64().unwrap_or(0);
        meter.set_total(total);
        meter.set_position(v["samples_done"].as_u64().unwrap_or(0));
        let by = &v["jobs_by_state"];
        let ended = ["succeeded", "failed", "cancelled"]
            .iter()
            .map(|s| by[*s].as_u64().unwrap_or(0))
            .sum::<u64>();
        meter.set_message(format!(
            "{ended}/{} jobs ended",
            v["num_jobs"].as_u64().unwrap_or(0)
        ));
        match v["state"].as_str() {
            Some("succeeded") => {
                meter.finish();
                eprintln!(
                    "batch {batch} succeeded in {}",
                    human_duration(started.elapsed().as_secs_f64())
                );
                return Ok(());
            }
            Some(state @ ("failed" | "cancelled")) => {
                meter.finish();
                bail!("batch {batch} {state}:\n{}", summary(&v));
            }
            _ => {}
        }
        if let Some(t) = timeout {
            if started.elapsed() >= Duration::from_secs(t) {
                meter.finish();
                bail!(
                    "gave up waiting after {t} s; the batch goes on:\n{}",
                    summary(&v)
                );
            }
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_files_in_three_shapes() {
        let lines = "# proteome\n{\"num_samples\": 1}\n\n{\"num_samples\": 2}\n";
        let (name, jobs) = parse_batch(lines).unwrap();
        assert_eq!((name, jobs.len()), (None, 2));
        assert_eq!(jobs[1]["num_samples"], 2);
        let (_, jobs) = parse_batch("[{\"num_samples\": 3}]").unwrap();
        assert_eq!(jobs[0]["num_samples"], 3);
        let (name, jobs) = parse_batch("{\"name\": \"p\", \"jobs\": [{}, {}, {}]}").unwrap();
        assert_eq!((name.as_deref(), jobs.len()), (Some("p"), 3));
        // A single job request (no "jobs") is one line of JSON Lines.
        let (_, jobs) = parse_batch("{\"num_samples\": 4}").unwrap();
        assert_eq!(jobs.len(), 1);
    }

    #[test]
    fn bad_batch_files_say_where() {
        let e = parse_batch("{\"num_samples\": 1}\nnot json\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        let e = parse_batch("# nothing\n").unwrap_err();
        assert!(format!("{e:#}").contains("no job requests"), "{e:#}");
        let e = parse_batch("[{}, 3]").unwrap_err();
        assert!(format!("{e:#}").contains("entry 1"), "{e:#}");
        let e = parse_batch("{\"jobs\": 3}").unwrap_err();
        assert!(format!("{e:#}").contains("array"), "{e:#}");
        let e = parse_batch("[{}, ").unwrap_err();
        assert!(format!("{e:#}").contains("not a valid JSON array"), "{e:#}");
    }
}
