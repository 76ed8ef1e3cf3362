//! End to end: HTTP → ingress → RabbitMQ → relay → Prosody → a real XMPP
//! client. Every test uses its own queue prefix and fresh accounts.

use crate::ARRIVAL;
use herald_shared::topology::headers;
use herald_tests::broker::header_text;
use herald_tests::receiver::Received;
use herald_tests::{Receiver, Stack, StackOptions, poll};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio_xmpp::parsers::message::MessageType;

async fn accepted(response: reqwest::Response) -> Vec<(String, String)> {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, StatusCode::ACCEPTED, "expected 202, got {status}: {text}");
    let json: Value = serde_json::from_str(&text).expect("JSON body");
    json["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .map(|j| (j["id"].as_str().expect("id").to_owned(), j["to"].as_str().expect("to").to_owned()))
        .collect()
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let json: Value = response.json().await.expect("problem JSON");
    assert_eq!(json["status"], status.as_u16());
    assert!(json["type"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(json["detail"].as_str().is_some_and(|t| !t.is_empty()));
    json
}

#[tokio::test(flavor = "multi_thread")]
async fn three_payload_formats_arrive_as_sent() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("ops");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;

    let plain = accepted(
        stack.post(&format!("/msg/{}", account.jid), Some("text/plain; charset=utf-8"), "db-7 is down\n<&>").await,
    )
    .await;
    let form = accepted(
        stack
            .post(
                "/msg",
                Some("application/x-www-form-urlencoded"),
                format!("to={}&type=headline&body=form+body+%E2%9C%93&subject=Disk&thread=t-1", account.jid),
            )
            .await,
    )
    .await;
    let json = accepted(
        stack
            .post(
                "/msg",
                Some("application/json"),
                serde_json::json!({"to": account.jid, "type": "normal", "body": "json body", "subject": "CPU"})
                    .to_string(),
            )
            .await,
    )
    .await;

    let got: HashMap<String, Received> =
        rx.collect(3, ARRIVAL).await.into_iter().map(|m| (m.id.clone().expect("stanza id"), m)).collect();
    assert_eq!(got.len(), 3, "all three arrive: {got:?}");
    let sender = &stack.sender.jid;
    let plain = &got[&plain[0].0];
    assert_eq!((plain.body.as_str(), plain.kind.clone()), ("db-7 is down\n<&>", MessageType::Chat));
    assert!(plain.from.starts_with(sender.as_str()), "from {} is the sender {sender}", plain.from);
    let form = &got[&form[0].0];
    assert_eq!(form.body, "form body ✓");
    assert_eq!(form.kind, MessageType::Headline);
    assert_eq!(form.subject.as_deref(), Some("Disk"));
    assert_eq!(form.thread.as_deref(), Some("t-1"));
    let json = &got[&json[0].0];
    assert_eq!(
        (json.body.as_str(), json.kind.clone(), json.subject.as_deref()),
        ("json body", MessageType::Normal, Some("CPU"))
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_without_domain_gets_the_users_domain() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("local");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let local_part = account.jid.split('@').next().expect("local part");
    let jobs = accepted(stack.post(&format!("/msg/{local_part}"), Some("text/plain"), "short form").await).await;
    assert_eq!(jobs[0].1, account.jid);
    let m = rx.next(ARRIVAL).await.expect("message arrives");
    assert_eq!((m.id.as_deref(), m.body.as_str()), (Some(jobs[0].0.as_str()), "short form"));
    stack.stop().await;
}

/// Without a relay, jobs stay in the work queue: every refused request must
/// leave it untouched, and the one good request must add exactly one job.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let work = stack.broker.topology().work_queue();
    let to = "/msg/ops@localhost";

    for (user, password) in
        [(stack.sender.jid.as_str(), "wrong"), ("nobody@localhost", stack.http_password.as_str()), ("not a jid", "x")]
    {
        let r = stack.post_as(user, password, to, Some("text/plain"), "x").await;
        assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"herald\"");
        problem(r, StatusCode::UNAUTHORIZED).await;
    }
    let r = stack
        .http
        .post(format!("{}{to}", stack.ingress_url))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("http");
    problem(r, StatusCode::UNAUTHORIZED).await;

    problem(stack.post(to, Some("text/html"), "<p>x</p>").await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    problem(stack.post(to, None, "x").await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    problem(stack.post(to, Some("text/plain; charset=iso-8859-1"), "x").await, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await;

    problem(stack.post(to, Some("application/json"), "{\"body\": ").await, StatusCode::BAD_REQUEST).await;
    problem(stack.post(to, Some("text/plain"), vec![0xff_u8, 0xfe]).await, StatusCode::BAD_REQUEST).await;

    let invalid = [
        ("/msg", "text/plain", "no recipient".to_owned()),
        ("/msg/a@b@c", "text/plain", "bad recipient".to_owned()),
        (to, "text/plain", "   ".to_owned()),
        (to, "text/plain", "bell \u{7}".to_owned()),
        (to, "application/json", r#"{"type": "shout", "body": "x"}"#.to_owned()),
        (to, "application/json", r#"{"body": ["not", "a", "string"]}"#.to_owned()),
        (to, "application/x-www-form-urlencoded", "type=chat".to_owned()),
    ];
    for (path, ct, body) in invalid {
        problem(stack.post(path, Some(ct), body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let huge = "x".repeat(herald_shared::domain::DEFAULT_MAX_BODY_BYTES + 1);
    problem(stack.post(to, Some("text/plain"), huge).await, StatusCode::PAYLOAD_TOO_LARGE).await;
    problem(stack.post("/nowhere", Some("text/plain"), "x").await, StatusCode::NOT_FOUND).await;

    assert_eq!(stack.broker.ready(&work).await, 0, "no refused request reached the queue");
    let jobs = accepted(stack.post(to, Some("text/plain"), "the good one").await).await;
    let job = poll::until("the job to be ready", ARRIVAL, || async { stack.broker.get(&work).await }).await;
    let decoded = herald_shared::Job::decode(&job.delivery.data).expect("decodes");
    assert_eq!(decoded.id().to_string(), jobs[0].0);
    assert!(job.delivery.properties.delivery_mode() == &Some(2), "persistent");
    assert_eq!(stack.broker.ready(&work).await, 0, "exactly one job was queued");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_a_503_with_retry_after() {
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", herald_tests::prosody::free_port());
    let stack = Stack::start(StackOptions { relay: false, service_amqp_url: Some(dead), ..Default::default() }).await;
    let r = stack.post("/msg/ops", Some("text/plain"), "x").await;
    assert!(r.headers().get("retry-after").is_some());
    problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_1000_all_arrive_exactly_as_sent() {
    const N: usize = 1000;
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("burst");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let path = format!("/msg/{}", account.jid);

    let mut sent: HashMap<String, String> = HashMap::new();
    let mut posts = futures::stream::iter((0..N).map(|i| {
        let body = format!("alert {i}: {}", "x".repeat(i % 200));
        let request = stack.post(&path, Some("text/plain"), body.clone());
        async move { (body, request.await) }
    }))
    .buffer_unordered(32);
    use futures::StreamExt;
    while let Some((body, response)) = posts.next().await {
        let id = accepted(response).await.remove(0).0;
        sent.insert(id, body);
    }
    drop(posts);

    let got = rx.collect(N, ARRIVAL).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &got {
        let id = m.id.clone().expect("stanza id");
        assert_eq!(sent.get(&id), Some(&m.body), "message {id} arrives exactly as sent");
        *seen.entry(id).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let missing = sent.keys().filter(|id| !seen.contains_key(*id)).count();
    println!("burst: sent {N}, delivered {}, duplicates {duplicates}, missing {missing}", seen.len());
    assert_eq!(missing, 0, "every accepted message arrives");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_stream_management_a_ping_proves_delivery() {
    let stack = Stack::start(StackOptions { stream_management: false, ..Default::default() }).await;
    let account = stack.prosody.register("nosm");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            accepted(stack.post(&format!("/msg/{}", account.jid), Some("text/plain"), format!("m{i}")).await)
                .await
                .remove(0)
                .0,
        );
    }
    let got = rx.collect(20, ARRIVAL).await;
    assert_eq!(got.len(), 20);
    // Acked means the work queue drains: nothing waits unacknowledged.
    let work = stack.broker.topology().work_queue();
    poll::until("the work queue to drain", ARRIVAL, || async { (stack.broker.ready(&work).await == 0).then_some(()) })
        .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sender_no_relay_holds_is_given_back_then_parked_with_the_reason() {
    let orphan_password = "orphan-password";
    let extra = herald_tests::stack::user_entry("orphan@localhost", orphan_password, Some("ghost@localhost"));
    let grace = Duration::from_secs(2);
    let options = StackOptions { extra_users: extra, unknown_sender_grace: grace, ..Default::default() };
    let stack = Stack::start(options).await;
    let jobs =
        accepted(stack.post_as("orphan@localhost", orphan_password, "/msg/ops", Some("text/plain"), "lost?").await)
            .await;
    let dead = stack.broker.topology().dead_queue();
    let parked = poll::until("the job to be parked", ARRIVAL, || async { stack.broker.get(&dead).await }).await;
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason header");
    assert!(reason.contains("ghost@localhost"), "reason names the sender: {reason}");
    assert!(reason.contains("no relay took the job within 2s"), "parked after the grace period: {reason}");
    assert_eq!(
        header_text(&parked.delivery.properties, headers::ATTEMPT).as_deref(),
        Some("1"),
        "giving back counts no attempt"
    );
    // Given back (for another replica) before it was parked.
    let metrics = stack.http.get(format!("{}/metrics", stack.relay_admin_url.as_deref().expect("relay"))).send().await;
    let metrics = metrics.expect("metrics").text().await.expect("text");
    let retried = metrics.lines().find(|l| l.starts_with(r#"herald_deliveries_total{outcome="retried"}"#));
    assert!(retried.is_some_and(|l| !l.ends_with(" 0")), "{metrics}");
    assert!(header_text(&parked.delivery.properties, headers::PARKED_AT).is_some());
    assert_eq!(herald_shared::Job::decode(&parked.delivery.data).expect("job").id().to_string(), jobs[0].0);
    stack.stop().await;
}
