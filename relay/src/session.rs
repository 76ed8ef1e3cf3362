//! One XMPP client session per sender account, owned by one task (the actor
//! pattern): jobs arrive over a bounded channel, each with a oneshot for its
//! outcome.
//!
//! The session uses tokio-xmpp's `StanzaStream` directly: it reconnects on
//! its own, resumes with XEP-0198 where it can, and reports each stanza's
//! progress through a token. A job succeeds only when its stanza reached the
//! `Acked` stage (the server's `<a h=…/>` covered it). Where the server
//! offers no stream management, an iq ping sent right after the stanza and
//! answered proves the server read it, because a stream is ordered.

use crate::accounts::{Account, Tls};
use crate::error::DeliveryError;
use futures::StreamExt;
use herald_shared::Sender;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::connect::{DnsConfig, ServerConnector, StartTlsServerConnector, TcpServerConnector};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StanzaToken, StreamEvent};
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::Stanza;

/// Stanzas queued inside tokio-xmpp per session, each way.
const STREAM_QUEUE_DEPTH: usize = 1024;
/// Jobs waiting for the session task.
const JOB_QUEUE_DEPTH: usize = 1024;
/// How long enqueueing one stanza may block (a full transmit queue).
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing a stream cleanly may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

struct Outgoing {
    message: Message,
    reply: oneshot::Sender<Result<(), DeliveryError>>,
}

/// The consumer's side of a session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    jid: Sender,
    jobs: mpsc::Sender<Outgoing>,
    online: watch::Receiver<bool>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").field("id", &self.message.id).finish()
    }
}

impl SessionHandle {
    pub fn jid(&self) -> &Sender {
        &self.jid
    }

    pub fn is_online(&self) -> bool {
        *self.online.borrow()
    }

    /// Sends a message and resolves once the server acknowledged it.
    /// Waits up to `online_timeout` for the session to be online first.
    pub async fn deliver(&self, message: Message, online_timeout: Duration) -> Result<(), DeliveryError> {
        let mut online = self.online.clone();
        if !matches!(tokio::time::timeout(online_timeout, online.wait_for(|o| *o)).await, Ok(Ok(_))) {
            return Err(DeliveryError::Transient(format!("XMPP session of {} is not online", self.jid)));
        }
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(Outgoing { message, reply })
            .await
            .map_err(|_| DeliveryError::Transient(format!("XMPP session of {} is closed", self.jid)))?;
        outcome
            .await
            .unwrap_or_else(|_| Err(DeliveryError::Transient(format!("XMPP session of {} dropped the job", self.jid))))
    }
}

/// Starts the session task for `account`. It runs until `shutdown` is
/// cancelled, then closes the stream cleanly.
pub fn spawn(account: Account, ack_timeout: Duration, shutdown: CancellationToken) -> (SessionHandle, JoinHandle<()>) {
    let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE_DEPTH);
    let (online_tx, online_rx) = watch::channel(false);
    let handle = SessionHandle { jid: account.jid.clone(), jobs: jobs_tx, online: online_rx };
    let session = Session {
        stream: open_stream(&account),
        account,
        ack_timeout,
        online: online_tx,
        stream_management: false,
        pings: HashMap::new(),
    };
    let task = tokio::spawn(session.run(jobs_rx, shutdown));
    (handle, task)
}

fn open_stream(account: &Account) -> StanzaStream {
    let dns = match &account.server {
        Some(server) => DnsConfig::NoSrv { host: server.host.clone(), port: server.port, resolver: None },
        None => DnsConfig::srv_default_client(account.jid.domain().as_str()),
    };
    match account.tls {
        Tls::Required => stream_with(StartTlsServerConnector::from(dns), account),
        // accounts::parse allows this only for loopback servers.
        Tls::None => stream_with(TcpServerConnector::from(dns), account),
    }
}

fn stream_with<C: ServerConnector>(connector: C, account: &Account) -> StanzaStream {
    let jid: Jid = account.jid.jid().clone().into();
    StanzaStream::new_c2s(connector, jid, account.password.clone(), Timeouts::tight(), STREAM_QUEUE_DEPTH)
}

struct Session {
    account: Account,
    stream: StanzaStream,
    ack_timeout: Duration,
    online: watch::Sender<bool>,
    /// Whether the current stream negotiated XEP-0198.
    stream_management: bool,
    /// Without stream management: pings in flight, by iq id.
    pings: HashMap<String, oneshot::Sender<()>>,
}

impl Session {
    async fn run(mut self, mut jobs: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        tracing::info!(account = %self.account.jid, "XMPP session starting");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.stream.next() => match event {
                    Some(event) => self.on_event(event).await,
                    None => {
                        tracing::warn!(account = %self.account.jid, "XMPP stream ended");
                        break;
                    }
                },
                Some(job) = jobs.recv() => self.send(job).await,
            }
        }
        self.online.send_replace(false);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.stream.close()).await.is_err() {
            tracing::warn!(account = %self.account.jid, "XMPP stream did not close in time");
        }
        tracing::info!(account = %self.account.jid, "XMPP session closed");
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Stream(StreamEvent::Reset { bound_jid, features }) => {
                self.stream_management = features.stream_management.is_some();
                // Pings sent on the old stream will never be answered.
                self.pings.clear();
                tracing::info!(account = %self.account.jid, %bound_jid, stream_management = self.stream_management, "XMPP session online");
                self.online.send_replace(true);
            }
            Event::Stream(StreamEvent::Resumed) => {
                tracing::info!(account = %self.account.jid, "XMPP session resumed");
                self.online.send_replace(true);
            }
            Event::Stream(StreamEvent::Suspended) => {
                tracing::warn!(account = %self.account.jid, "XMPP connection lost; reconnecting");
                self.online.send_replace(false);
            }
            Event::Stanza(stanza) => self.on_stanza(stanza).await,
        }
    }

    async fn on_stanza(&mut self, stanza: Stanza) {
        match stanza {
            Stanza::Iq(iq) => match iq {
                Iq::Result { id, .. } | Iq::Error { id, .. } => {
                    if let Some(waiter) = self.pings.remove(&id) {
                        let _ = waiter.send(());
                    }
                }
                Iq::Get { id, from, .. } | Iq::Set { id, from, .. } => {
                    // Not a client that answers requests: say so, politely.
                    let error = StanzaError::new(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, "en", "");
                    let mut reply = Iq::from_error(id, error);
                    if let Some(from) = from {
                        reply = reply.with_to(from);
                    }
                    drop(self.stream.send(Box::new(reply.into())).await);
                }
            },
            Stanza::Message(message) if message.type_ == MessageType::Error => {
                let condition = message
                    .payloads
                    .iter()
                    .find_map(|p| StanzaError::try_from(p.clone()).ok())
                    .map(|e| format!("{:?}", e.defined_condition))
                    .unwrap_or_else(|| "unknown".into());
                tracing::warn!(
                    account = %self.account.jid,
                    id = message.id.as_ref().map(|i| i.0.as_str()).unwrap_or(""),
                    from = ?message.from,
                    %condition,
                    "the XMPP server bounced a message after accepting it"
                );
            }
            _ => {}
        }
    }

    async fn send(&mut self, job: Outgoing) {
        let Outgoing { message, reply } = job;
        let enqueue = self.stream.send(Box::new(message.into()));
        let Ok(token) = tokio::time::timeout(ENQUEUE_TIMEOUT, enqueue).await else {
            let _ = reply.send(Err(DeliveryError::Transient("XMPP transmit queue is full".into())));
            return;
        };
        let ping = if self.stream_management { None } else { Some(self.send_ping().await) };
        let ack_timeout = self.ack_timeout;
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(ack_timeout, confirmed(token, ping))
                .await
                .unwrap_or_else(|_| Err(DeliveryError::Transient(format!("no acknowledgement within {ack_timeout:?}"))));
            let _ = reply.send(outcome);
        });
    }

    async fn send_ping(&mut self) -> oneshot::Receiver<()> {
        let id = format!("herald-ping-{}", uuid::Uuid::new_v4());
        let (tx, rx) = oneshot::channel();
        self.pings.insert(id.clone(), tx);
        let ping = Iq::from_get(id, Ping).with_to(Jid::from(self.account.jid.jid().domain().to_owned()));
        drop(self.stream.send(Box::new(ping.into())).await);
        rx
    }
}

/// Resolves once the server has provably received the stanza: its XEP-0198
/// ack, or (without stream management) the answer to the ping sent after it.
async fn confirmed(mut token: StanzaToken, ping: Option<oneshot::Receiver<()>>) -> Result<(), DeliveryError> {
    let stage = if ping.is_some() { StanzaStage::Sent } else { StanzaStage::Acked };
    match token.wait_for(stage).await {
        Some(StanzaState::Acked { .. }) => return Ok(()),
        Some(StanzaState::Sent { .. }) if ping.is_some() => {}
        Some(StanzaState::Failed { error }) => return Err(DeliveryError::Transient(format!("XMPP send failed: {error}"))),
        _ => return Err(DeliveryError::Transient("XMPP stream was reset before the server acknowledged the message".into())),
    }
    match ping {
        Some(answer) => answer
            .await
            .map_err(|_| DeliveryError::Transient("XMPP stream was reset before the ping was answered".into())),
        None => Ok(()),
    }
}
