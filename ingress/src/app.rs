//! Building and running the ingress. `main` and the tests go through here.

use crate::alerts::Templates;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::{self, Metrics};
use crate::routes::{self, AppState};
use crate::users::Users;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::{Router, middleware};
use herald_shared::admin::{Admin, Readiness};
use herald_shared::amqp::ConfirmChannel;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Room for form or JSON encoding around the largest accepted body (JSON
/// escapes can take up to six bytes per character).
const ENVELOPE_FACTOR: usize = 6;
const ENVELOPE_EXTRA_BYTES: usize = 8 * 1024;
/// Largest Alertmanager or Grafana notification accepted (many alerts).
const NOTIFICATION_BODY_LIMIT: usize = 1024 * 1024;

/// How often a disconnected ingress tries the broker again by itself, so
/// that it becomes ready without waiting for a request.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    publisher: Arc<ConfirmChannel>,
    admin: Admin,
}

impl Application {
    /// Loads the users file, binds the listener (port 0 picks a free one) and
    /// connects to the broker. A broker that is down is not fatal: requests
    /// get 503 until it is back.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let users_file =
            config.users_file.as_deref().ok_or_else(|| Error::Config("HERALD_USERS_FILE is required".into()))?;
        let users = Users::load(users_file)?;
        if users.is_empty() {
            tracing::warn!(file = %users_file.display(), "the users file lists no users: every request will get 401");
        }
        let auth =
            Arc::new(Authenticator::new(users, Duration::from_secs(config.auth_cache_seconds), config.login_failures));
        let topology = config.broker.topology();
        let amqp_url = config.broker.url()?;
        let publisher = Arc::new(ConfirmChannel::new(&amqp_url, "herald-ingress", topology, Vec::new()));
        if let Err(e) = publisher.channel().await {
            tracing::warn!(error = %e, "broker not reachable at start; answering 503 until it is");
        }
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let ready: Readiness = {
            let publisher = Arc::clone(&publisher);
            Arc::new(move || if publisher.is_open() { Ok(()) } else { Err("no confirm channel to the broker".into()) })
        };
        let admin = Admin::bind(config.admin_listen, registry, ready)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.admin_listen)))?;
        let templates =
            Arc::new(Templates::load(config.alertmanager_template.as_deref(), config.grafana_template.as_deref())?);
        let state = AppState {
            auth,
            publisher: Arc::clone(&publisher),
            max_body_bytes: config.max_body_bytes,
            metrics: Arc::clone(&metrics),
            trust_forwarded_for: config.trust_forwarded_for,
            templates,
            idempotency: Arc::new(crate::idempotency::Accepted::new(config.idempotency_window)),
        };
        let body_limit = config.max_body_bytes.saturating_mul(ENVELOPE_FACTOR).saturating_add(ENVELOPE_EXTRA_BYTES);
        let router = Router::new()
            .route("/msg", post(routes::msg))
            .route("/msg/{to}", post(routes::msg))
            .layer(DefaultBodyLimit::max(body_limit))
            // A notification carries many alerts; what it renders to is cut
            // to the message limit, not refused.
            .route("/alertmanager", post(routes::alertmanager))
            .route("/alertmanager/{to}", post(routes::alertmanager))
            .route("/grafana", post(routes::grafana))
            .route("/grafana/{to}", post(routes::grafana))
            .layer(DefaultBodyLimit::max(NOTIFICATION_BODY_LIMIT.max(body_limit)))
            .fallback(routes::not_found)
            .route_layer(middleware::from_fn_with_state(metrics, metrics::count_requests))
            .with_state(state);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
        Ok(Self { listener, router, publisher, admin })
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
        let service = self.router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(self.listener, service).with_graceful_shutdown(shutdown).await;
        stop.cancel();
        drop(reconnect.await);
        drop(admin.await);
        self.publisher.close().await;
        served?;
        tracing::info!("herald-ingress stopped");
        Ok(())
    }
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
