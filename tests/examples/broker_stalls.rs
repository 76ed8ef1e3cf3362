//! What holds the broker's confirms (docs/performance.md, "Where the tail
//! comes from"): 1,000 confirmed publishes a second to one quorum queue of
//! Herald's topology, beside a flat-out filler on a second one that fills
//! Ra's WAL in seconds, both consumed and acked as the relay does, while the
//! bench's broker-disk watch looks at the local broker's disk and WAL files.
//!
//!     cargo run --release -p herald-tests --example broker_stalls -- [seconds] [filler in flight]
//!
//! Prints, with the time since the paced publishes started, each second's latest confirm over
//! 40 ms, each disk stall and WAL change, then the summary the bench gives.
//! The broker is `HERALD_TEST_AMQP_URL` or the local one; the queues are
//! deleted at the end.

#[path = "../src/bin/herald-bench/broker_disk.rs"]
mod broker_disk;

use futures::StreamExt;
use herald_shared::Topology;
use herald_shared::topology::WORK_ROUTING_KEY;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PAYLOAD: [u8; 200] = [b'x'; 200];

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().expect("a number"));
    let seconds = args.next().unwrap_or(120);
    let filler_in_flight = args.next().unwrap_or(256);
    let url = herald_tests::Broker::connect().await.url;
    let paced = Queue::declare(&url, "paced").await;
    let filler = Queue::declare(&url, "filler").await;
    // The paced publishes start once the filler runs at its pace.
    let start = Instant::now() + Duration::from_secs(2);
    let deadline = start + Duration::from_secs(seconds);
    for _ in 0..filler_in_flight {
        let channel = filler.publisher.clone();
        let exchange = filler.topology.exchange();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                publish(&channel, &exchange).await;
            }
        });
    }
    let watch = broker_disk::Watch::start(broker_disk::wal_dir().as_deref());
    let mut publishes = Vec::new();
    let mut scheduled = start;
    while scheduled < deadline {
        tokio::time::sleep_until(scheduled.into()).await;
        let (channel, exchange) = (paced.publisher.clone(), paced.topology.exchange());
        publishes.push(tokio::spawn(async move {
            publish(&channel, &exchange).await;
            (scheduled, Instant::now())
        }));
        scheduled += Duration::from_millis(1);
    }
    let mut confirms = Vec::new();
    for publish in publishes {
        confirms.push(publish.await.expect("publish task"));
    }
    let events = watch.stop();
    let at = |t: Instant| t.duration_since(start).as_secs_f64();
    let mut worst = BTreeMap::new();
    for (scheduled, confirmed) in &confirms {
        let late = *confirmed - *scheduled;
        if late > Duration::from_millis(40) {
            let slot = worst.entry(at(*scheduled) as u64).or_insert(late);
            *slot = late.max(*slot);
        }
    }
    for (second, late) in worst {
        println!("{second:>5} s  a confirm {:.0} ms late", late.as_secs_f64() * 1000.0);
    }
    for (stall, length) in &events.stalls {
        println!("{:>9.3} s  disk stall {:.0} ms", at(*stall), length.as_secs_f64() * 1000.0);
    }
    for change in &events.wal_changes {
        println!("{:>9.3} s  WAL file created or deleted", at(*change));
    }
    let slow: Vec<_> = confirms.iter().copied().filter(|(s, c)| *c - *s > Duration::from_millis(25)).collect();
    println!("{} paced publishes; {}", confirms.len(), events.describe(&slow, "confirms later than 25 ms"));
    paced.delete().await;
    filler.delete().await;
}

/// A throwaway topology whose work queue is consumed as the relay does.
struct Queue {
    connection: Connection,
    topology: Topology,
    publisher: Channel,
}

impl Queue {
    async fn declare(url: &str, name: &str) -> Self {
        let connection = herald_shared::amqp::connect(url, name).await.expect("connect to the broker");
        let topology = Topology::new(format!("herald-probe-{name}-{}", uuid::Uuid::new_v4().simple()));
        let setup = connection.create_channel().await.expect("open a channel");
        topology.declare(&connection, &setup, &[]).await.expect("declare the topology");
        setup.basic_qos(1024, BasicQosOptions::default()).await.expect("prefetch");
        let mut consumer = setup
            .basic_consume(
                topology.work_queue().into(),
                name.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        tokio::spawn(async move {
            let mut received = 0usize;
            while let Some(Ok(delivery)) = consumer.next().await {
                received += 1;
                if received.is_multiple_of(64) {
                    drop(delivery.acker.ack(BasicAckOptions { multiple: true }).await);
                }
            }
        });
        let publisher = connection.create_channel().await.expect("open a channel");
        publisher.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        Self { connection, topology, publisher }
    }

    async fn delete(self) {
        let channel = self.connection.create_channel().await.expect("open a channel");
        for queue in [self.topology.work_queue(), self.topology.dead_queue(), self.topology.outcomes_stream()] {
            drop(channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await);
        }
        drop(channel.exchange_delete(self.topology.exchange().into(), ExchangeDeleteOptions::default()).await);
    }
}

async fn publish(channel: &Channel, exchange: &str) {
    let properties = BasicProperties::default().with_delivery_mode(2);
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    if let Ok(confirm) =
        channel.basic_publish(exchange.into(), WORK_ROUTING_KEY.into(), options, &PAYLOAD, properties).await
    {
        drop(confirm.await);
    }
}
