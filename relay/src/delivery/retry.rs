//! What to do after a failed attempt: a pure function of the failure, the
//! attempt count, the job's age and the schedule, so that it can be tested
//! without a broker.

use std::time::Duration;

use super::Settlement;
use crate::error::DeliveryError;

#[derive(Debug, Clone)]
pub struct Policy {
    /// The delay before each retry; never empty (the config refuses that).
    pub delays: Vec<Duration>,
    /// How long a job for a sender this relay holds no account for is given
    /// back for another replica before it is parked.
    pub unknown_sender_grace: Duration,
}

impl Policy {
    /// The settlement of a failed attempt. `attempts_so_far` counts the
    /// attempts before this one: 0 on the first delivery.
    pub fn after(&self, error: &DeliveryError, attempts_so_far: u32, age: Duration) -> Settlement {
        let attempt = attempts_so_far.saturating_add(1);
        let reason = error.to_string();
        match error {
            DeliveryError::Permanent(reason) => {
                Settlement::Park { attempts: attempt, reason: reason.clone(), bounced: false }
            }
            DeliveryError::Transient(last) => match self.delays.get(attempts_so_far as usize) {
                Some(delay) => Settlement::Retry { delay: *delay, attempt, reason, bounced: false },
                None => Settlement::Park {
                    attempts: attempt,
                    reason: format!("gave up after {attempt} attempts; last error: {last}"),
                    bounced: false,
                },
            },
            // Nothing is wrong with the job: its sender's session is down. It
            // waits out the outage at the schedule's longest step instead of
            // being parked, so an outage needs no replay afterwards.
            DeliveryError::SenderOffline(_) => match self.delays.get(attempts_so_far as usize).or(self.delays.last()) {
                Some(delay) => Settlement::Retry { delay: *delay, attempt, reason, bounced: false },
                None => Settlement::Park {
                    attempts: attempt,
                    reason: format!("retries are disabled; {reason}"),
                    bounced: false,
                },
            },
            // Another replica may hold the account (a rolling change of the
            // accounts file): give it back, without counting an attempt,
            // until the grace period is over.
            DeliveryError::NoAccount(why) if age < self.unknown_sender_grace => match self.delays.first() {
                Some(delay) => Settlement::Retry { delay: *delay, attempt: attempts_so_far, reason, bounced: false },
                None => Settlement::Park { attempts: attempt, reason: why.clone(), bounced: false },
            },
            DeliveryError::NoAccount(why) => Settlement::Park {
                attempts: attempt,
                reason: format!("{why}, and no relay took the job within {:?}", self.unknown_sender_grace),
                bounced: false,
            },
            // The session pool hands such a job to a new session; should one
            // get here, it is an ordinary transient failure.
            DeliveryError::SessionClosed => self.after(&DeliveryError::Transient(reason), attempts_so_far, age),
        }
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

    fn policy() -> Policy {
        Policy {
            delays: vec![Duration::from_secs(1), Duration::from_secs(5)],
            unknown_sender_grace: Duration::from_secs(60),
        }
    }

    const NEW: Duration = Duration::ZERO;

    fn retry(delay: u64, attempt: u32) -> impl Fn(&Settlement) -> bool {
        move |s| matches!(s, Settlement::Retry { delay: d, attempt: a, .. } if *d == Duration::from_secs(delay) && *a == attempt)
    }

    #[test]
    fn transient_failures_walk_the_schedule_then_park() {
        let p = policy();
        let e = DeliveryError::Transient("timeout".into());
        assert!(retry(1, 1)(&p.after(&e, 0, NEW)));
        assert!(retry(5, 2)(&p.after(&e, 1, NEW)));
        assert!(
            matches!(p.after(&e, 2, NEW), Settlement::Park { attempts: 3, reason, .. } if reason.contains("3 attempts") && reason.contains("timeout"))
        );
        // A forged x-herald-attempt header cannot overflow the count.
        assert!(
            matches!(p.after(&e, u32::MAX, NEW), Settlement::Park { reason, .. } if reason.contains(&u32::MAX.to_string()))
        );
    }

    #[test]
    fn a_sender_outage_never_exhausts_the_schedule() {
        let p = policy();
        let e = DeliveryError::SenderOffline("login rejected".into());
        assert!(retry(1, 1)(&p.after(&e, 0, NEW)));
        assert!(retry(5, 41)(&p.after(&e, 40, NEW)));
    }

    #[test]
    fn permanent_failures_park_at_once() {
        let e = DeliveryError::Permanent("bad".into());
        assert!(matches!(policy().after(&e, 0, NEW), Settlement::Park { attempts: 1, reason, .. } if reason == "bad"));
    }

    #[test]
    fn a_job_for_an_unknown_sender_is_given_back_until_the_grace_period_ends() {
        let p = policy();
        let e = DeliveryError::NoAccount("no account for a@b".into());
        assert!(retry(1, 3)(&p.after(&e, 3, Duration::from_secs(59))), "given back, attempt count unchanged");
        assert!(
            matches!(p.after(&e, 3, Duration::from_secs(60)), Settlement::Park { reason, .. } if reason.contains("no relay took"))
        );
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(d <= Duration::from_secs(10) && d >= Duration::from_secs(8), "{d:?}");
        }
    }
}
