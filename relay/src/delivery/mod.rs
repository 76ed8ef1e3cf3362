//! One job's delivery, without the broker: a job (its bytes and attempt
//! count) in, one [`Settlement`] out. Here live the duplicate memory
//! (`seen`), the retry policy (`retry`) and the matching of error stanzas
//! to the jobs they bounce (`bounces`); the XMPP sessions are below, the
//! broker above.

mod bounces;
pub mod retry;
pub mod seen;

use std::{collections::HashMap, sync::Arc, time::Duration};

use herald_shared::{
    Job, Sender,
    job::now_ms,
    outcomes::{self, Record, writer::Writer},
    telemetry::Repeated,
};
use tokio::sync::{Mutex, mpsc};

use self::{
    bounces::{Bounces, Delivered, Lookup},
    retry::Policy,
    seen::{Claimed, Seen},
};
use crate::{
    error::DeliveryError,
    metrics::{ConditionLabels, Metrics, Outcome},
    xmpp::{self, Account, Bounce, SessionSettings, Sessions},
};

/// What becomes of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delivered (the XMPP server acknowledged it), or a copy of a job
    /// delivered already: ack it.
    Ack,
    /// Try again after `delay`, as attempt number `attempt`.
    Retry { delay: Duration, attempt: u32, reason: String, bounced: bool },
    /// Park it in the dead queue for an operator.
    Park { attempts: u32, reason: String, bounced: bool },
}

impl Settlement {
    /// The same settlement, for a job an error stanza came back for: its
    /// copy is marked (`x-herald-bounced`) so that no relay takes it for a
    /// duplicate of the delivery that failed.
    fn of_bounce(self) -> Self {
        match self {
            Settlement::Retry { delay, attempt, reason, .. } => {
                Settlement::Retry { delay, attempt, reason, bounced: true }
            }
            Settlement::Park { attempts, reason, .. } => Settlement::Park { attempts, reason, bounced: true },
            Settlement::Ack => Settlement::Ack,
        }
    }
}

/// A job as the broker hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub data: &'a [u8],
    /// Attempts before this one (the `x-herald-attempt` header).
    pub attempts: u32,
    /// The AMQP timestamp of the original publish.
    pub timestamp: Option<u64>,
    /// Its id came from an idempotency key (`x-herald-idempotent`): the
    /// relay remembers it once delivered.
    pub idempotent: bool,
    /// A copy of a job whose delivery failed after all (`x-herald-bounced`),
    /// or one an operator replayed (`x-herald-replayed-at`): sent even if
    /// its id is remembered as delivered, whoever's record of the bounce
    /// or the park this relay has missed.
    pub resend: bool,
}

/// A job the XMPP server had acknowledged, then bounced by its recipient
/// (or the recipient's server): its new settlement, to carry out.
#[derive(Debug)]
pub struct Bounced {
    pub id: String,
    pub data: Box<[u8]>,
    pub timestamp: Option<u64>,
    pub settlement: Settlement,
}

/// Settings of the delivery stage.
#[derive(Debug, Clone)]
pub struct Settings {
    pub session: SessionSettings,
    pub policy: Policy,
    pub online_timeout: Duration,
    pub max_stanza_bytes: usize,
    pub idempotency_window: Duration,
}

#[derive(Debug)]
pub struct Delivery {
    sessions: Sessions,
    policy: Policy,
    online_timeout: Duration,
    max_stanza_bytes: usize,
    seen: Seen,
    bounces: Bounces,
    /// Error stanzas from every session.
    bounced: Mutex<mpsc::UnboundedReceiver<Bounce>>,
    metrics: Arc<Metrics>,
    /// Per sender: its retries are logged once per `RETRY_LOG_INTERVAL`.
    retry_logs: std::sync::Mutex<HashMap<Sender, Arc<Repeated>>>,
    /// Where each job's outcome is recorded.
    outcomes: Writer,
}

/// A sender's failed attempts are logged at most once in this interval,
/// with the count.
const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Delivery {
    /// Starts the sessions (see [`Sessions`]); they run until
    /// `close_sessions`.
    pub fn start(accounts: Vec<Account>, settings: Settings, metrics: Arc<Metrics>, outcomes: Writer) -> Self {
        let (bounces_tx, bounced) = mpsc::unbounded_channel();
        let sessions = Sessions::start(accounts, settings.session, bounces_tx, Arc::clone(&metrics));
        Self {
            sessions,
            policy: settings.policy,
            online_timeout: settings.online_timeout,
            max_stanza_bytes: settings.max_stanza_bytes,
            seen: Seen::new(settings.idempotency_window),
            bounces: Bounces::default(),
            bounced: Mutex::new(bounced),
            metrics,
            retry_logs: std::sync::Mutex::default(),
            outcomes,
        }
    }

    /// Learns from another relay's record (or this one's, read back): an
    /// idempotent job delivered is not sent again here; one that bounced
    /// after its delivery (retried or parked) must be, when it comes back.
    pub fn learn(&self, record: &Record) {
        match record {
            Record::Delivered { id, idempotent: true, .. } => self.seen.remember(*id),
            Record::Retrying { id, .. } | Record::Parked { id, .. } => self.seen.forget(*id),
            _ => {}
        }
    }

    /// Records a job's settlement in the outcomes stream.
    fn record(&self, id: uuid::Uuid, settlement: &Settlement) {
        let at_ms = now_ms();
        let record = match settlement {
            Settlement::Ack => return,
            Settlement::Retry { delay, attempt, reason, .. } => Record::Retrying {
                id,
                at_ms,
                attempt: *attempt,
                next_at_ms: at_ms + delay.as_millis() as u64,
                reason: outcomes::reason(reason),
            },
            Settlement::Park { attempts, reason, .. } => {
                Record::Parked { id, at_ms, attempts: *attempts, reason: outcomes::reason(reason) }
            }
        };
        self.outcomes.record(record);
    }

    /// What keeps the open sessions from delivering, one entry per session.
    pub fn problems(&self) -> Vec<String> {
        self.sessions.problems()
    }

    /// Closes the sessions cleanly and waits for them.
    pub async fn close_sessions(&self) {
        self.sessions.close().await;
    }

    /// Delivers one job and says how to settle it.
    pub async fn settle(&self, incoming: Incoming<'_>) -> Settlement {
        let job = match Job::decode(incoming.data) {
            Ok(job) => job,
            Err(e) => {
                let error = DeliveryError::Permanent(format!("cannot decode the job: {e}"));
                return self.policy.after(&error, incoming.attempts, Duration::ZERO);
            }
        };
        let Job::V1(v1) = &job;
        let (id, to, accepted_at_ms) = (v1.id, v1.to.jid().clone(), v1.accepted_at_ms);
        let claim = match self.seen.claim(id, incoming.resend).await {
            Claimed::New(claim) => claim,
            Claimed::Delivered => {
                tracing::debug!(%id, "delivered already; acked without sending it again");
                self.metrics.count(Outcome::Duplicate);
                return Settlement::Ack;
            }
        };
        self.bounces.begin(id, to.clone());
        let outcome = match self.deliver(&job).await {
            Ok(()) => {
                // Recorded and remembered before the job is registered for
                // bounces: a bounce that finds it registered forgets it and
                // records its retry or park after this, in this order, here
                // and in every relay that reads the stream.
                self.outcomes.record(Record::Delivered {
                    id,
                    at_ms: now_ms(),
                    attempts: incoming.attempts.saturating_add(1),
                    idempotent: incoming.idempotent,
                });
                claim.remember(incoming.idempotent);
                let record = Delivered {
                    to,
                    data: incoming.data.into(),
                    attempts: incoming.attempts,
                    timestamp: incoming.timestamp,
                };
                match self.bounces.delivered(id, record) {
                    None => {
                        claim.delivered();
                        Ok(())
                    }
                    Some(bounce) => {
                        // Not a delivery: a copy waiting for the claim (the
                        // broker's redelivery after this attempt's channel
                        // closed) must be sent, not acked as a duplicate,
                        // or the job would be lost with the channel.
                        claim.bounced();
                        Err((bounce_error(&bounce), true))
                    }
                }
            }
            Err(e) => {
                self.bounces.forget(id);
                // A copy waiting for this claim may take over from here.
                drop(claim);
                Err((e, false))
            }
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(%id, "delivered");
                self.metrics.count(Outcome::Delivered);
                let millis = now_ms().saturating_sub(accepted_at_ms);
                self.metrics.delivery_latency.observe(millis as f64 / 1000.0);
                Settlement::Ack
            }
            Err((error, bounced)) => {
                let age = Duration::from_millis(now_ms().saturating_sub(accepted_at_ms));
                let settlement = self.policy.after(&error, incoming.attempts, age);
                let settlement = if bounced { settlement.of_bounce() } else { settlement };
                if let Settlement::Retry { attempt, .. } = &settlement {
                    self.log_retry(job.sender(), *attempt, &error);
                }
                self.record(id, &settlement);
                settlement
            }
        }
    }

    /// One line per sender per `RETRY_LOG_INTERVAL`, with how many of its
    /// attempts failed since the last line and the latest reason.
    fn log_retry(&self, sender: &Sender, attempt: u32, error: &DeliveryError) {
        let repeated = {
            let mut logs = self.retry_logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if logs.len() > 4096 {
                logs.clear();
            }
            Arc::clone(logs.entry(sender.clone()).or_insert_with(|| Arc::new(Repeated::new(RETRY_LOG_INTERVAL))))
        };
        if let Some(failed) = repeated.tick() {
            tracing::info!(%sender, failed, attempt, %error, "deliveries failed; retrying (one line per sender every 10 s at most)");
        }
    }

    async fn deliver(&self, job: &Job) -> Result<(), DeliveryError> {
        if !self.sessions.holds(job.sender()) {
            return Err(DeliveryError::NoAccount(format!(
                "this relay holds no XMPP account for sender {}",
                job.sender()
            )));
        }
        let size = job.xml_size();
        if size > self.max_stanza_bytes {
            return Err(DeliveryError::Permanent(format!(
                "the message would be up to {size} bytes of XML, over the XMPP server's stanza limit (HERALD_MAX_STANZA_BYTES = {})",
                self.max_stanza_bytes
            )));
        }
        self.sessions.deliver(job.sender(), || Box::new(xmpp::stanza::message(job)), self.online_timeout).await
    }

    /// The next job that bounced after the server had acknowledged it, with
    /// its new settlement. Bounces for jobs still in flight are handed to
    /// their attempt; bounces from anyone but the recipient are ignored.
    /// `None` once every session has ended.
    pub async fn next_bounced(&self) -> Option<Bounced> {
        let mut bounced = self.bounced.lock().await;
        loop {
            let bounce = bounced.recv().await?;
            self.metrics.bounces.get_or_create(&ConditionLabels { condition: bounce.condition.clone() }).inc();
            let job = match self.bounces.bounced(&bounce) {
                Lookup::Delivered(job) => job,
                // `settle` sees it when the ack arrives.
                Lookup::InFlight => continue,
                Lookup::NotFromRecipient => {
                    self.metrics.bounces_ignored.inc();
                    tracing::info!(id = %bounce.id, from = %bounce.from, condition = %bounce.condition, "an error for a message from someone other than its recipient; ignored");
                    continue;
                }
                Lookup::Unknown => {
                    self.metrics.bounces_ignored.inc();
                    tracing::info!(id = %bounce.id, condition = %bounce.condition, "an error for a message this relay does not remember; ignored");
                    continue;
                }
            };
            let settlement = self.policy.after(&bounce_error(&bounce), job.attempts, Duration::ZERO).of_bounce();
            if let Ok(id) = uuid::Uuid::parse_str(&bounce.id) {
                self.seen.forget(id);
                self.record(id, &settlement);
            }
            return Some(Bounced { id: bounce.id, data: job.data, timestamp: job.timestamp, settlement });
        }
    }
}

/// A bounce as a delivery failure: `wait` errors are retried, the rest parked.
fn bounce_error(bounce: &Bounce) -> DeliveryError {
    let reason = format!("bounced: {} ({}) from {}", bounce.condition, bounce.kind, bounce.from);
    if bounce.is_transient() { DeliveryError::Transient(reason) } else { DeliveryError::Permanent(reason) }
}
