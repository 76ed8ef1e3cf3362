//! Ids of idempotent jobs (`x-herald-idempotent`) this relay delivered
//! within the idempotency window: a job with such an id is acked without
//! being sent again. Per relay process: another replica, or this one after
//! a restart, does not know them (the stanza id is the same, so a client
//! can still drop the repeat).

use herald_shared::recently::Recently;
use std::time::Duration;
use uuid::Uuid;

/// At most this many ids are remembered, whatever the window (about 3 MiB).
pub const CAPACITY: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Delivering,
    Delivered,
}

#[derive(Debug)]
pub struct Seen(Recently<Uuid, State>);

impl Seen {
    pub fn new(window: Duration) -> Self {
        Self(Recently::new(window, CAPACITY))
    }

    /// True if the caller should deliver `id`: it is neither being
    /// delivered nor delivered within the window. Every `true` must be
    /// followed by [`Seen::delivered`] or [`Seen::release`].
    ///
    /// A copy refused here while another is in flight is safe to ack: the
    /// copy in flight is delivered, retried or parked like any job.
    pub fn claim(&self, id: Uuid) -> bool {
        self.0.insert_new(id, State::Delivering)
    }

    /// The claimed `id` was delivered now.
    pub fn delivered(&self, id: Uuid) {
        self.0.insert(id, State::Delivered);
    }

    /// The claimed `id` was not delivered (retried or parked instead).
    pub fn release(&self, id: Uuid) {
        if self.0.get(&id) == Some(State::Delivering) {
            self.0.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_and_none_within_the_window() {
        let seen = Seen::new(Duration::from_millis(50));
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(seen.claim(a));
        assert!(!seen.claim(a), "in flight");
        seen.release(a);
        assert!(seen.claim(a), "released after a failure");
        seen.delivered(a);
        assert!(!seen.claim(a), "delivered within the window");
        assert!(seen.claim(b));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !seen.claim(a) {
            assert!(std::time::Instant::now() < deadline, "forgotten after the window");
            std::thread::yield_now();
        }
    }

    #[test]
    fn remembers_at_most_capacity() {
        let seen = Seen::new(Duration::from_secs(3600));
        for n in 0..=CAPACITY as u128 {
            assert!(seen.claim(Uuid::from_u128(n)));
            seen.delivered(Uuid::from_u128(n));
        }
        assert!(!seen.claim(Uuid::from_u128(1)), "all but the oldest are remembered");
        assert!(!seen.claim(Uuid::from_u128(CAPACITY as u128)));
        assert!(seen.claim(Uuid::from_u128(0)), "the oldest was forgotten");
    }
}
