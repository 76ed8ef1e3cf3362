//! The AMQP topology, declared by both services through one function so that
//! they can never disagree about names or arguments.
//!
//! ```text
//! ingress ──publish──▶ <prefix>.jobs (direct) ──"work"──▶ <prefix>.work (quorum)
//!                                                            │  ▲
//!            relay: transient failure → <prefix>.retry.<ms>  │  │ TTL expires:
//!                   (quorum, per-queue TTL) ─────────────────┘──┘ dead-letters back
//!            relay: permanent failure → <prefix>.dead (quorum, parking lot)
//!            delivery-limit exceeded on work → <prefix>.dead
//!
//! both services: records of what became of each job → <prefix>.outcomes
//!                (a stream: every replica reads all of it; see `outcomes`)
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

/// Routing key of the work queue on the jobs exchange.
pub const WORK_ROUTING_KEY: &str = "work";
/// How often a delivery may be handed out before the broker parks it: the
/// guard against a job that crashes the consumer every time.
pub const DELIVERY_LIMIT: i64 = 10;

/// The dead queue's delivery limit: more than any number of listings, and
/// positive, which every RabbitMQ version takes as a limit (see
/// `declare_dead_queue`).
pub const DEAD_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// How long the outcomes stream keeps a record (RabbitMQ's `x-max-age`:
/// whole segments go once all their records are older).
pub const OUTCOMES_MAX_AGE: &str = "1D";
/// The most the outcomes stream keeps on disk, in bytes; the oldest
/// segments go first past it.
pub const OUTCOMES_MAX_BYTES: i64 = 1024 * 1024 * 1024;
/// The size of one segment of the outcomes stream: retention drops whole
/// segments, so this is how finely it works.
pub const OUTCOMES_SEGMENT_BYTES: i64 = 32 * 1024 * 1024;

/// How long the outcomes stream's declaration may take before it is given
/// up (until the next connection).
const STREAM_DECLARE_TIMEOUT: Duration = Duration::from_secs(30);

/// AMQP headers Herald sets.
pub mod headers {
    /// How many delivery attempts a job has had (1 on the first retry).
    pub const ATTEMPT: &str = "x-herald-attempt";
    /// Why a job was parked or retried.
    pub const REASON: &str = "x-herald-reason";
    /// When a job was parked, in milliseconds since the Unix epoch.
    pub const PARKED_AT: &str = "x-herald-parked-at";
    /// Present (true) on a job whose id was derived from an idempotency key:
    /// a relay delivers such an id once within its idempotency window.
    pub const IDEMPOTENT: &str = "x-herald-idempotent";
    /// Present (true) on the retry or parked copy of a job an error stanza
    /// came back for: its delivery failed, so a relay that remembers the id
    /// as delivered (it missed the record of the bounce) sends it anyway.
    pub const BOUNCED: &str = "x-herald-bounced";
    /// When an operator replayed a parked job, in milliseconds since the
    /// Unix epoch; such a copy is sent whatever the relays remember.
    pub const REPLAYED_AT: &str = "x-herald-replayed-at";
}

/// The names of every exchange and queue, under one prefix so that tests and
/// tenants can share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The exchange the ingress publishes to.
    pub fn exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// The parking lot for jobs that cannot be delivered.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// A delay queue, named by its delay so that relays with different
    /// schedules never fight over a queue's arguments.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.prefix, delay.as_millis())
    }

    /// The stream of what became of each job (see `outcomes`).
    pub fn outcomes_stream(&self) -> String {
        format!("{}.outcomes", self.prefix)
    }

    /// Declares the outcomes stream (idempotent): a stream queue, with its
    /// retention bounded by age and size.
    pub async fn declare_outcomes(&self, channel: &Channel) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-queue-type"), str_value("stream"));
        args.insert(ShortString::from("x-max-age"), str_value(OUTCOMES_MAX_AGE));
        args.insert(ShortString::from("x-max-length-bytes"), AMQPValue::LongLongInt(OUTCOMES_MAX_BYTES));
        args.insert(
            ShortString::from("x-stream-max-segment-size-bytes"),
            AMQPValue::LongLongInt(OUTCOMES_SEGMENT_BYTES),
        );
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(self.outcomes_stream().into(), durable, args).await.map(drop)
    }

    /// The outcomes stream, on a channel of its own and in a task of its
    /// own: never on the job path. A broker without streams (before
    /// RabbitMQ 3.9, or with the `stream_queue` feature flag off) closes
    /// that channel, not the one jobs go through, and a cluster whose
    /// stream coordinator is electing a leader after a node died may hold
    /// the declaration for a while, which must not hold a reconnecting
    /// publisher. Jobs flow either way; job status and shared idempotency
    /// wait for the stream.
    async fn declare_outcomes_apart(&self, connection: &Connection) {
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(e) => return tracing::warn!(error = %e, "cannot open a channel to declare the outcomes stream"),
        };
        let topology = self.clone();
        tokio::spawn(async move {
            let failed = match tokio::time::timeout(STREAM_DECLARE_TIMEOUT, topology.declare_outcomes(&channel)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {STREAM_DECLARE_TIMEOUT:?}")),
            };
            if let Some(error) = failed {
                tracing::warn!(stream = %topology.outcomes_stream(), %error, "cannot declare the outcomes stream; jobs flow, but job status and idempotency across replicas need it");
            }
            if channel.status().connected() {
                drop(channel.close(200, "declared".into()).await);
            }
        });
    }

    /// Declares everything (idempotent). The ingress passes no retry delays;
    /// the relay passes its schedule. `connection` is the one `channel`
    /// belongs to: the dead queue's probes use channels of their own.
    pub async fn declare(
        &self,
        connection: &Connection,
        channel: &Channel,
        retry_delays: &[Duration],
    ) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        self.declare_dead_queue(connection).await?;
        let work_args = quorum(&[
            ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
            ("x-dead-letter-exchange", str_value("")),
            ("x-dead-letter-routing-key", str_value(&self.dead_queue())),
            ("x-dead-letter-strategy", str_value("at-least-once")),
            ("x-overflow", str_value("reject-publish")),
        ]);
        channel.queue_declare(self.work_queue().into(), durable, work_args).await?;
        channel
            .queue_bind(
                self.work_queue().into(),
                self.exchange().into(),
                WORK_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.declare_outcomes_apart(connection).await;
        for delay in retry_delays {
            let args = quorum(&[
                ("x-message-ttl", AMQPValue::LongLongInt(delay.as_millis() as i64)),
                ("x-dead-letter-exchange", str_value(&self.exchange())),
                ("x-dead-letter-routing-key", str_value(WORK_ROUTING_KEY)),
                ("x-dead-letter-strategy", str_value("at-least-once")),
                ("x-overflow", str_value("reject-publish")),
            ]);
            channel.queue_declare(self.retry_queue(*delay).into(), durable, args).await?;
        }
        Ok(())
    }

    /// The dead queue must never drop a parked job. RabbitMQ 4.x gives
    /// quorum queues a default delivery limit of 20 and drops a message past
    /// it (this queue dead-letters nowhere), and `dead list` and a filtered
    /// `dead replay` give messages back, which counts as a delivery. A new
    /// dead queue is declared with a delivery limit no one reaches
    /// ([`DEAD_DELIVERY_LIMIT`]): `-1`, 4.x's "no limit", would make 3.x
    /// drop every message given back. An existing queue is left as it is (a
    /// queue's arguments cannot change): one declared without the limit
    /// before an upgrade to 4.x needs the policy the README gives. The probe
    /// closes its channel when the queue is missing, so it has its own.
    async fn declare_dead_queue(&self, connection: &Connection) -> lapin::Result<()> {
        let probe = connection.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let exists = probe.queue_declare(self.dead_queue().into(), passive, FieldTable::default()).await.is_ok();
        if probe.status().connected() {
            drop(probe.close(200, "probed".into()).await);
        }
        if exists {
            return Ok(());
        }
        let channel = connection.create_channel().await?;
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let args = quorum(&[("x-delivery-limit", AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT))]);
        let declared = channel.queue_declare(self.dead_queue().into(), durable, args).await.map(drop);
        if channel.status().connected() {
            drop(channel.close(200, "declared".into()).await);
        }
        declared
    }
}

fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn quorum(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(ShortString::from("x-queue-type"), str_value("quorum"));
    for (key, value) in extra {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix() {
        let t = Topology::new("t1");
        assert_eq!(t.exchange(), "t1.jobs");
        assert_eq!(t.work_queue(), "t1.work");
        assert_eq!(t.dead_queue(), "t1.dead");
        assert_eq!(t.outcomes_stream(), "t1.outcomes");
        assert_eq!(t.retry_queue(Duration::from_secs(5)), "t1.retry.5000ms");
    }
}
