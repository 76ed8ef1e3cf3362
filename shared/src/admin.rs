//! The admin listener both services run beside their main work: liveness,
//! readiness and Prometheus metrics, on a port of its own so that it can be
//! kept off the public Service.
//!
//! - `GET /healthz`: 200 while the process serves requests at all.
//! - `GET /readyz`: 200 when the service can do its job, else 503 with the
//!   reason in the body.
//! - `GET /metrics`: the registry in the Prometheus/OpenMetrics text format.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// `Ok(())` when ready, else why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    ready: Readiness,
}

pub struct Admin {
    listener: TcpListener,
    router: Router,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl Admin {
    pub async fn bind(addr: SocketAddr, registry: Registry, ready: Readiness) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let state = AdminState { registry: Arc::new(registry), ready };
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state);
        Ok(Self { listener, router })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "admin listener (healthz, readyz, metrics)");
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match (state.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new()),
    }
}

/// Histogram buckets for latencies, 1 ms to 60 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0].into_iter()
}

/// The `healthcheck` subcommand for container health checks: asks the
/// admin listener at `addr` (0.0.0.0 becomes 127.0.0.1) for `/readyz` and
/// returns whether it answered 200. No shell or curl needed in the image.
pub fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = Duration::from_secs(3);
    let mut stream =
        std::net::TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("cannot reach {target}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET /readyz HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())
        .map_err(|e| format!("cannot ask {target}: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("no answer from {target}: {e}"))?;
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status == "200" { Ok(()) } else { Err(format!("{target}/readyz answered {status}: {body}")) }
}

/// `<binary> healthcheck`: prints why not ready, exits 1; or exits 0.
pub fn run_healthcheck(binary: &str, addr: SocketAddr) -> std::process::ExitCode {
    match healthcheck(addr) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{binary} healthcheck: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}
