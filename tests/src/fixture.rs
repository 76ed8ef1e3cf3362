//! The real binaries on a private Prosody and the test broker, for the
//! fault and settlement suites: an HTTP user for the sender and a recipient
//! whose client is connected.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    Broker, Prosody, Receiver, XmppAccount,
    binaries::{Service, ServiceEnv},
    load::{self, Sent, Tally},
    poll,
    stack::user_entry,
};

pub const ARRIVAL: Duration = Duration::from_secs(30);
pub const RETRY_DELAYS: &str = "200ms,500ms,1s";

pub fn retry_delays() -> Vec<Duration> {
    [200, 500, 1000].into_iter().map(Duration::from_millis).collect()
}

pub async fn job_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202, "expected 202");
    let json: serde_json::Value = response.json().await.expect("json");
    json["jobs"][0]["id"].as_str().expect("id").to_owned()
}

/// The real binaries on a private Prosody, with an HTTP user for the
/// sender and a recipient whose client is connected.
pub struct Fixture {
    pub broker: Broker,
    pub prosody: Prosody,
    pub sender: XmppAccount,
    pub recipient: XmppAccount,
    pub env: ServiceEnv,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

pub const HTTP_PASSWORD: &str = "fault-http-pw";

impl Fixture {
    pub async fn start() -> Self {
        herald_shared::telemetry::install_crypto_provider();
        let broker = Broker::connect().await;
        let prosody = Prosody::start().await;
        let sender = prosody.register("sender");
        let recipient = prosody.register("recipient");
        let mut dir = tempfile::Builder::new().prefix("herald-fault-").tempdir().expect("tempdir");
        dir.disable_cleanup(crate::keep_files());
        let users = dir.path().join("users.toml");
        let accounts = dir.path().join("accounts.toml");
        std::fs::write(&users, user_entry(&sender.jid, HTTP_PASSWORD, None)).expect("users");
        std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
        let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
        Self { broker, prosody, sender, recipient, env, dir, http: reqwest::Client::new() }
    }

    pub fn relay_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.env.relay();
        env.push(("HERALD_RETRY_DELAYS", RETRY_DELAYS.into()));
        env.push(("HERALD_ONLINE_TIMEOUT", "2s".into()));
        env
    }

    pub fn spawn_relay(&self) -> Service {
        Service::spawn_logged("herald-relay", &self.relay_env(), Some(&self.log("relay")))
    }

    pub fn spawn_ingress(&self) -> Service {
        Service::spawn_logged("herald-ingress", &self.env.ingress(), Some(&self.log("ingress")))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// A text/plain post of `body` as the sender, to the recipient: add
    /// headers, then send.
    pub fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.http
            .post(self.url())
            .basic_auth(&self.sender.jid, Some(HTTP_PASSWORD))
            .header("content-type", "text/plain")
            .body(body)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/msg/{}", self.env.ingress_port, self.recipient.jid)
    }

    pub async fn ready(&self, port: u16) -> Result<(), String> {
        crate::admin::readyz(&self.http, &format!("http://127.0.0.1:{port}")).await
    }

    pub async fn wait_ready(&self, port: u16) {
        poll::until("the service to be ready", ARRIVAL, || async { self.ready(port).await.ok() }).await;
    }

    /// Waits for both services to report themselves not ready during a
    /// broker outage, the ingress naming the broker.
    pub async fn wait_broker_outage_seen(&self) {
        let why = poll::until("the ingress to report not ready", ARRIVAL, || async {
            self.ready(self.env.ingress_admin_port).await.err()
        })
        .await;
        assert!(why.contains("broker"), "{why}");
        poll::until("the relay to report not ready", ARRIVAL, || async {
            self.ready(self.env.relay_admin_port).await.err()
        })
        .await;
    }

    /// A burst of `n` in the background; returns its progress counter.
    pub fn burst(&self, n: usize) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Sent>) {
        self.spawn_burst(n, false)
    }

    /// A burst of `n` in the background, each message with an
    /// `Idempotency-Key` (`load::idempotent_burst`); returns its progress
    /// counter.
    pub fn idempotent_burst(&self, n: usize) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Sent>) {
        self.spawn_burst(n, true)
    }

    fn spawn_burst(&self, n: usize, keyed: bool) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Sent>) {
        let progress = Arc::new(AtomicUsize::new(0));
        let (http, url, user, counter) =
            (self.http.clone(), self.url(), self.sender.jid.clone(), Arc::clone(&progress));
        let task = tokio::spawn(async move {
            if keyed {
                load::idempotent_burst(&http, &url, &user, HTTP_PASSWORD, n, 32, counter).await
            } else {
                load::burst(&http, &url, &user, HTTP_PASSWORD, n, 32, counter).await
            }
        });
        (progress, task)
    }

    pub async fn wait_progress(progress: &AtomicUsize, at_least: usize) {
        poll::until(&format!("{at_least} messages accepted"), Duration::from_secs(120), || async {
            (progress.load(Ordering::SeqCst) >= at_least).then_some(())
        })
        .await;
    }

    /// The recipient's client, then both services, ready to take posts.
    pub async fn start_services(&self) -> (Receiver, Service, Service) {
        let rx = Receiver::connect(&self.prosody, &self.recipient).await;
        let (ingress, relay) = (self.spawn_ingress(), self.spawn_relay());
        self.wait_ready(self.env.ingress_admin_port).await;
        (rx, ingress, relay)
    }

    /// Stops both services with SIGTERM (each must exit 0) and deletes the
    /// test's queues.
    pub async fn stop(self, ingress: Service, relay: Service) {
        assert!(relay.terminate(ARRIVAL).await, "relay exits 0 on SIGTERM");
        assert!(ingress.terminate(ARRIVAL).await, "ingress exits 0 on SIGTERM");
        self.broker.cleanup(&retry_delays()).await;
    }
}

impl Drop for Fixture {
    /// A failing test shows the end of the services' logs (they are in
    /// its temporary directory, gone after this).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for name in ["relay", "ingress"] {
            let Ok(log) = std::fs::read_to_string(self.log(name)) else { continue };
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            eprintln!("--- the last {} lines of the {name}'s log ---\n{}", tail.len(), tail.join("\n"));
        }
    }
}

/// Lines of each service's log a failing fault test shows.
const LOG_TAIL: usize = 60;

pub fn report(fault: &str, tally: &Tally) {
    // Collected for the README's table: cargo nextest run … --no-capture.
    println!("{}", tally.report(fault));
    assert!(tally.altered.is_empty(), "{fault}: messages arrived altered: {tally:#?}");
    assert_eq!(tally.lost, 0, "{fault}: messages lost: {tally:?}");
}
