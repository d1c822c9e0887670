//! Moving files: streamed feature uploads checked against the server's
//! digest, and result downloads written to `NAME.part`, verified, then
//! renamed, so a file under its final name is always complete.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use dig_common::job::JobId;
use dig_common::store::{is_sha256, FeatureRef};
use dig_coordinator::{Manifest, ManifestShard};
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode, Url};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::{Answer, Api, JSON_TIMEOUT};
use super::render::{human_bytes, Meter, Unit};

const CHUNK: usize = 256 * 1024;

/// A finished feature upload.
pub struct Uploaded {
    pub feature: FeatureRef,
    /// The server's answer as sent, for `--json`.
    pub json: Value,
    /// 201: first upload by this tenant; 200: already there.
    pub created: bool,
}

/// `POST /v1/features` with the file streamed from disk; the server's
/// SHA-256 and size must match what was sent.
pub async fn upload_features(api: &Api, path: &Path) -> Result<Uploaded> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file
        .metadata()
        .await
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let meter = Arc::new(Meter::new(
        Some(size),
        Unit::Bytes,
        &format!("uploading {name}"),
    ));
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let stream = {
        let (hasher, meter) = (hasher.clone(), meter.clone());
        futures::stream::try_unfold(file, move |mut file| {
            let (hasher, meter) = (hasher.clone(), meter.clone());
            async move {
                let mut buf = vec![0u8; CHUNK];
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(None);
                }
                buf.truncate(n);
                hasher.lock().expect("hasher lock").update(&buf);
                meter.inc(n as u64);
                Ok(Some((buf, file)))
            }
        })
    };
    let url = api.url(&["v1", "features"]);
    let request = api
        .request(Method::POST, url.clone())
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream));
    let sent = api.send(request).await;
    meter.finish();
    let response = sent?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| api.transport(&url, e))?;
    let answer = Answer {
        status,
        json: serde_json::from_slice(&body)
            .with_context(|| format!("the answer of {url} is not JSON"))?,
    };
    let feature: FeatureRef = answer.parse("the feature upload")?;
    let local = hex::encode(hasher.lock().expect("hasher lock").clone().finalize());
    if feature.bytes != size || feature.sha256 != local {
        bail!(
            "the server stored {} bytes with SHA-256 {}, but {} has {size} bytes with SHA-256 {local}; \
             the file changed during the upload or was corrupted on the way",
            feature.bytes,
            feature.sha256,
            path.display()
        );
    }
    Ok(Uploaded {
        feature,
        json: answer.json,
        created: status == StatusCode::CREATED,
    })
}

/// Uploaded structures (`POST /v1/structures`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StructureRef {
    pub sha256: String,
    pub residues: u64,
    pub structures: u64,
    pub bytes: u64,
}

/// Uploads a PDB file of structures for a partial-diffusion job; the
/// answer and whether it was new. The server's digest is checked against
/// the file's.
pub async fn upload_structures(api: &Api, path: &Path) -> Result<(StructureRef, bool)> {
    let is_pdb = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("pdb") || e.eq_ignore_ascii_case("ent"));
    if !is_pdb {
        bail!(
            "--from-structure {}: jobs take a PDB file (one structure or several MODEL \
             records); `digctl sample --from-structure` also reads DCD and XTC",
            path.display()
        );
    }
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let local = hex::encode(Sha256::digest(&data));
    let size = data.len() as u64;
    let url = api.url(&["v1", "structures"]);
    let request = api
        .request(Method::POST, url.clone())
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(data);
    let response = api.send(request).await?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| api.transport(&url, e))?;
    let answer = Answer {
        status,
        json: serde_json::from_slice(&body)
            .with_context(|| format!("the answer of {url} is not JSON"))?,
    };
    let stored: StructureRef = answer
        .parse("the structure upload")
        .with_context(|| format!("--from-structure {}", path.display()))?;
    if stored.bytes != size || stored.sha256 != local {
        bail!(
            "the server stored {} bytes with SHA-256 {}, but {} has {size} bytes with SHA-256 {local}",
            stored.bytes,
            stored.sha256,
            path.display()
        );
    }
    Ok((stored, status == StatusCode::CREATED))
}

/// Checks a received file against what was expected of it.
pub fn check_digest(
    what: &str,
    expected_bytes: u64,
    expected_sha256: &str,
    bytes: u64,
    sha256: &str,
) -> Result<()> {
    if bytes != expected_bytes || !sha256.eq_ignore_ascii_case(expected_sha256) {
        bail!(
            "{what}: received {bytes} bytes with SHA-256 {sha256}, \
             but the manifest says {expected_bytes} bytes with SHA-256 {expected_sha256}"
        );
    }
    Ok(())
}

/// Checks that a manifest describes `job` and that its shards can be
/// downloaded and verified.
pub fn check_manifest(m: &Manifest, job: JobId) -> Result<()> {
    if m.job != job {
        bail!("the results manifest is for job {}, not {job}", m.job);
    }
    let mut seen = HashSet::new();
    for s in &m.shards {
        if !seen.insert(s.index) {
            bail!("the results manifest lists shard {} twice", s.index);
        }
        if !is_sha256(&s.sha256) {
            bail!(
                "the results manifest gives shard {} an invalid SHA-256 {:?}",
                s.index,
                s.sha256
            );
        }
        if s.end < s.start {
            bail!(
                "the results manifest gives shard {} samples {}..{}",
                s.index,
                s.start,
                s.end
            );
        }
    }
    Ok(())
}

/// `shards/000042.npz`.
pub fn shard_file_name(index: u64) -> String {
    format!("{index:06}.npz")
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Size and SHA-256 of a file on disk.
pub async fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Streams a response body into `part`, hashing as it goes; stops early
/// past `limit` bytes. Returns size and SHA-256.
async fn stream_to_file(
    api: &Api,
    url: &Url,
    response: Response,
    part: &Path,
    meter: &Meter,
    limit: Option<u64>,
) -> Result<(u64, String)> {
    let mut file = tokio::fs::File::create(part)
        .await
        .with_context(|| format!("cannot create {}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| api.transport(url, e))?;
        total += chunk.len() as u64;
        if let Some(limit) = limit.filter(|l| total > *l) {
            bail!("{url} sent more than the expected {limit} bytes");
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .with_context(|| format!("cannot write {}", part.display()))?;
        meter.inc(chunk.len() as u64);
    }
    file.sync_all()
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    Ok((total, hex::encode(hasher.finalize())))
}

/// What `fetch` did to one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Downloaded,
    AlreadyPresent,
}

/// What `fetch --format npz` wrote.
pub struct Fetched {
    pub manifest: PathBuf,
    pub shards_dir: PathBuf,
    pub shards: usize,
    pub downloaded: usize,
    pub bytes: u64,
    /// Set when the manifest is partial (`"complete": false`).
    pub partial: Option<Partial>,
}

/// The results of a failed or cancelled job.
pub struct Partial {
    /// The job's final state (`failed`, `cancelled`).
    pub state: String,
    /// The shards the job had.
    pub total_shards: u64,
    /// Samples in the fetched shards.
    pub samples: u64,
    /// Samples the job asked for.
    pub num_samples: u64,
}

/// Downloads a finished job's shards into `out/shards/{index:06}.npz`,
/// verifying each against the manifest and keeping ones already there;
/// `out/manifest.json` is written last, so its presence marks a complete
/// download (of the shards the manifest lists: a failed or cancelled job's
/// manifest has `"complete": false` and lists the shards it finished).
pub async fn fetch_npz(api: &Api, job: JobId, out: &Path, parallel: usize) -> Result<Fetched> {
    let job_s = job.to_string();
    let url = api.url(&["v1", "jobs", &job_s, "results"]);
    let response = api
        .send(api.request(Method::GET, url.clone()).timeout(JSON_TIMEOUT))
        .await?;
    let raw = response.bytes().await.map_err(|e| api.transport(&url, e))?;
    let manifest: Manifest = serde_json::from_slice(&raw)
        .with_context(|| format!("the results manifest of job {job} is not valid"))?;
    check_manifest(&manifest, job)?;
    let partial = match is_complete(&raw) {
        // Servers before partial manifests sent no flag: complete.
        Some(true) | None => None,
        Some(false) => {
            let (view, _) = api.job(job).await?;
            Some(Partial {
                state: super::render::state_name(view.state).to_string(),
                total_shards: view.shards.total,
                samples: manifest.result_samples(),
                num_samples: manifest.num_samples,
            })
        }
    };

    let shards_dir = out.join("shards");
    tokio::fs::create_dir_all(&shards_dir)
        .await
        .with_context(|| format!("cannot create {}", shards_dir.display()))?;
    let total_bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    let meter = Meter::new(Some(total_bytes), Unit::Bytes, &format!("job {job}"));
    let finished = AtomicU64::new(0);
    let count = manifest.shards.len();
    meter.set_message(format!("job {job} shards 0/{count}"));
    let outcomes: Result<Vec<Outcome>> = futures::stream::iter(&manifest.shards)
        .map(|shard| {
            let (meter, finished, shards_dir) = (&meter, &finished, &shards_dir);
            async move {
                let outcome = fetch_shard(api, job, shard, shards_dir, meter).await?;
                let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
                meter.set_message(format!("job {job} shards {n}/{count}"));
                Ok(outcome)
            }
        })
        .buffer_unordered(parallel.max(1))
        .try_collect()
        .await;
    meter.finish();
    let outcomes = outcomes?;

    // A filtered job's result is the kept samples of its shards: gathered
    // into samples.npz (before the manifest, which marks the end).
    if manifest.shards.iter().any(|s| s.kept.is_some()) {
        let (m, dir, dest) = (
            manifest.clone(),
            shards_dir.clone(),
            out.join("samples.npz"),
        );
        tokio::task::spawn_blocking(move || kept_samples(&m, &dir, &dest))
            .await
            .context("gathering the kept samples panicked")??;
    }
    let manifest_path = out.join("manifest.json");
    let part = part_path(&manifest_path);
    tokio::fs::write(&part, &raw)
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    tokio::fs::rename(&part, &manifest_path)
        .await
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    Ok(Fetched {
        manifest: manifest_path,
        shards_dir,
        shards: count,
        downloaded: outcomes
            .iter()
            .filter(|o| **o == Outcome::Downloaded)
            .count(),
        bytes: total_bytes,
        partial,
    })
}

/// Writes the samples a filtered job's manifest keeps (`kept` per shard),
/// in index order, from the downloaded shards into `dest`.
fn kept_samples(m: &Manifest, shards_dir: &Path, dest: &Path) -> Result<()> {
    let mut all: Option<dig_model::structure::Ensemble> = None;
    for s in &m.shards {
        let path = shards_dir.join(shard_file_name(s.index));
        let kept = s.kept.as_deref().unwrap_or_default();
        let picked = dig_model::structure::Ensemble::read_npz_any(&path)?.select_indices(kept);
        if picked.num_samples() != kept.len() {
            bail!(
                "{} holds {} of the {} samples the manifest keeps from it",
                path.display(),
                picked.num_samples(),
                kept.len()
            );
        }
        match all.as_mut() {
            None => all = Some(picked),
            Some(a) => a.append(picked),
        }
    }
    if let Some(all) = all {
        all.write_npz(dest)?;
    }
    Ok(())
}

/// The manifest's `complete` flag, if it has one.
fn is_complete(raw: &[u8]) -> Option<bool> {
    serde_json::from_slice::<Value>(raw)
        .ok()?
        .get("complete")?
        .as_bool()
}

async fn fetch_shard(
    api: &Api,
    job: JobId,
    shard: &ManifestShard,
    dir: &Path,
    meter: &Meter,
) -> Result<Outcome> {
    let dest = dir.join(shard_file_name(shard.index));
    let what = format!("shard {} of job {job}", shard.index);
    if tokio::fs::metadata(&dest)
        .await
        .is_ok_and(|m| m.is_file() && m.len() == shard.bytes)
    {
        let (bytes, sha) = sha256_file(&dest).await?;
        if check_digest(&what, shard.bytes, &shard.sha256, bytes, &sha).is_ok() {
            meter.inc(shard.bytes);
            return Ok(Outcome::AlreadyPresent);
        }
        tracing::warn!(
            "{} differs from the manifest; downloading it again",
            dest.display()
        );
    }
    let url = api.url(&[
        "v1",
        "jobs",
        &job.to_string(),
        "results",
        &shard.index.to_string(),
    ]);
    let response = api.send(api.request(Method::GET, url.clone())).await?;
    let part = part_path(&dest);
    let received = stream_to_file(api, &url, response, &part, meter, Some(shard.bytes))
        .await
        .and_then(|(bytes, sha)| check_digest(&what, shard.bytes, &shard.sha256, bytes, &sha));
    if let Err(e) = received {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, &dest)
        .await
        .with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(Outcome::Downloaded)
}

/// Streams `GET /v1/jobs/{id}/results.pdb` to `out/{job}.pdb`; returns the
/// path and size.
pub async fn fetch_pdb(api: &Api, job: JobId, out: &Path) -> Result<(PathBuf, u64)> {
    fetch_whole(api, job, out, "results.pdb", &format!("{job}.pdb"), "pdb").await
}

/// Streams `GET /v1/jobs/{id}/results.xtc` to `out/{job}.xtc` and `GET
/// /v1/jobs/{id}/topology.pdb` to `out/{job}-topology.pdb`; returns their
/// paths and sizes.
pub async fn fetch_xtc(api: &Api, job: JobId, out: &Path) -> Result<[(PathBuf, u64); 2]> {
    let xtc = fetch_whole(api, job, out, "results.xtc", &format!("{job}.xtc"), "xtc").await?;
    let topology = fetch_whole(
        api,
        job,
        out,
        "topology.pdb",
        &format!("{job}-topology.pdb"),
        "topology",
    )
    .await?;
    Ok([xtc, topology])
}

/// Streams `GET /v1/jobs/{id}/{route}` to `out/{file}` (through a partial
/// file renamed at the end); returns the path and size.
async fn fetch_whole(
    api: &Api,
    job: JobId,
    out: &Path,
    route: &str,
    file: &str,
    label: &str,
) -> Result<(PathBuf, u64)> {
    tokio::fs::create_dir_all(out)
        .await
        .with_context(|| format!("cannot create {}", out.display()))?;
    let dest = out.join(file);
    let url = api.url(&["v1", "jobs", &job.to_string(), route]);
    let response = api.send(api.request(Method::GET, url.clone())).await?;
    let meter = Meter::new(
        response.content_length(),
        Unit::Bytes,
        &format!("job {job} {label}"),
    );
    let part = part_path(&dest);
    let received = stream_to_file(api, &url, response, &part, &meter, None).await;
    meter.finish();
    let bytes = match received {
        Ok((bytes, _)) => bytes,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&part, &dest)
        .await
        .with_context(|| format!("cannot write {}", dest.display()))?;
    tracing::debug!("wrote {} ({})", dest.display(), human_bytes(bytes));
    Ok((dest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(index: u64, sha: &str) -> ManifestShard {
        ManifestShard {
            index,
            start: index * 10,
            end: index * 10 + 10,
            key: format!("jobs/x/shards/{index}.npz"),
            bytes: 3,
            sha256: sha.into(),
            valid: None,
            kept: None,
        }
    }

    #[test]
    fn digests_must_match_size_and_hash() {
        let sha = hex::encode(Sha256::digest(b"abc"));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        check_digest("shard 0", 3, &sha, 3, &sha).unwrap();
        check_digest("shard 0", 3, &sha.to_uppercase(), 3, &sha).unwrap();
        let e = check_digest("shard 7 of job j", 3, &sha, 4, &sha).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("shard 7 of job j: received 4 bytes"),
            "{e}"
        );
        let other = "0".repeat(64);
        let e = check_digest("shard 7", 3, &sha, 3, &other).unwrap_err();
        assert!(e.to_string().contains(&other), "{e}");
        assert!(e.to_string().contains("the manifest says 3 bytes"), "{e}");
    }

    #[tokio::test]
    async fn file_digests_stream_the_file() {
        let dir = std::env::temp_dir().join(format!("digctl-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.bin");
        let data: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (n, sha) = sha256_file(&path).await.unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn manifests_are_checked_before_downloading() {
        let job = JobId::new();
        let good = "ab".repeat(32);
        let m = Manifest {
            job,
            num_samples: 20,
            shards: vec![shard(0, &good), shard(1, &good)],
            samples_valid: None,
            solver: Default::default(),
            steps: None,
            network_calls_per_sample: None,
            filter: None,
            steering: None,
            flow_above: None,
        };
        check_manifest(&m, job).unwrap();
        assert!(check_manifest(&m, JobId::new()).is_err());
        let dup = Manifest {
            shards: vec![shard(1, &good), shard(1, &good)],
            samples_valid: None,
            solver: Default::default(),
            steps: None,
            network_calls_per_sample: None,
            filter: None,
            ..m.clone()
        };
        assert!(check_manifest(&dup, job)
            .unwrap_err()
            .to_string()
            .contains("shard 1 twice"));
        let bad = Manifest {
            shards: vec![shard(0, "../../etc")],
            samples_valid: None,
            solver: Default::default(),
            steps: None,
            network_calls_per_sample: None,
            filter: None,
            ..m
        };
        assert!(check_manifest(&bad, job).is_err());
    }

    #[test]
    fn manifests_say_whether_they_are_complete() {
        assert_eq!(
            is_complete(br#"{"complete": false, "shards": []}"#),
            Some(false)
        );
        assert_eq!(is_complete(br#"{"complete": true}"#), Some(true));
        assert_eq!(is_complete(br#"{"job": "x"}"#), None);
    }

    #[test]
    fn shard_files_are_zero_padded_and_parts_get_a_suffix() {
        assert_eq!(shard_file_name(42), "000042.npz");
        assert_eq!(shard_file_name(1_234_567), "1234567.npz");
        assert_eq!(
            part_path(Path::new("out/shards/000001.npz")),
            Path::new("out/shards/000001.npz.part")
        );
    }
}
