//! Consuming the work queue: each delivery is decoded, handed to its
//! sender's session, and settled by the outcome: ack on success, a delay
//! queue for transient failures, the parking lot for permanent ones. A
//! delivery is acked only after its successor (retry or parked copy) was
//! confirmed by the broker, so no path loses a job. Acks go out in batches
//! (`acks`).

use crate::acks::Acks;
use crate::error::DeliveryError;
use crate::metrics::{ConditionLabels, Metrics, Outcome};
use crate::recent::{Delivered, Lookup, Recent};
use crate::retry::{self, Next};
use crate::seen::Seen;
use crate::session::{Bounce, SessionHandle};
use crate::stanza;
use futures::FutureExt;
use futures::StreamExt;
use herald_shared::amqp::{self, ConfirmChannel, PublishError};
use herald_shared::job::CONTENT_TYPE;
use herald_shared::topology::headers;
use herald_shared::{Job, Sender, Topology};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause between attempts to reach the broker.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Decides and carries out what happens to each delivery.
#[derive(Debug)]
pub struct Dispatcher {
    pub sessions: HashMap<Sender, SessionHandle>,
    pub publisher: Arc<ConfirmChannel>,
    pub topology: Topology,
    pub retry_delays: Vec<Duration>,
    pub online_timeout: Duration,
    pub max_stanza_bytes: usize,
    pub recent: Recent,
    pub seen: Seen,
    pub metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub async fn handle(&self, delivery: Delivery, acks: &Acks) {
        let attempts = header_u32(&delivery.properties, headers::ATTEMPT);
        let idempotent = has_header(&delivery.properties, headers::IDEMPOTENT);
        let mut accepted_at_ms = None;
        let (id, outcome) = match Job::decode(&delivery.data) {
            Err(e) => (None, Err(DeliveryError::Permanent(format!("cannot decode the job: {e}")))),
            Ok(job) if idempotent && !self.seen.claim(job.id()) => {
                tracing::debug!(id = %job.id(), "already delivered, or being delivered, within the idempotency window; not sent again");
                self.metrics.count(Outcome::Duplicate);
                acks.finished(delivery.delivery_tag);
                return;
            }
            Ok(job) => {
                let Job::V1(v1) = &job;
                accepted_at_ms = Some(v1.accepted_at_ms);
                let id = job.id();
                self.recent.begin(id);
                let outcome = self.deliver(&job).await;
                (Some(id), outcome)
            }
        };
        let outcome = match (outcome, id) {
            (Ok(()), Some(id)) => {
                let job = Delivered {
                    data: delivery.data.as_slice().into(),
                    attempts,
                    timestamp: *delivery.properties.timestamp(),
                };
                match self.recent.delivered(id, job) {
                    None => Ok(()),
                    Some(bounce) => Err(bounce_error(&bounce)),
                }
            }
            (outcome, id) => {
                if let Some(id) = id {
                    self.recent.forget(id);
                }
                outcome
            }
        };
        let settled = match outcome {
            Ok(()) => {
                tracing::debug!(id = ?id, "delivered");
                if let (true, Some(id)) = (idempotent, id) {
                    self.seen.delivered(id);
                }
                self.metrics.count(Outcome::Delivered);
                if let Some(accepted) = accepted_at_ms {
                    let millis = herald_shared::job::now_ms().saturating_sub(accepted);
                    self.metrics.delivery_latency.observe(millis as f64 / 1000.0);
                }
                Ok(())
            }
            Err(error) => {
                if let (true, Some(id)) = (idempotent, id) {
                    self.seen.release(id);
                }
                if !acks.is_open() {
                    // The broker gives the delivery back itself; a retry or
                    // park copy published now could never be matched by an
                    // ack of the original, and the job would exist twice.
                    tracing::info!(id = ?id, %error, "delivery failed after its channel closed; the broker redelivers it");
                    return;
                }
                let id = id.map(|id| id.to_string());
                // Boxed: the failure path's publish would otherwise make
                // every delivery's task (spawned per job) several times larger.
                Box::pin(self.settle_failure(id.as_deref(), &delivery.data, &delivery.properties, attempts, &error))
                    .await
            }
        };
        match settled {
            Ok(()) => acks.finished(delivery.delivery_tag),
            Err(e) => {
                // Neither retried nor parked: give it back to the work queue.
                // The broker's delivery limit bounds how often this happens.
                tracing::warn!(id = ?id, error = %e, "cannot hand the job on; returning it to the queue");
                self.metrics.count(Outcome::Requeued);
                if let Err(e) = Box::pin(acks.requeue(delivery.delivery_tag)).await {
                    // The channel is gone; the broker redelivers the job.
                    tracing::warn!(id = ?id, error = %e, "cannot requeue the delivery; it will be redelivered");
                }
            }
        }
    }

    /// An error stanza came back for a message the server had acknowledged.
    pub async fn on_bounce(&self, bounce: Bounce) {
        self.metrics.bounces.get_or_create(&ConditionLabels { condition: bounce.condition.clone() }).inc();
        let job = match self.recent.bounced(&bounce) {
            Lookup::Delivered(job) => job,
            // `handle` will see it when the ack arrives.
            Lookup::InFlight => return,
            Lookup::Unknown => {
                tracing::warn!(id = %bounce.id, condition = %bounce.condition, "bounce for a message this relay no longer remembers; not parked");
                return;
            }
        };
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(bounce.id.as_str().into());
        if let Some(timestamp) = job.timestamp {
            properties = properties.with_timestamp(timestamp);
        }
        let error = bounce_error(&bounce);
        if let Err(e) = self.settle_failure(Some(&bounce.id), &job.data, &properties, job.attempts, &error).await {
            tracing::error!(id = %bounce.id, condition = %bounce.condition, error = %e, "cannot park a bounced message; it is only in this log line");
        }
    }

    async fn settle_failure(
        &self,
        id: Option<&str>,
        data: &[u8],
        properties: &BasicProperties,
        attempts: u32,
        error: &DeliveryError,
    ) -> Result<(), PublishError> {
        match retry::next_step(error, attempts, &self.retry_delays) {
            Next::RetryAfter { delay, attempt } => {
                tracing::info!(id = ?id, attempt, ?delay, %error, "delivery failed; will retry");
                self.retry(data, properties, delay, attempt, &error.to_string()).await?;
                self.metrics.count(Outcome::Retried);
            }
            Next::Park { reason } => {
                tracing::warn!(id = ?id, attempts = attempts.saturating_add(1), %reason, "parking the job in {}", self.topology.dead_queue());
                self.park(data, properties, attempts.saturating_add(1), &reason).await?;
                self.metrics.count(Outcome::Parked);
            }
        }
        Ok(())
    }

    async fn deliver(&self, job: &Job) -> Result<(), DeliveryError> {
        let session = self.sessions.get(job.sender()).ok_or_else(|| {
            DeliveryError::Permanent(format!("no XMPP account is configured for sender {}", job.sender()))
        })?;
        let size = stanza::xml_size(job);
        if size > self.max_stanza_bytes {
            return Err(DeliveryError::Permanent(format!(
                "the message would be up to {size} bytes of XML, over the XMPP server's stanza limit (HERALD_MAX_STANZA_BYTES = {})",
                self.max_stanza_bytes
            )));
        }
        session.deliver(stanza::message(job), self.online_timeout).await
    }

    async fn retry(
        &self,
        data: &[u8],
        properties: &BasicProperties,
        delay: Duration,
        attempt: u32,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut table = carried_headers(properties);
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt));
        table.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
        let expiration = retry::jittered(delay).as_millis().to_string();
        let properties = copy_properties(properties).with_headers(table).with_expiration(expiration.into());
        self.publisher.publish("", &self.topology.retry_queue(delay), data, properties).await
    }

    async fn park(
        &self,
        data: &[u8],
        properties: &BasicProperties,
        attempts: u32,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut table = carried_headers(properties);
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempts));
        table.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
        table.insert(headers::PARKED_AT.into(), AMQPValue::Timestamp(herald_shared::job::now_ms()));
        let properties = copy_properties(properties).with_headers(table);
        self.publisher.publish("", &self.topology.dead_queue(), data, properties).await
    }
}

/// A bounce as a delivery failure: `wait` errors are retried, the rest parked.
fn bounce_error(bounce: &Bounce) -> DeliveryError {
    let reason = format!("bounced: {} ({}) from {}", bounce.condition, bounce.kind, bounce.from);
    if bounce.is_transient() { DeliveryError::Transient(reason) } else { DeliveryError::Permanent(reason) }
}

/// The properties a republished job keeps (not its headers).
pub(crate) fn copy_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    out.with_app_id("herald-relay".into())
}

/// Headers to keep on a republished job, without the broker's own `x-death`
/// bookkeeping (it would grow with every retry).
fn carried_headers(p: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if k.as_str() != "x-death"
                && !k.as_str().starts_with("x-first-death")
                && !k.as_str().starts_with("x-last-death")
            {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    table
}

fn has_header(p: &BasicProperties, name: &str) -> bool {
    p.headers().as_ref().is_some_and(|h| h.inner().contains_key(&ShortString::from(name)))
}

fn header_u32(p: &BasicProperties, name: &str) -> u32 {
    let value = p.headers().as_ref().and_then(|h| h.inner().get(&ShortString::from(name)).cloned());
    match value {
        Some(AMQPValue::LongUInt(v)) => v,
        Some(AMQPValue::LongInt(v)) => v.max(0) as u32,
        Some(AMQPValue::LongLongInt(v)) => v.clamp(0, i64::from(u32::MAX)) as u32,
        Some(AMQPValue::ShortUInt(v)) => u32::from(v),
        Some(AMQPValue::ShortShortUInt(v)) => u32::from(v),
        _ => 0,
    }
}

/// Consumes until `stop` is cancelled, reconnecting after broker failures.
/// On stop it cancels the consumer, waits up to `drain_timeout` for the jobs
/// in flight to be settled, then closes the channel: whatever was prefetched
/// but not started goes back to the queue untouched.
pub async fn run(
    dispatcher: Arc<Dispatcher>,
    url: String,
    prefetch: u16,
    drain_timeout: Duration,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut drained = false;
    while !stop.is_cancelled() {
        let (connection, channel, mut consumer) = match open(&url, &dispatcher, prefetch).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(url = %amqp::redact_url(&url), error = %e, "cannot consume from the broker; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RECONNECT_DELAY) => continue,
                }
            }
        };
        tracing::info!(queue = %dispatcher.topology.work_queue(), prefetch, "consuming");
        dispatcher.metrics.consuming.set(1);
        let acks = Arc::new(Acks::new(channel.clone()));
        let acks_stop = CancellationToken::new();
        let flusher = tokio::spawn({
            let (acks, stop) = (Arc::clone(&acks), acks_stop.clone());
            async move { acks.run(stop).await }
        });
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (dispatcher, acks) = (Arc::clone(&dispatcher), Arc::clone(&acks));
                        tracker.spawn(async move {
                            let tag = delivery.delivery_tag;
                            // A bug that panics in one job must not leave its
                            // tag unsettled forever: batch acks would stop
                            // behind it and the relay would stall at its
                            // prefetch while reporting ready.
                            if AssertUnwindSafe(dispatcher.handle(delivery, &acks)).catch_unwind().await.is_err() {
                                tracing::error!(delivery_tag = tag, "handling a job panicked (a bug); returning it to the queue");
                                dispatcher.metrics.count(Outcome::Requeued);
                                if let Err(e) = acks.requeue(tag).await {
                                    tracing::warn!(error = %e, "cannot requeue the delivery; it will be redelivered");
                                }
                            }
                        });
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
        dispatcher.metrics.consuming.set(0);
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
        drop(connection.close(200, "relay stopping or reconnecting".into()).await);
    }
    // Stopped while reconnecting: jobs of the lost connection may still be
    // running. Never a second wait after the first (the pod's grace period
    // is sized for one).
    if !drained {
        drain(&tracker, drain_timeout).await;
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

async fn open(
    url: &str,
    dispatcher: &Dispatcher,
    prefetch: u16,
) -> Result<(Connection, Channel, Consumer), lapin::Error> {
    let connection = amqp::connect(url, "herald-relay consumer").await?;
    let channel = connection.create_channel().await?;
    dispatcher.topology.declare(&channel, &dispatcher.retry_delays).await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            dispatcher.topology.work_queue().into(),
            "herald-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}
