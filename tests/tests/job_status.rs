//! Job status and idempotency across replicas, through the outcomes stream:
//! `GET /jobs/{id}` on a second ingress replica reports a queued, a
//! delivered, a retrying and a parked job as they are, and only to their
//! owner; a key posted to two replicas is one job and one delivery; and an
//! idempotent job queued twice is delivered once by two relays.

use std::time::Duration;

use herald_tests::stack::{Replica, user_entry};
use herald_tests::{Receiver, Stack, StackOptions, admin, poll};
use serde_json::Value;

use crate::ARRIVAL;

/// How long to watch for a second copy that must not come.
const QUIET: Duration = Duration::from_secs(1);

async fn status(stack: &Stack, base: &str, user: (&str, &str), id: &str) -> reqwest::Response {
    stack.http.get(format!("{base}/jobs/{id}")).basic_auth(user.0, Some(user.1)).send().await.expect("HTTP")
}

/// Polls `base` until the job's status is `wanted`; its JSON.
async fn wait_status(stack: &Stack, base: &str, id: &str, wanted: &str) -> Value {
    let user = (stack.sender.jid.as_str(), stack.http_password.as_str());
    poll::until(&format!("job {id} to be {wanted} on the replica"), ARRIVAL, || async {
        let response = status(stack, base, user, id).await;
        if response.status() != 200 {
            return None;
        }
        let body: Value = response.json().await.expect("JSON");
        (body["status"] == wanted).then_some(body)
    })
    .await
}

/// Waits until `relay` has written at least `records` outcome records.
async fn wait_written(stack: &Stack, relay: &Replica, records: f64) {
    poll::until("the relay to write its records", ARRIVAL, || async {
        let metrics = admin::metrics(&stack.http, &relay.admin_url).await;
        (admin::sample(&metrics, "herald_outcomes_written_total")? >= records).then_some(())
    })
    .await;
}

async fn first_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("JSON");
    body["jobs"][0]["id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replica_reports_each_jobs_status_to_its_owner_only() {
    let extra = format!(
        "{}{}",
        user_entry("other@localhost", "other-pw", None),
        user_entry("ghostly@localhost", "ghost-pw", Some("ghost@localhost"))
    );
    let stack = Stack::start(StackOptions { relay: false, extra_users: extra, ..Default::default() }).await;
    let replica = stack.ingress_replica().await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;

    // Accepted by the first replica, no relay yet: queued on the second.
    let id = first_id(stack.post(&format!("/msg/{}", oncall.jid), Some("text/plain"), "db-7 is down").await).await;
    let queued = wait_status(&stack, &replica.url, &id, "queued").await;
    assert_eq!((queued["to"].as_str(), queued["attempts"].as_u64()), (Some(oncall.jid.as_str()), Some(0)), "{queued}");

    // Another user, a bad id, no credentials.
    let other = status(&stack, &replica.url, ("other@localhost", "other-pw"), &id).await;
    assert_eq!(other.status(), 404, "another user's job is not theirs to see");
    let problem: Value = other.json().await.expect("problem JSON");
    assert_eq!(problem["type"], "urn:herald:problem:unknown-job");
    let me = (stack.sender.jid.as_str(), stack.http_password.as_str());
    assert_eq!(status(&stack, &replica.url, me, "not-a-uuid").await.status(), 400);
    assert_eq!(status(&stack, &replica.url, me, &uuid::Uuid::now_v7().to_string()).await.status(), 404);
    let anonymous = stack.http.get(format!("{}/jobs/{id}", replica.url)).send().await.expect("HTTP");
    assert_eq!(anonymous.status(), 401);

    // A relay starts: delivered, with the server's ack time.
    let relay = stack.relay_replica("a").await;
    let m = rx.next(ARRIVAL).await.expect("delivered");
    assert_eq!(m.id.as_deref(), Some(id.as_str()));
    let delivered = wait_status(&stack, &replica.url, &id, "delivered").await;
    assert_eq!(delivered["attempts"], 1, "{delivered}");
    assert!(delivered["updated_at"].as_str() >= delivered["accepted_at"].as_str(), "{delivered}");
    assert!(delivered.get("reason").is_none(), "{delivered}");

    // A sender the relay holds no account for: retried.
    let response = stack
        .http
        .post(format!("{}/msg/{}", stack.ingress_url, oncall.jid))
        .basic_auth("ghostly@localhost", Some("ghost-pw"))
        .header("content-type", "text/plain")
        .body("from a ghost")
        .send()
        .await
        .expect("HTTP");
    let ghost = first_id(response).await;
    let user = ("ghostly@localhost", "ghost-pw");
    let retrying = poll::until("the ghost's job to be retrying", ARRIVAL, || async {
        let body: Value = status(&stack, &replica.url, user, &ghost).await.json().await.ok()?;
        (body["status"] == "retrying").then_some(body)
    })
    .await;
    assert!(retrying["reason"].as_str().is_some_and(|r| r.contains("no XMPP account")), "{retrying}");
    // Given back for a relay that may hold the account: not an attempt.
    assert!(retrying["attempts"] == 0 && retrying["next_attempt_at"].is_string(), "{retrying}");

    // A recipient whose server bounces it (no such account): parked.
    let nobody = format!("nobody-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let parked_id = first_id(stack.post(&format!("/msg/{nobody}"), Some("text/plain"), "hello?").await).await;
    let parked = wait_status(&stack, &replica.url, &parked_id, "parked").await;
    assert!(parked["reason"].as_str().is_some_and(|r| r.contains("service-unavailable")), "{parked}");
    assert_eq!(parked["attempts"], 1, "{parked}");

    relay.stop().await;
    replica.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_on_two_ingress_replicas_is_one_job_and_one_delivery() {
    let stack = Stack::start(StackOptions::default()).await;
    let replica = stack.ingress_replica().await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let post = |base: String| {
        stack
            .http
            .post(format!("{base}/msg/{}", oncall.jid))
            .basic_auth(&stack.sender.jid, Some(&stack.http_password))
            .header("content-type", "text/plain")
            .header("idempotency-key", "deploy-43")
            .body("deploy 43 done")
            .send()
    };
    let first = first_id(post(stack.ingress_url.clone()).await.expect("HTTP")).await;
    // Once the second replica knows the job (the window a race can slip
    // through is before that), the client's retry lands there.
    wait_status(&stack, &replica.url, &first, "delivered").await;
    let again = first_id(post(replica.url.clone()).await.expect("HTTP")).await;
    assert_eq!(again, first, "the same job");
    let m = rx.next(ARRIVAL).await.expect("delivered");
    assert_eq!((m.id.as_deref(), m.body.as_str()), (Some(first.as_str()), "deploy 43 done"));
    assert!(rx.next(QUIET).await.is_none(), "and only once");
    let metrics = admin::metrics(&stack.http, &replica.admin_url).await;
    assert_eq!(admin::sample(&metrics, "herald_jobs_published_total"), Some(0.0), "the replica published nothing");
    replica.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_deliver_an_idempotent_job_queued_twice_once() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let job = |text: &str| stack.job(&oncall.jid, text);
    let idempotent = stack.idempotent_job(&oncall.jid, "k", "once");

    // Relay a delivers three plain jobs, and once their records are out,
    // the first copy of the idempotent one: the records are in different
    // batches.
    let a = stack.relay_replica("a").await;
    for text in ["one", "two", "three"] {
        stack.broker.publish_job(&job(text), false).await;
        assert_eq!(rx.next(ARRIVAL).await.expect("a plain job").body, text);
    }
    wait_written(&stack, &a, 3.0).await;
    stack.broker.publish_job(&idempotent, true).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("the first copy").body, "once");
    wait_written(&stack, &a, 4.0).await;
    // Relay b starts, reads what a delivered, and a goes away. It reads the
    // idempotent delivery only: the batches of plain deliveries, which a
    // relay has nothing to learn from, it skips unread.
    let b = stack.relay_replica("b").await;
    poll::until("relay b to read relay a's delivery", ARRIVAL, || async {
        let metrics = admin::metrics(&stack.http, &b.admin_url).await;
        (admin::sample(&metrics, "herald_outcomes_read_total")? >= 1.0).then_some(())
    })
    .await;
    let metrics = admin::metrics(&stack.http, &b.admin_url).await;
    assert_eq!(admin::sample(&metrics, "herald_outcomes_read_total"), Some(1.0), "{metrics}");
    a.stop().await;

    // The second copy (another ingress replica took the same request) goes
    // to b: acked, not sent. A plain job after it is sent.
    stack.broker.publish_job(&idempotent, true).await;
    stack.broker.publish_job(&job("plain"), false).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("the plain job").body, "plain", "not the copy");
    assert!(rx.next(QUIET).await.is_none(), "the idempotent job once");
    let metrics = admin::metrics(&stack.http, &b.admin_url).await;
    assert_eq!(admin::sample(&metrics, r#"herald_deliveries_total{outcome="duplicate"}"#), Some(1.0), "{metrics}");
    b.stop().await;
    stack.stop().await;
}
