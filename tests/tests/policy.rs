//! Per-user policy from the users file: an allow-list of recipients (403
//! outside it) and a rate limit (429 with Retry-After past it). A refused
//! request queues nothing and takes no tokens.

use herald_tests::proxy::{self, Proxy};
use herald_tests::stack::user_entry;
use herald_tests::{Stack, StackOptions, poll};

#[tokio::test(flavor = "multi_thread")]
async fn the_allow_list_and_the_rate_limit_hold() {
    let user = "limited@localhost";
    let policy = "allow = [\"ok@localhost\", \"*@rooms.localhost\"]\nrate = \"1/h\"\nburst = 3\n";
    let extra = format!("{}{policy}", user_entry(user, "limited-secret", None));
    let stack = Stack::start(StackOptions { relay: false, extra_users: extra, ..Default::default() }).await;
    let work = stack.broker.topology().work_queue();
    let post = |json: serde_json::Value| {
        stack.post_as(user, "limited-secret", "/msg", Some("application/json"), json.to_string())
    };

    for to in [serde_json::json!("eve@localhost"), serde_json::json!(["ok@localhost", "rooms.localhost"])] {
        let response = post(serde_json::json!({ "to": to, "body": "x" })).await;
        assert_eq!(response.status(), 403, "{to}");
        let problem: serde_json::Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "urn:herald:problem:forbidden-recipient");
    }
    assert_eq!(stack.broker.ready(&work).await, 0, "nothing forbidden was queued");

    // The burst is 3 messages: two recipients, then one, then none left.
    let two = post(serde_json::json!({ "to": ["ok@localhost", "ops@rooms.localhost"], "body": "x" })).await;
    assert_eq!(two.status(), 202, "the 403s took no tokens");
    assert_eq!(post(serde_json::json!({ "to": "ok@localhost", "body": "x" })).await.status(), 202);
    let limited = post(serde_json::json!({ "to": "ok@localhost", "body": "x" })).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    let problem: serde_json::Value = limited.json().await.expect("problem");
    assert_eq!(problem["type"], "urn:herald:problem:rate-limited");
    assert_eq!(stack.broker.ready(&work).await, 3, "exactly the accepted messages were queued");

    // Other users are not limited by this one's bucket or list.
    let other = stack.post("/msg/eve@localhost", Some("text/plain"), "x").await;
    assert_eq!(other.status(), 202);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_refused_during_a_broker_outage_take_no_tokens() {
    let user = "patient@localhost";
    let extra = format!("{}rate = \"1/h\"\nburst = 3\n", user_entry(user, "patient-secret", None));
    // Held for the test: with the container backend it holds the broker.
    let broker = herald_tests::Broker::connect().await;
    let broker_url = broker.url.clone();
    let link = Proxy::start(proxy::amqp_authority(&broker_url)).await;
    let options = StackOptions {
        relay: false,
        extra_users: extra,
        service_amqp_url: Some(link.amqp_url(&broker_url)),
        ..Default::default()
    };
    let stack = Stack::start(options).await;
    let post = || stack.post_as(user, "patient-secret", "/msg/ok@localhost", Some("text/plain"), "x");

    link.cut().await;
    // Alertmanager retries a 503 (and drops a notification on a 429).
    for _ in 0..5 {
        assert_eq!(post().await.status(), 503, "the broker is out of reach");
    }
    link.restore();
    poll::until("the ingress to accept again", crate::ARRIVAL, || async {
        (post().await.status() == 202).then_some(())
    })
    .await;
    // The 503s took nothing: the burst of 3 is all there.
    assert_eq!(post().await.status(), 202);
    assert_eq!(post().await.status(), 202);
    assert_eq!(post().await.status(), 429);
    assert_eq!(stack.broker.ready(&stack.broker.topology().work_queue()).await, 3);
    stack.stop().await;
}
