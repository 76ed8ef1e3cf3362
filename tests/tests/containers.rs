//! Faults of the broker itself, injected into its container mid-burst: a
//! stop (and a crash) with a start again, and a freeze (the cgroup freezer).
//! While the broker is out no post may get a 202 (nothing is confirmed);
//! afterwards everything that got a 202 arrives, and both services heal
//! without a restart. Posts with an `Idempotency-Key` arrive exactly once;
//! plain ones at least once (the relay forgets a plain job once it is
//! delivered, and a broker that lost the ack delivers it again).
//!
//! Only the container backend can do this to a broker: these tests are
//! ignored by default and panic unless `HERALD_TEST_BACKEND=containers`
//! (`cargo nextest run -p herald-tests --run-ignored all -E 'test(/^containers::/)'`
//! with `DOCKER_HOST` and the image variables set; see `containers`).

use std::time::Duration;

use herald_tests::{
    containers,
    fixture::{Fixture, report},
    load::{self, Tally},
    receiver::Received,
};

/// Posts sent at once while the broker is out.
const PROBES: usize = 4;
/// How long the ingress may take to answer a post while the broker is out
/// (its confirm timeout is 10 s, its connect timeout 5 s).
const ANSWER: Duration = Duration::from_secs(60);

/// How the broker's container goes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// The node shuts down and the container exits.
    Stop,
    /// SIGKILL: a crash.
    Kill,
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs HERALD_TEST_BACKEND=containers"]
async fn a_stopped_broker_container_is_503_never_202_and_everything_accepted_arrives_once() {
    broker_outage_mid_burst(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs HERALD_TEST_BACKEND=containers"]
async fn a_killed_broker_container_is_503_never_202_and_loses_nothing_accepted() {
    broker_outage_mid_burst(Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs HERALD_TEST_BACKEND=containers"]
async fn a_frozen_broker_container_confirms_nothing_and_everything_accepted_arrives() {
    containers::require();
    let f = Fixture::start().await;
    let (mut rx, ingress, relay) = f.start_services().await;
    f.wait_ready(f.env.relay_admin_port).await;
    let rabbitmq = f.broker.container().expect("the broker's container");
    let (progress, burst) = f.idempotent_burst(2000);
    Fixture::wait_progress(&progress, 500).await;

    rabbitmq.pause().await;
    // Answered 503 once the confirm (or the connection) times out: the
    // freeze lasts as long as that takes, not a fixed time.
    let probes = refused_while_out(&f, "while the broker is frozen").await;
    rabbitmq.unpause().await;

    let sent = burst.await.expect("burst");
    let received = without(load::receive_all(&mut rx, &sent, Duration::from_secs(60)).await, &probes);
    let tally = Tally::of(&sent, &received);
    report("broker container frozen mid-burst (idempotent posts)", &tally);
    assert_eq!(tally.duplicates, 0, "idempotent posts arrive once: {tally:?}");
    f.wait_ready(f.env.ingress_admin_port).await;
    f.wait_ready(f.env.relay_admin_port).await;
    f.stop(ingress, relay).await;
}

/// The broker's container stops (or dies) mid-burst and starts again: 503
/// with Retry-After while it is out, both services report it and heal on
/// their own, and every accepted message arrives: exactly once after a stop
/// (idempotent posts), at least once after a crash (plain posts).
async fn broker_outage_mid_burst(outage: Outage) {
    containers::require();
    let f = Fixture::start().await;
    let (mut rx, ingress, relay) = f.start_services().await;
    f.wait_ready(f.env.relay_admin_port).await;
    let rabbitmq = f.broker.container().expect("the broker's container");
    let (progress, burst) = match outage {
        Outage::Stop => f.idempotent_burst(2000),
        Outage::Kill => f.burst(2000),
    };
    Fixture::wait_progress(&progress, 500).await;

    match outage {
        Outage::Stop => rabbitmq.stop().await,
        Outage::Kill => rabbitmq.kill().await,
    }
    let probes = refused_while_out(&f, &format!("while the broker is out ({outage:?})")).await;
    f.wait_broker_outage_seen().await;

    rabbitmq.start_again().await;
    f.wait_ready(f.env.ingress_admin_port).await;
    f.wait_ready(f.env.relay_admin_port).await;
    let sent = burst.await.expect("burst");
    let received = without(load::receive_all(&mut rx, &sent, Duration::from_secs(60)).await, &probes);
    let tally = Tally::of(&sent, &received);
    match outage {
        Outage::Stop => {
            report("broker container stopped and started mid-burst (idempotent posts)", &tally);
            assert_eq!(tally.duplicates, 0, "idempotent posts arrive once: {tally:?}");
        }
        Outage::Kill => report("broker container killed and started mid-burst (plain posts)", &tally),
    }
    f.stop(ingress, relay).await;
}

/// Posts `PROBES` messages at once while the broker is out: each must be
/// answered within `ANSWER`, with a 503 and a Retry-After, never a 202.
/// Returns their bodies.
async fn refused_while_out(f: &Fixture, when: &str) -> Vec<String> {
    let bodies: Vec<String> =
        (0..PROBES).map(|i| format!("probe {i} {when} {}", uuid::Uuid::new_v4().simple())).collect();
    let posts = bodies.iter().map(|body| f.post(body.clone()).send());
    let answers = tokio::time::timeout(ANSWER, futures::future::join_all(posts))
        .await
        .unwrap_or_else(|_| panic!("{when}: the ingress did not answer within {ANSWER:?}"));
    for answer in answers {
        let response = answer.expect("the ingress answers");
        assert_eq!(response.status(), 503, "{when}: no 202 without a confirm");
        assert!(response.headers().contains_key("retry-after"), "{when}: a 503 says when to retry");
    }
    bodies
}

/// What arrived, less the probes: a post answered 503 may still have been
/// stored ("a 503 means not confirmed, not not stored") and may arrive.
fn without(received: Vec<Received>, probes: &[String]) -> Vec<Received> {
    received.into_iter().filter(|m| !probes.contains(&m.body)).collect()
}
