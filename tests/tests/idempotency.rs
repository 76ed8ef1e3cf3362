//! Idempotency: a repeated request with the same Idempotency-Key, or the
//! same Alertmanager notification sent twice, becomes the same job id and
//! one delivery; and a relay does not send an idempotent job twice even
//! when the broker hands it the job twice (two ingress replicas), unless
//! the second copy is one a relay made after the delivery bounced.

use crate::{ALERTMANAGER, ARRIVAL};
use herald_shared::topology::headers;
use herald_tests::stack::user_entry;
use herald_tests::{Receiver, Stack, StackOptions, admin, poll};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

/// How long to watch for a second copy that must not come.
const QUIET: Duration = Duration::from_millis(800);

async fn ids(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["jobs"].as_array().expect("jobs").iter().map(|j| j["id"].as_str().expect("id").to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_is_one_job_and_one_message() {
    let extra = user_entry("other@localhost", "other-secret", None);
    let stack = Stack::start(StackOptions { extra_users: extra, ..Default::default() }).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let url = format!("{}/msg/{}", stack.ingress_url, oncall.jid);
    let post = |user: &str, password: &str, key: &str, body: &str| {
        stack
            .http
            .post(&url)
            .basic_auth(user, Some(password))
            .header("content-type", "text/plain")
            .header("idempotency-key", key)
            .body(body.to_owned())
            .send()
    };

    let first =
        ids(post(&stack.sender.jid, &stack.http_password, "deploy-42", "deploy 42 done").await.expect("HTTP")).await;
    let again =
        ids(post(&stack.sender.jid, &stack.http_password, "deploy-42", "deploy 42 done").await.expect("HTTP")).await;
    assert_eq!(first, again, "the same key, the same job");
    let m = rx.next(ARRIVAL).await.expect("delivered once");
    assert_eq!((m.body.as_str(), m.id.as_ref()), ("deploy 42 done", Some(&first[0])));
    assert!(rx.next(QUIET).await.is_none(), "and only once");

    let other = ids(post("other@localhost", "other-secret", "deploy-42", "x").await.expect("HTTP")).await;
    assert_ne!(other, first, "keys are per user");
    let bad = post(&stack.sender.jid, &stack.http_password, "two words", "x").await.expect("HTTP");
    assert_eq!(bad.status(), 400);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_alertmanager_notification_twice_is_delivered_once() {
    let stack = Stack::start(StackOptions::default()).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let path = format!("/alertmanager/{}", oncall.jid);
    // Both peers of an HA pair send it.
    let first = ids(stack.post(&path, Some("application/json"), ALERTMANAGER).await).await;
    let second = ids(stack.post(&path, Some("application/json"), ALERTMANAGER).await).await;
    assert_eq!(first, second);
    let m = rx.next(ARRIVAL).await.expect("the notification");
    assert!(m.body.starts_with("🔥 FIRING:2"), "{}", m.body);
    assert!(rx.next(QUIET).await.is_none(), "delivered once");
    // Resolved is another notification.
    let resolved =
        ids(stack.post(&path, Some("application/json"), ALERTMANAGER.replace("\"firing\"", "\"resolved\"")).await)
            .await;
    assert_ne!(resolved, first);
    let m = rx.next(ARRIVAL).await.expect("the resolved notification");
    assert!(m.body.starts_with("✅ RESOLVED"), "{}", m.body);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_resolving_in_a_firing_group_and_a_second_route_are_new_notifications() {
    let stack = Stack::start(StackOptions::default()).await;
    let (oncall, dba) = (stack.prosody.register("oncall"), stack.prosody.register("dba"));
    let (mut rx_oncall, mut rx_dba) =
        (Receiver::connect(&stack.prosody, &oncall).await, Receiver::connect(&stack.prosody, &dba).await);
    let post = |to: &str, payload: String| {
        let path = format!("/alertmanager/{to}");
        let stack = &stack;
        async move { stack.post(&path, Some("application/json"), payload).await }
    };
    let first = ids(post(&oncall.jid, ALERTMANAGER.to_owned()).await).await;
    assert!(rx_oncall.next(ARRIVAL).await.expect("the notification").body.starts_with("🔥 FIRING:2"));
    // The same notification to a second route (another webhook_config of
    // the same receiver) is that route's first.
    let to_dba = ids(post(&dba.jid, ALERTMANAGER.to_owned()).await).await;
    assert_ne!(to_dba, first);
    assert!(rx_dba.next(ARRIVAL).await.expect("the notification for the second route").body.starts_with("🔥 FIRING:2"));
    // db-9 recovers while db-7 still fires: the group stays "firing", the
    // alerts and their fingerprints are the same, and it is news.
    let db9 = r#""status": "firing",
      "labels": {
        "alertname": "PostgresReplicationLag",
        "cluster": "db-eu",
        "instance": "db-9:9187""#;
    assert!(ALERTMANAGER.contains(db9), "the fixture has db-9 firing");
    let db9_resolved = ALERTMANAGER.replacen(db9, &db9.replacen("firing", "resolved", 1), 1);
    let update = ids(post(&oncall.jid, db9_resolved).await).await;
    assert_ne!(update, first);
    let m = rx_oncall.next(ARRIVAL).await.expect("the update");
    assert!(m.body.starts_with("🔥 FIRING:1"), "{}", m.body);
    assert!(rx_oncall.next(QUIET).await.is_none() && rx_dba.next(QUIET).await.is_none(), "each once");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_sends_an_idempotent_job_once_even_when_queued_twice() {
    let stack = Stack::start(StackOptions::default()).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let job = |text: &str| stack.job(&oncall.jid, text);
    // Two ingress replicas took the same request: the same id, twice.
    let idempotent = stack.idempotent_job(&oncall.jid, "k", "from two replicas");
    stack.broker.publish_job(&idempotent, true).await;
    stack.broker.publish_job(&idempotent, true).await;
    // Without the mark, a copy that comes after the first was delivered is
    // sent again (at least once); only a copy that arrives while the first
    // is in flight waits and is dropped.
    let plain = job("plain");
    stack.broker.publish_job(&plain, false).await;
    stack.broker.publish_job(&plain, false).await;

    let mut got = Vec::new();
    while let Some(m) = rx.next(QUIET.max(Duration::from_secs(2))).await {
        got.push(m.body);
    }
    got.sort();
    assert!(got.len() == 2 || got.len() == 3, "{got:?}");
    assert_eq!(got.iter().filter(|b| *b == "from two replicas").count(), 1, "the idempotent job once: {got:?}");
    assert!(got.contains(&"plain".to_owned()), "{got:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_made_over_a_bounce_is_sent_though_its_id_was_delivered() {
    let stack = Stack::start(StackOptions::default()).await;
    let oncall = stack.prosody.register("oncall");
    let mut rx = Receiver::connect(&stack.prosody, &oncall).await;
    let job = stack.idempotent_job(&oncall.jid, "k", "bounced elsewhere");
    stack.broker.publish_job(&job, true).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("delivered").body, "bounced elsewhere");
    // A second copy, as a second ingress replica would queue it: acked as
    // a duplicate.
    stack.broker.publish_job(&job, true).await;
    let admin = stack.relay_admin_url.as_deref().expect("relay");
    poll::until("the second copy to be acked as a duplicate", ARRIVAL, || async {
        let metrics = admin::metrics(&stack.http, admin).await;
        (admin::sample(&metrics, r#"herald_deliveries_total{outcome="duplicate"}"#)? >= 1.0).then_some(())
    })
    .await;
    // The retry copy another relay made when the recipient's server bounced
    // the message, here before that relay's record of the bounce (or with
    // the record lost): its delivery failed, so it is sent.
    let mut marked = FieldTable::default();
    marked.insert(headers::IDEMPOTENT.into(), AMQPValue::Boolean(true));
    marked.insert(headers::BOUNCED.into(), AMQPValue::Boolean(true));
    marked.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(1));
    stack.broker.publish_job_with_headers(&job, marked).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("sent again").body, "bounced elsewhere");
    stack.stop().await;
}
