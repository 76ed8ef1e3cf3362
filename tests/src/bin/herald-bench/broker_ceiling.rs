//! The broker's own ceiling: confirmed, persistent, mandatory publishes of a
//! real job to a quorum queue with Herald's topology, as the ingress makes
//! them, many in flight per confirm channel, on a throwaway prefix.

use futures::StreamExt;
use herald_shared::Topology;
use herald_shared::job::CONTENT_TYPE;
use herald_shared::topology::WORK_ROUTING_KEY;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one measurement achieved.
#[derive(Debug, Clone)]
pub struct Publishing {
    pub channels: usize,
    pub in_flight_per_channel: usize,
    pub confirmed: usize,
    pub failed: usize,
    pub elapsed: Duration,
    /// The bench's own CPU time per confirmed publish meanwhile, seconds:
    /// what publishing costs a client at least.
    pub cpu_per_publish: f64,
    /// The bench's CPU time per job consumed and acked afterwards (at most
    /// [`CONSUMED`] of them), as the relay consumes, seconds.
    pub cpu_per_consume: f64,
}

/// Jobs consumed after a ceiling measurement, for the consumer's CPU floor.
const CONSUMED: usize = 20_000;
/// The relay's default `HERALD_PREFETCH`.
const PREFETCH: u16 = 1024;
/// Deliveries acked at once, with `multiple`: about what one XEP-0198 ack
/// covers when the relay drains a backlog.
const ACK_EVERY: usize = 64;

impl Publishing {
    pub fn rate(&self) -> f64 {
        crate::stats::rate(self.confirmed, self.elapsed)
    }
}

/// Publishes `payload` for `duration` with `in_flight` publishes awaiting
/// their confirm on each of `channels` confirm channels.
pub async fn measure(url: &str, payload: &[u8], channels: usize, in_flight: usize, duration: Duration) -> Publishing {
    let connection = herald_shared::amqp::connect(url, "herald-bench publisher").await.expect("connect to the broker");
    let topology = Topology::new(format!("herald-bench-{}", uuid::Uuid::new_v4().simple()));
    let setup = connection.create_channel().await.expect("open a channel");
    topology.declare(&connection, &setup, &[]).await.expect("declare the throwaway topology");
    let mut confirm_channels = Vec::with_capacity(channels);
    for _ in 0..channels {
        confirm_channels.push(confirm_channel(&connection).await);
    }
    let confirmed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let payload: Arc<[u8]> = payload.into();
    let cpu_before = crate::machine::cpu_seconds(&[std::process::id()]);
    let started = Instant::now();
    let end = started + duration;
    let mut publishers = Vec::with_capacity(channels * in_flight);
    for channel in &confirm_channels {
        for _ in 0..in_flight {
            let (channel, exchange, payload) = (channel.clone(), topology.exchange(), Arc::clone(&payload));
            let (confirmed, failed) = (Arc::clone(&confirmed), Arc::clone(&failed));
            publishers.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let counter = if publish(&channel, &exchange, &payload).await { &confirmed } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for publisher in publishers {
        publisher.await.expect("publisher task");
    }
    let elapsed = started.elapsed();
    let cpu = crate::machine::cpu_seconds(&[std::process::id()]) - cpu_before;
    let cpu_per_consume = consume(&connection, &topology, confirmed.load(Ordering::Relaxed).min(CONSUMED)).await;
    delete(&setup, &topology).await;
    drop(connection.close(200, "done".into()).await);
    let confirmed = confirmed.load(Ordering::Relaxed);
    Publishing {
        channels,
        in_flight_per_channel: in_flight,
        confirmed,
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        cpu_per_publish: cpu / confirmed.max(1) as f64,
        cpu_per_consume,
    }
}

/// Consumes `n` of the jobs just published as the relay does (its default
/// prefetch, acks with `multiple` every [`ACK_EVERY`] deliveries), and
/// returns the bench's CPU time per consumed job, seconds.
async fn consume(connection: &Connection, topology: &Topology, n: usize) -> f64 {
    let channel = connection.create_channel().await.expect("open a channel");
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("set the prefetch");
    let cpu_before = crate::machine::cpu_seconds(&[std::process::id()]);
    let mut consumer = channel
        .basic_consume(
            topology.work_queue().as_str().into(),
            "herald-bench consume floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the throwaway work queue");
    for i in 1..=n {
        let delivery = consumer.next().await.expect("a delivery").expect("a delivery, not an error");
        if i % ACK_EVERY == 0 || i == n {
            delivery.ack(BasicAckOptions { multiple: true }).await.expect("ack");
        }
    }
    let cpu = crate::machine::cpu_seconds(&[std::process::id()]) - cpu_before;
    drop(channel.close(200, "done".into()).await);
    cpu / n.max(1) as f64
}

async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("open a channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
    channel
}

/// One publish as the ingress makes it; true if confirmed and routed.
async fn publish(channel: &Channel, exchange: &str, payload: &[u8]) -> bool {
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_timestamp(herald_shared::job::now_ms() / 1000)
        .with_app_id("herald-bench".into())
        .with_delivery_mode(2);
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    match channel.basic_publish(exchange.into(), WORK_ROUTING_KEY.into(), options, payload, properties).await {
        Ok(pending) => match pending.await {
            Ok(confirm) => confirm.is_ack() && confirm.take_message().is_none(),
            Err(_) => false,
        },
        Err(_) => false,
    }
}

async fn delete(channel: &Channel, topology: &Topology) {
    for queue in [topology.work_queue(), topology.dead_queue(), topology.outcomes_stream()] {
        drop(channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await);
    }
    drop(channel.exchange_delete(topology.exchange().into(), ExchangeDeleteOptions::default()).await);
}

/// The broker's confirm latency at a fixed rate (1c): the floor under the
/// ingress's POST → 202, to tell a slow broker from a slow Herald.
#[derive(Debug, Clone)]
pub struct PacedPublishing {
    pub rate: u32,
    pub sent: usize,
    pub failed: usize,
    /// Scheduled publish instant → confirm.
    pub latency: Option<crate::stats::Percentiles>,
    /// Each confirmed publish's scheduled instant and its confirm.
    pub confirms: Vec<(Instant, Instant)>,
    /// The broker's disk meanwhile.
    pub disk: crate::broker_disk::DiskEvents,
}

/// Publishes `payload` at `rate` per second for `duration`, open loop (each
/// publish at its instant, whatever the confirms do), on one confirm channel.
pub async fn paced(
    url: &str,
    payload: &[u8],
    rate: u32,
    duration: Duration,
    wal_dir: Option<&std::path::Path>,
) -> PacedPublishing {
    let connection = herald_shared::amqp::connect(url, "herald-bench publisher").await.expect("connect to the broker");
    let topology = Topology::new(format!("herald-bench-{}", uuid::Uuid::new_v4().simple()));
    let setup = connection.create_channel().await.expect("open a channel");
    topology.declare(&connection, &setup, &[]).await.expect("declare the throwaway topology");
    let channel = confirm_channel(&connection).await;
    let payload: Arc<[u8]> = payload.into();
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let period = Duration::from_secs(1) / rate.max(1);
    let first = Instant::now() + Duration::from_millis(50);
    let disk = crate::broker_disk::Watch::start(wal_dir);
    let mut publishes = Vec::with_capacity(count);
    for i in 0..count {
        let scheduled = first + period * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (channel, exchange, payload) = (channel.clone(), topology.exchange(), Arc::clone(&payload));
        publishes.push(tokio::spawn(async move {
            publish(&channel, &exchange, &payload).await.then(|| (scheduled, Instant::now()))
        }));
    }
    let mut confirms = Vec::with_capacity(count);
    let mut failed = 0;
    for publish in publishes {
        match publish.await.expect("publish task") {
            Some(confirm) => confirms.push(confirm),
            None => failed += 1,
        }
    }
    let disk = disk.stop();
    delete(&setup, &topology).await;
    drop(connection.close(200, "done".into()).await);
    let latencies = confirms.iter().map(|(scheduled, confirmed)| *confirmed - *scheduled).collect();
    PacedPublishing { rate, sent: count, failed, latency: crate::stats::Percentiles::of(latencies), confirms, disk }
}
