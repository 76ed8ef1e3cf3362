//! One XMPP client session per sender account, owned by one task (the actor
//! pattern): jobs arrive over a bounded channel, each with a oneshot for its
//! outcome.
//!
//! The session uses tokio-xmpp's `StanzaStream` directly: it reconnects on
//! its own, resumes with XEP-0198 where it can, and reports each stanza's
//! progress through a token. A job succeeds only when its stanza reached the
//! `Acked` stage (the server's `<a h=…/>` covered it) on the connection it
//! was sent on: an ack given on resumption, after the connection was lost,
//! is not trusted (see `confirmed`). Where the server
//! offers no stream management, an iq ping sent right after the stanza and
//! answered proves the server read it, because a stream is ordered.
//!
//! The task never waits on the stream's bounded transmit queue: every
//! stanza goes through the session's own outbox, which is handed to the
//! stream only as far as the stream takes it without waiting, while the
//! task keeps reading the stream's events. A stream that takes nothing for
//! [`ENQUEUE_TIMEOUT`] (the server stopped reading) fails the outbox's jobs
//! as transient and reports the session stalled; a job whose stanza waits
//! for its ack while the server acknowledges nothing of the session's for
//! the ack timeout does too (a server that acks other stanzas meanwhile is
//! slow, not gone: see `SessionHandle::acknowledged`). Either makes
//! `/readyz` say so, as does a task that stopped turning.
//!
//! With stream management, stanzas that come while the last one handed to
//! the stream waits for its ack are held back (at most [`HOLD`]) and go out
//! together behind one ack request (see `hold_deadline`).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use herald_shared::Sender;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tokio_xmpp::{
    Stanza,
    parsers::{
        iq::Iq,
        jid::Jid,
        message::{Message, MessageType},
        ping::Ping,
        presence::Presence,
        stanza_error::{DefinedCondition, ErrorType, StanzaError},
    },
    stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StanzaToken, StreamEvent},
};

use super::{
    accounts::Account,
    login::{self, LoginState},
    rooms::{Joined, Rooms, Wait},
    stanza,
};
use crate::{error::DeliveryError, metrics::Metrics};

/// Stanzas queued inside tokio-xmpp per session, each way.
const STREAM_QUEUE_DEPTH: usize = 1024;
/// Jobs waiting for the session task.
const JOB_QUEUE_DEPTH: usize = 1024;
/// Stanzas the session holds for a stream that does not take them; beyond
/// this it takes no new jobs (they wait in the job queue, bounded in time).
const OUTBOX_LIMIT: usize = 1024;
/// How long a stanza may wait for the stream to take it, and a job for the
/// session to take it.
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the task offers a waiting outbox to the stream again.
const OUTBOX_RETRY: Duration = Duration::from_millis(20);
/// While the stanza last handed to the stream waits for the server's ack,
/// new stanzas are held back for this long at most (see `hold_deadline`).
const HOLD: Duration = Duration::from_millis(2);
/// Held stanzas go out at once when this many are waiting.
const HOLD_BATCH: usize = 64;
/// How often the task proves it is turning.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A task whose last turn is older than this is reported as not responding.
const LIVENESS: Duration = Duration::from_secs(5);
/// How long closing a stream cleanly may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A job's message on its way into the session.
pub(super) struct Outgoing {
    /// Boxed: a channel's first block holds 32 of these, allocated with each
    /// session, and a `Message` is 216 bytes.
    pub(super) message: Box<Message>,
    /// Answered once the stanza is on its way (or could not be): the job's
    /// own task then waits for the server's acknowledgement, so the session
    /// spawns nothing per message.
    pub(super) reply: oneshot::Sender<Result<InFlight, DeliveryError>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").field("id", &self.message.id).finish()
    }
}

/// A stanza handed to the stream: its progress token, the connection it
/// was handed to (see `confirmed`) and, without stream management, the ping
/// that proves the server read it.
pub(super) struct InFlight {
    token: StanzaToken,
    connection: u64,
    ping: Option<oneshot::Receiver<()>>,
}

/// An error stanza sent back for a message: the recipient's server or the
/// recipient refused it, or someone claims so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// The stanza id, which is the job id.
    pub id: String,
    /// The error's defined condition, e.g. `service-unavailable`.
    pub condition: String,
    /// The error type: `cancel`, `wait`, `modify`, `auth` or `continue`.
    pub kind: String,
    /// Who sent the error.
    pub from: String,
}

impl Bounce {
    /// `wait` means "try again later"; everything else will not change by
    /// itself.
    pub fn is_transient(&self) -> bool {
        self.kind == "wait"
    }
}

/// What the session task reports about itself, for `/readyz`.
#[derive(Debug)]
struct Health {
    /// When the task last turned.
    last_turn: Mutex<Instant>,
    /// When the stream last took nothing for `ENQUEUE_TIMEOUT`; cleared when
    /// it takes a stanza, stale like `ack_overdue`.
    outbox_stuck: Mutex<Option<Instant>>,
    /// When a job last waited out its ack timeout; cleared by the next
    /// ack, and stale after two ack timeouts without another (a session
    /// that no job has used since is not reported forever).
    ack_overdue: Mutex<Option<Instant>>,
    /// When the server last acknowledged one of this session's stanzas: a
    /// stanza's ack timeout counts from this or from its own sending,
    /// whichever is later (see `SessionHandle::acknowledged`).
    last_ack: Mutex<Instant>,
    /// Counted by the streams' connectors (see `confirmed`).
    connections: login::Connections,
}

/// Sets (`Some(now)`) or clears (`None`) one of `Health`'s marks.
fn mark(slot: &Mutex<Option<Instant>>, at: Option<Instant>) {
    *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = at;
}

/// Whether the mark was set within `within`.
fn marked_within(slot: &Mutex<Option<Instant>>, within: Duration) -> bool {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some_and(|at| at.elapsed() < within)
}

impl Health {
    fn turned(&self) {
        *self.last_turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    fn since_last_turn(&self) -> Duration {
        self.last_turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed()
    }

    fn acked(&self) {
        *self.last_ack.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    fn last_ack(&self) -> Instant {
        *self.last_ack.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    health: Arc<Health>,
}

impl SessionHandle {
    pub fn jid(&self) -> &Sender {
        &self.jid
    }

    pub fn is_online(&self) -> bool {
        *self.online.borrow()
    }

    /// The session task has ended (idle, or shut down): it takes no jobs.
    pub fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Why the session cannot deliver now, if it cannot: its task stopped
    /// turning, it is offline, or its server stopped taking or acking
    /// stanzas.
    pub fn problem(&self) -> Option<String> {
        let quiet = self.health.since_last_turn();
        if quiet > LIVENESS {
            return Some(format!("session task not responding for {}s", quiet.as_secs()));
        }
        if !self.is_online() {
            return Some(self.offline_reason());
        }
        if marked_within(&self.health.outbox_stuck, self.ack_timeout * 2) {
            return Some(format!("the XMPP server has taken no stanza for {}s", ENQUEUE_TIMEOUT.as_secs()));
        }
        if marked_within(&self.health.ack_overdue, self.ack_timeout * 2) {
            return Some(format!("the XMPP server acknowledged nothing within {:?}", self.ack_timeout));
        }
        None
    }

    fn offline_reason(&self) -> String {
        match &*self.login.borrow() {
            LoginState::Connecting => "connecting".to_owned(),
            LoginState::LoggedIn => "binding a resource".to_owned(),
            LoginState::Rejected(why) => format!("login rejected: {why}"),
            LoginState::Unreachable(why) => format!("server unreachable: {why}"),
        }
    }

    /// Sends a message and resolves once the server acknowledged it.
    /// Waits up to `online_timeout` for the session to be online first,
    /// unless the server has refused the login, which will not change by
    /// waiting. Every stage has a deadline.
    /// The message comes boxed, as the session's channel takes it: an
    /// `async fn` keeps its arguments twice in its future, which lives as
    /// long as the job is in flight.
    pub async fn deliver(&self, message: Box<Message>, online_timeout: Duration) -> Result<(), DeliveryError> {
        let offline =
            || DeliveryError::SenderOffline(format!("XMPP session of {} is {}", self.jid, self.offline_reason()));
        if matches!(*self.login.borrow(), LoginState::Rejected(_)) && !self.is_online() {
            return Err(offline());
        }
        let mut online = self.online.clone();
        match tokio::time::timeout(online_timeout, online.wait_for(|o| *o)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(DeliveryError::SessionClosed),
            Err(_) => return Err(offline()),
        }
        let (reply, sent) = oneshot::channel();
        match tokio::time::timeout(ENQUEUE_TIMEOUT, self.jobs.send(Outgoing { message, reply })).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(DeliveryError::SessionClosed),
            Err(_) => {
                return Err(DeliveryError::Transient(format!(
                    "the XMPP session of {} took no job within {ENQUEUE_TIMEOUT:?}",
                    self.jid
                )));
            }
        }
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
        let result = self.acknowledged(in_flight).await;
        if result.is_ok() {
            self.health.acked();
            mark(&self.health.ack_overdue, None);
        }
        result
    }

    /// Waits for the server's acknowledgement of a stanza just handed to the
    /// stream, until the server has acknowledged nothing of this session's
    /// for the ack timeout. A server acknowledges in order, so one that
    /// acked other stanzas meanwhile is reading the stream and gets to this
    /// one: a slow server, e.g. one that holds the account to a rate
    /// (ejabberd's default shaper: 3,000 bytes a second) while a burst
    /// waits in the socket's buffers. Retrying those would put a second
    /// copy behind the first and send both.
    async fn acknowledged(&self, in_flight: InFlight) -> Result<(), DeliveryError> {
        let sent = Instant::now();
        let confirmed = confirmed(in_flight, &self.health.connections);
        tokio::pin!(confirmed);
        loop {
            let since = self.health.last_ack().max(sent);
            let deadline = tokio::time::Instant::from(since + self.ack_timeout);
            if let Ok(result) = tokio::time::timeout_at(deadline, &mut confirmed).await {
                return result;
            }
            if self.health.last_ack() <= since {
                mark(&self.health.ack_overdue, Some(Instant::now()));
                return Err(DeliveryError::Transient(format!(
                    "the XMPP server acknowledged nothing within {:?}",
                    self.ack_timeout
                )));
            }
        }
    }
}

/// What a session needs besides its account.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub ack_timeout: Duration,
    /// Close the session once it has taken no job for this long (`None`:
    /// keep it open). Longer than two ack timeouts, so that no job taken
    /// before is still waiting for its acknowledgement.
    pub idle: Option<Duration>,
    /// Appended to the nick (`nick-suffix`) when a room says the nick is
    /// taken, e.g. by another relay replica on a server without
    /// multi-session nicks.
    pub nick_suffix: String,
}

/// Starts the session task for `account` on `tasks`. It runs until
/// `shutdown` is cancelled (or it is idle), then closes the stream cleanly.
/// Error stanzas that come back for sent messages are reported on
/// `bounces`.
pub fn spawn(
    account: Account,
    settings: &SessionSettings,
    bounces: mpsc::UnboundedSender<Bounce>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> SessionHandle {
    let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE_DEPTH);
    let (online_tx, online_rx) = watch::channel(false);
    let (login_tx, login_rx) = watch::channel(LoginState::Connecting);
    let health = Arc::new(Health {
        last_turn: Mutex::new(Instant::now()),
        outbox_stuck: Mutex::new(None),
        ack_overdue: Mutex::new(None),
        last_ack: Mutex::new(Instant::now()),
        connections: login::Connections::default(),
    });
    let handle = SessionHandle {
        jid: account.jid.clone(),
        ack_timeout: settings.ack_timeout,
        jobs: jobs_tx,
        online: online_rx,
        login: login_rx.clone(),
        health: Arc::clone(&health),
    };
    let session = Session {
        stream: StanzaStream::new(
            login::connector(&account, login_tx.clone(), health.connections.clone()),
            STREAM_QUEUE_DEPTH,
        ),
        login_tx,
        lost_in_a_row: 0,
        rooms: Rooms::new(account.nick.clone(), settings.nick_suffix.clone()),
        account,
        online: online_tx,
        login: login_rx,
        reported_login: None,
        bounces,
        metrics,
        health,
        stream_management: false,
        pings: HashMap::new(),
        outbox: VecDeque::new(),
        last_sent: None,
        idle: settings.idle,
    };
    tasks.spawn(session.run(jobs_rx, shutdown));
    handle
}

/// A stanza waiting for the stream to take it.
struct Queued {
    stanza: Out,
    since: Instant,
}

/// What the outbox holds: stanzas are not `Clone`, their kinds are.
enum Out {
    /// A job's message, answered on `reply` once the stream took it.
    Job(Box<Message>, oneshot::Sender<Result<InFlight, DeliveryError>>),
    Iq(Box<Iq>),
    Presence(Box<Presence>),
}

impl Out {
    fn stanza(&self) -> Stanza {
        match self {
            Out::Job(message, _) => Message::clone(message).into(),
            Out::Iq(iq) => Iq::clone(iq).into(),
            Out::Presence(presence) => Presence::clone(presence).into(),
        }
    }
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
    health: Arc<Health>,
    /// Whether the current stream negotiated XEP-0198.
    stream_management: bool,
    /// Without stream management: pings in flight, by iq id.
    pings: HashMap<String, oneshot::Sender<()>>,
    rooms: Rooms,
    outbox: VecDeque<Queued>,
    /// The token of the last stanza handed to the stream.
    last_sent: Option<StanzaToken>,
    /// For a fresh stream (see `on_lost`).
    login_tx: watch::Sender<LoginState>,
    /// Connections lost since the last one that got a session going.
    lost_in_a_row: u32,
    /// See `SessionSettings::idle`.
    idle: Option<Duration>,
}

impl Session {
    async fn run(mut self, mut jobs: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        tracing::info!(account = %self.account.jid, "XMPP session starting");
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut last_job = Instant::now();
        loop {
            self.health.turned();
            let held_until = self.flush_outbox().map(tokio::time::Instant::from);
            // Jobs not yet handed to the stream, or (with stream management)
            // handed to it and not yet acknowledged: an idle session waits
            // for them to settle before it closes.
            let waiting = !self.outbox.is_empty();
            let in_flight = waiting || (self.idle.is_some() && self.awaited());
            let mut last_sent = held_until.and_then(|_| self.last_sent.clone());
            let idle_until = self.idle.map(|idle| tokio::time::Instant::from(last_job + idle));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(idle_until), if idle_until.is_some() && !in_flight => {
                    // No job was taken for this long and none is in flight
                    // (one whose server acks slowly may wait longer than the
                    // ack timeout). One sent in this instant is handed back
                    // for a new session.
                    jobs.close();
                    while let Ok(job) = jobs.try_recv() {
                        let _ = job.reply.send(Err(DeliveryError::SessionClosed));
                    }
                    tracing::info!(account = %self.account.jid, "XMPP session idle; closing it until its next job");
                    break;
                }
                event = self.stream.next() => match event {
                    Some(event) => self.on_event(event).await,
                    None => {
                        tracing::warn!(account = %self.account.jid, "XMPP stream ended");
                        break;
                    }
                },
                Some(job) = jobs.recv(), if self.outbox.len() < OUTBOX_LIMIT => {
                    last_job = Instant::now();
                    self.send(job);
                }
                Ok(()) = self.login.changed() => self.on_login(),
                _ = heartbeat.tick() => {}
                () = tokio::time::sleep(OUTBOX_RETRY), if waiting => {}
                () = sleep_until(held_until), if held_until.is_some() => {}
                () = acked(&mut last_sent), if last_sent.is_some() => self.last_sent = None,
            }
        }
        self.set_online(false);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.stream.close()).await.is_err() {
            tracing::warn!(account = %self.account.jid, "XMPP stream did not close in time");
        }
        tracing::info!(account = %self.account.jid, "XMPP session closed");
    }

    /// Hands the outbox to the stream as far as it takes stanzas without
    /// waiting. A head that waited past `ENQUEUE_TIMEOUT` fails the whole
    /// outbox: its jobs are retried later, on this stream or another.
    /// Returns until when the outbox is held back instead, if it is (see
    /// `hold_deadline`).
    fn flush_outbox(&mut self) -> Option<Instant> {
        drop_abandoned(&mut self.outbox);
        let oldest = self.outbox.front()?.since;
        if let Some(until) =
            hold_deadline(self.stream_management, self.unacked(), self.outbox.len(), oldest, Instant::now())
        {
            return Some(until);
        }
        while let Some(head) = self.outbox.front() {
            let Some(token) = self.stream.send(Box::new(head.stanza.stanza())).now_or_never() else {
                if head.since.elapsed() >= ENQUEUE_TIMEOUT {
                    self.fail_outbox();
                }
                return None;
            };
            mark(&self.health.outbox_stuck, None);
            self.last_sent = Some(token.clone());
            if let Some(Queued { stanza: Out::Job(_, reply), .. }) = self.outbox.pop_front() {
                let ping = (!self.stream_management).then(|| self.queue_ping());
                let connection = self.health.connections.current();
                let _ = reply.send(Ok(InFlight { token, connection, ping }));
            }
            drop_abandoned(&mut self.outbox);
        }
        None
    }

    /// The stanza last handed to the stream waits for the server's ack (and
    /// with it, acks being in order, every one before it that does).
    fn unacked(&self) -> bool {
        self.last_sent.as_ref().is_some_and(|t| matches!(t.state(), StanzaState::Sent { .. }))
    }

    /// A job still waits for the ack of a stanza on this stream: one is
    /// unacknowledged and no job has given up on its ack since the last ack
    /// (a server that stopped acking must not keep the session open).
    fn awaited(&self) -> bool {
        self.stream_management
            && self.unacked()
            && self.health.ack_overdue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none()
    }

    fn fail_outbox(&mut self) {
        tracing::warn!(
            account = %self.account.jid,
            waiting = self.outbox.len(),
            "the XMPP server has taken no stanza for {ENQUEUE_TIMEOUT:?}; failing the waiting jobs for a retry"
        );
        mark(&self.health.outbox_stuck, Some(Instant::now()));
        for queued in self.outbox.drain(..) {
            if let Out::Job(_, reply) = queued.stanza {
                let _ = reply.send(Err(DeliveryError::Transient("the XMPP server is not taking stanzas".into())));
            }
        }
    }

    fn queue(&mut self, stanza: Out) {
        self.outbox.push_back(Queued { stanza, since: Instant::now() });
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
                // Pings sent on the old stream will never be answered, and
                // what waited in the outbox was for the old stream.
                self.pings.clear();
                self.last_sent = None;
                tracing::info!(account = %self.account.jid, %bound_jid, stream_management = self.stream_management, "XMPP session online");
                self.set_online(true);
                // A new stream is a new session: no room knows us any more.
                for join in self.rooms.rejoin_all() {
                    self.queue(Out::Presence(Box::new(join)));
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
            Event::Stanza(stanza) => self.on_stanza(stanza),
        }
    }

    fn on_stanza(&mut self, stanza: Stanza) {
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
                    self.queue(Out::Iq(Box::new(reply)));
                }
            },
            Stanza::Message(message) if message.type_ == MessageType::Error => self.on_bounce(&message),
            Stanza::Presence(presence) => self.on_presence(&presence),
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
        let connector = login::connector(&self.account, self.login_tx.clone(), self.health.connections.clone());
        let fresh = StanzaStream::new(connector, STREAM_QUEUE_DEPTH);
        let old = std::mem::replace(&mut self.stream, fresh);
        drop(tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await);
        self.pings.clear();
    }

    /// A room's answer to a join, or news that we left it.
    fn on_presence(&mut self, presence: &Presence) {
        match self.rooms.on_presence(presence) {
            Joined::NotARoom => {}
            Joined::Ready(room, waiting) => {
                tracing::info!(account = %self.account.jid, %room, "joined the room");
                // One that gave up waiting meanwhile is dropped before it
                // is sent (`drop_abandoned`).
                for job in waiting {
                    self.transmit(job);
                }
            }
            Joined::TryAnotherNick(join) => {
                tracing::info!(account = %self.account.jid, room = ?join.to, "the nick is taken in the room; joining with this relay's suffix");
                self.queue(Out::Presence(Box::new(join)));
            }
            Joined::Refused(room, waiting, error) => {
                tracing::info!(account = %self.account.jid, %room, %error, "the room refused the join");
                for job in waiting {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
            Joined::Left(room) => {
                tracing::info!(account = %self.account.jid, %room, "no longer in the room; will join again for its next message");
            }
        }
    }

    fn on_bounce(&self, message: &Message) {
        let (kind, condition) = stanza::error_condition(message);
        let bounce = Bounce {
            id: message.id.as_ref().map(|i| i.0.clone()).unwrap_or_default(),
            condition,
            kind,
            from: message.from.as_ref().map(ToString::to_string).unwrap_or_default(),
        };
        tracing::info!(account = %self.account.jid, id = %bounce.id, from = %bounce.from, condition = %bounce.condition, kind = %bounce.kind, "an error came back for a message");
        let _ = self.bounces.send(bounce);
    }

    /// Sends a job's message, joining its room first if it is for a room.
    fn send(&mut self, job: Outgoing) {
        if job.message.type_ == MessageType::Groupchat
            && let Some(room) = job.message.to.as_ref().map(Jid::to_bare)
        {
            match self.rooms.wait_for(&room, job) {
                Wait::SendNow(job) => self.transmit(job),
                Wait::Queued(None) => {}
                Wait::Queued(Some(join)) => self.queue(Out::Presence(Box::new(join))),
                Wait::Refused(job, error) => drop(job.reply.send(Err(error))),
            }
            return;
        }
        self.transmit(job);
    }

    fn transmit(&mut self, job: Outgoing) {
        let Outgoing { message, reply } = job;
        self.queue(Out::Job(message, reply));
    }

    /// Queues a ping to the server right behind the message just handed to
    /// the stream, and returns the receiver its answer wakes.
    fn queue_ping(&mut self) -> oneshot::Receiver<()> {
        let id = format!("herald-ping-{}", uuid::Uuid::new_v4());
        let (tx, rx) = oneshot::channel();
        self.pings.insert(id.clone(), tx);
        let ping = Iq::from_get(id, Ping).with_to(Jid::from(self.account.jid.jid().domain().to_owned()));
        // Right behind the message, ahead of anything queued later.
        self.outbox.push_front(Queued { stanza: Out::Iq(Box::new(ping)), since: Instant::now() });
        rx
    }
}

/// Drops the jobs at the head of the outbox whose delivery gave up waiting
/// for the stream to take them (`Session::deliver`): each is being retried
/// already, so sending it now would deliver it twice.
fn drop_abandoned(outbox: &mut VecDeque<Queued>) {
    while outbox.front().is_some_and(|q| matches!(&q.stanza, Out::Job(_, reply) if reply.is_closed())) {
        outbox.pop_front();
    }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Until when a session's outbox is held back, if it is: while the stanza
/// last handed to the stream waits for the server's ack (`unacked`, with
/// stream management only), for at most `HOLD` after the oldest of the
/// `waiting` stanzas came (`oldest`), and while fewer than `HOLD_BATCH` wait.
///
/// tokio-xmpp asks for an ack after every batch it writes, and the server
/// answers each request. Handing stanzas on as they come sends a few at a
/// time, each few with its request; holding them while the last batch is
/// unacknowledged (Nagle's algorithm, for stanzas) sends them together once
/// its ack is in. An idle session sends at once.
fn hold_deadline(
    stream_management: bool,
    unacked: bool,
    waiting: usize,
    oldest: Instant,
    now: Instant,
) -> Option<Instant> {
    let until = oldest + HOLD;
    (stream_management && unacked && waiting < HOLD_BATCH && now < until).then_some(until)
}

/// Resolves once the stanza is past `Sent`: acked, failed, or dropped with
/// its stream.
async fn acked(token: &mut Option<StanzaToken>) {
    if let Some(token) = token {
        token.wait_for(StanzaStage::Acked).await;
    }
}

/// Resolves once the server has provably received the stanza: its XEP-0198
/// ack on the connection it was handed to, or (without stream management)
/// the answer to the ping sent after it.
///
/// An ack that comes after that connection was lost is not trusted: it is
/// the count a server gives when the stream is resumed (`<sm:resumed h=…/>`)
/// or when it cannot be (`<sm:failed h=…/>`), and Prosody 0.12 saves, when
/// it stops, a count that covers the stanza it was reading and then drops
/// that stanza. Such a job is retried (a duplicate if the server had it).
/// `connections` counts a new connection before the stream reads anything
/// on it, so it has changed by the time such an ack can arrive, and not yet
/// when an ack read on the old connection just before it broke is seen.
async fn confirmed(in_flight: InFlight, connections: &login::Connections) -> Result<(), DeliveryError> {
    let InFlight { mut token, connection, ping } = in_flight;
    let stage = if ping.is_some() { StanzaStage::Sent } else { StanzaStage::Acked };
    match token.wait_for(stage).await {
        Some(StanzaState::Acked { .. }) if connections.current() == connection => return Ok(()),
        Some(StanzaState::Acked { .. }) => {
            return Err(DeliveryError::Transient(
                "the XMPP connection was lost before the server acknowledged the message; \
                 a count given after a reconnection is not trusted"
                    .into(),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_wait_only_behind_an_unacked_write_with_stream_management_and_briefly() {
        let oldest = Instant::now();
        let soon = oldest + HOLD / 2;
        assert_eq!(hold_deadline(true, true, 1, oldest, soon), Some(oldest + HOLD));
        assert_eq!(hold_deadline(true, true, HOLD_BATCH - 1, oldest, oldest), Some(oldest + HOLD));
        // Nothing unacknowledged (an idle session, or the last write acked):
        // at once.
        assert_eq!(hold_deadline(true, false, 1, oldest, soon), None);
        // Without stream management there is no ack to wait for.
        assert_eq!(hold_deadline(false, true, 1, oldest, soon), None);
        // Never longer than HOLD, nor for a full batch.
        assert_eq!(hold_deadline(true, true, 1, oldest, oldest + HOLD), None);
        assert_eq!(hold_deadline(true, true, HOLD_BATCH, oldest, soon), None);
    }

    #[test]
    fn jobs_that_gave_up_waiting_at_the_head_of_the_outbox_are_not_sent() {
        let queued = |stanza| Queued { stanza, since: Instant::now() };
        let job = || {
            let (reply, waiting) = oneshot::channel();
            (queued(Out::Job(Box::new(Message::new(None)), reply)), waiting)
        };
        let (gave_up, abandoned) = job();
        drop(abandoned);
        let (waits, _waiting) = job();
        let (gave_up_later, abandoned_later) = job();
        drop(abandoned_later);
        let presence = queued(Out::Presence(Box::new(Presence::available())));
        let mut outbox = VecDeque::from([gave_up, waits, gave_up_later, presence]);

        drop_abandoned(&mut outbox);
        assert!(matches!(&outbox.front().map(|q| &q.stanza), Some(Out::Job(_, reply)) if !reply.is_closed()));
        assert_eq!(outbox.len(), 3, "only the head is looked at");
        outbox.pop_front();
        drop_abandoned(&mut outbox);
        assert!(matches!(&outbox.front().map(|q| &q.stanza), Some(Out::Presence(_))), "a presence is not a job");
        assert_eq!(outbox.len(), 1);
    }
}
