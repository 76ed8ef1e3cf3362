//! The relay's memory of the jobs it is delivering and has delivered, so
//! that no copy of a job is sent while it is in flight:
//!
//! - A job being delivered is *claimed*, whatever the job. Another copy of
//!   it (the broker redelivering it after a lost channel while the first
//!   attempt still runs, or a duplicate in the queue) waits for the claim to
//!   end instead of being acked blindly: if the first attempt delivered it,
//!   the copy is a duplicate; if it failed, or an error came back for it
//!   before the server's ack, the copy takes over. A claim ends when it is
//!   dropped, so a panicking attempt releases it too.
//! - An idempotent job's id (posted with an `Idempotency-Key`, or a
//!   notification) is remembered for the idempotency window once delivered
//!   (at most [`CAPACITY`] ids), so a copy that arrives later is acked
//!   without being sent. Other ids are not kept past their claim: at
//!   thousands of jobs a second that memory would be the relay's largest.
//!   Per relay process: another replica, or this one after a restart, does
//!   not know them (the stanza id is the job id, so a client can still drop
//!   the repeat).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use herald_shared::recently::Recently;
use tokio::sync::watch;
use uuid::Uuid;

/// At most this many delivered ids are remembered, whatever the window
/// (about 3 MiB).
pub const CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
pub struct Seen {
    delivered: Recently<Uuid, ()>,
    /// Claims in force; the receiver wakes when its claim ends, and reads
    /// `true` if the job was delivered.
    claims: Mutex<HashMap<Uuid, watch::Receiver<bool>>>,
}

/// What `claim` found.
#[derive(Debug)]
pub enum Claimed<'a> {
    /// Deliver it, then call [`Claim::delivered`] or drop the claim.
    New(Claim<'a>),
    /// Delivered within the window: ack it without sending.
    Delivered,
}

/// The right to deliver one job. Dropping it without
/// [`Claim::delivered`] lets a waiting copy take over.
#[derive(Debug)]
pub struct Claim<'a> {
    seen: &'a Seen,
    id: Uuid,
    /// Dropped with the claim, which wakes the copies waiting for it.
    ended: watch::Sender<bool>,
}

impl Claim<'_> {
    /// The job was delivered: if it is `idempotent`, later copies within the
    /// window are duplicates. Called before the job can bounce after its
    /// ack, since such a bounce forgets it.
    pub fn remember(&self, idempotent: bool) {
        if idempotent {
            self.seen.delivered.insert(self.id, ());
        }
    }

    /// The job was delivered and no bounce came in flight: copies waiting
    /// for this claim are duplicates.
    pub fn delivered(self) {
        self.ended.send_replace(true);
    }

    /// An error came back for the job before the server's ack: it is
    /// forgotten, and a copy waiting for this claim takes over. That copy is
    /// the broker's redelivery after the attempt's channel closed, and the
    /// attempt can then neither retry nor park its job (both need the
    /// channel), so the copy is all that is left of it.
    pub fn bounced(self) {
        self.seen.forget(self.id);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.seen.lock().remove(&self.id);
    }
}

impl Seen {
    pub fn new(window: Duration) -> Self {
        Self { delivered: Recently::new(window, CAPACITY), claims: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Receiver<bool>>> {
        // A panic while holding this lock leaves consistent data behind.
        self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `id` for delivery, waiting first for any claim on it in force.
    /// A `resend` is claimed even if `id` is remembered as delivered; like
    /// any copy it waits for an attempt in flight, and is a duplicate if
    /// that attempt delivers.
    pub async fn claim(&self, id: Uuid, resend: bool) -> Claimed<'_> {
        loop {
            let mut ended = {
                let mut claims = self.lock();
                // Checked under the lock: `Claim::remember` records the id
                // before its drop removes the claim.
                if !resend && self.delivered.get(&id).is_some() {
                    return Claimed::Delivered;
                }
                match claims.get(&id) {
                    Some(ended) => ended.clone(),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        claims.insert(id, rx);
                        return Claimed::New(Claim { seen: self, id, ended: tx });
                    }
                }
            };
            // Err once the sender is dropped: the claim ended.
            while ended.changed().await.is_ok() {}
            if *ended.borrow() {
                return Claimed::Delivered;
            }
        }
    }

    /// Remembers that another relay delivered the idempotent job `id`.
    pub fn remember(&self, id: Uuid) {
        self.delivered.insert(id, ());
    }

    /// Forgets that `id` was delivered (it bounced and was parked or
    /// retried: a replay or a retry must be sent).
    pub fn forget(&self, id: Uuid) {
        self.delivered.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Another copy of job `n`, claimed on a task of its own and started
    /// (it waits if a claim is in force): true if it is a duplicate.
    async fn spawn_copy(seen: &Arc<Seen>, n: u128, resend: bool) -> tokio::task::JoinHandle<bool> {
        let copy = tokio::spawn({
            let seen = Arc::clone(seen);
            async move { matches!(seen.claim(id(n), resend).await, Claimed::Delivered) }
        });
        tokio::task::yield_now().await;
        copy
    }

    #[tokio::test]
    async fn a_copy_waits_for_the_claim_and_is_a_duplicate_if_it_was_delivered() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let Claimed::New(claim) = seen.claim(id(1), false).await else { panic!("first claim") };
        let copy = spawn_copy(&seen, 1, false).await;
        assert!(!copy.is_finished(), "the copy waits while the first attempt runs");
        claim.remember(true);
        claim.delivered();
        assert!(copy.await.expect("task"), "delivered: the copy is a duplicate");
        assert!(matches!(seen.claim(id(1), false).await, Claimed::Delivered), "and so is a later one");
    }

    #[tokio::test]
    async fn a_plain_job_is_a_duplicate_while_claimed_and_forgotten_after() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let Claimed::New(claim) = seen.claim(id(2), false).await else { panic!("first claim") };
        let copy = spawn_copy(&seen, 2, false).await;
        claim.remember(false);
        claim.delivered();
        assert!(copy.await.expect("task"), "the copy that waited is a duplicate");
        assert!(matches!(seen.claim(id(2), false).await, Claimed::New(_)), "a later copy is sent: nothing kept");
    }

    #[tokio::test]
    async fn a_copy_takes_over_a_claim_that_ended_without_delivery() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let Claimed::New(claim) = seen.claim(id(1), false).await else { panic!("first claim") };
        let copy = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                let Claimed::New(claim) = seen.claim(id(1), false).await else { return false };
                claim.remember(true);
                claim.delivered();
                true
            }
        });
        tokio::task::yield_now().await;
        drop(claim);
        assert!(copy.await.expect("task"), "the copy delivers it");
    }

    #[tokio::test]
    async fn a_copy_takes_over_an_attempt_that_bounced_in_flight() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let Claimed::New(claim) = seen.claim(id(1), false).await else { panic!("first claim") };
        let copy = spawn_copy(&seen, 1, false).await;
        claim.remember(true);
        tokio::task::yield_now().await;
        assert!(!copy.is_finished(), "the copy waits while the attempt waits for its ack");
        claim.bounced();
        assert!(!copy.await.expect("task"), "the copy is sent, not acked as a duplicate");
        assert!(matches!(seen.claim(id(1), false).await, Claimed::New(_)), "nor is a later copy a duplicate");
    }

    #[tokio::test]
    async fn a_resend_is_sent_though_remembered_but_is_a_duplicate_of_an_attempt_that_delivers() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let Claimed::New(claim) = seen.claim(id(1), false).await else { panic!("first claim") };
        claim.remember(true);
        claim.delivered();
        assert!(matches!(seen.claim(id(1), false).await, Claimed::Delivered), "an ordinary copy is a duplicate");
        let Claimed::New(claim) = seen.claim(id(1), true).await else { panic!("a resend is sent") };
        let waiting = spawn_copy(&seen, 1, true).await;
        assert!(!waiting.is_finished(), "another copy waits for the resend in flight");
        claim.remember(true);
        claim.delivered();
        assert!(waiting.await.expect("task"), "and is a duplicate once it delivered");
    }

    #[tokio::test]
    async fn a_panicking_attempt_releases_its_claim() {
        let seen = Arc::new(Seen::new(Duration::from_secs(60)));
        let attempt = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                let _claim = seen.claim(id(1), false).await;
                panic!("a bug");
            }
        });
        assert!(attempt.await.is_err());
        assert!(matches!(seen.claim(id(1), false).await, Claimed::New(_)));
    }

    #[tokio::test]
    async fn a_forgotten_id_is_sent_again() {
        let seen = Seen::new(Duration::from_secs(60));
        let Claimed::New(claim) = seen.claim(id(1), false).await else { panic!("first claim") };
        claim.remember(true);
        claim.delivered();
        seen.forget(id(1));
        assert!(matches!(seen.claim(id(1), false).await, Claimed::New(_)));
    }

    #[tokio::test]
    async fn remembers_at_most_capacity() {
        let seen = Seen::new(Duration::from_secs(3600));
        for n in 0..=CAPACITY as u128 {
            let Claimed::New(claim) = seen.claim(id(n), false).await else { panic!("new") };
            claim.remember(true);
            claim.delivered();
        }
        assert!(matches!(seen.claim(id(1), false).await, Claimed::Delivered), "all but the oldest are remembered");
        assert!(matches!(seen.claim(id(0), false).await, Claimed::New(_)), "the oldest was forgotten");
    }
}
