//! `digctl reconcile`: rebuilds job progress (Redis) from the object store,
//! for an operator after Redis lost data. The work is
//! [`dig_coordinator::Reconciler`]'s, the same the coordinator does at start;
//! this prints what it did, one row per job. A job it rebuilt as running is
//! handed to the coordinator through the jobs queue, as a submission is (a
//! coordinator already driving it ignores the id), so a running coordinator
//! need not be restarted. Without `--job`, batches whose webhook Redis lost
//! get it back from their records (a line each).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use dig_common::job::{JobId, JobState};
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{RabbitQueue, ShardQueue};
use dig_common::store::open_store;
use dig_coordinator::{Action, Reconciled, Reconciler};

use crate::services::ConfigArg;

#[derive(Args, Debug)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only this job [default: every job in the object store].
    #[arg(long, value_name = "ID")]
    pub job: Option<JobId>,
    /// Report what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object per job on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ReconcileArgs) -> Result<()> {
    let cfg = args.config.load()?;
    let store_cfg = cfg.store.to_store_config();
    let store = open_store(&store_cfg).context("cannot open the object store")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcomes = runtime.block_on(async {
        // Redis and the object store only: the queue plays no part.
        let progress: Arc<dyn ProgressStore> = Arc::new(
            RedisProgress::connect(&cfg.progress.url, &cfg.namespace)
                .await
                .context("cannot connect to Redis (progress.url)")?,
        );
        let reconciler = Reconciler::new(store, store_cfg.layout(), progress);
        let (outcomes, batches) = match args.job {
            Some(job) => (
                vec![(job, reconciler.reconcile_job(job, args.dry_run).await)],
                Vec::new(),
            ),
            None => (
                reconciler
                    .reconcile_all(args.dry_run)
                    .await
                    .context("cannot list the jobs in the object store")?,
                reconciler
                    .reconcile_batches(args.dry_run)
                    .await
                    .context("cannot reconcile the batches' webhooks")?,
            ),
        };
        if !args.dry_run {
            hand_over(&cfg.queue.url, &cfg.namespace, &outcomes).await;
        }
        anyhow::Ok((outcomes, batches))
    })?;
    let (outcomes, batches) = outcomes;

    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count();
    if args.json {
        for (job, outcome) in &outcomes {
            let line = match outcome {
                Ok(r) => serde_json::to_value(r)?,
                Err(e) => serde_json::json!({"job": job, "error": e.to_string()}),
            };
            println!("{line}");
        }
    } else {
        print!("{}", render(&outcomes));
    }
    // Batches whose webhook Redis lost: given back from their records.
    for batch in &batches {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"batch": batch, "action": "webhook_restored"})
            );
        } else {
            println!("batch {batch}: webhook restored");
        }
    }
    if !batches.is_empty() {
        eprintln!(
            "{} batch webhook(s) {}",
            batches.len(),
            if args.dry_run {
                "would be restored"
            } else {
                "restored"
            }
        );
    }
    let changed = outcomes
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|r| r.action != Action::None))
        .count();
    eprintln!(
        "{} job(s): {changed} {}, {} already in agreement, {failed} error(s){}",
        outcomes.len(),
        if args.dry_run {
            "would change"
        } else {
            "changed"
        },
        outcomes.len() - changed - failed,
        if args.dry_run {
            " (dry run: nothing was changed)"
        } else {
            ""
        }
    );
    if failed > 0 {
        bail!("{failed} job(s) could not be reconciled");
    }
    Ok(())
}

/// Publishes the id of every job rebuilt as unfinished to the jobs queue.
/// Best effort: without it, the coordinator resumes them at its next start.
async fn hand_over(
    url: &str,
    namespace: &str,
    outcomes: &[(JobId, dig_coordinator::Result<Reconciled>)],
) {
    let jobs: Vec<JobId> = outcomes
        .iter()
        .filter_map(|(job, r)| r.as_ref().ok().map(|r| (job, r)))
        .filter(|(_, r)| r.action == Action::Rebuilt && !r.after.is_final())
        .map(|(job, _)| *job)
        .collect();
    if jobs.is_empty() {
        return;
    }
    let queue = match RabbitQueue::connect(url, namespace).await {
        Ok(q) => q,
        Err(e) => {
            eprintln!(
                "warning: cannot reach RabbitMQ ({e}); the coordinator resumes the {} rebuilt \
                 running job(s) at its next start",
                jobs.len()
            );
            return;
        }
    };
    for job in jobs {
        if let Err(e) = queue.publish_job(job).await {
            eprintln!(
                "warning: cannot hand job {job} to the coordinator ({e}); it resumes the job at \
                 its next start"
            );
        }
    }
}

fn state(s: Option<JobState>) -> String {
    match s {
        None => "missing".into(),
        Some(s) => serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{s:?}")),
    }
}

fn action(r: &Reconciled) -> String {
    let mut text = match r.action {
        Action::None => "none".to_string(),
        Action::Rebuilt => "rebuilt".to_string(),
        Action::Merged => format!("{} shard(s) recorded", r.shards_recorded),
        Action::Marked => "state marker written".to_string(),
    };
    if r.manifest_written {
        text.push_str(", manifest written");
    }
    text
}

/// The table: JOB TENANT BEFORE AFTER SHARDS ACTION, columns padded.
fn render(outcomes: &[(JobId, dig_coordinator::Result<Reconciled>)]) -> String {
    let mut rows = vec![[
        "JOB".to_string(),
        "TENANT".into(),
        "BEFORE".into(),
        "AFTER".into(),
        "SHARDS".into(),
        "ACTION".into(),
    ]];
    for (job, outcome) in outcomes {
        rows.push(match outcome {
            Ok(r) => [
                job.to_string(),
                r.tenant.clone(),
                state(r.before),
                state(Some(r.after)),
                match r.shards_in_store {
                    Some(k) => format!("{k}/{}", r.num_shards),
                    None => format!("-/{}", r.num_shards),
                },
                action(r),
            ],
            Err(e) => [
                job.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("error: {e}"),
            ],
        });
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_job_and_names_errors() {
        let a: JobId = "01938a2e-0000-7000-8000-000000000001".parse().unwrap();
        let b: JobId = "01938a2e-0000-7000-8000-000000000002".parse().unwrap();
        let out = render(&[
            (
                a,
                Ok(Reconciled {
                    job: a,
                    tenant: "lab-a".into(),
                    before: None,
                    after: JobState::Succeeded,
                    num_shards: 8,
                    shards_in_store: Some(8),
                    shards_recorded: 8,
                    manifest_written: true,
                    action: Action::Rebuilt,
                }),
            ),
            (b, Err(dig_coordinator::CoordinatorError::MissingSpec(b))),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("JOB"));
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            &row[..6],
            &[
                a.to_string().as_str(),
                "lab-a",
                "missing",
                "succeeded",
                "8/8",
                "rebuilt,"
            ]
        );
        assert!(lines[1].ends_with("rebuilt, manifest written"));
        assert!(lines[2].contains("error: job") && lines[2].contains("no spec"));
    }
}
