//! The receiving XMPP client (the harness's `Receiver`), run on a thread and
//! runtime of its own so that the load generator cannot delay it, stamping
//! each message with the instant it was taken from the receiver.

use herald_tests::{Prosody, Receiver, XmppAccount};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The name of the one receiver's thread.
pub const RECEIVER_THREAD: &str = "bench-receiver";

/// How often the receiver thread checks whether it is still wanted.
const POLL: Duration = Duration::from_millis(200);

/// Messages arriving at the receiver: stanza id → when it arrived.
pub struct Arrivals {
    messages: mpsc::UnboundedReceiver<(String, Instant)>,
    /// Arrived but not asked for yet (a later phase's, or a straggler).
    early: HashMap<String, Instant>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What arrived of a set of stanza ids.
#[derive(Debug, Default)]
pub struct Matched {
    pub arrived: HashMap<String, Instant>,
    pub duplicates: usize,
}

impl Matched {
    pub fn last(&self) -> Option<Instant> {
        self.arrived.values().max().copied()
    }
}

impl Arrivals {
    /// Logs `account` in and returns once it is online.
    pub async fn start(prosody: Arc<Prosody>, account: XmppAccount) -> Self {
        let (tx, messages) = mpsc::unbounded_channel();
        let (online_tx, online) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(RECEIVER_THREAD.into())
            .spawn(move || receive(prosody, account, online_tx, tx))
            .expect("spawn the receiver thread");
        online.await.expect("the receiver logs in");
        Self { messages, early: HashMap::new(), thread: Some(thread) }
    }

    /// Logs every account in, on one thread, and returns once all are
    /// online; arrivals at any of them are reported together.
    pub async fn start_many(prosody: Arc<Prosody>, accounts: Vec<XmppAccount>) -> Self {
        let (tx, messages) = mpsc::unbounded_channel();
        let (online_tx, online) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-receivers".into())
            .spawn(move || receive_many(prosody, accounts, online_tx, tx))
            .expect("spawn the receivers' thread");
        online.await.expect("the receivers log in");
        Self { messages, early: HashMap::new(), thread: Some(thread) }
    }

    /// Forgets everything that arrived so far.
    pub fn clear(&mut self) {
        self.early.clear();
        while self.messages.try_recv().is_ok() {}
    }

    /// Waits until every id in `ids` arrived, or nothing arrived for `idle`.
    pub async fn wait_for(&mut self, ids: &HashSet<String>, idle: Duration) -> Matched {
        let mut matched = Matched::default();
        for id in ids {
            if let Some(at) = self.early.remove(id) {
                matched.arrived.insert(id.clone(), at);
            }
        }
        while matched.arrived.len() < ids.len() {
            let Ok(Some((id, at))) = tokio::time::timeout(idle, self.messages.recv()).await else { break };
            if !ids.contains(&id) {
                self.early.entry(id).or_insert(at);
                continue;
            }
            match matched.arrived.entry(id) {
                Entry::Occupied(_) => matched.duplicates += 1,
                Entry::Vacant(slot) => {
                    slot.insert(at);
                }
            }
        }
        matched
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.messages.close();
        if let Some(thread) = self.thread.take() {
            drop(thread.join());
        }
    }
}

/// The receiver thread: logs in, then forwards every message's id and
/// arrival instant until `tx` is closed.
fn receive(
    prosody: Arc<Prosody>,
    account: XmppAccount,
    online: oneshot::Sender<()>,
    tx: mpsc::UnboundedSender<(String, Instant)>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("receiver runtime");
    runtime.block_on(async move {
        let mut receiver = Receiver::connect(&prosody, &account).await;
        // Only the main task may own the server, so that it is stopped on exit.
        drop(prosody);
        let _ = online.send(());
        while !tx.is_closed() {
            if let Some(message) = receiver.next(POLL).await {
                let at = Instant::now();
                if tx.send((message.id.unwrap_or_default(), at)).is_err() {
                    break;
                }
            }
        }
    });
}

/// Several receivers on one thread (`start_many`).
fn receive_many(
    prosody: Arc<Prosody>,
    accounts: Vec<XmppAccount>,
    online: oneshot::Sender<()>,
    tx: mpsc::UnboundedSender<(String, Instant)>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("receivers' runtime");
    runtime.block_on(async move {
        let mut receivers = Vec::with_capacity(accounts.len());
        for account in &accounts {
            receivers.push(Receiver::connect(&prosody, account).await);
        }
        drop(prosody);
        let _ = online.send(());
        let tasks: Vec<_> = receivers
            .into_iter()
            .map(|mut receiver| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while !tx.is_closed() {
                        if let Some(message) = receiver.next(POLL).await {
                            let at = Instant::now();
                            if tx.send((message.id.unwrap_or_default(), at)).is_err() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            drop(task.await);
        }
    });
}
