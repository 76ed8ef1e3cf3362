//! Command line and environment. Every setting is an environment variable
//! first (for containers) and a flag second.

use clap::{Args, Parser, Subcommand};
use herald_shared::amqp::BrokerArgs;
use herald_shared::domain::DEFAULT_MAX_BODY_BYTES;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "herald-ingress", version, about = "Herald's HTTP ingress: POST /msg → RabbitMQ")]
#[command(after_help = herald_shared::telemetry::ENVIRONMENT_HELP)]
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
    /// Access tokens for `Authorization: Bearer`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Ask the admin listener whether the service is ready; exit 0 if so
    /// (for container health checks).
    Healthcheck {
        #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
        admin_listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new token for a user of the users file: the token goes to
    /// stderr (shown once, give it to the client), the `[[tokens]]` entry to
    /// add to the users file to stdout (its SHA-256, never the token).
    New {
        /// The user (its `jid` in the users file) the token acts as.
        #[arg(long)]
        user: String,
        /// A label for the logs, e.g. the client's name.
        #[arg(long)]
        name: Option<String>,
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

    /// TOML file of `[[users]]` with `jid`, `password_hash` (argon2id PHC
    /// from `herald-ingress hash-password`), and optionally `from` (the
    /// sender JID to use instead of `jid`), `allow` (a list of recipients:
    /// bare JIDs or `*@domain`), `rate` (e.g. "60/min") and `burst`.
    #[arg(long, env = "HERALD_USERS_FILE", required = true)]
    pub users_file: Option<PathBuf>,

    /// Largest message body accepted, in bytes as XML text (larger: 413).
    /// Must leave room for the stanza around it within
    /// HERALD_MAX_STANZA_BYTES (checked at start-up).
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// The XMPP server's stanza size limit, the same value the relay has
    /// (Prosody's c2s_stanza_size_limit): a message whose stanza could be
    /// larger is refused with 413 (a notification is cut to fit), instead
    /// of being accepted and then parked by the relay.
    #[arg(long, env = "HERALD_MAX_STANZA_BYTES", default_value_t = herald_shared::job::DEFAULT_MAX_STANZA_BYTES, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(4096..), |v| v as usize))]
    pub max_stanza_bytes: usize,

    /// Failed logins allowed per client address (IPv6: per /64) and per
    /// (account, address) before each further one doubles that client's
    /// lockout (429 with Retry-After; 503 on the notification routes), from
    /// 1 s to 15 min. An account's failures from other addresses never
    /// refuse its owner.
    #[arg(long, env = "HERALD_LOGIN_FAILURES", default_value_t = 5)]
    pub login_failures: u32,

    /// Uncached password checks (argon2, ~20 ms of CPU and 19 MiB each) run
    /// at once. Default: half the cores, at least 1.
    #[arg(long, env = "HERALD_AUTH_CONCURRENCY", default_value_t = default_auth_concurrency(), value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..), usize::from))]
    pub auth_concurrency: usize,

    /// Uncached password checks that may wait for a slot; more get 503 at
    /// once.
    #[arg(long, env = "HERALD_AUTH_QUEUE", default_value_t = 64)]
    pub auth_queue: usize,

    /// How long an uncached password check may wait for a slot before the
    /// request gets 503 with Retry-After.
    #[arg(long, env = "HERALD_AUTH_QUEUE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub auth_queue_timeout: std::time::Duration,

    /// How long a connection may take to send a request's headers, counted
    /// from when it waits for a request: a new connection, or a kept-alive
    /// one after its last response (so this also closes idle keep-alive
    /// connections).
    #[arg(long, env = "HERALD_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: std::time::Duration,

    /// How long a client may take to send a request's body (408 after).
    #[arg(long, env = "HERALD_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: std::time::Duration,

    /// Open HTTP connections at most; further ones are closed at once.
    #[arg(long, env = "HERALD_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,

    /// Take the client address for login throttling from the last entry of
    /// X-Forwarded-For (set this only behind a proxy that sets that header).
    #[arg(long, env = "HERALD_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,

    /// How often the users file is read to see whether it changed (and then
    /// reloaded); 0s: only on SIGHUP.
    #[arg(long, env = "HERALD_USERS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub users_reload_interval: std::time::Duration,

    /// How long a successful password check is remembered, in seconds (0
    /// turns the cache off and runs argon2 on every request).
    #[arg(long, env = "HERALD_AUTH_CACHE_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub auth_cache_seconds: u64,

    /// How long a request's Idempotency-Key (or a notification's group,
    /// status and alerts) is remembered: a repeat within it gets the first
    /// answer and no new job.
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idempotency_window: std::time::Duration,

    /// How long `GET /jobs/{id}` can tell what became of a job, after its
    /// last news (the index is at least as long as HERALD_IDEMPOTENCY_WINDOW,
    /// and the outcomes stream keeps a day).
    #[arg(long, env = "HERALD_JOB_STATUS_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub job_status_window: std::time::Duration,

    /// How many jobs the status index holds at most (the oldest go first).
    #[arg(long, env = "HERALD_JOB_STATUS_CAPACITY", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub job_status_capacity: u64,

    /// A Jinja template (minijinja) for Alertmanager notifications, instead
    /// of Herald's default.
    #[arg(long, env = "HERALD_ALERTMANAGER_TEMPLATE")]
    pub alertmanager_template: Option<PathBuf>,

    /// A Jinja template (minijinja) for Grafana notifications, instead of
    /// Herald's default.
    #[arg(long, env = "HERALD_GRAFANA_TEMPLATE")]
    pub grafana_template: Option<PathBuf>,
}

/// `HERALD_AUTH_CONCURRENCY` when it is not set: half the cores, so that
/// argon2 never takes every core from the requests that need none.
fn default_auth_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
