//! The bounded stage in front of argon2: at most `slots` uncached password
//! checks run at once, at most `max_waiting` wait for a slot, and none waits
//! longer than `max_wait`. A check that cannot get a slot in time is turned
//! away with 503 and `Retry-After` (a client retries that), so a flood of
//! guesses can neither queue without bound nor take every core: cached
//! logins never come here and keep being served.
//!
//! Accounts under pressure (many recent failures, see `throttle`) also
//! share one narrow lane: a guesser spread over many addresses gets one
//! check at a time for all such accounts together, and the rest of the
//! budget stays with everyone else.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    pressured: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
}

/// The right to run one check; held until the check ends.
#[derive(Debug)]
pub struct Slot {
    _slot: OwnedSemaphorePermit,
    _lane: Option<OwnedSemaphorePermit>,
}

/// No slot within the deadline, or too many waiting already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Counts a waiter for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(slots: usize, max_waiting: usize, max_wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            pressured: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
        }
    }

    /// How many checks may run at once.
    pub fn slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// How long a turned-away client should wait before retrying.
    pub fn retry_after(&self) -> Duration {
        self.max_wait.max(Duration::from_secs(1))
    }

    /// Waits for a slot (and, for an account under pressure, the narrow
    /// lane first), within the bounds.
    pub async fn admit(&self, pressured: bool) -> Result<Slot, Full> {
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            return Err(Full);
        }
        let acquire = async {
            let lane = match pressured {
                true => Some(Arc::clone(&self.pressured).acquire_owned().await.map_err(|_| Full)?),
                false => None,
            };
            let slot = Arc::clone(&self.slots).acquire_owned().await.map_err(|_| Full)?;
            Ok(Slot { _slot: slot, _lane: lane })
        };
        let slot = tokio::time::timeout(self.max_wait, acquire).await.unwrap_or(Err(Full));
        drop(waiting);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounds_the_checks_the_waiters_and_the_wait() {
        let admission = Arc::new(Admission::new(2, 3, Duration::from_secs(2)));
        let running = [admission.admit(false).await.expect("slot"), admission.admit(false).await.expect("slot")];
        // Three may wait; a fourth is turned away at once.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let admission = Arc::clone(&admission);
                tokio::spawn(async move { admission.admit(false).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(admission.admit(false).await.err(), Some(Full), "the queue is full");
        // A slot frees: one waiter gets it; the others time out.
        drop(running);
        let mut admitted = 0;
        for waiter in waiters {
            if waiter.await.expect("task").is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "two slots freed, and the third came free when the first finished");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_the_deadline() {
        let admission = Admission::new(1, 10, Duration::from_secs(2));
        let _running = admission.admit(false).await.expect("slot");
        assert_eq!(admission.admit(false).await.err(), Some(Full));
        assert_eq!(admission.waiting.load(Ordering::Relaxed), 0, "the waiter is no longer counted");
    }

    #[tokio::test(start_paused = true)]
    async fn accounts_under_pressure_share_one_lane() {
        let admission = Admission::new(4, 10, Duration::from_secs(2));
        let _pressured = admission.admit(true).await.expect("the lane");
        assert_eq!(admission.admit(true).await.err(), Some(Full), "a second pressured check waits for the lane");
        let _others = admission.admit(false).await.expect("others still get slots");
    }
}
