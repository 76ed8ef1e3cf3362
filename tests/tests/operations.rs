//! What operators rely on: the admin listeners (health, readiness,
//! metrics) and logs that never show credentials.

use herald_tests::admin::sample;
use herald_tests::binaries::{Service, ServiceEnv};
use herald_tests::stack::user_entry;
use herald_tests::{Broker, Prosody, Receiver, Stack, StackOptions, poll};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let response = http.get(url).send().await.expect("admin listener answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_listeners_report_health_readiness_and_metrics() {
    let stack = Stack::start(StackOptions::default()).await;
    let relay_admin = stack.relay_admin_url.clone().expect("relay runs");
    let recipient = stack.prosody.register("ops");
    let mut rx = Receiver::connect(&stack.prosody, &recipient).await;
    for admin in [&stack.ingress_admin_url, &relay_admin] {
        assert_eq!(get(&stack.http, &format!("{admin}/healthz")).await.0, 200);
        poll::until("readiness", DEADLINE, || async {
            (get(&stack.http, &format!("{admin}/readyz")).await.0 == 200).then_some(())
        })
        .await;
    }
    let response = stack.post(&format!("/msg/{}", recipient.jid), Some("text/plain"), "counted").await;
    assert_eq!(response.status(), 202);
    let refused = stack.post_as(&stack.sender.jid, "wrong", "/msg/x", Some("text/plain"), "no").await;
    assert_eq!(refused.status(), 401);
    rx.next(DEADLINE).await.expect("delivered");

    let (_, ingress) = get(&stack.http, &format!("{}/metrics", stack.ingress_admin_url)).await;
    assert_eq!(
        sample(&ingress, r#"herald_http_requests_total{route="/msg/{to}",status="202"}"#),
        Some(1.0),
        "{ingress}"
    );
    assert_eq!(
        sample(&ingress, r#"herald_http_requests_total{route="/msg/{to}",status="401"}"#),
        Some(1.0),
        "{ingress}"
    );
    assert_eq!(sample(&ingress, "herald_jobs_published_total"), Some(1.0), "{ingress}");
    assert_eq!(sample(&ingress, "herald_publish_duration_seconds_count"), Some(1.0), "{ingress}");

    let relay = poll::until("the relay to count the delivery", DEADLINE, || async {
        let (_, text) = get(&stack.http, &format!("{relay_admin}/metrics")).await;
        sample(&text, "herald_delivery_latency_seconds_count").filter(|n| *n == 1.0).map(|_| text)
    })
    .await;
    assert_eq!(sample(&relay, r#"herald_deliveries_total{outcome="delivered"}"#), Some(1.0), "{relay}");
    assert_eq!(sample(&relay, "herald_sessions_online"), Some(1.0), "{relay}");
    assert_eq!(sample(&relay, "herald_consuming"), Some(1.0), "{relay}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_never_show_credentials_even_at_trace() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start().await;
    let sender = prosody.register("logged");
    let dir = tempfile::tempdir().expect("tempdir");
    let (users, accounts, log) =
        (dir.path().join("users.toml"), dir.path().join("accounts.toml"), dir.path().join("ingress.log"));
    let password = "s3cret-never-logged";
    std::fs::write(&users, user_entry(&sender.jid, password, None)).expect("users");
    std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
    let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
    let mut vars = env.ingress();
    vars.push(("HERALD_LOG_FORMAT", "json".into()));
    vars.push(("RUST_LOG", "trace".into()));
    let ingress = Service::spawn_logged("herald-ingress", &vars, Some(&log));
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/msg/someone", env.ingress_port);
    poll::until("the ingress to accept", DEADLINE, || async {
        let r = http
            .post(&url)
            .basic_auth(&sender.jid, Some(password))
            .header("content-type", "text/plain")
            .body("hi")
            .send()
            .await
            .ok()?;
        (r.status() == 202).then_some(())
    })
    .await;
    let wrong =
        http.post(&url).basic_auth(&sender.jid, Some("wrong-guess-never-logged")).body("x").send().await.expect("post");
    assert_eq!(wrong.status(), 401);
    assert!(ingress.terminate(DEADLINE).await);

    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("login refused"), "the failed login is logged:\n{text}");
    let encoded = |secret: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{secret}", sender.jid))
    };
    for line in text.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(json["level"].is_string() && json["fields"].is_object(), "{line}");
        for secret in [
            password.to_owned(),
            encoded(password),
            "wrong-guess-never-logged".to_owned(),
            encoded("wrong-guess-never-logged"),
        ] {
            assert!(!line.contains(&secret), "a credential in the log: {line}");
        }
        assert!(!line.to_ascii_lowercase().contains("authorization"), "an Authorization header in the log: {line}");
    }
    broker.cleanup(&[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_up_that_fails_on_its_configuration_declares_nothing_on_the_broker() {
    let broker = Broker::connect().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (users, template) = (dir.path().join("users.toml"), dir.path().join("broken.j2"));
    std::fs::write(&users, user_entry("someone@localhost", "pw", None)).expect("users");
    std::fs::write(&template, "{% if %}").expect("template");
    let mut config = herald_tests::stack::ingress_config(&broker.url, &broker.prefix, users);
    config.alertmanager_template = Some(template);
    let error = herald_ingress::Application::build(config.clone()).await.expect_err("a broken template stops start-up");
    assert!(error.to_string().contains("does not compile"), "{error}");
    config.alertmanager_template = None;
    config.max_body_bytes = config.max_stanza_bytes;
    let error = herald_ingress::Application::build(config).await.expect_err("a body limit with no room for the stanza");
    assert!(error.to_string().contains("HERALD_MAX_STANZA_BYTES"), "{error}");
    assert!(!broker.exchange_exists(&broker.topology().exchange()).await, "nothing was declared");
}

/// `HERALD_SESSION_IDLE`: no session until a sender's first job, closed
/// after the idle time, opened again by the next job; nothing lost or sent
/// twice across the close.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_open_on_first_use_and_close_when_idle() {
    let idle = Duration::from_secs(5);
    let stack = Stack::start(StackOptions { session_idle: Some(idle), ..StackOptions::default() }).await;
    let relay_admin = stack.relay_admin_url.clone().expect("relay runs");
    let sessions = || async {
        let (_, text) = get(&stack.http, &format!("{relay_admin}/metrics")).await;
        sample(&text, "herald_sessions_online")
    };
    poll::until("the relay to be ready without opening a session", DEADLINE, || async {
        (get(&stack.http, &format!("{relay_admin}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(sessions().await, Some(0.0), "no session before the first job");

    let recipient = stack.prosody.register("idle");
    let mut rx = Receiver::connect(&stack.prosody, &recipient).await;
    for round in ["first", "after the close"] {
        for i in 0..3 {
            let body = format!("{round} {i}");
            let response = stack.post(&format!("/msg/{}", recipient.jid), Some("text/plain"), body).await;
            assert_eq!(response.status(), 202);
        }
        let got = rx.collect(3, DEADLINE).await;
        let mut bodies: Vec<String> = got.iter().map(|m| m.body.clone()).collect();
        bodies.sort();
        assert_eq!(bodies, (0..3).map(|i| format!("{round} {i}")).collect::<Vec<_>>(), "each once: {got:#?}");
        assert_eq!(sessions().await, Some(1.0), "the sender's session is open");
        poll::until("the idle session to close", idle * 4, || async { (sessions().await == Some(0.0)).then_some(()) })
            .await;
    }
    assert!(rx.next(Duration::ZERO).await.is_none(), "nothing sent twice");
    stack.stop().await;
}
