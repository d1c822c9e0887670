//! The feature store against both backends: the real S3 server that
//! `scripts/services.sh` starts (SeaweedFS; every test under its own
//! `test-{uuid}` prefix, removed afterwards) and a local directory.
//!
//! Fixtures are `.npz` files built here from `.npy` bytes, as numpy writes
//! them.

use std::io::{Cursor, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dig_common::layout::ObjectLayout;
use dig_common::store::{
    check_sha256, open_store, FeatureRef, FeatureStore, StoreConfig, StoreKind,
};
use dig_common::CommonError;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

const MAX_BYTES: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Fixtures: .npy and .npz bytes

/// A `.npy` (format 1.0) with the header padded as numpy pads it.
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_txt = match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let fortran = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_txt}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// `n` little-endian float32 values, finite and varied.
fn f32s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((i % 997) as f32 * 0.01 - 5.0).to_le_bytes())
        .collect()
}

fn single(l: usize) -> (&'static str, Vec<u8>) {
    ("single", npy("<f4", false, &[l, 384], &f32s(l * 384)))
}

fn pair(l: usize) -> (&'static str, Vec<u8>) {
    ("pair", npy("<f4", false, &[l, l, 128], &f32s(l * l * 128)))
}

/// A numpy string scalar (`np.array("ACD")`): dtype `<U{len}`, shape `()`.
fn sequence(s: &str) -> (&'static str, Vec<u8>) {
    let data: Vec<u8> = s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
    (
        "sequence",
        npy(&format!("<U{}", s.chars().count()), false, &[], &data),
    )
}

/// An `.npz` as `numpy.savez` (stored) or `savez_compressed` (deflated)
/// writes it: one `{name}.npy` member per array.
fn npz(members: &[(&str, Vec<u8>)], method: CompressionMethod) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(method)
        .large_file(true);
    for (name, data) in members {
        zip.start_file(format!("{name}.npy"), options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Valid features of `l` residues with a sequence, uncompressed.
fn features(l: usize) -> Vec<u8> {
    let seq: String = "ACDEFGHIKLMNPQRSTVWY".chars().cycle().take(l).collect();
    npz(
        &[single(l), pair(l), sequence(&seq)],
        CompressionMethod::Stored,
    )
}

/// `bytes` as an upload body arriving in chunks of `chunk` bytes.
fn body(
    bytes: &[u8],
    chunk: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    let chunks: Vec<_> = bytes
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------
// Backends

/// One backend under a fresh prefix, with a spool directory for uploads.
struct Env {
    store: Arc<dyn ObjectStore>,
    is_s3: bool,
    prefix: String,
    layout: ObjectLayout,
    tmp: TempDir,
}

fn env_var(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{name} is not set: run scripts/services.sh (make test does)"))
}

/// The test S3 server's settings, with the given secret.
fn s3_config(secret: String) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::S3,
        s3_endpoint: Some(env_var("DIG_TEST_S3_ENDPOINT")),
        s3_bucket: Some(env_var("DIG_TEST_S3_BUCKET")),
        s3_region: std::env::var("AWS_REGION").ok(),
        s3_access_key_id: Some(env_var("AWS_ACCESS_KEY_ID")),
        s3_secret_access_key: Some(secret),
        ..StoreConfig::default()
    }
}

impl Env {
    fn new(store: Arc<dyn ObjectStore>, is_s3: bool, tmp: TempDir) -> Arc<Env> {
        let prefix = format!("test-{}", uuid::Uuid::now_v7());
        let layout = ObjectLayout::new(&prefix);
        Arc::new(Env {
            store,
            is_s3,
            prefix,
            layout,
            tmp,
        })
    }

    fn s3() -> Arc<Env> {
        let store = open_store(&s3_config(env_var("AWS_SECRET_ACCESS_KEY"))).unwrap();
        Env::new(store, true, TempDir::new().unwrap())
    }

    fn local() -> Arc<Env> {
        let tmp = TempDir::new().unwrap();
        let cfg = StoreConfig {
            kind: StoreKind::Local,
            local_dir: Some(tmp.path().join("store")),
            ..StoreConfig::default()
        };
        Env::new(open_store(&cfg).unwrap(), false, tmp)
    }

    fn spool_dir(&self) -> PathBuf {
        self.tmp.path().join("spool")
    }

    fn features(&self, max_bytes: u64) -> FeatureStore {
        FeatureStore::new(
            self.store.clone(),
            self.layout.clone(),
            max_bytes,
            self.spool_dir(),
        )
        .unwrap()
    }

    async fn objects(&self) -> Vec<ObjectMeta> {
        self.store
            .list(Some(&Path::from(self.prefix.as_str())))
            .try_collect()
            .await
            .unwrap()
    }

    fn spooled_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.spool_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    fn key(&self, sha256: &str) -> Path {
        Path::from(format!("{}/features/{sha256}.npz", self.prefix))
    }

    async fn cleanup(&self) {
        let paths =
            futures::stream::iter(self.objects().await.into_iter().map(|m| Ok(m.location))).boxed();
        let deleted: Vec<Path> = self.store.delete_stream(paths).try_collect().await.unwrap();
        assert!(
            self.objects().await.is_empty(),
            "{} objects left after cleanup",
            deleted.len()
        );
    }
}

/// Runs a case, then removes everything under its prefix even if it failed.
async fn run<F, Fut>(env: Arc<Env>, case: F)
where
    F: FnOnce(Arc<Env>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let outcome = AssertUnwindSafe(case(env.clone())).catch_unwind().await;
    env.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Each case once against S3 (`s3::case`) and once against local files
/// (`local::case`).
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod s3 {
            $( #[tokio::test] async fn $case() { super::run(super::Env::s3(), super::$case).await } )*
        }
        mod local {
            $( #[tokio::test] async fn $case() { super::run(super::Env::local(), super::$case).await } )*
        }
    };
}

on_both_backends!(
    upload_reports_sha256_length_and_bytes,
    upload_stores_the_identical_bytes_under_features_sha256_npz,
    second_identical_upload_writes_nothing,
    large_upload_goes_through_multipart_and_round_trips,
    compressed_npz_with_a_letter_array_sequence_is_accepted,
    example_features_written_by_numpy_are_accepted,
    upload_over_the_size_limit_is_rejected_and_leaves_nothing,
    single_of_the_wrong_width_is_rejected,
    pair_of_another_length_is_rejected,
    nan_or_infinite_values_are_rejected_with_their_count,
    float64_arrays_are_rejected,
    fortran_order_arrays_are_rejected,
    sequence_with_a_letter_outside_the_alphabet_is_rejected,
    sequence_of_another_length_is_rejected,
    archive_without_pair_is_rejected,
    truncated_array_is_rejected,
    non_npz_uploads_are_rejected,
    fetch_to_writes_the_stored_bytes_to_a_file,
    missing_features_are_not_found,
    malformed_digests_are_refused_before_any_request,
);

// ---------------------------------------------------------------------------
// Cases

async fn upload_reports_sha256_length_and_bytes(env: Arc<Env>) {
    let bytes = features(24);
    let got = env
        .features(MAX_BYTES)
        .put_stream(body(&bytes, 1000))
        .await
        .unwrap();
    assert_eq!(
        got,
        FeatureRef {
            sha256: sha256_hex(&bytes),
            length: 24,
            bytes: bytes.len() as u64
        }
    );
    let json = serde_json::to_value(&got).unwrap();
    assert_eq!(json["sha256"], sha256_hex(&bytes));
    assert_eq!(json["length"], 24);
    assert_eq!(json["bytes"], bytes.len() as u64);
    assert!(env.spooled_files().is_empty());
}

async fn upload_stores_the_identical_bytes_under_features_sha256_npz(env: Arc<Env>) {
    let bytes = features(24);
    let fs = env.features(MAX_BYTES);
    let got = fs.put_stream(body(&bytes, 4096)).await.unwrap();
    let objects = env.objects().await;
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].location, env.key(&got.sha256));
    assert_eq!(objects[0].size, bytes.len() as u64);
    let stored = env
        .store
        .get(&env.key(&got.sha256))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), bytes.as_slice());
    assert_eq!(
        fs.get_bytes(&got.sha256).await.unwrap().as_ref(),
        bytes.as_slice()
    );
    assert!(fs.exists(&got.sha256).await.unwrap());
    assert!(!fs.exists(&"0".repeat(64)).await.unwrap());
}

async fn second_identical_upload_writes_nothing(env: Arc<Env>) {
    let bytes = features(16);
    let fs = env.features(MAX_BYTES);
    let first = fs.put_stream(body(&bytes, 10_000)).await.unwrap();
    let before = env.store.head(&env.key(&first.sha256)).await.unwrap();
    // S3 reports last_modified in whole seconds: wait past one so that a
    // second write would show.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = fs.put_stream(body(&bytes, 777)).await.unwrap();
    assert_eq!(second, first);
    let after = env
        .store
        .head(&env.key(first.sha256.as_str()))
        .await
        .unwrap();
    assert_eq!(after.last_modified, before.last_modified);
    assert_eq!(after.e_tag, before.e_tag);
    assert_eq!(env.objects().await.len(), 1);
    assert!(env.spooled_files().is_empty());
}

async fn large_upload_goes_through_multipart_and_round_trips(env: Arc<Env>) {
    // L = 150: pair alone is 11.5 MB, above the 8 MiB single-PUT threshold.
    let bytes = features(150);
    assert!(bytes.len() > 8 * 1024 * 1024);
    let fs = env.features(MAX_BYTES);
    let got = fs.put_stream(body(&bytes, 64 * 1024)).await.unwrap();
    assert_eq!((got.length, got.bytes), (150, bytes.len() as u64));
    assert_eq!(got.sha256, sha256_hex(&bytes));
    let meta = env.store.head(&env.key(&got.sha256)).await.unwrap();
    assert_eq!(meta.size, bytes.len() as u64);
    if env.is_s3 {
        // S3 tags multipart objects `"{md5 of part md5s}-{parts}"`.
        let e_tag = meta.e_tag.clone().unwrap();
        assert!(e_tag.trim_matches('"').ends_with("-2"), "e_tag {e_tag}");
    }
    assert_eq!(
        fs.get_bytes(&got.sha256).await.unwrap().as_ref(),
        bytes.as_slice()
    );

    // Past a whole second of last_modified, as above: a rewrite would show.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(fs.put_stream(body(&bytes, 1 << 20)).await.unwrap(), got);
    let again = env.store.head(&env.key(&got.sha256)).await.unwrap();
    assert_eq!(
        (again.last_modified, again.e_tag),
        (meta.last_modified, meta.e_tag)
    );
    assert!(env.spooled_files().is_empty());
}

async fn compressed_npz_with_a_letter_array_sequence_is_accepted(env: Arc<Env>) {
    // `np.array(list("ACDEF..."))`: shape (L,), dtype <U1.
    let letters: Vec<u8> = "ACDEFGHIKLMNPQRSTVWX"
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    let seq = ("sequence", npy("<U1", false, &[20], &letters));
    let bytes = npz(&[seq, pair(20), single(20)], CompressionMethod::Deflated);
    let got = env
        .features(MAX_BYTES)
        .put_stream(body(&bytes, 5000))
        .await
        .unwrap();
    assert_eq!(
        got,
        FeatureRef {
            sha256: sha256_hex(&bytes),
            length: 20,
            bytes: bytes.len() as u64
        }
    );
    // A string padded with NULs (a wider <U dtype) counts its letters only.
    let mut padded: Vec<u8> = "ACDEF"
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    padded.extend([0u8; 12]);
    let seq = ("sequence", npy("<U8", false, &[], &padded));
    let bytes = npz(&[single(5), pair(5), seq], CompressionMethod::Deflated);
    assert_eq!(
        env.features(MAX_BYTES)
            .put_stream(body(&bytes, 5000))
            .await
            .unwrap()
            .length,
        5
    );
    assert_eq!(env.objects().await.len(), 2);
}

async fn example_features_written_by_numpy_are_accepted(env: Arc<Env>) {
    // HP35 as numpy.savez wrote it (zip64 extras and all): L = 35.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hp35/features.npz");
    let bytes = std::fs::read(path).unwrap();
    let got = env
        .features(MAX_BYTES)
        .put_stream(body(&bytes, 16 * 1024))
        .await
        .unwrap();
    assert_eq!(
        got,
        FeatureRef {
            sha256: sha256_hex(&bytes),
            length: 35,
            bytes: bytes.len() as u64
        }
    );
}

async fn upload_over_the_size_limit_is_rejected_and_leaves_nothing(env: Arc<Env>) {
    let bytes = features(24);
    assert!(bytes.len() > 100_000);
    let err = env
        .features(100_000)
        .put_stream(body(&bytes, 10_000))
        .await
        .unwrap_err();
    assert!(matches!(err, CommonError::Invalid(_)), "{err:?}");
    assert_eq!(err.to_string(), "features exceed the limit of 100000 bytes");
    assert!(env.objects().await.is_empty());
    assert!(env.spooled_files().is_empty());
    // Exactly at the limit is fine.
    let at_limit = env
        .features(bytes.len() as u64)
        .put_stream(body(&bytes, 10_000))
        .await
        .unwrap();
    assert_eq!(at_limit.bytes, bytes.len() as u64);
}

/// Uploads `bytes`, expecting an `Invalid` error with `message` and nothing
/// left behind: no object under the prefix, no spooled file.
async fn assert_rejected(env: &Env, bytes: &[u8], message: &str) {
    let err = env
        .features(MAX_BYTES)
        .put_stream(body(bytes, 3000))
        .await
        .unwrap_err();
    match &err {
        CommonError::Invalid(m) => assert_eq!(m, message),
        other => panic!("expected Invalid({message:?}), got {other:?}"),
    }
    assert!(
        env.objects().await.is_empty(),
        "objects left: {:?}",
        env.objects().await
    );
    assert!(
        env.spooled_files().is_empty(),
        "spooled files left: {:?}",
        env.spooled_files()
    );
}

async fn single_of_the_wrong_width_is_rejected(env: Arc<Env>) {
    let single = ("single", npy("<f4", false, &[24, 383], &f32s(24 * 383)));
    let bytes = npz(&[single, pair(24)], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "single has shape (24, 383); expected (L, 384)",
    )
    .await;
    let empty = ("single", npy("<f4", false, &[0, 384], &[]));
    let bytes = npz(&[empty, pair(0)], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "single has shape (0, 384); expected at least one residue",
    )
    .await;
}

async fn pair_of_another_length_is_rejected(env: Arc<Env>) {
    let pair = (
        "pair",
        npy("<f4", false, &[24, 23, 128], &f32s(24 * 23 * 128)),
    );
    let bytes = npz(&[single(24), pair], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "pair has shape (24, 23, 128); expected (L, L, 128) with L = 24 from single",
    )
    .await;
}

async fn nan_or_infinite_values_are_rejected_with_their_count(env: Arc<Env>) {
    let mut data = f32s(24 * 384);
    for (i, v) in [
        (0, f32::NAN),
        (100, f32::INFINITY),
        (24 * 384 - 1, f32::NEG_INFINITY),
    ] {
        data[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    let bytes = npz(
        &[("single", npy("<f4", false, &[24, 384], &data)), pair(24)],
        CompressionMethod::Stored,
    );
    assert_rejected(&env, &bytes, "single contains 3 NaN or infinite values").await;

    let mut data = f32s(24 * 24 * 128);
    let i = 24 * 24 * 100;
    data[i * 4..i * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bytes = npz(
        &[
            single(24),
            ("pair", npy("<f4", false, &[24, 24, 128], &data)),
        ],
        CompressionMethod::Deflated,
    );
    assert_rejected(&env, &bytes, "pair contains 1 NaN or infinite value").await;
}

async fn float64_arrays_are_rejected(env: Arc<Env>) {
    let single = (
        "single",
        npy("<f8", false, &[4, 384], &vec![0u8; 4 * 384 * 8]),
    );
    let bytes = npz(&[single, pair(4)], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "single has dtype '<f8'; expected float32 ('<f4')",
    )
    .await;
}

async fn fortran_order_arrays_are_rejected(env: Arc<Env>) {
    let pair = ("pair", npy("<f4", true, &[4, 4, 128], &f32s(4 * 4 * 128)));
    let bytes = npz(&[single(4), pair], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "pair is stored in Fortran order; save it in C order (numpy.ascontiguousarray)",
    )
    .await;
}

async fn sequence_with_a_letter_outside_the_alphabet_is_rejected(env: Arc<Env>) {
    let bytes = npz(
        &[single(6), pair(6), sequence("ACDEBG")],
        CompressionMethod::Stored,
    );
    assert_rejected(
        &env,
        &bytes,
        "sequence has 'B' at position 5, which is not one of ACDEFGHIKLMNPQRSTVWYX",
    )
    .await;
    let bytes = npz(
        &[single(6), pair(6), sequence("acdefg")],
        CompressionMethod::Stored,
    );
    assert_rejected(
        &env,
        &bytes,
        "sequence has 'a' at position 1, which is not one of ACDEFGHIKLMNPQRSTVWYX",
    )
    .await;
}

async fn sequence_of_another_length_is_rejected(env: Arc<Env>) {
    let bytes = npz(
        &[single(6), pair(6), sequence("ACDEF")],
        CompressionMethod::Stored,
    );
    assert_rejected(
        &env,
        &bytes,
        "sequence has 5 residues; expected L = 6 from single",
    )
    .await;
    // Bytes (`|S`) instead of unicode.
    let seq = ("sequence", npy("|S6", false, &[], b"ACDEFG"));
    let bytes = npz(&[single(6), pair(6), seq], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "sequence has dtype '|S6'; expected a unicode string ('<U')",
    )
    .await;
}

async fn archive_without_pair_is_rejected(env: Arc<Env>) {
    let bytes = npz(
        &[single(6), ("pairs", vec![1, 2, 3])],
        CompressionMethod::Stored,
    );
    assert_rejected(
        &env,
        &bytes,
        "the archive has no 'pair' array; an .npz of features needs single (L, 384) and pair (L, L, 128)",
    )
    .await;
}

async fn truncated_array_is_rejected(env: Arc<Env>) {
    let single = ("single", npy("<f4", false, &[6, 384], &f32s(6 * 384 - 1)));
    let bytes = npz(&[single, pair(6)], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "single is truncated: shape (6, 384) needs 9216 bytes of data",
    )
    .await;
    let single = ("single", npy("<f4", false, &[6, 384], &f32s(6 * 384 + 1)));
    let bytes = npz(&[single, pair(6)], CompressionMethod::Stored);
    assert_rejected(
        &env,
        &bytes,
        "single has more data than its shape (6, 384) holds",
    )
    .await;
}

async fn non_npz_uploads_are_rejected(env: Arc<Env>) {
    let expected = "not an .npz archive (a zip of .npy arrays, as numpy.savez writes)";
    assert_rejected(&env, b"hello, this is a FASTA file, not features", expected).await;
    assert_rejected(&env, b"", expected).await;
    // A zip, but its member is not a .npy array.
    let bytes = npz(
        &[("single", b"just text".to_vec()), pair(2)],
        CompressionMethod::Stored,
    );
    assert_rejected(&env, &bytes, "single is not a .npy array").await;
}

async fn fetch_to_writes_the_stored_bytes_to_a_file(env: Arc<Env>) {
    let bytes = features(40);
    let fs = env.features(MAX_BYTES);
    let got = fs.put_stream(body(&bytes, 8192)).await.unwrap();
    let out = env.tmp.path().join("fetched.npz");
    fs.fetch_to(&got.sha256, &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // Only the file itself: no partial file left next to it.
    let names: Vec<_> = std::fs::read_dir(env.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "spool" && n != "store")
        .collect();
    assert_eq!(names, ["fetched.npz"]);
}

async fn missing_features_are_not_found(env: Arc<Env>) {
    let fs = env.features(MAX_BYTES);
    let sha = "ab".repeat(32);
    let out = env.tmp.path().join("missing.npz");
    let err = fs.fetch_to(&sha, &out).await.unwrap_err();
    assert_eq!(err.to_string(), format!("not found: features {sha}"));
    assert!(!out.exists());
    assert!(matches!(
        fs.get_bytes(&sha).await,
        Err(CommonError::NotFound(_))
    ));
    assert!(!fs.exists(&sha).await.unwrap());
}

async fn malformed_digests_are_refused_before_any_request(env: Arc<Env>) {
    let fs = env.features(MAX_BYTES);
    for bad in ["../../secrets", "ABCDEF", &"A".repeat(64), &"a".repeat(63)] {
        assert!(
            matches!(fs.exists(bad).await, Err(CommonError::Invalid(_))),
            "{bad}"
        );
        assert!(
            matches!(fs.get_bytes(bad).await, Err(CommonError::Invalid(_))),
            "{bad}"
        );
        let out = env.tmp.path().join("x.npz");
        assert!(
            matches!(fs.fetch_to(bad, &out).await, Err(CommonError::Invalid(_))),
            "{bad}"
        );
        assert!(check_sha256(bad).is_err());
    }
}

// ---------------------------------------------------------------------------
// Configuration

#[tokio::test]
async fn s3_with_wrong_credentials_reports_an_error() {
    let store = open_store(&s3_config("not-the-secret".into())).unwrap();
    let tmp = TempDir::new().unwrap();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let fs = FeatureStore::new(
        store,
        ObjectLayout::new(&prefix),
        MAX_BYTES,
        tmp.path().join("spool"),
    )
    .unwrap();
    let err = fs.put_stream(body(&features(4), 1000)).await.unwrap_err();
    assert!(matches!(err, CommonError::Store(_)), "{err:?}");
    assert!(fs.exists(&"0".repeat(64)).await.is_err());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("spool")).unwrap().count(),
        0
    );
    // And nothing was written, as the right credentials see it.
    let env = Env::s3();
    let listed: Vec<ObjectMeta> = env
        .store
        .list(Some(&Path::from(prefix.as_str())))
        .try_collect()
        .await
        .unwrap();
    assert!(listed.is_empty());
}

#[test]
fn missing_or_half_set_settings_are_named() {
    let err = open_store(&StoreConfig {
        kind: StoreKind::Local,
        ..StoreConfig::default()
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "a local store needs a directory (local_dir)"
    );
    let half = StoreConfig {
        kind: StoreKind::S3,
        s3_bucket: Some("b".into()),
        s3_access_key_id: Some("k".into()),
        ..StoreConfig::default()
    };
    let err = open_store(&half).unwrap_err();
    assert!(matches!(err, CommonError::Invalid(_)));
    assert_eq!(
        err.to_string(),
        "S3 credentials are half set: give both s3_access_key_id and s3_secret_access_key"
    );
    assert_eq!("S3".parse::<StoreKind>().unwrap(), StoreKind::S3);
    assert_eq!("local".parse::<StoreKind>().unwrap(), StoreKind::Local);
    assert_eq!(
        "gcs".parse::<StoreKind>().unwrap_err().to_string(),
        "unknown store kind 'gcs'; expected 's3' or 'local'"
    );
}

#[test]
fn local_store_creates_its_directory_and_the_secret_stays_out_of_debug() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("a/b/c");
    let cfg = StoreConfig {
        kind: StoreKind::Local,
        local_dir: Some(dir.clone()),
        ..StoreConfig::default()
    };
    open_store(&cfg).unwrap();
    assert!(dir.is_dir());
    let cfg = StoreConfig {
        s3_secret_access_key: Some("hunter2".into()),
        ..StoreConfig::default()
    };
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("hunter2") && shown.contains("***"),
        "{shown}"
    );
}
