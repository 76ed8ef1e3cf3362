//! Building and running the relay. `main` and the tests go through here.

use crate::accounts::{self, Account};
use crate::config::Config;
use crate::consumer::{self, Dispatcher};
use crate::error::Error;
use crate::metrics::{Metrics, QueueLabels};
use crate::recent::Recent;
use crate::seen::Seen;
use crate::session::{self, SessionHandle};
use herald_shared::admin::{Admin, Readiness};
use herald_shared::amqp::ConfirmChannel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the depth of the work and dead queues is sampled for metrics.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Application {
    config: Config,
    /// Read at build, so that an unreadable URL file stops start-up.
    amqp_url: String,
    accounts: Vec<Account>,
    admin: Admin,
    registry_metrics: Arc<Metrics>,
    sessions_ready: Arc<std::sync::OnceLock<Vec<SessionHandle>>>,
}

impl Application {
    /// Loads and checks the accounts file and binds the admin listener.
    /// Nothing connects until `run_until`.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let file =
            config.accounts_file.clone().ok_or_else(|| Error::Config("HERALD_ACCOUNTS_FILE is required".into()))?;
        let accounts = accounts::load(&file)?;
        let amqp_url = config.broker.url()?;
        if accounts.is_empty() {
            return Err(Error::Config(format!("the accounts file {} lists no accounts", file.display())));
        }
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let sessions_ready: Arc<std::sync::OnceLock<Vec<SessionHandle>>> = Arc::default();
        let ready: Readiness = {
            let (metrics, sessions) = (Arc::clone(&metrics), Arc::clone(&sessions_ready));
            Arc::new(move || readiness(&metrics, sessions.get().map(Vec::as_slice).unwrap_or_default()))
        };
        let admin = Admin::bind(config.admin_listen, registry, ready)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.admin_listen)))?;
        Ok(Self { config, amqp_url, accounts, admin, registry_metrics: metrics, sessions_ready })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// Runs until `shutdown` resolves, then stops consuming, waits (bounded)
    /// for the acks of what was already sent, and closes the XMPP streams.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self { config, amqp_url, accounts, admin, registry_metrics: metrics, sessions_ready } = self;
        let stop_admin = CancellationToken::new();
        let admin = tokio::spawn(admin.serve(stop_admin.clone().cancelled_owned()));
        let topology = config.broker.topology();
        let stop_sessions = CancellationToken::new();
        let mut sessions = std::collections::HashMap::new();
        let mut session_tasks = Vec::new();
        let (bounces_tx, mut bounces) = tokio::sync::mpsc::unbounded_channel();
        for account in accounts {
            let (handle, task): (SessionHandle, _) = session::spawn(
                account,
                config.ack_timeout,
                bounces_tx.clone(),
                Arc::clone(&metrics),
                stop_sessions.clone(),
            );
            sessions.insert(handle.jid().clone(), handle);
            session_tasks.push(task);
        }
        let _ = sessions_ready.set(sessions.values().cloned().collect());
        let publisher = Arc::new(ConfirmChannel::new(
            &amqp_url,
            "herald-relay publisher",
            topology.clone(),
            config.retry_delays.0.clone(),
        ));
        let dispatcher = Arc::new(Dispatcher {
            sessions,
            publisher: Arc::clone(&publisher),
            topology,
            retry_delays: config.retry_delays.0.clone(),
            online_timeout: config.online_timeout,
            max_stanza_bytes: config.max_stanza_bytes,
            recent: Recent::default(),
            seen: Seen::new(config.idempotency_window),
            metrics: Arc::clone(&metrics),
        });
        let sampler = tokio::spawn(sample_queues(Arc::clone(&publisher), Arc::clone(&metrics), stop_admin.clone()));
        drop(bounces_tx);
        // Ends when the last session is gone.
        let bounce_handler = tokio::spawn({
            let dispatcher = Arc::clone(&dispatcher);
            async move {
                while let Some(bounce) = bounces.recv().await {
                    dispatcher.on_bounce(bounce).await;
                }
            }
        });
        let stop_consuming = CancellationToken::new();
        let consumer = tokio::spawn(consumer::run(
            Arc::clone(&dispatcher),
            amqp_url,
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
        stop_sessions.cancel();
        for task in session_tasks {
            drop(task.await);
        }
        drop(bounce_handler.await);
        stop_admin.cancel();
        drop(sampler.await);
        drop(admin.await);
        publisher.close().await;
        tracing::info!("herald-relay stopped");
        Ok(())
    }
}

/// Ready when consuming and every sender session is online; otherwise says
/// which part is missing.
fn readiness(metrics: &Metrics, sessions: &[SessionHandle]) -> Result<(), String> {
    let mut problems = Vec::new();
    if metrics.consuming.get() == 0 {
        problems.push("not consuming from the broker".to_owned());
    }
    for session in sessions {
        if let Some(why) = session.offline_reason() {
            problems.push(format!("{}: {why}", session.jid()));
        }
    }
    if sessions.is_empty() {
        problems.push("sessions not started".to_owned());
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Samples the depth of the work and dead queues for the metrics.
async fn sample_queues(publisher: Arc<ConfirmChannel>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let topology = publisher.topology().clone();
    loop {
        if let Ok(channel) = publisher.channel().await {
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
