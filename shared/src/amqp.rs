//! Connecting to RabbitMQ and publishing with confirms, the same way from
//! both services.

use crate::topology::Topology;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The largest AMQP frame Herald asks for, unless the URL sets `frame_max`.
/// lapin keeps a receive and a send buffer of 32 frames for each connection,
/// each frame as large as negotiated: at RabbitMQ's default (128 KiB) that
/// is 8 MiB of resident memory per connection, the largest part of a
/// relay's. Jobs are a few hundred bytes; a larger one goes in several
/// frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection named after the service, so that it can be told apart
/// in the management UI, with `FRAME_MAX` unless the URL sets its own.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(uri, properties).await
        }
        // lapin says what is wrong with it.
        Err(_) => Connection::connect(url, properties).await,
    }
}

/// Where the broker is: one URL, or the nodes of a cluster, tried in turn.
///
/// `HERALD_AMQP_URL` is a comma-separated list. The first entry is a whole
/// URL; a later entry is a whole URL too, or just `host:port`, which takes
/// the first URL's scheme, credentials, vhost and options
/// (`amqp://herald:pw@rabbit-0:5672/%2f,rabbit-1:5672,rabbit-2:5672`).
/// Each connection starts with the node after the one the last connection
/// used, and goes on to the next while one does not answer: a lost node
/// costs one reconnect, not an outage.
#[derive(Clone)]
pub struct BrokerUrls {
    urls: Arc<[String]>,
    /// The entry the next connection tries first.
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl BrokerUrls {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = text.split(',').map(str::trim).filter(|e| !e.is_empty());
        let first = entries.next().ok_or("the AMQP URL is empty")?.to_owned();
        let mut urls = vec![first.clone()];
        for entry in entries {
            urls.push(if entry.contains("://") { entry.to_owned() } else { with_authority(&first, entry)? });
        }
        for url in &urls {
            url.parse::<lapin::uri::AMQPUri>().map_err(|e| format!("{}: {e}", redact_url(url)))?;
        }
        Ok(Self { urls: urls.into(), next: Arc::default() })
    }

    /// The URLs, passwords hidden, for logs and errors.
    pub fn redacted(&self) -> String {
        self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(",")
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Connects to the first entry that answers within `CONNECT_TIMEOUT`,
    /// starting after the one the previous connection used.
    pub async fn connect(&self, name: &str) -> Result<Connection, String> {
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.urls.len() {
            let index = (start + i) % self.urls.len();
            let url = &self.urls[index];
            match tokio::time::timeout(CONNECT_TIMEOUT, connect(url, name)).await {
                Ok(Ok(connection)) => {
                    self.next.store(index + 1, Ordering::Relaxed);
                    return Ok(connection);
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", redact_url(url))),
                Err(_) => errors.push(format!("{}: no answer within {CONNECT_TIMEOUT:?}", redact_url(url))),
            }
        }
        Err(errors.join("; "))
    }
}

/// `base` with its host and port replaced by `authority`.
fn with_authority(base: &str, authority: &str) -> Result<String, String> {
    let (scheme, rest) = base.split_once("://").ok_or_else(|| format!("{} has no scheme", redact_url(base)))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (old, tail) = rest.split_at(end);
    let userinfo = old.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    Ok(format!("{scheme}://{userinfo}{authority}{tail}"))
}

/// A confirm-mode channel that reconnects on demand: after a failure the next
/// publish opens a new connection (one caller at a time; the others wait for
/// it). Many publishes may be in flight on it at once.
#[derive(Debug)]
pub struct ConfirmChannel {
    urls: BrokerUrls,
    name: String,
    topology: Topology,
    retry_delays: Vec<Duration>,
    current: RwLock<Option<(Arc<Connection>, Channel)>>,
    reconnecting: Mutex<()>,
}

impl ConfirmChannel {
    pub fn new(urls: BrokerUrls, name: &str, topology: Topology, retry_delays: Vec<Duration>) -> Self {
        Self {
            urls,
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

    /// Why a publish cannot go out now, if it cannot: no open confirm
    /// channel, or the broker blocks this connection's publishes (a memory
    /// or disk alarm, `connection.blocked`: a publish would wait for the
    /// alarm to clear). One look at the channel, for every request.
    pub fn unavailable(&self) -> Option<&'static str> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        match current.as_ref().filter(|(c, ch)| c.status().connected() && ch.status().connected()) {
            None => Some("no confirm channel to the broker"),
            Some((connection, _)) if connection.status().blocked() => {
                Some("the broker blocks publishing (a memory or disk alarm)")
            }
            Some(_) => None,
        }
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
        let (connection, channel) = self.open().await.map_err(PublishError::Connect)?;
        tracing::info!(name = %self.name, urls = %self.urls.redacted(), "connected to the broker");
        let fresh = (Arc::new(connection), channel);
        let old = self.current.write().unwrap_or_else(|p| p.into_inner()).replace(fresh.clone());
        if let Some((old, _)) = old {
            tokio::spawn(async move { drop(old.close(200, "replaced".into()).await) });
        }
        Ok(fresh)
    }

    async fn open(&self) -> Result<(Connection, Channel), String> {
        let connection = self.urls.connect(&self.name).await?;
        let setup = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            self.topology.declare(&connection, &channel, &self.retry_delays).await?;
            Ok::<_, lapin::Error>(channel)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(channel)) => Ok((connection, channel)),
            failed => {
                drop(connection.close(200, "setup failed".into()).await);
                Err(match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CONNECT_TIMEOUT:?} while declaring the topology"),
                })
            }
        }
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
        // declares the topology again. Nacked: the work queue has no length
        // limit, so a nack means the queue was unavailable, and on RabbitMQ
        // 3.10 a channel that published to a quorum queue whose leader's
        // node died went on being nacked for as long as it lived (seen on a
        // three-node cluster here) while a new channel was served at once.
        if result.is_err() {
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
            tracing::warn!(name = %self.name, "lost the broker connection; reconnecting");
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
    use super::BrokerUrls;

    #[test]
    fn a_list_of_urls_shares_the_first_ones_credentials_and_vhost() {
        let urls = BrokerUrls::parse("amqp://u:p@a:5672/v?heartbeat=5, b:5673 ,amqps://x:y@c/%2f").expect("valid");
        assert_eq!(
            &*urls.urls,
            ["amqp://u:p@a:5672/v?heartbeat=5", "amqp://u:p@b:5673/v?heartbeat=5", "amqps://x:y@c/%2f"]
        );
        assert_eq!(
            urls.redacted(),
            "amqp://u:***@a:5672/v?heartbeat=5,amqp://u:***@b:5673/v?heartbeat=5,amqps://x:***@c/%2f"
        );
        assert!(!format!("{urls:?}").contains(":p@"), "Debug hides passwords");
        assert_eq!(BrokerUrls::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid").len(), 1);
        assert!(BrokerUrls::parse("").is_err());
        assert!(BrokerUrls::parse("http://a/").is_err());
        assert!(BrokerUrls::parse("amqp://a:notaport/").is_err());
    }

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
    /// RabbitMQ URL (amqp:// or amqps://), or a comma-separated list of a
    /// cluster's nodes: whole URLs, or `host:port` entries that take the
    /// first URL's credentials and vhost. Default: the local broker
    /// (127.0.0.1:5672, vhost /, RabbitMQ's default user).
    #[arg(long, env = "HERALD_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true, hide_default_value = true)]
    pub amqp_url: String,
    /// File holding the RabbitMQ URL or list (e.g. a mounted Secret);
    /// overrides HERALD_AMQP_URL.
    #[arg(long, env = "HERALD_AMQP_URL_FILE")]
    pub amqp_url_file: Option<std::path::PathBuf>,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "HERALD_AMQP_PREFIX", default_value = "herald")]
    pub amqp_prefix: String,
}

impl BrokerArgs {
    /// The URLs, read from `amqp_url_file` if one is given, and checked.
    pub fn urls(&self) -> std::io::Result<BrokerUrls> {
        let text = url_or_file(&self.amqp_url, self.amqp_url_file.as_deref())?;
        BrokerUrls::parse(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }

    pub fn topology(&self) -> crate::Topology {
        crate::Topology::new(self.amqp_prefix.clone())
    }
}
