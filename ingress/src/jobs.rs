//! What the ingress knows of recent jobs, from the outcomes stream (and its
//! own acceptances at once): the answer to `GET /jobs/{id}` and to "was
//! this idempotency key taken?", the same on every replica.
//!
//! Bounded: a job is forgotten `window` after its last record, and the
//! oldest go first beyond `capacity`.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use herald_shared::{Sender, job::now_ms, outcomes::Record, recently::Recently};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug)]
pub struct Jobs {
    entries: Recently<Uuid, Entry>,
    /// One copy of each owner and recipient JID: a few users send to a few
    /// recipients, tens of thousands of times.
    names: Mutex<HashSet<Arc<str>>>,
}

/// Distinct JIDs kept for sharing, at most; past it the set starts over
/// (entries keep their copies).
const NAMES: usize = 16 * 1024;

/// One job, kept small: there are tens of thousands.
#[derive(Debug)]
struct Entry {
    /// Missing while only the relay's record has arrived (the stream
    /// carries both services' records, in the order each wrote them).
    accepted: Option<Accepted>,
    state: State,
    /// When `state` was recorded; a record older than it is stale.
    updated_ms: u64,
}

#[derive(Debug)]
struct Accepted {
    owner: Arc<str>,
    to: Arc<str>,
    at_ms: u64,
    idempotent: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Queued,
    Retrying { attempt: u32, next_at_ms: u64, reason: Box<str> },
    Delivered { attempts: u32 },
    Parked { attempts: u32, reason: Box<str> },
}

/// The answer to `GET /jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub id: Uuid,
    pub to: String,
    /// `queued`, `retrying`, `delivered` or `parked`.
    pub status: &'static str,
    pub accepted_at: String,
    /// When the status was recorded: for `delivered`, when the XMPP server
    /// acknowledged the message.
    pub updated_at: String,
    /// Delivery attempts so far (0 while queued).
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

impl Jobs {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { entries: Recently::new(window, capacity), names: Mutex::default() }
    }

    fn shared(&self, name: &str) -> Arc<str> {
        let mut names = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(name) = names.get(name) {
            return Arc::clone(name);
        }
        if names.len() >= NAMES {
            names.clear();
        }
        let name: Arc<str> = name.into();
        names.insert(Arc::clone(&name));
        name
    }

    /// Takes in one record from the stream (or this replica's own).
    pub fn apply(&self, record: Record) {
        let Some(id) = record.id() else { return };
        let names = match &record {
            Record::Accepted { owner, to, .. } => Some((self.shared(owner), self.shared(to))),
            _ => None,
        };
        self.entries.update(id, |old| {
            let mut entry = old.unwrap_or(Entry { accepted: None, state: State::Queued, updated_ms: 0 });
            let (state, at_ms) = match record {
                Record::Accepted { at_ms, idempotent, .. } => {
                    if let Some((owner, to)) = names {
                        entry.accepted = Some(Accepted { owner, to, at_ms, idempotent });
                    }
                    entry.updated_ms = entry.updated_ms.max(at_ms);
                    return entry;
                }
                Record::Delivered { at_ms, attempts, .. } => (State::Delivered { attempts }, at_ms),
                Record::Retrying { at_ms, attempt, next_at_ms, reason, .. } => {
                    (State::Retrying { attempt, next_at_ms, reason: reason.into() }, at_ms)
                }
                Record::Parked { at_ms, attempts, reason, .. } => {
                    (State::Parked { attempts, reason: reason.into() }, at_ms)
                }
                Record::Unknown => return entry,
            };
            // Two relays' clocks, or a bounce after the delivery: the later
            // record wins, and of two at the same millisecond the one read last.
            if at_ms >= entry.updated_ms || entry.state == State::Queued {
                entry.state = state;
                entry.updated_ms = entry.updated_ms.max(at_ms);
            }
            entry
        });
    }

    /// The status of `owner`'s job `id`; `None` for an unknown job and for
    /// another user's (the same answer, so ids cannot be probed).
    pub fn status(&self, id: Uuid, owner: &Sender) -> Option<Status> {
        self.entries.with(&id, |entry| {
            let accepted = entry.accepted.as_ref().filter(|a| *a.owner == *owner.jid().as_str())?;
            let (status, attempts, reason, next) = match &entry.state {
                State::Queued => ("queued", 0, None, None),
                State::Retrying { attempt, next_at_ms, reason } => {
                    ("retrying", *attempt, Some(reason.to_string()), Some(*next_at_ms))
                }
                State::Delivered { attempts } => ("delivered", *attempts, None, None),
                State::Parked { attempts, reason } => ("parked", *attempts, Some(reason.to_string()), None),
            };
            Some(Status {
                id,
                to: accepted.to.to_string(),
                status,
                accepted_at: rfc3339(accepted.at_ms),
                updated_at: rfc3339(entry.updated_ms.max(accepted.at_ms)),
                attempts,
                reason,
                next_attempt_at: next.map(rfc3339),
            })
        })?
    }

    /// Whether `owner` had job `id` accepted under an idempotency key within
    /// `window` (a repeat of that request must not queue it again).
    pub fn accepted_idempotent(&self, id: Uuid, owner: &Sender, window: Duration) -> bool {
        let since = now_ms().saturating_sub(window.as_millis() as u64);
        let owner = owner.jid().as_str();
        self.entries
            .with(&id, |entry| {
                entry.accepted.as_ref().is_some_and(|a| a.idempotent && *a.owner == *owner && a.at_ms >= since)
            })
            .unwrap_or(false)
            && !window.is_zero()
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(id: u128, owner: &Sender, idempotent: bool) -> Record {
        let (owner, to) = (owner.to_string(), format!("ops@{}", owner.domain()));
        Record::Accepted { id: Uuid::from_u128(id), owner, to, at_ms: now_ms(), idempotent }
    }

    #[test]
    fn a_job_goes_from_queued_to_its_latest_outcome_and_only_its_owner_sees_it() {
        let jobs = Jobs::new(Duration::from_secs(3600), 100);
        let (alice, bob) = (Sender::parse("alice@x").expect("jid"), Sender::parse("bob@x").expect("jid"));
        let id = Uuid::from_u128(1);
        jobs.apply(accepted(1, &alice, false));
        assert_eq!(jobs.status(id, &alice).expect("known").status, "queued");
        assert_eq!(jobs.status(id, &bob), None, "another user's job is unknown to bob");
        let t = now_ms();
        jobs.apply(Record::Retrying { id, at_ms: t + 1, attempt: 1, next_at_ms: t + 5000, reason: "timeout".into() });
        let status = jobs.status(id, &alice).expect("known");
        assert_eq!((status.status, status.attempts, status.reason.as_deref()), ("retrying", 1, Some("timeout")));
        assert!(status.next_attempt_at.is_some());
        jobs.apply(Record::Delivered { id, at_ms: t + 6000, attempts: 2, idempotent: false });
        // A stale record (another relay's, read late) changes nothing.
        jobs.apply(Record::Retrying { id, at_ms: t + 2, attempt: 1, next_at_ms: t, reason: "late".into() });
        let status = jobs.status(id, &alice).expect("known");
        assert_eq!((status.status, status.attempts), ("delivered", 2));
        // A bounce after the delivery is later, so it wins.
        jobs.apply(Record::Parked { id, at_ms: t + 7000, attempts: 2, reason: "bounced".into() });
        assert_eq!(jobs.status(id, &alice).expect("known").status, "parked");
    }

    #[test]
    fn an_outcome_read_before_its_acceptance_is_kept() {
        let jobs = Jobs::new(Duration::from_secs(3600), 100);
        let alice = Sender::parse("alice@x").expect("jid");
        let id = Uuid::from_u128(2);
        jobs.apply(Record::Delivered { id, at_ms: now_ms(), attempts: 1, idempotent: true });
        assert_eq!(jobs.status(id, &alice), None, "no owner yet");
        jobs.apply(accepted(2, &alice, true));
        assert_eq!(jobs.status(id, &alice).expect("known").status, "delivered");
    }

    #[test]
    fn idempotent_acceptances_count_within_the_window_for_their_owner() {
        let jobs = Jobs::new(Duration::from_secs(3600), 100);
        let (alice, bob) = (Sender::parse("alice@x").expect("jid"), Sender::parse("bob@x").expect("jid"));
        jobs.apply(accepted(3, &alice, true));
        jobs.apply(accepted(4, &alice, false));
        let hour = Duration::from_secs(3600);
        assert!(jobs.accepted_idempotent(Uuid::from_u128(3), &alice, hour));
        assert!(!jobs.accepted_idempotent(Uuid::from_u128(3), &bob, hour));
        assert!(!jobs.accepted_idempotent(Uuid::from_u128(4), &alice, hour), "not under a key");
        assert!(!jobs.accepted_idempotent(Uuid::from_u128(3), &alice, Duration::ZERO));
        assert!(!jobs.accepted_idempotent(Uuid::from_u128(5), &alice, hour));
    }
}
