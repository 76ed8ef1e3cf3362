//! The relay's settlement under the faults that used to lose or wedge
//! jobs: a broker blip during an XMPP outage, a forged bounce, a server that
//! stops reading, a settlement the broker will not take, parked jobs listed
//! again and again, nonsense settings, a broker that never answers, and
//! several relays in one room.

use std::time::Duration;

use herald_shared::{Body, Job, MessageKind, Recipient, Sender, topology::headers};
use herald_tests::{
    Broker, Prosody, Receiver, Stack, StackOptions,
    admin::{metrics, readyz, sample},
    binaries::{self, Service},
    broker::header_text,
    fixture::{ARRIVAL, Fixture, job_id, report},
    load::{self, Sent, Tally},
    poll,
    prosody::ROOMS,
    proxy::{self, Proxy},
    stack::relay_config,
};
use tokio_util::sync::CancellationToken;
use tokio_xmpp::parsers::{
    message::{Id, Message, MessageType},
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
};

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_jobs_survive_a_broker_blip_during_an_xmpp_outage() {
    let mut f = Fixture::start().await;
    let proxy = Proxy::start(proxy::amqp_authority(&f.broker.url)).await;
    let mut rx = Receiver::connect(&f.prosody, &f.recipient).await;
    let ingress = f.spawn_ingress();
    // The relay reaches the broker through the proxy, and its jobs wait
    // long for their session: they are in flight when the link drops.
    let mut env = f.relay_env();
    env.retain(|(k, _)| !matches!(*k, "HERALD_AMQP_URL" | "HERALD_ONLINE_TIMEOUT"));
    env.push(("HERALD_AMQP_URL", proxy.amqp_url(&f.broker.url)));
    env.push(("HERALD_ONLINE_TIMEOUT", "6s".into()));
    let relay = Service::spawn_logged("herald-relay", &env, Some(&f.log("relay")));
    f.wait_ready(f.env.ingress_admin_port).await;
    f.wait_ready(f.env.relay_admin_port).await;

    f.prosody.stop_gracefully().await;
    let mut sent = Sent::default();
    for i in 0..5 {
        let body = format!("idempotent {i}");
        let response = f
            .post(body.clone())
            .header("idempotency-key", format!("blip-{i}-{}", uuid::Uuid::new_v4().simple()))
            .send()
            .await
            .expect("post");
        sent.accepted.insert(job_id(response).await, body);
    }
    let work = f.broker.topology().work_queue();
    poll::until("the relay to hold every job", ARRIVAL, || async { (f.broker.ready(&work).await == 0).then_some(()) })
        .await;
    // The broker link drops and comes back while the attempts still wait
    // for the session: the broker redelivers every job on the new channel.
    proxy.cut().await;
    proxy.restore();
    let admin = format!("http://127.0.0.1:{}", f.env.relay_admin_port);
    poll::until("the relay to consume again", ARRIVAL, || async {
        (sample(&metrics(&f.http, &admin).await, "herald_consuming").unwrap_or(0.0) == 1.0).then_some(())
    })
    .await;
    f.prosody.start_again().await;
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, Duration::from_secs(60)).await);
    report("idempotent jobs, broker link cut during an XMPP outage", &tally);
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_cannot_park_or_resend_what_it_received() {
    let stack = Stack::start(StackOptions::default()).await;
    let bob = stack.prosody.register("bob");
    let mut rx = Receiver::connect(&stack.prosody, &bob).await;
    let id = job_id(stack.post(&format!("/msg/{}", bob.jid), Some("text/plain"), "for bob").await).await;
    let received = rx.next(ARRIVAL).await.expect("delivered");
    assert_eq!(received.id.as_deref(), Some(id.as_str()));
    // Bob's client answers the message with errors, as if it bounced, to
    // the sending session (a server drops an error sent to a bare JID).
    let sender: tokio_xmpp::jid::Jid = received.from.parse().expect("the sender's full JID");
    assert!(sender.resource().is_some(), "{sender}");
    for (kind, condition) in [
        (ErrorType::Cancel, DefinedCondition::ServiceUnavailable),
        (ErrorType::Wait, DefinedCondition::ResourceConstraint),
    ] {
        let mut error = Message::new(Some(sender.clone()));
        error.type_ = MessageType::Error;
        error.id = Some(Id(id.clone()));
        error.payloads.push(StanzaError::new(kind, condition, "en", "forged").into());
        rx.send(error.into());
    }
    let admin = stack.relay_admin_url.clone().expect("relay");
    let text = poll::until("the relay to have read and ignored both errors", ARRIVAL, || async {
        let text = metrics(&stack.http, &admin).await;
        (sample(&text, "herald_bounces_ignored_total").unwrap_or(0.0) == 2.0).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, r#"herald_deliveries_total{outcome="parked"}"#).unwrap_or(0.0), 0.0, "{text}");
    assert_eq!(sample(&text, r#"herald_deliveries_total{outcome="retried"}"#).unwrap_or(0.0), 0.0, "{text}");
    assert_eq!(stack.broker.ready(&stack.broker.topology().dead_queue()).await, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_reading_holds_up_no_other_sender_and_is_reported() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start().await;
    let (stuck, fine, oncall) = (prosody.register("stuck"), prosody.register("fine"), prosody.register("oncall"));
    let proxy = Proxy::start(format!("127.0.0.1:{}", prosody.port)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts = dir.path().join("accounts.toml");
    let stuck_entry =
        prosody.accounts_entry(&stuck).replace(&format!(":{}\"", prosody.port), &format!(":{}\"", proxy.port));
    std::fs::write(&accounts, format!("{stuck_entry}{}", prosody.accounts_entry(&fine))).expect("accounts");
    let delays = [Duration::from_millis(200), Duration::from_millis(500)];
    let relay = herald_relay::Application::build(relay_config(&broker.url, &broker.prefix, accounts, &delays))
        .await
        .expect("relay builds");
    let admin = format!("http://127.0.0.1:{}", relay.admin_port());
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    let mut rx = Receiver::connect(&prosody, &oncall).await;
    let http = reqwest::Client::new();
    poll::until("the relay to be ready", ARRIVAL, || async { readyz(&http, &admin).await.ok() }).await;

    proxy.freeze();
    let job = |from: &str, text: &str| {
        let from = Sender::parse(from).expect("sender");
        let to = Recipient::parse(&oncall.jid, from.domain()).expect("recipient");
        let body = Body::parse(text.to_owned(), 1024).expect("body");
        Job::new_v1(from, to, MessageKind::parse(None).expect("kind"), body, None, None)
    };
    for i in 0..3 {
        broker.publish_job(&job(&stuck.jid, &format!("stuck {i}")), false).await;
        broker.publish_job(&job(&fine.jid, &format!("fine {i}")), false).await;
    }
    let mut got = Vec::new();
    while got.iter().filter(|m: &&String| m.starts_with("fine")).count() < 3 {
        got.push(rx.next(ARRIVAL).await.expect("the other sender's messages arrive").body);
    }
    let why = poll::until("readiness to name the stuck sender", ARRIVAL, || async {
        readyz(&http, &admin).await.err().filter(|why| why.contains(&stuck.jid))
    })
    .await;
    assert!(!why.contains(&fine.jid), "only the stuck sender is reported: {why}");

    // The link comes back: the stuck sender's jobs were retried, none lost.
    proxy.cut().await;
    proxy.restore();
    while got.iter().filter(|m| m.starts_with("stuck")).count() < 3 {
        got.push(rx.next(Duration::from_secs(60)).await.expect("the stuck sender's messages arrive").body);
    }
    poll::until("the relay to be ready again", Duration::from_secs(60), || async { readyz(&http, &admin).await.ok() })
        .await;
    stop.cancel();
    task.await.expect("relay task").expect("relay runs");
    broker.cleanup(&delays).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settlement_the_broker_refuses_is_held_not_requeued_and_keeps_its_reason() {
    let stack = Stack::start(StackOptions::default()).await;
    let dead = stack.broker.topology().dead_queue();
    let parked = || async {
        // `ready` first: a `get` from a missing queue closes the channel.
        poll::until("the job to be parked", ARRIVAL, || async { (stack.broker.ready(&dead).await == 1).then_some(()) })
            .await;
        stack.broker.get(&dead).await.expect("the parked job")
    };
    // A first park opens the relay's publishing channel.
    stack.broker.publish_raw(b"not a job").await;
    parked().await;
    // Then the parking lot vanishes under the relay: the next park is
    // returned as unroutable.
    stack.broker.delete_queue(&dead).await;
    stack.broker.publish_raw(b"not a job either").await;
    let parked = parked().await;
    assert_eq!(&*parked.delivery.data, b"not a job either");
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("cannot decode"), "{reason}");
    assert_eq!(header_text(&parked.delivery.properties, headers::ATTEMPT).as_deref(), Some("1"));
    let text = metrics(&stack.http, stack.relay_admin_url.as_deref().expect("relay")).await;
    assert_eq!(
        sample(&text, r#"herald_deliveries_total{outcome="requeued"}"#).unwrap_or(0.0),
        0.0,
        "no hot requeue: {text}"
    );
    assert_eq!(sample(&text, r#"herald_deliveries_total{outcome="parked"}"#).unwrap_or(0.0), 2.0, "{text}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_the_parked_jobs_fifty_times_keeps_every_one() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let dead = stack.broker.topology().dead_queue();
    for i in 0..3 {
        stack.broker.publish_to(&dead, format!("parked {i}").as_bytes()).await;
    }
    poll::until("three parked jobs", ARRIVAL, || async { (stack.broker.ready(&dead).await == 3).then_some(()) }).await;
    let broker = herald_tests::stack::broker_args(&stack.broker.url, &stack.broker.prefix);
    for round in 0..50 {
        let mut out = Vec::new();
        let listed = herald_relay::broker::dead::list(&broker, 10, &mut out).await.expect("list");
        assert_eq!(listed, 3, "round {round}");
        // A quorum queue takes returned messages back asynchronously.
        poll::until("the listed jobs back in the queue", ARRIVAL, || async {
            (stack.broker.ready(&dead).await == 3).then_some(())
        })
        .await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nonsense_settings_are_refused_at_start_naming_the_setting() {
    let relay = binaries::path("herald-relay");
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(&accounts, "[[accounts]]\njid = \"a@localhost\"\npassword = \"p\"\n").expect("accounts");
    let cases = [
        ("HERALD_PREFETCH", "0", "--prefetch"),
        ("HERALD_RETRY_DELAYS", ",", "at least one retry delay"),
        ("HERALD_RETRY_DELAYS", "1s,500us", "at least 100ms"),
        ("HERALD_ACK_TIMEOUT", "0s", "--ack-timeout"),
        ("HERALD_ONLINE_TIMEOUT", "0s", "--online-timeout"),
        ("HERALD_DRAIN_TIMEOUT", "10ms", "--drain-timeout"),
        ("HERALD_MAX_STANZA_BYTES", "100", "--max-stanza-bytes"),
        ("HERALD_SESSION_IDLE", "soon", "--session-idle"),
        // Not longer than two ack timeouts (30 s by default).
        ("HERALD_SESSION_IDLE", "1m", "HERALD_SESSION_IDLE (1m) must be longer"),
    ];
    for (variable, value, expected) in cases {
        let output = std::process::Command::new(&relay)
            .env_clear()
            .env("HERALD_ACCOUNTS_FILE", &accounts)
            // Nothing listens here: a setting that got through would hang
            // on connecting, not exit.
            .env("HERALD_AMQP_URL", format!("amqp://127.0.0.1:{}/%2f", herald_tests::prosody::free_port()))
            .env(variable, value)
            .output()
            .expect("run herald-relay");
        // clap refuses a setting on stderr; a refused combination is
        // logged (to stdout).
        let said = format!("{}{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
        assert!(!output.status.success(), "{variable}={value:?} was accepted");
        assert!(said.contains(expected), "{variable}={value:?}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_never_answers_does_not_keep_the_relay_from_stopping() {
    let f = Fixture::start().await;
    // Accepts TCP connections and forwards nothing: the AMQP handshake
    // never completes.
    let proxy = Proxy::start(proxy::amqp_authority(&f.broker.url)).await;
    proxy.freeze();
    let mut env = f.relay_env();
    env.retain(|(k, _)| *k != "HERALD_AMQP_URL");
    env.push(("HERALD_AMQP_URL", proxy.amqp_url(&f.broker.url)));
    let relay = Service::spawn_logged("herald-relay", &env, Some(&f.log("relay")));
    poll::until("the relay to report it cannot consume", ARRIVAL, || async {
        f.ready(f.env.relay_admin_port).await.err().filter(|why| why.contains("not consuming"))
    })
    .await;
    poll::until("a connect attempt to time out and say so", ARRIVAL, || async {
        std::fs::read_to_string(f.log("relay")).ok().filter(|log| log.contains("no answer within"))
    })
    .await;
    assert!(relay.terminate(ARRIVAL).await, "the relay exits 0 on SIGTERM while connecting");
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_whose_nick_is_taken_in_a_room_join_under_their_own_and_all_deliver() {
    let stack = Stack::start(StackOptions::default()).await;
    let admin = stack.prosody.room_admin();
    let mut watcher = Receiver::connect(&stack.prosody, &admin).await;
    let room = format!("ops@{ROOMS}");
    watcher.join_room(&room, "watcher").await;
    // Someone else sits in the room under the relay account's nick.
    let nick = stack.sender.jid.split('@').next().expect("local part").to_owned();
    let squatter = stack.prosody.register("squatter");
    let mut squatter = Receiver::connect(&stack.prosody, &squatter).await;
    squatter.join_room(&room, &nick).await;

    // A second relay on the same queue and account, named "two" (the
    // harness names the first "test").
    let accounts = stack.dir.path().join("accounts.toml");
    let mut config = relay_config(&stack.broker.url, &stack.broker.prefix, accounts, &stack.options.retry_delays);
    config.instance = "two".into();
    let second = herald_relay::Application::build(config).await.expect("second relay builds");
    let second_admin = format!("http://127.0.0.1:{}", second.admin_port());
    let stop = CancellationToken::new();
    let task = tokio::spawn(second.run_until(stop.clone().cancelled_owned()));
    for url in [stack.relay_admin_url.clone().expect("relay"), second_admin] {
        poll::until("both relays to be ready", ARRIVAL, || async { readyz(&stack.http, &url).await.ok() }).await;
    }

    let count = 20;
    for i in 0..count {
        let json = serde_json::json!({ "to": room, "type": "groupchat", "body": format!("alert {i}") });
        assert_eq!(stack.post("/msg", Some("application/json"), json.to_string()).await.status(), 202);
    }
    let got = watcher.collect(count, ARRIVAL).await;
    let mut bodies: Vec<&str> = got.iter().map(|m| m.body.as_str()).collect();
    bodies.sort_unstable();
    bodies.dedup();
    assert_eq!(bodies.len(), count, "every message once: {got:#?}");
    let mut senders: Vec<&str> = got.iter().map(|m| m.from.as_str()).collect();
    senders.sort_unstable();
    senders.dedup();
    assert_eq!(senders, [format!("{room}/{nick}-test"), format!("{room}/{nick}-two")], "both relays delivered");
    assert_eq!(stack.broker.ready(&stack.broker.topology().dead_queue()).await, 0, "nothing parked");
    stop.cancel();
    task.await.expect("relay task").expect("relay runs");
    stack.stop().await;
}
