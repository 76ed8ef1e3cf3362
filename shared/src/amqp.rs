//! Connecting to RabbitMQ and publishing with confirms, the same way from
//! both services.

use crate::topology::Topology;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Mutex;

/// The default broker URL: the local RabbitMQ with its default account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// How long connecting (TCP, TLS, AMQP handshake, topology) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a publish did not get a positive confirm. Every variant means "not
/// known to be stored": the caller must not report success.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker unreachable: {0}")]
    Connect(String),
    #[error("broker connection failed during publish: {0}")]
    Channel(#[from] lapin::Error),
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for the message (returned as unroutable)")]
    Unroutable,
}

/// Reads a secret mounted as a file (a Kubernetes Secret), without the
/// trailing newline editors and `echo` add.
pub fn read_secret_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// The broker URL: from `file` if one is given, else `url`.
pub fn url_or_file(url: &str, file: Option<&std::path::Path>) -> std::io::Result<String> {
    match file {
        Some(path) => read_secret_file(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read the AMQP URL from {}: {e}", path.display()))
        }),
        None => Ok(url.to_owned()),
    }
}

/// Opens a connection named after the service, so that it can be told apart
/// in the management UI.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties).await
}

/// A confirm-mode channel that reconnects on demand: after a failure the next
/// publish opens a new connection (one caller at a time; the others wait for
/// it). Many publishes may be in flight on it at once.
#[derive(Debug)]
pub struct ConfirmChannel {
    url: String,
    name: String,
    topology: Topology,
    retry_delays: Vec<Duration>,
    current: RwLock<Option<(Arc<Connection>, Channel)>>,
    reconnecting: Mutex<()>,
}

impl ConfirmChannel {
    pub fn new(url: &str, name: &str, topology: Topology, retry_delays: Vec<Duration>) -> Self {
        Self {
            url: url.to_owned(),
            name: name.to_owned(),
            topology,
            retry_delays,
            current: RwLock::new(None),
            reconnecting: Mutex::new(()),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Whether a confirm channel is open right now (readiness).
    pub fn is_open(&self) -> bool {
        self.healthy().is_some()
    }

    /// Whether the broker has blocked this connection's publishes (a memory
    /// or disk alarm: `connection.blocked`): a publish would wait for the
    /// alarm to clear.
    pub fn is_blocked(&self) -> bool {
        self.healthy().is_some_and(|(connection, _)| connection.status().blocked())
    }

    fn healthy(&self) -> Option<(Arc<Connection>, Channel)> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|(c, ch)| c.status().connected() && ch.status().connected()).cloned()
    }

    /// The open channel, connecting (and declaring the topology) if needed.
    pub async fn channel(&self) -> Result<Channel, PublishError> {
        Ok(self.connected().await?.1)
    }

    async fn connected(&self) -> Result<(Arc<Connection>, Channel), PublishError> {
        if let Some(current) = self.healthy() {
            return Ok(current);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        if let Some(current) = self.healthy() {
            return Ok(current);
        }
        let (connection, channel) = tokio::time::timeout(CONNECT_TIMEOUT, self.open())
            .await
            .map_err(|_| PublishError::Connect(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| PublishError::Connect(e.to_string()))?;
        tracing::info!(url = %redact_url(&self.url), "connected to the broker");
        let fresh = (Arc::new(connection), channel);
        let old = self.current.write().unwrap_or_else(|p| p.into_inner()).replace(fresh.clone());
        if let Some((old, _)) = old {
            tokio::spawn(async move { drop(old.close(200, "replaced".into()).await) });
        }
        Ok(fresh)
    }

    async fn open(&self) -> lapin::Result<(Connection, Channel)> {
        let connection = connect(&self.url, &self.name).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        self.topology.declare(&connection, &channel, &self.retry_delays).await?;
        Ok((connection, channel))
    }

    /// Publishes a persistent message with `mandatory` and waits for the
    /// broker's confirm. Only `Ok` means the broker has it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (connection, channel) = self.connected().await?;
        let properties = properties.with_delivery_mode(2);
        let attempt = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    payload,
                    properties,
                )
                .await?
                .await?;
            if !confirm.is_ack() {
                return Err(PublishError::Nacked);
            }
            // A mandatory message that could not be routed is returned *and*
            // acked: the ack alone proves nothing.
            if confirm.take_message().is_some() {
                return Err(PublishError::Unroutable);
            }
            Ok(())
        };
        let result = match tokio::time::timeout(CONFIRM_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(PublishError::Timeout(CONFIRM_TIMEOUT)),
        };
        // Unroutable: a queue was deleted under us; a new connection
        // declares the topology again.
        if matches!(result, Err(PublishError::Channel(_) | PublishError::Timeout(_) | PublishError::Unroutable)) {
            self.forget(&connection);
        }
        result
    }

    /// Drops a channel that failed so that the next publish reconnects.
    fn forget(&self, failed: &Arc<Connection>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, failed))
            && let Some((connection, _)) = current.take()
        {
            tokio::spawn(async move { drop(connection.close(200, "reconnecting".into()).await) });
        }
    }

    /// Closes the connection (graceful shutdown).
    pub async fn close(&self) {
        let current = self.current.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((connection, _)) = current {
            drop(connection.close(200, "shutting down".into()).await);
        }
    }
}

/// Removes the password from an AMQP URL so that it can be logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(super::redact_url("amqp://host/%2f"), "amqp://host/%2f");
    }
}

/// Where a service finds its broker and its queues: the same three settings
/// (environment first, flag second) for the ingress, the relay and the
/// relay's `dead` subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (amqp:// or amqps://).
    #[arg(long, env = "HERALD_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true, hide_default_value = true)]
    pub amqp_url: String,
    /// File holding the RabbitMQ URL (e.g. a mounted Secret); overrides
    /// HERALD_AMQP_URL.
    #[arg(long, env = "HERALD_AMQP_URL_FILE")]
    pub amqp_url_file: Option<std::path::PathBuf>,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "HERALD_AMQP_PREFIX", default_value = "herald")]
    pub amqp_prefix: String,
}

impl BrokerArgs {
    /// The URL, read from `amqp_url_file` if one is given.
    pub fn url(&self) -> std::io::Result<String> {
        url_or_file(&self.amqp_url, self.amqp_url_file.as_deref())
    }

    pub fn topology(&self) -> crate::Topology {
        crate::Topology::new(self.amqp_prefix.clone())
    }
}
