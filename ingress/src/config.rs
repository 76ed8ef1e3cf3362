//! Command line and environment. Every setting is an environment variable
//! first (for containers) and a flag second.

use clap::{Args, Parser, Subcommand};
use herald_shared::amqp::BrokerArgs;
use herald_shared::domain::DEFAULT_MAX_BODY_BYTES;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "herald-ingress", version, about = "Herald's HTTP ingress: POST /msg → RabbitMQ")]
#[command(subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a password on stdin and print its argon2id hash (PHC string) for
    /// the users file.
    HashPassword,
    /// Ask the admin listener whether the service is ready; exit 0 if so
    /// (for container health checks).
    Healthcheck {
        #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
        admin_listen: SocketAddr,
    },
}

pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// TOML file of `[[users]]` with `jid`, `password_hash` (argon2id PHC) and
    /// an optional `from` (sender JID to use instead of `jid`).
    #[arg(long, env = "HERALD_USERS_FILE", required = true)]
    pub users_file: Option<PathBuf>,

    /// Largest message body accepted, in bytes (larger: 413).
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Failed logins allowed per client address and per account before each
    /// further one doubles a lockout (429 with Retry-After), from 1 s to 15 min.
    #[arg(long, env = "HERALD_LOGIN_FAILURES", default_value_t = 5)]
    pub login_failures: u32,

    /// Take the client address for login throttling from the last entry of
    /// X-Forwarded-For (set this only behind a proxy that sets that header).
    #[arg(long, env = "HERALD_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,

    /// How long a successful password check is remembered, in seconds (0
    /// turns the cache off and runs argon2 on every request).
    #[arg(long, env = "HERALD_AUTH_CACHE_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub auth_cache_seconds: u64,

    /// How long a request's Idempotency-Key (or a notification's group,
    /// status and alerts) is remembered: a repeat within it gets the first
    /// answer and no new job.
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idempotency_window: std::time::Duration,

    /// A Jinja template (minijinja) for Alertmanager notifications, instead
    /// of Herald's default.
    #[arg(long, env = "HERALD_ALERTMANAGER_TEMPLATE")]
    pub alertmanager_template: Option<PathBuf>,

    /// A Jinja template (minijinja) for Grafana notifications, instead of
    /// Herald's default.
    #[arg(long, env = "HERALD_GRAFANA_TEMPLATE")]
    pub grafana_template: Option<PathBuf>,
}
