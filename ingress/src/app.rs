//! Building and running the ingress. `main` and the tests go through here.

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use herald_shared::{
    admin::{Admin, Readiness},
    amqp::ConfirmChannel,
    outcomes::{
        self,
        reader::Reader,
        writer::{Writer, WriterTask},
    },
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    admission::Admission,
    alerts::Templates,
    auth::Authenticator,
    config::Config,
    error::Error,
    jobs::Jobs,
    metrics::Metrics,
    reload::Reloader,
    routes::{self, AppState},
    server::{self, Limits},
    users::Users,
};

/// How often a disconnected ingress tries the broker again by itself, so
/// that it becomes ready without waiting for a request.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    publisher: Arc<ConfirmChannel>,
    admin: Admin,
    reloader: Reloader,
    outcomes: WriterTask,
    reader: Reader,
    jobs: Arc<Jobs>,
}

impl Application {
    /// Loads the users file and the templates, binds the listeners (port 0
    /// picks a free one) and connects to the broker. A broker that is down
    /// is not fatal: requests get 503 until it is back. Nothing is declared
    /// on the broker before the configuration has been read and checked.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let users_file =
            config.users_file.as_deref().ok_or_else(|| Error::Config("HERALD_USERS_FILE is required".into()))?;
        if config.max_body_bytes.saturating_add(herald_shared::job::XML_ENVELOPE) > config.max_stanza_bytes {
            return Err(Error::Config(format!(
                "HERALD_MAX_BODY_BYTES ({}) leaves no room for the stanza around the body within \
                 HERALD_MAX_STANZA_BYTES ({}): lower the first or raise the second (at least {} more)",
                config.max_body_bytes,
                config.max_stanza_bytes,
                herald_shared::job::XML_ENVELOPE
            )));
        }
        let users = Users::load(users_file)?;
        if users.is_empty() {
            tracing::warn!(file = %users_file.display(), "the users file lists no users: every request will get 401");
        }
        let templates =
            Arc::new(Templates::load(config.alertmanager_template.as_deref(), config.grafana_template.as_deref())?);
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let admission = Admission::new(config.auth_concurrency, config.auth_queue, config.auth_queue_timeout);
        let auth = Arc::new(Authenticator::new(
            users,
            Duration::from_secs(config.auth_cache_seconds),
            config.login_failures,
            config.trust_forwarded_for,
            admission,
            Arc::clone(&metrics),
        ));
        let reloader =
            Reloader::new(users_file.to_owned(), config.users_reload_interval, Arc::clone(&auth), Arc::clone(&metrics));
        let amqp_urls = config.broker.urls()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
        let publisher =
            Arc::new(ConfirmChannel::new(amqp_urls.clone(), "herald-ingress", config.broker.topology(), Vec::new()));
        let outcome_metrics = outcomes::Metrics::register(&mut registry);
        let (writer, outcomes) =
            Writer::new(amqp_urls.clone(), "herald-ingress", config.broker.topology(), outcome_metrics.clone());
        // One index for status and idempotency keys: as long as the longer.
        let window = config.job_status_window.max(config.idempotency_window);
        let jobs = Arc::new(Jobs::new(window, config.job_status_capacity as usize));
        // What this replica accepted it indexed at once; the rest it reads.
        let reader =
            Reader::new(amqp_urls, "herald-ingress outcomes reader", config.broker.topology(), window, outcome_metrics)
                .skipping(writer.id());
        let ready: Readiness = {
            let publisher = Arc::clone(&publisher);
            Arc::new(move || broker_readiness(&publisher))
        };
        let admin = Admin::bind(config.admin_listen, registry, ready)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.admin_listen)))?;
        if let Err(e) = publisher.channel().await {
            tracing::warn!(error = %e, "broker not reachable at start; answering 503 until it is");
        }
        let state = AppState {
            auth,
            publisher: Arc::clone(&publisher),
            max_body_bytes: config.max_body_bytes,
            metrics: Arc::clone(&metrics),
            templates,
            jobs: Arc::clone(&jobs),
            outcomes: writer,
            idempotency_window: config.idempotency_window,
            body_timeout: config.http_body_timeout,
            max_stanza_bytes: config.max_stanza_bytes,
        };
        let limits =
            Limits { header_timeout: config.http_header_timeout, max_connections: config.http_max_connections };
        Ok(Self {
            listener,
            router: routes::router(state),
            limits,
            metrics,
            publisher,
            admin,
            reloader,
            outcomes,
            reader,
            jobs,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// Serves until `shutdown` resolves, then finishes the requests in
    /// flight and closes the broker connection.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        tracing::info!(addr = %self.listener.local_addr()?, "herald-ingress listening");
        let stop = CancellationToken::new();
        let admin = tokio::spawn(self.admin.serve(stop.clone().cancelled_owned()));
        let reconnect = tokio::spawn(keep_connected(Arc::clone(&self.publisher), stop.clone()));
        let reloader = tokio::spawn(self.reloader.run(stop.clone()));
        let jobs = self.jobs;
        let reader = tokio::spawn(self.reader.run(stop.clone(), move |record| jobs.apply(record)));
        // The writer outlives the requests: it stops after the server, with
        // the records of the last requests.
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(self.outcomes.run(writer_stop.clone()));
        server::serve(self.listener, self.router, self.limits, self.metrics, shutdown).await;
        stop.cancel();
        writer_stop.cancel();
        drop(reader.await);
        drop(writer.await);
        drop(reconnect.await);
        drop(reloader.await);
        drop(admin.await);
        self.publisher.close().await;
        tracing::info!("herald-ingress stopped");
        Ok(())
    }
}

/// Ready while a confirm channel is open and the broker does not block it.
fn broker_readiness(publisher: &ConfirmChannel) -> Result<(), String> {
    publisher.unavailable().map_or(Ok(()), |why| Err(why.to_owned()))
}

/// Reconnects in the background while the broker is unreachable.
async fn keep_connected(publisher: Arc<ConfirmChannel>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_INTERVAL) => {}
        }
        if !publisher.is_open() && publisher.channel().await.is_ok() {
            tracing::info!("connected to the broker again");
        }
    }
}
