//! Publishing jobs: persistent, mandatory, confirmed.

use crate::error::Error;
use herald_shared::amqp::ConfirmChannel;
use herald_shared::job::CONTENT_TYPE;
use herald_shared::topology::WORK_ROUTING_KEY;
use herald_shared::Job;
use lapin::types::ShortString;
use lapin::BasicProperties;

/// Hands a job to the broker; `Ok` only once the broker confirmed it was
/// stored and routed to the work queue.
pub async fn publish(channel: &ConfirmChannel, job: &Job) -> Result<(), Error> {
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_message_id(job.id().to_string().into())
        .with_timestamp(herald_shared::job::now_ms() / 1000)
        .with_app_id("herald-ingress".into());
    let exchange = channel.topology().exchange();
    channel
        .publish(&exchange, WORK_ROUTING_KEY, &job.encode(), properties)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))
}
