//! Many messages through the real HTTP API, counted at the other end.

use crate::receiver::Received;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long one message keeps being retried (503, connection refused)
/// before the burst gives up on it, as Alertmanager would.
const PER_MESSAGE_DEADLINE: Duration = Duration::from_secs(120);

/// What a burst got accepted: job id → body.
#[derive(Debug, Default)]
pub struct Sent {
    pub accepted: HashMap<String, String>,
    /// Answers other than 202 (503 during an outage, refused connections),
    /// each retried until accepted.
    pub refused: usize,
}

/// Posts `n` distinct `text/plain` messages to `url` with `concurrency`
/// requests in flight, retrying each until it gets a 202. `progress` counts
/// the accepted ones as they come, so a test can inject a fault midway.
pub async fn burst(
    http: &reqwest::Client,
    url: &str,
    user: &str,
    password: &str,
    n: usize,
    concurrency: usize,
    progress: Arc<AtomicUsize>,
) -> Sent {
    post_burst(Poster { http, url, user, password, keyed: false }, n, concurrency, progress).await
}

/// `burst`, each message with an `Idempotency-Key` of its own, the same on
/// every retry of it (as Alertmanager and Grafana post): a retry after a 503
/// is the same job, and the relay delivers it once.
pub async fn idempotent_burst(
    http: &reqwest::Client,
    url: &str,
    user: &str,
    password: &str,
    n: usize,
    concurrency: usize,
    progress: Arc<AtomicUsize>,
) -> Sent {
    post_burst(Poster { http, url, user, password, keyed: true }, n, concurrency, progress).await
}

/// Where and as whom a burst posts, and whether with idempotency keys.
#[derive(Clone, Copy)]
struct Poster<'a> {
    http: &'a reqwest::Client,
    url: &'a str,
    user: &'a str,
    password: &'a str,
    keyed: bool,
}

/// Posts as `poster` says (see `burst`).
async fn post_burst(poster: Poster<'_>, n: usize, concurrency: usize, progress: Arc<AtomicUsize>) -> Sent {
    let Poster { http, url, user, password, keyed } = poster;
    let refused = Arc::new(AtomicUsize::new(0));
    let results: Vec<(String, String)> = futures::stream::iter(0..n)
        .map(|i| {
            let (progress, refused) = (Arc::clone(&progress), Arc::clone(&refused));
            async move {
                let body = format!("burst message {i} {}", uuid::Uuid::new_v4().simple());
                let key = format!("burst-{i}-{}", uuid::Uuid::new_v4().simple());
                let end = tokio::time::Instant::now() + PER_MESSAGE_DEADLINE;
                loop {
                    let mut request = http
                        .post(url)
                        .basic_auth(user, Some(password))
                        .header("content-type", "text/plain")
                        .body(body.clone());
                    if keyed {
                        request = request.header("idempotency-key", &key);
                    }
                    let response = request.send().await;
                    if let Ok(r) = response
                        && r.status() == 202
                    {
                        let json: serde_json::Value = r.json().await.expect("202 body is JSON");
                        progress.fetch_add(1, Ordering::SeqCst);
                        return (json["jobs"][0]["id"].as_str().expect("job id").to_owned(), body);
                    }
                    refused.fetch_add(1, Ordering::SeqCst);
                    assert!(
                        tokio::time::Instant::now() < end,
                        "message {i} not accepted within {PER_MESSAGE_DEADLINE:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    Sent { accepted: results.into_iter().collect(), refused: refused.load(Ordering::SeqCst) }
}

/// What arrived of what was accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub sent: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub lost: usize,
    /// Arrivals with an id that was never accepted but a body that was: a
    /// post answered 503 (or cut) that the broker had stored all the same,
    /// sent again by the client under a new id. The contract allows these
    /// ("a 503 means not confirmed, not not stored").
    pub resent: usize,
    /// What arrived with a body that was never accepted, or with a body
    /// other than the one accepted under its id (kept whole, for the
    /// failure).
    pub altered: Vec<Received>,
    /// The ids of the first lost messages, for the failure.
    pub lost_ids: Vec<String>,
}

impl Tally {
    pub fn of(sent: &Sent, received: &[Received]) -> Self {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let bodies: std::collections::HashSet<&str> = sent.accepted.values().map(String::as_str).collect();
        let (mut altered, mut resent) = (Vec::new(), 0);
        for m in received {
            let id = m.id.as_deref().unwrap_or("");
            match sent.accepted.get(id) {
                Some(body) if *body == m.body => *seen.entry(id).or_default() += 1,
                None if bodies.contains(m.body.as_str()) => resent += 1,
                _ => altered.push(m.clone()),
            }
        }
        let delivered = seen.len();
        let lost_ids = sent.accepted.keys().filter(|id| !seen.contains_key(id.as_str())).take(10).cloned().collect();
        Tally {
            sent: sent.accepted.len(),
            delivered,
            duplicates: seen.values().map(|n| n - 1).sum(),
            lost: sent.accepted.len() - delivered,
            resent,
            altered,
            lost_ids,
        }
    }

    /// One line for the test output and the README's table.
    pub fn report(&self, fault: &str) -> String {
        format!(
            "FAULT {fault}: sent {} delivered {} duplicated {} resent after a 503 {} lost {} altered {}",
            self.sent,
            self.delivered,
            self.duplicates,
            self.resent,
            self.lost,
            self.altered.len()
        )
    }
}

/// Receives until every accepted id has arrived or nothing new came for
/// `idle`; returns everything received.
pub async fn receive_all(rx: &mut crate::Receiver, sent: &Sent, idle: Duration) -> Vec<Received> {
    let mut received = Vec::with_capacity(sent.accepted.len());
    let mut ids = std::collections::HashSet::new();
    while ids.len() < sent.accepted.len() {
        match rx.next(idle).await {
            Some(m) => {
                if let Some(id) = &m.id {
                    ids.insert(id.clone());
                }
                received.push(m);
            }
            None => break,
        }
    }
    // Stragglers (duplicates) that are already on their way.
    while let Some(m) = rx.next(Duration::from_millis(500)).await {
        received.push(m);
    }
    received
}
