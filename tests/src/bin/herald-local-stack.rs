//! A working local Herald without Kubernetes or Docker: a private Prosody
//! with the demo accounts alice (sender) and bob (recipient), the real
//! `herald-ingress` and `herald-relay` binaries on the local RabbitMQ, one
//! message sent through it all and shown as bob received it. Then it stays up
//! and prints whatever bob receives until Ctrl-C.
//!
//!     cargo run -p herald-tests --bin herald-local-stack
//!
//! `HERALD_LOCAL_PORT` (default 8080) is the ingress port; `HERALD_TEST_AMQP_URL`
//! the broker (or `HERALD_TEST_BACKEND=containers`: both servers in containers).

use herald_tests::binaries::ServiceEnv;
use herald_tests::stack::user_entry;
use herald_tests::{Broker, Prosody, Receiver, poll};
use std::time::Duration;

const HTTP_USER: &str = "alice@localhost";
const HTTP_PASSWORD: &str = "alice-http-pw";

#[tokio::main]
async fn main() {
    herald_shared::telemetry::install_crypto_provider();
    let port: u16 = std::env::var("HERALD_LOCAL_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let prefix = "herald-local";
    // Fail early with a clear message if there is no broker (and hold the
    // container of the container backend for as long as this runs).
    let broker = Broker::connect().await;
    let amqp_url = broker.url.clone();

    let prosody = Prosody::start().await;
    let alice = prosody.register_as("alice", "alice-xmpp-pw");
    let bob = prosody.register_as("bob", "bob-xmpp-pw");
    let dir = tempfile::Builder::new().prefix("herald-local-").tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(&users, user_entry(HTTP_USER, HTTP_PASSWORD, None)).expect("users file");
    std::fs::write(&accounts, prosody.accounts_entry(&alice)).expect("accounts file");

    let mut env = ServiceEnv::new(amqp_url, prefix.to_owned(), users, accounts);
    env.ingress_port = port;
    let ingress = env.spawn_ingress();
    let relay = env.spawn_relay();
    let mut bob_rx = Receiver::connect(&prosody, &bob).await;

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/msg/bob");
    let response = poll::until("the ingress to accept the demo message", Duration::from_secs(30), || {
        let request = http
            .post(&url)
            .basic_auth(HTTP_USER, Some(HTTP_PASSWORD))
            .header("content-type", "text/plain")
            .body("db-7 is down")
            .send();
        async move { request.await.ok().filter(|r| r.status() == 202) }
    })
    .await;
    println!("\nPOST /msg/bob → {} {}", response.status(), response.text().await.unwrap_or_default());
    let message = bob_rx.next(Duration::from_secs(30)).await.expect("bob receives the demo message");
    println!(
        "bob@localhost received from {}: {:?} (id {})",
        message.from,
        message.body,
        message.id.unwrap_or_default()
    );
    println!(
        "\nHerald is up. Try:\n  curl -i http://127.0.0.1:{port}/msg/bob -u {HTTP_USER}:{HTTP_PASSWORD} -H 'Content-Type: text/plain' -d 'hello bob'\n\
         XMPP: 127.0.0.1:{} (plaintext), accounts alice@localhost / alice-xmpp-pw and bob@localhost / bob-xmpp-pw.\n\
         Messages bob receives are printed below; Ctrl-C stops everything.\n",
        prosody.port
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            received = bob_rx.next(Duration::from_secs(3600)) => {
                if let Some(m) = received {
                    println!("bob@localhost received from {}: {:?} (id {})", m.from, m.body, m.id.unwrap_or_default());
                }
            }
        }
    }
    println!("stopping");
    ingress.terminate(Duration::from_secs(30)).await;
    relay.terminate(Duration::from_secs(30)).await;
}
