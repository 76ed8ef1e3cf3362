//! Nothing lost: bounces, retries, parking and replay, and faults injected
//! into the real processes (SIGKILL, SIGTERM, an XMPP server outage, a cut
//! broker link, a wrong password). Every message that got a 202 must
//! arrive; duplicates are counted and reported (`FAULT …` lines).

use std::time::Duration;

use herald_shared::topology::headers;
use herald_tests::{
    Receiver, Stack, StackOptions,
    binaries::Service,
    broker::header_text,
    fixture::{ARRIVAL, Fixture, job_id, report},
    load::{self, Sent, Tally},
    poll,
    proxy::{self, Proxy},
};

#[tokio::test(flavor = "multi_thread")]
async fn a_bounced_message_is_parked_with_its_condition_and_can_be_replayed() {
    let stack = Stack::start(StackOptions::default()).await;
    // Nobody has this account yet: Prosody bounces service-unavailable
    // after it acknowledged the stanza.
    let user = format!("later-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let id = job_id(stack.post(&format!("/msg/{user}"), Some("text/plain"), "wait for me").await).await;
    let dead = stack.broker.topology().dead_queue();
    poll::until("the bounced job to be parked", ARRIVAL, || async {
        (stack.broker.ready(&dead).await == 1).then_some(())
    })
    .await;

    let broker = herald_tests::stack::broker_args(&stack.broker.url, &stack.broker.prefix);
    let mut listing = Vec::new();
    assert_eq!(herald_relay::broker::dead::list(&broker, 10, &mut listing).await.expect("list"), 1);
    let parked: serde_json::Value = serde_json::from_slice(&listing).expect("one JSON line");
    assert_eq!(parked["id"], id.as_str());
    assert_eq!(parked["attempts"], 1);
    let reason = parked["reason"].as_str().expect("reason");
    assert!(reason.contains("service-unavailable") && reason.contains("cancel"), "reason: {reason}");
    // A quorum queue takes returned messages back asynchronously.
    poll::until("listing to leave the job parked", ARRIVAL, || async {
        (stack.broker.ready(&dead).await == 1).then_some(())
    })
    .await;

    // The account appears; the operator replays the job and it arrives.
    let account = stack.prosody.register_as(&user, "pw");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    assert_eq!(herald_relay::broker::dead::replay(&broker, &["no-such-id".into()]).await.expect("replay"), 0);
    assert_eq!(herald_relay::broker::dead::replay(&broker, std::slice::from_ref(&id)).await.expect("replay"), 1);
    let m = rx.next(ARRIVAL).await.expect("the replayed job arrives");
    assert_eq!((m.id.as_deref(), m.body.as_str()), (Some(id.as_str()), "wait for me"));
    assert_eq!(stack.broker.ready(&dead).await, 0);

    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.relay_admin_url.as_deref().expect("relay")))
        .send()
        .await
        .expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(text.contains(r#"herald_bounces_total{condition="service-unavailable"} 1"#), "{text}");
    assert!(text.contains(r#"herald_deliveries_total{outcome="parked"} 1"#), "{text}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_killed_mid_burst_loses_nothing() {
    let f = Fixture::start().await;
    let (mut rx, ingress, relay) = f.start_services().await;
    let (progress, burst) = f.burst(2000);
    Fixture::wait_progress(&progress, 600).await;
    relay.kill();
    Fixture::wait_progress(&progress, 1200).await;
    let relay = f.spawn_relay();
    let sent = burst.await.expect("burst");
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, ARRIVAL).await);
    report("relay SIGKILL mid-burst", &tally);
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_burst_loses_and_duplicates_nothing() {
    let f = Fixture::start().await;
    let (mut rx, ingress, relay) = f.start_services().await;
    let (progress, burst) = f.burst(2000);
    Fixture::wait_progress(&progress, 500).await;
    // A rolling restart of both: requests in flight finish, new ones are
    // refused until the new ingress listens (the burst retries them).
    assert!(relay.terminate(ARRIVAL).await, "relay exits 0 on SIGTERM");
    let relay = f.spawn_relay();
    Fixture::wait_progress(&progress, 1000).await;
    assert!(ingress.terminate(ARRIVAL).await, "ingress exits 0 on SIGTERM");
    let ingress = f.spawn_ingress();
    let sent = burst.await.expect("burst");
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, ARRIVAL).await);
    report("SIGTERM (relay, then ingress) mid-burst", &tally);
    assert_eq!(tally.duplicates, 0, "a graceful restart duplicates nothing: {tally:?}");
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xmpp_server_outage_mid_burst_loses_nothing() {
    let mut f = Fixture::start().await;
    let (mut rx, ingress, relay) = f.start_services().await;
    f.wait_ready(f.env.relay_admin_port).await;
    let (progress, burst) = f.burst(2000);
    Fixture::wait_progress(&progress, 500).await;
    f.prosody.stop_gracefully().await;
    // The outage itself lasts 10 s of wall time (the scenario, not a wait
    // for some condition), while the burst keeps posting.
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(10);
    let not_ready = poll::until("the relay to report its session down", ARRIVAL, || async {
        f.ready(f.env.relay_admin_port).await.err()
    })
    .await;
    assert!(not_ready.contains(&f.sender.jid), "readyz names the session: {not_ready}");
    tokio::time::sleep_until(outage_end).await;
    f.prosody.start_again().await;
    let sent = burst.await.expect("burst");
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, Duration::from_secs(60)).await);
    report("Prosody stopped for 10 s mid-burst", &tally);
    f.wait_ready(f.env.relay_admin_port).await;
    f.stop(ingress, relay).await;
}

/// A server that lost a stream's session (a restart) may still answer an
/// attempt to resume it with how many of its stanzas it handled
/// (`<sm:failed h=…/>`), and Prosody 0.12 saves a count that covers the
/// stanza it was reading when it was told to stop, then drops that stanza
/// (one message lost in 3 of 15 runs of the outage test above). The relay
/// trusts no count given after its connection was lost: what was
/// unacknowledged then is retried. Here the server claims it handled five
/// messages that never reached it.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_servers_saved_count_acknowledges_nothing() {
    let mut f = Fixture::start().await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", f.prosody.port)).await;
    let via_proxy =
        f.prosody.accounts_entry(&f.sender).replace(&format!(":{}\"", f.prosody.port), &format!(":{}\"", proxy.port));
    std::fs::write(&f.env.accounts_file, via_proxy).expect("accounts");
    let ingress = f.spawn_ingress();
    // Jobs wait for their acks far longer than this test takes.
    let mut env = f.relay_env();
    env.push(("HERALD_ACK_TIMEOUT", "120s".into()));
    let relay = Service::spawn_logged("herald-relay", &env, Some(&f.log("relay")));
    f.wait_ready(f.env.ingress_admin_port).await;
    f.wait_ready(f.env.relay_admin_port).await;
    let post = |body: String| f.post(body).send();
    let mut rx = Receiver::connect(&f.prosody, &f.recipient).await;
    let first = job_id(post("before".into()).await.expect("post")).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("delivered").id.as_ref(), Some(&first));
    // The recipient gets the rest from the restarted server's offline store
    // (and "before" again, if it had not acknowledged it to the server).
    drop(rx);

    // Five messages leave the relay and never reach the server.
    proxy.freeze();
    let mut sent = Sent::default();
    for i in 0..5 {
        let body = format!("in flight {i}");
        sent.accepted.insert(job_id(post(body.clone()).await.expect("post")).await, body);
    }
    let work = f.broker.topology().work_queue();
    poll::until("the relay to take every job", ARRIVAL, || async { (f.broker.ready(&work).await == 0).then_some(()) })
        .await;
    f.prosody.stop_gracefully().await;
    proxy.cut().await;
    f.prosody.inflate_saved_counts(&f.sender, 5);
    f.prosody.start_again().await;
    proxy.restore();

    let mut rx = Receiver::connect(&f.prosody, &f.recipient).await;
    let mut received = load::receive_all(&mut rx, &sent, Duration::from_secs(30)).await;
    received.retain(|m| m.id.as_ref() != Some(&first));
    report("a restarted server claims five unseen messages", &Tally::of(&sent, &received));
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_broker_link_is_503_never_202_and_heals_without_restart() {
    let mut f = Fixture::start().await;
    let proxy = Proxy::start(proxy::amqp_authority(&f.broker.url)).await;
    f.env.amqp_url = proxy.amqp_url(&f.broker.url);
    let (mut rx, ingress, relay) = f.start_services().await;
    f.wait_ready(f.env.relay_admin_port).await;
    let post = |body: String| f.post(body).send();
    let mut sent = Sent::default();
    let before = job_id(post("before the cut".into()).await.expect("post")).await;
    sent.accepted.insert(before, "before the cut".into());

    proxy.cut().await;
    for i in 0..20 {
        let response = post(format!("during the cut {i}")).await.expect("the ingress answers");
        assert_eq!(response.status(), 503, "no 2xx without a confirm");
        assert!(response.headers().contains_key("retry-after"));
    }
    f.wait_broker_outage_seen().await;

    proxy.restore();
    let after = poll::until("the ingress to accept again", ARRIVAL, || async {
        let response = post("after the cut".into()).await.ok()?;
        (response.status() == 202).then_some(response)
    })
    .await;
    sent.accepted.insert(job_id(after).await, "after the cut".into());
    f.wait_ready(f.env.relay_admin_port).await;
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, ARRIVAL).await);
    report("broker link cut and restored", &tally);
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_keeps_the_jobs_reports_not_ready_and_says_why_once() {
    let f = Fixture::start().await;
    // The relay has one password, the server another.
    f.prosody.register_as(f.sender.jid.split('@').next().expect("user"), "not-what-the-relay-has");
    let (mut rx, ingress, relay) = f.start_services().await;
    let why = poll::until("the relay to report the rejected login", ARRIVAL, || async {
        f.ready(f.env.relay_admin_port).await.err().filter(|why| why.contains("login rejected"))
    })
    .await;
    assert!(why.contains(&f.sender.jid), "{why}");

    let mut sent = Sent::default();
    for i in 0..5 {
        let body = format!("held {i}");
        let response = f.post(body.clone()).send().await.expect("post");
        sent.accepted.insert(job_id(response).await, body);
    }
    // The jobs cycle through the delay queues; none is parked or lost.
    let topology = f.broker.topology();
    poll::until("every job to have been retried at least once", ARRIVAL, || async {
        let metrics = f
            .http
            .get(format!("http://127.0.0.1:{}/metrics", f.env.relay_admin_port))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let retried = metrics.lines().find(|l| l.starts_with(r#"herald_deliveries_total{outcome="retried"}"#))?;
        (retried.rsplit(' ').next()?.parse::<u64>().ok()? >= 10).then_some(())
    })
    .await;
    assert_eq!(f.broker.ready(&topology.dead_queue()).await, 0, "nothing parked");
    assert!(rx.next(Duration::from_millis(200)).await.is_none(), "nothing delivered");
    let log = std::fs::read_to_string(f.log("relay")).expect("relay log");
    // Ten and more failed attempts, summarised: a line per sender every 10 s.
    let retry_lines = log.lines().filter(|l| l.contains("deliveries failed; retrying")).count();
    assert!((1..10).contains(&retry_lines), "{retry_lines} retry lines for 10+ retries:\n{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("XMPP login rejected")).collect();
    assert_eq!(lines.len(), 1, "one clear line, not one per retry:\n{log}");
    assert!(lines[0].contains(&f.sender.jid) && lines[0].contains("password"), "{}", lines[0]);

    // The operator fixes the password: everything held arrives.
    f.prosody.register_as(f.sender.jid.split('@').next().expect("user"), &f.sender.password);
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, Duration::from_secs(60)).await);
    report("wrong sender password, then fixed", &tally);
    f.stop(ingress, relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_carries_its_attempt_count_and_reason() {
    let f = Fixture::start().await;
    // A relay whose XMPP server does not answer, with a long last step so
    // that the retried job can be looked at in its delay queue.
    let closed_port = herald_tests::prosody::free_port();
    let accounts = f.dir.path().join("unreachable.toml");
    let entry = format!(
        "[[accounts]]\njid = \"{}\"\npassword = \"x\"\nserver = \"127.0.0.1:{closed_port}\"\ntls = \"none\"\n",
        f.sender.jid
    );
    std::fs::write(&accounts, entry).expect("accounts");
    let mut env = f.relay_env();
    env.retain(|(k, _)| *k != "HERALD_ACCOUNTS_FILE" && *k != "HERALD_RETRY_DELAYS");
    env.push(("HERALD_ACCOUNTS_FILE", accounts.display().to_string()));
    env.push(("HERALD_RETRY_DELAYS", "1h".into()));
    let ingress = f.spawn_ingress();
    let relay = Service::spawn_logged("herald-relay", &env, Some(&f.log("relay")));
    f.wait_ready(f.env.ingress_admin_port).await;
    let response = f.post("later").send().await.expect("post");
    let id = job_id(response).await;
    let retry_queue = f.broker.topology().retry_queue(Duration::from_secs(3600));
    let retried =
        poll::until("the job in the 1h delay queue", ARRIVAL, || async { f.broker.get(&retry_queue).await }).await;
    assert_eq!(retried.delivery.properties.message_id().as_ref().map(|m| m.to_string()), Some(id));
    assert_eq!(header_text(&retried.delivery.properties, headers::ATTEMPT).as_deref(), Some("1"));
    let reason = header_text(&retried.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("server unreachable"), "{reason}");
    f.broker.cleanup(&[Duration::from_secs(3600)]).await;
    f.stop(ingress, relay).await;
}
