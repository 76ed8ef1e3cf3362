//! The XMPP path's own limits: a direct client that logs in and sends the
//! way the relay does (tokio-xmpp's `StanzaStream` with XEP-0198, the
//! relay's own connector and stanza builder) to the receiver through the
//! same Prosody, measured at the receiver: as fast as it can (the ceiling),
//! and at a fixed rate (the latency floor), the latter also with
//! TCP_NODELAY on the client's socket, which tokio-xmpp does not set.

use crate::arrivals::Arrivals;
use crate::stats::Percentiles;
use futures::StreamExt;
use herald_relay::xmpp::login::{self, LoginState};
use herald_tests::{Prosody, XmppAccount};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::connect::{DnsConfig, ServerConnector};
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaStream, StanzaToken, StreamEvent};
use tokio_xmpp::xmlstream::{PendingFeaturesRecv, StreamHeader, Timeouts, initiate_stream};

/// Stanzas queued inside tokio-xmpp, as in the relay's session.
const QUEUE_DEPTH: usize = 1024;
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// Direct clients logging in at once in the many-senders ceiling.
const LOGINS_AT_ONCE: usize = 32;

/// How the direct client's TCP socket is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// The relay's own connector: tokio-xmpp's plaintext TCP, Nagle on.
    AsRelay,
    /// The same with TCP_NODELAY.
    NoDelay,
}

impl Socket {
    pub fn describe(self) -> &'static str {
        match self {
            Socket::AsRelay => "socket as the relay's (Nagle on)",
            Socket::NoDelay => "TCP_NODELAY on the client socket",
        }
    }
}

/// As fast as possible.
#[derive(Debug)]
pub struct Direct {
    pub sent: usize,
    pub received: usize,
    pub duplicates: usize,
    /// From the first send to the last message at the receiver.
    pub elapsed: Duration,
    /// The direct client's CPU time per stanza, from its first send to the
    /// server's last ack (the bench's, but its receiver thread's), seconds:
    /// what sending with XEP-0198 costs a client at least. The stanzas were
    /// built before.
    pub cpu_per_send: f64,
}

impl Direct {
    pub fn rate(&self) -> f64 {
        crate::stats::rate(self.received, self.elapsed)
    }
}

/// At a fixed rate.
#[derive(Debug)]
pub struct DirectPaced {
    pub socket: Socket,
    pub sent: usize,
    pub received: usize,
    /// Scheduled send instant → receipt.
    pub latency: Option<Percentiles>,
}

/// Who sends to whom, and how.
#[derive(Clone, Copy)]
pub struct Route<'a> {
    pub prosody: &'a Prosody,
    pub sender: &'a XmppAccount,
    pub to: &'a str,
    pub body_bytes: usize,
    pub idle: Duration,
}

pub async fn flat_out(route: &Route<'_>, arrivals: &mut Arrivals, n: usize) -> Direct {
    let mut stream = connect(route, Socket::AsRelay).await;
    let (messages, ids) = messages(route, n, "direct");
    arrivals.clear();
    let sender_cpu = SenderCpu::start();
    let started = Instant::now();
    let mut tokens = Vec::with_capacity(n);
    for message in messages {
        tokens.push(stream.send(Box::new(message.into())).await);
    }
    acks(&mut stream, tokens).await;
    let cpu_per_send = sender_cpu.per_message(n);
    let matched = arrivals.wait_for(&ids.into_iter().collect(), route.idle).await;
    close(stream).await;
    Direct {
        sent: n,
        received: matched.arrived.len(),
        duplicates: matched.duplicates,
        elapsed: matched.last().unwrap_or(started).duration_since(started),
        cpu_per_send,
    }
}

/// The bench's CPU time but its receiver's: the direct client's.
struct SenderCpu(f64);

impl SenderCpu {
    fn start() -> Self {
        Self(Self::now())
    }

    fn now() -> f64 {
        crate::machine::cpu_seconds(&[std::process::id()])
            - crate::machine::own_threads_cpu_seconds(crate::arrivals::RECEIVER_THREAD)
    }

    /// Seconds per message since the start.
    fn per_message(&self, n: usize) -> f64 {
        (Self::now() - self.0) / n.max(1) as f64
    }
}

pub async fn paced(
    route: &Route<'_>,
    arrivals: &mut Arrivals,
    rate: u32,
    duration: Duration,
    socket: Socket,
) -> DirectPaced {
    let mut stream = connect(route, socket).await;
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let period = Duration::from_secs(1) / rate.max(1);
    let (messages, ids) = messages(route, count, "direct paced");
    arrivals.clear();
    let first = Instant::now() + Duration::from_millis(50);
    let mut scheduled = HashMap::with_capacity(count);
    let mut tokens = Vec::with_capacity(count);
    for (i, (message, id)) in messages.into_iter().zip(ids).enumerate() {
        let at = first + period * i as u32;
        tokio::time::sleep_until(at.into()).await;
        tokens.push(stream.send(Box::new(message.into())).await);
        scheduled.insert(id, at);
    }
    acks(&mut stream, tokens).await;
    let matched = arrivals.wait_for(&scheduled.keys().cloned().collect::<HashSet<_>>(), route.idle).await;
    close(stream).await;
    let latencies = matched.arrived.iter().map(|(id, at)| at.duration_since(scheduled[id])).collect();
    DirectPaced { socket, sent: count, received: matched.arrived.len(), latency: Percentiles::of(latencies) }
}

/// A direct client logged in for each of `senders` (at most
/// [`LOGINS_AT_ONCE`] logins at a time, not timed), for the many-senders
/// ceilings below.
pub async fn log_in_all(route: &Route<'_>, senders: &[XmppAccount]) -> Vec<StanzaStream> {
    futures::stream::iter(senders)
        .map(|sender| async move { connect(&Route { sender, ..*route }, Socket::AsRelay).await })
        .buffered(LOGINS_AT_ONCE)
        .collect()
        .await
}

pub async fn close_all(streams: Vec<StanzaStream>) {
    futures::future::join_all(streams.into_iter().map(close)).await;
}

/// How the many-senders ceilings hand each client its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turns {
    /// Message `i` to client `i % senders` in one loop, as fast as the
    /// streams take them: each client's stream has all its messages queued
    /// before it writes, so it writes them together behind one ack request.
    Queued,
    /// Each client sends its next message once the server acked its last:
    /// every stanza travels alone with an ack request and answer of its
    /// own, as a relay's session does when it holds one job per sender.
    OneInFlight,
}

/// As fast as possible from many senders (`streams`, logged in for
/// `senders`), message `i` from sender `i % senders.len()`, each client
/// asking for its own acks as the relay's sessions do, handed over as
/// `turns` says: the ceilings that Herald's many-senders phase has on this
/// XMPP server.
pub async fn many_senders(
    route: &Route<'_>,
    senders: &[XmppAccount],
    streams: &mut [StanzaStream],
    turns: Turns,
    arrivals: &mut Arrivals,
    n: usize,
) -> Direct {
    let mut messages: Vec<Vec<Message>> = streams.iter().map(|_| Vec::new()).collect();
    let mut ids = HashSet::with_capacity(n);
    for i in 0..n {
        let (message, id) = message(&Route { sender: &senders[i % senders.len()], ..*route }, "many", i);
        messages[i % senders.len()].push(message);
        ids.insert(id);
    }
    arrivals.clear();
    let started = Instant::now();
    let sender_cpu = SenderCpu::start();
    match turns {
        Turns::Queued => {
            let mut tokens: Vec<Vec<StanzaToken>> = streams.iter().map(|_| Vec::new()).collect();
            let mut queues: Vec<_> = messages.into_iter().map(Vec::into_iter).collect();
            for i in 0..n {
                let client = i % streams.len();
                let message = queues[client].next().expect("a message for each turn");
                tokens[client].push(streams[client].send(Box::new(message.into())).await);
            }
            futures::future::join_all(streams.iter_mut().zip(tokens).map(|(stream, tokens)| acks(stream, tokens)))
                .await;
        }
        Turns::OneInFlight => {
            futures::future::join_all(streams.iter_mut().zip(messages).map(|(stream, messages)| async move {
                for message in messages {
                    let token = stream.send(Box::new(message.into())).await;
                    acks(stream, vec![token]).await;
                }
            }))
            .await;
        }
    }
    let cpu_per_send = sender_cpu.per_message(n);
    let matched = arrivals.wait_for(&ids, route.idle).await;
    Direct {
        sent: n,
        received: matched.arrived.len(),
        duplicates: matched.duplicates,
        elapsed: matched.last().unwrap_or(started).duration_since(started),
        cpu_per_send,
    }
}

/// `n` messages as the relay builds them, and their stanza ids.
fn messages(route: &Route<'_>, n: usize, tag: &str) -> (Vec<Message>, Vec<String>) {
    (0..n).map(|i| message(route, tag, i)).unzip()
}

/// Message `i` as the relay builds it, and its stanza id.
fn message(route: &Route<'_>, tag: &str, i: usize) -> (Message, String) {
    let job = crate::jobs::job(&route.sender.jid, route.to, crate::jobs::body(&format!("{tag} {i}"), route.body_bytes));
    let message = herald_relay::xmpp::stanza::message(&job);
    let id = message.id.as_ref().map(|id| id.0.clone()).unwrap_or_default();
    (message, id)
}

/// Logs in and waits for the bound stream.
async fn connect(route: &Route<'_>, socket: Socket) -> StanzaStream {
    let mut stream = match socket {
        Socket::AsRelay => {
            let entry = route.prosody.accounts_entry(route.sender);
            let account = herald_relay::xmpp::accounts::parse(&entry).expect("accounts entry parses").remove(0);
            let (state, _) = tokio::sync::watch::channel(LoginState::Connecting);
            StanzaStream::new(login::connector(&account, state, login::Connections::default()), QUEUE_DEPTH)
        }
        Socket::NoDelay => {
            let server = NoDelayConnector(DnsConfig::Addr { addr: format!("127.0.0.1:{}", route.prosody.port) });
            let jid: Jid = route.sender.jid.parse().expect("sender JID");
            StanzaStream::new_c2s(server, jid, route.sender.password.clone(), Timeouts::tight(), QUEUE_DEPTH)
        }
    };
    let online = async {
        while let Some(event) = stream.next().await {
            if let Event::Stream(StreamEvent::Reset { features, .. }) = event {
                assert!(features.stream_management.is_some(), "the bench's Prosody offers stream management");
                return;
            }
        }
        panic!("the direct client's stream ended before it was online");
    };
    tokio::time::timeout(ONLINE_TIMEOUT, online).await.expect("direct client online");
    stream
}

/// Waits until the server acked every stanza; when the last ack came.
async fn acks(stream: &mut StanzaStream, tokens: Vec<StanzaToken>) -> Instant {
    tokio::time::timeout(ACK_TIMEOUT, wait_for_acks(stream, tokens)).await.expect("Prosody acks every stanza")
}

/// Reads (and discards) what the stream delivers meanwhile, so that it
/// never stalls.
async fn wait_for_acks(stream: &mut StanzaStream, tokens: Vec<StanzaToken>) -> Instant {
    let acks = async move {
        for mut token in tokens {
            token.wait_for(StanzaStage::Acked).await;
        }
        Instant::now()
    };
    tokio::pin!(acks);
    loop {
        tokio::select! {
            at = &mut acks => return at,
            event = stream.next() => if event.is_none() { panic!("the direct client's stream ended while sending") },
        }
    }
}

async fn close(stream: StanzaStream) {
    drop(tokio::time::timeout(Duration::from_secs(5), stream.close()).await);
}

/// Plaintext TCP like tokio-xmpp's `TcpServerConnector`, with TCP_NODELAY.
#[derive(Debug, Clone)]
struct NoDelayConnector(DnsConfig);

impl ServerConnector for NoDelayConnector {
    type Stream = BufStream<TcpStream>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, sasl::common::ChannelBinding), tokio_xmpp::Error> {
        let tcp = self.0.resolve().await?;
        tcp.set_nodelay(true)?;
        let header = StreamHeader { to: Some(Cow::Borrowed(jid.domain().as_str())), from: None, id: None };
        Ok((initiate_stream(BufStream::new(tcp), ns, header, timeouts).await?, sasl::common::ChannelBinding::None))
    }
}
