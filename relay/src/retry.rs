//! What to do after a failed attempt: a pure function of the attempt count
//! and the schedule, so that it can be tested without a broker.

use crate::error::DeliveryError;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Publish to the delay queue of this step, with this attempt count.
    RetryAfter { delay: Duration, attempt: u32 },
    /// Park in the dead queue with this reason.
    Park { reason: String },
}

/// `attempts_so_far` counts the failed attempt that just happened's
/// predecessors: 0 on the first delivery.
pub fn next_step(error: &DeliveryError, attempts_so_far: u32, schedule: &[Duration]) -> Next {
    match error {
        DeliveryError::Permanent(reason) => Next::Park { reason: reason.clone() },
        DeliveryError::Transient(reason) => match schedule.get(attempts_so_far as usize) {
            Some(delay) => Next::RetryAfter { delay: *delay, attempt: attempts_so_far.saturating_add(1) },
            None => Next::Park {
                reason: format!("gave up after {} attempts; last error: {reason}", attempts_so_far.saturating_add(1)),
            },
        },
        // Nothing is wrong with the job: its sender's session is down. It
        // waits out the outage at the schedule's longest step instead of
        // being parked, so an outage needs no replay afterwards.
        DeliveryError::SenderOffline(reason) => match schedule.get(attempts_so_far as usize).or(schedule.last()) {
            Some(delay) => Next::RetryAfter { delay: *delay, attempt: attempts_so_far.saturating_add(1) },
            None => Next::Park { reason: format!("retries are disabled; {reason}") },
        },
    }
}

/// The per-message expiration for a step: up to 20% shorter than the delay
/// queue's TTL, so that jobs that failed together do not all come back in
/// the same instant.
pub fn jittered(delay: Duration) -> Duration {
    let factor = 1.0 - rand::random::<f64>() * 0.2;
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];

    #[test]
    fn transient_failures_walk_the_schedule_then_park() {
        let e = DeliveryError::Transient("timeout".into());
        assert_eq!(next_step(&e, 0, &S), Next::RetryAfter { delay: S[0], attempt: 1 });
        assert_eq!(next_step(&e, 1, &S), Next::RetryAfter { delay: S[1], attempt: 2 });
        assert!(
            matches!(next_step(&e, 2, &S), Next::Park { reason } if reason.contains("3 attempts") && reason.contains("timeout"))
        );
        // A forged x-herald-attempt header cannot overflow the count.
        assert!(matches!(next_step(&e, u32::MAX, &S), Next::Park { reason } if reason.contains(&u32::MAX.to_string())));
    }

    #[test]
    fn a_sender_outage_never_exhausts_the_schedule() {
        let e = DeliveryError::SenderOffline("login rejected".into());
        assert_eq!(next_step(&e, 0, &S), Next::RetryAfter { delay: S[0], attempt: 1 });
        assert_eq!(next_step(&e, 40, &S), Next::RetryAfter { delay: S[1], attempt: 41 });
        assert!(matches!(next_step(&e, 0, &[]), Next::Park { .. }));
    }

    #[test]
    fn permanent_failures_park_at_once() {
        let e = DeliveryError::Permanent("no account".into());
        assert_eq!(next_step(&e, 0, &S), Next::Park { reason: "no account".into() });
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(d <= Duration::from_secs(10) && d >= Duration::from_secs(8), "{d:?}");
        }
    }
}
