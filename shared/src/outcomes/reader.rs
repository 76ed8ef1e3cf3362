//! Following the outcomes stream over AMQP 0.9.1: a stream consumer that
//! starts `lookback` in the past (`x-stream-offset` as a timestamp), hands
//! every record to the caller in order, and after a lost connection resumes
//! at the offset after the last message it read.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

use super::{Metrics, RELAYS_NEED_HEADER, Record, decode};
use crate::amqp::{BrokerUrls, CONNECT_TIMEOUT};
use crate::telemetry::Repeated;
use crate::{Topology, job::now_ms};

/// Stream messages (batches of up to 1,024 records) handed over before an
/// ack, at most.
const PREFETCH: u16 = 16;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Reader {
    urls: BrokerUrls,
    name: String,
    topology: Topology,
    lookback: Duration,
    metrics: Metrics,
    /// Batches by this writer are skipped (this process's own).
    skip_writer: Option<String>,
    /// Only batches by writers whose id starts so are read.
    only_from: Option<String>,
    /// Batches whose writer marked them as holding nothing a relay needs
    /// are skipped.
    for_a_relay: bool,
}

/// Where to start reading.
#[derive(Debug, Clone, Copy)]
enum Start {
    Since(u64),
    Offset(i64),
}

impl Reader {
    /// A reader that starts with the records of the last `lookback`.
    pub fn new(urls: BrokerUrls, name: &str, topology: Topology, lookback: Duration, metrics: Metrics) -> Self {
        Self {
            urls,
            name: name.to_owned(),
            topology,
            lookback,
            metrics,
            skip_writer: None,
            only_from: None,
            for_a_relay: false,
        }
    }

    /// Skips the batches this writer wrote: what a process recorded itself
    /// it knows already.
    #[must_use]
    pub fn skipping(self, writer: &str) -> Self {
        Self { skip_writer: Some(writer.to_owned()), ..self }
    }

    /// Reads only the batches of writers whose id starts with `service`.
    #[must_use]
    pub fn only_from(self, service: &str) -> Self {
        Self { only_from: Some(format!("{service}/")), ..self }
    }

    /// Reads only the batches that hold a record a relay learns from (see
    /// [`RELAYS_NEED_HEADER`]).
    #[must_use]
    pub fn for_a_relay(self) -> Self {
        Self { for_a_relay: true, ..self }
    }

    fn wanted(&self, properties: &lapin::BasicProperties) -> bool {
        let writer = properties.app_id().as_ref().map_or("", |id| id.as_str());
        self.skip_writer.as_deref() != Some(writer)
            && self.only_from.as_deref().is_none_or(|p| writer.starts_with(p))
            && (!self.for_a_relay || relays_need(properties))
    }

    /// Reads until `stop`, calling `apply` with each record in stream order.
    pub async fn run(self, stop: CancellationToken, mut apply: impl FnMut(Record) + Send) {
        let since = now_ms().saturating_sub(self.lookback.as_millis() as u64) / 1000;
        let mut start = Start::Since(since);
        let failures = Repeated::new(Duration::from_secs(30));
        while !stop.is_cancelled() {
            // A stop interrupts connecting too (each broker address may take
            // seconds to time out), not only reading.
            let followed = tokio::select! {
                followed = self.follow(&mut start, &stop, &mut apply) => followed,
                () = stop.cancelled() => Ok(()),
            };
            if let Err(e) = followed
                && let Some(times) = failures.tick()
            {
                tracing::warn!(error = %e, stream = %self.topology.outcomes_stream(), times, "cannot read the outcomes stream; retrying");
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    }

    async fn follow(
        &self,
        start: &mut Start,
        stop: &CancellationToken,
        apply: &mut (impl FnMut(Record) + Send),
    ) -> Result<(), String> {
        let connection = self.urls.connect(&self.name).await?;
        let result = async {
            let mut consumer = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let channel = connection.create_channel().await?;
                self.topology.declare_outcomes(&channel).await?;
                channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
                let mut args = FieldTable::default();
                let offset = match *start {
                    Start::Since(seconds) => AMQPValue::Timestamp(seconds),
                    Start::Offset(next) => AMQPValue::LongLongInt(next),
                };
                args.insert(ShortString::from("x-stream-offset"), offset);
                channel
                    .basic_consume(
                        self.topology.outcomes_stream().into(),
                        self.name.as_str().into(),
                        BasicConsumeOptions::default(),
                        args,
                    )
                    .await
            })
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?} while subscribing"))?
            .map_err(|e| e.to_string())?;
            loop {
                let delivery = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(e)) => return Err(e.to_string()),
                        None => return Err("the broker cancelled the stream consumer".into()),
                    },
                };
                if let Some(offset) = stream_offset(&delivery.properties) {
                    *start = Start::Offset(offset + 1);
                }
                if self.wanted(&delivery.properties) {
                    match decode(&delivery.data) {
                        Ok(records) => {
                            self.metrics.read.inc_by(records.len() as u64);
                            records.into_iter().for_each(&mut *apply);
                        }
                        Err(e) => tracing::warn!(error = %e, "skipped a message in the outcomes stream that is not a batch of records"),
                    }
                }
                delivery.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
            }
        }
        .await;
        drop(tokio::time::timeout(CONNECT_TIMEOUT, connection.close(200, "done".into())).await);
        result
    }
}

/// Whether a batch's writer marked it as holding a record a relay needs;
/// `true` when it did not say (a writer older than the mark).
fn relays_need(properties: &lapin::BasicProperties) -> bool {
    let header = properties.headers().as_ref().and_then(|h| h.inner().get(&ShortString::from(RELAYS_NEED_HEADER)));
    !matches!(header, Some(AMQPValue::Boolean(false)))
}

/// The `x-stream-offset` header RabbitMQ puts on each message it delivers
/// from a stream.
fn stream_offset(properties: &lapin::BasicProperties) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(&ShortString::from("x-stream-offset"))? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}
