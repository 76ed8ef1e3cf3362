//! The real binaries, configured only through the documented environment
//! variables.

use herald_tests::binaries::{self, Service, ServiceEnv};
use herald_tests::stack::user_entry;
use herald_tests::{Broker, Prosody, Receiver, poll};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn the_binaries_deliver_a_message_and_stop_cleanly_on_sigterm() {
    herald_shared::telemetry::install_crypto_provider();
    let broker = Broker::connect().await;
    let prosody = Prosody::start().await;
    let sender = prosody.register("bin-sender");
    let recipient = prosody.register("bin-recipient");
    let mut rx = Receiver::connect(&prosody, &recipient).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(&users, user_entry(&sender.jid, "http-secret", None)).expect("users");
    std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
    let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, accounts);
    let port = env.ingress_port;
    let ingress = env.spawn_ingress();
    // The relay reads its broker URL from a file, as from a mounted Secret.
    let url_file = dir.path().join("amqp-url");
    std::fs::write(&url_file, format!("{}\n", broker.url)).expect("url file");
    let mut relay_env = env.relay();
    relay_env.retain(|(k, _)| *k != "HERALD_AMQP_URL");
    relay_env.push(("HERALD_AMQP_URL_FILE", url_file.display().to_string()));
    let relay = Service::spawn("herald-relay", &relay_env);

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/msg/{}", recipient.jid);
    let response = poll::until("the ingress to answer 202", Duration::from_secs(30), || {
        let request = http
            .post(&url)
            .basic_auth(&sender.jid, Some("http-secret"))
            .header("content-type", "text/plain")
            .body("from the real binaries")
            .send();
        async move { request.await.ok().filter(|r| r.status() == 202) }
    })
    .await;
    let json: serde_json::Value = response.json().await.expect("json");
    let id = json["jobs"][0]["id"].as_str().expect("job id").to_owned();
    let m = rx.next(Duration::from_secs(30)).await.expect("message arrives");
    assert_eq!((m.id.as_deref(), m.body.as_str()), (Some(id.as_str()), "from the real binaries"));
    // mimalloc's regions on huge pages cost the relay 25-30 MiB of RSS
    // (relay/src/allocator.rs): it opts out, whatever the system's setting.
    assert_eq!(binaries::thp_enabled(relay.pid()), Some(false), "the relay runs without transparent huge pages");

    assert!(ingress.terminate(Duration::from_secs(30)).await, "ingress exits 0 on SIGTERM");
    assert!(relay.terminate(Duration::from_secs(30)).await, "relay exits 0 on SIGTERM");
    broker.cleanup_after_default_relay().await;
}

#[test]
fn hash_password_prints_a_phc_string_that_verifies() {
    use argon2::{Argon2, PasswordHash, PasswordVerifier};
    let mut child = Command::new(binaries::path("herald-ingress"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run hash-password");
    child.stdin.take().expect("stdin").write_all(b"correct horse\n").expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    let phc = String::from_utf8(out.stdout).expect("utf-8");
    let phc = phc.trim();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    let parsed = PasswordHash::new(phc).expect("PHC");
    assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
    assert!(Argon2::default().verify_password(b"correct horse\n", &parsed).is_err(), "the newline is not part of it");
}

#[test]
fn help_documents_every_setting() {
    let help = |name: &str| {
        let out = Command::new(binaries::path(name)).arg("--help").output().expect("--help");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let ingress = help("herald-ingress");
    for name in [
        "HERALD_LISTEN",
        "HERALD_AMQP_URL",
        "HERALD_AMQP_PREFIX",
        "HERALD_USERS_FILE",
        "HERALD_ADMIN_LISTEN",
        "HERALD_MAX_BODY_BYTES",
        "HERALD_AUTH_CACHE_SECONDS",
        "HERALD_AMQP_URL_FILE",
        "HERALD_LOGIN_FAILURES",
        "HERALD_AUTH_CONCURRENCY",
        "HERALD_AUTH_QUEUE",
        "HERALD_AUTH_QUEUE_TIMEOUT",
        "HERALD_HTTP_HEADER_TIMEOUT",
        "HERALD_HTTP_BODY_TIMEOUT",
        "HERALD_HTTP_MAX_CONNECTIONS",
        "hash-password",
        "healthcheck",
    ] {
        assert!(ingress.contains(name), "herald-ingress --help mentions {name}");
    }
    let relay = help("herald-relay");
    for name in [
        "HERALD_AMQP_URL",
        "HERALD_AMQP_PREFIX",
        "HERALD_ACCOUNTS_FILE",
        "HERALD_ADMIN_LISTEN",
        "HERALD_PREFETCH",
        "HERALD_RETRY_DELAYS",
        "HERALD_ACK_TIMEOUT",
        "HERALD_ONLINE_TIMEOUT",
        "HERALD_DRAIN_TIMEOUT",
        "HERALD_UNKNOWN_SENDER_GRACE",
        "HERALD_INSTANCE",
        "healthcheck",
        "dead",
    ] {
        assert!(relay.contains(name), "herald-relay --help mentions {name}");
    }
    assert!(!ingress.contains("guest:guest") && !relay.contains("guest:guest"), "--help shows no credentials");
}

/// The README's configuration tables and each binary's `--help` name the
/// same settings: every variable in a table is in the `--help` of the
/// binaries the table is for, and every variable a `--help` names is in
/// the README.
#[test]
fn the_readme_and_help_list_the_same_settings() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    let section = readme.split("## Configuration").nth(1).expect("a Configuration section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut tables: Vec<(Vec<&str>, Vec<String>)> = Vec::new();
    for line in section.lines() {
        match line {
            "Both services:" => tables.push((vec!["herald-ingress", "herald-relay"], Vec::new())),
            "herald-ingress:" => tables.push((vec!["herald-ingress"], Vec::new())),
            "herald-relay:" => tables.push((vec!["herald-relay"], Vec::new())),
            row if row.starts_with("| `") => {
                let first = row.split('|').nth(1).unwrap_or_default();
                let names = first
                    .split('`')
                    .filter(|n| n.starts_with("HERALD_") || n.starts_with("RUST_") || n.starts_with("SSL_"));
                tables.last_mut().expect("a table after its heading").1.extend(names.map(str::to_owned));
            }
            _ => {}
        }
    }
    assert_eq!(tables.len(), 3, "three tables: both services, the ingress, the relay");
    let help = |name: &str| {
        let out = Command::new(binaries::path(name)).arg("--help").output().expect("--help");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let helps: std::collections::HashMap<&str, String> =
        ["herald-ingress", "herald-relay"].into_iter().map(|b| (b, help(b))).collect();
    for (binaries, names) in &tables {
        for binary in binaries {
            for name in names {
                assert!(helps[binary].contains(name.as_str()), "{binary} --help does not mention {name}");
            }
        }
    }
    for (binary, text) in &helps {
        for name in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("HERALD_"))
        {
            let listed = tables.iter().any(|(bins, names)| bins.contains(binary) && names.iter().any(|n| n == name));
            assert!(listed, "{binary} reads {name}, which the README's configuration tables for it leave out");
        }
    }
}
