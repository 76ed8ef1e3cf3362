//! Acknowledging the deliveries of one channel in batches.
//!
//! Jobs finish out of order, and each finished job used to cost the broker
//! one `basic.ack` (for a quorum queue, one settle command in its Raft log).
//! Here a finished job only marks its delivery tag; a flusher task acks,
//! with `multiple`, everything up to the highest tag below which every
//! delivery is finished. The server's XEP-0198 acks cover many stanzas at
//! once, so one AMQP ack usually covers many jobs too, and no job is acked
//! before it is finished: a tag is acked only once it and every tag before
//! it were marked.
//!
//! Requeues are sent at once, one by one, and mark the tag only after the
//! broker took the nack, so a batch ack never covers a job that is still
//! to be given back. A requeued tag is no longer the broker's to ack: a
//! batch ack names the highest finished tag that was not requeued (acking a
//! tag the broker no longer holds, even with `multiple`, is "unknown
//! delivery tag", which closes the channel and redelivers everything
//! unacked on it).

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;
use std::sync::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Acks {
    channel: Channel,
    finished: Mutex<Finished>,
    advanced: Notify,
}

/// Delivery tags on a channel are consecutive from 1 (one consumer, no
/// `basic.get`), so "everything up to `through`" needs no list of tags.
#[derive(Debug, Default)]
struct Finished {
    /// Every tag up to and including this one is finished.
    through: u64,
    /// Finished tags above `through`.
    ahead: BTreeSet<u64>,
    /// Requeued tags above `settled`.
    requeued: BTreeSet<u64>,
    /// Every tag up to and including this one was acked or requeued.
    settled: u64,
}

impl Finished {
    /// Marks `tag`, given back to the queue; true if `through` moved.
    fn mark_requeued(&mut self, tag: u64) -> bool {
        self.requeued.insert(tag);
        self.mark(tag)
    }

    /// The tag to ack with `multiple` to settle everything finished: the
    /// highest finished tag above `settled` that was not requeued, if any.
    /// Every tag above `settled` and below it that was not requeued is still
    /// held by the broker, and is covered by that ack.
    fn settle(&mut self) -> Option<u64> {
        let tag = (self.settled + 1..=self.through).rev().find(|tag| !self.requeued.contains(tag));
        self.requeued.retain(|t| *t > self.through);
        self.settled = self.through;
        tag
    }

    /// Marks `tag`; true if `through` moved.
    fn mark(&mut self, tag: u64) -> bool {
        if tag <= self.through {
            return false;
        }
        self.ahead.insert(tag);
        let before = self.through;
        while self.ahead.remove(&(self.through + 1)) {
            self.through += 1;
        }
        self.through != before
    }
}

impl Acks {
    pub fn new(channel: Channel) -> Self {
        Self { channel, finished: Mutex::new(Finished::default()), advanced: Notify::new() }
    }

    /// Whether the channel (and so every unsettled delivery on it) is still
    /// there; once it is closed the broker has given its deliveries back.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// The job of delivery `tag` was handed on (delivered, retried or
    /// parked): it may be acked.
    pub fn finished(&self, tag: u64) {
        self.update(|finished| finished.mark(tag));
    }

    /// Applies `change` to the marks, and wakes the flusher if `through` moved.
    fn update(&self, change: impl FnOnce(&mut Finished) -> bool) {
        // A panic while holding this lock leaves consistent data behind.
        let advanced = change(&mut self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if advanced {
            self.advanced.notify_one();
        }
    }

    /// Gives delivery `tag` back to the work queue now.
    pub async fn requeue(&self, tag: u64) -> Result<(), lapin::Error> {
        self.channel.basic_nack(tag, BasicNackOptions { requeue: true, multiple: false }).await?;
        self.update(|finished| finished.mark_requeued(tag));
        Ok(())
    }

    /// Acks what finished, as it finishes, until `stop` is cancelled; then
    /// acks what finished by then and returns. Only this task sends acks,
    /// so no tag is ever acked twice (which the broker answers by closing
    /// the channel).
    pub async fn run(&self, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                () = self.advanced.notified() => false,
                () = stop.cancelled() => true,
            };
            let tag = self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner).settle();
            if let Some(tag) = tag
                && let Err(e) = self.channel.basic_ack(tag, BasicAckOptions { multiple: true }).await
            {
                tracing::warn!(error = %e, "cannot ack deliveries; the broker will redeliver them");
                return;
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Finished;

    #[test]
    fn acks_only_behind_the_first_unfinished_tag() {
        let mut finished = Finished::default();
        assert!(!finished.mark(2), "1 is still out");
        assert!(!finished.mark(4));
        assert_eq!(finished.through, 0);
        assert!(finished.mark(1));
        assert_eq!(finished.through, 2, "3 is still out");
        assert!(finished.mark(3));
        assert_eq!(finished.through, 4);
        assert!(finished.ahead.is_empty());
        assert!(!finished.mark(3), "a tag marked twice changes nothing");
        assert_eq!(finished.through, 4);
    }

    #[test]
    fn a_batch_ack_never_names_a_requeued_tag() {
        let mut finished = Finished::default();
        finished.mark(1);
        finished.mark(2);
        finished.mark_requeued(3);
        assert_eq!(finished.settle(), Some(2), "3 went back to the queue: ack 1 and 2 by naming 2");
        assert_eq!(finished.settle(), None, "nothing new");
        finished.mark_requeued(4);
        finished.mark_requeued(5);
        assert_eq!(finished.settle(), None, "only requeued tags since: nothing to ack");
        finished.mark_requeued(7);
        assert_eq!(finished.settle(), None, "7 is ahead of 6");
        finished.mark(6);
        assert_eq!(finished.settle(), Some(6), "6 is held; 7 was requeued");
        finished.mark(8);
        assert_eq!(finished.settle(), Some(8));
        assert!(finished.requeued.is_empty() && finished.ahead.is_empty());
    }
}
