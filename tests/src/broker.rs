//! The RabbitMQ the tests use: `HERALD_TEST_AMQP_URL`, or the local broker;
//! with `HERALD_TEST_BACKEND=containers`, a RabbitMQ container per test
//! process (see `containers`).

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;

use crate::containers::{self, RabbitMq};

const DEFAULT_TEST_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test broker's URL: `HERALD_TEST_AMQP_URL`, or the local broker.
/// With the container backend, the URL of the process's broker container,
/// which a `Broker` must hold (connect one first and keep it).
pub fn url() -> String {
    if containers::enabled() {
        return containers::running_rabbitmq().map(|rabbitmq| rabbitmq.url()).unwrap_or_else(|| {
            panic!(
                "HERALD_TEST_BACKEND=containers: no broker container runs in this process yet; connect a \
                 `Broker` first and keep it for the test (it holds the container)"
            )
        });
    }
    std::env::var("HERALD_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_TEST_AMQP_URL.to_owned())
}

/// `rabbitmqctl -q eval <expr>` on this machine's broker: its output, or
/// None if it cannot be run or fails (no local broker, not root).
pub fn eval(expr: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl").args(["-q", "eval", expr]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A connection to the test broker, and the per-test topology prefix.
pub struct Broker {
    pub url: String,
    pub prefix: String,
    connection: Connection,
    channel: Channel,
    /// With the container backend: the broker's container, shared by every
    /// `Broker` of the process and removed once the last one is dropped.
    container: Option<Arc<RabbitMq>>,
}

impl Broker {
    /// Connects to the broker (with the container backend, the process's
    /// broker container, started if none runs), or panics with what to do
    /// about it.
    pub async fn connect() -> Self {
        let container = match containers::backend() {
            containers::Backend::Containers => Some(containers::rabbitmq().await),
            containers::Backend::Local => None,
        };
        let url = container.as_ref().map_or_else(url, |rabbitmq| rabbitmq.url());
        let connection = match tokio::time::timeout(
            Duration::from_secs(10),
            herald_shared::amqp::connect(&url, "herald-tests"),
        )
        .await
        {
            Ok(Ok(c)) => c,
            other => panic!(
                "RabbitMQ is not reachable at {} ({:?}). Install and start it (`apt-get install -y rabbitmq-server && \
                 rabbitmq-server -detached`), point HERALD_TEST_AMQP_URL at a broker, or use containers \
                 (HERALD_TEST_BACKEND=containers with DOCKER_HOST set).",
                herald_shared::amqp::redact_url(&url),
                other.map(|r| r.err())
            ),
        };
        let channel = connection.create_channel().await.expect("channel");
        let prefix = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
        Self { url, prefix, connection, channel, container }
    }

    /// The broker's container, with the container backend: to stop, start,
    /// pause and unpause it.
    pub fn container(&self) -> Option<&RabbitMq> {
        self.container.as_deref()
    }

    pub fn topology(&self) -> herald_shared::Topology {
        herald_shared::Topology::new(self.prefix.clone())
    }

    /// Messages ready in a queue (0 if it does not exist yet).
    pub async fn ready(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let count = match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
            Ok(q) => q.message_count(),
            Err(_) => 0,
        };
        drop(channel.close(200, "done".into()).await);
        count
    }

    /// Whether the exchange exists (a passive declare, on a channel of its
    /// own: a missing exchange closes the channel).
    pub async fn exchange_exists(&self, exchange: &str) -> bool {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        let exists = channel
            .exchange_declare(exchange.into(), lapin::ExchangeKind::Direct, passive, FieldTable::default())
            .await
            .is_ok();
        if channel.status().connected() {
            drop(channel.close(200, "done".into()).await);
        }
        exists
    }

    /// Takes one message from a queue, if there is one.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let message = self.channel.basic_get(queue.into(), BasicGetOptions::default()).await.ok()??;
        message.delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
        Some(message)
    }

    /// Publishes raw bytes to the work queue, as a broken or hostile
    /// producer could.
    pub async fn publish_raw(&self, payload: &[u8]) {
        self.publish_work(payload, lapin::BasicProperties::default().with_delivery_mode(2)).await;
    }

    /// Publishes a job to the work queue as an ingress would, marked
    /// idempotent if asked (as with an Idempotency-Key).
    pub async fn publish_job(&self, job: &herald_shared::Job, idempotent: bool) {
        let mut headers = lapin::types::FieldTable::default();
        if idempotent {
            headers.insert(herald_shared::topology::headers::IDEMPOTENT.into(), lapin::types::AMQPValue::Boolean(true));
        }
        self.publish_job_with_headers(job, headers).await;
    }

    /// Publishes a job to the work queue with `headers` of anyone's
    /// choosing, as a broken or hostile producer could.
    pub async fn publish_job_with_headers(&self, job: &herald_shared::Job, headers: lapin::types::FieldTable) {
        let properties = lapin::BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        self.publish_work(&job.encode(), properties).await;
    }

    /// Publishes raw bytes straight into `queue` (the default exchange).
    pub async fn publish_to(&self, queue: &str, payload: &[u8]) {
        let properties = lapin::BasicProperties::default().with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish("".into(), queue.into(), lapin::options::BasicPublishOptions::default(), payload, properties)
            .await
            .expect("publish");
        drop(confirm);
    }

    /// Deletes a queue under the services' feet.
    pub async fn delete_queue(&self, queue: &str) {
        self.channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.expect("delete the queue");
    }

    async fn publish_work(&self, payload: &[u8], properties: lapin::BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology().exchange().as_str().into(),
                herald_shared::topology::WORK_ROUTING_KEY.into(),
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .expect("publish");
        drop(confirm);
    }

    /// Deletes this test's exchange and queues, after a real `herald-relay`
    /// binary ran with the default `HERALD_RETRY_DELAYS` (whose delay queues
    /// it declared).
    pub async fn cleanup_after_default_relay(&self) {
        self.cleanup(&herald_relay::config::Delays::default().0).await;
    }

    /// Deletes this test's exchange and queues: the work and dead queues, and
    /// the delay queues of `retry_delays`.
    pub async fn cleanup(&self, retry_delays: &[Duration]) {
        let t = self.topology();
        let mut queues = vec![t.work_queue(), t.dead_queue(), t.outcomes_stream()];
        queues.extend(retry_delays.iter().map(|d| t.retry_queue(*d)));
        for q in queues {
            drop(self.channel.queue_delete(q.into(), QueueDeleteOptions::default()).await);
        }
        drop(self.channel.exchange_delete(t.exchange().into(), ExchangeDeleteOptions::default()).await);
    }
}

/// A header's value as text (strings as they are, numbers in decimal).
pub fn header_text(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    let headers = properties.headers().as_ref()?;
    Some(match headers.inner().get(&lapin::types::ShortString::from(name))? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}
