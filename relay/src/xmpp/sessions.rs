//! The relay's sessions, one per sender account. By default every session
//! opens at start and stays open. With an idle time (`HERALD_SESSION_IDLE`)
//! a session opens for its sender's first job and closes after taking no
//! job for that long, so that a relay with a thousand occasional senders
//! holds only the sessions in use.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use herald_shared::Sender;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tokio_xmpp::parsers::message::Message;

use super::{Account, Bounce, SessionHandle, SessionSettings, session};
use crate::{error::DeliveryError, metrics::Metrics};

/// Sessions a job is offered to before it fails as transient.
const OPEN_ATTEMPTS: usize = 3;

/// A sender account and its session, while one is open.
#[derive(Debug)]
struct Slot {
    account: Account,
    open: Mutex<Option<SessionHandle>>,
}

#[derive(Debug)]
pub struct Sessions {
    slots: HashMap<Sender, Slot>,
    settings: SessionSettings,
    /// Where sessions report error stanzas; dropped at shutdown, so that
    /// the receiver ends once the last session has.
    bounces: Mutex<Option<mpsc::UnboundedSender<Bounce>>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Sessions {
    /// Opens a session for every account, unless sessions open on first
    /// use (`settings.idle`).
    pub fn start(
        accounts: Vec<Account>,
        settings: SessionSettings,
        bounces: mpsc::UnboundedSender<Bounce>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = accounts
            .into_iter()
            .map(|account| (account.jid.clone(), Slot { account, open: Mutex::new(None) }))
            .collect();
        let sessions = Self {
            slots,
            settings,
            bounces: Mutex::new(Some(bounces)),
            metrics,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        if sessions.settings.idle.is_none() {
            for slot in sessions.slots.values() {
                sessions.open(slot);
            }
        }
        sessions
    }

    /// Whether this relay holds an account for `sender`.
    pub fn holds(&self, sender: &Sender) -> bool {
        self.slots.contains_key(sender)
    }

    /// Sends the message `message()` builds from `sender` and resolves once
    /// the server acknowledged it, opening the session if it is not open. A
    /// session that closed as the job reached it hands the job to a new one.
    pub async fn deliver(
        &self,
        sender: &Sender,
        message: impl Fn() -> Box<Message>,
        online_timeout: Duration,
    ) -> Result<(), DeliveryError> {
        let slot = self
            .slots
            .get(sender)
            .ok_or_else(|| DeliveryError::NoAccount(format!("this relay holds no XMPP account for sender {sender}")))?;
        // A session closes between two jobs only when idle, so a second
        // one is plenty; a session that keeps ending at once (a bug, a
        // stream worker that died) makes the job a transient failure, not
        // a loop.
        for _ in 0..OPEN_ATTEMPTS {
            let Some(session) = self.open(slot) else {
                return Err(DeliveryError::Transient("the relay is stopping".into()));
            };
            match session.deliver(message(), online_timeout).await {
                Err(DeliveryError::SessionClosed) => {}
                outcome => return outcome,
            }
        }
        Err(DeliveryError::Transient(format!("the XMPP session of {sender} closed {OPEN_ATTEMPTS} times in a row")))
    }

    /// The slot's open session, opening one if there is none (or the last
    /// one closed). None once the relay is stopping.
    fn open(&self, slot: &Slot) -> Option<SessionHandle> {
        let mut open = slot.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = open.as_ref().filter(|s| !s.is_closed()) {
            return Some(session.clone());
        }
        if self.stop.is_cancelled() {
            return None;
        }
        let bounces = self.bounces.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        let session = session::spawn(
            slot.account.clone(),
            &self.settings,
            bounces,
            Arc::clone(&self.metrics),
            self.stop.clone(),
            &self.tasks,
        );
        *open = Some(session.clone());
        Some(session)
    }

    /// What keeps the open sessions from delivering, one entry per session.
    pub fn problems(&self) -> Vec<String> {
        self.slots
            .values()
            .filter_map(|slot| slot.open.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .filter(|s| !s.is_closed())
            .filter_map(|s| s.problem().map(|why| format!("{}: {why}", s.jid())))
            .collect()
    }

    /// Closes every session (each closes its stream cleanly) and waits for
    /// them; no session opens after this.
    pub async fn close(&self) {
        self.stop.cancel();
        drop(self.bounces.lock().unwrap_or_else(PoisonError::into_inner).take());
        self.tasks.close();
        self.tasks.wait().await;
    }
}
