//! Herald against ejabberd (Debian's package, with the client settings of
//! its default config): not only Prosody. STARTTLS required, XEP-0198 acks
//! from another implementation, a server killed and started again, and the
//! default shaper, which holds a client to 3,000 bytes a second.

use super::ARRIVAL;
use herald_shared::topology::headers;
use herald_tests::binaries::{Service, ServiceEnv};
use herald_tests::broker::header_text;
use herald_tests::ejabberd::{Ejabberd, ROOMS};
use herald_tests::stack::user_entry;
use herald_tests::{Broker, Receiver, XmppAccount, admin, poll};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_xmpp::parsers::message::MessageType;

/// How long a test waits for the relay to settle what it holds.
const SETTLED: Duration = Duration::from_secs(120);

struct Setup {
    broker: Broker,
    env: ServiceEnv,
    sender: XmppAccount,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// The ingress running, and a relay environment whose account for
    /// `sender` connects to `server`'s STARTTLS port and trusts its CA.
    async fn new(server: &Ejabberd, sender: XmppAccount) -> (Self, Service) {
        herald_shared::telemetry::install_crypto_provider();
        let broker = Broker::connect().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (users, accounts) = (dir.path().join("users.toml"), dir.path().join("accounts.toml"));
        std::fs::write(&users, user_entry(&sender.jid, "pw", None)).expect("users");
        // tls defaults to "required": STARTTLS, the certificate checked for localhost.
        let entry = format!(
            "[[accounts]]\njid = \"{}\"\npassword = \"{}\"\nserver = \"localhost:{}\"\n",
            sender.jid, sender.password, server.port
        );
        std::fs::write(&accounts, entry).expect("accounts");
        let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
        let ingress = env.spawn_ingress();
        let http = reqwest::Client::new();
        let readyz = format!("http://127.0.0.1:{}/readyz", env.ingress_admin_port);
        poll::until("the ingress to be ready", ARRIVAL, || async {
            (http.get(&readyz).send().await.ok()?.status() == 200).then_some(())
        })
        .await;
        (Self { broker, env, sender, http, _dir: dir }, ingress)
    }

    fn relay(&self, server: &Ejabberd, extra: &[(&'static str, &str)]) -> Service {
        let mut env = self.env.relay();
        env.push(("SSL_CERT_FILE", server.ca_file.display().to_string()));
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Service::spawn("herald-relay", &env)
    }

    async fn relay_ready(&self) {
        let readyz = format!("http://127.0.0.1:{}/readyz", self.env.relay_admin_port);
        poll::until("the relay to be ready", ARRIVAL, || async {
            (self.http.get(&readyz).send().await.ok()?.status() == 200).then_some(())
        })
        .await;
    }

    async fn post(&self, to: &str, text: &str) {
        let response = self
            .http
            .post(format!("http://127.0.0.1:{}/msg/{to}", self.env.ingress_port))
            .basic_auth(&self.sender.jid, Some("pw"))
            .header("content-type", "text/plain")
            .body(text.to_owned())
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 202, "{text}");
    }

    /// How many jobs the relay retried, and its metrics to say so.
    async fn retried(&self) -> (f64, String) {
        let metrics = admin::metrics(&self.http, &format!("http://127.0.0.1:{}", self.env.relay_admin_port)).await;
        let retried = admin::sample(&metrics, r#"herald_deliveries_total{outcome="retried"}"#).unwrap_or(0.0);
        (retried, metrics)
    }

    /// After the relay stopped: nothing left in the work queue (every job
    /// was acked, none given back) and nothing parked. Then deletes the
    /// test's queues.
    async fn nothing_left(&self) {
        let topology = self.broker.topology();
        assert_eq!(self.broker.ready(&topology.work_queue()).await, 0, "every job was acked");
        assert_eq!(self.broker.ready(&topology.dead_queue()).await, 0, "nothing was parked");
        self.broker.cleanup_after_default_relay().await;
    }
}

/// The ingress, a relay sending as `sender` through `server`, ready, and
/// `recipient` online to receive: (setup, ingress, relay, receiver).
async fn start_relaying(
    server: &Ejabberd,
    sender: XmppAccount,
    recipient: &XmppAccount,
    extra: &[(&'static str, &str)],
) -> (Setup, Service, Service, Receiver) {
    let (setup, ingress) = Setup::new(server, sender).await;
    let rx = Receiver::connect_to(server.plain_port, recipient).await;
    let relay = setup.relay(server, extra);
    setup.relay_ready().await;
    (setup, ingress, relay, rx)
}

/// Receives until every text in `expected` arrived at least once, and
/// returns how often each arrived.
async fn receive_all(rx: &mut Receiver, sender: &str, expected: &[String]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + SETTLED;
    while expected.iter().any(|text| !seen.contains_key(text)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = rx.next(left).await else {
            let missing = expected.iter().filter(|t| !seen.contains_key(*t)).count();
            panic!("{missing} of {} messages did not arrive", expected.len());
        };
        assert!(m.from.starts_with(sender), "from {}", m.from);
        *seen.entry(m.body).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_delivers_through_ejabberd_over_required_starttls_and_across_its_restart() {
    let mut server = Ejabberd::start(&["relay"]).await;
    let sender = server.register_as("relay");
    let recipient = server.register("ej-recipient");
    let (setup, ingress, relay, mut rx) = start_relaying(&server, sender, &recipient, &[]).await;

    let first: Vec<String> = (0..50).map(|i| format!("ejabberd {i}")).collect();
    for text in &first {
        setup.post(&recipient.jid, text).await;
    }
    let seen = receive_all(&mut rx, &setup.sender.jid, &first).await;
    assert!(seen.values().all(|&n| n == 1), "each once over a steady stream: {seen:?}");

    // The server restarted: jobs posted while it is down wait, and go once
    // it is back (the receiver gets them from its offline store, or once it
    // is online again).
    server.stop_gracefully().await;
    let second: Vec<String> = (0..20).map(|i| format!("while ejabberd was down {i}")).collect();
    for text in &second {
        setup.post(&recipient.jid, text).await;
    }
    server.start_again().await;
    // A new receiver: tokio-xmpp's client tries to resume its old stream
    // against the restarted ejabberd over and over, and never logs in
    // afresh.
    drop(rx);
    let mut rx = Receiver::connect_to(server.plain_port, &recipient).await;
    receive_all(&mut rx, &setup.sender.jid, &second).await;

    assert!(relay.terminate(ARRIVAL).await, "the relay stops cleanly");
    setup.nothing_left().await;
    drop(ingress);
}

/// ejabberd stopped (`ejabberdctl stop`) and started again while a burst
/// is being posted and relayed: every message arrives, none is parked.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_across_an_ejabberd_restart_loses_nothing() {
    const BURST: usize = 600;
    let mut server = Ejabberd::start(&["relay"]).await;
    let sender = server.register_as("relay");
    let recipient = server.register("ej-burst");
    let (setup, ingress, relay, mut rx) = start_relaying(&server, sender, &recipient, &[]).await;
    let setup = Arc::new(setup);

    // The burst: a post every 10 ms (the scenario's pace, for about 6 s),
    // in the background.
    let texts: Vec<String> = (0..BURST).map(|i| format!("across the restart {i}")).collect();
    let posted = Arc::new(AtomicUsize::new(0));
    let burst = {
        let (setup, texts, posted, to) =
            (Arc::clone(&setup), texts.clone(), Arc::clone(&posted), recipient.jid.clone());
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            for text in texts {
                pace.tick().await;
                setup.post(&to, &text).await;
                posted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    poll::until("a quarter of the burst to be posted", ARRIVAL, || async {
        (posted.load(Ordering::SeqCst) >= BURST / 4).then_some(())
    })
    .await;
    server.stop_gracefully().await;
    server.start_again().await;
    // See the restart test above: a new receiver once the server is back.
    // What the first one got before the stop has long been handed over.
    let mut new_rx = Receiver::connect_to(server.plain_port, &recipient).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    while let Some(m) = rx.next(Duration::ZERO).await {
        *seen.entry(m.body).or_default() += 1;
    }
    drop(rx);
    burst.await.expect("every post got a 202");
    let rest: Vec<String> = texts.iter().filter(|t| !seen.contains_key(*t)).cloned().collect();
    for (text, n) in receive_all(&mut new_rx, &setup.sender.jid, &rest).await {
        *seen.entry(text).or_default() += n;
    }
    assert!(texts.iter().all(|t| seen.contains_key(t)));
    let duplicated: usize = seen.values().map(|n| n - 1).sum();
    println!("FAULT ejabberd stopped and started mid-burst of {BURST}: all arrived, {duplicated} duplicated");

    assert!(relay.terminate(ARRIVAL).await, "the relay stops cleanly");
    setup.nothing_left().await;
    drop(ingress);
}

/// Debian's default shaper holds every account to 3,000 bytes a second: a
/// burst of 150 alerts (about 100 KB of stanzas) takes about 25 s to get
/// through ejabberd, far longer than the ack timeout set here, while
/// ejabberd keeps acknowledging the stanzas it has read. None of them may
/// be retried (a retry would put a second copy behind the first) and none
/// parked; nor may the session close as idle while they wait, though it
/// takes no new job for longer than `HERALD_SESSION_IDLE`.
///
/// The burst goes to a session that is open, so its stanzas go out a few
/// at a time, each few with its own ack request. (A burst that waits for a
/// session to open goes out behind one request, which this shaper answers
/// only when all of it is read: see docs/deploying.md.)
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_reads_slowly_gets_each_message_once_without_retries() {
    let server = Ejabberd::start(&[]).await;
    let sender = server.register_as("shaped");
    let recipient = server.register("ej-recipient");
    let extra = [("HERALD_ACK_TIMEOUT", "5s"), ("HERALD_SESSION_IDLE", "11s")];
    let (setup, ingress, relay, mut rx) = start_relaying(&server, sender, &recipient, &extra).await;
    // The session opens for its first job.
    let opening = vec!["the session opens".to_owned()];
    setup.post(&recipient.jid, &opening[0]).await;
    receive_all(&mut rx, &setup.sender.jid, &opening).await;

    let texts: Vec<String> = (0..150).map(|i| format!("{i:03} {}", "x".repeat(500))).collect();
    for text in &texts {
        setup.post(&recipient.jid, text).await;
    }
    let seen = receive_all(&mut rx, &setup.sender.jid, &texts).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(t, _)| &t[..3]).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let (retried, metrics) = setup.retried().await;
    assert_eq!(retried, 0.0, "no job was retried: {metrics}");

    assert!(relay.terminate(ARRIVAL).await, "the relay stops cleanly");
    setup.nothing_left().await;
    drop(ingress);
}

/// ejabberd keeps 100 messages at most for a user who is offline (Debian's
/// default `max_user_offline_messages`) and bounces more with
/// `resource-constraint`, type `wait`: the relay retries those through its
/// delays and parks them after the last (the first 100 wait in the store).
#[tokio::test(flavor = "multi_thread")]
async fn messages_past_ejabberds_offline_limit_are_retried_then_parked() {
    let server = Ejabberd::start(&["relay"]).await;
    let sender = server.register_as("relay");
    let recipient = server.register("ej-offline");
    let (setup, ingress) = Setup::new(&server, sender).await;
    let relay = setup.relay(&server, &[("HERALD_RETRY_DELAYS", "100ms,100ms")]);
    setup.relay_ready().await;

    let texts: Vec<String> = (0..105).map(|i| format!("offline {i:03}")).collect();
    for text in &texts {
        setup.post(&recipient.jid, text).await;
    }
    let dead = setup.broker.topology().dead_queue();
    poll::until("the 5 messages past the limit to be parked", SETTLED, || async {
        (setup.broker.ready(&dead).await == 5).then_some(())
    })
    .await;
    let (retried, metrics) = setup.retried().await;
    assert_eq!(retried, 10.0, "each retried twice first: {metrics}");
    let parked = setup.broker.get(&dead).await.expect("a parked job");
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("resource-constraint (wait)"), "{reason}");

    // The recipient comes online and gets the 100 from the store, each once.
    let mut rx = Receiver::connect_to(server.plain_port, &recipient).await;
    let got = rx.collect(100, ARRIVAL).await;
    let distinct: std::collections::HashSet<_> = got.iter().map(|m| &m.body).collect();
    assert_eq!((got.len(), distinct.len()), (100, 100), "the stored 100, each once");

    assert!(relay.terminate(ARRIVAL).await, "the relay stops cleanly");
    setup.broker.cleanup(&[Duration::from_millis(100)]).await;
    drop(ingress);
}

/// A group chat room on ejabberd's MUC service: the relay joins as its
/// account's nick before its first message there.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_joins_an_ejabberd_room_and_speaks_there() {
    let server = Ejabberd::start(&["relay"]).await;
    let sender = server.register_as("relay");
    let owner = server.register("room-owner");
    let (setup, ingress) = Setup::new(&server, sender).await;
    let mut watcher = Receiver::connect_to(server.plain_port, &owner).await;
    let room = format!("ops@{ROOMS}");
    watcher.join_room(&room, "watcher").await;
    // An instant room: the owner accepts the default configuration.
    watcher.configure_room(&room, &[]).await;
    let relay = setup.relay(&server, &[]);
    setup.relay_ready().await;

    let response = setup
        .http
        .post(format!("http://127.0.0.1:{}/msg", setup.env.ingress_port))
        .basic_auth(&setup.sender.jid, Some("pw"))
        .json(&serde_json::json!({ "to": room, "type": "groupchat", "body": "db-7 is down" }))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202);
    let m = watcher.next(ARRIVAL).await.expect("the room relays the message");
    assert_eq!(
        (m.kind, m.body.as_str(), m.from.as_str()),
        (MessageType::Groupchat, "db-7 is down", format!("{room}/relay").as_str())
    );
    assert!(watcher.next(Duration::from_millis(500)).await.is_none(), "nothing twice");

    assert!(relay.terminate(ARRIVAL).await, "the relay stops cleanly");
    setup.nothing_left().await;
    drop(ingress);
}
