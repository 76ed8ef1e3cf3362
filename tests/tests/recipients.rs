//! Several recipients in one request: one job per distinct recipient, each
//! listed in the 202 with its id, each delivered on its own; one invalid
//! recipient refuses the whole request and queues nothing.

use crate::ARRIVAL;
use herald_tests::{Receiver, Stack, StackOptions};
use std::collections::HashMap;
use std::time::Duration;

/// `to` → job id, from a 202 body.
async fn jobs(response: reqwest::Response) -> HashMap<String, String> {
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["jobs"]
        .as_array()
        .expect("a jobs array")
        .iter()
        .map(|j| (j["to"].as_str().expect("to").to_owned(), j["id"].as_str().expect("id").to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_recipient_gets_its_own_job_and_message() {
    let stack = Stack::start(StackOptions::default()).await;
    let (alice, bob) = (stack.prosody.register("alice"), stack.prosody.register("bob"));
    let mut alice_rx = Receiver::connect(&stack.prosody, &alice).await;
    let mut bob_rx = Receiver::connect(&stack.prosody, &bob).await;
    // bob twice, once without the domain: one job for him.
    let bob_local = bob.jid.split('@').next().expect("node");
    let json = serde_json::json!({ "to": [alice.jid, bob.jid, bob_local], "body": "db-7 is down" });
    let ids = jobs(stack.post("/msg", Some("application/json"), json.to_string()).await).await;
    assert_eq!(ids.len(), 2, "one job per distinct recipient: {ids:?}");
    for (rx, account) in [(&mut alice_rx, &alice), (&mut bob_rx, &bob)] {
        let m = rx.next(ARRIVAL).await.unwrap_or_else(|| panic!("{} gets the message", account.jid));
        assert_eq!(m.body, "db-7 is down");
        assert_eq!(m.id.as_ref(), Some(&ids[&account.jid]), "the stanza id is that recipient's job id");
    }

    // A repeated form field does the same.
    let form = format!("to={}&to={}&body=form+body", alice.jid, bob.jid);
    let ids = jobs(stack.post("/msg", Some("application/x-www-form-urlencoded"), form).await).await;
    assert_eq!(ids.len(), 2);
    for (rx, account) in [(&mut alice_rx, &alice), (&mut bob_rx, &bob)] {
        let m = rx.next(ARRIVAL).await.unwrap_or_else(|| panic!("{} gets the form message", account.jid));
        assert_eq!((m.body.as_str(), m.id.as_ref()), ("form body", Some(&ids[&account.jid])));
    }
    assert!(alice_rx.next(Duration::from_millis(500)).await.is_none(), "and nothing twice");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_bad_recipient_refuses_the_whole_request() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let work = stack.broker.topology().work_queue();
    let refused = [
        serde_json::json!({ "to": ["ok@localhost", "not a jid@localhost"], "body": "x" }),
        serde_json::json!({ "to": [], "body": "x" }),
        serde_json::json!({ "to": (0..=herald_ingress::routes::MAX_RECIPIENTS).map(|i| format!("u{i}@localhost")).collect::<Vec<_>>(), "body": "x" }),
    ];
    for json in refused {
        let response = stack.post("/msg", Some("application/json"), json.to_string()).await;
        assert_eq!(response.status(), 422, "{json}");
    }
    let response = stack.post("/msg", Some("application/x-www-form-urlencoded"), "to=a@localhost&body=x&body=y").await;
    assert_eq!(response.status(), 400, "a repeated field other than to");
    assert_eq!(stack.broker.ready(&work).await, 0, "nothing refused was queued");

    let many: Vec<String> = (0..herald_ingress::routes::MAX_RECIPIENTS).map(|i| format!("u{i}@localhost")).collect();
    let json = serde_json::json!({ "to": many, "body": "x" });
    let ids = jobs(stack.post("/msg", Some("application/json"), json.to_string()).await).await;
    assert_eq!(ids.len(), herald_ingress::routes::MAX_RECIPIENTS);
    assert_eq!(
        stack.broker.ready(&work).await as usize,
        herald_ingress::routes::MAX_RECIPIENTS,
        "one job each, all confirmed"
    );
    stack.stop().await;
}
