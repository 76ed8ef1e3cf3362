//! Transport security by default: the relay speaks STARTTLS and verifies the
//! server's certificate; `amqps://` verifies the broker's; a private CA is
//! trusted through SSL_CERT_FILE, for both.

use herald_tests::binaries::{Service, ServiceEnv};
use herald_tests::proxy::{amqp_authority, amqp_url_via};
use herald_tests::stack::user_entry;
use herald_tests::{Broker, Prosody, Receiver, poll};
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
    let entry = format!(
        "[[accounts]]\njid = \"{}\"\npassword = \"{}\"\nserver = \"localhost:{}\"\n",
        sender.jid, sender.password, prosody.port
    );
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

    // Direct TLS (XEP-0368), verified the same way.
    let port = prosody.direct_tls_port.expect("a direct TLS port");
    let entry = format!(
        "[[accounts]]\njid = \"{}\"\npassword = \"{}\"\nserver = \"localhost:{port}\"\ntls = \"direct\"\n",
        sender.jid, sender.password
    );
    std::fs::write(&env.accounts_file, entry).expect("accounts");
    let relay = Service::spawn("herald-relay", &trusting);
    let post = http
        .post(format!("http://127.0.0.1:{}/msg/{}", env.ingress_port, recipient.jid))
        .basic_auth(&sender.jid, Some("pw"))
        .header("content-type", "text/plain")
        .body("over direct TLS")
        .send()
        .await
        .expect("post");
    assert_eq!(post.status(), 202);
    let m = rx.next(DEADLINE).await.expect("delivered over direct TLS");
    assert_eq!(m.body, "over direct TLS");
    assert!(relay.terminate(DEADLINE).await);
    assert!(ingress.terminate(DEADLINE).await);
    broker.cleanup_after_default_relay().await;
}

/// Terminates TLS with the certificate in `dir` (`make_certificates`) and
/// forwards to `upstream` in the clear: a broker with an `amqps` listener.
async fn tls_terminator(dir: &std::path::Path, upstream: String) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("localhost.crt"))
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(dir.join("localhost.key")).expect("key");
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate fails here.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                drop(tokio::io::copy_bidirectional(&mut tls, &mut server).await);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_works_with_a_private_ca_and_only_with_it() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start().await;
    let sender = prosody.register("amqps-sender");
    let recipient = prosody.register("amqps-recipient");
    let mut rx = Receiver::connect(&prosody, &recipient).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = herald_tests::prosody::make_certificates(dir.path());
    // In front of the test broker (the local one, or the container's).
    let port = tls_terminator(dir.path(), amqp_authority(&broker.url)).await;
    let (users, accounts) = (dir.path().join("users.toml"), dir.path().join("accounts.toml"));
    std::fs::write(&users, user_entry(&sender.jid, "pw", None)).expect("users");
    std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
    let url = amqp_url_via(&broker.url, port).replacen("amqp://", "amqps://", 1);
    let env = ServiceEnv::new(url, broker.prefix.clone(), users, accounts);
    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("http://127.0.0.1:{}/msg/{}", env.ingress_port, recipient.jid))
            .basic_auth(&sender.jid, Some("pw"))
            .header("content-type", "text/plain")
            .body("over amqps")
            .send()
    };

    // Without the CA the broker's certificate is not trusted: 503, never 202.
    let untrusting = env.spawn_ingress();
    let refused = poll::until("the ingress to answer", DEADLINE, || async { post().await.ok() }).await;
    assert_eq!(refused.status(), 503);
    assert!(untrusting.terminate(DEADLINE).await, "ingress stops on SIGTERM");

    let mut ingress_env = env.ingress();
    ingress_env.push(("SSL_CERT_FILE", ca.display().to_string()));
    let mut relay_env = env.relay();
    relay_env.push(("SSL_CERT_FILE", ca.display().to_string()));
    let ingress = Service::spawn("herald-ingress", &ingress_env);
    let relay = Service::spawn("herald-relay", &relay_env);
    let accepted =
        poll::until("a 202 over amqps", DEADLINE, || async { post().await.ok().filter(|r| r.status() == 202) }).await;
    assert_eq!(accepted.status(), 202);
    let m = rx.next(DEADLINE).await.expect("the relay consumed it over amqps and delivered it");
    assert_eq!(m.body, "over amqps");
    assert!(relay.terminate(DEADLINE).await && ingress.terminate(DEADLINE).await, "both stop on SIGTERM");
    broker.cleanup_after_default_relay().await;
}
