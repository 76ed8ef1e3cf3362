//! Phase 2b: wrong passwords from many addresses while cached clients post.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

/// What the guesses got.
#[derive(Debug, Default)]
pub struct Guesses {
    pub sent: usize,
    /// 401: checked and refused.
    pub refused: usize,
    /// 429 or 503: throttled, or turned away by the admission stage.
    pub turned_away: usize,
    /// Anything else (a 2xx would be a bug), or no answer.
    pub other: usize,
    pub elapsed: Duration,
}

/// `total` wrong guesses for distinct unknown users, `concurrency` at a time,
/// from `addresses` loopback addresses (127.0.3.x and up).
pub async fn guesses(url: String, total: usize, concurrency: usize, addresses: usize) -> Guesses {
    let clients: Vec<reqwest::Client> = (0..addresses)
        .map(|i| {
            let address: IpAddr = format!("127.0.{}.{}", 3 + i / 250, 1 + i % 250).parse().expect("address");
            reqwest::Client::builder().local_address(address).build().expect("client")
        })
        .collect();
    let started = Instant::now();
    let mut outcome = Guesses::default();
    let mut next = 0;
    while next < total {
        let batch =
            (next..total.min(next + concurrency)).map(|i| {
                let (client, url) = (&clients[i % addresses], &url);
                async move {
                    client.post(url).basic_auth(format!("guess-{i}@localhost"), Some("guess")).body("x").send().await
                }
            });
        for answer in futures::future::join_all(batch).await {
            outcome.sent += 1;
            match answer.map(|r| r.status().as_u16()) {
                Ok(401) => outcome.refused += 1,
                Ok(429 | 503) => outcome.turned_away += 1,
                _ => outcome.other += 1,
            }
        }
        next += concurrency;
    }
    outcome.elapsed = started.elapsed();
    outcome
}
