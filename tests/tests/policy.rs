//! Per-user policy from the users file: an allow-list of recipients (403
//! outside it) and a rate limit (429 with Retry-After past it). A refused
//! request queues nothing and takes no tokens.

use herald_tests::stack::user_entry;
use herald_tests::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread")]
async fn the_allow_list_and_the_rate_limit_hold() {
    let user = "limited@localhost";
    let policy = "allow = [\"ok@localhost\", \"*@rooms.localhost\"]\nrate = \"1/h\"\nburst = 3\n";
    let extra = format!("{}{policy}", user_entry(user, "limited-secret", None));
    let stack = Stack::start(StackOptions { relay: false, extra_users: extra, ..Default::default() }).await;
    let work = stack.broker.topology().work_queue();
    let post = |json: serde_json::Value| stack.post_as(user, "limited-secret", "/msg", Some("application/json"), json.to_string());

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
