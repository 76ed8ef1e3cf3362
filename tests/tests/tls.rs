//! Transport security by default: the relay speaks STARTTLS and verifies the
//! server's certificate; a private CA is trusted through SSL_CERT_FILE.

use herald_tests::binaries::{Service, ServiceEnv};
use herald_tests::stack::user_entry;
use herald_tests::{poll, Broker, Prosody, Receiver};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_verifies_the_servers_certificate_and_trusts_a_private_ca_when_told() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start_with_tls().await;
    let ca = prosody.ca_file.clone().expect("TLS server");
    let sender = prosody.register("tls-sender");
    let recipient = prosody.register("tls-recipient");
    let mut rx = Receiver::connect(&prosody, &recipient).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (users, accounts) = (dir.path().join("users.toml"), dir.path().join("accounts.toml"));
    std::fs::write(&users, user_entry(&sender.jid, "pw", None)).expect("users");
    // tls defaults to "required": STARTTLS, certificate checked for the JID's domain.
    let entry = format!("[[accounts]]\njid = \"{}\"\npassword = \"{}\"\nserver = \"localhost:{}\"\n", sender.jid, sender.password, prosody.port);
    std::fs::write(&accounts, entry).expect("accounts");
    let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
    let ingress = env.spawn_ingress();
    let http = reqwest::Client::new();
    let readyz = format!("http://127.0.0.1:{}/readyz", env.relay_admin_port);
    let ingress_readyz = format!("http://127.0.0.1:{}/readyz", env.ingress_admin_port);
    poll::until("the ingress to be ready", DEADLINE, || async {
        (http.get(&ingress_readyz).send().await.ok()?.status() == 200).then_some(())
    })
    .await;

    // Without the private CA the certificate is refused: not ready, nothing sent.
    let mut untrusting = env.relay();
    untrusting.push(("SSL_CERT_FILE", "/nonexistent/ca.pem".into()));
    let relay = Service::spawn("herald-relay", &untrusting);
    let why = poll::until("the relay to report the refused certificate", DEADLINE, || async {
        let response = http.get(&readyz).send().await.ok()?;
        let text = response.text().await.ok()?;
        text.contains("unreachable").then_some(text)
    })
    .await;
    assert!(why.to_lowercase().contains("certificate") || why.contains("tls") || why.contains("TLS"), "{why}");
    let post = http
        .post(format!("http://127.0.0.1:{}/msg/{}", env.ingress_port, recipient.jid))
        .basic_auth(&sender.jid, Some("pw"))
        .header("content-type", "text/plain")
        .body("over TLS")
        .send()
        .await
        .expect("post");
    assert_eq!(post.status(), 202);
    assert!(rx.next(Duration::from_millis(500)).await.is_none(), "nothing goes out over an unverified connection");
    assert!(relay.terminate(DEADLINE).await);

    // With it, the job that waited is delivered over TLS.
    let mut trusting = env.relay();
    trusting.push(("SSL_CERT_FILE", ca.display().to_string()));
    let relay = Service::spawn("herald-relay", &trusting);
    let m = rx.next(DEADLINE).await.expect("delivered once the CA is trusted");
    assert_eq!(m.body, "over TLS");
    assert!(relay.terminate(DEADLINE).await);
    assert!(ingress.terminate(DEADLINE).await);
    broker.cleanup(&[]).await;
}
