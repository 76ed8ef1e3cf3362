//! Appending records to the outcomes stream, in batches: a record that
//! comes after a quiet spell goes out at once, and under load the records
//! of each [`LINGER`] go out together, so a storm costs the broker one
//! stream message per writer every 20 ms, not one per job. (RabbitMQ 3.10
//! spent as much CPU on a stream message of a dozen records as on a job:
//! sending whatever had arrived while the previous batch was confirmed took
//! a third of the ingress's rate.)

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CONTENT_TYPE, Metrics, RELAYS_NEED_HEADER, Record, encode};
use crate::amqp::{BrokerUrls, ConfirmChannel};
use crate::telemetry::Repeated;
use crate::{Topology, job::now_ms};

/// Records waiting to be written, at most; more are dropped and counted.
pub const BUFFER: usize = 64 * 1024;
/// Records in one stream message, at most.
pub const MAX_BATCH: usize = 1024;
/// The shortest time between two batches of one writer.
pub const LINGER: Duration = Duration::from_millis(20);
/// Tries of one batch (each on a fresh connection after a failure).
const TRIES: u32 = 3;
const PAUSE: Duration = Duration::from_secs(1);
/// How long the last records may take to get out on shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Hands records to the writer task; cheap to clone, never waits.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<Record>,
    metrics: Metrics,
    /// Shared: the ingress clones its writer with its state for every request.
    id: std::sync::Arc<str>,
}

impl Writer {
    /// A writer and the task that publishes what it is given (run it with
    /// [`WriterTask::run`]). `service` (`herald-ingress`, `herald-relay`)
    /// starts the writer's id, which each batch carries as its AMQP
    /// `app-id`, so that a reader can skip whole batches unread (its own,
    /// or another service's).
    pub fn new(urls: BrokerUrls, service: &str, topology: Topology, metrics: Metrics) -> (Self, WriterTask) {
        let (tx, rx) = mpsc::channel(BUFFER);
        let stream = topology.outcomes_stream();
        let id = format!("{service}/{}", uuid::Uuid::now_v7().simple());
        let channel = ConfirmChannel::new(urls, &format!("{service} outcomes"), topology, Vec::new());
        (Self { tx, metrics: metrics.clone(), id: id.as_str().into() }, WriterTask { rx, channel, stream, metrics, id })
    }

    /// This writer's id, as its batches carry it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues a record for the stream; drops it (and counts it) if the
    /// buffer is full or the writer stopped.
    pub fn record(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

#[derive(Debug)]
pub struct WriterTask {
    rx: mpsc::Receiver<Record>,
    channel: ConfirmChannel,
    stream: String,
    metrics: Metrics,
    id: String,
}

impl WriterTask {
    /// Writes batches until `stop`, then what is still buffered.
    pub async fn run(mut self, stop: CancellationToken) {
        let failures = Repeated::new(Duration::from_secs(10));
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut last = tokio::time::Instant::now() - LINGER;
        loop {
            let first = tokio::select! {
                first = self.rx.recv() => first,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            batch.push(first);
            // Sleeps until LINGER after the previous batch (not at all after
            // a quiet spell), then takes what gathered: one wake-up a batch,
            // not one a record.
            if last + LINGER > tokio::time::Instant::now() {
                tokio::select! {
                    () = tokio::time::sleep_until(last + LINGER) => {}
                    () = stop.cancelled() => {}
                }
            }
            self.fill(&mut batch);
            last = tokio::time::Instant::now();
            // A stop interrupts a write (a reconnect to a dead node can take
            // many seconds): the batch goes again in the bounded final flush.
            tokio::select! {
                () = self.write(&batch, TRIES, &failures, &stop) => batch.clear(),
                () = stop.cancelled() => break,
            }
        }
        self.rx.close();
        let _ = tokio::time::timeout(FINAL_FLUSH, async {
            self.fill(&mut batch);
            while !batch.is_empty() {
                self.write(&batch, 1, &failures, &stop).await;
                batch.clear();
                self.fill(&mut batch);
            }
        })
        .await;
        let _ = tokio::time::timeout(FINAL_FLUSH, self.channel.close()).await;
    }

    fn fill(&mut self, batch: &mut Vec<Record>) {
        while batch.len() < MAX_BATCH
            && let Ok(record) = self.rx.try_recv()
        {
            batch.push(record);
        }
    }

    async fn write(&self, batch: &[Record], tries: u32, failures: &Repeated, stop: &CancellationToken) {
        let payload = encode(batch);
        let mut headers = FieldTable::default();
        let relays_need = batch.iter().any(Record::relays_need);
        headers.insert(ShortString::from(RELAYS_NEED_HEADER), AMQPValue::Boolean(relays_need));
        for attempt in 1..=tries {
            let properties = BasicProperties::default()
                .with_content_type(CONTENT_TYPE.into())
                .with_app_id(self.id.as_str().into())
                .with_headers(headers.clone())
                .with_timestamp(now_ms() / 1000);
            match self.channel.publish("", &self.stream, &payload, properties).await {
                Ok(()) => {
                    self.metrics.written.inc_by(batch.len() as u64);
                    return;
                }
                Err(e) if attempt == tries => {
                    self.metrics.dropped.inc_by(batch.len() as u64);
                    if let Some(times) = failures.tick() {
                        tracing::warn!(error = %e, stream = %self.stream, records = batch.len(), times,
                            "cannot write to the outcomes stream; dropped these records (job status and shared idempotency miss them)");
                    }
                }
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(PAUSE) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        }
    }
}
