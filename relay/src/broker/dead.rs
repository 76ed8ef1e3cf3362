//! `herald-relay dead list|replay`: what an operator does with parked jobs.
//!
//! Listing takes each parked job without acking it and gives them all back
//! when done, so it changes nothing. Replaying publishes each chosen job to
//! the work queue with a fresh attempt count (confirmed by the broker) and
//! only then removes it from the parking queue: a crash in between leaves a
//! duplicate, never a loss.

use std::io::Write;

use herald_shared::{
    Job, Topology,
    amqp::{BrokerArgs, ConfirmChannel},
    topology::{WORK_ROUTING_KEY, headers},
};
use lapin::{
    Channel,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::Serialize;

use super::properties::{self, as_text, as_u64, header};
use crate::error::Error;

/// One parked job as `dead list` prints it.
#[derive(Debug, Serialize)]
pub struct Parked {
    pub id: Option<String>,
    pub attempts: Option<u64>,
    pub reason: Option<String>,
    pub parked_at_ms: Option<u64>,
    /// The job as JSON, or its raw text if it cannot be decoded.
    pub job: serde_json::Value,
}

impl Parked {
    fn from_message(message: &BasicGetMessage) -> Self {
        let p = &message.delivery.properties;
        let job = serde_json::from_slice(&message.delivery.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&message.delivery.data).into_owned())
        });
        Parked {
            id: p.message_id().as_ref().map(ToString::to_string),
            attempts: header(p, headers::ATTEMPT).and_then(as_u64),
            // Jobs the broker parked (delivery limit) carry its reason instead.
            reason: header(p, headers::REASON).or_else(|| header(p, "x-first-death-reason")).and_then(as_text),
            parked_at_ms: header(p, headers::PARKED_AT).and_then(as_u64),
            job,
        }
    }
}

/// Prints up to `limit` parked jobs, one JSON object per line, and returns
/// how many it printed. The queue is left as it was.
pub async fn list(broker: &BrokerArgs, limit: usize, out: &mut impl Write) -> Result<usize, Error> {
    let (topology, urls) = (broker.topology(), broker.urls()?);
    let connection = urls.connect("herald-relay dead list").await.map_err(Error::Broker)?;
    let channel = connection.create_channel().await?;
    let mut printed = 0;
    while printed < limit {
        let Some(message) = get(&channel, &topology).await? else { break };
        let line = serde_json::to_string(&Parked::from_message(&message)).map_err(|e| Error::Config(e.to_string()))?;
        writeln!(out, "{line}")?;
        printed += 1;
    }
    // Unacked messages go back to the queue when the channel closes.
    drop(channel.close(200, "listed".into()).await);
    drop(connection.close(200, "done".into()).await);
    Ok(printed)
}

/// Moves the parked jobs with the given ids (all, if `ids` is empty) back
/// into the work queue and returns how many it moved. Looks at each job
/// parked when it starts at most once, so jobs that are parked again while
/// it runs wait for the next replay.
pub async fn replay(broker: &BrokerArgs, ids: &[String]) -> Result<usize, Error> {
    let (topology, urls) = (broker.topology(), broker.urls()?);
    let publisher = ConfirmChannel::new(urls.clone(), "herald-relay dead replay", topology.clone(), Vec::new());
    let connection = urls.connect("herald-relay dead replay").await.map_err(Error::Broker)?;
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    let parked = channel
        .queue_declare(topology.dead_queue().as_str().into(), options, FieldTable::default())
        .await?
        .message_count();
    let mut moved = 0;
    for _ in 0..parked {
        let Some(message) = get(&channel, &topology).await? else { break };
        let parked = Parked::from_message(&message);
        let wanted = ids.is_empty() || parked.id.as_ref().is_some_and(|id| ids.contains(id));
        if !wanted {
            continue;
        }
        let properties = properties::replayed(&message.delivery.properties);
        publisher
            .publish(&topology.exchange(), WORK_ROUTING_KEY, &message.delivery.data, properties)
            .await
            .map_err(|e| Error::Config(format!("cannot replay {}: {e}", parked.id.as_deref().unwrap_or("a job"))))?;
        message.delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
        let id = parked.id.or_else(|| Job::decode(&message.delivery.data).ok().map(|j| j.id().to_string()));
        tracing::info!(id = ?id, reason = ?parked.reason, "replayed into the work queue");
    }
    drop(channel.close(200, "replayed".into()).await);
    drop(connection.close(200, "done".into()).await);
    publisher.close().await;
    Ok(moved)
}

async fn get(channel: &Channel, topology: &Topology) -> Result<Option<BasicGetMessage>, Error> {
    Ok(channel.basic_get(topology.dead_queue().as_str().into(), BasicGetOptions { no_ack: false }).await?)
}
