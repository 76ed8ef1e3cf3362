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
    /// `server = "host:port"` and optional `tls = "required" | "none"`.
    #[arg(long, env = "HERALD_ACCOUNTS_FILE", required = true)]
    pub accounts_file: Option<PathBuf>,

    /// How many unacknowledged jobs the relay holds at once.
    #[arg(long, env = "HERALD_PREFETCH", default_value_t = 1024)]
    pub prefetch: u16,

    /// Delays between delivery attempts after a transient failure; after the
    /// last one the job is parked in `<prefix>.dead`.
    #[arg(long, env = "HERALD_RETRY_DELAYS", default_value = DEFAULT_RETRY_DELAYS, value_parser = parse_delays)]
    pub retry_delays: Delays,

    /// How long to wait for the XMPP server to acknowledge a stanza.
    #[arg(long, env = "HERALD_ACK_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,

    /// The XMPP server's stanza size limit (Prosody's
    /// `c2s_stanza_size_limit`, 256 KiB by default): a job whose message
    /// would be larger is parked, since sending it would only make the
    /// server close the stream, again on every retry.
    #[arg(long, env = "HERALD_MAX_STANZA_BYTES", default_value_t = 256 * 1024)]
    pub max_stanza_bytes: usize,

    /// How long a job waits for its sender's session to come online before
    /// it is retried later.
    #[arg(long, env = "HERALD_ONLINE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub online_timeout: Duration,

    /// On shutdown, how long to wait for the acks of jobs already sent.
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How long this relay remembers the ids of idempotent jobs it delivered
    /// (jobs posted with an Idempotency-Key), and sends none of them twice.
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,
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

fn parse_delays(text: &str) -> Result<Delays, String> {
    let delays = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if delays.iter().any(Duration::is_zero) {
        return Err("a retry delay must be longer than zero".into());
    }
    Ok(Delays(delays))
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
        assert_eq!(parse_delays("").expect("ok").0, Vec::<Duration>::new());
        assert!(parse_delays("0s").is_err());
        assert!(parse_delays("soon").is_err());
        // The README documents this default.
        assert_eq!(Delays::default().0, [1, 5, 30, 120, 600].map(Duration::from_secs));
    }
}
