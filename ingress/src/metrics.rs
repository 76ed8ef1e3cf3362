//! The ingress's Prometheus metrics, registered once per application.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern (`/msg/{to}`), never the raw path: recipients
    /// would make the label set unbounded.
    pub route: String,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub publish_seconds: Histogram,
    pub jobs_published: Counter,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub password_checks: Gauge,
    pub password_checks_peak: Gauge,
    pub logins_turned_away: Counter,
    pub tokens_refused: Counter,
    pub users_reloads: Family<ReloadLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok`, or `failed` (the file did not parse: the last good one stays).
    pub outcome: &'static str,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            requests: Family::default(),
            publish_seconds: Histogram::new(herald_shared::admin::latency_buckets()),
            jobs_published: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            password_checks: Gauge::default(),
            password_checks_peak: Gauge::default(),
            logins_turned_away: Counter::default(),
            tokens_refused: Counter::default(),
            users_reloads: Family::default(),
        };
        registry.register("herald_http_requests", "HTTP requests by route and status", metrics.requests.clone());
        registry.register(
            "herald_publish_duration_seconds",
            "Time from publish to the broker's confirm",
            metrics.publish_seconds.clone(),
        );
        registry.register("herald_jobs_published", "Jobs the broker confirmed", metrics.jobs_published.clone());
        registry.register("herald_http_connections", "Open HTTP connections", metrics.connections.clone());
        registry.register(
            "herald_http_connections_refused",
            "HTTP connections closed at once because HERALD_HTTP_MAX_CONNECTIONS were open",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "herald_password_checks",
            "argon2 password checks running now",
            metrics.password_checks.clone(),
        );
        registry.register(
            "herald_password_checks_peak",
            "Most argon2 password checks that ran at once since start (bounded by HERALD_AUTH_CONCURRENCY)",
            metrics.password_checks_peak.clone(),
        );
        registry.register(
            "herald_logins_turned_away",
            "Uncached logins answered 503 because the password checks were busy",
            metrics.logins_turned_away.clone(),
        );
        registry.register(
            "herald_tokens_refused",
            "Bearer tokens not in the users file (each answered 401)",
            metrics.tokens_refused.clone(),
        );
        registry.register(
            "herald_users_reloads",
            "Reloads of a changed users file, by outcome",
            metrics.users_reloads.clone(),
        );
        Arc::new(metrics)
    }

    /// One more password check running, for as long as the guard lives.
    pub fn password_check(&self) -> PasswordCheck<'_> {
        let running = self.password_checks.inc() + 1;
        self.password_checks_peak.inner().fetch_max(running, std::sync::atomic::Ordering::Relaxed);
        PasswordCheck(self)
    }
}

/// Counts a running password check; see [`Metrics::password_check`].
#[derive(Debug)]
pub struct PasswordCheck<'a>(&'a Metrics);

impl Drop for PasswordCheck<'_> {
    fn drop(&mut self) {
        self.0.password_checks.dec();
    }
}

/// Middleware counting every request by route pattern and status.
pub async fn count_requests(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    metrics.requests.get_or_create(&RequestLabels { route, status: response.status().as_u16() }).inc();
    response
}
