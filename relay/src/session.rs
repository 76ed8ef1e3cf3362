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
//!
//! A `groupchat` message goes to a room the session has joined (XEP-0045,
//! as the account's nick, no history): the first one for a room joins it and
//! waits for the room's self-presence; a room that refuses the join fails
//! the waiting jobs with its error condition. Rooms are joined again after
//! every new stream (a resumed stream keeps them).

use crate::accounts::Account;
use crate::error::DeliveryError;
use crate::login::{self, LoginState};
use crate::metrics::Metrics;
use crate::stanza;
use futures::StreamExt;
use herald_shared::Sender;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::muc::Muc;
use tokio_xmpp::parsers::muc::muc::History;
use tokio_xmpp::parsers::muc::user::{MucUser, Status};
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StanzaToken, StreamEvent};

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
    /// Answered once the stanza is on its way (or could not be): the job's
    /// own task then waits for the server's acknowledgement, so the session
    /// spawns nothing per message.
    reply: oneshot::Sender<Result<InFlight, DeliveryError>>,
}

/// A stanza handed to the stream: its progress token and, without stream
/// management, the ping that proves the server read it.
struct InFlight {
    token: StanzaToken,
    ping: Option<oneshot::Receiver<()>>,
}

/// A group chat room this session sends to.
enum Room {
    /// Join presence sent; these jobs wait for the room's answer.
    Joining(Vec<Outgoing>),
    Joined,
}

/// An error stanza the server sent back for a message it had already
/// acknowledged: the recipient's server or the recipient refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// The stanza id, which is the job id.
    pub id: String,
    /// The error's defined condition, e.g. `service-unavailable`.
    pub condition: String,
    /// The error type: `cancel`, `wait`, `modify`, `auth` or `continue`.
    pub kind: String,
    pub from: String,
}

impl Bounce {
    /// `wait` means "try again later"; everything else will not change by
    /// itself.
    pub fn is_transient(&self) -> bool {
        self.kind == "wait"
    }
}

/// The consumer's side of a session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    jid: Sender,
    /// Bounds each stage of a job's stay in the session: until its stanza
    /// goes out (after a room join, if any), then until the server acks it.
    ack_timeout: Duration,
    jobs: mpsc::Sender<Outgoing>,
    online: watch::Receiver<bool>,
    login: watch::Receiver<LoginState>,
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

    /// Why the session is not online, if it is not.
    pub fn offline_reason(&self) -> Option<String> {
        if self.is_online() {
            return None;
        }
        Some(match &*self.login.borrow() {
            LoginState::Connecting => "connecting".to_owned(),
            LoginState::LoggedIn => "binding a resource".to_owned(),
            LoginState::Rejected(why) => format!("login rejected: {why}"),
            LoginState::Unreachable(why) => format!("server unreachable: {why}"),
        })
    }

    /// Sends a message and resolves once the server acknowledged it.
    /// Waits up to `online_timeout` for the session to be online first,
    /// unless the server has refused the login, which will not change by
    /// waiting.
    pub async fn deliver(&self, message: Message, online_timeout: Duration) -> Result<(), DeliveryError> {
        let offline = || {
            DeliveryError::SenderOffline(format!(
                "XMPP session of {} is {}",
                self.jid,
                self.offline_reason().unwrap_or_else(|| "closed".into())
            ))
        };
        if matches!(*self.login.borrow(), LoginState::Rejected(_)) && !self.is_online() {
            return Err(offline());
        }
        let mut online = self.online.clone();
        if !matches!(tokio::time::timeout(online_timeout, online.wait_for(|o| *o)).await, Ok(Ok(_))) {
            return Err(offline());
        }
        let (reply, sent) = oneshot::channel();
        self.jobs.send(Outgoing { message, reply }).await.map_err(|_| offline())?;
        // Both stages are bounded: a job may wait for a room join before it
        // goes out, then for the server's acknowledgement.
        let in_flight = match tokio::time::timeout(self.ack_timeout, sent).await {
            Ok(Ok(sent)) => sent?,
            Ok(Err(_)) => {
                return Err(DeliveryError::Transient(format!("XMPP session of {} dropped the job", self.jid)));
            }
            Err(_) => {
                return Err(DeliveryError::Transient(format!(
                    "not sent within {:?} (waiting for the session or a room join)",
                    self.ack_timeout
                )));
            }
        };
        tokio::time::timeout(self.ack_timeout, confirmed(in_flight)).await.unwrap_or_else(|_| {
            Err(DeliveryError::Transient(format!("no acknowledgement within {:?}", self.ack_timeout)))
        })
    }
}

/// Starts the session task for `account`. It runs until `shutdown` is
/// cancelled, then closes the stream cleanly. Error stanzas bounced for
/// messages the server had acknowledged are reported on `bounces`.
pub fn spawn(
    account: Account,
    ack_timeout: Duration,
    bounces: mpsc::UnboundedSender<Bounce>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (SessionHandle, JoinHandle<()>) {
    let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE_DEPTH);
    let (online_tx, online_rx) = watch::channel(false);
    let (login_tx, login_rx) = watch::channel(LoginState::Connecting);
    let handle = SessionHandle {
        jid: account.jid.clone(),
        ack_timeout,
        jobs: jobs_tx,
        online: online_rx,
        login: login_rx.clone(),
    };
    let session = Session {
        stream: StanzaStream::new(login::connector(&account, login_tx.clone()), STREAM_QUEUE_DEPTH),
        login_tx,
        lost_in_a_row: 0,
        account,
        online: online_tx,
        login: login_rx,
        reported_login: None,
        bounces,
        metrics,
        stream_management: false,
        pings: HashMap::new(),
        rooms: HashMap::new(),
    };
    let task = tokio::spawn(session.run(jobs_rx, shutdown));
    (handle, task)
}

struct Session {
    account: Account,
    stream: StanzaStream,
    online: watch::Sender<bool>,
    login: watch::Receiver<LoginState>,
    /// The last login problem logged, so that retries do not repeat it.
    reported_login: Option<LoginState>,
    bounces: mpsc::UnboundedSender<Bounce>,
    metrics: Arc<Metrics>,
    /// Whether the current stream negotiated XEP-0198.
    stream_management: bool,
    /// Without stream management: pings in flight, by iq id.
    pings: HashMap<String, oneshot::Sender<()>>,
    rooms: HashMap<BareJid, Room>,
    /// For a fresh stream (see `on_lost`).
    login_tx: watch::Sender<LoginState>,
    /// Connections lost since the last one that got a session going.
    lost_in_a_row: u32,
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
                Ok(()) = self.login.changed() => self.on_login(),
            }
        }
        self.set_online(false);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.stream.close()).await.is_err() {
            tracing::warn!(account = %self.account.jid, "XMPP stream did not close in time");
        }
        tracing::info!(account = %self.account.jid, "XMPP session closed");
    }

    fn set_online(&self, online: bool) {
        if self.online.send_replace(online) != online {
            if online {
                self.metrics.sessions_online.inc()
            } else {
                self.metrics.sessions_online.dec()
            };
        }
    }

    /// One log line per new problem with logging in, not one per retry.
    fn on_login(&mut self) {
        let state = self.login.borrow_and_update().clone();
        match &state {
            LoginState::Connecting => return,
            LoginState::LoggedIn => {
                self.reported_login = None;
                return;
            }
            _ if self.reported_login.as_ref() == Some(&state) => return,
            _ => {}
        }
        let account = &self.account.jid;
        match &state {
            LoginState::Rejected(why) => tracing::error!(
                %account,
                "XMPP login rejected ({why}); check this account's password in the accounts file. \
                 Jobs from this sender wait in the retry queues until it can log in"
            ),
            LoginState::Unreachable(why) => tracing::warn!(%account, "XMPP server unreachable ({why}); retrying"),
            LoginState::Connecting | LoginState::LoggedIn => {}
        }
        self.reported_login = Some(state);
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Stream(StreamEvent::Reset { bound_jid, features }) => {
                self.lost_in_a_row = 0;
                self.stream_management = features.stream_management.is_some();
                // Pings sent on the old stream will never be answered.
                self.pings.clear();
                tracing::info!(account = %self.account.jid, %bound_jid, stream_management = self.stream_management, "XMPP session online");
                self.set_online(true);
                // A new stream is a new session: no room knows us any more.
                let rooms: Vec<BareJid> = self.rooms.keys().cloned().collect();
                for room in rooms {
                    if let Some(Room::Joined) = self.rooms.get(&room) {
                        self.rooms.insert(room.clone(), Room::Joining(Vec::new()));
                    }
                    self.join(&room).await;
                }
            }
            Event::Stream(StreamEvent::Resumed) => {
                self.lost_in_a_row = 0;
                tracing::info!(account = %self.account.jid, "XMPP session resumed");
                self.set_online(true);
            }
            Event::Stream(StreamEvent::Suspended) => {
                tracing::warn!(account = %self.account.jid, "XMPP connection lost; reconnecting");
                self.set_online(false);
                self.on_lost().await;
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
            Stanza::Message(message) if message.type_ == MessageType::Error => self.on_bounce(&message),
            Stanza::Presence(presence) => self.on_presence(presence).await,
            _ => {}
        }
    }

    /// tokio-xmpp keeps trying to resume a lost stream. A server that lost
    /// the session (a restart) answers `<sm:failed/>` without `h`, which
    /// xmpp-parsers 0.23 cannot parse, so every new connection fails the
    /// same way and the session would never come back. When connections
    /// keep failing right after they were made, start a fresh stream (no
    /// resumption): the jobs in flight on the old one fail as transient and
    /// are retried, at least once as always.
    async fn on_lost(&mut self) {
        const FRESH_AFTER: u32 = 3;
        self.lost_in_a_row += 1;
        if self.lost_in_a_row < FRESH_AFTER {
            return;
        }
        tracing::warn!(account = %self.account.jid, lost = self.lost_in_a_row, "the XMPP stream cannot be resumed; starting a fresh one");
        self.lost_in_a_row = 0;
        let fresh = StanzaStream::new(login::connector(&self.account, self.login_tx.clone()), STREAM_QUEUE_DEPTH);
        let old = std::mem::replace(&mut self.stream, fresh);
        drop(tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await);
        self.pings.clear();
    }

    /// A room's answer to a join, or news that we left it.
    async fn on_presence(&mut self, presence: Presence) {
        let Some(from) = presence.from.clone() else { return };
        let room = from.to_bare();
        if !self.rooms.contains_key(&room) {
            return;
        }
        let own = from.resource().is_some_and(|r| r.as_str() == self.account.nick)
            || presence
                .payloads
                .iter()
                .filter_map(|p| MucUser::try_from(p.clone()).ok())
                .any(|u| u.status.contains(&Status::SelfPresence));
        match presence.type_ {
            PresenceType::Error => {
                let (kind, condition) = stanza::error_in(&presence.payloads);
                tracing::info!(account = %self.account.jid, %room, %condition, %kind, "the room refused the join");
                let reason = format!("room {room} refused the join: {condition} ({kind})");
                let error =
                    if kind == "wait" { DeliveryError::Transient(reason) } else { DeliveryError::Permanent(reason) };
                self.leave_failing(&room, &error);
            }
            PresenceType::Unavailable if own => {
                tracing::info!(account = %self.account.jid, %room, "no longer in the room; will join again for its next message");
                self.rooms.remove(&room);
            }
            PresenceType::None if own => {
                if let Some(Room::Joining(waiting)) = self.rooms.insert(room.clone(), Room::Joined) {
                    tracing::info!(account = %self.account.jid, %room, nick = %self.account.nick, "joined the room");
                    for job in waiting {
                        // A job that gave up waiting has been retried already.
                        if !job.reply.is_closed() {
                            self.transmit(job).await;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Forgets `room` and fails the jobs that waited for its join.
    fn leave_failing(&mut self, room: &BareJid, error: &DeliveryError) {
        if let Some(Room::Joining(waiting)) = self.rooms.remove(room) {
            for job in waiting {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }

    /// Sends the join presence for `room`: our nick, no history.
    async fn join(&mut self, room: &BareJid) {
        let occupant = match room.with_resource_str(&self.account.nick) {
            Ok(occupant) => occupant,
            Err(e) => {
                let error =
                    DeliveryError::Permanent(format!("nick {:?} is not valid in room {room}: {e}", self.account.nick));
                self.leave_failing(room, &error);
                return;
            }
        };
        let mut presence = Presence::available().with_to(occupant);
        presence.add_payload(Muc::new().with_history(History::new().with_maxstanzas(0)));
        drop(self.stream.send(Box::new(presence.into())).await);
    }

    fn on_bounce(&self, message: &Message) {
        let (kind, condition) = stanza::error_condition(message);
        let bounce = Bounce {
            id: message.id.as_ref().map(|i| i.0.clone()).unwrap_or_default(),
            condition,
            kind,
            from: message.from.as_ref().map(ToString::to_string).unwrap_or_default(),
        };
        tracing::info!(account = %self.account.jid, id = %bounce.id, from = %bounce.from, condition = %bounce.condition, kind = %bounce.kind, "the XMPP server bounced a message");
        let _ = self.bounces.send(bounce);
    }

    /// Sends a job's message, joining its room first if it is for a room.
    async fn send(&mut self, job: Outgoing) {
        if job.message.type_ == MessageType::Groupchat
            && let Some(room) = job.message.to.as_ref().map(Jid::to_bare)
        {
            match self.rooms.get_mut(&room) {
                Some(Room::Joined) => {}
                Some(Room::Joining(waiting)) => {
                    // Jobs whose own wait ended (ack timeout) are gone: keep
                    // only the live ones. If none was left, the room has
                    // not answered for that long: ask again.
                    let before = waiting.len();
                    waiting.retain(|w| !w.reply.is_closed());
                    let unanswered = before > 0 && waiting.is_empty();
                    waiting.push(job);
                    if unanswered {
                        tracing::info!(account = %self.account.jid, %room, "no answer to the room join; joining again");
                        self.join(&room).await;
                    }
                    return;
                }
                None => {
                    self.rooms.insert(room.clone(), Room::Joining(vec![job]));
                    return self.join(&room).await;
                }
            }
        }
        self.transmit(job).await;
    }

    async fn transmit(&mut self, job: Outgoing) {
        let Outgoing { message, reply } = job;
        let enqueue = self.stream.send(Box::new(message.into()));
        let Ok(token) = tokio::time::timeout(ENQUEUE_TIMEOUT, enqueue).await else {
            let _ = reply.send(Err(DeliveryError::Transient("XMPP transmit queue is full".into())));
            return;
        };
        let ping = if self.stream_management { None } else { Some(self.send_ping().await) };
        let _ = reply.send(Ok(InFlight { token, ping }));
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
async fn confirmed(InFlight { mut token, ping }: InFlight) -> Result<(), DeliveryError> {
    let stage = if ping.is_some() { StanzaStage::Sent } else { StanzaStage::Acked };
    match token.wait_for(stage).await {
        Some(StanzaState::Acked { .. }) => return Ok(()),
        Some(StanzaState::Sent { .. }) if ping.is_some() => {}
        Some(StanzaState::Failed { error }) => {
            return Err(DeliveryError::Transient(format!("XMPP send failed: {error}")));
        }
        _ => {
            return Err(DeliveryError::Transient(
                "XMPP stream was reset before the server acknowledged the message".into(),
            ));
        }
    }
    match ping {
        Some(answer) => answer
            .await
            .map_err(|_| DeliveryError::Transient("XMPP stream was reset before the ping was answered".into())),
        None => Ok(()),
    }
}
