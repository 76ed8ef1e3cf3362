//! Publishing jobs: persistent, mandatory, confirmed.

use crate::error::Error;
use herald_shared::Job;
use herald_shared::amqp::ConfirmChannel;
use herald_shared::job::CONTENT_TYPE;
use herald_shared::topology::WORK_ROUTING_KEY;
use herald_shared::topology::headers;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// A job the broker confirmed, as the 202 answer lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AcceptedJob {
    pub id: uuid::Uuid,
    pub to: String,
}

/// Hands a job to the broker; `Ok` only once the broker confirmed it was
/// stored and routed to the work queue. An `idempotent` job's id came from
/// an idempotency key, and the relay sends such an id only once.
pub async fn publish(channel: &ConfirmChannel, job: &Job, idempotent: bool) -> Result<(), Error> {
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_message_id(job.id().to_string().into())
        .with_timestamp(herald_shared::job::now_ms() / 1000)
        .with_app_id("herald-ingress".into());
    if idempotent {
        let mut headers = FieldTable::default();
        headers.insert(headers::IDEMPOTENT.into(), AMQPValue::Boolean(true));
        properties = properties.with_headers(headers);
    }
    let exchange = channel.topology().exchange();
    channel
        .publish(&exchange, WORK_ROUTING_KEY, &job.encode(), properties)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))
}
