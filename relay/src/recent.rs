//! Jobs recently handed to the XMPP server, kept for a while so that an
//! error stanza bounced back after the server acknowledged the message can
//! still park (or retry) the job it belongs to.
//!
//! A bounce can arrive before the ack that settles the job, or after it, so
//! each id is tracked from the moment its stanza is sent.

use crate::session::Bounce;
use lapin::BasicProperties;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// How many settled jobs are remembered. A bounce from the local server
/// follows its message within milliseconds, one through s2s within
/// seconds; this covers many seconds at thousands of jobs a second.
pub const CAPACITY: usize = 16 * 1024;

/// A job that was delivered and then bounced: what is needed to republish it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
}

#[derive(Debug)]
enum Slot {
    InFlight { bounce: Option<Bounce> },
    Delivered(Box<Delivered>),
}

#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<String, Slot>,
    /// Settled ids, oldest first, to forget beyond `CAPACITY`.
    order: VecDeque<String>,
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data behind.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stanza for `id` is about to be sent.
    pub fn begin(&self, id: &str) {
        self.lock().slots.insert(id.to_owned(), Slot::InFlight { bounce: None });
    }

    /// The attempt failed: nothing to remember.
    pub fn forget(&self, id: &str) {
        self.lock().slots.remove(id);
    }

    /// The server acknowledged the stanza. Returns the bounce that already
    /// arrived for it, if any; otherwise remembers the job for later ones.
    pub fn delivered(&self, id: &str, job: Delivered) -> Option<Bounce> {
        let mut inner = self.lock();
        if let Some(Slot::InFlight { bounce: Some(bounce) }) = inner.slots.remove(id) {
            return Some(bounce);
        }
        inner.slots.insert(id.to_owned(), Slot::Delivered(Box::new(job)));
        inner.order.push_back(id.to_owned());
        while inner.order.len() > CAPACITY {
            if let Some(old) = inner.order.pop_front()
                && matches!(inner.slots.get(&old), Some(Slot::Delivered(_)))
            {
                inner.slots.remove(&old);
            }
        }
        None
    }

    /// A bounce arrived. Returns the job if it was already settled (the
    /// caller parks or retries it); records the bounce if the job is still
    /// in flight; returns `None` for ids it does not know.
    pub fn bounced(&self, bounce: &Bounce) -> Lookup {
        let mut inner = self.lock();
        match inner.slots.get_mut(&bounce.id) {
            Some(Slot::InFlight { bounce: slot }) => {
                *slot = Some(bounce.clone());
                Lookup::InFlight
            }
            Some(Slot::Delivered(_)) => match inner.slots.remove(&bounce.id) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounce(id: &str) -> Bounce {
        Bounce { id: id.into(), condition: "service-unavailable".into(), kind: "cancel".into(), from: "x@y".into() }
    }

    fn job() -> Delivered {
        Delivered { data: b"{}".to_vec(), properties: BasicProperties::default() }
    }

    #[test]
    fn a_bounce_before_the_ack_is_handed_to_the_ack() {
        let recent = Recent::default();
        recent.begin("a");
        assert!(matches!(recent.bounced(&bounce("a")), Lookup::InFlight));
        assert_eq!(recent.delivered("a", job()), Some(bounce("a")));
        assert!(matches!(recent.bounced(&bounce("a")), Lookup::Unknown));
    }

    #[test]
    fn a_bounce_after_the_ack_returns_the_job_once() {
        let recent = Recent::default();
        recent.begin("a");
        assert_eq!(recent.delivered("a", job()), None);
        assert!(matches!(recent.bounced(&bounce("a")), Lookup::Delivered(_)));
        assert!(matches!(recent.bounced(&bounce("a")), Lookup::Unknown));
    }

    #[test]
    fn old_jobs_are_forgotten() {
        let recent = Recent::default();
        for i in 0..=CAPACITY {
            recent.begin(&i.to_string());
            recent.delivered(&i.to_string(), job());
        }
        assert!(matches!(recent.bounced(&bounce("0")), Lookup::Unknown));
        assert!(matches!(recent.bounced(&bounce("1")), Lookup::Delivered(_)));
        assert!(matches!(recent.bounced(&bounce("nope")), Lookup::Unknown));
    }
}
