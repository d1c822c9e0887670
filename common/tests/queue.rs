//! Behaviour tests of the queues. Each behaviour runs against both
//! implementations (`rabbit::*` on the broker of `DIG_TEST_AMQP`, each test in
//! a namespace of its own that it deletes at the end; `memory::*` in process),
//! and a few RabbitMQ-only tests cover what only a broker has: unroutable
//! messages, message format, re-declaring, a broker restart.
//!
//! The restart test takes `BROKER` exclusively and every other RabbitMQ test
//! shares it, so that the restart never lands in the middle of another test of
//! this file (tests of other crates may still see it, and must cope: the queue
//! clients reconnect).

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use dig_common::job::{JobId, Priority, ShardTask};
use dig_common::queue::{
    JobDelivery, JobStream, MemoryQueue, QueueNames, RabbitQueue, ShardDelivery, ShardQueue,
    ShardStream, PARK_REASON_HEADER,
};
use futures::{FutureExt, StreamExt};

/// Upper bound on any single wait for a delivery; generous, because the two
/// cores are shared with other compiles and tests.
const WAIT: Duration = Duration::from_secs(30);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn amqp_uri() -> String {
    std::env::var("DIG_TEST_AMQP").unwrap_or_else(|_| {
        panic!("DIG_TEST_AMQP is not set: run scripts/services.sh (make test does)")
    })
}

fn namespace() -> String {
    format!("test-{}", uuid::Uuid::now_v7())
}

/// Runs `test` on a fresh RabbitQueue and deletes its queues afterwards, also
/// when the test panics.
async fn on_rabbit<Fut>(test: impl FnOnce(Arc<RabbitQueue>) -> Fut)
where
    Fut: Future<Output = ()>,
{
    let _shared = BROKER.read().await;
    let queue = Arc::new(
        RabbitQueue::connect(&amqp_uri(), &namespace())
            .await
            .expect("connect to RabbitMQ"),
    );
    let outcome = AssertUnwindSafe(test(queue.clone())).catch_unwind().await;
    queue
        .purge_and_delete()
        .await
        .expect("delete the test's queues");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn on_memory<Fut>(test: impl FnOnce(Arc<dyn ShardQueue>) -> Fut)
where
    Fut: Future<Output = ()>,
{
    test(Arc::new(MemoryQueue::new())).await;
}

/// Each behaviour below becomes `rabbit::NAME` and `memory::NAME`.
macro_rules! on_both {
    ($($behaviour:ident),* $(,)?) => {
        mod rabbit {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::on_rabbit(|q| super::$behaviour(q)).await
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::on_memory(super::$behaviour).await
                }
            )*
        }
    };
}

on_both!(
    every_shard_is_delivered_exactly_once_and_the_queue_drains,
    interactive_shards_overtake_bulk_ones,
    requeued_shard_comes_back_redelivered,
    shard_dropped_unacked_goes_to_another_consumer,
    dropped_delivery_comes_back_to_the_running_consumer,
    prefetch_limits_unsettled_deliveries,
    rejected_shard_is_parked,
    park_shard_puts_the_shard_in_the_parking_queue,
    job_ids_round_trip_in_order,
);

// ---------------------------------------------------------------- helpers

fn shard(job: JobId, index: u64) -> ShardTask {
    ShardTask {
        job,
        index,
        start: index * 10,
        end: index * 10 + 10,
    }
}

async fn next_shard(stream: &mut ShardStream) -> ShardDelivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a shard within the wait")
        .expect("the stream does not end")
        .expect("a delivery, not an error")
}

async fn next_job(stream: &mut JobStream) -> JobDelivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a job within the wait")
        .expect("the stream does not end")
        .expect("a delivery, not an error")
}

async fn assert_no_more_shards(stream: &mut ShardStream) {
    if let Ok(item) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("expected no delivery, got {item:?}");
    }
}

/// Polls `probe` until it returns `want` (the broker updates counts
/// asynchronously, e.g. after dead-lettering); returns the last value.
async fn settles_at<F, Fut>(want: u64, mut probe: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = dig_common::Result<u64>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe().await.expect("read a queue depth");
        if got == want || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- behaviours

async fn every_shard_is_delivered_exactly_once_and_the_queue_drains(q: Arc<dyn ShardQueue>) {
    let job = JobId::new();
    for i in 0..20 {
        q.publish_shard(&shard(job, i), Priority::Bulk)
            .await
            .unwrap();
    }
    assert_eq!(settles_at(20, || q.shard_queue_depth()).await, 20);

    let mut stream = q.consume_shards(4).await.unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let d = next_shard(&mut stream).await;
        assert!(!d.redelivered);
        assert_eq!(d.task, shard(job, d.task.index));
        assert!(
            seen.insert(d.task.index),
            "shard {} delivered twice",
            d.task.index
        );
        d.ack().await.unwrap();
    }
    assert_eq!(seen, (0..20).collect::<BTreeSet<u64>>());
    assert_no_more_shards(&mut stream).await;
    assert_eq!(settles_at(0, || q.shard_queue_depth()).await, 0);
}

async fn interactive_shards_overtake_bulk_ones(q: Arc<dyn ShardQueue>) {
    let job = JobId::new();
    for i in 0..5 {
        q.publish_shard(&shard(job, i), Priority::Bulk)
            .await
            .unwrap();
    }
    for i in 5..10 {
        q.publish_shard(&shard(job, i), Priority::Interactive)
            .await
            .unwrap();
    }
    let mut stream = q.consume_shards(1).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..10 {
        let d = next_shard(&mut stream).await;
        order.push(d.task.index);
        d.ack().await.unwrap();
    }
    // Interactive first, FIFO within each priority.
    assert_eq!(order, [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]);
}

async fn requeued_shard_comes_back_redelivered(q: Arc<dyn ShardQueue>) {
    let task = shard(JobId::new(), 7);
    q.publish_shard(&task, Priority::Interactive).await.unwrap();
    let mut stream = q.consume_shards(1).await.unwrap();

    let first = next_shard(&mut stream).await;
    assert_eq!(first.task, task);
    assert!(!first.redelivered);
    first.requeue().await.unwrap();

    let again = next_shard(&mut stream).await;
    assert_eq!(again.task, task);
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert_no_more_shards(&mut stream).await;
    assert_eq!(settles_at(0, || q.shard_queue_depth()).await, 0);
}

async fn shard_dropped_unacked_goes_to_another_consumer(q: Arc<dyn ShardQueue>) {
    let task = shard(JobId::new(), 3);
    q.publish_shard(&task, Priority::Bulk).await.unwrap();

    let mut crashing = q.consume_shards(1).await.unwrap();
    let taken = next_shard(&mut crashing).await;
    assert_eq!(taken.task, task);
    assert!(!taken.redelivered);

    let mut survivor = q.consume_shards(1).await.unwrap();
    assert_no_more_shards(&mut survivor).await;
    // The first consumer dies with the shard unacked.
    drop(taken);
    drop(crashing);

    let again = next_shard(&mut survivor).await;
    assert_eq!(again.task, task);
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert_eq!(settles_at(0, || q.shard_queue_depth()).await, 0);
}

async fn dropped_delivery_comes_back_to_the_running_consumer(q: Arc<dyn ShardQueue>) {
    let task = shard(JobId::new(), 0);
    q.publish_shard(&task, Priority::Interactive).await.unwrap();
    let mut stream = q.consume_shards(1).await.unwrap();
    // A worker task that panics drops its delivery; the consumer goes on.
    drop(next_shard(&mut stream).await);
    let again = next_shard(&mut stream).await;
    assert_eq!(again.task, task);
    assert!(again.redelivered);
    again.ack().await.unwrap();
}

async fn prefetch_limits_unsettled_deliveries(q: Arc<dyn ShardQueue>) {
    let job = JobId::new();
    for i in 0..3 {
        q.publish_shard(&shard(job, i), Priority::Bulk)
            .await
            .unwrap();
    }
    let mut stream = q.consume_shards(2).await.unwrap();
    let first = next_shard(&mut stream).await;
    let second = next_shard(&mut stream).await;
    assert_eq!((first.task.index, second.task.index), (0, 1));
    // Two unsettled: the third stays in the queue for other consumers.
    assert_no_more_shards(&mut stream).await;
    assert_eq!(settles_at(1, || q.shard_queue_depth()).await, 1);

    first.ack().await.unwrap();
    let third = next_shard(&mut stream).await;
    assert_eq!(third.task.index, 2);
    second.ack().await.unwrap();
    third.ack().await.unwrap();
    assert_eq!(settles_at(0, || q.shard_queue_depth()).await, 0);
}

async fn rejected_shard_is_parked(q: Arc<dyn ShardQueue>) {
    q.publish_shard(&shard(JobId::new(), 1), Priority::Bulk)
        .await
        .unwrap();
    assert_eq!(q.parked_depth().await.unwrap(), 0);
    let mut stream = q.consume_shards(1).await.unwrap();
    next_shard(&mut stream).await.reject().await.unwrap();
    assert_eq!(settles_at(1, || q.parked_depth()).await, 1);
    assert_eq!(q.shard_queue_depth().await.unwrap(), 0);
    assert_no_more_shards(&mut stream).await;
}

async fn park_shard_puts_the_shard_in_the_parking_queue(q: Arc<dyn ShardQueue>) {
    let job = JobId::new();
    q.park_shard(&shard(job, 4), "failed 3 attempts")
        .await
        .unwrap();
    q.park_shard(&shard(job, 5), "failed 3 attempts")
        .await
        .unwrap();
    assert_eq!(settles_at(2, || q.parked_depth()).await, 2);
    assert_eq!(q.shard_queue_depth().await.unwrap(), 0);
}

async fn job_ids_round_trip_in_order(q: Arc<dyn ShardQueue>) {
    let jobs = [JobId::new(), JobId::new(), JobId::new()];
    for job in jobs {
        q.publish_job(job).await.unwrap();
    }
    let mut stream = q.consume_jobs().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next_job(&mut stream).await;
        assert!(!d.redelivered);
        got.push(d.job);
        d.ack().await.unwrap();
    }
    assert_eq!(got, jobs);

    // A requeued job id comes back, flagged.
    q.publish_job(jobs[0]).await.unwrap();
    next_job(&mut stream).await.requeue().await.unwrap();
    let again = next_job(&mut stream).await;
    assert_eq!((again.job, again.redelivered), (jobs[0], true));
    again.ack().await.unwrap();
    // Shards and jobs do not mix.
    assert_eq!(q.shard_queue_depth().await.unwrap(), 0);
}

// ---------------------------------------------------------------- in memory only

#[tokio::test]
async fn memory_parked_shards_keep_their_reason() {
    let q = MemoryQueue::new();
    let job = JobId::new();
    q.park_shard(&shard(job, 2), "out of memory 3 times")
        .await
        .unwrap();
    q.publish_shard(&shard(job, 3), Priority::Bulk)
        .await
        .unwrap();
    let mut stream = q.consume_shards(1).await.unwrap();
    next_shard(&mut stream).await.reject().await.unwrap();
    assert_eq!(
        q.parked(),
        [
            (shard(job, 2), "out of memory 3 times".to_owned()),
            (shard(job, 3), "rejected".to_owned())
        ]
    );
}

#[tokio::test]
async fn memory_queue_clones_share_the_queues() {
    let api = MemoryQueue::new();
    let worker = api.clone();
    let task = shard(JobId::new(), 0);
    let mut stream = worker.consume_shards(1).await.unwrap();
    // Published after the consumer started waiting: it must wake up.
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        api.publish_shard(&task, Priority::Bulk).await.unwrap();
    });
    assert_eq!(next_shard(&mut stream).await.task, task);
    publisher.await.unwrap();
}

// ---------------------------------------------------------------- RabbitMQ only

#[tokio::test]
async fn rabbit_publish_to_a_missing_queue_is_an_error() {
    on_rabbit(|q| async move {
        q.purge_and_delete().await.unwrap();
        // Mandatory publishing: the broker returns the message instead of
        // confirming it into the void.
        let err = q
            .publish_shard(&shard(JobId::new(), 0), Priority::Bulk)
            .await
            .expect_err("publishing to a deleted queue must fail");
        assert!(err.to_string().contains("NO_ROUTE"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn rabbit_connecting_again_keeps_the_namespace_queues() {
    let _shared = BROKER.read().await;
    let ns = namespace();
    let first = RabbitQueue::connect(&amqp_uri(), &ns).await.unwrap();
    let job = JobId::new();
    first
        .publish_shard(&shard(job, 0), Priority::Bulk)
        .await
        .unwrap();
    first
        .publish_shard(&shard(job, 1), Priority::Bulk)
        .await
        .unwrap();

    // A second service declaring the same queues changes nothing.
    let second = RabbitQueue::connect(&amqp_uri(), &ns).await.unwrap();
    assert_eq!(second.names(), &QueueNames::new(&ns));
    assert_eq!(second.names().parked, format!("{ns}.shards.parked"));
    assert_eq!(settles_at(2, || second.shard_queue_depth()).await, 2);
    second.purge_and_delete().await.unwrap();
}

#[tokio::test]
async fn rabbit_parked_message_is_the_task_with_its_reason() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};

    on_rabbit(|q| async move {
        let task = shard(JobId::new(), 9);
        q.park_shard(&task, "failed 3 attempts").await.unwrap();

        // Read it back as an operator's tool would.
        let parked = q.names().parked.clone();
        let conn = lapin::Connection::connect(&amqp_uri(), Default::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                parked.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(declared.message_count(), 1);
        let message = channel
            .basic_get(parked.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the parked message");
        let body: ShardTask = serde_json::from_slice(&message.delivery.data).unwrap();
        assert_eq!(body, task);
        assert_eq!(message.delivery.properties.delivery_mode(), &Some(2));
        let headers = message.delivery.properties.headers().clone().unwrap();
        let reason = headers.inner().get(PARK_REASON_HEADER).cloned();
        assert_eq!(
            reason,
            Some(AMQPValue::LongString("failed 3 attempts".into()))
        );
    })
    .await;
}

#[tokio::test]
async fn rabbit_queued_shards_and_a_consumer_survive_a_broker_restart() {
    // Alone on the broker: a restart would disturb the other tests of this file.
    let _exclusive = BROKER.write().await;
    let ns = namespace();
    let q = RabbitQueue::connect(&amqp_uri(), &ns).await.unwrap();
    let outcome = AssertUnwindSafe(async {
        let job = JobId::new();
        for i in 0..3 {
            q.publish_shard(&shard(job, i), Priority::Bulk)
                .await
                .unwrap();
        }
        let mut stream = q.consume_shards(1).await.unwrap();
        let first = next_shard(&mut stream).await;
        assert_eq!(first.task.index, 0);
        first.ack().await.unwrap();

        restart_rabbitmq().await;

        // The same RabbitQueue reconnects by itself.
        for i in 3..6 {
            q.publish_shard(&shard(job, i), Priority::Bulk)
                .await
                .unwrap();
        }
        // The same stream resubscribes; the shard it held unacked (prefetched)
        // when the broker went down is delivered again.
        let mut seen = vec![0];
        for _ in 1..6 {
            let d = next_shard(&mut stream).await;
            assert_eq!(d.task, shard(job, d.task.index));
            seen.push(d.task.index);
            d.ack().await.unwrap();
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
        assert_no_more_shards(&mut stream).await;
        assert_eq!(settles_at(0, || q.shard_queue_depth()).await, 0);
    })
    .catch_unwind()
    .await;
    q.purge_and_delete()
        .await
        .expect("delete the test's queues");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn restart_rabbitmq() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let status = tokio::process::Command::new(script)
        .arg("restart-rabbitmq")
        .status()
        .await
        .expect("run scripts/services.sh restart-rabbitmq");
    assert!(
        status.success(),
        "scripts/services.sh restart-rabbitmq failed: {status}"
    );
}
