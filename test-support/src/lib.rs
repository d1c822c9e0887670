//! What every crate's tests on the real servers need: the servers'
//! endpoints from the `DIG_TEST_*` variables that `scripts/services.sh`
//! writes to `.services/env` (`make test` starts the servers when absent
//! and exports them), a fresh namespace per test, clients of RabbitMQ,
//! Redis and S3 in it, the published fixture model uploaded, and a cleanup
//! that leaves nothing of the namespace on any server.

use std::path::PathBuf;
use std::sync::Arc;

use dig_common::job::JobId;
use dig_common::layout::ObjectLayout;
use dig_common::progress::{ProgressStore, RedisProgress};
use dig_common::queue::{RabbitQueue, ShardQueue};
use dig_common::store::{open_store, StoreConfig, StoreKind};
use futures::TryStreamExt;
use object_store::{ObjectStore, PutPayload};

/// The fixture protein's sequence (`model/tests/data/features.npz`).
pub const SEQUENCE: &str = "MKTAYIAKQRQISFVKSHFSRQLE";

/// The id tests upload the fixture model under.
pub const MODEL: &str = "dig-small";

/// A file of the published code's fixtures (`model/tests/data`); `""` is
/// the directory itself, which is also a model directory.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data")
        .join(name)
}

/// A `DIG_TEST_*` variable; panics saying how to get it.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `make test`, or `scripts/services.sh` and `source .services/env`")
    })
}

/// The S3 store of the test server under `prefix`.
pub fn s3_config(prefix: &str) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::S3,
        s3_endpoint: Some(env("DIG_TEST_S3_ENDPOINT")),
        s3_bucket: Some(env("DIG_TEST_S3_BUCKET")),
        prefix: prefix.to_string(),
        ..StoreConfig::default()
    }
}

/// Clients of the three servers, in one namespace (queue names, Redis key
/// prefix, object prefix).
pub struct Servers {
    pub prefix: String,
    pub store: Arc<dyn ObjectStore>,
    pub layout: ObjectLayout,
    pub queue: Arc<RabbitQueue>,
    pub progress: Arc<RedisProgress>,
}

impl Servers {
    /// A fresh namespace (`test-{uuid}`): tests run in parallel.
    pub async fn fresh() -> Servers {
        Servers::connect(&format!("test-{}", JobId::new())).await
    }

    /// The namespace `prefix`.
    pub async fn connect(prefix: &str) -> Servers {
        let store = open_store(&s3_config(prefix)).expect("open the test S3 store");
        let queue = RabbitQueue::connect(&env("DIG_TEST_AMQP"), prefix)
            .await
            .expect("connect to DIG_TEST_AMQP");
        let progress = RedisProgress::connect(&env("DIG_TEST_REDIS"), prefix)
            .await
            .expect("connect to DIG_TEST_REDIS");
        Servers {
            prefix: prefix.to_string(),
            store,
            layout: ObjectLayout::new(prefix),
            queue: Arc::new(queue),
            progress: Arc::new(progress),
        }
    }

    /// Uploads the fixture model as [`MODEL`] (as `digctl upload-model` does).
    pub async fn upload_fixture_model(&self) {
        for file in ["config.json", "model.safetensors"] {
            let data = std::fs::read(fixture(file)).unwrap();
            self.store
                .put(&self.layout.model_file(MODEL, file), PutPayload::from(data))
                .await
                .unwrap();
        }
    }

    /// Every object key of the namespace, sorted.
    pub async fn objects(&self) -> Vec<String> {
        self.objects_under("").await
    }

    /// The object keys under `dir` of the namespace (e.g. `jobs/{id}`), sorted.
    pub async fn objects_under(&self, dir: &str) -> Vec<String> {
        let prefix = object_store::path::Path::from(format!("{}/{dir}", self.prefix));
        let mut keys: Vec<String> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Deletes the namespace's queues (with their messages), Redis keys and
    /// objects. Drop consumers first: a consumer that outlives its queue
    /// declares it again when it reconnects.
    pub async fn cleanup(&self) {
        self.queue.purge_and_delete().await.unwrap();
        self.progress.delete_all().await.unwrap();
        for key in self.objects().await {
            self.store
                .delete(&object_store::path::Path::from(key))
                .await
                .unwrap();
        }
    }
}
