//! Jobs recently handed to the XMPP server, kept for a while so that an
//! error stanza bounced back after the server acknowledged the message can
//! still park (or retry) the job it belongs to.
//!
//! A bounce can arrive before the ack that settles the job, or after it, so
//! each id is tracked from the moment its stanza is sent.
//!
//! A bounce is believed only from the job's recipient: the JID the message
//! was sent to, exactly (an error from a bare JID is the recipient's server
//! answering for it; one from a full JID the message was not sent to is a
//! client that received it), or the recipient's domain (its server). Anyone
//! else who sends an error with a job's id changes nothing.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use tokio_xmpp::parsers::jid::Jid;
use uuid::Uuid;

use crate::xmpp::Bounce;

/// How many settled jobs are remembered. A bounce from the local server
/// follows its message within milliseconds, one through s2s within
/// seconds; this covers many seconds at thousands of jobs a second, in
/// about 10 MiB (an entry holds the job's bytes and little else).
pub const CAPACITY: usize = 16 * 1024;
/// And at most this many bytes of jobs, whatever their size: 16,384 bodies
/// of 64 KiB would be a gigabyte.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// A job that was delivered and then bounced: what is needed to republish it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Where the message went.
    pub to: Jid,
    pub data: Box<[u8]>,
    /// Delivery attempts before this one.
    pub attempts: u32,
    /// The AMQP timestamp of the original publish.
    pub timestamp: Option<u64>,
}

#[derive(Debug)]
enum Slot {
    InFlight { to: Jid, bounce: Option<Box<Bounce>> },
    Delivered(Box<Delivered>),
}

#[derive(Debug, Default)]
pub struct Bounces {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Uuid, Slot>,
    /// Settled ids, oldest first, to forget beyond `CAPACITY` or `MAX_BYTES`.
    order: VecDeque<Uuid>,
    /// The bytes of the jobs in `Delivered` slots.
    bytes: usize,
}

impl Inner {
    /// Removes `id`'s slot, keeping `bytes` true.
    fn remove(&mut self, id: &Uuid) -> Option<Slot> {
        let slot = self.slots.remove(id);
        if let Some(Slot::Delivered(job)) = &slot {
            self.bytes -= job.data.len();
        }
        slot
    }

    fn insert(&mut self, id: Uuid, slot: Slot) {
        if let Slot::Delivered(job) = &slot {
            self.bytes += job.data.len();
        }
        if let Some(Slot::Delivered(old)) = self.slots.insert(id, slot) {
            self.bytes -= old.data.len();
        }
    }
}

impl Bounces {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data behind.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stanza for `id` is about to be sent.
    pub fn begin(&self, id: Uuid, to: Jid) {
        self.lock().insert(id, Slot::InFlight { to, bounce: None });
    }

    /// The attempt failed: nothing to remember.
    pub fn forget(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    /// The server acknowledged the stanza. Returns the bounce that already
    /// arrived for it, if any; otherwise remembers the job for later ones.
    pub fn delivered(&self, id: Uuid, job: Delivered) -> Option<Bounce> {
        let mut inner = self.lock();
        if let Some(Slot::InFlight { bounce: Some(bounce), .. }) = inner.remove(&id) {
            return Some(*bounce);
        }
        inner.insert(id, Slot::Delivered(Box::new(job)));
        inner.order.push_back(id);
        while inner.order.len() > CAPACITY || inner.bytes > MAX_BYTES {
            let Some(old) = inner.order.pop_front() else { break };
            if matches!(inner.slots.get(&old), Some(Slot::Delivered(_))) {
                inner.remove(&old);
            }
        }
        None
    }

    /// A bounce arrived. Returns the job if it was already settled (the
    /// caller parks or retries it); records the bounce if the job is still
    /// in flight; `Unknown` for ids it does not know (or that are not job
    /// ids at all); `NotFromRecipient` for a bounce from anyone but the
    /// job's recipient, which changes nothing.
    pub fn bounced(&self, bounce: &Bounce) -> Lookup {
        let Ok(id) = Uuid::parse_str(&bounce.id) else { return Lookup::Unknown };
        let mut inner = self.lock();
        let to = match inner.slots.get(&id) {
            Some(Slot::InFlight { to, .. }) => to,
            Some(Slot::Delivered(job)) => &job.to,
            None => return Lookup::Unknown,
        };
        if !from_recipient(&bounce.from, to) {
            return Lookup::NotFromRecipient;
        }
        match inner.slots.get_mut(&id) {
            Some(Slot::InFlight { bounce: slot, .. }) => {
                *slot = Some(Box::new(bounce.clone()));
                Lookup::InFlight
            }
            Some(Slot::Delivered(_)) => match inner.remove(&id) {
                Some(Slot::Delivered(job)) => Lookup::Delivered(job),
                _ => Lookup::Unknown,
            },
            None => Lookup::Unknown,
        }
    }
}

#[derive(Debug)]
pub enum Lookup {
    Delivered(Box<Delivered>),
    InFlight,
    Unknown,
    NotFromRecipient,
}

/// Whether an error from `from` can speak for a message sent to `to`: it
/// comes from `to` itself or from `to`'s server.
fn from_recipient(from: &str, to: &Jid) -> bool {
    let Ok(from) = Jid::new(from) else { return false };
    from == *to || (from.node().is_none() && from.resource().is_none() && from.domain() == to.domain())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n + 1)
    }

    fn bounce(n: u128) -> Bounce {
        Bounce {
            id: id(n).to_string(),
            condition: "service-unavailable".into(),
            kind: "cancel".into(),
            from: "x@y".into(),
        }
    }

    fn to() -> Jid {
        Jid::new("x@y").expect("jid")
    }

    fn job() -> Delivered {
        Delivered { to: to(), data: b"{}".to_vec().into(), attempts: 0, timestamp: None }
    }

    #[test]
    fn only_the_recipient_or_its_server_can_bounce() {
        let recent = Bounces::default();
        recent.begin(id(0), to());
        assert_eq!(recent.delivered(id(0), job()), None);
        for forged in ["x@y/phone", "z@y", "x@other", "other", ""] {
            let bounce = Bounce { from: forged.into(), ..bounce(0) };
            assert!(matches!(recent.bounced(&bounce), Lookup::NotFromRecipient), "{forged}");
        }
        let from_server = Bounce { from: "y".into(), ..bounce(0) };
        assert!(matches!(recent.bounced(&from_server), Lookup::Delivered(_)));
        recent.begin(id(1), Jid::new("x@y/desk").expect("jid"));
        let from_full = Bounce { from: "x@y/desk".into(), ..bounce(1) };
        assert!(matches!(recent.bounced(&from_full), Lookup::InFlight), "sent to a full JID: its error counts");
    }

    #[test]
    fn a_bounce_before_the_ack_is_handed_to_the_ack() {
        let recent = Bounces::default();
        recent.begin(id(0), to());
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::InFlight));
        assert_eq!(recent.delivered(id(0), job()), Some(bounce(0)));
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::Unknown));
    }

    #[test]
    fn a_bounce_after_the_ack_returns_the_job_once() {
        let recent = Bounces::default();
        recent.begin(id(0), to());
        assert_eq!(recent.delivered(id(0), job()), None);
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::Delivered(_)));
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::Unknown));
    }

    #[test]
    fn large_jobs_are_forgotten_by_size() {
        let recent = Bounces::default();
        let big = || Delivered { to: to(), data: vec![b'x'; 1024 * 1024].into(), attempts: 0, timestamp: None };
        for i in 0..40 {
            recent.begin(id(i), to());
            recent.delivered(id(i), big());
        }
        assert!(recent.lock().bytes <= MAX_BYTES);
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::Unknown), "the oldest went first");
        assert!(matches!(recent.bounced(&bounce(39)), Lookup::Delivered(_)));
        assert_eq!(recent.lock().bytes, 15 * 1024 * 1024, "16 MiB were kept; one was taken by its bounce");
    }

    #[test]
    fn old_jobs_are_forgotten() {
        let recent = Bounces::default();
        for i in 0..=CAPACITY as u128 {
            recent.begin(id(i), to());
            recent.delivered(id(i), job());
        }
        assert!(matches!(recent.bounced(&bounce(0)), Lookup::Unknown));
        assert!(matches!(recent.bounced(&bounce(1)), Lookup::Delivered(_)));
        assert!(matches!(recent.bounced(&bounce(CAPACITY as u128 + 1)), Lookup::Unknown));
        let not_a_job = Bounce { id: "not-a-uuid".into(), ..bounce(1) };
        assert!(matches!(recent.bounced(&not_a_job), Lookup::Unknown));
    }
}
