//! Building and running the relay. `main` and the tests go through here.

use crate::accounts::{self, Account};
use crate::config::Config;
use crate::consumer::{self, Dispatcher};
use crate::error::Error;
use crate::session::{self, SessionHandle};
use herald_shared::amqp::ConfirmChannel;
use herald_shared::Topology;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Application {
    config: Config,
    accounts: Vec<Account>,
}

impl Application {
    /// Loads and checks the accounts file. Nothing connects until `run_until`.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let accounts = accounts::load(&config.accounts_file)?;
        if accounts.is_empty() {
            return Err(Error::Config(format!("the accounts file {} lists no accounts", config.accounts_file.display())));
        }
        Ok(Self { config, accounts })
    }

    /// Runs until `shutdown` resolves, then stops consuming, waits (bounded)
    /// for the acks of what was already sent, and closes the XMPP streams.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self { config, accounts } = self;
        let topology = Topology::new(config.amqp_prefix.clone());
        let stop_sessions = CancellationToken::new();
        let mut sessions = std::collections::HashMap::new();
        let mut session_tasks = Vec::new();
        for account in accounts {
            let (handle, task): (SessionHandle, _) = session::spawn(account, config.ack_timeout, stop_sessions.clone());
            sessions.insert(handle.jid().clone(), handle);
            session_tasks.push(task);
        }
        let publisher = Arc::new(ConfirmChannel::new(
            &config.amqp_url,
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
        });
        let stop_consuming = CancellationToken::new();
        let consumer = tokio::spawn(consumer::run(
            dispatcher,
            config.amqp_url.clone(),
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
        publisher.close().await;
        tracing::info!("herald-relay stopped");
        Ok(())
    }
}
