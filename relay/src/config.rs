//! Command line and environment: every setting is an environment variable
//! first and a flag second.

use clap::{Args, Parser, Subcommand};
use herald_shared::amqp::BrokerArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "herald-relay",
    version,
    about = "Herald's relay: RabbitMQ → XMPP, acked only once the XMPP server acked"
)]
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
    /// Ask the admin listener whether the relay is ready; exit 0 if so (for
    /// container health checks).
    Healthcheck {
        #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
        admin_listen: SocketAddr,
    },
    /// Inspect or replay the parked jobs in `<prefix>.dead`.
    #[command(subcommand)]
    Dead(DeadCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Print the parked jobs, one JSON object per line, without removing
    /// them.
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move parked jobs back into the work queue with a fresh attempt count.
    Replay {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Replay only the job with this id (repeatable); without it, all.
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9091";

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Address of the admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,

    /// TOML file of `[[accounts]]` with `jid`, `password`, optional
    /// `server = "host:port"` (default: SRV records of the JID's domain),
    /// optional `tls = "required"` (STARTTLS, the default) | `"direct"`
    /// (TLS from the first byte, XEP-0368) | `"none"` (loopback servers
    /// only), and optional `nick` (in group chat rooms; default: the JID's
    /// local part).
    #[arg(long, env = "HERALD_ACCOUNTS_FILE", required = true)]
    pub accounts_file: Option<PathBuf>,

    /// How many unacknowledged jobs the relay holds at once (1 to 65535).
    #[arg(long, env = "HERALD_PREFETCH", default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Delays between delivery attempts after a transient failure, each at
    /// least 100ms; after the last one the job is parked in `<prefix>.dead`.
    #[arg(long, env = "HERALD_RETRY_DELAYS", default_value = DEFAULT_RETRY_DELAYS, value_parser = parse_delays)]
    pub retry_delays: Delays,

    /// How long a stanza waits for the XMPP server's acknowledgement while
    /// the server acknowledges none of the session's stanzas (at least 1s);
    /// then its job is retried. A server that acks others meanwhile is slow,
    /// not gone, and the stanza waits on.
    #[arg(long, env = "HERALD_ACK_TIMEOUT", default_value = "30s", value_parser = at_least::<1000>)]
    pub ack_timeout: Duration,

    /// The XMPP server's stanza size limit (Prosody's
    /// `c2s_stanza_size_limit`, 256 KiB by default): a job whose message
    /// would be larger is parked, since sending it would only make the
    /// server close the stream, again on every retry.
    #[arg(long, env = "HERALD_MAX_STANZA_BYTES", default_value_t = herald_shared::job::DEFAULT_MAX_STANZA_BYTES, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(4096..), |v| v as usize))]
    pub max_stanza_bytes: usize,

    /// How long a job waits for its sender's session to come online before
    /// it is retried later (at least 100ms).
    #[arg(long, env = "HERALD_ONLINE_TIMEOUT", default_value = "10s", value_parser = at_least::<100>)]
    pub online_timeout: Duration,

    /// Open each sender's XMPP session for its first job and close it after
    /// it has taken no job for this long; unset or 0s: every session opens
    /// at start and stays open. For many occasional senders (the relay then
    /// holds only the sessions in use). Must be longer than two ack
    /// timeouts.
    #[arg(long, env = "HERALD_SESSION_IDLE", value_parser = humantime::parse_duration)]
    pub session_idle: Option<Duration>,

    /// On shutdown, how long to wait for the acks of jobs already sent (at
    /// least 1s).
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "20s", value_parser = at_least::<1000>)]
    pub drain_timeout: Duration,

    /// How long this relay remembers the ids of the idempotent jobs it
    /// delivered (posted with an Idempotency-Key, or notifications; at most
    /// 65,536 of them), and sends none of them twice: a later copy is acked
    /// without being sent. 0s remembers nothing. (A copy of any job that
    /// arrives while the job is in flight waits for that attempt.)
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,

    /// How long a job whose sender this relay holds no account for is given
    /// back (through the first delay queue) for another replica that may
    /// hold it, counted from when the ingress accepted it; then it is
    /// parked. Covers a rolling change of the accounts file.
    #[arg(long, env = "HERALD_UNKNOWN_SENDER_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub unknown_sender_grace: Duration,

    /// This replica's name: the suffix of its nick (`nick-NAME`) in a group
    /// chat room that says the account's nick is taken (another replica on
    /// a server without multi-session nicks). Default: the last
    /// `-`-separated part of the host name (a pod's random suffix), or a
    /// random one.
    #[arg(long, env = "HERALD_INSTANCE", default_value_t = default_instance(), hide_default_value = true)]
    pub instance: String,
}

/// `HERALD_RETRY_DELAYS` when it is not set.
pub const DEFAULT_RETRY_DELAYS: &str = "1s,5s,30s,2m,10m";

/// The retry schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delays(pub Vec<Duration>);

impl Default for Delays {
    /// The schedule of `DEFAULT_RETRY_DELAYS`.
    fn default() -> Self {
        parse_delays(DEFAULT_RETRY_DELAYS).expect("the default retry delays parse")
    }
}

/// The shortest retry delay: a shorter one is a hot loop through the broker.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);

fn parse_delays(text: &str) -> Result<Delays, String> {
    let delays = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() {
        return Err("at least one retry delay is needed (otherwise every transient failure would be parked)".into());
    }
    if let Some(short) = delays.iter().find(|d| **d < MIN_RETRY_DELAY) {
        return Err(format!("a retry delay must be at least {MIN_RETRY_DELAY:?}, not {short:?}"));
    }
    Ok(Delays(delays))
}

/// A duration of at least `MIN_MS` milliseconds.
fn at_least<const MIN_MS: u64>(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let min = Duration::from_millis(MIN_MS);
    if duration < min {
        return Err(format!("must be at least {}", humantime::format_duration(min)));
    }
    Ok(duration)
}

impl Config {
    /// `HERALD_SESSION_IDLE`, `None` for 0s.
    pub fn idle_sessions_close_after(&self) -> Option<Duration> {
        self.session_idle.filter(|idle| !idle.is_zero())
    }

    /// What single settings cannot check: how they fit together.
    pub fn check(&self) -> Result<(), String> {
        if let Some(idle) = self.idle_sessions_close_after()
            && idle <= self.ack_timeout * 2
        {
            return Err(format!(
                "HERALD_SESSION_IDLE ({}) must be longer than two HERALD_ACK_TIMEOUTs ({}): a session must not close \
                 while a job it took still waits for its acknowledgement",
                humantime::format_duration(idle),
                humantime::format_duration(self.ack_timeout * 2)
            ));
        }
        Ok(())
    }
}

/// `HERALD_INSTANCE` when it is not set.
fn default_instance() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    match host.rsplit('-').next().filter(|s| !s.is_empty()) {
        Some(last) => last.to_owned(),
        None => format!("{:04x}", rand::random::<u16>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_delay_lists() {
        assert_eq!(
            parse_delays("1s, 5s,2m").expect("ok").0,
            vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(120)]
        );
        assert!(parse_delays("").is_err(), "no retries at all");
        assert!(parse_delays("0s").is_err());
        assert!(parse_delays("1s,99ms").is_err(), "a hot retry");
        assert!(at_least::<1000>("0s").is_err() && at_least::<1000>("1s").is_ok());
        assert!(parse_delays("soon").is_err());
        // The README documents this default.
        assert_eq!(Delays::default().0, [1, 5, 30, 120, 600].map(Duration::from_secs));
    }
}
