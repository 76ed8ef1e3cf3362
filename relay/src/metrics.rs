//! The relay's Prometheus metrics, registered once per application.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the XMPP server.
    Delivered,
    /// Sent to a delay queue.
    Retried,
    /// Sent to the dead-letter queue.
    Parked,
    /// Given back to the work queue (the broker could not take a retry or
    /// parked copy).
    Requeued,
    /// Acked without sending: an idempotent job this relay already delivered.
    Duplicate,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            Outcome::Delivered => "delivered",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::Parked => "parked",
            Outcome::Requeued => "requeued",
        };
        EncodeLabelValue::encode(&name, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub condition: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub bounces: Family<ConditionLabels, Counter>,
    pub bounces_ignored: Counter,
    pub delivery_latency: Histogram,
    pub sessions_online: Gauge,
    pub consuming: Gauge,
    pub queue_messages: Family<QueueLabels, Gauge>,
    /// Deliveries the broker marked redelivered: handed out before, to this
    /// relay or another, and not settled then.
    pub redelivered: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            deliveries: Family::default(),
            bounces: Family::default(),
            bounces_ignored: Counter::default(),
            delivery_latency: Histogram::new(herald_shared::admin::latency_buckets()),
            sessions_online: Gauge::default(),
            consuming: Gauge::default(),
            queue_messages: Family::default(),
            redelivered: Counter::default(),
        };
        registry.register("herald_deliveries", "Deliveries by outcome", metrics.deliveries.clone());
        registry.register(
            "herald_bounces",
            "Error stanzas bounced after the server accepted a message, by condition",
            metrics.bounces.clone(),
        );
        registry.register(
            "herald_bounces_ignored",
            "Error stanzas ignored: not from the message's recipient, or for a message this relay does not remember",
            metrics.bounces_ignored.clone(),
        );
        registry.register(
            "herald_delivery_latency_seconds",
            "Time from the ingress accepting a job to the XMPP server acknowledging its stanza",
            metrics.delivery_latency.clone(),
        );
        registry.register("herald_sessions_online", "XMPP sender sessions online", metrics.sessions_online.clone());
        registry.register("herald_consuming", "1 while the relay consumes the work queue", metrics.consuming.clone());
        registry.register(
            "herald_queue_messages",
            "Messages ready in Herald's queues (sampled)",
            metrics.queue_messages.clone(),
        );
        registry.register(
            "herald_redelivered",
            "Deliveries the broker had handed out before without a settlement (a relay stopped or lost its channel)",
            metrics.redelivered.clone(),
        );
        Arc::new(metrics)
    }

    pub fn count(&self, outcome: Outcome) {
        self.deliveries.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
