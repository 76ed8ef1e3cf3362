//! Herald itself: the real release binaries, started through the harness's
//! `ServiceEnv`, with their logs in a temporary directory.

use herald_tests::binaries::{Service, ServiceEnv};
use herald_tests::stack::{user_entry, user_entry_hashed};
use herald_tests::{Broker, Prosody, XmppAccount, poll};
use lapin::options::QueuePurgeOptions;
use std::path::PathBuf;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Herald {
    pub env: ServiceEnv,
    pub http_user: String,
    pub http_password: String,
    dir: tempfile::TempDir,
    pub ingress: Option<Service>,
    pub relay: Option<Service>,
}

impl Herald {
    /// Writes the users file (the sender's JID may post) and the accounts
    /// file (the relay sends as the sender).
    pub fn configure(broker: &Broker, prosody: &Prosody, sender: &XmppAccount) -> Self {
        let mut dir = tempfile::Builder::new().prefix("herald-bench-").tempdir().expect("tempdir");
        dir.disable_cleanup(herald_tests::keep_files());
        let http_password = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let users = dir.path().join("users.toml");
        let accounts = dir.path().join("accounts.toml");
        std::fs::write(&users, user_entry(&sender.jid, &http_password, None)).expect("users file");
        std::fs::write(&accounts, prosody.accounts_entry(sender)).expect("accounts file");
        let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
        Self { env, http_user: sender.jid.clone(), http_password, dir, ingress: None, relay: None }
    }

    /// Adds users who post as themselves, and the relay accounts to send as
    /// them, all with one password (one argon2 hash for all: writing a
    /// thousand hashes would take the machine half a minute). Takes effect
    /// when the services start next.
    pub fn add_senders(&self, prosody: &Prosody, senders: &[XmppAccount], password: &str) {
        use std::io::Write;
        let hash = herald_ingress::hash_password::hash(password).expect("hash");
        let append = |path: &std::path::Path, text: String| {
            let mut file = std::fs::OpenOptions::new().append(true).open(path).expect("open for appending");
            file.write_all(text.as_bytes()).expect("append");
        };
        append(&self.env.users_file, senders.iter().map(|s| user_entry_hashed(&s.jid, &hash, None)).collect());
        append(&self.env.accounts_file, senders.iter().map(|s| prosody.accounts_entry(s)).collect());
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn ingress_url(&self, to: &str) -> String {
        format!("http://127.0.0.1:{}/msg/{to}", self.env.ingress_port)
    }

    pub async fn start_ingress(&mut self, http: &reqwest::Client, extra: &[(String, String)]) {
        let env = with_extra(self.env.ingress(), extra);
        let service = Service::spawn_logged("herald-ingress", &env, Some(&self.log("herald-ingress")));
        self.ingress = Some(service);
        ready_within(http, self.env.ingress_admin_port, "herald-ingress", READY_TIMEOUT).await;
    }

    /// A second ingress replica on the same broker, prefix and users file;
    /// its HTTP port.
    pub async fn start_ingress_replica(&self, http: &reqwest::Client) -> (Service, u16) {
        let mut env = self.env.clone();
        (env.ingress_port, env.ingress_admin_port) =
            (herald_tests::prosody::free_port(), herald_tests::prosody::free_port());
        let service = Service::spawn_logged("herald-ingress", &env.ingress(), Some(&self.log("herald-ingress-2")));
        ready_within(http, env.ingress_admin_port, "the second herald-ingress", READY_TIMEOUT).await;
        (service, env.ingress_port)
    }

    pub async fn start_relay(&mut self, http: &reqwest::Client, extra: &[(String, String)]) {
        self.start_relay_within(http, extra, READY_TIMEOUT).await;
    }

    /// Starts the relay and waits up to `deadline` for it to be ready.
    pub async fn start_relay_within(&mut self, http: &reqwest::Client, extra: &[(String, String)], deadline: Duration) {
        let env = with_extra(self.env.relay(), extra);
        let service = Service::spawn_logged("herald-relay", &env, Some(&self.log("herald-relay")));
        self.relay = Some(service);
        ready_within(http, self.env.relay_admin_port, "herald-relay", deadline).await;
    }

    /// Stops the ingress (SIGTERM), leaving the relay and the queues.
    pub async fn stop_ingress(&mut self) {
        if let Some(ingress) = self.ingress.take() {
            ingress.terminate(STOP_TIMEOUT).await;
        }
    }

    /// Stops the relay (SIGTERM), leaving the ingress and the queues.
    pub async fn stop_relay(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.terminate(STOP_TIMEOUT).await;
        }
    }

    /// The relay's `/metrics`, if it answers.
    pub async fn relay_metrics(&self, http: &reqwest::Client) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.env.relay_admin_port);
        http.get(url).send().await.ok()?.text().await.ok()
    }

    pub fn ingress_pid(&self) -> Option<u32> {
        self.ingress.as_ref().map(Service::pid)
    }

    pub fn relay_pid(&self) -> Option<u32> {
        self.relay.as_ref().map(Service::pid)
    }

    /// Starts counting the CPU time of both services, for a per-message
    /// figure once the run is over.
    pub fn cpu_meter(&self) -> ServiceCpu {
        let pids: Vec<u32> = self.ingress_pid().into_iter().chain(self.relay_pid()).collect();
        ServiceCpu { before: crate::machine::cpu_seconds(&pids), pids }
    }

    /// Empties the work queue (what the ingress phase left there).
    pub async fn purge_work_queue(&self, broker: &Broker) -> u32 {
        let connection =
            herald_shared::amqp::connect(&broker.url, "herald-bench purge").await.expect("connect to the broker");
        let channel = connection.create_channel().await.expect("open a channel");
        let queue = broker.topology().work_queue();
        let purged =
            channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await.expect("purge the work queue");
        drop(connection.close(200, "done".into()).await);
        purged
    }

    /// Stops both services (SIGTERM) and deletes the run's queues.
    pub async fn stop(mut self, broker: &Broker) {
        for service in [self.relay.take(), self.ingress.take()].into_iter().flatten() {
            service.terminate(STOP_TIMEOUT).await;
        }
        broker.cleanup_after_default_relay().await;
    }
}

/// The CPU time of herald-ingress and herald-relay since `Herald::cpu_meter`.
pub struct ServiceCpu {
    pids: Vec<u32>,
    before: f64,
}

impl ServiceCpu {
    /// CPU seconds per delivered message since the meter started.
    pub fn per_message(&self, delivered: usize) -> f64 {
        (crate::machine::cpu_seconds(&self.pids) - self.before) / delivered.max(1) as f64
    }
}

/// The harness's environment for a service, plus the run's extra settings.
fn with_extra(mut env: Vec<(&'static str, String)>, extra: &[(String, String)]) -> Vec<(&'static str, String)> {
    for (key, value) in extra {
        // Once per run: leaking the few keys is simpler than owning them.
        let key: &'static str = Box::leak(key.clone().into_boxed_str());
        env.retain(|(k, _)| *k != key);
        env.push((key, value.clone()));
    }
    env
}

/// Waits for a service's `/readyz` to answer 200.
async fn ready_within(http: &reqwest::Client, admin_port: u16, name: &str, deadline: Duration) {
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    poll::until(&format!("{name} to be ready"), deadline, || {
        let request = http.get(&url).send();
        async move { request.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
}
