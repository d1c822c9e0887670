//! The cluster's work queues, behind one trait with two implementations.
//!
//! Three queues per deployment, named from a namespace prefix ([`QueueNames`])
//! so that deployments (and tests) sharing a broker never see each other's
//! messages:
//!
//! - `{ns}.shards`: one [`ShardTask`] per message, coordinator → workers.
//!   Interactive shards overtake bulk ones (AMQP priorities, `x-max-priority` 2,
//!   see [`Priority::amqp`]); FIFO within a priority.
//! - `{ns}.jobs`: the id of each submitted job, api → coordinator.
//! - `{ns}.shards.parked`: shards that exhausted their attempts, for a human to
//!   look at. [`ShardQueue::park_shard`] puts them there with a reason;
//!   [`ShardDelivery::reject`] dead-letters a delivery there too (the shards
//!   queue names it as its dead-letter target).
//!
//! Delivery is at-least-once. A consumer takes a delivery, does the work, then
//! [`ack`](ShardDelivery::ack)s it. A delivery that is requeued, or dropped
//! without being settled (a panicking worker, a dropped stream, a lost
//! connection), goes back to the queue and comes again with `redelivered`
//! set, possibly to another consumer. Work must therefore be idempotent, which
//! shards are: sample `i` is a pure function of the job and `i`.
//!
//! - [`RabbitQueue`]: the cluster. Durable classic queues, persistent messages,
//!   publisher confirms with the mandatory flag (a publish returns only once
//!   the broker has the message on disk, and fails if it could not be routed),
//!   manual acks, per-consumer prefetch. It reconnects by itself after a broker
//!   restart; see [`RabbitQueue`].
//! - [`MemoryQueue`]: the embedded single-process mode and unit tests; the same
//!   semantics in process memory (nothing survives the process).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::job::{JobId, Priority, ShardTask};
use crate::{CommonError, Result};

/// The shards queue's `x-max-priority`: the largest [`Priority::amqp`].
pub const MAX_PRIORITY: u8 = 2;

/// Header of a parked message that says why it was parked.
pub const PARK_REASON_HEADER: &str = "x-dig-park-reason";

/// Unacked job ids a coordinator may hold. Planning a job is quick, so a few
/// in flight hide the broker round trip without hoarding jobs that another
/// coordinator replica could be planning.
pub const JOBS_PREFETCH: u16 = 4;

/// First wait before retrying an unreachable broker; doubles up to
/// [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one call keeps trying to reach the broker before it reports the
/// failure. A broker restart takes about 10 s; callers see nothing of it.
const RECONNECT_BUDGET: Duration = Duration::from_secs(30);
/// One connection attempt; a half-open TCP connection must not eat the budget.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue names of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    pub shards: String,
    pub jobs: String,
    pub parked: String,
}

impl QueueNames {
    pub fn new(namespace: &str) -> Self {
        QueueNames {
            shards: format!("{namespace}.shards"),
            jobs: format!("{namespace}.jobs"),
            parked: format!("{namespace}.shards.parked"),
        }
    }
}

/// The queues, as the api, the coordinator and the workers use them.
#[async_trait]
pub trait ShardQueue: Send + Sync {
    /// Enqueues a shard. Returns once the queue has it (for RabbitMQ: the
    /// broker confirmed it, so it survives a broker restart); a message the
    /// broker refuses or cannot route is an error.
    async fn publish_shard(&self, task: &ShardTask, priority: Priority) -> Result<()>;

    /// Enqueues a submitted job's id for the coordinator; confirmed like
    /// [`publish_shard`](Self::publish_shard).
    async fn publish_job(&self, job: JobId) -> Result<()>;

    /// Puts a shard that exhausted its attempts in the parking queue, with the
    /// reason. The caller then acks the delivery it gave up on.
    async fn park_shard(&self, task: &ShardTask, reason: &str) -> Result<()>;

    /// A consumer of the shards queue holding at most `prefetch` unsettled
    /// deliveries (0: no limit, as in AMQP). A worker that runs one shard at a
    /// time wants 1, so that queued shards stay available to idle workers.
    async fn consume_shards(&self, prefetch: u16) -> Result<ShardStream>;

    /// A consumer of the jobs queue, prefetch [`JOBS_PREFETCH`].
    async fn consume_jobs(&self) -> Result<JobStream>;

    /// Shards waiting in the queue, not counting those delivered but unsettled.
    async fn shard_queue_depth(&self) -> Result<u64>;

    /// Messages in the parking queue.
    async fn parked_depth(&self) -> Result<u64>;

    /// Deletes the queues with whatever they hold (tests clean up with this).
    /// Drop consumers first: a RabbitMQ consumer that outlives its queue
    /// re-declares it when it reconnects.
    async fn purge_and_delete(&self) -> Result<()>;
}

// ---------------------------------------------------------------- deliveries

/// A shard handed to a consumer. Settle it with [`ack`](Self::ack),
/// [`requeue`](Self::requeue) or [`reject`](Self::reject); dropping it
/// unsettled requeues it.
#[derive(Debug)]
pub struct ShardDelivery {
    pub task: ShardTask,
    /// The queue delivered this message before, and it was not acked then.
    pub redelivered: bool,
    pub acker: Acker,
}

impl ShardDelivery {
    /// Done: the shard leaves the queue for good.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
    /// Not done, try again (here or elsewhere): back to the queue, redelivered.
    pub async fn requeue(self) -> Result<()> {
        self.acker.requeue().await
    }
    /// Unprocessable: out of the queue, into the parking queue (dead-lettered).
    pub async fn reject(self) -> Result<()> {
        self.acker.reject().await
    }
}

/// A submitted job id handed to the coordinator; settled like a
/// [`ShardDelivery`], except that a rejected job id is dropped, not parked.
#[derive(Debug)]
pub struct JobDelivery {
    pub job: JobId,
    pub redelivered: bool,
    pub acker: Acker,
}

impl JobDelivery {
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
    pub async fn requeue(self) -> Result<()> {
        self.acker.requeue().await
    }
    pub async fn reject(self) -> Result<()> {
        self.acker.reject().await
    }
}

/// Settles one delivery, whichever implementation it came from. An enum rather
/// than a boxed trait object: two fixed cases, no allocation per message.
pub struct Acker {
    /// `None` once settled, so that `Drop` knows not to requeue.
    inner: Option<AckerKind>,
}

enum AckerKind {
    Rabbit {
        acker: lapin::Acker,
        /// Keeps the channel (and connection) open until the delivery is
        /// settled: closing it would requeue the message behind our back, and
        /// the consumer stream may be dropped before its last delivery.
        _channel: Channel,
    },
    Memory(MemoryAcker),
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    Reject,
}

impl Acker {
    /// Settles like [`ShardDelivery::ack`], for a caller that keeps the acker
    /// apart from the message.
    pub async fn ack(self) -> Result<()> {
        self.settle(Settle::Ack).await
    }
    pub async fn requeue(self) -> Result<()> {
        self.settle(Settle::Requeue).await
    }
    pub async fn reject(self) -> Result<()> {
        self.settle(Settle::Reject).await
    }

    async fn settle(mut self, how: Settle) -> Result<()> {
        match self.inner.take() {
            Some(AckerKind::Rabbit { acker, _channel }) => {
                let done = match how {
                    Settle::Ack => acker.ack(BasicAckOptions::default()).await?,
                    Settle::Requeue => acker.nack(nack(true)).await?,
                    Settle::Reject => acker.nack(nack(false)).await?,
                };
                if done {
                    Ok(())
                } else {
                    // lapin answers `false` when the delivery's channel closed
                    // since: the broker has requeued the message already.
                    let verb = match how {
                        Settle::Ack => "ack",
                        Settle::Requeue => "requeue",
                        Settle::Reject => "reject",
                    };
                    Err(CommonError::Other(format!(
                        "could not {verb} a delivery: its channel closed, the broker will \
                         redeliver the message"
                    )))
                }
            }
            Some(AckerKind::Memory(acker)) => {
                acker.settle(how);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        match self.inner.take() {
            Some(AckerKind::Rabbit {
                acker,
                _channel: channel,
            }) => {
                // Requeue now rather than when the channel eventually closes,
                // so that another consumer can take the shard right away. Drop
                // cannot await: hand the nack to the runtime. Without one (the
                // runtime is gone), closing the channel requeues it anyway.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Err(e) = acker.nack(nack(true)).await {
                            debug!(error = %e, "requeue of a dropped delivery failed; the broker requeues it when the channel closes");
                        }
                        drop(channel);
                    });
                }
            }
            Some(AckerKind::Memory(acker)) => acker.settle(Settle::Requeue),
            None => {}
        }
    }
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Some(AckerKind::Rabbit { .. }) => "rabbitmq",
            Some(AckerKind::Memory(_)) => "memory",
            None => "settled",
        };
        f.debug_tuple("Acker").field(&kind).finish()
    }
}

fn nack(requeue: bool) -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue,
    }
}

/// Deliveries from the shards queue. Never ends by itself: an `Err` item
/// reports a failure (such as the broker unreachable for
/// `RECONNECT_BUDGET`), and polling again keeps trying.
pub struct ShardStream {
    inner: BoxStream<'static, Result<ShardDelivery>>,
}

/// Deliveries from the jobs queue; behaves like [`ShardStream`].
pub struct JobStream {
    inner: BoxStream<'static, Result<JobDelivery>>,
}

impl Stream for ShardStream {
    type Item = Result<ShardDelivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl Stream for JobStream {
    type Item = Result<JobDelivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl fmt::Debug for ShardStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShardStream")
    }
}

impl fmt::Debug for JobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobStream")
    }
}

// ---------------------------------------------------------------- RabbitMQ

/// The queues on a RabbitMQ broker (3.8 or later).
///
/// Connection supervision: lapin's own recovery is left off (it does not
/// re-apply `basic.qos`, and we want the queues re-declared after a broker
/// that lost them). Instead every call checks its connection first and, if
/// the connection or channel is gone, reconnects with backoff (100 ms doubling
/// to 5 s, for up to 30 s per call), re-declares the queues and re-enables
/// confirms; an operation that fails because the connection dropped under it
/// is retried the same way. A publish retried that way may enqueue the message
/// twice, which at-least-once delivery allows anyway.
///
/// Each consumer stream has a connection of its own: the broker throttles a
/// publishing connection under memory pressure, and acks must not wait behind
/// that. When it loses its channel, the stream reconnects, re-applies the
/// prefetch (`basic.qos`) and consumes again, and goes on yielding; what it
/// had been delivered but not settled comes again, redelivered.
pub struct RabbitQueue {
    uri: Arc<str>,
    names: Arc<QueueNames>,
    link: tokio::sync::Mutex<LinkSlot>,
}

#[derive(Default)]
struct LinkSlot {
    link: Option<Link>,
    generations: u64,
}

/// The publishing connection and its confirm-mode channel.
#[derive(Clone)]
struct Link {
    /// Tells a retry which link failed, so that it does not throw away a
    /// newer one another task has made meanwhile.
    generation: u64,
    conn: Arc<Connection>,
    publish: Channel,
}

impl Link {
    fn healthy(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

#[derive(Clone, Copy)]
enum Role {
    Publisher,
    Consumer,
}

impl RabbitQueue {
    /// Connects (retrying for up to 30 s), declares the queues of `namespace`
    /// (idempotent) and enables publisher confirms. `uri`:
    /// `amqp://user:password@host:5672/%2f`.
    pub async fn connect(uri: &str, namespace: &str) -> Result<Self> {
        if namespace.is_empty() {
            return Err(CommonError::Invalid(
                "the queue namespace must not be empty".into(),
            ));
        }
        let queue = RabbitQueue {
            uri: uri.into(),
            names: Arc::new(QueueNames::new(namespace)),
            link: tokio::sync::Mutex::new(LinkSlot::default()),
        };
        // Connect now, so that a wrong URI fails at startup, not at first use.
        queue.link(Instant::now() + RECONNECT_BUDGET).await?;
        Ok(queue)
    }

    pub fn names(&self) -> &QueueNames {
        &self.names
    }

    /// The publishing link, reconnected if it died. The lock serialises
    /// reconnection: concurrent callers wait for one new connection.
    async fn link(&self, deadline: Instant) -> Result<Link> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.link.as_ref().filter(|l| l.healthy()) {
            return Ok(link.clone());
        }
        if slot.link.take().is_some() {
            info!(namespace = %self.names.shards, "RabbitMQ connection lost; reconnecting");
        }
        let (conn, publish) = open(&self.uri, &self.names, Role::Publisher, deadline).await?;
        slot.generations += 1;
        let link = Link {
            generation: slot.generations,
            conn: Arc::new(conn),
            publish,
        };
        slot.link = Some(link.clone());
        Ok(link)
    }

    async fn invalidate(&self, generation: u64) {
        let mut slot = self.link.lock().await;
        if slot
            .link
            .as_ref()
            .is_some_and(|l| l.generation == generation)
        {
            slot.link = None;
        }
    }

    /// Runs `op` on a live link; reconnects and retries while the failure is
    /// the connection's and the call's budget lasts.
    async fn with_link<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T>
    where
        F: FnMut(Link) -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
        T: Send,
    {
        let deadline = Instant::now() + RECONNECT_BUDGET;
        let mut delay = BACKOFF_START;
        loop {
            let link = self.link(deadline).await?;
            let generation = link.generation;
            match op(link).await {
                Err(CommonError::Queue(e))
                    if is_transient(&e) && Instant::now() + delay < deadline =>
                {
                    warn!(error = %e, what, "RabbitMQ connection failed during the operation; retrying");
                    self.invalidate(generation).await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                result => return result,
            }
        }
    }

    async fn publish(&self, queue: &str, body: Vec<u8>, properties: BasicProperties) -> Result<()> {
        let body = &body;
        let properties = &properties;
        self.with_link("publish", move |link| async move {
            publish_confirmed(&link.publish, queue, body, properties.clone()).await
        })
        .await
    }

    /// Job ids waiting in the jobs queue, not counting those delivered but
    /// unsettled.
    pub async fn jobs_queue_depth(&self) -> Result<u64> {
        self.depth(&self.names.jobs).await
    }

    /// Ready messages in `queue`, by a passive declare on a throwaway channel:
    /// a passive declare of a missing queue closes its channel (404), which
    /// must not take the publishing channel down with it.
    async fn depth(&self, queue: &str) -> Result<u64> {
        self.with_link("queue depth", move |link| async move {
            let channel = link.conn.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await?;
            Ok(u64::from(declared.message_count()))
        })
        .await
    }

    async fn consumer<T>(
        &self,
        prefetch: u16,
        queue: String,
    ) -> Result<BoxStream<'static, Result<Received<T>>>>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let mut consumer = RabbitConsumer {
            uri: self.uri.clone(),
            names: self.names.clone(),
            queue,
            prefetch,
            live: None,
        };
        // Subscribe before returning, so that errors such as a wrong URI show
        // at the call, and messages published after it are certainly seen.
        consumer.live = Some(consumer.subscribe().await?);
        Ok(
            futures::stream::unfold(consumer, |mut consumer| async move {
                let item = consumer.next::<T>().await;
                Some((item, consumer))
            })
            .boxed(),
        )
    }
}

#[async_trait]
impl ShardQueue for RabbitQueue {
    async fn publish_shard(&self, task: &ShardTask, priority: Priority) -> Result<()> {
        let properties = persistent_json().with_priority(priority.amqp());
        self.publish(&self.names.shards, to_json(task)?, properties)
            .await
    }

    async fn publish_job(&self, job: JobId) -> Result<()> {
        self.publish(&self.names.jobs, to_json(&job)?, persistent_json())
            .await
    }

    async fn park_shard(&self, task: &ShardTask, reason: &str) -> Result<()> {
        // The body stays a plain ShardTask, like on the shards queue, so that
        // a parked shard can be shovelled back as it is; the reason rides in a
        // header.
        let mut headers = FieldTable::default();
        headers.insert(
            PARK_REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        let properties = persistent_json().with_headers(headers);
        self.publish(&self.names.parked, to_json(task)?, properties)
            .await
    }

    async fn consume_shards(&self, prefetch: u16) -> Result<ShardStream> {
        let inner = self
            .consumer::<ShardTask>(prefetch, self.names.shards.clone())
            .await?;
        Ok(ShardStream {
            inner: inner
                .map(|r| {
                    r.map(|m| ShardDelivery {
                        task: m.body,
                        redelivered: m.redelivered,
                        acker: m.acker,
                    })
                })
                .boxed(),
        })
    }

    async fn consume_jobs(&self) -> Result<JobStream> {
        let inner = self
            .consumer::<JobId>(JOBS_PREFETCH, self.names.jobs.clone())
            .await?;
        Ok(JobStream {
            inner: inner
                .map(|r| {
                    r.map(|m| JobDelivery {
                        job: m.body,
                        redelivered: m.redelivered,
                        acker: m.acker,
                    })
                })
                .boxed(),
        })
    }

    async fn shard_queue_depth(&self) -> Result<u64> {
        self.depth(&self.names.shards).await
    }

    async fn parked_depth(&self) -> Result<u64> {
        self.depth(&self.names.parked).await
    }

    async fn purge_and_delete(&self) -> Result<()> {
        let names = &self.names;
        self.with_link("delete queues", move |link| async move {
            // Deleting drops the messages too; deleting a missing queue is a
            // no-op for RabbitMQ.
            let channel = link.conn.create_channel().await?;
            for queue in [&names.shards, &names.jobs, &names.parked] {
                let dropped = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                debug!(queue, dropped, "deleted queue");
            }
            Ok(())
        })
        .await
    }
}

/// A decoded message and what settles it.
struct Received<T> {
    body: T,
    redelivered: bool,
    acker: Acker,
}

/// One consumer's connection, re-established whenever it is lost.
struct RabbitConsumer {
    uri: Arc<str>,
    names: Arc<QueueNames>,
    queue: String,
    prefetch: u16,
    live: Option<LiveConsumer>,
}

struct LiveConsumer {
    // Field order is drop order: the subscription, then the channel, then
    // the connection.
    consumer: lapin::Consumer,
    channel: Channel,
    _conn: Connection,
}

impl RabbitConsumer {
    async fn subscribe(&self) -> Result<LiveConsumer> {
        let (conn, channel) = open(
            &self.uri,
            &self.names,
            Role::Consumer,
            Instant::now() + RECONNECT_BUDGET,
        )
        .await?;
        // basic.qos before basic.consume, on every new channel: the prefetch
        // belongs to the channel and dies with it.
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),                      // the broker names the consumer
                BasicConsumeOptions::default(), // manual acks
                FieldTable::default(),
            )
            .await?;
        Ok(LiveConsumer {
            consumer,
            channel,
            _conn: conn,
        })
    }

    async fn next<T: DeserializeOwned>(&mut self) -> Result<Received<T>> {
        loop {
            let live = match &mut self.live {
                Some(live) => live,
                None => self.live.insert(self.subscribe().await?),
            };
            match live.consumer.next().await {
                Some(Ok(delivery)) if !delivery.acker.usable() => {
                    // Prefetched on a channel that has died since: it cannot be
                    // acked, and the broker delivers it again on the new one.
                    debug!(queue = %self.queue, "skipping a delivery from a closed channel");
                }
                Some(Ok(delivery)) => match serde_json::from_slice::<T>(&delivery.data) {
                    Ok(body) => {
                        return Ok(Received {
                            body,
                            redelivered: delivery.redelivered,
                            acker: Acker {
                                inner: Some(AckerKind::Rabbit {
                                    acker: delivery.acker,
                                    _channel: live.channel.clone(),
                                }),
                            },
                        });
                    }
                    Err(e) => {
                        // Retrying cannot fix a malformed message: dead-letter
                        // it (shards: into the parking queue) and go on.
                        error!(queue = %self.queue, error = %e, "rejecting a message that is not valid JSON of the expected type");
                        if let Err(e) = delivery.acker.nack(nack(false)).await {
                            warn!(error = %e, "could not reject the malformed message");
                        }
                    }
                },
                Some(Err(e)) => {
                    warn!(queue = %self.queue, error = %e, "consumer channel failed; resubscribing");
                    self.live = None;
                }
                None => {
                    // The broker cancelled the subscription (queue deleted, or
                    // the node holding it went away).
                    warn!(queue = %self.queue, "consumer cancelled by the broker; resubscribing");
                    self.live = None;
                }
            }
        }
    }
}

/// Connects with backoff until `deadline`, declares the queues and, for a
/// publisher, enables confirms.
async fn open(
    uri: &str,
    names: &QueueNames,
    role: Role,
    deadline: Instant,
) -> Result<(Connection, Channel)> {
    let mut delay = BACKOFF_START;
    let mut attempt = 1u32;
    loop {
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, open_once(uri, names, role)).await {
            Ok(Ok(opened)) => {
                if attempt > 1 {
                    info!(attempt, "connected to RabbitMQ");
                }
                return Ok(opened);
            }
            Ok(Err(e)) => e,
            Err(_) => CommonError::Other(format!(
                "connecting to RabbitMQ timed out after {CONNECT_TIMEOUT:?}"
            )),
        };
        let retry = match &error {
            CommonError::Queue(e) => is_transient(e),
            _ => true, // the timeout
        };
        if !retry || Instant::now() + delay >= deadline {
            return Err(error);
        }
        warn!(attempt, error = %error, retry_in = ?delay, "RabbitMQ unreachable");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
        attempt += 1;
    }
}

async fn open_once(uri: &str, names: &QueueNames, role: Role) -> Result<(Connection, Channel)> {
    let name = match role {
        Role::Publisher => "publisher",
        Role::Consumer => "consumer",
    };
    // The connection name shows in the management UI and the broker's log.
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("dig {} {name}", names.shards).into());
    let conn = Connection::connect(uri, properties).await?;
    let channel = conn.create_channel().await?;
    declare(&channel, names).await?;
    if let Role::Publisher = role {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    Ok((conn, channel))
}

/// Declares the three queues; declaring again with the same arguments is a
/// no-op, with different ones a PRECONDITION_FAILED error (not retried).
async fn declare(channel: &Channel, names: &QueueNames) -> Result<()> {
    let classic = || {
        let mut args = FieldTable::default();
        // Explicit, whatever the vhost's default queue type: priorities need
        // a classic queue.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args
    };
    let mut shard_args = classic();
    shard_args.insert(
        "x-max-priority".into(),
        AMQPValue::LongInt(MAX_PRIORITY.into()),
    );
    // Rejected shards go to the parking queue through the default exchange.
    shard_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    shard_args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(names.parked.as_str().into()),
    );
    for (queue, args) in [
        (&names.parked, classic()),
        (&names.shards, shard_args),
        (&names.jobs, classic()),
    ] {
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
    }
    Ok(())
}

/// Publishes to `queue` through the default exchange and waits for the
/// broker's confirm.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    // mandatory: an unroutable message (queue missing) comes back instead of
    // being confirmed and silently dropped.
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmation = channel
        .basic_publish("".into(), queue.into(), options, body, properties)
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(CommonError::Other(format!(
                "RabbitMQ returned the message for queue {queue}: {} {} (does the queue exist?)",
                returned.reply_code,
                returned.reply_text.as_str()
            )))
        }
        Confirmation::Nack(None) => Err(CommonError::Other(format!(
            "RabbitMQ refused (nacked) a message for queue {queue}"
        ))),
        Confirmation::NotRequested => Err(CommonError::Other(
            "publisher confirms are off on the publish channel".into(),
        )),
    }
}

fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2) // persistent: written to disk, survives a restart
        .with_content_type("application/json".into())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| CommonError::Other(format!("encoding a queue message: {e}")))
}

/// Is this the connection's fault (worth reconnecting and retrying), rather
/// than the request's (a channel-level AMQP error such as 404 or 406)?
fn is_transient(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError => true,
        // Connection-level errors, such as CONNECTION_FORCED from a broker
        // shutting down.
        ErrorKind::ProtocolError(_) => e.is_amqp_hard_error(),
        _ => false,
    }
}

// ---------------------------------------------------------------- in memory

/// The queues in process memory, for the embedded single-process mode: the
/// same ordering and settlement rules as [`RabbitQueue`], nothing persisted.
/// Clones share the queues.
#[derive(Clone, Default)]
pub struct MemoryQueue {
    shared: Arc<MemShared>,
}

#[derive(Default)]
struct MemShared {
    // A std mutex, not tokio's: every critical section is a few map
    // operations without an await, and `Drop` of an unsettled delivery must
    // requeue synchronously.
    state: Mutex<MemState>,
    shard_ready: Notify,
    job_ready: Notify,
}

#[derive(Default)]
struct MemState {
    /// Ready shards by (higher priority first, then arrival): a requeued
    /// shard keeps its key and so its place, as in a RabbitMQ classic queue.
    shards: BTreeMap<(std::cmp::Reverse<u8>, u64), MemShard>,
    jobs: BTreeMap<u64, MemJob>,
    parked: Vec<(ShardTask, String)>,
    next_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct MemShard {
    task: ShardTask,
    priority: Priority,
    seq: u64,
    redelivered: bool,
}

#[derive(Debug, Clone, Copy)]
struct MemJob {
    job: JobId,
    seq: u64,
    redelivered: bool,
}

enum MemItem {
    Shard(MemShard),
    Job(MemJob),
}

struct MemoryAcker {
    shared: Arc<MemShared>,
    item: MemItem,
    /// One of the consumer's prefetch permits, returned when this settles.
    _permit: OwnedSemaphorePermit,
}

impl MemoryAcker {
    fn settle(self, how: Settle) {
        let mut state = self.shared.lock();
        match (how, self.item) {
            (Settle::Ack, _) => {}
            (Settle::Requeue, MemItem::Shard(shard)) => {
                state.shards.insert(
                    shard_key(shard.priority, shard.seq),
                    MemShard {
                        redelivered: true,
                        ..shard
                    },
                );
                drop(state);
                self.shared.shard_ready.notify_waiters();
            }
            (Settle::Requeue, MemItem::Job(job)) => {
                state.jobs.insert(
                    job.seq,
                    MemJob {
                        redelivered: true,
                        ..job
                    },
                );
                drop(state);
                self.shared.job_ready.notify_waiters();
            }
            // The shards queue dead-letters into the parking queue, as
            // RabbitQueue's does.
            (Settle::Reject, MemItem::Shard(shard)) => {
                state.parked.push((shard.task, "rejected".into()))
            }
            (Settle::Reject, MemItem::Job(job)) => {
                warn!(job = %job.job, "job id rejected; dropped")
            }
        }
    }
}

impl MemShared {
    fn lock(&self) -> MutexGuard<'_, MemState> {
        // A panic while holding the lock cannot leave the maps half-updated
        // (each section is one insert or remove): carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn shard_key(priority: Priority, seq: u64) -> (std::cmp::Reverse<u8>, u64) {
    (std::cmp::Reverse(priority.amqp()), seq)
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// The parked shards with their reasons, oldest first.
    pub fn parked(&self) -> Vec<(ShardTask, String)> {
        self.shared.lock().parked.clone()
    }

    fn semaphore(prefetch: u16) -> Arc<Semaphore> {
        let permits = if prefetch == 0 {
            Semaphore::MAX_PERMITS
        } else {
            usize::from(prefetch)
        };
        Arc::new(Semaphore::new(permits))
    }
}

/// Waits for a prefetch permit, then for a ready item `take` can remove.
async fn mem_next<T>(
    shared: &Arc<MemShared>,
    permits: &Arc<Semaphore>,
    ready: fn(&MemShared) -> &Notify,
    take: fn(&mut MemState) -> Option<T>,
) -> (T, OwnedSemaphorePermit) {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    loop {
        // Register interest before looking, so that an item published between
        // the look and the wait still wakes us.
        let notified = ready(shared).notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(item) = take(&mut shared.lock()) {
            return (item, permit);
        }
        notified.await;
    }
}

#[async_trait]
impl ShardQueue for MemoryQueue {
    async fn publish_shard(&self, task: &ShardTask, priority: Priority) -> Result<()> {
        {
            let mut state = self.shared.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.shards.insert(
                shard_key(priority, seq),
                MemShard {
                    task: *task,
                    priority,
                    seq,
                    redelivered: false,
                },
            );
        }
        self.shared.shard_ready.notify_waiters();
        Ok(())
    }

    async fn publish_job(&self, job: JobId) -> Result<()> {
        {
            let mut state = self.shared.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.jobs.insert(
                seq,
                MemJob {
                    job,
                    seq,
                    redelivered: false,
                },
            );
        }
        self.shared.job_ready.notify_waiters();
        Ok(())
    }

    async fn park_shard(&self, task: &ShardTask, reason: &str) -> Result<()> {
        self.shared.lock().parked.push((*task, reason.to_owned()));
        Ok(())
    }

    async fn consume_shards(&self, prefetch: u16) -> Result<ShardStream> {
        let state = (self.shared.clone(), Self::semaphore(prefetch));
        let inner = futures::stream::unfold(state, |(shared, permits)| async move {
            let (shard, permit) = mem_next(
                &shared,
                &permits,
                |s| &s.shard_ready,
                |s| s.shards.pop_first().map(|(_, v)| v),
            )
            .await;
            let delivery = ShardDelivery {
                task: shard.task,
                redelivered: shard.redelivered,
                acker: Acker {
                    inner: Some(AckerKind::Memory(MemoryAcker {
                        shared: shared.clone(),
                        item: MemItem::Shard(shard),
                        _permit: permit,
                    })),
                },
            };
            Some((Ok(delivery), (shared, permits)))
        });
        Ok(ShardStream {
            inner: inner.boxed(),
        })
    }

    async fn consume_jobs(&self) -> Result<JobStream> {
        let state = (self.shared.clone(), Self::semaphore(JOBS_PREFETCH));
        let inner = futures::stream::unfold(state, |(shared, permits)| async move {
            let (job, permit) = mem_next(
                &shared,
                &permits,
                |s| &s.job_ready,
                |s| s.jobs.pop_first().map(|(_, v)| v),
            )
            .await;
            let delivery = JobDelivery {
                job: job.job,
                redelivered: job.redelivered,
                acker: Acker {
                    inner: Some(AckerKind::Memory(MemoryAcker {
                        shared: shared.clone(),
                        item: MemItem::Job(job),
                        _permit: permit,
                    })),
                },
            };
            Some((Ok(delivery), (shared, permits)))
        });
        Ok(JobStream {
            inner: inner.boxed(),
        })
    }

    async fn shard_queue_depth(&self) -> Result<u64> {
        Ok(self.shared.lock().shards.len() as u64)
    }

    async fn parked_depth(&self) -> Result<u64> {
        Ok(self.shared.lock().parked.len() as u64)
    }

    async fn purge_and_delete(&self) -> Result<()> {
        let mut state = self.shared.lock();
        state.shards.clear();
        state.jobs.clear();
        state.parked.clear();
        Ok(())
    }
}
