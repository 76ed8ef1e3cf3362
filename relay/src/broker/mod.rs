//! The broker side of the relay, and the only code that speaks AMQP:
//! consuming the work queue, settling each delivery as the delivery stage
//! decides (ack, a retry copy in a delay queue, a parked copy in the dead
//! queue), batched acks (`acks`), and `dead list|replay` (`dead`).
//!
//! A delivery is acked only after its successor (retry or parked copy) was
//! confirmed by the broker, so no path loses a job. When the broker will
//! not take a successor (an alarm, a deleted queue), the job is held and
//! the publish retried with backoff while no new delivery is taken: no hot
//! requeue loop, and the job keeps its attempt count and reason. A
//! settlement whose channel is gone is not carried out: the broker has
//! given the delivery back already, and its redelivered copy settles it.

pub mod acks;
pub mod dead;
pub mod properties;

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use herald_shared::{
    Topology,
    amqp::{self, BrokerUrls, ConfirmChannel},
    topology::headers,
};
use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::acks::Acks;
use crate::{
    delivery::{Bounced, Delivery, Incoming, Settlement},
    metrics::{Metrics, Outcome},
};

/// Pause between attempts to reach the broker.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Backoff of a settlement the broker refuses: first and longest pause.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Settles deliveries as the delivery stage decides.
#[derive(Debug)]
pub struct Worker {
    delivery: Arc<Delivery>,
    publisher: Arc<ConfirmChannel>,
    topology: Topology,
    retry_delays: Vec<Duration>,
    metrics: Arc<Metrics>,
    /// How many settlements are waiting for the broker to take their
    /// copy; while any is, no new delivery is taken.
    stuck: watch::Sender<usize>,
}

/// Counts one stuck settlement for as long as it lives.
struct Stuck<'a>(&'a watch::Sender<usize>);

impl<'a> Stuck<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Stuck<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Worker {
    pub fn new(
        delivery: Arc<Delivery>,
        publisher: Arc<ConfirmChannel>,
        retry_delays: Vec<Duration>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let topology = publisher.topology().clone();
        Self { delivery, publisher, topology, retry_delays, metrics, stuck: watch::Sender::new(0) }
    }

    async fn handle(&self, delivery: &lapin::message::Delivery, acks: &Acks) {
        if delivery.redelivered {
            self.metrics.redelivered.inc();
        }
        let properties = &delivery.properties;
        let incoming = Incoming {
            data: &delivery.data,
            attempts: properties::header_u32(properties, headers::ATTEMPT),
            timestamp: *properties.timestamp(),
            idempotent: properties::has_header(properties, headers::IDEMPOTENT),
            resend: properties::has_header(properties, headers::BOUNCED)
                || properties::has_header(properties, headers::REPLAYED_AT),
        };
        let settlement = self.delivery.settle(incoming).await;
        if settlement == Settlement::Ack {
            acks.finished(delivery.delivery_tag);
            return;
        }
        let id = properties.message_id().as_ref().map(ToString::to_string);
        let still_held = || acks.is_open();
        if !still_held() {
            tracing::info!(
                ?id,
                generation = acks.generation(),
                ?settlement,
                "the channel closed during the attempt; its redelivered copy settles the job"
            );
            return;
        }
        // Boxed: the failure path's publish would otherwise make every
        // delivery's task (spawned per job) several times larger.
        if Box::pin(self.hand_on(id.as_deref(), &delivery.data, properties, &settlement, still_held)).await {
            acks.finished(delivery.delivery_tag);
        }
    }

    /// Publishes the retry or parked copy, retrying with backoff while the
    /// broker refuses it and `still_held()`. True once the broker has it.
    async fn hand_on(
        &self,
        id: Option<&str>,
        data: &[u8],
        original: &BasicProperties,
        settlement: &Settlement,
        still_held: impl Fn() -> bool,
    ) -> bool {
        let mut backoff = FIRST_BACKOFF;
        let mut stuck = None;
        loop {
            let published = match settlement {
                Settlement::Ack => return true,
                Settlement::Retry { delay, attempt, reason, bounced } => {
                    let properties = properties::retry(original, *delay, *attempt, reason, *bounced);
                    self.publisher.publish("", &self.topology.retry_queue(*delay), data, properties).await
                }
                Settlement::Park { attempts, reason, bounced } => {
                    let properties = properties::parked(original, *attempts, reason, *bounced);
                    self.publisher.publish("", &self.topology.dead_queue(), data, properties).await
                }
            };
            match published {
                Ok(()) => {
                    log_settled(id, settlement, &self.topology);
                    self.metrics.count(if matches!(settlement, Settlement::Park { .. }) {
                        Outcome::Parked
                    } else {
                        Outcome::Retried
                    });
                    return true;
                }
                Err(e) => {
                    if stuck.is_none() {
                        tracing::warn!(?id, error = %e, "the broker does not take the job's retry or parked copy; holding it and taking no new jobs until it does");
                        stuck = Some(Stuck::new(&self.stuck));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if !still_held() {
                        tracing::info!(?id, "the channel closed while the job was held; the broker redelivers it");
                        return false;
                    }
                }
            }
        }
    }

    /// Carries out the settlements of jobs that bounced after they were
    /// acked, until the sessions end or `stop` is cancelled.
    pub async fn settle_bounces(&self, stop: CancellationToken) {
        while let Some(Bounced { id, data, timestamp, settlement }) = self.delivery.next_bounced().await {
            let original = properties::rebuilt(&id, timestamp);
            let held = || !stop.is_cancelled();
            if !self.hand_on(Some(&id), &data, &original, &settlement, held).await {
                tracing::error!(%id, ?settlement, "stopping before the broker took a bounced job's copy; it is only in this log line");
            }
        }
    }

    /// Consumes until `stop` is cancelled, reconnecting after broker
    /// failures. On stop it cancels the consumer, waits up to
    /// `drain_timeout` for the jobs in flight to be settled, then closes
    /// the channel: whatever was prefetched but not started goes back to
    /// the queue untouched.
    pub async fn consume(
        self: Arc<Self>,
        urls: BrokerUrls,
        prefetch: u16,
        drain_timeout: Duration,
        stop: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        let mut drained = false;
        let mut generation = 0;
        let mut stuck = self.stuck.subscribe();
        while !stop.is_cancelled() {
            let opened = tokio::select! {
                () = stop.cancelled() => break,
                opened = self.open(&urls, prefetch) => opened,
            };
            let (connection, channel, mut consumer) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::warn!(urls = %urls.redacted(), error = %e, "cannot consume from the broker; retrying");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(RECONNECT_DELAY) => continue,
                    }
                }
            };
            generation += 1;
            tracing::info!(queue = %self.topology.work_queue(), prefetch, generation, "consuming");
            self.metrics.consuming.set(1);
            let acks = Arc::new(Acks::new(channel.clone(), generation));
            let acks_stop = CancellationToken::new();
            let flusher = tokio::spawn({
                let (acks, stop) = (Arc::clone(&acks), acks_stop.clone());
                async move { acks.run(stop).await }
            });
            loop {
                let paused = *stuck.borrow_and_update() > 0;
                tokio::select! {
                    () = stop.cancelled() => break,
                    Ok(()) = stuck.changed() => {}
                    next = consumer.next(), if !paused => match next {
                        Some(Ok(delivery)) => {
                            tracker.spawn(Arc::clone(&self).handle_guarded(delivery, Arc::clone(&acks)));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "broker connection lost; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!("the broker cancelled the consumer; reconnecting");
                            break;
                        }
                    },
                }
            }
            self.metrics.consuming.set(0);
            if stop.is_cancelled() {
                let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                if let Err(e) = tokio::time::timeout(amqp::CONNECT_TIMEOUT, cancel).await.unwrap_or(Ok(())) {
                    tracing::warn!(error = %e, "cannot cancel the consumer");
                }
                drain(&tracker, drain_timeout).await;
                drained = true;
            }
            // The last acks, before the channel closes.
            acks_stop.cancel();
            if tokio::time::timeout(amqp::CONNECT_TIMEOUT, flusher).await.is_err() {
                tracing::warn!("the last acks did not go out in time; the broker will redeliver those jobs");
            }
            drop(
                tokio::time::timeout(
                    amqp::CONNECT_TIMEOUT,
                    connection.close(200, "relay stopping or reconnecting".into()),
                )
                .await,
            );
        }
        // Stopped while reconnecting: jobs of the lost connection may still
        // be running. Never a second wait after the first (the pod's grace
        // period is sized for one).
        if !drained {
            drain(&tracker, drain_timeout).await;
        }
    }

    /// `handle`, with a panic (a bug) turned into a requeue: the job's tag
    /// must not stay unsettled forever, or batch acks would stop behind it
    /// and the relay would stall at its prefetch while reporting ready.
    ///
    /// The task of each job in flight (one per prefetched delivery). Not an
    /// `async fn`: that keeps its arguments twice in its future (432 bytes
    /// each for the delivery), and a spawning `async move` block around it
    /// a third time; this future holds the delivery once.
    #[expect(clippy::manual_async_fn, reason = "an async fn would hold the delivery twice")]
    fn handle_guarded(
        self: Arc<Self>,
        delivery: lapin::message::Delivery,
        acks: Arc<Acks>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            if AssertUnwindSafe(self.handle(&delivery, &acks)).catch_unwind().await.is_err() {
                let tag = delivery.delivery_tag;
                tracing::error!(delivery_tag = tag, "handling a job panicked (a bug); returning it to the queue");
                self.metrics.count(Outcome::Requeued);
                if let Err(e) = acks.requeue(tag).await {
                    tracing::warn!(error = %e, "cannot requeue the delivery; it will be redelivered");
                }
            }
        }
    }

    async fn open(&self, urls: &BrokerUrls, prefetch: u16) -> Result<(Connection, Channel, Consumer), String> {
        let connection = urls.connect("herald-relay consumer").await?;
        let opened = async {
            let channel = connection.create_channel().await?;
            self.topology.declare(&connection, &channel, &self.retry_delays).await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    self.topology.work_queue().into(),
                    "herald-relay".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        match tokio::time::timeout(amqp::CONNECT_TIMEOUT, opened).await {
            Ok(Ok((channel, consumer))) => Ok((connection, channel, consumer)),
            failed => {
                drop(connection.close(200, "cannot consume".into()).await);
                Err(match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?} while setting up the consumer", amqp::CONNECT_TIMEOUT),
                })
            }
        }
    }
}

fn log_settled(id: Option<&str>, settlement: &Settlement, topology: &Topology) {
    match settlement {
        Settlement::Ack => {}
        // Logged by the delivery stage, summarised per sender: an outage
        // would otherwise log a line per job per retry.
        Settlement::Retry { delay, attempt, reason, .. } => {
            tracing::debug!(?id, attempt, ?delay, %reason, "retry scheduled");
        }
        Settlement::Park { attempts, reason, .. } => {
            tracing::warn!(?id, attempts, %reason, "parking the job in {}", topology.dead_queue());
        }
    }
}

async fn drain(tracker: &TaskTracker, timeout: Duration) {
    tracker.close();
    if !tracker.is_empty() {
        tracing::info!(in_flight = tracker.len(), "waiting for the jobs in flight");
    }
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(in_flight = tracker.len(), "drain timeout: unsettled jobs go back to the queue");
    }
    tracker.reopen();
}
