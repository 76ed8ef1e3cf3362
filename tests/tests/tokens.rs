//! Access tokens for machines: `herald-ingress token new` makes one, the
//! users file holds only its SHA-256, a bearer token gets in without argon2
//! and a wrong one costs nothing lasting; the users file reloads without a
//! restart, on SIGHUP or by itself when it changes, and a broken one is
//! refused while the last good one stays.

use std::{process::Command, time::Duration};

use herald_tests::{
    Broker, Prosody, Receiver, Stack, StackOptions, admin,
    binaries::{self, ServiceEnv},
    poll,
    stack::user_entry,
};

use crate::ARRIVAL;

/// `herald-ingress token new`: (the token from stderr, the entry from stdout).
fn new_token(user: &str, name: &str) -> (String, String) {
    let output = Command::new(binaries::path("herald-ingress"))
        .args(["token", "new", "--user", user, "--name", name])
        .output()
        .expect("run herald-ingress token new");
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    let token = stderr.split_whitespace().find(|w| w.starts_with("hrld_")).expect("a token on stderr").to_owned();
    let entry = String::from_utf8(output.stdout).expect("utf-8");
    assert!(entry.contains("[[tokens]]") && !entry.contains(&token), "the entry holds the digest only: {entry}");
    (token, entry)
}

fn hang_up(pid: u32) {
    let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_gets_in_without_argon2_until_it_is_revoked_and_the_file_reloaded() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start().await;
    let sender = prosody.register("machine");
    let recipient = prosody.register("oncall");
    let mut rx = Receiver::connect(&prosody, &recipient).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (users, accounts) = (dir.path().join("users.toml"), dir.path().join("accounts.toml"));
    let password_user = user_entry(&sender.jid, "a password", None);
    std::fs::write(&users, &password_user).expect("users");
    std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
    let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users.clone(), accounts);
    let mut vars = env.ingress();
    // Only SIGHUP reloads in this test.
    vars.push(("HERALD_USERS_RELOAD_INTERVAL", "0s".into()));
    let ingress = binaries::Service::spawn("herald-ingress", &vars);
    let relay = env.spawn_relay();
    let http = reqwest::Client::new();
    let admin_url = format!("http://127.0.0.1:{}", env.ingress_admin_port);
    poll::until("the ingress to be ready", ARRIVAL, || async { admin::readyz(&http, &admin_url).await.ok() }).await;
    let url = format!("http://127.0.0.1:{}/msg/{}", env.ingress_port, recipient.jid);
    let post = |token: String, body: &'static str| {
        let request = http.post(&url).bearer_auth(token).header("content-type", "text/plain").body(body).send();
        async move { request.await.expect("post").status().as_u16() }
    };
    let metric = |name: &'static str| {
        let http = http.clone();
        let admin_url = admin_url.clone();
        async move { admin::sample(&admin::metrics(&http, &admin_url).await, name).unwrap_or(0.0) }
    };

    // Not in the file yet: 401. Added, and the file reloaded on SIGHUP: in.
    let (token, entry) = new_token(&sender.jid, "ci");
    assert_eq!(post(token.clone(), "too early").await, 401);
    std::fs::write(&users, format!("{password_user}{entry}")).expect("users");
    hang_up(ingress.pid());
    // Polled with an empty body: once the token is in, it gets a 422 and
    // queues nothing, so exactly one message follows.
    poll::until("the reloaded file to let the token in", ARRIVAL, || async {
        (post(token.clone(), "").await == 422).then_some(())
    })
    .await;
    assert_eq!(post(token.clone(), "by token").await, 202);
    let got = rx.next(ARRIVAL).await.expect("delivered");
    assert_eq!((got.body.as_str(), got.from.split('/').next()), ("by token", Some(sender.jid.as_str())));

    // Ten thousand wrong tokens: each a 401, no argon2, no lasting memory.
    let refused_before = metric("herald_tokens_refused_total").await;
    let before = binaries::rss_kib(ingress.pid()).expect("VmRSS");
    let wrong = futures::future::join_all((0..100).map(|task| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut statuses = Vec::new();
            for i in 0..100 {
                let token = format!("hrld_{:064x}", task * 100 + i);
                let response = http.post(&url).bearer_auth(token).body("guess").send().await.expect("post");
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    }))
    .await;
    assert!(wrong.iter().flatten().all(|s| *s == 401), "every wrong token is a 401");
    assert_eq!(metric("herald_tokens_refused_total").await - refused_before, 10_000.0);
    assert_eq!(metric("herald_password_checks_peak").await, 0.0, "no argon2 ran for any token");
    let grown = binaries::rss_kib(ingress.pid()).expect("VmRSS").saturating_sub(before);
    assert!(grown < 16 * 1024, "the ingress grew by {grown} KiB over 10,000 wrong tokens");

    // A file that does not parse is refused; the last good one stays.
    std::fs::write(&users, "[[users]]\nthis is not TOML").expect("users");
    hang_up(ingress.pid());
    poll::until("the broken file to be refused", ARRIVAL, || async {
        (metric(r#"herald_users_reloads_total{outcome="failed"}"#).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(post(token.clone(), "still in").await, 202);
    rx.next(ARRIVAL).await.expect("delivered");

    // Revoked: the entry deleted and the file reloaded.
    std::fs::write(&users, &password_user).expect("users");
    hang_up(ingress.pid());
    // Polled with an empty body, so that a post the old file still let
    // in queues nothing.
    poll::until("the revoked token to be refused", ARRIVAL, || async {
        (post(token.clone(), "").await == 401).then_some(())
    })
    .await;
    assert_eq!(post(token.clone(), "revoked").await, 401);
    assert!(rx.next(Duration::ZERO).await.is_none(), "nothing from a revoked token");
    assert!(relay.terminate(ARRIVAL).await);
    assert!(ingress.terminate(ARRIVAL).await);
    broker.cleanup_after_default_relay().await;
}

/// The users file changed in place (as a Kubernetes Secret volume is): a new
/// user gets in without a restart or a signal, and a changed password
/// replaces the old one at once, remembered login or not.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_users_file_takes_effect_without_a_restart() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let users = stack.dir.path().join("users.toml");
    let original = std::fs::read_to_string(&users).expect("users");
    assert_eq!(stack.post("/msg/someone", Some("text/plain"), "remembered").await.status(), 202);
    assert_eq!(stack.post_as("new@localhost", "new pw", "/msg/x", Some("text/plain"), "x").await.status(), 401);

    // A new user, and the sender's password changed.
    let sender = user_entry(&stack.sender.jid, "changed", None);
    std::fs::write(&users, format!("{sender}{}", user_entry("new@localhost", "new pw", None))).expect("users");
    poll::until("the new user to get in", ARRIVAL, || async {
        let response = stack.post_as("new@localhost", "new pw", "/msg/x", Some("text/plain"), "x").await;
        (response.status() == 202).then_some(())
    })
    .await;
    let old = stack.post("/msg/someone", Some("text/plain"), "old password").await;
    assert_eq!(old.status(), 401, "the remembered login of the old password is forgotten");
    let new = stack.post_as(&stack.sender.jid, "changed", "/msg/someone", Some("text/plain"), "new").await;
    assert_eq!(new.status(), 202);
    drop(original);
    stack.stop().await;
}
