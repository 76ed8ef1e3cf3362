//! The relay's batch acks against the real broker: what RabbitMQ accepts.

use futures::StreamExt;
use herald_relay::broker::acks::Acks;
use herald_tests::Broker;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

/// Jobs 1 and 2 delivered, job 3 given back (a retry that could not be
/// published): the batch ack must settle 1 and 2 without naming 3, which
/// the broker no longer holds; naming it closes the channel and puts 1 and
/// 2 back in the queue, to be delivered twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_ack_after_a_requeue_settles_the_rest_and_keeps_the_channel() {
    let broker = Broker::connect().await;
    let topology = broker.topology();
    let connection = herald_shared::amqp::connect(&broker.url, "herald-tests-acks").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    topology.declare(&connection, &channel, &[]).await.expect("declare");
    for i in 0..3 {
        broker.publish_raw(format!("job {i}").as_bytes()).await;
    }
    let work = topology.work_queue();
    channel.basic_qos(10, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume(work.as_str().into(), "acks-test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let mut tags = Vec::new();
    while tags.len() < 3 {
        let delivery = tokio::time::timeout(crate::ARRIVAL, consumer.next())
            .await
            .expect("3 deliveries in time")
            .expect("a delivery")
            .expect("ok");
        tags.push(delivery.delivery_tag);
    }
    // No more deliveries to this consumer: a requeued job stays in the queue.
    channel.basic_cancel("acks-test".into(), BasicCancelOptions::default()).await.expect("cancel");

    let acks = Acks::new(channel.clone(), 1);
    acks.finished(tags[0]);
    acks.finished(tags[1]);
    acks.requeue(tags[2]).await.expect("nack");
    let stop = CancellationToken::new();
    stop.cancel();
    acks.run(stop).await;

    // A round trip on the same channel comes after the ack: it fails if the
    // broker closed the channel over it (which put 1 and 2 back too).
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel
        .queue_declare(work.as_str().into(), passive, FieldTable::default())
        .await
        .expect("the channel is still open");
    // The quorum queue takes the requeued job back asynchronously.
    herald_tests::poll::until("the requeued job to be back in the queue", crate::ARRIVAL, || async {
        (broker.ready(&work).await == 1).then_some(())
    })
    .await;
    drop(channel.close(200, "done".into()).await);
    broker.cleanup(&[]).await;
}
