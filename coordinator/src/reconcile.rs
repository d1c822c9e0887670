//! Making the progress store agree with the object store again, after the
//! progress store (Redis) lost data: the object store is the source of
//! truth for what a job is and what it has produced.
//!
//! What the object store records of a job:
//!
//! - `spec.json`: the job itself (written at submission);
//! - `shards/{index:06}.npz`: the shards done (a worker writes the object
//!   before it records the shard done, so the objects are a superset of any
//!   done set the progress store ever held);
//! - `manifest.json`: the job succeeded (written just before the state);
//! - `state.json` (a [`StateMarker`]): the job failed or was cancelled. The
//!   coordinator writes it when it fails a job, and when it sees a job ended
//!   by someone else (a cancel through the API) or at its start for any
//!   failed or cancelled job that lacks one.
//!
//! [`Reconciler::reconcile_job`] compares that with the job's progress entry:
//!
//! | entry | object store | done |
//! |---|---|---|
//! | none | manifest | rebuilt succeeded, every shard done |
//! | none | state marker | rebuilt failed/cancelled (with the marker's error) |
//! | none | every shard, no manifest | manifest written, rebuilt succeeded |
//! | none | some shards | rebuilt running with those shards done |
//! | not final | shards missing from the done set | those shards recorded done |
//! | not final | manifest or state marker | also moved to that final state |
//! | failed/cancelled | no state marker | marker written |
//! | succeeded | | nothing |
//!
//! A job with no entry is rebuilt whole ([`ProgressStore::rebuild_from_done`]);
//! an entry that exists is only added to ([`ProgressStore::record_shard_done`]
//! per missing shard), which cannot lose a completion that a worker records
//! at the same moment. Rebuilding forgets attempts, failure counts and
//! Idempotency-Keys: a rebuilt running job retries its shards afresh.
//!
//! Batches: a batch's record (`batches/{id}.json`) keeps its
//! `callback_url`; [`Reconciler::reconcile_batches`] registers the webhook
//! of every batch whose webhook the progress store lost.
//!
//! A failed or cancelled job whose marker was never written (the progress
//! store lost it before any coordinator saw the final state) comes back as
//! running and is sampled to the end: more work than needed, never a wrong
//! result.

pub use dig_common::job::StateMarker;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dig_common::job::{JobId, JobSpec, JobState};
use dig_common::layout::ObjectLayout;
use dig_common::progress::{JobProgress, ProgressStore};
use dig_common::CommonError;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{error, info};

use crate::error::{CoordinatorError, Result};
use crate::manifest::{Manifest, ManifestShard};

/// What [`Reconciler::reconcile_job`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Store and progress entry agree.
    None,
    /// The job had no progress entry: recreated from the store.
    Rebuilt,
    /// The entry lacked shards the store has: they were recorded done
    /// (and the state made final if the store says the job ended).
    Merged,
    /// A failed or cancelled job's state marker was written to the store.
    Marked,
}

/// One job's reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciled {
    pub job: JobId,
    pub tenant: String,
    /// The entry's state before; `None`: there was no entry.
    pub before: Option<JobState>,
    /// The entry's state after (in a dry run: what it would be).
    pub after: JobState,
    pub num_shards: u64,
    /// Shard objects in the store, when they were listed (jobs whose entry
    /// is final are not listed).
    pub shards_in_store: Option<u64>,
    /// Shards recorded done by this reconciliation (for a rebuilt job: every
    /// shard of the rebuilt done set).
    pub shards_recorded: u64,
    /// A missing manifest was written (every shard was in the store).
    pub manifest_written: bool,
    pub action: Action,
}

/// What the object store says of a job's end.
enum Ending {
    /// `manifest.json` exists.
    Succeeded,
    /// `state.json` says so.
    Ended(StateMarker),
    /// Neither.
    Open,
}

/// Checks and repairs jobs' progress entries against the object store; used
/// by the coordinator (at start, and for a job whose entry vanished) and by
/// `digctl reconcile`.
#[derive(Clone)]
pub struct Reconciler {
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    progress: Arc<dyn ProgressStore>,
}

/// Jobs (or batches) looked at in parallel by [`Reconciler::reconcile_all`]
/// (and [`Reconciler::reconcile_batches`]).
const PARALLEL_JOBS: usize = 8;

/// Shards larger than this are digested for the manifest without reading
/// their `valid` array (the manifest then gives no valid count for them).
const VALID_READ_LIMIT: u64 = 256 << 20;

/// Positions (from 0) of the valid samples of a shard's `.npz` bytes.
fn valid_indices(raw: &[u8], key: &object_store::path::Path) -> Result<Option<Vec<u64>>> {
    let mask = dig_common::store::shard_valid_mask(raw)
        .map_err(|e| CoordinatorError::Inconsistent(format!("{key}: {e}")))?;
    Ok(mask.map(|m| {
        m.iter()
            .enumerate()
            .filter(|(_, &v)| v)
            .map(|(i, _)| i as u64)
            .collect()
    }))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a store error says the object is not there.
fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Reconciler {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        layout: ObjectLayout,
        progress: Arc<dyn ProgressStore>,
    ) -> Self {
        Reconciler {
            store,
            layout,
            progress,
        }
    }

    /// Every job with a folder in the object store (`jobs/{id}/`), ascending.
    pub async fn job_ids(&self) -> Result<Vec<JobId>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.layout.jobs_dir()))
            .await?;
        let mut jobs: Vec<JobId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect();
        jobs.sort();
        jobs.dedup();
        Ok(jobs)
    }

    /// [`reconcile_job`](Self::reconcile_job) of every job in the store,
    /// several at a time; the outcomes in job order.
    pub async fn reconcile_all(&self, dry_run: bool) -> Result<Vec<(JobId, Result<Reconciled>)>> {
        let jobs = self.job_ids().await?;
        let mut outcomes: Vec<(JobId, Result<Reconciled>)> = futures::stream::iter(jobs)
            .map(|job| async move { (job, self.reconcile_job(job, dry_run).await) })
            .buffer_unordered(PARALLEL_JOBS)
            .collect()
            .await;
        outcomes.sort_by_key(|(job, _)| *job);
        Ok(outcomes)
    }

    /// Makes the job's progress entry agree with the object store (see the
    /// module's table); changes nothing when `dry_run`. `MissingSpec` when
    /// the job has no entry and no spec.
    pub async fn reconcile_job(&self, job: JobId, dry_run: bool) -> Result<Reconciled> {
        let entry = self.progress.get(job).await?;
        if let Some(p) = &entry {
            if p.state.is_final() {
                return self.check_final(job, p, dry_run).await;
            }
        }
        let spec = self.load_spec(job).await?;
        let n = spec.num_shards();
        let in_store = self.stored_shards(&spec).await?;
        let ending = self.ending(job).await?;
        let mut manifest_written = false;
        // The state the store calls for, and the done set to go with it.
        let (target, done): (JobState, Vec<u64>) = match &ending {
            // A filtered job succeeds with the shards it needed, not all.
            Ending::Succeeded if spec.filter.is_some() => {
                (JobState::Succeeded, in_store.iter().copied().collect())
            }
            Ending::Succeeded => (JobState::Succeeded, (0..n).collect()),
            Ending::Ended(marker) => (marker.state, in_store.iter().copied().collect()),
            // Only the coordinator can tell whether a filtered job's valid
            // samples suffice (it reads them); it decides once running.
            Ending::Open if in_store.len() as u64 == n && spec.filter.is_none() => {
                // Every shard is there but the manifest is not (the
                // coordinator stopped in between): write it, so that the job
                // is never succeeded without one.
                if !dry_run {
                    if let Err(missing) = self.write_manifest(&spec, None).await? {
                        return Err(CoordinatorError::Inconsistent(missing));
                    }
                }
                manifest_written = true;
                (JobState::Succeeded, (0..n).collect())
            }
            Ending::Open => (JobState::Running, in_store.iter().copied().collect()),
        };
        let error = match &ending {
            Ending::Ended(marker) => marker.error.clone(),
            _ => None,
        };

        let Some(p) = entry else {
            if !dry_run {
                let valid = self.valid_count(&spec, &done).await?;
                self.progress
                    .rebuild_with_state(&spec, &done, target, error.as_deref(), valid)
                    .await?;
            }
            info!(%job, state = ?target, shards_done = done.len(), dry_run, "progress entry rebuilt from the object store");
            return Ok(Reconciled {
                job,
                tenant: spec.tenant.clone(),
                before: None,
                after: target,
                num_shards: n,
                shards_in_store: Some(in_store.len() as u64),
                shards_recorded: done.len() as u64,
                manifest_written,
                action: Action::Rebuilt,
            });
        };

        // An entry that is not final: add what it lacks, never take away.
        let recorded: BTreeSet<u64> = self.progress.done_shards(job).await?.into_iter().collect();
        let missing: Vec<u64> = done
            .iter()
            .copied()
            .filter(|i| !recorded.contains(i))
            .collect();
        let mut added = 0;
        if !dry_run {
            for &i in &missing {
                let valid = self.valid_count(&spec, &[i]).await?;
                if self
                    .progress
                    .record_shard(job, i, spec.shard(i).len(), valid)
                    .await?
                {
                    added += 1;
                }
            }
        } else {
            added = missing.len() as u64;
        }
        let mut after = p.state;
        if target.is_final() {
            if !dry_run {
                self.progress
                    .set_state(job, target, error.as_deref())
                    .await?;
                after = self.progress.get(job).await?.map_or(target, |p| p.state);
            } else {
                after = target;
            }
        }
        let action = if added > 0 || after != p.state {
            info!(%job, added, state = ?after, dry_run, "progress entry completed from the object store");
            Action::Merged
        } else {
            Action::None
        };
        Ok(Reconciled {
            job,
            tenant: spec.tenant.clone(),
            before: Some(p.state),
            after,
            num_shards: n,
            shards_in_store: Some(in_store.len() as u64),
            shards_recorded: added,
            manifest_written,
            action,
        })
    }

    /// A job whose entry is final: a failed or cancelled one gets its state
    /// marker if the store lacks it.
    async fn check_final(&self, job: JobId, p: &JobProgress, dry_run: bool) -> Result<Reconciled> {
        let mut action = Action::None;
        if matches!(p.state, JobState::Failed | JobState::Cancelled) {
            match self.store.head(&self.layout.job_state(job)).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {
                    if !dry_run {
                        self.write_marker(job, p.state, p.error.as_deref()).await?;
                    }
                    action = Action::Marked;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Reconciled {
            job,
            tenant: p.tenant.clone(),
            before: Some(p.state),
            after: p.state,
            num_shards: p.num_shards,
            shards_in_store: None,
            shards_recorded: 0,
            manifest_written: false,
            action,
        })
    }

    pub(crate) async fn load_spec(&self, job: JobId) -> Result<JobSpec> {
        let bytes = match self.store.get(&self.layout.job_spec(job)).await {
            Ok(object) => object.bytes().await?,
            Err(e) if is_not_found(&e) => return Err(CoordinatorError::MissingSpec(job)),
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|source| CoordinatorError::BadSpec { job, source })
    }

    /// Indices of the job's shard objects (names other than `{index:06}.npz`
    /// below the spec's shard count are ignored).
    async fn stored_shards(&self, spec: &JobSpec) -> Result<BTreeSet<u64>> {
        let n = spec.num_shards();
        let dir = self.layout.shards_dir(spec.id);
        let names: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&dir)).try_collect().await?;
        Ok(names
            .iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                let stem = name.strip_suffix(".npz")?;
                if stem.len() < 6 || !stem.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                stem.parse::<u64>().ok().filter(|&i| i < n)
            })
            .collect())
    }

    /// The state marker first: a filtered job that failed short of its
    /// request has a manifest of the valid samples it has, and its marker.
    async fn ending(&self, job: JobId) -> Result<Ending> {
        let manifest = || async {
            match self.store.head(&self.layout.manifest(job)).await {
                Ok(_) => Ok(Ending::Succeeded),
                Err(e) if is_not_found(&e) => Ok(Ending::Open),
                Err(e) => Err(CoordinatorError::from(e)),
            }
        };
        let bytes = match self.store.get(&self.layout.job_state(job)).await {
            Ok(object) => object.bytes().await?,
            Err(e) if is_not_found(&e) => return manifest().await,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<StateMarker>(&bytes) {
            Ok(m) if matches!(m.state, JobState::Failed | JobState::Cancelled) => {
                Ok(Ending::Ended(m))
            }
            Ok(m) => {
                error!(%job, state = ?m.state, "ignoring a state marker that is not failed or cancelled");
                manifest().await
            }
            Err(e) => {
                error!(%job, error = %e, "ignoring an unreadable state marker");
                manifest().await
            }
        }
    }

    /// Gives their webhook back to the batches that have a `callback_url`
    /// but no webhook in the progress store (it lost its data): registered
    /// and watched again, so that an API sends it when the batch ends, or
    /// at once if it has ended. At least once, as for jobs: an ended batch
    /// whose webhook went out before the loss is sent again, under the same
    /// `X-Dig-Delivery` id. The batches given back, ascending; changes
    /// nothing when `dry_run`.
    pub async fn reconcile_batches(&self, dry_run: bool) -> Result<Vec<JobId>> {
        let records: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.layout.batches_dir()))
            .try_collect()
            .await?;
        let batches: Vec<JobId> = records
            .iter()
            .filter_map(|meta| {
                meta.location
                    .filename()
                    .and_then(|f| f.strip_suffix(".json"))
                    .and_then(|id| id.parse().ok())
            })
            .collect();
        let mut restored: Vec<JobId> = futures::stream::iter(batches)
            .map(|batch| async move {
                let restored = self.restore_batch_webhook(batch, dry_run).await?;
                Ok::<_, CoordinatorError>(restored.then_some(batch))
            })
            .buffer_unordered(PARALLEL_JOBS)
            .try_filter_map(|b| async move { Ok(b) })
            .try_collect()
            .await?;
        restored.sort();
        Ok(restored)
    }

    /// [`reconcile_batches`](Self::reconcile_batches) of one batch: whether
    /// its webhook was (or, in a dry run, would be) given back. The record
    /// is read only when the progress store has no webhook for the batch.
    async fn restore_batch_webhook(&self, batch: JobId, dry_run: bool) -> Result<bool> {
        if self.progress.webhook(batch).await?.is_some() {
            return Ok(false);
        }
        let record =
            match dig_common::store::read_batch_record(self.store.as_ref(), &self.layout, batch)
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(false), // an undone submission
                Err(CommonError::Other(e)) => {
                    error!(%batch, error = %e, "ignoring an unreadable batch record");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
        let Some(url) = &record.callback_url else {
            return Ok(false);
        };
        if !dry_run {
            self.progress.register_batch_webhook(batch, url).await?;
        }
        info!(%batch, dry_run, "batch webhook given back from the batch's record");
        Ok(true)
    }

    /// Writes `jobs/{id}/state.json` for a job that failed or was cancelled.
    pub async fn write_marker(
        &self,
        job: JobId,
        state: JobState,
        error: Option<&str>,
    ) -> Result<()> {
        let marker = StateMarker {
            job,
            state,
            error: error.map(str::to_string),
            written_at: now_secs(),
        };
        let json = serde_json::to_vec_pretty(&marker)?;
        self.store
            .put(&self.layout.job_state(job), PutPayload::from(json))
            .await?;
        Ok(())
    }

    /// Writes the manifest of a job whose shards are all in the store; the
    /// inner `Err` names a shard that is missing after all. `kept`: for a
    /// filtered job, the shards of the result with their kept sample
    /// indices (every shard is listed otherwise).
    pub(crate) async fn write_manifest(
        &self,
        spec: &JobSpec,
        kept: Option<&BTreeMap<u64, Vec<u64>>>,
    ) -> Result<Result<(), String>> {
        let job = spec.id;
        let indices: Vec<u64> = match kept {
            Some(k) => k.keys().copied().collect(),
            None => (0..spec.num_shards()).collect(),
        };
        let mut shards = Vec::with_capacity(indices.len());
        for index in indices {
            let task = spec.shard(index);
            let key = self.layout.shard(job, index);
            let (bytes, sha256, valid) = match self.digest(&key).await {
                Ok(d) => d,
                Err(CoordinatorError::Store(e)) if is_not_found(&e) => {
                    return Ok(Err(format!(
                        "shard {index} is recorded done but {key} is missing"
                    )));
                }
                Err(e) => return Err(e),
            };
            shards.push(ManifestShard {
                index,
                start: task.start,
                end: task.end,
                key: key.to_string(),
                bytes,
                sha256,
                valid: valid.map(|v| v.len() as u64),
                kept: kept.map(|k| k[&index].clone()),
            });
        }
        let samples_valid = match kept {
            Some(k) => Some(k.values().map(|v| v.len() as u64).sum()),
            None => shards.iter().map(|s| s.valid).sum(),
        };
        let manifest = Manifest {
            job,
            num_samples: spec.num_samples,
            shards,
            samples_valid,
            solver: spec.solver,
            steps: spec.steps,
            network_calls_per_sample: spec.network_calls(),
            filter: spec.filter,
            steering: spec.steering.clone(),
            flow_above: spec.flow_above,
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        self.store
            .put(&self.layout.manifest(job), PutPayload::from(json))
            .await?;
        Ok(Ok(()))
    }

    /// Size and SHA-256 of a shard, streamed, and the sample indices its
    /// `valid` array marks (`None` for a shard written without one, or one
    /// past [`VALID_READ_LIMIT`], which is digested without being kept).
    async fn digest(
        &self,
        key: &object_store::path::Path,
    ) -> Result<(u64, String, Option<Vec<u64>>)> {
        let object = self.store.get(key).await?;
        let start = object.meta.location.clone();
        let mut body = object.into_stream();
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut kept: Option<Vec<u8>> = Some(Vec::new());
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            hasher.update(&chunk);
            if bytes > VALID_READ_LIMIT {
                kept = None;
            } else if let Some(k) = kept.as_mut() {
                k.extend_from_slice(&chunk);
            }
        }
        // A count is a courtesy of the manifest: a shard whose `valid`
        // cannot be read is listed without one.
        let valid = match kept.map(|raw| valid_indices(&raw, &start)) {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                tracing::warn!("{e}; listing the shard without a valid count");
                None
            }
            None => None,
        };
        Ok((bytes, hex::encode(hasher.finalize()), valid))
    }

    /// Valid samples of the given stored shards (`None` if one has no
    /// `valid` array); a shard missing from the store counts none.
    async fn valid_count(&self, spec: &JobSpec, shards: &[u64]) -> Result<Option<u64>> {
        let mut total = 0;
        for &i in shards {
            match self.shard_valid(spec, i).await {
                Ok(Some(v)) => total += v.len() as u64,
                Ok(None) => return Ok(None),
                Err(CoordinatorError::Store(e)) if is_not_found(&e) => {}
                Err(CoordinatorError::Inconsistent(e)) => {
                    tracing::warn!("{e}; the valid count stays unknown");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(total))
    }

    /// The sample indices shard `index` of `spec` marks valid (`None`:
    /// written without validity). `NotFound` store error when absent.
    pub(crate) async fn shard_valid(&self, spec: &JobSpec, index: u64) -> Result<Option<Vec<u64>>> {
        let key = self.layout.shard(spec.id, index);
        let raw = self.store.get(&key).await?.bytes().await?;
        let valid = valid_indices(&raw, &key)?;
        Ok(valid.map(|v| v.into_iter().map(|i| spec.shard(index).start + i).collect()))
    }
}
