//! The object store (S3 or a local directory) and the content-addressed
//! feature store on top of it.
//!
//! - [`StoreConfig`] / [`open_store`]: one `Arc<dyn ObjectStore>` for every
//!   service, S3-compatible (SeaweedFS, MinIO, Amazon S3) or local files.
//! - [`FeatureStore`]: uploads of protein features (`.npz` with `single
//!   (L, 384)`, `pair (L, L, 128)` and an optional `sequence`), stored once
//!   under `features/{sha256}.npz`. An upload is spooled to a temporary file
//!   while it is hashed and counted, validated from that file, and only then
//!   written to the store, so a rejected upload leaves nothing behind and no
//!   upload is ever held in memory whole (a pair of L = 1000 is 512 MB).
//!
//! Messages of [`CommonError::Invalid`] are meant for a portal to show the
//! user as they are: they say what is wrong with the upload in its terms.

use std::fmt;
use std::io::Read;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::layout::ObjectLayout;
use crate::{CommonError, Result};

/// Width of the single representation: `single` is `(L, 384)`.
pub const SINGLE_DIM: u64 = 384;
/// Width of the pair representation: `pair` is `(L, L, 128)`.
pub const PAIR_DIM: u64 = 128;
/// One-letter codes accepted in a stored `sequence`: the 20 standard amino
/// acids and `X` for an unknown residue (the model's alphabet).
pub const AMINO_ACIDS: &str = "ACDEFGHIKLMNPQRSTVWYX";

/// Files up to this size are written with one PUT (create-if-absent); larger
/// ones as a multipart upload, so no upload is held in memory whole.
const MULTIPART_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Part size of multipart uploads: above S3's 5 MiB minimum.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once in a multipart upload (bounds memory to about
/// `PARTS_IN_FLIGHT * PART_SIZE`).
const PARTS_IN_FLIGHT: usize = 4;
/// Read size while spooling, validating and copying files.
const CHUNK: usize = 1024 * 1024;
/// An `.npz` may be deflated: its arrays may unpack to more than the upload
/// limit, but not to more than this many times it. Real features barely
/// compress; the cap stops a small "zip bomb" from costing minutes of CPU.
const MAX_UNPACK_RATIO: u64 = 16;
/// `.npy` headers are a few hundred bytes; a huge one is not an array.
const MAX_NPY_HEADER: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Configuration

/// Which backend holds the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// An S3-compatible server (SeaweedFS, MinIO, Amazon S3).
    S3,
    /// A local directory: single-machine deployments and tests.
    #[default]
    Local,
}

impl FromStr for StoreKind {
    type Err = CommonError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "s3" => Ok(StoreKind::S3),
            "local" => Ok(StoreKind::Local),
            _ => Err(CommonError::Invalid(format!(
                "unknown store kind '{s}'; expected 's3' or 'local'"
            ))),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::S3 => "s3",
            StoreKind::Local => "local",
        })
    }
}

/// Where the objects live. Unset S3 settings fall back to the usual
/// environment variables (named on each field), so a deployment can keep
/// credentials out of command lines.
#[derive(Clone, Default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `None`: `AWS_ENDPOINT_URL`, then `AWS_ENDPOINT`; neither: Amazon S3.
    pub s3_endpoint: Option<String>,
    /// `None`: `AWS_BUCKET`, then `AWS_BUCKET_NAME`.
    pub s3_bucket: Option<String>,
    /// `None`: `AWS_REGION`, then `AWS_DEFAULT_REGION`, else `us-east-1`
    /// (S3-compatible servers ignore it, but requests are signed with it).
    pub s3_region: Option<String>,
    /// Give both or neither; neither: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` if set).
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// The directory of a local store; created if missing.
    pub local_dir: Option<PathBuf>,
    /// Key prefix of this deployment (or test) inside the bucket/directory.
    pub prefix: String,
}

impl StoreConfig {
    /// The key layout under this configuration's prefix.
    pub fn layout(&self) -> ObjectLayout {
        ObjectLayout::new(&self.prefix)
    }
}

// Hand-written so that logging a configuration never prints the secret.
impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_region", &self.s3_region)
            .field("s3_access_key_id", &self.s3_access_key_id)
            .field(
                "s3_secret_access_key",
                &self.s3_secret_access_key.as_ref().map(|_| "***"),
            )
            .field("local_dir", &self.local_dir)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The first non-empty of an explicit setting and the environment variables.
fn setting(explicit: &Option<String>, vars: &[&str]) -> Option<String> {
    explicit.clone().filter(|v| !v.is_empty()).or_else(|| {
        vars.iter()
            .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()))
    })
}

/// Opens the configured store. Nothing is contacted yet: a wrong endpoint or
/// credentials show up as an error of the first request.
pub fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>> {
    match cfg.kind {
        StoreKind::Local => {
            let dir = cfg.local_dir.as_ref().ok_or_else(|| {
                CommonError::Invalid("a local store needs a directory (local_dir)".into())
            })?;
            std::fs::create_dir_all(dir).map_err(|e| {
                CommonError::Other(format!(
                    "cannot create the store directory {}: {e}",
                    dir.display()
                ))
            })?;
            Ok(Arc::new(LocalFileSystem::new_with_prefix(dir)?))
        }
        StoreKind::S3 => {
            let bucket =
                setting(&cfg.s3_bucket, &["AWS_BUCKET", "AWS_BUCKET_NAME"]).ok_or_else(|| {
                    CommonError::Invalid(
                        "an S3 store needs a bucket: set s3_bucket or AWS_BUCKET".into(),
                    )
                })?;
            let region = setting(&cfg.s3_region, &["AWS_REGION", "AWS_DEFAULT_REGION"])
                .unwrap_or_else(|| "us-east-1".into());
            // Credentials come as a pair from one place: a key from the
            // configuration with a secret from the environment is a mistake.
            // Without any, we fail here rather than let object_store probe
            // instance metadata, which hangs for a while off-cloud.
            let (key, secret, token) = match (&cfg.s3_access_key_id, &cfg.s3_secret_access_key) {
                (Some(k), Some(s)) => (k.clone(), s.clone(), None),
                (None, None) => {
                    let key = setting(&None, &["AWS_ACCESS_KEY_ID"]);
                    let secret = setting(&None, &["AWS_SECRET_ACCESS_KEY"]);
                    match (key, secret) {
                        (Some(k), Some(s)) => (k, s, setting(&None, &["AWS_SESSION_TOKEN"])),
                        _ => {
                            return Err(CommonError::Invalid(
                                "an S3 store needs credentials: set s3_access_key_id and \
                                 s3_secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                                    .into(),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(CommonError::Invalid(
                        "S3 credentials are half set: give both s3_access_key_id and \
                         s3_secret_access_key"
                            .into(),
                    ))
                }
            };
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(region)
                .with_access_key_id(key)
                .with_secret_access_key(secret);
            if let Some(token) = token {
                builder = builder.with_token(token);
            }
            if let Some(endpoint) = setting(&cfg.s3_endpoint, &["AWS_ENDPOINT_URL", "AWS_ENDPOINT"])
            {
                // Self-hosted S3 servers are addressed path-style
                // (`endpoint/bucket/key`) and often over plain HTTP inside
                // the cluster.
                builder = builder
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false)
                    .with_endpoint(endpoint);
            }
            Ok(Arc::new(builder.build()?))
        }
    }
}

// ---------------------------------------------------------------------------
// Feature store

/// What a stored feature file is: its content address and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureRef {
    /// SHA-256 of the file's bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// Number of residues L.
    pub length: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Whether `s` is a SHA-256 digest as this crate writes them: 64 lowercase
/// hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Rejects anything but a SHA-256 digest, before it becomes part of a key
/// (a digest from a URL must not be able to address other objects).
pub fn check_sha256(s: &str) -> Result<()> {
    if is_sha256(s) {
        Ok(())
    } else {
        let shown: String = s.chars().take(80).collect();
        Err(CommonError::Invalid(format!(
            "'{shown}' is not a SHA-256 digest (64 lowercase hex digits)"
        )))
    }
}

/// Content-addressed protein features in the object store.
#[derive(Debug, Clone)]
pub struct FeatureStore {
    store: Arc<dyn ObjectStore>,
    layout: ObjectLayout,
    /// Largest accepted upload, in bytes.
    max_bytes: u64,
    /// Where uploads are spooled before validation.
    tmp_dir: PathBuf,
}

impl FeatureStore {
    /// `tmp_dir` (created if missing) should be on a disk with room for a few
    /// uploads of `max_bytes`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        layout: ObjectLayout,
        max_bytes: u64,
        tmp_dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        let tmp_dir = tmp_dir.into();
        std::fs::create_dir_all(&tmp_dir).map_err(|e| {
            CommonError::Other(format!(
                "cannot create the upload directory {}: {e}",
                tmp_dir.display()
            ))
        })?;
        Ok(FeatureStore {
            store,
            layout,
            max_bytes,
            tmp_dir,
        })
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn layout(&self) -> &ObjectLayout {
        &self.layout
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Stores an uploaded `.npz` once validated: spools `body` to a temporary
    /// file while hashing and counting it (rejecting it as soon as it
    /// exceeds the limit), validates the file, and writes it to
    /// `features/{sha256}.npz` unless that object already exists. Uploading
    /// the same bytes again writes nothing and returns the same reference.
    ///
    /// On any error nothing is left behind: no temporary file, no object.
    pub async fn put_stream<S, E>(&self, mut body: S) -> Result<FeatureRef>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The guard also removes the file when this future is dropped half
        // way (a client hanging up cancels the request handler).
        let tmp = TempFile(
            self.tmp_dir
                .join(format!("upload-{}.npz.part", uuid::Uuid::now_v7())),
        );
        let (sha256, bytes) = self.spool(&mut body, &tmp.0).await?;

        let path = tmp.0.clone();
        let unpack_limit = self.max_bytes.saturating_mul(MAX_UNPACK_RATIO);
        // Validation reads up to hundreds of MB and is CPU-bound: keep it
        // off the async workers.
        let length = tokio::task::spawn_blocking(move || validate_npz(&path, unpack_limit))
            .await
            .map_err(|e| CommonError::Other(format!("feature validation stopped: {e}")))??;

        let key = self.layout.features(&sha256);
        if self.upload(&key, &tmp.0, bytes).await? {
            tracing::info!(%sha256, length, bytes, "stored features");
        } else {
            tracing::debug!(%sha256, "features already stored");
        }
        Ok(FeatureRef {
            sha256,
            length,
            bytes,
        })
    }

    /// Writes `body` to `path`, returning its SHA-256 (hex) and size.
    async fn spool<S, E>(&self, body: &mut S, path: &FsPath) -> Result<(String, u64)>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await?;
        let mut file = tokio::io::BufWriter::with_capacity(CHUNK, file);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                CommonError::Other(format!("reading the upload failed: {}", e.into()))
            })?;
            bytes += chunk.len() as u64;
            if bytes > self.max_bytes {
                return Err(CommonError::Invalid(format!(
                    "features exceed the limit of {} bytes",
                    self.max_bytes
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok((hex::encode(hasher.finalize()), bytes))
    }

    /// Writes `file` to `key` unless the object exists; `true` if written.
    async fn upload(&self, key: &Path, file: &FsPath, bytes: u64) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if bytes <= MULTIPART_THRESHOLD {
            let data = tokio::fs::read(file).await?;
            // Create-if-absent: of two concurrent uploads, one writes.
            return match self
                .store
                .put_opts(key, PutPayload::from(data), PutMode::Create.into())
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        // Multipart uploads cannot be create-if-absent; the `head` above
        // skips the common case, and a concurrent upload of the same key
        // writes the same bytes (the key is their hash), so the race is
        // harmless.
        let mut writer =
            WriteMultipart::new_with_chunk_size(self.store.put_multipart(key).await?, PART_SIZE);
        match copy_into(file, &mut writer).await {
            Ok(()) => {
                writer.finish().await?;
                Ok(true)
            }
            Err(e) => {
                // Best effort: an unfinished upload is invisible anyway and
                // the bucket's lifecycle rules reap it.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(%key, error = %abort, "aborting a multipart upload failed");
                }
                Err(e)
            }
        }
    }

    /// Whether features with this digest are stored.
    pub async fn exists(&self, sha256: &str) -> Result<bool> {
        check_sha256(sha256)?;
        match self.store.head(&self.layout.features(sha256)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole feature file in memory (for small files and tests; workers
    /// use [`FeatureStore::fetch_to`]).
    pub async fn get_bytes(&self, sha256: &str) -> Result<Bytes> {
        check_sha256(sha256)?;
        let result = self
            .store
            .get(&self.layout.features(sha256))
            .await
            .map_err(not_found(sha256))?;
        Ok(result.bytes().await?)
    }

    /// Streams the feature file to `path`. The file appears complete or not
    /// at all: it is written next to `path` and renamed into place.
    pub async fn fetch_to(&self, sha256: &str, path: &FsPath) -> Result<()> {
        check_sha256(sha256)?;
        let result = self
            .store
            .get(&self.layout.features(sha256))
            .await
            .map_err(not_found(sha256))?;
        let mut part = path.as_os_str().to_owned();
        part.push(format!(".part-{}", uuid::Uuid::now_v7()));
        let tmp = TempFile(PathBuf::from(part));
        let mut file = tokio::fs::File::create(&tmp.0).await?;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&tmp.0, path).await?;
        tmp.disarm();
        Ok(())
    }
}

/// Maps a missing feature object to [`CommonError::NotFound`].
fn not_found(sha256: &str) -> impl FnOnce(object_store::Error) -> CommonError + '_ {
    move |e| match e {
        object_store::Error::NotFound { .. } => CommonError::NotFound(format!("features {sha256}")),
        e => e.into(),
    }
}

/// Feeds a file to a multipart upload, a bounded number of parts at a time.
async fn copy_into(file: &FsPath, writer: &mut WriteMultipart) -> Result<()> {
    let mut file = tokio::fs::File::open(file).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        writer.write(&buf[..n]);
    }
}

/// A temporary file removed when dropped, unless disarmed.
struct TempFile(PathBuf);

impl TempFile {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a temporary file")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// .npz validation

fn invalid(msg: impl Into<String>) -> CommonError {
    CommonError::Invalid(msg.into())
}

/// Checks an `.npz` (stored or deflated) holding `single (L, 384)` and
/// `pair (L, L, 128)` as C-order `<f4` with finite values and optionally a
/// unicode `sequence` of L letters of [`AMINO_ACIDS`]; returns L. Arrays are
/// streamed in chunks, never loaded whole. Other members are ignored.
fn validate_npz(path: &FsPath, unpack_limit: u64) -> Result<u64> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut zip = zip::ZipArchive::new(file).map_err(|_| {
        invalid("not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    })?;
    let missing = |name: &str| {
        invalid(format!(
            "the archive has no '{name}' array; an .npz of features needs single (L, {SINGLE_DIM}) \
             and pair (L, L, {PAIR_DIM})"
        ))
    };
    let mut unpacked = 0u64;
    let mut budget = |name: &str, bytes: u64| {
        unpacked = unpacked.saturating_add(bytes);
        if unpacked > unpack_limit {
            Err(invalid(format!(
                "the arrays unpack to more than {unpack_limit} bytes ({MAX_UNPACK_RATIO} times the \
                 upload limit) at '{name}'"
            )))
        } else {
            Ok(())
        }
    };

    let length = with_member(&mut zip, "single", |r| {
        let h = read_npy_header(r, "single")?;
        h.expect_f4("single")?;
        if h.shape.len() != 2 || h.shape[1] != SINGLE_DIM {
            return Err(invalid(format!(
                "single has shape {}; expected (L, {SINGLE_DIM})",
                fmt_shape(&h.shape)
            )));
        }
        if h.shape[0] == 0 {
            return Err(invalid(format!(
                "single has shape {}; expected at least one residue",
                fmt_shape(&h.shape)
            )));
        }
        let size = h.data_bytes("single", 4)?;
        budget("single", size)?;
        check_finite(r, "single", &h.shape, size)?;
        Ok(h.shape[0])
    })?
    .ok_or_else(|| missing("single"))?;

    with_member(&mut zip, "pair", |r| {
        let h = read_npy_header(r, "pair")?;
        h.expect_f4("pair")?;
        if h.shape != [length, length, PAIR_DIM] {
            return Err(invalid(format!(
                "pair has shape {}; expected (L, L, {PAIR_DIM}) with L = {length} from single",
                fmt_shape(&h.shape)
            )));
        }
        let size = h.data_bytes("pair", 4)?;
        budget("pair", size)?;
        check_finite(r, "pair", &h.shape, size)
    })?
    .ok_or_else(|| missing("pair"))?;

    with_member(&mut zip, "sequence", |r| {
        let h = read_npy_header(r, "sequence")?;
        let width = match &h.descr {
            Descr::Simple(d) => d.strip_prefix("<U").and_then(|w| w.parse::<u64>().ok()),
            Descr::Structured => None,
        }
        .ok_or_else(|| {
            invalid(format!(
                "sequence has dtype {}; expected a unicode string ('<U')",
                h.descr
            ))
        })?;
        if h.fortran_order {
            return Err(fortran("sequence"));
        }
        let size = h.data_bytes("sequence", width.saturating_mul(4))?;
        budget("sequence", size)?;
        check_sequence(r, &h.shape, width, size, length)
    })?;
    Ok(length)
}

/// `batches/{id}.json`, the record of a submitted batch; `None` when there
/// is none (never submitted, or a submission undone). The one reader of
/// batch records (the API's batch routes, the coordinator's reconciler).
pub async fn read_batch_record(
    store: &dyn ObjectStore,
    layout: &ObjectLayout,
    id: crate::job::JobId,
) -> Result<Option<crate::job::BatchRecord>> {
    let bytes = match store.get(&layout.batch(id)).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| CommonError::Other(format!("batch {id}: unreadable record: {e}")))
}

/// The `valid` (N,) array of a shard's `.npz` (bool, `|b1`), as written by
/// the workers since samples carry their physical validity; `None` for a
/// shard written before (no `valid` member).
pub fn shard_valid_mask(npz: &[u8]) -> Result<Option<Vec<bool>>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(npz))
        .map_err(|e| invalid(format!("a shard is not an .npz archive: {e}")))?;
    with_member(&mut zip, "valid", |r| {
        let h = read_npy_header(r, "valid")?;
        if h.descr != Descr::Simple("|b1".into()) || h.fortran_order || h.shape.len() != 1 {
            return Err(invalid(format!(
                "valid has dtype {} and shape {}; expected bool (N,)",
                h.descr,
                fmt_shape(&h.shape)
            )));
        }
        let mut buf = vec![0u8; h.shape[0] as usize];
        read_member(r, &mut buf, "valid")?;
        Ok(buf.into_iter().map(|b| b != 0).collect())
    })
}

/// Runs `f` on the member `{name}.npy` (or `name`), if there is one.
fn with_member<R: Read + std::io::Seek, T>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    f: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<Option<T>> {
    let Some(index) = zip
        .index_for_name(&format!("{name}.npy"))
        .or_else(|| zip.index_for_name(name))
    else {
        return Ok(None);
    };
    let mut member = zip.by_index(index).map_err(|e| {
        invalid(format!(
            "the .npz archive is damaged or uses an unsupported zip feature ({name}: {e})"
        ))
    })?;
    f(&mut member).map(Some)
}

/// `read_exact` on a member, with errors in the upload's terms.
fn read_member(r: &mut dyn Read, buf: &mut [u8], name: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| member_error(e, name))
}

fn member_error(e: std::io::Error, name: &str) -> CommonError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        invalid(format!("{name} is truncated"))
    } else {
        // Deflate errors and checksum mismatches arrive as I/O errors.
        invalid(format!("the .npz archive is damaged ({name}: {e})"))
    }
}

fn fortran(name: &str) -> CommonError {
    invalid(format!(
        "{name} is stored in Fortran order; save it in C order (numpy.ascontiguousarray)"
    ))
}

/// `(24, 384)`, `(5,)`, `()`: shapes as numpy prints them.
fn fmt_shape(shape: &[u64]) -> String {
    match shape {
        [] => "()".into(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Debug, PartialEq)]
enum Descr {
    Simple(String),
    /// A record dtype (a list of fields): never what we want.
    Structured,
}

impl fmt::Display for Descr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Descr::Simple(d) => write!(f, "'{d}'"),
            Descr::Structured => f.write_str("a structured (record) type"),
        }
    }
}

#[derive(Debug, PartialEq)]
struct NpyHeader {
    descr: Descr,
    fortran_order: bool,
    shape: Vec<u64>,
}

impl NpyHeader {
    fn expect_f4(&self, name: &str) -> Result<()> {
        if self.descr != Descr::Simple("<f4".into()) {
            return Err(invalid(format!(
                "{name} has dtype {}; expected float32 ('<f4')",
                self.descr
            )));
        }
        if self.fortran_order {
            return Err(fortran(name));
        }
        Ok(())
    }

    /// Size of the data in bytes for items of `item` bytes.
    fn data_bytes(&self, name: &str, item: u64) -> Result<u64> {
        self.shape
            .iter()
            .try_fold(item, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| {
                invalid(format!(
                    "{name} has an impossible shape {}",
                    fmt_shape(&self.shape)
                ))
            })
    }
}

/// Reads the magic, version and header dict of a `.npy` stream, leaving
/// the reader at the start of the data.
fn read_npy_header(r: &mut dyn Read, name: &str) -> Result<NpyHeader> {
    let not_npy = || invalid(format!("{name} is not a .npy array"));
    let mut pre = [0u8; 8];
    read_member(r, &mut pre, name).map_err(|e| match e {
        CommonError::Invalid(m) if m.ends_with("is truncated") => not_npy(),
        e => e,
    })?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(not_npy());
    }
    let header_len = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            read_member(r, &mut b, name)?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            read_member(r, &mut b, name)?;
            u32::from_le_bytes(b) as usize
        }
        v => {
            return Err(invalid(format!(
                "{name} uses .npy format version {v}, which is not supported (1 to 3 are)"
            )))
        }
    };
    if header_len > MAX_NPY_HEADER {
        return Err(invalid(format!(
            "{name} has an implausibly large .npy header"
        )));
    }
    let mut header = vec![0u8; header_len];
    read_member(r, &mut header, name)?;
    parse_header_dict(&String::from_utf8_lossy(&header))
        .ok_or_else(|| invalid(format!("{name} has an unreadable .npy header")))
}

/// Parses the Python literal of a `.npy` header:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (24, 384), }`.
/// `None` for anything else (numpy writes nothing else).
fn parse_header_dict(s: &str) -> Option<NpyHeader> {
    let mut p = Literal {
        s: s.as_bytes(),
        i: 0,
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.ws();
    p.eat(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}').is_some() {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        match key.as_str() {
            "descr" if p.peek()? == b'[' => {
                p.skip_nested()?;
                descr = Some(Descr::Structured);
            }
            "descr" => descr = Some(Descr::Simple(p.string()?)),
            "fortran_order" => fortran_order = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            _ => return None,
        }
        p.ws();
        if p.eat(b',').is_none() {
            p.ws();
            p.eat(b'}')?;
            break;
        }
    }
    Some(NpyHeader {
        descr: descr?,
        fortran_order: fortran_order?,
        shape: shape?,
    })
}

/// A cursor over a Python literal.
struct Literal<'a> {
    s: &'a [u8],
    i: usize,
}

impl Literal<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }
    fn string(&mut self) -> Option<String> {
        let quote = self.peek().filter(|&q| q == b'\'' || q == b'"')?;
        self.i += 1;
        let start = self.i;
        let len = self.s[start..].iter().position(|&c| c == quote)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }
    fn boolean(&mut self) -> Option<bool> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(value);
            }
        }
        None
    }
    fn tuple(&mut self) -> Option<Vec<u64>> {
        self.eat(b'(')?;
        let mut items = Vec::new();
        loop {
            self.ws();
            if self.eat(b')').is_some() {
                return Some(items);
            }
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            items.push(
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()?
                    .parse()
                    .ok()?,
            );
            // Python 2's numpy wrote longs as `24L`.
            let _ = self.eat(b'L');
            self.ws();
            if self.eat(b',').is_none() {
                self.ws();
                self.eat(b')')?;
                return Some(items);
            }
        }
    }
    /// Skips a bracketed value such as a record dtype's field list.
    fn skip_nested(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'[' | b'(' => depth += 1,
                b']' | b')' => depth -= 1,
                q @ (b'\'' | b'"') => {
                    let len = self.s[self.i + 1..].iter().position(|&c| c == q)?;
                    self.i += len + 1;
                }
                _ => {}
            }
            self.i += 1;
            if depth == 0 {
                return Some(());
            }
        }
    }
}

/// Streams exactly `size` bytes of array data through `f` in chunks of
/// whole 4-byte items, then checks that the member ends there (reading to
/// the end also makes the zip reader verify the member's checksum).
fn stream_data(
    r: &mut dyn Read,
    name: &str,
    shape: &[u64],
    size: u64,
    mut f: impl FnMut(&[u8]),
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        read_member(r, &mut buf[..n], name).map_err(|e| match e {
            CommonError::Invalid(m) if m.ends_with("is truncated") => invalid(format!(
                "{name} is truncated: shape {} needs {size} bytes of data",
                fmt_shape(shape)
            )),
            e => e,
        })?;
        f(&buf[..n]);
        left -= n as u64;
    }
    match r.read(&mut buf[..1]) {
        Ok(0) => Ok(()),
        Ok(_) => Err(invalid(format!(
            "{name} has more data than its shape {} holds",
            fmt_shape(shape)
        ))),
        Err(e) => Err(member_error(e, name)),
    }
}

/// Counts NaN and infinite `<f4` values; any is an error.
fn check_finite(r: &mut dyn Read, name: &str, shape: &[u64], size: u64) -> Result<()> {
    let mut bad = 0u64;
    stream_data(r, name, shape, size, |chunk| {
        // All exponent bits set: infinite or NaN.
        bad += chunk
            .chunks_exact(4)
            .filter(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count() as u64;
    })?;
    match bad {
        0 => Ok(()),
        1 => Err(invalid(format!("{name} contains 1 NaN or infinite value"))),
        n => Err(invalid(format!(
            "{name} contains {n} NaN or infinite values"
        ))),
    }
}

/// Checks a `<U{width}` array holding the sequence: its elements, each
/// stripped of trailing NULs as numpy does, joined, must be `length` letters
/// of [`AMINO_ACIDS`]. One string or an array of letters both work (as in
/// the model's reader).
fn check_sequence(
    r: &mut dyn Read,
    shape: &[u64],
    width: u64,
    size: u64,
    length: u64,
) -> Result<()> {
    let mut residues = 0u64;
    let mut nuls = 0u64; // pending NULs: trailing unless a letter follows
    let mut in_item = 0u64;
    let mut first_bad: Option<(u64, String)> = None;
    stream_data(r, "sequence", shape, size, |chunk| {
        for b in chunk.chunks_exact(4) {
            let code = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if code == 0 {
                nuls += 1;
            } else {
                if nuls > 0 && first_bad.is_none() {
                    first_bad = Some((residues + 1, "'\\0'".into()));
                }
                residues += nuls + 1;
                nuls = 0;
                if first_bad.is_none() {
                    match char::from_u32(code) {
                        Some(c) if AMINO_ACIDS.contains(c) => {}
                        Some(c) => first_bad = Some((residues, format!("'{}'", c.escape_debug()))),
                        None => first_bad = Some((residues, format!("U+{code:X}"))),
                    }
                }
            }
            in_item += 1;
            if in_item == width {
                in_item = 0;
                nuls = 0;
            }
        }
    })?;
    if let Some((pos, c)) = first_bad {
        return Err(invalid(format!(
            "sequence has {c} at position {pos}, which is not one of {AMINO_ACIDS}"
        )));
    }
    if residues != length {
        return Err(invalid(format!(
            "sequence has {residues} residues; expected L = {length} from single"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dicts_as_numpy_writes_them_parse() {
        let h = parse_header_dict(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (24, 384), }     \n",
        )
        .unwrap();
        assert_eq!(
            h,
            NpyHeader {
                descr: Descr::Simple("<f4".into()),
                fortran_order: false,
                shape: vec![24, 384]
            }
        );
        let h =
            parse_header_dict("{'descr': '<U5', 'fortran_order': True, 'shape': (), }").unwrap();
        assert_eq!((h.shape, h.fortran_order), (vec![], true));
        let h =
            parse_header_dict("{'descr': '<U1', 'fortran_order': False, 'shape': (7,)}").unwrap();
        assert_eq!(h.shape, vec![7]);
        let h = parse_header_dict(
            "{'descr': [('a', '<f4'), ('b', '<i8', (2,))], 'fortran_order': False, 'shape': (3,), }",
        )
        .unwrap();
        assert_eq!(h.descr, Descr::Structured);
    }

    #[test]
    fn malformed_header_dicts_are_refused() {
        for bad in [
            "",
            "{'descr': '<f4', 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}",
        ] {
            assert_eq!(parse_header_dict(bad), None, "{bad}");
        }
    }

    #[test]
    fn shapes_print_as_numpy_prints_them() {
        assert_eq!(fmt_shape(&[]), "()");
        assert_eq!(fmt_shape(&[5]), "(5,)");
        assert_eq!(fmt_shape(&[24, 23, 128]), "(24, 23, 128)");
    }

    #[test]
    fn sha256_digests_are_64_lowercase_hex_digits() {
        assert!(is_sha256(&"0a".repeat(32)));
        assert!(!is_sha256(&"0A".repeat(32)));
        assert!(!is_sha256(&"0a".repeat(31)));
        assert!(!is_sha256("../../etc/passwd"));
        let err = check_sha256("xyz").unwrap_err().to_string();
        assert_eq!(
            err,
            "'xyz' is not a SHA-256 digest (64 lowercase hex digits)"
        );
    }
}
