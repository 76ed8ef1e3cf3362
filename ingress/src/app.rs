//! Building and running the ingress. `main` and the tests go through here.

use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::Error;
use crate::routes::{self, AppState};
use crate::users::Users;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use herald_shared::amqp::ConfirmChannel;
use herald_shared::Topology;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Room for form or JSON encoding around the largest accepted body (JSON
/// escapes can take up to six bytes per character).
const ENVELOPE_FACTOR: usize = 6;
const ENVELOPE_EXTRA_BYTES: usize = 8 * 1024;

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    publisher: Arc<ConfirmChannel>,
}

impl Application {
    /// Loads the users file, binds the listener (port 0 picks a free one) and
    /// connects to the broker. A broker that is down is not fatal: requests
    /// get 503 until it is back.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let users_file = config.users_file.as_deref().ok_or_else(|| Error::Config("HERALD_USERS_FILE is required".into()))?;
        let users = Users::load(users_file)?;
        if users.is_empty() {
            tracing::warn!(file = %users_file.display(), "the users file lists no users: every request will get 401");
        }
        let auth = Arc::new(Authenticator::new(users, Duration::from_secs(config.auth_cache_seconds)));
        let topology = Topology::new(config.amqp_prefix.clone());
        let publisher = Arc::new(ConfirmChannel::new(&config.amqp_url, "herald-ingress", topology, Vec::new()));
        if let Err(e) = publisher.channel().await {
            tracing::warn!(error = %e, "broker not reachable at start; answering 503 until it is");
        }
        let state = AppState { auth, publisher: Arc::clone(&publisher), max_body_bytes: config.max_body_bytes };
        let body_limit = config.max_body_bytes.saturating_mul(ENVELOPE_FACTOR).saturating_add(ENVELOPE_EXTRA_BYTES);
        let router = Router::new()
            .route("/msg", post(routes::post_msg))
            .route("/msg/{to}", post(routes::post_msg_to))
            .fallback(routes::not_found)
            .layer(DefaultBodyLimit::max(body_limit))
            .with_state(state);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
        Ok(Self { listener, router, publisher })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then finishes the requests in
    /// flight and closes the broker connection.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        tracing::info!(addr = %self.listener.local_addr()?, "herald-ingress listening");
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await?;
        self.publisher.close().await;
        tracing::info!("herald-ingress stopped");
        Ok(())
    }
}
