//! Hostile input: refused at the door with a clear 4xx, or carried as inert
//! text; either way the relay's XMPP stream stays up and the next ordinary
//! message arrives. Nothing poisons the queue.

use crate::ARRIVAL;
use herald_shared::topology::headers;
use herald_tests::broker::header_text;
use herald_tests::{Receiver, Stack, StackOptions, admin, poll};

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_or_inert_and_the_stream_survives() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("target");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let to = account.jid.as_str();
    let long_user = "a".repeat(1100);
    let deep_json = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let oversized = "x".repeat(herald_shared::domain::DEFAULT_MAX_BODY_BYTES + 1);
    // Under the limit as bytes, five times over it as XML (`&amp;`).
    let oversized_as_xml = "&".repeat(herald_shared::domain::DEFAULT_MAX_BODY_BYTES - 1);
    let refused: Vec<(String, Option<&str>, Vec<u8>, u16)> = vec![
        (format!("/msg/{to}"), Some("text/plain"), b"nul \0 byte".to_vec(), 422),
        (format!("/msg/{to}"), Some("text/plain"), b"escape \x1b[31m red".to_vec(), 422),
        (format!("/msg/{to}"), Some("text/plain"), b"\xff\xfe not utf-8".to_vec(), 400),
        (format!("/msg/{to}"), Some("text/plain"), Vec::new(), 422),
        (format!("/msg/{to}"), Some("text/plain"), oversized.into_bytes(), 413),
        (format!("/msg/{to}"), Some("text/plain"), oversized_as_xml.into_bytes(), 413),
        (format!("/msg/{to}"), Some("text/plain; charset=latin1"), b"caf\xe9".to_vec(), 415),
        (format!("/msg/{to}"), None, b"no type".to_vec(), 415),
        (format!("/msg/{to}"), Some("application/xml"), b"<message/>".to_vec(), 415),
        ("/msg".into(), Some("application/json"), br#"{"to":123,"body":"x"}"#.to_vec(), 422),
        ("/msg".into(), Some("application/json"), format!(r#"{{"to":"{to}","body":["x"]}}"#).into_bytes(), 422),
        ("/msg".into(), Some("application/json"), format!(r#"{{"to":"{to}","body":"x""#).into_bytes(), 400),
        ("/msg".into(), Some("application/json"), deep_json.into_bytes(), 422),
        (
            "/msg".into(),
            Some("application/json"),
            format!(r#"{{"to":"{to}","type":"error","body":"x"}}"#).into_bytes(),
            422,
        ),
        (
            "/msg".into(),
            Some("application/json"),
            format!(r#"{{"to":"{to}","type":"chat'/><x","body":"x"}}"#).into_bytes(),
            422,
        ),
        ("/msg".into(), Some("application/x-www-form-urlencoded"), format!("to={to}&body=%FF%FE").into_bytes(), 400),
        (format!("/msg/{to}?subject=%C0%AF"), Some("text/plain"), b"x".to_vec(), 400),
        ("/msg/a%00b@localhost".into(), Some("text/plain"), b"x".to_vec(), 422),
        (format!("/msg/{long_user}@localhost"), Some("text/plain"), b"x".to_vec(), 422),
        ("/msg/a@b@c".into(), Some("text/plain"), b"x".to_vec(), 422),
        ("/msg/@localhost".into(), Some("text/plain"), b"x".to_vec(), 422),
        ("/msg/x@%5B::1".into(), Some("text/plain"), b"x".to_vec(), 422),
        ("/msg/x@local%20host".into(), Some("text/plain"), b"x".to_vec(), 422),
    ];
    for (path, content_type, body, status) in refused {
        let response = stack.post(&path, content_type, body.clone()).await;
        let got = response.status().as_u16();
        let problem: serde_json::Value = response.json().await.unwrap_or_default();
        assert_eq!(
            got,
            status,
            "{path} {content_type:?} {:?} → {problem}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        assert_eq!(problem["status"], status, "a problem document for {path}");
    }
    assert_eq!(stack.broker.ready(&stack.broker.topology().work_queue()).await, 0, "nothing refused was queued");

    // Markup and quoting in every field stays text.
    let evil = r#"</body><body xmlns="jabber:client">injected</body><x a='"'/>]]>&amp;"#;
    let json =
        serde_json::json!({ "to": to, "type": "headline", "body": evil, "subject": evil, "thread": "t'\"><x/>" });
    let response = stack.post("/msg", Some("application/json"), json.to_string()).await;
    assert_eq!(response.status(), 202);
    let m = rx.next(ARRIVAL).await.expect("the hostile-looking message arrives");
    assert_eq!((m.body.as_str(), m.subject.as_deref(), m.thread.as_deref()), (evil, Some(evil), Some("t'\"><x/>")));

    let response = stack.post(&format!("/msg/{to}"), Some("text/plain"), "still here").await;
    assert_eq!(response.status(), 202);
    let m = rx.next(ARRIVAL).await.expect("the next ordinary message arrives");
    assert_eq!(m.body, "still here");
    let relay_admin = stack.relay_admin_url.clone().expect("relay");
    let ready = stack.http.get(format!("{relay_admin}/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "the relay's session is up");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_the_servers_stanza_limit_is_parked_not_sent() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("big");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    // Queued by something other than the ingress (or an ingress with a
    // larger HERALD_MAX_BODY_BYTES): 100 KiB of `&` is 500 KiB of XML, and
    // Prosody would close the stream over it on every attempt.
    let job = stack.job(&account.jid, &"&".repeat(100 * 1024));
    stack.broker.publish_job(&job, false).await;
    let dead = stack.broker.topology().dead_queue();
    poll::until("the job to be parked", ARRIVAL, || async { (stack.broker.ready(&dead).await == 1).then_some(()) })
        .await;
    let parked = stack.broker.get(&dead).await.expect("parked");
    let reason = header_text(&parked.delivery.properties, headers::REASON).expect("reason");
    assert!(reason.contains("stanza limit"), "{reason}");

    let response = stack.post(&format!("/msg/{}", account.jid), Some("text/plain"), "goes on").await;
    assert_eq!(response.status(), 202);
    assert_eq!(rx.next(ARRIVAL).await.expect("arrives").body, "goes on", "and nothing else before it");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_attempt_count_is_delivered_once_and_acked() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("counted");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    // The attempt header is the relay's own, but anyone who can publish to
    // the queue can set it: the largest count must not overflow when the
    // delivery is recorded (a panic there requeues the job, over and over).
    let job = stack.job(&account.jid, "counted");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(headers::ATTEMPT.into(), lapin::types::AMQPValue::LongLongInt(i64::MAX));
    stack.broker.publish_job_with_headers(&job, headers).await;
    assert_eq!(rx.next(ARRIVAL).await.expect("arrives").body, "counted");
    let admin = stack.relay_admin_url.as_deref().expect("relay");
    poll::until("the delivery to be counted", ARRIVAL, || async {
        let metrics = admin::metrics(&stack.http, admin).await;
        (admin::sample(&metrics, r#"herald_deliveries_total{outcome="delivered"}"#)? >= 1.0).then_some(())
    })
    .await;

    let response = stack.post(&format!("/msg/{}", account.jid), Some("text/plain"), "goes on").await;
    assert_eq!(response.status(), 202);
    assert_eq!(rx.next(ARRIVAL).await.expect("arrives").body, "goes on", "and no second copy before it");
    let metrics = admin::metrics(&stack.http, admin).await;
    assert_eq!(admin::sample(&metrics, "herald_redelivered_total"), Some(0.0), "{metrics}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_job_is_parked_and_the_relay_goes_on() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("after");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let garbage: [&[u8]; 4] = [b"not json at all", br#"{"v":99,"id":"x"}"#, br#"{"v":1,"to":"<x/>"}"#, b"\xff\xfe\x00"];
    for payload in garbage {
        stack.broker.publish_raw(payload).await;
    }
    let dead = stack.broker.topology().dead_queue();
    poll::until("the broken jobs to be parked", ARRIVAL, || async {
        (stack.broker.ready(&dead).await == 4).then_some(())
    })
    .await;
    let mut parked = Vec::new();
    while let Some(message) = stack.broker.get(&dead).await {
        let reason = header_text(&message.delivery.properties, headers::REASON).expect("reason");
        assert!(reason.contains("cannot decode"), "{reason}");
        parked.push(message.delivery.data);
    }
    parked.sort();
    let mut expected: Vec<Vec<u8>> = garbage.iter().map(|g| g.to_vec()).collect();
    expected.sort();
    assert_eq!(parked, expected, "each broken job parked once, unchanged");

    let response = stack.post(&format!("/msg/{}", account.jid), Some("text/plain"), "goes on").await;
    assert_eq!(response.status(), 202);
    assert_eq!(rx.next(ARRIVAL).await.expect("arrives").body, "goes on");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_passwords_is_throttled_with_429_but_known_clients_go_on() {
    let stack = Stack::start(StackOptions::default()).await;
    let account = stack.prosody.register("watched");
    let mut rx = Receiver::connect(&stack.prosody, &account).await;
    let path = format!("/msg/{}", account.jid);
    assert_eq!(stack.post(&path, Some("text/plain"), "before").await.status(), 202, "the script logs in");
    let mut statuses = Vec::new();
    for i in 0..8 {
        let response = stack.post_as(&stack.sender.jid, &format!("guess-{i}"), &path, Some("text/plain"), "x").await;
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
            assert!(retry_after >= 1);
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 401, 429, 429], "five free failures, then a lockout");
    let unknown = stack.post_as("nobody@localhost", "x", &path, Some("text/plain"), "x").await;
    assert_eq!(unknown.status(), 429, "the address is locked for every account");
    assert_eq!(stack.post(&path, Some("text/plain"), "after").await.status(), 202, "the script still gets through");
    assert_eq!(rx.collect(2, ARRIVAL).await.len(), 2);
    stack.stop().await;
}
