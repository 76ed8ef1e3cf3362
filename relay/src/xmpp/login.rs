//! Connecting and logging in, for tokio-xmpp's `StanzaStream`.
//!
//! tokio-xmpp's own `StanzaStream::new_c2s` retries a rejected password
//! forever and only says so in its own error-level log lines. This connector
//! does the same steps (connect, TLS, SASL, stream restart) but reports
//! every outcome as a [`LoginState`], so the session can tell "wrong
//! password" from "server unreachable", say so once in one clear log line,
//! and report the relay not ready.

use super::accounts::{Account, Tls};
use super::connect;
use sasl::common::ChannelBinding;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_xmpp::connect::{DnsConfig, ServerConnector};
use tokio_xmpp::error::{AuthError, Error as XmppError};
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::sasl::DefinedCondition;
use tokio_xmpp::parsers::sasl_cb;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::stanzastream::Connection;
use tokio_xmpp::xmlstream::{StreamHeader, Timeouts};

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A stream that lost a connection it had for at least `ESTABLISHED` waits
/// this long before it connects again, plus up to as long again at random.
/// A server that is being stopped closes every stream (`system-shutdown`)
/// and may still take new logins for a moment: ejabberd 23.01 did for a
/// second, and acknowledged stanzas on them that it then dropped. The
/// random part spreads the logins of many sessions to a server that comes
/// back. A connection lost sooner (a server that refused to resume the
/// stream, see `Session::on_lost`) is made again at once.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// A connection that lasted this long was in use; one that a server closed
/// sooner was refused (a resumption it could not grant ends within tens of
/// milliseconds of the login).
const ESTABLISHED: Duration = Duration::from_millis(250);

/// Where the latest login attempt got to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginState {
    Connecting,
    LoggedIn,
    /// The server refused the credentials (SASL failure): needs an operator.
    Rejected(String),
    /// Could not reach or talk to the server; retried with backoff.
    Unreachable(String),
}

impl LoginState {
    fn from_error(error: &XmppError) -> Self {
        match error {
            // The server's own trouble (RFC 6120, 6.5.13): try again later.
            XmppError::Auth(AuthError::Fail(condition @ DefinedCondition::TemporaryAuthFailure)) => {
                Self::Unreachable(format!("the server could not check the login now: {condition:?}"))
            }
            XmppError::Auth(AuthError::Fail(condition)) => {
                Self::Rejected(format!("the server refused the login: {condition:?}"))
            }
            XmppError::Auth(e) => Self::Rejected(e.to_string()),
            e => Self::Unreachable(e.to_string()),
        }
    }
}

pub type Connector = Box<dyn FnMut(Option<String>, oneshot::Sender<Connection>) + Send + 'static>;

/// How many connections a session's connectors have handed to its streams,
/// the first and every reconnection, counted just before each is handed
/// over: before the stream reads anything on it, so before anything a
/// server says on it (an `<sm:resumed/>` or `<sm:failed/>` with the count
/// of stanzas it handled) can mark a stanza acknowledged. An ack read on
/// the old connection just before it broke still finds the old count.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<AtomicU64>);

impl Connections {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn connected(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A connector for `StanzaStream::new` that logs in as `account`,
/// publishes each attempt's outcome on `state` and counts each connection
/// it hands over on `connections`.
pub fn connector(account: &Account, state: watch::Sender<LoginState>, connections: Connections) -> Connector {
    let dns = match &account.server {
        Some(server) => DnsConfig::NoSrv { host: server.host.clone(), port: server.port, resolver: None },
        None => DnsConfig::srv_default_client(account.jid.domain().as_str()),
    };
    match account.tls {
        Tls::Required => with(connect::StartTls(dns), account, state, connections),
        Tls::Direct => {
            let dns = match &account.server {
                Some(_) => dns,
                None => DnsConfig::srv_xmpps(account.jid.domain().as_str()),
            };
            with(connect::DirectTls(dns), account, state, connections)
        }
        // accounts::parse allows this only for loopback servers.
        Tls::None => with(connect::Tcp(dns), account, state, connections),
    }
}

fn with<C: ServerConnector>(
    server: C,
    account: &Account,
    state: watch::Sender<LoginState>,
    connections: Connections,
) -> Connector {
    let jid: Jid = account.jid.jid().clone().into();
    let password = account.password.clone();
    // When this stream last got a connection.
    let connected: Arc<Mutex<Option<Instant>>> = Arc::default();
    Box::new(move |_preferred_location, mut slot| {
        let last = *connected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = match last {
            Some(at) if at.elapsed() >= ESTABLISHED => reconnect_delay(),
            _ => Duration::ZERO,
        };
        let (server, jid, password, state) = (server.clone(), jid.clone(), password.clone(), state.clone());
        let (connected, connections) = (Arc::clone(&connected), connections.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = slot.closed() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let mut delay = FIRST_RETRY;
            loop {
                state.send_replace(LoginState::Connecting);
                match login(server.clone(), jid.clone(), password.clone()).await {
                    Ok(connection) => {
                        state.send_replace(LoginState::LoggedIn);
                        *connected.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
                        connections.connected();
                        if let Err(mut unused) = slot.send(connection) {
                            // The stanza stream is gone; close politely.
                            let close = <_ as futures::SinkExt<&tokio_xmpp::Stanza>>::close(&mut unused.stream);
                            drop(tokio::time::timeout(Duration::from_secs(5), close).await);
                        }
                        return;
                    }
                    Err(e) => {
                        state.send_replace(LoginState::from_error(&e));
                        tokio::select! {
                            () = slot.closed() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(MAX_RETRY);
                    }
                }
            }
        });
    })
}

/// `RECONNECT_DELAY` and up to as long again.
fn reconnect_delay() -> Duration {
    RECONNECT_DELAY.mul_f64(1.0 + rand::random::<f64>())
}

/// Connect, secure, authenticate and restart the stream: what tokio-xmpp's
/// `client_auth` does, which is not public.
async fn login<C: ServerConnector>(server: C, jid: Jid, password: String) -> Result<Connection, XmppError> {
    let username = jid.node().map(|n| n.as_str().to_owned()).unwrap_or_default();
    let (stream, channel_binding) = server.connect(&jid, ns::JABBER_CLIENT, Timeouts::tight()).await?;
    let (features, stream) = stream.recv_features().await?;
    let channel_binding = binding_for(&features, channel_binding);
    let credentials = sasl::common::Credentials::default()
        .with_username(username)
        .with_password(password)
        .with_channel_binding(channel_binding);
    let stream = tokio_xmpp::client_login(stream, features.sasl_mechanisms, credentials).await?;
    let stream = stream
        .send_header(StreamHeader { to: Some(Cow::Borrowed(jid.domain().as_str())), from: None, id: None })
        .await?;
    let (features, stream) = stream.recv_features().await?;
    Ok(Connection { stream: stream.box_stream(), features, identity: jid })
}

/// The channel binding to log in with, given what the server offers.
///
/// With the TLS 1.3 `tls-exporter` data in hand, SCRAM binds to the TLS
/// connection (a `-PLUS` mechanism) only where the server says it supports
/// that type (XEP-0440). A server that offers `-PLUS` without saying which
/// type gets unbound SCRAM: ejabberd before 24.02 (Debian 12 ships 23.01)
/// offers it over TLS 1.3 but binds to `tls-unique`, which TLS 1.3 does not
/// have, and refuses every `tls-exporter` login as not authorized. A server
/// that offers no `-PLUS` is told the client could have bound (`y`), so
/// that a `-PLUS` offer stripped on the way shows. Without a binding to
/// offer (no TLS), nothing changes. Either way the server's certificate was
/// verified before this.
fn binding_for(features: &StreamFeatures, binding: ChannelBinding) -> ChannelBinding {
    let ChannelBinding::TlsExporter(_) = binding else { return binding };
    let declared = features.sasl_cb.as_ref().is_some_and(|cb| cb.types.contains(&sasl_cb::Type::TlsExporter));
    if declared {
        binding
    } else if features.sasl_mechanisms.iter().any(|m| m.ends_with("-PLUS")) {
        ChannelBinding::None
    } else {
        ChannelBinding::Unsupported
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_reconnection_waits_two_to_four_seconds() {
        for _ in 0..1000 {
            let wait = reconnect_delay();
            assert!((RECONNECT_DELAY..RECONNECT_DELAY * 2).contains(&wait), "{wait:?}");
        }
    }

    fn offering(mechanisms: &[&str], cb: Option<Vec<sasl_cb::Type>>) -> StreamFeatures {
        StreamFeatures {
            sasl_mechanisms: mechanisms.iter().map(|m| (*m).to_owned()).collect::<BTreeSet<_>>(),
            sasl_cb: cb.map(|types| sasl_cb::SaslChannelBinding { types }),
            ..StreamFeatures::default()
        }
    }

    #[test]
    fn scram_binds_to_tls_only_where_the_server_declares_tls_exporter() {
        let exporter = || ChannelBinding::TlsExporter(vec![7; 32]);
        // ejabberd 23.01 over TLS 1.3: -PLUS offered, no XEP-0440.
        let ejabberd = offering(&["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], None);
        assert_eq!(binding_for(&ejabberd, exporter()), ChannelBinding::None);
        // A -PLUS offer for tls-unique only.
        let unique = offering(&["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], Some(vec![sasl_cb::Type::TlsUnique]));
        assert_eq!(binding_for(&unique, exporter()), ChannelBinding::None);
        // Prosody 0.12 over TLS 1.3: no -PLUS at all.
        let prosody = offering(&["PLAIN", "SCRAM-SHA-1"], None);
        assert_eq!(binding_for(&prosody, exporter()), ChannelBinding::Unsupported);
        // A server that declares tls-exporter.
        let declared = offering(
            &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"],
            Some(vec![sasl_cb::Type::TlsUnique, sasl_cb::Type::TlsExporter]),
        );
        assert_eq!(binding_for(&declared, exporter()), exporter());
        // No TLS: nothing to bind to, whatever is offered.
        assert_eq!(binding_for(&ejabberd, ChannelBinding::None), ChannelBinding::None);
    }

    #[test]
    fn only_a_refusal_of_the_credentials_is_a_rejected_login() {
        let refused = XmppError::Auth(AuthError::Fail(DefinedCondition::NotAuthorized));
        assert!(matches!(LoginState::from_error(&refused), LoginState::Rejected(_)));
        let busy = XmppError::Auth(AuthError::Fail(DefinedCondition::TemporaryAuthFailure));
        assert!(
            matches!(LoginState::from_error(&busy), LoginState::Unreachable(_)),
            "the server's trouble, retried quietly"
        );
    }
}
