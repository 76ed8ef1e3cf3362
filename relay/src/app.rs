//! Building and running the relay. `main` and the tests go through here.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use herald_shared::{
    admin::{Admin, Readiness},
    amqp::{BrokerUrls, ConfirmChannel},
    outcomes::{self, reader::Reader, writer::Writer},
};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::Worker,
    config::Config,
    delivery::{self, Delivery, retry::Policy},
    error::Error,
    metrics::{Metrics, QueueLabels},
    xmpp::{Account, SessionSettings, accounts},
};

/// How often the depth of the work and dead queues is sampled for metrics.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Application {
    config: Config,
    /// Read at build, so that an unreadable URL file stops start-up.
    amqp_urls: BrokerUrls,
    accounts: Vec<Account>,
    admin: Admin,
    metrics: Arc<Metrics>,
    outcome_metrics: outcomes::Metrics,
    delivery: Arc<OnceLock<Arc<Delivery>>>,
}

impl Application {
    /// Loads and checks the accounts file and binds the admin listener.
    /// Nothing connects until `run_until`.
    pub async fn build(config: Config) -> Result<Self, Error> {
        config.check().map_err(Error::Config)?;
        let file =
            config.accounts_file.clone().ok_or_else(|| Error::Config("HERALD_ACCOUNTS_FILE is required".into()))?;
        let accounts = accounts::load(&file)?;
        let amqp_urls = config.broker.urls()?;
        if accounts.is_empty() {
            return Err(Error::Config(format!("the accounts file {} lists no accounts", file.display())));
        }
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let outcome_metrics = outcomes::Metrics::register(&mut registry);
        let delivery: Arc<OnceLock<Arc<Delivery>>> = Arc::default();
        let ready: Readiness = {
            let (metrics, delivery) = (Arc::clone(&metrics), Arc::clone(&delivery));
            Arc::new(move || readiness(&metrics, delivery.get().map(Arc::as_ref)))
        };
        let admin = Admin::bind(config.admin_listen, registry, ready)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.admin_listen)))?;
        Ok(Self { config, amqp_urls, accounts, admin, metrics, outcome_metrics, delivery })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// Runs until `shutdown` resolves, then stops consuming, waits (bounded)
    /// for the acks of what was already sent, and closes the XMPP streams.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self { config, amqp_urls, accounts, admin, metrics, outcome_metrics, delivery: ready_delivery } = self;
        let stop_admin = CancellationToken::new();
        let admin = tokio::spawn(admin.serve(stop_admin.clone().cancelled_owned()));
        let settings = delivery::Settings {
            session: SessionSettings {
                ack_timeout: config.ack_timeout,
                idle: config.idle_sessions_close_after(),
                nick_suffix: config.instance.clone(),
            },
            policy: Policy { delays: config.retry_delays.0.clone(), unknown_sender_grace: config.unknown_sender_grace },
            online_timeout: config.online_timeout,
            max_stanza_bytes: config.max_stanza_bytes,
            idempotency_window: config.idempotency_window,
        };
        let topology = config.broker.topology();
        let (writer, writer_task) =
            Writer::new(amqp_urls.clone(), "herald-relay", topology.clone(), outcome_metrics.clone());
        let stop_writer = CancellationToken::new();
        let writer_task = tokio::spawn(writer_task.run(stop_writer.clone()));
        let writer_id = writer.id().to_owned();
        let delivery = Arc::new(Delivery::start(accounts, settings, Arc::clone(&metrics), writer));
        // What other relays delivered, from the outcomes stream: as far back
        // as this relay's own memory of delivered ids reaches.
        let reader = (!config.idempotency_window.is_zero()).then(|| {
            let reader = Reader::new(
                amqp_urls.clone(),
                "herald-relay outcomes reader",
                topology,
                config.idempotency_window,
                outcome_metrics,
            )
            // Other relays' outcomes only, and only batches with a record a
            // relay learns from: this one's own are in its memory already,
            // the ingresses' acceptances and ordinary deliveries are of no
            // use here.
            .skipping(&writer_id)
            .only_from("herald-relay")
            .for_a_relay();
            let delivery = Arc::clone(&delivery);
            tokio::spawn(reader.run(stop_admin.clone(), move |record| delivery.learn(&record)))
        });
        let _ = ready_delivery.set(Arc::clone(&delivery));
        let publisher = Arc::new(ConfirmChannel::new(
            amqp_urls.clone(),
            "herald-relay publisher",
            config.broker.topology(),
            config.retry_delays.0.clone(),
        ));
        let worker = Arc::new(Worker::new(
            Arc::clone(&delivery),
            Arc::clone(&publisher),
            config.retry_delays.0.clone(),
            Arc::clone(&metrics),
        ));
        let sampler = tokio::spawn(sample_queues(Arc::clone(&publisher), Arc::clone(&metrics), stop_admin.clone()));
        let stop_bounces = CancellationToken::new();
        let bounces = tokio::spawn({
            let (worker, stop) = (Arc::clone(&worker), stop_bounces.clone());
            async move { worker.settle_bounces(stop).await }
        });
        let stop_consuming = CancellationToken::new();
        let consumer = tokio::spawn(Arc::clone(&worker).consume(
            amqp_urls,
            config.prefetch,
            config.drain_timeout,
            stop_consuming.clone(),
        ));
        shutdown.await;
        tracing::info!("herald-relay stopping: no new jobs, draining the ones in flight");
        stop_consuming.cancel();
        if let Err(e) = consumer.await {
            tracing::error!(error = %e, "consumer task failed");
        }
        delivery.close_sessions().await;
        // Ends when the last session is gone, or gives up on a broker that
        // does not take a bounced job within the drain timeout.
        let give_up = tokio::spawn({
            let stop = stop_bounces.clone();
            let drain = config.drain_timeout;
            async move {
                tokio::time::sleep(drain).await;
                stop.cancel();
            }
        });
        drop(bounces.await);
        give_up.abort();
        stop_admin.cancel();
        stop_writer.cancel();
        drop(sampler.await);
        if let Some(reader) = reader {
            drop(reader.await);
        }
        drop(writer_task.await);
        drop(admin.await);
        publisher.close().await;
        tracing::info!("herald-relay stopped");
        Ok(())
    }
}

/// Ready when consuming and every sender session can deliver; otherwise
/// says which part is missing.
fn readiness(metrics: &Metrics, delivery: Option<&Delivery>) -> Result<(), String> {
    let mut problems = Vec::new();
    if metrics.consuming.get() == 0 {
        problems.push("not consuming from the broker".to_owned());
    }
    match delivery {
        Some(delivery) => problems.extend(delivery.problems()),
        None => problems.push("sessions not started".to_owned()),
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Samples the depth of the work and dead queues for the metrics.
async fn sample_queues(publisher: Arc<ConfirmChannel>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let topology = publisher.topology().clone();
    loop {
        let channel = tokio::select! {
            () = stop.cancelled() => return,
            channel = publisher.channel() => channel,
        };
        if let Ok(channel) = channel {
            for queue in [topology.work_queue(), topology.dead_queue()] {
                let options = QueueDeclareOptions { passive: true, ..Default::default() };
                if let Ok(q) = channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await {
                    metrics.queue_messages.get_or_create(&QueueLabels { queue }).set(i64::from(q.message_count()));
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(QUEUE_SAMPLE_INTERVAL) => {}
        }
    }
}
