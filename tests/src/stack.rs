//! Herald's two services, in-process, wired to the test broker and a private
//! Prosody, with one sender account and its HTTP user.

use crate::broker::Broker;
use crate::prosody::{Prosody, XmppAccount};
use herald_relay::config::Delays;
use herald_shared::amqp::BrokerArgs;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Run the relay (off: jobs stay in the work queue, for inspection).
    pub relay: bool,
    /// Broker URL for the services, if not the test broker (e.g. a dead port).
    pub service_amqp_url: Option<String>,
    pub retry_delays: Vec<Duration>,
    pub stream_management: bool,
    /// More `[[users]]` entries for the ingress users file.
    pub extra_users: String,
    /// The relay's `HERALD_UNKNOWN_SENDER_GRACE`.
    pub unknown_sender_grace: Duration,
    /// The relay's `HERALD_SESSION_IDLE` (with it, a 2 s ack timeout, so
    /// that the idle time may be short).
    pub session_idle: Option<Duration>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            relay: true,
            service_amqp_url: None,
            retry_delays: vec![Duration::from_millis(200), Duration::from_millis(500)],
            stream_management: true,
            extra_users: String::new(),
            unknown_sender_grace: Duration::from_secs(300),
            session_idle: None,
        }
    }
}

pub struct Stack {
    pub broker: Broker,
    pub prosody: Prosody,
    /// The XMPP account the relay sends from; also the HTTP user's JID.
    pub sender: XmppAccount,
    /// The HTTP password of the sender's user.
    pub http_password: String,
    pub ingress_url: String,
    /// The admin listeners (healthz, readyz, metrics).
    pub ingress_admin_url: String,
    pub relay_admin_url: Option<String>,
    pub http: reqwest::Client,
    pub options: StackOptions,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// An HTTP user for the users file, with the argon2id hash of `password`.
pub fn user_entry(jid: &str, password: &str, from: Option<&str>) -> String {
    let hash = herald_ingress::hash_password::hash(password).expect("hash");
    user_entry_hashed(jid, &hash, from)
}

/// An HTTP user for the users file, with a password hash made already (many
/// users may share one password, and so one hash).
pub fn user_entry_hashed(jid: &str, hash: &str, from: Option<&str>) -> String {
    let from = from.map(|f| format!("from = \"{f}\"\n")).unwrap_or_default();
    format!("[[users]]\njid = \"{jid}\"\npassword_hash = \"{hash}\"\n{from}")
}

impl Stack {
    pub async fn start(options: StackOptions) -> Self {
        herald_shared::telemetry::init();
        herald_shared::telemetry::install_crypto_provider();
        let broker = Broker::connect().await;
        let prosody = Prosody::start_with(options.stream_management).await;
        let sender = prosody.register("sender");
        let http_password = format!("http-{}", uuid::Uuid::new_v4().simple());
        let dir = tempfile::Builder::new().prefix("herald-stack-").tempdir().expect("tempdir");
        let users_file = dir.path().join("users.toml");
        let accounts_file = dir.path().join("accounts.toml");
        std::fs::write(
            &users_file,
            format!("{}{}", user_entry(&sender.jid, &http_password, None), options.extra_users),
        )
        .expect("users file");
        std::fs::write(&accounts_file, prosody.accounts_entry(&sender)).expect("accounts file");
        let amqp_url = options.service_amqp_url.clone().unwrap_or_else(|| broker.url.clone());
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        let ingress = herald_ingress::Application::build(ingress_config(&amqp_url, &broker.prefix, users_file))
            .await
            .expect("ingress builds");
        let ingress_url = format!("http://127.0.0.1:{}", ingress.port());
        let ingress_admin_url = format!("http://127.0.0.1:{}", ingress.admin_port());
        let mut relay_admin_url = None;
        let token = stop.clone();
        tasks.push(tokio::spawn(async move {
            ingress.run_until(async move { token.cancelled().await }).await.expect("ingress runs");
        }));
        if options.relay {
            let mut config = relay_config(&amqp_url, &broker.prefix, accounts_file, &options.retry_delays);
            config.unknown_sender_grace = options.unknown_sender_grace;
            if let Some(idle) = options.session_idle {
                config.session_idle = Some(idle);
                config.ack_timeout = Duration::from_secs(2);
            }
            let relay = herald_relay::Application::build(config).await.expect("relay builds");
            relay_admin_url = Some(format!("http://127.0.0.1:{}", relay.admin_port()));
            let token = stop.clone();
            tasks.push(tokio::spawn(async move {
                relay.run_until(async move { token.cancelled().await }).await.expect("relay runs");
            }));
        }
        Self {
            broker,
            prosody,
            sender,
            http_password,
            ingress_url,
            ingress_admin_url,
            relay_admin_url,
            http: reqwest::Client::new(),
            options,
            dir,
            stop,
            tasks,
        }
    }

    /// POSTs `body` to `path` as the sender's HTTP user.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.post_as(&self.sender.jid, &self.http_password, path, content_type, body).await
    }

    pub async fn post_as(
        &self,
        user: &str,
        password: &str,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request =
            self.http.post(format!("{}{path}", self.ingress_url)).basic_auth(user, Some(password)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request.send().await.expect("HTTP request")
    }

    /// A job from the stack's sender to `to`, as the ingress would make it
    /// (to publish straight to the queue).
    pub fn job(&self, to: &str, text: &str) -> herald_shared::Job {
        use herald_shared::{Body, Job, MessageKind, Recipient, Sender};
        let from = Sender::parse(&self.sender.jid).expect("sender");
        let to = Recipient::parse(to, from.domain()).expect("recipient");
        // Any length: a test may queue what an ingress would refuse.
        let body = Body::parse(text.to_owned(), usize::MAX).expect("body");
        Job::new_v1(from, to, MessageKind::parse(None).expect("kind"), body, None, None)
    }

    /// The job an ingress makes of a request with an `Idempotency-Key`:
    /// its id derives from the sender, `key` and `to`.
    pub fn idempotent_job(&self, to: &str, key: &str, text: &str) -> herald_shared::Job {
        let job = self.job(to, text);
        let herald_shared::Job::V1(v1) = &job;
        let id = herald_shared::job::idempotent_id(&v1.from, key, &v1.to);
        job.with_id(id)
    }

    /// Another ingress replica, in this process: the same broker, prefix and
    /// users file. Stop it before the stack.
    pub async fn ingress_replica(&self) -> Replica {
        let config = ingress_config(&self.broker.url, &self.broker.prefix, self.dir.path().join("users.toml"));
        let ingress = herald_ingress::Application::build(config).await.expect("ingress replica builds");
        let (url, admin_url) =
            (format!("http://127.0.0.1:{}", ingress.port()), format!("http://127.0.0.1:{}", ingress.admin_port()));
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            ingress.run_until(async move { token.cancelled().await }).await.expect("ingress replica runs");
        });
        Replica { url, admin_url, stop, task }
    }

    /// A relay replica, in this process, holding the stack's sender account
    /// (`instance` names it). Its `url` is its admin listener. Stop it
    /// before the stack.
    pub async fn relay_replica(&self, instance: &str) -> Replica {
        let accounts_file = self.dir.path().join("accounts.toml");
        let mut config = relay_config(&self.broker.url, &self.broker.prefix, accounts_file, &self.options.retry_delays);
        config.unknown_sender_grace = self.options.unknown_sender_grace;
        config.instance = instance.to_owned();
        let relay = herald_relay::Application::build(config).await.expect("relay replica builds");
        let admin_url = format!("http://127.0.0.1:{}", relay.admin_port());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            relay.run_until(async move { token.cancelled().await }).await.expect("relay replica runs");
        });
        Replica { url: admin_url.clone(), admin_url, stop, task }
    }

    /// Stops both services gracefully and deletes the test's queues.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("service task");
        }
        self.broker.cleanup(&self.options.retry_delays).await;
    }
}

/// A second (or third) service of a stack, in-process.
pub struct Replica {
    /// Its HTTP API (an ingress) or its admin listener (a relay).
    pub url: String,
    pub admin_url: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Replica {
    /// Stops it gracefully.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("replica task");
    }
}

/// The broker settings both services get in the harness.
pub fn broker_args(amqp_url: &str, prefix: &str) -> BrokerArgs {
    BrokerArgs { amqp_url: amqp_url.to_owned(), amqp_url_file: None, amqp_prefix: prefix.to_owned() }
}

pub fn ingress_config(amqp_url: &str, prefix: &str, users_file: PathBuf) -> herald_ingress::config::Config {
    herald_ingress::config::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        broker: broker_args(amqp_url, prefix),
        users_file: Some(users_file),
        max_body_bytes: herald_shared::domain::DEFAULT_MAX_BODY_BYTES,
        max_stanza_bytes: herald_shared::job::DEFAULT_MAX_STANZA_BYTES,
        auth_cache_seconds: 300,
        login_failures: 5,
        auth_concurrency: 1,
        auth_queue: 64,
        auth_queue_timeout: Duration::from_secs(2),
        http_header_timeout: Duration::from_secs(10),
        http_body_timeout: Duration::from_secs(30),
        http_max_connections: 1024,
        trust_forwarded_for: false,
        alertmanager_template: None,
        grafana_template: None,
        idempotency_window: Duration::from_secs(600),
        job_status_window: Duration::from_secs(3600),
        job_status_capacity: 65_536,
        users_reload_interval: Duration::from_millis(200),
    }
}

pub fn relay_config(
    amqp_url: &str,
    prefix: &str,
    accounts_file: PathBuf,
    retry_delays: &[Duration],
) -> herald_relay::config::Config {
    herald_relay::config::Config {
        broker: broker_args(amqp_url, prefix),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        accounts_file: Some(accounts_file),
        prefetch: 256,
        retry_delays: Delays(retry_delays.to_vec()),
        ack_timeout: Duration::from_secs(10),
        online_timeout: Duration::from_secs(10),
        max_stanza_bytes: 256 * 1024,
        session_idle: None,
        drain_timeout: Duration::from_secs(10),
        idempotency_window: Duration::from_secs(600),
        unknown_sender_grace: Duration::from_secs(300),
        instance: "test".to_owned(),
    }
}
