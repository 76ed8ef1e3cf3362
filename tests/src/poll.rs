//! Polling with a deadline, instead of sleeping.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How often a condition is re-checked.
const INTERVAL: Duration = Duration::from_millis(25);

/// Calls `check` until it returns `Some`, or panics with `what` once
/// `deadline` has passed.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(INTERVAL).await;
    }
}
