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
//! One slow job (a sender whose server stopped answering) must not hold up
//! the acks of everything behind it, or the relay would stall at its
//! prefetch for every sender: when the first unfinished tag has not moved
//! for [`HEAD_OF_LINE_PATIENCE`], the finished tags behind it are acked one
//! by one.
//!
//! Requeues are sent at once, one by one, and mark the tag only after the
//! broker took the nack, so a batch ack never covers a job that is still
//! to be given back. A requeued or singly acked tag is no longer the
//! broker's to ack: a batch ack names the highest finished tag the broker
//! still holds (acking a tag it no longer holds, even with `multiple`, is
//! "unknown delivery tag", which closes the channel and redelivers
//! everything unacked on it).

use std::{
    collections::BTreeSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use lapin::{
    Channel,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the first unfinished tag may hold up the acks behind it.
pub const HEAD_OF_LINE_PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Acks {
    channel: Channel,
    /// Which connection of this process the channel belongs to (1, 2, …).
    generation: u64,
    finished: Mutex<Finished>,
    advanced: Notify,
}

/// Delivery tags on a channel are consecutive from 1 (one consumer, no
/// `basic.get`), so "everything up to `through`" needs no list of tags.
#[derive(Debug)]
struct Finished {
    /// Every tag up to and including this one is finished.
    through: u64,
    /// When `through` last moved (or the first tag ahead of it arrived).
    through_moved: Instant,
    /// Finished tags above `through`.
    ahead: BTreeSet<u64>,
    /// Tags above `settled` the broker no longer holds: requeued, or acked
    /// one by one.
    released: BTreeSet<u64>,
    /// Every tag up to and including this one was acked or released.
    settled: u64,
}

/// What one flush sends.
#[derive(Debug, Default, PartialEq, Eq)]
struct Flush {
    /// Ack everything up to this tag with `multiple`.
    through: Option<u64>,
    /// Ack these one by one.
    singly: Vec<u64>,
}

impl Default for Finished {
    fn default() -> Self {
        Self {
            through: 0,
            through_moved: Instant::now(),
            ahead: BTreeSet::new(),
            released: BTreeSet::new(),
            settled: 0,
        }
    }
}

impl Finished {
    /// Marks `tag`, given back to the queue; true if `through` moved.
    fn mark_requeued(&mut self, tag: u64) -> bool {
        self.released.insert(tag);
        self.mark(tag)
    }

    /// Marks `tag`; true if `through` moved.
    fn mark(&mut self, tag: u64) -> bool {
        if tag <= self.through {
            return false;
        }
        if self.ahead.is_empty() {
            self.through_moved = Instant::now();
        }
        self.ahead.insert(tag);
        let before = self.through;
        while self.ahead.remove(&(self.through + 1)) {
            self.through += 1;
        }
        if self.through != before {
            self.through_moved = Instant::now();
        }
        self.through != before
    }

    /// What to ack now: the highest finished tag above `settled` the broker
    /// still holds, with `multiple` (every held tag between is covered);
    /// and, if the first unfinished tag has held up the rest for longer
    /// than `patience`, each finished tag behind it.
    fn settle(&mut self, now: Instant, patience: Duration) -> Flush {
        let through = (self.settled + 1..=self.through).rev().find(|tag| !self.released.contains(tag));
        self.released.retain(|t| *t > self.through);
        self.settled = self.through;
        let mut singly = Vec::new();
        if !self.ahead.is_empty() && now.duration_since(self.through_moved) >= patience {
            for tag in &self.ahead {
                if self.released.insert(*tag) {
                    singly.push(*tag);
                }
            }
        }
        Flush { through, singly }
    }
}

impl Acks {
    pub fn new(channel: Channel, generation: u64) -> Self {
        Self { channel, generation, finished: Mutex::new(Finished::default()), advanced: Notify::new() }
    }

    pub fn generation(&self) -> u64 {
        self.generation
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
        if change(&mut self.lock()) {
            self.advanced.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Finished> {
        // A panic while holding this lock leaves consistent data behind.
        self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
                () = tokio::time::sleep(HEAD_OF_LINE_PATIENCE) => false,
                () = stop.cancelled() => true,
            };
            let flush = self.lock().settle(Instant::now(), HEAD_OF_LINE_PATIENCE);
            let acks = flush
                .through
                .map(|tag| (tag, true))
                .into_iter()
                .chain(flush.singly.into_iter().map(|tag| (tag, false)));
            for (tag, multiple) in acks {
                if let Err(e) = self.channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                    tracing::warn!(error = %e, generation = self.generation, "cannot ack deliveries; the broker will redeliver them");
                    return;
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(1);

    fn settle(finished: &mut Finished) -> Flush {
        finished.settle(finished.through_moved, PATIENCE)
    }

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
        assert_eq!(settle(&mut finished).through, Some(2), "3 went back to the queue: ack 1 and 2 by naming 2");
        assert_eq!(settle(&mut finished), Flush::default(), "nothing new");
        finished.mark_requeued(4);
        finished.mark_requeued(5);
        assert_eq!(settle(&mut finished).through, None, "only requeued tags since: nothing to ack");
        finished.mark_requeued(7);
        assert_eq!(settle(&mut finished).through, None, "7 is ahead of 6");
        finished.mark(6);
        assert_eq!(settle(&mut finished).through, Some(6), "6 is held; 7 was requeued");
        finished.mark(8);
        assert_eq!(settle(&mut finished).through, Some(8));
        assert!(finished.released.is_empty() && finished.ahead.is_empty());
    }

    #[test]
    fn a_slow_job_holds_up_the_acks_behind_it_only_for_a_while() {
        let mut finished = Finished::default();
        for tag in [2, 3, 5] {
            finished.mark(tag);
        }
        let start = finished.through_moved;
        assert_eq!(finished.settle(start, PATIENCE), Flush::default(), "1 is still out: wait");
        let flush = finished.settle(start + PATIENCE, PATIENCE);
        assert_eq!(flush, Flush { through: None, singly: vec![2, 3, 5] }, "then ack the rest one by one");
        assert_eq!(finished.settle(start + 2 * PATIENCE, PATIENCE), Flush::default(), "each once");
        finished.mark(1);
        finished.mark(4);
        assert_eq!(settle(&mut finished).through, Some(4), "the batch ack names a tag the broker still holds");
        finished.mark(6);
        assert_eq!(settle(&mut finished).through, Some(6));
    }
}
