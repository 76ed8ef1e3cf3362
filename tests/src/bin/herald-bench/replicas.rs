//! Phase 5, replicas: how long after one ingress replica's 202 another replica
//! knows the job (its `GET /jobs/{id}` answers). That is the window in which
//! a client's retry that lands on the other replica, with the same
//! `Idempotency-Key`, can still queue a second copy; relays learn each
//! other's deliveries through the same stream, written and read the same
//! way.

use std::time::{Duration, Instant};

use crate::herald::Herald;
use crate::http_load::Target;
use crate::stats::Percentiles;

/// Jobs posted one after another, each followed until the replica knows it.
pub const SAMPLES: usize = 200;
/// A job the replica does not know by then counts as unseen.
const DEADLINE: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Propagation {
    pub samples: usize,
    pub unseen: usize,
    /// From the first replica's 202 to the second's first 200.
    pub delay: Option<Percentiles>,
}

pub async fn propagation(herald: &Herald, target: &Target) -> Propagation {
    let (replica, port) = herald.start_ingress_replica(&target.http).await;
    let (user, password) = &target.users[0];
    let (mut delays, mut unseen) = (Vec::with_capacity(SAMPLES), 0);
    for i in 0..SAMPLES {
        let response = target
            .http
            .post(&target.url)
            .basic_auth(user, Some(password))
            .header("content-type", "text/plain")
            .header("idempotency-key", format!("propagation-{i}-{}", uuid::Uuid::new_v4().simple()))
            .body(format!("propagation {i}"))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 202, "the ingress accepts the job");
        let accepted = Instant::now();
        let body: serde_json::Value = response.json().await.expect("JSON");
        let id = body["jobs"][0]["id"].as_str().expect("a job id").to_owned();
        let url = format!("http://127.0.0.1:{port}/jobs/{id}");
        loop {
            let known = target.http.get(&url).basic_auth(user, Some(password)).send().await.expect("GET");
            if known.status() == 200 {
                delays.push(accepted.elapsed());
                break;
            }
            if accepted.elapsed() > DEADLINE {
                unseen += 1;
                break;
            }
        }
    }
    replica.terminate(STOP_TIMEOUT).await;
    Propagation { samples: SAMPLES, unseen, delay: Percentiles::of(delays) }
}
