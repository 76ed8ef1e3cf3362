//! Load on the ingress's HTTP API: closed-loop (a fixed number of keep-alive
//! connections posting back to back) and open-loop (sends scheduled at fixed
//! instants, whatever the answers do).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where and as whom to post.
#[derive(Debug)]
pub struct Target {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>/msg/<recipient>`
    pub url: String,
    /// Who posts, as (user, password): the first user for single posts;
    /// the closed loop takes them in turn.
    pub users: Vec<(String, String)>,
    pub body_bytes: usize,
}

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The job id from the 202 body, also the stanza id.
    pub id: String,
    /// When it was due (open loop) or sent (closed loop).
    pub scheduled: Instant,
    pub sent: Instant,
    pub answered: Instant,
}

/// Everything a load run got.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: Vec<Accepted>,
    /// Answers other than 202, and failed requests.
    pub refused: usize,
    pub first_sent: Option<Instant>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        crate::stats::rate(self.accepted.len(), self.elapsed)
    }

    pub fn ids(&self) -> std::collections::HashSet<String> {
        self.accepted.iter().map(|a| a.id.clone()).collect()
    }

    /// POST → 202 latencies.
    pub fn answer_latencies(&self) -> Vec<Duration> {
        self.accepted.iter().map(|a| a.answered.duration_since(a.sent)).collect()
    }
}

/// How long a closed-loop run goes on.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    For(Duration),
    Messages(usize),
}

pub fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1) * 4)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

impl Target {
    /// The first user, who makes single posts.
    pub fn user(&self) -> (&str, &str) {
        let (user, password) = self.users.first().expect("a target has a user");
        (user, password)
    }

    /// Posts one `text/plain` message as the first user; the job id if it
    /// got a 202.
    pub async fn post(&self, tag: &str) -> Option<String> {
        self.post_as(0, tag).await
    }

    /// Posts as user `i` modulo their number.
    async fn post_as(&self, i: usize, tag: &str) -> Option<String> {
        let (user, password) = &self.users[i % self.users.len()];
        let response = self
            .http
            .post(&self.url)
            .basic_auth(user, Some(password))
            .header("content-type", "text/plain")
            .body(crate::jobs::body(tag, self.body_bytes))
            .send()
            .await
            .ok()?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            return None;
        }
        let json: serde_json::Value = response.json().await.ok()?;
        json["jobs"][0]["id"].as_str().map(str::to_owned)
    }

    /// One timed post, as user `i`.
    async fn timed(&self, i: usize, scheduled: Instant) -> Option<Accepted> {
        let sent = Instant::now();
        let id = self.post_as(i, &format!("paced {i}")).await?;
        Some(Accepted { id, scheduled, sent, answered: Instant::now() })
    }
}

/// One keep-alive connection driven by hand (hyper's client connection, no
/// pool, no per-request URL parsing): the closed loop's load should cost the
/// machine as little as it can, since everything measured shares its CPUs.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

#[derive(serde::Deserialize)]
struct Answer {
    jobs: Vec<AnswerJob>,
}

#[derive(serde::Deserialize)]
struct AnswerJob {
    id: String,
}

impl Connection {
    async fn open(target: &Target) -> Self {
        let url: reqwest::Url = target.url.parse().expect("target URL");
        let addr = format!("{}:{}", url.host_str().expect("host"), url.port().expect("port"));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the ingress");
        tcp.set_nodelay(true).expect("nodelay");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.expect("HTTP/1 handshake");
        tokio::spawn(connection);
        Self { sender }
    }

    /// One post; the job id if it got a 202.
    async fn post(
        &mut self,
        target: &Target,
        path: &str,
        authorization: &http::HeaderValue,
        tag: &str,
    ) -> Option<String> {
        use http_body_util::BodyExt;
        self.sender.ready().await.ok()?;
        let request = http::Request::post(path)
            .header(http::header::HOST, "herald")
            .header(http::header::AUTHORIZATION, authorization.clone())
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(http_body_util::Full::new(bytes::Bytes::from(crate::jobs::body(tag, target.body_bytes))))
            .ok()?;
        let response = self.sender.send_request(request).await.ok()?;
        let accepted = response.status() == http::StatusCode::ACCEPTED;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        if !accepted {
            return None;
        }
        let answer: Answer = serde_json::from_slice(&body).ok()?;
        answer.jobs.into_iter().next().map(|j| j.id)
    }
}

/// `connections` tasks, each on its own keep-alive connection, post back to
/// back until `limit`; message `i` is posted as the target's user `i` modulo
/// their number.
pub async fn closed_loop(target: Arc<Target>, connections: usize, limit: Limit) -> Outcome {
    closed_loop_paced(target, connections, limit, None).await
}

/// The closed loop, but message `i` not sent before `i / rate` seconds from
/// the start: the same connections and requests at (at most) another
/// load's rate.
pub async fn closed_loop_paced(target: Arc<Target>, connections: usize, limit: Limit, rate: Option<f64>) -> Outcome {
    let period = rate.map(|rate| Duration::from_secs_f64(1.0 / rate.max(1.0)));
    use base64::Engine;
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Outcome::default()));
    let path: Arc<str> = reqwest::Url::parse(&target.url).expect("target URL").path().into();
    let authorizations: Arc<[http::HeaderValue]> = target
        .users
        .iter()
        .map(|(user, password)| {
            let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            http::HeaderValue::from_str(&format!("Basic {credentials}")).expect("header value")
        })
        .collect();
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(Connection::open(&target).await);
    }
    let started = Instant::now();
    let workers: Vec<_> = opened
        .into_iter()
        .map(|mut connection| {
            let (target, next, results, path, authorizations) = (
                Arc::clone(&target),
                Arc::clone(&next),
                Arc::clone(&results),
                Arc::clone(&path),
                Arc::clone(&authorizations),
            );
            tokio::spawn(async move {
                while let Some(i) = take(&next, limit, started) {
                    if let Some(period) = period {
                        tokio::time::sleep_until((started + period.mul_f64(i as f64)).into()).await;
                    }
                    let sent = Instant::now();
                    let authorization = &authorizations[i % authorizations.len()];
                    let id = connection.post(&target, &path, authorization, &format!("closed {i}")).await;
                    record(&results, id.map(|id| Accepted { id, scheduled: sent, sent, answered: Instant::now() }));
                }
            })
        })
        .collect();
    collect(workers, &results, started).await
}

/// The next message number, if the run is not over.
fn take(next: &AtomicUsize, limit: Limit, started: Instant) -> Option<usize> {
    let i = next.fetch_add(1, Ordering::Relaxed);
    match limit {
        Limit::For(duration) => (started.elapsed() < duration).then_some(i),
        Limit::Messages(n) => (i < n).then_some(i),
    }
}

fn record(results: &Mutex<Outcome>, outcome: Option<Accepted>) {
    let mut results = results.lock().expect("results lock");
    match outcome {
        Some(accepted) => results.accepted.push(accepted),
        None => results.refused += 1,
    }
}

/// Sends `rate` messages a second for `duration`, each at its own instant,
/// never waiting for earlier answers; message `i` as the target's user `i`
/// modulo their number.
pub async fn open_loop(target: Arc<Target>, rate: u32, duration: Duration) -> Outcome {
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let period = Duration::from_secs(1) / rate.max(1);
    let results = Arc::new(Mutex::new(Outcome::default()));
    let first = Instant::now() + Duration::from_millis(50);
    let mut requests = Vec::with_capacity(count);
    for i in 0..count {
        let scheduled = first + period * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (target, results) = (Arc::clone(&target), Arc::clone(&results));
        requests.push(tokio::spawn(async move {
            let outcome = target.timed(i, scheduled).await;
            record(&results, outcome);
        }));
    }
    collect(requests, &results, first).await
}

/// Waits for every sending task, then returns what they recorded, timed from
/// `first`, the first send.
async fn collect(tasks: Vec<tokio::task::JoinHandle<()>>, results: &Mutex<Outcome>, first: Instant) -> Outcome {
    for task in tasks {
        task.await.expect("load task");
    }
    let mut outcome = std::mem::take(&mut *results.lock().expect("results lock"));
    outcome.first_sent = Some(first);
    outcome.elapsed = first.elapsed();
    outcome
}
